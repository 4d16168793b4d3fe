//! The rules of DESIGN.md §4, one scripted scenario each, in the two-node simulator
//! (`tandem_tests::sim::pair`): a fixed fault script on virtual time, the real engines, clients
//! writing and reading through the cluster IP, and every checker of the seed runs on (never two
//! writers, no lost acknowledged write, epochs that only grow). Each scenario then settles the
//! pair and checks that the replicas are identical and hold every acknowledged write. Last come
//! the experiments of the seeds: the primary's power cut in the middle of a copy, and the dead
//! board's return.

use tandem::node::{DiskState, PeerState, Role};
use tandem_tests::sim::pair::{Cable, Event, Fault, PairOptions, PairSim, A, B};

/// The dead time the scenarios use (the default), and the takeover window it implies.
const DEAD_TIME_MS: u64 = 1_000;
const TAKEOVER_WINDOW_MS: u64 = 1_500;

fn ok<T>(result: Result<T, tandem_tests::sim::pair::PairFailure>) -> T {
    result.unwrap_or_else(|failure| panic!("{failure}"))
}

/// A pair that has paired and elected `nas-a` (the preferred node), with its clients busy.
fn paired(options: PairOptions) -> PairSim {
    let mut sim = PairSim::new(1, options);
    let ready = ok(sim.run_until_cond(10_000, |s| {
        s.primary() == Some(A)
            && [A, B].into_iter().all(|i| {
                s.disk_state(i) == Some(DiskState::UpToDate)
                    && s.peer_state(i) == Some(PeerState::Connected)
            })
    }));
    assert!(ready, "the pair did not pair:\n{}", sim.timeline_text());
    // Some writes acknowledged before the script starts.
    ok(sim.run_for(1_000));
    assert!(
        !sim.acks().is_empty(),
        "no write acknowledged before the script"
    );
    sim
}

fn paired_default() -> PairSim {
    paired(PairOptions::default())
}

/// A paired pair whose primary is `nas-b` (by switchover), so that the primary is the follower
/// of the exchanges and the node that accepts the links.
fn paired_with_b_primary() -> PairSim {
    let mut sim = paired_default();
    let (accepted, reply) = ok(sim.switchover(A));
    assert!(accepted, "{reply}");
    let moved = ok(sim.run_until_cond(3_000, |s| s.primary() == Some(B)));
    assert!(moved, "the switchover did not happen");
    ok(sim.run_for(1_000));
    sim
}

/// Acknowledgements by `board` in `from..to`.
fn acks_by(sim: &PairSim, board: usize, from: u64, to: u64) -> usize {
    sim.acks()
        .iter()
        .filter(|a| a.board == board && a.at >= from && a.at < to)
        .count()
}

fn promoted_at(sim: &PairSim, board: usize, since: u64) -> Option<u64> {
    sim.first_event(board, since, |e| matches!(e, Event::Promoted { .. }))
}

fn settle(sim: &mut PairSim) {
    ok(sim.settle());
}

// ---- rule 1: the lease ---------------------------------------------------------------------

#[test]
fn a_primary_that_wakes_from_a_stall_finds_its_lease_expired_and_acknowledges_nothing() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.stall(A);
    ok(sim.run_for(3_000));
    let promoted = promoted_at(&sim, B, t0).expect("nas-b takes over while nas-a is stalled");
    sim.unstall(A);
    let woke = sim.now();
    ok(sim.run_for(3_000));
    assert_eq!(
        acks_by(&sim, A, t0, sim.now()),
        0,
        "nas-a acknowledged after its stall began:\n{}",
        sim.timeline_text()
    );
    assert!(acks_by(&sim, B, promoted, sim.now()) > 0, "nas-b serves");
    assert!(sim.any_event(A, woke, |e| *e == Event::Demoted));
    assert_eq!(sim.primary(), Some(B));
    settle(&mut sim);
}

// ---- rule 2: the degrade procedure ---------------------------------------------------------

#[test]
fn a_primary_that_loses_its_secondary_holds_writes_for_the_takeover_window_then_serves_alone() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.power_off(B);
    ok(sim.run_for(4_000));
    // The lease runs out about a dead time after nas-b was last heard; the wait ends a
    // takeover window after it.
    let held = acks_by(
        &sim,
        A,
        t0 + DEAD_TIME_MS + 20,
        t0 + TAKEOVER_WINDOW_MS - 20,
    );
    assert_eq!(held, 0, "acknowledged inside the takeover window");
    assert!(
        acks_by(&sim, A, t0 + TAKEOVER_WINDOW_MS, sim.now()) > 0,
        "nas-a serves alone after the window:\n{}",
        sim.timeline_text()
    );
    assert_eq!(sim.primary(), Some(A));
    let sb = sim.persisted_superblock(A).expect("a superblock");
    assert!(
        sb.has_flag(tandem::metadata::flags::PEER_OUTDATED),
        "the peer is marked outdated on disk before serving alone"
    );
    sim.power_on(B);
    settle(&mut sim);
}

