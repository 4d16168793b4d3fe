//! The runtime's side of the peer links: TCP connections on the two cables.
//!
//! On each link the node whose name sorts first connects (from its `local` address, so the
//! traffic leaves on that cable) and the other accepts on its `local` address, taking only a
//! connection that comes from the configured `remote` address. A connection that ends is
//! retried with a backoff from 100 ms to 1 s; a connection that lived long enough resets it.
//!
//! Each link has two socket slots. While a session is up, a new connection handshakes in the
//! other slot and replaces the session only once it has authenticated (the core decides, see
//! `peer::link`), so a connection from the peer's address that never proves itself cannot take
//! an authenticated link down. Everything said on a connection is the node's business
//! (`Node::handle_link_*`): the runtime moves bytes and reports ends.

use super::{now, Runtime, StartError, TOKEN_LINK, TOKEN_LINK_LISTEN};
use crate::config::{Config, LinkAddrs};
use crate::peer::link::LinkConn;
use crate::peer::{LinkKind, Role as LinkRole, PEER_KEY_BYTES};
use crate::time::Instant;
use rustix::event::epoll;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;

/// The first wait before reconnecting a link, doubled after each failure.
const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
/// The longest wait before reconnecting.
const RECONNECT_BACKOFF_MAX_MS: u64 = 1_000;
/// A connection that lived this long resets the backoff.
const CONNECTION_STABLE_MS: u64 = 5_000;
/// Bytes read from a link socket at a time.
const LINK_READ_BYTES: usize = 64 << 10;
/// Socket slots per link: the session and one candidate.
const SLOTS_PER_LINK: usize = 2;
/// Socket slots in all.
const SLOT_COUNT: usize = 2 * SLOTS_PER_LINK;

const LINKS: [LinkKind; 2] = [LinkKind::Heartbeat, LinkKind::Lan];

/// Link sockets are watched edge-triggered both ways: queued frames wait for a writable edge.
const LINK_EVENTS: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::OUT)
    .union(epoll::EventFlags::ET)
    .union(epoll::EventFlags::RDHUP);

fn index(link: LinkKind) -> usize {
    link.index()
}

/// The socket slots of a link.
fn slots_of(link: LinkKind) -> std::ops::Range<usize> {
    index(link) * SLOTS_PER_LINK..(index(link) + 1) * SLOTS_PER_LINK
}

/// The link a socket slot belongs to.
pub(super) fn link_of(slot: usize) -> LinkKind {
    LINKS[(slot / SLOTS_PER_LINK).min(1)]
}

/// One TCP connection on a link.
#[derive(Debug)]
struct LinkSocket {
    stream: TcpStream,
    /// The node's id for it, once the TCP connection is up.
    conn: Option<LinkConn>,
    connected_at: Instant,
    outq: VecDeque<Vec<u8>>,
    /// Bytes of the front of `outq` already written.
    sent: usize,
}

/// The peer links' sockets and reconnect timers.
#[derive(Debug)]
pub(super) struct PeerSockets {
    /// This node connects; the peer accepts.
    is_initiator: bool,
    addrs: [LinkAddrs; 2],
    listeners: [Option<TcpListener>; 2],
    sockets: [Option<LinkSocket>; SLOT_COUNT],
    next_attempt: [Instant; 2],
    backoff_ms: [u64; 2],
    /// The last stranger refused per link, so a port scan logs once.
    last_stranger: [Option<SocketAddr>; 2],
}

impl PeerSockets {
    /// Binds the listeners (on the accepting node) for `[peer]`.
    pub(super) fn bind(config: &Config) -> Result<Option<PeerSockets>, StartError> {
        let Some(peer) = &config.peer else {
            return Ok(None);
        };
        let is_initiator = config.node.name < peer.name;
        let addrs = [peer.heartbeat, peer.lan];
        let mut listeners = [None, None];
        if !is_initiator {
            for link in LINKS {
                let addr = addrs[index(link)].local;
                let what = format!("[peer] {link} local");
                listeners[index(link)] = Some(super::bind_tcp(addr, &what)?);
            }
        }
        Ok(Some(PeerSockets {
            is_initiator,
            addrs,
            listeners,
            sockets: Default::default(),
            next_attempt: [Instant::default(); 2],
            backoff_ms: [RECONNECT_BACKOFF_MIN_MS; 2],
            last_stranger: [None, None],
        }))
    }

