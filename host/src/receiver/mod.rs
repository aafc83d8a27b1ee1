//! OTLP receivers: gRPC on 4317 and HTTP (protobuf and JSON) on 4318 by default, for traces
//! and metrics.
//!
//! Owns the listeners and the translation between OTLP's transport rules (status codes, error
//! bodies, size limits, compression) and the shared ingest path. A receiver never buffers or
//! decides anything itself; it answers only after the spans are in the buffer or refused.

mod admission;
mod auth;
mod files;
pub(crate) mod grpc;
pub(crate) mod http;
pub(crate) mod ingest;
pub(crate) mod listen;
mod metrics;
mod passthrough;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub(crate) use auth::Tokens;
pub use ingest::Ingest;
pub(crate) use ingest::{Accepted, RequestLimits};
pub(crate) use listen::{ConnectionMetrics, Gate};
pub use metrics::ReceiverMetrics;
pub(crate) use tls::Tls;

use crate::config::ReceiversConfig;

/// Bodies above this are parsed with `block_in_place`, so a 64 MiB request does not stall the
/// other connections served by the same runtime thread.
const INLINE_PARSE_LIMIT: usize = 256 << 10;

fn run_ingest<T>(len: usize, f: impl FnOnce() -> T) -> T {
    if len > INLINE_PARSE_LIMIT {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Label for the `tailgate_requests_total{outcome}` counter.
fn outcome(accepted: &Accepted) -> &'static str {
    if accepted.rejected_spans > 0 {
        "partial"
    } else {
        "ok"
    }
}

/// Listening receivers, with the addresses they actually bound (port 0 resolves here).
pub(crate) struct Receivers {
    pub(crate) grpc: Option<SocketAddr>,
    pub(crate) http: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receivers {
    /// Binds every configured listener and starts serving until `shutdown` resolves.
    pub(crate) async fn start(
        config: &ReceiversConfig,
        ingest: Arc<Ingest>,
        metrics: Arc<ReceiverMetrics>,
        connections: Arc<ConnectionMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let limit = config.max_request_size.bytes();
        let tokens = match &config.auth.tokens_file {
            Some(path) => Some(
                auth::Tokens::watch(path.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let tls = match config.tls.files() {
            Some(files) => Some(
                tls::Tls::watch("receivers.tls", &files)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let admission = admission::Admission::new(config.max_in_flight_bytes.bytes());
        let mut tasks = Vec::new();
        let mut grpc_addr = None;
        let mut http_addr = None;
        if let Some(addr) = config.grpc {
            let listener = bind(addr, "grpc").await?;
            grpc_addr = Some(listener.local_addr()?);
            let traces = grpc::ExportService::<grpc::Traces>::new(
                ingest.clone(),
                metrics.clone(),
                limit,
                tokens.clone(),
                admission.clone(),
            );
            let metrics_service = grpc::ExportService::<grpc::Metrics>::new(
                ingest.clone(),
                metrics.clone(),
                limit,
                tokens.clone(),
                admission.clone(),
            );
            let signal = signalled(shutdown.clone());
            let limits = &config.limits;
            let incoming =
                Gate::new("grpc", limits, tls.clone(), connections.clone()).incoming(listener);
            let mut server = tonic::transport::Server::builder()
                .timeout(limits.body_read_timeout.0)
                .max_concurrent_streams(limits.max_concurrent_streams)
                .http2_keepalive_interval(Some(limits.keepalive.0))
                .http2_keepalive_timeout(Some(limits.keepalive.0));
            tasks.push(tokio::spawn(async move {
                let served = server
                    .add_service(traces)
                    .add_service(metrics_service)
                    .serve_with_incoming_shutdown(incoming, signal)
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "OTLP/gRPC receiver stopped");
                }
            }));
        }
        if let Some(addr) = config.http {
            let listener = bind(addr, "http").await?;
            http_addr = Some(listener.local_addr()?);
            let app = http::router(ingest, metrics, config, tokens, admission);
            let gate = Gate::new("http", &config.limits, tls, connections);
            tasks.push(tokio::spawn(gate.serve_http(
                listener,
                app,
                signalled(shutdown.clone()),
            )));
        }
        Ok(Self {
            grpc: grpc_addr,
            http: http_addr,
            tasks,
        })
    }

    /// Waits until every listener has closed and its in-flight requests are answered.
    pub(crate) async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Resolves once `flag` turns true (or its sender is gone).
pub(crate) async fn signalled(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}

/// Connections the kernel holds for a listener before it takes them. Rust's default is 128,
/// which a reconnect storm (every client of a restarted collector at once) overflows: the
/// kernel then drops SYNs, and each dropped client waits a second or more to retry.
const LISTEN_BACKLOG: u32 = 4096;

pub(crate) async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}"))
    })
}
