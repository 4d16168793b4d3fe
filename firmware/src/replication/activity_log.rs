//! The activity log: the set of "hot" 4 MiB extents of the volume, made durable before any write
//! to them is issued, so that after a primary crashes every region a write may have reached on
//! one disk only joins the resync (DESIGN.md §3 "Activity log"; DRBD's AL,
//! reference/replication-drbd-hast.md §1.4).
//!
//! This module owns the in-memory set (slots, per-extent writes in flight, LRU order), the
//! encoding of its on-disk transactions, and their recovery. It is part of the sans-IO core: it
//! says which record to write where and decodes what was read; the caller does the I/O.
//!
//! # Protocol
//!
//! 1. [`ActivityLog::begin_write`] before a write is issued anywhere (local disk or peer):
//!    - [`AlBegin::Ready`]: every extent is active and durable; issue the write now. This is the
//!      fast path, no metadata I/O.
//!    - [`AlBegin::NeedsCommit`]: the write is admitted (its extents are reserved and cannot be
//!      evicted) but must wait until transaction `transaction_number` is durable.
//!    - [`AlBegin::Full`]: nothing was reserved; no slot can take a cold extent (every slot has
//!      writes in flight or is waiting on a commit), or the next transaction has no room for
//!      more updates. Retry after an `end_write` or a `commit_durable`: back-pressure.
//! 2. Whenever [`ActivityLog::next_transaction`] returns a transaction (there are staged updates
//!    and no transaction in flight; one at a time, as DRBD), the caller:
//!    1. **if any extents were evicted** (`AlTransaction::evicted_extents`), first makes durable
//!       every changed `DirtyMap` block covering them (`DirtyMap::block_of_offset`). DRBD's rule
//!       (`drbd_bm_write_hinted` before the AL block): the bitmap is only written lazily, and
//!       while an extent is in the activity log a crash is covered by the log; the moment the
//!       log stops naming it, its dirty bits must already be on disk. This matters when the peer
//!       is absent (writes set bits); with the peer connected and in sync the blocks are clean
//!       and nothing is written;
//!    2. writes the record at `Layout::activity_log_offset + record_offset`, with a flush before
//!       it and FUA (DRBD's `REQ_PREFLUSH | REQ_FUA`): the flush makes the completed writes to
//!       evicted extents durable before the record says they are cold;
//!    3. calls [`ActivityLog::commit_durable`], and releases the writes waiting on that number
//!       (and on any lower one).
//! 3. [`ActivityLog::end_write`] when the write completed (or was cancelled after `NeedsCommit`).
//!
//! Eviction takes a free slot first, else the least recently used slot whose extent is durable
//! and has no write in flight. An extent staged or being committed is never evicted.
//!
//! # Sizing
//!
//! [`AL_EXTENT_COUNT_MAX`] = 256 extents of 4 MiB: a 1 GiB hot area. After a primary crash at
//! most 1 GiB joins the resync: about 10 s at 100 MiB/s (a gigabit link), 2 s at 500 MiB/s.
//! DRBD's sizing rule E = R·t/4 (R in MiB/s, t in s) gives 250 extents for a 10 s target on a
//! gigabit link. A larger log means fewer metadata writes for scattered workloads and a longer
//! resync after a crash.
//!
//! # On-disk record (one 4 KiB block, all integers little-endian, unnamed bytes zero)
//!
//! The ring is [`ACTIVITY_LOG_SLOTS`] records; transaction `n` lives in record `n % 64`.
//!
//! | offset | bytes | field                     | notes                                         |
//! |-------:|------:|---------------------------|-----------------------------------------------|
//! |      0 |     8 | magic                     | `b"TANDEMAL"`                                 |
//! |      8 |     4 | version                   | u32, 1                                        |
//! |     12 |     2 | slot_count                | u16, [`AL_EXTENT_COUNT_MAX`]                  |
//! |     14 |     2 | update_count              | u16, 0..=64                                   |
//! |     16 |     8 | transaction_number        | u64, >= 1, +1 per transaction                 |
//! |     24 |     8 | session_first_transaction | u64, the first number of this session         |
//! |     32 |     2 | context_start             | u16, first slot of the context, < slot_count  |
//! |     34 |     2 | context_count             | u16, <= slot_count                            |
//! |     36 |    12 | reserved                  | zero                                          |
//! |     48 |   512 | updates                   | 64 x {slot u16, zero u16, extent u32}         |
//! |    560 |  3532 | context                   | 883 x extent u32: slots `context_start ..`    |
//! |   4092 |     4 | CRC-32C                   | over bytes 0..4092                            |
//!
//! - An *update* says "slot `s` now holds extent `e`" (the extent that was in `s` is evicted).
//! - The *context* is the state of `context_count` consecutive slots (wrapping around) **after**
//!   this transaction; extent `0xFFFF_FFFF` is an empty slot. Each transaction carries the next
//!   [`AL_CONTEXT_SLOTS_PER_RECORD`] slots, so the newest [`AL_RECORDS_FOR_FULL_CONTEXT`] records
//!   name every slot, as DRBD's rolling context does.
//! - A *session* is the life of one `ActivityLog`: it starts empty, at the number after the
//!   newest record on disk. Recovery never reads a record from an earlier session: the caller
//!   has already moved that session's extents into the bitmap (see "Recovery").
//!
//! # Recovery
//!
//! [`recover`] takes the newest record whose magic, CRC, fields and ring position are right (a
//! torn or zeroed record fails those checks, so the newest *valid* one wins), then walks back
//! through consecutive transaction numbers of the same session: for each slot the newest record
//! that names it (in an update or in its context) decides its extent. It stops when every slot is
//! decided or at the session's first record (slots not named by then were never used). A record
//! missing from that walk (damage beyond one torn write) is [`AlRecoverError::Incomplete`]: the
//! caller must then resync the whole volume.
//!
//! After a crash of a primary, the caller marks [`RecoveredLog::byte_ranges`] in the `DirtyMap`
//! (for every peer, including one not yet paired: DRBD's 2026 fix), **makes those bitmap blocks
//! durable**, and only then starts `ActivityLog::new(recovered.next_transaction_number())`,
//! whose first record ends the old session.

use core::fmt;

use crate::constants::NBD_PAYLOAD_BYTES_MAX;
use crate::metadata::{ACTIVITY_LOG_SLOTS, METADATA_BLOCK_BYTES};

/// Bytes of volume per activity log extent (DRBD's `AL_EXTENT_SHIFT` 22).
pub const AL_EXTENT_BYTES: u64 = 4 << 20;

/// Extents active at once: a 1 GiB hot area (see "Sizing" in the module documentation).
pub const AL_EXTENT_COUNT_MAX: usize = 256;

