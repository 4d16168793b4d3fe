//! The two-node simulator: the proof of DESIGN.md §4 on virtual time.
//!
//! Two boards run the real replication engine (`replication::engine::Mirror`, with its real
//! links, handshakes and sealed frames), each with a disk, a hardware watchdog and a clock that
//! keeps counting through a stall (`board.rs`). Between them: a heartbeat cable, a LAN switch
//! with a gateway and the clients, the peer links as TCP connections, the cluster IP and ARP
//! (`lan.rs`). Clients write and read through the cluster IP, and a model records every write
//! and its acknowledgement (`client.rs`). Faults come one at a time from the whole fault model of
//! §4, plus its one double fault (both boards losing power together), with random timing and
//! repair (`faults.rs`).
//!
//! # Time
//!
//! Virtual milliseconds. Each step advances to the next instant anything is due (never more than
//! `STEP_MS_MAX`), then: boards boot, resume, restart or are reset by their watchdog; disk
//! requests complete; segments move along the pipes; clients act; each board whose daemon runs
//! takes one turn of its main loop (its due inputs in arrival order, its timers before or after
//! them, drawn at random, as `epoll` would order them), and every output of its engine is carried
//! out at once. The checkers run after every step. Nothing reads the wall clock, the engine
//! keeps its requests in ordered maps, and what follows an engine's outputs never depends on
//! their order within one call (replies are taken in tag order, disk latencies drawn from what
//! each request is), so a seed replays exactly (`a_seed_replays_exactly` checks it).
//!
//! # What is modelled
//!
//! - A disk write is durable once it completed (no volatile cache); requests in flight are lost
//!   at a power cut; metadata writes are synchronous, as the runtime makes them.
//! - A start runs the runtime's own loading code (`runtime::volume`), then records the start as
//!   `Runtime::start` does.
//! - `nas-a` connects both links with the runtime's backoff (100 ms doubling to 1 s); a connect
//!   that gets no answer fails after a second (the runtime has no timeout of its own: the
//!   kernel's SYN retransmissions would decide). Each link is a TCP connection: bytes wait while
//!   their path is cut, a socket that is gone answers with a reset.
//! - The lan port (`cluster.rs`): carrier, gateway probes every 100 ms (silent after 500 ms),
//!   cluster IP probes and gratuitous announcements on the runtime's schedule, conflicts.
//! - The hardware watchdog resets a board whose daemon does not run its loop (hung, stalled,
//!   dead) for its reset time; a fence reboots the board.
//!
//! # Checkers
//!
//! - **never two writers**: write acknowledgements come from `(epoch, node)` terms that only
//!   grow; a node acknowledging after another acknowledged in a term at least as high fails;
//! - **every acknowledged write is readable**: each read returns the last write acknowledged
//!   before it was issued (or a later one whose outcome the client did not learn); after the
//!   pair settles, the same holds for every block of the volume;
//! - **epochs only grow**: the epoch each board persists never decreases, and its persisted
//!   data generation never returns to an earlier one;
//! - **settling**: after the faults stop, exactly one primary, both disks up to date, no dirty
//!   region, every request answered, and byte-identical volumes within `SETTLE_MS_MAX`;
//! - **never stuck without a primary**: a running, up-to-date secondary whose uplink is healthy
//!   never goes without a primary in the pair for longer than `NO_PRIMARY_MS_MAX`.
//!
//! A failure names its seed and a one-line command that replays it.

mod board;
mod client;
mod cluster;
mod faults;
mod lan;

pub use faults::{Cable, Fault, FaultSet};

use board::{Board, Daemon, Power};
use client::Workload;
use lan::Lan;

use tandem::metadata::{choose_superblock, Layout, Superblock};
use tandem::node::{DiskState, PeerState as PeerLinkState, Role};
use tandem::replication::engine::{Mirror, MirrorSettings, Mutations, Readiness};
use tandem::replication::wire::UplinkHealth;
use tandem::time::Instant;

use super::prng::Prng;

/// The boards' names; `nas-a` sorts first, so it connects the links and leads the exchanges.
pub const NAMES: [&str; 2] = ["nas-a", "nas-b"];
/// Board indexes.
pub const A: usize = 0;
pub const B: usize = 1;

