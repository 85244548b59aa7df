//! Datapath: hits with every action (checked byte for byte against frames built
//! independently by etherparse, checksums included), punts, RX and TX rings.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ctoffload_hw_regs::regs;
use ctoffload_hw_regs::{
    CommandDescriptor, FlowAction, FlowKey, Iova, L4Proto, RxReason, TxDescriptor, TxError,
};
use ctoffload_nic_sim::SimConfig;
use etherparse::PacketBuilder;

const SMAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const DMAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

#[derive(Clone, Copy)]
enum P {
    Udp,
    Tcp(u8),
    EchoReq,
}

#[derive(Clone, Copy)]
struct F {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    p: P,
}

fn base(p: P) -> F {
    F {
        smac: SMAC,
        dmac: DMAC,
        src: [10, 0, 0, 1],
        dst: [10, 0, 0, 2],
        ttl: 64,
        sport: 1000,
        dport: 2000,
        p,
    }
}

/// Builds a frame with etherparse (checksums computed from scratch), at least 64 bytes.
fn build(f: &F) -> Vec<u8> {
    let payload = [0x5Au8; 26];
    let ip = PacketBuilder::ethernet2(f.smac, f.dmac).ipv4(f.src, f.dst, f.ttl);
    let mut out = Vec::new();
    match f.p {
        P::Udp => ip.udp(f.sport, f.dport).write(&mut out, &payload).unwrap(),
        P::Tcp(flags) => {
            let mut t = ip.tcp(f.sport, f.dport, 1234, 4096);
            if flags & 2 != 0 {
                t = t.syn();
            }
            if flags & 1 != 0 {
                t = t.fin();
            }
            if flags & 4 != 0 {
                t = t.rst();
            }
            if flags & 0x10 != 0 {
                t = t.ack(5);
            }
            t.write(&mut out, &payload).unwrap();
        }
        P::EchoReq => ip
            .icmpv4_echo_request(f.sport, 7)
            .write(&mut out, &payload)
            .unwrap(),
    }
    out
}

fn key_of(f: &F, port: u8) -> FlowKey {
    let (proto, dport) = match f.p {
        P::Udp => (L4Proto::Udp, f.dport),
        P::Tcp(_) => (L4Proto::Tcp, f.dport),
        P::EchoReq => (L4Proto::Icmp, 0x0800),
    };
    FlowKey::ipv4(port, proto, 0, f.src.into(), f.sport, f.dst.into(), dport)
}

/// Installs `action` for `f`, sends `f`, returns what left `out_port`.
fn forward(h: &mut Host, f: &F, action: &FlowAction) -> Vec<u8> {
    let c = h.insert(&key_of(f, 0), action);
    assert_eq!(c.status().unwrap(), ctoffload_hw_regs::CompletionStatus::Ok);
    h.inject(0, &build(f));
    h.poll();
    let out = h.out(action.out_port);
    assert_eq!(out.len(), 1, "one frame forwarded");
    out.into_iter().next().unwrap()
}

