//! NAT through the whole pipeline: frames built with etherparse go in through
//! [`Conntrack::process_mut`] (and the batch form) and come out rewritten; every output
//! is compared byte for byte with a frame etherparse built from scratch for the
//! translated addresses (so its checksums are computed independently), and its
//! checksums are verified again by the small ones'-complement implementation below,
//! which shares no code with the crate.

use std::collections::{HashMap, HashSet};

use etherparse::{Icmpv4Type, PacketBuilder};
use proptest::prelude::*;

use super::*;
use crate::nat::rules::{AddrRange, NatAction, NatFlags, NatRule, PortRange, RuleMatch, Selection};
use crate::nat::tests::{
    C, C2, GW_IN, MAC_C, MAC_G, N, R, S, SRV_IN, X, backend, dnat_icmp_rule, dnat_rule,
    dnat_udp_rule, echo, echo_ip, fullnat_rule, icmp_err, in_meta, masq_rule, out_meta, prefix,
    snat_rule, tcp_ip, udp, udp_ip, unreach, vip_rule, with_proto,
};
use crate::tuple::proto;

const SEC: u64 = NS;

// ------------------------------------------------------------------ independent checks

/// RFC 1071 sum, folded, complemented: 0 when `data` (with its checksum) verifies.
fn ones(data: &[u8], mut acc: u32) -> u16 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        acc += u32::from(w);
    }
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !u16::try_from(acc).unwrap_or(0)
}

/// Verifies the IPv4 header checksum and the TCP/UDP (pseudo-header) or ICMP checksum
/// of an untagged Ethernet + IPv4 frame; for an ICMP error also those of the quote
/// (the inner IPv4 header always, the inner TCP/UDP checksum when the whole inner
/// packet is quoted).
fn verify_checksums(frame: &[u8]) {
    assert_eq!(&frame[12..14], &[0x08, 0x00], "ipv4 frame");
    verify_ip(&frame[14..], true);
}

fn verify_ip(ip: &[u8], outer: bool) {
    let ihl = usize::from(ip[0] & 0x0F) * 4;
    assert_eq!(ones(&ip[..ihl], 0), 0, "ipv4 header checksum");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let whole = total <= ip.len();
    let l4 = &ip[ihl..total.min(ip.len())];
    let pseudo = |len: usize| -> u32 {
        let mut acc = u32::from(ip[9]) + u32::try_from(len).unwrap_or(0);
        for w in ip[12..20].chunks(2) {
            acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        acc
    };
    match ip[9] {
        6 if whole => assert_eq!(ones(l4, pseudo(l4.len())), 0, "tcp checksum"),
        17 if whole && l4[6..8] != [0, 0] => {
            assert_eq!(ones(l4, pseudo(l4.len())), 0, "udp checksum");
        }
        1 if outer || whole => {
            assert_eq!(ones(l4, 0), 0, "icmp checksum");
            if outer && matches!(l4[0], 3 | 4 | 5 | 11 | 12) {
                verify_ip(&l4[8..], false);
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------------ frames

fn tcpf(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, flags: &str, seq: u32, ack: u32) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 29200);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('R') {
        b = b.rst();
    }
    if flags.contains('F') {
        b = b.fin();
    }
    let mut v = Vec::new();
    b.write(&mut v, if flags.contains('P') { b"data" } else { b"" })
        .expect("build tcp");
    v
}

fn echo_req(src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    echo(src, dst, id, true)
}

fn echo_rep(src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    echo(src, dst, id, false)
}

/// The first `len` bytes of an IP packet (what an ICMP error quotes).
fn quote(ip: &[u8], len: usize) -> Vec<u8> {
    ip[..len.min(ip.len())].to_vec()
}

// ------------------------------------------------------------------ harness

fn gw(rules: Vec<NatRule>) -> Conntrack {
    let mut ct = Conntrack::new(Config {
        max_connections: 4096,
        ..Config::default()
    });
    for r in rules {
        ct.nat_mut().rules_mut().add(r).expect("valid rule");
    }
    ct
}

/// Sends `frame` through the pipeline and checks it comes out as `want` (byte for
/// byte, checksums verified independently). Returns the verdict.
#[track_caller]
fn pass(ct: &mut Conntrack, frame: &[u8], meta: &PacketMeta, now: u64, want: &[u8]) -> Verdict {
    let mut f = frame.to_vec();
    let v = ct.process_mut(&mut f, 0, meta, now);
    assert!(v.forward(), "{v:?}");
    assert_eq!(
        f,
        want,
        "\n got: {:02x?}\nwant: {:02x?}",
        &f[14..],
        &want[14..]
    );
    verify_checksums(&f);
    if frame != want {
        assert_eq!(v.nat, NatOutcome::Rewritten);
    }
    assert_unique(ct, now);
    v.verdict
}

/// Every tuple in the table is owned by exactly one connection and direction, and the
/// reply tuples of translated connections are pairwise distinct.
#[track_caller]
fn assert_unique(ct: &Conntrack, now: u64) {
    let mut seen = HashSet::new();
    for (_, c) in ct.table().iter(now) {
        for t in &c.tuples {
            assert!(seen.insert(*t), "tuple {t} held twice");
        }
    }
}

fn conn_of(ct: &Conntrack, v: Verdict) -> ([Tuple; 2], Status) {
    let Verdict::Tracked { slot, .. } = v else {
        panic!("not tracked: {v:?}");
    };
    let c = ct.table().get(slot).expect("live connection");
    (c.tuples, c.status)
}

fn t4(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, p: u8) -> Tuple {
    crate::nat::tests::t4(src, sp, dst, dp, p)
}

fn snat_range_rule(id: u32, ports: PortRange) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            src: Some(prefix([10, 0, 0, 0], 8)),
            out_port: Some(2),
            proto: Some(proto::UDP),
            ..RuleMatch::default()
        },
        action: NatAction::Snat {
            addrs: AddrRange::v4([192, 0, 2, 1], [192, 0, 2, 2]),
            ports: Some(ports),
            flags: NatFlags::default(),
        },
    }
}

// ------------------------------------------------------------------ SNAT

