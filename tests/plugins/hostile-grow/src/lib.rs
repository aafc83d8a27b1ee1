//! `hostile-grow`: when the root span is named "grow", allocates 1 MiB blocks without bound
//! (and never frees them) until linear memory hits the host's cap; abstains otherwise.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

pub struct Grow {
    hoard: Vec<Vec<u8>>,
}

impl Policy for Grow {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(Grow { hoard: Vec::new() })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.root_name() == "grow" {
            loop {
                // Touch every page so the allocation is real, and keep it forever.
                let block = core::hint::black_box(vec![0xa5u8; 1 << 20]);
                self.hoard.push(block);
                core::hint::black_box(&self.hoard);
            }
        }
        Verdict::abstain()
    }
}

export_policy!(Grow);
