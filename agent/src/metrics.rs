//! Prometheus metrics: a registry with the statistics the API exposes (read from the
//! [`ControlPlane`] at every scrape), the RPC counts of the API's tower layer, and
//! two series the dataplane feeds through a [`MetricsHandle`]: the time from a
//! flow's first packet to its offload (histogram) and the depth of the offload
//! command queue (gauge). [`serve`] answers `GET /metrics` over plain HTTP/1.x.
//!
//! Nothing here is on the packet path: the collector takes one statistics snapshot
//! per scrape.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::api::ControlPlane;
use crate::api::layer::RpcMetrics;

/// Prefix of every series.
pub const PREFIX: &str = "ctoffload";

/// What the dataplane feeds. Cheap to clone; every clone feeds the same series.
#[derive(Debug, Clone)]
pub struct MetricsHandle {
    time_to_offload: Histogram,
    offload_queue_depth: Gauge,
}

impl Default for MetricsHandle {
    fn default() -> Self {
        Self {
            // 100 µs .. ~52 s.
            time_to_offload: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            offload_queue_depth: Gauge::default(),
        }
    }
}

impl MetricsHandle {
    /// A flow went onto the fast path `elapsed` after its first packet.
    pub fn observe_time_to_offload(&self, elapsed: Duration) {
        self.time_to_offload.observe(elapsed.as_secs_f64());
    }

    /// Offload commands queued and not yet completed.
    pub fn set_offload_queue_depth(&self, depth: u64) {
        self.offload_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }
}

/// The collector that reads [`ControlPlane::stats`] at every scrape.
struct StatsCollector<C> {
    control: Arc<C>,
    rpc: Vec<Arc<RpcMetrics>>,
}

impl<C> std::fmt::Debug for StatsCollector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsCollector").finish_non_exhaustive()
    }
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn labeled<'a, I>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: I,
) -> std::fmt::Result
where
    I: IntoIterator<Item = (Vec<(&'a str, String)>, u64)>,
{
    let mut fam = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let m = fam.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(m)?,
            _ => ConstGauge::new(v).encode(m)?,
        }
    }
    Ok(())
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => other.to_string(),
    }
}

impl<C: ControlPlane> Collector for StatsCollector<C> {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut calls = std::collections::BTreeMap::new();
        for rpc in &self.rpc {
            for (method, code, n) in rpc.snapshot() {
                *calls.entry((method, format!("{code:?}"))).or_insert(0u64) += n;
            }
        }
        labeled(
            &mut e,
            "api_requests",
            "gRPC calls per method and status code",
            MetricType::Counter,
            calls
                .into_iter()
                .map(|((method, code), n)| (vec![("method", method), ("code", code)], n)),
        )?;
        let Ok(s) = self.control.stats() else {
            // A poisoned core: export what the layer knows and nothing more.
            return gauge(&mut e, "stats_up", "1 when statistics could be read", 0);
        };
        gauge(&mut e, "stats_up", "1 when statistics could be read", 1)?;
        gauge(&mut e, "connections", "Tracked connections", s.connections)?;
        gauge(
            &mut e,
            "connections_max",
            "Connection table capacity",
            s.max_connections,
        )?;
        labeled(
            &mut e,
            "connections_by_state",
            "TCP connections per conntrack state",
            MetricType::Gauge,
            s.by_tcp_state
                .iter()
                .map(|(st, n)| (vec![("state", (*st).to_owned())], *n)),
        )?;
        labeled(
            &mut e,
            "connections_by_protocol",
            "Connections per IP protocol",
            MetricType::Gauge,
            s.by_protocol
                .iter()
                .map(|(p, n)| (vec![("protocol", proto_name(*p))], *n)),
        )?;
        gauge(
            &mut e,
            "offloaded",
            "Connections on a fast path",
            s.offloaded,
        )?;
        gauge(
            &mut e,
            "hw_offloaded",
            "Connections in the hardware flow table",
            s.hw_offloaded,
        )?;
        gauge(
            &mut e,
            "hw_table_used",
            "Hardware flow-table entries in use",
            s.hw_table.used,
        )?;
        gauge(
            &mut e,
            "hw_table_capacity",
            "Hardware flow-table entries (0: no hardware)",
            s.hw_table.capacity,
        )?;
        counter(
            &mut e,
            "hw_insert_failures",
            "Flow inserts the device refused",
            s.hw_table.insert_failures,
        )?;
        labeled(
            &mut e,
            "insert_failures",
            "Connection inserts refused, per cause",
            MetricType::Counter,
            [
                (vec![("cause", "clash".to_owned())], s.insert_failed_clash),
                (vec![("cause", "full".to_owned())], s.insert_failed_full),
            ],
        )?;
        counter(
            &mut e,
            "early_drops",
            "Connections dropped early to make room",
            s.early_drops,
        )?;
        counter(&mut e, "expired", "Connections expired", s.expired)?;
        counter(&mut e, "created", "Connections created", s.created)?;
        counter(
            &mut e,
            "packets",
            "Packets seen by the slow path",
            s.packets,
        )?;
        labeled(
            &mut e,
            "drops",
            "Packets dropped as invalid or malformed, per reason",
            MetricType::Counter,
            s.drops_by_reason
                .iter()
                .map(|(r, n)| (vec![("reason", r.clone())], *n)),
        )?;
        labeled(
            &mut e,
            "nat_pool_size",
            "Address x port pairs in a NAT rule's pool",
            MetricType::Gauge,
            s.port_pools
                .iter()
                .map(|p| (vec![("rule", p.rule.clone())], p.total)),
        )?;
        labeled(
            &mut e,
            "nat_pool_used",
            "Address x port pairs of a NAT rule's pool bound to connections",
            MetricType::Gauge,
            s.port_pools
                .iter()
                .map(|p| (vec![("rule", p.rule.clone())], p.used)),
        )?;
        counter(
            &mut e,
            "journal_evicted",
            "Event journal records evicted",
            s.journal.evicted,
        )?;
        counter(
            &mut e,
            "journal_source_lost",
            "Events lost before the journal",
            s.journal.source_lost,
        )?;
        gauge(
            &mut e,
            "journal_next_sequence",
            "Sequence the next event will get",
            s.journal.next_sequence,
        )
    }
}

