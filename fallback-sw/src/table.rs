//! The connection table of one worker.
//!
//! - Entries live in a slab allocated once at the table's capacity: no allocation on the
//!   packet path. An entry ([`Entry`], 64 bytes: one cache line) holds what a packet of an established
//!   connection reads: the tuples as a compact key, status, timeout, the low 32 bits of
//!   the counters (the rest aside once a count passes 2^32 - 1) and the protocol's hot
//!   state. An IPv4 connection whose reply tuple is the inverse of its
//!   original (no NAT) keeps only the original's 15 bytes in the key; one translated at
//!   one endpoint (SNAT, masquerade, DNAT) keeps the original and the translated
//!   endpoint's address and port (21 bytes), so that its packets, in either direction,
//!   need nothing outside the entry; its slot's generation and wide-counter flag, which
//!   no longer fit, are spilled to a 5-byte side store. The tuples of any other
//!   connection (both endpoints translated, IPv6) live in a side store at the entry's
//!   slot (80 bytes, allocated by chunks of slots when first needed, see [`side`]). Reads
//!   that want the tuples get a materialized copy of the connection, [`Conn`].
//! - An open-addressing index (linear probing, backward-shift deletion, load at most
//!   1/2) maps each connection's two tuples to `(slot, direction)`, so a packet of either
//!   direction finds its connection with one hash and, usually, one probe. A cell is 32
//!   bits: the slot, the direction and, in the bits left, a tag from the hash (11 bits
//!   for a million connections) so that a probe rarely touches an entry that does not
//!   match (16 bytes of index per connection). An index of 2 MiB or more asks for
//!   transparent huge pages ([`pages`], [`Memory`]): at a million connections a lookup
//!   then walks no page tables for it.
//! - Expiry is lazy like Linux: an entry whose timeout has passed is dead; lookups reap
//!   it, and [`ConnTable::gc`] reaps the rest through a timer wheel whose cost per call is
//!   bounded and proportional to the entries that expire (see [`crate::timer`]).
//! - When the table is full, an insert runs Linux's early drop: walk up to 8 groups of 8
//!   index slots starting at the new tuple's position, delete every entry that is not
//!   ASSURED in the first group that has any, and succeed; otherwise fail. Offloaded
//!   entries (`OFFLOAD` or `HW_OFFLOAD`) are never taken, not even when expired.
//! - Every insert and removal produces an [`Event`] for the agent's event stream.
//!
//! The per-protocol state `P` is opaque here: the table does not know about TCP.

use crate::prefetch::prefetch;
use crate::timer::{SlotLinks, TimerWheel};
use crate::tuple::{Addr, Dir, PackedV4, Tuple, TupleHasher};

mod events;
pub mod free;
pub mod pages;
pub mod side;
use events::EventQueue;
use free::FreeSlots;
pub use pages::Memory;
use pages::PageArray;
use side::SlotStore;

bitflags::bitflags! {
    /// Connection status bits, numbered like Linux `enum ip_conntrack_status`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Status: u16 {
        /// Expected connection (helpers; unused here).
        const EXPECTED = 1 << 0;
        /// A reply-direction packet has been processed.
        const SEEN_REPLY = 1 << 1;
        /// The connection is assured: early drop does not take it.
        const ASSURED = 1 << 2;
        /// The entry is in the table.
        const CONFIRMED = 1 << 3;
        /// Source NAT applies (the reply tuple's destination differs).
        const SRC_NAT = 1 << 4;
        /// Destination NAT applies.
        const DST_NAT = 1 << 5;
        /// Sequence adjustment (helpers; unused here).
        const SEQ_ADJUST = 1 << 6;
        /// The source-NAT decision has been taken.
        const SRC_NAT_DONE = 1 << 7;
        /// The destination-NAT decision has been taken.
        const DST_NAT_DONE = 1 << 8;
        /// The entry is being destroyed.
        const DYING = 1 << 9;
        /// The timeout is never refreshed.
        const FIXED_TIMEOUT = 1 << 10;
        /// Template entry (unused here).
        const TEMPLATE = 1 << 11;
        /// UDP entry inserted by clash resolution.
        const NAT_CLASH = 1 << 12;
        /// A helper is attached (unused here).
        const HELPER = 1 << 13;
        /// The flow is handled by a fast path (flowtable / hardware).
        const OFFLOAD = 1 << 14;
        /// The flow is in the hardware flow table.
        const HW_OFFLOAD = 1 << 15;
    }
}

/// Packets and bytes of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (IP length, like Linux conntrack accounting).
    pub bytes: u64,
}

/// One connection, as read from the table: a copy, with both tuples materialized.
#[derive(Debug, Clone)]
pub struct Conn<P> {
    /// Original and reply tuples, indexed by [`Dir::index`].
    pub tuples: [Tuple; 2],
    /// Status bits.
    pub status: Status,
    /// Absolute expiry time in nanoseconds; dead once `timeout <= now`.
    pub timeout: u64,
    /// Per-direction counters, indexed by [`Dir::index`].
    pub counters: [Counter; 2],
    /// Protocol state.
    pub proto: P,
    /// Id of this connection: unique within the table's lifetime for practical
    /// purposes (a slot's id comes back after 2^32 connections in that slot) and never
    /// 0; see [`ConnTable::id`].
    pub id: u64,
}

impl<P> Conn<P> {
    /// The tuple of one direction.
    #[inline]
    #[must_use]
    pub fn tuple(&self, dir: Dir) -> &Tuple {
        &self.tuples[dir.index()]
    }

    /// Whether the connection has expired at `now`.
    #[inline]
    #[must_use]
    pub fn expired(&self, now: u64) -> bool {
        self.timeout <= now
    }

    /// Nanoseconds left before expiry (0 when expired).
    #[inline]
    #[must_use]
    pub fn remaining(&self, now: u64) -> u64 {
        self.timeout.saturating_sub(now)
    }
}

/// The low 32 bits of a direction's [`Counter`]; the rest is carried into the table's
/// side store when a count passes 2^32 - 1 (counts stay exact, like Linux's u64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LowCounter {
    packets: u32,
    bytes: u32,
}

/// The id of the connection of generation `generation` in `slot`.
#[inline]
fn conn_id(slot: Slot, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(slot.0)
}

/// The low 32 bits of `v`.
#[inline]
fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0)
}

/// What the table keeps of an entry besides its tuples and hot fields: the slot's
/// generation and whether the counters' high parts are aside. An entry keeps it in its
/// key when there is room ([`Key::V4`], [`Key::Side`]); a translated IPv4 connection's
/// key is full, so its `Meta` is in the table's `spilled` store at the entry's slot.
/// Bytes, not a `u32`, so that the key stays 2-byte aligned (22 bytes with its tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Meta {
    /// How many connections the slot has held, this one included (never 0): with the
    /// slot number, the connection's id ([`ConnTable::id`]).
    generation: [u8; 4],
    /// Whether the high parts of the counters are in the table's `wide` store (a count
    /// passed 2^32 - 1).
    wide: bool,
}

impl Meta {
    #[inline]
    fn new(generation: u32) -> Self {
        Self {
            generation: generation.to_ne_bytes(),
            wide: false,
        }
    }

    #[inline]
    fn generation(self) -> u32 {
        u32::from_ne_bytes(self.generation)
    }
}

/// The original tuple of an IPv4 connection in 15 bytes of alignment 1: the
/// little-endian bytes of its [`PackedV4`] words without the marker byte (source and
/// destination address, source and destination port (or ICMP id and type/code), zone,
/// protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct V4Orig([u8; 15]);

impl V4Orig {
    /// `t` packed, when it is IPv4 with the rest of its addresses' 16 bytes zero (as
    /// [`Addr::v4`] makes them).
    #[inline]
    fn pack(t: &Tuple) -> Option<Self> {
        t.pack_v4().map(Self::from_packed)
    }

    #[inline]
    fn from_packed(p: PackedV4) -> Self {
        let (addrs, rest) = p.words();
        let (a, r) = (addrs.to_le_bytes(), rest.to_le_bytes());
        Self([
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], r[0], r[1], r[2], r[3], r[4], r[5],
            r[6],
        ])
    }

    /// Whether this is the packed tuple whose [`OrigWords`] are `w`: the 15 bytes read
    /// as two overlapping little-endian words (bytes 0..8 and 7..15), with no
    /// [`PackedV4`] built from them.
    #[inline(always)]
    fn is(&self, w: OrigWords) -> bool {
        let (Some(lo), Some(hi)) = (self.0.first_chunk::<8>(), self.0.last_chunk::<8>()) else {
            return false;
        };
        u64::from_le_bytes(*lo) == w.lo && u64::from_le_bytes(*hi) == w.hi
    }

    /// The two words: a lookup compares them with its probe's ([`Probe`]).
    #[inline]
    fn packed(&self) -> PackedV4 {
        let b = &self.0;
        let addrs = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let rest = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], 0]);
        PackedV4::from_words(addrs, rest)
    }

    #[inline]
    fn tuple(&self) -> Tuple {
        self.packed().unpack()
    }
}

/// What [`V4Orig::is`] compares: the words of the 15 bytes [`V4Orig::from_packed`]
/// would store for a packed tuple, bytes 0..8 and 7..15 (computed once a lookup).
#[derive(Clone, Copy)]
struct OrigWords {
    lo: u64,
    hi: u64,
}

impl OrigWords {
    #[inline(always)]
    fn of(p: PackedV4) -> Self {
        let (addrs, rest) = p.words();
        // `rest` has its top byte clear: the 7 bytes that are stored, shifted up one.
        Self {
            lo: addrs,
            hi: addrs >> 56 | rest << 8,
        }
    }
}

/// A tuple being looked up, with its packed form and the packed form of its inverse,
/// computed once for every index cell the lookup compares.
struct Probe<'a> {
    tuple: &'a Tuple,
    packed: Option<PackedV4>,
    inverse: Option<PackedV4>,
}

impl<'a> Probe<'a> {
    #[inline]
    fn new(tuple: &'a Tuple) -> Self {
        let packed = tuple.pack_v4();
        Self {
            tuple,
            packed,
            inverse: packed.and_then(PackedV4::invert),
        }
    }
}

/// The key of a translated IPv4 connection whose reply tuple is the inverse of its
/// original except for one endpoint (SNAT or DNAT, not both): the original, and that
/// endpoint's address and port (for ICMP the echo id, which stays in the source port
/// field of both tuples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NatV4 {
    orig: V4Orig,
    addr: [u8; 4],
    l4: [u8; 2],
}

impl NatV4 {
    /// The reply tuple (see [`NatV4::reply`]) packed: the inverse of the original with
    /// the destination (`dst`, SNAT) or source (DNAT) address and port (for ICMP the
    /// id, in the source slot) replaced, as words. `None` only for an original that
    /// does not invert (never stored).
    #[inline]
    fn reply_packed(&self, dst: bool) -> Option<PackedV4> {
        let orig = self.orig.packed();
        let (o_addrs, o_rest) = orig.words();
        let addr = u64::from(u32::from_le_bytes(self.addr));
        let l4 = u64::from(u16::from_ne_bytes(self.l4));
        let (addrs, rest) = if o_rest >> 48 & 0xFF == u64::from(crate::tuple::proto::ICMP) {
            // The id stays in the source slot and the type is mapped: invert, then
            // replace the translated address and the id.
            let (addrs, rest) = orig.invert()?.words();
            if dst {
                (addrs & 0xFFFF_FFFF | addr << 32, rest & !0xFFFF | l4)
            } else {
                (addrs & !0xFFFF_FFFF | addr, rest & !0xFFFF | l4)
            }
        } else if dst {
            // Source: the original's destination; destination: the translated one.
            let rest = o_rest & !0xFFFF_FFFF | o_rest >> 16 & 0xFFFF | l4 << 16;
            (o_addrs >> 32 | addr << 32, rest)
        } else {
            // Source: the translated one; destination: the original's source.
            let rest = o_rest & !0xFFFF_FFFF | (o_rest & 0xFFFF) << 16 | l4;
            (addr | o_addrs << 32, rest)
        };
        Some(PackedV4::from_words(addrs, rest))
    }

    /// The reply tuple (see [`NatV4::reply`]), built field by field for a protocol
    /// with ports.
    #[inline]
    fn reply_tuple(&self, dst: bool) -> Tuple {
        let o = self.orig.tuple();
        if o.is_icmp() {
            return self.reply(&o, dst);
        }
        let (addr, l4) = (Addr::v4(self.addr), u16::from_ne_bytes(self.l4));
        if dst {
            Tuple {
                src: o.dst,
                dst: addr,
                src_l4: o.dst_l4,
                dst_l4: l4,
                ..o
            }
        } else {
            Tuple {
                src: addr,
                dst: o.src,
                src_l4: l4,
                dst_l4: o.src_l4,
                ..o
            }
        }
    }