/// Slot updates one transaction carries (DRBD's 64): activations batched into one record.
pub const AL_UPDATES_PER_TRANSACTION_MAX: usize = 64;

/// Slots whose state each record carries as its rolling context.
pub const AL_CONTEXT_SLOTS_PER_RECORD: usize = 64;

/// Records that together name every slot.
pub const AL_RECORDS_FOR_FULL_CONTEXT: usize =
    AL_EXTENT_COUNT_MAX.div_ceil(AL_CONTEXT_SLOTS_PER_RECORD);

/// The most extents one write can touch: the largest NBD request, not aligned.
pub const AL_EXTENTS_PER_WRITE_MAX: usize =
    (NBD_PAYLOAD_BYTES_MAX as u64).div_ceil(AL_EXTENT_BYTES) as usize + 1;

/// Bytes of one record.
pub const AL_RECORD_BYTES: usize = METADATA_BLOCK_BYTES as usize;

pub const AL_RECORD_MAGIC: [u8; 8] = *b"TANDEMAL";
pub const AL_RECORD_VERSION: u32 = 1;

/// An empty slot, in a record's context.
const NO_EXTENT: u32 = u32::MAX;

const RING_RECORDS: usize = ACTIVITY_LOG_SLOTS as usize;

const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 8;
const OFFSET_SLOT_COUNT: usize = 12;
const OFFSET_UPDATE_COUNT: usize = 14;
const OFFSET_TRANSACTION_NUMBER: usize = 16;
const OFFSET_SESSION_FIRST: usize = 24;
const OFFSET_CONTEXT_START: usize = 32;
const OFFSET_CONTEXT_COUNT: usize = 34;
const OFFSET_RESERVED: usize = 36;
const OFFSET_UPDATES: usize = 48;
const UPDATE_BYTES: usize = 8;
const OFFSET_CONTEXT: usize = OFFSET_UPDATES + AL_UPDATES_PER_TRANSACTION_MAX * UPDATE_BYTES;
const OFFSET_CRC: usize = AL_RECORD_BYTES - 4;
/// Context entries that fit in a record.
const CONTEXT_CAPACITY: usize = (OFFSET_CRC - OFFSET_CONTEXT) / 4;

const _: () = assert!(OFFSET_CONTEXT == 560 && CONTEXT_CAPACITY == 883);
const _: () = assert!(OFFSET_CONTEXT + CONTEXT_CAPACITY * 4 == OFFSET_CRC);
const _: () = assert!(AL_CONTEXT_SLOTS_PER_RECORD <= CONTEXT_CAPACITY);
const _: () = assert!(AL_CONTEXT_SLOTS_PER_RECORD <= AL_EXTENT_COUNT_MAX);
const _: () = assert!(AL_EXTENT_COUNT_MAX <= u16::MAX as usize);
// One write always fits in an empty transaction and in the slots.
const _: () = assert!(AL_EXTENTS_PER_WRITE_MAX <= AL_UPDATES_PER_TRANSACTION_MAX);
const _: () = assert!(AL_EXTENTS_PER_WRITE_MAX <= AL_EXTENT_COUNT_MAX);
// After a torn newest record, the previous full context is still in the ring.
const _: () = assert!(AL_RECORDS_FOR_FULL_CONTEXT < RING_RECORDS);

/// CRC-32C (Castagnoli), as the superblock and DRBD's activity log.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The extents touched by the bytes `offset .. offset + len` (empty when `len` is 0).
pub fn extents_of(offset: u64, len: u64) -> core::ops::Range<u64> {
    let end = offset
        .checked_add(len)
        .expect("byte range does not overflow");
    if len == 0 {
        return 0..0;
    }
    offset / AL_EXTENT_BYTES..end.div_ceil(AL_EXTENT_BYTES)
}

/// The bytes of `extent` inside a volume of `volume_bytes`, as `(offset, len)`; `None` for an
/// extent wholly past the end.
pub fn extent_byte_range(extent: u32, volume_bytes: u64) -> Option<(u64, u64)> {
    let offset = u64::from(extent) * AL_EXTENT_BYTES;
    (offset < volume_bytes).then(|| (offset, AL_EXTENT_BYTES.min(volume_bytes - offset)))
}

/// The answer to [`ActivityLog::begin_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlBegin {
    /// Every extent is durable in the log: issue the write.
    Ready,
    /// Admitted; issue the write once transaction `transaction_number` is durable.
    NeedsCommit { transaction_number: u64 },
    /// Not admitted, nothing reserved: retry after `end_write` or `commit_durable`.
    Full,
}

/// A record to write, from [`ActivityLog::next_transaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    pub transaction_number: u64,
    /// Byte offset of the record inside the ring (add `Layout::activity_log_offset`).
    pub record_offset: u64,
    /// Extents this transaction removes from the log: their bitmap blocks must be durable
    /// before the record is written (see the module documentation).
    pub evicted_extents: heapless::Vec<u32, AL_UPDATES_PER_TRANSACTION_MAX>,
}

/// Counters for operators (lesson 15: `al-writes`, hit ratio).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlStats {
    /// Writes admitted without metadata I/O.
    pub ready_count: u64,
    /// Writes that had to wait for a transaction.
    pub needs_commit_count: u64,
    /// Refusals for lack of a slot or of room in the next transaction.
    pub full_count: u64,
    /// Transactions handed out for writing.
    pub transaction_count: u64,
    /// Extents evicted.
    pub eviction_count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Activated, waiting for the next transaction; `evicted` is the durable extent it replaces.
    Staged {
        evicted: Option<u32>,
    },
    /// In the transaction being written.
    Committing,
    /// Named by a durable transaction.
    Durable,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    extent: u32,
    state: SlotState,
    writes_in_flight: u32,
    /// The value of `use_clock` when a write last began on it: the LRU order.
    last_used: u64,
}

const FREE_SLOT: Slot = Slot {
    extent: NO_EXTENT,
    state: SlotState::Free,
    writes_in_flight: 0,
    last_used: 0,
};

/// The in-memory activity log of one session; see the module documentation.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    slots: [Slot; AL_EXTENT_COUNT_MAX],
    session_first_transaction: u64,
    /// The number the next transaction handed out gets; staged updates wait for it.
    next_transaction_number: u64,
    transaction_in_flight: Option<u64>,
    staged_count: usize,
    /// First slot of the next record's context.
    context_start: usize,
    use_clock: u64,
    stats: AlStats,
}

