//! Differential test of NAT: the same crafted frames go through a Linux kernel NAT
//! gateway (nftables masquerade and dnat in a network namespace) and through our
//! [`Conntrack`] with the equivalent rules, and the frames that leave the gateway are
//! compared.
//!
//! Topology (namespaces unique to this process, deleted on drop even on failure):
//!
//! ```text
//!   ns A (inside)                 ns G (NAT gateway)                      ns B (outside)
//!   va ==== veth ==== ga 10.0.1.1/24  -- ip_forward --  gb 10.0.2.1/24 ==== veth ==== vb
//! ```
//!
//! G masquerades what leaves `gb` and forwards 10.0.2.1 tcp/8080 to 10.0.1.2:80 and
//! udp/5353 to 10.0.1.2:53. The test writes frames into `va` (inside hosts 10.0.1.2 and
//! 10.0.1.3) and `vb` (server 10.0.2.2, router 10.0.2.254) and reads what G sends out of
//! the other side (frames with G's source MAC). Our side runs the same frames through
//! [`Conntrack::process_mut`] with a masquerade rule (egress address 10.0.2.1) and two
//! DNAT rules, then forwards them with [`route_rewrite`] (G's MAC, neighbour MAC, TTL
//! decrement): the two outputs must be equal byte for byte, Ethernet header included,
//! and every checksum in them is verified by an implementation written here.
//!
//! Where the kernel's choice is legitimately random (the port or ICMP id of the second
//! of two inside hosts that use the same one), each side answers with its own choice
//! and the properties are compared instead: the first host keeps its port, the second
//! gets another port in the same range (1024-65535) that no other connection holds, the
//! frames are equal apart from that port and the L4 checksum, and the replies map back
//! to the right host byte for byte.
//!
//! Scenarios: a TCP handshake with a port collision between two inside hosts; an ICMP
//! echo id collision; ICMP errors from a router quoting translated packets (TCP SYN,
//! UDP); a DNAT port forward (TCP handshake, UDP exchange) and an ICMP error from the
//! inside server quoting a port-forwarded packet.
//!
//! Needs root, `ip` and `nft`; otherwise it prints SKIP and passes, except as root under
//! CI (`CI` set) or with `CTOFFLOAD_REQUIRE_NETNS` set, where that is a failure.

use std::error::Error;
use std::time::{Duration, Instant};

use ctoffload_fallback_sw::conntrack::{Config, Conntrack, Prefix};
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::nat::rewrite::route_rewrite;
use ctoffload_fallback_sw::nat::rules::{NatAction, NatFlags, NatRule, PortRange, RuleMatch};
use ctoffload_fallback_sw::tuple::{Addr, Family};
use ctoffload_fallback_sw::wire::{self, ParseOptions};
use ctoffload_tests::capture::Capture;
use ctoffload_tests::frames::{self, L2};
use ctoffload_tests::inject::Injector;
use ctoffload_tests::kernel_router::{
    A_NEIGHBOUR_MAC, B_NEIGHBOUR_MAC, GA_MAC, GB_MAC, KernelRouter,
};
use ctoffload_tests::netns::{self, NetNs};

type Res<T> = Result<T, Box<dyn Error>>;

/// Neighbour MACs G sends to; nobody owns them, so A's and B's stacks drop what G
/// forwards and never answer.
const INSIDE_MAC: [u8; 6] = A_NEIGHBOUR_MAC;
const OUTSIDE_MAC: [u8; 6] = B_NEIGHBOUR_MAC;
const HOST1: [u8; 4] = [10, 0, 1, 2];
const HOST2: [u8; 4] = [10, 0, 1, 3];
const GW_IN: [u8; 4] = [10, 0, 1, 1];
const GW_OUT: [u8; 4] = [10, 0, 2, 1];
const SERVER: [u8; 4] = [10, 0, 2, 2];
const ROUTER: [u8; 4] = [10, 0, 2, 254];

