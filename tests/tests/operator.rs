//! The operator's side of a running node: `ctl` commands, events, the running configuration, and
//! the Prometheus metrics endpoint scraped and parsed by a real text-format parser.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;
use tandem_tests::{run_with_timeout, NodeConfig, TempDir, COMMAND_TIMEOUT, SYSTEM_PYTHON};

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200"), "metrics answered: {head}");
    assert!(
        head.contains("text/plain; version=0.0.4"),
        "content type: {head}"
    );
    body.to_string()
}

fn parse_metrics(text: &str) -> serde_json::Value {
    let mut child = Command::new(SYSTEM_PYTHON)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/parse_metrics.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the metrics parser");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let output = child.wait_with_output().expect("parser output");
    assert!(
        output.status.success(),
        "Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("parser JSON")
}

#[test]
fn metrics_are_served_in_prometheus_text_format_and_count_io() {
    if !tandem_tests::require_tools(&["qemu-io"]) {
        return;
    }
    let dir = TempDir::new("metrics");
    let port = tandem_tests::free_port("127.0.0.1");
    let mut config = NodeConfig::standalone(dir.path(), "nas-m");
    config.extra_toml = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    config.create_backing(tandem_tests::BACKING_BYTES_DEFAULT);
    let node = tandem_tests::Node::spawn(config);
    let before = parse_metrics(&scrape(port));
    assert_eq!(before["tandem_role{role=standalone}"], 1.0);
    assert_eq!(before["tandem_disk_state{state=uptodate}"], 1.0);
    assert_eq!(before["tandem_peer_state{state=none}"], 1.0);
    assert_eq!(before["tandem_uplink_state{state=unknown}"], 1.0);
    assert_eq!(
        before["tandem_volume_bytes{}"].as_f64(),
        Some(node.volume_bytes() as f64)
    );
    assert_eq!(before["tandem_nbd_requests_total{kind=write}"], 0.0);

    let io = run_with_timeout(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &node.nbd_uri(),
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 64k 64k",
            "-c",
            "flush",
        ]),
        COMMAND_TIMEOUT,
    );
    io.assert_success("qemu-io writes");
    let after = parse_metrics(&scrape(port));
    assert_eq!(after["tandem_nbd_requests_total{kind=write}"], 2.0);
    assert_eq!(after["tandem_nbd_bytes_total{direction=write}"], 131072.0);
    assert!(after["tandem_nbd_requests_total{kind=flush}"].as_f64() >= Some(1.0));
    assert!(after["tandem_nbd_connections_total{outcome=accepted}"].as_f64() >= Some(1.0));
    // Both writes are in the write latency histogram: +Inf counts every one.
    assert_eq!(
        after["tandem_nbd_request_duration_seconds_bucket{kind=write,le=+Inf}"],
        2.0
    );
    assert_eq!(
        after["tandem_nbd_request_duration_seconds_count{kind=write}"],
        2.0
    );
    assert_eq!(
        before["tandem_nbd_request_duration_seconds_count{kind=write}"],
        0.0
    );
}

#[test]
fn events_list_the_start_up_with_timestamps() {
    let dir = TempDir::new("events");
    let node = tandem_tests::Node::start(&dir, "nas-e");
    let text = node.ctl(&["events"]);
    text.assert_success("ctl events");
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("volume initialized")),
        "events: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("started (node=nas-e role=standalone")),
        "events: {lines:?}"
    );
    // "YYYY-MM-DD HH:MM:SS.mmm level text"
    for line in &lines {
        let bytes = line.as_bytes();
        assert!(
            bytes.len() > 24 && bytes[4] == b'-' && bytes[10] == b' ' && bytes[19] == b'.',
            "{line}"
        );
    }
    let json = node.ctl(&["--json", "events"]);
    json.assert_success("ctl --json events");
    let events: serde_json::Value = serde_json::from_str(&json.stdout).expect("events JSON");
    let first = &events[0];
    assert_eq!(first["level"], "info");
    assert!(first["unix_ms"].as_u64().expect("a timestamp") > 1_600_000_000_000);
}

#[test]
fn config_shows_the_running_configuration() {
    let dir = TempDir::new("config-cmd");
    let node = tandem_tests::Node::start(&dir, "nas-c");
    let out = node.ctl(&["config"]);
    out.assert_success("ctl config");
    assert!(out.stdout.contains("name = \"nas-c\""), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&node.config().backing.display().to_string()),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("[console]"), "{}", out.stdout);
}

#[test]
fn ctl_refuses_role_commands_without_yes_and_reports_bad_arguments() {
    let dir = TempDir::new("ctl-args");
    let node = tandem_tests::Node::start(&dir, "nas-y");
    let refused = node.ctl(&["switchover"]);
    assert_eq!(refused.code(), Some(64), "{refused:?}");
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    let confirmed = node.ctl(&["--yes", "switchover"]);
    assert_eq!(confirmed.code(), Some(1), "{confirmed:?}");
    assert!(
        confirmed.stderr.contains("standalone"),
        "{}",
        confirmed.stderr
    );
    let promote = node.ctl(&["--yes", "promote", "--force"]);
    assert_eq!(promote.code(), Some(1), "{promote:?}");
    let extra = node.ctl(&["status", "now"]);
    assert_eq!(extra.code(), Some(1), "{extra:?}");
    assert!(extra.stderr.contains("wrong arguments"), "{}", extra.stderr);
    assert_eq!(extra.stderr.lines().count(), 1, "{}", extra.stderr);
    let unknown = node.ctl(&["reboot"]);
    assert_eq!(unknown.code(), Some(1));
    assert!(
        unknown.stderr.contains("unknown command"),
        "{}",
        unknown.stderr
    );
    let help = node.ctl(&["help"]);
    help.assert_success("ctl help");
    for command in [
        "status",
        "switchover",
        "promote --force",
        "resolve-split-brain",
        "verify",
        "events",
        "config",
    ] {
        assert!(
            help.stdout.contains(command),
            "help lacks {command}: {}",
            help.stdout
        );
    }
}
