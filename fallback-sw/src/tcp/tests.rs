//! Scenario and property tests for TCP tracking, driven like the conntrack core drives
//! Linux's `nf_conntrack_tcp_packet` (SEEN_REPLY set after an accepted reply, timers and
//! ASSURED owned here).

use proptest::prelude::*;

use super::*;

const SEC: u64 = timeouts::NS_PER_SEC;
const EST: u64 = 432_000 * SEC;

/// Client and server initial sequence numbers just below 2^32, so every connection
/// wraps its sequence space.
const C_ISN: u32 = 0xFFFF_FF00;
const S_ISN: u32 = 0xFFFF_FFF0;

const A: TcpFlags = TcpFlags::ACK;
const SYN: TcpFlags = TcpFlags::SYN;
const FIN_ACK: TcpFlags = TcpFlags::from_bits(0x11);
const RST: TcpFlags = TcpFlags::RST;
const RST_ACK: TcpFlags = TcpFlags::from_bits(0x14);
const SYN_ACK: TcpFlags = TcpFlags::from_bits(0x12);
const PSH_ACK: TcpFlags = TcpFlags::from_bits(0x18);

fn seg(flags: TcpFlags, seq: u32, ack: u32, window: u16, len: u32) -> TcpSegment {
    TcpSegment {
        flags,
        seq,
        ack,
        window,
        payload_len: len,
        ..TcpSegment::default()
    }
}

fn syn_opts(flags: TcpFlags, seq: u32, ack: u32, window: u16, wscale: Option<u8>) -> TcpSegment {
    TcpSegment {
        flags,
        seq,
        ack,
        window,
        has_options: true,
        wscale,
        sack_permitted: true,
        ..TcpSegment::default()
    }
}

/// The caller side: status bits and the timer, as the conntrack core keeps them.
#[derive(Debug)]
struct Harness {
    tcp: TcpConn,
    cfg: TcpConfig,
    seen_reply: bool,
    assured: bool,
    timeout_ns: u64,
    deleted: bool,
}

impl Harness {
    fn open(first: &TcpSegment, cfg: TcpConfig) -> Result<Harness, TcpInvalid> {
        let (tcp, acc) = TcpConn::new(first, &cfg)?;
        let mut h = Harness {
            tcp,
            cfg,
            seen_reply: false,
            assured: false,
            timeout_ns: 0,
            deleted: false,
        };
        h.apply_accept(&acc);
        Ok(h)
    }

    fn apply_accept(&mut self, acc: &TcpAccept) {
        if let Some(t) = acc.timeout_ns {
            self.timeout_ns = t;
        }
        if acc.set_assured {
            self.assured = true;
        }
        if acc.delete_now {
            self.deleted = true;
        }
    }

    fn status(&self) -> ConnStatus {
        ConnStatus {
            seen_reply: self.seen_reply,
            assured: self.assured,
            fixed_timeout: false,
            remaining_ns: self.timeout_ns,
        }
    }

    fn send(&mut self, dir: Dir, s: &TcpSegment) -> TcpOutcome {
        let out = self.tcp.packet(dir, s, self.status(), &self.cfg);
        match &out {
            TcpOutcome::Accept(acc) => self.apply_accept(acc),
            TcpOutcome::Invalid {
                shrink_timeout_ns: Some(t),
                ..
            } => self.timeout_ns = *t,
            TcpOutcome::Ignore(_) | TcpOutcome::Invalid { .. } | TcpOutcome::Reopen => {}
        }
        if dir == Dir::Reply && matches!(out, TcpOutcome::Accept(_) | TcpOutcome::Ignore(_)) {
            self.seen_reply = true;
        }
        out
    }

    fn orig(&mut self, s: &TcpSegment) -> TcpOutcome {
        self.send(Dir::Original, s)
    }

    fn reply(&mut self, s: &TcpSegment) -> TcpOutcome {
        self.send(Dir::Reply, s)
    }
}

#[track_caller]
fn accepted(out: TcpOutcome) -> TcpAccept {
    match out {
        TcpOutcome::Accept(a) => a,
        other => panic!("expected Accept, got {other:?}"),
    }
}

#[track_caller]
fn expect_state(out: TcpOutcome, state: TcpState, timeout_s: u64) -> TcpAccept {
    let a = accepted(out);
    assert_eq!(a.new_state, state);
    assert_eq!(a.timeout_ns, Some(timeout_s * SEC), "timeout in {state}");
    a
}

/// Client and server sequence cursors after a handshake.
struct Flow {
    h: Harness,
    c: u32,
    s: u32,
}

/// SYN, SYN/ACK, ACK with the given window scales (None = option absent).
fn handshake(cfg: TcpConfig, c_ws: Option<u8>, s_ws: Option<u8>) -> Flow {
    let mut h = Harness::open(&syn_opts(SYN, C_ISN, 0, 64240, c_ws), cfg).expect("syn");
    assert_eq!(h.tcp.state(), TcpState::SynSent);
    assert_eq!(h.timeout_ns, 120 * SEC);
    let c = C_ISN.wrapping_add(1);
    let s = S_ISN.wrapping_add(1);
    let a = expect_state(
        h.reply(&syn_opts(SYN_ACK, S_ISN, c, 65160, s_ws)),
        TcpState::SynRecv,
        60,
    );
    assert!(!a.set_assured);
    let a = expect_state(
        h.orig(&seg(A, c, s, 502, 0)),
        TcpState::Established,
        432_000,
    );
    assert!(a.set_assured, "third handshake packet sets ASSURED");
    assert!(h.assured);
    Flow { h, c, s }
}

