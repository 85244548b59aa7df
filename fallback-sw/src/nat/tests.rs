//! NAT tests: every expected frame is built independently with etherparse (all
//! checksums computed by it from scratch) and compared byte for byte.

use std::collections::{HashMap, HashSet};

use etherparse::icmpv4::{DestUnreachableHeader, TimeExceededCode};
use etherparse::{Icmpv4Type, IpDscp, IpHeaders, IpNumber, Ipv4Header, PacketBuilder};
use proptest::prelude::*;

use super::alloc::Manip;
use super::rewrite::{self, RewriteError, TtlExpired};
use super::rules::*;
use super::*;
use crate::conntrack::Prefix;
use crate::table::Status;
use crate::tuple::{Addr, Dir, Family, Tuple, proto};
use crate::wire::{L4, ParseOptions, parse};

pub(crate) const MAC_C: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
pub(crate) const MAC_G: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub(crate) const C: [u8; 4] = [10, 0, 0, 5];
pub(crate) const C2: [u8; 4] = [10, 0, 0, 6];
pub(crate) const SRV_IN: [u8; 4] = [10, 0, 0, 10];
pub(crate) const GW_IN: [u8; 4] = [10, 0, 0, 1];
pub(crate) const S: [u8; 4] = [203, 0, 113, 10];
pub(crate) const X: [u8; 4] = [198, 51, 100, 7];
pub(crate) const N: [u8; 4] = [192, 0, 2, 1];
pub(crate) const R: [u8; 4] = [203, 0, 113, 254];

// ---------------------------------------------------------------- frame builders

pub(crate) fn tcp_ip(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .tcp(sp, dp, 0x1234_5678, 4096)
        .syn()
        .write(&mut v, b"hello tcp")
        .expect("write");
    v
}

pub(crate) fn tcp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, 0x1234_5678, 4096)
        .syn()
        .write(&mut v, b"hello tcp")
        .expect("write");
    v
}

pub(crate) fn udp_ip(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, b"dns query")
        .expect("write");
    v
}

pub(crate) fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, b"dns query")
        .expect("write");
    v
}

pub(crate) fn udp_nocsum(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = udp(src, sp, dst, dp);
    v[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    v
}

pub(crate) fn echo_ip(src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(id, 7)
    } else {
        b.icmpv4_echo_reply(id, 7)
    };
    b.write(&mut v, b"ping data").expect("write");
    v
}

pub(crate) fn echo(src: [u8; 4], dst: [u8; 4], id: u16, request: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(MAC_C, MAC_G).ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(id, 7)
    } else {
        b.icmpv4_echo_reply(id, 7)
    };
    b.write(&mut v, b"ping data").expect("write");
    v
}

pub(crate) fn icmp_err(src: [u8; 4], dst: [u8; 4], ty: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(src, dst, 60)
        .icmpv4(ty)
        .write(&mut v, quote)
        .expect("write");
    v
}

pub(crate) fn unreach() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

// ---------------------------------------------------------------- harness

pub(crate) fn t4(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, p: u8) -> Tuple {
    Tuple::v4(src, sp, dst, dp, p)
}

/// The tuple of a frame, as conntrack builds it.
pub(crate) fn tuple_of(frame: &[u8]) -> Tuple {
    let p = parse(frame, ParseOptions::VERIFY_ALL).expect("valid frame");
    let (sl4, dl4) = match p.l4 {
        L4::Tcp(t) => (t.src_port, t.dst_port),
        L4::Udp { src_port, dst_port } | L4::Ports { src_port, dst_port } => (src_port, dst_port),
        L4::IcmpQuery {
            id,
            icmp_type,
            code,
        } => (id, u16::from_be_bytes([icmp_type, code])),
        _ => (0, 0),
    };
    let (src, family) = Addr::from_ip(p.src);
    Tuple {
        src,
        dst: Addr::from_ip(p.dst).0,
        src_l4: sl4,
        dst_l4: dl4,
        proto: p.protocol,
        family,
        zone: 0,
    }
}

/// A gateway: the NAT engine and a stand-in for the connection table.
struct Gw {
    nat: NatEngine,
    table: HashSet<Tuple>,
}

#[derive(Debug, Clone, Copy)]
struct Conn {
    tuples: [Tuple; 2],
    status: Status,
}

impl Gw {
    fn new(rules: Vec<NatRule>) -> Self {
        let mut nat = NatEngine::new(7);
        for r in rules {
            nat.rules_mut().add(r).expect("valid rule");
        }
        Self {
            nat,
            table: HashSet::new(),
        }
    }

    fn connect(&mut self, orig: Tuple, meta: &PacketMeta) -> Result<Conn, NatError> {
        let table = &self.table;
        let d = self.nat.decide(&orig, meta, &mut |r| table.contains(r))?;
        assert!(!self.table.contains(&d.reply), "reply tuple unique");
        self.table.insert(orig);
        self.table.insert(d.reply);
        Ok(Conn {
            tuples: [orig, d.reply],
            status: d.status,
        })
    }

    /// Connects with the tuple of the first packet `frame`.
    fn first(&mut self, frame: &[u8], meta: &PacketMeta) -> Conn {
        self.connect(tuple_of(frame), meta).expect("nat decision")
    }

    fn close(&mut self, c: &Conn) {
        self.table.remove(&c.tuples[0]);
        self.table.remove(&c.tuples[1]);
        self.nat.released(&c.tuples, c.status);
    }
}

/// Rewrites `frame` as the pipeline would, checking that input and output verify.
fn nat(frame: &[u8], c: &Conn, dir: Dir) -> Vec<u8> {
    let mut f = frame.to_vec();
    let p = parse(&f, ParseOptions::VERIFY_ALL).expect("input verifies");
    rewrite::rewrite(&mut f, &p, &c.tuples, c.status, dir).expect("rewrite");
    parse(&f, ParseOptions::VERIFY_ALL).expect("output verifies");
    f
}

pub(crate) fn assert_frame(got: &[u8], want: &[u8]) {
    assert_eq!(
        got,
        want,
        "\n got: {:02x?}\nwant: {:02x?}",
        &got[14..],
        &want[14..]
    );
}

pub(crate) fn out_meta() -> PacketMeta {
    PacketMeta {
        in_port: 1,
        out_port: Some(2),
        out_addr: Some(Addr::v4(N)),
    }
}

pub(crate) fn in_meta() -> PacketMeta {
    PacketMeta {
        in_port: 2,
        out_port: Some(1),
        out_addr: Some(Addr::v4(GW_IN)),
    }
}

pub(crate) fn prefix(a: [u8; 4], len: u8) -> Prefix {
    Prefix {
        family: Family::V4,
        addr: Addr::v4(a),
        len,
    }
}

