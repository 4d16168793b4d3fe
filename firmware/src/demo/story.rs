//! The story the demo tells, step by step: the pair starts, a copy runs through the primary, the
//! primary loses power at 40% of the large file, the survivor takes over, the copy is retried
//! as a user would, every file is read back and its SHA-256 compared, the dead node returns and
//! is resynced, the role goes back to it, and the files are compared once more.
//!
//! Every wait has a deadline and checks for Ctrl-C; the client's work runs on a thread of its
//! own (in the client's network namespace when there is one) while this thread shows progress
//! and pulls the plug.

use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use super::lab::Lab;
use super::netns::Board;
use super::screen::{duration, mib, Screen};
use super::workload::{self, ClientEvent, Dataset, JobError, Shared};
use super::{wait_for, DemoError, Signals};

/// The plug is pulled when the client has copied this share of the large file.
const CUT_AT_PERCENT: u64 = 40;
/// How long the pair may take to pair up and be ready.
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the survivor may take to serve after the cut.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the returning node's resync, and the failback, may take.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(90);
const FAILBACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the client's progress is checked (the plug is pulled within this of 40%).
const WATCH_INTERVAL: Duration = Duration::from_millis(5);
/// Files larger than this show their own percentage beside the progress.
const LARGE_FILE_NOTE_BYTES: u64 = 1 << 20;
/// How often a progress line is redrawn.
const DRAW_INTERVAL: Duration = Duration::from_millis(100);

/// One comparison of every file's checksum.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    when: &'static str,
    matched: usize,
    files: usize,
}

/// What the demo measured.
#[derive(Debug)]
pub(crate) struct Summary {
    failover: Duration,
    /// Said after the failover time: how the survivor came to serve.
    failover_note: &'static str,
    resynced_bytes: u64,
    checks: Vec<Check>,
    total: Duration,
}

impl Summary {
    /// Every file matched in every check.
    pub(crate) fn all_match(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.matched == c.files)
    }

    pub(crate) fn print(&self, screen: &mut Screen) {
        screen.say("");
        screen.say("summary");
        screen.say(format!(
            "  failover time    {} ms, from the power cut to the first acknowledged write{}",
            self.failover.as_millis(),
            self.failover_note
        ));
        screen.say(format!(
            "  bytes resynced   {} ({} bytes): the regions nas-b wrote while nas-a was down",
            mib(self.resynced_bytes),
            self.resynced_bytes
        ));
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|c| format!("{}: {} of {} match", c.when, c.matched, c.files))
            .collect();
        screen.say(format!("  checksums        {}", checks.join("; ")));
        screen.say(format!("  total time       {}", duration(self.total)));
        if self.all_match() {
            screen.say(
                "PASS: the plug was pulled mid-copy and every file is intact, after the failover \
                 and after the failback.",
            );
        } else {
            screen.say("FAIL: some files differ from what was copied.");
        }
    }
}

/// Tells the story on `lab`; `started` is when the demo began (for the total time).
pub(crate) fn tell(
    lab: &mut Lab,
    signals: &Signals,
    screen: &mut Screen,
    started: Instant,
) -> Result<Summary, DemoError> {
    for line in lab.describe() {
        screen.say(line);
    }
    let dataset = Dataset::generate();
    let mut story = Story {
        lab,
        signals,
        screen,
        dataset: &dataset,
    };
    story.start_pair()?;
    let failover = story.copy_through_a_power_cut()?;
    let mut checks = vec![story.verify("after the failover")?];
    let resynced_bytes = story.bring_back()?;
    story.fail_back()?;
    checks.push(story.verify("after the failback")?);
    Ok(Summary {
        failover,
        failover_note: story.by_hand(),
        resynced_bytes,
        checks,
        total: started.elapsed(),
    })
}

struct Story<'a> {
    lab: &'a mut Lab,
    signals: &'a Signals,
    screen: &'a mut Screen,
    dataset: &'a Dataset,
}

