//! A tower layer that logs every RPC (method, gRPC status, latency) with `tracing`
//! and counts them per method and status.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;
use tower::{Layer, Service};

/// RPC counts per (method path, status code).
#[derive(Debug, Default)]
pub struct RpcMetrics {
    counts: Mutex<BTreeMap<(String, i32), u64>>,
}

impl RpcMetrics {
    fn record(&self, method: &str, code: Code) {
        if let Ok(mut m) = self.counts.lock() {
            *m.entry((method.to_owned(), code as i32)).or_default() += 1;
        }
    }

    /// How many calls of `method` (`/ctoffload.v1.ConntrackService/Flush`) ended
    /// with `code` (as seen when the response headers left: a streaming call that
    /// fails later counts as OK here).
    #[must_use]
    pub fn count(&self, method: &str, code: Code) -> u64 {
        self.counts
            .lock()
            .map(|m| {
                m.get(&(method.to_owned(), code as i32))
                    .copied()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Every (method, code, count) counted so far, sorted by method then code.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(String, Code, u64)> {
        self.counts
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((method, code), n)| (method.clone(), Code::from_i32(*code), *n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Total calls counted.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
}

/// The layer. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct RpcLogLayer {
    metrics: Arc<RpcMetrics>,
}

impl RpcLogLayer {
    /// A layer counting into `metrics`.
    #[must_use]
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> RpcLog<S> {
        RpcLog {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service the layer wraps around the router.
#[derive(Debug, Clone)]
pub struct RpcLog<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

/// The gRPC status of a response as far as its headers tell (trailers-only error
/// responses carry it there; successful ones carry it in trailers: OK so far).
fn header_code<B>(res: &http::Response<B>) -> Code {
    res.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // The clone is not ready; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = Arc::clone(&self.metrics);
        let method = req.uri().path().to_owned();
        Box::pin(async move {
            let start = Instant::now();
            let res = inner.call(req).await;
            let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            match &res {
                Ok(r) => {
                    let code = header_code(r);
                    metrics.record(&method, code);
                    if code == Code::Ok {
                        tracing::info!(method = %method, code = ?code, latency_us = micros, "rpc");
                    } else {
                        tracing::warn!(method = %method, code = ?code, latency_us = micros, "rpc");
                    }
                }
                Err(e) => {
                    metrics.record(&method, Code::Internal);
                    tracing::error!(method = %method, error = %e, latency_us = micros, "rpc failed");
                }
            }
            res
        })
    }
}
