//! Differential test: the same crafted packet sequences go through Linux kernel conntrack
//! and through our software pipeline (the replay tool's [`Replayer`]), and the verdict of
//! every packet and the connection table after every packet must agree.
//!
//! Topology (namespaces unique to this process, deleted on drop even on failure):
//!
//! ```text
//!   ns A (client side)            ns G ("gateway", observed)             ns B (server side)
//!   va ==== veth ==== ga 10.0.1.1/24  -- ip_forward --  gb 10.0.2.1/24 ==== veth ==== vb
//!   raw frames in                                                       raw frames in
//! ```
//!
//! The test writes frames into `va` (client 10.0.1.2 -> server 10.0.2.2) and `vb`
//! (replies) with AF_PACKET sockets. G forwards them; its static neighbour entries point
//! at MACs nobody owns, so A's and B's stacks drop what G forwards and never answer.
//! IPv6 is off everywhere, so nothing else reaches G. In G, an nftables chain at
//! prerouting priority -150 (after conntrack) counts packets per `ct state`; the counter
//! that moved is the kernel's verdict for the packet. `conntrack -L -o extended` in G
//! gives the table after the packet.
//!
//! Our side replays the same frames with timestamps equal to the real injection times,
//! port "inside" = ga, "outside" = gb. Compared per packet: the verdict class
//! (new/established/related/invalid/untracked); the set of connections (by original
//! tuple); per connection the TCP state, ASSURED, SEEN_REPLY (kernel: not UNREPLIED)
//! exactly, and the remaining timeout within ±3 s (the kernel's clock is wall-clock).
//!
//! Needs root, `ip`, `nft` and `conntrack` (`.ci/run` installs them); otherwise it prints
//! SKIP and passes, except where skipping would hide it: as root under CI (`CI` set), or
//! with `CTOFFLOAD_REQUIRE_NETNS` set, missing tools are a failure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant};

use ctoffload_agent::replay::{ConnRecord, Record, ReplayOptions, Replayer, VerdictClass};
use ctoffload_tests::frames::{self, L2};
use ctoffload_tests::inject::Injector;
use ctoffload_tests::kernel::{self, KernelEntry};
use ctoffload_tests::kernel_router::{
    A_NEIGHBOUR_MAC, B_NEIGHBOUR_MAC, GA_MAC, GB_MAC, KernelRouter,
};
use ctoffload_tests::netns::{self, CommandError, NetNs};

/// MACs G sends to; nobody owns them, so A and B drop forwarded frames.
const CLIENT_MAC: [u8; 6] = A_NEIGHBOUR_MAC;
const SERVER_MAC: [u8; 6] = B_NEIGHBOUR_MAC;
const CLIENT: [u8; 4] = [10, 0, 1, 2];
/// Another address on the client side (a spoofed ICMP error goes there).
const CLIENT2: [u8; 4] = [10, 0, 1, 3];
const SERVER: [u8; 4] = [10, 0, 2, 2];
/// A router on the server side that sends ICMP errors.
const ROUTER: [u8; 4] = [10, 0, 2, 254];

const TO_SERVER: L2 = L2 {
    src: CLIENT_MAC,
    dst: GA_MAC,
};
const TO_CLIENT: L2 = L2 {
    src: SERVER_MAC,
    dst: GB_MAC,
};

/// How long to wait for the kernel to count a packet.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout tolerance between the kernel (wall clock, whole seconds) and us.
const TIMEOUT_TOLERANCE_S: u64 = 3;
/// Our clock: this much plus the real time since the epoch of the run.
const CLOCK_BASE_NS: u64 = 1_000_000_000_000;

const STATES: [&str; 5] = ["new", "established", "related", "invalid", "untracked"];

/// Which side a frame is injected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Into `va`; arrives on G's `ga` (our port "inside").
    Client,
    /// Into `vb`; arrives on G's `gb` (our port "outside").
    Server,
}

#[derive(Debug, Clone)]
enum Step {
    Send {
        side: Side,
        frame: Vec<u8>,
        what: String,
    },
    Sleep(Duration),
}