#[test]
fn size_of_conn_is_compact() {
    assert!(core::mem::size_of::<TcpConn>() <= 64);
    assert_eq!(core::mem::size_of::<TcpConn>(), 60);
}

#[test]
fn flag_combinations() {
    let ok = [
        SYN,
        SYN | TcpFlags::URG,
        SYN_ACK,
        RST,
        RST_ACK,
        FIN_ACK,
        FIN_ACK | TcpFlags::URG,
        A,
        A | TcpFlags::URG,
    ];
    for bits in 0..=u8::MAX {
        let f = TcpFlags::from_bits(bits);
        let core = f & TcpFlags::from_bits(0x37);
        assert_eq!(flags_valid(f), ok.contains(&core), "{f:?}");
    }
    assert!(flags_valid(PSH_ACK | TcpFlags::ECE | TcpFlags::CWR));
    assert!(!flags_valid(SYN | TcpFlags::FIN));
    assert!(!flags_valid(TcpFlags::FIN));
    assert!(!flags_valid(TcpFlags::empty()));
    assert!(!flags_valid(SYN_ACK | TcpFlags::URG));
}

#[test]
fn syn_fin_and_bare_fin_invalid() {
    let cfg = TcpConfig::default();
    let synfin = seg(SYN | TcpFlags::FIN, C_ISN, 0, 1000, 0);
    assert!(matches!(
        TcpConn::new(&synfin, &cfg),
        Err(TcpInvalid::BadFlags { .. })
    ));
    let fin = seg(TcpFlags::FIN, C_ISN, 0, 1000, 0);
    assert!(matches!(
        TcpConn::new(&fin, &cfg),
        Err(TcpInvalid::BadFlags { .. })
    ));
    // On an established connection too.
    let mut f = handshake(cfg, Some(7), Some(7));
    let out = f.h.orig(&seg(TcpFlags::FIN, f.c, 0, 502, 0));
    assert!(matches!(
        out,
        TcpOutcome::Invalid {
            reason: TcpInvalid::BadFlags { .. },
            ..
        }
    ));
    // Valid flags but not a possible first packet.
    for first in [
        seg(SYN_ACK, 1, 2, 10, 0),
        seg(FIN_ACK, 1, 2, 10, 0),
        seg(RST, 1, 0, 0, 0),
    ] {
        assert!(matches!(
            TcpConn::new(&first, &cfg),
            Err(TcpInvalid::InvalidNew { .. })
        ));
    }
    assert_eq!(f.h.tcp.state(), TcpState::Established);
}

#[test]
fn three_way_handshake_and_data_both_ways() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    // Client sends 1000 bytes: unacknowledged data caps the timeout at 300 s.
    expect_state(
        f.h.orig(&seg(PSH_ACK, f.c, f.s, 502, 1000)),
        TcpState::Established,
        300,
    );
    f.c = f.c.wrapping_add(1000);
    // Server acks it and sends 500 bytes of its own.
    expect_state(
        f.h.reply(&seg(PSH_ACK, f.s, f.c, 509, 500)),
        TcpState::Established,
        300,
    );
    f.s = f.s.wrapping_add(500);
    // Client acks: nothing unacknowledged any more.
    expect_state(
        f.h.orig(&seg(A, f.c, f.s, 502, 0)),
        TcpState::Established,
        432_000,
    );
    assert!(
        !f.h.tcp
            .dir_state(Dir::Original)
            .flags
            .contains(DirFlags::DATA_UNACK)
    );
    assert!(
        !f.h.tcp
            .dir_state(Dir::Reply)
            .flags
            .contains(DirFlags::DATA_UNACK)
    );
    // Sequence space wrapped on both sides.
    assert!(f.c < C_ISN && f.s < S_ISN);
}

#[test]
fn fin_teardown_client_first() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    expect_state(
        f.h.orig(&seg(FIN_ACK, f.c, f.s, 502, 0)),
        TcpState::FinWait,
        120,
    );
    assert!(
        f.h.tcp
            .dir_state(Dir::Original)
            .flags
            .contains(DirFlags::CLOSE_INIT)
    );
    assert!(
        !f.h.tcp
            .dir_state(Dir::Reply)
            .flags
            .contains(DirFlags::CLOSE_INIT)
    );
    f.c = f.c.wrapping_add(1);
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 509, 0)),
        TcpState::CloseWait,
        60,
    );
    expect_state(
        f.h.reply(&seg(FIN_ACK, f.s, f.c, 509, 0)),
        TcpState::LastAck,
        30,
    );
    f.s = f.s.wrapping_add(1);
    expect_state(f.h.orig(&seg(A, f.c, f.s, 502, 0)), TcpState::TimeWait, 120);
}

