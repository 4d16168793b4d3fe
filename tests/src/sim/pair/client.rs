//! The clients of the two-node simulator and the reference model of the volume.
//!
//! Clients reach the volume through the cluster IP: a client connects to the board its ARP cache
//! names (announcements move it; a connect that fails resolves again), and keeps that connection
//! until it breaks: the board stops serving or resets the connection, another board announces
//! the address (the clients' next segments reach that board, which resets them), or no reply
//! comes for `CLIENT_TIMEOUT_MS`; or until the client closes it to reconnect. A request already
//! in a board's socket buffer reaches its daemon whatever happened since: a stalled or hung old
//! primary that resumes still gets the requests sent to it before (the adversarial case the
//! lease and the degrade procedure exist for).
//!
//! The model records every write: when it was issued (sent by the client) and when a node
//! acknowledged it (the engine's `Done`, the instant of the promise, whether or not the reply
//! reaches the client). From it come two checkers:
//! - **never two writers**: acknowledgements come in terms of `(epoch, node)` that only grow;
//!   a node acknowledging after another node acknowledged in a term at least as high is two
//!   writers at once;
//! - **every acknowledged write is readable**: a read returns, and after the pair settles the
//!   volume holds, for each block the value of the last write acknowledged before the read was
//!   issued, or of a write issued after that one whose outcome the client did not learn.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::super::prng::{mix, Prng};
use super::{Outcome, Violation};

/// Bytes in one block of the workload.
pub(super) const BLOCK_BYTES: u64 = 1024;
/// A client gives up on a connection whose oldest request has had no reply for this long.
pub(super) const CLIENT_TIMEOUT_MS: u64 = 4_000;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Write { block: u64, value: u64, fua: bool },
    Read { block: u64 },
    Flush,
}

/// A request sent by a client.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) client: usize,
    pub(super) conn: u64,
    pub(super) board: usize,
    pub(super) op: Op,
    pub(super) issued_at: u64,
}

/// What comes back on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    Done(u64),
    /// The board closed or reset the connection.
    End,
}

/// One client's TCP connection to a board's NBD server.
#[derive(Debug)]
pub(super) struct ClientConn {
    pub(super) id: u64,
    pub(super) board: usize,
    /// The daemon life of the board it was accepted by.
    pub(super) life: u64,
    /// Requests on their way to the board: (due, tag).
    pub(super) to_board: VecDeque<(u64, u64)>,
    /// Replies on their way to the client: (due, reply).
    pub(super) to_client: VecDeque<(u64, Reply)>,
    /// Requests sent and not answered.
    pub(super) in_flight: BTreeMap<u64, Op>,
    pub(super) last_progress: u64,
    /// The client stops sending and closes once every reply is in.
    pub(super) closing: bool,
    pub(super) close_at: u64,
}

impl ClientConn {
    /// Queues `reply` to the client, due at `at` but never before what is already on its way.
    fn queue_reply(&mut self, at: u64, reply: Reply) {
        let at = self.to_client.back().map_or(at, |(t, _)| (*t).max(at));
        self.to_client.push_back((at, reply));
    }
}

#[derive(Debug, Default)]
pub(super) struct Client {
    pub(super) conn: Option<ClientConn>,
    pub(super) next_connect_at: u64,
    pub(super) next_request_at: u64,
}

/// One write to a block, as the model knows it.
#[derive(Debug, Clone, Copy)]
struct WriteRec {
    value: u64,
    issued_at: u64,
    acked_at: Option<u64>,
}

/// The reference model: every write of every block, and the acknowledgement terms.
#[derive(Debug, Default)]
pub(super) struct Model {
    blocks: HashMap<u64, Vec<WriteRec>>,
    /// The highest `(epoch, node)` that acknowledged a write, and when.
    last_term: Option<(u64, usize, u64)>,
    pub(super) reads_checked: u64,
}

