//! Time as the core sees it: milliseconds on a monotonic clock that the runtime reads and passes
//! in. The core never reads a clock itself.

/// A point on the monotonic clock, in milliseconds since an arbitrary origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Instant {
    ms: u64,
}

impl Instant {
    /// The instant `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Instant {
        Instant { ms }
    }

    /// Milliseconds since the origin.
    pub const fn as_millis(self) -> u64 {
        self.ms
    }

    /// The instant `ms` milliseconds later (saturating: the clock never wraps in practice).
    pub const fn plus_millis(self, ms: u64) -> Instant {
        Instant {
            ms: self.ms.saturating_add(ms),
        }
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn millis_since(self, earlier: Instant) -> u64 {
        self.ms.saturating_sub(earlier.ms)
    }
}
