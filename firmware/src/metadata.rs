//! The on-disk metadata of a tandem volume: where it lives, the superblock format, and the
//! check for foreign signatures before a device is initialized.
//!
//! This module is part of the sans-IO core: pure functions over byte slices. It never reads a
//! disk, a clock or a random source (the caller passes in a fresh random volume id). Bytes read
//! from a disk never cause a panic here; they produce a typed error.
//!
//! # Where the metadata lives
//!
//! tandem keeps its metadata **inside the backing device, at its end**, so that a disk carries
//! its own identity and the exported volume starts at offset 0 of the device (a tandem volume
//! holding ext4 looks like ext4 from its first byte, which also makes recovery without tandem
//! possible). Everything is in 4 KiB blocks at 4 KiB-aligned absolute offsets, so that every
//! metadata write is one aligned block (O_DIRECT-friendly, and a 4 KiB write is atomic or at worst
//! torn inside one block that its CRC then rejects).
//!
//! ```text
//!  0                       metadata_offset                                       backing_bytes
//!  |  volume (exported)    | sb 0 | activity log ring | dirty bitmap   | sb 1 |(<4 KiB unused)|
//!  |<--- volume_bytes ---->|4 KiB | SLOTS x 4 KiB     | bitmap_bytes   |4 KiB |               |
//! ```
//!
//! - **Two superblock copies, at both ends of the metadata area.** Every superblock update bumps
//!   `sequence` and is written to one copy, flushed, then to the other, never both at once, so a
//!   power cut tears at most one copy and the other still holds the previous or the new state.
//!   Putting them at opposite ends of the area (the second in the last 4 KiB block of the device)
//!   means a damaged stretch of the disk, or a stray write over one end, rarely takes both.
//! - **The activity log** is a ring of [`ACTIVITY_LOG_SLOTS`] 4 KiB records (its record format
//!   belongs to the mirroring code). 64 slots (256 KiB) is 8 times DRBD's default 32 KiB ring:
//!   room for records that name many hot regions, for a negligible share of any usable disk.
//! - **The dirty bitmap** holds one bit per [`REGION_BYTES`] of the volume. It is sized from the
//!   whole (aligned) device rather than the volume, which avoids a circular computation and only
//!   over-allocates by the bits of the metadata area itself.
//! - **Region size 64 KiB.** DRBD's 4 KiB bits cost 32 MiB of bitmap per TiB; 64 KiB costs
//!   2 MiB per TiB, so the bitmap of even the largest array this board can hold stays in RAM, and
//!   one 4 KiB bitmap block covers 2 GiB of volume (few metadata writes). The price is that one
//!   dirty 4 KiB write resyncs 64 KiB, which is cheap next to a seek.
//! - The trailing fragment of a device whose size is not a multiple of 4 KiB (a regular file) is
//!   left unused, as part of the metadata area: `volume_bytes + metadata_bytes() == backing_bytes`.
//!
//! # Superblock format (version 1)
//!
//! One 4096-byte block, all integers little-endian, all unnamed bytes zero:
//!
//! | offset | bytes | field                   | notes                                          |
//! |-------:|------:|-------------------------|------------------------------------------------|
//! |      0 |     8 | magic                   | `b"TANDEMMD"`                                  |
//! |      8 |     4 | version                 | u32, 1                                         |
//! |     12 |     4 | flags                   | u32, bits from [`flags`]; unknown bits refused |
//! |     16 |     8 | sequence                | u64, >= 1, bumped on every write               |
//! |     24 |    16 | volume_id               | random at initialization, never all zero       |
//! |     40 |     8 | backing_bytes           | u64, device size when the layout was computed  |
//! |     48 |     8 | volume_bytes            | u64, must equal the layout's                   |
//! |     56 |     8 | region_bytes            | u64, must equal the layout's                   |
//! |     64 |     8 | current_generation      | u64                                            |
//! |     72 |     8 | bitmap_generation       | u64                                            |
//! |     80 |    32 | history_generations     | 4 x u64                                        |
//! |    112 |     8 | epoch                   | u64                                            |
//! |    120 |     1 | node_name length        | 0..=64                                         |
//! |    121 |     1 | epoch_node length       | 0..=64                                         |
//! |    122 |     6 | reserved                | zero                                           |
//! |    128 |    64 | node_name               | UTF-8, zero padded                             |
//! |    192 |    64 | epoch_node              | UTF-8, zero padded                             |
//! |    256 |  3836 | reserved                | zero                                           |
//! |   4092 |     4 | CRC-32C                 | over bytes 0..4092                             |
//!
//! Every future version keeps the magic at 0, the version at 8 and the CRC-32C in the last
//! 4 bytes, so an intact superblock of a newer version is reported as
//! [`SuperblockDecodeError::UnsupportedVersion`] and a damaged one as `BadChecksum`.
//! Why CRC-32C: it is the checksum of the storage world (iSCSI, ext4 and btrfs metadata, DRBD's
//! activity log), detects every burst error up to 32 bits and all the odd-bit errors a torn or
//! bit-rotted block produces, and it is cheap; the superblock has no adversary to defend against
//! (the disk is local), only damage.
//!
//! Decoding is strict (reserved bytes and string padding must be zero) so that one superblock
//! has exactly one encoding, and a block that is not a version-1 superblock is never half-read.
//!
//! # Resized devices
//!
//! A superblock records the `backing_bytes` it was laid out for, and [`Superblock::check_layout`]
//! refuses a device that has since grown or shrunk, by any amount. Shrinking cuts off the end of
//! the volume; growing would require moving the whole metadata area to the new end (a multi-step,
//! crash-sensitive operation the peer must agree to). Neither happens without an operator, so
//! tandem stops and says so. In most resizes the superblocks are simply not found at the new
//! offsets; [`foreign_signature`] then still sees tandem metadata in the last 128 KiB when the
//! change was small, or the user's filesystem at the start of the device, and refuses to
//! initialize over it.

use core::fmt;

/// The first 8 bytes of every tandem superblock.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TANDEMMD";
/// The superblock format this firmware reads and writes.
pub const SUPERBLOCK_VERSION: u32 = 1;
/// Size of one superblock copy: one metadata block.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Bytes scanned at the start and at the end of a device for foreign signatures.
pub const SIGNATURE_HEAD_BYTES: usize = 128 * 1024;
pub const SIGNATURE_TAIL_BYTES: usize = 128 * 1024;

/// The unit of every metadata structure and of the exported volume's size.
pub const METADATA_BLOCK_BYTES: u64 = 4096;
/// Records in the activity log ring (each one metadata block).
pub const ACTIVITY_LOG_SLOTS: u64 = 64;
/// Volume bytes covered by one bit of the dirty bitmap (see the module doc for why 64 KiB).
pub const REGION_BYTES: u64 = 64 * 1024;
/// The smallest volume tandem exports: anything smaller is a configuration mistake.
pub const VOLUME_BYTES_MIN: u64 = 1024 * 1024;
/// The smallest backing device [`Layout::for_backing`] accepts: the minimum volume plus the
/// metadata area of a device that small (two superblocks, the activity log, one bitmap block).
pub const BACKING_BYTES_MIN: u64 = VOLUME_BYTES_MIN
    + 2 * METADATA_BLOCK_BYTES // the superblock copies
    + ACTIVITY_LOG_BYTES
    + METADATA_BLOCK_BYTES; // the bitmap

const ACTIVITY_LOG_BYTES: u64 = ACTIVITY_LOG_SLOTS * METADATA_BLOCK_BYTES;

const _: () = assert!(SUPERBLOCK_BYTES as u64 == METADATA_BLOCK_BYTES);
const _: () = assert!(METADATA_BLOCK_BYTES.is_power_of_two());
const _: () = assert!(REGION_BYTES.is_power_of_two() && REGION_BYTES >= METADATA_BLOCK_BYTES);
const _: () = assert!(VOLUME_BYTES_MIN.is_multiple_of(METADATA_BLOCK_BYTES));
const _: () = assert!(ACTIVITY_LOG_SLOTS >= 2);
// The bitmap of the smallest device fits in its single bitmap block (BACKING_BYTES_MIN assumes so).
const _: () = assert!(BACKING_BYTES_MIN.div_ceil(REGION_BYTES).div_ceil(8) <= METADATA_BLOCK_BYTES);

