//! Runs the deterministic simulator: one seed (`--seed N`), a range of seeds from a random
//! start, or seeds until stopped (`--forever`). Prints `SEED=` and a one-line reproduction of the
//! first failure and exits non-zero.
//!
//! `cargo run -p tandem-tests --release --bin sim -- [--pair] [--seed N] [--steps N] [--seeds N] [--forever]`
//!
//! `--pair` runs the two-node simulator (`tandem_tests::sim::pair`) instead of the one-node
//! power-cut simulator; `--steps` is then the virtual milliseconds of faults per seed.

use std::process::ExitCode;
use tandem_tests::sim::pair::PairSim;
use tandem_tests::sim::{repro_command, run_seed, Options};

const STEPS_DEFAULT: u64 = 5_000;
const SEEDS_DEFAULT: u64 = 1_000;

fn usage() -> ExitCode {
    eprintln!("usage: sim [--pair] [--seed N] [--steps N] [--seeds N] [--forever]");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut seed = None;
    let mut steps = STEPS_DEFAULT;
    let mut seeds = SEEDS_DEFAULT;
    let mut forever = false;
    let mut pair = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse::<u64>().ok());
        match arg.as_str() {
            "--seed" => match value() {
                Some(v) => seed = Some(v),
                None => return usage(),
            },
            "--steps" => match value() {
                Some(v) => steps = v,
                None => return usage(),
            },
            "--seeds" => match value() {
                Some(v) => seeds = v,
                None => return usage(),
            },
            "--forever" => forever = true,
            "--pair" => pair = true,
            _ => return usage(),
        }
    }
    // One seed: Ok with its report, Err with the failure and how to replay it.
    let run_one = |seed: u64| -> Result<String, String> {
        if pair {
            let fault_ms = if steps == STEPS_DEFAULT {
                20_000
            } else {
                steps
            };
            PairSim::new(seed)
                .run(fault_ms)
                .map(|report| format!("{report:?}"))
        } else {
            run_seed(seed, steps)
                .map(|report| format!("{report:?}"))
                .map_err(|failure| {
                    format!(
                        "{failure}\noptions: {:?}\nrepro: {}",
                        Options::swarm(seed),
                        repro_command(seed, steps)
                    )
                })
        }
    };
    if let Some(seed) = seed {
        return match run_one(seed) {
            Ok(report) => {
                println!("SEED={seed} ok: {report}");
                ExitCode::SUCCESS
            }
            Err(failure) => {
                println!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    // The start seed is the only thing drawn from outside: it is printed with every failure.
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    println!("starting at SEED={start}");
    let mut n: u64 = 0;
    while forever || n < seeds {
        let seed = start.wrapping_add(n);
        if let Err(failure) = run_one(seed) {
            println!("{failure}");
            return ExitCode::FAILURE;
        }
        n += 1;
        if n.is_multiple_of(100) {
            println!("{n} seeds passed (last SEED={seed})");
        }
    }
    println!("{n} seeds passed");
    ExitCode::SUCCESS
}