pub(crate) fn snat_rule(id: RuleId, ports: Option<PortRange>) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            src: Some(prefix([10, 0, 0, 0], 8)),
            out_port: Some(2),
            ..RuleMatch::default()
        },
        action: NatAction::Snat {
            addrs: AddrRange::single_v4(N),
            ports,
            flags: NatFlags::default(),
        },
    }
}

pub(crate) fn with_proto(mut r: NatRule, p: u8) -> NatRule {
    r.r#match.proto = Some(p);
    r
}

pub(crate) fn masq_rule(id: RuleId) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            out_port: Some(2),
            ..RuleMatch::default()
        },
        action: NatAction::Masquerade {
            ports: None,
            flags: NatFlags::default(),
        },
    }
}

pub(crate) fn dnat_rule(id: RuleId) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            dst: Some(prefix(N, 32)),
            proto: Some(proto::TCP),
            dport: Some(PortRange::single(8080)),
            ..RuleMatch::default()
        },
        action: NatAction::Dnat {
            to_addr: Addr::v4(SRV_IN),
            to_port: Some(80),
        },
    }
}

pub(crate) fn dnat_udp_rule(id: RuleId) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            dst: Some(prefix(N, 32)),
            proto: Some(proto::UDP),
            dport: Some(PortRange::single(5353)),
            ..RuleMatch::default()
        },
        action: NatAction::Dnat {
            to_addr: Addr::v4(SRV_IN),
            to_port: Some(53),
        },
    }
}

pub(crate) fn dnat_icmp_rule(id: RuleId) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            dst: Some(prefix(N, 32)),
            proto: Some(proto::ICMP),
            ..RuleMatch::default()
        },
        action: NatAction::Dnat {
            to_addr: Addr::v4(SRV_IN),
            to_port: None,
        },
    }
}

pub(crate) fn fullnat_rule(id: RuleId, p: u8) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            dst: Some(prefix(N, 32)),
            proto: Some(p),
            in_port: Some(2),
            ..RuleMatch::default()
        },
        action: NatAction::FullNat {
            to_addr: Addr::v4(SRV_IN),
            to_port: if p == proto::ICMP { None } else { Some(80) },
            snat_addrs: AddrRange::single_v4(GW_IN),
            snat_ports: None,
            flags: NatFlags::default(),
        },
    }
}

pub(crate) fn vip_rule(id: RuleId, backends: Vec<Backend>, selection: Selection) -> NatRule {
    NatRule {
        id,
        r#match: RuleMatch {
            dst: Some(prefix(N, 32)),
            proto: Some(proto::TCP),
            dport: Some(PortRange::single(443)),
            ..RuleMatch::default()
        },
        action: NatAction::Vip {
            backends,
            selection,
        },
    }
}

pub(crate) fn backend(last: u8, weight: u32) -> Backend {
    Backend {
        addr: Addr::v4([10, 0, 1, last]),
        port: Some(8443),
        weight,
    }
}

// ---------------------------------------------------------------- SNAT

#[test]
fn snat_tcp_both_directions_port_kept() {
    let mut gw = Gw::new(vec![snat_rule(1, None)]);
    let syn = tcp(C, 40000, S, 80);
    let c = gw.first(&syn, &out_meta());
    assert_eq!(
        c.status,
        Status::SRC_NAT | Status::SRC_NAT_DONE | Status::DST_NAT_DONE
    );
    assert_eq!(c.tuples[1], t4(S, 80, N, 40000, proto::TCP));
    assert_frame(&nat(&syn, &c, Dir::Original), &tcp(N, 40000, S, 80));
    assert_frame(
        &nat(&tcp(S, 80, N, 40000), &c, Dir::Reply),
        &tcp(S, 80, C, 40000),
    );
}

#[test]
fn snat_tcp_port_clash_remaps() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(20000, 20099))),
        proto::TCP,
    )]);
    // Two inside hosts with the same source port to the same server.
    let a = gw.first(&tcp(C, 20050, S, 80), &out_meta());
    let b = gw.first(&tcp(C2, 20050, S, 80), &out_meta());
    assert_eq!(a.tuples[1].dst_l4, 20050, "first keeps its port");
    let p = b.tuples[1].dst_l4;
    assert_ne!(p, 20050);
    assert!((20000..=20099).contains(&p));
    assert_frame(
        &nat(&tcp(C2, 20050, S, 80), &b, Dir::Original),
        &tcp(N, p, S, 80),
    );
    assert_frame(
        &nat(&tcp(S, 80, N, p), &b, Dir::Reply),
        &tcp(S, 80, C2, 20050),
    );
    // A source port outside the range is moved into it.
    let d = gw.first(&tcp(C, 5, S, 80), &out_meta());
    assert!((20000..=20099).contains(&d.tuples[1].dst_l4));
}

#[test]
fn snat_udp_both_directions_and_zero_checksum_stays_zero() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(30000, 30000))),
        proto::UDP,
    )]);
    let q = udp(C, 53000, S, 53);
    let c = gw.first(&q, &out_meta());
    assert_eq!(c.tuples[1], t4(S, 53, N, 30000, proto::UDP));
    assert_frame(&nat(&q, &c, Dir::Original), &udp(N, 30000, S, 53));
    assert_frame(
        &nat(&udp(S, 53, N, 30000), &c, Dir::Reply),
        &udp(S, 53, C, 53000),
    );
    let out = nat(&udp_nocsum(C, 53000, S, 53), &c, Dir::Original);
    assert_frame(&out, &udp_nocsum(N, 30000, S, 53));
    let back = nat(&udp_nocsum(S, 53, N, 30000), &c, Dir::Reply);
    assert_frame(&back, &udp_nocsum(S, 53, C, 53000));
}

#[test]
fn udp_update_that_sums_to_zero_is_sent_as_ffff() {
    // Find a source port for which the rewritten datagram's checksum is 0xFFFF when
    // computed from scratch (one's complement sum 0): the update must not write 0.
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(30000, 30000))),
        proto::UDP,
    )]);
    let want_ffff = (1u16..=u16::MAX)
        .find(|&sp| {
            let f = udp(N, 30000, S, sp);
            f[14 + 20 + 6..14 + 20 + 8] == [0xFF, 0xFF]
        })
        .expect("some port gives 0xFFFF");
    let c = gw.first(&udp(C, 1234, S, want_ffff), &out_meta());
    let out = nat(&udp(C, 1234, S, want_ffff), &c, Dir::Original);
    assert_frame(&out, &udp(N, 30000, S, want_ffff));
}