/// CRC-32C (Castagnoli), the checksum of every superblock.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Where everything lives on a backing device of a given size. All offsets are absolute bytes
/// from the start of the device and multiples of [`METADATA_BLOCK_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub backing_bytes: u64,
    /// The exported size: a multiple of 4096, starting at offset 0 of the device.
    pub volume_bytes: u64,
    /// Start of the metadata area, which runs to the end of the device; equal to `volume_bytes`.
    pub metadata_offset: u64,
    /// Copy 0 at the start of the metadata area, copy 1 in the last whole 4 KiB block.
    pub superblock_offsets: [u64; 2],
    /// A ring of [`ACTIVITY_LOG_SLOTS`] 4 KiB records.
    pub activity_log_offset: u64,
    pub activity_log_bytes: u64,
    /// The persistent dirty bitmap, one bit per `region_bytes` of the volume.
    pub bitmap_offset: u64,
    pub bitmap_bytes: u64,
    pub region_bytes: u64,
}

impl Layout {
    /// The layout for a device of `backing_bytes`; refuses devices too small to hold the metadata
    /// plus a volume of [`VOLUME_BYTES_MIN`].
    pub fn for_backing(backing_bytes: u64) -> Result<Layout, LayoutError> {
        // A trailing fragment shorter than a block is left unused (see the module doc).
        let usable_bytes = backing_bytes - backing_bytes % METADATA_BLOCK_BYTES;
        let bitmap_bits = usable_bytes.div_ceil(REGION_BYTES);
        let bitmap_bytes = bitmap_bits
            .div_ceil(8)
            .div_ceil(METADATA_BLOCK_BYTES)
            .max(1)
            * METADATA_BLOCK_BYTES;
        let metadata_bytes = 2 * METADATA_BLOCK_BYTES + ACTIVITY_LOG_BYTES + bitmap_bytes;
        let volume_bytes = match usable_bytes.checked_sub(metadata_bytes) {
            Some(volume_bytes) if volume_bytes >= VOLUME_BYTES_MIN => volume_bytes,
            _ => {
                return Err(LayoutError::TooSmall {
                    backing_bytes,
                    minimum_bytes: BACKING_BYTES_MIN,
                })
            }
        };
        let metadata_offset = volume_bytes;
        let activity_log_offset = metadata_offset + METADATA_BLOCK_BYTES;
        let bitmap_offset = activity_log_offset + ACTIVITY_LOG_BYTES;
        let last_superblock_offset = bitmap_offset + bitmap_bytes;
        assert!(last_superblock_offset + METADATA_BLOCK_BYTES == usable_bytes);
        // Written so that it cannot overflow: the backing size may be any u64 (even from a disk).
        assert!(bitmap_bytes * 8 >= volume_bytes.div_ceil(REGION_BYTES));
        Ok(Layout {
            backing_bytes,
            volume_bytes,
            metadata_offset,
            superblock_offsets: [metadata_offset, last_superblock_offset],
            activity_log_offset,
            activity_log_bytes: ACTIVITY_LOG_BYTES,
            bitmap_offset,
            bitmap_bytes,
            region_bytes: REGION_BYTES,
        })
    }

    /// Bytes from `metadata_offset` to the end of the device (including an unused fragment).
    pub fn metadata_bytes(&self) -> u64 {
        self.backing_bytes - self.metadata_offset
    }

    /// Regions of the volume, i.e. meaningful bits of the bitmap (the last region may be partial).
    pub fn region_count(&self) -> u64 {
        self.volume_bytes.div_ceil(self.region_bytes)
    }
}

/// Why a device cannot hold a tandem volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    TooSmall {
        backing_bytes: u64,
        minimum_bytes: u64,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::TooSmall {
                backing_bytes,
                minimum_bytes,
            } => write!(
                f,
                "backing device of {backing_bytes} bytes is too small: tandem needs at least \
                 {minimum_bytes} bytes (a {VOLUME_BYTES_MIN}-byte volume plus its metadata)"
            ),
        }
    }
}

impl std::error::Error for LayoutError {}

/// Bit flags of [`Superblock::flags`].
pub mod flags {
    /// The daemon stopped cleanly: the activity log need not be replayed.
    pub const CLEAN_SHUTDOWN: u32 = 1;
    /// This node was primary when the superblock was written.
    pub const WAS_PRIMARY: u32 = 2;
    /// The volume has not been written since initialization (identity may still be adopted).
    pub const NEVER_WRITTEN: u32 = 4;
    /// This node knows its peer's copy is outdated.
    pub const PEER_OUTDATED: u32 = 8;
    /// This node's copy is outdated.
    pub const DISK_OUTDATED: u32 = 16;
    /// This node's copy is inconsistent (a resync to it is incomplete).
    pub const DISK_INCONSISTENT: u32 = 32;
    /// Every flag this version knows; any other bit makes a superblock malformed.
    pub const KNOWN: u32 = CLEAN_SHUTDOWN
        | WAS_PRIMARY
        | NEVER_WRITTEN
        | PEER_OUTDATED
        | DISK_OUTDATED
        | DISK_INCONSISTENT;
}

/// Length of the node name fields, in bytes.
pub const NODE_NAME_BYTES_MAX: usize = 64;

/// Persistent state of one node's copy of the volume (one superblock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every write; the valid copy with the highest one wins.
    pub sequence: u64,
    /// Identity of the volume, shared by both nodes of a pair.
    pub volume_id: [u8; 16],
    /// Node that owns this copy (empty until known).
    pub node_name: heapless::String<NODE_NAME_BYTES_MAX>,
    pub backing_bytes: u64,
    pub volume_bytes: u64,
    pub region_bytes: u64,
    /// Bits from [`flags`].
    pub flags: u32,
    // Reserved now, used by the mirroring code (DRBD-style generation identifiers).
    pub current_generation: u64,
    pub bitmap_generation: u64,
    pub history_generations: [u64; 4],
    pub epoch: u64,
    pub epoch_node: heapless::String<NODE_NAME_BYTES_MAX>,
}

// Byte offsets of the fields (the table in the module doc).
const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 8;
const OFFSET_FLAGS: usize = 12;
const OFFSET_SEQUENCE: usize = 16;
const OFFSET_VOLUME_ID: usize = 24;
const OFFSET_BACKING_BYTES: usize = 40;
const OFFSET_VOLUME_BYTES: usize = 48;
const OFFSET_REGION_BYTES: usize = 56;
const OFFSET_CURRENT_GENERATION: usize = 64;
const OFFSET_BITMAP_GENERATION: usize = 72;
const OFFSET_HISTORY_GENERATIONS: usize = 80;
const OFFSET_EPOCH: usize = 112;
const OFFSET_NODE_NAME_LEN: usize = 120;
const OFFSET_EPOCH_NODE_LEN: usize = 121;
const OFFSET_RESERVED_HEADER: usize = 122;
const OFFSET_NODE_NAME: usize = 128;
const OFFSET_EPOCH_NODE: usize = 192;
const OFFSET_RESERVED_TAIL: usize = 256;
const OFFSET_CRC: usize = SUPERBLOCK_BYTES - 4;

const _: () = assert!(OFFSET_HISTORY_GENERATIONS + 4 * 8 == OFFSET_EPOCH);
const _: () = assert!(OFFSET_NODE_NAME + NODE_NAME_BYTES_MAX == OFFSET_EPOCH_NODE);
const _: () = assert!(OFFSET_EPOCH_NODE + NODE_NAME_BYTES_MAX == OFFSET_RESERVED_TAIL);
const _: () = assert!(NODE_NAME_BYTES_MAX <= u8::MAX as usize);

impl Superblock {
    /// A fresh superblock for a newly initialized device: sequence 1, only `NEVER_WRITTEN` set,
    /// no node name or epoch yet, and all generations zero except `current_generation`, which is
    /// the first 8 bytes of the volume id (little-endian). Generation 0 means "none" in the
    /// DRBD scheme, so should those 8 bytes be zero the generation is 1 instead.
    ///
    /// `volume_id` must come from a random source; an all-zero id is a caller bug.
    pub fn new(layout: &Layout, volume_id: [u8; 16]) -> Superblock {
        assert!(volume_id != [0; 16], "volume id must be random, not zero");
        let mut first_half = [0u8; 8];
        first_half.copy_from_slice(&volume_id[..8]);
        Superblock {
            sequence: 1,
            volume_id,
            node_name: heapless::String::new(),
            backing_bytes: layout.backing_bytes,
            volume_bytes: layout.volume_bytes,
            region_bytes: layout.region_bytes,
            flags: flags::NEVER_WRITTEN,
            current_generation: u64::from_le_bytes(first_half).max(1),
            bitmap_generation: 0,
            history_generations: [0; 4],
            epoch: 0,
            epoch_node: heapless::String::new(),
        }
    }