/// The bytes of a block holding `value` (0: zeroes, the value of a block never written). The
/// first 8 bytes are the value itself, so a read tells which write it returns.
pub(super) fn block_bytes(value: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_BYTES as usize];
    if value == 0 {
        return out;
    }
    out[..8].copy_from_slice(&value.to_le_bytes());
    let mut state = value;
    for chunk in out[8..].chunks_mut(8) {
        state = mix(&[state]);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// The value a block's bytes hold, or `None` when they are no write's.
pub(super) fn block_value(bytes: &[u8]) -> Option<u64> {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    let value = u64::from_le_bytes(first);
    (block_bytes(value) == bytes).then_some(value)
}

impl Model {
    pub(super) fn issue_write(&mut self, block: u64, value: u64, now: u64) {
        self.blocks.entry(block).or_default().push(WriteRec {
            value,
            issued_at: now,
            acked_at: None,
        });
    }

    /// A node acknowledged a write: checks that no other node acknowledged in a term at least
    /// as high before.
    pub(super) fn ack_write(
        &mut self,
        block: u64,
        value: u64,
        node: usize,
        epoch: u64,
        now: u64,
    ) -> Result<(), (Violation, String)> {
        if let Some((last_epoch, last_node, at)) = self.last_term {
            let name = |n: usize| super::NAMES[n];
            if node != last_node && epoch <= last_epoch {
                return Err((Violation::TwoWriters, format!(
                    "two writers: {} acknowledged a write at epoch {epoch} after {} acknowledged one at epoch {last_epoch} ({} ms before)",
                    name(node),
                    name(last_node),
                    now - at
                )));
            }
            if node == last_node && epoch < last_epoch {
                return Err((Violation::TwoWriters, format!(
                    "{} acknowledged a write at epoch {epoch} after acknowledging at epoch {last_epoch}",
                    name(node)
                )));
            }
        }
        self.last_term = Some((epoch, node, now));
        let rec = self
            .blocks
            .get_mut(&block)
            .and_then(|recs| recs.iter_mut().rev().find(|r| r.value == value));
        match rec {
            Some(rec) if rec.acked_at.is_none() => {
                rec.acked_at = Some(now);
                Ok(())
            }
            _ => Err((
                Violation::Broken,
                format!("write {value:#x} to block {block} acknowledged twice or never issued"),
            )),
        }
    }

    /// The values a read of `block` issued at `issued_at` and answered at `done_at` may return.
    pub(super) fn allowed(&self, block: u64, issued_at: u64, done_at: u64) -> Vec<u64> {
        let Some(recs) = self.blocks.get(&block) else {
            return vec![0];
        };
        let last = recs
            .iter()
            .filter(|r| r.acked_at.is_some_and(|t| t < issued_at))
            .max_by_key(|r| r.acked_at);
        let mut allowed = vec![last.map_or(0, |r| r.value)];
        let after = last.map(|r| r.issued_at);
        for r in recs {
            if after.is_none_or(|t| r.issued_at > t) && r.issued_at <= done_at {
                allowed.push(r.value);
            }
        }
        allowed
    }

    /// Checks what a read (or the settled volume) returned for `block`.
    pub(super) fn check_read(
        &mut self,
        block: u64,
        bytes: &[u8],
        issued_at: u64,
        done_at: u64,
        what: &str,
    ) -> Result<(), String> {
        self.reads_checked += 1;
        let Some(value) = block_value(bytes) else {
            return Err(format!(
                "{what} of block {block} returned bytes that no write wrote"
            ));
        };
        let allowed = self.allowed(block, issued_at, done_at);
        if allowed.contains(&value) {
            return Ok(());
        }
        Err(format!(
            "{what} of block {block} returned {value:#x}, expected one of {allowed:x?} (an acknowledged write is lost); writes: {}",
            self.history(block)
        ))
    }

    /// The writes of `block`, for a failure message.
    pub(super) fn history(&self, block: u64) -> String {
        let recs = self.blocks.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        let history: Vec<String> = recs
            .iter()
            .map(|r| match r.acked_at {
                Some(t) => format!("{:#x} issued {} acked {t}", r.value, r.issued_at),
                None => format!("{:#x} issued {} not acked", r.value, r.issued_at),
            })
            .collect();
        format!("[{}]", history.join(", "))
    }
}

/// The clients, their requests in flight and the model.
#[derive(Debug)]
pub(super) struct Workload {
    pub(super) clients: Vec<Client>,
    /// Every request a board may still answer, by tag.
    pub(super) requests: BTreeMap<u64, Request>,
    /// Blocks with a write the clients still wait for.
    pub(super) writing: BTreeSet<u64>,
    pub(super) model: Model,
    /// New requests are sent (off while the pair settles).
    pub(super) active: bool,
    pub(super) prng: Prng,
    pub(super) blocks: u64,
    pub(super) hot_blocks: u64,
    pub(super) depth: usize,
    pub(super) think_ms_max: u64,
    next_tag: u64,
    next_conn: u64,
    seed: u64,
    writes_issued: u64,
}

impl Workload {
    pub(super) fn new(count: usize, blocks: u64, mut prng: Prng, seed: u64) -> Workload {
        let depth = prng.pick(&[1, 2, 4, 8]);
        let think_ms_max = prng.pick(&[2, 5, 20, 50]);
        let hot_blocks = prng.pick(&[16, 64, 512]).min(blocks);
        Workload {
            clients: (0..count).map(|_| Client::default()).collect(),
            requests: BTreeMap::new(),
            writing: BTreeSet::new(),
            model: Model::default(),
            active: count > 0,
            prng,
            blocks,
            hot_blocks,
            depth,
            think_ms_max,
            next_tag: 1,
            next_conn: 1,
            seed,
            writes_issued: 0,
        }
    }

    pub(super) fn new_conn_id(&mut self) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        id
    }

    /// Draws the next request of client `client` (None when every block it drew is busy).
    pub(super) fn draw_op(&mut self, now: u64) -> Option<Op> {
        let roll = self.prng.below(100);
        if roll < 5 {
            return Some(Op::Flush);
        }
        let block = if self.prng.chance(500_000) {
            self.prng.below(self.hot_blocks)
        } else {
            self.prng.below(self.blocks)
        };
        if roll < 25 {
            return Some(Op::Read { block });
        }
        if self.writing.contains(&block) {
            return None;
        }
        self.writes_issued += 1;
        let value = mix(&[self.seed, self.writes_issued, 0x77]) | 1;
        self.writing.insert(block);
        self.model.issue_write(block, value, now);
        Some(Op::Write {
            block,
            value,
            fua: self.prng.chance(100_000),
        })
    }

    pub(super) fn new_tag(&mut self) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        tag
    }

    /// The client learned how a request ended (a reply, or its connection broke).
    pub(super) fn settle_request(&mut self, op: Op) {
        if let Op::Write { block, .. } = op {
            self.writing.remove(&block);
        }
    }

    /// Requests the clients still wait for.
    pub(super) fn waiting(&self) -> usize {
        self.clients
            .iter()
            .filter_map(|c| c.conn.as_ref())
            .map(|c| c.in_flight.len())
            .sum()
    }
}

