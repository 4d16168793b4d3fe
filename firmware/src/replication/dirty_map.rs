//! The out-of-sync bitmap: one bit per region of the volume, set when the two copies of that
//! region may differ, cleared only when the region is known to be the same on both nodes.
//!
//! This module owns the bitmap in memory, the record of which 4 KiB blocks of its on-disk copy
//! are stale, and the bookkeeping that makes clearing a bit during a resync safe. It is part of
//! the sans-IO core: it produces the bytes of a bitmap block and their offset inside the bitmap
//! area ([`crate::metadata::Layout::bitmap_offset`] is added by the caller) and decodes the
//! blocks the caller read; it never touches a disk or a clock. Memory is allocated once, in
//! [`DirtyMap::new`]; no operation allocates afterwards.
//!
//! # Bit order (in memory and on disk)
//!
//! Region `i` (bytes `i * region_bytes .. (i + 1) * region_bytes` of the volume) is bit `i % 64`
//! of word `i / 64`, and each word is stored little-endian. That is the same as LSB-first bytes:
//! region `i` is bit `i % 8` (value `1 << (i % 8)`) of byte `i / 8` of the bitmap area, so the
//! format does not depend on the word size. Bitmap block `b` (4 KiB, at byte `b * 4096` of the
//! area) holds regions `b * 32768 .. (b + 1) * 32768`, i.e. 2 GiB of volume at 64 KiB per region.
//! The test `bitmap_bytes_put_region_i_in_byte_i_div_8_bit_i_mod_8` pins this.
//!
//! Bits past the last region of the volume (the bitmap area is sized from the whole device, so
//! it has some) are always written as zero. [`DirtyMap::load_block`] **rejects** a block that
//! has any of them set rather than ignoring them: we only ever write zeros there, so a one means
//! the block is not what we wrote (a foreign or damaged area), and the bits inside the volume
//! cannot be trusted either. The caller then treats the whole bitmap as lost
//! ([`DirtyMap::mark_all`], a full resync).
//!
//! # Persistence
//!
//! Every change that flips a bit flags the 4 KiB block holding it. The writer drains the flags
//! with [`DirtyMap::take_changed_blocks`] (or [`DirtyMap::take_changed_block`] for one block):
//! the flag is cleared at the moment the block is encoded, so a bit flipped while the write is
//! in flight flags the block again and it is written once more. A write that fails puts its flag
//! back with [`DirtyMap::mark_block_changed`]. When a block must be durable (before the activity
//! log record that evicts an extent it covers, see `activity_log`) is the caller's rule.
//!
//! # Resync (reference/replication-drbd-hast.md, lesson 13)
//!
//! A dirty bit may only be cleared once the region is durable on the target **with data at
//! least as new as the last write to it**. A region whose resync is under way is *in flight*
//! (at most [`RESYNC_IN_FLIGHT_MAX`] at once). A client write that touches an in-flight region
//! sets its *redo* flag: the data the resync read may predate that write, and the resync write
//! may even land on the target after the client write did. When the resync is durable the bit is
//! cleared only if no redo was noted; otherwise it stays dirty and the next pass sends the region
//! again.
//!
//! | bit | in flight | redo | event                  | result                                     |
//! |-----|-----------|------|------------------------|--------------------------------------------|
//! | 1   | no        | -    | `begin_resync`         | in flight, redo = 0                        |
//! | 0   | no        | -    | `begin_resync`         | refused: `Clean`                           |
//! | any | yes       | any  | `begin_resync`         | refused: `InFlight`                        |
//! | any | yes       | any  | `note_write`           | bit = 1, redo = 1                          |
//! | any | yes       | any  | `note_replicated_write`| bit = 1, redo = 1                          |
//! | any | no        | -    | `note_write`           | bit = 1                                    |
//! | any | no        | -    | `note_replicated_write`| unchanged (both copies got the write)      |
//! | any | yes       | 0    | `resync_durable`       | bit = 0, not in flight                     |
//! | any | yes       | 1    | `resync_durable`       | bit = 1 (kept), not in flight              |
//! | any | yes       | any  | `resync_aborted`       | bit unchanged, not in flight               |

use core::fmt;

use crate::metadata::{Layout, METADATA_BLOCK_BYTES};

/// Bytes of one on-disk bitmap block.
pub const BITMAP_BLOCK_BYTES: usize = METADATA_BLOCK_BYTES as usize;

/// Regions covered by one bitmap block (2 GiB of volume at 64 KiB per region).
pub const REGIONS_PER_BITMAP_BLOCK: u64 = BITMAP_BLOCK_BYTES as u64 * 8;