#[test]
fn snat_icmp_echo_id_both_directions() {
    let mut gw = Gw::new(vec![snat_rule(1, None)]);
    let a = gw.first(&echo(C, S, 0x1c46, true), &out_meta());
    // Same id from another host: the id is remapped.
    let b = gw.first(&echo(C2, S, 0x1c46, true), &out_meta());
    assert_eq!(a.tuples[1].src_l4, 0x1c46);
    let id = b.tuples[1].src_l4;
    assert_ne!(id, 0x1c46);
    assert_frame(
        &nat(&echo(C2, S, 0x1c46, true), &b, Dir::Original),
        &echo(N, S, id, true),
    );
    assert_frame(
        &nat(&echo(S, N, id, false), &b, Dir::Reply),
        &echo(S, C2, 0x1c46, false),
    );
}

#[test]
fn masquerade_uses_egress_address() {
    let mut gw = Gw::new(vec![masq_rule(1)]);
    let meta = PacketMeta {
        out_addr: Some(Addr::v4([192, 0, 2, 99])),
        ..out_meta()
    };
    let q = udp(C, 53000, S, 53);
    let c = gw.first(&q, &meta);
    assert_frame(
        &nat(&q, &c, Dir::Original),
        &udp([192, 0, 2, 99], 53000, S, 53),
    );
    assert_frame(
        &nat(&udp(S, 53, [192, 0, 2, 99], 53000), &c, Dir::Reply),
        &udp(S, 53, C, 53000),
    );
    let t = tcp(C, 40000, S, 80);
    let c = gw.first(&t, &meta);
    assert_frame(
        &nat(&t, &c, Dir::Original),
        &tcp([192, 0, 2, 99], 40000, S, 80),
    );
    let e = echo(C, S, 9, true);
    let c = gw.first(&e, &meta);
    assert_frame(
        &nat(&e, &c, Dir::Original),
        &echo([192, 0, 2, 99], S, 9, true),
    );
    // No address on the egress port: an error and a counter.
    let none = PacketMeta {
        out_addr: None,
        ..out_meta()
    };
    let err = gw.connect(tuple_of(&tcp(C, 1, S, 80)), &none);
    assert!(matches!(
        err,
        Err(NatError::NoMasqueradeAddress { rule: 1 })
    ));
    assert_eq!(gw.nat.stats().no_masquerade_address, 1);
}

// ---------------------------------------------------------------- DNAT

/// The PREROUTING lookup is skipped while no destination rule is in the set: the
/// count follows adds and removes, and a destination rule added later applies.
#[test]
fn dst_rule_count_follows_adds_and_removes() {
    let mut set = NatRuleSet::new();
    assert!(!set.has_dst_rules());
    set.add(snat_rule(1, None)).expect("snat");
    assert!(!set.has_dst_rules());
    set.add(dnat_rule(2)).expect("dnat");
    set.add(dnat_udp_rule(3)).expect("dnat udp");
    assert!(set.has_dst_rules());
    set.remove(2).expect("known");
    assert!(set.has_dst_rules());
    assert!(set.remove(2).is_none());
    set.remove(3).expect("known");
    assert!(!set.has_dst_rules());
    let syn = t4(X, 5555, N, 8080, proto::TCP);
    assert!(set.lookup(Hook::Dst, &syn, &in_meta()).is_none());
    set.add(dnat_rule(4)).expect("dnat");
    assert_eq!(
        set.lookup(Hook::Dst, &syn, &in_meta()).map(|r| r.id),
        Some(4)
    );
}

#[test]
fn dnat_tcp_udp_icmp_both_directions() {
    let mut gw = Gw::new(vec![dnat_rule(1), dnat_udp_rule(2), dnat_icmp_rule(3)]);
    let syn = tcp(X, 5555, N, 8080);
    let c = gw.first(&syn, &in_meta());
    assert_eq!(
        c.status,
        Status::DST_NAT | Status::SRC_NAT_DONE | Status::DST_NAT_DONE
    );
    assert_eq!(c.tuples[1], t4(SRV_IN, 80, X, 5555, proto::TCP));
    assert_frame(&nat(&syn, &c, Dir::Original), &tcp(X, 5555, SRV_IN, 80));
    assert_frame(
        &nat(&tcp(SRV_IN, 80, X, 5555), &c, Dir::Reply),
        &tcp(N, 8080, X, 5555),
    );

    let q = udp(X, 999, N, 5353);
    let c = gw.first(&q, &in_meta());
    assert_frame(&nat(&q, &c, Dir::Original), &udp(X, 999, SRV_IN, 53));
    assert_frame(
        &nat(&udp(SRV_IN, 53, X, 999), &c, Dir::Reply),
        &udp(N, 5353, X, 999),
    );

    let e = echo(X, N, 77, true);
    let c = gw.first(&e, &in_meta());
    assert_frame(&nat(&e, &c, Dir::Original), &echo(X, SRV_IN, 77, true));
    assert_frame(
        &nat(&echo(SRV_IN, X, 77, false), &c, Dir::Reply),
        &echo(N, X, 77, false),
    );

    // Not matching the rule's port: untouched.
    let other = gw.first(&tcp(X, 5555, N, 22), &in_meta());
    assert_eq!(other.status, Status::SRC_NAT_DONE | Status::DST_NAT_DONE);
}

// ---------------------------------------------------------------- full NAT

#[test]
fn full_nat_tcp_udp_icmp_both_directions() {
    let mut gw = Gw::new(vec![
        fullnat_rule(1, proto::TCP),
        NatRule {
            action: NatAction::FullNat {
                to_addr: Addr::v4(SRV_IN),
                to_port: Some(53),
                snat_addrs: AddrRange::single_v4([10, 0, 0, 2]),
                snat_ports: None,
                flags: NatFlags::default(),
            },
            ..fullnat_rule(2, proto::UDP)
        },
        NatRule {
            action: NatAction::FullNat {
                to_addr: Addr::v4(SRV_IN),
                to_port: None,
                snat_addrs: AddrRange::single_v4([10, 0, 0, 3]),
                snat_ports: None,
                flags: NatFlags::default(),
            },
            ..fullnat_rule(3, proto::ICMP)
        },
    ]);
    let syn = tcp(X, 5555, N, 8080);
    let c = gw.first(&syn, &in_meta());
    assert!(c.status.contains(Status::SRC_NAT | Status::DST_NAT));
    assert_eq!(c.tuples[1], t4(SRV_IN, 80, GW_IN, 5555, proto::TCP));
    assert_frame(&nat(&syn, &c, Dir::Original), &tcp(GW_IN, 5555, SRV_IN, 80));
    assert_frame(
        &nat(&tcp(SRV_IN, 80, GW_IN, 5555), &c, Dir::Reply),
        &tcp(N, 8080, X, 5555),
    );
    assert_eq!(gw.nat.rules().stats(1).map(|s| s.matched), Some(1));

    let q = udp(X, 999, N, 5353);
    let c = gw.first(&q, &in_meta());
    let d = [10, 0, 0, 2];
    assert_frame(&nat(&q, &c, Dir::Original), &udp(d, 999, SRV_IN, 53));
    assert_frame(
        &nat(&udp(SRV_IN, 53, d, 999), &c, Dir::Reply),
        &udp(N, 5353, X, 999),
    );

    let e = echo(X, N, 31, true);
    let c = gw.first(&e, &in_meta());
    let d = [10, 0, 0, 3];
    assert_frame(&nat(&e, &c, Dir::Original), &echo(d, SRV_IN, 31, true));
    assert_frame(
        &nat(&echo(SRV_IN, d, 31, false), &c, Dir::Reply),
        &echo(N, X, 31, false),
    );
}

