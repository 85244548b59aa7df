//! Little-endian integer fields of in-memory device structures.
//!
//! Each type stores its value in little-endian byte order whatever the host's byte
//! order, so a `#[repr(C)]` struct built from them has the exact memory image the device
//! reads and writes. They have no arithmetic: convert with [`Le32::get`] and back with
//! [`Le32::new`].

use core::fmt;

macro_rules! le_type {
    ($(#[$doc:meta])* $name:ident, $int:ty, $bytes:literal) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name($int);

        impl $name {
            /// Zero.
            pub const ZERO: Self = Self(0);

            /// Stores a native value in little-endian order.
            #[must_use]
            pub const fn new(value: $int) -> Self {
                Self(value.to_le())
            }

            /// The native value.
            #[must_use]
            pub const fn get(self) -> $int {
                <$int>::from_le(self.0)
            }

            /// Builds the field from its memory image.
            #[must_use]
            pub const fn from_le_bytes(bytes: [u8; $bytes]) -> Self {
                Self::new(<$int>::from_le_bytes(bytes))
            }

            /// The field's memory image.
            #[must_use]
            pub const fn to_le_bytes(self) -> [u8; $bytes] {
                self.get().to_le_bytes()
            }
        }

        impl From<$int> for $name {
            fn from(value: $int) -> Self {
                Self::new(value)
            }
        }

        impl From<$name> for $int {
            fn from(value: $name) -> Self {
                value.get()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.get())
            }
        }
    };
}

le_type!(
    /// A `u16` stored little-endian.
    Le16, u16, 2
);
le_type!(
    /// A `u32` stored little-endian.
    Le32, u32, 4
);
le_type!(
    /// A `u64` stored little-endian.
    Le64, u64, 8
);

/// Copies `M` bytes starting at `at` out of `buf`. Offsets are compile-time layout
/// constants, so an out-of-range access is a bug that the layout tests catch.
pub(crate) fn take<const M: usize>(buf: &[u8], at: usize) -> [u8; M] {
    let mut out = [0u8; M];
    out.copy_from_slice(&buf[at..at + M]);
    out
}

/// Copies `src` into `buf` at `at`.
pub(crate) fn put(buf: &mut [u8], at: usize, src: &[u8]) {
    buf[at..at + src.len()].copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_image_is_little_endian() {
        assert_eq!(Le16::new(0x1234).to_le_bytes(), [0x34, 0x12]);
        assert_eq!(
            Le32::new(0x1234_5678).to_le_bytes(),
            [0x78, 0x56, 0x34, 0x12]
        );
        assert_eq!(
            Le64::new(0x0102_0304_0506_0708).to_le_bytes(),
            [8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(
            Le32::from_le_bytes([0x78, 0x56, 0x34, 0x12]).get(),
            0x1234_5678
        );
        assert_eq!(u16::from(Le16::from(0xBEEF)), 0xBEEF);
    }
}
