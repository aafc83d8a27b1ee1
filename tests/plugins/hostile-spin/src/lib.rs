//! `hostile-spin`: loops forever in `decide` when the root span is named "spin"; abstains
//! otherwise. Only the host's per-call deadline can stop it.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

pub struct Spin;

impl Policy for Spin {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(Spin)
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.root_name() == "spin" {
            let mut n: u64 = 0;
            // black_box hides the counter from the optimiser, so the loop cannot be removed.
            loop {
                n = core::hint::black_box(core::hint::black_box(n).wrapping_add(1));
            }
        }
        Verdict::abstain()
    }
}

export_policy!(Spin);
