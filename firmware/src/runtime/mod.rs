//! The runtime: one single-threaded event loop that owns every socket and the disk, feeds the
//! node its inputs and carries out its outputs.
//!
//! Each turn of the loop waits on epoll (until the node's next timeout at the latest), then:
//! accepts clients, reads client bytes into per-client buffers and offers them to the node,
//! reaps disk completions, answers control commands, and finally drains the node's outputs
//! (replies queued per client and written with writev; disk requests pushed to the ring and
//! submitted once per turn). A client whose bytes the node could not take (back-pressure) is
//! offered them again after disk completions; its socket is not read meanwhile.

mod attach;
mod cluster;
mod peer;
pub mod volume;

use crate::config::Config;
use crate::config::WatchdogDevice;
use crate::console::line::{LineEditor, LineEvent};
use crate::console::{self, Command};
use crate::constants::{
    CLIENT_READ_BUFFER_BYTES, CONTROL_CLIENT_TIMEOUT_MS, CONTROL_CONNECTION_COUNT_MAX,
    CONTROL_LINE_BYTES_MAX, NBD_CONNECTION_COUNT_MAX, NBD_REFUSED_CONNECTION_COUNT_MAX,
};
use crate::logger;
use crate::metadata::flags;
use crate::nbd::{ConnId, Head};
use crate::node::WatchdogStatus;
use crate::node::{CommandReply, Node, NodeSettings, Output};
use crate::time::Instant;
use rustix::event::epoll;
use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use tandem_board::{IoBuf, LinuxDisk, SerialError, SerialPort, TerminationSignals, Watchdog};

/// The serial console's speed: 115200 8N1, what a USB-serial cable and a terminal expect.
pub(crate) const CONSOLE_BAUD: u32 = 115_200;

/// Why `tandem run` could not start; each maps to an exit status (INTERFACE.md).
#[derive(Debug)]
pub enum StartError {
    /// The backing device is missing or refused (exit 66).
    Backing(String),
    /// A socket path or address is in use by a live process (exit 73).
    SocketInUse(String),
    /// Anything else the machine refused (exit 70).
    Internal(String),
    /// The node fenced itself in test mode (`watchdog.device = "none"`): exit 75.
    Fenced(String),
}

impl StartError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Backing(_) => crate::exit::BACKING,
            StartError::SocketInUse(_) => crate::exit::CANT_CREATE,
            StartError::Internal(_) => crate::exit::INTERNAL,
            StartError::Fenced(_) => crate::exit::FENCED,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Backing(m)
            | StartError::SocketInUse(m)
            | StartError::Internal(m)
            | StartError::Fenced(m) => f.write_str(m),
        }
    }
}

/// Replies queued for one client before its requests stop being taken (a client that does not
/// read its replies must not grow the node's memory or hold the shared budget).
const CLIENT_OUTQ_COUNT_MAX: usize = 512;
/// Bytes of replies queued for one client before its requests stop being taken.
const CLIENT_OUTQ_BYTES_MAX: usize = 8 << 20;
/// A client whose socket accepts no byte of its waiting replies for this long is dropped: its
/// buffers count against the budget every other client shares.
const CLIENT_SEND_STALL_MS: u64 = 10_000;

/// A disk request outstanding this long with no completion at all means the disk is stuck:
/// the watchdog is no longer petted (DESIGN.md §4 "The watchdog").
const DISK_STUCK_MS: u64 = 30_000;

/// How often the loop looks at a kernel attach or detach worker while one runs.
const KERNEL_WORKER_POLL_MS: u64 = 50;

/// Write payloads at least this large are read from the socket straight into their buffer.
const DIRECT_PAYLOAD_BYTES_MIN: usize = 64 << 10;

const TOKEN_SIGNAL: u64 = 1;
const TOKEN_DISK: u64 = 2;
const TOKEN_NBD_UNIX: u64 = 3;
const TOKEN_NBD_TCP: u64 = 4;
const TOKEN_CONTROL: u64 = 5;
const TOKEN_METRICS: u64 = 6;
const TOKEN_SERIAL: u64 = 7;
const TOKEN_CARRIER: u64 = 8;
const TOKEN_ARP: u64 = 9;
const TOKEN_CLIENT: u64 = 1 << 32;
const TOKEN_CONTROL_CLIENT: u64 = 2 << 32;
const TOKEN_LINK_LISTEN: u64 = 3 << 32;
const TOKEN_LINK: u64 = 4 << 32;
const TOKEN_KIND_MASK: u64 = !0xffff_ffff;

/// A client's socket is watched edge-triggered for input; output readiness is asked for only
/// while a reply is stuck behind a full socket buffer.
const CLIENT_EVENTS: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::ET)
    .union(epoll::EventFlags::RDHUP);

/// A client's socket: unix or TCP.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
}

/// One reply (or handshake message) waiting to be written.
#[derive(Debug)]
struct Pending {
    head: Head,
    data: Option<IoBuf>,
    /// Bytes of head + data already written.
    sent: usize,
}

impl Pending {
    fn len(&self) -> usize {
        self.head.as_slice().len() + self.data.as_ref().map_or(0, |d| d.len())
    }
}

#[derive(Debug)]
struct Client {
    conn: ConnId,
    stream: Stream,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    outq: VecDeque<Pending>,
    /// The socket may have more bytes (edge-triggered epoll: read until EAGAIN).
    readable: bool,
    /// The node asked for a close once the queue drains.
    closing: bool,
    /// EPOLLOUT is being watched (the socket buffer was full).
    watching_output: bool,
    /// Its replies pile up unread: its requests are not taken until they drain.
    output_full: bool,
    /// Since when replies have been waiting with no byte accepted by the socket.
    stalled_since: Option<Instant>,
}

impl Client {
    fn queued_bytes(&self) -> usize {
        self.outq.iter().map(|p| p.len() - p.sent).sum()
    }

    /// Whether its reply queue is full enough that its requests must wait.
    fn is_output_full(&self) -> bool {
        self.outq.len() >= CLIENT_OUTQ_COUNT_MAX || self.queued_bytes() >= CLIENT_OUTQ_BYTES_MAX
    }
}

/// The listening sockets a node accepts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    NbdUnix,
    NbdTcp,
    Control,
    Metrics,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::NbdUnix | Listener::NbdTcp => "nbd",
            Listener::Control => "control",
            Listener::Metrics => "metrics",
        }
    }
}

/// What a short-lived local connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServiceKind {
    /// `tandem ctl`: one command line, one reply.
    Control,
    /// A Prometheus scrape: one HTTP request, the metrics text.
    Metrics,
}

/// A control or metrics connection: it sends one request and gets one reply.
#[derive(Debug)]
struct ControlClient {
    kind: ServiceKind,
    stream: Stream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Whether the kernel command line carries `tandem.test=1` (never in a shipped loader entry).
fn booted_for_tests() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|line| line.split_whitespace().any(|w| w == "tandem.test=1"))
}

/// The clock the runtime reads: CLOCK_BOOTTIME in milliseconds, which keeps counting through
/// any stall or suspend of the board, so a lease checked on it expires while the board sleeps
/// (DESIGN.md §4 rule 1).
fn now() -> Instant {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let ms = (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000;
    Instant::from_millis(ms)
}

/// `N` random bytes from the kernel.
pub(crate) fn random_bytes<const N: usize>() -> rustix::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(bytes)
}

/// A fresh volume identity.
fn random_u64s() -> Result<[u64; 2], StartError> {
    let bytes = random_id()?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&bytes[..8]);
    b.copy_from_slice(&bytes[8..]);
    Ok([u64::from_le_bytes(a), u64::from_le_bytes(b)])
}

