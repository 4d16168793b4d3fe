//! The peer link's secure channel: framing, the handshake, and the sealed session that follows.
//!
//! Every byte between the two nodes goes through here, on both links and in both directions,
//! through one code path: the heartbeat link is authenticated and encrypted exactly like the lan
//! link (DESIGN.md §2). The cluster key (32 bytes from `[peer] key_file`) is never used to
//! encrypt: each connection derives its own pair of session keys from both sides' nonces
//! (DESIGN.md §4 "Keys"). The module is sans-IO: it never touches a socket, a clock or
//! randomness; the caller passes bytes in, takes bytes out, and draws the nonce.
//!
//! ## Use
//!
//! 1. The node that opened the TCP connection is the [`Role::Initiator`], the one that
//!    accepted it the [`Role::Responder`]. Each makes a [`Handshake`] with a fresh random
//!    nonce, sends whatever [`Handshake::poll_transmit`] returns and feeds what it receives to
//!    [`Handshake::handle_bytes`] until [`Handshake::is_established`].
//! 2. [`Handshake::into_session`] gives the [`Session`] and what the peer said about itself
//!    ([`Established`]). Bytes left over after the last handshake frame belong to the session.
//!    Whether the peer's volume identity is acceptable is the caller's decision (a device never
//!    written may adopt its peer's identity, DESIGN.md §3).
//! 3. Frames are sealed with [`Session::seal`] and received through a [`FrameDecoder`], then
//!    opened with [`Session::open_in_place`] or [`Session::open_into`]. Any error (framing,
//!    handshake or open) means the stream can no longer be trusted: drop the connection and
//!    reconnect with a new handshake, whose fresh nonces give fresh keys.
//!
//! ## Wire format
//!
//! Every number is big-endian. Every frame, handshake or session, has the same envelope:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | `length`: u32, the bytes that follow; 1 ..= [`PEER_FRAME_BYTES_MAX`] (1 ..= [`PEER_HANDSHAKE_FRAME_BYTES_MAX`] during the handshake) |
//! | 4 | 1 | `kind`: [`frame_kind`]; `0x01` hello, `0x02` confirm, `0x10..=0xff` the caller's |
//! | 5 | `length - 1` | body |
//!
//! **Hello** (kind `0x01`, plaintext, the first frame each side sends; `n` is the name length):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | `length` = 57 + n |
//! | 4 | 1 | kind `0x01` |
//! | 5 | 4 | magic `"TNDM"` |
//! | 9 | 2 | `protocol_version`: u16 ([`PEER_PROTOCOL_VERSION`]) |
//! | 11 | 1 | `link`: 0 heartbeat, 1 lan |
//! | 12 | 16 | `volume_id` |
//! | 28 | 32 | `nonce`: fresh random bytes from the caller |
//! | 60 | 1 | n: 1 ..= [`PEER_NODE_NAME_BYTES_MAX`] |
//! | 61 | n | `node_name`, UTF-8 |
//!
//! The first 11 bytes are frozen for every future version, so that a peer of another version
//! is refused with [`HandshakeError::Version`] however the rest of its hello looks.
//!
//! **Sealed frame** (the Confirm, kind `0x02`, and every session frame; `p` plaintext bytes):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | `length` = 1 + p + 16 |
//! | 4 | 1 | kind |
//! | 5 | p | ChaCha20-Poly1305 ciphertext of the plaintext (`header` then `payload`) |
//! | 5 + p | 16 | Poly1305 tag |
//!
//! The AEAD key is the sender's direction key; the nonce is `00 00 00 00` then the frame's
//! counter as a u64 (0 for the Confirm, then 1, 2, ... in each direction, never sent); the
//! associated data is bytes 0..5 (length and kind).
//!
//! **Confirm** (kind `0x02`, counter 0): the plaintext is `"tandem/1 confirm"` (16 bytes) then
//! the transcript hash (32 bytes), so the frame is 69 bytes.
//!
//! ## Handshake
//!
//! ```text
//!  initiator (connected)                        responder (accepted)
//!  Hello(Ni)  ------------------------------->
//!             <-------------------------------  Hello(Nr)          (both sent at once)
//!  TH = SHA-256(initiator's hello frame || responder's hello frame), frames whole
//!  PRK/OKM = HKDF-SHA256(ikm = cluster key, salt = Ni || Nr, info = "tandem/1 " || TH), 64 bytes
//!  k_ir = OKM[0..32] (initiator -> responder), k_ri = OKM[32..64] (responder -> initiator)
//!  Confirm(k_ir, ctr 0) --------------------->
//!             <-------------------------------  Confirm(k_ri, ctr 0)
//!  session frames, counters from 1 in each direction
//! ```
//!
//! Each side checks the peer's hello, then the peer's Confirm; a refusal is final, sends
//! nothing more and yields no session:
//!
//! | check | error |
//! |---|---|
//! | `length` 0 or above [`PEER_HANDSHAKE_FRAME_BYTES_MAX`] | [`HandshakeError::Frame`] |
//! | a frame other than the expected hello, then confirm | [`HandshakeError::UnexpectedFrame`] |
//! | magic is not `"TNDM"` | [`HandshakeError::NotTandem`] |
//! | version differs (read before anything else, before any key use) | [`HandshakeError::Version`] |
//! | name empty, too long or not UTF-8; unknown link byte; bytes after the name | [`HandshakeError::MalformedHello`] |
//! | the peer's link byte differs from ours (ports crossed) | [`HandshakeError::LinkMismatch`] |
//! | the peer's nonce is ours (our own hello reflected) | [`HandshakeError::ReflectedNonce`] |
//! | the Confirm fails to authenticate (another cluster key, or a hello altered in transit) | [`HandshakeError::WrongKey`] |
//! | the Confirm authenticates but its text differs | [`HandshakeError::MalformedConfirm`] |
//!
//! The volume identity is not checked here: [`Established::peer_volume_id`] goes to the caller.
//! Because both nonces salt the keys and the transcript binds both hellos, a recorded hello or
//! Confirm replayed into a new connection fails as [`HandshakeError::WrongKey`], and a recorded
//! session frame fails to open.

pub mod link;
mod secure;

use std::collections::VecDeque;
use std::fmt;

pub use secure::{
    OpenError, SealError, Session, PEER_PLAINTEXT_BYTES_MAX, SEALED_FRAME_OVERHEAD_BYTES, TAG_BYTES,
};

/// The protocol version in every hello; a peer with another one is refused.
pub const PEER_PROTOCOL_VERSION: u16 = 1;

