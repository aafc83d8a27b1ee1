//! GET against an admin endpoint (`/readyz`, `/metrics`, `/status`) and Prometheus text
//! parsing, over reqwest's blocking client. Shared by the e2e tests (through
//! `tests/e2e/support.rs`) and the load harness (`benches/load/src/main.rs` includes this file
//! by path), so it depends on std and reqwest only.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

/// One client for the process; no idle connections are kept, so every GET opens a fresh one
/// (a collector restarted on a reused port never meets a stale connection).
fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .expect("build the HTTP client")
    })
}

/// `GET http://{addr}{path}`: status and body.
///
/// The request runs on a thread of its own, so this works from plain threads and from inside
/// a Tokio runtime alike (reqwest's blocking client refuses to run on a runtime's thread).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), reqwest::Error> {
    get_as(addr, path, None)
}

/// [`get`] with `Authorization: Bearer <token>` when a token is given.
pub fn get_as(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), reqwest::Error> {
    let url = format!("http://{addr}{path}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut request = client().get(&url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send()?;
            let code = response.status().as_u16();
            Ok((code, response.text()?))
        })
        .join()
        .expect("the HTTP GET thread panicked")
    })
}

/// Every sample of Prometheus text as (series, value): `name{labels}` or `name`, comments and
/// blank lines skipped.
pub fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series, value.parse::<f64>().ok()?))
        })
}

/// The metric name of a series: `name` of `name{labels}`.
pub fn metric_name(series: &str) -> &str {
    series.split_once('{').map_or(series, |(name, _)| name)
}
