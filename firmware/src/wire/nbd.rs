//! The NBD protocol on the wire: fixed-newstyle handshake, options, requests and replies.
//!
//! Heads up: the reference is the NBD protocol document (NetworkBlockDevice/nbd `doc/proto.md`).
//! Every number is big-endian on the wire. Structures are decoded from byte slices that the
//! caller has already sized (`*_LEN` constants) and are encoded into fixed arrays, so nothing
//! here allocates.

/// "NBDMAGIC": the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": follows `NBD_MAGIC` in the greeting and starts every client option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every server reply to an option.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags sent by the server.
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags sent in reply to the greeting.
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands; any other bit ends the handshake.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option codes.
pub mod option {
    /// Select an export by name; ends the handshake, cannot fail politely.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (not offered).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and select an export; ends the handshake on success.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Reply types to options. Errors have bit 31 set.
pub mod option_reply {
    /// The option succeeded (final reply).
    pub const ACK: u32 = 1;
    /// One export (to `LIST`).
    pub const SERVER: u32 = 2;
    /// One piece of export information (to `INFO`/`GO`).
    pub const INFO: u32 = 3;
    /// One metadata context (to `LIST/SET_META_CONTEXT`).
    pub const META_CONTEXT: u32 = 4;
    /// The option is not known to this server.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// The option is forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// The option was malformed or is not valid now.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// The export is not known.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// The request or its answer is too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags, sent with the export's size.
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// A flush on any connection covers writes completed on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Command types.
pub mod command {
    /// Read.
    pub const READ: u16 = 0;
    /// Write; the payload follows the header.
    pub const WRITE: u16 = 1;
    /// Disconnect after finishing outstanding requests; no reply.
    pub const DISC: u16 = 2;
    /// Make every replied write durable.
    pub const FLUSH: u16 = 3;
    /// Discard a range (a hint).
    pub const TRIM: u16 = 4;
    /// Prefetch a range (a hint).
    pub const CACHE: u16 = 5;
    /// Zero a range.
    pub const WRITE_ZEROES: u16 = 6;
    /// Report allocation status of a range.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod command_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// Zeroing must not deallocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment a structured read.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Zeroing must be fast or fail.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Error values in replies (protocol values, not host errno).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (also: a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// This chunk is the last of its reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload.
    pub const NONE: u16 = 0;
    /// `u64 offset` then data.
    pub const OFFSET_DATA: u16 = 1;
    /// `u64 offset, u32 size`: a run of zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// `u32 context id` then `(u32 length, u32 flags)` descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// `u32 error, u16 message length, message`.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Flags of the `base:allocation` metadata context.
pub mod allocation {
    /// The range is a hole (no storage allocated).
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of the client flags that answer the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of the reply to `NBD_OPT_EXPORT_NAME` without the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING_LEN: usize = 124;

pub(crate) fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub(crate) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

pub(crate) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// The server's greeting: magic, option magic, handshake flags.
pub fn emit_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// A malformed handshake message; the connection cannot continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client set a flag the server does not know.
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
}

impl core::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HandshakeError::UnknownClientFlags(flags) => {
                write!(f, "client sent unknown handshake flags {flags:#x}")
            }
            HandshakeError::BadOptionMagic(magic) => write!(f, "bad option magic {magic:#x}"),
        }
    }
}

/// Decodes the client's flags.
pub fn parse_client_flags(bytes: &[u8; CLIENT_FLAGS_LEN]) -> Result<u32, HandshakeError> {
    let flags = u32::from_be_bytes(*bytes);
    if flags & !client_flags::KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// The header of a client option; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: u32,
    /// The payload length.
    pub length: u32,
}

/// Decodes an option header.
pub fn parse_option_header(
    bytes: &[u8; OPTION_HEADER_LEN],
) -> Result<OptionHeader, HandshakeError> {
    let magic = be_u64(bytes, 0);
    if magic != OPTION_MAGIC {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(bytes, 8),
        length: be_u32(bytes, 12),
    })
}

