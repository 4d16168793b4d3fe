//! The demo's lab: two `tandem run` processes on file-backed disks in a scratch directory, the
//! network between them, and the power switch. It owns everything the demo creates and removes
//! it on drop, whatever path the demo leaves by.
//!
//! Two kinds of network, chosen by what the machine allows:
//!
//! - **Namespaces** (root and `ip` available): the wiring of [`super::netns`], the test
//!   harness's own: a board per network namespace, each with a heartbeat cable and a LAN cable
//!   (veth pairs whose far ends are ports of two bridges in a wiring namespace), a gateway on
//!   the LAN bridge, a client namespace on the LAN, and a cluster IP. Automatic failover works
//!   here. A power cut is both far ends set down (the board's interfaces lose carrier, as with a
//!   pulled plug), SIGKILL, and the cluster IP dropped from the dead board (its kernel would not
//!   hold it after a reboot).
//!
//! - **Loopback** (otherwise): nas-a on 127.0.0.1 and nas-b on 127.0.0.2 with free ports. There
//!   is no cluster IP, so automatic failover is off (rule 5) and the story acts as the operator.
//!   A power cut is SIGKILL. The client uses the nodes' unix NBD sockets.
//!
//! Namespaces are named `tdemo<pid><role>`; a demo that was killed before it could clean up
//! leaves some behind, and the next demo removes those whose pid is gone.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::nbd_client::Endpoint;
use super::netns::{self, Board, Cable, Wiring, HEARTBEAT_PORT, LAN_PORT, NETNS_DIR};
use super::{wait_for, DemoError, Signals};

/// Each node's backing file (sparse): room for the copy and tandem's metadata at the end.
const BACKING_BYTES: u64 = 192 << 20;
/// The prefix of the demo's namespace names.
const NETNS_PREFIX: &str = "tdemo";
/// Loopback addresses of the two nodes.
const LOOPBACK_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LOOPBACK_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// How long a node may take to answer on its control socket after it was started.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a control-socket request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// The scratch directory: removed on drop, except the logs and configs when the demo failed.
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
    keep_logs: bool,
}

impl Scratch {
    /// `$TMPDIR/tandem-demo-<pid>-<random>`, mode 0700, made afresh (never an existing one).
    fn create() -> Result<Scratch, DemoError> {
        let mut random = [0u8; 4];
        rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| failed(format!("no random bytes: {e}")))?;
        let path = std::env::temp_dir().join(format!(
            "tandem-demo-{}-{:08x}",
            std::process::id(),
            u32::from_ne_bytes(random)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| failed(format!("cannot create {}: {e}", path.display())))?;
        Ok(Scratch {
            path,
            keep_logs: false,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep_logs {
            let _ = fs::remove_dir_all(&self.path);
            return;
        }
        // The disks are large and say nothing a log does not; the rest stays for a look.
        for board in [Board::A, Board::B] {
            let _ = fs::remove_file(self.path.join(format!("{}-disk.img", board.name())));
        }
    }
}

/// The namespace network (see the module docs). Dropping it deletes the namespaces, which
/// removes their interfaces and bridges with them.
#[derive(Debug)]
struct Namespaces {
    ip: PathBuf,
    wiring: Wiring,
    created: Vec<String>,
}

impl Namespaces {
    fn build(ip: PathBuf, signals: &Signals) -> Result<Namespaces, DemoError> {
        remove_stale_namespaces(&ip);
        let pid = std::process::id();
        let mut net = Namespaces {
            ip,
            wiring: Wiring::new(format!("{NETNS_PREFIX}{pid}"), 1 + (pid % 250) as u8),
            created: Vec::new(),
        };
        for ns in net.wiring.namespaces() {
            signals.check()?;
            net.ip(&["netns", "add", &ns])?;
            net.created.push(ns);
        }
        for command in net.wiring.build_commands() {
            signals.check()?;
            net.ip(&command)?;
        }
        Ok(net)
    }

    /// Both of `board`'s cables: plugged in or pulled.
    fn set_cables(&self, board: Board, plugged: bool) -> Result<(), DemoError> {
        for cable in [Cable::Heartbeat, Cable::Lan] {
            self.ip(&self.wiring.cable_command(board, cable, plugged))?;
        }
        Ok(())
    }

    /// Drops the cluster IP from `board`'s lan0 if it holds it.
    fn drop_cluster_ip(&self, board: Board) {
        let address = self.wiring.cluster_cidr();
        let ns = self.wiring.board_ns(board);
        let _ = self.ip(&["-n", &ns, "addr", "del", &address, "dev", "lan0"]);
    }

    fn ip(&self, args: &[impl AsRef<str>]) -> Result<(), DemoError> {
        run_ip(&self.ip, args).map_err(failed)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = run_ip(&self.ip, &["netns", "del", &ns]) {
                eprintln!("tandem demo: could not delete namespace {ns}: {e}");
            }
        }
    }
}

/// Runs `ip args...`; the error is its stderr.
fn run_ip(ip: &Path, args: &[impl AsRef<str>]) -> Result<(), String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new(ip)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", ip.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Removes the namespaces of demos whose process is gone, after killing what runs in them.
fn remove_stale_namespaces(ip: &Path) {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let pid = rest.trim_end_matches(|c: char| !c.is_ascii_digit());
        if pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(out) = Command::new(ip).args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Some(pid) = pid.parse().ok().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        let _ = run_ip(ip, &["netns", "del", &name]);
    }
}