#[test]
fn snat_tcp_handshake_both_directions_with_port_collision() {
    let mut ct = gw(vec![snat_rule(1, None)]);
    let m = out_meta();
    // Host C: port kept.
    let v = pass(
        &mut ct,
        &tcpf(C, 40000, S, 80, "S", 100, 0),
        &m,
        SEC,
        &tcpf(N, 40000, S, 80, "S", 100, 0),
    );
    assert_eq!(conn_of(&ct, v).0[1], t4(S, 80, N, 40000, proto::TCP));
    // Host C2, same port, same server: a different port.
    let v2 = ct.process_mut(&mut tcpf(C2, 40000, S, 80, "S", 500, 0), 0, &m, SEC);
    let (t2, st2) = conn_of(&ct, v2.verdict);
    let p2 = t2[1].dst_l4;
    assert_ne!(p2, 40000);
    assert!((1024..=65535).contains(&p2), "same range class as 40000");
    assert!(st2.contains(Status::SRC_NAT));
    assert_unique(&ct, SEC);
    // Replies come back to the right host, then the handshake completes.
    pass(
        &mut ct,
        &tcpf(S, 80, N, 40000, "SA", 900, 101),
        &in_meta(),
        SEC,
        &tcpf(S, 80, C, 40000, "SA", 900, 101),
    );
    pass(
        &mut ct,
        &tcpf(S, 80, N, p2, "SA", 700, 501),
        &in_meta(),
        SEC,
        &tcpf(S, 80, C2, 40000, "SA", 700, 501),
    );
    pass(
        &mut ct,
        &tcpf(C, 40000, S, 80, "AP", 101, 901),
        &m,
        SEC,
        &tcpf(N, 40000, S, 80, "AP", 101, 901),
    );
    pass(
        &mut ct,
        &tcpf(C2, 40000, S, 80, "AP", 501, 701),
        &m,
        SEC,
        &tcpf(N, p2, S, 80, "AP", 501, 701),
    );
    assert_eq!(ct.stats().nat_rewritten, 6);
    assert_eq!(ct.nat_connections(), 2);
}

#[test]
fn snat_address_range_and_port_range_udp_both_directions() {
    let range = PortRange::new(20000, 20099);
    let mut ct = gw(vec![snat_range_rule(1, range)]);
    let m = out_meta();
    let mut f = udp(C, 5000, S, 53);
    let v = ct.process_mut(&mut f, 0, &m, SEC);
    let (t, st) = conn_of(&ct, v.verdict);
    let (na, np) = (t[1].dst.as_v4(), t[1].dst_l4);
    assert!(na == [192, 0, 2, 1] || na == [192, 0, 2, 2]);
    assert!(range.contains(np));
    assert!(st.contains(Status::SRC_NAT) && !st.contains(Status::DST_NAT));
    assert_eq!(f, udp(na, np, S, 53));
    verify_checksums(&f);
    pass(
        &mut ct,
        &udp(S, 53, na, np),
        &in_meta(),
        SEC,
        &udp(S, 53, C, 5000),
    );
    pass(&mut ct, &udp(C, 5000, S, 53), &m, SEC, &udp(na, np, S, 53));
    // A zero UDP checksum stays zero.
    let mut z = udp(S, 53, na, np);
    z[14 + 26..14 + 28].copy_from_slice(&[0, 0]);
    let mut zw = udp(S, 53, C, 5000);
    zw[14 + 26..14 + 28].copy_from_slice(&[0, 0]);
    pass(&mut ct, &z, &in_meta(), SEC, &zw);
}

#[test]
fn snat_icmp_echo_both_directions_and_id_collision() {
    let mut ct = gw(vec![snat_rule(1, None)]);
    let m = out_meta();
    pass(&mut ct, &echo_req(C, S, 77), &m, SEC, &echo_req(N, S, 77));
    let mut f = echo_req(C2, S, 77);
    let v = ct.process_mut(&mut f, 0, &m, SEC);
    let id2 = conn_of(&ct, v.verdict).0[1].src_l4;
    assert_ne!(id2, 77);
    assert_eq!(f, echo_req(N, S, id2));
    verify_checksums(&f);
    pass(
        &mut ct,
        &echo_rep(S, N, 77),
        &in_meta(),
        SEC,
        &echo_rep(S, C, 77),
    );
    pass(
        &mut ct,
        &echo_rep(S, N, id2),
        &in_meta(),
        SEC,
        &echo_rep(S, C2, 77),
    );
}

#[test]
fn masquerade_translates_to_the_egress_address() {
    let mut ct = gw(vec![masq_rule(1)]);
    let m = PacketMeta {
        in_port: 1,
        out_port: Some(2),
        out_addr: Some(Addr::v4(R)),
    };
    pass(
        &mut ct,
        &tcpf(C, 33000, S, 443, "S", 1, 0),
        &m,
        SEC,
        &tcpf(R, 33000, S, 443, "S", 1, 0),
    );
    pass(
        &mut ct,
        &tcpf(S, 443, R, 33000, "SA", 9, 2),
        &in_meta(),
        SEC,
        &tcpf(S, 443, C, 33000, "SA", 9, 2),
    );
    pass(&mut ct, &udp(C, 1234, S, 53), &m, SEC, &udp(R, 1234, S, 53));
    pass(
        &mut ct,
        &udp(S, 53, R, 1234),
        &in_meta(),
        SEC,
        &udp(S, 53, C, 1234),
    );
    pass(&mut ct, &echo_req(C, S, 9), &m, SEC, &echo_req(R, S, 9));
    pass(
        &mut ct,
        &echo_rep(S, R, 9),
        &in_meta(),
        SEC,
        &echo_rep(S, C, 9),
    );
    // No egress address: the first packet is dropped and counted, nothing created.
    let before = ct.table().len();
    let mut f = udp(C, 999, S, 53);
    let no_addr = PacketMeta {
        out_addr: None,
        ..m
    };
    let v = ct.process_mut(&mut f, 0, &no_addr, SEC);
    assert_eq!(
        v.verdict,
        Verdict::Invalid(Invalid::NatNoAddress { rule: 1 })
    );
    assert_eq!(f, udp(C, 999, S, 53), "dropped frames are not touched");
    assert_eq!(ct.stats().nat_no_address, 1);
    assert_eq!(ct.table().len(), before);
}

// ------------------------------------------------------------------ DNAT, full NAT, VIP

#[test]
fn dnat_port_forward_tcp_udp_icmp_both_directions() {
    let mut ct = gw(vec![dnat_rule(1), dnat_udp_rule(2), dnat_icmp_rule(3)]);
    let m = in_meta();
    let v = pass(
        &mut ct,
        &tcpf(X, 5555, N, 8080, "S", 1, 0),
        &m,
        SEC,
        &tcpf(X, 5555, SRV_IN, 80, "S", 1, 0),
    );
    let (t, st) = conn_of(&ct, v);
    assert_eq!(t[1], t4(SRV_IN, 80, X, 5555, proto::TCP));
    assert!(st.contains(Status::DST_NAT) && !st.contains(Status::SRC_NAT));
    pass(
        &mut ct,
        &tcpf(SRV_IN, 80, X, 5555, "SA", 50, 2),
        &out_meta(),
        SEC,
        &tcpf(N, 8080, X, 5555, "SA", 50, 2),
    );
    pass(
        &mut ct,
        &udp(X, 7, N, 5353),
        &m,
        SEC,
        &udp(X, 7, SRV_IN, 53),
    );
    pass(
        &mut ct,
        &udp(SRV_IN, 53, X, 7),
        &out_meta(),
        SEC,
        &udp(N, 5353, X, 7),
    );
    pass(
        &mut ct,
        &echo_req(X, N, 4),
        &m,
        SEC,
        &echo_req(X, SRV_IN, 4),
    );
    pass(
        &mut ct,
        &echo_rep(SRV_IN, X, 4),
        &out_meta(),
        SEC,
        &echo_rep(N, X, 4),
    );
    // Not matched: untouched.
    let f = tcpf(X, 5555, N, 8081, "S", 1, 0);
    pass(&mut ct, &f, &m, SEC, &f);
}

