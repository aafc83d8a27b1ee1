//! From a metrics request body to the exporter's metrics queue: the part both transports share
//! for the signal that passes through unchanged.
//!
//! Checks and counts the request's data points under the same limits as spans
//! (`receivers.max_spans_per_request` bounds data points too), stamps the caller's tenant on
//! its resources, appends it to the storage log (the answer waits for it, as for spans) and
//! queues it for the exporter. Nothing here joins the trace buffer.

use std::sync::Arc;

use bytes::Bytes;

use super::ingest::{Accepted, Ingest, OwnedInFlight, Refusal};
use super::metrics::RefusedReason;
use crate::export::NotQueued;
use crate::otlp::signal::{self, Unread};
use crate::storage::{self, AppendError};

impl Ingest {
    /// A metrics request, protobuf or (with `json`) OTLP/JSON.
    pub(crate) async fn accept_metrics(
        self: &Arc<Self>,
        body: Bytes,
        json: bool,
        transport: &'static str,
        tenant: Option<&str>,
    ) -> Result<Accepted, Refusal> {
        let guard = self.enter()?;
        let limits = self.limits;
        let (body, points) = super::run_ingest(body.len(), || {
            let (body, points) = if json {
                let (body, points) =
                    signal::metrics_from_json(&body, limits.max_json_decoded, limits.max_spans)?;
                (Bytes::from(body), points)
            } else {
                let points = signal::count_metric_points(&body, limits.max_spans)?;
                (body, points)
            };
            match tenant {
                None => Ok((body, points)),
                Some(tenant) => signal::metrics_with_tenant(&body, tenant, limits.max_spans)
                    .map(|(body, points)| (Bytes::from(body), points)),
            }
        })
        .map_err(unread)?;
        self.metrics.points_received(transport, points);
        let Some(queue) = self.forward.clone() else {
            self.metrics
                .points_refused(RefusedReason::ShuttingDown, points);
            return Err(Refusal::ShuttingDown);
        };
        let Some(storage) = self.storage.clone() else {
            return match queue.push(body, points, None) {
                Ok(()) => Ok(Accepted::default()),
                Err(not) => Err(self.not_queued(not, points)),
            };
        };
        let Some(admission) = storage.admit(body.len()) else {
            self.metrics.points_refused(RefusedReason::DiskFull, points);
            return Err(Refusal::DiskFull("storage.max_bytes is reached".into()));
        };
        // From the append on, the request finishes even if its sender hangs up.
        let owned = OwnedInFlight::new(self.clone());
        drop(guard);
        let task = tokio::spawn(async move {
            let ingest = owned.0.clone();
            let appended = storage
                .append_passthrough(body.clone(), storage::unix_nanos(), Some(admission))
                .await;
            let result = match appended.unwrap_or(Err(AppendError::Closed)) {
                Ok(position) => match queue.push(body, points, Some(position)) {
                    Ok(()) => Ok(Accepted::default()),
                    Err(not) => {
                        storage.pins.unpin(position);
                        Err(ingest.not_queued(not, points))
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "refusing metrics: the storage log cannot take them");
                    ingest
                        .metrics
                        .points_refused(RefusedReason::DiskFull, points);
                    Err(Refusal::DiskFull(e.to_string()))
                }
            };
            drop(owned);
            result
        });
        task.await
            .unwrap_or_else(|e| Err(Refusal::DiskFull(format!("append failed: {e}"))))
    }

    /// The refusal a metrics request would get for its shape, found before the in-flight
    /// budget is asked (see [`Ingest::check_shape`]).
    pub(crate) fn check_metrics_shape(&self, body: &[u8]) -> Result<(), Refusal> {
        super::run_ingest(body.len(), || {
            signal::count_metric_points(body, self.limits.max_spans).map(drop)
        })
        .map_err(unread)
    }

    /// A metrics record read back from the log at start, queued for the exporter again. The
    /// caller has pinned `position`. False for a record that does not parse.
    pub fn replay_metrics(&self, body: &[u8], position: u64) -> bool {
        let unpin = || {
            if let Some(storage) = &self.storage {
                storage.pins.unpin(position);
            }
        };
        let (Ok(points), Some(queue)) = (
            signal::count_metric_points(body, u64::MAX),
            self.forward.as_ref(),
        ) else {
            unpin();
            return false;
        };
        if queue
            .replay(Bytes::copy_from_slice(body), points, position)
            .is_err()
        {
            unpin();
        }
        true
    }

    fn not_queued(&self, not: NotQueued, points: u64) -> Refusal {
        match not {
            NotQueued::Full => {
                self.metrics.points_refused(RefusedReason::Memory, points);
                Refusal::MetricsQueueFull
            }
            NotQueued::Closed => {
                self.metrics
                    .points_refused(RefusedReason::ShuttingDown, points);
                Refusal::ShuttingDown
            }
        }
    }
}

fn unread(e: Unread) -> Refusal {
    match e {
        Unread::Malformed(why) => Refusal::Malformed(why),
        Unread::TooLarge(why) => Refusal::TooLarge(why),
    }
}