// ---------------------------------------------------------------- VIP

#[test]
fn vip_rewrites_to_backend_both_directions() {
    let bs = vec![backend(1, 1), backend(2, 1)];
    let mut gw = Gw::new(vec![vip_rule(1, bs.clone(), Selection::ConsistentHash)]);
    let syn = tcp(X, 5555, N, 443);
    let c = gw.first(&syn, &in_meta());
    let b = bs
        .iter()
        .find(|b| b.addr == c.tuples[1].src)
        .expect("a backend");
    let ba = b.addr.as_v4();
    assert_eq!(c.tuples[1], t4(ba, 8443, X, 5555, proto::TCP));
    assert_frame(&nat(&syn, &c, Dir::Original), &tcp(X, 5555, ba, 8443));
    assert_frame(
        &nat(&tcp(ba, 8443, X, 5555), &c, Dir::Reply),
        &tcp(N, 443, X, 5555),
    );
    // Removing that backend: the connection keeps its tuples and keeps working.
    let rest: Vec<Backend> = bs.iter().copied().filter(|x| x != b).collect();
    gw.nat.rules_mut().set_backends(1, rest).expect("valid");
    assert_frame(
        &nat(&tcp(ba, 8443, X, 5555), &c, Dir::Reply),
        &tcp(N, 443, X, 5555),
    );
    // New connections avoid it.
    for sp in 1000..1100 {
        let c2 = gw.first(&tcp(X, sp, N, 443), &in_meta());
        assert_ne!(c2.tuples[1].src, b.addr);
    }
}

fn client(i: u32) -> Tuple {
    let [a, b, c, d] = (0xC633_0000u32 + (i >> 8)).to_be_bytes();
    let port = u16::try_from(1024 + (i & 0xFF)).expect("small");
    t4([a, b, c, d], port, N, 443, proto::TCP)
}

#[test]
fn vip_consistent_hash_distribution_stickiness_and_minimal_disruption() {
    let bs = vec![backend(1, 1), backend(2, 2), backend(3, 3), backend(4, 4)];
    let mut nat = NatEngine::new(11);
    nat.rules_mut()
        .add(vip_rule(1, bs.clone(), Selection::ConsistentHash))
        .expect("valid");
    let flows = 100_000u32;
    let mut first: HashMap<u32, Addr> = HashMap::new();
    let mut counts: HashMap<Addr, u32> = HashMap::new();
    for i in 0..flows {
        let d = nat
            .decide(&client(i), &in_meta(), &mut |_| false)
            .expect("ok");
        first.insert(i, d.reply.src);
        *counts.entry(d.reply.src).or_default() += 1;
    }
    for b in &bs {
        let want = f64::from(flows) * f64::from(b.weight) / 10.0;
        let got = f64::from(counts[&b.addr]);
        assert!((got - want).abs() <= want * 0.10, "{b:?}: {got} vs {want}");
    }
    // Stickiness: the same client tuple gets the same backend again.
    for i in (0..flows).step_by(97) {
        let d = nat
            .decide(&client(i), &in_meta(), &mut |_| false)
            .expect("ok");
        assert_eq!(d.reply.src, first[&i]);
    }
    // Removing backend 2 moves only its flows.
    let removed = bs[1].addr;
    let rest: Vec<Backend> = bs.iter().copied().filter(|b| b.addr != removed).collect();
    nat.rules_mut().set_backends(1, rest).expect("valid");
    let mut moved = 0;
    for i in 0..flows {
        let d = nat
            .decide(&client(i), &in_meta(), &mut |_| false)
            .expect("ok");
        assert_ne!(d.reply.src, removed);
        if first[&i] == removed {
            moved += 1;
        } else {
            assert_eq!(d.reply.src, first[&i], "flow {i} moved needlessly");
        }
    }
    assert_eq!(moved, counts[&removed]);
}

#[test]
fn vip_weighted_round_robin_is_exact() {
    let bs = vec![backend(1, 1), backend(2, 2), backend(3, 5)];
    let mut nat = NatEngine::new(3);
    nat.rules_mut()
        .add(vip_rule(1, bs.clone(), Selection::WeightedRoundRobin))
        .expect("valid");
    let mut counts: HashMap<Addr, u32> = HashMap::new();
    for i in 0..8000 {
        let d = nat
            .decide(&client(i), &in_meta(), &mut |_| false)
            .expect("ok");
        *counts.entry(d.reply.src).or_default() += 1;
    }
    for b in &bs {
        assert_eq!(counts[&b.addr], 1000 * b.weight);
    }
}

// ---------------------------------------------------------------- hairpin

#[test]
fn hairpin_inside_client_reaches_inside_server_through_public_address() {
    let hairpin = NatRule {
        id: 2,
        r#match: RuleMatch {
            src: Some(prefix([10, 0, 0, 0], 24)),
            dst: Some(prefix([10, 0, 0, 0], 24)),
            ..RuleMatch::default()
        },
        action: NatAction::Masquerade {
            ports: None,
            flags: NatFlags::default(),
        },
    };
    let mut gw = Gw::new(vec![dnat_rule(1), hairpin, snat_rule(3, None)]);
    let meta = PacketMeta {
        in_port: 1,
        out_port: Some(1),
        out_addr: Some(Addr::v4(GW_IN)),
    };
    let syn = tcp(C, 40000, N, 8080);
    let c = gw.first(&syn, &meta);
    assert_eq!(c.tuples[1], t4(SRV_IN, 80, GW_IN, 40000, proto::TCP));
    assert!(c.status.contains(Status::SRC_NAT | Status::DST_NAT));
    // The server sees the gateway as the client, so its reply returns through it.
    assert_frame(
        &nat(&syn, &c, Dir::Original),
        &tcp(GW_IN, 40000, SRV_IN, 80),
    );
    // And the client sees the public address answer.
    assert_frame(
        &nat(&tcp(SRV_IN, 80, GW_IN, 40000), &c, Dir::Reply),
        &tcp(N, 8080, C, 40000),
    );
}

