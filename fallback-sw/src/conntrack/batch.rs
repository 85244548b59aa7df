//! Batched processing: [`Conntrack::process_batch`].
//!
//! A batch goes through three passes so that the cache misses of different packets
//! overlap instead of being paid one after the other, with prefetch instructions
//! ([`crate::prefetch`]: they do not wait for their line, where a load that misses
//! holds up every instruction after it):
//!
//! 1. parse every frame (checksums included), build its tuple and hash it, and
//!    prefetch the first index cell of its probe (the parse of the next frames covers
//!    the miss);
//! 2. read that cell and prefetch the connection that the first cell of the probe run
//!    with a matching hash tag points to (the entry is one cache line holding the key,
//!    timeout, counters and protocol state the last pass will use; a new connection's
//!    reply tuple, without NAT, has the same index hash as its original: pass 1
//!    prefetched the cell its insert will probe);
//! 3. finish each packet in order, exactly as [`Conntrack::process`] would.
//!
//! Pass 2 only reads, so a packet may depend on an earlier one of the same batch
//! (a SYN-ACK after the SYN that created its connection): pass 3 does the real lookup.

use super::{
    Conntrack, Family, Invalid, L4, NatOutcome, NatVerdict, Reopen, Tuple, Verdict, family_of,
    icmpv6_untracked, tuple_of,
};
use crate::nat::PacketMeta;
use crate::table::FoundV4;
use crate::tuple::PackedV4;
use crate::wire::{self, Fragment, ParsedPacket, PlainUdp, PlainV4, TcpInfo, V4Layout, ip_proto};

/// Frames processed together by [`Conntrack::process_batch`]; longer inputs are cut into
/// batches of this size.
pub const BATCH: usize = 32;

/// Below this many connections the table fits the caches of a core (about 94 bytes a
/// connection against 512 KiB of L2) and the prefetches cost more than they save.
const PREFETCH_MIN_CONNECTIONS: usize = 4096;

/// A frame after pass 1.
#[derive(Clone, Copy)]
enum Pre {
    /// Its verdict is already written.
    Done,
    /// Goes the per-packet way (not IP, fragment, ICMP error, untracked ICMPv6).
    Slow(ParsedPacket),
    /// The common way: a tuple to look up.
    Fast {
        pkt: ParsedPacket,
        tuple: Tuple,
        hash: u64,
    },
    /// The established path ([`Conntrack::track_v4`]): a plain IPv4 TCP frame and its
    /// packed tuple.
    V4 {
        plain: PlainV4,
        key: PackedV4,
        hash: u64,
    },
    /// The established path of a plain IPv4 UDP datagram ([`Conntrack::track_udp`]).
    Udp(UdpV4),
}

impl Pre {
    /// The index hash of a frame that has a tuple to look up.
    #[inline]
    fn hash(&self) -> Option<u64> {
        match self {
            Pre::Fast { hash, .. } | Pre::V4 { hash, .. } | Pre::Udp(UdpV4 { hash, .. }) => {
                Some(*hash)
            }
            Pre::Done | Pre::Slow(_) => None,
        }
    }
}

/// A plain IPv4 UDP datagram after pass 1: its packed tuple and hash, and the few
/// fields besides them that its [`PlainV4`] holds (a third of the record; the
/// [`PlainV4`] is rebuilt only when the packet leaves the established path).
#[derive(Clone, Copy)]
struct UdpV4 {
    key: PackedV4,
    hash: u64,
    l3_len: u16,
    payload_len: u16,
    ttl: u8,
}

impl UdpV4 {
    /// The datagram's ports, from its key.
    #[inline]
    fn ports(&self) -> (u16, u16) {
        let [s0, s1, d0, d1, ..] = self.key.words().1.to_le_bytes();
        (u16::from_le_bytes([s0, s1]), u16::from_le_bytes([d0, d1]))
    }

    /// What [`wire::plain_v4`] read.
    #[inline]
    fn plain(&self) -> PlainV4 {
        PlainV4::udp(
            self.key.words().0.to_le_bytes(),
            self.ports(),
            self.l3_len,
            self.ttl,
            self.payload_len,
        )
    }
}

