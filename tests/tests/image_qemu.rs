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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::qemu::{self, image_path, prerequisites, Board, Nics, Serial, Shell, QEMU_TURN};
use tandem_tests::{create_sparse_file, run_with_timeout, TempDir};

/// A whole test: boot, console, commands. Boot-to-prompt measured ~25 s on 2 cores under TCG.
const TEST_DEADLINE: Duration = Duration::from_secs(180);
const DATA_DISK_BYTES: u64 = 256 * 1024 * 1024;
const NODE: &str = "nas-q";

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

/// A lone board in `dir`, from `disk`, with a blank data disk.
fn start_board(dir: &Path, disk: &Path) -> Board {
    let data = dir.join("data.img");
    create_sparse_file(&data, DATA_DISK_BYTES);
    Board::start(dir, disk, &data, &Nics::unconnected(dir))
}

/// A copy of the image, configured as a standalone node or not.
fn prepare_disk(dir: &TempDir, configured: bool, test_flag: bool) -> PathBuf {
    let config = standalone_config();
    qemu::prepare_disk(
        dir.path(),
        configured.then_some(config.as_str()),
        None,
        test_flag,
    )
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
    let _turn = QEMU_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu");
    let disk = prepare_disk(&dir, true, false);
    let started = Instant::now();
    let deadline = started + TEST_DEADLINE;
    let mut board = start_board(dir.path(), &disk);
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
    let _turn = QEMU_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu-test-shell");
    let disk = prepare_disk(&dir, true, true);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut board = start_board(dir.path(), &disk);
    let console = board.serial("ttyS0.sock", deadline);
    let mut shell = Shell::new(board.serial("ttyS1.sock", deadline));
    console.wait_for(0, "TEST MODE", deadline, "test mode announced");
    let prompt = format!("{NODE}(standalone)> ");
    console.wait_for(0, &prompt, deadline, "tandem started");
    board.assert_running();

    let cmdline = shell.run("cat /proc/cmdline", deadline);
    assert!(
        cmdline.contains("tandem.test=1"),
        "the kernel command line carries the flag:\n{cmdline}"
    );
    let status = shell.status(deadline);
    assert_eq!(status["node"], NODE, "{status}");
    assert_eq!(status["role"], "standalone", "{status}");

    // The volume is attached to the kernel as /dev/nbd0 and carries ext4 on /data (made on the
    // blank data disk): a file written there reads back after the page cache is dropped.
    let reply = shell.run(
        "i=0; until grep -q '^/dev/nbd0 /data ext4' /proc/mounts || [ $i -ge 60 ]; do sleep 1; i=$((i+1)); done; \
         grep nbd0 /proc/mounts; dd if=/dev/urandom of=/data/f bs=64k count=16 2>/dev/null; sync; md5sum /data/f; \
         echo 3 > /proc/sys/vm/drop_caches; md5sum /data/f; tandem ctl --socket /run/tandem/ctl.sock status | grep kernel",
        deadline,
    );
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

/// A freshly flashed board (an empty config partition) answers `status` with role
/// `unconfigured` and offers the setup dialog on its console; the dialog writes the config onto
/// TANDEMCFG, the board restarts, and tandem runs as the node the operator described.
#[test]
fn a_fresh_image_is_set_up_from_its_console() {
    if !prerequisites() {
        return;
    }
    let _turn = QEMU_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu-fresh");
    let disk = prepare_disk(&dir, false, false);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut board = start_board(dir.path(), &disk);
    let mut console = board.serial("ttyS0.sock", deadline);
    let prompt = "tandem(unconfigured)> ";
    console.wait_for(0, "not configured", deadline, "a fresh board says so");
    console.wait_for(0, prompt, deadline, "the unconfigured prompt");
    console.settle(Duration::from_secs(1), deadline);
    board.assert_running();

    let status = console.command("status", "role:", prompt, deadline);
    assert!(status.contains("role:unconfigured"), "{status}");
    let json = console.command("status --json", "\"role\"", prompt, deadline);
    let json = &json[json.find('{').expect("JSON")..=json.rfind('}').expect("JSON")];
    let json: serde_json::Value =
        serde_json::from_str(&json.replace(['\r', '\n'], "")).expect("status --json parses");
    assert_eq!(json["role"], "unconfigured", "{json}");
    assert_eq!(json["auto_failover"], false, "{json}");

    // The dialog: a standalone board named nas-q; a bad name is asked again.
    let answer = |console: &mut Serial, text: &str, next: &str| {
        let from = console.len();
        console.send(text.as_bytes());
        console.send(b"\r");
        console.wait_for(from, next, deadline, text);
    };
    answer(&mut console, "setup", "node name [nas-a]: ");
    answer(&mut console, "no spaces allowed", "node name [nas-a]: ");
    answer(&mut console, NODE, "peer name [none]: ");
    answer(&mut console, "", "[yes/no]: ");
    let from = console.len();
    answer(&mut console, "yes", "configuration written");
    console.wait_for(
        from,
        "tandem-init: board qemu-x86_64",
        deadline,
        "the board restarts after the setup",
    );
    let node_prompt = format!("{NODE}(standalone)> ");
    console.wait_for(
        from,
        &node_prompt,
        deadline,
        "tandem runs with the new config",
    );
    console.settle(Duration::from_secs(1), deadline);
    let status = console.command("status", "role:", &node_prompt, deadline);
    assert!(
        status.contains(&format!("{NODE} role:standalone")),
        "the configured node runs:\n{status}"
    );
    drop(board);
    let cfg = qemu::partition_offset(&disk, "tandemcfg");
    let files = qemu::mdir(&disk, cfg, "");
    assert!(
        files.iter().any(|f| f == "tandem.toml"),
        "the config is on TANDEMCFG: {files:?}"
    );
}

#[test]
fn a_frozen_tandem_is_reset_by_the_watchdog() {
    if !prerequisites() {
        return;
    }
    let _turn = QEMU_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("image-qemu-watchdog");
    let disk = prepare_disk(&dir, true, true);
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut board = start_board(dir.path(), &disk);
    let console = board.serial("ttyS0.sock", deadline);
    let mut shell = Shell::new(board.serial("ttyS1.sock", deadline));
    let prompt = format!("{NODE}(standalone)> ");
    console.wait_for(0, &prompt, deadline, "tandem started");

    // tandem armed the i6300esb with the configured timeout, and it is being petted.
    let status = shell.status(deadline);
    assert_eq!(status["watchdog"]["armed"], true, "{status}");
    assert_eq!(
        status["watchdog"]["timeout_s"], WATCHDOG_TIMEOUT_S,
        "{status}"
    );
    assert!(status["watchdog"]["pets"].as_u64() >= Some(1), "{status}");

    // A daemon that hangs stops petting: the board resets and boots again.
    let frozen_at = console.len();
    shell.run("kill -STOP $(pidof tandem)", deadline);
    let frozen = Instant::now();
    console.wait_for(
        frozen_at,
        "BdsDxe: loading",
        deadline,
        "the watchdog reset the board",
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
