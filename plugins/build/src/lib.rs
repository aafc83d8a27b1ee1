//! # tailgate-plugin-build
//!
//! Turns tailgate policy crates into WebAssembly components. This crate owns
//! the whole path from Rust source to a `.wasm` component the host can load:
//!
//! 1. find the policy crates (every `cdylib` package in a directory, via
//!    `cargo metadata`);
//! 2. run a nested `cargo build --release --target wasm32-unknown-unknown`
//!    for each, in its own target directory and with the outer build's
//!    environment (flags, wrappers, build-script variables) cleared;
//! 3. encode each core module into a component with `wit-component`;
//! 4. check that the component imports nothing but the `tailgate:policy`
//!    contract and exports `init` and `decide`;
//! 5. write `<out>/<package-name>.wasm`.
//!
//! It is used two ways: from the host's `build.rs` through [`Builder`] (with
//! [`Builder::emit_cargo_directives`] so Cargo reruns it only when plugin
//! sources change), and as the `tailgate-plugin-build` CLI for plugin authors.
//!
//! Why a nested Cargo and not a `[lib] crate-type` trick: the host and the
//! plugins are built for different targets, and Cargo cannot build one
//! package for two targets in a single invocation without `-Zbindeps`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The only target Rust policies are built for: it has no WASI, so the
/// encoded component imports nothing the contract does not define.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// The WIT package every import must come from.
pub const POLICY_PACKAGE: &str = tailgate_plugin_sdk::CONTRACT_PACKAGE;

/// The contract version this build step produces components for: the SDK's, read from the WIT.
pub const POLICY_VERSION: &str = tailgate_plugin_sdk::CONTRACT_VERSION;

/// A policy crate found by [`discover`].
#[derive(Clone, Debug)]
pub struct PluginCrate {
    /// Cargo package name; also the name of the output `<name>.wasm`.
    pub name: String,
    /// Name of the `cdylib` target (the core module is `<lib_name>.wasm`).
    pub lib_name: String,
    pub manifest_path: PathBuf,
    /// Directories whose changes should rebuild this plugin: its own and
    /// those of its path dependencies (such as the SDK).
    pub watch_paths: Vec<PathBuf>,
    /// Root of the Cargo workspace the crate belongs to.
    pub workspace_root: PathBuf,
    /// That workspace's target directory, as `cargo metadata` reports it.
    pub target_directory: PathBuf,
}

/// One component written by [`Builder::build`].
#[derive(Clone, Debug)]
pub struct BuiltPlugin {
    pub name: String,
    /// `<out>/<name>.wasm`, the component.
    pub component: PathBuf,
    pub component_size: u64,
    /// The core module Cargo produced (inside the nested target directory).
    pub core_module: PathBuf,
    pub core_size: u64,
    /// The component's imports, e.g. `tailgate:policy/host@0.4.0`.
    pub imports: Vec<String>,
    /// The component's exports: `init`, `decide`.
    pub exports: Vec<String>,
}

/// Builds every policy crate of a directory into components.
///
/// ```no_run
/// // In the host's build.rs:
/// let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
/// let built = tailgate_plugin_build::Builder::new("../plugins", out.join("plugins"))
///     .emit_cargo_directives(true)
///     .build()
///     .unwrap_or_else(|e| panic!("{e:#}"));
/// ```
#[derive(Clone, Debug)]
pub struct Builder {
    plugins_dir: PathBuf,
    out_dir: PathBuf,
    target_dir: Option<PathBuf>,
    cargo: Option<PathBuf>,
    rustc: Option<PathBuf>,
    rustflags: Vec<String>,
    only: Option<Vec<String>>,
    cargo_directives: bool,
    locked: bool,
}

impl Builder {
    /// `plugins_dir` is either one policy crate, a workspace, or a directory
    /// whose subdirectories are crates (non-`cdylib` ones are skipped).
    pub fn new(plugins_dir: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        Builder {
            plugins_dir: plugins_dir.into(),
            out_dir: out_dir.into(),
            target_dir: None,
            cargo: None,
            rustc: None,
            rustflags: Vec::new(),
            only: None,
            cargo_directives: false,
            locked: false,
        }
    }

