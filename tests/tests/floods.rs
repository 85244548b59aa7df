//! Floods through the software conntrack, deterministic and bounded to seconds.
//!
//! - SYN flood: SYNs from many spoofed sources into a table capped at `MAX` connections
//!   that already holds established (ASSURED) TCP connections. The established ones keep
//!   working (their packets are tracked, in ESTABLISHED, on their old entry), early drop
//!   evicts only unassured entries, the table never holds more than `MAX`, its memory
//!   is allocated once, and the counters say what was dropped.
//! - UDP flood: new UDP flows that exhaust a source-NAT port range. The connections
//!   translated before the flood keep working with their mapping, the exhaustion counter
//!   rises, and once the flood's entries expire new connections are translated again.
//!
//! Each test prints its figures (`cargo test -p ctoffload-tests --test floods --
//! --nocapture` shows them; `docs/reliability.md` records the last run).

use ctoffload_fallback_sw::conntrack::{
    Config, Conntrack, CtInfo, Invalid, InvalidKind, L4State, NatOutcome, Prefix, Verdict,
};
use ctoffload_fallback_sw::nat::rules::{
    AddrRange, NatAction, NatFlags, NatRule, PortRange, RuleMatch,
};
use ctoffload_fallback_sw::nat::{NatEngine, PacketMeta};
use ctoffload_fallback_sw::table::{Event, RemoveReason, Status};
use ctoffload_fallback_sw::tcp::TcpState;
use ctoffload_fallback_sw::tuple::{Addr, Family};
use etherparse::PacketBuilder;

const SEC: u64 = 1_000_000_000;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const SERVER: [u8; 4] = [203, 0, 113, 10];
const NAT_ADDR: [u8; 4] = [192, 0, 2, 1];

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

#[allow(clippy::too_many_arguments)]
fn tcp(
    src: [u8; 4],
    sp: u16,
    dst: [u8; 4],
    dp: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    if flags & PSH != 0 {
        b = b.psh();
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("build tcp frame");
    v
}

fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sp, dp);
    let mut v = Vec::with_capacity(b.size(4));
    b.write(&mut v, b"ping").expect("build udp frame");
    v
}

/// Deterministic "spoofed" sources: the `n`th is a distinct address of `net.x.0.0/16`
/// blocks (so no two flood packets share a tuple) with a high port from a linear
/// congruential generator (no RNG crate, the same sequence every run).
struct Spoofer(u64);

impl Spoofer {
    fn next(&mut self, net: u8, n: usize) -> ([u8; 4], u16) {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let b = (self.0 >> 24).to_be_bytes();
        let port = u16::from_be_bytes([b[4], b[5]]) | 0x8000;
        let n = u32::try_from(n).expect("small").to_be_bytes();
        ([net, 64 + n[1], n[2], n[3]], port)
    }
}

fn tracked(v: Verdict) -> (CtInfo, bool) {
    match v {
        Verdict::Tracked { info, created, .. } => (info, created),
        other => panic!("expected a tracked packet, got {other:?}"),
    }
}

/// One established client connection: 10.0.x.y:port <-> SERVER:443.
struct Client {
    addr: [u8; 4],
    port: u16,
    /// Next sequence numbers of client and server.
    seq: u32,
    srv_seq: u32,
}

fn tcp_state(ct: &Conntrack, frame: &[u8], now: u64) -> (Status, TcpState) {
    let _ = now;
    let p = ctoffload_fallback_sw::wire::parse(frame, ct.config().parse).expect("parse");
    let t = ctoffload_fallback_sw::tuple::Tuple {
        src: Addr::from_ip(p.src).0,
        dst: Addr::from_ip(p.dst).0,
        src_l4: p.l4.ports().map_or(0, |x| x.0),
        dst_l4: p.l4.ports().map_or(0, |x| x.1),
        proto: p.protocol,
        family: Family::V4,
        zone: 0,
    };
    let (slot, _) = ct
        .table()
        .iter(now)
        .find(|(_, c)| c.tuples[0] == t || c.tuples[1] == t)
        .expect("connection in the table");
    let c = ct.table().get(slot).expect("slot");
    let L4State::Tcp(tc) = c.proto else {
        panic!("not a TCP connection");
    };
    (c.status, tc.state())
}

