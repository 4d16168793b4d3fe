//! Failover: the heartbeats' state, the lease, takeover, self-fencing, the cluster IP, the
//! uplink-loss switchover, failback and readiness (DESIGN.md §4). Part of [`Mirror`]: these
//! rules read and change the same role, disk state and pairing as the mirror itself.
//!
//! The engine decides; the runtime acts and reports. It asks for the cluster IP to be probed
//! ([`EngineOutput::ProbeClusterIp`]: three RFC 5227 probes 100 ms apart, an answer awaited
//! 150 ms after the last) and reports the result with [`Mirror::handle_cluster_ip_probe`]; it
//! adds or drops the address ([`EngineOutput::ClusterIp`], with gratuitous ARP bursts on adding);
//! it reports the uplink ([`Mirror::set_uplink`]) and an ARP from another MAC claiming the
//! cluster IP ([`Mirror::handle_cluster_ip_conflict`]); and it carries out
//! [`EngineOutput::Fence`].

use super::{EngineOutput, Mirror, Pairing};
use crate::metadata::flags;
use crate::node::Role;
use crate::replication::generation::DiskFreshness;
use crate::replication::wire::{Beat, UplinkHealth, WireRole};
use crate::time::Instant;

/// How the runtime watches and claims the LAN (`runtime/cluster.rs`), in one place, because the
/// engine's takeover window and the simulator's model of the runtime follow from it.
pub mod schedule {
    /// A probe of the cluster IP: RFC 5227's probes, shortened as DESIGN.md §4 rule 3 says.
    pub const PROBE_COUNT: u64 = 3;
    pub const PROBE_INTERVAL_MS: u64 = 100;
    /// The wait for an answer after the last probe.
    pub const PROBE_WAIT_MS: u64 = 150;
    /// A probe step later than this (the node itself was stalled) restarts the probe.
    pub const PROBE_OVERRUN_MS: u64 = 200;
    /// When the gratuitous announcements go out, after the address is added.
    pub const ANNOUNCE_AT_MS: [u64; 5] = [0, 100, 300, 700, 1500];
    /// An announcement later than this is dropped with the rest of its burst.
    pub const ANNOUNCE_LATE_MS: u64 = 500;
    /// Gateway probes go out this often.
    pub const GATEWAY_PROBE_INTERVAL_MS: u64 = 100;
    /// The gateway is silent after this long without an answer, and only once this many probes
    /// sent since its last answer went unanswered: a node that was itself stalled (nothing
    /// sent) does not blame the gateway for its own silence.
    pub const GATEWAY_SILENCE_MS: u64 = 500;
    pub const GATEWAY_UNANSWERED_MIN: u32 = 3;

    /// Milliseconds after its start at which a probe with `sent` probes out acts next: the
    /// next probe, or (all sent) its end.
    pub const fn probe_due_ms(sent: u64) -> u64 {
        if sent < PROBE_COUNT {
            sent * PROBE_INTERVAL_MS
        } else {
            super::CLUSTER_IP_PROBE_MS
        }
    }
}

/// How long a probe of the cluster IP takes.
pub const CLUSTER_IP_PROBE_MS: u64 =
    (schedule::PROBE_COUNT - 1) * schedule::PROBE_INTERVAL_MS + schedule::PROBE_WAIT_MS;
/// A primary whose uplink has been down this long hands over to an eligible peer (rule 6); a
/// flapping port does not move the role.
const UPLINK_SWITCHOVER_AFTER_MS: u64 = 300;
/// Between two uplink-loss switchover attempts.
const UPLINK_SWITCHOVER_RETRY_MS: u64 = 2_000;
/// With `failback = "preferred"`, the preferred node must be eligible this long before the
/// role goes back to it.
const FAILBACK_STABLE_MS: u64 = 2_000;

/// What a probe of the cluster IP is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// A secondary that lost its peer: promote if nobody answers before `deadline` (rule 3).
    Takeover { deadline: Instant },
    /// A degrading primary checks, at the end of its wait, that nobody took the address over
    /// while it was not looking (a stall of the whole board) (rule 2).
    Degrade,
}

