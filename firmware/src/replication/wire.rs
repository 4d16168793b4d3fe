//! The replication messages the two nodes exchange inside sealed peer frames.
//!
//! Each message is one session frame (`peer::Session::seal`): the frame's kind byte says which
//! message it is, the plaintext is a fixed little-endian header followed, for data messages, by
//! the payload. Decoding checks every length and value; a message that does not decode is a
//! protocol error and ends the connection (the frame authenticated, so the peer is buggy or of
//! another version, never an attacker).
//!
//! | kind | message | direction | header |
//! |---|---|---|---|
//! | `0x20` | [`Message::State`] | both, at pairing start and on every role change | see [`PeerState`] |
//! | `0x21` | [`Message::Bitmap`] | both, after `State` | `first_region` u64, `count` u64, then a run of that many regions is dirty; repeated |
//! | `0x22` | [`Message::BitmapEnd`] | both | `dirty_regions` u64 (a check) |
//! | `0x30` | [`Message::Stream`] | primary to secondary | `seq` u64, `acked_below` u64, then a [`StreamBody`] |
//! | `0x31` | [`Message::Ack`] | secondary to primary | `seq` u64, `status` u32 (0 or an NBD errno), `value` u64 |
//! | `0x40` | [`Message::Handover`] | primary to secondary | `epoch` u64: "I demoted; promote with this epoch" |
//! | `0x41` | [`Message::SwitchoverRequest`] | secondary to primary | none |
//! | `0x42` | [`Message::ResolveSplitBrain`] | both | `keep` (name length u8 + name) |
//!
//! Stream bodies (first byte of the body after `seq` and `acked_below`):
//!
//! | op | body | the secondary does |
//! |---|---|---|
//! | 1 | write: `offset` u64, `fua` u8, payload | writes, acks when complete |
//! | 2 | trim: `offset` u64, `len` u64, `fua` u8 | discards |
//! | 3 | zeroes: `offset` u64, `len` u64, `fua` u8, `may_deallocate` u8 | zeroes |
//! | 4 | flush | fdatasync |
//! | 5 | resync data: `offset` u64, payload | writes (target of a resync) |
//! | 6 | resync done: the source's generations (4 x u64) | records the end of the resync |
//! | 7 | verify: `offset` u64, `len` u64 | reads, acks with a digest in `value` |
//!
//! The heartbeat's state ([`Beat`]) is not a message of its own: it rides in every keepalive of
//! both links (`peer::link`), after the keepalive's clock header.

use crate::replication::generation::{DiskFreshness, Generations};

/// Frame kinds of the replication messages (above the link's keepalive, `0x10`).
pub mod kind {
    pub const STATE: u8 = 0x20;
    pub const BITMAP: u8 = 0x21;
    pub const BITMAP_END: u8 = 0x22;
    pub const STREAM: u8 = 0x30;
    pub const ACK: u8 = 0x31;
    pub const HANDOVER: u8 = 0x40;
    pub const SWITCHOVER_REQUEST: u8 = 0x41;
    pub const RESOLVE_SPLIT_BRAIN: u8 = 0x42;
}

/// Runs of dirty regions per `Bitmap` message.
pub const BITMAP_RUNS_PER_MESSAGE_MAX: usize = 4096;

/// Extents of a crashed primary's activity log carried in a `State`.
pub const STATE_AL_EXTENTS_MAX: usize = 256;

/// A node's role as its peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireRole {
    Secondary = 0,
    Primary = 1,
}

/// Where a `State` stands in the exchange that opens a pairing.
///
/// The node whose name sorts first leads: it sends `Start` (with a new `exchange_id`) and its
/// bitmap; the other answers with `Reply` and its bitmap, then decides; the leader decides when
/// the reply is in. Both decide on exactly the two states exchanged. The follower asks for a new
/// exchange with `Request`; `Update` only reports a change (role, disk state, maintenance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    Update = 0,
    Start = 1,
    Reply = 2,
    Request = 3,
}

