//! Choosing a unique tuple for a NAT binding: Linux `get_unique_tuple`
//! (`nf_nat_core.c`) and `nf_nat_l4proto_unique_tuple`.
//!
//! "Used" means that the table already holds the candidate's REPLY tuple (in either
//! direction): the caller answers through an `is_taken` closure that is given the
//! candidate reply tuple, so this module does not depend on the table.
//!
//! A search allocates nothing. A source search uses [`BusyPorts`], the ports bound per
//! endpoint: it takes the first port at or after Linux's offset that is not bound (a
//! scan of 64-port words) and checks only that candidate in the table (more only when
//! the table holds it for a connection that is no binding), at most
//! [`MAX_TABLE_CHECKS`] checks. A destination search is Linux's: sequential from the
//! offset, at most 128 + 64 + 32 + 16 probes.
//! The engine's two maps ([`BySource`], [`BusyPorts`]) grow with the connections they
//! describe (amortised; a busy endpoint's 8 KiB bitmap is allocated once), never per
//! packet of an established connection.
//!
//! Differences from Linux, all with the same effect on the wire:
//! - A source manip that finds no free tuple returns [`Exhausted`] (the caller drops the
//!   packet and counts it); Linux keeps the clashing candidate and drops at confirm.
//! - A single-port range is checked for uniqueness too (Linux skips the check and lets
//!   confirm drop the clash).
//! - No eviction of TIME_WAIT/CLOSE entries holding a candidate (Linux
//!   `nf_nat_used_tuple_harder`): that needs the table's TCP state.

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use super::exact::ExactIndex;
use super::rules::{NatFlags, PortRange, mix64};
use crate::tuple::{Addr, Family, PackedV4, Tuple, proto};

/// Which end of the tuple a binding changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Manip {
    /// The source (SNAT, masquerade; POSTROUTING).
    Src,
    /// The destination (DNAT, VIP; PREROUTING).
    Dst,
}

impl core::fmt::Display for Manip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Src => "source",
            Self::Dst => "destination",
        })
    }
}

/// A small seeded pseudo-random generator (xorshift64*) for port offsets.
#[derive(Debug, Clone)]
pub struct NatRng(u64);

impl NatRng {
    /// A generator from a seed (any value; 0 is remapped).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(mix64(seed) | 1)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// 16 random bits.
    #[inline]
    pub fn next_u16(&mut self) -> u16 {
        // The top 16 bits (xorshift64*'s best). `>> 48` leaves exactly 16 bits.
        u16::try_from(self.next_u64() >> 48).unwrap_or(0)
    }
}

/// A NAT range (Linux `nf_nat_range2` with `MAP_IPS` always set): IPv4 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatRange {
    /// Lowest address.
    pub min_addr: Addr,
    /// Highest address.
    pub max_addr: Addr,
    /// Port / ICMP id range (`PROTO_SPECIFIED`), or `None`.
    pub ports: Option<PortRange>,
    /// `PROTO_RANDOM_FULLY`.
    pub random_fully: bool,
    /// `PERSISTENT`.
    pub persistent: bool,
}

impl NatRange {
    /// A range of one address, no ports: a null binding when `addr` is the current one.
    #[must_use]
    pub fn addr(addr: Addr) -> Self {
        Self {
            min_addr: addr,
            max_addr: addr,
            ports: None,
            random_fully: false,
            persistent: false,
        }
    }
}

/// How a tuple was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The current tuple was in range and free (port preservation).
    Kept,
    /// An existing mapping of the same source was reused.
    BySource,
    /// The hashed address with the current port was free.
    AddrOnly,
    /// The port search found it after this many probes.
    Searched {
        /// Probes made: candidates checked in the table (a source search does not
        /// count the ports [`BusyPorts`] records as bound).
        probes: u32,
    },
}

/// No free tuple in the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no free {manip} tuple for {tuple} after {probes} probes")]
pub struct Exhausted {
    /// The manip type.
    pub manip: Manip,
    /// The tuple before this manip.
    pub tuple: Tuple,
    /// The last candidate (Linux keeps it and lets confirm drop the packet).
    pub last: Tuple,
    /// Probes made.
    pub probes: u32,
}

/// Source ports one endpoint records inline before it needs a bitmap.
const FEW: usize = 7;
/// At most this many endpoints have a bitmap (8 KiB each: 32 MiB).
pub const BUSY_MAX_DENSE: usize = 4096;
/// At most this many endpoints are recorded (about 64 bytes each: 16 MiB).
pub const BUSY_MAX_ENDPOINTS: usize = 1 << 18;

/// A candidate ORIGINAL tuple after source manip, without its source port (or ICMP id):
/// every candidate of one search has the same key. `None` unless an IPv4 tuple (source
/// NAT is IPv4 only).
#[inline]
fn endpoint_of(t: &Tuple) -> Option<Endpoint> {
    let (src, dst) = (u128::from_le_bytes(t.src.0), u128::from_le_bytes(t.dst.0));
    // Both addresses as `Addr::v4` makes them: 4 bytes, then zeros.
    if t.family != Family::V4 || (src | dst) >> 32 != 0 {
        return None;
    }
    let [s0, s1, s2, s3, ..] = src.to_le_bytes();
    let [d0, d1, d2, d3, ..] = dst.to_le_bytes();
    Some(Endpoint {
        addrs: u64::from_le_bytes([s0, s1, s2, s3, d0, d1, d2, d3]),
        rest: u64::from(t.dst_l4) | u64::from(t.proto) << 16 | u64::from(t.zone) << 24,
    })
}

/// Source ports bound towards one endpoint: a few inline, or one bit each.
#[derive(Clone)]
enum PortBits {
    Few { ports: [u16; FEW], n: u8 },
    Dense { words: Box<[u64; 1024]>, count: u32 },
}

impl PortBits {
    /// The lowest port in `from..=to` that is not recorded, if any: at most eight steps
    /// inline, else a scan of 64-port words (`trailing_zeros` of the inverted word).
    fn next_free(&self, from: u16, to: u16) -> Option<u16> {
        match self {
            Self::Few { .. } => {
                let mut p = from;
                while self.test(p) {
                    if p >= to {
                        return None;
                    }
                    p += 1;
                }
                (p <= to).then_some(p)
            }
            Self::Dense { words, .. } => {
                let (mut p, to) = (usize::from(from), usize::from(to));
                while p <= to {
                    // Free ports from `p` on within its word; bits above the word are 0.
                    let free = !words[p >> 6] >> (p & 63);
                    if free != 0 {
                        let q = p + free.trailing_zeros() as usize;
                        return u16::try_from(q).ok().filter(|_| q <= to);
                    }
                    p = (p | 63) + 1;
                }
                None
            }
        }
    }

    #[inline]
    fn test(&self, port: u16) -> bool {
        match self {
            Self::Few { ports, n } => ports[..usize::from(*n)].contains(&port),
            Self::Dense { words, .. } => {
                let p = usize::from(port);
                words[p >> 6] & (1 << (p & 63)) != 0
            }
        }
    }
}

/// A multiplicative hasher for the NAT engine's maps ([`BusyPorts`], [`BySource`]),
/// keyed per map from `RandomState` so that remote peers cannot aim collisions; much
/// cheaper than SipHash for these 20-40 byte keys.
#[derive(Clone, Copy)]
pub(crate) struct FoldHasher(u64);

impl FoldHasher {
    /// Folds one word in: the xor of both halves of a 128-bit product.
    #[inline]
    fn fold(&mut self, w: u64) {
        let p = (u128::from(self.0 ^ w) * 0x9E37_79B9_7F4A_7C15_u128).to_le_bytes();
        let (mut lo, mut hi) = ([0u8; 8], [0u8; 8]);
        lo.copy_from_slice(&p[..8]);
        hi.copy_from_slice(&p[8..]);
        self.0 = u64::from_le_bytes(lo) ^ u64::from_le_bytes(hi);
    }
}

impl core::hash::Hasher for FoldHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.fold(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u64(&mut self, w: u64) {
        self.fold(w);
    }
}

/// The two 64-bit halves of an address (an IPv4 address: the first, the second is 0).
#[inline]
pub(crate) fn addr_words(a: &Addr) -> [u64; 2] {
    let [w0, w1] = [0, 8].map(|i| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&a.0[i..i + 8]);
        u64::from_le_bytes(w)
    });
    [w0, w1]
}

/// A [`BusyPorts`] key: the endpoint of an IPv4 candidate ([`endpoint_of`]) in two
/// words, hashed as they are: the source (NAT) and remote addresses (the bytes of
/// each, source first), and the remote port (or ICMP type and code), protocol and
/// zone (`dst_l4 | proto << 16 | zone << 24`).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Endpoint {
    addrs: u64,
    rest: u64,
}

impl Endpoint {
    /// The remote address.
    #[inline]
    fn dst(&self) -> Addr {
        let [_, _, _, _, d0, d1, d2, d3] = self.addrs.to_le_bytes();
        Addr::v4([d0, d1, d2, d3])
    }

    /// The ORIGINAL tuple of the candidate with source port `port` (tests).
    #[cfg(test)]
    fn tuple(&self, port: u16) -> Tuple {
        let [s0, s1, s2, s3, ..] = self.addrs.to_le_bytes();
        let [p0, p1, proto, z0, z1, ..] = self.rest.to_le_bytes();
        Tuple {
            src: Addr::v4([s0, s1, s2, s3]),
            dst: self.dst(),
            src_l4: port,
            dst_l4: u16::from_le_bytes([p0, p1]),
            proto,
            family: Family::V4,
            zone: u16::from_le_bytes([z0, z1]),
        }
    }
}

