//! The replication engine: one node's half of the mirror (docs/REPLICATION.md).
//!
//! It owns the links to the peer, the persistent replication state (superblock flags,
//! generations, the dirty bitmap, the activity log) and the node's role in the pair, and it
//! carries every volume request of a primary to both disks (protocol C). Sans-IO like the rest of
//! the core: inputs are volume requests, disk completions, link events and the time; outputs are
//! disk requests, synchronous metadata writes, finished volume requests and link frames.
//!
//! # The life of a pairing
//!
//! A *pairing* runs from the moment a link to the peer comes up (none was up before) until no
//! link is up, or the peer restarts (its `boot_id` changes). It starts with an exchange: each
//! node sends its [`PeerState`] and its dirty bitmap; when both are in, both run
//! [`generation::decide`] on the same inputs and reach mirrored answers: in sync, a resync one
//! way, or a refusal (split brain, unrelated volumes, no eligible source) that waits for the
//! operator. Then, with no primary on either side, the election (DESIGN.md §4 rule 7) promotes
//! the resync source, or when in sync the `preferred` node.
//!
//! # The replication stream
//!
//! The primary numbers every message it sends to the secondary (`seq`, from 1 in each pairing)
//! and keeps each one until it is acknowledged. The stream runs on the heartbeat link while it
//! is up, else on the lan link. When a link goes down, every unacknowledged message last sent on
//! it is sent again on the other. The secondary applies messages strictly in `seq` order (a
//! message that arrives early waits, one that arrives twice is acknowledged again, never applied
//! twice), and issues a message whose range overlaps one still being written only after it, so
//! both disks see overlapping writes in the same order.
//!
//! # Degrade
//!
//! A primary that loses its peer while mirroring, or waits too long for an acknowledgement,
//! freezes (writes are held, nothing is acknowledged), waits out the takeover window since the
//! peer was last heard, then marks every region of an unacknowledged write dirty, starts a new
//! generation, persists all of it, and only then acknowledges and serves alone (DESIGN.md §4
//! rule 2). While alone, each write's regions are marked in the bitmap and the bitmap block is
//! made durable before the write is issued.

mod failover;

pub use failover::{schedule, Readiness, CLUSTER_IP_PROBE_MS};

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::metadata::{flags, Layout, Superblock, SUPERBLOCK_BYTES};
use crate::nbd::{VolumeDone, VolumeRequest};
use crate::node::{DiskState, PeerState as PeerLinkState, Role, VerifyStatus};
use crate::peer::link::{LinkEvent, LinkState, PeerLinks};
use crate::peer::LinkKind;
use crate::replication::activity_log::{ActivityLog, AlBegin, AL_RECORD_BYTES};
use crate::replication::dirty_map::{DirtyMap, ResyncBegin};
use crate::replication::generation::{
    self, Decision, DiskFreshness, GenerationState, Generations, Side, SyncDecision,
};
use crate::replication::wire::{
    Exchange, Message, PeerState, StreamBody, WireRole, BITMAP_RUNS_PER_MESSAGE_MAX,
};
use crate::time::Instant;
use crate::wire::nbd::errno;
use tandem_board::{DiskCompletion, DiskDone, DiskRequest, IoBuf};

/// Engine-internal disk requests carry this bit in their tag; client requests do not.
const TAG_INTERNAL: u64 = 1 << 48;

/// The takeover window is the dead time, the probe of the cluster IP and this margin (DESIGN.md
/// §4 rule 3).
const TAKEOVER_MARGIN_MS: u64 = 150;

/// Resync messages in flight when no client request is, and when some are (client I/O first).
const RESYNC_WINDOW_IDLE: usize = 8;
const RESYNC_WINDOW_BUSY: usize = 1;
/// Dirty regions next to each other travel in one resync message, up to this many (1 MiB).
const RESYNC_CHUNK_REGIONS: u64 = 16;
/// Regions written on the target before a flush makes them durable there (4 MiB).
const RESYNC_FLUSH_EVERY: usize = 64;
/// Stream messages that may wait for an earlier one on the secondary before the stream is
/// considered broken.
const REORDER_MAX: usize = 8192;

/// What the engine needs from the node's configuration.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    pub node_name: String,
    pub peer_name: String,
    /// This node is the `preferred` one.
    pub preferred: bool,
    /// The peer is the `preferred` one.
    pub peer_preferred: bool,
    pub dead_time_ms: u64,
    /// Random per process start.
    pub boot_id: u64,
    /// Seed for new generation ids (random per process start).
    pub id_seed: u64,
    /// A cluster IP is configured (`[cluster] vip`).
    pub cluster_ip: bool,
    /// A gateway probe is configured (`[cluster] uplink_probe`).
    pub gateway_probe: bool,
    /// `failback = "preferred"`.
    pub failback_preferred: bool,
    /// Rules switched off on purpose, for the simulator's mutation checks only (the runtime
    /// always leaves them all off).
    pub mutations: Mutations,
}

/// Safety rules the simulator switches off to prove that its checkers catch what they guard
/// against. Never set outside the simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutations {
    /// No lease (rule 1) and no degrade wait or probe (rule 2): a primary that loses its peer
    /// serves alone at once.
    pub no_lease: bool,
    /// A takeover does not probe the cluster IP (rule 3).
    pub no_arp_probe: bool,
    /// A secondary's takeover deadline counts from any bytes heard, also those that waited in
    /// a socket while this node was not running (the second guard of rule 3's deadline, beside
    /// the probe: see `PeerLinks::last_heard_trusted`).
    pub stale_last_heard: bool,
    /// A takeover ignores the uplink, and no primary fences (rules 3 and 4).
    pub no_gateway_check: bool,
}

/// The persistent state the runtime loaded from the device at start.
#[derive(Debug)]
pub struct LoadedState {
    pub layout: Layout,
    pub superblock: Superblock,
    /// The dirty bitmap read from the device (every bit set when it could not be read).
    pub map: DirtyMap,
    /// The activity log for this session.
    pub al: ActivityLog,
    /// The extents of the activity log of a primary that crashed (already marked in `map` and
    /// made durable by the runtime).
    pub crashed_extents: Vec<u32>,
}

/// What the engine asks of the node.
#[derive(Debug)]
pub enum EngineOutput {
    /// Submit a disk request; report its completion with the same tag.
    Disk { tag: u64, request: DiskRequest },
    /// Write metadata synchronously and make it durable before anything queued after it
    /// (`flush_first`: make every completed data write durable before this one).
    Metadata {
        offset: u64,
        bytes: Vec<u8>,
        flush_first: bool,
    },
    /// A volume request of the server finished.
    Done { tag: u64, done: VolumeDone },
    /// Start (true) or stop serving NBD clients.
    Serving(bool),
    /// Probe the cluster IP (three ARP probes from 0.0.0.0, 100 ms apart, 150 ms wait) and
    /// report with [`Mirror::handle_cluster_ip_probe`].
    ProbeClusterIp,
    /// Add the cluster IP and announce it with gratuitous ARP (true; again means announce
    /// again), or drop it (false).
    ClusterIp(bool),
    /// Fence this node now: drop the cluster IP (already asked), stop serving, reboot (or, in
    /// test mode, exit with status 75).
    Fence { reason: String },
}

/// A client request in flight on a primary.
#[derive(Debug)]
struct ClientReq {
    range: Option<(u64, u64)>,
    /// The local completion, held until the peer's part is done.
    local: Option<VolumeDone>,
    peer_pending: bool,
    in_al: bool,
    /// Sent to the peer: its acknowledgement needs a valid lease.
    mirrored: bool,
}

/// Why a stream message was sent.
#[derive(Debug, Clone)]
enum Purpose {
    Client(u64),
    ResyncData {
        first: u64,
        count: u64,
        resync_id: u64,
    },
    ResyncFlush {
        regions: Vec<u64>,
        resync_id: u64,
    },
    ResyncDone,
    Verify {
        offset: u64,
        len: u64,
    },
}

#[derive(Debug)]
struct Unacked {
    body: StreamBody,
    link: LinkKind,
    sent_at: Instant,
    purpose: Purpose,
}

/// What an internal disk request is for.
#[derive(Debug)]
enum Internal {
    /// The secondary applies stream message `seq`.
    Apply {
        seq: u64,
        range: Option<(u64, u64)>,
        verify: bool,
    },
    /// The resync source reads a region.
    ResyncRead {
        first: u64,
        count: u64,
        resync_id: u64,
    },
    /// A verify reads its local half.
    VerifyRead { offset: u64, len: u64 },
}

#[derive(Debug)]
enum Pairing {
    /// No link is up.
    None,
    /// Our state and bitmap are sent; waiting for the peer's.
    Exchanging {
        peer: Option<PeerState>,
        peer_map: Box<DirtyMap>,
        /// When this exchange started: one that has not decided within
        /// the acknowledgement timeout (a message lost with a dying link) starts again.
        since: Instant,
    },
    /// Decided: mirroring (and resyncing, if a resync is running).
    Paired { peer_boot: u64 },
    /// The decision refused to mirror; waits for the operator (or another pairing).
    Refused {
        peer_boot: u64,
        decision: SyncDecision,
    },
}

#[derive(Debug, Default)]
struct Resync {
    /// Numbers each resync, so that a completion or acknowledgement of an abandoned one (its
    /// regions already released by `abort_all_resyncs`) is recognised and dropped.
    id: u64,
    total_bytes: u64,
    done_bytes: u64,
    cursor: u64,
    reading: usize,
    sent: usize,
    written: Vec<u64>,
    flush_in_flight: bool,
    done_sent: bool,
    started_at: Instant,
}

#[derive(Debug, Default)]
struct Verify {
    cursor: u64,
    in_flight: usize,
    /// offset -> (local digest, peer digest)
    halves: BTreeMap<u64, (Option<u64>, Option<u64>)>,
    checked_bytes: u64,
    mismatched_regions: Vec<(u64, u64)>,
}

/// Progress of a resync, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    pub running: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// How long the resync has run (or ran).
    pub elapsed_ms: u64,
}

