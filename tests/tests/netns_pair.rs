//! Two real `tandem` processes on two boards in network namespaces ([`tandem_tests::netns`]):
//! the lab itself (addresses, a gateway that answers, cables that lose carrier when pulled), a
//! pair over both links that keeps its lan link when the heartbeat cable is pulled, and a power
//! cut of the secondary that the primary sees as a lost peer. Needs root and iproute2; skipped
//! otherwise (a failure under `CI=true`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_tests::netns::{Board, Cable, Lab};
use tandem_tests::pair::{self, is, links_up};
use tandem_tests::{tandem_bin, wait_until, Node, TempDir};

const WAIT: Duration = Duration::from_secs(20);
/// How long a veth may take to report a change of its peer's state (in practice: at once).
const CARRIER_WAIT: Duration = Duration::from_secs(2);

/// Waits until `board`'s interface for `cable` has (or lacks) carrier; returns how long it took.
fn wait_carrier(lab: &Lab, board: Board, cable: Cable, carrier: bool) -> Duration {
    let start = Instant::now();
    let reached = || lab.board_link(board, cable).carrier == carrier;
    assert!(
        wait_until(CARRIER_WAIT, reached),
        "{} {} carrier did not become {carrier}: {:?}",
        board.name(),
        cable.ifname(),
        lab.board_link(board, cable)
    );
    start.elapsed()
}

/// `cat /sys/class/net/IF/carrier` inside the board's namespace.
fn sysfs_carrier(lab: &Lab, board: Board, cable: Cable) -> String {
    let path = format!("/sys/class/net/{}/carrier", cable.ifname());
    let out = lab.exec(&lab.board_ns(board), &["cat", &path]);
    out.assert_success("cat carrier");
    out.stdout.trim().to_string()
}

#[test]
fn the_lab_comes_up_and_a_pulled_cable_drops_carrier() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let client = lab.client_ns();
    assert!(lab.ping(&client, &lab.gateway()), "the gateway answers");
    for board in [Board::A, Board::B] {
        assert!(
            lab.ping(&client, &lab.lan_ip(board)),
            "{} answers on the LAN",
            board.name()
        );
        let link = lab.board_link(board, Cable::Heartbeat);
        assert!(link.admin_up && link.carrier, "{link:?}");
    }
    assert!(
        lab.ping(&lab.board_ns(Board::A), &lab.hb_ip(Board::B)),
        "the heartbeat cable joins the boards"
    );
    assert!(
        !lab.answers(&client, &lab.cluster_ip(), Duration::from_millis(500)),
        "nobody holds the cluster IP yet"
    );

    // A pulled LAN cable: the board's interface stays up, without carrier.
    assert_eq!(sysfs_carrier(&lab, Board::A, Cable::Lan), "1");
    let probe = Instant::now();
    assert!(lab.board_link(Board::A, Cable::Lan).carrier);
    let probe = probe.elapsed();
    lab.pull(Board::A, Cable::Lan);
    let took = wait_carrier(&lab, Board::A, Cable::Lan, false);
    eprintln!("carrier loss seen after {took:?} (one probe takes {probe:?})");
    let link = lab.board_link(Board::A, Cable::Lan);
    assert!(link.admin_up, "lan0 stays administratively up: {link:?}");
    assert_eq!(sysfs_carrier(&lab, Board::A, Cable::Lan), "0");
    assert!(
        lab.board_link(Board::A, Cable::Heartbeat).carrier,
        "the other cable is untouched"
    );
    assert!(!lab.answers(&client, &lab.lan_ip(Board::A), Duration::from_millis(500)));
    assert!(lab.ping(&client, &lab.lan_ip(Board::B)));
    assert!(lab.ping(&lab.board_ns(Board::B), &lab.gateway()));

    lab.plug(Board::A, Cable::Lan);
    let took = wait_carrier(&lab, Board::A, Cable::Lan, true);
    eprintln!("carrier back after {took:?}");
    assert_eq!(sysfs_carrier(&lab, Board::A, Cable::Lan), "1");
    let a_answers = || lab.ping(&client, &lab.lan_ip(Board::A));
    assert!(
        wait_until(Duration::from_secs(5), a_answers),
        "nas-a answers again"
    );

    // What a power cut does to a board's addresses: only the fixed one stays.
    let board_b = lab.board_ns(Board::B);
    lab.exec(
        &board_b,
        &["ip", "addr", "add", &lab.cluster_cidr(), "dev", "lan0"],
    )
    .assert_success("add the cluster IP");
    assert!(lab.ping(&client, &lab.cluster_ip()));
    lab.flush_lan(Board::B);
    assert_eq!(
        lab.lan_addresses(Board::B),
        vec![format!("{}/24", lab.lan_ip(Board::B))]
    );
}