/// What a node tells its peer about itself at the start of a pairing and on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub exchange: Exchange,
    /// The leader's exchange counter (0 in `Update` and `Request`).
    pub exchange_id: u64,
    /// Random per process start: a new value means the peer restarted (a new pairing).
    pub boot_id: u64,
    pub role: WireRole,
    /// The highest epoch this node has seen or made.
    pub epoch: u64,
    pub generations: Generations,
    pub disk: DiskFreshness,
    pub never_written: bool,
    pub crashed_primary: bool,
    /// The operator's `maintenance on`.
    pub maintenance: bool,
    /// The activity-log extents of a crashed primary (empty otherwise).
    pub al_extents: Vec<u32>,
}

/// The uplink health a node reports in its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UplinkHealth {
    /// Not known (no lan interface found, or no probe result yet).
    #[default]
    Unknown = 0,
    /// Carrier on the lan port and, when configured, the gateway answers.
    Healthy = 1,
    /// No carrier, or the gateway probe is silent.
    Down = 2,
}

impl UplinkHealth {
    /// The word `status` uses.
    pub fn name(self) -> &'static str {
        match self {
            UplinkHealth::Unknown => "unknown",
            UplinkHealth::Healthy => "healthy",
            UplinkHealth::Down => "down",
        }
    }
}

/// What every heartbeat carries about its sender (DESIGN.md §4 "States and what the heartbeats
/// carry"): 37 bytes, little-endian. The keepalive header around it carries the sender's clock
/// and the echo of ours, which order heartbeats and give the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// Random per process start (a restarted peer's beats start a new order).
    pub boot_id: u64,
    pub role: WireRole,
    pub epoch: u64,
    pub disk: DiskFreshness,
    /// Receiving a resync.
    pub syncing: bool,
    pub uplink: UplinkHealth,
    pub maintenance: bool,
    pub current_generation: u64,
    /// The sender holds the cluster IP.
    pub holds_cluster_ip: bool,
}

/// Bytes of an encoded [`Beat`].
pub const BEAT_BYTES: usize = 31;

impl Beat {
    pub fn encode(&self) -> [u8; BEAT_BYTES] {
        let mut out = [0u8; BEAT_BYTES];
        out[0..8].copy_from_slice(&self.boot_id.to_le_bytes());
        out[8] = self.role as u8;
        out[9..17].copy_from_slice(&self.epoch.to_le_bytes());
        out[17] = freshness_byte(self.disk);
        out[18] = u8::from(self.syncing);
        out[19] = self.uplink as u8;
        out[20] = u8::from(self.maintenance);
        out[21..29].copy_from_slice(&self.current_generation.to_le_bytes());
        out[29] = u8::from(self.holds_cluster_ip);
        out[30] = 0; // reserved
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Beat, DecodeError> {
        let mut r = Reader { bytes };
        let boot_id = r.u64()?;
        let role = decode_role(r.u8()?)?;
        let epoch = r.u64()?;
        let disk = decode_freshness(r.u8()?)?;
        let syncing = r.bool()?;
        let uplink = match r.u8()? {
            0 => UplinkHealth::Unknown,
            1 => UplinkHealth::Healthy,
            2 => UplinkHealth::Down,
            _ => return Err(DecodeError("unknown uplink health")),
        };
        let maintenance = r.bool()?;
        let current_generation = r.u64()?;
        let holds_cluster_ip = r.bool()?;
        r.u8()?;
        r.end()?;
        Ok(Beat {
            boot_id,
            role,
            epoch,
            disk,
            syncing,
            uplink,
            maintenance,
            current_generation,
            holds_cluster_ip,
        })
    }
}

fn decode_role(byte: u8) -> Result<WireRole, DecodeError> {
    match byte {
        0 => Ok(WireRole::Secondary),
        1 => Ok(WireRole::Primary),
        _ => Err(DecodeError("unknown role")),
    }
}

fn decode_freshness(byte: u8) -> Result<DiskFreshness, DecodeError> {
    match byte {
        0 => Ok(DiskFreshness::UpToDate),
        1 => Ok(DiskFreshness::Consistent),
        2 => Ok(DiskFreshness::Outdated),
        3 => Ok(DiskFreshness::Inconsistent),
        _ => Err(DecodeError("unknown disk state")),
    }
}

/// One message of the replication stream, numbered by `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamBody {
    Write {
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
        may_deallocate: bool,
    },
    Flush,
    ResyncData {
        offset: u64,
        data: Vec<u8>,
    },
    ResyncDone {
        generations: Generations,
    },
    Verify {
        offset: u64,
        len: u64,
    },
}

