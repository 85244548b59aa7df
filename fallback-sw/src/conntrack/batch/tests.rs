//! `process_batch` gives exactly what `process` gives, frame by frame.

use super::super::{Config, Conntrack, NatOutcome, NatVerdict, Verdict};
use crate::nat::rules::{AddrRange, NatAction, NatFlags, NatRule, RuleMatch};
use crate::table::Event;
use etherparse::{Icmpv4Type, PacketBuilder, TcpOptionElement, icmpv4::DestUnreachableHeader};
use proptest::prelude::*;

const NS: u64 = 1_000_000_000;
const CMAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SMAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn client(i: u8) -> [u8; 4] {
    [10, 0, 0, i]
}
const SERVER: [u8; 4] = [192, 0, 2, 1];

/// One frame of a small universe of connections: kind selects what, `c` which client.
fn frame(kind: u8, c: u8, n: u32) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(CMAC, SMAC);
    let sport = 1000 + u16::from(c % 4);
    match kind % 9 {
        0 => b
            .ipv4(client(c), SERVER, 64)
            .udp(sport, 53)
            .write(&mut v, &[1, 2, 3]),
        1 => b
            .ipv4(SERVER, client(c), 64)
            .udp(53, sport)
            .write(&mut v, &[4, 5]),
        2 => b
            .ipv4(client(c), SERVER, 64)
            .tcp(sport, 80, 1000, 64240)
            .syn()
            .write(&mut v, &[]),
        3 => b
            .ipv4(SERVER, client(c), 64)
            .tcp(80, sport, 5000, 64240)
            .syn()
            .ack(1001)
            .write(&mut v, &[]),
        4 => b
            .ipv4(client(c), SERVER, 64)
            .tcp(sport, 80, 1001, 64240)
            .ack(5001)
            .write(&mut v, &[]),
        5 => b
            .ipv4(client(c), SERVER, 64)
            .tcp(sport, 80, 1001, 64240)
            .rst()
            .write(&mut v, &[]),
        6 => {
            // An ICMP error quoting the UDP flow's original packet.
            let mut quoted = Vec::new();
            PacketBuilder::ipv4(client(c), SERVER, 64)
                .udp(sport, 53)
                .write(&mut quoted, &[1, 2, 3])
                .expect("quote");
            b.ipv4(SERVER, client(c), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::Port,
                ))
                .write(&mut v, &quoted)
        }
        7 => b
            .ipv4(client(c), SERVER, 64)
            .icmpv4_echo_request(7, u16::try_from(n & 0xFF).unwrap_or(0))
            .write(&mut v, &[]),
        _ => {
            // A UDP frame with a broken checksum, or a non-IP frame.
            b.ipv4(client(c), SERVER, 64)
                .udp(sport, 53)
                .write(&mut v, &[9])
                .expect("udp");
            if n % 2 == 0 {
                let last = v.len() - 1;
                v[last] ^= 0xFF;
            } else {
                v[12] = 0x08;
                v[13] = 0x06;
            }
            return v;
        }
    }
    .expect("build");
    v
}

/// A small table (early drop and table-full happen) or one large enough that the batch
/// runs its prefetch passes.
fn ct(big: bool) -> Conntrack {
    Conntrack::new(Config {
        max_connections: if big { 5000 } else { 6 },
        event_capacity: 10_000,
        ..Config::default()
    })
}

/// `frames` (frame `i` arriving at `times[i]`) through `process` one by one, and
/// through `process_batch` in batches of `cut` (each at its first frame's time, which
/// the callers keep the same within a batch): both instances, and both verdict lists.
fn one_by_one_and_batched(
    frames: &[Vec<u8>],
    times: &[u64],
    cut: usize,
    big: bool,
) -> ([Conntrack; 2], [Vec<Verdict>; 2]) {
    let mut one = ct(big);
    let want = frames
        .iter()
        .zip(times)
        .map(|(f, &t)| one.process(f, 0, t))
        .collect();
    let mut many = ct(big);
    let mut got = Vec::new();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    for (chunk, t) in refs.chunks(cut).zip(times.chunks(cut)) {
        let mut out = vec![Verdict::Untracked(super::super::Untracked::Fragment); chunk.len()];
        many.process_batch(chunk, 0, t[0], &mut out);
        got.extend(out);
    }
    ([one, many], [want, got])
}

