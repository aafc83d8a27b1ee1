//! What every listener enforces before a request reaches a handler, the OTLP receivers and the
//! admin listener alike: a cap on open connections, deadlines for a client that sends nothing
//! or sends too slowly, and HTTP/2's stream and keepalive limits.
//!
//! - **Connections.** Past `max_connections` a new connection is accepted and closed at once,
//!   and counted: a flood cannot exhaust the process's file descriptors, and the listener
//!   answers again as soon as connections close.
//! - **Idle deadline.** A connection on which no byte has moved in either direction for
//!   `idle_timeout` fails its next read or write, and is closed. A new connection gets
//!   `header_read_timeout` for its first byte.
//! - **Slow headers.** Over HTTP/1, a request head (the first, or the next on a kept-alive
//!   connection) must arrive whole within `header_read_timeout` (hyper's own timer, which
//!   `axum::serve` never sets).
//! - **HTTP/2.** At most `max_concurrent_streams` streams a connection; a ping every
//!   `keepalive`, and a peer that does not answer within it is dropped.
//! - **Bodies.** `body_read_timeout` is applied by the handlers (HTTP) and by tonic (gRPC).
//! - **TLS**, when the listener has it ([`super::tls`]): the handshake runs in the
//!   connection's task and must finish within `header_read_timeout`.
//!
//! The accept loop is written here rather than taken from `axum::serve`, which has no place
//! for any of these settings; hyper-util's connection builder and graceful shutdown do the
//! protocol work.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::tls::Tls;
use crate::config::ListenerLimits;
use crate::telemetry::{CounterFamily, Labels, Registry, label};

/// Open and refused connections, by listener.
pub(crate) struct ConnectionMetrics {
    open: prometheus_client::metrics::family::Family<Labels, Gauge>,
    refused: CounterFamily,
    timed_out: CounterFamily,
    handshakes_failed: CounterFamily,
}

impl ConnectionMetrics {
    pub(crate) fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            open: registry.register(
                "connections",
                "Open connections, by listener",
                Default::default(),
            ),
            refused: registry.counters(
                "connections_refused",
                "Connections closed at once because the listener had max_connections open, by listener",
            ),
            timed_out: registry.counters(
                "connections_timed_out",
                "Connections closed for moving no byte within header_read_timeout (a new one) or idle_timeout, by listener",
            ),
            handshakes_failed: registry.counters(
                "tls_handshakes_failed",
                "TLS handshakes that failed or did not finish within header_read_timeout (a client without an accepted certificate under mTLS among them), by listener",
            ),
        })
    }
}

/// A listener's connection slots and deadlines.
pub(crate) struct Gate {
    name: &'static str,
    limits: ListenerLimits,
    slots: Arc<Semaphore>,
    /// This listener's series, resolved once rather than looked up on every connection.
    open: Gauge,
    refused: prometheus_client::metrics::counter::Counter,
    timed_out: prometheus_client::metrics::counter::Counter,
    handshakes_failed: prometheus_client::metrics::counter::Counter,
    tls: Option<Arc<Tls>>,
}

