//! Termination signals as a file descriptor, so the event loop sees SIGTERM and SIGINT like any
//! other input instead of being interrupted by them.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

/// SIGTERM and SIGINT, blocked for the process and readable from a signalfd.
#[derive(Debug)]
pub struct TerminationSignals {
    fd: OwnedFd,
}

impl TerminationSignals {
    /// Blocks SIGTERM and SIGINT and opens a non-blocking signalfd for them. Call before any
    /// thread is started so that every thread inherits the mask.
    pub fn install() -> std::io::Result<TerminationSignals> {
        // SAFETY: `set` is a plain C struct that sigemptyset initialises before any other use;
        // the pointers passed are to live locals.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(TerminationSignals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Takes one pending signal, if any; returns its number.
    pub fn take(&self) -> Option<i32> {
        let mut info = [0u8; 128];
        match rustix::io::read(&self.fd, &mut info) {
            Ok(128) => {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                i32::try_from(signo).ok()
            }
            _ => None,
        }
    }
}

impl AsFd for TerminationSignals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
