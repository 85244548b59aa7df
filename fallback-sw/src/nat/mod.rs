//! NAT: rules, bindings (unique reply tuples) and packet rewriting.
//!
//! Like Linux, NAT is decided once, on a connection's first packet, and changes only
//! the connection's REPLY tuple; every later packet of either direction is rewritten
//! to look like the inverse of the other direction's tuple.
//!
//! The pipeline uses three calls (see `docs/nat.md`):
//!
//! 1. [`NatEngine::decide`] in conntrack's create path, before the entry is inserted:
//!    it returns the REPLY tuple to insert and the status bits to set.
//! 2. [`rewrite::rewrite`] after tracking, for every packet of a connection whose status
//!    has `SRC_NAT` or `DST_NAT` (ICMP errors RELATED to it included).
//! 3. [`NatEngine::released`] when a connection is destroyed.
//!
//! IPv4 is translated; IPv6 is tracked without NAT (rules for it are rejected, and
//! [`NatEngine::decide`] returns the plain inverse). Nothing here does I/O; randomness
//! comes from a seed.

pub mod alloc;
pub mod exact;
pub mod icmp;
pub mod rewrite;
pub mod rules;

#[cfg(test)]
pub(crate) mod tests;

use self::alloc::{
    AllocCtx, BusyPorts, BySource, Exhausted, Found, Manip, Memo, NatRange, NatRng, SnatV4Range,
};
use self::exact::ExactIndex;
use self::rules::{Hook, NatAction, NatFlags, NatRuleSet, PortRange, RuleId};
use crate::table::Status;
use crate::tuple::{Addr, Family, NotInvertible, PackedV4, Tuple};

pub use self::rules::PacketMeta;

/// The connection table as [`NatEngine::decide_in`] sees it.
pub trait Candidates {
    /// Whether the table holds the candidate REPLY tuple `reply` in either direction.
    fn is_taken(&mut self, reply: &Tuple) -> bool;

    /// The REPLY tuple of a source binding, told as soon as it is chosen and before the
    /// engine records the binding (to start loading what its insert will touch); at
    /// most once per decision, and then with the reply the decision returns.
    fn chosen(&mut self, reply: &Tuple) {
        let _ = reply;
    }
}

/// [`Candidates`] for [`NatEngine::decide_v4`], on packed tuples.
pub(crate) trait CandidatesV4 {
    /// [`Candidates::is_taken`] of the packed REPLY tuple `reply`.
    fn is_taken_v4(&mut self, reply: PackedV4) -> bool;

    /// [`Candidates::chosen`] of the packed REPLY tuple `reply`.
    fn chosen_v4(&mut self, reply: PackedV4);
}

/// What [`NatEngine::decide_v4`] chose: [`NatDecision`] of a source binding (or of
/// none) on packed values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecisionV4 {
    /// The REPLY tuple to insert with the connection.
    pub(crate) reply: PackedV4,
    /// As [`NatDecision::status`]: `SRC_NAT` set when the source was changed.
    pub(crate) status: Status,
}

/// [`Candidates`] from an `is_taken` closure.
struct TakenFn<'a>(&'a mut dyn FnMut(&Tuple) -> bool);

impl Candidates for TakenFn<'_> {
    fn is_taken(&mut self, reply: &Tuple) -> bool {
        (self.0)(reply)
    }
}

/// What [`NatEngine::decide`] chose for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatDecision {
    /// The REPLY tuple to insert with the connection (the ORIGINAL one is the packet's).
    pub reply: Tuple,
    /// Bits to set in the connection's status: `SRC_NAT_DONE | DST_NAT_DONE` always,
    /// `SRC_NAT` / `DST_NAT` when that manip changed the tuple.
    pub status: Status,
    /// The destination rule applied, if any.
    pub dst_rule: Option<RuleId>,
    /// The source rule applied, if any (for a full-NAT rule, the same as `dst_rule`).
    pub src_rule: Option<RuleId>,
}

impl NatDecision {
    /// Whether packets of the connection need [`rewrite::rewrite`].
    #[must_use]
    pub fn translates(&self) -> bool {
        self.status.intersects(Status::SRC_NAT | Status::DST_NAT)
    }
}

