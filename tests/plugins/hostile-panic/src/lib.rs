//! `hostile-panic`: panics (a trap on wasm32) when the root span is named "panic"; keeps
//! every other trace with reason "panic-policy-alive", which shows the instance was rebuilt.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

/// Reason stamped on the traces this policy keeps normally.
pub const REASON: &str = "panic-policy-alive";

pub struct Panic;

impl Policy for Panic {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(Panic)
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.root_name() == "panic" {
            panic!("hostile-panic was asked to panic");
        }
        Verdict::keep(REASON)
    }
}

export_policy!(Panic);
