//! Tests of the NBD server state machine, driven through its inputs and outputs.
//!
//! A small harness plays the client (encoding options and requests from the spec), the runtime
//! (draining outputs, recycling sent buffers) and the volume (an in-memory disk that answers
//! `VolumeRequest`s), so each test runs a whole flow without sockets or a clock.

use super::{ConnId, ExportInfo, Phase, Server, ServerOutput, VolumeDone, VolumeRequest};
use super::{EXPORT_DESCRIPTION, EXPORT_NAME};
use crate::constants::{
    IN_FLIGHT_BYTES_MAX, NBD_CONNECTION_COUNT_MAX, NBD_HANDSHAKE_TIMEOUT_MS,
    NBD_OPTION_PAYLOAD_BYTES_MAX, NBD_OPTION_SKIP_BYTES_MAX, NBD_PAYLOAD_BYTES_MAX,
    NBD_REFUSED_CONNECTION_COUNT_MAX, NBD_REQUESTS_PER_CONNECTION_MAX,
};
use crate::time::Instant;
use crate::wire::nbd::{
    self as wire, allocation, chunk, client_flags, command, command_flags, errno, info, option,
    option_reply, transmission_flags,
};
use proptest::prelude::*;
use tandem_board::Extent;

/// The export size most tests use.
const DISK_BYTES: u64 = 1 << 20;
/// Granularity of the fake volume's allocation map.
const BLOCK_BYTES: u64 = 4096;

// ---- client side: encoders ------------------------------------------------------------------

fn client_flags_bytes(flags: u32) -> Vec<u8> {
    flags.to_be_bytes().to_vec()
}

/// An option as a client sends it: `IHAVEOPT`, code, length, payload.
fn opt(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = wire::OPTION_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
fn info_payload(name: &str, types: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, name);
    out.extend_from_slice(&(types.len() as u16).to_be_bytes());
    for t in types {
        out.extend_from_slice(&t.to_be_bytes());
    }
    out
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, name);
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        string(&mut out, q);
    }
    out
}

fn req(cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    wire::emit_request(&wire::Request {
        flags,
        command: cmd,
        cookie,
        offset,
        length,
    })
    .to_vec()
}

fn write_req(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = req(command::WRITE, flags, cookie, offset, data.len() as u32);
    out.extend_from_slice(data);
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---- client side: decoders ------------------------------------------------------------------

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

/// Splits handshake bytes into option replies; panics on anything else.
fn parse_option_replies(mut bytes: &[u8]) -> Vec<OptionReply> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= wire::OPTION_REPLY_HEADER_LEN, "short reply");
        assert_eq!(be_u64(bytes, 0), wire::OPTION_REPLY_MAGIC, "reply magic");
        let len = be_u32(bytes, 16) as usize;
        let end = wire::OPTION_REPLY_HEADER_LEN + len;
        assert!(bytes.len() >= end, "reply shorter than its length");
        replies.push(OptionReply {
            option: be_u32(bytes, 8),
            reply_type: be_u32(bytes, 12),
            data: bytes[wire::OPTION_REPLY_HEADER_LEN..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
    replies
}

/// One transmission reply (the server sends each as one `Send`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The error of a simple reply.
    fn simple_error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }
}

fn parse_reply(msg: &[u8]) -> Reply {
    match be_u32(msg, 0) {
        wire::SIMPLE_REPLY_MAGIC => Reply::Simple {
            error: be_u32(msg, 4),
            cookie: be_u64(msg, 8),
            data: msg[wire::SIMPLE_REPLY_LEN..].to_vec(),
        },
        wire::STRUCTURED_REPLY_MAGIC => {
            let len = be_u32(msg, 16) as usize;
            assert_eq!(
                msg.len(),
                wire::CHUNK_HEADER_LEN + len,
                "chunk length field"
            );
            Reply::Chunk {
                flags: be_u16(msg, 4),
                chunk_type: be_u16(msg, 6),
                cookie: be_u64(msg, 8),
                payload: msg[wire::CHUNK_HEADER_LEN..].to_vec(),
            }
        }
        magic => panic!("not a reply: magic {magic:#x}"),
    }
}

// ---- the harness: runtime and volume --------------------------------------------------------

#[derive(Debug)]
enum Event {
    Sent(ConnId, Vec<u8>),
    Closed(ConnId),
}

#[derive(Debug)]
struct Harness {
    server: Server,
    disk: Vec<u8>,
    /// One flag per `BLOCK_BYTES`: true once data was written there.
    allocated: Vec<bool>,
    /// Volume requests issued and not yet answered, oldest first.
    pending: Vec<(u64, VolumeRequest)>,
    /// Every volume request ever issued, described.
    issued: Vec<String>,
    /// What reached the clients, in order. `Send` head and data are joined into one message.
    events: Vec<Event>,
    /// The next volume answer fails with this error.
    fail_next: Option<u32>,
}

fn describe(request: &VolumeRequest) -> String {
    match request {
        VolumeRequest::Read { offset, buf } => format!("read {offset}+{}", buf.len()),
        VolumeRequest::Write { offset, buf, fua } => {
            format!("write {offset}+{} fua={fua}", buf.len())
        }
        VolumeRequest::Flush => "flush".to_string(),
        VolumeRequest::Trim { offset, len, fua } => format!("trim {offset}+{len} fua={fua}"),
        VolumeRequest::WriteZeroes {
            offset,
            len,
            may_deallocate,
            fua,
        } => format!("zeroes {offset}+{len} dealloc={may_deallocate} fua={fua}"),
        VolumeRequest::MapExtents { offset, len } => format!("map {offset}+{len}"),
    }
}

impl Harness {
    fn new(size_bytes: u64) -> Harness {
        Harness {
            server: Server::new(ExportInfo {
                size_bytes,
                is_serving: true,
            }),
            disk: vec![0; size_bytes as usize],
            allocated: vec![false; size_bytes.div_ceil(BLOCK_BYTES) as usize],
            pending: Vec::new(),
            issued: Vec::new(),
            events: Vec::new(),
            fail_next: None,
        }
    }

    /// Drains the server's outputs as the runtime does: every sent buffer is recycled, and a
    /// Close is followed by `handle_closed` once "the socket" is released.
    fn pump(&mut self) {
        while let Some(output) = self.server.poll_output() {
            match output {
                ServerOutput::Send { conn, head, data } => {
                    let mut bytes = head.as_slice().to_vec();
                    if let Some(buf) = data {
                        bytes.extend_from_slice(buf.as_slice());
                        self.server.recycle(buf);
                    }
                    self.events.push(Event::Sent(conn, bytes));
                }
                ServerOutput::Volume { tag, request } => {
                    self.issued.push(describe(&request));
                    self.pending.push((tag, request));
                }
                ServerOutput::Close { conn } => {
                    self.events.push(Event::Closed(conn));
                    self.server.handle_closed(conn);
                }
            }
        }
    }

    fn connect_at(&mut self, now: Instant) -> ConnId {
        let conn = self.server.handle_connected(now).expect("a free slot");
        self.pump();
        let greeting = self.take_sent(conn);
        assert_eq!(greeting.len(), 1, "one greeting");
        assert_eq!(greeting[0][..16], *b"NBDMAGICIHAVEOPT");
        conn
    }

    fn connect(&mut self) -> ConnId {
        self.connect_at(Instant::from_millis(0))
    }

    fn feed(&mut self, conn: ConnId, bytes: &[u8]) -> usize {
        let consumed = self.server.handle_bytes(conn, bytes);
        self.pump();
        consumed
    }

    fn feed_all(&mut self, conn: ConnId, bytes: &[u8]) {
        assert_eq!(self.feed(conn, bytes), bytes.len(), "all bytes consumed");
    }

