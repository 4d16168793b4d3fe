//! Automatic failover with two real `tandem` processes on two boards in network namespaces
//! ([`tandem_tests::netns`]), and a client that writes through the cluster IP as a user's copy
//! would: the seeds' pull-the-plug and pull-the-cable experiments (DESIGN.md §4, issue 4).
//!
//! The client is [`tandem_tests::workload`]: short timeouts, reconnects and retries, and every
//! acknowledged write checked afterwards.
//! Needs root and iproute2; skipped otherwise (a failure under `CI=true`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tandem_tests::netns::{Board, Cable, Lab};
use tandem_tests::pair::{self, is, links_up};
use tandem_tests::workload::{check_all, with_workload, Workload};
use tandem_tests::{Node, TempDir};

const WAIT: Duration = Duration::from_secs(30);

fn start_pair(lab: &Lab, dir: &Path, extra: &str) -> (Node, Node) {
    let a = lab.start(dir, Board::A, extra);
    let b = lab.start(dir, Board::B, extra);
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    wait_ready(&a);
    wait_ready(&b);
    (a, b)
}

fn wait_ready(node: &Node) -> serde_json::Value {
    pair::wait_status(node, "ready for failover", WAIT, |s| {
        s["ready_for_failover"] == true && s["auto_failover"] == true
    })
}