// ---------------------------------------------------------------- ICMP errors

/// The quote an ICMP error carries: the IP header and the first `l4` bytes after it.
fn quote(ip: &[u8], l4: usize) -> Vec<u8> {
    ip[..20 + l4].to_vec()
}

#[test]
fn icmp_error_snat_reply_direction_udp_full_quote() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(30000, 30000))),
        proto::UDP,
    )]);
    let c = gw.first(&udp(C, 53000, S, 53), &out_meta());
    // S says port unreachable to N about N:30000 -> S:53.
    let err = icmp_err(S, N, unreach(), &udp_ip(N, 30000, S, 53));
    let want = icmp_err(S, C, unreach(), &udp_ip(C, 53000, S, 53));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
}

#[test]
fn icmp_error_inner_udp_zero_checksum_stays_zero() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(30000, 30000))),
        proto::UDP,
    )]);
    let c = gw.first(&udp(C, 53000, S, 53), &out_meta());
    let zero = |mut ip: Vec<u8>| {
        ip[26..28].copy_from_slice(&[0, 0]);
        ip
    };
    let err = icmp_err(S, N, unreach(), &zero(udp_ip(N, 30000, S, 53)));
    let want = icmp_err(S, C, unreach(), &zero(udp_ip(C, 53000, S, 53)));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
}

#[test]
fn icmp_error_snat_tcp_full_and_eight_byte_quotes() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(31000, 31000))),
        proto::TCP,
    )]);
    let c = gw.first(&tcp(C, 40000, S, 80), &out_meta());
    let ttl = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    // A router on the way quotes the whole packet: inner TCP checksum fixed too.
    let err = icmp_err(R, N, ttl.clone(), &tcp_ip(N, 31000, S, 80));
    let want = icmp_err(R, C, ttl.clone(), &tcp_ip(C, 40000, S, 80));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
    // Only 8 bytes of TCP quoted: ports changed, no checksum to fix.
    let err = icmp_err(R, N, ttl.clone(), &quote(&tcp_ip(N, 31000, S, 80), 8));
    let want = icmp_err(R, C, ttl, &quote(&tcp_ip(C, 40000, S, 80), 8));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
}

#[test]
fn icmp_error_about_echo_translates_inner_id() {
    let mut gw = Gw::new(vec![snat_rule(1, None)]);
    let _first = gw.first(&echo(C2, S, 0x0042, true), &out_meta());
    let c = gw.first(&echo(C, S, 0x0042, true), &out_meta());
    let id = c.tuples[1].src_l4;
    assert_ne!(id, 0x0042);
    let err = icmp_err(R, N, unreach(), &echo_ip(N, S, id, true));
    let want = icmp_err(R, C, unreach(), &echo_ip(C, S, 0x0042, true));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
}

#[test]
fn icmp_error_dnat_original_direction() {
    let mut gw = Gw::new(vec![dnat_rule(1)]);
    let c = gw.first(&tcp(X, 5555, N, 8080), &in_meta());
    // A router towards X cannot deliver our reply N:8080 -> X:5555; the error comes in
    // addressed to N, quoting the translated reply. It matches the ORIGINAL tuple.
    let err = icmp_err(R, N, unreach(), &tcp_ip(N, 8080, X, 5555));
    let want = icmp_err(R, SRV_IN, unreach(), &tcp_ip(SRV_IN, 80, X, 5555));
    assert_frame(&nat(&err, &c, Dir::Original), &want);
    // The server's host unreachable about the forwarded packet travels as a reply: the
    // outer source becomes the public address.
    let err = icmp_err(
        SRV_IN,
        X,
        unreach(),
        &quote(&tcp_ip(X, 5555, SRV_IN, 80), 8),
    );
    let want = icmp_err(N, X, unreach(), &quote(&tcp_ip(X, 5555, N, 8080), 8));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
}

#[test]
fn icmp_error_full_nat_and_vip() {
    let mut gw = Gw::new(vec![fullnat_rule(1, proto::TCP)]);
    let c = gw.first(&tcp(X, 5555, N, 8080), &in_meta());
    // The backend says port unreachable to the gateway's inside address.
    let err = icmp_err(SRV_IN, GW_IN, unreach(), &tcp_ip(GW_IN, 5555, SRV_IN, 80));
    let want = icmp_err(N, X, unreach(), &tcp_ip(X, 5555, N, 8080));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);

    let mut gw = Gw::new(vec![vip_rule(
        1,
        vec![backend(9, 1)],
        Selection::ConsistentHash,
    )]);
    let c = gw.first(&tcp(X, 5555, N, 443), &in_meta());
    let b = [10, 0, 1, 9];
    let err = icmp_err(b, X, unreach(), &tcp_ip(X, 5555, b, 8443));
    let want = icmp_err(N, X, unreach(), &tcp_ip(X, 5555, N, 443));
    assert_frame(&nat(&err, &c, Dir::Reply), &want);
}

#[test]
fn icmp_error_with_bad_checksum_or_redirect_is_refused() {
    let mut gw = Gw::new(vec![snat_rule(1, None)]);
    let c = gw.first(&udp(C, 53000, S, 53), &out_meta());
    let mut err = icmp_err(S, N, unreach(), &udp_ip(N, 53000, S, 53));
    let p = parse(&err, ParseOptions::VERIFY_NONE).expect("parses");
    err[14 + 20 + 2] ^= 0x55;
    let r = rewrite::rewrite(&mut err, &p, &c.tuples, c.status, Dir::Reply);
    assert_eq!(r, Err(RewriteError::BadIcmpChecksum));
    let redirect = Icmpv4Type::Redirect(etherparse::icmpv4::RedirectHeader {
        code: etherparse::icmpv4::RedirectCode::RedirectForNetwork,
        gateway_internet_address: R,
    });
    let mut err = icmp_err(S, N, redirect, &udp_ip(N, 53000, S, 53));
    let p = parse(&err, ParseOptions::VERIFY_ALL).expect("parses");
    let r = rewrite::rewrite(&mut err, &p, &c.tuples, c.status, Dir::Reply);
    assert_eq!(r, Err(RewriteError::RedirectWithNat));
}

// ---------------------------------------------------------------- routing

#[test]
fn route_rewrite_decrements_ttl_and_sets_macs() {
    let f = tcp(C, 40000, S, 80);
    let mut g = f.clone();
    let p = parse(&g, ParseOptions::VERIFY_ALL).expect("parses");
    rewrite::route_rewrite(&mut g, &p, [2, 0, 0, 0, 0, 0xaa], [2, 0, 0, 0, 0, 0xbb]).expect("ttl");
    let mut want = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xaa], [2, 0, 0, 0, 0, 0xbb])
        .ipv4(C, S, 63)
        .tcp(40000, 80, 0x1234_5678, 4096)
        .syn()
        .write(&mut want, b"hello tcp")
        .expect("write");
    assert_frame(&g, &want);
}