#[test]
fn full_nat_tcp_udp_icmp_both_directions() {
    for p in [proto::TCP, proto::UDP, proto::ICMP] {
        let mut ct = gw(vec![fullnat_rule(1, p)]);
        let m = in_meta();
        let (fwd, want_fwd, back, want_back) = match p {
            proto::TCP => (
                tcpf(X, 6000, N, 80, "S", 1, 0),
                tcpf(GW_IN, 6000, SRV_IN, 80, "S", 1, 0),
                tcpf(SRV_IN, 80, GW_IN, 6000, "SA", 5, 2),
                tcpf(N, 80, X, 6000, "SA", 5, 2),
            ),
            proto::UDP => (
                udp(X, 6000, N, 80),
                udp(GW_IN, 6000, SRV_IN, 80),
                udp(SRV_IN, 80, GW_IN, 6000),
                udp(N, 80, X, 6000),
            ),
            _ => (
                echo_req(X, N, 31),
                echo_req(GW_IN, SRV_IN, 31),
                echo_rep(SRV_IN, GW_IN, 31),
                echo_rep(N, X, 31),
            ),
        };
        let v = pass(&mut ct, &fwd, &m, SEC, &want_fwd);
        let st = conn_of(&ct, v).1;
        assert!(st.contains(Status::SRC_NAT | Status::DST_NAT));
        pass(&mut ct, &back, &out_meta(), SEC, &want_back);
    }
}

#[test]
fn vip_backends_distribution_stickiness_and_both_directions() {
    let bs = vec![backend(1, 1), backend(2, 2), backend(3, 3), backend(4, 4)];
    let mut ct = gw(vec![vip_rule(1, bs.clone(), Selection::ConsistentHash)]);
    let m = in_meta();
    let mut chosen = HashMap::new();
    let mut counts: HashMap<[u8; 4], u32> = HashMap::new();
    let flows = 4000u16;
    for i in 0..flows {
        let sp = 10_000 + i;
        let mut f = tcpf(X, sp, N, 443, "S", 1, 0);
        let v = ct.process_mut(&mut f, 0, &m, SEC);
        let (t, _) = conn_of(&ct, v.verdict);
        let b = t[1].src.as_v4();
        assert_eq!(f, tcpf(X, sp, b, 8443, "S", 1, 0));
        verify_checksums(&f);
        chosen.insert(sp, b);
        *counts.entry(b).or_default() += 1;
    }
    for b in &bs {
        let want = f64::from(flows) * f64::from(b.weight) / 10.0;
        let got = f64::from(counts[&b.addr.as_v4()]);
        assert!((got - want).abs() <= want * 0.2, "{b:?}: {got} vs {want}");
    }
    // Replies are translated back to the VIP.
    for sp in (10_000..10_000 + flows).step_by(101) {
        let b = chosen[&sp];
        pass(
            &mut ct,
            &tcpf(b, 8443, X, sp, "SA", 9, 2),
            &out_meta(),
            SEC,
            &tcpf(N, 443, X, sp, "SA", 9, 2),
        );
    }
    // Stickiness: a retransmitted SYN stays on its connection; after the connections
    // are gone, the same client tuple picks the same backend again.
    let sp = 10_007;
    let b = chosen[&sp];
    pass(
        &mut ct,
        &tcpf(X, sp, N, 443, "S", 1, 0),
        &m,
        2 * SEC,
        &tcpf(X, sp, b, 8443, "S", 1, 0),
    );
    let later = 1000 * SEC;
    ct.gc(later, usize::MAX);
    assert_eq!(ct.table().len(), 0);
    assert_eq!(ct.nat_connections(), 0);
    for sp in (10_000..10_000 + flows).step_by(37) {
        let b = chosen[&sp];
        pass(
            &mut ct,
            &tcpf(X, sp, N, 443, "S", 1, 0),
            &m,
            later,
            &tcpf(X, sp, b, 8443, "S", 1, 0),
        );
    }
}

// ------------------------------------------------------------------ ICMP errors

/// A router beyond the NAT reports that N:40000 → S:80 (as the server side saw it)
/// cannot be delivered: RELATED_REPLY, translated back to the inside host, the quote
/// too. And the inside host reports that a reply to it was unreachable: RELATED in the
/// original direction, translated out.
#[test]
fn icmp_errors_about_snat_connections_both_directions() {
    let mut ct = gw(vec![snat_rule(1, None)]);
    let m = out_meta();
    // Two hosts, same port: the second is remapped, so the quote really changes.
    pass(&mut ct, &udp(C, 4000, S, 53), &m, SEC, &udp(N, 4000, S, 53));
    let mut f = udp(C2, 4000, S, 53);
    let v = ct.process_mut(&mut f, 0, &m, SEC);
    let p2 = conn_of(&ct, v.verdict).0[1].dst_l4;
    assert_ne!(p2, 4000);
    for len in [28, 37] {
        // Full quote (UDP checksum fixed) and 8 bytes of UDP (only ports changed).
        let err = icmp_err(R, N, unreach(), &quote(&udp_ip(N, p2, S, 53), len));
        let want = icmp_err(R, C2, unreach(), &quote(&udp_ip(C2, 4000, S, 53), len));
        let v = pass(&mut ct, &err, &in_meta(), SEC, &want);
        assert!(matches!(
            v,
            Verdict::Tracked {
                info: CtInfo::RelatedReply,
                ..
            }
        ));
    }
    // TCP, full 20-byte header quoted (checksum fixed) and only 8 bytes.
    pass(
        &mut ct,
        &tcpf(C2, 4000, S, 80, "S", 1, 0),
        &m,
        SEC,
        &tcpf(N, 4000, S, 80, "S", 1, 0),
    );
    for len in [40, 28] {
        let err = icmp_err(R, N, unreach(), &quote(&tcp_ip(N, 4000, S, 80), len));
        let want = icmp_err(R, C2, unreach(), &quote(&tcp_ip(C2, 4000, S, 80), len));
        let mut g = err.clone();
        let v = ct.process_mut(&mut g, 0, &in_meta(), SEC);
        assert!(v.forward(), "{v:?}");
        // Port unchanged (kept), only the address: compare the headers etherparse
        // cannot build (its TCP quote is a SYN with payload): everything but the inner
        // TCP checksum when truncated is byte-exact.
        assert_eq!(g, want);
        verify_checksums(&g);
    }
    // Echo: error quoting the translated request.
    pass(&mut ct, &echo_req(C, S, 5), &m, SEC, &echo_req(N, S, 5));
    pass(
        &mut ct,
        &icmp_err(R, N, unreach(), &echo_ip(N, S, 5, true)),
        &in_meta(),
        SEC,
        &icmp_err(R, C, unreach(), &echo_ip(C, S, 5, true)),
    );
    // Original direction: inside host C2 says the reply S:53 → C2:4000 was unreachable.
    let v = pass(
        &mut ct,
        &icmp_err(C2, S, unreach(), &udp_ip(S, 53, C2, 4000)),
        &m,
        SEC,
        &icmp_err(N, S, unreach(), &udp_ip(S, 53, N, p2)),
    );
    assert!(matches!(
        v,
        Verdict::Tracked {
            info: CtInfo::Related,
            ..
        }
    ));
}