impl Gate {
    pub(crate) fn new(
        name: &'static str,
        limits: &ListenerLimits,
        tls: Option<Arc<Tls>>,
        metrics: Arc<ConnectionMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            limits: limits.clone(),
            open: metrics.open.get_or_create_owned(&label("listener", name)),
            refused: metrics
                .refused
                .get_or_create_owned(&label("listener", name)),
            timed_out: metrics
                .timed_out
                .get_or_create_owned(&label("listener", name)),
            handshakes_failed: metrics
                .handshakes_failed
                .get_or_create_owned(&label("listener", name)),
            tls,
        })
    }

    /// A new connection as the server will speak on it: plain, or after its TLS handshake.
    /// `None` when the handshake failed (counted).
    async fn establish(&self, conn: Limited) -> Option<Conn> {
        let Some(tls) = &self.tls else {
            return Some(Conn::Plain(conn));
        };
        let handshake = tls.acceptor().accept(conn);
        match tokio::time::timeout(self.limits.header_read_timeout.0, handshake).await {
            Ok(Ok(stream)) => Some(Conn::Tls(Box::new(stream))),
            Ok(Err(e)) => {
                self.handshakes_failed.inc();
                tracing::debug!(listener = self.name, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.handshakes_failed.inc();
                tracing::debug!(listener = self.name, "TLS handshake timed out");
                None
            }
        }
    }

    /// Waits for the next connection that gets a slot; connections past the cap are closed.
    async fn accept(self: &Arc<Self>, listener: &TcpListener) -> Limited {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was taken: keep
                    // serving the connections there are, and try again shortly.
                    tracing::warn!(listener = self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.refused.inc();
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            return Limited::new(stream, self.clone(), slot);
        }
    }

    /// Serves an axum router on `listener` until `shutdown` resolves, then lets every open
    /// connection finish what it started (HTTP/1 its request, HTTP/2 a GOAWAY) and returns.
    pub(crate) async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        router: axum::Router,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout.0);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.max_concurrent_streams)
            .keep_alive_interval(self.limits.keepalive.0)
            .keep_alive_timeout(self.limits.keepalive.0);
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let conn = tokio::select! {
                conn = self.accept(&listener) => conn,
                () = &mut shutdown => break,
            };
            let (gate, builder, router) = (self.clone(), builder.clone(), router.clone());
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let Some(conn) = gate.establish(conn).await else {
                    return;
                };
                let service = TowerToHyperService::new(router);
                let served = builder.serve_connection_with_upgrades(TokioIo::new(conn), service);
                if let Err(e) = watcher.watch(served).await {
                    tracing::debug!(listener = gate.name, error = %e, "connection ended");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
    }

    /// The listener's connections, gated and shaken hands with, as the stream tonic serves.
    /// Each handshake runs in a task of its own, so a slow client holds up no other; the
    /// accept loop ends when tonic drops the stream.
    pub(crate) fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> impl futures_core::Stream<Item = io::Result<Conn>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    conn = self.accept(&listener) => conn,
                    () = tx.closed() => return,
                };
                let (gate, tx) = (self.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(conn) = gate.establish(conn).await {
                        let _ = tx.send(Ok(conn));
                    }
                });
            }
        });
        Incoming(rx)
    }
}

/// Established connections, in the order their handshakes finished.
struct Incoming(tokio::sync::mpsc::UnboundedReceiver<io::Result<Conn>>);

impl futures_core::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// A connection as served: plain TCP or TLS over it, each under its [`Limited`] deadlines.
pub(crate) enum Conn {
    Plain(Limited),
    Tls(Box<tokio_rustls::server::TlsStream<Limited>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Conn::Tls(c) => Pin::new(c).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Conn::Tls(c) => Pin::new(c).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Conn::Tls(c) => Pin::new(c).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(c) => c.is_write_vectored(),
            Conn::Tls(c) => c.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_flush(cx),
            Conn::Tls(c) => Pin::new(c).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Conn::Tls(c) => Pin::new(c).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(c) => c.io.connect_info(),
            Conn::Tls(c) => c.get_ref().0.io.connect_info(),
        }
    }
}

/// A connection holding one of its listener's slots, which fails its next read or write once
/// no byte has moved for its deadline.
pub(crate) struct Limited {
    io: TcpStream,
    gate: Arc<Gate>,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Limited {
    fn new(io: TcpStream, gate: Arc<Gate>, slot: OwnedSemaphorePermit) -> Self {
        gate.open.inc();
        let first = gate.limits.header_read_timeout.0;
        Self {
            io,
            deadline: Box::pin(tokio::time::sleep(first)),
            gate,
            _slot: slot,
        }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.gate.limits.idle_timeout.0;
        self.deadline.as_mut().reset(next);
    }

    /// A write's result: bytes out move the deadline; a write still pending past it fails.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    /// While the socket has nothing for us: past the deadline, the connection is done.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.gate.timed_out.inc();
            return true;
        }
        false
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        self.gate.open.dec();
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle past its deadline")
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does,
/// so `max_connections` and not a default of 1,024 descriptors bounds the listeners.
pub(crate) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
