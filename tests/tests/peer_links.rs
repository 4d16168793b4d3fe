//! Two real `tandem` processes with a `[peer]` section, on loopback addresses: both links come
//! up authenticated, a secondary refuses NBD clients, a killed peer is seen and comes back, a
//! wrong key is refused and reported once, and garbage on a link port changes nothing.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_tests::pair::{self, links_up, peer_lost, write_key, Ports, A_IP, B_IP};
use tandem_tests::{Node, NodeConfig, TempDir};

fn pair_config(dir: &Path, me: &str, peer: &str, ports: &Ports, key: &Path) -> NodeConfig {
    pair::config(dir, me, peer, ports, key, None, "")
}

fn wait_status(node: &Node, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    pair::wait_status(node, what, Duration::from_secs(10), check);
}

fn ports() -> Ports {
    Ports::free()
}

#[test]
fn both_links_come_up_and_a_secondary_refuses_nbd() {
    let dir = TempDir::new("pair-up");
    let key = dir.join("cluster.key");
    write_key(&key, 0x11);
    let ports = ports();
    let a = Node::spawn(pair_config(dir.path(), "a", "b", &ports, &key));
    let b = Node::spawn(pair_config(dir.path(), "b", "a", &ports, &key));
    wait_status(&a, "nas-a links", links_up);
    wait_status(&b, "nas-b links", links_up);
    // Two fresh devices pair in sync; with no `preferred` set, the name that sorts first
    // becomes primary.
    wait_status(&a, "nas-a primary", pair::is("primary"));
    wait_status(&b, "nas-b secondary", pair::is("secondary"));
    // A secondary never completes a handshake with an NBD client.
    if tandem_tests::require_tools(&["nbdinfo"]) {
        let out = tandem_tests::run("nbdinfo", &[&b.nbd_uri()]);
        assert!(
            !out.status.success(),
            "a secondary served nbdinfo: {}",
            out.stdout
        );
    }
    // `links` shows both cables with their addresses; a round trip is measured within a few
    // keepalives.
    let deadline = Instant::now() + Duration::from_secs(5);
    let links = loop {
        let out = a.ctl(&["--json", "links"]);
        out.assert_success("ctl --json links");
        let links: serde_json::Value = serde_json::from_str(&out.stdout).expect("links JSON");
        if links[0]["rtt_ms"].is_u64() && links[1]["rtt_ms"].is_u64() {
            break links;
        }
        assert!(
            Instant::now() < deadline,
            "no round trip measured: {links:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(links[0]["link"], "heartbeat");
    assert_eq!(links[0]["state"], "up");
    assert_eq!(links[0]["remote"], format!("{B_IP}:{}", ports.heartbeat));
    assert_eq!(links[1]["remote"], format!("{B_IP}:{}", ports.lan));
    let text = a.ctl(&["links"]).stdout;
    assert!(
        text.contains("heartbeat") && text.contains("rtt:"),
        "{text}"
    );

    // Maintenance shows in readiness, in status and in the events, and goes away again.
    a.ctl(&["maintenance", "on"])
        .assert_success("maintenance on");
    let status = a.status_json();
    assert_eq!(status["maintenance"], true);
    assert_eq!(status["auto_failover"], false);
    let reasons = status["not_ready_reasons"].to_string();
    assert!(reasons.contains("maintenance"), "{reasons}");
    a.ctl(&["maintenance", "off"])
        .assert_success("maintenance off");
    assert_eq!(a.status_json()["maintenance"], false);
    let reasons = a.status_json()["not_ready_reasons"].to_string();
    assert!(!reasons.contains("maintenance"), "{reasons}");

    let events = a.ctl(&["events"]).stdout;
    assert!(events.contains("maintenance mode on"), "{events}");
    assert!(
        events.contains("peer link up (link=heartbeat peer=nas-b)"),
        "{events}"
    );
    assert!(
        events.contains("peer link up (link=lan peer=nas-b)"),
        "{events}"
    );
}

#[test]
fn a_killed_peer_is_lost_and_comes_back() {
    let dir = TempDir::new("pair-kill");
    let key = dir.join("cluster.key");
    write_key(&key, 0x22);
    let ports = ports();
    let a = Node::spawn(pair_config(dir.path(), "a", "b", &ports, &key));
    let mut b = Node::spawn(pair_config(dir.path(), "b", "a", &ports, &key));
    wait_status(&a, "links up", links_up);
    b.kill();
    wait_status(&a, "peer lost after the kill", peer_lost);
    let b = Node::spawn(pair_config(dir.path(), "b", "a", &ports, &key));
    wait_status(&a, "links back", links_up);
    wait_status(&b, "links back on the restarted node", links_up);
}

#[test]
fn a_wrong_key_is_refused_and_reported_once() {
    let dir = TempDir::new("pair-key");
    let key_a = dir.join("a.key");
    let key_b = dir.join("b.key");
    write_key(&key_a, 0x33);
    write_key(&key_b, 0x44);
    let ports = ports();
    let a = Node::spawn(pair_config(dir.path(), "a", "b", &ports, &key_a));
    let b = Node::spawn(pair_config(dir.path(), "b", "a", &ports, &key_b));
    // Long enough for several reconnect attempts (the backoff tops out at 1 s).
    std::thread::sleep(Duration::from_millis(2500));
    for node in [&a, &b] {
        let status = node.status_json();
        assert_eq!(status["peer"], "lost", "{status:#}");
        let events = node.ctl(&["events"]).stdout;
        for link in ["heartbeat", "lan"] {
            let refusals = events
                .lines()
                .filter(|l| {
                    l.contains(&format!("peer refused (link={link}")) && l.contains("cluster key")
                })
                .count();
            assert_eq!(refusals, 1, "one refusal per link expected:\n{events}");
        }
    }
}

#[test]
fn garbage_on_a_link_port_changes_nothing() {
    let dir = TempDir::new("pair-garbage");
    let key = dir.join("cluster.key");
    write_key(&key, 0x55);
    let ports = ports();
    let a = Node::spawn(pair_config(dir.path(), "a", "b", &ports, &key));
    let mut b = Node::spawn(pair_config(dir.path(), "b", "a", &ports, &key));
    wait_status(&a, "links up", links_up);
    // From nas-a's address, so nas-b takes the connection: a stranger's would be refused at
    // once. It replaces the real connection, fails its handshake, and the real one returns.
    for junk in [&b"\x00\x00\x00\x05\x01junk"[..], &[0xff; 4096][..], b"TNDM"] {
        let addr = format!("{B_IP}:{}", ports.heartbeat);
        let stream = std::net::TcpStream::connect(&addr);
        if let Ok(mut stream) = stream {
            let _ = stream.write_all(junk);
            drop(stream);
        }
    }
    let _ =
        TcpStream::connect(format!("{B_IP}:{}", ports.lan)).map(|mut s| s.write_all(&[0u8; 100]));
    wait_status(&a, "links recover", links_up);
    wait_status(&b, "links recover on the listener", links_up);
    assert!(b.is_running(), "garbage killed the listening node");
}

#[test]
fn silent_connections_from_the_peers_address_do_not_take_the_links_down() {
    let dir = TempDir::new("pair-silent");
    let key = dir.join("cluster.key");
    write_key(&key, 0x66);
    let ports = ports();
    let a = Node::spawn(pair_config(dir.path(), "a", "b", &ports, &key));
    let b = Node::spawn(pair_config(dir.path(), "b", "a", &ports, &key));
    wait_status(&b, "links up", links_up);
    // Connections that come from nas-a's address but never authenticate: each is only a
    // candidate next to the live session, and the live session stays.
    let mut intruders = Vec::new();
    for _ in 0..6 {
        for port in [ports.heartbeat, ports.lan] {
            let socket = socket2_free_connect(A_IP, B_IP, port);
            intruders.push(socket);
        }
        std::thread::sleep(Duration::from_millis(300));
        let status = b.status_json();
        assert!(
            links_up(&status),
            "an intruder took a link down: {status:#}"
        );
    }
    assert!(links_up(&a.status_json()));
}

/// Connects from `from` (any port) to `to:port` with a plain blocking socket.
fn socket2_free_connect(from: &str, to: &str, port: u16) -> std::net::TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    let local: std::net::SocketAddr = format!("{from}:0").parse().expect("addr");
    rustix::net::bind(&fd, &local).expect("bind");
    let remote: std::net::SocketAddr = format!("{to}:{port}").parse().expect("addr");
    rustix::net::connect(&fd, &remote).expect("connect");
    std::net::TcpStream::from(fd)
}