#[test]
fn fin_teardown_server_first() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    expect_state(
        f.h.reply(&seg(FIN_ACK, f.s, f.c, 509, 0)),
        TcpState::FinWait,
        120,
    );
    assert!(
        f.h.tcp
            .dir_state(Dir::Reply)
            .flags
            .contains(DirFlags::CLOSE_INIT)
    );
    f.s = f.s.wrapping_add(1);
    expect_state(f.h.orig(&seg(A, f.c, f.s, 502, 0)), TcpState::CloseWait, 60);
    expect_state(
        f.h.orig(&seg(FIN_ACK, f.c, f.s, 502, 0)),
        TcpState::LastAck,
        30,
    );
    f.c = f.c.wrapping_add(1);
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 509, 0)),
        TcpState::TimeWait,
        120,
    );
    // A retransmitted last ACK stays in TIME_WAIT.
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 509, 0)),
        TcpState::TimeWait,
        120,
    );
}

#[test]
fn syn_in_time_wait_after_close_init_reopens() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    f.h.orig(&seg(FIN_ACK, f.c, f.s, 502, 0));
    f.c = f.c.wrapping_add(1);
    f.h.reply(&seg(FIN_ACK, f.s, f.c, 509, 0));
    f.s = f.s.wrapping_add(1);
    expect_state(f.h.orig(&seg(A, f.c, f.s, 502, 0)), TcpState::TimeWait, 120);
    let out = f.h.orig(&syn_opts(SYN, 0x1234_5678, 0, 64240, Some(7)));
    assert_eq!(out, TcpOutcome::Reopen);
    assert_eq!(f.h.tcp.state(), TcpState::TimeWait);
    // The caller retries as a new connection.
    let (fresh, acc) =
        TcpConn::new(&syn_opts(SYN, 0x1234_5678, 0, 64240, Some(7)), &f.h.cfg).expect("new");
    assert_eq!(fresh.state(), TcpState::SynSent);
    assert_eq!(acc.timeout_ns, Some(120 * SEC));
}

#[test]
fn rst_in_established_closes_with_10s() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    let a = expect_state(f.h.reply(&seg(RST, f.s, 0, 0, 0)), TcpState::Close, 10);
    assert!(!a.delete_now);
    // A REPLY SYN in CLOSE is IV per the table (no reopen from that side).
    assert_eq!(
        f.h.reply(&syn_opts(SYN, 42, 0, 1000, None)),
        TcpOutcome::Invalid {
            reason: TcpInvalid::Transition {
                state: TcpState::Close,
                dir: Dir::Reply,
                index: FlagIndex::Syn,
            },
            shrink_timeout_ns: None,
        }
    );
}

#[test]
fn rst_then_syn_same_direction_reopens() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    expect_state(f.h.orig(&seg(RST, f.c, 0, 0, 0)), TcpState::Close, 10);
    assert_eq!(
        f.h.orig(&syn_opts(SYN, 7, 0, 1000, None)),
        TcpOutcome::Reopen
    );
}

#[test]
fn syn_in_close_after_peer_rst_is_ignored() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    expect_state(f.h.reply(&seg(RST, f.s, 0, 0, 0)), TcpState::Close, 10);
    assert_eq!(
        f.h.orig(&syn_opts(SYN, 7, 0, 1000, None)),
        TcpOutcome::Ignore(TcpIgnore::Transition {
            state: TcpState::Close,
            index: FlagIndex::Syn
        })
    );
    assert_eq!(f.h.tcp.state(), TcpState::Close);
}

#[test]
fn rst_below_maxack_is_invalid() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    // Client sends data, server acks it: server maxack = c + 1000.
    f.h.orig(&seg(PSH_ACK, f.c, f.s, 502, 1000));
    f.c = f.c.wrapping_add(1000);
    f.h.reply(&seg(A, f.s, f.c, 509, 0));
    let out = f.h.orig(&seg(RST, f.c.wrapping_sub(500), 0, 0, 0));
    assert_eq!(
        out,
        TcpOutcome::Invalid {
            reason: TcpInvalid::InvalidRst {
                seq: f.c.wrapping_sub(500),
                maxack: f.c
            },
            shrink_timeout_ns: None
        }
    );
    assert_eq!(f.h.tcp.state(), TcpState::Established);
    // With ignore_invalid_rst the same RST is inexact: state kept, CLOSE timeout.
    f.h.cfg.ignore_invalid_rst = true;
    let a = expect_state(
        f.h.orig(&seg(RST, f.c.wrapping_sub(500), 0, 0, 0)),
        TcpState::Established,
        10,
    );
    assert_eq!(a.old_state, TcpState::Established);
    // The exact RST closes.
    expect_state(f.h.orig(&seg(RST, f.c, 0, 0, 0)), TcpState::Close, 10);
}

#[test]
fn inexact_rst_keeps_established_for_challenge_ack() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    f.h.reply(&seg(A, f.s, f.c, 509, 0));
    // In window but above maxack and not following our own data.
    let a = expect_state(
        f.h.orig(&seg(RST, f.c.wrapping_add(100), 0, 0, 0)),
        TcpState::Established,
        10,
    );
    assert_eq!(a.new_state, TcpState::Established);
}

