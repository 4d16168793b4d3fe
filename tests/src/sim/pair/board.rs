//! One simulated board: its power, its kernel, its daemon (the real engine, fed one main-loop
//! turn at a time and every output carried out), its hardware watchdog and its disk. (Its hold
//! on the LAN is `cluster.rs`.)
//!
//! States, and what each means for the rest of the simulation:
//!
//! | state                 | kernel (TCP, ARP answers, cluster IP) | daemon (engine inputs) | watchdog |
//! |-----------------------|---------------------------------------|------------------------|----------|
//! | off / booting         | nothing                               | none                   | -        |
//! | running               | yes                                   | every input            | petted   |
//! | daemon hung (SIGSTOP) | yes: buffers bytes, answers ARP       | none; inputs wait      | counting |
//! | board stalled         | nothing; the clock keeps counting     | none; inputs wait (1)  | counting |
//! | daemon dead (crash)   | yes: resets its sockets, keeps the IP | none until restart     | counting |
//!
//! (1) Bytes for a stalled kernel wait on the wire (TCP retransmits them), ARP to it is lost, and
//! its disk requests complete, their interrupts taken when it resumes.
//!
//! A watchdog that counts past its reset time (drawn per boot between the timeout and twice it,
//! as the iTCO watchdog may take) resets the board: a power cycle. A power cut loses everything
//! volatile: disk requests in flight (a write is durable once it completed), the inputs waiting,
//! the sockets, the cluster IP. A start runs the runtime's own loading code
//! (`tandem::runtime::volume`) on the disk's bytes.
//!
//! The board's clock is its own monotonic clock: it starts at a random value at each boot and
//! counts through stalls.

use std::collections::{BTreeMap, BTreeSet};

