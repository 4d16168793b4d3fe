//! The deterministic simulator, first version: one real [`tandem::node::Node`] on virtual time,
//! a simulated disk with crash semantics, and a simulated NBD client checked against a
//! reference model (docs/REPLICATION.md, "The simulator"; the pair comes with mirroring).
//!
//! One seed makes one run: the options are drawn from it ([`Options::swarm`], swarm testing:
//! latencies, fault rate, queue depth, request sizes, power-cut cadence vary per seed), and
//! every random choice after that comes from per-component streams of the same seed
//! (`prng.rs`). Nothing reads the wall clock, so a seed replays exactly.
//!
//! The loop: events (disk completions, client ticks, power cuts) wait in a queue ordered by
//! virtual time and then by insertion; each [`Simulation::step`] takes the first, advances the
//! clock to it, drives `handle_timeout` when the node asks, delivers the event, and routes every
//! output of the node (bytes to the client, requests to the disk) until nothing moves.
//!
//! A power cut drops the node with everything it had in flight, applies the disk's crash
//! semantics (`disk.rs`), starts a fresh standalone node with the same settings and a fresh
//! client, which first reads the whole volume and checks every sector against the model's crash
//! rule (`model.rs`), then goes on with the workload.
//!
//! Checkers, after every step (the first violation ends the run):
//! - every completed read matches the model's read rule; after each cut, the whole volume
//!   matches the crash rule (`client.rs`, `model.rs`);
//! - one reply per request, cookies matching, EIO only, never more error replies than errors
//!   the disk injected;
//! - no request waits longer than [`REPLY_WAIT_MS_MAX`] for its reply;
//! - the node never closes the client, never uses a peer link, and its I/O counters never go
//!   backwards within a life, and it never counts a protocol violation.

pub mod client;
pub mod disk;
pub mod model;
pub mod pair;
pub mod prng;

use client::{Client, Workload};
use disk::{DiskOptions, SimDisk, SECTOR_BYTES};
use model::{decode_sector, Model, Value};
use prng::Prng;
use std::collections::BTreeMap;
use tandem::nbd::{ConnId, ServerCounters};
use tandem::node::{Node, NodeSettings, Output};
use tandem::time::Instant;

/// The longest a request may wait for its reply before the run fails (liveness).
pub const REPLY_WAIT_MS_MAX: u64 = 5_000;

/// The one-line reproduction of a seed.
pub fn repro_command(seed: u64, steps: u64) -> String {
    format!("cargo run -p tandem-tests --release --bin sim -- --seed {seed} --steps {steps}")
}

/// Everything a run can vary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Size of the volume (a multiple of 512).
    pub volume_bytes: u64,
    /// The disk.
    pub disk: DiskOptions,
    /// The random workload; `None` for scripted scenarios.
    pub workload: Option<Workload>,
    /// Longest pause between client ticks, in milliseconds (at least 1 is used).
    pub think_ms_max: u64,
    /// Power cuts come after a uniform delay in this range (milliseconds); `None`: never.
    pub power_cut_ms: Option<(u64, u64)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            volume_bytes: 1 << 20,
            disk: DiskOptions::default(),
            workload: Some(Workload::default()),
            think_ms_max: 1,
            power_cut_ms: None,
        }
    }
}

