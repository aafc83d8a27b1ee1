//! The running host: builds every stage from the config, starts them in dependency order, and
//! stops them in the reverse order on SIGTERM or SIGINT so that nothing buffered is lost:
//! listeners close, every buffered trace is decided (trigger `shutdown`), the exporter flushes
//! within `shutdown.timeout`, and what it could not deliver stays in the storage log.
//!
//! Before anything listens, the storage log left by the previous run is replayed: decisions
//! first, then every span record from the checkpoint, on its record time, and every metrics
//! record not yet settled, to the exporter again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use tokio::sync::watch;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::buffer::{MemoryBudget, Timings, shard_of};
use crate::clock::{Clock, MonotonicClock};
use crate::config::{Config, StorageKind};
use crate::export::Exporter;
use crate::pipeline::{PipelineMetrics, ShardMsg, TimingBoard, WorkerContext, Workers};
use crate::plugin::chain::WasmChainFactory;
use crate::plugin::reload::{self, Reloader};
use crate::plugin::{PluginMetrics, PolicyRuntime};
use crate::receiver::{
    ConnectionMetrics, Gate, Ingest, ReceiverMetrics, Receivers, RequestLimits, Tls, Tokens, bind,
    signalled,
};
use crate::storage::{RecordKind, Recovery, Storage};
use crate::telemetry::Registry;
use crate::telemetry::admin::{self, Health};

/// Runs until SIGTERM or SIGINT, then shuts down cleanly.
pub(crate) async fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let registry = Registry::new();
    let plugin_metrics = PluginMetrics::new(&registry);
    let connections = ConnectionMetrics::new(&registry);
    let health = Arc::new(Health::default());
    let timing = TimingBoard::new(&registry);
    let (stop_tx, stop_rx) = watch::channel(false);
    crate::receiver::listen::raise_open_file_limit();

    // Policies load (compile, type-check, init) before anything listens: a refused policy
    // stops the start with its reason.
    let base_dir = reload::base_dir_of(config_path.as_deref());
    let runtime = PolicyRuntime::start(&config, &base_dir).context("loading policies")?;
    registry.register_collector(Box::new(runtime.engine.counters().clone()));
    let reloader = Reloader::new(
        runtime.clone(),
        plugin_metrics.clone(),
        config_path.clone(),
        base_dir,
        config.clone(),
    );
    let stop_watch = Arc::new(AtomicBool::new(false));
    reloader.watch(config.plugins.watch_interval.0, stop_watch.clone());

    let admin_addr = match config.admin.endpoint {
        Some(addr) => {
            let routes = admin_routes(&config.admin, &registry, &health, &reloader, &timing)?;
            let tls = match config.admin.tls.files() {
                Some(files) => Some(Tls::watch("admin.tls", &files).map_err(anyhow::Error::msg)?),
                None => None,
            };
            let gate = Gate::new("admin", &config.admin.limits, tls, connections.clone());
            Some(start_admin(addr, gate, routes, stop_rx.clone()).await?)
        }
        None => None,
    };

    let (storage, recovery) = match config.storage.kind {
        StorageKind::Local => {
            let (storage, recovery) =
                Storage::open(&config.storage, &registry).context("opening the storage log")?;
            (Some(storage), Some(recovery))
        }
        StorageKind::Memory => {
            tracing::warn!(
                "storage.kind = \"memory\": buffered and queued spans are lost if the process dies"
            );
            (None, None)
        }
    };
    let exporter = Exporter::start(&config.exporter, &registry, storage.clone())
        .context("starting the exporter")?;
    let memory = Arc::new(MemoryBudget::new(config.buffer.max_buffer_bytes.bytes()));
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::default());
    let workers = Workers::spawn(
        config.worker_count(),
        WorkerContext {
            timings: Timings::from_config(&config.buffer),
            memory: memory.clone(),
            metrics: PipelineMetrics::new(&registry),
            export: exporter.queue.clone(),
            clock: clock.clone(),
            remember_kept: config.buffer.remember_kept,
            remember_dropped: config.buffer.remember_dropped,
            storage: storage.clone(),
            timing: timing.clone(),
            timing_dir: (config.storage.kind == StorageKind::Local)
                .then(|| config.storage.dir.join("timing")),
        },
        &WasmChainFactory {
            runtime,
            metrics: plugin_metrics,
        },
    )
    .context("starting decision workers")?;
    let receiver_metrics = ReceiverMetrics::new(&registry);
    let ingest = Arc::new(
        Ingest::new(
            workers.senders.clone(),
            memory.clone(),
            receiver_metrics.clone(),
        )
        .with_storage(storage.clone())
        .with_limits(RequestLimits::from_config(&config.receivers))
        .with_metrics_queue(exporter.metrics_queue()),
    );
    if let (Some(storage), Some(recovery)) = (&storage, recovery) {
        let (storage, ingest, senders) = (storage.clone(), ingest.clone(), workers.senders.clone());
        tokio::task::spawn_blocking(move || {
            recover(&storage, recovery, &senders, &ingest, &memory, &*clock);
            storage.start_release()
        })
        .await
        .context("replaying the storage log")?
        .context("starting the storage log's release")?;
    }

    let (listen_stop_tx, listen_stop_rx) = watch::channel(false);
    let receivers = Receivers::start(
        &config.receivers,
        ingest.clone(),
        receiver_metrics,
        connections,
        listen_stop_rx,
    )
    .await
    .context("starting receivers")?;
    for (kind, addr) in [
        ("grpc", receivers.grpc),
        ("http", receivers.http),
        ("admin", admin_addr),
    ] {
        if let Some(addr) = addr {
            // Tests and scripts read these lines to learn ports bound as 0.
            tracing::info!("{kind} listening on {addr}");
        }
    }
    tracing::info!(
        workers = config.worker_count(),
        exporter = config.exporter.kind().name(),
        "tailgate ready"
    );
    health.set_ready(true);

    let sighup = tokio::spawn(reload_on_sighup(reloader.clone()));
    let signal = wait_for_signal().await;
    sighup.abort();
    stop_watch.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        signal,
        "shutting down: closing listeners, deciding buffered traces, flushing"
    );
    let deadline = tokio::time::Instant::now() + config.shutdown.timeout.0;
    health.set_ready(false);
    exporter.begin_shutdown(deadline);

    let _ = listen_stop_tx.send(true);
    // Listeners finish the requests they are serving; a client that holds its connection
    // open does not get to hold up shutdown past a quarter of the budget.
    let grace = config.shutdown.timeout.0 / 4;
    if tokio::time::timeout(grace, receivers.stopped())
        .await
        .is_err()
    {
        tracing::warn!("listeners still had connections open; refusing further requests");
    }
    // Requests already admitted reach the shards before the shards are told to stop.
    ingest.stop_accepting().await;

    // Deciding is CPU work on the worker threads; wait for it off the async runtime.
    tokio::task::spawn_blocking(move || workers.shutdown())
        .await
        .context("waiting for decision workers")?;
    exporter.finish().await;
    if let Some(storage) = storage {
        tokio::task::spawn_blocking(move || storage.close())
            .await
            .context("closing the storage log")?;
    }
    let _ = stop_tx.send(true);
    tracing::info!("tailgate stopped");
    Ok(())
}