    /// Removes and returns the messages sent to `conn`.
    fn take_sent(&mut self, conn: ConnId) -> Vec<Vec<u8>> {
        let mut taken = Vec::new();
        self.events.retain_mut(|event| match event {
            Event::Sent(c, bytes) if *c == conn => {
                taken.push(std::mem::take(bytes));
                false
            }
            _ => true,
        });
        taken
    }

    fn option_replies(&mut self, conn: ConnId) -> Vec<OptionReply> {
        parse_option_replies(&self.take_sent(conn).concat())
    }

    fn replies(&mut self, conn: ConnId) -> Vec<Reply> {
        self.take_sent(conn)
            .iter()
            .map(|m| parse_reply(m))
            .collect()
    }

    fn close_count(&self, conn: ConnId) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Closed(c) if *c == conn))
            .count()
    }

    fn in_flight_bytes(&self) -> usize {
        self.server.pool.in_flight_bytes()
    }

    /// Carries out one volume request against the in-memory disk.
    fn answer(&mut self, request: VolumeRequest) -> VolumeDone {
        if let Some(error) = self.fail_next.take() {
            let buf = match request {
                VolumeRequest::Read { buf, .. } | VolumeRequest::Write { buf, .. } => Some(buf),
                _ => None,
            };
            return VolumeDone::Failed { error, buf };
        }
        match request {
            VolumeRequest::Read { offset, mut buf } => {
                let at = offset as usize;
                let len = buf.len();
                buf.as_mut_slice().copy_from_slice(&self.disk[at..at + len]);
                VolumeDone::Buf(buf)
            }
            VolumeRequest::Write { offset, buf, .. } => {
                let at = offset as usize;
                self.disk[at..at + buf.len()].copy_from_slice(buf.as_slice());
                self.mark(offset, buf.len() as u64, true);
                VolumeDone::Buf(buf)
            }
            VolumeRequest::Flush => VolumeDone::Done,
            VolumeRequest::Trim { offset, len, .. } => {
                self.zero(offset, len);
                self.mark(offset, len, false);
                VolumeDone::Done
            }
            VolumeRequest::WriteZeroes {
                offset,
                len,
                may_deallocate,
                ..
            } => {
                self.zero(offset, len);
                self.mark(offset, len, !may_deallocate);
                VolumeDone::Done
            }
            VolumeRequest::MapExtents { offset, .. } => {
                // Runs from `offset` to the end of the disk, past the requested length on
                // purpose: the server must cap them.
                let mut extents = Box::new(heapless::Vec::new());
                let mut at = offset;
                while at < self.disk.len() as u64 {
                    let block = at / BLOCK_BYTES;
                    let is_hole = !self.allocated[block as usize];
                    let len = (block + 1) * BLOCK_BYTES - at;
                    match extents.last_mut() {
                        Some(Extent { len: l, is_hole: h }) if *h == is_hole => *l += len,
                        _ => {
                            if extents.push(Extent { len, is_hole }).is_err() {
                                break;
                            }
                        }
                    }
                    at += len;
                }
                VolumeDone::Extents(extents)
            }
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        self.disk[offset as usize..(offset + len) as usize].fill(0);
    }

    fn mark(&mut self, offset: u64, len: u64, is_allocated: bool) {
        let first = offset / BLOCK_BYTES;
        let last = (offset + len).div_ceil(BLOCK_BYTES);
        for block in first..last {
            self.allocated[block as usize] = is_allocated;
        }
    }

    /// Answers the `index`-th pending volume request.
    fn complete(&mut self, index: usize) {
        let (tag, request) = self.pending.remove(index);
        let done = self.answer(request);
        self.server.handle_volume_done(tag, done);
        self.pump();
    }

    fn complete_all(&mut self) {
        while !self.pending.is_empty() {
            self.complete(0);
        }
    }

    /// Fixed-newstyle handshake ending in a successful GO.
    fn handshake(&mut self, conn: ConnId, structured: bool, base_allocation: bool) {
        let flags = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
        self.feed_all(conn, &client_flags_bytes(flags));
        if structured {
            self.feed_all(conn, &opt(option::STRUCTURED_REPLY, &[]));
        }
        if base_allocation {
            let payload = meta_payload(EXPORT_NAME, &[wire::BASE_ALLOCATION]);
            self.feed_all(conn, &opt(option::SET_META_CONTEXT, &payload));
        }
        self.feed_all(conn, &opt(option::GO, &info_payload(EXPORT_NAME, &[])));
        let replies = self.option_replies(conn);
        let last = replies.last().expect("replies");
        assert_eq!(
            (last.option, last.reply_type),
            (option::GO, option_reply::ACK)
        );
        assert!(replies.iter().all(|r| r.reply_type & (1 << 31) == 0));
    }

    /// A new connection in the transmission phase.
    fn transmission(&mut self, structured: bool, base_allocation: bool) -> ConnId {
        let conn = self.connect();
        self.handshake(conn, structured, base_allocation);
        conn
    }
}

/// Decodes a BLOCK_STATUS chunk payload into (context id, descriptors).
fn block_status_descriptors(payload: &[u8]) -> (u32, Vec<(u32, u32)>) {
    assert_eq!((payload.len() - 4) % 8, 0, "whole descriptors");
    let id = be_u32(payload, 0);
    let descriptors = payload[4..]
        .chunks_exact(8)
        .map(|d| (be_u32(d, 0), be_u32(d, 4)))
        .collect();
    (id, descriptors)
}

// ---- handshake ------------------------------------------------------------------------------

#[test]
fn connect_sends_the_fixed_newstyle_greeting() {
    let mut server = Server::new(ExportInfo {
        size_bytes: DISK_BYTES,
        is_serving: true,
    });
    let conn = server.handle_connected(Instant::from_millis(5)).unwrap();
    let Some(ServerOutput::Send {
        conn: to,
        head,
        data,
    }) = server.poll_output()
    else {
        panic!("expected the greeting");
    };
    assert_eq!(to, conn);
    assert!(data.is_none());
    let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
    expected.extend_from_slice(&[0x00, 0x03]); // FIXED_NEWSTYLE | NO_ZEROES
    assert_eq!(head.as_slice(), expected.as_slice());
    assert!(server.poll_output().is_none());
    assert_eq!(server.session_count(), 1);
    assert_eq!(server.counters().connections_accepted, 1);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(
        conn,
        &client_flags_bytes(client_flags::FIXED_NEWSTYLE | 1 << 5),
    );
    assert_eq!(h.close_count(conn), 1);
    assert!(h.take_sent(conn).is_empty());
    assert_eq!(h.server.counters().protocol_violations, 1);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    assert_eq!(h.close_count(conn), 0);
    let mut bad = opt(option::GO, &info_payload("", &[]));
    bad[0] = b'X';
    h.feed_all(conn, &bad);
    assert_eq!(h.close_count(conn), 1);
    assert!(h.take_sent(conn).is_empty(), "no reply to a bad option");
    assert_eq!(h.server.counters().protocol_violations, 1);
}

#[test]
fn go_with_block_size_request_reports_export_and_block_sizes_then_enters_transmission() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    let payload = info_payload(EXPORT_NAME, &[info::BLOCK_SIZE]);
    h.feed_all(conn, &opt(option::GO, &payload));
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(replies.iter().all(|r| r.option == option::GO));

    let export = &replies[0];
    assert_eq!(export.reply_type, option_reply::INFO);
    assert_eq!(export.data.len(), 12);
    assert_eq!(be_u16(&export.data, 0), info::EXPORT);
    assert_eq!(be_u64(&export.data, 2), DISK_BYTES);
    let flags = be_u16(&export.data, 10);
    let wanted = transmission_flags::HAS_FLAGS
        | transmission_flags::SEND_FLUSH
        | transmission_flags::SEND_FUA
        | transmission_flags::SEND_TRIM
        | transmission_flags::SEND_WRITE_ZEROES
        | transmission_flags::CAN_MULTI_CONN;
    assert_eq!(flags & wanted, wanted, "flags {flags:#x}");
    assert_eq!(flags & transmission_flags::READ_ONLY, 0);

    let sizes = &replies[1];
    assert_eq!(sizes.reply_type, option_reply::INFO);
    assert_eq!(sizes.data.len(), 14);
    assert_eq!(be_u16(&sizes.data, 0), info::BLOCK_SIZE);
    assert_eq!(be_u32(&sizes.data, 2), 1);
    assert_eq!(be_u32(&sizes.data, 6), 4096);
    assert_eq!(be_u32(&sizes.data, 10), 32 << 20);

    assert_eq!(replies[2].reply_type, option_reply::ACK);
    assert!(replies[2].data.is_empty());

    // Transmission: a read reaches the volume and is answered.
    h.feed_all(conn, &req(command::READ, 0, 7, 0, 512));
    assert_eq!(h.issued, vec!["read 0+512".to_string()]);
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 7);
    assert_eq!(replies[0].simple_error(), 0);
}

