//! The network primitives failover needs on Linux: where addresses live, adding and removing the
//! floating address, watching an interface's carrier, and ARP on one interface.
//!
//! Everything here acts in the network namespace of the calling thread: each socket is created by
//! the thread that calls, and a socket stays in the namespace it was created in.
//!
//! Routing netlink (NETLINK_ROUTE) messages are encoded and parsed by hand, as byte layouts of
//! the kernel's uapi headers (`nlmsghdr`, `ifaddrmsg`, `ifinfomsg`, `rtattr`). Parsing never
//! panics: a header or attribute that does not fit ends the walk of its datagram. The one-shot
//! functions ([`add_address`], [`has_address`], ...) open a short-lived blocking socket with a
//! receive timeout, so a kernel that never answers is an error rather than a hang; they are meant
//! for the rare moments of a failover, not for a hot loop. The long-lived sockets ([`LinkWatch`],
//! [`ArpSocket`]) are non-blocking and close-on-exec, and expose their descriptor ([`AsFd`]) for
//! the runtime's epoll.
#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

// include/uapi/linux/netlink.h
const NLMSG_HEADER_LEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLA_HEADER_LEN: usize = 4;
/// Attribute types carry two flag bits (NLA_F_NESTED, NLA_F_NET_BYTEORDER) above the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

// include/uapi/linux/rtnetlink.h
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
/// The multicast group mask of RTNLGRP_LINK (group 1) for `sockaddr_nl.nl_groups`.
const RTMGRP_LINK: u32 = 1;

// include/uapi/linux/if_addr.h
const IFADDRMSG_LEN: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

// include/uapi/linux/if_link.h and if.h
const IFINFOMSG_LEN: usize = 16;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFF_UP: u32 = 0x1;
const IFF_LOWER_UP: u32 = 0x1_0000;
const IFNAMSIZ: usize = 16;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;

// include/uapi/linux/if_ether.h and if_packet.h
const ETH_P_ARP: u16 = 0x0806;
const PACKET_OUTGOING: u8 = 4;

/// The largest request this crate sends: an NBD connect (about 130 bytes; see `nbd_kernel`).
const REQUEST_SIZE_MAX: usize = 256;
/// The receive buffer for netlink datagrams. The kernel sizes dump datagrams after the reader's
/// buffer but never above 32 KiB, so a dump never truncates; a larger single message (a link
/// with very many attributes) is reported as truncated rather than misread.
const NETLINK_DATAGRAM_SIZE_MAX: usize = 32 * 1024;
/// How long a one-shot request waits for the kernel's answer. The kernel answers routing
/// requests synchronously while sending, so this only bounds a kernel gone wrong.
const NETLINK_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// How many notification datagrams one [`LinkWatch::drain`] reads at most.
const LINK_DATAGRAMS_PER_DRAIN_MAX: u32 = 256;
/// How often an address dump that the kernel marks inconsistent (NLM_F_DUMP_INTR: the list
/// changed while it was read) is restarted before giving up.
const DUMP_ATTEMPTS_MAX: u32 = 3;

/// The receive buffer for one ARP frame. ARP is 28 bytes; Ethernet pads it to 46.
const ARP_FRAME_SIZE_MAX: usize = 64;
/// How many unusable frames (not Ethernet/IPv4 ARP, or our own) one [`ArpSocket::recv`] skips
/// before it returns, so that a flood cannot hold the event loop.
const ARP_SKIPPED_PER_RECV_MAX: u32 = 64;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Sequence numbers of our requests, unique in the process so a reply is never mistaken for
/// the answer to another request.
static NEXT_SEQUENCE: AtomicU32 = AtomicU32::new(1);

pub(crate) fn next_sequence() -> u32 {
    NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Public API: interfaces and addresses.
// ---------------------------------------------------------------------------------------------

/// The index of the interface called `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    check_interface_name(name)?;
    NetlinkSocket::open()?.query_link(LinkKey::Name(name), |link| link.ifindex)
}

/// The interface (name and index) that holds the local IPv4 address `ip`, if any does.
pub fn interface_for_address(ip: Ipv4Addr) -> io::Result<Option<(String, u32)>> {
    let socket = NetlinkSocket::open()?;
    let Some(entry) = socket.find_ipv4_address(|entry| entry.local == ip)? else {
        return Ok(None);
    };
    let name = socket.query_link(LinkKey::Index(entry.ifindex), |link| {
        link.name.map(str::to_owned)
    })?;
    let name = name.ok_or_else(|| {
        invalid_data(format!(
            "the kernel described a link without its name: ifindex={}",
            entry.ifindex
        ))
    })?;
    Ok(Some((name, entry.ifindex)))
}

/// The Ethernet (6-byte hardware) address of interface `ifindex`; an error for an interface
/// without one (a tunnel, for instance).
pub fn interface_mac(ifindex: u32) -> io::Result<[u8; 6]> {
    let mac = NetlinkSocket::open()?.query_link(LinkKey::Index(ifindex), |link| {
        link.mac.and_then(|mac| <[u8; 6]>::try_from(mac).ok())
    })?;
    mac.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the interface has no Ethernet address: ifindex={ifindex}"),
        )
    })
}

/// Adds `addr/prefix_len` to interface `ifindex`. An address that is already there with that
/// prefix length counts as added (EEXIST is success), so a repeated takeover is harmless.
pub fn add_address(ifindex: u32, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    check_prefix_len(prefix_len)?;
    let request = address_request(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        next_sequence(),
        ifindex,
        addr,
        prefix_len,
    );
    match NetlinkSocket::open()?.acknowledged(&request) {
        Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        result => result,
    }
}

/// Removes `addr/prefix_len` from interface `ifindex`. Returns false when it was not there
/// (EADDRNOTAVAIL), which includes the address held with another prefix length: the kernel
/// matches both.
pub fn remove_address(ifindex: u32, addr: Ipv4Addr, prefix_len: u8) -> io::Result<bool> {
    check_prefix_len(prefix_len)?;
    let request = address_request(RTM_DELADDR, 0, next_sequence(), ifindex, addr, prefix_len);
    match NetlinkSocket::open()?.acknowledged(&request) {
        Ok(()) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Whether interface `ifindex` holds the local IPv4 address `addr` (with any prefix length).
pub fn has_address(ifindex: u32, addr: Ipv4Addr) -> io::Result<bool> {
    let found = NetlinkSocket::open()?
        .find_ipv4_address(|entry| entry.ifindex == ifindex && entry.local == addr)?;
    Ok(found.is_some())
}

fn check_interface_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an interface name is 1 to 15 bytes without NUL: name={name:?}"),
        ));
    }
    Ok(())
}

fn check_prefix_len(prefix_len: u8) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an IPv4 prefix length is at most 32: prefix_len={prefix_len}"),
        ));
    }
    Ok(())
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

// ---------------------------------------------------------------------------------------------
// Carrier.
// ---------------------------------------------------------------------------------------------

/// The carrier of one interface, watched through the kernel's link notifications
/// (RTNLGRP_LINK), so a pulled cable is seen when the kernel reports it rather than at the next
/// poll.
///
/// Carrier means administratively up with the lower layer up (IFF_UP and IFF_LOWER_UP): the
/// kernel only reports LOWER_UP while the interface runs. The kernel sends the notification from
/// its linkwatch work: at once for stacked devices (veth, VLAN, bond ports), but possibly up to
/// a second late for a plain NIC, which linkwatch rate-limits.
#[derive(Debug)]
pub struct LinkWatch {
    /// Subscribed to RTNLGRP_LINK; non-blocking, for epoll.
    notifications: OwnedFd,
    /// For [`LinkWatch::carrier_now`], in the same namespace as the notifications.
    queries: NetlinkSocket,
    ifindex: u32,
    datagram: Box<[u8]>,
}

