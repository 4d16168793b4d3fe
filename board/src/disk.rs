//! The backing device on Linux: a regular file or a block device, driven through io_uring.
//!
//! Every request the core issues is submitted to the kernel without blocking the caller; the
//! ring's file descriptor becomes readable when completions wait, so the runtime polls it with
//! its sockets. Aligned requests use an O_DIRECT descriptor when direct I/O is on; unaligned
//! ones (rare: odd clients) go through a buffered descriptor of the same file, which the kernel
//! keeps coherent with direct I/O, and a flush covers both because both name one inode.
//!
//! What each request means for durability:
//! - `Write { fua: true }` is written with RWF_DSYNC: durable when it completes.
//! - `Flush` is fdatasync: every write completed before it was submitted is durable.
//! - `Discard` and `WriteZeroes` are fallocate; with `fua` an fdatasync follows before the
//!   completion is reported.
//!
//! Short reads and writes are resubmitted for the remainder; a filesystem without
//! FALLOC_FL_ZERO_RANGE gets zeroes written instead, and one without hole punching treats a
//! discard as the hint it is.

// io_uring takes raw pointers into our buffers; this module is where that contract is kept.
#![allow(unsafe_code)]

use crate::buf::{IoBuf, IO_ALIGN};
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Submission queue entries of the ring; the core never has more requests in flight.
pub const RING_ENTRIES: u32 = 1024;

/// The most extents one `MapExtents` request reports.
pub const EXTENT_COUNT_MAX: usize = 64;

/// Transfers of at least this many bytes are handed to io_uring's worker threads instead of being
/// copied on the event loop's thread: the page-cache copy then runs on another core while the
/// loop moves bytes to and from sockets.
const ASYNC_TRANSFER_BYTES_MIN: usize = 128 << 10;

/// Zero bytes written per step when a filesystem cannot zero a range with fallocate.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Work for the backing device. Offsets are bytes from the start of the device.
#[derive(Debug)]
pub enum DiskRequest {
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    Read { offset: u64, buf: IoBuf },
    /// Writes `buf` at `offset`; with `fua` it is durable when it completes.
    Write { offset: u64, buf: IoBuf, fua: bool },
    /// Makes every write completed so far durable.
    Flush,
    /// Tells the device a range is no longer needed; reading it later returns zeroes on files.
    Discard { offset: u64, len: u64, fua: bool },
    /// Makes a range read as zeroes; `may_deallocate` allows punching a hole.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_deallocate: bool,
        fua: bool,
    },
    /// Reports which parts of a range hold data and which are holes (regular files only; a
    /// block device reports one data extent).
    MapExtents { offset: u64, len: u64 },
}

/// One run of a [`DiskRequest::MapExtents`] answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// True for a hole (reads as zeroes, no space allocated).
    pub is_hole: bool,
}

/// What a successful request gives back.
#[derive(Debug)]
pub enum DiskDone {
    /// A read or write: the buffer, returned for reuse (filled, for a read).
    Buf(IoBuf),
    /// A flush, discard or zeroing.
    Done,
    /// The extents of a `MapExtents` request, in order from its offset. Boxed: completions
    /// move through queues on the hot path and most of them are reads and writes.
    Extents(Box<heapless::Vec<Extent, EXTENT_COUNT_MAX>>),
}

/// A request that failed, with the errno the kernel gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskError {
    /// The positive errno value.
    pub errno: i32,
}

impl DiskError {
    /// True when the device ran out of space.
    pub fn is_no_space(&self) -> bool {
        self.errno == libc::ENOSPC
    }
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.errno))
    }
}

/// A finished request.
#[derive(Debug)]
pub struct DiskCompletion {
    /// The tag the request was submitted with.
    pub tag: u64,
    /// The outcome. A failed read or write still returns its buffer in `buf`.
    pub result: Result<DiskDone, DiskError>,
    /// The buffer of a failed read or write, for reuse.
    pub buf: Option<IoBuf>,
}

/// Why the backing device could not be opened.
#[derive(Debug)]
pub enum DiskOpenError {
    /// The path does not exist.
    Missing,
    /// It exists but is neither a regular file nor a block device.
    NotADisk,
    /// Opening or sizing it failed.
    Io(std::io::Error),
    /// io_uring could not be set up.
    Ring(std::io::Error),
}