/// Regions whose resync may be in flight at once: 128 x 64 KiB = 8 MiB, enough to keep a
/// 10 Gb/s link with a millisecond of latency busy. The table is scanned on every client write
/// while a resync runs, so it stays small.
pub const RESYNC_IN_FLIGHT_MAX: usize = 128;

const WORD_BITS: u64 = u64::BITS as u64;
const WORD_BYTES: usize = 8;
const WORDS_PER_BLOCK: u64 = REGIONS_PER_BITMAP_BLOCK / WORD_BITS;

const _: () = assert!(BITMAP_BLOCK_BYTES.is_multiple_of(WORD_BYTES));
const _: () = assert!(WORDS_PER_BLOCK * WORD_BYTES as u64 == BITMAP_BLOCK_BYTES as u64);

/// The out-of-sync bitmap of one volume; see the module documentation.
#[derive(Debug, Clone)]
pub struct DirtyMap {
    volume_bytes: u64,
    region_bytes: u64,
    region_count: u64,
    /// Region `i` is bit `i % 64` of `words[i / 64]`; bits past `region_count` are always zero.
    words: Vec<u64>,
    /// Set bits in `words`, kept as bits flip.
    dirty_count: u64,
    /// Bitmap blocks changed since they were last handed to the writer, one bit per block.
    changed_blocks: Vec<u64>,
    /// Regions whose resync is in flight.
    resyncs: [Option<ResyncInFlight>; RESYNC_IN_FLIGHT_MAX],
    resync_in_flight_count: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResyncInFlight {
    region: u64,
    /// A client write touched the region after its resync began.
    redo: bool,
}

/// The answer to [`DirtyMap::begin_resync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncBegin {
    /// The region is now in flight; finish with `resync_durable` or `resync_aborted`.
    Started,
    /// The region is not dirty: nothing to send.
    Clean,
    /// The region's resync is already in flight.
    InFlight,
    /// [`RESYNC_IN_FLIGHT_MAX`] regions are in flight: wait for one to finish.
    Full,
}

/// One bitmap block to write, produced by [`DirtyMap::take_changed_blocks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapBlockWrite {
    pub block_index: u64,
    /// Byte offset inside the bitmap area (add `Layout::bitmap_offset`).
    pub offset_in_bitmap: u64,
    pub bytes: [u8; BITMAP_BLOCK_BYTES],
}

/// Why a bitmap block read from disk was refused. The map is unchanged after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapLoadError {
    /// The caller passed a buffer that is not one block.
    WrongLength { bytes: usize },
    /// A bit for a region past the end of the volume is set (see the module documentation).
    BitsPastVolumeEnd { block_index: u64 },
}

impl fmt::Display for BitmapLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapLoadError::WrongLength { bytes } => write!(
                f,
                "bitmap block of {bytes} bytes, expected {BITMAP_BLOCK_BYTES}"
            ),
            BitmapLoadError::BitsPastVolumeEnd { block_index } => write!(
                f,
                "bitmap block {block_index} marks regions past the end of the volume"
            ),
        }
    }
}

impl std::error::Error for BitmapLoadError {}

impl DirtyMap {
    /// An all-clean map for a volume of `volume_bytes`, one bit per `region_bytes` (a power of
    /// two; the last region may be shorter). Allocates the words once.
    pub fn new(volume_bytes: u64, region_bytes: u64) -> DirtyMap {
        assert!(region_bytes.is_power_of_two());
        let region_count = volume_bytes.div_ceil(region_bytes);
        let word_count =
            usize::try_from(region_count.div_ceil(WORD_BITS)).expect("bitmap words fit in memory");
        let block_count = region_count.div_ceil(REGIONS_PER_BITMAP_BLOCK);
        let changed_word_count =
            usize::try_from(block_count.div_ceil(WORD_BITS)).expect("block flags fit in memory");
        DirtyMap {
            volume_bytes,
            region_bytes,
            region_count,
            words: vec![0; word_count],
            dirty_count: 0,
            changed_blocks: vec![0; changed_word_count],
            resyncs: [None; RESYNC_IN_FLIGHT_MAX],
            resync_in_flight_count: 0,
        }
    }

    /// The map for the volume of `layout`, whose bitmap area is large enough for it.
    pub fn for_layout(layout: &Layout) -> DirtyMap {
        let map = DirtyMap::new(layout.volume_bytes, layout.region_bytes);
        assert!(map.block_count() * METADATA_BLOCK_BYTES <= layout.bitmap_bytes);
        map
    }

    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Regions of the volume (the last one may be partial).
    pub fn region_count(&self) -> u64 {
        self.region_count
    }

    /// Bitmap blocks that hold at least one region of the volume.
    pub fn block_count(&self) -> u64 {
        self.region_count.div_ceil(REGIONS_PER_BITMAP_BLOCK)
    }

