//! The API served on a Unix socket and a real tonic client for it, shared by the
//! tests that drive the gRPC API.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ctoffload_agent::api::{ApiServer, ControlPlane, Listen, RpcMetrics, ServeError, ServerConfig};
use ctoffload_proto::v1 as pb;
use ctoffload_proto::v1::conntrack_service_client::ConntrackServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

/// A running server and a client channel to it.
pub struct Served {
    /// Cancel to shut the server down.
    pub shutdown: CancellationToken,
    /// The server task.
    pub task: JoinHandle<Result<(), ServeError>>,
    /// The client's channel.
    pub channel: Channel,
    /// The server's RPC counters.
    pub metrics: Arc<RpcMetrics>,
}

/// A channel to the API on the Unix socket `path`.
pub async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .unwrap()
}

/// Serve `control` on the Unix socket `sock` and connect to it.
pub async fn serve<C: ControlPlane>(control: Arc<C>, sock: &Path) -> Served {
    let server = ApiServer::bind(&ServerConfig {
        listen: Listen::unix(sock),
    })
    .await
    .unwrap();
    let metrics = server.metrics();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(control, shutdown.clone()));
    let channel = unix_channel(sock.to_owned()).await;
    Served {
        shutdown,
        task,
        channel,
        metrics,
    }
}

/// Shut the server down and wait (bounded) for it to end cleanly.
pub async fn stop(shutdown: &CancellationToken, task: JoinHandle<Result<(), ServeError>>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("graceful shutdown in time")
        .unwrap()
        .unwrap();
}

/// Every connection `filter` selects (all pages of the stream).
pub async fn list(channel: &Channel, filter: pb::ConnectionFilter) -> Vec<pb::Connection> {
    let mut s = ConntrackServiceClient::new(channel.clone())
        .list_connections(pb::ListConnectionsRequest {
            filter: Some(filter),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend(m.connections);
    }
    out
}