const BACKING_BYTES: u64 = 4 << 20;
/// The longest step: the checkers run at least this often.
const STEP_MS_MAX: u64 = 50;
/// After the faults stop, the pair settles within this long.
pub const SETTLE_MS_MAX: u64 = 30_000;
/// The longest a healthy up-to-date secondary may go without a primary in the pair.
pub const NO_PRIMARY_MS_MAX: u64 = 10_000;
/// From power on to a running daemon.
const BOOT_MS: (u64, u64) = (1_500, 3_000);
/// The init system restarts a dead daemon after this long.
const DAEMON_RESTART_MS: (u64, u64) = (100, 1_500);
/// Timeline entries kept (all of them when tracing).
const TIMELINE_MAX: usize = 300;

/// What a run can vary.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub dead_time_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// `[cluster] vip` is set.
    pub cluster_ip: bool,
    /// `[cluster] uplink_probe` is set.
    pub gateway_probe: bool,
    pub failback_preferred: bool,
    /// Safety rules switched off, to prove the checkers catch what they guard.
    pub mutations: Mutations,
    /// The hardware watchdog's timeout; a board is reset between it and twice it.
    pub watchdog_ms: u64,
    /// Clients writing and reading through the cluster IP.
    pub clients: usize,
    /// The clients write and read only the first this many blocks (1 KiB each) when set.
    pub workload_blocks: Option<u64>,
    /// Bytes of each board's disk.
    pub backing_bytes: u64,
    /// Check that an eligible node never goes without a primary for long.
    pub check_liveness: bool,
    /// Let a second fault begin while the first lasts (outside DESIGN.md §4's fault model,
    /// whose only double fault is both boards losing power; for exploring the rules that only
    /// double faults need, such as the gateway check).
    pub double_faults: bool,
    /// The faults drawn: the whole model, or a corner of it for tests that aim at one rule and
    /// must be quick.
    pub faults: FaultSet,
    /// Print the timeline and the engines' logs to stderr as they happen.
    pub trace: bool,
}

impl Default for PairOptions {
    fn default() -> PairOptions {
        PairOptions {
            dead_time_ms: 1_000,
            heartbeat_interval_ms: 100,
            cluster_ip: true,
            gateway_probe: true,
            failback_preferred: false,
            mutations: Mutations::default(),
            watchdog_ms: 5_000,
            clients: 2,
            workload_blocks: None,
            backing_bytes: BACKING_BYTES,
            check_liveness: true,
            double_faults: false,
            faults: FaultSet::All,
            trace: false,
        }
    }
}

impl PairOptions {
    /// The command-line words of the options that differ from a default run (`--mutation
    /// NAME`, `--faults NAME`, `--double-faults`).
    pub fn extra_args(&self) -> String {
        let mut out = String::new();
        for (on, name) in [
            (self.mutations.no_lease, "no_lease"),
            (self.mutations.no_arp_probe, "no_arp_probe"),
            (self.mutations.stale_last_heard, "stale_last_heard"),
            (self.mutations.no_gateway_check, "no_gateway_check"),
        ] {
            if on {
                out.push_str(" --mutation ");
                out.push_str(name);
            }
        }
        if self.faults != FaultSet::All {
            out.push_str(" --faults ");
            out.push_str(self.faults.name());
        }
        if self.double_faults {
            out.push_str(" --double-faults");
        }
        out
    }
}

/// Which promise a failed run broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Two nodes acknowledged writes at once (terms that do not only grow).
    TwoWriters,
    /// A read, or the settled volume, lacks an acknowledged write.
    LostWrite,
    /// The replicas differ once the pair settled.
    ReplicasDiffer,
    /// A persisted epoch or data generation went back.
    WentBack,
    /// The pair did not settle in time once the faults stopped.
    NotSettled,
    /// An eligible node went without a primary for too long.
    NoPrimary,
    /// An engine or the simulation broke an interface rule (an unknown tag, a request past
    /// the volume, a volume that does not load).
    Broken,
}

impl Violation {
    /// Never two writers, never a lost acknowledged write: what the mutation checks look for.
    pub fn is_safety(self) -> bool {
        matches!(self, Violation::TwoWriters | Violation::LostWrite)
    }
}

/// A failed run: what broke, where, and how to replay it.
#[derive(Debug, Clone)]
pub struct PairFailure {
    pub violation: Violation,
    pub seed: u64,
    pub at_ms: u64,
    pub message: String,
    /// The one-line command that replays the run.
    pub repro: String,
}