/// Both boards' nodes, paired, nas-a primary.
fn start_pair(lab: &Lab, dir: &Path) -> (Node, Node) {
    let a = lab.start(dir, Board::A, "");
    let b = lab.start(dir, Board::B, "");
    pair::wait_status(&a, "nas-a links", WAIT, links_up);
    pair::wait_status(&b, "nas-b links", WAIT, links_up);
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    (a, b)
}

#[test]
fn a_pair_in_namespaces_keeps_its_lan_link_when_the_heartbeat_cable_is_pulled() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let dir = TempDir::new("netns-pair");
    let (a, b) = start_pair(&lab, dir.path());

    // The node's pid is tandem's own, in the board's namespace.
    let exe = std::fs::read_link(format!("/proc/{}/exe", a.pid())).expect("exe");
    assert_eq!(
        exe.canonicalize().expect("canonical exe"),
        tandem_bin().canonicalize().expect("canonical tandem"),
    );
    let ns_of = |path: String| std::fs::metadata(path).map(|m| m.ino());
    assert_eq!(
        ns_of(format!("/proc/{}/ns/net", a.pid())).expect("ns of nas-a"),
        ns_of(format!("/var/run/netns/{}", lab.board_ns(Board::A))).expect("ns handle"),
    );

    let pulled = Instant::now();
    lab.pull(Board::A, Cable::Heartbeat);
    let hb_down_lan_up = |s: &serde_json::Value| {
        s["links"]["heartbeat"] != "up" && s["links"]["lan"] == "up" && s["peer"] == "connected"
    };
    let status = pair::wait_status(&a, "nas-a: heartbeat down, lan up", WAIT, hb_down_lan_up);
    eprintln!(
        "nas-a saw the heartbeat link {} after {:?}",
        status["links"]["heartbeat"],
        pulled.elapsed()
    );
    pair::wait_status(&b, "nas-b: heartbeat down, lan up", WAIT, hb_down_lan_up);
    // Well past the dead time, the pair is still a pair with the same roles.
    std::thread::sleep(Duration::from_secs(3));
    for (node, role) in [(&a, "primary"), (&b, "secondary")] {
        let status = node.status_json();
        assert!(
            hb_down_lan_up(&status) && is(role)(&status),
            "{status:#}\n--- log:\n{}",
            node.stderr_log()
        );
    }

    let plugged = Instant::now();
    lab.plug(Board::A, Cable::Heartbeat);
    pair::wait_status(&a, "nas-a: both links back", WAIT, links_up);
    eprintln!(
        "nas-a saw both links up {:?} after the plug",
        plugged.elapsed()
    );
    pair::wait_status(&b, "nas-b: both links back", WAIT, links_up);
    pair::wait_status(&a, "nas-a still primary", WAIT, is("primary"));
}

#[test]
fn a_power_cut_secondary_is_lost_to_the_primary_and_pairs_again_on_return() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let dir = TempDir::new("netns-power");
    let (a, mut b) = start_pair(&lab, dir.path());

    let cut = Instant::now();
    lab.power_cut(Board::B, &mut b);
    assert!(!b.is_running());
    pair::wait_status(&a, "nas-a: peer lost", Duration::from_secs(5), |s| {
        s["peer"] == "lost"
    });
    eprintln!(
        "nas-a lost its peer {:?} after the power cut",
        cut.elapsed()
    );
    pair::wait_status(&a, "nas-a still primary", WAIT, |s| s["role"] == "primary");
    assert_eq!(
        lab.lan_addresses(Board::B),
        vec![format!("{}/24", lab.lan_ip(Board::B))]
    );

    lab.power_on(Board::B);
    let b = Node::spawn(b.into_config());
    let back = Instant::now();
    pair::wait_status(&a, "nas-a: links back", WAIT, links_up);
    pair::wait_status(&b, "nas-b: links back", WAIT, links_up);
    pair::wait_status(&b, "nas-b secondary again", WAIT, is("secondary"));
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    eprintln!("paired again {:?} after the restart", back.elapsed());
}
