//! The node's hold on the LAN: the lan port's carrier, the gateway probe, the cluster IP and its
//! ARP probes, announcements and defence (DESIGN.md §4 rules 2-5). The engine decides; this
//! carries out and reports.
//!
//! - **Uplink**: healthy while the lan port has carrier and, when `uplink_probe` is set, the
//!   gateway answered an ARP request within `GATEWAY_SILENCE_MS` (an answer proves this node can
//!   receive, not only send). A carrier loss is seen at once through a netlink notification.
//! - **Probe** of the cluster IP: three RFC 5227 probes (sender 0.0.0.0) 100 ms apart, then
//!   150 ms of waiting; any ARP from another MAC that claims the address, or probes for it,
//!   means "answered".
//! - **Announcements**: gratuitous ARP bursts after the address is added, so switches and
//!   clients learn the new MAC at once.
//! - **Defence**: while this node holds the address, an ARP from another MAC claiming it is
//!   reported to the engine.

use crate::config::Config;
use crate::replication::engine::schedule::{
    probe_due_ms, ANNOUNCE_AT_MS, ANNOUNCE_LATE_MS, GATEWAY_PROBE_INTERVAL_MS, GATEWAY_SILENCE_MS,
    GATEWAY_UNANSWERED_MIN, PROBE_COUNT, PROBE_OVERRUN_MS,
};
use crate::replication::wire::UplinkHealth;
use crate::time::Instant;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, BorrowedFd};
use tandem_board::net::{self, ArpSocket, LinkWatch};

/// A lan port with no carrier at start is not yet "down": NICs negotiate their link for a few
/// seconds after they are set up (an e1000e under TCG, about 3 s). Until the carrier has been up
/// once or this much time has passed, the uplink is unknown, so a primary that boots a moment
/// before its link is up does not hand its role to the peer (rule 6) only to get it back.
const CARRIER_SETTLE_MS: u64 = 10_000;

/// What the LAN told the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClusterEvent {
    /// The uplink changed.
    Uplink(UplinkHealth),
    /// The probe of the cluster IP ended.
    ProbeDone { answered: bool },
    /// Another MAC claims the cluster IP while this node holds it.
    Conflict,
}

#[derive(Debug)]
struct ProbeRun {
    started: Instant,
    sent: u64,
    answered: bool,
}

impl ProbeRun {
    /// When the probe acts next: its next probe, or its end.
    fn due(&self) -> Instant {
        self.started.plus_millis(probe_due_ms(self.sent))
    }
}

/// The lan port, as failover needs it.
#[derive(Debug)]
pub(super) struct ClusterNet {
    ifname: String,
    ifindex: u32,
    /// This node's own address on the lan (the sender of gateway probes).
    local: Ipv4Addr,
    vip: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
    watch: Option<LinkWatch>,
    arp: Option<ArpSocket>,
    carrier: bool,
    /// Until the carrier has been up once: when the wait for it ends ([`CARRIER_SETTLE_MS`]).
    carrier_settles: Option<Instant>,
    gateway_heard: Option<Instant>,
    /// How long the gateway may stay silent before the uplink is down: GATEWAY_SILENCE_MS, or a
    /// quarter of the dead time when that is longer (the slow timing profile of emulated
    /// boards, whose emulated NICs deliver answers late under load).
    gateway_silence_ms: u64,
    /// Gateway probes sent since its last answer.
    gateway_unanswered: u32,
    next_gateway_probe: Instant,
    reported: Option<UplinkHealth>,
    probe: Option<ProbeRun>,
    holds_vip: bool,
    announce_from: Option<Instant>,
    announced: usize,
    events: Vec<ClusterEvent>,
}