/// Why a failover could not happen now, as bits (cheap to compute on every input; the words
/// are made only for `status` and for the event when they change).
mod reason {
    pub(super) const NOT_CONFIGURED: u32 = 1 << 0;
    pub(super) const MAINTENANCE: u32 = 1 << 1;
    pub(super) const PEER_MAINTENANCE: u32 = 1 << 2;
    pub(super) const PEER_LOST: u32 = 1 << 3;
    pub(super) const PEER_HALF: u32 = 1 << 4;
    pub(super) const REFUSED: u32 = 1 << 5;
    pub(super) const RESYNC: u32 = 1 << 6;
    pub(super) const PEER_DISK: u32 = 1 << 7;
    pub(super) const OWN_DISK: u32 = 1 << 8;
    pub(super) const UPLINK_DOWN: u32 = 1 << 9;
    pub(super) const UPLINK_UNKNOWN: u32 = 1 << 10;
    pub(super) const PEER_UPLINK: u32 = 1 << 11;
    pub(super) const DEGRADING: u32 = 1 << 12;
    pub(super) const FENCED: u32 = 1 << 13;
    pub(super) const NO_PRIMARY: u32 = 1 << 14;
}

/// The failover half of the engine's state.
#[derive(Debug, Default)]
pub(super) struct Failover {
    pub(super) uplink: UplinkHealth,
    uplink_down_since: Option<Instant>,
    /// The peer's newest heartbeat state, and its order key (boot id, peer clock).
    pub(super) peer_beat: Option<Beat>,
    beat_order: Option<(u64, u64)>,
    pub(super) probe: Option<Probe>,
    /// A degrading primary's probe is due at this instant.
    pub(super) degrade_probe_at: Option<Instant>,
    /// The degrade probe found the address free.
    pub(super) degrade_probed: bool,
    pub(super) holds_ip: bool,
    pub(super) fenced: bool,
    /// Client replies held because the lease had lapsed.
    pub(super) lease_held: bool,
    next_uplink_switchover: Instant,
    failback_since: Option<Instant>,
    /// The readiness last reported (bits), for the event on a change.
    last_reasons: Option<u32>,
    /// This node woke here from a gap in its own running of at least the dead time (a stalled
    /// board, a hung daemon), long enough to hide the peer's takeover; cleared once the peer
    /// echoes a time from after it (it heard this node since, and its beats show its role).
    pub(super) woke_unseen: Option<Instant>,
}

/// Readiness for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub auto_failover: bool,
    pub ready_for_failover: bool,
    pub not_ready_reasons: Vec<String>,
    pub uplink: UplinkHealth,
}

impl Mirror {
    // ---- getters -------------------------------------------------------------------------

    /// Automatic failover is configured (a cluster IP and a gateway probe, rule 5) and not
    /// suspended by maintenance.
    pub fn auto_failover(&self) -> bool {
        self.auto_configured() && !self.maintenance
    }

    fn auto_configured(&self) -> bool {
        self.settings.cluster_ip && self.settings.gateway_probe
    }

    /// What this node's heartbeats say about it.
    pub(super) fn beat(&self) -> Beat {
        Beat {
            boot_id: self.settings.boot_id,
            role: self.wire_role(),
            epoch: self.sb.epoch,
            disk: self.disk,
            syncing: self.syncing,
            uplink: self.fo.uplink,
            maintenance: self.maintenance,
            current_generation: self.sb.current_generation,
            holds_cluster_ip: self.fo.holds_ip,
        }
    }

    /// The lease (rule 1): a primary that mirrors may acknowledge only while the peer heard it
    /// within the dead time, on this node's own clock; a node that stalled finds it expired.
    pub(super) fn lease_valid(&self) -> bool {
        if self.settings.mutations.no_lease {
            return true;
        }
        self.links
            .lease_echo()
            .is_some_and(|echo| self.now < echo.plus_millis(self.settings.dead_time_ms))
    }

