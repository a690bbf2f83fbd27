//! Our tables of the state file, with numbered migrations tracked in
//! `PRAGMA user_version` (applied by `quicnprotochat-sqlite`, as the node's
//! are), and the check that a file is a state file at all.

use std::path::Path;

use openmls_sqlite_storage::SqliteStorageProvider;
use quicnprotochat_sqlite::{MigrationError, Ownership, check_ownership};
use rusqlite::{Connection, OpenFlags};

use super::cipher::{self, FileKey};
use super::{JsonCodec, StateError};

/// `application_id` of a state file: "QNPC" in ASCII.
pub(super) const APPLICATION_ID: i64 = 0x514E_5043;

/// Migrations in order; entry `i` brings our tables to version `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    "CREATE TABLE identity (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         secret_key BLOB NOT NULL,
         public_key BLOB NOT NULL,
         created_at INTEGER NOT NULL
     );
     CREATE TABLE groups (
         group_id BLOB PRIMARY KEY,
         joined_at INTEGER NOT NULL,
         last_used INTEGER NOT NULL
     );
     CREATE TABLE settings (
         key TEXT PRIMARY KEY,
         value BLOB
     );
     CREATE TABLE inbox (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         payload BLOB NOT NULL,
         received_at INTEGER NOT NULL
     );",
    // V2: contacts, message history, leaving groups.
    "CREATE TABLE contacts (
         name TEXT PRIMARY KEY,
         identity_key BLOB NOT NULL UNIQUE CHECK (length(identity_key) = 32),
         added_at INTEGER NOT NULL
     );
     CREATE TABLE history (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         group_id BLOB NOT NULL,
         outgoing INTEGER NOT NULL,
         sender BLOB NOT NULL,
         body BLOB NOT NULL,
         epoch INTEGER NOT NULL,
         at INTEGER NOT NULL
     );
     CREATE INDEX history_by_group ON history (group_id, id);
     ALTER TABLE groups ADD COLUMN left_at INTEGER;",
    // V3: group changes sent but not yet confirmed by the node, resent with
    // the same message ids until they are.
    "CREATE TABLE outbox (
         group_id BLOB PRIMARY KEY,
         epoch INTEGER NOT NULL,
         commit_payload BLOB NOT NULL,
         commit_to BLOB NOT NULL,
         commit_id BLOB NOT NULL,
         welcome_payload BLOB,
         welcome_to BLOB,
         welcome_id BLOB
     );",
    // V4: the GroupInfo of the epoch each Commit starts, which the node
    // serves to members who rejoin, resent with its Commit; and rejoins,
    // whose external Commit is merged before the node answers.
    "ALTER TABLE outbox ADD COLUMN group_info BLOB;
     ALTER TABLE outbox ADD COLUMN rejoin INTEGER NOT NULL DEFAULT 0;",
    // V5: a sent message is confirmed once the node took it (earlier rows
    // count as confirmed); an inbox entry from a later epoch than its group
    // remembers when it was first kept back, to bound what waits.
    "ALTER TABLE history ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE inbox ADD COLUMN kept_at INTEGER;",
    // V6: users with several devices. `identity` stays this device's key;
    // `user_key` holds the user key when it is another key (a state made
    // before V6 has none: its key is its own user). `device_lists` keeps
    // the highest verified list seen per user, to notice a node serving an
    // older one. `pending_link` is a new device's link key until the
    // handoff arrives.
    "CREATE TABLE user_key (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         secret_key BLOB NOT NULL,
         public_key BLOB NOT NULL
     );
     CREATE TABLE device_lists (
         user_key BLOB PRIMARY KEY CHECK (length(user_key) = 32),
         version INTEGER NOT NULL,
         devices BLOB NOT NULL,
         signature BLOB NOT NULL
     );
     CREATE TABLE pending_link (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         link_secret BLOB NOT NULL,
         expires_at INTEGER NOT NULL
     );",
    // V7: the node's sequence number of each fetched message, which `recv
    // --json` reports (NULL for entries stored before).
    "ALTER TABLE inbox ADD COLUMN seq INTEGER;",
    // V8: a linked device's first leaf keys, made (so known) by the device
    // that linked it; `group_id` is set once a Welcome joined with one, and
    // the row is gone once that group's leaf was updated.
    "CREATE TABLE handed_leaf_keys (
         encryption_key BLOB PRIMARY KEY,
         group_id BLOB
     );",
    // V9: the user key's secret stays on the user's first device (whose
    // device key it is); a linked device keeps only the user's public key.
    // A device linked before drops the copy it was handed, its bytes
    // overwritten (`secure_delete`), so a device removed later cannot sign
    // lists or log in as the first device.
    "PRAGMA secure_delete = ON;
     CREATE TABLE user_public_key (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         public_key BLOB NOT NULL CHECK (length(public_key) = 32)
     );
     INSERT INTO user_public_key (id, public_key) SELECT id, public_key FROM user_key;
     DROP TABLE user_key;
     ALTER TABLE user_public_key RENAME TO user_key;",
    // V10: Welcomes from people who are neither contacts nor our own
    // devices, waiting for the user to accept or decline them.
    "CREATE TABLE invitations (
         group_id BLOB PRIMARY KEY CHECK (length(group_id) BETWEEN 1 AND 256),
         inviter_user BLOB NOT NULL CHECK (length(inviter_user) = 32),
         inviter_device BLOB NOT NULL CHECK (length(inviter_device) = 32),
         epoch INTEGER NOT NULL,
         members INTEGER NOT NULL,
         welcome BLOB NOT NULL,
         tree BLOB,
         received_at INTEGER NOT NULL
     );",
    // V11: a group's name for people. Group ids are random bytes now; the
    // name is the creator's `--group-id`, or the first one a member sent.
    "ALTER TABLE groups ADD COLUMN name TEXT;",
    // V12: the members an accepted Commit added who are still to be told
    // the group's name (the command was cut off before it sent it): a
    // later command sends it.
    "CREATE TABLE names_owed (
         group_id BLOB PRIMARY KEY,
         recipients BLOB NOT NULL CHECK (length(recipients) % 32 = 0)
     );",
    // V13: each group's state key (protocol 9), which the node keeps the
    // group's public state under and which we present with every call
    // about the group. A group joined before has none and takes its
    // current epoch's (as every member of that epoch does). A key may be
    // known before the group is ours again (a rejoin from the key backup).
    // The setting `key_backup` remembers a digest of what our key backup
    // on the node last held, so it is sent again only when it changed.
    "CREATE TABLE state_keys (
         group_id BLOB PRIMARY KEY CHECK (length(group_id) BETWEEN 1 AND 256),
         state_key BLOB NOT NULL CHECK (length(state_key) = 32)
     );",
];

