//! The gRPC API end to end: a real tonic client over a Unix socket (and TCP with
//! mutual TLS) against `SoftwareControl` fed with real packets.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod grpc;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ctoffload_agent::api::software::Clock;
use ctoffload_agent::api::{
    ApiServer, Listen, ServeError, ServerConfig, SoftwareControl, TlsConfig,
};
use ctoffload_fallback_sw::conntrack::Config;
use ctoffload_proto::v1 as pb;
use ctoffload_proto::v1::conntrack_service_client::ConntrackServiceClient;
use ctoffload_proto::v1::device_service_client::DeviceServiceClient;
use ctoffload_proto::v1::event_service_client::EventServiceClient;
use ctoffload_proto::v1::nat_service_client::NatServiceClient;
use ctoffload_proto::v1::offload_service_client::OffloadServiceClient;
use ctoffload_proto::v1::settings_service_client::SettingsServiceClient;
use ctoffload_proto::v1::stats_service_client::StatsServiceClient;
use etherparse::PacketBuilder;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const S: u64 = 1_000_000_000;

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    control: Arc<SoftwareControl>,
    clock: Arc<AtomicU64>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
    channel: Channel,
    metrics: Arc<ctoffload_agent::api::RpcMetrics>,
}

async fn start(max_connections: usize, journal: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let clock = Arc::new(AtomicU64::new(S));
    let c = Arc::clone(&clock);
    let clock_fn: Clock = Arc::new(move || c.load(Ordering::SeqCst));
    let cfg = Config {
        max_connections,
        event_capacity: 1 << 16,
        ..Config::default()
    };
    let control = Arc::new(SoftwareControl::with_clock(cfg, journal, clock_fn));
    let grpc::Served {
        shutdown,
        task,
        channel,
        metrics,
    } = grpc::serve(Arc::clone(&control), &path).await;
    Harness {
        _dir: dir,
        path,
        control,
        clock,
        shutdown,
        task,
        channel,
        metrics,
    }
}

impl Harness {
    fn ct(&self) -> ConntrackServiceClient<Channel> {
        ConntrackServiceClient::new(self.channel.clone())
    }
    fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel.clone())
    }
    fn advance(&self, ns: u64) {
        self.clock.fetch_add(ns, Ordering::SeqCst);
    }
    fn feed(&self, frame: &[u8]) {
        self.control.process(frame, 0).unwrap();
    }
    async fn stop(self) {
        grpc::stop(&self.shutdown, self.task).await;
        assert!(!self.path.exists(), "socket removed on shutdown");
    }
}

fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sp: u16,
    dp: u16,
    seq: u32,
    ack: Option<u32>,
    f: &str,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 65535);
    if f.contains('S') {
        b = b.syn();
    }
    if f.contains('F') {
        b = b.fin();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, b"payload")
        .unwrap();
    v
}

fn ping(src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(id, 1)
        .write(&mut v, b"p")
        .unwrap();
    v
}

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [192, 0, 2, 10];

/// A TCP handshake A:sp -> B:80 (ESTABLISHED, ASSURED).
fn handshake(h: &Harness, sp: u16) {
    h.feed(&tcp(A, B, sp, 80, 100, None, "S"));
    h.feed(&tcp(B, A, 80, sp, 500, Some(101), "S"));
    h.feed(&tcp(A, B, sp, 80, 101, Some(501), ""));
}

async fn list(h: &Harness, filter: pb::ConnectionFilter) -> Vec<pb::Connection> {
    grpc::list(&h.channel, filter).await
}

fn assert_invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let e = r.expect_err("must fail");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with(&format!("{field}: ")),
        "message {:?} must name {field}",
        e.message()
    );
}