    /// When the peer was last heard, for a secondary's takeover deadline: not counting bytes
    /// that waited in a socket while this node hung or stalled, which would push the deadline
    /// past the primary's degrade wait.
    pub(super) fn takeover_last_heard(&self) -> Instant {
        let heard = if self.settings.mutations.stale_last_heard {
            self.links.last_heard()
        } else {
            self.links.last_heard_trusted()
        };
        heard.unwrap_or(self.now)
    }

    fn peer_eligible(&self) -> bool {
        let Some(beat) = self.fo.peer_beat else {
            return false;
        };
        matches!(self.pairing, Pairing::Paired { .. })
            && self.links.is_connected()
            && self.resync.is_none()
            && beat.disk == DiskFreshness::UpToDate
            && !beat.syncing
            && beat.uplink == UplinkHealth::Healthy
    }

    fn reason_bits(&self) -> u32 {
        use reason::*;
        let mut bits = 0;
        if !self.auto_configured() {
            bits |= NOT_CONFIGURED;
        }
        if self.maintenance {
            bits |= MAINTENANCE;
        }
        if self.fo.fenced {
            return bits | FENCED;
        }
        let connected = self.links.is_connected();
        if !connected {
            bits |= PEER_LOST;
        } else if self.links.is_half(self.now) {
            bits |= PEER_HALF;
        }
        if self.refusal.is_some() {
            bits |= REFUSED;
        }
        if self.resync.is_some() || self.syncing {
            bits |= RESYNC;
        }
        if self.freeze_until.is_some() {
            bits |= DEGRADING;
        }
        if self.disk != DiskFreshness::UpToDate {
            bits |= OWN_DISK;
        }
        match self.fo.uplink {
            UplinkHealth::Down => bits |= UPLINK_DOWN,
            UplinkHealth::Unknown if self.auto_configured() => bits |= UPLINK_UNKNOWN,
            _ => {}
        }
        if connected {
            if let Some(beat) = self.fo.peer_beat {
                if beat.maintenance {
                    bits |= PEER_MAINTENANCE;
                }
                if beat.disk != DiskFreshness::UpToDate || beat.syncing {
                    bits |= PEER_DISK;
                }
                if beat.uplink == UplinkHealth::Down
                    || (beat.uplink == UplinkHealth::Unknown && self.auto_configured())
                {
                    bits |= PEER_UPLINK;
                }
                if beat.role != WireRole::Primary && self.role != Role::Primary {
                    bits |= NO_PRIMARY;
                }
            }
        }
        bits
    }

    fn reason_words(&self, bits: u32) -> Vec<String> {
        use reason::*;
        let peer_disk = self.fo.peer_beat.map_or("unknown", |b| {
            if b.syncing {
                "syncing"
            } else {
                super::freshness_name(b.disk)
            }
        });
        let mut words = Vec::new();
        let mut say = |bit: u32, text: String| {
            if bits & bit != 0 {
                words.push(text);
            }
        };
        say(
            NOT_CONFIGURED,
            "no cluster IP or gateway probe configured: automatic failover is off (rule 5)".into(),
        );
        say(
            MAINTENANCE,
            "maintenance mode: automatic failover suspended".into(),
        );
        say(FENCED, "this node fenced itself".into());
        say(PEER_LOST, "peer lost".into());
        say(
            PEER_HALF,
            "peer half: its frames arrive but it does not hear this node".into(),
        );
        say(PEER_MAINTENANCE, "peer in maintenance mode".into());
        if let Some(refusal) = &self.refusal {
            say(REFUSED, refusal.clone());
        }
        say(RESYNC, "resync running".into());
        say(DEGRADING, "degrade procedure running: writes held".into());
        say(
            OWN_DISK,
            format!("this disk is {}", super::freshness_name(self.disk)),
        );
        say(PEER_DISK, format!("peer disk is {peer_disk}"));
        say(UPLINK_DOWN, "own uplink down".into());
        say(UPLINK_UNKNOWN, "own uplink not confirmed yet".into());
        say(PEER_UPLINK, "peer uplink down or not confirmed".into());
        say(NO_PRIMARY, "no primary in the pair".into());
        words
    }