/// A decoded replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    State(PeerState),
    Bitmap {
        runs: Vec<(u64, u64)>,
    },
    BitmapEnd {
        dirty_regions: u64,
    },
    Stream {
        seq: u64,
        acked_below: u64,
        body: StreamBody,
    },
    Ack {
        seq: u64,
        status: u32,
        value: u64,
    },
    Handover {
        epoch: u64,
    },
    SwitchoverRequest,
    ResolveSplitBrain {
        keep: String,
    },
}

/// Why a message does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed replication message: {}", self.0)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("a flag is neither 0 nor 1")),
        }
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn generations(&mut self) -> Result<Generations, DecodeError> {
        Ok(Generations {
            current: self.u64()?,
            bitmap: self.u64()?,
            history: [self.u64()?, self.u64()?],
        })
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes"))
        }
    }
}

fn put_generations(out: &mut Vec<u8>, g: &Generations) {
    for id in [g.current, g.bitmap, g.history[0], g.history[1]] {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

fn freshness_byte(disk: DiskFreshness) -> u8 {
    match disk {
        DiskFreshness::UpToDate => 0,
        DiskFreshness::Consistent => 1,
        DiskFreshness::Outdated => 2,
        DiskFreshness::Inconsistent => 3,
    }
}

impl Message {
    /// The frame kind this message travels as.
    pub fn kind(&self) -> u8 {
        match self {
            Message::State(_) => kind::STATE,
            Message::Bitmap { .. } => kind::BITMAP,
            Message::BitmapEnd { .. } => kind::BITMAP_END,
            Message::Stream { .. } => kind::STREAM,
            Message::Ack { .. } => kind::ACK,
            Message::Handover { .. } => kind::HANDOVER,
            Message::SwitchoverRequest => kind::SWITCHOVER_REQUEST,
            Message::ResolveSplitBrain { .. } => kind::RESOLVE_SPLIT_BRAIN,
        }
    }

    /// The header bytes and the payload (kept apart so that sealing copies the payload once).
    pub fn encode(&self) -> (Vec<u8>, &[u8]) {
        let mut h = Vec::with_capacity(64);
        let mut payload: &[u8] = &[];
        match self {
            Message::State(s) => {
                h.push(s.exchange as u8);
                h.extend_from_slice(&s.exchange_id.to_le_bytes());
                h.extend_from_slice(&s.boot_id.to_le_bytes());
                h.push(s.role as u8);
                h.extend_from_slice(&s.epoch.to_le_bytes());
                put_generations(&mut h, &s.generations);
                h.push(freshness_byte(s.disk));
                h.push(u8::from(s.never_written));
                h.push(u8::from(s.crashed_primary));
                h.push(u8::from(s.maintenance));
                let count = s.al_extents.len().min(STATE_AL_EXTENTS_MAX);
                h.extend_from_slice(&(count as u32).to_le_bytes());
                for extent in &s.al_extents[..count] {
                    h.extend_from_slice(&extent.to_le_bytes());
                }
            }
            Message::Bitmap { runs } => {
                for (first, count) in runs {
                    h.extend_from_slice(&first.to_le_bytes());
                    h.extend_from_slice(&count.to_le_bytes());
                }
            }
            Message::BitmapEnd { dirty_regions } => {
                h.extend_from_slice(&dirty_regions.to_le_bytes())
            }
            Message::Stream {
                seq,
                acked_below,
                body,
            } => {
                h.extend_from_slice(&seq.to_le_bytes());
                h.extend_from_slice(&acked_below.to_le_bytes());
                match body {
                    StreamBody::Write { offset, fua, data } => {
                        h.push(1);
                        h.extend_from_slice(&offset.to_le_bytes());
                        h.push(u8::from(*fua));
                        payload = data;
                    }
                    StreamBody::Trim { offset, len, fua } => {
                        h.push(2);
                        h.extend_from_slice(&offset.to_le_bytes());
                        h.extend_from_slice(&len.to_le_bytes());
                        h.push(u8::from(*fua));
                    }
                    StreamBody::Zeroes {
                        offset,
                        len,
                        fua,
                        may_deallocate,
                    } => {
                        h.push(3);
                        h.extend_from_slice(&offset.to_le_bytes());
                        h.extend_from_slice(&len.to_le_bytes());
                        h.push(u8::from(*fua));
                        h.push(u8::from(*may_deallocate));
                    }
                    StreamBody::Flush => h.push(4),
                    StreamBody::ResyncData { offset, data } => {
                        h.push(5);
                        h.extend_from_slice(&offset.to_le_bytes());
                        payload = data;
                    }
                    StreamBody::ResyncDone { generations } => {
                        h.push(6);
                        put_generations(&mut h, generations);
                    }
                    StreamBody::Verify { offset, len } => {
                        h.push(7);
                        h.extend_from_slice(&offset.to_le_bytes());
                        h.extend_from_slice(&len.to_le_bytes());
                    }
                }
            }
            Message::Ack { seq, status, value } => {
                h.extend_from_slice(&seq.to_le_bytes());
                h.extend_from_slice(&status.to_le_bytes());
                h.extend_from_slice(&value.to_le_bytes());
            }
            Message::Handover { epoch } => h.extend_from_slice(&epoch.to_le_bytes()),
            Message::SwitchoverRequest => {}
            Message::ResolveSplitBrain { keep } => {
                let name = &keep.as_bytes()[..keep.len().min(255)];
                h.push(name.len() as u8);
                h.extend_from_slice(name);
            }
        }
        (h, payload)
    }

    /// Decodes the plaintext of a frame of kind `kind`. `None` for a kind this version does not
    /// know (a newer peer's frame, heard and ignored).
    pub fn decode(kind: u8, body: &[u8]) -> Option<Result<Message, DecodeError>> {
        let mut r = Reader { bytes: body };
        let message = match kind {
            kind::STATE => decode_state(&mut r),
            kind::BITMAP => {
                if body.is_empty() || !body.len().is_multiple_of(16) {
                    return Some(Err(DecodeError("bitmap runs are 16 bytes each")));
                }
                let mut runs = Vec::with_capacity(body.len() / 16);
                while !r.bytes.is_empty() {
                    let (first, count) = match (r.u64(), r.u64()) {
                        (Ok(first), Ok(count)) => (first, count),
                        _ => return Some(Err(DecodeError("truncated"))),
                    };
                    if count == 0 || first.checked_add(count).is_none() {
                        return Some(Err(DecodeError("an empty or overflowing bitmap run")));
                    }
                    runs.push((first, count));
                }
                Ok(Message::Bitmap { runs })
            }
            kind::BITMAP_END => r
                .u64()
                .map(|dirty_regions| Message::BitmapEnd { dirty_regions }),
            kind::STREAM => decode_stream(&mut r),
            kind::ACK => (|| {
                Ok(Message::Ack {
                    seq: r.u64()?,
                    status: r.u32()?,
                    value: r.u64()?,
                })
            })(),
            kind::HANDOVER => r.u64().map(|epoch| Message::Handover { epoch }),
            kind::SWITCHOVER_REQUEST => Ok(Message::SwitchoverRequest),
            kind::RESOLVE_SPLIT_BRAIN => (|| {
                let n = r.u8()? as usize;
                let name = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| DecodeError("a node name is not UTF-8"))?;
                Ok(Message::ResolveSplitBrain {
                    keep: name.to_string(),
                })
            })(),
            _ => return None,
        };
        Some(message.and_then(|m| {
            // Data messages end with their payload; every other message must end exactly.
            if !matches!(m, Message::Stream { .. }) {
                r.end()?;
            }
            Ok(m)
        }))
    }
}

fn decode_state(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let exchange = match r.u8()? {
        0 => Exchange::Update,
        1 => Exchange::Start,
        2 => Exchange::Reply,
        3 => Exchange::Request,
        _ => return Err(DecodeError("unknown exchange step")),
    };
    let exchange_id = r.u64()?;
    let boot_id = r.u64()?;
    let role = decode_role(r.u8()?)?;
    let epoch = r.u64()?;
    let generations = r.generations()?;
    let disk = decode_freshness(r.u8()?)?;
    let never_written = r.bool()?;
    let crashed_primary = r.bool()?;
    let maintenance = r.bool()?;
    let count = r.u32()? as usize;
    if count > STATE_AL_EXTENTS_MAX {
        return Err(DecodeError("too many activity-log extents"));
    }
    let mut al_extents = Vec::with_capacity(count);
    for _ in 0..count {
        al_extents.push(r.u32()?);
    }
    Ok(Message::State(PeerState {
        exchange,
        exchange_id,
        boot_id,
        role,
        epoch,
        generations,
        disk,
        never_written,
        crashed_primary,
        maintenance,
        al_extents,
    }))
}

fn decode_stream(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let seq = r.u64()?;
    let acked_below = r.u64()?;
    if seq == 0 || acked_below > seq {
        return Err(DecodeError("stream sequence numbers out of order"));
    }
    let body = match r.u8()? {
        1 => {
            let offset = r.u64()?;
            let fua = r.bool()?;
            let data = r.rest();
            if data.is_empty() {
                return Err(DecodeError("a write without data"));
            }
            StreamBody::Write {
                offset,
                fua,
                data: data.to_vec(),
            }
        }
        2 => StreamBody::Trim {
            offset: r.u64()?,
            len: r.u64()?,
            fua: r.bool()?,
        },
        3 => StreamBody::Zeroes {
            offset: r.u64()?,
            len: r.u64()?,
            fua: r.bool()?,
            may_deallocate: r.bool()?,
        },
        4 => StreamBody::Flush,
        5 => {
            let offset = r.u64()?;
            let data = r.rest();
            if data.is_empty() {
                return Err(DecodeError("resync data without data"));
            }
            StreamBody::ResyncData {
                offset,
                data: data.to_vec(),
            }
        }
        6 => StreamBody::ResyncDone {
            generations: r.generations()?,
        },
        7 => StreamBody::Verify {
            offset: r.u64()?,
            len: r.u64()?,
        },
        _ => return Err(DecodeError("unknown stream operation")),
    };
    r.end()?;
    Ok(Message::Stream {
        seq,
        acked_below,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(message: Message) {
        let (mut header, payload) = message.encode();
        header.extend_from_slice(payload);
        let decoded = Message::decode(message.kind(), &header)
            .expect("a known kind")
            .expect("decodes");
        assert_eq!(decoded, message);
    }

    #[test]
    fn every_message_round_trips() {
        let generations = Generations {
            current: 7,
            bitmap: 5,
            history: [3, 1],
        };
        round_trip(Message::State(PeerState {
            exchange: Exchange::Reply,
            exchange_id: 3,
            boot_id: 99,
            role: WireRole::Primary,
            epoch: 4,
            generations,
            disk: DiskFreshness::Outdated,
            never_written: false,
            crashed_primary: true,
            maintenance: true,
            al_extents: vec![1, 2, 300],
        }));
        round_trip(Message::Bitmap {
            runs: vec![(0, 3), (10, 1)],
        });
        round_trip(Message::BitmapEnd { dirty_regions: 4 });
        for body in [
            StreamBody::Write {
                offset: 4096,
                fua: true,
                data: vec![1; 512],
            },
            StreamBody::Trim {
                offset: 0,
                len: 1 << 20,
                fua: false,
            },
            StreamBody::Zeroes {
                offset: 8,
                len: 9,
                fua: true,
                may_deallocate: true,
            },
            StreamBody::Flush,
            StreamBody::ResyncData {
                offset: 65536,
                data: vec![9; 65536],
            },
            StreamBody::ResyncDone { generations },
            StreamBody::Verify {
                offset: 0,
                len: 65536,
            },
        ] {
            round_trip(Message::Stream {
                seq: 12,
                acked_below: 10,
                body,
            });
        }
        round_trip(Message::Ack {
            seq: 3,
            status: 5,
            value: 0xdead,
        });
        round_trip(Message::Handover { epoch: 8 });
        round_trip(Message::SwitchoverRequest);
        round_trip(Message::ResolveSplitBrain {
            keep: "nas-b".to_string(),
        });
    }

    #[test]
    fn a_beat_round_trips_and_refuses_bad_bytes() {
        let beat = Beat {
            boot_id: 0x0102_0304_0506_0708,
            role: WireRole::Primary,
            epoch: 9,
            disk: DiskFreshness::Outdated,
            syncing: true,
            uplink: UplinkHealth::Down,
            maintenance: true,
            current_generation: 0xdead_beef,
            holds_cluster_ip: true,
        };
        let bytes = beat.encode();
        assert_eq!(Beat::decode(&bytes), Ok(beat));
        assert!(Beat::decode(&bytes[..BEAT_BYTES - 1]).is_err());
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(Beat::decode(&long).is_err());
        for (at, bad) in [(8, 2u8), (17, 4), (18, 2), (19, 3), (20, 2), (29, 7)] {
            let mut wrong = bytes;
            wrong[at] = bad;
            assert!(
                Beat::decode(&wrong).is_err(),
                "byte {at} = {bad} must be refused"
            );
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let refused = |kind: u8, body: &[u8]| matches!(Message::decode(kind, body), Some(Err(_)));
        assert!(refused(kind::STATE, &[0; 10]));
        assert!(refused(kind::BITMAP, &[]));
        assert!(refused(kind::BITMAP, &[0; 15]));
        let mut zero_run = Vec::new();
        zero_run.extend_from_slice(&5u64.to_le_bytes());
        zero_run.extend_from_slice(&0u64.to_le_bytes());
        assert!(refused(kind::BITMAP, &zero_run));
        assert!(refused(kind::ACK, &[0; 19]));
        assert!(refused(kind::ACK, &[0; 21]));
        // A stream message with seq 0, with acked_below past seq, with an unknown op.
        let stream = |seq: u64, below: u64, op: u8| {
            let mut b = Vec::new();
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&below.to_le_bytes());
            b.push(op);
            b
        };
        assert!(refused(kind::STREAM, &stream(0, 0, 4)));
        assert!(refused(kind::STREAM, &stream(2, 3, 4)));
        assert!(refused(kind::STREAM, &stream(2, 1, 99)));
        assert!(!refused(kind::STREAM, &stream(2, 1, 4)));
        // A write without data.
        let mut write = stream(2, 1, 1);
        write.extend_from_slice(&0u64.to_le_bytes());
        write.push(0);
        assert!(refused(kind::STREAM, &write));
        // A flag that is not 0 or 1.
        let mut trim = stream(2, 1, 2);
        trim.extend_from_slice(&[0; 16]);
        trim.push(2);
        assert!(refused(kind::STREAM, &trim));
        assert!(Message::decode(0x7f, &[1, 2, 3]).is_none());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(kind in 0x20u8..0x43, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode(kind, &body);
            let _ = Beat::decode(&body);
        }
    }
}