impl Options {
    /// The options of `seed` (swarm testing: each seed explores a different corner).
    pub fn swarm(seed: u64) -> Options {
        let mut prng = Prng::new(seed ^ 0x0005_eed0_f097_10a5);
        let latency_ms_max = prng.pick(&[0, 1, 3, 5]);
        let disk = DiskOptions {
            latency_ms_min: prng.range(0, latency_ms_max.min(1)),
            latency_ms_max,
            fault_per_million: if prng.chance(300_000) {
                prng.pick(&[1_000, 10_000, 50_000])
            } else {
                0
            },
            lose_per_million: prng.pick(&[0, 200_000, 500_000, 1_000_000]),
            discard_zeroes_per_million: prng.pick(&[0, 500_000, 1_000_000]),
            lie: false,
        };
        let workload = Workload {
            queue_depth: prng.pick(&[1, 4, 16, 64]),
            request_sectors_max: prng.pick(&[1, 8, 64, 256]),
            hot_sectors: if prng.chance(500_000) {
                Some(prng.pick(&[16, 64, 256]))
            } else {
                None
            },
            mix: [
                prng.range(10, 50) as u32,
                prng.range(10, 60) as u32,
                prng.range(1, 15) as u32,
                prng.range(0, 10) as u32,
                prng.range(0, 10) as u32,
            ],
            fua_per_million: prng.pick(&[0, 100_000, 500_000]),
        };
        let power_cut_ms = if prng.chance(200_000) {
            None
        } else {
            Some(prng.pick(&[(5, 50), (20, 200), (100, 1_000)]))
        };
        Options {
            volume_bytes: prng.pick(&[1u64 << 20, 2 << 20, 4 << 20]),
            disk,
            workload: Some(workload),
            think_ms_max: prng.pick(&[0, 1, 2]),
            power_cut_ms,
        }
    }
}

/// A violation: what failed, where, and how to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The step at which a checker failed.
    pub step: u64,
    /// Virtual time then.
    pub now_ms: u64,
    /// Which checker and why.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SEED={} step={} t={}ms: {}",
            self.seed, self.step, self.now_ms, self.message
        )
    }
}

/// What a run did (printed next to `SEED=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Steps taken.
    pub steps: u64,
    /// Virtual time reached.
    pub now_ms: u64,
    /// Power cuts.
    pub power_cuts: u64,
    /// Verification passes completed after cuts.
    pub verifications: u64,
    /// Reads checked against the model.
    pub reads_checked: u64,
    /// Requests answered.
    pub replies: u64,
    /// Errors the disk injected.
    pub faults_injected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    DiskDone { tag: u64 },
    ClientTick,
    PowerCut,
}

/// One simulated node with its disk and one client.
#[derive(Debug)]
pub struct Simulation {
    seed: u64,
    options: Options,
    settings: NodeSettings,
    now_ms: u64,
    step: u64,
    events: BTreeMap<(u64, u64), Event>,
    event_seq: u64,
    node: Node,
    conn: ConnId,
    disk: SimDisk,
    client: Client,
    model: Model,
    client_prng: Prng,
    cut_prng: Prng,
    counters: ServerCounters,
    report: Report,
    /// Replies and faults of lives before this one.
    past_replies: u64,
    past_reads: u64,
    past_faults: u64,
    life_faults_base: u64,
}

impl Simulation {
    /// A simulation of `seed` with its swarm options.
    pub fn from_seed(seed: u64) -> Simulation {
        Simulation::new(seed, Options::swarm(seed))
    }

    /// A simulation of `seed` with `options`.
    pub fn new(seed: u64, options: Options) -> Simulation {
        let mut root = Prng::new(seed);
        let disk_prng = root.split();
        let client_prng = root.split();
        let cut_prng = root.split();
        let settings = NodeSettings {
            name: "sim".to_string(),
            backing: "sim-disk".to_string(),
            volume_bytes: options.volume_bytes,
        };
        let sectors = (options.volume_bytes / SECTOR_BYTES as u64) as usize;
        let now = Instant::from_millis(0);
        let mut node = Node::new_standalone(settings.clone(), now);
        let conn = node
            .handle_client_connected(now)
            .expect("a fresh node accepts a client");
        let mut sim = Simulation {
            seed,
            disk: SimDisk::new(options.volume_bytes, options.disk.clone(), disk_prng),
            client: Client::new(seed, 1, options.volume_bytes, false),
            settings,
            now_ms: 0,
            step: 0,
            events: BTreeMap::new(),
            event_seq: 0,
            counters: node.status().io,
            node,
            conn,
            model: Model::new(sectors),
            client_prng,
            cut_prng,
            report: Report::default(),
            past_replies: 0,
            past_reads: 0,
            past_faults: 0,
            life_faults_base: 0,
            options,
        };
        sim.schedule(0, Event::ClientTick);
        sim.schedule_power_cut();
        sim.pump().expect("handshake starts cleanly");
        sim
    }

    /// The options of this run.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Virtual time, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Runs `steps` steps, stopping at the first violation.
    pub fn run(&mut self, steps: u64) -> Result<Report, Failure> {
        for _ in 0..steps {
            self.step()?;
        }
        Ok(self.report())
    }

