//! Mirroring with two real `tandem` processes on loopback addresses: initial pairing, protocol
//! C writes reaching both disks, a killed secondary caught up by a bitmap resync, a killed
//! primary replaced by a forced promotion with every acknowledged write present, the heartbeat
//! cable pulled while writes go on over the lan, a split brain detected and resolved by the
//! operator, switchover, and verify.

use std::time::Duration;
use tandem_tests::pair::{self, file_head, is, links_up, Cable, Ports, A_IP, B_IP};
use tandem_tests::{require_tools, run, Node, TempDir};

const WAIT: Duration = Duration::from_secs(20);

struct Pair {
    dir: TempDir,
    key: std::path::PathBuf,
    ports: Ports,
    cluster: String,
    hb_remote: Option<String>,
}

impl Pair {
    fn new(label: &str) -> Pair {
        let dir = TempDir::new(label);
        let key = dir.join("cluster.key");
        pair::write_key(&key, 0x42);
        Pair {
            dir,
            key,
            ports: Ports::free(),
            cluster: "preferred = \"nas-a\"\n".to_string(),
            hb_remote: None,
        }
    }

    fn start(&self, me: &str) -> Node {
        let peer = if me == "a" { "b" } else { "a" };
        let hb = if me == "a" {
            self.hb_remote.as_deref()
        } else {
            None
        };
        Node::spawn(pair::config(
            self.dir.path(),
            me,
            peer,
            &self.ports,
            &self.key,
            hb,
            &self.cluster,
        ))
    }
}

/// The offset of the `i`-th 64 KiB block of a workload that writes every `stride` bytes.
fn block_offset(node: &Node, i: u64, stride: u64) -> u64 {
    let span = node.volume_bytes() - (64 << 10);
    (i * stride) % span / 4096 * 4096
}

/// Writes `count` blocks of 64 KiB through qemu-io, block `i` filled with `pattern + i`, each
/// acknowledged before the next is issued.
fn qemu_io_writes(node: &Node, pattern: u8, count: u64, stride: u64) -> bool {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for i in 0..count {
        let offset = block_offset(node, i, stride);
        args.push("-c".to_string());
        args.push(format!(
            "write -P {} {offset} 64k",
            pattern.wrapping_add(i as u8)
        ));
    }
    args.push(node.nbd_uri());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &refs);
    let ok = out.status.success() && !out.stdout.contains("error") && !out.stderr.contains("error");
    if !ok {
        eprintln!("qemu-io failed: {}\n{}", out.stdout, out.stderr);
    }
    ok
}

fn assert_replicas_equal(a: &Node, b: &Node) {
    let len = a.volume_bytes();
    let left = file_head(&a.config().backing, len);
    let right = file_head(&b.config().backing, len);
    if left != right {
        let first = left.iter().zip(&right).position(|(x, y)| x != y);
        panic!("replicas differ (first differing byte at {first:?})");
    }
}

fn resync_finished(status: &serde_json::Value) -> bool {
    status["sync_running"] == false && status["out_of_sync_bytes"] == 0
}

#[test]
fn a_fresh_pair_pairs_without_copying_and_mirrors_every_write() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let pair = Pair::new("mirror-basic");
    let a = pair.start("a");
    let b = pair.start("b");
    let status = pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    assert_eq!(
        status["sync"]["total_bytes"], 0,
        "two fresh devices copy nothing"
    );
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(links_up(&a.status_json()));
    // The secondary refuses clients; the primary serves.
    assert!(!run("nbdinfo", &[&b.nbd_uri()]).status.success());
    assert!(
        qemu_io_writes(&a, 0x10, 64, 1 << 20),
        "writes through the primary"
    );
    assert_replicas_equal(&a, &b);
    // verify compares both copies and finds nothing.
    a.ctl(&["verify"]).assert_success("verify");
    let status = pair::wait_status(&a, "verify done", WAIT, |s| s["verify"]["running"] == false);
    assert_eq!(
        status["verify"]["mismatches"],
        serde_json::json!([]),
        "{status:#}"
    );
    assert_eq!(status["verify"]["checked_bytes"], a.volume_bytes());
}