const FROM_INSIDE: L2 = L2 {
    src: INSIDE_MAC,
    dst: GA_MAC,
};
const FROM_OUTSIDE: L2 = L2 {
    src: OUTSIDE_MAC,
    dst: GB_MAC,
};

/// How long to wait for the kernel to forward a frame.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Into `va`; arrives on G's `ga` (our port 1).
    Inside,
    /// Into `vb`; arrives on G's `gb` (our port 2).
    Outside,
}

/// A NAT gateway under test: one frame in, the frame it forwarded (if any) out.
trait Gateway {
    fn send(&mut self, side: Side, frame: &[u8]) -> Res<Option<Vec<u8>>>;
}

// ---------------------------------------------------------------------- the kernel

struct Kernel {
    _gw: NetNs,
    _a: NetNs,
    _b: NetNs,
    inject: [Injector; 2],
    capture: [Capture; 2],
}

const RULES: &str = "table ip natdiff {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"gb\" ip daddr 10.0.2.1 tcp dport 8080 dnat to 10.0.1.2:80
    iifname \"gb\" ip daddr 10.0.2.1 udp dport 5353 dnat to 10.0.1.2:53
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"gb\" masquerade
  }
}
";

impl Kernel {
    fn setup() -> Res<Self> {
        let KernelRouter { gw, a, b } =
            KernelRouter::setup("n", &["10.0.1.2", "10.0.1.3"], &["10.0.2.2", "10.0.2.254"])?;
        gw.nft(RULES)?;
        let inject = [Injector::open(&a, "va")?, Injector::open(&b, "vb")?];
        let capture = [Capture::open(&a, "va")?, Capture::open(&b, "vb")?];
        Ok(Self {
            _gw: gw,
            _a: a,
            _b: b,
            inject,
            capture,
        })
    }
}

impl Gateway for Kernel {
    fn send(&mut self, side: Side, frame: &[u8]) -> Res<Option<Vec<u8>>> {
        let (i, o, gmac) = match side {
            Side::Inside => (0, 1, GB_MAC),
            Side::Outside => (1, 0, GA_MAC),
        };
        self.capture[o].drain()?;
        self.inject[i].send(frame)?;
        // What G sends out of the other side: its MAC as source, IPv4.
        Ok(self.capture[o].next_matching(FORWARD_TIMEOUT, |f| {
            f.len() > 14 && f[6..12] == gmac && f[12..14] == [0x08, 0x00]
        })?)
    }
}

// ---------------------------------------------------------------------- ours

struct Ours {
    ct: Conntrack,
    now: u64,
}

fn prefix32(a: [u8; 4]) -> Prefix {
    Prefix {
        family: Family::V4,
        addr: Addr::v4(a),
        len: 32,
    }
}

/// The rules of [`RULES`] in our terms.
fn our_rules() -> Vec<NatRule> {
    let dnat = |id, proto, from, to| NatRule {
        id,
        r#match: RuleMatch {
            in_port: Some(2),
            dst: Some(prefix32(GW_OUT)),
            proto: Some(proto),
            dport: Some(PortRange::single(from)),
            ..RuleMatch::default()
        },
        action: NatAction::Dnat {
            to_addr: Addr::v4(HOST1),
            to_port: Some(to),
        },
    };
    vec![
        dnat(1, 6, 8080, 80),
        dnat(2, 17, 5353, 53),
        NatRule {
            id: 3,
            r#match: RuleMatch {
                out_port: Some(2),
                ..RuleMatch::default()
            },
            action: NatAction::Masquerade {
                ports: None,
                flags: NatFlags::default(),
            },
        },
    ]
}

impl Ours {
    fn new() -> Self {
        let mut ct = Conntrack::new(Config {
            max_connections: 1024,
            ..Config::default()
        });
        for r in our_rules() {
            ct.nat_mut().rules_mut().add(r).expect("valid rule");
        }
        Self {
            ct,
            now: 1_000_000_000,
        }
    }
}