#[test]
fn out_of_window_data_invalid() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    let far = f.c.wrapping_add(50_000_000);
    let out = f.h.orig(&seg(PSH_ACK, far, f.s, 502, 100));
    assert!(matches!(
        out,
        TcpOutcome::Invalid {
            reason: TcpInvalid::SeqOverUpperBound { .. },
            shrink_timeout_ns: None
        }
    ));
    // Acking data never sent.
    let out = f.h.orig(&seg(A, f.c, f.s.wrapping_add(10_000), 502, 0));
    assert!(matches!(
        out,
        TcpOutcome::Invalid {
            reason: TcpInvalid::AckOverUpperBound { .. },
            ..
        }
    ));
    assert_eq!(f.h.tcp.state(), TcpState::Established);
    assert_eq!(f.h.timeout_ns, EST);
}

#[test]
fn be_liberal_accepts_out_of_window() {
    let cfg = TcpConfig {
        be_liberal: true,
        ..TcpConfig::default()
    };
    let mut f = handshake(cfg, Some(7), Some(7));
    let before = *f.h.tcp.dir_state(Dir::Original);
    let far = f.c.wrapping_add(50_000_000);
    expect_state(
        f.h.orig(&seg(PSH_ACK, far, f.s, 502, 100)),
        TcpState::Established,
        432_000,
    );
    // Liberal acceptance does not update the window state.
    assert_eq!(*f.h.tcp.dir_state(Dir::Original), before);
}

#[test]
fn retransmissions_drop_timeout_to_300s() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    let dup = seg(A, f.c, f.s, 502, 0);
    // The handshake ACK was identical: this is retransmission 1, 2, then 3 = max_retrans.
    expect_state(f.h.orig(&dup), TcpState::Established, 432_000);
    assert_eq!(f.h.tcp.retrans(), 1);
    expect_state(f.h.orig(&dup), TcpState::Established, 432_000);
    assert_eq!(f.h.tcp.retrans(), 2);
    expect_state(f.h.orig(&dup), TcpState::Established, 300);
    assert_eq!(f.h.tcp.retrans(), 3);
    // A different packet resets the counter.
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 509, 0)),
        TcpState::Established,
        432_000,
    );
    assert_eq!(f.h.tcp.retrans(), 0);
}

#[test]
fn window_scaling_large_windows() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    assert_eq!(f.h.tcp.dir_state(Dir::Original).scale, 7);
    assert_eq!(f.h.tcp.dir_state(Dir::Reply).scale, 7);
    // Server advertises 2000 << 7 = 256000 bytes.
    f.h.reply(&seg(A, f.s, f.c, 2000, 0));
    // Client sends 200 KB in 10 KB segments before any ack: all in window.
    for _ in 0..20 {
        let a = accepted(f.h.orig(&seg(PSH_ACK, f.c, f.s, 502, 10_000)));
        assert_eq!(a.new_state, TcpState::Established);
        f.c = f.c.wrapping_add(10_000);
    }
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 2000, 0)),
        TcpState::Established,
        432_000,
    );
    assert!(f.h.tcp.dir_state(Dir::Reply).maxwin >= 256_000);
}