#[test]
fn every_rewrite_action_matches_an_independent_build() {
    let new_smac = [0xAA, 1, 2, 3, 4, 5];
    let new_dmac = [0xBB, 1, 2, 3, 4, 5];
    for p in [P::Udp, P::Tcp(0x10), P::EchoReq] {
        let f = base(p);
        // MAC rewrite + out port 1.
        let mut h = Host::up(SimConfig::small());
        let a = FlowAction::forward(1)
            .with_src_mac(new_smac)
            .with_dst_mac(new_dmac);
        let want = build(&F {
            smac: new_smac,
            dmac: new_dmac,
            ..f
        });
        assert_eq!(forward(&mut h, &f, &a), want, "MAC rewrite");

        // TTL decrement.
        let mut h = Host::up(SimConfig::small());
        let a = FlowAction::forward(0).with_dec_ttl();
        assert_eq!(
            forward(&mut h, &f, &a),
            build(&F { ttl: 63, ..f }),
            "DEC_TTL"
        );

        // SNAT.
        let mut h = Host::up(SimConfig::small());
        let a = FlowAction::forward(1).with_snat([192, 0, 2, 7].into(), 40000);
        let want = build(&F {
            src: [192, 0, 2, 7],
            sport: 40000,
            ..f
        });
        assert_eq!(forward(&mut h, &f, &a), want, "SNAT");

        // DNAT.
        let mut h = Host::up(SimConfig::small());
        let id = if matches!(p, P::EchoReq) { f.sport } else { 0 };
        let dport = if matches!(p, P::EchoReq) { 555 } else { 8080 };
        let a = FlowAction::forward(1).with_dnat([198, 51, 100, 9].into(), dport);
        let want = if matches!(p, P::EchoReq) {
            let _ = id;
            build(&F {
                dst: [198, 51, 100, 9],
                sport: dport,
                ..f
            })
        } else {
            build(&F {
                dst: [198, 51, 100, 9],
                dport,
                ..f
            })
        };
        assert_eq!(forward(&mut h, &f, &a), want, "DNAT");

        // Both, with TTL and MACs.
        let mut h = Host::up(SimConfig::small());
        let echo = matches!(p, P::EchoReq);
        let (sp, dp) = if echo { (777, 777) } else { (41000, 9090) };
        let a = FlowAction::forward(1)
            .with_src_mac(new_smac)
            .with_dec_ttl()
            .with_snat([192, 0, 2, 1].into(), sp)
            .with_dnat([198, 51, 100, 1].into(), dp);
        let want = build(&F {
            smac: new_smac,
            src: [192, 0, 2, 1],
            dst: [198, 51, 100, 1],
            ttl: 63,
            sport: sp,
            dport: if echo { f.dport } else { dp },
            ..f
        });
        assert_eq!(forward(&mut h, &f, &a), want, "SNAT+DNAT");
    }
}

#[test]
fn udp_zero_checksum_stays_zero_and_drop_counts() {
    let mut h = Host::up(SimConfig::small());
    let f = base(P::Udp);
    let mut frame = build(&f);
    frame[40] = 0;
    frame[41] = 0;
    h.insert(
        &key_of(&f, 0),
        &FlowAction::forward(1).with_snat([1, 2, 3, 4].into(), 9),
    );
    h.inject(0, &frame);
    h.poll();
    let out = h.out(1).remove(0);
    assert_eq!(&out[40..42], &[0, 0]);

    let mut h = Host::up(SimConfig::small());
    let k = key_of(&f, 0);
    h.insert(&k, &FlowAction::discard());
    h.inject(0, &build(&f));
    h.poll();
    assert!(h.out(0).is_empty() && h.out(1).is_empty());
    assert!(h.reap_rx().is_empty());
    let c = h.cmd(CommandDescriptor::flow_query(1, &k));
    assert_eq!(c.count.get(), 1, "DROP counts");
    assert_eq!(h.rd(regs::STAT_HIT), 1);
}

#[test]
fn counters_last_hit_and_wrap() {
    let mut h = Host::up(SimConfig::small());
    let f = base(P::Udp);
    let k = key_of(&f, 0);
    let id = h.insert(&k, &FlowAction::forward(1)).flow_id().unwrap();
    let frame = build(&f);
    let len = u64::try_from(frame.len()).unwrap();
    for _ in 0..3 {
        h.inject(0, &frame);
    }
    h.poll();
    let t = h.now;
    let c = h.cmd(CommandDescriptor::flow_query(1, &k));
    assert_eq!(
        (c.count.get(), c.value0.get(), c.value1.get()),
        (3, 3 * len, t)
    );
    assert_eq!(h.rd(regs::STAT_WIRE_RX), 3);
    assert_eq!(h.rd(regs::STAT_HIT), 3);
    // Wrap both counters on the next hit.
    h.sim.faults().counter_wrap_soon(id.get());
    h.poll();
    h.inject(0, &frame);
    h.poll();
    let c = h.cmd(CommandDescriptor::flow_query(2, &k));
    assert_eq!(c.count.get(), 0, "packets wrapped at 2^32");
    assert_eq!(c.value0.get(), len - 1, "bytes wrapped at 2^48");
    // Preload near the wrap and cross it with several packets.
    h.sim
        .faults()
        .preload_counters(id.get(), u32::MAX - 1, (1 << 48) - len);
    h.poll();
    for _ in 0..3 {
        h.inject(0, &frame);
    }
    h.poll();
    let c = h.cmd(CommandDescriptor::flow_query(3, &k));
    assert_eq!(c.count.get(), 1);
    assert_eq!(c.value0.get(), 2 * len);
}