impl core::hash::Hash for Endpoint {
    #[inline]
    fn hash<H: core::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.addrs);
        h.write_u64(self.rest);
    }
}

/// Builds [`FoldHasher`]s with a random key.
#[derive(Clone, Copy)]
pub(crate) struct FoldBuild(u64);

impl Default for FoldBuild {
    fn default() -> Self {
        use core::hash::BuildHasher;
        Self(std::collections::hash_map::RandomState::new().hash_one(0x6e61_7421_u64))
    }
}

impl core::hash::BuildHasher for FoldBuild {
    type Hasher = FoldHasher;
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(self.0)
    }
}

/// Source ports bound by source-NAT connections, per endpoint (the translated ORIGINAL
/// tuple without its source port: NAT address, remote address and port, protocol,
/// zone), so that a port search in a busy range finds a free port by scanning bitmap
/// words instead of looking candidates up in the connection table. A recorded port is
/// used; an unrecorded one is checked with `is_taken` before it is chosen (a connection
/// that is no binding may hold it).
///
/// [`NatEngine::decide`](super::NatEngine::decide) records every `SRC_NAT` binding and
/// [`NatEngine::released`](super::NatEngine::released) clears it; an endpoint keeps up to
/// seven ports inline, then a 64 Ki-bit bitmap, and is forgotten when its last binding
/// is released. Bounded: at most [`BUSY_MAX_ENDPOINTS`] endpoints and
/// [`BUSY_MAX_DENSE`] bitmaps; past that, bindings are simply not recorded (a search
/// then checks the unrecorded ports in the table one by one, at most
/// [`MAX_TABLE_CHECKS`] of them).
///
/// IPv4 only, like source NAT: a binding of another family (which no decision makes)
/// is not recorded.
#[derive(Clone, Default)]
pub struct BusyPorts {
    map: HashTable<(Endpoint, PortBits)>,
    build: FoldBuild,
    dense: usize,
    /// Ports recorded, over all endpoints (one per recorded binding).
    ports: usize,
}

impl core::fmt::Debug for BusyPorts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BusyPorts")
            .field("endpoints", &self.map.len())
            .field("bitmaps", &self.dense)
            .field("ports", &self.ports)
            .finish()
    }
}

impl BusyPorts {
    /// Endpoints recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no endpoint is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Endpoints recorded with a bitmap.
    #[must_use]
    pub fn bitmaps(&self) -> usize {
        self.dense
    }

    /// Ports recorded over all endpoints: the bindings recorded.
    #[must_use]
    pub fn ports(&self) -> usize {
        self.ports
    }

    /// Whether some endpoint recorded has remote address `addr`.
    pub(crate) fn any_towards(&self, addr: &Addr) -> bool {
        self.map.iter().any(|(k, _)| k.dst() == *addr)
    }

    /// Every recorded binding, as a source-manipped ORIGINAL tuple (tests: compared with
    /// the table's connections).
    #[cfg(test)]
    pub(crate) fn recorded(&self) -> Vec<Tuple> {
        let mut out = Vec::new();
        for (k, bits) in &self.map {
            let ports: Vec<u16> = match bits {
                PortBits::Few { ports, n } => ports[..usize::from(*n)].to_vec(),
                PortBits::Dense { .. } => (0..=u16::MAX).filter(|&p| bits.test(p)).collect(),
            };
            out.extend(ports.into_iter().map(|p| k.tuple(p)));
        }
        out
    }

    /// The map hash of `t`'s endpoint (its source port ignored): what
    /// [`BusyPorts::add_hashed`] takes (0 for a tuple that has no endpoint here).
    #[inline]
    pub(crate) fn hash(&self, t: &Tuple) -> u64 {
        use core::hash::BuildHasher;
        endpoint_of(t).map_or(0, |k| self.build.hash_one(k))
    }

    /// Records the binding `new` (a source-manipped ORIGINAL tuple), room permitting;
    /// whether it was recorded now (`false`: no room, or recorded already).
    pub fn add(&mut self, new: &Tuple) -> bool {
        self.add_hashed(self.hash(new), None, new)
    }

    /// [`BusyPorts::add`] with `new`'s endpoint hash ([`BusyPorts::hash`]) known, and
    /// the map bucket of its record if the caller found it (nothing changed the map
    /// since): then no probe.
    #[inline]
    pub(crate) fn add_hashed(&mut self, hash: u64, bucket: Option<usize>, new: &Tuple) -> bool {
        match endpoint_of(new) {
            Some(key) => self.add_key(hash, bucket, key, new.src_l4),
            None => false,
        }
    }

    /// [`BusyPorts::add_hashed`] of port `port` towards endpoint `key`.
    #[inline]
    fn add_key(&mut self, hash: u64, bucket: Option<usize>, key: Endpoint, port: u16) -> bool {
        use core::hash::BuildHasher;
        let known = bucket.filter(|&i| self.map.get_bucket(i).is_some_and(|(k, _)| *k == key));
        let bits = if let Some(i) = known {
            let Some((_, bits)) = self.map.get_bucket_mut(i) else {
                return false;
            };
            bits
        } else {
            let room = self.map.len() < BUSY_MAX_ENDPOINTS;
            let build = self.build;
            match self
                .map
                .entry(hash, |(k, _)| *k == key, |(k, _)| build.hash_one(k))
            {
                Entry::Occupied(e) => &mut e.into_mut().1,
                Entry::Vacant(v) if room => {
                    let few = PortBits::Few {
                        ports: [0; FEW],
                        n: 0,
                    };
                    &mut v.insert((key, few)).into_mut().1
                }
                Entry::Vacant(_) => return false,
            }
        };
        if bits.test(port) {
            return false;
        }
        match bits {
            PortBits::Few { ports, n } if usize::from(*n) < FEW => {
                ports[usize::from(*n)] = port;
                *n += 1;
            }
            PortBits::Few { ports, .. } => {
                if self.dense >= BUSY_MAX_DENSE {
                    return false;
                }
                let mut words = Box::new([0u64; 1024]);
                for &p in ports.iter().chain(core::iter::once(&port)) {
                    let p = usize::from(p);
                    words[p >> 6] |= 1 << (p & 63);
                }
                self.dense += 1;
                *bits = PortBits::Dense {
                    words,
                    count: u32::try_from(FEW + 1).unwrap_or(u32::MAX),
                };
            }
            PortBits::Dense { words, count } => {
                let p = usize::from(port);
                words[p >> 6] |= 1 << (p & 63);
                *count += 1;
            }
        }
        self.ports += 1;
        true
    }

    /// Clears the binding `new` if recorded (then `true`); forgets its endpoint when it
    /// was the last.
    pub fn remove(&mut self, new: &Tuple) -> bool {
        if self.map.is_empty() {
            return false;
        }
        let Some(key) = endpoint_of(new) else {
            return false;
        };
        let Ok(mut e) = self.map.find_entry(self.hash(new), |(k, _)| *k == key) else {
            return false;
        };
        let bits = &mut e.get_mut().1;
        let port = new.src_l4;
        let mut cleared = false;
        let empty = match bits {
            PortBits::Few { ports, n } => {
                let len = usize::from(*n);
                if let Some(i) = ports[..len].iter().position(|&p| p == port) {
                    ports.swap(i, len - 1);
                    *n -= 1;
                    cleared = true;
                }
                *n == 0
            }
            PortBits::Dense { words, count } => {
                let p = usize::from(port);
                let m = 1u64 << (p & 63);
                if words[p >> 6] & m != 0 {
                    words[p >> 6] &= !m;
                    *count -= 1;
                    cleared = true;
                }
                *count == 0
            }
        };
        if cleared {
            self.ports -= 1;
        }
        if empty {
            if matches!(bits, PortBits::Dense { .. }) {
                self.dense -= 1;
            }
            e.remove();
        }
        cleared
    }

    /// Whether the port of candidate `t` is recorded as used.
    #[must_use]
    pub fn contains(&self, t: &Tuple) -> bool {
        !self.map.is_empty() && self.lookup(t).1.is_some_and(|(_, b)| b.test(t.src_l4))
    }

    /// The map hash of `t`'s endpoint ([`BusyPorts::hash`]), and the map bucket and
    /// record of the endpoint if it is recorded: the key is built once.
    #[inline]
    fn lookup(&self, t: &Tuple) -> (u64, Option<(usize, &PortBits)>) {
        match endpoint_of(t) {
            Some(key) => self.lookup_key(key),
            None => (0, None),
        }
    }
}

/// Key of the by-source index: the original source (Linux `hash_by_src`), an IPv4
/// address, port and protocol packed in one word (`addr | port << 32 | proto << 48`,
/// the address as the little-endian word of its bytes), and the zone. Only IPv4
/// connections are source-NATed, so only they have one ([`key_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SrcKey {
    word: u64,
    zone: u16,
}

impl core::hash::Hash for SrcKey {
    #[inline]
    fn hash<H: core::hash::Hasher>(&self, h: &mut H) {
        // The protocol takes bits 48..56: the zone's low byte above it is all that
        // fits, and enough for a hash (equality compares the whole zone).
        h.write_u64(self.word ^ u64::from(self.zone) << 56);
    }
}

/// A mapped source: the NAT address (the little-endian word of its bytes), the port
/// and the live connections that use it. 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    addr: u32,
    port: u16,
    refs: u32,
}

impl Mapping {
    /// Whether this is the mapping to `(addr, port)`.
    #[inline]
    fn is(&self, addr: u32, port: u16) -> bool {
        self.addr == addr && self.port == port
    }

    /// The mapped address and port.
    #[inline]
    fn target(&self) -> (Addr, u16) {
        (Addr::v4(self.addr.to_le_bytes()), self.port)
    }
}

