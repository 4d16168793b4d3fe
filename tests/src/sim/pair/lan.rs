//! The network of the two-node simulator: the cables, the peer links as TCP connections, and
//! who can hear whom on the LAN.
//!
//! What it owns:
//! - the **cables**: the heartbeat cable between the boards, and each board's LAN cable to the
//!   switch (the gateway and the clients hang off the switch too), plus the faults that are not
//!   a whole cable: one direction of a board's LAN port that loses every frame, one direction of
//!   a peer link that loses every frame, and extra delay on one direction of a peer link;
//! - the **peer connections**: each is a TCP connection on one link with an ordered byte pipe per
//!   direction. A segment leaves its pipe when it is due, its path is open and the receiving
//!   board's kernel runs; while the path is closed it waits (TCP retransmits), so a cut delays
//!   bytes and never tears a frame. An end that is gone (its board rebooted, its daemon
//!   restarted, or it closed) answers data with a reset;
//! - the **cluster IP's holders** (the boards whose kernel holds the address) and the clients'
//!   ARP cache (which board the address resolves to);
//! - the recent bytes of every link direction, for replays.
//!
//! The uncovered fault of DESIGN.md §4 (the boards hidden from each other while both reach the
//! gateway) cannot be built from these faults one at a time: a board that loses the LAN towards
//! its peer (a cable, or its port's direction) loses the gateway too, and a peer link that loses
//! frames one way leaves the other link up.

use std::collections::VecDeque;

use tandem::peer::link::LinkConn;
use tandem::peer::LinkKind;

/// Chunks kept per link direction for replays.
const HISTORY_CHUNKS: usize = 32;
/// The connecting node's reconnect backoff (`runtime/peer.rs`).
pub(super) const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
const RECONNECT_BACKOFF_MAX_MS: u64 = 1_000;
/// A connection that lived this long resets the backoff.
const CONNECTION_STABLE_MS: u64 = 5_000;
/// A connect that gets no answer fails after this long. (The runtime sets no timeout of its
/// own: the kernel's SYN retransmissions, 1, 3, 7, 15, 31 s apart, would decide; this models a
/// runtime that gives up after a second.)
pub(super) const CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Something on the LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Host {
    Board(usize),
    Gateway,
    Client,
}

/// What travels in a pipe: bytes, or the end of the connection (a FIN or a reset).
#[derive(Debug)]
pub(super) enum Payload {
    Bytes(Vec<u8>),
    End,
}

#[derive(Debug)]
pub(super) struct Segment {
    /// Due at this instant (global milliseconds).
    pub(super) at: u64,
    pub(super) payload: Payload,
}

/// One TCP connection on a peer link. Board 0 (`nas-a`, whose name sorts first) connects;
/// board 1 accepts.
#[derive(Debug)]
pub(super) struct PeerConn {
    pub(super) id: u64,
    pub(super) link: LinkKind,
    /// Each board's id for it, once its daemon took it (`handle_link_connected`).
    pub(super) ends: [Option<LinkConn>; 2],
    /// The socket exists on that board (the daemon has not closed it, the board did not
    /// reboot, the daemon did not restart).
    pub(super) open: [bool; 2],
    /// The daemon life each end belongs to.
    pub(super) lives: [u64; 2],
    /// Board 0 -> board 1, and board 1 -> board 0.
    pub(super) pipes: [VecDeque<Segment>; 2],
    pub(super) opened_at: u64,
    /// A reset already went back in this direction.
    pub(super) reset_sent: [bool; 2],
}

/// The state of the cables, ports and peer links that the faults change; the default is the
/// healthy network, which repairing every fault brings back.
#[derive(Debug)]
pub(super) struct LanFaults {
    /// The heartbeat cable is plugged in.
    pub(super) hb_cable: bool,
    /// Each board's LAN cable is plugged in.
    pub(super) lan_cable: [bool; 2],
    /// A board's LAN port loses every inbound (rx) or outbound (tx) frame.
    pub(super) port_rx_loss: [bool; 2],
    pub(super) port_tx_loss: [bool; 2],
    /// `[link][from board]`: the peer link loses every frame in that direction.
    pub(super) link_loss: [[bool; 2]; 2],
    /// `[link][from board]`: extra delay.
    pub(super) link_extra_ms: [[u64; 2]; 2],
    /// The switch hides the boards from each other (port isolation: the uncovered fault, only
    /// set by a scenario).
    pub(super) boards_isolated: bool,
}