/// The tuple of a packet that takes the common path of
/// [`Conntrack::track_parsed`], or `None` when it takes another one.
#[inline]
fn common_tuple(pkt: &ParsedPacket, zone: u16) -> Option<Tuple> {
    let family = family_of(pkt.l3)?;
    if pkt.fragment == Fragment::NonFirst {
        return None;
    }
    match pkt.l4 {
        L4::IcmpError { .. } => None,
        L4::IcmpOther { icmp_type, .. } if family == Family::V6 && icmpv6_untracked(icmp_type) => {
            None
        }
        _ => Some(tuple_of(
            family,
            pkt.src,
            pkt.dst,
            pkt.protocol,
            &pkt.l4,
            zone,
        )),
    }
}

impl Conntrack {
    /// Track a batch of frames that arrived in `zone` at `now`: `out[i]` receives the
    /// verdict of `frames[i]`, for the first `min(frames.len(), out.len())` frames. The
    /// results, counters and events are those of [`Conntrack::process`] called on each
    /// frame in order; only faster, because the memory accesses of up to `BATCH` (32)
    /// packets overlap.
    pub fn process_batch(&mut self, frames: &[&[u8]], zone: u16, now: u64, out: &mut [Verdict]) {
        let n = frames.len().min(out.len());
        for (f, o) in frames[..n].chunks(BATCH).zip(out[..n].chunks_mut(BATCH)) {
            self.batch(f, zone, now, o);
        }
    }

    fn batch(&mut self, frames: &[&[u8]], zone: u16, now: u64, out: &mut [Verdict]) {
        let mut pre = [Pre::Done; BATCH];
        let pre = &mut pre[..frames.len()];
        // 1: parse, classify, hash.
        let big = self.table.capacity() >= PREFETCH_MIN_CONNECTIONS;
        for ((frame, o), p) in frames.iter().zip(out.iter_mut()).zip(pre.iter_mut()) {
            self.classify_frame(frame, zone, p, o);
            if big {
                self.prefetch_index(p);
            }
        }
        if big {
            self.prefetch_entries(pre);
        }
        // 3: finish in order.
        let meta = PacketMeta::default();
        for ((frame, o), p) in frames.iter().zip(out.iter_mut()).zip(pre.iter()) {
            match p {
                Pre::Done => {}
                Pre::Slow(pkt) => *o = self.track_parsed(pkt, frame, zone, now),
                Pre::Fast { pkt, tuple, hash } => {
                    *o = self.track_tuple(tuple, *hash, pkt, &meta, now);
                }
                Pre::V4 { plain, key, hash } => {
                    *o = self.track_v4(plain, *key, *hash, &meta, now);
                }
                Pre::Udp(u) => self.track_udp(u, &meta, now, o),
            }
        }
    }

    /// Pass 1 of a frame: parsed, classified and hashed into `p` (written in place:
    /// a [`Pre`] is large); the common frame in one step, straight to its packed
    /// tuple. A malformed frame is counted, and its verdict written to `out` (then
    /// it returns true; written in place, as returning it cost a copy a frame).
    ///
    /// Always inlined into the batch's loop, where a valid UDP datagram is classified
    /// in place; every other frame goes out of line ([`Conntrack::classify_other`]),
    /// whose stack frame (for the general parse) the datagram then does not pay.
    #[inline(always)]
    fn classify_frame(&mut self, frame: &[u8], zone: u16, p: &mut Pre, out: &mut Verdict) -> bool {
        self.stats.packets += 1;
        if let Some(u) = wire::plain_udp_v4(frame, self.cfg.parse) {
            self.classify_udp(&u, zone, p);
            return false;
        }
        self.classify_other(frame, zone, p, out)
    }

    /// [`Conntrack::classify_frame`] of a frame that is not a valid plain UDP datagram.
    #[inline(never)]
    fn classify_other(&mut self, frame: &[u8], zone: u16, p: &mut Pre, out: &mut Verdict) -> bool {
        let parsed = match wire::plain_v4(frame, self.cfg.parse) {
            Some(Ok(plain)) => {
                self.classify_plain(plain, zone, p);
                return false;
            }
            Some(Err(e)) => Err(e),
            None => wire::parse_walk(frame, self.cfg.parse),
        };
        match parsed {
            Ok(pkt) => {
                self.classify(pkt, zone, p);
                false
            }
            Err(e) => {
                self.stats.malformed[e.reason().index()] += 1;
                *out = self.invalid(Invalid::Malformed(e));
                true
            }
        }
    }