#[test]
fn a_killed_secondary_catches_up_by_a_bitmap_resync() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-kill-secondary");
    let a = pair.start("a");
    let mut b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x20, 16, 1 << 20));
    b.kill();
    // The primary degrades (holds writes for the takeover window), then serves alone.
    assert!(
        qemu_io_writes(&a, 0x30, 32, 3 << 20),
        "writes while the secondary is down"
    );
    let alone = a.status_json();
    let dirty = alone["out_of_sync_bytes"].as_u64().unwrap_or(0);
    assert!(
        dirty >= 32 * 64 * 1024,
        "written regions are dirty: {alone:#}"
    );
    let b = pair.start("b");
    let status = pair::wait_status(&a, "resync done", WAIT, |s| {
        resync_finished(s) && s["sync"]["done_bytes"].as_u64() > Some(0)
    });
    let done = status["sync"]["done_bytes"].as_u64().unwrap_or(0);
    // Only what changed moved: the bytes written meanwhile, in 64 KiB regions.
    assert!(
        done >= 32 * 64 * 1024 && done <= dirty,
        "resynced {done} of {dirty} dirty bytes"
    );
    pair::wait_status(&b, "nas-b up to date", WAIT, is("secondary"));
    assert_replicas_equal(&a, &b);
}

#[test]
fn a_killed_primary_is_replaced_by_a_forced_promotion_with_every_write() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-kill-primary");
    let mut a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x40, 48, 5 << 20));
    a.kill();
    pair::wait_status(&b, "peer lost", WAIT, |s| s["peer"] == "lost");
    // The operator's override: refused without --yes, accepted with it.
    assert!(!b.ctl(&["promote", "--force"]).status.success());
    b.ctl(&["--yes", "promote", "--force"])
        .assert_success("promote --force");
    pair::wait_status(&b, "nas-b primary", WAIT, is("primary"));
    // Every write nas-a acknowledged is on nas-b.
    let data = file_head(&b.config().backing, b.volume_bytes());
    for i in 0..48u64 {
        let offset = block_offset(&b, i, 5 << 20) as usize;
        let want = 0x40u8.wrapping_add(i as u8);
        assert!(
            data[offset..offset + 65536].iter().all(|&x| x == want),
            "acknowledged write {i} missing on the survivor"
        );
    }
    assert!(qemu_io_writes(&b, 0x50, 8, 7 << 20), "the survivor serves");
    // nas-a returns: it crashed as primary, and receives a bitmap resync.
    let a = pair.start("a");
    pair::wait_status(&a, "nas-a back as secondary", WAIT, is("secondary"));
    pair::wait_status(&b, "resync done", WAIT, resync_finished);
    assert_replicas_equal(&a, &b);
}

#[test]
fn a_pulled_heartbeat_cable_moves_the_stream_to_the_lan() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let mut pair = Pair::new("mirror-hb-cut");
    let cable = Cable::new(
        "127.0.0.3",
        A_IP,
        &format!("{B_IP}:{}", pair.ports.heartbeat),
    );
    pair.hb_remote = Some(cable.listen.clone());
    let a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    pair::wait_status(&a, "both links up", WAIT, links_up);
    cable.cut();
    pair::wait_status(&a, "heartbeat down", WAIT, |s| {
        s["links"]["heartbeat"] != "up"
    });
    assert!(
        qemu_io_writes(&a, 0x60, 32, 1 << 20),
        "writes with the heartbeat cable out"
    );
    let status = a.status_json();
    assert_eq!(status["role"], "primary");
    assert_eq!(
        status["out_of_sync_bytes"], 0,
        "mirrored over the lan: {status:#}"
    );
    assert!(
        status["warnings"].to_string().contains("heartbeat"),
        "{status:#}"
    );
    assert_replicas_equal(&a, &b);
    cable.mend();
    pair::wait_status(&a, "heartbeat back", WAIT, links_up);
    assert!(qemu_io_writes(&a, 0x70, 16, 3 << 20));
    assert_replicas_equal(&a, &b);
    assert_eq!(b.status_json()["disk"], "uptodate");
    assert_eq!(a.status_json()["out_of_sync_bytes"], 0);
}

