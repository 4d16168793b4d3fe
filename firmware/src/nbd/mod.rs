//! The NBD server as a state machine: every client session, from greeting to disconnect.
//!
//! Heads up: NetworkBlockDevice/nbd `doc/proto.md` is the reference; `crate::wire::nbd` holds the
//! byte formats.
//!
//! The server owns the sessions, the table of requests in flight and the buffer pool. It is
//! driven by the node:
//! - `handle_connected` / `handle_bytes` / `handle_closed` for client sockets,
//! - `handle_volume_done` when a volume request it issued has finished,
//! - `handle_timeout` with the current time,
//!
//! and it produces [`ServerOutput`]s: bytes for a client, a volume request, or a connection to
//! close. It never touches a socket or a disk.
//!
//! Guarantees:
//! - Every request is validated before anything is allocated for it. A write's payload is read
//!   into a buffer only when the request is valid and admitted; an invalid or oversized one is
//!   skipped byte by byte and answered with an error.
//! - Admission is back-pressure: when a connection has `NBD_REQUESTS_PER_CONNECTION_MAX`
//!   requests in flight, or the buffer budget is spent, `handle_bytes` stops consuming and the
//!   runtime stops reading that socket. Clients never see an error for queueing.
//! - A reply is produced only when the volume request completed; FLUSH and FUA complete only
//!   when the data is durable (the volume's contract). Because every connection shares one
//!   volume and a flush covers every completed write, `CAN_MULTI_CONN` is honest.
//! - A bad request magic closes that connection only.

use crate::buffer::BufferPool;
use crate::constants::{
    IO_IN_FLIGHT_COUNT_MAX, NBD_BLOCK_BYTES_PREFERRED, NBD_CONNECTION_COUNT_MAX,
    NBD_HANDSHAKE_TIMEOUT_MS, NBD_OPTION_PAYLOAD_BYTES_MAX, NBD_OPTION_SKIP_BYTES_MAX,
    NBD_PAYLOAD_BYTES_MAX, NBD_REFUSED_CONNECTION_COUNT_MAX, NBD_REQUESTS_PER_CONNECTION_MAX,
};
use crate::metrics::LatencyHistogram;
use crate::time::Instant;
use crate::wire::nbd::{self as wire, command, command_flags, errno, option, option_reply};
use std::collections::VecDeque;
use tandem_board::{Extent, IoBuf};

/// The export's name; the empty name selects it too.
pub const EXPORT_NAME: &str = "tandem";
/// The export's description, for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
pub const EXPORT_DESCRIPTION: &str = "tandem mirrored volume";
/// The id of the `base:allocation` metadata context.
const BASE_ALLOCATION_ID: u32 = 1;

/// Identifies a client connection: a slot and the generation of its occupant, so that an output
/// for a closed connection can never reach the next one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// The slot, below `NBD_CONNECTION_COUNT_MAX + NBD_REFUSED_CONNECTION_COUNT_MAX`.
    pub slot: u16,
    /// Bumped each time the slot is reused.
    pub generation: u32,
}

/// Bytes a [`Head`] holds: every transmission header, and every handshake reply this server
/// sends, fit, so the handshake never takes a buffer from the pool (a client flooding options
/// must not spend the budget other clients' data needs).
pub const HEAD_BYTES_MAX: usize = 128;

/// Up to [`HEAD_BYTES_MAX`] bytes sent before a reply's data (a reply header, a chunk header, a
/// whole handshake reply).
#[derive(Clone, Copy)]
pub struct Head {
    bytes: [u8; HEAD_BYTES_MAX],
    len: u8,
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Head({:02x?})", self.as_slice())
    }
}

impl Head {
    /// No bytes.
    pub const EMPTY: Head = Head {
        bytes: [0; HEAD_BYTES_MAX],
        len: 0,
    };

    fn from_parts(parts: &[&[u8]]) -> Head {
        let mut head = Head::EMPTY;
        for part in parts {
            let at = head.len as usize;
            head.bytes[at..at + part.len()].copy_from_slice(part);
            head.len += part.len() as u8;
        }
        head
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Work on the exported volume. Offsets are bytes from the start of the volume and have been
/// checked against its size.
#[derive(Debug)]
pub enum VolumeRequest {
    /// Read `buf.len()` bytes.
    Read { offset: u64, buf: IoBuf },
    /// Write `buf`; with `fua`, durable before completion.
    Write { offset: u64, buf: IoBuf, fua: bool },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (a hint).
    Trim { offset: u64, len: u64, fua: bool },
    /// Make a range read as zeroes.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_deallocate: bool,
        fua: bool,
    },
    /// Report holes and data in a range.
    MapExtents { offset: u64, len: u64 },
}

/// The result of a volume request.
#[derive(Debug)]
pub enum VolumeDone {
    /// A read or write finished; its buffer comes back (filled, for a read).
    Buf(IoBuf),
    /// A flush, trim or zeroing finished.
    Done,
    /// A map request finished.
    Extents(Box<heapless::Vec<Extent, { tandem_board::EXTENT_COUNT_MAX }>>),
    /// It failed with this NBD error value; a read or write returns its buffer.
    Failed { error: u32, buf: Option<IoBuf> },
}

/// What the server asks of the outside world.
#[derive(Debug)]
pub enum ServerOutput {
    /// Send `head` then `data` (if any) to a client. The runtime gives `data` back with
    /// [`Server::recycle`] once it is sent (or the client is gone).
    Send {
        conn: ConnId,
        head: Head,
        data: Option<IoBuf>,
    },
    /// Carry out a volume request; report its end with `handle_volume_done(tag, ..)`.
    Volume { tag: u64, request: VolumeRequest },
    /// Close the connection once everything queued for it is sent.
    Close { conn: ConnId },
}

/// What the export looks like to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size_bytes: u64,
    /// False while this node must not serve (a secondary): the handshake refuses.
    pub is_serving: bool,
}