impl std::fmt::Display for PairFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SEED={} failed at {} ms ({:?}): {}\nreproduce: {}",
            self.seed, self.at_ms, self.violation, self.message, self.repro
        )
    }
}

/// What the simulation's steps return.
pub type Outcome<T> = Result<T, PairFailure>;

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct PairReport {
    pub acked_writes: u64,
    pub reads_checked: u64,
    pub faults: u64,
    pub promotions: u64,
    pub fences: u64,
    pub watchdog_resets: u64,
    /// From the end of the faults to the settled pair.
    pub settle_ms: u64,
    /// A digest of everything that happened (the timeline and every acknowledgement): the
    /// same seed gives the same fingerprint, run after run.
    pub fingerprint: u64,
}

/// Something that happened, for the timeline and the scenario tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Fault(String),
    Repair(String),
    PowerOff,
    PowerOn,
    DaemonStarted,
    DaemonDied,
    WatchdogReset,
    Promoted { epoch: u64 },
    Demoted,
    Fenced(String),
    ClusterIp(bool),
    Serving(bool),
    Disk(DiskState),
    ProbeDone { answered: bool },
    Note(String),
}

/// One entry of the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Happening {
    at: u64,
    board: Option<usize>,
    event: Event,
}

/// A write acknowledgement: when, by which board, in which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub at: u64,
    pub board: usize,
    pub epoch: u64,
}

/// One run of the simulator.
#[allow(missing_debug_implementations)] // holds two whole engines and disks
pub struct PairSim {
    options: PairOptions,
    seed: u64,
    now: u64,
    prng: Prng,
    layout: Layout,
    boards: [Board; 2],
    lan: Lan,
    work: Workload,
    timeline: Vec<Happening>,
    acks: Vec<Ack>,
    report: PairReport,
    last_role: [Option<Role>; 2],
    last_disk: [Option<DiskState>; 2],
    no_primary_since: Option<u64>,
    /// The fault phase length of a seed's run, for the reproduction command (`None` while
    /// scripted).
    fault_ms: Option<u64>,
}

impl PairSim {
    /// A pair for `seed`: both boards power on with blank disks.
    pub fn new(seed: u64, options: PairOptions) -> PairSim {
        let mut prng = Prng::new(seed);
        let mut lan_prng = prng.split();
        let latencies = [
            [lan_prng.range(1, 20), lan_prng.range(1, 20)],
            [lan_prng.range(1, 20), lan_prng.range(1, 20)],
        ];
        let layout =
            Layout::for_backing(options.backing_bytes).expect("the simulated disk fits a layout");
        let blocks = (layout.volume_bytes / client::BLOCK_BYTES)
            .min(options.workload_blocks.unwrap_or(u64::MAX))
            .max(1);
        let work = Workload::new(options.clients, blocks, prng.split(), seed);
        if options.trace {
            tandem::logger::install("sim", "-");
        }
        let backing_bytes = options.backing_bytes;
        let mut sim = PairSim {
            options,
            seed,
            now: 0,
            prng,
            layout,
            boards: [Board::new(A, backing_bytes), Board::new(B, backing_bytes)],
            lan: Lan::new(latencies),
            work,
            timeline: Vec::new(),
            acks: Vec::new(),
            report: PairReport::default(),
            last_role: [None, None],
            last_disk: [None, None],
            no_primary_since: None,
            fault_ms: None,
        };
        for i in [A, B] {
            let boot_ms = sim.prng.range(0, 300);
            sim.power_on_after(i, boot_ms);
        }
        sim
    }

    // ---- getters -------------------------------------------------------------------------

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Every write acknowledgement so far.
    pub fn acks(&self) -> &[Ack] {
        &self.acks
    }

    fn mirror(&self, i: usize) -> Option<&Mirror> {
        self.boards[i].mirror.as_ref()
    }

    /// The board's role, or `None` while its daemon does not exist.
    pub fn role(&self, i: usize) -> Option<Role> {
        self.mirror(i).map(Mirror::role)
    }

    pub fn disk_state(&self, i: usize) -> Option<DiskState> {
        self.mirror(i).map(Mirror::disk_state)
    }

