//! The client's state file: one SQLite database holding the identity, the
//! groups this client is in, a local inbox, and (through
//! `openmls_sqlite_storage`) all MLS state.
//!
//! A state file is encrypted (SQLCipher, under a key derived from a
//! passphrase; see `cipher`) and opened only after a read-only check that
//! the key opens it and that it is ours and intact, so a wrong passphrase,
//! a wrong path or a corrupt file is reported and never written. A file
//! made before encryption still opens, and [`StateFile::encrypt`]
//! converts it.
//!
//! Changes that must happen together (an MLS state change and the row that
//! records it) are one method here, each one transaction; callers never
//! open transactions themselves.
//!
//! # Layout
//! - `access` — a file's path with the source of its passphrase.
//! - `cipher` — the file's encryption: what a file is, its key.
//! - `provider` — the OpenMLS provider over the state file's connection.
//! - `schema` — our tables' numbered migrations and the ownership check.
//! - `groups` — the groups we are in and the current group; creating,
//!   leaving and rejoining one.
//! - `inbox` — fetched payloads waiting to be processed (with the node's
//!   sequence number), each applied and removed in one transaction.
//! - `outbox` — group changes staged or sent whose answer has not come yet:
//!   staged with their pending Commit and the new epoch's GroupInfo,
//!   settled (merged or discarded) by the node's answer; rejoins, kept or
//!   deleted by it.
//! - `key_packages` — KeyPackages made with their private keys stored.
//! - `contacts` — names for identity keys.
//! - `devices` — the user key, the device lists seen, a new device's
//!   pending link, and the leaf keys its linking device made.
//! - `history` — sent and received application messages.

mod access;
mod cipher;
mod contacts;
mod devices;
mod groups;
mod history;
mod inbox;
mod invitations;
pub use inbox::{InboxEntry, KeptBack};
pub use invitations::{Invitation, KeptWelcome, MAX_INVITATION_BYTES, MAX_INVITATIONS, NotKept};
mod key_packages;
mod outbox;
mod provider;
mod schema;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use quicnprotochat_core::{CoreError, GroupId, IdentityKey, IdentityKeypair};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use cipher::{FileKey, Format};

pub use access::{Passphrase, StateAccess, Unlock};
pub use history::{Direction, HistoryEntry, SentMessage};
pub use outbox::{Publication, Settlement};
pub use provider::{JsonCodec, StateProvider};

/// Errors opening or using a state file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file does not exist.
    #[error("state file {0} not found; create it with `register-state --state {0}`")]
    Missing(PathBuf),
    /// The file is encrypted, or is to be made, and no passphrase was
    /// given.
    #[error(
        "{0} needs its passphrase (state files are encrypted): type it at the prompt, or set QUICNPROTOCHAT_STATE_PASSPHRASE, or pass --state-passphrase-file FILE"
    )]
    NoPassphrase(PathBuf),
    /// The passphrase file (or variable) could not be read.
    #[error("cannot read the state file's passphrase from {}: {reason}", .file.display())]
    PassphraseFile {
        /// The file (or `$VARIABLE`).
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// The passphrase given does not open the file.
    #[error(
        "the passphrase does not open {0} (or it is not a state file: its first page does not decrypt); it was left untouched"
    )]
    WrongPassphrase(PathBuf),
    /// The file is not a quicnprotochat state file, or is damaged.
    #[error("{path} is not a usable quicnprotochat state file ({reason}); it was left untouched")]
    NotAStateFile {
        /// The file.
        path: PathBuf,
        /// What the check found.
        reason: String,
    },
    /// The file was written by a newer client.
    #[error("{path} has schema version {found}, newer than this client understands ({supported}); upgrade")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The file has no identity yet.
    #[error("{0} holds no identity; run `register-state --state {0}` first")]
    NoIdentity(PathBuf),
    /// The file is a new device waiting for its link.
    #[error(
        "{0} is a new device waiting to be linked: run `devices add CODE` on one of your devices with the code `link` printed, then `recv --state {0}` here"
    )]
    LinkPending(PathBuf),
    /// The file already belongs to a user, so it cannot become a new device.
    #[error("{0} already holds a user and device; `link` needs a new state file")]
    AlreadyRegistered(PathBuf),
    /// A contact name is taken or unknown, or a key already has a name.
    #[error("{0}")]
    Contact(String),
    /// The stored identity key is damaged.
    #[error("{0}: the stored identity key is damaged")]
    BadIdentity(PathBuf),
    /// OpenMLS' storage tables could not be created or migrated.
    #[error("migrating MLS storage tables: {0}")]
    Migration(String),
    /// Our own tables could not be migrated.
    #[error("migrating the state file's tables: {0}")]
    Schema(quicnprotochat_sqlite::MigrationError),
    /// A stored row does not hold what we wrote.
    #[error("the state file is damaged: {0}")]
    Damaged(String),
    /// An MLS operation on the stored state failed; nothing of it was kept.
    #[error("MLS: {0}")]
    Mls(#[from] CoreError),
    /// SQLite failed.
    #[error("state file: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The state file's directory could not be created.
    #[error("creating the state file's directory: {0}")]
    Io(#[from] std::io::Error),
}

/// What [`StateFile::encrypt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// The file was plain and is now encrypted.
    Encrypted,
    /// The file was encrypted already; nothing changed.
    AlreadyEncrypted,
}