#[test]
fn ttl_expiry_produces_time_exceeded() {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(C, S, 1)
        .udp(53000, 53)
        .write(&mut f, b"payload that is longer than eight bytes")
        .expect("write");
    let p = parse(&f, ParseOptions::VERIFY_ALL).expect("parses");
    let mut g = f.clone();
    assert_eq!(
        rewrite::route_rewrite(&mut g, &p, MAC_G, MAC_C),
        Err(TtlExpired { ttl: 1 })
    );
    assert_eq!(g, f, "frame untouched");
    let mut out = [0u8; 128];
    let n = rewrite::icmp_time_exceeded(&f, &p, GW_IN.into(), &mut out);
    // Expected: from GW_IN to C, TOS 0xC0, TTL 64, quoting IP header + 8 bytes.
    let quoted = &f[14..14 + 28];
    let mut hdr = Ipv4Header::new(
        u16::try_from(8 + quoted.len()).expect("small"),
        64,
        IpNumber::ICMP,
        GW_IN,
        C,
    )
    .expect("header");
    hdr.dont_fragment = false;
    hdr.dscp = IpDscp::try_new(0xC0 >> 2).expect("dscp");
    let mut want = Vec::new();
    PacketBuilder::ethernet2(MAC_G, MAC_C)
        .ip(IpHeaders::Ipv4(hdr, Default::default()))
        .icmpv4(Icmpv4Type::TimeExceeded(
            TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut want, quoted)
        .expect("write");
    assert_frame(&out[..n], &want);
    // No error about an ICMP error.
    let e = icmp_err(S, C, unreach(), &udp_ip(C, 1, S, 2));
    let pe = parse(&e, ParseOptions::VERIFY_ALL).expect("parses");
    assert_eq!(
        rewrite::icmp_time_exceeded(&e, &pe, GW_IN.into(), &mut out),
        0
    );
}

// ---------------------------------------------------------------- null binding, v6

#[test]
fn null_binding_remaps_a_clashing_untranslated_connection() {
    let mut gw = Gw::new(vec![snat_rule(1, None)]);
    let a = gw.first(&tcp(C, 40000, S, 80), &out_meta());
    assert_eq!(a.tuples[1], t4(S, 80, N, 40000, proto::TCP));
    // The gateway itself opens N:40000 -> S:80: its plain reply would clash.
    let meta = PacketMeta {
        in_port: 0,
        ..out_meta()
    };
    let b = gw
        .connect(t4(N, 40000, S, 80, proto::TCP), &meta)
        .expect("remapped");
    assert!(b.status.contains(Status::SRC_NAT));
    assert_ne!(b.tuples[1].dst_l4, 40000);
    assert_eq!(gw.nat.stats().null_binding_remaps, 1);
}

#[test]
fn ipv6_is_tracked_without_nat() {
    let mut nat = NatEngine::new(1);
    nat.rules_mut().add(masq_rule(1)).expect("valid");
    let t = Tuple::v6(
        [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        1,
        [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        2,
        proto::TCP,
    );
    let d = nat.decide(&t, &out_meta(), &mut |_| true).expect("ok");
    assert_eq!(d.reply, t.invert().expect("tcp"));
    assert!(!d.translates());
}

// ---------------------------------------------------------------- endpoint independence

#[test]
fn by_source_gives_endpoint_independent_mapping() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(40000, 40009))),
        proto::UDP,
    )]);
    // C2 takes N:40005 towards S, so C's 40005 towards S is remapped.
    let _ = gw.first(&udp(C2, 40005, S, 53), &out_meta());
    let a = gw.first(&udp(C, 40005, S, 53), &out_meta());
    let p = a.tuples[1].dst_l4;
    assert_ne!(p, 40005);
    // The same source to another destination reuses the mapping although 40005 is free
    // there.
    let b = gw.first(&udp(C, 40005, X, 53), &out_meta());
    assert_eq!(b.tuples[1].dst_l4, p);
    assert_eq!(gw.nat.stats().by_source_reused, 1);
    assert_eq!(gw.nat.by_source().refs(&a.tuples[0], Addr::v4(N), p), 2);
    gw.close(&a);
    gw.close(&b);
    assert_eq!(gw.nat.by_source().refs(&a.tuples[0], Addr::v4(N), p), 0);
}

// ---------------------------------------------------------------- exhaustion

#[test]
fn exhaustion_drops_counts_and_recovers() {
    let mut gw = Gw::new(vec![with_proto(
        snat_rule(1, Some(PortRange::new(50000, 50003))),
        proto::UDP,
    )]);
    let mut conns = Vec::new();
    for i in 0..4u8 {
        conns.push(gw.first(&udp([10, 0, 1, i], 1000, S, 53), &out_meta()));
    }
    let e = gw.connect(tuple_of(&udp([10, 0, 1, 9], 1000, S, 53)), &out_meta());
    let Err(NatError::Exhausted { rule, source }) = e else {
        panic!("expected exhaustion, got {e:?}");
    };
    assert_eq!(rule, Some(1));
    assert_eq!(source.manip, Manip::Src);
    assert_eq!(gw.nat.rules().stats(1).map(|s| s.exhausted), Some(1));
    assert_eq!(gw.nat.stats().exhausted, 1);
    // Another destination still works: uniqueness is per destination.
    gw.first(&udp([10, 0, 1, 9], 1000, X, 53), &out_meta());
    // After a release the flow gets through.
    let c = conns.remove(2);
    gw.close(&c);
    let ok = gw.first(&udp([10, 0, 1, 9], 1000, S, 53), &out_meta());
    assert_eq!(ok.tuples[1].dst_l4, c.tuples[1].dst_l4);
}

// ---------------------------------------------------------------- validation

fn add(rules: Vec<NatRule>) -> Result<(), RuleError> {
    let mut set = NatRuleSet::new();
    for r in rules {
        set.add(r)?;
    }
    Ok(())
}

