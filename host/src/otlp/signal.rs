//! The OTLP signals and their paths, and the codec of the signals that pass through unchanged
//! (metrics): checking a request, counting its data points, stamping a tenant on it, and its
//! OTLP/JSON form both ways.
//!
//! Metrics are decoded with prost and `opentelemetry-proto`'s serde (its `with-serde`
//! feature), not at the wire level as spans are: a pass-through signal is not indexed, only
//! checked, counted and forwarded as received, so a full decode per request is the simple,
//! well-kept way to check it. The JSON side is stricter than the trace codec in [`super::json`]
//! (it wants the exact camelCase keys and integer enums the OTLP/JSON spec writes, which is
//! what the SDKs send); a body it cannot read gets 400 with serde's reason.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

/// An OTLP signal, as the receivers and exporters route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    /// The OTLP/HTTP path (OTLP spec, "OTLP/HTTP Request").
    pub(crate) fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }

    /// The gRPC service, fixed by `opentelemetry/proto/collector/*/v1/*_service.proto`.
    pub(crate) const fn grpc_service(self) -> &'static str {
        match self {
            Signal::Traces => "opentelemetry.proto.collector.trace.v1.TraceService",
            Signal::Metrics => "opentelemetry.proto.collector.metrics.v1.MetricsService",
        }
    }

    /// The gRPC method path: `/<service>/Export`.
    pub(crate) fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }
}

/// Why a pass-through request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unread {
    /// Not a valid request of its signal; the reason, in words.
    Malformed(String),
    /// It holds more than one request may.
    TooLarge(String),
}

/// A decoded JSON body may take about this much memory per JSON object it holds, beyond its
/// text: prost messages are larger than the few bytes of `{"asInt":"1"}`. Used to refuse a
/// body whose decoding would pass the receivers' bound before decoding it.
const DECODED_BYTES_PER_OBJECT: usize = 96;

/// The data points of an encoded `ExportMetricsServiceRequest`, checked to decode; refused
/// past `max_points`.
pub(crate) fn count_metric_points(body: &[u8], max_points: u64) -> Result<u64, Unread> {
    let request = decode_metrics(body)?;
    within(points_of(&request), max_points)
}

/// The request with `tenant.id = <tenant>` on every resource, replacing what the sender wrote,
/// and its data points.
pub(crate) fn metrics_with_tenant(
    body: &[u8],
    tenant: &str,
    max_points: u64,
) -> Result<(Vec<u8>, u64), Unread> {
    let mut request = decode_metrics(body)?;
    let points = within(points_of(&request), max_points)?;
    for rm in &mut request.resource_metrics {
        let resource = rm.resource.get_or_insert_with(Resource::default);
        resource.attributes.retain(|kv| kv.key != "tenant.id");
        resource.attributes.push(KeyValue {
            key: "tenant.id".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(tenant.to_owned())),
            }),
            ..Default::default()
        });
    }
    Ok((request.encode_to_vec(), points))
}

/// An OTLP/JSON `ExportMetricsServiceRequest`, as protobuf, with its data points. A body whose
/// decoding would take more than `max_decoded` bytes is refused before it is decoded.
pub(crate) fn metrics_from_json(
    body: &[u8],
    max_decoded: usize,
    max_points: u64,
) -> Result<(Vec<u8>, u64), Unread> {
    // Every object costs a message; `{` inside strings counts too, which only overestimates.
    let objects = body.iter().filter(|&&b| b == b'{').count();
    let decoded = body
        .len()
        .saturating_add(objects.saturating_mul(DECODED_BYTES_PER_OBJECT));
    if decoded > max_decoded {
        return Err(Unread::TooLarge(format!(
            "decoding this JSON body would take about {decoded} bytes, more than the {max_decoded} one request may"
        )));
    }
    let request: ExportMetricsServiceRequest = serde_json::from_slice(body)
        .map_err(|e| Unread::Malformed(format!("invalid OTLP/JSON metrics: {e}")))?;
    let points = within(points_of(&request), max_points)?;
    Ok((request.encode_to_vec(), points))
}

/// One encoded request (or several concatenated, which protobuf reads as one) as an OTLP/JSON
/// line, for the file exporter.
pub(crate) fn metrics_to_json(body: &[u8]) -> Result<String, prost::DecodeError> {
    let request = ExportMetricsServiceRequest::decode(body)?;
    // Serializing prost structs with derived serde cannot fail: no maps with non-string keys.
    Ok(serde_json::to_string(&request).unwrap_or_default())
}