    /// The regions touched by the bytes `offset .. offset + len` (empty when `len` is 0).
    pub fn regions_of(&self, offset: u64, len: u64) -> core::ops::Range<u64> {
        let end = offset
            .checked_add(len)
            .expect("byte range does not overflow");
        assert!(end <= self.volume_bytes, "byte range inside the volume");
        if len == 0 {
            return 0..0;
        }
        offset / self.region_bytes..end.div_ceil(self.region_bytes)
    }

    /// The bitmap block holding the bit of the region at byte `offset` of the volume.
    pub fn block_of_offset(&self, offset: u64) -> u64 {
        assert!(offset < self.volume_bytes);
        offset / self.region_bytes / REGIONS_PER_BITMAP_BLOCK
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        assert!(region < self.region_count);
        self.words[word_index(region)] & bit_mask(region) != 0
    }

    /// Dirty regions, kept as bits flip: O(1).
    pub fn dirty_count(&self) -> u64 {
        self.dirty_count
    }

    /// Bytes of the volume in dirty regions (a dirty partial last region counts its real size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.dirty_count * self.region_bytes;
        let last_region_bytes = self.volume_bytes % self.region_bytes;
        if last_region_bytes != 0 && self.is_dirty(self.region_count - 1) {
            bytes -= self.region_bytes - last_region_bytes;
        }
        bytes
    }

    /// The first dirty region at or after `from`, in disk order; skips clean words 64 regions at
    /// a time.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.region_count {
            return None;
        }
        let first_word = word_index(from);
        let mut word = self.words[first_word] & (u64::MAX << (from % WORD_BITS));
        let mut index = first_word;
        loop {
            if word != 0 {
                let region = index as u64 * WORD_BITS + u64::from(word.trailing_zeros());
                // Bits past the end are never set, so this always holds.
                return (region < self.region_count).then_some(region);
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }

    /// Marks every region touched by `offset .. offset + len` dirty.
    pub fn mark(&mut self, offset: u64, len: u64) {
        let regions = self.regions_of(offset, len);
        self.set_regions(regions.start, regions.end);
    }

    /// Marks every region dirty (a full resync).
    pub fn mark_all(&mut self) {
        self.set_regions(0, self.region_count);
    }

    /// Clears one region's bit. A resync must use [`DirtyMap::resync_durable`] instead, which
    /// knows whether a write raced with it.
    pub fn clear_region(&mut self, region: u64) {
        assert!(region < self.region_count);
        let index = word_index(region);
        let mask = bit_mask(region);
        if self.words[index] & mask != 0 {
            self.words[index] &= !mask;
            self.dirty_count -= 1;
            self.flag_block_of_word(index);
        }
    }

    /// Clears every bit (the copies are known to be the same).
    pub fn clear_all(&mut self) {
        for index in 0..self.words.len() {
            if self.words[index] != 0 {
                self.words[index] = 0;
                self.flag_block_of_word(index);
            }
        }
        self.dirty_count = 0;
    }

    /// Adds every dirty region of `other`, a map of the same volume (the peer's bitmap at
    /// reconnect, or the regions diverged in a split brain).
    pub fn union_with(&mut self, other: &DirtyMap) {
        assert_eq!(self.volume_bytes, other.volume_bytes);
        assert_eq!(self.region_bytes, other.region_bytes);
        for index in 0..self.words.len() {
            let added = other.words[index] & !self.words[index];
            if added != 0 {
                self.words[index] |= added;
                self.dirty_count += u64::from(added.count_ones());
                self.flag_block_of_word(index);
            }
        }
    }

    /// Writes bitmap block `block_index` in the on-disk format (see the module documentation).
    /// A block past the volume's last region encodes as zeros.
    pub fn encode_block(&self, block_index: u64, out: &mut [u8; BITMAP_BLOCK_BYTES]) {
        out.fill(0);
        for (chunk, word) in out
            .chunks_exact_mut(WORD_BYTES)
            .zip(self.block_words(block_index))
        {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }

    /// Merges bitmap block `block_index` read from disk into the map: a bit set on disk becomes
    /// set in memory, a bit already set in memory stays set. The block stays flagged as changed
    /// only if memory now holds bits the disk does not. A block past the volume's last region
    /// must be all zero. Never panics on any bytes.
    pub fn load_block(&mut self, block_index: u64, bytes: &[u8]) -> Result<(), BitmapLoadError> {
        if bytes.len() != BITMAP_BLOCK_BYTES {
            return Err(BitmapLoadError::WrongLength { bytes: bytes.len() });
        }
        // Check everything before changing anything.
        let first_region = block_index.saturating_mul(REGIONS_PER_BITMAP_BLOCK);
        for (word_in_block, chunk) in bytes.chunks_exact(WORD_BYTES).enumerate() {
            let disk = le_word(chunk);
            let first = first_region.saturating_add(word_in_block as u64 * WORD_BITS);
            if disk & !valid_mask(first, self.region_count) != 0 {
                return Err(BitmapLoadError::BitsPastVolumeEnd { block_index });
            }
        }
        let Some(first_word) = self.first_word_of_block(block_index) else {
            return Ok(());
        };
        let mut differs_from_disk = false;
        for (offset, chunk) in bytes.chunks_exact(WORD_BYTES).enumerate() {
            let Some(word) = self.words.get_mut(first_word + offset) else {
                break;
            };
            let disk = le_word(chunk);
            let added = disk & !*word;
            *word |= added;
            self.dirty_count += u64::from(added.count_ones());
            differs_from_disk |= *word != disk;
        }
        let (flag_word, flag_mask) = block_flag(block_index);
        if differs_from_disk {
            self.changed_blocks[flag_word] |= flag_mask;
        } else {
            self.changed_blocks[flag_word] &= !flag_mask;
        }
        Ok(())
    }

    /// Whether block `block_index` has changed since it was last taken for writing.
    pub fn is_block_changed(&self, block_index: u64) -> bool {
        if block_index >= self.block_count() {
            return false;
        }
        let (word, mask) = block_flag(block_index);
        self.changed_blocks[word] & mask != 0
    }

    /// Blocks changed since they were last taken for writing.
    pub fn changed_block_count(&self) -> u64 {
        self.changed_blocks
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Flags a block as changed again (its write failed), so that it is written again.
    pub fn mark_block_changed(&mut self, block_index: u64) {
        assert!(block_index < self.block_count());
        let (word, mask) = block_flag(block_index);
        self.changed_blocks[word] |= mask;
    }

    /// If block `block_index` has changed, encodes it into `out`, clears its flag and returns
    /// true (the caller writes it at `block_index * 4096` in the bitmap area).
    pub fn take_changed_block(
        &mut self,
        block_index: u64,
        out: &mut [u8; BITMAP_BLOCK_BYTES],
    ) -> bool {
        if !self.is_block_changed(block_index) {
            return false;
        }
        let (word, mask) = block_flag(block_index);
        self.changed_blocks[word] &= !mask;
        self.encode_block(block_index, out);
        true
    }

    /// Every changed block, in disk order, each encoded at the moment it is yielded and its flag
    /// cleared then. Blocks not yet yielded when the iterator is dropped stay flagged.
    pub fn take_changed_blocks(&mut self) -> ChangedBlocks<'_> {
        ChangedBlocks {
            map: self,
            next_block: 0,
        }
    }

    /// Starts the resync of one region (see the table in the module documentation).
    pub fn begin_resync(&mut self, region: u64) -> ResyncBegin {
        if !self.is_dirty(region) {
            return ResyncBegin::Clean;
        }
        if self.resync_slot(region).is_some() {
            return ResyncBegin::InFlight;
        }
        let Some(free) = self.resyncs.iter_mut().find(|slot| slot.is_none()) else {
            return ResyncBegin::Full;
        };
        *free = Some(ResyncInFlight {
            region,
            redo: false,
        });
        self.resync_in_flight_count += 1;
        ResyncBegin::Started
    }

    /// A client write to `offset .. offset + len` that did not reach the peer: marks every
    /// region it touches and sets redo on those whose resync is in flight.
    pub fn note_write(&mut self, offset: u64, len: u64) {
        self.mark(offset, len);
        self.note_redo(offset, len);
    }

    /// A client write to `offset .. offset + len` that reached both copies: only regions whose
    /// resync is in flight are affected (the resync may still land older data on the target), and
    /// they stay dirty.
    pub fn note_replicated_write(&mut self, offset: u64, len: u64) {
        self.note_redo(offset, len);
    }

    /// The region's resync is durable on the target. Clears the bit unless a write raced with
    /// the resync; returns whether it was cleared.
    pub fn resync_durable(&mut self, region: u64) -> bool {
        let slot = self
            .resync_slot(region)
            .expect("resync of the region is in flight");
        let in_flight = self.resyncs[slot].take().expect("slot is in use");
        self.resync_in_flight_count -= 1;
        if in_flight.redo {
            return false;
        }
        self.clear_region(region);
        true
    }

    /// The region's resync failed or was cancelled; its bit stays as it is.
    pub fn resync_aborted(&mut self, region: u64) {
        let slot = self
            .resync_slot(region)
            .expect("resync of the region is in flight");
        self.resyncs[slot] = None;
        self.resync_in_flight_count -= 1;
    }

    /// Every resync in flight is abandoned (the link to the peer went down).
    pub fn abort_all_resyncs(&mut self) {
        self.resyncs = [None; RESYNC_IN_FLIGHT_MAX];
        self.resync_in_flight_count = 0;
    }

    pub fn resync_in_flight_count(&self) -> usize {
        self.resync_in_flight_count
    }

    pub fn is_resync_in_flight(&self, region: u64) -> bool {
        self.resync_slot(region).is_some()
    }

    fn resync_slot(&self, region: u64) -> Option<usize> {
        self.resyncs
            .iter()
            .position(|slot| slot.is_some_and(|in_flight| in_flight.region == region))
    }

    fn note_redo(&mut self, offset: u64, len: u64) {
        let regions = self.regions_of(offset, len);
        if self.resync_in_flight_count == 0 || regions.is_empty() {
            return;
        }
        let mut touched = false;
        for in_flight in self.resyncs.iter_mut().flatten() {
            if regions.contains(&in_flight.region) {
                in_flight.redo = true;
                touched = true;
            }
        }
        if touched {
            // The bit of an in-flight region is set unless `clear_region` was called meanwhile.
            for slot in 0..RESYNC_IN_FLIGHT_MAX {
                if let Some(in_flight) = self.resyncs[slot] {
                    if regions.contains(&in_flight.region) {
                        self.set_regions(in_flight.region, in_flight.region + 1);
                    }
                }
            }
        }
    }

    /// Sets the bits of regions `first .. end`, a word at a time.
    fn set_regions(&mut self, first: u64, end: u64) {
        assert!(end <= self.region_count);
        let mut region = first;
        while region < end {
            let bit = region % WORD_BITS;
            let bits = (WORD_BITS - bit).min(end - region);
            let mask = (u64::MAX >> (WORD_BITS - bits)) << bit;
            let index = word_index(region);
            let added = mask & !self.words[index];
            if added != 0 {
                self.words[index] |= added;
                self.dirty_count += u64::from(added.count_ones());
                self.flag_block_of_word(index);
            }
            region += bits;
        }
    }

    fn flag_block_of_word(&mut self, word_index: usize) {
        let (flag_word, flag_mask) = block_flag(word_index as u64 / WORDS_PER_BLOCK);
        self.changed_blocks[flag_word] |= flag_mask;
    }

    fn first_word_of_block(&self, block_index: u64) -> Option<usize> {
        let first = usize::try_from(block_index.checked_mul(WORDS_PER_BLOCK)?).ok()?;
        (first < self.words.len()).then_some(first)
    }

    /// The in-memory words of one block (fewer than a block's worth for the last one).
    fn block_words(&self, block_index: u64) -> &[u64] {
        match self.first_word_of_block(block_index) {
            Some(first) => {
                let end = self.words.len().min(first + WORDS_PER_BLOCK as usize);
                &self.words[first..end]
            }
            None => &[],
        }
    }
}

/// The iterator of [`DirtyMap::take_changed_blocks`].
#[derive(Debug)]
pub struct ChangedBlocks<'a> {
    map: &'a mut DirtyMap,
    next_block: u64,
}

