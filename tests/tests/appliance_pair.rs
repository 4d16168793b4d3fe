//! Two appliance boards in QEMU (TCG) that form a pair and fail over for real: the image of
//! `image/out/tandem-qemu-x86_64.img`, each board with its config on TANDEMCFG, a 256 MiB
//! virtio data disk, an i6300esb (`-action watchdog=reset`), a heartbeat cable (the two boards'
//! virtio-net ports joined by unix datagram sockets) and a LAN port (e1000e) on a small switch in
//! this test that also plays the gateway (it answers ARP for the uplink probe's address).
//!
//! The boards run in test mode (`tandem.test=1`): a root shell on ttyS1 drives the workload and
//! reads `tandem ctl --json status`; the tandem console is on ttyS0.
//!
//! Without the image or QEMU these tests skip (and fail under CI=true). One pair at a time.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::qemu::{self, dgram, prerequisites, Board, Nics, Serial, Shell, QEMU_TURN};
use tandem_tests::{create_sparse_file, TempDir};

const DATA_DISK_BYTES: u64 = 256 * 1024 * 1024;
/// The TCG timing profile of board/qemu-x86_64/board.conf.
const HEARTBEAT_INTERVAL_MS: u64 = 250;
const DEAD_TIME_MS: u64 = 4000;
const WATCHDOG_TIMEOUT_S: u64 = 10;
const GATEWAY_IP: [u8; 4] = [192, 168, 131, 1];
const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x99, 0x01];
/// Two boards booting under TCG on two cores, then pairing and a first full sync.
const PAIRED_TIMEOUT: Duration = Duration::from_secs(300);
const TEST_DEADLINE: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    A,
    B,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::A => "nas-a",
            Which::B => "nas-b",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Which::A => "a",
            Which::B => "b",
        }
    }

    fn other(self) -> Which {
        match self {
            Which::A => Which::B,
            Which::B => Which::A,
        }
    }

    fn index(self) -> u8 {
        match self {
            Which::A => 1,
            Which::B => 2,
        }
    }
}

fn pair_config(me: Which) -> String {
    let peer = me.other();
    format!(
        r#"[node]
name = "{name}"
state_dir = "/var/lib/tandem"

[volume]
backing = "/dev/disk/by-id/virtio-tandem-data"
nbd_socket = "/run/tandem/nbd.sock"
attach = "/dev/nbd0"
mount = "/data"

[peer]
name = "{peer_name}"
key_file = "/cfg/cluster.key"
heartbeat = {{ local = "10.99.0.{me_i}:7788", remote = "10.99.0.{peer_i}:7788" }}
lan = {{ local = "192.168.131.23{me_i}:7788", remote = "192.168.131.23{peer_i}:7788" }}

[cluster]
vip = "192.168.131.230/24"
uplink_probe = "192.168.131.1"
heartbeat_interval_ms = {HEARTBEAT_INTERVAL_MS}
dead_time_ms = {DEAD_TIME_MS}
preferred = "nas-a"

[watchdog]
device = "/dev/watchdog0"
timeout_s = {WATCHDOG_TIMEOUT_S}

[console]
tty = "/dev/ttyS0"
control_socket = "/run/tandem/ctl.sock"
"#,
        name = me.name(),
        peer_name = peer.name(),
        me_i = me.index(),
        peer_i = peer.index(),
    )
}

/// The LAN: a switch between the two boards' LAN ports that also answers ARP for the gateway.
/// Each port is a unix datagram socket; QEMU sends one Ethernet frame per datagram.
#[derive(Debug)]
struct LanSwitch {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl LanSwitch {
    /// `ports[i]`: (the switch's socket, the board's socket it sends to).
    fn start(ports: [(PathBuf, PathBuf); 2]) -> LanSwitch {
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Vec<Arc<UnixDatagram>> = ports
            .iter()
            .map(|(ours, _)| {
                let _ = fs::remove_file(ours);
                let socket = UnixDatagram::bind(ours).expect("bind a LAN switch port");
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("switch port timeout");
                Arc::new(socket)
            })
            .collect();
        let boards: Vec<PathBuf> = ports.iter().map(|(_, board)| board.clone()).collect();
        let mut threads = Vec::new();
        for from in 0..2 {
            let inbound = Arc::clone(&sockets[from]);
            let outbound = Arc::clone(&sockets[1 - from]);
            let back = Arc::clone(&sockets[from]);
            let (sender, other) = (boards[from].clone(), boards[1 - from].clone());
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                let mut frame = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = inbound.recv(&mut frame) else {
                        continue;
                    };
                    let frame = &frame[..n];
                    if let Some(reply) = gateway_arp_reply(frame) {
                        let _ = back.send_to(&reply, &sender);
                    }
                    // A board that is off has no socket: the frame is lost, as on a wire.
                    let _ = outbound.send_to(frame, &other);
                }
            }));
        }
        LanSwitch { stop, threads }
    }
}