proptest! {
    #[test]
    fn batch_equals_one_by_one(
        ops in proptest::collection::vec((0u8..9, 0u8..10, 0u64..3), 1..200),
        cut in 1usize..40,
        big in any::<bool>(),
    ) {
        let mut now = NS;
        let mut frames = Vec::new();
        let mut times = Vec::new();
        for (i, &(kind, c, dt)) in ops.iter().enumerate() {
            // Time advances between batches only (a batch has one `now`).
            if i % cut == 0 {
                now += dt * 20 * NS;
            }
            frames.push(frame(kind, c, u32::try_from(i).unwrap_or(0)));
            times.push(now);
        }
        let ([mut one, mut many], [want, got]) = one_by_one_and_batched(&frames, &times, cut, big);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(many.stats(), one.stats());
        prop_assert_eq!(many.table().stats(), one.table().stats());
        let a: Vec<Event> = one.table_mut().drain_events().collect();
        let b: Vec<Event> = many.table_mut().drain_events().collect();
        prop_assert_eq!(a, b);
    }
}

// ------------------------------------------------- the established path of the batch

/// One packet of [`mixed_frame`]: which connection, which direction, what it carries
/// and how it is damaged.
#[derive(Debug, Clone, Copy)]
struct Op {
    tcp: bool,
    reply: bool,
    client: u8,
    flags: u8,
    seq: u8,
    ack: u8,
    payload: u8,
    options: bool,
    damage: u8,
}

fn op() -> impl Strategy<Value = Op> {
    (
        any::<bool>(),
        any::<bool>(),
        0u8..6,
        crate::tcp::tests::flags_strategy(),
        any::<u8>(),
        any::<u8>(),
        0u8..40,
        any::<bool>(),
        // 0..8: intact; the rest one kind of damage each.
        0u8..18,
    )
        .prop_map(
            |(tcp, reply, client, flags, seq, ack, payload, options, damage)| Op {
                tcp,
                reply,
                client,
                flags,
                seq,
                ack,
                payload,
                options,
                damage,
            },
        )
}

/// A sequence or acknowledgement number near where client `c`'s connection is (its
/// ISN 1000 + 100 c, the server's 5000 + 100 c) in direction `from_client`, or anywhere.
fn seq_no(sel: u8, c: u8, from_client: bool) -> u32 {
    let base = if from_client { 1000 } else { 5000 } + 100 * u32::from(c);
    match sel % 8 {
        0 => base,
        1..=4 => base + 1 + u32::from(sel % 4) * 10,
        5 => base.wrapping_sub(70_000),
        _ => u32::from(sel) << 24 | 0x5a5a,
    }
}

