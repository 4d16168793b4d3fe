//! The appliance image in a QEMU board (q35 under TCG, OVMF, i6300esb): boots untouched from
//! a copy of `image/out/tandem-qemu-x86_64.img` with a config written onto its TANDEMCFG
//! partition with mtools, and answers on its serial console.
//!
//! `tests/run-all` builds the image first (`bash image/build`, with CHECK_REPRODUCIBLE=1 in CI).
//! Without an image, or without qemu-system-x86_64, OVMF, mtools or sfdisk, these tests skip
//! (and fail under CI=true).
//!
//! Every wait has a deadline; QEMU is killed when a test ends, however it ends.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tandem_tests::{
    create_sparse_file, is_ci, require_tools, run_with_timeout, workspace_root, TempDir,
    COMMAND_TIMEOUT,
};

/// A whole test: boot, console, commands. Boot-to-prompt measured ~25 s on 2 cores under TCG.
const TEST_DEADLINE: Duration = Duration::from_secs(180);
/// One console command's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const DATA_DISK_BYTES: u64 = 256 * 1024 * 1024;
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const NODE: &str = "nas-q";

/// The two QEMU boards of a test binary take turns: two TCG guests on two cores only slow each
/// other down.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A standalone node's config, as an operator would write it onto TANDEMCFG.
fn standalone_config() -> String {
    format!(
        r#"[node]
name = "{NODE}"
state_dir = "/var/lib/tandem"

[volume]
backing = "/dev/disk/by-id/virtio-tandem-data"
nbd_socket = "/run/tandem/nbd.sock"
attach = "/dev/nbd0"
mount = "/data"

[console]
tty = "/dev/ttyS0"
control_socket = "/run/tandem/ctl.sock"

[watchdog]
device = "/dev/watchdog0"
timeout_s = {WATCHDOG_TIMEOUT_S}
"#
    )
}

/// The watchdog timeout of the test board: generous, for an emulated CPU on a shared host.
const WATCHDOG_TIMEOUT_S: u64 = 10;

fn image_path() -> PathBuf {
    workspace_root().join("image/out/tandem-qemu-x86_64.img")
}

/// Whether everything a QEMU board needs is here; otherwise skips (fails under CI).
fn prerequisites() -> bool {
    if !require_tools(&["qemu-system-x86_64", "mcopy", "sfdisk", "sha256sum"]) {
        return false;
    }
    for file in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(file).is_file() {
            assert!(!is_ci(), "CI=true and {file} is missing (package ovmf)");
            eprintln!("SKIPPED: {file} is missing (package ovmf)");
            return false;
        }
    }
    if !image_path().is_file() {
        assert!(
            !is_ci(),
            "CI=true and {} is missing: tests/run-all builds it with `bash image/build`",
            image_path().display()
        );
        eprintln!(
            "SKIPPED: {} is missing (run `bash image/build qemu-x86_64`)",
            image_path().display()
        );
        return false;
    }
    true
}

/// Byte offsets of the image's partitions, by GPT partition name (`esp`, `tandemcfg`).
fn partition_offset(image: &Path, name: &str) -> u64 {
    let out = run_with_timeout(
        Command::new("sfdisk").arg("--json").arg(image),
        COMMAND_TIMEOUT,
    );
    out.assert_success("sfdisk --json");
    let table: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("sfdisk --json prints JSON");
    let partitions = table["partitiontable"]["partitions"]
        .as_array()
        .expect("a partition list");
    let sector = table["partitiontable"]["sectorsize"]
        .as_u64()
        .unwrap_or(512);
    let partition = partitions
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no partition named {name} in {}", out.stdout));
    partition["start"].as_u64().expect("numeric start") * sector
}

/// `mcopy` a file onto a FAT partition of the image.
fn mcopy(image: &Path, offset: u64, from: &Path, to: &str) {
    run_with_timeout(
        Command::new("mcopy")
            .arg("-o")
            .arg("-i")
            .arg(format!("{}@@{offset}", image.display()))
            .arg(from)
            .arg(format!("::{to}")),
        COMMAND_TIMEOUT,
    )
    .assert_success("mcopy");
}

