//! Device fault campaign under steady traffic (issue 10, docs/reliability.md).
//!
//! The agent's worker over the driver over the simulated NIC (nic-sim in a thread), with
//! source NAT to one gateway address, carries many TCP and UDP connections both ways
//! while a seeded random schedule injects every fault the simulator offers: lost
//! completions (command timeouts), `DEVICE_ERROR` completions, a table that reports
//! full, fatal errors (several codes), the command-processor watchdog, slow commands,
//! spontaneous device resets and function-level resets. Connections end (FIN, RST) and
//! new ones start throughout.
//!
//! Every frame carries its connection and direction in its payload, so each frame that
//! leaves the device is checked where it leaves: the right port, translated exactly as
//! software's NAT binding says, checksums valid. After the faults stop and the worker
//! settles:
//! (a) every connection that kept sending is still tracked (same connection id, same
//!     binding) and its packets are forwarded, translated, both ways;
//! (b) no NAT binding is shared: reply tuples are unique and no two live connections
//!     share a translated (address, port, protocol, remote) — also checked throughout;
//! (c) the device table (the driver's table dump) and the software agree: every entry
//!     is a rule of a connection the side table says is offloaded, with that slot,
//!     generation, key and action, and the counts match;
//! (d) nothing panicked, no connection was freed while in hardware, and the counters
//!     add up: per connection and direction, conntrack never counts more packets than
//!     were sent, and the packets of the final quiet phase are counted exactly once
//!     (software plus hardware counters), bytes included.
//!
//! `CTOFFLOAD_FAULT_SEED=<n>` replays a schedule (the seed is printed first, and again on
//! failure); `CTOFFLOAD_FAULT_SECS` (default 20) bounds the traffic phase in wall time and
//! `CTOFFLOAD_FAULT_TICKS` (default 100 000) in ticks of 10 ms model time. The schedule is
//! a function of the seed and the tick; the simulator thread's timing is not, so a
//! replay is close, not identical. Run with the figures shown:
//! `cargo test -p ctoffload-agent --test fault_campaign -- --nocapture`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ctoffload_agent::cli::sim::driver_io;
use ctoffload_agent::dataplane::{
    ConnHandle, Entry, HwRule, HwState, NotOffloaded, OffloadPolicy, Worker, WorkerConfig,
};
use ctoffload_driver::device::{Clock, Device, DeviceConfig, Outcome};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_fallback_sw::nat::rules::{
    AddrRange, NatAction, NatFlags, NatRule, PortRange, RuleMatch,
};
use ctoffload_fallback_sw::table::Status;
use ctoffload_fallback_sw::tuple::{Addr, Family, Tuple, proto};
use ctoffload_hw_regs::{CompletionStatus, FatalCode, FatalUnit, regs};
use ctoffload_nic_sim::port::{MemPort, PortBackend};
use ctoffload_nic_sim::{FaultHandle, SimClock, SimConfig, SimThread, Simulator};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// Wall time one packet of the checks after the faults may take to come out.
const EXCHANGE_WAIT: Duration = Duration::from_secs(2);
/// Model time per tick.
const TICK: u64 = 10 * MS;
/// Wall-clock bound on one wait for the simulator thread (a precondition, never the
/// thing asserted).
const WAIT: Duration = Duration::from_secs(10);
/// Wall time a tick waits for its frames to come out before moving on (frames lost to
/// a fault never come; late ones are matched when they do).
const TICK_WAIT: Duration = Duration::from_millis(20);

/// Inside port (clients) and outside port (servers, NAT to `GW`).
const INSIDE: usize = 0;
const OUTSIDE: usize = 1;
const GW: [u8; 4] = [203, 0, 113, 1];
const NAT_PORTS: PortRange = PortRange::new(40_000, 40_511);
const SERVERS: [[u8; 4]; 3] = [[198, 51, 100, 7], [198, 51, 100, 8], [198, 51, 100, 9]];
const PAYLOAD_LEN: usize = 32;
/// IPv4 length of the test's frames (what conntrack counts as bytes).
const UDP_L3: u64 = 20 + 8 + 32;
const TCP_L3: u64 = 20 + 20 + 32;
const MAGIC: [u8; 4] = [0xC7, 0x0F, 0xFA, 0x17];
/// Live connections the traffic keeps around.
const TARGET_LIVE: usize = 48;
/// Packets sent per tick (each by a random live connection).
const PACKETS_PER_TICK: usize = 6;
/// A handshake packet not delivered after this many ticks is sent again.
const RETRANSMIT_TICKS: u64 = 5;
/// Packets each way per connection in the final counting phase.
const FINAL_PACKETS: u64 = 3;
/// Sequence space of a SYN with the test's payload.
const SYN_LEN: u32 = 32 + 1;

// ---- the rig: worker, driver, simulator thread (as in tests/invariants.rs) --------------

/// Stops the simulator thread when the test ends (a panic in it resurfaces here).
struct SimGuard(Option<SimThread>);

impl Drop for SimGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            drop(s.stop());
        }
    }
}

struct Rig {
    w: Worker<SimIo>,
    sim: SimGuard,
    faults: FaultHandle,
    wire: Vec<MemPort>,
    clock: Arc<AtomicU64>,
}