// ---- the clients on the LAN ------------------------------------------------------------------

use super::board::Input;
use super::lan::Host;
use super::{PairSim, NAMES};
use tandem::nbd::{VolumeDone, VolumeRequest};
use tandem_board::IoBuf;

/// One-way latency between a client and a board.
const CLIENT_LATENCY_MS: (u64, u64) = (1, 3);

impl PairSim {
    /// The earliest instant a client has something to do.
    pub(super) fn clients_next(&self) -> Option<u64> {
        let mut next = u64::MAX;
        for client in &self.work.clients {
            let Some(conn) = &client.conn else {
                if self.work.active {
                    next = next.min(client.next_connect_at);
                }
                continue;
            };
            let board = Host::Board(conn.board);
            let up = self.boards[conn.board].kernel_up();
            if let Some((at, _)) = conn.to_client.front() {
                if up && self.lan.lan_path(board, Host::Client) {
                    next = next.min(*at);
                }
            }
            if let Some((at, _)) = conn.to_board.front() {
                if up && self.lan.lan_path(Host::Client, board) {
                    next = next.min(*at);
                }
            }
            if !conn.in_flight.is_empty() {
                next = next.min(conn.last_progress + CLIENT_TIMEOUT_MS);
            }
            if self.work.active && !conn.closing {
                next = next.min(conn.close_at);
                if conn.in_flight.len() < self.work.depth {
                    next = next.min(client.next_request_at);
                }
            }
        }
        (next != u64::MAX).then_some(next)
    }

