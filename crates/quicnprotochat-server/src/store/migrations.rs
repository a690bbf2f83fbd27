//! Numbered schema migrations. The version applied last is kept in
//! `PRAGMA user_version`; `application_id` marks the file as ours so that a
//! wrong `--db` path is refused instead of being written into.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// `application_id` of a node database: "QNPN" in ASCII.
const APPLICATION_ID: i64 = 0x514E_504E;

/// Migrations in order; entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // V1: KeyPackage directory and message queues. AUTOINCREMENT so a
    // sequence number is never reused, even after the newest row is deleted.
    "CREATE TABLE key_packages (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         identity_key BLOB NOT NULL CHECK (length(identity_key) = 32),
         package BLOB NOT NULL,
         uploaded_at INTEGER NOT NULL
     );
     CREATE INDEX key_packages_by_identity ON key_packages (identity_key, id);
     CREATE TABLE messages (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         recipient_key BLOB NOT NULL CHECK (length(recipient_key) = 32),
         payload BLOB NOT NULL,
         enqueued_at INTEGER NOT NULL
     );
     CREATE INDEX messages_by_recipient ON messages (recipient_key, seq);",
    // V2: validated KeyPackages carry their last-resort mark and expiry.
    // Rows from V1 were not validated; they keep serving until taken.
    "ALTER TABLE key_packages ADD COLUMN last_resort INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE key_packages ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 9223372036854775807;
     CREATE INDEX key_packages_serving ON key_packages (identity_key, last_resort, id);",
];

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens the database at `path`, sets durability pragmas and applies pending
/// migrations.
pub(super) fn open(path: &Path) -> Result<Connection, StoreError> {
    let mut connection = Connection::open(path)?;
    // Before anything writes: refuse a file that is not ours.
    check_ownership(&connection)?;
    // WAL: readers never block the writer and commits append sequentially.
    // synchronous=FULL: a commit is fsynced before it is acknowledged, so an
    // answered enqueue survives a power cut, not just a process crash. Group
    // commit amortises the fsync over every command in a batch.
    let mode: String = connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal(mode));
    }
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", true)?;
    migrate(&mut connection)?;
    Ok(connection)
}

fn check_ownership(connection: &Connection) -> Result<(), StoreError> {
    let application_id: i64 = connection
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => StoreError::NotADatabase,
            _ => e.into(),
        })?;
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if application_id != APPLICATION_ID {
        // A fresh file has no id and no tables; anything else belongs to
        // someone else and must not be written into.
        let tables: i64 = connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
        if application_id != 0 || version != 0 || tables != 0 {
            return Err(StoreError::ForeignDatabase(application_id));
        }
    }
    Ok(())
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1)?;
        transaction.pragma_update(None, "application_id", APPLICATION_ID)?;
        transaction.commit()?;
        tracing::info!(version = index + 1, "applied database migration");
    }
    Ok(())
}