#[test]
fn one_side_without_wscale_disables_scaling() {
    let mut f = handshake(TcpConfig::default(), Some(7), None);
    assert_eq!(f.h.tcp.dir_state(Dir::Original).scale, 0);
    assert_eq!(f.h.tcp.dir_state(Dir::Reply).scale, 0);
    f.h.reply(&seg(A, f.s, f.c, 2000, 0));
    // 2000 unscaled bytes of window: 200 KB cannot fit. Past the right edge the
    // overshoot exception lets up to the receiver's maxwin through as Ignore, then the
    // data is invalid.
    let mut invalid = false;
    let mut overshoot = false;
    for _ in 0..20 {
        match f.h.orig(&seg(PSH_ACK, f.c, f.s, 502, 10_000)) {
            TcpOutcome::Accept(_) => f.c = f.c.wrapping_add(10_000),
            TcpOutcome::Ignore(TcpIgnore::Overshoot) => {
                overshoot = true;
                f.c = f.c.wrapping_add(10_000);
            }
            TcpOutcome::Invalid {
                reason: TcpInvalid::SeqOverUpperBound { .. },
                ..
            } => {
                invalid = true;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(invalid && overshoot);
    // The other way round too.
    let f = handshake(TcpConfig::default(), None, Some(7));
    assert_eq!(f.h.tcp.dir_state(Dir::Original).scale, 0);
    assert_eq!(f.h.tcp.dir_state(Dir::Reply).scale, 0);
}

#[test]
fn wscale_capped_at_14() {
    let f = handshake(TcpConfig::default(), Some(20), Some(15));
    assert_eq!(f.h.tcp.dir_state(Dir::Original).scale, 14);
    assert_eq!(f.h.tcp.dir_state(Dir::Reply).scale, 14);
}

#[test]
fn syn_retransmission_keeps_timeout() {
    let syn = syn_opts(SYN, C_ISN, 0, 64240, Some(7));
    let mut h = Harness::open(&syn, TcpConfig::default()).expect("syn");
    let a = accepted(h.orig(&syn));
    assert_eq!(a.new_state, TcpState::SynSent);
    assert_eq!(a.old_state, TcpState::SynSent);
    assert_eq!(
        a.timeout_ns, None,
        "no refresh on SYN retransmit without reply"
    );
    // A SYN with a new ISN re-initialises the sender (still no refresh).
    let a = accepted(h.orig(&syn_opts(SYN, C_ISN.wrapping_add(5000), 0, 1000, None)));
    assert_eq!(a.timeout_ns, None);
    assert_eq!(h.tcp.dir_state(Dir::Original).end, C_ISN.wrapping_add(5001));
    assert_eq!(h.tcp.dir_state(Dir::Original).maxwin, 1000);
}

#[test]
fn rst_answering_syn_deletes_entry() {
    let mut h = Harness::open(
        &syn_opts(SYN, C_ISN, 0, 64240, Some(7)),
        TcpConfig::default(),
    )
    .expect("syn");
    let a = accepted(h.reply(&seg(RST_ACK, 0, C_ISN.wrapping_add(1), 0, 0)));
    assert_eq!(a.new_state, TcpState::Close);
    assert!(a.delete_now);
    assert_eq!(a.timeout_ns, None);
}

#[test]
fn simultaneous_open() {
    let mut h = Harness::open(
        &syn_opts(SYN, C_ISN, 0, 64240, Some(7)),
        TcpConfig::default(),
    )
    .expect("syn");
    let c = C_ISN.wrapping_add(1);
    let s = S_ISN.wrapping_add(1);
    // Both send SYN: reply SYN moves to SYN_SENT2. Linux's "no refresh for a SYN in
    // SYN_SENT before any reply" rule does not look at the direction, so no refresh here.
    let a = accepted(h.reply(&syn_opts(SYN, S_ISN, 0, 65160, Some(7))));
    assert_eq!(a.new_state, TcpState::SynSent2);
    assert_eq!(a.timeout_ns, None);
    // Client answers with SYN/ACK.
    expect_state(
        h.orig(&syn_opts(SYN_ACK, C_ISN, s, 64240, Some(7))),
        TcpState::SynRecv,
        60,
    );
    // Server's ACK: the table says SYN_RECV, the simultaneous-open flag says ESTABLISHED.
    let a = expect_state(
        h.reply(&seg(A, s, c, 509, 0)),
        TcpState::Established,
        432_000,
    );
    assert!(a.set_assured);
}

#[test]
fn pickup_with_loose() {
    let first = seg(A, 0x8000_0000, 0x1000, 1000, 100);
    let mut h = Harness::open(&first, TcpConfig::default()).expect("pickup");
    assert_eq!(h.tcp.state(), TcpState::Established);
    assert_eq!(h.timeout_ns, 300 * SEC, "no SEEN_REPLY: capped at UNACK");
    for d in [Dir::Original, Dir::Reply] {
        let fl = h.tcp.dir_state(d).flags;
        assert!(fl.contains(DirFlags::BE_LIBERAL) && fl.contains(DirFlags::SACK_PERM));
    }
    // First reply: SEEN_REPLY still clear.
    let a = accepted(h.reply(&seg(A, 0x1000, 0x8000_0064, 2000, 0)));
    assert_eq!(a.new_state, TcpState::Established);
    assert!(!a.set_assured);
    assert!(a.timeout_ns.is_some_and(|t| t <= 300 * SEC));
    // The third packet sets ASSURED.
    let a = accepted(h.orig(&seg(A, 0x8000_0064, 0x1000, 1000, 0)));
    assert!(a.set_assured);
    assert_eq!(a.timeout_ns, Some(EST));
}

#[test]
fn pickup_rejected_without_loose() {
    let cfg = TcpConfig {
        loose: false,
        ..TcpConfig::default()
    };
    assert_eq!(
        TcpConn::new(&seg(A, 1, 2, 1000, 0), &cfg).map(|(c, _)| c.state()),
        Err(TcpInvalid::PickupDisabled)
    );
    // SYN still works.
    assert!(TcpConn::new(&syn_opts(SYN, 1, 0, 1000, None), &cfg).is_ok());
}

#[test]
fn zero_window_caps_timeout() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 0, 0)),
        TcpState::Established,
        300,
    );
    expect_state(
        f.h.reply(&seg(A, f.s, f.c, 509, 0)),
        TcpState::Established,
        432_000,
    );
}

#[test]
fn unacked_data_caps_timeout() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    expect_state(
        f.h.reply(&seg(PSH_ACK, f.s, f.c, 509, 1)),
        TcpState::Established,
        300,
    );
    assert!(
        f.h.tcp
            .dir_state(Dir::Reply)
            .flags
            .contains(DirFlags::DATA_UNACK)
    );
    expect_state(
        f.h.orig(&seg(A, f.c, f.s.wrapping_add(1), 502, 0)),
        TcpState::Established,
        432_000,
    );
}

