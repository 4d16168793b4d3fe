//! The node: the one top-level sans-IO state machine the runtime drives.
//!
//! A node owns the NBD server and answers the console's commands. A standalone node maps its
//! volume requests straight onto the local disk; a node with a peer hands them to the
//! replication engine (`replication::engine::Mirror`), which owns the links to the peer, the
//! role and the disk state, and carries every write to both disks.
//!
//! Method kinds, in quinn's words: getters (`status`, `poll_timeout`), inputs (`handle_*`),
//! commands (`recycle`), outputs (`poll_output`). After any input the runtime drains
//! `poll_output` until it returns `None`.

use crate::console::{self, Command, CommandError};
use crate::nbd::{
    ConnId, ExportInfo, Head, Server, ServerCounters, ServerOutput, VolumeDone, VolumeRequest,
};
use crate::peer::link::{LinkConn, LinkInfo, LinkOutput, LinkSettings, LinkState, PeerLinks};
use crate::peer::{LinkKind, Role as LinkRole, PEER_NONCE_BYTES};
use crate::replication::engine::{EngineOutput, LoadedState, Mirror, MirrorSettings};
use crate::replication::wire::UplinkHealth;
use crate::time::Instant;
use crate::wire::nbd::errno;
use tandem_board::{DiskCompletion, DiskDone, DiskRequest, IoBuf};

/// The node's part in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves the volume and mirrors it to the peer.
    Primary,
    /// Receives the mirror; refuses NBD clients.
    Secondary,
    /// No peer configured: serves the volume alone.
    Standalone,
    /// Fenced itself; serves nothing.
    Fenced,
    /// No configuration yet.
    Unconfigured,
}

/// How current this node's copy of the data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// Known to hold the newest data.
    UpToDate,
    /// Whole, but freshness unknown until compared with the peer.
    Consistent,
    /// Known to be older than the peer's.
    Outdated,
    /// Partly written by a resync that has not finished.
    Inconsistent,
    /// Receiving a resync.
    Syncing,
    /// No local disk.
    Diskless,
}

/// What the node knows of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// At least one link is up both ways.
    Connected,
    /// Frames arrive, but no link is up both ways.
    Half,
    /// Nothing heard for the dead time.
    Lost,
    /// No peer configured.
    None,
}

impl Role {
    /// The word `status` (and its JSON) uses.
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Standalone => "standalone",
            Role::Fenced => "fenced",
            Role::Unconfigured => "unconfigured",
        }
    }
}

impl DiskState {
    /// The word `status` (and its JSON) uses.
    pub fn name(self) -> &'static str {
        match self {
            DiskState::UpToDate => "uptodate",
            DiskState::Consistent => "consistent",
            DiskState::Outdated => "outdated",
            DiskState::Inconsistent => "inconsistent",
            DiskState::Syncing => "syncing",
            DiskState::Diskless => "diskless",
        }
    }
}

impl PeerState {
    /// The word `status` (and its JSON) uses.
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Connected => "connected",
            PeerState::Half => "half",
            PeerState::Lost => "lost",
            PeerState::None => "none",
        }
    }
}

/// What the runtime must do for the node.
#[derive(Debug)]
pub enum Output {
    /// Send `head` then `data` to a client; give `data` back with [`Node::recycle`].
    Send {
        conn: ConnId,
        head: Head,
        data: Option<IoBuf>,
    },
    /// Submit a disk request; report its completion with the same tag.
    Disk { tag: u64, request: DiskRequest },
    /// Close a client connection once its queued bytes are sent.
    Close { conn: ConnId },
    /// Send bytes on a link to the peer.
    LinkSend { conn: LinkConn, bytes: Vec<u8> },
    /// Close a link connection (the runtime reconnects).
    LinkClose { conn: LinkConn },
    /// Write metadata synchronously (after an fdatasync when `flush_first`) and make it durable
    /// before carrying out any later output.
    Metadata {
        offset: u64,
        bytes: Vec<u8>,
        flush_first: bool,
    },
    /// Probe the cluster IP; report with [`Node::handle_cluster_ip_probe`].
    ProbeClusterIp,
    /// Add and announce (true) or drop (false) the cluster IP.
    ClusterIp(bool),
    /// Fence this node now (reboot, or exit 75 in test mode).
    Fence { reason: String },
}

