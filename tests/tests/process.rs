//! The `tandem` binary as a process: crash and restart, start-up errors and their exit
//! statuses, the control socket, and clean shutdown.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_tests::nbd_wire::{cmd, cmd_flag, RawClient};
use tandem_tests::{
    create_sparse_file, exit_code, pseudo_random_bytes, require_tool, run_with_timeout, tandem_bin,
    CmdOutput, Node, NodeConfig, TempDir, BACKING_BYTES_DEFAULT, COMMAND_TIMEOUT,
};

const MIB: u64 = 1024 * 1024;

fn tandem(args: &[&str]) -> CmdOutput {
    run_with_timeout(
        Command::new(tandem_bin())
            .args(args)
            .env("RUST_BACKTRACE", "1"),
        COMMAND_TIMEOUT,
    )
}

fn tandem_run(config: &Path) -> CmdOutput {
    tandem(&["run", "--config", config.to_str().expect("utf-8 path")])
}

/// A start-up error: the expected exit status, exactly one non-empty line on stderr, no panic.
fn assert_startup_error(out: &CmdOutput, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{what}: exit status {} (expected {code})\n--- stderr\n{}",
        out.status,
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("stack backtrace"),
        "{what}: panicked\n{}",
        out.stderr
    );
    let lines = out.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line on stderr, got {}:\n{}",
        lines.len(),
        out.stderr
    );
}

fn qemu_io(uri: &str, commands: &[&str]) -> CmdOutput {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(uri);
    run_with_timeout(&mut command, COMMAND_TIMEOUT)
}

fn assert_qemu_io_ok(out: &CmdOutput, what: &str) {
    out.assert_success(what);
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "{what}\n--- stdout\n{}\n--- stderr\n{}",
        out.stdout,
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Crash and restart

#[test]
fn flushed_writes_survive_sigkill_and_restart() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = TempDir::new("crashflush");
    let mut node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let volume_bytes = node.volume_bytes();
    let last = volume_bytes - 4096;
    let out = qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 4M",
            "write -P 0xc3 5M 1M",
            "write -P 0x77 12345 3000",
            &format!("write -P 0x3e {last} 4096"),
            "flush",
        ],
    );
    assert_qemu_io_ok(&out, "qemu-io write + flush");
    node.kill();

    let node = Node::spawn(node.into_config());
    assert_eq!(
        node.volume_bytes(),
        volume_bytes,
        "size unchanged by a restart"
    );
    let out = qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 12345",
            "read -P 0x77 12345 3000",
            "read -P 0x5a 15345 4178959",
            "read -P 0 4M 1M",
            "read -P 0xc3 5M 1M",
            &format!("read -P 0x3e {last} 4096"),
        ],
    );
    assert_qemu_io_ok(&out, "qemu-io read after SIGKILL + restart");
}

#[test]
fn fua_and_flush_acknowledged_writes_survive_sigkill_while_connected() {
    let dir = TempDir::new("crashfua");
    let mut node = Node::start(&dir, "nas-a");
    let data_fua = pseudo_random_bytes(0xf0a, 256 * 1024);
    let data_flushed = pseudo_random_bytes(0xf1, 256 * 1024);
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_eq!(
        c.write(cmd_flag::FUA, 3 * MIB, &data_fua)
            .expect("FUA write"),
        0
    );
    assert_eq!(c.write(0, 7 * MIB + 512, &data_flushed).expect("write"), 0);
    assert_eq!(c.command(0, cmd::FLUSH, 0, 0).expect("flush"), 0);
    // Crash with the client still connected: nothing may be waiting for a graceful close.
    node.kill();
    drop(c);

    let node = Node::spawn(node.into_config());
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_eq!(
        c.read(3 * MIB, data_fua.len() as u32).expect("read"),
        Ok(data_fua),
        "FUA write lost by SIGKILL"
    );
    assert_eq!(
        c.read(7 * MIB + 512, data_flushed.len() as u32)
            .expect("read"),
        Ok(data_flushed),
        "flushed write lost by SIGKILL"
    );
}

/// qemu-io's `write -f` sends FUA; qemu also flushes when it closes the image, so this checks
/// the qemu path end to end, while the raw test above isolates FUA from FLUSH.
#[test]
fn qemu_io_fua_writes_survive_sigkill_and_restart() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = TempDir::new("crashqfua");
    let mut node = Node::start(&dir, "nas-a");
    let uri = node.nbd_uri();
    let out = qemu_io(
        &uri,
        &["write -f -P 0x6d 1M 2M", "write -f -P 0x6e 9000 100"],
    );
    assert_qemu_io_ok(&out, "qemu-io write -f");
    node.kill();
    let node = Node::spawn(node.into_config());
    let out = qemu_io(
        &node.nbd_uri(),
        &["read -P 0x6d 1M 2M", "read -P 0x6e 9000 100"],
    );
    assert_qemu_io_ok(&out, "qemu-io read after restart");
}