    /// Whether every bit of `flag` is set.
    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }

    /// Writes exactly [`SUPERBLOCK_BYTES`]: the fields at the offsets of the module doc, zero
    /// padding, and the CRC-32C of everything before it in the last 4 bytes.
    ///
    /// Encoding a superblock that [`Superblock::decode`] would refuse is a bug and panics.
    pub fn encode(&self, out: &mut [u8; SUPERBLOCK_BYTES]) {
        if let Err(reason) = self.check_fields() {
            panic!("encoding an invalid superblock: {reason}");
        }
        out.fill(0);
        out[OFFSET_MAGIC..OFFSET_MAGIC + 8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(out, OFFSET_VERSION, SUPERBLOCK_VERSION);
        put_u32(out, OFFSET_FLAGS, self.flags);
        put_u64(out, OFFSET_SEQUENCE, self.sequence);
        out[OFFSET_VOLUME_ID..OFFSET_VOLUME_ID + 16].copy_from_slice(&self.volume_id);
        put_u64(out, OFFSET_BACKING_BYTES, self.backing_bytes);
        put_u64(out, OFFSET_VOLUME_BYTES, self.volume_bytes);
        put_u64(out, OFFSET_REGION_BYTES, self.region_bytes);
        put_u64(out, OFFSET_CURRENT_GENERATION, self.current_generation);
        put_u64(out, OFFSET_BITMAP_GENERATION, self.bitmap_generation);
        for (i, generation) in self.history_generations.iter().enumerate() {
            put_u64(out, OFFSET_HISTORY_GENERATIONS + 8 * i, *generation);
        }
        put_u64(out, OFFSET_EPOCH, self.epoch);
        put_name(out, OFFSET_NODE_NAME_LEN, OFFSET_NODE_NAME, &self.node_name);
        put_name(
            out,
            OFFSET_EPOCH_NODE_LEN,
            OFFSET_EPOCH_NODE,
            &self.epoch_node,
        );
        let crc = CRC32C.checksum(&out[..OFFSET_CRC]);
        put_u32(out, OFFSET_CRC, crc);
    }

    /// Reads a superblock from the first [`SUPERBLOCK_BYTES`] of `bytes` (anything after them is
    /// ignored). Checks, in this order: length, magic, CRC, version, then the fields (string
    /// lengths and UTF-8, zero padding, known flags, and that the sizes are those
    /// [`Layout::for_backing`] gives for the recorded `backing_bytes`).
    pub fn decode(bytes: &[u8]) -> Result<Superblock, SuperblockDecodeError> {
        let block: &[u8; SUPERBLOCK_BYTES] = bytes
            .get(..SUPERBLOCK_BYTES)
            .and_then(|block| block.try_into().ok())
            .ok_or(SuperblockDecodeError::Short)?;
        if block[OFFSET_MAGIC..OFFSET_MAGIC + 8] != SUPERBLOCK_MAGIC {
            return Err(SuperblockDecodeError::NoMagic);
        }
        // CRC before version: damage is reported as damage, and only an intact block of another
        // version as unsupported (every version keeps its CRC in the last 4 bytes).
        if CRC32C.checksum(&block[..OFFSET_CRC]) != get_u32(block, OFFSET_CRC) {
            return Err(SuperblockDecodeError::BadChecksum);
        }
        let version = get_u32(block, OFFSET_VERSION);
        if version != SUPERBLOCK_VERSION {
            return Err(SuperblockDecodeError::UnsupportedVersion(version));
        }
        let is_zero = |range: core::ops::Range<usize>| block[range].iter().all(|&b| b == 0);
        if !is_zero(OFFSET_RESERVED_HEADER..OFFSET_NODE_NAME)
            || !is_zero(OFFSET_RESERVED_TAIL..OFFSET_CRC)
        {
            return Err(SuperblockDecodeError::Malformed(
                "reserved bytes are not zero",
            ));
        }
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&block[OFFSET_VOLUME_ID..OFFSET_VOLUME_ID + 16]);
        let mut history_generations = [0u64; 4];
        for (i, generation) in history_generations.iter_mut().enumerate() {
            *generation = get_u64(block, OFFSET_HISTORY_GENERATIONS + 8 * i);
        }
        let superblock = Superblock {
            sequence: get_u64(block, OFFSET_SEQUENCE),
            volume_id,
            node_name: get_name(block, OFFSET_NODE_NAME_LEN, OFFSET_NODE_NAME)?,
            backing_bytes: get_u64(block, OFFSET_BACKING_BYTES),
            volume_bytes: get_u64(block, OFFSET_VOLUME_BYTES),
            region_bytes: get_u64(block, OFFSET_REGION_BYTES),
            flags: get_u32(block, OFFSET_FLAGS),
            current_generation: get_u64(block, OFFSET_CURRENT_GENERATION),
            bitmap_generation: get_u64(block, OFFSET_BITMAP_GENERATION),
            history_generations,
            epoch: get_u64(block, OFFSET_EPOCH),
            epoch_node: get_name(block, OFFSET_EPOCH_NODE_LEN, OFFSET_EPOCH_NODE)?,
        };
        superblock
            .check_fields()
            .map_err(SuperblockDecodeError::Malformed)?;
        Ok(superblock)
    }

    /// Whether this superblock belongs on a device laid out as `layout` (the device's current
    /// size). A device that grew or shrank by any amount is refused: see "Resized devices" in the
    /// module doc.
    pub fn check_layout(&self, layout: &Layout) -> Result<(), LayoutMismatch> {
        if self.backing_bytes != layout.backing_bytes {
            return Err(LayoutMismatch::BackingResized {
                recorded_bytes: self.backing_bytes,
                current_bytes: layout.backing_bytes,
            });
        }
        if self.volume_bytes != layout.volume_bytes {
            return Err(LayoutMismatch::Geometry("volume size"));
        }
        if self.region_bytes != layout.region_bytes {
            return Err(LayoutMismatch::Geometry("region size"));
        }
        Ok(())
    }

    /// The internal sanity rules shared by `decode` (a violation is a malformed block) and
    /// `encode` (a violation is a bug).
    fn check_fields(&self) -> Result<(), &'static str> {
        if self.sequence == 0 {
            return Err("sequence is zero");
        }
        if self.volume_id == [0; 16] {
            return Err("volume id is zero");
        }
        if self.flags & !flags::KNOWN != 0 {
            return Err("unknown flag bits");
        }
        let layout = Layout::for_backing(self.backing_bytes)
            .map_err(|_| "backing size is below the minimum")?;
        if self.volume_bytes != layout.volume_bytes {
            return Err("volume size does not match the layout of the backing size");
        }
        if self.region_bytes != layout.region_bytes {
            return Err("region size does not match the layout of the backing size");
        }
        Ok(())
    }
}

/// Why the bytes at a superblock offset are not a usable superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockDecodeError {
    /// Fewer than [`SUPERBLOCK_BYTES`] bytes.
    Short,
    /// Not a tandem superblock at all.
    NoMagic,
    /// An intact superblock of a format this firmware does not know (a newer firmware wrote it).
    UnsupportedVersion(u32),
    /// A damaged (torn, bit-rotted or overwritten) superblock.
    BadChecksum,
    /// The checksum is right but a field is impossible.
    Malformed(&'static str),
}

impl fmt::Display for SuperblockDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuperblockDecodeError::Short => {
                write!(f, "superblock is shorter than {SUPERBLOCK_BYTES} bytes")
            }
            SuperblockDecodeError::NoMagic => write!(f, "no tandem superblock magic"),
            SuperblockDecodeError::UnsupportedVersion(version) => write!(
                f,
                "superblock version {version} is not supported (this firmware reads version \
                 {SUPERBLOCK_VERSION})"
            ),
            SuperblockDecodeError::BadChecksum => write!(f, "superblock checksum mismatch"),
            SuperblockDecodeError::Malformed(reason) => write!(f, "malformed superblock: {reason}"),
        }
    }
}

