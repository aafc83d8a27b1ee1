//! # tailgate-plugin-sdk
//!
//! Everything a Rust author needs to write a tailgate sampling policy: the WIT
//! contract (`wit/policy.wit`, package `tailgate:policy`, see [`WIT_PACKAGE`]), an ergonomic
//! [`Trace`] view, the [`Verdict`] builder, the host's imports ([`host`],
//! [`log`]), the [`Policy`] trait and the one macro that exports a policy,
//! [`export_policy!`]. [`stats`] holds state that several policies share:
//! exact sliding-window quantiles, per key.
//!
//! ```
//! use tailgate_plugin_sdk::{export_policy, Policy, Trace, Verdict};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { max_tokens: f64 }
//!
//! struct TokenHog { max: f64 }
//!
//! impl Policy for TokenHog {
//!     type Config = Config;
//!     fn init(c: Config) -> Result<Self, String> { Ok(TokenHog { max: c.max_tokens }) }
//!     fn decide(&mut self, t: &Trace) -> Verdict {
//!         if t.sum("gen_ai.usage.input_tokens") > self.max { Verdict::keep("token hog") }
//!         else { Verdict::abstain() }
//!     }
//! }
//! export_policy!(TokenHog);
//! # fn main() {}
//! ```
//!
//! The same code runs in two places. Built for `wasm32-unknown-unknown`, the
//! trace is read through the host's `trace` interface and the macro emits the
//! component's exports. Built natively (`cargo test`), the trace is an in-memory one from
//! `testing::TraceBuilder` (native only) and the host imports are in-process stand-ins,
//! so a policy's logic is unit-tested with no Wasm tooling at all.

// Lets the generated bindings and the exported macros name this crate by its
// real path from inside the crate too.
extern crate self as tailgate_plugin_sdk;

mod backend;
pub mod host;
pub mod stats;
mod trace;
mod types;

#[cfg(not(target_arch = "wasm32"))]
mod otlp;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use host::{TraceStream, counter_add, now_ns, random_f64, random_u64};
pub use trace::{Span, Spans, Trace, explicit_randomness, trace_id_randomness};
pub use types::{
    AttrValue, Decision, DictColumn, Level, Patch, PatchTarget, SpanKind, StatusCode, Summary,
    Verdict,
};

/// The contract's WIT text, for hosts and tools that want the exact file the
/// SDK was built with.
pub const WIT: &str = include_str!("../wit/policy.wit");

/// The WIT package this SDK implements, read from the `package` line of
/// [`WIT`] at compile time: the WIT is the one place the version is written.
pub const WIT_PACKAGE: &str = package_of(WIT);

/// The contract version alone (`0.4.0`), what the host accepts and the build
/// step produces components for.
pub const CONTRACT_VERSION: &str = after_at(WIT_PACKAGE);

/// The package name without its version (`tailgate:policy`).
pub const CONTRACT_PACKAGE: &str = before_at(WIT_PACKAGE);

/// The text between `package ` and `;` of the line that declares the package.
const fn package_of(wit: &str) -> &str {
    let bytes = wit.as_bytes();
    let needle = b"\npackage ";
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        let mut j = 0;
        while j < needle.len() && bytes[i + j] == needle[j] {
            j += 1;
        }
        if j == needle.len() {
            let start = i + needle.len();
            let mut end = start;
            while end < bytes.len() && bytes[end] != b';' {
                end += 1;
            }
            let (_, rest) = bytes.split_at(start);
            let (package, _) = rest.split_at(end - start);
            return match core::str::from_utf8(package) {
                Ok(p) => p,
                Err(_) => panic!("the WIT package line is not UTF-8"),
            };
        }
        i += 1;
    }
    panic!("the WIT has no package line")
}

/// What precedes the `@` of a versioned package name.
const fn before_at(package: &str) -> &str {
    let bytes = package.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i] != b'@' {
        i += 1;
    }
    let (name, _) = bytes.split_at(i);
    match core::str::from_utf8(name) {
        Ok(n) => n,
        Err(_) => panic!("the WIT package name is not UTF-8"),
    }
}

/// What follows the `@` of a versioned package name.
const fn after_at(package: &str) -> &str {
    let bytes = package.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i] != b'@' {
        i += 1;
    }
    assert!(i < bytes.len(), "the WIT package has no version");
    let (_, version) = bytes.split_at(i + 1);
    match core::str::from_utf8(version) {
        Ok(v) => v,
        Err(_) => panic!("the WIT package version is not UTF-8"),
    }
}