#[test]
fn bad_rules_are_rejected_with_a_named_problem() {
    let dup = add(vec![snat_rule(1, None), dnat_rule(1)]);
    assert_eq!(dup, Err(RuleError::DuplicateId { id: 1 }));

    let reversed = add(vec![snat_rule(1, Some(PortRange::new(2000, 1000)))]).expect_err("rejected");
    assert_eq!(
        reversed.to_string(),
        "rule 1: action.ports range is reversed (2000 > 1000)"
    );

    let mut r = snat_rule(1, None);
    r.action = NatAction::Snat {
        addrs: AddrRange::v4([192, 0, 2, 9], [192, 0, 2, 1]),
        ports: None,
        flags: NatFlags::default(),
    };
    let e = add(vec![r]).expect_err("rejected");
    assert_eq!(
        e.to_string(),
        "rule 1: action.addrs range is reversed (192.0.2.9 > 192.0.2.1)"
    );

    let mut r = snat_rule(1, Some(PortRange::single(0)));
    r.r#match.proto = Some(proto::UDP);
    assert!(matches!(
        add(vec![r]),
        Err(RuleError::EmptyRange {
            field: "action.ports",
            ..
        })
    ));

    // Ports without a port protocol.
    let e = add(vec![snat_rule(1, Some(PortRange::new(1, 2)))]).expect_err("rejected");
    assert!(
        matches!(
            e,
            RuleError::PortsNeedProtocol {
                field: "action.ports",
                ..
            }
        ),
        "{e}"
    );

    // IPv6 anywhere: refused, by name.
    let mut r = dnat_rule(1);
    r.r#match.dst = Some(Prefix {
        family: Family::V6,
        addr: Addr::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        len: 32,
    });
    assert_eq!(
        add(vec![r]),
        Err(RuleError::Ipv6Unsupported {
            rule: 1,
            field: "match.dst"
        })
    );
    let mut r = snat_rule(1, None);
    r.action = NatAction::Snat {
        addrs: AddrRange {
            family: Family::V6,
            min: Addr::v6([1; 16]),
            max: Addr::v6([1; 16]),
        },
        ports: None,
        flags: NatFlags::default(),
    };
    assert!(matches!(
        add(vec![r]),
        Err(RuleError::Ipv6Unsupported { .. })
    ));

    // Overlapping pools.
    let mut a = snat_rule(1, None);
    a.r#match.proto = Some(proto::TCP);
    a.action = NatAction::Snat {
        addrs: AddrRange::v4([192, 0, 2, 1], [192, 0, 2, 10]),
        ports: Some(PortRange::new(1024, 2047)),
        flags: NatFlags::default(),
    };
    let mut b = a.clone();
    b.id = 2;
    b.action = NatAction::Snat {
        addrs: AddrRange::v4([192, 0, 2, 10], [192, 0, 2, 20]),
        ports: Some(PortRange::new(2000, 3000)),
        flags: NatFlags::default(),
    };
    assert_eq!(
        add(vec![a.clone(), b.clone()]),
        Err(RuleError::OverlappingPool { rule: 2, other: 1 })
    );
    // Same addresses, disjoint ports: fine.
    b.action = NatAction::Snat {
        addrs: AddrRange::v4([192, 0, 2, 10], [192, 0, 2, 20]),
        ports: Some(PortRange::new(2048, 3000)),
        flags: NatFlags::default(),
    };
    assert_eq!(add(vec![a, b]), Ok(()));

    // VIP problems.
    assert_eq!(
        add(vec![vip_rule(4, vec![], Selection::ConsistentHash)]),
        Err(RuleError::NoBackends { rule: 4 })
    );
    assert_eq!(
        add(vec![vip_rule(
            4,
            vec![backend(1, 1), backend(2, 0)],
            Selection::ConsistentHash
        )]),
        Err(RuleError::ZeroWeight { rule: 4, index: 1 })
    );
    assert_eq!(
        add(vec![vip_rule(
            4,
            vec![backend(1, 1), backend(1, 2)],
            Selection::ConsistentHash
        )]),
        Err(RuleError::DuplicateBackend {
            rule: 4,
            index: 1,
            first: 0
        })
    );
    let mut r = dnat_rule(5);
    r.r#match.out_port = Some(3);
    assert_eq!(add(vec![r]), Err(RuleError::OutPortOnDstRule { rule: 5 }));
}

#[test]
fn lookup_respects_order_and_every_match_field() {
    let mut set = NatRuleSet::new();
    let mut narrow = snat_rule(1, None);
    narrow.r#match = RuleMatch {
        in_port: Some(1),
        out_port: Some(2),
        src: Some(prefix(C, 32)),
        dst: Some(prefix(S, 24)),
        proto: Some(proto::TCP),
        dport: Some(PortRange::new(80, 90)),
        zone: Some(0),
    };
    let mut broad = masq_rule(2);
    broad.r#match.out_port = None;
    set.add(narrow).expect("valid");
    set.add(broad).expect("valid");
    let meta = out_meta();
    let t = t4(C, 1, S, 80, proto::TCP);
    assert_eq!(set.lookup(Hook::Src, &t, &meta).map(|r| r.id), Some(1));
    assert_eq!(set.lookup(Hook::Dst, &t, &meta).map(|r| r.id), None);
    let misses = [
        t4(C2, 1, S, 80, proto::TCP),
        t4(C, 1, X, 80, proto::TCP),
        t4(C, 1, S, 91, proto::TCP),
        t4(C, 1, S, 80, proto::UDP),
        Tuple { zone: 3, ..t },
    ];
    for m in misses {
        assert_eq!(
            set.lookup(Hook::Src, &m, &meta).map(|r| r.id),
            Some(2),
            "{m}"
        );
    }
    let other_port = PacketMeta {
        out_port: Some(9),
        ..meta
    };
    assert_eq!(
        set.lookup(Hook::Src, &t, &other_port).map(|r| r.id),
        Some(2)
    );
    let other_in = PacketMeta { in_port: 9, ..meta };
    assert_eq!(set.lookup(Hook::Src, &t, &other_in).map(|r| r.id), Some(2));
    assert!(set.remove(2).is_some());
    assert_eq!(set.lookup(Hook::Src, &t4(C2, 1, S, 80, 6), &meta), None);
}

// ---------------------------------------------------------------- property tests