impl ActivityLog {
    /// An empty log whose first transaction is `first_transaction_number`, which must be higher
    /// than every number in the ring: [`RecoveredLog::next_transaction_number`] (or, after a
    /// failed recovery, the `next_transaction_number` of [`AlRecoverError::Incomplete`]).
    pub fn new(first_transaction_number: u64) -> ActivityLog {
        assert!(first_transaction_number >= 1);
        ActivityLog {
            slots: [FREE_SLOT; AL_EXTENT_COUNT_MAX],
            session_first_transaction: first_transaction_number,
            next_transaction_number: first_transaction_number,
            transaction_in_flight: None,
            staged_count: 0,
            context_start: 0,
            use_clock: 0,
            stats: AlStats::default(),
        }
    }

    /// Admits a write to `offset .. offset + len` (see the module documentation). A write of
    /// zero bytes touches no extent and is always `Ready`.
    pub fn begin_write(&mut self, offset: u64, len: u64) -> AlBegin {
        let extents = extents_of(offset, len);
        let count = (extents.end - extents.start) as usize;
        assert!(
            count <= AL_EXTENTS_PER_WRITE_MAX,
            "write spans too many extents"
        );
        assert!(
            extents.end <= u64::from(NO_EXTENT),
            "extent numbers fit in u32"
        );
        let mut slot_of_extent = [None; AL_EXTENTS_PER_WRITE_MAX];
        let mut cold_count = 0;
        for (found, extent) in slot_of_extent.iter_mut().zip(extents.clone()) {
            *found = self.slot_of(extent as u32);
            cold_count += usize::from(found.is_none());
        }
        let slot_of_extent = &mut slot_of_extent[..count];
        if cold_count > 0 {
            if self.staged_count + cold_count > AL_UPDATES_PER_TRANSACTION_MAX {
                self.stats.full_count += 1;
                return AlBegin::Full;
            }
            // Choose every victim before changing anything: all or nothing.
            let mut victims = [0; AL_EXTENTS_PER_WRITE_MAX];
            for chosen in 0..cold_count {
                match self.least_recently_used_victim(slot_of_extent, &victims[..chosen]) {
                    Some(slot) => victims[chosen] = slot,
                    None => {
                        self.stats.full_count += 1;
                        return AlBegin::Full;
                    }
                }
            }
            let mut victims = victims[..cold_count].iter();
            for (found, extent) in slot_of_extent.iter_mut().zip(extents) {
                if found.is_none() {
                    let slot = *victims.next().expect("one victim per cold extent");
                    self.stage(slot, extent as u32);
                    *found = Some(slot);
                }
            }
        }
        self.use_clock += 1;
        let mut wait_for = None;
        for &slot in slot_of_extent.iter().flatten() {
            let slot = &mut self.slots[slot];
            slot.writes_in_flight += 1;
            slot.last_used = self.use_clock;
            let transaction_number = match slot.state {
                SlotState::Durable => continue,
                SlotState::Staged { .. } => self.next_transaction_number,
                SlotState::Committing => self
                    .transaction_in_flight
                    .expect("a committing slot has its transaction in flight"),
                SlotState::Free => unreachable!("an extent's slot is in use"),
            };
            wait_for = wait_for.max(Some(transaction_number));
        }
        match wait_for {
            None => {
                self.stats.ready_count += 1;
                AlBegin::Ready
            }
            Some(transaction_number) => {
                self.stats.needs_commit_count += 1;
                AlBegin::NeedsCommit { transaction_number }
            }
        }
    }

    /// The write to `offset .. offset + len` admitted by `begin_write` completed or was
    /// cancelled.
    pub fn end_write(&mut self, offset: u64, len: u64) {
        for extent in extents_of(offset, len) {
            let slot = u32::try_from(extent)
                .ok()
                .and_then(|extent| self.slot_of(extent))
                .expect("the extent of a write in flight is active");
            let slot = &mut self.slots[slot];
            assert!(slot.writes_in_flight > 0, "end_write matches a begin_write");
            slot.writes_in_flight -= 1;
        }
    }

    /// Encodes the next transaction into `out` if there are staged updates and no transaction in
    /// flight. The caller writes it as the module documentation says, then calls
    /// `commit_durable`.
    pub fn next_transaction(&mut self, out: &mut [u8; AL_RECORD_BYTES]) -> Option<AlTransaction> {
        if self.transaction_in_flight.is_some() || self.staged_count == 0 {
            return None;
        }
        let transaction_number = self.next_transaction_number;
        self.next_transaction_number = transaction_number
            .checked_add(1)
            .expect("transaction numbers do not run out");
        let mut updates = [(0u16, 0u32); AL_UPDATES_PER_TRANSACTION_MAX];
        let mut update_count = 0;
        let mut evicted_extents = heapless::Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let SlotState::Staged { evicted } = slot.state {
                updates[update_count] = (index as u16, slot.extent);
                update_count += 1;
                if let Some(extent) = evicted {
                    evicted_extents
                        .push(extent)
                        .expect("at most one eviction per update");
                }
                slot.state = SlotState::Committing;
            }
        }
        assert_eq!(update_count, self.staged_count);
        self.staged_count = 0;

        let context_start = self.context_start;
        let context_count = AL_CONTEXT_SLOTS_PER_RECORD;
        self.context_start = (context_start + context_count) % AL_EXTENT_COUNT_MAX;

        out.fill(0);
        out[OFFSET_MAGIC..OFFSET_MAGIC + 8].copy_from_slice(&AL_RECORD_MAGIC);
        put_u32(out, OFFSET_VERSION, AL_RECORD_VERSION);
        put_u16(out, OFFSET_SLOT_COUNT, AL_EXTENT_COUNT_MAX as u16);
        put_u16(out, OFFSET_UPDATE_COUNT, update_count as u16);
        put_u64(out, OFFSET_TRANSACTION_NUMBER, transaction_number);
        put_u64(out, OFFSET_SESSION_FIRST, self.session_first_transaction);
        put_u16(out, OFFSET_CONTEXT_START, context_start as u16);
        put_u16(out, OFFSET_CONTEXT_COUNT, context_count as u16);
        for (entry, &(slot, extent)) in updates[..update_count].iter().enumerate() {
            let at = OFFSET_UPDATES + entry * UPDATE_BYTES;
            put_u16(out, at, slot);
            put_u32(out, at + 4, extent);
        }
        for entry in 0..context_count {
            let slot = &self.slots[(context_start + entry) % AL_EXTENT_COUNT_MAX];
            let extent = match slot.state {
                SlotState::Free => NO_EXTENT,
                _ => slot.extent,
            };
            put_u32(out, OFFSET_CONTEXT + entry * 4, extent);
        }
        let crc = CRC32C.checksum(&out[..OFFSET_CRC]);
        put_u32(out, OFFSET_CRC, crc);