/// The mappings of one source; almost always one. `more` may hold one mapping in several
/// entries (each with at least one reference).
#[derive(Debug, Clone)]
struct Mappings {
    first: Mapping,
    more: Vec<Mapping>,
}

impl Mappings {
    /// One more reference to `(addr, port)`.
    #[inline]
    fn add(&mut self, addr: u32, port: u16) {
        if self.first.is(addr, port) {
            self.first.refs += 1;
        } else {
            // Not searched for among the others, not even the newest (reading it was a
            // cache miss on every new connection of a busy source): O(1) on the
            // new-connection path, and no more entries than the source has
            // connections. A mapping may then be held by several entries; its
            // references are their sum.
            self.more.push(Mapping {
                addr,
                port,
                refs: 1,
            });
        }
    }
}

/// The by-source index: for each original source (address, port, protocol, zone) of a
/// source-NATed connection, the mapped (address, port) and how many live connections
/// use it. It gives endpoint-independent mapping: a new connection from the same source
/// reuses the mapping if it is in range and free. IPv4 only, like source NAT: a
/// binding of another family (which no decision makes) is not recorded.
#[derive(Clone, Default)]
pub struct BySource {
    map: HashTable<(SrcKey, Mappings)>,
    build: FoldBuild,
}

impl core::fmt::Debug for BySource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BySource")
            .field("sources", &self.map.len())
            .finish()
    }
}

/// The by-source key of `t`'s source; `None` for an IPv6 tuple.
#[inline]
fn key_of(t: &Tuple) -> Option<SrcKey> {
    (t.family == Family::V4).then(|| SrcKey {
        word: u64::from(v4_word(&t.src)) | u64::from(t.src_l4) << 32 | u64::from(t.proto) << 48,
        zone: t.zone,
    })
}

/// The little-endian word of an IPv4 address's bytes (the inverse of
/// `Addr::v4(w.to_le_bytes())`).
#[inline]
fn v4_word(a: &Addr) -> u32 {
    u32::from_le_bytes(a.as_v4())
}

impl BySource {
    /// Number of distinct sources held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The map hash of a source key.
    #[inline]
    fn hash(&self, k: SrcKey) -> u64 {
        use core::hash::BuildHasher;
        self.build.hash_one(k)
    }

    /// Records that a connection with original source of `orig` is mapped to
    /// `(addr, port)` (IPv4; anything else is not recorded).
    pub fn add(&mut self, orig: &Tuple, addr: Addr, port: u16) {
        if let Some(k) = key_of(orig) {
            self.add_hashed(self.hash(k), k, v4_word(&addr), port);
        }
    }

    /// [`BySource::add`] of key `k`, whose hash is `hash`.
    fn add_hashed(&mut self, hash: u64, k: SrcKey, addr: u32, port: u16) {
        use core::hash::BuildHasher;
        let build = self.build;
        match self
            .map
            .entry(hash, |(x, _)| *x == k, |(x, _)| build.hash_one(x))
        {
            Entry::Vacant(v) => {
                v.insert((
                    k,
                    Mappings {
                        first: Mapping {
                            addr,
                            port,
                            refs: 1,
                        },
                        more: Vec::new(),
                    },
                ));
            }
            Entry::Occupied(mut e) => e.get_mut().1.add(addr, port),
        }
    }

    /// Drops one reference added by [`BySource::add`]; unknown mappings are ignored.
    pub fn remove(&mut self, orig: &Tuple, addr: Addr, port: u16) {
        let Some(k) = key_of(orig) else {
            return;
        };
        let addr = v4_word(&addr);
        let Ok(mut e) = self.map.find_entry(self.hash(k), |(x, _)| *x == k) else {
            return;
        };
        let ms = &mut e.get_mut().1;
        if ms.first.is(addr, port) {
            ms.first.refs -= 1;
            if ms.first.refs == 0 {
                if ms.more.is_empty() {
                    e.remove();
                } else {
                    ms.first = ms.more.swap_remove(0);
                }
            }
        } else if let Some(i) = ms.more.iter().position(|x| x.is(addr, port)) {
            ms.more[i].refs -= 1;
            if ms.more[i].refs == 0 {
                ms.more.swap_remove(i);
            }
        }
    }

    /// The first mapping of `cur`'s source that `accept` takes; `cur`'s source key and
    /// hash go to `memo` (for the decision's [`BySource::add_memo`]).
    fn find(
        &self,
        cur: &Tuple,
        memo: &mut Memo<'_>,
        mut accept: impl FnMut(Addr, u16) -> bool,
    ) -> Option<(Addr, u16)> {
        if self.map.is_empty() {
            return None;
        }
        let k = key_of(cur)?;
        let hash = self.hash(k);
        memo.source = Some((k, hash, None));
        let i = self.map.find_bucket_index(hash, |(x, _)| *x == k)?;
        memo.source = Some((k, hash, Some(i)));
        let (_, ms) = self.map.get_bucket(i)?;
        core::iter::once(&ms.first)
            .chain(ms.more.iter())
            .map(Mapping::target)
            .find(|&(a, p)| accept(a, p))
    }

    /// The reference count of one mapping (tests and diagnostics).
    #[must_use]
    pub fn refs(&self, orig: &Tuple, addr: Addr, port: u16) -> u32 {
        let Some(k) = key_of(orig) else {
            return 0;
        };
        let addr = v4_word(&addr);
        self.map
            .find(self.hash(k), |(x, _)| *x == k)
            .map_or(0, |(_, ms)| {
                core::iter::once(&ms.first)
                    .chain(ms.more.iter())
                    .filter(|m| m.is(addr, port))
                    .map(|m| m.refs)
                    .sum()
            })
    }
}

/// Whether the protocol's tuple has ports.
#[inline]
#[must_use]
pub fn has_ports(p: u8) -> bool {
    matches!(
        p,
        proto::TCP | proto::UDP | proto::SCTP | proto::DCCP | proto::UDPLITE
    )
}

/// The manipulable address of `t` for `manip`.
#[inline]
fn addr_of(t: &Tuple, manip: Manip) -> Addr {
    match manip {
        Manip::Src => t.src,
        Manip::Dst => t.dst,
    }
}

#[inline]
fn set_addr(t: &mut Tuple, manip: Manip, a: Addr) {
    match manip {
        Manip::Src => t.src = a,
        Manip::Dst => t.dst = a,
    }
}

/// The manipulable L4 key: the port on that side, or the ICMP id (either side).
#[inline]
pub(crate) fn key_of_l4(t: &Tuple, manip: Manip) -> Option<u16> {
    if t.is_icmp() {
        Some(t.src_l4)
    } else if has_ports(t.proto) {
        Some(match manip {
            Manip::Src => t.src_l4,
            Manip::Dst => t.dst_l4,
        })
    } else {
        None
    }
}

#[inline]
fn set_key(t: &mut Tuple, manip: Manip, v: u16) {
    if t.is_icmp() || manip == Manip::Src {
        t.src_l4 = v;
    } else {
        t.dst_l4 = v;
    }
}

#[inline]
fn v4(a: &Addr) -> u32 {
    u32::from_be_bytes(a.as_v4())
}

/// The reply tuple of a candidate original tuple (ICMP type mapped as by
/// [`Tuple::invert`]); `None` for a type with no reply.
#[inline]
pub(crate) fn reply_of(t: &Tuple) -> Option<Tuple> {
    t.invert().ok()
}

/// Linux `nf_nat_in_range`.
fn in_range(t: &Tuple, range: &NatRange, manip: Manip) -> bool {
    let a = v4(&addr_of(t, manip));
    if a < v4(&range.min_addr) || a > v4(&range.max_addr) {
        return false;
    }
    match (range.ports, key_of_l4(t, manip)) {
        (Some(r), Some(k)) => r.contains(k),
        _ => true,
    }
}

/// Linux `find_best_ips_proto`: a deterministic address for the (source, destination)
/// pair (source only if persistent).
fn choose_addr(t: &mut Tuple, range: &NatRange, manip: Manip, seed: u64) {
    let (min, max) = (v4(&range.min_addr), v4(&range.max_addr));
    if min == max {
        set_addr(t, manip, range.min_addr);
        return;
    }
    let dst = if range.persistent { 0 } else { v4(&t.dst) };
    let h = mix64(seed ^ (u64::from(v4(&t.src)) << 32) ^ u64::from(dst));
    let size = u64::from(max - min) + 1;
    // (h32 * size) >> 32 < size <= 2^32, so the sum stays within [min, max].
    let off = (u64::from(low32(h)) * size) >> 32;
    let a = u32::try_from(u64::from(min) + off).unwrap_or(max);
    set_addr(t, manip, Addr::v4(a.to_be_bytes()));
}

#[inline]
fn low32(h: u64) -> u32 {
    let b = h.to_le_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Everything [`get_unique_tuple`] needs besides the tuple and the range.
pub struct AllocCtx<'a> {
    /// The by-source index (source manip only).
    pub by_source: &'a BySource,
    /// Random offsets.
    pub rng: &'a mut NatRng,
    /// Seed of the address hash.
    pub seed: u64,
    /// Whether a candidate REPLY tuple is in the table (either direction).
    pub is_taken: &'a mut dyn FnMut(&Tuple) -> bool,
    /// Ports known to be used towards busy endpoints (source manip), if kept.
    pub busy: Option<&'a BusyPorts>,
}

impl core::fmt::Debug for AllocCtx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AllocCtx")
            .field("seed", &self.seed)
            .finish()
    }
}

