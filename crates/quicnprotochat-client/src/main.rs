//! `quicnprotochat-client`: parse the command line, run the command, print
//! the error (if any) and exit non-zero on failure.

use std::process::ExitCode;

use clap::Parser;
use quicnprotochat_client::{Cli, commands};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Cap'n Proto RPC is !Send: everything runs on one LocalSet.
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