impl Default for LanFaults {
    fn default() -> LanFaults {
        LanFaults {
            hb_cable: true,
            lan_cable: [true, true],
            port_rx_loss: [false, false],
            port_tx_loss: [false, false],
            link_loss: [[false; 2]; 2],
            link_extra_ms: [[0; 2]; 2],
            boards_isolated: false,
        }
    }
}

impl LanFaults {
    /// The loss flag of one direction of board `board`'s LAN port.
    pub(super) fn port_loss(&mut self, board: usize, inbound: bool) -> &mut bool {
        if inbound {
            &mut self.port_rx_loss[board]
        } else {
            &mut self.port_tx_loss[board]
        }
    }
}

impl PeerConn {
    /// Queues `payload` from board `from`, due at `at` but never before what is already queued
    /// (a TCP stream keeps its order).
    fn queue(&mut self, from: usize, at: u64, payload: Payload) {
        let pipe = &mut self.pipes[from];
        let at = pipe.back().map_or(at, |s| s.at.max(at));
        pipe.push_back(Segment { at, payload });
    }
}

/// The LAN, the heartbeat cable and the peer connections.
#[derive(Debug)]
pub(super) struct Lan {
    pub(super) faults: LanFaults,
    /// `[link][from board]`: base one-way latency.
    pub(super) link_latency_ms: [[u64; 2]; 2],
    /// The boards whose kernel holds the cluster IP.
    pub(super) holders: [bool; 2],
    /// The clients' ARP entry for the cluster IP.
    pub(super) arp_cache: Option<usize>,
    /// When each board last announced the address (gratuitous ARP reaching the clients).
    pub(super) last_announce: [Option<u64>; 2],
    pub(super) conns: Vec<PeerConn>,
    next_conn_id: u64,
    /// `[link][from board]`: recent chunks, for replays.
    history: [[VecDeque<Vec<u8>>; 2]; 2],
}

impl Lan {
    pub(super) fn new(latencies: [[u64; 2]; 2]) -> Lan {
        Lan {
            faults: LanFaults::default(),
            link_latency_ms: latencies,
            holders: [false, false],
            arp_cache: None,
            last_announce: [None, None],
            conns: Vec::new(),
            next_conn_id: 1,
            history: Default::default(),
        }
    }

    /// A frame sent by `from` reaches `to` on the LAN (the switch itself never fails).
    pub(super) fn lan_path(&self, from: Host, to: Host) -> bool {
        let f = &self.faults;
        let sends = match from {
            Host::Board(i) => f.lan_cable[i] && !f.port_tx_loss[i],
            _ => true,
        };
        let receives = match to {
            Host::Board(i) => f.lan_cable[i] && !f.port_rx_loss[i],
            _ => true,
        };
        let hidden =
            f.boards_isolated && matches!(from, Host::Board(_)) && matches!(to, Host::Board(_));
        sends && receives && !hidden
    }

    /// Both ways between two hosts.
    pub(super) fn lan_both_ways(&self, a: Host, b: Host) -> bool {
        self.lan_path(a, b) && self.lan_path(b, a)
    }

    /// Frames on `link` from board `from` reach the other board.
    pub(super) fn link_path(&self, link: LinkKind, from: usize) -> bool {
        let carried = match link {
            LinkKind::Heartbeat => self.faults.hb_cable,
            LinkKind::Lan => self.lan_path(Host::Board(from), Host::Board(1 - from)),
        };
        carried && !self.faults.link_loss[link.index()][from]
    }

    /// The latency of the next segment on `link` from `from`.
    pub(super) fn latency_ms(&self, link: LinkKind, from: usize) -> u64 {
        self.link_latency_ms[link.index()][from] + self.faults.link_extra_ms[link.index()][from]
    }

    /// A new connection on `link`, open on both boards (the responder's daemon takes it later).
    pub(super) fn open_conn(&mut self, link: LinkKind, lives: [u64; 2], now: u64) -> u64 {
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        self.conns.push(PeerConn {
            id,
            link,
            ends: [None, None],
            open: [true, true],
            lives,
            pipes: [VecDeque::new(), VecDeque::new()],
            opened_at: now,
            reset_sent: [false, false],
        });
        id
    }

    pub(super) fn conn_mut(&mut self, id: u64) -> Option<&mut PeerConn> {
        self.conns.iter_mut().find(|c| c.id == id)
    }