fn punt_one(h: &mut Host, frame: &[u8]) -> (ctoffload_hw_regs::RxDescriptor, Vec<u8>) {
    h.inject(0, frame);
    h.poll();
    let mut r = h.reap_rx();
    assert_eq!(r.len(), 1, "one punt");
    let (d, got) = r.remove(0);
    assert_eq!(got, frame, "punted unmodified");
    assert_eq!(d.port, 0);
    assert_eq!(usize::from(d.pkt_len.get()), frame.len());
    assert_eq!(d.timestamp.get(), h.now);
    (d, got)
}

#[test]
fn punt_reasons() {
    let mut h = Host::up(SimConfig::small());
    h.drain_irqs();
    let f = base(P::Udp);
    let (d, _) = punt_one(&mut h, &build(&f));
    assert_eq!(d.reason().unwrap(), RxReason::Miss);
    assert_eq!(d.flow_id(), None);
    assert_eq!(h.irq(1), Some(1), "RX on vector 1");

    // TCP control flags with PUNT_TCP_CTRL: SYN, FIN, RST each.
    let t = base(P::Tcp(0x10));
    let id = h
        .insert(&key_of(&t, 0), &FlowAction::forward(1).with_punt_tcp_ctrl())
        .flow_id()
        .unwrap();
    for flags in [0x02, 0x01, 0x04] {
        let (d, _) = punt_one(
            &mut h,
            &build(&F {
                p: P::Tcp(flags),
                ..t
            }),
        );
        assert_eq!(d.reason().unwrap(), RxReason::TcpCtrl);
        assert_eq!(d.flow_id(), Some(id));
    }
    let c = h.cmd(CommandDescriptor::flow_query(1, &key_of(&t, 0)));
    assert_eq!(c.count.get(), 0, "punts are not counted");

    // TTL expired.
    let u = F {
        ttl: 1,
        ..base(P::Udp)
    };
    let id = h
        .insert(&key_of(&u, 0), &FlowAction::forward(1).with_dec_ttl())
        .flow_id()
        .unwrap();
    let (d, _) = punt_one(&mut h, &build(&u));
    assert_eq!(d.reason().unwrap(), RxReason::TtlExpired);
    assert_eq!(d.flow_id(), Some(id));

    let udp = build(&base(P::Udp));
    // Fragment: MF set (fix the header checksum so it is not MALFORMED).
    let mut frag = udp.clone();
    frag[20] = 0x20;
    fix_ipv4_csum(&mut frag);
    assert_eq!(
        punt_one(&mut h, &frag).0.reason().unwrap(),
        RxReason::Fragment
    );
    // Bad header checksum: MALFORMED.
    let mut bad = udp.clone();
    bad[24] ^= 0xFF;
    assert_eq!(
        punt_one(&mut h, &bad).0.reason().unwrap(),
        RxReason::Malformed
    );
    // IP options: IHL 6.
    let mut opt = udp.clone();
    opt[14] = 0x46;
    opt.insert(34, 0);
    opt.insert(34, 0);
    opt.insert(34, 0);
    opt.insert(34, 1);
    let total = u16::from_be_bytes([opt[16], opt[17]]) + 4;
    opt[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_csum(&mut opt);
    assert_eq!(
        punt_one(&mut h, &opt).0.reason().unwrap(),
        RxReason::IpOptions
    );
    // Unsupported L4: GRE.
    let mut gre = udp.clone();
    gre[23] = 47;
    fix_ipv4_csum(&mut gre);
    assert_eq!(
        punt_one(&mut h, &gre).0.reason().unwrap(),
        RxReason::UnsupportedL4
    );
    // Non-IP: ARP.
    let mut arp = udp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(punt_one(&mut h, &arp).0.reason().unwrap(), RxReason::NonIp);
    // IPv6 extension header (hop-by-hop) and IPv6 fragment.
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(SMAC, DMAC)
        .ipv6([1; 16], [2; 16], 64)
        .udp(1, 2)
        .write(&mut v6, &[0u8; 10])
        .unwrap();
    let mut ext = v6.clone();
    ext[20] = 0;
    assert_eq!(
        punt_one(&mut h, &ext).0.reason().unwrap(),
        RxReason::Ipv6Ext
    );
    let mut fr6 = v6.clone();
    fr6[20] = 44;
    assert_eq!(
        punt_one(&mut h, &fr6).0.reason().unwrap(),
        RxReason::Fragment
    );
    // IPv6 UDP with checksum 0: MALFORMED.
    let mut z6 = v6.clone();
    z6[60] = 0;
    z6[61] = 0;
    assert_eq!(
        punt_one(&mut h, &z6).0.reason().unwrap(),
        RxReason::Malformed
    );
    // A miss on the VLAN-tagged frame: VLAN status bit.
    let mut tagged = Vec::new();
    PacketBuilder::ethernet2(SMAC, DMAC)
        .single_vlan(5u16.try_into().unwrap())
        .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
        .udp(1, 2)
        .write(&mut tagged, &[0u8; 22])
        .unwrap();
    let (d, _) = punt_one(&mut h, &tagged);
    assert_eq!(d.reason().unwrap(), RxReason::Miss);
    assert_eq!(d.status.get(), 0b11, "DD | VLAN");
    assert_eq!(h.rd(regs::STAT_PUNT), 14);
}

fn fix_ipv4_csum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0xF) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = frame[14..14 + ihl]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let c = !u16::try_from(sum).unwrap();
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn zone_from_vlan_matches_key() {
    let mut h = Host::up(SimConfig::small());
    let mut tagged = Vec::new();
    PacketBuilder::ethernet2(SMAC, DMAC)
        .single_vlan(100u16.try_into().unwrap())
        .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
        .udp(1, 2)
        .write(&mut tagged, &[0u8; 22])
        .unwrap();
    let k = FlowKey::ipv4(
        0,
        L4Proto::Udp,
        100,
        [1, 1, 1, 1].into(),
        1,
        [2, 2, 2, 2].into(),
        2,
    );
    h.insert(&k, &FlowAction::forward(1));
    h.inject(0, &tagged);
    h.poll();
    assert_eq!(h.out(1), vec![tagged], "tag kept, frame unchanged");
}