#[test]
fn a_split_brain_is_detected_and_resolved_by_the_operator() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-split");
    let mut a = pair.start("a");
    let mut b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x01, 8, 1 << 20));
    // nas-b stops; nas-a writes alone.
    b.stop();
    assert!(qemu_io_writes(&a, 0x11, 4, 2 << 20));
    a.stop();
    // nas-b starts alone and is forced up; it writes too.
    let b = pair.start("b");
    b.ctl(&["--yes", "promote", "--force"])
        .assert_success("promote nas-b");
    assert!(qemu_io_writes(&b, 0x21, 4, 3 << 20));
    // Both come back: neither copy is discarded on its own.
    let a = pair.start("a");
    pair::wait_status(&a, "split brain", WAIT, |s| {
        s["not_ready_reasons"].to_string().contains("split brain")
    });
    assert_eq!(b.status_json()["role"], "primary");
    assert!(
        !b.ctl(&["resolve-split-brain", "--keep", "nas-b"])
            .status
            .success(),
        "needs --yes"
    );
    b.ctl(&["--yes", "resolve-split-brain", "--keep", "nas-b"])
        .assert_success("resolve");
    pair::wait_status(&b, "resync done", WAIT, |s| {
        s["role"] == "primary"
            && resync_finished(s)
            && !s["not_ready_reasons"].to_string().contains("split")
    });
    pair::wait_status(&a, "nas-a up to date", WAIT, is("secondary"));
    let resynced = b.status_json()["sync"]["done_bytes"].as_u64().unwrap_or(0);
    assert!(
        resynced > 0 && resynced <= 16 * 64 * 1024,
        "only the diverged regions move: {resynced}"
    );
    assert_replicas_equal(&a, &b);
}

#[test]
fn switchover_hands_the_role_to_the_peer() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-switchover");
    let a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x31, 8, 1 << 20));
    // Commands that do not fit the pair's state are refused with a reason.
    for (node, args, why) in [
        (
            &b,
            &["--yes", "promote", "--force"][..],
            "refused while the peer is connected",
        ),
        (
            &a,
            &["--yes", "resolve-split-brain", "--keep", "nas-a"][..],
            "no split brain",
        ),
        (&b, &["verify"][..], "run it on the primary"),
        (
            &a,
            &["--yes", "resolve-split-brain", "--keep", "nas-z"][..],
            "no split brain",
        ),
    ] {
        let out = node.ctl(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.stderr.contains(why), "{args:?}: {}", out.stderr);
    }
    let epoch_before = a.status_json()["epoch"].as_u64().unwrap_or(0);
    assert!(!a.ctl(&["switchover"]).status.success(), "needs --yes");
    a.ctl(&["--yes", "switchover"]).assert_success("switchover");
    pair::wait_status(&b, "nas-b primary", WAIT, is("primary"));
    pair::wait_status(&a, "nas-a secondary", WAIT, is("secondary"));
    let epoch_after = b.status_json()["epoch"].as_u64().unwrap_or(0);
    assert!(
        epoch_after > epoch_before,
        "epoch {epoch_before} -> {epoch_after}"
    );
    assert!(qemu_io_writes(&b, 0x41, 8, 2 << 20));
    assert_replicas_equal(&a, &b);
}

