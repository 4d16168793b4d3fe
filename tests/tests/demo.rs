//! `tandem demo`, the main job, run as a newcomer would run it: one command, no arguments. As
//! root with iproute2 (CI) it runs the pair in network namespaces with automatic failover; run
//! as an unprivileged user it takes the loopback path, where the demo acts as the operator.
//! Either way it must exit 0 with every checksum matching, say what it measured, and leave no
//! node, namespace or scratch directory behind, also when interrupted with Ctrl-C.
//!
//! The demos run one at a time: each is a timing-sensitive failover on a small machine.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tandem_tests::{is_ci, tandem_bin, tool_available, TempDir};

/// The demo takes well under a minute; this leaves room for a loaded machine.
const DEMO_TIMEOUT: Duration = Duration::from_secs(150);
/// After SIGTERM or SIGINT, the demo must be gone (and clean) within this.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The files the demo copies: one large and 300 small.
const FILES: &str = "301";
/// The unprivileged user of the loopback test.
const NOBODY: &str = "65534";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A finished demo: its exit status and what it printed.
struct Run {
    pid: u32,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "tandem demo (pid {}) exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.pid, self.status, self.stdout, self.stderr
        )
    }
}

/// Spawns `command` (a `tandem demo`) with its output captured; every line of stdout also goes
/// to `lines`.
fn spawn(command: &mut Command, lines: mpsc::Sender<String>) -> (Child, Capture) {
    let mut child = command
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tandem demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let err = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    (child, Capture { out, err })
}

struct Capture {
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

/// Waits for the demo; past `timeout` it is stopped as a user would (SIGTERM, so it cleans up;
/// SIGKILL only if that fails) and the test fails.
fn finish(mut child: Child, capture: Capture, timeout: Duration) -> Run {
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tandem demo") {
            break status;
        }
        if Instant::now() >= deadline {
            if timed_out {
                let _ = child.kill();
                break child.wait().expect("reap tandem demo");
            }
            timed_out = true;
            signal(pid, Signal::TERM);
            // Let it clean up before the SIGKILL.
            std::thread::sleep(STOP_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Run {
        pid,
        status,
        stdout: capture.out.join().unwrap_or_default(),
        stderr: capture.err.join().unwrap_or_default(),
    };
    assert!(
        !timed_out,
        "timed out after {timeout:?}: {}",
        run.describe()
    );
    run
}

fn signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32")).expect("nonzero pid");
    let _ = kill_process(pid, signal);
}

/// Runs `command` to its end.
fn run_demo(command: &mut Command) -> Run {
    let (lines, _unused) = mpsc::channel();
    let (child, capture) = spawn(command, lines);
    finish(child, capture, DEMO_TIMEOUT)
}

/// The demo passed: exit 0, the takeover measured, both checks with every file, the summary.
fn assert_passed(run: &Run) {
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    let out = &run.stdout;
    assert!(
        out.contains("takeover: nas-b is primary after "),
        "{}",
        run.describe()
    );
    let checks: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("checksums: "))
        .collect();
    assert_eq!(
        checks,
        vec![format!("checksums: {FILES} of {FILES} match"); 2],
        "{}",
        run.describe()
    );
    for line in [
        "summary",
        "  failover time ",
        "  bytes resynced ",
        "  checksums ",
        "  total time ",
        "PASS:",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(line)),
            "no line starting {line:?}: {}",
            run.describe()
        );
    }
    // "  bytes resynced   25.0 MiB (26214400 bytes): ...": the exact count, not its rounding.
    let resynced = out
        .lines()
        .find_map(|l| l.strip_prefix("  bytes resynced "))
        .and_then(|rest| rest.split_once('('))
        .and_then(|(_, count)| count.split_once(" bytes)"))
        .and_then(|(bytes, _)| bytes.parse::<u64>().ok());
    assert!(
        resynced.is_some_and(|bytes| bytes > 0),
        "nothing resynced ({resynced:?}): {}",
        run.describe()
    );
}