#[test]
fn rx_ring_empty_too_small_and_wrap() {
    let mut h = Host::new(SimConfig::small());
    h.program_rings();
    h.post_rx(2, 2048);
    h.wr(regs::CTRL, 1);
    h.poll();
    let frame = build(&base(P::Udp));
    for _ in 0..3 {
        h.inject(0, &frame);
    }
    h.poll();
    assert_eq!(h.reap_rx().len(), 2);
    assert_eq!(h.rd(regs::STAT_RX_NO_BUF), 1, "no buffer posted: dropped");
    // A buffer too small: dropped, buffer stays posted and is used by the next frame.
    h.post_rx(1, 60);
    h.inject(0, &frame);
    h.poll();
    assert_eq!(h.rd(regs::STAT_RX_TOO_BIG), 1);
    assert!(h.reap_rx().is_empty());
    let small = &frame[..60];
    let mut small = small.to_vec();
    // Make the 60-byte frame a consistent UDP packet: shrink IP and UDP lengths.
    small[16..18].copy_from_slice(&46u16.to_be_bytes());
    fix_ipv4_csum(&mut small);
    small[38..40].copy_from_slice(&26u16.to_be_bytes());
    h.inject(0, &small);
    h.poll();
    let r = h.reap_rx();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, small);
    // Wrap the 16-entry ring several times.
    for round in 0..5 {
        h.post_rx(10, 2048);
        for _ in 0..10 {
            h.inject(0, &frame);
        }
        h.poll();
        assert_eq!(h.reap_rx().len(), 10, "round {round}");
    }
    assert!(!h.status().contains(regs::Status::FATAL));
}

