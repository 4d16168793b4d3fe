//! The reference model the checkers compare the volume against, and the data patterns that let
//! a read say which write put each sector there.
//!
//! # Values
//! Every write fills each 512-byte sector with a pattern derived from (seed, op id, sector): the
//! op id and sector index in the first 16 bytes, seeded pseudo-random bytes after. A read
//! decodes each sector back to a [`Value`]: `Zero` (all zeroes: never written, zeroed or
//! discarded), `Data(op)`, or nothing at all (garbage: a misplaced or corrupted sector, always a
//! violation).
//!
//! # Time
//! The model's clock ticks on every request the client sends and every reply it reads, so
//! "issued before" and "acknowledged before" are exact. A request is *issued* when the client
//! queues its bytes (never later than the node sees it: conservative), *done* when its reply is
//! read.
//!
//! # The rules (per sector)
//! Each life starts from a *base* value per sector: all zeroes on the first life, and after a
//! power cut the value the verification pass read (it was checked against the crash rules).
//! The writes issued since (writes, write-zeroes, trims) are kept per sector in issue order.
//!
//! - A write *supersedes* an earlier write `e` when it is a real write (not a trim, not failed),
//!   it succeeded, and it was issued after `e` was acknowledged: the disk cannot apply `e` after
//!   it. The base is superseded by any such write once acknowledged.
//! - A trim may zero the sector or leave it as it was: its zero value is a candidate, but it
//!   supersedes nothing. A write that failed (EIO) may or may not have landed: same treatment.
//! - **Read rule.** A read issued at `I` may return the value of any write to the sector issued
//!   before its reply, and the base, except those superseded by a write acknowledged before `I`.
//!   So an acknowledged write is what every later read sees, unless a later overlapping write
//!   was issued before the read completed; a write not yet acknowledged may or may not be seen.
//! - **Durable.** A write is durable when it was acknowledged with FUA, or acknowledged before a
//!   FLUSH was *sent* and that FLUSH was acknowledged (NBD: a flush covers the writes completed
//!   before it). Trims and failed writes are never durable.
//! - **Crash rule.** After a power cut the sector may hold the base or any write issued before
//!   the cut (acknowledged or not), except those superseded by a durable write. So it holds the
//!   newest durable value or something written later, never anything older.

use super::disk::SECTOR_BYTES;
use super::prng::{mix, Prng};
use std::fmt;

/// What a sector holds, as far as the model can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Value {
    /// All zeroes.
    Zero,
    /// The pattern written by the op with this id.
    Data(u64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Zero => write!(f, "zero"),
            Value::Data(op) => write!(f, "op#{op}"),
        }
    }
}