use tandem::metadata::flags;
use tandem::peer::link::{LinkSettings, PeerLinks};
use tandem::replication::engine::{Mirror, MirrorSettings};
use tandem::runtime::volume::{self, Device};
use tandem::time::Instant;
use tandem_board::{DiskCompletion, DiskRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Power {
    Off,
    Booting { ready_at: u64 },
    On,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Daemon {
    Running,
    /// SIGSTOP: resumes at SIGCONT.
    Hung,
    /// Crashed, or stopped cleanly: restarts at `restart_at` (if set).
    Dead {
        restart_at: Option<u64>,
    },
    /// SIGTERM: finishing its disk requests, then it marks the volume clean and exits.
    Stopping {
        restart_ms: u64,
    },
}

/// An input waiting for the daemon.
#[derive(Debug)]
pub(super) enum Input {
    /// The responder's kernel accepted a peer connection.
    Accept {
        conn: u64,
    },
    Bytes {
        conn: u64,
        bytes: Vec<u8>,
    },
    /// The peer's end closed or reset.
    End {
        conn: u64,
    },
    Disk(DiskCompletion),
    /// A client request on NBD connection `conn`.
    Nbd {
        conn: u64,
        tag: u64,
    },
    /// A gratuitous ARP from another board claiming the cluster IP, sent at `sent_at` (a probe
    /// from 0.0.0.0 asks and claims nothing, so it is not an input).
    Announcement {
        sent_at: u64,
    },
}

/// A disk request in flight.
#[derive(Debug)]
pub(super) struct PendingIo {
    pub(super) due: u64,
    /// The daemon life that submitted it (a later life never sees its completion).
    pub(super) life: u64,
    pub(super) tag: u64,
    pub(super) request: DiskRequest,
    pub(super) fails: bool,
}

/// The simulated disk as the runtime's loading code reads and writes it.
pub(super) struct SimDevice<'a>(pub &'a mut Vec<u8>);

impl Device for SimDevice<'_> {
    fn size_bytes(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let at = offset as usize;
        let bytes = self
            .0
            .get(at..at + buf.len())
            .ok_or_else(|| std::io::Error::other("read past the end of the simulated disk"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = offset as usize;
        let target = self
            .0
            .get_mut(at..at + bytes.len())
            .ok_or_else(|| std::io::Error::other("write past the end of the simulated disk"))?;
        target.copy_from_slice(bytes);
        Ok(())
    }
}

/// One board.
#[allow(missing_debug_implementations)] // holds a whole engine and disk
pub(super) struct Board {
    pub(super) index: usize,
    pub(super) power: Power,
    /// The whole board is stalled (kernel included), until it resumes.
    pub(super) stalled: bool,
    pub(super) daemon: Daemon,
    pub(super) mirror: Option<Mirror>,
    pub(super) disk: Vec<u8>,
    pub(super) io: Vec<PendingIo>,
    pub(super) disk_fail_per_million: u32,
    inbox: BTreeMap<(u64, u64), Input>,
    inbox_seq: u64,
    pub(super) net: BoardNet,
    pub(super) boot_at: u64,
    pub(super) clock_base: u64,
    /// Daemon lives, counted from 1 (0: none yet).
    pub(super) life: u64,
    pub(super) wd_armed: bool,
    pub(super) wd_unpetted_since: Option<u64>,
    pub(super) wd_reset_ms: u64,
    pub(super) serving: bool,
    /// NBD connections the daemon's server holds.
    pub(super) nbd_open: BTreeSet<u64>,
    /// The connecting node's reconnect timers, per link (`runtime/peer.rs`).
    pub(super) next_attempt: [u64; 2],
    pub(super) backoff_ms: [u64; 2],
    /// A connect under way on the link since this instant.
    pub(super) connecting: [Option<u64>; 2],
    /// The highest epoch and the generations this board ever persisted (checkers).
    pub(super) persisted_epoch: u64,
    pub(super) generations_seen: Vec<u64>,
}

impl Board {
    pub(super) fn new(index: usize, backing_bytes: u64) -> Board {
        Board {
            index,
            power: Power::Off,
            stalled: false,
            daemon: Daemon::Dead { restart_at: None },
            mirror: None,
            disk: vec![0; backing_bytes as usize],
            io: Vec::new(),
            disk_fail_per_million: 0,
            inbox: BTreeMap::new(),
            inbox_seq: 0,
            net: BoardNet::default(),
            boot_at: 0,
            clock_base: 0,
            life: 0,
            wd_armed: false,
            wd_unpetted_since: None,
            wd_reset_ms: 0,
            serving: false,
            nbd_open: BTreeSet::new(),
            next_attempt: [0; 2],
            backoff_ms: [0; 2],
            connecting: [None; 2],
            persisted_epoch: 0,
            generations_seen: Vec::new(),
        }
    }

    /// The kernel runs: powered, booted, not stalled.
    pub(super) fn kernel_up(&self) -> bool {
        self.power == Power::On && !self.stalled
    }

    /// The daemon process exists (it may be stopped).
    pub(super) fn daemon_alive(&self) -> bool {
        self.kernel_up() && !matches!(self.daemon, Daemon::Dead { .. })
    }

    /// The daemon runs its loop.
    pub(super) fn running(&self) -> bool {
        self.kernel_up() && matches!(self.daemon, Daemon::Running | Daemon::Stopping { .. })
    }

    /// The board's own clock at global instant `now`.
    pub(super) fn clock(&self, now: u64) -> Instant {
        Instant::from_millis(now - self.boot_at + self.clock_base)
    }

    /// A board instant as a global one.
    pub(super) fn to_global(&self, t: Instant) -> u64 {
        (t.as_millis() + self.boot_at).saturating_sub(self.clock_base)
    }

    pub(super) fn push_input(&mut self, arrival: u64, input: Input) {
        self.inbox_seq += 1;
        self.inbox.insert((arrival, self.inbox_seq), input);
    }

    /// The inputs that arrived by `now`, oldest first.
    pub(super) fn take_due(&mut self, now: u64) -> Vec<Input> {
        let later = self.inbox.split_off(&(now + 1, 0));
        std::mem::replace(&mut self.inbox, later)
            .into_values()
            .collect()
    }

    pub(super) fn next_input_at(&self) -> Option<u64> {
        self.inbox.keys().next().map(|(t, _)| *t)
    }

    pub(super) fn clear_inputs(&mut self) {
        self.inbox.clear();
    }

    /// Loads the persistent state and makes the engine, as `Runtime::start` does: open the
    /// volume (initialize a blank device), load the bitmap and the activity log (a crashed
    /// primary's extents made dirty), then record the start (`CLEAN_SHUTDOWN` and `WAS_PRIMARY`
    /// cleared, both superblock copies rewritten).
    pub(super) fn load(
        &mut self,
        settings: MirrorSettings,
        mut links: LinkSettings,
        volume_id: [u8; 16],
        clock: Instant,
    ) -> Result<Mirror, String> {
        let name = settings.node_name.clone();
        let mut device = SimDevice(&mut self.disk);
        let mut opened = volume::open_device(&mut device, volume_id, &name)
            .map_err(|e| format!("{name}: cannot open the volume: {e}"))?;
        let mut loaded =
            volume::load_replication_from(&mut device, &opened.layout, &opened.superblock)
                .map_err(|e| format!("{name}: cannot load the replication state: {e}"))?;
        opened.superblock.flags &= !(flags::CLEAN_SHUTDOWN | flags::WAS_PRIMARY);
        opened.superblock.sequence += 1;
        volume::write_superblock_to(&mut device, &opened.layout, &opened.superblock)
            .map_err(|e| format!("{name}: cannot write the superblock: {e}"))?;
        loaded.superblock = opened.superblock.clone();
        links.volume_id = opened.superblock.volume_id;
        Ok(Mirror::new(settings, PeerLinks::new(links), loaded, clock))
    }
}

// ---- the boards' lives, driven by the simulation ---------------------------------------------

use super::cluster::{BoardNet, ProbeRun};
use super::{Event, Outcome, PairSim, Violation, A, B, BOOT_MS, NAMES};
use tandem::peer::link::LinkOutput;
use tandem::peer::Role as LinkRole;
use tandem::replication::engine::EngineOutput;
use tandem_board::DiskDone;

use super::super::disk;

impl PairSim {
    /// Powers board `i` on; its daemon starts once it has booted.
    pub fn power_on(&mut self, i: usize) {
        let boot_ms = self.prng.range(BOOT_MS.0, BOOT_MS.1);
        self.power_on_after(i, boot_ms);
    }

    pub(super) fn power_on_after(&mut self, i: usize, boot_ms: u64) {
        if self.boards[i].power != Power::Off {
            return;
        }
        let clock_base = self.prng.range(5_000, 500_000);
        let wd_reset_ms = self
            .prng
            .range(self.options.watchdog_ms, 2 * self.options.watchdog_ms);
        let board = &mut self.boards[i];
        board.power = Power::Booting {
            ready_at: self.now + boot_ms,
        };
        board.boot_at = self.now;
        board.clock_base = clock_base;
        board.wd_reset_ms = wd_reset_ms;
        self.event(Some(i), Event::PowerOn);
    }

    /// Cuts board `i`'s power: everything volatile is lost.
    pub fn power_off(&mut self, i: usize) {
        if self.boards[i].power == Power::Off {
            return;
        }
        let board = &mut self.boards[i];
        board.power = Power::Off;
        board.stalled = false;
        board.daemon = Daemon::Dead { restart_at: None };
        board.mirror = None;
        board.io.clear();
        board.clear_inputs();
        board.net = BoardNet::default();
        board.serving = false;
        board.nbd_open.clear();
        board.connecting = [None; 2];
        board.wd_armed = false;
        board.wd_unpetted_since = None;
        self.lan.holders[i] = false;
        self.lan.vanish(i);
        self.work.requests.retain(|_, r| r.board != i);
        self.event(Some(i), Event::PowerOff);
    }

    /// A power cycle (a watchdog reset, a fence's reboot).
    fn reset(&mut self, i: usize) {
        self.power_off(i);
        self.power_on(i);
    }

    /// SIGSTOP of the daemon: its kernel still holds the cluster IP and buffers its sockets.
    pub fn hang(&mut self, i: usize) {
        if self.boards[i].daemon == Daemon::Running && self.boards[i].power == Power::On {
            self.boards[i].daemon = Daemon::Hung;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self, i: usize) {
        if self.boards[i].daemon == Daemon::Hung {
            self.boards[i].daemon = Daemon::Running;
        }
    }

    /// The whole board stops (kernel included); its clock keeps counting.
    pub fn stall(&mut self, i: usize) {
        if self.boards[i].power == Power::On {
            self.boards[i].stalled = true;
        }
    }

    pub fn unstall(&mut self, i: usize) {
        self.boards[i].stalled = false;
    }

    /// The daemon crashes (kill -9); the kernel resets its sockets and keeps the cluster IP.
    /// The init system restarts it after `restart_ms`.
    pub fn crash_daemon(&mut self, i: usize, restart_ms: u64) {
        if !self.boards[i].daemon_alive() {
            return;
        }
        self.kill_daemon(i, Some(self.now + restart_ms));
    }

    /// SIGTERM: the daemon drops the cluster IP and its clients, finishes its disk requests,
    /// marks the volume clean and exits; it restarts `restart_ms` later.
    pub fn stop_daemon(&mut self, i: usize, restart_ms: u64) {
        if !self.boards[i].running() || matches!(self.boards[i].daemon, Daemon::Stopping { .. }) {
            return;
        }
        self.boards[i].daemon = Daemon::Stopping { restart_ms };
        self.lan.holders[i] = false;
        self.boards[i].net.holds_vip = false;
        self.boards[i].net.announce_from = None;
        self.boards[i].serving = false;
        self.close_nbd(i);
        self.finish_stop_if_idle(i);
    }

    /// Starts a dead daemon on a running kernel.
    pub fn restart_daemon(&mut self, i: usize) -> Outcome<()> {
        if self.boards[i].kernel_up() && matches!(self.boards[i].daemon, Daemon::Dead { .. }) {
            self.start_daemon(i)?;
        }
        Ok(())
    }

    fn kill_daemon(&mut self, i: usize, restart_at: Option<u64>) {
        let board = &mut self.boards[i];
        board.daemon = Daemon::Dead { restart_at };
        board.mirror = None;
        board.clear_inputs();
        board.net = BoardNet::default();
        board.connecting = [None; 2];
        if board.wd_armed && board.wd_unpetted_since.is_none() {
            board.wd_unpetted_since = Some(self.now);
        }
        self.close_nbd(i);
        self.boards[i].serving = false;
        self.lan.close_all(i, self.now);
        self.work.requests.retain(|_, r| r.board != i);
        self.event(Some(i), Event::DaemonDied);
    }

    fn finish_stop_if_idle(&mut self, i: usize) {
        let Daemon::Stopping { restart_ms } = self.boards[i].daemon else {
            return;
        };
        let life = self.boards[i].life;
        if self.boards[i].io.iter().any(|io| io.life == life) {
            return;
        }
        // Data is durable at completion here; then the bitmap, then the clean mark.
        let board = &mut self.boards[i];
        if let Some(mirror) = board.mirror.as_mut() {
            let writes = mirror.take_bitmap_writes();
            let mut sb = mirror.superblock().clone();
            sb.flags |= tandem::metadata::flags::CLEAN_SHUTDOWN;
            sb.sequence += 1;
            let mut device = SimDevice(&mut board.disk);
            for (offset, bytes) in writes {
                let _ = device.write_at(offset, &bytes);
            }
            let _ = volume::write_superblock_to(&mut device, &self.layout, &sb);
        }
        let restart_at = self.now + restart_ms;
        self.kill_daemon(i, Some(restart_at));
    }

    /// Boots, restarts and watchdog resets that are due.
    pub(super) fn advance_boards(&mut self) -> Outcome<()> {
        for i in [A, B] {
            let now = self.now;
            if let Power::Booting { ready_at } = self.boards[i].power {
                if now >= ready_at {
                    self.boards[i].power = Power::On;
                    self.start_daemon(i)?;
                }
            }
            if let Daemon::Dead {
                restart_at: Some(t),
            } = self.boards[i].daemon
            {
                if now >= t && self.boards[i].kernel_up() {
                    self.start_daemon(i)?;
                }
            }
            // The watchdog: petted only by a daemon that runs its loop.
            let board = &mut self.boards[i];
            if board.wd_armed {
                if board.running() {
                    board.wd_unpetted_since = None;
                } else if board.wd_unpetted_since.is_none() {
                    board.wd_unpetted_since = Some(now);
                }
            }
            if let Some(since) = board.wd_unpetted_since {
                if now >= since + board.wd_reset_ms {
                    self.report.watchdog_resets += 1;
                    self.event(Some(i), Event::WatchdogReset);
                    self.reset(i);
                }
            }
        }
        Ok(())
    }

    /// The daemon starts: loads the disk, makes its engine, removes a stale cluster IP (rule
    /// 9), arms the watchdog.
    fn start_daemon(&mut self, i: usize) -> Outcome<()> {
        let settings = self.mirror_settings(i);
        let links = LinkSettings {
            key: [7; 32],
            node_name: NAMES[i].to_string(),
            peer_name: NAMES[1 - i].to_string(),
            volume_id: [0; 16],
            heartbeat_interval_ms: self.options.heartbeat_interval_ms,
            dead_time_ms: self.options.dead_time_ms,
        };
        let mut volume_id: [u8; 16] = self.random_bytes();
        volume_id[0] |= 1;
        let clock = self.boards[i].clock(self.now);
        if self.options.trace {
            tandem::logger::set_prefix(&format!("{:>8} {}", self.now, NAMES[i]), "starting");
        }
        let mirror = self.boards[i]
            .load(settings, links, volume_id, clock)
            .map_err(|e| self.fail(Violation::Broken, &e))?;
        let now = self.now;
        let board = &mut self.boards[i];
        board.life += 1;
        board.mirror = Some(mirror);
        board.daemon = Daemon::Running;
        board.net = BoardNet {
            next_gateway_probe: now,
            ..BoardNet::default()
        };
        board.serving = false;
        board.nbd_open.clear();
        board.connecting = [None; 2];
        board.next_attempt = [now; 2];
        board.backoff_ms = [super::lan::RECONNECT_BACKOFF_MIN_MS; 2];
        board.wd_armed = true;
        board.wd_unpetted_since = None;
        self.lan.holders[i] = false;
        self.event(Some(i), Event::DaemonStarted);
        if let Some(sb) = self.persisted_superblock(i) {
            let mut bytes = [0u8; tandem::metadata::SUPERBLOCK_BYTES];
            sb.encode(&mut bytes);
            self.check_superblock(i, &bytes)?;
        }
        self.engine(i, |_, _| {})
    }

    /// Disk requests that are due complete: their effect lands, and their completion waits for
    /// the daemon that asked (a later life never sees it).
    pub(super) fn complete_disks(&mut self) {
        let now = self.now;
        for board in &mut self.boards {
            if board.power != Power::On || board.io.iter().all(|io| io.due > now) {
                continue;
            }
            let (mut due, later): (Vec<PendingIo>, Vec<PendingIo>) = std::mem::take(&mut board.io)
                .into_iter()
                .partition(|io| io.due <= now);
            board.io = later;
            // In an order of their own, not the order the engine asked in.
            due.sort_by_key(|io| (io.due, io.tag));
            for io in due {
                let completion = complete(&mut board.disk, io.tag, io.request, io.fails);
                // A stalled kernel takes the interrupt when it resumes.
                let alive = !matches!(board.daemon, Daemon::Dead { .. });
                if io.life == board.life && alive {
                    board.push_input(now, Input::Disk(completion));
                }
            }
        }
    }

    /// One turn of board `i`'s main loop.
    pub(super) fn turn(&mut self, i: usize) -> Outcome<()> {
        let stopping = matches!(self.boards[i].daemon, Daemon::Stopping { .. });
        let inputs = self.boards[i].take_due(self.now);
        let timers_first = self.prng.chance(500_000);
        if timers_first && !stopping {
            self.engine_timeout(i)?;
        }
        for input in inputs {
            if !self.boards[i].running() {
                break;
            }
            if stopping && !matches!(input, Input::Disk(_)) {
                continue;
            }
            self.deliver(i, input)?;
        }
        if stopping {
            self.finish_stop_if_idle(i);
            return Ok(());
        }
        if self.boards[i].running() {
            self.net_turn(i)?;
        }
        if !timers_first && self.boards[i].running() {
            self.engine_timeout(i)?;
        }
        if i == A && self.boards[i].running() {
            self.maintain_links()?;
        }
        Ok(())
    }

    fn engine_timeout(&mut self, i: usize) -> Outcome<()> {
        let clock = self.boards[i].clock(self.now);
        let due = self.boards[i]
            .mirror
            .as_ref()
            .and_then(Mirror::poll_timeout)
            .is_some_and(|t| t <= clock);
        if due {
            self.engine(i, |m, now| m.handle_timeout(now))?;
        }
        Ok(())
    }

    fn deliver(&mut self, i: usize, input: Input) -> Outcome<()> {
        let life = self.boards[i].life;
        match input {
            Input::Accept { conn } => {
                let Some(c) = self
                    .lan
                    .conn(conn)
                    .filter(|c| c.open[i] && c.lives[i] == life)
                else {
                    return Ok(());
                };
                let link = c.link;
                self.connected(i, conn, link, LinkRole::Responder)?;
            }
            Input::Bytes { conn, bytes } => {
                let lc = self
                    .lan
                    .conn(conn)
                    .filter(|c| c.open[i] && c.lives[i] == life)
                    .and_then(|c| c.ends[i]);
                if let Some(lc) = lc {
                    self.engine(i, |m, now| m.handle_link_bytes(lc, &bytes, now))?;
                }
            }
            Input::End { conn } => {
                let Some(c) = self
                    .lan
                    .conn_mut(conn)
                    .filter(|c| c.open[i] && c.lives[i] == life)
                else {
                    return Ok(());
                };
                c.open[i] = false;
                let (lc, link, opened_at) = (c.ends[i], c.link, c.opened_at);
                if let Some(lc) = lc {
                    self.engine(i, |m, now| m.handle_link_closed(lc, now))?;
                }
                self.link_dropped(i, link, opened_at);
            }
            Input::Disk(completion) => {
                self.engine(i, |m, now| m.handle_disk_completion(completion, now))?;
            }
            Input::Nbd { conn, tag } => {
                let Some(request) = self.volume_request(tag) else {
                    return Ok(());
                };
                if self.boards[i].nbd_open.contains(&conn) {
                    if self.options.trace {
                        self.event(Some(i), Event::Note(format!("request {tag} submitted")));
                    }
                    self.engine(i, |m, now| m.submit(tag, request, now))?;
                } else {
                    // The server had closed the connection: the request is reset.
                    self.work.requests.remove(&tag);
                }
            }
            Input::Announcement { sent_at } => {
                // Only a claim made while the probe runs answers it: the runtime takes what
                // waited in its ARP socket before it starts a probe.
                if let Some(probe) = self.boards[i].net.probe.as_mut() {
                    if sent_at >= probe.started {
                        probe.answered = true;
                    }
                }
                if self.boards[i].net.holds_vip {
                    self.engine(i, |m, now| m.handle_cluster_ip_conflict(now))?;
                }
            }
        }
        Ok(())
    }

    /// Carries out everything board `i`'s engine asks, until it asks nothing more.
    pub(super) fn route(&mut self, i: usize) -> Outcome<()> {
        loop {
            let Some(mirror) = self.boards[i].mirror.as_mut() else {
                return Ok(());
            };
            // The runtime's order (`Node::poll_output`): link outputs, then the engine's.
            let mut links = Vec::new();
            while let Some(output) = mirror.poll_link_output() {
                links.push(output);
            }
            let mut outputs = Vec::new();
            while let Some(output) = mirror.poll_output() {
                outputs.push(output);
            }
            if links.is_empty() && outputs.is_empty() {
                return Ok(());
            }
            for output in links {
                self.route_link(i, output)?;
            }
            // Replies last, by tag: what the simulation does next never depends on the order
            // in which the engine finished several requests at once.
            let (mut done, others): (Vec<EngineOutput>, Vec<EngineOutput>) = outputs
                .into_iter()
                .partition(|o| matches!(o, EngineOutput::Done { .. }));
            done.sort_by_key(|o| match o {
                EngineOutput::Done { tag, .. } => *tag,
                _ => 0,
            });
            for output in others.into_iter().chain(done) {
                if self.boards[i].mirror.is_none() {
                    return Ok(());
                }
                self.route_engine(i, output)?;
            }
        }
    }

    fn route_link(&mut self, i: usize, output: LinkOutput) -> Outcome<()> {
        match output {
            LinkOutput::Send { conn, bytes } => {
                if let Some(id) = self.lan.find_end(i, conn) {
                    let at = self.now + self.lan.latency_ms(conn.link, i);
                    self.lan.send(id, i, bytes, at);
                }
            }
            LinkOutput::Close { conn } => {
                if let Some(id) = self.lan.find_end(i, conn) {
                    let opened_at = self.lan.conn(id).map_or(self.now, |c| c.opened_at);
                    let at = self.now + self.lan.latency_ms(conn.link, i);
                    self.lan.close_end(id, i, at);
                    let clock = self.boards[i].clock(self.now);
                    if let Some(mirror) = self.boards[i].mirror.as_mut() {
                        mirror.handle_link_closed(conn, clock);
                    }
                    self.link_dropped(i, conn.link, opened_at);
                }
            }
        }
        Ok(())
    }

    fn route_engine(&mut self, i: usize, output: EngineOutput) -> Outcome<()> {
        let now = self.now;
        match output {
            EngineOutput::Disk { tag, request } => {
                let (offset, len) = disk::request_extent(&request);
                if offset + len > self.layout.volume_bytes {
                    return Err(self.fail(
                        Violation::Broken,
                        &format!(
                        "{} asked for a disk request past the volume (offset={offset} len={len})",
                        NAMES[i]
                    ),
                    ));
                }
                // Drawn from what the request is, not from the order the engine asked in.
                let life = self.boards[i].life;
                let draw = self.draw(&[i as u64, life, tag, offset, now]);
                let latency = 1 + draw % 4;
                let fails =
                    (draw >> 32) % 1_000_000 < u64::from(self.boards[i].disk_fail_per_million);
                let board = &mut self.boards[i];
                board.io.push(PendingIo {
                    due: now + latency,
                    life: board.life,
                    tag,
                    request,
                    fails,
                });
            }
            EngineOutput::Metadata { offset, bytes, .. } => {
                let at = offset as usize;
                self.boards[i].disk[at..at + bytes.len()].copy_from_slice(&bytes);
                if self.layout.superblock_offsets.contains(&offset) {
                    self.check_superblock(i, &bytes)?;
                }
            }
            EngineOutput::Done { tag, done } => self.request_done(i, tag, done)?,
            EngineOutput::Serving(on) => {
                self.boards[i].serving = on;
                self.event(Some(i), Event::Serving(on));
                if !on {
                    self.close_nbd(i);
                }
            }
            EngineOutput::ProbeClusterIp => {
                self.boards[i].net.probe = Some(ProbeRun {
                    started: now,
                    sent: 0,
                    answered: false,
                });
                self.probe_step(i)?;
            }
            EngineOutput::ClusterIp(add) => {
                self.event(Some(i), Event::ClusterIp(add));
                self.lan.holders[i] = add;
                let net = &mut self.boards[i].net;
                net.holds_vip = add;
                if add {
                    net.announce_from = Some(now);
                    net.announced = 0;
                    self.announce_step(i);
                } else {
                    net.announce_from = None;
                }
            }
            EngineOutput::Fence { reason } => {
                // The runtime drops the address and its clients, then reboots the board.
                self.report.fences += 1;
                self.event(Some(i), Event::Fenced(reason));
                self.lan.holders[i] = false;
                self.close_nbd(i);
                self.reset(i);
            }
        }
        Ok(())
    }
}

/// A disk request takes effect (unless it fails) and completes.
fn complete(disk: &mut [u8], tag: u64, request: DiskRequest, fails: bool) -> DiskCompletion {
    if fails {
        return disk::failed_completion(tag, request);
    }
    let result = match request {
        DiskRequest::Read { offset, mut buf } => {
            let at = offset as usize;
            let len = buf.len();
            buf.as_mut_slice().copy_from_slice(&disk[at..at + len]);
            DiskDone::Buf(buf)
        }
        DiskRequest::Write { offset, buf, .. } => {
            let at = offset as usize;
            disk[at..at + buf.len()].copy_from_slice(buf.as_slice());
            DiskDone::Buf(buf)
        }
        DiskRequest::Discard { offset, len, .. } | DiskRequest::WriteZeroes { offset, len, .. } => {
            disk[offset as usize..(offset + len) as usize].fill(0);
            DiskDone::Done
        }
        DiskRequest::Flush => DiskDone::Done,
        DiskRequest::MapExtents { len, .. } => disk::allocated_extents(len),
    };
    DiskCompletion {
        tag,
        result: Ok(result),
        buf: None,
    }
}
