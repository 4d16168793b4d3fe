//! Data generations: the persistent identifiers that say which data a copy holds, and the one
//! decision taken when the two nodes reconnect.
//!
//! This module is pure: no I/O, no clock, no randomness. New generation ids are drawn by the
//! caller (non-zero, random 64-bit) and passed in; persisting the result is the caller's job,
//! in the order each method's documentation gives.
//!
//! # The identifiers (DRBD's UUIDs, reference/replication-drbd-hast.md §1.9)
//!
//! - `current`: names the data on this node's disk. It changes whenever this copy starts to
//!   differ from the peer's without the peer following (a write while the peer's copy is not
//!   updated), and when this node adopts its resync source's data.
//! - `bitmap`: the peer's `current` when this node started recording changes in its dirty
//!   bitmap; 0 when not tracking. "My bitmap holds every region I changed since your
//!   generation `bitmap`": if the peer still has that generation, copying those regions makes
//!   it equal to this node.
//! - `history`: this node's own older currents, newest first: the ancestry of its data. A peer
//!   whose `current` is here holds an ancestor of this node's data, but the dirty bitmap no
//!   longer covers the difference, so only a full copy is safe.
//!
//! 0 means "none" everywhere, and never matches anything.
//!
//! **Invariant**: a generation id that a node's `current` once held and then left never comes
//! back as that node's `current` (as far as `bitmap` and `history` remember it). Every new
//! current is either a fresh id ([`Generations::start_new_generation`],
//! [`Generations::begin_resync_as_source`] on a roll-back) or the current of the resync source,
//! which [`Generations::begin_resync_as_source`] makes sure the target never held. So an id names
//! one content of the volume for ever, and two copies with equal currents hold the same data.
//!
//! # Life of the identifiers (when the node calls what)
//!
//! | event | call |
//! |---|---|
//! | first write with the peer's copy not updated: degrade procedure (DESIGN.md §4 rule 2), forced promotion | [`Generations::start_new_generation`] |
//! | a resync starts (any kind), on the source | [`Generations::begin_resync_as_source`] |
//! | a resync starts, on the target | none: persist `Inconsistent` before the first resync write |
//! | the target has every region durable | [`Generations::resync_finished_as_target`], then the source calls [`Generations::resync_finished_as_source`] |
//! | [`decide`] says `InSync` and a node's `bitmap` is not 0 | that node calls [`Generations::resync_finished_as_source`] (a resync whose end it did not record) |
//! | split brain: `resolve-split-brain --keep NODE` | the other node persists `Inconsistent`; [`decide`] then picks rows 12/14 |
//!
//! Takeover by the secondary does not start a generation by itself: like DRBD 9 and HAST, the
//! first write does (through the degrade procedure or forced promotion), so a promotion that
//! never wrote cannot cause a split brain.
//!
//! # `never_written` and initial pairing (DESIGN.md §3 "Identity")
//!
//! A device initialized by tandem has a random `current` and the `NEVER_WRITTEN` superblock flag.
//! Two such devices pair without copying (rule 16: the non-preferred adopts the preferred's
//! generations through an empty bitmap resync; a fresher disk state outranks the preference).
//! When only one device was never written, the **written** one is the source of a full copy
//! whichever node is preferred (rule 17): a never-written device holds nothing anyone wrote, and
//! copying it over the other would erase the only copy of that data. (DESIGN.md §3 says "the
//! preferred node's data is copied in full"; this reads it as the case where the preferred node
//! is the one holding data, which is the only case where that is safe.) Two written
//! devices with unrelated generations are never mirrored (rule 19): the operator reinitializes
//! the one to overwrite, which makes it never written.
//!
//! How the flag is cleared safely (the engine's job; this module only reads it): before the
//! first data write of any kind reaches the device (a client write on a primary, a mirrored write
//! on a secondary, a resync write on a target), the node persists its superblock with
//! `NEVER_WRITTEN` cleared, and only then issues the write. Clearing it before the write is
//! *acknowledged* is the minimum (an unacknowledged write may be lost anyway); clearing it before
//! it is *issued* costs the same single superblock write once per device life and also keeps a
//! crashed node from pairing "in sync" while its disk holds a write the peer never saw. Adopting
//! the preferred's generations at pairing does not clear it (still nothing written), nor does
//! starting a generation. Note that two never-written devices start "in sync" with whatever
//! bytes their disks held: only regions that are written are identical, which is all a
//! filesystem created on the volume reads; a verify before the first full write may report the
//! rest.

/// How many older currents a node remembers.
pub const HISTORY_GENERATIONS: usize = 2;

/// The persistent generation identifiers of one node's copy of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Generations {
    /// The data on this disk. Never 0 on an initialized device.
    pub current: u64,
    /// The peer's `current` when this node started tracking changes in its dirty bitmap; 0 when
    /// not tracking.
    pub bitmap: u64,
    /// Older currents of this node, newest first; 0 = empty slot.
    pub history: [u64; HISTORY_GENERATIONS],
}

impl Generations {
    /// Whether `id` appears in any field (0 never does).
    pub fn contains(&self, id: u64) -> bool {
        id != 0 && (self.current == id || self.bitmap == id || self.history.contains(&id))
    }

    /// Whether `id` may become a new generation of this node: non-zero and used nowhere here.
    /// A caller that draws a random id retries until this holds (a clash has odds 2^-62).
    pub fn is_fresh_id(&self, id: u64) -> bool {
        id != 0 && !self.contains(id)
    }

    /// Called on the first write while the peer's copy is not being updated: at the end of the
    /// degrade procedure (before the held replies are released), or on a forced promotion. The
    /// caller persists the result (with the dirty bits of in-flight writes, or the activity log)
    /// before acknowledging any write of the new generation.
    ///
    /// If this node was not tracking yet, it starts tracking against its current (the last
    /// state the peer is known to share); if it was, the bitmap keeps its older, still-correct
    /// base. `new_id` must satisfy [`Generations::is_fresh_id`].
    pub fn start_new_generation(&mut self, new_id: u64) {
        assert!(
            self.is_fresh_id(new_id),
            "new generation id {new_id:#x} is not fresh"
        );
        if self.bitmap == 0 {
            self.bitmap = self.current;
        }
        self.push_history(self.current);
        self.current = new_id;
    }

