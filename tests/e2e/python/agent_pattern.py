"""The cost-attribution pattern agent teams copy, pointed at one OTLP endpoint.

A tracer, and a meter whose counters `agent.llm.cost_usd` (unit USD) and `agent.llm.tokens`
take their dimensions (`model`, `user.id`, `tenant.id`, `feature.name`) from baggage, exported
by a `PeriodicExportingMetricReader(OTLPMetricExporter(...))`. Each run is one trace: a root
span and an LLM call, some of which fail.

Environment: TAILGATE_ENDPOINT (http://host:port of tailgate's OTLP/gRPC receiver), RUNS,
EXPORT_INTERVAL_MS. Prints one JSON line: what was sent, for the test to check against what
arrived.
"""

import json
import os
import random
import time

from opentelemetry import baggage, context
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

endpoint = os.environ["TAILGATE_ENDPOINT"]
runs = int(os.environ.get("RUNS", "40"))
interval = int(os.environ.get("EXPORT_INTERVAL_MS", "30000"))

resource = Resource.create({"service.name": "support-agent"})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(
    BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
)
reader = PeriodicExportingMetricReader(
    OTLPMetricExporter(endpoint=endpoint, insecure=True),
    export_interval_millis=interval,
)
meter_provider = MeterProvider(resource=resource, metric_readers=[reader])

tracer = tracer_provider.get_tracer("agent")
meter = meter_provider.get_meter("agent")
cost_usd = meter.create_counter("agent.llm.cost_usd", unit="USD")
tokens = meter.create_counter("agent.llm.tokens")

rng = random.Random(7)
tenants = ["acme", "globex", "initech"]
features = ["chat", "search"]
models = {"gpt-4o": 0.005, "claude-3-haiku": 0.00025}

sent = {"runs": runs, "cost": {}, "tokens": {}, "errors": [], "ok": [], "spans": 0}
for i in range(runs):
    tenant = tenants[i % len(tenants)]
    ctx = baggage.set_baggage("tenant.id", tenant)
    ctx = baggage.set_baggage("user.id", f"user-{i % 5}", ctx)
    ctx = baggage.set_baggage("feature.name", features[i % len(features)], ctx)
    attached = context.attach(ctx)
    try:
        failed = i % 8 == 3
        with tracer.start_as_current_span("agent.run") as root:
            model = rng.choice(sorted(models))
            used = rng.randint(200, 4000)
            with tracer.start_as_current_span("llm.call") as call:
                call.set_attribute("gen_ai.request.model", model)
                call.set_attribute("gen_ai.usage.input_tokens", used)
                dims = {
                    "model": model,
                    "user.id": baggage.get_baggage("user.id"),
                    "tenant.id": baggage.get_baggage("tenant.id"),
                    "feature.name": baggage.get_baggage("feature.name"),
                }
                spent = used / 1000 * models[model]
                cost_usd.add(spent, dims)
                tokens.add(used, dims)
                sent["cost"][tenant] = sent["cost"].get(tenant, 0.0) + spent
                sent["tokens"][tenant] = sent["tokens"].get(tenant, 0) + used
                if failed:
                    call.set_status(Status(StatusCode.ERROR, "the tool call failed"))
            if failed:
                root.set_status(Status(StatusCode.ERROR, "the run failed"))
            trace_id = format(root.get_span_context().trace_id, "032x")
        sent["spans"] += 2
        (sent["errors"] if failed else sent["ok"]).append(trace_id)
    finally:
        context.detach(attached)
    time.sleep(0.02)

tracer_provider.shutdown()
meter_provider.shutdown()
print(json.dumps(sent))
