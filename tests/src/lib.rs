//! tandem's test harness: helpers shared by the multi-process and interop tests in `tests/`.
//!
//! What it owns:
//!
//! - finding the `tandem` binary ([`tandem_bin`]): `TANDEM_BIN` if set, otherwise one
//!   `cargo build --release -p tandem --bin tandem` per test process;
//! - unique scratch directories removed on drop ([`TempDir`]);
//! - running a real node ([`Node`]): config written, process spawned, readiness awaited, killed on
//!   drop so a failing test never leaves a daemon behind;
//! - running external tools with a deadline ([`run_with_timeout`]) and skipping a test when a
//!   tool is absent ([`require_tool`]), except under `CI=true`, where an absent tool fails;
//! - a raw NBD client for the wire-level tests ([`nbd_wire`]).
//!
//! Every wait here has a deadline: a hung daemon or client fails the test, it never hangs it.

pub mod nbd_wire;
pub mod netns;
pub mod pair;
pub mod qemu;
pub mod sim;
pub mod workload;

use std::fs;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a node may take from spawn to accepting NBD connections.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node may take to exit after SIGTERM.
pub const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The default deadline for an external command (a client tool, `tandem ctl`, ...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The default size of a node's sparse backing file.
pub const BACKING_BYTES_DEFAULT: u64 = 128 * 1024 * 1024;

/// Exit statuses of `tandem run` (INTERFACE.md, "Rules that tests rely on").
pub mod exit_code {
    /// Clean exit after SIGTERM/SIGINT.
    pub const OK: i32 = 0;
    /// Bad usage (unknown flag, missing argument).
    pub const USAGE: i32 = 64;
    /// Backing device missing or refused.
    pub const NO_INPUT: i32 = 66;
    /// Internal error.
    pub const SOFTWARE: i32 = 70;
    /// A socket path in use by a live listener.
    pub const CANT_CREATE: i32 = 73;
    /// Bad config (missing or malformed file).
    pub const CONFIG: i32 = 78;
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// The `tandem` binary under test: `TANDEM_BIN` when set, otherwise the release binary, built
/// once per test process.
pub fn tandem_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANDEM_BIN") {
            let bin = PathBuf::from(bin);
            assert!(bin.is_file(), "TANDEM_BIN={} is not a file", bin.display());
            return bin;
        }
        let root = workspace_root();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "tandem", "--bin", "tandem"])
            .current_dir(&root)
            .stdin(Stdio::null())
            .status()
            .expect("spawn cargo build");
        assert!(
            status.success(),
            "cargo build --release -p tandem failed: {status}"
        );
        let bin = root.join("target/x86_64-unknown-linux-gnu/release/tandem");
        assert!(bin.is_file(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// A unique scratch directory under the system temp dir, removed (recursively) on drop.
///
/// Set `TANDEM_KEEP_TMP=1` to keep it for a post-mortem.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/tandem-<label>-<pid>-<n>-<nanos>`.
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("tandem-{label}-{}-{n}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TANDEM_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CmdOutput {
    /// The exit code, or `None` when the process died from a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the command's output unless it exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The non-empty lines of standard error.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// Runs `cmd` to completion with stdin closed; kills it and panics if it outlives `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {description}: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = stdout.join().unwrap_or_default();
                let stderr = stderr.join().unwrap_or_default();
                panic!(
                    "{description} timed out after {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {description}: {e}"),
        }
    };
    CmdOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned(),
    }
}