impl LinkWatch {
    /// Subscribes to link notifications, then checks that interface `ifindex` exists. Read
    /// [`LinkWatch::carrier_now`] after opening: a change after that is seen by
    /// [`LinkWatch::drain`], because the subscription came first.
    pub fn open(ifindex: u32) -> io::Result<LinkWatch> {
        let notifications = netlink_socket(SocketFlags::NONBLOCK, None)?;
        rustix::net::bind(&notifications, &SocketAddrNetlink::new(0, RTMGRP_LINK))?;
        let watch = LinkWatch {
            notifications,
            queries: NetlinkSocket::open()?,
            ifindex,
            datagram: vec![0; NETLINK_DATAGRAM_SIZE_MAX].into_boxed_slice(),
        };
        watch.carrier_now()?;
        Ok(watch)
    }

    /// Asks the kernel for the interface's carrier now (RTM_GETLINK).
    pub fn carrier_now(&self) -> io::Result<bool> {
        self.queries
            .query_link(LinkKey::Index(self.ifindex), |link| link.has_carrier())
    }

    /// Reads every pending notification; returns the newest carrier state of the watched
    /// interface if any notification about it arrived (it may equal the last one: a link also
    /// reports other changes). When the kernel dropped notifications (the socket's queue
    /// overflowed), the carrier is read again with [`LinkWatch::carrier_now`], so a lost event
    /// is never a lost state change. At most `LINK_DATAGRAMS_PER_DRAIN_MAX` datagrams are read
    /// per call, so a storm of notifications about other links cannot hold the event loop;
    /// the rest keep the descriptor readable (poll it level-triggered).
    pub fn drain(&mut self) -> Option<bool> {
        let mut newest = None;
        let mut lost = false;
        for _ in 0..LINK_DATAGRAMS_PER_DRAIN_MAX {
            match rustix::net::recv(
                &self.notifications,
                &mut self.datagram[..],
                RecvFlags::TRUNC,
            ) {
                Ok((0, _)) => break,
                Ok((len, full_len)) if full_len > len => lost = true,
                Ok((len, _)) => {
                    let datagram = self.datagram.get(..len).unwrap_or_default();
                    for message in Messages::new(datagram) {
                        if let Some(carrier) = carrier_in_notification(&message, self.ifindex) {
                            newest = Some(carrier);
                        }
                    }
                }
                Err(Errno::WOULDBLOCK) => break,
                Err(Errno::INTR) => continue,
                Err(Errno::NOBUFS) => lost = true,
                Err(error) => {
                    log::warn!(
                        "Reading link notifications failed; the carrier is read again. \
                         ifindex={} error={error}",
                        self.ifindex
                    );
                    lost = true;
                    break;
                }
            }
        }
        if lost {
            match self.carrier_now() {
                Ok(carrier) => newest = Some(carrier),
                Err(error) => log::warn!(
                    "Link notifications were lost and the carrier could not be read again. \
                     ifindex={} error={error}",
                    self.ifindex
                ),
            }
        }
        newest
    }
}

impl AsFd for LinkWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.notifications.as_fd()
    }
}

/// The carrier a link notification reports for interface `ifindex`, if it is about it. A
/// removed interface has no carrier.
fn carrier_in_notification(message: &Message<'_>, ifindex: u32) -> Option<bool> {
    let link = parse_link(message.payload)?;
    if link.ifindex != ifindex {
        return None;
    }
    match message.kind {
        RTM_NEWLINK => Some(link.has_carrier()),
        RTM_DELLINK => Some(false),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Netlink: the socket and its three kinds of exchange.
// ---------------------------------------------------------------------------------------------

/// A blocking netlink socket for one request at a time (NETLINK_ROUTE, or NETLINK_GENERIC for
/// the nbd family).
#[derive(Debug)]
pub(crate) struct NetlinkSocket {
    fd: OwnedFd,
}

/// Which link a query asks about.
#[derive(Debug, Clone, Copy)]
enum LinkKey<'a> {
    Index(u32),
    Name(&'a str),
}

/// A netlink socket of `protocol`: None is NETLINK_ROUTE (protocol 0, which rustix spells None).
fn netlink_socket(
    flags: SocketFlags,
    protocol: Option<rustix::net::Protocol>,
) -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        flags | SocketFlags::CLOEXEC,
        protocol,
    )?;
    Ok(fd)
}

impl NetlinkSocket {
    fn open() -> io::Result<NetlinkSocket> {
        NetlinkSocket::open_protocol(None)
    }

    /// A NETLINK_GENERIC socket (generic netlink families such as nbd).
    pub(crate) fn open_generic() -> io::Result<NetlinkSocket> {
        NetlinkSocket::open_protocol(Some(rustix::net::netlink::GENERIC))
    }

    fn open_protocol(protocol: Option<rustix::net::Protocol>) -> io::Result<NetlinkSocket> {
        let fd = netlink_socket(SocketFlags::empty(), protocol)?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(NETLINK_REPLY_TIMEOUT),
        )?;
        Ok(NetlinkSocket { fd })
    }

    /// Sends a request that asked for an acknowledgement; Ok when the kernel acknowledged, the
    /// kernel's errno otherwise.
    pub(crate) fn acknowledged(&self, request: &Request) -> io::Result<()> {
        self.exchange(request, |_| {}).map(|_| ())
    }

    /// The first IPv4 address the kernel lists that `matches`. A dump that the kernel marks
    /// inconsistent is trusted only if it found the address (which then existed at some point
    /// of the dump); otherwise it is read again.
    fn find_ipv4_address(
        &self,
        matches: impl Fn(&AddressEntry) -> bool,
    ) -> io::Result<Option<AddressEntry>> {
        for _ in 0..DUMP_ATTEMPTS_MAX {
            let request = address_dump_request(next_sequence());
            let mut found = None;
            let consistent = self.exchange(&request, |message| {
                if message.kind != RTM_NEWADDR || found.is_some() {
                    return;
                }
                found = parse_address(message.payload).filter(|entry| matches(entry));
            })?;
            if consistent || found.is_some() {
                return Ok(found);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!(
                "the address list kept changing while it was read: attempts={DUMP_ATTEMPTS_MAX}"
            ),
        ))
    }

    /// Asks for one link and reads what is needed of it with `read`.
    fn query_link<T>(&self, key: LinkKey<'_>, read: impl Fn(&LinkInfo<'_>) -> T) -> io::Result<T> {
        let request = link_request(next_sequence(), key);
        let mut answer = None;
        self.exchange(&request, |message| {
            if message.kind == RTM_NEWLINK {
                if let Some(link) = parse_link(message.payload) {
                    answer = Some(read(&link));
                }
            }
        })?;
        answer.ok_or_else(|| {
            invalid_data(format!(
                "the kernel answered a link query without the link: key={key:?}"
            ))
        })
    }

    /// Sends `request` and hands each reply message to `each` until the kernel's last word: an
    /// acknowledgement or error (NLMSG_ERROR), the end of a dump (NLMSG_DONE), or the one reply
    /// to a plain query. Returns whether the kernel saw the reply as consistent (no
    /// NLM_F_DUMP_INTR).
    pub(crate) fn exchange(
        &self,
        request: &Request,
        mut each: impl FnMut(&Message<'_>),
    ) -> io::Result<bool> {
        rustix::net::sendto(
            &self.fd,
            request.as_bytes(),
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut datagram = vec![0u8; NETLINK_DATAGRAM_SIZE_MAX];
        let mut consistent = true;
        loop {
            let len = self.recv(&mut datagram)?;
            for message in Messages::new(datagram.get(..len).unwrap_or_default()) {
                if message.seq != request.seq() {
                    continue;
                }
                consistent &= message.flags & NLM_F_DUMP_INTR == 0;
                match message.kind {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR | NLMSG_DONE => {
                        check_status(&message)?;
                        return Ok(consistent);
                    }
                    _ => {
                        each(&message);
                        let last = message.flags & NLM_F_MULTI == 0;
                        if last && request.flags() & NLM_F_ACK == 0 {
                            return Ok(consistent);
                        }
                    }
                }
            }
        }
    }

    /// One datagram into `datagram`; its length.
    fn recv(&self, datagram: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::net::recv(&self.fd, &mut *datagram, RecvFlags::TRUNC) {
                Ok((len, full_len)) if full_len > len => {
                    return Err(invalid_data(format!(
                        "a netlink reply was larger than the buffer: len={full_len} buffer={len}"
                    )))
                }
                Ok((len, _)) => return Ok(len),
                Err(Errno::INTR) => continue,
                Err(Errno::WOULDBLOCK) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the kernel did not answer a netlink request: timeout_ms={}",
                            NETLINK_REPLY_TIMEOUT.as_millis()
                        ),
                    ))
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// The status word of an NLMSG_ERROR (0 is an acknowledgement) or NLMSG_DONE (0 or the error
/// that cut a dump short), as a result.
fn check_status(message: &Message<'_>) -> io::Result<()> {
    let Some(status) = read_i32(message.payload, 0) else {
        // An NLMSG_DONE from old kernels may carry no status word.
        if message.kind == NLMSG_DONE {
            return Ok(());
        }
        return Err(invalid_data(
            "the kernel sent a netlink error without its code".to_owned(),
        ));
    };
    if status >= 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(status.saturating_neg()))
    }
}

