//! `tailgate-plugin-build`: the command-line face of the build step.
//!
//! ```text
//! tailgate-plugin-build <CRATE_OR_PLUGINS_DIR> <OUT_DIR> [--target-dir DIR] [--only NAME]... [--locked]
//! tailgate-plugin-build --inspect <COMPONENT.wasm>
//! ```
//!
//! Argument parsing is by hand: the crate is also a build-dependency of the
//! host and should stay light.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use tailgate_plugin_build::{Builder, check_policy_world, inspect_component};

const USAGE: &str = "\
usage: tailgate-plugin-build <CRATE_OR_PLUGINS_DIR> <OUT_DIR> [--target-dir DIR] [--only NAME]... [--locked]
       tailgate-plugin-build --inspect <COMPONENT.wasm>

Builds each policy crate (a cdylib depending on tailgate-plugin-sdk) for
wasm32-unknown-unknown and writes <OUT_DIR>/<crate-name>.wasm components.
--inspect prints a component's WIT world and checks it is a tailgate policy.";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let mut positional = Vec::new();
    let mut target_dir = None;
    let mut only = Vec::new();
    let mut locked = false;
    let mut inspect = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--target-dir" => target_dir = Some(it.next().context("--target-dir needs a value")?),
            "--only" => only.push(it.next().context("--only needs a value")?),
            "--locked" => locked = true,
            "--inspect" => inspect = Some(it.next().context("--inspect needs a file")?),
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            _ => positional.push(arg),
        }
    }
    if let Some(file) = inspect {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {file}"))?;
        let world = inspect_component(&bytes)?;
        println!("{}", world.wit);
        println!("// imports: {:?}", world.imports);
        println!("// exports: {:?}", world.exports);
        check_policy_world(&world)?;
        println!("// ok: a tailgate:policy component");
        return Ok(());
    }
    let [dir, out] = <[String; 2]>::try_from(positional)
        .map_err(|_| anyhow::anyhow!("expected two arguments\n{USAGE}"))?;
    let mut builder = Builder::new(&dir, &out).locked(locked);
    if let Some(t) = target_dir {
        builder = builder.target_dir(PathBuf::from(t));
    }
    if !only.is_empty() {
        builder = builder.only(only);
    }
    let built = builder.build()?;
    if built.is_empty() {
        bail!("no policy crates (packages with a cdylib target) found in {dir}");
    }
    for p in built {
        println!(
            "{}: {} ({} bytes; core module {} bytes) imports {:?}",
            p.name,
            p.component.display(),
            p.component_size,
            p.core_size,
            p.imports
        );
    }
    Ok(())
}