#[test]
fn short_frames_and_disabled_drop() {
    let mut h = Host::small();
    let frame = build(&base(P::Udp));
    h.inject(0, &frame);
    h.inject(0, &frame[..59]);
    h.poll();
    assert_eq!(h.rd(regs::STAT_WIRE_RX), 1);
    assert_eq!(h.rd(regs::STAT_DISABLED_DROP), 1);
    assert_eq!(h.rd(regs::STAT_RX_LEN_ERR), 1);
}

#[test]
fn tx_ring_sends_on_the_right_port_and_wraps() {
    let mut h = Host::up(SimConfig::small());
    h.drain_irqs();
    let frame = build(&base(P::Udp));
    h.tx(&[(&frame, 1), (&frame[..20], 0)]);
    h.poll();
    assert_eq!(h.reap_tx(), vec![(1, 0), (1, 0)]);
    assert_eq!(h.out(1), vec![frame.clone()]);
    let mut padded = frame[..20].to_vec();
    padded.resize(60, 0);
    assert_eq!(h.out(0), vec![padded], "short frame padded to 60");
    assert_eq!(h.rd(regs::STAT_TX), 2);
    assert_eq!(h.irq(1), Some(1), "TX_DONE on vector 1");
    // Errors.
    let buf = Iova::new(Host::iova(TXBUF_OFF));
    h.tx_raw(TxDescriptor::new(buf, 13, 0));
    h.tx_raw(TxDescriptor::new(buf, 64, 2));
    let mut d = TxDescriptor::new(buf, 64, 0);
    d.flags = 1;
    h.tx_raw(d);
    h.poll();
    let errs: Vec<_> = h.reap_tx();
    assert_eq!(
        errs,
        vec![
            (3, TxError::BadLength.raw()),
            (3, TxError::BadPort.raw()),
            (3, TxError::BadDescriptor.raw())
        ]
    );
    assert_eq!(h.rd(regs::STAT_TX_ERR), 3);
    // Wrap.
    for _ in 0..5 {
        let batch: Vec<(&[u8], u8)> = (0..7).map(|_| (&frame[..], 0u8)).collect();
        h.tx(&batch);
        h.poll();
        assert_eq!(h.reap_tx().len(), 7);
        assert_eq!(h.out(0).len(), 7);
    }
}

#[test]
fn icmp_echo_reply_key_and_nat() {
    let mut h = Host::up(SimConfig::small());
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(SMAC, DMAC)
        .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
        .icmpv4_echo_reply(4242, 1)
        .write(&mut reply, &[1u8; 30])
        .unwrap();
    let k = FlowKey::ipv4(
        0,
        L4Proto::Icmp,
        0,
        [10, 0, 0, 2].into(),
        4242,
        [10, 0, 0, 1].into(),
        0,
    );
    h.insert(
        &k,
        &FlowAction::forward(1).with_dnat([192, 168, 0, 5].into(), 77),
    );
    h.inject(0, &reply);
    h.poll();
    let mut want = Vec::new();
    PacketBuilder::ethernet2(SMAC, DMAC)
        .ipv4([10, 0, 0, 2], [192, 168, 0, 5], 64)
        .icmpv4_echo_reply(77, 1)
        .write(&mut want, &[1u8; 30])
        .unwrap();
    assert_eq!(h.out(1), vec![want]);
}