fn rig() -> Rig {
    let clock = Arc::new(AtomicU64::new(S));
    let mut sim = Simulator::new(SimConfig::small()).expect("simulator");
    let mut wire = Vec::new();
    for p in 0..2u8 {
        let (dev_end, host_end) = MemPort::pair(1024);
        sim.attach_port(p, Box::new(dev_end)).expect("port");
        wire.push(host_end);
    }
    let io = driver_io(&sim, |_, _| ()).expect("sim io");
    let sim = sim.spawn(SimClock::Manual(Arc::clone(&clock)));
    let faults = sim.faults();
    let dcfg = DeviceConfig {
        cmd_ring_log2: 6,
        rx_ring_log2: 8,
        tx_ring_log2: 8,
        cmd_timeout_ns: 100 * MS,
        clock: Clock::manual(Arc::clone(&clock)),
        dump_chunk: 64,
        ready_timeout: Duration::from_secs(2),
        enable_timeout: Duration::from_secs(2),
        ..DeviceConfig::default()
    };
    let dev = Device::new(io, dcfg).expect("bring-up");
    let mut w = Worker::new(
        WorkerConfig {
            port_addrs: vec![None, Some(GW)],
            // A full table evicts the coldest flow, so table-full faults evict entries.
            policy: OffloadPolicy {
                displace_coldest: true,
                ..OffloadPolicy::default()
            },
            ..WorkerConfig::default()
        },
        dev,
    );
    // One rule per protocol (a port range needs one), each with half the range (pools
    // must not overlap).
    let half = NAT_PORTS.min + (NAT_PORTS.max - NAT_PORTS.min) / 2;
    for (id, p, ports) in [
        (1, proto::TCP, PortRange::new(NAT_PORTS.min, half)),
        (2, proto::UDP, PortRange::new(half + 1, NAT_PORTS.max)),
    ] {
        w.nat_mut()
            .rules_mut()
            .add(NatRule {
                id,
                r#match: RuleMatch {
                    out_port: Some(1),
                    proto: Some(p),
                    ..RuleMatch::default()
                },
                action: NatAction::Snat {
                    addrs: AddrRange::v4(GW, GW),
                    ports: Some(ports),
                    flags: NatFlags {
                        random_fully: true,
                        persistent: false,
                    },
                },
            })
            .expect("rule");
    }
    Rig {
        w,
        sim: SimGuard(Some(sim)),
        faults,
        wire,
        clock,
    }
}

impl Rig {
    fn now(&self) -> u64 {
        self.clock.load(Ordering::Acquire)
    }

    /// Moves model time on and waits (bounded, softly: a device in reset may not
    /// answer) until the simulator has polled at the new time.
    fn advance(&mut self, ns: u64) {
        let t = self.clock.fetch_add(ns, Ordering::AcqRel) + ns;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(200) {
            let d = self.w.device_mut();
            let lo = d.read_register(regs::TIMESTAMP_LO).unwrap_or(0);
            let hi = d.read_register(regs::TIMESTAMP_HI).unwrap_or(0);
            if (u64::from(hi) << 32 | u64::from(lo)) >= t {
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn poll(&mut self) {
        let now = self.now();
        self.w.poll(now);
    }
}

// ---- frames ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
}

/// Where a connection is in its life (TCP walks all of them; UDP starts `Open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Syn,
    SynAck,
    Ack,
    Open,
    /// FIN sent by the client; the server's FIN and the last ACK follow.
    Fin(u8),
    Ended,
}

/// One direction: 0 = client to server (in on the inside port), 1 = server to client.
type Dir = usize;

/// The test's model of one connection.
#[derive(Debug)]
struct Conn {
    idx: u32,
    kind: Kind,
    client: [u8; 4],
    cport: u16,
    server: [u8; 4],
    sport: u16,
    /// The NAT port, learned from software's binding when the first frame is checked.
    nat_port: Option<u16>,
    /// Conntrack's connection id and handle, learned with the binding.
    handle: Option<ConnHandle>,
    phase: Phase,
    /// Initial sequence number of each side.
    isn: [u32; 2],
    /// Next sequence number of each side.
    seq: [u32; 2],
    /// Highest sequence end each side has received from the other (what it acks).
    rcvd: [Option<u32>; 2],
    sent: [u64; 2],
    delivered: [u64; 2],
    /// Tick of the last handshake transmission (retransmitted if not delivered).
    handshake_tick: u64,
    /// The handshake packet awaited (direction and sequence end), if any.
    awaiting: Option<(Dir, u32)>,
    seen_offloaded: bool,
    lost_to_fault: bool,
    reoffloaded: bool,
}

impl Conn {
    fn proto(&self) -> u8 {
        match self.kind {
            Kind::Tcp => proto::TCP,
            Kind::Udp => proto::UDP,
        }
    }

    fn orig(&self) -> Tuple {
        Tuple {
            src: Addr::v4(self.client),
            dst: Addr::v4(self.server),
            src_l4: self.cport,
            dst_l4: self.sport,
            proto: self.proto(),
            family: Family::V4,
            zone: 0,
        }
    }

    fn live(&self) -> bool {
        self.phase != Phase::Ended
    }

    /// A frame of this connection in direction `d`, numbered `n`, with TCP `flags`
    /// (`S`, `A`, `F`, `R`); advances the sender's sequence number.
    fn frame(&mut self, d: Dir, n: u64, flags: &str) -> Option<Vec<u8>> {
        let (src, sp, dst, dp) = if d == 0 {
            (self.client, self.cport, self.server, self.sport)
        } else {
            (self.server, self.sport, GW, self.nat_port?)
        };
        let mut payload = [0x5Au8; PAYLOAD_LEN];
        payload[..4].copy_from_slice(&MAGIC);
        payload[4..8].copy_from_slice(&self.idx.to_be_bytes());
        payload[8] = u8::try_from(d).ok()?;
        payload[9..17].copy_from_slice(&n.to_be_bytes());
        let base =
            PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 64);
        let mut v = Vec::new();
        match self.kind {
            Kind::Udp => base.udp(sp, dp).write(&mut v, &payload).expect("build udp"),
            Kind::Tcp => {
                let seq = self.seq[d];
                let mut b = base.tcp(sp, dp, seq, 65_535);
                let mut consumed = u32::try_from(PAYLOAD_LEN).ok()?;
                if flags.contains('S') {
                    b = b.syn();
                    consumed += 1;
                }
                if flags.contains('F') {
                    b = b.fin();
                    consumed += 1;
                }
                if flags.contains('R') {
                    b = b.rst();
                }
                if flags.contains('A') {
                    b = b.ack(self.rcvd[d].unwrap_or(0));
                }
                b.write(&mut v, &payload).expect("build tcp");
                self.seq[d] = seq.wrapping_add(consumed);
            }
        }
        self.sent[d] += 1;
        Some(v)
    }
}