impl AllocCtx<'_> {
    #[inline]
    fn used(&mut self, t: &Tuple) -> bool {
        reply_of(t).is_none_or(|r| (self.is_taken)(&r))
    }

    /// [`AllocCtx::used`], answered by [`BusyPorts`] without a table lookup when it
    /// records `t` (a recorded binding is in the table: a lookup would hit, and read
    /// the connection's entry, a cache miss, to say so), or when it does not and is
    /// exact for `t`'s address ([`ExactIndex`]).
    #[inline]
    fn used_or_recorded(&mut self, t: &Tuple, memo: &mut Memo<'_>) -> bool {
        let (bits, exact) = memo.endpoint(t);
        bits.is_some_and(|b| b.test(t.src_l4)) || self.used_unless_exact(t, exact, memo)
    }

    /// [`AllocCtx::used`] of a candidate [`BusyPorts`] does not record; without the table
    /// check when the index is `exact` for it (counted in `memo`).
    #[inline]
    fn used_unless_exact(&mut self, t: &Tuple, exact: bool, memo: &mut Memo<'_>) -> bool {
        if exact {
            memo.unchecked += 1;
            t.invertible().is_err()
        } else {
            self.used(t)
        }
    }
}

/// What one source decision looked up in the engine's maps, kept so that no map key
/// is hashed twice in a decision: the [`BusyPorts`] record of the endpoint it last
/// asked about (the candidates of one source decision differ only in source address
/// and port, so the map is probed once per address instead of once per question),
/// and the hash of the source's by-source key. [`NatEngine::decide`] records its
/// binding with these hashes.
///
/// [`NatEngine::decide`]: super::NatEngine::decide
/// What [`Memo`] keeps about the last address asked about.
#[derive(Clone, Copy)]
struct Asked<'a> {
    addr: Addr,
    /// The [`BusyPorts`] hash of the endpoint at `addr`.
    hash: u64,
    /// Its map bucket and record, if recorded.
    bits: Option<(usize, &'a PortBits)>,
    /// Whether the index is exact at `addr`.
    exact: bool,
}

pub(crate) struct Memo<'a> {
    busy: Option<&'a BusyPorts>,
    /// Set when [`BusyPorts`] is exact for this decision ([`ExactIndex::holds`]).
    exact: Option<&'a ExactIndex>,
    /// The last address asked about.
    last: Option<Asked<'a>>,
    /// The source's by-source key, its hash and its map bucket if it has one.
    source: Option<(SrcKey, u64, Option<usize>)>,
    /// Candidates taken as free without a table check (exact index).
    pub(crate) unchecked: u32,
}

impl<'a> Memo<'a> {
    /// A memo for one decision; `busy` for a source manip with [`BusyPorts`] kept.
    pub(crate) fn new(busy: Option<&'a BusyPorts>) -> Self {
        Self {
            busy,
            exact: None,
            last: None,
            source: None,
            unchecked: 0,
        }
    }

    /// [`Memo::new`] for a source manip whose [`BusyPorts`] `busy` is exact at the
    /// addresses `exact` knows: candidates there that `busy` does not record are free.
    pub(crate) fn exact(busy: &'a BusyPorts, exact: &'a ExactIndex) -> Self {
        Self {
            exact: Some(exact),
            ..Self::new(Some(busy))
        }
    }

    /// The ports recorded towards `t`'s endpoint (its source port ignored), and
    /// whether the index is exact for `t`'s address.
    #[inline]
    fn endpoint(&mut self, t: &Tuple) -> (Option<&'a PortBits>, bool) {
        let Some(busy) = self.busy else {
            return (None, false);
        };
        match self.last {
            Some(x) if x.addr == t.src => (x.bits.map(|(_, b)| b), x.exact),
            _ => {
                let exact = self.exact.is_some_and(|x| x.knows(&t.src));
                if busy.is_empty() {
                    return (None, exact);
                }
                let (hash, bits) = busy.lookup(t);
                self.last = Some(Asked {
                    addr: t.src,
                    hash,
                    bits,
                    exact,
                });
                (bits.map(|(_, b)| b), exact)
            }
        }
    }

    /// The [`BusyPorts`] hash of `new`'s endpoint and the map bucket of its record if
    /// this decision found them (`new`: a candidate of the decision the memo was made
    /// for).
    pub(crate) fn endpoint_hash(&self, new: &Tuple) -> Option<(u64, Option<usize>)> {
        self.last
            .filter(|x| x.addr == new.src)
            .map(|x| (x.hash, x.bits.map(|(i, _)| i)))
    }

    /// The [`BySource`] key of `orig`'s source, its hash and its map bucket if this
    /// decision found them.
    fn source_hash(&self, orig: &Tuple) -> Option<(SrcKey, u64, Option<usize>)> {
        self.source.filter(|&(k, _, _)| Some(k) == key_of(orig))
    }
}

impl BySource {
    /// [`BySource::add`], with the source's key and hash taken from `memo` when the
    /// decision computed them.
    pub(crate) fn add_memo(&mut self, memo: &Memo<'_>, orig: &Tuple, addr: Addr, port: u16) {
        let Some((k, hash, bucket)) = memo.source_hash(orig) else {
            self.add(orig, addr, port);
            return;
        };
        let addr = v4_word(&addr);
        // The bucket `find` saw the source in, if nothing changed the map since.
        if let Some((x, ms)) = bucket.and_then(|i| self.map.get_bucket_mut(i))
            && *x == k
        {
            ms.add(addr, port);
        } else {
            self.add_hashed(hash, k, addr, port);
        }
    }
}

/// Linux `get_unique_tuple`: the new tuple (in ORIGINAL direction) for `cur` under
/// `range`. IPv4 only; an IPv6 tuple is returned unchanged.
///
/// # Errors
/// [`Exhausted`] when every candidate is used; `last` is the last one tried.
pub fn get_unique_tuple(
    cur: &Tuple,
    range: &NatRange,
    manip: Manip,
    ctx: &mut AllocCtx<'_>,
) -> Result<(Tuple, Found), Exhausted> {
    let mut memo = Memo::new(if manip == Manip::Src { ctx.busy } else { None });
    get_unique_tuple_memo(cur, range, manip, ctx, &mut memo)
}

/// [`get_unique_tuple`], keeping in `memo` what it looked up (`memo` made for this
/// decision, with `ctx.busy` for a source manip).
pub(crate) fn get_unique_tuple_memo(
    cur: &Tuple,
    range: &NatRange,
    manip: Manip,
    ctx: &mut AllocCtx<'_>,
    memo: &mut Memo<'_>,
) -> Result<(Tuple, Found), Exhausted> {
    if cur.family != Family::V4 {
        return Ok((*cur, Found::Kept));
    }
    // 1. Source manip, not fully random: keep the tuple, or reuse the source's mapping.
    if manip == Manip::Src && !range.random_fully {
        if in_range(cur, range, manip) {
            if !ctx.used_or_recorded(cur, memo) {
                return Ok((*cur, Found::Kept));
            }
        } else {
            let mut cand = *cur;
            let by_source = ctx.by_source;
            let hit = by_source.find(cur, memo, |a, p| {
                let mut t = *cur;
                t.src = a;
                set_key(&mut t, Manip::Src, p);
                in_range(&t, range, manip)
            });
            if let Some((a, p)) = hit {
                cand.src = a;
                set_key(&mut cand, Manip::Src, p);
                if !ctx.used_or_recorded(&cand, memo) {
                    return Ok((cand, Found::BySource));
                }
            }
        }
    }
    // 2. The address.
    let mut t = *cur;
    choose_addr(&mut t, range, manip, ctx.seed);
    // 3. Keep the port if that is free.
    if !range.random_fully {
        let keep = match (range.ports, key_of_l4(&t, manip)) {
            (Some(r), Some(k)) => r.contains(k) && !ctx.used_or_recorded(&t, memo),
            _ => !ctx.used_or_recorded(&t, memo),
        };
        if keep {
            return Ok((t, Found::AddrOnly));
        }
    }
    // 4. Search.
    search(cur, t, range, manip, ctx, memo)
}

/// Linux `nf_nat_l4proto_unique_tuple`.
fn search(
    cur: &Tuple,
    mut t: Tuple,
    range: &NatRange,
    manip: Manip,
    ctx: &mut AllocCtx<'_>,
    memo: &mut Memo<'_>,
) -> Result<(Tuple, Found), Exhausted> {
    let fail = |t: Tuple, probes| Exhausted {
        manip,
        tuple: *cur,
        last: t,
        probes,
    };
    let Some(orig_key) = key_of_l4(&t, manip) else {
        // Not a port protocol: nothing to change.
        return if range.random_fully && !ctx.used(&t) {
            Ok((t, Found::AddrOnly))
        } else {
            Err(fail(t, 1))
        };
    };
    let Some(r) = search_ports(&t, range, manip, orig_key) else {
        // Destination manip without ports leaves the port alone.
        return if range.random_fully && !ctx.used(&t) {
            Ok((t, Found::AddrOnly))
        } else {
            Err(fail(t, 1))
        };
    };
    let size = r.size();
    let mut off: u32 = if range.random_fully || manip == Manip::Src {
        u32::from(ctx.rng.next_u16())
    } else {
        0
    };
    if size == 0 {
        return Err(fail(t, 0));
    }
    if manip == Manip::Src && ctx.busy.is_some() {
        return search_free(cur, t, r, off % size, ctx, memo);
    }
    let mut attempts = size.min(128);
    let mut probes = 0u32;
    loop {
        for _ in 0..attempts {
            let port = u32::from(r.min) + off % size;
            off = off.wrapping_add(1);
            let port = u16::try_from(port).unwrap_or(r.max);
            set_key(&mut t, manip, port);
            probes += 1;
            if !ctx.used(&t) {
                return Ok((t, Found::Searched { probes }));
            }
        }
        if attempts >= size || attempts < 16 {
            return Err(fail(t, probes));
        }
        attempts /= 2;
        off = u32::from(ctx.rng.next_u16());
    }
}

