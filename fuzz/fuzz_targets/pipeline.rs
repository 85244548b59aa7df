//! The whole software pipeline: an arbitrary sequence of frames and time steps through
//! `Conntrack` with NAT rules (DNAT, VIP, full NAT, SNAT with a small port range,
//! masquerade), one frame at a time (`process_mut`) or in batches
//! (`process_batch_mut`).
//!
//! Input: one setup byte (table size, checksum verification, SNAT port range, batch
//! mode, VIP selection), then operations: a raw frame (optionally with its checksums
//! fixed so that it gets past verification), a synthesized TCP/UDP/ICMP frame between
//! addresses the rules know, the reply to an earlier emitted frame (a handshake is a
//! chain of replies), an ICMP error quoting an earlier emitted frame, a time step, GC.
//!
//! Checked after every step: no panic; the table never holds more than its maximum;
//! every tuple in the table is unique and looking up either tuple of a connection finds
//! that connection in that direction; a frame NAT did not touch is byte-for-byte
//! unchanged; a rewritten frame parses again and every checksum that was right before
//! the rewrite (outer IPv4, outer L4, quoted IPv4 and quoted L4 of an ICMP error) is
//! right after it, and a "no checksum" UDP zero stays zero.
#![no_main]

use std::collections::HashMap;

use ctoffload_fallback_sw::conntrack::Prefix;
use ctoffload_fallback_sw::conntrack::{
    Config, Conntrack, CtInfo, NatOutcome, NatVerdict, Verdict,
};
use ctoffload_fallback_sw::nat::NatEngine;
use ctoffload_fallback_sw::nat::rules::{
    AddrRange, Backend, NatAction, NatFlags, NatRule, PacketMeta, PortRange, RuleMatch, Selection,
};
use ctoffload_fallback_sw::tuple::{Addr, Family, Tuple};
use ctoffload_fallback_sw::wire::{self, ParseOptions};
use ctoffload_fuzz::{L4Spec, audit, build_v4, fix_checksums, l3_of, v4_at};
use libfuzzer_sys::fuzz_target;

const SEC: u64 = 1_000_000_000;
const C: [u8; 4] = [10, 0, 0, 5];
const C2: [u8; 4] = [10, 0, 0, 6];
const SRV_IN: [u8; 4] = [10, 0, 0, 10];
const GW_IN: [u8; 4] = [10, 0, 0, 1];
const S: [u8; 4] = [203, 0, 113, 10];
const X: [u8; 4] = [198, 51, 100, 7];
const N: [u8; 4] = [192, 0, 2, 1];
const R: [u8; 4] = [203, 0, 113, 254];
const ADDRS: [[u8; 4]; 8] = [C, C2, SRV_IN, GW_IN, S, X, N, R];
const PORTS: [u16; 8] = [80, 8080, 443, 5353, 53, 40000, 40001, 1024];

fn prefix(a: [u8; 4], len: u8) -> Prefix {
    Prefix {
        family: Family::V4,
        addr: Addr::v4(a),
        len,
    }
}

