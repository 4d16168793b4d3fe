//! The node's two links to its peer (the heartbeat cable and the lan), as the core sees them.
//!
//! Each link is at most one TCP connection at a time, which is either handshaking (`Handshake`)
//! or up (an authenticated `Session`). The runtime owns the sockets: it reports a connection
//! (`handle_connected`), its bytes and its end, and carries out `LinkOutput`s. While a link is up,
//! a keepalive frame goes out every heartbeat interval; a link that hears nothing for the dead
//! time is closed, and the runtime reconnects it. Refusals (a wrong key, another protocol
//! version, a stranger's name) close the connection and are logged once per change of reason,
//! so a peer that keeps retrying with the wrong key does not flood the events.
//!
//! Replication messages will ride on the same sessions (see docs/REPLICATION.md); today the
//! only frame kind after the handshake is the keepalive.

use super::{
    frame_kind, Established, FrameDecoder, Handshake, HandshakeConfig, HandshakeError, LinkKind,
    Role, Session, FRAME_HEADER_BYTES, PEER_KEY_BYTES, PEER_NONCE_BYTES, PEER_VOLUME_ID_BYTES,
};
use crate::time::Instant;
use std::collections::VecDeque;

/// The keepalive frame, which is the heartbeat. That it opens proves the peer is alive; its
/// 24-byte header (three little-endian u64: the sender's clock in ms, the last peer clock value
/// it received, and how long it held that value before this send) gives the round-trip time
/// without synchronised clocks: `rtt = now - echo - held`, all on the receiver's own clock. The
/// echo is also the primary's lease: the peer heard this node at `echo` on this node's clock, so
/// it cannot have taken over before `echo + dead time`. After the header comes the sender's state
/// (`replication::wire::Beat`), set by the engine with [`PeerLinks::set_beat`].
pub const FRAME_KEEPALIVE: u8 = frame_kind::APPLICATION_MIN;

/// Bytes of the keepalive header.
const KEEPALIVE_HEADER_BYTES: usize = 24;

/// A handshake that has not finished in this long is abandoned.
pub const LINK_HANDSHAKE_TIMEOUT_MS: u64 = 2_000;

/// One connection on one link; the generation tells a new connection from an old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConn {
    /// The link.
    pub link: LinkKind,
    /// Bumped for every connection on this link.
    pub generation: u32,
}

/// A link's state, for `status` and `links`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection.
    Down,
    /// Connected, handshake under way.
    Connecting,
    /// Authenticated and alive.
    Up,
}

impl LinkState {
    /// The word `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
        }
    }
}

/// What the links ask of the runtime.
#[derive(Debug)]
pub enum LinkOutput {
    /// Send these bytes on the connection.
    Send { conn: LinkConn, bytes: Vec<u8> },
    /// Close the connection (the runtime reconnects later).
    Close { conn: LinkConn },
}

/// What happened on the links, for the replication engine.
#[derive(Debug)]
pub enum LinkEvent {
    /// A link's session is established (authenticated both ways).
    Up(LinkKind),
    /// A link's session ended.
    Down(LinkKind),
    /// A heartbeat with the peer's state arrived; `sent_ms` is the peer's clock, which orders
    /// the heartbeats of both links.
    Beat {
        link: LinkKind,
        sent_ms: u64,
        body: Vec<u8>,
    },
    /// An application frame (not a keepalive) arrived on a link.
    Frame {
        link: LinkKind,
        kind: u8,
        body: Vec<u8>,
    },
}

/// What the links need to know, from the config and the volume.
#[derive(Clone)]
pub struct LinkSettings {
    /// The cluster key.
    pub key: [u8; PEER_KEY_BYTES],
    /// This node's name.
    pub node_name: String,
    /// The peer's name, as configured; anyone else is refused.
    pub peer_name: String,
    /// This node's volume identity.
    pub volume_id: [u8; PEER_VOLUME_ID_BYTES],
    /// How often a keepalive goes out.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a link is dead.
    pub dead_time_ms: u64,
}

impl std::fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSettings")
            .field("node_name", &self.node_name)
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Link {
    Down,
    Handshaking {
        conn: LinkConn,
        handshake: Box<Handshake>,
        started_at: Instant,
    },
    Up {
        conn: LinkConn,
        session: Box<Session>,
        decoder: FrameDecoder,
        last_heard: Instant,
        next_keepalive: Instant,
        /// The peer's clock in its last keepalive (0 = none yet) and when that arrived.
        peer_clock_ms: u64,
        peer_clock_heard: Instant,
        /// The last round-trip time measured.
        rtt_ms: Option<u64>,
        /// The newest echo of this node's clock the peer sent (0 = none yet).
        echo_ms: u64,
        established_at: Instant,
    },
}

/// What `links` shows of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// Down, connecting or up.
    pub state: LinkState,
    /// Milliseconds since the last frame on this link (while up).
    pub last_frame_age_ms: Option<u64>,
    /// The last round-trip time measured (while up).
    pub rtt_ms: Option<u64>,
}

/// A second connection on a link that is up: it must authenticate before it may replace the
/// session, so that a connection from the peer's address that never proves itself cannot take
/// an authenticated link down.
#[derive(Debug)]
struct Candidate {
    conn: LinkConn,
    handshake: Box<Handshake>,
    started_at: Instant,
}

