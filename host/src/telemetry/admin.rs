//! The admin listener's own routes: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (receivers are listening and the host is not shutting down). The
//! app adds the routes of other stages (`/status`, `/reload`) beside them, and puts everything
//! but the probes behind `admin.token_file` when it is set.
//!
//! Read-only; it must never block the data path, so every handler only reads atomics or
//! renders the registry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::Registry;

/// Readiness shared between the host's stages and the admin listener.
#[derive(Debug, Default)]
pub(crate) struct Health {
    ready: AtomicBool,
}

impl Health {
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// `/healthz` and `/readyz`: always open, since probes call them.
pub(crate) fn health_routes(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// `/metrics`, which the app may put behind the admin token (it shows tenant and user ids).
pub(crate) fn metrics_routes(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(registry)
}

async fn metrics_handler(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        registry.render(),
    )
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
