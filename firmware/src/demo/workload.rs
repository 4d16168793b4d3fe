//! What the demo's client does: copy one large file and many small ones onto the volume, and
//! read them back to compare checksums, as a user's machine would through the NAS.
//!
//! The files are block-level stand-ins: each is a byte range of the volume at its own offset,
//! filled from its own seed, so its content and SHA-256 are known without storing it. The client
//! behaves like a user's copy: short timeouts (a 250 ms connect, 500 ms per request), then it
//! reconnects and starts the interrupted file again from its beginning, as re-running `cp`
//! would. It runs on a thread of its own (inside the client's network namespace when there is
//! one) and reports through [`Shared`], which the story reads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::nbd_client::{Endpoint, NbdClient, RequestError, Timeouts};
use super::screen::mib;

/// Each request carries at most this much (the large file is copied in 1 MiB writes).
const REQUEST_BYTES: u64 = 1 << 20;
/// The large file (the seed's installer image).
const LARGE_FILE_BYTES: u64 = 64 << 20;
/// How many small files (the seed's photo data set).
const SMALL_FILE_COUNT: u64 = 300;
/// Small files are 4 to 64 KiB, in steps of 4 KiB; each gets a 64 KiB slot of the volume.
const SMALL_FILE_UNIT_BYTES: u64 = 4 << 10;
const SMALL_FILE_SLOT_BYTES: u64 = 64 << 10;
/// Where the small files start: right after the large one.
const SMALL_FILES_OFFSET: u64 = LARGE_FILE_BYTES;

/// The client's patience, as a user's NAS mount would have it short.
const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_millis(250),
    request: Duration::from_millis(500),
};
/// Between two rounds of connection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// The client gives up when no node has served the volume for this long.
const RECONNECT_GIVE_UP: Duration = Duration::from_secs(60);

/// One file: where it lives on the volume, how long it is, and its checksum.
#[derive(Debug)]
pub(crate) struct File {
    pub(crate) name: String,
    offset: u64,
    pub(crate) bytes: u64,
    seed: u64,
    sha256: [u8; 32],
}

impl File {
    fn new(name: String, offset: u64, bytes: u64, seed: u64) -> File {
        let mut file = File {
            name,
            offset,
            bytes,
            seed,
            sha256: [0; 32],
        };
        let mut hasher = Sha256::new();
        let mut buf = Vec::new();
        let mut at = 0;
        while at < file.bytes {
            file.chunk(at, &mut buf);
            hasher.update(&buf);
            at += buf.len() as u64;
        }
        file.sha256 = hasher.finalize().into();
        file
    }

    /// The file's bytes from `at` (a multiple of 8), one request's worth at most.
    fn chunk(&self, at: u64, buf: &mut Vec<u8>) {
        let len = (self.bytes - at).min(REQUEST_BYTES) as usize;
        buf.clear();
        let mut word = at / 8;
        while buf.len() < len {
            buf.extend_from_slice(&splitmix64(self.seed ^ word.wrapping_mul(0x9e37)).to_le_bytes());
            word += 1;
        }
        buf.truncate(len);
    }
}

/// SplitMix64: the n-th word of a file depends on nothing else, so any chunk can be made alone.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The files the demo copies.
#[derive(Debug)]
pub(crate) struct Dataset {
    pub(crate) files: Vec<File>,
}

impl Dataset {
    /// The large file first, then the small ones; always the same bytes.
    pub(crate) fn generate() -> Dataset {
        let mut files = vec![File::new(
            "installer.iso".to_string(),
            0,
            LARGE_FILE_BYTES,
            0x7a6d_0001,
        )];
        for i in 0..SMALL_FILE_COUNT {
            let units = 1 + splitmix64(i) % (SMALL_FILE_SLOT_BYTES / SMALL_FILE_UNIT_BYTES);
            files.push(File::new(
                format!("photos/IMG_{:04}.jpg", i + 1),
                SMALL_FILES_OFFSET + i * SMALL_FILE_SLOT_BYTES,
                units * SMALL_FILE_UNIT_BYTES,
                0x7a6d_1000 + i,
            ));
        }
        Dataset { files }
    }

    /// The bytes of every file together.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// The first byte of the volume past every file.
    pub(crate) fn end_offset(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.offset + f.bytes)
            .max()
            .unwrap_or(0)
    }
}

/// Something the client ran into, for the story to tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientEvent {
    /// A request failed and the connection was given up: `during` says which ("the write at
    /// 25 MiB of installer.iso").
    RequestFailed { during: String, error: String },
    /// Connected again after `attempts` tries.
    Reconnected { endpoint: String, attempts: u64 },
    /// The interrupted file is copied (or read) again from its start.
    Restarting { file: String, copying: bool },
}

/// How a client job ended without finishing.
#[derive(Debug)]
pub(crate) enum JobError {
    /// The story asked the client to stop (Ctrl-C, or a failure elsewhere).
    Stopped,
    /// No node served the volume for [`RECONNECT_GIVE_UP`].
    GaveUp(String),
}

