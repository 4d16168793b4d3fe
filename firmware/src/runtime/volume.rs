//! Opening the backing device at start-up: find its tandem metadata, or initialize a blank
//! device, or refuse one that carries somebody else's data; and, for a node with a peer, load
//! its replication state (dirty bitmap, activity log).
//!
//! The loading logic reads and writes through [`Device`], synchronous I/O at byte offsets: the
//! runtime gives it its `LinuxDisk`, and the two-node simulator (`tandem-tests`, `sim::pair`)
//! its simulated disk's bytes, so that a simulated restart loads exactly what a real one does.

use crate::metadata::{self, flags, Layout, Superblock, SUPERBLOCK_BYTES};
use tandem_board::LinuxDisk;

/// The volume found (or made) on a backing device.
#[derive(Debug)]
pub struct OpenVolume {
    /// Where everything lives.
    pub layout: Layout,
    /// The current superblock.
    pub superblock: Superblock,
    /// True when this run initialized the device.
    pub initialized: bool,
}

/// Why a backing device cannot be used. Each reads as one line for the operator.
#[derive(Debug)]
pub enum VolumeError {
    /// Too small for the metadata and a minimum volume.
    Layout(metadata::LayoutError),
    /// It carries a foreign signature and no tandem metadata.
    Foreign(&'static str),
    /// tandem metadata exists but does not fit this device (it was resized).
    Mismatch(metadata::LayoutMismatch),
    /// `init` without `--force` on a device that is already a tandem volume.
    AlreadyInitialized,
    /// Reading or writing the device failed.
    Io(std::io::Error),
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeError::Layout(e) => write!(f, "{e}"),
            VolumeError::Foreign(what) => write!(
                f,
                "it carries a foreign signature ({what}) and no tandem metadata; refusing to \
                 overwrite it (run 'tandem init --config FILE --force' to initialize it anyway)"
            ),
            VolumeError::Mismatch(e) => write!(f, "its tandem metadata does not fit it: {e}"),
            VolumeError::AlreadyInitialized => write!(
                f,
                "it already holds a tandem volume (add --force to re-initialize it: the volume \
                 identity changes and a peer will resync it in full)"
            ),
            VolumeError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The backing device as start-up sees it: its size and synchronous reads and writes at byte
/// offsets, each write durable when it returns. Two implementations: the runtime's `LinuxDisk`
/// and the simulator's disk.
pub trait Device {
    /// Bytes of the whole device.
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Writes `bytes` at `offset`, durably.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()>;
}

impl Device for &LinuxDisk {
    fn size_bytes(&self) -> u64 {
        LinuxDisk::size_bytes(self)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_at_sync(offset, buf)
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.write_at_sync(offset, bytes)
    }
}

fn read_superblocks(
    disk: &mut impl Device,
    layout: &Layout,
) -> [Result<Superblock, metadata::SuperblockDecodeError>; 2] {
    layout.superblock_offsets.map(|offset| {
        let mut bytes = vec![0u8; SUPERBLOCK_BYTES];
        match disk.read_at(offset, &mut bytes) {
            Ok(()) => Superblock::decode(&bytes),
            Err(_) => Err(metadata::SuperblockDecodeError::Short),
        }
    })
}

/// Writes both superblock copies, one after the other, each made durable before the next, so
/// that a crash leaves at least one whole copy.
pub fn write_superblock(
    disk: &LinuxDisk,
    layout: &Layout,
    superblock: &Superblock,
) -> std::io::Result<()> {
    write_superblock_to(&mut &*disk, layout, superblock)
}

/// [`write_superblock`] on any [`Device`].
pub fn write_superblock_to(
    disk: &mut impl Device,
    layout: &Layout,
    superblock: &Superblock,
) -> std::io::Result<()> {
    let mut bytes = [0u8; SUPERBLOCK_BYTES];
    superblock.encode(&mut bytes);
    for offset in layout.superblock_offsets {
        disk.write_at(offset, &bytes)?;
    }
    Ok(())
}

/// Reads the first and last bytes of the device for a foreign signature.
fn scan_signature(disk: &mut impl Device) -> Result<Option<&'static str>, VolumeError> {
    let size = disk.size_bytes();
    let head_len = (metadata::SIGNATURE_HEAD_BYTES as u64).min(size) as usize;
    let tail_len = (metadata::SIGNATURE_TAIL_BYTES as u64).min(size) as usize;
    let mut head = vec![0u8; head_len];
    let mut tail = vec![0u8; tail_len];
    disk.read_at(0, &mut head).map_err(VolumeError::Io)?;
    disk.read_at(size - tail_len as u64, &mut tail)
        .map_err(VolumeError::Io)?;
    Ok(metadata::foreign_signature(&head, &tail, size))
}

/// Opens the volume on `disk`: loads its metadata (repairing a damaged copy), or initializes a
/// blank device with `volume_id`. `force` initializes over a foreign signature.
pub fn open(
    disk: &LinuxDisk,
    volume_id: [u8; 16],
    node_name: &str,
) -> Result<OpenVolume, VolumeError> {
    open_device(&mut &*disk, volume_id, node_name)
}

/// [`open`] on any [`Device`].
pub fn open_device(
    disk: &mut impl Device,
    volume_id: [u8; 16],
    node_name: &str,
) -> Result<OpenVolume, VolumeError> {
    let layout = Layout::for_backing(disk.size_bytes()).map_err(VolumeError::Layout)?;
    if let Some((superblock, needs_repair)) =
        metadata::choose_superblock(read_superblocks(disk, &layout))
    {
        superblock
            .check_layout(&layout)
            .map_err(VolumeError::Mismatch)?;
        if needs_repair {
            log::warn!("volume: one superblock copy was damaged or stale; rewriting both");
            write_superblock_to(disk, &layout, &superblock).map_err(VolumeError::Io)?;
        }
        return Ok(OpenVolume {
            layout,
            superblock,
            initialized: false,
        });
    }
    if let Some(what) = scan_signature(disk)? {
        return Err(VolumeError::Foreign(what));
    }
    initialize(disk, layout, volume_id, node_name)
}

/// `tandem init`: writes fresh metadata. Refuses a device that is already a tandem volume or
/// carries a foreign signature unless `force`.
pub fn init(
    disk: &LinuxDisk,
    volume_id: [u8; 16],
    node_name: &str,
    force: bool,
) -> Result<OpenVolume, VolumeError> {
    let disk = &mut &*disk;
    let layout = Layout::for_backing(disk.size_bytes()).map_err(VolumeError::Layout)?;
    if !force {
        if metadata::choose_superblock(read_superblocks(disk, &layout)).is_some() {
            return Err(VolumeError::AlreadyInitialized);
        }
        if let Some(what) = scan_signature(disk)? {
            return Err(VolumeError::Foreign(what));
        }
    }
    initialize(disk, layout, volume_id, node_name)
}

fn initialize(
    disk: &mut impl Device,
    layout: Layout,
    volume_id: [u8; 16],
    node_name: &str,
) -> Result<OpenVolume, VolumeError> {
    let mut superblock = Superblock::new(&layout, volume_id);
    superblock.node_name.clear();
    // A name longer than the field was refused by the config check; truncation cannot happen.
    let _ = superblock.node_name.push_str(node_name);
    superblock.flags |= flags::CLEAN_SHUTDOWN;
    write_superblock_to(disk, &layout, &superblock).map_err(VolumeError::Io)?;
    Ok(OpenVolume {
        layout,
        superblock,
        initialized: true,
    })
}

/// Reads the dirty bitmap and the activity log of a volume with a peer, at start. After a crash
/// of a primary (it was primary and did not stop cleanly), the activity log's extents are marked
/// in the bitmap and that is made durable before anything else is written (see
/// `replication::activity_log`, "Recovery"). A bitmap or log that cannot be read whole makes
/// every region dirty: a full resync, never a silent difference.
pub fn load_replication(
    disk: &LinuxDisk,
    layout: &Layout,
    superblock: &Superblock,
) -> std::io::Result<crate::replication::engine::LoadedState> {
    load_replication_from(&mut &*disk, layout, superblock)
}

/// [`load_replication`] on any [`Device`].
pub fn load_replication_from(
    disk: &mut impl Device,
    layout: &Layout,
    superblock: &Superblock,
) -> std::io::Result<crate::replication::engine::LoadedState> {
    use crate::replication::activity_log::{self, ActivityLog, AlRecoverError, AL_RECORD_BYTES};
    use crate::replication::dirty_map::{DirtyMap, BITMAP_BLOCK_BYTES};

    let mut map = DirtyMap::for_layout(layout);
    let mut block = vec![0u8; BITMAP_BLOCK_BYTES];
    let mut bitmap_whole = true;
    for index in 0..map.block_count() {
        let offset = layout.bitmap_offset + index * BITMAP_BLOCK_BYTES as u64;
        disk.read_at(offset, &mut block)?;
        if map.load_block(index, &block).is_err() {
            bitmap_whole = false;
            break;
        }
    }
    if !bitmap_whole {
        log::error!("volume: the dirty bitmap is damaged; every region will be resynced");
        map.mark_all();
    }
    let mut records = vec![[0u8; AL_RECORD_BYTES]; metadata::ACTIVITY_LOG_SLOTS as usize];
    for (i, record) in records.iter_mut().enumerate() {
        disk.read_at(
            layout.activity_log_offset + i as u64 * AL_RECORD_BYTES as u64,
            record,
        )?;
    }
    let crashed =
        superblock.has_flag(flags::WAS_PRIMARY) && !superblock.has_flag(flags::CLEAN_SHUTDOWN);
    let mut crashed_extents = Vec::new();
    let next = match activity_log::recover(&records) {
        Ok(recovered) => {
            if crashed {
                for (offset, len) in recovered.byte_ranges(layout.volume_bytes) {
                    map.mark(offset, len);
                }
                crashed_extents = recovered.extents().to_vec();
            }
            recovered.next_transaction_number()
        }
        Err(AlRecoverError::Incomplete {
            next_transaction_number,
            ..
        }) => {
            if crashed {
                log::error!("volume: the activity log is damaged after a crash; every region will be resynced");
                map.mark_all();
            }
            next_transaction_number
        }
        Err(AlRecoverError::RingSize { .. }) => 1,
    };
    if crashed {
        log::warn!(
            "volume: this node was primary and did not stop cleanly; the regions it was writing join the next resync (extents={})",
            crashed_extents.len()
        );
    }
    let blocks: Vec<_> = map.take_changed_blocks().collect();
    for block in blocks {
        disk.write_at(layout.bitmap_offset + block.offset_in_bitmap, &block.bytes)?;
    }
    Ok(crate::replication::engine::LoadedState {
        layout: *layout,
        superblock: superblock.clone(),
        map,
        al: ActivityLog::new(next.max(1)),
        crashed_extents,
    })
}
