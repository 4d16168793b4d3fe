//! A lab of two boards and a client in Linux network namespaces, for failover tests (needs root
//! and iproute2).
//!
//! One [`Lab`] is four namespaces named after a per-lab tag (`tnl<pid>-<counter>`), so that labs
//! of parallel tests, and of other test processes, never meet. Their wiring, names and addresses
//! are `tandem demo`'s, [`tandem::demo::netns`] (the diagram is there): two boards with a
//! heartbeat cable and a LAN cable each, veths to two bridges in a wiring namespace, a gateway
//! on the LAN bridge, a client on the LAN. The cluster IP is 10.77.n.100/24
//! ([`Lab::cluster_ip`]), the gateway probe target 10.77.n.1 ([`Lab::gateway`]).
//!
//! A pulled cable ([`Lab::pull`]) is the far end (the bridge port) set down: the board's own
//! interface stays administratively up and loses carrier, as with a real cable. A veth reports
//! that at once, and its netlink event is not rate-limited by the kernel's linkwatch (a veth
//! counts as a stacked device); a real NIC may take up to a second or two (PHY polling,
//! linkwatch), so a test must not assume the lab's speed is the board's.
//!
//! Nodes run inside a board namespace through `ip netns exec`, which execs `tandem`: the pid a
//! [`Node`] reports is tandem's own. `tandem ctl` talks over a unix socket on the filesystem and
//! works from the host namespace. A test that needs sockets in a namespace runs a closure there
//! with [`Lab::in_ns`].
//!
//! The lab removes its namespaces on drop (which removes the veths and bridges with them);
//! [`cleanup_stale`] (called by [`Lab::new`]) removes the namespaces of labs whose process died
//! without dropping them.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use tandem::demo::netns::{Board, Cable, HEARTBEAT_PORT, LAN_PORT, NBD_PORT};
use tandem::demo::netns::{Wiring, NETNS_DIR};

use crate::{
    is_ci, pair, run_with_timeout, tool_available, CmdOutput, Node, NodeConfig,
    BACKING_BYTES_DEFAULT, COMMAND_TIMEOUT,
};

/// The prefix of every lab namespace's name; [`cleanup_stale`] only touches names that carry it.
pub const PREFIX: &str = "tnl";

/// The deadline of one `ip` command of the lab's own.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// The state of an interface as `ip -o link show` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Administratively up (`UP` among the flags).
    pub admin_up: bool,
    /// Carrier present (`LOWER_UP` among the flags; absent, `NO-CARRIER` shows instead).
    pub carrier: bool,
}

/// Whether the lab can run here: root and `ip` on PATH. Otherwise prints "skipped: needs root and
/// iproute2" and returns false (the test should return), or panics under `CI=true`.
pub fn supported() -> bool {
    let ok = rustix::process::geteuid().is_root() && tool_available("ip");
    if !ok {
        assert!(
            !is_ci(),
            "CI=true and the netns lab cannot run: needs root and iproute2"
        );
        eprintln!("skipped: needs root and iproute2");
    }
    ok
}

/// Removes the namespaces of labs whose creating process is gone (a test that crashed or was
/// killed before its [`Lab`] dropped), after killing whatever still runs inside them.
pub fn cleanup_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = lab_pid(&name) else { continue };
        if pid_alive(pid) {
            continue;
        }
        let pids = ip(&["netns", "pids", &name]);
        for pid in pids.stdout.split_whitespace() {
            if let Some(pid) = pid.parse().ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = ip(&["netns", "del", &name]);
    }
}

/// The creating pid of a lab namespace named `tnl<pid>-<counter><role>`.
fn lab_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    let role = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    let counter = &tail[..tail.len() - role.len()];
    if counter.is_empty() || !["w", "a", "b", "c"].contains(&role) {
        return None;
    }
    pid.parse().ok().filter(|pid| *pid > 0)
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs `ip args...` with the lab's deadline.
fn ip(args: &[impl AsRef<str>]) -> CmdOutput {
    run_with_timeout(
        Command::new("ip").args(args.iter().map(AsRef::as_ref)),
        IP_TIMEOUT,
    )
}