/// The header of a reply to an option; `length` bytes of payload follow.
pub fn emit_option_reply_header(
    option: u32,
    reply_type: u32,
    length: u32,
) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut out = [0u8; OPTION_REPLY_HEADER_LEN];
    out[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&reply_type.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// A malformed option payload: the option fails with `NBD_REP_ERR_INVALID`, the handshake goes
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionPayloadError {
    /// The payload ended before a length it declared.
    Truncated,
    /// Bytes remained after the last field.
    TrailingBytes,
    /// A string is not UTF-8 or is longer than the protocol allows.
    BadString,
}

impl core::fmt::Display for OptionPayloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OptionPayloadError::Truncated => write!(f, "option payload is truncated"),
            OptionPayloadError::TrailingBytes => write!(f, "option payload has trailing bytes"),
            OptionPayloadError::BadString => write!(f, "option carries a malformed string"),
        }
    }
}

/// Longest string the protocol allows.
pub const STRING_LEN_MAX: usize = 4096;

/// A cursor over an option payload.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionPayloadError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(OptionPayloadError::Truncated)?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(OptionPayloadError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn u16(&mut self) -> Result<u16, OptionPayloadError> {
        self.take(2).map(|b| be_u16(b, 0))
    }

    fn u32(&mut self) -> Result<u32, OptionPayloadError> {
        self.take(4).map(|b| be_u32(b, 0))
    }

    fn string(&mut self) -> Result<&'a str, OptionPayloadError> {
        let len = self.u32()? as usize;
        if len > STRING_LEN_MAX {
            return Err(OptionPayloadError::BadString);
        }
        let bytes = self.take(len)?;
        core::str::from_utf8(bytes).map_err(|_| OptionPayloadError::BadString)
    }

    fn finish(&self) -> Result<(), OptionPayloadError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(OptionPayloadError::TrailingBytes)
        }
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name.
    pub name: &'a str,
    /// Raw big-endian `u16` information types the client asks for.
    pub requests: &'a [u8],
}

impl InfoRequest<'_> {
    /// The information types requested.
    pub fn info_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.requests
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Decodes the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(payload: &[u8]) -> Result<InfoRequest<'_>, OptionPayloadError> {
    let mut reader = Reader {
        bytes: payload,
        at: 0,
    };
    let name = reader.string()?;
    let count = reader.u16()? as usize;
    let requests = reader.take(count * 2)?;
    reader.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Decodes the payload of `NBD_OPT_EXPORT_NAME` (the bare name).
pub fn parse_export_name(payload: &[u8]) -> Result<&str, OptionPayloadError> {
    if payload.len() > STRING_LEN_MAX {
        return Err(OptionPayloadError::BadString);
    }
    core::str::from_utf8(payload).map_err(|_| OptionPayloadError::BadString)
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// The export name.
    pub name: &'a str,
    /// The queries, each a string.
    pub queries: heapless::Vec<&'a str, META_CONTEXT_QUERY_COUNT_MAX>,
}

/// The most queries one meta context option may carry.
pub const META_CONTEXT_QUERY_COUNT_MAX: usize = 32;

/// Decodes a meta context option's payload.
pub fn parse_meta_context_request(
    payload: &[u8],
) -> Result<MetaContextRequest<'_>, OptionPayloadError> {
    let mut reader = Reader {
        bytes: payload,
        at: 0,
    };
    let name = reader.string()?;
    let count = reader.u32()?;
    let mut queries = heapless::Vec::new();
    for _ in 0..count {
        let query = reader.string()?;
        queries
            .push(query)
            .map_err(|_| OptionPayloadError::Truncated)?;
    }
    reader.finish()?;
    Ok(MetaContextRequest { name, queries })
}

/// `NBD_INFO_EXPORT`: size and transmission flags (12 bytes).
pub fn emit_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum payload (14 bytes).
pub fn emit_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size and flags (the zero padding is separate).
pub fn emit_export_name_reply(size: u64, flags: u16) -> [u8; EXPORT_NAME_REPLY_LEN] {
    let mut out = [0u8; EXPORT_NAME_REPLY_LEN];
    out[0..8].copy_from_slice(&size.to_be_bytes());
    out[8..10].copy_from_slice(&flags.to_be_bytes());
    out
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of the payload, for a write).
    pub length: u32,
}

/// A request header that is not one: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequestMagic(pub u32);

/// Decodes a request header.
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, BadRequestMagic> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(bytes, 4),
        command: be_u16(bytes, 6),
        cookie: be_u64(bytes, 8),
        offset: be_u64(bytes, 16),
        length: be_u32(bytes, 24),
    })
}