/// Progress of the current or most recent resync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncProgress {
    /// Bytes copied so far.
    pub done_bytes: u64,
    /// Bytes to copy in all.
    pub total_bytes: u64,
    /// Milliseconds the resync has run (or ran).
    pub elapsed_ms: u64,
}

/// The state of each link to the peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStates {
    /// The direct heartbeat cable.
    pub heartbeat: &'static str,
    /// The client network.
    pub lan: &'static str,
}

/// The hardware watchdog as `status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WatchdogStatus {
    /// True once the watchdog is armed (false in test mode, `device = "none"`, or without one).
    pub armed: bool,
    /// The timeout the driver applied, in seconds.
    pub timeout_s: u32,
    /// How often it was petted since start.
    pub pets: u64,
}

/// Round-trip times of both links (absent while a link is down or not yet measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkRtts {
    /// The heartbeat cable.
    pub heartbeat: Option<u64>,
    /// The lan.
    pub lan: Option<u64>,
}

/// Everything `status` reports (INTERFACE.md names the JSON fields).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// This node's name.
    pub node: String,
    /// Its role.
    pub role: Role,
    /// Its disk.
    pub disk: DiskState,
    /// Its peer.
    pub peer: PeerState,
    /// Both links.
    pub links: LinkStates,
    /// The last round-trip time measured on each link, in milliseconds.
    pub link_rtt_ms: LinkRtts,
    /// The hardware watchdog.
    pub watchdog: WatchdogStatus,
    /// The lan uplink: "healthy", "down" or "unknown".
    pub uplink: &'static str,
    /// The role epoch.
    pub epoch: u64,
    /// Whether automatic failover is configured and not suspended.
    pub auto_failover: bool,
    /// The operator suspended automatic failover (`maintenance on`).
    pub maintenance: bool,
    /// Whether a failover could happen right now.
    pub ready_for_failover: bool,
    /// Why not.
    pub not_ready_reasons: Vec<String>,
    /// Degraded but still protected.
    pub warnings: Vec<String>,
    /// Resync progress.
    pub sync: SyncProgress,
    /// A resync is running.
    pub sync_running: bool,
    /// Bytes this node knows may differ from the peer (its dirty bitmap).
    pub out_of_sync_bytes: u64,
    /// The data generation (hex).
    pub generation: String,
    /// The online verify, when one ran.
    pub verify: Option<VerifyStatus>,
    /// Size of the exported volume.
    pub volume_bytes: u64,
    /// The backing device.
    pub backing: String,
    /// The volume in the local kernel (`[volume] attach`): device, mount, or why not.
    pub kernel: Option<String>,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Clients connected.
    pub clients: usize,
    /// Requests in flight.
    pub requests_in_flight: usize,
    /// I/O counters.
    pub io: ServerCounters,
}

/// What `status` shows of the online verify.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyStatus {
    pub running: bool,
    pub checked_bytes: u64,
    /// Ranges `[offset, len]` whose copies differed (they are resynced).
    pub mismatches: Vec<(u64, u64)>,
}

/// How a node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// The node's name.
    pub name: String,
    /// The backing device, for display.
    pub backing: String,
    /// Size of the exported volume.
    pub volume_bytes: u64,
}

/// The answer to a console or control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    /// False when the command failed; `text` then says why in one line.
    pub ok: bool,
    /// The reply.
    pub text: String,
}

/// Disk tags carry their origin in the top bits, so that later subsystems (metadata, resync)
/// can share the disk with client requests.
const TAG_ORIGIN_SHIFT: u32 = 56;
const TAG_ORIGIN_CLIENT: u64 = 0;

/// One tandem node.
#[derive(Debug)]
pub struct Node {
    settings: NodeSettings,
    role: Role,
    disk: DiskState,
    server: Server,
    started_at: Instant,
    now: Instant,
    /// The mirror (links to the peer and the replication engine), when a peer is configured.
    mirror: Option<Box<Mirror>>,
    /// The operator suspended automatic failover (not persisted: a restart resumes it).
    maintenance: bool,
    /// What the runtime reports of the hardware watchdog.
    watchdog: WatchdogStatus,
    /// What the runtime reports of the volume in the local kernel.
    kernel: Option<String>,
}