/// The largest `length` of a frame (the bytes after the length prefix): a 32 MiB payload, the
/// largest NBD request, with room for headers.
pub const PEER_FRAME_BYTES_MAX: u32 = (32 << 20) + (64 << 10);

/// The largest `length` accepted before the peer has authenticated: larger than any hello of
/// any version, small enough that an unauthenticated sender cannot make us buffer much.
pub const PEER_HANDSHAKE_FRAME_BYTES_MAX: u32 = 1024;

/// The longest node name in a hello, in bytes of UTF-8.
pub const PEER_NODE_NAME_BYTES_MAX: usize = 63;

/// Bytes of the cluster key.
pub const PEER_KEY_BYTES: usize = 32;

/// Bytes of each side's handshake nonce.
pub const PEER_NONCE_BYTES: usize = 32;

/// Bytes of a volume identity.
pub const PEER_VOLUME_ID_BYTES: usize = 16;

/// Bytes of the length prefix of every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;

/// Bytes of the envelope of every frame: length prefix and kind.
pub const FRAME_HEADER_BYTES: usize = FRAME_PREFIX_BYTES + 1;

/// The first bytes of a hello's body.
pub const HELLO_MAGIC: [u8; 4] = *b"TNDM";

/// Bytes of a hello frame without its node name.
const HELLO_FIXED_BYTES: usize = FRAME_HEADER_BYTES + 4 + 2 + 1 + 16 + 32 + 1;

const _: () = assert!(PEER_HANDSHAKE_FRAME_BYTES_MAX < PEER_FRAME_BYTES_MAX);
const _: () = assert!(
    HELLO_FIXED_BYTES + PEER_NODE_NAME_BYTES_MAX
        <= PEER_HANDSHAKE_FRAME_BYTES_MAX as usize + FRAME_PREFIX_BYTES
);
const _: () = assert!(PEER_NODE_NAME_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(PEER_FRAME_BYTES_MAX as usize <= isize::MAX as usize);

/// The kind byte of a frame. Kinds below [`frame_kind::APPLICATION_MIN`] belong to the
/// handshake; [`Session::seal`] refuses them and [`Session::open_in_place`] rejects them.
pub mod frame_kind {
    /// The plaintext hello that starts a connection.
    pub const HELLO: u8 = 0x01;
    /// The sealed confirmation that ends the handshake.
    pub const CONFIRM: u8 = 0x02;
    /// The first kind free for the caller's frames.
    pub const APPLICATION_MIN: u8 = 0x10;
}

/// Which of the two links a connection runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// The direct cable between the dedicated ports.
    Heartbeat,
    /// The client network.
    Lan,
}

impl LinkKind {
    /// 0 for the heartbeat link, 1 for the lan: where per-link state is kept in arrays.
    pub fn index(self) -> usize {
        match self {
            LinkKind::Heartbeat => 0,
            LinkKind::Lan => 1,
        }
    }

    /// The byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Heartbeat => 0,
            Self::Lan => 1,
        }
    }

    /// The link a wire byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Heartbeat),
            1 => Some(Self::Lan),
            _ => None,
        }
    }
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Heartbeat => write!(f, "heartbeat"),
            Self::Lan => write!(f, "lan"),
        }
    }
}

/// Why a stream's framing failed. The stream cannot be resynchronised: drop the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A length of 0: every frame has at least its kind byte.
    Empty,
    /// A length above the limit; nothing was allocated for it.
    TooLong {
        /// The length received.
        length: u32,
        /// The limit in force.
        length_max: u32,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "peer frame of length 0"),
            Self::TooLong { length, length_max } => write!(
                f,
                "peer frame of length {length} exceeds the limit of {length_max}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Cuts a byte stream into whole frames.
///
/// Memory grows with the bytes actually received, never with a declared length, and is capped
/// by the decoder's length limit; the buffer is kept from frame to frame, so once it has grown
/// to the largest frame of the stream it allocates nothing more. No input makes it panic. The frames it yields are not authenticated:
/// hand them to the handshake or to [`Session::open_in_place`].
#[derive(Debug)]
pub struct FrameDecoder {
    length_max: u32,
    /// The current frame, length prefix included.
    buffer: Vec<u8>,
    /// The whole size of the current frame, once its prefix is in.
    frame_bytes: Option<usize>,
    is_frame_complete: bool,
    error: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that refuses any frame whose `length` exceeds `length_max`.
    ///
    /// Panics if `length_max` exceeds [`PEER_FRAME_BYTES_MAX`] (a bug in the caller).
    pub fn new(length_max: u32) -> Self {
        assert!(length_max <= PEER_FRAME_BYTES_MAX);
        Self {
            length_max,
            buffer: Vec::new(),
            frame_bytes: None,
            is_frame_complete: false,
            error: None,
        }
    }

    /// A decoder for session frames, up to [`PEER_FRAME_BYTES_MAX`].
    pub fn for_session() -> Self {
        Self::new(PEER_FRAME_BYTES_MAX)
    }

    /// Takes bytes from the stream up to the end of one frame; returns how many it took. The
    /// frame returned by the last `poll_frame` is dropped first. Call again with the rest of
    /// the input once the frame (if any) has been taken.
    ///
    /// An error is final: every later call returns it again.
    pub fn handle_bytes(&mut self, bytes: &[u8]) -> Result<usize, FrameError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.is_frame_complete {
            self.buffer.clear();
            self.frame_bytes = None;
            self.is_frame_complete = false;
        }
        let mut consumed = 0;
        let frame_bytes = match self.frame_bytes {
            Some(frame_bytes) => frame_bytes,
            None => {
                let take = (FRAME_PREFIX_BYTES - self.buffer.len()).min(bytes.len());
                self.buffer.extend_from_slice(&bytes[..take]);
                consumed += take;
                if self.buffer.len() < FRAME_PREFIX_BYTES {
                    return Ok(consumed);
                }
                let mut prefix = [0u8; FRAME_PREFIX_BYTES];
                prefix.copy_from_slice(&self.buffer[..FRAME_PREFIX_BYTES]);
                let length = u32::from_be_bytes(prefix);
                if length == 0 {
                    return Err(self.fail(FrameError::Empty));
                }
                if length > self.length_max {
                    return Err(self.fail(FrameError::TooLong {
                        length,
                        length_max: self.length_max,
                    }));
                }
                let frame_bytes = FRAME_PREFIX_BYTES + length as usize;
                self.frame_bytes = Some(frame_bytes);
                frame_bytes
            }
        };
        let rest = &bytes[consumed..];
        let take = (frame_bytes - self.buffer.len()).min(rest.len());
        self.buffer.extend_from_slice(&rest[..take]);
        consumed += take;
        self.is_frame_complete = self.buffer.len() == frame_bytes;
        Ok(consumed)
    }

    /// The whole frame (length prefix included) completed by the last `handle_bytes`, if any.
    /// It stays here until the next `handle_bytes`.
    pub fn poll_frame(&mut self) -> Option<&mut [u8]> {
        if self.is_frame_complete {
            Some(&mut self.buffer)
        } else {
            None
        }
    }

    /// Bytes of an incomplete frame held (0 between frames).
    pub fn buffered_bytes(&self) -> usize {
        if self.is_frame_complete {
            0
        } else {
            self.buffer.len()
        }
    }

    fn fail(&mut self, error: FrameError) -> FrameError {
        self.error = Some(error);
        self.buffer = Vec::new();
        error
    }
}