/// Counters of what the server did, for `status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerCounters {
    /// Connections accepted into a session.
    pub connections_accepted: u64,
    /// Connections refused at the handshake (limit, or not serving).
    pub connections_refused: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Bytes read by clients.
    pub read_bytes: u64,
    /// Bytes written by clients.
    pub written_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections closed for a protocol violation.
    pub protocol_violations: u64,
    /// Latency of reads, admission to completion.
    #[serde(skip)]
    pub latency_read: LatencyHistogram,
    /// Latency of writes (payload received to completion).
    #[serde(skip)]
    pub latency_write: LatencyHistogram,
    /// Latency of flushes.
    #[serde(skip)]
    pub latency_flush: LatencyHistogram,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the client's 4 flag bytes.
    ClientFlags,
    /// Waiting for an option header.
    OptionHeader,
    /// Collecting an option's payload.
    OptionPayload {
        header: wire::OptionHeader,
        payload: Vec<u8>,
    },
    /// Skipping an option payload too large to keep.
    OptionSkip {
        header: wire::OptionHeader,
        remaining: u64,
    },
    /// Waiting for a request header.
    Request,
    /// Collecting a write's payload into the buffer of request `io`.
    Payload { io: usize, filled: usize },
    /// Skipping a refused write's payload, then answering `error`.
    PayloadSkip {
        cookie: u64,
        error: u32,
        remaining: u64,
    },
    /// The client sent DISC (or the session is closing): input is ignored.
    Draining,
}

#[derive(Debug)]
struct Session {
    generation: u32,
    phase: Phase,
    /// Bytes of a header collected so far (client flags, option header or request header).
    partial: [u8; wire::REQUEST_LEN],
    partial_len: usize,
    started_at: Instant,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured_replies: bool,
    base_allocation: bool,
    /// Over the connection limit: told so at GO, never served.
    is_refused: bool,
    in_flight: usize,
    /// A close was asked for: nothing more is sent on this connection.
    is_closing: bool,
    /// The runtime has let go of the socket: the slot is freed once `in_flight` is zero. Only
    /// this frees a slot, so the runtime never sees a slot reused while it still holds it.
    is_gone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    MapExtents { req_one: bool },
}

#[derive(Debug)]
struct InFlight {
    conn: ConnId,
    cookie: u64,
    kind: IoKind,
    offset: u64,
    length: u32,
    fua: bool,
    may_deallocate: bool,
    /// A write's buffer while its payload is being received.
    buf: Option<IoBuf>,
    /// Of a trim or write-zeroes: the bytes already done. Those may span the whole volume (the
    /// kernel discards a whole device in one request), so they are carried out in pieces of
    /// at most [`NBD_PAYLOAD_BYTES_MAX`], one after the other, and answered once.
    done_bytes: u64,
    /// When it was admitted (for a write: when its payload was complete).
    started_at: Instant,
}

impl InFlight {
    /// Trims and write-zeroes are carried out in pieces (see `done_bytes`).
    fn is_in_pieces(&self) -> bool {
        matches!(self.kind, IoKind::Trim | IoKind::WriteZeroes)
    }

    /// The length of the piece that starts at `done_bytes`.
    fn piece_len(&self) -> u64 {
        (u64::from(self.length) - self.done_bytes).min(u64::from(NBD_PAYLOAD_BYTES_MAX))
    }
}

/// The NBD server: sessions, requests in flight, buffers.
#[derive(Debug)]
pub struct Server {
    export: ExportInfo,
    sessions: Vec<Option<Session>>,
    generations: Vec<u32>,
    ios: Vec<Option<InFlight>>,
    free_ios: Vec<usize>,
    pool: BufferPool,
    outputs: VecDeque<ServerOutput>,
    counters: ServerCounters,
    /// The time of the latest input, for latencies.
    now: Instant,
}

/// How a transmission request is answered when it cannot be carried out.
enum Verdict {
    Accept,
    Reject(u32),
}

impl Server {
    /// A server for `export`.
    pub fn new(export: ExportInfo) -> Server {
        let slots = NBD_CONNECTION_COUNT_MAX + NBD_REFUSED_CONNECTION_COUNT_MAX;
        Server {
            export,
            sessions: (0..slots).map(|_| None).collect(),
            generations: vec![0; slots],
            ios: Vec::with_capacity(IO_IN_FLIGHT_COUNT_MAX),
            free_ios: Vec::new(),
            pool: BufferPool::new(),
            outputs: VecDeque::new(),
            counters: ServerCounters::default(),
            now: Instant::default(),
        }
    }

    // ---- getters -------------------------------------------------------------------------

    /// What the server has done so far.
    pub fn counters(&self) -> ServerCounters {
        self.counters
    }

    /// Sessions open (including refused ones not yet closed).
    pub fn session_count(&self) -> usize {
        self.sessions.iter().filter(|s| s.is_some()).count()
    }

    /// Requests in flight on the volume or waiting for payload.
    pub fn in_flight_count(&self) -> usize {
        self.ios.len() - self.free_ios.len()
    }