// ---------------------------------------------------------------------------------------------
// Netlink: encoding.
// ---------------------------------------------------------------------------------------------

/// One netlink request, built in place: the header, a family header, attributes.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    bytes: [u8; REQUEST_SIZE_MAX],
    len: usize,
}

impl Request {
    pub(crate) fn new(kind: u16, flags: u16, seq: u32) -> Request {
        let mut request = Request {
            bytes: [0; REQUEST_SIZE_MAX],
            len: 0,
        };
        let mut header = [0u8; NLMSG_HEADER_LEN];
        header[4..6].copy_from_slice(&kind.to_ne_bytes());
        header[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        header[8..12].copy_from_slice(&seq.to_ne_bytes());
        // nlmsg_pid stays 0: the kernel fills in our port.
        request.push(&header);
        request
    }

    /// Appends `bytes`, padded to 4 bytes as netlink aligns everything, and updates the length
    /// in the header. Requests are built from constants and validated inputs only, so one that
    /// outgrows the buffer is a bug.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let padded = align4(bytes.len());
        assert!(
            self.len + padded <= REQUEST_SIZE_MAX,
            "a netlink request outgrew its buffer: len={} adding={padded}",
            self.len
        );
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += padded;
        let total = u32::try_from(self.len).unwrap_or(u32::MAX);
        self.bytes[0..4].copy_from_slice(&total.to_ne_bytes());
    }

    pub(crate) fn push_attribute(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(NLA_HEADER_LEN + payload.len()).unwrap_or(u16::MAX);
        let mut header = [0u8; NLA_HEADER_LEN];
        header[0..2].copy_from_slice(&len.to_ne_bytes());
        header[2..4].copy_from_slice(&kind.to_ne_bytes());
        self.push(&header);
        self.push(payload);
    }

    /// Appends a nested attribute (NLA_F_NESTED) whose payload `inner` pushes: attributes of
    /// its own, which may nest again.
    pub(crate) fn push_nested(&mut self, kind: u16, inner: impl FnOnce(&mut Request)) {
        let start = self.len;
        self.push(&[0; NLA_HEADER_LEN]);
        inner(self);
        let len = u16::try_from(self.len - start).unwrap_or(u16::MAX);
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.bytes[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn flags(&self) -> u16 {
        read_u16(&self.bytes, 6).unwrap_or(0)
    }

    fn seq(&self) -> u32 {
        read_u32(&self.bytes, 8).unwrap_or(0)
    }
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// `struct ifaddrmsg` for IPv4.
fn ifaddrmsg(prefix_len: u8, ifindex: u32) -> [u8; IFADDRMSG_LEN] {
    let mut bytes = [0u8; IFADDRMSG_LEN];
    bytes[0] = AF_INET;
    bytes[1] = prefix_len;
    // ifa_flags 0, ifa_scope 0 (RT_SCOPE_UNIVERSE).
    bytes[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    bytes
}

/// RTM_NEWADDR or RTM_DELADDR of `addr/prefix_len` on `ifindex`, acknowledged. IFA_ADDRESS
/// equals IFA_LOCAL, as for any interface that is not point-to-point.
fn address_request(
    kind: u16,
    flags: u16,
    seq: u32,
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Request {
    let mut request = Request::new(kind, flags | NLM_F_ACK, seq);
    request.push(&ifaddrmsg(prefix_len, ifindex));
    request.push_attribute(IFA_LOCAL, &addr.octets());
    request.push_attribute(IFA_ADDRESS, &addr.octets());
    request
}

/// RTM_GETADDR dump of every IPv4 address (the kernel has no single-address query for IPv4).
fn address_dump_request(seq: u32) -> Request {
    let mut request = Request::new(RTM_GETADDR, NLM_F_DUMP, seq);
    request.push(&ifaddrmsg(0, 0));
    request
}

/// RTM_GETLINK of one link, by index or by name (index 0 and IFLA_IFNAME).
fn link_request(seq: u32, key: LinkKey<'_>) -> Request {
    let mut request = Request::new(RTM_GETLINK, 0, seq);
    let ifindex = match key {
        LinkKey::Index(ifindex) => ifindex,
        LinkKey::Name(_) => 0,
    };
    let mut ifinfomsg = [0u8; IFINFOMSG_LEN];
    ifinfomsg[0] = AF_UNSPEC;
    ifinfomsg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    request.push(&ifinfomsg);
    if let LinkKey::Name(name) = key {
        let mut ifname = [0u8; IFNAMSIZ];
        let len = name.len().min(IFNAMSIZ - 1);
        ifname[..len].copy_from_slice(&name.as_bytes()[..len]);
        request.push_attribute(IFLA_IFNAME, &ifname[..=len]);
    }
    request
}

// ---------------------------------------------------------------------------------------------
// Netlink: parsing. Nothing here panics, whatever the bytes.
// ---------------------------------------------------------------------------------------------

pub(crate) fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let (field, _) = bytes.get(at..)?.split_first_chunk::<2>()?;
    Some(u16::from_ne_bytes(*field))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let (field, _) = bytes.get(at..)?.split_first_chunk::<4>()?;
    Some(u32::from_ne_bytes(*field))
}

fn read_i32(bytes: &[u8], at: usize) -> Option<i32> {
    read_u32(bytes, at).map(|value| i32::from_ne_bytes(value.to_ne_bytes()))
}

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub(crate) kind: u16,
    flags: u16,
    seq: u32,
    pub(crate) payload: &'a [u8],
}

/// The messages of one datagram. A header that is too short or claims more bytes than remain
/// ends the walk: what follows it cannot be framed.
#[derive(Debug)]
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(datagram: &'a [u8]) -> Messages<'a> {
        Messages { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        let rest = self.rest;
        self.rest = &[];
        let len = usize::try_from(read_u32(rest, 0)?).ok()?;
        if len < NLMSG_HEADER_LEN {
            return None;
        }
        let message = Message {
            kind: read_u16(rest, 4)?,
            flags: read_u16(rest, 6)?,
            seq: read_u32(rest, 8)?,
            payload: rest.get(NLMSG_HEADER_LEN..len)?,
        };
        self.rest = rest.get(align4(len)..).unwrap_or_default();
        Some(message)
    }
}

/// The attributes (`rtattr`) in `bytes`, as (type, payload). Framed like [`Messages`].
#[derive(Debug)]
pub(crate) struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Attributes<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Attributes<'a> {
        Attributes { rest: bytes }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let rest = self.rest;
        self.rest = &[];
        let len = usize::from(read_u16(rest, 0)?);
        if len < NLA_HEADER_LEN {
            return None;
        }
        let kind = read_u16(rest, 2)? & NLA_TYPE_MASK;
        let payload = rest.get(NLA_HEADER_LEN..len)?;
        self.rest = rest.get(align4(len)..).unwrap_or_default();
        Some((kind, payload))
    }
}

/// One IPv4 address as RTM_NEWADDR describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AddressEntry {
    ifindex: u32,
    prefix_len: u8,
    local: Ipv4Addr,
}

/// An RTM_NEWADDR payload, if it is an IPv4 address. The local address is IFA_LOCAL;
/// IFA_ADDRESS (the peer on point-to-point links) stands in only when IFA_LOCAL is absent.
fn parse_address(payload: &[u8]) -> Option<AddressEntry> {
    let (header, attributes) = payload.split_first_chunk::<IFADDRMSG_LEN>()?;
    if header[0] != AF_INET {
        return None;
    }
    let mut local = None;
    let mut address = None;
    for (kind, value) in Attributes::new(attributes) {
        let Ok(octets) = <[u8; 4]>::try_from(value) else {
            continue;
        };
        match kind {
            IFA_LOCAL => local = Some(Ipv4Addr::from(octets)),
            IFA_ADDRESS => address = Some(Ipv4Addr::from(octets)),
            _ => {}
        }
    }
    Some(AddressEntry {
        ifindex: read_u32(header, 4)?,
        prefix_len: header[1],
        local: local.or(address)?,
    })
}

/// What this module reads of an RTM_NEWLINK payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkInfo<'a> {
    ifindex: u32,
    flags: u32,
    name: Option<&'a str>,
    mac: Option<&'a [u8]>,
}

