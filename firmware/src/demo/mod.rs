//! `tandem demo`: the seed experiment (seeds/000_b9dd72191a12499b.txt) on one machine, in one
//! command. A pair of real nodes on file-backed disks, a client copying a large file and many
//! small ones through the primary, the primary's power cut mid-copy, the takeover, the copy
//! retried as a user would, checksums compared, the dead node back, resync and failback.
//!
//! - [`lab`] owns what the demo creates (the nodes, the network, the scratch directory) and
//!   removes it on drop, on every path out, Ctrl-C included;
//! - [`netns`] is the network in namespaces as data, shared with the test harness's lab;
//! - [`nbd_client`] is the client's protocol;
//! - [`workload`] is what the client copies and checks;
//! - [`story`] is the sequence of events and what is said about them; [`screen`] prints it.
//!
//! Exit status: 0 only when every checksum matched (after the failover and after the failback);
//! 1 when one did not or a step failed (the logs are kept and named); 130 after SIGINT/SIGTERM.

mod lab;
mod nbd_client;
pub mod netns;
mod screen;
mod story;
mod workload;

use std::time::{Duration, Instant};

use tandem_board::TerminationSignals;

use crate::exit;
use lab::Lab;
use screen::Screen;

/// How often a wait checks its condition (and for a signal).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Why the demo stopped before its end.
#[derive(Debug)]
pub(crate) enum DemoError {
    /// SIGINT or SIGTERM.
    Interrupted,
    /// A step failed; the message says which and why.
    Failed(String),
}

/// SIGINT and SIGTERM, checked by every wait of the demo.
#[derive(Debug)]
pub(crate) struct Signals(TerminationSignals);

impl Signals {
    /// `Err(Interrupted)` once a signal arrived.
    pub(crate) fn check(&self) -> Result<(), DemoError> {
        match self.0.take() {
            Some(_) => Err(DemoError::Interrupted),
            None => Ok(()),
        }
    }
}

/// Polls `poll` until it returns a value, failing after `timeout` (saying it waited for
/// `what`) or at a signal.
pub(crate) fn wait_for<T>(
    signals: &Signals,
    timeout: Duration,
    what: &str,
    mut poll: impl FnMut() -> Result<Option<T>, DemoError>,
) -> Result<T, DemoError> {
    let deadline = Instant::now() + timeout;
    loop {
        signals.check()?;
        if let Some(value) = poll()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(DemoError::Failed(format!(
                "gave up after {} s waiting for {what}",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Runs the demo and returns its exit status.
pub fn run() -> u8 {
    let started = Instant::now();
    // Before any thread starts, so that every thread has the signals blocked.
    let signals = match TerminationSignals::install() {
        Ok(signals) => Signals(signals),
        Err(e) => {
            eprintln!("tandem demo: cannot install the signal handler: {e}");
            return exit::INTERNAL;
        }
    };
    let mut screen = Screen::new();
    screen.say(
        "tandem demo: a two-node NAS pair on this machine; the primary loses power in the \
         middle of a copy.",
    );
    let mut lab = match Lab::create(&signals, &mut |line| screen.say(line)) {
        Ok(lab) => lab,
        Err(e) => return finish_early(e, &mut screen, Vec::new()),
    };
    match story::tell(&mut lab, &signals, &mut screen, started) {
        Ok(summary) => {
            summary.print(&mut screen);
            if summary.all_match() {
                drop(lab);
                return exit::OK;
            }
            lab.keep_logs();
            let logs = lab.logs();
            drop(lab);
            print_logs(&logs);
            exit::FAILED
        }
        Err(e) => {
            let logs = lab.logs();
            if matches!(e, DemoError::Failed(_)) {
                lab.keep_logs();
            }
            drop(lab);
            finish_early(e, &mut screen, logs)
        }
    }
}

/// Says why the demo stopped (after the lab is gone) and returns the exit status.
fn finish_early(e: DemoError, screen: &mut Screen, logs: Vec<std::path::PathBuf>) -> u8 {
    screen.end_progress();
    match e {
        DemoError::Interrupted => {
            println!(
                "interrupted: both nodes stopped, the namespaces and the scratch directory removed"
            );
            exit::INTERRUPTED
        }
        DemoError::Failed(why) => {
            eprintln!("tandem demo: FAILED: {why}");
            print_logs(&logs);
            exit::FAILED
        }
    }
}

fn print_logs(logs: &[std::path::PathBuf]) {
    if !logs.is_empty() {
        eprintln!("the nodes' logs (kept, with the configs; remove the directory when done):");
        for log in logs {
            eprintln!("  {}", log.display());
        }
    }
}