impl Drop for LanSwitch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The gateway's answer to an ARP request for its address, if `frame` is one.
fn gateway_arp_reply(frame: &[u8]) -> Option<Vec<u8>> {
    let is_arp_request = frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[14..22] == [0, 1, 0x08, 0x00, 6, 4, 0, 1];
    if !is_arp_request || frame[38..42] != GATEWAY_IP {
        return None;
    }
    let (asker_mac, asker_ip) = (&frame[22..28], &frame[28..32]);
    let mut reply = Vec::with_capacity(60);
    reply.extend_from_slice(asker_mac);
    reply.extend_from_slice(&GATEWAY_MAC);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    reply.extend_from_slice(&GATEWAY_MAC);
    reply.extend_from_slice(&GATEWAY_IP);
    reply.extend_from_slice(asker_mac);
    reply.extend_from_slice(asker_ip);
    reply.resize(60, 0);
    Some(reply)
}

/// One board of the pair: its directory, disks and, while it runs, QEMU and its ports.
#[derive(Debug)]
struct PairBoard {
    which: Which,
    dir: PathBuf,
    disk: PathBuf,
    data: PathBuf,
    nics: Nics,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    board: Board,
    console: Serial,
    shell: Shell,
    started: Instant,
}

impl PairBoard {
    fn new(root: &Path, which: Which, key: &[u8]) -> PairBoard {
        let dir = root.join(which.tag());
        fs::create_dir_all(&dir).expect("board dir");
        let disk = qemu::prepare_disk(&dir, Some(&pair_config(which)), Some(key), true);
        let data = dir.join("data.img");
        create_sparse_file(&data, DATA_DISK_BYTES);
        let (me, peer) = (which.tag(), which.other().tag());
        let nics = Nics {
            heartbeat: dgram(
                &root.join(format!("{me}-hb.sock")),
                &root.join(format!("{peer}-hb.sock")),
            ),
            heartbeat_mac: format!("52:54:00:00:01:0{}", which.index()),
            lan: dgram(
                &root.join(format!("{me}-lan.sock")),
                &root.join(format!("sw-{me}.sock")),
            ),
            lan_mac: format!("52:54:00:00:02:0{}", which.index()),
        };
        PairBoard {
            which,
            dir,
            disk,
            data,
            nics,
            running: None,
        }
    }

    /// Powers the board on (again): the disks are kept, the board's own sockets made anew.
    fn power_on(&mut self, root: &Path, deadline: Instant) {
        let me = self.which.tag();
        for stale in [format!("{me}-hb.sock"), format!("{me}-lan.sock")] {
            let _ = fs::remove_file(root.join(stale));
        }
        let board = Board::start(&self.dir, &self.disk, &self.data, &self.nics);
        let console = board.serial("ttyS0.sock", deadline);
        let shell = Shell::new(board.serial("ttyS1.sock", deadline));
        self.running = Some(Running {
            board,
            console,
            shell,
            started: Instant::now(),
        });
    }

    fn power_cut(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.board.power_cut();
        }
    }

    fn on(&mut self) -> &mut Running {
        self.running.as_mut().expect("the board is on")
    }

    fn shell(&mut self) -> &mut Shell {
        &mut self.on().shell
    }

    /// Waits for the board's tandem console, then for its test shell.
    fn wait_booted(&mut self, deadline: Instant) {
        self.wait_booted_since(0, deadline);
    }

    /// Waits for a tandem console prompt printed after console byte `from` (a boot after a
    /// reset), then for the test shell.
    fn wait_booted_since(&mut self, from: usize, deadline: Instant) {
        let name = self.which.name();
        let running = self.on();
        running
            .console
            .wait_for(from, &format!("{name}("), deadline, "the tandem console");
        running.board.assert_running();
        let _ = running.shell.run("true", deadline);
        eprintln!(
            "appliance_pair: {name} at its console {:.1} s after power-on",
            running.started.elapsed().as_secs_f64()
        );
    }
}

