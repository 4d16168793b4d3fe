//! The configuration file: reading, checking and rendering tandem's TOML config.
//!
//! The schema is the contract of INTERFACE.md ("Config file (TOML)"). This module owns:
//!
//! - [`parse`]: text to a typed [`Config`]. Pure: it never touches the filesystem.
//! - [`load`]: reads the file, parses it, then runs the checks that need the filesystem (the
//!   cluster key file).
//! - [`Config::to_masked_toml`]: the running configuration rendered back as TOML.
//!
//! **Every problem at once, each with its line and dotted key.** An operator fixing a config on a
//! serial console wants the whole list in one go, not one problem per reboot. Serde stops at the
//! first error and forgets positions, so this module walks a `toml_edit` document by hand:
//! each section checks its keys (unknown, missing, wrong type, bad value), then the relations
//! between them, and reports every problem it finds. A value that failed its own check is left
//! out of the relation checks, so one mistake gives one problem. Only a TOML syntax error stops
//! the walk (there is no document to walk then).
//!
//! Decisions beyond INTERFACE.md:
//!
//! - `node.state_dir` is optional, default `/var/lib/tandem`.
//! - `[cluster]` is all about failover: on a standalone node (no `[peer]`) every key given in it
//!   is a problem, since it could only be a misunderstanding (a cluster IP nobody takes over).
//! - `[watchdog]` is required with `[peer]`; its `device` is required, `timeout_s` defaults to 5.
//! - Every socket address needs a non-zero port (the peer and the clients must know where to
//!   connect); a link's `remote` must be a specific address, in the family of its `local`, and
//!   differ from it; the two links need different `local` addresses; the NBD and control
//!   sockets need different paths.
//! - Paths may be relative (to the working directory of `tandem run`); they must not be empty.
//! - A config text larger than [`CONFIG_LEN_MAX`] bytes is refused before parsing.

use std::fmt;
use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, TableLike};

/// The largest config text accepted, in bytes: a real config is about 1 KiB.
pub const CONFIG_LEN_MAX: usize = 1 << 20;

/// The length of the shared cluster secret in `peer.key_file`, in bytes.
pub const CLUSTER_KEY_LEN: u64 = 32;

const NODE_NAME_LEN_MAX: usize = 63;
pub(crate) const STATE_DIR_DEFAULT: &str = "/var/lib/tandem";
const HEARTBEAT_INTERVAL_MS_DEFAULT: u32 = 100;
const HEARTBEAT_INTERVAL_MS_RANGE: RangeInclusive<u32> = 10..=10_000;
const DEAD_TIME_MS_DEFAULT: u32 = 1000;
/// A peer is declared dead only after this many heartbeats in a row were missed.
const DEAD_TIME_HEARTBEATS_MIN: u32 = 3;
const DEAD_TIME_MS_MAX: u32 = 60_000;
const WATCHDOG_TIMEOUT_S_DEFAULT: u32 = 5;
const WATCHDOG_TIMEOUT_S_RANGE: RangeInclusive<u32> = 1..=600;
const VIP_PREFIX_LEN_RANGE: RangeInclusive<u8> = 1..=32;

const _: () =
    assert!(DEAD_TIME_MS_DEFAULT >= DEAD_TIME_HEARTBEATS_MIN * HEARTBEAT_INTERVAL_MS_DEFAULT);
const _: () =
    assert!(DEAD_TIME_HEARTBEATS_MIN * *HEARTBEAT_INTERVAL_MS_RANGE.end() <= DEAD_TIME_MS_MAX);
const _: () = assert!(*HEARTBEAT_INTERVAL_MS_RANGE.start() <= HEARTBEAT_INTERVAL_MS_DEFAULT);
const _: () = assert!(HEARTBEAT_INTERVAL_MS_DEFAULT <= *HEARTBEAT_INTERVAL_MS_RANGE.end());
const _: () = assert!(*WATCHDOG_TIMEOUT_S_RANGE.start() <= WATCHDOG_TIMEOUT_S_DEFAULT);
const _: () = assert!(WATCHDOG_TIMEOUT_S_DEFAULT <= *WATCHDOG_TIMEOUT_S_RANGE.end());

/// A checked configuration: every value in it passed [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub volume: VolumeConfig,
    /// Absent: a standalone node (no mirroring, no failover).
    pub peer: Option<PeerConfig>,
    /// All defaults on a standalone node.
    pub cluster: ClusterConfig,
    /// Always present with a peer; absent on a standalone node means no watchdog.
    pub watchdog: Option<WatchdogConfig>,
    pub console: ConsoleConfig,
    /// Absent: no metrics listener.
    pub metrics: Option<MetricsConfig>,
}

/// `[node]`: this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// 1 to 63 characters of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// Epochs, keys, local state. Default `/var/lib/tandem`.
    pub state_dir: PathBuf,
}

/// `[volume]`: the backing store and the NBD listeners that export it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// A block device or a regular file; the metadata lives at its end.
    pub backing: PathBuf,
    /// The unix NBD listener.
    pub nbd_socket: PathBuf,
    /// The optional TCP NBD listener (off when absent).
    pub nbd_listen: Option<SocketAddr>,
    /// O_DIRECT for aligned I/O. `None`: the runtime chooses (on for block devices, off for
    /// regular files).
    pub direct_io: Option<bool>,
    /// The kernel block device the primary attaches the volume to (`/dev/nbdN`), through the
    /// nbd netlink interface; off when absent. Excludes `nbd_listen` (one writer per node).
    pub attach: Option<PathBuf>,
    /// Where the primary mounts the ext4 filesystem of the attached volume; needs `attach`.
    pub mount: Option<PathBuf>,
}

/// The two ends of one link between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkAddrs {
    /// This node's end, where it listens.
    pub local: SocketAddr,
    /// The peer's end: same address family as `local`, never unspecified.
    pub remote: SocketAddr,
}

/// `[peer]`: the other node of the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Differs from `node.name`.
    pub name: String,
    /// The shared 32-byte secret that authenticates the frames ([`load`] checks it).
    pub key_file: PathBuf,
    /// The dedicated cable between the boards.
    pub heartbeat: LinkAddrs,
    /// The path through the LAN switch.
    pub lan: LinkAddrs,
}

/// `[cluster]`: failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster IP, on the interface that holds `lan.local`.
    pub vip: Option<Vip>,
    /// The gateway probe. Automatic failover needs both `vip` and `uplink_probe`.
    pub uplink_probe: Option<IpAddr>,
    /// In 10..=10000, default 100.
    pub heartbeat_interval_ms: u32,
    /// At least 3 heartbeat intervals, at most 60000; default 1000.
    pub dead_time_ms: u32,
    /// Default [`Failback::Manual`].
    pub failback: Failback,
    /// `node.name` or `peer.name`; required by [`Failback::Preferred`].
    pub preferred: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            vip: None,
            uplink_probe: None,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS_DEFAULT,
            dead_time_ms: DEAD_TIME_MS_DEFAULT,
            failback: Failback::Manual,
            preferred: None,
        }
    }
}

/// The cluster IP with its prefix length, written `a.b.c.d/N` with N in 1..=32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vip {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Whether the role moves back to the preferred node once it is eligible again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failback {
    /// `"manual"`: the role stays where it is until the operator moves it.
    Manual,
    /// `"preferred"`: the role switches over to `cluster.preferred` when it is eligible.
    Preferred,
}

impl Failback {
    /// The config file's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Failback::Manual => "manual",
            Failback::Preferred => "preferred",
        }
    }
}

impl fmt::Display for Failback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `watchdog.device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogDevice {
    /// `"none"`: test mode, where fencing exits the process (status 75) and never reboots.
    None,
    /// A watchdog device such as `/dev/watchdog0`.
    Path(PathBuf),
}

impl fmt::Display for WatchdogDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchdogDevice::None => f.write_str("none"),
            WatchdogDevice::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// `[watchdog]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchdogConfig {
    pub device: WatchdogDevice,
    /// In 1..=600, default 5.
    pub timeout_s: u32,
}

/// `[console]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// The optional serial console.
    pub tty: Option<PathBuf>,
    /// The unix socket of `tandem ctl`; differs from `volume.nbd_socket`.
    pub control_socket: PathBuf,
}

