//! The cryptography of the peer link: the key schedule and the sealed frames of a session.
//!
//! This file owns every use of the cluster key and of the session keys; nothing else in the
//! firmware touches them. The byte layouts are tabled in the module doc of `peer` (mod.rs).
//!
//! - **Key schedule.** The cluster key is only ever the input keying material of HKDF-SHA256
//!   (RFC 5869), salted with both sides' nonces and bound to the transcript hash of both hellos.
//!   One expansion gives 64 bytes: the first 32 key the initiator-to-responder direction, the
//!   last 32 the responder-to-initiator direction. Fresh nonces on every connection give fresh
//!   keys, so counters may restart at 0 and nothing recorded from one session opens in another.
//! - **Sealed frames.** ChaCha20-Poly1305 (RFC 8439) with a 96-bit nonce of four zero bytes and
//!   the 64-bit frame counter, big-endian. The counter is never sent: each side counts the frames
//!   it has sealed and opened, so a replayed, reordered, dropped or duplicated frame is opened
//!   with the wrong nonce and fails authentication. The five header bytes (length and kind) are
//!   the associated data. A counter that would wrap is an error, never a reuse.
//! - **Failure changes nothing.** A frame that fails to open leaves the session exactly as it
//!   was; the caller drops the connection (the stream can no longer be trusted) and reconnects
//!   with a new handshake.
//!
//! Copies: `seal` copies the header and the payload once, into the caller's send buffer, and
//! encrypts them there in place; `open_in_place` decrypts inside the received frame and
//! `open_into` decrypts from the received frame straight into a caller buffer (an aligned disk
//! buffer), so the data path never copies a payload more than once on either side.

use std::fmt;

use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use super::{
    frame_kind, FRAME_HEADER_BYTES, FRAME_PREFIX_BYTES, PEER_FRAME_BYTES_MAX, PEER_KEY_BYTES,
};

/// Bytes of the Poly1305 tag that ends every sealed frame.
pub const TAG_BYTES: usize = 16;

/// Bytes a sealed frame adds to its plaintext: length prefix, kind and tag.
pub const SEALED_FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + TAG_BYTES;

/// The largest plaintext (header and payload together) of one sealed frame.
pub const PEER_PLAINTEXT_BYTES_MAX: usize =
    PEER_FRAME_BYTES_MAX as usize + FRAME_PREFIX_BYTES - SEALED_FRAME_OVERHEAD_BYTES;

/// Bytes of the SHA-256 transcript hash of both hellos.
pub(crate) const TRANSCRIPT_HASH_BYTES: usize = 32;

/// The HKDF info prefix; the transcript hash follows it.
const KDF_INFO_PREFIX: &[u8; 9] = b"tandem/1 ";

/// The fixed text that starts the plaintext of a Confirm frame; the transcript hash follows it.
pub(crate) const CONFIRM_TEXT: &[u8; 16] = b"tandem/1 confirm";

/// Bytes of a Confirm frame's plaintext.
pub(crate) const CONFIRM_PLAINTEXT_BYTES: usize = CONFIRM_TEXT.len() + TRANSCRIPT_HASH_BYTES;

// A whole NBD request payload fits in one frame with room for a replication header.
const _: () =
    assert!(crate::constants::NBD_PAYLOAD_BYTES_MAX as usize + 4096 <= PEER_PLAINTEXT_BYTES_MAX);

/// The SHA-256 of both hello frames, each whole with its length prefix (so the concatenation
/// is unambiguous), initiator's first.
pub(crate) fn transcript_hash(
    initiator_hello: &[u8],
    responder_hello: &[u8],
) -> [u8; TRANSCRIPT_HASH_BYTES] {
    let mut hasher = Sha256::new();
    hasher.update(initiator_hello);
    hasher.update(responder_hello);
    hasher.finalize().into()
}

/// The two keys of one connection.
pub(crate) struct DirectionalKeys {
    pub(crate) initiator_to_responder: [u8; PEER_KEY_BYTES],
    pub(crate) responder_to_initiator: [u8; PEER_KEY_BYTES],
}

