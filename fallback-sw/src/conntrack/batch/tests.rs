//! `process_batch` gives exactly what `process` gives, frame by frame.

use super::super::{Config, Conntrack, Verdict};
use crate::table::Event;
use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
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
        let mut one = ct(big);
        let mut want = Vec::new();
        for (f, &t) in frames.iter().zip(&times) {
            want.push(one.process(f, 0, t));
        }
        let mut many = ct(big);
        let mut got = Vec::new();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        for (chunk, t) in refs.chunks(cut).zip(times.chunks(cut)) {
            let mut out = vec![Verdict::Untracked(super::super::Untracked::Fragment); chunk.len()];
            many.process_batch(chunk, 0, t[0], &mut out);
            got.extend(out);
        }
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(many.stats(), one.stats());
        prop_assert_eq!(many.table().stats(), one.table().stats());
        let a: Vec<Event> = one.table_mut().drain_events().collect();
        let b: Vec<Event> = many.table_mut().drain_events().collect();
        prop_assert_eq!(a, b);
    }
}