#[test]
fn go_without_block_size_request_sends_no_block_size_info() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    // The empty name selects the export too (nbd-client sends GO with no info requests).
    h.feed_all(conn, &opt(option::GO, &info_payload("", &[])));
    let replies = h.option_replies(conn);
    let types: Vec<u32> = replies.iter().map(|r| r.reply_type).collect();
    assert_eq!(types, vec![option_reply::INFO, option_reply::ACK]);
    assert_eq!(be_u16(&replies[0].data, 0), info::EXPORT);
}

#[test]
fn go_for_an_unknown_export_fails_and_the_handshake_continues() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::GO, &info_payload("other", &[])));
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, option_reply::ERR_UNKNOWN);
    assert_eq!(h.close_count(conn), 0);
    h.feed_all(conn, &opt(option::GO, &info_payload(EXPORT_NAME, &[])));
    let replies = h.option_replies(conn);
    assert_eq!(replies.last().unwrap().reply_type, option_reply::ACK);
    h.feed_all(conn, &req(command::FLUSH, 0, 1, 0, 0));
    assert_eq!(h.issued, vec!["flush".to_string()]);
}

#[test]
fn export_name_replies_size_flags_and_124_zero_bytes() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::EXPORT_NAME, EXPORT_NAME.as_bytes()));
    let sent = h.take_sent(conn).concat();
    assert_eq!(sent.len(), 8 + 2 + 124);
    assert_eq!(be_u64(&sent, 0), DISK_BYTES);
    let flags = be_u16(&sent, 8);
    assert_ne!(flags & transmission_flags::HAS_FLAGS, 0);
    assert_ne!(flags & transmission_flags::SEND_FLUSH, 0);
    assert!(sent[10..].iter().all(|b| *b == 0));
    h.feed_all(conn, &req(command::READ, 0, 3, 4096, 4096));
    assert_eq!(h.issued, vec!["read 4096+4096".to_string()]);
}

#[test]
fn export_name_omits_the_zeroes_when_the_client_set_no_zeroes() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    let flags = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
    h.feed_all(conn, &client_flags_bytes(flags));
    h.feed_all(conn, &opt(option::EXPORT_NAME, b""));
    let sent = h.take_sent(conn).concat();
    assert_eq!(sent.len(), 10);
    assert_eq!(be_u64(&sent, 0), DISK_BYTES);
    h.feed_all(conn, &req(command::FLUSH, 0, 1, 0, 0));
    assert_eq!(h.issued, vec!["flush".to_string()]);
}

#[test]
fn export_name_for_an_unknown_export_closes_the_connection() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::EXPORT_NAME, b"other"));
    assert!(h.take_sent(conn).is_empty());
    assert_eq!(h.close_count(conn), 1);
}

#[test]
fn unknown_option_is_refused_after_its_payload_and_the_next_option_works() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    let unknown = opt(42, b"some payload that is not ours");
    // Nothing is answered before the whole payload arrived.
    h.feed_all(conn, &unknown[..unknown.len() - 1]);
    assert!(h.take_sent(conn).is_empty());
    h.feed_all(conn, &unknown[unknown.len() - 1..]);
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].option, 42);
    assert_eq!(replies[0].reply_type, option_reply::ERR_UNSUP);
    h.feed_all(conn, &opt(option::GO, &info_payload(EXPORT_NAME, &[])));
    let replies = h.option_replies(conn);
    assert_eq!(replies.last().unwrap().reply_type, option_reply::ACK);
    assert_eq!(h.close_count(conn), 0);
}

#[test]
fn oversized_option_payload_is_skipped_unstored_and_answered_too_big() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    let length = NBD_OPTION_PAYLOAD_BYTES_MAX as usize + 1;
    let big = opt(option::INFO, &vec![0xab; length]);
    let (header, payload) = big.split_at(wire::OPTION_HEADER_LEN);
    h.feed_all(conn, header);
    for piece in payload[..length - 1].chunks(1000) {
        h.feed_all(conn, piece);
        let session = h.server.sessions[conn.slot as usize].as_ref().unwrap();
        assert!(
            matches!(session.phase, Phase::OptionSkip { .. }),
            "payload is skipped, not stored: {:?}",
            session.phase
        );
    }
    assert!(
        h.take_sent(conn).is_empty(),
        "no reply before the payload ends"
    );
    h.feed_all(conn, &payload[length - 1..]);
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].option, option::INFO);
    assert_eq!(replies[0].reply_type, option_reply::ERR_TOO_BIG);
    h.feed_all(conn, &opt(option::GO, &info_payload(EXPORT_NAME, &[])));
    assert_eq!(
        h.option_replies(conn).last().unwrap().reply_type,
        option_reply::ACK
    );
}

#[test]
fn option_claiming_more_than_the_skip_limit_closes_at_once() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    let mut header = opt(option::INFO, &[]);
    header[12..16].copy_from_slice(&(NBD_OPTION_SKIP_BYTES_MAX + 1).to_be_bytes());
    h.feed_all(conn, &header);
    assert_eq!(h.close_count(conn), 1);
    assert!(h.take_sent(conn).is_empty());
    assert_eq!(h.server.counters().protocol_violations, 1);
}

/// Runs `script` through a fresh server, `step` bytes per `handle_bytes`, answering volume
/// requests at the end; returns every message, close and volume request seen.
fn run_script(script: &[u8], step: usize) -> (Vec<Vec<u8>>, usize, Vec<String>) {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    for piece in script.chunks(step) {
        h.feed_all(conn, piece);
    }
    h.complete_all();
    let closes = h.close_count(conn);
    (h.take_sent(conn), closes, h.issued)
}

#[test]
fn bytes_fed_one_at_a_time_get_the_same_answers_as_all_at_once() {
    let mut script = client_flags_bytes(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    script.extend(opt(42, b"xyz"));
    script.extend(opt(option::LIST, &[]));
    script.extend(opt(option::STRUCTURED_REPLY, &[]));
    let meta = meta_payload("", &[wire::BASE_ALLOCATION]);
    script.extend(opt(option::SET_META_CONTEXT, &meta));
    let go = info_payload(EXPORT_NAME, &[info::BLOCK_SIZE, info::NAME]);
    script.extend(opt(option::GO, &go));
    script.extend(write_req(command_flags::FUA, 1, 8192, &pattern(3000, 9)));
    script.extend(req(command::READ, 0, 2, 8192, 3000));
    script.extend(req(command::BLOCK_STATUS, 0, 3, 0, 16384));
    script.extend(req(command::READ, 0, 4, DISK_BYTES, 1));
    script.extend(req(command::DISC, 0, 5, 0, 0));

    let whole = run_script(&script, script.len());
    let split = run_script(&script, 1);
    assert_eq!(whole, split);
    // And the run did something: ERR_UNSUP, LIST (2), STRUCTURED, META (2), GO (4), 4 replies.
    assert_eq!(whole.0.len(), 1 + 2 + 1 + 2 + 4 + 4);
    assert_eq!(whole.1, 1, "closed after DISC");
    assert_eq!(whole.2.len(), 3, "{:?}", whole.2);
}

#[test]
fn list_names_the_export_then_acks() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::LIST, &[]));
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].reply_type, option_reply::SERVER);
    let data = &replies[0].data;
    let name_len = be_u32(data, 0) as usize;
    assert_eq!(&data[4..4 + name_len], b"tandem");
    assert_eq!(&data[4 + name_len..], EXPORT_DESCRIPTION.as_bytes());
    assert_eq!(replies[1].reply_type, option_reply::ACK);
    assert_eq!(h.close_count(conn), 0);
}

