//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Three levels:
//!
//! - [`sum`] adds bytes as big-endian 16-bit words into an unfolded `u64` accumulator.
//!   Partial sums of pieces that start at even offsets may be added together with `+`.
//! - [`fold`] reduces an accumulator to 16 bits with end-around carry, [`finish`] also
//!   complements it, giving the value that goes into a checksum field.
//! - [`update16`], [`update32`] and [`update_addr_v6`] patch an existing checksum field
//!   after a field it covers changed (NAT), without touching the rest of the data.
//!
//! A received packet verifies when the folded sum over everything the checksum covers,
//! the checksum field included, is `0xFFFF` ([`verifies`]).
//!
//! UDP gives the value 0 the meaning "no checksum" (IPv4 only): [`udp_finish`] maps a
//! computed 0 to `0xFFFF`, and [`udp_adjust`] leaves an absent checksum absent.

use core::net::{Ipv4Addr, Ipv6Addr};

/// Adds `data` as big-endian 16-bit words to an accumulator.
///
/// An odd trailing byte is padded with a zero byte on its right, as RFC 1071 says. The
/// result may be added to other partial sums as long as each piece started at an even
/// offset of the checksummed data. It is already folded to 16 bits (0 only for data
/// that sums to 0), so any number of them can be added without overflow; [`fold`] and
/// [`verifies`] give the same answer as for the unfolded sum.
#[inline]
#[must_use]
pub fn sum(data: &[u8]) -> u64 {
    sum_words(data)
}

/// [`sum`] of a fixed-size array, always inlined: the loop is unrolled for the size
/// (an IPv4 header without options on the packet path).
#[inline(always)]
#[must_use]
pub fn sum_array<const N: usize>(data: &[u8; N]) -> u64 {
    sum_words(data)
}

#[inline(always)]
fn sum_words(data: &[u8]) -> u64 {
    // The folded result swapped once (see `sum_le`).
    let le = fold(sum_le(data));
    u64::from(le.swap_bytes())
}

/// The sum of `data` as little-endian 16-bit words, unfolded but for an end-around
/// carry into 64 bits: congruent modulo 2^16 - 1 to the little-endian word sum (2^64
/// is 1 modulo 2^16 - 1), and 0 only for data that is all zeros.
#[inline(always)]
fn sum_le(data: &[u8]) -> u64 {
    // RFC 1071 §2(B): the one's complement sum is byte-order independent, so the data
    // is added as native little-endian 64-bit words (four 16-bit words each, no byte
    // swap per word) into a 128-bit accumulator (an add and an add-with-carry per
    // word).
    let mut acc: u128 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        acc += u128::from(u64::from_le_bytes(w));
    }
    // The tail (0-7 bytes) padded with zeros on its right, as one more word (built
    // from fixed-size reads: a variable-length copy would call `memcpy`). With 8 bytes
    // or more, the last 8 bytes read as one word and shifted right past the bytes that
    // are not the tail's (two shifts: all 8 bytes go for an empty tail, where one
    // shift by 64 would overflow); a shorter slice byte by byte.
    let tail = chunks.remainder();
    acc += u128::from(match data.last_chunk::<8>() {
        Some(last) => {
            let skip = 8 * (7 - tail.len());
            (u64::from_le_bytes(*last) >> skip) >> 8
        }
        None => tail_word(tail),
    });
    // 2^64 = 1 (mod 2^16 - 1): the high half is added back in, end-around.
    let [
        l0,
        l1,
        l2,
        l3,
        l4,
        l5,
        l6,
        l7,
        h0,
        h1,
        h2,
        h3,
        h4,
        h5,
        h6,
        h7,
    ] = acc.to_le_bytes();
    let lo = u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]);
    let hi = u64::from_le_bytes([h0, h1, h2, h3, h4, h5, h6, h7]);
    let (folded, carry) = lo.overflowing_add(hi);
    // No overflow: with a carry, `folded` is at most 2^64 - 2.
    folded + u64::from(carry)
}

/// The little-endian word of `tail` (at most 7 bytes) padded with zeros on its right.
#[inline]
fn tail_word(tail: &[u8]) -> u64 {
    let mut word = 0u64;
    let mut shift = 0;
    let mut rest = tail;
    if let [a, b, c, d, more @ ..] = rest {
        word = u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
        shift = 32;
        rest = more;
    }
    if let [a, b, more @ ..] = rest {
        word |= u64::from(u16::from_le_bytes([*a, *b])) << shift;
        shift += 16;
        rest = more;
    }
    if let [a, ..] = rest {
        word |= u64::from(*a) << shift;
    }
    word
}

