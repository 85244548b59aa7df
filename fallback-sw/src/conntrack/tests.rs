//! Pipeline tests: frames built with etherparse (an independent implementation) go
//! through [`Conntrack::process`]; states, flags, timeouts and counters are checked
//! against the Linux rules of `conntrack-semantics.md`.

use super::*;
use crate::tcp::TcpState;
use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4::DestUnreachableHeader};

const C: [u8; 4] = [10, 0, 0, 2];
const S: [u8; 4] = [192, 0, 2, 10];
const CMAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SMAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn sec(s: u64) -> u64 {
    s * NS
}

struct Tcp {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

impl Tcp {
    fn frame(&self, seq: u32, ack: Option<u32>, flags: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(CMAC, SMAC)
            .ipv4(self.src, self.dst, 64)
            .tcp(self.sport, self.dport, seq, 64240);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('F') {
            b = b.fin();
        }
        if flags.contains('R') {
            b = b.rst();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut v = Vec::new();
        b.write(&mut v, payload).expect("build tcp");
        v
    }

    fn reverse(&self) -> Tcp {
        Tcp {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CMAC, SMAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .expect("build udp");
    v
}

fn ct() -> Conntrack {
    Conntrack::new(Config {
        max_connections: 1024,
        ..Config::default()
    })
}

fn tracked(v: Verdict) -> (Slot, Dir, CtInfo, bool) {
    match v {
        Verdict::Tracked {
            slot,
            dir,
            info,
            created,
        } => (slot, dir, info, created),
        other => panic!("expected a tracked packet, got {other:?}"),
    }
}

fn tcp_state(ct: &Conntrack, slot: Slot) -> TcpState {
    match ct.table().get(slot).map(|c| c.proto) {
        Some(L4State::Tcp(t)) => t.state(),
        other => panic!("not a TCP connection: {other:?}"),
    }
}

fn remaining_s(ct: &Conntrack, slot: Slot, now: u64) -> u64 {
    ct.table().get(slot).expect("live").remaining(now) / NS
}

/// Client 10.0.0.2:40000 -> 192.0.2.10:80, ISNs near the wrap point.
fn handshake(ct: &mut Conntrack, now: u64) -> (Slot, Tcp, u32, u32) {
    let c = Tcp {
        src: C,
        dst: S,
        sport: 40000,
        dport: 80,
    };
    let s = c.reverse();
    let (ci, si) = (0xFFFF_FFF0u32, 0x7000_0000u32);
    let (slot, dir, info, created) = tracked(ct.process(&c.frame(ci, None, "S", &[]), 0, now));
    assert!(created);
    assert_eq!((dir, info), (Dir::Original, CtInfo::New));
    assert_eq!(tcp_state(ct, slot), TcpState::SynSent);
    assert_eq!(remaining_s(ct, slot, now), 120);
    let (_, dir, info, _) =
        tracked(ct.process(&s.frame(si, Some(ci.wrapping_add(1)), "S", &[]), 0, now));
    assert_eq!((dir, info), (Dir::Reply, CtInfo::EstablishedReply));
    assert_eq!(tcp_state(ct, slot), TcpState::SynRecv);
    assert_eq!(remaining_s(ct, slot, now), 60);
    let conn = ct.table().get(slot).expect("live");
    assert!(conn.status.contains(Status::SEEN_REPLY));
    assert!(!conn.status.contains(Status::ASSURED));
    let (_, _, info, _) = tracked(ct.process(
        &c.frame(ci.wrapping_add(1), Some(si.wrapping_add(1)), "", &[]),
        0,
        now,
    ));
    assert_eq!(info, CtInfo::Established);
    assert_eq!(tcp_state(ct, slot), TcpState::Established);
    assert!(
        ct.table()
            .get(slot)
            .expect("live")
            .status
            .contains(Status::ASSURED)
    );
    assert_eq!(remaining_s(ct, slot, now), 432_000);
    (slot, c, ci.wrapping_add(1), si.wrapping_add(1))
}

#[test]
fn tcp_handshake_data_and_fin_teardown() {
    let mut ct = ct();
    let (slot, c, cseq, sseq) = handshake(&mut ct, sec(1));
    let s = c.reverse();
    // 100 bytes of data each way.
    tracked(ct.process(&c.frame(cseq, Some(sseq), "", &[7; 100]), 0, sec(2)));
    tracked(ct.process(
        &s.frame(sseq, Some(cseq.wrapping_add(100)), "", &[8; 100]),
        0,
        sec(2),
    ));
    // The server's data is not acknowledged yet: DATA_UNACK caps the timeout at 300 s.
    assert_eq!(remaining_s(&ct, slot, sec(2)), 300);
    tracked(ct.process(
        &c.frame(
            cseq.wrapping_add(100),
            Some(sseq.wrapping_add(100)),
            "",
            &[],
        ),
        0,
        sec(2),
    ));
    assert_eq!(remaining_s(&ct, slot, sec(2)), 432_000);
    // Client closes, server closes, client acks.
    tracked(ct.process(
        &c.frame(
            cseq.wrapping_add(100),
            Some(sseq.wrapping_add(100)),
            "F",
            &[],
        ),
        0,
        sec(3),
    ));
    assert_eq!(tcp_state(&ct, slot), TcpState::FinWait);
    tracked(ct.process(
        &s.frame(
            sseq.wrapping_add(100),
            Some(cseq.wrapping_add(101)),
            "F",
            &[],
        ),
        0,
        sec(3),
    ));
    assert_eq!(tcp_state(&ct, slot), TcpState::LastAck);
    tracked(ct.process(
        &c.frame(
            cseq.wrapping_add(101),
            Some(sseq.wrapping_add(101)),
            "",
            &[],
        ),
        0,
        sec(3),
    ));
    assert_eq!(tcp_state(&ct, slot), TcpState::TimeWait);
    assert_eq!(remaining_s(&ct, slot, sec(3)), 120);
    let conn = ct.table().get(slot).expect("live");
    // Counters: original SYN, ACK, data, ACK, FIN, ACK; reply SYN/ACK, data, FIN.
    // Bytes are IP lengths.
    assert_eq!(conn.counters[0].packets, 6);
    assert_eq!(conn.counters[1].packets, 3);
    assert_eq!(conn.counters[1].bytes, 40 + 140 + 40);
    // TIME_WAIT expires after 120 s.
    assert_eq!(ct.gc(sec(124), 100), 1);
    assert!(ct.table().is_empty());
}

#[test]
fn tcp_rst_closes_and_out_of_window_is_invalid() {
    let mut ct = ct();
    let (slot, c, cseq, sseq) = handshake(&mut ct, sec(1));
    // Data far beyond the receiver's window.
    let v = ct.process(
        &c.frame(cseq.wrapping_add(0x4000_0000), Some(sseq), "", &[1; 10]),
        0,
        sec(2),
    );
    assert!(matches!(v, Verdict::Invalid(Invalid::Tcp(_))), "{v:?}");
    assert_eq!(ct.stats().invalid[InvalidKind::Tcp.index()], 1);
    // An in-window RST closes the connection with a 10 s timeout.
    tracked(ct.process(&c.frame(cseq, Some(sseq), "R", &[]), 0, sec(3)));
    assert_eq!(tcp_state(&ct, slot), TcpState::Close);
    assert_eq!(remaining_s(&ct, slot, sec(3)), 10);
}

#[test]
fn tcp_rst_answering_syn_deletes_entry_at_once() {
    let mut ct = ct();
    let c = Tcp {
        src: C,
        dst: S,
        sport: 40001,
        dport: 81,
    };
    tracked(ct.process(&c.frame(1000, None, "S", &[]), 0, sec(1)));
    // Closed port: RST+ACK acking the SYN. No reply was seen before: delete now.
    let v = ct.process(&c.reverse().frame(0, Some(1001), "R", &[]), 0, sec(1));
    tracked(v);
    assert!(ct.table().is_empty());
}

#[test]
fn tcp_bad_flags_and_stray_synack_are_invalid() {
    let mut ct = ct();
    let c = Tcp {
        src: C,
        dst: S,
        sport: 40002,
        dport: 80,
    };
    let v = ct.process(&c.frame(5, None, "SF", &[]), 0, sec(1));
    assert!(
        matches!(v, Verdict::Invalid(Invalid::Tcp(_))),
        "SYN+FIN: {v:?}"
    );
    let v = ct.process(&c.frame(5, Some(9), "S", &[]), 0, sec(1));
    assert!(
        matches!(v, Verdict::Invalid(Invalid::Tcp(_))),
        "SYN/ACK first: {v:?}"
    );
    assert!(ct.table().is_empty());
}

#[test]
fn tcp_midstream_pickup_is_loose_by_default() {
    let mut ct = ct();
    let c = Tcp {
        src: C,
        dst: S,
        sport: 40003,
        dport: 22,
    };
    let (slot, _, _, created) = tracked(ct.process(&c.frame(5000, Some(9000), "", &[1; 20]), 0, 0));
    assert!(created);
    assert_eq!(tcp_state(&ct, slot), TcpState::Established);
    // Without a reply the pickup timeout is capped at UNACK (300 s).
    assert!(remaining_s(&ct, slot, 0) <= 300);

    let mut strict = Conntrack::new(Config {
        tcp: TcpConfig {
            loose: false,
            ..TcpConfig::default()
        },
        ..Config::default()
    });
    let v = strict.process(&c.frame(5000, Some(9000), "", &[1; 20]), 0, 0);
    assert!(matches!(v, Verdict::Invalid(Invalid::Tcp(_))));
}

#[test]
fn tcp_syn_after_time_wait_reopens() {
    let mut ct = ct();
    let (slot, c, cseq, sseq) = handshake(&mut ct, sec(1));
    let s = c.reverse();
    tracked(ct.process(&c.frame(cseq, Some(sseq), "F", &[]), 0, sec(2)));
    tracked(ct.process(
        &s.frame(sseq, Some(cseq.wrapping_add(1)), "F", &[]),
        0,
        sec(2),
    ));
    tracked(ct.process(
        &c.frame(cseq.wrapping_add(1), Some(sseq.wrapping_add(1)), "", &[]),
        0,
        sec(2),
    ));
    assert_eq!(tcp_state(&ct, slot), TcpState::TimeWait);
    let old_id = ct.table().get(slot).expect("live").id;
    let (slot2, dir, info, created) = tracked(ct.process(
        &c.frame(cseq.wrapping_add(100_000), None, "S", &[]),
        0,
        sec(5),
    ));
    assert!(created, "a fresh connection replaces the TIME_WAIT one");
    assert_eq!((dir, info), (Dir::Original, CtInfo::New));
    let conn = ct.table().get(slot2).expect("live");
    assert_ne!(conn.id, old_id);
    assert_eq!(tcp_state(&ct, slot2), TcpState::SynSent);
    assert_eq!(ct.table().len(), 1);
}

#[test]
fn udp_unreplied_replied_and_assured_after_two_seconds() {
    let mut ct = ct();
    let q = udp(C, 5353, S, 53, b"query");
    let r = udp(S, 53, C, 5353, b"answer");
    let (slot, _, info, created) = tracked(ct.process(&q, 0, sec(10)));
    assert!(created);
    assert_eq!(info, CtInfo::New);
    assert_eq!(remaining_s(&ct, slot, sec(10)), 30);
    // First reply: SEEN_REPLY is still clear for the handler: 30 s, not assured.
    let (_, dir, _, _) = tracked(ct.process(&r, 0, sec(11)));
    assert_eq!(dir, Dir::Reply);
    let conn = ct.table().get(slot).expect("live");
    assert!(conn.status.contains(Status::SEEN_REPLY));
    assert!(!conn.status.contains(Status::ASSURED));
    assert_eq!(remaining_s(&ct, slot, sec(11)), 30);
    // Within 2 s of creation: still 30 s.
    tracked(ct.process(&q, 0, sec(12)));
    assert!(
        !ct.table()
            .get(slot)
            .expect("live")
            .status
            .contains(Status::ASSURED)
    );
    // After 2 s with a reply seen: stream timeout and ASSURED.
    let (_, _, info, _) = tracked(ct.process(&q, 0, sec(13)));
    assert_eq!(info, CtInfo::Established);
    assert!(
        ct.table()
            .get(slot)
            .expect("live")
            .status
            .contains(Status::ASSURED)
    );
    assert_eq!(remaining_s(&ct, slot, sec(13)), 120);
    let conn = ct.table().get(slot).expect("live");
    assert_eq!(conn.counters[0].packets, 3);
    assert_eq!(conn.counters[1].packets, 1);
    assert_eq!(conn.counters[0].bytes, 3 * (20 + 8 + 5));
}

#[test]
fn udp_unreplied_expires_after_30_seconds() {
    let mut ct = ct();
    tracked(ct.process(&udp(C, 1000, S, 2000, b"x"), 0, sec(0)));
    assert_eq!(ct.gc(sec(29), 100), 0);
    assert_eq!(ct.gc(sec(31), 100), 1);
}

fn icmp_echo(src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CMAC, SMAC).ipv4(src, dst, 64);
    let b = if reply {
        b.icmpv4_echo_reply(id, 1)
    } else {
        b.icmpv4_echo_request(id, 1)
    };
    let mut v = Vec::new();
    b.write(&mut v, b"ping").expect("build icmp");
    v
}

#[test]
fn icmp_echo_tracks_request_and_reply_and_rejects_stray_reply() {
    let mut ct = ct();
    let (slot, _, _, created) = tracked(ct.process(&icmp_echo(C, S, 77, false), 0, 0));
    assert!(created);
    let (s2, dir, _, _) = tracked(ct.process(&icmp_echo(S, C, 77, true), 0, 0));
    assert_eq!((s2, dir), (slot, Dir::Reply));
    let conn = ct.table().get(slot).expect("live");
    assert_eq!(conn.tuple(Dir::Original).icmp_type(), 8);
    assert_eq!(conn.tuple(Dir::Reply).icmp_type(), 0);
    assert!(
        !conn.status.contains(Status::ASSURED),
        "ICMP is never assured"
    );
    let v = ct.process(&icmp_echo(S, C, 99, true), 0, 0);
    assert_eq!(
        v,
        Verdict::Invalid(Invalid::IcmpNotRequest { icmp_type: 0 })
    );
}

fn port_unreachable(from: [u8; 4], to: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    // Quote the IP header and 8 bytes of the offending packet (skip its Ethernet header).
    let ip = &quoted[14..14 + 28];
    let mut v = Vec::new();
    PacketBuilder::ethernet2(SMAC, CMAC)
        .ipv4(from, to, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut v, ip)
        .expect("build icmp error");
    v
}

#[test]
fn icmp_error_is_related_to_the_quoted_connection() {
    let mut ct = ct();
    let q = udp(C, 5000, S, 9, b"hello");
    let (slot, _, _, _) = tracked(ct.process(&q, 0, sec(1)));
    let before = ct.table().get(slot).expect("live").clone();
    // The server answers "port unreachable" to the client, quoting the client's packet.
    let err = port_unreachable(S, C, &q);
    let (s2, dir, info, created) = tracked(ct.process(&err, 0, sec(2)));
    assert_eq!(
        (s2, dir, info, created),
        (slot, Dir::Reply, CtInfo::RelatedReply, false)
    );
    let after = ct.table().get(slot).expect("live");
    assert_eq!(after.timeout, before.timeout, "RELATED does not refresh");
    assert_eq!(
        after.status, before.status,
        "RELATED does not set SEEN_REPLY"
    );
    assert_eq!(after.counters, before.counters);
    assert_eq!(ct.stats().related, 1);

    // Spoofed: the error is sent to a third party.
    let spoofed = port_unreachable(S, [10, 0, 0, 99], &q);
    assert_eq!(
        ct.process(&spoofed, 0, sec(2)),
        Verdict::Invalid(Invalid::IcmpErrorSpoofed)
    );
    // Quoting an untracked packet.
    let other = udp(C, 5001, S, 9, b"x");
    assert_eq!(
        ct.process(&port_unreachable(S, C, &other), 0, sec(2)),
        Verdict::Invalid(Invalid::IcmpErrorNoMatch)
    );
}

#[test]
fn icmpv6_neighbour_discovery_is_untracked_and_echo_tracked() {
    let mut ct = ct();
    let a = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let mut ns = Vec::new();
    PacketBuilder::ethernet2(CMAC, SMAC)
        .ipv6(a, b, 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut ns, &[0; 16])
        .expect("build ns");
    assert_eq!(
        ct.process(&ns, 0, 0),
        Verdict::Untracked(Untracked::NeighbourDiscovery)
    );
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(CMAC, SMAC)
        .ipv6(a, b, 64)
        .icmpv6_echo_request(5, 1)
        .write(&mut echo, b"v6")
        .expect("build echo");
    let (_, _, _, created) = tracked(ct.process(&echo, 0, 0));
    assert!(created);
}

#[test]
fn malformed_and_non_ip_are_classified_and_counted() {
    let mut ct = ct();
    let mut q = udp(C, 1, S, 2, b"abc");
    q[14 + 10] ^= 0xFF; // break the IPv4 header checksum
    let v = ct.process(&q, 0, 0);
    assert!(
        matches!(v, Verdict::Invalid(Invalid::Malformed(_))),
        "{v:?}"
    );
    assert_eq!(ct.stats().malformed[DropReason::BadChecksumL3.index()], 1);
    let truncated = &udp(C, 1, S, 2, b"abc")[..20];
    assert!(matches!(
        ct.process(truncated, 0, 0),
        Verdict::Invalid(Invalid::Malformed(_))
    ));
    let mut arp = vec![0u8; 42];
    arp[12] = 0x08;
    arp[13] = 0x06;
    assert_eq!(
        ct.process(&arp, 0, 0),
        Verdict::Untracked(Untracked::NotIp { ethertype: 0x0806 })
    );
    assert!(ct.table().is_empty());
}

#[test]
fn zones_keep_identical_tuples_apart() {
    let mut ct = ct();
    let q = udp(C, 1000, S, 53, b"q");
    let (a, ..) = tracked(ct.process(&q, 1, 0));
    let (b, _, _, created) = tracked(ct.process(&q, 2, 0));
    assert!(created);
    assert_ne!(a, b);
    assert_eq!(ct.table().len(), 2);
}

#[test]
fn full_table_early_drops_unassured_and_refuses_when_all_assured() {
    let mut ct = Conntrack::new(Config {
        max_connections: 4,
        ..Config::default()
    });
    // Four assured UDP streams.
    for p in 0..4u16 {
        tracked(ct.process(&udp(C, 1000 + p, S, 53, b"q"), 0, 0));
        tracked(ct.process(&udp(S, 53, C, 1000 + p, b"r"), 0, sec(1)));
        tracked(ct.process(&udp(C, 1000 + p, S, 53, b"q"), 0, sec(3)));
    }
    let v = ct.process(&udp(C, 2000, S, 53, b"q"), 0, sec(4));
    assert_eq!(v, Verdict::Invalid(Invalid::TableFull));
    // An unassured entry can be evicted: let one stream expire and replace it with an
    // unreplied one, then a new flow takes its place.
    assert_eq!(ct.gc(sec(200), 100), 4);
    for p in 0..4u16 {
        tracked(ct.process(&udp(C, 3000 + p, S, 53, b"q"), 0, sec(200)));
    }
    let (_, _, _, created) = tracked(ct.process(&udp(C, 4000, S, 53, b"q"), 0, sec(201)));
    assert!(created);
    // Every unassured entry of the first index group that has any is evicted (Linux
    // drops the whole bucket), so at least one and at most all four went.
    let dropped = ct.table().stats().early_drop;
    assert!((1..=4).contains(&dropped), "early drops: {dropped}");
    assert_eq!(
        ct.table().len(),
        usize::try_from(4 - dropped + 1).expect("small")
    );
}

#[test]
fn set_timeouts_applies_at_the_next_packet_like_the_sysctls() {
    let mut ct = ct();
    let (slot, ..) = tracked(ct.process(&udp(C, 1000, S, 2000, b"x"), 0, sec(0)));
    assert_eq!(remaining_s(&ct, slot, sec(0)), 30);
    let other = OtherTimeouts {
        udp: 5,
        ..OtherTimeouts::default()
    };
    ct.set_timeouts(ct.config().tcp.timeouts, other);
    // The connection keeps its expiry until its next packet.
    assert_eq!(remaining_s(&ct, slot, sec(1)), 29);
    tracked(ct.process(&udp(C, 1000, S, 2000, b"x"), 0, sec(1)));
    assert_eq!(remaining_s(&ct, slot, sec(1)), 5);
    assert_eq!(ct.gc(sec(7), 100), 1);
}

#[test]
fn lowered_max_connections_refuses_new_connections() {
    let mut ct = ct();
    let (a, ..) = tracked(ct.process(&udp(C, 1000, S, 2000, b"x"), 0, sec(0)));
    // A reply, then a packet after the stream delay, make it ASSURED (not
    // early-droppable).
    tracked(ct.process(&udp(S, 2000, C, 1000, b"y"), 0, sec(1)));
    tracked(ct.process(&udp(C, 1000, S, 2000, b"x"), 0, sec(3)));
    assert!(
        ct.table()
            .get(a)
            .is_some_and(|c| c.status.contains(Status::ASSURED))
    );
    assert_eq!(ct.set_max_connections(1), 1);
    assert_eq!(
        ct.process(&udp(C, 1001, S, 2000, b"x"), 0, sec(4)),
        Verdict::Invalid(Invalid::TableFull)
    );
    assert_eq!(ct.table().len(), 1);
    ct.set_max_connections(1024);
    tracked(ct.process(&udp(C, 1001, S, 2000, b"x"), 0, sec(5)));
}

#[test]
fn protocol_state_in_the_entry_is_16_bytes() {
    // The TCP window tracking lives beside the table; what stays in the entry is the
    // TCP state or the UDP stream time (see `table::Entry`'s 64-byte layout).
    assert_eq!(size_of::<L4State>(), 16);
    assert_eq!(
        size_of::<Option<crate::table::Entry<L4State>>>(),
        64,
        "entry layout"
    );
}