fn random_id() -> Result<[u8; 16], StartError> {
    random_bytes().map_err(|e| StartError::Internal(format!("cannot draw random bytes: {e}")))
}

/// Opens the backing device named in `config`.
pub fn open_disk(config: &Config) -> Result<LinuxDisk, StartError> {
    let path = &config.volume.backing;
    let probe = LinuxDisk::open(path, false)
        .map_err(|e| StartError::Backing(format!("backing device {}: {e}", path.display())))?;
    let direct_io = config.volume.direct_io.unwrap_or(probe.is_block_device());
    drop(probe);
    LinuxDisk::open(path, direct_io)
        .map_err(|e| StartError::Backing(format!("backing device {}: {e}", path.display())))
}

/// `tandem init`: writes fresh metadata on the backing device.
pub fn init(config: &Config, force: bool) -> Result<volume::OpenVolume, StartError> {
    let disk = open_disk(config)?;
    let id = random_id()?;
    volume::init(&disk, id, &config.node.name, force).map_err(|e| {
        StartError::Backing(format!(
            "backing device {}: {e}",
            config.volume.backing.display()
        ))
    })
}

/// Binds a unix listener at `path`. A socket file left by a dead process is replaced; one that
/// a live process answers on is not.
pub(crate) fn bind_unix(path: &Path, what: &str) -> Result<UnixListener, StartError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StartError::Internal(format!(
                    "{what} {}: cannot create its directory: {e}",
                    path.display()
                ))
            })?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(format!(
                "{what} {} is in use by another running process",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            StartError::Internal(format!(
                "{what} {}: cannot remove the stale socket: {e}",
                path.display()
            ))
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        StartError::Internal(format!("{what} {}: cannot listen: {e}", path.display()))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        StartError::Internal(format!(
            "{what} {}: cannot set its mode: {e}",
            path.display()
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Internal(format!("{what}: {e}")))?;
    Ok(listener)
}

/// Binds a non-blocking TCP listener; an address in use is `SocketInUse`.
fn bind_tcp(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    let listener = match TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(StartError::SocketInUse(format!("{what} {addr} is in use")));
        }
        Err(e) => return Err(StartError::Internal(format!("{what} {addr}: {e}"))),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Internal(format!("{what} {addr}: {e}")))?;
    Ok(listener)
}

/// The serial console: the port, its line editor, and a command waiting for confirmation.
#[derive(Debug)]
struct SerialConsole {
    port: SerialPort,
    editor: LineEditor,
    /// A command that moves the role or can discard data, typed once; `yes` runs it.
    unconfirmed: Option<String>,
}

/// Takes a `--json` word out of a command line, wherever it stands (`status --json` on the
/// console, `--json status` from `tandem ctl`).
pub(crate) fn split_json_flag(line: &str) -> (bool, String) {
    let mut json = false;
    let words: Vec<&str> = line
        .split_whitespace()
        .filter(|word| {
            let is_flag = *word == "--json";
            json |= is_flag;
            !is_flag
        })
        .collect();
    (json, words.join(" "))
}

/// A control socket's reply: `ok` or `error` on its own line, then the text.
pub(crate) fn control_reply(ok: bool, text: &str) -> String {
    let status = if ok { "ok" } else { "error" };
    format!("{status}\n{text}\n")
}

/// Commands that move the role or can discard data: the console asks before running them.
fn needs_confirmation(command: &Command) -> bool {
    matches!(
        command,
        Command::Switchover | Command::PromoteForce | Command::ResolveSplitBrain { .. }
    )
}

/// `nbd_listen` is on the cluster IP: the listener opens when the address is added and
/// closes when it is dropped.
fn nbd_follows_vip(config: &Config) -> bool {
    match (config.volume.nbd_listen, &config.cluster.vip, &config.peer) {
        (Some(listen), Some(vip), Some(_)) => listen.ip() == std::net::IpAddr::V4(vip.addr),
        _ => false,
    }
}

/// The listening sockets of a node, bound before anything else is touched.
#[derive(Debug)]
struct Sockets {
    nbd_unix: UnixListener,
    nbd_unix_path: PathBuf,
    nbd_tcp: Option<TcpListener>,
    control: UnixListener,
    control_path: PathBuf,
    metrics: Option<TcpListener>,
}

impl Sockets {
    fn bind(config: &Config) -> Result<Sockets, StartError> {
        let nbd_unix = bind_unix(&config.volume.nbd_socket, "nbd_socket")?;
        let remove_nbd = || {
            let _ = std::fs::remove_file(&config.volume.nbd_socket);
        };
        let control = bind_unix(&config.console.control_socket, "control_socket")
            .inspect_err(|_| remove_nbd())?;
        let failed = |e: StartError| {
            remove_nbd();
            let _ = std::fs::remove_file(&config.console.control_socket);
            e
        };
        let nbd_tcp = match config.volume.nbd_listen {
            Some(addr) if !nbd_follows_vip(config) => {
                Some(bind_tcp(addr, "nbd_listen").map_err(failed)?)
            }
            _ => None,
        };
        let metrics = match &config.metrics {
            Some(metrics) => Some(bind_tcp(metrics.listen, "metrics listen").map_err(failed)?),
            None => None,
        };
        Ok(Sockets {
            nbd_unix,
            nbd_unix_path: config.volume.nbd_socket.clone(),
            nbd_tcp,
            control,
            control_path: config.console.control_socket.clone(),
            metrics,
        })
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.nbd_unix_path);
        let _ = std::fs::remove_file(&self.control_path);
    }
}

/// The running node and everything it owns.
#[derive(Debug)]
pub struct Runtime {
    node: Node,
    disk: LinuxDisk,
    epoll: rustix::fd::OwnedFd,
    signals: TerminationSignals,
    nbd_unix: UnixListener,
    nbd_unix_path: PathBuf,
    nbd_tcp: Option<TcpListener>,
    control: UnixListener,
    control_path: PathBuf,
    metrics: Option<TcpListener>,
    config: Config,
    serial: Option<SerialConsole>,
    peer: Option<peer::PeerSockets>,
    /// The hardware watchdog, armed at start; petted from the loop while it turns.
    watchdog: Option<Watchdog>,
    next_pet: Instant,
    pets: u64,
    /// The lan port: carrier, gateway probe, cluster IP (a node with a peer off loopback).
    cluster: Option<cluster::ClusterNet>,
    /// Why the node fenced itself, once it has.
    fenced: Option<String>,
    /// The volume in the local kernel (`[volume] attach`).
    kernel: Option<attach::KernelVolume>,
    /// A clean stop waits for the kernel's filesystem to be unmounted, until this deadline.
    stopping: Option<Instant>,
    /// The board was booted with `tandem.test=1` on the kernel command line: `freeze` works.
    test_mode: bool,
    /// The last time the disk completed anything, or had nothing outstanding.
    disk_progress: Instant,
    /// How long the last turn of the loop took.
    last_turn_ms: u64,
    /// The role in the log lines' prefix.
    logged_role: crate::node::Role,
    clients: Vec<Option<Client>>,
    controls: Vec<Option<ControlClient>>,
    /// Clients with replies queued since the last flush.
    dirty: Vec<usize>,
    /// Clients whose bytes the node could not take yet.
    blocked: Vec<usize>,
    volume: volume::OpenVolume,
}