    /// The earliest instant at which `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sessions
            .iter()
            .flatten()
            .filter(|s| s.is_handshaking() && !s.is_closing && !s.is_gone)
            .map(|s| s.started_at.plus_millis(NBD_HANDSHAKE_TIMEOUT_MS))
            .min()
    }

    // ---- commands ------------------------------------------------------------------------

    /// The time now, for the latencies of requests admitted and finished from here on.
    pub fn set_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Starts or stops serving the volume (the node became primary, or stopped being it).
    /// Stopping closes every session: requests in flight still finish, their answers are
    /// dropped, and new clients are refused at the handshake.
    pub fn set_serving(&mut self, serving: bool) {
        self.export.is_serving = serving;
        if serving {
            return;
        }
        let open: Vec<ConnId> = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                s.as_ref().map(|s| ConnId {
                    slot: slot as u16,
                    generation: s.generation,
                })
            })
            .collect();
        for conn in open {
            self.close(conn);
        }
    }

    /// Gives back a buffer that was sent (or could not be).
    pub fn recycle(&mut self, buf: IoBuf) {
        self.pool.give_back(buf);
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.outputs.pop_front()
    }

    // ---- inputs --------------------------------------------------------------------------

    /// A client connected. Returns its id, or `None` when even the refusal slots are full (the
    /// runtime then closes the socket at once). The greeting is queued.
    pub fn handle_connected(&mut self, now: Instant) -> Option<ConnId> {
        let conn = self.open_session(now, Phase::ClientFlags)?;
        let flags = wire::handshake_flags::FIXED_NEWSTYLE | wire::handshake_flags::NO_ZEROES;
        let greeting = wire::emit_greeting(flags);
        self.outputs.push_back(ServerOutput::Send {
            conn,
            head: Head::from_parts(&[&greeting]),
            data: None,
        });
        Some(conn)
    }

    /// The kernel's NBD client was handed a socket (the volume attached as `/dev/nbdN`): the
    /// session starts in the transmission phase, as the kernel skips the handshake, with the
    /// flags of [`Server::transmission_flags`] and simple replies. `None` when the volume is
    /// not being served or no slot is free.
    pub fn handle_attached(&mut self, now: Instant) -> Option<ConnId> {
        if !self.export.is_serving {
            return None;
        }
        let conn = self.open_session(now, Phase::Request)?;
        if self.session_mut(conn).is_some_and(|s| s.is_refused) {
            self.close(conn);
            return None;
        }
        Some(conn)
    }

    /// The transmission flags the server offers; what the kernel is told at attach.
    pub fn transmission_flags(&self) -> u16 {
        use wire::transmission_flags as f;
        f::HAS_FLAGS
            | f::SEND_FLUSH
            | f::SEND_FUA
            | f::SEND_TRIM
            | f::SEND_WRITE_ZEROES
            | f::CAN_MULTI_CONN
    }

    /// Whether the volume is being served (this node is primary, or standalone).
    pub fn is_serving(&self) -> bool {
        self.export.is_serving
    }

    fn open_session(&mut self, now: Instant, phase: Phase) -> Option<ConnId> {
        let served = self
            .sessions
            .iter()
            .flatten()
            .filter(|s| !s.is_refused)
            .count();
        let is_refused = served >= NBD_CONNECTION_COUNT_MAX;
        let slot = self.sessions.iter().position(Option::is_none)?;
        let generation = self.generations[slot].wrapping_add(1);
        self.generations[slot] = generation;
        self.sessions[slot] = Some(Session {
            generation,
            phase,
            partial: [0; wire::REQUEST_LEN],
            partial_len: 0,
            started_at: now,
            fixed_newstyle: false,
            no_zeroes: false,
            structured_replies: false,
            base_allocation: false,
            is_refused,
            in_flight: 0,
            is_closing: false,
            is_gone: false,
        });
        let conn = ConnId {
            slot: slot as u16,
            generation,
        };
        if is_refused {
            self.counters.connections_refused += 1;
            log::warn!("nbd: connection limit reached, refusing a client (limit={NBD_CONNECTION_COUNT_MAX})");
        } else {
            self.counters.connections_accepted += 1;
        }
        Some(conn)
    }

    /// The client's socket is gone. Requests in flight finish; their answers are dropped.
    pub fn handle_closed(&mut self, conn: ConnId) {
        if let Some(session) = self.session_mut(conn) {
            session.is_gone = true;
            session.phase = Phase::Draining;
        }
        self.release_payload_buffer(conn);
        self.free_if_done(conn);
    }

    /// Drops sessions that did not finish their handshake in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (slot, session) in self.sessions.iter().enumerate() {
            let Some(session) = session else { continue };
            let deadline = session.started_at.plus_millis(NBD_HANDSHAKE_TIMEOUT_MS);
            let is_open = !session.is_closing && !session.is_gone;
            if session.is_handshaking() && is_open && now >= deadline {
                expired.push(ConnId {
                    slot: slot as u16,
                    generation: session.generation,
                });
            }
        }
        for conn in expired {
            log::warn!("nbd: client did not finish its handshake in time, closing it");
            self.close(conn);
        }
    }

    /// Bytes arrived from a client. Returns how many were consumed: fewer than given only when
    /// the client must wait for requests in flight to finish (back-pressure); the runtime keeps
    /// the rest and offers them again after the next volume completion.
    pub fn handle_bytes(&mut self, conn: ConnId, bytes: &[u8]) -> usize {
        let mut consumed = 0;
        while consumed < bytes.len() {
            let Some(session) = self.session_mut(conn) else {
                return bytes.len();
            };
            let rest = &bytes[consumed..];
            let step = match &mut session.phase {
                Phase::Draining => rest.len(),
                Phase::ClientFlags => self.collect(conn, rest, wire::CLIENT_FLAGS_LEN),
                Phase::OptionHeader => self.collect(conn, rest, wire::OPTION_HEADER_LEN),
                Phase::Request => self.take_request(conn, rest),
                Phase::OptionPayload { header, payload } => {
                    let want = header.length as usize - payload.len();
                    let n = want.min(rest.len());
                    payload.extend_from_slice(&rest[..n]);
                    if payload.len() == header.length as usize {
                        let header = *header;
                        let payload = std::mem::take(payload);
                        session.phase = Phase::OptionHeader;
                        self.handle_option(conn, header, &payload);
                    }
                    n
                }
                Phase::OptionSkip { header, remaining } => {
                    let n = (*remaining).min(rest.len() as u64) as usize;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        let header = *header;
                        session.phase = Phase::OptionHeader;
                        self.option_too_big(conn, header);
                    }
                    n
                }
                Phase::Payload { io, filled } => {
                    let (io, start) = (*io, *filled);
                    let Some(flight) = self.ios[io].as_mut() else {
                        unreachable!("payload for a request that is not in flight")
                    };
                    let Some(buf) = flight.buf.as_mut() else {
                        unreachable!("payload for a request without a buffer")
                    };
                    let n = (buf.len() - start).min(rest.len());
                    buf.as_mut_slice()[start..start + n].copy_from_slice(&rest[..n]);
                    let filled = start + n;
                    let done = filled == buf.len();
                    let Some(session) = self.session_mut(conn) else {
                        unreachable!()
                    };
                    if done {
                        session.phase = Phase::Request;
                        self.issue(io);
                    } else {
                        session.phase = Phase::Payload { io, filled };
                    }
                    n
                }
                Phase::PayloadSkip {
                    cookie,
                    error,
                    remaining,
                } => {
                    let n = (*remaining).min(rest.len() as u64) as usize;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        let (cookie, error) = (*cookie, *error);
                        session.phase = Phase::Request;
                        self.reply_error(conn, cookie, error, false);
                    }
                    n
                }
            };
            if step == 0 {
                break;
            }
            consumed += step;
        }
        consumed
    }

    /// Where the rest of a write's payload should land, if the connection is receiving one: the
    /// runtime may read the socket straight into it (saving a copy for large writes) and then
    /// report the bytes with [`Server::handle_payload_received`].
    pub fn payload_target(&mut self, conn: ConnId) -> Option<&mut [u8]> {
        let session = self.sessions.get(conn.slot as usize)?.as_ref()?;
        if session.generation != conn.generation {
            return None;
        }
        let Phase::Payload { io, filled } = session.phase else {
            return None;
        };
        let buf = self.ios.get_mut(io)?.as_mut()?.buf.as_mut()?;
        Some(&mut buf.as_mut_slice()[filled..])
    }

    /// `n` bytes were placed in the buffer given by [`Server::payload_target`].
    ///
    /// # Panics
    /// If no payload was being received or `n` is more than was asked for: a runtime bug.
    pub fn handle_payload_received(&mut self, conn: ConnId, n: usize) {
        let Some(session) = self.session_mut(conn) else {
            panic!("payload received for a closed connection");
        };
        let Phase::Payload { io, filled } = session.phase else {
            panic!("payload received outside a write");
        };
        let filled = filled + n;
        let len = match self.ios[io].as_ref().and_then(|f| f.buf.as_ref()) {
            Some(buf) => buf.len(),
            None => unreachable!("a receiving write holds its buffer"),
        };
        assert!(filled <= len, "more payload than the write carries");
        let Some(session) = self.session_mut(conn) else {
            unreachable!()
        };
        if filled == len {
            session.phase = Phase::Request;
            self.issue(io);
        } else {
            session.phase = Phase::Payload { io, filled };
        }
    }

    /// A volume request issued as `tag` finished.
    pub fn handle_volume_done(&mut self, tag: u64, done: VolumeDone) {
        let index = tag as usize;
        if matches!(done, VolumeDone::Done) && self.next_piece(index) {
            return;
        }
        let Some(flight) = self.ios.get_mut(index).and_then(Option::take) else {
            log::error!("nbd: completion for a request not in flight (tag={tag})");
            return;
        };
        self.free_ios.push(index);
        let conn = flight.conn;
        let alive = match self.session_mut(conn) {
            Some(session) => {
                assert!(session.in_flight > 0, "request count underflow");
                session.in_flight -= 1;
                !session.is_closing && !session.is_gone
            }
            None => false,
        };
        match done {
            VolumeDone::Buf(buf) if alive => {
                let latency_ms = self.now.millis_since(flight.started_at);
                if flight.kind == IoKind::Read {
                    self.counters.latency_read.record(latency_ms);
                    self.counters.reads += 1;
                    self.counters.read_bytes += buf.len() as u64;
                    self.reply_read(conn, flight.cookie, flight.offset, buf);
                } else {
                    self.counters.writes += 1;
                    self.counters.latency_write.record(latency_ms);
                    self.counters.written_bytes += buf.len() as u64;
                    self.pool.give_back(buf);
                    self.reply_ok(conn, flight.cookie);
                }
            }
            VolumeDone::Buf(buf) => self.pool.give_back(buf),
            VolumeDone::Done if alive => {
                if flight.kind == IoKind::Flush {
                    self.counters.flushes += 1;
                    let latency_ms = self.now.millis_since(flight.started_at);
                    self.counters.latency_flush.record(latency_ms);
                }
                self.reply_ok(conn, flight.cookie);
            }
            VolumeDone::Done => {}
            VolumeDone::Extents(extents) if alive => {
                let req_one = matches!(flight.kind, IoKind::MapExtents { req_one: true });
                self.reply_block_status(conn, flight.cookie, flight.length, &extents, req_one);
            }
            VolumeDone::Extents(_) => {}
            VolumeDone::Failed { error, buf } => {
                if let Some(buf) = buf {
                    self.pool.give_back(buf);
                }
                if alive {
                    let chunked = matches!(flight.kind, IoKind::Read | IoKind::MapExtents { .. });
                    self.reply_error(conn, flight.cookie, error, chunked);
                }
            }
        }
        self.finish_drain(conn);
        self.free_if_done(conn);
    }

    // ---- internals -----------------------------------------------------------------------

    /// A piece of a large trim or write-zeroes at `index` is done: issues the next one, if
    /// any is left and the client is still there. Returns whether it did.
    fn next_piece(&mut self, index: usize) -> bool {
        let Some(flight) = self.ios.get_mut(index).and_then(Option::as_mut) else {
            return false;
        };
        if !flight.is_in_pieces() {
            return false;
        }
        let piece = flight.piece_len();
        if flight.done_bytes + piece == u64::from(flight.length) {
            return false;
        }
        flight.done_bytes += piece;
        let conn = flight.conn;
        let alive = matches!(self.session_mut(conn), Some(s) if !s.is_closing && !s.is_gone);
        if !alive {
            return false;
        }
        self.issue(index);
        true
    }

    fn session_mut(&mut self, conn: ConnId) -> Option<&mut Session> {
        self.sessions
            .get_mut(conn.slot as usize)?
            .as_mut()
            .filter(|s| s.generation == conn.generation)
    }

    fn send(&mut self, conn: ConnId, head: Head, data: Option<IoBuf>) {
        let is_open = matches!(self.session_mut(conn), Some(s) if !s.is_closing && !s.is_gone);
        if !is_open {
            if let Some(data) = data {
                self.pool.give_back(data);
            }
            return;
        }
        self.outputs
            .push_back(ServerOutput::Send { conn, head, data });
    }

    /// Sends a buffer built from `parts` (handshake replies, whose size varies).
    fn send_bytes(&mut self, conn: ConnId, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len <= HEAD_BYTES_MAX {
            let head = Head::from_parts(parts);
            self.send(conn, head, None);
            return;
        }
        // Handshake replies are small and rare; they do not wait for the request budget.
        let mut buf = self.pool.take_exempt(len);
        let mut at = 0;
        for part in parts {
            buf.as_mut_slice()[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        self.send(conn, Head::EMPTY, Some(buf));
    }

    /// Asks the runtime to close the connection after what is queued; nothing more is sent.
    fn close(&mut self, conn: ConnId) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        if session.is_closing || session.is_gone {
            return;
        }
        session.is_closing = true;
        session.phase = Phase::Draining;
        self.release_payload_buffer(conn);
        self.outputs.push_back(ServerOutput::Close { conn });
    }

    fn protocol_violation(&mut self, conn: ConnId, what: &str) {
        self.counters.protocol_violations += 1;
        log::warn!("nbd: closing a client that broke the protocol ({what})");
        self.close(conn);
    }

    /// A write whose payload was still arriving holds a buffer that no completion will return.
    fn release_payload_buffer(&mut self, conn: ConnId) {
        for index in 0..self.ios.len() {
            let is_receiving = matches!(
                &self.ios[index],
                Some(InFlight { conn: c, buf: Some(_), .. }) if *c == conn
            );
            if is_receiving {
                let Some(flight) = self.ios[index].take() else {
                    unreachable!()
                };
                self.free_ios.push(index);
                if let Some(buf) = flight.buf {
                    self.pool.give_back(buf);
                }
                if let Some(session) = self.session_mut(conn) {
                    session.in_flight -= 1;
                }
            }
        }
    }

    fn free_if_done(&mut self, conn: ConnId) {
        let done = matches!(self.session_mut(conn), Some(s) if s.is_gone && s.in_flight == 0);
        if done {
            self.sessions[conn.slot as usize] = None;
        }
    }

    /// After DISC, the connection closes once its last request is answered.
    fn finish_drain(&mut self, conn: ConnId) {
        let drained = matches!(
            self.session_mut(conn),
            Some(s) if matches!(s.phase, Phase::Draining) && s.in_flight == 0
        );
        if drained {
            self.close(conn);
        }
    }

    /// Collects a fixed-size header of `len` bytes for the handshake phases; returns the bytes
    /// consumed and acts on a complete header.
    fn collect(&mut self, conn: ConnId, bytes: &[u8], len: usize) -> usize {
        let Some(session) = self.session_mut(conn) else {
            return bytes.len();
        };
        let n = (len - session.partial_len).min(bytes.len());
        let at = session.partial_len;
        session.partial[at..at + n].copy_from_slice(&bytes[..n]);
        session.partial_len += n;
        if session.partial_len < len {
            return n;
        }
        session.partial_len = 0;
        match session.phase {
            Phase::ClientFlags => {
                let mut raw = [0u8; wire::CLIENT_FLAGS_LEN];
                raw.copy_from_slice(&session.partial[..4]);
                match wire::parse_client_flags(&raw) {
                    Ok(flags) => {
                        session.fixed_newstyle = flags & wire::client_flags::FIXED_NEWSTYLE != 0;
                        session.no_zeroes = flags & wire::client_flags::NO_ZEROES != 0;
                        session.phase = Phase::OptionHeader;
                    }
                    Err(e) => self.protocol_violation(conn, &e.to_string()),
                }
            }
            Phase::OptionHeader => {
                let mut raw = [0u8; wire::OPTION_HEADER_LEN];
                raw.copy_from_slice(&session.partial[..wire::OPTION_HEADER_LEN]);
                match wire::parse_option_header(&raw) {
                    Ok(header) if header.length > NBD_OPTION_SKIP_BYTES_MAX => {
                        // No option is anywhere near this long (strings stop at 4 KiB): the
                        // client is broken or hostile, and waiting for the bytes would hold a
                        // slot for nothing.
                        let what =
                            format!("option {} claims {} bytes", header.option, header.length);
                        self.protocol_violation(conn, &what);
                    }
                    Ok(header) if header.length > NBD_OPTION_PAYLOAD_BYTES_MAX => {
                        session.phase = Phase::OptionSkip {
                            header,
                            remaining: u64::from(header.length),
                        };
                    }
                    Ok(header) if header.length == 0 => self.handle_option(conn, header, &[]),
                    Ok(header) => {
                        let payload = Vec::with_capacity(header.length as usize);
                        session.phase = Phase::OptionPayload { header, payload };
                    }
                    Err(e) => self.protocol_violation(conn, &e.to_string()),
                }
            }
            _ => unreachable!("collect outside the handshake"),
        }
        n
    }

    fn option_reply(&mut self, conn: ConnId, option: u32, reply_type: u32, payload: &[&[u8]]) {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let header = wire::emit_option_reply_header(option, reply_type, len as u32);
        let mut parts: heapless::Vec<&[u8], 8> = heapless::Vec::new();
        let _ = parts.push(&header);
        for part in payload {
            // Callers pass at most four parts.
            let _ = parts.push(part);
        }
        self.send_bytes(conn, &parts);
    }

    fn option_error(&mut self, conn: ConnId, option: u32, reply_type: u32, message: &str) {
        self.option_reply(conn, option, reply_type, &[message.as_bytes()]);
    }

    fn option_too_big(&mut self, conn: ConnId, header: wire::OptionHeader) {
        if header.option == option::EXPORT_NAME {
            // EXPORT_NAME cannot be refused politely.
            self.protocol_violation(conn, "export name too long");
            return;
        }
        let message = "option payload too large";
        self.option_error(conn, header.option, option_reply::ERR_TOO_BIG, message);
    }

    fn is_export_name(name: &str) -> bool {
        name.is_empty() || name == EXPORT_NAME
    }

    fn handle_option(&mut self, conn: ConnId, header: wire::OptionHeader, payload: &[u8]) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        let (fixed, refused, structured) = (
            session.fixed_newstyle,
            session.is_refused,
            session.structured_replies,
        );
        let code = header.option;
        match code {
            option::EXPORT_NAME => {
                let known = matches!(wire::parse_export_name(payload), Ok(name) if Self::is_export_name(name));
                if !known || refused || !self.export.is_serving {
                    // No error reply exists for EXPORT_NAME: the spec asks for a close.
                    log::info!(
                        "nbd: closing an EXPORT_NAME client (unknown export, limit or not serving)"
                    );
                    self.close(conn);
                    return;
                }
                let reply =
                    wire::emit_export_name_reply(self.export.size_bytes, self.transmission_flags());
                let Some(session) = self.session_mut(conn) else {
                    return;
                };
                let no_zeroes = session.no_zeroes;
                session.phase = Phase::Request;
                if no_zeroes {
                    self.send_bytes(conn, &[&reply]);
                } else {
                    self.send_bytes(conn, &[&reply]);
                    self.send_bytes(conn, &[&[0u8; wire::EXPORT_NAME_PADDING_LEN]]);
                }
            }
            option::ABORT => {
                self.option_reply(conn, code, option_reply::ACK, &[]);
                self.close(conn);
            }
            option::LIST => {
                if !payload.is_empty() {
                    self.option_error(conn, code, option_reply::ERR_INVALID, "LIST takes no data");
                    return;
                }
                let name_len = (EXPORT_NAME.len() as u32).to_be_bytes();
                let server = [
                    &name_len[..],
                    EXPORT_NAME.as_bytes(),
                    EXPORT_DESCRIPTION.as_bytes(),
                ];
                self.option_reply(conn, code, option_reply::SERVER, &server);
                self.option_reply(conn, code, option_reply::ACK, &[]);
            }
            option::INFO | option::GO => self.handle_info_or_go(conn, code, payload, refused),
            option::STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    self.option_error(conn, code, option_reply::ERR_INVALID, "no data expected");
                } else if structured {
                    self.option_error(conn, code, option_reply::ERR_INVALID, "already negotiated");
                } else {
                    if let Some(session) = self.session_mut(conn) {
                        session.structured_replies = true;
                    }
                    self.option_reply(conn, code, option_reply::ACK, &[]);
                }
            }
            option::LIST_META_CONTEXT | option::SET_META_CONTEXT => {
                self.handle_meta_context(conn, code, payload, structured)
            }
            _ if !fixed => {
                // Plain newstyle has no way to refuse an option but to hang up.
                self.protocol_violation(conn, "unknown option from a non-fixed-newstyle client");
            }
            _ => {
                let message = "option not supported by tandem";
                self.option_error(conn, code, option_reply::ERR_UNSUP, message);
            }
        }
    }

    fn handle_info_or_go(&mut self, conn: ConnId, code: u32, payload: &[u8], refused: bool) {
        let request = match wire::parse_info_request(payload) {
            Ok(request) => request,
            Err(e) => {
                self.option_error(conn, code, option_reply::ERR_INVALID, &e.to_string());
                return;
            }
        };
        if !Self::is_export_name(request.name) {
            self.option_error(conn, code, option_reply::ERR_UNKNOWN, "no such export");
            return;
        }
        if code == option::GO && refused {
            let message = "tandem: connection limit reached, try again later";
            self.option_error(conn, code, option_reply::ERR_POLICY, message);
            return;
        }
        if code == option::GO && !self.export.is_serving {
            let message = "tandem: this node is not primary; connect to the cluster address";
            self.option_error(conn, code, option_reply::ERR_UNKNOWN, message);
            return;
        }
        let export = wire::emit_info_export(self.export.size_bytes, self.transmission_flags());
        self.option_reply(conn, code, option_reply::INFO, &[&export]);
        let mut wants_name = false;
        let mut wants_description = false;
        let mut wants_block_size = false;
        for info_type in request.info_types() {
            match info_type {
                wire::info::NAME => wants_name = true,
                wire::info::DESCRIPTION => wants_description = true,
                wire::info::BLOCK_SIZE => wants_block_size = true,
                _ => {}
            }
        }
        if wants_name {
            let info = wire::info::NAME.to_be_bytes();
            self.option_reply(
                conn,
                code,
                option_reply::INFO,
                &[&info, EXPORT_NAME.as_bytes()],
            );
        }
        if wants_description {
            let info = wire::info::DESCRIPTION.to_be_bytes();
            let text = EXPORT_DESCRIPTION.as_bytes();
            self.option_reply(conn, code, option_reply::INFO, &[&info, text]);
        }
        if wants_block_size {
            let sizes =
                wire::emit_info_block_size(1, NBD_BLOCK_BYTES_PREFERRED, NBD_PAYLOAD_BYTES_MAX);
            self.option_reply(conn, code, option_reply::INFO, &[&sizes]);
        }
        self.option_reply(conn, code, option_reply::ACK, &[]);
        if code == option::GO {
            if let Some(session) = self.session_mut(conn) {
                session.phase = Phase::Request;
            }
        }
    }

    fn handle_meta_context(&mut self, conn: ConnId, code: u32, payload: &[u8], structured: bool) {
        let request = match wire::parse_meta_context_request(payload) {
            Ok(request) => request,
            Err(e) => {
                self.option_error(conn, code, option_reply::ERR_INVALID, &e.to_string());
                return;
            }
        };
        if code == option::SET_META_CONTEXT && !structured {
            let message = "structured replies must be negotiated first";
            self.option_error(conn, code, option_reply::ERR_INVALID, message);
            return;
        }
        if !Self::is_export_name(request.name) {
            self.option_error(conn, code, option_reply::ERR_UNKNOWN, "no such export");
            return;
        }
        let matches = if code == option::LIST_META_CONTEXT {
            // An empty list, or a namespace query, lists everything in it.
            request.queries.is_empty()
                || request
                    .queries
                    .iter()
                    .any(|q| *q == "base:" || *q == wire::BASE_ALLOCATION)
        } else {
            request.queries.contains(&wire::BASE_ALLOCATION)
        };
        if code == option::SET_META_CONTEXT {
            if let Some(session) = self.session_mut(conn) {
                session.base_allocation = matches;
            }
        }
        if matches {
            let id = BASE_ALLOCATION_ID.to_be_bytes();
            let name = wire::BASE_ALLOCATION.as_bytes();
            self.option_reply(conn, code, option_reply::META_CONTEXT, &[&id, name]);
        }
        self.option_reply(conn, code, option_reply::ACK, &[]);
    }

    /// Reads a request header (and, for a write, starts its payload). Returns bytes consumed;
    /// zero when the request cannot be admitted yet.
    fn take_request(&mut self, conn: ConnId, bytes: &[u8]) -> usize {
        let Some(session) = self.session_mut(conn) else {
            return bytes.len();
        };
        let have = session.partial_len;
        let need = wire::REQUEST_LEN - have;
        if bytes.len() < need {
            session.partial[have..have + bytes.len()].copy_from_slice(bytes);
            session.partial_len += bytes.len();
            return bytes.len();
        }
        let mut raw = [0u8; wire::REQUEST_LEN];
        raw[..have].copy_from_slice(&session.partial[..have]);
        raw[have..].copy_from_slice(&bytes[..need]);
        let request = match wire::parse_request(&raw) {
            Ok(request) => request,
            Err(wire::BadRequestMagic(magic)) => {
                self.protocol_violation(conn, &format!("bad request magic {magic:#x}"));
                return bytes.len();
            }
        };
        let structured = session.structured_replies;
        let base_allocation = session.base_allocation;
        let session_in_flight = session.in_flight;
        let verdict = self.validate(&request, structured, base_allocation);
        // Admission: a request that needs a slot or a buffer waits until one is free.
        let needs_buffer = matches!(request.command, command::READ | command::WRITE)
            && matches!(verdict, Verdict::Accept);
        let slots_free = session_in_flight < NBD_REQUESTS_PER_CONNECTION_MAX
            && self.in_flight_count() < IO_IN_FLIGHT_COUNT_MAX;
        if !slots_free || (needs_buffer && !self.pool.can_take(request.length as usize)) {
            // Keep the bytes of a header split across reads; retry with the rest later.
            return 0;
        }
        let Some(session) = self.session_mut(conn) else {
            return bytes.len();
        };
        session.partial_len = 0;
        match verdict {
            Verdict::Reject(error) if request.command == command::WRITE => {
                session.phase = Phase::PayloadSkip {
                    cookie: request.cookie,
                    error,
                    remaining: u64::from(request.length),
                };
                if request.length == 0 {
                    session.phase = Phase::Request;
                    self.reply_error(conn, request.cookie, error, false);
                }
            }
            Verdict::Reject(error) => {
                // Reads and block status are answered in chunks once structured replies are on.
                let chunked = matches!(request.command, command::READ | command::BLOCK_STATUS);
                self.reply_error(conn, request.cookie, error, chunked);
            }
            Verdict::Accept => self.accept(conn, &request),
        }
        need
    }

    /// Checks a request against the export and what was negotiated (NBD spec error rules:
    /// EINVAL for unknown commands or flags and for reads past the end, ENOSPC for writes past
    /// the end).
    fn validate(
        &self,
        request: &wire::Request,
        structured: bool,
        base_allocation: bool,
    ) -> Verdict {
        let end = request.offset.checked_add(u64::from(request.length));
        let in_range = matches!(end, Some(end) if end <= self.export.size_bytes);
        // FUA is valid on every command once SEND_FUA is advertised (it does nothing for the
        // ones that write nothing). DF is not advertised, so it is refused like any other flag
        // the server did not offer.
        let fua = command_flags::FUA;
        let allowed_flags = match request.command {
            command::READ | command::WRITE | command::TRIM | command::FLUSH | command::CACHE => fua,
            command::WRITE_ZEROES => fua | command_flags::NO_HOLE,
            command::BLOCK_STATUS => fua | command_flags::REQ_ONE,
            command::DISC => fua,
            _ => return Verdict::Reject(errno::EINVAL),
        };
        if request.flags & !allowed_flags != 0 {
            return Verdict::Reject(errno::EINVAL);
        }
        let has_range = !matches!(request.command, command::FLUSH | command::DISC);
        if has_range && request.length == 0 {
            return Verdict::Reject(errno::EINVAL);
        }
        if matches!(request.command, command::READ | command::WRITE)
            && request.length > NBD_PAYLOAD_BYTES_MAX
        {
            return Verdict::Reject(errno::EINVAL);
        }
        if has_range && !in_range {
            let writes = matches!(request.command, command::WRITE | command::WRITE_ZEROES);
            return Verdict::Reject(if writes { errno::ENOSPC } else { errno::EINVAL });
        }
        if request.command == command::BLOCK_STATUS && !(structured && base_allocation) {
            return Verdict::Reject(errno::EINVAL);
        }
        Verdict::Accept
    }

    fn new_io(&mut self, flight: InFlight) -> usize {
        let conn = flight.conn;
        let index = match self.free_ios.pop() {
            Some(index) => {
                self.ios[index] = Some(flight);
                index
            }
            None => {
                self.ios.push(Some(flight));
                self.ios.len() - 1
            }
        };
        if let Some(session) = self.session_mut(conn) {
            session.in_flight += 1;
        }
        index
    }

    fn accept(&mut self, conn: ConnId, request: &wire::Request) {
        let fua = request.flags & command_flags::FUA != 0;
        let kind = match request.command {
            command::READ => IoKind::Read,
            command::WRITE => IoKind::Write,
            command::FLUSH => IoKind::Flush,
            command::TRIM => IoKind::Trim,
            command::WRITE_ZEROES => IoKind::WriteZeroes,
            command::BLOCK_STATUS => IoKind::MapExtents {
                req_one: request.flags & command_flags::REQ_ONE != 0,
            },
            command::CACHE => {
                // A prefetch hint: nothing to do for a disk that caches on its own.
                self.reply_ok(conn, request.cookie);
                return;
            }
            command::DISC => {
                if let Some(session) = self.session_mut(conn) {
                    session.phase = Phase::Draining;
                }
                self.finish_drain(conn);
                return;
            }
            _ => unreachable!("validate admits only known commands"),
        };
        let buf = match kind {
            IoKind::Read | IoKind::Write => Some(self.pool.take(request.length as usize)),
            _ => None,
        };
        let is_write = kind == IoKind::Write;
        let flight = InFlight {
            conn,
            cookie: request.cookie,
            kind,
            offset: request.offset,
            length: request.length,
            fua,
            may_deallocate: request.flags & command_flags::NO_HOLE == 0,
            buf,
            done_bytes: 0,
            started_at: self.now,
        };
        let io = self.new_io(flight);
        if is_write {
            if let Some(session) = self.session_mut(conn) {
                session.phase = Phase::Payload { io, filled: 0 };
            }
            return;
        }
        self.issue(io);
    }

    /// Emits the volume request for the request in flight at `io`.
    fn issue(&mut self, io: usize) {
        let now = self.now;
        let Some(flight) = self.ios[io].as_mut() else {
            unreachable!("issue of a free slot")
        };
        flight.started_at = now;
        let (offset, len, fua) = if flight.is_in_pieces() {
            (
                flight.offset + flight.done_bytes,
                flight.piece_len(),
                flight.fua,
            )
        } else {
            (flight.offset, u64::from(flight.length), flight.fua)
        };
        let request = match flight.kind {
            IoKind::Read => {
                let Some(buf) = flight.buf.take() else {
                    unreachable!("read without buffer")
                };
                VolumeRequest::Read { offset, buf }
            }
            IoKind::Write => {
                let Some(buf) = flight.buf.take() else {
                    unreachable!("write without buffer")
                };
                VolumeRequest::Write { offset, buf, fua }
            }
            IoKind::Flush => VolumeRequest::Flush,
            IoKind::Trim => VolumeRequest::Trim { offset, len, fua },
            IoKind::WriteZeroes => VolumeRequest::WriteZeroes {
                offset,
                len,
                may_deallocate: flight.may_deallocate,
                fua,
            },
            IoKind::MapExtents { .. } => VolumeRequest::MapExtents { offset, len },
        };
        self.outputs.push_back(ServerOutput::Volume {
            tag: io as u64,
            request,
        });
    }

    fn reply_ok(&mut self, conn: ConnId, cookie: u64) {
        let header = wire::emit_simple_reply(0, cookie);
        self.send(conn, Head::from_parts(&[&header]), None);
    }

    /// Answers a request with an error; `chunked` for the commands whose replies must be
    /// structured once structured replies were negotiated (READ, BLOCK_STATUS).
    fn reply_error(&mut self, conn: ConnId, cookie: u64, error: u32, chunked: bool) {
        self.counters.errors += 1;
        let structured = matches!(self.session_mut(conn), Some(s) if s.structured_replies);
        if structured && chunked {
            // Answered with chunks: one error chunk, no message.
            let header =
                wire::emit_chunk_header(wire::chunk::FLAG_DONE, wire::chunk::ERROR, cookie, 6);
            let body_error = error.to_be_bytes();
            let body_len = 0u16.to_be_bytes();
            self.send(
                conn,
                Head::from_parts(&[&header, &body_error, &body_len]),
                None,
            );
        } else {
            let header = wire::emit_simple_reply(error, cookie);
            self.send(conn, Head::from_parts(&[&header]), None);
        }
    }

    fn reply_read(&mut self, conn: ConnId, cookie: u64, offset: u64, buf: IoBuf) {
        let structured = matches!(self.session_mut(conn), Some(s) if s.structured_replies);
        let head = if structured {
            let length = 8 + buf.len() as u32;
            let header = wire::emit_chunk_header(
                wire::chunk::FLAG_DONE,
                wire::chunk::OFFSET_DATA,
                cookie,
                length,
            );
            Head::from_parts(&[&header, &offset.to_be_bytes()])
        } else {
            Head::from_parts(&[&wire::emit_simple_reply(0, cookie)])
        };
        self.send(conn, head, Some(buf));
    }

    fn reply_block_status(
        &mut self,
        conn: ConnId,
        cookie: u64,
        length: u32,
        extents: &[Extent],
        req_one: bool,
    ) {
        // Descriptors cover at most the requested length; at least one is always sent.
        let mut descriptors: heapless::Vec<(u32, u32), { tandem_board::EXTENT_COUNT_MAX }> =
            heapless::Vec::new();
        let mut covered: u64 = 0;
        for extent in extents {
            let len = extent.len.min(u64::from(length) - covered);
            if len == 0 {
                break;
            }
            let flags = if extent.is_hole {
                wire::allocation::HOLE | wire::allocation::ZERO
            } else {
                0
            };
            let _ = descriptors.push((len as u32, flags));
            covered += len;
            if req_one || covered >= u64::from(length) {
                break;
            }
        }
        if descriptors.is_empty() {
            let _ = descriptors.push((length, 0));
        }
        let payload_len = 4 + 8 * descriptors.len();
        let header = wire::emit_chunk_header(
            wire::chunk::FLAG_DONE,
            wire::chunk::BLOCK_STATUS,
            cookie,
            payload_len as u32,
        );
        // At most 516 bytes, and the answer to work already admitted: it must not wait for
        // the data budget (which reads in flight may have spent).
        let mut buf = self.pool.take_exempt(payload_len);
        let body = buf.as_mut_slice();
        body[0..4].copy_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (i, (len, flags)) in descriptors.iter().enumerate() {
            body[4 + 8 * i..8 + 8 * i].copy_from_slice(&len.to_be_bytes());
            body[8 + 8 * i..12 + 8 * i].copy_from_slice(&flags.to_be_bytes());
        }
        self.send(conn, Head::from_parts(&[&header]), Some(buf));
    }
}

impl Session {
    fn is_handshaking(&self) -> bool {
        matches!(
            self.phase,
            Phase::ClientFlags
                | Phase::OptionHeader
                | Phase::OptionPayload { .. }
                | Phase::OptionSkip { .. }
        )
    }
}

#[cfg(test)]
mod tests;