        self.transaction_in_flight = Some(transaction_number);
        self.stats.transaction_count += 1;
        self.stats.eviction_count += evicted_extents.len() as u64;
        Some(AlTransaction {
            transaction_number,
            record_offset: (transaction_number % ACTIVITY_LOG_SLOTS) * METADATA_BLOCK_BYTES,
            evicted_extents,
        })
    }

    /// The record of `transaction_number`, the transaction in flight, is durable: the writes
    /// waiting on it (or on a lower number) may be issued.
    pub fn commit_durable(&mut self, transaction_number: u64) {
        assert_eq!(
            self.transaction_in_flight,
            Some(transaction_number),
            "only the transaction in flight becomes durable"
        );
        for slot in &mut self.slots {
            if slot.state == SlotState::Committing {
                slot.state = SlotState::Durable;
            }
        }
        self.transaction_in_flight = None;
    }

    /// The highest durable transaction of this session (one less than its first if none).
    pub fn durable_transaction_number(&self) -> u64 {
        let next_unwritten = self.next_transaction_number;
        match self.transaction_in_flight {
            Some(in_flight) => in_flight - 1,
            None => next_unwritten - 1,
        }
    }

    pub fn transaction_in_flight(&self) -> Option<u64> {
        self.transaction_in_flight
    }

    /// Whether activations wait for the next transaction.
    pub fn has_staged_updates(&self) -> bool {
        self.staged_count > 0
    }

    /// Whether `extent` holds a slot (durable, being committed, or staged).
    pub fn is_active(&self, extent: u32) -> bool {
        self.slot_of(extent).is_some()
    }

    /// Whether `extent` is named by a durable transaction.
    pub fn is_durable(&self, extent: u32) -> bool {
        self.slot_of(extent)
            .is_some_and(|slot| self.slots[slot].state == SlotState::Durable)
    }

    pub fn writes_in_flight(&self, extent: u32) -> u32 {
        self.slot_of(extent)
            .map_or(0, |slot| self.slots[slot].writes_in_flight)
    }

    pub fn active_extent_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.state != SlotState::Free)
            .count()
    }

    /// Active extents, in slot order.
    pub fn active_extents(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .filter(|slot| slot.state != SlotState::Free)
            .map(|slot| slot.extent)
    }

    pub fn stats(&self) -> AlStats {
        self.stats
    }

    /// A linear scan: 256 slots fit in a few cache lines, and this replaces a metadata write.
    fn slot_of(&self, extent: u32) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.extent == extent && slot.state != SlotState::Free)
    }

    /// A free slot, else the least recently used durable slot with no write in flight, leaving
    /// out the slots of the write being admitted and the victims already chosen for it.
    fn least_recently_used_victim(
        &self,
        slots_of_write: &[Option<usize>],
        chosen: &[usize],
    ) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|&(index, _)| {
                !chosen.contains(&index) && !slots_of_write.contains(&Some(index))
            })
            .filter_map(|(index, slot)| match slot.state {
                SlotState::Free => Some(((0, 0), index)),
                SlotState::Durable if slot.writes_in_flight == 0 => {
                    Some(((1, slot.last_used), index))
                }
                _ => None,
            })
            .min()
            .map(|(_, index)| index)
    }

    fn stage(&mut self, slot: usize, extent: u32) {
        let previous = self.slots[slot];
        let evicted = match previous.state {
            SlotState::Free => None,
            SlotState::Durable => Some(previous.extent),
            SlotState::Staged { .. } | SlotState::Committing => {
                unreachable!("only free or durable slots are victims")
            }
        };
        assert_eq!(previous.writes_in_flight, 0);
        self.slots[slot] = Slot {
            extent,
            state: SlotState::Staged { evicted },
            writes_in_flight: 0,
            last_used: previous.last_used,
        };
        self.staged_count += 1;
    }
}

/// The active set found in the ring after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredLog {
    /// Sorted, distinct.
    extents: heapless::Vec<u32, AL_EXTENT_COUNT_MAX>,
    /// 0 when the ring holds no valid record.
    newest_transaction_number: u64,
}

impl RecoveredLog {
    /// The extents that were active (sorted): after a crash of a primary they join the resync.
    pub fn extents(&self) -> &[u32] {
        &self.extents
    }

    /// The extents as byte ranges `(offset, len)` of a volume of `volume_bytes`, clamped to it,
    /// ready for `DirtyMap::mark`.
    pub fn byte_ranges(&self, volume_bytes: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.extents
            .iter()
            .filter_map(move |&extent| extent_byte_range(extent, volume_bytes))
    }

    /// The newest valid transaction in the ring; 0 if there is none.
    pub fn newest_transaction_number(&self) -> u64 {
        self.newest_transaction_number
    }

    /// Where the next session starts.
    pub fn next_transaction_number(&self) -> u64 {
        self.newest_transaction_number + 1
    }
}

/// Why the active set could not be rebuilt. Either way the caller resyncs the whole volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlRecoverError {
    /// The caller passed a ring that is not [`ACTIVITY_LOG_SLOTS`] records.
    RingSize { records: usize },
    /// A record needed to name every slot is missing or damaged.
    Incomplete {
        newest_transaction_number: u64,
        missing_transaction_number: u64,
        /// Where the next session must start (above every valid record in the ring).
        next_transaction_number: u64,
    },
}

impl fmt::Display for AlRecoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlRecoverError::RingSize { records } => write!(
                f,
                "activity log ring of {records} records, expected {RING_RECORDS}"
            ),
            AlRecoverError::Incomplete {
                newest_transaction_number,
                missing_transaction_number,
                ..
            } => write!(
                f,
                "activity log transaction {missing_transaction_number} is missing or damaged, \
                 so the active set at transaction {newest_transaction_number} is unknown"
            ),
        }
    }
}

impl std::error::Error for AlRecoverError {}