/// `[metrics]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl Config {
    /// True without a `[peer]`: no mirroring, no failover.
    pub fn is_standalone(&self) -> bool {
        self.peer.is_none()
    }

    /// The running configuration as TOML, for the `config` console command: every value
    /// explicit, defaults included, so that [`parse`] reads it back to the same `Config`.
    ///
    /// Secrets are masked here and nowhere else. Today the config holds none inline (the cluster
    /// key lives in `peer.key_file`, whose path is printed as is); a secret added to the schema
    /// later must be written here as `"********"`, never in clear.
    pub fn to_masked_toml(&self) -> String {
        let mut out = TomlWriter::default();

        out.section("node");
        out.string("name", &self.node.name);
        out.path("state_dir", &self.node.state_dir);

        out.section("volume");
        out.path("backing", &self.volume.backing);
        out.path("nbd_socket", &self.volume.nbd_socket);
        if let Some(listen) = self.volume.nbd_listen {
            out.string("nbd_listen", &listen.to_string());
        }
        match self.volume.direct_io {
            Some(direct_io) => out.raw("direct_io", &direct_io.to_string()),
            None => out.comment("direct_io: automatic (on for block devices, off for files)"),
        }
        if let Some(attach) = &self.volume.attach {
            out.path("attach", attach);
        }
        if let Some(mount) = &self.volume.mount {
            out.path("mount", mount);
        }

        if let Some(peer) = &self.peer {
            out.section("peer");
            out.string("name", &peer.name);
            out.path("key_file", &peer.key_file);
            out.link("heartbeat", &peer.heartbeat);
            out.link("lan", &peer.lan);

            // `[cluster]` is refused on a standalone node: written only with a peer.
            let cluster = &self.cluster;
            out.section("cluster");
            if let Some(vip) = cluster.vip {
                out.string("vip", &vip.to_string());
            }
            if let Some(probe) = cluster.uplink_probe {
                out.string("uplink_probe", &probe.to_string());
            }
            out.raw(
                "heartbeat_interval_ms",
                &cluster.heartbeat_interval_ms.to_string(),
            );
            out.raw("dead_time_ms", &cluster.dead_time_ms.to_string());
            out.string("failback", cluster.failback.as_str());
            if let Some(preferred) = &cluster.preferred {
                out.string("preferred", preferred);
            }
        }

        if let Some(watchdog) = &self.watchdog {
            out.section("watchdog");
            out.string("device", &watchdog.device.to_string());
            out.raw("timeout_s", &watchdog.timeout_s.to_string());
        }

        out.section("console");
        if let Some(tty) = &self.console.tty {
            out.path("tty", tty);
        }
        out.path("control_socket", &self.console.control_socket);

        if let Some(metrics) = &self.metrics {
            out.section("metrics");
            out.string("listen", &metrics.listen.to_string());
        }
        out.text
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based. For a missing key, the line of its section's header; `None` when the section is
    /// missing too.
    pub line: Option<u32>,
    /// The dotted key, e.g. `peer.heartbeat.remote`; a section's name for a missing section;
    /// empty when the problem is not tied to a key (a TOML syntax error, a file too large).
    pub key: String,
    /// What is wrong, in words for the operator.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Why [`load`] refused a config file.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read.
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file was read; these are all its problems, in line order.
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

impl fmt::Display for LoadError {
    /// One line per problem, each prefixed with the path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Unreadable { path, error } => {
                write!(
                    f,
                    "{}: cannot read the config file: {error}",
                    path.display()
                )
            }
            LoadError::Invalid { path, problems } => {
                for (i, problem) in problems.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{}: {problem}", path.display())?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Unreadable { error, .. } => Some(error),
            LoadError::Invalid { .. } => None,
        }
    }
}

/// Parses and checks a config text. Pure: no filesystem access (see [`load`] for the key file).
/// On failure, every problem found, in line order.
pub fn parse(text: &str) -> Result<Config, Vec<ConfigProblem>> {
    let checked = check_text(text);
    checked.finish()
}

/// Reads the config file at `path`, parses it, then checks the key file named by
/// `peer.key_file`: it must exist, be a regular file of exactly 32 bytes, be readable, and not
/// be accessible to group or others (mode & 0o077 == 0). Its problems are reported with the line
/// of `peer.key_file`, together with all the others.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let unreadable = |error| LoadError::Unreadable {
        path: path.to_path_buf(),
        error,
    };
    let mut bytes = Vec::new();
    let file = fs::File::open(path).map_err(unreadable)?;
    // One byte over the limit is enough for `parse` to refuse the text.
    file.take(CONFIG_LEN_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    let invalid = |problems| LoadError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    if bytes.len() > CONFIG_LEN_MAX {
        // Before the UTF-8 check: the cut may have split a character.
        return Err(invalid(vec![too_large()]));
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let offset = error.utf8_error().valid_up_to();
            return Err(invalid(vec![ConfigProblem {
                line: Some(line_at(error.as_bytes(), offset)),
                key: String::new(),
                message: "the file is not valid UTF-8".to_string(),
            }]));
        }
    };
    let mut checked = check_text(&text);
    if let Some((key_file, line)) = checked.key_file.take() {
        checked.problems.extend(check_key_file(&key_file, line));
    }
    checked.finish().map_err(invalid)
}

/// N of `/dev/nbdN`.
pub fn nbd_index(path: &Path) -> Option<u32> {
    let digits = path.to_str()?.strip_prefix("/dev/nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 6 {
        return None;
    }
    digits.parse().ok()
}

fn too_large() -> ConfigProblem {
    ConfigProblem {
        line: None,
        key: String::new(),
        message: format!("the config is larger than {CONFIG_LEN_MAX} bytes"),
    }
}

/// The filesystem checks of `peer.key_file`.
fn check_key_file(path: &Path, line: Option<u32>) -> Vec<ConfigProblem> {
    let problem = |message: String| ConfigProblem {
        line,
        key: "peer.key_file".to_string(),
        message,
    };
    let shown = path.display();
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) => return vec![problem(format!("cannot use {shown}: {error}"))],
    };
    if !metadata.is_file() {
        return vec![problem(format!("{shown} is not a regular file"))];
    }
    let mut problems = Vec::new();
    if metadata.len() != CLUSTER_KEY_LEN {
        problems.push(problem(format!(
            "{shown} holds {} bytes; a cluster key is exactly {CLUSTER_KEY_LEN} bytes",
            metadata.len()
        )));
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        problems.push(problem(format!(
            "{shown} is accessible to group or others (mode {mode:04o}); it must be 0600 or \
             stricter"
        )));
    }
    if let Err(error) = fs::File::open(path) {
        problems.push(problem(format!("cannot open {shown}: {error}")));
    }
    problems
}

/// Everything one pass over a config text found.
struct Checked {
    config: Option<Config>,
    problems: Vec<ConfigProblem>,
    /// `peer.key_file` and its line, when it is a valid path, for the checks of [`load`].
    key_file: Option<(PathBuf, Option<u32>)>,
}

impl Checked {
    fn finish(mut self) -> Result<Config, Vec<ConfigProblem>> {
        match self.config {
            Some(config) if self.problems.is_empty() => Ok(config),
            _ => {
                // A section that fails always reports why (`Reported` is only made by
                // `Checker::report`), so a missing config without a problem is a bug here.
                assert!(
                    !self.problems.is_empty(),
                    "config check failed without a problem"
                );
                // Line order; problems with no line (missing sections) last.
                self.problems
                    .sort_by_key(|problem| (problem.line.is_none(), problem.line));
                Err(self.problems)
            }
        }
    }
}

fn check_text(text: &str) -> Checked {
    let mut checker = Checker {
        text,
        problems: Vec::new(),
        key_file: None,
    };
    let config = checker.config();
    Checked {
        config: config.ok(),
        problems: checker.problems,
        key_file: checker.key_file,
    }
}

/// Proof that a problem was reported: only [`Checker::report`] makes one, so a value that could
/// not be built always left a problem behind.
#[derive(Debug)]
struct Reported;

type Checking<T> = Result<T, Reported>;

