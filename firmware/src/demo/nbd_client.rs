//! The demo's NBD client: just enough of the protocol to copy and read back files as a user's
//! machine would.
//!
//! Fixed-newstyle handshake, `NBD_OPT_GO` for the default export, then `NBD_CMD_WRITE`, `READ`
//! and `FLUSH` one at a time with simple replies. Every socket operation has a deadline, so a
//! server that lost its power shows up as a timeout, never as a hang. The numbers come from
//! [`crate::wire::nbd`], the same table the server uses.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::wire::nbd::{
    be_u16, be_u32, be_u64, client_flags, command, emit_request, handshake_flags, info, option,
    option_reply, Request, GREETING_LEN, NBD_MAGIC, OPTION_HEADER_LEN, OPTION_MAGIC,
    OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
};

/// The largest option reply payload the client reads (the spec caps strings at 4096 bytes).
const OPTION_REPLY_BYTES_MAX: usize = 64 * 1024;

/// Where the volume is served: the cluster IP over TCP, or a node's unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `nbd_listen` on the cluster IP.
    Tcp(SocketAddr),
    /// A node's `nbd_socket`.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How long the client waits before it gives up and reconnects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// A TCP connect.
    pub(crate) connect: Duration,
    /// Any read or write of a request or its reply.
    pub(crate) request: Duration,
}

/// Why a request did not succeed.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The connection failed or timed out: reconnect.
    Io(io::Error),
    /// The server answered with an NBD error (for example a node that stopped serving).
    Nbd(u32),
    /// The node refused the export at the handshake (a secondary does), with its reason.
    Refused(String),
    /// The server sent something this client does not understand.
    Protocol(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Io(e) if is_timeout(e) => write!(f, "no reply in time"),
            RequestError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "the connection closed")
            }
            RequestError::Io(e) => write!(f, "{e}"),
            RequestError::Nbd(errno) => write!(f, "NBD error {errno}"),
            RequestError::Refused(reason) => write!(f, "refused: {reason}"),
            RequestError::Protocol(what) => write!(f, "protocol error: {what}"),
        }
    }
}

impl From<io::Error> for RequestError {
    fn from(e: io::Error) -> Self {
        RequestError::Io(e)
    }
}

/// Whether an I/O error is a deadline that passed.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One of the two kinds of stream, with its deadlines set.
#[derive(Debug)]
enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection {
    fn open(endpoint: &Endpoint, timeouts: Timeouts) -> io::Result<Connection> {
        let deadline = Some(timeouts.request);
        match endpoint {
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect_timeout(addr, timeouts.connect)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(deadline)?;
                stream.set_write_timeout(deadline)?;
                Ok(Connection::Tcp(stream))
            }
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path)?;
                stream.set_read_timeout(deadline)?;
                stream.set_write_timeout(deadline)?;
                Ok(Connection::Unix(stream))
            }
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
        }
    }
}

/// A connection in the transmission phase.
#[derive(Debug)]
pub(crate) struct NbdClient {
    connection: Connection,
    next_cookie: u64,
}

