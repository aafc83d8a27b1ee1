//! TLS and mutual TLS on the receivers with certificates the test makes (rcgen), a certificate
//! rotated on disk, the admin token, and receiver tokens bound to a tenant.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{Span as _, Tracer, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::support::*;

/// A CA and what it issues, as PEM files in a folder.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self {
            dir: dir.to_owned(),
            ca,
        };
        std::fs::write(pki.path(&format!("{name}-ca.pem")), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Issues a certificate for `localhost` and 127.0.0.1 (server) or a client, and returns
    /// (cert PEM, key PEM).
    fn issue(&self, common_name: &str, server: bool) -> (String, String) {
        let names = if server {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a certificate and key under `name`, replacing any by rename (as a Secret is).
    fn write(&self, name: &str, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
        let (cert_path, key_path) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}-key.pem")),
        );
        for (path, text) in [(&key_path, key), (&cert_path, cert)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (cert_path, key_path)
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A tracer provider exporting over OTLP/gRPC with TLS (and a client certificate for mTLS).
fn tls_provider(addr: SocketAddr, tls: ClientTlsConfig, service: &str) -> SdkTracerProvider {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("https://localhost:{}", addr.port()))
        .with_tls_config(tls)
        .with_timeout(Duration::from_secs(5))
        .build()
        .expect("build OTLP exporter");
    SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build()
}

/// One trace of one span from the SDK, exported as it ends (the simple processor logs a
/// failed export rather than returning it: the tests look at what tailgate exported).
fn sdk_export(provider: &SdkTracerProvider, name: &str) {
    let mut span = provider.tracer("e2e").start(name.to_owned());
    span.end();
    let _ = provider.force_flush();
}

/// The names of the spans the file exporter wrote.
fn exported_names(tg: &Tailgate) -> Vec<String> {
    exported_spans(&tg.exported())
        .into_iter()
        .map(|(_, s)| s.name)
        .collect()
}

/// A TLS client that trusts `ca_pem`, with a client certificate when one is given.
fn connector(ca_pem: &str, identity: Option<&(String, String)>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// POSTs a protobuf trace request over HTTP/1.1 on TLS; the status code and the certificate
/// the server presented (DER), or the handshake's error.
async fn https_post(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let io = async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    // A server that refuses the client's certificate under TLS 1.3 says so after the
    // handshake, on the first read.
    let reply = io.await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&reply);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP reply: {text:?}"))?;
    Ok((code, presented))
}

/// The OTel SDK exports over TLS; under mTLS it exports with a client certificate and a
/// client without one (or with one another CA issued) is refused and counted; a certificate
/// rotated on disk serves new connections without a restart.
#[test]
fn the_sdk_exports_over_tls_and_mtls_and_a_rotated_certificate_is_picked_up() {
    let dir = TempDir::new("tls");
    let pki = Pki::new(dir.path(), "main");
    let (cert_file, key_file) = pki.write("server", &pki.issue("tailgate", true));
    let client = pki.issue("client", false);
    let stranger_pki = Pki::new(dir.path(), "stranger");
    let stranger = stranger_pki.issue("stranger", false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let ca = Certificate::from_pem(pki.ca_pem());

    // TLS: the SDK trusts the test CA.
    let tg = Tailgate::start_with(Setup {
        receivers: &format!(
            "[receivers.tls]\ncert_file = {}\nkey_file = {}\n",
            toml_path(&cert_file),
            toml_path(&key_file)
        ),
        sections: "[buffer]\nroot_grace = \"100ms\"\n",
    });
    let provider = tls_provider(
        tg.grpc,
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("localhost"),
        "tls-svc",
    );
    sdk_export(&provider, "over-tls");
    let _ = provider.shutdown();
    let got = wait_for(Duration::from_secs(20), || {
        exported_names(&tg)
            .contains(&"over-tls".to_owned())
            .then_some(())
    });
    assert!(got.is_some(), "the span sent over TLS is exported");
    // Plain text on a TLS port is no request.
    assert!(
        http_get(tg.grpc, "/").is_err(),
        "plain HTTP on the TLS port"
    );
    drop(tg);

    // mTLS.
    let client_ca = pki.path("main-ca.pem");
    let tg = Tailgate::start_with(Setup {
        receivers: &format!(
            "[receivers.tls]\ncert_file = {}\nkey_file = {}\nclient_ca_file = {}\n",
            toml_path(&cert_file),
            toml_path(&key_file),
            toml_path(&client_ca)
        ),
        sections: "[buffer]\nroot_grace = \"100ms\"\n",
    });
    let with_cert = tls_provider(
        tg.grpc,
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("localhost")
            .identity(Identity::from_pem(&client.0, &client.1)),
        "mtls-svc",
    );
    sdk_export(&with_cert, "over-mtls");
    let _ = with_cert.shutdown();
    let without_cert = tls_provider(
        tg.grpc,
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("localhost"),
        "anonymous",
    );
    sdk_export(&without_cert, "no-cert");
    let _ = without_cert.shutdown();

    // Over HTTP too, and a certificate from another CA is refused.
    let body = request("https", &[SpanSpec::new(7, 1, 0)]).encode_to_vec();
    let (code, first_cert) = rt
        .block_on(https_post(
            tg.http,
            &connector(&pki.ca_pem(), Some(&client)),
            &body,
        ))
        .expect("POST over mTLS");
    assert_eq!(code, 200);
    for refused in [None, Some(&stranger)] {
        let got = rt.block_on(https_post(
            tg.http,
            &connector(&pki.ca_pem(), refused),
            &body,
        ));
        assert!(got.is_err(), "refused client got {got:?}");
    }

    // Rotation: a new certificate renamed over the old is served to new connections.
    pki.write("server", &pki.issue("tailgate-rotated", true));
    let rotated = wait_for(Duration::from_secs(10), || {
        let (code, cert) = rt
            .block_on(https_post(
                tg.http,
                &connector(&pki.ca_pem(), Some(&client)),
                &body,
            ))
            .ok()?;
        (code == 200 && cert != first_cert).then_some(())
    });
    assert!(rotated.is_some(), "the rotated certificate is served");

    let got = wait_for(Duration::from_secs(20), || {
        let names = exported_names(&tg);
        (names.contains(&"over-mtls".to_owned()) && !names.contains(&"no-cert".to_owned()))
            .then_some(())
    });
    assert!(got.is_some(), "{:?}", exported_names(&tg));
    let m = tg.metrics();
    let failed = m.sum("tailgate_tls_handshakes_failed_total", &[]);
    assert!(failed >= 3.0, "{failed} failed handshakes counted");
    assert_eq!(
        m.received(),
        m.kept() + m.dropped() + m.refused() + buffered(&m)
    );
}

/// Spans still in the buffer (received, not yet decided).
fn buffered(m: &Metrics) -> f64 {
    m.sum("tailgate_buffer_spans", &[])
}

/// With `admin.token_file`, `/metrics`, `/status` and `/reload` need the token; the probes do
/// not.
#[test]
fn the_admin_token_guards_metrics_status_and_reload_but_not_the_probes() {
    let dir = TempDir::new("admin-token");
    let file = dir.path().join("admin-token");
    std::fs::write(&file, "admin-secret-5d1e\n").unwrap();
    let tg = Tailgate::start(&format!(
        "[admin]\nendpoint = \"127.0.0.1:0\"\ntoken_file = {}\n",
        toml_path(&file)
    ));
    for path in ["/metrics", "/status"] {
        let (code, _) = http_get(tg.admin, path).unwrap();
        assert_eq!(code, 401, "{path} without the token");
        let (code, _) = crate::http::get_as(tg.admin, path, Some("wrong")).unwrap();
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, _) = crate::http::get_as(tg.admin, path, Some("admin-secret-5d1e")).unwrap();
        assert_eq!(code, 200, "{path} with the token");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http_get(tg.admin, path).unwrap().0,
            200,
            "{path} stays open"
        );
    }
    let reload = |token: Option<&str>| {
        let mut req = reqwest::blocking::Client::new().post(format!("http://{}/reload", tg.admin));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        std::thread::scope(|s| s.spawn(|| req.send().unwrap().status().as_u16()).join()).unwrap()
    };
    assert_eq!(reload(None), 401);
    assert_eq!(reload(Some("admin-secret-5d1e")), 200);
    assert!(
        tg.metrics_as(Some("admin-secret-5d1e"))
            .sum("tailgate_reloads_total", &[])
            >= 1.0
    );
    assert!(!tg.log().join("\n").contains("admin-secret-5d1e"));
}

/// A token bound to a tenant stamps its tenant on every span: the cost counters and the
/// exported spans show it, not the `tenant.id` the sender wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_bound_token_overrides_a_spoofed_tenant_id() {
    let dir = TempDir::new("tenant-token");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "acme-token-41 tenant=acme\nplain-token-42\n").unwrap();
    let tg = Tailgate::start_with(Setup {
        receivers: &format!("[receivers.auth]\ntokens_file = {}\n", toml_path(&file)),
        sections: "[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"keep\"\n\n\
                   [[policies]]\nname = \"cost\"\nplugin = \"llm-cost\"\n\
                   [policies.config]\nfallback = { input_per_1k = 0.003, output_per_1k = 0.015 }\n",
    });
    let llm = |n: u64, tenant: &str| {
        let mut root = SpanSpec::new(n, 1, 0);
        root.attrs = vec![("tenant.id".into(), tenant.into())];
        let mut call = SpanSpec::new(n, 2, 1);
        call.attrs = vec![
            ("tenant.id".into(), tenant.into()),
            ("gen_ai.request.model".into(), "gpt-4o".into()),
        ];
        call.ints = vec![("gen_ai.usage.input_tokens".into(), 1000)];
        // A span that claims no tenant gets the bound one too.
        let quiet = SpanSpec::new(n, 3, 1);
        request("spoofer", &[root, call, quiet]).encode_to_vec()
    };
    let client = reqwest::Client::new();
    let send = |body: Vec<u8>, token: &'static str, json: bool| {
        let req = client
            .post(format!("http://{}/v1/traces", tg.http))
            .bearer_auth(token);
        let req = if json {
            let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
            req.header("content-type", "application/json")
                .body(tailgate::bench::encode_traces_json(&request))
        } else {
            req.header("content-type", "application/x-protobuf")
                .body(body)
        };
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send(llm(1, "globex"), "acme-token-41", false).await, 200);
    assert_eq!(send(llm(2, "globex"), "acme-token-41", true).await, 200);
    // gRPC metadata binds the same way.
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let mut grpc = TraceServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .unwrap();
    let mut req = tonic::Request::new(
        ExportTraceServiceRequest::decode(llm(3, "globex").as_slice()).unwrap(),
    );
    req.metadata_mut()
        .insert("authorization", "Bearer acme-token-41".parse().unwrap());
    grpc.export(req).await.unwrap();
    // An unbound token leaves the sender's tenant alone.
    assert_eq!(send(llm(4, "initech"), "plain-token-42", false).await, 200);

    let tokens = |m: &Metrics, tenant: &str| {
        m.sum(
            "tailgate_policy_llm_input_tokens_total",
            &[&format!("tenant=\"{tenant}\"")],
        )
    };
    let m = wait_for(Duration::from_secs(20), || {
        let m = tg.metrics();
        (tokens(&m, "acme") + tokens(&m, "initech") >= 4000.0).then_some(m)
    })
    .expect("every trace is priced");
    assert_eq!(tokens(&m, "acme"), 3000.0);
    assert_eq!(tokens(&m, "initech"), 1000.0);
    assert_eq!(
        tokens(&m, "globex"),
        0.0,
        "the spoofed tenant is never counted"
    );

    let exported = wait_for(Duration::from_secs(20), || {
        let spans = exported_spans(&tg.exported());
        (spans.len() == 12).then_some(spans)
    })
    .expect("all 12 spans exported");
    for (_, span) in &exported {
        let tenants: Vec<&str> = span
            .attributes
            .iter()
            .filter(|kv| kv.key == "tenant.id")
            .filter_map(|kv| match &kv.value.as_ref()?.value {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                    Some(s.as_str())
                }
                _ => None,
            })
            .collect();
        let from_plain = span.trace_id == trace_id(4).to_vec();
        match (from_plain, span.span_id == span_id(3).to_vec()) {
            (true, true) => assert!(tenants.is_empty(), "{tenants:?}"),
            (true, false) => assert_eq!(tenants, ["initech"]),
            (false, _) => assert_eq!(tenants, ["acme"], "one tenant.id, the bound one"),
        }
    }
}

