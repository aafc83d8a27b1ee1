//! `hostile-summary`: a summary-only policy (decided in batches through `decide-summaries`)
//! that panics (a trap on wasm32) on any trace of exactly three spans; keeps every other trace
//! with reason "summary-policy-alive", which shows the instance was rebuilt.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

/// Reason stamped on the traces this policy keeps normally.
pub const REASON: &str = "summary-policy-alive";

pub struct SummaryPanic;

impl Policy for SummaryPanic {
    type Config = NoConfig;
    const SUMMARY_ONLY: bool = true;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(SummaryPanic)
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.span_count() == 3 {
            panic!("hostile-summary was given three spans");
        }
        Verdict::keep(REASON)
    }
}

export_policy!(SummaryPanic);
