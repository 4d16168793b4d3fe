//! Replication: what keeps two copies of the volume the same, and knows when they are not.
//!
//! - `generation`: the persistent generation identifiers and the one decision taken when the
//!   nodes reconnect (in sync, bitmap resync, full resync, split brain).
//! - `dirty_map`: the out-of-sync bitmap, one bit per region, persisted in 4 KiB blocks.
//! - `activity_log`: the hot extents, made durable before a write is issued, so that a crashed
//!   primary's in-flight writes join the resync.
//!
//! The engine that drives them (protocol C, degrade, resync, verify) arrives with the mirroring
//! work; see docs/REPLICATION.md.

pub mod activity_log;
pub mod dirty_map;
pub mod engine;
pub mod generation;
pub mod wire;