struct Scenario {
    name: &'static str,
    steps: Vec<Step>,
}

/// A scenario builder with per-scenario ports.
struct Builder {
    steps: Vec<Step>,
}

impl Builder {
    fn new() -> Self {
        Self { steps: Vec::new() }
    }

    fn send(&mut self, side: Side, frame: Vec<u8>, what: impl Into<String>) -> &mut Self {
        self.steps.push(Step::Send {
            side,
            frame,
            what: what.into(),
        });
        self
    }

    fn sleep(&mut self, d: Duration) -> &mut Self {
        self.steps.push(Step::Sleep(d));
        self
    }

    fn done(&mut self, name: &'static str) -> Scenario {
        Scenario {
            name,
            steps: std::mem::take(&mut self.steps),
        }
    }
}

/// One TCP connection client:cport -> server:sport.
#[derive(Clone, Copy)]
struct Tcp {
    cport: u16,
    sport: u16,
}

impl Tcp {
    fn c(&self, seq: u32, ack: Option<u32>, flags: &str, payload: &[u8]) -> Vec<u8> {
        frames::tcp(
            TO_SERVER,
            (CLIENT, self.cport),
            (SERVER, self.sport),
            seq,
            ack,
            flags,
            payload,
        )
    }

    fn s(&self, seq: u32, ack: Option<u32>, flags: &str, payload: &[u8]) -> Vec<u8> {
        frames::tcp(
            TO_CLIENT,
            (SERVER, self.sport),
            (CLIENT, self.cport),
            seq,
            ack,
            flags,
            payload,
        )
    }

    /// SYN, SYN/ACK, ACK; returns the next client and server sequence numbers.
    fn handshake(&self, b: &mut Builder, ci: u32, si: u32) -> (u32, u32) {
        b.send(Side::Client, self.c(ci, None, "S", &[]), "SYN");
        b.send(Side::Server, self.s(si, Some(ci + 1), "S", &[]), "SYN/ACK");
        b.send(Side::Client, self.c(ci + 1, Some(si + 1), "", &[]), "ACK");
        (ci + 1, si + 1)
    }

    /// Client FIN, server ACK, server FIN, client ACK.
    fn fin_teardown(&self, b: &mut Builder, c: u32, s: u32) {
        b.send(Side::Client, self.c(c, Some(s), "F", &[]), "FIN (client)");
        b.send(Side::Server, self.s(s, Some(c + 1), "", &[]), "ACK of FIN");
        b.send(
            Side::Server,
            self.s(s, Some(c + 1), "F", &[]),
            "FIN (server)",
        );
        b.send(
            Side::Client,
            self.c(c + 1, Some(s + 1), "", &[]),
            "last ACK",
        );
    }
}

fn udp_c(cport: u16, sport: u16, payload: &[u8]) -> Vec<u8> {
    frames::udp(TO_SERVER, (CLIENT, cport), (SERVER, sport), payload)
}

