//! The two-node simulator, first version: two replication engines (the real
//! `replication::engine::Mirror`, with its real links, handshakes and sealed frames) in one
//! process, on virtual time, with in-memory disks whose requests complete after a random delay,
//! and two links whose connections deliver bytes after a random latency (so messages on the two
//! links overtake each other), are cut (one link, both, one way: silence until the dead time),
//! and come back. A client writes non-overlapping blocks through whichever node is primary and
//! records what was acknowledged.
//!
//! Checkers: a write is acknowledged only by a primary; after faults stop the pair settles to
//! one primary, an up-to-date secondary and byte-identical volumes, within a bounded time; every
//! acknowledged write is on both disks; generations only move forward.
//!
//! Not simulated yet: power cuts and restarts (the multi-process tests cover them), disk errors.

use std::collections::{BTreeMap, VecDeque};

use tandem::metadata::{Layout, Superblock};
use tandem::nbd::{VolumeDone, VolumeRequest};
use tandem::node::{DiskState, Role};
use tandem::peer::link::{LinkConn, LinkOutput, LinkSettings, PeerLinks};
use tandem::peer::{LinkKind, Role as LinkRole};
use tandem::replication::activity_log::ActivityLog;
use tandem::replication::dirty_map::DirtyMap;
use tandem::replication::engine::{EngineOutput, LoadedState, Mirror, MirrorSettings};
use tandem::time::Instant;
use tandem_board::{DiskCompletion, DiskDone, DiskRequest, IoBuf};

use super::prng::Prng;

const BACKING_BYTES: u64 = 16 << 20;
const DEAD_TIME_MS: u64 = 600;
const STEP_MS: u64 = 5;
const BLOCK: u64 = 4096;

/// One simulated board: the engine and its disk.
struct Board {
    mirror: Mirror,
    disk: Vec<u8>,
    /// Disk requests in flight: (due, tag, request).
    pending: Vec<(u64, u64, DiskRequest)>,
    /// Highest generation history seen (for the "only forward" check).
    generations_seen: Vec<u64>,
}

/// One direction of one connection: bytes with their delivery time, in order.
#[derive(Default)]
struct Pipe {
    queue: VecDeque<(u64, Vec<u8>)>,
}

struct Wire {
    /// The connection ids on each side, while connected.
    conns: Option<(LinkConn, LinkConn)>,
    /// a->b and b->a.
    pipes: [Pipe; 2],
    /// Cut: bytes are dropped silently (each direction).
    cut: [bool; 2],
    latency_ms: u64,
    next_connect: u64,
}

/// The outcome of one seed.
#[derive(Debug, Default)]
pub struct PairReport {
    pub acked_writes: u64,
    pub faults: u64,
    pub settle_ms: u64,
}

/// One run of the simulator.
#[allow(missing_debug_implementations)] // holds two whole engines and disks
pub struct PairSim {
    boards: [Board; 2],
    wires: [Wire; 2],
    now: u64,
    prng: Prng,
    layout: Layout,
    /// The client's writes: tag -> (board it was sent to, offset, seed).
    in_flight: BTreeMap<u64, (usize, u64, u64)>,
    next_tag: u64,
    /// Block -> seed of the last acknowledged write.
    model: BTreeMap<u64, u64>,
    report: PairReport,
    seed: u64,
    fault_ms: u64,
}