    /// Target directory of the nested build. Default:
    /// `<workspace target dir>/tailgate-plugins`, which is shared by every
    /// profile of the outer build (so Wasm dependencies compile once) and is
    /// distinct from the outer build's own directories (so the nested Cargo
    /// never waits on the outer one's lock).
    pub fn target_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.target_dir = Some(dir.into());
        self
    }

    /// The `cargo` to run. Default: `$CARGO` (the Cargo running the outer
    /// build, or `cargo run`), else `cargo` from `PATH`.
    pub fn cargo(mut self, cargo: impl Into<PathBuf>) -> Self {
        self.cargo = Some(cargo.into());
        self
    }

    /// The `rustc` used to check that the Wasm target is installed. Default:
    /// `$RUSTC`, else `rustc` from `PATH`.
    pub fn rustc(mut self, rustc: impl Into<PathBuf>) -> Self {
        self.rustc = Some(rustc.into());
        self
    }

    /// Flags for the Wasm build. Default: none. Passed as
    /// `CARGO_ENCODED_RUSTFLAGS`, which overrides `RUSTFLAGS` and every
    /// `rustflags` in Cargo config files, so the Wasm build is the same
    /// whatever the outer build or the machine's config uses.
    pub fn rustflags(mut self, flags: Vec<String>) -> Self {
        self.rustflags = flags;
        self
    }

    /// Build only these packages.
    pub fn only(mut self, names: Vec<String>) -> Self {
        self.only = Some(names);
        self
    }

    /// Print `cargo:rerun-if-changed=` lines for everything the components
    /// depend on (for use in a build script).
    pub fn emit_cargo_directives(mut self, yes: bool) -> Self {
        self.cargo_directives = yes;
        self
    }

    /// Pass `--locked` to the nested build.
    pub fn locked(mut self, yes: bool) -> Self {
        self.locked = yes;
        self
    }

    /// Find, build, encode, check and write every plugin.
    pub fn build(&self) -> Result<Vec<BuiltPlugin>> {
        let mut plugins = discover(&self.plugins_dir)?;
        if let Some(only) = &self.only {
            for name in only {
                if !plugins.iter().any(|p| &p.name == name) {
                    bail!(
                        "no policy crate named `{name}` in {}",
                        self.plugins_dir.display()
                    );
                }
            }
            plugins.retain(|p| only.contains(&p.name));
        }
        if self.cargo_directives {
            for path in watch_paths(&self.plugins_dir, &plugins) {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        if plugins.is_empty() {
            return Ok(Vec::new());
        }
        ensure_wasm_target(&self.rustc_path())?;
        std::fs::create_dir_all(&self.out_dir)
            .with_context(|| format!("creating {}", self.out_dir.display()))?;
        plugins.iter().map(|p| self.build_one(p)).collect()
    }

    fn cargo_path(&self) -> PathBuf {
        self.cargo
            .clone()
            .or_else(|| std::env::var_os("CARGO").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("cargo"))
    }

    fn rustc_path(&self) -> PathBuf {
        self.rustc
            .clone()
            .or_else(|| std::env::var_os("RUSTC").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("rustc"))
    }

    fn build_one(&self, plugin: &PluginCrate) -> Result<BuiltPlugin> {
        let target_dir = self
            .target_dir
            .clone()
            .unwrap_or_else(|| plugin.target_directory.join("tailgate-plugins"));
        let core_module = self.cargo_build(plugin, &target_dir)?;
        let core = std::fs::read(&core_module)
            .with_context(|| format!("reading {}", core_module.display()))?;
        let component = encode_component(&core).with_context(|| {
            format!(
                "encoding plugin `{}` ({}) into a component. Every import of the core \
                 module must come from the tailgate:policy WIT: crates that need \
                 wasm-bindgen or WASI cannot be used in a policy",
                plugin.name,
                core_module.display()
            )
        })?;
        let world = inspect_component(&component)
            .with_context(|| format!("inspecting the component of plugin `{}`", plugin.name))?;
        check_policy_world(&world).with_context(|| format!("plugin `{}`", plugin.name))?;
        let out = self.out_dir.join(format!("{}.wasm", plugin.name));
        write_atomically(&out, &component)?;
        Ok(BuiltPlugin {
            name: plugin.name.clone(),
            component: out,
            component_size: component.len() as u64,
            core_module,
            core_size: core.len() as u64,
            imports: world.imports,
            exports: world.exports,
        })
    }

    /// Runs the nested Cargo and returns the path of the core module.
    fn cargo_build(&self, plugin: &PluginCrate, target_dir: &Path) -> Result<PathBuf> {
        let mut cmd = Command::new(self.cargo_path());
        clear_outer_build_env(&mut cmd);
        cmd.current_dir(&plugin.workspace_root)
            .arg("build")
            .arg("--release")
            .args(["--target", TARGET])
            .arg("--manifest-path")
            .arg(&plugin.manifest_path)
            .args(["-p", &plugin.name])
            .arg("--target-dir")
            .arg(target_dir)
            .arg("--message-format=json-render-diagnostics")
            // Size and speed of the component matter more than build time,
            // and the host's own release profile (debug info for
            // backtraces) must not bloat the Wasm. `strip = "debuginfo"`
            // keeps the name section, so traps still name functions.
            .args(["--config", "profile.release.debug=false"])
            .args(["--config", "profile.release.strip=\"debuginfo\""])
            .args(["--config", "profile.release.lto=true"])
            .args(["--config", "profile.release.codegen-units=1"])
            .args(["--config", "profile.release.opt-level=3"])
            .env("CARGO_ENCODED_RUSTFLAGS", self.rustflags.join("\u{1f}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if self.locked {
            cmd.arg("--locked");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {:?}", self.cargo_path()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut artifact = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo's output")?;
            let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != *plugin.lib_name {
                continue;
            }
            let is_cdylib = msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
            if !is_cdylib {
                continue;
            }
            if let Some(files) = msg["filenames"].as_array() {
                artifact = files
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|f| f.ends_with(".wasm"))
                    .map(PathBuf::from);
            }
        }
        let status = child.wait().context("waiting for cargo")?;
        if !status.success() {
            bail!(
                "`cargo build --release --target {TARGET} -p {}` failed ({status}); \
                 the compiler's messages are above",
                plugin.name
            );
        }
        artifact.with_context(|| {
            format!(
                "cargo built `{}` but reported no .wasm artifact: is its [lib] \
                 crate-type [\"cdylib\", \"rlib\"]?",
                plugin.name
            )
        })
    }
}