    /// The counts so far.
    pub fn report(&self) -> Report {
        Report {
            steps: self.step,
            now_ms: self.now_ms,
            replies: self.past_replies + self.client.results.len() as u64,
            reads_checked: self.past_reads + self.client.reads_checked,
            faults_injected: self.past_faults + self.life_faults(),
            ..self.report
        }
    }

    /// Takes the first event and checks everything afterwards.
    pub fn step(&mut self) -> Result<(), Failure> {
        self.step += 1;
        let Some(((at_ms, _), event)) = self.events.pop_first() else {
            unreachable!("the client tick is always scheduled")
        };
        self.now_ms = self.now_ms.max(at_ms);
        let now = self.now();
        if self.node.poll_timeout().is_some_and(|t| t <= now) {
            self.node.handle_timeout(now);
        }
        match event {
            Event::DiskDone { tag } => {
                let completion = self.disk.complete(tag);
                self.node.handle_disk_completion(completion, now);
            }
            Event::ClientTick => {
                self.client.tick(
                    &mut self.client_prng,
                    &mut self.model,
                    self.options.workload.as_ref(),
                    self.now_ms,
                );
                let think = self.client_prng.range(1, self.options.think_ms_max.max(1));
                self.schedule(think, Event::ClientTick);
            }
            Event::PowerCut => self.power_cut(),
        }
        self.pump().map_err(|m| self.failure(m))?;
        self.check().map_err(|m| self.failure(m))
    }

    /// Steps until the client has nothing in flight and nothing unsent (scenario tests), at
    /// most `steps_max` steps.
    pub fn run_until_idle(&mut self, steps_max: u64) -> Result<(), Failure> {
        for _ in 0..steps_max {
            if self.client.is_idle() && self.disk.in_flight_count() == 0 {
                return Ok(());
            }
            self.step()?;
        }
        Err(self.failure(format!("not idle after {steps_max} steps")))
    }

    /// The power goes now.
    pub fn power_cut(&mut self) {
        self.report.power_cuts += 1;
        self.past_replies += self.client.results.len() as u64;
        self.past_reads += self.client.reads_checked;
        self.past_faults += self.life_faults();
        self.life_faults_base = self.disk.faults_injected();
        self.events.clear();
        let _ = self.disk.power_cut();
        let now = self.now();
        self.node = Node::new_standalone(self.settings.clone(), now);
        self.counters = self.node.status().io;
        self.client = Client::new(
            self.seed,
            self.client.next_op(),
            self.options.volume_bytes,
            true,
        );
        self.conn = self
            .node
            .handle_client_connected(now)
            .expect("a fresh node accepts a client");
        self.schedule(0, Event::ClientTick);
    }

    /// Sends a write from the client (scripted scenarios); returns its cookie.
    pub fn write(&mut self, first: u64, count: u64, fua: bool) -> u64 {
        let op = self
            .client
            .write(&mut self.model, first, count, fua, self.now_ms);
        self.pump_or_panic();
        op
    }

    /// Sends a flush from the client; returns its cookie.
    pub fn flush(&mut self) -> u64 {
        let op = self.client.flush(&mut self.model, self.now_ms);
        self.pump_or_panic();
        op
    }

    /// Sends a read from the client; returns its cookie.
    pub fn read(&mut self, first: u64, count: u64) -> u64 {
        let op = self.client.read(&mut self.model, first, count, self.now_ms);
        self.pump_or_panic();
        op
    }

    /// The error the reply to `cookie` carried (0: success), once it came.
    pub fn reply_error(&self, cookie: u64) -> Option<u32> {
        self.client.results.get(&cookie).copied()
    }

    /// Changes the disk's EIO rate from now on.
    pub fn set_disk_fault_per_million(&mut self, per_million: u32) {
        self.disk.set_fault_per_million(per_million);
    }

    /// Changes the share of volatile versions the next power cut loses.
    pub fn set_disk_lose_per_million(&mut self, per_million: u32) {
        self.disk.set_lose_per_million(per_million);
    }