impl Story<'_> {
    fn start_pair(&mut self) -> Result<(), DemoError> {
        let started = Instant::now();
        let pid_a = self.lab.start(Board::A, self.signals)?;
        let pid_b = self.lab.start(Board::B, self.signals)?;
        self.screen.say(format!(
            "start: nas-a (pid {pid_a}) and nas-b (pid {pid_b}), each a 'tandem run' on its own disk"
        ));
        let automatic = self.lab.automatic_failover();
        let ready = |s: &serde_json::Value| !automatic || s["ready_for_failover"] == true;
        self.wait_status(Board::A, "nas-a to be primary", PAIR_TIMEOUT, |s| {
            is(s, "primary") && ready(s)
        })?;
        let status = self.wait_status(Board::B, "nas-b to be secondary", PAIR_TIMEOUT, |s| {
            is(s, "secondary") && ready(s)
        })?;
        self.screen.say(format!(
            "pair: nas-a primary, nas-b secondary, disks in sync{} ({})",
            if automatic {
                ", ready for failover"
            } else {
                ""
            },
            duration(started.elapsed())
        ));
        let volume_bytes = status["volume_bytes"].as_u64().unwrap_or(0);
        if volume_bytes < self.dataset.end_offset() {
            return Err(DemoError::Failed(format!(
                "the volume has {volume_bytes} bytes, the files need {}",
                self.dataset.end_offset()
            )));
        }
        Ok(())
    }

    /// The copy with the plug pulled at 40% of the large file; returns the failover time.
    fn copy_through_a_power_cut(&mut self) -> Result<Duration, DemoError> {
        let files = &self.dataset.files;
        let small_bytes: u64 = files[1..].iter().map(|f| f.bytes).sum();
        self.screen.say(format!(
            "data: {} ({}) and {} small files (4-64 KiB, {} in all), SHA-256 of each noted",
            files[0].name,
            mib(files[0].bytes),
            files.len() - 1,
            mib(small_bytes)
        ));
        self.screen.say(
            "      (a file here is a range of the volume's blocks: a block-level stand-in for a \
             file copy)",
        );
        self.screen.say(format!(
            "copy: through {}, 1 MiB writes; nas-a loses power at {CUT_AT_PERCENT}% of {}",
            self.endpoints_text(),
            files[0].name
        ));
        let endpoints = self.lab.endpoints();
        let dataset = self.dataset;
        let large_bytes = files[0].bytes;
        let started = Instant::now();
        let mut cut: Option<Instant> = None;
        let mut failover = None;
        let reconnects = self.run_client(
            "copy",
            |shared| workload::copy(&endpoints, dataset, shared).map(|()| shared.reconnects()),
            |story, shared| {
                let percent_of_large = || {
                    let (file, file_done, _) = shared.progress();
                    if file == 0 {
                        file_done * 100 / large_bytes
                    } else {
                        100
                    }
                };
                if cut.is_none() && percent_of_large() >= CUT_AT_PERCENT {
                    cut = Some(story.pull_the_plug(percent_of_large)?);
                }
                if let (Some(at), None) = (cut, failover) {
                    if let Some(ack) = shared.first_ack_after(at) {
                        let took = ack - at;
                        failover = Some(took);
                        story.screen.say(format!(
                            "takeover: nas-b is primary after {} ms (from the cut to its first \
                             acknowledged write{})",
                            took.as_millis(),
                            story.by_hand()
                        ));
                    } else if at.elapsed() > TAKEOVER_TIMEOUT {
                        return Err(DemoError::Failed(format!(
                            "no node served the volume within {} s of the power cut",
                            TAKEOVER_TIMEOUT.as_secs()
                        )));
                    }
                }
                Ok(())
            },
        )?;
        let Some(failover) = failover else {
            return Err(DemoError::Failed(
                "the copy ended before the power cut".to_string(),
            ));
        };
        self.screen.say(format!(
            "copy: done: {} files, {}, in {} (the client reconnected {reconnects} time{})",
            files.len(),
            mib(self.dataset.total_bytes()),
            duration(started.elapsed()),
            if reconnects == 1 { "" } else { "s" }
        ));
        Ok(failover)
    }

    /// Cuts nas-a's power (and, without automatic failover, promotes nas-b as the operator
    /// would); returns the instant of the cut. `percent` says how far into the large file the
    /// client is, read once the power is gone (the client goes on while the cables are pulled).
    fn pull_the_plug(&mut self, percent: impl Fn() -> u64) -> Result<Instant, DemoError> {
        let automatic = self.lab.automatic_failover();
        let at = self.lab.power_cut(Board::A)?;
        self.screen.say(format!(
            ">>> power cut: nas-a at {}% of {} ({})",
            percent(),
            self.dataset.files[0].name,
            if automatic {
                "both cables dead, tandem killed"
            } else {
                "tandem killed"
            }
        ));
        if !automatic {
            self.promote_by_hand()?;
        }
        Ok(at)
    }

    /// Without a cluster IP nothing takes over by itself (rule 5): the operator's
    /// `promote --force` on the survivor, once it has seen its peer go.
    fn promote_by_hand(&mut self) -> Result<(), DemoError> {
        self.wait_status(Board::B, "nas-b to lose its peer", TAKEOVER_TIMEOUT, |s| {
            s["peer"] == "lost"
        })?;
        self.screen.say(
            "  nas-b lost its peer; automatic failover is off without a cluster IP (rule 5), so \
             the demo runs 'promote --force' on nas-b, as the operator would",
        );
        let reply = self
            .lab
            .request(Board::B, "promote --force")
            .map_err(|e| DemoError::Failed(format!("nas-b does not answer: {e}")))?;
        if !reply.ok {
            return Err(DemoError::Failed(format!(
                "promote --force on nas-b refused: {}",
                reply.body
            )));
        }
        Ok(())
    }

    /// Reads every file back through the current primary and compares checksums.
    fn verify(&mut self, when: &'static str) -> Result<Check, DemoError> {
        let primary = self.primary()?;
        self.screen.say(format!(
            "verify: {} is primary; reading every file back through {} and comparing SHA-256",
            primary.name(),
            self.endpoints_text()
        ));
        let endpoints = self.lab.endpoints();
        let dataset = self.dataset;
        let matches = self.run_client(
            "verify",
            |shared| workload::verify(&endpoints, dataset, shared),
            |_, _| Ok(()),
        )?;
        let matched = matches.iter().filter(|&&m| m).count();
        self.screen
            .say(format!("checksums: {matched} of {} match", matches.len()));
        for (file, _) in self
            .dataset
            .files
            .iter()
            .zip(&matches)
            .filter(|(_, &m)| !m)
            .take(10)
        {
            self.screen.say(format!("  differs: {}", file.name));
        }
        Ok(Check {
            when,
            matched,
            files: matches.len(),
        })
    }

    /// The dead node's power returns; waits for its resync and returns the bytes resynced.
    fn bring_back(&mut self) -> Result<u64, DemoError> {
        self.lab.power_on(Board::A)?;
        let pid = self.lab.start(Board::A, self.signals)?;
        self.screen.say(format!(
            "power back: nas-a (cables live, tandem restarted, pid {pid}); it rejoins as secondary"
        ));
        let started = Instant::now();
        self.screen.reset_progress();
        let status = wait_for(self.signals, RESYNC_TIMEOUT, "the resync", || {
            self.lab.check_nodes()?;
            let Ok(source) = self.lab.status(Board::B) else {
                return Ok(None);
            };
            let sync = &source["sync"];
            let done = sync["done_bytes"].as_u64().unwrap_or(0);
            let total = sync["total_bytes"].as_u64().unwrap_or(0);
            if source["sync_running"] == true {
                self.screen
                    .progress("resync", done, total, "from nas-b to nas-a");
                return Ok(None);
            }
            let in_sync = source["out_of_sync_bytes"] == 0
                && self.lab.status(Board::A).is_ok_and(|t| is(&t, "secondary"));
            Ok(in_sync.then_some(source))
        })?;
        let sync = &status["sync"];
        let done = sync["done_bytes"].as_u64().unwrap_or(0);
        self.screen
            .progress("resync", done, done, "from nas-b to nas-a");
        self.screen.end_progress();
        self.screen.say(format!(
            "resync: {} copied from nas-b to nas-a, {} after the restart; both disks in sync",
            mib(done),
            duration(started.elapsed())
        ));
        Ok(done)
    }

    /// The role goes back to nas-a: by itself with automatic failover (`failback =
    /// "preferred"`), by the operator's `switchover` otherwise.
    fn fail_back(&mut self) -> Result<(), DemoError> {
        let started = Instant::now();
        if self.lab.automatic_failover() {
            self.screen.say(
                "failback: failback = \"preferred\": nas-b hands the role back to nas-a once \
                 nas-a has been ready for 2 s",
            );
        } else {
            self.screen.say(
                "failback: without a cluster IP the role stays put: the demo runs 'switchover' on \
                 nas-b, as the operator would",
            );
            // Refused while nas-a is not ready yet; asked again until it is.
            let mut refusal = String::new();
            wait_for(self.signals, FAILBACK_TIMEOUT, "'switchover'", || {
                let reply = self
                    .lab
                    .request(Board::B, "switchover")
                    .map_err(|e| DemoError::Failed(format!("nas-b does not answer: {e}")))?;
                refusal = reply.body;
                Ok(reply.ok.then_some(()))
            })
            .map_err(|e| match e {
                DemoError::Failed(why) => DemoError::Failed(format!("{why} (nas-b: {refusal})")),
                other => other,
            })?;
        }
        self.wait_status(
            Board::A,
            "nas-a to be primary again",
            FAILBACK_TIMEOUT,
            |s| is(s, "primary"),
        )?;
        self.wait_status(Board::B, "nas-b to be secondary", FAILBACK_TIMEOUT, |s| {
            is(s, "secondary")
        })?;
        self.screen.say(format!(
            "failback: nas-a is primary again, nas-b secondary ({} after the resync)",
            duration(started.elapsed())
        ));
        Ok(())
    }

    /// Runs `job` on the client's thread while this one shows its progress, reports what the
    /// client runs into, and calls `tick` (which may pull the plug) every few milliseconds.
    fn run_client<R: Send>(
        &mut self,
        label: &str,
        job: impl FnOnce(&Shared) -> Result<R, JobError> + Send,
        mut tick: impl FnMut(&mut Self, &Shared) -> Result<(), DemoError>,
    ) -> Result<R, DemoError> {
        let shared = Shared::default();
        let client_side = self.lab.client_side();
        self.screen.reset_progress();
        std::thread::scope(|scope| {
            let shared = &shared;
            let worker = scope.spawn(move || {
                client_side.enter().map_err(|e| {
                    JobError::GaveUp(format!("cannot enter the client's network namespace: {e}"))
                })?;
                job(shared)
            });
            let watched = self.watch(label, shared, &worker, &mut tick);
            if watched.is_err() {
                shared.stop();
            }
            let outcome = worker.join();
            self.report(shared);
            watched?;
            match outcome {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(JobError::Stopped)) => Err(DemoError::Interrupted),
                Ok(Err(JobError::GaveUp(why))) => Err(DemoError::Failed(format!("client: {why}"))),
                Err(_) => Err(DemoError::Failed("the client thread panicked".to_string())),
            }
        })
    }

    fn watch<T>(
        &mut self,
        label: &str,
        shared: &Shared,
        worker: &ScopedJoinHandle<'_, T>,
        tick: &mut impl FnMut(&mut Self, &Shared) -> Result<(), DemoError>,
    ) -> Result<(), DemoError> {
        let total = self.dataset.total_bytes();
        let mut drawn: Option<Instant> = None;
        loop {
            // Read first, so that the last tick and drawing see the job's final state.
            let finished = worker.is_finished();
            self.signals.check()?;
            self.report(shared);
            self.lab.check_nodes()?;
            tick(self, shared)?;
            if finished || drawn.is_none_or(|at| at.elapsed() >= DRAW_INTERVAL) {
                let (file, file_done, done) = shared.progress();
                let note = match self.dataset.files.get(file) {
                    // A large file shows how far into it the client is.
                    Some(f) if f.bytes > LARGE_FILE_NOTE_BYTES => {
                        format!("{} {}%", f.name, file_done * 100 / f.bytes)
                    }
                    Some(f) => f.name.clone(),
                    None => String::new(),
                };
                self.screen.progress(label, done, total, &note);
                drawn = Some(Instant::now());
            }
            if finished {
                self.screen.end_progress();
                return Ok(());
            }
            std::thread::sleep(WATCH_INTERVAL);
        }
    }

    /// Tells what the client ran into since the last call.
    fn report(&mut self, shared: &Shared) {
        for event in shared.take_events() {
            let line = match event {
                ClientEvent::RequestFailed { during, error } => {
                    format!("  client: {during} failed ({error}); reconnecting")
                }
                ClientEvent::Reconnected { endpoint, attempts } => {
                    format!("  client: connected to {endpoint} after {attempts} attempts")
                }
                ClientEvent::Restarting {
                    file,
                    copying: true,
                } => format!(
                    "  client: copying {file} again from the start, as a user re-running the \
                     copy would"
                ),
                ClientEvent::Restarting {
                    file,
                    copying: false,
                } => format!("  client: reading {file} again from the start"),
            };
            self.screen.say(line);
        }
    }

    /// The node that is primary now.
    fn primary(&mut self) -> Result<Board, DemoError> {
        for board in [Board::A, Board::B] {
            if self.lab.status(board).is_ok_and(|s| s["role"] == "primary") {
                return Ok(board);
            }
        }
        Err(DemoError::Failed("no node is primary".to_string()))
    }

    /// Where the client goes, in words.
    fn endpoints_text(&self) -> String {
        let endpoints: Vec<String> = self.lab.endpoints().iter().map(|e| e.to_string()).collect();
        if self.lab.automatic_failover() {
            format!("the cluster IP {}", endpoints.join(", "))
        } else {
            "the NBD socket of whichever node serves".to_string()
        }
    }

    /// A note for times that include the operator's step (no automatic failover here).
    fn by_hand(&self) -> &'static str {
        if self.lab.automatic_failover() {
            ""
        } else {
            "; promoted by the demo, as an operator would"
        }
    }

    /// Waits until `board`'s status satisfies `check`; fails if the node exits meanwhile.
    fn wait_status(
        &mut self,
        board: Board,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, DemoError> {
        wait_for(self.signals, timeout, what, || {
            self.lab.check_nodes()?;
            // A node busy for a moment is asked again; one that exited fails above.
            let Ok(status) = self.lab.status(board) else {
                return Ok(None);
            };
            Ok(check(&status).then_some(status))
        })
    }
}

/// `status` shows `role` with an up-to-date disk.
fn is(status: &serde_json::Value, role: &str) -> bool {
    status["role"] == role && status["disk"] == "uptodate"
}