/// `count` established, ASSURED connections 10.0.x.y:port <-> SERVER:443 (handshake
/// and final ACK), checked to be ESTABLISHED and ASSURED.
fn establish(ct: &mut Conntrack, count: usize, now: u64) -> Vec<Client> {
    let mut clients = Vec::new();
    for i in 0..count {
        let i = u16::try_from(i).expect("small");
        let [hi, lo] = i.to_be_bytes();
        let c = Client {
            addr: [10, 0, hi, lo],
            port: 40000 + i,
            seq: 1000,
            srv_seq: 5000,
        };
        let syn = tcp(c.addr, c.port, SERVER, 443, SYN, c.seq, 0, b"");
        let (_, created) = tracked(ct.process(&syn, 0, now));
        assert!(created);
        let syn_ack = tcp(
            SERVER,
            443,
            c.addr,
            c.port,
            SYN | ACK,
            c.srv_seq,
            c.seq + 1,
            b"",
        );
        tracked(ct.process(&syn_ack, 0, now));
        let ack = tcp(
            c.addr,
            c.port,
            SERVER,
            443,
            ACK,
            c.seq + 1,
            c.srv_seq + 1,
            b"",
        );
        tracked(ct.process(&ack, 0, now));
        let (status, state) = tcp_state(ct, &ack, now);
        assert!(
            status.contains(Status::ASSURED),
            "connection {i} not assured: {status:?}"
        );
        assert_eq!(state, TcpState::Established);
        clients.push(Client {
            seq: c.seq + 1,
            srv_seq: c.srv_seq + 1,
            ..c
        });
    }
    clients
}