/// A frame that left the device, decoded: (connection index, direction, sequence end).
fn decode(frame: &[u8]) -> Result<(u32, Dir, u32, Tuple), String> {
    let h = PacketHeaders::from_ethernet_slice(frame).map_err(|e| format!("unparsable: {e}"))?;
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        return Err("not IPv4".into());
    };
    if ip.calc_header_checksum() != ip.header_checksum {
        return Err("bad IPv4 header checksum".into());
    }
    let payload = h.payload.slice();
    let (sp, dp, p, seq_end) = match &h.transport {
        Some(TransportHeader::Udp(u)) => {
            let ok = u
                .calc_checksum_ipv4(ip, payload)
                .is_ok_and(|c| c == u.checksum);
            if !ok {
                return Err("bad UDP checksum".into());
            }
            (u.source_port, u.destination_port, proto::UDP, 0)
        }
        Some(TransportHeader::Tcp(t)) => {
            let ok = t
                .calc_checksum_ipv4(ip, payload)
                .is_ok_and(|c| c == t.checksum);
            if !ok {
                return Err("bad TCP checksum".into());
            }
            let len =
                u32::try_from(payload.len()).unwrap_or(0) + u32::from(t.syn) + u32::from(t.fin);
            (
                t.source_port,
                t.destination_port,
                proto::TCP,
                t.sequence_number.wrapping_add(len),
            )
        }
        _ => return Err("neither TCP nor UDP".into()),
    };
    if payload.len() != PAYLOAD_LEN || payload[..4] != MAGIC {
        return Err("payload is not the test's".into());
    }
    let idx = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    let d = usize::from(payload[8]);
    let t = Tuple {
        src: Addr::v4(ip.source),
        dst: Addr::v4(ip.destination),
        src_l4: sp,
        dst_l4: dp,
        proto: p,
        family: Family::V4,
        zone: 0,
    };
    Ok((idx, d, seq_end, t))
}

// ---- the fault schedule -----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    /// Completions never written: the driver's command timeout.
    CommandTimeout,
    /// Commands complete with `DEVICE_ERROR`.
    DeviceError,
    /// Inserts answer `TABLE_FULL` above a fill level, for a while.
    TableFull,
    /// Fatal error (DMA, parity, internal, ring configuration).
    Fatal,
    /// Commands take 60 ms: the 50 ms watchdog makes the device fatal (`CMD_HANG`).
    CommandHang,
    /// Commands take 1 to 30 ms of model time, for a while (no fault by themselves).
    SlowCommands,
    /// Device-internal reset: table lost.
    SpontaneousReset,
    /// Function-level reset from the host side.
    Flr,
}

const FAULT_KINDS: [FaultKind; 8] = [
    FaultKind::CommandTimeout,
    FaultKind::DeviceError,
    FaultKind::TableFull,
    FaultKind::Fatal,
    FaultKind::CommandHang,
    FaultKind::SlowCommands,
    FaultKind::SpontaneousReset,
    FaultKind::Flr,
];

/// Faults with a duration: undone at `until` (a tick).
#[derive(Debug, Default)]
struct Lasting {
    table_full_until: Option<u64>,
    slow_until: Option<u64>,
}

fn inject(r: &Rig, rng: &mut StdRng, kind: FaultKind, tick: u64, lasting: &mut Lasting) {
    let f = &r.faults;
    match kind {
        FaultKind::CommandTimeout => f.drop_completions(rng.random_range(1..=3)),
        FaultKind::DeviceError => f.device_error_next(rng.random_range(1..=4)),
        FaultKind::TableFull => {
            f.table_full_at(rng.random_range(0..=40));
            lasting.table_full_until = Some(tick + rng.random_range(20..=120));
        }
        FaultKind::Fatal => {
            let codes = [
                FatalCode::DmaError,
                FatalCode::Parity,
                FatalCode::Internal,
                FatalCode::RingConfig,
            ];
            let units = [
                FatalUnit::None,
                FatalUnit::CmdRing,
                FatalUnit::RxRing,
                FatalUnit::FlowTable,
            ];
            f.fatal(
                codes[rng.random_range(0..codes.len())],
                units[rng.random_range(0..units.len())],
            );
        }
        FaultKind::CommandHang => {
            f.slow_commands(60 * MS);
            lasting.slow_until = Some(tick + rng.random_range(3..=10));
        }
        FaultKind::SlowCommands => {
            f.slow_commands(rng.random_range(1..=30) * MS);
            lasting.slow_until = Some(tick + rng.random_range(10..=60));
        }
        FaultKind::SpontaneousReset => f.spontaneous_reset(),
        FaultKind::Flr => {
            if let Some(s) = r.sim.0.as_ref() {
                s.request_flr();
            }
        }
    }
    faults_applied(f);
}

/// Waits until the simulator thread took every armed fault, so what the campaign does
/// next meets it (keeps a seed's run the same from one run to the next).
fn faults_applied(f: &FaultHandle) {
    assert!(
        f.wait_applied(Duration::from_secs(10)),
        "the simulator did not apply the armed faults"
    );
}

fn undo_lasting(r: &Rig, tick: u64, lasting: &mut Lasting) {
    if lasting.table_full_until.is_some_and(|t| tick >= t) {
        // The effective limit is min(FLOW_LIMIT, fill): this lifts it.
        r.faults.table_full_at(u32::MAX);
        lasting.table_full_until = None;
    }
    if lasting.slow_until.is_some_and(|t| tick >= t) {
        r.faults.slow_commands(0);
        lasting.slow_until = None;
    }
    faults_applied(&r.faults);
}