#[test]
fn icmp_errors_about_dnat_and_full_nat_connections() {
    let mut ct = gw(vec![dnat_udp_rule(1)]);
    pass(
        &mut ct,
        &udp(X, 7, N, 5353),
        &in_meta(),
        SEC,
        &udp(X, 7, SRV_IN, 53),
    );
    // The backend says "port unreachable" about the forwarded packet: it leaves quoting
    // what the client sent.
    pass(
        &mut ct,
        &icmp_err(SRV_IN, X, unreach(), &udp_ip(X, 7, SRV_IN, 53)),
        &out_meta(),
        SEC,
        &icmp_err(N, X, unreach(), &udp_ip(X, 7, N, 5353)),
    );
    // Time exceeded from a router on the client side about the reply.
    let te = Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
    pass(
        &mut ct,
        &icmp_err(R, N, te.clone(), &udp_ip(N, 5353, X, 7)),
        &in_meta(),
        SEC,
        &icmp_err(R, SRV_IN, te, &udp_ip(SRV_IN, 53, X, 7)),
    );
    let mut ct = gw(vec![fullnat_rule(1, proto::UDP)]);
    pass(
        &mut ct,
        &udp(X, 7, N, 80),
        &in_meta(),
        SEC,
        &udp(GW_IN, 7, SRV_IN, 80),
    );
    pass(
        &mut ct,
        &icmp_err(SRV_IN, GW_IN, unreach(), &udp_ip(GW_IN, 7, SRV_IN, 80)),
        &out_meta(),
        SEC,
        &icmp_err(N, X, unreach(), &udp_ip(X, 7, N, 80)),
    );
}

#[test]
fn icmp_errors_about_masquerade_and_vip_connections() {
    let mut ct = gw(vec![masq_rule(1)]);
    let m = PacketMeta {
        in_port: 1,
        out_port: Some(2),
        out_addr: Some(Addr::v4(R)),
    };
    pass(&mut ct, &udp(C, 6000, S, 53), &m, SEC, &udp(R, 6000, S, 53));
    pass(
        &mut ct,
        &icmp_err(X, R, unreach(), &udp_ip(R, 6000, S, 53)),
        &in_meta(),
        SEC,
        &icmp_err(X, C, unreach(), &udp_ip(C, 6000, S, 53)),
    );
    let bs = vec![backend(1, 1), backend(2, 1)];
    let mut ct = gw(vec![vip_rule(2, bs, Selection::ConsistentHash)]);
    let v = pass_any(&mut ct, &tcpf(X, 7000, N, 443, "S", 1, 0), &in_meta());
    let b = conn_of(&ct, v).0[1].src.as_v4();
    // A router on the client's side cannot deliver the SYN/ACK (sent from the VIP) and
    // tells its source, the VIP: the error goes on to the backend, quoting what the
    // backend sent.
    pass(
        &mut ct,
        &icmp_err(R, N, unreach(), &quote(&tcp_ip(N, 443, X, 7000), 28)),
        &in_meta(),
        SEC,
        &icmp_err(R, b, unreach(), &quote(&tcp_ip(b, 8443, X, 7000), 28)),
    );
}

/// Sends a first packet whose translation the test reads back from the table.
fn pass_any(ct: &mut Conntrack, frame: &[u8], meta: &PacketMeta) -> Verdict {
    let mut f = frame.to_vec();
    let v = ct.process_mut(&mut f, 0, meta, SEC);
    assert!(v.forward(), "{v:?}");
    verify_checksums(&f);
    v.verdict
}

#[test]
fn icmp_error_with_bad_checksum_about_a_translated_connection_is_dropped() {
    let mut err = icmp_err(R, N, unreach(), &udp_ip(N, 4000, S, 53));
    // Corrupt the ICMP checksum; parsing without ICMP verification lets it reach NAT.
    err[14 + 20 + 2] ^= 0xFF;
    let mut ct2 = Conntrack::new(Config {
        parse: ParseOptions::VERIFY_NONE,
        ..Config::default()
    });
    ct2.nat_mut()
        .rules_mut()
        .add(snat_rule(1, None))
        .expect("valid");
    ct2.process_mut(&mut udp(C, 4000, S, 53), 0, &out_meta(), SEC);
    let v = ct2.process_mut(&mut err, 0, &in_meta(), SEC);
    assert_eq!(v.nat, NatOutcome::Drop(RewriteError::BadIcmpChecksum));
    assert!(!v.forward());
    assert_eq!(ct2.stats().nat_rewrite_failed, 1);
}

// ------------------------------------------------------------------ lifecycle