/// Read-only check that `path` is an intact state file of ours (an empty
/// file too, with `allow_fresh`), run before anything may write to it;
/// `key` opens an encrypted file, and a key that does not is a wrong
/// passphrase.
///
/// A process that died inside a write leaves a hot rollback journal beside
/// the file; a read-only connection cannot roll it back and SQLite then
/// refuses to read at all. So a hot journal next to a file whose header
/// says it is ours (or that the key decrypts) is rolled back first (opening
/// it read-write and reading does that); any other file with a journal is
/// refused untouched.
pub(super) fn check(path: &Path, allow_fresh: bool, key: Option<&FileKey>) -> Result<(), StateError> {
    let not_ours = |reason: String| StateError::NotAStateFile {
        path: path.to_owned(),
        reason,
    };
    let wrong_key = |e: rusqlite::Error| {
        if cipher::is_wrong_key(&e) {
            StateError::WrongPassphrase(path.to_owned())
        } else {
            not_ours(e.to_string())
        }
    };
    match key {
        Some(key) => roll_back_encrypted_journal(path, key).map_err(wrong_key)?,
        None => roll_back_hot_journal(path).map_err(not_ours)?,
    }
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| not_ours(e.to_string()))?;
    if let Some(key) = key {
        // The first read decrypts page 1; a wrong key fails it as "not a
        // database", which here means the passphrase.
        key.apply(&connection).map_err(wrong_key)?;
        connection
            .query_row("SELECT count(*) FROM sqlite_master", [], |row| {
                row.get::<_, i64>(0)
            })
            .map_err(wrong_key)?;
    }
    match check_ownership(&connection, APPLICATION_ID).map_err(|e| not_ours(e.to_string()))? {
        Ownership::Ours { .. } => {}
        Ownership::Fresh if allow_fresh => {}
        Ownership::Fresh => {
            return Err(not_ours(
                "it is empty; `register-state` creates a state file (or pass the right --state)".into(),
            ));
        }
        Ownership::NotADatabase => return Err(not_ours("it is not a SQLite database".into())),
        Ownership::Foreign { .. } => {
            return Err(not_ours("it is a SQLite database of another application".into()));
        }
        // A kind of file this build does not know: leave it alone.
        _ => return Err(not_ours("its owner could not be told".into())),
    }
    let integrity: String = connection
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(|e| not_ours(e.to_string()))?;
    if integrity != "ok" {
        return Err(not_ours(format!("integrity check: {integrity}")));
    }
    Ok(())
}

