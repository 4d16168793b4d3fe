//! The faults of DESIGN.md §4, one at a time, with repair, and the random plan of a seed.
//!
//! | fault              | what it does                                              | repair             |
//! |--------------------|-----------------------------------------------------------|--------------------|
//! | `PowerCut`         | a board loses power (volatile state gone)                 | power on, boot     |
//! | `PowerCutBoth`     | both boards lose power together (the listed double fault) | both power on      |
//! | `DaemonHang`       | SIGSTOP: the kernel answers ARP and buffers; watchdog counts | SIGCONT         |
//! | `BoardStall`       | the whole board stops, its clock keeps counting           | it resumes         |
//! | `DaemonCrash`      | kill -9; the init system restarts it                      | (restart)          |
//! | `DaemonRestart`    | SIGTERM (clean stop), then a restart                      | (restart)          |
//! | `CablePull`        | the heartbeat cable, or one board's LAN cable             | plugged back       |
//! | `LinkLoss`         | one peer link loses every frame one way                   | frames flow        |
//! | `PortLoss`         | one board's LAN port loses every frame one way            | frames flow        |
//! | `LinkDelay`        | one direction of a peer link is delayed                   | delay gone         |
//! | `Replay`           | an earlier sealed chunk is sent again on a link           | -                  |
//! | `Duplicate`        | the latest chunk on a link arrives twice                  | -                  |
//! | `DiskErrors`       | a board's disk fails requests with EIO                    | it stops failing   |
//!
//! A hang or stall longer than the watchdog's reset time resets the board instead of
//! resuming. Never generated: the boards hidden from each other while both reach the gateway
//! (the uncovered fault), which no combination of these faults one at a time builds.

use tandem::peer::LinkKind;

use super::super::prng::Prng;
use super::lan::LanFaults;
use super::{Event, Outcome, PairSim, A, B, DAEMON_RESTART_MS};

/// Which faults a run draws: the whole model, or one corner of it for a quick test aimed at
/// one rule (`sim --faults NAME`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FaultSet {
    /// Every fault of the model.
    #[default]
    All,
    /// Whole-board stalls longer than the takeover window: the secondary takes over while the
    /// primary sleeps (the lease).
    LongStalls,
    /// Daemon hangs longer than the takeover window: the kernel still answers for the cluster
    /// IP (the cluster IP probe, the watchdog).
    LongHangs,
    /// Cables and LAN ports lost for a while (the gateway check, with `--double-faults`).
    CableLosses,
}

impl FaultSet {
    pub const ALL: [FaultSet; 4] = [
        FaultSet::All,
        FaultSet::LongStalls,
        FaultSet::LongHangs,
        FaultSet::CableLosses,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultSet::All => "all",
            FaultSet::LongStalls => "long-stalls",
            FaultSet::LongHangs => "long-hangs",
            FaultSet::CableLosses => "cable-losses",
        }
    }

    pub fn parse(name: &str) -> Option<FaultSet> {
        FaultSet::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether `fault`, lasting `duration_ms`, belongs to the set.
    pub fn allows(self, fault: &Fault, duration_ms: u64) -> bool {
        match self {
            FaultSet::All => true,
            FaultSet::LongStalls => matches!(fault, Fault::BoardStall(_)) && duration_ms > 1_700,
            FaultSet::LongHangs => matches!(fault, Fault::DaemonHang(_)) && duration_ms > 1_700,
            FaultSet::CableLosses => {
                matches!(fault, Fault::CablePull(_) | Fault::PortLoss { .. }) && duration_ms > 2_000
            }
        }
    }
}

/// A cable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cable {
    Heartbeat,
    /// Board `i`'s LAN cable.
    Lan(usize),
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    PowerCut(usize),
    PowerCutBoth,
    DaemonHang(usize),
    BoardStall(usize),
    /// The daemon is killed and restarts after this long.
    DaemonCrash(usize, u64),
    /// The daemon stops cleanly and restarts after this long.
    DaemonRestart(usize, u64),
    CablePull(Cable),
    LinkLoss {
        link: LinkKind,
        from: usize,
    },
    PortLoss {
        board: usize,
        inbound: bool,
    },
    LinkDelay {
        link: LinkKind,
        from: usize,
        extra_ms: u64,
    },
    Replay {
        link: LinkKind,
        from: usize,
        pick: u64,
    },
    Duplicate {
        link: LinkKind,
        from: usize,
    },
    DiskErrors {
        board: usize,
        per_million: u32,
    },
}