    pub(super) fn conn(&self, id: u64) -> Option<&PeerConn> {
        self.conns.iter().find(|c| c.id == id)
    }

    /// The open connection that board `board` knows as `lc`.
    pub(super) fn find_end(&self, board: usize, lc: LinkConn) -> Option<u64> {
        self.conns
            .iter()
            .find(|c| c.open[board] && c.ends[board] == Some(lc))
            .map(|c| c.id)
    }

    /// Board `board` has a socket on `link` (the runtime reconnects only an idle link).
    pub(super) fn has_socket(&self, board: usize, link: LinkKind) -> bool {
        self.conns.iter().any(|c| c.link == link && c.open[board])
    }

    /// Queues bytes from `from` on connection `id`, after everything already queued.
    pub(super) fn send(&mut self, id: u64, from: usize, bytes: Vec<u8>, at: u64) {
        let Some(link) = self.conn(id).map(|c| c.link) else {
            return;
        };
        let history = &mut self.history[link.index()][from];
        if history.len() == HISTORY_CHUNKS {
            history.pop_front();
        }
        history.push_back(bytes.clone());
        if let Some(conn) = self.conn_mut(id) {
            conn.queue(from, at, Payload::Bytes(bytes));
        }
    }

    /// Board `from` closes its end: the other end sees the end of the stream after the bytes
    /// already queued.
    pub(super) fn close_end(&mut self, id: u64, from: usize, at: u64) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if !conn.open[from] {
            return;
        }
        conn.open[from] = false;
        conn.queue(from, at, Payload::End);
    }

    /// Every socket of board `board` vanishes without a word (power cut, reboot).
    pub(super) fn vanish(&mut self, board: usize) {
        for conn in &mut self.conns {
            conn.open[board] = false;
        }
        self.collect();
    }

    /// The kernel of board `board` closes every socket of its dead daemon: the other ends see
    /// resets, a link's latency later.
    pub(super) fn close_all(&mut self, board: usize, now: u64) {
        let ends: Vec<(u64, LinkKind)> = self
            .conns
            .iter()
            .filter(|c| c.open[board])
            .map(|c| (c.id, c.link))
            .collect();
        for (id, link) in ends {
            let at = now + self.latency_ms(link, board);
            self.close_end(id, board, at);
        }
    }

    /// Forgets connections that neither board holds any more.
    pub(super) fn collect(&mut self) {
        self.conns.retain(|c| c.open[0] || c.open[1]);
    }

    /// Appends a copy of an earlier chunk of `link` in direction `from` (replayed or
    /// duplicated) to the current connection on that link, if there is one.
    pub(super) fn inject_replay(
        &mut self,
        link: LinkKind,
        from: usize,
        pick: u64,
        latest: bool,
        at: u64,
    ) {
        let history = &self.history[link.index()][from];
        if history.is_empty() {
            return;
        }
        let index = if latest {
            history.len() - 1
        } else {
            (pick % history.len() as u64) as usize
        };
        let chunk = history[index].clone();
        if let Some(conn) = self
            .conns
            .iter_mut()
            .rev()
            .find(|c| c.link == link && c.open[0] && c.open[1])
        {
            conn.queue(from, at, Payload::Bytes(chunk));
        }
    }
}

// ---- moving segments -------------------------------------------------------------------------

use super::board::Input;
use super::{Outcome, PairSim, A, B};
use tandem::peer::Role as LinkRole;

impl PairSim {
    /// The earliest instant a segment can move (segments whose path is closed wait for a
    /// change of the faults, which is an event of its own).
    pub(super) fn pipes_next(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        for conn in &self.lan.conns {
            for from in 0..2 {
                let Some(front) = conn.pipes[from].front() else {
                    continue;
                };
                if self.lan.link_path(conn.link, from) && self.boards[1 - from].kernel_up() {
                    next = Some(next.map_or(front.at, |n| n.min(front.at)));
                }
            }
        }
        next
    }