/// Encodes a request header (used by tests and tools).
pub fn emit_request(request: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.to_be_bytes());
    out[8..16].copy_from_slice(&request.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    out[24..28].copy_from_slice(&request.length.to_be_bytes());
    out
}

/// A simple reply header; a successful read's data follows it.
pub fn emit_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header; `length` bytes of chunk payload follow.
pub fn emit_chunk_header(
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_matches_the_spec_bytes() {
        let flags = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
        assert_eq!(
            emit_greeting(flags),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0x00, 0x03
            ]
        );
    }

    #[test]
    fn client_flags_with_unknown_bits_are_refused() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(3));
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 4]),
            Err(HandshakeError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header_decodes_from_spec_bytes() {
        let bytes = [
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 7, 0, 0, 0, 6,
        ];
        assert_eq!(
            parse_option_header(&bytes),
            Ok(OptionHeader {
                option: option::GO,
                length: 6
            })
        );
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(
            parse_option_header(&bad),
            Err(HandshakeError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn option_reply_header_has_the_reply_magic() {
        let out = emit_option_reply_header(option::GO, option_reply::ACK, 0);
        assert_eq!(
            &out[0..8],
            &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
        assert_eq!(&out[8..20], &[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn info_request_decodes_name_and_types() {
        // name "ab", two requests: NBD_INFO_BLOCK_SIZE (3) and NBD_INFO_NAME (1).
        let payload = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 3, 0, 1];
        let request = parse_info_request(&payload).unwrap();
        assert_eq!(request.name, "ab");
        assert_eq!(request.info_types().collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(
            parse_info_request(&payload[..11]),
            Err(OptionPayloadError::Truncated)
        );
        let mut long = payload.to_vec();
        long.push(0);
        assert_eq!(
            parse_info_request(&long),
            Err(OptionPayloadError::TrailingBytes)
        );
    }

    #[test]
    fn meta_context_request_decodes_queries() {
        let mut payload = vec![0, 0, 0, 0, 0, 0, 0, 2];
        for query in ["base:allocation", "qemu:dirty-bitmap:x"] {
            payload.extend_from_slice(&(query.len() as u32).to_be_bytes());
            payload.extend_from_slice(query.as_bytes());
        }
        let request = parse_meta_context_request(&payload).unwrap();
        assert_eq!(request.name, "");
        assert_eq!(
            request.queries.as_slice(),
            &["base:allocation", "qemu:dirty-bitmap:x"]
        );
    }

    #[test]
    fn request_header_decodes_from_spec_bytes() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0,
            0, 0x10, 0x00, 0, 0, 0x02, 0x00,
        ];
        let request = parse_request(&bytes).unwrap();
        assert_eq!(
            request,
            Request {
                flags: command_flags::FUA,
                command: command::WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            }
        );
        assert_eq!(emit_request(&request), bytes);
        let mut bad = bytes;
        bad[3] = 0;
        assert_eq!(parse_request(&bad), Err(BadRequestMagic(0x2560_9500)));
    }

    #[test]
    fn replies_match_the_spec_bytes() {
        assert_eq!(
            emit_simple_reply(errno::EINVAL, 9),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(
            emit_chunk_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, 1, 8 + 4096),
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 0x08]
        );
        assert_eq!(
            emit_info_export(1 << 20, 0x0d),
            [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x0d]
        );
        assert_eq!(
            emit_info_block_size(1, 4096, 1 << 25),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
    }

    proptest! {
        #[test]
        fn option_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_info_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
            let _ = parse_export_name(&bytes);
        }

        #[test]
        fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let request = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(parse_request(&emit_request(&request)), Ok(request));
        }

        #[test]
        fn info_request_round_trips(name in "[a-z]{0,40}", types in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut payload = (name.len() as u32).to_be_bytes().to_vec();
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&(types.len() as u16).to_be_bytes());
            for t in &types {
                payload.extend_from_slice(&t.to_be_bytes());
            }
            let request = parse_info_request(&payload).unwrap();
            prop_assert_eq!(request.name, name.as_str());
            prop_assert_eq!(request.info_types().collect::<Vec<_>>(), types);
        }
    }
}