#[test]
fn abort_is_acknowledged_then_the_connection_closes() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::ABORT, &[]));
    // The ACK is queued before the Close.
    assert!(
        matches!(&h.events[..], [Event::Sent(c, _), Event::Closed(d)] if *c == conn && *d == conn)
    );
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(
        (replies[0].option, replies[0].reply_type),
        (option::ABORT, option_reply::ACK)
    );
}

// ---- metadata contexts ----------------------------------------------------------------------

#[test]
fn set_meta_context_after_structured_replies_selects_base_allocation() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::STRUCTURED_REPLY, &[]));
    let replies = h.option_replies(conn);
    assert_eq!(replies[0].reply_type, option_reply::ACK);
    let payload = meta_payload(EXPORT_NAME, &[wire::BASE_ALLOCATION]);
    h.feed_all(conn, &opt(option::SET_META_CONTEXT, &payload));
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].reply_type, option_reply::META_CONTEXT);
    assert_eq!(replies[0].option, option::SET_META_CONTEXT);
    let id = be_u32(&replies[0].data, 0);
    assert_ne!(id, 0);
    assert_eq!(&replies[0].data[4..], b"base:allocation");
    assert_eq!(replies[1].reply_type, option_reply::ACK);

    // The id is the one BLOCK_STATUS replies carry.
    h.feed_all(conn, &opt(option::GO, &info_payload("", &[])));
    h.take_sent(conn);
    h.feed_all(conn, &req(command::BLOCK_STATUS, 0, 9, 0, 4096));
    h.complete_all();
    let replies = h.replies(conn);
    let Reply::Chunk { payload, .. } = &replies[0] else {
        panic!("expected a chunk: {replies:?}");
    };
    assert_eq!(block_status_descriptors(payload).0, id);
}

#[test]
fn set_meta_context_before_structured_replies_is_invalid() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    let payload = meta_payload(EXPORT_NAME, &[wire::BASE_ALLOCATION]);
    h.feed_all(conn, &opt(option::SET_META_CONTEXT, &payload));
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, option_reply::ERR_INVALID);
    assert_eq!(h.close_count(conn), 0);
}

#[test]
fn list_meta_context_without_queries_lists_base_allocation() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(
        conn,
        &opt(option::LIST_META_CONTEXT, &meta_payload("", &[])),
    );
    let replies = h.option_replies(conn);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].reply_type, option_reply::META_CONTEXT);
    assert_eq!(&replies[0].data[4..], b"base:allocation");
    assert_eq!(replies[1].reply_type, option_reply::ACK);
}

// ---- transmission ---------------------------------------------------------------------------

#[test]
fn write_then_read_round_trips_with_simple_replies() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    let data = pattern(8192, 1);
    h.feed_all(conn, &write_req(0, 11, 4096, &data));
    assert!(
        h.take_sent(conn).is_empty(),
        "no reply before the volume finished"
    );
    h.complete_all();
    assert_eq!(&h.disk[4096..4096 + 8192], data.as_slice());
    let replies = h.replies(conn);
    assert_eq!(
        replies,
        vec![Reply::Simple {
            error: 0,
            cookie: 11,
            data: vec![]
        }]
    );

    h.feed_all(conn, &req(command::READ, 0, 12, 4096, 8192));
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(
        replies,
        vec![Reply::Simple {
            error: 0,
            cookie: 12,
            data: data.clone()
        }]
    );
    let counters = h.server.counters();
    assert_eq!((counters.writes, counters.reads), (1, 1));
    assert_eq!((counters.written_bytes, counters.read_bytes), (8192, 8192));
}

#[test]
fn write_then_read_round_trips_with_structured_replies() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(true, false);
    let data = pattern(5000, 2);
    h.feed_all(conn, &write_req(0, 21, 12288, &data));
    h.complete_all();
    // Non-read replies may stay simple.
    assert_eq!(h.replies(conn)[0].simple_error(), 0);
    h.feed_all(conn, &req(command::READ, 0, 22, 12288, 5000));
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    let Reply::Chunk {
        flags,
        chunk_type,
        cookie,
        payload,
    } = &replies[0]
    else {
        panic!("a structured read must be answered with a chunk: {replies:?}");
    };
    assert_eq!(*flags, chunk::FLAG_DONE);
    assert_eq!(*chunk_type, chunk::OFFSET_DATA);
    assert_eq!(*cookie, 22);
    assert_eq!(be_u64(payload, 0), 12288);
    assert_eq!(&payload[8..], data.as_slice());
}

#[test]
fn fua_write_asks_the_volume_for_a_durable_write() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &write_req(command_flags::FUA, 1, 0, &pattern(512, 3)));
    h.feed_all(conn, &write_req(0, 2, 512, &pattern(512, 4)));
    assert!(matches!(
        h.pending[0].1,
        VolumeRequest::Write {
            offset: 0,
            fua: true,
            ..
        }
    ));
    assert!(matches!(
        h.pending[1].1,
        VolumeRequest::Write {
            offset: 512,
            fua: false,
            ..
        }
    ));
}

#[test]
fn flush_is_answered_only_after_the_volume_finishes_it() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::FLUSH, 0, 77, 0, 0));
    assert_eq!(h.pending.len(), 1);
    assert!(matches!(h.pending[0].1, VolumeRequest::Flush));
    assert!(h.take_sent(conn).is_empty());
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 77);
    assert_eq!(replies[0].simple_error(), 0);
    assert_eq!(h.server.counters().flushes, 1);
}

#[test]
fn trim_and_write_zeroes_reach_the_volume_with_their_flags() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::TRIM, command_flags::FUA, 1, 0, 8192));
    let flags = command_flags::NO_HOLE | command_flags::FUA;
    h.feed_all(conn, &req(command::WRITE_ZEROES, flags, 2, 8192, 4096));
    h.feed_all(conn, &req(command::WRITE_ZEROES, 0, 3, 12288, 4096));
    assert_eq!(
        h.issued,
        vec![
            "trim 0+8192 fua=true".to_string(),
            "zeroes 8192+4096 dealloc=false fua=true".to_string(),
            "zeroes 12288+4096 dealloc=true fua=false".to_string(),
        ]
    );
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(
        replies.iter().map(Reply::cookie).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(replies.iter().all(|r| r.simple_error() == 0));
}

// ---- validation -----------------------------------------------------------------------------

/// Sends one request header on a fresh simple-reply connection; returns its only reply.
fn reply_to(header: &[u8]) -> (Harness, Reply) {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, header);
    let mut replies = h.replies(conn);
    assert_eq!(replies.len(), 1, "{replies:?}");
    (h, replies.remove(0))
}

#[test]
fn read_past_the_end_is_einval_without_a_volume_request() {
    let (h, reply) = reply_to(&req(command::READ, 0, 5, DISK_BYTES - 512, 1024));
    assert_eq!(reply.cookie(), 5);
    assert_eq!(reply.simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
    assert_eq!(h.in_flight_bytes(), 0);
    // An offset that overflows when the length is added is past the end too.
    let (h, reply) = reply_to(&req(command::READ, 0, 6, u64::MAX - 10, 512));
    assert_eq!(reply.simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
}

#[test]
fn write_past_the_end_consumes_its_payload_and_is_enospc() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    let mut bytes = write_req(0, 8, DISK_BYTES - 4096, &pattern(8192, 5));
    bytes.extend(req(command::FLUSH, 0, 9, 0, 0));
    h.feed_all(conn, &bytes);
    assert_eq!(h.issued, vec!["flush".to_string()], "only the flush");
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 8);
    assert_eq!(replies[0].simple_error(), errno::ENOSPC);
    assert_eq!(h.close_count(conn), 0);
}

