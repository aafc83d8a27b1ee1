//! The host's imports (WIT interface `host`): logging, deterministic random
//! numbers, the decision clock and labelled counters.
//!
//! On Wasm each function is one call into the host. Natively they run against
//! an in-process, per-thread stand-in (see `testing`, native only) so that tests
//! can seed the random stream, pin the clock and read back counters and logs.

use crate::types::Level;

/// Log `message` under the policy's name. The host rate-limits and truncates;
/// use the [`crate::log`] macros for `format!`-style arguments.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// A deterministic pseudo-random `u64`: the host seeds a stream per trace
/// from the trace id and the policy's seed, and each call within one
/// `decide` returns the next number of that stream. A summary-only policy
/// gets the same numbers from the SDK itself (see [`TraceStream`]).
pub fn random_u64() -> u64 {
    let local = LOCAL_STREAM.with(|s| {
        let mut stream = match s.get() {
            Local::Host => return None,
            // Seeded on the first draw: most policies never draw.
            Local::Seed { seed, trace_id } => TraceStream::new(seed, &trace_id),
            Local::Stream(stream) => stream,
        };
        let n = stream.next_u64();
        s.set(Local::Stream(stream));
        Some(n)
    });
    local.unwrap_or_else(imp::random)
}

/// Where [`random_u64`] draws from.
#[derive(Clone, Copy)]
enum Local {
    /// The host's stream (`decide`, `init`).
    Host,
    /// A trace of a summary-only batch whose stream is not seeded yet.
    Seed { seed: u64, trace_id: [u8; 16] },
    /// That trace's stream, once drawn from.
    Stream(TraceStream),
}

std::thread_local! {
    /// The stream of the trace a summary-only batch is deciding, if any.
    static LOCAL_STREAM: std::cell::Cell<Local> = const { std::cell::Cell::new(Local::Host) };
}

/// The per-trace random stream exactly as the host seeds it for `decide`
/// (documented with `decide-summaries` in the WIT contract).
#[derive(Clone, Copy, Debug)]
pub struct TraceStream(u64);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TraceStream {
    /// The stream for `trace_id` under the policy's `seed`.
    pub fn new(seed: u64, trace_id: &[u8; 16]) -> Self {
        let mut x = seed ^ GOLDEN;
        for chunk in trace_id.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            x = splitmix(x ^ u64::from_le_bytes(b));
        }
        TraceStream(x)
    }

    /// The stream outside any trace (during `init`): seeded from the seed alone.
    pub fn untraced(seed: u64) -> Self {
        TraceStream(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        splitmix(self.0)
    }
}

/// Runs `f` with [`random_u64`] drawing from trace `trace_id`'s stream under
/// `seed` (seeded lazily, on the first draw) instead of from the host.
#[inline]
pub(crate) fn with_trace_stream<R>(seed: u64, trace_id: [u8; 16], f: impl FnOnce() -> R) -> R {
    LOCAL_STREAM.with(|s| s.set(Local::Seed { seed, trace_id }));
    let r = f();
    LOCAL_STREAM.with(|s| s.set(Local::Host));
    r
}

/// A deterministic pseudo-random float in `[0, 1)`, from [`random_u64`]'s
/// top 53 bits (every value is an exact multiple of 2^-53).
pub fn random_f64() -> f64 {
    (random_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Nanoseconds since the Unix epoch by the host's decision clock (record
/// time when the host replays), never decreasing.
pub fn now_ns() -> u64 {
    imp::now_ns()
}

/// Add `value` to counter `name` with `labels`, exposed by the host on
/// `/metrics` as `tailgate_policy_<name>_total`. `name` and label keys must
/// match `[a-zA-Z_][a-zA-Z0-9_]*` and `value` must be finite and >= 0: the
/// host drops other calls (natively they panic, so a test notices).
pub fn counter_add(name: &str, labels: &[(&str, &str)], value: f64) {
    imp::counter_add(name, labels, value)
}

/// Whether `s` is a valid counter or label name, as the host checks it.
pub fn is_valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::bindings::tailgate::policy::host as wit;
    use crate::types::Level;

    pub(super) fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        };
        wit::log(level, message)
    }

    pub(super) fn random() -> u64 {
        wit::random()
    }

    pub(super) fn now_ns() -> u64 {
        wit::now_ns()
    }

    pub(super) fn counter_add(name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        wit::counter_add(name, &labels, value)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::testing::state;
    use crate::types::Level;

    pub(super) fn log(level: Level, message: &str) {
        state::log(level, message)
    }

    pub(super) fn random() -> u64 {
        state::random()
    }

    pub(super) fn now_ns() -> u64 {
        state::now_ns()
    }

    pub(super) fn counter_add(name: &str, labels: &[(&str, &str)], value: f64) {
        state::counter_add(name, labels, value)
    }
}
