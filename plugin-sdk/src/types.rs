//! Plain Rust mirrors of the WIT types, shared by the Wasm and native backends.
//!
//! The SDK has its own types rather than re-exporting the generated bindings so
//! that a policy compiles (and is unit-tested) natively, where no bindings are
//! generated at all.

use std::fmt;

/// OTLP span kind (WIT `span-kind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SpanKind {
    #[default]
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

/// OTLP status code (WIT `status-code`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StatusCode {
    #[default]
    Unset,
    Ok,
    Error,
}

/// An OTLP attribute value (WIT `attr-value`).
///
/// Arrays and key-value lists arrive as [`AttrValue::Json`] text; see the WIT
/// file for the exact mapping.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    /// An OTLP array (JSON array) or kvlist (JSON object), as JSON text.
    Json(String),
}

impl AttrValue {
    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an int value (doubles are not truncated).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as f64 if it is numeric (int or double), the same rule the
    /// host's `sum` / `max` / `count` aggregates use.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            AttrValue::Int(i) => Some(*i as f64),
            AttrValue::Double(d) => Some(*d),
            _ => None,
        }
    }

    /// The boolean, if this is a bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            AttrValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The bytes, if this is a bytes value.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            AttrValue::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// True for int and double values.
    pub fn is_numeric(&self) -> bool {
        matches!(self, AttrValue::Int(_) | AttrValue::Double(_))
    }
}

impl fmt::Display for AttrValue {
    /// Renders scalars plainly (strings unquoted), bytes as lowercase hex and
    /// JSON as its text: handy for building reasons and labels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) | AttrValue::Json(s) => f.write_str(s),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Bytes(b) => f.write_str(&crate::hex(b)),
        }
    }
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_owned())
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}
impl From<&String> for AttrValue {
    fn from(v: &String) -> Self {
        AttrValue::Str(v.clone())
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<i32> for AttrValue {
    fn from(v: i32) -> Self {
        AttrValue::Int(v.into())
    }
}
impl From<u32> for AttrValue {
    fn from(v: u32) -> Self {
        AttrValue::Int(v.into())
    }
}
impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        AttrValue::Double(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}
impl From<Vec<u8>> for AttrValue {
    fn from(v: Vec<u8>) -> Self {
        AttrValue::Bytes(v)
    }
}
impl From<&[u8]> for AttrValue {
    fn from(v: &[u8]) -> Self {
        AttrValue::Bytes(v.to_vec())
    }
}

/// The host's precomputed facts about a trace (WIT `summary`). Flat on
/// purpose: one cheap host call, no allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub span_count: u32,
    pub error_count: u32,
    pub duration_ns: u64,
    pub root: Option<u32>,
    /// Distinct non-empty service names (see [`crate::Trace::services`]).
    pub service_count: u32,
    /// Spans whose parent is not in the trace.
    pub orphan_count: u32,
}

/// One attribute over every span, dictionary-encoded (WIT `dict-column`):
/// what [`crate::Trace::attr_column_dict`] returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DictColumn {
    values: Vec<AttrValue>,
    codes: Vec<u32>,
}

impl DictColumn {
    /// A span's code meaning "no value".
    pub const NO_VALUE: u32 = u32::MAX;

    /// From the contract's parts. A code that does not index `values` reads
    /// as no value.
    pub fn new(values: Vec<AttrValue>, codes: Vec<u32>) -> Self {
        DictColumn { values, codes }
    }

    /// Span `span`'s value, as `Trace::attr_column(key)[span]` would give it.
    pub fn get(&self, span: u32) -> Option<&AttrValue> {
        let code = *self.codes.get(span as usize)?;
        self.values.get(code as usize)
    }

    /// The distinct values, in order of first appearance by span index.
    pub fn values(&self) -> &[AttrValue] {
        &self.values
    }

    /// One code per span: an index into [`DictColumn::values`], or
    /// [`DictColumn::NO_VALUE`].
    pub fn codes(&self) -> &[u32] {
        &self.codes
    }

    /// Number of spans.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// True for a column of no spans.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
}

/// Keep, drop or abstain (WIT `decision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Keep,
    Drop,
    Abstain,
}

/// Where a patch writes (WIT `patch-target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PatchTarget {
    /// The span with this index.
    Span(u32),
    /// The resource of the span with this index (shared by every span of the
    /// trace that has the same resource).
    ResourceOf(u32),
}

/// One attribute write (WIT `patch`).
#[derive(Clone, Debug, PartialEq)]
pub struct Patch {
    pub target: PatchTarget,
    pub key: String,
    pub value: AttrValue,
}

/// A policy's answer for one trace (WIT `verdict`), built fluently:
///
/// ```
/// use tailgate_plugin_sdk::Verdict;
/// let v = Verdict::keep("slow checkout")
///     .with_probability(0.25)
///     .patch_span(0, "sampling.rule", "checkout")
///     .remove_span(3);
/// assert!(v.is_keep());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: String,
    pub probability: Option<f64>,
    pub patches: Vec<Patch>,
    pub remove_spans: Vec<u32>,
}

impl Verdict {
    #[inline]
    fn new(decision: Decision, reason: String) -> Self {
        Verdict {
            decision,
            reason,
            probability: None,
            patches: Vec::new(),
            remove_spans: Vec::new(),
        }
    }

    /// Keep the trace. `reason` should be short and low-cardinality: the host
    /// uses it as a metric label and stamps it on kept spans.
    #[inline]
    pub fn keep(reason: impl Into<String>) -> Self {
        Self::new(Decision::Keep, reason.into())
    }

    /// Drop the trace (wins over other policies' keeps only if the host's
    /// config marks this policy as a drop rule).
    #[inline]
    pub fn drop(reason: impl Into<String>) -> Self {
        Self::new(Decision::Drop, reason.into())
    }

    /// No opinion: let the rest of the chain decide.
    #[inline]
    pub fn abstain() -> Self {
        Self::new(Decision::Abstain, String::new())
    }

    /// Replace the reason.
    #[inline]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// The probability with which traces like this one are kept, in (0, 1];
    /// the host turns it into the OTel `th` threshold of kept spans.
    #[inline]
    pub fn with_probability(mut self, p: f64) -> Self {
        self.probability = Some(p);
        self
    }

    /// Set attribute `key` on span `span`, if the trace is kept.
    pub fn patch_span(
        mut self,
        span: u32,
        key: impl Into<String>,
        value: impl Into<AttrValue>,
    ) -> Self {
        self.patches.push(Patch {
            target: PatchTarget::Span(span),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Set attribute `key` on the resource of span `span`, if the trace is
    /// kept.
    pub fn patch_resource(
        mut self,
        span: u32,
        key: impl Into<String>,
        value: impl Into<AttrValue>,
    ) -> Self {
        self.patches.push(Patch {
            target: PatchTarget::ResourceOf(span),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Trim leaf span `span` from the trace, if it is kept.
    pub fn remove_span(mut self, span: u32) -> Self {
        self.remove_spans.push(span);
        self
    }

    pub fn is_keep(&self) -> bool {
        self.decision == Decision::Keep
    }

    pub fn is_drop(&self) -> bool {
        self.decision == Decision::Drop
    }

    pub fn is_abstain(&self) -> bool {
        self.decision == Decision::Abstain
    }
}

/// Log level of [`crate::host::log`] (WIT `host.level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}