/// The ports a search for `t` covers, given the original port (or id) `orig_key`;
/// `None` when the port is not changed (destination manip without ports).
fn search_ports(t: &Tuple, range: &NatRange, manip: Manip, orig_key: u16) -> Option<PortRange> {
    Some(match range.ports {
        Some(r) => r,
        None if t.is_icmp() => PortRange::new(0, u16::MAX),
        None if manip == Manip::Dst => return None,
        None if orig_key < 512 => PortRange::new(1, 511),
        None if orig_key < 1024 => PortRange::new(600, 1023),
        None => PortRange::new(1024, u16::MAX),
    })
}

/// Table checks a source search makes at most: Linux's probe budget.
pub const MAX_TABLE_CHECKS: u32 = 128 + 64 + 32 + 16;

/// The source-manip search with [`BusyPorts`]: the first port at or after Linux's offset
/// (`first = min + off`, wrapping) that the index does not record, checked in the table.
/// A port the index records is used (its connection is in the table, or was removed and
/// not yet released); a port it does not record may still be used by a connection that
/// is no binding (a plain connection from the NAT address, a destination-NAT reply),
/// so each candidate is checked and a used one skipped, unless the index is exact
/// ([`ExactIndex`]): then the first candidate is free. At most [`MAX_TABLE_CHECKS`]
/// candidates; [`Found::Searched`] counts them. [`Exhausted`] means every port of the
/// range is recorded, or the check budget ran out.
fn search_free(
    cur: &Tuple,
    mut t: Tuple,
    r: PortRange,
    off: u32,
    ctx: &mut AllocCtx<'_>,
    memo: &mut Memo<'_>,
) -> Result<(Tuple, Found), Exhausted> {
    // Every candidate of this search has the same endpoint: one map lookup (none
    // when an earlier question of this decision asked about the same address).
    let (bits, exact) = memo.endpoint(&t);
    let first = u16::try_from(u32::from(r.min) + off).unwrap_or(r.min);
    let mut checks = 0u32;
    // [first, max], then [min, first - 1].
    let segments = [(first, r.max), (r.min, first.saturating_sub(1))];
    let wraps = usize::from(first > r.min);
    for &(mut from, to) in &segments[..=wraps] {
        loop {
            let next = match bits {
                Some(b) => b.next_free(from, to),
                None => Some(from),
            };
            let Some(port) = next else { break };
            set_key(&mut t, Manip::Src, port);
            checks += 1;
            if !ctx.used_unless_exact(&t, exact, memo) {
                return Ok((t, Found::Searched { probes: checks }));
            }
            if checks >= MAX_TABLE_CHECKS || port >= to {
                break;
            }
            from = port + 1;
        }
        if checks >= MAX_TABLE_CHECKS {
            break;
        }
    }
    Err(Exhausted {
        manip: Manip::Src,
        tuple: *cur,
        last: t,
        probes: checks,
    })
}

// ------------------------------------------------------------ packed IPv4 source NAT

/// The little-endian word of an IPv4 address's bytes as the number [`v4`] reads
/// (network order).
#[inline]
fn host_v4(word: u32) -> u32 {
    u32::from_be_bytes(word.to_le_bytes())
}

/// The low 32 bits of a word (the source address of a [`PackedV4`]'s first word).
#[inline]
fn lo32(w: u64) -> u32 {
    u32::try_from(w & 0xFFFF_FFFF).unwrap_or(0)
}

/// `orig` with source address `addr` (the little-endian word of its bytes) and source
/// port `port`: a source-manip candidate, packed.
#[inline]
pub(crate) fn with_source(orig: PackedV4, addr: u32, port: u16) -> PackedV4 {
    let (a, r) = orig.words();
    PackedV4::from_words(
        a & !0xFFFF_FFFF | u64::from(addr),
        r & !0xFFFF | u64::from(port),
    )
}

/// The [`BusyPorts`] key of the candidates of `orig` at source address `addr`: what
/// [`endpoint_of`] gives for them.
#[inline]
fn endpoint_v4(orig: PackedV4, addr: u32) -> Endpoint {
    let (a, r) = orig.words();
    // `r`: src_l4 | dst_l4 << 16 | zone << 32 | proto << 48.
    Endpoint {
        addrs: a & !0xFFFF_FFFF | u64::from(addr),
        rest: (r >> 16) & 0xFFFF | ((r >> 48) & 0xFF) << 16 | ((r >> 32) & 0xFFFF) << 24,
    }
}

/// The by-source key of `orig`'s source: what [`key_of`] gives for it.
#[inline]
fn src_key_v4(orig: PackedV4) -> SrcKey {
    let (a, r) = orig.words();
    SrcKey {
        word: a & 0xFFFF_FFFF | (r & 0xFFFF) << 32 | ((r >> 48) & 0xFF) << 48,
        zone: u16::try_from((r >> 32) & 0xFFFF).unwrap_or(0),
    }
}

/// The source range of a decision on packed values ([`snat_v4`]): a [`NatRange`] with
/// a port range, not fully random, whose addresses are plain IPv4 ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnatV4Range {
    /// Lowest and highest address, as [`v4`] reads them.
    min: u32,
    max: u32,
    ports: PortRange,
    persistent: bool,
}

impl SnatV4Range {
    /// The range `min..=max`, `ports` with `flags` (a [`NatRange`]'s fields) when
    /// [`snat_v4`] covers it: ports given, `random_fully` off, both addresses plain
    /// IPv4 ([`Addr::v4`]); `None` otherwise (the general path decides).
    #[inline]
    pub(crate) fn new(
        min: &Addr,
        max: &Addr,
        ports: Option<PortRange>,
        flags: NatFlags,
    ) -> Option<Self> {
        let plain = |a: &Addr| u128::from_le_bytes(a.0) >> 32 == 0;
        let ports = ports?;
        (!flags.random_fully && plain(min) && plain(max)).then(|| Self {
            min: v4(min),
            max: v4(max),
            ports,
            persistent: flags.persistent,
        })
    }

    /// [`in_range`] of a candidate with source `(addr, port)` (`addr`: the
    /// little-endian word of its bytes).
    #[inline]
    fn holds(&self, addr: u32, port: u16) -> bool {
        let a = host_v4(addr);
        self.min <= a && a <= self.max && self.ports.contains(port)
    }

    /// [`choose_addr`] for source `src` and destination `dst` (little-endian words):
    /// the address, as such a word.
    #[inline]
    fn choose(&self, src: u32, dst: u32, seed: u64) -> u32 {
        if self.min == self.max {
            return host_v4(self.min);
        }
        let dst = if self.persistent { 0 } else { host_v4(dst) };
        let h = mix64(seed ^ (u64::from(host_v4(src)) << 32) ^ u64::from(dst));
        let size = u64::from(self.max - self.min) + 1;
        let off = (u64::from(low32(h)) * size) >> 32;
        let a = u32::try_from(u64::from(self.min) + off).unwrap_or(self.max);
        // `host_v4` is its own inverse (a byte swap).
        host_v4(a)
    }
}

/// What [`snat_v4`] chose: the source address (the little-endian word of its bytes)
/// and port, how, and what it looked up in the maps (for recording the binding).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChosenV4 {
    /// The source address.
    pub(crate) addr: u32,
    /// The source port.
    pub(crate) port: u16,
    /// How it was found.
    pub(crate) found: Found,
    /// Candidates taken as free without a table check (exact index).
    pub(crate) unchecked: u32,
    /// The [`BusyPorts`] hash of the chosen endpoint and its map bucket if recorded.
    endpoint: Option<(u64, Option<usize>)>,
    /// The source's by-source key, its hash and map bucket, if looked up.
    source: Option<(SrcKey, u64, Option<usize>)>,
    /// Whether the [`ExactIndex`] was asked about the address and knows it.
    known: bool,
}

impl ChosenV4 {
    /// Whether the address is one the [`ExactIndex`] knows ([`ExactIndex::knows`]):
    /// `false` when it was not asked.
    #[inline]
    pub(crate) fn known_nat_addr(&self) -> bool {
        self.known
    }
}

/// No free candidate: the last one tried (address as a little-endian word, port) and
/// the probes made, as in [`Exhausted`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailV4 {
    /// The last candidate's address.
    pub(crate) addr: u32,
    /// The last candidate's port.
    pub(crate) port: u16,
    /// Probes made.
    pub(crate) probes: u32,
    /// Candidates taken as free without a table check (none of them was free).
    pub(crate) unchecked: u32,
}

/// The [`BusyPorts`] record of the endpoint at one source address.
#[derive(Clone, Copy)]
struct AskedV4<'a> {
    addr: u32,
    hash: u64,
    bits: Option<(usize, &'a PortBits)>,
    exact: bool,
}

/// [`Memo`] for [`snat_v4`]: the candidates' questions on packed values.
struct AskV4<'a, 'b> {
    orig: PackedV4,
    busy: &'a BusyPorts,
    exact: Option<&'a ExactIndex>,
    is_taken: &'b mut dyn FnMut(PackedV4) -> bool,
    last: Option<AskedV4<'a>>,
    unchecked: u32,
}