    /// The reply tuple: the inverse of `orig` (this key's original, unpacked) with its
    /// destination (`dst`, SNAT) or source (DNAT) endpoint replaced.
    #[inline]
    fn reply(&self, orig: &Tuple, dst: bool) -> Tuple {
        // A NAT key is made only from a tuple that inverts.
        let mut r = orig.invert().unwrap_or(*orig);
        let l4 = u16::from_ne_bytes(self.l4);
        let addr = Addr::v4(self.addr);
        match (dst, r.is_icmp()) {
            (true, icmp) => {
                r.dst = addr;
                if icmp {
                    r.src_l4 = l4;
                } else {
                    r.dst_l4 = l4;
                }
            }
            (false, _) => {
                r.src = addr;
                r.src_l4 = l4;
            }
        }
        r
    }
}

/// How an entry holds its two tuples. 22 bytes: with the 2-byte status after it, the
/// first 24 bytes of the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// IPv4, and the reply tuple is [`Tuple::invert`] of the original: the original's
    /// fields.
    V4 { orig: V4Orig, meta: Meta },
    /// IPv4 with the reply's destination translated (SNAT): see [`NatV4`]. The
    /// entry's [`Meta`] is in the `spilled` store.
    SrcNatV4(NatV4),
    /// IPv4 with the reply's source translated (DNAT): see [`NatV4`]. The entry's
    /// [`Meta`] is in the `spilled` store.
    DstNatV4(NatV4),
    /// Both tuples are in the table's side store at the entry's slot (IPv6, both
    /// endpoints translated).
    Side { meta: Meta },
}

/// An IPv4 address of a tuple, when the rest of its 16 bytes is zero (as
/// [`Addr::v4`] makes it).
#[inline]
fn plain_v4(a: &Addr) -> Option<[u8; 4]> {
    a.0[4..].iter().all(|&b| b == 0).then(|| a.as_v4())
}

impl Key {
    /// The key of a new connection with these tuples, of generation `generation`; `None`
    /// when its tuples must go to the side store (then the key is [`Key::Side`]).
    fn compact(orig: &Tuple, reply: &Tuple, generation: u32) -> Option<Key> {
        let packed = V4Orig::pack(orig)?;
        let plain = Key::V4 {
            orig: packed,
            meta: Meta::new(generation),
        };
        // A protocol with ports (the create path of every connection): which endpoint
        // of the reply differs from the inverse's, compared field by field.
        if !orig.is_icmp() {
            let same =
                reply.proto == orig.proto && reply.zone == orig.zone && reply.family == orig.family;
            let src_same = reply.src == orig.dst && reply.src_l4 == orig.dst_l4;
            let dst_same = reply.dst == orig.src && reply.dst_l4 == orig.src_l4;
            return match (same, src_same, dst_same) {
                (true, true, true) => Some(plain),
                (true, true, false) => Some(Key::SrcNatV4(NatV4 {
                    orig: packed,
                    addr: plain_v4(&reply.dst)?,
                    l4: reply.dst_l4.to_ne_bytes(),
                })),
                (true, false, true) => Some(Key::DstNatV4(NatV4 {
                    orig: packed,
                    addr: plain_v4(&reply.src)?,
                    l4: reply.src_l4.to_ne_bytes(),
                })),
                _ => None,
            };
        }
        let inverse = orig.invert().ok()?;
        if inverse == *reply {
            return Some(plain);
        }
        // ICMP: one endpoint translated, the reply's destination (SNAT) or source
        // (DNAT), with the echo id.
        for dst in [true, false] {
            let addr = if dst { &reply.dst } else { &reply.src };
            let nat = NatV4 {
                orig: packed,
                addr: plain_v4(addr)?,
                l4: reply.src_l4.to_ne_bytes(),
            };
            if nat.reply(orig, dst) == *reply {
                return Some(if dst {
                    Key::SrcNatV4(nat)
                } else {
                    Key::DstNatV4(nat)
                });
            }
        }
        None
    }

    /// The entry's [`Meta`], when the key holds it.
    #[inline]
    fn meta(&self) -> Option<Meta> {
        match *self {
            Key::V4 { meta, .. } | Key::Side { meta } => Some(meta),
            Key::SrcNatV4(_) | Key::DstNatV4(_) => None,
        }
    }

    /// The entry's [`Meta`], mutable, when the key holds it.
    #[inline]
    fn meta_mut(&mut self) -> Option<&mut Meta> {
        match self {
            Key::V4 { meta, .. } | Key::Side { meta } => Some(meta),
            Key::SrcNatV4(_) | Key::DstNatV4(_) => None,
        }
    }

    /// Whether the probe's tuple is the tuple of direction `dir` (`None` for `Side`):
    /// originals and the reply of an untranslated key as two word compares (a probe
    /// without a packed form is no compact key's tuple), a translated reply field by
    /// field.
    #[inline]
    fn matches(&self, probe: &Probe<'_>, dir: Dir) -> Option<bool> {
        Some(match (self, dir) {
            (Key::Side { .. }, _) => return None,
            (Key::V4 { orig, .. }, Dir::Original)
            | (Key::SrcNatV4(NatV4 { orig, .. }), Dir::Original)
            | (Key::DstNatV4(NatV4 { orig, .. }), Dir::Original) => {
                probe.packed == Some(orig.packed())
            }
            // The reply is the inverse of the original: the probe's inverse is then
            // the original (inverting is an involution on the tuples it accepts).
            (Key::V4 { orig, .. }, Dir::Reply) => probe.inverse == Some(orig.packed()),
            (Key::SrcNatV4(nat), Dir::Reply) => {
                probe.packed.is_some() && probe.packed == nat.reply_packed(true)
            }
            (Key::DstNatV4(nat), Dir::Reply) => {
                probe.packed.is_some() && probe.packed == nat.reply_packed(false)
            }
        })
    }

    /// The tuple of direction `dir` packed (`None` for `Side`): what the NAT rewrite of
    /// a translated packet reads (see [`Entry::packed_tuple`]).
    #[inline(always)]
    fn packed(&self, dir: Dir) -> Option<PackedV4> {
        match (self, dir) {
            (Key::Side { .. }, _) => None,
            (Key::V4 { orig, .. }, Dir::Original)
            | (Key::SrcNatV4(NatV4 { orig, .. }), Dir::Original)
            | (Key::DstNatV4(NatV4 { orig, .. }), Dir::Original) => Some(orig.packed()),
            (Key::V4 { orig, .. }, Dir::Reply) => orig.packed().invert(),
            (Key::SrcNatV4(nat), Dir::Reply) => nat.reply_packed(true),
            (Key::DstNatV4(nat), Dir::Reply) => nat.reply_packed(false),
        }
    }

    /// The tuple of direction `dir` (`None` for `Side`). Inlined for the NAT rewrite
    /// (see [`ConnTable::tuple`]).
    #[inline(always)]
    fn tuple(&self, dir: Dir) -> Option<Tuple> {
        match (self, dir) {
            (Key::Side { .. }, _) => None,
            (Key::V4 { orig, .. }, Dir::Original)
            | (Key::SrcNatV4(NatV4 { orig, .. }), Dir::Original)
            | (Key::DstNatV4(NatV4 { orig, .. }), Dir::Original) => Some(orig.tuple()),
            (Key::V4 { orig, .. }, Dir::Reply) => {
                // A compact key is made only from a tuple that inverts.
                let orig = orig.tuple();
                Some(orig.invert().unwrap_or(orig))
            }
            (Key::SrcNatV4(nat), Dir::Reply) => Some(nat.reply_tuple(true)),
            (Key::DstNatV4(nat), Dir::Reply) => Some(nat.reply_tuple(false)),
        }
    }

    /// Both tuples (`None` for `Side`).
    #[inline]
    fn tuples(&self) -> Option<[Tuple; 2]> {
        Some([self.tuple(Dir::Original)?, self.tuple(Dir::Reply)?])
    }
}

/// One connection as the table stores it. The tuples are not public fields: read them
/// with [`ConnTable::tuples`], or take a [`Conn`] copy with [`ConnTable::get`].
///
/// The field order is fixed (`repr(C)`) so that the small fields fill what would be
/// padding, and the entry is aligned to a 64-byte cache line: with a 16-byte protocol
/// state it is exactly one line.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Entry<P> {
    key: Key,
    /// Status bits.
    pub status: Status,
    /// Absolute expiry time in nanoseconds; dead once `timeout <= now`. Change it with
    /// [`ConnTable::set_timeout`] so the timer stays right.
    pub timeout: u64,
    /// Low 32 bits of the per-direction counters, indexed by [`Dir::index`]: read
    /// them with [`ConnTable::counters`], add with [`ConnTable::count`].
    counters: [LowCounter; 2],
    /// Protocol state.
    pub proto: P,
}

impl<P> Entry<P> {
    /// Nanoseconds left before expiry; 0 when expired (`timeout <= now`), as
    /// [`Conn::remaining`].
    #[inline]
    #[must_use]
    pub fn remaining(&self, now: u64) -> u64 {
        self.timeout.saturating_sub(now)
    }

    /// Whether the connection has expired at `now`, as [`Conn::expired`].
    #[inline]
    #[must_use]
    pub fn expired(&self, now: u64) -> bool {
        self.remaining(now) == 0
    }

    /// Whether the tuples are in the side store (NAT, IPv6) rather than the entry.
    #[inline]
    #[must_use]
    pub fn tuples_aside(&self) -> bool {
        matches!(self.key, Key::Side { .. })
    }

    /// [`ConnTable::count`] when the low counters of `dir` stay under 2^32: adds and
    /// returns true; otherwise changes nothing and returns false (then call
    /// [`ConnTable::count`], which carries the high parts aside).
    #[inline]
    pub(crate) fn count_low(&mut self, dir: Dir, packets: u64, bytes: u64) -> bool {
        let lo = &mut self.counters[dir.index()];
        let p = u64::from(lo.packets).saturating_add(packets);
        let b = u64::from(lo.bytes).saturating_add(bytes);
        let (Ok(p), Ok(b)) = (u32::try_from(p), u32::try_from(b)) else {
            return false;
        };
        lo.packets = p;
        lo.bytes = b;
        true
    }

    /// [`ConnTable::set_timeout`] when `timeout` is not sooner than the current one
    /// (the timer wheel needs nothing then): writes it and returns true; otherwise
    /// changes nothing and returns false (then call [`ConnTable::set_timeout`]).
    #[inline]
    pub(crate) fn extend_timeout(&mut self, timeout: u64) -> bool {
        let later = timeout >= self.timeout;
        if later {
            self.timeout = timeout;
        }
        later
    }

    /// The tuple of direction `dir` packed into two words, when the entry holds it (an
    /// IPv4 connection untranslated or translated at one endpoint; `None` when the
    /// tuples are aside). The NAT rewrite of an established packet reads the other
    /// direction's tuple here: no [`Tuple`] is built.
    #[inline(always)]
    pub(crate) fn packed_tuple(&self, dir: Dir) -> Option<PackedV4> {
        self.key.packed(dir)
    }

    /// For a TCP or UDP connection translated at one endpoint, with the status bit of
    /// that translation alone (`SRC_NAT` for SNAT, `DST_NAT` for DNAT): the endpoint a
    /// packet of direction `dir` gets written to become the inverse of the other
    /// direction's tuple, read straight from the key (an SNAT original gets the
    /// translated source, its reply the original's source as destination; DNAT the
    /// other way round). `None` for any other entry, and for ICMP keys (whose id is
    /// not a port).
    #[inline(always)]
    pub(crate) fn translated(&self, dir: Dir) -> Option<Translated> {
        let (nat, snat) = match self.key {
            Key::SrcNatV4(ref nat) => (nat, true),
            Key::DstNatV4(ref nat) => (nat, false),
            _ => return None,
        };
        let alone = if snat {
            Status::SRC_NAT
        } else {
            Status::DST_NAT
        };
        let b = &nat.orig.0;
        if self.status & (Status::SRC_NAT | Status::DST_NAT) != alone
            || b[14] == crate::tuple::proto::ICMP
        {
            return None;
        }
        // One return (a merge of several returned structs cost a pack and unpack of
        // the fields). An original gets the translated endpoint (the source of SNAT,
        // the destination of DNAT); a reply goes back to the original's source (SNAT)
        // or comes from the original's destination (DNAT).
        let reply = dir == Dir::Reply;
        let le32 = |a: usize| u32::from_le_bytes([b[a], b[a + 1], b[a + 2], b[a + 3]]);
        let le16 = |a: usize| u16::from_le_bytes([b[a], b[a + 1]]);
        let (addr, port) = match (reply, snat) {
            (false, _) => (u32::from_le_bytes(nat.addr), u16::from_ne_bytes(nat.l4)),
            (true, true) => (le32(0), le16(8)),
            (true, false) => (le32(4), le16(10)),
        };
        Some(Translated {
            src: snat != reply,
            addr,
            port,
        })
    }
}