#[test]
fn zero_length_read_is_einval() {
    let (h, reply) = reply_to(&req(command::READ, 0, 1, 0, 0));
    assert_eq!(reply.simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
}

#[test]
fn unknown_command_is_einval_and_the_connection_goes_on() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(42, 0, 3, 0, 4096));
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 3);
    assert_eq!(replies[0].simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
    h.feed_all(conn, &req(command::FLUSH, 0, 4, 0, 0));
    assert_eq!(h.issued, vec!["flush".to_string()]);
}

#[test]
fn unknown_command_flag_is_einval() {
    let (h, reply) = reply_to(&req(command::READ, 1 << 12, 3, 0, 4096));
    assert_eq!(reply.simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
    let (h, reply) = reply_to(&req(command::FLUSH, command_flags::REQ_ONE, 4, 0, 0));
    assert_eq!(reply.simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
}

/// NBD spec, command flags: FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been
/// negotiated, in which case the server MUST accept all commands with this bit set (even by
/// ignoring the bit)". qemu's NBD client is known to send FLUSH with FUA.
#[test]
fn fua_flag_is_accepted_on_every_command_since_send_fua_is_advertised() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::FLUSH, command_flags::FUA, 1, 0, 0));
    h.feed_all(conn, &req(command::READ, command_flags::FUA, 2, 0, 4096));
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 2);
    for reply in &replies {
        assert_eq!(reply.simple_error(), 0, "{reply:?}");
    }
    assert_eq!(
        h.issued,
        vec!["flush".to_string(), "read 0+4096".to_string()]
    );
}

/// The same spec rule covers DISC: with FUA set it is still a disconnect (which has no reply).
#[test]
fn disconnect_with_the_fua_flag_still_disconnects() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::DISC, command_flags::FUA, 1, 0, 0));
    assert!(h.take_sent(conn).is_empty(), "DISC has no reply");
    assert_eq!(h.close_count(conn), 1);
}

#[test]
fn write_longer_than_the_payload_limit_is_skipped_without_a_buffer_and_einval() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    let length = NBD_PAYLOAD_BYTES_MAX + 4096;
    h.feed_all(conn, &req(command::WRITE, 0, 31, 0, length));
    let piece = vec![0x5a; 1 << 20];
    let mut remaining = length as usize;
    while remaining > 0 {
        let n = remaining.min(piece.len());
        h.feed_all(conn, &piece[..n]);
        remaining -= n;
        assert_eq!(h.in_flight_bytes(), 0, "no buffer for a refused write");
        assert_eq!(h.server.in_flight_count(), 0);
        if remaining > 0 {
            assert!(
                h.take_sent(conn).is_empty(),
                "answered only after the payload"
            );
        }
    }
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 31);
    assert_eq!(replies[0].simple_error(), errno::EINVAL);
    assert!(h.issued.is_empty());
    // In step again: the next request is parsed from the right byte.
    h.feed_all(conn, &req(command::FLUSH, 0, 32, 0, 0));
    assert_eq!(h.issued, vec!["flush".to_string()]);
}

#[test]
fn block_status_without_a_negotiated_meta_context_is_einval() {
    let mut h = Harness::new(DISK_BYTES);
    // Structured replies are on (BLOCK_STATUS needs them), so the refusal is an error chunk:
    // the spec allows no simple reply to BLOCK_STATUS.
    let conn = h.transmission(true, false);
    h.feed_all(conn, &req(command::BLOCK_STATUS, 0, 4, 0, 4096));
    assert!(h.issued.is_empty());
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 4);
    match &replies[0] {
        Reply::Chunk {
            flags,
            chunk_type,
            payload,
            ..
        } => {
            assert_eq!(*chunk_type, chunk::ERROR);
            assert_eq!(*flags & chunk::FLAG_DONE, chunk::FLAG_DONE);
            assert_eq!(&payload[0..4], &errno::EINVAL.to_be_bytes());
        }
        other => panic!("expected an error chunk, got {other:?}"),
    }
}

#[test]
fn structured_read_error_is_an_error_chunk() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(true, false);
    h.feed_all(conn, &req(command::READ, 0, 40, 0, 4096));
    h.fail_next = Some(errno::EIO);
    h.complete_all();
    // A rejected read is answered the same way.
    h.feed_all(conn, &req(command::READ, 0, 41, DISK_BYTES, 4096));
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 2);
    for (reply, (cookie, error)) in replies.iter().zip([(40, errno::EIO), (41, errno::EINVAL)]) {
        let Reply::Chunk {
            flags,
            chunk_type,
            cookie: c,
            payload,
        } = reply
        else {
            panic!("structured reads must not get simple replies: {reply:?}");
        };
        assert_eq!(*flags, chunk::FLAG_DONE);
        assert_eq!(*chunk_type, chunk::ERROR);
        assert_eq!(*c, cookie);
        assert!(payload.len() >= 6);
        assert_eq!(be_u32(payload, 0), error);
        assert_eq!(be_u16(payload, 4) as usize, payload.len() - 6);
    }
    assert_eq!(h.in_flight_bytes(), 0, "the failed read's buffer came back");
}

#[test]
fn simple_write_error_reports_the_volume_error() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &write_req(0, 50, 0, &pattern(4096, 6)));
    h.fail_next = Some(errno::ENOSPC);
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].simple_error(), errno::ENOSPC);
    assert_eq!(h.server.counters().writes, 0);
    assert_eq!(h.in_flight_bytes(), 0);
}

#[test]
fn a_failed_volume_request_counts_one_error() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::READ, 0, 1, 0, 4096));
    h.fail_next = Some(errno::EIO);
    h.complete_all();
    assert_eq!(h.replies(conn).len(), 1);
    assert_eq!(
        h.server.counters().errors,
        1,
        "one request answered with an error"
    );
}

// ---- back-pressure --------------------------------------------------------------------------

#[test]
fn requests_past_the_per_connection_limit_wait_until_one_completes() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    let mut bytes = Vec::new();
    for cookie in 0..=NBD_REQUESTS_PER_CONNECTION_MAX as u64 {
        bytes.extend(req(command::READ, 0, cookie, 0, 4096));
    }
    let limit_bytes = NBD_REQUESTS_PER_CONNECTION_MAX * wire::REQUEST_LEN;
    assert_eq!(h.feed(conn, &bytes), limit_bytes, "the last request waits");
    assert_eq!(h.server.in_flight_count(), NBD_REQUESTS_PER_CONNECTION_MAX);
    assert_eq!(h.pending.len(), NBD_REQUESTS_PER_CONNECTION_MAX);
    // Offered again without a completion: still nothing.
    assert_eq!(h.feed(conn, &bytes[limit_bytes..]), 0);
    // Another connection is not held back.
    let other = h.transmission(false, false);
    h.feed_all(other, &req(command::FLUSH, 0, 1, 0, 0));

    h.complete(0);
    assert_eq!(h.replies(conn).len(), 1);
    h.feed_all(conn, &bytes[limit_bytes..]);
    assert_eq!(
        h.server.in_flight_count(),
        NBD_REQUESTS_PER_CONNECTION_MAX + 1
    );
    h.complete_all();
    assert_eq!(h.replies(conn).len(), NBD_REQUESTS_PER_CONNECTION_MAX);
    assert_eq!(h.server.in_flight_count(), 0);
    assert_eq!(h.in_flight_bytes(), 0);
}