impl NbdClient {
    /// Connects and negotiates the default export with `NBD_OPT_GO`. A node that does not serve
    /// (a secondary) refuses here, with an error reply to GO.
    pub(crate) fn connect(endpoint: &Endpoint, timeouts: Timeouts) -> Result<Self, RequestError> {
        let mut connection = Connection::open(endpoint, timeouts)?;
        let mut greeting = [0u8; GREETING_LEN];
        connection.read_exact(&mut greeting)?;
        if be_u64(&greeting, 0) != NBD_MAGIC || be_u64(&greeting, 8) != OPTION_MAGIC {
            return Err(RequestError::Protocol("not an NBD server".to_string()));
        }
        let flags = be_u16(&greeting, 16);
        if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(RequestError::Protocol("no fixed newstyle".to_string()));
        }
        let mut ours = client_flags::FIXED_NEWSTYLE;
        if flags & handshake_flags::NO_ZEROES != 0 {
            ours |= client_flags::NO_ZEROES;
        }
        connection.write_all(&ours.to_be_bytes())?;
        go(&mut connection)?;
        Ok(NbdClient {
            connection,
            next_cookie: 1,
        })
    }

    /// `NBD_CMD_WRITE` of `data` at `offset`.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RequestError> {
        let length = u32::try_from(data.len())
            .map_err(|_| RequestError::Protocol("write too large".to_string()))?;
        let cookie = self.send(command::WRITE, offset, length)?;
        self.connection.write_all(data)?;
        self.reply(cookie)
    }

    /// `NBD_CMD_READ` of `length` bytes at `offset`, into `data` (resized to fit).
    pub(crate) fn read(
        &mut self,
        offset: u64,
        length: u32,
        data: &mut Vec<u8>,
    ) -> Result<(), RequestError> {
        let cookie = self.send(command::READ, offset, length)?;
        self.reply(cookie)?;
        data.resize(length as usize, 0);
        self.connection.read_exact(data)?;
        Ok(())
    }

    /// `NBD_CMD_FLUSH`: every acknowledged write is durable.
    pub(crate) fn flush(&mut self) -> Result<(), RequestError> {
        let cookie = self.send(command::FLUSH, 0, 0)?;
        self.reply(cookie)
    }

    fn send(&mut self, command: u16, offset: u64, length: u32) -> Result<u64, RequestError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = emit_request(&Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        });
        self.connection.write_all(&header)?;
        Ok(cookie)
    }

    fn reply(&mut self, cookie: u64) -> Result<(), RequestError> {
        let mut head = [0u8; SIMPLE_REPLY_LEN];
        self.connection.read_exact(&mut head)?;
        if be_u32(&head, 0) != SIMPLE_REPLY_MAGIC {
            return Err(RequestError::Protocol("bad reply magic".to_string()));
        }
        if be_u64(&head, 8) != cookie {
            return Err(RequestError::Protocol(
                "reply to another request".to_string(),
            ));
        }
        match be_u32(&head, 4) {
            0 => Ok(()),
            errno => Err(RequestError::Nbd(errno)),
        }
    }
}

/// `NBD_OPT_GO` with the empty name (the default export) and no information requests. The
/// server must describe the export (`NBD_INFO_EXPORT`) before its ACK.
fn go(connection: &mut Connection) -> Result<(), RequestError> {
    // Payload: name length (0), no name, number of information requests (0).
    let payload = [0u8; 6];
    let mut header = [0u8; OPTION_HEADER_LEN];
    header[0..8].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    header[8..12].copy_from_slice(&option::GO.to_be_bytes());
    header[12..16].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    connection.write_all(&header)?;
    connection.write_all(&payload)?;
    let mut described = false;
    loop {
        let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
        connection.read_exact(&mut head)?;
        if be_u64(&head, 0) != OPTION_REPLY_MAGIC || be_u32(&head, 8) != option::GO {
            return Err(RequestError::Protocol("bad option reply".to_string()));
        }
        let reply_type = be_u32(&head, 12);
        let length = be_u32(&head, 16) as usize;
        if length > OPTION_REPLY_BYTES_MAX {
            return Err(RequestError::Protocol("option reply too large".to_string()));
        }
        let mut data = vec![0u8; length];
        connection.read_exact(&mut data)?;
        if reply_type & (1 << 31) != 0 {
            let reason = String::from_utf8_lossy(&data).into_owned();
            return Err(RequestError::Refused(reason));
        }
        match reply_type {
            option_reply::INFO if data.len() == 12 && be_u16(&data, 0) == info::EXPORT => {
                described = true;
            }
            option_reply::INFO => {}
            option_reply::ACK if described => return Ok(()),
            option_reply::ACK => {
                return Err(RequestError::Protocol(
                    "no export description before ACK".to_string(),
                ))
            }
            other => {
                return Err(RequestError::Protocol(format!(
                    "unexpected option reply {other:#x}"
                )))
            }
        }
    }
}