/// Replays what the previous run left in the log: each shard gets the decisions of its traces,
/// then every span record from the checkpoint on, arriving at its record time on `clock`.
fn recover(
    storage: &Storage,
    mut recovery: Recovery,
    senders: &[crossbeam_channel::Sender<ShardMsg>],
    ingest: &Ingest,
    memory: &MemoryBudget,
    clock: &dyn Clock,
) {
    let started = std::time::Instant::now();
    let decisions = recovery.decisions.len();
    let mut per_shard: Vec<std::collections::HashMap<_, _>> =
        senders.iter().map(|_| Default::default()).collect();
    for (trace_id, d) in std::mem::take(&mut recovery.decisions) {
        per_shard[shard_of(&trace_id, senders.len())].insert(trace_id, d);
    }
    for (tx, decisions) in senders.iter().zip(per_shard) {
        let _ = tx.send(ShardMsg::Recovered(decisions));
    }
    let (wall, mono) = (crate::storage::unix_nanos(), clock.now());
    let mut records = 0u64;
    let forwarded = std::mem::take(&mut recovery.forwarded);
    recovery.replay(&storage.metrics, |record| {
        if record.kind == RecordKind::Metrics && !forwarded.contains(&record.position) {
            // Accepted and not yet settled: forwarded again.
            storage.pins.pin(record.position);
            if ingest.replay_metrics(&record.payload, record.position) {
                records += 1;
            } else {
                storage.metrics.corrupt_records.inc();
                tracing::warn!(
                    position = record.position,
                    "a metrics record passed its checksum but does not parse; skipping it"
                );
            }
            return;
        }
        if record.kind != RecordKind::Spans {
            return;
        }
        // The shards shed their oldest traces under pressure; wait for them rather than
        // holding more than the budget.
        while memory.is_full() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        storage.pins.pin(record.position);
        let at = mono.saturating_sub(wall.saturating_sub(record.time));
        if ingest.replay(&record.payload, record.position, at) {
            records += 1;
        } else {
            storage.metrics.corrupt_records.inc();
            tracing::warn!(
                position = record.position,
                "a span record passed its checksum but does not parse; skipping it"
            );
        }
    });
    for tx in senders {
        let _ = tx.send(ShardMsg::ReplayDone);
    }
    tracing::info!(
        records,
        decisions,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replayed the storage log"
    );
}

