//! Replication: what keeps two copies of the volume the same, and knows when they are not.
//!
//! - `generation`: the persistent generation identifiers and the one decision taken when the
//!   nodes reconnect (in sync, bitmap resync, full resync, split brain).
//! - `dirty_map`: the out-of-sync bitmap, one bit per region, persisted in 4 KiB blocks.
//! - `activity_log`: the hot extents, made durable before a write is issued, so that a crashed
//!   primary's in-flight writes join the resync.
//! - `wire`: the messages the two nodes exchange inside sealed peer frames.
//! - `engine`: the engine that drives them all: the pairing exchange, protocol C, degrade,
//!   resync, verify, switchover (docs/REPLICATION.md).

pub mod activity_log;
pub mod dirty_map;
pub mod engine;
pub mod generation;
pub mod wire;