fn decode_metrics(body: &[u8]) -> Result<ExportMetricsServiceRequest, Unread> {
    ExportMetricsServiceRequest::decode(body)
        .map_err(|e| Unread::Malformed(format!("invalid OTLP metrics request: {e}")))
}

fn within(points: u64, max: u64) -> Result<u64, Unread> {
    if points > max {
        return Err(Unread::TooLarge(format!(
            "more than {max} data points in one request; split it into smaller ones"
        )));
    }
    Ok(points)
}

/// Data points of every metric of the request.
pub fn points_of(request: &ExportMetricsServiceRequest) -> u64 {
    let metrics = (request.resource_metrics.iter())
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics);
    metrics
        .map(|m| match &m.data {
            Some(Data::Gauge(g)) => g.data_points.len(),
            Some(Data::Sum(s)) => s.data_points.len(),
            Some(Data::Histogram(h)) => h.data_points.len(),
            Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
            Some(Data::Summary(s)) => s.data_points.len(),
            None => 0,
        } as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, number_data_point,
    };

    use super::*;

    fn point(v: f64) -> NumberDataPoint {
        NumberDataPoint {
            time_unix_nano: 1_700_000_000_000_000_000,
            value: Some(number_data_point::Value::AsDouble(v)),
            ..Default::default()
        }
    }

    fn request() -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![
                        Metric {
                            name: "agent.llm.cost_usd".into(),
                            unit: "USD".into(),
                            data: Some(Data::Sum(Sum {
                                data_points: vec![point(0.5), point(1.5)],
                                aggregation_temporality: 2,
                                is_monotonic: true,
                            })),
                            ..Default::default()
                        },
                        Metric {
                            name: "queue.depth".into(),
                            data: Some(Data::Gauge(Gauge {
                                data_points: vec![point(3.0)],
                            })),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn points_are_counted_over_every_metric_kind_and_bounded() {
        let body = request().encode_to_vec();
        assert_eq!(count_metric_points(&body, 100), Ok(3));
        assert!(matches!(
            count_metric_points(&body, 2),
            Err(Unread::TooLarge(_))
        ));
        assert!(matches!(
            count_metric_points(&[0xff, 0xff, 0xff], 100),
            Err(Unread::Malformed(_))
        ));
    }

    #[test]
    fn json_reads_back_as_the_protobuf_it_was_written_from() {
        let body = request().encode_to_vec();
        let line = metrics_to_json(&body).expect("encodes");
        // OTLP/JSON: camelCase keys, 64-bit integers as strings.
        assert!(line.contains("\"resourceMetrics\""), "{line}");
        assert!(
            line.contains("\"timeUnixNano\":\"1700000000000000000\""),
            "{line}"
        );
        let (back, points) = metrics_from_json(line.as_bytes(), 1 << 20, 100).expect("decodes");
        assert_eq!(points, 3);
        assert_eq!(
            ExportMetricsServiceRequest::decode(&back[..]),
            Ok(request())
        );
        assert!(matches!(
            metrics_from_json(b"{\"resourceMetrics\":7}", 1 << 20, 100),
            Err(Unread::Malformed(_))
        ));
        assert!(matches!(
            metrics_from_json(line.as_bytes(), 64, 100),
            Err(Unread::TooLarge(_))
        ));
    }

    #[test]
    fn a_tenant_replaces_what_the_sender_wrote_on_every_resource() {
        let mut sent = request();
        sent.resource_metrics[0].resource = Some(Resource {
            attributes: vec![KeyValue {
                key: "tenant.id".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("forged".into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        let (body, points) =
            metrics_with_tenant(&sent.encode_to_vec(), "acme", 100).expect("stamped");
        assert_eq!(points, 3);
        let got = ExportMetricsServiceRequest::decode(&body[..]).expect("decodes");
        let attributes = &got.resource_metrics[0]
            .resource
            .as_ref()
            .expect("resource")
            .attributes;
        assert_eq!(attributes.len(), 1);
        assert_eq!(
            attributes[0].value.as_ref().and_then(|v| v.value.clone()),
            Some(any_value::Value::StringValue("acme".into()))
        );
    }
}
