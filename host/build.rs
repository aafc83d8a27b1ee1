//! Builds the bundled policies in `plugins/` into WebAssembly components and embeds them, so
//! `plugin = "keep-errors"` works from the binary alone. Plugins are always built from source:
//! no `.wasm` is ever committed. Reruns only when plugin or SDK sources change.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let plugins_dir = manifest.join("../plugins");
    let built = tailgate_plugin_build::Builder::new(&plugins_dir, out.join("plugins"))
        .emit_cargo_directives(true)
        .build()
        .unwrap_or_else(|e| panic!("building the bundled policies failed: {e:#}"));
    let mut code = String::from(
        "/// (name, component bytes) of every bundled policy.\npub static BUNDLED: &[(&str, &[u8])] = &[\n",
    );
    for plugin in &built {
        writeln!(
            code,
            "    ({:?}, include_bytes!({:?})),",
            plugin.name,
            plugin.component.display().to_string()
        )
        .expect("write to String");
    }
    code.push_str("];\n");
    std::fs::write(out.join("bundled_plugins.rs"), code).expect("write bundled_plugins.rs");
}