impl<'a> AskV4<'a, '_> {
    /// The record of the endpoint at `addr` (one map lookup per address).
    #[inline(always)]
    fn ask(&mut self, addr: u32) -> AskedV4<'a> {
        match self.last {
            Some(x) if x.addr == addr => x,
            _ => {
                let exact = self
                    .exact
                    .is_some_and(|x| x.knows(&Addr::v4(addr.to_le_bytes())));
                let (hash, bits) = self.busy.lookup_key(endpoint_v4(self.orig, addr));
                let x = AskedV4 {
                    addr,
                    hash,
                    bits,
                    exact,
                };
                self.last = Some(x);
                x
            }
        }
    }

    /// [`AllocCtx::used_or_recorded`] of the candidate `(addr, port)`.
    #[inline(always)]
    fn used(&mut self, addr: u32, port: u16) -> bool {
        let x = self.ask(addr);
        x.bits.is_some_and(|(_, b)| b.test(port)) || self.unless_exact(addr, port, x.exact)
    }

    /// [`AllocCtx::used_unless_exact`] of the candidate `(addr, port)`.
    #[inline(always)]
    fn unless_exact(&mut self, addr: u32, port: u16, exact: bool) -> bool {
        if exact {
            self.unchecked += 1;
            false
        } else {
            // Not ICMP (`snat_v4`'s contract): the reply is the plain inverse.
            (self.is_taken)(with_source(self.orig, addr, port).invert_ports())
        }
    }

    /// The chosen candidate `(addr, port)`, found as `found`.
    #[inline(always)]
    fn chosen(
        &self,
        addr: u32,
        port: u16,
        found: Found,
        source: Option<(SrcKey, u64, Option<usize>)>,
    ) -> ChosenV4 {
        ChosenV4 {
            addr,
            port,
            found,
            unchecked: self.unchecked,
            endpoint: self
                .last
                .filter(|x| x.addr == addr)
                .map(|x| (x.hash, x.bits.map(|(i, _)| i))),
            source,
            // `exact` is set only where the index knows the address.
            known: self.last.is_some_and(|x| x.addr == addr && x.exact),
        }
    }
}

/// [`get_unique_tuple_memo`] of a source manip for the common case, on packed values:
/// `orig` an IPv4 tuple of a protocol with ports ([`has_ports`], not ICMP), `range`
/// with a port range and not fully random, [`BusyPorts`] kept. The same steps, the
/// same random draws and the same choice (tested against the general path): keep the
/// source if it is in range and free, else reuse the source's first mapping in range
/// if free, else the hashed address with the original port if in range and free, else
/// the first free port from the random offset. `exact`: the [`ExactIndex`] when
/// [`ExactIndex::holds`] for this decision; `is_taken` answers for the candidates it
/// does not cover, given their packed REPLY tuple. No [`Tuple`] is built.
///
/// # Errors
/// [`FailV4`] when no candidate is free (the general path's [`Exhausted`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn snat_v4(
    orig: PackedV4,
    range: &SnatV4Range,
    seed: u64,
    by_source: &BySource,
    busy: &BusyPorts,
    exact: Option<&ExactIndex>,
    rng: &mut NatRng,
    is_taken: &mut dyn FnMut(PackedV4) -> bool,
) -> Result<ChosenV4, FailV4> {
    let (words, rest) = orig.words();
    debug_assert!(has_ports(u8::try_from(rest >> 48 & 0xFF).unwrap_or(0)));
    let (src, dst) = (lo32(words), lo32(words >> 32));
    let sport = u16::try_from(rest & 0xFFFF).unwrap_or(0);
    let mut ask = AskV4 {
        orig,
        busy,
        exact,
        is_taken,
        last: None,
        unchecked: 0,
    };
    let mut source = None;
    // 1. Keep the source, or reuse the source's mapping.
    if range.holds(src, sport) {
        if !ask.used(src, sport) {
            return Ok(ask.chosen(src, sport, Found::Kept, source));
        }
    } else if !by_source.map.is_empty() {
        let k = src_key_v4(orig);
        let hash = by_source.hash(k);
        let i = by_source.map.find_bucket_index(hash, |(x, _)| *x == k);
        source = Some((k, hash, i));
        let hit = i
            .and_then(|i| by_source.map.get_bucket(i))
            .and_then(|(_, ms)| {
                core::iter::once(&ms.first)
                    .chain(ms.more.iter())
                    .find(|m| range.holds(m.addr, m.port))
            });
        if let Some(m) = hit
            && !ask.used(m.addr, m.port)
        {
            return Ok(ask.chosen(m.addr, m.port, Found::BySource, source));
        }
    }
    // 2. The address; 3. the original port there, if in range and free.
    let addr = range.choose(src, dst, seed);
    let r = range.ports;
    if r.contains(sport) && !ask.used(addr, sport) {
        return Ok(ask.chosen(addr, sport, Found::AddrOnly, source));
    }
    // 4. The search (`search`, then `search_free`).
    let size = r.size();
    let off = u32::from(rng.next_u16());
    let fail = |ask: &AskV4<'_, '_>, port, probes| FailV4 {
        addr,
        port,
        probes,
        unchecked: ask.unchecked,
    };
    if size == 0 {
        return Err(fail(&ask, sport, 0));
    }
    let x = ask.ask(addr);
    let first = u16::try_from(u32::from(r.min) + off % size).unwrap_or(r.min);
    let (mut checks, mut last) = (0u32, sport);
    // [first, max], then [min, first - 1] if not empty.
    let (mut from, mut to, mut wrap) = (first, r.max, first > r.min);
    loop {
        let next = match x.bits {
            Some((_, b)) => b.next_free(from, to),
            None => Some(from),
        };
        if let Some(port) = next {
            last = port;
            checks += 1;
            if !ask.unless_exact(addr, port, x.exact) {
                return Ok(ask.chosen(addr, port, Found::Searched { probes: checks }, source));
            }
            if checks >= MAX_TABLE_CHECKS {
                break;
            }
            if port < to {
                from = port + 1;
                continue;
            }
        }
        // This segment is done.
        if !wrap {
            break;
        }
        (from, to, wrap) = (r.min, first - 1, false);
    }
    Err(fail(&ask, last, checks))
}

impl BusyPorts {
    /// The map hash of `key`, and the map bucket and record of the endpoint if recorded.
    #[inline(always)]
    fn lookup_key(&self, key: Endpoint) -> (u64, Option<(usize, &PortBits)>) {
        use core::hash::BuildHasher;
        let hash = self.build.hash_one(key);
        let bits = self
            .map
            .find_bucket_index(hash, |(k, _)| *k == key)
            .and_then(|i| self.map.get_bucket(i).map(|(_, b)| (i, b)));
        (hash, bits)
    }

    /// [`BusyPorts::add`] of the binding [`snat_v4`] chose for `orig` (`chosen`, which
    /// knows the endpoint's hash and bucket when it asked about its address).
    #[inline(always)]
    pub(crate) fn add_v4(&mut self, orig: PackedV4, chosen: &ChosenV4) -> bool {
        use core::hash::BuildHasher;
        let key = endpoint_v4(orig, chosen.addr);
        let (hash, bucket) = chosen
            .endpoint
            .unwrap_or_else(|| (self.build.hash_one(key), None));
        self.add_key(hash, bucket, key, chosen.port)
    }
}