// ---- rule 3: takeover ----------------------------------------------------------------------

#[test]
fn a_primary_power_cut_is_taken_over_within_the_takeover_window() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.power_off(A);
    ok(sim.run_for(3_000));
    let promoted = promoted_at(&sim, B, t0).expect("nas-b takes over");
    let failover_ms = promoted - t0;
    assert!(
        failover_ms < 1_600,
        "failover took {failover_ms} ms:\n{}",
        sim.timeline_text()
    );
    assert!(sim.holds_cluster_ip(B) && sim.serving(B));
    assert!(acks_by(&sim, B, promoted, sim.now()) > 0, "nas-b serves");
    sim.power_on(A);
    settle(&mut sim);
}

#[test]
fn a_hung_daemon_still_answers_for_the_cluster_ip_so_its_secondary_only_outdates_itself() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.hang(A);
    ok(sim.run_for(2_500));
    assert!(
        promoted_at(&sim, B, t0).is_none(),
        "nas-b took over from a live kernel:\n{}",
        sim.timeline_text()
    );
    assert!(sim.any_event(B, t0, |e| *e == Event::Disk(DiskState::Outdated)));
    sim.resume(A);
    let resumed = sim.now();
    ok(sim.run_for(3_000));
    assert_eq!(sim.primary(), Some(A), "{}", sim.timeline_text());
    assert!(
        acks_by(&sim, A, resumed, sim.now()) > 0,
        "nas-a serves again"
    );
    settle(&mut sim);
}

/// The watchdog covers what the lease cannot: a daemon hung for good is reset. Its secondary,
/// which found the cluster IP held when it lost it, stays outdated (it cannot know what the hung
/// primary wrote); the reset board comes back, the pair pairs again and elects it, nothing lost.
#[test]
fn a_daemon_hung_past_the_watchdog_is_reset_and_the_pair_recovers_around_it() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.hang(A);
    ok(sim.run_for(20_000));
    assert!(sim.any_event(A, t0, |e| *e == Event::WatchdogReset));
    assert!(sim.any_event(B, t0, |e| *e == Event::Disk(DiskState::Outdated)));
    assert!(
        promoted_at(&sim, B, t0).is_none(),
        "nas-b took over from an outdated disk"
    );
    assert_eq!(sim.primary(), Some(A), "{}", sim.timeline_text());
    settle(&mut sim);
}

// ---- rule 4: self-fence ----------------------------------------------------------------------

#[test]
fn a_primary_that_loses_its_lan_cable_and_its_heartbeat_link_fences_itself() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.set_cable(Cable::Heartbeat, false);
    sim.set_cable(Cable::Lan(A), false);
    ok(sim.run_for(4_000));
    assert!(
        sim.any_event(A, t0, |e| matches!(e, Event::Fenced(_))),
        "nas-a did not fence:\n{}",
        sim.timeline_text()
    );
    assert!(promoted_at(&sim, B, t0).is_some(), "nas-b takes over");
    sim.set_cable(Cable::Heartbeat, true);
    sim.set_cable(Cable::Lan(A), true);
    settle(&mut sim);
}

// ---- rule 5: no automatic takeover without a cluster IP or a gateway probe --------------------

fn no_takeover_without(options: PairOptions) {
    let mut sim = paired(options);
    let readiness = sim.readiness(B).expect("nas-b runs");
    assert!(!readiness.auto_failover);
    assert!(
        readiness
            .not_ready_reasons
            .iter()
            .any(|r| r.contains("rule 5")),
        "{readiness:?}"
    );
    let t0 = sim.now();
    sim.power_off(A);
    ok(sim.run_for(5_000));
    assert!(promoted_at(&sim, B, t0).is_none(), "nas-b took over");
    assert_eq!(sim.role(B), Some(Role::Secondary));
    let (accepted, reply) = ok(sim.switchover(B));
    assert!(!accepted, "{reply}");
    let (accepted, reply) = ok(sim.force_promote(B));
    assert!(accepted, "{reply}");
    ok(sim.run_for(500));
    assert_eq!(sim.role(B), Some(Role::Primary));
}