/// Both links to the peer.
#[derive(Debug)]
pub struct PeerLinks {
    settings: LinkSettings,
    links: [Link; 2],
    candidates: [Option<Candidate>; 2],
    generations: [u32; 2],
    /// The last refusal logged per link, so a retry loop logs it once.
    last_refusal: [Option<String>; 2],
    /// The peer's volume identity, from the last handshake.
    peer_volume_id: Option<[u8; PEER_VOLUME_ID_BYTES]>,
    last_heard: Option<Instant>,
    /// `last_heard`, but only from frames that cannot have waited in a socket while this node
    /// was not running (see [`PeerLinks::last_heard_trusted`]).
    last_heard_trusted: Option<Instant>,
    /// When this node's inputs last came in (any call).
    last_turn: Option<Instant>,
    /// This node resumed here after a gap in its inputs (a hung daemon, a stalled board), and
    /// no keepalive has since echoed a time of this node's clock from after it.
    resumed_at: Option<Instant>,
    outputs: VecDeque<LinkOutput>,
    events: VecDeque<LinkEvent>,
    /// This node's state, sent after every keepalive header.
    beat: Vec<u8>,
    /// The state changed since the last keepalive: send one now.
    beat_changed: bool,
}

fn index(link: LinkKind) -> usize {
    link.index()
}

impl PeerLinks {
    /// Both links down.
    pub fn new(settings: LinkSettings) -> PeerLinks {
        PeerLinks {
            settings,
            links: [Link::Down, Link::Down],
            candidates: [None, None],
            generations: [0, 0],
            last_refusal: [None, None],
            peer_volume_id: None,
            last_heard: None,
            last_heard_trusted: None,
            last_turn: None,
            resumed_at: None,
            outputs: VecDeque::new(),
            events: VecDeque::new(),
            beat: Vec::new(),
            beat_changed: false,
        }
    }

    // ---- getters -------------------------------------------------------------------------

    /// The state of one link.
    pub fn state(&self, link: LinkKind) -> LinkState {
        match self.links[index(link)] {
            Link::Down => LinkState::Down,
            Link::Handshaking { .. } => LinkState::Connecting,
            Link::Up { .. } => LinkState::Up,
        }
    }

    /// The connection that is the link's session (or its only handshake), if any.
    pub fn current_conn(&self, link: LinkKind) -> Option<LinkConn> {
        self.conn(link)
    }

    /// What `links` shows of one link at `now`.
    pub fn info(&self, link: LinkKind, now: Instant) -> LinkInfo {
        match &self.links[index(link)] {
            Link::Up {
                last_heard, rtt_ms, ..
            } => LinkInfo {
                state: LinkState::Up,
                last_frame_age_ms: Some(now.millis_since(*last_heard)),
                rtt_ms: *rtt_ms,
            },
            _ => LinkInfo {
                state: self.state(link),
                last_frame_age_ms: None,
                rtt_ms: None,
            },
        }
    }

    /// True when at least one link is up.
    pub fn is_connected(&self) -> bool {
        self.links.iter().any(|l| matches!(l, Link::Up { .. }))
    }

    /// The lease this node holds: the peer heard it at this instant (on this node's clock) on
    /// some link that is up. `None` before the first echo.
    pub fn lease_echo(&self) -> Option<Instant> {
        self.links
            .iter()
            .filter_map(|link| match link {
                Link::Up { echo_ms, .. } if *echo_ms != 0 => Some(Instant::from_millis(*echo_ms)),
                _ => None,
            })
            .max()
    }

    /// Frames arrive but the peer has not heard this node for the dead time on any link that is
    /// up (one-way loss): the peer is "half" (DESIGN.md §4).
    pub fn is_half(&self, now: Instant) -> bool {
        let dead = self.settings.dead_time_ms;
        let mut any_up = false;
        for link in &self.links {
            if let Link::Up {
                echo_ms,
                established_at,
                last_heard,
                ..
            } = link
            {
                if now.millis_since(*last_heard) >= dead / 2 {
                    // Nothing arrives either: dying, not half.
                    return false;
                }
                any_up = true;
                let heard_from = if *echo_ms == 0 {
                    *established_at
                } else {
                    Instant::from_millis(*echo_ms)
                };
                if now.millis_since(heard_from) < dead {
                    return false;
                }
            }
        }
        any_up
    }

    /// Sets this node's state for the heartbeats; a change goes out at once.
    pub fn set_beat(&mut self, beat: &[u8]) {
        if self.beat != beat {
            self.beat.clear();
            self.beat.extend_from_slice(beat);
            self.beat_changed = true;
        }
    }

    /// When a frame last arrived from the peer on any link.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// When the peer was last heard, not counting what arrived after a gap in this node's own
    /// running until the peer proves it heard this node since (a keepalive echoing a time from
    /// after the gap). Bytes that waited in a socket through a hang would otherwise pass for
    /// news: a secondary's takeover deadline counts from this, so that it never outlasts the
    /// primary's degrade wait, which counts from when the primary last heard *this* node.
    pub fn last_heard_trusted(&self) -> Option<Instant> {
        self.last_heard_trusted
    }