    /// Every client acts: replies and requests move, connections break or open, new
    /// requests go out.
    pub(super) fn tick_clients(&mut self) {
        for c in 0..self.work.clients.len() {
            self.tick_client(c);
        }
    }

    fn tick_client(&mut self, c: usize) {
        let now = self.now;
        let Some(conn) = self.work.clients[c].conn.as_mut() else {
            if self.work.active && now >= self.work.clients[c].next_connect_at {
                self.try_connect(c);
            }
            return;
        };
        let b = conn.board;
        let up = self.boards[b].kernel_up();
        // Replies.
        while up && self.lan.lan_path(Host::Board(b), Host::Client) {
            let Some(conn) = self.work.clients[c].conn.as_mut() else {
                return;
            };
            if conn.to_client.front().is_none_or(|(at, _)| *at > now) {
                break;
            }
            let Some((_, reply)) = conn.to_client.pop_front() else {
                break;
            };
            match reply {
                Reply::Done(tag) => {
                    if let Some(op) = conn.in_flight.remove(&tag) {
                        conn.last_progress = now;
                        self.work.settle_request(op);
                    }
                }
                Reply::End => {
                    self.break_conn(c);
                    return;
                }
            }
        }
        // Requests.
        while up && self.lan.lan_path(Host::Client, Host::Board(b)) {
            let Some(conn) = self.work.clients[c].conn.as_mut() else {
                return;
            };
            if conn.to_board.front().is_none_or(|(at, _)| *at > now) {
                break;
            }
            let Some((_, tag)) = conn.to_board.pop_front() else {
                break;
            };
            let (id, life) = (conn.id, conn.life);
            let board = &mut self.boards[b];
            if board.daemon_alive() && board.life == life && board.nbd_open.contains(&id) {
                board.push_input(now, Input::Nbd { conn: id, tag });
            } else {
                // The socket is gone on the board (reboot, restart, closed): a reset.
                self.work.requests.remove(&tag);
                self.break_conn(c);
                return;
            }
        }
        let Some(conn) = self.work.clients[c].conn.as_mut() else {
            return;
        };
        if !conn.in_flight.is_empty() && now >= conn.last_progress + CLIENT_TIMEOUT_MS {
            self.break_conn(c);
            return;
        }
        if now >= conn.close_at {
            conn.closing = true;
        }
        if conn.closing {
            if conn.in_flight.is_empty() {
                let id = conn.id;
                self.boards[b].nbd_open.remove(&id);
                let client = &mut self.work.clients[c];
                client.conn = None;
                client.next_connect_at = now + self.work.prng.range(1, 200);
            }
            return;
        }
        if !self.work.active
            || conn.in_flight.len() >= self.work.depth
            || now < self.work.clients[c].next_request_at
        {
            return;
        }
        let Some(op) = self.work.draw_op(now) else {
            return;
        };
        let tag = self.work.new_tag();
        let latency = self
            .work
            .prng
            .range(CLIENT_LATENCY_MS.0, CLIENT_LATENCY_MS.1);
        let think = self.work.prng.range(0, self.work.think_ms_max);
        let Some(conn) = self.work.clients[c].conn.as_mut() else {
            return;
        };
        if conn.in_flight.is_empty() {
            conn.last_progress = now;
        }
        conn.in_flight.insert(tag, op);
        conn.to_board.push_back((now + latency, tag));
        let id = conn.id;
        self.work.clients[c].next_request_at = now + think;
        self.work.requests.insert(
            tag,
            Request {
                client: c,
                conn: id,
                board: b,
                op,
                issued_at: now,
            },
        );
    }

