//! `ctoffload replay` end to end: a pcapng built here with pcap-file (frames built with
//! etherparse) goes through the replay function and the binary; the records and the
//! output pcapng are checked exactly.

use std::borrow::Cow;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ctoffload_agent::replay::{
    self, InvalidPolicy, Record, ReplayOptions, StreamNames, VerdictClass,
};
use etherparse::PacketBuilder;
use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};

const C: [u8; 4] = [10, 0, 0, 2];
const S: [u8; 4] = [192, 0, 2, 10];
const CMAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SMAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const INSIDE: u32 = 0;
const OUTSIDE: u32 = 1;

fn tcp(from_client: bool, seq: u32, ack: Option<u32>, flags: &str, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sp, dp, sm, dm) = if from_client {
        (C, S, 40000, 80, CMAC, SMAC)
    } else {
        (S, C, 80, 40000, SMAC, CMAC)
    };
    let mut b = PacketBuilder::ethernet2(sm, dm)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 64240);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build tcp");
    v
}

fn udp(from_client: bool, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sp, dp, sm, dm) = if from_client {
        (C, S, 5353, 53, CMAC, SMAC)
    } else {
        (S, C, 53, 5353, SMAC, CMAC)
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(sm, dm)
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, payload)
        .expect("build udp");
    v
}

/// (interface, microseconds, frame)
fn scenario() -> Vec<(u32, u64, Vec<u8>)> {
    let (ci, si) = (1000u32, 5000u32);
    let mut malformed = tcp(true, 1, None, "S", &[]);
    // Cut inside the TCP header: the IPv4 total length now claims more than is there.
    malformed.truncate(14 + 20 + 10);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CMAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let t0 = 1_700_000_000_000_000u64; // µs
    vec![
        (INSIDE, t0, tcp(true, ci, None, "S", &[])),
        (OUTSIDE, t0 + 1_000, tcp(false, si, Some(ci + 1), "S", &[])),
        (INSIDE, t0 + 2_000, tcp(true, ci + 1, Some(si + 1), "", &[])),
        (
            INSIDE,
            t0 + 3_000,
            tcp(true, ci + 1, Some(si + 1), "", b"hello"),
        ),
        (
            OUTSIDE,
            t0 + 4_000,
            tcp(false, si + 1, Some(ci + 6), "", &[]),
        ),
        (
            INSIDE,
            t0 + 5_000,
            tcp(true, ci + 6, Some(si + 1), "F", &[]),
        ),
        (
            OUTSIDE,
            t0 + 6_000,
            tcp(false, si + 1, Some(ci + 7), "", &[]),
        ),
        (
            OUTSIDE,
            t0 + 7_000,
            tcp(false, si + 1, Some(ci + 7), "F", &[]),
        ),
        (INSIDE, t0 + 8_000, tcp(true, ci + 7, Some(si + 2), "", &[])),
        (INSIDE, t0 + 9_000, udp(true, b"query")),
        (OUTSIDE, t0 + 10_000, udp(false, b"answer")),
        (INSIDE, t0 + 11_000, malformed),
        (INSIDE, t0 + 12_000, arp),
        // 40 s later the UDP entry (30 s, replied within 2 s) has expired: a new one.
        (INSIDE, t0 + 40_012_000, udp(true, b"again")),
    ]
}

fn idb(name: &str, linktype: DataLink, tsresol: Option<u8>) -> InterfaceDescriptionBlock<'static> {
    let mut options = vec![InterfaceDescriptionOption::IfName(Cow::Owned(
        name.to_owned(),
    ))];
    if let Some(r) = tsresol {
        options.push(InterfaceDescriptionOption::IfTsResol(r));
    }
    InterfaceDescriptionBlock {
        linktype,
        snaplen: 65535,
        options,
    }
}

/// The input: two interfaces at the default (microsecond) resolution. pcap-file stores
/// `Duration::as_nanos()` of an EPB as the raw unit count.
fn input_pcapng(packets: &[(u32, u64, Vec<u8>)]) -> Vec<u8> {
    let mut w = PcapNgWriter::new(Vec::new()).expect("writer");
    w.write_pcapng_block(idb("inside", DataLink::ETHERNET, None))
        .expect("idb");
    w.write_pcapng_block(idb("outside", DataLink::ETHERNET, None))
        .expect("idb");
    for (port, us, data) in packets {
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: *port,
            timestamp: Duration::from_nanos(*us),
            original_len: u32::try_from(data.len()).expect("small"),
            data: Cow::Borrowed(data),
            options: vec![],
        })
        .expect("epb");
    }
    w.into_inner()
}