/// `ip` on PATH, or where distributions put it.
fn find_ip() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("ip"))
        .find(|candidate| candidate.is_file())
}

/// How the boards are wired.
#[derive(Debug)]
enum Network {
    Namespaces(Namespaces),
    Loopback { heartbeat_port: u16, lan_port: u16 },
}

/// One node: its files and, while it runs, its process.
#[derive(Debug)]
struct Node {
    name: &'static str,
    config: PathBuf,
    log: PathBuf,
    control_socket: PathBuf,
    nbd_socket: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn new(dir: &Path, board: Board) -> Node {
        let name = board.name();
        Node {
            name,
            config: dir.join(format!("{name}.toml")),
            log: dir.join(format!("{name}.log")),
            control_socket: dir.join(format!("{name}-ctl.sock")),
            nbd_socket: dir.join(format!("{name}-nbd.sock")),
            child: None,
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status, if the process ended.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

/// Where the client sits: the client namespace (its handle in /var/run/netns), or this
/// machine's own network.
#[derive(Debug, Clone)]
pub(crate) struct ClientSide(Option<PathBuf>);

impl ClientSide {
    /// Moves the calling thread there. Call it on a thread of its own: the thread stays there,
    /// and the sockets it makes belong to that network for their whole life.
    pub(crate) fn enter(&self) -> io::Result<()> {
        let Some(path) = &self.0 else {
            return Ok(());
        };
        netns::enter(&fs::File::open(path)?)
    }
}

/// A reply on the control socket: whether the node said "ok", and the body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    pub(crate) body: String,
}

/// The lab; dropping it stops both nodes and removes the namespaces and the scratch directory.
#[derive(Debug)]
pub(crate) struct Lab {
    exe: PathBuf,
    nodes: [Node; 2],
    network: Network,
    scratch: Scratch,
}

impl Lab {
    /// Builds the network and writes both nodes' files. `notice` receives one line when the
    /// namespaces were wanted but could not be built (the lab then runs on loopback).
    pub(crate) fn create(
        signals: &Signals,
        notice: &mut dyn FnMut(String),
    ) -> Result<Lab, DemoError> {
        let exe = std::env::current_exe()
            .map_err(|e| failed(format!("cannot find the tandem binary: {e}")))?;
        let scratch = Scratch::create()?;
        let root = rustix::process::geteuid().is_root();
        let network = match find_ip().filter(|_| root) {
            Some(ip) => match Namespaces::build(ip, signals) {
                Ok(net) => Network::Namespaces(net),
                Err(DemoError::Failed(why)) => {
                    notice(format!(
                        "network namespaces unavailable ({why}): using loopback"
                    ));
                    loopback_network()?
                }
                Err(e) => return Err(e),
            },
            None => loopback_network()?,
        };
        let lab = Lab {
            exe,
            nodes: [
                Node::new(&scratch.path, Board::A),
                Node::new(&scratch.path, Board::B),
            ],
            network,
            scratch,
        };
        lab.write_files()?;
        Ok(lab)
    }

    fn write_files(&self) -> Result<(), DemoError> {
        let dir = &self.scratch.path;
        let io =
            |what: &Path, e: io::Error| failed(format!("cannot write {}: {e}", what.display()));
        let key_path = dir.join("cluster.key");
        let mut key = [0u8; 32];
        rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| failed(format!("no random bytes for the cluster key: {e}")))?;
        fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&key_path)
            .and_then(|mut f| f.write_all(&key))
            .map_err(|e| io(&key_path, e))?;
        for board in [Board::A, Board::B] {
            let backing = self.backing(board);
            fs::File::create(&backing)
                .and_then(|f| f.set_len(BACKING_BYTES))
                .map_err(|e| io(&backing, e))?;
            let node = &self.nodes[board.index()];
            let state = dir.join(format!("{}-state", board.name()));
            fs::create_dir(&state).map_err(|e| io(&state, e))?;
            fs::write(&node.config, self.config_text(board, &key_path, &state))
                .map_err(|e| io(&node.config, e))?;
        }
        Ok(())
    }