impl LinkInfo<'_> {
    fn has_carrier(&self) -> bool {
        self.flags & IFF_UP != 0 && self.flags & IFF_LOWER_UP != 0
    }
}

/// An RTM_NEWLINK or RTM_DELLINK payload: `ifinfomsg`, then attributes.
fn parse_link(payload: &[u8]) -> Option<LinkInfo<'_>> {
    let (header, attributes) = payload.split_first_chunk::<IFINFOMSG_LEN>()?;
    let mut link = LinkInfo {
        ifindex: read_u32(header, 4)?,
        flags: read_u32(header, 8)?,
        name: None,
        mac: None,
    };
    for (kind, value) in Attributes::new(attributes) {
        match kind {
            IFLA_IFNAME => {
                let name = value.split(|&byte| byte == 0).next().unwrap_or_default();
                link.name = std::str::from_utf8(name).ok();
            }
            IFLA_ADDRESS => link.mac = Some(value),
            _ => {}
        }
    }
    Some(link)
}

// ---------------------------------------------------------------------------------------------
// ARP.
// ---------------------------------------------------------------------------------------------

/// One Ethernet/IPv4 ARP packet (RFC 826), without the Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpPacket {
    /// [`ArpPacket::OP_REQUEST`] or [`ArpPacket::OP_REPLY`].
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl ArpPacket {
    pub const OP_REQUEST: u16 = 1;
    pub const OP_REPLY: u16 = 2;
    /// The length of an Ethernet/IPv4 ARP packet.
    pub const LEN: usize = 28;

    /// An RFC 5227 probe: "is anyone using `target`?", asked without claiming any address
    /// (sender IP 0.0.0.0), so that asking pollutes no neighbour's cache.
    pub fn probe(our_mac: [u8; 6], target: Ipv4Addr) -> ArpPacket {
        ArpPacket::request(our_mac, Ipv4Addr::UNSPECIFIED, target)
    }

    /// An RFC 5227 announcement (gratuitous ARP): sender and target IP are both `ip`, so every
    /// neighbour that caches `ip` moves it to `our_mac`.
    pub fn announcement(our_mac: [u8; 6], ip: Ipv4Addr) -> ArpPacket {
        ArpPacket::request(our_mac, ip, ip)
    }

    /// An ordinary who-has `target`, from `sender_ip`.
    pub fn request(our_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> ArpPacket {
        ArpPacket {
            op: ArpPacket::OP_REQUEST,
            sender_mac: our_mac,
            sender_ip,
            target_mac: [0; 6],
            target_ip: target,
        }
    }

    /// Parses the start of `bytes` (trailing Ethernet padding is ignored). None for anything
    /// that is not an Ethernet/IPv4 ARP request or reply: hardware type 1, protocol 0x0800,
    /// address lengths 6 and 4, operation 1 or 2, at least 28 bytes.
    pub fn parse(bytes: &[u8]) -> Option<ArpPacket> {
        let (fixed, rest) = bytes.split_first_chunk::<8>()?;
        let (sender_mac, rest) = rest.split_first_chunk::<6>()?;
        let (sender_ip, rest) = rest.split_first_chunk::<4>()?;
        let (target_mac, rest) = rest.split_first_chunk::<6>()?;
        let (target_ip, _padding) = rest.split_first_chunk::<4>()?;
        let [0, 1, 0x08, 0x00, 6, 4, op_high, op_low] = *fixed else {
            return None;
        };
        let op = u16::from_be_bytes([op_high, op_low]);
        if op != ArpPacket::OP_REQUEST && op != ArpPacket::OP_REPLY {
            return None;
        }
        Some(ArpPacket {
            op,
            sender_mac: *sender_mac,
            sender_ip: Ipv4Addr::from(*sender_ip),
            target_mac: *target_mac,
            target_ip: Ipv4Addr::from(*target_ip),
        })
    }

    /// The packet's 28 bytes on the wire.
    pub fn encode(&self) -> [u8; ArpPacket::LEN] {
        let [op_high, op_low] = self.op.to_be_bytes();
        let mut bytes = [0u8; ArpPacket::LEN];
        bytes[0..8].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, op_high, op_low]);
        bytes[8..14].copy_from_slice(&self.sender_mac);
        bytes[14..18].copy_from_slice(&self.sender_ip.octets());
        bytes[18..24].copy_from_slice(&self.target_mac);
        bytes[24..28].copy_from_slice(&self.target_ip.octets());
        bytes
    }
}

/// ARP on one interface: an AF_PACKET datagram socket for ETH_P_ARP, so the kernel writes and
/// strips the Ethernet header and we handle the ARP payload only. Non-blocking and
/// close-on-exec, for epoll.
#[derive(Debug)]
pub struct ArpSocket {
    fd: OwnedFd,
    /// The interface, as `sockaddr_ll` wants it.
    sll_ifindex: libc::c_int,
    mac: [u8; 6],
}