/// Folds an accumulator to 16 bits with end-around carry (not complemented).
///
/// A non-zero accumulator never folds to 0 (it gives `0xFFFF` instead); 0 folds to 0.
#[inline]
#[must_use]
pub fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xFFFF_FFFF) + (acc >> 32);
    acc = (acc & 0xFFFF_FFFF) + (acc >> 32);
    acc = (acc & 0xFFFF) + (acc >> 16);
    acc = (acc & 0xFFFF) + (acc >> 16);
    // After two 32-bit and two 16-bit end-around folds the value fits 16 bits.
    u16::try_from(acc).unwrap_or(u16::MAX)
}

/// The checksum field value for data whose (pseudo-header included) sum is `acc`.
#[inline]
#[must_use]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// The Internet checksum of `data`: the value to store in a zeroed checksum field.
#[inline]
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data))
}

/// Whether data whose sum (checksum field and pseudo-header included) is `acc` verifies.
#[inline]
#[must_use]
pub fn verifies(acc: u64) -> bool {
    fold(acc) == 0xFFFF
}

/// [`verifies`]`(`[`sum`]`(data) + extra)`, for a packet on the receive path: `data` is
/// what the checksum covers (its field included) and `extra` the sum of the rest (a
/// pseudo-header, as big-endian 16-bit words), in one reduction instead of folding
/// each sum to 16 bits.
///
/// The folded sum is `0xFFFF` when the sum is a non-zero multiple of 2^16 - 1; the
/// little-endian word sum `S'` of the data and its big-endian sum `S` are related by
/// `256 * S' = S` modulo 2^16 - 1 (swapping a word's bytes multiplies it by 256), and
/// 256 is invertible modulo 2^16 - 1.
#[inline(always)]
#[must_use]
pub fn data_verifies(data: &[u8], extra: u64) -> bool {
    // 2^32 is 1 modulo 2^16 - 1: one 32-bit fold each keeps the total under 2^42.
    let fold32 = |v: u64| (v & 0xFFFF_FFFF) + (v >> 32);
    let total = (fold32(sum_le(data)) << 8) + fold32(extra);
    total != 0 && total % 0xFFFF == 0
}

/// The sum of the IPv4 pseudo-header (RFC 793/768) for an upper-layer `length`.
#[inline]
#[must_use]
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u64 {
    u64::from(src.to_bits()) + u64::from(dst.to_bits()) + u64::from(protocol) + u64::from(length)
}

/// The sum of the IPv6 pseudo-header (RFC 8200 §8.1) for an upper-layer `length`.
#[inline]
#[must_use]
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, length: u32) -> u64 {
    sum(&src.octets()) + sum(&dst.octets()) + u64::from(length) + u64::from(next_header)
}

/// The checksum of an IPv4 upper-layer `segment` (its checksum field zeroed, or the
/// result is the verification sum instead).
///
/// `segment.len()` must fit the pseudo-header's 16-bit length; a longer one is summed
/// with the length saturated, which a caller never asks for with a valid IPv4 packet.
#[inline]
#[must_use]
pub fn l4_checksum_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let len = u16::try_from(segment.len()).unwrap_or(u16::MAX);
    finish(pseudo_header_v4(src, dst, protocol, len) + sum(segment))
}

/// The checksum of an IPv6 upper-layer `segment` (checksum field zeroed).
#[inline]
#[must_use]
pub fn l4_checksum_v6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, segment: &[u8]) -> u16 {
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    finish(pseudo_header_v6(src, dst, next_header, len) + sum(segment))
}

/// RFC 1624 eqn. 3: the checksum field after a 16-bit word it covers changed from `old`
/// to `new`: `HC' = ~(~HC + ~m + m')`.
///
/// `old` and `new` must sit at an even offset of the covered data (every header field
/// that NAT rewrites does); for a byte at an odd offset pass it as the low byte of its
/// 16-bit word.
#[inline]
#[must_use]
pub fn update16(old_csum: u16, old: u16, new: u16) -> u16 {
    finish(u64::from(!old_csum) + u64::from(!old) + u64::from(new))
}

/// [`update16`] for a 32-bit field (an IPv4 address: use `Ipv4Addr::to_bits`).
#[inline]
#[must_use]
pub fn update32(old_csum: u16, old: u32, new: u32) -> u16 {
    let (old_hi, old_lo) = split32(old);
    let (new_hi, new_lo) = split32(new);
    finish(
        u64::from(!old_csum)
            + u64::from(!old_hi)
            + u64::from(!old_lo)
            + u64::from(new_hi)
            + u64::from(new_lo),
    )
}

