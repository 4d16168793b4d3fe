//! The hardware watchdog, through the Linux watchdog API (`include/uapi/linux/watchdog.h`).
//!
//! Opened once at start and never disarmed: there is no magic close here (the letter `V` is never
//! written), and the image loads the driver with `nowayout=1`, so a tandem that dies or hangs
//! stops petting and the board resets. The timeout asked for is set with `WDIOC_SETTIMEOUT` and
//! read back, because drivers round it (and iTCO may take up to twice it to reset a board:
//! DESIGN.md §4).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

// _IOR('W', 5, int), _IOWR('W', 6, int), _IOR('W', 7, int), _IOR('W', 10, int).
const WDIOC_KEEPALIVE: libc::c_ulong = 0x8004_5705;
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xc004_5706;
const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;
const WDIOC_GETTIMELEFT: libc::c_ulong = 0x8004_570a;

/// An armed hardware watchdog.
#[derive(Debug)]
pub struct Watchdog {
    file: File,
    timeout_s: u32,
}

/// One `int` in and out of a watchdog ioctl.
fn ioctl_int(file: &File, request: libc::c_ulong, value: i32) -> std::io::Result<i32> {
    let mut value: libc::c_int = value;
    // SAFETY: every request used here takes a pointer to one `int`, which lives on this stack
    // frame for the whole call; the descriptor is open for as long as `file` is borrowed.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value as *mut libc::c_int) };
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

impl Watchdog {
    /// Opens and arms the watchdog at `path` with `timeout_s`; returns it with the timeout the
    /// driver actually applied. From here on the board resets unless [`Watchdog::pet`] is
    /// called in time.
    pub fn open(path: &Path, timeout_s: u32) -> std::io::Result<Watchdog> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let asked = i32::try_from(timeout_s).unwrap_or(i32::MAX);
        // A driver without settable timeouts keeps its own; what it runs with is read back.
        let _ = ioctl_int(&file, WDIOC_SETTIMEOUT, asked);
        let applied = ioctl_int(&file, WDIOC_GETTIMEOUT, 0)?;
        let timeout_s = u32::try_from(applied).unwrap_or(timeout_s).max(1);
        ioctl_int(&file, WDIOC_KEEPALIVE, 0)?;
        Ok(Watchdog { file, timeout_s })
    }

    /// The timeout the driver runs with, in seconds.
    pub fn timeout_s(&self) -> u32 {
        self.timeout_s
    }

    /// Restarts the countdown.
    pub fn pet(&mut self) -> std::io::Result<()> {
        ioctl_int(&self.file, WDIOC_KEEPALIVE, 0).map(|_| ())
    }

    /// Seconds left before a reset, where the driver can tell.
    pub fn time_left_s(&self) -> Option<u32> {
        ioctl_int(&self.file, WDIOC_GETTIMELEFT, 0)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header_encoding() {
        // _IOC(dir, 'W', nr, sizeof(int)): dir in bits 30-31 (1 write, 2 read), size in 16-29.
        let ioc =
            |dir: libc::c_ulong, nr: libc::c_ulong| (dir << 30) | (4 << 16) | (0x57 << 8) | nr;
        assert_eq!(WDIOC_KEEPALIVE, ioc(2, 5));
        assert_eq!(WDIOC_SETTIMEOUT, ioc(3, 6));
        assert_eq!(WDIOC_GETTIMEOUT, ioc(2, 7));
        assert_eq!(WDIOC_GETTIMELEFT, ioc(2, 10));
    }

    #[test]
    fn a_path_that_is_not_a_watchdog_is_refused() {
        // /dev/null opens, but the watchdog ioctls fail on it: nothing is armed.
        assert!(Watchdog::open(Path::new("/dev/null"), 5).is_err());
        assert!(Watchdog::open(Path::new("/nonexistent/watchdog"), 5).is_err());
    }
}