#[test]
fn syn_flood_keeps_established_connections() {
    const MAX: usize = 512;
    const ESTABLISHED: usize = 64;
    const FLOOD: usize = 50_000;
    let cfg = Config {
        max_connections: MAX,
        event_capacity: 4096,
        ..Config::default()
    };
    let mut ct = Conntrack::new(cfg);
    let bytes_before = ct.table().capacity() * ct.table().bytes_per_connection();
    let mut now = SEC;

    let mut clients = establish(&mut ct, ESTABLISHED, now);
    ct.table_mut().drain_events().for_each(drop);

    // The flood: SYNs from spoofed sources, interleaved with traffic on the
    // established connections every 1000 SYNs.
    let mut spoof = Spoofer(0x5eed);
    let mut max_len = 0;
    let mut evicted_assured = 0u64;
    let mut evicted = 0u64;
    let mut syn_tracked = 0u64;
    let mut syn_dropped_full = 0u64;
    let mut kept_checks = 0u64;
    for n in 0..FLOOD {
        let (src, sp) = spoof.next(100, n);
        let v = ct.process(&tcp(src, sp, SERVER, 443, SYN, 1, 0, b""), 0, now);
        match v {
            Verdict::Tracked { created: true, .. } => syn_tracked += 1,
            Verdict::Invalid(Invalid::TableFull) => syn_dropped_full += 1,
            other => panic!("unexpected verdict for a flood SYN: {other:?}"),
        }
        max_len = max_len.max(ct.table().len());
        assert!(ct.table().len() <= MAX, "table over its maximum");
        for ev in ct.table_mut().drain_events() {
            if let Event::Destroy { reason, status, .. } = ev {
                assert_eq!(
                    reason,
                    RemoveReason::EarlyDrop,
                    "only early drop removes here"
                );
                evicted += 1;
                if status.contains(Status::ASSURED) {
                    evicted_assured += 1;
                }
            }
        }
        if n % 1000 == 999 {
            now += SEC / 100;
            for c in &mut clients {
                let data = tcp(
                    c.addr,
                    c.port,
                    SERVER,
                    443,
                    ACK | PSH,
                    c.seq,
                    c.srv_seq,
                    b"hello",
                );
                let (info, created) = tracked(ct.process(&data, 0, now));
                assert_eq!((info, created), (CtInfo::Established, false));
                c.seq += 5;
                let reply = tcp(
                    SERVER,
                    443,
                    c.addr,
                    c.port,
                    ACK | PSH,
                    c.srv_seq,
                    c.seq,
                    b"world",
                );
                let (info, created) = tracked(ct.process(&reply, 0, now));
                assert_eq!((info, created), (CtInfo::EstablishedReply, false));
                c.srv_seq += 5;
                let (status, state) = tcp_state(&ct, &reply, now);
                assert!(status.contains(Status::ASSURED));
                assert_eq!(state, TcpState::Established);
                kept_checks += 1;
            }
        }
    }

    let ts = ct.table().stats();
    let st = *ct.stats();
    let bytes_after = ct.table().capacity() * ct.table().bytes_per_connection();
    println!("SYN flood into a table of {MAX} with {ESTABLISHED} established connections");
    println!("  {:<40} {:>10}", "flood SYNs sent", FLOOD);
    println!(
        "  {:<40} {:>10}",
        "flood SYNs tracked (entry created)", syn_tracked
    );
    println!(
        "  {:<40} {:>10}",
        "flood SYNs dropped: table full", syn_dropped_full
    );
    println!(
        "  {:<40} {:>10}",
        "entries evicted by early drop", ts.early_drop
    );
    println!(
        "  {:<40} {:>10}",
        "assured entries evicted", evicted_assured
    );
    println!(
        "  {:<40} {:>10}",
        "established connections kept",
        clients.len()
    );
    println!(
        "  {:<40} {:>10}",
        "established round trips checked", kept_checks
    );
    println!("  {:<40} {:>10}", "largest table size seen", max_len);
    println!(
        "  {:<40} {:>10}",
        "insert_full (table counter)", ts.insert_full
    );
    println!(
        "  {:<40} {:>10}",
        "invalid: table full (ct counter)",
        st.invalid[InvalidKind::TableFull.index()]
    );
    println!(
        "  {:<40} {:>10}",
        "table memory, bytes (before = after)", bytes_after
    );

    assert_eq!(
        evicted_assured, 0,
        "early drop evicted an assured connection"
    );
    assert_eq!(evicted, ts.early_drop);
    assert_eq!(
        ts.early_drop,
        syn_tracked - u64::try_from(MAX - ESTABLISHED).expect("fits"),
        "every flood SYN past the free room evicted one unassured entry"
    );
    assert_eq!(
        syn_tracked + syn_dropped_full,
        u64::try_from(FLOOD).expect("fits")
    );
    assert_eq!(st.invalid[InvalidKind::TableFull.index()], syn_dropped_full);
    assert_eq!(ts.insert_full, syn_dropped_full);
    assert_eq!(max_len, MAX, "the flood filled the table");
    assert_eq!(bytes_before, bytes_after, "table memory is allocated once");
    assert_eq!(
        kept_checks,
        u64::try_from(ESTABLISHED * (FLOOD / 1000)).expect("fits")
    );
    assert_eq!(ct.table().len(), MAX);
}

