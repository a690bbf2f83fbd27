//! `completions`: a shell completion script for the whole command line,
//! generated from the clap definitions so it never falls behind them.

use clap::CommandFactory;
use clap_complete::Shell as Generator;

use crate::cli::{Cli, Shell};
use crate::error::ClientError;

/// The name the script completes: the installed binary's, not the path it
/// was started from (a script for `./target/debug/...` completes nothing).
const BINARY: &str = "quicnprotochat-client";

/// `completions`: writes the script for `shell` to stdout.
pub(crate) fn completions(shell: Shell) -> Result<(), ClientError> {
    let generator = match shell {
        Shell::Bash => Generator::Bash,
        Shell::Zsh => Generator::Zsh,
        Shell::Fish => Generator::Fish,
    };
    let mut command = Cli::command();
    clap_complete::generate(generator, &mut command, BINARY, &mut std::io::stdout());
    Ok(())
}