#[derive(Debug, Clone)]
enum Op {
    New { host: u8, sport: u16, dst: u8 },
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..24, prop_oneof![Just(61000u16), 60990u16..61020], 0u8..3)
            .prop_map(|(host, sport, dst)| Op::New { host, sport, dst }),
        1 => any::<prop::sample::Index>().prop_map(|i| Op::Close(i.index(1 << 16))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Many inside hosts, one address with 16 ports, three destinations: every reply
    /// tuple is unique, a free original port is kept, exhaustion happens exactly when
    /// all 16 ports towards a destination are used (and is counted), and releases make
    /// room again.
    #[test]
    fn allocation_unique_preserving_and_exhaustion(ops in proptest::collection::vec(op(), 1..300),
                                                   random_fully in any::<bool>()) {
        let range = PortRange::new(61000, 61015);
        let mut rule = snat_rule(1, Some(range));
        rule.r#match.proto = Some(proto::UDP);
        rule.action = NatAction::Snat {
            addrs: AddrRange::single_v4(N),
            ports: Some(range),
            flags: NatFlags { random_fully, persistent: false },
        };
        let mut gw = Gw::new(vec![rule]);
        let mut live: Vec<Conn> = Vec::new();
        let mut exhausted = 0;
        for op in ops {
            match op {
                Op::New { host, sport, dst } => {
                    let orig = t4([10, 0, 2, host], sport, [203, 0, 113, dst], 53, proto::UDP);
                    if gw.table.contains(&orig) {
                        continue; // conntrack would find the existing connection
                    }
                    let used = live.iter().filter(|c| c.tuples[1].src == orig.dst).count();
                    let pristine = gw.table.iter().all(|t| t.src != orig.src || t.src_l4 != sport);
                    let free_orig = !gw.table.contains(&t4([203, 0, 113, dst], 53, N, sport, proto::UDP));
                    match gw.connect(orig, &out_meta()) {
                        Ok(c) => {
                            prop_assert!(used < 16);
                            let p = c.tuples[1].dst_l4;
                            prop_assert!(range.contains(p));
                            prop_assert_eq!(c.tuples[1].dst, Addr::v4(N));
                            if !random_fully && pristine && free_orig && range.contains(sport) {
                                prop_assert_eq!(p, sport, "free original port kept");
                            }
                            live.push(c);
                        }
                        Err(NatError::Exhausted { rule, .. }) => {
                            prop_assert_eq!(used, 16, "exhausted only when full");
                            prop_assert_eq!(rule, Some(1));
                            exhausted += 1;
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Close(i) => {
                    if !live.is_empty() {
                        let c = live.swap_remove(i % live.len());
                        gw.close(&c);
                    }
                }
            }
            let replies: HashSet<Tuple> = live.iter().map(|c| c.tuples[1]).collect();
            prop_assert_eq!(replies.len(), live.len(), "reply tuples unique");
        }
        prop_assert_eq!(gw.nat.stats().exhausted, exhausted);
        prop_assert_eq!(gw.nat.rules().stats(1).map(|s| s.exhausted), Some(exhausted));
        for c in live.clone() {
            gw.close(&c);
        }
        prop_assert!(gw.nat.by_source().is_empty(), "all by-source references released");
    }

    /// Every rewritten SNAT packet verifies and matches etherparse's frame.
    #[test]
    fn snat_rewrite_matches_etherparse(sport in 1u16.., dport in 1u16.., to in 1024u16..,
                                       tcp_not_udp in any::<bool>()) {
        let mut gw = Gw::new(vec![with_proto(snat_rule(1, Some(PortRange::new(to, to))), if tcp_not_udp { proto::TCP } else { proto::UDP })]);
        let build = if tcp_not_udp { tcp } else { udp };
        let f = build(C, sport, S, dport);
        let c = gw.first(&f, &out_meta());
        prop_assert_eq!(nat(&f, &c, Dir::Original), build(N, to, S, dport));
        prop_assert_eq!(nat(&build(S, dport, N, to), &c, Dir::Reply), build(S, dport, C, sport));
    }
}

proptest! {
    /// `NatRule::matches_v4_src` on the packed tuple answers as `matches` at
    /// POSTROUTING on the tuple, for every match field set or not (values from small
    /// sets, so that they often agree), source or destination rules, and prefixes no
    /// IPv4 address lies in (another family, bits set past 32, a length past 32).
    #[test]
    fn packed_rule_match_is_the_tuple_match(
        fields in (
            prop::option::of(0u32..2), prop::option::of(1u32..3),
            prop::option::of((0u8..3, prop_oneof![Just(0u8), Just(8), Just(31), Just(32), Just(40)])),
            prop::option::of((0u8..3, prop_oneof![Just(0u8), Just(24), Just(32)])),
            prop::option::of(prop_oneof![Just(proto::TCP), Just(proto::UDP), Just(proto::ICMP)]),
            prop::option::of((50u16..55, 0u16..4)),
            prop::option::of(0u16..2),
        ),
        t in (0u8..3, 50u16..56, 0u8..3, 50u16..56, 0usize..3, 0u16..2),
        meta in (0u32..2, prop::option::of(1u32..3)),
        dst_rule: bool,
        odd_prefix in 0u8..4,
    ) {
        let (in_port, out_port, src, dst, proto_m, dport, zone) = fields;
        let addr = |i: u8| [10, 0, i >> 1, i];
        let mut rule = if dst_rule { dnat_rule(1) } else { masq_rule(1) };
        rule.r#match = RuleMatch {
            in_port,
            out_port,
            src: src.map(|(a, len)| prefix(addr(a), len)),
            dst: dst.map(|(a, len)| prefix(addr(a), len)),
            proto: proto_m,
            dport: dport.map(|(min, n)| PortRange::new(min, min + n)),
            zone,
        };
        // A source prefix of another family, or with bits past the first 32.
        if let Some(p) = &mut rule.r#match.src {
            match odd_prefix {
                0 => p.family = Family::V6,
                1 => p.addr.0[4] = 1,
                _ => {}
            }
        }
        let (s, sp, d, dp, p, z) = t;
        let tuple = Tuple {
            zone: z,
            ..t4(addr(s), sp, addr(d), dp, [proto::TCP, proto::UDP, proto::ICMP][p])
        };
        let meta = PacketMeta {
            in_port: meta.0,
            out_port: meta.1,
            out_addr: None,
        };
        let packed = tuple.pack_v4().expect("an IPv4 tuple packs");
        prop_assert_eq!(
            rule.matches_v4_src(packed, &meta),
            rule.matches(Hook::Src, &tuple, &meta)
        );
    }
}

/// The packed match of prefixes no plain IPv4 address lies in (another family, a bit
/// set past the first 32 within the length), and of lengths past 32 whose extra bits
/// are zero (which match as `/32`), as the tuple match.
#[test]
fn packed_rule_match_of_odd_prefixes() {
    let t = t4(C, 1000, S, 80, proto::UDP);
    let packed = t.pack_v4().expect("IPv4");
    let meta = out_meta();
    let mut cases = Vec::new();
    for len in [32, 40, 128] {
        let mut p = prefix(C, len);
        cases.push((p, true));
        // A bit past the first 32: outside a `/32`, inside the longer ones.
        p.addr.0[4] = 1;
        cases.push((p, len == 32));
        let mut p = prefix(C, len);
        p.family = Family::V6;
        cases.push((p, false));
    }
    for (p, want) in cases {
        let mut rule = masq_rule(1);
        rule.r#match.src = Some(p);
        assert_eq!(rule.matches(Hook::Src, &t, &meta), want, "{p:?}");
        assert_eq!(rule.matches_v4_src(packed, &meta), want, "{p:?}");
    }
}
