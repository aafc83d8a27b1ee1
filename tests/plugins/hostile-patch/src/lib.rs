//! `hostile-patch`: keeps every trace with an attribute write. Root "badindex": the patch
//! targets span 9999 (out of range). Root "oversize": the value is a 1 MiB string. Otherwise a
//! valid patch `ok.patched = "yes"` on span 0.

use tailgate_plugin_sdk::{NoConfig, Policy, Trace, Verdict, export_policy};

pub struct Patch;

impl Policy for Patch {
    type Config = NoConfig;

    fn init(_: NoConfig) -> Result<Self, String> {
        Ok(Patch)
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        match trace.root_name().as_str() {
            "badindex" => Verdict::keep("badindex").patch_span(9999, "x", "y"),
            "oversize" => Verdict::keep("oversize").patch_span(0, "x", "y".repeat(1 << 20)),
            _ => Verdict::keep("patched").patch_span(0, "ok.patched", "yes"),
        }
    }
}

export_policy!(Patch);
