//! The OTLP signals and their paths, and the codec of the signals that pass through unchanged
//! (metrics): checking a request, counting its data points, stamping a tenant on it, and its
//! OTLP/JSON form both ways.
//!
//! Metrics are decoded with prost and `opentelemetry-proto`'s serde (its `with-serde`
//! feature), not at the wire level as spans are: a pass-through signal is not indexed, only
//! checked, counted and forwarded as received, so a full decode per request is the simple,
//! well-kept way to check it. The JSON side is stricter than the trace codec in [`super::json`]:
//! it wants the camelCase keys and integer enums the OTLP/JSON spec writes (what the SDKs send),
//! and doubles as JSON numbers (`"NaN"` and `"Infinity"` are refused, where the trace codec
//! takes them). A body it cannot read gets 400 with the reason; a metric whose data serde
//! skips is caught and refused too, never passed on without its points. Written JSON (the file
//! exporter's) spells non-finite doubles as OTLP/JSON does, which serde_json alone cannot.

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
    let text: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Unread::Malformed(format!("invalid OTLP/JSON metrics: {e}")))?;
    let written = json_points(&text);
    let request: ExportMetricsServiceRequest = serde_json::from_value(text)
        .map_err(|e| Unread::Malformed(format!("invalid OTLP/JSON metrics: {e}")))?;
    // serde reads a metric whose data it cannot read (a `"NaN"` double, say) as a metric
    // without data, and skips keys it does not know (`data_points`): either would lose points
    // without a word, so the body is refused instead.
    let read = points_of(&request);
    if read != written {
        return Err(Unread::Malformed(format!(
            "invalid OTLP/JSON metrics: {} of {written} data points cannot be read (keys must \
             be camelCase, as OTLP/JSON writes them, and doubles JSON numbers, not \"NaN\" or \
             \"Infinity\")",
            written.abs_diff(read)
        )));
    }
    let points = within(read, max_points)?;
    Ok((request.encode_to_vec(), points))
}

/// The keys that hold a metric's data, in OTLP/JSON.
const DATA_KEYS: [&str; 6] = [
    "gauge",
    "sum",
    "histogram",
    "exponentialHistogram",
    "exponential_histogram",
    "summary",
];

/// The data points a JSON request holds, under either spelling of the keys.
fn json_points(text: &serde_json::Value) -> u64 {
    fn list<'a>(v: &'a serde_json::Value, camel: &str, snake: &str) -> &'a [serde_json::Value] {
        (v.get(camel).or_else(|| v.get(snake)))
            .and_then(|l| l.as_array())
            .map_or(&[], Vec::as_slice)
    }
    list(text, "resourceMetrics", "resource_metrics")
        .iter()
        .flat_map(|r| list(r, "scopeMetrics", "scope_metrics"))
        .flat_map(|s| list(s, "metrics", "metrics"))
        .flat_map(|m| DATA_KEYS.iter().filter_map(|k| m.get(*k)))
        .map(|data| list(data, "dataPoints", "data_points").len() as u64)
        .sum()
}

/// One encoded request (or several concatenated, which protobuf reads as one) as an OTLP/JSON
/// line, for the file exporter.
pub(crate) fn metrics_to_json(body: &[u8]) -> Result<String, prost::DecodeError> {
    let request = ExportMetricsServiceRequest::decode(body)?;
    // Serializing prost structs with derived serde cannot fail: no maps with non-string keys.
    let mut value = serde_json::to_value(&request).unwrap_or_default();
    spell_non_finite(&request, &mut value);
    Ok(value.to_string())
}

