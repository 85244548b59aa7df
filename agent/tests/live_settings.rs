//! Settings changed through the gRPC API (a real tonic client over the Unix socket)
//! and through a configuration reload (`Agent::reload`, what SIGHUP runs) take
//! effect in the running engine: on the sim backend (`DataplaneControl`: frames
//! injected into the simulator's wire port, emitted frames read back) and on the
//! software backend (`SoftwareControl` with a clock driven by the test).
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod grpc;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ctoffload_agent::api::software::Clock;
use ctoffload_agent::api::{ServeError, SoftwareControl};
use ctoffload_agent::cli::agent::{Agent, AgentControl, conntrack_config};
use ctoffload_agent::cli::sim::{self, SimDataplane};
use ctoffload_agent::config;
use ctoffload_agent::metrics::MetricsHandle;
use ctoffload_fallback_sw::conntrack::{Invalid, Verdict};
use ctoffload_nic_sim::port::PortBackend as _;
use ctoffload_proto::v1 as pb;
use ctoffload_proto::v1::conntrack_service_client::ConntrackServiceClient;
use ctoffload_proto::v1::nat_service_client::NatServiceClient;
use ctoffload_proto::v1::settings_service_client::SettingsServiceClient;
use ctoffload_proto::v1::stats_service_client::StatsServiceClient;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const S: u64 = 1_000_000_000;
/// Wall-clock bound on waiting for the worker thread (never the thing asserted).
const WAIT: Duration = Duration::from_secs(15);

const SERVER: [u8; 4] = [198, 51, 100, 7];
const POOL: &str = "192.0.2.50";

/// The agent over a control plane, serving the API on a Unix socket.
struct Harness {
    dir: tempfile::TempDir,
    agent: Agent,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
    channel: Channel,
    /// The sim backend's dataplane (wire ports), stopped on drop.
    sim: Option<SimDataplane>,
    /// The software backend's clock (ns).
    clock: Arc<AtomicU64>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(s) = self.sim.as_mut() {
            s.stop();
        }
    }
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("ctoffload.toml");
    let text = format!(
        "[api]\nsocket = {:?}\n[offload]\nenabled = false\n{extra}",
        dir.join("unused.sock")
    );
    let tmp = dir.join("ctoffload.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// `backend`: `sim` or `software`; `extra`: more configuration.
async fn start(backend: &str, extra: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("[backend]\nkind = {backend:?}\n{extra}"),
    );
    let cfg = config::load(&path).unwrap();
    let metrics = MetricsHandle::default();
    let clock = Arc::new(AtomicU64::new(S));
    let (control, sim) = if backend == "sim" {
        let dp = sim::start(&cfg, metrics.clone()).unwrap();
        (AgentControl::Dataplane(Arc::clone(&dp.control)), Some(dp))
    } else {
        let c = Arc::clone(&clock);
        let clock_fn: Clock = Arc::new(move || c.load(Ordering::SeqCst));
        let sw = SoftwareControl::with_clock(conntrack_config(&cfg), 4096, clock_fn);
        (AgentControl::Software(Arc::new(sw)), None)
    };
    let agent = Agent::with_control(path, cfg, control, None, metrics);
    let grpc::Served {
        shutdown,
        task,
        channel,
        ..
    } = grpc::serve(Arc::clone(agent.control()), &dir.path().join("api.sock")).await;
    Harness {
        dir,
        agent,
        shutdown,
        task,
        channel,
        sim,
        clock,
    }
}

fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, &[0x5a; 32])
        .unwrap();
    v
}

fn tcp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 65535);
    match ack {
        None => b = b.syn(),
        Some(a) if seq == 500 => b = b.syn().ack(a),
        Some(a) => b = b.ack(a),
    }
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    // Ethernet padding up to the 60-byte minimum (the IP length says where it ends).
    v.resize(v.len().max(60), 0);
    v
}

/// Source address and port of an emitted IPv4 UDP/TCP frame.
fn source_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4: {frame:02x?}")
    };
    let port = match p.transport {
        Some(TransportSlice::Udp(u)) => u.source_port(),
        Some(TransportSlice::Tcp(t)) => t.source_port(),
        other => panic!("no ports: {other:?}"),
    };
    (ip.header().source_addr(), port)
}