#[test]
fn requests_past_the_byte_budget_wait_until_a_write_completes() {
    const WRITE_BYTES: usize = 16 << 20;
    const _: () = assert!(2 * WRITE_BYTES == IN_FLIGHT_BYTES_MAX);
    let mut h = Harness::new(WRITE_BYTES as u64);
    let conns = [
        h.transmission(false, false),
        h.transmission(false, false),
        h.transmission(false, false),
    ];
    let data = pattern(WRITE_BYTES, 7);
    let writes: Vec<Vec<u8>> = (0..3).map(|i| write_req(0, i, 0, &data)).collect();
    h.feed_all(conns[0], &writes[0]);
    h.feed_all(conns[1], &writes[1]);
    assert_eq!(h.pending.len(), 2);
    assert_eq!(h.in_flight_bytes(), IN_FLIGHT_BYTES_MAX);
    // The third write's header is not taken: no buffer fits.
    assert_eq!(h.feed(conns[2], &writes[2]), 0);
    assert_eq!(h.server.in_flight_count(), 2);

    h.complete(0);
    assert_eq!(h.replies(conns[0]).len(), 1);
    h.feed_all(conns[2], &writes[2]);
    assert_eq!(h.pending.len(), 2);
    h.complete_all();
    assert_eq!(h.replies(conns[1]).len(), 1);
    assert_eq!(h.replies(conns[2]).len(), 1);
    assert_eq!(h.in_flight_bytes(), 0);
}

/// A BLOCK_STATUS reply takes a buffer from the pool when it completes. If, meanwhile, the
/// budget was filled by writes (admitted because BLOCK_STATUS reserves nothing), taking it
/// must not trip the pool's budget assertion: bytes from a network must never panic.
#[test]
fn block_status_completing_while_the_byte_budget_is_spent_is_answered() {
    const WRITE_BYTES: usize = 16 << 20;
    let mut h = Harness::new(WRITE_BYTES as u64);
    let status_conn = h.transmission(true, true);
    h.feed_all(status_conn, &req(command::BLOCK_STATUS, 0, 1, 0, 4096));
    let data = pattern(WRITE_BYTES, 8);
    let a = h.transmission(false, false);
    let b = h.transmission(false, false);
    h.feed_all(a, &write_req(0, 2, 0, &data));
    h.feed_all(b, &write_req(0, 3, 0, &data));
    assert_eq!(h.in_flight_bytes(), IN_FLIGHT_BYTES_MAX);
    h.complete(0); // the MapExtents
    let replies = h.replies(status_conn);
    assert_eq!(replies.len(), 1);
    assert!(matches!(
        replies[0],
        Reply::Chunk {
            chunk_type: chunk::BLOCK_STATUS,
            ..
        }
    ));
}

#[test]
fn buffer_budget_returns_to_zero_after_a_flow() {
    let mut h = Harness::new(DISK_BYTES);
    // Handshake replies (LIST, an error with a message, EXPORT_NAME and its zero padding) fit
    // in heads: none of them takes a buffer from the pool.
    let conn = h.connect();
    h.feed_all(conn, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    h.feed_all(conn, &opt(option::LIST, &[]));
    h.feed_all(conn, &opt(99, &[]));
    h.feed_all(conn, &opt(option::EXPORT_NAME, b"tandem"));
    assert_eq!(
        h.take_sent(conn).len(),
        5,
        "SERVER, ACK, ERR_UNSUP, export reply, zero padding"
    );
    assert_eq!(
        h.in_flight_bytes(),
        0,
        "handshake replies took pool buffers"
    );
    let structured = h.transmission(true, true);
    for (c, base) in [(conn, 0u64), (structured, 1 << 16)] {
        h.feed_all(c, &write_req(0, 1, base, &pattern(20000, 1)));
        h.feed_all(c, &req(command::READ, 0, 2, base, 20000));
        h.feed_all(c, &req(command::READ, 0, 3, base, 4096));
        h.feed_all(c, &req(command::FLUSH, 0, 4, 0, 0));
    }
    h.feed_all(structured, &req(command::BLOCK_STATUS, 0, 5, 0, 65536));
    assert!(h.in_flight_bytes() > 0);
    h.fail_next = Some(errno::EIO);
    h.complete_all();
    assert_eq!(h.replies(conn).len(), 4);
    assert_eq!(h.replies(structured).len(), 5);
    assert_eq!(h.server.in_flight_count(), 0);
    assert_eq!(h.in_flight_bytes(), 0);
}

// ---- connections ----------------------------------------------------------------------------

#[test]
fn bad_request_magic_closes_that_connection_while_another_keeps_being_served() {
    let mut h = Harness::new(DISK_BYTES);
    let bad = h.transmission(false, false);
    let good = h.transmission(false, false);
    let mut header = req(command::READ, 0, 1, 0, 4096);
    header[0] ^= 0xff;
    h.feed_all(bad, &header);
    assert_eq!(h.close_count(bad), 1);
    assert!(h.take_sent(bad).is_empty());
    assert_eq!(h.server.counters().protocol_violations, 1);
    // Whatever else arrives on it is ignored.
    h.feed_all(bad, &req(command::READ, 0, 2, 0, 4096));
    assert!(h.issued.is_empty());

    h.feed_all(good, &req(command::READ, 0, 3, 0, 4096));
    h.complete_all();
    let replies = h.replies(good);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].simple_error(), 0);
    assert_eq!(h.close_count(good), 0);
    h.server.handle_closed(bad);
    assert_eq!(h.server.session_count(), 1);
}

/// After a protocol violation the server asks for a Close; the session is not marked closed, so
/// a later completion still queues a reply (after the Close) and `finish_drain` asks for a
/// second Close.
#[test]
fn bad_request_magic_with_requests_in_flight_closes_exactly_once() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::READ, 0, 1, 0, 4096));
    let mut header = req(command::READ, 0, 2, 0, 4096);
    header[1] = 0;
    h.feed_all(conn, &header);
    assert_eq!(h.close_count(conn), 1);
    h.complete_all();
    let kinds: Vec<&str> = h
        .events
        .iter()
        .map(|e| match e {
            Event::Sent(..) => "send",
            Event::Closed(..) => "close",
        })
        .collect();
    assert_eq!(
        kinds,
        ["close"],
        "nothing after the Close, and one Close only"
    );
    assert_eq!(h.server.in_flight_count(), 0);
    assert_eq!(h.in_flight_bytes(), 0);
    h.server.handle_closed(conn);
    assert_eq!(h.server.session_count(), 0);
}

#[test]
fn connections_past_the_limit_are_greeted_but_refused_at_go() {
    let mut h = Harness::new(DISK_BYTES);
    for _ in 0..NBD_CONNECTION_COUNT_MAX {
        h.connect();
    }
    let refused = h.connect();
    h.feed_all(refused, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    // INFO is still answered; GO is refused by policy, with a message.
    h.feed_all(refused, &opt(option::INFO, &info_payload("", &[])));
    assert_eq!(
        h.option_replies(refused).last().unwrap().reply_type,
        option_reply::ACK
    );
    h.feed_all(refused, &opt(option::GO, &info_payload("", &[])));
    let replies = h.option_replies(refused);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, option_reply::ERR_POLICY);
    assert_ne!(replies[0].reply_type & (1 << 31), 0);
    assert!(!replies[0].data.is_empty(), "a message for the user");
    assert!(std::str::from_utf8(&replies[0].data).is_ok());
    // Never served: a request is not one during the handshake, and the client is dropped,
    // which frees its slot once the runtime lets go of the socket.
    h.feed_all(refused, &req(command::FLUSH, 0, 1, 0, 0));
    assert!(h.issued.is_empty());
    assert_eq!(h.close_count(refused), 1);

    for _ in 0..NBD_REFUSED_CONNECTION_COUNT_MAX {
        h.connect();
    }
    assert!(h.server.handle_connected(Instant::from_millis(0)).is_none());
    let counters = h.server.counters();
    assert_eq!(
        counters.connections_accepted,
        NBD_CONNECTION_COUNT_MAX as u64
    );
    // The refusal slots were filled twice over by one client: the one dropped above.
    assert_eq!(
        counters.connections_refused,
        NBD_REFUSED_CONNECTION_COUNT_MAX as u64 + 1
    );
    // A closed served connection makes room for a served one.
    h.server.handle_closed(ConnId {
        slot: 0,
        generation: 1,
    });
    let conn = h.connect();
    h.handshake(conn, false, false);
}