impl Iterator for ChangedBlocks<'_> {
    type Item = BitmapBlockWrite;

    fn next(&mut self) -> Option<BitmapBlockWrite> {
        let flags = &self.map.changed_blocks;
        let mut index = usize::try_from(self.next_block / WORD_BITS).ok()?;
        let mut word = *flags.get(index)? & (u64::MAX << (self.next_block % WORD_BITS));
        while word == 0 {
            index += 1;
            word = *flags.get(index)?;
        }
        let block_index = index as u64 * WORD_BITS + u64::from(word.trailing_zeros());
        self.next_block = block_index + 1;
        let mut bytes = [0; BITMAP_BLOCK_BYTES];
        let taken = self.map.take_changed_block(block_index, &mut bytes);
        assert!(taken);
        Some(BitmapBlockWrite {
            block_index,
            offset_in_bitmap: block_index * BITMAP_BLOCK_BYTES as u64,
            bytes,
        })
    }
}

fn word_index(region: u64) -> usize {
    // In range: `region < region_count`, whose word count was allocated as a usize.
    (region / WORD_BITS) as usize
}

fn bit_mask(region: u64) -> u64 {
    1 << (region % WORD_BITS)
}

/// The word and mask of a block's changed flag.
fn block_flag(block_index: u64) -> (usize, u64) {
    (
        (block_index / WORD_BITS) as usize,
        1 << (block_index % WORD_BITS),
    )
}

