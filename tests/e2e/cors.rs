//! CORS on the HTTP receiver: preflights answered for allowed origins, the headers on allowed
//! origins' responses only, and nothing of it while `receivers.cors` is unset.

use prost::Message;

use crate::support::*;

const ALLOWED: &str = "[receivers.cors]\n\
     allowed_origins = [\"http://app.localhost:8080\", \"https://*.example.com\"]\n\
     allowed_headers = [\"x-tenant\"]\n\
     max_age = \"10m\"\n";

/// A browser's preflight for a POST of OTLP/JSON from `origin`.
fn preflight(tg: &Tailgate, origin: &str) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{}/v1/traces", tg.http),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-tenant")
        .send()
        .expect("OPTIONS /v1/traces")
}

fn post_from(tg: &Tailgate, origin: &str, trace: u64) -> reqwest::blocking::Response {
    let body = request("web", &[SpanSpec::new(trace, 1, 0)]).encode_to_vec();
    reqwest::blocking::Client::new()
        .post(format!("http://{}/v1/traces", tg.http))
        .header("origin", origin)
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .expect("POST /v1/traces")
}

fn allow_origin(r: &reqwest::blocking::Response) -> Option<String> {
    (r.headers().get("access-control-allow-origin")).map(|v| v.to_str().unwrap().to_owned())
}

#[test]
fn allowed_origins_get_preflights_and_cors_headers_and_others_do_not() {
    let tg = Tailgate::start_with(Setup {
        receivers: ALLOWED,
        sections: "",
    });
    for origin in ["http://app.localhost:8080", "https://shop.example.com"] {
        let r = preflight(&tg, origin);
        assert!(r.status().is_success(), "{origin}: {}", r.status());
        assert_eq!(allow_origin(&r).as_deref(), Some(origin));
        let headers = r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(
            headers.contains("content-type") && headers.contains("x-tenant"),
            "{headers}"
        );
        assert!(
            r.headers()["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        assert_eq!(r.headers()["access-control-max-age"], "600");

        let r = post_from(&tg, origin, 1);
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(allow_origin(&r).as_deref(), Some(origin));
    }
    // Another origin: the browser gets no allowance, so it will not send.
    for origin in ["http://evil.localhost:8080", "https://example.com"] {
        assert_eq!(allow_origin(&preflight(&tg, origin)), None, "{origin}");
        assert_eq!(allow_origin(&post_from(&tg, origin, 2)), None, "{origin}");
    }
    let received = wait_for(std::time::Duration::from_secs(10), || {
        let n = tg.metrics().received();
        (n == 4.0).then_some(n)
    });
    assert_eq!(received, Some(4.0), "every POST still reached the receiver");
}

#[test]
fn without_cors_a_preflight_is_not_allowed() {
    let tg = Tailgate::start("");
    let r = preflight(&tg, "http://app.localhost:8080");
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(allow_origin(&r), None);
}

#[test]
fn a_bad_origin_is_refused_with_its_key_and_line() {
    let dir = TempDir::new("cors-check");
    let path = dir.path().join("t.toml");
    std::fs::write(
        &path,
        "[receivers.cors]\nallowed_origins = [\"https://app.example.com/path\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("tailgate check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("receivers.cors.allowed_origins") && err.contains("line 2"),
        "{err}"
    );
}