/// Why a new connection cannot be NATed; the caller drops its first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    /// No free tuple in the range (counted in [`NatStats::exhausted`] and the rule's
    /// [`rules::RuleStats::exhausted`]).
    #[error("rule {rule:?}: nat range exhausted")]
    Exhausted {
        /// The rule whose range is full; `None` for a null binding (a clash of a
        /// connection that no rule translates).
        rule: Option<RuleId>,
        /// The details.
        #[source]
        source: Exhausted,
    },
    /// A masquerade rule matched but the egress port has no IPv4 address.
    #[error("rule {rule}: egress port has no ipv4 address to masquerade to")]
    NoMasqueradeAddress {
        /// The rule.
        rule: RuleId,
    },
    /// The original tuple has no reply (an ICMP type that is not a request).
    #[error(transparent)]
    NotInvertible(#[from] NotInvertible),
}

/// Engine-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatStats {
    /// Decisions made (connections created through [`NatEngine::decide`]).
    pub decisions: u64,
    /// Decisions that translate (some NAT bit set).
    pub translated: u64,
    /// Source bindings that kept the original tuple.
    pub port_preserved: u64,
    /// Source bindings that reused an existing mapping of the same source.
    pub by_source_reused: u64,
    /// Bindings found by a port search.
    pub searched: u64,
    /// Probes made by port searches: candidates checked in the table, or taken as free
    /// without a check (see `unchecked`) (a source search skips the ports `BusyPorts`
    /// records without counting them).
    pub probes: u64,
    /// Source candidates taken as free without a table check because `BusyPorts` was
    /// exact ([`exact::ExactIndex`]); searches and kept ports alike.
    pub unchecked: u64,
    /// Connections dropped: no free tuple.
    pub exhausted: u64,
    /// Connections dropped: masquerade without an egress address.
    pub no_masquerade_address: u64,
    /// Connections without a source rule whose port had to change (a clash with a
    /// translated connection's reply tuple).
    pub null_binding_remaps: u64,
}

impl NatStats {
    /// Counts how a source binding was found.
    #[inline]
    fn count_found(&mut self, found: Found) {
        match found {
            Found::Kept => self.port_preserved += 1,
            Found::BySource => self.by_source_reused += 1,
            Found::AddrOnly => {}
            Found::Searched { probes } => {
                self.searched += 1;
                self.probes += u64::from(probes);
            }
        }
    }
}

/// The NAT engine of one worker: rules, the by-source index, a seeded RNG, counters.
#[derive(Debug)]
pub struct NatEngine {
    rules: NatRuleSet,
    by_source: BySource,
    busy: BusyPorts,
    exact: ExactIndex,
    rng: NatRng,
    seed: u64,
    stats: NatStats,
    /// Tests: ignore the table size given to `decide_in` (every candidate checked).
    #[cfg(test)]
    always_check: bool,
    /// Tests: `decide_v4` declines every decision (the general path makes them all).
    #[cfg(test)]
    general_only: bool,
}

/// The source part of a decision.
struct SrcPlan {
    range: NatRange,
    rule: Option<(usize, RuleId)>,
}

fn ports_range(addr: Addr, ports: Option<PortRange>, flags: NatFlags) -> NatRange {
    NatRange {
        min_addr: addr,
        max_addr: addr,
        ports,
        random_fully: flags.random_fully,
        persistent: flags.persistent,
    }
}