/// The output we expect, built independently: little-endian section, the same two
/// interfaces with nanosecond resolution, the forwarded packets on the other port.
fn expected_output(packets: &[(u32, u64, Vec<u8>)], dropped: &[usize]) -> Vec<u8> {
    let mut w =
        PcapNgWriter::with_endianness(Vec::new(), pcap_file::Endianness::Little).expect("writer");
    w.write_pcapng_block(idb("inside", DataLink::ETHERNET, Some(9)))
        .expect("idb");
    w.write_pcapng_block(idb("outside", DataLink::ETHERNET, Some(9)))
        .expect("idb");
    for (i, (port, us, data)) in packets.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: port ^ 1,
            timestamp: Duration::from_micros(*us),
            original_len: u32::try_from(data.len()).expect("small"),
            data: Cow::Borrowed(data),
            options: vec![],
        })
        .expect("epb");
    }
    w.into_inner()
}

fn names() -> StreamNames {
    StreamNames {
        input: PathBuf::from("in.pcapng"),
        output: PathBuf::from("out.pcapng"),
        records: PathBuf::from("-"),
    }
}

fn run(input: &[u8], opts: &ReplayOptions) -> (Vec<Record>, Vec<u8>) {
    let mut out = Vec::new();
    let mut recs = Vec::new();
    replay::replay(input, &mut out, &mut recs, opts, &names()).expect("replay");
    let records = String::from_utf8(recs)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    (records, out)
}

/// The id of a connection: its slot's generation (1 for the slot's first connection)
/// and the slot (`ConnTable::id`).
fn conn_id(slot: u64, generation: u64) -> u64 {
    (generation << 32) | slot
}

/// (in_port, verdict, ctinfo, conn_id, state)
type Expected<'a> = (
    &'a str,
    VerdictClass,
    Option<&'a str>,
    Option<u64>,
    Option<&'a str>,
);

