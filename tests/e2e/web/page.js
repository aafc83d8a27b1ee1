// The instrumented page: the OpenTelemetry web SDK exporting over OTLP/HTTP (JSON) to the
// collector named in the page's query, from the page's own origin. One span per load, with a
// test-given attribute; the outcome goes on `window.__result` for the driver to read.
import { trace } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { WebTracerProvider } from "@opentelemetry/sdk-trace-web";

const params = new URLSearchParams(window.location.search);
const exporter = new OTLPTraceExporter({ url: params.get("collector") });
let exportError = null;
const processor = new SimpleSpanProcessor({
  export(spans, done) {
    exporter.export(spans, (result) => {
      if (result.code !== 0) exportError = String(result.error ?? "export failed");
      done(result);
    });
  },
  shutdown: () => exporter.shutdown(),
  forceFlush: () => exporter.forceFlush(),
});
const provider = new WebTracerProvider({
  resource: resourceFromAttributes({ "service.name": "web-app" }),
  spanProcessors: [processor],
});

const span = provider.getTracer("page").startSpan("page.load");
span.setAttribute("test.mark", params.get("mark"));
span.end();
provider.forceFlush().then(
  () => { window.__result = { ok: exportError === null, error: exportError, origin: window.location.origin }; },
  (e) => { window.__result = { ok: false, error: String(e), origin: window.location.origin }; },
);