impl std::error::Error for SuperblockDecodeError {}

/// Why a valid superblock does not fit the device it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutMismatch {
    /// The device grew or shrank since the superblock was written.
    BackingResized {
        recorded_bytes: u64,
        current_bytes: u64,
    },
    /// Same size, but a derived size differs (a layout not made by [`Layout::for_backing`]).
    Geometry(&'static str),
}

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutMismatch::BackingResized {
                recorded_bytes,
                current_bytes,
            } => write!(
                f,
                "backing device was resized from {recorded_bytes} to {current_bytes} bytes; \
                 tandem does not move its metadata on its own"
            ),
            LayoutMismatch::Geometry(what) => {
                write!(f, "superblock {what} does not match the device layout")
            }
        }
    }
}

impl std::error::Error for LayoutMismatch {}

/// Given what was read at both superblock offsets, the superblock to use, and whether the copies
/// need to be rewritten (one is damaged, or they differ).
///
/// | copy 0  | copy 1  | result                                                      |
/// |---------|---------|-------------------------------------------------------------|
/// | valid   | valid   | higher `sequence` (copy 0 on a tie); repair if they differ  |
/// | valid   | invalid | copy 0, repair                                              |
/// | invalid | valid   | copy 1, repair                                              |
/// | invalid | invalid | `None`: no tandem superblock on this device                 |
///
/// Since writes go to one copy at a time, the copy with the lower sequence is the state before an
/// interrupted update, which was never acknowledged, so the higher one is always safe to use.
/// "Invalid" includes a copy of an unsupported version: a format upgrade must leave the other copy
/// a consistent fallback until it has rewritten both.
pub fn choose_superblock(
    copies: [Result<Superblock, SuperblockDecodeError>; 2],
) -> Option<(Superblock, bool)> {
    match copies {
        [Ok(first), Ok(second)] => {
            let needs_repair = first != second;
            if second.sequence > first.sequence {
                Some((second, needs_repair))
            } else {
                Some((first, needs_repair))
            }
        }
        [Ok(only), Err(_)] | [Err(_), Ok(only)] => Some((only, true)),
        [Err(_), Err(_)] => None,
    }
}

/// The name of a foreign signature (a filesystem, RAID, LVM, encryption, a partition table, or
/// tandem metadata this firmware cannot use) on a device of `backing_bytes`, given its first
/// bytes `head` (up to [`SIGNATURE_HEAD_BYTES`], shorter on a small device) and its last bytes
/// `tail` (up to [`SIGNATURE_TAIL_BYTES`], ending at `backing_bytes`). `None` when the device
/// looks blank, or when its tail holds a valid tandem superblock of this size (it is ours).
///
/// Callers check only devices on which they found no usable tandem superblock: a tandem volume
/// legitimately carries the user's filesystem at its start.
///
/// The most specific signature wins: containers and partition tables before filesystems, and the
/// bare MBR boot signature (which FAT and NTFS boot sectors also carry) last.
pub fn foreign_signature(head: &[u8], tail: &[u8], backing_bytes: u64) -> Option<&'static str> {
    let device = DeviceView::new(head, tail, backing_bytes);
    if device.has_own_superblock() {
        return None;
    }
    if device.has_other_tandem_metadata() {
        return Some("tandem metadata (damaged, of another device size, or of a newer version)");
    }
    for check in SIGNATURE_CHECKS {
        if let Some(name) = check(&device) {
            return Some(name);
        }
    }
    None
}

/// Signature checks in priority order (see [`foreign_signature`]).
const SIGNATURE_CHECKS: &[fn(&DeviceView<'_>) -> Option<&'static str>] = &[
    luks,
    md_raid,
    lvm2,
    gpt,
    xfs,
    btrfs,
    ext,
    swap,
    iso9660,
    ntfs_exfat_fat,
    mbr,
];

/// Byte reads at absolute device offsets, answered from `head` or `tail`; `None` for bytes
/// neither holds, so a short or odd buffer never panics.
struct DeviceView<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    /// Absolute offset of `tail[0]`; `None` if `tail` is longer than the device (ignored then).
    tail_offset: Option<u64>,
    backing_bytes: u64,
}

impl<'a> DeviceView<'a> {
    fn new(head: &'a [u8], tail: &'a [u8], backing_bytes: u64) -> Self {
        let tail_offset = u64::try_from(tail.len())
            .ok()
            .and_then(|tail_bytes| backing_bytes.checked_sub(tail_bytes));
        DeviceView {
            head,
            tail,
            tail_offset,
            backing_bytes,
        }
    }

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&'a [u8]> {
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        if let (Ok(start), Ok(end)) = (usize::try_from(offset), usize::try_from(end)) {
            if let Some(bytes) = self.head.get(start..end) {
                return Some(bytes);
            }
        }
        let tail_offset = self.tail_offset?;
        if offset < tail_offset || end > self.backing_bytes {
            return None;
        }
        let start = usize::try_from(offset - tail_offset).ok()?;
        self.tail.get(start..start.checked_add(len)?)
    }

    fn has(&self, offset: u64, magic: &[u8]) -> bool {
        self.bytes_at(offset, magic.len()) == Some(magic)
    }

    /// A valid tandem superblock, laid out for exactly this size, in the last block of the layout.
    fn has_own_superblock(&self) -> bool {
        let Ok(layout) = Layout::for_backing(self.backing_bytes) else {
            return false;
        };
        self.bytes_at(layout.superblock_offsets[1], SUPERBLOCK_BYTES)
            .and_then(|bytes| Superblock::decode(bytes).ok())
            .is_some_and(|superblock| superblock.backing_bytes == self.backing_bytes)
    }

    /// The tandem magic at the start of any 4 KiB block of the tail: a damaged superblock, one
    /// from before a small resize, or one of a newer version. Such a device is not blank, so it
    /// must never be initialized over.
    fn has_other_tandem_metadata(&self) -> bool {
        let Some(tail_offset) = self.tail_offset else {
            return false;
        };
        let first_block = tail_offset.div_ceil(METADATA_BLOCK_BYTES) * METADATA_BLOCK_BYTES;
        (first_block..self.backing_bytes)
            .step_by(SUPERBLOCK_BYTES)
            .any(|offset| self.has(offset, &SUPERBLOCK_MAGIC))
    }
}