impl BySource {
    /// [`BySource::add`] of the binding [`snat_v4`] chose for `orig` (`chosen`, which
    /// knows the source's hash and bucket when it looked the source up).
    #[inline(always)]
    pub(crate) fn add_v4(&mut self, orig: PackedV4, chosen: &ChosenV4) {
        let (addr, port) = (chosen.addr, chosen.port);
        let Some((k, hash, bucket)) = chosen.source else {
            let k = src_key_v4(orig);
            self.add_hashed(self.hash(k), k, addr, port);
            return;
        };
        if let Some((x, ms)) = bucket.and_then(|i| self.map.get_bucket_mut(i))
            && *x == k
        {
            ms.add(addr, port);
        } else {
            self.add_hashed(hash, k, addr, port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Tuple {
        Tuple::v4(src, sp, dst, dp, proto::UDP)
    }

    fn snat(min: [u8; 4], max: [u8; 4], ports: Option<PortRange>) -> NatRange {
        NatRange {
            min_addr: Addr::v4(min),
            max_addr: Addr::v4(max),
            ports,
            random_fully: false,
            persistent: false,
        }
    }

    #[test]
    fn rng_offsets_cover_the_range() {
        // Regression: next_u16 once returned the zero high bytes of a shifted u64, so
        // every search started at the range's first port and never got past 128.
        let mut rng = NatRng::new(5);
        let seen: HashSet<u16> = (0..4096).map(|_| rng.next_u16() % 1024).collect();
        assert!(seen.len() > 900, "{} distinct offsets", seen.len());
    }

    #[test]
    fn a_range_fills_past_the_first_probe_window() {
        let by = BySource::default();
        let mut rng = NatRng::new(9);
        let mut taken: HashSet<Tuple> = HashSet::new();
        let ports = PortRange::new(20_000, 21_023);
        let range = snat([192, 0, 2, 1], [192, 0, 2, 1], Some(ports));
        for i in 0..900u32 {
            let [_, b, c, d] = i.to_be_bytes();
            let cur = udp([10, b, c, d], 40_000, [8, 8, 8, 8], 53);
            let mut is_taken = |t: &Tuple| taken.contains(t);
            let mut ctx = AllocCtx {
                by_source: &by,
                rng: &mut rng,
                seed: 0,
                is_taken: &mut is_taken,
                busy: None,
            };
            let (t, _) = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert!(ports.contains(t.src_l4));
            assert!(taken.insert(t.invert().expect("udp")), "unique");
        }
    }

    /// The port an indexed search must choose: the first port at or after
    /// `min + off % size` (wrapping) that `taken` does not hold.
    fn first_free_after(r: PortRange, off: u16, free: impl Fn(u16) -> bool) -> Option<u16> {
        let size = r.size();
        (0..size)
            .map(|i| u16::try_from(u32::from(r.min) + (u32::from(off) + i) % size).expect("port"))
            .find(|&p| free(p))
    }

    #[test]
    fn indexed_search_takes_the_first_free_port_after_the_offset_with_one_check() {
        let by = BySource::default();
        let ports = PortRange::new(20_000, 20_255);
        let range = snat([192, 0, 2, 1], [192, 0, 2, 1], Some(ports));
        let mut taken: HashSet<Tuple> = HashSet::new();
        let mut busy = BusyPorts::default();
        let mut rng = NatRng::new(21);
        for i in 0..256u32 {
            let [_, b, c, d] = i.to_be_bytes();
            let cur = udp([10, b, c, d], 40_000, [8, 8, 8, 8], 53);
            let off = rng.clone().next_u16();
            let expected = first_free_after(ports, off, |p| {
                let mut t = cur;
                t.src = Addr::v4([192, 0, 2, 1]);
                t.src_l4 = p;
                !taken.contains(&t.invert().expect("udp"))
            });
            let mut lookups = 0u32;
            let mut is_taken = |t: &Tuple| {
                lookups += 1;
                taken.contains(t)
            };
            let mut ctx = AllocCtx {
                by_source: &by,
                rng: &mut rng,
                seed: 0,
                is_taken: &mut is_taken,
                busy: Some(&busy),
            };
            let (t, found) = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(Some(t.src_l4), expected, "connection {i}");
            // The original port is outside the range: the search's candidate is the only
            // table check.
            assert_eq!(found, Found::Searched { probes: 1 }, "connection {i}");
            assert_eq!(lookups, 1, "connection {i}: one table check in the search");
            busy.add(&t);
            assert!(taken.insert(t.invert().expect("udp")));
        }
        assert_eq!((busy.len(), busy.bitmaps()), (1, 1), "one busy endpoint");
        // Full: the next search gives up without asking the table.
        let cur = udp([10, 9, 9, 9], 40_000, [8, 8, 8, 8], 53);
        let mut is_taken = |t: &Tuple| taken.contains(t);
        let mut ctx = AllocCtx {
            by_source: &by,
            rng: &mut rng,
            seed: 0,
            is_taken: &mut is_taken,
            busy: Some(&busy),
        };
        let e = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx).expect_err("full");
        assert_eq!(e.probes, 0);
        // Releasing every recorded binding forgets the endpoint.
        for t in taken.iter().map(|r| r.invert().expect("udp")) {
            busy.remove(&t);
        }
        assert!(busy.is_empty());
    }

    #[test]
    fn indexed_search_skips_ports_the_table_holds_for_other_connections() {
        // Ports 20000-20009 are held by plain connections from the NAT address itself:
        // the index does not know them, the table check does.
        let by = BySource::default();
        let busy = BusyPorts::default();
        let ports = PortRange::new(20_000, 20_009);
        let range = snat([192, 0, 2, 1], [192, 0, 2, 1], Some(ports));
        let mut rng = NatRng::new(4);
        let held = |t: &Tuple| t.dst_l4 != 20_004 || t.src != Addr::v4([8, 8, 8, 8]);
        let mut is_taken = held;
        let mut ctx = AllocCtx {
            by_source: &by,
            rng: &mut rng,
            seed: 0,
            is_taken: &mut is_taken,
            busy: Some(&busy),
        };
        let cur = udp([10, 0, 0, 1], 40_000, [8, 8, 8, 8], 53);
        let (t, _) = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx).expect("one free");
        assert_eq!(t.src_l4, 20_004);
        let mut all = |_: &Tuple| true;
        ctx.is_taken = &mut all;
        let e = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx).expect_err("none free");
        assert_eq!(e.probes, 10, "each port of the range checked once");
    }

    #[test]
    fn dense_next_free_scans_words_within_bounds() {
        let mut bits = PortBits::Dense {
            words: Box::new([0; 1024]),
            count: 0,
        };
        if let PortBits::Dense { words, .. } = &mut bits {
            words[1] = u64::MAX; // ports 64-127
            words[2] = !1u64 << 5; // 128-133 free, 134-191 used
        }
        assert_eq!(bits.next_free(64, 200), Some(128));
        assert_eq!(bits.next_free(64, 127), None);
        assert_eq!(bits.next_free(129, 191), Some(129));
        assert_eq!(bits.next_free(134, 191), None);
        assert_eq!(bits.next_free(134, 192), Some(192));
        assert_eq!(bits.next_free(65_535, 65_535), Some(65_535));
        let few = PortBits::Few {
            ports: [5, 6, 7, 0, 0, 0, 0],
            n: 3,
        };
        assert_eq!(few.next_free(5, 10), Some(8));
        assert_eq!(few.next_free(5, 7), None);
        assert_eq!(few.next_free(4, 7), Some(4));
    }

