//! A deliberately naive NBD client over a unix socket, for tests that must send what real
//! clients never send (bad magic, absurd lengths, unknown options and commands).
//!
//! It is written from the protocol document (NetworkBlockDevice/nbd `doc/proto.md`), not from the
//! server's code, so it checks the server against the spec rather than against itself. Every
//! read has a timeout, so a server that stops answering fails the test instead of hanging it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// "NBDMAGIC", the first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT", the second word of the greeting and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no zeroes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Option numbers.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// Bit 31: every error reply has it.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
}

/// Command types.
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flag {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: u16 = 1 << 0;
}

/// Transmission flags.
pub mod tflag {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// NBD error numbers (wire values, not host errno).
pub mod errno {
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
}

/// Largest option reply payload this client accepts (the spec caps strings at 4096 bytes).
const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

/// One reply to an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// The payload.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Whether this is an error reply (bit 31).
    pub fn is_error(&self) -> bool {
        self.reply_type & rep::ERROR_BIT != 0
    }
}

/// The export as `NBD_OPT_GO` described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error (0 on success).
    pub error: u32,
    /// The echoed cookie.
    pub cookie: u64,
}

/// A socket an NBD client can run on: unix (the node's `nbd_socket`) or TCP (`nbd_listen`).
pub trait NbdStream: Read + Write + std::fmt::Debug {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl NbdStream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl NbdStream for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

/// A raw NBD connection.
#[derive(Debug)]
pub struct RawClient<S: NbdStream = UnixStream> {
    stream: S,
    next_cookie: u64,
}

impl RawClient<std::net::TcpStream> {
    /// An NBD client on a connected TCP stream, with the same timeouts; nothing read yet.
    pub fn over_tcp(stream: std::net::TcpStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(RawClient::IO_TIMEOUT))?;
        stream.set_write_timeout(Some(RawClient::IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            next_cookie: 1,
        })
    }
}

impl RawClient {
    /// The read/write timeout of every socket operation.
    pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

    /// Connects, without reading anything.
    pub fn connect(path: &Path) -> io::Result<RawClient> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Self::IO_TIMEOUT))?;
        stream.set_write_timeout(Some(Self::IO_TIMEOUT))?;
        Ok(RawClient {
            stream,
            next_cookie: 1,
        })
    }

    /// Connects, does the fixed-newstyle greeting and `NBD_OPT_GO` for the default export;
    /// panics unless the server accepts.
    pub fn connect_and_go(path: &Path) -> (RawClient, Export) {
        let mut client = RawClient::connect(path).expect("connect to NBD socket");
        client.handshake().expect("NBD greeting");
        let export = client
            .go("")
            .expect("NBD_OPT_GO i/o")
            .unwrap_or_else(|reply| panic!("NBD_OPT_GO refused: {reply:?}"));
        (client, export)
    }
}