    /// Every input passes here first: a gap of half the dead time since the previous one means
    /// this node was not running (its loop runs at least every heartbeat interval).
    fn note_turn(&mut self, now: Instant) {
        if self
            .last_turn
            .is_some_and(|last| now.millis_since(last) > self.settings.dead_time_ms / 2)
        {
            self.resumed_at = Some(now);
        }
        self.last_turn = Some(now);
    }

    /// A frame from the peer arrived now.
    fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
        if self.resumed_at.is_none() {
            self.last_heard_trusted = Some(now);
        }
    }

    /// The peer's volume identity, once a handshake has told it.
    pub fn peer_volume_id(&self) -> Option<[u8; PEER_VOLUME_ID_BYTES]> {
        self.peer_volume_id
    }

    /// The earliest instant at which `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.beat_changed && self.is_connected() {
            return Some(Instant::from_millis(0));
        }
        let candidates = self
            .candidates
            .iter()
            .flatten()
            .map(|c| c.started_at.plus_millis(LINK_HANDSHAKE_TIMEOUT_MS))
            .min();
        let links = self
            .links
            .iter()
            .filter_map(|link| match link {
                Link::Down => None,
                Link::Handshaking { started_at, .. } => {
                    Some(started_at.plus_millis(LINK_HANDSHAKE_TIMEOUT_MS))
                }
                Link::Up {
                    last_heard,
                    next_keepalive,
                    ..
                } => {
                    Some((*next_keepalive).min(last_heard.plus_millis(self.settings.dead_time_ms)))
                }
            })
            .min();
        match (links, candidates) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing for the runtime to do.
    pub fn poll_output(&mut self) -> Option<LinkOutput> {
        self.outputs.pop_front()
    }

    /// The next link event for the replication engine.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Closes one link's connection (the runtime reconnects).
    pub fn drop_link(&mut self, link: LinkKind, reason: &str) {
        if let Some(conn) = self.conn(link) {
            self.close(conn, reason);
        }
    }

    /// Closes both links' connections.
    pub fn drop_all(&mut self, reason: &str) {
        self.drop_link(LinkKind::Heartbeat, reason);
        self.drop_link(LinkKind::Lan, reason);
    }

    /// Seals an application frame (`header` then `payload`) onto `link`'s session. False when
    /// the link is not up, or the frame cannot be sealed (the session is then closed).
    pub fn send(&mut self, link: LinkKind, kind: u8, header: &[u8], payload: &[u8]) -> bool {
        let Link::Up { conn, session, .. } = &mut self.links[index(link)] else {
            return false;
        };
        let conn = *conn;
        let mut bytes = Vec::with_capacity(FRAME_HEADER_BYTES + header.len() + payload.len() + 16);
        match session.seal(kind, header, payload, &mut bytes) {
            Ok(()) => {
                self.outputs.push_back(LinkOutput::Send { conn, bytes });
                true
            }
            Err(e) => {
                self.close(conn, &format!("cannot seal a frame ({e})"));
                false
            }
        }
    }

    // ---- inputs --------------------------------------------------------------------------

    /// A TCP connection on `link` is open (this node connected: `Initiator`; accepted:
    /// `Responder`). Any older connection on the link is closed. Returns the connection's id.
    pub fn handle_connected(
        &mut self,
        link: LinkKind,
        role: Role,
        nonce: [u8; PEER_NONCE_BYTES],
        now: Instant,
    ) -> LinkConn {
        self.note_turn(now);
        let i = index(link);
        // On a link that is up, the new connection is only a candidate until it authenticates.
        let as_candidate = matches!(self.links[i], Link::Up { .. });
        if as_candidate {
            if let Some(old) = self.candidates[i].take() {
                self.outputs.push_back(LinkOutput::Close { conn: old.conn });
            }
        } else if let Some(old) = self.conn(link) {
            self.outputs.push_back(LinkOutput::Close { conn: old });
        }
        self.generations[i] = self.generations[i].wrapping_add(1);
        let conn = LinkConn {
            link,
            generation: self.generations[i],
        };
        let config = HandshakeConfig {
            key: &self.settings.key,
            node_name: &self.settings.node_name,
            volume_id: self.settings.volume_id,
            link,
            nonce,
        };
        match Handshake::new(role, config) {
            Ok(mut handshake) => {
                while let Some(bytes) = handshake.poll_transmit() {
                    self.outputs.push_back(LinkOutput::Send { conn, bytes });
                }
                let handshake = Box::new(handshake);
                if as_candidate {
                    self.candidates[i] = Some(Candidate {
                        conn,
                        handshake,
                        started_at: now,
                    });
                } else {
                    self.links[i] = Link::Handshaking {
                        conn,
                        handshake,
                        started_at: now,
                    };
                }
            }
            Err(e) => {
                // The config check refuses such names; this is only reached by a bug.
                log::error!("peer: cannot start a handshake (error={e})");
                if !as_candidate {
                    self.links[i] = Link::Down;
                }
                self.outputs.push_back(LinkOutput::Close { conn });
            }
        }
        conn
    }

    /// Bytes arrived on a connection.
    pub fn handle_bytes(&mut self, conn: LinkConn, bytes: &[u8], now: Instant) {
        self.note_turn(now);
        let i = index(conn.link);
        if let Some(candidate) = self.candidates[i].as_mut().filter(|c| c.conn == conn) {
            let result = candidate.handshake.handle_bytes(bytes);
            while let Some(frame) = candidate.handshake.poll_transmit() {
                self.outputs
                    .push_back(LinkOutput::Send { conn, bytes: frame });
            }
            match result {
                Err(e) => self.refuse(conn, &refusal_text(&e)),
                Ok(n) if candidate.handshake.is_established() => {
                    let Some(candidate) = self.candidates[i].take() else {
                        return;
                    };
                    if self.establish(conn, candidate.handshake, now) && n < bytes.len() {
                        self.handle_bytes(conn, &bytes[n..], now);
                    }
                }
                Ok(_) => {}
            }
            return;
        }
        if self.conn(conn.link) != Some(conn) {
            return;
        }
        let mut at = 0;
        if let Link::Handshaking { handshake, .. } = &mut self.links[i] {
            let result = handshake.handle_bytes(bytes);
            while let Some(frame) = handshake.poll_transmit() {
                self.outputs
                    .push_back(LinkOutput::Send { conn, bytes: frame });
            }
            match result {
                Err(e) => {
                    self.refuse(conn, &refusal_text(&e));
                    return;
                }
                Ok(n) if handshake.is_established() => {
                    at = n;
                    let Link::Handshaking { handshake, .. } =
                        std::mem::replace(&mut self.links[i], Link::Down)
                    else {
                        return;
                    };
                    if !self.establish(conn, handshake, now) {
                        return;
                    }
                }
                Ok(_) => return,
            }
        }
        while at < bytes.len() {
            let Link::Up {
                session,
                decoder,
                last_heard,
                peer_clock_ms,
                peer_clock_heard,
                rtt_ms,
                echo_ms,
                ..
            } = &mut self.links[i]
            else {
                return;
            };
            let taken = match decoder.handle_bytes(&bytes[at..]) {
                Ok(taken) => taken,
                Err(e) => {
                    self.close(conn, &format!("bad frame from the peer ({e})"));
                    return;
                }
            };
            at += taken;
            let Some(frame) = decoder.poll_frame() else {
                continue;
            };
            match session.open_in_place(frame) {
                Ok((FRAME_KEEPALIVE, body)) => {
                    *last_heard = now;
                    if let Some(header) = body.get(..KEEPALIVE_HEADER_BYTES) {
                        let field = |k: usize| {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&header[8 * k..8 * k + 8]);
                            u64::from_le_bytes(b)
                        };
                        let (sent, echo, held) = (field(0), field(1), field(2));
                        *peer_clock_ms = sent;
                        *peer_clock_heard = now;
                        let elapsed = now.as_millis().checked_sub(echo);
                        // An echo from the future is not ours: neither a lease nor an RTT.
                        if echo != 0 && echo <= now.as_millis() {
                            // A peer that claims to have held it longer than the round trip
                            // took is lying or confused: no measurement.
                            *rtt_ms = elapsed.and_then(|e| e.checked_sub(held));
                            *echo_ms = (*echo_ms).max(echo);
                            if self.resumed_at.is_some_and(|t| echo >= t.as_millis()) {
                                // The peer heard this node after the gap: news again.
                                self.resumed_at = None;
                            }
                        }
                        if body.len() > KEEPALIVE_HEADER_BYTES {
                            self.events.push_back(LinkEvent::Beat {
                                link: conn.link,
                                sent_ms: sent,
                                body: body[KEEPALIVE_HEADER_BYTES..].to_vec(),
                            });
                        }
                    }
                    // After the echo: a keepalive that proves the peer heard this node since
                    // its gap is itself news.
                    self.heard(now);
                }
                Ok((kind, body)) => {
                    // Every other frame is the replication engine's (which ignores kinds it
                    // does not know: a newer peer's).
                    *last_heard = now;
                    self.events.push_back(LinkEvent::Frame {
                        link: conn.link,
                        kind,
                        body: body.to_vec(),
                    });
                    self.heard(now);
                }
                Err(e) => {
                    // A frame that does not authenticate (forged, replayed, reordered) ends
                    // the session; the next connection has new keys.
                    self.close(conn, &format!("a frame failed to authenticate ({e})"));
                    return;
                }
            }
            if taken == 0 {
                break;
            }
        }
    }

    /// The connection ended (reset, EOF, or the runtime gave up on it).
    pub fn handle_closed(&mut self, conn: LinkConn) {
        let i = index(conn.link);
        if self.candidates[i].as_ref().is_some_and(|c| c.conn == conn) {
            self.candidates[i] = None;
            return;
        }
        if self.conn(conn.link) != Some(conn) {
            return;
        }
        let was_up = matches!(self.links[index(conn.link)], Link::Up { .. });
        self.links[index(conn.link)] = Link::Down;
        if was_up {
            self.events.push_back(LinkEvent::Down(conn.link));
            log::warn!(
                "peer link down (link={} reason=connection closed)",
                conn.link
            );
        }
    }

    /// Time passed: keepalives go out, silent links and stuck handshakes are closed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.note_turn(now);
        let beat_now = std::mem::take(&mut self.beat_changed);
        for i in 0..2 {
            let stuck = self.candidates[i]
                .as_ref()
                .filter(|c| now.millis_since(c.started_at) >= LINK_HANDSHAKE_TIMEOUT_MS)
                .map(|c| c.conn);
            if let Some(conn) = stuck {
                self.refuse(
                    conn,
                    "a new connection did not finish the handshake in time",
                );
            }
        }
        for i in 0..2 {
            match &mut self.links[i] {
                Link::Down => {}
                Link::Handshaking {
                    conn, started_at, ..
                } => {
                    if now.millis_since(*started_at) >= LINK_HANDSHAKE_TIMEOUT_MS {
                        let conn = *conn;
                        self.refuse(conn, "the peer did not finish the handshake in time");
                    }
                }
                Link::Up {
                    conn,
                    session,
                    last_heard,
                    next_keepalive,
                    peer_clock_ms,
                    peer_clock_heard,
                    ..
                } => {
                    let conn = *conn;
                    if now.millis_since(*last_heard) >= self.settings.dead_time_ms {
                        let dead_ms = now.millis_since(*last_heard);
                        self.close(conn, &format!("nothing heard for {dead_ms} ms"));
                        continue;
                    }
                    if now >= *next_keepalive || beat_now {
                        let mut header = [0u8; KEEPALIVE_HEADER_BYTES];
                        // A clock value of 0 means "none": the origin is never sent.
                        header[0..8].copy_from_slice(&now.as_millis().max(1).to_le_bytes());
                        if *peer_clock_ms != 0 {
                            let held = now.millis_since(*peer_clock_heard);
                            header[8..16].copy_from_slice(&peer_clock_ms.to_le_bytes());
                            header[16..24].copy_from_slice(&held.to_le_bytes());
                        }
                        let mut bytes = Vec::new();
                        match session.seal(FRAME_KEEPALIVE, &header, &self.beat, &mut bytes) {
                            Ok(()) => self.outputs.push_back(LinkOutput::Send { conn, bytes }),
                            Err(e) => {
                                self.close(conn, &format!("cannot seal a keepalive ({e})"));
                                continue;
                            }
                        }
                        if let Link::Up { next_keepalive, .. } = &mut self.links[i] {
                            *next_keepalive = now.plus_millis(self.settings.heartbeat_interval_ms);
                        }
                    }
                }
            }
        }
    }

    // ---- internals -----------------------------------------------------------------------

    fn conn(&self, link: LinkKind) -> Option<LinkConn> {
        match &self.links[index(link)] {
            Link::Down => None,
            Link::Handshaking { conn, .. } | Link::Up { conn, .. } => Some(*conn),
        }
    }

    /// Makes an authenticated connection the link's session (replacing the one before, if
    /// any). Returns false when the peer is not the configured one.
    fn establish(&mut self, conn: LinkConn, handshake: Box<Handshake>, now: Instant) -> bool {
        let i = index(conn.link);
        let Some((session, established)) = handshake.into_session() else {
            self.refuse(conn, "the handshake ended without a session");
            return false;
        };
        let Established {
            peer_name,
            peer_volume_id,
            ..
        } = established;
        if peer_name != self.settings.peer_name {
            let reason = format!(
                "the node that answered is '{peer_name}', not the configured peer '{}'",
                self.settings.peer_name
            );
            self.refuse(conn, &reason);
            return false;
        }
        if let Some(old) = self.conn(conn.link).filter(|old| *old != conn) {
            // The peer reconnected (it restarted, or its end of the old connection died):
            // the authenticated newcomer takes over.
            self.outputs.push_back(LinkOutput::Close { conn: old });
        }
        if matches!(self.links[i], Link::Up { .. }) {
            // Frames sent on the old session may be lost: the engine sees it go down.
            self.events.push_back(LinkEvent::Down(conn.link));
        }
        if self.peer_volume_id != Some(peer_volume_id) && peer_volume_id != self.settings.volume_id
        {
            log::info!(
                "peer volume identity differs from ours (link={} peer={peer_name}); pairing decides",
                conn.link
            );
        }
        self.peer_volume_id = Some(peer_volume_id);
        self.last_refusal[i] = None;
        self.heard(now);
        self.links[i] = Link::Up {
            conn,
            session: Box::new(session),
            decoder: FrameDecoder::for_session(),
            last_heard: now,
            // The first keepalive goes out at once: it tells the peer this side is up too.
            next_keepalive: now,
            peer_clock_ms: 0,
            peer_clock_heard: now,
            rtt_ms: None,
            echo_ms: 0,
            established_at: now,
        };
        log::info!("peer link up (link={} peer={peer_name})", conn.link);
        self.events.push_back(LinkEvent::Up(conn.link));
        self.handle_timeout(now);
        true
    }

    /// Ends a handshake that failed; logs the reason once per change.
    fn refuse(&mut self, conn: LinkConn, reason: &str) {
        let i = index(conn.link);
        if self.conn(conn.link) == Some(conn) {
            if matches!(self.links[i], Link::Up { .. }) {
                self.events.push_back(LinkEvent::Down(conn.link));
            }
            self.links[i] = Link::Down;
        }
        if self.candidates[i].as_ref().is_some_and(|c| c.conn == conn) {
            self.candidates[i] = None;
        }
        self.outputs.push_back(LinkOutput::Close { conn });
        if self.last_refusal[i].as_deref() != Some(reason) {
            log::warn!("peer refused (link={} reason={reason})", conn.link);
            self.last_refusal[i] = Some(reason.to_string());
        }
    }

    /// Ends a session.
    fn close(&mut self, conn: LinkConn, reason: &str) {
        if matches!(self.links[index(conn.link)], Link::Up { .. }) {
            self.events.push_back(LinkEvent::Down(conn.link));
        }
        self.links[index(conn.link)] = Link::Down;
        self.outputs.push_back(LinkOutput::Close { conn });
        log::warn!("peer link down (link={} reason={reason})", conn.link);
    }
}