    pub fn peer_state(&self, i: usize) -> Option<PeerLinkState> {
        self.mirror(i).map(Mirror::peer_link_state)
    }

    pub fn epoch(&self, i: usize) -> Option<u64> {
        self.mirror(i).map(Mirror::epoch)
    }

    pub fn readiness(&self, i: usize) -> Option<Readiness> {
        self.mirror(i).map(Mirror::readiness)
    }

    pub fn dirty_bytes(&self, i: usize) -> Option<u64> {
        self.mirror(i).map(Mirror::dirty_bytes)
    }

    /// Bytes the last (or running) resync of the board copied, and its total.
    pub fn resync_bytes(&self, i: usize) -> Option<(u64, u64)> {
        self.mirror(i).map(|m| {
            let p = m.resync_progress();
            (p.done_bytes, p.total_bytes)
        })
    }

    /// The board's kernel holds the cluster IP.
    pub fn holds_cluster_ip(&self, i: usize) -> bool {
        self.lan.holders[i]
    }

    /// The board's NBD server serves.
    pub fn serving(&self, i: usize) -> bool {
        self.boards[i].serving
    }

    /// The board's daemon runs its loop.
    pub fn running(&self, i: usize) -> bool {
        self.boards[i].running()
    }

    /// The board the primary is, if exactly one is.
    pub fn primary(&self) -> Option<usize> {
        let primaries: Vec<usize> = [A, B]
            .into_iter()
            .filter(|&i| self.role(i) == Some(Role::Primary))
            .collect();
        (primaries.len() == 1).then(|| primaries[0])
    }

    /// When something on `board` at or after `since` first matched (in the timeline kept).
    pub fn first_event(&self, board: usize, since: u64, f: impl Fn(&Event) -> bool) -> Option<u64> {
        self.timeline
            .iter()
            .find(|h| h.at >= since && h.board == Some(board) && f(&h.event))
            .map(|h| h.at)
    }

    /// Whether anything on `board` at or after `since` matches.
    pub fn any_event(&self, board: usize, since: u64, f: impl Fn(&Event) -> bool) -> bool {
        self.first_event(board, since, f).is_some()
    }

    /// The timeline as text, one line per entry.
    pub fn timeline_text(&self) -> String {
        self.timeline
            .iter()
            .map(happening_text)
            .collect::<Vec<_>>()
            .join("\n")
    }

    // ---- commands ------------------------------------------------------------------------

    /// `promote --force` on board `i`.
    pub fn force_promote(&mut self, i: usize) -> Outcome<(bool, String)> {
        let mut reply = (false, "no daemon".to_string());
        self.engine(i, |m, _| reply = m.force_promote())?;
        Ok(reply)
    }

    /// `switchover` on board `i`.
    pub fn switchover(&mut self, i: usize) -> Outcome<(bool, String)> {
        let mut reply = (false, "no daemon".to_string());
        self.engine(i, |m, _| reply = m.start_switchover())?;
        Ok(reply)
    }

    /// Starts or stops the clients' new requests.
    pub fn set_workload(&mut self, active: bool) {
        self.work.active = active && !self.work.clients.is_empty();
    }

    // ---- running -------------------------------------------------------------------------

    /// Runs until virtual instant `t`.
    pub fn run_until(&mut self, t: u64) -> Outcome<()> {
        while self.now < t {
            self.step(t)?;
        }
        Ok(())
    }

    /// Runs for `ms` more.
    pub fn run_for(&mut self, ms: u64) -> Outcome<()> {
        self.run_until(self.now + ms)
    }

    /// Runs until `cond` holds, for at most `ms`; whether it held.
    pub fn run_until_cond(
        &mut self,
        ms: u64,
        mut cond: impl FnMut(&PairSim) -> bool,
    ) -> Outcome<bool> {
        let end = self.now + ms;
        while self.now < end {
            if cond(self) {
                return Ok(true);
            }
            self.step(end)?;
        }
        Ok(cond(self))
    }