    /// Called by the resync source when a resync starts (every kind, also when one resumes),
    /// after [`decide`] chose this node as source against a peer whose generations are
    /// `target`. Before persisting the result, the caller persists the dirty bitmap the resync
    /// will walk: every region for a full resync, the union of both nodes' bitmaps otherwise.
    ///
    /// - `bitmap` becomes the target's current: should the resync be interrupted (either node
    ///   crashes, the link drops) the next [`decide`] resumes it as a bitmap resync (rule 7)
    ///   over the regions not yet copied, also after a full resync.
    /// - If the target ever held this node's `current` (a roll-back: rules 3, 9, 10 after an
    ///   operator discarded the newer copy), this node first moves to `new_id`, so that the
    ///   target never gets an id back it once left. `new_id` must be fresh on both nodes
    ///   ([`Generations::is_fresh_id`] here, absent from `target`); it is used only in that case.
    pub fn begin_resync_as_source(&mut self, target: &Generations, new_id: u64) {
        assert!(
            target.current != 0,
            "decide() never makes a source against current 0"
        );
        assert!(
            self.is_fresh_id(new_id) && !target.contains(new_id),
            "new generation id {new_id:#x} is not fresh"
        );
        if target.contains(self.current) {
            self.push_history(self.current);
            self.current = new_id;
        }
        self.bitmap = target.current;
    }

    /// Called by the resync source once the target has recorded the end of the resync
    /// ([`Generations::resync_finished_as_target`] persisted), or when [`decide`] says `InSync`
    /// while `bitmap` is not 0. Bitmap tracking ends.
    ///
    /// The bitmap id is *not* pushed into `history`, unlike DRBD: it is either already there (it
    /// was this node's current when tracking started) or a foreign id (the target's current
    /// before a full resync), which says nothing about this node's ancestry and would push a
    /// real ancestor out of the two slots.
    pub fn resync_finished_as_source(&mut self) {
        self.bitmap = 0;
    }

    /// Called by the resync target when every region is durable on its disk: it now holds
    /// exactly the source's data, so it takes the source's current and ancestry, and tracks
    /// nothing. Persisted in one superblock write together with clearing `Inconsistent`,
    /// before the source is told (so that a crash in between leaves equal currents, rule 4/5,
    /// rather than an Inconsistent target, which would need a full resync).
    ///
    /// `source` is the source's generations as of the end of the resync (after its
    /// [`Generations::begin_resync_as_source`], before its
    /// [`Generations::resync_finished_as_source`]).
    pub fn resync_finished_as_target(&mut self, source: &Generations) {
        assert!(
            source.current != 0,
            "decide() never makes a source of current 0"
        );
        *self = Generations {
            current: source.current,
            bitmap: 0,
            history: source.history,
        };
    }

    fn push_history(&mut self, id: u64) {
        if id == 0 || self.history.contains(&id) {
            return;
        }
        self.history.copy_within(0..HISTORY_GENERATIONS - 1, 1);
        self.history[0] = id;
    }
}

/// How current a node's copy is, as far as it knows (persisted, except `UpToDate`, which a node
/// only claims while it is primary or connected and in sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFreshness {
    /// Known to hold the newest data.
    UpToDate,
    /// Whole, freshness unknown (every node after boot, DESIGN.md §4 rule 9).
    Consistent,
    /// Whole, but the peer may have written since (a secondary that lost its peer and did not
    /// take over).
    Outdated,
    /// Not whole: a resync target interrupted mid-way, or a copy the operator discarded.
    Inconsistent,
}

impl DiskFreshness {
    /// Higher is fresher: the order in which sides are preferred as a source.
    fn rank(self) -> u8 {
        match self {
            DiskFreshness::UpToDate => 3,
            DiskFreshness::Consistent => 2,
            DiskFreshness::Outdated => 1,
            DiskFreshness::Inconsistent => 0,
        }
    }
}

/// What a node tells its peer at connect time, beside its generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationState {
    pub generations: Generations,
    pub disk: DiskFreshness,
    /// Initialized by tandem and never written since (a fresh device).
    pub never_written: bool,
    /// It was primary and did not shut down cleanly: its activity-log regions may differ from
    /// the peer's and must join the resync.
    pub crashed_primary: bool,
}

/// One of the two nodes, from the point of view of the node that calls [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Local,
    Peer,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Peer,
            Side::Peer => Side::Local,
        }
    }
}

/// What to do with the data at reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same generation: nothing to copy (beyond the activity-log regions of a crashed primary,
    /// see [`Decision::resync_activity_log_from`]).
    InSync,
    /// Copy the regions in the union of both nodes' dirty bitmaps from `source` to the other.
    BitmapResync { source: Side },
    /// Copy everything from `source` to the other.
    FullResync { source: Side },
    /// Both wrote independently since they last agreed: refuse, keep both, report the diverged
    /// regions (the union of both bitmaps), wait for the operator.
    SplitBrain,
    /// No common history at all (or a malformed current of 0): another volume. Never mirror;
    /// report.
    Unrelated,
    /// Related copies, but neither may be a source: both are Inconsistent, or the only newer
    /// copy is Outdated while the other is UpToDate. Refuse, keep both, wait for the operator.
    NoEligibleSource,
}

