//! A client that writes through the cluster IP as a user's copy would, for the failover tests
//! and the failover benchmark: it connects with a 250 ms connect timeout, gives up on a request
//! after 500 ms of silence, then reconnects to the same address and retries the request, so it
//! measures tandem, not the kernel's SYN retry schedule. Every write it saw acknowledged can be
//! checked afterwards.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::nbd_wire::RawClient;
use crate::netns::Lab;
use crate::pseudo_random_bytes;

/// How long a read-back waits for the volume to be served.
const READ_BACK_WAIT: Duration = Duration::from_secs(30);
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// What a client wrote: numbered blocks at distinct offsets, each one's content derived from
/// its number, so any block can be checked on its own.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub blocks: u64,
    pub block_bytes: usize,
    /// Small writes scattered over the volume (true), or one large sequential copy.
    pub scattered: bool,
    pub seed: u64,
}

impl Workload {
    pub fn offset(&self, i: u64) -> u64 {
        let slot = if self.scattered {
            // A permutation of 0..blocks (7919 is prime and does not divide the count).
            (i * 7919) % self.blocks
        } else {
            i
        };
        slot * self.block_bytes as u64
    }

    pub fn data(&self, i: u64) -> Vec<u8> {
        pseudo_random_bytes(self.seed ^ (i << 20), self.block_bytes)
    }
}

/// The client's record of a run.
#[derive(Debug, Default)]
pub struct Record {
    pub acked: AtomicU64,
    pub reconnects: AtomicU64,
    /// When each acknowledgement arrived.
    pub ack_times: Mutex<Vec<Instant>>,
}

impl Record {
    /// The longest gap between two acknowledgements.
    pub fn longest_pause(&self) -> Duration {
        let times = self.ack_times.lock().expect("ack times");
        times
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }

    /// The client-visible pause of something that was over at `at`: from the last
    /// acknowledgement before `at` to the first one after it.
    pub fn pause_around(&self, at: Instant) -> Option<Duration> {
        let times = self.ack_times.lock().expect("ack times");
        let after = times.iter().position(|&t| t > at)?;
        let before = after.checked_sub(1).map_or(at, |i| times[i]);
        Some(times[after] - before)
    }
}

pub fn connect(addr: SocketAddr) -> std::io::Result<RawClient<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    let mut client = RawClient::over_tcp(stream)?;
    client.stream().set_read_timeout(Some(REQUEST_TIMEOUT))?;
    client.handshake()?;
    match client.go("")? {
        Ok(_) => Ok(client),
        Err(reply) => Err(std::io::Error::other(format!(
            "NBD_OPT_GO refused: {reply:?}"
        ))),
    }
}

/// Runs in the client namespace: writes every block of `work` through `addr`, reconnecting
/// and retrying as needed, until done or `stop` (then false).
pub fn write_all(addr: SocketAddr, work: Workload, record: &Record, stop: &AtomicBool) -> bool {
    let mut client: Option<RawClient<TcpStream>> = None;
    let mut i = 0;
    while i < work.blocks {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let Some(c) = client.as_mut() else {
            match connect(addr) {
                Ok(c) => client = Some(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    record.reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        };
        match c.write(0, work.offset(i), &work.data(i)) {
            Ok(0) => {
                let now = Instant::now();
                record.ack_times.lock().expect("ack times").push(now);
                record.acked.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            // An error reply (the node demoted under it) or a dead connection: retry anew.
            Ok(_) | Err(_) => client = None,
        }
    }
    true
}

/// Reads every block back through `addr` and returns the numbers of those that differ.
pub fn check_all(addr: SocketAddr, work: Workload) -> Vec<u64> {
    let deadline = Instant::now() + READ_BACK_WAIT;
    let mut client = loop {
        match connect(addr) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot read back through {addr}: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    client
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    (0..work.blocks)
        .filter(|&i| {
            let read = client
                .read(work.offset(i), work.block_bytes as u32)
                .expect("read i/o")
                .expect("read ok");
            read != work.data(i)
        })
        .collect()
}

/// Runs `work` from the client namespace while `during` runs once `start_after` blocks are
/// acknowledged; returns the record. Panics unless every block is written in the end.
pub fn with_workload(
    lab: &Lab,
    work: Workload,
    start_after: u64,
    during: impl FnOnce(&Record),
) -> Record {
    let record = Record::default();
    let stop = AtomicBool::new(false);
    let addr = lab.nbd_addr();
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| lab.in_client(|| write_all(addr, work, &record, &stop)));
        let started = Instant::now();
        while record.acked.load(Ordering::Relaxed) < start_after {
            assert!(
                started.elapsed() < READ_BACK_WAIT,
                "the client made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        during(&record);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let done = writer.join().expect("writer");
        assert!(
            done,
            "the client did not finish its copy (acked {} of {})",
            record.acked.load(Ordering::Relaxed),
            work.blocks
        );
    });
    let bad = lab.in_client(|| check_all(addr, work));
    assert!(bad.is_empty(), "blocks that differ after the copy: {bad:?}");
    record
}
