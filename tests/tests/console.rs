//! The serial console's pieces through a pseudo-terminal, which behaves like a serial port: the
//! test holds the master side (the operator's terminal), the code under test opens the slave
//! path with [`SerialPort::open`] like it would open `/dev/ttyS0`.
//!
//! Every wait has a deadline; nothing sleeps on wall time except `poll` with a timeout.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::termios::{self, ControlModes, InputModes, LocalModes, OutputModes, SpecialCodeIndex};
use tandem::console::line::{LineEditor, LineEvent, CONSOLE_LINE_BYTES_MAX};
use tandem_board::{SerialError, SerialPort};

const BAUD: u32 = 115_200;
const DEADLINE: Duration = Duration::from_secs(30);

/// A pseudo-terminal: the master side (non-blocking) and the slave's path.
struct Pty {
    master: OwnedFd,
    slave_path: PathBuf,
    /// Bytes read past the last needle `read_until` looked for.
    unread: std::cell::RefCell<Vec<u8>>,
}

fn open_pty() -> Pty {
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .expect("openpt");
    rustix::pty::grantpt(&master).expect("grantpt");
    rustix::pty::unlockpt(&master).expect("unlockpt");
    let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
    rustix::io::ioctl_fionbio(&master, true).expect("non-blocking master");
    let slave_path = PathBuf::from(name.to_str().expect("utf-8 pty name"));
    Pty {
        master,
        slave_path,
        unread: Default::default(),
    }
}

impl Pty {
    fn open_port(&self) -> SerialPort {
        SerialPort::open(&self.slave_path, BAUD).expect("open the pty slave as a serial port")
    }

    /// Writes as much of `bytes` as the master takes now; returns how much it took.
    fn write_some(&self, bytes: &[u8]) -> usize {
        match rustix::io::write(&self.master, bytes) {
            Ok(n) => n,
            Err(Errno::AGAIN) | Err(Errno::INTR) => 0,
            Err(e) => panic!("write to the pty master: {e}"),
        }
    }

    /// Writes all of `bytes` (the slave side must be read meanwhile if there are many).
    fn write_all(&self, bytes: &[u8]) {
        let deadline = Instant::now() + DEADLINE;
        let mut rest = bytes;
        while !rest.is_empty() {
            assert!(Instant::now() < deadline, "pty master write stalled");
            let n = self.write_some(rest);
            rest = &rest[n..];
            if n == 0 {
                wait_for(&self.master, PollFlags::OUT);
            }
        }
    }

    /// Reads everything the master has now (what the port wrote).
    fn drain(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rustix::io::read(&self.master, &mut buf) {
                Ok(0) | Err(Errno::AGAIN) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(Errno::INTR) => {}
                Err(e) => panic!("read from the pty master: {e}"),
            }
        }
    }

    /// Reads and discards output until none has come for `quiet`.
    fn drain_until_quiet(&self, quiet: Duration) {
        let deadline = Instant::now() + DEADLINE;
        let mut last_output = Instant::now();
        while last_output.elapsed() < quiet {
            assert!(Instant::now() < deadline, "the port never went quiet");
            if !self.drain().is_empty() {
                last_output = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.unread.borrow_mut().clear();
    }

    /// Reads from the master until `needle` has arrived; returns what came up to and including
    /// it, and keeps the rest for the next call.
    fn read_until(&self, needle: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        let mut out = std::mem::take(&mut *self.unread.borrow_mut());
        loop {
            if let Some(at) = out.windows(needle.len()).position(|w| w == needle) {
                let rest = out.split_off(at + needle.len());
                *self.unread.borrow_mut() = rest;
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no {:?} from the port; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&out)
            );
            wait_for(&self.master, PollFlags::IN);
            out.extend_from_slice(&self.drain());
        }
    }
}

/// Waits up to 100 ms for `fd` to become ready for `flags`.
fn wait_for(fd: &impl AsFd, flags: PollFlags) {
    let mut fds = [PollFd::new(fd, flags)];
    let timeout = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(Errno::INTR) => {}
        Err(e) => panic!("poll: {e}"),
    }
}

/// Reads the port until it has nothing more, feeding the editor; the echo goes back out
/// through `write_or_drop` as the runtime would send it. Returns the events.
fn pump(port: &mut SerialPort, editor: &mut LineEditor) -> Vec<LineEvent> {
    let mut events = Vec::new();
    let mut buf = [0u8; 4096];
    let mut echo = Vec::new();
    loop {
        let n = port.read(&mut buf).expect("read the port");
        if n == 0 {
            return events;
        }
        echo.clear();
        events.extend(editor.feed(&buf[..n], &mut echo));
        port.write_or_drop(&echo);
    }
}

