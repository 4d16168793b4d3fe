//! A simulated backing device with the crash semantics of a real disk's volatile cache.
//!
//! What it owns: the durable bytes of the volume, and for each 512-byte sector the versions
//! written since it was last made durable, oldest first (the "volatile layer"). Reads see the
//! newest version. A request takes effect when it *completes*, after a latency drawn from the
//! options, so completions come out of order.
//!
//! Durability, as `board/src/disk.rs` promises it:
//! - a write is volatile when it completes, unless it is FUA (durable at completion);
//! - a flush makes durable every write that completed before the flush was *submitted*;
//! - `Discard` either zeroes its range (like `WriteZeroes`) or does nothing, chosen per request;
//!   with FUA the effect is durable at completion, like a write's.
//!
//! A power cut keeps or loses each volatile version of each sector independently (a torn write
//! keeps some of its sectors and loses others), keeps the newest version kept, and drops every
//! request in flight without completing it.
//!
//! Faults: a request may fail with EIO (`fault_per_million`); a failed request changes nothing.
//! The mutation option `lie` makes the disk acknowledge flushes and FUA writes without making
//! anything durable: with it on, the checkers must find lost acknowledged writes.

use super::prng::Prng;
use std::collections::{BTreeMap, BTreeSet};
use tandem_board::{DiskCompletion, DiskDone, DiskError, DiskRequest, Extent};

/// Bytes in one sector: the unit of tearing.
pub const SECTOR_BYTES: usize = 512;

/// EIO, as the kernel reports it.
pub const EIO: i32 = 5;

/// How the simulated disk behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// Shortest completion latency.
    pub latency_ms_min: u64,
    /// Longest completion latency.
    pub latency_ms_max: u64,
    /// Probability (per million) that a request fails with EIO.
    pub fault_per_million: u32,
    /// Probability (per million) that a power cut loses one volatile version of one sector.
    pub lose_per_million: u32,
    /// Probability (per million) that a discard zeroes its range (otherwise it does nothing).
    pub discard_zeroes_per_million: u32,
    /// Mutation: flushes and FUA writes complete without making anything durable.
    pub lie: bool,
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions {
            latency_ms_min: 0,
            latency_ms_max: 3,
            fault_per_million: 0,
            lose_per_million: 500_000,
            discard_zeroes_per_million: 500_000,
            lie: false,
        }
    }
}

#[derive(Debug)]
struct Pending {
    request: DiskRequest,
    /// For a flush: the last completion sequence number it covers.
    covers_seq: u64,
    fails: bool,
}

/// What a power cut did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Requests in flight that vanished.
    pub requests_dropped: usize,
    /// Sectors that had volatile versions.
    pub sectors_volatile: usize,
    /// Volatile versions kept (written back before the power went).
    pub versions_kept: usize,
    /// Volatile versions lost.
    pub versions_lost: usize,
}

/// The simulated disk.
#[derive(Debug)]
pub struct SimDisk {
    options: DiskOptions,
    prng: Prng,
    durable: Vec<u8>,
    /// Per sector: (completion sequence number, bytes), oldest first.
    volatile: Vec<Vec<(u64, Box<[u8]>)>>,
    dirty: BTreeSet<usize>,
    /// Completion sequence number of the last request that completed.
    seq: u64,
    pending: BTreeMap<u64, Pending>,
    faults_injected: u64,
}

impl SimDisk {
    /// A zero-filled disk of `size_bytes` (a multiple of [`SECTOR_BYTES`]).
    pub fn new(size_bytes: u64, options: DiskOptions, prng: Prng) -> SimDisk {
        assert_eq!(size_bytes % SECTOR_BYTES as u64, 0, "size not in sectors");
        let sectors = (size_bytes / SECTOR_BYTES as u64) as usize;
        SimDisk {
            options,
            prng,
            durable: vec![0; size_bytes as usize],
            volatile: vec![Vec::new(); sectors],
            dirty: BTreeSet::new(),
            seq: 0,
            pending: BTreeMap::new(),
            faults_injected: 0,
        }
    }

    /// The options in force.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// Changes the EIO rate from now on.
    pub fn set_fault_per_million(&mut self, per_million: u32) {
        self.options.fault_per_million = per_million;
    }

    /// Changes the share of volatile versions a power cut loses.
    pub fn set_lose_per_million(&mut self, per_million: u32) {
        self.options.lose_per_million = per_million;
    }

    /// Requests that completed with an injected error so far.
    pub fn faults_injected(&self) -> u64 {
        self.faults_injected
    }

    /// Requests in flight.
    pub fn in_flight_count(&self) -> usize {
        self.pending.len()
    }