#[test]
fn synack_resync_after_ignored_syn() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    // Client restarts with a new ISN; conntrack still thinks ESTABLISHED: ignored.
    let new_isn = 0x7000_0000;
    assert_eq!(
        f.h.orig(&syn_opts(SYN, new_isn, 0, 29200, Some(9))),
        TcpOutcome::Ignore(TcpIgnore::Transition {
            state: TcpState::Established,
            index: FlagIndex::Syn
        })
    );
    assert_eq!(f.h.tcp.state(), TcpState::Established);
    // Server answers that SYN: resync to SYN_RECV from the recorded values.
    let s2 = 0x0100_0000;
    let a = expect_state(
        f.h.reply(&syn_opts(
            SYN_ACK,
            s2,
            new_isn.wrapping_add(1),
            28960,
            Some(7),
        )),
        TcpState::SynRecv,
        60,
    );
    assert_eq!(a.old_state, TcpState::SynSent);
    let o = *f.h.tcp.dir_state(Dir::Original);
    assert_eq!(o.end, new_isn.wrapping_add(1));
    assert_eq!(o.scale, 9);
    assert!(o.flags.contains(DirFlags::WINDOW_SCALE));
    assert_eq!(f.h.tcp.dir_state(Dir::Reply).scale, 7);
    expect_state(
        f.h.orig(&seg(A, new_isn.wrapping_add(1), s2.wrapping_add(1), 229, 0)),
        TcpState::Established,
        432_000,
    );
}

#[test]
fn synack_not_matching_ignored_syn_is_ignored() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    f.h.orig(&syn_opts(SYN, 0x7000_0000, 0, 29200, Some(9)));
    assert!(matches!(
        f.h.reply(&syn_opts(SYN_ACK, 5, 0x1234, 28960, Some(7))),
        TcpOutcome::Ignore(TcpIgnore::Transition { .. })
    ));
    assert_eq!(f.h.tcp.state(), TcpState::Established);
}

#[test]
fn last_ack_challenge_ack_does_not_close() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    f.h.orig(&seg(FIN_ACK, f.c, f.s, 502, 0));
    f.c = f.c.wrapping_add(1);
    expect_state(
        f.h.reply(&seg(FIN_ACK, f.s, f.c, 509, 0)),
        TcpState::LastAck,
        30,
    );
    f.s = f.s.wrapping_add(1);
    // Client sends a new SYN in LAST_ACK: ignored, challenge ACK expected.
    assert!(matches!(
        f.h.orig(&syn_opts(SYN, 0x4000_0000, 0, 1000, None)),
        TcpOutcome::Ignore(_)
    ));
    // Server's challenge ACK is not the last ACK.
    assert_eq!(
        f.h.reply(&seg(A, f.s, f.c, 509, 0)),
        TcpOutcome::Ignore(TcpIgnore::ChallengeAck)
    );
    assert_eq!(f.h.tcp.state(), TcpState::LastAck);
}

#[test]
fn invalid_fin_rst_pair_shrinks_timeout() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    let far_c = f.c.wrapping_add(100_000_000);
    let far_s = f.s.wrapping_add(100_000_000);
    // First out-of-window FIN: recorded only.
    let out = f.h.orig(&seg(FIN_ACK, far_c, f.s, 502, 0));
    assert!(matches!(
        out,
        TcpOutcome::Invalid {
            shrink_timeout_ns: None,
            ..
        }
    ));
    // The answer from the other side: shrink 5 days to 300 s.
    let out = f.h.reply(&seg(FIN_ACK, far_s, f.c, 509, 0));
    assert_eq!(
        out,
        TcpOutcome::Invalid {
            reason: TcpInvalid::SeqOverUpperBound {
                seq: far_s,
                maxend: f.h.tcp.dir_state(Dir::Reply).maxend
            },
            shrink_timeout_ns: Some(300 * SEC)
        }
    );
    assert_eq!(f.h.timeout_ns, 300 * SEC);
    // Not again: 300 s is not larger than UNACK.
    let out = f.h.reply(&seg(FIN_ACK, far_s, f.c, 509, 0));
    assert!(matches!(
        out,
        TcpOutcome::Invalid {
            shrink_timeout_ns: None,
            ..
        }
    ));
}

#[test]
fn overshoot_is_ignored_and_tracked() {
    let mut f = handshake(TcpConfig::default(), None, None);
    // Reply window 1000 unscaled: maxend = c + 1000.
    f.h.reply(&seg(A, f.s, f.c, 1000, 0));
    let maxend = f.h.tcp.dir_state(Dir::Original).maxend;
    // Send up to maxend, then a segment starting 10 bytes past it.
    let start = maxend.wrapping_add(10);
    let out = f.h.orig(&seg(PSH_ACK, start, f.s, 502, 100));
    assert_eq!(out, TcpOutcome::Ignore(TcpIgnore::Overshoot));
    let o = f.h.tcp.dir_state(Dir::Original);
    assert_eq!(o.end, start.wrapping_add(100));
    assert!(o.flags.contains(DirFlags::DATA_UNACK));
}

#[test]
fn old_retransmission_is_ignored() {
    let mut f = handshake(TcpConfig::default(), None, None);
    for _ in 0..200 {
        f.h.orig(&seg(PSH_ACK, f.c, f.s, 502, 1000));
        f.c = f.c.wrapping_add(1000);
        f.h.reply(&seg(A, f.s, f.c, 65000, 0));
    }
    // Data from 190 KB ago (below end − receiver maxwin).
    let old = f.c.wrapping_sub(190_000);
    assert_eq!(
        f.h.orig(&seg(PSH_ACK, old, f.s, 502, 1000)),
        TcpOutcome::Ignore(TcpIgnore::Retransmission)
    );
}

