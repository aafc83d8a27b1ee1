//! Listener limits through the real binary: connections that send nothing are closed at their
//! deadline, a flood of them stops neither a real client nor the probes, connections past the
//! cap are closed at once, and slow heads and bodies are cut off.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use opentelemetry::trace::{Tracer, TracerProvider as _};

use crate::pipeline::{Transport, provider};
use crate::support::*;

/// Raises this test process's soft limit on open files to at least `want` (the soft limit
/// is 1,024 on many machines), or fails saying why.
fn raise_open_files(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < want {
            assert!(
                limit.rlim_max >= want,
                "this test needs {want} open files; the hard limit is {}",
                limit.rlim_max
            );
            limit.rlim_cur = want;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

/// Whether the server has closed `conn`: a read sees end of file or a reset, not a timeout.
fn closed_by_server(conn: &mut TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 512];
    loop {
        match conn.read(&mut byte) {
            Ok(0) => return true,
            // A response (a 408, say) before the close: keep reading to the end.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// `n` connections to `addr` that send nothing, opened from 8 threads (one after another,
/// each waits on the last one's handshake: seconds for thousands here).
fn idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                (t..n)
                    .step_by(8)
                    .map(|i| {
                        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("connecting thread"))
        .collect()
}

#[test]
fn two_thousand_idle_connections_stop_no_client_and_close_at_the_header_deadline() {
    raise_open_files(8192);
    let deadline = Duration::from_secs(5);
    let tg = Tailgate::start_with(Setup {
        receivers: "[receivers.limits]\nheader_read_timeout = \"5s\"\n",
        sections: "[admin.limits]\nheader_read_timeout = \"5s\"\n",
    });
    let opened = Instant::now();
    let mut held = idle(tg.http, 2000);
    eprintln!("2,000 on http after {:?}", opened.elapsed());
    held.extend(idle(tg.admin, 2000));
    eprintln!("4,000 connections open after {:?}", opened.elapsed());

    // A real OTel SDK client still exports, and the probe still answers.
    let sdk = provider(&tg, Transport::HttpProtobuf, "beside-the-flood");
    // Ends, and so is exported, as it is dropped.
    sdk.tracer("t").start("request");
    sdk.force_flush().expect("the SDK exports");
    eprintln!("SDK flushed after {:?}", opened.elapsed());
    let (code, _) = http_get(tg.admin, "/healthz").expect("/healthz");
    assert_eq!(code, 200);
    let received = wait_for(Duration::from_secs(10), || {
        (tg.metrics().received() >= 1.0).then_some(())
    });
    assert!(received.is_some(), "the SDK's span arrived");
    let m = tg.metrics();
    for listener in ["http", "admin"] {
        let open = m.sum(
            "tailgate_connections",
            &[&format!("listener=\"{listener}\"")],
        );
        assert!(
            open >= 2000.0,
            "{listener}: {open} open; the checks above ran with the flood held ({:?} in)",
            opened.elapsed()
        );
    }

    // Past the deadline every one of them is closed by the server.
    std::thread::sleep(deadline.saturating_sub(opened.elapsed()));
    let still_open = held
        .iter_mut()
        .map(|c| closed_by_server(c, Duration::from_secs(5)))
        .filter(|closed| !closed)
        .count();
    assert_eq!(
        still_open, 0,
        "idle connections left open past the deadline"
    );
    let m = tg.metrics();
    for listener in ["http", "admin"] {
        let timed_out = m.sum(
            "tailgate_connections_timed_out_total",
            &[&format!("listener=\"{listener}\"")],
        );
        assert!(timed_out >= 2000.0, "{listener}: {timed_out} timed out");
    }
    sdk.shutdown().expect("SDK shutdown");
}

#[test]
fn connections_past_the_cap_are_closed_at_once_and_counted() {
    let tg = Tailgate::start_with(Setup {
        receivers: "[receivers.limits]\nmax_connections = 4\n",
        sections: "",
    });
    let mut held = idle(tg.http, 4);
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(tg.http).expect("the kernel still accepts");
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(5)),
        "the fifth connection is closed at once"
    );
    let refused = tg
        .metrics()
        .sum("tailgate_connections_refused_total", &["listener=\"http\""]);
    assert!(refused >= 1.0, "{refused}");
    assert_eq!(
        tg.metrics()
            .sum("tailgate_connections", &["listener=\"http\""]),
        4.0
    );
    // Once they close, the listener serves again.
    held.clear();
    let served = wait_for(Duration::from_secs(10), || {
        let mut c = TcpStream::connect(tg.http).ok()?;
        c.write_all(b"GET /v1/traces HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut reply = String::new();
        c.read_to_string(&mut reply).ok()?;
        reply.starts_with("HTTP/1.1 405").then_some(())
    });
    assert!(served.is_some(), "served again once the slots are free");
}

#[test]
fn a_trickled_head_is_cut_off_and_a_stalled_body_gets_408() {
    let tg = Tailgate::start_with(Setup {
        receivers: "[receivers.limits]\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\n",
        sections: "",
    });
    // A byte every 200 ms keeps the idle deadline moving; the head never completes.
    let mut slow = TcpStream::connect(tg.http).unwrap();
    slow.write_all(b"POST /v1/traces HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(10) {
        if slow.write_all(b"x").is_err() {
            cut = true;
            break;
        }
        slow.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(_) => {
                cut = true;
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut, "a head trickled for 10 s was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut off after {:?}",
        started.elapsed()
    );

    // A whole head, then a body that stops halfway: 408 with a google.rpc.Status.
    let mut stalled = TcpStream::connect(tg.http).unwrap();
    stalled
        .write_all(
            b"POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"resourceSpans\":",
        )
        .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = stalled.read(&mut reply).expect("a reply before the close");
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":4"), "{reply}");
    // The receiver still serves a well-formed request.
    let ok = request("svc", &[SpanSpec::new(1, 1, 0)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, _, _) = rt.block_on(post(
        tg.http,
        "application/x-protobuf",
        None,
        prost::Message::encode_to_vec(&ok),
    ));
    assert_eq!(code, 200);
}

/// With a tokens file, only requests carrying one of its bearer tokens are taken, over HTTP and
/// gRPC; the rest get 401 / UNAUTHENTICATED and are counted; a replaced file takes effect
/// without a restart; no token ever reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_bearer_tokens_are_taken_and_a_replaced_file_takes_effect() {
    let dir = TempDir::new("tokens");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# the receivers' clients\ntoken-one-7f3a\n").unwrap();
    let tg = Tailgate::start_with(Setup {
        receivers: &format!(
            "[receivers.auth]\ntokens_file = {:?}\n",
            file.display().to_string()
        ),
        sections: "",
    });
    let body = prost::Message::encode_to_vec(&request("svc", &[SpanSpec::new(1, 1, 0)]));
    let client = reqwest::Client::new();
    let send = |token: Option<&'static str>| {
        let mut req = client
            .post(format!("http://{}/v1/traces", tg.http))
            .header("content-type", "application/x-protobuf")
            .body(body.clone());
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.bytes().await.unwrap_or_default().to_vec())
        }
    };
    let (code, reply) = send(None).await;
    assert_eq!(code, 401);
    let status =
        <RpcStatus as prost::Message>::decode(reply.as_slice()).expect("a google.rpc.Status");
    assert_eq!(status.code, 16, "UNAUTHENTICATED: {}", status.message);
    assert_eq!(send(Some("wrong")).await.0, 401);
    assert_eq!(send(Some("token-one-7f3a")).await.0, 200);

    // gRPC metadata.
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let mut grpc = TraceServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .unwrap();
    let export = |token: Option<&str>| {
        let mut req = tonic::Request::new(request("svc", &[SpanSpec::new(2, 1, 0)]));
        if let Some(token) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        req
    };
    let err = grpc.export(export(None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    grpc.export(export(Some("token-one-7f3a"))).await.unwrap();

    // The file replaced as a Secret is: the old token stops working, the new one works.
    let new = dir.path().join("tokens.new");
    std::fs::write(&new, "token-two-91c0\n").unwrap();
    std::fs::rename(&new, &file).unwrap();
    let swapped = wait_for(Duration::from_secs(10), || {
        let rt = tokio::runtime::Handle::current();
        let ok = tokio::task::block_in_place(|| rt.block_on(send(Some("token-two-91c0")))).0;
        (ok == 200).then_some(())
    });
    assert!(
        swapped.is_some(),
        "the new token is taken without a restart"
    );
    assert_eq!(send(Some("token-one-7f3a")).await.0, 401);

    let m = tg.metrics();
    let refused = m.sum("tailgate_requests_total", &["outcome=\"unauthenticated\""]);
    assert!(refused >= 4.0, "{refused} refusals counted");
    assert_eq!(m.received(), 3.0, "only the authenticated requests' spans");
    let log = tg.log().join("\n");
    assert!(
        !log.contains("token-one-7f3a") && !log.contains("token-two-91c0"),
        "a token in the log:\n{log}"
    );
}

/// Requests in flight share `receivers.max_in_flight_bytes`: while one upload holds most of
/// it, the next request gets the retryable 503 with `Retry-After`, and is taken once the first
/// is gone; a request whose decoding could never fit gets 413.
#[test]
fn requests_in_flight_share_one_budget_and_one_that_never_fits_is_413() {
    let tg = Tailgate::start_with(Setup {
        receivers: "max_request_size = \"1MiB\"\nmax_in_flight_bytes = \"2MiB\"\n",
        sections: "",
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut big = SpanSpec::new(1, 1, 0);
    big.attrs = vec![("blob".into(), "x".repeat(750_000))];
    let request = request("svc", &[big]);
    let protobuf = prost::Message::encode_to_vec(&request);
    let json = tailgate::bench::encode_traces_json(&request).into_bytes();
    assert!(json.len() < 1 << 20, "within max_request_size");

    // An upload that stops at 900 KB of its 1,000,000 bytes, holding them.
    let mut slow = TcpStream::connect(tg.http).unwrap();
    slow.write_all(
        b"POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n\
          content-length: 1000000\r\n\r\n",
    )
    .unwrap();
    slow.write_all(&vec![0u8; 900_000]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (code, headers, _) = rt.block_on(post(
        tg.http,
        "application/x-protobuf",
        None,
        protobuf.clone(),
    ));
    assert_eq!(code, 503, "the budget is held by the upload");
    assert!(headers.contains_key("retry-after"));
    drop(slow);
    let taken = wait_for(Duration::from_secs(10), || {
        let (code, _, _) = rt.block_on(post(
            tg.http,
            "application/x-protobuf",
            None,
            protobuf.clone(),
        ));
        (code == 200).then_some(())
    });
    assert!(taken.is_some(), "taken once the upload is gone");

    // 750 KB of JSON and its decoding (twice more) is more than 2 MiB even alone.
    let (code, _, reply) = rt.block_on(post(tg.http, "application/json", None, json));
    assert_eq!(code, 413, "{}", String::from_utf8_lossy(&reply));
    assert!(String::from_utf8_lossy(&reply).contains("max_in_flight_bytes"));
    let m = tg.metrics();
    assert_eq!(m.received(), 1.0, "only the request that was taken");
}