/// The bits of the word starting at region `first` that belong to the volume.
fn valid_mask(first: u64, region_count: u64) -> u64 {
    match region_count.saturating_sub(first) {
        0 => 0,
        regions if regions >= WORD_BITS => u64::MAX,
        regions => u64::MAX >> (WORD_BITS - regions),
    }
}

fn le_word(chunk: &[u8]) -> u64 {
    let mut bytes = [0; WORD_BYTES];
    bytes.copy_from_slice(chunk);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::REGION_BYTES;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;

    fn dirty_regions(map: &DirtyMap) -> Vec<u64> {
        (0..map.region_count())
            .filter(|&r| map.is_dirty(r))
            .collect()
    }

    #[test]
    fn mark_sets_every_region_the_write_touches_across_region_and_word_boundaries() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        // One byte before the end of region 63 to one byte into region 65: crosses a word.
        map.mark(64 * REGION_BYTES - 1, REGION_BYTES + 2);
        assert_eq!(dirty_regions(&map), vec![63, 64, 65]);
        assert_eq!(map.dirty_count(), 3);
        // A write exactly covering region 10 touches only region 10.
        map.mark(10 * REGION_BYTES, REGION_BYTES);
        assert_eq!(dirty_regions(&map), vec![10, 63, 64, 65]);
        // A zero-length write touches nothing.
        map.mark(20 * REGION_BYTES, 0);
        assert_eq!(map.dirty_count(), 4);
        // A long write spanning several whole words.
        map.mark(100 * REGION_BYTES, 300 * REGION_BYTES);
        assert_eq!(map.dirty_count(), 4 + 300);
        assert!(map.is_dirty(100) && map.is_dirty(399) && !map.is_dirty(400) && !map.is_dirty(99));
    }

    #[test]
    fn partial_last_region_counts_its_real_bytes() {
        // 1 MiB + 4 KiB: 17 regions, the last one 4 KiB long.
        let volume_bytes = MIB + 4 * KIB;
        let mut map = DirtyMap::new(volume_bytes, REGION_BYTES);
        assert_eq!(map.region_count(), 17);
        map.mark(volume_bytes - 1, 1);
        assert_eq!(dirty_regions(&map), vec![16]);
        assert_eq!(map.dirty_bytes(), 4 * KIB);
        map.mark(0, 1);
        assert_eq!(map.dirty_bytes(), REGION_BYTES + 4 * KIB);
        map.mark_all();
        assert_eq!(map.dirty_count(), 17);
        assert_eq!(map.dirty_bytes(), volume_bytes);
        assert_eq!(map.next_dirty(16), Some(16));
        assert_eq!(map.next_dirty(17), None);
    }

    #[test]
    #[should_panic(expected = "byte range inside the volume")]
    fn marking_past_the_end_of_the_volume_is_a_bug() {
        let mut map = DirtyMap::new(MIB, REGION_BYTES);
        map.mark(MIB - 1, 2);
    }

    #[test]
    fn counts_stay_right_under_mark_clear_and_union() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        map.mark(0, 3 * REGION_BYTES);
        map.mark(REGION_BYTES, 3 * REGION_BYTES); // overlaps: adds region 3 only
        assert_eq!(map.dirty_count(), 4);
        map.clear_region(1);
        map.clear_region(1); // clearing a clean region changes nothing
        assert_eq!(map.dirty_count(), 3);
        let mut other = DirtyMap::new(GIB, REGION_BYTES);
        other.mark(2 * REGION_BYTES, 4 * REGION_BYTES); // 2..6, of which 2 and 3 are dirty here
        other.mark(10_000 * REGION_BYTES, 1);
        map.union_with(&other);
        assert_eq!(dirty_regions(&map), vec![0, 2, 3, 4, 5, 10_000]);
        assert_eq!(map.dirty_count(), 6);
        map.clear_all();
        assert_eq!(map.dirty_count(), 0);
        assert_eq!(map.next_dirty(0), None);
        map.mark_all();
        assert_eq!(map.dirty_count(), map.region_count());
    }

    #[test]
    fn next_dirty_scans_in_disk_order_and_skips_clean_words() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        for region in [5, 6, 64 * 100 + 3, 16383] {
            map.mark(region * REGION_BYTES, 1);
        }
        let mut found = Vec::new();
        let mut cursor = 0;
        while let Some(region) = map.next_dirty(cursor) {
            found.push(region);
            cursor = region + 1;
        }
        assert_eq!(found, vec![5, 6, 6403, 16383]);
        assert_eq!(map.next_dirty(7), Some(6403));
        assert_eq!(map.next_dirty(6404), Some(16383));
        assert_eq!(map.next_dirty(16384), None);
    }

    #[test]
    fn encode_then_load_round_trips_every_block() {
        // 5 GiB: three blocks, the last one partial.
        let mut map = DirtyMap::new(5 * GIB, REGION_BYTES);
        assert_eq!(map.block_count(), 3);
        for region in [0, 1, 32767, 32768, 65535, 65536, map.region_count() - 1] {
            map.mark(region * REGION_BYTES, 1);
        }
        let mut loaded = DirtyMap::new(5 * GIB, REGION_BYTES);
        let mut block = [0; BITMAP_BLOCK_BYTES];
        for index in 0..map.block_count() {
            map.encode_block(index, &mut block);
            loaded
                .load_block(index, &block)
                .expect("our own block loads");
        }
        assert_eq!(dirty_regions(&loaded), dirty_regions(&map));
        assert_eq!(loaded.dirty_count(), map.dirty_count());
        // What was loaded equals the disk: nothing to write back.
        assert_eq!(loaded.changed_block_count(), 0);
    }

    #[test]
    fn bitmap_bytes_put_region_i_in_byte_i_div_8_bit_i_mod_8() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        for region in [0, 9, 63, 64, 16383] {
            map.mark(region * REGION_BYTES, 1);
        }
        let mut block = [0xAA; BITMAP_BLOCK_BYTES];
        map.encode_block(0, &mut block);
        let mut expected = [0u8; BITMAP_BLOCK_BYTES];
        expected[0] = 0x01; // region 0
        expected[1] = 0x02; // region 9
        expected[7] = 0x80; // region 63
        expected[8] = 0x01; // region 64
        expected[2047] = 0x80; // region 16383, the last of a 1 GiB volume
        assert_eq!(block, expected);
    }

    #[test]
    fn load_rejects_bits_past_the_end_of_the_volume_and_leaves_the_map_unchanged() {
        // 1 MiB + 4 KiB: regions 0..17, so bit 17 of byte 2 is past the end.
        let mut map = DirtyMap::new(MIB + 4 * KIB, REGION_BYTES);
        let mut block = [0; BITMAP_BLOCK_BYTES];
        block[0] = 0x01;
        block[2] = 0x02; // region 17
        assert_eq!(
            map.load_block(0, &block),
            Err(BitmapLoadError::BitsPastVolumeEnd { block_index: 0 })
        );
        assert_eq!(map.dirty_count(), 0);
        block[2] = 0x01; // region 16, the partial last one
        assert_eq!(map.load_block(0, &block), Ok(()));
        assert_eq!(dirty_regions(&map), vec![0, 16]);
        // A block wholly past the volume (the layout's bitmap may have one) must be zero.
        assert_eq!(map.load_block(1, &[0; BITMAP_BLOCK_BYTES]), Ok(()));
        assert_eq!(
            map.load_block(1, &[0x10; BITMAP_BLOCK_BYTES]),
            Err(BitmapLoadError::BitsPastVolumeEnd { block_index: 1 })
        );
        assert_eq!(
            map.load_block(0, &[0; 100]),
            Err(BitmapLoadError::WrongLength { bytes: 100 })
        );
    }

    #[test]
    fn load_merges_with_bits_already_set_and_flags_the_block_when_memory_has_more() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        map.mark(0, 1);
        let _ = map.take_changed_blocks().count();
        let mut block = [0; BITMAP_BLOCK_BYTES];
        block[1] = 0x01; // region 8
        map.load_block(0, &block).expect("valid block");
        assert_eq!(dirty_regions(&map), vec![0, 8]);
        assert!(map.is_block_changed(0));
    }

    #[test]
    fn changed_blocks_are_tracked_per_block_and_taken_once() {
        let mut map = DirtyMap::new(10 * GIB, REGION_BYTES);
        assert_eq!(map.block_count(), 5);
        map.mark(0, 1);
        map.mark(4 * GIB + 5 * REGION_BYTES, 1);
        map.mark(0, 1); // no bit flips: nothing new
        let taken: Vec<_> = map.take_changed_blocks().collect();
        assert_eq!(
            taken.iter().map(|w| w.block_index).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(taken[1].offset_in_bitmap, 2 * 4096);
        assert_eq!(taken[1].bytes[0], 0x20);
        assert_eq!(map.changed_block_count(), 0);
        assert_eq!(map.take_changed_blocks().count(), 0);
        // Clearing flips a bit too, and a failed write is put back.
        map.clear_region(0);
        assert!(map.is_block_changed(0));
        let mut block = [0; BITMAP_BLOCK_BYTES];
        assert!(map.take_changed_block(0, &mut block));
        assert!(!map.take_changed_block(0, &mut block));
        map.mark_block_changed(0);
        assert_eq!(
            map.take_changed_blocks().map(|w| w.block_index).next(),
            Some(0)
        );
        assert_eq!(map.block_of_offset(4 * GIB + 5 * REGION_BYTES), 2);
    }

    #[test]
    fn a_write_during_an_in_flight_resync_keeps_the_bit() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        map.mark(0, 4 * REGION_BYTES);
        assert_eq!(map.begin_resync(1), ResyncBegin::Started);
        assert_eq!(map.begin_resync(2), ResyncBegin::Started);
        assert_eq!(map.begin_resync(1), ResyncBegin::InFlight);
        assert_eq!(map.begin_resync(9), ResyncBegin::Clean);
        map.note_write(REGION_BYTES + 10, 1); // region 1 during its resync
        assert!(!map.resync_durable(1), "redo keeps the bit");
        assert!(map.is_dirty(1));
        assert!(map.resync_durable(2), "no write raced: cleared");
        assert!(!map.is_dirty(2));
        // The redo flag went with the finished resync: the next one clears.
        assert_eq!(map.begin_resync(1), ResyncBegin::Started);
        assert!(map.resync_durable(1));
        assert!(!map.is_dirty(1));
        assert_eq!(map.resync_in_flight_count(), 0);
    }

    #[test]
    fn a_replicated_write_during_an_in_flight_resync_keeps_the_bit_and_marks_nothing_else() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        map.mark(0, 1);
        assert_eq!(map.begin_resync(0), ResyncBegin::Started);
        map.note_replicated_write(0, 3 * REGION_BYTES);
        assert_eq!(dirty_regions(&map), vec![0]);
        assert!(!map.resync_durable(0));
        assert!(map.is_dirty(0));
    }

    #[test]
    fn an_aborted_resync_keeps_the_bit_and_frees_the_slot() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        map.mark(0, 1);
        assert_eq!(map.begin_resync(0), ResyncBegin::Started);
        map.resync_aborted(0);
        assert!(map.is_dirty(0));
        assert!(!map.is_resync_in_flight(0));
        assert_eq!(map.begin_resync(0), ResyncBegin::Started);
        map.abort_all_resyncs();
        assert_eq!(map.resync_in_flight_count(), 0);
    }

    #[test]
    fn resyncs_in_flight_are_bounded() {
        let mut map = DirtyMap::new(GIB, REGION_BYTES);
        map.mark_all();
        for region in 0..RESYNC_IN_FLIGHT_MAX as u64 {
            assert_eq!(map.begin_resync(region), ResyncBegin::Started);
        }
        assert_eq!(
            map.begin_resync(RESYNC_IN_FLIGHT_MAX as u64),
            ResyncBegin::Full
        );
        assert!(map.resync_durable(0));
        assert_eq!(
            map.begin_resync(RESYNC_IN_FLIGHT_MAX as u64),
            ResyncBegin::Started
        );
    }

    proptest! {
        #[test]
        fn random_bytes_into_load_block_never_panic(
            volume_regions in 1u64..70_000,
            block_index in 0u64..4,
            bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let mut map = DirtyMap::new(volume_regions * REGION_BYTES - 512, REGION_BYTES);
            let before = map.dirty_count();
            match map.load_block(block_index, &bytes) {
                Ok(()) => prop_assert!(map.dirty_count() >= before),
                Err(_) => prop_assert_eq!(map.dirty_count(), before),
            }
            prop_assert_eq!(map.dirty_count(), dirty_regions(&map).len() as u64);
        }

        #[test]
        fn count_matches_the_bits_under_random_operations(
            ops in proptest::collection::vec((0u8..4, 0u64..200, 0u64..1_000_000), 0..64),
        ) {
            let volume_bytes = 200 * REGION_BYTES - 100;
            let mut map = DirtyMap::new(volume_bytes, REGION_BYTES);
            let mut model = [false; 200];
            for (op, region, len) in ops {
                match op {
                    0 => {
                        let offset = region * REGION_BYTES;
                        let len = len.min(volume_bytes - offset);
                        map.mark(offset, len);
                        for r in map.regions_of(offset, len) {
                            model[r as usize] = true;
                        }
                    }
                    1 => {
                        map.clear_region(region);
                        model[region as usize] = false;
                    }
                    2 => {
                        let cursor = map.next_dirty(region);
                        let expected = (region..200).find(|&r| model[r as usize]);
                        prop_assert_eq!(cursor, expected);
                    }
                    _ => {
                        let mut other = DirtyMap::new(volume_bytes, REGION_BYTES);
                        other.mark(region * REGION_BYTES, 1);
                        map.union_with(&other);
                        model[region as usize] = true;
                    }
                }
                let expected: Vec<u64> = (0..200).filter(|&r| model[r as usize]).collect();
                prop_assert_eq!(dirty_regions(&map), expected.clone());
                prop_assert_eq!(map.dirty_count(), expected.len() as u64);
            }
        }
    }
}