/// One node's half of the mirror.
#[derive(Debug)]
pub struct Mirror {
    settings: MirrorSettings,
    links: PeerLinks,
    layout: Layout,
    sb: Superblock,
    map: DirtyMap,
    al: ActivityLog,
    crashed_extents: Vec<u32>,
    role: Role,
    /// This disk, as far as this node knows now (UpToDate only while primary or in sync).
    disk: DiskFreshness,
    /// Receiving a resync.
    syncing: bool,
    peer_state: Option<PeerState>,
    pairing: Pairing,
    /// Writes go to the peer too.
    mirroring: bool,
    now: Instant,
    id_state: u64,
    outputs: VecDeque<EngineOutput>,
    // The primary's side of the stream.
    next_seq: u64,
    unacked: BTreeMap<u64, Unacked>,
    reqs: BTreeMap<u64, ClientReq>,
    active_ranges: Vec<(u64, u64)>,
    waiting: VecDeque<(u64, VolumeRequest)>,
    freeze_until: Option<Instant>,
    switching: bool,
    // The secondary's side of the stream.
    next_expected: u64,
    reorder: BTreeMap<u64, StreamBody>,
    apply_waiting: VecDeque<(u64, StreamBody)>,
    applying_ranges: Vec<(u64, u64)>,
    applied_status: BTreeMap<u64, (u32, u64)>,
    applies_in_flight: usize,
    outdate_at: Option<Instant>,
    // Internal disk requests.
    internal: BTreeMap<u64, Internal>,
    next_internal: u64,
    resync: Option<Resync>,
    last_resync: ResyncProgress,
    verify: Option<Verify>,
    last_verify: Option<(u64, Vec<(u64, u64)>)>,
    /// The operator's maintenance mode (sent to the peer; no election while on).
    maintenance: bool,
    /// The last refusal, for `status`.
    refusal: Option<String>,
    /// The leader's exchange counter (the follower's copy of it).
    exchange_id: u64,
    /// What the last decision said about rule 7's election.
    elect_me: Option<bool>,
    resync_ids: u64,
    /// Failover state (`failover.rs`).
    fo: failover::Failover,
    /// The link the last stream message arrived on (acknowledgements go back on it).
    stream_rx_link: Option<LinkKind>,
    /// Client requests failed when this node demoted with them in flight: their disk
    /// completions are failed too, never acknowledged.
    abandoned: BTreeSet<u64>,
}

