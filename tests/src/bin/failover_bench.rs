//! The failover benchmark (`bench/failover.sh`): two real nodes on two boards in network
//! namespaces, a client writing through the cluster IP with short timeouts
//! ([`tandem_tests::workload`]), default timings (heartbeat 100 ms, dead time 1000 ms).
//!
//! It measures, as the client sees them:
//! - failover: the primary's power cut to the first write acknowledged through the cluster IP
//!   (`--runs` times, alternating boards; p50, p90, max);
//! - the degrade pause: the secondary's power cut to the next acknowledged write;
//! - a planned switchover's pause;
//! - how long each pulled cable takes to be seen (uplink down, heartbeat link down).
//!
//! Needs root and iproute2. Prints a Markdown table for docs/BENCHMARKS.md.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tandem_tests::netns::{Board, Cable, Lab};
use tandem_tests::pair::{self, is};
use tandem_tests::workload::{check_all, write_all, Record, Workload};
use tandem_tests::{Node, TempDir};

const WAIT: Duration = Duration::from_secs(30);

fn wait_ready(node: &Node) {
    pair::wait_status(node, "ready for failover", WAIT, |s| {
        s["ready_for_failover"] == true
    });
}

/// Runs a client while `event` happens once it has written for a while; returns the pause the
/// client saw around it (last acknowledgement before its end to the first after), and checks
/// every block afterwards.
fn pause_of(lab: &Lab, seed: u64, event: impl FnOnce()) -> Duration {
    let work = Workload {
        blocks: 4000,
        block_bytes: 4096,
        scattered: true,
        seed,
    };
    let record = Record::default();
    let stop = AtomicBool::new(false);
    let addr = lab.nbd_addr();
    let mut at = None;
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| lab.in_client(|| write_all(addr, work, &record, &stop)));
        while record.acked.load(Ordering::Relaxed) < 300 {
            std::thread::sleep(Duration::from_millis(2));
        }
        event();
        at = Some(Instant::now());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        assert!(writer.join().expect("writer"), "the client did not finish");
    });
    let bad = lab.in_client(|| check_all(addr, work));
    assert!(bad.is_empty(), "blocks lost: {bad:?}");
    record
        .pause_around(at.expect("event"))
        .expect("a write after the event")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

/// Time until `check` holds on `node`'s status, polled every 5 ms.
fn time_until(node: &Node, check: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let start = Instant::now();
    while !check(&node.status_json()) {
        assert!(start.elapsed() < WAIT, "condition not reached");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let Some(lab) = Lab::new() else {
        eprintln!("the failover benchmark needs root and iproute2");
        std::process::exit(77);
    };
    let dir = TempDir::new("failover-bench");
    let boards = [Board::A, Board::B];
    let mut nodes = [
        Some(lab.start(dir.path(), Board::A, "")),
        Some(lab.start(dir.path(), Board::B, "")),
    ];
    for node in nodes.iter().flatten() {
        wait_ready(node);
    }
    let primary_of = |nodes: &[Option<Node>; 2]| {
        let a = nodes[0].as_ref().expect("a").status_json();
        if a["role"] == "primary" {
            0
        } else {
            1
        }
    };
    let restart = |nodes: &mut [Option<Node>; 2], i: usize| {
        lab.power_on(boards[i]);
        let node = Node::spawn(nodes[i].take().expect("node").into_config());
        wait_ready(&node);
        nodes[i] = Some(node);
        wait_ready(nodes[1 - i].as_ref().expect("peer"));
    };

    let mut failovers = Vec::new();
    for run in 0..runs {
        let p = primary_of(&nodes);
        let pause = pause_of(&lab, 0xfa11 + run as u64, || {
            lab.power_cut(boards[p], nodes[p].as_mut().expect("primary"));
        });
        eprintln!("failover run {run}: {} ms", pause.as_millis());
        failovers.push(pause);
        pair::wait_status(
            nodes[1 - p].as_ref().expect("survivor"),
            "survivor",
            WAIT,
            is("primary"),
        );
        restart(&mut nodes, p);
    }
    failovers.sort();

    let p = primary_of(&nodes);
    let s = 1 - p;
    let degrade = pause_of(&lab, 0xde, || {
        lab.power_cut(boards[s], nodes[s].as_mut().expect("secondary"));
    });
    restart(&mut nodes, s);

    let switchover = pause_of(&lab, 0x5a1, || {
        nodes[p]
            .as_ref()
            .expect("primary")
            .ctl(&["--yes", "switchover"])
            .assert_success("switchover");
    });
    let p = primary_of(&nodes);
    for node in nodes.iter().flatten() {
        wait_ready(node);
    }

    // Cable pulls: how long until the node reports them.
    let primary = nodes[p].as_ref().expect("primary");
    lab.pull(boards[p], Cable::Lan);
    let uplink_seen = time_until(primary, |s| s["uplink"] == "down");
    let moved = time_until(nodes[1 - p].as_ref().expect("peer"), |s| {
        s["role"] == "primary"
    });
    lab.plug(boards[p], Cable::Lan);
    for node in nodes.iter().flatten() {
        wait_ready(node);
    }
    lab.pull(Board::A, Cable::Heartbeat);
    let heartbeat_seen = time_until(nodes[0].as_ref().expect("a"), |s| {
        s["links"]["heartbeat"] == "down"
    });
    lab.plug(Board::A, Cable::Heartbeat);

    println!("| measure (client-visible unless said) | runs | p50 ms | p90 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!(
        "| failover: primary power cut → first acknowledged write through the cluster IP | {} | {} | {} | {} |",
        failovers.len(),
        ms(percentile(&failovers, 0.5)),
        ms(percentile(&failovers, 0.9)),
        ms(*failovers.last().expect("runs"))
    );
    println!(
        "| degrade pause: secondary power cut → next acknowledged write | 1 | {} | | |",
        ms(degrade)
    );
    println!(
        "| planned switchover → next acknowledged write | 1 | {} | | |",
        ms(switchover)
    );
    println!(
        "| primary's LAN cable pulled → its status says uplink down | 1 | {} | | |",
        ms(uplink_seen)
    );
    println!(
        "| primary's LAN cable pulled → the peer is primary (after the above) | 1 | {} | | |",
        ms(moved)
    );
    println!(
        "| heartbeat cable pulled → status says heartbeat link down | 1 | {} | | |",
        ms(heartbeat_seen)
    );
}