fn udp_s(cport: u16, sport: u16, payload: &[u8]) -> Vec<u8> {
    frames::udp(TO_CLIENT, (SERVER, sport), (CLIENT, cport), payload)
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    let mut b = Builder::new();

    // Handshake, data both ways, FIN teardown to TIME_WAIT.
    let t = Tcp {
        cport: 41001,
        sport: 80,
    };
    let (c, s) = t.handshake(&mut b, 1_000, 900_000);
    b.send(
        Side::Client,
        t.c(c, Some(s), "P", b"GET / HTTP/1.0\r\n\r\n"),
        "data (client)",
    );
    let c = c + 18;
    b.send(Side::Server, t.s(s, Some(c), "", &[]), "ACK of data");
    b.send(
        Side::Server,
        t.s(s, Some(c), "P", b"HTTP/1.0 200 OK\r\n"),
        "data (server)",
    );
    let s = s + 17;
    b.send(Side::Client, t.c(c, Some(s), "", &[]), "ACK of data");
    t.fin_teardown(&mut b, c, s);
    v.push(b.done("tcp handshake, data, FIN teardown"));

    // RST teardown of an established connection.
    let t = Tcp {
        cport: 41002,
        sport: 80,
    };
    let (c, s) = t.handshake(&mut b, 2_000, 800_000);
    b.send(
        Side::Client,
        t.c(c, Some(s), "P", b"hello"),
        "data (client)",
    );
    b.send(
        Side::Server,
        t.s(s, Some(c + 5), "R", &[]),
        "RST/ACK (server)",
    );
    v.push(b.done("tcp RST teardown"));

    // A SYN refused by RST: the entry goes away at once (no reply seen before).
    let t = Tcp {
        cport: 41003,
        sport: 81,
    };
    b.send(Side::Client, t.c(3_000, None, "S", &[]), "SYN");
    b.send(
        Side::Server,
        t.s(0, Some(3_001), "R", &[]),
        "RST/ACK (refused)",
    );
    v.push(b.done("tcp SYN refused by RST"));

    // Out-of-window data and an ACK for data never sent.
    let t = Tcp {
        cport: 41004,
        sport: 80,
    };
    let (c, s) = t.handshake(&mut b, 4_000, 700_000);
    b.send(
        Side::Client,
        t.c(c + 1_000_000, Some(s), "", b"far away"),
        "data far beyond the window",
    );
    b.send(
        Side::Server,
        t.s(s, Some(c + 500_000), "", &[]),
        "ACK of unseen data",
    );
    b.send(
        Side::Client,
        t.c(c, Some(s), "", b"in window"),
        "data in window",
    );
    v.push(b.done("tcp out-of-window"));

    // SYN retransmission: NEW again, no timeout refresh (visible after > 3 s).
    let t = Tcp {
        cport: 41005,
        sport: 80,
    };
    b.send(Side::Client, t.c(5_000, None, "S", &[]), "SYN");
    b.sleep(Duration::from_millis(4_500));
    b.send(
        Side::Client,
        t.c(5_000, None, "S", &[]),
        "SYN retransmitted",
    );
    b.send(Side::Server, t.s(600_000, Some(5_001), "S", &[]), "SYN/ACK");
    b.send(Side::Client, t.c(5_001, Some(600_001), "", &[]), "ACK");
    v.push(b.done("tcp SYN retransmission"));

    // SYN+FIN is an invalid flag combination: no entry.
    let t = Tcp {
        cport: 41006,
        sport: 80,
    };
    b.send(Side::Client, t.c(6_000, None, "SF", &[]), "SYN+FIN");
    b.send(Side::Client, t.c(6_000, None, "S", &[]), "SYN");
    b.send(
        Side::Client,
        t.c(6_000, None, "SF", &[]),
        "SYN+FIN on SYN_SENT",
    );
    v.push(b.done("tcp SYN+FIN"));

    // TIME_WAIT reuse: a new SYN (higher ISN) on the same ports reopens.
    let t = Tcp {
        cport: 41007,
        sport: 80,
    };
    let (c, s) = t.handshake(&mut b, 7_000, 500_000);
    t.fin_teardown(&mut b, c, s);
    let (c2, s2) = t.handshake(&mut b, 7_000 + 100_000, 400_000);
    b.send(
        Side::Client,
        t.c(c2, Some(s2), "P", b"again"),
        "data on reused ports",
    );
    v.push(b.done("tcp TIME_WAIT reuse"));

    // UDP unreplied.
    b.send(Side::Client, udp_c(42001, 53, b"q1"), "query");
    b.send(Side::Client, udp_c(42001, 53, b"q2"), "query again");
    v.push(b.done("udp unreplied"));

    // UDP replied; after 2 s it becomes a stream (ASSURED, 120 s).
    b.send(Side::Client, udp_c(42002, 53, b"q"), "query");
    b.send(Side::Server, udp_s(42002, 53, b"a"), "answer");
    b.send(Side::Client, udp_c(42002, 53, b"q"), "query within 2 s");
    b.sleep(Duration::from_millis(2_300));
    b.send(Side::Client, udp_c(42002, 53, b"q"), "query after 2 s");
    v.push(b.done("udp replied"));

    // ICMP echo.
    let ping = |reply: bool, seq: u16| {
        let (l2, src, dst) = if reply {
            (TO_CLIENT, SERVER, CLIENT)
        } else {
            (TO_SERVER, CLIENT, SERVER)
        };
        frames::icmp_echo(l2, src, dst, reply, 0x4242, seq)
    };
    b.send(Side::Client, ping(false, 1), "echo request");
    b.send(Side::Server, ping(true, 1), "echo reply");
    b.send(Side::Client, ping(false, 2), "echo request 2");
    b.send(
        Side::Server,
        ping(true, 3),
        "unsolicited echo reply (other seq, same id)",
    );
    v.push(b.done("icmp echo"));

    // An echo reply nobody asked for.
    let stray = frames::icmp_echo(TO_CLIENT, SERVER, CLIENT, true, 0x4343, 1);
    b.send(Side::Server, stray, "echo reply without request");
    v.push(b.done("icmp stray echo reply"));

    // ICMP errors about a UDP flow: RELATED; about an unknown flow or to the wrong
    // address: invalid.
    let q = udp_c(42003, 33434, b"probe");
    let other = udp_c(42999, 33434, b"probe");
    b.send(Side::Client, q.clone(), "UDP probe");
    b.send(
        Side::Server,
        frames::icmp_unreachable(TO_CLIENT, SERVER, CLIENT, 3, &q),
        "port unreachable from the server",
    );
    b.send(
        Side::Server,
        frames::icmp_unreachable(TO_CLIENT, ROUTER, CLIENT, 1, &q),
        "host unreachable from a router",
    );
    b.send(
        Side::Server,
        frames::icmp_unreachable(TO_CLIENT, ROUTER, CLIENT, 1, &other),
        "unreachable quoting an unknown flow",
    );
    b.send(
        Side::Server,
        frames::icmp_unreachable(TO_CLIENT, ROUTER, CLIENT2, 1, &q),
        "unreachable to the wrong address",
    );
    // An error about a TCP connection.
    let t = Tcp {
        cport: 41008,
        sport: 80,
    };
    let syn = t.c(8_000, None, "S", &[]);
    b.send(Side::Client, syn.clone(), "SYN");
    b.send(
        Side::Server,
        frames::icmp_unreachable(TO_CLIENT, ROUTER, CLIENT, 1, &syn),
        "host unreachable about the SYN",
    );
    v.push(b.done("icmp errors"));
    v
}

