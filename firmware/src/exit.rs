//! Exit statuses of the `tandem` binary (INTERFACE.md; sysexits values).

/// Clean exit after SIGTERM/SIGINT, or a command that succeeded.
pub const OK: u8 = 0;
/// A command that failed at run time (for example `ctl` against a node that said no).
pub const FAILED: u8 = 1;
/// Bad usage: unknown flag, missing argument.
pub const USAGE: u8 = 64;
/// The backing device is missing or refused.
pub const BACKING: u8 = 66;
/// Internal error.
pub const INTERNAL: u8 = 70;
/// A socket path or address is in use by a live process.
pub const CANT_CREATE: u8 = 73;
/// Fenced in test mode.
pub const FENCED: u8 = 75;
/// Bad configuration.
pub const CONFIG: u8 = 78;
/// Stopped by Ctrl-C or SIGTERM before it finished (`tandem demo`; 128 + SIGINT, as shells do).
pub const INTERRUPTED: u8 = 130;
