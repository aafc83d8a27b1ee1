//! The receivers' budget of bytes in flight (`receivers.max_in_flight_bytes`): what all the
//! requests being read, inflated, decoded and split hold at once, across both receivers and
//! every connection. Per-request limits bound one request; this bounds their sum, so many
//! concurrent large requests cannot take the process past its memory.
//!
//! What a request holds, charged as it grows and released when its spans are in the buffer
//! (where the buffer's own budget takes over) or it is refused:
//! - over HTTP, the body as it arrives, after inflation, chunk by chunk;
//! - over gRPC, the message once tonic has framed it (tonic reads it whole; its size is
//!   bounded by `max_request_size`);
//! - then its decoding: once more its size for protobuf (the spans are copied out of it), twice
//!   for OTLP/JSON (decoded messages, re-encoded to protobuf, then split).
//!
//! A request that does not fit now is refused as retryable (HTTP 503, gRPC `UNAVAILABLE`); one
//! that could never fit, even alone, gets HTTP 413 / `RESOURCE_EXHAUSTED`. A protobuf request
//! that does not fit now is first checked for its shape without building its spans, so one
//! that is malformed or holds too many spans gets its own answer (400 / 413), not a retry it
//! cannot use.

use std::sync::Arc;

use crate::buffer::MemoryBudget;

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// More than the whole budget: the request can never be taken as it is.
    Never,
    /// The budget is spent by other requests for now.
    Now,
}

pub(crate) struct Admission {
    budget: MemoryBudget,
    limit: usize,
}

impl Admission {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            budget: MemoryBudget::new(limit),
            limit,
        })
    }

    /// A request's charge, holding nothing yet.
    pub(crate) fn start(self: &Arc<Self>) -> Held {
        Held {
            admission: self.clone(),
            bytes: 0,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// What one request holds of the budget; released when dropped.
pub(crate) struct Held {
    admission: Arc<Admission>,
    bytes: usize,
}

impl Held {
    /// Holds `more` bytes besides what is held already.
    pub(crate) fn grow(&mut self, more: usize) -> Result<(), Over> {
        let total = self.bytes.saturating_add(more);
        if total > self.admission.limit {
            return Err(Over::Never);
        }
        if !self.admission.budget.try_reserve(more) {
            return Err(Over::Now);
        }
        self.bytes = total;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.admission.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_across_requests_and_are_released_on_drop() {
        let admission = Admission::new(1000);
        let mut a = admission.start();
        a.grow(600).unwrap();
        let mut b = admission.start();
        assert_eq!(b.grow(500), Err(Over::Now), "600 are held by another");
        assert_eq!(b.grow(1001), Err(Over::Never), "more than the whole budget");
        b.grow(400).unwrap();
        drop(a);
        let mut c = admission.start();
        c.grow(600).unwrap();
        drop((b, c));
        assert_eq!(admission.budget.used(), 0);
    }
}