    fn backing(&self, board: Board) -> PathBuf {
        self.scratch.path.join(format!("{}-disk.img", board.name()))
    }

    /// `board`'s config file.
    fn config_text(&self, board: Board, key: &Path, state: &Path) -> String {
        let node = &self.nodes[board.index()];
        let peer = board.peer();
        let (heartbeat, lan, volume_extra, cluster_extra) = match &self.network {
            Network::Namespaces(Namespaces { wiring, .. }) => (
                (
                    format!("{}:{HEARTBEAT_PORT}", wiring.hb_ip(board)),
                    format!("{}:{HEARTBEAT_PORT}", wiring.hb_ip(peer)),
                ),
                (
                    format!("{}:{LAN_PORT}", wiring.lan_ip(board)),
                    format!("{}:{LAN_PORT}", wiring.lan_ip(peer)),
                ),
                format!("nbd_listen = \"{}\"\n", wiring.nbd_addr()),
                format!(
                    "vip = \"{}\"\nuplink_probe = \"{}\"\n",
                    wiring.cluster_cidr(),
                    wiring.gateway()
                ),
            ),
            Network::Loopback {
                heartbeat_port,
                lan_port,
            } => {
                let ip = |b: Board| {
                    if b == Board::A {
                        LOOPBACK_A
                    } else {
                        LOOPBACK_B
                    }
                };
                (
                    (
                        format!("{}:{heartbeat_port}", ip(board)),
                        format!("{}:{heartbeat_port}", ip(peer)),
                    ),
                    (
                        format!("{}:{lan_port}", ip(board)),
                        format!("{}:{lan_port}", ip(peer)),
                    ),
                    String::new(),
                    String::new(),
                )
            }
        };
        format!(
            "# Written by tandem demo.\n\
             [node]\nname = \"{name}\"\nstate_dir = {state}\n\n\
             [volume]\nbacking = {backing}\nnbd_socket = {nbd}\n{volume_extra}\n\
             [peer]\nname = \"{peer_name}\"\nkey_file = {key}\n\
             heartbeat = {{ local = \"{}\", remote = \"{}\" }}\n\
             lan = {{ local = \"{}\", remote = \"{}\" }}\n\n\
             [cluster]\n{cluster_extra}heartbeat_interval_ms = 100\ndead_time_ms = 1000\n\
             failback = \"preferred\"\npreferred = \"nas-a\"\n\n\
             [watchdog]\ndevice = \"none\"\ntimeout_s = 5\n\n\
             [console]\ncontrol_socket = {ctl}\n",
            heartbeat.0,
            heartbeat.1,
            lan.0,
            lan.1,
            name = board.name(),
            state = toml_path(state),
            backing = toml_path(&self.backing(board)),
            nbd = toml_path(&node.nbd_socket),
            peer_name = peer.name(),
            key = toml_path(key),
            ctl = toml_path(&node.control_socket),
        )
    }