/// A sampling policy.
///
/// The host creates one instance per worker thread (and per policy version)
/// and reuses it across traces, so `&mut self` state persists between
/// `decide` calls (counters, sliding windows, streaming percentiles...).
pub trait Policy: Sized + 'static {
    /// The policy's config table, deserialized from the JSON text the host
    /// passes to `init`. An empty config arrives as `{}`, so give optional
    /// fields `#[serde(default)]`; use [`NoConfig`] for a policy without any.
    type Config: serde::de::DeserializeOwned;

    /// Build the policy. An `Err` refuses the policy; the host reports the
    /// message.
    fn init(config: Self::Config) -> Result<Self, String>;

    /// Decide one trace.
    fn decide(&mut self, trace: &Trace) -> Verdict;

    /// Set to `true` when `decide` reads only the trace's summary
    /// ([`Trace::summary`] and what derives from it: span and error counts,
    /// duration, root index, completeness), its id and its
    /// [`Trace::randomness`], and returns no patches or removals.
    ///
    /// The host then decides such a policy's traces in batches: everything
    /// that comes due together crosses into the component in one call, which
    /// costs a fraction of a call per trace. Reading anything else (a span's
    /// name, an attribute, a column) panics, in Wasm and in native tests
    /// through `testing::decide` alike, so a wrong declaration shows up in
    /// the policy's own unit tests. A summary-only verdict with edits panics
    /// too.
    const SUMMARY_ONLY: bool = false;
}

/// Config of a policy that takes none: accepts only an empty table, so a
/// misspelt option is an error instead of being ignored.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Deserialize a policy config from the JSON text the host passes to `init`.
/// Blank text counts as `{}`; an empty table also satisfies `()` and
/// `Option<_>` configs. Errors are prefixed with "invalid config: ".
pub fn parse_config<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, String> {
    let trimmed = text.trim();
    let doc = if trimmed.is_empty() { "{}" } else { trimmed };
    match serde_json::from_str::<C>(doc) {
        Ok(c) => Ok(c),
        Err(e) => {
            if doc == "{}"
                && let Ok(c) = serde_json::from_str::<C>("null")
            {
                return Ok(c);
            }
            Err(format!("invalid config: {e}"))
        }
    }
}

pub(crate) fn init_from_json<P: Policy>(config: &str) -> Result<P, String> {
    P::init(parse_config::<P::Config>(config)?)
}