impl NatEngine {
    /// An engine with no rules; `seed` drives port offsets and address hashing.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            rules: NatRuleSet::new(),
            by_source: BySource::default(),
            busy: BusyPorts::default(),
            exact: ExactIndex::default(),
            rng: NatRng::new(seed),
            seed: rules::mix64(seed ^ 0x6e61_745f_6861_7368),
            stats: NatStats::default(),
            #[cfg(test)]
            always_check: false,
            #[cfg(test)]
            general_only: false,
        }
    }

    /// Tests: from now on, [`decide_v4`](Self::decide_v4) declines every decision (a
    /// reference for its choices).
    #[cfg(test)]
    pub(crate) fn only_general(&mut self) {
        self.general_only = true;
    }

    /// Tests: from now on, check every candidate in the table as
    /// [`decide`](Self::decide) does (a reference for `decide_in`'s shortcut).
    #[cfg(test)]
    pub(crate) fn check_always(&mut self) {
        self.always_check = true;
    }

    /// The rules.
    #[must_use]
    pub fn rules(&self) -> &NatRuleSet {
        &self.rules
    }

    /// The rules, to add or remove. Existing connections are not affected.
    pub fn rules_mut(&mut self) -> &mut NatRuleSet {
        &mut self.rules
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> NatStats {
        self.stats
    }

    /// The by-source index.
    #[must_use]
    pub fn by_source(&self) -> &BySource {
        &self.by_source
    }

    /// Ports known to be in use towards busy endpoints (a search shortcut).
    #[must_use]
    pub fn busy_ports(&self) -> &BusyPorts {
        &self.busy
    }

    /// When [`busy_ports`](Self::busy_ports) is exact.
    #[must_use]
    pub fn exact_index(&self) -> &ExactIndex {
        &self.exact
    }

    /// Whether [`busy_ports`](Self::busy_ports) is exact for a table of `live`
    /// connections whose removals have all been [`released`](Self::released): then a
    /// decision takes a source candidate at a NAT address it records no binding for as
    /// free without asking the table ([`exact::ExactIndex`]).
    #[must_use]
    pub fn index_exact(&self, live: usize) -> bool {
        self.exact.holds(&self.busy, live)
    }

    /// Decides the NAT binding of a new connection whose first packet has ORIGINAL
    /// tuple `orig`: DNAT/VIP at PREROUTING first, then SNAT/masquerade at
    /// POSTROUTING on the tuple as DNAT left it (`cur = invert(reply)`), as Linux does.
    ///
    /// Without a matching source rule a null binding still runs, so a connection whose
    /// reply would clash with a translated connection's reply gets another source
    /// port. Every `Ok` reply tuple was reported free by `is_taken`.
    ///
    /// `is_taken` is called with candidate REPLY tuples and must say whether the table
    /// holds that tuple in either direction (a plain lookup of it).
    ///
    /// # Errors
    /// [`NatError`]; the caller drops the packet and creates nothing. Counted in
    /// [`NatStats`] and the rule's counters.
    pub fn decide(
        &mut self,
        orig: &Tuple,
        meta: &PacketMeta,
        is_taken: &mut dyn FnMut(&Tuple) -> bool,
    ) -> Result<NatDecision, NatError> {
        self.decide_in(orig, meta, None, &mut TakenFn(is_taken))
    }

    /// [`decide`](Self::decide) for a table that holds `live` connections (`Some` only
    /// when every removal from it has been [`released`](Self::released)): when
    /// [`index_exact`](Self::index_exact) says so, source candidates that
    /// [`busy_ports`](Self::busy_ports) does not record are not checked with
    /// [`Candidates::is_taken`]. The choice is the same as [`decide`](Self::decide)'s.
    ///
    /// # Errors
    /// As [`decide`](Self::decide).
    pub fn decide_in(
        &mut self,
        orig: &Tuple,
        meta: &PacketMeta,
        live: Option<usize>,
        table: &mut dyn Candidates,
    ) -> Result<NatDecision, NatError> {
        let is_taken = &mut |r: &Tuple| table.is_taken(r);
        #[cfg(test)]
        let live = live.filter(|_| !self.always_check);
        orig.invertible()?;
        self.stats.decisions += 1;
        let mut status = Status::SRC_NAT_DONE | Status::DST_NAT_DONE;
        if orig.family != Family::V4 {
            return Ok(NatDecision {
                reply: orig.inverse(),
                status,
                dst_rule: None,
                src_rule: None,
            });
        }
        // PREROUTING: destination manip. `cur`: the tuple as DNAT left it, `orig` itself
        // when no destination rule applies (not copied: `orig` was usually written just
        // before, field by field, and a copy's wide loads would wait for those stores).
        let mut dnat = None;
        let mut dst_rule = None;
        let mut src_plan = None;
        if let Some(i) = self.rules.lookup_index(Hook::Dst, orig, meta) {
            let seed = self.seed;
            let entry = self.rules.entry_mut(i);
            entry.stats.matched += 1;
            let id = entry.rule.id;
            dst_rule = Some(id);
            let (to_addr, to_port) = match &entry.rule.action {
                NatAction::Dnat { to_addr, to_port } => (*to_addr, *to_port),
                NatAction::FullNat {
                    to_addr,
                    to_port,
                    snat_addrs,
                    snat_ports,
                    flags,
                } => {
                    src_plan = Some(SrcPlan {
                        range: NatRange {
                            min_addr: snat_addrs.min,
                            max_addr: snat_addrs.max,
                            ports: *snat_ports,
                            random_fully: flags.random_fully,
                            persistent: flags.persistent,
                        },
                        rule: Some((i, id)),
                    });
                    (*to_addr, *to_port)
                }
                NatAction::Vip { .. } => match entry.select_backend(orig, seed) {
                    Some(b) => (b.addr, b.port),
                    None => (orig.dst, None),
                },
                NatAction::Snat { .. } | NatAction::Masquerade { .. } => (orig.dst, None),
            };
            let range = ports_range(to_addr, to_port.map(PortRange::single), NatFlags::default());
            let mut ctx = AllocCtx {
                by_source: &self.by_source,
                rng: &mut self.rng,
                seed: self.seed,
                is_taken: &mut *is_taken,
                busy: None,
            };
            // A destination clash is left for the source manip to resolve (Linux keeps
            // the last candidate too); only the final reply must be unique.
            let new = match alloc::get_unique_tuple(orig, &range, Manip::Dst, &mut ctx) {
                Ok((t, _)) => t,
                Err(e) => e.last,
            };
            if new != *orig {
                status |= Status::DST_NAT;
            }
            dnat = Some(new);
        }
        let cur = dnat.as_ref().unwrap_or(orig);
        // POSTROUTING: source manip.
        let plan = match src_plan {
            Some(p) => Some(p),
            None => match self.rules.lookup_index(Hook::Src, cur, meta) {
                None => None,
                Some(i) => {
                    let e = self.rules.entry_mut(i);
                    let id = e.rule.id;
                    let Some(range) = src_range(&e.rule.action, cur, meta) else {
                        e.stats.matched += 1;
                        self.stats.no_masquerade_address += 1;
                        return Err(NatError::NoMasqueradeAddress { rule: id });
                    };
                    Some(SrcPlan {
                        range,
                        rule: Some((i, id)),
                    })
                }
            },
        };
        let plan = plan.unwrap_or(SrcPlan {
            range: NatRange::addr(cur.src),
            rule: None,
        });
        if let Some((i, _)) = plan.rule
            && src_plan_counts(dst_rule, plan.rule)
        {
            self.rules.entry_mut(i).stats.matched += 1;
        }
        let mut ctx = AllocCtx {
            by_source: &self.by_source,
            rng: &mut self.rng,
            seed: self.seed,
            is_taken,
            busy: Some(&self.busy),
        };
        // The maps' hashes of this decision's keys, for recording the binding below.
        let mut memo = match live {
            Some(n) if self.exact.holds(&self.busy, n) => Memo::exact(&self.busy, &self.exact),
            _ => Memo::new(Some(&self.busy)),
        };
        let found = alloc::get_unique_tuple_memo(cur, &plan.range, Manip::Src, &mut ctx, &mut memo);
        self.stats.unchecked += u64::from(memo.unchecked);
        let (new, found) = match found {
            Ok(x) => x,
            Err(source) => return Err(self.exhausted(plan.rule, source)),
        };
        self.stats.count_found(found);
        // Built in place (`invert`'s `Result` was copied through the stack, and its wide
        // loads waited for the narrow stores that built it).
        new.invertible()?;
        let reply = new.inverse();
        if new != *cur {
            table.chosen(&reply);
            status |= Status::SRC_NAT;
            if plan.rule.is_none() {
                self.stats.null_binding_remaps += 1;
            }
            let key = alloc::key_of_l4(&new, Manip::Src).unwrap_or(new.src_l4);
            let endpoint = memo.endpoint_hash(&new);
            self.by_source.add_memo(&memo, orig, new.src, key);
            self.hold(orig, &new, status, endpoint);
        }
        if status.intersects(Status::SRC_NAT | Status::DST_NAT) {
            self.stats.translated += 1;
        }
        Ok(NatDecision {
            reply,
            status,
            dst_rule,
            src_rule: plan.rule.map(|(_, id)| id),
        })
    }

    /// A source search that found no free tuple (`source`) under `rule` (its index and
    /// id, if any): counted, for the engine and the rule, and the error to return.
    #[cold]
    fn exhausted(&mut self, rule: Option<(usize, RuleId)>, source: Exhausted) -> NatError {
        self.stats.exhausted += 1;
        if let Some((i, _)) = rule {
            self.rules.entry_mut(i).stats.exhausted += 1;
        }
        NatError::Exhausted {
            rule: rule.map(|(_, id)| id),
            source,
        }
    }

    /// [`decide_in`](Self::decide_in) of a new connection with packed ORIGINAL tuple
    /// `orig`, for the common case, with no [`Tuple`] built: a protocol with ports (not
    /// ICMP), no destination rule in the set, and a source or masquerade rule that
    /// matches with a port range, not fully random, to plain IPv4 addresses. The same
    /// decision as `decide_in`'s (the same random draws, counters and records; tests
    /// run both in lockstep). `None`, with nothing changed, for any other connection:
    /// the caller asks `decide_in`.
    pub(crate) fn decide_v4(
        &mut self,
        orig: PackedV4,
        meta: &PacketMeta,
        live: Option<usize>,
        table: &mut dyn CandidatesV4,
    ) -> Option<Result<DecisionV4, NatError>> {
        #[cfg(test)]
        if self.general_only {
            return None;
        }
        #[cfg(test)]
        let live = live.filter(|_| !self.always_check);
        let (_, rest) = orig.words();
        let proto = u8::try_from((rest >> 48) & 0xFF).unwrap_or(0);
        if !alloc::has_ports(proto) || self.rules.has_dst_rules() {
            return None;
        }
        // POSTROUTING on the original (no destination rule): the rule and its range.
        let i = self.rules.lookup_src_v4(orig, meta)?;
        let e = self.rules.entry_mut(i);
        let range = match &e.rule.action {
            NatAction::Snat { .. } => e.snat_v4?,
            NatAction::Masquerade { ports, flags } => match &meta.out_addr {
                Some(a) if *a != Addr::default() => SnatV4Range::new(a, a, *ports, *flags)?,
                _ => return None,
            },
            NatAction::Dnat { .. } | NatAction::FullNat { .. } | NatAction::Vip { .. } => {
                return None;
            }
        };
        // The decision is this path's from here on.
        e.stats.matched += 1;
        let id = e.rule.id;
        self.stats.decisions += 1;
        let exact = match live {
            Some(n) if self.exact.holds(&self.busy, n) => Some(&self.exact),
            _ => None,
        };
        let chosen = alloc::snat_v4(
            orig,
            &range,
            self.seed,
            &self.by_source,
            &self.busy,
            exact,
            &mut self.rng,
            &mut |r| table.is_taken_v4(r),
        );
        let c = match chosen {
            Ok(c) => c,
            Err(f) => {
                self.stats.unchecked += u64::from(f.unchecked);
                let source = Exhausted {
                    manip: Manip::Src,
                    tuple: orig.unpack(),
                    last: alloc::with_source(orig, f.addr, f.port).unpack(),
                    probes: f.probes,
                };
                return Some(Err(self.exhausted(Some((i, id)), source)));
            }
        };
        self.stats.unchecked += u64::from(c.unchecked);
        self.stats.count_found(c.found);
        let mut status = Status::SRC_NAT_DONE | Status::DST_NAT_DONE;
        let new = alloc::with_source(orig, c.addr, c.port);
        // A protocol with ports (not ICMP).
        let reply = new.invert_ports();
        if new != orig {
            table.chosen_v4(reply);
            status |= Status::SRC_NAT;
            self.by_source.add_v4(orig, &c);
            // A known NAT address stays known (`ExactIndex::binding` does nothing).
            if !c.known_nat_addr() {
                self.exact
                    .binding_at(&self.busy, Addr::v4(c.addr.to_le_bytes()));
            }
            if self.busy.add_v4(orig, &c) {
                let [_, _, _, _, d0, d1, d2, d3] = orig.words().0.to_le_bytes();
                self.exact.recorded_to(&Addr::v4([d0, d1, d2, d3]), status);
            }
            self.stats.translated += 1;
        }
        Some(Ok(DecisionV4 { reply, status }))
    }

    /// Registers the binding of a connection re-created without a decision (an agent
    /// restart that reads its connections back from a device table): the by-source
    /// reference and the busy port, exactly what [`decide`](Self::decide) records for
    /// a `SRC_NAT` connection, so that a new connection's choice sees the port as held
    /// and the later [`released`](Self::released) gives back what was taken. Call once
    /// per such connection, with its tuples (`[original, reply]`) and status.
    pub fn restored(&mut self, tuples: &[Tuple; 2], status: Status) {
        if let Some((new, key)) = src_binding(tuples, status) {
            self.by_source.add(&tuples[0], new.src, key);
            self.hold(&tuples[0], &new, status, None);
        }
    }

    /// Records the busy port of connection `orig` (status `status`) bound to `new`,
    /// whose [`BusyPorts`] endpoint hash is `endpoint` if known.
    #[inline]
    fn hold(
        &mut self,
        orig: &Tuple,
        new: &Tuple,
        status: Status,
        endpoint: Option<(u64, Option<usize>)>,
    ) {
        self.exact.binding(&self.busy, new);
        let (hash, bucket) = endpoint.unwrap_or_else(|| (self.busy.hash(new), None));
        if self.busy.add_hashed(hash, bucket, new) {
            self.exact.recorded(orig, status);
        }
    }

    /// Releases what a connection held: its by-source reference. Call once when a
    /// connection created with a [`NatDecision`] is destroyed, with its tuples
    /// (`[original, reply]`) and status.
    pub fn released(&mut self, tuples: &[Tuple; 2], status: Status) {
        if let Some((new, key)) = src_binding(tuples, status) {
            self.by_source.remove(&tuples[0], new.src, key);
            if self.busy.remove(&new) {
                self.exact.cleared(&tuples[0], status);
            }
        }
    }
}