/// Whether an environment variable of the outer build must not reach the
/// nested one. Cleared: everything Cargo sets for build scripts (`CARGO_*`,
/// `TARGET`, `OUT_DIR`, ...), flags (`RUSTFLAGS`, `CARGO_ENCODED_RUSTFLAGS`,
/// `CARGO_BUILD_RUSTFLAGS`, `CARGO_TARGET_<triple>_*`), wrappers
/// (`RUSTC_WRAPPER`, `RUSTC_WORKSPACE_WRAPPER`, e.g. clippy-driver or
/// sccache) and coverage settings. Kept: where Cargo finds its registry and
/// network settings (`CARGO_HOME`, `CARGO_NET_*`, `CARGO_HTTP_*`,
/// `CARGO_REGISTRIES_*`, `CARGO_REGISTRY_*`), terminal settings, and
/// `CARGO_MAKEFLAGS`, so the nested build joins the outer jobserver and the
/// two together stay within `-j`. `RUSTC` and `RUSTUP_TOOLCHAIN` are kept so
/// the nested build uses the outer build's toolchain.
pub fn is_outer_build_var(name: &str) -> bool {
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const KEEP: &[&str] = &["CARGO_HOME", "CARGO_MAKEFLAGS"];
    const CLEAR: &[&str] = &[
        "CARGO",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
        "LLVM_PROFILE_FILE",
    ];
    if name.starts_with("CARGO_") {
        return !(KEEP.contains(&name) || KEEP_PREFIXES.iter().any(|p| name.starts_with(p)));
    }
    CLEAR.contains(&name) || name.starts_with("CARGO_LLVM_COV")
}

fn clear_outer_build_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if let Some(n) = name.to_str()
            && is_outer_build_var(n)
        {
            cmd.env_remove(&name);
        }
    }
}

/// Fails with a clear message when the Wasm target's standard library is not
/// installed for the toolchain `rustc` belongs to.
pub fn ensure_wasm_target(rustc: &Path) -> Result<()> {
    let out = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .env_remove("RUSTC_WRAPPER")
        .output()
        .with_context(|| format!("running {} --print target-libdir", rustc.display()))?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let has_core = out.status.success()
        && std::fs::read_dir(&libdir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libcore-") && name.ends_with(".rlib")
            })
        });
    if !has_core {
        bail!(
            "the Rust target {TARGET} is not installed for this toolchain \
             ({} found no standard library in {:?}). Run `rustup target add {TARGET}`",
            rustc.display(),
            libdir
        );
    }
    Ok(())
}

