//! Where the CLI gets a state file's passphrase: `--state-passphrase-file`,
//! then `QUICNPROTOCHAT_STATE_PASSPHRASE`, then a prompt when stdin is a
//! terminal (never when it is a pipe: a script without a passphrase gets
//! an error, not a prompt it cannot answer).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::state::{StateError, Unlock};

/// The environment variable holding the passphrase.
pub const PASSPHRASE_VARIABLE: &str = "QUICNPROTOCHAT_STATE_PASSPHRASE";

/// How many times a prompt for a new passphrase asks before giving up
/// when the two entries differ.
const ATTEMPTS: usize = 3;

/// The CLI's passphrase sources, in order.
#[derive(Debug)]
pub(crate) struct CliPassphrase {
    /// `--state-passphrase-file` (or `--new-passphrase-file`).
    pub(crate) file: Option<PathBuf>,
    /// Whether `QUICNPROTOCHAT_STATE_PASSPHRASE` counts (not for a new
    /// passphrase replacing the one it holds).
    pub(crate) environment: bool,
}

impl Unlock for CliPassphrase {
    fn passphrase(&self, path: &Path, new: bool) -> Result<Zeroizing<String>, StateError> {
        if let Some(file) = &self.file {
            let text =
                Zeroizing::new(
                    std::fs::read_to_string(file).map_err(|e| StateError::PassphraseFile {
                        file: file.clone(),
                        reason: e.to_string(),
                    })?,
                );
            return Ok(Zeroizing::new(first_line(&text).to_owned()));
        }
        if let Some(value) = std::env::var_os(PASSPHRASE_VARIABLE).filter(|_| self.environment) {
            return match value.into_string() {
                Ok(text) => Ok(Zeroizing::new(text)),
                Err(_) => Err(StateError::PassphraseFile {
                    file: PathBuf::from(format!("${PASSPHRASE_VARIABLE}")),
                    reason: "it is not UTF-8".into(),
                }),
            };
        }
        if !std::io::stdin().is_terminal() {
            return Err(StateError::NoPassphrase(path.to_owned()));
        }
        prompt(path, new).map_err(|_| StateError::NoPassphrase(path.to_owned()))
    }

    fn opened_plain(&self, path: &Path) {
        note!(
            "note: {} is not encrypted; `state encrypt --state {}` encrypts it under a passphrase",
            path.display(),
            path.display()
        );
    }
}

/// A passphrase file's first line, without its line ending: what an
/// editor or `echo` leaves is not part of the passphrase.
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Asks at the terminal without echo; twice for a new file, until both
/// entries agree (a few times at most).
fn prompt(path: &Path, new: bool) -> std::io::Result<Zeroizing<String>> {
    if !new {
        return Ok(Zeroizing::new(rpassword::prompt_password(format!(
            "passphrase of {}: ",
            path.display()
        ))?));
    }
    for _ in 0..ATTEMPTS {
        let first = Zeroizing::new(rpassword::prompt_password(format!(
            "new passphrase for {}: ",
            path.display()
        ))?);
        if first.is_empty() {
            eprintln!("a state file needs a passphrase that is not empty");
            continue;
        }
        let again = Zeroizing::new(rpassword::prompt_password("the same again: ")?);
        if first == again {
            return Ok(first);
        }
        eprintln!("the two differ; once more");
    }
    Err(std::io::Error::other("no passphrase agreed on"))
}

#[cfg(test)]
mod tests {
    use super::first_line;

    #[test]
    fn a_passphrase_file_gives_its_first_line_without_the_line_ending() {
        assert_eq!(first_line("open sesame\n"), "open sesame");
        assert_eq!(first_line("open sesame\r\nsecond"), "open sesame");
        assert_eq!(first_line(" spaces kept "), " spaces kept ");
        assert_eq!(first_line(""), "");
    }
}
