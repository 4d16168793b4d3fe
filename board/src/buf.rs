//! Owned I/O buffers whose bytes are aligned for O_DIRECT.
//!
//! The alignment is obtained without `unsafe`: the backing vector is over-allocated by the
//! alignment and the buffer starts at the first aligned byte inside it. The vector is never
//! grown, so the heap address stays put while the buffer moves between the core, the runtime
//! and the kernel.

/// Alignment of every buffer: the largest logical block size a backing device may demand.
pub const IO_ALIGN: usize = 4096;

/// A heap buffer of fixed capacity, aligned to [`IO_ALIGN`], with a length that may be set
/// anywhere up to the capacity.
pub struct IoBuf {
    bytes: Vec<u8>,
    start: usize,
    capacity: usize,
    len: usize,
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .finish()
    }
}

impl IoBuf {
    /// Allocates a zero-filled buffer of `capacity` bytes with length `capacity`.
    pub fn new(capacity: usize) -> IoBuf {
        let bytes = vec![0u8; capacity + IO_ALIGN];
        let start = bytes.as_ptr().align_offset(IO_ALIGN);
        assert!(
            start < IO_ALIGN,
            "align_offset on u8 pointers always succeeds"
        );
        IoBuf {
            bytes,
            start,
            capacity,
            len: capacity,
        }
    }

    /// The most bytes this buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the number of bytes in use.
    ///
    /// # Panics
    /// If `len` exceeds the capacity: a caller bug.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "IoBuf length {len} over capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    /// The bytes in use, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for capacity in [1, 512, 4096, 65536, 1 << 20] {
            let mut buf = IoBuf::new(capacity);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.len(), capacity);
            buf.set_len(capacity / 2);
            assert_eq!(buf.as_slice().len(), capacity / 2);
        }
    }

    #[test]
    #[should_panic(expected = "over capacity")]
    fn length_past_capacity_is_a_bug() {
        IoBuf::new(16).set_len(17);
    }
}