/// A registry with every series, reading `control` at each scrape; `rpc` adds the
/// call counts of the API servers' logging layers.
pub fn registry<C: ControlPlane>(
    control: Arc<C>,
    rpc: Vec<Arc<RpcMetrics>>,
) -> (Registry, MetricsHandle) {
    let handle = MetricsHandle::default();
    (registry_with(control, rpc, &handle), handle)
}

/// The same, with the dataplane's series fed through an existing `handle`.
pub fn registry_with<C: ControlPlane>(
    control: Arc<C>,
    rpc: Vec<Arc<RpcMetrics>>,
    handle: &MetricsHandle,
) -> Registry {
    let mut reg = Registry::with_prefix(PREFIX);
    reg.register(
        "time_to_offload_seconds",
        "Time from a flow's first packet to its offload",
        handle.time_to_offload.clone(),
    );
    reg.register(
        "offload_queue_depth",
        "Offload commands queued and not yet completed",
        handle.offload_queue_depth.clone(),
    );
    reg.register_collector(Box::new(StatsCollector { control, rpc }));
    reg
}

/// The registry in the OpenMetrics text format.
#[must_use]
pub fn encode(reg: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, reg).is_err() {
        out.clear();
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `GET /metrics` on `listener` until `shutdown`. Each connection gets one
/// response and is closed (HTTP/1.0 style, `Connection: close`).
pub async fn serve(listener: TcpListener, reg: Arc<Registry>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let reg = Arc::clone(&reg);
        tokio::spawn(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &reg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: request failed"),
                Err(_) => tracing::debug!(%peer, "metrics: request timed out"),
            }
        });
    }
}

async fn answer(mut stream: TcpStream, reg: &Registry) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = encode(reg);
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            respond(&mut stream, "200 OK", CONTENT_TYPE, &body).await
        }
        ("GET" | "HEAD", _) => {
            respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SoftwareControl;

    #[test]
    fn series_present() {
        let control = Arc::new(SoftwareControl::new(Default::default(), 1024));
        let (reg, handle) = registry(control, vec![Arc::new(RpcMetrics::default())]);
        handle.observe_time_to_offload(Duration::from_millis(3));
        handle.set_offload_queue_depth(7);
        let text = encode(&reg);
        for s in [
            "ctoffload_connections 0",
            "ctoffload_offload_queue_depth 7",
            "ctoffload_time_to_offload_seconds_count 1",
            "ctoffload_drops_total{reason=\"tcp_invalid\"} 0",
            "ctoffload_hw_table_capacity 0",
        ] {
            assert!(text.contains(s), "{s} missing from\n{text}");
        }
    }
}