impl PairSim {
    /// The fault begins.
    pub fn apply(&mut self, fault: Fault) {
        self.report.faults += 1;
        self.event(None, Event::Fault(format!("{fault:?}")));
        let now = self.now;
        match fault {
            Fault::PowerCut(i) => self.power_off(i),
            Fault::PowerCutBoth => {
                self.power_off(A);
                self.power_off(B);
            }
            Fault::DaemonHang(i) => self.hang(i),
            Fault::BoardStall(i) => self.stall(i),
            Fault::DaemonCrash(i, restart_ms) => self.crash_daemon(i, restart_ms),
            Fault::DaemonRestart(i, restart_ms) => self.stop_daemon(i, restart_ms),
            Fault::CablePull(cable) => self.set_cable(cable, false),
            Fault::LinkLoss { link, from } => self.lan.faults.link_loss[link.index()][from] = true,
            Fault::PortLoss { board, inbound } => *self.lan.faults.port_loss(board, inbound) = true,
            Fault::LinkDelay {
                link,
                from,
                extra_ms,
            } => self.lan.faults.link_extra_ms[link.index()][from] = extra_ms,
            Fault::Replay { link, from, pick } => {
                self.lan.inject_replay(link, from, pick, false, now + 1);
            }
            Fault::Duplicate { link, from } => {
                self.lan.inject_replay(link, from, 0, true, now + 1);
            }
            Fault::DiskErrors { board, per_million } => {
                self.boards[board].disk_fail_per_million = per_million;
            }
        }
    }

    /// The fault ends (a board that the watchdog reset meanwhile is left as it is).
    pub fn repair(&mut self, fault: Fault) {
        self.event(None, Event::Repair(format!("{fault:?}")));
        match fault {
            Fault::PowerCut(i) => self.power_on(i),
            Fault::PowerCutBoth => {
                self.power_on(A);
                self.power_on(B);
            }
            Fault::DaemonHang(i) => self.resume(i),
            Fault::BoardStall(i) => self.unstall(i),
            Fault::DaemonCrash(..) | Fault::DaemonRestart(..) => {}
            Fault::CablePull(cable) => self.set_cable(cable, true),
            Fault::LinkLoss { link, from } => self.lan.faults.link_loss[link.index()][from] = false,
            Fault::PortLoss { board, inbound } => {
                *self.lan.faults.port_loss(board, inbound) = false
            }
            Fault::LinkDelay { link, from, .. } => {
                self.lan.faults.link_extra_ms[link.index()][from] = 0
            }
            Fault::Replay { .. } | Fault::Duplicate { .. } => {}
            Fault::DiskErrors { board, .. } => self.boards[board].disk_fail_per_million = 0,
        }
    }

    /// Plugs a cable in or pulls it.
    pub fn set_cable(&mut self, cable: Cable, plugged: bool) {
        match cable {
            Cable::Heartbeat => self.lan.faults.hb_cable = plugged,
            Cable::Lan(i) => self.lan.faults.lan_cable[i] = plugged,
        }
    }

    /// The boards are hidden from each other on the LAN while both still reach the gateway and
    /// the clients: the one fault DESIGN.md §4 does not cover (for a scenario that needs two
    /// primaries; never drawn at random).
    pub fn isolate_on_lan(&mut self, isolated: bool) {
        self.lan.faults.boards_isolated = isolated;
    }

    /// Everything back to normal: cables in, no loss or delay, disks healthy, boards powered,
    /// resumed, their daemons running.
    pub fn repair_all(&mut self) -> Outcome<()> {
        self.lan.faults = LanFaults::default();
        for i in [A, B] {
            self.boards[i].disk_fail_per_million = 0;
            self.unstall(i);
            self.resume(i);
            self.restart_daemon(i)?;
            self.power_on(i);
        }
        Ok(())
    }
}