    /// The seed's run: random faults for `fault_ms`, then everything repaired and no new
    /// requests until the pair settles; then the replicas and the model are checked.
    pub fn run(mut self, fault_ms: u64) -> Outcome<PairReport> {
        self.fault_ms = Some(fault_ms);
        let mut plan = faults::FaultPlan::new(self.prng.split(), self.options.double_faults);
        while self.now < fault_ms {
            let next = plan.next_at().min(fault_ms);
            self.run_until(next)?;
            if self.now >= fault_ms {
                break;
            }
            plan.act(&mut self);
        }
        plan.stop(&mut self);
        self.settle()?;
        self.report.acked_writes = self.acks.len() as u64;
        self.report.reads_checked = self.work.model.reads_checked;
        Ok(self.report)
    }

    /// Repairs every fault, stops new requests, and waits for the pair to settle: then checks
    /// that the replicas are identical and hold every acknowledged write. Returns how long it
    /// took.
    pub fn settle(&mut self) -> Outcome<u64> {
        self.repair_all()?;
        self.set_workload(false);
        let start = self.now;
        loop {
            if self.settled() {
                break;
            }
            if self.now - start > SETTLE_MS_MAX {
                let s = |i: usize| match &self.boards[i].mirror {
                    Some(m) => format!(
                        "{}/{}/{}/dirty={}/resync={}",
                        m.role().name(),
                        m.disk_state().name(),
                        m.peer_link_state().name(),
                        m.dirty_bytes(),
                        m.resync_progress().running
                    ),
                    None => "no daemon".to_string(),
                };
                let unanswered: Vec<String> = self
                    .work
                    .requests
                    .iter()
                    .take(4)
                    .map(|(tag, r)| {
                        format!(
                            "{tag} to {} at {} ms: {:?}",
                            NAMES[r.board], r.issued_at, r.op
                        )
                    })
                    .collect();
                return Err(self.fail(Violation::NotSettled, &format!(
                    "the pair did not settle within {SETTLE_MS_MAX} ms of the faults stopping: nas-a {} nas-b {}, {} requests unanswered {unanswered:?}",
                    s(A),
                    s(B),
                    self.work.requests.len()
                )));
            }
            self.step(self.now + STEP_MS_MAX)?;
        }
        let took = self.now - start;
        self.report.settle_ms = took;
        self.check_replicas()?;
        Ok(took)
    }

    fn settled(&self) -> bool {
        if self.primary().is_none() || self.work.waiting() > 0 || !self.work.requests.is_empty() {
            return false;
        }
        self.boards.iter().all(|b| {
            b.running()
                && b.io.is_empty()
                && b.mirror.as_ref().is_some_and(|m| {
                    m.disk_state() == DiskState::UpToDate
                        && m.peer_link_state() == PeerLinkState::Connected
                        && m.dirty_bytes() == 0
                        && !m.resync_progress().running
                })
        })
    }

    fn check_replicas(&mut self) -> Outcome<()> {
        let volume = self.layout.volume_bytes as usize;
        let (a, b) = (
            &self.boards[A].disk[..volume],
            &self.boards[B].disk[..volume],
        );
        if a != b {
            let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            let last = a.iter().zip(b).rposition(|(x, y)| x != y).unwrap_or(0);
            let block = first as u64 / client::BLOCK_BYTES;
            let at = (block * client::BLOCK_BYTES) as usize;
            let value = |disk: &[u8]| {
                client::block_value(&disk[at..at + client::BLOCK_BYTES as usize])
                    .map_or("garbage".to_string(), |v| format!("{v:#x}"))
            };
            return Err(self.fail(Violation::ReplicasDiffer, &format!(
                "the replicas differ after settling (bytes {first}..={last}, regions {}..={}); block {block}: nas-a {} nas-b {}, writes {}",
                first as u64 / self.layout.region_bytes,
                last as u64 / self.layout.region_bytes,
                value(a),
                value(b),
                self.work.model.history(block)
            )));
        }
        let Some(primary) = self.primary() else {
            return Err(self.fail(Violation::NotSettled, "no primary after settling"));
        };
        let blocks = self.layout.volume_bytes / client::BLOCK_BYTES;
        for block in 0..blocks {
            let at = (block * client::BLOCK_BYTES) as usize;
            let bytes = &self.boards[primary].disk[at..at + client::BLOCK_BYTES as usize];
            let now = self.now;
            let result = self
                .work
                .model
                .check_read(block, bytes, now, now, "the settled volume");
            result.map_err(|e| self.fail(Violation::LostWrite, &e))?;
        }
        Ok(())
    }