#[test]
fn exhaustion_drops_counts_and_frees_on_destroy() {
    let range = PortRange::new(30000, 30003);
    let mut rule = snat_range_rule(1, range);
    if let NatAction::Snat { addrs, .. } = &mut rule.action {
        *addrs = AddrRange::single_v4(N);
    }
    let mut ct = gw(vec![rule]);
    let m = out_meta();
    let mut ports = HashSet::new();
    for i in 0..4u8 {
        let mut f = udp([10, 0, 1, i], 5000, S, 53);
        let v = ct.process_mut(&mut f, 0, &m, SEC);
        let p = conn_of(&ct, v.verdict).0[1].dst_l4;
        assert!(range.contains(p));
        assert!(ports.insert(p), "port {p} handed out twice");
        assert_eq!(f, udp(N, p, S, 53));
    }
    // Full: the fifth host is dropped and counted; nothing else changes.
    let mut f = udp([10, 0, 1, 9], 5000, S, 53);
    let orig = f.clone();
    let v = ct.process_mut(&mut f, 0, &m, SEC);
    assert_eq!(
        v.verdict,
        Verdict::Invalid(Invalid::NatExhausted { rule: Some(1) })
    );
    assert!(!v.forward());
    assert_eq!(f, orig);
    assert_eq!(ct.stats().nat_exhausted, 1);
    assert_eq!(ct.stats().invalid[InvalidKind::InsertClash.index()], 1);
    assert_eq!(ct.nat().stats().exhausted, 1);
    assert_eq!(ct.table().len(), 4);
    // Another destination still works (uniqueness is per remote endpoint) ...
    let mut g = udp([10, 0, 1, 9], 5000, X, 53);
    assert!(ct.process_mut(&mut g, 0, &m, SEC).forward());
    // ... and existing connections keep translating.
    let p0 = *ports.iter().min().expect("ports");
    let back = ct.process_mut(&mut udp(S, 53, N, p0), 0, &in_meta(), SEC);
    assert_eq!(back.nat, NatOutcome::Rewritten);
    // Delete one connection: its binding is released and its port reusable.
    let (slot, _) = ct
        .lookup(&t4(S, 53, N, p0, proto::UDP), SEC)
        .expect("connection");
    assert!(ct.delete(slot).expect("not offloaded"));
    let mut f = udp([10, 0, 1, 9], 5000, S, 53);
    let v = ct.process_mut(&mut f, 0, &m, 2 * SEC);
    assert!(v.forward(), "{v:?}");
    assert_eq!(f, udp(N, p0, S, 53));
    assert_unique(&ct, 2 * SEC);
    // Expiry releases everything: no binding or by-source reference is left.
    ct.gc(1000 * SEC, usize::MAX);
    assert_eq!(ct.table().len(), 0);
    assert_eq!(ct.nat_connections(), 0);
    assert!(ct.nat().by_source().is_empty());
}

#[test]
fn busy_range_is_shortcut_and_forgotten_when_idle() {
    let range = PortRange::new(30_000, 30_255);
    let mut rule = snat_range_rule(1, range);
    if let NatAction::Snat { addrs, .. } = &mut rule.action {
        *addrs = AddrRange::single_v4(N);
    }
    let mut ct = gw(vec![rule]);
    let mut ports = HashSet::new();
    // 240 of 256 ports towards one server: searches get long, the endpoint is recorded.
    for i in 0..240u32 {
        let [_, _, b, c] = i.to_be_bytes();
        let mut f = udp([10, 9, b, c], 40_000, S, 53);
        let v = ct.process_mut(&mut f, 0, &out_meta(), SEC);
        if let Verdict::Tracked { slot, .. } = v.verdict {
            let p = ct.table().get(slot).expect("live").tuples[1].dst_l4;
            assert!(range.contains(p) && ports.insert(p), "unique port {p}");
        }
    }
    assert!(ports.len() >= 235, "{} bound", ports.len());
    assert_eq!(ct.nat().busy_ports().len(), 1);
    assert_eq!(ct.nat().busy_ports().bitmaps(), 1);
    assert_unique(&ct, SEC);
    ct.gc(1000 * SEC, usize::MAX);
    assert!(ct.nat().busy_ports().is_empty());
    assert!(ct.nat().by_source().is_empty());
}

#[test]
fn tcp_rst_that_closes_the_connection_is_still_translated() {
    let mut ct = gw(vec![snat_rule(1, None)]);
    pass(
        &mut ct,
        &tcpf(C, 41000, S, 80, "S", 100, 0),
        &out_meta(),
        SEC,
        &tcpf(N, 41000, S, 80, "S", 100, 0),
    );
    // RST+ACK from the server before any reply: Linux deletes the entry at once.
    pass(
        &mut ct,
        &tcpf(S, 80, N, 41000, "RA", 0, 101),
        &in_meta(),
        SEC,
        &tcpf(S, 80, C, 41000, "RA", 0, 101),
    );
    assert_eq!(ct.table().len(), 0);
    assert_eq!(ct.nat_connections(), 0);
    assert!(ct.nat().by_source().is_empty());
}

#[test]
fn early_drop_releases_bindings() {
    let mut ct = Conntrack::new(Config {
        max_connections: 8,
        ..Config::default()
    });
    ct.nat_mut()
        .rules_mut()
        .add(snat_rule(1, None))
        .expect("valid");
    for i in 0..40u16 {
        let mut f = udp(C, 2000 + i, S, 53);
        assert!(ct.process_mut(&mut f, 0, &out_meta(), SEC).forward());
        assert_unique(&ct, SEC);
        // One by-source reference per live translated connection, at every step.
        assert_eq!(ct.nat_connections(), ct.table().len());
        assert_eq!(ct.nat().by_source().len(), ct.table().len());
    }
    assert!(ct.table().stats().early_drop > 0);
}

#[test]
fn early_drop_spares_offloaded_connections_and_their_bindings() {
    let mut ct = Conntrack::new(Config {
        max_connections: 4,
        ..Config::default()
    });
    ct.nat_mut()
        .rules_mut()
        .add(snat_rule(1, None))
        .expect("valid");
    // Four translated UDP flows that never saw a reply (not ASSURED), offloaded; two
    // of them also in the hardware table.
    let mut held = Vec::new();
    for i in 0..4u16 {
        let mut f = udp(C, 2000 + i, S, 53);
        let v = ct.process_mut(&mut f, 0, &out_meta(), SEC);
        let Verdict::Tracked { slot, .. } = v.verdict else {
            panic!("not tracked: {v:?}");
        };
        ct.mark_offloaded(slot, SEC).expect("udp offloadable");
        if i % 2 == 0 {
            ct.set_hw_offloaded(slot, true);
        }
        held.push(conn_of(&ct, v.verdict));
    }
    // A fifth connection finds only offloaded entries: it is refused, nothing is
    // evicted, and every binding the NIC rewrites to stays reserved.
    let mut f = udp(C, 3000, S, 53);
    let v = ct.process_mut(&mut f, 0, &out_meta(), 2 * SEC);
    assert!(!v.forward(), "table full of offloaded flows: {v:?}");
    assert_eq!(ct.table().stats().early_drop, 0);
    assert_eq!(ct.table().len(), 4);
    assert_eq!(ct.nat_connections(), 4);
    for (tuples, status) in &held {
        let (slot, dir) = ct.lookup(&tuples[1], 2 * SEC).expect("still tracked");
        assert_eq!(dir, Dir::Reply);
        let c = ct.table().get(slot).expect("live");
        assert_eq!(c.tuples, *tuples);
        assert!(c.status.contains(Status::OFFLOAD));
        assert!(status.contains(Status::SRC_NAT));
    }
    assert_unique(&ct, 2 * SEC);
}