#[test]
fn without_a_cluster_ip_a_secondary_never_takes_over_on_its_own() {
    no_takeover_without(PairOptions {
        cluster_ip: false,
        check_liveness: false,
        ..PairOptions::default()
    });
}

#[test]
fn without_a_gateway_probe_a_secondary_never_takes_over_on_its_own() {
    no_takeover_without(PairOptions {
        gateway_probe: false,
        check_liveness: false,
        ..PairOptions::default()
    });
}

// ---- rule 6: switchover on uplink loss -------------------------------------------------------

#[test]
fn a_primary_that_loses_its_lan_cable_hands_the_role_to_its_peer() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.set_cable(Cable::Lan(A), false);
    ok(sim.run_for(3_000));
    let promoted = promoted_at(&sim, B, t0).expect("nas-b takes the role");
    assert!(
        promoted - t0 < 1_000,
        "switchover took {} ms",
        promoted - t0
    );
    assert!(!sim.any_event(A, t0, |e| matches!(e, Event::Fenced(_))));
    assert!(acks_by(&sim, B, promoted, sim.now()) > 0, "nas-b serves");
    // Back in: the role stays where it is (failback is manual by default).
    sim.set_cable(Cable::Lan(A), true);
    ok(sim.run_for(5_000));
    assert_eq!(sim.primary(), Some(B));
    settle(&mut sim);
}

#[test]
fn a_secondary_that_loses_its_lan_cable_moves_nothing() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.set_cable(Cable::Lan(B), false);
    ok(sim.run_for(5_000));
    assert_eq!(sim.primary(), Some(A));
    assert!(!sim.any_event(A, t0, |e| *e == Event::Demoted));
    assert!(
        acks_by(&sim, A, t0 + 3_000, sim.now()) > 0,
        "nas-a still serves"
    );
    sim.set_cable(Cable::Lan(B), true);
    settle(&mut sim);
}

// ---- the heartbeat cable ----------------------------------------------------------------------

#[test]
fn a_pulled_heartbeat_cable_moves_nothing_and_mirroring_goes_on_over_the_lan() {
    let mut sim = paired_default();
    let t0 = sim.now();
    sim.set_cable(Cable::Heartbeat, false);
    ok(sim.run_for(5_000));
    assert_eq!(sim.primary(), Some(A));
    assert!(!sim.any_event(A, t0, |e| *e == Event::Demoted));
    assert!(!sim.any_event(B, t0, |e| matches!(e, Event::Disk(_))));
    // Writes never stop for long: the stream moves to the lan link.
    for window in 0..5 {
        let from = t0 + window * 1_000;
        assert!(
            acks_by(&sim, A, from, from + 1_000) > 0,
            "no acknowledgement in {from}..{} ms",
            from + 1_000
        );
    }
    assert_eq!(sim.disk_state(B), Some(DiskState::UpToDate));
    sim.set_cable(Cable::Heartbeat, true);
    settle(&mut sim);
}

// ---- rule 10: disks -------------------------------------------------------------------------

/// Every write fails on the primary's own disk for a moment, while its peer applies each one:
/// the clients get the error, and the regions are resynced from the primary so that the
/// replicas agree again.
#[test]
fn a_write_that_fails_on_the_primarys_disk_is_resynced_to_its_peer() {
    let mut sim = paired_default();
    let fault = Fault::DiskErrors {
        board: A,
        per_million: 1_000_000,
    };
    sim.apply(fault);
    let marked = ok(sim.run_until_cond(2_000, |s| s.dirty_bytes(A).is_some_and(|d| d > 0)));
    assert!(
        marked,
        "no failed write was marked dirty:\n{}",
        sim.timeline_text()
    );
    sim.repair(fault);
    ok(sim.run_for(2_000));
    assert_eq!(sim.primary(), Some(A));
    settle(&mut sim);
}

// ---- pairing: the exchange and what it must not forget --------------------------------------

/// nas-b (the follower of the exchanges) is primary and hangs past the dead time. When it
/// wakes, its degrade procedure runs while nas-a, the leader, starts an exchange at once; the
/// follower passes over that start and asks for one when it is done. The leader must answer,
/// or the pair never mirrors again.
#[test]
fn a_follower_that_degrades_while_the_leader_starts_an_exchange_pairs_after_it() {
    let mut sim = paired_with_b_primary();
    sim.hang(B);
    ok(sim.run_for(DEAD_TIME_MS + 600));
    assert_eq!(sim.disk_state(A), Some(DiskState::Outdated));
    sim.resume(B);
    let paired = ok(sim.run_until_cond(8_000, |s| {
        s.primary() == Some(B)
            && s.disk_state(A) == Some(DiskState::UpToDate)
            && s.dirty_bytes(B) == Some(0)
    }));
    assert!(
        paired,
        "the pair did not pair again:\n{}",
        sim.timeline_text()
    );
    settle(&mut sim);
}