/// Gives the file at `path` owner-only permissions: it holds the
/// identity's secret key.
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a rename in `path`'s directory durable.
fn sync_directory(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A group this client is a member of, as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// The MLS group id.
    pub group_id: GroupId,
    /// When this client created or joined it (Unix seconds).
    pub joined_at: i64,
    /// When this client asked to leave it, if it did.
    pub left_at: Option<i64>,
    /// Its name for people, once known (see [`StateFile::name_group`]).
    pub name: Option<String>,
}

/// An open, checked state file.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    pub(crate) connection: Connection,
}

impl StateFile {
    /// Opens an existing state file.
    ///
    /// An empty file is refused: only [`Self::open_or_create`] (the
    /// commands that create a state) takes one.
    pub fn open(access: &StateAccess) -> Result<StateFile, StateError> {
        Self::open_existing(access, false)
    }

    fn open_existing(access: &StateAccess, allow_fresh: bool) -> Result<StateFile, StateError> {
        let path = access.path();
        if !path.exists() {
            return Err(StateError::Missing(path.to_owned()));
        }
        let key = match cipher::format(path)? {
            Format::Encrypted(salt) => Some(FileKey::derive(&access.passphrase(false)?, salt)),
            Format::Empty if allow_fresh => Some(FileKey::fresh(&access.passphrase(true)?)),
            Format::Plain | Format::Empty => None,
            Format::Unknown => {
                return Err(StateError::NotAStateFile {
                    path: path.to_owned(),
                    reason: "it is not a SQLite database".into(),
                });
            }
        };
        schema::check(path, allow_fresh, key.as_ref())?;
        let state = Self::open_checked(path, key.as_ref(), OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        if key.is_none() {
            access.opened_plain();
        }
        Ok(state)
    }

    /// Opens the state file of `access`, creating it encrypted (with
    /// owner-only permissions) when it does not exist or is empty.
    pub fn open_or_create(access: &StateAccess) -> Result<StateFile, StateError> {
        let path = access.path();
        if path.exists() {
            return Self::open_existing(access, true);
        }
        // Asked before anything is written: a missing passphrase leaves
        // no file behind.
        let key = FileKey::fresh(&access.passphrase(true)?);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let state = Self::open_checked(
            path,
            Some(&key),
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        restrict_to_owner(path)?;
        Ok(state)
    }

    fn open_checked(path: &Path, key: Option<&FileKey>, flags: OpenFlags) -> Result<StateFile, StateError> {
        let mut connection = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        if let Some(key) = key {
            key.apply(&connection)?;
        }
        schema::migrate(path, &mut connection)?;
        Ok(StateFile {
            path: path.to_owned(),
            connection,
        })
    }

    /// Encrypts the unencrypted state file of `access` under its
    /// passphrase: writes an encrypted copy beside it, reads the copy back
    /// (every table, row for row), and only then puts it in the plain
    /// file's place. A file already encrypted is left as it is.
    ///
    /// No other command may use the file meanwhile: one that already has
    /// it open would go on writing to the plain file, which is then gone.
    pub fn encrypt(access: &StateAccess) -> Result<Encryption, StateError> {
        let path = access.path();
        if !path.exists() {
            return Err(StateError::Missing(path.to_owned()));
        }
        match cipher::format(path)? {
            Format::Encrypted(_) => return Ok(Encryption::AlreadyEncrypted),
            Format::Plain => {}
            Format::Empty | Format::Unknown => {
                return Err(StateError::NotAStateFile {
                    path: path.to_owned(),
                    reason: "it is not a SQLite database".into(),
                });
            }
        }
        schema::check(path, false, None)?;
        let key = FileKey::fresh(&access.passphrase(true)?);
        let mut copy = path.as_os_str().to_owned();
        copy.push(".encrypting");
        let copy = PathBuf::from(copy);
        // A copy left by an interrupted conversion is incomplete.
        remove_if_present(&copy)?;
        // CREATE lets ATTACH make the copy; the plain file exists already.
        let plain = Self::open_checked(
            path,
            None,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        let exported =
            cipher::export(&plain.connection, &key, &copy, schema::APPLICATION_ID).and_then(|()| {
                restrict_to_owner(&copy)?;
                let encrypted = Self::open_checked(&copy, Some(&key), OpenFlags::SQLITE_OPEN_READ_WRITE)?;
                cipher::same_rows(&plain.connection, &encrypted.connection)
            });
        if let Err(e) = exported {
            let _ = std::fs::remove_file(&copy);
            return Err(e);
        }
        drop(plain);
        std::fs::rename(&copy, path)?;
        sync_directory(path)?;
        Ok(Encryption::Encrypted)
    }

    /// Re-encrypts this (encrypted) file under the key of `passphrase`,
    /// with the file's salt; in one transaction, so an interruption leaves
    /// the file under the old passphrase. A plain file is refused: it needs
    /// [`Self::encrypt`].
    pub fn change_passphrase(&self, passphrase: &str) -> Result<(), StateError> {
        let Format::Encrypted(salt) = cipher::format(&self.path)? else {
            return Err(StateError::NotAStateFile {
                path: self.path.clone(),
                reason: "it is not encrypted; `state encrypt` encrypts it under a passphrase".into(),
            });
        };
        FileKey::derive(passphrase, salt).rekey(&self.connection)?;
        Ok(())
    }

    /// The file's SQLite connection with its key applied, nothing checked
    /// or migrated: for tests and tools that look inside a state file (it
    /// may create files it attaches).
    #[doc(hidden)]
    pub fn raw_connection(access: &StateAccess) -> Result<Connection, StateError> {
        let path = access.path();
        if !path.exists() {
            return Err(StateError::Missing(path.to_owned()));
        }
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        if let Format::Encrypted(salt) = cipher::format(path)? {
            FileKey::derive(&access.passphrase(false)?, salt).apply(&connection)?;
        }
        Ok(connection)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An OpenMLS provider storing into this file.
    pub fn provider(&self) -> StateProvider<'_> {
        StateProvider::new(&self.connection)
    }

    /// Starts a transaction; MLS state written through [`Self::provider`]
    /// meanwhile commits or rolls back with it. Only this module's methods
    /// use it, so a unit of work is always one named method.
    fn transaction(&self) -> Result<rusqlite::Transaction<'_>, StateError> {
        Ok(self.connection.unchecked_transaction()?)
    }

    /// Runs `work` in a transaction and commits it only if `work` succeeds;
    /// on failure everything `work` wrote (MLS state included) is rolled
    /// back.
    fn atomically<T, E: From<StateError>>(&self, work: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let transaction = self.transaction()?;
        let value = work()?;
        transaction.commit().map_err(StateError::from)?;
        Ok(value)
    }

    /// Gives the space of deleted rows back to the file system once it
    /// passes 4 MiB (e.g. after a burst of messages was processed or
    /// dropped), so the file does not keep its high-water mark. Returns
    /// whether it compacted.
    pub fn compact_if_sparse(&self) -> Result<bool, StateError> {
        const THRESHOLD: i64 = 4 * 1024 * 1024;
        let free: i64 = self
            .connection
            .pragma_query_value(None, "freelist_count", |row| row.get(0))?;
        // SQLCipher answers `page_size` of an encrypted file as its
        // `cipher_page_size`, in text.
        let page: i64 =
            self.connection
                .pragma_query_value(None, "page_size", |row| match row.get_ref(0)? {
                    rusqlite::types::ValueRef::Text(text) => Ok(std::str::from_utf8(text)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(4096)),
                    _ => row.get(0),
                })?;
        if free.saturating_mul(page) < THRESHOLD {
            return Ok(false);
        }
        // VACUUM rewrites the file through the rollback journal: a crash
        // leaves the old file or the new one, never half of each.
        self.connection.execute_batch("VACUUM")?;
        Ok(true)
    }

    /// This device's key pair, as a device of its user: its TLS identity,
    /// queue owner and MLS leaf key.
    pub fn identity(&self) -> Result<IdentityKeypair, StateError> {
        let device = self.stored_identity()?.ok_or_else(|| self.no_identity())?;
        Ok(match self.linked_to()? {
            Some(user) => device.of_user(user),
            None => device,
        })
    }

    fn no_identity(&self) -> StateError {
        if self.pending_link().ok().flatten().is_some() {
            StateError::LinkPending(self.path.clone())
        } else {
            StateError::NoIdentity(self.path.clone())
        }
    }

    /// The stored device, or a new user stored now. A new user's first
    /// device is the user key itself, as on Signal: a person with one
    /// device has one key, and peers who know nothing of device lists
    /// still reach that device by the key they were given. Devices linked
    /// later get keys of their own; only this first one holds the user key,
    /// which links and removes devices.
    pub fn identity_or_generate(&self) -> Result<IdentityKeypair, StateError> {
        if self.stored_identity()?.is_some() {
            return self.identity();
        }
        if self.pending_link()?.is_some() {
            return Err(StateError::LinkPending(self.path.clone()));
        }
        let user = IdentityKeypair::generate();
        self.store_device(&user)?;
        Ok(user)
    }

    /// Stores this device's key and, for a linked device, its user's
    /// public key (not yet stored).
    fn store_device(&self, device: &IdentityKeypair) -> Result<(), StateError> {
        self.connection.execute(
            "INSERT INTO identity (id, secret_key, public_key, created_at) VALUES (1, ?1, ?2, ?3)",
            params![
                device.secret_bytes().as_slice(),
                device.public_key().as_bytes(),
                unix_now()
            ],
        )?;
        let user = device.user();
        if user != device.public_key() {
            self.connection.execute(
                "INSERT INTO user_key (id, public_key) VALUES (1, ?1)",
                params![user.as_bytes()],
            )?;
        }
        Ok(())
    }

    fn stored_identity(&self) -> Result<Option<IdentityKeypair>, StateError> {
        self.stored_keypair("SELECT secret_key, public_key FROM identity WHERE id = 1")
    }

    /// The key pair in the row `query` selects (secret, public), checked
    /// against each other.
    fn stored_keypair(&self, query: &str) -> Result<Option<IdentityKeypair>, StateError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .connection
            .query_row(query, [], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((secret, public)) = row else {
            return Ok(None);
        };
        let secret = zeroize::Zeroizing::new(secret);
        let secret: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| StateError::BadIdentity(self.path.clone()))?;
        let pair = IdentityKeypair::from_secret_bytes(&secret);
        if pair.public_key().as_bytes().as_slice() != public.as_slice() {
            return Err(StateError::BadIdentity(self.path.clone()));
        }
        Ok(Some(pair))
    }

    /// The user key: what peers know and invite. Reads only the public
    /// keys (no secret is loaded, no key derived): `recv` asks for it per
    /// received message.
    pub fn identity_key(&self) -> Result<IdentityKey, StateError> {
        let public: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT coalesce((SELECT public_key FROM user_key WHERE id = 1),
                                 (SELECT public_key FROM identity WHERE id = 1))",
                [],
                |row| row.get(0),
            )
            .optional()?
            .flatten();
        match public {
            Some(bytes) => IdentityKey::try_from(bytes.as_slice())
                .map_err(|_| StateError::BadIdentity(self.path.clone())),
            None => Err(self.no_identity()),
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

#[cfg(test)]
mod tests;
