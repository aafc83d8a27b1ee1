//! The command line: `tailgate run`, `tailgate check`, `--version`, `--help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tailgate",
    version,
    about = "Tail-sampling OpenTelemetry trace collector with sandboxed WebAssembly policies",
    long_about = "Receives OTLP traces (gRPC :4317, HTTP :4318), holds every span of a trace until \
                  the trace is complete, decides keep or drop on the whole trace, and exports \
                  kept traces over OTLP or to a file."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the collector until SIGTERM or SIGINT.
    Run {
        /// TOML config file; without it the embedded `config/agent.toml` is used (listen on
        /// 127.0.0.1:4317 and :4318, the agent policy pack, kept traces written to
        /// tailgate-data/traces.jsonl).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and exit: 0 if it is valid, 1 with the reason if not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}