/// The pair, its switch, and the key they share.
struct Pair {
    root: TempDir,
    a: PairBoard,
    b: PairBoard,
    _switch: LanSwitch,
}

impl Pair {
    fn boot(tag: &str, deadline: Instant) -> Pair {
        let root = TempDir::new(tag);
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(3))
            .collect();
        let mut a = PairBoard::new(root.path(), Which::A, &key);
        let mut b = PairBoard::new(root.path(), Which::B, &key);
        let switch = LanSwitch::start([
            (root.join("sw-a.sock"), root.join("a-lan.sock")),
            (root.join("sw-b.sock"), root.join("b-lan.sock")),
        ]);
        a.power_on(root.path(), deadline);
        b.power_on(root.path(), deadline);
        a.wait_booted(deadline);
        b.wait_booted(deadline);
        Pair {
            root,
            a,
            b,
            _switch: switch,
        }
    }

    fn board(&mut self, which: Which) -> &mut PairBoard {
        match which {
            Which::A => &mut self.a,
            Which::B => &mut self.b,
        }
    }

    /// Waits until one board serves with ext4 mounted and the other is connected and up to
    /// date; returns the primary. Which one it is depends on the boot: a board whose LAN
    /// carrier comes up later hands the role to the one whose uplink already works (rule 6).
    fn wait_paired(&mut self, deadline: Instant) -> Which {
        let started = Instant::now();
        loop {
            let a = self.a.shell().status(deadline);
            let b = self.b.shell().status(deadline);
            let in_sync = |p: &Value, s: &Value| {
                p["role"] == "primary"
                    && p["kernel"]
                        .as_str()
                        .is_some_and(|k| k.contains("ext4 mounted on /data"))
                    && s["role"] == "secondary"
                    && s["disk"] == "uptodate"
                    && s["peer"] == "connected"
            };
            let primary = if in_sync(&a, &b) {
                Some(Which::A)
            } else if in_sync(&b, &a) {
                Some(Which::B)
            } else {
                None
            };
            if let Some(primary) = primary {
                eprintln!(
                    "appliance_pair: {} primary and in sync after {:.1} s more",
                    primary.name(),
                    started.elapsed().as_secs_f64()
                );
                return primary;
            }
            assert!(
                Instant::now() < deadline,
                "the pair did not settle; nas-a:\n{a:#}\nnas-b:\n{b:#}"
            );
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Waits until the board is primary with ext4 on /dev/nbd0 mounted on /data.
fn wait_serving(shell: &mut Shell, deadline: Instant) -> Value {
    shell.wait_status("primary, with ext4 mounted on /data", deadline, |s| {
        s["role"] == "primary"
            && s["kernel"]
                .as_str()
                .is_some_and(|k| k.contains("ext4 mounted on /data"))
    })
}

/// `md5sum` lines ("SUM  PATH") into a map from path to sum.
fn checksums(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let sum = words.next()?;
            let path = words.next()?;
            (sum.len() == 32 && path.starts_with("/data/"))
                .then(|| (path.to_owned(), sum.to_owned()))
        })
        .collect()
}