    /// `auto_failover`, `ready_for_failover` and the reasons, for `status`.
    pub fn readiness(&self) -> Readiness {
        let bits = self.reason_bits();
        Readiness {
            auto_failover: self.auto_failover(),
            ready_for_failover: bits == 0,
            not_ready_reasons: self.reason_words(bits),
            uplink: self.fo.uplink,
        }
    }

    /// The earliest instant at which a failover timer fires.
    pub(super) fn failover_timeout(&self) -> Option<Instant> {
        let uplink = match (self.role, self.fo.uplink_down_since) {
            (Role::Primary, Some(since)) => Some(
                since
                    .plus_millis(UPLINK_SWITCHOVER_AFTER_MS)
                    .max(self.fo.next_uplink_switchover),
            ),
            _ => None,
        };
        let failback = self
            .fo
            .failback_since
            .map(|t| t.plus_millis(FAILBACK_STABLE_MS));
        let lease = if self.fo.lease_held {
            // Re-check on the next heartbeat at the latest.
            Some(self.now.plus_millis(10))
        } else {
            None
        };
        [self.fo.degrade_probe_at, uplink, failback, lease]
            .into_iter()
            .flatten()
            .min()
    }

    /// Every input passes here first. The engine asks to be called at least every quarter of
    /// the dead time (`poll_timeout`), so a longer gap means this node was not running.
    pub(super) fn advance(&mut self, now: Instant) {
        if now.millis_since(self.now) >= self.settings.dead_time_ms {
            self.fo.woke_unseen = Some(now);
        }
        self.now = now;
        if self
            .fo
            .woke_unseen
            .is_some_and(|woke| self.links.lease_echo().is_some_and(|echo| echo >= woke))
        {
            self.fo.woke_unseen = None;
        }
    }

    /// The degrade procedure's wait and probe are over: serve alone (rule 2), unless this node
    /// woke from a gap as long as the dead time. Then it may have slept through its peer's
    /// takeover, and a probe cannot tell: the new primary may itself be stalled, or dead. It
    /// waits a takeover window for the peer to show itself (its beats then demote this node,
    /// or show it secondary); if the peer does not, it demotes.
    pub(super) fn end_degrade_wait(&mut self) {
        let Some(woke) = self.fo.woke_unseen else {
            self.finish_degrade();
            return;
        };
        let until = woke.plus_millis(self.takeover_window_ms());
        if self.now < until {
            if self.freeze_until != Some(until) {
                log::warn!("this node was not running for at least the dead time: it waits for its peer to show itself before serving alone (wait_ms={})", until.millis_since(self.now));
                self.freeze_until = Some(until);
            }
            return;
        }
        log::error!("this node was not running for at least the dead time and has not heard its peer since: the peer may have taken over; demoting instead of serving alone (rule 2)");
        self.demote_abandoning();
        // A secondary that did not take over: the peer may be writing alone.
        self.outdate_at = Some(self.now);
        if self.links.is_connected() && matches!(self.pairing, Pairing::None) {
            self.start_pairing();
        }
    }

    // ---- inputs --------------------------------------------------------------------------

    /// The runtime's view of this node's uplink: the lan port's carrier and the gateway probe.
    pub fn set_uplink(&mut self, uplink: UplinkHealth, now: Instant) {
        self.advance(now);
        if uplink != self.fo.uplink {
            let log_line = format!(
                "uplink changed (from={} to={})",
                self.fo.uplink.name(),
                uplink.name()
            );
            if uplink == UplinkHealth::Down {
                log::warn!("{log_line}");
            } else {
                log::info!("{log_line}");
            }
            self.fo.uplink = uplink;
            self.fo.uplink_down_since = (uplink == UplinkHealth::Down).then_some(now);
        }
        self.pump();
    }