/// The exporter trusts a private CA (`ca_file`) and presents a client certificate: one
/// tailgate exports over OTLP/gRPC and OTLP/HTTP to another whose receivers require mTLS.
/// Without the client certificate the downstream refuses the handshake and nothing arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_sends_over_mtls_with_its_ca_file_and_client_certificate() {
    let dir = TempDir::new("exporter-tls");
    let pki = Pki::new(dir.path(), "main");
    let (cert_file, key_file) = pki.write("server", &pki.issue("downstream", true));
    let (client_cert, client_key) = pki.write("client", &pki.issue("upstream", false));
    let downstream = Tailgate::start_with(Setup {
        receivers: &format!(
            "[receivers.tls]\ncert_file = {}\nkey_file = {}\nclient_ca_file = {}\n",
            toml_path(&cert_file),
            toml_path(&key_file),
            toml_path(&pki.path("main-ca.pem"))
        ),
        sections: "[buffer]\nroot_grace = \"100ms\"\n",
    });
    let upstream = |grpc: bool, with_cert: bool| {
        let (kind, port) = if grpc {
            ("otlp_grpc", downstream.grpc.port())
        } else {
            ("otlp_http", downstream.http.port())
        };
        let identity = if with_cert {
            format!(
                "client_cert_file = {}\nclient_key_file = {}\n",
                toml_path(&client_cert),
                toml_path(&client_key)
            )
        } else {
            String::new()
        };
        Tailgate::start(&format!(
            "[buffer]\nroot_grace = \"100ms\"\n\n[exporter]\ntype = \"{kind}\"\n\
             endpoint = \"https://localhost:{port}\"\nca_file = {}\n{identity}\
             retry_initial_backoff = \"100ms\"\nretry_max_elapsed = \"2s\"\n",
            toml_path(&pki.path("main-ca.pem"))
        ))
    };
    for (n, grpc) in [(1u64, true), (2, false)] {
        let up = upstream(grpc, true);
        let body = request("upstream", &[SpanSpec::new(n, 1, 0)]).encode_to_vec();
        let (code, _, _) = post(up.http, "application/x-protobuf", None, body).await;
        assert_eq!(code, 200);
        let arrived = wait_for(Duration::from_secs(20), || {
            let spans = exported_spans(&downstream.exported());
            spans
                .iter()
                .any(|(_, s)| s.trace_id == trace_id(n).to_vec())
                .then_some(())
        });
        assert!(arrived.is_some(), "exported over mTLS (grpc: {grpc})");
        assert_eq!(up.metrics().exported(), 1.0);
    }
    // Without the client certificate: refused at the handshake, counted as failed upstream.
    let up = upstream(true, false);
    let body = request("upstream", &[SpanSpec::new(3, 1, 0)]).encode_to_vec();
    let (code, _, _) = post(up.http, "application/x-protobuf", None, body).await;
    assert_eq!(code, 200);
    let failed = wait_for(Duration::from_secs(30), || {
        (up.metrics().sum("tailgate_export_failed_spans_total", &[]) >= 1.0).then_some(())
    });
    assert!(
        failed.is_some(),
        "the export without a certificate gives up"
    );
    assert!(
        !exported_spans(&downstream.exported())
            .iter()
            .any(|(_, s)| s.trace_id == trace_id(3).to_vec())
    );
    assert!(
        downstream
            .metrics()
            .sum("tailgate_tls_handshakes_failed_total", &[])
            >= 1.0
    );
}