    /// Pass 1 of a UDP datagram that [`wire::plain_udp_v4`] read: the established path
    /// with its packed tuple.
    #[inline(always)]
    fn classify_udp(&self, u: &PlainUdp, zone: u16, p: &mut Pre) {
        let (src_port, dst_port) = u.ports;
        let key = PackedV4::new(u.addrs, src_port, dst_port, ip_proto::UDP, zone);
        *p = Pre::Udp(UdpV4 {
            key,
            hash: self.table.hasher().pair_hash_v4(key),
            l3_len: u.l3_len,
            payload_len: u.payload_len,
            ttl: u.ttl,
        });
    }

    /// Pass 1 of a frame that [`wire::plain_v4`] read: TCP and UDP take the
    /// established path with their packed tuple, the rest (ICMP, other protocols) the
    /// general one.
    #[inline]
    fn classify_plain(&self, plain: PlainV4, zone: u16, p: &mut Pre) {
        let (src_port, dst_port, udp) = match plain.l4 {
            L4::Udp { src_port, dst_port } => (src_port, dst_port, true),
            L4::Tcp(TcpInfo {
                src_port, dst_port, ..
            }) => (src_port, dst_port, false),
            _ => return self.classify(plain.packet(), zone, p),
        };
        let key = PackedV4::new(plain.addrs, src_port, dst_port, plain.protocol, zone);
        let hash = self.table.hasher().pair_hash_v4(key);
        if udp {
            *p = Pre::Udp(UdpV4 {
                key,
                hash,
                l3_len: plain.l3_len,
                payload_len: plain.payload_len,
                ttl: plain.ttl,
            });
        } else {
            *p = Pre::V4 { plain, key, hash };
        }
    }

    /// [`Conntrack::track_v4`] of a plain UDP datagram: a live connection's handler
    /// here, without the datagram's [`PlainV4`]; anything else (a new, expired or
    /// translated-aside connection) on the way `track_v4` takes, with it rebuilt.
    /// The verdict is written to `out` (each way writes its own: returning it cost a
    /// copy through the stack).
    #[inline(always)]
    fn track_udp(&mut self, u: &UdpV4, meta: &PacketMeta, now: u64, out: &mut Verdict) {
        let found = self.table.find_v4(u.key, u.hash, now);
        let FoundV4::Live(slot, dir) = found else {
            *out = self.track_udp_aside(found, u, meta, now);
            return;
        };
        let bytes = u64::from(u.l3_len);
        let round = match self.existing_udp(slot, dir, bytes, now) {
            Some(v) => Ok(v),
            None => {
                let (src_port, dst_port) = u.ports();
                let l4 = L4::Udp { src_port, dst_port };
                self.existing(slot, dir, &l4, bytes, now)
            }
        };
        // As in `track_v4`.
        self.release_nat();
        *out = match round {
            Ok(v) => self.count_tracked(v),
            // UDP never reopens; as `track_v4` if it did.
            Err(Reopen) => {
                self.track_tuple(&u.key.unpack(), u.hash, &u.plain().packet(), meta, now)
            }
        };
    }

    /// [`Conntrack::track_udp`] past a lookup that found no live connection.
    #[inline(never)]
    fn track_udp_aside(
        &mut self,
        found: FoundV4,
        u: &UdpV4,
        meta: &PacketMeta,
        now: u64,
    ) -> Verdict {
        self.track_v4_found(found, &u.plain(), u.key, u.hash, meta, now)
    }

    /// Pass 1 of any other parsed frame.
    #[inline]
    fn classify(&self, pkt: ParsedPacket, zone: u16, p: &mut Pre) {
        *p = match common_tuple(&pkt, zone) {
            Some(tuple) => Pre::Fast {
                hash: self.table.hash(&tuple),
                pkt,
                tuple,
            },
            None => Pre::Slow(pkt),
        };
    }

