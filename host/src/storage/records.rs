//! The payloads of the decision log's records: decisions, traces exported, and pass-through
//! records settled.
//!
//! Little-endian, length-prefixed, no framing of their own: the segment record around them
//! carries the checksum and the format version. A new field goes at the end of an entry with
//! a new format version, so an older log still reads.

use crate::trace::{TraceId, Trigger};

/// One decision as logged: enough to follow it after a restart without deciding again.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedDecision {
    pub(crate) trace_id: TraceId,
    pub(crate) keep: bool,
    pub(crate) trigger: Trigger,
    pub(crate) probability: Option<f64>,
    pub(crate) policy: String,
    pub(crate) reason: String,
}

/// A decision to log, borrowed from the decision step, so logging copies no text twice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecisionRef<'a> {
    pub(crate) trace_id: &'a TraceId,
    pub(crate) keep: bool,
    pub(crate) trigger: Trigger,
    pub(crate) probability: Option<f64>,
    pub(crate) policy: &'a str,
    pub(crate) reason: &'a str,
}

impl LoggedDecision {
    #[cfg(test)]
    pub(crate) fn as_ref(&self) -> DecisionRef<'_> {
        DecisionRef {
            trace_id: &self.trace_id,
            keep: self.keep,
            trigger: self.trigger,
            probability: self.probability,
            policy: &self.policy,
            reason: &self.reason,
        }
    }
}

/// The kept spans of a trace that left through the exporter: its span records' positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exported {
    pub(crate) trace_id: TraceId,
    pub(crate) records: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("a decision-log record is shorter than its contents say")]
pub(crate) struct Truncated;

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Reasons are capped far below this already; cut on a char boundary all the same.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

pub(crate) fn encode_decisions(decisions: &[DecisionRef<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + decisions.len() * 96);
    out.extend_from_slice(&(decisions.len() as u32).to_le_bytes());
    for d in decisions {
        out.extend_from_slice(d.trace_id);
        out.push(u8::from(d.keep));
        out.push(d.trigger.index() as u8);
        out.extend_from_slice(&d.probability.unwrap_or(f64::NAN).to_bits().to_le_bytes());
        put_str(&mut out, d.policy);
        put_str(&mut out, d.reason);
    }
    out
}

pub(crate) fn encode_exported(traces: &[Exported]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + traces.len() * 28);
    out.extend_from_slice(&(traces.len() as u32).to_le_bytes());
    for t in traces {
        out.extend_from_slice(&t.trace_id);
        out.extend_from_slice(&(t.records.len() as u16).to_le_bytes());
        for r in &t.records {
            out.extend_from_slice(&r.to_le_bytes());
        }
    }
    out
}

/// Positions of settled pass-through records.
pub(crate) fn encode_positions(positions: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + positions.len() * 8);
    out.extend_from_slice(&(positions.len() as u32).to_le_bytes());
    for p in positions {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out
}

pub(crate) fn decode_positions(payload: &[u8]) -> Result<Vec<u64>, Truncated> {
    let mut r = Reader(payload);
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(payload.len() / 8));
    for _ in 0..n {
        out.push(r.u64()?);
    }
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.0.len() < n {
            return Err(Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| Truncated)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| Truncated)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| Truncated)?,
        ))
    }
    fn id(&mut self) -> Result<TraceId, Truncated> {
        self.take(16)?.try_into().map_err(|_| Truncated)
    }
    fn string(&mut self) -> Result<String, Truncated> {
        let n = self.u16()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

pub(crate) fn decode_decisions(payload: &[u8]) -> Result<Vec<LoggedDecision>, Truncated> {
    let mut r = Reader(payload);
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(payload.len() / 30));
    for _ in 0..n {
        let trace_id = r.id()?;
        let keep = r.u8()? != 0;
        let trigger = Trigger::ALL
            .get(r.u8()? as usize)
            .copied()
            .unwrap_or(Trigger::DecisionWait);
        let probability = Some(f64::from_bits(r.u64()?)).filter(|p| !p.is_nan());
        let policy = r.string()?;
        let reason = r.string()?;
        out.push(LoggedDecision {
            trace_id,
            keep,
            trigger,
            probability,
            policy,
            reason,
        });
    }
    Ok(out)
}

pub(crate) fn decode_exported(payload: &[u8]) -> Result<Vec<Exported>, Truncated> {
    let mut r = Reader(payload);
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(payload.len() / 18));
    for _ in 0..n {
        let trace_id = r.id()?;
        let k = r.u16()? as usize;
        let records = (0..k).map(|_| r.u64()).collect::<Result<_, _>>()?;
        out.push(Exported { trace_id, records });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_and_exports_read_back_as_written() {
        let decisions = vec![
            LoggedDecision {
                trace_id: [7; 16],
                keep: true,
                trigger: Trigger::RootGrace,
                probability: Some(0.25),
                policy: "keep-errors".into(),
                reason: "error span: é".into(),
            },
            LoggedDecision {
                trace_id: [8; 16],
                keep: false,
                trigger: Trigger::Shutdown,
                probability: None,
                policy: "default".into(),
                reason: String::new(),
            },
        ];
        let refs: Vec<DecisionRef<'_>> = decisions.iter().map(LoggedDecision::as_ref).collect();
        assert_eq!(
            decode_decisions(&encode_decisions(&refs)).expect("decoded"),
            decisions
        );
        let exported = vec![
            Exported {
                trace_id: [1; 16],
                records: vec![16, 4096],
            },
            Exported {
                trace_id: [2; 16],
                records: vec![],
            },
        ];
        assert_eq!(
            decode_exported(&encode_exported(&exported)).expect("decoded"),
            exported
        );
        let positions = vec![0, 77, u64::MAX];
        assert_eq!(
            decode_positions(&encode_positions(&positions)).expect("decoded"),
            positions
        );
        let bytes = encode_positions(&positions);
        assert!(decode_positions(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_short_payload_is_an_error_not_a_panic() {
        let bytes = encode_decisions(&[DecisionRef {
            trace_id: &[7; 16],
            keep: true,
            trigger: Trigger::Late,
            probability: None,
            policy: "p",
            reason: "r",
        }]);
        for cut in 0..bytes.len() {
            assert!(decode_decisions(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