#[test]
fn flowtable_offload_and_teardown() {
    let mut f = handshake(TcpConfig::default(), Some(7), Some(7));
    f.h.tcp.set_be_liberal();
    // Traffic bypassed us; teardown without FIN/RST re-initialises like a pickup.
    f.c = f.c.wrapping_add(5_000_000);
    f.s = f.s.wrapping_add(7_000_000);
    f.h.tcp.flowtable_teardown(false);
    assert_eq!(f.h.tcp.state(), TcpState::Established);
    for d in [Dir::Original, Dir::Reply] {
        let st = f.h.tcp.dir_state(d);
        assert_eq!(st.maxwin, 0);
        assert!(!st.flags.contains(DirFlags::MAXACK_SET));
        assert!(st.flags.contains(DirFlags::BE_LIBERAL));
    }
    expect_state(
        f.h.orig(&seg(A, f.c, f.s, 502, 0)),
        TcpState::Established,
        432_000,
    );
    // Closing teardown: CLOSE with CLOSE_INIT on the original side, and a SYN reopens.
    f.h.tcp.flowtable_teardown(true);
    assert_eq!(f.h.tcp.state(), TcpState::Close);
    assert!(
        f.h.tcp
            .dir_state(Dir::Original)
            .flags
            .contains(DirFlags::CLOSE_INIT)
    );
    assert_eq!(
        f.h.orig(&syn_opts(SYN, 99, 0, 1000, None)),
        TcpOutcome::Reopen
    );
}

// ---- property tests ----

#[derive(Clone, Debug)]
struct Op {
    reply: bool,
    flags: u8,
    seq_mode: u8,
    seq_rand: u32,
    ack_mode: u8,
    ack_rand: u32,
    window: u16,
    len: u32,
    wscale: Option<u8>,
    sack_edge: Option<u32>,
}

/// TCP flags as a proptest strategy: mostly the combinations of a connection's life
/// (SYN, SYN-ACK, ACK, PSH-ACK, FIN-ACK, RST, RST-ACK) and some odd ones, sometimes
/// anything.
pub(crate) fn flags_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0x02u8),
        Just(0x12),
        Just(0x10),
        Just(0x18),
        Just(0x11),
        Just(0x04),
        Just(0x14),
        Just(0x03),
        Just(0x01),
        Just(0x00),
        any::<u8>(),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let flags = flags_strategy();
    (
        any::<bool>(),
        flags,
        0u8..4,
        any::<u32>(),
        0u8..4,
        any::<u32>(),
        prop_oneof![Just(0u16), any::<u16>()],
        prop_oneof![Just(0u32), 0u32..3000, any::<u32>()],
        proptest::option::of(0u8..20),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(
                reply,
                flags,
                seq_mode,
                seq_rand,
                ack_mode,
                ack_rand,
                window,
                len,
                wscale,
                sack_edge,
            )| {
                Op {
                    reply,
                    flags,
                    seq_mode,
                    seq_rand,
                    ack_mode,
                    ack_rand,
                    window,
                    len,
                    wscale,
                    sack_edge,
                }
            },
        )
}

fn build(op: &Op, tcp: Option<&TcpConn>) -> (Dir, TcpSegment) {
    let dir = if op.reply { Dir::Reply } else { Dir::Original };
    let (s_end, r_end) = tcp.map_or((0, 0), |t| {
        (t.dir_state(dir).end, t.dir_state(dir.opposite()).end)
    });
    let seq = match op.seq_mode {
        0 => s_end,
        1 => s_end.wrapping_add(op.seq_rand % 5000),
        2 => s_end.wrapping_sub(op.seq_rand % 5000),
        _ => op.seq_rand,
    };
    let ack = match op.ack_mode {
        0 => r_end,
        1 => r_end.wrapping_sub(op.ack_rand % 5000),
        2 => 0,
        _ => op.ack_rand,
    };
    let s = TcpSegment {
        flags: TcpFlags::from_bits(op.flags),
        seq,
        ack,
        window: op.window,
        payload_len: op.len,
        has_options: op.wscale.is_some(),
        wscale: op.wscale,
        sack_permitted: op.wscale.is_some_and(|w| w % 2 == 0),
        highest_sack_edge: op.sack_edge,
    };
    (dir, s)
}

/// Whether `got` is the table value `expected`, or one of the documented overrides.
fn allowed_override(
    dir: Dir,
    index: FlagIndex,
    old: TcpState,
    table: Transition,
    acc: &TcpAccept,
) -> bool {
    let resync = index == FlagIndex::SynAck
        && acc.old_state == TcpState::SynSent
        && acc.new_state == TcpState::SynRecv;
    match table {
        Transition::To(s) if s == acc.new_state => acc.old_state == old,
        Transition::To(TcpState::SynRecv) => {
            // Simultaneous open: reply ACK in SYN_RECV goes to ESTABLISHED.
            dir == Dir::Reply && index == FlagIndex::Ack && acc.new_state == TcpState::Established
        }
        Transition::To(TcpState::Close) => {
            // Inexact RST keeps the old state.
            index == FlagIndex::Rst && acc.new_state == old
        }
        // SYN in TIME_WAIT/CLOSE without reopen is IG; only a resync is an Accept.
        Transition::To(TcpState::SynSent) | Transition::Ignore => resync,
        _ => false,
    }
}