/// Deterministic noise (xorshift64*): every byte value, control bytes and escapes included.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn serial_port_is_raw_8n1_at_the_requested_speed_and_non_blocking() {
    let pty = open_pty();
    let port = pty.open_port();
    let settings = termios::tcgetattr(&port).expect("tcgetattr");
    assert_eq!(settings.input_speed(), BAUD);
    assert_eq!(settings.output_speed(), BAUD);
    let control = settings.control_modes;
    assert_eq!(control & ControlModes::CSIZE, ControlModes::CS8);
    assert!(control.contains(ControlModes::CLOCAL | ControlModes::CREAD));
    assert!(
        !control.intersects(ControlModes::PARENB | ControlModes::CSTOPB | ControlModes::CRTSCTS)
    );
    assert!(!settings
        .local_modes
        .intersects(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG | LocalModes::IEXTEN));
    assert!(!settings.output_modes.contains(OutputModes::OPOST));
    assert!(!settings.input_modes.intersects(
        InputModes::IXON
            | InputModes::IXOFF
            | InputModes::ICRNL
            | InputModes::INLCR
            | InputModes::IGNCR
            | InputModes::ISTRIP
    ));
    assert_eq!(settings.special_codes[SpecialCodeIndex::VMIN], 0);
    assert_eq!(settings.special_codes[SpecialCodeIndex::VTIME], 0);
    let status = rustix::fs::fcntl_getfl(&port).expect("fcntl_getfl");
    assert!(status.contains(rustix::fs::OFlags::NONBLOCK));
    let descriptor = rustix::io::fcntl_getfd(&port).expect("fcntl_getfd");
    assert!(descriptor.contains(rustix::io::FdFlags::CLOEXEC));
}

#[test]
fn serial_port_reads_nothing_at_once_then_the_typed_line() {
    let pty = open_pty();
    let mut port = pty.open_port();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    assert_eq!(port.read(&mut buf).expect("read"), 0);
    assert!(started.elapsed() < Duration::from_secs(1));

    let mut editor = LineEditor::new("nas-a(primary)> ".to_string());
    pty.write_all(b"status\r");
    let deadline = Instant::now() + DEADLINE;
    let mut events = Vec::new();
    while events.is_empty() {
        assert!(Instant::now() < deadline, "the line never arrived");
        wait_for(&port, PollFlags::IN);
        events = pump(&mut port, &mut editor);
    }
    assert_eq!(events, vec![LineEvent::Line("status".to_string())]);
    // The operator sees the echo and the next prompt, with \r\n untranslated.
    pty.read_until(b"status\r\nnas-a(primary)> ");
}

#[test]
fn input_that_arrived_before_the_port_was_opened_is_discarded() {
    let pty = open_pty();
    let _first = pty.open_port();
    pty.write_all(b"stale junk\r");
    let mut port = pty.open_port();
    let mut editor = LineEditor::new("> ".to_string());
    pty.write_all(b"help\r");
    let deadline = Instant::now() + DEADLINE;
    let mut events = Vec::new();
    while events.is_empty() {
        assert!(Instant::now() < deadline, "the line never arrived");
        wait_for(&port, PollFlags::IN);
        events = pump(&mut port, &mut editor);
    }
    assert_eq!(events, vec![LineEvent::Line("help".to_string())]);
}

#[test]
fn garbage_and_a_megabyte_line_leave_the_console_usable() {
    let pty = open_pty();
    let mut port = pty.open_port();
    let mut editor = LineEditor::new("nas-a(primary)> ".to_string());
    let mut input = noise(256 << 10, 0x9e37_79b9_7f4a_7c15);
    input.extend(std::iter::repeat_n(b'x', 1 << 20));
    input.extend_from_slice(b"\x03status\r");

    let deadline = Instant::now() + DEADLINE;
    let mut rest = &input[..];
    let mut events = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "the console stalled");
        let n = pty.write_some(rest);
        rest = &rest[n..];
        wait_for(&port, PollFlags::IN);
        events.extend(pump(&mut port, &mut editor));
        // The operator's terminal reads slowly or not at all: what does not fit is dropped.
        if rest.is_empty() && events.last() == Some(&LineEvent::Line("status".to_string())) {
            break;
        }
        assert!(editor.input().len() <= CONSOLE_LINE_BYTES_MAX);
    }
    assert!(events.contains(&LineEvent::Cancelled));
    // And it goes on working.
    pty.drain();
    pty.write_all(b"help\r");
    let mut more = Vec::new();
    while more.is_empty() {
        assert!(Instant::now() < deadline, "the next line never arrived");
        wait_for(&port, PollFlags::IN);
        more = pump(&mut port, &mut editor);
    }
    assert_eq!(more, vec![LineEvent::Line("help".to_string())]);
}