fn block_bytes(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    let mut state = seed | 1;
    while out.len() < BLOCK as usize {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out
}

impl PairSim {
    pub fn new(seed: u64) -> PairSim {
        let layout = Layout::for_backing(BACKING_BYTES).expect("layout");
        let board = |i: u64| {
            let names = ["nas-a", "nas-b"];
            let me = names[i as usize];
            let peer = names[1 - i as usize];
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(seed.wrapping_mul(31) + i + 1).to_le_bytes());
            id[8] = 1;
            let superblock = Superblock::new(&layout, id);
            let links = LinkSettings {
                key: [7; 32],
                node_name: me.to_string(),
                peer_name: peer.to_string(),
                volume_id: id,
                heartbeat_interval_ms: 100,
                dead_time_ms: DEAD_TIME_MS,
            };
            let settings = MirrorSettings {
                node_name: me.to_string(),
                peer_name: peer.to_string(),
                preferred: i == 0,
                peer_preferred: i == 1,
                dead_time_ms: DEAD_TIME_MS,
                boot_id: seed ^ (i + 100),
                id_seed: seed ^ (i + 200),
                cluster_ip: false,
                gateway_probe: false,
                failback_preferred: false,
                mutations: Default::default(),
            };
            let loaded = LoadedState {
                layout,
                superblock,
                map: DirtyMap::for_layout(&layout),
                al: ActivityLog::new(1),
                crashed_extents: Vec::new(),
            };
            Board {
                mirror: Mirror::new(
                    settings,
                    PeerLinks::new(links),
                    loaded,
                    Instant::from_millis(0),
                ),
                disk: vec![0; BACKING_BYTES as usize],
                pending: Vec::new(),
                generations_seen: Vec::new(),
            }
        };
        let mut prng = Prng::new(seed);
        let wire = |prng: &mut Prng| Wire {
            conns: None,
            pipes: [Pipe::default(), Pipe::default()],
            cut: [false, false],
            latency_ms: prng.range(1, 30),
            next_connect: 0,
        };
        let wires = [wire(&mut prng), wire(&mut prng)];
        PairSim {
            boards: [board(0), board(1)],
            wires,
            now: 0,
            prng,
            layout,
            in_flight: BTreeMap::new(),
            next_tag: 1,
            model: BTreeMap::new(),
            report: PairReport::default(),
            seed,
            fault_ms: 0,
        }
    }

    fn fail(&self, message: &str) -> String {
        format!(
            "seed {} at {} ms: {message} (reproduce: cargo run --release -p tandem-tests --bin sim -- --pair --seed {} --steps {})",
            self.seed, self.now, self.seed, self.fault_ms
        )
    }

    /// Runs the seed: a workload with faults for `fault_ms`, then no faults until the pair
    /// settles. Err with the failing check.
    pub fn run(mut self, fault_ms: u64) -> Result<PairReport, String> {
        self.fault_ms = fault_ms;
        while self.now < fault_ms {
            self.maybe_fault();
            self.maybe_write();
            self.step()?;
        }
        // Heal everything and let it settle.
        for wire in &mut self.wires {
            wire.cut = [false, false];
        }
        let settle_start = self.now;
        let limit = settle_start + 60_000;
        loop {
            self.step()?;
            if self.in_flight.is_empty() && self.settled() {
                break;
            }
            if self.now > limit {
                let s = |i: usize| {
                    let m = &self.boards[i].mirror;
                    format!(
                        "{}/{}/{}/dirty={}",
                        m.role().name(),
                        m.disk_state().name(),
                        m.peer_link_state().name(),
                        m.dirty_bytes()
                    )
                };
                return Err(self.fail(&format!(
                    "the pair did not settle within 60 s: nas-a {} nas-b {}, {} writes in flight",
                    s(0),
                    s(1),
                    self.in_flight.len()
                )));
            }
        }
        self.report.settle_ms = self.now - settle_start;
        self.check_replicas()?;
        Ok(self.report)
    }

    fn settled(&self) -> bool {
        let [a, b] = [&self.boards[0].mirror, &self.boards[1].mirror];
        let one_primary = (a.role() == Role::Primary) != (b.role() == Role::Primary);
        one_primary
            && a.disk_state() == DiskState::UpToDate
            && b.disk_state() == DiskState::UpToDate
            && a.dirty_bytes() == 0
            && b.dirty_bytes() == 0
            && !a.resync_progress().running
            && !b.resync_progress().running
            && self.boards.iter().all(|b| b.pending.is_empty())
    }

    fn check_replicas(&self) -> Result<(), String> {
        let volume = self.layout.volume_bytes as usize;
        if self.boards[0].disk[..volume] != self.boards[1].disk[..volume] {
            let first = self.boards[0].disk[..volume]
                .iter()
                .zip(&self.boards[1].disk[..volume])
                .position(|(x, y)| x != y);
            return Err(self.fail(&format!(
                "replicas differ after settling (first byte {first:?})"
            )));
        }
        for (&block, &seed) in &self.model {
            let at = (block * BLOCK) as usize;
            if self.boards[0].disk[at..at + BLOCK as usize] != block_bytes(seed)[..] {
                return Err(self.fail(&format!("acknowledged write to block {block} is missing")));
            }
        }
        Ok(())
    }

    fn maybe_fault(&mut self) {
        if !self.prng.chance(4_000) {
            return;
        }
        self.report.faults += 1;
        let w = self.prng.below(2) as usize;
        match self.prng.below(4) {
            0 => self.wires[w].cut = [true, true],
            1 => {
                let dir = self.prng.below(2) as usize;
                self.wires[w].cut[dir] = true;
            }
            2 => self.wires[w].cut = [false, false],
            _ => {
                // A reset: both ends see the connection close.
                if let Some((ca, cb)) = self.wires[w].conns.take() {
                    self.wires[w].pipes = [Pipe::default(), Pipe::default()];
                    let now = Instant::from_millis(self.now);
                    self.boards[0].mirror.handle_link_closed(ca, now);
                    self.boards[1].mirror.handle_link_closed(cb, now);
                    self.wires[w].next_connect = self.now + 100;
                }
            }
        }
    }

    fn maybe_write(&mut self) {
        if self.in_flight.len() >= 8 || !self.prng.chance(300_000) {
            return;
        }
        let Some(target) = (0..2).find(|&i| self.boards[i].mirror.role() == Role::Primary) else {
            return;
        };
        let blocks = self.layout.volume_bytes / BLOCK;
        let block = self.prng.below(blocks);
        if self.in_flight.values().any(|&(_, b, _)| b == block) {
            return;
        }
        let seed = self.prng.next_u64();
        let data = block_bytes(seed);
        let mut buf = IoBuf::new(BLOCK as usize);
        buf.set_len(BLOCK as usize);
        buf.as_mut_slice().copy_from_slice(&data);
        let tag = self.next_tag;
        self.next_tag += 1;
        self.in_flight.insert(tag, (target, block, seed));
        let request = VolumeRequest::Write {
            offset: block * BLOCK,
            buf,
            fua: self.prng.chance(100_000),
        };
        self.boards[target]
            .mirror
            .submit(tag, request, Instant::from_millis(self.now));
    }

    fn step(&mut self) -> Result<(), String> {
        self.now += STEP_MS;
        let now = Instant::from_millis(self.now);
        // Connections come up when nothing is cut and the other end is not connected.
        for w in 0..2 {
            let link = [LinkKind::Heartbeat, LinkKind::Lan][w];
            let wire = &mut self.wires[w];
            if wire.conns.is_none() && self.now >= wire.next_connect && wire.cut == [false, false] {
                let ca = self.boards[0].mirror.handle_link_connected(
                    link,
                    LinkRole::Initiator,
                    nonce(self.seed, self.now, 0),
                    now,
                );
                let cb = self.boards[1].mirror.handle_link_connected(
                    link,
                    LinkRole::Responder,
                    nonce(self.seed, self.now, 1),
                    now,
                );
                wire.conns = Some((ca, cb));
                wire.pipes = [Pipe::default(), Pipe::default()];
            }
        }
        // Deliver bytes that are due.
        for w in 0..2 {
            for dir in 0..2 {
                loop {
                    let wire = &mut self.wires[w];
                    let Some((ca, cb)) = wire.conns else { break };
                    let due = wire.pipes[dir]
                        .queue
                        .front()
                        .is_some_and(|(t, _)| *t <= self.now);
                    if !due {
                        break;
                    }
                    let Some((_, bytes)) = wire.pipes[dir].queue.pop_front() else {
                        break;
                    };
                    let (to, conn) = if dir == 0 { (1, cb) } else { (0, ca) };
                    self.boards[to].mirror.handle_link_bytes(conn, &bytes, now);
                }
            }
        }
        // Disk completions.
        for i in 0..2 {
            let due: Vec<(u64, u64, DiskRequest)> = {
                let board = &mut self.boards[i];
                let (ready, later): (Vec<_>, Vec<_>) = board
                    .pending
                    .drain(..)
                    .partition(|(t, _, _)| *t <= self.now);
                board.pending = later;
                ready
            };
            for (_, tag, request) in due {
                let completion = complete(&mut self.boards[i].disk, tag, request);
                self.boards[i]
                    .mirror
                    .handle_disk_completion(completion, now);
            }
        }
        for i in 0..2 {
            if self.boards[i]
                .mirror
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.boards[i].mirror.handle_timeout(now);
            }
        }
        self.drain_outputs()?;
        self.check_invariants()
    }

    fn drain_outputs(&mut self) -> Result<(), String> {
        loop {
            let mut moved = false;
            for i in 0..2 {
                while let Some(output) = self.boards[i].mirror.poll_link_output() {
                    moved = true;
                    match output {
                        LinkOutput::Send { conn, bytes } => {
                            let w = conn.link.index();
                            let latency = self.wires[w].latency_ms + self.prng.below(5);
                            let wire = &mut self.wires[w];
                            let current = wire.conns.map(|(a, b)| if i == 0 { a } else { b });
                            if current == Some(conn) && !wire.cut[i] {
                                let at = wire.pipes[i].queue.back().map_or(0, |(t, _)| *t);
                                wire.pipes[i]
                                    .queue
                                    .push_back(((self.now + latency).max(at), bytes));
                            }
                        }
                        LinkOutput::Close { conn } => {
                            let w = conn.link.index();
                            let current =
                                self.wires[w].conns.map(|(a, b)| if i == 0 { a } else { b });
                            if current == Some(conn) {
                                // The other end sees a reset.
                                if let Some((ca, cb)) = self.wires[w].conns.take() {
                                    let other = if i == 0 { cb } else { ca };
                                    let now = Instant::from_millis(self.now);
                                    self.boards[1 - i].mirror.handle_link_closed(other, now);
                                    let mine = if i == 0 { ca } else { cb };
                                    self.boards[i].mirror.handle_link_closed(mine, now);
                                }
                                self.wires[w].pipes = [Pipe::default(), Pipe::default()];
                                self.wires[w].next_connect = self.now + 100;
                            }
                        }
                    }
                }
                while let Some(output) = self.boards[i].mirror.poll_output() {
                    moved = true;
                    match output {
                        EngineOutput::Disk { tag, request } => {
                            let due = self.now + self.prng.range(0, 8);
                            self.boards[i].pending.push((due, tag, request));
                        }
                        EngineOutput::Metadata { offset, bytes, .. } => {
                            let at = offset as usize;
                            self.boards[i].disk[at..at + bytes.len()].copy_from_slice(&bytes);
                        }
                        EngineOutput::Done { tag, done } => {
                            let role = self.boards[i].mirror.role();
                            let Some((board, block, seed)) = self.in_flight.remove(&tag) else {
                                return Err(self.fail(&format!("completion of unknown tag {tag}")));
                            };
                            if board != i {
                                return Err(self.fail("a completion from the wrong node"));
                            }
                            match done {
                                VolumeDone::Buf(_) => {
                                    if role != Role::Primary {
                                        return Err(self.fail("a secondary acknowledged a write"));
                                    }
                                    self.model.insert(block, seed);
                                    self.report.acked_writes += 1;
                                }
                                VolumeDone::Failed { .. } => {}
                                other => {
                                    return Err(
                                        self.fail(&format!("unexpected completion {other:?}"))
                                    )
                                }
                            }
                        }
                        EngineOutput::Serving(_)
                        | EngineOutput::ClusterIp(_)
                        | EngineOutput::ProbeClusterIp => {}
                        EngineOutput::Fence { reason } => {
                            return Err(self.fail(&format!(
                                "a node fenced without a cluster IP configured: {reason}"
                            )));
                        }
                    }
                }
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn check_invariants(&mut self) -> Result<(), String> {
        for i in 0..2 {
            let current = self.boards[i].mirror.generations().current;
            let board = &mut self.boards[i];
            if board.generations_seen.last() != Some(&current) {
                if board.generations_seen.contains(&current) {
                    return Err(format!(
                        "seed {}: node {i} went back to generation {current:#x}",
                        self.seed
                    ));
                }
                board.generations_seen.push(current);
            }
        }
        Ok(())
    }
}

fn nonce(seed: u64, now: u64, side: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out[8..16].copy_from_slice(&now.to_le_bytes());
    out[16] = side as u8;
    out
}

fn complete(disk: &mut [u8], tag: u64, request: DiskRequest) -> DiskCompletion {
    let result = match request {
        DiskRequest::Read { offset, mut buf } => {
            let at = offset as usize;
            let len = buf.len();
            buf.as_mut_slice().copy_from_slice(&disk[at..at + len]);
            Ok(DiskDone::Buf(buf))
        }
        DiskRequest::Write { offset, buf, .. } => {
            let at = offset as usize;
            disk[at..at + buf.len()].copy_from_slice(buf.as_slice());
            Ok(DiskDone::Buf(buf))
        }
        DiskRequest::Discard { offset, len, .. } | DiskRequest::WriteZeroes { offset, len, .. } => {
            disk[offset as usize..(offset + len) as usize].fill(0);
            Ok(DiskDone::Done)
        }
        DiskRequest::Flush => Ok(DiskDone::Done),
        DiskRequest::MapExtents { .. } => Ok(DiskDone::Done),
    };
    DiskCompletion {
        tag,
        result,
        buf: None,
    }
}