/// `mdir -b` of a directory on a FAT partition: the bare file names.
fn mdir(image: &Path, offset: u64, dir: &str) -> Vec<String> {
    let out = run_with_timeout(
        Command::new("mdir")
            .arg("-b")
            .arg("-i")
            .arg(format!("{}@@{offset}", image.display()))
            .arg(format!("::{dir}")),
        COMMAND_TIMEOUT,
    );
    out.assert_success("mdir");
    out.stdout
        .lines()
        .map(|l| l.rsplit('/').next().unwrap_or(l).to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// A serial port of the VM, through QEMU's unix socket: everything the guest wrote is kept.
#[derive(Debug)]
struct Serial {
    stream: UnixStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Serial {
    /// Connects (QEMU creates the socket right after it starts) and starts collecting output.
    fn connect(path: &Path, deadline: Instant) -> Serial {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "serial socket {}: {e}",
                        path.display()
                    );
                    thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = stream.try_clone().expect("clone the serial stream");
        let sink = Arc::clone(&seen);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock()
                    .expect("serial buffer")
                    .extend_from_slice(&buf[..n]);
            }
        });
        Serial { stream, seen }
    }

    fn len(&self) -> usize {
        self.seen.lock().expect("serial buffer").len()
    }

    /// Everything since byte `from`, lossily decoded.
    fn text_since(&self, from: usize) -> String {
        let seen = self.seen.lock().expect("serial buffer");
        String::from_utf8_lossy(&seen[from.min(seen.len())..]).into_owned()
    }

    /// Waits until `needle` appears at or after byte `from`; returns the byte after it.
    fn wait_for(&self, from: usize, needle: &str, deadline: Instant, what: &str) -> usize {
        loop {
            {
                let seen = self.seen.lock().expect("serial buffer");
                let tail = &seen[from.min(seen.len())..];
                if let Some(at) = tail
                    .windows(needle.len())
                    .position(|w| w == needle.as_bytes())
                {
                    return from + at + needle.len();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no {needle:?} on the serial port; it showed:\n{}",
                self.text_since(from)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until nothing has arrived for `quiet` (or the deadline has passed).
    fn settle(&self, quiet: Duration, deadline: Instant) {
        let mut seen = self.len();
        let mut since = Instant::now();
        while Instant::now() < deadline && since.elapsed() < quiet {
            thread::sleep(Duration::from_millis(50));
            let now = self.len();
            if now != seen {
                seen = now;
                since = Instant::now();
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("write to the serial port");
    }

    /// Types `line` and a carriage return, waits for `expect` in the reply and for the prompt
    /// after it; returns everything from the echoed line to that prompt. (The console prints a
    /// fresh prompt at once, then the reply above it and the prompt again.)
    fn command(&mut self, line: &str, expect: &str, prompt: &str, deadline: Instant) -> String {
        let from = self.len();
        self.send(line.as_bytes());
        self.send(b"\r");
        let deadline = deadline.min(Instant::now() + REPLY_TIMEOUT);
        let echoed = self.wait_for(from, line, deadline, line);
        let replied = self.wait_for(echoed, expect, deadline, line);
        let end = self.wait_for(replied, prompt, deadline, line);
        let text = self.text_since(echoed);
        text[..text.len().min(end - echoed)].to_string()
    }
}

/// One QEMU board, killed on drop.
#[derive(Debug)]
struct Board {
    child: Child,
    dir: PathBuf,
}

impl Board {
    /// Boots `disk` with OVMF, a data disk, two NICs on unix datagram sockets, an i6300esb
    /// (reset on expiry) and two serial ports on unix sockets (`ttyS0.sock`, `ttyS1.sock`).
    fn start(dir: &Path, disk: &Path) -> Board {
        let vars = dir.join("OVMF_VARS.fd");
        fs::copy(OVMF_VARS, &vars).expect("copy OVMF_VARS");
        let data = dir.join("data.img");
        create_sparse_file(&data, DATA_DISK_BYTES);
        let p = |name: &str| dir.join(name).display().to_string();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", "tandem-board", "-machine", "q35", "-accel", "tcg"])
            .args(["-cpu", "max", "-smp", "2", "-m", "512M"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=boot,cache=unsafe",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=boot,bootindex=0"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=data,cache=unsafe",
                data.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=data,serial=tandem-data"])
            .arg("-netdev")
            .arg(format!(
                "dgram,id=hb,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                p("hb-local.sock"),
                p("hb-remote.sock")
            ))
            .args(["-device", "virtio-net-pci,netdev=hb,mac=52:54:00:00:01:01"])
            .arg("-netdev")
            .arg(format!(
                "dgram,id=lan,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                p("lan-local.sock"),
                p("lan-remote.sock")
            ))
            .args(["-device", "e1000e,netdev=lan,mac=52:54:00:00:02:01"])
            .args(["-device", "i6300esb", "-action", "watchdog=reset"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={}",
                p("ttyS0.sock"),
                p("ttyS0.log")
            ))
            .args(["-serial", "chardev:ser0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser1,path={},server=on,wait=off,logfile={}",
                p("ttyS1.sock"),
                p("ttyS1.log")
            ))
            .args(["-serial", "chardev:ser1"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", p("qmp.sock")))
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                fs::File::create(dir.join("qemu.out")).expect("qemu.out"),
            ))
            .stderr(Stdio::from(
                fs::File::create(dir.join("qemu.err")).expect("qemu.err"),
            ));
        let child = cmd.spawn().expect("spawn qemu-system-x86_64");
        Board {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn serial(&self, name: &str, deadline: Instant) -> Serial {
        Serial::connect(&self.dir.join(name), deadline)
    }

    /// Panics with QEMU's own output if it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "qemu exited ({status}):\n{}",
                fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default()
            );
        }
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the image, with `tandem.toml` on its config partition when `configured`, and the
/// test flag added to slot A's loader entry when `test_flag` (shipped entries never carry it).
fn prepare_disk(dir: &TempDir, configured: bool, test_flag: bool) -> PathBuf {
    let disk = dir.join("disk.img");
    fs::copy(image_path(), &disk).expect("copy the image");
    let cfg = partition_offset(&disk, "tandemcfg");
    assert_eq!(
        mdir(&disk, cfg, ""),
        ["README.txt"],
        "a fresh config partition holds only its README"
    );
    if configured {
        let config = dir.join("tandem.toml");
        fs::write(&config, standalone_config()).expect("write tandem.toml");
        mcopy(&disk, cfg, &config, "tandem.toml");
    }
    let esp = partition_offset(&disk, "esp");
    let entries = mdir(&disk, esp, "loader/entries");
    assert!(
        entries.iter().any(|e| e == "a+3.conf") && entries.iter().any(|e| e == "b+3.conf"),
        "a fresh image has both slots with three tries each: {entries:?}"
    );
    if test_flag {
        let shipped =
            fs::read_to_string(workspace_root().join("image/esp/loader/entries/a+3.conf"))
                .expect("read image/esp/loader/entries/a+3.conf");
        assert!(
            !shipped.contains("tandem.test"),
            "a shipped entry carries the test flag"
        );
        let entry = dir.join("a.conf");
        fs::write(&entry, shipped.replace("panic=5", "panic=5 tandem.test=1"))
            .expect("write the test entry");
        mcopy(&disk, esp, &entry, "loader/entries/a+3.conf");
    }
    disk
}

#[test]
fn image_checksum_file_matches_the_image() {
    if !prerequisites() {
        return;
    }
    let image = image_path();
    let recorded = fs::read_to_string(image.with_extension("img.sha256"))
        .expect("image/out/tandem-qemu-x86_64.img.sha256 next to the image");
    let out = run_with_timeout(
        Command::new("sha256sum").arg(&image),
        Duration::from_secs(120),
    );
    out.assert_success("sha256sum");
    let actual = out.stdout.split_whitespace().next().unwrap_or_default();
    let expected = recorded.split_whitespace().next().unwrap_or_default();
    assert_eq!(
        actual, expected,
        "the .sha256 file does not match the image"
    );
    assert!(
        recorded.trim_end().ends_with("tandem-qemu-x86_64.img"),
        "the .sha256 file names the image: {recorded}"
    );
}

#[test]
fn the_image_boots_untouched_to_the_tandem_console() {
    if !prerequisites() {
        return;
    }
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu");
    let disk = prepare_disk(&dir, true, false);
    let started = Instant::now();
    let deadline = started + TEST_DEADLINE;
    let mut board = Board::start(dir.path(), &disk);
    let mut console = board.serial("ttyS0.sock", deadline);
    let prompt = format!("{NODE}(standalone)> ");

    console.wait_for(0, &prompt, deadline, "boot to the tandem console");
    board.assert_running();
    eprintln!(
        "image_qemu: tandem console prompt {:.1} s after QEMU started",
        started.elapsed().as_secs_f64()
    );
    let boot_log = console.text_since(0);
    assert!(
        boot_log.contains("tandem-init: board qemu-x86_64, slot a"),
        "slot A booted first:\n{boot_log}"
    );
    assert!(
        !boot_log.contains("TEST MODE"),
        "a shipped loader entry turned test mode on:\n{boot_log}"
    );
    // The start-up log lines redraw the prompt; let them land before typing.
    console.settle(Duration::from_secs(1), deadline);

    let status = console.command("status", "role:", &prompt, deadline);
    assert!(
        status.contains(&format!("{NODE} role:standalone")),
        "status names the node and its role:\n{status}"
    );
    assert!(
        status.contains("disk:uptodate") && status.contains("virtio-tandem-data"),
        "status shows the data disk:\n{status}"
    );

    let help = console.command("help", "this list", &prompt, deadline);
    for command in ["status", "switchover", "promote --force", "events", "help"] {
        assert!(help.contains(command), "help lists {command}:\n{help}");
    }

    let unknown = console.command("frobnicate", "frobnicate'", &prompt, deadline);
    assert!(
        unknown.contains("unknown command"),
        "an unknown command is answered:\n{unknown}"
    );
    board.assert_running();
}

#[test]
fn the_test_flag_gives_a_root_shell_on_the_second_serial_port() {
    if !prerequisites() {
        return;
    }
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu-test-shell");
    let disk = prepare_disk(&dir, true, true);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut board = Board::start(dir.path(), &disk);
    let console = board.serial("ttyS0.sock", deadline);
    let mut shell = board.serial("ttyS1.sock", deadline);
    console.wait_for(0, "TEST MODE", deadline, "test mode announced");
    let prompt = format!("{NODE}(standalone)> ");
    console.wait_for(0, &prompt, deadline, "tandem started");
    board.assert_running();

    // The shell's own prompt is "/ # "; a marker makes each reply unambiguous.
    let from = shell.len();
    shell.send(b"\necho MARK-$((6*7)); cat /proc/cmdline; tandem ctl --socket /run/tandem/ctl.sock --json status; echo END-$((6*7))\n");
    let start = shell.wait_for(from, "MARK-42", deadline, "the test shell answers");
    let end = shell.wait_for(start, "END-42", deadline, "the test shell's command ends");
    let reply = shell.text_since(start);
    let reply = &reply[..reply.len().min(end - start)];
    assert!(
        reply.contains("tandem.test=1"),
        "the kernel command line carries the flag:\n{reply}"
    );
    // `tandem ctl --json` prints one JSON object, possibly over several lines.
    let json = match (reply.find('{'), reply.rfind('}')) {
        (Some(open), Some(close)) if open < close => reply[open..=close].replace('\r', ""),
        _ => panic!("no JSON from tandem ctl:\n{reply}"),
    };
    let status: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("tandem ctl --json status: {e}\n{json}"));
    assert_eq!(status["node"], NODE, "{status}");
    assert_eq!(status["role"], "standalone", "{status}");

    // The volume is attached to the kernel as /dev/nbd0 and carries ext4 on /data (made on the
    // blank data disk): a file written there reads back after the page cache is dropped.
    let from = shell.len();
    shell.send(b"i=0; until grep -q '^/dev/nbd0 /data ext4' /proc/mounts || [ $i -ge 60 ]; do sleep 1; i=$((i+1)); done; echo MARK-$((6*7)); grep nbd0 /proc/mounts; dd if=/dev/urandom of=/data/f bs=64k count=16 2>/dev/null; sync; md5sum /data/f; echo 3 > /proc/sys/vm/drop_caches; md5sum /data/f; tandem ctl --socket /run/tandem/ctl.sock status | grep kernel; echo END-$((6*7))\n");
    let start = shell.wait_for(from, "MARK-42", deadline, "the mount appears");
    let end = shell.wait_for(start, "END-42", deadline, "the file is written and read");
    let reply = shell.text_since(start);
    let reply = &reply[..reply.len().min(end - start)];
    assert!(
        reply.contains("/dev/nbd0 /data ext4"),
        "ext4 on /dev/nbd0 mounted on /data:\n{reply}"
    );
    let sums: Vec<&str> = reply
        .lines()
        .filter(|l| l.contains("/data/f"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(sums.len(), 2, "two checksums:\n{reply}");
    assert_eq!(sums[0], sums[1], "the file reads back the same:\n{reply}");
    assert!(
        reply.contains("kernel: /dev/nbd0 attached, ext4 mounted on /data"),
        "status shows the kernel side:\n{reply}"
    );
    board.assert_running();
}

#[test]
fn a_fresh_image_comes_up_unconfigured_and_stays_up() {
    if !prerequisites() {
        return;
    }
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu-fresh");
    let disk = prepare_disk(&dir, false, false);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut board = Board::start(dir.path(), &disk);
    let console = board.serial("ttyS0.sock", deadline);
    let unconfigured = console.wait_for(0, "UNCONFIGURED", deadline, "a fresh board says so");
    // It idles: no reboot loop, no tandem, no shell.
    thread::sleep(Duration::from_secs(3));
    board.assert_running();
    let log = console.text_since(0);
    assert_eq!(
        log.matches("tandem-init: board qemu-x86_64").count(),
        1,
        "the board booted more than once:\n{log}"
    );
    let after = console.text_since(unconfigured);
    assert!(
        !after.contains("starting tandem") && !after.contains("rebooting"),
        "an unconfigured board starts nothing:\n{log}"
    );
}

#[test]
fn a_frozen_tandem_is_reset_by_the_watchdog() {
    if !prerequisites() {
        return;
    }
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu-watchdog");
    let disk = prepare_disk(&dir, true, true);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut board = Board::start(dir.path(), &disk);
    let console = board.serial("ttyS0.sock", deadline);
    let mut shell = board.serial("ttyS1.sock", deadline);
    let prompt = format!("{NODE}(standalone)> ");
    console.wait_for(0, &prompt, deadline, "tandem started");

    // tandem armed the i6300esb with the configured timeout, and it is being petted.
    let from = shell.len();
    shell.send(b"\necho MARK-$((6*7)); cat /sys/class/watchdog/watchdog0/state; tandem ctl --socket /run/tandem/ctl.sock --json status; echo END-$((6*7))\n");
    let start = shell.wait_for(from, "MARK-42", deadline, "the test shell answers");
    let end = shell.wait_for(start, "END-42", deadline, "the test shell's command ends");
    let reply = shell.text_since(start);
    let reply = &reply[..reply.len().min(end - start)];
    let json = match (reply.find('{'), reply.rfind('}')) {
        (Some(open), Some(close)) if open < close => reply[open..=close].replace('\r', ""),
        _ => panic!("no JSON from tandem ctl:\n{reply}"),
    };
    let status: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("tandem ctl --json status: {e}\n{json}"));
    assert_eq!(status["watchdog"]["armed"], true, "{status}");
    assert_eq!(
        status["watchdog"]["timeout_s"], WATCHDOG_TIMEOUT_S,
        "{status}"
    );
    assert!(status["watchdog"]["pets"].as_u64() >= Some(1), "{status}");

    // A daemon that hangs stops petting: the board resets and boots again.
    let frozen_at = console.len();
    shell.send(b"kill -STOP $(pidof tandem)\n");
    let frozen = Instant::now();
    console.wait_for(
        frozen_at,
        "tandem-init: board qemu-x86_64",
        deadline,
        "the watchdog reset the board and it booted again",
    );
    let after = frozen.elapsed();
    eprintln!(
        "image_qemu: board reset {:.1} s after tandem froze",
        after.as_secs_f64()
    );
    // Not before the last pet could have run out: this is the watchdog, not something else.
    assert!(
        after >= Duration::from_secs(WATCHDOG_TIMEOUT_S * 3 / 4),
        "the board reset {after:?} after the freeze, sooner than the watchdog can fire"
    );
    console.wait_for(
        frozen_at,
        &prompt,
        deadline,
        "tandem started again after the reset",
    );
    board.assert_running();
}
