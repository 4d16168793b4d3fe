//! QEMU boards for the system tests: the appliance image booted under TCG with OVMF, an
//! i6300esb, two NICs and two serial ports on unix sockets, driven through the console
//! (ttyS0), the test shell (ttyS1, kernel flag `tandem.test=1`) and QMP.
//!
//! Every wait has a deadline; QEMU is killed when a [`Board`] is dropped.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{is_ci, require_tools, run_with_timeout, workspace_root, COMMAND_TIMEOUT};

/// One console command's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The QEMU boards of a test binary take turns (a pair counts as one turn): TCG guests on two
/// cores only slow each other down.
pub static QEMU_TURN: Mutex<()> = Mutex::new(());

/// The image under test.
pub fn image_path() -> PathBuf {
    workspace_root().join("image/out/tandem-qemu-x86_64.img")
}

/// The two NICs of a board, as QEMU `-netdev` specs (without `id=`) and MAC addresses.
#[derive(Debug, Clone)]
pub struct Nics {
    pub heartbeat: String,
    pub heartbeat_mac: String,
    pub lan: String,
    pub lan_mac: String,
}

impl Nics {
    /// Both NICs on unix datagram sockets in `dir`, connected to nothing (a lone board).
    pub fn unconnected(dir: &Path) -> Nics {
        Nics {
            heartbeat: dgram(&dir.join("hb-local.sock"), &dir.join("hb-remote.sock")),
            heartbeat_mac: "52:54:00:00:01:01".into(),
            lan: dgram(&dir.join("lan-local.sock"), &dir.join("lan-remote.sock")),
            lan_mac: "52:54:00:00:02:01".into(),
        }
    }
}

/// A `-netdev dgram` over unix sockets: QEMU binds `local` and sends to `remote`.
pub fn dgram(local: &Path, remote: &Path) -> String {
    format!(
        "dgram,local.type=unix,local.path={},remote.type=unix,remote.path={}",
        local.display(),
        remote.display()
    )
}