/// One acknowledged write: when it arrived, and when its connection was made.
#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Instant,
    connected_at: Instant,
}

/// What the client thread and the story share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    stop: AtomicBool,
    /// The file being copied or read.
    file: AtomicUsize,
    /// Of that file, the bytes done.
    file_done_bytes: AtomicU64,
    /// Of the whole job, the bytes done.
    done_bytes: AtomicU64,
    /// Connections made after a failure.
    reconnects: AtomicU64,
    acks: Mutex<Vec<Ack>>,
    events: Mutex<Vec<ClientEvent>>,
}

impl Shared {
    /// Asks the client to stop at its next request.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// (file index, bytes of that file done, bytes of the job done).
    pub(crate) fn progress(&self) -> (usize, u64, u64) {
        (
            self.file.load(Ordering::Relaxed),
            self.file_done_bytes.load(Ordering::Relaxed),
            self.done_bytes.load(Ordering::Relaxed),
        )
    }

    /// How often the client connected again after a failure.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// What happened since the last call.
    pub(crate) fn take_events(&self) -> Vec<ClientEvent> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// The first write acknowledged after `cut` on a connection made after `cut`: an answer
    /// that can only have come from a node serving after the cut.
    pub(crate) fn first_ack_after(&self, cut: Instant) -> Option<Instant> {
        lock(&self.acks)
            .iter()
            .find(|a| a.at > cut && a.connected_at > cut)
            .map(|a| a.at)
    }

    fn event(&self, event: ClientEvent) {
        lock(&self.events).push(event);
    }

    fn set_progress(&self, file: usize, file_done: u64, base: u64) {
        self.file.store(file, Ordering::Relaxed);
        self.file_done_bytes.store(file_done, Ordering::Relaxed);
        self.done_bytes.store(base + file_done, Ordering::Relaxed);
    }
}

/// A poisoned lock only means another client thread aborted; the data is still plain values.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's connection, made again (to whichever endpoint serves) after every failure.
struct Session<'a> {
    endpoints: &'a [Endpoint],
    shared: &'a Shared,
    client: Option<(NbdClient, Instant)>,
    /// The last failure, for the message when the client gives up.
    last_error: String,
    ever_connected: bool,
}

impl<'a> Session<'a> {
    fn new(endpoints: &'a [Endpoint], shared: &'a Shared) -> Session<'a> {
        Session {
            endpoints,
            shared,
            client: None,
            last_error: String::new(),
            ever_connected: false,
        }
    }

    /// The connection, made now if there is none: every endpoint is tried in turn (a node
    /// that does not serve refuses at the handshake) until one serves.
    fn client(&mut self) -> Result<(&mut NbdClient, Instant), JobError> {
        if self.client.is_none() {
            let started = Instant::now();
            let mut attempts = 0;
            let (client, endpoint) = 'connect: loop {
                for endpoint in self.endpoints {
                    if self.shared.is_stopped() {
                        return Err(JobError::Stopped);
                    }
                    attempts += 1;
                    match NbdClient::connect(endpoint, TIMEOUTS) {
                        Ok(client) => break 'connect (client, endpoint),
                        Err(e) => self.last_error = format!("{endpoint}: {e}"),
                    }
                }
                if started.elapsed() > RECONNECT_GIVE_UP {
                    return Err(JobError::GaveUp(format!(
                        "no node served the volume for {} s (last: {})",
                        RECONNECT_GIVE_UP.as_secs(),
                        self.last_error
                    )));
                }
                std::thread::sleep(RECONNECT_PAUSE);
            };
            if self.ever_connected {
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                self.shared.event(ClientEvent::Reconnected {
                    endpoint: endpoint.to_string(),
                    attempts,
                });
            }
            self.ever_connected = true;
            self.client = Some((client, Instant::now()));
        }
        match self.client.as_mut() {
            Some((client, connected_at)) => Ok((client, *connected_at)),
            None => Err(JobError::Stopped),
        }
    }

    /// Gives the connection up after a failed request.
    fn failed(&mut self, during: String, error: &RequestError) {
        self.client = None;
        self.shared.event(ClientEvent::RequestFailed {
            during,
            error: error.to_string(),
        });
    }
}

/// Why one pass over a file did not finish.
enum Interrupted {
    /// The connection failed: start the file again.
    Retry,
    Job(JobError),
}

impl From<JobError> for Interrupted {
    fn from(e: JobError) -> Self {
        Interrupted::Job(e)
    }
}

/// Copies every file, each one again from its start when its copy was interrupted, then flushes.
pub(crate) fn copy(
    endpoints: &[Endpoint],
    dataset: &Dataset,
    shared: &Shared,
) -> Result<(), JobError> {
    let mut session = Session::new(endpoints, shared);
    let mut base = 0;
    for (index, file) in dataset.files.iter().enumerate() {
        each_attempt(&mut session, file, true, |session| {
            copy_file(session, index, file, base)
        })?;
        base += file.bytes;
    }
    // The user's `sync`: a flush, again on a new connection if it fails.
    loop {
        let (client, _) = session.client()?;
        match client.flush() {
            Ok(()) => return Ok(()),
            Err(e) => session.failed("the flush".to_string(), &e),
        }
    }
}

