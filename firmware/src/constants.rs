//! Every limit of the firmware, in one place, with compile-time checks of how they relate.

/// The largest payload of one NBD request (read or write), advertised as the maximum block
/// size. The NBD spec asks servers to accept at least 32 MiB from clients that do not ask.
pub const NBD_PAYLOAD_BYTES_MAX: u32 = 32 << 20;

/// The preferred block size advertised to clients.
pub const NBD_BLOCK_BYTES_PREFERRED: u32 = 4096;

/// Clients served at once. One more is refused at the handshake with a clear reply.
pub const NBD_CONNECTION_COUNT_MAX: usize = 64;

/// Connections past the limit that are kept long enough to be told why they are refused; past
/// these, a new connection is closed at once.
pub const NBD_REFUSED_CONNECTION_COUNT_MAX: usize = 16;

/// Requests one connection may have in flight before its socket stops being read. Real clients
/// keep 64 to 128 queued (the kernel's queue depth is 128), so this is back-pressure, never an
/// error.
pub const NBD_REQUESTS_PER_CONNECTION_MAX: usize = 256;

/// Requests in flight over all connections.
pub const IO_IN_FLIGHT_COUNT_MAX: usize = 1024;

/// Bytes of request buffers in flight over all connections (one larger request is admitted
/// alone).
pub const IN_FLIGHT_BYTES_MAX: usize = 32 << 20;

/// Requests up to this size are "small": they may use the reserve below.
pub const SMALL_REQUEST_BYTES_MAX: usize = 128 << 10;

/// Bytes of buffers beyond [`IN_FLIGHT_BYTES_MAX`] that only small requests may use.
pub const SMALL_REQUEST_RESERVE_BYTES: usize = 4 << 20;

/// Bytes of idle buffers kept for reuse.
pub const BUFFER_CACHE_BYTES_MAX: usize = 16 << 20;

/// The largest option payload read into memory during the handshake; a longer one is skipped
/// without being stored and refused.
pub const NBD_OPTION_PAYLOAD_BYTES_MAX: u32 = 16 << 10;

/// The longest option payload skipped (and refused with `NBD_REP_ERR_TOO_BIG`); an option that
/// claims more closes the connection at once.
pub const NBD_OPTION_SKIP_BYTES_MAX: u32 = 1 << 20;

/// How long a client may take to finish the handshake before it is dropped (it holds a slot).
pub const NBD_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Bytes read from one client socket at a time.
pub const CLIENT_READ_BUFFER_BYTES: usize = 256 << 10;

/// The longest command line accepted on the control socket.
pub const CONTROL_LINE_BYTES_MAX: usize = 4096;

/// How long a control client may take to send its command.
pub const CONTROL_CLIENT_TIMEOUT_MS: u64 = 5_000;

/// Control and metrics connections served at once (they share the slots).
pub const CONTROL_CONNECTION_COUNT_MAX: usize = 8;

const _: () = assert!(IO_IN_FLIGHT_COUNT_MAX as u32 <= tandem_board::disk::RING_ENTRIES);
const _: () = assert!(NBD_REQUESTS_PER_CONNECTION_MAX <= IO_IN_FLIGHT_COUNT_MAX);
const _: () = assert!(NBD_PAYLOAD_BYTES_MAX as usize <= IN_FLIGHT_BYTES_MAX);
const _: () = assert!(NBD_PAYLOAD_BYTES_MAX.is_power_of_two());
const _: () = assert!(CLIENT_READ_BUFFER_BYTES >= 28 * 64);
const _: () = assert!(NBD_OPTION_PAYLOAD_BYTES_MAX < NBD_OPTION_SKIP_BYTES_MAX);

/// Recent events kept for the `events` command.
pub const EVENTS_COUNT_MAX: usize = 256;

/// Log lines waiting for the serial console; past this the oldest are dropped (a console nobody
/// reads must not grow memory).
pub const CONSOLE_LOG_QUEUE_COUNT_MAX: usize = 128;