/// Runs `ip args...` and panics with its output unless it succeeded.
fn ip_ok(args: &[impl AsRef<str>]) -> CmdOutput {
    let out = ip(args);
    let words: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    out.assert_success(&format!("ip {}", words.join(" ")));
    out
}

/// Two boards and a client on a heartbeat bridge and a LAN bridge, in network namespaces.
/// Dropping it deletes the namespaces.
#[derive(Debug)]
pub struct Lab {
    wiring: Wiring,
    /// The namespaces created so far (removed on drop).
    namespaces: Vec<String>,
}

impl Lab {
    /// Builds a lab (after [`cleanup_stale`]), or returns `None` when it cannot run here (see
    /// [`supported`]: the skip is printed, and under `CI=true` it panics instead). Panics if a
    /// step of the set-up fails.
    pub fn new() -> Option<Lab> {
        if !supported() {
            return None;
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // `ip netns add` sets up /var/run/netns on first use; one lab at a time is set up.
        static SETUP: Mutex<()> = Mutex::new(());
        let _setup = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        cleanup_stale();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Addresses live in the lab's own namespaces, so labs never clash even with the same
        // subnet; distinct subnets only keep logs of parallel labs apart.
        let n = 1 + ((u64::from(pid) * 37 + counter) % 250) as u8;
        let mut lab = Lab {
            wiring: Wiring::new(format!("{PREFIX}{pid}-{counter}"), n),
            namespaces: Vec::new(),
        };
        for ns in lab.wiring.namespaces() {
            ip_ok(&["netns", "add", &ns]);
            lab.namespaces.push(ns);
        }
        for command in lab.wiring.build_commands() {
            ip_ok(&command);
        }
        Some(lab)
    }

    /// The lab's tag, the prefix of its namespaces' names (`tnl<pid>-<counter>`).
    pub fn tag(&self) -> &str {
        self.wiring.tag()
    }

    /// The lab's subnet number n (10.77.n.0/24, 10.99.n.0/24).
    pub fn subnet(&self) -> u8 {
        self.wiring.subnet()
    }

    /// The wiring namespace `<tag>w` (the two bridges).
    pub fn wiring_ns(&self) -> String {
        self.wiring.wiring_ns()
    }

    /// A board's namespace: `<tag>a` or `<tag>b`.
    pub fn board_ns(&self, board: Board) -> String {
        self.wiring.board_ns(board)
    }

    /// The client's namespace `<tag>c`.
    pub fn client_ns(&self) -> String {
        self.wiring.client_ns()
    }

    /// A board's heartbeat address: 10.99.n.1 (a) or 10.99.n.2 (b).
    pub fn hb_ip(&self, board: Board) -> String {
        self.wiring.hb_ip(board)
    }

    /// A board's fixed LAN address: 10.77.n.11 (a) or 10.77.n.12 (b).
    pub fn lan_ip(&self, board: Board) -> String {
        self.wiring.lan_ip(board)
    }

    /// The client's address: 10.77.n.50.
    pub fn client_ip(&self) -> String {
        self.wiring.client_ip()
    }

    /// The gateway (on `br-lan` in the wiring namespace), the uplink probe target: 10.77.n.1.
    pub fn gateway(&self) -> String {
        self.wiring.gateway()
    }

    /// The cluster IP: 10.77.n.100.
    pub fn cluster_ip(&self) -> String {
        self.wiring.cluster_ip()
    }

    /// The cluster IP with its prefix, as `[cluster] vip` has it: 10.77.n.100/24.
    pub fn cluster_cidr(&self) -> String {
        self.wiring.cluster_cidr()
    }

    /// The NBD TCP address on the cluster IP: 10.77.n.100:10809.
    pub fn nbd_addr(&self) -> SocketAddr {
        self.wiring.nbd_addr()
    }

    /// Runs `args` inside namespace `ns` (`ip netns exec NS args...`, with a fresh sysfs) with
    /// the default command deadline.
    pub fn exec(&self, ns: &str, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
    }

    /// [`Lab::exec`] in the client namespace (for `qemu-io`, `nbdinfo`, python, ...).
    pub fn client_exec(&self, args: &[&str]) -> CmdOutput {
        self.exec(&self.client_ns(), args)
    }

    /// Runs `f` on a fresh thread that first enters namespace `ns`, and returns its result (a
    /// panic in `f` is resumed here). Sockets that `f` creates belong to `ns` for their whole
    /// life, so they can be returned and used from any thread.
    pub fn in_ns<R: Send>(&self, ns: &str, f: impl FnOnce() -> R + Send) -> R {
        let path = Path::new(NETNS_DIR).join(ns);
        let handle =
            fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                tandem::demo::netns::enter(&handle)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                drop(handle);
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// [`Lab::in_ns`] in the client namespace.
    pub fn in_client<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.in_ns(&self.client_ns(), f)
    }

    /// A TCP connection to `addr` from namespace `ns`, or the error (`timeout` bounds the
    /// connect).
    pub fn connect_tcp(
        &self,
        ns: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.in_ns(ns, || TcpStream::connect_timeout(&addr, timeout))
    }

    /// Whether `ip` answers from namespace `ns` within `timeout`: a TCP connection to its port 9
    /// is accepted or refused (either needs ARP and IP to work both ways); no answer, or
    /// "unreachable", is false. Needs no tool.
    pub fn answers(&self, ns: &str, ip: &str, timeout: Duration) -> bool {
        let addr: SocketAddr = format!("{ip}:9").parse().expect("an IPv4 address");
        match self.connect_tcp(ns, addr, timeout) {
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
        }
    }

    /// `ping -c1 -W1 ip` from namespace `ns`; where `ping` is not installed, [`Lab::answers`]
    /// with a one-second deadline.
    pub fn ping(&self, ns: &str, ip: &str) -> bool {
        if tool_available("ping") {
            self.exec(ns, &["ping", "-c1", "-W1", ip]).status.success()
        } else {
            self.answers(ns, ip, Duration::from_secs(1))
        }
    }

    /// The state of interface `ifname` in namespace `ns`.
    pub fn link_state(&self, ns: &str, ifname: &str) -> LinkState {
        let out = ip_ok(&["-n", ns, "-o", "link", "show", "dev", ifname]);
        let flags = out
            .stdout
            .split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(flags, _)| flags)
            .unwrap_or_else(|| panic!("no flags in {:?}", out.stdout));
        let has = |flag: &str| flags.split(',').any(|f| f == flag);
        LinkState {
            admin_up: has("UP"),
            carrier: has("LOWER_UP"),
        }
    }

