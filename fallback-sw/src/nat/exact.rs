//! When [`BusyPorts`] is exact: a source-manip candidate whose port it does not record
//! is free in the connection table, and the table check of the candidate (an index
//! line nobody touched, the decision's one cache miss) can be skipped.
//!
//! A candidate of a source manip to address `A` is the ORIGINAL tuple
//! `new = (A:p -> remote:rp)`; it is used when the table holds its reply
//! `R = (remote:rp -> A:p)` as some connection's ORIGINAL or REPLY tuple.
//!
//! - `R` is a connection's REPLY tuple exactly when that connection's translated
//!   original is `new`: for a recorded binding, [`BusyPorts`] has `p` set for the
//!   endpoint `(A, remote:rp)`.
//! - `R` is a connection's ORIGINAL tuple when the connection was sent to `A:p`: a
//!   connection to a NAT address (a port forward, the NAT box's own services, an inside
//!   host talking to the public address).
//!
//! So the index is exact for candidates at `A` when every connection in the table is a
//! binding recorded in [`BusyPorts`] whose ORIGINAL destination is no NAT address.
//! [`ExactIndex`] keeps the addresses the engine has bound to (`addrs`) and counts the
//! recorded bindings that fail the second condition (`dirty`: a destination-NAT one, or
//! one sent to a NAT address); the index is exact when the table holds as many
//! connections as [`BusyPorts`] records clean bindings (`ExactIndex::holds`, asked through
//! [`NatEngine::index_exact`](super::NatEngine::index_exact)): every
//! other kind of connection (untranslated, destination-NAT only, IPv6, a binding not
//! recorded for lack of room, one restored without [`NatEngine::restored`]) makes the
//! table larger than that count, and the check is made as before.
//!
//! The count is right only if every removal is handed to the engine before the
//! question (`Conntrack` asks only with its release queue empty), and `addrs` only
//! grows: an address that becomes a NAT address while a recorded binding is sent to it
//! would make that binding dirty after the fact, so that case turns the shortcut off
//! for good (`poisoned`), as does running out of room for addresses.
//!
//! [`NatEngine::restored`]: super::NatEngine::restored

use hashbrown::HashTable;

use super::alloc::{BusyPorts, FoldBuild, FoldHasher, addr_words};
use crate::table::Status;
use crate::tuple::{Addr, Tuple};

/// Addresses kept at most; a further NAT address turns the shortcut off.
pub const MAX_NAT_ADDRS: usize = 4096;
/// NAT addresses kept inline (compared directly, no hash) before the hash set is used.
const FEW_ADDRS: usize = 4;

/// See the module documentation.
#[derive(Clone, Default)]
pub struct ExactIndex {
    /// The first NAT addresses (`few_len` of them) ...
    few: [Addr; FEW_ADDRS],
    few_len: usize,
    /// ... and the others.
    addrs: HashTable<Addr>,
    build: FoldBuild,
    dirty: usize,
    poisoned: bool,
}

impl core::fmt::Debug for ExactIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ExactIndex")
            .field("addrs", &(self.few_len + self.addrs.len()))
            .field("dirty", &self.dirty)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// The hash of address `a` in the set built by `build`.
#[inline]
fn addr_hash(build: FoldBuild, a: &Addr) -> u64 {
    use core::hash::{BuildHasher, Hasher};
    let [w0, w1] = addr_words(a);
    let mut h: FoldHasher = build.build_hasher();
    h.write_u64(w0);
    h.write_u64(w1);
    h.finish()
}

impl ExactIndex {
    #[inline]
    fn hash(&self, a: &Addr) -> u64 {
        addr_hash(self.build, a)
    }

    /// Whether `a` is an address the engine has bound a source to.
    #[inline]
    pub(crate) fn knows(&self, a: &Addr) -> bool {
        // The inline ones as 128-bit values.
        let v = u128::from_le_bytes(a.0);
        self.few[..self.few_len]
            .iter()
            .any(|x| u128::from_le_bytes(x.0) == v)
            || (!self.addrs.is_empty() && self.addrs.find(self.hash(a), |x| x == a).is_some())
    }

    /// Whether [`BusyPorts`] `busy` is exact for candidates at a known address, given
    /// that the table holds `live` connections and every removal has been released.
    #[inline]
    pub(crate) fn holds(&self, busy: &BusyPorts, live: usize) -> bool {
        !self.poisoned && busy.ports().checked_sub(self.dirty) == Some(live)
    }

    /// Whether the shortcut is off for good.
    #[must_use]
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Recorded bindings that do not count as clean.
    #[must_use]
    pub fn dirty(&self) -> usize {
        self.dirty
    }