// ---------------------------------------------------------------------------------------------
// Start-up errors

#[test]
fn missing_config_file_exits_78_with_one_line() {
    let dir = TempDir::new("noconfig");
    let out = tandem_run(&dir.join("absent.toml"));
    assert_startup_error(&out, exit_code::CONFIG, "missing config");
}

#[test]
fn malformed_config_exits_78_with_one_line() {
    let dir = TempDir::new("badconfig");
    let config = NodeConfig::standalone(dir.path(), "nas-a");
    create_sparse_file(&config.backing, BACKING_BYTES_DEFAULT);
    for (label, text) in [
        ("broken toml", "[node\nname = \"nas-a\"\n".to_string()),
        ("not toml at all", "\u{0}\u{1}binary\u{ff}".to_string()),
        (
            "no [volume] section",
            "[node]\nname = \"nas-a\"\n".to_string(),
        ),
        (
            "a number where a path belongs",
            config.to_toml().replace(
                &format!("backing = \"{}\"", config.backing.display()),
                "backing = 42",
            ),
        ),
    ] {
        std::fs::write(&config.config_path, text).expect("write config");
        let out = tandem_run(&config.config_path);
        assert_startup_error(&out, exit_code::CONFIG, label);
    }
}

#[test]
fn missing_backing_file_exits_66_with_one_line() {
    let dir = TempDir::new("nobacking");
    let config = NodeConfig::standalone(dir.path(), "nas-a");
    config.write();
    let out = tandem_run(&config.config_path);
    assert_startup_error(&out, exit_code::NO_INPUT, "missing backing file");
    assert!(
        !config.backing.exists(),
        "a missing backing device must not be created"
    );
}

/// Writes `bytes` at `offset` of `path`.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open backing");
    file.write_all_at(bytes, offset).expect("poke");
}

fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).expect("open backing");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("peek");
    buf
}

#[test]
fn backing_with_a_foreign_signature_is_refused_until_init_force() {
    let signatures: [(&str, u64, &[u8]); 4] = [
        ("ext4", 1080, &[0x53, 0xef]),
        ("xfs", 0, b"XFSB"),
        ("mbr", 510, &[0x55, 0xaa]),
        ("gpt", 512, b"EFI PART"),
    ];
    for (label, offset, magic) in signatures {
        let dir = TempDir::new(&format!("foreign-{label}"));
        let config = NodeConfig::standalone(dir.path(), "nas-a");
        create_sparse_file(&config.backing, BACKING_BYTES_DEFAULT);
        poke(&config.backing, offset, magic);
        let before = std::fs::metadata(&config.backing).expect("stat").len();
        config.write();

        let out = tandem_run(&config.config_path);
        assert_startup_error(&out, exit_code::NO_INPUT, &format!("{label} signature"));
        assert_eq!(
            peek(&config.backing, offset, magic.len()),
            magic,
            "{label}: a refused device was modified"
        );
        assert_eq!(
            std::fs::metadata(&config.backing).expect("stat").len(),
            before
        );

        let cfg = config.config_path.to_str().expect("utf-8 path");
        let out = tandem(&["init", "--config", cfg, "--force"]);
        out.assert_success(&format!("tandem init --force over {label}"));
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);

        let node = Node::spawn(config.clone());
        let volume_bytes = node.volume_bytes();
        assert!(
            volume_bytes > 0 && volume_bytes < BACKING_BYTES_DEFAULT,
            "{label}: volume_bytes {volume_bytes}"
        );
    }
}

#[test]
fn socket_path_in_use_by_a_live_node_exits_73_and_leaves_it_serving() {
    let dir = TempDir::new("inuse");
    let first = Node::start(&dir, "nas-a");

    // Same NBD socket, everything else separate.
    let mut second = NodeConfig::standalone(dir.path(), "nas-b");
    second.nbd_socket = first.nbd_socket().to_path_buf();
    create_sparse_file(&second.backing, BACKING_BYTES_DEFAULT);
    second.write();
    let out = tandem_run(&second.config_path);
    assert_startup_error(&out, exit_code::CANT_CREATE, "NBD socket in use");

    // Same control socket.
    let mut third = NodeConfig::standalone(dir.path(), "nas-c");
    third.control_socket = first.control_socket().to_path_buf();
    create_sparse_file(&third.backing, BACKING_BYTES_DEFAULT);
    third.write();
    let out = tandem_run(&third.config_path);
    assert_startup_error(&out, exit_code::CANT_CREATE, "control socket in use");

    // The loser must not have unlinked or stolen the winner's sockets.
    let (mut c, _) = RawClient::connect_and_go(first.nbd_socket());
    assert!(c.read(0, 512).expect("read").is_ok());
    first
        .ctl(&["status"])
        .assert_success("ctl status on the first node");
}