fn run_ops(first: &Op, ops: &[Op], cfg: TcpConfig) -> Result<(), TestCaseError> {
    let (_, s0) = build(first, None);
    let Ok(mut h) = Harness::open(&s0, cfg) else {
        return Ok(());
    };
    for op in ops {
        if h.deleted {
            break;
        }
        let (dir, s) = build(op, Some(&h.tcp));
        let old = h.tcp.state();
        let before = h.tcp;
        let index = FlagIndex::from_flags(s.flags);
        let table = transition(dir, index, old);
        let out = h.send(dir, &s);
        match out {
            TcpOutcome::Accept(acc) => {
                prop_assert!(flags_valid(s.flags));
                prop_assert_eq!(h.tcp.state(), acc.new_state);
                prop_assert!(
                    allowed_override(dir, index, old, table, &acc),
                    "{:?} {:?} {} table {:?} got {:?}",
                    dir,
                    index,
                    old,
                    table,
                    acc
                );
            }
            TcpOutcome::Ignore(_) => {
                prop_assert_eq!(h.tcp.state(), old);
            }
            TcpOutcome::Invalid { reason, .. } => {
                prop_assert_eq!(h.tcp.state(), old);
                if let TcpInvalid::Transition { .. } = reason {
                    prop_assert_eq!(table, Transition::Invalid);
                    prop_assert_eq!(h.tcp, before);
                }
                if table == Transition::Invalid && flags_valid(s.flags) {
                    let is_transition = matches!(reason, TcpInvalid::Transition { .. });
                    prop_assert!(is_transition);
                }
            }
            TcpOutcome::Reopen => {
                prop_assert_eq!(index, FlagIndex::Syn);
                prop_assert!(old == TcpState::TimeWait || old == TcpState::Close);
                prop_assert_eq!(h.tcp, before);
                break;
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_sequences_follow_table(
        first in op_strategy(),
        ops in proptest::collection::vec(op_strategy(), 0..40),
        liberal in any::<bool>(),
        loose in any::<bool>(),
        ignore_rst in any::<bool>(),
    ) {
        let cfg = TcpConfig {
            be_liberal: liberal,
            loose,
            ignore_invalid_rst: ignore_rst,
            ..TcpConfig::default()
        };
        run_ops(&first, &ops, cfg)?;
    }

    #[test]
    fn handshake_then_random(ops in proptest::collection::vec(op_strategy(), 0..60)) {
        let f = handshake(TcpConfig::default(), Some(7), Some(7));
        let mut h = f.h;
        for op in &ops {
            let (dir, s) = build(op, Some(&h.tcp));
            let old = h.tcp.state();
            let index = FlagIndex::from_flags(s.flags);
            let table = transition(dir, index, old);
            if let TcpOutcome::Accept(acc) = h.send(dir, &s) {
                prop_assert!(allowed_override(dir, index, old, table, &acc));
                prop_assert_eq!(h.tcp.state(), acc.new_state);
                if h.deleted { break; }
            }
        }
    }

    /// `TcpConn::new` takes a short cut for a first SYN (NONE to SYN_SENT): it must
    /// give exactly what initialising the sender and running the general `process`
    /// gives, for any SYN and any configuration (and leave every other first packet
    /// alone).
    #[test]
    fn new_matches_the_general_path(
        flags in prop_oneof![Just(0x02u8), any::<u8>()],
        seq in any::<u32>(),
        ack in any::<u32>(),
        window in prop_oneof![Just(0u16), Just(1), any::<u16>()],
        payload_len in prop_oneof![Just(0u16), any::<u16>()],
        has_options in any::<bool>(),
        wscale in proptest::option::of(any::<u8>()),
        sack_permitted in any::<bool>(),
        highest_sack_edge in proptest::option::of(any::<u32>()),
        liberal in any::<bool>(),
        loose in any::<bool>(),
        max_retrans in 0u8..5,
        t in proptest::array::uniform3(1u32..600),
    ) {
        let s = TcpSegment {
            flags: TcpFlags::from_bits(flags),
            seq,
            ack,
            window,
            payload_len: u32::from(payload_len),
            has_options,
            wscale,
            sack_permitted,
            highest_sack_edge,
        };
        let cfg = TcpConfig {
            be_liberal: liberal,
            loose,
            max_retrans,
            timeouts: TcpTimeouts {
                syn_sent: t[0],
                max_retrans: t[1],
                unacknowledged: t[2],
                ..TcpTimeouts::default()
            },
            ..TcpConfig::default()
        };
        let index = FlagIndex::from_flags(s.flags);
        let syn = flags_valid(s.flags)
            && transition(Dir::Original, index, TcpState::None)
                == Transition::To(TcpState::SynSent);
        let fast = TcpConn::new(&s, &cfg);
        if syn {
            let mut general = TcpConn::zeroed();
            let d = &mut general.seen[0];
            d.end = s.end();
            d.maxwin = u32::from(s.window).max(1);
            d.maxend = d.end;
            d.parse_options(&s);
            let expected = match general.process(Dir::Original, &s, ConnStatus::default(), &cfg) {
                TcpOutcome::Accept(a) => Ok((general, a)),
                other => Err(other),
            };
            prop_assert_eq!(fast.map_err(|_| ()), expected.map_err(|_| ()));
        } else {
            prop_assert!(fast.is_err() || index == FlagIndex::Ack, "only a SYN or a pickup creates");
        }
    }
}
