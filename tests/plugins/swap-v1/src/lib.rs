//! Hot-swap test policy, version 1: keeps every trace, saying which version decided.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

pub struct SwapV1;

impl Policy for SwapV1 {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(SwapV1)
    }

    fn decide(&mut self, _trace: &Trace) -> Verdict {
        Verdict::keep("v1")
    }
}

export_policy!(SwapV1);