    /// Lines that say how the lab is built.
    pub(crate) fn describe(&self) -> Vec<String> {
        let mut lines = match &self.network {
            Network::Namespaces(Namespaces { wiring, .. }) => vec![
                format!(
                    "lab: network namespaces {}*: nas-a and nas-b each with a heartbeat cable and a \
                     LAN cable, a client on the LAN",
                    wiring.tag()
                ),
                format!(
                    "     cluster IP {} (NBD on {}), gateway {}",
                    wiring.cluster_ip(),
                    wiring.nbd_addr(),
                    wiring.gateway()
                ),
            ],
            Network::Loopback { .. } => vec![
                format!(
                    "lab: loopback (network namespaces need root and iproute2): nas-a on {LOOPBACK_A}, \
                     nas-b on {LOOPBACK_B}"
                ),
                "     no cluster IP, so no automatic failover (rule 5): the demo acts as the \
                 operator"
                    .to_string(),
            ],
        };
        lines.push(format!(
            "     disks: two sparse {} MiB files in {}",
            BACKING_BYTES >> 20,
            self.scratch.path.display()
        ));
        lines
    }

    /// Whether the pair fails over by itself here (a cluster IP and a gateway to probe).
    pub(crate) fn automatic_failover(&self) -> bool {
        matches!(self.network, Network::Namespaces(_))
    }

    /// Where the client finds the volume, in the order it tries them.
    pub(crate) fn endpoints(&self) -> Vec<Endpoint> {
        match &self.network {
            Network::Namespaces(net) => vec![Endpoint::Tcp(net.wiring.nbd_addr())],
            Network::Loopback { .. } => self
                .nodes
                .iter()
                .map(|n| Endpoint::Unix(n.nbd_socket.clone()))
                .collect(),
        }
    }

    /// Where the client sits.
    pub(crate) fn client_side(&self) -> ClientSide {
        match &self.network {
            Network::Namespaces(net) => {
                ClientSide(Some(Path::new(NETNS_DIR).join(net.wiring.client_ns())))
            }
            Network::Loopback { .. } => ClientSide(None),
        }
    }