/// Runs `program args...` with the default deadline.
pub fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> CmdOutput {
    run_with_timeout(Command::new(program).args(args), COMMAND_TIMEOUT)
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Whether the test runs in CI, where every tool is installed and a missing one is a failure.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `name` is an executable on `PATH` (or an existing absolute path).
pub fn tool_available(name: &str) -> bool {
    let candidate = Path::new(name);
    if candidate.is_absolute() {
        return candidate.is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// Returns true when every tool is present. Otherwise prints why the test is skipped and returns
/// false (the test should return), or panics under `CI=true`.
pub fn require_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !tool_available(n))
        .collect();
    skip_unless(missing.is_empty(), &format!("missing tools: {missing:?}"))
}

/// [`require_tools`] for one tool.
pub fn require_tool(name: &str) -> bool {
    require_tools(&[name])
}

/// The interpreter that has the libnbd Python bindings (the `python3` on PATH may not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Returns true when `/usr/bin/python3` can `import nbd`; otherwise skips (or fails in CI).
pub fn require_python_nbd() -> bool {
    let ok = Path::new(SYSTEM_PYTHON).is_file()
        && run_with_timeout(
            Command::new(SYSTEM_PYTHON).args(["-c", "import nbd"]),
            COMMAND_TIMEOUT,
        )
        .status
        .success();
    skip_unless(ok, "python3-libnbd is not importable by /usr/bin/python3")
}

fn skip_unless(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    assert!(!is_ci(), "CI=true and {reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

/// Creates (or resizes) a sparse file of `bytes` bytes.
pub fn create_sparse_file(path: &Path, bytes: u64) {
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(bytes)
        .unwrap_or_else(|e| panic!("set_len {}: {e}", path.display()));
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failing comparison can be reproduced.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A TCP port on `ip` that nothing listens on right now.
pub fn free_port(ip: &str) -> u16 {
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// The paths and settings of one standalone node; [`NodeConfig::to_toml`] renders the config.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `[node] name`.
    pub name: String,
    /// `[node] state_dir`.
    pub state_dir: PathBuf,
    /// `[volume] backing`.
    pub backing: PathBuf,
    /// `[volume] nbd_socket`.
    pub nbd_socket: PathBuf,
    /// `[volume] nbd_listen`, when set.
    pub nbd_listen: Option<String>,
    /// `[volume] direct_io`, when set.
    pub direct_io: Option<bool>,
    /// `[console] control_socket`.
    pub control_socket: PathBuf,
    /// Where the config file is written.
    pub config_path: PathBuf,
    /// Extra TOML appended to the config (for example a `[metrics]` section).
    pub extra_toml: String,
    /// The network namespace to run the node in (`ip netns exec NS tandem run ...`), when set.
    pub netns: Option<String>,
}

impl NodeConfig {
    /// A standalone node named `name` whose files all live in `dir` (prefixed with the name, so
    /// several nodes can share a directory).
    pub fn standalone(dir: &Path, name: &str) -> NodeConfig {
        NodeConfig {
            name: name.to_string(),
            state_dir: dir.join(format!("{name}-state")),
            backing: dir.join(format!("{name}-disk.img")),
            nbd_socket: dir.join(format!("{name}-nbd.sock")),
            nbd_listen: None,
            direct_io: None,
            control_socket: dir.join(format!("{name}-ctl.sock")),
            config_path: dir.join(format!("{name}.toml")),
            extra_toml: String::new(),
            netns: None,
        }
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        let mut volume = format!(
            "backing = {}\nnbd_socket = {}\n",
            toml_str(&self.backing),
            toml_str(&self.nbd_socket)
        );
        if let Some(listen) = &self.nbd_listen {
            volume.push_str(&format!("nbd_listen = \"{listen}\"\n"));
        }
        if let Some(direct_io) = self.direct_io {
            volume.push_str(&format!("direct_io = {direct_io}\n"));
        }
        format!(
            "[node]\nname = \"{}\"\nstate_dir = {}\n\n[volume]\n{volume}\n[console]\ncontrol_socket = {}\n{}",
            self.name,
            toml_str(&self.state_dir),
            toml_str(&self.control_socket),
            self.extra_toml
        )
    }

    /// Writes the config file (creating the state dir) and returns its path.
    pub fn write(&self) -> &Path {
        fs::create_dir_all(&self.state_dir).expect("create state dir");
        fs::write(&self.config_path, self.to_toml()).expect("write config");
        &self.config_path
    }

    /// Creates the backing file, sparse, unless it already exists.
    pub fn create_backing(&self, bytes: u64) {
        if !self.backing.exists() {
            create_sparse_file(&self.backing, bytes);
        }
    }

    /// `nbd+unix:///?socket=PATH` for this node's unix listener.
    pub fn nbd_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd_socket.display())
    }
}

fn toml_str(path: &Path) -> String {
    let s = path.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A running `tandem run` process. Killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    child: Option<Child>,
    stderr_path: PathBuf,
}

impl Node {
    /// Starts a standalone node named `name` in `dir` with a fresh sparse backing file of
    /// [`BACKING_BYTES_DEFAULT`] bytes, and waits until it is ready.
    pub fn start(dir: &TempDir, name: &str) -> Node {
        let config = NodeConfig::standalone(dir.path(), name);
        config.create_backing(BACKING_BYTES_DEFAULT);
        Node::spawn(config)
    }

    /// Writes `config`, spawns `tandem run --config`, and waits until the NBD socket accepts
    /// connections. Panics (with the node's stderr) if it exits first or is not ready in time.
    pub fn spawn(config: NodeConfig) -> Node {
        config.write();
        let stderr_path = config.config_path.with_extension(format!(
            "stderr.{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let stderr = fs::File::create(&stderr_path).expect("create node stderr log");
        // `ip netns exec` execs the program: the child's pid is tandem's own.
        let mut command = match &config.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(tandem_bin());
                command
            }
            None => Command::new(tandem_bin()),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config.config_path)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn tandem run");
        let mut node = Node {
            config,
            child: Some(child),
            stderr_path,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait tandem") {
                self.child = None;
                panic!(
                    "tandem run exited before it was ready ({status})\n--- stderr\n{}",
                    self.stderr_log()
                );
            }
            if UnixStream::connect(&self.config.nbd_socket).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "tandem run not ready (NBD socket {} not accepting) after {:?}\n--- stderr\n{}",
                    self.config.nbd_socket.display(),
                    NODE_READY_TIMEOUT,
                    self.stderr_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("node process already reaped")
    }

    /// The node's config.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node not running").id()
    }

    /// `nbd+unix:///?socket=PATH`.
    pub fn nbd_uri(&self) -> String {
        self.config.nbd_uri()
    }

    /// The NBD unix socket path.
    pub fn nbd_socket(&self) -> &Path {
        &self.config.nbd_socket
    }

    /// The control socket path.
    pub fn control_socket(&self) -> &Path {
        &self.config.control_socket
    }

    /// What the node wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs `tandem ctl --socket CTL args...`.
    pub fn ctl(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(tandem_bin());
        cmd.arg("ctl")
            .arg("--socket")
            .arg(&self.config.control_socket)
            .args(args);
        run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
    }

    /// `tandem ctl --json status`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ctl(&["--json", "status"]);
        out.assert_success("tandem ctl --json status");
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "ctl --json status is not one JSON object: {e}\n{}",
                out.stdout
            )
        })
    }

    /// `volume_bytes` from `tandem ctl --json status`.
    pub fn volume_bytes(&self) -> u64 {
        let status = self.status_json();
        status["volume_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("status has no numeric volume_bytes: {status}"))
    }

    /// Resident set size of the node process in KiB (VmRSS from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` to the node.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("node not running");
        rustix::process::kill_process(rustix::process::Pid::from_child(child), signal)
            .expect("kill(2) the node");
    }

    /// SIGKILL, then reap. The node's files stay as the crash left them.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` and waits for the exit; returns the status (panics on timeout).
    pub fn stop_with(&mut self, signal: rustix::process::Signal) -> ExitStatus {
        self.signal(signal);
        let deadline = Instant::now() + NODE_STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait tandem") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "tandem run did not exit within {NODE_STOP_TIMEOUT:?} of {signal:?}\n--- stderr\n{}",
                    self.stderr_log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait, and assert exit status 0.
    pub fn stop(&mut self) {
        let status = self.stop_with(rustix::process::Signal::TERM);
        assert_eq!(
            status.code(),
            Some(exit_code::OK),
            "tandem run exited with {status} after SIGTERM\n--- stderr\n{}",
            self.stderr_log()
        );
    }

    /// Takes the config back (for a restart on the same files) after the node stopped.
    pub fn into_config(mut self) -> NodeConfig {
        self.kill();
        self.config.clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // A failing test shows what every node it started said.
            eprintln!("--- log of {}:\n{}", self.config.name, self.stderr_log());
        }
    }
}

/// Reads a whole file, with the path in the panic message.
pub fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Waits until `cond` holds, polling every 20 ms, up to `timeout`. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `io::Error` kinds that mean "the peer closed the connection".
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}