/// Finds the policy crates under `dir`: `dir` itself if it is a package or a
/// workspace, else each subdirectory with a `Cargo.toml`. A policy crate is a
/// package with a `cdylib` target; others (such as this crate) are skipped.
pub fn discover(dir: &Path) -> Result<Vec<PluginCrate>> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("plugins directory {}", dir.display()))?;
    let manifests: Vec<PathBuf> = if dir.join("Cargo.toml").is_file() {
        vec![dir.join("Cargo.toml")]
    } else {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .flatten()
            .map(|e| e.path().join("Cargo.toml"))
            .filter(|m| m.is_file())
            .collect();
        found.sort();
        found
    };
    let mut seen = BTreeSet::new();
    let mut plugins = Vec::new();
    for manifest in manifests {
        if seen.contains(&manifest) {
            continue;
        }
        let meta = cargo_metadata(&manifest)?;
        let workspace_root = PathBuf::from(meta["workspace_root"].as_str().unwrap_or_default());
        let target_directory = PathBuf::from(meta["target_directory"].as_str().unwrap_or_default());
        for pkg in meta["packages"].as_array().into_iter().flatten() {
            let pkg_manifest = PathBuf::from(pkg["manifest_path"].as_str().unwrap_or_default());
            let pkg_manifest = pkg_manifest.canonicalize().unwrap_or(pkg_manifest);
            if !pkg_manifest.starts_with(&dir) || !seen.insert(pkg_manifest.clone()) {
                continue;
            }
            let cdylib = pkg["targets"].as_array().into_iter().flatten().find(|t| {
                t["crate_types"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c == "cdylib"))
            });
            let Some(cdylib) = cdylib else { continue };
            let crate_dir = pkg_manifest.parent().unwrap_or(&dir).to_path_buf();
            let mut watch_paths = vec![crate_dir];
            for dep in pkg["dependencies"].as_array().into_iter().flatten() {
                if let Some(path) = dep["path"].as_str() {
                    watch_paths.push(PathBuf::from(path));
                }
            }
            plugins.push(PluginCrate {
                name: pkg["name"].as_str().unwrap_or_default().to_owned(),
                lib_name: cdylib["name"].as_str().unwrap_or_default().to_owned(),
                manifest_path: pkg_manifest,
                watch_paths,
                workspace_root: workspace_root.clone(),
                target_directory: target_directory.clone(),
            });
        }
        seen.insert(manifest);
    }
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(plugins)
}

/// Every path a build script must watch so that the components are rebuilt
/// exactly when an input changes: the plugins directory (new plugins, and
/// all their sources: Cargo scans a directory recursively), each plugin's
/// path dependencies (the SDK and its WIT), and each workspace's
/// `Cargo.toml` and `Cargo.lock`.
pub fn watch_paths(plugins_dir: &Path, plugins: &[PluginCrate]) -> Vec<PathBuf> {
    let mut paths = BTreeSet::new();
    paths.insert(plugins_dir.to_path_buf());
    for p in plugins {
        paths.extend(p.watch_paths.iter().cloned());
        paths.insert(p.workspace_root.join("Cargo.toml"));
        paths.insert(p.workspace_root.join("Cargo.lock"));
    }
    paths.into_iter().collect()
}

fn cargo_metadata(manifest: &Path) -> Result<Value> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    // Metadata compiles nothing, so only wrappers are cleared; CARGO_TARGET_DIR
    // is deliberately kept so `target_directory` matches the outer build.
    let out = Command::new(&cargo)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .arg("--manifest-path")
        .arg(manifest)
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cargo:?} metadata"))?;
    if !out.status.success() {
        bail!(
            "`cargo metadata --manifest-path {}` failed: {}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing cargo metadata output")
}

/// Encodes a core Wasm module built with the SDK (which embeds the WIT world
/// in a `component-type` custom section) into a validated component.
pub fn encode_component(core_module: &[u8]) -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(core_module)?
        .validate(true)
        .encode()
}

/// A component's interface as WIT names, plus the full WIT text.
#[derive(Clone, Debug)]
pub struct ComponentWorld {
    /// Imported interfaces (`tailgate:policy/host@0.4.0`) and functions.
    pub imports: Vec<String>,
    /// Exported interfaces and functions (`init`, `decide`).
    pub exports: Vec<String>,
    /// The component's world printed as WIT (what
    /// `wasm-tools component wit` shows).
    pub wit: String,
}