/// The kernel side: three namespaces, nftables counters, raw sockets.
struct Kernel {
    gw: NetNs,
    _a: NetNs,
    _b: NetNs,
    inject_a: Injector,
    inject_b: Injector,
}

impl Kernel {
    fn setup() -> Result<Self, Box<dyn std::error::Error>> {
        let KernelRouter { gw, a, b } =
            KernelRouter::setup("", &["10.0.1.2", "10.0.1.3"], &["10.0.2.2"])?;
        let mut rules = String::from(
            "table inet ctdiff {\n  chain pre {\n    type filter hook prerouting priority -150; policy accept;\n",
        );
        for s in STATES {
            let _ = writeln!(
                rules,
                "    iifname {{ \"ga\", \"gb\" }} ct state {s} counter comment \"{s}\""
            );
        }
        rules.push_str("  }\n}\n");
        gw.nft(&rules)?;
        // The conntrack sysctls exist once a ct rule made the netns use conntrack.
        gw.sysctl(&[
            "net.netfilter.nf_conntrack_checksum=1",
            "net.netfilter.nf_conntrack_tcp_loose=1",
            "net.netfilter.nf_conntrack_tcp_be_liberal=0",
            "net.netfilter.nf_conntrack_tcp_ignore_invalid_rst=0",
        ])?;
        let inject_a = Injector::open(&a, "va")?;
        let inject_b = Injector::open(&b, "vb")?;
        Ok(Self {
            gw,
            _a: a,
            _b: b,
            inject_a,
            inject_b,
        })
    }