impl Runtime {
    /// Opens the disk and every socket of a standalone node. Nothing is left half-started: on
    /// error every socket bound so far is closed and removed.
    pub fn start(config: &Config) -> Result<Runtime, StartError> {
        let signals = TerminationSignals::install()
            .map_err(|e| StartError::Internal(format!("cannot watch for signals: {e}")))?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| StartError::Internal(format!("epoll: {e}")))?;
        // Sockets first: a node that would fail because another one already serves here must
        // not touch the disk at all.
        let sockets = Sockets::bind(config)?;
        let peer_sockets =
            match peer::PeerSockets::bind(config).and_then(|p| Ok((p, peer::read_key(config)?))) {
                Ok(bound) => bound,
                Err(e) => {
                    sockets.remove();
                    return Err(e);
                }
            };
        let opened = Self::open_volume(config);
        let (disk, mut volume) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                sockets.remove();
                return Err(e);
            }
        };
        // With a peer: the dirty bitmap and the activity log (a crashed primary's extents are
        // made dirty, durably, before the start is recorded).
        let loaded = if config.peer.is_some() {
            match volume::load_replication(&disk, &volume.layout, &volume.superblock) {
                Ok(loaded) => Some(loaded),
                Err(e) => {
                    sockets.remove();
                    return Err(StartError::Backing(format!("cannot read metadata: {e}")));
                }
            }
        } else {
            None
        };
        // The volume is now open: until a clean exit says otherwise, it is not clean. A node
        // starts as secondary.
        volume.superblock.flags &= !(flags::CLEAN_SHUTDOWN | flags::WAS_PRIMARY);
        volume.superblock.sequence += 1;
        if let Err(e) = volume::write_superblock(&disk, &volume.layout, &volume.superblock) {
            sockets.remove();
            return Err(StartError::Backing(format!("cannot write metadata: {e}")));
        }
        let Sockets {
            nbd_unix,
            nbd_unix_path,
            nbd_tcp,
            control,
            control_path,
            metrics,
        } = sockets;
        let settings = NodeSettings {
            name: config.node.name.clone(),
            backing: config.volume.backing.display().to_string(),
            volume_bytes: volume.layout.volume_bytes,
        };
        let (peer_sockets, key) = peer_sockets;
        let node = match (&config.peer, key, loaded) {
            (Some(peer), Some(key), Some(mut loaded)) => {
                loaded.superblock = volume.superblock.clone();
                let [boot_id, id_seed] = random_u64s()?;
                let preferred = config
                    .cluster
                    .preferred
                    .clone()
                    .unwrap_or_else(|| config.node.name.clone().min(peer.name.clone()));
                let mirror = crate::replication::engine::MirrorSettings {
                    node_name: config.node.name.clone(),
                    peer_name: peer.name.clone(),
                    // Exactly one node of a pair is preferred: the configured one, else the
                    // name that sorts first.
                    preferred: preferred == config.node.name,
                    peer_preferred: preferred == peer.name,
                    dead_time_ms: u64::from(config.cluster.dead_time_ms),
                    boot_id,
                    id_seed,
                    cluster_ip: config.cluster.vip.is_some(),
                    gateway_probe: config.cluster.uplink_probe.is_some(),
                    failback_preferred: config.cluster.failback
                        == crate::config::Failback::Preferred,
                    mutations: Default::default(),
                };
                let links = crate::peer::link::LinkSettings {
                    key,
                    node_name: config.node.name.clone(),
                    peer_name: peer.name.clone(),
                    volume_id: volume.superblock.volume_id,
                    heartbeat_interval_ms: u64::from(config.cluster.heartbeat_interval_ms),
                    dead_time_ms: u64::from(config.cluster.dead_time_ms),
                };
                Node::new_paired(settings, links, mirror, loaded, now())
            }
            _ => Node::new_standalone(settings, now()),
        };
        let node_role = node.role();
        let runtime = Runtime {
            node,
            disk,
            epoll,
            signals,
            nbd_unix,
            nbd_unix_path,
            nbd_tcp,
            control,
            control_path,
            metrics,
            config: config.clone(),
            serial: None,
            peer: peer_sockets,
            watchdog: None,
            next_pet: Instant::default(),
            pets: 0,
            cluster: cluster::ClusterNet::open(config, now()),
            fenced: None,
            kernel: attach::KernelVolume::new(
                config.volume.attach.as_deref(),
                config.volume.mount.as_deref(),
            ),
            stopping: None,
            test_mode: booted_for_tests(),
            disk_progress: now(),
            last_turn_ms: 0,
            logged_role: node_role,
            clients: (0..NBD_CONNECTION_COUNT_MAX + NBD_REFUSED_CONNECTION_COUNT_MAX)
                .map(|_| None)
                .collect(),
            controls: (0..CONTROL_CONNECTION_COUNT_MAX).map(|_| None).collect(),
            dirty: Vec::new(),
            blocked: Vec::new(),
            volume,
        };
        let mut runtime = runtime;
        if let Err(e) = runtime.arm_watchdog() {
            runtime.remove_sockets();
            return Err(e);
        }
        runtime.open_serial();
        if let Err(e) = runtime.register_all() {
            runtime.remove_sockets();
            return Err(StartError::Internal(format!("epoll: {e}")));
        }
        let status = runtime.node.status();
        log::info!(
            "started (node={} role={} volume_bytes={} nbd_socket={})",
            status.node,
            status.role.name(),
            runtime.volume.layout.volume_bytes,
            config.volume.nbd_socket.display()
        );
        Ok(runtime)
    }

    /// Opens the backing device and its volume (initializing a blank device).
    fn open_volume(config: &Config) -> Result<(LinuxDisk, volume::OpenVolume), StartError> {
        let disk = open_disk(config)?;
        let id = random_id()?;
        let volume = volume::open(&disk, id, &config.node.name).map_err(|e| {
            StartError::Backing(format!(
                "backing device {}: {e}",
                config.volume.backing.display()
            ))
        })?;
        if volume.initialized {
            log::info!(
                "volume initialized (backing={} volume_bytes={})",
                config.volume.backing.display(),
                volume.layout.volume_bytes
            );
        } else if !volume.superblock.has_flag(flags::CLEAN_SHUTDOWN) {
            log::warn!(
                "volume was not shut down cleanly last time (writes not yet flushed then may be \
                 lost, as with any disk)"
            );
        }
        std::fs::create_dir_all(&config.node.state_dir).map_err(|e| {
            StartError::Internal(format!(
                "state_dir {}: {e}",
                config.node.state_dir.display()
            ))
        })?;
        Ok((disk, volume))
    }

    /// Arms `[watchdog] device` (test mode, `"none"`, arms nothing). A configured watchdog that
    /// cannot be armed refuses the start: a node that cannot be fenced must not serve.
    fn arm_watchdog(&mut self) -> Result<(), StartError> {
        let Some(config) = &self.config.watchdog else {
            return Ok(());
        };
        let WatchdogDevice::Path(path) = &config.device else {
            log::info!("watchdog: test mode (device = \"none\"), nothing armed");
            return Ok(());
        };
        let watchdog = Watchdog::open(path, config.timeout_s).map_err(|e| {
            StartError::Internal(format!("watchdog {}: cannot arm it: {e}", path.display()))
        })?;
        log::info!(
            "watchdog armed (device={} timeout_s={} asked={})",
            path.display(),
            watchdog.timeout_s(),
            config.timeout_s
        );
        self.node.note_watchdog(WatchdogStatus {
            armed: true,
            timeout_s: watchdog.timeout_s(),
            pets: 0,
        });
        self.next_pet = now();
        self.watchdog = Some(watchdog);
        Ok(())
    }

    /// Pets the watchdog when due: four times per timeout, from the loop itself, so a loop that
    /// stops turning (a hang, a stall, a deadlock) stops the pets and the board resets.
    fn pet_watchdog(&mut self, now: Instant) {
        let Some(watchdog) = self.watchdog.as_mut() else {
            return;
        };
        if now < self.next_pet {
            return;
        }
        // Petted only from a healthy loop: each turn within its budget (half the timeout), no
        // disk request stuck, not fencing.
        let budget_ms = u64::from(watchdog.timeout_s()) * 1000 / 2;
        let disk_stuck =
            self.disk.in_flight() > 0 && now.millis_since(self.disk_progress) >= DISK_STUCK_MS;
        if self.last_turn_ms > budget_ms || disk_stuck || self.fenced.is_some() {
            log::error!(
                "watchdog: not petted (last_turn_ms={} disk_stuck={disk_stuck})",
                self.last_turn_ms
            );
            return;
        }
        match watchdog.pet() {
            Ok(()) => self.pets += 1,
            Err(e) => log::error!("watchdog: pet failed (error={e})"),
        }
        let interval_ms = u64::from(watchdog.timeout_s()) * 1000 / 4;
        self.next_pet = now.plus_millis(interval_ms.max(100));
        let status = WatchdogStatus {
            armed: true,
            timeout_s: watchdog.timeout_s(),
            pets: self.pets,
        };
        self.node.note_watchdog(status);
    }

    /// Opens `[console] tty`. A console that cannot be opened is reported and left out: the
    /// node serves its volume whether or not anyone is plugged into its serial port.
    fn open_serial(&mut self) {
        let Some(path) = self.config.console.tty.clone() else {
            return;
        };
        match SerialPort::open(&path, CONSOLE_BAUD) {
            Ok(mut port) => {
                let prompt = self.prompt();
                let editor = LineEditor::new(prompt);
                let mut out = Vec::new();
                editor.redraw(&mut out);
                port.write_or_drop(&out);
                self.serial = Some(SerialConsole {
                    port,
                    editor,
                    unconfirmed: None,
                });
            }
            Err(e) => log::error!(
                "console: cannot open {} (error={e}); running without it",
                path.display()
            ),
        }
    }

    fn prompt(&self) -> String {
        let status = self.node.status();
        format!("{}({})> ", status.node, status.role.name())
    }

    /// Reads what the operator typed and answers each complete line.
    fn read_serial(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let Some(serial) = self.serial.as_mut() else {
                return;
            };
            let n = match serial.port.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(SerialError::HungUp) => {
                    log::warn!(
                        "console: the serial line hung up; the console is off until restart"
                    );
                    let _ = epoll::delete(&self.epoll, serial.port.as_fd());
                    self.serial = None;
                    return;
                }
                Err(e) => {
                    log::warn!("console: read failed (error={e})");
                    return;
                }
            };
            for &byte in &buf[..n] {
                let Some(serial) = self.serial.as_mut() else {
                    return;
                };
                let mut echo = Vec::new();
                let event = serial.editor.feed_byte(byte, &mut echo);
                serial.port.write_or_drop(&echo);
                if let LineEvent::Line(line) = event {
                    let reply = self.console_command(&line);
                    if let Some(serial) = self.serial.as_mut() {
                        let mut out = Vec::new();
                        serial.editor.print_above(&reply, &mut out);
                        serial.port.write_or_drop(&out);
                    }
                } else if let LineEvent::Cancelled = event {
                    if let Some(serial) = self.serial.as_mut() {
                        serial.unconfirmed = None;
                    }
                }
            }
        }
    }

    /// One line typed on the console: confirmation first for commands that move the role.
    fn console_command(&mut self, line: &str) -> String {
        let pending = self.serial.as_mut().and_then(|s| s.unconfirmed.take());
        let line = line.trim();
        let to_run = match pending {
            Some(command) if line == "yes" => command,
            Some(_) => return "cancelled".to_string(),
            None => match console::parse(line) {
                Ok(command) if needs_confirmation(&command) => {
                    if let Some(serial) = self.serial.as_mut() {
                        serial.unconfirmed = Some(line.to_string());
                    }
                    return format!(
                        "'{line}' moves the role or can discard data. Type 'yes' to go on."
                    );
                }
                _ => line.to_string(),
            },
        };
        let (json, to_run) = split_json_flag(&to_run);
        let reply = self.execute(&to_run, json);
        if reply.ok {
            reply.text
        } else {
            format!("error: {}", reply.text)
        }
    }

    /// Prints queued log lines on the console (dropped, never waited for, if nobody reads).
    fn flush_serial_log(&mut self) {
        let (lines, dropped) = logger::take_console_lines();
        let prompt = self.prompt();
        let Some(serial) = self.serial.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        if dropped > 0 {
            serial
                .editor
                .print_above(&format!("({dropped} log lines dropped)"), &mut out);
        }
        for line in &lines {
            serial.editor.print_above(line, &mut out);
        }
        if serial.editor.prompt() != prompt {
            serial.editor.set_prompt(prompt);
            serial.editor.redraw(&mut out);
        }
        if !out.is_empty() {
            serial.port.write_or_drop(&out);
        }
    }

    fn register_all(&self) -> rustix::io::Result<()> {
        let level = epoll::EventFlags::IN;
        epoll::add(
            &self.epoll,
            self.signals.as_fd(),
            epoll::EventData::new_u64(TOKEN_SIGNAL),
            level,
        )?;
        epoll::add(
            &self.epoll,
            self.disk.poll_fd(),
            epoll::EventData::new_u64(TOKEN_DISK),
            level,
        )?;
        epoll::add(
            &self.epoll,
            &self.nbd_unix,
            epoll::EventData::new_u64(TOKEN_NBD_UNIX),
            level,
        )?;
        epoll::add(
            &self.epoll,
            &self.control,
            epoll::EventData::new_u64(TOKEN_CONTROL),
            level,
        )?;
        if let Some(tcp) = &self.nbd_tcp {
            epoll::add(
                &self.epoll,
                tcp,
                epoll::EventData::new_u64(TOKEN_NBD_TCP),
                level,
            )?;
        }
        if let Some(metrics) = &self.metrics {
            let token = epoll::EventData::new_u64(TOKEN_METRICS);
            epoll::add(&self.epoll, metrics, token, level)?;
        }
        if let Some(serial) = &self.serial {
            let token = epoll::EventData::new_u64(TOKEN_SERIAL);
            epoll::add(&self.epoll, serial.port.as_fd(), token, level)?;
        }
        if let Some(cluster) = &self.cluster {
            if let Some(fd) = cluster.watch_fd() {
                epoll::add(
                    &self.epoll,
                    fd,
                    epoll::EventData::new_u64(TOKEN_CARRIER),
                    level,
                )?;
            }
            if let Some(fd) = cluster.arp_fd() {
                epoll::add(&self.epoll, fd, epoll::EventData::new_u64(TOKEN_ARP), level)?;
            }
        }
        self.register_peer()?;
        Ok(())
    }

    fn remove_sockets(&self) {
        let _ = std::fs::remove_file(&self.nbd_unix_path);
        let _ = std::fs::remove_file(&self.control_path);
    }

    /// Runs until SIGTERM or SIGINT, then shuts down cleanly: stops accepting, lets requests in
    /// flight finish, flushes the disk and marks the metadata clean.
    pub fn run(mut self) -> Result<(), StartError> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        // The start-up lines reach the console before the first wait.
        self.flush_serial_log();
        loop {
            let timeout = self.next_timeout();
            events.clear();
            let ts = timeout.map(|ms| rustix::time::Timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000) as i64,
            });
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                ts.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(StartError::Internal(format!("epoll_wait: {e}"))),
            }
            let mut terminate = false;
            for event in events.iter() {
                let (flags, data) = (event.flags, event.data);
                let token = data.u64();
                match token & TOKEN_KIND_MASK {
                    TOKEN_CLIENT => {
                        let slot = (token & 0xffff_ffff) as usize;
                        if flags.contains(epoll::EventFlags::IN)
                            || flags.contains(epoll::EventFlags::HUP)
                            || flags.contains(epoll::EventFlags::ERR)
                        {
                            if let Some(client) = self.clients[slot].as_mut() {
                                client.readable = true;
                            }
                            self.read_client(slot);
                        }
                        if flags.contains(epoll::EventFlags::OUT) {
                            self.dirty.push(slot);
                        }
                    }
                    TOKEN_CONTROL_CLIENT => self.read_control((token & 0xffff_ffff) as usize),
                    TOKEN_LINK_LISTEN => self.accept_link((token & 1) as usize),
                    TOKEN_LINK => self.service_link((token & 3) as usize, flags),
                    _ => match token {
                        TOKEN_SIGNAL => {
                            while let Some(signo) = self.signals.take() {
                                log::info!("received signal {signo}, shutting down");
                                terminate = true;
                            }
                        }
                        TOKEN_DISK => self.reap_disk(),
                        TOKEN_NBD_UNIX => self.accept_from(Listener::NbdUnix),
                        TOKEN_NBD_TCP => self.accept_from(Listener::NbdTcp),
                        TOKEN_CONTROL => self.accept_from(Listener::Control),
                        TOKEN_METRICS => self.accept_from(Listener::Metrics),
                        TOKEN_SERIAL => self.read_serial(),
                        TOKEN_CARRIER => {
                            if let Some(cluster) = self.cluster.as_mut() {
                                cluster.handle_watch(now());
                            }
                        }
                        TOKEN_ARP => {
                            if let Some(cluster) = self.cluster.as_mut() {
                                cluster.handle_arp(now());
                            }
                        }
                        _ => log::error!("epoll: unknown token {token}"),
                    },
                }
            }
            let now = now();
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
            }
            self.service_cluster(now);
            self.maintain_links(now);
            self.pet_watchdog(now);
            self.expire_controls(now);
            self.expire_stalled_clients(now);
            self.drain_outputs();
            self.retry_blocked();
            self.service_kernel();
            let role = self.node.role();
            if role != self.logged_role {
                self.logged_role = role;
                logger::set_prefix(&self.config.node.name, role.name());
            }
            self.flush_serial_log();
            if let Some(reason) = self.fenced.take() {
                return self.fence(reason);
            }
            if terminate && self.stopping.is_none() {
                // The kernel's filesystem is written back and unmounted while the loop still
                // serves it; then the stop goes on.
                if let Some(kernel) = self.kernel.as_mut() {
                    kernel.stop();
                }
                self.stopping = Some(now.plus_millis(attach::UNMOUNT_TIMEOUT_MS));
            }
            if let Some(deadline) = self.stopping {
                let detached = self.kernel.as_ref().is_none_or(|k| k.is_detached());
                if detached || self::now() >= deadline {
                    if !detached {
                        log::warn!("the kernel's filesystem did not unmount in time; stopping");
                    }
                    return self.shutdown();
                }
            }
            self.last_turn_ms = self::now().millis_since(now);
        }
    }

    fn next_timeout(&self) -> Option<u64> {
        let now = now();
        let stall = self
            .clients
            .iter()
            .flatten()
            .filter_map(|c| c.stalled_since.map(|t| t.plus_millis(CLIENT_SEND_STALL_MS)))
            .min();
        let next = [
            self.node.poll_timeout(),
            stall,
            self.controls.iter().flatten().map(|c| c.deadline).min(),
            self.peer.as_ref().and_then(peer::PeerSockets::poll_timeout),
            self.watchdog.as_ref().map(|_| self.next_pet),
            self.cluster
                .as_ref()
                .and_then(cluster::ClusterNet::poll_timeout),
            // A kernel worker's end, or a stop's, is looked for every 50 ms.
            self.kernel
                .as_ref()
                .filter(|k| k.is_busy() || self.stopping.is_some())
                .map(|_| now.plus_millis(KERNEL_WORKER_POLL_MS)),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(next.millis_since(now))
    }

    /// Takes every pending connection on one listener.
    fn accept_from(&mut self, listener: Listener) {
        loop {
            let accepted = match listener {
                Listener::NbdUnix => self.nbd_unix.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Control => self.control.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::NbdTcp | Listener::Metrics => {
                    let tcp = if listener == Listener::NbdTcp {
                        &self.nbd_tcp
                    } else {
                        &self.metrics
                    };
                    match tcp {
                        Some(tcp) => tcp.accept().map(|(s, _)| Stream::Tcp(s)),
                        None => return,
                    }
                }
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("{}: accept failed (error={e})", listener.name());
                    return;
                }
            };
            match listener {
                Listener::NbdUnix | Listener::NbdTcp => self.add_client(stream, false),
                Listener::Control => self.add_service_client(ServiceKind::Control, stream),
                Listener::Metrics => self.add_service_client(ServiceKind::Metrics, stream),
            }
        }
    }

    /// Serves a new client; `kernel`: the kernel's NBD client, which skips the handshake.
    fn add_client(&mut self, stream: Stream, kernel: bool) {
        let configured = match &stream {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true).and_then(|()| s.set_nodelay(true)),
        };
        if let Err(e) = configured {
            log::warn!("nbd: cannot set up a new client's socket (error={e})");
            return;
        }
        let conn = if kernel {
            self.node.handle_kernel_attached(now())
        } else {
            self.node.handle_client_connected(now())
        };
        let Some(conn) = conn else {
            log::warn!("nbd: every connection slot is taken, closing a new client at once");
            return;
        };
        let slot = conn.slot as usize;
        assert!(
            self.clients[slot].is_none(),
            "the node reused a slot the runtime still holds"
        );
        let flags = CLIENT_EVENTS;
        let token = epoll::EventData::new_u64(TOKEN_CLIENT | slot as u64);
        if let Err(e) = epoll::add(&self.epoll, stream.fd(), token, flags) {
            log::error!("epoll: cannot watch a client (error={e})");
            self.node.handle_client_closed(conn);
            return;
        }
        self.clients[slot] = Some(Client {
            conn,
            stream,
            inbuf: vec![0u8; CLIENT_READ_BUFFER_BYTES],
            in_start: 0,
            in_end: 0,
            outq: VecDeque::new(),
            readable: true,
            closing: false,
            watching_output: false,
            output_full: false,
            stalled_since: None,
        });
    }

    /// Offers a client's buffered bytes to the node and reads more while it takes them.
    /// Returns true if the node took any byte (progress, for `retry_blocked`).
    fn read_client(&mut self, slot: usize) -> bool {
        let mut progress = false;
        loop {
            let Some(client) = self.clients[slot].as_mut() else {
                return progress;
            };
            if client.is_output_full() {
                // Taken up again by `flush_client` once the client reads its replies.
                client.output_full = true;
                return progress;
            }
            if client.in_start < client.in_end {
                let conn = client.conn;
                let taken = self.node.handle_client_bytes(
                    conn,
                    &client.inbuf[client.in_start..client.in_end],
                    now(),
                );
                client.in_start += taken;
                progress |= taken > 0;
                if client.in_start == client.in_end {
                    client.in_start = 0;
                    client.in_end = 0;
                } else {
                    // The node took only part: it waits for requests in flight to finish.
                    if !self.blocked.contains(&slot) {
                        self.blocked.push(slot);
                    }
                    return progress;
                }
            }
            let Some(client) = self.clients[slot].as_mut() else {
                return progress;
            };
            if !client.readable || client.closing {
                return progress;
            }
            if client.in_end == client.inbuf.len() {
                if client.in_start == 0 {
                    // Full of bytes the node cannot take yet.
                    if !self.blocked.contains(&slot) {
                        self.blocked.push(slot);
                    }
                    return progress;
                }
                client.inbuf.copy_within(client.in_start..client.in_end, 0);
                client.in_end -= client.in_start;
                client.in_start = 0;
            }
            if client.in_start == client.in_end {
                // Nothing buffered: a large write payload is read straight into its I/O buffer,
                // saving a copy through the read buffer.
                let conn = client.conn;
                let stream = &mut client.stream;
                if let Some(target) = self.node.payload_target(conn) {
                    if target.len() >= DIRECT_PAYLOAD_BYTES_MIN {
                        let want = target.len();
                        match stream.read(target) {
                            Ok(0) => {
                                self.drop_client(slot);
                                return progress;
                            }
                            Ok(n) => {
                                self.node.handle_payload_received(conn, n, now());
                                if n < want {
                                    if let Some(client) = self.clients[slot].as_mut() {
                                        client.readable = false;
                                    }
                                }
                                continue;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                if let Some(client) = self.clients[slot].as_mut() {
                                    client.readable = false;
                                }
                                return progress;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(_) => {
                                self.drop_client(slot);
                                return progress;
                            }
                        }
                    }
                }
            }
            let Some(client) = self.clients[slot].as_mut() else {
                return progress;
            };
            let end = client.in_end;
            match client.stream.read(&mut client.inbuf[end..]) {
                Ok(0) => {
                    self.drop_client(slot);
                    return progress;
                }
                Ok(n) => {
                    // A short read emptied the socket: with edge-triggered epoll the next byte
                    // to arrive raises a new event, so there is no need to read until EAGAIN.
                    if client.in_end + n < client.inbuf.len() {
                        client.readable = false;
                    }
                    client.in_end += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    client.readable = false;
                    if client.in_start == client.in_end {
                        return progress;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_client(slot);
                    return progress;
                }
            }
        }
    }

    fn drop_client(&mut self, slot: usize) {
        let Some(mut client) = self.clients[slot].take() else {
            return;
        };
        let _ = epoll::delete(&self.epoll, client.stream.fd());
        for pending in client.outq.drain(..) {
            if let Some(data) = pending.data {
                self.node.recycle(data);
            }
        }
        self.node.handle_client_closed(client.conn);
    }

    /// Attaches the volume to the kernel while the node serves it, detaches it when it stops.
    fn service_kernel(&mut self) {
        let Some(kernel) = self.kernel.as_mut() else {
            return;
        };
        let serving = self.node.is_serving() && self.stopping.is_none();
        let size = self.node.volume_bytes();
        let attached = kernel.service(serving, size, self.node.transmission_flags());
        let described = Some(kernel.describe());
        if let Some(stream) = attached {
            self.add_client(Stream::Unix(stream), true);
        }
        self.node.note_kernel_volume(described);
    }

    fn reap_disk(&mut self) {
        while let Some(completion) = self.disk.poll_completion() {
            self.node.handle_disk_completion(completion, now());
        }
    }

    /// Offers waiting clients their bytes again, for as long as any of them makes progress.
    /// Capacity comes back in many places (a disk completion, a reply written and its buffer
    /// recycled, a client dropped), so this runs at the end of every turn of the loop: a client
    /// whose bytes wait in our buffer gets no new event from its socket.
    fn retry_blocked(&mut self) {
        while !self.blocked.is_empty() {
            let blocked = std::mem::take(&mut self.blocked);
            let mut progress = false;
            for slot in blocked {
                progress |= self.read_client(slot);
            }
            self.drain_outputs();
            if !progress {
                return;
            }
        }
    }

    fn drain_outputs(&mut self) {
        loop {
            while let Some(output) = self.node.poll_output() {
                match output {
                    Output::Send { conn, head, data } => {
                        let slot = conn.slot as usize;
                        match self.clients[slot].as_mut() {
                            Some(client) if client.conn == conn => {
                                client.outq.push_back(Pending {
                                    head,
                                    data,
                                    sent: 0,
                                });
                                self.dirty.push(slot);
                            }
                            _ => {
                                if let Some(data) = data {
                                    self.node.recycle(data);
                                }
                            }
                        }
                    }
                    Output::Close { conn } => {
                        let slot = conn.slot as usize;
                        if let Some(client) = self.clients[slot].as_mut() {
                            if client.conn == conn {
                                client.closing = true;
                                self.dirty.push(slot);
                            }
                        }
                    }
                    Output::Disk { tag, request } => {
                        if self.disk.in_flight() == 0 {
                            self.disk_progress = now();
                        }
                        self.disk.push(tag, request)
                    }
                    Output::ProbeClusterIp => match self.cluster.as_mut() {
                        Some(cluster) => cluster.start_probe(now()),
                        None => {
                            log::error!("cluster IP probe asked for, but no lan port is known: reporting the address held (no takeover)");
                            self.node.handle_cluster_ip_probe(true, now());
                        }
                    },
                    Output::ClusterIp(add) => self.set_cluster_ip(add),
                    Output::Fence { reason } => self.fenced = Some(reason),
                    Output::LinkSend { conn, bytes } => self.send_link(conn, bytes),
                    Output::LinkClose { conn } => self.close_link(conn),
                    Output::Metadata {
                        offset,
                        bytes,
                        flush_first,
                    } => {
                        // Synchronous on purpose: nothing queued after it may reach the disk
                        // (or a client) before it is durable. It is rare (a state change, a
                        // cold activity-log extent, a bitmap block while alone).
                        let result = if flush_first {
                            self.disk.flush_sync()
                        } else {
                            Ok(())
                        }
                        .and_then(|()| self.disk.write_at_sync(offset, &bytes));
                        if let Err(e) = result {
                            log::error!("disk: cannot write metadata (offset={offset} error={e})");
                        }
                    }
                }
            }
            if let Err(e) = self.disk.submit() {
                log::error!("disk: io_uring submit failed (error={e})");
            }
            // Disk requests that completed inline (page-cache hits) are answered in this turn.
            let mut reaped = false;
            while let Some(completion) = self.disk.poll_completion() {
                self.node.handle_disk_completion(completion, now());
                self.disk_progress = now();
                reaped = true;
            }
            if !reaped {
                break;
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        for slot in dirty {
            self.flush_client(slot);
        }
    }

    /// Writes as much of a client's queue as its socket takes.
    fn flush_client(&mut self, slot: usize) {
        let mut broken = false;
        let mut sent_buffers: heapless::Vec<IoBuf, 64> = heapless::Vec::new();
        let Some(client) = self.clients[slot].as_mut() else {
            return;
        };
        while !client.outq.is_empty() && !broken {
            let result = {
                let mut slices: heapless::Vec<IoSlice<'_>, 64> = heapless::Vec::new();
                for pending in client.outq.iter() {
                    let head = pending.head.as_slice();
                    let data = pending.data.as_deref().unwrap_or(&[]);
                    let (head_rest, data_rest) = if pending.sent < head.len() {
                        (&head[pending.sent..], data)
                    } else {
                        (&head[..0], &data[pending.sent - head.len()..])
                    };
                    if slices.len() + 2 > slices.capacity() {
                        break;
                    }
                    for part in [head_rest, data_rest] {
                        if !part.is_empty() {
                            let _ = slices.push(IoSlice::new(part));
                        }
                    }
                }
                client.stream.write_vectored(&slices)
            };
            let written = match result {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    client.stalled_since.get_or_insert(now());
                    if !client.watching_output {
                        let token = epoll::EventData::new_u64(TOKEN_CLIENT | slot as u64);
                        let events = CLIENT_EVENTS | epoll::EventFlags::OUT;
                        if epoll::modify(&self.epoll, client.stream.fd(), token, events).is_ok() {
                            client.watching_output = true;
                        }
                    }
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    broken = true;
                    break;
                }
            };
            if written > 0 {
                client.stalled_since = None;
            }
            let mut left = written;
            while left > 0 {
                let Some(front) = client.outq.front_mut() else {
                    break;
                };
                let remaining = front.len() - front.sent;
                if left >= remaining {
                    left -= remaining;
                    if let Some(Pending {
                        data: Some(data), ..
                    }) = client.outq.pop_front()
                    {
                        if let Err(data) = sent_buffers.push(data) {
                            self.node.recycle(data);
                        }
                    }
                } else {
                    front.sent += left;
                    left = 0;
                }
            }
        }
        if client.outq.is_empty() {
            client.stalled_since = None;
        }
        if client.watching_output && client.outq.is_empty() {
            let token = epoll::EventData::new_u64(TOKEN_CLIENT | slot as u64);
            if epoll::modify(&self.epoll, client.stream.fd(), token, CLIENT_EVENTS).is_ok() {
                client.watching_output = false;
            }
        }
        if client.output_full && !client.is_output_full() {
            // It read its replies: its waiting requests may go on (see `retry_blocked`).
            client.output_full = false;
            if !self.blocked.contains(&slot) {
                self.blocked.push(slot);
            }
        }
        let finished = client.closing && client.outq.is_empty();
        for data in sent_buffers {
            self.node.recycle(data);
        }
        if broken || finished {
            self.drop_client(slot);
        }
    }

    /// Drops clients whose sockets took none of their waiting replies for too long.
    fn expire_stalled_clients(&mut self, now: Instant) {
        for slot in 0..self.clients.len() {
            let stalled = matches!(
                &self.clients[slot],
                Some(c) if c.stalled_since.is_some_and(|t| now.millis_since(t) >= CLIENT_SEND_STALL_MS)
            );
            if stalled {
                log::warn!(
                    "nbd: dropping a client that has not read its replies for {} s",
                    CLIENT_SEND_STALL_MS / 1000
                );
                self.drop_client(slot);
            }
        }
    }

    fn add_service_client(&mut self, kind: ServiceKind, stream: Stream) {
        let Some(index) = self.controls.iter().position(Option::is_none) else {
            // Every service slot is busy: this client gets nothing rather than stall the loop.
            return;
        };
        let nonblocking = match &stream {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        };
        if nonblocking.is_err() {
            return;
        }
        let token = epoll::EventData::new_u64(TOKEN_CONTROL_CLIENT | index as u64);
        if epoll::add(&self.epoll, stream.fd(), token, epoll::EventFlags::IN).is_err() {
            return;
        }
        let deadline = now().plus_millis(CONTROL_CLIENT_TIMEOUT_MS);
        self.controls[index] = Some(ControlClient {
            kind,
            stream,
            line: Vec::new(),
            deadline,
        });
    }

    /// `links`: both links with their addresses, state, last frame and round-trip time.
    fn links_reply(&self, json: bool) -> CommandReply {
        let Some(peer) = &self.config.peer else {
            let text = "links: no peer configured (standalone node)".to_string();
            return CommandReply { ok: false, text };
        };
        let rows: Vec<(
            &str,
            crate::config::LinkAddrs,
            Option<crate::peer::link::LinkInfo>,
        )> = vec![
            (
                "heartbeat",
                peer.heartbeat,
                self.node.link_info(crate::peer::LinkKind::Heartbeat),
            ),
            (
                "lan",
                peer.lan,
                self.node.link_info(crate::peer::LinkKind::Lan),
            ),
        ];
        if json {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(name, addrs, info)| {
                    serde_json::json!({
                        "link": name,
                        "local": addrs.local.to_string(),
                        "remote": addrs.remote.to_string(),
                        "state": info.map_or("down", |i| i.state.name()),
                        "carrier": cluster::carrier_word(addrs.local.ip()),
                        "last_frame_ms": info.and_then(|i| i.last_frame_age_ms),
                        "rtt_ms": info.and_then(|i| i.rtt_ms),
                    })
                })
                .collect();
            return CommandReply {
                ok: true,
                text: serde_json::Value::Array(list).to_string(),
            };
        }
        let mut text = String::new();
        for (name, addrs, info) in rows {
            let state = info.map_or("down", |i| i.state.name());
            let last = info
                .and_then(|i| i.last_frame_age_ms)
                .map_or("-".to_string(), |ms| format!("{ms} ms ago"));
            let rtt = info
                .and_then(|i| i.rtt_ms)
                .map_or("-".to_string(), |ms| format!("{ms} ms"));
            text.push_str(&format!(
                "{name:9} {state:10} {} -> {}  last frame: {last}  rtt: {rtt}  carrier: {}\n",
                addrs.local,
                addrs.remote,
                cluster::carrier_word(addrs.local.ip())
            ));
        }
        text.pop();
        CommandReply { ok: true, text }
    }

    /// Runs one console command, from `ctl` or the serial console. The runtime answers what only
    /// it knows (recent events, the running configuration); the node answers the rest.
    fn execute(&mut self, line: &str, json: bool) -> CommandReply {
        if self.test_mode && line.trim() == "freeze" {
            self.freeze();
        }
        match console::parse(line) {
            Ok(Command::Events) => {
                let events = logger::recent_events();
                if json {
                    let list: Vec<serde_json::Value> = events
                        .iter()
                        .map(|e| serde_json::json!({"unix_ms": e.unix_ms, "level": e.level, "text": e.text}))
                        .collect();
                    let text = serde_json::Value::Array(list).to_string();
                    CommandReply { ok: true, text }
                } else {
                    CommandReply {
                        ok: true,
                        text: logger::render_events(&events),
                    }
                }
            }
            Ok(Command::Links) => self.links_reply(json),
            Ok(Command::Config) => {
                let text = self.config.to_masked_toml();
                CommandReply {
                    ok: true,
                    text: text.trim_end().to_string(),
                }
            }
            _ => self.node.handle_command(line, json),
        }
    }

    /// `freeze`, only on a board booted with `tandem.test=1`: the event loop stops for good, as
    /// a hung daemon's would. Nothing is answered or petted again; the watchdog resets the
    /// board (docs/FAILOVER.md, "A hung daemon", says what the peer does meanwhile).
    fn freeze(&mut self) -> ! {
        log::warn!("freeze (test mode): the event loop stops here; the watchdog resets the board");
        self.flush_serial_log();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }

    /// Reads a control command; the protocol is one request line (`[--json] COMMAND...`) and a
    /// reply that starts with `ok` or `error` on its own line.
    fn read_control(&mut self, index: usize) {
        let Some(control) = self.controls[index].as_mut() else {
            return;
        };
        let kind = control.kind;
        let mut buf = [0u8; 1024];
        loop {
            match control.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    control.line.extend_from_slice(&buf[..n]);
                    if control.line.contains(&b'\n') {
                        break;
                    }
                    if control.line.len() > CONTROL_LINE_BYTES_MAX {
                        self.finish_control(index, false, "command line too long");
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_control(index);
                    return;
                }
            }
        }
        let Some(control) = self.controls[index].as_mut() else {
            return;
        };
        let end = control
            .line
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(control.line.len());
        let Ok(line) = std::str::from_utf8(&control.line[..end]) else {
            self.finish_control(index, false, "command is not UTF-8");
            return;
        };
        let line = line.trim().to_string();
        if kind == ServiceKind::Metrics {
            let response = if line.starts_with("GET ") {
                let body = crate::metrics::render(&self.node.status());
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.0 405 Method Not Allowed\r\nConnection: close\r\n\r\n".to_string()
            };
            self.reply_service(index, response.as_bytes());
            return;
        }
        let (json, command) = split_json_flag(&line);
        let reply = self.execute(&command, json);
        self.finish_control(index, reply.ok, &reply.text);
    }

    fn finish_control(&mut self, index: usize, ok: bool, text: &str) {
        self.reply_service(index, control_reply(ok, text).as_bytes());
    }

    /// Sends a reply and closes. Replies are a few KiB and fit the socket buffer; a client that
    /// does not read loses the rest rather than stall the loop.
    fn reply_service(&mut self, index: usize, bytes: &[u8]) {
        if let Some(control) = self.controls[index].as_mut() {
            let mut sent = 0;
            while sent < bytes.len() {
                match control
                    .stream
                    .write_vectored(&[IoSlice::new(&bytes[sent..])])
                {
                    Ok(0) => break,
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        self.close_control(index);
    }

    fn close_control(&mut self, index: usize) {
        if let Some(control) = self.controls[index].take() {
            let _ = epoll::delete(&self.epoll, control.stream.fd());
        }
    }

    fn expire_controls(&mut self, now: Instant) {
        for index in 0..self.controls.len() {
            if matches!(&self.controls[index], Some(c) if c.deadline <= now) {
                if matches!(&self.controls[index], Some(c) if c.kind == ServiceKind::Metrics) {
                    self.close_control(index);
                } else {
                    self.finish_control(index, false, "timed out waiting for a command line");
                }
            }
        }
    }

    /// Carries out the lan port's timers and hands its events to the node.
    fn service_cluster(&mut self, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.poll_timeout().is_some_and(|t| t <= now) {
            cluster.handle_timeout(now);
        }
        for event in cluster.take_events() {
            match event {
                cluster::ClusterEvent::Uplink(uplink) => self.node.handle_uplink(uplink, now),
                cluster::ClusterEvent::ProbeDone { answered } => {
                    self.node.handle_cluster_ip_probe(answered, now);
                }
                cluster::ClusterEvent::Conflict => self.node.handle_cluster_ip_conflict(now),
            }
        }
    }

    /// Adds (and announces) or drops the cluster IP; an `nbd_listen` on it follows.
    fn set_cluster_ip(&mut self, add: bool) {
        let Some(cluster) = self.cluster.as_mut() else {
            log::error!(
                "the cluster IP cannot be {} here: no lan port is known",
                if add { "added" } else { "dropped" }
            );
            return;
        };
        if add {
            cluster.add_vip(now());
        } else {
            cluster.remove_vip();
        }
        if !nbd_follows_vip(&self.config) {
            return;
        }
        let Some(addr) = self.config.volume.nbd_listen else {
            return;
        };
        if add && self.nbd_tcp.is_none() {
            match bind_tcp(addr, "nbd_listen") {
                Ok(listener) => {
                    let token = epoll::EventData::new_u64(TOKEN_NBD_TCP);
                    if let Err(e) = epoll::add(&self.epoll, &listener, token, epoll::EventFlags::IN)
                    {
                        log::error!("nbd_listen {addr}: cannot watch it (error={e})");
                    }
                    log::info!("nbd_listen opened on the cluster IP (address={addr})");
                    self.nbd_tcp = Some(listener);
                }
                Err(e) => log::error!("nbd_listen: cannot open it on the cluster IP ({e})"),
            }
        } else if !add {
            if let Some(listener) = self.nbd_tcp.take() {
                let _ = epoll::delete(&self.epoll, &listener);
                log::info!("nbd_listen closed with the cluster IP (address={addr})");
            }
        }
    }

    /// Rule 4: the engine has frozen I/O and dropped the cluster IP; now stop. In test mode
    /// (`watchdog.device = "none"`) the process exits with status 75; on a board it reboots at
    /// once (the watchdog, no longer petted, is the backstop).
    fn fence(mut self, reason: String) -> Result<(), StartError> {
        self.flush_serial_log();
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.remove_vip();
        }
        for slot in 0..self.clients.len() {
            self.drop_client(slot);
        }
        self.remove_sockets();
        let test_mode = !matches!(
            self.config.watchdog.as_ref().map(|w| &w.device),
            Some(WatchdogDevice::Path(_))
        );
        if test_mode {
            return Err(StartError::Fenced(format!("fenced: {reason}")));
        }
        log::error!("fenced: rebooting now ({reason})");
        self.flush_serial_log();
        if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
            log::error!("reboot failed (error={e}); the watchdog resets the board");
        }
        // The watchdog is no longer petted: wait for it.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.remove_vip();
        }
        let _ = epoll::delete(&self.epoll, &self.nbd_unix);
        if let Some(tcp) = &self.nbd_tcp {
            let _ = epoll::delete(&self.epoll, tcp);
        }
        self.remove_sockets();
        // Requests already handed to the disk finish; their clients are told, then dropped.
        let deadline = now().plus_millis(10_000);
        while self.disk.in_flight() > 0 && now() < deadline {
            let _ = rustix::event::poll(
                &mut [rustix::event::PollFd::new(
                    &self.disk.poll_fd(),
                    rustix::event::PollFlags::IN,
                )],
                Some(&rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                }),
            );
            self.reap_disk();
            self.drain_outputs();
        }
        for slot in 0..self.clients.len() {
            self.drop_client(slot);
        }
        if self.disk.in_flight() > 0 {
            // The disk did not finish in time: the volume stays marked unclean, which is the
            // truth, and the next start says so.
            log::warn!(
                "stopped with disk requests still in flight; the volume stays marked unclean"
            );
            return Ok(());
        }
        // Data first, then the mark: a power cut between the two leaves "unclean", never a
        // clean mark over writes that were not yet durable.
        self.disk
            .flush_sync()
            .map_err(|e| StartError::Internal(format!("cannot flush the volume: {e}")))?;
        for (offset, bytes) in self.node.take_final_metadata() {
            self.disk
                .write_at_sync(offset, &bytes)
                .map_err(|e| StartError::Internal(format!("cannot write the bitmap: {e}")))?;
        }
        if let Some(superblock) = self.node.superblock() {
            self.volume.superblock = superblock.clone();
        }
        self.volume.superblock.flags |= flags::CLEAN_SHUTDOWN;
        self.volume.superblock.sequence += 1;
        volume::write_superblock(&self.disk, &self.volume.layout, &self.volume.superblock)
            .map_err(|e| StartError::Internal(format!("cannot mark the volume clean: {e}")))?;
        log::info!("stopped cleanly");
        Ok(())
    }
}