#[test]
fn the_primary_killed_under_load_loses_no_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use tandem_tests::nbd_wire::RawClient;

    let pair = Pair::new("mirror-kill-load");
    let mut a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    const WRITERS: u64 = 4;
    const BLOCK: usize = 4 << 10;
    // Each block is written once, by one writer: what the survivor holds is exactly the last
    // acknowledged write, or one that was in flight at the cut.
    let per_writer = a.volume_bytes() / BLOCK as u64 / WRITERS;
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for writer in 0..WRITERS {
        let (acked, stop) = (acked.clone(), stop.clone());
        let socket = a.nbd_socket().to_path_buf();
        threads.push(std::thread::spawn(move || {
            let (mut client, _) = RawClient::connect_and_go(&socket);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < per_writer {
                let block = writer + i * WRITERS;
                let seed = (writer << 32) | i;
                let data = tandem_tests::pseudo_random_bytes(seed, BLOCK);
                match client.write(0, block * BLOCK as u64, &data) {
                    Ok(0) => acked.lock().expect("lock").push((block, seed)),
                    _ => return,
                }
                i += 1;
            }
        }));
    }
    // Cut the power mid-way through the load.
    let half = (per_writer * WRITERS / 2) as usize;
    tandem_tests::wait_until(Duration::from_secs(60), || {
        acked.lock().expect("lock").len() >= half
    });
    a.kill();
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        let _ = thread.join();
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() > 20, "the load ran: {} writes", acked.len());
    pair::wait_status(&b, "peer lost", WAIT, |s| s["peer"] == "lost");
    b.ctl(&["--yes", "promote", "--force"])
        .assert_success("promote --force");
    let data = file_head(&b.config().backing, b.volume_bytes());
    for &(block, seed) in &acked {
        let at = block as usize * BLOCK;
        assert!(
            data[at..at + BLOCK] == tandem_tests::pseudo_random_bytes(seed, BLOCK)[..],
            "acknowledged write to block {block} missing on the survivor (of {} acknowledged)",
            acked.len()
        );
    }
}

#[test]
fn writes_during_a_resync_leave_identical_replicas() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-resync-load");
    let a = pair.start("a");
    let mut b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    b.kill();
    // Dirty most of the volume while nas-b is away.
    assert!(qemu_io_writes(&a, 0x80, 100, 1 << 20));
    let b = pair.start("b");
    // Overwrite the same regions while the resync walks them.
    for round in 0..3u8 {
        assert!(qemu_io_writes(&a, 0x90 + round * 7, 100, 1 << 20));
    }
    pair::wait_status(&a, "resync done", WAIT, resync_finished);
    pair::wait_status(&b, "nas-b up to date", WAIT, is("secondary"));
    assert_replicas_equal(&a, &b);
}

#[test]
fn a_degraded_primary_that_crashes_still_resyncs_what_it_wrote_alone() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-degraded-crash");
    let mut a = pair.start("a");
    let mut b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    b.stop();
    // Written alone: the dirty bits live in memory, the activity log names their extents.
    assert!(qemu_io_writes(&a, 0xa0, 40, 3 << 20));
    a.kill();
    let a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary again", WAIT, is("primary"));
    pair::wait_status(&a, "resync done", WAIT, |s| {
        resync_finished(s) && s["sync"]["done_bytes"].as_u64() > Some(0)
    });
    pair::wait_status(&b, "nas-b up to date", WAIT, is("secondary"));
    assert_replicas_equal(&a, &b);
}

#[test]
fn garbage_on_both_links_changes_no_data() {
    use std::io::Write;
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-garbage");
    let a = pair.start("a");
    let mut b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x15, 16, 1 << 20));
    // Junk, a truncated frame, a forged hello and a replay of bytes seen earlier, on both link
    // ports of nas-b, from nas-a's address (a stranger's address is refused at once).
    let replay = b"\x00\x00\x00\x45\x02"
        .iter()
        .chain(&[0x5a; 68])
        .copied()
        .collect::<Vec<u8>>();
    for port in [pair.ports.heartbeat, pair.ports.lan] {
        for junk in [
            &b"\x00\x00\x00\x05\x01junk"[..],
            &[0xff; 4096][..],
            &b"\x00\x00\x10\x00\x30"[..],
            &replay[..],
        ] {
            if let Ok(mut stream) = std::net::TcpStream::connect((B_IP, port)) {
                let _ = stream.write_all(junk);
            }
        }
    }
    assert!(qemu_io_writes(&a, 0x25, 16, 2 << 20), "writes go on");
    pair::wait_status(&a, "still paired", WAIT, |s| {
        links_up(s) && s["out_of_sync_bytes"] == 0
    });
    assert!(b.is_running(), "garbage stopped nas-b");
    assert_replicas_equal(&a, &b);
}

