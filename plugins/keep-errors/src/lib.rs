//! `keep-errors`: keep every trace that has at least one span with status
//! `Error`; abstain otherwise, leaving the rest of the chain to decide.
//!
//! Config: none (an empty table; unknown keys are refused).
//!
//! Cost in Wasm: none beyond the summary, which carries the error count; it
//! is summary-only, so the host decides a batch of traces in one call.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

/// Reason stamped on kept traces (`sampling.reason`).
pub const REASON: &str = "error";

pub struct KeepErrors;

impl Policy for KeepErrors {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(KeepErrors)
    }

    // Decided from the summary alone, in batches.
    const SUMMARY_ONLY: bool = true;

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.has_errors() {
            Verdict::keep(REASON)
        } else {
            Verdict::abstain()
        }
    }
}

export_policy!(KeepErrors);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::StatusCode;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy() -> KeepErrors {
        testing::init::<KeepErrors>("{}").expect("empty config is valid")
    }

    #[test]
    fn keeps_a_trace_whose_only_error_is_deep_in_the_tree() {
        let trace = TraceBuilder::new()
            .span("GET /checkout")
            .service("web")
            .ok()
            .span("cart.load")
            .child_of(0)
            .service("cart")
            .span("db.query")
            .child_of(1)
            .service("cart")
            .error()
            .status_message("deadlock")
            .build();
        let v = testing::decide(&mut policy(), &trace);
        assert!(v.is_keep(), "{v:?}");
        assert_eq!(v.reason, REASON);
        assert_eq!(v.probability, None, "not a probabilistic keep");
        testing::check_verdict(&trace, &v).unwrap();
    }

    #[test]
    fn abstains_when_no_span_is_an_error() {
        let trace = TraceBuilder::new()
            .span("root")
            .ok()
            .span("child")
            .child_of(0)
            .status(StatusCode::Unset)
            .status_message("error in the message does not count")
            .attr("error", true)
            .build();
        assert!(testing::decide(&mut policy(), &trace).is_abstain());
    }

    #[test]
    fn abstains_on_an_empty_trace() {
        let trace = TraceBuilder::new().build();
        assert!(testing::decide(&mut policy(), &trace).is_abstain());
    }

    #[test]
    fn blank_config_is_accepted_and_unknown_keys_are_refused() {
        assert!(testing::init::<KeepErrors>("").is_ok());
        let err = testing::init::<KeepErrors>(r#"{"min_errors": 2}"#)
            .err()
            .expect("unknown option must be refused");
        assert!(err.contains("min_errors"), "{err}");
    }
}