fn rules(small_range: bool, selection: Selection) -> Vec<NatRule> {
    let dst_n = |proto: u8, dport: Option<PortRange>| RuleMatch {
        dst: Some(prefix(N, 32)),
        proto: Some(proto),
        dport,
        ..RuleMatch::default()
    };
    vec![
        NatRule {
            id: 1,
            r#match: dst_n(6, Some(PortRange::single(8080))),
            action: NatAction::Dnat {
                to_addr: Addr::v4(SRV_IN),
                to_port: Some(80),
            },
        },
        NatRule {
            id: 2,
            r#match: dst_n(17, Some(PortRange::single(5353))),
            action: NatAction::Dnat {
                to_addr: Addr::v4(SRV_IN),
                to_port: Some(53),
            },
        },
        NatRule {
            id: 3,
            r#match: dst_n(1, None),
            action: NatAction::Dnat {
                to_addr: Addr::v4(SRV_IN),
                to_port: None,
            },
        },
        NatRule {
            id: 4,
            r#match: dst_n(6, Some(PortRange::single(443))),
            action: NatAction::Vip {
                backends: vec![
                    Backend {
                        addr: Addr::v4([10, 0, 1, 1]),
                        port: Some(8443),
                        weight: 1,
                    },
                    Backend {
                        addr: Addr::v4([10, 0, 1, 2]),
                        port: None,
                        weight: 3,
                    },
                ],
                selection,
            },
        },
        NatRule {
            id: 5,
            r#match: RuleMatch {
                dst: Some(prefix(N, 32)),
                proto: Some(17),
                in_port: Some(2),
                ..RuleMatch::default()
            },
            action: NatAction::FullNat {
                to_addr: Addr::v4(SRV_IN),
                to_port: Some(80),
                snat_addrs: AddrRange::single_v4(GW_IN),
                snat_ports: None,
                flags: NatFlags::default(),
            },
        },
        NatRule {
            id: 6,
            r#match: RuleMatch {
                src: Some(prefix([10, 0, 0, 0], 8)),
                out_port: Some(2),
                // A port range needs a port protocol: UDP gets the small range (easy
                // to exhaust); the rest falls through to masquerade.
                proto: small_range.then_some(17),
                ..RuleMatch::default()
            },
            action: NatAction::Snat {
                addrs: AddrRange::single_v4(N),
                ports: small_range.then_some(PortRange::new(40000, 40007)),
                flags: NatFlags::default(),
            },
        },
        NatRule {
            id: 7,
            r#match: RuleMatch {
                out_port: Some(2),
                ..RuleMatch::default()
            },
            action: NatAction::Masquerade {
                ports: None,
                flags: NatFlags {
                    random_fully: small_range,
                    persistent: false,
                },
            },
        },
    ]
}

/// Packet context by index: from inside (egress 2, address N), from outside (egress 1),
/// from inside with no egress address (masquerade cannot translate), unknown.
fn meta(i: u8) -> PacketMeta {
    match i & 3 {
        0 => PacketMeta {
            in_port: 1,
            out_port: Some(2),
            out_addr: Some(Addr::v4(N)),
        },
        1 => PacketMeta {
            in_port: 2,
            out_port: Some(1),
            out_addr: Some(Addr::v4(GW_IN)),
        },
        2 => PacketMeta {
            in_port: 1,
            out_port: Some(2),
            out_addr: None,
        },
        _ => PacketMeta::default(),
    }
}