    /// [`Conntrack::process_batch`] with NAT: `out[i]` receives what
    /// [`Conntrack::process_mut`] would return for `frames[i]` (rewritten in place), for
    /// the first `min(frames.len(), out.len())` frames, processed in order. `meta` is
    /// the context of every frame of the batch (they arrived on one port; masquerade
    /// translates to `meta.out_addr`).
    pub fn process_batch_mut(
        &mut self,
        frames: &mut [&mut [u8]],
        zone: u16,
        meta: &PacketMeta,
        now: u64,
        out: &mut [NatVerdict],
    ) {
        let n = frames.len().min(out.len());
        for (f, o) in frames[..n]
            .chunks_mut(BATCH)
            .zip(out[..n].chunks_mut(BATCH))
        {
            self.batch_mut(f, zone, meta, now, o);
        }
    }

    fn batch_mut(
        &mut self,
        frames: &mut [&mut [u8]],
        zone: u16,
        meta: &PacketMeta,
        now: u64,
        out: &mut [NatVerdict],
    ) {
        let mut pre = [Pre::Done; BATCH];
        let pre = &mut pre[..frames.len()];
        // 1: parse, classify, hash.
        let big = self.table.capacity() >= PREFETCH_MIN_CONNECTIONS;
        for ((frame, o), p) in frames.iter().zip(out.iter_mut()).zip(pre.iter_mut()) {
            if self.classify_frame(frame, zone, p, &mut o.verdict) {
                o.nat = NatOutcome::Unchanged;
            }
            if big {
                self.prefetch_index(p);
            }
        }
        if big {
            self.prefetch_entries(pre);
        }
        // 3: finish in order, each packet rewritten right after it is tracked (a later
        // packet may close its connection).
        for ((frame, o), p) in frames.iter_mut().zip(out.iter_mut()).zip(pre.iter()) {
            self.closed = None;
            let (verdict, pkt) = match p {
                Pre::Done => continue,
                Pre::Slow(pkt) => (self.track_parsed_meta(pkt, frame, zone, meta, now), *pkt),
                Pre::Fast { pkt, tuple, hash } => {
                    (self.track_tuple(tuple, *hash, pkt, meta, now), *pkt)
                }
                Pre::Udp(u) => {
                    // The verdict written in place, and the rewrite reads it there.
                    self.track_udp(u, meta, now, &mut o.verdict);
                    let (src_port, dst_port) = u.ports();
                    let l4 = L4::Udp { src_port, dst_port };
                    let at = V4Layout::plain(u.l3_len);
                    o.nat = match self.nat_rewrite_plain(&o.verdict, &l4, at, frame) {
                        Some(nat) => nat,
                        None => self.nat_rewrite_general(&o.verdict, &u.plain().packet(), frame),
                    };
                    continue;
                }
                // The established path as without NAT (a connection it creates gets its
                // NAT decision from `meta`); the rewrite reads the packet's layout.
                Pre::V4 { plain, key, hash } => {
                    let verdict = self.track_v4(plain, *key, *hash, meta, now);
                    // Without building the packet: nothing to rewrite (an untranslated
                    // connection), or the common rewrite at the plain frame's offsets.
                    // The rest (a connection the packet closed, tuples aside) with the
                    // packet, without trying the plain rewrite a second time.
                    let nat =
                        match self.nat_rewrite_plain(&verdict, &plain.l4, plain.layout(), frame) {
                            Some(nat) => nat,
                            None => self.nat_rewrite_general(&verdict, &plain.packet(), frame),
                        };
                    *o = NatVerdict { verdict, nat };
                    continue;
                }
            };
            let nat = self.nat_rewrite(&verdict, &pkt, frame);
            *o = NatVerdict { verdict, nat };
        }
    }

    /// Pass 1's prefetch: the first index cell of the frame's probe.
    #[inline]
    fn prefetch_index(&self, p: &Pre) {
        if let Some(hash) = p.hash() {
            self.table.prefetch_index(hash);
        }
    }

    /// Pass 2: the entries the index cells point to. No entry: probably a new
    /// connection, whose insert also probes the index for the reply tuple; without NAT
    /// that is the inverse, whose index hash is the same (`TupleHasher::pair_hash`),
    /// so pass 1 has prefetched its cell already. Both cells of a connection without
    /// NAT start their probe at the same cell, so a packet of either direction finds
    /// the entry from it. (An IPv6 or full-NAT entry's tuples are in the side store:
    /// not prefetched.)
    fn prefetch_entries(&self, pre: &[Pre]) {
        for hash in pre.iter().filter_map(Pre::hash) {
            self.table.prefetch_entry(hash);
        }
    }
}

#[cfg(test)]
mod tests;
