//! Hot-swap test policy, version 2: keeps every trace, saying which version decided.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

pub struct SwapV2;

impl Policy for SwapV2 {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(SwapV2)
    }

    fn decide(&mut self, _trace: &Trace) -> Verdict {
        Verdict::keep("v2")
    }
}

export_policy!(SwapV2);