    /// Starts `board`'s node and waits until it answers on its control socket.
    pub(crate) fn start(&mut self, board: Board, signals: &Signals) -> Result<u32, DemoError> {
        let exe = self.exe.clone();
        let netns = match &self.network {
            Network::Namespaces(net) => Some((net.ip.clone(), net.wiring.board_ns(board))),
            Network::Loopback { .. } => None,
        };
        let node = &mut self.nodes[board.index()];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| failed(format!("cannot open {}: {e}", node.log.display())))?;
        // `ip netns exec` execs tandem, so the child's pid is the node's own.
        let mut command = match &netns {
            Some((ip, ns)) => {
                let mut command = Command::new(ip);
                command.args(["netns", "exec", ns]).arg(&exe);
                command
            }
            None => Command::new(&exe),
        };
        // A process group of its own: Ctrl-C reaches the demo only, which stops the nodes.
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", board.name())))?;
        let pid = child.id();
        node.child = Some(child);
        wait_for(signals, NODE_START_TIMEOUT, "the node to start", || {
            self.check_nodes()?;
            Ok(self.request(board, "status").ok().map(|_| ()))
        })
        .map_err(|e| match e {
            DemoError::Failed(why) => failed(format!("{}: {why}", board.name())),
            other => other,
        })?;
        Ok(pid)
    }

    /// A failure if a node exited by itself (one whose power was cut is not running, and that
    /// is no failure).
    pub(crate) fn check_nodes(&mut self) -> Result<(), DemoError> {
        for node in &mut self.nodes {
            if let Some(status) = node.exited() {
                return Err(failed(format!(
                    "{} exited ({status}); its log is {}",
                    node.name,
                    node.log.display()
                )));
            }
        }
        Ok(())
    }

    /// The power fails on `board`: cables dead first (nothing the dying node sends gets out),
    /// then the process killed, and the cluster IP gone from the dead board. Returns the
    /// instant the power went: the cables dead, or (on loopback) the kill sent.
    pub(crate) fn power_cut(&mut self, board: Board) -> Result<Instant, DemoError> {
        let node = &mut self.nodes[board.index()];
        let at = match &self.network {
            Network::Namespaces(net) => {
                net.set_cables(board, false)?;
                let at = Instant::now();
                node.kill();
                net.drop_cluster_ip(board);
                at
            }
            Network::Loopback { .. } => {
                let at = Instant::now();
                node.kill();
                at
            }
        };
        Ok(at)
    }

    /// The power returns to `board`: cables live again (the node is started separately).
    pub(crate) fn power_on(&mut self, board: Board) -> Result<(), DemoError> {
        match &self.network {
            Network::Namespaces(net) => net.set_cables(board, true),
            Network::Loopback { .. } => Ok(()),
        }
    }

    /// One console command on `board`'s control socket.
    pub(crate) fn request(&self, board: Board, line: &str) -> io::Result<Reply> {
        let node = &self.nodes[board.index()];
        let mut stream = UnixStream::connect(&node.control_socket)?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
        stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
        stream.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        let (status, body) = reply.split_once('\n').unwrap_or((reply.as_str(), ""));
        Ok(Reply {
            ok: status == "ok",
            body: body.trim_end().to_string(),
        })
    }

    /// `board`'s `status --json`.
    pub(crate) fn status(&self, board: Board) -> Result<serde_json::Value, DemoError> {
        let reply = self
            .request(board, "--json status")
            .map_err(|e| failed(format!("{} does not answer: {e}", board.name())))?;
        if !reply.ok {
            return Err(failed(format!("{}: status: {}", board.name(), reply.body)));
        }
        serde_json::from_str(&reply.body)
            .map_err(|e| failed(format!("{}: status is not JSON: {e}", board.name())))
    }

    /// The nodes' logs.
    pub(crate) fn logs(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.log.clone()).collect()
    }

    /// Keeps the logs and configs when the lab is dropped (the disks are removed anyway).
    pub(crate) fn keep_logs(&mut self) {
        self.scratch.keep_logs = true;
    }
}

impl Drop for Lab {
    /// Both nodes die before the namespaces and the directory go (the fields drop after this).
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

fn loopback_network() -> Result<Network, DemoError> {
    let mut ports = Vec::new();
    while ports.len() < 2 {
        ports.push(free_port_on_both()?);
    }
    Ok(Network::Loopback {
        heartbeat_port: ports[0],
        lan_port: ports[1],
    })
}

/// A TCP port free on both loopback addresses right now.
fn free_port_on_both() -> Result<u16, DemoError> {
    for _ in 0..100 {
        let b = TcpListener::bind((LOOPBACK_B, 0))
            .map_err(|e| failed(format!("cannot bind {LOOPBACK_B}: {e}")))?;
        let port = b
            .local_addr()
            .map_err(|e| failed(format!("no local address: {e}")))?
            .port();
        if TcpListener::bind((LOOPBACK_A, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(failed(
        "no free port on both loopback addresses".to_string(),
    ))
}

/// A path as a TOML string.
fn toml_path(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn failed(why: String) -> DemoError {
    DemoError::Failed(why)
}