impl Harness {
    fn nat(&self) -> NatServiceClient<Channel> {
        NatServiceClient::new(self.channel.clone())
    }
    fn settings(&self) -> SettingsServiceClient<Channel> {
        SettingsServiceClient::new(self.channel.clone())
    }
    async fn stats(&self) -> pb::Stats {
        StatsServiceClient::new(self.channel.clone())
            .get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Sim: inject `frame` on port 0, return the frame the dataplane emits on port 1.
    fn through(&mut self, frame: &[u8]) -> Vec<u8> {
        let wire = &mut self.sim.as_mut().unwrap().wire;
        wire[0].send(frame).unwrap();
        let t0 = Instant::now();
        while wire[1].pending() == 0 {
            assert!(t0.elapsed() < WAIT, "no frame emitted on port 1");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = wire[1].drain_vecs();
        assert_eq!(out.len(), 1, "one frame in, one out");
        out.remove(0)
    }

    /// Software: track `frame` now.
    fn feed(&self, frame: &[u8]) -> Verdict {
        match &**self.agent.control() {
            AgentControl::Software(c) => c.process(frame, 0).unwrap(),
            AgentControl::Dataplane(_) => panic!("software backend only"),
        }
    }

    fn advance(&self, ns: u64) {
        self.clock.fetch_add(ns, Ordering::SeqCst);
    }

    async fn conns(&self) -> Vec<pb::Connection> {
        grpc::list(&self.channel, pb::ConnectionFilter::default()).await
    }

    /// The connection whose original source port is `sp`.
    async fn conn(&self, sp: u16) -> pb::Connection {
        self.conns()
            .await
            .into_iter()
            .find(|c| {
                c.original
                    .as_ref()
                    .is_some_and(|t| t.src_port == u32::from(sp))
            })
            .unwrap_or_else(|| panic!("no connection from port {sp}"))
    }

    /// Rewrite the configuration file and reload it (what SIGHUP does).
    fn reload(&self, backend: &str, extra: &str) -> config::ApplyReport {
        write_config(
            self.dir.path(),
            &format!("[backend]\nkind = {backend:?}\n{extra}"),
        );
        self.agent.reload().unwrap()
    }

    async fn stop(mut self) {
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        grpc::stop(&self.shutdown, task).await;
    }

    async fn set_limits(&self, limits: pb::Limits) -> pb::LimitsResponse {
        self.settings()
            .set_limits(pb::SetLimitsRequest {
                limits: Some(limits),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn set_max_connections(&self, max_connections: u64) -> pb::LimitsResponse {
        self.set_limits(pb::Limits {
            max_connections,
            ..Default::default()
        })
        .await
    }

    async fn set_udp_timeout(&self, udp: u32) -> pb::TimeoutsResponse {
        self.settings()
            .set_timeouts(pb::SetTimeoutsRequest {
                timeouts: Some(pb::Timeouts {
                    udp,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

fn snat_rule(name: &str, protocol: u32) -> pb::AddNatRuleRequest {
    pb::AddNatRuleRequest {
        rule: Some(pb::NatRule {
            name: name.into(),
            kind: pb::NatKind::Snat.into(),
            protocol,
            src_prefix: "10.0.0.0/8".into(),
            to_addresses: Some(pb::AddressRange {
                first: POOL.into(),
                last: String::new(),
            }),
            to_ports: Some(pb::PortRange {
                first: 20_000,
                last: 20_099,
            }),
            ..Default::default()
        }),
    }
}

fn pool_used(stats: &pb::Stats, rule: &str) -> Option<u64> {
    stats
        .port_pools
        .iter()
        .find(|p| p.rule == rule)
        .map(|p| p.used)
}

fn reply_dst(c: &pb::Connection) -> (String, u32) {
    let r = c.reply.as_ref().unwrap();
    (r.dst.clone(), r.dst_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_nat_rules_timeouts_and_limits_apply_live() {
    let mut h = start("sim", "").await;
    let pool: Ipv4Addr = POOL.parse().unwrap();

    // An SNAT rule added through the API translates the next new connection.
    h.nat().add_nat_rule(snat_rule("out", 17)).await.unwrap();
    let emitted = h.through(&udp([10, 0, 0, 2], 5000, SERVER, 53));
    let (src, sport) = source_of(&emitted);
    assert_eq!(src, pool, "emitted with the translated source");
    assert!(
        (20_000..=20_099).contains(&sport),
        "port {sport} from the pool"
    );
    let c = h.conn(5000).await;
    assert_eq!(reply_dst(&c), (POOL.to_owned(), u32::from(sport)));
    assert_eq!(pool_used(&h.stats().await, "out"), Some(1));

    // Removed: new connections are not translated; the existing one keeps its
    // binding (Linux).
    h.nat()
        .remove_nat_rule(pb::RemoveNatRuleRequest { name: "out".into() })
        .await
        .unwrap();
    let emitted = h.through(&udp([10, 0, 0, 3], 5001, SERVER, 53));
    assert_eq!(source_of(&emitted), (Ipv4Addr::new(10, 0, 0, 3), 5001));
    let c = h.conn(5001).await;
    assert_eq!(reply_dst(&c), ("10.0.0.3".to_owned(), 5001));
    let emitted = h.through(&udp([10, 0, 0, 2], 5000, SERVER, 53));
    assert_eq!(source_of(&emitted), (pool, sport), "existing binding kept");
    assert_eq!(pool_used(&h.stats().await, "out"), None, "rule gone");

    // Timeouts: applied at once (no restart), taken by a flow at its next packet.
    let t = h.set_udp_timeout(5).await;
    assert!(!t.restart_required);
    assert!(
        h.conn(5001).await.timeout_remaining_ms > 5_000,
        "until its next packet"
    );
    h.through(&udp([10, 0, 0, 3], 5001, SERVER, 53));
    let left = h.conn(5001).await.timeout_remaining_ms;
    assert!(left <= 5_000 && left > 0, "{left} ms left");

    // Limits: a TCP connection made ASSURED by its handshake, then max_connections
    // lowered to the count: the next new connection is refused (nothing evicted).
    h.through(&tcp([10, 0, 0, 4], 40_000, SERVER, 80, 100, None));
    {
        let wire = &mut h.sim.as_mut().unwrap().wire;
        wire[1]
            .send(&tcp(SERVER, 80, [10, 0, 0, 4], 40_000, 500, Some(101)))
            .unwrap();
        let t0 = Instant::now();
        while wire[0].pending() == 0 {
            assert!(t0.elapsed() < WAIT, "no SYN-ACK emitted on port 0");
            std::thread::sleep(Duration::from_millis(1));
        }
        wire[0].drain_vecs();
    }
    h.through(&tcp([10, 0, 0, 4], 40_000, SERVER, 80, 101, Some(501)));
    assert!(h.conn(40_000).await.assured);
    // The two UDP flows are unassured: early drop could take them. Replace them
    // with nothing: only the assured TCP flow stays.
    ConntrackServiceClient::new(h.channel.clone())
        .delete_connections(pb::DeleteConnectionsRequest {
            filter: Some(pb::ConnectionFilter {
                protocol: Some(17),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let l = h.set_max_connections(1).await;
    assert!(!l.restart_required);
    assert_eq!(l.limits.unwrap().max_connections, 1);
    let full_before = h.stats().await.insert_failed_full;
    h.sim.as_mut().unwrap().wire[0]
        .send(&udp([10, 0, 0, 5], 5002, SERVER, 53))
        .unwrap();
    let t0 = Instant::now();
    while h.stats().await.insert_failed_full == full_before {
        assert!(t0.elapsed() < WAIT, "new connection not refused");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        h.sim.as_mut().unwrap().wire[1].pending(),
        0,
        "refused, not forwarded"
    );
    let conns = h.conns().await;
    assert_eq!(conns.len(), 1, "nothing evicted, nothing added");
    let st = h.stats().await;
    assert_eq!(st.max_connections, 1);

    // Raised within the allocation: admitted again. Above it: restart required.
    h.set_max_connections(100).await;
    h.through(&udp([10, 0, 0, 5], 5002, SERVER, 53));
    let l = h.set_max_connections(1 << 30).await;
    assert!(l.restart_required, "above the allocated table");
    assert!(h.stats().await.max_connections < 1 << 30);
    h.stop().await;
}

#[tokio::test]
async fn software_nat_rules_timeouts_and_limits_apply_live() {
    let h = start("software", "").await;

    h.nat().add_nat_rule(snat_rule("out", 17)).await.unwrap();
    h.feed(&udp([10, 0, 0, 2], 5000, SERVER, 53));
    let c = h.conn(5000).await;
    let (dst, port) = reply_dst(&c);
    assert_eq!(dst, POOL, "reply goes to the translated source");
    assert!((20_000..=20_099).contains(&port));
    assert_eq!(pool_used(&h.stats().await, "out"), Some(1));

    h.nat()
        .remove_nat_rule(pb::RemoveNatRuleRequest { name: "out".into() })
        .await
        .unwrap();
    h.feed(&udp([10, 0, 0, 3], 5001, SERVER, 53));
    assert_eq!(reply_dst(&h.conn(5001).await), ("10.0.0.3".into(), 5001));
    assert_eq!(reply_dst(&h.conn(5000).await), (POOL.into(), port), "kept");

    // A UDP flow lives 30 s by default; 5 s once set, from its next packet on.
    let t = h.set_udp_timeout(5).await;
    assert!(!t.restart_required);
    h.advance(S);
    h.feed(&udp([10, 0, 0, 3], 5001, SERVER, 53));
    h.advance(6 * S);
    let alive: Vec<u32> = h
        .conns()
        .await
        .iter()
        .map(|c| c.original.as_ref().unwrap().src_port)
        .collect();
    assert_eq!(
        alive,
        [5000],
        "the refreshed flow expired after 5 s: {alive:?}"
    );

    // An assured flow (reply, then a packet after 2 s), the limit lowered to it:
    // the next new connection is refused, nothing evicted.
    h.feed(&udp(SERVER, 53, [192, 0, 2, 50], port.try_into().unwrap()));
    h.advance(3 * S);
    h.feed(&udp([10, 0, 0, 2], 5000, SERVER, 53));
    assert!(h.conn(5000).await.assured);
    h.set_max_connections(1).await;
    assert_eq!(
        h.feed(&udp([10, 0, 0, 6], 5006, SERVER, 53)),
        Verdict::Invalid(Invalid::TableFull)
    );
    assert_eq!(h.conns().await.len(), 1);
    assert_eq!(h.stats().await.insert_failed_full, 1);
    h.stop().await;
}

#[tokio::test]
async fn reload_applies_nat_rules_and_timeouts_to_the_engine() {
    let backend = "software";
    let h = start(backend, "[timeouts]\nudp = 30\n").await;
    h.feed(&udp([10, 0, 0, 2], 5000, SERVER, 53));
    let snat = format!(
        "[[nat.rules]]\nname = \"out\"\nkind = \"snat\"\nsrc = \"10.0.0.0/8\"\n\
         to_addresses = \"{POOL}\"\n"
    );
    // A rule the API cannot show (it matches on dport): the engine has it all the same.
    let fwd = "[[nat.rules]]\nname = \"fwd\"\nkind = \"dnat\"\nprotocol = \"tcp\"\n\
               dport = \"8080\"\nto_address = \"10.0.0.80\"\nto_port = 80\n";
    let r = h.reload(backend, &format!("[timeouts]\nudp = 5\n{snat}{fwd}"));
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert!(r.restart_required.is_empty(), "{:?}", r.restart_required);
    for key in ["timeouts", "nat.rules[out] added", "nat.rules[fwd] added"] {
        assert!(r.applied.iter().any(|a| a == key), "{key}: {:?}", r.applied);
    }
    let t = h
        .settings()
        .get_timeouts(pb::GetTimeoutsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!t.restart_required);
    // The existing flow takes the new timeout at its next packet.
    h.feed(&udp([10, 0, 0, 2], 5000, SERVER, 53));
    assert!(h.conn(5000).await.timeout_remaining_ms <= 5_000);
    // New connections see both rules.
    h.feed(&udp([10, 0, 0, 3], 5001, SERVER, 53));
    assert_eq!(reply_dst(&h.conn(5001).await), (POOL.into(), 5001));
    h.feed(&tcp([203, 0, 113, 9], 40_000, SERVER, 8080, 100, None));
    let r = h.conn(40_000).await.reply.unwrap();
    assert_eq!((r.src.as_str(), r.src_port), ("10.0.0.80", 80));
    let names: Vec<String> = h
        .nat()
        .list_nat_rules(pb::ListNatRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["out"], "the API shows what it can express");

    // A changed rule is replaced, a dropped one removed; existing flows keep their
    // binding.
    let snat2 = snat.replace(POOL, "192.0.2.60");
    let r = h.reload(backend, &format!("[timeouts]\nudp = 5\n{snat2}"));
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    for key in [
        "nat.rules[out] removed",
        "nat.rules[fwd] removed",
        "nat.rules[out] added",
    ] {
        assert!(r.applied.iter().any(|a| a == key), "{key}: {:?}", r.applied);
    }
    h.feed(&udp([10, 0, 0, 4], 5002, SERVER, 53));
    assert_eq!(reply_dst(&h.conn(5002).await), ("192.0.2.60".into(), 5002));
    assert_eq!(reply_dst(&h.conn(5001).await), (POOL.into(), 5001));
    h.feed(&tcp([203, 0, 113, 9], 40_001, SERVER, 8080, 100, None));
    let r = h.conn(40_001).await.reply.unwrap();
    assert_eq!(r.src, "198.51.100.7", "fwd removed: not translated");

    // Reordering needs a restart (rules added by a reload match after the others).
    let other = "[[nat.rules]]\nname = \"first\"\nkind = \"snat\"\nsrc = \"172.16.0.0/12\"\n\
                 to_addresses = \"192.0.2.70\"\n";
    let r = h.reload(backend, &format!("[timeouts]\nudp = 5\n{other}{snat2}"));
    assert!(
        r.restart_required
            .iter()
            .any(|k| k.starts_with("nat.rules (order")),
        "{:?}",
        r.restart_required
    );
    h.stop().await;
}