/// The first frame of each side, in the layout of the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) protocol_version: u16,
    pub(crate) link: LinkKind,
    pub(crate) volume_id: [u8; PEER_VOLUME_ID_BYTES],
    pub(crate) nonce: [u8; PEER_NONCE_BYTES],
    pub(crate) node_name: String,
}

impl Hello {
    /// Appends the whole frame. Panics on a node name that `check_node_name` refuses (a bug:
    /// the handshake checks it first).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let name = self.node_name.as_bytes();
        assert!(check_node_name(&self.node_name).is_ok());
        let frame_bytes = HELLO_FIXED_BYTES + name.len();
        let length = (frame_bytes - FRAME_PREFIX_BYTES) as u32;
        out.reserve(frame_bytes);
        out.extend_from_slice(&length.to_be_bytes());
        out.push(frame_kind::HELLO);
        out.extend_from_slice(&HELLO_MAGIC);
        out.extend_from_slice(&self.protocol_version.to_be_bytes());
        out.push(self.link.to_byte());
        out.extend_from_slice(&self.volume_id);
        out.extend_from_slice(&self.nonce);
        out.push(name.len() as u8);
        out.extend_from_slice(name);
    }

    /// Reads a whole hello frame (length prefix included), checking magic then version before
    /// anything else. Never panics.
    pub(crate) fn decode(frame: &[u8]) -> Result<Self, HandshakeError> {
        let (header, body) = frame
            .split_at_checked(FRAME_HEADER_BYTES)
            .ok_or(HandshakeError::MalformedHello)?;
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if length as usize != frame.len() - FRAME_PREFIX_BYTES {
            return Err(HandshakeError::MalformedHello);
        }
        if header[4] != frame_kind::HELLO {
            return Err(HandshakeError::UnexpectedFrame { kind: header[4] });
        }
        if body.get(..4) != Some(&HELLO_MAGIC[..]) {
            return Err(HandshakeError::NotTandem);
        }
        let theirs = match body.get(4..6) {
            Some(&[high, low]) => u16::from_be_bytes([high, low]),
            _ => return Err(HandshakeError::MalformedHello),
        };
        if theirs != PEER_PROTOCOL_VERSION {
            return Err(HandshakeError::Version {
                ours: PEER_PROTOCOL_VERSION,
                theirs,
            });
        }
        let fixed = body
            .get(..HELLO_FIXED_BYTES - FRAME_HEADER_BYTES)
            .ok_or(HandshakeError::MalformedHello)?;
        let link = LinkKind::from_byte(fixed[6]).ok_or(HandshakeError::MalformedHello)?;
        let mut volume_id = [0u8; PEER_VOLUME_ID_BYTES];
        volume_id.copy_from_slice(&fixed[7..23]);
        let mut nonce = [0u8; PEER_NONCE_BYTES];
        nonce.copy_from_slice(&fixed[23..55]);
        let name_bytes = usize::from(fixed[55]);
        let name = &body[fixed.len()..];
        if name.len() != name_bytes {
            return Err(HandshakeError::MalformedHello);
        }
        let node_name = std::str::from_utf8(name).map_err(|_| HandshakeError::MalformedHello)?;
        check_node_name(node_name).map_err(|_| HandshakeError::MalformedHello)?;
        Ok(Self {
            protocol_version: theirs,
            link,
            volume_id,
            nonce,
            node_name: node_name.to_owned(),
        })
    }
}

/// Why a node name cannot go into a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeNameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`PEER_NODE_NAME_BYTES_MAX`] bytes of UTF-8.
    TooLong {
        /// Its length in bytes.
        bytes: usize,
    },
}

impl fmt::Display for NodeNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "the node name is empty"),
            Self::TooLong { bytes } => write!(
                f,
                "the node name is {bytes} bytes long; at most {PEER_NODE_NAME_BYTES_MAX} fit \
                 the peer handshake"
            ),
        }
    }
}

impl std::error::Error for NodeNameError {}

/// Checks that `name` fits a hello.
pub fn check_node_name(name: &str) -> Result<(), NodeNameError> {
    match name.len() {
        0 => Err(NodeNameError::Empty),
        bytes if bytes > PEER_NODE_NAME_BYTES_MAX => Err(NodeNameError::TooLong { bytes }),
        _ => Ok(()),
    }
}

/// Which end of the TCP connection this node is; it orders the nonces and picks the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This node connected.
    Initiator,
    /// This node accepted.
    Responder,
}

/// What a handshake needs from its caller.
#[derive(Clone, Copy)]
pub struct HandshakeConfig<'a> {
    /// The cluster key, from `[peer] key_file`.
    pub key: &'a [u8; PEER_KEY_BYTES],
    /// This node's name (`[node] name`).
    pub node_name: &'a str,
    /// This node's volume identity, offered to the peer.
    pub volume_id: [u8; PEER_VOLUME_ID_BYTES],
    /// The link this connection runs over.
    pub link: LinkKind,
    /// Fresh random bytes, never reused: they make this connection's keys.
    pub nonce: [u8; PEER_NONCE_BYTES],
}

impl fmt::Debug for HandshakeConfig<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("node_name", &self.node_name)
            .field("volume_id", &self.volume_id)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