impl std::fmt::Display for DiskOpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskOpenError::Missing => write!(f, "it does not exist"),
            DiskOpenError::NotADisk => write!(f, "it is neither a regular file nor a block device"),
            DiskOpenError::Io(e) => write!(f, "{e}"),
            DiskOpenError::Ring(e) => write!(f, "io_uring setup failed: {e}"),
        }
    }
}

/// What a slot is doing now; a request may take several kernel operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The request's main operation (read, write, fallocate, fsync).
    Main,
    /// Writing zeroes by hand, at `next` bytes into the range.
    ZeroFill { next: u64 },
    /// The fdatasync that makes a discard or zeroing durable.
    Sync,
}

#[derive(Debug)]
struct Slot {
    tag: u64,
    request: DiskRequest,
    stage: Stage,
    /// Bytes of a read or write already transferred (short transfers resume here).
    done_bytes: usize,
}

/// The backing device, open, with its ring.
pub struct LinuxDisk {
    buffered: File,
    direct: Option<File>,
    is_block_device: bool,
    size_bytes: u64,
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    ready: VecDeque<DiskCompletion>,
    zeroes: IoBuf,
    unsubmitted: u32,
    /// Buffered writes are done synchronously (the filesystem refused RWF_NOWAIT).
    buffered_write_blocks: bool,
}