    /// Before `new` (a source-manipped ORIGINAL tuple) is recorded: its address
    /// becomes a NAT address.
    #[inline]
    pub(crate) fn binding(&mut self, busy: &BusyPorts, new: &Tuple) {
        self.binding_at(busy, new.src);
    }

    /// [`ExactIndex::binding`] of a binding with source address `a`.
    #[inline]
    pub(crate) fn binding_at(&mut self, busy: &BusyPorts, a: Addr) {
        if self.poisoned || self.knows(&a) {
            return;
        }
        // A recorded binding sent to `a` was counted clean; it is not any more.
        if self.few_len + self.addrs.len() >= MAX_NAT_ADDRS || busy.any_towards(&a) {
            self.poisoned = true;
            return;
        }
        if self.few_len < FEW_ADDRS {
            self.few[self.few_len] = a;
            self.few_len += 1;
            return;
        }
        let h = self.hash(&a);
        let build = self.build;
        self.addrs.insert_unique(h, a, |x| addr_hash(build, x));
    }

    /// A binding of connection `orig` (status `status`) was recorded.
    #[inline]
    pub(crate) fn recorded(&mut self, orig: &Tuple, status: Status) {
        self.recorded_to(&orig.dst, status);
    }

    /// [`ExactIndex::recorded`] of a connection whose ORIGINAL destination is `dst`.
    #[inline]
    pub(crate) fn recorded_to(&mut self, dst: &Addr, status: Status) {
        if status.contains(Status::DST_NAT) || self.knows(dst) {
            self.dirty += 1;
        }
    }

    /// A binding recorded by [`ExactIndex::recorded`] was cleared.
    pub(crate) fn cleared(&mut self, orig: &Tuple, status: Status) {
        if self.is_dirty(orig, status) {
            match self.dirty.checked_sub(1) {
                Some(d) => self.dirty = d,
                None => self.poisoned = true,
            }
        }
    }

    fn is_dirty(&self, orig: &Tuple, status: Status) -> bool {
        status.contains(Status::DST_NAT) || self.knows(&orig.dst)
    }
}

#[cfg(test)]
mod tests {
    use super::super::NatEngine;
    use super::super::tests::{C, C2, N, S, X, t4};
    use crate::table::Status;
    use crate::tuple::{Tuple, proto};

    /// The tuples of a connection from `(src, sp)` to `(dst, dp)` translated to
    /// `(to, port)`.
    fn binding(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, to: [u8; 4], port: u16) -> [Tuple; 2] {
        let orig = t4(src, sp, dst, dp, proto::UDP);
        [orig, t4(dst, dp, to, port, proto::UDP)]
    }

    #[test]
    fn bindings_sent_to_a_nat_address_are_not_clean() {
        let mut nat = NatEngine::new(1);
        let snat = Status::SRC_NAT;
        let a = binding(C, 5000, S, 53, N, 20_000);
        nat.restored(&a, snat);
        assert!(nat.index_exact(1), "one clean binding");
        assert!(
            !nat.index_exact(2),
            "a connection the index does not describe"
        );
        // Sent to the NAT address itself: recorded, but not clean.
        let b = binding(C2, 6000, N, 80, N, 20_001);
        nat.restored(&b, snat);
        assert_eq!(nat.exact_index().dirty(), 1);
        assert!(!nat.index_exact(2));
        // A destination-NAT binding is not clean either.
        let c = binding(C2, 6001, X, 80, N, 20_002);
        nat.restored(&c, snat | Status::DST_NAT);
        assert_eq!(nat.exact_index().dirty(), 2);
        nat.released(&b, snat);
        nat.released(&c, snat | Status::DST_NAT);
        assert_eq!(nat.exact_index().dirty(), 0);
        assert!(nat.index_exact(1));
        nat.released(&a, snat);
        assert!(nat.index_exact(0) && nat.busy_ports().is_empty());
    }

    #[test]
    fn a_new_nat_address_with_bindings_sent_to_it_turns_the_shortcut_off() {
        let mut nat = NatEngine::new(1);
        let snat = Status::SRC_NAT;
        // Counted clean: X is no NAT address yet.
        let a = binding(C, 5000, X, 53, N, 20_000);
        nat.restored(&a, snat);
        assert!(nat.index_exact(1));
        // X becomes one: the binding sent to it would now be dirty.
        let b = binding(C2, 6000, S, 53, X, 30_000);
        nat.restored(&b, snat);
        assert!(nat.exact_index().poisoned());
        assert!(!nat.index_exact(2) && !nat.index_exact(1));
        nat.released(&a, snat);
        nat.released(&b, snat);
        assert!(!nat.index_exact(0), "for good");
    }
}