// ---- the campaign -------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[derive(Debug, Default)]
struct Figures {
    ticks: u64,
    injected: BTreeMap<String, u64>,
    opened_tcp: u64,
    opened_udp: u64,
    ended_fin: u64,
    ended_rst: u64,
    ended_udp: u64,
    packets_sent: u64,
    packets_delivered: u64,
    retransmits: u64,
    nat_checks: u64,
}

struct Campaign {
    r: Rig,
    rng: StdRng,
    seed: u64,
    conns: Vec<Conn>,
    tick: u64,
    next_cport: u16,
    errors: Vec<String>,
    fig: Figures,
}

impl Campaign {
    fn new(seed: u64) -> Self {
        Self {
            r: rig(),
            rng: StdRng::seed_from_u64(seed),
            seed,
            conns: Vec::new(),
            tick: 0,
            next_cport: 10_000,
            errors: Vec::new(),
            fig: Figures::default(),
        }
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < 50 {
            self.errors.push(e);
        }
    }

    fn open(&mut self) {
        let kind = if self.rng.random_bool(0.5) {
            self.fig.opened_tcp += 1;
            Kind::Tcp
        } else {
            self.fig.opened_udp += 1;
            Kind::Udp
        };
        let n = u8::try_from(self.conns.len() % 200).unwrap_or(0);
        let idx = u32::try_from(self.conns.len()).expect("fewer than 2^32 connections");
        let cport = self.next_cport;
        self.next_cport = self.next_cport.wrapping_add(1).max(10_000);
        let server = SERVERS[self.rng.random_range(0..SERVERS.len())];
        let sport = [80, 443, 53][self.rng.random_range(0..3)];
        let isn = [self.rng.random(), self.rng.random()];
        self.conns.push(Conn {
            idx,
            kind,
            client: [192, 168, 1, 10 + n % 40],
            cport,
            server,
            sport,
            nat_port: None,
            handle: None,
            phase: match kind {
                Kind::Tcp => Phase::Syn,
                Kind::Udp => Phase::Open,
            },
            isn,
            seq: isn,
            rcvd: [None, None],
            sent: [0, 0],
            delivered: [0, 0],
            handshake_tick: 0,
            awaiting: None,
            seen_offloaded: false,
            lost_to_fault: false,
            reoffloaded: false,
        });
        self.step(self.conns.len() - 1, None);
    }

    fn send(&mut self, i: usize, d: Dir, flags: &str) -> bool {
        let n = self.fig.packets_sent;
        let Some(f) = self.conns[i].frame(d, n, flags) else {
            return false;
        };
        self.fig.packets_sent += 1;
        let port = if d == 0 { INSIDE } else { OUTSIDE };
        self.r.wire[port].send(&f).expect("inject");
        true
    }

    /// The connection's next packet: the handshake step (retransmitted when not
    /// delivered), data in direction `d` (random if `None`), or the closing sequence.
    fn step(&mut self, i: usize, d: Option<Dir>) -> bool {
        let tick = self.tick;
        let c = &mut self.conns[i];
        let handshake = match c.phase {
            Phase::Syn => Some((0, "S", c.isn[0])),
            Phase::SynAck => Some((1, "SA", c.isn[1])),
            Phase::Ack => Some((0, "A", c.isn[0].wrapping_add(SYN_LEN))),
            _ => None,
        };
        if let Some((hd, flags, seq)) = handshake {
            // Stop and wait: the same packet again once it is overdue.
            if c.awaiting.is_some() {
                if tick < c.handshake_tick + RETRANSMIT_TICKS {
                    return false;
                }
                self.fig.retransmits += 1;
            }
            let c = &mut self.conns[i];
            c.seq[hd] = seq;
            c.handshake_tick = tick;
            let sent = self.send(i, hd, flags);
            let c = &mut self.conns[i];
            c.awaiting = Some((hd, c.seq[hd]));
            return sent;
        }
        match self.conns[i].phase {
            Phase::Open => {
                let d = d.unwrap_or_else(|| usize::from(self.rng.random_bool(0.5)));
                let d = if self.conns[i].nat_port.is_none() {
                    0
                } else {
                    d
                };
                match self.conns[i].kind {
                    Kind::Udp => self.send(i, d, ""),
                    Kind::Tcp => self.send(i, d, "A"),
                }
            }
            Phase::Fin(k) => {
                let sent = match k {
                    0 => self.send(i, 1, "FA"),
                    _ => self.send(i, 0, "A"),
                };
                self.conns[i].phase = if k == 0 { Phase::Fin(1) } else { Phase::Ended };
                sent
            }
            Phase::Syn | Phase::SynAck | Phase::Ack | Phase::Ended => false,
        }
    }

    /// Ends an open connection: FIN (three packets over three ticks), RST from either
    /// side, or (UDP) it just stops sending.
    fn end(&mut self, i: usize) {
        match self.conns[i].kind {
            Kind::Udp => {
                self.conns[i].phase = Phase::Ended;
                self.fig.ended_udp += 1;
            }
            Kind::Tcp if self.rng.random_bool(0.5) => {
                self.send(i, 0, "FA");
                self.conns[i].phase = Phase::Fin(0);
                self.fig.ended_fin += 1;
            }
            Kind::Tcp => {
                let d = usize::from(self.rng.random_bool(0.5));
                self.send(i, d, "RA");
                self.conns[i].phase = Phase::Ended;
                self.fig.ended_rst += 1;
            }
        }
    }