    #[test]
    fn keeps_port_when_free_and_searches_when_taken() {
        let by = BySource::default();
        let mut rng = NatRng::new(1);
        let mut taken: HashSet<Tuple> = HashSet::new();
        let range = snat([192, 0, 2, 1], [192, 0, 2, 1], None);
        let cur = udp([10, 0, 0, 1], 40000, [8, 8, 8, 8], 53);
        let mut is_taken = |t: &Tuple| taken.contains(t);
        let mut ctx = AllocCtx {
            by_source: &by,
            rng: &mut rng,
            seed: 0,
            is_taken: &mut is_taken,
            busy: None,
        };
        let (t, f) = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx).expect("free");
        assert_eq!(f, Found::AddrOnly);
        assert_eq!(t.src, Addr::v4([192, 0, 2, 1]));
        assert_eq!(t.src_l4, 40000);
        taken.insert(t.invert().expect("udp"));
        let mut is_taken = |t: &Tuple| taken.contains(t);
        let mut ctx = AllocCtx {
            by_source: &by,
            rng: &mut rng,
            seed: 0,
            is_taken: &mut is_taken,
            busy: None,
        };
        let other = udp([10, 0, 0, 2], 40000, [8, 8, 8, 8], 53);
        let (t2, f2) = get_unique_tuple(&other, &range, Manip::Src, &mut ctx).expect("free");
        assert!(matches!(f2, Found::Searched { .. }));
        assert_ne!(t2.src_l4, 40000);
        assert!(t2.src_l4 >= 1024, "default range by original port");
        // Another destination: the same port is free again (per-destination uniqueness).
        let third = udp([10, 0, 0, 2], 40000, [1, 1, 1, 1], 53);
        let (t3, _) = get_unique_tuple(&third, &range, Manip::Src, &mut ctx).expect("free");
        assert_eq!(t3.src_l4, 40000);
    }

    #[test]
    fn default_ranges_follow_original_port() {
        let by = BySource::default();
        let mut rng = NatRng::new(9);
        let range = snat([192, 0, 2, 1], [192, 0, 2, 1], None);
        for (port, lo, hi) in [(100, 1, 511), (700, 600, 1023), (5000, 1024, 65535)] {
            // Everything with the original port is taken: force a search.
            let cur = udp([10, 0, 0, 1], port, [8, 8, 8, 8], 53);
            let mut is_taken = |t: &Tuple| t.dst_l4 == port;
            let mut ctx = AllocCtx {
                by_source: &by,
                rng: &mut rng,
                seed: 0,
                is_taken: &mut is_taken,
                busy: None,
            };
            let (t, _) = get_unique_tuple(&cur, &range, Manip::Src, &mut ctx).expect("free");
            assert!((lo..=hi).contains(&t.src_l4), "{port} -> {}", t.src_l4);
        }
    }

    #[test]
    fn dst_manip_searches_from_lowest_port() {
        let by = BySource::default();
        let mut rng = NatRng::new(3);
        let range = NatRange {
            ports: Some(PortRange::new(8000, 8009)),
            ..NatRange::addr(Addr::v4([10, 0, 0, 9]))
        };
        // 8000 and 8001 taken: 8002 is chosen.
        let mut is_taken = |t: &Tuple| t.src_l4 < 8002;
        let mut ctx = AllocCtx {
            by_source: &by,
            rng: &mut rng,
            seed: 0,
            is_taken: &mut is_taken,
            busy: None,
        };
        let cur = udp([1, 2, 3, 4], 5555, [203, 0, 113, 1], 80);
        let (t, _) = get_unique_tuple(&cur, &range, Manip::Dst, &mut ctx).expect("free");
        assert_eq!((t.dst, t.dst_l4), (Addr::v4([10, 0, 0, 9]), 8002));
    }

    #[test]
    fn address_choice_is_deterministic_and_persistent_ignores_destination() {
        let by = BySource::default();
        let mut rng = NatRng::new(3);
        let mut free = |_: &Tuple| false;
        let mut ctx = AllocCtx {
            by_source: &by,
            rng: &mut rng,
            seed: 42,
            is_taken: &mut free,
            busy: None,
        };
        let mut range = snat([192, 0, 2, 1], [192, 0, 2, 200], None);
        let a = udp([10, 0, 0, 1], 1000, [8, 8, 8, 8], 53);
        let b = udp([10, 0, 0, 1], 1001, [8, 8, 8, 8], 53);
        let x = get_unique_tuple(&a, &range, Manip::Src, &mut ctx)
            .expect("ok")
            .0;
        let y = get_unique_tuple(&b, &range, Manip::Src, &mut ctx)
            .expect("ok")
            .0;
        assert_eq!(x.src, y.src, "same (src, dst) pair, same address");
        range.persistent = true;
        let mut seen = HashSet::new();
        for d in 0..50u8 {
            let c = udp([10, 0, 0, 1], 1000, [8, 8, 8, d], 53);
            seen.insert(
                get_unique_tuple(&c, &range, Manip::Src, &mut ctx)
                    .expect("ok")
                    .0
                    .src,
            );
        }
        assert_eq!(seen.len(), 1, "persistent: one address per source");
    }

    #[test]
    fn by_source_refcounts() {
        let mut by = BySource::default();
        let o = udp([10, 0, 0, 1], 1000, [8, 8, 8, 8], 53);
        let n = Addr::v4([192, 0, 2, 1]);
        by.add(&o, n, 2000);
        by.add(&o, n, 2000);
        by.add(&o, n, 2001);
        assert_eq!(by.refs(&o, n, 2000), 2);
        by.remove(&o, n, 2000);
        by.remove(&o, n, 2000);
        assert_eq!(by.refs(&o, n, 2000), 0);
        assert_eq!(by.refs(&o, n, 2001), 1);
        by.remove(&o, n, 2001);
        assert!(by.is_empty());
        by.remove(&o, n, 2001); // unknown: ignored
    }

    #[test]
    fn by_source_counts_a_mapping_held_by_several_entries() {
        // 2000, 2001, 2000 again: the second 2000 gets its own entry (add compares only
        // with the first); references add up and the mapping stays findable until the
        // last one is dropped.
        let mut by = BySource::default();
        let o = udp([10, 0, 0, 1], 1000, [8, 8, 8, 8], 53);
        let n = Addr::v4([192, 0, 2, 1]);
        by.add(&o, n, 2001);
        by.add(&o, n, 2000);
        by.add(&o, n, 2002);
        by.add(&o, n, 2000);
        assert_eq!(by.refs(&o, n, 2000), 2);
        let found = |by: &BySource, port| {
            by.find(&o, &mut Memo::new(None), |_, p| p == port)
                .is_some()
        };
        by.remove(&o, n, 2000);
        assert!(found(&by, 2000));
        by.remove(&o, n, 2001);
        by.remove(&o, n, 2000);
        assert!(!found(&by, 2000));
        assert!(found(&by, 2002));
        by.remove(&o, n, 2002);
        assert!(by.is_empty());
    }

    /// A small IPv4 tuple from a few fields (addresses and ports from tiny sets, so
    /// that two draws are often equal in some fields and not in others).
    fn small(f: (u8, u8, u8, u8, u8, u8)) -> Tuple {
        let (s, d, sp, dp, p, z) = f;
        let mut t = udp(
            [10, 0, 0, s],
            1000 + u16::from(sp),
            [10, 0, 1, d],
            53 + u16::from(dp),
        );
        t.proto = [proto::UDP, proto::TCP][usize::from(p & 1)];
        t.zone = u16::from(z) << 8;
        t
    }

    fn fields() -> impl proptest::strategy::Strategy<Value = (u8, u8, u8, u8, u8, u8)> {
        (0u8..3, 0u8..3, 0u8..3, 0u8..3, 0u8..2, 0u8..2)
    }

    proptest::proptest! {
        /// The packed keys are exact: two tuples get the same `BusyPorts` endpoint
        /// exactly when they agree in every field but the source port, and the same
        /// by-source key exactly when their sources (address, port, protocol, zone)
        /// agree; an endpoint gives its tuple back.
        #[test]
        fn packed_keys_are_exact(a in fields(), b in fields(), port: u16) {
            let (ta, tb) = (small(a), small(b));
            let same_endpoint = (ta.src, ta.dst, ta.dst_l4, ta.proto, ta.zone)
                == (tb.src, tb.dst, tb.dst_l4, tb.proto, tb.zone);
            proptest::prop_assert_eq!(endpoint_of(&ta) == endpoint_of(&tb), same_endpoint);
            let same_source = (ta.src, ta.src_l4, ta.proto, ta.zone)
                == (tb.src, tb.src_l4, tb.proto, tb.zone);
            proptest::prop_assert_eq!(key_of(&ta) == key_of(&tb), same_source);
            let e = endpoint_of(&ta).expect("an IPv4 tuple has an endpoint");
            proptest::prop_assert_eq!(e.tuple(port), Tuple { src_l4: port, ..ta });
            proptest::prop_assert_eq!(e.dst(), ta.dst);
        }
    }

    proptest::proptest! {
        /// The packed candidates of `snat_v4` are the general path's: the endpoint
        /// and by-source keys, the candidate tuple, the range test and the address
        /// choice, for any source address and port.
        #[test]
        fn packed_candidates_are_the_tuples(
            f in fields(),
            a in 0u8..6,
            port in 2998u16..3003,
            bounds in (0u8..6, 0u8..4),
            ports in (2999u16..3002, 0u16..3),
            persistent: bool,
            seed: u64,
        ) {
            let t = small(f);
            let p = t.pack_v4().expect("IPv4");
            let to = [192, 0, 2, a];
            let word = u32::from_le_bytes(to);
            let cand = Tuple { src: Addr::v4(to), src_l4: port, ..t };
            proptest::prop_assert_eq!(with_source(p, word, port).unpack(), cand);
            proptest::prop_assert!(Some(endpoint_v4(p, word)) == endpoint_of(&cand));
            proptest::prop_assert_eq!(Some(src_key_v4(p)), key_of(&t));
            let range = NatRange {
                min_addr: Addr::v4([192, 0, 2, bounds.0]),
                max_addr: Addr::v4([192, 0, 2, bounds.0 + bounds.1]),
                ports: Some(PortRange::new(ports.0, ports.0 + ports.1)),
                random_fully: false,
                persistent,
            };
            let flags = NatFlags { random_fully: false, persistent };
            let r = SnatV4Range::new(&range.min_addr, &range.max_addr, range.ports, flags)
                .expect("covered");
            proptest::prop_assert_eq!(r.holds(word, port), in_range(&cand, &range, Manip::Src));
            let mut chosen = t;
            choose_addr(&mut chosen, &range, Manip::Src, seed);
            let (src, dst) = (v4_word(&t.src), v4_word(&t.dst));
            proptest::prop_assert_eq!(Addr::v4(r.choose(src, dst, seed).to_le_bytes()), chosen.src);
        }
    }

    #[test]
    fn ipv6_bindings_are_not_recorded() {
        let t = Tuple::v6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            1000,
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            53,
            proto::UDP,
        );
        let mut busy = BusyPorts::default();
        assert!(!busy.add(&t) && !busy.contains(&t) && busy.is_empty());
        let mut by = BySource::default();
        by.add(&t, t.src, 2000);
        assert!(by.is_empty());
        assert_eq!(by.refs(&t, t.src, 2000), 0);
        by.remove(&t, t.src, 2000);
        // An IPv4 address with bytes past its four is no IPv4 endpoint either.
        let mut odd = udp([10, 0, 0, 1], 1000, [10, 0, 1, 1], 53);
        odd.dst.0[9] = 1;
        assert!(endpoint_of(&odd).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random binds and releases towards three endpoints through a 16-port range,
        /// the index maintained as the engine does: a chosen port is in range and free,
        /// never bound twice, a search fails only when the endpoint's range is full, and
        /// a released port is free again (when it is the only free one, it is chosen).
        #[test]
        fn indexed_ports_are_free_unique_and_released(
            ops in proptest::collection::vec((0u8..3, proptest::bool::ANY, 0usize..64), 1..300),
        ) {
            let ports = PortRange::new(30_000, 30_015);
            let range = snat([192, 0, 2, 1], [192, 0, 2, 1], Some(ports));
            let by = BySource::default();
            let mut busy = BusyPorts::default();
            let mut rng = NatRng::new(77);
            let mut taken: HashSet<Tuple> = HashSet::new();
            let mut live: Vec<Tuple> = Vec::new();
            let mut released: [Option<u16>; 3] = [None; 3];
            let mut client = 0u32;
            for (server, bind, pick) in ops {
                let dst = [198, 51, 100, server];
                if bind || live.is_empty() {
                    client += 1;
                    let [_, b, c, d] = client.to_be_bytes();
                    let cur = udp([10, b, c, d], 50_000, dst, 53);
                    let bound = live.iter().filter(|t| t.dst == Addr::v4(dst)).count();
                    let mut is_taken = |t: &Tuple| taken.contains(t);
                    let mut ctx = AllocCtx {
                        by_source: &by,
                        rng: &mut rng,
                        seed: 0,
                        is_taken: &mut is_taken,
                        busy: Some(&busy),
                    };
                    match get_unique_tuple(&cur, &range, Manip::Src, &mut ctx) {
                        Ok((t, _)) => {
                            proptest::prop_assert!(bound < 16);
                            proptest::prop_assert!(ports.contains(t.src_l4));
                            // Released from a full range and nothing bound since: the
                            // only free port.
                            if let Some(p) = released[usize::from(server)].take()
                                && bound == 15
                            {
                                proptest::prop_assert_eq!(t.src_l4, p, "the released port");
                            }
                            proptest::prop_assert!(!busy.contains(&t), "not recorded before");
                            proptest::prop_assert!(taken.insert(t.invert().expect("udp")), "never bound twice");
                            busy.add(&t);
                            live.push(t);
                        }
                        Err(e) => {
                            proptest::prop_assert_eq!(bound, 16, "{}", e);
                        }
                    }
                } else {
                    let t = live.swap_remove(pick % live.len());
                    proptest::prop_assert!(busy.contains(&t));
                    busy.remove(&t);
                    taken.remove(&t.invert().expect("udp"));
                    proptest::prop_assert!(!busy.contains(&t), "release frees it");
                    let k = usize::from(t.dst.as_v4()[3]);
                    released[k] = Some(t.src_l4);
                }
            }
            for t in live.drain(..) {
                busy.remove(&t);
            }
            proptest::prop_assert!(busy.is_empty());
        }
    }
}
