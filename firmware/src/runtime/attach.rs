//! The volume in the local kernel: `[volume] attach` (`/dev/nbdN`) and `mount` (ext4).
//!
//! While the node serves the volume (primary or standalone) the runtime hands one end of a
//! socketpair to the kernel's NBD client through the nbd netlink interface and serves the
//! other end like any NBD client, but without a handshake. A worker thread then finds the
//! filesystem (or makes one on a blank volume) and mounts it; ext4 replays its journal there,
//! which is what turns a takeover after a power cut into a clean filesystem.
//!
//! Attaching and mounting block in the kernel on I/O that the event loop itself must serve,
//! so they never run on the loop's thread: the loop starts a worker and looks at it once per
//! turn. When the node stops serving, the server has already closed the kernel's socket (the
//! kernel fails what is still queued); the worker then detaches the mount lazily and
//! disconnects the device, so that the next promotion finds `/dev/nbdN` free. On a clean stop
//! the mount is unmounted for real first, while the loop still serves its writes.
//!
//! The filesystem is made only on a volume whose first [`BLANK_CHECK_BYTES`] are all zero: a
//! volume that holds anything else and no ext4 is left alone and reported.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_board::nbd_kernel::{self, Attachment};

/// The kernel's block size for the device: ext4's, and the page size.
const BLOCK_BYTES: u64 = 4096;
/// How long the kernel waits for one request. Longer than any legitimate pause of the volume
/// (the degrade procedure, a switchover, a resync's catch-up), and longer than the 30 s after
/// which a stuck disk stops the watchdog's petting: the board is reset before ext4 ever sees
/// an EIO from a slow answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The head of a volume that must read as zeros before a filesystem is made on it.
const BLANK_CHECK_BYTES: usize = 4 << 20;
/// ext4's superblock sits 1024 bytes in; its magic 0xEF53 (little endian) 56 bytes into it.
const EXT4_MAGIC_OFFSET: usize = 1024 + 56;
/// How long a clean stop waits for the filesystem to be written back and unmounted.
pub(super) const UNMOUNT_TIMEOUT_MS: u64 = 30_000;

/// Where the kernel side stands.
#[derive(Debug)]
enum State {
    Detached,
    /// The worker attaches and mounts.
    Attaching(JoinHandle<Result<String, String>>),
    /// Attached (and mounted): the description for `status`.
    Attached(String),
    /// The worker unmounts and detaches.
    Detaching(JoinHandle<Result<(), String>>),
    /// Attaching failed; not tried again until the node stops and starts serving.
    Failed(String),
}

/// The kernel side of the volume.
#[derive(Debug)]
pub(super) struct KernelVolume {
    device: PathBuf,
    index: u32,
    mount: Option<PathBuf>,
    state: State,
}

impl KernelVolume {
    /// `None` without `[volume] attach`.
    pub(super) fn new(device: Option<&Path>, mount: Option<&Path>) -> Option<KernelVolume> {
        let device = device?;
        let index = crate::config::nbd_index(device)?;
        Some(KernelVolume {
            device: device.to_path_buf(),
            index,
            mount: mount.map(Path::to_path_buf),
            state: State::Detached,
        })
    }

    /// One line for `status`.
    pub(super) fn describe(&self) -> String {
        let device = self.device.display();
        match &self.state {
            State::Detached => format!("{device} detached"),
            State::Attaching(_) => format!("{device} attaching"),
            State::Attached(what) => what.clone(),
            State::Detaching(_) => format!("{device} detaching"),
            State::Failed(reason) => format!("{device} failed: {reason}"),
        }
    }

    /// Whether a worker runs.
    pub(super) fn is_busy(&self) -> bool {
        matches!(self.state, State::Attaching(_) | State::Detaching(_))
    }

    /// Whether nothing is attached and no worker runs.
    pub(super) fn is_detached(&self) -> bool {
        matches!(self.state, State::Detached | State::Failed(_))
    }

    /// Moves toward `serving` (the node serves the volume) and reaps finished workers.
    /// `size_bytes` and `flags` describe the export to the kernel. Returns the stream the
    /// runtime is to serve as the kernel's NBD connection when an attach starts.
    pub(super) fn service(
        &mut self,
        serving: bool,
        size_bytes: u64,
        flags: u16,
    ) -> Option<UnixStream> {
        self.reap();
        match (&self.state, serving) {
            (State::Detached, true) => return self.start_attach(size_bytes, flags),
            (State::Attached(_), false) => self.start_detach(false),
            (State::Failed(_), false) => self.state = State::Detached,
            _ => {}
        }
        None
    }

    /// A clean stop: unmounts for real (the loop keeps serving the write-back) and detaches.
    pub(super) fn stop(&mut self) {
        self.reap();
        if matches!(self.state, State::Attached(_)) {
            self.start_detach(true);
        }
    }

    fn reap(&mut self) {
        let finished = match &self.state {
            State::Attaching(worker) => worker.is_finished(),
            State::Detaching(worker) => worker.is_finished(),
            _ => false,
        };
        if !finished {
            return;
        }
        match std::mem::replace(&mut self.state, State::Detached) {
            State::Attaching(worker) => match join(worker) {
                Ok(what) => {
                    log::info!("volume in the kernel: {what}");
                    self.state = State::Attached(what);
                }
                Err(reason) => {
                    log::error!(
                        "the volume could not be attached to {} ({reason}); it is still served \
                         on the NBD socket",
                        self.device.display()
                    );
                    self.state = State::Failed(reason);
                }
            },
            State::Detaching(worker) => match join(worker) {
                Ok(()) => log::info!("volume detached from {}", self.device.display()),
                Err(reason) => log::error!(
                    "the volume did not detach cleanly from {} ({reason})",
                    self.device.display()
                ),
            },
            other => self.state = other,
        }
    }