/// The primary stops cleanly during its degrade procedure, with writes its stalled peer never
/// acknowledged on its own disk. The peer, outdated, is promoted by the operator (nothing was
/// acknowledged alone, so nothing is lost); when the old primary returns, the pairing must
/// resync those regions from the new primary, or the replicas differ where the old primary
/// wrote alone.
#[test]
fn a_primary_that_stops_with_unacknowledged_writes_resyncs_them_when_it_returns() {
    let mut sim = paired_default();
    sim.stall(B);
    ok(sim.run_for(DEAD_TIME_MS + 200));
    sim.stop_daemon(A, 4_000);
    ok(sim.run_for(200));
    sim.unstall(B);
    ok(sim.run_for(1_000));
    assert_eq!(sim.disk_state(B), Some(DiskState::Outdated));
    let (accepted, reply) = ok(sim.force_promote(B));
    assert!(accepted, "{reply}");
    let back = ok(sim.run_until_cond(10_000, |s| {
        s.running(A) && s.peer_state(A) == Some(PeerState::Connected)
    }));
    assert!(back, "nas-a did not return:\n{}", sim.timeline_text());
    assert_eq!(sim.primary(), Some(B));
    settle(&mut sim);
}

// ---- rule 7: election ------------------------------------------------------------------------

#[test]
fn after_both_boards_lose_power_the_pair_elects_one_primary() {
    let mut sim = paired_default();
    sim.power_off(A);
    sim.power_off(B);
    ok(sim.run_for(2_000));
    sim.power_on(A);
    sim.power_on(B);
    let t0 = sim.now();
    let elected = ok(sim.run_until_cond(15_000, |s| s.primary().is_some()));
    assert!(elected, "no primary after the power came back");
    assert!(sim.now() - t0 < 10_000);
    settle(&mut sim);
}

// ---- rule 8: two primaries ---------------------------------------------------------------------

/// Two primaries only come from the uncovered fault or a forced promotion: here both (the
/// boards hidden from each other, and `promote --force` on the one without the cluster IP's
/// clients). When they see each other again, the lower `(epoch, node)` demotes, and since both
/// started a new generation alone, mirroring stops for the operator with both data sets kept.
/// The clients stop before the partition: a forced promotion of a stale node loses writes by
/// the operator's choice, which the checkers would rightly report.
#[test]
fn two_primaries_after_a_forced_promotion_the_lower_epoch_demotes() {
    let options = PairOptions {
        cluster_ip: false,
        check_liveness: false,
        ..PairOptions::default()
    };
    let mut sim = paired(options);
    sim.set_workload(false);
    ok(sim.run_for(5_000));
    sim.set_cable(Cable::Heartbeat, false);
    sim.isolate_on_lan(true);
    ok(sim.run_for(3_000));
    let (accepted, reply) = ok(sim.force_promote(B));
    assert!(accepted, "{reply}");
    ok(sim.run_for(1_000));
    assert_eq!(sim.role(A), Some(Role::Primary));
    assert_eq!(sim.role(B), Some(Role::Primary));
    assert!(sim.epoch(B) > sim.epoch(A));
    let healed = sim.now();
    sim.isolate_on_lan(false);
    sim.set_cable(Cable::Heartbeat, true);
    ok(sim.run_for(3_000));
    assert!(
        sim.any_event(A, healed, |e| *e == Event::Demoted),
        "{}",
        sim.timeline_text()
    );
    assert_eq!(sim.role(B), Some(Role::Primary));
    let reasons = sim.readiness(A).expect("nas-a runs").not_ready_reasons;
    assert!(
        reasons.iter().any(|r| r.contains("split brain")),
        "{reasons:?}"
    );
}

// ---- rule 11: failback ------------------------------------------------------------------------