    /// The client's connection is gone: what it waited for has an unknown outcome.
    fn break_conn(&mut self, c: usize) {
        let now = self.now;
        let delay = self.work.prng.range(100, 500);
        let client = &mut self.work.clients[c];
        let Some(conn) = client.conn.take() else {
            return;
        };
        client.next_connect_at = now + delay;
        // What never left the client never reaches a board.
        for (_, tag) in conn.to_board {
            self.work.requests.remove(&tag);
        }
        for (_, op) in conn.in_flight {
            self.work.settle_request(op);
        }
    }

    /// The board the cluster IP resolves to: the cached one while its kernel holds the address
    /// and answers, else whoever answers a broadcast (the latest to announce, if both do).
    fn resolve(&mut self) -> Option<usize> {
        let answers = |sim: &PairSim, b: usize| {
            sim.lan.holders[b]
                && sim.boards[b].kernel_up()
                && sim.lan.lan_both_ways(Host::Client, Host::Board(b))
        };
        if let Some(b) = self.lan.arp_cache {
            if answers(self, b) {
                return Some(b);
            }
        }
        let best = (0..2)
            .filter(|&b| answers(self, b))
            .max_by_key(|&b| self.lan.last_announce[b]);
        self.lan.arp_cache = best;
        best
    }

    fn try_connect(&mut self, c: usize) {
        let now = self.now;
        let target = if self.options.cluster_ip {
            self.resolve()
        } else {
            // No cluster IP: the clients are pointed at whichever board serves.
            (0..2).find(|&b| self.boards[b].running() && self.boards[b].serving)
        };
        let retry = self.work.prng.range(100, 400);
        let Some(b) = target else {
            self.work.clients[c].next_connect_at = now + retry;
            return;
        };
        let board = &self.boards[b];
        let accepted = board.running()
            && board.serving
            && (!self.options.cluster_ip || self.lan.holders[b])
            && self.lan.lan_both_ways(Host::Client, Host::Board(b));
        if !accepted {
            if self.lan.arp_cache == Some(b) {
                self.lan.arp_cache = None;
            }
            self.work.clients[c].next_connect_at = now + retry;
            return;
        }
        let id = self.work.new_conn_id();
        let life = self.boards[b].life;
        self.boards[b].nbd_open.insert(id);
        let close_at = now + self.work.prng.range(1_000, 8_000);
        self.work.clients[c].conn = Some(ClientConn {
            id,
            board: b,
            life,
            to_board: VecDeque::new(),
            to_client: VecDeque::new(),
            in_flight: BTreeMap::new(),
            last_progress: now,
            closing: false,
            close_at,
        });
        self.work.clients[c].next_request_at = now;
    }

    /// Board `i` announced the cluster IP: the clients' connections to the other board break.
    pub(super) fn reset_clients_of_other(&mut self, i: usize) {
        for c in 0..self.work.clients.len() {
            if self.work.clients[c]
                .conn
                .as_ref()
                .is_some_and(|conn| conn.board != i)
            {
                self.break_conn(c);
            }
        }
    }

    /// Board `i`'s server closes every client connection (it stopped serving, or its daemon
    /// went away with its kernel still up): the clients see the end after what was sent.
    pub(super) fn close_nbd(&mut self, i: usize) {
        let now = self.now;
        let open = std::mem::take(&mut self.boards[i].nbd_open);
        for client in &mut self.work.clients {
            if let Some(conn) = client.conn.as_mut() {
                if conn.board == i && open.contains(&conn.id) {
                    conn.queue_reply(now + 1, Reply::End);
                }
            }
        }
    }

