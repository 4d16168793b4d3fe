//! A simulated NBD client: the fixed-newstyle handshake with `NBD_OPT_GO`, then requests with
//! many in flight, every reply checked.
//!
//! It speaks bytes only: what the node sends arrives through [`Client::receive`], what the
//! client sends waits in [`Client::outbox`] until the node consumes it (back-pressure). Each
//! request's cookie is its op id, unique over the whole run, so a sector's bytes name the write
//! that put them there (`model.rs`).
//!
//! Checks made here: the handshake follows the protocol and announces the right size; every
//! reply answers a request in flight, once, with its cookie; an error reply is EIO (the only
//! error the simulated disk produces; whether it was owed is checked by the simulation against
//! the faults the disk injected); every successful read matches the model's read rule; and in a
//! verification pass after a power cut, every sector matches the model's crash rule.

use super::disk::SECTOR_BYTES;
use super::model::{decode_sector, fill_sector, Model, Value};
use super::prng::Prng;
use std::collections::BTreeMap;
use tandem::wire::nbd as wire;

/// The workload's shape (part of the swarm options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Requests in flight at most.
    pub queue_depth: usize,
    /// Largest request, in sectors.
    pub request_sectors_max: u64,
    /// When set, requests fall in the first this-many sectors (more overlap).
    pub hot_sectors: Option<u64>,
    /// Relative weights: read, write, flush, trim, write-zeroes.
    pub mix: [u32; 5],
    /// Share of writes sent with FUA, per million.
    pub fua_per_million: u32,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            queue_depth: 16,
            request_sectors_max: 64,
            hot_sectors: None,
            mix: [35, 40, 8, 7, 10],
            fua_per_million: 200_000,
        }
    }
}

/// Sectors per read of the verification pass.
const VERIFY_READ_SECTORS: u64 = 256;
/// Reads in flight during the verification pass.
const VERIFY_QUEUE_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    VerifyRead,
    Write { fua: bool },
    Zeroes { fua: bool },
    Trim,
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    kind: Kind,
    first: u64,
    count: u64,
    /// Model time of issue.
    issued: u64,
    /// Virtual time of issue, for the liveness check.
    sent_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    OptionReplies,
    Ready,
}

struct Verify {
    next: u64,
    /// Ranges whose read failed, to read again.
    retry: Vec<(u64, u64)>,
    observed: Vec<Option<Value>>,
    remaining: u64,
}

/// One client connection.
pub struct Client {
    seed: u64,
    phase: Phase,
    inbox: Vec<u8>,
    /// Bytes for the node; those before `outbox_sent` were consumed.
    outbox: Vec<u8>,
    outbox_sent: usize,
    in_flight: BTreeMap<u64, InFlight>,
    next_op: u64,
    volume_bytes: u64,
    verify: Option<Verify>,
    /// Replies that carried an error.
    pub error_replies: u64,
    /// The error of every finished request, by cookie (0 for success).
    pub results: BTreeMap<u64, u32>,
    /// Reads whose data was checked.
    pub reads_checked: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("phase", &self.phase)
            .field("in_flight", &self.in_flight.len())
            .field("next_op", &self.next_op)
            .finish()
    }
}

impl Client {
    /// A client that will number its ops from `first_op`; with `verify` it reads the whole
    /// volume against the crash rule before anything else.
    pub fn new(seed: u64, first_op: u64, volume_bytes: u64, verify: bool) -> Client {
        let sectors = volume_bytes / SECTOR_BYTES as u64;
        Client {
            seed,
            phase: Phase::Greeting,
            inbox: Vec::new(),
            outbox: Vec::new(),
            outbox_sent: 0,
            in_flight: BTreeMap::new(),
            next_op: first_op.max(1),
            volume_bytes,
            verify: verify.then(|| Verify {
                next: 0,
                retry: Vec::new(),
                observed: vec![None; sectors as usize],
                remaining: sectors,
            }),
            error_replies: 0,
            results: BTreeMap::new(),
            reads_checked: 0,
        }
    }

    /// The next op id this client would use.
    pub fn next_op(&self) -> u64 {
        self.next_op
    }

    /// Whether the handshake is done.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Whether the verification pass is still running.
    pub fn is_verifying(&self) -> bool {
        self.verify.is_some()
    }

    /// Requests in flight.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// The virtual time the oldest request in flight was sent, if any.
    pub fn oldest_sent_ms(&self) -> Option<u64> {
        self.in_flight.values().map(|f| f.sent_ms).min()
    }

    /// The bytes the node has not consumed yet.
    pub fn unsent(&self) -> &[u8] {
        &self.outbox[self.outbox_sent..]
    }

