//! The two-node simulator in CI: seeds of a replicated pair under link faults (cuts of one or
//! both links, one-way loss, resets, latencies that reorder the links), each checked for never
//! a secondary acknowledging, every acknowledged write on both disks, identical replicas after
//! the faults stop, and generations that never go back. A failure names its seed and the
//! command that replays it.

use tandem_tests::sim::pair::PairSim;

const FAULT_MS: u64 = 20_000;

/// Seeds to run: `TANDEM_SIM_PAIR_SEEDS`, else 6 in a debug build (about a minute) and 60 in
/// an optimized one (`tests/run-all` runs 300 that way).
fn seed_count() -> u64 {
    std::env::var("TANDEM_SIM_PAIR_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 6 } else { 60 })
}

#[test]
fn seeds_of_a_pair_under_link_faults_keep_every_promise() {
    let seeds = seed_count();
    let mut acked = 0;
    let mut faults = 0;
    for seed in 1..=seeds {
        match PairSim::new(seed).run(FAULT_MS) {
            Ok(report) => {
                acked += report.acked_writes;
                faults += report.faults;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    // The checks saw real work: writes acknowledged and faults injected across the seeds.
    assert!(acked > seeds * 100, "only {acked} writes acknowledged");
    assert!(faults > seeds * 10, "only {faults} faults injected");
}