/// Rebuilds the active set from the ring read from disk (record `i` at
/// `Layout::activity_log_offset + i * 4096`); see "Recovery" in the module documentation.
/// Never panics on any bytes.
pub fn recover(records: &[[u8; AL_RECORD_BYTES]]) -> Result<RecoveredLog, AlRecoverError> {
    if records.len() != RING_RECORDS {
        return Err(AlRecoverError::RingSize {
            records: records.len(),
        });
    }
    // Each record is checked once; a valid record sits at its own ring position.
    let mut valid: [Option<RecordView<'_>>; RING_RECORDS] = [None; RING_RECORDS];
    for (position, (slot, bytes)) in valid.iter_mut().zip(records).enumerate() {
        *slot = RecordView::parse(bytes)
            .filter(|record| record.transaction_number() % ACTIVITY_LOG_SLOTS == position as u64);
    }
    let record_of = |transaction_number: u64| {
        valid[(transaction_number % ACTIVITY_LOG_SLOTS) as usize]
            .filter(|record| record.transaction_number() == transaction_number)
    };
    let newest = valid
        .iter()
        .flatten()
        .max_by_key(|record| record.transaction_number());
    let Some(newest) = newest else {
        return Ok(RecoveredLog {
            extents: heapless::Vec::new(),
            newest_transaction_number: 0,
        });
    };
    let newest_transaction_number = newest.transaction_number();
    let session_first = newest.session_first_transaction();

    let mut slots = [NO_EXTENT; AL_EXTENT_COUNT_MAX];
    let mut decided = [false; AL_EXTENT_COUNT_MAX];
    let mut undecided_count = AL_EXTENT_COUNT_MAX;
    let mut transaction_number = newest_transaction_number;
    for _ in 0..RING_RECORDS {
        let Some(record) = record_of(transaction_number)
            .filter(|record| record.session_first_transaction() == session_first)
        else {
            break;
        };
        // Updates and context of one record agree; a newer record decided first.
        for (slot, extent) in record.updates().chain(record.context()) {
            if !decided[slot] {
                decided[slot] = true;
                slots[slot] = extent;
                undecided_count -= 1;
            }
        }
        if undecided_count == 0 || transaction_number == session_first {
            slots.sort_unstable();
            let mut extents = heapless::Vec::<u32, AL_EXTENT_COUNT_MAX>::new();
            for extent in slots.into_iter().filter(|&extent| extent != NO_EXTENT) {
                if extents.last() != Some(&extent) {
                    // At most one per slot: always fits.
                    let _ = extents.push(extent);
                }
            }
            return Ok(RecoveredLog {
                extents,
                newest_transaction_number,
            });
        }
        transaction_number -= 1;
    }
    Err(AlRecoverError::Incomplete {
        newest_transaction_number,
        missing_transaction_number: transaction_number,
        next_transaction_number: newest_transaction_number + 1,
    })
}

/// A record that passed every check: its getters cannot fail.
#[derive(Debug, Clone, Copy)]
struct RecordView<'a> {
    bytes: &'a [u8; AL_RECORD_BYTES],
}

impl<'a> RecordView<'a> {
    /// `None` unless magic, CRC, version, counts, slot numbers and zero padding are all right.
    fn parse(bytes: &'a [u8; AL_RECORD_BYTES]) -> Option<RecordView<'a>> {
        if bytes[OFFSET_MAGIC..OFFSET_MAGIC + 8] != AL_RECORD_MAGIC {
            return None;
        }
        if CRC32C.checksum(&bytes[..OFFSET_CRC]) != get_u32(bytes, OFFSET_CRC) {
            return None;
        }
        let record = RecordView { bytes };
        let slot_count = usize::from(get_u16(bytes, OFFSET_SLOT_COUNT));
        let update_count = record.update_count();
        let (context_start, context_count) = record.context_range();
        let transaction_number = record.transaction_number();
        let session_first = record.session_first_transaction();
        let header_ok = get_u32(bytes, OFFSET_VERSION) == AL_RECORD_VERSION
            && slot_count == AL_EXTENT_COUNT_MAX
            && update_count <= AL_UPDATES_PER_TRANSACTION_MAX
            && transaction_number >= 1
            && (1..=transaction_number).contains(&session_first)
            && context_start < AL_EXTENT_COUNT_MAX
            && context_count <= AL_EXTENT_COUNT_MAX
            && is_zero(&bytes[OFFSET_RESERVED..OFFSET_UPDATES]);
        if !header_ok {
            return None;
        }
        let updates_ok = (0..AL_UPDATES_PER_TRANSACTION_MAX).all(|entry| {
            let at = OFFSET_UPDATES + entry * UPDATE_BYTES;
            if entry < update_count {
                usize::from(get_u16(bytes, at)) < AL_EXTENT_COUNT_MAX && get_u16(bytes, at + 2) == 0
            } else {
                is_zero(&bytes[at..at + UPDATE_BYTES])
            }
        });
        let context_padding_ok = is_zero(&bytes[OFFSET_CONTEXT + context_count * 4..OFFSET_CRC]);
        (updates_ok && context_padding_ok).then_some(record)
    }

    fn transaction_number(&self) -> u64 {
        get_u64(self.bytes, OFFSET_TRANSACTION_NUMBER)
    }

    fn session_first_transaction(&self) -> u64 {
        get_u64(self.bytes, OFFSET_SESSION_FIRST)
    }

    fn update_count(&self) -> usize {
        usize::from(get_u16(self.bytes, OFFSET_UPDATE_COUNT))
    }

    fn context_range(&self) -> (usize, usize) {
        (
            usize::from(get_u16(self.bytes, OFFSET_CONTEXT_START)),
            usize::from(get_u16(self.bytes, OFFSET_CONTEXT_COUNT)),
        )
    }

    /// `(slot, extent)` pairs; slots checked by `parse`.
    fn updates(self) -> impl Iterator<Item = (usize, u32)> + 'a {
        let bytes = self.bytes;
        (0..self.update_count()).map(move |entry| {
            let at = OFFSET_UPDATES + entry * UPDATE_BYTES;
            (usize::from(get_u16(bytes, at)), get_u32(bytes, at + 4))
        })
    }

    /// `(slot, extent)` pairs of the context, wrapping around the slots.
    fn context(self) -> impl Iterator<Item = (usize, u32)> + 'a {
        let bytes = self.bytes;
        let (start, count) = self.context_range();
        (0..count).map(move |entry| {
            (
                (start + entry) % AL_EXTENT_COUNT_MAX,
                get_u32(bytes, OFFSET_CONTEXT + entry * 4),
            )
        })
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&byte| byte == 0)
}

