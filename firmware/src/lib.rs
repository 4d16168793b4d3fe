//! tandem: the firmware of a two-board high-availability NAS.
//!
//! The crate has two layers (DESIGN.md §6):
//!
//! - **The sans-IO core** (`wire`, `nbd`, `node`, `metadata`, `console`): state machines that
//!   take inputs (bytes from a client, a finished disk request, the time) and produce outputs
//!   (bytes to send, disk requests). The core never makes a syscall, never reads a clock and
//!   never draws randomness, so the same code runs in production, in multi-process tests and in
//!   a deterministic simulator.
//! - **The runtime** (`runtime`): one single-threaded event loop that owns the sockets and the
//!   disk (through `tandem_board`), feeds the core, and carries out what it asks for.
//!
//! Configuration (`config`), the command line (`cli`, the `tandem` binary) and the setup dialog
//! of an unconfigured board (`setup`) sit on top.
#![forbid(unsafe_code)]

pub mod buffer;
pub mod cli;
pub mod config;
pub mod console;
pub mod constants;
pub mod demo;
pub mod exit;
pub mod logger;
pub mod metadata;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod peer;
pub mod replication;
pub mod runtime;
pub mod setup;
pub mod time;
pub mod wire;