/// `log::info!("…", args)`-style macros that send one line to the host's
/// rate-limited log: `trace!`, `debug!`, `info!`, `warn!`, `error!`.
/// Natively the lines are captured (see `testing::logs`).
pub mod log {
    pub use crate::{
        __tailgate_debug as debug, __tailgate_error as error, __tailgate_info as info,
        __tailgate_trace as trace, __tailgate_warn as warn,
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __tailgate_log {
    ($level:expr, $($arg:tt)+) => {
        $crate::host::log($level, &::std::format!($($arg)+))
    };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __tailgate_trace {
    ($($arg:tt)+) => { $crate::__tailgate_log!($crate::Level::Trace, $($arg)+) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __tailgate_debug {
    ($($arg:tt)+) => { $crate::__tailgate_log!($crate::Level::Debug, $($arg)+) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __tailgate_info {
    ($($arg:tt)+) => { $crate::__tailgate_log!($crate::Level::Info, $($arg)+) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __tailgate_warn {
    ($($arg:tt)+) => { $crate::__tailgate_log!($crate::Level::Warn, $($arg)+) };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __tailgate_error {
    ($($arg:tt)+) => { $crate::__tailgate_log!($crate::Level::Error, $($arg)+) };
}

/// Export a [`Policy`] as the component's `init` / `decide`.
///
/// Use it once, at the top level of the policy crate. On Wasm it keeps the
/// instance in a thread-local slot: `init` (re)creates it, `decide` borrows
/// it; a `decide` before a successful `init` abstains with reason
/// `"policy not initialised"` instead of trapping. Natively it only checks
/// that the type implements [`Policy`].
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static __TAILGATE_POLICY: ::core::cell::RefCell<::core::option::Option<$policy>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            struct __TailgatePolicyExport;
            impl $crate::__private::Guest for __TailgatePolicyExport {
                fn init(
                    config: $crate::__private::String,
                ) -> ::core::result::Result<
                    $crate::__private::Capabilities,
                    $crate::__private::String,
                > {
                    $crate::__private::init::<$policy>(&__TAILGATE_POLICY, config)
                }
                fn decide_summaries(
                    seed: u64,
                    facts: $crate::__private::Vec<u64>,
                ) -> $crate::__private::SummaryVerdicts {
                    $crate::__private::decide_summaries::<$policy>(&__TAILGATE_POLICY, seed, facts)
                }
                fn decide(
                    summary: $crate::__private::RawSummary,
                    trace_id: (u64, u64),
                ) -> $crate::__private::RawVerdict {
                    $crate::__private::decide::<$policy>(&__TAILGATE_POLICY, summary, trace_id)
                }
            }
    $crate::__private::export_world!(__TailgatePolicyExport with_types_in $crate::bindings);
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn __assert_policy<P: $crate::Policy>() {}
            let _ = __assert_policy::<$policy>;
        };
    };
}

/// Bindings generated by wit-bindgen from `wit/policy.wit`. Not part of the
/// SDK's API: use [`Trace`], [`Verdict`] and [`host`] instead.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "wit",
        // The export macro is invoked from policy crates, which do not depend
        // on wit-bindgen: route every runtime path through this crate.
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "tailgate_plugin_sdk::bindings",
        runtime_path: "tailgate_plugin_sdk::__wit_bindgen::rt",
    });
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Glue used by [`export_policy!`]; not a stable API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private {
    use std::cell::RefCell;
    use std::thread::LocalKey;

    pub use crate::bindings::__export_world as export_world;
    pub use crate::bindings::Guest;
    pub use crate::bindings::tailgate::policy::types::{
        Capabilities, Summary as RawSummary, SummaryVerdicts, Verdict as RawVerdict,
    };
    pub use std::string::String;
    pub use std::vec::Vec;

    use crate::backend::Backend;
    use crate::bindings::tailgate::policy::types as wit;
    use crate::{Decision, Level, PatchTarget, Policy, Summary, Trace, Verdict};

    pub type Slot<P> = LocalKey<RefCell<Option<P>>>;

    /// Reason ids this instance got from the host, by text: most policies have a handful of
    /// reasons, so each is registered once and then found here. Full, the oldest entry makes
    /// room, so a policy whose reasons change keeps its recent ones at hand.
    const CACHED_REASONS: usize = 64;
    std::thread_local! {
        static REASONS: RefCell<(Vec<(String, u32)>, usize)> =
            const { RefCell::new((Vec::new(), 0)) };
    }
    /// Ids from here up are good for the current call only (see `host.reason`).
    const CALL_IDS: u32 = 0x8000_0000;

    /// The id of `text` as a verdict's reason (see `host.reason` in the WIT). Inlined for the
    /// empty reason of most abstains, which needs no lookup.
    #[inline]
    fn reason_id(text: &str) -> u32 {
        if text.is_empty() {
            0
        } else {
            registered_reason_id(text)
        }
    }

    #[inline(never)]
    fn registered_reason_id(text: &str) -> u32 {
        REASONS.with(|r| {
            let (cache, oldest) = &mut *r.borrow_mut();
            if let Some((_, id)) = cache.iter().find(|(t, _)| t == text) {
                return *id;
            }
            let id = crate::bindings::tailgate::policy::host::reason(text);
            if id < CALL_IDS {
                if cache.len() < CACHED_REASONS {
                    cache.push((text.to_owned(), id));
                } else {
                    cache[*oldest] = (text.to_owned(), id);
                    *oldest = (*oldest + 1) % CACHED_REASONS;
                }
            }
            id
        })
    }

    /// Route panic messages to the host log before the trap that follows
    /// (on wasm32-unknown-unknown a panic aborts and its message is lost).
    fn install_panic_hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::host::log(Level::Error, &format!("policy panicked: {info}"));
            }));
        });
    }

    pub fn init<P: Policy>(slot: &'static Slot<P>, config: String) -> Result<Capabilities, String> {
        install_panic_hook();
        let policy = crate::init_from_json::<P>(&config)?;
        slot.with(|s| *s.borrow_mut() = Some(policy));
        Ok(if P::SUMMARY_ONLY {
            Capabilities::SUMMARY_ONLY
        } else {
            Capabilities::empty()
        })
    }

    /// One batch of summary-only decisions: 7 words of facts per trace (the
    /// layout is in the WIT docs of `decide-summaries`), one code per trace
    /// into this call's distinct outcomes.
    pub fn decide_summaries<P: Policy>(
        slot: &'static Slot<P>,
        seed: u64,
        facts: Vec<u64>,
    ) -> SummaryVerdicts {
        install_panic_hook();
        let mut outcomes: Vec<wit::Outcome> = Vec::new();
        if !P::SUMMARY_ONLY {
            // Never called by a host for such a policy; no codes fails the call there.
            return SummaryVerdicts {
                outcomes,
                codes: Vec::new(),
            };
        }
        let (facts, _) = facts.as_chunks::<{ crate::FACT_WORDS }>();
        let mut codes = Vec::with_capacity(facts.len());
        // One trace for the whole batch, its facts replaced for each trace.
        let mut trace = Trace::summary_only(Summary::default(), [0; 16], 0);
        // The previous trace's outcome: consecutive traces mostly share one.
        let mut last = usize::MAX;
        slot.with(|s| {
            let mut slot = s.borrow_mut();
            for f in facts {
                let (summary, id, randomness) = crate::facts_from_array(f);
                let verdict = match slot.as_mut() {
                    Some(policy) => {
                        trace.set_facts(summary, id, randomness);
                        crate::host::with_trace_stream(seed, id, || policy.decide(&trace))
                    }
                    None => Verdict::abstain().with_reason("policy not initialised"),
                };
                assert!(
                    verdict.patches.is_empty() && verdict.remove_spans.is_empty(),
                    "a SUMMARY_ONLY policy returned edits; it cannot edit traces"
                );
                let decision = decision_to_wit(verdict.decision);
                let reason = reason_id(&verdict.reason);
                let same = |o: &wit::Outcome| {
                    o.decision == decision
                        && o.reason == reason
                        && o.probability.map(f64::to_bits) == verdict.probability.map(f64::to_bits)
                };
                let code = if outcomes.get(last).is_some_and(same) {
                    last
                } else if let Some(i) = outcomes.iter().position(same) {
                    i
                } else {
                    outcomes.push(wit::Outcome {
                        decision,
                        reason,
                        probability: verdict.probability,
                    });
                    outcomes.len() - 1
                };
                last = code;
                codes.push(code as u32);
            }
        });
        SummaryVerdicts { outcomes, codes }
    }

    fn decision_to_wit(d: Decision) -> wit::Decision {
        match d {
            Decision::Keep => wit::Decision::Keep,
            Decision::Drop => wit::Decision::Drop,
            Decision::Abstain => wit::Decision::Abstain,
        }
    }

    pub fn decide<P: Policy>(
        slot: &'static Slot<P>,
        summary: RawSummary,
        (hi, lo): (u64, u64),
    ) -> RawVerdict {
        install_panic_hook();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&hi.to_be_bytes());
        id[8..].copy_from_slice(&lo.to_be_bytes());
        // The host's trace functions read the trace of this call; the policy only sees
        // `&trace`, which ends with it.
        let trace = Trace::with_facts(Backend, crate::backend::summary_from_wit(summary), id);
        let verdict = slot.with(|s| match s.borrow_mut().as_mut() {
            Some(policy) => policy.decide(&trace),
            None => Verdict::abstain().with_reason("policy not initialised"),
        });
        to_wit(verdict)
    }

    /// The verdict as `decide` returns it; its edits go to the host first, as calls.
    fn to_wit(v: Verdict) -> RawVerdict {
        use crate::backend::attr_to_wit;
        use crate::bindings::tailgate::policy::trace;
        for p in v.patches {
            let target = match p.target {
                PatchTarget::Span(i) => wit::PatchTarget::Span(i),
                PatchTarget::ResourceOf(i) => wit::PatchTarget::ResourceOf(i),
            };
            trace::patch(target, &p.key, &attr_to_wit(p.value));
        }
        for i in v.remove_spans {
            trace::remove_span(i);
        }
        RawVerdict {
            decision: decision_to_wit(v.decision),
            reason: reason_id(&v.reason),
            probability: v.probability,
        }
    }
}

