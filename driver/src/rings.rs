//! Ring index arithmetic (device.md section 5): slot numbers in `[0, N)`, `N` a power
//! of two, one slot always kept empty.

/// Geometry of one ring of `2^log2` entries of `entry_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeom {
    log2: u8,
    entry_size: usize,
}

impl RingGeom {
    /// A ring of `2^log2` entries (`2 ≤ log2 ≤ 24`).
    pub fn new(log2: u8, entry_size: usize) -> Option<Self> {
        (2..=24)
            .contains(&log2)
            .then_some(Self { log2, entry_size })
    }

    /// `SIZE_LOG2`.
    pub fn log2(self) -> u8 {
        self.log2
    }

    /// `N`, the entry count.
    pub fn entries(self) -> u32 {
        1u32 << self.log2
    }

    /// At most `N − 1` entries may be outstanding.
    pub fn capacity(self) -> u32 {
        self.entries() - 1
    }

    /// Ring size in bytes.
    pub fn bytes(self) -> usize {
        self.entry_size << self.log2
    }

    /// Byte offset of slot `i` (taken modulo `N`).
    pub fn offset(self, i: u32) -> usize {
        usize::try_from(i & (self.entries() - 1)).unwrap_or(0) * self.entry_size
    }

    /// The slot after `i`.
    pub fn next(self, i: u32) -> u32 {
        i.wrapping_add(1) & (self.entries() - 1)
    }

    /// `i + n` modulo `N`.
    pub fn add(self, i: u32, n: u32) -> u32 {
        i.wrapping_add(n) & (self.entries() - 1)
    }

    /// Entries between consumer `c` and producer `p`.
    pub fn used(self, p: u32, c: u32) -> u32 {
        p.wrapping_sub(c) & (self.entries() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let g = RingGeom::new(2, 128).expect("geom");
        assert_eq!(g.entries(), 4);
        assert_eq!(g.capacity(), 3);
        assert_eq!(g.bytes(), 512);
        assert_eq!(g.offset(5), 128);
        assert_eq!(g.next(3), 0);
        assert_eq!(g.add(3, 2), 1);
        assert_eq!(g.used(1, 3), 2);
        assert_eq!(g.used(3, 3), 0);
        assert!(RingGeom::new(1, 32).is_none());
        assert!(RingGeom::new(25, 32).is_none());
    }
}