    /// One step: to the next instant anything is due, at most `limit`.
    fn step(&mut self, limit: u64) -> Outcome<()> {
        let next = self
            .next_event()
            .unwrap_or(u64::MAX)
            .clamp(self.now + 1, self.now + STEP_MS_MAX)
            .min(limit.max(self.now + 1));
        self.now = next;
        self.advance_boards()?;
        self.complete_disks();
        self.deliver_pipes();
        self.tick_clients();
        let order = if self.prng.chance(500_000) {
            [A, B]
        } else {
            [B, A]
        };
        for i in order {
            if self.boards[i].running() {
                self.turn(i)?;
            }
        }
        self.check_step()
    }

    /// The earliest instant anything is due.
    fn next_event(&self) -> Option<u64> {
        let mut next = u64::MAX;
        let mut at = |t: u64| next = next.min(t);
        for b in &self.boards {
            if let Power::Booting { ready_at } = b.power {
                at(ready_at);
            }
            if let Daemon::Dead {
                restart_at: Some(t),
            } = b.daemon
            {
                at(t);
            }
            if let Some(since) = b.wd_unpetted_since {
                at(since + b.wd_reset_ms);
            }
            for io in &b.io {
                at(io.due);
            }
            if b.running() {
                if let Some(t) = b.next_input_at() {
                    at(t);
                }
                if let Some(t) = b.mirror.as_ref().and_then(Mirror::poll_timeout) {
                    at(b.to_global(t));
                }
                if let Some(t) = b.net.poll_timeout(self.options.gateway_probe) {
                    at(t);
                }
                if b.index == A {
                    for link in 0..2 {
                        match b.connecting[link] {
                            Some(started) => at(started + lan::CONNECT_TIMEOUT_MS),
                            None => at(b.next_attempt[link]),
                        }
                    }
                }
            }
        }
        if let Some(t) = self.pipes_next() {
            at(t);
        }
        if let Some(t) = self.clients_next() {
            at(t);
        }
        (next != u64::MAX).then_some(next)
    }

    /// The checkers that run after every step (the others run where their event happens).
    fn check_step(&mut self) -> Outcome<()> {
        for i in [A, B] {
            self.note_state(i);
        }
        if !self.options.check_liveness {
            return Ok(());
        }
        let any_primary = (0..2).any(|i| self.role(i) == Some(Role::Primary));
        let eligible = self.boards.iter().any(|b| {
            b.running()
                && b.net.reported == Some(UplinkHealth::Healthy)
                && b.mirror.as_ref().is_some_and(|m| {
                    m.role() == Role::Secondary && m.disk_state() == DiskState::UpToDate
                })
        });
        if any_primary || !eligible {
            self.no_primary_since = None;
            return Ok(());
        }
        let since = *self.no_primary_since.get_or_insert(self.now);
        if self.now - since > NO_PRIMARY_MS_MAX {
            return Err(self.fail(
                Violation::NoPrimary,
                &format!(
                    "no primary for {} ms while an up-to-date secondary with a healthy uplink runs",
                    self.now - since
                ),
            ));
        }
        Ok(())
    }

    /// Records role and disk state changes in the timeline.
    fn note_state(&mut self, i: usize) {
        let (role, disk, epoch) = match self.mirror(i) {
            Some(m) => (Some(m.role()), Some(m.disk_state()), m.epoch()),
            None => (None, None, 0),
        };
        if role != self.last_role[i] {
            match role {
                Some(Role::Primary) => {
                    self.report.promotions += 1;
                    self.event(Some(i), Event::Promoted { epoch });
                }
                Some(_) if self.last_role[i] == Some(Role::Primary) => {
                    self.event(Some(i), Event::Demoted);
                }
                _ => {}
            }
            self.last_role[i] = role;
        }
        if disk != self.last_disk[i] {
            if let Some(disk) = disk {
                self.event(Some(i), Event::Disk(disk));
            }
            self.last_disk[i] = disk;
        }
    }