impl Node {
    /// A standalone node serving a volume of `settings.volume_bytes`.
    pub fn new_standalone(settings: NodeSettings, now: Instant) -> Node {
        let export = ExportInfo {
            size_bytes: settings.volume_bytes,
            is_serving: true,
        };
        Node {
            settings,
            role: Role::Standalone,
            disk: DiskState::UpToDate,
            server: Server::new(export),
            started_at: now,
            now,
            mirror: None,
            maintenance: false,
            watchdog: WatchdogStatus::default(),
            kernel: None,
        }
    }

    /// A node with a peer. It starts as a secondary whose disk is `consistent` (whole, freshness
    /// unknown) and refuses NBD clients until the pair decides who serves (docs/REPLICATION.md).
    pub fn new_paired(
        settings: NodeSettings,
        links: LinkSettings,
        mirror: MirrorSettings,
        loaded: LoadedState,
        now: Instant,
    ) -> Node {
        let export = ExportInfo {
            size_bytes: settings.volume_bytes,
            is_serving: false,
        };
        let mirror = Mirror::new(mirror, PeerLinks::new(links), loaded, now);
        Node {
            settings,
            role: Role::Secondary,
            disk: DiskState::Consistent,
            server: Server::new(export),
            started_at: now,
            now,
            mirror: Some(Box::new(mirror)),
            maintenance: false,
            watchdog: WatchdogStatus::default(),
            kernel: None,
        }
    }

    /// The persistent state of a node with a peer (written at a clean stop).
    pub fn superblock(&self) -> Option<&crate::metadata::Superblock> {
        self.mirror.as_ref().map(|m| m.superblock())
    }

    /// Metadata a clean stop writes before it marks the volume clean (the dirty bitmap blocks
    /// still in memory only).
    pub fn take_final_metadata(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.mirror
            .as_mut()
            .map(|m| m.take_bitmap_writes())
            .unwrap_or_default()
    }

    // ---- getters -------------------------------------------------------------------------

    /// The node's role now.
    pub fn role(&self) -> Role {
        match &self.mirror {
            None => self.role,
            Some(m) => m.role(),
        }
    }

    /// The node's status now.
    pub fn status(&self) -> Status {
        let mut sync = SyncProgress::default();
        let mut sync_running = false;
        let mut out_of_sync_bytes = 0;
        let mut generation = String::new();
        let mut verify = None;
        let (role, disk, epoch) = match &self.mirror {
            None => (self.role, self.disk, 0),
            Some(m) => (m.role(), m.disk_state(), m.epoch()),
        };
        let mut readiness = None;
        let (peer, links, mut not_ready_reasons, warnings) = match &self.mirror {
            None => (
                PeerState::None,
                LinkStates {
                    heartbeat: "none",
                    lan: "none",
                },
                vec!["no peer configured (standalone node)".to_string()],
                Vec::new(),
            ),
            Some(mirror) => {
                let links = mirror.links();
                let heartbeat = links.state(LinkKind::Heartbeat);
                let lan = links.state(LinkKind::Lan);
                let connected = links.is_connected();
                let progress = mirror.resync_progress();
                sync = SyncProgress {
                    done_bytes: progress.done_bytes,
                    total_bytes: progress.total_bytes,
                    elapsed_ms: progress.elapsed_ms,
                };
                sync_running = progress.running;
                out_of_sync_bytes = mirror.dirty_bytes();
                generation = format!("{:016x}", mirror.generations().current);
                verify = mirror.verify_report();
                readiness = Some(mirror.readiness());
                let reasons = Vec::new();
                let mut warnings = Vec::new();
                if connected && heartbeat != LinkState::Up {
                    warnings.push(
                        "heartbeat link down: the peer is reached over the lan only".to_string(),
                    );
                }
                if connected && lan != LinkState::Up {
                    warnings.push(
                        "lan link to the peer down: reached over the heartbeat link only"
                            .to_string(),
                    );
                }
                let links = LinkStates {
                    heartbeat: heartbeat.name(),
                    lan: lan.name(),
                };
                (mirror.peer_link_state(), links, reasons, warnings)
            }
        };
        let (mut auto_failover, mut ready_for_failover, mut uplink) = (false, false, "unknown");
        if let Some(readiness) = readiness {
            auto_failover = readiness.auto_failover;
            ready_for_failover = readiness.ready_for_failover;
            uplink = readiness.uplink.name();
            not_ready_reasons = readiness.not_ready_reasons;
        } else if self.maintenance {
            not_ready_reasons.push("maintenance mode: automatic failover suspended".to_string());
        }
        let rtt = |link| self.link_info(link).and_then(|i| i.rtt_ms);
        Status {
            watchdog: self.watchdog,
            kernel: self.kernel.clone(),
            link_rtt_ms: LinkRtts {
                heartbeat: rtt(LinkKind::Heartbeat),
                lan: rtt(LinkKind::Lan),
            },
            maintenance: self.maintenance,
            node: self.settings.name.clone(),
            role,
            disk,
            peer,
            links,
            uplink,
            epoch,
            auto_failover,
            ready_for_failover,
            not_ready_reasons,
            warnings,
            sync,
            sync_running,
            out_of_sync_bytes,
            generation,
            verify,
            volume_bytes: self.settings.volume_bytes,
            backing: self.settings.backing.clone(),
            uptime_s: self.now.millis_since(self.started_at) / 1000,
            clients: self.server.session_count(),
            requests_in_flight: self.server.in_flight_count(),
            io: self.server.counters(),
        }
    }

