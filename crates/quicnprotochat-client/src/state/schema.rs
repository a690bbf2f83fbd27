//! Our tables of the state file, with numbered migrations tracked in
//! `PRAGMA user_version` (applied by `quicnprotochat-sqlite`, as the node's
//! are), and the check that a file is a state file at all.

use std::path::Path;

use openmls_sqlite_storage::SqliteStorageProvider;
use quicnprotochat_sqlite::{MigrationError, Ownership, check_ownership};
use rusqlite::{Connection, OpenFlags};

use super::{JsonCodec, StateError};

/// `application_id` of a state file: "QNPC" in ASCII.
const APPLICATION_ID: i64 = 0x514E_5043;

/// Migrations in order; entry `i` brings our tables to version `i + 1`.
const MIGRATIONS: &[&str] = &[
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
];

/// Read-only check that `path` is an intact state file of ours (or an empty
/// file), run before anything may write to it.
pub(super) fn check(path: &Path) -> Result<(), StateError> {
    let not_ours = |reason: String| StateError::NotAStateFile {
        path: path.to_owned(),
        reason,
    };
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| not_ours(e.to_string()))?;
    match check_ownership(&connection, APPLICATION_ID).map_err(|e| not_ours(e.to_string()))? {
        Ownership::Fresh | Ownership::Ours { .. } => {}
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
