use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tailgate::cli::{Cli, Command};
use tailgate::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