/// HKDF-SHA256(ikm = cluster key, salt = initiator nonce || responder nonce,
/// info = "tandem/1 " || transcript hash, L = 64).
pub(crate) fn derive_keys(
    cluster_key: &[u8; PEER_KEY_BYTES],
    initiator_nonce: &[u8; 32],
    responder_nonce: &[u8; 32],
    transcript_hash: &[u8; TRANSCRIPT_HASH_BYTES],
) -> DirectionalKeys {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(initiator_nonce);
    salt[32..].copy_from_slice(responder_nonce);
    let hkdf = Hkdf::<Sha256>::new(Some(&salt), cluster_key);
    let mut okm = [0u8; 2 * PEER_KEY_BYTES];
    let expanded = hkdf.expand_multi_info(&[KDF_INFO_PREFIX, transcript_hash], &mut okm);
    // 64 bytes is far below HKDF-SHA256's limit of 255 * 32: failure would be a bug.
    assert!(expanded.is_ok(), "HKDF-SHA256 refused a 64-byte expansion");
    let mut keys = DirectionalKeys {
        initiator_to_responder: [0; PEER_KEY_BYTES],
        responder_to_initiator: [0; PEER_KEY_BYTES],
    };
    keys.initiator_to_responder
        .copy_from_slice(&okm[..PEER_KEY_BYTES]);
    keys.responder_to_initiator
        .copy_from_slice(&okm[PEER_KEY_BYTES..]);
    keys
}

/// The AEAD nonce of frame `counter`: four zero bytes, then the counter big-endian.
fn frame_nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(nonce)
}

/// Why a frame could not be sealed. The send buffer is left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// Header and payload together exceed [`PEER_PLAINTEXT_BYTES_MAX`].
    TooLarge {
        /// The plaintext bytes asked for.
        plaintext_bytes: usize,
    },
    /// The session has sealed 2^64 - 1 frames; it must be replaced by a new handshake.
    CounterExhausted,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { plaintext_bytes } => write!(
                f,
                "a peer frame of {plaintext_bytes} bytes exceeds the limit of \
                 {PEER_PLAINTEXT_BYTES_MAX}"
            ),
            Self::CounterExhausted => write!(f, "the peer session's send counter is exhausted"),
        }
    }
}

impl std::error::Error for SealError {}

/// Why a frame did not open. The session is left as it was; the caller drops the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The bytes are not one whole sealed frame: shorter than the overhead, or the length
    /// prefix disagrees with the number of bytes given.
    Malformed,
    /// The kind byte is reserved for the handshake and never sealed by a session.
    ReservedKind {
        /// The kind byte received.
        kind: u8,
    },
    /// The tag did not verify: a forged or corrupted frame, a frame replayed, reordered,
    /// duplicated or preceded by a lost one, or a frame of another session or key.
    Authentication,
    /// The session has opened 2^64 - 1 frames; it must be replaced by a new handshake.
    CounterExhausted,
    /// `open_into`'s output buffer is shorter than the frame's plaintext.
    BufferTooSmall {
        /// The plaintext bytes of the frame.
        needed: usize,
        /// The bytes of the buffer given.
        available: usize,
    },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => write!(f, "malformed peer frame"),
            Self::ReservedKind { kind } => {
                write!(f, "peer frame of reserved kind {kind:#04x} in a session")
            }
            Self::Authentication => write!(
                f,
                "peer frame failed authentication (forged, corrupted, replayed, reordered or \
                 from another session)"
            ),
            Self::CounterExhausted => write!(f, "the peer session's receive counter is exhausted"),
            Self::BufferTooSmall { needed, available } => write!(
                f,
                "peer frame plaintext of {needed} bytes does not fit a buffer of {available}"
            ),
        }
    }
}

impl std::error::Error for OpenError {}