/// [`update16`] for a 128-bit field (an IPv6 address).
#[inline]
#[must_use]
pub fn update_addr_v6(old_csum: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut acc = u64::from(!old_csum);
    let mut i = 0;
    while i < 16 {
        acc += u64::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u64::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    finish(acc)
}

/// The UDP checksum field for a computed checksum: 0 is sent as `0xFFFF`, because 0
/// means "no checksum" (RFC 768).
#[inline]
#[must_use]
pub fn udp_finish(computed: u16) -> u16 {
    if computed == 0 { 0xFFFF } else { computed }
}

/// Applies an incremental update to a UDP checksum field: an absent checksum (0) stays
/// absent, and an updated value of 0 becomes `0xFFFF`.
///
/// ```
/// use ctoffload_fallback_sw::checksum::{udp_adjust, update16};
/// assert_eq!(udp_adjust(0, |c| update16(c, 1, 2)), 0);
/// ```
#[inline]
#[must_use]
pub fn udp_adjust(old_csum: u16, update: impl FnOnce(u16) -> u16) -> u16 {
    if old_csum == 0 {
        0
    } else {
        udp_finish(update(old_csum))
    }
}

#[inline]
fn split32(v: u32) -> (u16, u16) {
    let b = v.to_be_bytes();
    (
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 done the slow, obvious way: 16-bit words, end-around carry every step.
    fn naive(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = data.get(i + 1).copied().map_or(0, u32::from);
            s += hi | lo;
            s = (s & 0xFFFF) + (s >> 16);
            i += 2;
        }
        !u16::try_from(s).expect("folded")
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2 (before complement).
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&d)), 0xddf2);
        assert_eq!(checksum(&d), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // Wikipedia's example header, checksum b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(verifies(sum(&h)));
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn odd_lengths() {
        assert_eq!(checksum(&[]), 0xFFFF);
        assert_eq!(checksum(&[0x12]), !0x1200);
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234 + 0x5600));
    }

    /// Every tail length (0-7 bytes) after 0-11 whole words, with no zero byte: the
    /// last-8-bytes read must keep exactly the tail's bytes, and a slice cut out of a
    /// longer buffer must not pick up the bytes after its end.
    #[test]
    fn every_tail_length_after_whole_words() {
        let buf: Vec<u8> = (0u8..104).map(|i| i.wrapping_mul(37) | 0x81).collect();
        for len in 0..=95 {
            for start in 0..8 {
                let data = &buf[start..start + len];
                assert_eq!(checksum(data), naive(data), "len {len} start {start}");
            }
        }
    }

    #[test]
    fn udp_rules() {
        assert_eq!(udp_finish(0), 0xFFFF);
        assert_eq!(udp_finish(7), 7);
        assert_eq!(udp_adjust(0, |c| update16(c, 1, 2)), 0);
        // An update that yields 0 is sent as 0xFFFF.
        assert_eq!(udp_adjust(5, |_| 0), 0xFFFF);
    }

    /// Writes `csum` at `at` and says whether the data verifies.
    fn verifies_with(data: &mut [u8], at: usize, csum: u16) -> bool {
        data[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        verifies(sum(data))
    }

    /// Fill in a correct checksum at `at`; return it.
    fn fill(data: &mut [u8], at: usize) -> u16 {
        data[at..at + 2].copy_from_slice(&[0, 0]);
        let c = checksum(data);
        data[at..at + 2].copy_from_slice(&c.to_be_bytes());
        c
    }

    /// Full recomputation and incremental update agree: both verify, and they are equal
    /// except for the ±0 ambiguity (0x0000 vs 0xFFFF) of one's complement.
    fn same_csum(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xFFFF) || (a == 0xFFFF && b == 0)
    }

    #[test]
    fn all_zero_data_never_verifies() {
        assert!(!data_verifies(&[0; 20], 0));
        assert!(!verifies(sum(&[0; 20])));
        // 0xFFFF and its sum's other representation, 0: both verify.
        assert!(data_verifies(&[0xFF, 0xFF], 0));
        assert!(data_verifies(&[0, 0], 0xFFFF));
        // Without `extra`: sums that are non-zero multiples of 0xFFFF in either byte
        // order, and near misses.
        for (data, want) in [
            (&[0xFF; 20][..], true),
            (&[0xFF; 64][..], true),
            (&[0x01, 0x00, 0xFE, 0xFF][..], true),
            (&[0x00, 0x01, 0xFF, 0xFE][..], true),
            (&[0xFF, 0xFE][..], false),
            (&[0x00, 0x01][..], false),
        ] {
            assert_eq!(data_verifies(data, 0), want, "{data:?}");
            assert_eq!(verifies(sum(data)), want, "{data:?}");
        }
    }

    proptest! {
        #[test]
        fn data_verifies_is_verifies_of_the_sum(
            data in proptest::collection::vec(any::<u8>(), 0..100),
            extra in prop_oneof![Just(0u64), 0u64..0x4_0000, 0u64..(1 << 62)],
            fix in any::<bool>(),
        ) {
            let mut data = data;
            // Half the cases with a right checksum in the first word, so that both
            // answers occur.
            if fix && data.len() >= 2 {
                data[..2].copy_from_slice(&[0, 0]);
                let c = finish(sum(&data) + extra);
                data[..2].copy_from_slice(&c.to_be_bytes());
            }
            prop_assert_eq!(data_verifies(&data, extra), verifies(sum(&data) + extra));
        }

        #[test]
        fn fast_sum_matches_naive(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(checksum(&data), naive(&data));
        }

        #[test]
        fn pieces_add(data in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..150) {
            let cut = (cut * 2).min(data.len() & !1);
            prop_assert_eq!(fold(sum(&data[..cut]) + sum(&data[cut..])), fold(sum(&data)));
        }

        #[test]
        fn update16_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 4..200),
            csum_word in 0usize..100, word in 0usize..100, new in any::<u16>(),
        ) {
            let words = data.len() / 2;
            let (cw, w) = (csum_word % words, word % words);
            prop_assume!(cw != w);
            let old_csum = fill(&mut data, cw * 2);
            let old = u16::from_be_bytes([data[w * 2], data[w * 2 + 1]]);
            data[w * 2..w * 2 + 2].copy_from_slice(&new.to_be_bytes());
            let inc = update16(old_csum, old, new);
            let full = fill(&mut data, cw * 2);
            prop_assert!(same_csum(inc, full), "inc {inc:#x} full {full:#x}");
            prop_assert!(verifies_with(&mut data, cw * 2, inc));
        }

        #[test]
        fn update32_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 8..200), new in any::<u32>(),
        ) {
            // Checksum at 0..2, the rewritten 32-bit field at 4..8 (like an address).
            let old_csum = fill(&mut data, 0);
            let old = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
            data[4..8].copy_from_slice(&new.to_be_bytes());
            let inc = update32(old_csum, old, new);
            let full = fill(&mut data, 0);
            prop_assert!(same_csum(inc, full));
            prop_assert!(verifies_with(&mut data, 0, inc));
        }

        #[test]
        fn update_v6_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 40..200), new in any::<[u8; 16]>(),
        ) {
            let old_csum = fill(&mut data, 2);
            let mut old = [0u8; 16];
            old.copy_from_slice(&data[8..24]);
            data[8..24].copy_from_slice(&new);
            let inc = update_addr_v6(old_csum, &old, &new);
            let full = fill(&mut data, 2);
            prop_assert!(same_csum(inc, full));
            prop_assert!(verifies_with(&mut data, 2, inc));
        }

        #[test]
        fn udp_nat_keeps_rules(
            src in any::<u32>(), dst in any::<u32>(), new_src in any::<u32>(),
            sport in any::<u16>(), new_sport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            // A UDP datagram with its checksum; SNAT rewrites source address and port.
            let build = |s: u32, p: u16| {
                let mut seg = vec![0u8; 8 + payload.len()];
                seg[0..2].copy_from_slice(&p.to_be_bytes());
                seg[2..4].copy_from_slice(&53u16.to_be_bytes());
                let len = u16::try_from(seg.len()).expect("small");
                seg[4..6].copy_from_slice(&len.to_be_bytes());
                seg[8..].copy_from_slice(&payload);
                let c = udp_finish(l4_checksum_v4(
                    Ipv4Addr::from_bits(s), Ipv4Addr::from_bits(dst), 17, &seg));
                (seg, c)
            };
            let (_, c0) = build(src, sport);
            let (seg1, c1) = build(new_src, new_sport);
            let inc = udp_adjust(c0, |c| update16(update32(c, src, new_src), sport, new_sport));
            prop_assert_ne!(inc, 0);
            prop_assert!(same_csum(inc, c1));
            let len = u16::try_from(seg1.len()).expect("small");
            let mut seg1 = seg1;
            seg1[6..8].copy_from_slice(&inc.to_be_bytes());
            prop_assert!(verifies(
                pseudo_header_v4(Ipv4Addr::from_bits(new_src), Ipv4Addr::from_bits(dst), 17, len)
                    + sum(&seg1)));
        }
    }
}
