//! Where a state file is and how its passphrase is had: asked for only
//! when the file needs one (to open an encrypted file or make a new one),
//! so a command that never opens the state never asks.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::StateError;

/// A source of state file passphrases: the CLI's reads a file, the
/// environment or the terminal; a program may hold one in memory.
pub trait Unlock {
    /// The passphrase of the state file at `path`; `new` when the file is
    /// being made (a prompt asks twice then). No passphrase is
    /// [`StateError::NoPassphrase`].
    fn passphrase(&self, path: &Path, new: bool) -> Result<Zeroizing<String>, StateError>;

    /// Told that `path` was opened unencrypted (a file made before state
    /// files were encrypted), e.g. to suggest `state encrypt`.
    fn opened_plain(&self, _path: &Path) {}
}

/// A passphrase a program knows in advance.
#[derive(Clone)]
pub struct Passphrase(pub Zeroizing<String>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Unlock for Passphrase {
    fn passphrase(&self, path: &Path, _new: bool) -> Result<Zeroizing<String>, StateError> {
        if self.0.is_empty() {
            return Err(StateError::NoPassphrase(path.to_owned()));
        }
        Ok(self.0.clone())
    }
}

/// A state file's path with the source of its passphrase: what every
/// command that opens the state is given.
pub struct StateAccess {
    path: PathBuf,
    unlock: Box<dyn Unlock>,
}

impl std::fmt::Debug for StateAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateAccess")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StateAccess {
    /// The state file at `path`, unlocked by `unlock`.
    pub fn new(path: impl Into<PathBuf>, unlock: impl Unlock + 'static) -> StateAccess {
        StateAccess {
            path: path.into(),
            unlock: Box::new(unlock),
        }
    }

    /// The state file at `path` with a passphrase known in advance.
    pub fn with_passphrase(path: impl Into<PathBuf>, passphrase: &str) -> StateAccess {
        StateAccess::new(path, Passphrase(Zeroizing::new(passphrase.to_owned())))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn passphrase(&self, new: bool) -> Result<Zeroizing<String>, StateError> {
        let passphrase = self.unlock.passphrase(&self.path, new)?;
        if passphrase.is_empty() {
            return Err(StateError::NoPassphrase(self.path.clone()));
        }
        Ok(passphrase)
    }

    pub(super) fn opened_plain(&self) {
        self.unlock.opened_plain(&self.path);
    }
}