    fn counters(&self) -> Result<BTreeMap<String, u64>, Box<dyn std::error::Error>> {
        let json = self
            .gw
            .exec("nft", &["-j", "list", "table", "inet", "ctdiff"])?;
        Ok(kernel::comment_counters(&json)?)
    }

    fn entries(&self) -> Result<Vec<KernelEntry>, CommandError> {
        let text = self.gw.exec("conntrack", &["-L", "-o", "extended"])?;
        Ok(kernel::parse_entries(&text))
    }

    fn flush(&self) -> Result<(), CommandError> {
        self.gw.exec("conntrack", &["-F"]).map(drop)
    }

    /// Inject a frame and wait until one `ct state` counter moved; returns its name.
    fn send(&mut self, side: Side, frame: &[u8]) -> Result<String, Box<dyn std::error::Error>> {
        let before = self.counters()?;
        match side {
            Side::Client => self.inject_a.send(frame)?,
            Side::Server => self.inject_b.send(frame)?,
        }
        let deadline = Instant::now() + VERDICT_TIMEOUT;
        loop {
            let after = self.counters()?;
            let moved: Vec<&str> = STATES
                .iter()
                .copied()
                .filter(|s| after.get(*s) != before.get(*s))
                .collect();
            match moved.as_slice() {
                [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                [] => return Ok("(not seen by the kernel)".to_owned()),
                [one] => return Ok((*one).to_owned()),
                many => return Ok(format!("(several counters moved: {many:?})")),
            }
        }
    }
}

/// A connection as both sides can describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    state: Option<String>,
    assured: bool,
    seen_reply: bool,
    timeout_s: u64,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}{}{}s",
            self.state.as_deref().unwrap_or("-"),
            if self.assured { "[ASSURED] " } else { "" },
            if self.seen_reply { "" } else { "[UNREPLIED] " },
            self.timeout_s
        )
    }
}

fn kernel_table(entries: &[KernelEntry]) -> BTreeMap<String, Entry> {
    entries
        .iter()
        .map(|e| {
            (
                e.key(),
                Entry {
                    state: e.state.clone(),
                    assured: e.assured,
                    seen_reply: !e.unreplied,
                    timeout_s: e.timeout_s,
                },
            )
        })
        .collect()
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        other => format!("unknown({other})"),
    }
}

fn our_key(c: &ConnRecord) -> String {
    let o = &c.orig;
    let mut k = format!("{} src={} dst={}", proto_name(o.proto), o.src, o.dst);
    if let (Some(s), Some(d)) = (o.sport, o.dport) {
        let _ = write!(k, " sport={s} dport={d}");
    }
    if let (Some(t), Some(c), Some(i)) = (o.icmp_type, o.icmp_code, o.icmp_id) {
        let _ = write!(k, " type={t} code={c} id={i}");
    }
    k
}

fn our_table(rec: &Record) -> BTreeMap<String, Entry> {
    rec.table
        .iter()
        .flatten()
        .map(|c| {
            (
                our_key(c),
                Entry {
                    state: c.state.clone(),
                    assured: c.status.iter().any(|s| s == "ASSURED"),
                    seen_reply: c.status.iter().any(|s| s == "SEEN_REPLY"),
                    timeout_s: c.timeout_remaining_s,
                },
            )
        })
        .collect()
}

fn verdict_name(v: VerdictClass) -> &'static str {
    match v {
        VerdictClass::New => "new",
        VerdictClass::Established => "established",
        VerdictClass::Related => "related",
        VerdictClass::Invalid => "invalid",
        VerdictClass::Untracked => "untracked",
    }
}

