//! The kernel's NBD client, driven through the nbd generic netlink family: attach a connected
//! socket to `/dev/nbdN` (the kernel then speaks the NBD transmission phase on it, with no
//! handshake) and detach it again. No nbd-client, no ioctls: the netlink interface lets a
//! daemon hand over one end of a socketpair and keep serving the other.
//!
//! Messages are laid out after include/uapi/linux/genetlink.h and nbd-netlink.h. Each call
//! opens a short-lived blocking socket with a receive timeout, like the address functions of
//! [`crate::net`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::net::{next_sequence, read_u16, Attributes, NetlinkSocket, Request, NLM_F_ACK};

// include/uapi/linux/genetlink.h
const GENL_ID_CTRL: u16 = 0x10;
const GENL_HEADER_LEN: usize = 4;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// include/uapi/linux/nbd-netlink.h
const NBD_GENL_FAMILY_NAME: &[u8] = b"nbd\0";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// How the kernel is to use an attached socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    /// N of `/dev/nbdN`.
    pub index: u32,
    /// The volume's size.
    pub size_bytes: u64,
    /// The device's logical block size.
    pub block_bytes: u64,
    /// How long one request may go unanswered before the kernel gives up on the socket.
    pub request_timeout: Duration,
    /// The transmission flags the server would send in its handshake (NBD_FLAG_SEND_FLUSH, ...).
    pub transmission_flags: u16,
}

/// The generic netlink header: command and family version.
fn genl_header(command: u8, version: u8) -> [u8; GENL_HEADER_LEN] {
    [command, version, 0, 0]
}

/// The number the kernel gave the nbd family on this boot.
fn nbd_family(socket: &NetlinkSocket) -> io::Result<u16> {
    let mut request = Request::new(GENL_ID_CTRL, 0, next_sequence());
    request.push(&genl_header(CTRL_CMD_GETFAMILY, 1));
    request.push_attribute(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
    let mut family = None;
    socket
        .exchange(&request, |message| {
            let attributes = message.payload.get(GENL_HEADER_LEN..).unwrap_or_default();
            for (kind, payload) in Attributes::new(attributes) {
                if kind == CTRL_ATTR_FAMILY_ID {
                    family = read_u16(payload, 0);
                }
            }
        })
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the kernel has no nbd netlink family: load the nbd module",
                )
            } else {
                e
            }
        })?;
    family.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel answered the nbd family query without its id",
        )
    })
}

/// The nbd connect request for `attachment` over socket `fd`.
fn connect_request(family: u16, attachment: &Attachment, fd: i32) -> Request {
    let mut request = Request::new(family, NLM_F_ACK, next_sequence());
    request.push(&genl_header(NBD_CMD_CONNECT, NBD_GENL_VERSION));
    request.push_attribute(NBD_ATTR_INDEX, &attachment.index.to_ne_bytes());
    request.push_attribute(NBD_ATTR_SIZE_BYTES, &attachment.size_bytes.to_ne_bytes());
    request.push_attribute(
        NBD_ATTR_BLOCK_SIZE_BYTES,
        &attachment.block_bytes.to_ne_bytes(),
    );
    let timeout_s = attachment.request_timeout.as_secs().max(1);
    request.push_attribute(NBD_ATTR_TIMEOUT, &timeout_s.to_ne_bytes());
    // A socket that dies is not waited for: the daemon that served it is gone, and the
    // watchdog resets the board.
    request.push_attribute(NBD_ATTR_DEAD_CONN_TIMEOUT, &0u64.to_ne_bytes());
    request.push_attribute(
        NBD_ATTR_SERVER_FLAGS,
        &u64::from(attachment.transmission_flags).to_ne_bytes(),
    );
    // [NBD_ATTR_SOCKETS [NBD_SOCK_ITEM [NBD_SOCK_FD fd]]]
    request.push_nested(NBD_ATTR_SOCKETS, |sockets| {
        sockets.push_nested(NBD_SOCK_ITEM, |item| {
            item.push_attribute(NBD_SOCK_FD, &fd.to_ne_bytes());
        });
    });
    request
}

/// Attaches the connected stream socket `socket` to `/dev/nbdN`: from now on the kernel sends
/// NBD requests on it. The kernel takes its own reference; the caller may close its copy.
/// `EBUSY` means the device is already attached.
pub fn connect(attachment: &Attachment, socket: BorrowedFd<'_>) -> io::Result<()> {
    let netlink = NetlinkSocket::open_generic()?;
    let family = nbd_family(&netlink)?;
    let request = connect_request(family, attachment, socket.as_raw_fd());
    netlink.acknowledged(&request)
}

/// Detaches `/dev/nbdN`: requests still queued fail, the device reads as empty.
pub fn disconnect(index: u32) -> io::Result<()> {
    let netlink = NetlinkSocket::open_generic()?;
    let family = nbd_family(&netlink)?;
    let mut request = Request::new(family, NLM_F_ACK, next_sequence());
    request.push(&genl_header(NBD_CMD_DISCONNECT, NBD_GENL_VERSION));
    request.push_attribute(NBD_ATTR_INDEX, &index.to_ne_bytes());
    netlink.acknowledged(&request)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NLA_F_NESTED, as the kernel expects it on a nested attribute's type.
    const NESTED: u16 = 0x8000;

    fn attribute_at(bytes: &[u8], at: usize) -> (u16, u16) {
        let len = u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        let kind = u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]);
        (len, kind)
    }

    #[test]
    fn a_connect_request_carries_the_socket_nested_twice() {
        let attachment = Attachment {
            index: 3,
            size_bytes: 1 << 30,
            block_bytes: 4096,
            request_timeout: Duration::from_secs(60),
            transmission_flags: 0x1 | 0x4,
        };
        let request = connect_request(0x22, &attachment, 7);
        let bytes = request.as_bytes();
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(
            u16::from_ne_bytes([bytes[4], bytes[5]]),
            0x22,
            "the family id"
        );
        assert_eq!(bytes[16], NBD_CMD_CONNECT);
        // The sockets attribute is last: header, item header, fd header, fd.
        let tail = &bytes[bytes.len() - 16..];
        assert_eq!(attribute_at(tail, 0), (16, NBD_ATTR_SOCKETS | NESTED));
        assert_eq!(attribute_at(tail, 4), (12, NBD_SOCK_ITEM | NESTED));
        assert_eq!(attribute_at(tail, 8), (8, NBD_SOCK_FD));
        assert_eq!(i32::from_ne_bytes(tail[12..16].try_into().unwrap()), 7);
        // The index comes first, right after the generic header.
        assert_eq!(attribute_at(bytes, 20), (8, NBD_ATTR_INDEX));
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 3);
    }

    /// On a machine without the nbd module (this host), connect fails with a clear error, not
    /// a hang or a panic.
    #[test]
    fn connect_without_the_nbd_family_is_a_clear_error() {
        if std::path::Path::new("/sys/module/nbd").exists() {
            eprintln!("SKIPPED: the nbd module is loaded here");
            return;
        }
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let attachment = Attachment {
            index: 0,
            size_bytes: 1 << 20,
            block_bytes: 4096,
            request_timeout: Duration::from_secs(60),
            transmission_flags: 1,
        };
        use std::os::fd::AsFd;
        let error = connect(&attachment, ours.as_fd()).expect_err("no nbd family here");
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
        assert!(error.to_string().contains("nbd module"), "{error}");
    }
}
