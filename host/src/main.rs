use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tailgate::cli::{Cli, Command, LoadgenArgs};
use tailgate::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Loadgen(args) => loadgen(&args),
        Command::Check { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Load the policies too (compile, type-check, init with their config), so a
            // policy that would be refused at start is reported here.
            let base_dir = tailgate::plugin::reload::base_dir_of(Some(&path));
            let mut dry = config.clone();
            dry.plugins.cache_dir = Default::default(); // a check writes nothing
            if let Err(e) = tailgate::plugin::PolicyRuntime::start(&dry, &base_dir) {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!(
                "{}: ok ({} policies)",
                path.display(),
                config.policies.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let config_path = config.clone();
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Config::parse(
                    tailgate::config::EMBEDDED,
                    tailgate::config::EMBEDDED_SOURCE,
                ),
            };
            let config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&config);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("tailgate-io")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tailgate::app::run(config, config_path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `tailgate loadgen`: the run, its JSON summary on stdout (and in --report), exit 1 unless
/// every span was accepted.
fn loadgen(args: &LoadgenArgs) -> ExitCode {
    let plan = args.plan();
    let result = match &args.out {
        Some(path) => tailgate::loadgen::write_requests(&plan, path),
        None => {
            // Worker threads: one per connection up to the cores; the load generator must not
            // take more of the machine than its connections can use.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .worker_threads(plan.connections.clamp(1, cores))
                .thread_name("tailgate-loadgen")
                .build();
            match runtime {
                Ok(r) => r.block_on(tailgate::loadgen::send(&plan)),
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string(&summary) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("error: cannot encode the summary: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &args.report {
        let written = serde_json::to_string_pretty(&summary)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(path, text + "\n"));
        if let Err(e) = written {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    for e in &summary.errors {
        eprintln!("loadgen: {e}");
    }
    if summary.spans_accepted == summary.seq_count {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