    /// The probe the engine asked for ([`EngineOutput::ProbeClusterIp`]) ended: `answered` when
    /// a host other than this one claimed the cluster IP.
    pub fn handle_cluster_ip_probe(&mut self, answered: bool, now: Instant) {
        self.advance(now);
        match self.fo.probe.take() {
            Some(Probe::Takeover { deadline }) => self.finish_takeover(answered, deadline),
            Some(Probe::Degrade) => {
                if answered && self.role == Role::Primary {
                    log::error!("another host holds the cluster IP while this primary degrades: the peer took over; demoting (rule 2)");
                    self.demote_abandoning();
                } else {
                    self.fo.degrade_probed = true;
                    if self.freeze_until.is_some_and(|t| now >= t) {
                        self.end_degrade_wait();
                    }
                }
            }
            None => {}
        }
        self.pump();
    }

    /// An ARP packet from another MAC claimed the cluster IP.
    pub fn handle_cluster_ip_conflict(&mut self, now: Instant) {
        self.advance(now);
        if self.role != Role::Primary || !self.fo.holds_ip {
            return;
        }
        if self.freeze_until.is_some() {
            log::error!(
                "another host claims the cluster IP while this primary degrades: demoting (rule 2)"
            );
            self.demote_abandoning();
        } else {
            // A primary that serves (mirroring, or alone after a finished degrade procedure)
            // holds the address rightfully: a peer cannot have taken over since (it was either
            // connected, or outdated when the degrade ended). The claimer is stale, such as a
            // former primary waking from a stall, which demotes itself on its own probe.
            log::warn!("another host claims the cluster IP; this primary holds it rightfully and announces it again");
            self.outputs.push_back(EngineOutput::ClusterIp(true));
        }
        self.pump();
    }

    /// A heartbeat's state arrived (`sent_ms` on the peer's clock).
    pub(super) fn handle_beat(&mut self, sent_ms: u64, body: &[u8]) {
        let beat = match Beat::decode(body) {
            Ok(beat) => beat,
            Err(e) => {
                log::error!("peer sent a malformed heartbeat ({e}); ignoring it");
                return;
            }
        };
        // Stale or reordered heartbeats (the two links overtake each other) change nothing.
        if let Some((boot, sent)) = self.fo.beat_order {
            if boot == beat.boot_id && sent_ms <= sent {
                return;
            }
        }
        self.fo.beat_order = Some((beat.boot_id, sent_ms));
        let before = self.fo.peer_beat.replace(beat);
        if before.map(|b| b.uplink) != Some(beat.uplink) && before.is_some() {
            log::info!("peer uplink changed (to={})", beat.uplink.name());
        }
        if self.role == Role::Primary && self.freeze_until.is_some() && beat.epoch > self.sb.epoch {
            // Rule 2: a larger epoch means the peer took over while this node waited.
            log::error!(
                "the peer has a larger epoch while this primary degrades: demoting (peer_epoch={} epoch={})",
                beat.epoch,
                self.sb.epoch
            );
            self.demote_abandoning();
        }
        if beat.epoch > self.sb.epoch && self.role != Role::Primary {
            self.sb.epoch = beat.epoch;
        }
        if self.role == Role::Primary && beat.role == WireRole::Primary {
            // Rule 8 (and rule 2: a degrading primary demotes on a peer primary).
            let mine = (self.sb.epoch, self.settings.node_name.as_str());
            let theirs = (beat.epoch, self.settings.peer_name.as_str());
            if mine < theirs || self.freeze_until.is_some() {
                log::error!(
                    "the peer is primary too with a higher epoch: demoting (peer_epoch={} epoch={})",
                    beat.epoch,
                    self.sb.epoch
                );
                self.demote_abandoning();
            }
        }
    }

    // ---- the rules -----------------------------------------------------------------------

