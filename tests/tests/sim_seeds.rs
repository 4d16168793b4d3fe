//! The deterministic simulator under `cargo test`: a fixed range of seeds, the mutation check
//! that proves the checkers can fail, and named scenarios on the same harness.

use tandem_tests::sim::model::Value;
use tandem_tests::sim::{repro_command, run_seed, Options, Simulation};

/// Seeds run under `cargo test`: 0..SEEDS, split over [`CHUNKS`] test functions (interleaved,
/// so slow seeds spread out) so that the harness uses every core.
const SEEDS: u64 = 300;
const CHUNKS: u64 = 4;
/// Steps per seed.
const STEPS: u64 = 1_200;

fn run_seeds(chunk: u64) {
    for seed in (chunk..SEEDS).step_by(CHUNKS as usize) {
        if let Err(failure) = run_seed(seed, STEPS) {
            panic!(
                "{failure}\noptions: {:?}\nrepro: {}",
                Options::swarm(seed),
                repro_command(seed, STEPS)
            );
        }
    }
}

#[test]
fn seeds_chunk_0_hold_every_invariant() {
    run_seeds(0);
}

#[test]
fn seeds_chunk_1_hold_every_invariant() {
    run_seeds(1);
}

#[test]
fn seeds_chunk_2_hold_every_invariant() {
    run_seeds(2);
}

#[test]
fn seeds_chunk_3_hold_every_invariant() {
    run_seeds(3);
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(12_345, STEPS);
    let b = run_seed(12_345, STEPS);
    assert_eq!(a, b);
}

#[test]
fn sim_mutation_is_caught() {
    // A disk that acknowledges flushes and FUA writes without making anything durable loses
    // acknowledged data at the next power cut: the crash checker must notice.
    for seed in 0..300 {
        let mut options = Options::swarm(seed);
        options.disk.lie = true;
        if let Err(failure) = Simulation::new(seed, options).run(STEPS) {
            assert!(
                failure.message.contains("after a power cut"),
                "the lying disk was caught by the wrong checker: {failure}"
            );
            eprintln!("mutation caught at seed {seed}: {failure}");
            return;
        }
    }
    panic!("a disk that lies about flushes went unnoticed for 300 seeds");
}

fn scripted(seed: u64) -> Simulation {
    let options = Options {
        workload: None,
        power_cut_ms: None,
        ..Options::default()
    };
    let mut sim = Simulation::new(seed, options);
    sim.run_until_idle(1_000).expect("handshake");
    sim
}

#[test]
fn power_cut_after_flush_keeps_every_acknowledged_write() {
    let mut sim = scripted(1);
    sim.set_disk_lose_per_million(1_000_000);
    let mut writes = Vec::new();
    for i in 0..32 {
        writes.push((i * 8, sim.write(i * 8, 8, false)));
    }
    sim.run_until_idle(10_000).expect("writes complete");
    let flush = sim.flush();
    sim.run_until_idle(10_000).expect("flush completes");
    assert_eq!(sim.reply_error(flush), Some(0));
    sim.power_cut();
    sim.run_until_idle(10_000)
        .expect("the volume verifies after the cut");
    for (first, op) in writes {
        assert_eq!(
            sim.reply_error(op),
            None,
            "replies of the old life are gone"
        );
        for sector in first..first + 8 {
            assert_eq!(sim.disk_value(sector), Some(Value::Data(op)));
        }
    }
}

#[test]
fn torn_unflushed_writes_never_show_older_than_durable_data() {
    let mut torn_seen = false;
    for seed in 0..20 {
        let mut sim = scripted(seed);
        sim.set_disk_lose_per_million(500_000);
        let old = sim.write(0, 64, false);
        sim.run_until_idle(10_000).expect("old write");
        sim.flush();
        sim.run_until_idle(10_000).expect("flush");
        let new = sim.write(0, 64, false);
        sim.run_until_idle(10_000).expect("new write");
        sim.power_cut();
        // The verification pass is the check: each sector must be `old` or `new`, never zero.
        sim.run_until_idle(10_000)
            .expect("the volume verifies after the cut");
        let values: Vec<_> = (0..64).map(|s| sim.disk_value(s)).collect();
        assert!(values
            .iter()
            .all(|v| *v == Some(Value::Data(old)) || *v == Some(Value::Data(new))));
        torn_seen |=
            values.contains(&Some(Value::Data(old))) && values.contains(&Some(Value::Data(new)));
    }
    assert!(torn_seen, "no seed tore the unflushed write");
}

#[test]
fn fua_write_survives_a_cut_without_flush() {
    let mut sim = scripted(3);
    sim.set_disk_lose_per_million(1_000_000);
    let volatile = sim.write(0, 16, false);
    sim.run_until_idle(10_000).expect("volatile write");
    let fua = sim.write(16, 16, true);
    sim.run_until_idle(10_000).expect("FUA write");
    assert_eq!(sim.reply_error(fua), Some(0));
    sim.power_cut();
    sim.run_until_idle(10_000)
        .expect("the volume verifies after the cut");
    for sector in 16..32 {
        assert_eq!(sim.disk_value(sector), Some(Value::Data(fua)));
    }
    for sector in 0..16 {
        assert_eq!(
            sim.disk_value(sector),
            Some(Value::Zero),
            "op {volatile} was lost"
        );
    }
}

#[test]
fn disk_error_is_reported_as_eio_and_the_node_keeps_serving() {
    let mut sim = scripted(4);
    sim.set_disk_fault_per_million(1_000_000);
    let failed_write = sim.write(0, 8, false);
    let failed_read = sim.read(64, 8);
    sim.run_until_idle(10_000)
        .expect("failed requests are answered");
    assert_eq!(sim.reply_error(failed_write), Some(5));
    assert_eq!(sim.reply_error(failed_read), Some(5));
    sim.set_disk_fault_per_million(0);
    let write = sim.write(0, 8, false);
    sim.run_until_idle(10_000).expect("write after the errors");
    assert_eq!(sim.reply_error(write), Some(0));
    // The read is checked against the model by the client: it must see the new write.
    let read = sim.read(0, 8);
    sim.run_until_idle(10_000).expect("read after the errors");
    assert_eq!(sim.reply_error(read), Some(0));
}