/// Nothing of demo `pid` is left: no `tandem run` of its scratch directory, no namespace, no
/// scratch directory.
fn assert_clean(pid: u32, tmp: &Path) {
    // The scratch directory is `tandem-demo-<pid>-<random>`.
    let scratch = format!("tandem-demo-{pid}-");
    let nodes = processes_mentioning(&tmp.join(&scratch).display().to_string());
    assert!(nodes.is_empty(), "nodes left running: {nodes:?}");
    let left: Vec<String> = std::fs::read_dir(tmp)
        .expect("read the temp dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&scratch))
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        tmp.display()
    );
    if tool_available("ip") && rustix::process::geteuid().is_root() {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let tag = format!("tdemo{pid}");
        assert!(
            !listed.lines().any(|l| l.starts_with(&tag)),
            "namespaces left: {listed}"
        );
    }
}

/// `pid: command line` of every process whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(needle) && cmdline.contains(" run "))
                .then(|| format!("{name}: {cmdline}"))
        })
        .collect()
}

#[test]
fn the_demo_pulls_the_plug_mid_copy_and_every_checksum_matches() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_demo(Command::new(tandem_bin()).arg("demo"));
    assert_passed(&run);
    if rustix::process::geteuid().is_root() && tool_available("ip") {
        assert!(
            run.stdout.contains("lab: network namespaces"),
            "root with iproute2 should get the namespace lab: {}",
            run.describe()
        );
    }
    assert_clean(run.pid, &std::env::temp_dir());
}

#[test]
fn the_demo_runs_on_loopback_for_an_unprivileged_user() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: not root, so the first test already ran the loopback demo");
        return;
    }
    if !tool_available("setpriv") {
        assert!(!is_ci(), "CI=true and setpriv (util-linux) is missing");
        eprintln!("SKIPPED: setpriv is missing, cannot run as another user");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A copy of the binary the user can reach (the build tree may not be), in /tmp, which
    // that user can write.
    let dir = TempDir::new("demo-nobody");
    let bin = copy_executable(tandem_bin(), dir.path());
    let as_nobody = |arg: &str| {
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(&bin)
            .arg(arg);
        command
    };
    let probe = as_nobody("--version").output().expect("spawn setpriv");
    if !probe.status.success() {
        assert!(
            !is_ci(),
            "CI=true and cannot run as uid {NOBODY}: {probe:?}"
        );
        eprintln!("SKIPPED: cannot run as uid {NOBODY}: {probe:?}");
        return;
    }
    let tmp = PathBuf::from("/tmp");
    let run = run_demo(as_nobody("demo").env("TMPDIR", &tmp));
    assert_passed(&run);
    assert!(
        run.stdout.contains("lab: loopback"),
        "an unprivileged user gets the loopback lab: {}",
        run.describe()
    );
    assert!(run.stdout.contains("promote --force"), "{}", run.describe());
    assert_clean(run.pid, &tmp);
}

#[test]
fn ctrl_c_in_the_middle_of_the_copy_stops_the_demo_and_removes_everything() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (lines, seen) = mpsc::channel();
    let (child, capture) = spawn(Command::new(tandem_bin()).arg("demo"), lines);
    let pid = child.id();
    let deadline = Instant::now() + DEMO_TIMEOUT;
    let mut interrupted = false;
    while Instant::now() < deadline {
        match seen.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with("copy: through") => {
                signal(pid, Signal::INT);
                interrupted = true;
                break;
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let run = finish(child, capture, STOP_TIMEOUT);
    assert!(interrupted, "the copy never started: {}", run.describe());
    assert_eq!(run.status.code(), Some(130), "{}", run.describe());
    assert!(run.stdout.contains("interrupted"), "{}", run.describe());
    assert_clean(pid, &std::env::temp_dir());
}

/// Copies `bin` into `dir` (mode 0755) and returns the copy's path.
fn copy_executable(bin: &Path, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("tandem");
    std::fs::copy(bin, &copy).expect("copy the tandem binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    copy
}