impl ArpSocket {
    /// Opens the socket on interface `ifindex`. It is created for protocol 0 (which receives
    /// nothing) and bound to ETH_P_ARP on the interface in one step, so no frame of another
    /// interface is ever queued on it.
    pub fn open(ifindex: u32) -> io::Result<ArpSocket> {
        let sll_ifindex = libc::c_int::try_from(ifindex).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an interface index fits a C int: ifindex={ifindex}"),
            )
        })?;
        let mac = interface_mac(ifindex)?;
        let fd = rustix::net::socket_with(
            AddressFamily::PACKET,
            SocketType::DGRAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )?;
        let address = link_layer_address(sll_ifindex, [0; 6]);
        // SAFETY: `address` is a fully initialised `sockaddr_ll` on this stack frame and the
        // length passed is its size; the descriptor is open for the whole call.
        let result = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                sockaddr_ll_len(),
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ArpSocket {
            fd,
            sll_ifindex,
            mac,
        })
    }

    /// The interface's hardware address, read when the socket was opened.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Broadcasts an RFC 5227 probe for `target` (see [`ArpPacket::probe`]).
    pub fn send_probe(&self, target: Ipv4Addr) -> io::Result<()> {
        self.broadcast(&ArpPacket::probe(self.mac, target))
    }

    /// Broadcasts an RFC 5227 announcement of `ip` (see [`ArpPacket::announcement`]).
    pub fn send_announcement(&self, ip: Ipv4Addr) -> io::Result<()> {
        self.broadcast(&ArpPacket::announcement(self.mac, ip))
    }

    /// Broadcasts a who-has `target` from `sender_ip`. Used on the gateway: its reply proves
    /// that this interface receives, not only sends.
    pub fn send_request(&self, sender_ip: Ipv4Addr, target: Ipv4Addr) -> io::Result<()> {
        self.broadcast(&ArpPacket::request(self.mac, sender_ip, target))
    }

    /// The next ARP packet another host sent, or None when none is pending. Frames that are not
    /// Ethernet/IPv4 ARP, and our own, are skipped; after
    /// `ARP_SKIPPED_PER_RECV_MAX` of them this returns None even if more are queued, so
    /// the descriptor must be polled level-triggered.
    pub fn recv(&mut self) -> io::Result<Option<ArpPacket>> {
        let mut frame = [0u8; ARP_FRAME_SIZE_MAX];
        for _ in 0..ARP_SKIPPED_PER_RECV_MAX {
            let Some((len, from)) = self.recv_frame(&mut frame)? else {
                return Ok(None);
            };
            if from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            match ArpPacket::parse(frame.get(..len).unwrap_or_default()) {
                Some(packet) if packet.sender_mac != self.mac => return Ok(Some(packet)),
                _ => {}
            }
        }
        Ok(None)
    }

    fn broadcast(&self, packet: &ArpPacket) -> io::Result<()> {
        let bytes = packet.encode();
        let destination = link_layer_address(self.sll_ifindex, BROADCAST_MAC);
        // SAFETY: `bytes` and `destination` live on this stack frame for the whole call and
        // the lengths passed are theirs; the descriptor is open while `self` is borrowed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&destination as *const libc::sockaddr_ll).cast(),
                sockaddr_ll_len(),
            )
        };
        match usize::try_from(sent) {
            Err(_) => Err(io::Error::last_os_error()),
            Ok(len) if len == bytes.len() => Ok(()),
            Ok(len) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("an ARP packet went out short: sent={len}"),
            )),
        }
    }

    /// One frame into `frame` with the address it came from; None when none is pending.
    fn recv_frame(&self, frame: &mut [u8]) -> io::Result<Option<(usize, libc::sockaddr_ll)>> {
        // SAFETY: `sockaddr_ll` is plain data for which all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = sockaddr_ll_len();
        // SAFETY: `frame`, `from` and `from_len` are live, exclusively borrowed for the call,
        // and the lengths passed are theirs; the kernel writes at most those lengths.
        let received = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        match usize::try_from(received) {
            Ok(len) => Ok(Some((len.min(frame.len()), from))),
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
        }
    }
}

impl AsFd for ArpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A `sockaddr_ll` for ARP on `sll_ifindex`, to `destination` when sending.
fn link_layer_address(sll_ifindex: libc::c_int, destination: [u8; 6]) -> libc::sockaddr_ll {
    let mut sll_addr = [0u8; 8];
    sll_addr[..6].copy_from_slice(&destination);
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: ETH_P_ARP.to_be(),
        sll_ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr,
    }
}