#[test]
fn status_shows_the_resync_for_humans() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-status");
    let a = pair.start("a");
    let mut b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    b.kill();
    assert!(qemu_io_writes(&a, 0x66, 8, 1 << 20));
    let text = a.ctl(&["status"]).stdout;
    assert!(text.contains("out-of-sync:512.0 KiB"), "{text}");
    let b = pair.start("b");
    pair::wait_status(&a, "resync done", WAIT, |s| {
        resync_finished(s) && s["sync"]["done_bytes"].as_u64() > Some(0)
    });
    let text = a.ctl(&["status"]).stdout;
    assert!(
        text.contains("sync: [####################] 100% 512.0 KiB of 512.0 KiB"),
        "{text}"
    );
    assert!(text.contains("out-of-sync:0 B"), "{text}");
    drop(b);
}

#[test]
fn verify_finds_a_damaged_copy_and_repairs_it() {
    use std::os::unix::fs::FileExt;
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-verify");
    let a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x77, 8, 1 << 20));
    // Damage nas-b's copy behind its back (a disk that returned wrong data).
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&b.config().backing)
        .expect("open nas-b's disk");
    file.write_all_at(&[0xee; 512], (3 << 20) + 4096)
        .expect("damage");
    file.sync_all().expect("sync");
    a.ctl(&["verify"]).assert_success("verify");
    let status = pair::wait_status(&a, "verify done", WAIT, |s| s["verify"]["running"] == false);
    let mismatches = status["verify"]["mismatches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(mismatches.len(), 1, "{status:#}");
    let (offset, len) = (
        mismatches[0][0].as_u64().unwrap_or(0),
        mismatches[0][1].as_u64().unwrap_or(0),
    );
    assert!(
        offset <= (3 << 20) + 4096 && (3 << 20) + 4096 < offset + len,
        "{status:#}"
    );
    // The mismatching range is resynced from the primary.
    pair::wait_status(&a, "repaired", WAIT, |s| {
        resync_finished(s) && s["sync"]["done_bytes"].as_u64() > Some(0)
    });
    assert_replicas_equal(&a, &b);
    assert!(a
        .ctl(&["events"])
        .stdout
        .contains("verify: the copies differ"));
}

/// A discard or write-zeroes of the whole volume in one request (what `mke2fs` and the kernel
/// do) is mirrored piece by piece; it once overran the activity log and killed the primary.
#[test]
fn a_whole_volume_discard_and_zeroing_are_mirrored() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let pair = Pair::new("mirror-discard");
    let a = pair.start("a");
    let b = pair.start("b");
    pair::wait_status(&a, "nas-a primary", WAIT, is("primary"));
    pair::wait_status(&b, "nas-b secondary", WAIT, is("secondary"));
    assert!(qemu_io_writes(&a, 0x30, 32, 1 << 20), "data to discard");
    let len = a.volume_bytes();
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("discard 0 {len}"),
            "-c",
            &format!("write -z 4096 {}", len - 8192),
            "-c",
            "write -P 0x5a 1M 64k",
            &a.nbd_uri(),
        ],
    );
    assert!(
        out.status.success() && !out.stdout.contains("failed") && !out.stderr.contains("error"),
        "qemu-io: {}\n{}",
        out.stdout,
        out.stderr
    );
    let status = a.status_json();
    assert_eq!(
        status["role"], "primary",
        "the primary lives on: {status:#}"
    );
    assert_replicas_equal(&a, &b);
}