/// Reads the world a component implements.
pub fn inspect_component(component: &[u8]) -> Result<ComponentWorld> {
    let decoded = wit_component::decode(component)?;
    let (resolve, world) = match &decoded {
        wit_component::DecodedWasm::Component(resolve, world) => (resolve, *world),
        wit_component::DecodedWasm::WitPackage(..) => {
            bail!("this is a WIT package, not a component")
        }
    };
    let names = |items: &wit_parser::IndexMap<wit_parser::WorldKey, wit_parser::WorldItem>| {
        items
            .iter()
            .filter(|(_, item)| !matches!(item, wit_parser::WorldItem::Type { .. }))
            .map(|(key, _)| resolve.name_world_key(key))
            .collect::<Vec<_>>()
    };
    let w = &resolve.worlds[world];
    let imports = names(&w.imports);
    let exports = names(&w.exports);
    let main = decoded.package();
    let nested: Vec<_> = resolve
        .packages
        .iter()
        .map(|(id, _)| id)
        .filter(|id| *id != main)
        .collect();
    let mut printer = wit_component::WitPrinter::default();
    printer.print(resolve, main, &nested)?;
    Ok(ComponentWorld {
        imports,
        exports,
        wit: printer.output.to_string(),
    })
}

/// Checks that a component is a policy for this contract version: every
/// import from `tailgate:policy@0.4.0`, and `init`, `decide` and
/// `decide-summaries` exported.
pub fn check_policy_world(world: &ComponentWorld) -> Result<()> {
    let prefix = format!("{POLICY_PACKAGE}/");
    let suffix = format!("@{POLICY_VERSION}");
    let foreign: Vec<&String> = world
        .imports
        .iter()
        .filter(|i| !i.starts_with(&prefix))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "the component imports {foreign:?}, which tailgate does not provide \
             (only {POLICY_PACKAGE} interfaces are). Build Rust policies for \
             {TARGET}, not a WASI target"
        );
    }
    if let Some(i) = world.imports.iter().find(|i| !i.ends_with(&suffix)) {
        bail!("the component imports `{i}`, but this build step targets {POLICY_PACKAGE}{suffix}");
    }
    for export in ["init", "decide", "decide-summaries"] {
        if !world.exports.iter().any(|e| e == export) {
            bail!(
                "the component does not export `{export}` (exports: {:?}); did the crate \
                 call `tailgate_plugin_sdk::export_policy!`?",
                world.exports
            );
        }
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    // A host watching the output directory must never load half a file.
    let tmp = path.with_extension("wasm.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_build_variables_are_cleared_and_registry_settings_kept() {
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "CARGO_CFG_TARGET_ARCH",
            "CARGO_FEATURE_STD",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_LLVM_COV_TARGET_DIR",
            "CARGO",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "OUT_DIR",
            "TARGET",
            "LLVM_PROFILE_FILE",
        ] {
            assert!(is_outer_build_var(var), "{var} should be cleared");
        }
        for var in [
            "CARGO_HOME",
            "CARGO_NET_OFFLINE",
            "CARGO_HTTP_TIMEOUT",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "CARGO_TERM_COLOR",
            "CARGO_MAKEFLAGS",
            "RUSTC",
            "RUSTUP_TOOLCHAIN",
            "PATH",
            "HOME",
        ] {
            assert!(!is_outer_build_var(var), "{var} should be kept");
        }
    }

    #[test]
    fn a_missing_wasm_target_names_the_rustup_command() {
        // A stand-in rustc whose target libdir has no standard library.
        let dir = std::env::temp_dir().join(format!("tpb-fake-rustc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rustc = dir.join("rustc");
        std::fs::write(
            &rustc,
            format!("#!/bin/sh\necho {}/nowhere\n", dir.display()),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&rustc, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let err = ensure_wasm_target(&rustc).unwrap_err().to_string();
        assert!(
            err.contains("rustup target add wasm32-unknown-unknown"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn foreign_imports_and_missing_exports_are_refused() {
        let ok = ComponentWorld {
            imports: vec!["tailgate:policy/host@0.4.0".into()],
            exports: vec!["init".into(), "decide".into(), "decide-summaries".into()],
            wit: String::new(),
        };
        check_policy_world(&ok).unwrap();
        let wasi = ComponentWorld {
            imports: vec!["wasi:filesystem/types@0.2.0".into()],
            ..ok.clone()
        };
        let err = check_policy_world(&wasi).unwrap_err().to_string();
        assert!(err.contains("wasi:filesystem/types@0.2.0"), "{err}");
        // A component built for the previous contract (0.3.0: the trace a resource, reasons strings).
        let other_version = ComponentWorld {
            imports: vec!["tailgate:policy/host@0.3.0".into()],
            ..ok.clone()
        };
        assert!(check_policy_world(&other_version).is_err());
        let no_decide = ComponentWorld {
            exports: vec!["init".into()],
            ..ok
        };
        let err = check_policy_world(&no_decide).unwrap_err().to_string();
        assert!(err.contains("decide"), "{err}");
    }
}