#[test]
fn syn_flood_into_a_table_full_of_assured_connections_is_dropped() {
    const MAX: usize = 128;
    const FLOOD: usize = 5_000;
    let cfg = Config {
        max_connections: MAX,
        ..Config::default()
    };
    let mut ct = Conntrack::new(cfg);
    let now = SEC;
    let mut clients = establish(&mut ct, MAX, now);
    let mut spoof = Spoofer(0xf011);
    let mut dropped = 0u64;
    for n in 0..FLOOD {
        let (src, sp) = spoof.next(100, n);
        match ct.process(&tcp(src, sp, SERVER, 443, SYN, 1, 0, b""), 0, now) {
            Verdict::Invalid(Invalid::TableFull) => dropped += 1,
            other => panic!("a flood SYN got in: {other:?}"),
        }
    }
    for c in &mut clients {
        let data = tcp(
            c.addr,
            c.port,
            SERVER,
            443,
            ACK | PSH,
            c.seq,
            c.srv_seq,
            b"hello",
        );
        assert_eq!(
            tracked(ct.process(&data, 0, now)),
            (CtInfo::Established, false)
        );
    }
    let ts = ct.table().stats();
    let st = *ct.stats();
    println!("SYN flood into a table of {MAX} full of assured connections");
    println!("  {:<40} {:>10}", "flood SYNs sent", FLOOD);
    println!("  {:<40} {:>10}", "flood SYNs dropped: table full", dropped);
    println!(
        "  {:<40} {:>10}",
        "entries evicted by early drop", ts.early_drop
    );
    println!(
        "  {:<40} {:>10}",
        "established connections kept",
        clients.len()
    );
    assert_eq!(dropped, u64::try_from(FLOOD).expect("fits"));
    assert_eq!(ts.insert_full, dropped);
    assert_eq!(st.invalid[InvalidKind::TableFull.index()], dropped);
    assert_eq!(ts.early_drop, 0);
    assert_eq!(ct.table().len(), MAX);
}

fn snat(ports: PortRange) -> NatRule {
    NatRule {
        id: 1,
        r#match: RuleMatch {
            src: Some(Prefix {
                family: Family::V4,
                addr: Addr::v4([10, 0, 0, 0]),
                len: 8,
            }),
            out_port: Some(2),
            proto: Some(17),
            ..RuleMatch::default()
        },
        action: NatAction::Snat {
            addrs: AddrRange::single_v4(NAT_ADDR),
            ports: Some(ports),
            flags: NatFlags::default(),
        },
    }
}

fn out_meta() -> PacketMeta {
    PacketMeta {
        in_port: 1,
        out_port: Some(2),
        out_addr: Some(Addr::v4(NAT_ADDR)),
    }
}

fn in_meta() -> PacketMeta {
    PacketMeta {
        in_port: 2,
        out_port: Some(1),
        out_addr: None,
    }
}

fn udp_src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

fn udp_src(frame: &[u8]) -> [u8; 4] {
    [frame[26], frame[27], frame[28], frame[29]]
}