/// Sets the IPv4 header checksum of an untagged frame's IP header (its length from
/// the IHL), after damage that must not be caught by it.
fn fix_ipv4_checksum(f: &mut [u8]) {
    let end = 14 + usize::from(f[14] & 0x0F) * 4;
    f[24] = 0;
    f[25] = 0;
    let mut acc = 0u32;
    for w in f[14..end].chunks(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    let c = !u16::try_from(acc).unwrap_or(0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// A TCP or UDP frame of one of a few connections, intact or damaged in one of the
/// ways the established path must leave to the general one (or reject the same way).
/// Replies go to the client, or to `public` (the address its connections are
/// translated to).
fn mixed_frame(o: Op, public: Option<[u8; 4]>) -> Vec<u8> {
    let c = o.client;
    let (src, dst, sport, dport) = if o.reply {
        (SERVER, public.unwrap_or(client(c)), 80, 1000 + u16::from(c))
    } else {
        (client(c), SERVER, 1000 + u16::from(c), 80)
    };
    let payload = vec![0xA5u8; usize::from(o.payload)];
    let b = PacketBuilder::ethernet2(CMAC, SMAC).ipv4(src, dst, 64);
    let mut v = Vec::new();
    if o.tcp {
        let mut t = b.tcp(
            sport,
            dport,
            seq_no(o.seq, c, !o.reply),
            u16::from(o.ack) << 8 | 0xFF,
        );
        if o.flags & 0x01 != 0 {
            t = t.fin();
        }
        if o.flags & 0x02 != 0 {
            t = t.syn();
        }
        if o.flags & 0x04 != 0 {
            t = t.rst();
        }
        if o.flags & 0x08 != 0 {
            t = t.psh();
        }
        if o.flags & 0x10 != 0 {
            t = t.ack(seq_no(o.ack, c, o.reply));
        }
        if o.flags & 0x20 != 0 {
            t = t.urg(0);
        }
        if o.options {
            t = t
                .options(&[
                    TcpOptionElement::MaximumSegmentSize(1460),
                    TcpOptionElement::WindowScale(o.seq % 16),
                    TcpOptionElement::SelectiveAcknowledgementPermitted,
                    TcpOptionElement::Timestamp(7, 9),
                ])
                .expect("options fit");
        }
        t.write(&mut v, &payload).expect("tcp");
    } else {
        b.udp(sport, dport).write(&mut v, &payload).expect("udp");
    }
    let l4 = 34;
    match o.damage {
        8 => v[25] ^= 0x40,                              // IPv4 header checksum
        9 => v[l4 + if o.tcp { 16 } else { 6 }] ^= 0x01, // L4 checksum
        10 if !o.tcp => v[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]), // no UDP checksum
        10 => v.truncate(l4 + 10),                       // TCP header cut
        11 => {
            // An 802.1Q tag.
            v.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        }
        12 => {
            // More fragments follow.
            v[20] |= 0x20;
            fix_ipv4_checksum(&mut v);
        }
        13 => v.truncate(40),
        14 => {
            // IP total length past the frame.
            v[17] = v[17].wrapping_add(4);
            fix_ipv4_checksum(&mut v);
        }
        15 => v.extend_from_slice(&[0u8; 12]), // link padding
        16 if !o.tcp => v[l4 + 5] = v[l4 + 5].wrapping_add(3), // UDP length field
        16 => v[l4 + 12] = 0x40 | (v[l4 + 12] & 0x0F), // TCP data offset 4
        17 => {
            // IP options (the checksum still right): not the one-step frame.
            v[14] = 0x46;
            v.splice(34..34, [1u8, 1, 1, 1]);
            let total = u16::from_be_bytes([v[16], v[17]]) + 4;
            v[16..18].copy_from_slice(&total.to_be_bytes());
            fix_ipv4_checksum(&mut v);
        }
        _ => {}
    }
    v
}

/// Everything observable of an instance: counters, table counters, events, and every
/// connection (tuples, status, timeout, counters, protocol and window state, id).
fn observable(ct: &mut Conntrack, now: u64) -> (String, Vec<Event>) {
    let mut s = format!("{:?}\n{:?}\n", ct.stats(), ct.table().stats());
    let conns: Vec<_> = ct.table().iter(now).collect();
    for (slot, conn) in conns {
        s += &format!("{slot:?} {conn:?} {:?}\n", ct.tcp(slot));
    }
    let events = ct.table_mut().drain_events().collect();
    (s, events)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The batch's established path (plain IPv4 TCP and UDP frames, packed tuple,
    /// two-word lookup) gives exactly what the general path of `process` gives: the
    /// same verdicts, counters, events and connections, with TCP state and window
    /// tracking, expiry, early drop and damaged frames in the mix.
    #[test]
    fn established_path_equals_general_path(
        ops in proptest::collection::vec(op(), 1..300),
        cut in 1usize..40,
        steps in proptest::collection::vec(0u64..4, 1..16),
        big in any::<bool>(),
    ) {
        let mut now = NS;
        let mut frames = Vec::new();
        let mut times = Vec::new();
        for (i, &o) in ops.iter().enumerate() {
            // Time advances between batches only (a batch has one `now`), sometimes
            // past the UDP timeouts.
            if i % cut == 0 {
                now += steps[(i / cut) % steps.len()] * 11 * NS;
            }
            frames.push(mixed_frame(o, None));
            times.push(now);
        }
        let ([mut one, mut many], [want, got]) = one_by_one_and_batched(&frames, &times, cut, big);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(observable(&mut many, now), observable(&mut one, now));
    }
}

// ------------------------------------------------ the established path with NAT

/// The address the clients' connections are translated to.
const PUBLIC: [u8; 4] = [198, 51, 100, 7];

/// [`ct`] with one rule: connections from 10.0.0.0/8 leave from [`PUBLIC`] (the
/// client's port kept while free, as Linux does).
fn snat_ct(big: bool) -> Conntrack {
    let mut c = ct(big);
    let rule = NatRule {
        id: 1,
        r#match: RuleMatch {
            src: Some(crate::nat::tests::prefix([10, 0, 0, 0], 8)),
            ..RuleMatch::default()
        },
        action: NatAction::Snat {
            addrs: AddrRange::single_v4(PUBLIC),
            ports: None,
            flags: NatFlags::default(),
        },
    };
    c.nat_mut().rules_mut().add(rule).expect("valid rule");
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// With a SNAT rule, `process_batch_mut` (the established path, translated
    /// connections found and rewritten from their packed tuples) gives exactly what
    /// `process_mut` gives frame by frame: verdicts, NAT outcomes, the rewritten
    /// bytes, counters, events and connections.
    #[test]
    fn established_path_with_nat_equals_general_path(
        ops in proptest::collection::vec(op(), 1..300),
        cut in 1usize..40,
        steps in proptest::collection::vec(0u64..4, 1..16),
        big in any::<bool>(),
    ) {
        // Routed out of port 2: SNAT is decided on the way out (postrouting).
        let meta = crate::nat::tests::out_meta();
        let mut now = NS;
        let mut frames = Vec::new();
        let mut times = Vec::new();
        // A UDP exchange first, so that every case translates both directions.
        let intact = Op {
            tcp: false,
            reply: false,
            client: 0,
            flags: 0,
            seq: 0,
            ack: 0,
            payload: 4,
            options: false,
            damage: 0,
        };
        let first = [intact, Op { reply: true, ..intact }];
        let ops: Vec<Op> = first.into_iter().chain(ops).collect();
        for (i, &o) in ops.iter().enumerate() {
            // (Not between the first exchange's two packets: its reply must find it.)
            if i % cut == 0 && i != 1 {
                now += steps[(i / cut) % steps.len()] * 11 * NS;
            }
            frames.push(mixed_frame(o, Some(PUBLIC)));
            times.push(now);
        }
        let mut one = snat_ct(big);
        let mut want_frames = frames.clone();
        let want: Vec<NatVerdict> = want_frames
            .iter_mut()
            .zip(&times)
            .map(|(f, &t)| one.process_mut(f, 0, &meta, t))
            .collect();
        let mut many = snat_ct(big);
        let mut got_frames = frames;
        let mut got = Vec::new();
        for (chunk, t) in got_frames.chunks_mut(cut).zip(times.chunks(cut)) {
            let mut refs: Vec<&mut [u8]> = chunk.iter_mut().map(Vec::as_mut_slice).collect();
            let mut out = vec![
                NatVerdict {
                    verdict: Verdict::Untracked(super::super::Untracked::Fragment),
                    nat: NatOutcome::Unchanged,
                };
                refs.len()
            ];
            many.process_batch_mut(&mut refs, 0, &meta, t[0], &mut out);
            got.extend(out);
        }
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(&got_frames, &want_frames);
        prop_assert_eq!(want[1].nat, NatOutcome::Rewritten, "the reply is translated");
        prop_assert_eq!(observable(&mut many, now), observable(&mut one, now));
    }
}

proptest! {
    /// A UDP datagram's pass-1 record (`Pre::Udp`) rebuilds exactly the `PlainV4` that
    /// `plain_v4` read: with a UDP length shorter than the IP payload, and Ethernet
    /// padding after the IP packet, too.
    #[test]
    fn udp_record_rebuilds_the_plain_frame(
        ports in any::<(u16, u16)>(),
        ttl in any::<u8>(),
        payload in proptest::collection::vec(any::<u8>(), 0..40),
        beyond in 0usize..4,
        padding in 0usize..8,
        zone in any::<u16>(),
    ) {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(CMAC, SMAC)
            .ipv4(client(1), SERVER, ttl)
            .udp(ports.0, ports.1)
            .write(&mut f, &payload)
            .expect("frame");
        // Bytes in the IP packet after the datagram: the IP total length grows.
        f.extend(std::iter::repeat_n(0xA5, beyond));
        let total = u16::from_be_bytes([f[16], f[17]]) + u16::try_from(beyond).unwrap_or(0);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        fix_ipv4_checksum(&mut f);
        f.extend(std::iter::repeat_n(0, padding));
        let read = crate::wire::plain_v4(&f, crate::wire::ParseOptions::VERIFY_ALL);
        let Some(Ok(read)) = read else {
            panic!("a plain UDP frame: {read:?}");
        };
        let mut ct = Conntrack::new(Config::default());
        let mut pre = super::Pre::Done;
        let mut out = Verdict::Untracked(super::super::Untracked::Fragment);
        prop_assert!(!ct.classify_frame(&f, zone, &mut pre, &mut out));
        let super::Pre::Udp(u) = pre else {
            panic!("not the UDP record");
        };
        prop_assert_eq!(u.plain(), read);
        prop_assert_eq!(u.ports(), ports);
    }
}

// ------------------------------------------ the UDP refresh of the established path

/// The established path's UDP refresh (`existing_udp`) on the status bits and counters
/// the proptests do not reach (FIXED_TIMEOUT, NAT_CLASH, low counters about to pass
/// 2^32 - 1), before and after the entry becomes a stream: the same verdicts,
/// connections and events as the general path's `existing`.
#[test]
fn udp_refresh_equals_general_path_on_rare_bits() {
    use crate::table::Status;
    let udp = |reply: bool, payload: u8| {
        mixed_frame(
            Op {
                tcp: false,
                reply,
                client: 1,
                flags: 0,
                seq: 0,
                ack: 0,
                payload,
                options: false,
                damage: 0,
            },
            None,
        )
    };
    for tweak in 0..4 {
        for big in [false, true] {
            let mut one = ct(big);
            let mut many = ct(big);
            for c in [&mut one, &mut many] {
                let Verdict::Tracked { slot, dir, .. } = c.process(&udp(false, 5), 0, NS) else {
                    panic!("the first datagram creates its connection");
                };
                let table = c.table_mut();
                match tweak {
                    0 => {}
                    1 | 2 => {
                        let bit = if tweak == 1 {
                            Status::FIXED_TIMEOUT
                        } else {
                            Status::NAT_CLASH
                        };
                        table.get_mut(slot).expect("entry").status.insert(bit);
                    }
                    _ => table.count(slot, dir, 0, u64::from(u32::MAX) - 100),
                }
            }
            let mut now = NS;
            for (i, reply) in [true, false, true, true, false, false, true]
                .into_iter()
                .enumerate()
            {
                now += 2 * NS;
                let f = udp(reply, u8::try_from(i).unwrap_or(0) * 7);
                let want = one.process(&f, 0, now);
                let mut got = [Verdict::Untracked(super::super::Untracked::Fragment)];
                many.process_batch(&[&f], 0, now, &mut got);
                assert_eq!(got[0], want, "tweak {tweak} big {big} packet {i}");
            }
            assert_eq!(
                observable(&mut many, now),
                observable(&mut one, now),
                "tweak {tweak}"
            );
        }
    }
}