    /// The earliest instant at which `handle_timeout` should run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let links = self.mirror.as_ref().and_then(|m| m.poll_timeout());
        match (self.server.poll_timeout(), links) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The connection that is a link's session (or its only handshake), if any.
    pub fn link_current_conn(&self, link: LinkKind) -> Option<LinkConn> {
        self.mirror.as_ref()?.links().current_conn(link)
    }

    /// The runtime attached, mounted or detached the volume in the local kernel.
    pub fn note_kernel_volume(&mut self, kernel: Option<String>) {
        self.kernel = kernel;
    }

    /// The runtime armed or petted the hardware watchdog.
    pub fn note_watchdog(&mut self, watchdog: WatchdogStatus) {
        self.watchdog = watchdog;
    }

    /// One link to the peer, for `links` (`None` without a peer).
    pub fn link_info(&self, link: LinkKind) -> Option<LinkInfo> {
        Some(self.mirror.as_ref()?.links().info(link, self.now))
    }

    // ---- inputs --------------------------------------------------------------------------

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        self.server.handle_timeout(now);
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.handle_timeout(now);
        }
    }

    /// A TCP connection to the peer opened on `link` (`Initiator` when this node connected).
    /// `nonce` is 32 fresh random bytes. Returns `None` when no peer is configured.
    pub fn handle_link_connected(
        &mut self,
        link: LinkKind,
        role: LinkRole,
        nonce: [u8; PEER_NONCE_BYTES],
        now: Instant,
    ) -> Option<LinkConn> {
        self.now = now;
        Some(
            self.mirror
                .as_mut()?
                .handle_link_connected(link, role, nonce, now),
        )
    }

    /// Bytes from the peer on a link connection.
    pub fn handle_link_bytes(&mut self, conn: LinkConn, bytes: &[u8], now: Instant) {
        self.now = now;
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.handle_link_bytes(conn, bytes, now);
        }
    }

    /// A link connection ended.
    pub fn handle_link_closed(&mut self, conn: LinkConn) {
        let now = self.now;
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.handle_link_closed(conn, now);
        }
    }

    /// The lan port's carrier and the gateway probe, as the runtime sees them now.
    pub fn handle_uplink(&mut self, uplink: UplinkHealth, now: Instant) {
        self.now = now;
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.set_uplink(uplink, now);
        }
    }

    /// The probe of the cluster IP asked for by [`Output::ProbeClusterIp`] ended; `answered`
    /// when another host claimed the address.
    pub fn handle_cluster_ip_probe(&mut self, answered: bool, now: Instant) {
        self.now = now;
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.handle_cluster_ip_probe(answered, now);
        }
    }

    /// Another host's ARP claimed the cluster IP.
    pub fn handle_cluster_ip_conflict(&mut self, now: Instant) {
        self.now = now;
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.handle_cluster_ip_conflict(now);
        }
    }

    /// A client connected; `None` means close it at once (every slot is taken).
    pub fn handle_client_connected(&mut self, now: Instant) -> Option<ConnId> {
        self.now = now;
        self.server.handle_connected(now)
    }

    /// The kernel's NBD client was handed a socket (see [`Server::handle_attached`]).
    pub fn handle_kernel_attached(&mut self, now: Instant) -> Option<ConnId> {
        self.now = now;
        self.server.handle_attached(now)
    }

    /// Whether this node serves the volume now (primary or standalone).
    pub fn is_serving(&self) -> bool {
        self.server.is_serving()
    }

    /// The exported volume's size.
    pub fn volume_bytes(&self) -> u64 {
        self.settings.volume_bytes
    }

    /// The transmission flags the kernel is told at attach.
    pub fn transmission_flags(&self) -> u16 {
        self.server.transmission_flags()
    }

    /// Bytes from a client; returns how many were consumed (see [`Server::handle_bytes`]).
    pub fn handle_client_bytes(&mut self, conn: ConnId, bytes: &[u8], now: Instant) -> usize {
        self.now = now;
        self.server.set_now(now);
        self.server.handle_bytes(conn, bytes)
    }

    /// Where a client's write payload may be read to directly (see
    /// [`Server::payload_target`]).
    pub fn payload_target(&mut self, conn: ConnId) -> Option<&mut [u8]> {
        self.server.payload_target(conn)
    }

    /// Bytes were read into the buffer from [`Node::payload_target`].
    pub fn handle_payload_received(&mut self, conn: ConnId, n: usize, now: Instant) {
        self.now = now;
        self.server.set_now(now);
        self.server.handle_payload_received(conn, n);
    }

    /// A client's socket closed.
    pub fn handle_client_closed(&mut self, conn: ConnId) {
        self.server.handle_closed(conn);
    }

    /// A disk request finished.
    pub fn handle_disk_completion(&mut self, completion: DiskCompletion, now: Instant) {
        self.now = now;
        self.server.set_now(now);
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.handle_disk_completion(completion, now);
            return;
        }
        let origin = completion.tag >> TAG_ORIGIN_SHIFT;
        assert_eq!(
            origin, TAG_ORIGIN_CLIENT,
            "disk completion of unknown origin"
        );
        let tag = completion.tag & ((1 << TAG_ORIGIN_SHIFT) - 1);
        let done = volume_done(completion);
        self.server.handle_volume_done(tag, done);
    }

    /// A console or control command (one line). `json` asks for JSON where a command has it.
    pub fn handle_command(&mut self, line: &str, json: bool) -> CommandReply {
        match console::parse(line) {
            Ok(Command::Status) if json => match serde_json::to_string_pretty(&self.status()) {
                Ok(text) => CommandReply { ok: true, text },
                Err(e) => CommandReply {
                    ok: false,
                    text: format!("status: cannot encode: {e}"),
                },
            },
            Ok(Command::Status) => CommandReply {
                ok: true,
                text: console::render_status(&self.status()),
            },
            Ok(Command::Maintenance(on)) => {
                if on != self.maintenance {
                    self.maintenance = on;
                    let state = if on {
                        "on: automatic failover suspended"
                    } else {
                        "off"
                    };
                    log::warn!("maintenance mode {state}");
                }
                if let Some(mirror) = self.mirror.as_mut() {
                    mirror.set_maintenance(on);
                }
                let text = if on {
                    "maintenance on: automatic failover is suspended until 'maintenance off'"
                } else {
                    "maintenance off"
                };
                CommandReply {
                    ok: true,
                    text: text.to_string(),
                }
            }
            Ok(Command::Help) => CommandReply {
                ok: true,
                text: console::help_text().to_string(),
            },
            Ok(command) if self.mirror.is_none() => CommandReply {
                ok: false,
                text: format!(
                    "{}: not available on a standalone node (no [peer] configured)",
                    command.name()
                ),
            },
            Ok(command) => {
                let Some(mirror) = self.mirror.as_mut() else {
                    return CommandReply {
                        ok: false,
                        text: format!("{}: not available", command.name()),
                    };
                };
                let (ok, text) = match command {
                    Command::Switchover => mirror.start_switchover(),
                    Command::PromoteForce => mirror.force_promote(),
                    Command::ResolveSplitBrain { keep } => mirror.resolve_split_brain(&keep),
                    Command::Verify => mirror.start_verify(),
                    other => (false, format!("{}: not available from here", other.name())),
                };
                CommandReply { ok, text }
            }
            Err(CommandError::Empty) => CommandReply {
                ok: true,
                text: String::new(),
            },
            Err(e) => CommandReply {
                ok: false,
                text: e.to_string(),
            },
        }
    }

    // ---- commands and outputs ------------------------------------------------------------

    /// Gives back a buffer from an [`Output::Send`].
    pub fn recycle(&mut self, buf: IoBuf) {
        self.server.recycle(buf);
    }

    /// The next thing for the runtime to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        loop {
            if let Some(mirror) = self.mirror.as_mut() {
                if let Some(output) = mirror.poll_link_output() {
                    return Some(match output {
                        LinkOutput::Send { conn, bytes } => Output::LinkSend { conn, bytes },
                        LinkOutput::Close { conn } => Output::LinkClose { conn },
                    });
                }
                match mirror.poll_output() {
                    Some(EngineOutput::Disk { tag, request }) => {
                        return Some(Output::Disk { tag, request })
                    }
                    Some(EngineOutput::Metadata {
                        offset,
                        bytes,
                        flush_first,
                    }) => {
                        return Some(Output::Metadata {
                            offset,
                            bytes,
                            flush_first,
                        })
                    }
                    Some(EngineOutput::Done { tag, done }) => {
                        self.server.handle_volume_done(tag, done);
                        continue;
                    }
                    Some(EngineOutput::Serving(serving)) => {
                        self.server.set_serving(serving);
                        continue;
                    }
                    Some(EngineOutput::ProbeClusterIp) => return Some(Output::ProbeClusterIp),
                    Some(EngineOutput::ClusterIp(add)) => return Some(Output::ClusterIp(add)),
                    Some(EngineOutput::Fence { reason }) => return Some(Output::Fence { reason }),
                    None => {}
                }
            }
            let output = self.server.poll_output()?;
            return Some(match output {
                ServerOutput::Send { conn, head, data } => Output::Send { conn, head, data },
                ServerOutput::Close { conn } => Output::Close { conn },
                ServerOutput::Volume { tag, request } => {
                    if let Some(mirror) = self.mirror.as_mut() {
                        mirror.submit(tag, request, self.now);
                        continue;
                    }
                    let tag = (TAG_ORIGIN_CLIENT << TAG_ORIGIN_SHIFT) | tag;
                    Output::Disk {
                        tag,
                        request: volume_to_disk(request),
                    }
                }
            });
        }
    }
}