/// The meta of a packet travelling the other way.
fn flip(m: u8) -> u8 {
    match m & 3 {
        0 | 2 => 1,
        1 => 0,
        _ => 3,
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn port(b: u16) -> u16 {
    if b & 0x8000 == 0 {
        PORTS[usize::from(b & 7)]
    } else {
        b & 0x7FFF
    }
}

/// The reply to an emitted IPv4 frame (untagged): MACs, addresses and ports swapped,
/// TCP acknowledging what the frame carried, an ICMP echo request answered.
fn reply_to(out: &[u8], flags: u8, seq: u32) -> Option<Vec<u8>> {
    let (l3, 0x0800) = l3_of(out)? else {
        return None;
    };
    let ip = v4_at(out, l3)?;
    if !ip.whole || ip.fragment {
        return None;
    }
    let mut f = out.get(..ip.end)?.to_vec();
    let l4 = l3 + ip.ihl;
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(l3 + 12 + i, l3 + 16 + i);
    }
    match ip.proto {
        6 | 17 if f.len() >= l4 + 8 => {
            for i in 0..2 {
                f.swap(l4 + i, l4 + 2 + i);
            }
            if ip.proto == 6 && f.len() >= l4 + 20 {
                let old_seq = u32::from_be_bytes(f.get(l4 + 4..l4 + 8)?.try_into().ok()?);
                let old_ack = u32::from_be_bytes(f.get(l4 + 8..l4 + 12)?.try_into().ok()?);
                let old_flags = f[l4 + 13];
                let hl = usize::from(f[l4 + 12] >> 4) * 4;
                let payload = f.len().saturating_sub(l4 + hl);
                let seg = u32::try_from(payload).unwrap_or(0) + u32::from(old_flags & 0x03 != 0);
                let new_seq = if old_flags & 0x10 != 0 { old_ack } else { seq };
                f[l4 + 4..l4 + 8].copy_from_slice(&new_seq.to_be_bytes());
                f[l4 + 8..l4 + 12].copy_from_slice(&old_seq.wrapping_add(seg).to_be_bytes());
                f[l4 + 13] = flags;
                // Drop the payload: replies are pure segments.
                let end = l4 + hl.max(20).min(f.len() - l4);
                f.truncate(end);
                let total = u16::try_from(end - l3).ok()?;
                f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            }
        }
        1 if f.len() >= l4 + 8 => {
            if f[l4] == 8 {
                f[l4] = 0;
            }
        }
        _ => {}
    }
    fix_checksums(&mut f);
    Some(f)
}

/// An ICMP error about an emitted IPv4 frame, from its destination (or a router) back
/// to its source, quoting `quote_len` bytes of it.
fn icmp_error_about(
    out: &[u8],
    ty: u8,
    code: u8,
    quote_len: usize,
    router: bool,
) -> Option<Vec<u8>> {
    let (l3, 0x0800) = l3_of(out)? else {
        return None;
    };
    let ip = v4_at(out, l3)?;
    let src: [u8; 4] = out.get(l3 + 12..l3 + 16)?.try_into().ok()?;
    let dst: [u8; 4] = out.get(l3 + 16..l3 + 20)?.try_into().ok()?;
    let quote = out.get(l3..ip.end)?;
    let quote = &quote[..quote.len().min(quote_len.max(ip.ihl + 8))];
    let from = if router { R } else { dst };
    Some(build_v4(
        from,
        src,
        L4Spec::Icmp {
            ty,
            code,
            id: 0,
            seq: 1400,
        },
        quote,
    ))
}

struct Harness {
    ct: Conntrack,
    max: usize,
    parse: ParseOptions,
    now: u64,
    /// Emitted (forwarded, after NAT) frames and the meta index they came in with.
    history: Vec<(Vec<u8>, u8)>,
}

impl Harness {
    fn check_frame(&mut self, before: &[u8], after: &[u8], v: &NatVerdict, m: u8, single: bool) {
        assert_eq!(before.len(), after.len());
        match v.nat {
            NatOutcome::Unchanged => assert_eq!(before, after, "untouched frame changed: {v:?}"),
            NatOutcome::Rewritten => {
                assert!(
                    matches!(v.verdict, Verdict::Tracked { .. }),
                    "rewritten but not tracked: {v:?}"
                );
                if let Err(e) = wire::parse(after, self.parse) {
                    panic!(
                        "rewritten frame does not parse: {e}\nbefore {before:02x?}\nafter  {after:02x?}"
                    );
                }
                let (a, b) = (audit(before), audit(after));
                let kept = |x: Option<bool>, y: Option<bool>| x != Some(true) || y == Some(true);
                assert!(
                    kept(a.ip, b.ip),
                    "ipv4 checksum broken by NAT\nbefore {before:02x?}\nafter  {after:02x?}"
                );
                assert!(
                    kept(a.l4, b.l4),
                    "l4 checksum broken by NAT\nbefore {before:02x?}\nafter  {after:02x?}"
                );
                assert!(
                    kept(a.inner_ip, b.inner_ip),
                    "quoted ipv4 checksum broken by NAT\nbefore {before:02x?}\nafter  {after:02x?}"
                );
                assert!(
                    kept(a.inner_l4, b.inner_l4),
                    "quoted l4 checksum broken by NAT\nbefore {before:02x?}\nafter  {after:02x?}"
                );
                assert!(!a.udp_zero || b.udp_zero, "udp zero checksum made non-zero");
            }
            NatOutcome::Drop(_) => {}
        }
        // What leaves looks like the inverse of the other direction's tuple (that is
        // what NAT is), for every tracked packet of a live connection but ICMP errors.
        // Only one frame at a time: after a batch, a slot may hold a newer connection.
        if let (
            true,
            Verdict::Tracked {
                slot, dir, info, ..
            },
        ) = (single, v.verdict)
        {
            let related = matches!(info, CtInfo::Related | CtInfo::RelatedReply);
            let conn = self.ct.table().get(slot).map(|c| c.tuples);
            if let (false, false, Some(tuples)) =
                (related, matches!(v.nat, NatOutcome::Drop(_)), conn)
            {
                if let (Ok(p), Ok(want)) = (
                    wire::parse(after, ParseOptions::VERIFY_NONE),
                    tuples[dir.opposite().index()].invert(),
                ) {
                    let (sl4, dl4) = match p.l4 {
                        wire::L4::IcmpQuery {
                            id,
                            icmp_type,
                            code,
                        } => (id, u16::from_be_bytes([icmp_type, code])),
                        l4 => l4.ports().unwrap_or((0, 0)),
                    };
                    let (src, family) = Addr::from_ip(p.src);
                    let got = Tuple {
                        src,
                        dst: Addr::from_ip(p.dst).0,
                        src_l4: sl4,
                        dst_l4: dl4,
                        proto: p.protocol,
                        family,
                        zone: 0,
                    };
                    assert_eq!(
                        got, want,
                        "emitted frame is not the other direction's inverse: {v:?}"
                    );
                }
            }
        }
        if v.forward() {
            if self.history.len() >= 16 {
                self.history.remove(0);
            }
            self.history.push((after.to_vec(), m));
        }
    }

    fn check_table(&mut self) {
        let now = self.now;
        let table = self.ct.table();
        assert!(table.len() <= self.max, "table over its maximum");
        let mut seen: HashMap<Tuple, (u32, usize)> = HashMap::new();
        let mut all = Vec::new();
        for (slot, c) in table.iter(now) {
            for (d, t) in c.tuples.iter().enumerate() {
                if let Some(&(s, _)) = seen.get(t) {
                    // Only a connection whose two tuples are equal may repeat a tuple.
                    assert!(
                        s == slot.0 && c.tuples[0] == c.tuples[1],
                        "tuple {t} owned twice"
                    );
                }
                seen.insert(*t, (slot.0, d));
                all.push((*t, slot, d));
            }
        }
        let table = self.ct.table_mut();
        for (t, slot, d) in all {
            let found = table.lookup(&t, now);
            let Some((s, dir)) = found else {
                panic!("tuple {t} of slot {slot:?} not found");
            };
            assert_eq!(s, slot, "tuple {t} maps to another connection");
            let c = table.get(s).map(|c| c.tuples[0] == c.tuples[1]);
            assert!(
                dir.index() == d || c == Some(true),
                "tuple {t} maps to the wrong direction"
            );
        }
    }

    fn single(&mut self, mut frame: Vec<u8>, m: u8) {
        let before = frame.clone();
        let v = self.ct.process_mut(&mut frame, 0, &meta(m), self.now);
        self.check_frame(&before, &frame, &v, m, true);
        self.check_table();
    }

    fn batch(&mut self, frames: Vec<Vec<u8>>, m: u8) {
        let before = frames.clone();
        let mut frames = frames;
        let mut refs: Vec<&mut [u8]> = frames.iter_mut().map(Vec::as_mut_slice).collect();
        let mut out = vec![
            NatVerdict {
                verdict: Verdict::Invalid(ctoffload_fallback_sw::conntrack::Invalid::TableFull),
                nat: NatOutcome::Unchanged,
            };
            refs.len()
        ];
        self.ct
            .process_batch_mut(&mut refs, 0, &meta(m), self.now, &mut out);
        drop(refs);
        for ((b, a), v) in before.iter().zip(&frames).zip(&out) {
            self.check_frame(b, a, v, m, false);
        }
        self.check_table();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let Some(setup) = inp.byte() else {
        return;
    };
    let max = [4usize, 16, 64, 1024][usize::from(setup & 3)];
    let parse = if setup & 4 == 0 {
        ParseOptions::VERIFY_ALL
    } else {
        ParseOptions::VERIFY_NONE
    };
    let small_range = setup & 8 != 0;
    let batch_mode = setup & 16 != 0;
    let selection = if setup & 32 == 0 {
        Selection::ConsistentHash
    } else {
        Selection::WeightedRoundRobin
    };
    let cfg = Config {
        max_connections: max,
        parse,
        event_capacity: 64,
        ..Config::default()
    };
    let mut nat = NatEngine::new(0x5eed);
    for r in rules(small_range, selection) {
        if let Err(e) = nat.rules_mut().add(r) {
            panic!("harness rule rejected: {e}");
        }
    }
    let mut h = Harness {
        ct: Conntrack::with_nat(cfg, nat),
        max,
        parse,
        now: SEC,
        history: Vec::new(),
    };
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut pending_meta = 0u8;
    let mut steps = 0;
    while let Some(op) = inp.byte() {
        steps += 1;
        if steps > 256 {
            break;
        }
        let m = (op >> 4) & 3;
        let frame = match op & 7 {
            0 => {
                let len = usize::from(inp.byte().unwrap_or(0)) * 2;
                let mut f = inp.bytes(len).to_vec();
                if op & 0x40 != 0 {
                    fix_checksums(&mut f);
                }
                Some((f, m))
            }
            1 | 7 => {
                let (Some(kind), Some(a), Some(sp), Some(dp), Some(fl), Some(seq)) = (
                    inp.byte(),
                    inp.byte(),
                    inp.u16(),
                    inp.u16(),
                    inp.byte(),
                    inp.u32(),
                ) else {
                    break;
                };
                let src = ADDRS[usize::from(a & 7)];
                let dst = ADDRS[usize::from((a >> 3) & 7)];
                let l4 = match kind % 3 {
                    0 => L4Spec::Tcp {
                        sport: port(sp),
                        dport: port(dp),
                        flags: if kind & 0x80 != 0 { 0x02 } else { fl },
                        seq,
                        ack: 0,
                        window: 65535,
                    },
                    1 => L4Spec::Udp {
                        sport: port(sp),
                        dport: port(dp),
                    },
                    _ => L4Spec::Icmp {
                        ty: if kind & 0x80 != 0 { 8 } else { fl },
                        code: 0,
                        id: sp,
                        seq: dp,
                    },
                };
                let payload = vec![0xAB; usize::from(kind >> 4 & 7) * 3];
                Some((build_v4(src, dst, l4, &payload), m))
            }
            2 | 6 => {
                let (Some(i), Some(fl), Some(seq)) = (inp.byte(), inp.byte(), inp.u32()) else {
                    break;
                };
                let Some((out, om)) = h.history.iter().rev().nth(usize::from(i & 15)).cloned()
                else {
                    continue;
                };
                let flags = if op & 0x80 != 0 { 0x12 } else { fl };
                reply_to(&out, flags, seq).map(|f| (f, flip(om)))
            }
            3 => {
                let (Some(i), Some(t), Some(q)) = (inp.byte(), inp.byte(), inp.byte()) else {
                    break;
                };
                let Some((out, om)) = h.history.iter().rev().nth(usize::from(i & 15)).cloned()
                else {
                    continue;
                };
                let (ty, code) = match t & 3 {
                    0 => (3, 3),
                    1 => (3, 4),
                    2 => (11, 0),
                    _ => (t >> 2, i >> 4),
                };
                icmp_error_about(&out, ty, code, usize::from(q), op & 0x40 != 0)
                    .map(|f| (f, flip(om)))
            }
            4 => {
                let step = u64::from(inp.byte().unwrap_or(1));
                h.now += if op & 0x40 != 0 {
                    step * SEC * 8
                } else {
                    step * SEC / 16
                };
                None
            }
            _ => {
                let budget = usize::from(inp.byte().unwrap_or(0));
                if !pending.is_empty() {
                    let p = std::mem::take(&mut pending);
                    h.batch(p, pending_meta);
                }
                h.ct.gc(h.now, budget);
                h.check_table();
                None
            }
        };
        let Some((f, fm)) = frame else {
            continue;
        };
        if batch_mode {
            if !pending.is_empty() && (fm != pending_meta || pending.len() >= 8) {
                let p = std::mem::take(&mut pending);
                h.batch(p, pending_meta);
            }
            pending_meta = fm;
            pending.push(f);
        } else {
            h.single(f, fm);
        }
    }
    if !pending.is_empty() {
        h.batch(pending, pending_meta);
    }
});