/// The endpoint that a packet of a connection translated at one endpoint gets written
/// (see [`Entry::translated`]): the source or the destination, and its address (the
/// little-endian word of the bytes as the frame holds them) and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Translated {
    /// The source is written (else the destination).
    pub(crate) src: bool,
    /// The address, as `u32::from_le_bytes` of its bytes in network order.
    pub(crate) addr: u32,
    /// The port.
    pub(crate) port: u16,
}

impl Translated {
    /// `self` with `src` set to a value the caller knows (a constant there).
    #[inline(always)]
    pub(crate) fn with_src(self, src: bool) -> Self {
        Self { src, ..self }
    }
}

/// What [`ConnTable::find_v4`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FoundV4 {
    /// The live connection, and the key's direction in it.
    Live(Slot, Dir),
    /// No connection has the key.
    Absent,
    /// Only [`ConnTable::lookup_hashed`] can tell.
    Unsure,
}

/// A reference to a slot of the table. It stays valid until the connection is removed;
/// pair it with [`Conn::id`] (see [`ConnTable::get_checked`]) when holding it across time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

impl Slot {
    #[inline]
    pub(crate) fn idx(self) -> usize {
        // u32 always fits in usize on the 32/64-bit targets this crate supports.
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

/// Why a connection left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoveReason {
    /// Its timeout passed.
    Expired,
    /// Early drop made room for a new connection.
    EarlyDrop,
    /// The protocol closed it (TCP RST before a reply, reopen).
    Closed,
    /// Deleted by the operator or the agent.
    Deleted,
}

/// An event for the agent's event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A connection entered the table.
    New {
        /// Connection id.
        id: u64,
        /// Original and reply tuples.
        tuples: [Tuple; 2],
    },
    /// A connection left the table; carries its final counters.
    Destroy {
        /// Connection id.
        id: u64,
        /// Original and reply tuples.
        tuples: [Tuple; 2],
        /// Final per-direction counters.
        counters: [Counter; 2],
        /// Why it left.
        reason: RemoveReason,
        /// Its status bits at the end.
        status: Status,
    },
}

/// Why an insert failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// A live connection already owns this tuple.
    #[error("tuple {tuple} is already tracked ({dir:?} direction of connection {id})")]
    Clash {
        /// The clashing tuple.
        tuple: Tuple,
        /// Which of the new connection's tuples clashed.
        dir: Dir,
        /// The existing connection.
        id: u64,
    },
    /// The table is at its limit and early drop found nothing to evict.
    #[error("connection table full ({max} entries), early drop found no unassured entry")]
    TableFull {
        /// The configured maximum.
        max: usize,
    },
}

/// Table counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Connections inserted.
    pub inserted: u64,
    /// Inserts refused by a tuple clash.
    pub insert_clash: u64,
    /// Inserts refused because the table was full.
    pub insert_full: u64,
    /// Entries removed by early drop.
    pub early_drop: u64,
    /// Entries expired (by GC or lazily on lookup).
    pub expired: u64,
    /// Entries deleted by the operator or the agent ([`RemoveReason::Deleted`]).
    pub deleted: u64,
    /// Events lost because the event queue was full.
    pub events_lost: u64,
}

const EMPTY: u32 = u32::MAX;
/// Room reserved for [`ConnTable::take_nat_released`]'s queue: more than one packet's
/// removals (a lookup reaps one, early drop at most 8 groups of 8).
const NAT_RELEASED_RESERVE: usize = 128;
/// Index cells [`ConnTable::prefetch`] looks at, at most, for the first whose tag
/// matches (the cells of other connections that hashed nearby come first in about
/// half of the lookups at load 1/2).
const PREFETCH_PROBE: usize = 8;
/// Early drop walks this many groups of index slots ...
const EARLY_DROP_GROUPS: usize = 8;
/// ... of this many slots each (Linux: 8 hash buckets).
const EARLY_DROP_GROUP_SLOTS: usize = 8;

/// The two tuples of a connection being inserted.
#[derive(Debug, Clone, Copy)]
enum NewTuples {
    /// Original and reply, any family, translated or not.
    Tuples([Tuple; 2]),
    /// An untranslated IPv4 connection: its original and reply (the original's
    /// inverse) packed. No [`Tuple`] is built unless one is needed (early drop, the
    /// event when it is drained).
    PlainV4([PackedV4; 2]),
    /// An IPv4 connection whose reply's destination is translated (SNAT), packed: the
    /// original, and the reply (the original's inverse but for its destination
    /// address and port, as [`Key::compact`] finds it).
    SrcNatV4([PackedV4; 2]),
}

impl NewTuples {
    /// The original tuple.
    fn orig(&self) -> Tuple {
        match self {
            NewTuples::Tuples([orig, _]) => *orig,
            NewTuples::PlainV4([orig, _]) | NewTuples::SrcNatV4([orig, _]) => orig.unpack(),
        }
    }
}

/// The layout of a 32-bit index cell: `tag | slot << 1 | dir`, where the slot takes
/// as many bits as the table's size needs and the tag is the top bits of the hash's
/// upper half that remain (11 bits for a million connections), so that a probe rarely
/// reads an entry that does not match. A cell is never all ones ([`EMPTY`]): the
/// slot's bits can hold one more value than the table has slots.
#[derive(Debug, Clone, Copy)]
struct Cells {
    /// The tag's bits in place (none for a table of 2^30 slots).
    tag_mask: u32,
}

impl Cells {
    /// The layout for a table of `max` slots (at most 2^30).
    fn for_slots(max: usize) -> Self {
        let slot_bits = usize::BITS - max.leading_zeros();
        let tag_shift = slot_bits + 1;
        Self {
            tag_mask: u32::MAX.checked_shl(tag_shift).unwrap_or(0),
        }
    }

    #[inline]
    fn tag(self, hash: u64) -> u32 {
        // The upper half of the hash (the index position uses the lower bits).
        let hi = u32::try_from(hash >> 32).unwrap_or(u32::MAX);
        hi & self.tag_mask
    }

    #[inline]
    fn pack(self, hash: u64, slot: Slot, dir: Dir) -> u32 {
        self.tag(hash) | (slot.0 << 1) | u32::from(dir as u8)
    }

    #[inline]
    fn unpack(self, v: u32) -> (u32, Slot, Dir) {
        let dir = if v & 1 == 1 {
            Dir::Reply
        } else {
            Dir::Original
        };
        let below = !self.tag_mask;
        (v & self.tag_mask, Slot((v & below) >> 1), dir)
    }
}

/// The connection table of one worker. See the module documentation.
#[derive(Debug)]
pub struct ConnTable<P> {
    hasher: TupleHasher,
    /// The index cells: huge pages when asked for and large enough ([`pages`]).
    index: PageArray<u32>,
    cells: Cells,
    mask: usize,
    entries: Vec<Option<Entry<P>>>,
    /// Both tuples of the entries whose key is [`Key::Side`].
    side: SlotStore<[Tuple; 2]>,
    /// The [`Meta`] of the entries whose key has no room for it (translated IPv4).
    spilled: SlotStore<Meta>,
    /// The high parts of the counters of the entries marked `wide`.
    wide: SlotStore<[Counter; 2]>,
    links: Vec<SlotLinks>,
    /// The slots without an entry, listed in their `links`.
    free: FreeSlots,
    count: usize,
    max: usize,
    /// Connections admitted at most (`nf_conntrack_max`): at most `max`, the allocated
    /// size; lowered or raised at run time by [`ConnTable::set_limit`].
    limit: usize,
    wheel: TimerWheel,
    events: EventQueue,
    stats: TableStats,
    /// Reused by `gc` so that it allocates nothing.
    scratch: Vec<u32>,
    /// Tuples and status of removed connections that carried NAT bits, until
    /// [`ConnTable::take_nat_released`] hands them to the NAT engine.
    nat_released: Vec<([Tuple; 2], Status)>,
}

impl<P> ConnTable<P> {
    /// A table for at most `max` connections (at least 1), with a hash seed and room for
    /// `events_cap` undrained events, its index in huge pages when the kernel gives
    /// them ([`Memory::HugePages`]). Everything is allocated here, once.
    #[must_use]
    pub fn new(max: usize, seed: u64, events_cap: usize) -> Self {
        Self::with_memory(max, seed, events_cap, Memory::HugePages)
    }

    /// [`ConnTable::new`] with the index's memory chosen by `memory`.
    #[must_use]
    pub fn with_memory(max: usize, seed: u64, events_cap: usize, memory: Memory) -> Self {
        let max = max.clamp(1, 1 << 30);
        // Two index entries per connection, load factor at most 1/2.
        let index_len = (max * 4).next_power_of_two();
        let mut entries = Vec::with_capacity(max);
        entries.resize_with(max, || None);
        let mut links = vec![SlotLinks::default(); max];
        let free = FreeSlots::all(&mut links);
        Self {
            hasher: TupleHasher::new(seed),
            index: PageArray::new(index_len, EMPTY, memory),
            cells: Cells::for_slots(max),
            mask: index_len - 1,
            entries,
            side: SlotStore::new(max),
            spilled: SlotStore::new(max),
            wide: SlotStore::new(max),
            links,
            free,
            count: 0,
            max,
            limit: max,
            wheel: TimerWheel::new(),
            events: EventQueue::new(events_cap),
            stats: TableStats::default(),
            scratch: Vec::new(),
            nat_released: Vec::with_capacity(NAT_RELEASED_RESERVE),
        }
    }

    /// Live (not yet reaped) connections.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the table holds no connection.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The number of connections the table was allocated for (the most
    /// [`ConnTable::set_limit`] can admit).
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// The number of connections admitted at most now (`nf_conntrack_max`).
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Change the admission limit, like writing `nf_conntrack_max`: clamped to
    /// `1..=capacity()`; returns the limit now in force. Nothing is evicted when the
    /// limit falls below [`ConnTable::len`]: a new connection then early-drops one
    /// unassured entry or is refused ([`InsertError::TableFull`]), until the count is
    /// under the limit again.
    pub fn set_limit(&mut self, limit: usize) -> usize {
        self.limit = limit.clamp(1, self.max);
        self.limit
    }

    /// Table counters.
    #[must_use]
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// The hasher (for worker steering with [`TupleHasher::symmetric_hash`]).
    #[must_use]
    pub fn hasher(&self) -> &TupleHasher {
        &self.hasher
    }

    /// Bytes of memory the table holds per connection it can hold: every allocation it
    /// makes ([`ConnTable::heap_bytes`]) divided by the maximum number of connections,
    /// rounded up.
    #[must_use]
    pub fn bytes_per_connection(&self) -> usize {
        self.heap_bytes().div_ceil(self.max)
    }