impl<S: NbdStream> RawClient<S> {
    /// The socket, for tests that write raw bytes.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads the 18-byte greeting; checks both magics; returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let mut buf = [0u8; 18];
        self.stream.read_exact(&mut buf)?;
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        let opt_magic = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad greeting magic {magic:#x} {opt_magic:#x}"),
            ));
        }
        Ok(u16::from_be_bytes([buf[16], buf[17]]))
    }

    /// Sends the client flags.
    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.stream.write_all(&flags.to_be_bytes())
    }

    /// Greeting plus client flags (fixed newstyle, and no-zeroes when offered).
    pub fn handshake(&mut self) -> io::Result<u16> {
        let flags = self.read_greeting()?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "server does not offer fixed newstyle",
            ));
        }
        let mut client_flags = CLIENT_FLAG_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_FLAG_NO_ZEROES;
        }
        self.send_client_flags(client_flags)?;
        Ok(flags)
    }

    /// Sends an option header claiming `length` bytes of data, without the data.
    pub fn send_option_header(&mut self, option: u32, length: u32) -> io::Result<()> {
        let mut buf = Vec::with_capacity(16);
        buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&buf)
    }

    /// Sends one option with its data.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let length = u32::try_from(data.len()).expect("option data fits u32");
        self.send_option_header(option, length)?;
        self.stream.write_all(data)
    }

    /// Reads one option reply.
    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let mut head = [0u8; 20];
        self.stream.read_exact(&mut head)?;
        let magic = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
        if magic != OPTION_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        let reply_type = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
        if length > OPTION_REPLY_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option reply of {length} bytes"),
            ));
        }
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data)?;
        Ok(OptionReply {
            option,
            reply_type,
            data,
        })
    }

    /// `NBD_OPT_GO` (no info requests) for `name`. `Ok(Err(reply))` carries the error reply.
    pub fn go(&mut self, name: &str) -> io::Result<Result<Export, OptionReply>> {
        self.go_or_info(opt::GO, name)
    }

    /// `NBD_OPT_INFO` for `name`: like GO but stays in option haggling.
    pub fn info(&mut self, name: &str) -> io::Result<Result<Export, OptionReply>> {
        self.go_or_info(opt::INFO, name)
    }

    fn go_or_info(&mut self, option: u32, name: &str) -> io::Result<Result<Export, OptionReply>> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(option, &data)?;
        let mut export = None;
        loop {
            let reply = self.read_option_reply()?;
            if reply.option != option {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply for option {} to option {option}", reply.option),
                ));
            }
            if reply.is_error() {
                return Ok(Err(reply));
            }
            match reply.reply_type {
                rep::INFO if reply.data.len() >= 2 && reply.data[0..2] == [0, 0] => {
                    if reply.data.len() != 12 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("NBD_INFO_EXPORT of {} bytes", reply.data.len()),
                        ));
                    }
                    export = Some(Export {
                        size: u64::from_be_bytes(reply.data[2..10].try_into().expect("8 bytes")),
                        flags: u16::from_be_bytes([reply.data[10], reply.data[11]]),
                    });
                }
                rep::INFO => {}
                rep::ACK => {
                    return export.map(Ok).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "ACK without NBD_INFO_EXPORT")
                    });
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected reply type {other:#x} to option {option}"),
                    ));
                }
            }
        }
    }

    /// Sends a request header (and nothing else).
    pub fn send_request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> io::Result<()> {
        self.send_request_with_magic(REQUEST_MAGIC, flags, command, cookie, offset, length)
    }

    /// Sends a request header with an arbitrary magic.
    pub fn send_request_with_magic(
        &mut self,
        magic: u32,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> io::Result<()> {
        let mut buf = Vec::with_capacity(28);
        buf.extend_from_slice(&magic.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&command.to_be_bytes());
        buf.extend_from_slice(&cookie.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&buf)
    }

    /// Reads a simple reply header (this client never negotiates structured replies).
    pub fn read_simple_reply(&mut self) -> io::Result<SimpleReply> {
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head)?;
        let magic = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad simple reply magic {magic:#x}"),
            ));
        }
        Ok(SimpleReply {
            error: u32::from_be_bytes(head[4..8].try_into().expect("4 bytes")),
            cookie: u64::from_be_bytes(head[8..16].try_into().expect("8 bytes")),
        })
    }

    fn cookie(&mut self) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        cookie
    }

    /// Sends one command without payload and returns its reply's error (its data is not read:
    /// use [`RawClient::read`] for reads).
    pub fn command(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
    ) -> io::Result<u32> {
        let cookie = self.cookie();
        self.send_request(flags, command, cookie, offset, length)?;
        let reply = self.read_simple_reply()?;
        expect_cookie(reply, cookie)?;
        Ok(reply.error)
    }

    /// `NBD_CMD_READ`: the data, or the NBD error.
    pub fn read(&mut self, offset: u64, length: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let cookie = self.cookie();
        self.send_request(0, cmd::READ, cookie, offset, length)?;
        let reply = self.read_simple_reply()?;
        expect_cookie(reply, cookie)?;
        if reply.error != 0 {
            return Ok(Err(reply.error));
        }
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data)?;
        Ok(Ok(data))
    }

    /// `NBD_CMD_WRITE`: the reply's NBD error (0 on success).
    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> io::Result<u32> {
        let cookie = self.cookie();
        let length = u32::try_from(data.len()).expect("write length fits u32");
        self.send_request(flags, cmd::WRITE, cookie, offset, length)?;
        self.stream.write_all(data)?;
        let reply = self.read_simple_reply()?;
        expect_cookie(reply, cookie)?;
        Ok(reply.error)
    }

    /// Waits up to `within` for the server to close the connection, discarding whatever it sends
    /// first. True on EOF or reset; false if the connection is still open at the deadline.
    pub fn wait_closed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            if self.stream.set_read_timeout(Some(wait)).is_err() {
                return true;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if crate::is_disconnect(&e) => return true,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let _ = self.stream.set_read_timeout(Some(RawClient::IO_TIMEOUT));
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}

fn expect_cookie(reply: SimpleReply, cookie: u64) -> io::Result<()> {
    if reply.cookie == cookie {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply cookie {} for request {cookie}", reply.cookie),
        ))
    }
}
