//! A board's hold on the LAN, as its runtime keeps it (`runtime/cluster.rs`, redone on virtual
//! time and stepped only while the daemon runs): the uplink (the lan port's carrier and the
//! gateway probe), the probe of the cluster IP (three probes 100 ms apart, 150 ms of waiting,
//! answered by a kernel that holds the address or by another board probing at once), and the
//! gratuitous announcements after the address is added (which move the clients' ARP caches and
//! tell a board that also holds the address about the conflict).

use tandem::replication::wire::UplinkHealth;

use super::board::Input;
use super::lan::Host;
use super::{Event, Outcome, PairSim};

use tandem::replication::engine::schedule::{
    probe_due_ms, ANNOUNCE_AT_MS, ANNOUNCE_LATE_MS, GATEWAY_PROBE_INTERVAL_MS, GATEWAY_SILENCE_MS,
    GATEWAY_UNANSWERED_MIN, PROBE_COUNT, PROBE_OVERRUN_MS,
};

/// A probe of the cluster IP under way.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProbeRun {
    pub(super) started: u64,
    pub(super) sent: u64,
    pub(super) answered: bool,
}

/// The daemon's side of the LAN, as `runtime/cluster.rs` keeps it.
#[derive(Debug, Default)]
pub(super) struct BoardNet {
    pub(super) gateway_heard: Option<u64>,
    /// Gateway probes sent since its last answer.
    pub(super) gateway_unanswered: u32,
    pub(super) next_gateway_probe: u64,
    pub(super) reported: Option<UplinkHealth>,
    pub(super) probe: Option<ProbeRun>,
    pub(super) holds_vip: bool,
    pub(super) announce_from: Option<u64>,
    pub(super) announced: usize,
}

impl BoardNet {
    /// The uplink, judged as `ClusterNet::uplink` does.
    pub(super) fn uplink(&self, carrier: bool, gateway_probe: bool, now: u64) -> UplinkHealth {
        if !carrier {
            return UplinkHealth::Down;
        }
        if !gateway_probe {
            return UplinkHealth::Healthy;
        }
        // Silent only once enough probes went unanswered: a board that was stalled (nothing
        // sent) does not blame the gateway for its own silence.
        let silent = self.gateway_unanswered >= GATEWAY_UNANSWERED_MIN;
        match self.gateway_heard {
            Some(t) if now - t < GATEWAY_SILENCE_MS || !silent => UplinkHealth::Healthy,
            None if !silent => UplinkHealth::Unknown,
            _ => UplinkHealth::Down,
        }
    }

    /// The next instant something is due.
    pub(super) fn poll_timeout(&self, gateway_probe: bool) -> Option<u64> {
        let gateway = gateway_probe.then_some(self.next_gateway_probe);
        let probe = self.probe.map(|p| p.started + probe_due_ms(p.sent));
        let announce = self
            .announce_from
            .and_then(|from| ANNOUNCE_AT_MS.get(self.announced).map(|at| from + at));
        let silence = self.gateway_heard.map(|t| t + GATEWAY_SILENCE_MS);
        [gateway, probe, announce, silence]
            .into_iter()
            .flatten()
            .min()
    }

    pub(super) fn gateway_due(&mut self, now: u64) -> bool {
        if now < self.next_gateway_probe {
            return false;
        }
        self.next_gateway_probe = now + GATEWAY_PROBE_INTERVAL_MS;
        self.gateway_unanswered = self.gateway_unanswered.saturating_add(1);
        true
    }
}

impl PairSim {
    /// The runtime's lan port: gateway probes, the cluster IP probe and announcements, the
    /// uplink as the engine hears it.
    pub(super) fn net_turn(&mut self, i: usize) -> Outcome<()> {
        let now = self.now;
        let gateway_probe = self.options.gateway_probe;
        if gateway_probe
            && self.boards[i].net.gateway_due(now)
            && self.lan.lan_both_ways(Host::Board(i), Host::Gateway)
        {
            self.boards[i].net.gateway_heard = Some(now);
            self.boards[i].net.gateway_unanswered = 0;
        }
        self.probe_step(i)?;
        self.announce_step(i);
        let carrier = self.lan.faults.lan_cable[i];
        let uplink = self.boards[i].net.uplink(carrier, gateway_probe, now);
        if self.boards[i].net.reported != Some(uplink) && self.boards[i].running() {
            self.boards[i].net.reported = Some(uplink);
            self.event(Some(i), Event::Note(format!("uplink {}", uplink.name())));
            self.engine(i, |m, now| m.set_uplink(uplink, now))?;
        }
        Ok(())
    }

    pub(super) fn probe_step(&mut self, i: usize) -> Outcome<()> {
        let Some(mut probe) = self.boards[i].net.probe else {
            return Ok(());
        };
        let now = self.now;
        // As the runtime: a probe that this board's own stall overran starts again.
        if now > probe.started + probe_due_ms(probe.sent) + PROBE_OVERRUN_MS {
            probe.started = now;
            probe.sent = 0;
        }
        while probe.sent < PROBE_COUNT && now >= probe.started + probe_due_ms(probe.sent) {
            // A probe goes out (sender 0.0.0.0): a kernel holding the address answers it.
            if self.arp_answers(i) {
                probe.answered = true;
            }
            probe.sent += 1;
        }
        self.boards[i].net.probe = Some(probe);
        if probe.sent == PROBE_COUNT && now >= probe.started + probe_due_ms(probe.sent) {
            self.boards[i].net.probe = None;
            let answered = probe.answered;
            self.event(Some(i), Event::ProbeDone { answered });
            self.engine(i, |m, now| m.handle_cluster_ip_probe(answered, now))?;
        }
        Ok(())
    }

    /// Another board answers a probe of board `i` for the cluster IP: its kernel holds the
    /// address and runs, and the LAN carries both ways.
    fn arp_answers(&self, i: usize) -> bool {
        let j = 1 - i;
        let both_ways = self.lan.lan_both_ways(Host::Board(i), Host::Board(j));
        self.lan.holders[j] && self.boards[j].kernel_up() && both_ways
    }

    pub(super) fn announce_step(&mut self, i: usize) {
        let Some(from) = self.boards[i].net.announce_from else {
            return;
        };
        let now = self.now;
        while let Some(&at) = ANNOUNCE_AT_MS.get(self.boards[i].net.announced) {
            if now < from + at {
                return;
            }
            if now - (from + at) > ANNOUNCE_LATE_MS {
                // As the runtime: a burst that fell due during a stall is dropped.
                self.boards[i].net.announce_from = None;
                return;
            }
            // Gratuitous ARP: the clients' caches follow it, another holder sees a conflict.
            let j = 1 - i;
            if self.lan.lan_path(Host::Board(i), Host::Board(j)) && self.boards[j].daemon_alive() {
                let claim = Input::Announcement { sent_at: now };
                self.boards[j].push_input(now + 1, claim);
            }
            if self.lan.lan_path(Host::Board(i), Host::Client) {
                self.lan.arp_cache = Some(i);
                self.lan.last_announce[i] = Some(now);
                // What the clients send from now on reaches this board, whose kernel resets
                // connections it does not know; what the old holder already took, it keeps.
                self.reset_clients_of_other(i);
            }
            self.boards[i].net.announced += 1;
        }
        self.boards[i].net.announce_from = None;
    }
}