#[test]
fn stale_socket_files_from_a_dead_process_are_replaced() {
    let dir = TempDir::new("stale");
    let config = NodeConfig::standalone(dir.path(), "nas-a");
    create_sparse_file(&config.backing, BACKING_BYTES_DEFAULT);
    for path in [&config.nbd_socket, &config.control_socket] {
        drop(UnixListener::bind(path).expect("bind stale socket"));
        assert!(path.exists(), "stale socket file left behind");
    }
    let node = Node::spawn(config);
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    assert!(c.read(0, 512).expect("read").is_ok());
    node.ctl(&["status"]).assert_success("ctl status");
}

#[test]
fn unknown_flags_and_missing_arguments_exit_64_with_one_line() {
    let dir = TempDir::new("usage");
    let config = NodeConfig::standalone(dir.path(), "nas-a");
    create_sparse_file(&config.backing, BACKING_BYTES_DEFAULT);
    config.write();
    let cfg = config.config_path.to_str().expect("utf-8 path");
    for (label, args) in [
        (
            "unknown flag to run",
            vec!["run", "--config", cfg, "--bogus"],
        ),
        ("unknown top-level flag", vec!["--bogus"]),
        ("run without --config", vec!["run"]),
        ("--config without a value", vec!["run", "--config"]),
        ("unknown subcommand", vec!["frobnicate"]),
    ] {
        let out = tandem(&args);
        assert_startup_error(&out, exit_code::USAGE, label);
    }
    // --help is not an error.
    let out = tandem(&["run", "--help"]);
    out.assert_success("tandem run --help");
    assert!(!out.stdout.is_empty() || !out.stderr.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Control socket

#[test]
fn ctl_json_status_reports_a_standalone_uptodate_node() {
    let dir = TempDir::new("ctljson");
    let node = Node::start(&dir, "nas-a");
    let status = node.status_json();
    assert_eq!(status["node"], "nas-a", "{status:#}");
    assert_eq!(status["role"], "standalone", "{status:#}");
    assert_eq!(status["disk"], "uptodate", "{status:#}");
    assert_eq!(status["peer"], "none", "{status:#}");
    let volume_bytes = status["volume_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("volume_bytes not a number: {status:#}"));
    assert!(volume_bytes > 0 && volume_bytes < BACKING_BYTES_DEFAULT);
    let (_c, export) = RawClient::connect_and_go(node.nbd_socket());
    assert_eq!(export.size, volume_bytes, "NBD size vs volume_bytes");
    if tandem_tests::tool_available("nbdinfo") {
        let out = tandem_tests::run("nbdinfo", &["--size", &node.nbd_uri()]);
        out.assert_success("nbdinfo --size");
        assert_eq!(out.stdout.trim(), volume_bytes.to_string());
    }

    let out = node.ctl(&["status"]);
    out.assert_success("ctl status");
    assert!(
        out.stdout.contains("standalone") && out.stdout.contains("nas-a"),
        "human status names the node and its role:\n{}",
        out.stdout
    );
}

#[test]
fn ctl_fails_with_one_line_without_a_socket_or_with_an_unknown_command() {
    let dir = TempDir::new("ctlerr");
    let absent = dir.join("absent.sock");
    let out = tandem(&["ctl", "--socket", absent.to_str().expect("utf-8"), "status"]);
    assert_ne!(
        out.code(),
        Some(0),
        "ctl against a missing socket succeeded"
    );
    assert!(out.code().is_some(), "ctl died from a signal");
    assert_eq!(out.stderr_lines().len(), 1, "one line:\n{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);

    let node = Node::start(&dir, "nas-a");
    let out = node.ctl(&["no-such-command"]);
    assert_ne!(out.code(), Some(0), "unknown ctl command succeeded");
    assert!(out.code().is_some(), "ctl died from a signal");
    assert_eq!(out.stderr_lines().len(), 1, "one line:\n{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    // The node is unharmed by a bad command.
    node.ctl(&["status"])
        .assert_success("ctl status after a bad command");
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn sigterm_exits_zero_and_removes_its_sockets() {
    let dir = TempDir::new("sigterm");
    let mut node = Node::start(&dir, "nas-a");
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_eq!(c.write(0, 0, &[1u8; 4096]).expect("write"), 0);
    let nbd_socket = node.nbd_socket().to_path_buf();
    let control_socket = node.control_socket().to_path_buf();
    node.stop();
    assert!(!nbd_socket.exists(), "NBD socket left behind after SIGTERM");
    assert!(
        !control_socket.exists(),
        "control socket left behind after SIGTERM"
    );
    drop(c);
    // And the data written before the stop is there on the next start.
    let node = Node::spawn(node.into_config());
    let (mut c, _) = RawClient::connect_and_go(node.nbd_socket());
    assert_eq!(c.read(0, 4096).expect("read"), Ok(vec![1u8; 4096]));
}

#[test]
fn sigint_exits_zero() {
    let dir = TempDir::new("sigint");
    let mut node = Node::start(&dir, "nas-a");
    let status = node.stop_with(rustix::process::Signal::INT);
    assert_eq!(
        status.code(),
        Some(exit_code::OK),
        "exit after SIGINT: {status}\n{}",
        node.stderr_log()
    );
    assert!(!node.config().nbd_socket.exists(), "NBD socket left behind");
}

#[test]
fn sigterm_with_idle_clients_connected_still_exits_promptly() {
    let dir = TempDir::new("sigtermbusy");
    let mut node = Node::start(&dir, "nas-a");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(RawClient::connect_and_go(node.nbd_socket()).0);
    }
    // One client in the middle of the handshake, one that sent half a request.
    let mut half = RawClient::connect(node.nbd_socket()).expect("connect");
    half.read_greeting().expect("greeting");
    let (mut partial, _) = RawClient::connect_and_go(node.nbd_socket());
    partial
        .stream()
        .write_all(&[0x25, 0x60])
        .expect("half a request");
    node.stop();
    for c in clients.iter_mut() {
        assert!(
            c.wait_closed(Duration::from_secs(2)),
            "client connection still open after the node exited"
        );
    }
}

/// A configured watchdog that cannot be armed refuses the start: a node that cannot be fenced
/// must not serve. (Arming a real one is tested on the QEMU board, tests/tests/image_qemu.rs.)
#[test]
fn a_watchdog_that_cannot_be_armed_refuses_the_start() {
    let dir = TempDir::new("watchdog");
    let mut config = NodeConfig::standalone(dir.path(), "nas-w");
    config.extra_toml = "\n[watchdog]\ndevice = \"/dev/null\"\ntimeout_s = 5\n".to_string();
    config.create_backing(tandem_tests::BACKING_BYTES_DEFAULT);
    config.write();
    let out = tandem_run(&config.config_path);
    assert_eq!(out.code(), Some(exit_code::SOFTWARE), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let last = out
        .stderr_lines()
        .last()
        .map(|l| l.to_string())
        .unwrap_or_default();
    assert!(
        last.contains("watchdog /dev/null: cannot arm it"),
        "{}",
        out.stderr
    );
    assert!(
        !config.nbd_socket.exists(),
        "a refused node left its NBD socket behind"
    );
    assert!(
        !config.control_socket.exists(),
        "a refused node left its control socket behind"
    );
}

#[test]
fn check_config_says_whether_automatic_failover_is_on_and_why_not() {
    use tandem_tests::pair::{self, Ports};
    let dir = TempDir::new("check-failover");
    let key = dir.join("cluster.key");
    pair::write_key(&key, 7);
    let ports = Ports::free();
    let cases = [
        (
            "preferred = \"nas-a\"",
            "automatic failover: off: [cluster] vip and uplink_probe not set",
        ),
        (
            "vip = \"192.168.131.230/24\"",
            "automatic failover: off: [cluster] uplink_probe not set",
        ),
        (
            "vip = \"192.168.131.230/24\"\nuplink_probe = \"192.168.131.1\"",
            "automatic failover: on",
        ),
    ];
    for (cluster, expected) in cases {
        let config = pair::config(dir.path(), "a", "b", &ports, &key, None, cluster);
        let path = config.write();
        let out = tandem(&["check-config", path.to_str().expect("utf-8 path")]);
        out.assert_success("check-config");
        assert!(
            out.stdout.contains(expected),
            "[cluster] {cluster}: expected '{expected}' in:\n{}",
            out.stdout
        );
    }
}
