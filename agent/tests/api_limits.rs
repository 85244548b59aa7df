//! The API server's resource limits (`ApiLimits`, agent/src/api/server.rs) over a real
//! tonic client on a Unix socket: oversized requests and responses, the cap on event
//! subscribers, and HTTP/2 streams per connection.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ctoffload_agent::api::server::ApiLimits;
use ctoffload_agent::api::{ApiServer, Listen, ServeError, ServerConfig, SoftwareControl};
use ctoffload_fallback_sw::conntrack::Config;
use ctoffload_proto::v1 as pb;
use ctoffload_proto::v1::event_service_client::EventServiceClient;
use ctoffload_proto::v1::nat_service_client::NatServiceClient;
use ctoffload_proto::v1::stats_service_client::StatsServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

/// Bound on every wait (never the thing asserted).
const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Harness {
    async fn start(limits: ApiLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let control = Arc::new(SoftwareControl::new(Config::default(), 1024));
        let server = ApiServer::bind(&ServerConfig {
            listen: Listen::unix(&path),
        })
        .await
        .unwrap()
        .with_limits(limits);
        assert_eq!(server.limits(), limits);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(control, shutdown.clone()));
        Self {
            _dir: dir,
            path,
            shutdown,
            task,
        }
    }

    /// A new client connection (one HTTP/2 connection per channel).
    async fn channel(&self) -> Channel {
        let path = self.path.clone();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("shutdown in time")
            .unwrap()
            .unwrap();
    }
}

/// A source NAT rule to the address 192.0.2.`host` (pools must not overlap).
fn rule(name: &str, host: u8) -> pb::AddNatRuleRequest {
    let to = format!("192.0.2.{host}");
    pb::AddNatRuleRequest {
        rule: Some(pb::NatRule {
            name: name.into(),
            kind: pb::NatKind::Snat.into(),
            src_prefix: "10.0.0.0/8".into(),
            to_addresses: Some(pb::AddressRange {
                first: to.clone(),
                last: to,
            }),
            ..Default::default()
        }),
    }
}

async fn subscribe(ch: &Channel) -> Result<tonic::Streaming<pb::EventRecord>, tonic::Status> {
    let mut c = EventServiceClient::new(ch.clone());
    let call = c.watch_events(pb::WatchEventsRequest {
        from_sequence: None,
        kinds: vec![],
    });
    tokio::time::timeout(WAIT, call)
        .await
        .expect("answer in time")
        .map(tonic::Response::into_inner)
}

#[test]
fn defaults_are_the_documented_constants() {
    use ctoffload_agent::api::server as s;
    let d = ApiLimits::default();
    assert_eq!(d.max_request_bytes, 1 << 20);
    assert_eq!(d.max_request_bytes, s::DEFAULT_MAX_REQUEST_BYTES);
    assert_eq!(d.max_response_bytes, s::DEFAULT_MAX_RESPONSE_BYTES);
    assert_eq!(d.max_concurrent_streams, s::DEFAULT_MAX_CONCURRENT_STREAMS);
    assert_eq!(d.max_event_subscribers, s::DEFAULT_MAX_EVENT_SUBSCRIBERS);
    assert_eq!(d.request_timeout, s::DEFAULT_REQUEST_TIMEOUT);
}

#[tokio::test]
async fn oversized_request_is_refused_and_the_connection_stays_usable() {
    let h = Harness::start(ApiLimits {
        max_request_bytes: 4096,
        ..ApiLimits::default()
    })
    .await;
    let ch = h.channel().await;
    let mut nat = NatServiceClient::new(ch.clone());
    let e = nat
        .add_nat_rule(rule(&"x".repeat(8192), 1))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("too large") && e.message().contains("4096"),
        "the status says why: {}",
        e.message()
    );
    // Nothing was added; a request under the limit on the same connection works.
    let rules = nat
        .list_nat_rules(pb::ListNatRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(rules.rules.is_empty());
    let added = nat
        .add_nat_rule(rule("small", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.name, "small");
    h.stop().await;
}

#[tokio::test]
async fn oversized_response_ends_the_call_with_a_clear_status() {
    let h = Harness::start(ApiLimits {
        max_response_bytes: 200,
        ..ApiLimits::default()
    })
    .await;
    let ch = h.channel().await;
    let mut nat = NatServiceClient::new(ch.clone());
    for i in 0..8u8 {
        nat.add_nat_rule(rule(&format!("rule-{i}"), i + 1))
            .await
            .unwrap();
    }
    let e = nat
        .list_nat_rules(pb::ListNatRulesRequest {})
        .await
        .expect_err("eight rules do not fit in 200 bytes");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{}", e.message());
    h.stop().await;
}

#[tokio::test]
async fn event_subscribers_beyond_the_cap_are_resource_exhausted() {
    let h = Harness::start(ApiLimits {
        max_event_subscribers: 2,
        ..ApiLimits::default()
    })
    .await;
    // Subscribers on two different connections count together.
    let (a, b) = (h.channel().await, h.channel().await);
    let s1 = subscribe(&a).await.unwrap();
    let s2 = subscribe(&b).await.unwrap();
    let e = subscribe(&a).await.expect_err("third subscriber");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("WatchEvents"), "{}", e.message());
    // Other calls are not affected.
    StatsServiceClient::new(b.clone())
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap();
    // A subscriber that leaves frees its place (the server sees the stream reset).
    drop(s1);
    let t0 = std::time::Instant::now();
    let s3 = loop {
        match subscribe(&a).await {
            Ok(s) => break s,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(t0.elapsed() < WAIT, "place not freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        subscribe(&b).await.expect_err("full again").code(),
        Code::ResourceExhausted
    );
    drop((s2, s3));
    h.stop().await;
}

#[tokio::test]
async fn streams_per_connection_are_capped() {
    let h = Harness::start(ApiLimits {
        max_concurrent_streams: 2,
        ..ApiLimits::default()
    })
    .await;
    let ch = h.channel().await;
    let s1 = subscribe(&ch).await.unwrap();
    let s2 = subscribe(&ch).await.unwrap();
    // Both streams of this connection are open: a third call waits for one to end.
    let mut stats = StatsServiceClient::new(ch.clone());
    let waiting = tokio::spawn(async move { stats.get_stats(pb::GetStatsRequest {}).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a third stream was opened");
    // Another connection is not limited by this one's streams.
    let other = h.channel().await;
    StatsServiceClient::new(other)
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap();
    drop(s1);
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("runs once a stream ended")
        .unwrap()
        .unwrap();
    drop(s2);
    h.stop().await;
}