#[test]
fn disconnect_closes_only_after_in_flight_requests_are_answered() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::READ, 0, 1, 0, 4096));
    h.feed_all(conn, &req(command::READ, 0, 2, 4096, 4096));
    h.feed_all(conn, &req(command::DISC, 0, 3, 0, 0));
    assert_eq!(h.close_count(conn), 0);
    h.complete(0);
    assert_eq!(h.close_count(conn), 0);
    h.complete(0);
    assert_eq!(h.close_count(conn), 1);
    // Both replies were queued before the Close, and DISC itself got none.
    let order: Vec<Option<u64>> = h
        .events
        .iter()
        .map(|e| match e {
            Event::Sent(_, bytes) => Some(parse_reply(bytes).cookie()),
            Event::Closed(_) => None,
        })
        .collect();
    assert_eq!(order, vec![Some(1), Some(2), None]);
    assert_eq!(h.server.session_count(), 0);
}

#[test]
fn disconnect_with_nothing_in_flight_closes_at_once() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::DISC, 0, 3, 0, 0));
    assert_eq!(h.close_count(conn), 1);
    assert!(h.take_sent(conn).is_empty());
}

#[test]
fn closing_mid_write_payload_releases_the_buffer_and_frees_the_slot() {
    let mut h = Harness::new(DISK_BYTES);
    let old = h.transmission(false, false);
    let bytes = write_req(0, 1, 0, &pattern(8192, 1));
    h.feed_all(old, &bytes[..wire::REQUEST_LEN + 4096]);
    assert_eq!(h.server.in_flight_count(), 1);
    assert!(h.in_flight_bytes() > 0);
    h.server.handle_closed(old);
    h.pump();
    assert_eq!(h.server.in_flight_count(), 0);
    assert_eq!(h.in_flight_bytes(), 0);
    assert_eq!(h.server.session_count(), 0);
    assert!(h.issued.is_empty(), "a half-received write is never issued");

    let new = h.transmission(false, false);
    assert_eq!(new.slot, old.slot);
    assert_ne!(new.generation, old.generation);
    // The old id reaches nothing.
    assert_eq!(h.feed(old, &bytes[wire::REQUEST_LEN + 4096..]), 4096);
    h.feed_all(old, &req(command::FLUSH, 0, 2, 0, 0));
    h.server.handle_closed(old);
    h.pump();
    assert!(h.issued.is_empty());
    assert!(h.events.is_empty());
    assert_eq!(h.server.session_count(), 1);
    h.feed_all(new, &req(command::FLUSH, 0, 3, 0, 0));
    assert_eq!(h.pending.len(), 1);
}

#[test]
fn completions_after_close_send_nothing_and_the_slot_is_reused_with_a_new_generation() {
    let mut h = Harness::new(DISK_BYTES);
    let old = h.transmission(false, false);
    h.feed_all(old, &req(command::READ, 0, 1, 0, 4096));
    h.feed_all(old, &write_req(0, 2, 0, &pattern(4096, 2)));
    h.feed_all(old, &req(command::FLUSH, 0, 3, 0, 0));
    h.server.handle_closed(old);
    assert_eq!(h.server.in_flight_count(), 3);
    assert_eq!(
        h.server.session_count(),
        1,
        "kept until its requests finish"
    );
    let other = h.transmission(false, false);
    assert_ne!(other.slot, old.slot);

    h.fail_next = Some(errno::EIO);
    h.complete_all();
    assert!(
        h.events.is_empty(),
        "nothing sent or closed: {:?}",
        h.events
    );
    assert_eq!(h.server.in_flight_count(), 0);
    assert_eq!(h.in_flight_bytes(), 0);
    assert_eq!(h.server.session_count(), 1);

    let new = h.transmission(false, false);
    assert_eq!(new.slot, old.slot);
    assert_ne!(new.generation, old.generation);
    h.feed_all(old, &req(command::READ, 0, 4, 0, 4096));
    assert!(h.pending.is_empty());
    h.feed_all(new, &req(command::READ, 0, 5, 0, 4096));
    h.complete_all();
    assert!(h.take_sent(old).is_empty());
    let replies = h.replies(new);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].cookie(), 5);
}

#[test]
fn handshake_timeout_closes_a_stalled_client_at_the_deadline_only() {
    let mut h = Harness::new(DISK_BYTES);
    assert_eq!(h.server.poll_timeout(), None);
    let stalled = h.connect_at(Instant::from_millis(1000));
    h.feed_all(stalled, &client_flags_bytes(client_flags::FIXED_NEWSTYLE));
    let served = h.connect_at(Instant::from_millis(2000));
    let deadline = Instant::from_millis(1000 + NBD_HANDSHAKE_TIMEOUT_MS);
    assert_eq!(h.server.poll_timeout(), Some(deadline));
    h.handshake(served, false, false);
    assert_eq!(h.server.poll_timeout(), Some(deadline));

    h.server
        .handle_timeout(Instant::from_millis(1000 + NBD_HANDSHAKE_TIMEOUT_MS - 1));
    h.pump();
    assert_eq!(h.close_count(stalled), 0);
    h.server.handle_timeout(deadline);
    h.pump();
    assert_eq!(h.close_count(stalled), 1);
    assert_eq!(h.server.poll_timeout(), None);
    // Much later: the client in transmission is never timed out, the closed one not twice.
    h.server.handle_timeout(Instant::from_millis(1_000_000));
    h.pump();
    assert_eq!(h.close_count(served), 0);
    assert_eq!(h.close_count(stalled), 1);
}

// ---- block status ---------------------------------------------------------------------------

#[test]
fn block_status_reports_holes_and_data_capped_to_the_request() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(true, true);
    h.feed_all(conn, &write_req(0, 1, 4096, &pattern(4096, 1)));
    h.complete_all();
    h.take_sent(conn);
    h.feed_all(conn, &req(command::BLOCK_STATUS, 0, 2, 0, 12288));
    assert_eq!(h.issued.last().unwrap(), "map 0+12288");
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1);
    let Reply::Chunk {
        flags,
        chunk_type,
        cookie,
        payload,
    } = &replies[0]
    else {
        panic!("expected a chunk: {replies:?}");
    };
    assert_eq!(*flags, chunk::FLAG_DONE);
    assert_eq!(*chunk_type, chunk::BLOCK_STATUS);
    assert_eq!(*cookie, 2);
    let hole = allocation::HOLE | allocation::ZERO;
    let (_, descriptors) = block_status_descriptors(payload);
    assert_eq!(descriptors, vec![(4096, hole), (4096, 0), (4096, hole)]);
}

#[test]
fn block_status_with_req_one_reports_one_descriptor() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h.transmission(true, true);
    h.feed_all(conn, &write_req(0, 1, 8192, &pattern(4096, 1)));
    h.complete_all();
    h.take_sent(conn);
    h.feed_all(
        conn,
        &req(command::BLOCK_STATUS, command_flags::REQ_ONE, 2, 0, 65536),
    );
    h.complete_all();
    let replies = h.replies(conn);
    let Reply::Chunk { payload, .. } = &replies[0] else {
        panic!("expected a chunk: {replies:?}");
    };
    let (_, descriptors) = block_status_descriptors(payload);
    let hole = allocation::HOLE | allocation::ZERO;
    assert_eq!(descriptors, vec![(8192, hole)]);
}

// ---- random streams -------------------------------------------------------------------------

const FUZZ_DISK_BYTES: u64 = 256 << 10;

