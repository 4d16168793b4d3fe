//! The pool of I/O buffers and the budget of bytes in flight.
//!
//! Every request that carries data (a read's answer, a write's payload) holds one [`IoBuf`] from
//! the moment it is admitted until its reply has been sent. Buffers come in power-of-two size
//! classes and are reused, so the data path allocates nothing in steady state. The budget bounds
//! the memory in flight: a request that does not fit waits (its client's socket is not read)
//! until earlier ones finish. One request of any admissible size always fits when nothing else is
//! in flight, so the largest payload can never wedge a connection.

use crate::constants::{
    BUFFER_CACHE_BYTES_MAX, IN_FLIGHT_BYTES_MAX, NBD_PAYLOAD_BYTES_MAX, SMALL_REQUEST_BYTES_MAX,
    SMALL_REQUEST_RESERVE_BYTES,
};
use tandem_board::IoBuf;

/// Smallest size class (and the granularity of O_DIRECT transfers).
const CLASS_MIN_BYTES: usize = 4096;
/// Size classes from 4 KiB to the largest payload.
const CLASS_COUNT: usize =
    (NBD_PAYLOAD_BYTES_MAX as usize / CLASS_MIN_BYTES).trailing_zeros() as usize + 1;

/// Buffers for requests, reused by size class, with a budget on the bytes they hold.
#[derive(Debug)]
pub struct BufferPool {
    free: [Vec<IoBuf>; CLASS_COUNT],
    cached_bytes: usize,
    in_flight_bytes: usize,
}

impl Default for BufferPool {
    fn default() -> Self {
        BufferPool::new()
    }
}

impl BufferPool {
    /// An empty pool.
    pub fn new() -> BufferPool {
        BufferPool {
            free: Default::default(),
            cached_bytes: 0,
            in_flight_bytes: 0,
        }
    }

    fn class_of(len: usize) -> usize {
        let rounded = len.max(CLASS_MIN_BYTES).next_power_of_two();
        (rounded / CLASS_MIN_BYTES).trailing_zeros() as usize
    }

    /// True if a buffer of `len` bytes may be taken now. Small requests have a reserve on top
    /// of the budget that large ones never use, so a client sitting on large replies it does
    /// not read cannot stall everybody's small I/O.
    pub fn can_take(&self, len: usize) -> bool {
        let class_bytes = CLASS_MIN_BYTES << Self::class_of(len);
        let limit = if len <= SMALL_REQUEST_BYTES_MAX {
            IN_FLIGHT_BYTES_MAX + SMALL_REQUEST_RESERVE_BYTES
        } else {
            IN_FLIGHT_BYTES_MAX
        };
        self.in_flight_bytes == 0 || self.in_flight_bytes + class_bytes <= limit
    }

    /// Takes a buffer of length `len`, counting it against the budget.
    ///
    /// # Panics
    /// If `len` exceeds the largest payload or the budget forbids it (check [`Self::can_take`]).
    pub fn take(&mut self, len: usize) -> IoBuf {
        assert!(self.can_take(len), "buffer taken past the in-flight budget");
        self.take_exempt(len)
    }

    /// Takes a small buffer whatever the budget says (handshake replies: a few hundred bytes
    /// that must not wait behind data). It is still counted, and given back like any other.
    ///
    /// # Panics
    /// If `len` exceeds the largest payload.
    pub fn take_exempt(&mut self, len: usize) -> IoBuf {
        assert!(
            len <= NBD_PAYLOAD_BYTES_MAX as usize,
            "buffer of {len} bytes over the limit"
        );
        let class = Self::class_of(len);
        let class_bytes = CLASS_MIN_BYTES << class;
        self.in_flight_bytes += class_bytes;
        let mut buf = match self.free[class].pop() {
            Some(buf) => {
                self.cached_bytes -= class_bytes;
                buf
            }
            None => IoBuf::new(class_bytes),
        };
        buf.set_len(len);
        buf
    }

    /// Returns a buffer taken from this pool.
    pub fn give_back(&mut self, mut buf: IoBuf) {
        let class = Self::class_of(buf.capacity());
        let class_bytes = CLASS_MIN_BYTES << class;
        assert_eq!(
            buf.capacity(),
            class_bytes,
            "a buffer that did not come from the pool"
        );
        assert!(self.in_flight_bytes >= class_bytes, "buffer returned twice");
        self.in_flight_bytes -= class_bytes;
        if self.cached_bytes + class_bytes <= BUFFER_CACHE_BYTES_MAX {
            buf.set_len(class_bytes);
            self.cached_bytes += class_bytes;
            self.free[class].push(buf);
        }
    }

    /// Bytes held by requests in flight.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class() {
        let mut pool = BufferPool::new();
        let buf = pool.take(3000);
        assert_eq!(buf.len(), 3000);
        assert_eq!(buf.capacity(), 4096);
        let address = buf.as_ptr();
        pool.give_back(buf);
        assert_eq!(pool.in_flight_bytes(), 0);
        let again = pool.take(4096);
        assert_eq!(again.as_ptr(), address);
    }

    #[test]
    fn budget_admits_one_large_request_when_idle() {
        let mut pool = BufferPool::new();
        assert!(pool.can_take(NBD_PAYLOAD_BYTES_MAX as usize));
        let big = pool.take(NBD_PAYLOAD_BYTES_MAX as usize);
        assert!(!pool.can_take(IN_FLIGHT_BYTES_MAX));
        // The small-request reserve is still open while a large request holds the budget.
        assert!(pool.can_take(4096));
        assert!(!pool.can_take(SMALL_REQUEST_BYTES_MAX + 1));
        pool.give_back(big);
        let mut held = Vec::new();
        while pool.can_take(1 << 20) {
            held.push(pool.take(1 << 20));
        }
        assert_eq!(held.len(), IN_FLIGHT_BYTES_MAX / (1 << 20));
    }
}