impl Gateway for Ours {
    fn send(&mut self, side: Side, frame: &[u8]) -> Res<Option<Vec<u8>>> {
        // Single routing table: inside <-> outside; the egress address is what
        // masquerade uses.
        let (meta, src_mac, dst_mac) = match side {
            Side::Inside => (
                PacketMeta {
                    in_port: 1,
                    out_port: Some(2),
                    out_addr: Some(Addr::v4(GW_OUT)),
                },
                GB_MAC,
                OUTSIDE_MAC,
            ),
            Side::Outside => (
                PacketMeta {
                    in_port: 2,
                    out_port: Some(1),
                    out_addr: Some(Addr::v4(GW_IN)),
                },
                GA_MAC,
                INSIDE_MAC,
            ),
        };
        self.now += 1_000_000;
        let mut f = frame.to_vec();
        let v = self.ct.process_mut(&mut f, 0, &meta, self.now);
        if !v.forward() {
            return Ok(None);
        }
        let pkt = wire::parse(&f, ParseOptions::VERIFY_ALL)
            .map_err(|e| format!("our rewritten frame does not verify: {e}"))?;
        if route_rewrite(&mut f, &pkt, src_mac, dst_mac).is_err() {
            return Ok(None);
        }
        Ok(Some(f))
    }
}

// ---------------------------------------------------------------------- checks

/// RFC 1071 one's-complement sum, folded and complemented.
fn ones(data: &[u8], mut acc: u32) -> u16 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !u16::try_from(acc).unwrap_or(0)
}

/// Every checksum of an Ethernet/IPv4 frame verifies (IPv4 header; TCP/UDP with the
/// pseudo-header; ICMP; inside an ICMP error the quoted IPv4 header). Returns what
/// failed.
fn checksum_problems(frame: &[u8]) -> Vec<String> {
    let mut bad = Vec::new();
    let Some(ip) = frame.get(14..) else {
        return vec!["short frame".into()];
    };
    if ip.len() < 20 {
        return vec!["short ip".into()];
    }
    let ihl = usize::from(ip[0] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    if ones(&ip[..ihl], 0) != 0 {
        bad.push("ipv4 header".into());
    }
    let l4 = &ip[ihl..total];
    let mut pseudo = u32::from(ip[9]) + u32::try_from(l4.len()).unwrap_or(0);
    for w in ip[12..20].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    match ip[9] {
        6 if ones(l4, pseudo) != 0 => bad.push("tcp".into()),
        17 if l4.len() >= 8 && l4[6..8] != [0, 0] && ones(l4, pseudo) != 0 => {
            bad.push("udp".into());
        }
        1 => {
            if ones(l4, 0) != 0 {
                bad.push("icmp".into());
            }
            if matches!(l4.first(), Some(3 | 11)) && l4.len() >= 28 {
                let inner = &l4[8..];
                let ihl = usize::from(inner[0] & 0x0F) * 4;
                if inner.len() >= ihl && ones(&inner[..ihl], 0) != 0 {
                    bad.push("quoted ipv4 header".into());
                }
            }
        }
        _ => {}
    }
    bad
}

/// How the two outputs of one input must relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Equal byte for byte.
    Same,
    /// Equal apart from the translated source port (TCP/UDP) or ICMP id and the L4
    /// checksum; the new value must differ from `original`.
    Remapped { original: u16 },
}

struct Obs {
    what: &'static str,
    expect: Expect,
    out: Option<Vec<u8>>,
}

/// Source port or ICMP id, and the offsets of that field and the L4 checksum.
fn nat_key(frame: &[u8]) -> Option<(u16, usize, usize)> {
    let ihl = usize::from(frame.get(14)? & 0x0F) * 4;
    let l4 = 14 + ihl;
    let (key_at, csum_at) = match *frame.get(23)? {
        6 => (l4, l4 + 16),
        17 => (l4, l4 + 6),
        1 => (l4 + 4, l4 + 2),
        _ => return None,
    };
    let k = u16::from_be_bytes([*frame.get(key_at)?, *frame.get(key_at + 1)?]);
    Some((k, key_at, csum_at))
}