    /// When the next reconnect attempt is due, if one is waiting.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        if !self.is_initiator {
            return None;
        }
        LINKS
            .iter()
            .filter(|link| self.is_idle(**link))
            .map(|link| self.next_attempt[index(*link)])
            .min()
    }

    /// True when the link has no socket at all.
    fn is_idle(&self, link: LinkKind) -> bool {
        slots_of(link).all(|slot| self.sockets[slot].is_none())
    }

    fn slot_of(&self, conn: LinkConn) -> Option<usize> {
        slots_of(conn.link).find(|slot| {
            self.sockets[*slot]
                .as_ref()
                .is_some_and(|s| s.conn == Some(conn))
        })
    }

    fn schedule_retry(&mut self, link: LinkKind, now: Instant, lived_ms: u64) {
        let i = index(link);
        if lived_ms >= CONNECTION_STABLE_MS {
            self.backoff_ms[i] = RECONNECT_BACKOFF_MIN_MS;
        }
        self.next_attempt[i] = now.plus_millis(self.backoff_ms[i]);
        self.backoff_ms[i] = (self.backoff_ms[i] * 2).min(RECONNECT_BACKOFF_MAX_MS);
    }
}

fn connect_from(local: SocketAddr, remote: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if remote.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_tcp_nodelay(&fd, true)?;
    rustix::net::bind(&fd, &SocketAddr::new(local.ip(), 0))?;
    match rustix::net::connect(&fd, &remote) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}
fn random_nonce() -> [u8; 32] {
    // The kernel's generator does not fail once booted; a bug if it does.
    super::random_bytes().unwrap_or_else(|e| panic!("getrandom failed: {e}"))
}
pub(super) fn read_key(config: &Config) -> Result<Option<[u8; PEER_KEY_BYTES]>, StartError> {
    let Some(peer) = &config.peer else {
        return Ok(None);
    };
    let bytes = std::fs::read(&peer.key_file)
        .map_err(|e| StartError::Internal(format!("key_file {}: {e}", peer.key_file.display())))?;
    let key: [u8; PEER_KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
        StartError::Internal(format!(
            "key_file {}: {} bytes, expected {PEER_KEY_BYTES}",
            peer.key_file.display(),
            bytes.len()
        ))
    })?;
    Ok(Some(key))
}

impl Runtime {
    /// Registers the link listeners with epoll.
    pub(super) fn register_peer(&self) -> rustix::io::Result<()> {
        let Some(peer) = &self.peer else {
            return Ok(());
        };
        for link in LINKS {
            if let Some(listener) = &peer.listeners[index(link)] {
                let token = epoll::EventData::new_u64(TOKEN_LINK_LISTEN | index(link) as u64);
                epoll::add(&self.epoll, listener, token, epoll::EventFlags::IN)?;
            }
        }
        Ok(())
    }

    /// Starts the connects that are due (on the connecting node).
    pub(super) fn maintain_links(&mut self, now: Instant) {
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        if !peer.is_initiator {
            return;
        }
        for link in LINKS {
            let i = index(link);
            if !peer.is_idle(link) || now < peer.next_attempt[i] {
                continue;
            }
            let slot = slots_of(link).start;
            let LinkAddrs { local, remote } = peer.addrs[i];
            match connect_from(local, remote) {
                Ok(stream) => {
                    let token = epoll::EventData::new_u64(TOKEN_LINK | slot as u64);
                    if epoll::add(&self.epoll, &stream, token, LINK_EVENTS).is_err() {
                        peer.schedule_retry(link, now, 0);
                        continue;
                    }
                    peer.sockets[slot] = Some(LinkSocket {
                        stream,
                        conn: None,
                        connected_at: now,
                        outq: VecDeque::new(),
                        sent: 0,
                    });
                }
                Err(e) => {
                    log::debug!("peer: connect on {link} failed at once (error={e})");
                    peer.schedule_retry(link, now, 0);
                }
            }
        }
    }