#[derive(Debug, Clone)]
enum Frame {
    Request {
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
    },
    /// Bytes that do not start with the request magic.
    Garbage(Vec<u8>),
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let request = (
        0u16..10,
        prop_oneof![Just(0u16), 0u16..32, any::<u16>()],
        prop_oneof![0..FUZZ_DISK_BYTES, any::<u64>()],
        prop_oneof![1u32..20000, Just(0u32), any::<u32>()],
    )
        .prop_map(|(cmd, flags, offset, length)| {
            if cmd == command::DISC {
                return Frame::Request {
                    cmd,
                    flags: 0,
                    offset: 0,
                    length: 0,
                };
            }
            // Keep write payloads small enough to feed.
            let length = if cmd == command::WRITE {
                length % 20000
            } else {
                length
            };
            Frame::Request {
                cmd,
                flags,
                offset,
                length,
            }
        });
    // At least a whole header: fewer bytes are only the start of a request the server waits for.
    let garbage = proptest::collection::vec(any::<u8>(), 28..60).prop_map(|mut bytes| {
        if bytes[0] == 0x25 {
            bytes[0] = 0;
        }
        Frame::Garbage(bytes)
    });
    prop_oneof![30 => request, 1 => garbage]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_streams_after_go_get_one_reply_per_request_or_a_close(
        structured in any::<bool>(),
        base_allocation in any::<bool>(),
        frames in proptest::collection::vec(frame_strategy(), 1..40),
        steps in proptest::collection::vec((1usize..3000, any::<bool>(), any::<bool>()), 1..20),
    ) {
        let mut h = Harness::new(FUZZ_DISK_BYTES);
        let conn = h.transmission(structured, structured && base_allocation);
        // The client's stream, and (cookie, length, is_read) of each request the server must
        // answer: those before the first DISC or garbage (the terminator).
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut terminator = None;
        for (i, frame) in frames.iter().enumerate() {
            let cookie = i as u64 + 1;
            match frame {
                Frame::Request { cmd, flags, offset, length } => {
                    stream.extend(req(*cmd, *flags, cookie, *offset, *length));
                    if *cmd == command::WRITE {
                        stream.extend(pattern(*length as usize, i as u8));
                    }
                    if *cmd == command::DISC {
                        terminator.get_or_insert("disc");
                    } else if terminator.is_none() {
                        expected.push((cookie, *length, *cmd == command::READ));
                    }
                }
                Frame::Garbage(bytes) => {
                    stream.extend_from_slice(bytes);
                    terminator.get_or_insert("garbage");
                }
            }
        }

        let mut at = 0;
        let mut step = 0;
        while at < stream.len() {
            let (size, complete_one, fail) = steps[step % steps.len()];
            step += 1;
            let end = (at + size).min(stream.len());
            let consumed = h.feed(conn, &stream[at..end]);
            prop_assert!(consumed <= end - at);
            at += consumed;
            let is_held_back = at < end;
            if is_held_back {
                prop_assert!(!h.pending.is_empty(), "stalled with nothing in flight");
            }
            if (is_held_back || complete_one) && !h.pending.is_empty() {
                h.fail_next = fail.then_some(errno::EIO);
                h.complete(0);
            }
        }
        h.fail_next = None;
        h.complete_all();

        let closed = h.close_count(conn) > 0;
        prop_assert_eq!(closed, terminator.is_some());
        // A DISC is carried out only after every earlier request is answered; a protocol
        // violation may drop answers.
        let must_answer = terminator != Some("garbage");
        let replies = h.replies(conn);
        for reply in &replies {
            prop_assert!(
                expected.iter().any(|(cookie, ..)| *cookie == reply.cookie()),
                "reply to a request the server should not have taken: {:?}", reply
            );
        }
        for (cookie, length, is_read) in &expected {
            let answers: Vec<&Reply> = replies.iter().filter(|r| r.cookie() == *cookie).collect();
            prop_assert!(answers.len() <= 1, "cookie {} answered twice", cookie);
            if must_answer {
                prop_assert_eq!(answers.len(), 1, "cookie {} never answered", cookie);
            }
            if let Some(reply) = answers.first() {
                match reply {
                    Reply::Simple { error, data, .. } => {
                        prop_assert!(!(structured && *is_read), "simple reply to a structured read");
                        let want = if *is_read && *error == 0 { *length as usize } else { 0 };
                        prop_assert_eq!(data.len(), want);
                    }
                    Reply::Chunk { flags, .. } => {
                        prop_assert!(structured);
                        prop_assert_eq!(*flags & chunk::FLAG_DONE, chunk::FLAG_DONE);
                    }
                }
            }
        }
        prop_assert_eq!(h.server.in_flight_count(), 0);
        h.server.handle_closed(conn);
        h.pump();
        prop_assert_eq!(h.server.session_count(), 0);
        prop_assert_eq!(h.in_flight_bytes(), 0);
    }
}

// ---- the kernel's client (the volume attached as /dev/nbdN) ---------------------------------

/// The kernel skips the handshake: its first bytes are requests, answered with simple replies.
#[test]
fn an_attached_kernel_session_starts_in_transmission_with_simple_replies() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h
        .server
        .handle_attached(Instant::from_millis(0))
        .expect("a slot");
    h.pump();
    assert!(h.take_sent(conn).is_empty(), "no greeting to the kernel");
    let data = pattern(4096, 9);
    h.feed_all(conn, &write_req(command_flags::FUA, 1, 8192, &data));
    h.feed_all(conn, &req(command::READ, 0, 2, 8192, 4096));
    h.complete_all();
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].cookie(), 1);
    assert_eq!(replies[0].simple_error(), 0);
    let Reply::Simple { data: read, .. } = &replies[1] else {
        panic!("a simple reply to the read: {replies:?}");
    };
    assert_eq!(read, &data);
    // No handshake deadline applies to it.
    h.server
        .handle_timeout(Instant::from_millis(NBD_HANDSHAKE_TIMEOUT_MS * 10));
    h.pump();
    assert_eq!(h.close_count(conn), 0);
}

/// A secondary never gives the kernel a session, and demotion closes an attached one.
#[test]
fn an_attached_session_exists_only_while_serving() {
    let mut h = Harness::new(DISK_BYTES);
    let conn = h
        .server
        .handle_attached(Instant::from_millis(0))
        .expect("a slot");
    h.server.set_serving(false);
    h.pump();
    assert_eq!(h.close_count(conn), 1);
    assert!(h.server.handle_attached(Instant::from_millis(1)).is_none());
}

/// A trim larger than any one volume request (the kernel discards a whole device at once) is
/// carried out in pieces of at most NBD_PAYLOAD_BYTES_MAX, in order, and answered once.
#[test]
fn a_huge_trim_is_carried_out_in_pieces_and_answered_once() {
    let size = 3 * u64::from(NBD_PAYLOAD_BYTES_MAX) + 4096;
    let mut h = Harness::new(size);
    let conn = h.transmission(false, false);
    h.feed_all(conn, &req(command::TRIM, 0, 5, 4096, (size - 4096) as u32));
    let mut pieces = Vec::new();
    while !h.pending.is_empty() {
        assert_eq!(h.pending.len(), 1, "one piece at a time");
        let VolumeRequest::Trim { offset, len, .. } = h.pending[0].1 else {
            panic!("a trim piece: {:?}", h.issued);
        };
        assert!(len <= u64::from(NBD_PAYLOAD_BYTES_MAX));
        pieces.push((offset, len));
        assert!(
            h.replies(conn).is_empty(),
            "no answer before the last piece"
        );
        h.complete(0);
    }
    assert_eq!(pieces.len(), 3, "{pieces:?}");
    let mut next = 4096;
    for (offset, len) in &pieces {
        assert_eq!(*offset, next, "pieces follow each other: {pieces:?}");
        next += len;
    }
    assert_eq!(next, size);
    let replies = h.replies(conn);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!((replies[0].cookie(), replies[0].simple_error()), (5, 0));
}