fn out_key(o: Option<&Vec<u8>>) -> Res<u16> {
    let f = o.ok_or("the gateway forwarded nothing")?;
    Ok(nat_key(f).ok_or("no port in the forwarded frame")?.0)
}

// ---------------------------------------------------------------------- scenarios

/// Runs every scenario against `gw`, each side answering the translated addresses and
/// ports that `gw` itself chose. Returns one observation per frame sent.
fn scenarios(gw: &mut dyn Gateway) -> Res<Vec<Obs>> {
    let mut obs: Vec<Obs> = Vec::new();
    let mut send = |side, frame: Vec<u8>, what, expect| -> Res<Option<Vec<u8>>> {
        let out = gw.send(side, &frame)?;
        obs.push(Obs {
            what,
            expect,
            out: out.clone(),
        });
        Ok(out)
    };
    let tcp = |l2, src, dst, seq, ack, flags: &str| frames::tcp(l2, src, dst, seq, ack, flags, &[]);

    // 1. Port collision: two inside hosts, same source port, same server.
    let o1 = send(
        Side::Inside,
        tcp(FROM_INSIDE, (HOST1, 41001), (SERVER, 80), 1000, None, "S"),
        "SYN host 1",
        Expect::Same,
    )?;
    let p1 = out_key(o1.as_ref())?;
    let o2 = send(
        Side::Inside,
        tcp(FROM_INSIDE, (HOST2, 41001), (SERVER, 80), 5000, None, "S"),
        "SYN host 2 (same port)",
        Expect::Remapped { original: 41001 },
    )?;
    let p2 = out_key(o2.as_ref())?;
    send(
        Side::Outside,
        tcp(
            FROM_OUTSIDE,
            (SERVER, 80),
            (GW_OUT, p1),
            9000,
            Some(1001),
            "S",
        ),
        "SYN/ACK to host 1",
        Expect::Same,
    )?;
    send(
        Side::Outside,
        tcp(
            FROM_OUTSIDE,
            (SERVER, 80),
            (GW_OUT, p2),
            7000,
            Some(5001),
            "S",
        ),
        "SYN/ACK to host 2",
        Expect::Same,
    )?;
    send(
        Side::Inside,
        tcp(
            FROM_INSIDE,
            (HOST1, 41001),
            (SERVER, 80),
            1001,
            Some(9001),
            "",
        ),
        "ACK host 1",
        Expect::Same,
    )?;
    send(
        Side::Inside,
        tcp(
            FROM_INSIDE,
            (HOST2, 41001),
            (SERVER, 80),
            5001,
            Some(7001),
            "",
        ),
        "ACK host 2",
        Expect::Remapped { original: 41001 },
    )?;
    // 2. A router says host 2's SYN (as it left the gateway) could not be delivered.
    let syn2_out = o2.ok_or("no SYN from host 2")?;
    send(
        Side::Outside,
        frames::icmp_unreachable(FROM_OUTSIDE, ROUTER, GW_OUT, 1, &syn2_out),
        "ICMP host unreachable quoting host 2's translated SYN",
        Expect::Same,
    )?;
    // 3. ICMP echo, same id from both hosts.
    let e1 = send(
        Side::Inside,
        frames::icmp_echo(FROM_INSIDE, HOST1, SERVER, false, 0x4242, 1),
        "echo request host 1",
        Expect::Same,
    )?;
    let id1 = out_key(e1.as_ref())?;
    let e2 = send(
        Side::Inside,
        frames::icmp_echo(FROM_INSIDE, HOST2, SERVER, false, 0x4242, 1),
        "echo request host 2 (same id)",
        Expect::Remapped { original: 0x4242 },
    )?;
    let id2 = out_key(e2.as_ref())?;
    send(
        Side::Outside,
        frames::icmp_echo(FROM_OUTSIDE, SERVER, GW_OUT, true, id1, 1),
        "echo reply to host 1",
        Expect::Same,
    )?;
    send(
        Side::Outside,
        frames::icmp_echo(FROM_OUTSIDE, SERVER, GW_OUT, true, id2, 1),
        "echo reply to host 2",
        Expect::Same,
    )?;
    // 4. UDP from host 2 (port clash with nothing) and a port unreachable about it.
    let u = send(
        Side::Inside,
        frames::udp(FROM_INSIDE, (HOST2, 42001), (SERVER, 33434), b"probe"),
        "UDP probe host 2",
        Expect::Same,
    )?;
    let u = u.ok_or("no UDP probe")?;
    send(
        Side::Outside,
        frames::icmp_unreachable(FROM_OUTSIDE, SERVER, GW_OUT, 3, &u),
        "ICMP port unreachable quoting the translated probe",
        Expect::Same,
    )?;
    // 5. DNAT port forward: TCP handshake and a UDP exchange from outside.
    send(
        Side::Outside,
        tcp(
            FROM_OUTSIDE,
            (SERVER, 50000),
            (GW_OUT, 8080),
            100,
            None,
            "S",
        ),
        "SYN to the forwarded port",
        Expect::Same,
    )?;
    send(
        Side::Inside,
        tcp(
            FROM_INSIDE,
            (HOST1, 80),
            (SERVER, 50000),
            800,
            Some(101),
            "S",
        ),
        "SYN/ACK from the inside server",
        Expect::Same,
    )?;
    send(
        Side::Outside,
        tcp(
            FROM_OUTSIDE,
            (SERVER, 50000),
            (GW_OUT, 8080),
            101,
            Some(801),
            "",
        ),
        "ACK to the forwarded port",
        Expect::Same,
    )?;
    let q = send(
        Side::Outside,
        frames::udp(FROM_OUTSIDE, (SERVER, 50001), (GW_OUT, 5353), b"query"),
        "UDP to the forwarded port",
        Expect::Same,
    )?;
    send(
        Side::Inside,
        frames::udp(FROM_INSIDE, (HOST1, 53), (SERVER, 50001), b"answer"),
        "UDP answer from the inside server",
        Expect::Same,
    )?;
    // 6. The inside server says "port unreachable" about the forwarded query.
    let q = q.ok_or("no forwarded query")?;
    send(
        Side::Inside,
        frames::icmp_unreachable(FROM_INSIDE, HOST1, SERVER, 3, &q),
        "ICMP port unreachable from the inside server quoting a forwarded query",
        Expect::Same,
    )?;
    Ok(obs)
}

