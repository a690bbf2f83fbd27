//! The state file's encryption: SQLCipher pages under a raw 256-bit key
//! that Argon2id derives from the passphrase.
//!
//! SQLCipher keeps a random 16-byte salt as the first bytes of an
//! encrypted file, in clear; the same salt feeds Argon2id, so the file
//! carries everything but the passphrase and can be copied alone. Giving
//! SQLCipher a raw key skips its own PBKDF2 (256,000 rounds of
//! HMAC-SHA512, 146 ms on the reference machine, against about 15 ms
//! for Argon2id here: BENCHMARKS.md).
//!
//! `export` and `same_rows` encrypt a plain file into a copy and check it
//! (`state encrypt`).
//!
//! A plain SQLite file starts with its magic string; a file that does not
//! and whose length is a whole number of pages is taken to be encrypted.
//! A key that does not open it is reported as a wrong passphrase: an
//! encrypted file cannot tell a wrong key from a damaged first page, and
//! the file is left as it was either way.

use std::io::Read;
use std::path::Path;

use rusqlite::Connection;
use zeroize::Zeroizing;

use super::StateError;

/// Argon2id parameters: 7 MiB and 5 passes, one of the settings OWASP's
/// password storage guidance lists as equivalent (2024), in two lanes
/// computed side by side. An attacker pays the same memory and passes; a
/// command waits about 15 ms for it on two cores, where 12 MiB × 3 passes
/// in one lane took 23 ms, most of the +20 ms a command may cost
/// (BENCHMARKS.md). Files made with them can only be opened with them: a
/// change needs a way to tell old files apart.
const MEMORY_KIB: u32 = 7 * 1024;
const PASSES: u32 = 5;
const LANES: u32 = 2;

/// SQLCipher's salt: the first 16 bytes of an encrypted file.
pub(super) const SALT_LEN: usize = 16;

/// SQLCipher's page size (its default), the unit an encrypted file grows in.
const PAGE: u64 = 4096;

/// What a file on disk is, told from its first bytes and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// No bytes yet: a state file to be made.
    Empty,
    /// A plain SQLite database (a state file from before encryption, or
    /// not ours at all: the schema check tells).
    Plain,
    /// An encrypted file, with its salt.
    Encrypted([u8; SALT_LEN]),
    /// Neither: too short, or not a whole number of pages.
    Unknown,
}

/// Reads what kind of file `path` is.
pub(super) fn format(path: &Path) -> std::io::Result<Format> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(Format::Empty);
    }
    let mut head = [0u8; SALT_LEN];
    if file.read_exact(&mut head).is_err() {
        return Ok(Format::Unknown);
    }
    if &head == b"SQLite format 3\0" {
        return Ok(Format::Plain);
    }
    if length % PAGE != 0 {
        return Ok(Format::Unknown);
    }
    Ok(Format::Encrypted(head))
}

/// A state file's key, with the salt it was derived with.
pub(super) struct FileKey {
    key: Zeroizing<[u8; 32]>,
    salt: [u8; SALT_LEN],
}

impl FileKey {
    /// Derives the key of a file with `salt` from `passphrase`.
    pub(super) fn derive(passphrase: &str, salt: [u8; SALT_LEN]) -> FileKey {
        let mut key = Zeroizing::new([0u8; 32]);
        // The parameters are constants within argon2's bounds and the
        // output length is valid, so neither call can fail.
        let params = argon2::Params::new(MEMORY_KIB, PASSES, LANES, Some(32))
            .unwrap_or_else(|_| unreachable!("constant Argon2 parameters are valid"));
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(passphrase.as_bytes(), &salt, key.as_mut())
            .unwrap_or_else(|_| unreachable!("a 16-byte salt and 32-byte output are valid"));
        FileKey { key, salt }
    }