/// The source range a rule found at POSTROUTING gives `cur`; `None` for a masquerade
/// rule when the egress port has no IPv4 address.
fn src_range(action: &NatAction, cur: &Tuple, meta: &PacketMeta) -> Option<NatRange> {
    Some(match action {
        NatAction::Snat {
            addrs,
            ports,
            flags,
        } => NatRange {
            min_addr: addrs.min,
            max_addr: addrs.max,
            ports: *ports,
            random_fully: flags.random_fully,
            persistent: flags.persistent,
        },
        NatAction::Masquerade { ports, flags } => match meta.out_addr {
            Some(a) if a != Addr::default() => ports_range(a, *ports, *flags),
            _ => return None,
        },
        NatAction::Dnat { .. } | NatAction::FullNat { .. } | NatAction::Vip { .. } => {
            NatRange::addr(cur.src)
        }
    })
}

/// The source binding of a `SRC_NAT` connection: the original tuple as translated
/// (the inverse of the reply tuple) and its by-source port key.
fn src_binding(tuples: &[Tuple; 2], status: Status) -> Option<(Tuple, u16)> {
    if !status.contains(Status::SRC_NAT) {
        return None;
    }
    let new = tuples[1].invert().ok()?;
    let key = alloc::key_of_l4(&new, Manip::Src).unwrap_or(new.src_l4);
    Some((new, key))
}