/// Words of facts per trace in `decide-summaries`.
pub const FACT_WORDS: usize = 7;

/// One trace's facts as `decide-summaries` passes them (the layout is in the
/// WIT docs); the host writes them with [`facts_to_words`].
pub fn facts_from_words(f: &[u64]) -> (Summary, [u8; 16], u64) {
    let f: &[u64; FACT_WORDS] = f
        .get(..FACT_WORDS)
        .and_then(|f| f.try_into().ok())
        .expect("a trace's facts are FACT_WORDS words");
    facts_from_array(f)
}

/// [`facts_from_words`] of exactly one trace's words.
#[inline]
pub(crate) fn facts_from_array(f: &[u64; FACT_WORDS]) -> (Summary, [u8; 16], u64) {
    let lo32 = |w: u64| w as u32;
    let hi32 = |w: u64| (w >> 32) as u32;
    let summary = Summary {
        span_count: lo32(f[0]),
        error_count: hi32(f[0]),
        duration_ns: f[1],
        root: (lo32(f[2]) != u32::MAX).then_some(lo32(f[2])),
        service_count: hi32(f[2]),
        orphan_count: f[3] as u32,
    };
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&f[4].to_be_bytes());
    id[8..].copy_from_slice(&f[5].to_be_bytes());
    (summary, id, f[6])
}

/// The facts words of one trace, appended to `out`.
pub fn facts_to_words(summary: &Summary, trace_id: &[u8; 16], randomness: u64, out: &mut Vec<u64>) {
    let pair = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_be_bytes(w)
    };
    out.extend_from_slice(&[
        pair(summary.span_count, summary.error_count),
        summary.duration_ns,
        pair(summary.root.unwrap_or(u32::MAX), summary.service_count),
        u64::from(summary.orphan_count),
        word(&trace_id[..8]),
        word(&trace_id[8..]),
        randomness,
    ]);
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Bytes from hex digits (either case); `None` on odd length or a non-hex
/// character.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}