    /// Runs on every input (from `pump`): fencing, the uplink-loss switchover, failback, the
    /// degrade probe, held replies, the heartbeat state and the readiness event.
    pub(super) fn check_failover(&mut self) {
        let now = self.now;
        if self.fo.fenced {
            return;
        }
        self.check_fence();
        if self.fo.fenced {
            return;
        }
        if self
            .fo
            .degrade_probe_at
            .is_some_and(|t| now >= t && self.freeze_until.is_some())
        {
            self.fo.degrade_probe_at = None;
            if self.fo.probe.is_none() {
                self.fo.probe = Some(Probe::Degrade);
                self.outputs.push_back(EngineOutput::ProbeClusterIp);
            }
        }
        self.check_uplink_switchover();
        self.check_failback();
        if self.fo.lease_held && self.lease_valid() {
            self.release_held();
        }
        self.links.set_beat(&self.beat().encode());
        let bits = self.reason_bits();
        if self.fo.last_reasons != Some(bits) {
            if bits == 0 {
                log::info!("readiness changed: ready for failover");
            } else {
                log::info!(
                    "readiness changed: not ready for failover (reasons={})",
                    self.reason_words(bits).join("; ")
                );
            }
            self.fo.last_reasons = Some(bits);
        }
    }

    /// Rule 4: a primary that lost its peer and its uplink within the time the peer could take
    /// over fences itself.
    fn check_fence(&mut self) {
        if self.role != Role::Primary
            || self.settings.mutations.no_gateway_check
            || !self.auto_configured()
            || self.fo.uplink != UplinkHealth::Down
            || self.links.is_connected()
            || self.maintenance
            || self.fo.peer_beat.is_some_and(|b| b.maintenance)
        {
            return;
        }
        // Long after the peer was lost, it has marked itself outdated and cannot take over.
        let last = self.links.last_heard().unwrap_or(self.now);
        if self.now.millis_since(last) > self.takeover_window_ms() && self.freeze_until.is_none() {
            return;
        }
        self.fence("lost both the peer and the uplink (rule 4)");
    }

    fn fence(&mut self, reason: &str) {
        log::error!("fencing this node: {reason}");
        self.fo.fenced = true;
        self.role = Role::Fenced;
        self.mirroring = false;
        self.switching = false;
        self.freeze_until = None;
        if self.fo.holds_ip {
            self.fo.holds_ip = false;
            self.outputs.push_back(EngineOutput::ClusterIp(false));
        }
        self.outputs.push_back(EngineOutput::Serving(false));
        self.outputs.push_back(EngineOutput::Fence {
            reason: reason.to_string(),
        });
    }

    /// Rule 6: a primary whose uplink stays down hands over to an eligible peer.
    fn check_uplink_switchover(&mut self) {
        let Some(since) = self.fo.uplink_down_since else {
            return;
        };
        if self.role != Role::Primary
            || self.switching
            || self.maintenance
            || self.now.millis_since(since) < UPLINK_SWITCHOVER_AFTER_MS
            || self.now < self.fo.next_uplink_switchover
        {
            return;
        }
        self.fo.next_uplink_switchover = self.now.plus_millis(UPLINK_SWITCHOVER_RETRY_MS);
        if !self.peer_eligible() {
            log::warn!("uplink down but the peer is not eligible: this primary keeps serving");
            return;
        }
        log::warn!("uplink down: handing the role to the peer (rule 6)");
        let (ok, text) = self.start_switchover();
        if !ok {
            log::warn!("uplink-loss switchover refused: {text}");
        }
    }

    /// Rule 11, `failback = "preferred"`: the role goes back to the preferred node once it has
    /// been eligible for a while.
    fn check_failback(&mut self) {
        let wanted = self.settings.failback_preferred
            && self.settings.peer_preferred
            && self.role == Role::Primary
            && !self.switching
            && !self.maintenance
            && self.mirroring
            && self.peer_eligible()
            && self.fo.peer_beat.is_some_and(|b| !b.maintenance);
        if !wanted {
            self.fo.failback_since = None;
            return;
        }
        let since = *self.fo.failback_since.get_or_insert(self.now);
        if self.now.millis_since(since) >= FAILBACK_STABLE_MS {
            self.fo.failback_since = None;
            log::warn!("failback: returning the role to the preferred node");
            let (ok, text) = self.start_switchover();
            if !ok {
                log::warn!("failback refused: {text}");
            }
        }
    }

