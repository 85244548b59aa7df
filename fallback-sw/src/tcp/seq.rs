//! TCP sequence-number arithmetic modulo 2^32, as Linux `before()`/`after()`.
//!
//! `before(a, b)` is `(s32)(a - b) < 0`. No function here panics on any input. Note the
//! Linux quirk kept on purpose: when `a - b == 0x8000_0000`, both `before(a, b)` and
//! `before(b, a)` are true.

/// The signed distance `a - b` interpreted as an `s32`, exactly as Linux's `(__s32)(a - b)`.
#[inline]
#[must_use]
pub fn diff(a: u32, b: u32) -> i32 {
    i32::from_ne_bytes(a.wrapping_sub(b).to_ne_bytes())
}

/// `a` comes strictly before `b` (`(s32)(a - b) < 0`).
#[inline]
#[must_use]
pub fn before(a: u32, b: u32) -> bool {
    diff(a, b) < 0
}

/// `a` comes strictly after `b` (Linux `after(a, b)` = `before(b, a)`).
#[inline]
#[must_use]
pub fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// `a ≤ b` in sequence space, written as Linux does it: `before(a, b + 1)`.
#[inline]
#[must_use]
pub fn before_eq(a: u32, b: u32) -> bool {
    before(a, b.wrapping_add(1))
}

/// `a ≥ b` in sequence space, written as Linux does it: `after(a, b - 1)`.
#[inline]
#[must_use]
pub fn after_eq(a: u32, b: u32) -> bool {
    after(a, b.wrapping_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_order() {
        assert!(before(1, 2));
        assert!(!before(2, 1));
        assert!(!before(5, 5));
        assert!(after(2, 1));
        assert!(before_eq(5, 5));
        assert!(after_eq(5, 5));
    }

    #[test]
    fn wraparound() {
        assert!(before(0xFFFF_FFF0, 0x10));
        assert!(after(0x10, 0xFFFF_FFF0));
        assert!(before_eq(u32::MAX, 0));
        assert!(after_eq(0, u32::MAX));
        assert_eq!(diff(0, u32::MAX), 1);
        assert_eq!(diff(u32::MAX, 0), -1);
    }

    #[test]
    fn half_range_quirk() {
        // (s32)0x8000_0000 is negative both ways round, like Linux.
        assert!(before(0x8000_0000, 0));
        assert!(before(0, 0x8000_0000));
        assert_eq!(diff(0x8000_0000, 0), i32::MIN);
    }

    proptest! {
        #[test]
        fn never_panics_and_antisymmetric(a: u32, b: u32) {
            let d = diff(a, b);
            if a.wrapping_sub(b) != 0x8000_0000 {
                prop_assert_eq!(before(a, b), after(b, a));
                prop_assert!(!(before(a, b) && before(b, a)));
                prop_assert_eq!(d == 0, a == b);
            }
            if a.wrapping_sub(b.wrapping_add(1)) != 0x8000_0000 {
                prop_assert_eq!(before_eq(a, b), before(a, b) || a == b);
            }
        }

        #[test]
        fn offsets(a: u32, k in 1u32..0x7FFF_FFFF) {
            prop_assert!(before(a, a.wrapping_add(k)));
            prop_assert!(after(a.wrapping_add(k), a));
        }
    }
}