    /// What `sector` holds on the disk now (`None`: garbage).
    pub fn disk_value(&self, sector: u64) -> Option<Value> {
        decode_sector(self.seed, sector, self.disk.sector(sector as usize))
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.now_ms)
    }

    fn failure(&self, message: String) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            now_ms: self.now_ms,
            message,
        }
    }

    fn life_faults(&self) -> u64 {
        self.disk.faults_injected() - self.life_faults_base
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.event_seq += 1;
        self.events
            .insert((self.now_ms + after_ms, self.event_seq), event);
    }

    fn schedule_power_cut(&mut self) {
        if let Some((low, high)) = self.options.power_cut_ms {
            let after = self.cut_prng.range(low, high);
            self.schedule(after, Event::PowerCut);
        }
    }

    fn pump_or_panic(&mut self) {
        if let Err(message) = self.pump() {
            panic!("{}", self.failure(message));
        }
    }

    /// Routes the node's outputs and feeds the client's bytes until nothing moves.
    fn pump(&mut self) -> Result<(), String> {
        let now = self.now();
        loop {
            let mut moved = false;
            while let Some(output) = self.node.poll_output() {
                moved = true;
                match output {
                    Output::Send { conn, head, data } => {
                        if conn != self.conn {
                            return Err(format!("bytes for unknown connection {conn:?}"));
                        }
                        self.client.receive(head.as_slice(), &mut self.model)?;
                        if let Some(data) = data {
                            let result = self.client.receive(data.as_slice(), &mut self.model);
                            self.node.recycle(data);
                            result?;
                        }
                    }
                    Output::Disk { tag, request } => {
                        let latency_ms = self.disk.submit(tag, request);
                        self.schedule(latency_ms, Event::DiskDone { tag });
                    }
                    Output::Close { conn } => {
                        return Err(format!("the node closed the client connection {conn:?}"));
                    }
                    Output::LinkSend { .. }
                    | Output::LinkClose { .. }
                    | Output::Metadata { .. }
                    | Output::ProbeClusterIp
                    | Output::ClusterIp(_)
                    | Output::Fence { .. } => {
                        return Err(
                            "a standalone node used a peer link, mirror metadata or failover"
                                .to_string(),
                        );
                    }
                }
            }
            if !self.client.unsent().is_empty() {
                let n = self
                    .node
                    .handle_client_bytes(self.conn, self.client.unsent(), now);
                if n > 0 {
                    self.client.consumed(n);
                    moved = true;
                }
            }
            if let Some(base) = self.client.take_verified() {
                self.model.reset_life(base);
                self.report.verifications += 1;
                self.schedule_power_cut();
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn check(&mut self) -> Result<(), String> {
        let counters = self.node.status().io;
        let before = &self.counters;
        let pairs = [
            (
                "connections_accepted",
                before.connections_accepted,
                counters.connections_accepted,
            ),
            ("reads", before.reads, counters.reads),
            ("writes", before.writes, counters.writes),
            ("flushes", before.flushes, counters.flushes),
            ("read_bytes", before.read_bytes, counters.read_bytes),
            (
                "written_bytes",
                before.written_bytes,
                counters.written_bytes,
            ),
            ("errors", before.errors, counters.errors),
        ];
        for (name, was, is) in pairs {
            if is < was {
                return Err(format!("counter {name} went backwards: {was} -> {is}"));
            }
        }
        if counters.protocol_violations != 0 {
            return Err("the node counted a protocol violation from a correct client".to_string());
        }
        self.counters = counters;
        if self.client.error_replies > self.life_faults() {
            return Err(format!(
                "{} error replies but the disk injected only {} errors",
                self.client.error_replies,
                self.life_faults()
            ));
        }
        if let Some(sent) = self.client.oldest_sent_ms() {
            if self.now_ms - sent > REPLY_WAIT_MS_MAX {
                return Err(format!(
                    "a request sent at {sent} ms has no reply at {} ms",
                    self.now_ms
                ));
            }
        }
        Ok(())
    }
}

/// Runs `seed` for `steps` steps with its swarm options.
pub fn run_seed(seed: u64, steps: u64) -> Result<Report, Failure> {
    Simulation::from_seed(seed).run(steps)
}