impl ClusterNet {
    /// Finds the lan port (the interface holding `[peer] lan.local`) and opens its carrier
    /// watch and ARP socket. `None` without a peer, or on loopback (tests on one host): the
    /// uplink is then "unknown", and without a cluster IP nothing here is needed.
    pub(super) fn open(config: &Config, now: Instant) -> Option<ClusterNet> {
        let peer = config.peer.as_ref()?;
        let IpAddr::V4(local) = peer.lan.local.ip() else {
            log::warn!("uplink: the lan address is not IPv4; uplink health unknown");
            return None;
        };
        if local.is_loopback() {
            return None;
        }
        let (ifname, ifindex) = match net::interface_for_address(local) {
            Ok(Some(found)) => found,
            Ok(None) => {
                log::error!(
                    "uplink: no interface holds the lan address {local}; uplink health unknown"
                );
                return None;
            }
            Err(e) => {
                log::error!("uplink: cannot list interfaces (error={e}); uplink health unknown");
                return None;
            }
        };
        let watch = LinkWatch::open(ifindex)
            .inspect_err(|e| log::error!("uplink: cannot watch {ifname}'s carrier (error={e})"))
            .ok();
        let carrier = watch
            .as_ref()
            .and_then(|w| w.carrier_now().ok())
            .unwrap_or(false);
        let vip = config.cluster.vip.as_ref().map(|v| (v.addr, v.prefix_len));
        let gateway = match config.cluster.uplink_probe {
            Some(IpAddr::V4(gw)) => Some(gw),
            _ => None,
        };
        let arp = if vip.is_some() || gateway.is_some() {
            ArpSocket::open(ifindex)
                .inspect_err(|e| log::error!("uplink: cannot open an ARP socket on {ifname} (error={e}); no takeover is possible"))
                .ok()
        } else {
            None
        };
        log::info!(
            "uplink: watching the lan port (interface={ifname} carrier={carrier} gateway={})",
            gateway.map_or("none".to_string(), |g| g.to_string())
        );
        let mut cluster = ClusterNet {
            ifname,
            ifindex,
            local,
            vip,
            gateway,
            watch,
            arp,
            carrier,
            carrier_settles: (!carrier).then(|| now.plus_millis(CARRIER_SETTLE_MS)),
            gateway_heard: None,
            gateway_silence_ms: GATEWAY_SILENCE_MS.max(u64::from(config.cluster.dead_time_ms) / 4),
            gateway_unanswered: 0,
            next_gateway_probe: now,
            reported: None,
            probe: None,
            holds_vip: false,
            announce_from: None,
            announced: 0,
            events: Vec::new(),
        };
        cluster.remove_stale_vip();
        Some(cluster)
    }

    /// Rule 9: a node that starts holds no cluster IP (a previous life may have left it).
    fn remove_stale_vip(&mut self) {
        let Some((addr, prefix)) = self.vip else {
            return;
        };
        match net::remove_address(self.ifindex, addr, prefix) {
            Ok(true) => log::warn!(
                "removed a stale cluster IP at start (address={addr} interface={})",
                self.ifname
            ),
            Ok(false) => {}
            Err(e) => log::error!("cannot remove a stale cluster IP (address={addr} error={e})"),
        }
    }

