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
            Some(1),
            Some("SYN_SENT"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(1),
            Some("SYN_RECV"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(1),
            Some("ESTABLISHED"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(1),
            Some("ESTABLISHED"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(1),
            Some("ESTABLISHED"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(1),
            Some("FIN_WAIT"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(1),
            Some("CLOSE_WAIT"),
        ),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(1),
            Some("LAST_ACK"),
        ),
        (
            "inside",
            VerdictClass::Established,
            Some("ESTABLISHED"),
            Some(1),
            Some("TIME_WAIT"),
        ),
        ("inside", VerdictClass::New, Some("NEW"), Some(2), None),
        (
            "outside",
            VerdictClass::Established,
            Some("ESTABLISHED_REPLY"),
            Some(2),
            None,
        ),
        ("inside", VerdictClass::Invalid, None, None, None),
        ("inside", VerdictClass::Untracked, None, None, None),
        ("inside", VerdictClass::New, Some("NEW"), Some(3), None),
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
        r#"{"index":0,"ts_ns":1700000000000000000,"in_port":"inside","verdict":"new","ctinfo":"NEW","reason":null,"conn_id":1,"state":"SYN_SENT","status":["CONFIRMED"],"egress_port":"outside"}"#
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
    assert_eq!(tcp.id, 1);
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
    let ids: Vec<u64> = last.iter().map(|c| c.id).collect();
    assert_eq!(ids, [1, 3]);
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