#[test]
fn udp_flood_exhausts_nat_ports_and_recovers() {
    const PORTS: u16 = 64;
    const EXISTING: u16 = 8;
    const FLOOD: usize = 10_000;
    let cfg = Config {
        max_connections: 65_536,
        event_capacity: 64,
        ..Config::default()
    };
    let mut nat = NatEngine::new(7);
    nat.rules_mut()
        .add(snat(PortRange::new(20000, 20000 + PORTS - 1)))
        .expect("rule");
    let mut ct = Conntrack::with_nat(cfg, nat);
    let mut now = SEC;

    // Existing translated UDP conversations (query and answer: replied, a stream later).
    let mut existing = Vec::new();
    for i in 0..EXISTING {
        let client = [10, 0, 0, u8::try_from(i + 1).expect("small")];
        let mut f = udp(client, 5000, SERVER, 53);
        let v = ct.process_mut(&mut f, 0, &out_meta(), now);
        assert!(v.forward() && v.nat == NatOutcome::Rewritten, "{v:?}");
        assert_eq!(udp_src(&f), NAT_ADDR);
        let mapped = udp_src_port(&f);
        let mut r = udp(SERVER, 53, NAT_ADDR, mapped);
        let v = ct.process_mut(&mut r, 0, &in_meta(), now);
        assert!(v.forward() && v.nat == NatOutcome::Rewritten, "{v:?}");
        existing.push((client, mapped));
    }
    // The conversations go on past the 2 s stream delay: they become ASSURED.
    now += 3 * SEC;
    let exchange = |ct: &mut Conntrack, now: u64, existing: &[([u8; 4], u16)]| {
        for &(client, mapped) in existing {
            let mut f = udp(client, 5000, SERVER, 53);
            let v = ct.process_mut(&mut f, 0, &out_meta(), now);
            assert!(v.forward() && v.nat == NatOutcome::Rewritten, "{v:?}");
            assert_eq!(udp_src_port(&f), mapped, "mapping changed");
            let mut r = udp(SERVER, 53, NAT_ADDR, mapped);
            let v = ct.process_mut(&mut r, 0, &in_meta(), now);
            assert!(v.forward(), "{v:?}");
            // The answer goes back to the client.
            assert_eq!([r[30], r[31], r[32], r[33]], client);
        }
    };
    exchange(&mut ct, now, &existing);

    // The flood: new flows from many inside sources to the same server port.
    let mut spoof = Spoofer(0xf100d);
    let mut admitted = 0u64;
    let mut exhausted = 0u64;
    for n in 0..FLOOD {
        let (src, sp) = spoof.next(10, n);
        let mut f = udp(src, sp, SERVER, 53);
        let v = ct.process_mut(&mut f, 0, &out_meta(), now);
        match v.verdict {
            Verdict::Tracked { created: true, .. } => admitted += 1,
            Verdict::Invalid(Invalid::NatExhausted { .. }) => exhausted += 1,
            other => panic!("unexpected verdict for a flood packet: {other:?}"),
        }
        if n % 1000 == 999 {
            exchange(&mut ct, now, &existing);
        }
    }
    let during = ct.stats().nat_exhausted;
    let nat_during = ct.nat().stats().exhausted;

    // After the flood: the flood's entries (unreplied, 30 s) expire; the existing
    // conversations (streams, 120 s) are refreshed on the way.
    now += 20 * SEC;
    exchange(&mut ct, now, &existing);
    now += 15 * SEC;
    let reaped = ct.gc(now, usize::MAX);
    exchange(&mut ct, now, &existing);
    let mut f = udp([10, 9, 9, 9], 7777, SERVER, 53);
    let v = ct.process_mut(&mut f, 0, &out_meta(), now);
    let recovered = v.forward() && v.nat == NatOutcome::Rewritten;

    println!(
        "UDP flood through SNAT with a range of {PORTS} ports, {EXISTING} existing conversations"
    );
    println!("  {:<40} {:>10}", "flood packets (new flows) sent", FLOOD);
    println!(
        "  {:<40} {:>10}",
        "flood flows admitted (ports left)", admitted
    );
    println!(
        "  {:<40} {:>10}",
        "flood flows dropped: nat exhausted", exhausted
    );
    println!("  {:<40} {:>10}", "nat_exhausted (ct counter)", during);
    println!(
        "  {:<40} {:>10}",
        "exhausted (nat engine counter)", nat_during
    );
    println!(
        "  {:<40} {:>10}",
        "existing conversations kept",
        existing.len()
    );
    println!(
        "  {:<40} {:>10}",
        "entries reaped by gc after the flood", reaped
    );
    println!(
        "  {:<40} {:>10}",
        "new connection after the flood",
        if recovered { "ok" } else { "FAILED" }
    );

    assert_eq!(
        admitted,
        u64::from(PORTS - EXISTING),
        "every free port was used once"
    );
    assert_eq!(exhausted, u64::try_from(FLOOD).expect("fits") - admitted);
    assert_eq!(during, exhausted);
    assert_eq!(nat_during, exhausted);
    assert_eq!(reaped, usize::try_from(admitted).expect("fits"));
    assert!(recovered, "new connection after the flood: {v:?}");
    assert_eq!(udp_src(&f), NAT_ADDR);
    assert!((20000..20000 + PORTS).contains(&udp_src_port(&f)));
    assert_eq!(
        ct.stats().nat_exhausted,
        during,
        "no exhaustion after recovery"
    );
}
