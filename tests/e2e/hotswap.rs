//! Hot swap under load: a replaced plugin file takes effect without a restart or a lost span,
//! and a broken replacement is refused while the old version keeps deciding. The load comes
//! from the OpenTelemetry Rust SDK's batch exporter over OTLP/HTTP.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};

use crate::support::*;

/// One policy, `gate`, from the file `gate`, watched every 50 ms, compiled into `cache`.
fn gate_config(cache: &Path, gate: &Path) -> String {
    format!(
        "[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"drop\"\n\n\
         [plugins]\nwatch_interval = \"50ms\"\ncache_dir = {:?}\n\n\
         [[policies]]\nname = \"gate\"\npath = {:?}\n",
        cache.display().to_string(),
        gate.display().to_string()
    )
}

/// Replaces a file the way deploy tools do: write beside it, then rename over it.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_plugin_file_under_load_takes_effect_and_loses_nothing() {
    let (v1, v2) = (test_plugin("swap-v1"), test_plugin("swap-v2"));
    let plugins = TempDir::new("swap");
    let cache = plugins.path().join("plugin-cache");
    let config = |gate: &Path| gate_config(&cache, gate);
    // Compile v2 into the shared compile cache first, with a collector of its own, so the
    // timed swap below measures noticing the file, loading, checking and swapping, not a cold
    // Cranelift compile (whose time depends on the machine, not on tailgate).
    let mut warm = Tailgate::start(&config(&v2));
    assert!(warm.terminate().success());
    drop(warm);
    let gate = plugins.path().join("gate.wasm");
    std::fs::copy(&v1, &gate).unwrap();
    let mut tg = Tailgate::start(&config(&gate));
    let pid = tg.pid();
    let compiled = std::fs::read_dir(&cache)
        .expect("the compile cache exists")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        })
        .count();
    assert_eq!(compiled, 2, "v1 and v2 are both in the compile cache");

    // Steady load from the OpenTelemetry SDK: four services, each with its own tracer
    // provider and batch exporter over OTLP/HTTP protobuf, each ending 20 ten-span traces
    // every 33 ms: 24,000 spans/s in all.
    // Declared after `tg`, so dropped first: the senders stop even if an assertion fails.
    let stop = StopFlag::new();
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for sender in 0..4u64 {
        let (http, stop, sent) = (tg.http, stop.handle(), sent.clone());
        senders.push(std::thread::spawn(move || {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(format!("http://{http}/v1/traces"))
                .build()
                .expect("OTLP/HTTP exporter");
            // A queue deep enough that the SDK never drops a span of ours.
            let processor = BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_max_queue_size(1 << 16)
                        .with_max_export_batch_size(512)
                        .with_scheduled_delay(Duration::from_millis(20))
                        .build(),
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_resource(
                    Resource::builder()
                        .with_service_name(format!("load-{sender}"))
                        .build(),
                )
                .build();
            let tracer = provider.tracer("load");
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += Duration::from_millis(33);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                for _ in 0..20 {
                    let cx = Context::current_with_span(tracer.start("request"));
                    for _ in 0..9 {
                        tracer.start_with_context("step", &cx).end();
                    }
                    cx.span().end();
                }
                sent.fetch_add(200, Ordering::Relaxed);
            }
            provider.force_flush().expect("flush");
            provider.shutdown().expect("shutdown");
        }));
    }
    let load_started = Instant::now();
    let decided_by_v1 = wait_for(Duration::from_secs(30), || {
        exported_reasons(&tg).contains("v1").then_some(())
    });
    assert!(decided_by_v1.is_some(), "v1 decides before the swap");

    // Swap the file and time until the new version is live.
    let offset = std::fs::metadata(tg.output_path())
        .map(|m| m.len())
        .unwrap_or(0);
    let swapped_at = Instant::now();
    replace(&gate, &std::fs::read(&v2).unwrap());
    let live = wait_for(Duration::from_secs(30), || {
        (tg.metrics()
            .sum("tailgate_reloads_total", &["outcome=\"ok\""])
            >= 1.0)
            .then_some(())
    });
    let took = swapped_at.elapsed();
    assert!(live.is_some(), "reload after the file change");
    eprintln!(
        "hot swap: file replaced -> new policy live in {} ms",
        took.as_millis()
    );
    let decided_by_v2 = wait_for(Duration::from_secs(30), || {
        exported_reasons_since(&tg, offset)
            .contains("v2")
            .then_some(())
    });
    assert!(decided_by_v2.is_some(), "v2 decides after the swap");
    let first_v2 = swapped_at.elapsed();
    eprintln!(
        "hot swap: first trace kept by v2 exported {} ms after the replacement",
        first_v2.as_millis()
    );
    // From the warm cache (no compile in it): a change is live within a second.
    assert!(
        took < Duration::from_secs(1),
        "swap took {} ms with v2 already compiled",
        took.as_millis()
    );

    // A broken replacement is refused; v2 keeps deciding.
    replace(&gate, b"this is not a WebAssembly component");
    let refused = wait_for(Duration::from_secs(30), || {
        (tg.metrics()
            .sum("tailgate_reloads_total", &["outcome=\"refused\""])
            >= 1.0)
            .then_some(())
    });
    assert!(refused.is_some(), "broken replacement refused");
    let (code, status) = http_get(tg.admin, "/status").unwrap();
    assert_eq!(code, 200);
    assert!(status.contains("not a valid component"), "{status}");
    let before = tg
        .metrics()
        .sum("tailgate_traces_decided_total", &["policy=\"gate\""]);
    let still_deciding = wait_for(Duration::from_secs(30), || {
        (tg.metrics()
            .sum("tailgate_traces_decided_total", &["policy=\"gate\""])
            > before)
            .then_some(())
    });
    assert!(still_deciding.is_some(), "the old version keeps deciding");

    stop.stop();
    for s in senders {
        s.join().expect("sender thread");
    }
    let elapsed = load_started.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "hot swap load: {sent} spans in {elapsed:.1} s = {:.0} spans/s",
        sent as f64 / elapsed
    );

    let m = wait_for(Duration::from_secs(20), || {
        let m = tg.metrics();
        let quiet = m.sum("tailgate_buffer_spans", &[]) == 0.0
            && m.sum("tailgate_export_queue_spans", &[]) == 0.0;
        quiet.then_some(m)
    })
    .expect("drained");
    assert_eq!(m.received(), sent as f64, "every span the SDK sent arrived");
    assert_eq!(
        m.received(),
        m.accounted(),
        "received = kept + dropped - rescued + refused"
    );
    assert_eq!(m.kept(), m.exported());
    assert_eq!(tg.pid(), pid, "no restart");
    assert!(tg.terminate().success());
}

