//! The board layer of tandem: what the firmware's runtime needs from the machine it runs on.
//!
//! The sans-IO core in the `tandem` crate never touches a syscall. It describes disk work as
//! [`DiskRequest`]s and learns of their results as [`DiskCompletion`]s; this crate carries them
//! out on Linux. Buffers travel by value ([`IoBuf`]), so a buffer handed to the kernel stays
//! alive and unmoved until its completion returns it.
//!
//! Traits for the board arrive with the simulator (a second implementation); until then the
//! Linux types are used directly.

pub mod buf;
pub mod disk;
pub mod nbd_kernel;
pub mod net;
pub mod serial;
pub mod signals;
pub mod watchdog;

pub use buf::IoBuf;
pub use disk::{
    DiskCompletion, DiskDone, DiskError, DiskOpenError, DiskRequest, Extent, LinuxDisk,
    EXTENT_COUNT_MAX,
};
pub use net::{
    add_address, has_address, interface_for_address, interface_index, interface_mac,
    remove_address, ArpPacket, ArpSocket, LinkWatch,
};
pub use serial::{SerialError, SerialPort};
pub use signals::TerminationSignals;
pub use watchdog::Watchdog;