/// Compares the kernel's observations with ours; returns the mismatches.
fn compare(kernel: &[Obs], ours: &[Obs]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut seen_keys: Vec<(&'static str, u16, u16)> = Vec::new();
    for (k, o) in kernel.iter().zip(ours) {
        let what = k.what;
        let (kf, of) = match (&k.out, &o.out) {
            (None, None) => continue,
            (Some(kf), Some(of)) => (kf, of),
            (kf, of) => {
                bad.push(format!(
                    "{what}: kernel forwarded {}, we forwarded {}",
                    kf.is_some(),
                    of.is_some()
                ));
                continue;
            }
        };
        for (who, f) in [("kernel", kf), ("ours", of)] {
            for p in checksum_problems(f) {
                bad.push(format!("{what}: {who} output has a bad {p} checksum"));
            }
        }
        match k.expect {
            Expect::Same => {
                if kf != of {
                    bad.push(format!(
                        "{what}: outputs differ\n  kernel {kf:02x?}\n  ours   {of:02x?}"
                    ));
                }
            }
            Expect::Remapped { original } => {
                let (Some((kk, at, csum)), Some((ok, ..))) = (nat_key(kf), nat_key(of)) else {
                    bad.push(format!("{what}: no port or id"));
                    continue;
                };
                for (who, key) in [("kernel", kk), ("ours", ok)] {
                    if key == original {
                        bad.push(format!("{what}: {who} kept the clashing {original}"));
                    }
                    // ICMP ids may be any value; ports stay in the original's class.
                    if kf[23] != 1 && key < 1024 {
                        bad.push(format!("{what}: {who} port {key} outside 1024-65535"));
                    }
                }
                seen_keys.push((what, kk, ok));
                let mask = |f: &[u8]| {
                    let mut f = f.to_vec();
                    f[at..at + 2].fill(0);
                    f[csum..csum + 2].fill(0);
                    f
                };
                if kf.len() != of.len() || mask(kf) != mask(of) {
                    bad.push(format!(
                        "{what}: outputs differ beyond the remapped port\n  kernel {kf:02x?}\n  ours   {of:02x?}"
                    ));
                }
            }
        }
    }
    // The same connection's packets keep their remapped port (the SYN and the ACK of
    // host 2), on both sides.
    let syn = seen_keys.iter().find(|k| k.0.starts_with("SYN host 2"));
    let ack = seen_keys.iter().find(|k| k.0.starts_with("ACK host 2"));
    if let (Some(s), Some(a)) = (syn, ack)
        && (s.1 != a.1 || s.2 != a.2)
    {
        bad.push(format!(
            "host 2's port changed within its connection: {s:?} {a:?}"
        ));
    }
    bad
}

#[test]
fn kernel_and_software_nat_agree() {
    if let Some(why) = netns::skip_reason(&["ip", "nft"]) {
        let required = std::env::var_os("CTOFFLOAD_REQUIRE_NETNS").is_some()
            || (std::env::var_os("CI").is_some() && netns::is_root());
        assert!(
            !required,
            "the NAT differential test must run here (CI as root, or CTOFFLOAD_REQUIRE_NETNS) but cannot: {why}"
        );
        eprintln!("SKIP differential_nat: {why}");
        return;
    }
    let started = Instant::now();
    let mut kernel = match Kernel::setup() {
        Ok(k) => k,
        Err(e) => panic!("cannot set up the namespaces: {e}"),
    };
    let k = match scenarios(&mut kernel) {
        Ok(k) => k,
        Err(e) => panic!("kernel side: {e}"),
    };
    let mut ours = Ours::new();
    let o = match scenarios(&mut ours) {
        Ok(o) => o,
        Err(e) => panic!("our side: {e}"),
    };
    assert_eq!(k.len(), o.len());
    let key = |x: &Obs| x.out.as_deref().and_then(nat_key).map(|k| k.0);
    for (k, o) in k.iter().zip(&o) {
        eprintln!(
            "{:<72} kernel {:>3} B port/id {:>5?}  ours {:>3} B port/id {:>5?}",
            k.what,
            k.out.as_ref().map_or(0, Vec::len),
            key(k),
            o.out.as_ref().map_or(0, Vec::len),
            key(o),
        );
    }
    let mut mismatches = compare(&k, &o);
    // The first host keeps its port and id, and leaves with the gateway's address.
    for obs in [&k, &o] {
        for (what, want) in [("SYN host 1", 41001), ("echo request host 1", 0x4242)] {
            let x = obs.iter().find(|x| x.what == what).expect("observed");
            let f = x.out.as_deref().unwrap_or_default();
            if key(x) != Some(want) || f.get(26..30) != Some(&GW_OUT[..]) {
                mismatches.push(format!("{what}: not masqueraded keeping {want}: {f:02x?}"));
            }
        }
    }
    // Reply tuples stay unique in our table.
    let mut seen = std::collections::HashSet::new();
    for (_, c) in ours.ct.table().iter(ours.now) {
        for t in &c.tuples {
            assert!(seen.insert(*t), "tuple {t} held twice");
        }
    }
    eprintln!(
        "differential_nat: {} frames in {:.1} s, {} mismatches",
        k.len(),
        started.elapsed().as_secs_f64(),
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "kernel and software NAT disagree:\n{}",
        mismatches.join("\n")
    );
}