/// Rolls back the hot journal of an interrupted write, if there is one and
/// the file's header carries our application id; refuses any other file
/// with a journal, leaving both as they are.
fn roll_back_hot_journal(path: &Path) -> Result<(), String> {
    let mut journal = path.as_os_str().to_owned();
    journal.push("-journal");
    let hot = std::fs::metadata(&journal).is_ok_and(|meta| meta.len() > 0);
    if !hot {
        return Ok(());
    }
    // The database header: the magic string, and the application id at
    // offset 68, big-endian (https://sqlite.org/fileformat.html).
    let mut header = [0u8; 72];
    let ours = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut header))
        .is_ok()
        && header.starts_with(b"SQLite format 3\0")
        && i64::from(u32::from_be_bytes([
            header[68], header[69], header[70], header[71],
        ])) == APPLICATION_ID;
    if !ours {
        return Err(
            "an interrupted write left a journal beside it, and its header is not a state file's; nothing was touched"
                .into(),
        );
    }
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| format!("rolling back an interrupted write: {e}"))?;
    connection
        .query_row("SELECT count(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        })
        .map_err(|e| format!("rolling back an interrupted write: {e}"))?;
    Ok(())
}

/// Rolls back the hot journal of an interrupted write to an encrypted
/// file, if there is one. Its header is ciphertext, so the key is the
/// check: a wrong one fails the first read, and leaves the file intact
/// (the journal holds the original pages as stored, in ciphertext).
fn roll_back_encrypted_journal(path: &Path, key: &FileKey) -> rusqlite::Result<()> {
    let mut journal = path.as_os_str().to_owned();
    journal.push("-journal");
    if !std::fs::metadata(&journal).is_ok_and(|meta| meta.len() > 0) {
        return Ok(());
    }
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    key.apply(&connection)?;
    connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| {
        row.get::<_, i64>(0)
    })?;
    Ok(())
}

/// Applies pending migrations of our tables and of OpenMLS' storage tables.
pub(super) fn migrate(path: &Path, connection: &mut Connection) -> Result<(), StateError> {
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    quicnprotochat_sqlite::migrate(connection, APPLICATION_ID, MIGRATIONS).map_err(|e| match e {
        MigrationError::TooNew { found, supported } => StateError::TooNew {
            path: path.to_owned(),
            found,
            supported,
        },
        refused @ (MigrationError::Foreign { .. } | MigrationError::NotADatabase) => {
            StateError::NotAStateFile {
                path: path.to_owned(),
                reason: refused.to_string(),
            }
        }
        failed => StateError::Schema(failed),
    })?;
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(connection)
        .run_migrations()
        .map_err(|e| StateError::Migration(e.to_string()))
}
