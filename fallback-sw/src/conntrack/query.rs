//! Reading the table the way operators do (`conntrack -L` filters) and deleting.

use super::{Conntrack, L4State};
use crate::table::{Conn, RemoveReason, Slot, Status};
use crate::tcp::TcpState;
use crate::tuple::{Addr, Dir, Family, Tuple};

/// Why a connection cannot be deleted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeleteError {
    /// A fast path still carries it; take it off there first (invariant 2).
    #[error("connection is offloaded: remove it from the fast path first")]
    Offloaded,
}

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Address family.
    pub family: Family,
    /// Network address.
    pub addr: Addr,
    /// Prefix length in bits (at most 32 or 128).
    pub len: u8,
}

impl Prefix {
    /// Whether `addr` of `family` lies in the prefix.
    #[must_use]
    pub fn contains(&self, family: Family, addr: &Addr) -> bool {
        if family != self.family {
            return false;
        }
        // The first `len` bits of the addresses as 128-bit big-endian numbers (an IPv4
        // address is its first four bytes, the rest zero): one masked compare.
        let bits = u32::from(self.len).min(128);
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        (u128::from_be_bytes(self.addr.0) ^ u128::from_be_bytes(addr.0)) & mask == 0
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::*;

    /// The first `len` bits compared one by one.
    fn model(p: &Prefix, addr: &Addr) -> bool {
        (0..usize::from(p.len.min(128))).all(|i| {
            let bit = |a: &Addr| a.0[i / 8] >> (7 - i % 8) & 1;
            bit(&p.addr) == bit(addr)
        })
    }

    #[test]
    fn v4_prefixes() {
        let p = |len| Prefix {
            family: Family::V4,
            addr: Addr::v4([10, 1, 2, 3]),
            len,
        };
        assert!(p(8).contains(Family::V4, &Addr::v4([10, 200, 0, 1])));
        assert!(!p(8).contains(Family::V4, &Addr::v4([11, 1, 2, 3])));
        assert!(p(0).contains(Family::V4, &Addr::v4([192, 0, 2, 1])));
        assert!(p(32).contains(Family::V4, &Addr::v4([10, 1, 2, 3])));
        assert!(!p(32).contains(Family::V4, &Addr::v4([10, 1, 2, 2])));
        assert!(p(31).contains(Family::V4, &Addr::v4([10, 1, 2, 2])));
        assert!(!p(8).contains(Family::V6, &Addr::v4([10, 1, 2, 3])));
    }

    proptest::proptest! {
        /// Against the bit-by-bit model, lengths past the address included.
        #[test]
        fn contains_matches_the_bitwise_model(
            a in proptest::array::uniform16(proptest::num::u8::ANY),
            b in proptest::array::uniform16(proptest::num::u8::ANY),
            keep in 0usize..=16,
            len in 0u8..=255,
        ) {
            // `b` shares its first `keep` bytes with `a`, so that long prefixes match too.
            let mut b = b;
            b[..keep].copy_from_slice(&a[..keep]);
            let p = Prefix { family: Family::V6, addr: Addr(a), len };
            proptest::prop_assert_eq!(p.contains(Family::V6, &Addr(b)), model(&p, &Addr(b)));
            proptest::prop_assert!(p.contains(Family::V6, &Addr(a)));
        }
    }
}

/// Which connections to select; every field set must match (like `conntrack -L`
/// options: `-p`, `-s`/`-d` on the original tuple, `--sport`/`--dport`, `--state`,
/// `-w`, and whether the connection is offloaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Original source address prefix.
    pub src: Option<Prefix>,
    /// Original destination address prefix.
    pub dst: Option<Prefix>,
    /// Original source port.
    pub sport: Option<u16>,
    /// Original destination port.
    pub dport: Option<u16>,
    /// TCP state.
    pub tcp_state: Option<TcpState>,
    /// Zone.
    pub zone: Option<u16>,
    /// Offloaded (OFFLOAD set) or not.
    pub offloaded: Option<bool>,
}

impl Filter {
    /// Whether `conn` is selected.
    #[must_use]
    pub fn matches(&self, conn: &Conn<L4State>) -> bool {
        let o: &Tuple = conn.tuple(Dir::Original);
        let ports = !o.is_icmp();
        self.proto.is_none_or(|p| p == o.proto)
            && self.src.is_none_or(|p| p.contains(o.family, &o.src))
            && self.dst.is_none_or(|p| p.contains(o.family, &o.dst))
            && self.sport.is_none_or(|p| ports && p == o.src_l4)
            && self.dport.is_none_or(|p| ports && p == o.dst_l4)
            && self.zone.is_none_or(|z| z == o.zone)
            && self
                .offloaded
                .is_none_or(|off| off == conn.status.contains(Status::OFFLOAD))
            && self.tcp_state.is_none_or(|s| match conn.proto {
                L4State::Tcp(t) => t.state() == s,
                L4State::Udp { .. } | L4State::Icmp | L4State::Generic => false,
            })
    }
}

impl Conntrack {
    /// Find the live connection of a tuple (either direction).
    pub fn lookup(&mut self, tuple: &Tuple, now: u64) -> Option<(Slot, Dir)> {
        self.table.lookup(tuple, now)
    }

    /// Live connections selected by `filter`.
    pub fn select<'a>(
        &'a self,
        filter: &'a Filter,
        now: u64,
    ) -> impl Iterator<Item = (Slot, Conn<L4State>)> + 'a {
        self.table.iter(now).filter(move |(_, c)| filter.matches(c))
    }

    /// Delete one connection (`conntrack -D`). Offloaded connections are refused: the
    /// fast path must let go of them first (invariant 2); returns whether it was removed.
    pub fn delete(&mut self, slot: Slot) -> Result<bool, DeleteError> {
        match self.table.entry(slot) {
            None => Ok(false),
            Some(c) if c.status.contains(Status::OFFLOAD) => Err(DeleteError::Offloaded),
            Some(_) => {
                let removed = self.table.remove(slot, RemoveReason::Deleted).is_some();
                self.release_nat();
                Ok(removed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_bitwise() {
        let p = Prefix {
            family: Family::V4,
            addr: Addr::v4([10, 1, 0, 0]),
            len: 12,
        };
        assert!(p.contains(Family::V4, &Addr::v4([10, 15, 255, 1])));
        assert!(!p.contains(Family::V4, &Addr::v4([10, 16, 0, 1])));
        assert!(!p.contains(Family::V6, &Addr::v4([10, 1, 0, 1])));
        let all = Prefix {
            family: Family::V4,
            addr: Addr::v4([0; 4]),
            len: 0,
        };
        assert!(all.contains(Family::V4, &Addr::v4([192, 0, 2, 1])));
    }
}