/// How often `FaultPlan::draw_any` draws each kind of fault, in the order of its `match`: power
/// cut, both boards' power, daemon hang, board stall, daemon crash, daemon restart, cable pull,
/// peer link loss, LAN port loss, delay, replay, duplicate, disk errors.
const FAULT_WEIGHTS: [u32; 13] = [12, 4, 14, 12, 6, 4, 16, 8, 6, 6, 4, 3, 5];

/// The board a fault hits: the primary more often than the other (either, when there is no
/// single primary).
fn draw_board(p: &mut Prng, sim: &PairSim) -> usize {
    let primary = sim.primary().unwrap_or_else(|| p.below(2) as usize);
    if p.chance(600_000) {
        primary
    } else {
        1 - primary
    }
}

/// Draws of a fault before concluding that the run's fault set allows none of that kind.
const DRAWS_MAX: u32 = 1_000;

/// A fault and when it is repaired.
type Timed = (Fault, u64);

/// The random faults of a seed: one at a time, each repaired before the next begins. With
/// `double` (an exploration outside the fault model, off by default), a second fault may begin
/// while the first lasts: a cable, a LAN port, a power cut, a hang or a stall, never a peer
/// link's loss on the lan (which, with the heartbeat link gone, would hide the boards from each
/// other while both reach the gateway: the uncovered fault).
#[derive(Debug)]
pub(super) struct FaultPlan {
    prng: Prng,
    double: bool,
    next_start: u64,
    /// Faults under way, with when each is repaired.
    active: Vec<Timed>,
}

impl FaultPlan {
    pub(super) fn new(mut prng: Prng, double: bool) -> FaultPlan {
        let next_start = prng.range(1_000, 4_000);
        FaultPlan {
            prng,
            double,
            next_start,
            active: Vec::new(),
        }
    }

    /// When the plan acts next.
    pub(super) fn next_at(&self) -> u64 {
        self.active
            .iter()
            .map(|(_, at)| *at)
            .fold(self.next_start, u64::min)
    }

    /// Repairs the faults that are over, and begins the next one if it is due.
    pub(super) fn act(&mut self, sim: &mut PairSim) {
        let now = sim.now;
        let (over, lasting): (Vec<Timed>, Vec<Timed>) =
            self.active.drain(..).partition(|(_, at)| *at <= now);
        self.active = lasting;
        for (fault, _) in over {
            sim.repair(fault);
        }
        if now >= self.next_start {
            match self.active.first().copied() {
                None => {
                    let (fault, duration_ms) = self.draw(sim, FaultPlan::draw_any);
                    sim.apply(fault);
                    let end = now + duration_ms.max(1);
                    self.active.push((fault, end));
                    let overlap = self.double
                        && duration_ms > 100
                        && !matches!(
                            fault,
                            Fault::LinkLoss {
                                link: LinkKind::Lan,
                                ..
                            }
                        )
                        && self.prng.chance(500_000);
                    self.next_start = if overlap {
                        now + self.prng.range(0, duration_ms - 1)
                    } else {
                        u64::MAX
                    };
                }
                Some((_, first_end)) => {
                    // A fault set may allow no second fault at all (`long-hangs`: the second
                    // is never a hang): then the first lasts alone.
                    if let Some((fault, duration_ms)) =
                        self.try_draw(sim, FaultPlan::draw_second, DRAWS_MAX)
                    {
                        sim.apply(fault);
                        self.active
                            .push((fault, (now + duration_ms.max(1)).min(first_end)));
                    }
                    self.next_start = u64::MAX;
                }
            }
        }
        if self.active.is_empty() && self.next_start == u64::MAX {
            self.next_start = now + self.prng.range(300, 5_000);
        }
    }

    /// The faults stop: those under way are repaired.
    pub(super) fn stop(&mut self, sim: &mut PairSim) {
        for (fault, _) in std::mem::take(&mut self.active) {
            sim.repair(fault);
        }
    }

    /// A fault of the run's set (`PairOptions::faults`), drawn by `draw` until one is (every
    /// set allows some fault `draw_any` yields).
    fn draw(
        &mut self,
        sim: &PairSim,
        draw: fn(&mut FaultPlan, &PairSim) -> (Fault, u64),
    ) -> (Fault, u64) {
        loop {
            if let Some(drawn) = self.try_draw(sim, draw, DRAWS_MAX) {
                return drawn;
            }
        }
    }