    /// Rule 3, first half: a secondary that just lost its peer probes the cluster IP if it may
    /// take over. `was_paired`: it was in sync with the peer when the peer was last heard.
    pub(super) fn start_takeover(&mut self, was_paired: bool) {
        let peer = self.peer_state.as_ref();
        let blocker = if !self.auto_configured() {
            Some("automatic failover is not configured (rule 5)")
        } else if self.maintenance || self.fo.peer_beat.is_some_and(|b| b.maintenance) {
            Some("maintenance mode")
        } else if !was_paired || self.disk != DiskFreshness::UpToDate || self.syncing {
            Some("this disk was not up to date and in sync")
        } else if !peer.is_some_and(|p| p.role == WireRole::Primary)
            && !self
                .fo
                .peer_beat
                .is_some_and(|b| b.role == WireRole::Primary)
        {
            Some("the peer was not primary")
        } else if self.fo.uplink != UplinkHealth::Healthy
            && !self.settings.mutations.no_gateway_check
        {
            Some("own uplink is not healthy")
        } else {
            None
        };
        if let Some(blocker) = blocker {
            log::warn!("peer lost; no takeover: {blocker}");
            return;
        }
        let last = self.takeover_last_heard();
        let deadline = last.plus_millis(self.takeover_window_ms());
        log::warn!(
            "peer lost: probing the cluster IP before taking over (silent_ms={})",
            self.now.millis_since(last)
        );
        if self.settings.mutations.no_arp_probe {
            self.finish_takeover(false, deadline);
            return;
        }
        self.fo.probe = Some(Probe::Takeover { deadline });
        self.outputs.push_back(EngineOutput::ProbeClusterIp);
    }

    /// Rule 3, second half: the probe ended.
    fn finish_takeover(&mut self, answered: bool, deadline: Instant) {
        if self.role != Role::Secondary || self.links.is_connected() {
            log::info!("takeover abandoned: the peer is back");
            return;
        }
        let refusal = if answered {
            Some("the cluster IP answered: the peer (or another host) still holds it")
        } else if self.now > deadline {
            Some("the takeover window passed before the probe ended")
        } else if self.fo.uplink != UplinkHealth::Healthy
            && !self.settings.mutations.no_gateway_check
        {
            Some("own uplink went down")
        } else if self.disk != DiskFreshness::UpToDate {
            Some("this disk is no longer up to date")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            log::warn!("no takeover: {refusal}; marking this disk outdated (the peer may be writing alone)");
            self.outdate_at = None;
            if self.disk == DiskFreshness::UpToDate {
                self.set_disk(DiskFreshness::Outdated);
            }
            return;
        }
        log::warn!("taking over: the peer is silent, the gateway answers and nobody holds the cluster IP (rule 3)");
        let new_id = self.fresh_id(None);
        let mut g = self.generations_now();
        g.start_new_generation(new_id);
        self.set_generations(g);
        self.set_flag(flags::PEER_OUTDATED, true);
        let peer_epoch = self
            .peer_state
            .as_ref()
            .map_or(0, |p| p.epoch)
            .max(self.fo.peer_beat.map_or(0, |b| b.epoch));
        self.promote(peer_epoch);
    }

    /// Demotes and fails every client request not yet acknowledged: the peer serves now, and
    /// nothing this node held may be acknowledged (rule 2).
    pub(super) fn demote_abandoning(&mut self) {
        self.freeze_until = None;
        self.fo.degrade_probe_at = None;
        self.demote();
        self.abandon_client_requests();
    }

    /// Replies held by the lease, the freeze or a defence go out if they may now.
    pub(super) fn release_held(&mut self) {
        self.fo.lease_held = false;
        let tags: Vec<u64> = self.reqs.keys().copied().collect();
        for tag in tags {
            self.try_finish(tag);
        }
        self.admit_waiting();
    }
}