    /// Checks one frame that left the device on `port`.
    fn check_frame(&mut self, port: usize, f: &[u8]) {
        let (idx, d, seq_end, t) = match decode(f) {
            Ok(x) => x,
            Err(e) => return self.error(format!("frame out of port {port}: {e}")),
        };
        let Some(i) = usize::try_from(idx).ok().filter(|&i| i < self.conns.len()) else {
            return self.error(format!("frame of unknown connection {idx}"));
        };
        if (d == 0 && port != OUTSIDE) || (d == 1 && port != INSIDE) {
            return self.error(format!("connection {idx} dir {d} left on port {port}"));
        }
        if self.conns[i].nat_port.is_none() {
            self.learn(i);
        }
        let c = &mut self.conns[i];
        let Some(nat_port) = c.nat_port else {
            return self.error(format!("connection {idx}: frame out, but no NAT binding"));
        };
        let want = if d == 0 {
            Tuple {
                src: Addr::v4(GW),
                src_l4: nat_port,
                ..c.orig()
            }
        } else {
            Tuple {
                src: Addr::v4(c.server),
                dst: Addr::v4(c.client),
                src_l4: c.sport,
                dst_l4: c.cport,
                ..c.orig()
            }
        };
        if t != want {
            let e = format!("connection {idx} dir {d}: left as {t:?}, want {want:?}");
            return self.error(e);
        }
        c.delivered[d] += 1;
        self.fig.packets_delivered += 1;
        if c.kind == Kind::Tcp {
            let other = 1 - d;
            // Only forward (a late frame does not move the ack back).
            if c.rcvd[other].is_none_or(|r| seq_end.wrapping_sub(r) < 1 << 30) {
                c.rcvd[other] = Some(seq_end);
            }
            if c.awaiting == Some((d, seq_end)) {
                c.awaiting = None;
                c.phase = match c.phase {
                    Phase::Syn => Phase::SynAck,
                    Phase::SynAck => Phase::Ack,
                    Phase::Ack => Phase::Open,
                    p => p,
                };
            }
        }
    }

    /// Learns a connection's binding from software (conntrack's reply tuple).
    fn learn(&mut self, i: usize) {
        let now = self.r.now();
        let orig = self.conns[i].orig();
        let Some(h) = self.r.w.find(&orig, now) else {
            return;
        };
        let Some(conn) = self.r.w.conntrack().table().get_checked(h.slot, h.id) else {
            return;
        };
        let reply = conn.tuples[1];
        if reply.dst != Addr::v4(GW) || !(NAT_PORTS.min..=NAT_PORTS.max).contains(&reply.dst_l4) {
            let e = format!("connection {i}: reply tuple {reply:?} is not into the NAT range");
            return self.error(e);
        }
        self.conns[i].nat_port = Some(reply.dst_l4);
        self.conns[i].handle = Some(h);
    }

    fn drain(&mut self) {
        for port in [INSIDE, OUTSIDE] {
            for f in self.r.wire[port].drain_vecs() {
                self.check_frame(port, &f);
            }
        }
    }

