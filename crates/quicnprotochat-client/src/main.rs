//! `quicnprotochat-client`: parse the command line, run the command, print
//! the error (if any, as JSON with `--json`) and exit with the code of its
//! kind (docs/cli.md, "Scripting").

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use quicnprotochat_client::error::{Category, error_object};
use quicnprotochat_client::{Cli, commands, output};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    output::set_json(cli.json);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            fail(
                "runtime",
                Category::Local,
                &format!("cannot start the async runtime: {e}"),
            );
            return ExitCode::from(Category::Local.exit_code());
        }
    };
    // Cap'n Proto RPC is !Send: everything runs on one LocalSet.
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if output::json() {
                eprintln!("{}", e.report());
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// A command line clap refused: its own message (help and `--version` are
/// not failures), or with `--json` anywhere on it, a `usage` error object.
fn usage_error(error: clap::Error) -> ExitCode {
    let asked_json = std::env::args_os().skip(1).any(|arg| arg == "--json");
    if matches!(error.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) || !asked_json {
        let _ = error.print();
        return ExitCode::from(error.exit_code().clamp(0, 255) as u8);
    }
    // clap's rendering starts with "error: " and ends with usage lines;
    // the object carries its first line.
    let rendered = error.to_string();
    let first = rendered.lines().next().unwrap_or_default();
    let text = first.strip_prefix("error: ").unwrap_or(first);
    fail("usage", Category::BadInput, text);
    ExitCode::from(Category::BadInput.exit_code())
}

/// Reports a failure that is not a command's own error.
fn fail(kind: &str, category: Category, message: &str) {
    if output::json() || std::env::args_os().any(|arg| arg == "--json") {
        eprintln!("{}", error_object(kind, category, message));
    } else {
        eprintln!("error: {message}");
    }
}