    /// A link listener is readable: take the peer's connection.
    pub(super) fn accept_link(&mut self, i: usize) {
        let link = LINKS[i.min(1)];
        loop {
            let Some(peer) = self.peer.as_mut() else {
                return;
            };
            let Some(listener) = &peer.listeners[index(link)] else {
                return;
            };
            let (stream, from) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("peer: accept on {link} failed (error={e})");
                    return;
                }
            };
            if from.ip() != peer.addrs[index(link)].remote.ip() {
                if peer.last_stranger[index(link)] != Some(from) {
                    log::warn!(
                        "peer: refused a connection on {link} from {from} (not the peer's address)"
                    );
                    peer.last_stranger[index(link)] = Some(from);
                }
                continue;
            }
            let _ = stream.set_nonblocking(true);
            let _ = stream.set_nodelay(true);
            // A free slot, or the one an unauthenticated candidate holds: the session's slot is
            // never given up before a newcomer has authenticated.
            let current = self.node.link_current_conn(link);
            let free = slots_of(link).find(|slot| peer.sockets[*slot].is_none());
            let replaceable = slots_of(link).find(|slot| {
                peer.sockets[*slot]
                    .as_ref()
                    .is_some_and(|s| s.conn.is_none() || s.conn != current)
            });
            let Some(slot) = free.or(replaceable) else {
                continue;
            };
            self.drop_link(slot, now());
            let token = epoll::EventData::new_u64(TOKEN_LINK | slot as u64);
            if epoll::add(&self.epoll, &stream, token, LINK_EVENTS).is_err() {
                continue;
            }
            let now = now();
            let conn =
                self.node
                    .handle_link_connected(link, LinkRole::Responder, random_nonce(), now);
            if let Some(peer) = self.peer.as_mut() {
                peer.sockets[slot] = Some(LinkSocket {
                    stream,
                    conn,
                    connected_at: now,
                    outq: VecDeque::new(),
                    sent: 0,
                });
            }
        }
    }

    /// A link socket has news: its connect finished, bytes arrived, or it can take more.
    pub(super) fn service_link(&mut self, slot: usize, flags: epoll::EventFlags) {
        if slot >= SLOT_COUNT {
            return;
        }
        let link = link_of(slot);
        let now = now();
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        let Some(socket) = peer.sockets[slot].as_mut() else {
            return;
        };
        if socket.conn.is_none() {
            // A connect in progress: it finished when the socket turned writable (or failed).
            let done = epoll::EventFlags::OUT | epoll::EventFlags::ERR | epoll::EventFlags::HUP;
            if !flags.intersects(done) {
                return;
            }
            let failed = match rustix::net::sockopt::socket_error(&socket.stream) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(error) = failed {
                log::debug!("peer: connect on {link} failed (error={error})");
                self.drop_link(slot, now);
                return;
            }
            socket.connected_at = now;
            let conn =
                self.node
                    .handle_link_connected(link, LinkRole::Initiator, random_nonce(), now);
            if let Some(socket) = self.peer.as_mut().and_then(|p| p.sockets[slot].as_mut()) {
                socket.conn = conn;
            }
        }
        let readable = epoll::EventFlags::IN
            | epoll::EventFlags::HUP
            | epoll::EventFlags::ERR
            | epoll::EventFlags::RDHUP;
        if flags.intersects(readable) {
            self.read_link(slot, now);
        }
        self.flush_link(slot, now);
    }

    fn read_link(&mut self, slot: usize, now: Instant) {
        let mut buf = vec![0u8; LINK_READ_BYTES];
        loop {
            let Some(socket) = self.peer.as_mut().and_then(|p| p.sockets[slot].as_mut()) else {
                return;
            };
            let Some(conn) = socket.conn else {
                return;
            };
            match socket.stream.read(&mut buf) {
                Ok(0) => {
                    self.drop_link(slot, now);
                    return;
                }
                Ok(n) => self.node.handle_link_bytes(conn, &buf[..n], now),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_link(slot, now);
                    return;
                }
            }
        }
    }

    /// Queues bytes for the connection `conn` (dropped if it is gone).
    pub(super) fn send_link(&mut self, conn: LinkConn, bytes: Vec<u8>) {
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        let Some(slot) = peer.slot_of(conn) else {
            return;
        };
        if let Some(socket) = peer.sockets[slot].as_mut() {
            socket.outq.push_back(bytes);
        }
        self.flush_link(slot, now());
    }

    /// Closes the connection `conn` if a slot still holds it.
    pub(super) fn close_link(&mut self, conn: LinkConn) {
        let slot = self.peer.as_ref().and_then(|p| p.slot_of(conn));
        if let Some(slot) = slot {
            self.drop_link(slot, now());
        }
    }

    fn flush_link(&mut self, slot: usize, now: Instant) {
        let Some(socket) = self.peer.as_mut().and_then(|p| p.sockets[slot].as_mut()) else {
            return;
        };
        if socket.conn.is_none() {
            return;
        }
        while let Some(front) = socket.outq.front() {
            match socket.stream.write(&front[socket.sent..]) {
                Ok(n) => {
                    socket.sent += n;
                    if socket.sent == front.len() {
                        socket.outq.pop_front();
                        socket.sent = 0;
                    }
                }
                // The kernel's buffer is full: the rest waits for the next writable edge.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_link(slot, now);
                    return;
                }
            }
        }
    }

    /// Forgets a slot's socket, tells the node, and schedules a reconnect when the link is idle.
    fn drop_link(&mut self, slot: usize, now: Instant) {
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        let Some(socket) = peer.sockets[slot].take() else {
            return;
        };
        let _ = epoll::delete(&self.epoll, socket.stream.as_fd());
        let link = link_of(slot);
        if peer.is_idle(link) {
            let lived_ms = now.millis_since(socket.connected_at);
            peer.schedule_retry(link, now, lived_ms);
        }
        if let Some(conn) = socket.conn {
            self.node.handle_link_closed(conn);
        }
    }
}