    /// Takes a request; returns after how many milliseconds it completes.
    pub fn submit(&mut self, tag: u64, request: DiskRequest) -> u64 {
        assert!(
            !self.pending.contains_key(&tag),
            "disk tag {tag} submitted twice"
        );
        let (offset, len) = request_extent(&request);
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.durable.len() as u64),
            "disk request past the end: offset={offset} len={len}"
        );
        let fails = self.prng.chance(self.options.fault_per_million);
        let latency_ms = self
            .prng
            .range(self.options.latency_ms_min, self.options.latency_ms_max);
        self.pending.insert(
            tag,
            Pending {
                request,
                covers_seq: self.seq,
                fails,
            },
        );
        latency_ms
    }

    /// Completes the request submitted as `tag`, applying its effect now.
    pub fn complete(&mut self, tag: u64) -> DiskCompletion {
        let Some(pending) = self.pending.remove(&tag) else {
            panic!("disk completion for tag {tag} that is not in flight");
        };
        self.seq += 1;
        if pending.fails {
            self.faults_injected += 1;
            return failed_completion(tag, pending.request);
        }
        let result = match pending.request {
            DiskRequest::Read { offset, mut buf } => {
                self.read_into(offset, buf.as_mut_slice());
                DiskDone::Buf(buf)
            }
            DiskRequest::Write { offset, buf, fua } => {
                self.write(offset, buf.as_slice(), fua);
                DiskDone::Buf(buf)
            }
            DiskRequest::Flush => {
                if !self.options.lie {
                    self.make_durable_up_to(pending.covers_seq);
                }
                DiskDone::Done
            }
            DiskRequest::Discard { offset, len, fua } => {
                if self.prng.chance(self.options.discard_zeroes_per_million) {
                    self.write(offset, &vec![0; len as usize], fua);
                }
                DiskDone::Done
            }
            DiskRequest::WriteZeroes {
                offset, len, fua, ..
            } => {
                self.write(offset, &vec![0; len as usize], fua);
                DiskDone::Done
            }
            DiskRequest::MapExtents { len, .. } => allocated_extents(len),
        };
        DiskCompletion {
            tag,
            result: Ok(result),
            buf: None,
        }
    }

    /// The power goes: volatile versions are kept or lost sector by sector, requests in flight
    /// vanish.
    pub fn power_cut(&mut self) -> CutReport {
        let mut report = CutReport {
            requests_dropped: self.pending.len(),
            sectors_volatile: self.dirty.len(),
            ..CutReport::default()
        };
        self.pending.clear();
        for sector in std::mem::take(&mut self.dirty) {
            let mut survivor = None;
            for (_, bytes) in std::mem::take(&mut self.volatile[sector]) {
                if self.prng.chance(self.options.lose_per_million) {
                    report.versions_lost += 1;
                } else {
                    report.versions_kept += 1;
                    survivor = Some(bytes);
                }
            }
            if let Some(bytes) = survivor {
                let at = sector * SECTOR_BYTES;
                self.durable[at..at + SECTOR_BYTES].copy_from_slice(&bytes);
            }
        }
        report
    }

    /// What a read of `sector` would return now.
    pub fn sector(&self, sector: usize) -> &[u8] {
        match self.volatile[sector].last() {
            Some((_, bytes)) => bytes,
            None => &self.durable[sector * SECTOR_BYTES..(sector + 1) * SECTOR_BYTES],
        }
    }

    fn read_into(&self, offset: u64, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let at = offset as usize + done;
            let sector = at / SECTOR_BYTES;
            let within = at % SECTOR_BYTES;
            let n = (SECTOR_BYTES - within).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.sector(sector)[within..within + n]);
            done += n;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let seq = self.seq;
        let durable_now = fua && !self.options.lie;
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let sector = at / SECTOR_BYTES;
            let within = at % SECTOR_BYTES;
            let n = (SECTOR_BYTES - within).min(data.len() - done);
            let mut bytes: Box<[u8]> = self.sector(sector).into();
            bytes[within..within + n].copy_from_slice(&data[done..done + n]);
            if durable_now {
                // The newest version, made durable: every older version is overwritten.
                self.volatile[sector].clear();
                self.dirty.remove(&sector);
                let base = sector * SECTOR_BYTES;
                self.durable[base..base + SECTOR_BYTES].copy_from_slice(&bytes);
            } else {
                self.volatile[sector].push((seq, bytes));
                self.dirty.insert(sector);
            }
            done += n;
        }
    }

    fn make_durable_up_to(&mut self, covers_seq: u64) {
        let dirty: Vec<usize> = self.dirty.iter().copied().collect();
        for sector in dirty {
            let versions = &mut self.volatile[sector];
            let covered = versions.iter().filter(|(s, _)| *s <= covers_seq).count();
            if covered == 0 {
                continue;
            }
            let newest_covered = versions[covered - 1].1.clone();
            versions.drain(..covered);
            if versions.is_empty() {
                self.dirty.remove(&sector);
            }
            let at = sector * SECTOR_BYTES;
            self.durable[at..at + SECTOR_BYTES].copy_from_slice(&newest_covered);
        }
    }
}

/// The bytes a request touches, as `(offset, len)` (a flush touches none).
pub fn request_extent(request: &DiskRequest) -> (u64, u64) {
    match request {
        DiskRequest::Read { offset, buf } | DiskRequest::Write { offset, buf, .. } => {
            (*offset, buf.len() as u64)
        }
        DiskRequest::Flush => (0, 0),
        DiskRequest::Discard { offset, len, .. }
        | DiskRequest::WriteZeroes { offset, len, .. }
        | DiskRequest::MapExtents { offset, len } => (*offset, *len),
    }
}

/// The completion of a request that failed with EIO: it changed nothing, and its buffer comes
/// back.
pub fn failed_completion(tag: u64, request: DiskRequest) -> DiskCompletion {
    let buf = match request {
        DiskRequest::Read { buf, .. } | DiskRequest::Write { buf, .. } => Some(buf),
        _ => None,
    };
    DiskCompletion {
        tag,
        result: Err(DiskError { errno: EIO }),
        buf,
    }
}

/// What `MapExtents` of `len` bytes finds: one allocated extent (a simulated disk has no holes).
pub fn allocated_extents(len: u64) -> DiskDone {
    let mut extents = heapless::Vec::new();
    let _ = extents.push(Extent {
        len,
        is_hole: false,
    });
    DiskDone::Extents(Box::new(extents))
}