/// LUKS1/LUKS2 header at 0, or a LUKS2 secondary header at the offsets inside the head.
fn luks(device: &DeviceView<'_>) -> Option<&'static str> {
    let primary = device.has(0, b"LUKS\xba\xbe");
    let secondary = [0x4000, 0x8000, 0x1_0000]
        .iter()
        .any(|&offset| device.has(offset, b"SKUL\xba\xbe"));
    (primary || secondary).then_some("LUKS encrypted volume")
}

/// Linux md RAID member: magic 0xa92b4efc (little-endian for v1.x, host order for v0.90).
fn md_raid(device: &DeviceView<'_>) -> Option<&'static str> {
    const MAGIC_LE: [u8; 4] = 0xa92b_4efc_u32.to_le_bytes();
    const MAGIC_BE: [u8; 4] = 0xa92b_4efc_u32.to_be_bytes();
    if device.has(0, &MAGIC_LE) {
        return Some("Linux md RAID member (v1.1 superblock)");
    }
    if device.has(4096, &MAGIC_LE) {
        return Some("Linux md RAID member (v1.2 superblock)");
    }
    // v1.0: 8 KiB before the end, rounded down to 4 KiB, counted in 512-byte sectors.
    let sectors = device.backing_bytes / 512;
    if let Some(sector) = sectors.checked_sub(16) {
        if device.has((sector & !7) * 512, &MAGIC_LE) {
            return Some("Linux md RAID member (v1.0 superblock)");
        }
    }
    // v0.90: the last 64 KiB-aligned 64 KiB block before the end.
    if let Some(offset) = (device.backing_bytes & !(64 * 1024 - 1)).checked_sub(64 * 1024) {
        if device.has(offset, &MAGIC_LE) || device.has(offset, &MAGIC_BE) {
            return Some("Linux md RAID member (v0.90 superblock)");
        }
    }
    None
}

/// LVM2 physical volume: a "LABELONE" label in one of the first four sectors, type at +24.
fn lvm2(device: &DeviceView<'_>) -> Option<&'static str> {
    (0..4)
        .map(|sector| sector * 512)
        .any(|offset| device.has(offset, b"LABELONE") && device.has(offset + 24, b"LVM2 001"))
        .then_some("LVM2 physical volume")
}

/// GPT header in LBA 1 (512- or 4096-byte sectors), or its backup in the last LBA.
fn gpt(device: &DeviceView<'_>) -> Option<&'static str> {
    const MAGIC: &[u8] = b"EFI PART";
    if device.has(512, MAGIC) || device.has(4096, MAGIC) {
        return Some("GPT partition table");
    }
    let backup = [512, 4096]
        .iter()
        .filter_map(|&sector| device.backing_bytes.checked_sub(sector))
        .any(|offset| device.has(offset, MAGIC));
    backup.then_some("GPT partition table (backup header)")
}

fn xfs(device: &DeviceView<'_>) -> Option<&'static str> {
    device.has(0, b"XFSB").then_some("XFS filesystem")
}

/// btrfs: superblock at 64 KiB, magic at offset 64 inside it.
fn btrfs(device: &DeviceView<'_>) -> Option<&'static str> {
    device
        .has(65536 + 64, b"_BHRfS_M")
        .then_some("btrfs filesystem")
}

/// ext2/3/4: superblock at 1024, `s_magic` 0xEF53 little-endian at offset 56 inside it.
fn ext(device: &DeviceView<'_>) -> Option<&'static str> {
    device
        .has(1024 + 56, &0xEF53_u16.to_le_bytes())
        .then_some("ext4 filesystem (ext2/3/4 superblock)")
}

/// Linux swap: the magic ends the first page, for every page size Linux uses (4 KiB on x86,
/// up to 64 KiB on arm64 and ppc64), so a disk moved from another machine is recognized too.
fn swap(device: &DeviceView<'_>) -> Option<&'static str> {
    const SWAP: [&[u8]; 2] = [b"SWAPSPACE2", b"SWAP-SPACE"];
    const HIBERNATION: [&[u8]; 4] = [b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001"];
    for page_bytes in [4096, 8192, 16384, 32768, 65536] {
        let offset = page_bytes - 10;
        if SWAP.iter().any(|magic| device.has(offset, magic)) {
            return Some("Linux swap space");
        }
        if HIBERNATION.iter().any(|magic| device.has(offset, magic)) {
            return Some("Linux swap space (with a hibernation image)");
        }
    }
    None
}

/// ISO 9660: the primary volume descriptor in sector 16 (2048-byte sectors), "CD001" at +1.
fn iso9660(device: &DeviceView<'_>) -> Option<&'static str> {
    device
        .has(16 * 2048 + 1, b"CD001")
        .then_some("ISO 9660 filesystem")
}

/// The filesystems whose boot sector also ends in 0x55 0xAA, named before the bare MBR.
fn ntfs_exfat_fat(device: &DeviceView<'_>) -> Option<&'static str> {
    if device.has(3, b"NTFS    ") {
        return Some("NTFS filesystem");
    }
    if device.has(3, b"EXFAT   ") {
        return Some("exFAT filesystem");
    }
    let fat =
        device.has(54, b"FAT12   ") || device.has(54, b"FAT16   ") || device.has(82, b"FAT32   ");
    fat.then_some("FAT filesystem")
}

fn mbr(device: &DeviceView<'_>) -> Option<&'static str> {
    device
        .has(510, &[0x55, 0xAA])
        .then_some("MBR boot signature")
}

fn put_u32(out: &mut [u8; SUPERBLOCK_BYTES], offset: usize, value: u32) {
    out[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut [u8; SUPERBLOCK_BYTES], offset: usize, value: u64) {
    out[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

fn put_name(
    out: &mut [u8; SUPERBLOCK_BYTES],
    len_offset: usize,
    offset: usize,
    name: &heapless::String<NODE_NAME_BYTES_MAX>,
) {
    let bytes = name.as_bytes();
    // The capacity of the string type is what makes this fit the field and the length byte.
    out[len_offset] = bytes.len() as u8;
    out[offset..offset + bytes.len()].copy_from_slice(bytes);
}

// The offsets passed below are the constants above, all inside the block, so these never panic.
fn get_u32(block: &[u8; SUPERBLOCK_BYTES], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&block[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

fn get_u64(block: &[u8; SUPERBLOCK_BYTES], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&block[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

fn get_name(
    block: &[u8; SUPERBLOCK_BYTES],
    len_offset: usize,
    offset: usize,
) -> Result<heapless::String<NODE_NAME_BYTES_MAX>, SuperblockDecodeError> {
    let len = usize::from(block[len_offset]);
    if len > NODE_NAME_BYTES_MAX {
        return Err(SuperblockDecodeError::Malformed(
            "node name longer than 64 bytes",
        ));
    }
    let field = &block[offset..offset + NODE_NAME_BYTES_MAX];
    let (text, padding) = field.split_at(len);
    if padding.iter().any(|&b| b != 0) {
        return Err(SuperblockDecodeError::Malformed(
            "node name padding is not zero",
        ));
    }
    let text = core::str::from_utf8(text)
        .map_err(|_| SuperblockDecodeError::Malformed("node name is not UTF-8"))?;
    let mut name = heapless::String::new();
    name.push_str(text)
        .map_err(|()| SuperblockDecodeError::Malformed("node name longer than 64 bytes"))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    const TIB: u64 = 1024 * GIB;

    fn name(text: &str) -> heapless::String<NODE_NAME_BYTES_MAX> {
        let mut name = heapless::String::new();
        name.push_str(text).expect("test name fits");
        name
    }

    fn sample_superblock() -> Superblock {
        let layout = Layout::for_backing(GIB).expect("1 GiB is enough");
        let mut superblock = Superblock::new(&layout, *b"0123456789abcdef");
        superblock.sequence = 42;
        superblock.node_name = name("board-a");
        superblock.flags = flags::WAS_PRIMARY | flags::PEER_OUTDATED;
        superblock.bitmap_generation = 0x1111;
        superblock.history_generations = [1, 2, 3, 4];
        superblock.epoch = 7;
        superblock.epoch_node = name("board-b");
        superblock
    }

    fn encoded(superblock: &Superblock) -> [u8; SUPERBLOCK_BYTES] {
        let mut block = [0u8; SUPERBLOCK_BYTES];
        superblock.encode(&mut block);
        block
    }

    /// Rewrites the CRC so that a deliberately altered block passes the checksum.
    fn reseal(block: &mut [u8; SUPERBLOCK_BYTES]) {
        let crc = CRC32C.checksum(&block[..4092]);
        block[4092..].copy_from_slice(&crc.to_le_bytes());
    }

    fn assert_layout_is_sound(layout: &Layout) {
        let block = METADATA_BLOCK_BYTES;
        assert_eq!(
            layout.volume_bytes + layout.metadata_bytes(),
            layout.backing_bytes
        );
        assert_eq!(layout.metadata_offset, layout.volume_bytes);
        assert!(layout.volume_bytes >= VOLUME_BYTES_MIN);
        for offset in [
            layout.volume_bytes,
            layout.superblock_offsets[0],
            layout.superblock_offsets[1],
            layout.activity_log_offset,
            layout.activity_log_bytes,
            layout.bitmap_offset,
            layout.bitmap_bytes,
        ] {
            assert_eq!(
                offset % block,
                0,
                "{offset} is not 4 KiB aligned in {layout:?}"
            );
        }
        // The areas, in disk order, each ending at or before the next one starts.
        let areas = [
            (0, layout.volume_bytes),
            (layout.superblock_offsets[0], block),
            (layout.activity_log_offset, layout.activity_log_bytes),
            (layout.bitmap_offset, layout.bitmap_bytes),
            (layout.superblock_offsets[1], block),
        ];
        for pair in areas.windows(2) {
            assert!(
                pair[0].0 + pair[0].1 <= pair[1].0,
                "{pair:?} overlap in {layout:?}"
            );
        }
        assert_eq!(layout.superblock_offsets[0], layout.metadata_offset);
        assert_eq!(layout.activity_log_bytes, ACTIVITY_LOG_SLOTS * block);
        // Copy 1 is the last whole 4 KiB block of the device.
        let copy_1_end = layout.superblock_offsets[1] + block;
        assert!(copy_1_end <= layout.backing_bytes);
        assert!(layout.backing_bytes - copy_1_end < block);
        assert!(layout.bitmap_bytes * 8 >= layout.region_count());
        assert!(
            u128::from(layout.bitmap_bytes) * 8 * u128::from(layout.region_bytes)
                >= u128::from(layout.volume_bytes)
        );
    }

    #[test]
    fn layout_refuses_devices_below_the_minimum() {
        for backing_bytes in [0, 4096, MIB, BACKING_BYTES_MIN - 1] {
            assert_eq!(
                Layout::for_backing(backing_bytes),
                Err(LayoutError::TooSmall {
                    backing_bytes,
                    minimum_bytes: BACKING_BYTES_MIN
                })
            );
        }
        let smallest = Layout::for_backing(BACKING_BYTES_MIN).expect("the minimum fits");
        assert_eq!(smallest.volume_bytes, VOLUME_BYTES_MIN);
        assert_layout_is_sound(&smallest);
    }

    #[test]
    fn layout_of_one_gib_puts_metadata_in_the_last_268_kib() {
        let layout = Layout::for_backing(GIB).expect("1 GiB is enough");
        assert_layout_is_sound(&layout);
        // 2 superblocks + 64 log slots + 1 bitmap block (2048 bytes of bits, rounded up).
        assert_eq!(layout.metadata_bytes(), 67 * 4096);
        assert_eq!(layout.volume_bytes, 1_073_467_392);
        assert_eq!(layout.superblock_offsets, [1_073_467_392, GIB - 4096]);
        assert_eq!(layout.activity_log_offset, 1_073_467_392 + 4096);
        assert_eq!(layout.bitmap_offset, GIB - 8192);
        assert_eq!(layout.bitmap_bytes, 4096);
        assert_eq!(layout.region_bytes, 64 * KIB);
    }

    #[test]
    fn layout_of_sixteen_tib_has_a_32_mib_bitmap() {
        let layout = Layout::for_backing(16 * TIB).expect("16 TiB is enough");
        assert_layout_is_sound(&layout);
        assert_eq!(layout.bitmap_bytes, 32 * MIB);
        assert_eq!(layout.superblock_offsets[1], 16 * TIB - 4096);
        assert_eq!(layout.metadata_bytes(), 32 * MIB + 66 * 4096);
    }

    #[test]
    fn layout_leaves_an_unaligned_tail_fragment_unused() {
        let layout = Layout::for_backing(GIB + 1234).expect("enough");
        assert_layout_is_sound(&layout);
        assert_eq!(layout.superblock_offsets[1], GIB - 4096);
        assert_eq!(layout.metadata_bytes(), 67 * 4096 + 1234);
    }

    #[test]
    fn layout_is_sound_for_many_sizes() {
        let mut backing_bytes = BACKING_BYTES_MIN;
        while backing_bytes < 64 * TIB {
            for delta in [0, 1, 511, 4095, 4096] {
                let layout = Layout::for_backing(backing_bytes + delta).expect("above minimum");
                assert_layout_is_sound(&layout);
            }
            backing_bytes = backing_bytes * 3 + 12345;
        }
        assert_layout_is_sound(&Layout::for_backing(u64::MAX).expect("huge"));
    }

    #[test]
    fn crc_is_crc32c() {
        // The standard check value of CRC-32C (Castagnoli).
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn superblock_round_trips_through_encode_and_decode() {
        let superblock = sample_superblock();
        let block = encoded(&superblock);
        assert_eq!(Superblock::decode(&block), Ok(superblock.clone()));
        // Trailing bytes after the block are ignored.
        let mut longer = block.to_vec();
        longer.extend_from_slice(&[0xFF; 100]);
        assert_eq!(Superblock::decode(&longer), Ok(superblock));
    }

    #[test]
    fn new_superblock_is_never_written_with_a_generation_from_the_id() {
        let layout = Layout::for_backing(GIB).expect("1 GiB is enough");
        let superblock = Superblock::new(&layout, [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(superblock.sequence, 1);
        assert_eq!(superblock.flags, flags::NEVER_WRITTEN);
        assert!(superblock.has_flag(flags::NEVER_WRITTEN));
        assert!(!superblock.has_flag(flags::WAS_PRIMARY));
        assert_eq!(superblock.current_generation, 0x0807_0605_0403_0201);
        assert_eq!(superblock.bitmap_generation, 0);
        assert_eq!(superblock.history_generations, [0; 4]);
        assert_eq!(superblock.epoch, 0);
        assert!(superblock.node_name.is_empty());
        assert_eq!(superblock.check_layout(&layout), Ok(()));
        let zero_first_half =
            Superblock::new(&layout, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(zero_first_half.current_generation, 1);
    }

    #[test]
    fn superblock_with_any_flipped_byte_is_rejected() {
        let block = encoded(&sample_superblock());
        for index in 0..SUPERBLOCK_BYTES {
            let mut damaged = block;
            damaged[index] ^= 0x01;
            let expected = if index < 8 {
                SuperblockDecodeError::NoMagic
            } else {
                SuperblockDecodeError::BadChecksum
            };
            assert_eq!(Superblock::decode(&damaged), Err(expected), "byte {index}");
        }
    }

    #[test]
    fn superblock_of_another_version_is_unsupported() {
        let mut block = encoded(&sample_superblock());
        block[8..12].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut block);
        assert_eq!(
            Superblock::decode(&block),
            Err(SuperblockDecodeError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn short_input_is_rejected() {
        let block = encoded(&sample_superblock());
        assert_eq!(
            Superblock::decode(&block[..4095]),
            Err(SuperblockDecodeError::Short)
        );
        assert_eq!(Superblock::decode(&[]), Err(SuperblockDecodeError::Short));
    }

    /// A named way to damage an encoded superblock.
    type Damage = (&'static str, fn(&mut [u8; SUPERBLOCK_BYTES]));

    #[test]
    fn superblock_with_impossible_fields_is_malformed() {
        let good = encoded(&sample_superblock());
        let cases: [Damage; 9] = [
            ("sequence zero", |b| b[16..24].fill(0)),
            ("volume id zero", |b| b[24..40].fill(0)),
            ("unknown flag", |b| b[12] |= 0x40),
            ("volume size", |b| b[48] ^= 0x10),
            ("region size", |b| {
                b[56..64].copy_from_slice(&(4096u64).to_le_bytes())
            }),
            ("tiny backing", |b| {
                b[40..48].copy_from_slice(&4096u64.to_le_bytes())
            }),
            ("name too long", |b| b[120] = 65),
            ("name not UTF-8", |b| {
                b[120] = 1;
                b[128] = 0xFF;
            }),
            ("reserved byte", |b| b[3000] = 1),
        ];
        for (what, corrupt) in cases {
            let mut block = good;
            corrupt(&mut block);
            reseal(&mut block);
            assert!(
                matches!(
                    Superblock::decode(&block),
                    Err(SuperblockDecodeError::Malformed(_))
                ),
                "{what}: {:?}",
                Superblock::decode(&block)
            );
        }
        // Garbage after the name, inside its field.
        let mut block = good;
        block[128 + 7] = b'x';
        reseal(&mut block);
        assert_eq!(
            Superblock::decode(&block),
            Err(SuperblockDecodeError::Malformed(
                "node name padding is not zero"
            ))
        );
    }

    /// Pins the on-disk format: a block written by hand from the table in the module doc.
    #[test]
    fn hand_written_superblock_decodes_field_by_field() {
        let mut block = [0u8; SUPERBLOCK_BYTES];
        block[0..8].copy_from_slice(b"TANDEMMD");
        block[8..12].copy_from_slice(&[1, 0, 0, 0]);
        block[12..16].copy_from_slice(&[0x0A, 0, 0, 0]); // WAS_PRIMARY | PEER_OUTDATED
        block[16..24].copy_from_slice(&[0x2A, 0, 0, 0, 0, 0, 0, 0]); // sequence 42
        block[24..40].copy_from_slice(b"0123456789abcdef");
        block[40..48].copy_from_slice(&[0, 0, 0, 0x40, 0, 0, 0, 0]); // 1 GiB
        block[48..56].copy_from_slice(&[0, 0xD0, 0xFB, 0x3F, 0, 0, 0, 0]); // 1_073_467_392
        block[56..64].copy_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0]); // 64 KiB
        block[64..72].copy_from_slice(b"01234567"); // current generation: the id's first half
        block[72..80].copy_from_slice(&[0x11, 0x11, 0, 0, 0, 0, 0, 0]);
        for (i, generation) in [1u8, 2, 3, 4].iter().enumerate() {
            block[80 + 8 * i] = *generation;
        }
        block[112] = 7; // epoch
        block[120] = 7; // "board-a"
        block[121] = 7; // "board-b"
        block[128..135].copy_from_slice(b"board-a");
        block[192..199].copy_from_slice(b"board-b");
        let crc = CRC32C.checksum(&block[..4092]);
        block[4092..4096].copy_from_slice(&crc.to_le_bytes());

        let superblock = Superblock::decode(&block).expect("hand-written block is valid");
        assert_eq!(superblock.sequence, 42);
        assert_eq!(&superblock.volume_id, b"0123456789abcdef");
        assert_eq!(superblock.node_name.as_str(), "board-a");
        assert_eq!(superblock.backing_bytes, GIB);
        assert_eq!(superblock.volume_bytes, 1_073_467_392);
        assert_eq!(superblock.region_bytes, 65536);
        assert_eq!(superblock.flags, flags::WAS_PRIMARY | flags::PEER_OUTDATED);
        assert_eq!(
            superblock.current_generation,
            u64::from_le_bytes(*b"01234567")
        );
        assert_eq!(superblock.bitmap_generation, 0x1111);
        assert_eq!(superblock.history_generations, [1, 2, 3, 4]);
        assert_eq!(superblock.epoch, 7);
        assert_eq!(superblock.epoch_node.as_str(), "board-b");
        // And encoding produces exactly these bytes.
        assert_eq!(superblock, sample_superblock());
        assert_eq!(encoded(&sample_superblock()), block);
    }

    #[test]
    fn check_layout_refuses_a_resized_device() {
        let superblock = sample_superblock();
        let same = Layout::for_backing(GIB).expect("enough");
        assert_eq!(superblock.check_layout(&same), Ok(()));
        for current_bytes in [GIB + 512, GIB - 4096, 2 * GIB] {
            let resized = Layout::for_backing(current_bytes).expect("enough");
            assert_eq!(
                superblock.check_layout(&resized),
                Err(LayoutMismatch::BackingResized {
                    recorded_bytes: GIB,
                    current_bytes
                })
            );
        }
        let odd = Layout {
            volume_bytes: same.volume_bytes - 4096,
            ..same
        };
        assert_eq!(
            superblock.check_layout(&odd),
            Err(LayoutMismatch::Geometry("volume size"))
        );
    }

    #[test]
    fn choose_takes_the_higher_sequence_and_repairs_the_other() {
        let older = sample_superblock();
        let newer = Superblock {
            sequence: older.sequence + 1,
            ..older.clone()
        };
        assert_eq!(
            choose_superblock([Ok(older.clone()), Ok(newer.clone())]),
            Some((newer.clone(), true))
        );
        assert_eq!(
            choose_superblock([Ok(newer.clone()), Ok(older.clone())]),
            Some((newer, true))
        );
    }

    #[test]
    fn choose_needs_no_repair_when_both_copies_agree() {
        let superblock = sample_superblock();
        assert_eq!(
            choose_superblock([Ok(superblock.clone()), Ok(superblock.clone())]),
            Some((superblock, false))
        );
    }

    #[test]
    fn choose_prefers_copy_0_on_a_tie_with_different_contents() {
        let first = sample_superblock();
        let second = Superblock {
            epoch: 99,
            ..first.clone()
        };
        assert_eq!(
            choose_superblock([Ok(first.clone()), Ok(second)]),
            Some((first, true))
        );
    }

    #[test]
    fn choose_takes_the_only_valid_copy_and_repairs_the_damaged_one() {
        let superblock = sample_superblock();
        assert_eq!(
            choose_superblock([
                Err(SuperblockDecodeError::BadChecksum),
                Ok(superblock.clone())
            ]),
            Some((superblock.clone(), true))
        );
        assert_eq!(
            choose_superblock([Ok(superblock.clone()), Err(SuperblockDecodeError::NoMagic)]),
            Some((superblock, true))
        );
    }

    #[test]
    fn choose_finds_nothing_when_both_copies_are_invalid() {
        assert_eq!(
            choose_superblock([
                Err(SuperblockDecodeError::NoMagic),
                Err(SuperblockDecodeError::UnsupportedVersion(2))
            ]),
            None
        );
    }

    /// A zeroed device of `backing_bytes` with `magic` written at absolute `offset`, returned as
    /// the head and tail a caller would read.
    fn device_with(backing_bytes: u64, writes: &[(u64, &[u8])]) -> (Vec<u8>, Vec<u8>) {
        let head_bytes = backing_bytes.min(SIGNATURE_HEAD_BYTES as u64);
        let tail_bytes = backing_bytes.min(SIGNATURE_TAIL_BYTES as u64);
        let tail_offset = backing_bytes - tail_bytes;
        let mut head = vec![0u8; head_bytes as usize];
        let mut tail = vec![0u8; tail_bytes as usize];
        for &(offset, bytes) in writes {
            let end = offset + bytes.len() as u64;
            assert!(end <= backing_bytes, "test write past the end");
            let mut written = false;
            if end <= head_bytes {
                head[offset as usize..end as usize].copy_from_slice(bytes);
                written = true;
            }
            if offset >= tail_offset {
                let start = (offset - tail_offset) as usize;
                tail[start..start + bytes.len()].copy_from_slice(bytes);
                written = true;
            }
            assert!(
                written,
                "test write at {offset} is in neither head nor tail"
            );
        }
        (head, tail)
    }

    fn signature_of(backing_bytes: u64, writes: &[(u64, &[u8])]) -> Option<&'static str> {
        let (head, tail) = device_with(backing_bytes, writes);
        foreign_signature(&head, &tail, backing_bytes)
    }

    #[test]
    fn blank_device_has_no_signature() {
        for backing_bytes in [0, 512, 64 * KIB, GIB, 1_000_001_234] {
            assert_eq!(signature_of(backing_bytes, &[]), None, "{backing_bytes}");
        }
    }

    #[test]
    fn ext_superblock_magic_is_found() {
        assert_eq!(
            signature_of(GIB, &[(1080, &[0x53, 0xEF])]),
            Some("ext4 filesystem (ext2/3/4 superblock)")
        );
        // The bytes in the wrong order are not the magic.
        assert_eq!(signature_of(GIB, &[(1080, &[0xEF, 0x53])]), None);
    }

    #[test]
    fn xfs_magic_is_found() {
        assert_eq!(signature_of(GIB, &[(0, b"XFSB")]), Some("XFS filesystem"));
    }

    #[test]
    fn btrfs_magic_is_found() {
        assert_eq!(
            signature_of(GIB, &[(65600, b"_BHRfS_M")]),
            Some("btrfs filesystem")
        );
        assert_eq!(signature_of(GIB, &[(65536, b"_BHRfS_M")]), None);
    }

    #[test]
    fn swap_magic_is_found_for_each_page_size() {
        for offset in [4086, 8182, 16374, 32758, 65526] {
            assert_eq!(
                signature_of(GIB, &[(offset, b"SWAPSPACE2")]),
                Some("Linux swap space"),
                "{offset}"
            );
        }
        assert_eq!(
            signature_of(GIB, &[(4086, b"SWAP-SPACE")]),
            Some("Linux swap space")
        );
        assert_eq!(
            signature_of(GIB, &[(4086, b"S1SUSPEND")]),
            Some("Linux swap space (with a hibernation image)")
        );
        assert_eq!(signature_of(GIB, &[(4096, b"SWAPSPACE2")]), None);
    }

    #[test]
    fn lvm2_label_is_found_in_any_of_the_first_four_sectors() {
        for sector in 0..4u64 {
            let offset = sector * 512;
            assert_eq!(
                signature_of(GIB, &[(offset, b"LABELONE"), (offset + 24, b"LVM2 001")]),
                Some("LVM2 physical volume"),
                "sector {sector}"
            );
        }
        // A label without the LVM2 type is not an LVM2 PV.
        assert_eq!(signature_of(GIB, &[(512, b"LABELONE")]), None);
    }

    const MD_MAGIC: [u8; 4] = [0xFC, 0x4E, 0x2B, 0xA9];

    #[test]
    fn md_superblocks_at_the_start_are_found() {
        assert_eq!(
            signature_of(GIB, &[(0, &MD_MAGIC)]),
            Some("Linux md RAID member (v1.1 superblock)")
        );
        assert_eq!(
            signature_of(GIB, &[(4096, &MD_MAGIC)]),
            Some("Linux md RAID member (v1.2 superblock)")
        );
    }

    #[test]
    fn md_superblocks_at_the_end_are_found_on_an_odd_sized_device() {
        // 1_000_001_234 bytes = 1_953_127 sectors (+ 338 bytes).
        // v1.0: ((1_953_127 - 16) & !7) * 512 = 1_953_104 * 512.
        let backing_bytes = 1_000_001_234;
        assert_eq!(
            signature_of(backing_bytes, &[(999_989_248, &MD_MAGIC)]),
            Some("Linux md RAID member (v1.0 superblock)")
        );
        // v0.90: (size rounded down to 64 KiB) - 64 KiB = 15_259 * 65536 - 65536.
        assert_eq!(
            signature_of(backing_bytes, &[(999_882_752, &MD_MAGIC)]),
            Some("Linux md RAID member (v0.90 superblock)")
        );
        let big_endian = [0xA9, 0x2B, 0x4E, 0xFC];
        assert_eq!(
            signature_of(backing_bytes, &[(999_882_752, &big_endian)]),
            Some("Linux md RAID member (v0.90 superblock)")
        );
        // One sector off is not a superblock.
        assert_eq!(
            signature_of(backing_bytes, &[(999_989_248 + 512, &MD_MAGIC)]),
            None
        );
    }

    #[test]
    fn luks_header_is_found() {
        assert_eq!(
            signature_of(GIB, &[(0, b"LUKS\xba\xbe")]),
            Some("LUKS encrypted volume")
        );
        assert_eq!(
            signature_of(GIB, &[(0x4000, b"SKUL\xba\xbe")]),
            Some("LUKS encrypted volume")
        );
    }

    #[test]
    fn mbr_boot_signature_is_found() {
        assert_eq!(
            signature_of(GIB, &[(510, &[0x55, 0xAA])]),
            Some("MBR boot signature")
        );
        assert_eq!(signature_of(GIB, &[(510, &[0xAA, 0x55])]), None);
    }

    #[test]
    fn gpt_header_is_found_in_either_sector_size_and_before_its_protective_mbr() {
        for offset in [512, 4096] {
            assert_eq!(
                signature_of(GIB, &[(510, &[0x55, 0xAA]), (offset, b"EFI PART")]),
                Some("GPT partition table")
            );
        }
        for sector_bytes in [512, 4096] {
            assert_eq!(
                signature_of(GIB, &[(GIB - sector_bytes, b"EFI PART")]),
                Some("GPT partition table (backup header)")
            );
        }
    }

    #[test]
    fn iso9660_descriptor_is_found() {
        assert_eq!(
            signature_of(GIB, &[(32769, b"CD001")]),
            Some("ISO 9660 filesystem")
        );
        assert_eq!(signature_of(GIB, &[(32768, b"CD001")]), None);
    }

    #[test]
    fn fat_and_ntfs_are_named_before_their_mbr_signature() {
        let boot = [0x55, 0xAA];
        assert_eq!(
            signature_of(GIB, &[(3, b"NTFS    "), (510, &boot)]),
            Some("NTFS filesystem")
        );
        assert_eq!(
            signature_of(GIB, &[(82, b"FAT32   "), (510, &boot)]),
            Some("FAT filesystem")
        );
    }

    #[test]
    fn small_device_is_checked_without_reading_past_its_end() {
        // 40 KiB: btrfs and most swap offsets lie beyond the end; the MBR is still seen.
        let backing_bytes = 40 * KIB;
        assert_eq!(signature_of(backing_bytes, &[]), None);
        assert_eq!(
            signature_of(backing_bytes, &[(510, &[0x55, 0xAA])]),
            Some("MBR boot signature")
        );
        assert_eq!(
            signature_of(backing_bytes, &[(32769, b"CD001")]),
            Some("ISO 9660 filesystem")
        );
    }

    #[test]
    fn device_with_a_valid_tandem_superblock_in_its_tail_is_not_foreign() {
        let superblock = sample_superblock();
        let block = encoded(&superblock);
        let layout = Layout::for_backing(GIB).expect("enough");
        // The user's ext4 at the start of the volume does not make a tandem device foreign.
        let writes: [(u64, &[u8]); 2] = [
            (1080, &[0x53, 0xEF]),
            (layout.superblock_offsets[1], &block),
        ];
        assert_eq!(signature_of(GIB, &writes), None);
    }

    #[test]
    fn damaged_or_misplaced_tandem_metadata_is_foreign() {
        let block = encoded(&sample_superblock());
        let tandem =
            Some("tandem metadata (damaged, of another device size, or of a newer version)");
        let mut damaged = block;
        damaged[100] ^= 1;
        assert_eq!(signature_of(GIB, &[(GIB - 4096, &damaged)]), tandem);
        // The device grew by 8 KiB: the old copy 1 is two blocks before the end.
        assert_eq!(signature_of(GIB + 8192, &[(GIB - 4096, &block)]), tandem);
        // The device grew by less than a block: same offsets, but not this size.
        assert_eq!(signature_of(GIB + 512, &[(GIB - 4096, &block)]), tandem);
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_random_blocks_with_magic_and_checksum(
            body in proptest::collection::vec(any::<u8>(), SUPERBLOCK_BYTES),
            version_is_one in any::<bool>(),
        ) {
            let mut block = [0u8; SUPERBLOCK_BYTES];
            block.copy_from_slice(&body);
            block[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
            if version_is_one {
                block[8..12].copy_from_slice(&1u32.to_le_bytes());
            }
            reseal(&mut block);
            let _ = Superblock::decode(&block);
        }

        #[test]
        fn encode_then_decode_is_identity(
            sequence in 1u64..,
            volume_id in any::<[u8; 16]>().prop_filter("nonzero", |id| *id != [0; 16]),
            node in "[a-z0-9-]{0,64}",
            epoch_node in "\\PC{0,16}",
            backing_bytes in BACKING_BYTES_MIN..(1u64 << 50),
            flag_bits in 0u32..64,
            generations in any::<[u64; 7]>(),
        ) {
            let layout = Layout::for_backing(backing_bytes).expect("above minimum");
            let mut superblock = Superblock::new(&layout, volume_id);
            superblock.sequence = sequence;
            superblock.node_name = name(&node);
            superblock.epoch_node = name(&epoch_node);
            superblock.flags = flag_bits;
            superblock.current_generation = generations[0];
            superblock.bitmap_generation = generations[1];
            superblock.history_generations.copy_from_slice(&generations[2..6]);
            superblock.epoch = generations[6];
            prop_assert_eq!(Superblock::decode(&encoded(&superblock)), Ok(superblock));
        }

        /// Buffers of any length up to past the scanned sizes (filled with one byte, then
        /// random patches: fully random 128 KiB buffers are slow to generate and no better at
        /// hitting magics), against any device size, including sizes smaller than the buffers.
        #[test]
        fn foreign_signature_never_panics_on_random_input(
            head_len in 0..SIGNATURE_HEAD_BYTES + 4096,
            tail_len in 0..SIGNATURE_TAIL_BYTES + 4096,
            fill in any::<u8>(),
            patches in proptest::collection::vec((any::<usize>(), any::<[u8; 8]>()), 0..32),
            backing_bytes in prop_oneof![any::<u64>(), 0u64..300_000, (1u64 << 20)..(1u64 << 32)],
        ) {
            let mut head = vec![fill; head_len];
            let mut tail = vec![fill; tail_len];
            for (i, (position, bytes)) in patches.iter().enumerate() {
                let buffer = if i % 2 == 0 { &mut head } else { &mut tail };
                if buffer.len() >= 8 {
                    let start = position % (buffer.len() - 7);
                    buffer[start..start + 8].copy_from_slice(bytes);
                }
            }
            let _ = foreign_signature(&head, &tail, backing_bytes);
        }
    }
}