/// The validated parts of a sealed frame's header.
struct SealedHeader {
    kind: u8,
    plaintext_bytes: usize,
}

/// Checks that `frame` is one whole sealed frame and reads its header. Never panics.
fn sealed_header(frame: &[u8]) -> Result<SealedHeader, OpenError> {
    if frame.len() < SEALED_FRAME_OVERHEAD_BYTES {
        return Err(OpenError::Malformed);
    }
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    prefix.copy_from_slice(&frame[..FRAME_PREFIX_BYTES]);
    let body_bytes = u32::from_be_bytes(prefix) as usize;
    if body_bytes != frame.len() - FRAME_PREFIX_BYTES {
        return Err(OpenError::Malformed);
    }
    Ok(SealedHeader {
        kind: frame[FRAME_PREFIX_BYTES],
        plaintext_bytes: frame.len() - SEALED_FRAME_OVERHEAD_BYTES,
    })
}

/// One direction-keyed, counted channel: what a completed handshake yields.
///
/// Frames are sealed and opened in stream order; see the module doc. The keys are not
/// printable (`Debug` shows the counters only) and never leave this value.
pub struct Session {
    send_cipher: ChaCha20Poly1305,
    recv_cipher: ChaCha20Poly1305,
    send_counter: u64,
    recv_counter: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("send_counter", &self.send_counter)
            .field("recv_counter", &self.recv_counter)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session at counter 0 both ways. Only the handshake makes one, from derived keys.
    pub(crate) fn from_keys(
        send_key: &[u8; PEER_KEY_BYTES],
        recv_key: &[u8; PEER_KEY_BYTES],
    ) -> Self {
        Self {
            send_cipher: ChaCha20Poly1305::new(&Key::from(*send_key)),
            recv_cipher: ChaCha20Poly1305::new(&Key::from(*recv_key)),
            send_counter: 0,
            recv_counter: 0,
        }
    }

    /// Frames sealed so far (the counter of the next one).
    pub fn send_counter(&self) -> u64 {
        self.send_counter
    }

    /// Frames opened so far (the counter the next one must carry).
    pub fn recv_counter(&self) -> u64 {
        self.recv_counter
    }

    /// Appends one whole sealed frame of `kind` whose plaintext is `header` then `payload` to
    /// `out`.
    ///
    /// The payload is copied once, into `out`, and encrypted there; keep reusing one send
    /// buffer with enough capacity (`SEALED_FRAME_OVERHEAD_BYTES` more than the plaintext) and
    /// that copy is the only one. On error `out` is unchanged.
    ///
    /// Panics if `kind` is reserved for the handshake (below
    /// [`frame_kind::APPLICATION_MIN`]): that is a bug in the caller.
    pub fn seal(
        &mut self,
        kind: u8,
        header: &[u8],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        assert!(
            kind >= frame_kind::APPLICATION_MIN,
            "peer frame kind {kind:#04x} is reserved for the handshake"
        );
        self.seal_frame(kind, header, payload, out)
    }

    /// `seal` without the reserved-kind check: the handshake seals its Confirm through here.
    pub(crate) fn seal_frame(
        &mut self,
        kind: u8,
        header: &[u8],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let plaintext_bytes = header.len().saturating_add(payload.len());
        if plaintext_bytes > PEER_PLAINTEXT_BYTES_MAX {
            return Err(SealError::TooLarge { plaintext_bytes });
        }
        let next_counter = self
            .send_counter
            .checked_add(1)
            .ok_or(SealError::CounterExhausted)?;
        let frame_bytes = plaintext_bytes + SEALED_FRAME_OVERHEAD_BYTES;
        let body_bytes = u32::try_from(frame_bytes - FRAME_PREFIX_BYTES)
            .map_err(|_| SealError::TooLarge { plaintext_bytes })?;

        let start = out.len();
        out.reserve(frame_bytes);
        out.extend_from_slice(&body_bytes.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(header);
        out.extend_from_slice(payload);
        let (aad, plaintext) = out[start..].split_at_mut(FRAME_HEADER_BYTES);
        let sealed = self.send_cipher.encrypt_inout_detached(
            &frame_nonce(self.send_counter),
            aad,
            InOutBuf::from(plaintext),
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                self.send_counter = next_counter;
                Ok(())
            }
            Err(_) => {
                // Only a plaintext past ChaCha20's 256 GiB block limit is refused, far above
                // the frame limit; keep the promise that `out` is unchanged anyway.
                out.truncate(start);
                Err(SealError::TooLarge { plaintext_bytes })
            }
        }
    }