    /// The superblock board `i` just wrote: its epoch never goes back, nor its generation.
    fn check_superblock(&mut self, i: usize, bytes: &[u8]) -> Outcome<()> {
        let Ok(sb) = Superblock::decode(bytes) else {
            return Err(self.fail(
                Violation::Broken,
                &format!("{} wrote a superblock that does not decode", NAMES[i]),
            ));
        };
        let board = &mut self.boards[i];
        if sb.epoch < board.persisted_epoch {
            let was = board.persisted_epoch;
            return Err(self.fail(
                Violation::WentBack,
                &format!(
                    "{} persisted epoch {} after epoch {was}: epochs only grow",
                    NAMES[i], sb.epoch
                ),
            ));
        }
        board.persisted_epoch = sb.epoch;
        let current = sb.current_generation;
        if board.generations_seen.last() != Some(&current) {
            if board.generations_seen.contains(&current) {
                return Err(self.fail(
                    Violation::WentBack,
                    &format!("{} went back to data generation {current:#x}", NAMES[i]),
                ));
            }
            board.generations_seen.push(current);
        }
        Ok(())
    }

    /// The superblock on board `i`'s disk now.
    pub fn persisted_superblock(&self, i: usize) -> Option<Superblock> {
        let copies = self.layout.superblock_offsets.map(|offset| {
            let at = offset as usize;
            Superblock::decode(&self.boards[i].disk[at..at + tandem::metadata::SUPERBLOCK_BYTES])
        });
        choose_superblock(copies).map(|(sb, _)| sb)
    }

    fn event(&mut self, board: Option<usize>, event: Event) {
        let text = format!("{:?}{event:?}", board);
        self.fingerprint(text.as_bytes());
        let happening = Happening {
            at: self.now,
            board,
            event,
        };
        if self.options.trace {
            eprintln!("{}", happening_text(&happening));
        } else if self.timeline.len() >= TIMELINE_MAX * 2 {
            self.timeline.drain(..TIMELINE_MAX);
        }
        self.timeline.push(happening);
    }

    fn fingerprint(&mut self, bytes: &[u8]) {
        let mut words = vec![self.report.fingerprint, self.now];
        words.extend(bytes.chunks(8).map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        }));
        self.report.fingerprint = super::prng::mix(&words);
    }

    /// A failure: what broke, where, and the command that replays it.
    fn fail(&self, violation: Violation, message: &str) -> PairFailure {
        PairFailure {
            violation,
            seed: self.seed,
            at_ms: self.now,
            message: message.to_string(),
            repro: match self.fault_ms {
                Some(fault_ms) => format!(
                    "cargo run --release -p tandem-tests --bin sim -- --pair --seed {} --steps {fault_ms}{}",
                    self.seed,
                    self.options.extra_args()
                ),
                None => "a scripted scenario: run its test (with `trace: true` in its options for the engines' logs)".to_string(),
            },
        }
    }

    fn mirror_settings(&mut self, i: usize) -> MirrorSettings {
        MirrorSettings {
            node_name: NAMES[i].to_string(),
            peer_name: NAMES[1 - i].to_string(),
            preferred: i == A,
            peer_preferred: i == B,
            dead_time_ms: self.options.dead_time_ms,
            boot_id: self.prng.next_u64(),
            id_seed: self.prng.next_u64(),
            cluster_ip: self.options.cluster_ip,
            gateway_probe: self.options.gateway_probe,
            failback_preferred: self.options.failback_preferred,
            mutations: self.options.mutations,
        }
    }

    /// A random number drawn from `words` (and the seed) rather than from the stream: for
    /// what follows an engine's output, whose order within one call the engine does not fix.
    fn draw(&self, words: &[u64]) -> u64 {
        let mut all = vec![self.seed];
        all.extend_from_slice(words);
        super::prng::mix(&all)
    }

    fn random_bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let word = self.prng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }

    /// Calls the engine of board `i` (if its daemon exists) with its clock, then carries out
    /// everything it asks.
    fn engine(&mut self, i: usize, f: impl FnOnce(&mut Mirror, Instant)) -> Outcome<()> {
        let clock = self.boards[i].clock(self.now);
        let Some(mirror) = self.boards[i].mirror.as_mut() else {
            return Ok(());
        };
        if self.options.trace {
            tandem::logger::set_prefix(
                &format!("{:>8} {}", self.now, NAMES[i]),
                mirror.role().name(),
            );
        }
        f(mirror, clock);
        self.route(i)
    }
}

fn happening_text(h: &Happening) -> String {
    let who = h.board.map_or("pair", |i| NAMES[i]);
    format!("{:>8} ms {who:<5} {:?}", h.at, h.event)
}
