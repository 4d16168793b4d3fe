//! Runs the deterministic simulator: one seed (`--seed N`), a range of seeds (`--seeds N`, from
//! `--start S` or a random start), or seeds until stopped (`--forever`). Prints `SEED=` and a
//! one-line reproduction of the first failure and exits non-zero.
//!
//! `cargo run -p tandem-tests --release --bin sim -- [--pair] [--seed N] [--start S] [--steps N]
//! [--seeds N] [--forever] [--mutation no_lease|no_arp_probe|stale_last_heard|no_gateway_check]
//! [--faults all|long-stalls|long-hangs|cable-losses] [--double-faults] [--trace]`
//!
//! `--pair` runs the two-node simulator (`tandem_tests::sim::pair`) instead of the one-node
//! power-cut simulator; `--steps` is then the virtual milliseconds of faults per seed.
//! `--mutation` switches a safety rule off (repeatable): the run is then expected to fail, and
//! reports how many seeds it took (other failures are reported and passed). `--faults` narrows
//! the faults to one corner of the model, `--double-faults` lets a second fault begin while the
//! first lasts (outside the model: the gateway check needs it). `--trace` prints the timeline
//! and the engines' logs of a `--pair --seed` run.

use std::process::ExitCode;
use tandem_tests::sim::pair::{FaultSet, PairOptions, PairSim};
use tandem_tests::sim::{repro_command, run_seed, Options};

const STEPS_DEFAULT: u64 = 5_000;
const SEEDS_DEFAULT: u64 = 1_000;
/// Virtual milliseconds of faults per seed of `--pair`, unless `--steps` says otherwise.
const PAIR_FAULT_MS_DEFAULT: u64 = 30_000;

fn usage() -> ExitCode {
    eprintln!(
        "usage: sim [--pair] [--seed N] [--start S] [--steps N] [--seeds N] [--forever] \
         [--mutation no_lease|no_arp_probe|stale_last_heard|no_gateway_check] \
         [--faults all|long-stalls|long-hangs|cable-losses] [--double-faults] [--trace]"
    );
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut seed = None;
    let mut start = None;
    let mut steps = None;
    let mut seeds = SEEDS_DEFAULT;
    let mut forever = false;
    let mut pair = false;
    let mut options = PairOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse::<u64>().ok());
        match arg.as_str() {
            "--seed" => match value() {
                Some(v) => seed = Some(v),
                None => return usage(),
            },
            "--start" => match value() {
                Some(v) => start = Some(v),
                None => return usage(),
            },
            "--steps" => match value() {
                Some(v) => steps = Some(v),
                None => return usage(),
            },
            "--seeds" => match value() {
                Some(v) => seeds = v,
                None => return usage(),
            },
            "--forever" => forever = true,
            "--pair" => pair = true,
            "--trace" => options.trace = true,
            "--double-faults" => options.double_faults = true,
            "--faults" => match args.next().as_deref().and_then(FaultSet::parse) {
                Some(set) => options.faults = set,
                None => return usage(),
            },
            "--mutation" => match args.next().as_deref() {
                Some("no_lease") => options.mutations.no_lease = true,
                Some("no_arp_probe") => options.mutations.no_arp_probe = true,
                Some("stale_last_heard") => options.mutations.stale_last_heard = true,
                Some("no_gateway_check") => options.mutations.no_gateway_check = true,
                _ => return usage(),
            },
            _ => return usage(),
        }
    }
    let mutated = options.mutations != Default::default();
    let narrowed = options.faults != FaultSet::All || options.double_faults;
    if (mutated || options.trace || narrowed) && !pair {
        return usage();
    }
    // One seed: Ok with its report, Err with whether it broke a safety promise (never two
    // writers, no lost acknowledged write), the failure and how to replay it.
    let run_one = |seed: u64| -> Result<String, (bool, String)> {
        if pair {
            let fault_ms = steps.unwrap_or(PAIR_FAULT_MS_DEFAULT);
            PairSim::new(seed, options.clone())
                .run(fault_ms)
                .map(|report| format!("{report:?}"))
                .map_err(|failure| (failure.violation.is_safety(), failure.to_string()))
        } else {
            let steps = steps.unwrap_or(STEPS_DEFAULT);
            run_seed(seed, steps)
                .map(|report| format!("{report:?}"))
                .map_err(|failure| {
                    let text = format!(
                        "{failure}\noptions: {:?}\nrepro: {}",
                        Options::swarm(seed),
                        repro_command(seed, steps)
                    );
                    (true, text)
                })
        }
    };
    if let Some(seed) = seed {
        return match run_one(seed) {
            Ok(report) => {
                println!("SEED={seed} ok: {report}");
                ExitCode::SUCCESS
            }
            Err((_, failure)) => {
                println!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    // The start seed is the only thing drawn from outside: it is printed with every failure.
    let start = start.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    println!("starting at SEED={start}");
    let mut n: u64 = 0;
    let mut other_failures = 0;
    while forever || n < seeds {
        let seed = start.wrapping_add(n);
        n += 1;
        match run_one(seed) {
            Ok(_) => {}
            // A mutation is caught by a safety violation; anything else is noted and passed.
            Err((false, failure)) if mutated => {
                other_failures += 1;
                println!("{failure}\n(not a safety violation: going on)");
            }
            Err((_, failure)) => {
                println!("{failure}");
                if mutated {
                    println!("the mutation was caught after {n} seeds");
                }
                return ExitCode::FAILURE;
            }
        }
        if n.is_multiple_of(100) {
            println!("{n} seeds passed (last SEED={seed})");
        }
    }
    if mutated {
        println!("the mutation was NOT caught in {n} seeds ({other_failures} other failures)");
        return ExitCode::from(2);
    }
    println!("{n} seeds passed");
    ExitCode::SUCCESS
}
