//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (receivers are listening and the host is not shutting down).
//!
//! Read-only; it must never block the data path, so every handler only reads atomics or
//! renders the registry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use super::Metrics;
use crate::plugin::reload::Reloader;

/// Readiness shared between the host's stages and the admin listener.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub reloader: Arc<Reloader>,
    /// `POST /reload` needs `Authorization: Bearer <token>`; without a token it is disabled.
    pub reload_token: Option<String>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/reload", post(reload))
        .with_state(state)
}

async fn status(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.reloader.status_json(),
    )
}

async fn reload(State(s): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    let Some(token) = s.reload_token.as_deref().filter(|t| !t.is_empty()) else {
        return (
            StatusCode::FORBIDDEN,
            "POST /reload is disabled: set admin.reload_token\n".to_owned(),
        );
    };
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

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