    /// Bytes of memory the table holds: every allocation it makes (index, entries, side
    /// stores of tuples and counter high parts, timer links (which hold the free list)
    /// and wheel, event queue, GC scratch, NAT release queue), by capacity.
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        let index = self.index.heap_bytes();
        let entries = self.entries.capacity() * size_of::<Option<Entry<P>>>();
        let side = self.side.heap_bytes() + self.spilled.heap_bytes() + self.wide.heap_bytes();
        let links = self.links.capacity() * size_of::<SlotLinks>();
        let events = self.events.heap_bytes();
        let scratch = self.scratch.capacity() * size_of::<u32>();
        let wheel = self.wheel.heap_bytes();
        let released = self.nat_released.capacity() * size_of::<([Tuple; 2], Status)>();
        index + entries + side + links + events + scratch + wheel + released
    }

    /// The table's hash of `tuple`, for [`ConnTable::lookup_hashed`] and
    /// [`ConnTable::prefetch`].
    #[inline]
    #[must_use]
    pub fn hash(&self, tuple: &Tuple) -> u64 {
        self.hasher.pair_hash(tuple)
    }

    /// Batch helper, first step: prefetch the index cell where the lookup of a tuple
    /// with hash `hash` starts, so that it is in cache for
    /// [`ConnTable::prefetch_entry`] (a hint: nothing waits for the line).
    #[inline]
    pub fn prefetch_index(&self, hash: u64) {
        if let Some(cell) = self.index.get(self.pos(hash)) {
            prefetch(cell);
        }
    }

    /// Batch helper, second step: prefetch the connection that the first index cell
    /// of `hash`'s probe run with a matching hash tag points to, looking at most
    /// `PREFETCH_PROBE` cells from the start (a hint: the tuple is not compared and
    /// the timeout not checked), so that it is in cache when
    /// [`ConnTable::lookup_hashed`] runs. Reads the index cells (prefetched by
    /// [`ConnTable::prefetch_index`]); returns whether a candidate was found.
    #[inline]
    pub fn prefetch_entry(&self, hash: u64) -> bool {
        let tag = self.cells.tag(hash);
        let mut pos = self.pos(hash);
        let index: &[u32] = &self.index;
        for _ in 0..PREFETCH_PROBE {
            let Some(&v) = index.get(pos) else {
                return false;
            };
            if v == EMPTY {
                return false;
            }
            let (vtag, slot, _) = self.cells.unpack(v);
            if vtag == tag {
                return match self.entries.get(slot.idx()) {
                    Some(e) => {
                        prefetch(e);
                        true
                    }
                    None => false,
                };
            }
            pos = (pos + 1) & self.mask;
        }
        false
    }

    /// Find the live connection owning `tuple`, and the direction `tuple` is. An expired
    /// connection found on the way is reaped (with its Destroy event) and not returned.
    #[inline]
    pub fn lookup(&mut self, tuple: &Tuple, now: u64) -> Option<(Slot, Dir)> {
        let h = self.hash(tuple);
        self.lookup_hashed(tuple, h, now)
    }

    /// [`ConnTable::lookup`] with the tuple's hash already computed by
    /// [`ConnTable::hash`] (a wrong hash finds nothing).
    #[inline]
    pub fn lookup_hashed(&mut self, tuple: &Tuple, hash: u64, now: u64) -> Option<(Slot, Dir)> {
        let (slot, dir) = self.find(tuple, hash)?;
        if self.entry(slot).is_some_and(|c| c.expired(now)) {
            self.stats.expired += 1;
            self.remove(slot, RemoveReason::Expired);
            return None;
        }
        Some((slot, dir))
    }

    /// Find the connection owning `tuple` (whose hash is `h`) without looking at its
    /// timeout.
    #[inline]
    fn find(&self, tuple: &Tuple, h: u64) -> Option<(Slot, Dir)> {
        let tag = self.cells.tag(h);
        let probe = Probe::new(tuple);
        let mut pos = self.pos(h);
        let index: &[u32] = &self.index;
        loop {
            let v = index[pos];
            if v == EMPTY {
                return None;
            }
            let (vtag, slot, dir) = self.cells.unpack(v);
            if vtag == tag && self.is_tuple(slot, dir, &probe) {
                return Some((slot, dir));
            }
            pos = (pos + 1) & self.mask;
        }
    }

    /// The established path's lookup of the IPv4 key `key` (hashed to `hash` by
    /// [`TupleHasher::pair_hash_v4`]), compared as two words with each candidate's
    /// tuple of the cell's direction ([`Key::packed`]: untranslated, or translated at
    /// one endpoint). Reads only. [`FoundV4::Live`] and [`FoundV4::Absent`] are what
    /// [`ConnTable::lookup_hashed`] of the key's tuple would return (a live
    /// connection, or nothing with nothing reaped); [`FoundV4::Unsure`] leaves the
    /// decision to it: an expired connection (which it reaps), or a candidate whose
    /// tuples are aside ([`Key::Side`]: IPv6, both endpoints translated).
    #[inline(always)]
    pub(crate) fn find_v4(&self, key: PackedV4, hash: u64, now: u64) -> FoundV4 {
        let tag = self.cells.tag(hash);
        let mut pos = self.pos(hash);
        let index: &[u32] = &self.index;
        let words = OrigWords::of(key);
        loop {
            let Some(&v) = index.get(pos) else {
                return FoundV4::Unsure;
            };
            if v == EMPTY {
                return FoundV4::Absent;
            }
            let (vtag, slot, dir) = self.cells.unpack(v);
            if vtag == tag {
                let Some(e) = self.entry(slot) else {
                    return FoundV4::Unsure;
                };
                // The cell's direction of the connection, as words: an untranslated
                // reply is the inverse of the original, a translated one the original
                // with one endpoint replaced. Tuples kept aside (IPv6, both endpoints
                // translated): only the general lookup can tell.
                // The original direction compares the stored bytes as they are (the
                // packed tuple is built only for a reply).
                let hit = match (&e.key, dir) {
                    (Key::V4 { orig, .. }, Dir::Original) => orig.is(words),
                    (k, _) => {
                        let Some(stored) = k.packed(dir) else {
                            return FoundV4::Unsure;
                        };
                        stored == key
                    }
                };
                if hit {
                    return if e.expired(now) {
                        FoundV4::Unsure
                    } else {
                        FoundV4::Live(slot, dir)
                    };
                }
            }
            pos = (pos + 1) & self.mask;
        }
    }

    #[inline]
    fn pos(&self, hash: u64) -> usize {
        // Only the low bits are used, masked to the index length.
        usize::try_from(hash & u64::try_from(self.mask).unwrap_or(u64::MAX)).unwrap_or(0)
    }

    /// Whether the probe's tuple is the `dir` tuple of the connection in `slot`.
    #[inline]
    fn is_tuple(&self, slot: Slot, dir: Dir, probe: &Probe<'_>) -> bool {
        let Some(e) = self.entry(slot) else {
            return false;
        };
        match e.key.matches(probe, dir) {
            Some(m) => m,
            None => self
                .side
                .get(slot)
                .is_some_and(|t| t[dir.index()] == *probe.tuple),
        }
    }

    /// The [`Meta`] of the entry `e` in `slot`: in its key, or spilled.
    #[inline]
    fn meta(&self, slot: Slot, e: &Entry<P>) -> Meta {
        e.key
            .meta()
            .or_else(|| self.spilled.get(slot).copied())
            .unwrap_or_default()
    }

    /// The stored entry in `slot` (no tuples: see [`ConnTable::tuples`]).
    #[inline]
    #[must_use]
    pub fn entry(&self, slot: Slot) -> Option<&Entry<P>> {
        self.entries.get(slot.idx()).and_then(Option::as_ref)
    }

    /// The original and reply tuples of the connection in `slot`.
    #[inline]
    #[must_use]
    pub fn tuples(&self, slot: Slot) -> Option<[Tuple; 2]> {
        let e = self.entry(slot)?;
        e.key.tuples().or_else(|| self.side.get(slot).copied())
    }

    /// The tuple of direction `dir` of the connection in `slot`. Inlined: the NAT
    /// rewrite of every translated packet reads the other direction's tuple here, and
    /// uses only its addresses and ports.
    #[inline(always)]
    #[must_use]
    pub fn tuple(&self, slot: Slot, dir: Dir) -> Option<Tuple> {
        let e = self.entry(slot)?;
        e.key
            .tuple(dir)
            .or_else(|| self.side.get(slot).map(|t| t[dir.index()]))
    }

    /// A copy of the connection in `slot`, tuples included.
    #[inline]
    #[must_use]
    pub fn get(&self, slot: Slot) -> Option<Conn<P>>
    where
        P: Clone,
    {
        let e = self.entry(slot)?;
        Some(Conn {
            tuples: self.tuples(slot)?,
            status: e.status,
            timeout: e.timeout,
            counters: self.counters(slot)?,
            proto: e.proto.clone(),
            id: conn_id(slot, self.meta(slot, e).generation()),
        })
    }

    /// The per-direction packet and byte counters of the connection in `slot`.
    #[inline]
    #[must_use]
    pub fn counters(&self, slot: Slot) -> Option<[Counter; 2]> {
        let e = self.entry(slot)?;
        let high = if self.meta(slot, e).wide {
            self.wide.get(slot).copied().unwrap_or_default()
        } else {
            [Counter::default(); 2]
        };
        Some([0, 1].map(|d| {
            Counter {
                packets: high[d]
                    .packets
                    .saturating_add(u64::from(e.counters[d].packets)),
                bytes: high[d].bytes.saturating_add(u64::from(e.counters[d].bytes)),
            }
        }))
    }

    /// Add `packets` and `bytes` to direction `dir` of the connection in `slot`
    /// (saturating at `u64::MAX`). The first count of an entry that passes 2^32 - 1
    /// stores its high parts aside (allocating a chunk of the side store if it is the
    /// first such entry of the chunk's slots).
    #[inline]
    pub fn count(&mut self, slot: Slot, dir: Dir, packets: u64, bytes: u64) {
        let Some(e) = self.entries.get_mut(slot.idx()).and_then(Option::as_mut) else {
            return;
        };
        if e.count_low(dir, packets, bytes) {
            return;
        }
        let lo = &mut e.counters[dir.index()];
        let p = u64::from(lo.packets).saturating_add(packets);
        let b = u64::from(lo.bytes).saturating_add(bytes);
        lo.packets = low32(p);
        lo.bytes = low32(b);
        let meta = match e.key.meta_mut() {
            Some(m) => m,
            None => match self.spilled.get_mut(slot) {
                Some(m) => m,
                None => return,
            },
        };
        if !meta.wide {
            meta.wide = true;
            self.wide.put(slot, [Counter::default(); 2]);
        }
        if let Some(high) = self.wide.get_mut(slot) {
            let h = &mut high[dir.index()];
            h.packets = h.packets.saturating_add(p & !0xFFFF_FFFF);
            h.bytes = h.bytes.saturating_add(b & !0xFFFF_FFFF);
        }
    }

    /// The connection in `slot`, mutable (its tuples do not change). Change its timeout
    /// with [`ConnTable::set_timeout`], not by writing the field, so the timer stays
    /// right.
    #[inline]
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Entry<P>> {
        self.entries.get_mut(slot.idx()).and_then(Option::as_mut)
    }

    /// The id of the connection in `slot`: its generation in the high 32 bits, the
    /// slot number in the low 32 ([`Conn::id`]).
    #[inline]
    #[must_use]
    pub fn id(&self, slot: Slot) -> Option<u64> {
        self.entry(slot)
            .map(|e| conn_id(slot, self.meta(slot, e).generation()))
    }

    /// The slot of the connection with `id`, if it is still in the table (a lookup, no
    /// search).
    #[must_use]
    pub fn find_id(&self, id: u64) -> Option<Slot> {
        let slot = Slot(low32(id));
        (self.id(slot) == Some(id)).then_some(slot)
    }

    /// A copy of the connection in `slot` if it is still the one with `id`.
    #[must_use]
    pub fn get_checked(&self, slot: Slot, id: u64) -> Option<Conn<P>>
    where
        P: Clone,
    {
        (self.id(slot) == Some(id)).then(|| self.get(slot))?
    }

    /// Set the absolute timeout of a connection.
    #[inline]
    pub fn set_timeout(&mut self, slot: Slot, timeout: u64) {
        let Some(conn) = self.entries.get_mut(slot.idx()).and_then(Option::as_mut) else {
            return;
        };
        // The wheel only needs to know when the entry must be looked at sooner than it
        // is scheduled; a later timeout is found when its current slot fires. The entry
        // is scheduled at or before its old timeout, so a timeout that does not move
        // earlier (every packet of an established flow) touches nothing else.
        if !conn.extend_timeout(timeout) {
            conn.timeout = timeout;
            self.wheel
                .reschedule_if_sooner(&mut self.links, slot.0, timeout);
        }
    }

    /// Insert a new connection with the given tuples and absolute timeout. Runs early
    /// drop when the table is full. A clash with a live entry is refused (the caller
    /// decides what Linux would: drop, or UDP clash resolution).
    pub fn insert(
        &mut self,
        orig: Tuple,
        reply: Tuple,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        let h = self.hash(&orig);
        self.insert_hashed(orig, h, reply, status, timeout, proto, now)
    }

    /// [`ConnTable::insert`] with the original tuple's hash already computed by
    /// [`ConnTable::hash`] (each tuple is hashed once on this path).
    #[allow(clippy::too_many_arguments)]
    pub fn insert_hashed(
        &mut self,
        orig: Tuple,
        orig_hash: u64,
        reply: Tuple,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        let reply_hash = self.hash(&reply);
        for (tuple, h, dir) in [
            (orig, orig_hash, Dir::Original),
            (reply, reply_hash, Dir::Reply),
        ] {
            if let Some((slot, _)) = self.lookup_hashed(&tuple, h, now) {
                return Err(self.clash(slot, tuple, dir));
            }
        }
        let tuples = NewTuples::Tuples([orig, reply]);
        self.insert_new(tuples, orig_hash, reply_hash, status, timeout, proto, now)
    }

    /// [`ConnTable::insert_hashed`] for a caller whose lookup of `orig` (with
    /// [`ConnTable::lookup_hashed`], which reaps an expired owner) has just missed, with
    /// nothing inserted since: only the reply tuple is checked for a clash (conntrack's
    /// create path without NAT). `reply_hash` is the reply tuple's
    /// [`ConnTable::hash`].
    #[allow(clippy::too_many_arguments)]
    pub fn insert_after_miss(
        &mut self,
        orig: Tuple,
        orig_hash: u64,
        reply: Tuple,
        reply_hash: u64,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        debug_assert!(self.find(&orig, orig_hash).is_none());
        debug_assert_eq!(reply_hash, self.hash(&reply));
        if let Some((slot, _)) = self.lookup_hashed(&reply, reply_hash, now) {
            return Err(self.clash(slot, reply, Dir::Reply));
        }
        let tuples = NewTuples::Tuples([orig, reply]);
        self.insert_new(tuples, orig_hash, reply_hash, status, timeout, proto, now)
    }

    /// [`ConnTable::insert_after_miss`] for an untranslated IPv4 connection: its
    /// original tuple packed, `key`, for which [`ConnTable::find_v4`] (hash `hash`)
    /// has just returned [`FoundV4::Absent`] with nothing inserted since, and its
    /// reply, `reply`, the key's [`PackedV4::invert`] (same hash). The reply's clash
    /// check compares words ([`ConnTable::find_v4`]; the general lookup only when that
    /// cannot tell), and the entry's key is the packed original as it is.
    pub(crate) fn insert_v4_after_miss(
        &mut self,
        key: PackedV4,
        reply: PackedV4,
        hash: u64,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        debug_assert_eq!(self.find_v4(key, hash, now), FoundV4::Absent);
        debug_assert_eq!(key.invert(), Some(reply));
        let clash = match self.find_v4(reply, hash, now) {
            FoundV4::Absent => None,
            FoundV4::Live(slot, _) => Some(slot),
            // An expired owner is reaped here, as by `insert_after_miss`.
            FoundV4::Unsure => self
                .lookup_hashed(&reply.unpack(), hash, now)
                .map(|(slot, _)| slot),
        };
        if let Some(slot) = clash {
            return Err(self.clash(slot, reply.unpack(), Dir::Reply));
        }
        let tuples = NewTuples::PlainV4([key, reply]);
        self.insert_new(tuples, hash, hash, Status::empty(), timeout, proto, now)
    }

    /// Counts an insert refused because `tuple` (direction `dir` of the new
    /// connection) belongs to the live connection in `slot`, and says so.
    fn clash(&mut self, slot: Slot, tuple: Tuple, dir: Dir) -> InsertError {
        self.stats.insert_clash += 1;
        let id = self.id(slot).unwrap_or(0);
        InsertError::Clash { tuple, dir, id }
    }

    /// [`ConnTable::insert_hashed`] for a caller that has just checked, in this same
    /// call and with nothing inserted since, that neither tuple is live in the table
    /// (conntrack's create path after a NAT decision: the original missed its lookup and
    /// every reply `decide` returns was reported free). It skips the two clash lookups;
    /// a clash it was promised not to find is still refused in debug builds.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_hashed_unchecked(
        &mut self,
        orig: Tuple,
        orig_hash: u64,
        reply: Tuple,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        debug_assert!(
            self.find(&orig, orig_hash)
                .is_none_or(|(s, _)| { self.entry(s).is_some_and(|c| c.expired(now)) })
        );
        debug_assert!(
            self.find(&reply, self.hash(&reply))
                .is_none_or(|(s, _)| { self.entry(s).is_some_and(|c| c.expired(now)) })
        );
        let reply_hash = self.hash(&reply);
        self.insert_hashed_unchecked_both(
            orig, orig_hash, reply, reply_hash, status, timeout, proto, now,
        )
    }

    /// [`ConnTable::insert_hashed_unchecked`] with the reply's hash known too
    /// (`reply_hash`: [`ConnTable::hash`] of `reply`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_hashed_unchecked_both(
        &mut self,
        orig: Tuple,
        orig_hash: u64,
        reply: Tuple,
        reply_hash: u64,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        debug_assert_eq!(reply_hash, self.hash(&reply));
        let tuples = NewTuples::Tuples([orig, reply]);
        self.insert_new(tuples, orig_hash, reply_hash, status, timeout, proto, now)
    }

    /// [`ConnTable::insert_hashed_unchecked_both`] of an IPv4 connection with packed
    /// original `key` (hash `hash`) and packed reply `reply` (hash `reply_hash`), the
    /// reply's destination translated when `status` has `SRC_NAT` and the original's
    /// inverse otherwise (a source NAT decision, [`NatEngine::decide_v4`]): the entry's
    /// key is built from the words, with no [`Tuple`].
    ///
    /// [`NatEngine::decide_v4`]: crate::nat::NatEngine::decide_v4
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_v4_unchecked(
        &mut self,
        key: PackedV4,
        hash: u64,
        reply: PackedV4,
        reply_hash: u64,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        debug_assert_eq!(reply_hash, self.hasher.pair_hash_v4(reply));
        let tuples = if status.contains(Status::SRC_NAT) {
            NewTuples::SrcNatV4([key, reply])
        } else {
            debug_assert_eq!(key.invert(), Some(reply));
            NewTuples::PlainV4([key, reply])
        };
        // The key the general insert would build.
        debug_assert_eq!(
            Key::compact(&key.unpack(), &reply.unpack(), 1),
            Some(match tuples {
                NewTuples::SrcNatV4(_) => {
                    let r = reply.unpack();
                    Key::SrcNatV4(NatV4 {
                        orig: V4Orig::from_packed(key),
                        addr: r.dst.as_v4(),
                        l4: r.dst_l4.to_ne_bytes(),
                    })
                }
                _ => Key::V4 {
                    orig: V4Orig::from_packed(key),
                    meta: Meta::new(1),
                },
            })
        );
        self.insert_new(tuples, hash, reply_hash, status, timeout, proto, now)
    }

    /// The part of an insert after the clash checks.
    #[allow(clippy::too_many_arguments)]
    fn insert_new(
        &mut self,
        tuples: NewTuples,
        orig_hash: u64,
        reply_hash: u64,
        status: Status,
        timeout: u64,
        proto: P,
        now: u64,
    ) -> Result<Slot, InsertError> {
        if self.count >= self.limit && !self.early_drop(&tuples.orig(), now) {
            self.stats.insert_full += 1;
            return Err(InsertError::TableFull { max: self.limit });
        }
        let Some((slot, freed_generation)) = self.free.pop(&self.links) else {
            self.stats.insert_full += 1;
            return Err(InsertError::TableFull { max: self.max });
        };
        // Generation 0 is never used, so no id is 0.
        let generation = freed_generation.checked_add(1).unwrap_or(1);
        let id = conn_id(slot, generation);
        let key = match tuples {
            // The reply is the original's inverse: nothing to compare.
            NewTuples::PlainV4([orig, _]) => Key::V4 {
                orig: V4Orig::from_packed(orig),
                meta: Meta::new(generation),
            },
            // The reply's destination: the high address word, the port in bits 16..32.
            NewTuples::SrcNatV4([orig, reply]) => {
                let (addrs, rest) = reply.words();
                let [_, _, p0, p1, ..] = rest.to_le_bytes();
                let [_, _, _, _, a0, a1, a2, a3] = addrs.to_le_bytes();
                Key::SrcNatV4(NatV4 {
                    orig: V4Orig::from_packed(orig),
                    addr: [a0, a1, a2, a3],
                    l4: u16::from_le_bytes([p0, p1]).to_ne_bytes(),
                })
            }
            NewTuples::Tuples([orig, reply]) => Key::compact(&orig, &reply, generation)
                .unwrap_or_else(|| {
                    self.side.put(slot, [orig, reply]);
                    Key::Side {
                        meta: Meta::new(generation),
                    }
                }),
        };
        if key.meta().is_none() {
            self.spilled.put(slot, Meta::new(generation));
        }
        self.entries[slot.idx()] = Some(Entry {
            key,
            status: status | Status::CONFIRMED,
            timeout,
            counters: [LowCounter::default(); 2],
            proto,
        });
        self.count += 1;
        let pos = self.index_insert(orig_hash, slot, Dir::Original, self.pos(orig_hash));
        // A reply with the same hash (no NAT) goes into the next free cell of the
        // same probe run: the walk goes on from the original's cell.
        let from = if reply_hash == orig_hash {
            (pos + 1) & self.mask
        } else {
            self.pos(reply_hash)
        };
        self.index_insert(reply_hash, slot, Dir::Reply, from);
        self.wheel.schedule(&mut self.links, slot.0, timeout, now);
        self.stats.inserted += 1;
        let queued = match tuples {
            NewTuples::PlainV4(packed) | NewTuples::SrcNatV4(packed) => {
                self.events.push_new_v4(id, packed)
            }
            NewTuples::Tuples(tuples) => self.events.push_event(Event::New { id, tuples }),
        };
        if !queued {
            self.stats.events_lost += 1;
        }
        Ok(slot)
    }

    /// Put the cell of `(slot, dir)` (hash `h`) into the first free index cell from
    /// `from` on (`h`'s home position, or a cell of its probe run with no free cell
    /// between the home and it); returns where it went.
    fn index_insert(&mut self, h: u64, slot: Slot, dir: Dir, from: usize) -> usize {
        let cell = self.cells.pack(h, slot, dir);
        let mask = self.mask;
        let mut pos = from;
        // The cells as a slice once (each access to the `PageArray` checks its view).
        let index: &mut [u32] = &mut self.index;
        while index[pos] != EMPTY {
            pos = (pos + 1) & mask;
        }
        index[pos] = cell;
        pos
    }

    fn index_remove(&mut self, tuple: &Tuple, slot: Slot, dir: Dir) {
        let h = self.hash(tuple);
        let want = self.cells.pack(h, slot, dir);
        let mut pos = self.pos(h);
        loop {
            let v = self.index[pos];
            if v == EMPTY {
                return; // not indexed: nothing to do
            }
            if v == want {
                break;
            }
            pos = (pos + 1) & self.mask;
        }
        // Backward-shift deletion: move later members of the probe run into the hole
        // when their home position does not lie cyclically in (hole, current].
        let mut hole = pos;
        let mut cur = (pos + 1) & self.mask;
        loop {
            let v = self.index[cur];
            if v == EMPTY {
                break;
            }
            let (_, s, d) = self.cells.unpack(v);
            let home = self.tuple(s, d).map_or(cur, |t| self.pos(self.hash(&t)));
            let dist_home = cur.wrapping_sub(home) & self.mask;
            let dist_hole = cur.wrapping_sub(hole) & self.mask;
            if dist_home >= dist_hole {
                self.index[hole] = v;
                hole = cur;
            }
            cur = (cur + 1) & self.mask;
        }
        self.index[hole] = EMPTY;
    }

    /// Remove a connection now, with a Destroy event. Returns it.
    pub fn remove(&mut self, slot: Slot, reason: RemoveReason) -> Option<Conn<P>> {
        // Unindex while the entry is still in place: backward-shift deletion reads the
        // tuple of every cell it may move to find its home, and the connection's other
        // cell is often right behind the first (same index hash without NAT).
        let tuples = self.tuples(slot)?;
        let counters = self.counters(slot)?;
        self.index_remove(&tuples[0], slot, Dir::Original);
        self.index_remove(&tuples[1], slot, Dir::Reply);
        let e = self.entries.get_mut(slot.idx())?.take()?;
        let generation = self.meta(slot, &e).generation();
        let conn = Conn {
            tuples,
            status: e.status,
            timeout: e.timeout,
            counters,
            proto: e.proto,
            id: conn_id(slot, generation),
        };
        self.wheel.unlink(&mut self.links, slot.0);
        self.free.push(&mut self.links, slot, generation);
        self.count -= 1;
        if reason == RemoveReason::Deleted {
            self.stats.deleted += 1;
        }
        if conn.status.intersects(Status::SRC_NAT | Status::DST_NAT) {
            self.nat_released.push((conn.tuples, conn.status));
        }
        self.push_event(Event::Destroy {
            id: conn.id,
            tuples: conn.tuples,
            counters: conn.counters,
            reason,
            status: conn.status | Status::DYING,
        });
        Some(conn)
    }

    /// Linux `early_drop`: see the module documentation. Returns whether room was made.
    fn early_drop(&mut self, tuple: &Tuple, now: u64) -> bool {
        let start = self.pos(self.hash(tuple));
        let mut victims = [Slot(0); EARLY_DROP_GROUP_SLOTS];
        for group in 0..EARLY_DROP_GROUPS {
            let mut n = 0;
            for i in 0..EARLY_DROP_GROUP_SLOTS {
                let pos = (start + group * EARLY_DROP_GROUP_SLOTS + i) & self.mask;
                let v = self.index[pos];
                if v == EMPTY {
                    continue;
                }
                let (_, slot, _) = self.cells.unpack(v);
                if victims[..n].contains(&slot) {
                    continue;
                }
                // An offloaded connection is never taken, expired or not: a fast path
                // (the NIC) may still use it and its NAT binding, and only its owner
                // removes it, after the fast path has let go (design invariant 2;
                // Linux `early_drop_list` skips IPS_OFFLOAD too).
                if self.entry(slot).is_some_and(|c| {
                    !c.status.intersects(Status::OFFLOAD | Status::HW_OFFLOAD)
                        && (c.expired(now) || !c.status.contains(Status::ASSURED))
                }) {
                    victims[n] = slot;
                    n += 1;
                }
            }
            let mut dropped = 0;
            for &slot in &victims[..n] {
                let expired = self.entry(slot).is_some_and(|c| c.expired(now));
                if expired {
                    self.stats.expired += 1;
                    self.remove(slot, RemoveReason::Expired);
                } else {
                    self.stats.early_drop += 1;
                    self.remove(slot, RemoveReason::EarlyDrop);
                    dropped += 1;
                }
            }
            // Expired entries reaped on the way make room but do not count (Linux).
            if dropped > 0 || self.count < self.limit {
                return true;
            }
        }
        false
    }

    /// Reap expired connections, visiting at most `budget` timer entries. Returns the
    /// number of connections removed. Cost is proportional to the entries whose timer
    /// fires, not to the table size.
    pub fn gc(&mut self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        let entries = &self.entries;
        let mut expired = std::mem::take(&mut self.scratch);
        self.wheel.advance(
            &mut self.links,
            now,
            budget,
            |raw| {
                let idx = usize::try_from(raw).unwrap_or(usize::MAX);
                entries.get(idx).and_then(Option::as_ref).map(|c| c.timeout)
            },
            |raw| expired.push(raw),
        );
        for &raw in &expired {
            self.stats.expired += 1;
            if self.remove(Slot(raw), RemoveReason::Expired).is_some() {
                removed += 1;
            }
        }
        expired.clear();
        self.scratch = expired;
        removed
    }

    /// Whether removed connections with NAT bits wait for
    /// [`ConnTable::take_nat_released`].
    #[inline]
    #[must_use]
    pub fn has_nat_released(&self) -> bool {
        !self.nat_released.is_empty()
    }

    /// Hands every connection removed since the last call whose status had `SRC_NAT` or
    /// `DST_NAT` (any reason: expiry, early drop, close, delete) to `f`, with its tuples
    /// and status, once. The queue keeps its memory.
    pub fn take_nat_released(&mut self, mut f: impl FnMut(&[Tuple; 2], Status)) {
        for (tuples, status) in self.nat_released.drain(..) {
            f(&tuples, status);
        }
    }

    /// Take the queued events.
    pub fn drain_events(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = Event> + ExactSizeIterator + '_ {
        self.events.drain()
    }

    fn push_event(&mut self, ev: Event) {
        if !self.events.push_event(ev) {
            self.stats.events_lost += 1;
        }
    }

    /// Iterate over live (not expired at `now`) connections.
    /// Each item is a copy of the connection (see [`ConnTable::get`]).
    pub fn iter(&self, now: u64) -> impl Iterator<Item = (Slot, Conn<P>)>
    where
        P: Clone,
    {
        self.entries.iter().enumerate().filter_map(move |(i, e)| {
            if e.as_ref()?.expired(now) {
                return None;
            }
            let slot = Slot(u32::try_from(i).ok()?);
            Some((slot, self.get(slot)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuple::{Addr, Family, proto};
    use proptest::prelude::*;
    use std::collections::HashMap;

    const S: u64 = 1_000_000_000;

    fn t(i: u32) -> Tuple {
        let b = i.to_be_bytes();
        Tuple {
            src: Addr::v4([10, b[1], b[2], b[3]]),
            dst: Addr::v4([192, 0, 2, 1]),
            src_l4: 1024 + u16::try_from(i % 60000).unwrap_or(0),
            dst_l4: 53,
            proto: proto::UDP,
            family: Family::V4,
            zone: 0,
        }
    }

    fn inv(t: &Tuple) -> Tuple {
        t.invert().expect("udp inverts")
    }

    /// The reply of `t` SNATed to 203.0.113.1:`port`.
    fn snat(t: &Tuple, port: u16) -> Tuple {
        let mut r = inv(t);
        r.dst = Addr::v4([203, 0, 113, 1]);
        if r.is_icmp() {
            r.src_l4 = port;
        } else {
            r.dst_l4 = port;
        }
        r
    }

    #[test]
    fn both_directions_find_the_connection() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        let a = t(1);
        let slot = tab
            .insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
            .expect("room");
        assert_eq!(tab.lookup(&a, S), Some((slot, Dir::Original)));
        assert_eq!(tab.lookup(&inv(&a), S), Some((slot, Dir::Reply)));
        assert_eq!(tab.lookup(&t(2), S), None);
        let c = tab.get(slot).expect("live");
        assert!(c.status.contains(Status::CONFIRMED));
        assert_eq!(c.id, 1 << 32, "generation 1 of slot 0");
        assert_eq!(tab.id(slot), Some(c.id));
        assert_eq!(tab.find_id(c.id), Some(slot));
    }

    #[test]
    fn a_large_index_in_huge_pages_works_like_a_plain_one() {
        // 2^17 connections: an index of 2^19 cells, 2 MiB, one huge page.
        let max = 1 << 17;
        let mut tabs: [ConnTable<()>; 2] = [
            ConnTable::new(max, 1, 64),
            ConnTable::with_memory(max, 1, 64, Memory::Plain),
        ];
        assert_eq!(tabs[0].index.is_mapped(), cfg!(target_os = "linux"));
        assert!(!tabs[1].index.is_mapped());
        assert_eq!(tabs[0].index.len(), tabs[1].index.len());
        for tab in &mut tabs {
            let slots: Vec<Slot> = (0..1000)
                .map(|i| {
                    let a = t(i);
                    tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
                        .expect("room")
                })
                .collect();
            for (i, &slot) in (0..1000).zip(&slots) {
                assert_eq!(tab.lookup(&t(i), S), Some((slot, Dir::Original)));
                assert_eq!(tab.lookup(&inv(&t(i)), S), Some((slot, Dir::Reply)));
            }
            assert_eq!(tab.lookup(&t(1000), S), None);
            tab.remove(slots[7], RemoveReason::Deleted);
            assert_eq!(tab.lookup(&t(7), S), None);
        }
        // The same cells in both.
        assert!(tabs[0].index.iter().eq(tabs[1].index.iter()));
    }

    #[test]
    fn translated_and_ipv6_tuples_live_in_the_side_store() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        let empty = tab.heap_bytes();
        let a = t(1);
        let s = tab
            .insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
            .expect("room");
        assert!(!tab.entry(s).expect("live").tuples_aside());
        assert_eq!(
            tab.heap_bytes(),
            empty,
            "a plain IPv4 connection allocates nothing"
        );
        // SNAT: the reply goes to the translated address and port. The entry holds
        // both tuples; only its generation and wide flag are spilled (5 bytes a slot).
        let b = t(2);
        let r = snat(&b, 40_000);
        let sn = tab
            .insert(b, r, Status::SRC_NAT, 30 * S, (), 0)
            .expect("room");
        assert!(!tab.entry(sn).expect("live").tuples_aside());
        assert_eq!(
            tab.heap_bytes(),
            empty + side::CHUNK * size_of::<Meta>(),
            "only the spilled store took a chunk"
        );
        assert_eq!(tab.tuples(sn), Some([b, r]));
        assert_eq!(tab.lookup(&b, S), Some((sn, Dir::Original)));
        assert_eq!(tab.lookup(&r, S), Some((sn, Dir::Reply)));
        assert_eq!(
            tab.lookup(&inv(&b), S),
            None,
            "untranslated reply not tracked"
        );
        // IPv6.
        let mut v6 = t(3);
        v6.family = Family::V6;
        v6.src = Addr::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        v6.dst = Addr::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let s6 = tab
            .insert(v6, inv(&v6), Status::empty(), 30 * S, (), 0)
            .expect("room");
        assert!(tab.entry(s6).expect("live").tuples_aside());
        assert_eq!(tab.lookup(&inv(&v6), S), Some((s6, Dir::Reply)));
        assert_eq!(tab.get(s6).expect("live").tuples, [v6, inv(&v6)]);
        // Both endpoints translated (full NAT): aside.
        let c = t(4);
        let mut full = snat(&c, 40_001);
        full.src = Addr::v4([10, 9, 9, 9]);
        full.src_l4 = 8080;
        let sf = tab
            .insert(c, full, Status::SRC_NAT | Status::DST_NAT, 30 * S, (), 0)
            .expect("room");
        assert!(tab.entry(sf).expect("live").tuples_aside());
        assert_eq!(tab.lookup(&full, S), Some((sf, Dir::Reply)));
        // Removal hands back the tuples, from the entry or from aside.
        let gone = tab.remove(sn, RemoveReason::Deleted).expect("live");
        assert_eq!(gone.tuples, [b, r]);
        assert_eq!(tab.lookup(&r, S), None);
        assert_eq!(tab.lookup(&a, S), Some((s, Dir::Original)));
        let gone = tab.remove(sf, RemoveReason::Deleted).expect("live");
        assert_eq!(gone.tuples, [c, full]);
        // Deletes are counted apart from protocol closes (the XDP offload watches them).
        assert_eq!(tab.stats().deleted, 2);
        tab.remove(s, RemoveReason::Closed).expect("live");
        assert_eq!(tab.stats().deleted, 2);
    }

    /// The established lookup's compare of an original tuple (two overlapping words of
    /// the 15 stored bytes): equal words match, and a single bit off anywhere in the
    /// stored bytes does not.
    #[test]
    fn original_bytes_compare_as_two_words() {
        let p = t(1).pack_v4().expect("v4");
        let stored = V4Orig::from_packed(p);
        assert!(stored.is(OrigWords::of(p)));
        let (addrs, rest) = p.words();
        let mut off = (0..64)
            .map(|b| PackedV4::from_words(addrs ^ 1 << b, rest))
            .chain((0..56).map(|b| PackedV4::from_words(addrs, rest ^ 1 << b)));
        assert!(off.all(|q| q != p && !stored.is(OrigWords::of(q))));
    }

    #[test]
    fn translated_ipv4_keys_match_exactly_their_two_tuples() {
        let mut tab: ConnTable<()> = ConnTable::new(64, 1, 256);
        // SNAT of UDP and of an ICMP echo (the id is the translated "port"), DNAT of
        // UDP and of an ICMP echo.
        let udp = t(1);
        let echo = Tuple {
            src: Addr::v4([10, 0, 0, 7]),
            dst: Addr::v4([192, 0, 2, 1]),
            src_l4: 0x1234,
            dst_l4: u16::from_be_bytes([8, 0]),
            proto: proto::ICMP,
            family: Family::V4,
            zone: 3,
        };
        let dnat = |o: &Tuple, port: u16| {
            let mut r = inv(o);
            r.src = Addr::v4([10, 1, 1, 1]);
            r.src_l4 = port;
            r
        };
        let cases = [
            (udp, snat(&udp, 20_000), Status::SRC_NAT),
            (echo, snat(&echo, 0x4321), Status::SRC_NAT),
            (t(2), dnat(&t(2), 8080), Status::DST_NAT),
            (
                Tuple { zone: 4, ..echo },
                dnat(&Tuple { zone: 4, ..echo }, 0x9999),
                Status::DST_NAT,
            ),
        ];
        let h =
            |tab: &ConnTable<()>, t: &Tuple| tab.hasher().pair_hash_v4(t.pack_v4().expect("v4"));
        for (o, r, status) in cases {
            let slot = tab.insert(o, r, status, 30 * S, (), 0).expect("room");
            let e = tab.entry(slot).expect("live");
            assert!(!e.tuples_aside(), "{o} -> {r} fits the entry");
            assert_eq!(tab.tuples(slot), Some([o, r]));
            assert_eq!(e.packed_tuple(Dir::Original), o.pack_v4());
            assert_eq!(e.packed_tuple(Dir::Reply), r.pack_v4(), "{r} packed");
            // The endpoint the NAT rewrite writes: the one where a packet of each
            // direction differs from the other direction's inverse (none for ICMP).
            let translated = |dir: Dir| {
                let (pkt, other) = if dir == Dir::Original { (o, r) } else { (r, o) };
                let want = other.invert().expect("inverts");
                let src = pkt.src != want.src || pkt.src_l4 != want.src_l4;
                let (a, p) = if src {
                    (want.src, want.src_l4)
                } else {
                    (want.dst, want.dst_l4)
                };
                Translated {
                    src,
                    addr: u32::from_le_bytes(a.as_v4()),
                    port: p,
                }
            };
            for dir in [Dir::Original, Dir::Reply] {
                let want = (!o.is_icmp()).then(|| translated(dir));
                assert_eq!(e.translated(dir), want, "{o} -> {r}, {dir:?}");
            }
            assert_eq!(tab.lookup(&o, S), Some((slot, Dir::Original)));
            assert_eq!(tab.lookup(&r, S), Some((slot, Dir::Reply)));
            // Neither the untranslated reply nor one field off is this connection.
            assert_eq!(tab.lookup(&inv(&o), S), None);
            for off in [
                Tuple {
                    src_l4: r.src_l4 ^ 1,
                    ..r
                },
                Tuple {
                    dst_l4: r.dst_l4 ^ 1,
                    ..r
                },
                Tuple {
                    src: Addr::v4([1, 2, 3, 4]),
                    ..r
                },
                Tuple {
                    dst: Addr::v4([1, 2, 3, 4]),
                    ..r
                },
                Tuple { zone: 9, ..r },
                Tuple {
                    proto: proto::TCP,
                    ..r
                },
            ] {
                assert_eq!(tab.lookup(&off, S), None, "{off} is not {r}");
                // The established path's two-word compare, probed from the reply's own
                // cell (same hash, same tag): the candidate must be rejected.
                if let Some(k) = off.pack_v4() {
                    assert_eq!(tab.find_v4(k, h(&tab, &r), S), FoundV4::Absent, "{off}");
                }
            }
            assert_eq!(
                tab.find_v4(o.pack_v4().expect("v4"), h(&tab, &o), S),
                FoundV4::Live(slot, Dir::Original)
            );
            assert_eq!(
                tab.find_v4(r.pack_v4().expect("v4"), h(&tab, &r), S),
                FoundV4::Live(slot, Dir::Reply)
            );
            let id = tab.id(slot).expect("live");
            assert_eq!(tab.find_id(id), Some(slot));
            assert_eq!(tab.get(slot).expect("live").id, id);
        }
        assert_eq!(size_of::<Key>(), 22, "key and status fill 24 bytes");
        // An untranslated entry, or one whose status bits say otherwise than its key
        // (both endpoints), has no endpoint to write from the key.
        let plain = tab
            .insert(t(9), inv(&t(9)), Status::SRC_NAT, 30 * S, (), 0)
            .expect("room");
        let (o, r) = (t(10), snat(&t(10), 20_001));
        let both = tab
            .insert(o, r, Status::SRC_NAT | Status::DST_NAT, 30 * S, (), 0)
            .expect("room");
        for slot in [plain, both] {
            let e = tab.entry(slot).expect("live");
            assert_eq!(e.translated(Dir::Original), None);
            assert_eq!(e.translated(Dir::Reply), None);
        }
    }

    #[test]
    fn compact_keys_find_icmp_replies_and_respect_zones() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        let echo = Tuple {
            src: Addr::v4([10, 0, 0, 1]),
            dst: Addr::v4([192, 0, 2, 1]),
            src_l4: 7,
            dst_l4: u16::from_be_bytes([8, 0]),
            proto: proto::ICMP,
            family: Family::V4,
            zone: 3,
        };
        let reply = inv(&echo);
        assert_eq!(reply.icmp_type(), 0);
        let s = tab
            .insert(echo, reply, Status::empty(), 30 * S, (), 0)
            .expect("room");
        assert!(!tab.entry(s).expect("live").tuples_aside());
        assert_eq!(tab.lookup(&reply, S), Some((s, Dir::Reply)));
        assert_eq!(tab.tuple(s, Dir::Reply), Some(reply));
        let mut other_zone = reply;
        other_zone.zone = 4;
        assert_eq!(tab.lookup(&other_zone, S), None);
        let mut swapped = echo;
        swapped.dst_l4 = u16::from_be_bytes([0, 0]);
        assert_eq!(
            tab.lookup(&swapped, S),
            None,
            "a reply-type original is not it"
        );
    }

    #[test]
    fn a_non_invertible_original_keeps_its_tuples_aside() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        // ICMP type 3 has no reply type: whatever the reply is, it is not the inverse,
        // not even a reply that has no packed form either (IPv6: the table takes any
        // pair of tuples).
        let orig = Tuple {
            src: Addr::v4([10, 0, 0, 1]),
            dst: Addr::v4([192, 0, 2, 1]),
            src_l4: 7,
            dst_l4: u16::from_be_bytes([3, 1]),
            proto: proto::ICMP,
            family: Family::V4,
            zone: 0,
        };
        let reply = Tuple {
            src: Addr::v6([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
            dst: Addr::v6([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            family: Family::V6,
            ..orig
        };
        let s = tab
            .insert(orig, reply, Status::empty(), 30 * S, (), 0)
            .expect("room");
        assert!(tab.entry(s).expect("live").tuples_aside());
        assert_eq!(tab.lookup(&orig, S), Some((s, Dir::Original)));
        assert_eq!(tab.lookup(&reply, S), Some((s, Dir::Reply)));
        assert_eq!(tab.tuples(s), Some([orig, reply]));
    }

    #[test]
    fn index_cells_hold_every_slot_and_never_look_empty() {
        for (max, tag_bits) in [
            (1usize, 30u32),
            (1_000_000, 11),
            (1 << 20, 10),
            (1 << 30, 0),
        ] {
            let c = Cells::for_slots(max);
            assert_eq!(c.tag_mask.count_ones(), tag_bits, "max {max}");
            let last = Slot(u32::try_from(max - 1).expect("fits"));
            for dir in [Dir::Original, Dir::Reply] {
                for hash in [0, u64::MAX, 0x1234_5678_9abc_def0] {
                    let v = c.pack(hash, last, dir);
                    assert_ne!(v, EMPTY, "max {max}");
                    assert_eq!(c.unpack(v), (c.tag(hash), last, dir));
                    assert_eq!(c.unpack(c.pack(hash, Slot(0), dir)).1, Slot(0));
                }
            }
        }
    }

    #[test]
    fn counters_stay_exact_past_32_bits() {
        // A plain connection keeps its wide flag in its key, a translated one aside.
        counters_stay_exact_past_32_bits_with(|a| (inv(a), Status::empty()));
        counters_stay_exact_past_32_bits_with(|a| (snat(a, 30_000), Status::SRC_NAT));
    }

    fn counters_stay_exact_past_32_bits_with(reply: impl Fn(&Tuple) -> (Tuple, Status)) {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        let a = t(1);
        let (r, status) = reply(&a);
        let s = tab.insert(a, r, status, 30 * S, (), 0).expect("room");
        let narrow = tab.heap_bytes();
        let big = u64::from(u32::MAX);
        tab.count(s, Dir::Original, 1, big);
        tab.count(s, Dir::Reply, 3, 60);
        assert_eq!(tab.heap_bytes(), narrow, "nothing carried yet");
        tab.count(s, Dir::Original, 1, big);
        tab.count(s, Dir::Original, big, 7);
        assert!(tab.heap_bytes() > narrow, "high parts stored aside");
        let want = [
            Counter {
                packets: big + 2,
                bytes: 2 * big + 7,
            },
            Counter {
                packets: 3,
                bytes: 60,
            },
        ];
        assert_eq!(tab.counters(s), Some(want));
        assert_eq!(tab.get(s).expect("live").counters, want);
        tab.count(s, Dir::Reply, u64::MAX, 0);
        assert_eq!(
            tab.counters(s).expect("live")[1].packets,
            u64::MAX,
            "saturates"
        );
        tab.drain_events().for_each(drop);
        tab.remove(s, RemoveReason::Deleted);
        let evs: Vec<_> = tab.drain_events().collect();
        assert!(matches!(
            evs.as_slice(),
            [Event::Destroy { counters, .. }] if counters[0] == want[0]
        ));
        // The slot's next connection starts from zero.
        let s2 = tab.insert(a, r, status, 30 * S, (), 0).expect("room");
        assert_eq!(s2, s);
        assert_eq!(tab.counters(s2), Some([Counter::default(); 2]));
    }

    #[test]
    fn entry_layout_is_64_bytes() {
        // Key 22 (generation and wide flag inside, or spilled), status 2, timeout 8,
        // low counters 16,
        // a 16-byte protocol state (what `conntrack::L4State` takes).
        assert_eq!(size_of::<Option<Entry<[u64; 2]>>>(), 64);
        assert_eq!(align_of::<Option<Entry<[u64; 2]>>>(), 64);
    }

    #[test]
    fn clash_is_refused_for_either_tuple() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        let a = t(1);
        tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
            .expect("room");
        let err = tab
            .insert(t(2), inv(&a), Status::empty(), 30 * S, (), 0)
            .expect_err("reply tuple taken");
        assert!(matches!(
            err,
            InsertError::Clash {
                dir: Dir::Reply,
                id: 0x1_0000_0000,
                ..
            }
        ));
        assert_eq!(tab.stats().insert_clash, 1);
    }

    #[test]
    fn expired_entries_are_invisible_and_reaped_on_lookup() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 64);
        let a = t(1);
        tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
            .expect("room");
        tab.drain_events().for_each(drop);
        assert!(tab.lookup(&a, 30 * S - 1).is_some());
        assert_eq!(tab.lookup(&a, 30 * S), None, "timeout - now <= 0 is dead");
        assert_eq!(tab.len(), 0);
        let evs: Vec<_> = tab.drain_events().collect();
        assert!(matches!(
            evs.as_slice(),
            [Event::Destroy {
                reason: RemoveReason::Expired,
                ..
            }]
        ));
    }

    #[test]
    fn gc_reaps_only_expired_and_respects_refresh() {
        let mut tab: ConnTable<()> = ConnTable::new(64, 3, 256);
        let mut slots = Vec::new();
        for i in 0..10 {
            let a = t(i);
            slots.push(
                tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
                    .expect("room"),
            );
        }
        // Refresh half of them to 120 s.
        for s in slots.iter().step_by(2) {
            tab.set_timeout(*s, 120 * S);
        }
        assert_eq!(tab.gc(29 * S, 1000), 0);
        assert_eq!(tab.gc(31 * S, 1000), 5);
        assert_eq!(tab.len(), 5);
        assert_eq!(tab.gc(119 * S, 1000), 0);
        assert_eq!(tab.gc(121 * S, 1000), 5);
        assert!(tab.is_empty());
    }

    #[test]
    fn gc_honours_a_shortened_timeout() {
        let mut tab: ConnTable<()> = ConnTable::new(8, 3, 64);
        let a = t(1);
        let s = tab
            .insert(a, inv(&a), Status::empty(), 432_000 * S, (), 0)
            .expect("room");
        tab.set_timeout(s, 10 * S);
        assert_eq!(tab.gc(11 * S, 100), 1);
    }

    #[test]
    fn gc_budget_bounds_work_per_call() {
        let mut tab: ConnTable<()> = ConnTable::new(1000, 3, 2000);
        for i in 0..1000 {
            let a = t(i);
            tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
                .expect("room");
        }
        let first = tab.gc(31 * S, 100);
        assert!(first <= 100, "visited at most the budget, removed {first}");
        let mut total = first;
        for _ in 0..20 {
            total += tab.gc(31 * S, 100);
        }
        assert_eq!(total, 1000);
    }

    #[test]
    fn long_timeouts_beyond_the_wheel_horizon_expire_on_time() {
        let mut tab: ConnTable<()> = ConnTable::new(8, 3, 64);
        let a = t(1);
        tab.insert(a, inv(&a), Status::empty(), 432_000 * S, (), 0)
            .expect("room");
        let mut now = 0;
        while now < 431_990 * S {
            now += 600 * S;
            now = now.min(431_990 * S);
            assert_eq!(tab.gc(now, 100), 0, "alive at {}", now / S);
        }
        assert_eq!(tab.gc(432_001 * S, 100), 1);
    }

    #[test]
    fn early_drop_evicts_unassured_only() {
        let mut tab: ConnTable<()> = ConnTable::new(4, 9, 64);
        let mut slots = Vec::new();
        for i in 0..4 {
            let a = t(i);
            slots.push(
                tab.insert(a, inv(&a), Status::ASSURED, 300 * S, (), 0)
                    .expect("room"),
            );
        }
        let new = t(100);
        let err = tab
            .insert(new, inv(&new), Status::empty(), 30 * S, (), 0)
            .expect_err("all assured: table full");
        assert_eq!(err, InsertError::TableFull { max: 4 });
        // Make one entry unassured; the next insert evicts it (4 entries, 16 index
        // slots: the early-drop walk covers the whole index).
        tab.get_mut(slots[2]).expect("live").status = Status::CONFIRMED;
        let s = tab
            .insert(new, inv(&new), Status::empty(), 30 * S, (), 0)
            .expect("early drop made room");
        assert_eq!(tab.len(), 4);
        assert_eq!(tab.stats().early_drop, 1);
        assert!(tab.lookup(&t(2), 1).is_none());
        assert_eq!(tab.lookup(&new, 1), Some((s, Dir::Original)));
    }

    #[test]
    fn lowered_limit_evicts_nothing_and_refuses_until_under_it() {
        let mut tab: ConnTable<()> = ConnTable::new(8, 9, 64);
        for i in 0..4 {
            let a = t(i);
            tab.insert(a, inv(&a), Status::ASSURED, 300 * S, (), 0)
                .expect("room");
        }
        assert_eq!(tab.set_limit(2), 2);
        assert_eq!(tab.len(), 4, "lowering the limit evicts nothing");
        let new = t(100);
        let err = tab
            .insert(new, inv(&new), Status::empty(), 30 * S, (), 0)
            .expect_err("over the limit, all assured: refused");
        assert_eq!(err, InsertError::TableFull { max: 2 });
        // Clamped to the allocation; back at 8 there is room again.
        assert_eq!(tab.set_limit(100), 8);
        assert_eq!(tab.set_limit(0), 1);
        tab.set_limit(8);
        tab.insert(new, inv(&new), Status::empty(), 30 * S, (), 0)
            .expect("under the limit");
        assert_eq!(tab.len(), 5);
    }

    #[test]
    fn early_drop_never_takes_an_offloaded_entry() {
        for bit in [
            Status::OFFLOAD,
            Status::HW_OFFLOAD,
            Status::OFFLOAD | Status::HW_OFFLOAD,
        ] {
            let mut tab: ConnTable<()> = ConnTable::new(4, 9, 64);
            // Four unassured entries (UDP that never saw a reply), all offloaded; one
            // of them already past its timeout.
            let mut slots = Vec::new();
            for i in 0..4 {
                let a = t(i);
                let timeout = if i == 1 { 5 * S } else { 300 * S };
                slots.push(tab.insert(a, inv(&a), bit, timeout, (), 0).expect("room"));
            }
            let new = t(100);
            let err = tab
                .insert(new, inv(&new), Status::empty(), 30 * S, (), 10 * S)
                .expect_err("only offloaded entries: nothing to evict");
            assert_eq!(err, InsertError::TableFull { max: 4 });
            assert_eq!(tab.len(), 4);
            assert_eq!(tab.stats().early_drop, 0);
            for &s in &slots {
                assert!(tab.get(s).is_some(), "offloaded entry kept ({bit:?})");
            }
            // Once it is back in software, an unassured entry is fair game again.
            tab.get_mut(slots[3]).expect("live").status = Status::CONFIRMED;
            tab.insert(new, inv(&new), Status::empty(), 30 * S, (), 10 * S)
                .expect("early drop made room");
            assert_eq!(tab.stats().early_drop, 1);
            assert!(
                tab.lookup(&t(3), 10 * S).is_none(),
                "the software entry went"
            );
            for &s in &slots[..3] {
                assert!(tab.get(s).is_some(), "offloaded entry kept ({bit:?})");
            }
        }
    }

    /// Index cells in use.
    fn cells(tab: &ConnTable<()>) -> usize {
        tab.index.iter().filter(|&&v| v != EMPTY).count()
    }

    #[test]
    fn removal_leaves_no_index_cell_behind() {
        // Both cells of a connection without NAT start at the same index position, so
        // removing the first shifts the second back: its home must still be found.
        let mut tab: ConnTable<()> = ConnTable::new(8, 3, 0);
        for round in 0..200u32 {
            let live: Vec<_> = (0..6)
                .map(|i| {
                    let a = t(round * 8 + i);
                    tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
                        .expect("room")
                })
                .collect();
            assert_eq!(cells(&tab), 2 * tab.len());
            for (i, s) in live.into_iter().enumerate() {
                tab.remove(s, RemoveReason::Deleted).expect("live");
                assert_eq!(cells(&tab), 2 * tab.len(), "round {round}, removal {i}");
            }
        }
        assert!(tab.is_empty());
    }

    #[test]
    fn ids_are_never_reused() {
        let mut tab: ConnTable<()> = ConnTable::new(1, 1, 8);
        let a = t(1);
        let s1 = tab
            .insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
            .expect("room");
        let id1 = tab.get(s1).expect("live").id;
        tab.remove(s1, RemoveReason::Deleted);
        let s2 = tab
            .insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
            .expect("room");
        assert_eq!(s1, s2, "slot reused");
        assert!(tab.get_checked(s2, id1).is_none(), "stale handle detected");
        assert_eq!(tab.find_id(id1), None);
        let id2 = tab.id(s2).expect("live");
        assert_ne!(id1, id2);
        assert_eq!(tab.find_id(id2), Some(s2));
        assert!(tab.get_checked(s2, id2).is_some());
    }

    #[test]
    fn ids_stay_unique_across_slots_and_reuses() {
        let mut tab: ConnTable<()> = ConnTable::new(4, 1, 1024);
        let mut seen = std::collections::HashSet::new();
        for round in 0..50u32 {
            // Translated connections (generation spilled) and plain ones (generation in
            // the key) take turns in the slots.
            let slots: Vec<Slot> = (0..4)
                .map(|i| {
                    let a = t(round * 4 + i);
                    let (r, st) = if (round + i) % 3 == 0 {
                        let port = 20_000 + u16::try_from(round * 4 + i).expect("small");
                        (snat(&a, port), Status::SRC_NAT)
                    } else {
                        (inv(&a), Status::empty())
                    };
                    tab.insert(a, r, st, 30 * S, (), 0).expect("room")
                })
                .collect();
            for &s in &slots {
                let id = tab.id(s).expect("live");
                assert_ne!(id, 0);
                assert!(seen.insert(id), "id {id:#x} given twice");
                assert_eq!(tab.find_id(id), Some(s));
            }
            // Free them in a varying order so slots are reused in different orders.
            for (k, &s) in slots.iter().enumerate() {
                let s = if round % 2 == 0 { s } else { slots[3 - k] };
                tab.remove(s, RemoveReason::Deleted).expect("live");
            }
        }
        assert_eq!(seen.len(), 200);
        // Unknown ids are not found: an empty slot, a slot past the table, id 0.
        assert_eq!(tab.find_id(0), None);
        assert_eq!(tab.find_id(1 << 32), None);
        assert_eq!(tab.find_id((1 << 32) | 99), None);
    }

    #[test]
    fn event_queue_is_bounded() {
        let mut tab: ConnTable<()> = ConnTable::new(16, 1, 2);
        for i in 0..3 {
            let a = t(i);
            tab.insert(a, inv(&a), Status::empty(), 30 * S, (), 0)
                .expect("room");
        }
        assert_eq!(tab.drain_events().count(), 2);
        assert_eq!(tab.stats().events_lost, 1);
    }

    proptest! {
        /// Any pair of IPv4 tuples is stored exactly (in the entry when at most one
        /// endpoint of the reply differs from the inverse, else aside) and found by
        /// both tuples and by nothing that differs in one byte.
        #[test]
        fn any_v4_pair_is_stored_exactly(
            sa in any::<[u8; 4]>(), da in any::<[u8; 4]>(), sp in any::<u16>(),
            dp in any::<u16>(), zone in 0u16..3, kind in 0u8..4,
            new_src in proptest::option::of((any::<[u8; 4]>(), any::<u16>())),
            new_dst in proptest::option::of((any::<[u8; 4]>(), any::<u16>())),
            flip in 0usize..15,
        ) {
            let (proto, dp) = match kind {
                0 => (proto::UDP, dp),
                1 => (proto::TCP, dp),
                2 => (proto::ICMP, u16::from_be_bytes([8, 0])),
                _ => (proto::SCTP, dp),
            };
            let o = Tuple {
                src: Addr::v4(sa), dst: Addr::v4(da), src_l4: sp, dst_l4: dp,
                proto, family: Family::V4, zone,
            };
            let mut r = inv(&o);
            if let Some((a, p)) = new_src {
                r.src = Addr::v4(a);
                r.src_l4 = p;
            }
            if let Some((a, p)) = new_dst {
                r.dst = Addr::v4(a);
                if r.is_icmp() { r.src_l4 = p } else { r.dst_l4 = p }
            }
            let mut tab: ConnTable<()> = ConnTable::new(4, 9, 8);
            let Ok(slot) = tab.insert(o, r, Status::empty(), 30 * S, (), 0) else {
                // Only a reply equal to the original clashes with it.
                prop_assert_eq!(o, r);
                return Ok(());
            };
            let inverse = inv(&o);
            // For ICMP the id (source l4 field of both tuples) goes with either address.
            let one_endpoint = if o.is_icmp() {
                (r.src == inverse.src || r.dst == inverse.dst) && r.dst_l4 == inverse.dst_l4
            } else {
                (r.src == inverse.src && r.src_l4 == inverse.src_l4)
                    || (r.dst == inverse.dst && r.dst_l4 == inverse.dst_l4)
            };
            prop_assert_eq!(tab.entry(slot).expect("live").tuples_aside(), !one_endpoint);
            prop_assert_eq!(tab.tuples(slot), Some([o, r]));
            prop_assert_eq!(tab.tuple(slot, Dir::Reply), Some(r));
            prop_assert_eq!(tab.lookup(&o, S), Some((slot, Dir::Original)));
            prop_assert_eq!(tab.lookup(&r, S), Some((slot, Dir::Reply)));
            for t in [o, r] {
                let mut off = t;
                match flip {
                    0..4 => off.src.0[flip] ^= 1,
                    4..8 => off.dst.0[flip - 4] ^= 1,
                    8 => off.src_l4 ^= 1,
                    9 => off.dst_l4 ^= 1,
                    10 => off.zone ^= 1,
                    11 => off.proto ^= 1,
                    12 => off.src.0[4] = 1,
                    13 => off.dst.0[15] = 1,
                    _ => off.family = Family::V6,
                }
                if off != o && off != r {
                    prop_assert_eq!(tab.lookup(&off, S), None);
                }
            }
        }

        /// The index agrees with a model map under random inserts and removals
        /// (exercises backward-shift deletion across wrapped probe runs).
        #[test]
        fn index_matches_model(ops in proptest::collection::vec((0u32..64, 0u8..3), 1..400)) {
            // Op 0 inserts `k` untranslated, 1 translated (its reply cell hashes away
            // from the original's), 2 removes it.
            let reply = |k: u32, translated: bool| {
                let a = t(k);
                if translated {
                    snat(&a, 20_000 + u16::try_from(k).unwrap_or(0))
                } else {
                    inv(&a)
                }
            };
            let mut tab: ConnTable<u32> = ConnTable::new(64, 5, 0);
            let mut model: HashMap<u32, (Slot, bool)> = HashMap::new();
            for (k, op) in ops {
                let a = t(k);
                if op < 2 {
                    let translated = op == 1;
                    let status = if translated {
                        Status::ASSURED | Status::SRC_NAT
                    } else {
                        Status::ASSURED
                    };
                    let r = tab.insert(a, reply(k, translated), status, u64::MAX, k, 0);
                    match model.get(&k) {
                        Some(_) => prop_assert!(r.is_err()),
                        None => { model.insert(k, (r.expect("room"), translated)); }
                    }
                } else if let Some((s, _)) = model.remove(&k) {
                    prop_assert!(tab.remove(s, RemoveReason::Deleted).is_some());
                }
                for k in 0..64u32 {
                    let a = t(k);
                    let found = tab.lookup(&a, 0);
                    match model.get(&k) {
                        Some(&(s, translated)) => {
                            let r = reply(k, translated);
                            prop_assert_eq!(found, Some((s, Dir::Original)));
                            prop_assert_eq!(tab.lookup(&r, 0), Some((s, Dir::Reply)));
                            // The established path's lookup agrees.
                            let packed = r.pack_v4().expect("v4");
                            let fast = tab.find_v4(packed, tab.hasher().pair_hash_v4(packed), 0);
                            prop_assert_eq!(fast, FoundV4::Live(s, Dir::Reply));
                            prop_assert_eq!(tab.get(s).map(|c| c.proto), Some(k));
                        }
                        None => {
                            prop_assert!(found.is_none());
                            prop_assert!(tab.lookup(&inv(&a), 0).is_none());
                            prop_assert!(tab.lookup(&reply(k, true), 0).is_none());
                        }
                    }
                }
                prop_assert_eq!(tab.len(), model.len());
                // Two cells a connection, none left behind by a removal.
                let cells = tab.index.iter().filter(|&&v| v != EMPTY).count();
                prop_assert_eq!(cells, 2 * model.len());
            }
        }
    }
}