    /// The carrier watch's descriptor (for epoll).
    pub(super) fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        self.watch.as_ref().map(|w| w.as_fd())
    }

    /// The ARP socket's descriptor (for epoll).
    pub(super) fn arp_fd(&self) -> Option<BorrowedFd<'_>> {
        self.arp.as_ref().map(|a| a.as_fd())
    }

    /// The uplink now.
    pub(super) fn uplink(&self, now: Instant) -> UplinkHealth {
        if !self.carrier {
            return match self.carrier_settles {
                Some(settles) if now < settles => UplinkHealth::Unknown,
                _ => UplinkHealth::Down,
            };
        }
        if self.gateway.is_none() {
            return UplinkHealth::Healthy;
        }
        let silent = self.gateway_unanswered >= GATEWAY_UNANSWERED_MIN;
        match self.gateway_heard {
            Some(t) if now.millis_since(t) < self.gateway_silence_ms || !silent => {
                UplinkHealth::Healthy
            }
            // Not heard since start: unknown until the first answer or the silence.
            None if !silent => UplinkHealth::Unknown,
            _ => UplinkHealth::Down,
        }
    }

    /// The next instant `handle_timeout` has something to do.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        let gateway = self.gateway.map(|_| self.next_gateway_probe);
        let probe = self.probe.as_ref().map(ProbeRun::due);
        let announce = self.announce_from.and_then(|from| {
            ANNOUNCE_AT_MS
                .get(self.announced)
                .map(|&at| from.plus_millis(at))
        });
        let silence = self
            .gateway_heard
            .map(|t| t.plus_millis(self.gateway_silence_ms));
        [gateway, probe, announce, silence, self.carrier_settles]
            .into_iter()
            .flatten()
            .min()
    }

    /// The events for the engine since the last call.
    pub(super) fn take_events(&mut self) -> Vec<ClusterEvent> {
        std::mem::take(&mut self.events)
    }

    /// Time passed: probes and announcements go out, a probe ends, the uplink is re-judged.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        if let (Some(gateway), Some(arp)) = (self.gateway, self.arp.as_ref()) {
            if now >= self.next_gateway_probe {
                if let Err(e) = arp.send_request(self.local, gateway) {
                    log::debug!("uplink: gateway probe not sent (error={e})");
                }
                self.gateway_unanswered = self.gateway_unanswered.saturating_add(1);
                self.next_gateway_probe = now.plus_millis(GATEWAY_PROBE_INTERVAL_MS);
            }
        }
        if self.carrier_settles.is_some_and(|settles| now >= settles) {
            self.carrier_settles = None;
        }
        self.step_probe(now);
        self.step_announce(now);
        self.report_uplink(now);
    }

    fn step_probe(&mut self, now: Instant) {
        let Some(probe) = self.probe.as_mut() else {
            return;
        };
        // A probe overrun by a stall of this board proves nothing: its probes would all go out
        // at once and the answers could not be back yet. It starts again.
        if now.millis_since(probe.due()) > PROBE_OVERRUN_MS {
            log::warn!("cluster IP probe overrun by a stall of this node; probing again");
            probe.started = now;
            probe.sent = 0;
        }
        let Some((vip, _)) = self.vip else {
            self.probe = None;
            self.events.push(ClusterEvent::ProbeDone { answered: true });
            return;
        };
        while probe.sent < PROBE_COUNT && now >= probe.due() {
            if let Some(arp) = self.arp.as_ref() {
                if let Err(e) = arp.send_probe(vip) {
                    log::warn!("cluster IP: probe not sent (error={e})");
                }
            }
            probe.sent += 1;
        }
        if probe.sent == PROBE_COUNT && now >= probe.due() {
            let answered = probe.answered;
            self.probe = None;
            log::info!("cluster IP probe done (address={vip} answered={answered})");
            self.events.push(ClusterEvent::ProbeDone { answered });
        }
    }

    fn step_announce(&mut self, now: Instant) {
        let (Some(from), Some((vip, _))) = (self.announce_from, self.vip) else {
            return;
        };
        while let Some(&at) = ANNOUNCE_AT_MS.get(self.announced) {
            if now < from.plus_millis(at) {
                return;
            }
            if now.millis_since(from.plus_millis(at)) > ANNOUNCE_LATE_MS {
                // This node was stalled: what it would announce now may no longer be true (the
                // peer may hold the address). The engine decides again; nothing stale goes out.
                break;
            }
            if let Some(arp) = self.arp.as_ref() {
                if let Err(e) = arp.send_announcement(vip) {
                    log::warn!("cluster IP: announcement not sent (error={e})");
                }
            }
            self.announced += 1;
        }
        self.announce_from = None;
    }

    fn report_uplink(&mut self, now: Instant) {
        let uplink = self.uplink(now);
        if self.reported != Some(uplink) {
            self.reported = Some(uplink);
            self.events.push(ClusterEvent::Uplink(uplink));
        }
    }

    /// The carrier watch is readable.
    pub(super) fn handle_watch(&mut self, now: Instant) {
        if let Some(carrier) = self.watch.as_mut().and_then(|w| w.drain()) {
            if carrier != self.carrier {
                log::warn!(
                    "lan port carrier changed (interface={} carrier={carrier})",
                    self.ifname
                );
                self.carrier = carrier;
                if carrier {
                    self.carrier_settles = None;
                }
            }
        }
        self.report_uplink(now);
    }

    /// The ARP socket is readable.
    pub(super) fn handle_arp(&mut self, now: Instant) {
        let Some(arp) = self.arp.as_mut() else {
            return;
        };
        let own_mac = arp.mac();
        loop {
            let packet = match arp.recv() {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(e) => {
                    log::debug!("uplink: ARP receive failed (error={e})");
                    break;
                }
            };
            if packet.sender_mac == own_mac {
                continue;
            }
            if Some(packet.sender_ip) == self.gateway {
                self.gateway_heard = Some(now);
                self.gateway_unanswered = 0;
            }
            let Some((vip, _)) = self.vip else {
                continue;
            };
            // Someone uses the address. A probe from 0.0.0.0 is another node asking, not holding
            // it: the peer probing for a takeover while this primary degrades must not make it
            // step down (the kernel of whichever node holds the address answers both).
            if packet.sender_ip != vip {
                continue;
            }
            if let Some(probe) = self.probe.as_mut() {
                if !probe.answered {
                    log::warn!(
                        "cluster IP probe answered (address={vip} by_mac={} sender={} op={})",
                        mac_text(&packet.sender_mac),
                        packet.sender_ip,
                        packet.op
                    );
                }
                probe.answered = true;
            }
            if self.holds_vip {
                log::warn!(
                    "cluster IP claimed by another MAC (address={vip} mac={})",
                    mac_text(&packet.sender_mac)
                );
                self.events.push(ClusterEvent::Conflict);
            }
        }
        self.report_uplink(now);
    }

    /// Starts a probe of the cluster IP.
    pub(super) fn start_probe(&mut self, now: Instant) {
        if self.arp.is_none() {
            // Nothing proves the address is free: report it held (no takeover).
            self.events.push(ClusterEvent::ProbeDone { answered: true });
            return;
        }
        // Whatever waits in the socket arrived before this probe (a node that was stopped finds
        // its peer's own takeover probes there): taken now, it answers nothing.
        self.handle_arp(now);
        self.probe = Some(ProbeRun {
            started: now,
            sent: 0,
            answered: false,
        });
        self.step_probe(now);
    }

    /// Adds the cluster IP (again: only announces it again) and starts the announcements.
    pub(super) fn add_vip(&mut self, now: Instant) {
        let Some((addr, prefix)) = self.vip else {
            return;
        };
        if !self.holds_vip {
            match net::add_address(self.ifindex, addr, prefix) {
                Ok(()) => log::warn!(
                    "cluster IP added (address={addr}/{prefix} interface={})",
                    self.ifname
                ),
                Err(e) => log::error!("cannot add the cluster IP (address={addr} error={e})"),
            }
            self.holds_vip = true;
        }
        self.announce_from = Some(now);
        self.announced = 0;
        self.step_announce(now);
    }

    /// Drops the cluster IP.
    pub(super) fn remove_vip(&mut self) {
        let Some((addr, prefix)) = self.vip else {
            return;
        };
        self.holds_vip = false;
        self.announce_from = None;
        match net::remove_address(self.ifindex, addr, prefix) {
            Ok(true) => log::warn!(
                "cluster IP dropped (address={addr} interface={})",
                self.ifname
            ),
            Ok(false) => {}
            Err(e) => log::error!("cannot drop the cluster IP (address={addr} error={e})"),
        }
    }
}

/// The carrier of the interface holding `ip` now, for `links`: "on", "off", or "unknown"
/// (loopback, or the address is on no interface).
pub(super) fn carrier_word(ip: IpAddr) -> &'static str {
    let IpAddr::V4(ip) = ip else {
        return "unknown";
    };
    if ip.is_loopback() {
        return "unknown";
    }
    let carrier = net::interface_for_address(ip)
        .ok()
        .flatten()
        .and_then(|(_, index)| LinkWatch::open(index).ok())
        .and_then(|watch| watch.carrier_now().ok());
    match carrier {
        Some(true) => "on",
        Some(false) => "off",
        None => "unknown",
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