    /// Opens one whole sealed frame (length prefix included) in place: on success the
    /// plaintext replaces the ciphertext and is returned with the frame's kind.
    ///
    /// The tag is verified before anything is decrypted: on error `frame` and the session are
    /// unchanged.
    pub fn open_in_place<'f>(
        &mut self,
        frame: &'f mut [u8],
    ) -> Result<(u8, &'f mut [u8]), OpenError> {
        let header = sealed_header(frame)?;
        if header.kind < frame_kind::APPLICATION_MIN {
            return Err(OpenError::ReservedKind { kind: header.kind });
        }
        self.open_frame_in_place(frame)
    }

    /// `open_in_place` without the reserved-kind check: the handshake opens Confirm here.
    pub(crate) fn open_frame_in_place<'f>(
        &mut self,
        frame: &'f mut [u8],
    ) -> Result<(u8, &'f mut [u8]), OpenError> {
        let header = sealed_header(frame)?;
        let next_counter = self
            .recv_counter
            .checked_add(1)
            .ok_or(OpenError::CounterExhausted)?;
        let (aad, rest) = frame.split_at_mut(FRAME_HEADER_BYTES);
        let (ciphertext, tag) = rest.split_at_mut(header.plaintext_bytes);
        let tag = Tag::try_from(&*tag).map_err(|_| OpenError::Malformed)?;
        self.recv_cipher
            .decrypt_inout_detached(
                &frame_nonce(self.recv_counter),
                aad,
                InOutBuf::from(&mut *ciphertext),
                &tag,
            )
            .map_err(|_| OpenError::Authentication)?;
        self.recv_counter = next_counter;
        Ok((header.kind, ciphertext))
    }

    /// Opens one whole sealed frame (length prefix included), decrypting straight into the
    /// start of `out`; returns the frame's kind and the plaintext length. `out` must hold at
    /// least `frame.len() - SEALED_FRAME_OVERHEAD_BYTES` bytes.
    ///
    /// This is the data path's zero-copy receive: the ciphertext is read once, from the
    /// receive buffer, and written once, as plaintext, into the destination. To land a
    /// payload aligned behind a fixed-size header of `h` bytes, pass an aligned buffer sliced
    /// from `ALIGN - h`. The tag is verified before anything is written: on error `out` and
    /// the session are unchanged.
    pub fn open_into(&mut self, frame: &[u8], out: &mut [u8]) -> Result<(u8, usize), OpenError> {
        let header = sealed_header(frame)?;
        if header.kind < frame_kind::APPLICATION_MIN {
            return Err(OpenError::ReservedKind { kind: header.kind });
        }
        let available = out.len();
        let out = out
            .get_mut(..header.plaintext_bytes)
            .ok_or(OpenError::BufferTooSmall {
                needed: header.plaintext_bytes,
                available,
            })?;
        let next_counter = self
            .recv_counter
            .checked_add(1)
            .ok_or(OpenError::CounterExhausted)?;
        let aad = &frame[..FRAME_HEADER_BYTES];
        let ciphertext = &frame[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + header.plaintext_bytes];
        let tag = Tag::try_from(&frame[FRAME_HEADER_BYTES + header.plaintext_bytes..])
            .map_err(|_| OpenError::Malformed)?;
        let buffer = InOutBuf::new(ciphertext, out).map_err(|_| OpenError::Malformed)?;
        self.recv_cipher
            .decrypt_inout_detached(&frame_nonce(self.recv_counter), aad, buffer, &tag)
            .map_err(|_| OpenError::Authentication)?;
        self.recv_counter = next_counter;
        Ok((header.kind, header.plaintext_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIND: u8 = frame_kind::APPLICATION_MIN;

    fn pair_from(key_a: [u8; 32], key_b: [u8; 32]) -> (Session, Session) {
        (
            Session::from_keys(&key_a, &key_b),
            Session::from_keys(&key_b, &key_a),
        )
    }

    fn pair() -> (Session, Session) {
        pair_from([1; 32], [2; 32])
    }

    fn sealed(session: &mut Session, kind: u8, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        session.seal(kind, header, payload, &mut out).unwrap();
        out
    }

    #[test]
    fn keys_differ_per_direction_and_per_nonce_pair() {
        let key = [7u8; 32];
        let hash = [9u8; 32];
        let a = derive_keys(&key, &[1; 32], &[2; 32], &hash);
        assert_ne!(a.initiator_to_responder, a.responder_to_initiator);
        let swapped = derive_keys(&key, &[2; 32], &[1; 32], &hash);
        assert_ne!(a.initiator_to_responder, swapped.initiator_to_responder);
        let new_responder_nonce = derive_keys(&key, &[1; 32], &[3; 32], &hash);
        assert_ne!(
            a.initiator_to_responder,
            new_responder_nonce.initiator_to_responder
        );
        assert_ne!(
            a.responder_to_initiator,
            new_responder_nonce.responder_to_initiator
        );
        let new_initiator_nonce = derive_keys(&key, &[4; 32], &[2; 32], &hash);
        assert_ne!(
            a.initiator_to_responder,
            new_initiator_nonce.initiator_to_responder
        );
        let other_transcript = derive_keys(&key, &[1; 32], &[2; 32], &[8; 32]);
        assert_ne!(
            a.initiator_to_responder,
            other_transcript.initiator_to_responder
        );
        let other_key = derive_keys(&[6; 32], &[1; 32], &[2; 32], &hash);
        assert_ne!(a.initiator_to_responder, other_key.initiator_to_responder);
        // Deterministic: the same inputs give the same keys on both nodes.
        let again = derive_keys(&key, &[1; 32], &[2; 32], &hash);
        assert_eq!(a.initiator_to_responder, again.initiator_to_responder);
        assert_eq!(a.responder_to_initiator, again.responder_to_initiator);
    }

    #[test]
    fn key_schedule_is_hkdf_sha256_of_the_documented_inputs() {
        // Pins the schedule against the hkdf crate used by hand with the documented inputs,
        // so that a change to salt or info order is caught.
        let key = [0x11u8; 32];
        let (ni, nr, th) = ([0x22u8; 32], [0x33u8; 32], [0x44u8; 32]);
        let mut salt = Vec::new();
        salt.extend_from_slice(&ni);
        salt.extend_from_slice(&nr);
        let mut info = b"tandem/1 ".to_vec();
        info.extend_from_slice(&th);
        let mut okm = [0u8; 64];
        Hkdf::<Sha256>::new(Some(&salt), &key)
            .expand(&info, &mut okm)
            .unwrap();
        let keys = derive_keys(&key, &ni, &nr, &th);
        assert_eq!(keys.initiator_to_responder[..], okm[..32]);
        assert_eq!(keys.responder_to_initiator[..], okm[32..]);
    }

    #[test]
    fn sealed_frame_has_the_documented_layout() {
        let (mut a, _) = pair();
        let frame = sealed(&mut a, 0x42, b"hd", b"payload");
        assert_eq!(frame.len(), 4 + 1 + 9 + 16);
        assert_eq!(frame[..4], (1u32 + 9 + 16).to_be_bytes());
        assert_eq!(frame[4], 0x42);
        assert_ne!(
            &frame[5..14],
            b"hdpayload",
            "the plaintext must be encrypted"
        );
        assert_eq!(a.send_counter(), 1);
    }

    #[test]
    fn frames_round_trip_in_order_both_ways() {
        let (mut a, mut b) = pair();
        for i in 0..5u8 {
            let mut frame = sealed(&mut a, KIND + i, &[i; 3], &[i; 100]);
            let (kind, plaintext) = b.open_in_place(&mut frame).unwrap();
            assert_eq!(kind, KIND + i);
            assert_eq!(plaintext[..3], [i; 3]);
            assert_eq!(plaintext[3..], [i; 100]);
            let frame = sealed(&mut b, KIND, b"", &[i; 7]);
            let mut out = [0u8; 16];
            let (kind, n) = a.open_into(&frame, &mut out).unwrap();
            assert_eq!((kind, n), (KIND, 7));
            assert_eq!(out[..7], [i; 7]);
        }
        assert_eq!((a.send_counter(), a.recv_counter()), (5, 5));
        assert_eq!((b.send_counter(), b.recv_counter()), (5, 5));
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let (mut a, mut b) = pair();
        let mut frame = sealed(&mut a, KIND, b"", b"");
        assert_eq!(frame.len(), SEALED_FRAME_OVERHEAD_BYTES);
        let (kind, plaintext) = b.open_in_place(&mut frame).unwrap();
        assert_eq!(kind, KIND);
        assert!(plaintext.is_empty());
    }

    #[test]
    fn replayed_frame_fails_to_open() {
        let (mut a, mut b) = pair();
        let frame = sealed(&mut a, KIND, b"", b"write 1");
        b.open_in_place(&mut frame.clone()).unwrap();
        assert_eq!(
            b.open_in_place(&mut frame.clone()),
            Err(OpenError::Authentication)
        );
    }

    #[test]
    fn reordered_frames_fail_to_open() {
        let (mut a, mut b) = pair();
        let first = sealed(&mut a, KIND, b"", b"first");
        let mut second = sealed(&mut a, KIND, b"", b"second");
        assert_eq!(b.open_in_place(&mut second), Err(OpenError::Authentication));
        // The failure changed nothing: the frames still open in their order.
        assert_eq!(b.recv_counter(), 0);
        b.open_in_place(&mut first.clone()).unwrap();
        let mut second = sealed(&mut Session::from_keys(&[1; 32], &[2; 32]), KIND, b"", b"x");
        // A frame sealed at counter 0 by another sealer is not the expected counter-1 frame.
        assert_eq!(b.open_in_place(&mut second), Err(OpenError::Authentication));
    }

    #[test]
    fn dropped_frame_makes_the_next_one_fail() {
        let (mut a, mut b) = pair();
        let _lost = sealed(&mut a, KIND, b"", b"lost");
        let mut next = sealed(&mut a, KIND, b"", b"next");
        assert_eq!(b.open_in_place(&mut next), Err(OpenError::Authentication));
    }

    #[test]
    fn duplicated_frame_fails_to_open_the_second_time() {
        let (mut a, mut b) = pair();
        let frame = sealed(&mut a, KIND, b"h", b"p");
        let mut out = [0u8; 8];
        assert_eq!(b.open_into(&frame, &mut out), Ok((KIND, 2)));
        assert_eq!(
            b.open_into(&frame, &mut out),
            Err(OpenError::Authentication)
        );
    }

    #[test]
    fn frame_sealed_in_one_direction_does_not_open_in_the_other() {
        let (mut a, _b) = pair();
        let mut frame = sealed(&mut a, KIND, b"", b"reflect me");
        // `a` itself expects the other direction's key at counter 0.
        assert_eq!(a.open_in_place(&mut frame), Err(OpenError::Authentication));
    }

    #[test]
    fn flipping_any_single_bit_fails_to_open() {
        let (mut a, _) = pair();
        let frame = sealed(&mut a, KIND, b"hdr", b"some payload");
        for bit in 0..frame.len() * 8 {
            let (_, mut b) = pair();
            let mut damaged = frame.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let result = b.open_in_place(&mut damaged);
            assert!(result.is_err(), "bit {bit} flipped still opened");
            assert_eq!(
                b.recv_counter(),
                0,
                "bit {bit}: a failed open changed state"
            );
            let (_, mut b) = pair();
            let mut out = [0u8; 64];
            assert!(b.open_into(&damaged_copy(&frame, bit), &mut out).is_err());
            assert_eq!(
                out, [0u8; 64],
                "bit {bit}: output written before verification"
            );
        }
        // And the undamaged frame does open, so the loop above tested something.
        let (_, mut b) = pair();
        assert!(b.open_in_place(&mut frame.clone()).is_ok());
    }

    fn damaged_copy(frame: &[u8], bit: usize) -> Vec<u8> {
        let mut damaged = frame.to_vec();
        damaged[bit / 8] ^= 1 << (bit % 8);
        damaged
    }

    #[test]
    fn truncated_and_extended_frames_fail_without_state_change() {
        let (mut a, mut b) = pair();
        let frame = sealed(&mut a, KIND, b"", b"payload");
        for len in 0..frame.len() {
            assert!(b.open_in_place(&mut frame[..len].to_vec()).is_err());
        }
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(b.open_in_place(&mut longer), Err(OpenError::Malformed));
        assert_eq!(b.recv_counter(), 0);
        assert!(b.open_in_place(&mut frame.clone()).is_ok());
    }

    #[test]
    fn reserved_kinds_are_refused_by_open() {
        let (mut a, mut b) = pair();
        let mut frame = Vec::new();
        a.seal_frame(frame_kind::CONFIRM, b"", b"x", &mut frame)
            .unwrap();
        assert_eq!(
            b.open_in_place(&mut frame.clone()),
            Err(OpenError::ReservedKind {
                kind: frame_kind::CONFIRM
            })
        );
        assert_eq!(
            b.open_into(&frame, &mut [0u8; 8]),
            Err(OpenError::ReservedKind {
                kind: frame_kind::CONFIRM
            })
        );
    }

    #[test]
    #[should_panic(expected = "reserved for the handshake")]
    fn sealing_a_reserved_kind_is_a_bug() {
        let (mut a, _) = pair();
        let _ = a.seal(frame_kind::HELLO, b"", b"", &mut Vec::new());
    }

    #[test]
    fn open_into_a_short_buffer_is_refused_without_state_change() {
        let (mut a, mut b) = pair();
        let frame = sealed(&mut a, KIND, b"", &[5; 10]);
        let mut small = [0u8; 9];
        assert_eq!(
            b.open_into(&frame, &mut small),
            Err(OpenError::BufferTooSmall {
                needed: 10,
                available: 9
            })
        );
        let mut out = [0u8; 10];
        assert_eq!(b.open_into(&frame, &mut out), Ok((KIND, 10)));
    }

    #[test]
    fn open_into_lands_a_payload_behind_a_header_at_an_aligned_offset() {
        let (mut a, mut b) = pair();
        let header = [0xAAu8; 24];
        let payload = vec![0x5Au8; 8192];
        let frame = sealed(&mut a, KIND, &header, &payload);
        let mut disk_buffer = vec![0u8; 4096 + 8192];
        let (_, n) = b
            .open_into(&frame, &mut disk_buffer[4096 - header.len()..])
            .unwrap();
        assert_eq!(n, header.len() + payload.len());
        assert_eq!(disk_buffer[4096 - 24..4096], header);
        assert_eq!(disk_buffer[4096..], payload[..]);
    }

    #[test]
    fn sealing_a_mebibyte_copies_the_payload_once_into_a_reused_buffer() {
        // With capacity reserved, `seal` writes into the buffer without reallocating: the
        // single copy is the payload into the buffer, encrypted there in place.
        let (mut a, mut b) = pair();
        let payload = vec![0x33u8; 1 << 20];
        let mut out = Vec::with_capacity((1 << 20) + 32 + SEALED_FRAME_OVERHEAD_BYTES);
        let before = out.as_ptr();
        a.seal(KIND, &[1; 32], &payload, &mut out).unwrap();
        assert_eq!(out.as_ptr(), before, "the send buffer was reallocated");
        assert_eq!(out.len(), (1 << 20) + 32 + SEALED_FRAME_OVERHEAD_BYTES);
        let (_, plaintext) = b.open_in_place(&mut out).unwrap();
        assert_eq!(plaintext[32..], payload[..]);
    }

    #[test]
    fn seal_appends_and_keeps_what_the_buffer_held() {
        let (mut a, mut b) = pair();
        let mut out = b"queued".to_vec();
        a.seal(KIND, b"", b"one", &mut out).unwrap();
        a.seal(KIND, b"", b"two", &mut out).unwrap();
        assert_eq!(&out[..6], b"queued");
        let first_len = SEALED_FRAME_OVERHEAD_BYTES + 3;
        let (first, second) = out[6..].split_at_mut(first_len);
        assert_eq!(b.open_in_place(first).unwrap().1, b"one");
        assert_eq!(b.open_in_place(second).unwrap().1, b"two");
    }

    #[test]
    fn oversized_plaintext_is_refused_before_any_allocation() {
        let (mut a, _) = pair();
        let mut out = Vec::new();
        let header = vec![0u8; PEER_PLAINTEXT_BYTES_MAX];
        assert_eq!(
            a.seal(KIND, &header, b"x", &mut out),
            Err(SealError::TooLarge {
                plaintext_bytes: PEER_PLAINTEXT_BYTES_MAX + 1
            })
        );
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 0);
        assert_eq!(a.send_counter(), 0);
    }

    #[test]
    fn exhausted_counters_are_errors_never_wraps() {
        let (mut a, mut b) = pair();
        a.send_counter = u64::MAX - 1;
        b.recv_counter = u64::MAX - 1;
        let mut frame = sealed(&mut a, KIND, b"", b"last");
        assert!(b.open_in_place(&mut frame).is_ok());
        assert_eq!(a.send_counter(), u64::MAX);
        let mut out = Vec::new();
        assert_eq!(
            a.seal(KIND, b"", b"wrap", &mut out),
            Err(SealError::CounterExhausted)
        );
        assert!(out.is_empty());
        assert_eq!(a.send_counter(), u64::MAX);
        let mut any = vec![0u8; SEALED_FRAME_OVERHEAD_BYTES];
        any[..4].copy_from_slice(&17u32.to_be_bytes());
        any[4] = KIND;
        assert_eq!(b.open_in_place(&mut any), Err(OpenError::CounterExhausted));
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let (a, _) = pair_from([0xAB; 32], [0xCD; 32]);
        let text = format!("{a:?}");
        assert!(text.contains("send_counter"));
        assert!(!text.contains("171") && !text.contains("205"), "{text}");
    }

    proptest! {
        #[test]
        fn random_bytes_never_open_and_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let (_, mut b) = pair();
            let mut out = vec![0u8; 600];
            prop_assert!(b.open_into(&bytes, &mut out).is_err());
            prop_assert!(b.open_in_place(&mut bytes).is_err());
            prop_assert_eq!(b.recv_counter(), 0);
        }

        #[test]
        fn any_plaintext_round_trips(
            header in proptest::collection::vec(any::<u8>(), 0..64),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
            kind in frame_kind::APPLICATION_MIN..=u8::MAX,
        ) {
            let (mut a, mut b) = pair();
            let mut frame = sealed(&mut a, kind, &header, &payload);
            let (got_kind, plaintext) = b.open_in_place(&mut frame).unwrap();
            prop_assert_eq!(got_kind, kind);
            prop_assert_eq!(&plaintext[..header.len()], &header[..]);
            prop_assert_eq!(&plaintext[header.len()..], &payload[..]);
        }
    }
}