    /// The node consumed `n` bytes of [`Client::unsent`].
    pub fn consumed(&mut self, n: usize) {
        self.outbox_sent += n;
        assert!(self.outbox_sent <= self.outbox.len());
        if self.outbox_sent == self.outbox.len() {
            self.outbox.clear();
            self.outbox_sent = 0;
        }
    }

    /// Nothing in flight, nothing unsent, handshake and verification done.
    pub fn is_idle(&self) -> bool {
        self.is_ready()
            && self.in_flight.is_empty()
            && self.outbox.is_empty()
            && !self.is_verifying()
    }

    /// When the verification pass has read every sector: the values it found.
    pub fn take_verified(&mut self) -> Option<Vec<Value>> {
        let done = matches!(&self.verify, Some(v) if v.remaining == 0);
        if !done {
            return None;
        }
        let verify = self.verify.take()?;
        Some(
            verify
                .observed
                .into_iter()
                .map(|v| v.unwrap_or(Value::Zero))
                .collect(),
        )
    }

    /// Bytes from the node. Checks every complete message.
    pub fn receive(&mut self, bytes: &[u8], model: &mut Model) -> Result<(), String> {
        let mut inbox = std::mem::take(&mut self.inbox);
        let parse_from_input = inbox.is_empty();
        if !parse_from_input {
            inbox.extend_from_slice(bytes);
        }
        let input = if parse_from_input { bytes } else { &inbox[..] };
        let mut at = 0;
        let result = loop {
            match self.parse_one(&input[at..], model) {
                Ok(Some(n)) => at += n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if parse_from_input {
            inbox.extend_from_slice(&bytes[at..]);
        } else {
            inbox.drain(..at);
        }
        self.inbox = inbox;
        result
    }

    /// Issues what the phase calls for: verification reads, or (with `workload`) random
    /// requests up to the queue depth.
    pub fn tick(
        &mut self,
        prng: &mut Prng,
        model: &mut Model,
        workload: Option<&Workload>,
        now_ms: u64,
    ) {
        if !self.is_ready() {
            return;
        }
        if let Some(mut verify) = self.verify.take() {
            let sectors = verify.observed.len() as u64;
            while self.in_flight.len() < VERIFY_QUEUE_DEPTH {
                let (first, count) = if let Some(range) = verify.retry.pop() {
                    range
                } else if verify.next < sectors {
                    let count = VERIFY_READ_SECTORS.min(sectors - verify.next);
                    verify.next += count;
                    (verify.next - count, count)
                } else {
                    break;
                };
                let op = self.next_op;
                self.next_op += 1;
                let issued = model.tick();
                self.send_request(op, wire::command::READ, 0, first, count);
                self.track(op, Kind::VerifyRead, first, count, issued, now_ms);
            }
            self.verify = Some(verify);
            return;
        }
        let Some(workload) = workload else {
            return;
        };
        let room = workload.queue_depth.saturating_sub(self.in_flight.len());
        let burst = prng.range(0, room as u64);
        for _ in 0..burst {
            self.issue_random(prng, model, workload, now_ms);
        }
    }

    fn issue_random(&mut self, prng: &mut Prng, model: &mut Model, w: &Workload, now_ms: u64) {
        let sectors = model.sector_count() as u64;
        let span = w.hot_sectors.map_or(sectors, |h| h.min(sectors));
        let count = prng.range(1, w.request_sectors_max.min(span));
        let first = prng.below(span - count + 1);
        let total: u32 = w.mix.iter().sum();
        let mut roll = prng.below(u64::from(total)) as u32;
        let mut which = 0;
        while roll >= w.mix[which] {
            roll -= w.mix[which];
            which += 1;
        }
        let fua = prng.chance(w.fua_per_million);
        match which {
            0 => {
                self.read(model, first, count, now_ms);
            }
            1 => {
                self.write(model, first, count, fua, now_ms);
            }
            2 => {
                self.flush(model, now_ms);
            }
            3 => {
                self.trim(model, first, count, fua, now_ms);
            }
            _ => {
                self.write_zeroes(model, first, count, fua, now_ms);
            }
        }
    }

    /// Sends a read of `count` sectors from `first`; returns its cookie.
    pub fn read(&mut self, model: &mut Model, first: u64, count: u64, now_ms: u64) -> u64 {
        let op = self.take_op();
        let issued = model.tick();
        self.send_request(op, wire::command::READ, 0, first, count);
        self.track(op, Kind::Read, first, count, issued, now_ms);
        op
    }

    /// Sends a write of recognisable data; returns its cookie (the op id its sectors carry).
    pub fn write(
        &mut self,
        model: &mut Model,
        first: u64,
        count: u64,
        fua: bool,
        now_ms: u64,
    ) -> u64 {
        let op = self.take_op();
        let horizon = self.horizon(model);
        model.issue_write(op, first, count, Value::Data(op), false, horizon);
        let issued = model.tick();
        let flags = if fua { wire::command_flags::FUA } else { 0 };
        self.send_request(op, wire::command::WRITE, flags, first, count);
        let at = self.outbox.len();
        self.outbox.resize(at + (count as usize) * SECTOR_BYTES, 0);
        for i in 0..count {
            let from = at + i as usize * SECTOR_BYTES;
            fill_sector(
                self.seed,
                op,
                first + i,
                &mut self.outbox[from..from + SECTOR_BYTES],
            );
        }
        self.track(op, Kind::Write { fua }, first, count, issued, now_ms);
        op
    }

    /// Sends a WRITE_ZEROES; returns its cookie.
    pub fn write_zeroes(
        &mut self,
        model: &mut Model,
        first: u64,
        count: u64,
        fua: bool,
        now_ms: u64,
    ) -> u64 {
        let op = self.take_op();
        let horizon = self.horizon(model);
        model.issue_write(op, first, count, Value::Zero, false, horizon);
        let issued = model.tick();
        let flags = if fua { wire::command_flags::FUA } else { 0 };
        self.send_request(op, wire::command::WRITE_ZEROES, flags, first, count);
        self.track(op, Kind::Zeroes { fua }, first, count, issued, now_ms);
        op
    }

    /// Sends a TRIM; returns its cookie.
    pub fn trim(
        &mut self,
        model: &mut Model,
        first: u64,
        count: u64,
        fua: bool,
        now_ms: u64,
    ) -> u64 {
        let op = self.take_op();
        let horizon = self.horizon(model);
        model.issue_write(op, first, count, Value::Zero, true, horizon);
        let issued = model.tick();
        let flags = if fua { wire::command_flags::FUA } else { 0 };
        self.send_request(op, wire::command::TRIM, flags, first, count);
        self.track(op, Kind::Trim, first, count, issued, now_ms);
        op
    }

    /// Sends a FLUSH; returns its cookie.
    pub fn flush(&mut self, model: &mut Model, now_ms: u64) -> u64 {
        let op = self.take_op();
        let issued = model.issue_flush();
        self.send_request(op, wire::command::FLUSH, 0, 0, 0);
        self.track(op, Kind::Flush, 0, 0, issued, now_ms);
        op
    }

    fn take_op(&mut self) -> u64 {
        assert!(self.is_ready(), "request before the handshake finished");
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    /// The issue time of the oldest read in flight, or the next tick.
    fn horizon(&self, model: &mut Model) -> u64 {
        let oldest_read = self
            .in_flight
            .values()
            .filter(|f| matches!(f.kind, Kind::Read | Kind::VerifyRead))
            .map(|f| f.issued)
            .min();
        oldest_read.unwrap_or_else(|| model.tick())
    }

    fn track(&mut self, op: u64, kind: Kind, first: u64, count: u64, issued: u64, sent_ms: u64) {
        let flight = InFlight {
            kind,
            first,
            count,
            issued,
            sent_ms,
        };
        assert!(self.in_flight.insert(op, flight).is_none());
    }

    fn send_request(&mut self, cookie: u64, command: u16, flags: u16, first: u64, count: u64) {
        let request = wire::Request {
            flags,
            command,
            cookie,
            offset: first * SECTOR_BYTES as u64,
            length: (count * SECTOR_BYTES as u64) as u32,
        };
        self.outbox.extend_from_slice(&wire::emit_request(&request));
    }

    /// Parses one message at `at`; `Ok(None)` when more bytes are needed.
    fn parse_one(&mut self, bytes: &[u8], model: &mut Model) -> Result<Option<usize>, String> {
        match self.phase {
            Phase::Greeting => {
                if bytes.len() < wire::GREETING_LEN {
                    return Ok(None);
                }
                if be_u64(bytes, 0) != wire::NBD_MAGIC || be_u64(bytes, 8) != wire::OPTION_MAGIC {
                    return Err(format!("bad greeting {:02x?}", &bytes[..18]));
                }
                let flags = be_u16(bytes, 16);
                if flags & wire::handshake_flags::FIXED_NEWSTYLE == 0 {
                    return Err(format!(
                        "greeting without FIXED_NEWSTYLE (flags={flags:#x})"
                    ));
                }
                let client_flags =
                    wire::client_flags::FIXED_NEWSTYLE | wire::client_flags::NO_ZEROES;
                self.outbox.extend_from_slice(&client_flags.to_be_bytes());
                // NBD_OPT_GO: empty name (the default export), no info requests.
                let payload = [0u8; 6];
                self.outbox
                    .extend_from_slice(&wire::OPTION_MAGIC.to_be_bytes());
                self.outbox
                    .extend_from_slice(&wire::option::GO.to_be_bytes());
                self.outbox
                    .extend_from_slice(&(payload.len() as u32).to_be_bytes());
                self.outbox.extend_from_slice(&payload);
                self.phase = Phase::OptionReplies;
                Ok(Some(wire::GREETING_LEN))
            }
            Phase::OptionReplies => {
                if bytes.len() < wire::OPTION_REPLY_HEADER_LEN {
                    return Ok(None);
                }
                let (magic, option, reply, len) = (
                    be_u64(bytes, 0),
                    be_u32(bytes, 8),
                    be_u32(bytes, 12),
                    be_u32(bytes, 16) as usize,
                );
                if magic != wire::OPTION_REPLY_MAGIC || option != wire::option::GO {
                    return Err(format!("bad option reply {:02x?}", &bytes[..20]));
                }
                let total = wire::OPTION_REPLY_HEADER_LEN + len;
                if bytes.len() < total {
                    return Ok(None);
                }
                let payload = &bytes[wire::OPTION_REPLY_HEADER_LEN..total];
                match reply {
                    wire::option_reply::ACK => self.phase = Phase::Ready,
                    wire::option_reply::INFO => {
                        if payload.len() >= 12 && be_u16(payload, 0) == wire::info::EXPORT {
                            let size = be_u64(payload, 2);
                            if size != self.volume_bytes {
                                return Err(format!(
                                    "export size {size}, expected {}",
                                    self.volume_bytes
                                ));
                            }
                        }
                    }
                    other => return Err(format!("NBD_OPT_GO refused (reply type {other:#x})")),
                }
                Ok(Some(total))
            }
            Phase::Ready => {
                if bytes.len() < wire::SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                if be_u32(bytes, 0) != wire::SIMPLE_REPLY_MAGIC {
                    return Err(format!("bad reply magic {:#x}", be_u32(bytes, 0)));
                }
                let error = be_u32(bytes, 4);
                let cookie = be_u64(bytes, 8);
                let Some(flight) = self.in_flight.get(&cookie).copied() else {
                    return Err(format!(
                        "reply for cookie {cookie} which is not in flight (unknown or answered twice)"
                    ));
                };
                let is_read = matches!(flight.kind, Kind::Read | Kind::VerifyRead);
                let data_len = if is_read && error == 0 {
                    flight.count as usize * SECTOR_BYTES
                } else {
                    0
                };
                let total = wire::SIMPLE_REPLY_LEN + data_len;
                if bytes.len() < total {
                    return Ok(None);
                }
                self.in_flight.remove(&cookie);
                self.results.insert(cookie, error);
                if error != 0 {
                    self.error_replies += 1;
                    if error != wire::errno::EIO {
                        return Err(format!("cookie {cookie}: error {error}, expected only EIO"));
                    }
                }
                let data = &bytes[wire::SIMPLE_REPLY_LEN..total];
                self.finish(cookie, flight, error == 0, data, model)?;
                Ok(Some(total))
            }
        }
    }

    fn finish(
        &mut self,
        op: u64,
        flight: InFlight,
        ok: bool,
        data: &[u8],
        model: &mut Model,
    ) -> Result<(), String> {
        match flight.kind {
            Kind::Write { fua } | Kind::Zeroes { fua } => model.complete_write(op, ok, fua),
            Kind::Trim => model.complete_write(op, ok, false),
            Kind::Flush => model.complete_flush(flight.issued, ok),
            Kind::Read => {
                model.tick();
                if ok {
                    self.reads_checked += 1;
                    for (i, bytes) in data.chunks(SECTOR_BYTES).enumerate() {
                        let sector = flight.first + i as u64;
                        let value = decode_sector(self.seed, sector, bytes);
                        model.check_read(sector as usize, value, flight.issued)?;
                    }
                }
            }
            Kind::VerifyRead => {
                model.tick();
                let Some(verify) = self.verify.as_mut() else {
                    unreachable!("verification read outside the verification pass")
                };
                if !ok {
                    // Read it again: the pass must see every sector.
                    verify.retry.push((flight.first, flight.count));
                    return Ok(());
                }
                for (i, bytes) in data.chunks(SECTOR_BYTES).enumerate() {
                    let sector = flight.first + i as u64;
                    let value = decode_sector(self.seed, sector, bytes);
                    model.check_after_cut(sector as usize, value)?;
                    verify.observed[sector as usize] = value;
                    verify.remaining -= 1;
                }
            }
        }
        Ok(())
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}
