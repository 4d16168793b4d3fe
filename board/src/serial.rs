//! The serial console's port: a tty in raw mode, 8N1, no flow control, never blocking.
//!
//! The event loop must never wait on the console, so the port is opened non-blocking and stays
//! so: [`SerialPort::read`] returns what has arrived (0 for nothing), and
//! [`SerialPort::write_or_drop`] writes what the tty's buffer takes and drops the rest. A
//! terminal that stops reading (a full buffer, a paused terminal, a cable to nowhere) costs
//! console output, never a heartbeat.
//!
//! `CLOCAL` makes the port ignore the modem lines, so on a real UART a pulled cable changes
//! nothing: bytes go out into the void and none come in. A port that really goes away (a USB
//! adapter unplugged, the other side of a pseudo-terminal closed) reads as
//! [`SerialError::HungUp`]; a hung-up tty stays readable for epoll forever, so the caller
//! should take it out of its epoll set (and may open the path again later).

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::termios::{
    self, ControlModes, InputModes, OptionalActions, QueueSelector, SpecialCodeIndex,
};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Why the serial port could not be opened, read or written.
#[derive(Debug)]
pub enum SerialError {
    /// The device could not be opened (missing, no permission, busy).
    Open(std::io::Error),
    /// The path is not a terminal.
    NotATerminal,
    /// The terminal refused the settings (an unsupported baud rate, for one).
    Configure(std::io::Error),
    /// The port is gone: a USB adapter unplugged, or the other side of a pseudo-terminal
    /// closed. Reads will not deliver anything again.
    HungUp,
    /// Any other read error.
    Io(std::io::Error),
}

impl std::fmt::Display for SerialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialError::Open(e) => write!(f, "cannot open: {e}"),
            SerialError::NotATerminal => write!(f, "not a terminal"),
            SerialError::Configure(e) => write!(f, "cannot set raw mode and speed: {e}"),
            SerialError::HungUp => write!(f, "hung up (device gone)"),
            SerialError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SerialError {}

/// An open serial port in raw, non-blocking mode; owns its file descriptor.
#[derive(Debug)]
pub struct SerialPort {
    fd: OwnedFd,
    path: PathBuf,
}

impl SerialPort {
    /// Opens the tty at `path` (`O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC`: it never becomes
    /// the process's controlling terminal and the open does not wait for a carrier), sets raw
    /// mode, 8N1 at `baud`, no flow control, `VMIN = 0` and `VTIME = 0`, and discards input
    /// that arrived before.
    pub fn open(path: &Path, baud: u32) -> Result<SerialPort, SerialError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SerialError::Open(e.into()))?;
        if !termios::isatty(&fd) {
            return Err(SerialError::NotATerminal);
        }
        if baud == 0 {
            // Speed 0 means "hang up" to termios.
            return Err(SerialError::Configure(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "baud rate 0",
            )));
        }
        let configure = |e: Errno| SerialError::Configure(e.into());
        let mut settings = termios::tcgetattr(&fd).map_err(configure)?;
        // cfmakeraw: no line editing, echo, signals, or byte translation; 8 bits, no parity.
        settings.make_raw();
        // Noise on an idle or unplugged line shows up as breaks and framing errors: drop those
        // bytes instead of reading them as NULs. No software flow control: XON/XOFF are bytes
        // like any other.
        settings.input_modes |= InputModes::IGNBRK | InputModes::IGNPAR;
        settings.input_modes -= InputModes::IXON | InputModes::IXOFF | InputModes::IXANY;
        settings.input_modes -= InputModes::INPCK;
        // 8N1, receiver on, modem lines ignored, no hardware flow control.
        settings.control_modes -= ControlModes::CSIZE
            | ControlModes::PARENB
            | ControlModes::CSTOPB
            | ControlModes::CRTSCTS;
        settings.control_modes |= ControlModes::CS8 | ControlModes::CLOCAL | ControlModes::CREAD;
        // A read returns at once with what is there.
        settings.special_codes[SpecialCodeIndex::VMIN] = 0;
        settings.special_codes[SpecialCodeIndex::VTIME] = 0;
        settings.set_speed(baud).map_err(configure)?;
        termios::tcsetattr(&fd, OptionalActions::Now, &settings).map_err(configure)?;
        termios::tcflush(&fd, QueueSelector::IFlush).map_err(configure)?;
        Ok(SerialPort {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path the port was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what has arrived into `buf`; `Ok(0)` when nothing has. Never blocks.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, SerialError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            return match rustix::io::read(&self.fd, &mut *buf) {
                // With VMIN = 0 an empty tty reads as 0, and so does a hung-up one; poll tells
                // them apart.
                Ok(0) if self.is_hung_up() => Err(SerialError::HungUp),
                Ok(n) => Ok(n),
                Err(Errno::AGAIN) => Ok(0),
                Err(Errno::INTR) => continue,
                Err(Errno::IO) => Err(SerialError::HungUp),
                Err(e) => Err(SerialError::Io(e.into())),
            };
        }
    }

    /// Writes as much of `bytes` as the tty takes without blocking and drops the rest; returns
    /// how many bytes were dropped. A hung-up or failing port drops everything.
    pub fn write_or_drop(&mut self, bytes: &[u8]) -> usize {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rustix::io::write(&self.fd, rest) {
                Ok(0) => break,
                Ok(n) => rest = &rest[n..],
                Err(Errno::INTR) => continue,
                // AGAIN: the buffer is full. IO and the rest: the port is gone or broken.
                Err(_) => break,
            }
        }
        rest.len()
    }

    fn is_hung_up(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_) => fds[0]
                .revents()
                .intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR),
            Err(_) => false,
        }
    }
}

impl AsFd for SerialPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_terminal_is_refused() {
        assert!(matches!(
            SerialPort::open(Path::new("/dev/null"), 115_200),
            Err(SerialError::NotATerminal)
        ));
    }

    #[test]
    fn a_missing_device_is_an_open_error_that_names_the_cause() {
        let error =
            SerialPort::open(Path::new("/nonexistent/ttyS9"), 115_200).expect_err("no such device");
        assert!(matches!(&error, SerialError::Open(e) if e.kind() == std::io::ErrorKind::NotFound));
        assert!(error.to_string().starts_with("cannot open: "));
    }
}