/// Whether everything a QEMU board needs is here; otherwise skips (fails under CI).
pub fn prerequisites() -> bool {
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
pub fn partition_offset(image: &Path, name: &str) -> u64 {
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
pub fn mcopy(image: &Path, offset: u64, from: &Path, to: &str) {
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
pub fn mdir(image: &Path, offset: u64, dir: &str) -> Vec<String> {
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
pub struct Serial {
    stream: UnixStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Serial {
    /// Connects (QEMU creates the socket right after it starts) and starts collecting output.
    pub fn connect(path: &Path, deadline: Instant) -> Serial {
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.seen.lock().expect("serial buffer").len()
    }

    /// Everything since byte `from`, lossily decoded.
    pub fn text_since(&self, from: usize) -> String {
        let seen = self.seen.lock().expect("serial buffer");
        String::from_utf8_lossy(&seen[from.min(seen.len())..]).into_owned()
    }

    /// Waits until `needle` appears at or after byte `from`; returns the byte after it.
    pub fn wait_for(&self, from: usize, needle: &str, deadline: Instant, what: &str) -> usize {
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
    pub fn settle(&self, quiet: Duration, deadline: Instant) {
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

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("write to the serial port");
    }

    /// Types `line` and a carriage return, waits for `expect` in the reply and for the prompt
    /// after it; returns everything from the echoed line to that prompt. (The console prints a
    /// fresh prompt at once, then the reply above it and the prompt again.)
    pub fn command(&mut self, line: &str, expect: &str, prompt: &str, deadline: Instant) -> String {
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
pub struct Board {
    child: Child,
    dir: PathBuf,
}

impl Board {
    /// Boots `disk` with OVMF, the data disk `data`, the two NICs of `nics` (heartbeat port
    /// first: virtio-net, then the LAN port: e1000e), an i6300esb (reset on expiry), two serial
    /// ports on unix sockets (`ttyS0.sock`, `ttyS1.sock`) and QMP (`qmp.sock`), all in `dir`.
    /// Output of an earlier boot in `dir` is kept: each boot appends to the serial logs.
    pub fn start(dir: &Path, disk: &Path, data: &Path, nics: &Nics) -> Board {
        let vars = dir.join("OVMF_VARS.fd");
        if !vars.exists() {
            fs::copy(OVMF_VARS, &vars).expect("copy OVMF_VARS");
        }
        for stale in ["ttyS0.sock", "ttyS1.sock", "qmp.sock"] {
            let _ = fs::remove_file(dir.join(stale));
        }
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
            .arg(format!("{},id=hb", nics.heartbeat))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=hb,mac={}",
                nics.heartbeat_mac
            ))
            .arg("-netdev")
            .arg(format!("{},id=lan", nics.lan))
            .arg("-device")
            .arg(format!("e1000e,netdev=lan,mac={}", nics.lan_mac))
            .args(["-device", "i6300esb", "-action", "watchdog=reset"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
                p("ttyS0.sock"),
                p("ttyS0.log")
            ))
            .args(["-serial", "chardev:ser0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser1,path={},server=on,wait=off,logfile={},logappend=on",
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

    /// Cuts the board's power: QEMU is killed, nothing in the guest runs another instruction.
    pub fn power_cut(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Plugs or pulls the cable of NIC `netdev` ("hb" or "lan") with QMP `set_link`: the guest
    /// sees its carrier go, as when the far end of a cable is unplugged.
    pub fn set_link(&self, netdev: &str, up: bool) {
        self.qmp(&format!(
            r#"{{"execute": "set_link", "arguments": {{"name": "{netdev}", "up": {up}}}}}"#
        ));
    }

    /// Runs one QMP command on a fresh connection; panics unless QEMU answers with "return".
    fn qmp(&self, command: &str) {
        let mut stream = UnixStream::connect(self.dir.join("qmp.sock")).expect("connect to QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("QMP read timeout");
        let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone QMP stream"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("QMP greeting");
        stream
            .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
            .expect("QMP capabilities");
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("QMP capabilities reply");
        stream
            .write_all(format!("{command}\n").as_bytes())
            .expect("QMP command");
        loop {
            line.clear();
            std::io::BufRead::read_line(&mut reader, &mut line).expect("QMP reply");
            assert!(!line.is_empty(), "QMP closed before answering {command}");
            if line.contains("\"return\"") {
                return;
            }
            assert!(!line.contains("\"error\""), "QMP refused {command}: {line}");
            // Anything else is an asynchronous event: read on.
        }
    }
    pub fn serial(&self, name: &str, deadline: Instant) -> Serial {
        Serial::connect(&self.dir.join(name), deadline)
    }

    /// Panics with QEMU's own output if it has exited.
    pub fn assert_running(&mut self) {
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

/// A copy of the image at `dir/disk.img`, with `config` as `tandem.toml` (and `key` as
/// `cluster.key`) on its config partition, and the test flag added to slot A's loader entry
/// when `test_flag` (shipped entries never carry it).
pub fn prepare_disk(
    dir: &Path,
    config: Option<&str>,
    key: Option<&[u8]>,
    test_flag: bool,
) -> PathBuf {
    let disk = dir.join("disk.img");
    fs::copy(image_path(), &disk).expect("copy the image");
    let cfg = partition_offset(&disk, "tandemcfg");
    assert_eq!(
        mdir(&disk, cfg, ""),
        ["README.txt"],
        "a fresh config partition holds only its README"
    );
    if let Some(config) = config {
        let file = dir.join("tandem.toml");
        fs::write(&file, config).expect("write tandem.toml");
        mcopy(&disk, cfg, &file, "tandem.toml");
    }
    if let Some(key) = key {
        let file = dir.join("cluster.key");
        fs::write(&file, key).expect("write cluster.key");
        mcopy(&disk, cfg, &file, "cluster.key");
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

/// The root shell of a test-mode board (ttyS1): runs commands and returns their output.
#[derive(Debug)]
pub struct Shell {
    serial: Serial,
    commands: u32,
}

impl Shell {
    pub fn new(serial: Serial) -> Shell {
        Shell {
            serial,
            commands: 0,
        }
    }

    /// The serial port under the shell (for output of background jobs).
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// Runs `script` (one shell line) and returns what it printed. Markers around the output
    /// make it unambiguous however the serial line echoes.
    pub fn run(&mut self, script: &str, deadline: Instant) -> String {
        self.commands += 1;
        let n = self.commands;
        let from = self.serial.len();
        // `$((..))` keeps the echoed command line from matching the markers.
        self.serial.send(
            format!("\necho BEGIN-$(({n}+0)); {script}; echo; echo END-$(({n}+0))\n").as_bytes(),
        );
        let begin = self
            .serial
            .wait_for(from, &format!("BEGIN-{n}\r\n"), deadline, script);
        let end = self
            .serial
            .wait_for(begin, &format!("END-{n}\r\n"), deadline, script);
        let text = self.serial.text_since(begin);
        let body = &text[..text.len().min(end - begin)];
        body.trim_end_matches(&format!("END-{n}\r\n"))
            .replace('\r', "")
    }

    /// `tandem ctl --json status` on the board.
    pub fn status(&mut self, deadline: Instant) -> serde_json::Value {
        let reply = self.run(
            "tandem ctl --socket /run/tandem/ctl.sock --json status",
            deadline,
        );
        match (reply.find('{'), reply.rfind('}')) {
            (Some(open), Some(close)) if open < close => serde_json::from_str(&reply[open..=close])
                .unwrap_or_else(|e| panic!("tandem ctl --json status: {e}\n{reply}")),
            _ => serde_json::Value::Null,
        }
    }

    /// Polls `status` until `accept` takes it; panics with the last status at the deadline.
    pub fn wait_status(
        &mut self,
        what: &str,
        deadline: Instant,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            let status = self.status(deadline);
            if accept(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached; last status:\n{status:#}"
            );
            thread::sleep(Duration::from_millis(500));
        }
    }
}