/// A finished request turned into a refusal (`ESHUTDOWN`), its buffer kept.
fn shut_down(done: VolumeDone) -> VolumeDone {
    let buf = match done {
        VolumeDone::Buf(buf) => Some(buf),
        VolumeDone::Failed { buf, .. } => buf,
        _ => None,
    };
    VolumeDone::Failed {
        error: errno::ESHUTDOWN,
        buf,
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn request_range(request: &VolumeRequest) -> Option<(u64, u64)> {
    match request {
        VolumeRequest::Write { offset, buf, .. } => Some((*offset, buf.len() as u64)),
        VolumeRequest::Trim { offset, len, .. }
        | VolumeRequest::WriteZeroes { offset, len, .. } => Some((*offset, *len)),
        _ => None,
    }
}

/// A 64-bit digest of a region for `verify` (the first 8 bytes of its SHA-256).
fn digest(bytes: &[u8]) -> u64 {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

fn buf_from(bytes: &[u8]) -> IoBuf {
    let mut buf = IoBuf::new(bytes.len());
    buf.set_len(bytes.len());
    buf.as_mut_slice().copy_from_slice(bytes);
    buf
}

impl Mirror {
    /// A node with a peer, as it starts: secondary, disk `consistent` (or what the superblock
    /// says when worse), no link up.
    pub fn new(
        settings: MirrorSettings,
        links: PeerLinks,
        loaded: LoadedState,
        now: Instant,
    ) -> Mirror {
        let sb = loaded.superblock;
        let disk = if sb.has_flag(flags::DISK_INCONSISTENT) {
            DiskFreshness::Inconsistent
        } else if sb.has_flag(flags::DISK_OUTDATED) {
            DiskFreshness::Outdated
        } else {
            DiskFreshness::Consistent
        };
        let id_state = settings.id_seed;
        Mirror {
            settings,
            links,
            layout: loaded.layout,
            sb,
            map: loaded.map,
            al: loaded.al,
            crashed_extents: loaded.crashed_extents,
            role: Role::Secondary,
            disk,
            syncing: false,
            peer_state: None,
            pairing: Pairing::None,
            mirroring: false,
            now,
            id_state,
            outputs: VecDeque::new(),
            next_seq: 1,
            unacked: BTreeMap::new(),
            reqs: BTreeMap::new(),
            active_ranges: Vec::new(),
            waiting: VecDeque::new(),
            freeze_until: None,
            switching: false,
            next_expected: 1,
            reorder: BTreeMap::new(),
            apply_waiting: VecDeque::new(),
            applying_ranges: Vec::new(),
            applied_status: BTreeMap::new(),
            applies_in_flight: 0,
            outdate_at: None,
            internal: BTreeMap::new(),
            next_internal: 0,
            resync: None,
            last_resync: ResyncProgress::default(),
            verify: None,
            last_verify: None,
            maintenance: false,
            refusal: None,
            exchange_id: 0,
            elect_me: None,
            resync_ids: 0,
            fo: failover::Failover::default(),
            stream_rx_link: None,
            abandoned: BTreeSet::new(),
        }
    }

    // ---- getters -------------------------------------------------------------------------

    pub fn links(&self) -> &PeerLinks {
        &self.links
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The disk state `status` shows.
    pub fn disk_state(&self) -> DiskState {
        if self.syncing {
            return DiskState::Syncing;
        }
        match self.disk {
            DiskFreshness::UpToDate => DiskState::UpToDate,
            DiskFreshness::Consistent => DiskState::Consistent,
            DiskFreshness::Outdated => DiskState::Outdated,
            DiskFreshness::Inconsistent => DiskState::Inconsistent,
        }
    }

    pub fn peer_link_state(&self) -> PeerLinkState {
        if self.links.is_connected() && self.links.is_half(self.now) {
            PeerLinkState::Half
        } else if self.links.is_connected() {
            PeerLinkState::Connected
        } else {
            PeerLinkState::Lost
        }
    }

    pub fn epoch(&self) -> u64 {
        self.sb.epoch
    }

    pub fn generations(&self) -> Generations {
        self.generations_now()
    }

    pub fn resync_progress(&self) -> ResyncProgress {
        match &self.resync {
            Some(r) => ResyncProgress {
                running: true,
                done_bytes: r.done_bytes,
                total_bytes: r.total_bytes.max(r.done_bytes),
                elapsed_ms: self.now.millis_since(r.started_at),
            },
            None => self.last_resync,
        }
    }

    /// Regions this node knows may differ from the peer.
    pub fn dirty_bytes(&self) -> u64 {
        self.map.dirty_bytes()
    }

    /// Verify progress and findings, for `status`: (checked bytes, mismatching ranges).
    pub fn verify_report(&self) -> Option<VerifyStatus> {
        if let Some(v) = &self.verify {
            return Some(VerifyStatus {
                running: true,
                checked_bytes: v.checked_bytes,
                mismatches: v.mismatched_regions.clone(),
            });
        }
        self.last_verify
            .as_ref()
            .map(|(bytes, ranges)| VerifyStatus {
                running: false,
                checked_bytes: *bytes,
                mismatches: ranges.clone(),
            })
    }

    /// The earliest instant at which `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ack = self
            .unacked
            .values()
            .map(|u| u.sent_at.plus_millis(self.ack_timeout_ms()))
            .min();
        [
            self.links.poll_timeout(),
            self.freeze_until,
            self.outdate_at,
            ack,
            self.exchange_deadline(),
            self.failover_timeout(),
            // A tick, so that a longer gap between inputs means this node was not running.
            Some(self.now.plus_millis(self.settings.dead_time_ms / 4)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_output(&mut self) -> Option<EngineOutput> {
        self.outputs.pop_front()
    }

    pub fn poll_link_output(&mut self) -> Option<crate::peer::link::LinkOutput> {
        self.links.poll_output()
    }

    fn new_resync_id(&mut self) -> u64 {
        self.resync_ids += 1;
        self.resync_ids
    }

    /// The resync running now, if it is the one numbered `id`.
    fn resync_if(&mut self, id: u64) -> Option<&mut Resync> {
        self.resync.as_mut().filter(|r| r.id == id)
    }

    fn ack_timeout_ms(&self) -> u64 {
        (self.settings.dead_time_ms * 2).max(2_000)
    }

    /// When a running exchange starts again (not while degrading: the degrade procedure
    /// starts one when it ends).
    fn exchange_deadline(&self) -> Option<Instant> {
        match &self.pairing {
            Pairing::Exchanging { since, .. } if self.freeze_until.is_none() => {
                Some(since.plus_millis(self.ack_timeout_ms()))
            }
            _ => None,
        }
    }

    fn takeover_window_ms(&self) -> u64 {
        self.settings.dead_time_ms + CLUSTER_IP_PROBE_MS + TAKEOVER_MARGIN_MS
    }

    fn generations_now(&self) -> Generations {
        Generations {
            current: self.sb.current_generation,
            bitmap: self.sb.bitmap_generation,
            history: [
                self.sb.history_generations[0],
                self.sb.history_generations[1],
            ],
        }
    }

    fn set_generations(&mut self, g: Generations) {
        self.sb.current_generation = g.current;
        self.sb.bitmap_generation = g.bitmap;
        self.sb.history_generations = [g.history[0], g.history[1], 0, 0];
    }

    fn fresh_id(&mut self, also_not_in: Option<Generations>) -> u64 {
        loop {
            // splitmix64
            self.id_state = self.id_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.id_state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let mine = self.generations_now();
            if mine.is_fresh_id(z) && !also_not_in.is_some_and(|g| g.contains(z)) {
                return z;
            }
        }
    }

    // ---- persistence ---------------------------------------------------------------------

    fn persist_superblock(&mut self) {
        self.sb.sequence += 1;
        let mut bytes = [0u8; SUPERBLOCK_BYTES];
        self.sb.encode(&mut bytes);
        for offset in self.layout.superblock_offsets {
            self.outputs.push_back(EngineOutput::Metadata {
                offset,
                bytes: bytes.to_vec(),
                flush_first: false,
            });
        }
    }

    fn persist_bitmap(&mut self) {
        let base = self.layout.bitmap_offset;
        let blocks: Vec<_> = self.map.take_changed_blocks().collect();
        for block in blocks {
            self.outputs.push_back(EngineOutput::Metadata {
                offset: base + block.offset_in_bitmap,
                bytes: block.bytes.to_vec(),
                flush_first: false,
            });
        }
    }

    fn set_flag(&mut self, flag: u32, on: bool) -> bool {
        let before = self.sb.flags;
        if on {
            self.sb.flags |= flag;
        } else {
            self.sb.flags &= !flag;
        }
        before != self.sb.flags
    }

    /// Clears `NEVER_WRITTEN` durably before the first data write of any kind.
    fn before_data_write(&mut self) {
        if self.set_flag(flags::NEVER_WRITTEN, false) {
            self.persist_superblock();
        }
    }

    fn set_disk(&mut self, disk: DiskFreshness) {
        if self.disk != disk {
            log::info!(
                "disk state changed (from={} to={})",
                freshness_name(self.disk),
                freshness_name(disk)
            );
            self.disk = disk;
        }
        let mut changed = self.set_flag(flags::DISK_OUTDATED, disk == DiskFreshness::Outdated);
        changed |= self.set_flag(
            flags::DISK_INCONSISTENT,
            disk == DiskFreshness::Inconsistent,
        );
        if changed {
            self.persist_superblock();
        }
    }

    // ---- inputs --------------------------------------------------------------------------

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        self.links.handle_timeout(now);
        self.process_link_events();
        let probed = !self.settings.cluster_ip || self.fo.degrade_probed;
        if self.freeze_until.is_some_and(|t| now >= t) && probed {
            self.end_degrade_wait();
        }
        if self.outdate_at.is_some_and(|t| now >= t) {
            self.outdate_at = None;
            if !self.links.is_connected()
                && self.role == Role::Secondary
                && self.disk == DiskFreshness::UpToDate
            {
                log::warn!("peer lost and no takeover: marking this disk outdated (the peer may be writing alone)");
                self.set_disk(DiskFreshness::Outdated);
            }
        }
        if self.exchange_deadline().is_some_and(|t| now >= t) {
            log::warn!("the exchange with the peer did not finish in time; starting it again");
            self.start_pairing();
        }
        let timeout = self.ack_timeout_ms();
        if self.mirroring
            && self.freeze_until.is_none()
            && self
                .unacked
                .values()
                .any(|u| now.millis_since(u.sent_at) >= timeout)
        {
            log::error!("the peer did not acknowledge in time (timeout_ms={timeout}); dropping the links and running the degrade procedure");
            self.links.drop_all("acknowledgement timeout");
            self.process_link_events();
            self.end_pairing("acknowledgement timeout");
        }
        self.pump();
    }

    /// Bytes arrived on a link.
    pub fn handle_link_bytes(
        &mut self,
        conn: crate::peer::link::LinkConn,
        bytes: &[u8],
        now: Instant,
    ) {
        self.advance(now);
        self.links.handle_bytes(conn, bytes, now);
        self.process_link_events();
        self.pump();
    }

    /// A link connection closed.
    pub fn handle_link_closed(&mut self, conn: crate::peer::link::LinkConn, now: Instant) {
        self.advance(now);
        self.links.handle_closed(conn);
        self.process_link_events();
        self.pump();
    }

    /// A link connection opened.
    pub fn handle_link_connected(
        &mut self,
        link: LinkKind,
        role: crate::peer::Role,
        nonce: [u8; crate::peer::PEER_NONCE_BYTES],
        now: Instant,
    ) -> crate::peer::link::LinkConn {
        self.advance(now);
        let conn = self.links.handle_connected(link, role, nonce, now);
        self.process_link_events();
        conn
    }

    fn process_link_events(&mut self) {
        while let Some(event) = self.links.poll_event() {
            match event {
                LinkEvent::Up(link) => self.link_up(link),
                LinkEvent::Down(link) => self.link_down(link),
                LinkEvent::Beat { sent_ms, body, .. } => self.handle_beat(sent_ms, &body),
                LinkEvent::Frame { link, kind, body } => match Message::decode(kind, &body) {
                    None => log::debug!("peer: ignoring a frame of unknown kind {kind:#x}"),
                    Some(Ok(message @ Message::Stream { .. })) => {
                        self.stream_rx_link = Some(link);
                        self.handle_message(message);
                    }
                    Some(Err(e)) => {
                        log::error!("peer sent a malformed message (link={link} error={e}); dropping the link");
                        self.links.drop_link(link, "malformed message");
                    }
                    Some(Ok(message)) => self.handle_message(message),
                },
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.settings.node_name < self.settings.peer_name
    }

    fn link_up(&mut self, _link: LinkKind) {
        if matches!(self.pairing, Pairing::None) {
            self.start_pairing();
        }
    }

    fn link_down(&mut self, link: LinkKind) {
        if !self.links.is_connected() {
            self.end_pairing("no link to the peer is up");
            return;
        }
        match self.pairing {
            // Our state may not have arrived: exchange again on the link that is left.
            Pairing::Exchanging { .. } => self.start_pairing(),
            _ => {
                if self.role == Role::Primary {
                    self.resend_from(link);
                }
            }
        }
    }

    /// The link the stream uses now.
    fn stream_link(&self) -> Option<LinkKind> {
        [LinkKind::Heartbeat, LinkKind::Lan]
            .into_iter()
            .find(|&l| self.links.state(l) == LinkState::Up)
    }

    fn send(&mut self, message: &Message) -> Option<LinkKind> {
        let link = self.stream_link()?;
        self.send_on(link, message)
    }

    /// An acknowledgement goes back on the link its stream message came in on (while that
    /// link is up): the primary moved the stream there because it found the other link dead,
    /// which this node may not have noticed yet.
    fn send_ack(&mut self, message: &Message) -> Option<LinkKind> {
        match self.stream_rx_link {
            Some(link) if self.links.state(link) == LinkState::Up => self.send_on(link, message),
            _ => self.send(message),
        }
    }

    fn send_on(&mut self, link: LinkKind, message: &Message) -> Option<LinkKind> {
        let (header, payload) = message.encode();
        self.links
            .send(link, message.kind(), &header, payload)
            .then_some(link)
    }

    /// This node's role as the peer sees it (a fenced node is not primary).
    fn wire_role(&self) -> WireRole {
        if self.role == Role::Primary {
            WireRole::Primary
        } else {
            WireRole::Secondary
        }
    }

    fn my_state(&self, exchange: Exchange) -> PeerState {
        PeerState {
            exchange,
            exchange_id: self.exchange_id,
            boot_id: self.settings.boot_id,
            role: self.wire_role(),
            epoch: self.sb.epoch,
            generations: self.generations_now(),
            disk: self.disk,
            never_written: self.sb.has_flag(flags::NEVER_WRITTEN),
            crashed_primary: !self.crashed_extents.is_empty(),
            maintenance: self.maintenance,
            al_extents: self.crashed_extents.clone(),
        }
    }

    fn send_state(&mut self, exchange: Exchange) {
        let state = self.my_state(exchange);
        self.send(&Message::State(state));
    }

    /// Sends this node's half of an exchange: its state, then its dirty bitmap.
    fn send_exchange(&mut self, exchange: Exchange) {
        self.send_state(exchange);
        let mut runs = Vec::new();
        let mut region = 0;
        let count = self.map.region_count();
        while let Some(first) = self.map.next_dirty(region) {
            let mut end = first + 1;
            while end < count && self.map.is_dirty(end) {
                end += 1;
            }
            runs.push((first, end - first));
            region = end;
            if runs.len() == BITMAP_RUNS_PER_MESSAGE_MAX {
                self.send(&Message::Bitmap {
                    runs: std::mem::take(&mut runs),
                });
            }
            if end >= count {
                break;
            }
        }
        if !runs.is_empty() {
            self.send(&Message::Bitmap { runs });
        }
        let dirty_regions = self.map.dirty_count();
        self.send(&Message::BitmapEnd { dirty_regions });
    }

    /// Each pairing numbers its stream from its own base, so that a message of an earlier
    /// pairing can never pass for one of this one.
    fn reset_stream(&mut self) {
        let base = self.exchange_id << 32;
        self.next_seq = base + 1;
        self.next_expected = base + 1;
        self.reorder.clear();
        self.applied_status.clear();
        self.unacked.clear();
    }

    /// Opens a new exchange: the leader starts one; the follower asks the leader for one.
    fn start_pairing(&mut self) {
        if self.freeze_until.is_some() {
            // Degrading: the exchange starts once the new generation is persisted.
            return;
        }
        self.pairing = Pairing::Exchanging {
            peer: None,
            peer_map: Box::new(DirtyMap::for_layout(&self.layout)),
            since: self.now,
        };
        self.elect_me = None;
        if self.is_leader() {
            self.exchange_id += 1;
            self.reset_stream();
            self.send_exchange(Exchange::Start);
        } else {
            // The leader may be paired with this node's previous life: ask.
            self.send_state(Exchange::Request);
        }
    }

    /// The pairing ended (no link up, or the peer restarted).
    fn end_pairing(&mut self, reason: &str) {
        if matches!(self.pairing, Pairing::None) {
            return;
        }
        let was_paired = matches!(self.pairing, Pairing::Paired { .. });
        log::warn!(
            "pairing with the peer ended (peer={} reason={reason})",
            self.settings.peer_name
        );
        self.pairing = Pairing::None;
        self.refusal = None;
        if let Some(resync) = self.resync.take() {
            self.map.abort_all_resyncs();
            self.last_resync = ResyncProgress {
                running: false,
                done_bytes: resync.done_bytes,
                total_bytes: resync.total_bytes.max(resync.done_bytes),
                elapsed_ms: self.now.millis_since(resync.started_at),
            };
            log::warn!("resync interrupted (done_bytes={})", resync.done_bytes);
        }
        if let Some(verify) = self.verify.take() {
            log::warn!(
                "verify interrupted (checked_bytes={})",
                verify.checked_bytes
            );
        }
        self.reorder.clear();
        self.apply_waiting.clear();
        match self.role {
            Role::Primary if self.mirroring => self.begin_degrade(),
            Role::Primary => {
                // Already alone: anything unacknowledged belonged to a resync or verify.
                self.unacked.clear();
            }
            _ => {
                let in_sync = !self.syncing;
                self.syncing = false;
                if self.disk == DiskFreshness::UpToDate {
                    let last = self.takeover_last_heard();
                    self.outdate_at = Some(last.plus_millis(self.takeover_window_ms()));
                    if !self.links.is_connected() && self.role == Role::Secondary {
                        self.start_takeover(was_paired && in_sync);
                    }
                }
            }
        }
        self.mirroring = false;
    }

    // ---- degrade -------------------------------------------------------------------------

    fn begin_degrade(&mut self) {
        if self.settings.mutations.no_lease {
            self.freeze_until = Some(self.now);
            self.mirroring = false;
            self.finish_degrade();
            return;
        }
        let last = self.links.last_heard().unwrap_or(self.now);
        let until = last.plus_millis(self.takeover_window_ms()).max(self.now);
        log::warn!(
            "peer lost while mirroring: writes are held until the takeover window has passed (wait_ms={})",
            until.millis_since(self.now)
        );
        self.freeze_until = Some(until);
        self.mirroring = false;
        if self.settings.cluster_ip {
            // The probe ends as the wait does (or at once after a stall of the board).
            self.fo.degrade_probed = false;
            let at = Instant::from_millis(until.as_millis().saturating_sub(CLUSTER_IP_PROBE_MS));
            self.fo.degrade_probe_at = Some(at.max(self.now));
        }
    }

    /// Marks dirty every client write the peer has not acknowledged: it may be on this disk
    /// and missing there. Before serving alone, before demoting with writes in flight, and
    /// before a clean stop: whatever this node does next, the next pairing resyncs them.
    fn mark_unacked_client_writes(&mut self) {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for unacked in self.unacked.values() {
            if let Purpose::Client(tag) = unacked.purpose {
                if let Some(range) = self.reqs.get(&tag).and_then(|req| req.range) {
                    ranges.push(range);
                }
            }
        }
        for (offset, len) in ranges {
            self.map.note_write(offset, len);
        }
    }

    fn finish_degrade(&mut self) {
        self.freeze_until = None;
        self.fo.degrade_probe_at = None;
        self.fo.degrade_probed = false;
        // Every write the peer did not acknowledge may be missing there.
        self.mark_unacked_client_writes();
        for unacked in std::mem::take(&mut self.unacked).into_values() {
            if let Purpose::Client(tag) = unacked.purpose {
                if let Some(req) = self.reqs.get_mut(&tag) {
                    req.peer_pending = false;
                }
            }
        }
        let new_id = self.fresh_id(None);
        let mut g = self.generations_now();
        g.start_new_generation(new_id);
        self.set_generations(g);
        self.set_flag(flags::PEER_OUTDATED, true);
        self.persist_bitmap();
        self.persist_superblock();
        log::warn!(
            "degrade procedure done: serving alone, new data generation (generation={new_id:#x} dirty_bytes={})",
            self.map.dirty_bytes()
        );
        let tags: Vec<u64> = self.reqs.keys().copied().collect();
        for tag in tags {
            self.try_finish(tag);
        }
        self.admit_waiting();
        if self.links.is_connected() {
            self.start_pairing();
        }
    }

    // ---- messages ------------------------------------------------------------------------

    fn handle_message(&mut self, message: Message) {
        match message {
            Message::State(state) => self.handle_peer_state(state),
            Message::Bitmap { runs } => {
                let region_count = self.map.region_count();
                let region_bytes = self.map.region_bytes();
                let volume_bytes = self.map.volume_bytes();
                if let Pairing::Exchanging {
                    peer: Some(_),
                    peer_map,
                    ..
                } = &mut self.pairing
                {
                    for (first, count) in runs {
                        if first + count > region_count {
                            log::error!(
                                "peer sent a bitmap run past the end of the volume; ignoring it"
                            );
                            continue;
                        }
                        let offset = first * region_bytes;
                        let len = (count * region_bytes).min(volume_bytes - offset);
                        peer_map.mark(offset, len);
                    }
                }
            }
            Message::BitmapEnd { dirty_regions } => {
                let count = match &self.pairing {
                    Pairing::Exchanging {
                        peer: Some(_),
                        peer_map,
                        ..
                    } => peer_map.dirty_count(),
                    _ => return, // not for the exchange running now
                };
                if count != dirty_regions {
                    log::error!("peer bitmap incomplete (expected={dirty_regions} got={count}); exchanging again");
                    self.start_pairing();
                    return;
                }
                if !self.is_leader() {
                    self.send_exchange(Exchange::Reply);
                }
                self.decide();
            }
            Message::Stream {
                seq,
                acked_below,
                body,
            } => self.handle_stream(seq, acked_below, body),
            Message::Ack { seq, status, value } => self.handle_ack(seq, status, value),
            Message::Handover { epoch } => self.handle_handover(epoch),
            Message::SwitchoverRequest => {
                let reply = self.start_switchover();
                log::info!("switchover requested by the peer: {}", reply.1);
            }
            Message::ResolveSplitBrain { keep } => {
                if keep == self.settings.node_name {
                    log::warn!(
                        "the peer discards its data in favour of this node's (resolve-split-brain)"
                    );
                } else if keep == self.settings.peer_name {
                    self.discard_own_data();
                } else {
                    log::error!("resolve-split-brain from the peer names an unknown node '{keep}'");
                }
            }
        }
    }

    fn handle_peer_state(&mut self, state: PeerState) {
        let leader = self.is_leader();
        let peer_boot = match &self.pairing {
            Pairing::Paired { peer_boot } | Pairing::Refused { peer_boot, .. } => Some(*peer_boot),
            _ => None,
        };
        match state.exchange {
            Exchange::Start if !leader => {
                // This node asked for a start (its request, or a timed-out exchange): the
                // leader's current one is welcome again.
                let asked = matches!(self.pairing, Pairing::Exchanging { peer: None, .. })
                    && state.exchange_id >= self.exchange_id;
                let newer = self.peer_state.as_ref().is_none_or(|p| {
                    p.boot_id != state.boot_id || state.exchange_id > self.exchange_id
                }) || state.exchange_id > self.exchange_id
                    || asked;
                if !newer {
                    return;
                }
                if self.freeze_until.is_some() {
                    // Degrading: this node asks for an exchange once it is done.
                    return;
                }
                if peer_boot.is_some() {
                    self.end_pairing("the peer started a new exchange");
                    if self.freeze_until.is_some() {
                        return;
                    }
                }
                self.exchange_id = state.exchange_id;
                self.reset_stream();
                self.elect_me = None;
                self.peer_state = Some(state.clone());
                self.pairing = Pairing::Exchanging {
                    peer: Some(state),
                    peer_map: Box::new(DirtyMap::for_layout(&self.layout)),
                    since: self.now,
                };
                return;
            }
            Exchange::Reply if leader => {
                if let Pairing::Exchanging { peer, peer_map, .. } = &mut self.pairing {
                    if state.exchange_id == self.exchange_id {
                        *peer = Some(state.clone());
                        peer_map.clear_all();
                        self.peer_state = Some(state);
                    }
                }
                return;
            }
            Exchange::Request if leader => {
                let start_outstanding =
                    matches!(self.pairing, Pairing::Exchanging { peer: None, .. });
                if start_outstanding {
                    // The follower may have passed over this start (it was degrading, or the
                    // start was lost): the same start again. A follower that took the first
                    // ignores the second (same exchange id), and its bitmap runs land in a
                    // pairing already decided.
                    self.send_exchange(Exchange::Start);
                } else {
                    if peer_boot.is_some() {
                        self.end_pairing("the peer asked for a new exchange");
                    }
                    self.peer_state = Some(state);
                    self.start_pairing();
                }
                return;
            }
            Exchange::Start | Exchange::Reply | Exchange::Request => {
                log::error!(
                    "peer sent an exchange step that only the other side sends; ignoring it"
                );
                return;
            }
            Exchange::Update => {}
        }
        if peer_boot.is_some_and(|boot| boot != state.boot_id) {
            // The peer restarted: whatever it had not acknowledged is gone with it.
            self.end_pairing("the peer restarted");
            self.peer_state = Some(state);
            self.start_pairing();
            return;
        }
        self.peer_state = Some(state.clone());
        if state.role == WireRole::Primary && self.role == Role::Primary {
            // Two primaries (rule 8): the lower (epoch, name) demotes.
            let mine = (self.sb.epoch, self.settings.node_name.as_str());
            let theirs = (state.epoch, self.settings.peer_name.as_str());
            if mine < theirs {
                log::error!("the peer is primary too, with a higher epoch: demoting (rule 8)");
                self.demote();
            } else {
                log::error!("the peer is primary too; it has the lower epoch and demotes (rule 8)");
            }
        }
        if state.epoch > self.sb.epoch && self.role != Role::Primary {
            self.sb.epoch = state.epoch;
        }
        self.elect();
    }

    /// Both states and bitmaps are in: the one decision.
    fn decide(&mut self) {
        let Pairing::Exchanging {
            peer: Some(peer),
            peer_map,
            ..
        } = std::mem::replace(&mut self.pairing, Pairing::None)
        else {
            return;
        };
        let local = GenerationState {
            generations: self.generations_now(),
            disk: self.disk,
            never_written: self.sb.has_flag(flags::NEVER_WRITTEN),
            crashed_primary: !self.crashed_extents.is_empty(),
        };
        let remote = GenerationState {
            generations: peer.generations,
            disk: peer.disk,
            never_written: peer.never_written,
            crashed_primary: peer.crashed_primary,
        };
        let decision: Decision = generation::decide(&local, &remote, self.settings.preferred);
        let peer_boot = peer.boot_id;
        // The union of both bitmaps (plus the crashed primary's extents, already in each own
        // map): the regions that may differ.
        let mut union = DirtyMap::for_layout(&self.layout);
        union.union_with(&self.map);
        union.union_with(&peer_map);
        log::info!(
            "paired with the peer: {} (rule={} peer_current={:#x} current={:#x} differing_bytes={})",
            decision_text(decision.sync),
            decision.rule,
            peer.generations.current,
            local.generations.current,
            union.dirty_bytes()
        );
        self.peer_state = Some(peer.clone());
        self.refusal = None;
        let source = match decision.sync {
            SyncDecision::InSync => {
                if union.dirty_count() > 0 {
                    // Regions that may differ (a crashed primary's, or a resync whose end one
                    // side missed): copy them from the side the decision names, else the
                    // primary, else the preferred node.
                    Some(decision.resync_activity_log_from.unwrap_or_else(|| {
                        if self.role == Role::Primary {
                            Side::Local
                        } else if peer.role == WireRole::Primary {
                            Side::Peer
                        } else if self.settings.preferred {
                            Side::Local
                        } else {
                            Side::Peer
                        }
                    }))
                } else {
                    None
                }
            }
            SyncDecision::BitmapResync { source } | SyncDecision::FullResync { source } => {
                Some(source)
            }
            refused @ (SyncDecision::SplitBrain
            | SyncDecision::Unrelated
            | SyncDecision::NoEligibleSource) => {
                let text = match refused {
                    SyncDecision::SplitBrain => format!(
                        "split brain: both nodes wrote alone ({} bytes diverged); resolve with 'resolve-split-brain --keep NODE'",
                        union.dirty_bytes()
                    ),
                    SyncDecision::Unrelated => "the peer holds another volume (no common generation): not mirroring; re-initialize the device to overwrite".to_string(),
                    _ => "no node may be a resync source (disk states contradict the generations): not mirroring; the operator decides".to_string(),
                };
                log::error!("refusing to mirror: {text}");
                self.refusal = Some(text);
                self.pairing = Pairing::Refused {
                    peer_boot,
                    decision: refused,
                };
                return;
            }
        };
        self.pairing = Pairing::Paired { peer_boot };
        self.crashed_extents.clear();
        // Rule 7, decided here on the exchanged states so both nodes agree: the resync source
        // promotes; in sync, the preferred node, else the last primary, else the first name.
        self.elect_me = Some(match source {
            Some(side) => side == Side::Local,
            None => {
                if self.settings.preferred {
                    true
                } else if self.settings.peer_preferred {
                    false
                } else if self.sb.epoch != peer.epoch {
                    self.sb.epoch > peer.epoch
                } else {
                    self.is_leader()
                }
            }
        });
        let full = matches!(decision.sync, SyncDecision::FullResync { .. });
        match source {
            None => {
                // In sync: both copies are the same; a bitmap base left from an earlier resync
                // is no longer needed.
                let mut g = self.generations_now();
                if g.bitmap != 0 {
                    g.resync_finished_as_source();
                    self.set_generations(g);
                    self.set_flag(flags::PEER_OUTDATED, false);
                    self.persist_superblock();
                }
                self.set_disk(DiskFreshness::UpToDate);
                if self.role == Role::Primary {
                    self.mirroring = true;
                }
            }
            Some(Side::Local) => {
                self.map.clear_all();
                if full {
                    self.map.mark_all();
                } else {
                    self.map.union_with(&union);
                }
                let new_id = self.fresh_id(Some(peer.generations));
                let mut g = self.generations_now();
                if !matches!(decision.sync, SyncDecision::InSync) {
                    g.begin_resync_as_source(&peer.generations, new_id);
                }
                self.set_generations(g);
                self.persist_bitmap();
                self.persist_superblock();
                self.set_disk(DiskFreshness::UpToDate);
                let total = self.map.dirty_bytes();
                log::info!("resync starting as source (total_bytes={total} full={full})");
                self.resync = Some(Resync {
                    id: self.new_resync_id(),
                    total_bytes: total,
                    ..Resync::default()
                });
                if self.role == Role::Primary {
                    self.mirroring = true;
                }
            }
            Some(Side::Peer) => {
                if self.role == Role::Primary {
                    log::error!(
                        "the peer holds newer data: this primary demotes and receives a resync"
                    );
                    self.demote();
                }
                self.map.clear_all();
                self.persist_bitmap();
                // Inconsistent until the resync ends, also when only the regions of a crashed
                // primary's activity log are copied: should the source crash mid-way, this
                // copy must never become the source of the next pairing.
                self.set_disk(DiskFreshness::Inconsistent);
                self.syncing = true;
                log::info!("resync starting as target");
            }
        }
        // Tell the peer where this node stands now (disk state, generations).
        self.send_state(Exchange::Update);
        self.elect();
    }

    /// Rule 7: two connected secondaries with no primary; the node the decision named
    /// promotes.
    fn elect(&mut self) {
        if self.role != Role::Secondary || self.elect_me != Some(true) {
            return;
        }
        if !matches!(self.pairing, Pairing::Paired { .. }) {
            return;
        }
        let Some(peer) = &self.peer_state else { return };
        if peer.role == WireRole::Primary || self.maintenance || peer.maintenance {
            return;
        }
        if self.disk != DiskFreshness::UpToDate || self.syncing {
            return;
        }
        let peer_epoch = peer.epoch;
        log::info!("election: no primary in the pair; this node promotes (rule 7)");
        self.promote(peer_epoch);
    }

    fn promote(&mut self, peer_epoch: u64) {
        self.sb.epoch = self.sb.epoch.max(peer_epoch) + 1;
        self.sb.epoch_node.clear();
        let _ = self.sb.epoch_node.push_str(&self.settings.node_name);
        self.set_flag(flags::WAS_PRIMARY, true);
        self.persist_superblock();
        self.role = Role::Primary;
        self.outdate_at = None;
        self.mirroring = matches!(self.pairing, Pairing::Paired { .. });
        self.next_seq = self.next_seq.max(1);
        log::warn!("role changed to primary (epoch={})", self.sb.epoch);
        if self.settings.cluster_ip {
            self.fo.holds_ip = true;
            self.outputs.push_back(EngineOutput::ClusterIp(true));
        }
        self.outputs.push_back(EngineOutput::Serving(true));
        self.send_state(Exchange::Update);
    }

    fn demote(&mut self) {
        if self.role != Role::Primary {
            return;
        }
        self.role = Role::Secondary;
        self.mirroring = false;
        self.switching = false;
        // Writes in flight may have reached this disk and not the peer's.
        self.mark_unacked_client_writes();
        self.persist_bitmap();
        self.set_flag(flags::WAS_PRIMARY, false);
        self.persist_superblock();
        if self.fo.holds_ip {
            self.fo.holds_ip = false;
            self.outputs.push_back(EngineOutput::ClusterIp(false));
        }
        self.outputs.push_back(EngineOutput::Serving(false));
        // Requests that never started are refused; those in flight finish.
        for (tag, request) in std::mem::take(&mut self.waiting) {
            self.fail_request(tag, request, errno::ESHUTDOWN);
        }
        if let Some(resync) = self.resync.take() {
            self.map.abort_all_resyncs();
            self.last_resync.done_bytes = resync.done_bytes;
        }
        log::warn!("role changed to secondary (epoch={})", self.sb.epoch);
        self.send_state(Exchange::Update);
    }

    /// Fails every client request in flight (this node demoted with them held): a request
    /// whose disk part is done is failed now, the others when their completion arrives.
    fn abandon_client_requests(&mut self) {
        for (tag, req) in std::mem::take(&mut self.reqs) {
            if let Some(range) = req.range {
                if req.in_al {
                    self.al.end_write(range.0, range.1);
                }
            }
            match req.local {
                Some(done) => {
                    let done = shut_down(done);
                    self.outputs.push_back(EngineOutput::Done { tag, done });
                }
                None => {
                    self.abandoned.insert(tag);
                }
            }
        }
        self.active_ranges.clear();
        self.unacked
            .retain(|_, u| !matches!(u.purpose, Purpose::Client(_)));
    }

    fn fail_request(&mut self, tag: u64, request: VolumeRequest, error: u32) {
        let buf = match request {
            VolumeRequest::Read { buf, .. } | VolumeRequest::Write { buf, .. } => Some(buf),
            _ => None,
        };
        self.outputs.push_back(EngineOutput::Done {
            tag,
            done: VolumeDone::Failed { error, buf },
        });
    }

    // ---- the primary's write path --------------------------------------------------------

    /// A volume request from the NBD server (only a primary's server serves).
    pub fn submit(&mut self, tag: u64, request: VolumeRequest, now: Instant) {
        self.advance(now);
        if self.role != Role::Primary {
            self.fail_request(tag, request, errno::ESHUTDOWN);
            return;
        }
        self.waiting.push_back((tag, request));
        self.admit_waiting();
        self.pump();
    }

    fn admit_waiting(&mut self) {
        if self.freeze_until.is_some() || self.switching {
            return;
        }
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        let mut kept = VecDeque::new();
        while let Some((tag, request)) = self.waiting.pop_front() {
            let range = request_range(&request);
            let conflict = range.is_some_and(|r| {
                self.active_ranges.iter().any(|&a| overlaps(a, r))
                    || blocked.iter().any(|&b| overlaps(b, r))
            });
            if conflict {
                if let Some(r) = range {
                    blocked.push(r);
                }
                kept.push_back((tag, request));
                continue;
            }
            if let Some((offset, len)) = range {
                match self.al.begin_write(offset, len) {
                    AlBegin::Ready => {}
                    AlBegin::NeedsCommit { .. } => self.commit_al(),
                    AlBegin::Full => {
                        blocked.push((offset, len));
                        kept.push_back((tag, request));
                        continue;
                    }
                }
            }
            self.issue(tag, request, range);
        }
        self.waiting = kept;
    }

    /// Writes the activity log's next transaction synchronously (see `activity_log`).
    fn commit_al(&mut self) {
        let mut record = [0u8; AL_RECORD_BYTES];
        while let Some(transaction) = self.al.next_transaction(&mut record) {
            if !transaction.evicted_extents.is_empty() {
                self.persist_bitmap();
            }
            self.outputs.push_back(EngineOutput::Metadata {
                offset: self.layout.activity_log_offset + transaction.record_offset,
                bytes: record.to_vec(),
                flush_first: true,
            });
            self.al.commit_durable(transaction.transaction_number);
        }
    }

    fn issue(&mut self, tag: u64, request: VolumeRequest, range: Option<(u64, u64)>) {
        let body = match &request {
            VolumeRequest::Write { offset, buf, fua } => Some(StreamBody::Write {
                offset: *offset,
                fua: *fua,
                data: buf.as_slice().to_vec(),
            }),
            VolumeRequest::Trim { offset, len, fua } => Some(StreamBody::Trim {
                offset: *offset,
                len: *len,
                fua: *fua,
            }),
            VolumeRequest::WriteZeroes {
                offset,
                len,
                may_deallocate,
                fua,
            } => Some(StreamBody::Zeroes {
                offset: *offset,
                len: *len,
                fua: *fua,
                may_deallocate: *may_deallocate,
            }),
            VolumeRequest::Flush => Some(StreamBody::Flush),
            _ => None,
        };
        let mut peer_pending = false;
        let mirrored = self.mirroring;
        if let Some(body) = body {
            if range.is_some() {
                self.before_data_write();
            }
            if self.mirroring {
                if let Some((offset, len)) = range {
                    self.map.note_replicated_write(offset, len);
                }
                // Kept until the peer acknowledges it, or the degrade procedure accounts for
                // it: never acknowledged to the client on the local disk alone.
                self.send_stream(body, Purpose::Client(tag));
                peer_pending = true;
            } else if let Some((offset, len)) = range {
                // Alone: the regions are dirty. In memory only: the activity log already names
                // their extent durably (a crash marks every active extent dirty at the next
                // start), and an extent leaves the log only after its bitmap blocks are
                // written (`commit_al`).
                self.map.note_write(offset, len);
            }
        }
        if let Some(range) = range {
            self.active_ranges.push(range);
        }
        self.reqs.insert(
            tag,
            ClientReq {
                range,
                local: None,
                peer_pending,
                in_al: range.is_some(),
                mirrored,
            },
        );
        let request = crate::node::volume_to_disk(request);
        self.outputs.push_back(EngineOutput::Disk { tag, request });
    }

    /// Sends a stream message and keeps it until acknowledged. Without a link up it is only
    /// kept: the pairing is ending, and the degrade procedure accounts for it. False when it
    /// could not be sent.
    fn send_stream(&mut self, body: StreamBody, purpose: Purpose) -> bool {
        let seq = self.next_seq;
        self.next_seq += 1;
        let acked_below = self.unacked.keys().next().copied().unwrap_or(seq);
        let message = Message::Stream {
            seq,
            acked_below,
            body,
        };
        let sent_on = self.send(&message);
        let Message::Stream { body, .. } = message else {
            unreachable!()
        };
        if sent_on.is_none() && !matches!(purpose, Purpose::Client(_)) {
            // Background work (resync, verify) is simply redone in the next pairing.
            return false;
        }
        self.unacked.insert(
            seq,
            Unacked {
                body,
                link: sent_on.unwrap_or(LinkKind::Heartbeat),
                sent_at: self.now,
                purpose,
            },
        );
        sent_on.is_some()
    }

    /// A link went down: what was last sent on it goes again on the link that is left.
    fn resend_from(&mut self, down: LinkKind) {
        let Some(link) = self.stream_link() else {
            return;
        };
        let acked_below = self.unacked.keys().next().copied().unwrap_or(self.next_seq);
        let seqs: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.link == down)
            .map(|(s, _)| *s)
            .collect();
        if !seqs.is_empty() {
            log::warn!(
                "stream moves to the {link} link: resending {} messages",
                seqs.len()
            );
        }
        for seq in seqs {
            let Some(unacked) = self.unacked.remove(&seq) else {
                continue;
            };
            let message = Message::Stream {
                seq,
                acked_below,
                body: unacked.body,
            };
            let (header, payload) = message.encode();
            let sent = self.links.send(link, message.kind(), &header, payload);
            let Message::Stream { body, .. } = message else {
                unreachable!()
            };
            self.unacked.insert(
                seq,
                Unacked {
                    body,
                    link: if sent { link } else { down },
                    // The acknowledgement timeout counts from this send.
                    sent_at: if sent { self.now } else { unacked.sent_at },
                    purpose: unacked.purpose,
                },
            );
        }
    }

    fn handle_ack(&mut self, seq: u64, status: u32, value: u64) {
        let Some(unacked) = self.unacked.remove(&seq) else {
            return; // a duplicate, or from before a degrade
        };
        match unacked.purpose.clone() {
            Purpose::Client(tag) => {
                if status != 0 {
                    // The peer's copy misses this write: it stays held, and the degrade
                    // procedure marks it dirty before anything is acknowledged alone.
                    log::error!("the peer failed a mirrored write (errno={status}); its copy is no longer current");
                    self.unacked.insert(seq, unacked);
                    self.peer_disk_failed();
                    return;
                }
                if let Some(req) = self.reqs.get_mut(&tag) {
                    req.peer_pending = false;
                }
                self.try_finish(tag);
            }
            Purpose::ResyncData {
                first,
                count,
                resync_id,
            } => {
                let Some(resync) = self.resync_if(resync_id) else {
                    return; // an abandoned resync: its regions were released then
                };
                resync.sent -= 1;
                if status == 0 {
                    resync.written.extend(first..first + count);
                } else {
                    for region in first..first + count {
                        self.map.resync_aborted(region);
                    }
                    log::error!("the peer failed a resync write (errno={status})");
                }
            }
            Purpose::ResyncFlush { regions, resync_id } => {
                if self.resync_if(resync_id).is_none() {
                    return;
                }
                let region_bytes = self.map.region_bytes();
                let volume = self.map.volume_bytes();
                let mut cleared = 0;
                for region in regions {
                    if status == 0 {
                        if self.map.resync_durable(region) {
                            cleared += (volume - region * region_bytes).min(region_bytes);
                        }
                    } else {
                        self.map.resync_aborted(region);
                    }
                }
                if let Some(resync) = self.resync.as_mut() {
                    resync.flush_in_flight = false;
                    resync.done_bytes += cleared;
                }
                self.persist_bitmap();
            }
            Purpose::ResyncDone => {
                let mut g = self.generations_now();
                g.resync_finished_as_source();
                self.set_generations(g);
                self.set_flag(flags::PEER_OUTDATED, false);
                self.persist_superblock();
                if let Some(resync) = self.resync.take() {
                    log::info!(
                        "resync finished (bytes={} peer={})",
                        resync.done_bytes,
                        self.settings.peer_name
                    );
                    self.last_resync = ResyncProgress {
                        running: false,
                        done_bytes: resync.done_bytes,
                        total_bytes: resync.total_bytes.max(resync.done_bytes),
                        elapsed_ms: self.now.millis_since(resync.started_at),
                    };
                }
            }
            Purpose::Verify { offset, len } => {
                if let Some(verify) = self.verify.as_mut() {
                    let entry = verify.halves.entry(offset).or_default();
                    entry.1 = Some(if status == 0 { value } else { !0 });
                }
                self.check_verify(offset, len);
            }
        }
    }

    fn peer_disk_failed(&mut self) {
        // The peer's copy misses a write: mirroring ends here and the dirty bitmap carries the
        // difference (the degrade procedure, at once: the peer is alive and knows).
        self.links.drop_all("the peer's disk failed a write");
        self.process_link_events();
    }

    /// Finishes a client request whose local and peer parts are both done.
    fn try_finish(&mut self, tag: u64) {
        if self.freeze_until.is_some() {
            return; // held: nothing is acknowledged while degrading
        }
        let Some(req) = self.reqs.get(&tag) else {
            return;
        };
        if req.local.is_none() || req.peer_pending {
            return;
        }
        if req.mirrored && self.mirroring && !self.lease_valid() {
            // Rule 1: the peer has not heard this node within the dead time (a stall, or a
            // link going quiet): held until the lease is renewed or the degrade procedure
            // decides.
            self.fo.lease_held = true;
            return;
        }
        let Some(req) = self.reqs.remove(&tag) else {
            return;
        };
        if let Some(range) = req.range {
            if let Some(i) = self.active_ranges.iter().position(|&a| a == range) {
                self.active_ranges.swap_remove(i);
            }
            if req.in_al {
                self.al.end_write(range.0, range.1);
            }
        }
        if let Some(done) = req.local {
            self.outputs.push_back(EngineOutput::Done { tag, done });
        }
        self.admit_waiting();
    }

    /// A disk request finished.
    pub fn handle_disk_completion(&mut self, completion: DiskCompletion, now: Instant) {
        self.advance(now);
        if completion.tag & TAG_INTERNAL != 0 {
            self.internal_done(completion);
        } else {
            let tag = completion.tag;
            let done = crate::node::volume_done(completion);
            if self.abandoned.remove(&tag) {
                let done = shut_down(done);
                self.outputs.push_back(EngineOutput::Done { tag, done });
                self.pump();
                return;
            }
            match self.reqs.get_mut(&tag) {
                Some(req) => {
                    let failed_range = match done {
                        VolumeDone::Failed { .. } => req.range,
                        _ => None,
                    };
                    req.local = Some(done);
                    if let Some((offset, len)) = failed_range {
                        // Rule 10: the client gets the error, but the peer may have applied
                        // the write. The regions differ now: the resync copies this disk's
                        // version over the peer's, so the replicas converge.
                        log::error!("disk: a write failed on this disk (offset={offset} len={len}); its regions will be resynced to the peer");
                        self.map.note_write(offset, len);
                        self.persist_bitmap();
                    }
                    self.try_finish(tag);
                }
                None => self.outputs.push_back(EngineOutput::Done { tag, done }),
            }
        }
        self.pump();
    }

    fn internal_tag(&mut self, what: Internal) -> u64 {
        self.next_internal = (self.next_internal + 1) % TAG_INTERNAL;
        let tag = TAG_INTERNAL | self.next_internal;
        self.internal.insert(tag, what);
        tag
    }

    fn internal_done(&mut self, completion: DiskCompletion) {
        let Some(what) = self.internal.remove(&completion.tag) else {
            log::error!("disk: completion of an unknown internal request");
            return;
        };
        let failed = completion.result.is_err();
        match what {
            Internal::Apply { seq, range, verify } => {
                self.applies_in_flight -= 1;
                if let Some(range) = range {
                    if let Some(i) = self.applying_ranges.iter().position(|&a| a == range) {
                        self.applying_ranges.swap_remove(i);
                    }
                }
                let (status, value) = match completion.result {
                    Ok(DiskDone::Buf(buf)) if verify => (0, digest(buf.as_slice())),
                    Ok(_) => (0, 0),
                    Err(e) => {
                        log::error!("disk: a mirrored request failed (error={e}); this copy is no longer current");
                        (errno::EIO, 0)
                    }
                };
                if status != 0 && self.disk == DiskFreshness::UpToDate {
                    self.set_disk(DiskFreshness::Outdated);
                }
                self.applied_status.insert(seq, (status, value));
                self.send_ack(&Message::Ack { seq, status, value });
                self.drain_apply_waiting();
            }
            Internal::ResyncRead {
                first,
                count,
                resync_id,
            } => {
                let range = self.chunk_range(first, count);
                if let Some(i) = self.active_ranges.iter().position(|&a| a == range) {
                    self.active_ranges.swap_remove(i);
                }
                let Some(resync) = self.resync_if(resync_id) else {
                    self.admit_waiting();
                    return; // an abandoned resync: its regions were released then
                };
                resync.reading -= 1;
                let sent = match completion.result {
                    Ok(DiskDone::Buf(buf)) if !failed => {
                        let body = StreamBody::ResyncData {
                            offset: range.0,
                            data: buf.as_slice().to_vec(),
                        };
                        self.send_stream(
                            body,
                            Purpose::ResyncData {
                                first,
                                count,
                                resync_id,
                            },
                        )
                    }
                    _ => {
                        log::error!("disk: a resync read failed (offset={})", range.0);
                        false
                    }
                };
                if sent {
                    if let Some(resync) = self.resync.as_mut() {
                        resync.sent += 1;
                    }
                } else {
                    for region in first..first + count {
                        self.map.resync_aborted(region);
                    }
                }
                // Only now may a client write that waited for this range go: its stream
                // message must come after the data read before it, or the peer, which applies
                // in stream order, would put the older data over the acknowledged write.
                self.admit_waiting();
            }
            Internal::VerifyRead { offset, len } => {
                let range = (offset, len);
                if let Some(i) = self.active_ranges.iter().position(|&a| a == range) {
                    self.active_ranges.swap_remove(i);
                }
                let value = match completion.result {
                    Ok(DiskDone::Buf(buf)) => digest(buf.as_slice()),
                    _ => !1,
                };
                if let Some(verify) = self.verify.as_mut() {
                    verify.halves.entry(offset).or_default().0 = Some(value);
                }
                self.check_verify(offset, len);
                self.admit_waiting();
            }
        }
    }

    /// The bytes of `count` regions from `first` (the last region of the volume may be short).
    fn chunk_range(&self, first: u64, count: u64) -> (u64, u64) {
        let region_bytes = self.map.region_bytes();
        let offset = first * region_bytes;
        (
            offset,
            (count * region_bytes).min(self.map.volume_bytes() - offset),
        )
    }

    /// Whether a client request, a resync read or a verify read holds part of `range`, or a
    /// client request waits for it.
    fn client_holds(&self, range: (u64, u64)) -> bool {
        self.active_ranges.iter().any(|&a| overlaps(a, range))
            || self
                .waiting
                .iter()
                .any(|(_, r)| request_range(r).is_some_and(|r| overlaps(r, range)))
    }

    // ---- the secondary's side of the stream ----------------------------------------------

    fn handle_stream(&mut self, seq: u64, acked_below: u64, body: StreamBody) {
        if self.role == Role::Primary {
            log::error!("stream message from the peer while this node is primary; ignoring it");
            return;
        }
        // Statuses below `acked_below` reached the primary: forget them.
        while let Some((&first, _)) = self.applied_status.first_key_value() {
            if first >= acked_below {
                break;
            }
            self.applied_status.remove(&first);
        }
        if seq < self.next_expected {
            if let Some(&(status, value)) = self.applied_status.get(&seq) {
                self.send_ack(&Message::Ack { seq, status, value });
            }
            return;
        }
        if seq > self.next_expected {
            if self.reorder.len() >= REORDER_MAX {
                log::error!(
                    "the replication stream has a gap that does not close; dropping the links"
                );
                self.links.drop_all("stream gap");
                self.process_link_events();
                return;
            }
            self.reorder.insert(seq, body);
            return;
        }
        self.apply_in_order(seq, body);
        while let Some(body) = self.reorder.remove(&self.next_expected) {
            let seq = self.next_expected;
            self.apply_in_order(seq, body);
        }
    }

    fn apply_in_order(&mut self, seq: u64, body: StreamBody) {
        self.next_expected = seq + 1;
        self.apply_waiting.push_back((seq, body));
        self.drain_apply_waiting();
    }

    fn drain_apply_waiting(&mut self) {
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        let mut kept = VecDeque::new();
        while let Some((seq, body)) = self.apply_waiting.pop_front() {
            let range = match &body {
                StreamBody::Write { offset, data, .. }
                | StreamBody::ResyncData { offset, data } => Some((*offset, data.len() as u64)),
                StreamBody::Trim { offset, len, .. }
                | StreamBody::Zeroes { offset, len, .. }
                | StreamBody::Verify { offset, len } => Some((*offset, *len)),
                _ => None,
            };
            // A flush or the end of a resync comes after everything before it.
            let barrier = matches!(body, StreamBody::ResyncDone { .. });
            let conflict = range.is_some_and(|r| {
                self.applying_ranges.iter().any(|&a| overlaps(a, r))
                    || blocked.iter().any(|&b| overlaps(b, r))
            }) || (barrier && (self.applies_in_flight > 0 || !blocked.is_empty()));
            if conflict {
                blocked.push(range.unwrap_or((0, u64::MAX / 2)));
                kept.push_back((seq, body));
                continue;
            }
            self.apply(seq, body, range);
        }
        self.apply_waiting = kept;
    }

    fn apply(&mut self, seq: u64, body: StreamBody, range: Option<(u64, u64)>) {
        if let Some((offset, len)) = range {
            if offset
                .checked_add(len)
                .is_none_or(|end| end > self.layout.volume_bytes)
            {
                log::error!("the peer sent a request past the end of the volume (offset={offset} len={len})");
                self.applied_status.insert(seq, (errno::EINVAL, 0));
                self.send_ack(&Message::Ack {
                    seq,
                    status: errno::EINVAL,
                    value: 0,
                });
                return;
            }
        }
        let (request, verify) = match body {
            StreamBody::Write { offset, fua, data } => {
                self.before_data_write();
                (
                    DiskRequest::Write {
                        offset,
                        buf: buf_from(&data),
                        fua,
                    },
                    false,
                )
            }
            StreamBody::ResyncData { offset, data } => {
                self.before_data_write();
                (
                    DiskRequest::Write {
                        offset,
                        buf: buf_from(&data),
                        fua: false,
                    },
                    false,
                )
            }
            StreamBody::Trim { offset, len, fua } => {
                self.before_data_write();
                (DiskRequest::Discard { offset, len, fua }, false)
            }
            StreamBody::Zeroes {
                offset,
                len,
                fua,
                may_deallocate,
            } => {
                self.before_data_write();
                (
                    DiskRequest::WriteZeroes {
                        offset,
                        len,
                        may_deallocate,
                        fua,
                    },
                    false,
                )
            }
            StreamBody::Flush => (DiskRequest::Flush, false),
            StreamBody::Verify { offset, len } => {
                let mut buf = IoBuf::new(len as usize);
                buf.set_len(len as usize);
                (DiskRequest::Read { offset, buf }, true)
            }
            StreamBody::ResyncDone { generations } => {
                self.finish_resync_as_target(generations);
                self.applied_status.insert(seq, (0, 0));
                self.send_ack(&Message::Ack {
                    seq,
                    status: 0,
                    value: 0,
                });
                return;
            }
        };
        if let Some(range) = range {
            self.applying_ranges.push(range);
        }
        self.applies_in_flight += 1;
        let tag = self.internal_tag(Internal::Apply { seq, range, verify });
        self.outputs.push_back(EngineOutput::Disk { tag, request });
    }

    fn finish_resync_as_target(&mut self, source: Generations) {
        let mut g = self.generations_now();
        g.resync_finished_as_target(&source);
        self.set_generations(g);
        if let Some(peer_volume) = self.links.peer_volume_id() {
            if peer_volume != self.sb.volume_id {
                log::info!("adopting the peer's volume identity");
                self.sb.volume_id = peer_volume;
            }
        }
        self.syncing = false;
        self.disk = DiskFreshness::UpToDate;
        self.set_flag(flags::DISK_INCONSISTENT, false);
        self.set_flag(flags::DISK_OUTDATED, false);
        self.persist_superblock();
        log::info!(
            "resync finished: this disk is up to date (generation={:#x})",
            source.current
        );
        self.send_state(Exchange::Update);
    }

    // ---- resync and verify (the primary drives both) -------------------------------------

    /// Moves work forward after every input: the failover rules, then (on a mirroring
    /// primary) resync and verify requests and a switchover's drain.
    fn pump(&mut self) {
        self.check_failover();
        if self.role != Role::Primary || !self.mirroring || self.freeze_until.is_some() {
            return;
        }
        self.pump_resync();
        self.pump_verify();
        if self.switching {
            self.continue_switchover();
        }
    }

    fn pump_resync(&mut self) {
        if self.resync.is_none()
            && self.map.dirty_count() > 0
            && matches!(self.pairing, Pairing::Paired { .. })
        {
            // Regions marked since (a verify mismatch): resync them.
            let total = self.map.dirty_bytes();
            log::info!("resync starting (total_bytes={total})");
            self.resync = Some(Resync {
                id: self.new_resync_id(),
                started_at: self.now,
                total_bytes: total,
                ..Resync::default()
            });
        }
        let Some(resync) = self.resync.as_ref() else {
            return;
        };
        if resync.done_sent {
            // Ending: regions marked since wait for the next resync (a read begun now would
            // complete after this resync is gone).
            return;
        }
        let busy = !self.reqs.is_empty();
        let window = if busy {
            RESYNC_WINDOW_BUSY
        } else {
            RESYNC_WINDOW_IDLE
        };
        let mut cursor = resync.cursor;
        let mut in_flight = resync.reading + resync.sent;
        let region_count = self.map.region_count();
        while in_flight < window {
            let Some(region) = self.map.next_dirty(cursor) else {
                break;
            };
            cursor = region + 1;
            if self.client_holds(self.chunk_range(region, 1)) {
                continue; // a client holds it: the next pass takes it
            }
            match self.map.begin_resync(region) {
                ResyncBegin::Started => {}
                ResyncBegin::Full => {
                    cursor = region;
                    break;
                }
                ResyncBegin::Clean | ResyncBegin::InFlight => continue,
            }
            // Dirty neighbours travel in the same message (fewer frames, acks and reads).
            let mut count = 1;
            while count < RESYNC_CHUNK_REGIONS
                && region + count < region_count
                && self.map.is_dirty(region + count)
                && !self.client_holds(self.chunk_range(region + count, 1))
                && self.map.begin_resync(region + count) == ResyncBegin::Started
            {
                count += 1;
            }
            cursor = region + count;
            let range = self.chunk_range(region, count);
            self.before_data_write();
            self.active_ranges.push(range);
            let mut buf = IoBuf::new(range.1 as usize);
            buf.set_len(range.1 as usize);
            let resync_id = self.resync.as_ref().map_or(0, |r| r.id);
            let tag = self.internal_tag(Internal::ResyncRead {
                first: region,
                count,
                resync_id,
            });
            self.outputs.push_back(EngineOutput::Disk {
                tag,
                request: DiskRequest::Read {
                    offset: range.0,
                    buf,
                },
            });
            in_flight += 1;
            if let Some(resync) = self.resync.as_mut() {
                resync.reading += 1;
            }
            if cursor >= region_count {
                break;
            }
        }
        let Some(resync) = self.resync.as_mut() else {
            return;
        };
        resync.cursor = cursor;
        let idle = resync.reading == 0 && resync.sent == 0;
        if !resync.flush_in_flight
            && !resync.written.is_empty()
            && (resync.written.len() >= RESYNC_FLUSH_EVERY || idle)
        {
            let regions = std::mem::take(&mut resync.written);
            resync.flush_in_flight = true;
            let resync_id = resync.id;
            if !self.send_stream(
                StreamBody::Flush,
                Purpose::ResyncFlush {
                    regions: regions.clone(),
                    resync_id,
                },
            ) {
                for region in regions {
                    self.map.resync_aborted(region);
                }
                if let Some(r) = self.resync.as_mut() {
                    r.flush_in_flight = false;
                }
            }
            return;
        }
        let Some(resync) = self.resync.as_mut() else {
            return;
        };
        if idle
            && !resync.flush_in_flight
            && resync.written.is_empty()
            && self.map.resync_in_flight_count() == 0
        {
            if self.map.dirty_count() > 0 {
                // Another pass, from the start, for the regions skipped or redone (at the next
                // event: a region a client holds frees up only when its request finishes).
                resync.cursor = 0;
                return;
            }
            if !resync.done_sent {
                resync.done_sent = true;
                let generations = self.generations_now();
                self.send_stream(StreamBody::ResyncDone { generations }, Purpose::ResyncDone);
            }
        }
    }

    fn pump_verify(&mut self) {
        let Some(verify) = self.verify.as_ref() else {
            return;
        };
        let mut cursor = verify.cursor;
        let mut in_flight = verify.in_flight;
        let step = self.map.region_bytes() * 16;
        let volume = self.layout.volume_bytes;
        while in_flight < 8 && cursor < volume {
            let len = step.min(volume - cursor);
            let range = (cursor, len);
            if self.client_holds(range) {
                break; // a client write holds it: come back after it
            }
            if !self.send_stream(
                StreamBody::Verify {
                    offset: cursor,
                    len,
                },
                Purpose::Verify {
                    offset: cursor,
                    len,
                },
            ) {
                break;
            }
            self.active_ranges.push(range);
            let mut buf = IoBuf::new(len as usize);
            buf.set_len(len as usize);
            let tag = self.internal_tag(Internal::VerifyRead {
                offset: cursor,
                len,
            });
            self.outputs.push_back(EngineOutput::Disk {
                tag,
                request: DiskRequest::Read {
                    offset: cursor,
                    buf,
                },
            });
            cursor += len;
            in_flight += 1;
        }
        if let Some(verify) = self.verify.as_mut() {
            verify.cursor = cursor;
            verify.in_flight = in_flight;
        }
        self.finish_verify_if_done();
    }

    fn check_verify(&mut self, offset: u64, len: u64) {
        let Some(verify) = self.verify.as_mut() else {
            return;
        };
        let Some(&(Some(local), Some(peer))) = verify.halves.get(&offset) else {
            return;
        };
        verify.halves.remove(&offset);
        verify.in_flight -= 1;
        verify.checked_bytes += len;
        if local != peer {
            log::error!(
                "verify: the copies differ (offset={offset} len={len}); the range will be resynced"
            );
            verify.mismatched_regions.push((offset, len));
            self.map.mark(offset, len);
            self.persist_bitmap();
        }
        self.finish_verify_if_done();
    }

    fn finish_verify_if_done(&mut self) {
        let done = self
            .verify
            .as_ref()
            .is_some_and(|v| v.cursor >= self.layout.volume_bytes && v.in_flight == 0);
        if done {
            if let Some(v) = self.verify.take() {
                log::info!(
                    "verify finished (checked_bytes={} mismatched_ranges={})",
                    v.checked_bytes,
                    v.mismatched_regions.len()
                );
                self.last_verify = Some((v.checked_bytes, v.mismatched_regions));
            }
        }
    }

    // ---- commands ------------------------------------------------------------------------

    /// `maintenance on|off`.
    pub fn set_maintenance(&mut self, on: bool) {
        if self.maintenance != on {
            self.maintenance = on;
            self.send_state(Exchange::Update);
        }
    }

    /// `verify`: (accepted, reply).
    pub fn start_verify(&mut self) -> (bool, String) {
        if self.role != Role::Primary {
            return (false, "verify: run it on the primary".to_string());
        }
        if !self.mirroring || !matches!(self.pairing, Pairing::Paired { .. }) {
            return (
                false,
                "verify: the peer is not connected and mirroring".to_string(),
            );
        }
        if self.resync.is_some() {
            return (
                false,
                "verify: a resync is running; verify after it".to_string(),
            );
        }
        if self.verify.is_some() {
            return (false, "verify: already running".to_string());
        }
        self.verify = Some(Verify::default());
        log::info!("verify started (volume_bytes={})", self.layout.volume_bytes);
        self.pump();
        (
            true,
            "verify started: progress and mismatches in 'status'".to_string(),
        )
    }

    /// `switchover`: (accepted, reply).
    pub fn start_switchover(&mut self) -> (bool, String) {
        let peer_ok = self.links.is_connected()
            && matches!(self.pairing, Pairing::Paired { .. })
            && self
                .peer_state
                .as_ref()
                .is_some_and(|p| p.disk == DiskFreshness::UpToDate);
        match self.role {
            Role::Secondary => {
                if !peer_ok || self.disk != DiskFreshness::UpToDate || self.syncing {
                    return (false, "switchover: this node is not eligible (it must be connected, in sync and up to date)".to_string());
                }
                if !self
                    .peer_state
                    .as_ref()
                    .is_some_and(|p| p.role == WireRole::Primary)
                {
                    return (false, "switchover: the peer is not primary".to_string());
                }
                self.send(&Message::SwitchoverRequest);
                (true, "switchover requested from the primary".to_string())
            }
            Role::Primary => {
                if !peer_ok || !self.mirroring {
                    return (
                        false,
                        "switchover: the peer is not eligible (connected, in sync and up to date)"
                            .to_string(),
                    );
                }
                if self.resync.is_some() {
                    return (
                        false,
                        "switchover: a resync is running; the peer is not up to date yet"
                            .to_string(),
                    );
                }
                if self.freeze_until.is_some() {
                    return (
                        false,
                        "switchover: the degrade procedure is running".to_string(),
                    );
                }
                self.switching = true;
                log::warn!(
                    "switchover started: draining writes, then handing the role to {}",
                    self.settings.peer_name
                );
                self.continue_switchover();
                (
                    true,
                    format!("switchover started: {} takes over", self.settings.peer_name),
                )
            }
            _ => (false, "switchover: not available".to_string()),
        }
    }

    fn continue_switchover(&mut self) {
        if !self.switching || !self.reqs.is_empty() || !self.unacked.is_empty() {
            return;
        }
        // Every write is on both disks and acknowledged; stop serving and hand over.
        let epoch = self.sb.epoch;
        self.demote();
        self.send(&Message::Handover { epoch });
        log::warn!(
            "switchover: handed the role to {} (epoch={epoch})",
            self.settings.peer_name
        );
    }

    fn handle_handover(&mut self, epoch: u64) {
        if self.role == Role::Secondary && self.disk == DiskFreshness::UpToDate && !self.syncing {
            log::warn!("the peer handed over its role: promoting");
            self.promote(epoch);
        } else {
            log::error!("the peer handed over its role but this node is not eligible");
        }
    }

    /// `promote --force`: (accepted, reply).
    pub fn force_promote(&mut self) -> (bool, String) {
        if self.role == Role::Primary {
            return (false, "promote: already primary".to_string());
        }
        if self.links.is_connected() {
            return (
                false,
                "promote --force: refused while the peer is connected (use switchover)".to_string(),
            );
        }
        if self.disk == DiskFreshness::Inconsistent {
            return (false, "promote --force: refused: this disk is inconsistent (a resync to it did not finish)".to_string());
        }
        let warning = match self.disk {
            DiskFreshness::Outdated => {
                " (warning: this disk was outdated; the peer may hold newer data)"
            }
            DiskFreshness::Consistent => {
                " (warning: this disk's freshness was never confirmed by the peer)"
            }
            _ => "",
        };
        log::warn!("forced promotion by the operator{warning}");
        let new_id = self.fresh_id(None);
        let mut g = self.generations_now();
        g.start_new_generation(new_id);
        self.set_generations(g);
        self.set_flag(flags::PEER_OUTDATED, true);
        self.disk = DiskFreshness::UpToDate;
        self.set_flag(flags::DISK_OUTDATED, false);
        let peer_epoch = self.peer_state.as_ref().map_or(0, |p| p.epoch);
        self.promote(peer_epoch);
        (true, format!("promoted to primary, serving alone{warning}"))
    }

    /// `resolve-split-brain --keep NODE`: (accepted, reply).
    pub fn resolve_split_brain(&mut self, keep: &str) -> (bool, String) {
        let is_split = matches!(
            self.pairing,
            Pairing::Refused {
                decision: SyncDecision::SplitBrain | SyncDecision::NoEligibleSource,
                ..
            }
        );
        if !is_split {
            return (
                false,
                "resolve-split-brain: no split brain is waiting for a decision".to_string(),
            );
        }
        if keep != self.settings.node_name && keep != self.settings.peer_name {
            return (
                false,
                format!(
                    "resolve-split-brain: unknown node '{keep}' (this pair is {} and {})",
                    self.settings.node_name, self.settings.peer_name
                ),
            );
        }
        self.send(&Message::ResolveSplitBrain {
            keep: keep.to_string(),
        });
        if keep == self.settings.node_name {
            log::warn!("split brain resolved by the operator: keeping this node's data");
            // The peer discards and both exchange again.
            (
                true,
                format!("keeping {keep}'s data; the peer's diverged regions will be overwritten"),
            )
        } else {
            self.discard_own_data();
            (
                true,
                format!("keeping {keep}'s data; this node's diverged regions will be overwritten"),
            )
        }
    }

    fn discard_own_data(&mut self) {
        log::warn!("split brain resolved by the operator: this node's data is discarded (diverged regions will be resynced)");
        self.demote();
        self.set_disk(DiskFreshness::Inconsistent);
        self.refusal = None;
        // A fresh exchange with the new disk state; the peer starts one when it sees our state.
        self.start_pairing();
    }

    /// The bitmap blocks not yet on disk, for a clean stop: a clean stop does not replay the
    /// activity log, so the bitmap must be whole before the volume is marked clean.
    pub fn take_bitmap_writes(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.mark_unacked_client_writes();
        let base = self.layout.bitmap_offset;
        self.map
            .take_changed_blocks()
            .map(|block| (base + block.offset_in_bitmap, block.bytes.to_vec()))
            .collect()
    }

    /// The superblock as it should be written at a clean stop.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }
}

/// The word for a disk freshness.
pub fn freshness_name(disk: DiskFreshness) -> &'static str {
    match disk {
        DiskFreshness::UpToDate => "uptodate",
        DiskFreshness::Consistent => "consistent",
        DiskFreshness::Outdated => "outdated",
        DiskFreshness::Inconsistent => "inconsistent",
    }
}

fn decision_text(sync: SyncDecision) -> &'static str {
    match sync {
        SyncDecision::InSync => "in sync",
        SyncDecision::BitmapResync {
            source: Side::Local,
        } => "bitmap resync from this node",
        SyncDecision::BitmapResync { source: Side::Peer } => "bitmap resync from the peer",
        SyncDecision::FullResync {
            source: Side::Local,
        } => "full resync from this node",
        SyncDecision::FullResync { source: Side::Peer } => "full resync from the peer",
        SyncDecision::SplitBrain => "split brain",
        SyncDecision::Unrelated => "unrelated volumes",
        SyncDecision::NoEligibleSource => "no eligible source",
    }
}