fn put_u16(out: &mut [u8; AL_RECORD_BYTES], offset: usize, value: u16) {
    out[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut [u8; AL_RECORD_BYTES], offset: usize, value: u32) {
    out[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut [u8; AL_RECORD_BYTES], offset: usize, value: u64) {
    out[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

fn get_u16(bytes: &[u8; AL_RECORD_BYTES], offset: usize) -> u16 {
    let mut value = [0; 2];
    value.copy_from_slice(&bytes[offset..offset + 2]);
    u16::from_le_bytes(value)
}

fn get_u32(bytes: &[u8; AL_RECORD_BYTES], offset: usize) -> u32 {
    let mut value = [0; 4];
    value.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(value)
}

fn get_u64(bytes: &[u8; AL_RECORD_BYTES], offset: usize) -> u64 {
    let mut value = [0; 8];
    value.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const E: u64 = AL_EXTENT_BYTES;
    type Ring = Vec<[u8; AL_RECORD_BYTES]>;

    fn zero_ring() -> Ring {
        vec![[0; AL_RECORD_BYTES]; RING_RECORDS]
    }

    fn fresh_log() -> ActivityLog {
        let recovered = recover(&zero_ring()).expect("a zeroed ring recovers");
        ActivityLog::new(recovered.next_transaction_number())
    }

    /// Writes the next transaction into the ring and makes it durable, if there is one.
    fn persist(log: &mut ActivityLog, ring: &mut Ring) -> Option<AlTransaction> {
        let mut record = [0; AL_RECORD_BYTES];
        let transaction = log.next_transaction(&mut record)?;
        ring[(transaction.record_offset / METADATA_BLOCK_BYTES) as usize] = record;
        log.commit_durable(transaction.transaction_number);
        Some(transaction)
    }

    /// One complete write to `extent`: admitted, committed if needed, completed.
    fn write_extent(log: &mut ActivityLog, ring: &mut Ring, extent: u64) -> Option<AlTransaction> {
        let begin = log.begin_write(extent * E, 4096);
        assert_ne!(begin, AlBegin::Full);
        let transaction = persist(log, ring);
        log.end_write(extent * E, 4096);
        transaction
    }

    fn active_set(log: &ActivityLog) -> BTreeSet<u32> {
        log.active_extents().collect()
    }

    fn recovered_set(ring: &Ring) -> BTreeSet<u32> {
        recover(ring)
            .expect("ring recovers")
            .extents()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn a_hot_extent_takes_the_fast_path_without_metadata_io() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        assert_eq!(
            log.begin_write(5 * E, 8192),
            AlBegin::NeedsCommit {
                transaction_number: 1
            }
        );
        persist(&mut log, &mut ring).expect("a transaction for the cold extent");
        log.end_write(5 * E, 8192);
        assert_eq!(log.begin_write(5 * E + 4096, 4096), AlBegin::Ready);
        assert!(!log.has_staged_updates());
        let mut record = [0; AL_RECORD_BYTES];
        assert_eq!(log.next_transaction(&mut record), None);
        assert_eq!(log.writes_in_flight(5), 1);
        assert_eq!(log.stats().ready_count, 1);
        assert_eq!(log.stats().transaction_count, 1);
    }

    #[test]
    fn a_zero_length_write_touches_no_extent() {
        let mut log = fresh_log();
        assert_eq!(log.begin_write(7 * E, 0), AlBegin::Ready);
        assert_eq!(log.active_extent_count(), 0);
        log.end_write(7 * E, 0);
    }

    #[test]
    fn a_cold_extent_needs_a_commit_and_its_writes_wait_for_that_transaction() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        let mut record = [0; AL_RECORD_BYTES];
        assert_eq!(
            log.begin_write(0, 4096),
            AlBegin::NeedsCommit {
                transaction_number: 1
            }
        );
        let first = log.next_transaction(&mut record).expect("staged update");
        assert_eq!(first.transaction_number, 1);
        assert!(first.evicted_extents.is_empty());
        // Same extent while its transaction is in flight: wait for the same number.
        assert_eq!(
            log.begin_write(4096, 4096),
            AlBegin::NeedsCommit {
                transaction_number: 1
            }
        );
        // Another cold extent goes into the next transaction; a write spanning both waits for
        // the later one.
        assert_eq!(
            log.begin_write(E - 4096, 8192),
            AlBegin::NeedsCommit {
                transaction_number: 2
            }
        );
        assert_eq!(
            log.next_transaction(&mut record),
            None,
            "one transaction in flight at a time"
        );
        assert!(!log.is_durable(0));
        log.commit_durable(1);
        assert!(log.is_durable(0) && !log.is_durable(1) && log.is_active(1));
        assert_eq!(log.durable_transaction_number(), 1);
        let second = persist(&mut log, &mut ring).expect("the staged extent");
        assert_eq!(second.transaction_number, 2);
        assert!(log.is_durable(1));
        assert_eq!(log.writes_in_flight(0), 3);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_idle_extent() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in 0..AL_EXTENT_COUNT_MAX as u64 {
            log.begin_write(extent * E, 4096);
            if extent % 64 == 63 {
                persist(&mut log, &mut ring);
            }
        }
        persist(&mut log, &mut ring);
        for extent in 0..AL_EXTENT_COUNT_MAX as u64 {
            log.end_write(extent * E, 4096);
        }
        assert_eq!(log.active_extent_count(), AL_EXTENT_COUNT_MAX);
        // Touch extent 0 again: extent 1 becomes the least recently used.
        assert_eq!(log.begin_write(0, 4096), AlBegin::Ready);
        log.end_write(0, 4096);
        // Extent 2 is busy: it is skipped.
        assert_eq!(log.begin_write(2 * E, 4096), AlBegin::Ready);

        let transaction = write_extent(&mut log, &mut ring, 1000).expect("a commit");
        assert_eq!(transaction.evicted_extents.as_slice(), &[1]);
        let transaction = write_extent(&mut log, &mut ring, 1001).expect("a commit");
        assert_eq!(transaction.evicted_extents.as_slice(), &[3]);
        assert!(!log.is_active(1) && !log.is_active(3));
        assert!(log.is_active(0) && log.is_active(2) && log.is_active(1000));
        assert_eq!(log.active_extent_count(), AL_EXTENT_COUNT_MAX);
        assert_eq!(log.stats().eviction_count, 2);
    }

    #[test]
    fn full_when_every_slot_has_writes_in_flight() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in 0..AL_EXTENT_COUNT_MAX as u64 {
            assert_ne!(log.begin_write(extent * E, 4096), AlBegin::Full);
            if extent % 64 == 63 {
                persist(&mut log, &mut ring);
            }
        }
        assert_eq!(log.begin_write(5000 * E, 4096), AlBegin::Full);
        assert_eq!(log.writes_in_flight(5000), 0);
        assert!(!log.has_staged_updates(), "a refusal reserves nothing");
        log.end_write(17 * E, 4096);
        assert_eq!(
            log.begin_write(5000 * E, 4096),
            AlBegin::NeedsCommit {
                transaction_number: 5
            }
        );
        let transaction = persist(&mut log, &mut ring).expect("a commit");
        assert_eq!(transaction.evicted_extents.as_slice(), &[17]);
        assert_eq!(log.stats().full_count, 1);
    }

    #[test]
    fn a_write_spanning_cold_extents_is_admitted_all_or_nothing() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in 0..AL_EXTENT_COUNT_MAX as u64 {
            log.begin_write(extent * E, 4096);
            if extent % 64 == 63 {
                persist(&mut log, &mut ring);
            }
        }
        log.end_write(0, 4096);
        // Two cold extents, one idle slot: refused, and extent 0 stays.
        assert_eq!(log.begin_write(900 * E, 2 * E), AlBegin::Full);
        assert!(log.is_durable(0) && !log.is_active(900) && !log.is_active(901));
        log.end_write(E, 4096);
        assert_eq!(
            log.begin_write(900 * E, 2 * E),
            AlBegin::NeedsCommit {
                transaction_number: 5
            }
        );
    }

    #[test]
    fn full_when_the_next_transaction_has_no_room_for_more_updates() {
        let mut log = fresh_log();
        let mut record = [0; AL_RECORD_BYTES];
        // Transaction 1 in flight; 64 more activations fill transaction 2.
        log.begin_write(0, 4096);
        log.next_transaction(&mut record).expect("transaction 1");
        for extent in 1..=AL_UPDATES_PER_TRANSACTION_MAX as u64 {
            assert_eq!(
                log.begin_write(extent * E, 4096),
                AlBegin::NeedsCommit {
                    transaction_number: 2
                }
            );
        }
        assert_eq!(log.begin_write(100 * E, 4096), AlBegin::Full);
        // A hot extent is still admitted.
        assert_eq!(
            log.begin_write(E, 4096),
            AlBegin::NeedsCommit {
                transaction_number: 2
            }
        );
        log.commit_durable(1);
        let transaction = log.next_transaction(&mut record).expect("transaction 2");
        assert_eq!(transaction.transaction_number, 2);
        assert_eq!(
            log.begin_write(100 * E, 4096),
            AlBegin::NeedsCommit {
                transaction_number: 3
            }
        );
    }

    #[test]
    fn transaction_numbers_increase_and_records_go_round_the_ring() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        let mut previous = 0;
        for extent in 0..150 {
            let transaction = write_extent(&mut log, &mut ring, extent).expect("cold extent");
            assert_eq!(transaction.transaction_number, previous + 1);
            assert_eq!(
                transaction.record_offset,
                (transaction.transaction_number % 64) * 4096
            );
            previous = transaction.transaction_number;
        }
        assert_eq!(log.durable_transaction_number(), 150);
    }

    #[test]
    fn recovery_after_many_transactions_rebuilds_exactly_the_active_set() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        // A scattered workload with some hot extents: evictions and ring wrap-around.
        let mut transactions = 0;
        for step in 0u64..2000 {
            let extent = if step % 3 == 0 {
                step % 7
            } else {
                (step * 7919) % 1500
            };
            if write_extent(&mut log, &mut ring, extent).is_some() {
                transactions += 1;
                if transactions % 7 == 0 {
                    assert_eq!(recovered_set(&ring), active_set(&log), "after step {step}");
                }
            }
        }
        assert!(
            transactions > 3 * RING_RECORDS,
            "the ring wrapped several times"
        );
        let recovered = recover(&ring).expect("ring recovers");
        assert_eq!(recovered.newest_transaction_number(), transactions as u64);
        assert_eq!(recovered.extents().len(), AL_EXTENT_COUNT_MAX);
    }

    #[test]
    fn recovery_of_the_first_few_transactions_rebuilds_the_active_set() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in [3, 9] {
            write_extent(&mut log, &mut ring, extent);
            assert_eq!(recovered_set(&ring), active_set(&log));
        }
        assert_eq!(recovered_set(&ring), BTreeSet::from([3, 9]));
    }

    #[test]
    fn recovery_with_the_newest_record_torn_falls_back_to_the_previous_one() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for step in 0..300 {
            write_extent(&mut log, &mut ring, (step * 37) % 700);
        }
        let before = active_set(&log);
        let newest_before = recover(&ring)
            .expect("recovers")
            .newest_transaction_number();
        // The next record is torn: its first half reached the disk over the old record.
        log.begin_write(5000 * E, 4096);
        let mut record = [0; AL_RECORD_BYTES];
        let transaction = log.next_transaction(&mut record).expect("cold extent");
        let position = (transaction.record_offset / 4096) as usize;
        ring[position][..2048].copy_from_slice(&record[..2048]);
        let recovered = recover(&ring).expect("falls back");
        assert_eq!(recovered.newest_transaction_number(), newest_before);
        assert_eq!(recovered_set(&ring), before);
        assert!(!before.contains(&5000));
        // Zeroed instead of torn: the same.
        ring[position] = [0; AL_RECORD_BYTES];
        assert_eq!(recovered_set(&ring), before);
        // Written completely: the new extent is there.
        ring[position] = record;
        assert!(recovered_set(&ring).contains(&5000));
    }

    #[test]
    fn an_all_zero_ring_recovers_to_empty() {
        let recovered = recover(&zero_ring()).expect("recovers");
        assert!(recovered.extents().is_empty());
        assert_eq!(recovered.newest_transaction_number(), 0);
        assert_eq!(recovered.next_transaction_number(), 1);
    }

    #[test]
    fn a_ring_of_the_wrong_size_is_refused() {
        assert_eq!(
            recover(&vec![[0; AL_RECORD_BYTES]; 3]),
            Err(AlRecoverError::RingSize { records: 3 })
        );
    }

    #[test]
    fn a_damaged_record_inside_the_context_window_is_reported() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in 0..100 {
            write_extent(&mut log, &mut ring, extent);
        }
        // Transaction 98 is needed: the newest (100) and 99 name only 128 slots.
        ring[98 % 64][100] ^= 1;
        assert_eq!(
            recover(&ring),
            Err(AlRecoverError::Incomplete {
                newest_transaction_number: 100,
                missing_transaction_number: 98,
                next_transaction_number: 101,
            })
        );
    }

    #[test]
    fn a_new_session_does_not_inherit_the_previous_sessions_extents() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in 0..10 {
            write_extent(&mut log, &mut ring, extent);
        }
        let recovered = recover(&ring).expect("recovers");
        assert_eq!(recovered.extents().len(), 10);
        let mut log = ActivityLog::new(recovered.next_transaction_number());
        write_extent(&mut log, &mut ring, 500).expect("cold extent");
        assert_eq!(recovered_set(&ring), BTreeSet::from([500]));
        // Before the new session wrote anything, the old set is what the ring says.
        let mut log = ActivityLog::new(recover(&ring).expect("ok").next_transaction_number());
        assert_eq!(recovered_set(&ring), BTreeSet::from([500]));
        write_extent(&mut log, &mut ring, 501);
        assert_eq!(recovered_set(&ring), BTreeSet::from([501]));
    }

    #[test]
    fn recovered_byte_ranges_are_clamped_to_the_volume() {
        let mut log = fresh_log();
        let mut ring = zero_ring();
        for extent in [0, 2, 3] {
            write_extent(&mut log, &mut ring, extent);
        }
        let recovered = recover(&ring).expect("recovers");
        let volume_bytes = 2 * E + 4096;
        assert_eq!(
            recovered.byte_ranges(volume_bytes).collect::<Vec<_>>(),
            vec![(0, E), (2 * E, 4096)]
        );
    }

    #[test]
    fn record_layout_is_pinned() {
        let mut log = fresh_log();
        let mut record = [0; AL_RECORD_BYTES];
        log.begin_write(0x0102 * E, 4096);
        let transaction = log.next_transaction(&mut record).expect("cold extent");
        assert_eq!(transaction.transaction_number, 1);
        assert_eq!(&record[0..8], b"TANDEMAL");
        assert_eq!(&record[8..12], &[1, 0, 0, 0]); // version
        assert_eq!(&record[12..14], &[0, 1]); // 256 slots
        assert_eq!(&record[14..16], &[1, 0]); // one update
        assert_eq!(&record[16..24], &[1, 0, 0, 0, 0, 0, 0, 0]); // transaction 1
        assert_eq!(&record[24..32], &[1, 0, 0, 0, 0, 0, 0, 0]); // session starts at 1
        assert_eq!(&record[32..36], &[0, 0, 64, 0]); // context: slots 0..64
        assert_eq!(&record[36..48], &[0; 12]);
        assert_eq!(&record[48..56], &[0, 0, 0, 0, 0x02, 0x01, 0, 0]); // slot 0 <- extent 0x102
        assert_eq!(&record[560..564], &[0x02, 0x01, 0, 0]); // context slot 0
        assert_eq!(&record[564..568], &[0xFF; 4]); // context slot 1: empty
        assert!(record[568 + 62 * 4..4092].iter().all(|&b| b == 0));
        let crc = CRC32C.checksum(&record[..4092]);
        assert_eq!(&record[4092..], &crc.to_le_bytes());
        // The next context starts where this one ended.
        log.commit_durable(1);
        log.begin_write(E, 4096);
        log.next_transaction(&mut record).expect("cold extent");
        assert_eq!(&record[32..36], &[64, 0, 64, 0]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Begin {
            extent: u64,
            offset_in_extent: u64,
            len: u64,
        },
        End {
            pick: usize,
        },
        Transaction,
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..400, 0u64..E, 1u64..=2 * E).prop_map(|(extent, offset_in_extent, len)| {
                Op::Begin { extent, offset_in_extent, len }
            }),
            3 => any::<usize>().prop_map(|pick| Op::End { pick }),
            1 => Just(Op::Transaction),
            1 => Just(Op::Commit),
        ]
    }

    proptest! {
        // Each check of recovery CRCs 256 KiB, slow in debug builds.
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_writes_keep_the_log_within_capacity_and_their_extents_active(
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut log = fresh_log();
            let mut ring = zero_ring();
            let mut record = [0; AL_RECORD_BYTES];
            let mut in_flight: Option<u64> = None;
            // Admitted writes: (offset, len, transaction waited for).
            let mut writes: Vec<(u64, u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Begin { extent, offset_in_extent, len } => {
                        let offset = extent * E + offset_in_extent;
                        match log.begin_write(offset, len) {
                            AlBegin::Ready => writes.push((offset, len, 0)),
                            AlBegin::NeedsCommit { transaction_number } => {
                                writes.push((offset, len, transaction_number));
                            }
                            AlBegin::Full => {}
                        }
                    }
                    Op::End { pick } => {
                        if !writes.is_empty() {
                            let (offset, len, _) = writes.swap_remove(pick % writes.len());
                            log.end_write(offset, len);
                        }
                    }
                    Op::Transaction => {
                        if let Some(transaction) = log.next_transaction(&mut record) {
                            prop_assert!(in_flight.is_none());
                            ring[(transaction.record_offset / 4096) as usize] = record;
                            in_flight = Some(transaction.transaction_number);
                        }
                    }
                    Op::Commit => {
                        if let Some(transaction_number) = in_flight.take() {
                            log.commit_durable(transaction_number);
                            // Every write allowed to run now is covered by what a crash
                            // would recover.
                            let recovered = recover(&ring).expect("our own ring recovers");
                            for &(offset, len, waited) in &writes {
                                if waited <= log.durable_transaction_number() {
                                    for extent in extents_of(offset, len) {
                                        prop_assert!(recovered
                                            .extents()
                                            .contains(&(extent as u32)));
                                    }
                                }
                            }
                        }
                    }
                }
                prop_assert!(log.active_extent_count() <= AL_EXTENT_COUNT_MAX);
                let mut expected_in_flight = std::collections::BTreeMap::new();
                for &(offset, len, _) in &writes {
                    for extent in extents_of(offset, len) {
                        *expected_in_flight.entry(extent as u32).or_insert(0u32) += 1;
                    }
                }
                for (&extent, &count) in &expected_in_flight {
                    prop_assert!(log.is_active(extent));
                    prop_assert_eq!(log.writes_in_flight(extent), count);
                }
                let active = active_set(&log);
                prop_assert_eq!(active.len(), log.active_extent_count(), "distinct extents");
            }
        }

        #[test]
        fn random_bytes_into_recover_never_panic(
            seeds in proptest::collection::vec((any::<u8>(), any::<u64>(), 0usize..4096), 64),
            with_valid_header in any::<bool>(),
        ) {
            let mut ring = zero_ring();
            for (position, (fill, word, at)) in seeds.into_iter().enumerate() {
                let record = &mut ring[position];
                record.fill(fill);
                let at = at.min(AL_RECORD_BYTES - 8);
                record[at..at + 8].copy_from_slice(&word.to_le_bytes());
                if with_valid_header {
                    // Past the magic and the CRC, so the field checks are what is exercised.
                    record[..8].copy_from_slice(&AL_RECORD_MAGIC);
                    let crc = CRC32C.checksum(&record[..OFFSET_CRC]);
                    record[OFFSET_CRC..].copy_from_slice(&crc.to_le_bytes());
                }
            }
            if let Ok(recovered) = recover(&ring) {
                prop_assert!(recovered.extents().len() <= AL_EXTENT_COUNT_MAX);
            }
        }

        #[test]
        fn damaged_records_of_a_real_ring_never_panic_recovery(
            extents in proptest::collection::vec(0u64..600, 1..120),
            patches in proptest::collection::vec((0usize..64, 0usize..4096, any::<u8>()), 1..16),
            fix_crc in any::<bool>(),
        ) {
            let mut log = fresh_log();
            let mut ring = zero_ring();
            for extent in extents {
                write_extent(&mut log, &mut ring, extent);
            }
            for (position, at, value) in patches {
                ring[position][at] = value;
                if fix_crc {
                    let crc = CRC32C.checksum(&ring[position][..OFFSET_CRC]);
                    ring[position][OFFSET_CRC..].copy_from_slice(&crc.to_le_bytes());
                }
            }
            let _ = recover(&ring);
        }
    }
}