#[test]
fn with_failback_preferred_the_role_returns_to_the_preferred_node() {
    let options = PairOptions {
        failback_preferred: true,
        ..PairOptions::default()
    };
    let mut sim = paired(options);
    let t0 = sim.now();
    sim.power_off(A);
    ok(sim.run_for(3_000));
    assert!(promoted_at(&sim, B, t0).is_some());
    sim.power_on(A);
    let back = sim.now();
    let returned = ok(sim.run_until_cond(20_000, |s| s.primary() == Some(A)));
    assert!(
        returned,
        "the role did not return:\n{}",
        sim.timeline_text()
    );
    assert!(sim.any_event(B, back, |e| *e == Event::Demoted));
    settle(&mut sim);
}

// ---- the experiments of the seeds ----------------------------------------------------------------

/// seeds/000: a copy to the cluster IP, the main board's power cable pulled in the middle: the
/// copy pauses, resumes on the other board, and every acknowledged write is there.
#[test]
fn a_primary_power_cut_mid_copy_keeps_every_acknowledged_write() {
    let mut sim = paired_default();
    ok(sim.run_for(2_000));
    let t0 = sim.now();
    assert!(
        acks_by(&sim, A, t0 - 2_000, t0) > 0,
        "the copy runs when the power goes"
    );
    sim.power_off(A);
    ok(sim.run_for(4_000));
    let promoted = promoted_at(&sim, B, t0).expect("nas-b takes over");
    assert!(
        acks_by(&sim, B, promoted, sim.now()) > 0,
        "the copy resumed"
    );
    // Settling checks every acknowledged write on both replicas.
    sim.power_on(A);
    settle(&mut sim);
}

/// seeds/000 and 001: the dead board comes back and catches up by copying only the regions
/// written while it was away (and the few its activity log names), not the volume.
#[test]
fn the_dead_board_returns_and_resyncs_only_what_changed() {
    let options = PairOptions {
        backing_bytes: 64 << 20,
        workload_blocks: Some(2_048),
        ..PairOptions::default()
    };
    let mut sim = paired(options);
    sim.power_off(A);
    ok(sim.run_for(5_000));
    assert_eq!(sim.primary(), Some(B));
    let dirty = sim.dirty_bytes(B).expect("nas-b runs");
    assert!(dirty > 0, "nas-b wrote alone");
    sim.power_on(A);
    settle(&mut sim);
    let (done, total) = sim.resync_bytes(B).expect("nas-b runs");
    assert!(done > 0 && done == total);
    // The regions written alone, plus nas-a's activity log extents (4 MiB each): far from the
    // whole volume of 60-odd MiB.
    assert!(done <= 8 << 20, "resynced {done} bytes");
}

/// nas-b, primary, stalls for four seconds and nas-a takes over. nas-b wakes just as nas-a's
/// whole board stalls in turn: nas-b's degrade probe finds nobody answering for the cluster IP.
/// A primary that slept through a takeover window cannot tell a successor that is stalled (or
/// dead) from none: it must not serve alone until its peer shows itself, and here it demotes.
#[test]
fn a_primary_that_wakes_from_a_long_stall_never_serves_alone_beside_a_stalled_successor() {
    let mut sim = paired_with_b_primary();
    let t0 = sim.now();
    sim.stall(B);
    ok(sim.run_for(4_000));
    let promoted = promoted_at(&sim, A, t0).expect("nas-a takes over while nas-b is stalled");
    sim.unstall(B);
    sim.stall(A);
    ok(sim.run_for(3_000));
    sim.unstall(A);
    ok(sim.run_for(3_000));
    assert_eq!(
        acks_by(&sim, B, t0, sim.now()),
        0,
        "nas-b served beside its successor:\n{}",
        sim.timeline_text()
    );
    assert!(acks_by(&sim, A, promoted, sim.now()) > 0);
    assert_eq!(sim.primary(), Some(A), "{}", sim.timeline_text());
    settle(&mut sim);
}

/// The same stall with the roles the other way round (nas-b primary, so nas-a, which connects
/// the links, is the one that took over): the woken primary must not serve again.
#[test]
fn a_stalled_primary_that_wakes_never_serves_beside_the_node_that_took_over() {
    let mut sim = paired_with_b_primary();
    let t0 = sim.now();
    sim.stall(B);
    ok(sim.run_for(3_400));
    let promoted = promoted_at(&sim, A, t0).expect("nas-a takes over while nas-b is stalled");
    sim.unstall(B);
    ok(sim.run_for(4_000));
    assert_eq!(
        acks_by(&sim, B, t0, sim.now()),
        0,
        "{}",
        sim.timeline_text()
    );
    assert!(acks_by(&sim, A, promoted, sim.now()) > 0);
    assert_eq!(sim.primary(), Some(A), "{}", sim.timeline_text());
    settle(&mut sim);
}