#[test]
fn records_and_output_are_exact() {
    let packets = scenario();
    let input = input_pcapng(&packets);
    let (records, out) = run(&input, &ReplayOptions::default());
    assert_eq!(records.len(), packets.len());

    let expect: [Expected<'_>; 14] = [
        (
            "inside",
            VerdictClass::New,
            Some("NEW"),
            Some(conn_id(0, 1)),
            Some("SYN_SENT"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(conn_id(0, 1)),
            Some("SYN_RECV"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(conn_id(0, 1)),
            Some("ESTABLISHED"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(conn_id(0, 1)),
            Some("ESTABLISHED"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(conn_id(0, 1)),
            Some("ESTABLISHED"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(conn_id(0, 1)),
            Some("FIN_WAIT"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(conn_id(0, 1)),
            Some("CLOSE_WAIT"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(conn_id(0, 1)),
            Some("LAST_ACK"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(conn_id(0, 1)),
            Some("TIME_WAIT"),
        ),
        (
            "inside",
            VerdictClass::New,
            Some("NEW"),
            Some(conn_id(1, 1)),
            None,
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(conn_id(1, 1)),
            None,
        ),
        ("inside", VerdictClass::Invalid, None, None, None),
        ("inside", VerdictClass::Untracked, None, None, None),
        // The UDP connection expired (GC): its slot 1 is used a second time.
        (
            "inside",
            VerdictClass::New,
            Some("NEW"),
            Some(conn_id(1, 2)),
            None,
        ),
    ];
    for (i, (r, e)) in records.iter().zip(expect.iter()).enumerate() {
        let got = (
            r.in_port.as_str(),
            r.verdict,
            r.ctinfo.as_deref(),
            r.conn_id,
            r.state.as_deref(),
        );
        assert_eq!(got, *e, "record {i}: {r:?}");
        assert_eq!(r.index, u64::try_from(i).expect("small"));
        assert_eq!(r.ts_ns, packets[i].1 * 1000, "record {i}");
        assert!(r.table.is_none());
    }
    // Status bits, reasons and egress ports.
    assert_eq!(records[0].status, ["CONFIRMED"]);
    assert_eq!(records[1].status, ["SEEN_REPLY", "CONFIRMED"]);
    assert_eq!(records[2].status, ["SEEN_REPLY", "ASSURED", "CONFIRMED"]);
    assert_eq!(records[0].egress_port.as_deref(), Some("outside"));
    assert_eq!(records[1].egress_port.as_deref(), Some("inside"));
    assert!(records[0].reason.is_none());
    let malformed = &records[11];
    assert_eq!(malformed.egress_port, None);
    let reason = malformed.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("malformed packet:"), "{reason}");
    assert_eq!(
        records[12].reason.as_deref(),
        Some("not IP (ethertype 0x0806)")
    );
    assert_eq!(records[12].egress_port.as_deref(), Some("outside"));

    assert_eq!(out, expected_output(&packets, &[11]));

    // The exact JSON of the first record (the schema docs/replay.md shows).
    let first = serde_json::to_string(&records[0]).expect("json");
    assert_eq!(
        first,
        r#"{"index":0,"ts_ns":1700000000000000000,"in_port":"inside","verdict":"new","ctinfo":"NEW","reason":null,"conn_id":4294967296,"state":"SYN_SENT","status":["CONFIRMED"],"egress_port":"outside"}"#
    );
}

#[test]
fn invalid_pass_and_table_dump() {
    let packets = scenario();
    let input = input_pcapng(&packets);
    let opts = ReplayOptions {
        invalid: InvalidPolicy::Pass,
        dump_table: true,
        ..ReplayOptions::default()
    };
    let (records, out) = run(&input, &opts);
    assert_eq!(out, expected_output(&packets, &[]));
    assert_eq!(records[11].egress_port.as_deref(), Some("outside"));

    let table = records[10].table.as_ref().expect("dump");
    assert_eq!(table.len(), 2);
    let tcp = &table[0];
    assert_eq!(tcp.id, conn_id(0, 1));
    assert_eq!(tcp.state.as_deref(), Some("TIME_WAIT"));
    assert_eq!(tcp.timeout_remaining_s, 119); // 120 s set 2 ms earlier
    assert_eq!((tcp.orig.sport, tcp.orig.dport), (Some(40000), Some(80)));
    assert_eq!((tcp.reply.sport, tcp.reply.dport), (Some(80), Some(40000)));
    assert_eq!(tcp.counters.orig.packets, 5);
    assert_eq!(tcp.counters.reply.packets, 4);
    let udp = &table[1];
    assert_eq!(udp.state, None);
    assert_eq!(udp.status, ["SEEN_REPLY", "CONFIRMED"]);
    assert_eq!(udp.timeout_remaining_s, 30);
    assert_eq!(udp.counters.orig.bytes, 28 + 5);
    let json = serde_json::to_string(&udp.orig).expect("json");
    assert_eq!(
        json,
        r#"{"proto":17,"src":"10.0.0.2","dst":"192.0.2.10","sport":5353,"dport":53}"#
    );
    // 40 s later: GC ran with the capture's clock; the UDP entry is gone, the TCP one
    // is still in TIME_WAIT (120 s).
    let last = records[13].table.as_ref().expect("dump");
    // The third connection took the UDP connection's slot (1), its second use.
    let ids: Vec<u64> = last.iter().map(|c| c.id).collect();
    assert_eq!(ids, [conn_id(0, 1), conn_id(1, 2)]);
}

#[test]
fn unsupported_link_type_and_corrupt_capture() {
    let mut w = PcapNgWriter::new(Vec::new()).expect("writer");
    w.write_pcapng_block(idb("raw", DataLink::RAW, None))
        .expect("idb");
    let input = w.into_inner();
    let err = replay::replay(
        input.as_slice(),
        Vec::new(),
        Vec::new(),
        &ReplayOptions::default(),
        &names(),
    )
    .expect_err("raw IP");
    assert_eq!(
        err.to_string(),
        "in.pcapng: interface 0 has link type RAW, only ETHERNET is supported"
    );

    let mut input = input_pcapng(&scenario());
    input.truncate(input.len() - 7);
    let err = replay::replay(
        input.as_slice(),
        Vec::new(),
        Vec::new(),
        &ReplayOptions::default(),
        &names(),
    )
    .expect_err("truncated");
    assert_eq!(
        err.to_string(),
        "in.pcapng: corrupt capture after 13 packets"
    );

    let err = replay::replay(
        &b"hello world"[..],
        Vec::new(),
        Vec::new(),
        &ReplayOptions::default(),
        &names(),
    )
    .expect_err("not a capture");
    assert!(
        err.to_string()
            .starts_with("in.pcapng: not a pcap or pcapng file")
    );
}

#[test]
fn classic_pcap_is_one_port() {
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        ..PcapHeader::default()
    };
    let mut w = PcapWriter::with_header(Vec::new(), header).expect("writer");
    let frame = udp(true, b"x");
    let len = u32::try_from(frame.len()).expect("small");
    w.write_packet(&PcapPacket::new(Duration::from_micros(5), len, &frame))
        .expect("packet");
    let (records, _) = run(&w.into_writer(), &ReplayOptions::default());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].in_port, "port0");
    assert_eq!(records[0].egress_port.as_deref(), Some("port0"));
    assert_eq!(records[0].ts_ns, 5_000);
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ctoffload-replay-{}-{name}", std::process::id()))
}

#[test]
fn binary_writes_files_and_exits_2_on_errors() {
    let bin = env!("CARGO_BIN_EXE_ctoffload");
    let packets = scenario();
    let input = temp("in.pcapng");
    let output = temp("out.pcapng");
    let records = temp("records.jsonl");
    let config = temp("ct.toml");
    std::fs::write(&input, input_pcapng(&packets)).expect("write input");
    std::fs::write(&config, "[tcp]\nloose = true\n").expect("write config");
    let st = Command::new(bin)
        .arg("replay")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("--records")
        .arg(&records)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let out = std::fs::read(&output).expect("output");
    assert_eq!(out, expected_output(&packets, &[11]));
    let lines = std::fs::read_to_string(&records).expect("records");
    assert_eq!(lines.lines().count(), packets.len());

    // Missing input: exit 2 and the file named.
    let missing = temp("missing.pcapng");
    let st = Command::new(bin)
        .arg("replay")
        .arg(&missing)
        .output()
        .expect("run");
    assert_eq!(st.status.code(), Some(2));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.contains(&*missing.to_string_lossy()) && err.contains("cannot open"),
        "{err}"
    );

    // Unknown configuration key: exit 2, the key named.
    std::fs::write(&config, "[tcp]\nbe_liberl = true\n").expect("write config");
    let st = Command::new(bin)
        .arg("replay")
        .arg(&input)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(st.status.code(), Some(2));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.contains("be_liberl") && err.contains("ct.toml"),
        "{err}"
    );

    for p in [input, output, records, config] {
        let _ = std::fs::remove_file(p);
    }
}

// ───────────────────────────── NAT ─────────────────────────────

/// The replay configuration of the NAT test: the agent's `[[ports]]` and
/// `[[nat.rules]]` syntax.
const NAT_CONFIG: &str = r#"
[[ports]]
name = "inside"
mac = "02:00:00:00:00:01"

[[ports]]
name = "outside"
addresses = ["203.0.113.1/24"]

[[nat.rules]]
name = "web-in"
kind = "dnat"
protocol = "tcp"
dst = "203.0.113.1/32"
dport = "8080"
to_address = "10.0.0.80"
to_port = 80

[[nat.rules]]
name = "tcp-out"
kind = "snat"
protocol = "tcp"
src = "10.0.0.0/8"
out_port = "outside"
to_addresses = "198.51.100.7"
to_ports = "20000-20000"

[[nat.rules]]
name = "lan-masq"
kind = "masquerade"
src = "10.0.0.0/8"
out_port = "outside"
"#;

/// What a packet is, for [`nat_frame`].
#[derive(Clone, Copy)]
enum Kind {
    /// TCP with flags (`S`, `A`, `SA`) and sequence number.
    Tcp(&'static str, u32, u32),
    Udp,
    EchoRequest,
    EchoReply,
}

/// A frame built by etherparse (its own checksum code): `(addr, port)` endpoints; for
/// ICMP echo the port is the identifier.
fn nat_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), kind: Kind, from_inside: bool) -> Vec<u8> {
    let (sm, dm) = if from_inside {
        (CMAC, SMAC)
    } else {
        (SMAC, CMAC)
    };
    let ip = PacketBuilder::ethernet2(sm, dm).ipv4(src.0, dst.0, 64);
    let mut v = Vec::new();
    match kind {
        Kind::Tcp(flags, seq, ack) => {
            let mut b = ip.tcp(src.1, dst.1, seq, 64240);
            if flags.contains('S') {
                b = b.syn();
            }
            if flags.contains('A') {
                b = b.ack(ack);
            }
            b.write(&mut v, &[]).expect("tcp");
        }
        Kind::Udp => ip.udp(src.1, dst.1).write(&mut v, b"dns?").expect("udp"),
        Kind::EchoRequest => ip
            .icmpv4_echo_request(src.1, 1)
            .write(&mut v, b"ping")
            .expect("echo"),
        Kind::EchoReply => ip
            .icmpv4_echo_reply(dst.1, 1)
            .write(&mut v, b"ping")
            .expect("echo"),
    }
    v
}

#[test]
fn nat_rules_from_the_config_translate_emitted_packets() {
    let settings =
        replay::parse_settings(NAT_CONFIG, std::path::Path::new("nat.toml")).expect("config");
    let opts = ReplayOptions {
        nat: settings.nat,
        conntrack: settings.conntrack,
        ..ReplayOptions::default()
    };
    let (c, s, x) = ([10, 0, 0, 2], [192, 0, 2, 10], [198, 18, 0, 5]);
    let (web, snat, public) = ([10, 0, 0, 80], [198, 51, 100, 7], [203, 0, 113, 1]);
    let t0 = 1_700_000_000_000_000u64;
    // (port, packet as captured, packet as the gateway must emit it)
    let steps: Vec<(u32, Vec<u8>, Vec<u8>)> = vec![
        // TCP out through SNAT to one port: 40000 becomes 20000, both directions.
        (
            INSIDE,
            nat_frame((c, 40000), (s, 80), Kind::Tcp("S", 1000, 0), true),
            nat_frame((snat, 20000), (s, 80), Kind::Tcp("S", 1000, 0), true),
        ),
        (
            OUTSIDE,
            nat_frame((s, 80), (snat, 20000), Kind::Tcp("SA", 5000, 1001), false),
            nat_frame((s, 80), (c, 40000), Kind::Tcp("SA", 5000, 1001), false),
        ),
        (
            INSIDE,
            nat_frame((c, 40000), (s, 80), Kind::Tcp("A", 1001, 5001), true),
            nat_frame((snat, 20000), (s, 80), Kind::Tcp("A", 1001, 5001), true),
        ),
        // UDP masqueraded to the outside port's address, port kept.
        (
            INSIDE,
            nat_frame((c, 5353), (s, 53), Kind::Udp, true),
            nat_frame((public, 5353), (s, 53), Kind::Udp, true),
        ),
        (
            OUTSIDE,
            nat_frame((s, 53), (public, 5353), Kind::Udp, false),
            nat_frame((s, 53), (c, 5353), Kind::Udp, false),
        ),
        // ICMP echo masqueraded, identifier kept.
        (
            INSIDE,
            nat_frame((c, 0x1234), (s, 0), Kind::EchoRequest, true),
            nat_frame((public, 0x1234), (s, 0), Kind::EchoRequest, true),
        ),
        (
            OUTSIDE,
            nat_frame((s, 0), (public, 0x1234), Kind::EchoReply, false),
            nat_frame((s, 0), (c, 0x1234), Kind::EchoReply, false),
        ),
        // A port forward: 203.0.113.1:8080 is 10.0.0.80:80.
        (
            OUTSIDE,
            nat_frame((x, 33000), (public, 8080), Kind::Tcp("S", 7, 0), false),
            nat_frame((x, 33000), (web, 80), Kind::Tcp("S", 7, 0), false),
        ),
        (
            INSIDE,
            nat_frame((web, 80), (x, 33000), Kind::Tcp("SA", 9, 8), true),
            nat_frame((public, 8080), (x, 33000), Kind::Tcp("SA", 9, 8), true),
        ),
    ];
    let captured: Vec<(u32, u64, Vec<u8>)> = steps
        .iter()
        .enumerate()
        .map(|(i, (p, f, _))| (*p, t0 + 1000 * i as u64, f.clone()))
        .collect();
    let emitted: Vec<(u32, u64, Vec<u8>)> = steps
        .iter()
        .enumerate()
        .map(|(i, (p, _, e))| (*p, t0 + 1000 * i as u64, e.clone()))
        .collect();
    let (records, out) = run(&input_pcapng(&captured), &opts);
    assert_eq!(records.len(), steps.len());
    for r in &records {
        assert!(r.egress_port.is_some(), "{r:?}");
        assert!(r.nat.is_some(), "every packet translated: {r:?}");
    }
    // Byte for byte (so every IPv4, TCP, UDP and ICMP checksum is etherparse's).
    assert_eq!(out, expected_output(&emitted, &[]));

    // The records show the translation.
    let first = records[0].nat.as_ref().expect("nat");
    let ip = |a: [u8; 4]| std::net::IpAddr::from(a);
    assert_eq!((first.before.src, first.before.sport), (ip(c), Some(40000)));
    assert_eq!(
        (first.after.src, first.after.sport),
        (ip(snat), Some(20000))
    );
    assert_eq!(first.after.dst, ip(s));
    assert!(records[0].status.iter().any(|b| b == "SRC_NAT"));
    let echo = records[5].nat.as_ref().expect("nat");
    assert_eq!(echo.after.src, ip(public));
    assert_eq!(echo.after.icmp_id, Some(0x1234));
    let forward = records[7].nat.as_ref().expect("nat");
    assert_eq!(
        (forward.after.dst, forward.after.dport),
        (ip(web), Some(80))
    );
    assert!(records[7].status.iter().any(|b| b == "DST_NAT"));
    let json = serde_json::to_string(&records[3]).expect("json");
    assert!(
        json.contains(r#""nat":{"before":{"proto":17,"src":"10.0.0.2","dst":"192.0.2.10","sport":5353,"dport":53},"after":{"proto":17,"src":"203.0.113.1","dst":"192.0.2.10","sport":5353,"dport":53}}"#),
        "{json}"
    );
}

#[test]
fn nat_config_errors_name_the_key() {
    let bad = NAT_CONFIG.replace("20000-20000", "2000-1000");
    let e = replay::parse_settings(&bad, std::path::Path::new("nat.toml")).expect_err("bad");
    let msg = ctoffload_agent::cli::error_chain(&e);
    assert_eq!(
        msg,
        "nat.toml: invalid NAT configuration: nat.rules[1].to_ports: range 2000-1000 is empty"
    );
    // A rule naming a port that [[ports]] does not declare.
    let bad = NAT_CONFIG.replace(
        "out_port = \"outside\"\nto_addresses",
        "out_port = \"wan\"\nto_addresses",
    );
    let e = replay::parse_settings(&bad, std::path::Path::new("nat.toml")).expect_err("bad");
    assert!(
        ctoffload_agent::cli::error_chain(&e).contains("nat.rules[1].out_port"),
        "{e:?}"
    );
    // Without NAT keys the settings are the conntrack ones alone.
    let plain = replay::parse_settings("checksum = false\n", std::path::Path::new("c.toml"))
        .expect("plain");
    assert!(plain.nat.rules.is_empty());
}

#[test]
fn masquerade_without_a_declared_egress_address_drops_the_new_connection() {
    // No [[ports]]: the egress interface has no address to masquerade to.
    let config = "[[nat.rules]]\nname = \"masq\"\nkind = \"masquerade\"\n";
    let settings = replay::parse_settings(config, std::path::Path::new("m.toml")).expect("config");
    let opts = ReplayOptions {
        nat: settings.nat,
        ..ReplayOptions::default()
    };
    let t0 = 1_700_000_000_000_000u64;
    let packets = vec![(INSIDE, t0, udp(true, b"query"))];
    let (records, out) = run(&input_pcapng(&packets), &opts);
    assert_eq!(records[0].verdict, VerdictClass::Invalid);
    assert_eq!(records[0].egress_port, None);
    assert_eq!(records[0].nat, None);
    let reason = records[0].reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("no egress address to masquerade to"),
        "{reason}"
    );
    assert_eq!(out, expected_output(&packets, &[0]));
}