/// What the NBD server is told of a finished disk request.
pub(crate) fn volume_done(completion: DiskCompletion) -> VolumeDone {
    match completion.result {
        Ok(DiskDone::Buf(buf)) => VolumeDone::Buf(buf),
        Ok(DiskDone::Done) => VolumeDone::Done,
        Ok(DiskDone::Extents(extents)) => VolumeDone::Extents(extents),
        Err(e) => {
            log::error!("disk: request failed (error={e})");
            let error = if e.is_no_space() {
                errno::ENOSPC
            } else {
                errno::EIO
            };
            VolumeDone::Failed {
                error,
                buf: completion.buf,
            }
        }
    }
}

/// The disk request that carries out a volume request on the local disk.
pub(crate) fn volume_to_disk(request: VolumeRequest) -> DiskRequest {
    match request {
        VolumeRequest::Read { offset, buf } => DiskRequest::Read { offset, buf },
        VolumeRequest::Write { offset, buf, fua } => DiskRequest::Write { offset, buf, fua },
        VolumeRequest::Flush => DiskRequest::Flush,
        VolumeRequest::Trim { offset, len, fua } => DiskRequest::Discard { offset, len, fua },
        VolumeRequest::WriteZeroes {
            offset,
            len,
            may_deallocate,
            fua,
        } => DiskRequest::WriteZeroes {
            offset,
            len,
            may_deallocate,
            fua,
        },
        VolumeRequest::MapExtents { offset, len } => DiskRequest::MapExtents { offset, len },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_words_the_json_uses() {
        let json = |value: serde_json::Value| value.as_str().map(str::to_string);
        for role in [
            Role::Primary,
            Role::Secondary,
            Role::Standalone,
            Role::Fenced,
            Role::Unconfigured,
        ] {
            assert_eq!(json(serde_json::json!(role)).as_deref(), Some(role.name()));
        }
        for disk in [
            DiskState::UpToDate,
            DiskState::Consistent,
            DiskState::Outdated,
            DiskState::Inconsistent,
            DiskState::Syncing,
            DiskState::Diskless,
        ] {
            assert_eq!(json(serde_json::json!(disk)).as_deref(), Some(disk.name()));
        }
        for peer in [
            PeerState::Connected,
            PeerState::Half,
            PeerState::Lost,
            PeerState::None,
        ] {
            assert_eq!(json(serde_json::json!(peer)).as_deref(), Some(peer.name()));
        }
    }
}