    /// A key for a new file, with a fresh random salt.
    pub(super) fn fresh(passphrase: &str) -> FileKey {
        let mut salt = [0u8; SALT_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        FileKey::derive(passphrase, salt)
    }

    /// SQLCipher's literal for this key and salt: `x'KEYSALT'`, in hex.
    /// Giving the salt makes a new file use it; an existing file's own
    /// salt is the same one.
    fn literal(&self) -> Zeroizing<String> {
        let mut hex = Zeroizing::new(String::with_capacity(2 * (32 + SALT_LEN) + 3));
        hex.push_str("x'");
        // Digit by digit, so no copy of the key is left in a temporary.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for byte in self.key.iter().chain(self.salt.iter()) {
            hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        hex.push('\'');
        hex
    }

    /// Keys `connection` (before anything reads the file): every page it
    /// reads or writes from now on is decrypted or encrypted with this key.
    pub(super) fn apply(&self, connection: &Connection) -> rusqlite::Result<()> {
        quiet(connection)?;
        let statement = Zeroizing::new(format!("PRAGMA key = \"{}\"", self.literal().as_str()));
        connection.execute_batch(&statement)
    }

    /// Re-encrypts every page of `connection`'s (keyed) database under
    /// this key (SQLCipher's `rekey`, one transaction).
    pub(super) fn rekey(&self, connection: &Connection) -> rusqlite::Result<()> {
        let statement = Zeroizing::new(format!("PRAGMA rekey = \"{}\"", self.literal().as_str()));
        connection.execute_batch(&statement)
    }

    /// Attaches an encrypted copy of `connection`'s database at `path`
    /// under this key as `encrypted` (for `sqlcipher_export`).
    pub(super) fn attach(&self, connection: &Connection, path: &Path) -> rusqlite::Result<()> {
        let statement = Zeroizing::new(format!(
            "ATTACH DATABASE ?1 AS encrypted KEY \"{}\"",
            self.literal().as_str()
        ));
        connection.execute(&statement, [path.to_string_lossy()])?;
        Ok(())
    }
}

/// Stops SQLCipher from logging a failed page check (a wrong key) on
/// stderr: the caller reports it in its own words.
pub(super) fn quiet(connection: &Connection) -> rusqlite::Result<()> {
    connection.execute_batch("PRAGMA cipher_log_level = NONE")
}

/// Whether `error` is SQLite's answer to a key that does not decrypt the
/// file ("file is not a database").
pub(super) fn is_wrong_key(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase)
}

/// Copies every table of `plain` into a new encrypted file at `copy`, with
/// its schema version and `application_id` (which `sqlcipher_export` does
/// not carry), and makes it durable.
pub(super) fn export(
    plain: &Connection,
    key: &FileKey,
    copy: &Path,
    application_id: i64,
) -> Result<(), StateError> {
    key.attach(plain, copy)?;
    let exported = (|| {
        plain.query_row("SELECT sqlcipher_export('encrypted')", [], |_| Ok(()))?;
        let version: i64 = plain.pragma_query_value(None, "user_version", |row| row.get(0))?;
        plain.execute_batch(&format!(
            "PRAGMA encrypted.user_version = {version}; PRAGMA encrypted.application_id = {application_id};"
        ))
    })();
    let detached = plain.execute_batch("DETACH DATABASE encrypted");
    exported?;
    detached?;
    std::fs::File::open(copy)?.sync_all()?;
    Ok(())
}

/// Checks that `encrypted` holds the same tables as `plain`, each with as
/// many rows.
pub(super) fn same_rows(plain: &Connection, encrypted: &Connection) -> Result<(), StateError> {
    let tables = |connection: &Connection| -> rusqlite::Result<Vec<String>> {
        let mut statement = connection.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?;
        statement
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
    };
    let names = tables(plain)?;
    if names != tables(encrypted)? {
        return Err(StateError::Damaged(
            "the encrypted copy lacks tables of the plain file".into(),
        ));
    }
    for name in names {
        let count = format!("SELECT count(*) FROM \"{}\"", name.replace('"', "\"\""));
        let rows = |connection: &Connection| connection.query_row(&count, [], |row| row.get::<_, i64>(0));
        if rows(plain)? != rows(encrypted)? {
            return Err(StateError::Damaged(format!(
                "the encrypted copy of table {name} has other rows than the plain file"
            )));
        }
    }
    Ok(())
}