impl SyncDecision {
    /// The node data is copied from, if any is.
    pub fn source(self) -> Option<Side> {
        match self {
            SyncDecision::BitmapResync { source } | SyncDecision::FullResync { source } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub sync: SyncDecision,
    /// `Some(side)`: the activity-log regions of every node whose `crashed_primary` is set join
    /// the resync, copied from `side` (the source of a bitmap resync; for `InSync`, see rule 5).
    /// `None` when no node crashed as primary, when everything is copied anyway (full resync),
    /// or when nothing is copied (refusals; the crash flag stays set until a later resync).
    pub resync_activity_log_from: Option<Side>,
    /// The row of the case table beside [`decide`] that fired (for events, logs and tests).
    pub rule: u8,
}

// The case table. `S` is a side whose data is newer by the generations ("ahead"), `T` the
// other. Rows are tried in order; each row that has a direction applies to both sides alike,
// so swapping local and peer (and the preference) swaps the source and keeps the row.
//
//  #  | condition                                            | decision
// ----+------------------------------------------------------+------------------------------------
//  1  | a current is 0                                       | Unrelated (tandem never persists 0)
//  2  | both Inconsistent                                    | NoEligibleSource
//  3  | currents equal, one Inconsistent                     | FullResync from the other
//  4  | currents equal, no crashed primary                   | InSync
//  5  | currents equal, a crashed primary                    | InSync, AL regions from the fresher
//     |                                                      |   side; tie: the non-crashed; tie:
//     |                                                      |   the preferred
//  6  | each side is ahead of the other (ids contradict)     | one Inconsistent: FullResync from
//     |                                                      |   the other; else SplitBrain
//  7  | S.bitmap == T.current                                | BitmapResync from S (+AL from S)
//  8  | T.current in S.history (bitmap no longer covers it)  | FullResync from S
//  9  | as 7, but S Inconsistent                             | BitmapResync from T (roll S back)
// 10  | as 8, but S Inconsistent                             | FullResync from T (roll S back)
// 11  | as 7/8, S Outdated and T UpToDate                    | NoEligibleSource
// 12  | bitmaps equal, non-zero; one Inconsistent            | BitmapResync from the other (+AL)
// 13  | bitmaps equal, non-zero                              | SplitBrain (common parent)
// 14  | any other id in common; one Inconsistent             | FullResync from the other
// 15  | any other id in common                               | SplitBrain (no usable bitmap)
// 16  | nothing in common, both never written                | BitmapResync (empty) from the
//     |                                                      |   fresher side; tie: the preferred
// 17  | nothing in common, one never written                 | FullResync from the written side
// 18  | as 17, but the written side is Inconsistent, or      | NoEligibleSource
//     |   Outdated against an UpToDate never-written side    |
// 19  | nothing in common, both written                      | Unrelated
//
// "+AL": when a node crashed as primary, its activity-log regions join the bitmap resync, from
// the source. A full resync copies them anyway.
//
// Why each row:
//  1  A device tandem initialized always has a non-zero current; 0 comes only from a corrupt or
//     foreign peer. DRBD's "just created" rules (current 0) are replaced by `never_written`.
//  2  Neither copy is whole; copying a partial copy over another partial one loses data.
//  3  Equal currents say "same data", but one side is not whole: only the operator's
//     invalidate (or a bug) gets here. Its bitmap cannot say which regions are missing.
//  4  Nobody wrote alone since the two agreed; unacknowledged writes in flight at a disconnect
//     are the engine's (degrade marks them dirty and starts a generation before acknowledging).
//     A node whose bitmap is still set clears it (an earlier resync whose end it missed).
//  5  A crashed primary's in-flight writes may be on its own disk only, or on the peer's only.
//     No acknowledged write is at stake (protocol C: acknowledged = on both disks), so either
//     copy is a valid crash image; what matters is that the regions end identical and that the
//     copy clients may already have read wins. The survivor, if it took over, is UpToDate and
//     may have served reads of those regions: it must be the source. A node that just booted is
//     Consistent; an Outdated one never beats a fresher one. When freshness ties, the node that
//     did not crash is taken (DRBD instead takes the crashed primary when both are secondary:
//     one rule for both cases is simpler, and the survivor held every acknowledged write); when
//     both crashed, the preferred node.
//  6  Cannot arise from the transitions (ids are fresh): no bitmap can be trusted, so as rows
//     14/15: a discarded side gets everything, otherwise refuse.
//  7  The normal case after one node was absent: S tracked every change since T's generation.
//  8  T's generation is an ancestor of S's data but not S's bitmap base (S's bitmap was reset by
//     a resync with another disk since): only a full copy is safe. DRBD's history-self/peer.
//  9  S is newer but was discarded by the operator (marked Inconsistent): S's bitmap holds
//     exactly the regions S changed since T's generation, so copying them from T rolls S back.
// 10  As 9 without a usable bitmap.
// 11  The generations say S is newer, the disk states say T is: one of them is wrong, and
//     copying either way could discard the newest data. (An Outdated S against a Consistent T
//     is fine: T just booted and knows nothing newer.)
// 12  The resolution of a split brain: the operator marked the other copy Inconsistent. Both
//     bitmaps are based on the common parent, so their union holds every region either node
//     changed: copying it from the kept node makes the copies equal. No full copy (DRBD's
//     `--discard-my-data`).
// 13  Both tracked against the same parent and both moved on: each wrote alone. DRBD's
//     bitmap-both, for which it offers automatic policies; we never discard data on our own.
// 14  As 12 without a common bitmap base (DRBD's history-both).
// 15  Diverged further back than the bitmaps reach; refused like 13 (DRBD disconnects).
// 16  Two fresh devices: nothing to copy; the target adopts the source's generations at the end
//     of the (empty) resync. Freshness first keeps the "never an Outdated source against an
//     UpToDate one" rule true everywhere.
// 17  See the module doc: never copy a never-written device over a written one.
// 18  The only data is partial (Inconsistent), or the disk states contradict as in row 11.
// 19  Two different volumes (a wrong cable, a foreign disk): never mirror.
//
// DRBD cases folded: the role bit in the UUIDs and the automatic split-brain policies (we
// refuse); the sync UUID that DRBD's source sends at resync start (here the source's `bitmap`
// takes the target's current, same resumability, one id less); the "resync finished but the
// peer missed it" fix-ups (here the target records the end first, and a missed end on the
// source is row 4/5 plus clearing the bitmap); the rules comparing current roles at equal
// currents (folded into row 5); lost-quorum and reconnect flags (no quorum in a pair);
// per-peer bitmap slots (one peer); and RETRY_CONNECT when generations change during the
// handshake (the caller decides on one snapshot and reconnects if it changes before the resync
// starts). When the target of a resync is the current primary (DRBD's rr-conflict), the engine
// serves its reads of dirty regions from the source or refuses; that is not a data decision.

/// The one decision at reconnect: what to do with the two copies, from the generations and
/// states both nodes exchanged. Both nodes run it on the same inputs, mirrored, and reach
/// mirrored answers. `local_is_preferred` is this node's `preferred` setting (exactly one of the
/// two is preferred). The case table and the reason for each row are the comment above.
pub fn decide(
    local: &GenerationState,
    peer: &GenerationState,
    local_is_preferred: bool,
) -> Decision {
    let l = &local.generations;
    let p = &peer.generations;
    let local_inconsistent = local.disk == DiskFreshness::Inconsistent;
    let peer_inconsistent = peer.disk == DiskFreshness::Inconsistent;
    // The side that is not Inconsistent, when exactly one is.
    let only_consistent = match (local_inconsistent, peer_inconsistent) {
        (true, false) => Some(Side::Peer),
        (false, true) => Some(Side::Local),
        _ => None,
    };
    let any_crashed = local.crashed_primary || peer.crashed_primary;
    let refuse = |sync, rule| Decision {
        sync,
        resync_activity_log_from: None,
        rule,
    };
    let full = |source, rule| Decision {
        sync: SyncDecision::FullResync { source },
        resync_activity_log_from: None,
        rule,
    };
    let bitmap = |source, rule| Decision {
        sync: SyncDecision::BitmapResync { source },
        resync_activity_log_from: any_crashed.then_some(source),
        rule,
    };
    let state = |side| match side {
        Side::Local => local,
        Side::Peer => peer,
    };

    if l.current == 0 || p.current == 0 {
        return refuse(SyncDecision::Unrelated, 1);
    }
    if local_inconsistent && peer_inconsistent {
        return refuse(SyncDecision::NoEligibleSource, 2);
    }

    if l.current == p.current {
        if let Some(source) = only_consistent {
            return full(source, 3);
        }
        if !any_crashed {
            return refuse(SyncDecision::InSync, 4);
        }
        let source = match local.disk.rank().cmp(&peer.disk.rank()) {
            core::cmp::Ordering::Greater => Side::Local,
            core::cmp::Ordering::Less => Side::Peer,
            core::cmp::Ordering::Equal => match (local.crashed_primary, peer.crashed_primary) {
                (true, false) => Side::Peer,
                (false, true) => Side::Local,
                _ => preferred(local_is_preferred),
            },
        };
        return Decision {
            sync: SyncDecision::InSync,
            resync_activity_log_from: Some(source),
            rule: 5,
        };
    }

    let ahead = match (ahead_of(l, p), ahead_of(p, l)) {
        (Some(_), Some(_)) => {
            return match only_consistent {
                Some(source) => full(source, 6),
                None => refuse(SyncDecision::SplitBrain, 6),
            };
        }
        (Some(by), None) => Some((Side::Local, by)),
        (None, Some(by)) => Some((Side::Peer, by)),
        (None, None) => None,
    };
    if let Some((newer, by)) = ahead {
        let older = newer.other();
        let newer_disk = state(newer).disk;
        return match (newer_disk, state(older).disk, by) {
            (DiskFreshness::Inconsistent, _, Ahead::ByBitmap) => bitmap(older, 9),
            (DiskFreshness::Inconsistent, _, Ahead::ByHistory) => full(older, 10),
            (DiskFreshness::Outdated, DiskFreshness::UpToDate, _) => {
                refuse(SyncDecision::NoEligibleSource, 11)
            }
            (_, _, Ahead::ByBitmap) => bitmap(newer, 7),
            (_, _, Ahead::ByHistory) => full(newer, 8),
        };
    }

    if l.bitmap != 0 && l.bitmap == p.bitmap {
        return match only_consistent {
            Some(source) => bitmap(source, 12),
            None => refuse(SyncDecision::SplitBrain, 13),
        };
    }
    if shares_an_id(l, p) {
        return match only_consistent {
            Some(source) => full(source, 14),
            None => refuse(SyncDecision::SplitBrain, 15),
        };
    }

    match (local.never_written, peer.never_written) {
        (true, true) => {
            let source = match local.disk.rank().cmp(&peer.disk.rank()) {
                core::cmp::Ordering::Greater => Side::Local,
                core::cmp::Ordering::Less => Side::Peer,
                core::cmp::Ordering::Equal => preferred(local_is_preferred),
            };
            bitmap(source, 16)
        }
        (true, false) | (false, true) => {
            let written = if local.never_written {
                Side::Peer
            } else {
                Side::Local
            };
            match (state(written).disk, state(written.other()).disk) {
                (DiskFreshness::Inconsistent, _)
                | (DiskFreshness::Outdated, DiskFreshness::UpToDate) => {
                    refuse(SyncDecision::NoEligibleSource, 18)
                }
                _ => full(written, 17),
            }
        }
        (false, false) => refuse(SyncDecision::Unrelated, 19),
    }
}

/// How a side knows it holds newer data than the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// Its bitmap is based on the other's current: it tracked every change since.
    ByBitmap,
    /// The other's current is one of its older currents, but not its bitmap base.
    ByHistory,
}

fn ahead_of(newer: &Generations, older: &Generations) -> Option<Ahead> {
    if older.current == 0 {
        None
    } else if newer.bitmap == older.current {
        Some(Ahead::ByBitmap)
    } else if newer.history.contains(&older.current) {
        Some(Ahead::ByHistory)
    } else {
        None
    }
}

fn shares_an_id(a: &Generations, b: &Generations) -> bool {
    let ids = |g: &Generations| {
        let mut all = [0u64; 2 + HISTORY_GENERATIONS];
        all[0] = g.current;
        all[1] = g.bitmap;
        all[2..].copy_from_slice(&g.history);
        all
    };
    ids(a).iter().any(|&id| b.contains(id))
}

fn preferred(local_is_preferred: bool) -> Side {
    if local_is_preferred {
        Side::Local
    } else {
        Side::Peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DiskFreshness::{Consistent, Inconsistent, Outdated, UpToDate};
    use Side::{Local, Peer};
    use SyncDecision::{BitmapResync, FullResync, InSync, NoEligibleSource, SplitBrain, Unrelated};

    const FRESHNESS: [DiskFreshness; 4] = [UpToDate, Consistent, Outdated, Inconsistent];

    fn gens(current: u64, bitmap: u64, history: [u64; 2]) -> Generations {
        Generations {
            current,
            bitmap,
            history,
        }
    }

    fn state(generations: Generations, disk: DiskFreshness) -> GenerationState {
        GenerationState {
            generations,
            disk,
            never_written: false,
            crashed_primary: false,
        }
    }

    fn crashed(mut s: GenerationState) -> GenerationState {
        s.crashed_primary = true;
        s
    }

    fn fresh(mut s: GenerationState) -> GenerationState {
        s.never_written = true;
        s
    }

    fn mirror_side(side: Side) -> Side {
        side.other()
    }

    fn mirror(d: Decision) -> Decision {
        let sync = match d.sync {
            BitmapResync { source } => BitmapResync {
                source: mirror_side(source),
            },
            FullResync { source } => FullResync {
                source: mirror_side(source),
            },
            other => other,
        };
        Decision {
            sync,
            resync_activity_log_from: d.resync_activity_log_from.map(mirror_side),
            rule: d.rule,
        }
    }

    /// Runs the decision on both nodes, checks that they agree, and returns the local one.
    fn decide_both(local: &GenerationState, peer: &GenerationState, pref: bool) -> Decision {
        let here = decide(local, peer, pref);
        let there = decide(peer, local, !pref);
        assert_eq!(
            mirror(here),
            there,
            "local {local:?} peer {peer:?} pref {pref}"
        );
        here
    }

    fn check(d: Decision, rule: u8, sync: SyncDecision, al: Option<Side>) {
        assert_eq!(
            d,
            Decision {
                sync,
                resync_activity_log_from: al,
                rule
            }
        );
    }

    // ---- one test per row of the case table ----

    #[test]
    fn row_1_a_current_of_zero_is_unrelated() {
        let d = decide_both(
            &state(gens(0, 0, [0, 0]), Consistent),
            &state(gens(5, 0, [0, 0]), UpToDate),
            true,
        );
        check(d, 1, Unrelated, None);
    }

    #[test]
    fn row_2_both_inconsistent_has_no_eligible_source() {
        let d = decide_both(
            &state(gens(5, 0, [0, 0]), Inconsistent),
            &state(gens(5, 0, [0, 0]), Inconsistent),
            true,
        );
        check(d, 2, NoEligibleSource, None);
    }

    #[test]
    fn row_3_equal_currents_with_an_invalidated_side_is_a_full_resync_to_it() {
        let d = decide_both(
            &state(gens(5, 0, [4, 0]), Inconsistent),
            &state(gens(5, 0, [4, 0]), Outdated),
            true,
        );
        check(d, 3, FullResync { source: Peer }, None);
    }

    #[test]
    fn row_4_equal_currents_without_crash_are_in_sync() {
        let d = decide_both(
            &state(gens(5, 0, [4, 0]), UpToDate),
            &state(gens(5, 0, [4, 0]), Consistent),
            false,
        );
        check(d, 4, InSync, None);
    }

    #[test]
    fn row_5_crashed_primary_gets_its_activity_log_from_the_survivor() {
        // The survivor took over (UpToDate); the crashed primary rebooted (Consistent).
        let d = decide_both(
            &crashed(state(gens(5, 0, [0, 0]), Consistent)),
            &state(gens(5, 0, [0, 0]), UpToDate),
            true,
        );
        check(d, 5, InSync, Some(Peer));
        // Freshness ties: the node that did not crash, even when the crashed one is preferred.
        let d = decide_both(
            &crashed(state(gens(5, 0, [0, 0]), Consistent)),
            &state(gens(5, 0, [0, 0]), Consistent),
            true,
        );
        check(d, 5, InSync, Some(Peer));
        // An Outdated survivor never beats a fresher crashed primary.
        let d = decide_both(
            &crashed(state(gens(5, 0, [0, 0]), Consistent)),
            &state(gens(5, 0, [0, 0]), Outdated),
            false,
        );
        check(d, 5, InSync, Some(Local));
        // Both crashed, same freshness: the preferred node.
        let d = decide_both(
            &crashed(state(gens(5, 0, [0, 0]), Consistent)),
            &crashed(state(gens(5, 0, [0, 0]), Consistent)),
            false,
        );
        check(d, 5, InSync, Some(Peer));
    }

    #[test]
    fn row_6_sides_ahead_of_each_other_are_refused_unless_one_was_discarded() {
        let d = decide_both(
            &state(gens(5, 6, [0, 0]), UpToDate),
            &state(gens(6, 5, [0, 0]), UpToDate),
            true,
        );
        check(d, 6, SplitBrain, None);
        let d = decide_both(
            &crashed(state(gens(5, 6, [0, 0]), UpToDate)),
            &state(gens(6, 5, [0, 0]), Inconsistent),
            true,
        );
        check(d, 6, FullResync { source: Local }, None);
    }

    #[test]
    fn row_7_bitmap_based_on_the_peer_current_is_a_bitmap_resync_from_local() {
        let d = decide_both(
            &state(gens(6, 5, [5, 0]), UpToDate),
            &state(gens(5, 0, [0, 0]), Outdated),
            false,
        );
        check(d, 7, BitmapResync { source: Local }, None);
        let d = decide_both(
            &state(gens(5, 0, [0, 0]), Consistent),
            &crashed(state(gens(6, 5, [5, 0]), UpToDate)),
            true,
        );
        check(d, 7, BitmapResync { source: Peer }, Some(Peer));
    }

    #[test]
    fn row_8_peer_current_in_history_only_is_a_full_resync_from_local() {
        let d = decide_both(
            &state(gens(7, 6, [6, 5]), UpToDate),
            &state(gens(5, 0, [0, 0]), Consistent),
            false,
        );
        check(d, 8, FullResync { source: Local }, None);
    }

    #[test]
    fn row_9_discarded_newer_side_is_rolled_back_over_its_bitmap() {
        let d = decide_both(
            &crashed(state(gens(6, 5, [5, 0]), Inconsistent)),
            &state(gens(5, 0, [0, 0]), Outdated),
            true,
        );
        check(d, 9, BitmapResync { source: Peer }, Some(Peer));
    }

    #[test]
    fn row_10_discarded_newer_side_without_bitmap_gets_a_full_resync() {
        let d = decide_both(
            &state(gens(7, 6, [6, 5]), Inconsistent),
            &state(gens(5, 0, [0, 0]), Consistent),
            true,
        );
        check(d, 10, FullResync { source: Peer }, None);
    }

    #[test]
    fn row_11_newer_outdated_side_against_an_up_to_date_one_is_refused() {
        let d = decide_both(
            &state(gens(6, 5, [5, 0]), Outdated),
            &state(gens(5, 0, [0, 0]), UpToDate),
            true,
        );
        check(d, 11, NoEligibleSource, None);
        // Against a Consistent side (it just booted) the newer Outdated side is the source.
        let d = decide_both(
            &state(gens(6, 5, [5, 0]), Outdated),
            &state(gens(5, 0, [0, 0]), Consistent),
            true,
        );
        check(d, 7, BitmapResync { source: Local }, None);
    }

    #[test]
    fn row_12_split_brain_with_a_discarded_side_resyncs_the_union_of_bitmaps() {
        let d = decide_both(
            &state(gens(6, 5, [5, 0]), UpToDate),
            &crashed(state(gens(7, 5, [5, 0]), Inconsistent)),
            false,
        );
        check(d, 12, BitmapResync { source: Local }, Some(Local));
    }

    #[test]
    fn row_13_both_moved_on_from_a_common_parent_is_split_brain() {
        let d = decide_both(
            &state(gens(6, 5, [5, 0]), UpToDate),
            &state(gens(7, 5, [5, 0]), UpToDate),
            true,
        );
        check(d, 13, SplitBrain, None);
    }

    #[test]
    fn row_14_related_history_with_a_discarded_side_is_a_full_resync() {
        let d = decide_both(
            &state(gens(8, 0, [6, 5]), Inconsistent),
            &state(gens(7, 0, [5, 0]), Consistent),
            true,
        );
        check(d, 14, FullResync { source: Peer }, None);
    }

    #[test]
    fn row_15_related_history_without_common_bitmap_is_split_brain() {
        let d = decide_both(
            &state(gens(8, 0, [6, 5]), Consistent),
            &state(gens(7, 0, [5, 0]), Consistent),
            true,
        );
        check(d, 15, SplitBrain, None);
    }

    #[test]
    fn row_16_two_never_written_devices_pair_without_copying_from_the_preferred() {
        let d = decide_both(
            &fresh(state(gens(11, 0, [0, 0]), Consistent)),
            &fresh(state(gens(22, 0, [0, 0]), Consistent)),
            false,
        );
        check(d, 16, BitmapResync { source: Peer }, None);
        // A fresher side wins over the preference.
        let d = decide_both(
            &fresh(state(gens(11, 0, [0, 0]), UpToDate)),
            &fresh(state(gens(22, 0, [0, 0]), Consistent)),
            false,
        );
        check(d, 16, BitmapResync { source: Local }, None);
    }

    #[test]
    fn row_17_a_written_device_is_copied_in_full_onto_a_never_written_one() {
        // Even when the never-written node is the preferred one.
        let d = decide_both(
            &fresh(state(gens(11, 0, [0, 0]), Consistent)),
            &state(gens(22, 0, [0, 0]), Outdated),
            true,
        );
        check(d, 17, FullResync { source: Peer }, None);
    }

    #[test]
    fn row_18_a_partial_written_device_is_not_copied_onto_a_never_written_one() {
        let d = decide_both(
            &fresh(state(gens(11, 0, [0, 0]), Consistent)),
            &state(gens(22, 0, [0, 0]), Inconsistent),
            false,
        );
        check(d, 18, NoEligibleSource, None);
        let d = decide_both(
            &fresh(state(gens(11, 0, [0, 0]), UpToDate)),
            &state(gens(22, 0, [0, 0]), Outdated),
            false,
        );
        check(d, 18, NoEligibleSource, None);
    }

    #[test]
    fn row_19_two_written_devices_with_nothing_in_common_are_unrelated() {
        let d = decide_both(
            &state(gens(11, 10, [10, 9]), UpToDate),
            &state(gens(22, 21, [21, 20]), UpToDate),
            true,
        );
        check(d, 19, Unrelated, None);
    }

    // ---- the whole table over a grid ----

    #[test]
    fn decide_holds_its_properties_over_a_grid_of_small_inputs() {
        // Every field takes each of four ids (0 = none), except the oldest history slot, for
        // which "empty" and "one id" are enough: it plays the same part as the newer slot.
        const IDS: [u64; 4] = [0, 1, 2, 3];
        let mut all = Vec::new();
        for current in IDS {
            for bitmap in IDS {
                for h0 in IDS {
                    for h1 in [0, 3] {
                        all.push(gens(current, bitmap, [h0, h1]));
                    }
                }
            }
        }
        let mut fired = [false; 20];
        for l in &all {
            for p in &all {
                let shares = l
                    .history
                    .iter()
                    .chain([&l.current, &l.bitmap])
                    .any(|&id| p.contains(id));
                for (ld, pd) in FRESHNESS
                    .iter()
                    .flat_map(|&a| FRESHNESS.iter().map(move |&b| (a, b)))
                {
                    for flags in 0u8..32 {
                        let local = GenerationState {
                            generations: *l,
                            disk: ld,
                            never_written: flags & 1 != 0,
                            crashed_primary: flags & 2 != 0,
                        };
                        let peer = GenerationState {
                            generations: *p,
                            disk: pd,
                            never_written: flags & 4 != 0,
                            crashed_primary: flags & 8 != 0,
                        };
                        let pref = flags & 16 != 0;
                        let d = decide(&local, &peer, pref);
                        // Antisymmetric: the peer reaches the mirrored decision.
                        assert_eq!(mirror(d), decide(&peer, &local, !pref));
                        assert!((1..=19).contains(&d.rule));
                        fired[usize::from(d.rule)] = true;
                        let of = |side| match side {
                            Local => &local,
                            Peer => &peer,
                        };
                        let eligible = |side: Side| {
                            let (s, t) = (of(side).disk, of(side.other()).disk);
                            s != Inconsistent && !(s == Outdated && t == UpToDate)
                        };
                        if let Some(source) = d.sync.source() {
                            assert!(eligible(source), "{d:?} {local:?} {peer:?}");
                        }
                        if let Some(source) = d.resync_activity_log_from {
                            assert!(eligible(source), "{d:?} {local:?} {peer:?}");
                            assert!(local.crashed_primary || peer.crashed_primary);
                            match d.sync {
                                InSync => {}
                                BitmapResync { source: s } => assert_eq!(s, source),
                                _ => panic!("activity log with {d:?}"),
                            }
                        } else if local.crashed_primary || peer.crashed_primary {
                            assert!(!matches!(d.sync, InSync | BitmapResync { .. }), "{d:?}");
                        }
                        let equal = l.current != 0 && l.current == p.current;
                        match d.sync {
                            InSync => assert!(equal),
                            SplitBrain => {
                                assert!(!equal && shares && ld != Inconsistent);
                                assert!(pd != Inconsistent);
                            }
                            Unrelated => assert!(l.current == 0 || p.current == 0 || !shares),
                            _ => {}
                        }
                        if equal && ld != Inconsistent && pd != Inconsistent {
                            assert_eq!(d.sync, InSync);
                        }
                    }
                }
            }
        }
        let missing: Vec<usize> = (1..=19).filter(|&r| !fired[r]).collect();
        assert!(missing.is_empty(), "rows never fired: {missing:?}");
    }

    // ---- the transitions ----

    #[test]
    fn new_generation_starts_tracking_against_the_old_current() {
        let mut g = gens(5, 0, [4, 3]);
        g.start_new_generation(6);
        assert_eq!(g, gens(6, 5, [5, 4]));
    }

    #[test]
    fn new_generation_keeps_an_older_bitmap_base() {
        let mut g = gens(6, 5, [5, 4]);
        g.start_new_generation(7);
        assert_eq!(g, gens(7, 5, [6, 5]));
    }

    #[test]
    #[should_panic(expected = "not fresh")]
    fn new_generation_refuses_an_id_this_node_already_used() {
        let mut g = gens(6, 5, [5, 4]);
        g.start_new_generation(4);
    }

    #[test]
    fn resync_source_tracks_against_the_target_current() {
        // A full resync onto an unrelated (never-written) device.
        let mut g = gens(6, 5, [5, 4]);
        g.begin_resync_as_source(&gens(11, 0, [0, 0]), 12);
        assert_eq!(g, gens(6, 11, [5, 4]));
        // An ordinary bitmap resync changes nothing.
        let mut g = gens(6, 5, [5, 4]);
        g.begin_resync_as_source(&gens(5, 0, [4, 0]), 12);
        assert_eq!(g, gens(6, 5, [5, 4]));
    }

    #[test]
    fn resync_source_moves_on_when_rolling_the_target_back() {
        // The target left generation 5 for 6, then was discarded: it must not get 5 back.
        let mut g = gens(5, 0, [4, 0]);
        g.begin_resync_as_source(&gens(6, 5, [5, 4]), 12);
        assert_eq!(g, gens(12, 6, [5, 4]));
    }

    #[test]
    fn finished_resync_source_stops_tracking_and_keeps_its_ancestry() {
        let mut g = gens(6, 11, [5, 4]);
        g.resync_finished_as_source();
        assert_eq!(g, gens(6, 0, [5, 4]));
    }

    #[test]
    fn finished_resync_target_adopts_the_source_generations() {
        let mut g = gens(7, 5, [5, 4]);
        g.resync_finished_as_target(&gens(6, 7, [5, 4]));
        assert_eq!(g, gens(6, 0, [5, 4]));
    }

    // ---- scenarios: the transitions over real histories ----

    /// One node as the engine would drive it, checking that no current ever comes back.
    #[derive(Debug)]
    struct Node {
        state: GenerationState,
        left: Vec<u64>,
    }

    /// Fresh ids, as the caller's random source would give (distinct by construction here).
    #[derive(Debug)]
    struct Ids(u64);

    impl Ids {
        fn next(&mut self) -> u64 {
            self.0 += 1;
            self.0
        }
    }

    impl Node {
        fn new_device(ids: &mut Ids) -> Node {
            Node {
                state: fresh(state(gens(ids.next(), 0, [0, 0]), Consistent)),
                left: Vec::new(),
            }
        }

        fn g(&self) -> Generations {
            self.state.generations
        }

        fn change(&mut self, f: impl FnOnce(&mut Generations)) {
            let before = self.state.generations.current;
            f(&mut self.state.generations);
            let after = self.state.generations.current;
            if after != before {
                assert!(!self.left.contains(&after), "generation {after} came back");
                self.left.push(before);
            }
        }

        /// Writes alone (degraded primary or forced promotion).
        fn write_alone(&mut self, ids: &mut Ids) {
            let id = ids.next();
            self.change(|g| g.start_new_generation(id));
            self.state.never_written = false;
            self.state.disk = UpToDate;
        }

        /// Boots after a stop: Consistent, unless its disk is not whole.
        fn reboot(&mut self) {
            if self.state.disk != Inconsistent {
                self.state.disk = Consistent;
            }
        }
    }

    /// Carries out a resync from `source` to `target` the way the engine will; `complete ==
    /// false` stops it after the first copied region (a crash or a cut link).
    fn resync(source: &mut Node, target: &mut Node, ids: &mut Ids, complete: bool) {
        let t = target.g();
        let id = ids.next();
        source.change(|g| g.begin_resync_as_source(&t, id));
        target.state.disk = Inconsistent;
        target.state.never_written = target.state.never_written && source.state.never_written;
        if !complete {
            return;
        }
        let s = source.g();
        target.change(|g| g.resync_finished_as_target(&s));
        target.state.disk = UpToDate;
        source.change(|g| g.resync_finished_as_source());
        source.state.disk = UpToDate;
        source.state.crashed_primary = false;
        target.state.crashed_primary = false;
    }

    /// Connects `a` and `b` and carries out what the decision says (both run it).
    fn connect(a: &mut Node, b: &mut Node, a_preferred: bool, ids: &mut Ids) -> Decision {
        let d = decide_both(&a.state, &b.state, a_preferred);
        match d.sync.source() {
            Some(Local) => resync(a, b, ids, true),
            Some(Peer) => resync(b, a, ids, true),
            None => {}
        }
        if d.sync == InSync {
            a.change(|g| g.resync_finished_as_source());
            b.change(|g| g.resync_finished_as_source());
        }
        d
    }

    fn paired(ids: &mut Ids) -> (Node, Node) {
        let mut a = Node::new_device(ids);
        let mut b = Node::new_device(ids);
        let d = connect(&mut a, &mut b, true, ids);
        assert_eq!((d.rule, d.sync), (16, BitmapResync { source: Local }));
        assert_eq!(a.g(), b.g());
        assert!(a.state.never_written && b.state.never_written);
        assert_eq!(connect(&mut a, &mut b, true, ids).rule, 4);
        (a, b)
    }

    #[test]
    fn returning_peer_gets_a_bitmap_resync_from_the_primary_that_wrote_alone() {
        let mut ids = Ids(100);
        let (mut a, mut b) = paired(&mut ids);
        a.write_alone(&mut ids); // degrade procedure, then writes
        a.write_alone(&mut ids); // a forced promotion later: still one bitmap base
        b.state.disk = Outdated;
        b.reboot();
        let d = connect(&mut a, &mut b, false, &mut ids);
        check(d, 7, BitmapResync { source: Local }, None);
        assert_eq!(a.g(), b.g());
        check(connect(&mut a, &mut b, false, &mut ids), 4, InSync, None);
    }

    #[test]
    fn both_promoted_while_apart_is_split_brain_until_the_operator_keeps_one() {
        let mut ids = Ids(100);
        let (mut a, mut b) = paired(&mut ids);
        a.write_alone(&mut ids);
        b.write_alone(&mut ids);
        let d = connect(&mut a, &mut b, true, &mut ids);
        check(d, 13, SplitBrain, None);
        // resolve-split-brain --keep a: b's copy is discarded but keeps its bitmap.
        b.state.disk = Inconsistent;
        let d = connect(&mut a, &mut b, true, &mut ids);
        check(d, 12, BitmapResync { source: Local }, None);
        assert_eq!(a.g(), b.g());
        check(connect(&mut a, &mut b, true, &mut ids), 4, InSync, None);
    }

    #[test]
    fn target_crashing_mid_resync_resumes_as_a_bitmap_target() {
        let mut ids = Ids(100);
        let (mut a, mut b) = paired(&mut ids);
        a.write_alone(&mut ids);
        let d = decide_both(&a.state, &b.state, true);
        check(d, 7, BitmapResync { source: Local }, None);
        resync(&mut a, &mut b, &mut ids, false);
        b.reboot(); // the target crashed: it stays Inconsistent
        a.write_alone(&mut ids); // the primary degrades again meanwhile
        assert_eq!(b.state.disk, Inconsistent);
        let d = connect(&mut b, &mut a, false, &mut ids);
        check(d, 7, BitmapResync { source: Peer }, None);
        check(connect(&mut a, &mut b, true, &mut ids), 4, InSync, None);
    }

    #[test]
    fn interrupted_full_resync_onto_a_new_disk_resumes_as_a_bitmap_resync() {
        let mut ids = Ids(100);
        let (mut a, _) = paired(&mut ids);
        a.write_alone(&mut ids);
        let mut replacement = Node::new_device(&mut ids);
        let d = decide_both(&replacement.state, &a.state, true);
        check(d, 17, FullResync { source: Peer }, None);
        resync(&mut a, &mut replacement, &mut ids, false);
        assert!(!replacement.state.never_written);
        let d = connect(&mut replacement, &mut a, true, &mut ids);
        check(d, 7, BitmapResync { source: Peer }, None);
        assert_eq!(a.g(), replacement.g());
    }

    #[test]
    fn disk_that_missed_two_generations_gets_a_full_resync() {
        let mut ids = Ids(100);
        let (mut a, b) = paired(&mut ids);
        let shelved = b; // b's disk is pulled and kept on a shelf
        a.write_alone(&mut ids);
        let mut replacement = Node::new_device(&mut ids);
        check(
            connect(&mut a, &mut replacement, false, &mut ids),
            17,
            FullResync { source: Local },
            None,
        );
        a.write_alone(&mut ids); // the replacement is lost in turn
        let mut shelved = shelved;
        shelved.reboot();
        let d = connect(&mut a, &mut shelved, false, &mut ids);
        check(d, 8, FullResync { source: Local }, None);
        assert_eq!(a.g(), shelved.g());
    }

    #[test]
    fn crashed_primary_gets_its_activity_log_regions_from_the_survivor_that_wrote() {
        let mut ids = Ids(100);
        let (mut a, mut b) = paired(&mut ids);
        a.state.crashed_primary = true; // a was primary and lost power
        a.reboot();
        b.write_alone(&mut ids); // b took over and wrote
        let d = connect(&mut a, &mut b, true, &mut ids);
        check(d, 7, BitmapResync { source: Peer }, Some(Peer));
        assert!(!a.state.crashed_primary);
        check(connect(&mut a, &mut b, true, &mut ids), 4, InSync, None);
    }

    #[test]
    fn crashed_primary_gets_its_activity_log_from_a_survivor_that_did_not_write() {
        let mut ids = Ids(100);
        let (mut a, mut b) = paired(&mut ids);
        a.state.crashed_primary = true;
        a.reboot();
        b.state.disk = UpToDate; // took over, served reads, no write yet
        let d = decide_both(&a.state, &b.state, true);
        check(d, 5, InSync, Some(Peer));
    }

    #[test]
    fn discarding_the_newer_copy_rolls_it_back_without_reusing_a_generation() {
        let mut ids = Ids(100);
        let (mut a, mut b) = paired(&mut ids);
        a.write_alone(&mut ids);
        a.reboot();
        b.reboot();
        // The operator discards a's newer data (a is marked Inconsistent).
        a.state.disk = Inconsistent;
        let d = connect(&mut a, &mut b, true, &mut ids);
        check(d, 9, BitmapResync { source: Peer }, None);
        // b moved to a fresh generation, which a adopted; no node got an old current back.
        assert_eq!(a.g(), b.g());
        assert!(!a.left.contains(&a.g().current));
        check(connect(&mut a, &mut b, true, &mut ids), 4, InSync, None);
    }
}