    /// Board `i`'s engine finished request `tag`: a write's acknowledgement is recorded (and
    /// checked for a second writer), a read's data is checked, and the reply goes back if the
    /// connection is still there.
    pub(super) fn request_done(&mut self, i: usize, tag: u64, done: VolumeDone) -> Outcome<()> {
        let Some(request) = self.work.requests.remove(&tag) else {
            return Err(self.fail(
                Violation::Broken,
                &format!(
                    "{} finished request {tag}, which it does not hold (twice, or never sent)",
                    NAMES[i]
                ),
            ));
        };
        if request.board != i {
            return Err(self.fail(
                Violation::Broken,
                &format!(
                    "{} finished request {tag}, which was sent to {}",
                    NAMES[i], NAMES[request.board]
                ),
            ));
        }
        let now = self.now;
        if self.options.trace {
            let text = format!("request {tag} done: {}", done_text(&done));
            self.event(Some(i), super::Event::Note(text));
        }
        let epoch = self.boards[i].mirror.as_ref().map_or(0, |m| m.epoch());
        let ok = matches!(done, VolumeDone::Buf(_) | VolumeDone::Done);
        match request.op {
            Op::Write { block, value, .. } if ok => {
                let result = self.work.model.ack_write(block, value, i, epoch, now);
                result.map_err(|e| self.fail(e.0, &e.1))?;
                self.acks.push(super::Ack {
                    at: now,
                    board: i,
                    epoch,
                });
                self.fingerprint(&value.to_le_bytes());
            }
            Op::Read { block } => {
                if let VolumeDone::Buf(buf) = &done {
                    let result = self.work.model.check_read(
                        block,
                        buf.as_slice(),
                        request.issued_at,
                        now,
                        &format!("a read from {}", NAMES[i]),
                    );
                    result.map_err(|e| self.fail(Violation::LostWrite, &e))?;
                }
            }
            _ => {}
        }
        if !self.boards[i].nbd_open.contains(&request.conn) {
            return Ok(());
        }
        let span = CLIENT_LATENCY_MS.1 - CLIENT_LATENCY_MS.0 + 1;
        let latency = CLIENT_LATENCY_MS.0 + self.draw(&[tag, 0x7e91]) % span;
        if let Some(conn) = self.work.clients[request.client]
            .conn
            .as_mut()
            .filter(|conn| conn.id == request.conn)
        {
            conn.queue_reply(now + latency, Reply::Done(tag));
        }
        Ok(())
    }

    /// The volume request a client's tag stands for.
    pub(super) fn volume_request(&self, tag: u64) -> Option<VolumeRequest> {
        let request = self.work.requests.get(&tag)?;
        Some(match request.op {
            Op::Write { block, value, fua } => {
                let bytes = block_bytes(value);
                let mut buf = IoBuf::new(bytes.len());
                buf.set_len(bytes.len());
                buf.as_mut_slice().copy_from_slice(&bytes);
                VolumeRequest::Write {
                    offset: block * BLOCK_BYTES,
                    buf,
                    fua,
                }
            }
            Op::Read { block } => {
                let mut buf = IoBuf::new(BLOCK_BYTES as usize);
                buf.set_len(BLOCK_BYTES as usize);
                VolumeRequest::Read {
                    offset: block * BLOCK_BYTES,
                    buf,
                }
            }
            Op::Flush => VolumeRequest::Flush,
        })
    }
}

fn done_text(done: &VolumeDone) -> String {
    match done {
        VolumeDone::Buf(_) | VolumeDone::Done => "ok".to_string(),
        VolumeDone::Failed { error, .. } => format!("error {error}"),
        VolumeDone::Extents(_) => "extents".to_string(),
    }
}