impl std::fmt::Debug for LinuxDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxDisk")
            .field("size_bytes", &self.size_bytes)
            .field("is_block_device", &self.is_block_device)
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl LinuxDisk {
    /// Opens `path` for reading and writing; with `direct_io` aligned requests bypass the page
    /// cache.
    pub fn open(path: &Path, direct_io: bool) -> Result<LinuxDisk, DiskOpenError> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DiskOpenError::Missing)
            }
            Err(e) => return Err(DiskOpenError::Io(e)),
        };
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(DiskOpenError::NotADisk);
        }
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(DiskOpenError::Io)?;
        let direct = if direct_io {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(DiskOpenError::Io)?;
            Some(file)
        } else {
            None
        };
        let size_bytes = if is_block_device {
            rustix::fs::seek(&buffered, rustix::fs::SeekFrom::End(0))
                .map_err(|e| DiskOpenError::Io(e.into()))?
        } else {
            meta.len()
        };
        let ring = IoUring::new(RING_ENTRIES).map_err(DiskOpenError::Ring)?;
        Ok(LinuxDisk {
            buffered,
            direct,
            is_block_device,
            size_bytes,
            ring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            ready: VecDeque::new(),
            zeroes: IoBuf::new(ZERO_CHUNK_BYTES),
            unsubmitted: 0,
            buffered_write_blocks: false,
        })
    }

    /// The size of the device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The descriptor to poll for readability: it is readable while completions wait.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring's descriptor lives as long as `self.ring`, which the borrow ties to.
        unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }

    /// Reads synchronously (start-up and metadata only; never on the data path).
    pub fn read_at_sync(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.buffered, buf, offset)
    }

    /// Makes every completed write durable, synchronously (shutdown only).
    pub fn flush_sync(&self) -> std::io::Result<()> {
        self.buffered.sync_data()
    }

    /// Writes synchronously and makes the write durable (start-up and metadata only).
    pub fn write_at_sync(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.buffered, buf, offset)?;
        self.buffered.sync_data()
    }

    /// Queues a request; its completion carries `tag`. Nothing reaches the kernel until
    /// [`LinuxDisk::submit`].
    pub fn push(&mut self, tag: u64, mut request: DiskRequest) {
        if let DiskRequest::Discard { offset, len, .. } = &mut request {
            if self.is_block_device {
                // A block device discards whole logical blocks only (EINVAL otherwise); the
                // parts of blocks at either end are kept, which a hint allows.
                let align = IO_ALIGN as u64;
                let start = offset.div_ceil(align) * align;
                let end = (*offset + *len) / align * align;
                if end <= start {
                    let done = DiskCompletion {
                        tag,
                        result: Ok(DiskDone::Done),
                        buf: None,
                    };
                    self.ready.push_back(done);
                    return;
                }
                (*offset, *len) = (start, end - start);
            }
        }
        if let DiskRequest::MapExtents { offset, len } = request {
            let result = self.map_extents(offset, len);
            self.ready.push_back(DiskCompletion {
                tag,
                result,
                buf: None,
            });
            return;
        }
        let mut slot = Slot {
            tag,
            request,
            stage: Stage::Main,
            done_bytes: 0,
        };
        if self.try_inline(&mut slot) {
            let (tag, buf) = match slot.request {
                DiskRequest::Read { buf, .. } | DiskRequest::Write { buf, .. } => (slot.tag, buf),
                _ => unreachable!("only reads and writes complete inline"),
            };
            self.ready.push_back(DiskCompletion {
                tag,
                result: Ok(DiskDone::Buf(buf)),
                buf: None,
            });
            return;
        }
        let index = match self.free_slots.pop() {
            Some(index) => {
                self.slots[index] = Some(slot);
                index
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.issue(index);
    }

    /// Tries a page-cache transfer right away with RWF_NOWAIT, which the kernel refuses (EAGAIN)
    /// instead of blocking. Most buffered reads and writes complete this way, without a trip
    /// through io_uring's worker threads; the rest go to the ring as usual. Returns true when
    /// the whole transfer is done.
    ///
    /// Filesystems that refuse RWF_NOWAIT for buffered writes (ext4 answers EOPNOTSUPP) get
    /// plain synchronous writes into the page cache: far cheaper than a hand-off to a kernel
    /// worker per write, at the price of blocking the loop while the kernel throttles dirty
    /// pages. Direct I/O (the default for block devices) never takes this path.
    fn try_inline(&mut self, slot: &mut Slot) -> bool {
        if let DiskRequest::Read { buf, .. } | DiskRequest::Write { buf, .. } = &slot.request {
            if buf.len() >= ASYNC_TRANSFER_BYTES_MIN {
                return false;
            }
        }
        let nowait = rustix::io::ReadWriteFlags::NOWAIT;
        let write_flags = if self.buffered_write_blocks {
            rustix::io::ReadWriteFlags::empty()
        } else {
            nowait
        };
        let (result, total) = match &mut slot.request {
            DiskRequest::Read { offset, buf } if self.direct.is_none() => {
                let len = buf.len();
                (
                    rustix::io::preadv2(
                        &self.buffered,
                        &mut [std::io::IoSliceMut::new(buf.as_mut_slice())],
                        *offset,
                        nowait,
                    ),
                    len,
                )
            }
            DiskRequest::Write {
                offset,
                buf,
                fua: false,
            } if self.direct.is_none() => {
                let len = buf.len();
                (
                    rustix::io::pwritev2(
                        &self.buffered,
                        &[std::io::IoSlice::new(buf.as_slice())],
                        *offset,
                        write_flags,
                    ),
                    len,
                )
            }
            _ => return false,
        };
        match result {
            Ok(n) if n == total => true,
            Ok(n) => {
                // A short transfer: the ring finishes the rest.
                slot.done_bytes = n;
                false
            }
            Err(rustix::io::Errno::OPNOTSUPP)
                if matches!(slot.request, DiskRequest::Write { .. }) =>
            {
                log::debug!(
                    "disk: buffered writes cannot be non-blocking here; writing synchronously"
                );
                self.buffered_write_blocks = true;
                false
            }
            Err(_) => false,
        }
    }

    /// Hands every queued operation to the kernel.
    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Takes the next finished request, if any. Call until it returns `None` after the poll
    /// descriptor turns readable.
    pub fn poll_completion(&mut self) -> Option<DiskCompletion> {
        loop {
            if let Some(done) = self.ready.pop_front() {
                return Some(done);
            }
            let cqe = self.ring.completion().next()?;
            let index = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            self.complete(index, cqe.result());
            // Continuations (short transfers, zero fill, sync) were queued by `complete`.
            if self.unsubmitted > 0 {
                if let Err(e) = self.submit() {
                    log::error!("disk: io_uring submit failed (error={e})");
                }
            }
        }
    }

    /// The number of requests handed to this disk and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Pushes the kernel operation for the slot's current stage.
    fn issue(&mut self, index: usize) {
        let Some(slot) = self.slots[index].as_mut() else {
            unreachable!("issue on a free slot");
        };
        let user_data = index as u64;
        let buffered = types::Fd(self.buffered.as_raw_fd());
        let entry = match (&mut slot.request, slot.stage) {
            (DiskRequest::Read { offset, buf }, Stage::Main) => {
                let done = slot.done_bytes;
                let rest = &mut buf.as_mut_slice()[done..];
                let offset = *offset + done as u64;
                let fd = fd_for(&self.direct, buffered.0, offset, rest.len(), rest.as_ptr());
                let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len)
                    .offset(offset)
                    .build()
            }
            (DiskRequest::Write { offset, buf, fua }, Stage::Main) => {
                let done = slot.done_bytes;
                let rest = &buf.as_slice()[done..];
                let offset = *offset + done as u64;
                let fd = fd_for(&self.direct, buffered.0, offset, rest.len(), rest.as_ptr());
                let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(types::Fd(fd), rest.as_ptr(), len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            (DiskRequest::Flush, _) | (_, Stage::Sync) => opcode::Fsync::new(buffered)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (DiskRequest::Discard { offset, len, .. }, Stage::Main) => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                opcode::Fallocate::new(buffered, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
            }
            (
                DiskRequest::WriteZeroes {
                    offset,
                    len,
                    may_deallocate,
                    ..
                },
                Stage::Main,
            ) => {
                let mode = if *may_deallocate {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(buffered, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
            }
            (DiskRequest::WriteZeroes { offset, len, .. }, Stage::ZeroFill { next }) => {
                let chunk = (*len - next).min(ZERO_CHUNK_BYTES as u64) as u32;
                opcode::Write::new(buffered, self.zeroes.as_ptr(), chunk)
                    .offset(*offset + next)
                    .build()
            }
            (request, stage) => unreachable!("no operation for {request:?} at {stage:?}"),
        }
        .user_data(user_data);
        let entry = match &slot.request {
            DiskRequest::Read { buf, .. } | DiskRequest::Write { buf, .. }
                if buf.len() - slot.done_bytes >= ASYNC_TRANSFER_BYTES_MIN =>
            {
                entry.flags(io_uring::squeue::Flags::ASYNC)
            }
            _ => entry,
        };
        // SAFETY: every pointer in `entry` points into a buffer owned by the slot (or by
        // `self.zeroes`), and neither is dropped, moved out of its heap allocation or reused
        // until the completion for `user_data` has been reaped in `complete`.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            if let Err(e) = self.ring.submit() {
                log::error!("disk: io_uring submit failed while the queue was full (error={e})");
            }
        }
        self.unsubmitted += 1;
    }

    /// Handles one kernel completion for slot `index` with result `res` (bytes or -errno).
    fn complete(&mut self, index: usize, res: i32) {
        let Some(mut slot) = self.slots.get_mut(index).and_then(Option::take) else {
            log::error!("disk: completion for an unknown slot (index={index})");
            return;
        };
        let mut next_stage = None;
        let mut result: Result<(), DiskError> = Ok(());
        if res < 0 {
            let errno = -res;
            match (&slot.request, slot.stage) {
                (DiskRequest::Discard { fua, .. }, Stage::Main)
                    if errno == libc::EOPNOTSUPP || errno == libc::EINVAL =>
                {
                    // A discard is a hint: a filesystem without hole punching keeps the data.
                    if *fua {
                        next_stage = Some(Stage::Sync);
                    }
                }
                (DiskRequest::WriteZeroes { .. }, Stage::Main)
                    if errno == libc::EOPNOTSUPP || errno == libc::EINVAL =>
                {
                    next_stage = Some(Stage::ZeroFill { next: 0 });
                }
                _ => result = Err(DiskError { errno }),
            }
        } else {
            let n = res as usize;
            match (&mut slot.request, slot.stage) {
                (DiskRequest::Read { buf, .. }, Stage::Main) => {
                    slot.done_bytes += n;
                    if n == 0 && slot.done_bytes < buf.len() {
                        // End of file inside the device: what lies past it reads as zeroes.
                        let done = slot.done_bytes;
                        buf.as_mut_slice()[done..].fill(0);
                        slot.done_bytes = buf.len();
                    }
                    if slot.done_bytes < buf.len() {
                        next_stage = Some(Stage::Main);
                    }
                }
                (DiskRequest::Write { buf, .. }, Stage::Main) => {
                    slot.done_bytes += n;
                    if n == 0 {
                        result = Err(DiskError { errno: libc::EIO });
                    } else if slot.done_bytes < buf.len() {
                        next_stage = Some(Stage::Main);
                    }
                }
                (DiskRequest::WriteZeroes { len, fua, .. }, Stage::ZeroFill { next }) => {
                    let next = next + n as u64;
                    if n == 0 {
                        result = Err(DiskError { errno: libc::EIO });
                    } else if next < *len {
                        next_stage = Some(Stage::ZeroFill { next });
                    } else if *fua {
                        next_stage = Some(Stage::Sync);
                    }
                }
                (DiskRequest::Discard { fua: true, .. }, Stage::Main)
                | (DiskRequest::WriteZeroes { fua: true, .. }, Stage::Main) => {
                    next_stage = Some(Stage::Sync);
                }
                _ => {}
            }
        }
        if let (Some(stage), Ok(())) = (next_stage, result) {
            slot.stage = stage;
            self.slots[index] = Some(slot);
            self.issue(index);
            return;
        }
        self.free_slots.push(index);
        let tag = slot.tag;
        let completion = match (slot.request, result) {
            (DiskRequest::Read { buf, .. } | DiskRequest::Write { buf, .. }, Ok(())) => {
                DiskCompletion {
                    tag,
                    result: Ok(DiskDone::Buf(buf)),
                    buf: None,
                }
            }
            (DiskRequest::Read { buf, .. } | DiskRequest::Write { buf, .. }, Err(e)) => {
                DiskCompletion {
                    tag,
                    result: Err(e),
                    buf: Some(buf),
                }
            }
            (_, Ok(())) => DiskCompletion {
                tag,
                result: Ok(DiskDone::Done),
                buf: None,
            },
            (_, Err(e)) => DiskCompletion {
                tag,
                result: Err(e),
                buf: None,
            },
        };
        self.ready.push_back(completion);
    }

    /// Finds data and holes with SEEK_DATA / SEEK_HOLE. Synchronous: these lookups only read
    /// the file's extent map.
    fn map_extents(&self, offset: u64, len: u64) -> Result<DiskDone, DiskError> {
        let mut extents = heapless::Vec::new();
        let end = offset + len;
        if self.is_block_device {
            let _ = extents.push(Extent {
                len,
                is_hole: false,
            });
            return Ok(DiskDone::Extents(Box::new(extents)));
        }
        let fd = self.buffered.as_fd();
        let mut pos = offset;
        while pos < end && !extents.is_full() {
            let data = seek(fd, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                let _ = extents.push(Extent {
                    len: data - pos,
                    is_hole: true,
                });
                pos = data;
                continue;
            }
            let hole = seek(fd, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            let _ = extents.push(Extent {
                len: hole.max(pos + 1) - pos,
                is_hole: false,
            });
            pos = hole.max(pos + 1);
        }
        Ok(DiskDone::Extents(Box::new(extents)))
    }
}

/// The descriptor for a transfer: the O_DIRECT one when there is one and the transfer is
/// aligned in offset, length and memory, else the buffered one.
fn fd_for(
    direct: &Option<File>,
    buffered: RawFd,
    offset: u64,
    len: usize,
    ptr: *const u8,
) -> RawFd {
    let align = IO_ALIGN as u64;
    match direct {
        Some(direct)
            if offset.is_multiple_of(align)
                && (len as u64).is_multiple_of(align)
                && (ptr as usize).is_multiple_of(IO_ALIGN) =>
        {
            direct.as_raw_fd()
        }
        _ => buffered,
    }
}

/// lseek with SEEK_DATA or SEEK_HOLE; `None` when there is no more data (ENXIO).
fn seek(fd: BorrowedFd<'_>, pos: u64, whence: i32) -> Result<Option<u64>, DiskError> {
    let from = match whence {
        libc::SEEK_DATA => rustix::fs::SeekFrom::Data(pos),
        _ => rustix::fs::SeekFrom::Hole(pos),
    };
    match rustix::fs::seek(fd, from) {
        Ok(found) => Ok(Some(found)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(DiskError {
            errno: e.raw_os_error(),
        }),
    }
}

impl Drop for LinuxDisk {
    fn drop(&mut self) {
        if self.in_flight() > 0 {
            // The kernel may still read or write these buffers after the ring is closed (its
            // teardown finishes asynchronously): leaking them is the only safe choice, and it
            // happens only when the process is about to exit anyway.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}