/// Why a handshake refused its peer. Refusal is final: the handshake yields no session and
/// sends nothing more; the caller drops the connection and changes nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// The framing failed (a length of 0 or above [`PEER_HANDSHAKE_FRAME_BYTES_MAX`]).
    Frame(FrameError),
    /// A frame of another kind than the one expected next.
    UnexpectedFrame {
        /// The kind byte received.
        kind: u8,
    },
    /// The peer's hello does not start with the magic: not a tandem node.
    NotTandem,
    /// The peer speaks another protocol version.
    Version {
        /// Ours.
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// The peer's hello breaks the layout.
    MalformedHello,
    /// The peer believes this connection runs over the other link.
    LinkMismatch {
        /// Ours.
        ours: LinkKind,
        /// The peer's.
        theirs: LinkKind,
    },
    /// The peer's nonce is ours: our own hello came back.
    ReflectedNonce,
    /// The peer's confirmation did not authenticate: it holds another cluster key, or the
    /// hellos were altered in transit.
    WrongKey,
    /// The peer's confirmation authenticated but does not say what it must.
    MalformedConfirm,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frame(error) => write!(f, "peer handshake: {error}"),
            Self::UnexpectedFrame { kind } => {
                write!(f, "peer handshake: unexpected frame of kind {kind:#04x}")
            }
            Self::NotTandem => write!(f, "peer handshake: the peer is not a tandem node"),
            Self::Version { ours, theirs } => write!(
                f,
                "peer handshake: the peer speaks protocol version {theirs}, this node {ours}"
            ),
            Self::MalformedHello => write!(f, "peer handshake: malformed hello"),
            Self::LinkMismatch { ours, theirs } => write!(
                f,
                "peer handshake: the peer sees this connection as its {theirs} link, this node \
                 as its {ours} link (cables or addresses crossed?)"
            ),
            Self::ReflectedNonce => {
                write!(f, "peer handshake: the peer echoed this node's own hello")
            }
            Self::WrongKey => write!(
                f,
                "peer handshake: the peer's confirmation failed: it holds another cluster key"
            ),
            Self::MalformedConfirm => write!(f, "peer handshake: malformed confirmation"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// What an authenticated peer said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// The peer's `[node] name`.
    pub peer_name: String,
    /// The peer's volume identity; whether it matches ours is the caller's decision.
    pub peer_volume_id: [u8; PEER_VOLUME_ID_BYTES],
    /// The link of this connection (both sides agreed).
    pub link: LinkKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    AwaitingConfirm,
    Established,
    Failed(HandshakeError),
}

/// One side of the handshake of one connection (see the module doc).
pub struct Handshake {
    role: Role,
    /// Zeroed once the session keys are derived.
    cluster_key: [u8; PEER_KEY_BYTES],
    link: LinkKind,
    nonce: [u8; PEER_NONCE_BYTES],
    /// Our hello frame, kept for the transcript.
    own_hello: Vec<u8>,
    transmit: VecDeque<Vec<u8>>,
    decoder: FrameDecoder,
    phase: Phase,
    /// Set with the keys, when the peer's hello is in.
    session: Option<Session>,
    peer: Option<Established>,
    expected_confirm: [u8; secure::CONFIRM_PLAINTEXT_BYTES],
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("link", &self.link)
            .field("phase", &self.phase)
            .field("transmit_frames", &self.transmit.len())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake; our hello is ready in `poll_transmit` at once.
    pub fn new(role: Role, config: HandshakeConfig<'_>) -> Result<Self, NodeNameError> {
        check_node_name(config.node_name)?;
        let hello = Hello {
            protocol_version: PEER_PROTOCOL_VERSION,
            link: config.link,
            volume_id: config.volume_id,
            nonce: config.nonce,
            node_name: config.node_name.to_owned(),
        };
        let mut own_hello = Vec::new();
        hello.encode(&mut own_hello);
        let mut transmit = VecDeque::with_capacity(2);
        transmit.push_back(own_hello.clone());
        Ok(Self {
            role,
            cluster_key: *config.key,
            link: config.link,
            nonce: config.nonce,
            own_hello,
            transmit,
            decoder: FrameDecoder::new(PEER_HANDSHAKE_FRAME_BYTES_MAX),
            phase: Phase::AwaitingHello,
            session: None,
            peer: None,
            expected_confirm: [0; secure::CONFIRM_PLAINTEXT_BYTES],
        })
    }

    /// The next whole frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// Feeds bytes received from the peer; returns how many were taken. Once established it
    /// takes nothing more: bytes after the peer's Confirm are the session's. An error is final
    /// and returned again by every later call.
    pub fn handle_bytes(&mut self, bytes: &[u8]) -> Result<usize, HandshakeError> {
        let mut consumed = 0;
        loop {
            match self.phase {
                Phase::Failed(error) => return Err(error),
                Phase::Established => return Ok(consumed),
                Phase::AwaitingHello | Phase::AwaitingConfirm => {}
            }
            if consumed == bytes.len() {
                return Ok(consumed);
            }
            match self.decoder.handle_bytes(&bytes[consumed..]) {
                // The decoder takes at least one byte of a non-empty input.
                Ok(0) => return Ok(consumed),
                Ok(taken) => consumed += taken,
                Err(error) => self.phase = Phase::Failed(HandshakeError::Frame(error)),
            }
            // Handshake frames are small: copying one out frees the decoder's borrow.
            if let Some(mut frame) = self.decoder.poll_frame().map(|frame| frame.to_vec()) {
                self.phase = match self.handle_frame(&mut frame) {
                    Ok(phase) => phase,
                    Err(error) => Phase::Failed(error),
                };
            }
        }
    }

    /// True once the peer's Confirm has authenticated.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// The refusal, if the handshake failed.
    pub fn error(&self) -> Option<HandshakeError> {
        match self.phase {
            Phase::Failed(error) => Some(error),
            _ => None,
        }
    }

    /// The session and the peer's description, once established and once every handshake
    /// frame has been taken by `poll_transmit` (our Confirm must precede any session frame).
    pub fn into_session(mut self) -> Option<(Session, Established)> {
        if self.phase != Phase::Established || !self.transmit.is_empty() {
            return None;
        }
        Some((self.session.take()?, self.peer.take()?))
    }

    /// Handles one whole frame; returns the next phase.
    fn handle_frame(&mut self, frame: &mut [u8]) -> Result<Phase, HandshakeError> {
        // The decoder guarantees a length of at least 1, so the kind byte is there.
        let Some(&kind) = frame.get(FRAME_PREFIX_BYTES) else {
            return Err(HandshakeError::Frame(FrameError::Empty));
        };
        match self.phase {
            Phase::AwaitingHello => {
                if kind != frame_kind::HELLO {
                    return Err(HandshakeError::UnexpectedFrame { kind });
                }
                self.handle_hello(frame)?;
                Ok(Phase::AwaitingConfirm)
            }
            Phase::AwaitingConfirm => {
                if kind != frame_kind::CONFIRM {
                    return Err(HandshakeError::UnexpectedFrame { kind });
                }
                let session = self
                    .session
                    .as_mut()
                    .ok_or(HandshakeError::MalformedConfirm)?;
                let (_, plaintext) =
                    session
                        .open_frame_in_place(frame)
                        .map_err(|error| match error {
                            OpenError::Authentication => HandshakeError::WrongKey,
                            _ => HandshakeError::MalformedConfirm,
                        })?;
                if *plaintext != self.expected_confirm {
                    return Err(HandshakeError::MalformedConfirm);
                }
                Ok(Phase::Established)
            }
            Phase::Established | Phase::Failed(_) => Ok(self.phase),
        }
    }

    fn handle_hello(&mut self, frame: &[u8]) -> Result<(), HandshakeError> {
        let hello = Hello::decode(frame)?;
        if hello.link != self.link {
            return Err(HandshakeError::LinkMismatch {
                ours: self.link,
                theirs: hello.link,
            });
        }
        if hello.nonce == self.nonce {
            return Err(HandshakeError::ReflectedNonce);
        }
        let (initiator_hello, responder_hello, initiator_nonce, responder_nonce) = match self.role {
            Role::Initiator => (&self.own_hello[..], frame, &self.nonce, &hello.nonce),
            Role::Responder => (frame, &self.own_hello[..], &hello.nonce, &self.nonce),
        };
        let transcript_hash = secure::transcript_hash(initiator_hello, responder_hello);
        let keys = secure::derive_keys(
            &self.cluster_key,
            initiator_nonce,
            responder_nonce,
            &transcript_hash,
        );
        self.cluster_key = [0; PEER_KEY_BYTES];
        let mut session = match self.role {
            Role::Initiator => {
                Session::from_keys(&keys.initiator_to_responder, &keys.responder_to_initiator)
            }
            Role::Responder => {
                Session::from_keys(&keys.responder_to_initiator, &keys.initiator_to_responder)
            }
        };
        let mut confirm = Vec::with_capacity(SEALED_FRAME_OVERHEAD_BYTES + 48);
        let sealed = session.seal_frame(
            frame_kind::CONFIRM,
            secure::CONFIRM_TEXT,
            &transcript_hash,
            &mut confirm,
        );
        // Counter 0 and 48 bytes of plaintext: sealing cannot fail.
        assert!(sealed.is_ok());
        self.transmit.push_back(confirm);
        let text_bytes = secure::CONFIRM_TEXT.len();
        self.expected_confirm[..text_bytes].copy_from_slice(secure::CONFIRM_TEXT);
        self.expected_confirm[text_bytes..].copy_from_slice(&transcript_hash);
        self.session = Some(session);
        self.peer = Some(Established {
            peer_name: hello.node_name,
            peer_volume_id: hello.volume_id,
            link: hello.link,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [0x4b; 32];
    const OTHER_KEY: [u8; 32] = [0x4c; 32];
    const APP: u8 = frame_kind::APPLICATION_MIN;

    fn config<'a>(key: &'a [u8; 32], name: &'a str, nonce: u8) -> HandshakeConfig<'a> {
        HandshakeConfig {
            key,
            node_name: name,
            volume_id: [0x11; 16],
            link: LinkKind::Heartbeat,
            nonce: [nonce; 32],
        }
    }

    /// Moves every queued frame of `from` into `to`, `chunk` bytes at a time; returns the
    /// bytes `to` did not take.
    fn pump(from: &mut Handshake, to: &mut Handshake, chunk: usize) -> Vec<u8> {
        let mut wire = Vec::new();
        while let Some(frame) = from.poll_transmit() {
            wire.extend_from_slice(&frame);
        }
        let mut offset = 0;
        while offset < wire.len() {
            let end = (offset + chunk).min(wire.len());
            let taken = to.handle_bytes(&wire[offset..end]).unwrap();
            if taken == 0 {
                break;
            }
            offset += taken;
        }
        wire[offset..].to_vec()
    }

    fn handshake(
        initiator: HandshakeConfig<'_>,
        responder: HandshakeConfig<'_>,
        chunk: usize,
    ) -> ((Session, Established), (Session, Established)) {
        let mut i = Handshake::new(Role::Initiator, initiator).unwrap();
        let mut r = Handshake::new(Role::Responder, responder).unwrap();
        for _ in 0..3 {
            assert!(pump(&mut i, &mut r, chunk).is_empty());
            assert!(pump(&mut r, &mut i, chunk).is_empty());
        }
        assert!(i.is_established() && r.is_established());
        (i.into_session().unwrap(), r.into_session().unwrap())
    }

    /// Both sides' results when each feeds the other everything it sends.
    fn exchange(
        initiator: HandshakeConfig<'_>,
        responder: HandshakeConfig<'_>,
    ) -> (Handshake, Handshake) {
        let mut i = Handshake::new(Role::Initiator, initiator).unwrap();
        let mut r = Handshake::new(Role::Responder, responder).unwrap();
        fn deliver(from: &mut Handshake, to: &mut Handshake) {
            while let Some(frame) = from.poll_transmit() {
                let _ = to.handle_bytes(&frame);
            }
        }
        for _ in 0..3 {
            deliver(&mut i, &mut r);
            deliver(&mut r, &mut i);
        }
        (i, r)
    }

    fn seal(session: &mut Session, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        session.seal(APP, b"", payload, &mut out).unwrap();
        out
    }

    fn assert_round_trip(a: &mut Session, b: &mut Session) {
        fn one_way(from: &mut Session, to: &mut Session) {
            for n in 0..3u8 {
                let mut frame = seal(from, &[n; 40]);
                let (kind, plaintext) = to.open_in_place(&mut frame).unwrap();
                assert_eq!((kind, &plaintext[..]), (APP, &[n; 40][..]));
            }
        }
        one_way(a, b);
        one_way(b, a);
    }

    #[test]
    fn hello_has_the_documented_byte_layout() {
        let hello = Hello {
            protocol_version: 0x0102,
            link: LinkKind::Lan,
            volume_id: [0xee; 16],
            nonce: [0x77; 32],
            node_name: "nas-a".to_owned(),
        };
        let mut frame = Vec::new();
        hello.encode(&mut frame);
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0, 0, 0, 62]); // length = 57 + 5
        expected.push(0x01); // kind hello
        expected.extend_from_slice(b"TNDM");
        expected.extend_from_slice(&[0x01, 0x02]); // version, big-endian
        expected.push(1); // lan
        expected.extend_from_slice(&[0xee; 16]);
        expected.extend_from_slice(&[0x77; 32]);
        expected.push(5);
        expected.extend_from_slice(b"nas-a");
        assert_eq!(frame, expected);
        assert_eq!(frame.len(), HELLO_FIXED_BYTES + 5);
    }

    #[test]
    fn hello_decodes_what_it_encodes() {
        let hello = Hello {
            protocol_version: PEER_PROTOCOL_VERSION,
            link: LinkKind::Heartbeat,
            volume_id: [3; 16],
            nonce: [4; 32],
            node_name: "n".repeat(PEER_NODE_NAME_BYTES_MAX),
        };
        let mut frame = Vec::new();
        hello.encode(&mut frame);
        assert_eq!(Hello::decode(&frame), Ok(hello));
    }

    #[test]
    fn confirm_frame_is_69_bytes() {
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        pump(&mut r, &mut i, usize::MAX);
        assert!(i.poll_transmit().is_some());
        let confirm = i.poll_transmit().unwrap();
        assert_eq!(confirm.len(), 69);
        assert_eq!(confirm[..5], [0, 0, 0, 65, frame_kind::CONFIRM]);
    }

    #[test]
    fn handshake_yields_matching_sessions_and_frames_round_trip_both_ways() {
        let ((mut a, peer_of_a), (mut b, peer_of_b)) = handshake(
            config(&KEY, "nas-a", 1),
            config(&KEY, "nas-b", 2),
            usize::MAX,
        );
        assert_eq!(peer_of_a.peer_name, "nas-b");
        assert_eq!(peer_of_b.peer_name, "nas-a");
        assert_eq!(peer_of_a.link, LinkKind::Heartbeat);
        // The Confirm used counter 0 both ways.
        assert_eq!((a.send_counter(), a.recv_counter()), (1, 1));
        assert_eq!((b.send_counter(), b.recv_counter()), (1, 1));
        assert_round_trip(&mut a, &mut b);
    }

    #[test]
    fn handshake_fed_one_byte_at_a_time_yields_matching_sessions() {
        let ((mut a, _), (mut b, _)) =
            handshake(config(&KEY, "nas-a", 1), config(&KEY, "nas-b", 2), 1);
        assert_round_trip(&mut a, &mut b);
    }

    #[test]
    fn handshake_works_on_the_lan_link_through_the_same_path() {
        let lan = |name, nonce| HandshakeConfig {
            link: LinkKind::Lan,
            ..config(&KEY, name, nonce)
        };
        let ((mut a, peer), (mut b, _)) = handshake(lan("a", 1), lan("b", 2), 7);
        assert_eq!(peer.link, LinkKind::Lan);
        assert_round_trip(&mut a, &mut b);
    }

    #[test]
    fn bytes_after_the_peers_confirm_are_left_for_the_session() {
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        pump(&mut i, &mut r, usize::MAX);
        let hello_r = r.poll_transmit().unwrap();
        let confirm_r = r.poll_transmit().unwrap();
        assert_eq!(i.handle_bytes(&hello_r), Ok(hello_r.len()));
        pump(&mut i, &mut r, usize::MAX);
        // The responder is established and sends a session frame right behind its Confirm.
        let (mut r_session, _) = r.into_session().unwrap();
        let mut wire = confirm_r.clone();
        wire.extend_from_slice(&seal(&mut r_session, b"first session frame"));
        assert_eq!(i.handle_bytes(&wire), Ok(confirm_r.len()));
        assert_eq!(i.handle_bytes(&wire[confirm_r.len()..]), Ok(0));
        let (mut i_session, _) = i.into_session().unwrap();
        let mut decoder = FrameDecoder::for_session();
        let rest = &wire[confirm_r.len()..];
        assert_eq!(decoder.handle_bytes(rest), Ok(rest.len()));
        let frame = decoder.poll_frame().unwrap();
        let (_, plaintext) = i_session.open_in_place(frame).unwrap();
        assert_eq!(plaintext, b"first session frame");
    }

    #[test]
    fn into_session_waits_until_our_confirm_is_taken() {
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        pump(&mut i, &mut r, usize::MAX);
        pump(&mut r, &mut i, usize::MAX);
        // The initiator is established, but its Confirm still waits in the queue.
        assert!(i.is_established());
        assert_eq!(i.transmit.len(), 1);
        assert!(i.into_session().is_none());
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (i, r) = exchange(config(&KEY, "a", 1), config(&OTHER_KEY, "b", 2));
        assert_eq!(i.error(), Some(HandshakeError::WrongKey));
        assert_eq!(r.error(), Some(HandshakeError::WrongKey));
        assert!(!i.is_established());
        assert!(i.into_session().is_none());
        assert!(r.into_session().is_none());
    }

    #[test]
    fn refusal_is_final_and_sends_nothing_more() {
        let (mut i, _) = exchange(config(&KEY, "a", 1), config(&OTHER_KEY, "b", 2));
        assert!(i.poll_transmit().is_none());
        assert_eq!(i.handle_bytes(b"anything"), Err(HandshakeError::WrongKey));
        assert_eq!(i.handle_bytes(b""), Err(HandshakeError::WrongKey));
    }

    fn hello_frame(version: u16, link: LinkKind, nonce: u8, name: &str) -> Vec<u8> {
        let mut frame = Vec::new();
        Hello {
            protocol_version: version,
            link,
            volume_id: [0x11; 16],
            nonce: [nonce; 32],
            node_name: name.to_owned(),
        }
        .encode(&mut frame);
        frame
    }

    #[test]
    fn other_protocol_version_is_refused_before_any_key_use() {
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        let _hello = r.poll_transmit().unwrap();
        let frame = hello_frame(2, LinkKind::Heartbeat, 1, "a");
        assert_eq!(
            r.handle_bytes(&frame),
            Err(HandshakeError::Version { ours: 1, theirs: 2 })
        );
        assert!(r.poll_transmit().is_none(), "no Confirm after a refusal");
        assert!(r.session.is_none());
        assert_eq!(r.cluster_key, KEY, "the key was never used");
    }

    #[test]
    fn other_version_is_recognised_whatever_the_rest_of_its_hello() {
        // A future hello: the frozen first 11 bytes, then a layout of its own.
        let mut frame = Vec::new();
        frame.extend_from_slice(&(1u32 + 4 + 2 + 300).to_be_bytes());
        frame.push(frame_kind::HELLO);
        frame.extend_from_slice(b"TNDM");
        frame.extend_from_slice(&7u16.to_be_bytes());
        frame.extend_from_slice(&[0xa5; 300]);
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        assert_eq!(
            r.handle_bytes(&frame),
            Err(HandshakeError::Version { ours: 1, theirs: 7 })
        );
    }

    #[test]
    fn version_mismatch_is_reported_by_both_sides() {
        // Our side sees their version; their side (simulated by decoding ours) sees ours.
        let ours = hello_frame(PEER_PROTOCOL_VERSION, LinkKind::Heartbeat, 1, "a");
        assert!(Hello::decode(&ours).is_ok());
        let theirs = hello_frame(9, LinkKind::Heartbeat, 2, "b");
        assert_eq!(
            Hello::decode(&theirs),
            Err(HandshakeError::Version { ours: 1, theirs: 9 })
        );
    }

    #[test]
    fn a_stranger_is_refused_as_not_tandem() {
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        let mut frame = hello_frame(1, LinkKind::Heartbeat, 1, "a");
        frame[5..9].copy_from_slice(b"SSH-");
        assert_eq!(r.handle_bytes(&frame), Err(HandshakeError::NotTandem));
    }

    #[test]
    fn malformed_hellos_are_refused() {
        let good = hello_frame(1, LinkKind::Heartbeat, 1, "abc");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unknown link byte", {
                let mut f = good.clone();
                f[11] = 2;
                f
            }),
            ("name length larger than the frame", {
                let mut f = good.clone();
                f[60] = 4;
                f
            }),
            ("name length smaller than the frame", {
                let mut f = good.clone();
                f[60] = 2;
                f
            }),
            ("empty name", {
                let mut f = good[..61].to_vec();
                f[..4].copy_from_slice(&57u32.to_be_bytes());
                f[60] = 0;
                f
            }),
            ("name not UTF-8", {
                let mut f = good.clone();
                f[61] = 0xff;
                f
            }),
            ("cut after the version", {
                let mut f = good[..11].to_vec();
                f[..4].copy_from_slice(&7u32.to_be_bytes());
                f
            }),
            ("name too long", {
                let mut f = good[..60].to_vec();
                f.push(64);
                f.extend_from_slice(&[b'x'; 64]);
                f[..4].copy_from_slice(&(57u32 + 64).to_be_bytes());
                f
            }),
        ];
        for (case, frame) in cases {
            let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
            assert_eq!(
                r.handle_bytes(&frame),
                Err(HandshakeError::MalformedHello),
                "{case}"
            );
        }
    }

    #[test]
    fn crossed_links_are_refused() {
        let lan = HandshakeConfig {
            link: LinkKind::Lan,
            ..config(&KEY, "b", 2)
        };
        let (i, r) = exchange(config(&KEY, "a", 1), lan);
        assert_eq!(
            i.error(),
            Some(HandshakeError::LinkMismatch {
                ours: LinkKind::Heartbeat,
                theirs: LinkKind::Lan
            })
        );
        assert_eq!(
            r.error(),
            Some(HandshakeError::LinkMismatch {
                ours: LinkKind::Lan,
                theirs: LinkKind::Heartbeat
            })
        );
    }

    #[test]
    fn our_own_hello_reflected_back_is_refused() {
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let own = i.poll_transmit().unwrap();
        assert_eq!(i.handle_bytes(&own), Err(HandshakeError::ReflectedNonce));
    }

    #[test]
    fn a_frame_out_of_handshake_order_is_refused() {
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let mut session_frame = vec![0, 0, 0, 17, APP];
        session_frame.extend_from_slice(&[0; 16]);
        assert_eq!(
            i.handle_bytes(&session_frame),
            Err(HandshakeError::UnexpectedFrame { kind: APP })
        );
        // A second hello where the Confirm belongs.
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let hello = hello_frame(1, LinkKind::Heartbeat, 2, "b");
        assert_eq!(i.handle_bytes(&hello), Ok(hello.len()));
        let again = hello_frame(1, LinkKind::Heartbeat, 3, "b");
        assert_eq!(
            i.handle_bytes(&again),
            Err(HandshakeError::UnexpectedFrame {
                kind: frame_kind::HELLO
            })
        );
    }

    #[test]
    fn different_volume_ids_are_exposed_not_refused() {
        let other_volume = HandshakeConfig {
            volume_id: [0x22; 16],
            ..config(&KEY, "b", 2)
        };
        let ((_, peer_of_a), (_, peer_of_b)) =
            handshake(config(&KEY, "a", 1), other_volume, usize::MAX);
        assert_eq!(peer_of_a.peer_volume_id, [0x22; 16]);
        assert_eq!(peer_of_b.peer_volume_id, [0x11; 16]);
    }

    #[test]
    fn oversized_handshake_frame_is_refused_without_allocating_it() {
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        let length = PEER_HANDSHAKE_FRAME_BYTES_MAX + 1;
        assert_eq!(
            r.handle_bytes(&length.to_be_bytes()),
            Err(HandshakeError::Frame(FrameError::TooLong {
                length,
                length_max: PEER_HANDSHAKE_FRAME_BYTES_MAX
            }))
        );
        assert!(r.decoder.buffer.capacity() < 64);
    }

    #[test]
    fn frames_recorded_from_an_older_session_fail_to_open_in_a_new_one() {
        // Session 1 with nonces (1, 2); its initiator frames are recorded.
        let ((mut old_i, _), _) = handshake(config(&KEY, "a", 1), config(&KEY, "b", 2), usize::MAX);
        let recorded: Vec<Vec<u8>> = (0..3).map(|n| seal(&mut old_i, &[n; 8])).collect();
        // New sessions where either side drew a fresh nonce.
        for (ni, nr) in [(1, 3), (4, 2)] {
            let (_, (mut new_r, _)) =
                handshake(config(&KEY, "a", ni), config(&KEY, "b", nr), usize::MAX);
            for frame in &recorded {
                assert_eq!(
                    new_r.open_in_place(&mut frame.clone()),
                    Err(OpenError::Authentication)
                );
            }
        }
    }

    #[test]
    fn a_recorded_handshake_replayed_to_a_fresh_nonce_is_refused() {
        // Record the responder's side of a handshake...
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        pump(&mut i, &mut r, usize::MAX);
        let mut recorded = Vec::new();
        while let Some(frame) = r.poll_transmit() {
            recorded.extend_from_slice(&frame);
        }
        // ...and replay it to a new initiator, whose nonce differs.
        let mut fresh = Handshake::new(Role::Initiator, config(&KEY, "a", 5)).unwrap();
        assert_eq!(fresh.handle_bytes(&recorded), Err(HandshakeError::WrongKey));
    }

    #[test]
    fn a_tampered_hello_is_caught_by_the_confirm() {
        let mut i = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let mut r = Handshake::new(Role::Responder, config(&KEY, "b", 2)).unwrap();
        let mut hello = i.poll_transmit().unwrap();
        hello[12] ^= 0x01; // the volume id, rewritten in transit
        r.handle_bytes(&hello).unwrap();
        while let Some(frame) = r.poll_transmit() {
            let _ = i.handle_bytes(&frame);
        }
        while let Some(frame) = i.poll_transmit() {
            let _ = r.handle_bytes(&frame);
        }
        assert_eq!(i.error(), Some(HandshakeError::WrongKey));
        assert_eq!(r.error(), Some(HandshakeError::WrongKey));
    }

    #[test]
    fn invalid_node_names_are_refused_at_construction() {
        let long = "x".repeat(PEER_NODE_NAME_BYTES_MAX + 1);
        assert_eq!(
            Handshake::new(Role::Initiator, config(&KEY, &long, 1)).err(),
            Some(NodeNameError::TooLong { bytes: 64 })
        );
        assert_eq!(
            Handshake::new(Role::Initiator, config(&KEY, "", 1)).err(),
            Some(NodeNameError::Empty)
        );
    }

    #[test]
    fn debug_output_of_a_handshake_shows_no_key() {
        let h = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
        let text = format!("{h:?} {:?}", config(&KEY, "a", 1));
        assert!(!text.contains("75"), "{text}"); // 0x4b
    }

    #[test]
    fn decoder_yields_frames_split_anywhere() {
        let frames: Vec<Vec<u8>> = vec![vec![0, 0, 0, 1, 9], vec![0, 0, 0, 3, 1, 2, 3]];
        let wire = frames.concat();
        for chunk in 1..=wire.len() {
            let mut decoder = FrameDecoder::for_session();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let taken = decoder.handle_bytes(rest).unwrap();
                    rest = &rest[taken..];
                    if let Some(frame) = decoder.poll_frame() {
                        got.push(frame.to_vec());
                    }
                }
            }
            assert_eq!(got, frames, "chunk {chunk}");
            assert_eq!(decoder.buffered_bytes(), 0);
        }
    }

    #[test]
    fn decoder_holds_nothing_of_a_truncated_frame_as_a_frame() {
        let mut decoder = FrameDecoder::for_session();
        assert_eq!(decoder.handle_bytes(&[0, 0, 0, 10, 1, 2]), Ok(6));
        assert!(decoder.poll_frame().is_none());
        assert_eq!(decoder.buffered_bytes(), 6);
    }

    #[test]
    fn decoder_refuses_an_oversized_length_without_allocating_it() {
        let mut decoder = FrameDecoder::for_session();
        let length = PEER_FRAME_BYTES_MAX + 1;
        let error = FrameError::TooLong {
            length,
            length_max: PEER_FRAME_BYTES_MAX,
        };
        assert_eq!(decoder.handle_bytes(&length.to_be_bytes()), Err(error));
        assert!(decoder.buffer.capacity() < 64);
        assert_eq!(
            decoder.handle_bytes(&[0; 8]),
            Err(error),
            "errors are final"
        );
        assert_eq!(
            FrameDecoder::for_session().handle_bytes(&[0xff; 4]),
            Err(FrameError::TooLong {
                length: u32::MAX,
                length_max: PEER_FRAME_BYTES_MAX
            })
        );
    }

    #[test]
    fn decoder_grows_only_with_bytes_received() {
        let mut decoder = FrameDecoder::for_session();
        // A legal but huge length followed by a trickle: memory follows the trickle.
        assert_eq!(
            decoder.handle_bytes(&PEER_FRAME_BYTES_MAX.to_be_bytes()),
            Ok(4)
        );
        assert_eq!(decoder.handle_bytes(&[0; 100]), Ok(100));
        assert!(decoder.buffer.capacity() < 4096);
    }

    #[test]
    fn decoder_refuses_a_zero_length() {
        let mut decoder = FrameDecoder::for_session();
        assert_eq!(
            decoder.handle_bytes(&[0, 0, 0, 0, 1]),
            Err(FrameError::Empty)
        );
    }

    #[test]
    fn decoder_and_session_carry_a_stream_of_sealed_frames() {
        let ((mut a, _), (mut b, _)) =
            handshake(config(&KEY, "a", 1), config(&KEY, "b", 2), usize::MAX);
        let mut wire = Vec::new();
        for n in 0..4u8 {
            a.seal(APP + n, &[n; 4], &vec![n; 1000 * usize::from(n)], &mut wire)
                .unwrap();
        }
        let mut decoder = FrameDecoder::for_session();
        let mut rest = &wire[..];
        let mut opened = 0u8;
        while !rest.is_empty() {
            let taken = decoder.handle_bytes(&rest[..rest.len().min(333)]).unwrap();
            rest = &rest[taken..];
            if let Some(frame) = decoder.poll_frame() {
                let (kind, plaintext) = b.open_in_place(frame).unwrap();
                assert_eq!(kind, APP + opened);
                assert_eq!(plaintext.len(), 4 + 1000 * usize::from(opened));
                opened += 1;
            }
        }
        assert_eq!(opened, 4);
    }

    proptest! {
        #[test]
        fn random_bytes_into_a_handshake_never_panic(
            chunks in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..200), 0..8),
            is_initiator in any::<bool>(),
        ) {
            let role = if is_initiator { Role::Initiator } else { Role::Responder };
            let mut h = Handshake::new(role, config(&KEY, "a", 1)).unwrap();
            for chunk in &chunks {
                match h.handle_bytes(chunk) {
                    Ok(taken) => prop_assert!(taken <= chunk.len()),
                    Err(_) => break,
                }
            }
            prop_assert!(!h.is_established());
        }

        #[test]
        fn random_bytes_after_a_valid_hello_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut h = Handshake::new(Role::Initiator, config(&KEY, "a", 1)).unwrap();
            let mut wire = hello_frame(1, LinkKind::Heartbeat, 2, "b");
            wire.extend_from_slice(&tail);
            let _ = h.handle_bytes(&wire);
            prop_assert!(!h.is_established());
        }

        #[test]
        fn random_bytes_into_a_decoder_never_panic(
            chunks in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            length_max in 1u32..2000,
        ) {
            let mut decoder = FrameDecoder::new(length_max);
            for chunk in &chunks {
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let Ok(taken) = decoder.handle_bytes(rest) else { break };
                    prop_assert!(taken <= rest.len());
                    rest = &rest[taken..];
                    if let Some(frame) = decoder.poll_frame() {
                        let length = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
                        prop_assert_eq!(length as usize + 4, frame.len());
                        prop_assert!(length >= 1 && length <= length_max);
                    }
                }
            }
            prop_assert!(decoder.buffer.capacity() <= 2 * (length_max as usize + 4) + 64);
        }
    }
}
