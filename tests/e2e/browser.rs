//! A browser app: a page served on localhost from another origin, instrumented with the
//! OpenTelemetry web SDK (`@opentelemetry/sdk-trace-web`, `@opentelemetry/exporter-trace-otlp-http`),
//! opened in Debian's headless Chromium by Playwright. Its spans reach tailgate through CORS;
//! the same page from an origin that is not allowed is refused by the browser's preflight.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

#[test]
fn a_browser_page_sends_spans_through_cors_and_a_disallowed_origin_is_refused() {
    let chromium = chromium();
    let web = web_env();
    let page_port = free_port();
    // The same port under two host names: two origins, one allowed.
    let tg = Tailgate::start_with(Setup {
        receivers: &format!(
            "[receivers.cors]\nallowed_origins = [\"http://localhost:{page_port}\"]\n"
        ),
        sections: "[buffer]\nroot_grace = \"200ms\"\n",
    });
    let driver = Command::new("node")
        .arg(web.join("drive.mjs"))
        .env("PAGE_PORT", page_port.to_string())
        .env("COLLECTOR", format!("http://{}/v1/traces", tg.http))
        .env("ORIGINS", "localhost,127.0.0.1")
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs the driver");
    let mut driver = ChildGuard(driver);
    let status = driver.wait_exit(Duration::from_secs(120));
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read as _;
    let _ = driver
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    let _ = driver
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(
        status.is_some_and(|s| s.success()),
        "the browser driver failed ({status:?}):\n{err}\n{out}"
    );
    let loads: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line per load"))
        .collect();
    assert_eq!(loads.len(), 2, "{out}");
    let (allowed, refused) = (&loads[0], &loads[1]);
    assert_eq!(allowed["origin"], format!("http://localhost:{page_port}"));
    assert_eq!(allowed["ok"], true, "the allowed origin exports: {allowed}");
    assert_eq!(refused["origin"], format!("http://127.0.0.1:{page_port}"));
    assert_eq!(refused["ok"], false, "the other origin cannot: {refused}");
    let console = refused["console"].to_string();
    assert!(
        console.contains("blocked by CORS policy"),
        "the browser blocked it for CORS: {console}"
    );

    // The allowed page's span is decided and exported; nothing of the refused one arrived.
    let marks = wait_for(Duration::from_secs(30), || {
        let spans = exported_spans(&tg.exported());
        let marks: Vec<String> = spans
            .iter()
            .filter_map(|(_, s)| attr(s, "test.mark").map(str::to_owned))
            .collect();
        (!marks.is_empty()).then_some(marks)
    });
    assert_eq!(marks, Some(vec!["localhost".to_owned()]));
    assert_eq!(
        tg.metrics().received(),
        1.0,
        "only the allowed page's span came in"
    );
}