/// SIGHUP reloads the policy set, as operators expect of a daemon.
async fn reload_on_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /reload or a file change");
        return;
    };
    while hup.recv().await.is_some() {
        let r = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
    }
}

async fn start_admin(
    addr: SocketAddr,
    gate: Arc<Gate>,
    app: Router,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = bind(addr, "admin").await?;
    let local = listener.local_addr()?;
    tokio::spawn(gate.serve_http(listener, app, signalled(stop)));
    Ok(local)
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the only way out is being killed; wait on Ctrl-C instead.
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The admin listener's routes. With `admin.token_file`, everything but the probes needs its
/// token; with only the deprecated inline `admin.reload_token`, `/reload` alone does; with
/// neither, `/reload` is disabled.
fn admin_routes(
    config: &crate::config::AdminConfig,
    registry: &Arc<Registry>,
    health: &Arc<Health>,
    reloader: &Arc<Reloader>,
    timing: &Arc<TimingBoard>,
) -> anyhow::Result<Router> {
    let reload_auth = match (&config.token_file, &config.reload_token) {
        (Some(_), _) => ReloadAuth::Guarded,
        (None, Some(token)) if !token.is_empty() => {
            tracing::warn!(
                "admin.reload_token is deprecated: put the token in a file and set admin.token_file, which also protects /metrics and /status"
            );
            ReloadAuth::Inline(token.clone())
        }
        _ => ReloadAuth::Disabled,
    };
    let mut guarded = admin::metrics_routes(registry.clone()).merge(policy_routes(
        reloader.clone(),
        reload_auth,
        timing.clone(),
    ));
    if let Some(path) = &config.token_file {
        let tokens =
            Tokens::watch(path.clone()).map_err(|e| anyhow::anyhow!("admin.token_file: {e}"))?;
        guarded = guarded.route_layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                require_admin_token(tokens.clone(), req, next)
            },
        ));
    }
    Ok(admin::health_routes(health.clone()).merge(guarded))
}

async fn require_admin_token(
    tokens: Arc<Tokens>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let authorization = req.headers().get(header::AUTHORIZATION);
    if tokens.allows(authorization.map(|v| v.as_bytes())) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a bearer token listed in admin.token_file is required\n",
    )
        .into_response()
}

/// `GET /status` (the live policies, the last reload and the learned decision timing) and
/// `POST /reload`, on the admin listener beside telemetry's routes.
fn policy_routes(
    reloader: Arc<Reloader>,
    reload_auth: ReloadAuth,
    timing: Arc<TimingBoard>,
) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/reload", post(reload))
        .with_state(PolicyControl {
            reloader,
            reload_auth,
            timing,
        })
}

#[derive(Clone)]
enum ReloadAuth {
    /// No admin token is configured: `POST /reload` is refused.
    Disabled,
    /// `admin.token_file`'s layer has already checked the request.
    Guarded,
    /// The deprecated inline `admin.reload_token`.
    Inline(String),
}

#[derive(Clone)]
struct PolicyControl {
    reloader: Arc<Reloader>,
    reload_auth: ReloadAuth,
    timing: Arc<TimingBoard>,
}

async fn status(State(s): State<PolicyControl>) -> impl IntoResponse {
    let mut status = s.reloader.status_json();
    if let serde_json::Value::Object(fields) = &mut status {
        fields.insert("timing".to_owned(), s.timing.status_json());
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        status.to_string(),
    )
}

async fn reload(State(s): State<PolicyControl>, headers: HeaderMap) -> impl IntoResponse {
    match &s.reload_auth {
        ReloadAuth::Disabled => {
            return (
                StatusCode::FORBIDDEN,
                "POST /reload is disabled: set admin.token_file\n".to_owned(),
            );
        }
        ReloadAuth::Guarded => {}
        ReloadAuth::Inline(token) => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
                return (
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token\n".to_owned(),
                );
            }
        }
    }
    let reloader = s.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.reload("POST /reload")).await {
        Ok(Ok(generation)) => (
            StatusCode::OK,
            format!("reloaded: generation {generation}\n"),
        ),
        Ok(Err(why)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused, previous policies still live: {why}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}\n"),
        ),
    }
}

/// Compares without an early exit, so the time taken does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