    /// Segments that are due and whose path is open reach the other board's kernel: into its
    /// daemon's inputs if the end is still its, else answered by a reset.
    pub(super) fn deliver_pipes(&mut self) {
        let now = self.now;
        for index in 0..self.lan.conns.len() {
            for from in 0..2 {
                let to = 1 - from;
                loop {
                    let conn = &self.lan.conns[index];
                    let due = conn.pipes[from].front().is_some_and(|s| s.at <= now);
                    if !due || !self.lan.link_path(conn.link, from) || !self.boards[to].kernel_up()
                    {
                        break;
                    }
                    let link = conn.link;
                    let back_at = now + self.lan.latency_ms(link, to);
                    let conn = &mut self.lan.conns[index];
                    let Some(segment) = conn.pipes[from].pop_front() else {
                        break;
                    };
                    let board = &mut self.boards[to];
                    let ours =
                        conn.open[to] && conn.lives[to] == board.life && board.daemon_alive();
                    match segment.payload {
                        Payload::Bytes(bytes) if ours => {
                            board.push_input(
                                now,
                                Input::Bytes {
                                    conn: conn.id,
                                    bytes,
                                },
                            );
                        }
                        Payload::End if ours => board.push_input(now, Input::End { conn: conn.id }),
                        Payload::Bytes(_) => {
                            // Data for a socket that is gone: the kernel answers with a reset.
                            if conn.open[from] && !conn.reset_sent[to] {
                                conn.reset_sent[to] = true;
                                conn.pipes[to].push_back(Segment {
                                    at: back_at,
                                    payload: Payload::End,
                                });
                            }
                        }
                        Payload::End => {}
                    }
                }
            }
        }
    }

    /// Board 0 connects the links (`runtime/peer.rs`): an idle link is connected when its
    /// backoff has passed; a connect succeeds once the path is open both ways and the peer's
    /// kernel answers (its daemon's listener accepts, or it resets the attempt).
    pub(super) fn maintain_links(&mut self) -> Outcome<()> {
        for link in [LinkKind::Heartbeat, LinkKind::Lan] {
            let li = link.index();
            let now = self.now;
            let started = match self.boards[A].connecting[li] {
                Some(started) => started,
                None => {
                    if self.lan.has_socket(A, link) || now < self.boards[A].next_attempt[li] {
                        continue;
                    }
                    self.boards[A].connecting[li] = Some(now);
                    now
                }
            };
            let reachable = self.lan.link_path(link, A)
                && self.lan.link_path(link, B)
                && self.boards[B].kernel_up();
            if reachable && self.boards[B].daemon_alive() {
                self.boards[A].connecting[li] = None;
                let lives = [self.boards[A].life, self.boards[B].life];
                let id = self.lan.open_conn(link, lives, now);
                self.boards[B].push_input(now, Input::Accept { conn: id });
                self.connected(A, id, link, LinkRole::Initiator)?;
            } else if reachable || now - started >= CONNECT_TIMEOUT_MS {
                // Reset by a kernel with no listener, or no answer in time.
                self.boards[A].connecting[li] = None;
                self.schedule_retry(link, 0);
            }
        }
        Ok(())
    }

    /// Board `i`'s daemon takes connection `id` (its end known from then on), then says what
    /// it has to say on it.
    pub(super) fn connected(
        &mut self,
        i: usize,
        id: u64,
        link: LinkKind,
        role: LinkRole,
    ) -> Outcome<()> {
        let nonce = self.random_bytes();
        let clock = self.boards[i].clock(self.now);
        let Some(mirror) = self.boards[i].mirror.as_mut() else {
            return Ok(());
        };
        let lc = mirror.handle_link_connected(link, role, nonce, clock);
        if let Some(c) = self.lan.conn_mut(id) {
            c.ends[i] = Some(lc);
        }
        self.route(i)
    }

    /// A socket of board `i` on `link` is gone: the connecting node retries once the link is
    /// idle, with a backoff that a long-lived connection resets.
    pub(super) fn link_dropped(&mut self, i: usize, link: LinkKind, opened_at: u64) {
        self.lan.collect();
        if i == A && !self.lan.has_socket(A, link) {
            self.schedule_retry(link, self.now - opened_at);
        }
    }

    fn schedule_retry(&mut self, link: LinkKind, lived_ms: u64) {
        let li = link.index();
        let board = &mut self.boards[A];
        if lived_ms >= CONNECTION_STABLE_MS {
            board.backoff_ms[li] = RECONNECT_BACKOFF_MIN_MS;
        }
        board.next_attempt[li] = self.now + board.backoff_ms[li];
        board.backoff_ms[li] = (board.backoff_ms[li] * 2).min(RECONNECT_BACKOFF_MAX_MS);
    }
}