    /// The state of `board`'s own interface for `cable`.
    pub fn board_link(&self, board: Board, cable: Cable) -> LinkState {
        self.link_state(&self.board_ns(board), cable.ifname())
    }

    /// Pulls `board`'s `cable`: its bridge port goes down, the board's interface loses carrier.
    pub fn pull(&self, board: Board, cable: Cable) {
        ip_ok(&self.wiring.cable_command(board, cable, false));
    }

    /// Plugs `board`'s `cable` back in.
    pub fn plug(&self, board: Board, cable: Cable) {
        ip_ok(&self.wiring.cable_command(board, cable, true));
    }

    /// The IPv4 addresses (with prefix) on `board`'s lan0.
    pub fn lan_addresses(&self, board: Board) -> Vec<String> {
        let out = ip_ok(&[
            "-n",
            &self.board_ns(board),
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "lan0",
        ]);
        out.stdout
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next().map(str::to_string)
            })
            .collect()
    }

    /// Removes every IPv4 address from `board`'s lan0 but its fixed one (a cluster IP it held,
    /// for example).
    pub fn flush_lan(&self, board: Board) {
        let fixed = format!("{}/24", self.lan_ip(board));
        for address in self.lan_addresses(board) {
            if address != fixed {
                ip_ok(&[
                    "-n",
                    &self.board_ns(board),
                    "addr",
                    "del",
                    &address,
                    "dev",
                    "lan0",
                ]);
            }
        }
    }

    /// The power fails on `board`: both cables go dead (so nothing the dying node's kernel
    /// sends gets out), the node is SIGKILLed and reaped, and the board's lan0 keeps only its
    /// fixed address (a dead board holds no cluster IP when it returns).
    pub fn power_cut(&self, board: Board, node: &mut Node) {
        self.pull(board, Cable::Heartbeat);
        self.pull(board, Cable::Lan);
        node.kill();
        self.flush_lan(board);
    }

    /// The power returns to `board`: both cables are live again. The test restarts the node.
    pub fn power_on(&self, board: Board) {
        self.plug(board, Cable::Heartbeat);
        self.plug(board, Cable::Lan);
    }

    /// The config of `board`'s node, its files in `dir` (named after the node, so both boards can
    /// share `dir`; the shared key is `dir/cluster.key`, written when absent; the backing file is
    /// created sparse when absent), run inside the board's namespace.
    ///
    /// `[cluster]` has `vip`, `uplink_probe`, `heartbeat_interval_ms = 100`,
    /// `dead_time_ms = 1000` and `preferred = "nas-a"`; a line of `cluster_extra` that sets one
    /// of these keys replaces it, other lines are added. `[watchdog]` is `device = "none"`,
    /// `timeout_s = 5`.
    ///
    /// `nbd_listen` is on the cluster IP: the primary's listener follows the address.
    pub fn node_config(&self, dir: &Path, board: Board, cluster_extra: &str) -> NodeConfig {
        let key = dir.join("cluster.key");
        if !key.exists() {
            pair::write_key(&key, 0x42);
        }
        let peer = board.peer();
        let defaults = [
            ("vip", format!("\"{}\"", self.cluster_cidr())),
            ("uplink_probe", format!("\"{}\"", self.gateway())),
            ("heartbeat_interval_ms", "100".to_string()),
            ("dead_time_ms", "1000".to_string()),
            ("preferred", "\"nas-a\"".to_string()),
        ];
        let overridden = |key: &str| {
            cluster_extra.lines().any(|line| {
                line.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let mut cluster = String::new();
        for (key, value) in defaults {
            if !overridden(key) {
                cluster.push_str(&format!("{key} = {value}\n"));
            }
        }
        cluster.push_str(cluster_extra);
        if !cluster.ends_with('\n') {
            cluster.push('\n');
        }
        let mut config = NodeConfig::standalone(dir, board.name());
        config.netns = Some(self.board_ns(board));
        config.extra_toml = format!(
            "\n[peer]\nname = \"{peer_name}\"\nkey_file = \"{key}\"\n\
             heartbeat = {{ local = \"{hb_me}:{HEARTBEAT_PORT}\", remote = \"{hb_peer}:{HEARTBEAT_PORT}\" }}\n\
             lan = {{ local = \"{lan_me}:{LAN_PORT}\", remote = \"{lan_peer}:{LAN_PORT}\" }}\n\
             \n[cluster]\n{cluster}\
             \n[watchdog]\ndevice = \"none\"\ntimeout_s = 5\n",
            peer_name = peer.name(),
            key = key.display(),
            hb_me = self.hb_ip(board),
            hb_peer = self.hb_ip(peer),
            lan_me = self.lan_ip(board),
            lan_peer = self.lan_ip(peer),
        );
        config.nbd_listen = Some(self.nbd_addr().to_string());
        config.create_backing(BACKING_BYTES_DEFAULT);
        config
    }

    /// Starts `board`'s node from [`Lab::node_config`] and waits until it is ready.
    pub fn start(&self, dir: &Path, board: Board, cluster_extra: &str) -> Node {
        Node::spawn(self.node_config(dir, board, cluster_extra))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("TANDEM_KEEP_NETNS").is_some() {
            eprintln!("keeping the namespaces of lab {}", self.tag());
            return;
        }
        for ns in self.namespaces.drain(..).rev() {
            let out = Command::new("ip").args(["netns", "del", &ns]).output();
            if !out.is_ok_and(|o| o.status.success()) {
                eprintln!("could not delete namespace {ns}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lab_pid;

    #[test]
    fn lab_names_carry_the_creating_pid() {
        assert_eq!(lab_pid("tnl4242-0w"), Some(4242));
        assert_eq!(lab_pid("tnl4242-17c"), Some(4242));
        assert_eq!(lab_pid("tnl4242-17"), None);
        assert_eq!(lab_pid("tnl4242-x"), None);
        assert_eq!(lab_pid("tnl4242-3d"), None);
        assert_eq!(lab_pid("other4242-0w"), None);
        assert_eq!(lab_pid("tnlabc-0w"), None);
    }
}