/// Differences between the two tables (empty when they agree).
fn table_diff(kernel: &BTreeMap<String, Entry>, ours: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, ke) in kernel {
        match ours.get(k) {
            None => d.push(format!("kernel has [{k}] {ke}, we have no entry")),
            Some(oe) => {
                let same = ke.state == oe.state
                    && ke.assured == oe.assured
                    && ke.seen_reply == oe.seen_reply
                    && ke.timeout_s.abs_diff(oe.timeout_s) <= TIMEOUT_TOLERANCE_S;
                if !same {
                    d.push(format!("[{k}] kernel: {ke}; ours: {oe}"));
                }
            }
        }
    }
    for (k, oe) in ours {
        if !kernel.contains_key(k) {
            d.push(format!("we have [{k}] {oe}, the kernel has no entry"));
        }
    }
    d
}

fn run_scenario(
    k: &mut Kernel,
    epoch: Instant,
    sc: &Scenario,
    log: &mut String,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    k.flush()?;
    let mut ours = Replayer::new(&ReplayOptions {
        dump_table: true,
        ..ReplayOptions::default()
    });
    ours.add_port("inside");
    ours.add_port("outside");
    let mut mismatches = Vec::new();
    let _ = writeln!(log, "== {}", sc.name);
    let mut n = 0;
    for step in &sc.steps {
        let (side, frame, what) = match step {
            Step::Sleep(d) => {
                thread::sleep(*d);
                continue;
            }
            Step::Send { side, frame, what } => (*side, frame, what),
        };
        let sent_at = Instant::now();
        let kv = k.send(side, frame)?;
        let ts = CLOCK_BASE_NS
            + u64::try_from(sent_at.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX / 2);
        let port = match side {
            Side::Client => 0,
            Side::Server => 1,
        };
        let rec = ours.packet(port, ts, frame).record;
        let kt = kernel_table(&k.entries()?);
        // Our timeouts as seen at the moment the kernel table was read.
        let read_lag_s = sent_at.elapsed().as_secs();
        let mut ot = our_table(&rec);
        for e in ot.values_mut() {
            e.timeout_s = e.timeout_s.saturating_sub(read_lag_s);
        }
        let ov = verdict_name(rec.verdict);
        let mut line = format!(
            "  #{n} {what:<44} kernel {kv:<12} ours {ov:<12}{}",
            rec.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        if kv != ov {
            mismatches.push(format!(
                "{}: packet #{n} ({what}): kernel verdict {kv}, ours {ov}{}",
                sc.name,
                rec.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
            line.push_str("  <-- VERDICT MISMATCH");
        }
        let _ = writeln!(log, "{line}");
        for (key, e) in &kt {
            let _ = writeln!(log, "      kernel [{key}] {e}");
        }
        for d in table_diff(&kt, &ot) {
            let _ = writeln!(log, "      TABLE MISMATCH: {d}");
            mismatches.push(format!("{}: after packet #{n} ({what}): {d}", sc.name));
        }
        n += 1;
    }
    Ok(mismatches)
}

#[test]
fn kernel_and_software_conntrack_agree() {
    if let Some(why) = netns::skip_reason(&["ip", "nft", "conntrack"]) {
        let required = std::env::var_os("CTOFFLOAD_REQUIRE_NETNS").is_some()
            || (std::env::var_os("CI").is_some() && netns::is_root());
        assert!(
            !required,
            "the differential test must run here (CI as root, or CTOFFLOAD_REQUIRE_NETNS) but cannot: {why}"
        );
        eprintln!("SKIP differential_conntrack: {why}");
        return;
    }
    let started = Instant::now();
    let mut k = match Kernel::setup() {
        Ok(k) => k,
        Err(e) => panic!("cannot set up the namespaces: {e}"),
    };
    let epoch = Instant::now();
    let mut log = String::new();
    let mut mismatches = Vec::new();
    for sc in scenarios() {
        match run_scenario(&mut k, epoch, &sc, &mut log) {
            Ok(m) => mismatches.extend(m),
            Err(e) => panic!("scenario {}: {e}\n{log}", sc.name),
        }
    }
    eprintln!("{log}");
    eprintln!(
        "differential_conntrack: {} scenarios in {:.1} s, {} mismatches",
        scenarios().len(),
        started.elapsed().as_secs_f64(),
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "kernel and software conntrack disagree:\n{}",
        mismatches.join("\n")
    );
}