/// The compile cache holds native code, which runs outside the sandbox's checks. Another
/// policy's compiled code planted under this policy's cache name (the file keeps its owner and
/// mode, so only the manifest can tell) is never loaded: the policy is compiled afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_compile_cache_artifact_is_never_loaded() {
    let (v1, v2) = (test_plugin("swap-v1"), test_plugin("swap-v2"));
    let home = TempDir::new("forged-cache");
    let cache = home.path().join("plugin-cache");
    let artifacts = || -> std::collections::HashSet<std::path::PathBuf> {
        std::fs::read_dir(&cache)
            .expect("the compile cache exists")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    // Each version compiled into the cache by a collector of its own.
    let mut tg = Tailgate::start(&gate_config(&cache, &v2));
    assert!(tg.terminate().success());
    drop(tg);
    let v2_artifacts = artifacts();
    assert_eq!(v2_artifacts.len(), 1, "{v2_artifacts:?}");
    let mut tg = Tailgate::start(&gate_config(&cache, &v1));
    assert!(tg.terminate().success());
    drop(tg);
    let v1_artifacts: Vec<_> = artifacts().difference(&v2_artifacts).cloned().collect();
    let v2_artifacts: Vec<_> = v2_artifacts.into_iter().collect();
    let ([v1_artifact], [v2_artifact]) = (v1_artifacts.as_slice(), v2_artifacts.as_slice()) else {
        panic!("one artifact per version: {v1_artifacts:?}, {v2_artifacts:?}");
    };
    // The attack: v2's code written into v1's artifact, in place.
    let forged = std::fs::read(v2_artifact).unwrap();
    std::fs::copy(v2_artifact, v1_artifact).unwrap();

    let mut tg = Tailgate::start(&gate_config(&cache, &v1));
    let req = request("svc", &[SpanSpec::new(1, 1, 0)]);
    let (code, _, body) = post(
        tg.http,
        "application/x-protobuf",
        None,
        prost::Message::encode_to_vec(&req),
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let reasons = wait_for(Duration::from_secs(20), || {
        let reasons = exported_reasons(&tg);
        (!reasons.is_empty()).then_some(reasons)
    })
    .expect("the trace is exported");
    assert_eq!(
        reasons,
        ["v1".to_owned()].into(),
        "v1 decides, not the code planted under its name"
    );
    let log = tg.log().join("\n");
    assert!(
        log.contains("compile cache entry not used") && log.contains("manifest this host wrote"),
        "the mismatch is logged; log:\n{log}"
    );
    assert_ne!(
        std::fs::read(v1_artifact).unwrap(),
        forged,
        "the entry is rewritten with v1's own code"
    );
    assert!(tg.terminate().success());
}

fn exported_reasons(tg: &Tailgate) -> std::collections::HashSet<String> {
    exported_reasons_since(tg, 0)
}

/// Reasons on spans written after byte `offset` of the output file.
fn exported_reasons_since(tg: &Tailgate, offset: u64) -> std::collections::HashSet<String> {
    use std::io::{Read, Seek};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(tg.output_path()) {
        let _ = f.seek(std::io::SeekFrom::Start(offset));
        let _ = f.read_to_string(&mut text);
    }
    let requests: Vec<_> = text
        .lines()
        .filter_map(|l| decode_traces(l.as_bytes()).ok())
        .collect();
    exported_spans(&requests)
        .iter()
        .filter_map(|(_, s)| attr(s, "sampling.reason").map(str::to_owned))
        .collect()
}