#[test]
fn batch_matches_per_packet_processing() {
    let rules = || {
        vec![
            with_proto(snat_rule(1, None), proto::UDP),
            dnat_rule(2),
            with_proto(masq_rule(3), proto::ICMP),
        ]
    };
    let mut frames = Vec::new();
    for i in 0..50u16 {
        let host = [10, 0, 0, u8::try_from(2 + i % 3).unwrap_or(2)];
        frames.push(udp(host, 7000 + i % 5, S, 53));
        frames.push(udp(S, 53, N, 7000 + i % 5));
        frames.push(tcpf(X, 5000 + i, N, 8080, "S", 1, 0));
        frames.push(echo_req(host, S, i));
    }
    let mut one = gw(rules());
    let mut want = frames.clone();
    let singles: Vec<NatVerdict> = want
        .iter_mut()
        .map(|f| one.process_mut(f, 0, &out_meta(), SEC))
        .collect();
    let mut batch = gw(rules());
    let mut got = frames.clone();
    let mut refs: Vec<&mut [u8]> = got.iter_mut().map(Vec::as_mut_slice).collect();
    let mut out = vec![
        NatVerdict {
            verdict: Verdict::Untracked(Untracked::Fragment),
            nat: NatOutcome::Unchanged,
        };
        refs.len()
    ];
    batch.process_batch_mut(&mut refs, 0, &out_meta(), SEC, &mut out);
    assert_eq!(out, singles);
    assert_eq!(got, want);
    assert_eq!(batch.stats(), one.stats());
}

