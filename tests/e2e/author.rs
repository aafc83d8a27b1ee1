//! A plugin author's path: the README's ten-line policy, in a crate outside this repo, built
//! with the README's commands (`cargo install --path plugins/build`, then
//! `tailgate-plugin-build . out/`), loaded by path, deciding traces.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prost::Message;

use crate::support::*;

/// The policy exactly as the README shows it.
const README_POLICY: &str = r#"use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy};

#[derive(serde::Deserialize)]
pub struct Config { max_tokens: f64 }
pub struct TokenBudget(f64);

impl Policy for TokenBudget {
    type Config = Config;
    fn init(c: Config) -> Result<Self, String> { Ok(TokenBudget(c.max_tokens)) }
    fn decide(&mut self, t: &Trace) -> Verdict {
        if t.sum("gen_ai.usage.input_tokens") > self.0 { Verdict::keep("over budget") } else { Verdict::abstain() }
    }
}
export_policy!(TokenBudget);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_line_policy_from_outside_the_repo_decides_traces() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let work = TempDir::new("author");
    let krate = work.path().join("token-budget");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"token-budget\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
             [lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\n[dependencies]\n\
             tailgate-plugin-sdk = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
             # A crate of its own, not part of any workspace above it.\n[workspace]\n",
            repo.join("plugin-sdk").display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(krate.join("src/lib.rs"), README_POLICY).unwrap();
    assert!(
        README_POLICY
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
            <= 13
    );

    // The README's two commands. The component goes to the crate's `out/` (in this test's
    // temp folder); the nested build's target directory is kept in the e2e tests' one plugin
    // build folder (under the cargo target directory) so repeated runs reuse the compiled SDK.
    let cli = install_build_cli(&repo);
    let out = krate.join("out");
    let built = Command::new(&cli)
        .current_dir(&krate)
        .args([".", "out/", "--target-dir"])
        .arg(plugin_build_dir().join("external-target"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", cli.display()));
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "tailgate-plugin-build failed: {stdout}\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let component = out.join("token-budget.wasm");
    assert!(component.exists(), "no {}: {stdout}", component.display());
    let inspected = Command::new(&cli)
        .arg("--inspect")
        .arg(&component)
        .output()
        .expect("tailgate-plugin-build --inspect");
    let world = String::from_utf8_lossy(&inspected.stdout);
    assert!(inspected.status.success(), "{world}");
    assert!(world.contains("ok: a tailgate:policy component"), "{world}");
    assert!(!world.contains("wasi:"), "{world}");
    let component = &component;

    let tg = Tailgate::start(&format!(
        "[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"drop\"\n\n\
         [[policies]]\nname = \"budget\"\npath = {:?}\n[policies.config]\nmax_tokens = 500\n",
        component.display().to_string()
    ));
    for (n, tokens) in [(1u64, [400, 300]), (2, [100, 50])] {
        let spans: Vec<SpanSpec> = tokens
            .iter()
            .enumerate()
            .map(|(i, _)| {
                SpanSpec::new(
                    n,
                    n * 10 + i as u64 + 1,
                    if i == 0 { 0 } else { n * 10 + 1 },
                )
            })
            .collect();
        let mut req = request("agent", &spans);
        for (span, t) in req.resource_spans[0].scope_spans[0]
            .spans
            .iter_mut()
            .zip(tokens)
        {
            span.attributes
                .push(opentelemetry_proto::tonic::common::v1::KeyValue {
                    key: "gen_ai.usage.input_tokens".into(),
                    value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                        value: Some(
                            opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(t),
                        ),
                    }),
                    key_strindex: 0,
                });
        }
        let (code, _, _) = post(tg.http, "application/x-protobuf", None, req.encode_to_vec()).await;
        assert_eq!(code, 200);
    }
    let m = wait_for(Duration::from_secs(15), || {
        let m = tg.metrics();
        (m.sum("tailgate_traces_decided_total", &[]) == 2.0).then_some(m)
    })
    .expect("both traces decided");
    assert_eq!(
        m.sum(
            "tailgate_traces_decided_total",
            &["verdict=\"keep\"", "policy=\"budget\""]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "tailgate_traces_decided_total",
            &["verdict=\"drop\"", "policy=\"default\""]
        ),
        1.0
    );
    let spans = wait_for(Duration::from_secs(10), || {
        let s = exported_spans(&tg.exported());
        (s.len() == 2).then_some(s)
    })
    .expect("the 700-token trace exported");
    assert!(
        spans
            .iter()
            .all(|(_, s)| s.trace_id == trace_id(1).to_vec())
    );
    assert!(
        spans
            .iter()
            .all(|(_, s)| attr(s, "sampling.reason") == Some("over budget"))
    );
}

/// `cargo install --path plugins/build`, as the README tells an author, into a root in the e2e
/// tests' plugin build folder (its own target directory, so it never waits on the running
/// `cargo test`). Returns the installed `tailgate-plugin-build`.
fn install_build_cli(repo: &Path) -> PathBuf {
    let root = plugin_build_dir().join("cli");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .arg("install")
        .arg("--path")
        .arg(repo.join("plugins/build"))
        .arg("--root")
        .arg(&root)
        .arg("--target-dir")
        .arg(root.join("build"))
        // Debug is enough for a test and builds faster; the README's release build is the
        // same code.
        .args(["--debug", "--locked", "--quiet"])
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run cargo install");
    assert!(
        status.success(),
        "cargo install --path plugins/build failed"
    );
    root.join("bin/tailgate-plugin-build")
}
