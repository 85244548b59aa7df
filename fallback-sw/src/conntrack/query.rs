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
        let bits = usize::from(self.len);
        let full = bits / 8;
        let rest = bits % 8;
        if self.addr.0[..full] != addr.0[..full] {
            return false;
        }
        if rest == 0 {
            return true;
        }
        let mask = 0xFFu8 << (8 - rest);
        (self.addr.0[full] & mask) == (addr.0[full] & mask)
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