#[test]
fn without_rules_nothing_changes() {
    let mut ct = gw(vec![]);
    let f = tcpf(C, 1, S, 2, "S", 1, 0);
    let v = pass(&mut ct, &f, &out_meta(), SEC, &f);
    let (t, st) = conn_of(&ct, v);
    assert_eq!(t[1], t[0].invert().expect("invertible"));
    assert_eq!(st, Status::CONFIRMED);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Random inside hosts and ports against few servers through a 16-port pool, with
    /// random time steps and GC: reply tuples stay unique, every connection's packets
    /// translate both ways, exhaustion only when the pool is really full for that
    /// server, and when everything expired no binding is left.
    #[test]
    fn ports_stay_unique_under_collisions(ops in prop::collection::vec((0u8..8, 0u16..4, 0u8..3, 0u64..20), 1..200)) {
        let range = PortRange::new(40000, 40015);
        let mut rule = snat_range_rule(1, range);
        if let NatAction::Snat { addrs, .. } = &mut rule.action {
            *addrs = AddrRange::single_v4(N);
        }
        let mut ct = gw(vec![rule]);
        let servers = [S, X, R];
        let mut now = SEC;
        for (host, port, server, step) in ops {
            now += step * SEC;
            ct.gc(now, 64);
            let (h, sp, s) = ([10, 0, 2, host], 3000 + port, servers[usize::from(server)]);
            let mut f = udp(h, sp, s, 53);
            let v = ct.process_mut(&mut f, 0, &out_meta(), now);
            match v.verdict {
                Verdict::Tracked { slot, .. } => {
                    let t = ct.table().get(slot).expect("live").tuples;
                    let p = t[1].dst_l4;
                    prop_assert!(range.contains(p));
                    prop_assert_eq!(&f, &udp(N, p, s, 53));
                    let mut back = udp(s, 53, N, p);
                    let b = ct.process_mut(&mut back, 0, &in_meta(), now);
                    prop_assert!(b.forward());
                    prop_assert_eq!(&back, &udp(s, 53, h, sp));
                }
                Verdict::Invalid(Invalid::NatExhausted { .. }) => {
                    let to_s = ct
                        .table()
                        .iter(now)
                        .filter(|(_, c)| c.tuples[1].src == Addr::v4(s))
                        .count();
                    prop_assert_eq!(to_s, 16);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            let mut seen = HashSet::new();
            for (_, c) in ct.table().iter(now) {
                prop_assert!(seen.insert(c.tuples[0]));
                prop_assert!(seen.insert(c.tuples[1]));
            }
        }
        ct.gc(now + 10_000 * SEC, usize::MAX);
        prop_assert_eq!(ct.nat_connections(), 0);
        prop_assert!(ct.nat().by_source().is_empty());
        prop_assert!(ct.nat().busy_ports().is_empty());
    }
}

// ------------------------------------------------------------------ exact busy-port index

/// A gateway whose one rule SNATs UDP from 10/8 to `N`, ports `ports`.
fn busy_gw(ports: PortRange, max_connections: usize) -> Conntrack {
    let mut rule = snat_range_rule(1, ports);
    if let NatAction::Snat { addrs, .. } = &mut rule.action {
        *addrs = AddrRange::single_v4(N);
    }
    let mut ct = Conntrack::new(Config {
        max_connections,
        ..Config::default()
    });
    ct.nat_mut().rules_mut().add(rule).expect("valid rule");
    ct
}

#[test]
fn connections_to_the_nat_address_keep_the_table_check() {
    let range = PortRange::new(30_000, 30_003);
    let mut ct = busy_gw(range, 64);
    // A first binding makes N a NAT address; the index is exact while it is alone.
    let mut f = udp(C, 40_000, X, 53);
    assert!(ct.process_mut(&mut f, 0, &out_meta(), SEC).forward());
    assert!(ct.nat().index_exact(ct.table().len()));
    // Connections from S to three of the four ports (no rule translates them): the
    // index does not record them, so it is not exact any more ...
    for p in 30_000..30_003 {
        let mut f = udp(S, 53, N, p);
        assert!(ct.process_mut(&mut f, 0, &in_meta(), SEC).forward());
    }
    assert!(!ct.nat().index_exact(ct.table().len()));
    // ... and the search asks the table: the one port nothing holds towards S.
    let unchecked = ct.nat().stats().unchecked;
    let mut f = udp(C, 40_000, S, 53);
    assert!(ct.process_mut(&mut f, 0, &out_meta(), SEC).forward());
    assert_eq!(f, udp(N, 30_003, S, 53));
    assert_eq!(
        ct.nat().stats().unchecked,
        unchecked,
        "every candidate checked"
    );
    assert_unique(&ct, SEC);
    // Everything expires: only bindings again, and the search needs no table check.
    ct.gc(1000 * SEC, usize::MAX);
    let now = 1001 * SEC;
    let mut ports = HashSet::new();
    for i in 0..4u8 {
        assert!(ct.nat().index_exact(ct.table().len()));
        let mut f = udp([10, 0, 1, i], 40_000, S, 53);
        let v = ct.process_mut(&mut f, 0, &out_meta(), now);
        let p = conn_of(&ct, v.verdict).0[1].dst_l4;
        assert!(range.contains(p) && ports.insert(p), "port {p}");
    }
    assert_eq!(ct.nat().stats().unchecked, unchecked + 4);
    assert_unique(&ct, now);
    let mut f = udp([10, 0, 1, 9], 40_000, S, 53);
    let v = ct.process_mut(&mut f, 0, &out_meta(), now);
    assert_eq!(
        v.verdict,
        Verdict::Invalid(Invalid::NatExhausted { rule: Some(1) })
    );
}

/// The connections of `ct` (every one, expired or not), sorted.
fn all_conns(ct: &Conntrack) -> Vec<([Tuple; 2], Status)> {
    let mut v: Vec<_> = ct
        .table()
        .iter(0)
        .map(|(_, c)| (c.tuples, c.status))
        .collect();
    v.sort_by_key(|(t, _)| format!("{t:?}"));
    v
}

/// The slot of the connection whose ORIGINAL tuple is `t0`, expired or not.
fn slot_of(ct: &Conntrack, t0: &Tuple) -> Option<Slot> {
    ct.table()
        .iter(0)
        .find(|(_, c)| c.tuples[0] == *t0)
        .map(|(s, _)| s)
}

/// Hands both instances' released NAT bindings back and checks they hold the same
/// connections.
fn released_and_same(ct: &mut Conntrack, reference: &mut Conntrack) -> Result<(), TestCaseError> {
    ct.release_nat();
    reference.release_nat();
    prop_assert_eq!(all_conns(ct), all_conns(reference));
    Ok(())
}

/// Deletes the connection at position `pick` (of [`all_conns`] of the first) in both
/// instances, which hold the same connections; with `restore`, re-creates it at once
/// as an agent restart does (the table entry, then `NatEngine::restored`).
fn delete_in_both(
    pair: [&mut Conntrack; 2],
    pick: usize,
    restore: bool,
    now: u64,
) -> Result<(), TestCaseError> {
    let conns = all_conns(pair[0]);
    if conns.is_empty() {
        return Ok(());
    }
    let (tuples, status) = conns[pick % conns.len()];
    for c in pair {
        let slot = slot_of(c, &tuples[0]).expect("same connections");
        prop_assert!(c.delete(slot).expect("not offloaded"));
        if restore {
            c.release_nat();
            c.table_mut()
                .insert(
                    tuples[0],
                    tuples[1],
                    status,
                    now + 5 * SEC,
                    L4State::Udp { stream_at: now },
                    now,
                )
                .expect("room");
            c.nat_mut().restored(&tuples, status);
        }
    }
    Ok(())
}

/// What the exact index claims, checked against the table: `BusyPorts` records
/// exactly the live bindings, and when `index_exact` holds every connection is a clean
/// binding (source NAT only, not sent to a NAT address).
fn check_index(ct: &Conntrack) -> Result<(), TestCaseError> {
    let conns = all_conns(ct);
    let mut want: Vec<Tuple> = conns
        .iter()
        .filter(|(_, st)| st.contains(Status::SRC_NAT))
        .map(|(t, _)| t[1].invert().expect("invertible"))
        .collect();
    let mut got = ct.nat().busy_ports().recorded();
    want.sort_by_key(|t| format!("{t:?}"));
    got.sort_by_key(|t| format!("{t:?}"));
    prop_assert_eq!(&got, &want, "busy ports == the live bindings");
    prop_assert_eq!(ct.nat().busy_ports().ports(), want.len());
    if ct.nat().index_exact(ct.table().len()) {
        for (t, st) in &conns {
            prop_assert!(st.contains(Status::SRC_NAT) && !st.contains(Status::DST_NAT));
            prop_assert!(t[0].dst != Addr::v4(N), "{:?} sent to the NAT address", t);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random bindings through a 16-port pool mixed with connections that hold the NAT
    /// address's ports without a binding (sent to it from outside, sent from it by the
    /// gateway itself), bindings sent to the NAT address or to another inside host,
    /// deletions, restores (delete, re-insert, `restored`), expiry
    /// (GC and reaping on lookup) and early drop (a 20-connection table): run in
    /// lockstep with an engine that checks every candidate in the table, the shortcut
    /// changes nothing (verdicts, bytes, connections, counters), the busy-port index
    /// equals the live bindings after every step, and its exactness claim holds.
    #[test]
    fn exact_index_changes_no_decision(
        ops in prop::collection::vec((0u8..11, 0u8..4, 0u16..8, 0u8..2, 0u64..3), 1..250),
    ) {
        let range = PortRange::new(30_000, 30_015);
        let mut ct = busy_gw(range, 20);
        let mut reference = busy_gw(range, 20);
        reference.nat_mut().check_always();
        let servers = [S, X];
        let mut now = SEC;
        for (kind, a, b, server, step) in ops {
            let s = servers[usize::from(server)];
            let (frame, meta) = match kind {
                0..=3 => (Some(udp([10, 0, 2, a], 3000 + b, s, 53)), out_meta()),
                4 => (Some(udp(s, 53, N, 30_000 + b)), in_meta()),
                5 => (Some(udp(N, 30_000 + b, s, 53)), out_meta()),
                // Inside hosts to the NAT address, and to each other, translated: a
                // binding whose ORIGINAL tuple a later candidate's reply may equal.
                8 => (Some(udp([10, 0, 2, a], 3000 + b, N, 30_000 + b)), out_meta()),
                9 => (Some(udp([10, 0, 2, a], 3000 + b, [10, 0, 2, (a + 1) % 4], 3000 + b)), out_meta()),
                _ => (None, out_meta()),
            };
            if let Some(frame) = frame {
                let (mut f, mut g) = (frame.clone(), frame);
                let v = ct.process_mut(&mut f, 0, &meta, now);
                let w = reference.process_mut(&mut g, 0, &meta, now);
                prop_assert_eq!(format!("{v:?}"), format!("{w:?}"));
                prop_assert_eq!(f, g);
            } else if kind == 6 || kind == 7 {
                // Delete (6) or restore (7) the connection at position `b`.
                delete_in_both([&mut ct, &mut reference], usize::from(b), kind == 7, now)?;
            } else {
                now += (step + 1) * SEC;
                ct.gc(now, 3);
                reference.gc(now, 3);
            }
            released_and_same(&mut ct, &mut reference)?;
            let (mut x, y) = (ct.nat().stats(), reference.nat().stats());
            prop_assert_eq!(y.unchecked, 0);
            x.unchecked = 0;
            prop_assert_eq!(x, y);
            check_index(&ct)?;
            assert_unique(&ct, 0);
        }
    }
}

// ------------------------------------------------------------------ packed decisions

/// A gateway for `packed_decisions_are_the_general_ones`: a UDP source rule of kind
/// `kind` (the ones the packed path takes, and some it declines), ports 30000-30015
/// unless said otherwise; a TCP rule to 192.0.2.9, ports 31000-31015; masquerade without
/// ports for the rest.
fn packed_gw(kind: u8, max_connections: usize) -> Conntrack {
    let ports = PortRange::new(30_000, 30_015);
    let mut rule = snat_rule(1, Some(ports));
    let set = |rule: &mut NatRule, a: AddrRange, p: Option<PortRange>, f: NatFlags| {
        rule.action = NatAction::Snat {
            addrs: a,
            ports: p,
            flags: f,
        };
    };
    let two = AddrRange::v4([192, 0, 2, 1], [192, 0, 2, 2]);
    match kind {
        // One address (`N`).
        0 => {}
        // Two addresses, by pair or by source only; UDP only.
        1 => set(&mut rule, two, Some(ports), NatFlags::default()),
        2 => {
            let flags = NatFlags {
                persistent: true,
                ..NatFlags::default()
            };
            set(&mut rule, two, Some(ports), flags);
        }
        // Masquerade to the egress address (`N`).
        3 => {
            rule = masq_rule(1);
            rule.action = NatAction::Masquerade {
                ports: Some(ports),
                flags: NatFlags::default(),
            };
        }
        // A range that holds the clients' own ports (kept when free).
        4 => set(
            &mut rule,
            AddrRange::single_v4(N),
            Some(PortRange::new(3000, 3007)),
            NatFlags::default(),
        ),
        // Declined by the packed path: fully random, no port range.
        5 => {
            let flags = NatFlags {
                random_fully: true,
                ..NatFlags::default()
            };
            set(&mut rule, AddrRange::single_v4(N), Some(ports), flags);
        }
        _ => set(
            &mut rule,
            AddrRange::single_v4(N),
            None,
            NatFlags::default(),
        ),
    }
    rule.r#match.proto = Some(proto::UDP);
    // TCP: one address and other ports; anything else (ICMP): masquerade without ports.
    let mut tcp_rule = snat_rule(2, Some(PortRange::new(31_000, 31_015)));
    tcp_rule.r#match.proto = Some(proto::TCP);
    if let NatAction::Snat { addrs, .. } = &mut tcp_rule.action {
        *addrs = AddrRange::single_v4([192, 0, 2, 9]);
    }
    let mut ct = Conntrack::new(Config {
        max_connections,
        ..Config::default()
    });
    for r in [rule, tcp_rule, masq_rule(3)] {
        ct.nat_mut().rules_mut().add(r).expect("valid rule");
    }
    ct
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The packed decision (`NatEngine::decide_v4`, with the entry's key built from
    /// words) in lockstep with the general one (`decide_in`, `Key::compact`) on the
    /// same connections: new ones from inside (TCP and UDP, through `process_mut` and
    /// the batch), ICMP, connections to the NAT address's ports from outside and from
    /// it, deletions, restores and expiry, under each kind of rule: the same
    /// verdicts, bytes, connections, NAT counters, rule counters and busy ports.
    #[test]
    fn packed_decisions_are_the_general_ones(
        kind in 0u8..7,
        ops in prop::collection::vec((0u8..12, 0u8..4, 0u16..8, 0u8..3, 0u64..3), 1..200),
    ) {
        let mut ct = packed_gw(kind, 24);
        let mut reference = packed_gw(kind, 24);
        reference.nat_mut().only_general();
        let servers = [S, X, N];
        let mut now = SEC;
        for (op, a, b, server, step) in ops {
            let s = servers[usize::from(server)];
            let (frame, meta, batch) = match op {
                0..=2 => (Some(udp([10, 0, 2, a], 3000 + b, s, 53)), out_meta(), false),
                3 => (Some(udp([10, 0, 2, a], 3000 + b, s, 53)), out_meta(), true),
                4 => (Some(crate::nat::tests::tcp([10, 0, 2, a], 3000 + b, s, 80)), out_meta(), a & 1 == 0),
                5 => (Some(udp(s, 53, N, 30_000 + b)), in_meta(), false),
                6 => (Some(udp(N, 30_000 + b, s, 53)), out_meta(), true),
                7 => (Some(echo([10, 0, 2, a], s, 3000 + b, true)), out_meta(), false),
                _ => (None, out_meta(), false),
            };
            if let Some(frame) = frame {
                let (mut f, mut g) = (frame.clone(), frame);
                let (v, w) = if batch {
                    let none = NatVerdict {
                        verdict: Verdict::Untracked(Untracked::Fragment),
                        nat: NatOutcome::Unchanged,
                    };
                    let (mut o, mut p) = ([none], [none]);
                    ct.process_batch_mut(&mut [&mut f[..]], 0, &meta, now, &mut o);
                    reference.process_batch_mut(&mut [&mut g[..]], 0, &meta, now, &mut p);
                    (o[0], p[0])
                } else {
                    (
                        ct.process_mut(&mut f, 0, &meta, now),
                        reference.process_mut(&mut g, 0, &meta, now),
                    )
                };
                prop_assert_eq!(format!("{v:?}"), format!("{w:?}"));
                prop_assert_eq!(f, g);
            } else if op == 8 || op == 9 {
                // Delete (8) or restore (9) the connection at position `b`.
                delete_in_both([&mut ct, &mut reference], usize::from(b), op == 9, now)?;
            } else {
                now += (step + 1) * SEC;
                ct.gc(now, 3);
                reference.gc(now, 3);
            }
            released_and_same(&mut ct, &mut reference)?;
            prop_assert_eq!(ct.nat().stats(), reference.nat().stats());
            for id in 1..=3 {
                prop_assert_eq!(ct.nat().rules().stats(id), reference.nat().rules().stats(id));
            }
            prop_assert_eq!(format!("{:?}", ct.stats()), format!("{:?}", reference.stats()));
            let (mut x, mut y) = (
                ct.nat().busy_ports().recorded(),
                reference.nat().busy_ports().recorded(),
            );
            x.sort_by_key(|t| format!("{t:?}"));
            y.sort_by_key(|t| format!("{t:?}"));
            prop_assert_eq!(x, y);
            prop_assert_eq!(ct.nat().by_source().len(), reference.nat().by_source().len());
            prop_assert_eq!(
                ct.nat().index_exact(ct.table().len()),
                reference.nat().index_exact(reference.table().len())
            );
            assert_unique(&ct, 0);
        }
        // The events the agent sees are the same too.
        let (ev, rv): (Vec<_>, Vec<_>) = (
            ct.table_mut().drain_events().collect(),
            reference.table_mut().drain_events().collect(),
        );
        prop_assert_eq!(format!("{ev:?}"), format!("{rv:?}"));
    }
}