#[tokio::test]
async fn unix_socket_is_owner_only_and_health_serves() {
    let h = start(1024, 1024).await;
    let mode = std::fs::metadata(&h.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ctoffload.v1.ConntrackService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let d = DeviceServiceClient::new(h.channel.clone())
        .get_device_status(pb::GetDeviceStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.backend, "software");
    assert_eq!(d.health, pb::DeviceHealth::Ok as i32);
    assert!(
        h.metrics
            .count("/ctoffload.v1.DeviceService/GetDeviceStatus", Code::Ok)
            >= 1
    );
    h.stop().await;
}

#[tokio::test]
async fn list_get_delete_flush_with_filters() {
    let h = start(1024, 4096).await;
    handshake(&h, 40000);
    h.feed(&udp(A, B, 5000, 53));
    h.feed(&udp([10, 9, 0, 1], B, 5001, 123));
    h.feed(&ping(A, B, 7));
    let all = list(&h, pb::ConnectionFilter::default()).await;
    assert_eq!(all.len(), 4);

    let tcp_only = list(
        &h,
        pb::ConnectionFilter {
            protocol: Some(6),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(tcp_only.len(), 1);
    assert_eq!(tcp_only[0].tcp_state, pb::TcpState::Established as i32);
    assert!(tcp_only[0].assured);
    let est = list(
        &h,
        pb::ConnectionFilter {
            tcp_state: pb::TcpState::Established.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(est.len(), 1);
    let net = list(
        &h,
        pb::ConnectionFilter {
            src_prefix: "10.9.0.0/16".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(net.len(), 1);
    assert_eq!(net[0].original.as_ref().unwrap().dst_port, 123);
    let dns = list(
        &h,
        pb::ConnectionFilter {
            dst_port: Some(53),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(dns.len(), 1);
    assert!(
        list(
            &h,
            pb::ConnectionFilter {
                zone: Some(3),
                ..Default::default()
            }
        )
        .await
        .is_empty()
    );
    assert_eq!(
        list(
            &h,
            pb::ConnectionFilter {
                offloaded: Some(false),
                ..Default::default()
            }
        )
        .await
        .len(),
        4
    );
    let icmp = list(
        &h,
        pb::ConnectionFilter {
            protocol: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(icmp[0].original.as_ref().unwrap().icmp_type, 8);

    // Get by id and by the reply tuple.
    let c = &tcp_only[0];
    let by_id = h
        .ct()
        .get_connection(pb::GetConnectionRequest {
            key: Some(pb::ConnectionKey {
                key: Some(pb::connection_key::Key::Id(c.id)),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.original, c.original);
    assert_eq!(by_id.original_counters.unwrap().packets, 2);
    let by_tuple = h
        .ct()
        .get_connection(pb::GetConnectionRequest {
            key: Some(pb::ConnectionKey {
                key: Some(pb::connection_key::Key::Tuple(c.reply.clone().unwrap())),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_tuple.id, c.id);

    // Delete by tuple, then it is gone.
    let key = pb::ConnectionKey {
        key: Some(pb::connection_key::Key::Tuple(c.original.clone().unwrap())),
    };
    let del = h
        .ct()
        .delete_connection(pb::DeleteConnectionRequest {
            key: Some(key.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.connection.unwrap().id, c.id);
    let e = h
        .ct()
        .get_connection(pb::GetConnectionRequest {
            key: Some(key.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = h
        .ct()
        .delete_connection(pb::DeleteConnectionRequest { key: Some(key) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Filtered delete, then flush.
    let n = h
        .ct()
        .delete_connections(pb::DeleteConnectionsRequest {
            filter: Some(pb::ConnectionFilter {
                protocol: Some(17),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.deleted, 2);
    assert_eq!(
        h.ct()
            .flush(pb::FlushRequest {})
            .await
            .unwrap()
            .into_inner()
            .deleted,
        1
    );
    assert!(list(&h, pb::ConnectionFilter::default()).await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn large_table_streams_in_batches() {
    let h = start(16_384, 1 << 15).await;
    for i in 0..10_000u32 {
        let [_, _, hi, lo] = i.to_be_bytes();
        h.feed(&udp([10, 1, hi, lo], B, 1024 + u16::from(lo), 53));
    }
    let mut s = h
        .ct()
        .list_connections(pb::ListConnectionsRequest {
            batch_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut msgs, mut ids) = (0, HashSet::new());
    while let Some(m) = s.message().await.unwrap() {
        msgs += 1;
        assert!(m.connections.len() <= 1000);
        for c in m.connections {
            assert!(ids.insert(c.id), "duplicate {}", c.id);
        }
    }
    assert_eq!(ids.len(), 10_000);
    assert!(msgs >= 10);
    // A limit stops early.
    let mut s = h
        .ct()
        .list_connections(pb::ListConnectionsRequest {
            limit: 300,
            batch_size: 128,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.unwrap() {
        n += m.connections.len();
    }
    assert_eq!(n, 300);
    h.stop().await;
}

async fn next_record(s: &mut tonic::Streaming<pb::EventRecord>) -> pb::EventRecord {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("record in time")
        .unwrap()
        .expect("stream open")
}

#[tokio::test]
async fn events_resume_with_exactly_once_end_of_flow() {
    let h = start(1024, 1 << 14).await;
    OffloadServiceClient::new(h.channel.clone())
        .set_offload_policy(pb::SetOffloadPolicyRequest {
            policy: Some(pb::OffloadPolicy {
                enabled: true,
                tcp: true,
                udp: true,
                min_packets: 3,
            }),
        })
        .await
        .unwrap();
    let mut s = h
        .events()
        .watch_events(pb::WatchEventsRequest {
            from_sequence: Some(1),
            kinds: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    handshake(&h, 41000);
    // new, SYN_SENT->SYN_RECV, SYN_RECV->ESTABLISHED, offloaded (3 packets)
    let mut kinds = Vec::new();
    let mut last = 0;
    for _ in 0..4 {
        let r = next_record(&mut s).await;
        assert_eq!(r.sequence, last + 1, "no holes");
        last = r.sequence;
        kinds.push(r.event.unwrap());
    }
    assert!(matches!(kinds[0], pb::event_record::Event::New(_)));
    match &kinds[2] {
        pb::event_record::Event::StateChange(c) => {
            assert_eq!(c.new_state, pb::TcpState::Established as i32);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(kinds[3], pb::event_record::Event::Offloaded(_)),
        "{:?}",
        kinds[3]
    );
    // Drain: returned to software.
    let drained = OffloadServiceClient::new(h.channel.clone())
        .drain_offload(pb::DrainOffloadRequest { disable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.drained, 1);
    let r = next_record(&mut s).await;
    assert!(
        matches!(
            r.event,
            Some(pb::event_record::Event::ReturnedToSoftware(_))
        ),
        "{r:?}"
    );
    last = r.sequence;
    drop(s); // the exporter disconnects

    // While it is away, 20 flows come and go.
    for i in 0..20u16 {
        h.feed(&udp(A, B, 6000 + i, 53));
    }
    h.advance(60 * S);
    h.control.gc(10_000).unwrap();
    h.ct().flush(pb::FlushRequest {}).await.unwrap();

    // It resumes after the last record it saw, asking only for end-of-flow records.
    let mut s = h
        .events()
        .watch_events(pb::WatchEventsRequest {
            from_sequence: Some(last + 1),
            kinds: vec![pb::EventKind::EndOfFlow.into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut ended = HashSet::new();
    let mut prev = last;
    for _ in 0..21 {
        let r = next_record(&mut s).await;
        assert!(r.sequence > prev, "increasing");
        prev = r.sequence;
        match r.event.unwrap() {
            pb::event_record::Event::EndOfFlow(e) => {
                assert!(ended.insert(e.id), "end-of-flow for {} twice", e.id);
                assert!(e.original_counters.unwrap().packets >= 1);
            }
            other => panic!("only end-of-flow asked for: {other:?}"),
        }
    }
    assert_eq!(ended.len(), 21, "20 UDP flows + the TCP flow");
    // Nothing more is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.message())
            .await
            .is_err()
    );
    // Reconnecting from the same point again replays the same records, no more.
    let info = h
        .events()
        .get_journal_info(pb::GetJournalInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.first_sequence, 1);
    assert_eq!(info.evicted, 0);
    h.stop().await;
}

#[tokio::test]
async fn journal_overflow_is_an_explicit_gap() {
    let h = start(1024, 16).await;
    for i in 0..30u16 {
        h.feed(&udp(A, B, 7000 + i, 53));
    }
    h.ct().flush(pb::FlushRequest {}).await.unwrap();
    // 60 records, 16 kept: 45..=60.
    let mut s = h
        .events()
        .watch_events(pb::WatchEventsRequest {
            from_sequence: Some(1),
            kinds: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let r = next_record(&mut s).await;
    match r.event.unwrap() {
        pb::event_record::Event::Gap(g) => {
            assert_eq!(g.cause, pb::GapCause::JournalOverflow as i32);
            assert_eq!(
                (g.first_missing, g.last_missing, g.lost_records),
                (1, 44, 44)
            );
            assert_eq!(g.lost_end_of_flow, Some(14), "30 new + 14 end-of-flow lost");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.sequence, 44);
    let r = next_record(&mut s).await;
    assert_eq!(r.sequence, 45);
    // A position from the future is refused.
    let e = h
        .events()
        .watch_events(pb::WatchEventsRequest {
            from_sequence: Some(1000),
            kinds: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(e.message().starts_with("from_sequence: "));
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let h = start(1024, 1024).await;
    let f = |filter: pb::ConnectionFilter| pb::ListConnectionsRequest {
        filter: Some(filter),
        ..Default::default()
    };
    assert_invalid(
        h.ct()
            .list_connections(f(pb::ConnectionFilter {
                src_prefix: "10.0.0.0/40".into(),
                ..Default::default()
            }))
            .await,
        "filter.src_prefix",
    );
    assert_invalid(
        h.ct()
            .list_connections(f(pb::ConnectionFilter {
                dst_port: Some(70000),
                ..Default::default()
            }))
            .await,
        "filter.dst_port",
    );
    assert_invalid(
        h.ct()
            .list_connections(f(pb::ConnectionFilter {
                protocol: Some(300),
                ..Default::default()
            }))
            .await,
        "filter.protocol",
    );
    assert_invalid(
        h.ct()
            .list_connections(f(pb::ConnectionFilter {
                tcp_state: 99,
                ..Default::default()
            }))
            .await,
        "filter.tcp_state",
    );
    assert_invalid(
        h.ct()
            .list_connections(f(pb::ConnectionFilter {
                src_prefix: "10.0.0.0/8".into(),
                dst_prefix: "2001:db8::/32".into(),
                ..Default::default()
            }))
            .await,
        "filter.dst_prefix",
    );
    assert_invalid(
        h.ct()
            .list_connections(pb::ListConnectionsRequest {
                batch_size: 100_000,
                ..Default::default()
            })
            .await,
        "batch_size",
    );
    assert_invalid(
        h.ct()
            .get_connection(pb::GetConnectionRequest { key: None })
            .await,
        "key",
    );
    assert_invalid(
        h.ct()
            .get_connection(pb::GetConnectionRequest {
                key: Some(pb::ConnectionKey {
                    key: Some(pb::connection_key::Key::Id(0)),
                }),
            })
            .await,
        "key.id",
    );
    let bad_tuple = pb::Tuple {
        src: "10.0.0.1".into(),
        dst: "::1".into(),
        protocol: 6,
        ..Default::default()
    };
    assert_invalid(
        h.ct()
            .get_connection(pb::GetConnectionRequest {
                key: Some(pb::ConnectionKey {
                    key: Some(pb::connection_key::Key::Tuple(bad_tuple)),
                }),
            })
            .await,
        "key.tuple.dst",
    );
    let e = h
        .ct()
        .get_connection(pb::GetConnectionRequest {
            key: Some(pb::ConnectionKey {
                key: Some(pb::connection_key::Key::Id(77)),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_invalid(
        h.ct()
            .delete_connections(pb::DeleteConnectionsRequest { filter: None })
            .await,
        "filter",
    );
    assert_invalid(
        h.events()
            .watch_events(pb::WatchEventsRequest {
                from_sequence: None,
                kinds: vec![0],
            })
            .await,
        "kinds[0]",
    );
    let mut off = OffloadServiceClient::new(h.channel.clone());
    assert_invalid(
        off.set_offload_policy(pb::SetOffloadPolicyRequest { policy: None })
            .await,
        "policy",
    );
    assert_invalid(
        off.set_offload_policy(pb::SetOffloadPolicyRequest {
            policy: Some(pb::OffloadPolicy {
                enabled: true,
                ..Default::default()
            }),
        })
        .await,
        "policy.enabled",
    );
    let mut set = SettingsServiceClient::new(h.channel.clone());
    assert_invalid(
        set.set_timeouts(pb::SetTimeoutsRequest {
            timeouts: Some(pb::Timeouts {
                tcp_established: u32::MAX,
                ..Default::default()
            }),
        })
        .await,
        "timeouts.tcp_established",
    );
    assert_invalid(
        set.set_limits(pb::SetLimitsRequest {
            limits: Some(pb::Limits {
                event_journal_capacity: 3,
                ..Default::default()
            }),
        })
        .await,
        "limits.event_journal_capacity",
    );
    h.stop().await;
}

fn rule(name: &str, first: &str, last: &str, ports: Option<(u32, u32)>) -> pb::AddNatRuleRequest {
    pb::AddNatRuleRequest {
        rule: Some(pb::NatRule {
            name: name.into(),
            kind: pb::NatKind::Snat.into(),
            src_prefix: "10.0.0.0/8".into(),
            to_addresses: Some(pb::AddressRange {
                first: first.into(),
                last: last.into(),
            }),
            to_ports: ports.map(|(first, last)| pb::PortRange { first, last }),
            // Port translation needs a port protocol.
            protocol: if ports.is_some() { 6 } else { 0 },
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn nat_rules_are_validated() {
    let h = start(1024, 1024).await;
    let mut nat = NatServiceClient::new(h.channel.clone());
    let added = nat
        .add_nat_rule(rule("out", "192.0.2.1", "192.0.2.4", Some((1024, 65535))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.name, "out");
    // Same addresses, disjoint ports: fine.
    nat.add_nat_rule(rule("low", "192.0.2.1", "192.0.2.1", Some((100, 200))))
        .await
        .unwrap();
    assert_invalid(
        nat.add_nat_rule(rule("clash", "192.0.2.4", "192.0.2.9", Some((2000, 3000))))
            .await,
        "rule.to_ports",
    );
    assert_invalid(
        nat.add_nat_rule(rule("clash", "192.0.2.4", "192.0.2.9", None))
            .await,
        "rule.to_addresses",
    );
    assert_invalid(
        nat.add_nat_rule(rule("empty", "192.0.2.9", "192.0.2.1", None))
            .await,
        "rule.to_addresses",
    );
    assert_invalid(
        nat.add_nat_rule(rule("ports", "198.51.100.1", "", Some((300, 200))))
            .await,
        "rule.to_ports",
    );
    assert_invalid(
        nat.add_nat_rule(rule("fam", "2001:db8::1", "2001:db8::2", None))
            .await,
        "rule.src_prefix",
    );
    assert_invalid(
        nat.add_nat_rule(rule("fam2", "198.51.100.1", "2001:db8::2", None))
            .await,
        "rule.to_addresses.last",
    );
    assert_invalid(
        nat.add_nat_rule(rule("bad name!", "198.51.100.1", "", None))
            .await,
        "rule.name",
    );
    assert_invalid(
        nat.add_nat_rule(pb::AddNatRuleRequest { rule: None }).await,
        "rule",
    );
    let mut any_proto = rule("anyproto", "198.51.100.1", "", Some((300, 400)));
    if let Some(r) = any_proto.rule.as_mut() {
        r.protocol = 0;
    }
    assert_invalid(nat.add_nat_rule(any_proto).await, "rule.to_ports");
    let mut dnat_range = rule("dnat", "10.9.0.1", "10.9.0.2", None);
    if let Some(r) = dnat_range.rule.as_mut() {
        r.kind = pb::NatKind::Dnat.into();
    }
    assert_invalid(nat.add_nat_rule(dnat_range).await, "rule.to_addresses");
    let e = nat
        .add_nat_rule(rule("out", "203.0.113.1", "", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().starts_with("rule.name: "), "{}", e.message());

    let rules = nat
        .list_nat_rules(pb::ListNatRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["out", "low"]
    );
    let stats = StatsServiceClient::new(h.channel.clone())
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let pool = stats.port_pools.iter().find(|p| p.rule == "out").unwrap();
    assert_eq!(pool.total, 4 * 64_512);

    // The limit: two rules exist, so max 2 means the next add is refused.
    let mut set = SettingsServiceClient::new(h.channel.clone());
    set.set_limits(pb::SetLimitsRequest {
        limits: Some(pb::Limits {
            max_nat_rules: 2,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let e = nat
        .add_nat_rule(rule("third", "203.0.113.1", "", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let e = set
        .set_limits(pb::SetLimitsRequest {
            limits: Some(pb::Limits {
                max_nat_rules: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    nat.remove_nat_rule(pb::RemoveNatRuleRequest { name: "low".into() })
        .await
        .unwrap();
    let e = nat
        .remove_nat_rule(pb::RemoveNatRuleRequest { name: "low".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_invalid(
        nat.remove_nat_rule(pb::RemoveNatRuleRequest {
            name: String::new(),
        })
        .await,
        "name",
    );
    h.stop().await;
}

#[tokio::test]
async fn policy_stats_and_settings() {
    let h = start(1024, 1024).await;
    let mut off = OffloadServiceClient::new(h.channel.clone());
    let p = off
        .get_offload_policy(pb::GetOffloadPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!p.enabled);
    off.set_offload_policy(pb::SetOffloadPolicyRequest {
        policy: Some(pb::OffloadPolicy {
            enabled: true,
            tcp: true,
            udp: false,
            min_packets: 1,
        }),
    })
    .await
    .unwrap();
    handshake(&h, 42000);
    handshake(&h, 42001);
    h.feed(&udp(A, B, 9000, 53));
    h.feed(&[0u8; 10]); // malformed
    let offloaded = list(
        &h,
        pb::ConnectionFilter {
            offloaded: Some(true),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(offloaded.len(), 2);
    assert!(offloaded.iter().all(|c| c.offloaded && !c.hw_offloaded));

    // Fewer allowed than offloaded now: refused until drained.
    let mut set = SettingsServiceClient::new(h.channel.clone());
    let e = set
        .set_limits(pb::SetLimitsRequest {
            limits: Some(pb::Limits {
                max_offloaded: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("limits.max_offloaded"));

    let stats = StatsServiceClient::new(h.channel.clone())
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.connections, 3);
    assert_eq!(stats.by_tcp_state.get("ESTABLISHED"), Some(&2));
    assert_eq!(stats.by_protocol.get(&17), Some(&1));
    assert_eq!(stats.offloaded, 2);
    assert_eq!(stats.max_connections, 1024);
    assert!(
        stats
            .drops_by_reason
            .iter()
            .any(|(k, v)| k.starts_with("malformed/") && *v == 1)
    );
    assert_eq!(stats.hw_table.unwrap().capacity, 0);

    // Deleting an offloaded flow takes it off the fast path first.
    let id = offloaded[0].id;
    h.ct()
        .delete_connection(pb::DeleteConnectionRequest {
            key: Some(pb::ConnectionKey {
                key: Some(pb::connection_key::Key::Id(id)),
            }),
        })
        .await
        .unwrap();
    assert_eq!(
        off.drain_offload(pb::DrainOffloadRequest { disable: false })
            .await
            .unwrap()
            .into_inner()
            .drained,
        1
    );
    assert!(
        off.get_offload_policy(pb::GetOffloadPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
            .enabled
    );

    let t = set
        .get_timeouts(pb::GetTimeoutsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.timeouts.unwrap().tcp_established, 432_000);
    assert!(!t.restart_required);
    let t = set
        .set_timeouts(pb::SetTimeoutsRequest {
            timeouts: Some(pb::Timeouts {
                udp: 45,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let tv = t.timeouts.unwrap();
    assert_eq!(
        (tv.udp, tv.udp_stream),
        (45, 120),
        "zero fields keep their value"
    );
    assert!(!t.restart_required, "applied to the running table");
    let l = set
        .set_limits(pb::SetLimitsRequest {
            limits: Some(pb::Limits {
                event_journal_capacity: 64,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.limits.unwrap().event_journal_capacity, 64);
    assert!(!l.restart_required);
    let info = h
        .events()
        .get_journal_info(pb::GetJournalInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.capacity, 64);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let h = start(1024, 1024).await;
    let mut s = h
        .events()
        .watch_events(pb::WatchEventsRequest {
            from_sequence: None,
            kinds: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    h.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("stream ends");
    match end {
        Err(e) => assert_eq!(e.code(), Code::Unavailable),
        Ok(None) => {}
        Ok(Some(r)) => panic!("unexpected {r:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), h.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ─────────────────────────── TCP and mutual TLS ───────────────────────────

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn ca() -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test ca");
    let issuer =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let pem = issuer.pem();
    (issuer, pem)
}

fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let (issuer, ca_pem) = ca();
    let (server_cert, server_key) = leaf(&issuer, "localhost");
    let (client_cert, client_key) = leaf(&issuer, "operator");
    Pki {
        ca_pem,
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    client: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Endpoint::try_from(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn tcp_requires_mutual_tls() {
    let pki = pki();
    let control = Arc::new(SoftwareControl::new(
        Config {
            max_connections: 64,
            ..Config::default()
        },
        64,
    ));
    let server = ApiServer::bind(&ServerConfig {
        listen: Listen::Tcp {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: Some(TlsConfig {
                cert_pem: pki.server_cert.clone().into(),
                key_pem: pki.server_key.clone().into(),
                client_ca_pem: pki.ca_pem.clone().into(),
            }),
        },
    })
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(control, shutdown.clone()));

    // With a client certificate from the CA: served.
    let ch = tls_channel(addr, &pki.ca_pem, Some((&pki.client_cert, &pki.client_key)))
        .await
        .unwrap();
    let d = DeviceServiceClient::new(ch)
        .get_device_status(pb::GetDeviceStatusRequest {})
        .await
        .unwrap();
    assert_eq!(d.into_inner().backend, "software");

    // Without one: refused (at the handshake or the first call).
    let refused = match tls_channel(addr, &pki.ca_pem, None).await {
        Err(_) => true,
        Ok(ch) => DeviceServiceClient::new(ch)
            .get_device_status(pb::GetDeviceStatusRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate must be rejected");

    // With a certificate from another CA: refused.
    let (other, _) = ca();
    let (cert, key) = leaf(&other, "intruder");
    let refused = match tls_channel(addr, &pki.ca_pem, Some((&cert, &key))).await {
        Err(_) => true,
        Ok(ch) => DeviceServiceClient::new(ch)
            .get_device_status(pb::GetDeviceStatusRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA must be rejected");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn tcp_without_tls_is_refused_at_startup() {
    let e = ApiServer::bind(&ServerConfig {
        listen: Listen::Tcp {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        },
    })
    .await
    .unwrap_err();
    assert!(
        matches!(e, ServeError::TlsRequired { field: "api.tls" }),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("api.tls: "), "{e}");
    let e = ApiServer::bind(&ServerConfig {
        listen: Listen::Tcp {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: Some(TlsConfig {
                cert_pem: b"x".to_vec(),
                key_pem: b"y".to_vec(),
                client_ca_pem: Vec::new(),
            }),
        },
    })
    .await
    .unwrap_err();
    assert!(e.to_string().starts_with("api.tls.cert: "), "{e}");
}