/// Fills one sector with the pattern of `op` at `sector`.
pub fn fill_sector(seed: u64, op: u64, sector: u64, out: &mut [u8]) {
    assert_eq!(out.len(), SECTOR_BYTES);
    assert!(
        op != 0,
        "op ids start at 1 (0 would be mistaken for zeroes)"
    );
    out[0..8].copy_from_slice(&op.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut prng = Prng::new(mix(&[seed, op, sector]));
    for chunk in out[16..].chunks_mut(8) {
        chunk.copy_from_slice(&prng.next_u64().to_le_bytes()[..chunk.len()]);
    }
}

/// Decodes one sector; `None` for bytes no write of this run produced at this sector.
pub fn decode_sector(seed: u64, sector: u64, bytes: &[u8]) -> Option<Value> {
    assert_eq!(bytes.len(), SECTOR_BYTES);
    if bytes.iter().all(|b| *b == 0) {
        return Some(Value::Zero);
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[0..8]);
    let op = u64::from_le_bytes(word);
    word.copy_from_slice(&bytes[8..16]);
    if op == 0 || u64::from_le_bytes(word) != sector {
        return None;
    }
    let mut expected = [0u8; SECTOR_BYTES];
    fill_sector(seed, op, sector, &mut expected);
    (expected[..] == *bytes).then_some(Value::Data(op))
}

/// A value shown with its sector's legal set, for violation messages.
pub fn describe(observed: Option<Value>) -> String {
    match observed {
        Some(v) => v.to_string(),
        None => "garbage".to_string(),
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    issued: u64,
    done: Option<u64>,
    ok: bool,
    /// A trim, or a write that failed: may or may not have taken effect.
    optional: bool,
    durable: bool,
    value: Value,
}

impl Record {
    /// Whether `self` overwrites every write acknowledged before it was issued, for a read (or
    /// prune) at `before`.
    fn can_supersede(&self, before: u64) -> bool {
        !self.optional && self.ok && self.done.is_some_and(|d| d < before)
    }
}

/// The reference model of one volume.
#[derive(Debug)]
pub struct Model {
    clock: u64,
    /// Records of this life's writes, indexed by op id minus `first_op`.
    records: Vec<Option<Record>>,
    first_op: Option<u64>,
    /// Per sector: op ids of the writes issued this life, in issue order.
    sectors: Vec<Vec<u64>>,
    base: Vec<Value>,
    /// Acknowledged writes not yet durable, in acknowledgement order.
    acked_volatile: Vec<u64>,
}

/// A sector's entry count above which superseded entries are pruned.
const SECTOR_ENTRIES_PRUNE: usize = 16;

impl Model {
    /// A zero-filled volume of `sectors` sectors.
    pub fn new(sectors: usize) -> Model {
        Model {
            clock: 1,
            records: Vec::new(),
            first_op: None,
            sectors: vec![Vec::new(); sectors],
            base: vec![Value::Zero; sectors],
            acked_volatile: Vec::new(),
        }
    }

    /// Sectors in the volume.
    pub fn sector_count(&self) -> usize {
        self.base.len()
    }

    /// Advances the clock; returns the new time.
    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A write (`optional`: a trim) of `value` over `count` sectors was issued now. `horizon`
    /// is the issue time of the oldest read in flight (or now), for pruning.
    pub fn issue_write(
        &mut self,
        op: u64,
        first: u64,
        count: u64,
        value: Value,
        optional: bool,
        horizon: u64,
    ) {
        let issued = self.tick();
        let record = Record {
            issued,
            done: None,
            ok: false,
            optional,
            durable: false,
            value,
        };
        let first_op = *self.first_op.get_or_insert(op);
        assert!(op >= first_op, "op ids go up");
        let index = (op - first_op) as usize;
        if self.records.len() <= index {
            self.records.resize(index + 1, None);
        }
        assert!(self.records[index].is_none(), "op {op} twice");
        self.records[index] = Some(record);
        for sector in first..first + count {
            let entries = &mut self.sectors[sector as usize];
            entries.push(op);
            if entries.len() > SECTOR_ENTRIES_PRUNE {
                self.prune(sector as usize, horizon);
            }
        }
    }

    /// The reply of write `op` was read: `ok` unless it carried an error; `fua` makes it durable.
    pub fn complete_write(&mut self, op: u64, ok: bool, fua: bool) {
        let done = self.tick();
        let Some(record) = self.record_mut(op) else {
            panic!("completion of unknown op {op}");
        };
        record.done = Some(done);
        record.ok = ok;
        if !ok {
            record.optional = true;
            return;
        }
        if fua && !record.optional {
            record.durable = true;
        } else if !record.optional {
            self.acked_volatile.push(op);
        }
    }

    /// A flush was issued; returns its issue time.
    pub fn issue_flush(&mut self) -> u64 {
        self.tick()
    }

    /// The reply of the flush issued at `issued` was read.
    pub fn complete_flush(&mut self, issued: u64, ok: bool) {
        self.tick();
        if !ok {
            return;
        }
        let mut acked_volatile = std::mem::take(&mut self.acked_volatile);
        acked_volatile.retain(|op| {
            let Some(record) = self.record_mut(*op) else {
                return false;
            };
            if record.done.is_some_and(|d| d < issued) {
                record.durable = true;
                false
            } else {
                true
            }
        });
        self.acked_volatile = acked_volatile;
    }

    fn record(&self, op: u64) -> Option<&Record> {
        let index = op.checked_sub(self.first_op?)?;
        self.records.get(index as usize)?.as_ref()
    }

    fn record_mut(&mut self, op: u64) -> Option<&mut Record> {
        let index = op.checked_sub(self.first_op?)?;
        self.records.get_mut(index as usize)?.as_mut()
    }

    /// The values a read of `sector` issued at `read_issued` may legally return now.
    pub fn read_candidates(&self, sector: usize, read_issued: u64) -> Vec<Value> {
        self.candidates(sector, |w2| w2.can_supersede(read_issued))
    }

    /// The values `sector` may legally hold after a power cut now.
    pub fn crash_candidates(&self, sector: usize) -> Vec<Value> {
        self.candidates(sector, |w2| w2.durable && w2.can_supersede(u64::MAX))
    }

    /// Checks a read of `sector` issued at `read_issued` that returned `observed`.
    pub fn check_read(
        &self,
        sector: usize,
        observed: Option<Value>,
        read_issued: u64,
    ) -> Result<(), String> {
        let legal = self.read_candidates(sector, read_issued);
        match observed {
            Some(v) if legal.contains(&v) => Ok(()),
            _ => Err(format!(
                "read of sector {sector} returned {} but only {} may be there",
                describe(observed),
                self.list(&legal)
            )),
        }
    }

    /// Checks what `sector` holds after a power cut.
    pub fn check_after_cut(&self, sector: usize, observed: Option<Value>) -> Result<(), String> {
        let legal = self.crash_candidates(sector);
        match observed {
            Some(v) if legal.contains(&v) => Ok(()),
            _ => Err(format!(
                "after a power cut sector {sector} holds {} but only {} may be there \
                 (durable data lost or older data back)",
                describe(observed),
                self.list(&legal)
            )),
        }
    }

    /// A new life starts from the verified contents of the volume.
    pub fn reset_life(&mut self, base: Vec<Value>) {
        assert_eq!(base.len(), self.base.len());
        self.base = base;
        for entries in &mut self.sectors {
            entries.clear();
        }
        self.records.clear();
        self.first_op = None;
        self.acked_volatile.clear();
    }

    fn list(&self, legal: &[Value]) -> String {
        let mut parts = Vec::new();
        for v in legal {
            let what = match v {
                Value::Data(op) => match self.record(*op) {
                    Some(r) => format!(
                        "{v}(issued={} done={:?} ok={} durable={})",
                        r.issued, r.done, r.ok, r.durable
                    ),
                    None => format!("{v}(base)"),
                },
                Value::Zero => v.to_string(),
            };
            parts.push(what);
        }
        format!("[{}]", parts.join(", "))
    }

    /// The values of `sector` not superseded by a write for which `qualifies` holds. A write
    /// `w2` supersedes `e` when `w2` was issued after `e` was done, so only the latest issue time
    /// among the qualifying writes matters.
    fn candidates(&self, sector: usize, qualifies: impl Fn(&Record) -> bool) -> Vec<Value> {
        let entries = &self.sectors[sector];
        let latest = self.latest_qualifying_issue(entries, qualifies);
        let mut legal = Vec::new();
        // The base was written before anything of this life: done at time 0.
        if latest.is_none() {
            legal.push(self.base[sector]);
        }
        for e in entries.iter().filter_map(|op| self.record(*op)) {
            let superseded = matches!((latest, e.done), (Some(l), Some(d)) if l > d);
            if !superseded && !legal.contains(&e.value) {
                legal.push(e.value);
            }
        }
        legal
    }

    fn latest_qualifying_issue(
        &self,
        entries: &[u64],
        qualifies: impl Fn(&Record) -> bool,
    ) -> Option<u64> {
        entries
            .iter()
            .filter_map(|op| self.record(*op))
            .filter(|w2| qualifies(w2))
            .map(|w2| w2.issued)
            .max()
    }

    /// Drops the entries no future read and no power cut can show: those superseded by a durable
    /// write acknowledged before `horizon` (the oldest read in flight). The newest such write is
    /// never superseded itself, so it is kept and still supersedes the base and all it pruned.
    fn prune(&mut self, sector: usize, horizon: u64) {
        let entries = std::mem::take(&mut self.sectors[sector]);
        let latest =
            self.latest_qualifying_issue(&entries, |w2| w2.durable && w2.can_supersede(horizon));
        let keep = entries
            .into_iter()
            .filter(|op| {
                let Some(e) = self.record(*op) else {
                    return false;
                };
                !matches!((latest, e.done), (Some(l), Some(d)) if l > d)
            })
            .collect();
        self.sectors[sector] = keep;
    }
}