/// A full-NAT rule was counted at PREROUTING already.
fn src_plan_counts(dst_rule: Option<RuleId>, src: Option<(usize, RuleId)>) -> bool {
    src.is_some_and(|(_, id)| dst_rule != Some(id))
}

#[cfg(test)]
mod restored_tests {
    use super::tests::{C, N, X, out_meta, snat_rule, t4};
    use super::*;
    use crate::tuple::proto;

    /// A binding re-registered in a fresh engine behaves like the one `decide` made:
    /// the same source gets the same mapping towards another endpoint, the port is
    /// busy towards the same endpoint, and `released` gives back exactly that.
    #[test]
    fn restored_binding_is_held_like_a_decided_one() {
        let rule = || snat_rule(1, None);
        let mut before = NatEngine::new(7);
        before.rules_mut().add(rule()).expect("rule");
        let orig = t4(C, 5000, X, 53, proto::UDP);
        let d = before
            .decide(&orig, &out_meta(), &mut |_| false)
            .expect("decision");
        assert!(d.status.contains(Status::SRC_NAT));
        let mapped = d.reply.dst_l4;

        let mut after = NatEngine::new(8);
        after.rules_mut().add(rule()).expect("rule");
        after.restored(&[orig, d.reply], d.status);
        assert_eq!(after.by_source().len(), 1);
        assert_eq!(after.busy_ports().len(), 1);
        // Endpoint-independent mapping: the same source elsewhere keeps its port.
        let other = t4(C, 5000, [198, 51, 100, 8], 53, proto::UDP);
        let d2 = after
            .decide(&other, &out_meta(), &mut |_| false)
            .expect("decision");
        assert_eq!((d2.reply.dst, d2.reply.dst_l4), (Addr::v4(N), mapped));
        after.released(&[other, d2.reply], d2.status);
        // Not a translated connection: nothing to register.
        after.restored(&[orig, orig.invert().expect("inv")], Status::empty());
        assert_eq!(after.by_source().len(), 1);
        after.released(&[orig, d.reply], d.status);
        assert!(after.by_source().is_empty());
        assert!(after.busy_ports().is_empty());
    }
}