/// Reads every file back and returns, per file, whether its SHA-256 matches.
pub(crate) fn verify(
    endpoints: &[Endpoint],
    dataset: &Dataset,
    shared: &Shared,
) -> Result<Vec<bool>, JobError> {
    let mut session = Session::new(endpoints, shared);
    let mut matches = Vec::with_capacity(dataset.files.len());
    let mut base = 0;
    for (index, file) in dataset.files.iter().enumerate() {
        let digest = each_attempt(&mut session, file, false, |session| {
            read_file(session, index, file, base)
        })?;
        matches.push(digest == file.sha256);
        base += file.bytes;
    }
    Ok(matches)
}

/// Runs `pass` over `file` until it finishes, again from the file's start after each
/// interruption.
fn each_attempt<T>(
    session: &mut Session<'_>,
    file: &File,
    copying: bool,
    mut pass: impl FnMut(&mut Session<'_>) -> Result<T, Interrupted>,
) -> Result<T, JobError> {
    loop {
        match pass(session) {
            Ok(value) => return Ok(value),
            Err(Interrupted::Job(e)) => return Err(e),
            Err(Interrupted::Retry) => {
                session.client()?;
                session.shared.event(ClientEvent::Restarting {
                    file: file.name.clone(),
                    copying,
                });
            }
        }
    }
}

/// Writes `file` from its start, one request at a time.
fn copy_file(
    session: &mut Session<'_>,
    index: usize,
    file: &File,
    base: u64,
) -> Result<(), Interrupted> {
    let shared = session.shared;
    let mut buf = Vec::with_capacity(REQUEST_BYTES as usize);
    each_request(
        session,
        index,
        file,
        base,
        "write",
        |client, connected_at, at, _| {
            file.chunk(at, &mut buf);
            client.write(file.offset + at, &buf)?;
            lock(&shared.acks).push(Ack {
                at: Instant::now(),
                connected_at,
            });
            Ok(())
        },
    )
}

/// Reads `file` from its start, one request at a time, and returns its SHA-256.
fn read_file(
    session: &mut Session<'_>,
    index: usize,
    file: &File,
    base: u64,
) -> Result<[u8; 32], Interrupted> {
    let mut hasher = Sha256::new();
    let mut buf = Vec::with_capacity(REQUEST_BYTES as usize);
    each_request(session, index, file, base, "read", |client, _, at, len| {
        client.read(file.offset + at, len, &mut buf)?;
        hasher.update(&buf);
        Ok(())
    })?;
    Ok(hasher.finalize().into())
}

/// One pass over `file` (the `index`-th, after `base` bytes of the job): `request(client,
/// connected_at, at, len)` for each piece of at most [`REQUEST_BYTES`], progress noted after
/// each; the first failed request gives the connection up (its `verb` says what failed).
fn each_request(
    session: &mut Session<'_>,
    index: usize,
    file: &File,
    base: u64,
    verb: &str,
    mut request: impl FnMut(&mut NbdClient, Instant, u64, u32) -> Result<(), RequestError>,
) -> Result<(), Interrupted> {
    let mut at = 0;
    session.shared.set_progress(index, 0, base);
    while at < file.bytes {
        if session.shared.is_stopped() {
            return Err(JobError::Stopped.into());
        }
        let len = (file.bytes - at).min(REQUEST_BYTES) as u32;
        let (client, connected_at) = session.client()?;
        if let Err(e) = request(client, connected_at, at, len) {
            session.failed(format!("the {verb} at {} of {}", mib(at), file.name), &e);
            return Err(Interrupted::Retry);
        }
        at += u64::from(len);
        session.shared.set_progress(index, at, base);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_lie_in_separate_ranges_and_their_chunks_are_reproducible() {
        let dataset = Dataset::generate();
        assert_eq!(dataset.files.len() as u64, 1 + SMALL_FILE_COUNT);
        let mut ranges: Vec<(u64, u64)> = dataset
            .files
            .iter()
            .map(|f| (f.offset, f.offset + f.bytes))
            .collect();
        ranges.sort_unstable();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
        let small = &dataset.files[1..];
        assert!(small
            .iter()
            .all(|f| (SMALL_FILE_UNIT_BYTES..=SMALL_FILE_SLOT_BYTES).contains(&f.bytes)));
        assert!(small.iter().any(|f| f.bytes != small[0].bytes));
        // A chunk made alone equals the same bytes made as part of the whole file.
        let large = &dataset.files[0];
        let (mut first, mut second) = (Vec::new(), Vec::new());
        large.chunk(REQUEST_BYTES, &mut first);
        large.chunk(REQUEST_BYTES, &mut second);
        assert_eq!(first, second);
        large.chunk(0, &mut second);
        assert_ne!(first, second);
    }
}