/// Every file in `expected` is on `shell`'s /data with its checksum.
fn assert_files_intact(shell: &mut Shell, expected: &BTreeMap<String, String>, deadline: Instant) {
    let found = checksums(&shell.run(
        "find /data -name 'f*' -type f | sort | xargs md5sum",
        deadline,
    ));
    let mut missing = Vec::new();
    for (path, sum) in expected {
        match found.get(path) {
            Some(actual) if actual == sum => {}
            Some(actual) => missing.push(format!("{path}: {actual}, expected {sum}")),
            None => missing.push(format!("{path}: missing")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} completed files are lost or differ:\n{}",
        missing.len(),
        expected.len(),
        missing.join("\n")
    );
}

/// Starts a copy loop on the primary's filesystem: 256 KiB files, each written with
/// `conv=fsync` and then checksummed. A file whose checksum line was printed had completed.
fn start_copying(shell: &mut Shell, deadline: Instant) {
    shell.run(
        "( i=0; while :; do dd if=/dev/urandom of=/data/f$i bs=64k count=4 conv=fsync 2>/dev/null \
         && md5sum /data/f$i; i=$((i+1)); done ) & true",
        deadline,
    );
}

/// Waits until `count` files have completed on the primary's copy loop; returns their sums.
fn wait_copied(serial: &Serial, from: usize, count: usize, deadline: Instant) -> usize {
    loop {
        let done = checksums(&serial.text_since(from).replace('\r', "")).len();
        if done >= count {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {count} files copied:\n{}",
            serial.text_since(from)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The seed experiment inside the appliance: files copied onto the primary's ext4, its power
/// cut mid-copy, the peer takes over (journal replayed at mount) with every completed file
/// intact; the dead board returns as secondary; then the new primary's tandem freezes, the
/// i6300esb resets its board, and it serves again with every file intact.
#[test]
fn a_pair_survives_a_power_cut_and_a_hung_daemon_with_every_file_intact() {
    if !prerequisites() {
        return;
    }
    let _turn = QEMU_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut pair = Pair::boot("appliance-pair-failover", deadline);
    let first = pair.wait_paired(Instant::now() + PAIRED_TIMEOUT);
    let second = first.other();

    // Copy onto the primary's filesystem; cut its power once some files have completed.
    let from = pair.board(first).on().shell_len();
    start_copying(pair.board(first).shell(), deadline);
    wait_copied(pair.board(first).on().shell_serial(), from, 12, deadline);
    let completed = checksums(
        &pair
            .board(first)
            .on()
            .shell_serial()
            .text_since(from)
            .replace('\r', ""),
    );
    pair.board(first).power_cut();
    let cut = Instant::now();
    eprintln!(
        "appliance_pair: cut {}'s power after {} completed files",
        first.name(),
        completed.len()
    );

    let status = wait_serving(pair.board(second).shell(), deadline);
    eprintln!(
        "appliance_pair: {} primary with ext4 mounted {:.1} s after the power cut (epoch {})",
        second.name(),
        cut.elapsed().as_secs_f64(),
        status["epoch"]
    );
    assert_files_intact(pair.board(second).shell(), &completed, deadline);
    let more = checksums(&pair.board(second).shell().run(
        "for i in 0 1 2 3; do dd if=/dev/urandom of=/data/fb$i bs=64k count=4 conv=fsync 2>/dev/null; done; md5sum /data/fb*",
        deadline,
    ));
    assert_eq!(more.len(), 4, "the new primary takes writes: {more:?}");
    let mut all = completed.clone();
    all.extend(more);

    // The first board comes back: secondary, resynced.
    let root = pair.root.path().to_path_buf();
    pair.board(first).power_on(&root, deadline);
    pair.board(first).wait_booted(deadline);
    let primary = pair.wait_paired(deadline.min(Instant::now() + PAIRED_TIMEOUT));
    assert_eq!(
        primary, second,
        "the survivor keeps the role (failback is manual)"
    );

    // The new primary's tandem hangs. Its kernel still answers ARP for the cluster IP, so the
    // peer must not take over (rule 3: the primary may be writing alone, for all it can tell):
    // it marks its disk outdated. The i6300esb resets the hung board; it boots, finds its peer
    // outdated and its own data the newest, and serves again (rules 7 and 9).
    let console_from = pair.board(second).on().console.len();
    pair.board(second).on().console.send(b"freeze\r");
    let frozen = Instant::now();
    let reset_at = pair.board(second).on().console.wait_for(
        console_from,
        "BdsDxe: loading",
        deadline,
        "the i6300esb reset the frozen board",
    );
    let reset_after = frozen.elapsed();
    eprintln!(
        "appliance_pair: {} reset by its watchdog {:.1} s after tandem froze",
        second.name(),
        reset_after.as_secs_f64()
    );
    assert!(
        reset_after >= Duration::from_secs(WATCHDOG_TIMEOUT_S * 3 / 4),
        "reset {reset_after:?} after the freeze: sooner than the watchdog can fire"
    );
    let status = pair.board(first).shell().status(deadline);
    assert_eq!(
        status["role"], "secondary",
        "no takeover while the hung board's kernel held the cluster IP:\n{status:#}"
    );
    assert_eq!(status["disk"], "outdated", "{status:#}");
    pair.board(second).wait_booted_since(reset_at, deadline);
    // The rebooted board serves first; it may hand the role on at once when its LAN carrier
    // comes up after its peer's (rule 6), so either board may be the primary here.
    let primary = pair.wait_paired(deadline);
    eprintln!(
        "appliance_pair: {} serving again {:.1} s after the freeze",
        primary.name(),
        frozen.elapsed().as_secs_f64()
    );
    assert_files_intact(pair.board(primary).shell(), &all, deadline);
}

impl Running {
    fn shell_len(&self) -> usize {
        self.shell.serial().len()
    }

    fn shell_serial(&self) -> &Serial {
        self.shell.serial()
    }
}

/// Types `line` on the tandem console and returns the reply up to the next prompt.
fn console_command(running: &mut Running, line: &str, expect: &str, deadline: Instant) -> String {
    let prompt = ")> ";
    running.console.command(line, expect, prompt, deadline)
}

/// Cable pulls with QMP `set_link`: the heartbeat cable pulled moves nothing (the lan carries
/// the heartbeats); the primary's LAN pulled moves the role to the board whose uplink works.
/// And every console command answers over the serial socket.
#[test]
fn cable_pulls_move_the_role_only_for_the_lan_and_the_console_answers_every_command() {
    if !prerequisites() {
        return;
    }
    let _turn = QEMU_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut pair = Pair::boot("appliance-pair-cables", deadline);
    let first = pair.wait_paired(Instant::now() + PAIRED_TIMEOUT);
    let second = first.other();
    // Every console command, on the secondary's console (nothing here moves the role).
    let b = pair.board(second).on();
    b.console.settle(Duration::from_secs(1), deadline);
    let cases: [(&str, &str); 13] = [
        ("status", "role:secondary"),
        ("status --json", "\"role\""),
        ("help", "this list"),
        ("links", "heartbeat"),
        ("events", "info"),
        ("config", "[peer]"),
        ("maintenance on", "maintenance"),
        ("maintenance off", "maintenance"),
        // The serial console asks before a command that moves the role or discards data.
        ("promote --force", "Type 'yes'"),
        ("yes", "refused while the peer is connected"),
        ("resolve-split-brain --keep nas-b", "Type 'yes'"),
        ("yes", "no split brain"),
        ("verify", "verify"),
    ];
    for (line, expect) in cases {
        let reply = console_command(b, line, expect, deadline);
        assert!(!reply.contains("unknown command"), "{line}:\n{reply}");
    }
    let reply = console_command(b, "frobnicate", "unknown command", deadline);
    assert!(reply.contains("frobnicate"), "{reply}");

    // The heartbeat cable pulled: both stay where they are for well past the dead time.
    pair.board(first).on().board.set_link("hb", false);
    let pulled = Instant::now();
    pair.board(second)
        .shell()
        .wait_status("the heartbeat link seen down", deadline, |s| {
            s["links"]["heartbeat"] != "up"
        });
    eprintln!(
        "appliance_pair: heartbeat pull seen by {} after {:.1} s",
        second.name(),
        pulled.elapsed().as_secs_f64()
    );
    thread::sleep(Duration::from_millis(3 * DEAD_TIME_MS));
    let a = pair.board(first).shell().status(deadline);
    let b = pair.board(second).shell().status(deadline);
    assert_eq!(
        a["role"],
        "primary",
        "{} kept the role:\n{a:#}",
        first.name()
    );
    assert_eq!(
        b["role"],
        "secondary",
        "{} stayed secondary:\n{b:#}",
        second.name()
    );
    assert_eq!(b["peer"], "connected", "the lan carries the pair:\n{b:#}");
    pair.board(first).on().board.set_link("hb", true);
    pair.board(second)
        .shell()
        .wait_status("the heartbeat link back", deadline, |s| {
            s["links"]["heartbeat"] == "up"
        });

    // The primary's LAN pulled: its uplink is gone, the peer's works; the role moves.
    let files = checksums(&pair.board(first).shell().run(
        "for i in 0 1 2; do dd if=/dev/urandom of=/data/f$i bs=64k count=4 conv=fsync 2>/dev/null; done; md5sum /data/f*",
        deadline,
    ));
    assert_eq!(files.len(), 3, "{files:?}");
    pair.board(first).on().board.set_link("lan", false);
    let pulled = Instant::now();
    wait_serving(pair.board(second).shell(), deadline);
    eprintln!(
        "appliance_pair: {} primary with ext4 mounted {:.1} s after {}'s LAN was pulled",
        second.name(),
        pulled.elapsed().as_secs_f64(),
        first.name()
    );
    pair.board(first)
        .shell()
        .wait_status("the old primary steps down", deadline, |s| {
            s["role"] == "secondary"
        });
    assert_files_intact(pair.board(second).shell(), &files, deadline);
    let a = pair
        .a
        .shell()
        .run("grep nbd0 /proc/mounts; echo mounts-listed", deadline);
    assert!(
        !a.contains("/data"),
        "the old primary let go of its filesystem:\n{a}"
    );
}