    /// Polls the worker until `want` more frames came out or `limit` passed.
    fn pump(&mut self, want: u64, limit: Duration) {
        let target = self.fig.packets_delivered + want;
        let t0 = Instant::now();
        loop {
            self.r.poll();
            self.drain();
            if self.fig.packets_delivered >= target || t0.elapsed() >= limit {
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// (b): reply tuples unique; no two live connections share a translated
    /// (address, port, protocol, remote address, remote port).
    fn check_nat_unique(&mut self) {
        self.fig.nat_checks += 1;
        let now = self.r.now();
        let mut replies = HashSet::new();
        let mut bound = HashSet::new();
        let mut errs = Vec::new();
        for (_, c) in self.r.w.conntrack().table().iter(now) {
            let rt = c.tuples[1];
            if !replies.insert(rt) {
                errs.push(format!("reply tuple {rt:?} held twice"));
            }
            if rt.dst == Addr::v4(GW) {
                let key = (rt.dst, rt.dst_l4, rt.proto, rt.src, rt.src_l4);
                if !bound.insert(key) {
                    errs.push(format!("NAT binding {key:?} double-bound"));
                }
            }
        }
        for e in errs {
            self.error(format!("tick {}: {e}", self.tick));
        }
    }

    /// Notes which live connections are in hardware, lost it to a fault, got it back.
    fn observe_offload(&mut self) {
        for c in self.conns.iter_mut().filter(|c| c.live()) {
            let Some(h) = c.handle else { continue };
            match self.r.w.hw_state(h) {
                Some((HwState::Offloaded, _)) => {
                    if c.lost_to_fault {
                        c.reoffloaded = true;
                    }
                    c.seen_offloaded = true;
                }
                Some((HwState::None, Some(NotOffloaded::DeviceDown))) if c.seen_offloaded => {
                    c.lost_to_fault = true;
                }
                _ => {}
            }
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| self.conns[i].live())
            .collect()
    }

    fn traffic_tick(&mut self, lasting: &mut Lasting, fault_every: u64) {
        self.tick += 1;
        self.r.advance(TICK);
        undo_lasting(&self.r, self.tick, lasting);
        if self.rng.random_range(0..fault_every) == 0 {
            let kind = FAULT_KINDS[self.rng.random_range(0..FAULT_KINDS.len())];
            inject(&self.r, &mut self.rng, kind, self.tick, lasting);
            *self.fig.injected.entry(format!("{kind:?}")).or_default() += 1;
        }
        let mut sent = 0;
        // Closing sequences in progress move on every tick.
        for i in self.live() {
            if matches!(self.conns[i].phase, Phase::Fin(_)) && self.step(i, None) {
                sent += 1;
            }
        }
        let live = self.live();
        if live.len() < TARGET_LIVE || self.rng.random_bool(0.05) {
            self.open();
            sent += 1;
        }
        if live.len() > TARGET_LIVE / 2 && self.rng.random_bool(0.05) {
            let i = live[self.rng.random_range(0..live.len())];
            if self.conns[i].phase == Phase::Open {
                self.end(i);
                sent += 1;
            }
        }
        let live = self.live();
        for _ in 0..PACKETS_PER_TICK.min(live.len()) {
            let i = live[self.rng.random_range(0..live.len())];
            if self.conns[i].live() && self.step(i, None) {
                sent += 1;
            }
        }
        // Handshakes waiting for a lost packet retransmit.
        for i in self.live() {
            if matches!(self.conns[i].phase, Phase::Syn | Phase::SynAck | Phase::Ack)
                && self.step(i, None)
            {
                sent += 1;
            }
        }
        self.pump(sent, TICK_WAIT);
        if self.tick % 10 == 0 {
            let now = self.r.now();
            self.r.w.reconcile(now);
        }
        if self.tick % 5 == 0 {
            self.observe_offload();
        }
        if self.tick % 50 == 0 {
            self.check_nat_unique();
        }
    }

    /// After the faults: model time moves until the device is up and nothing is
    /// outstanding (bounded in wall time).
    fn settle(&mut self) {
        let t0 = Instant::now();
        let mut quiet = 0;
        while quiet < 3 {
            assert!(
                t0.elapsed() < WAIT * 3,
                "seed {}: the worker did not settle (device up: {}, outstanding: {})",
                self.seed,
                self.r.w.device_up(),
                self.r.w.commands_outstanding()
            );
            // Commands in flight complete before model time moves (or they would look
            // timed out).
            let t1 = Instant::now();
            while self.r.w.commands_outstanding() > 0 && t1.elapsed() < Duration::from_millis(500) {
                self.r.poll();
                self.drain();
                std::thread::sleep(Duration::from_micros(50));
            }
            if self.r.w.device_up() && self.r.w.commands_outstanding() == 0 {
                quiet += 1;
            } else {
                quiet = 0;
                self.r.advance(200 * MS);
            }
            let now = self.r.now();
            self.r.w.reconcile(now);
            self.r.poll();
            self.drain();
        }
    }

    /// Sends the connection's next packet in `d` and waits until it is delivered.
    fn exchange(&mut self, i: usize, d: Dir) -> bool {
        let before = self.conns[i].delivered[d];
        if !self.step(i, Some(d)) {
            return false;
        }
        let t0 = Instant::now();
        while self.conns[i].delivered[d] == before && t0.elapsed() < EXCHANGE_WAIT {
            self.pump(1, Duration::from_millis(50));
        }
        self.conns[i].delivered[d] > before
    }

    /// (a): every live connection finishes its handshake if needed, is still the
    /// connection software bound at its start, and gets a packet through each way.
    fn check_liveness(&mut self) -> usize {
        let mut kept = 0;
        for i in self.live() {
            // A closing sequence in progress ends first (it is not checked).
            while matches!(self.conns[i].phase, Phase::Fin(_)) {
                self.step(i, None);
            }
            if !self.conns[i].live() {
                continue;
            }
            for _ in 0..3 {
                if !matches!(self.conns[i].phase, Phase::Syn | Phase::SynAck | Phase::Ack) {
                    break;
                }
                self.conns[i].handshake_tick = 0;
                let d = if self.conns[i].phase == Phase::SynAck {
                    1
                } else {
                    0
                };
                if !self.exchange(i, d) {
                    let e = format!(
                        "connection {i}: handshake packet lost after the faults ({:?})",
                        self.conns[i],
                    );
                    self.error(e);
                    break;
                }
            }
            let ok =
                self.conns[i].phase == Phase::Open && self.exchange(i, 0) && self.exchange(i, 1);
            let now = self.r.now();
            let orig = self.conns[i].orig();
            let found = self.r.w.find(&orig, now);
            let same = found.is_some() && found == self.conns[i].handle;
            if !ok || !same {
                let c = &self.conns[i];
                let e = format!(
                    "connection {i} ({:?}, {:?}) lost: forwarded both ways {ok}, \
                     tracked as {found:?}, bound at start as {:?}",
                    c.kind, c.phase, c.handle
                );
                self.error(e);
                continue;
            }
            let nat = self.conns[i].nat_port;
            let binding = found
                .and_then(|h| self.r.w.conntrack().table().get_checked(h.slot, h.id))
                .map(|c| c.tuples[1].dst_l4);
            if binding != nat {
                self.error(format!(
                    "connection {i}: binding moved from {nat:?} to {binding:?}"
                ));
                continue;
            }
            kept += 1;
        }
        kept
    }

    fn counters(&self, h: ConnHandle) -> Option<[(u64, u64); 2]> {
        let c = self.r.w.conntrack().table().get_checked(h.slot, h.id)?;
        Some([
            (c.counters[0].packets, c.counters[0].bytes),
            (c.counters[1].packets, c.counters[1].bytes),
        ])
    }

    /// (d): over the whole run conntrack never counts more than was sent; in a quiet
    /// phase every packet is counted exactly once, bytes included (L3 length).
    fn check_counters(&mut self) -> u64 {
        let now = self.r.now();
        self.r.w.reconcile_full_sweep(now);
        self.settle();
        let live = self.live();
        let mut base = HashMap::new();
        for &i in &live {
            let Some(h) = self.conns[i].handle else {
                continue;
            };
            let Some(c) = self.counters(h) else { continue };
            for (d, (packets, _)) in c.iter().enumerate() {
                if *packets > self.conns[i].sent[d] {
                    let e = format!(
                        "connection {i} dir {d}: counted {packets} packets, sent {}",
                        self.conns[i].sent[d]
                    );
                    self.error(e);
                }
            }
            base.insert(i, (h, c));
        }
        for &i in &live {
            for _ in 0..FINAL_PACKETS {
                for d in 0..2 {
                    if !self.exchange(i, d) {
                        self.error(format!("connection {i} dir {d}: final packet lost"));
                    }
                }
            }
        }
        let now = self.r.now();
        self.r.w.reconcile_full_sweep(now);
        self.settle();
        let mut checked = 0;
        for (i, (h, before)) in base {
            let Some(after) = self.counters(h) else {
                self.error(format!("connection {i} gone in the final phase"));
                continue;
            };
            let l3 = match self.conns[i].kind {
                Kind::Udp => UDP_L3,
                Kind::Tcp => TCP_L3,
            };
            for d in 0..2 {
                let got = (after[d].0 - before[d].0, after[d].1 - before[d].1);
                let want = (FINAL_PACKETS, FINAL_PACKETS * l3);
                if got != want {
                    let e = format!(
                        "connection {i} dir {d}: final phase counted {got:?}, sent {want:?}"
                    );
                    self.error(e);
                }
            }
            checked += 1;
        }
        checked
    }

    /// (c): the device table and the side table agree.
    fn check_tables(&mut self) -> (usize, usize) {
        let table = match self.r.w.device_mut().dump_table() {
            Ok(t) => t,
            Err(e) => {
                self.error(format!("table dump failed: {e}"));
                return (0, 0);
            }
        };
        let now = self.r.now();
        let handles: Vec<ConnHandle> = self
            .r
            .w
            .conntrack()
            .table()
            .iter(now)
            .map(|(slot, c)| ConnHandle { slot, id: c.id })
            .collect();
        let mut rules = HashMap::new();
        let mut offloaded = 0;
        let mut errs = Vec::new();
        for h in handles {
            let Some(rec) = self.r.w.hw_record(h) else {
                continue;
            };
            let status = self
                .r
                .w
                .conntrack()
                .table()
                .get_checked(h.slot, h.id)
                .map(|c| c.status)
                .unwrap_or_default();
            match rec.state {
                HwState::Offloaded => {
                    offloaded += 1;
                    if !status.contains(Status::OFFLOAD | Status::HW_OFFLOAD) {
                        errs.push(format!("{h:?} offloaded, status {status:?}"));
                    }
                    let Some(r) = rec.rules else {
                        errs.push(format!("{h:?} offloaded without rules"));
                        continue;
                    };
                    for (d, (entry, rule)) in rec.entries.iter().zip(r).enumerate() {
                        match *entry {
                            Entry::Installed {
                                flow_id,
                                generation,
                            } => {
                                rules.insert((flow_id.get(), generation), (h, rule));
                            }
                            e => errs.push(format!("{h:?} offloaded, entry {d} {e:?}")),
                        }
                    }
                }
                HwState::None => {
                    if status.contains(Status::HW_OFFLOAD) {
                        errs.push(format!("{h:?} not in hardware, status {status:?}"));
                    }
                }
                s => errs.push(format!("{h:?} still {s:?} after settling")),
            }
        }
        for e in &table {
            let got = HwRule {
                key: e.key,
                action: e.action,
            };
            match rules.remove(&(e.flow_id.get(), e.generation)) {
                Some((_, want)) if want == got => {}
                Some((h, want)) => errs.push(format!(
                    "slot {} of {h:?}: {got:?}, want {want:?}",
                    e.flow_id.get()
                )),
                None => errs.push(format!(
                    "device entry in slot {} generation {} belongs to no offloaded connection",
                    e.flow_id.get(),
                    e.generation
                )),
            }
        }
        for ((slot, _), (h, _)) in rules {
            errs.push(format!(
                "{h:?}: rule in slot {slot} missing from the device"
            ));
        }
        if table.len() != 2 * offloaded {
            errs.push(format!(
                "{} device entries for {offloaded} offloaded connections",
                table.len()
            ));
        }
        for e in errs {
            self.error(e);
        }
        (table.len(), offloaded)
    }
}

#[test]
fn fault_campaign_under_traffic() {
    let seed = env_u64("CTOFFLOAD_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()))
    });
    let secs = env_u64("CTOFFLOAD_FAULT_SECS").unwrap_or(20);
    let max_ticks = env_u64("CTOFFLOAD_FAULT_TICKS").unwrap_or(100_000);
    println!("fault campaign: CTOFFLOAD_FAULT_SEED={seed} (reproduces the schedule)");
    let wall = Instant::now();
    let mut c = Campaign::new(seed);
    let mut lasting = Lasting::default();
    // Warm up without faults, then one fault every 25 ticks on average.
    while c.tick < 50 {
        c.traffic_tick(&mut lasting, u64::MAX);
    }
    let deadline = Duration::from_secs(secs);
    while wall.elapsed() < deadline && c.tick < max_ticks {
        c.traffic_tick(&mut lasting, 25);
    }
    c.fig.ticks = c.tick;
    c.r.faults.clear();
    faults_applied(&c.r.faults);
    c.settle();
    c.check_nat_unique();
    let kept = c.check_liveness();
    c.settle();
    let counted = c.check_counters();
    c.check_nat_unique();
    let (entries, offloaded) = c.check_tables();
    let st = c.r.w.stats();
    if st.freed_while_in_hw != 0 {
        c.error(format!(
            "{} connections freed while in hardware",
            st.freed_while_in_hw
        ));
    }
    let sim_alive = c.r.sim.0.take().map(SimThread::stop).is_some();
    let live = c.live().len();
    let reoffloaded = c.conns.iter().filter(|x| x.reoffloaded).count();
    let lost_hw = c.conns.iter().filter(|x| x.lost_to_fault).count();
    let injected_total: u64 = c.fig.injected.values().sum();

    let f = &c.fig;
    println!(
        "\nfault campaign, seed {seed}, {} ticks ({} s model), {:.1} s wall",
        f.ticks,
        f.ticks * TICK / S,
        wall.elapsed().as_secs_f64()
    );
    println!("| figure | value |\n| --- | ---: |");
    for (k, v) in &f.injected {
        println!("| faults injected: {k} | {v} |");
    }
    let rows: [(&str, u64); 26] = [
        ("faults injected, total", injected_total),
        ("device faults seen by the worker", st.faults),
        ("recoveries (reinit)", st.recoveries),
        ("failed recovery attempts", st.recover_failures),
        ("connections opened: TCP", f.opened_tcp),
        ("connections opened: UDP", f.opened_udp),
        ("connections ended: FIN", f.ended_fin),
        ("connections ended: RST", f.ended_rst),
        ("connections ended: UDP stopped", f.ended_udp),
        ("connections kept (checked both ways)", kept as u64),
        ("connections counted exactly in the final phase", counted),
        (
            "connections seen losing hardware state to a fault",
            lost_hw as u64,
        ),
        ("of those re-offloaded", reoffloaded as u64),
        ("offloads (worker, all)", st.offloaded),
        (
            "flows returned to software by a fault (per fault)",
            st.flows_lost_to_fault,
        ),
        ("flows returned to software, all causes", st.returned),
        ("inserts refused: table full", st.insert_table_full),
        ("entries evicted: coldest flow displaced", st.displaced),
        ("inserts refused: device error", st.insert_error),
        ("packets sent", f.packets_sent),
        ("packets delivered", f.packets_delivered),
        ("handshake retransmissions", f.retransmits),
        ("packets counted by hardware", st.hw_packets),
        ("device entries at the end", entries as u64),
        ("connections offloaded at the end", offloaded as u64),
        ("NAT uniqueness checks", f.nat_checks),
    ];
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    let json = serde_json::json!({
        "seed": seed,
        "ticks": f.ticks,
        "wall_s": wall.elapsed().as_secs_f64(),
        "faults_injected": f.injected,
        "faults_injected_total": injected_total,
        "faults_seen": st.faults,
        "recoveries": st.recoveries,
        "recover_failures": st.recover_failures,
        "opened_tcp": f.opened_tcp,
        "opened_udp": f.opened_udp,
        "ended_fin": f.ended_fin,
        "ended_rst": f.ended_rst,
        "ended_udp": f.ended_udp,
        "live_at_end": live,
        "kept": kept,
        "counted_exactly": counted,
        "lost_hw_to_fault": lost_hw,
        "reoffloaded": reoffloaded,
        "offloads": st.offloaded,
        "flows_lost_to_fault": st.flows_lost_to_fault,
        "returned": st.returned,
        "insert_table_full": st.insert_table_full,
        "displaced": st.displaced,
        "insert_error": st.insert_error,
        "packets_sent": f.packets_sent,
        "packets_delivered": f.packets_delivered,
        "hw_packets": st.hw_packets,
        "device_entries": entries,
        "offloaded_at_end": offloaded,
        "errors": c.errors.len(),
    });
    println!("{json}");
    assert!(sim_alive, "seed {seed}: simulator thread gone");
    assert!(
        c.errors.is_empty(),
        "fault campaign failed, CTOFFLOAD_FAULT_SEED={seed}:\n{}\nworker: {st:?}",
        c.errors.join("\n")
    );
    assert_eq!(kept, live, "seed {seed}: every live connection kept");
    assert!(
        injected_total > 0 && st.recoveries > 0,
        "seed {seed}: faults were injected and recovered from"
    );
}

/// The checks themselves fail when they should: a device entry no connection owns, a
/// frame translated differently from software's binding, and a connection lost after
/// the faults are each reported.
#[test]
fn the_checks_catch_broken_invariants() {
    let mut c = Campaign::new(7);
    let mut lasting = Lasting::default();
    while c.tick < 60 {
        c.traffic_tick(&mut lasting, u64::MAX);
    }
    c.settle();
    let kept = c.check_liveness();
    assert!(kept > 0 && c.errors.is_empty(), "{:?}", c.errors);
    c.settle();
    c.check_tables();
    assert!(c.errors.is_empty(), "clean before: {:?}", c.errors);
    // (c): a stray device entry (in the room of a deleted connection: a full table
    // would refuse it). A connection waiting to retry its offload may take the room
    // first (on a slow machine settling moves model time past its backoff): then make
    // room again.
    let stray = ctoffload_hw_regs::FlowKey::ipv4(
        0,
        ctoffload_hw_regs::L4Proto::Udp,
        0,
        [10, 9, 9, 9].into(),
        1,
        [10, 9, 9, 8].into(),
        2,
    );
    let mut inserted = None;
    for _ in 0..8 {
        let now = c.r.now();
        let room = c
            .live()
            .into_iter()
            .filter_map(|i| c.conns[i].handle)
            .find(|&h| matches!(c.r.w.hw_state(h), Some((HwState::Offloaded, _))))
            .expect("an offloaded connection");
        c.r.w.delete_connection(room, now);
        c.settle();
        let res =
            c.r.w
                .device_mut()
                .execute(
                    &[ctoffload_driver::device::FlowCommand::Insert {
                        key: stray,
                        action: ctoffload_hw_regs::FlowAction::forward(1),
                    }],
                    WAIT,
                )
                .expect("insert");
        inserted = Some(res[0].outcome);
        if res[0].is_ok() {
            break;
        }
    }
    assert_eq!(
        inserted,
        Some(Outcome::Status(CompletionStatus::Ok)),
        "the stray insert"
    );
    c.check_tables();
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains("belongs to no offloaded connection")),
        "{:?}",
        c.errors
    );
    // (a)/(b): a frame of a connection that left with another NAT port.
    c.errors.clear();
    let i = c
        .live()
        .into_iter()
        .find(|&i| c.conns[i].nat_port.is_some())
        .expect("bound");
    let f = c.conns[i].frame(0, 0, "A").expect("frame");
    let wrong = c.conns[i].nat_port.map_or(1, |p| p ^ 1);
    let payload = &f[f.len() - PAYLOAD_LEN..];
    let (kind, server, sport) = (c.conns[i].kind, c.conns[i].server, c.conns[i].sport);
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(GW, server, 64);
    let mut f = Vec::new();
    match kind {
        Kind::Udp => b.udp(wrong, sport).write(&mut f, payload),
        Kind::Tcp => b.tcp(wrong, sport, 1, 65_535).write(&mut f, payload),
    }
    .expect("build");
    c.check_frame(OUTSIDE, &f);
    assert!(
        c.errors.iter().any(|e| e.contains("want")),
        "{:?}",
        c.errors
    );
    // (a): a live connection whose conntrack entry is gone.
    c.errors.clear();
    let now = c.r.now();
    let h = c.conns[i].handle.expect("handle");
    c.r.w.delete_connection(h, now);
    c.settle();
    c.check_liveness();
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains(&format!("connection {i} "))),
        "{:?}",
        c.errors
    );
}