    /// A fault of the run's set drawn by `draw`, if one of `attempts` draws is.
    fn try_draw(
        &mut self,
        sim: &PairSim,
        draw: fn(&mut FaultPlan, &PairSim) -> (Fault, u64),
        attempts: u32,
    ) -> Option<(Fault, u64)> {
        (0..attempts)
            .map(|_| draw(self, sim))
            .find(|(fault, duration_ms)| sim.options.faults.allows(fault, *duration_ms))
    }

    /// The second of two faults at once (see the type's documentation).
    fn draw_second(&mut self, sim: &PairSim) -> (Fault, u64) {
        let p = &mut self.prng;
        let board = draw_board(p, sim);
        let duration = p.range(200, 6_000);
        let fault = match p.below(6) {
            0 => Fault::CablePull(Cable::Heartbeat),
            1 => Fault::CablePull(Cable::Lan(board)),
            2 => Fault::PortLoss {
                board,
                inbound: p.chance(500_000),
            },
            3 => Fault::LinkLoss {
                link: LinkKind::Heartbeat,
                from: p.below(2) as usize,
            },
            4 => Fault::PowerCut(board),
            _ => Fault::BoardStall(board),
        };
        (fault, duration)
    }

    /// Any fault of the model, by the weights of `FAULT_WEIGHTS`.
    fn draw_any(&mut self, sim: &PairSim) -> (Fault, u64) {
        let p = &mut self.prng;
        let board = draw_board(p, sim);
        let link = if p.chance(500_000) {
            LinkKind::Heartbeat
        } else {
            LinkKind::Lan
        };
        let from = p.below(2) as usize;
        // Hangs and stalls: shorter than the dead time, around the takeover window, longer,
        // and (hangs) past the watchdog.
        let pause_ms = |p: &mut Prng, watchdog: bool| {
            let spans: &[(u64, u64)] = if watchdog {
                &[(100, 900), (1_000, 1_700), (1_700, 4_500), (5_000, 12_000)]
            } else {
                &[(100, 900), (1_000, 1_700), (1_700, 4_500)]
            };
            let (low, high) = p.pick(spans);
            p.range(low, high)
        };
        let total: u32 = FAULT_WEIGHTS.iter().sum();
        let mut roll = p.below(u64::from(total)) as u32;
        let mut kind = 0;
        for (k, weight) in FAULT_WEIGHTS.into_iter().enumerate() {
            if roll < weight {
                kind = k;
                break;
            }
            roll -= weight;
        }
        match kind {
            0 => (Fault::PowerCut(board), p.range(300, 8_000)),
            1 => (Fault::PowerCutBoth, p.range(300, 5_000)),
            2 => (Fault::DaemonHang(board), pause_ms(p, true)),
            3 => {
                let past_watchdog = p.chance(200_000);
                (Fault::BoardStall(board), pause_ms(p, past_watchdog))
            }
            4 => {
                let restart = p.range(DAEMON_RESTART_MS.0, DAEMON_RESTART_MS.1);
                (Fault::DaemonCrash(board, restart), restart)
            }
            5 => {
                let restart = p.range(DAEMON_RESTART_MS.0, DAEMON_RESTART_MS.1);
                (Fault::DaemonRestart(board, restart), restart)
            }
            6 => {
                let cable = if p.chance(400_000) {
                    Cable::Heartbeat
                } else {
                    Cable::Lan(board)
                };
                (Fault::CablePull(cable), p.range(200, 8_000))
            }
            7 => (Fault::LinkLoss { link, from }, p.range(200, 6_000)),
            8 => (
                Fault::PortLoss {
                    board,
                    inbound: p.chance(500_000),
                },
                p.range(200, 6_000),
            ),
            9 => (
                Fault::LinkDelay {
                    link,
                    from,
                    extra_ms: p.pick(&[20, 100, 400, 900, 1_500]),
                },
                p.range(300, 6_000),
            ),
            10 => (
                Fault::Replay {
                    link,
                    from,
                    pick: p.next_u64(),
                },
                1,
            ),
            11 => (Fault::Duplicate { link, from }, 1),
            _ => (
                Fault::DiskErrors {
                    board,
                    per_million: p.pick(&[20_000, 200_000, 1_000_000]),
                },
                p.range(100, 3_000),
            ),
        }
    }
}