fn role(node: &Node) -> String {
    node.status_json()["role"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

#[test]
fn the_primary_loses_power_mid_copy_three_times_and_no_acknowledged_write_is_lost() {
    let Some(lab) = Lab::new() else { return };
    let dir = TempDir::new("failover-power");
    let (a, b) = start_pair(&lab, dir.path(), "");
    let mut nodes = [Some(a), Some(b)];
    let boards = [Board::A, Board::B];
    let mut failovers = Vec::new();
    for round in 0..3u64 {
        let primary = if role(nodes[0].as_ref().expect("a")) == "primary" {
            0
        } else {
            1
        };
        let survivor = 1 - primary;
        let work = Workload {
            blocks: if round % 2 == 0 { 400 } else { 3000 },
            block_bytes: if round % 2 == 0 { 64 << 10 } else { 4096 },
            scattered: round % 2 == 1,
            seed: 0xc0de + round,
        };
        let mut cut_at = None;
        let record = with_workload(&lab, work, work.blocks / 4, |_| {
            lab.power_cut(boards[primary], nodes[primary].as_mut().expect("primary"));
            cut_at = Some(Instant::now());
        });
        let cut_at = cut_at.expect("cut");
        let paused = record
            .pause_around(cut_at)
            .expect("the client wrote after the cut");
        failovers.push(paused);
        let new_primary = nodes[survivor].as_ref().expect("survivor");
        let status = pair::wait_status(new_primary, "the survivor serves", WAIT, is("primary"));
        assert!(status["epoch"].as_u64() > Some(0));
        eprintln!(
            "round {round}: failover {} ms (client reconnects {}, longest pause {} ms)",
            paused.as_millis(),
            record.reconnects.load(Ordering::Relaxed),
            record.longest_pause().as_millis()
        );
        // The dead board comes back: it rejoins as secondary and catches up.
        lab.power_on(boards[primary]);
        let config = nodes[primary].take().expect("dead node").into_config();
        let back = Node::spawn(config);
        pair::wait_status(
            &back,
            "the returned board catches up",
            WAIT,
            is("secondary"),
        );
        wait_ready(&back);
        wait_ready(nodes[survivor].as_ref().expect("survivor"));
        nodes[primary] = Some(back);
    }
    for paused in &failovers {
        assert!(
            *paused < Duration::from_secs(5),
            "a failover took {paused:?} (all: {failovers:?})"
        );
    }
}

#[test]
fn the_primarys_lan_cable_pulled_moves_the_role_and_the_client_carries_on() {
    let Some(lab) = Lab::new() else { return };
    let dir = TempDir::new("failover-lan-primary");
    let (a, b) = start_pair(&lab, dir.path(), "");
    let work = Workload {
        blocks: 2000,
        block_bytes: 4096,
        scattered: true,
        seed: 0x1a,
    };
    with_workload(&lab, work, 300, |_| lab.pull(Board::A, Cable::Lan));
    pair::wait_status(&b, "nas-b took the role", WAIT, is("primary"));
    let status = pair::wait_status(&a, "nas-a handed over", WAIT, is("secondary"));
    assert_eq!(status["uplink"], "down", "{status:#}");
    assert_eq!(status["ready_for_failover"], false);
    lab.plug(Board::A, Cable::Lan);
    wait_ready(&a);
    wait_ready(&b);
}

#[test]
fn the_secondarys_lan_cable_pulled_changes_nothing_for_the_client_and_readiness_says_so() {
    let Some(lab) = Lab::new() else { return };
    let dir = TempDir::new("failover-lan-secondary");
    let (a, b) = start_pair(&lab, dir.path(), "");
    let work = Workload {
        blocks: 2000,
        block_bytes: 4096,
        scattered: true,
        seed: 0x2b,
    };
    let record = with_workload(&lab, work, 300, |_| {
        lab.pull(Board::B, Cable::Lan);
        let status = pair::wait_status(&a, "nas-a sees the peer's uplink down", WAIT, |s| {
            s["ready_for_failover"] == false
        });
        let reasons = status["not_ready_reasons"].to_string();
        assert!(reasons.contains("peer uplink"), "{status:#}");
    });
    assert!(
        record.longest_pause() < Duration::from_millis(1000),
        "the client paused {:?}",
        record.longest_pause()
    );
    assert_eq!(role(&a), "primary");
    assert_eq!(role(&b), "secondary");
    let status = b.status_json();
    assert_eq!(status["uplink"], "down", "{status:#}");
    lab.plug(Board::B, Cable::Lan);
    wait_ready(&a);
}

#[test]
fn the_heartbeat_cable_pulled_moves_nothing_and_writes_reach_both_disks_over_the_lan() {
    let Some(lab) = Lab::new() else { return };
    let dir = TempDir::new("failover-heartbeat");
    let (a, b) = start_pair(&lab, dir.path(), "");
    let work = Workload {
        blocks: 300,
        block_bytes: 64 << 10,
        scattered: false,
        seed: 0x3c,
    };
    let record = with_workload(&lab, work, 50, |_| lab.pull(Board::A, Cable::Heartbeat));
    assert!(
        record.longest_pause() < Duration::from_millis(2500),
        "the client paused {:?}",
        record.longest_pause()
    );
    let status = pair::wait_status(&a, "heartbeat down, lan up", WAIT, |s| {
        s["links"]["heartbeat"] == "down" && s["links"]["lan"] == "up" && s["peer"] == "connected"
    });
    assert_eq!(status["role"], "primary");
    assert_eq!(status["ready_for_failover"], true, "{status:#}");
    // `links` shows the pulled cable as a port without carrier.
    let out = a.ctl(&["--json", "links"]);
    out.assert_success("links");
    let links: serde_json::Value = serde_json::from_str(&out.stdout).expect("links JSON");
    let carrier = |name: &str| {
        links
            .as_array()
            .and_then(|l| l.iter().find(|x| x["link"] == name))
            .map(|x| x["carrier"].clone())
    };
    assert_eq!(carrier("heartbeat"), Some("off".into()), "{links:#}");
    assert_eq!(carrier("lan"), Some("on".into()), "{links:#}");
    assert!(
        status["warnings"].to_string().contains("heartbeat"),
        "{status:#}"
    );
    assert_eq!(status["out_of_sync_bytes"], 0, "{status:#}");
    assert_eq!(role(&b), "secondary");
    // Both disks hold the copy.
    let len = work.blocks * work.block_bytes as u64;
    assert!(
        pair::file_head(&a.config().backing, len) == pair::file_head(&b.config().backing, len),
        "the disks differ after mirroring over the lan"
    );
    lab.plug(Board::A, Cable::Heartbeat);
    pair::wait_status(&a, "both links up", WAIT, links_up);
}

#[test]
fn a_hung_primary_is_not_taken_over_while_its_address_answers_and_the_pair_recovers() {
    use rustix::process::Signal;
    let Some(lab) = Lab::new() else { return };
    let dir = TempDir::new("failover-hung");
    let (a, b) = start_pair(&lab, dir.path(), "");
    let work = Workload {
        blocks: 1500,
        block_bytes: 4096,
        scattered: true,
        seed: 0x4d,
    };
    with_workload(&lab, work, 200, |_| {
        a.signal(Signal::STOP);
        let status = pair::wait_status(&b, "nas-b outdates itself", WAIT, |s| {
            s["disk"] == "outdated"
        });
        assert_eq!(status["role"], "secondary", "{status:#}");
        a.signal(Signal::CONT);
    });
    pair::wait_status(&a, "nas-a still primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b caught up", WAIT, is("secondary"));
    wait_ready(&a);
    let len = work.blocks * work.block_bytes as u64 * 7919;
    let len = len.min(a.volume_bytes());
    assert!(
        pair::file_head(&a.config().backing, len) == pair::file_head(&b.config().backing, len),
        "the replicas differ after the recovery"
    );
}

#[test]
fn the_dead_board_returns_resyncs_only_what_changed_and_takes_its_role_back() {
    let Some(lab) = Lab::new() else { return };
    let dir = TempDir::new("failover-failback");
    let (mut a, b) = start_pair(&lab, dir.path(), "failback = \"preferred\"");
    lab.power_cut(Board::A, &mut a);
    pair::wait_status(&b, "nas-b took over", WAIT, is("primary"));
    let work = Workload {
        blocks: 64,
        block_bytes: 64 << 10,
        scattered: false,
        seed: 0x5e,
    };
    with_workload(&lab, work, 0, |_| {});
    lab.power_on(Board::A);
    let a = Node::spawn(a.into_config());
    pair::wait_status(&a, "nas-a takes its role back", WAIT, is("primary"));
    // The resync source was nas-b, the primary while nas-a was away.
    let status = pair::wait_status(&b, "nas-b secondary again", WAIT, is("secondary"));
    let resynced = status["sync"]["total_bytes"].as_u64().unwrap_or(0);
    let written = work.blocks * work.block_bytes as u64;
    assert!(
        resynced >= written && resynced < a.volume_bytes() / 4,
        "resynced {resynced} bytes after {written} were written: {status:#}"
    );
    let bad = lab.in_client(|| check_all(lab.nbd_addr(), work));
    assert!(bad.is_empty(), "blocks that differ after failback: {bad:?}");
}