/// Writes `x` into `slot` as OTLP/JSON spells a double that is not finite (`"NaN"`,
/// `"Infinity"`, `"-Infinity"`, proto3's JSON mapping); serde_json wrote `null` there.
fn spell(slot: Option<&mut serde_json::Value>, x: f64) {
    if let Some(slot) = slot.filter(|_| !x.is_finite()) {
        *slot = serde_json::Value::from(if x.is_nan() {
            "NaN"
        } else if x > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
    }
}

/// Spells every double of `request` that is not finite in its JSON `value`.
fn spell_non_finite(request: &ExportMetricsServiceRequest, value: &mut serde_json::Value) {
    use opentelemetry_proto::tonic::metrics::v1::{Exemplar, exemplar, number_data_point};
    let exemplars = |list: &[Exemplar], v: &mut serde_json::Value| {
        for (i, e) in list.iter().enumerate() {
            if let Some(exemplar::Value::AsDouble(x)) = e.value {
                spell(v.pointer_mut(&format!("/exemplars/{i}/asDouble")), x);
            }
        }
    };
    let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint,
                  v: &mut serde_json::Value| {
        if let Some(number_data_point::Value::AsDouble(x)) = p.value {
            spell(v.get_mut("asDouble"), x);
        }
        exemplars(&p.exemplars, v);
    };
    for (r, rm) in request.resource_metrics.iter().enumerate() {
        for (s, sm) in rm.scope_metrics.iter().enumerate() {
            for (m, metric) in sm.metrics.iter().enumerate() {
                let at = format!("/resourceMetrics/{r}/scopeMetrics/{s}/metrics/{m}");
                let Some(v) = value.pointer_mut(&at) else {
                    continue;
                };
                match &metric.data {
                    Some(Data::Gauge(g)) => {
                        for (i, p) in g.data_points.iter().enumerate() {
                            if let Some(slot) = v.pointer_mut(&format!("/gauge/dataPoints/{i}")) {
                                number(p, slot);
                            }
                        }
                    }
                    Some(Data::Sum(g)) => {
                        for (i, p) in g.data_points.iter().enumerate() {
                            if let Some(slot) = v.pointer_mut(&format!("/sum/dataPoints/{i}")) {
                                number(p, slot);
                            }
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for (i, p) in h.data_points.iter().enumerate() {
                            let Some(slot) = v.pointer_mut(&format!("/histogram/dataPoints/{i}"))
                            else {
                                continue;
                            };
                            for (key, x) in [("sum", p.sum), ("min", p.min), ("max", p.max)] {
                                x.inspect(|x| spell(slot.get_mut(key), *x));
                            }
                            for (b, x) in p.explicit_bounds.iter().enumerate() {
                                spell(slot.pointer_mut(&format!("/explicitBounds/{b}")), *x);
                            }
                            exemplars(&p.exemplars, slot);
                        }
                    }
                    Some(Data::ExponentialHistogram(h)) => {
                        for (i, p) in h.data_points.iter().enumerate() {
                            let at = format!("/exponentialHistogram/dataPoints/{i}");
                            let Some(slot) = v.pointer_mut(&at) else {
                                continue;
                            };
                            for (key, x) in [("sum", p.sum), ("min", p.min), ("max", p.max)] {
                                x.inspect(|x| spell(slot.get_mut(key), *x));
                            }
                            exemplars(&p.exemplars, slot);
                        }
                    }
                    Some(Data::Summary(sm)) => {
                        for (i, p) in sm.data_points.iter().enumerate() {
                            spell(
                                v.pointer_mut(&format!("/summary/dataPoints/{i}/sum")),
                                p.sum,
                            );
                        }
                    }
                    None => {}
                }
            }
        }
    }
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
        // Keys serde does not know would drop the points they hold: refused.
        let snake = line.replace("dataPoints", "data_points");
        assert!(matches!(
            metrics_from_json(snake.as_bytes(), 1 << 20, 100),
            Err(Unread::Malformed(why)) if why.contains("3 of 3 data points")
        ));
        assert!(matches!(
            metrics_from_json(line.as_bytes(), 64, 100),
            Err(Unread::TooLarge(_))
        ));
    }

    #[test]
    fn odd_but_valid_requests_read_back_from_their_json_the_same() {
        use opentelemetry_proto::tonic::metrics::v1::{Exemplar, Histogram, HistogramDataPoint};
        let mut odd = request();
        let metrics = &mut odd.resource_metrics[0].scope_metrics[0].metrics;
        metrics[1].data = None;
        metrics.push(Metric {
            name: "latency".into(),
            data: Some(Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![KeyValue {
                        key: "no.value".into(),
                        value: None,
                        ..Default::default()
                    }],
                    count: 2,
                    sum: Some(f64::NAN),
                    bucket_counts: vec![1, 1],
                    explicit_bounds: vec![f64::INFINITY],
                    exemplars: vec![Exemplar {
                        span_id: vec![1; 8],
                        trace_id: vec![2; 16],
                        ..Default::default()
                    }],
                    min: Some(f64::NEG_INFINITY),
                    ..Default::default()
                }],
                aggregation_temporality: 1,
            })),
            ..Default::default()
        });
        let line = metrics_to_json(&odd.encode_to_vec()).expect("encodes");
        // The file's JSON spells what serde_json cannot write as a number.
        for spelled in [
            r#""sum":"NaN""#,
            r#""explicitBounds":["Infinity"]"#,
            r#""min":"-Infinity""#,
            r#""traceId":"02020202020202020202020202020202""#,
        ] {
            assert!(line.contains(spelled), "{spelled} in {line}");
        }
        // Reading such a body is refused with a reason, never a metric silently without data.
        match metrics_from_json(line.as_bytes(), 1 << 20, 100) {
            Err(Unread::Malformed(why)) => assert!(why.contains("1 of 3 data points"), "{why}"),
            other => panic!("{other:?}"),
        }
        let finite = request();
        let line = metrics_to_json(&finite.encode_to_vec()).expect("encodes");
        let (back, points) = metrics_from_json(line.as_bytes(), 1 << 20, 100).expect("decodes");
        assert_eq!(points, 3);
        assert_eq!(ExportMetricsServiceRequest::decode(&back[..]), Ok(finite));
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