/// A refusal as the operator reads it.
fn refusal_text(error: &HandshakeError) -> String {
    match error {
        HandshakeError::WrongKey => {
            "the peer does not hold the same cluster key (check [peer] key_file on both nodes)"
                .to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn settings(node: &str, peer: &str, key: [u8; 32]) -> LinkSettings {
        LinkSettings {
            key,
            node_name: node.to_string(),
            peer_name: peer.to_string(),
            volume_id: [1; 16],
            heartbeat_interval_ms: 100,
            dead_time_ms: 1000,
        }
    }

    /// Moves every Send output of `from` on `conn_from` into `to` on `conn_to`.
    fn pump(from: &mut PeerLinks, to: &mut PeerLinks, conn_to: LinkConn, now: Instant) -> usize {
        let mut moved = 0;
        let mut closes = 0;
        while let Some(output) = from.poll_output() {
            match output {
                LinkOutput::Send { bytes, .. } => {
                    moved += bytes.len();
                    to.handle_bytes(conn_to, &bytes, now);
                }
                LinkOutput::Close { .. } => closes += 1,
            }
        }
        moved + closes
    }

    /// Keepalives both ways every 100 ms from 100 to `until_ms`, delivered at once.
    fn keepalives_both_ways(
        a: &mut PeerLinks,
        b: &mut PeerLinks,
        (ca, cb): (LinkConn, LinkConn),
        until_ms: u64,
    ) {
        for ms in (100..=until_ms).step_by(100) {
            let now = Instant::from_millis(ms);
            a.handle_timeout(now);
            b.handle_timeout(now);
            pump(a, b, cb, now);
            pump(b, a, ca, now);
        }
    }

    fn connect(
        a: &mut PeerLinks,
        b: &mut PeerLinks,
        link: LinkKind,
        now: Instant,
    ) -> (LinkConn, LinkConn) {
        let ca = a.handle_connected(link, Role::Initiator, [1; 32], now);
        let cb = b.handle_connected(link, Role::Responder, [2; 32], now);
        for _ in 0..4 {
            pump(a, b, cb, now);
            pump(b, a, ca, now);
        }
        (ca, cb)
    }

    #[test]
    fn both_links_come_up_with_the_same_key() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let now = Instant::from_millis(0);
        connect(&mut a, &mut b, LinkKind::Heartbeat, now);
        connect(&mut a, &mut b, LinkKind::Lan, now);
        for links in [&a, &b] {
            assert_eq!(links.state(LinkKind::Heartbeat), LinkState::Up);
            assert_eq!(links.state(LinkKind::Lan), LinkState::Up);
            assert!(links.is_connected());
        }
    }

    #[test]
    fn a_wrong_key_is_refused_and_closed_on_both_sides() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", [8; 32]));
        let now = Instant::from_millis(0);
        connect(&mut a, &mut b, LinkKind::Heartbeat, now);
        assert_eq!(a.state(LinkKind::Heartbeat), LinkState::Down);
        assert_eq!(b.state(LinkKind::Heartbeat), LinkState::Down);
        assert!(a.last_refusal[0]
            .as_deref()
            .is_some_and(|r| r.contains("cluster key")));
    }

    #[test]
    fn a_stranger_is_refused_even_with_the_key() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-x", "nas-a", KEY));
        connect(&mut a, &mut b, LinkKind::Lan, Instant::from_millis(0));
        assert_eq!(a.state(LinkKind::Lan), LinkState::Down);
        assert!(a.last_refusal[1]
            .as_deref()
            .is_some_and(|r| r.contains("nas-x")));
    }

    #[test]
    fn keepalives_keep_a_link_up_and_silence_takes_it_down() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (ca, cb) = connect(&mut a, &mut b, LinkKind::Heartbeat, Instant::from_millis(0));
        // Three seconds of keepalives both ways, 100 ms apart.
        keepalives_both_ways(&mut a, &mut b, (ca, cb), 3000);
        assert_eq!(a.state(LinkKind::Heartbeat), LinkState::Up);
        assert_eq!(a.last_heard(), Some(Instant::from_millis(3000)));
        // Then b falls silent: a gives up after the dead time, not before.
        a.handle_timeout(Instant::from_millis(3999));
        assert_eq!(a.state(LinkKind::Heartbeat), LinkState::Up);
        a.handle_timeout(Instant::from_millis(4000));
        assert_eq!(a.state(LinkKind::Heartbeat), LinkState::Down);
        assert!(matches!(
            a.poll_output(),
            Some(LinkOutput::Send { .. }) | Some(LinkOutput::Close { .. })
        ));
    }

    /// b hangs for two seconds while a keeps sending; the keepalives wait in b's socket. On
    /// waking, b reads them: the link counts them (it stays up), but its trusted last-heard stays
    /// at the hang's start until a keepalive from a echoes a time of b's clock from after it.
    #[test]
    fn frames_that_waited_through_a_hang_are_not_trusted_until_the_peer_echoes_the_wake() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (ca, cb) = connect(&mut a, &mut b, LinkKind::Heartbeat, Instant::from_millis(0));
        keepalives_both_ways(&mut a, &mut b, (ca, cb), 1000);
        assert_eq!(b.last_heard_trusted(), Some(Instant::from_millis(1000)));
        // b hangs from 1000 to 3000; a's keepalives of 1100..=1500 wait for it.
        let mut waiting = Vec::new();
        for ms in (1100..=1500).step_by(100) {
            a.handle_timeout(Instant::from_millis(ms));
            while let Some(output) = a.poll_output() {
                if let LinkOutput::Send { bytes, .. } = output {
                    waiting.push(bytes);
                }
            }
        }
        let wake = Instant::from_millis(3000);
        for bytes in &waiting {
            b.handle_bytes(cb, bytes, wake);
        }
        assert_eq!(b.last_heard(), Some(wake));
        assert_eq!(b.last_heard_trusted(), Some(Instant::from_millis(1000)));
        // b's keepalive of 3000 reaches a, whose next one echoes it: news again.
        b.handle_timeout(wake);
        pump(&mut b, &mut a, ca, Instant::from_millis(3005));
        a.handle_timeout(Instant::from_millis(3100));
        pump(&mut a, &mut b, cb, Instant::from_millis(3105));
        assert_eq!(b.last_heard_trusted(), Some(Instant::from_millis(3105)));
    }

    #[test]
    fn keepalive_echoes_measure_the_round_trip_on_each_side() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (ca, cb) = connect(&mut a, &mut b, LinkKind::Lan, Instant::from_millis(1000));
        assert_eq!(
            a.info(LinkKind::Lan, Instant::from_millis(1000)).rtt_ms,
            None
        );
        // a's keepalive at 1100 reaches b 7 ms later; b answers at 1150, it reaches a 7 ms later.
        a.handle_timeout(Instant::from_millis(1100));
        pump(&mut a, &mut b, cb, Instant::from_millis(1107));
        b.handle_timeout(Instant::from_millis(1150));
        pump(&mut b, &mut a, ca, Instant::from_millis(1157));
        let info = a.info(LinkKind::Lan, Instant::from_millis(1160));
        assert_eq!(info.state, LinkState::Up);
        assert_eq!(info.rtt_ms, Some(14));
        assert_eq!(info.last_frame_age_ms, Some(3));
        assert_eq!(
            a.info(LinkKind::Heartbeat, Instant::from_millis(1160))
                .state,
            LinkState::Down
        );
    }

    #[test]
    fn a_changed_beat_goes_out_at_once_and_arrives_with_the_senders_clock() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (_, cb) = connect(&mut a, &mut b, LinkKind::Lan, Instant::from_millis(1000));
        while b.poll_event().is_some() {}
        a.set_beat(b"state one");
        assert_eq!(
            a.poll_timeout(),
            Some(Instant::from_millis(0)),
            "due at once"
        );
        a.handle_timeout(Instant::from_millis(1010));
        pump(&mut a, &mut b, cb, Instant::from_millis(1012));
        let beats: Vec<(u64, Vec<u8>)> = std::iter::from_fn(|| b.poll_event())
            .filter_map(|e| match e {
                LinkEvent::Beat { sent_ms, body, .. } => Some((sent_ms, body)),
                _ => None,
            })
            .collect();
        assert_eq!(beats, vec![(1010, b"state one".to_vec())]);
        // Setting the same state again sends nothing early.
        a.set_beat(b"state one");
        assert_ne!(a.poll_timeout(), Some(Instant::from_millis(0)));
    }

    #[test]
    fn the_lease_is_the_peers_echo_of_this_clock_and_silence_makes_the_peer_half() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (ca, cb) = connect(&mut a, &mut b, LinkKind::Lan, Instant::from_millis(1000));
        assert_eq!(a.lease_echo(), None, "no echo before a round trip");
        a.handle_timeout(Instant::from_millis(1100));
        pump(&mut a, &mut b, cb, Instant::from_millis(1105));
        b.handle_timeout(Instant::from_millis(1120));
        pump(&mut b, &mut a, ca, Instant::from_millis(1125));
        assert_eq!(a.lease_echo(), Some(Instant::from_millis(1100)));
        assert!(!a.is_half(Instant::from_millis(1130)));
        // From here on b hears nothing of a, while a keeps hearing b: a's lease stays where it
        // was, and after the dead time a sees its peer as half.
        for t in (1200..2200).step_by(100) {
            a.handle_timeout(Instant::from_millis(t));
            while a.poll_output().is_some() {}
            b.handle_timeout(Instant::from_millis(t + 20));
            pump(&mut b, &mut a, ca, Instant::from_millis(t + 25));
        }
        assert_eq!(a.lease_echo(), Some(Instant::from_millis(1100)));
        assert!(a.is_half(Instant::from_millis(2130)));
    }

    #[test]
    fn a_forged_frame_ends_the_session() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (ca, _) = connect(&mut a, &mut b, LinkKind::Lan, Instant::from_millis(0));
        // A well-framed frame whose ciphertext is garbage.
        let mut forged = vec![0, 0, 0, 18, FRAME_KEEPALIVE];
        forged.extend_from_slice(&[0x5a; 17]);
        a.handle_bytes(ca, &forged, Instant::from_millis(10));
        assert_eq!(a.state(LinkKind::Lan), LinkState::Down);
    }

    #[test]
    fn a_new_connection_replaces_the_old_one_and_stale_bytes_are_ignored() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let now = Instant::from_millis(0);
        let first = a.handle_connected(LinkKind::Heartbeat, Role::Responder, [3; 32], now);
        let second = a.handle_connected(LinkKind::Heartbeat, Role::Responder, [4; 32], now);
        assert_ne!(first, second);
        let closes: Vec<LinkConn> = std::iter::from_fn(|| a.poll_output())
            .filter_map(|o| match o {
                LinkOutput::Close { conn } => Some(conn),
                LinkOutput::Send { .. } => None,
            })
            .collect();
        assert_eq!(closes, vec![first]);
        a.handle_bytes(first, b"garbage", now);
        assert_eq!(a.state(LinkKind::Heartbeat), LinkState::Connecting);
    }

    #[test]
    fn a_connection_that_never_authenticates_does_not_take_an_up_link_down() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        // A dead time longer than the test, so that only the intruders can end anything.
        let mut b = PeerLinks::new(LinkSettings {
            dead_time_ms: 60_000,
            ..settings("nas-b", "nas-a", KEY)
        });
        let (_, cb) = connect(&mut a, &mut b, LinkKind::Heartbeat, Instant::from_millis(0));
        while b.poll_output().is_some() {}
        // A silent connection from the peer's address, then garbage, then nothing at all.
        let intruder = b.handle_connected(
            LinkKind::Heartbeat,
            Role::Responder,
            [9; 32],
            Instant::from_millis(10),
        );
        assert_eq!(b.state(LinkKind::Heartbeat), LinkState::Up);
        assert_eq!(b.current_conn(LinkKind::Heartbeat), Some(cb));
        b.handle_bytes(
            intruder,
            b"\x00\x00\x00\x05\x01junk",
            Instant::from_millis(20),
        );
        assert_eq!(b.state(LinkKind::Heartbeat), LinkState::Up);
        let silent = b.handle_connected(
            LinkKind::Heartbeat,
            Role::Responder,
            [10; 32],
            Instant::from_millis(30),
        );
        b.handle_timeout(Instant::from_millis(30 + LINK_HANDSHAKE_TIMEOUT_MS));
        assert!(
            b.candidates[0].is_none(),
            "the silent candidate was dropped"
        );
        let closes: Vec<LinkConn> = std::iter::from_fn(|| b.poll_output())
            .filter_map(|o| match o {
                LinkOutput::Close { conn } => Some(conn),
                LinkOutput::Send { .. } => None,
            })
            .collect();
        assert!(closes.contains(&intruder) && closes.contains(&silent) && !closes.contains(&cb));
        assert_eq!(b.current_conn(LinkKind::Heartbeat), Some(cb));
    }

    #[test]
    fn an_authenticated_reconnection_replaces_the_old_session() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let mut b = PeerLinks::new(settings("nas-b", "nas-a", KEY));
        let (_, old) = connect(&mut a, &mut b, LinkKind::Lan, Instant::from_millis(0));
        // nas-a restarts: a fresh node connects again while nas-b still holds the old session.
        let mut a2 = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        let (_, new) = connect(&mut a2, &mut b, LinkKind::Lan, Instant::from_millis(100));
        assert_ne!(old, new);
        assert_eq!(b.state(LinkKind::Lan), LinkState::Up);
        assert_eq!(b.current_conn(LinkKind::Lan), Some(new));
        assert_eq!(a2.state(LinkKind::Lan), LinkState::Up);
    }

    #[test]
    fn a_handshake_that_stalls_is_abandoned() {
        let mut a = PeerLinks::new(settings("nas-a", "nas-b", KEY));
        a.handle_connected(
            LinkKind::Lan,
            Role::Initiator,
            [5; 32],
            Instant::from_millis(0),
        );
        a.handle_timeout(Instant::from_millis(LINK_HANDSHAKE_TIMEOUT_MS - 1));
        assert_eq!(a.state(LinkKind::Lan), LinkState::Connecting);
        a.handle_timeout(Instant::from_millis(LINK_HANDSHAKE_TIMEOUT_MS));
        assert_eq!(a.state(LinkKind::Lan), LinkState::Down);
    }
}
