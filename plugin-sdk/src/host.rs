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
/// `decide` returns the next number of that stream.
pub fn random_u64() -> u64 {
    imp::random()
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