/// A table of the document (a `[section]`, a dotted key or an inline table) and where it is.
struct Section<'d> {
    /// The dotted key; empty for the document root.
    path: String,
    table: &'d dyn TableLike,
    line: Option<u32>,
}

/// One key's value and where it is.
struct Field<'d> {
    path: String,
    item: &'d Item,
    line: Option<u32>,
}

/// The walk over one document: collects problems instead of stopping at the first.
struct Checker<'t> {
    text: &'t str,
    problems: Vec<ConfigProblem>,
    key_file: Option<(PathBuf, Option<u32>)>,
}

const SECTIONS: &[&str] = &[
    "node", "volume", "peer", "cluster", "watchdog", "console", "metrics",
];

impl Checker<'_> {
    fn config(&mut self) -> Checking<Config> {
        if self.text.len() > CONFIG_LEN_MAX {
            let problem = too_large();
            return Err(self.report(problem.line, &problem.key, problem.message));
        }
        let document = match ImDocument::parse(self.text) {
            Ok(document) => document,
            Err(error) => {
                let line = self.line_of(error.span());
                // The parser's message may span lines; a problem is one line.
                let message = error.message().trim().replace('\n', "; ");
                return Err(self.report(line, "", format!("invalid TOML: {message}")));
            }
        };
        let root = Section {
            path: String::new(),
            table: document.as_table(),
            line: None,
        };
        self.unknown_keys(&root, SECTIONS);

        let node = self.required_section(&root, "node", Self::node);
        let volume = self.required_section(&root, "volume", Self::volume);

        let node_name = node.as_ref().ok().map(|node| node.name.as_str());
        // `Some(line of [peer])` when the section is there, even if it is broken.
        let peer_present = self.field(&root, "peer").map(|field| field.line);
        let peer = self.optional_section(&root, "peer", |c, section| c.peer(section, node_name));
        let peer_name = peer
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(|peer| peer.name.as_str());

        let cluster = match peer_present {
            Some(_) => self.optional_section(&root, "cluster", |c, section| {
                c.cluster(section, node_name, peer_name)
            }),
            None => self.optional_section(&root, "cluster", Self::cluster_without_peer),
        };
        let cluster = cluster.map(Option::unwrap_or_default);

        let watchdog = self.optional_section(&root, "watchdog", Self::watchdog);
        let watchdog = match (watchdog, peer_present) {
            (Ok(None), Some(peer_line)) => Err(self.report(
                peer_line,
                "watchdog",
                "missing required section [watchdog]: a node with a [peer] must be able to \
                 fence (device = \"none\" for test mode)",
            )),
            (watchdog, _) => watchdog,
        };

        let volume_ok = volume.as_ref().ok();
        let console =
            self.required_section(&root, "console", |c, section| c.console(section, volume_ok));
        let metrics = self.optional_section(&root, "metrics", Self::metrics);

        Ok(Config {
            node: node?,
            volume: volume?,
            peer: peer?,
            cluster: cluster?,
            watchdog: watchdog?,
            console: console?,
            metrics: metrics?,
        })
    }

    fn node(&mut self, section: &Section<'_>) -> Checking<NodeConfig> {
        self.unknown_keys(section, &["name", "state_dir"]);
        let name = self.required(section, "name", Self::node_name);
        let state_dir = self.optional(section, "state_dir", Self::path);
        Ok(NodeConfig {
            name: name?,
            state_dir: state_dir?.unwrap_or_else(|| PathBuf::from(STATE_DIR_DEFAULT)),
        })
    }

    fn volume(&mut self, section: &Section<'_>) -> Checking<VolumeConfig> {
        self.unknown_keys(
            section,
            &[
                "backing",
                "nbd_socket",
                "nbd_listen",
                "direct_io",
                "attach",
                "mount",
            ],
        );
        let backing = self.required(section, "backing", Self::path);
        let nbd_socket = self.required(section, "nbd_socket", Self::path);
        let mut nbd_listen = self.optional(section, "nbd_listen", Self::socket_addr);
        let direct_io = self.optional(section, "direct_io", Self::boolean);
        let attach = self.optional(section, "attach", Self::nbd_device);
        let mut mount = self.optional(section, "mount", Self::absolute_path);
        if let (Ok(Some(_)), Ok(None)) = (&mount, &attach) {
            mount = Err(self.report(
                self.line_of_key(section, "mount"),
                "volume.mount",
                "needs volume.attach: the filesystem is mounted from the attached /dev/nbdN",
            ));
        }
        if let (Ok(Some(_)), Ok(Some(_))) = (&nbd_listen, &attach) {
            nbd_listen = Err(self.report(
                self.line_of_key(section, "nbd_listen"),
                "volume.nbd_listen",
                "cannot be used with volume.attach: the kernel's filesystem and a TCP client \
                 would both write the volume",
            ));
        }
        Ok(VolumeConfig {
            backing: backing?,
            nbd_socket: nbd_socket?,
            nbd_listen: nbd_listen?,
            direct_io: direct_io?,
            attach: attach?,
            mount: mount?,
        })
    }

    fn peer(&mut self, section: &Section<'_>, node_name: Option<&str>) -> Checking<PeerConfig> {
        self.unknown_keys(section, &["name", "key_file", "heartbeat", "lan"]);
        let mut name = self.required(section, "name", Self::node_name);
        if let (Ok(peer_name), Some(node_name)) = (&name, node_name) {
            if peer_name == node_name {
                name = Err(self.report(
                    self.line_of_key(section, "name"),
                    "peer.name",
                    format!(
                        "\"{peer_name}\" is also node.name: the two nodes need different names"
                    ),
                ));
            }
        }
        let key_file = self.required(section, "key_file", Self::path);
        if let Ok(path) = &key_file {
            self.key_file = Some((path.clone(), self.line_of_key(section, "key_file")));
        }
        let heartbeat = self.required(section, "heartbeat", Self::link_addrs);
        let mut lan = self.required(section, "lan", Self::link_addrs);
        if let (Ok(heartbeat), Ok(lan_addrs)) = (&heartbeat, &lan) {
            if heartbeat.local == lan_addrs.local {
                lan = Err(self.report(
                    self.line_of_key(section, "lan"),
                    "peer.lan.local",
                    format!(
                        "{} is also peer.heartbeat.local: each link needs its own socket",
                        lan_addrs.local
                    ),
                ));
            }
        }
        Ok(PeerConfig {
            name: name?,
            key_file: key_file?,
            heartbeat: heartbeat?,
            lan: lan?,
        })
    }

    fn link_addrs(&mut self, field: &Field<'_>) -> Checking<LinkAddrs> {
        let section = self.table(field)?;
        self.unknown_keys(&section, &["local", "remote"]);
        let local = self.required(&section, "local", Self::socket_addr);
        let remote = self.required(&section, "remote", Self::socket_addr);
        let (local, remote) = (local?, remote?);
        let line = self.line_of_key(&section, "remote");
        let key = join(&section.path, "remote");
        if remote.ip().is_unspecified() {
            let message =
                format!("{remote} is not a specific address: the peer's address goes here");
            return Err(self.report(line, &key, message));
        }
        if local.is_ipv4() != remote.is_ipv4() {
            let message = format!(
                "{remote} and {}.local ({local}) are of different address families",
                section.path
            );
            return Err(self.report(line, &key, message));
        }
        if local == remote {
            let message = format!("{remote} is also {}.local", section.path);
            return Err(self.report(line, &key, message));
        }
        Ok(LinkAddrs { local, remote })
    }

    /// A standalone node has no failover: every key of `[cluster]` is a mistake.
    fn cluster_without_peer(&mut self, section: &Section<'_>) -> Checking<ClusterConfig> {
        self.unknown_keys(section, CLUSTER_KEYS);
        let mut result = Ok(ClusterConfig::default());
        for (name, _) in section.table.iter() {
            if CLUSTER_KEYS.contains(&name) {
                result = Err(self.report(
                    self.line_of_key(section, name),
                    &join(&section.path, name),
                    "only meaningful with a [peer] section: a standalone node has no failover",
                ));
            }
        }
        result
    }

    fn cluster(
        &mut self,
        section: &Section<'_>,
        node_name: Option<&str>,
        peer_name: Option<&str>,
    ) -> Checking<ClusterConfig> {
        self.unknown_keys(section, CLUSTER_KEYS);
        let vip = self.optional(section, "vip", Self::vip);
        let uplink_probe = self.optional(section, "uplink_probe", Self::ip_addr);
        let heartbeat_interval_ms = self.optional(section, "heartbeat_interval_ms", |c, f| {
            c.integer(f, HEARTBEAT_INTERVAL_MS_RANGE)
        });
        let dead_time_ms = self.optional(section, "dead_time_ms", |c, f| {
            c.integer(f, 1..=DEAD_TIME_MS_MAX)
        });
        let failback = self.optional(section, "failback", Self::failback);
        let preferred = self.optional(section, "preferred", Self::node_name);

        let heartbeat_interval_ms = heartbeat_interval_ms?.unwrap_or(HEARTBEAT_INTERVAL_MS_DEFAULT);
        let dead_time_ms = dead_time_ms?;
        let dead_time_min_ms = DEAD_TIME_HEARTBEATS_MIN * heartbeat_interval_ms;
        let dead_time_ms = match dead_time_ms {
            Some(ms) if ms < dead_time_min_ms => Err(self.report(
                self.line_of_key(section, "dead_time_ms"),
                "cluster.dead_time_ms",
                format!(
                    "{ms} is under {DEAD_TIME_HEARTBEATS_MIN} heartbeat intervals \
                     ({dead_time_min_ms}): a few lost heartbeats would fail the peer over"
                ),
            )),
            Some(ms) => Ok(ms),
            None if DEAD_TIME_MS_DEFAULT < dead_time_min_ms => Err(self.report(
                self.line_of_key(section, "heartbeat_interval_ms"),
                "cluster.dead_time_ms",
                format!(
                    "the default {DEAD_TIME_MS_DEFAULT} is under {DEAD_TIME_HEARTBEATS_MIN} \
                     heartbeat intervals ({dead_time_min_ms}): set dead_time_ms"
                ),
            )),
            None => Ok(DEAD_TIME_MS_DEFAULT),
        };

        let mut preferred = preferred;
        if let (Ok(Some(name)), Some(node_name), Some(peer_name)) =
            (&preferred, node_name, peer_name)
        {
            if name != node_name && name != peer_name {
                preferred = Err(self.report(
                    self.line_of_key(section, "preferred"),
                    "cluster.preferred",
                    format!(
                        "\"{name}\" names neither node.name (\"{node_name}\") nor peer.name \
                         (\"{peer_name}\")"
                    ),
                ));
            }
        }
        let mut failback = failback;
        if let (Ok(Some(Failback::Preferred)), Ok(None)) = (&failback, &preferred) {
            failback = Err(self.report(
                self.line_of_key(section, "failback"),
                "cluster.failback",
                "\"preferred\" needs cluster.preferred to name the preferred node",
            ));
        }
        Ok(ClusterConfig {
            vip: vip?,
            uplink_probe: uplink_probe?,
            heartbeat_interval_ms,
            dead_time_ms: dead_time_ms?,
            failback: failback?.unwrap_or(Failback::Manual),
            preferred: preferred?,
        })
    }

    fn watchdog(&mut self, section: &Section<'_>) -> Checking<WatchdogConfig> {
        self.unknown_keys(section, &["device", "timeout_s"]);
        let device = self.required(section, "device", Self::watchdog_device);
        let timeout_s = self.optional(section, "timeout_s", |c, f| {
            c.integer(f, WATCHDOG_TIMEOUT_S_RANGE)
        });
        Ok(WatchdogConfig {
            device: device?,
            timeout_s: timeout_s?.unwrap_or(WATCHDOG_TIMEOUT_S_DEFAULT),
        })
    }

    fn console(
        &mut self,
        section: &Section<'_>,
        volume: Option<&VolumeConfig>,
    ) -> Checking<ConsoleConfig> {
        self.unknown_keys(section, &["tty", "control_socket"]);
        let tty = self.optional(section, "tty", Self::path);
        let mut control_socket = self.required(section, "control_socket", Self::path);
        if let (Ok(path), Some(volume)) = (&control_socket, volume) {
            if *path == volume.nbd_socket {
                control_socket = Err(self.report(
                    self.line_of_key(section, "control_socket"),
                    "console.control_socket",
                    format!("{} is also volume.nbd_socket", path.display()),
                ));
            }
        }
        Ok(ConsoleConfig {
            tty: tty?,
            control_socket: control_socket?,
        })
    }

    fn metrics(&mut self, section: &Section<'_>) -> Checking<MetricsConfig> {
        self.unknown_keys(section, &["listen"]);
        let listen = self.required(section, "listen", Self::socket_addr)?;
        Ok(MetricsConfig { listen })
    }

    // ---- values ----

    fn string<'d>(&mut self, field: &Field<'d>) -> Checking<&'d str> {
        match field.item.as_str() {
            Some(text) => Ok(text),
            None => Err(self.expected(field, "a string")),
        }
    }

    fn boolean(&mut self, field: &Field<'_>) -> Checking<bool> {
        match field.item.as_bool() {
            Some(value) => Ok(value),
            None => Err(self.expected(field, "a boolean (true or false)")),
        }
    }

    fn integer(&mut self, field: &Field<'_>, range: RangeInclusive<u32>) -> Checking<u32> {
        let Some(value) = field.item.as_integer() else {
            return Err(self.expected(field, "an integer"));
        };
        match u32::try_from(value) {
            Ok(value) if range.contains(&value) => Ok(value),
            _ => Err(self.invalid(
                field,
                format!(
                    "{value} is out of range: it must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    fn path(&mut self, field: &Field<'_>) -> Checking<PathBuf> {
        let text = self.string(field)?;
        if text.is_empty() {
            return Err(self.invalid(field, "must not be empty".to_string()));
        }
        if text.contains('\0') {
            return Err(self.invalid(field, "must not contain a NUL character".to_string()));
        }
        Ok(PathBuf::from(text))
    }

    fn absolute_path(&mut self, field: &Field<'_>) -> Checking<PathBuf> {
        let path = self.path(field)?;
        if !path.is_absolute() {
            return Err(self.invalid(field, "must be an absolute path".to_string()));
        }
        Ok(path)
    }

    /// `/dev/nbdN`: the kernel's NBD devices, the only ones the volume can be attached to.
    fn nbd_device(&mut self, field: &Field<'_>) -> Checking<PathBuf> {
        let path = self.path(field)?;
        if nbd_index(&path).is_none() {
            return Err(self.invalid(
                field,
                format!(
                    "{} is not an NBD device: it must be /dev/nbdN",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    fn node_name(&mut self, field: &Field<'_>) -> Checking<String> {
        let text = self.string(field)?;
        check_node_name(text).map_err(|message| self.invalid(field, message))?;
        Ok(text.to_string())
    }

    fn socket_addr(&mut self, field: &Field<'_>) -> Checking<SocketAddr> {
        let text = self.string(field)?;
        let Ok(addr) = text.parse::<SocketAddr>() else {
            return Err(self.invalid(
                field,
                format!(
                    "\"{}\" is not a socket address (IP:port, e.g. \"10.99.0.1:7788\" or \
                     \"[fd00::1]:7788\")",
                    text.escape_debug()
                ),
            ));
        };
        if addr.port() == 0 {
            return Err(self.invalid(field, format!("{addr} needs a port other than 0")));
        }
        Ok(addr)
    }

    fn ip_addr(&mut self, field: &Field<'_>) -> Checking<IpAddr> {
        let text = self.string(field)?;
        match text.parse::<IpAddr>() {
            Ok(addr) if !addr.is_unspecified() && !addr.is_multicast() => Ok(addr),
            Ok(addr) => Err(self.invalid(field, format!("{addr} is not a unicast address"))),
            Err(_) => Err(self.invalid(
                field,
                format!("\"{}\" is not an IP address", text.escape_debug()),
            )),
        }
    }

    fn vip(&mut self, field: &Field<'_>) -> Checking<Vip> {
        let text = self.string(field)?;
        parse_vip(text).map_err(|message| self.invalid(field, message))
    }

    fn failback(&mut self, field: &Field<'_>) -> Checking<Failback> {
        match self.string(field)? {
            "manual" => Ok(Failback::Manual),
            "preferred" => Ok(Failback::Preferred),
            other => Err(self.invalid(
                field,
                format!(
                    "\"{}\" is not a failback policy: \"manual\" or \"preferred\"",
                    other.escape_debug()
                ),
            )),
        }
    }

    fn watchdog_device(&mut self, field: &Field<'_>) -> Checking<WatchdogDevice> {
        if field.item.as_str() == Some("none") {
            return Ok(WatchdogDevice::None);
        }
        self.path(field).map(WatchdogDevice::Path)
    }

    // ---- tables and keys ----

    fn table<'d>(&mut self, field: &Field<'d>) -> Checking<Section<'d>> {
        match field.item.as_table_like() {
            Some(table) => Ok(Section {
                path: field.path.clone(),
                table,
                line: field.line,
            }),
            None => Err(self.expected(field, "a table")),
        }
    }

    fn field<'d>(&self, section: &Section<'d>, name: &str) -> Option<Field<'d>> {
        let (key, item) = section.table.get_key_value(name)?;
        Some(Field {
            path: join(&section.path, name),
            item,
            line: self
                .line_of(key.span())
                .or_else(|| self.line_of(item.span())),
        })
    }

    fn line_of_key(&self, section: &Section<'_>, name: &str) -> Option<u32> {
        self.field(section, name)
            .and_then(|field| field.line)
            .or(section.line)
    }

    fn required<'d, T>(
        &mut self,
        section: &Section<'d>,
        name: &str,
        check: impl FnOnce(&mut Self, &Field<'d>) -> Checking<T>,
    ) -> Checking<T> {
        match self.field(section, name) {
            Some(field) => check(self, &field),
            None if section.path.is_empty() => {
                Err(self.report(None, name, format!("missing required section [{name}]")))
            }
            None => Err(self.report(
                section.line,
                &join(&section.path, name),
                "missing required key",
            )),
        }
    }

    fn optional<'d, T>(
        &mut self,
        section: &Section<'d>,
        name: &str,
        check: impl FnOnce(&mut Self, &Field<'d>) -> Checking<T>,
    ) -> Checking<Option<T>> {
        match self.field(section, name) {
            Some(field) => check(self, &field).map(Some),
            None => Ok(None),
        }
    }

    /// A section that must be there; `check` reads its keys.
    fn required_section<'d, T>(
        &mut self,
        parent: &Section<'d>,
        name: &str,
        check: impl FnOnce(&mut Self, &Section<'d>) -> Checking<T>,
    ) -> Checking<T> {
        self.required(parent, name, |c, field| {
            let section = c.table(field)?;
            check(c, &section)
        })
    }

    /// A section that may be absent; `check` reads its keys when it is there.
    fn optional_section<'d, T>(
        &mut self,
        parent: &Section<'d>,
        name: &str,
        check: impl FnOnce(&mut Self, &Section<'d>) -> Checking<T>,
    ) -> Checking<Option<T>> {
        self.optional(parent, name, |c, field| {
            let section = c.table(field)?;
            check(c, &section)
        })
    }

    fn unknown_keys(&mut self, section: &Section<'_>, known: &[&str]) {
        for (name, item) in section.table.iter() {
            if known.contains(&name) {
                continue;
            }
            let line = self
                .line_of(section.table.key(name).and_then(|key| key.span()))
                .or_else(|| self.line_of(item.span()));
            let what = if section.path.is_empty() {
                "section"
            } else {
                "key"
            };
            self.report(
                line,
                &join(&section.path, name),
                format!("unknown {what} (known: {})", known.join(", ")),
            );
        }
    }

    // ---- problems ----

    fn report(&mut self, line: Option<u32>, key: &str, message: impl Into<String>) -> Reported {
        self.problems.push(ConfigProblem {
            line,
            key: key.to_string(),
            message: message.into(),
        });
        Reported
    }

    fn expected(&mut self, field: &Field<'_>, what: &str) -> Reported {
        let found = describe(field.item);
        self.report(
            field.line,
            &field.path,
            format!("expected {what}, found {found}"),
        )
    }

    fn invalid(&mut self, field: &Field<'_>, message: String) -> Reported {
        self.report(field.line, &field.path, message)
    }

    fn line_of(&self, span: Option<Range<usize>>) -> Option<u32> {
        span.map(|span| line_at(self.text.as_bytes(), span.start))
    }
}

const CLUSTER_KEYS: &[&str] = &[
    "vip",
    "uplink_probe",
    "heartbeat_interval_ms",
    "dead_time_ms",
    "failback",
    "preferred",
];

/// 1 to 63 characters of A-Z a-z 0-9 . _ - (also `tandem setup`'s answers).
pub(crate) fn check_node_name(text: &str) -> Result<(), String> {
    let is_valid = (1..=NODE_NAME_LEN_MAX).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if is_valid {
        Ok(())
    } else {
        Err(format!(
            "\"{}\" is not a node name: 1 to {NODE_NAME_LEN_MAX} characters of A-Z a-z 0-9 . _ -",
            text.escape_debug()
        ))
    }
}

/// `a.b.c.d/N`, N in 1..=32, a unicast address (also `tandem setup`'s cluster IP).
pub(crate) fn parse_vip(text: &str) -> Result<Vip, String> {
    let shown = text.escape_debug();
    let Some((addr, prefix_len)) = text.split_once('/') else {
        return Err(format!(
            "\"{shown}\" has no prefix length: a.b.c.d/N, e.g. \"192.168.1.10/24\""
        ));
    };
    let Ok(addr) = addr.parse::<Ipv4Addr>() else {
        return Err(format!(
            "\"{shown}\": \"{}\" is not an IPv4 address",
            addr.escape_debug()
        ));
    };
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(format!("\"{shown}\": {addr} is not a unicast address"));
    }
    let prefix_len = match prefix_len.parse::<u8>() {
        Ok(n)
            if prefix_len.bytes().all(|b| b.is_ascii_digit())
                && VIP_PREFIX_LEN_RANGE.contains(&n) =>
        {
            n
        }
        _ => {
            return Err(format!(
                "\"{shown}\": the prefix length must be between {} and {}",
                VIP_PREFIX_LEN_RANGE.start(),
                VIP_PREFIX_LEN_RANGE.end()
            ))
        }
    };
    Ok(Vip { addr, prefix_len })
}

/// The 1-based line of byte `offset` in `text`.
fn line_at(text: &[u8], offset: usize) -> u32 {
    let end = offset.min(text.len());
    let newlines = text[..end].iter().filter(|&&b| b == b'\n').count();
    u32::try_from(newlines + 1).unwrap_or(u32::MAX)
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// The kind of a TOML item with its article, for "expected X, found Y".
fn describe(item: &Item) -> &'static str {
    match item.type_name() {
        "string" => "a string",
        "integer" => "an integer",
        "float" => "a float",
        "boolean" => "a boolean",
        "datetime" => "a date-time",
        "array" => "an array",
        "inline table" => "an inline table",
        "table" => "a table",
        "array of tables" => "an array of tables",
        other => other,
    }
}

/// Writes TOML for [`Config::to_masked_toml`] and for the tandem.toml `tandem setup` writes.
#[derive(Default)]
pub(crate) struct TomlWriter {
    pub(crate) text: String,
}

impl TomlWriter {
    pub(crate) fn section(&mut self, name: &str) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push('[');
        self.text.push_str(name);
        self.text.push_str("]\n");
    }

    pub(crate) fn raw(&mut self, key: &str, value: &str) {
        self.text.push_str(key);
        self.text.push_str(" = ");
        self.text.push_str(value);
        self.text.push('\n');
    }

    pub(crate) fn string(&mut self, key: &str, value: &str) {
        self.raw(key, &quote(value));
    }

    fn path(&mut self, key: &str, value: &Path) {
        self.string(key, &value.to_string_lossy());
    }

    fn link(&mut self, key: &str, link: &LinkAddrs) {
        let value = format!(
            "{{ local = {}, remote = {} }}",
            quote(&link.local.to_string()),
            quote(&link.remote.to_string())
        );
        self.raw(key, &value);
    }

    pub(crate) fn comment(&mut self, text: &str) {
        self.text.push_str("# ");
        self.text.push_str(text);
        self.text.push('\n');
    }
}

/// A TOML basic string.
pub(crate) fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of INTERFACE.md, verbatim.
    const EXAMPLE: &str = r#"[node]
name = "nas-a"                       # this node
state_dir = "/var/lib/tandem"        # epochs, keys, local state

[volume]
backing = "/dev/md0"                 # block device or regular file; metadata lives at its end
nbd_socket = "/run/tandem/nbd.sock"  # unix listener, fixed-newstyle NBD handshake
nbd_listen = "192.168.131.230:10809" # optional TCP listener on the cluster IP (off when absent)

[peer]                               # absent: a standalone node (no mirroring, no failover)
name = "nas-b"
key_file = "/etc/tandem/cluster.key" # shared 32-byte secret; frames are authenticated with it
heartbeat = { local = "10.99.0.1:7788", remote = "10.99.0.2:7788" }
lan = { local = "192.168.131.231:7788", remote = "192.168.131.232:7788" }

[cluster]
vip = "192.168.131.230/24"           # optional cluster IP, on the interface that holds lan.local
uplink_probe = "192.168.131.1"       # gateway probe; automatic failover needs both vip and uplink_probe
heartbeat_interval_ms = 100
dead_time_ms = 1000
failback = "manual"                  # or "preferred"
preferred = "nas-a"

[watchdog]                           # required with [peer]; absent on a standalone node means none
device = "/dev/watchdog0"            # "none": test mode, where fencing exits the process (status 75) and never reboots
timeout_s = 5

[console]
tty = "/dev/ttyS0"                   # optional serial console
control_socket = "/run/tandem/ctl.sock"
"#;

    const STANDALONE: &str = r#"[node]
name = "solo"
[volume]
backing = "/srv/disk.img"
nbd_socket = "/run/tandem/nbd.sock"
[console]
control_socket = "/run/tandem/ctl.sock"
"#;

    /// A small pair config; the broken cases below edit one line of it, so the line numbers in
    /// their expectations are the ones shown here.
    const PAIR: &str = r#"[node]
name = "nas-a"
[volume]
backing = "/dev/md0"
nbd_socket = "/run/nbd.sock"
[peer]
name = "nas-b"
key_file = "/etc/tandem/cluster.key"
heartbeat = { local = "10.99.0.1:7788", remote = "10.99.0.2:7788" }
lan = { local = "192.168.1.1:7788", remote = "192.168.1.2:7788" }
[watchdog]
device = "none"
[console]
control_socket = "/run/ctl.sock"
"#;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text) {
            Ok(config) => panic!("accepted a broken config: {config:?}\n{text}"),
            Err(problems) => problems,
        }
    }

    fn summary(problems: &[ConfigProblem]) -> Vec<(Option<u32>, &str)> {
        problems.iter().map(|p| (p.line, p.key.as_str())).collect()
    }

    #[test]
    fn example_of_the_interface_parses_to_the_expected_config() {
        let config = parse(EXAMPLE).unwrap();
        let expected = Config {
            node: NodeConfig {
                name: "nas-a".into(),
                state_dir: "/var/lib/tandem".into(),
            },
            volume: VolumeConfig {
                backing: "/dev/md0".into(),
                nbd_socket: "/run/tandem/nbd.sock".into(),
                nbd_listen: Some(addr("192.168.131.230:10809")),
                direct_io: None,
                attach: None,
                mount: None,
            },
            peer: Some(PeerConfig {
                name: "nas-b".into(),
                key_file: "/etc/tandem/cluster.key".into(),
                heartbeat: LinkAddrs {
                    local: addr("10.99.0.1:7788"),
                    remote: addr("10.99.0.2:7788"),
                },
                lan: LinkAddrs {
                    local: addr("192.168.131.231:7788"),
                    remote: addr("192.168.131.232:7788"),
                },
            }),
            cluster: ClusterConfig {
                vip: Some(Vip {
                    addr: Ipv4Addr::new(192, 168, 131, 230),
                    prefix_len: 24,
                }),
                uplink_probe: Some(IpAddr::V4(Ipv4Addr::new(192, 168, 131, 1))),
                heartbeat_interval_ms: 100,
                dead_time_ms: 1000,
                failback: Failback::Manual,
                preferred: Some("nas-a".into()),
            },
            watchdog: Some(WatchdogConfig {
                device: WatchdogDevice::Path("/dev/watchdog0".into()),
                timeout_s: 5,
            }),
            console: ConsoleConfig {
                tty: Some("/dev/ttyS0".into()),
                control_socket: "/run/tandem/ctl.sock".into(),
            },
            metrics: None,
        };
        assert_eq!(config, expected);
        assert!(!config.is_standalone());
        assert_eq!(
            expected.cluster.vip.unwrap().to_string(),
            "192.168.131.230/24"
        );
    }

    #[test]
    fn minimal_standalone_config_gets_the_defaults() {
        let config = parse(STANDALONE).unwrap();
        assert!(config.is_standalone());
        assert_eq!(config.node.state_dir, PathBuf::from("/var/lib/tandem"));
        assert_eq!(config.volume.nbd_listen, None);
        assert_eq!(config.volume.direct_io, None);
        assert_eq!(config.volume.attach, None);
        assert_eq!(config.volume.mount, None);
        assert_eq!(config.cluster, ClusterConfig::default());
        assert_eq!(config.cluster.heartbeat_interval_ms, 100);
        assert_eq!(config.cluster.dead_time_ms, 1000);
        assert_eq!(config.cluster.failback, Failback::Manual);
        assert_eq!(config.watchdog, None);
        assert_eq!(config.console.tty, None);
        assert_eq!(config.metrics, None);
    }

    #[test]
    fn additions_to_the_interface_parse() {
        let text = PAIR.replace(
            "nbd_socket = \"/run/nbd.sock\"",
            "nbd_socket = \"/run/nbd.sock\"\ndirect_io = false",
        ) + "[metrics]\nlisten = \"127.0.0.1:9100\"\n[cluster]\nfailback = \"preferred\"\npreferred = \"nas-b\"\n";
        let config = parse(&text).unwrap();
        assert_eq!(config.volume.direct_io, Some(false));
        assert_eq!(
            config.metrics,
            Some(MetricsConfig {
                listen: addr("127.0.0.1:9100")
            })
        );
        assert_eq!(config.cluster.failback, Failback::Preferred);
        assert_eq!(config.cluster.preferred.as_deref(), Some("nas-b"));
        assert_eq!(config.watchdog.unwrap().device, WatchdogDevice::None);
    }

    #[test]
    fn links_written_as_tables_or_dotted_keys_parse_like_inline_tables() {
        let tables =
            PAIR.replace(
                "heartbeat = { local = \"10.99.0.1:7788\", remote = \"10.99.0.2:7788\" }\n",
                "heartbeat.local = \"10.99.0.1:7788\"\nheartbeat.remote = \"10.99.0.2:7788\"\n",
            )
            .replace(
                "lan = { local = \"192.168.1.1:7788\", remote = \"192.168.1.2:7788\" }\n",
                "",
            ) + "[peer.lan]\nlocal = \"192.168.1.1:7788\"\nremote = \"192.168.1.2:7788\"\n";
        assert_eq!(parse(&tables).unwrap(), parse(PAIR).unwrap());

        // Lines of problems inside those forms point at the offending key.
        let broken = tables.replace("remote = \"192.168.1.2:7788\"", "remote = \"192.168.1.2\"");
        let broken = broken.replace(
            "heartbeat.local = \"10.99.0.1:7788\"",
            "heartbeat.local = 1",
        );
        assert_eq!(
            summary(&problems(&broken)),
            [
                (Some(9), "peer.heartbeat.local"),
                (Some(17), "peer.lan.remote")
            ]
        );
    }

    /// Each case edits [`PAIR`] (or [`STANDALONE`]) and expects exactly one problem.
    #[test]
    fn each_broken_config_reports_its_line_and_key() {
        struct Case {
            what: &'static str,
            base: &'static str,
            from: &'static str,
            to: &'static str,
            line: Option<u32>,
            key: &'static str,
            message: &'static str,
        }
        let cases = [
            Case {
                what: "unknown key",
                base: PAIR,
                from: "device = \"none\"\n",
                to: "device = \"none\"\ntimeout = 5\n",
                line: Some(13),
                key: "watchdog.timeout",
                message: "unknown key",
            },
            Case {
                what: "unknown section",
                base: PAIR,
                from: "[console]",
                to: "[extras]\n[console]",
                line: Some(13),
                key: "extras",
                message: "unknown section",
            },
            Case {
                what: "wrong type",
                base: PAIR,
                from: "name = \"nas-b\"",
                to: "name = 7",
                line: Some(7),
                key: "peer.name",
                message: "expected a string, found an integer",
            },
            Case {
                what: "section of the wrong type",
                base: STANDALONE,
                from: "[node]",
                to: "metrics = \"127.0.0.1:9100\"\n[node]",
                line: Some(1),
                key: "metrics",
                message: "expected a table, found a string",
            },
            Case {
                what: "missing key",
                base: PAIR,
                from: "backing = \"/dev/md0\"",
                to: "",
                line: Some(3),
                key: "volume.backing",
                message: "missing required key",
            },
            Case {
                what: "missing section",
                base: STANDALONE,
                from: "[console]\ncontrol_socket = \"/run/tandem/ctl.sock\"\n",
                to: "",
                line: None,
                key: "console",
                message: "missing required section [console]",
            },
            Case {
                what: "bad socket address",
                base: PAIR,
                from: "remote = \"10.99.0.2:7788\"",
                to: "remote = \"10.99.0.2\"",
                line: Some(9),
                key: "peer.heartbeat.remote",
                message: "is not a socket address",
            },
            Case {
                what: "port 0",
                base: STANDALONE,
                from: "nbd_socket = \"/run/tandem/nbd.sock\"",
                to: "nbd_socket = \"/run/tandem/nbd.sock\"\nnbd_listen = \"0.0.0.0:0\"",
                line: Some(6),
                key: "volume.nbd_listen",
                message: "port other than 0",
            },
            Case {
                what: "attach to something that is not an NBD device",
                base: STANDALONE,
                from: "nbd_socket = \"/run/tandem/nbd.sock\"",
                to: "nbd_socket = \"/run/tandem/nbd.sock\"\nattach = \"/dev/sda\"",
                line: Some(6),
                key: "volume.attach",
                message: "must be /dev/nbdN",
            },
            Case {
                what: "mount without attach",
                base: STANDALONE,
                from: "nbd_socket = \"/run/tandem/nbd.sock\"",
                to: "nbd_socket = \"/run/tandem/nbd.sock\"\nmount = \"/data\"",
                line: Some(6),
                key: "volume.mount",
                message: "needs volume.attach",
            },
            Case {
                what: "a relative mount point",
                base: STANDALONE,
                from: "nbd_socket = \"/run/tandem/nbd.sock\"",
                to: "nbd_socket = \"/run/tandem/nbd.sock\"\nattach = \"/dev/nbd0\"\nmount = \"data\"",
                line: Some(7),
                key: "volume.mount",
                message: "absolute path",
            },
            Case {
                what: "attach and a TCP listener",
                base: STANDALONE,
                from: "nbd_socket = \"/run/tandem/nbd.sock\"",
                to: "nbd_socket = \"/run/tandem/nbd.sock\"\nnbd_listen = \"127.0.0.1:10809\"\nattach = \"/dev/nbd0\"",
                line: Some(6),
                key: "volume.nbd_listen",
                message: "cannot be used with volume.attach",
            },
            Case {
                what: "link ends of different address families",
                base: PAIR,
                from: "remote = \"192.168.1.2:7788\"",
                to: "remote = \"[fd00::2]:7788\"",
                line: Some(10),
                key: "peer.lan.remote",
                message: "different address families",
            },
            Case {
                what: "unspecified remote",
                base: PAIR,
                from: "remote = \"10.99.0.2:7788\"",
                to: "remote = \"0.0.0.0:7788\"",
                line: Some(9),
                key: "peer.heartbeat.remote",
                message: "not a specific address",
            },
            Case {
                what: "both links on one socket",
                base: PAIR,
                from: "local = \"192.168.1.1:7788\"",
                to: "local = \"10.99.0.1:7788\"",
                line: Some(10),
                key: "peer.lan.local",
                message: "each link needs its own socket",
            },
            Case {
                what: "bad vip prefix",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nvip = \"192.168.1.10/33\"\n[console]",
                line: Some(14),
                key: "cluster.vip",
                message: "prefix length must be between 1 and 32",
            },
            Case {
                what: "vip without prefix",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nvip = \"192.168.1.10\"\n[console]",
                line: Some(14),
                key: "cluster.vip",
                message: "no prefix length",
            },
            Case {
                what: "bad uplink probe",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nuplink_probe = \"gateway\"\n[console]",
                line: Some(14),
                key: "cluster.uplink_probe",
                message: "is not an IP address",
            },
            Case {
                what: "heartbeat interval out of range",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nheartbeat_interval_ms = 5\n[console]",
                line: Some(14),
                key: "cluster.heartbeat_interval_ms",
                message: "between 10 and 10000",
            },
            Case {
                what: "dead time under 3 intervals",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nheartbeat_interval_ms = 100\ndead_time_ms = 250\n[console]",
                line: Some(15),
                key: "cluster.dead_time_ms",
                message: "under 3 heartbeat intervals (300)",
            },
            Case {
                what: "default dead time under 3 intervals",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nheartbeat_interval_ms = 500\n[console]",
                line: Some(14),
                key: "cluster.dead_time_ms",
                message: "the default 1000 is under 3 heartbeat intervals (1500)",
            },
            Case {
                what: "preferred naming a stranger",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\npreferred = \"nas-c\"\n[console]",
                line: Some(14),
                key: "cluster.preferred",
                message: "names neither node.name",
            },
            Case {
                what: "failback preferred without preferred",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nfailback = \"preferred\"\n[console]",
                line: Some(14),
                key: "cluster.failback",
                message: "needs cluster.preferred",
            },
            Case {
                what: "failback not an enum value",
                base: PAIR,
                from: "[console]",
                to: "[cluster]\nfailback = \"sometimes\"\n[console]",
                line: Some(14),
                key: "cluster.failback",
                message: "\"manual\" or \"preferred\"",
            },
            Case {
                what: "peer without watchdog",
                base: PAIR,
                from: "[watchdog]\ndevice = \"none\"\n",
                to: "",
                line: Some(6),
                key: "watchdog",
                message: "missing required section [watchdog]",
            },
            Case {
                what: "watchdog timeout out of range",
                base: PAIR,
                from: "device = \"none\"\n",
                to: "device = \"none\"\ntimeout_s = 0\n",
                line: Some(13),
                key: "watchdog.timeout_s",
                message: "between 1 and 600",
            },
            Case {
                what: "duplicate node names",
                base: PAIR,
                from: "name = \"nas-b\"",
                to: "name = \"nas-a\"",
                line: Some(7),
                key: "peer.name",
                message: "is also node.name",
            },
            Case {
                what: "bad node name",
                base: PAIR,
                from: "name = \"nas-a\"",
                to: "name = \"nas a\"",
                line: Some(2),
                key: "node.name",
                message: "is not a node name",
            },
            Case {
                what: "empty path",
                base: PAIR,
                from: "key_file = \"/etc/tandem/cluster.key\"",
                to: "key_file = \"\"",
                line: Some(8),
                key: "peer.key_file",
                message: "must not be empty",
            },
            Case {
                what: "control socket on the NBD socket",
                base: PAIR,
                from: "control_socket = \"/run/ctl.sock\"",
                to: "control_socket = \"/run/nbd.sock\"",
                line: Some(14),
                key: "console.control_socket",
                message: "is also volume.nbd_socket",
            },
            Case {
                what: "standalone node with a cluster IP",
                base: STANDALONE,
                from: "[console]",
                to: "[cluster]\nvip = \"192.168.1.10/24\"\n[console]",
                line: Some(7),
                key: "cluster.vip",
                message: "only meaningful with a [peer] section",
            },
            Case {
                what: "TOML syntax error",
                base: PAIR,
                from: "name = \"nas-b\"",
                to: "name = \"nas-b",
                line: Some(7),
                key: "",
                message: "invalid TOML",
            },
            Case {
                what: "multi-line parser message",
                base: PAIR,
                from: "[peer]",
                to: "[peer",
                line: Some(6),
                key: "",
                message: "invalid TOML: invalid table header; expected",
            },
            Case {
                what: "duplicate key",
                base: PAIR,
                from: "name = \"nas-b\"",
                to: "name = \"nas-b\"\nname = \"nas-c\"",
                line: Some(8),
                key: "",
                message: "invalid TOML: duplicate key `name` in table `peer`",
            },
        ];
        for case in cases {
            assert!(
                case.base.contains(case.from),
                "{}: edit does not apply",
                case.what
            );
            let text = case.base.replacen(case.from, case.to, 1);
            let problems = problems(&text);
            assert_eq!(
                summary(&problems),
                [(case.line, case.key)],
                "{}: {problems:#?}",
                case.what
            );
            assert!(
                problems[0].message.contains(case.message),
                "{}: {:?} does not say {:?}",
                case.what,
                problems[0].message,
                case.message
            );
        }
    }

    #[test]
    fn all_problems_are_reported_at_once_in_line_order() {
        let text = PAIR.replace("name = \"nas-b\"", "name = 7").replace(
            "backing = \"/dev/md0\"",
            "backing = \"/dev/md0\"\nsize = 10",
        ) + "[cluster]\nvip = \"10.0.0.1/0\"\n";
        let problems = problems(&text);
        assert_eq!(
            summary(&problems),
            [
                (Some(5), "volume.size"),
                (Some(8), "peer.name"),
                (Some(17), "cluster.vip"),
            ]
        );
    }

    #[test]
    fn problems_display_with_line_and_key() {
        let problem = ConfigProblem {
            line: Some(12),
            key: "volume.backing".into(),
            message: "expected a string".into(),
        };
        assert_eq!(
            problem.to_string(),
            "line 12: volume.backing: expected a string"
        );
        let missing = problems(
            &STANDALONE.replace("[console]\ncontrol_socket = \"/run/tandem/ctl.sock\"\n", ""),
        );
        assert_eq!(
            missing[0].to_string(),
            "console: missing required section [console]"
        );
        let error = LoadError::Invalid {
            path: "/etc/tandem.toml".into(),
            problems: vec![problem.clone(), problem],
        };
        assert_eq!(
            error.to_string(),
            "/etc/tandem.toml: line 12: volume.backing: expected a string\n\
             /etc/tandem.toml: line 12: volume.backing: expected a string"
        );
    }

    #[test]
    fn masked_toml_reads_back_to_the_same_config() {
        for text in [EXAMPLE, STANDALONE, PAIR] {
            let config = parse(text).unwrap();
            let rendered = config.to_masked_toml();
            assert_eq!(parse(&rendered), Ok(config), "{rendered}");
        }
        let rendered = parse(EXAMPLE).unwrap().to_masked_toml();
        assert!(
            rendered.contains("key_file = \"/etc/tandem/cluster.key\"\n"),
            "{rendered}"
        );
        assert!(rendered.contains("dead_time_ms = 1000\n"), "{rendered}");
    }

    #[test]
    fn quoted_strings_survive_the_round_trip() {
        let weird = "/tmp/a \"b\" \\ c\u{1}";
        let text = format!("x = {}\n", quote(weird));
        let document = ImDocument::parse(text.as_str()).unwrap();
        assert_eq!(
            document.as_table().get("x").and_then(Item::as_str),
            Some(weird)
        );
    }

    #[test]
    fn oversized_config_is_refused_before_parsing() {
        let text = format!("{STANDALONE}#{}\n", "x".repeat(CONFIG_LEN_MAX));
        assert_eq!(summary(&problems(&text)), [(None, "")]);
    }

    /// A directory of its own under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("tandem-config-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        /// Writes a key file of `len` bytes with `mode` and a [`PAIR`] config naming it.
        fn pair_with_key(&self, len: usize, mode: u32) -> PathBuf {
            let key = self.0.join("cluster.key");
            fs::write(&key, vec![0x5a; len]).unwrap();
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            let config = self.0.join("tandem.toml");
            let text = PAIR.replace("/etc/tandem/cluster.key", key.to_str().unwrap());
            fs::write(&config, text).unwrap();
            config
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn load_problems(path: &Path) -> Vec<ConfigProblem> {
        match load(path) {
            Err(LoadError::Invalid { problems, .. }) => problems,
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn load_accepts_a_private_32_byte_key() {
        let dir = TempDir::new("key-ok");
        let config = load(&dir.pair_with_key(32, 0o600)).unwrap();
        assert_eq!(config.peer.unwrap().key_file, dir.0.join("cluster.key"));
    }

    #[test]
    fn load_refuses_a_key_readable_by_others() {
        let dir = TempDir::new("key-0644");
        let problems = load_problems(&dir.pair_with_key(32, 0o644));
        assert_eq!(summary(&problems), [(Some(8), "peer.key_file")]);
        assert!(problems[0].message.contains("mode 0644"), "{}", problems[0]);
    }

    #[test]
    fn load_refuses_a_key_of_31_bytes() {
        let dir = TempDir::new("key-31");
        let problems = load_problems(&dir.pair_with_key(31, 0o600));
        assert_eq!(summary(&problems), [(Some(8), "peer.key_file")]);
        assert!(
            problems[0].message.contains("holds 31 bytes"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn load_reports_a_missing_key_with_the_other_problems() {
        let dir = TempDir::new("key-missing");
        let config = dir.pair_with_key(32, 0o600);
        fs::remove_file(dir.0.join("cluster.key")).unwrap();
        let text = fs::read_to_string(&config)
            .unwrap()
            .replace("device = \"none\"", "device = 1");
        fs::write(&config, text).unwrap();
        let problems = load_problems(&config);
        assert_eq!(
            summary(&problems),
            [(Some(8), "peer.key_file"), (Some(12), "watchdog.device")]
        );
    }

    #[test]
    fn load_reports_an_unreadable_config_file() {
        let dir = TempDir::new("no-config");
        let path = dir.0.join("absent.toml");
        match load(&path) {
            Err(error @ LoadError::Unreadable { .. }) => {
                assert!(error
                    .to_string()
                    .starts_with(&format!("{}: ", path.display())));
            }
            other => panic!("expected an unreadable config, got {other:?}"),
        }
    }

    #[test]
    fn load_refuses_a_config_that_is_not_utf8() {
        let dir = TempDir::new("not-utf8");
        let path = dir.0.join("tandem.toml");
        let mut bytes = STANDALONE.as_bytes().to_vec();
        bytes.extend_from_slice(b"# \xff\n");
        fs::write(&path, bytes).unwrap();
        assert_eq!(summary(&load_problems(&path)), [(Some(8), "")]);
    }

    #[test]
    fn load_refuses_an_oversized_config() {
        let dir = TempDir::new("oversized");
        let path = dir.0.join("tandem.toml");
        // A multi-byte character across the cut must not hide the real problem.
        fs::write(&path, format!("#x{}\n", "é".repeat(CONFIG_LEN_MAX))).unwrap();
        let problems = load_problems(&path);
        assert_eq!(summary(&problems), [(None, "")]);
        assert!(
            problems[0].message.contains("larger than"),
            "{}",
            problems[0]
        );
    }

    proptest::proptest! {
        /// Whatever is cut out of a valid config, parsing never panics and every problem points
        /// at a line of the text.
        #[test]
        fn damaged_configs_never_panic(start in 0usize..EXAMPLE.len(), len in 0usize..64) {
            let end = (start + len).min(EXAMPLE.len());
            let (start, end) = (floor_char_boundary(start), floor_char_boundary(end));
            let text = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
            if let Err(problems) = parse(&text) {
                let lines = u32::try_from(text.lines().count().max(1)).unwrap();
                for problem in problems {
                    proptest::prop_assert!(problem.line.is_none_or(|line| (1..=lines + 1).contains(&line)), "{problem}");
                    proptest::prop_assert!(!problem.message.is_empty());
                }
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }
    }

    fn floor_char_boundary(mut index: usize) -> usize {
        while !EXAMPLE.is_char_boundary(index) {
            index -= 1;
        }
        index
    }
}
