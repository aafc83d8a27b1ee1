//! Bench policy for `benches/decision.rs`: each `decide` calls one trace accessor `calls`
//! times and abstains. The bench runs it with `calls = 0` (the fixed cost of a decision:
//! the export call and nothing else) and with `calls = N`, and divides the difference by N
//! to price one host call of that accessor.
//!
//! Config: `accessor` (one of the names below), `calls` (integer).

use serde::Deserialize;
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy};

const KEY: &str = "gen_ai.usage.input_tokens";
/// A string attribute with the same value on every span of the bench's traces.
const STR_KEY: &str = "gen_ai.request.model";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub accessor: String,
    pub calls: u32,
}

pub struct Probe {
    accessor: Accessor,
    calls: u32,
}

#[derive(Clone, Copy)]
enum Accessor {
    Summary,
    Name,
    Duration,
    Attr,
    AttrColumn,
    StrColumn,
    StrColumnDict,
    Sum,
}

impl Policy for Probe {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        let accessor = match c.accessor.as_str() {
            "summary" => Accessor::Summary,
            "name" => Accessor::Name,
            "duration" => Accessor::Duration,
            "attr" => Accessor::Attr,
            "attr_column" => Accessor::AttrColumn,
            "attr_column_str" => Accessor::StrColumn,
            "attr_column_dict_str" => Accessor::StrColumnDict,
            "sum" => Accessor::Sum,
            other => return Err(format!("accessor: unknown {other:?}")),
        };
        Ok(Probe {
            accessor,
            calls: c.calls,
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        // Span indexes cycle over the first 16 spans, so no call needs the span count.
        let spans = 16;
        let mut sink = 0u64;
        for i in 0..self.calls {
            let span = i % spans;
            sink = sink.wrapping_add(match self.accessor {
                // Cached by the SDK after the first call: use with `calls = 1`.
                Accessor::Summary => u64::from(trace.summary().span_count),
                Accessor::Name => trace.span(span).map_or(0, |s| s.name().len() as u64),
                Accessor::Duration => trace.span(span).map_or(0, |s| s.duration_ns()),
                Accessor::Attr => trace
                    .span(span)
                    .and_then(|s| s.attr(KEY))
                    .map_or(0, |v| v.as_f64().unwrap_or(0.0) as u64),
                Accessor::AttrColumn => trace.attr_column(KEY).len() as u64,
                Accessor::StrColumn => trace.attr_column(STR_KEY).len() as u64,
                Accessor::StrColumnDict => trace.attr_column_dict(STR_KEY).len() as u64,
                Accessor::Sum => trace.sum(KEY) as u64,
            });
        }
        std::hint::black_box(sink);
        Verdict::abstain()
    }
}

export_policy!(Probe);