    fn start_attach(&mut self, size_bytes: u64, flags: u16) -> Option<UnixStream> {
        let (ours, theirs) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                self.state = State::Failed(format!("socketpair: {e}"));
                return None;
            }
        };
        // The loop's thread serves the kernel's writeback: under memory pressure its own
        // allocations must not wait for that writeback (PR_SET_IO_FLUSHER).
        if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
            log::warn!("cannot mark the event loop as an I/O flusher (error={e})");
        }
        let attachment = Attachment {
            index: self.index,
            size_bytes,
            block_bytes: BLOCK_BYTES,
            request_timeout: REQUEST_TIMEOUT,
            transmission_flags: flags,
        };
        let device = self.device.clone();
        let mount = self.mount.clone();
        let worker = std::thread::Builder::new()
            .name("attach".into())
            .spawn(move || attach_and_mount(&attachment, &theirs, &device, mount.as_deref()));
        match worker {
            Ok(worker) => {
                log::info!("attaching the volume to {}", self.device.display());
                self.state = State::Attaching(worker);
                Some(ours)
            }
            Err(e) => {
                self.state = State::Failed(format!("cannot start a worker thread: {e}"));
                None
            }
        }
    }

    fn start_detach(&mut self, graceful: bool) {
        let index = self.index;
        let mount = self.mount.clone();
        let worker = std::thread::Builder::new()
            .name("detach".into())
            .spawn(move || unmount_and_detach(index, mount.as_deref(), graceful));
        match worker {
            Ok(worker) => self.state = State::Detaching(worker),
            Err(e) => {
                log::error!("cannot start a worker thread to detach the volume ({e})");
                self.state = State::Detached;
            }
        }
    }
}

fn join<T>(worker: JoinHandle<Result<T, String>>) -> Result<T, String> {
    worker
        .join()
        .unwrap_or_else(|_| Err("the worker thread panicked".to_owned()))
}

/// The worker of an attach: the kernel gets the socket, then the filesystem is found (or made
/// on a blank volume) and mounted.
fn attach_and_mount(
    attachment: &Attachment,
    socket: &UnixStream,
    device: &Path,
    mount: Option<&Path>,
) -> Result<String, String> {
    nbd_kernel::connect(attachment, socket.as_fd())
        .map_err(|e| format!("nbd netlink connect: {e}"))?;
    let Some(mount) = mount else {
        return Ok(format!("{} attached", device.display()));
    };
    mount_filesystem(device, mount).inspect_err(|_| {
        // Nothing half-done stays behind: the device is free for the next attempt.
        let _ = nbd_kernel::disconnect(attachment.index);
    })
}

fn mount_filesystem(device: &Path, mount: &Path) -> Result<String, String> {
    let made = prepare_filesystem(device)?;
    std::fs::create_dir_all(mount)
        .map_err(|e| format!("cannot create the mount point {}: {e}", mount.display()))?;
    rustix::mount::mount(
        device,
        mount,
        "ext4",
        rustix::mount::MountFlags::NOATIME,
        None,
    )
    .map_err(|e| format!("mount {} on {}: {e}", device.display(), mount.display()))?;
    Ok(format!(
        "{} attached, ext4 mounted on {}{}",
        device.display(),
        mount.display(),
        if made {
            " (made on a blank volume)"
        } else {
            ""
        }
    ))
}

/// Makes sure `device` holds ext4: true if it was blank and a filesystem was made.
fn prepare_filesystem(device: &Path) -> Result<bool, String> {
    let mut head = vec![0u8; BLANK_CHECK_BYTES];
    let mut file =
        File::open(device).map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    file.read_exact(&mut head)
        .map_err(|e| format!("cannot read {}: {e}", device.display()))?;
    drop(file);
    if head[EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2] == [0x53, 0xef] {
        return Ok(false);
    }
    if head.iter().any(|&b| b != 0) {
        return Err(format!(
            "{} holds data that is not an ext4 filesystem; it is not formatted over",
            device.display()
        ));
    }
    log::info!("the volume is blank: making an ext4 filesystem on it");
    let out = Command::new("mke2fs")
        .args(["-t", "ext4", "-q", "-F", "-L", "tandem"])
        .arg(device)
        .output()
        .map_err(|e| format!("cannot run mke2fs: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mke2fs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(true)
}

/// The worker of a detach. `graceful`: the volume is still served, so a real unmount writes
/// everything back; otherwise the server is gone and the mount is only cut loose.
fn unmount_and_detach(index: u32, mount: Option<&Path>, graceful: bool) -> Result<(), String> {
    let mut result = Ok(());
    if let Some(mount) = mount {
        let flags = if graceful {
            rustix::mount::UnmountFlags::empty()
        } else {
            rustix::mount::UnmountFlags::DETACH
        };
        if let Err(e) = rustix::mount::unmount(mount, flags) {
            if e != rustix::io::Errno::INVAL {
                // EINVAL: nothing was mounted there.
                result = Err(format!("umount {}: {e}", mount.display()));
            }
            if graceful {
                let _ = rustix::mount::unmount(mount, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
    if let Err(e) = nbd_kernel::disconnect(index) {
        result = result.and(Err(format!("nbd netlink disconnect: {e}")));
    }
    result
}