fn sockaddr_ll_len() -> libc::socklen_t {
    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0a];
    const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0b];

    /// Deterministic bytes for the garbage tests (xorshift32).
    fn garbage(seed: u32, len: usize) -> Vec<u8> {
        let mut state = seed.max(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn uapi_constants_match_libc() {
        assert_eq!(i32::from(NLMSG_ERROR), libc::NLMSG_ERROR);
        assert_eq!(i32::from(NLMSG_DONE), libc::NLMSG_DONE);
        assert_eq!(i32::from(NLM_F_ACK), libc::NLM_F_ACK);
        assert_eq!(i32::from(NLM_F_DUMP), libc::NLM_F_DUMP);
        assert_eq!(i32::from(NLM_F_CREATE), libc::NLM_F_CREATE);
        assert_eq!(RTM_NEWADDR, libc::RTM_NEWADDR);
        assert_eq!(RTM_DELADDR, libc::RTM_DELADDR);
        assert_eq!(RTM_GETADDR, libc::RTM_GETADDR);
        assert_eq!(RTM_NEWLINK, libc::RTM_NEWLINK);
        assert_eq!(RTM_DELLINK, libc::RTM_DELLINK);
        assert_eq!(RTM_GETLINK, libc::RTM_GETLINK);
        assert_eq!(IFA_LOCAL, libc::IFA_LOCAL);
        assert_eq!(IFA_ADDRESS, libc::IFA_ADDRESS);
        assert_eq!(IFLA_IFNAME, libc::IFLA_IFNAME);
        assert_eq!(IFLA_ADDRESS, libc::IFLA_ADDRESS);
        assert_eq!(IFF_UP as i32, libc::IFF_UP);
        assert_eq!(IFF_LOWER_UP as i32, libc::IFF_LOWER_UP);
        assert_eq!(RTMGRP_LINK as i32, libc::RTMGRP_LINK);
        assert_eq!(i32::from(ETH_P_ARP), libc::ETH_P_ARP);
        assert_eq!(PACKET_OUTGOING, libc::PACKET_OUTGOING);
        assert_eq!(usize::from(AF_INET), libc::AF_INET as usize);
    }

    #[test]
    fn a_probe_is_laid_out_as_rfc_5227_says() {
        let probe = ArpPacket::probe(MAC_A, Ipv4Addr::new(10, 0, 0, 7));
        let expected: [u8; 28] = [
            0, 1, 0x08, 0x00, 6, 4, 0, 1, // Ethernet, IPv4, request
            2, 0, 0, 0, 0, 0x0a, // sender MAC: ours
            0, 0, 0, 0, // sender IP: unspecified
            0, 0, 0, 0, 0, 0, // target MAC: zeroes
            10, 0, 0, 7, // target IP
        ];
        assert_eq!(probe.encode(), expected);
    }

    #[test]
    fn an_announcement_claims_its_address_as_sender_and_target() {
        let ip = Ipv4Addr::new(192, 168, 1, 100);
        let announcement = ArpPacket::announcement(MAC_A, ip);
        assert_eq!(announcement.op, ArpPacket::OP_REQUEST);
        assert_eq!(announcement.sender_ip, ip);
        assert_eq!(announcement.target_ip, ip);
        assert_eq!(announcement.sender_mac, MAC_A);
        assert_eq!(announcement.target_mac, [0; 6]);
    }

    #[test]
    fn encoded_packets_parse_back_to_themselves() {
        let reply = ArpPacket {
            op: ArpPacket::OP_REPLY,
            sender_mac: MAC_B,
            sender_ip: Ipv4Addr::new(10, 0, 0, 2),
            target_mac: MAC_A,
            target_ip: Ipv4Addr::new(10, 0, 0, 1),
        };
        for packet in [
            reply,
            ArpPacket::probe(MAC_A, Ipv4Addr::new(10, 0, 0, 9)),
            ArpPacket::announcement(MAC_A, Ipv4Addr::new(10, 0, 0, 9)),
            ArpPacket::request(
                MAC_A,
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 0, 254),
            ),
        ] {
            assert_eq!(ArpPacket::parse(&packet.encode()), Some(packet));
        }
    }

    #[test]
    fn ethernet_padding_after_the_packet_is_ignored() {
        let packet = ArpPacket::probe(MAC_A, Ipv4Addr::new(10, 0, 0, 9));
        let mut frame = [0u8; 46];
        frame[..28].copy_from_slice(&packet.encode());
        assert_eq!(ArpPacket::parse(&frame), Some(packet));
    }

    #[test]
    fn truncated_packets_are_refused() {
        let bytes = ArpPacket::probe(MAC_A, Ipv4Addr::new(10, 0, 0, 9)).encode();
        for len in 0..ArpPacket::LEN {
            assert_eq!(ArpPacket::parse(&bytes[..len]), None, "len={len}");
        }
    }

    #[test]
    fn packets_of_other_hardware_protocols_sizes_or_operations_are_refused() {
        let good = ArpPacket::probe(MAC_A, Ipv4Addr::new(10, 0, 0, 9)).encode();
        // (byte index, wrong value): htype, ptype, hlen, plen, op.
        for (at, value) in [
            (1, 6),
            (2, 0x86),
            (3, 0xdd),
            (4, 8),
            (5, 16),
            (7, 0),
            (7, 3),
        ] {
            let mut bytes = good;
            bytes[at] = value;
            assert_eq!(ArpPacket::parse(&bytes), None, "at={at} value={value}");
        }
    }

    #[test]
    fn garbage_never_panics_the_parsers() {
        for seed in 1..2000u32 {
            let bytes = garbage(seed, usize::try_from(seed % 97).unwrap_or(0));
            let _ = ArpPacket::parse(&bytes);
            for message in Messages::new(&bytes) {
                let _ = parse_link(message.payload);
                let _ = parse_address(message.payload);
                let _ = check_status(&message);
            }
            let _ = Attributes::new(&bytes).count();
            let _ = parse_link(&bytes);
            let _ = parse_address(&bytes);
        }
    }

    #[test]
    fn an_add_address_request_carries_local_and_address() {
        let request = address_request(
            RTM_NEWADDR,
            NLM_F_CREATE | NLM_F_EXCL,
            7,
            3,
            Ipv4Addr::new(10, 1, 2, 3),
            24,
        );
        let mut expected = Vec::new();
        expected.extend_from_slice(&40u32.to_ne_bytes());
        expected.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
        expected.extend_from_slice(&0x0605u16.to_ne_bytes()); // REQUEST|ACK|EXCL|CREATE
        expected.extend_from_slice(&7u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[2, 24, 0, 0]); // AF_INET, /24, flags, scope
        expected.extend_from_slice(&3u32.to_ne_bytes());
        expected.extend_from_slice(&8u16.to_ne_bytes());
        expected.extend_from_slice(&IFA_LOCAL.to_ne_bytes());
        expected.extend_from_slice(&[10, 1, 2, 3]);
        expected.extend_from_slice(&8u16.to_ne_bytes());
        expected.extend_from_slice(&IFA_ADDRESS.to_ne_bytes());
        expected.extend_from_slice(&[10, 1, 2, 3]);
        assert_eq!(request.as_bytes(), expected.as_slice());
        assert_eq!(request.seq(), 7);
        assert_ne!(request.flags() & NLM_F_ACK, 0);
    }

    #[test]
    fn an_address_dump_asks_for_ipv4_only() {
        let request = address_dump_request(9);
        let bytes = request.as_bytes();
        assert_eq!(bytes.len(), NLMSG_HEADER_LEN + IFADDRMSG_LEN);
        assert_eq!(read_u32(bytes, 0), Some(24));
        assert_eq!(read_u16(bytes, 4), Some(RTM_GETADDR));
        assert_eq!(read_u16(bytes, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(bytes[16], AF_INET);
    }

    #[test]
    fn a_link_query_by_name_sends_a_terminated_padded_name() {
        let request = link_request(5, LinkKey::Name("eth0"));
        let bytes = request.as_bytes();
        // header, ifinfomsg, then IFLA_IFNAME "eth0\0" (length 9) padded to 12.
        assert_eq!(bytes.len(), 16 + 16 + 12);
        assert_eq!(read_u32(bytes, 0), Some(44));
        assert_eq!(read_u16(bytes, 4), Some(RTM_GETLINK));
        assert_eq!(read_u16(bytes, 6), Some(NLM_F_REQUEST));
        assert_eq!(read_u32(bytes, 20), Some(0), "no index when asking by name");
        assert_eq!(read_u16(bytes, 32), Some(9));
        assert_eq!(read_u16(bytes, 34), Some(IFLA_IFNAME));
        assert_eq!(&bytes[36..44], b"eth0\0\0\0\0");

        let by_index = link_request(6, LinkKey::Index(42));
        assert_eq!(by_index.as_bytes().len(), 32);
        assert_eq!(read_u32(by_index.as_bytes(), 20), Some(42));
    }

    #[test]
    fn the_longest_interface_name_fits_a_request() {
        let request = link_request(1, LinkKey::Name("abcdefghijklmno"));
        assert_eq!(request.as_bytes().len(), 16 + 16 + 20);
        assert!(check_interface_name("abcdefghijklmno").is_ok());
        assert!(check_interface_name("abcdefghijklmnop").is_err());
        assert!(check_interface_name("").is_err());
        assert!(check_interface_name("a\0b").is_err());
    }

    /// A kernel-style RTM_NEWLINK for the parsing tests, built with the request encoder.
    fn link_message(kind: u16, ifindex: u32, flags: u32, name: &str, mac: &[u8]) -> Vec<u8> {
        let mut message = Request::new(kind, 0, 0);
        let mut ifinfomsg = [0u8; IFINFOMSG_LEN];
        ifinfomsg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        ifinfomsg[8..12].copy_from_slice(&flags.to_ne_bytes());
        message.push(&ifinfomsg);
        message.push_attribute(IFLA_ADDRESS, mac);
        let mut ifname = name.as_bytes().to_vec();
        ifname.push(0);
        message.push_attribute(IFLA_IFNAME, &ifname);
        message.as_bytes().to_vec()
    }

    #[test]
    fn a_link_message_gives_name_mac_and_carrier() {
        let bytes = link_message(RTM_NEWLINK, 4, IFF_UP | IFF_LOWER_UP, "lan0", &MAC_B);
        let message = Messages::new(&bytes).next().expect("one message");
        let link = parse_link(message.payload).expect("a link");
        assert_eq!(link.ifindex, 4);
        assert_eq!(link.name, Some("lan0"));
        assert_eq!(link.mac, Some(&MAC_B[..]));
        assert!(link.has_carrier());
    }

    #[test]
    fn carrier_needs_both_up_and_lower_up() {
        // (flags, carrier) for every combination of the two flags.
        let table = [
            (0, false),
            (IFF_UP, false),
            (IFF_LOWER_UP, false),
            (IFF_UP | IFF_LOWER_UP, true),
        ];
        for (flags, carrier) in table {
            let bytes = link_message(RTM_NEWLINK, 4, flags, "lan0", &MAC_B);
            let message = Messages::new(&bytes).next().expect("one message");
            assert_eq!(
                carrier_in_notification(&message, 4),
                Some(carrier),
                "flags={flags:#x}"
            );
        }
    }

    #[test]
    fn notifications_about_other_links_are_ignored_and_a_removed_link_has_no_carrier() {
        let up = IFF_UP | IFF_LOWER_UP;
        let mut datagram = link_message(RTM_NEWLINK, 5, up, "other", &MAC_A);
        datagram.extend(link_message(RTM_DELLINK, 4, up, "lan0", &MAC_B));
        let carriers: Vec<_> = Messages::new(&datagram)
            .map(|message| carrier_in_notification(&message, 4))
            .collect();
        assert_eq!(carriers, vec![None, Some(false)]);
    }

    #[test]
    fn a_truncated_datagram_yields_the_messages_before_the_cut() {
        let mut datagram = link_message(RTM_NEWLINK, 4, IFF_UP, "lan0", &MAC_B);
        let first_len = datagram.len();
        datagram.extend(link_message(RTM_NEWLINK, 5, IFF_UP, "lan1", &MAC_A));
        for cut in 0..datagram.len() {
            let count = Messages::new(&datagram[..cut]).count();
            assert_eq!(count, usize::from(cut >= first_len), "cut={cut}");
        }
        // A header claiming less than itself ends the walk instead of looping.
        let mut bogus = datagram.clone();
        bogus[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(Messages::new(&bogus).count(), 0);
    }

    #[test]
    fn an_address_message_gives_index_prefix_and_local_address() {
        let mut message = Request::new(RTM_NEWADDR, NLM_F_MULTI, 0);
        message.push(&ifaddrmsg(24, 3));
        message.push_attribute(IFA_ADDRESS, &[10, 9, 9, 1]);
        message.push_attribute(IFA_LOCAL, &[10, 9, 9, 2]);
        let bytes = message.as_bytes().to_vec();
        let parsed = Messages::new(&bytes).next().expect("one message");
        let entry = parse_address(parsed.payload);
        assert_eq!(
            entry,
            Some(AddressEntry {
                ifindex: 3,
                prefix_len: 24,
                local: Ipv4Addr::new(10, 9, 9, 2),
            })
        );

        let mut ipv6 = ifaddrmsg(64, 3);
        ipv6[0] = 10; // AF_INET6
        assert_eq!(parse_address(&ipv6), None);
    }

    #[test]
    fn an_acknowledgement_is_success_and_a_negative_code_is_that_errno() {
        let status = |code: i32| {
            let mut bytes = code.to_ne_bytes().to_vec();
            bytes.extend_from_slice(&[0; NLMSG_HEADER_LEN]);
            bytes
        };
        let ack = status(0);
        let message = |payload| Message {
            kind: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            payload,
        };
        assert!(check_status(&message(&ack)).is_ok());
        let eexist = status(-libc::EEXIST);
        let error = check_status(&message(&eexist)).expect_err("an error");
        assert_eq!(error.raw_os_error(), Some(libc::EEXIST));
        assert!(check_status(&message(&[1, 2])).is_err());
        let done = Message {
            kind: NLMSG_DONE,
            flags: 0,
            seq: 1,
            payload: &[],
        };
        assert!(check_status(&done).is_ok());
    }

    #[test]
    fn out_of_range_inputs_are_refused_before_the_kernel_sees_them() {
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        for result in [
            add_address(1, ip, 33),
            remove_address(1, ip, 33).map(|_| ()),
        ] {
            let error = result.expect_err("prefix length 33");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
        let error = interface_index("this-name-is-too-long").expect_err("too long");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}

/// The primitives against the real kernel. Each test runs in a thread of its own, moved into a
/// fresh network namespace (`unshare(CLONE_NEWNET)` moves only the calling thread), with a veth
/// pair whose far end lives in the namespace of a second thread, the peer. The peer is a real
/// other host: its kernel answers ARP as a neighbour would (within one namespace, the kernel
/// would take a request from one of its own addresses as a martian and not answer). Nothing
/// touches the machine's own network, and the tests run in parallel.
#[cfg(test)]
mod netns_tests {
    use super::*;
    use std::process::Command;
    use std::sync::mpsc;
    use std::thread::JoinHandle;
    use std::time::Instant;

    const VA_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const VB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const NOBODY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
    /// How long a test waits for a freshly wired link to carry traffic.
    const LINK_READY_TIMEOUT: Duration = Duration::from_secs(3);

    fn is_root() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root");
        }
        root
    }

    fn enter_fresh_namespace() {
        // SAFETY: unshare takes flags only; CLONE_NEWNET moves the calling thread alone into a
        // new network namespace, which nothing else in the process relies on.
        let result = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(result, 0, "unshare: {}", io::Error::last_os_error());
    }

    /// Runs `body` in a new thread inside a fresh network namespace.
    fn in_fresh_namespace(body: impl FnOnce() + Send + 'static) {
        let thread = std::thread::spawn(move || {
            enter_fresh_namespace();
            body();
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Runs `ip` from the calling thread (so in its namespace), asserting success.
    fn ip(args: &[&str]) {
        let output = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            output.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    type Job = Box<dyn FnOnce() + Send>;

    /// A thread parked in a namespace of its own, running closures there on request.
    struct Peer {
        jobs: Option<mpsc::Sender<Job>>,
        thread: Option<JoinHandle<()>>,
        tid: i32,
    }

    impl Peer {
        fn start() -> Peer {
            let (jobs, incoming) = mpsc::channel::<Job>();
            let (tid_sender, tid_receiver) = mpsc::channel();
            let thread = std::thread::spawn(move || {
                enter_fresh_namespace();
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                tid_sender.send(tid).expect("send tid");
                for job in incoming {
                    job();
                }
            });
            let tid = tid_receiver.recv().expect("the peer thread started");
            Peer {
                jobs: Some(jobs),
                thread: Some(thread),
                tid,
            }
        }

        fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> T {
            let (sender, receiver) = mpsc::channel();
            let job: Job = Box::new(move || {
                let _ = sender.send(job());
            });
            self.jobs
                .as_ref()
                .expect("jobs")
                .send(job)
                .expect("the peer runs");
            receiver.recv().expect("the peer's job panicked")
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            self.jobs = None;
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// A veth cable: `va` here (10.77.0.1/24), `vb` in the peer's namespace (10.77.0.2/24), both
    /// up. `vb` is created here and then moved, so the two ends have different indexes (veth
    /// events count as urgent for the kernel's linkwatch only when they differ).
    struct Cable {
        peer: Peer,
        va: u32,
        vb_mac: [u8; 6],
    }

    fn cable() -> Cable {
        let peer = Peer::start();
        ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
        ip(&["link", "set", "vb", "netns", &peer.tid.to_string()]);
        ip(&["addr", "add", "10.77.0.1/24", "dev", "va"]);
        ip(&["link", "set", "va", "up"]);
        let vb_mac = peer.run(|| {
            ip(&["addr", "add", "10.77.0.2/24", "dev", "vb"]);
            ip(&["link", "set", "vb", "up"]);
            interface_mac(interface_index("vb").expect("vb")).expect("vb's mac")
        });
        let va = interface_index("va").expect("va");
        Cable { peer, va, vb_mac }
    }

    fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) {
        let mut fds = [rustix::event::PollFd::from_borrowed_fd(
            fd,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec::try_from(timeout).expect("timespec");
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(error) => panic!("poll: {error}"),
        }
    }

    /// Sends with `send` every 50 ms until a packet that `wanted` arrives or `timeout` passes.
    fn exchange(
        arp: &mut ArpSocket,
        send: impl Fn(&ArpSocket) -> io::Result<()>,
        wanted: impl Fn(&ArpPacket) -> bool,
        timeout: Duration,
    ) -> Option<ArpPacket> {
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            if now >= next_send {
                send(arp).expect("send");
                next_send = now + Duration::from_millis(50);
            }
            wait_readable(arp.as_fd(), next_send.min(deadline) - now);
            while let Some(packet) = arp.recv().expect("recv") {
                if wanted(&packet) {
                    return Some(packet);
                }
            }
        }
    }

    /// Waits until the watch reports `carrier`; how long it took, or None after `timeout`.
    fn wait_for_carrier(
        watch: &mut LinkWatch,
        carrier: bool,
        timeout: Duration,
    ) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if watch.drain() == Some(carrier) {
                return Some(start.elapsed());
            }
            let left = timeout.checked_sub(start.elapsed())?;
            wait_readable(watch.as_fd(), left);
        }
    }

    #[test]
    fn an_added_address_is_held_until_removed() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let cable = cable();
            let floating = Ipv4Addr::new(10, 77, 0, 100);
            assert!(!has_address(cable.va, floating).expect("has"));
            add_address(cable.va, floating, 24).expect("add");
            assert!(has_address(cable.va, floating).expect("has"));
            add_address(cable.va, floating, 24).expect("adding it again is success");
            assert_eq!(
                interface_for_address(floating).expect("lookup"),
                Some(("va".to_owned(), cable.va))
            );
            assert!(!remove_address(cable.va, floating, 16).expect("wrong prefix"));
            assert!(remove_address(cable.va, floating, 24).expect("remove"));
            assert!(!has_address(cable.va, floating).expect("has"));
            assert!(!remove_address(cable.va, floating, 24).expect("already gone"));
            assert!(has_address(cable.va, VA_IP).expect("the fixed address stays"));
        });
    }

    #[test]
    fn interfaces_are_found_by_name_address_and_index() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let cable = cable();
            assert_eq!(
                interface_for_address(VA_IP).expect("lookup"),
                Some(("va".to_owned(), cable.va))
            );
            assert_eq!(interface_for_address(VB_IP).expect("lookup"), None);
            assert_eq!(interface_for_address(NOBODY_IP).expect("lookup"), None);
            assert_eq!(interface_index("lo").expect("lo"), 1);
            assert_eq!(
                interface_index("nonexistent")
                    .expect_err("no such")
                    .raw_os_error(),
                Some(libc::ENODEV)
            );
            let mac = interface_mac(cable.va).expect("mac");
            assert_ne!(mac, [0; 6]);
            assert_ne!(mac, cable.vb_mac);
            assert!(interface_mac(9999).is_err());
            assert!(LinkWatch::open(9999).is_err());
            assert!(ArpSocket::open(9999).is_err());
            assert!(add_address(9999, NOBODY_IP, 24).is_err());
        });
    }

    #[test]
    fn a_probe_for_the_peers_address_gets_the_peers_reply() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let cable = cable();
            let mut arp = ArpSocket::open(cable.va).expect("open");
            assert_eq!(arp.mac(), interface_mac(cable.va).expect("mac"));
            let reply = exchange(
                &mut arp,
                |arp| arp.send_probe(VB_IP),
                |packet| packet.op == ArpPacket::OP_REPLY,
                LINK_READY_TIMEOUT,
            )
            .expect("the peer answers a probe for its address");
            assert_eq!(reply.sender_ip, VB_IP);
            assert_eq!(reply.sender_mac, cable.vb_mac);
            assert_eq!(reply.target_mac, arp.mac());
        });
    }

    #[test]
    fn a_probe_for_an_unheld_address_gets_no_reply() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let cable = cable();
            let mut arp = ArpSocket::open(cable.va).expect("open");
            // First prove the cable carries probes and their replies.
            exchange(
                &mut arp,
                |arp| arp.send_probe(VB_IP),
                |packet| packet.op == ArpPacket::OP_REPLY && packet.sender_ip == VB_IP,
                LINK_READY_TIMEOUT,
            )
            .expect("the cable works");
            arp.send_probe(NOBODY_IP).expect("probe");
            let reply = exchange(
                &mut arp,
                |_| Ok(()),
                |packet| packet.sender_ip == NOBODY_IP,
                Duration::from_millis(300),
            );
            assert_eq!(reply, None);
        });
    }

    #[test]
    fn a_request_to_the_peer_gets_a_reply_and_an_announcement_goes_out() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let cable = cable();
            let mut arp = ArpSocket::open(cable.va).expect("open");
            let reply = exchange(
                &mut arp,
                |arp| arp.send_request(VA_IP, VB_IP),
                |packet| packet.op == ArpPacket::OP_REPLY,
                LINK_READY_TIMEOUT,
            )
            .expect("the peer answers a who-has");
            assert_eq!(reply.sender_ip, VB_IP);
            assert_eq!(reply.sender_mac, cable.vb_mac);
            assert_eq!(reply.target_ip, VA_IP);
            assert_eq!(reply.target_mac, arp.mac());

            // The peer sees our announcement: a packet socket on vb receives it.
            let mut seen_by_peer = cable
                .peer
                .run(|| ArpSocket::open(interface_index("vb").expect("vb")).expect("open on vb"));
            arp.send_announcement(VA_IP).expect("announce");
            let va_mac = arp.mac();
            let announcement = cable.peer.run(move || {
                exchange(
                    &mut seen_by_peer,
                    |_| Ok(()),
                    |packet| packet.sender_ip == VA_IP && packet.target_ip == VA_IP,
                    Duration::from_secs(1),
                )
            });
            let announcement = announcement.expect("the peer sees the announcement");
            assert_eq!(announcement.sender_mac, va_mac);
            assert_eq!(announcement.op, ArpPacket::OP_REQUEST);
        });
    }

    #[test]
    fn link_watch_sees_a_pulled_cable_at_once_and_its_return() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let cable = cable();
            let mut watch = LinkWatch::open(cable.va).expect("open");
            if !watch.carrier_now().expect("carrier") {
                wait_for_carrier(&mut watch, true, LINK_READY_TIMEOUT).expect("carrier at start");
            }
            watch.drain();

            cable.peer.run(|| ip(&["link", "set", "vb", "down"]));
            let took = wait_for_carrier(&mut watch, false, Duration::from_millis(100));
            assert!(took.is_some(), "no carrier loss within 100 ms");
            assert!(!watch.carrier_now().expect("carrier"));

            cable.peer.run(|| ip(&["link", "set", "vb", "up"]));
            let took = wait_for_carrier(&mut watch, true, Duration::from_secs(1));
            assert!(
                took.is_some(),
                "no carrier within 1 s of the cable's return"
            );
            assert!(watch.carrier_now().expect("carrier"));
        });
    }
}