#[test]
fn write_or_drop_drops_promptly_when_the_terminal_never_reads() {
    let pty = open_pty();
    let mut port = pty.open_port();
    let chunk = [b'.'; 4096];
    let started = Instant::now();
    let mut accepted = 0usize;
    let mut dropped = 0usize;
    while dropped == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "write_or_drop never dropped after {accepted} bytes"
        );
        let lost = port.write_or_drop(&chunk);
        accepted += chunk.len() - lost;
        dropped += lost;
    }
    // A full buffer: further writes return at once and almost everything is dropped (the
    // kernel may still move a little from its line discipline into the buffer meanwhile).
    let before = Instant::now();
    let mut late = 0usize;
    for _ in 0..1000 {
        late += chunk.len() - port.write_or_drop(&chunk);
    }
    accepted += late;
    assert!(before.elapsed() < Duration::from_secs(2));
    assert!(late < 64 << 10, "a full pty still took {late} bytes");
    assert!(accepted < 16 << 20, "the pty took {accepted} bytes");

    // Once the terminal reads again, output flows again.
    let mut read = 0;
    let deadline = Instant::now() + DEADLINE;
    while read < accepted {
        assert!(Instant::now() < deadline, "read {read} of {accepted} bytes");
        wait_for(&pty.master, PollFlags::IN);
        read += pty.drain().len();
    }
    assert_eq!(read, accepted);
    assert_eq!(port.write_or_drop(b"nas-a(primary)> "), 0);
    pty.read_until(b"nas-a(primary)> ");
}

#[test]
fn a_vanished_terminal_reads_as_hung_up_and_output_is_dropped() {
    let pty = open_pty();
    let mut port = pty.open_port();
    drop(pty);
    let mut buf = [0u8; 64];
    assert!(matches!(port.read(&mut buf), Err(SerialError::HungUp)));
    assert_eq!(port.write_or_drop(b"status reply\r\n"), 14);
}

/// The serial console of a running node, end to end: prompt, `help`, `status`.
#[test]
fn a_running_node_answers_help_and_status_on_its_serial_console() {
    use tandem_tests::{Node, NodeConfig, TempDir, BACKING_BYTES_DEFAULT};

    let dir = TempDir::new("console-e2e");
    let pty = open_pty();
    let mut config = NodeConfig::standalone(dir.path(), "nas-a");
    // The harness ends the config inside [console], so this line belongs to it.
    config.extra_toml = format!("tty = \"{}\"\n", pty.slave_path.display());
    config.create_backing(BACKING_BYTES_DEFAULT);
    let mut node = Node::spawn(config);

    // Ctrl-U and Ctrl-L ask for a fresh prompt. If they arrive before the node opens the port
    // they are flushed with the rest of the stale input, and the first prompt is the one drawn
    // at start: either way one prompt arrives.
    pty.write_all(b"\x15\x0c");
    let prompt = pty.read_until(b")> ");
    assert!(String::from_utf8_lossy(&prompt).contains("nas-a(standalone)> "));

    pty.write_all(b"help\r");
    let reply = String::from_utf8_lossy(&pty.read_until(b"this list")).into_owned();
    for command in ["status", "switchover", "promote --force", "events"] {
        assert!(reply.contains(command), "help lacks {command}:\n{reply}");
    }
    pty.read_until(b")> ");

    pty.write_all(b"status\r");
    let reply = String::from_utf8_lossy(&pty.read_until(b"epoch:")).into_owned();
    assert!(reply.contains("nas-a role:"), "status reply:\n{reply}");
    pty.read_until(b")> ");

    // `status --json` answers on the console too (INTERFACE.md), as one JSON object.
    pty.write_all(b"status --json\r");
    let reply = String::from_utf8_lossy(&pty.read_until(b"\"volume_bytes\"")).into_owned();
    assert!(
        reply.contains("\"role\": \"standalone\""),
        "status --json reply:\n{reply}"
    );
    pty.read_until(b")> ");

    // Garbage on the line does not stop the node. Its echo can outrun this reader, and then
    // the console drops output rather than block the node (by design), so the reply is asked
    // for once the line has gone quiet.
    pty.write_all(&noise(64 << 10, 7));
    pty.drain_until_quiet(Duration::from_millis(500));
    pty.write_all(b"\x03status\r");
    pty.read_until(b"nas-a role:");
    assert!(node.is_running(), "{}", node.stderr_log());
    node.stop();
}
