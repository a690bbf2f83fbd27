//! The node database's numbered schema migrations, applied with the helper
//! the client's state file uses too (`quicnprotochat-sqlite`): the version
//! applied last is kept in `PRAGMA user_version`; `application_id` marks the
//! file as ours so that a wrong `--db` path is refused instead of being
//! written into.

use std::path::Path;

use quicnprotochat_core::{GroupId, GroupRef, IdentityKey, MessageKey};
use quicnprotochat_sqlite::{MigrationError, Ownership};
use rusqlite::Connection;

use crate::store::{Durability, StoreError};

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
    // V3: a payload sent to many recipients is stored once (messages point
    // at it; a trigger frees it with its last queue entry), and senders'
    // message ids make retries idempotent.
    "CREATE TABLE payloads (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         body BLOB NOT NULL,
         refs INTEGER NOT NULL
     );
     ALTER TABLE messages ADD COLUMN payload_id INTEGER REFERENCES payloads (id);
     CREATE TRIGGER messages_release_payload AFTER DELETE ON messages
     WHEN old.payload_id IS NOT NULL
     BEGIN
         UPDATE payloads SET refs = refs - 1 WHERE id = old.payload_id;
         DELETE FROM payloads WHERE id = old.payload_id AND refs <= 0;
     END;
     CREATE TABLE message_ids (
         sender BLOB NOT NULL,
         message_id BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         PRIMARY KEY (sender, message_id)
     ) WITHOUT ROWID;
     CREATE TABLE meta (
         key TEXT PRIMARY KEY,
         value BLOB NOT NULL
     );
     INSERT INTO meta (key, value) VALUES ('instance_id', randomblob(16));",
    // V4: one Commit per group and epoch. Only the group id and the epoch
    // the group is in (the first without an accepted Commit) are kept.
    "CREATE TABLE group_epochs (
         group_id BLOB PRIMARY KEY,
         epoch INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // V5: queue depths kept by triggers, so the queue-full check is one
    // lookup instead of a count.
    "CREATE TABLE queue_depths (
         recipient_key BLOB PRIMARY KEY,
         depth INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT INTO queue_depths (recipient_key, depth)
         SELECT recipient_key, count(*) FROM messages GROUP BY recipient_key;
     CREATE TRIGGER messages_count_insert AFTER INSERT ON messages
     BEGIN
         INSERT INTO queue_depths (recipient_key, depth) VALUES (new.recipient_key, 1)
         ON CONFLICT (recipient_key) DO UPDATE SET depth = depth + 1;
     END;
     CREATE TRIGGER messages_count_delete AFTER DELETE ON messages
     BEGIN
         UPDATE queue_depths SET depth = depth - 1 WHERE recipient_key = old.recipient_key;
     END;
     CREATE INDEX messages_by_age ON messages (enqueued_at);",
    // V6: freeing a shared payload checks the foreign key from `messages`;
    // without this index that check scanned every queued message (seconds
    // at a million messages, inside the writer).
    "CREATE INDEX messages_by_payload ON messages (payload_id) WHERE payload_id IS NOT NULL;",
    // V7: each group's public view (ratchet tree, group context, kept
    // proposals), against which its handshake messages are checked. A rowid
    // table: a view grows with the group (about 300 bytes a member), too big
    // for the B-tree of a WITHOUT ROWID table.
    "CREATE TABLE group_views (
         group_id BLOB PRIMARY KEY,
         view BLOB NOT NULL
     );",
    // V8: the ratchet tree of each epoch a Commit started by adding
    // members, for them to fetch with their Welcome (which no longer carries
    // it); `joiners` is their 32-byte identity keys, concatenated. Purged
    // with undelivered messages, so a tree lives as long as its Welcome can.
    "CREATE TABLE welcome_trees (
         group_id BLOB NOT NULL,
         epoch INTEGER NOT NULL,
         tree BLOB NOT NULL,
         joiners BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         PRIMARY KEY (group_id, epoch)
     );
     CREATE INDEX welcome_trees_by_age ON welcome_trees (created_at);",
    // V9: queues are limited in bytes too: each queue entry knows its
    // payload's size, and the triggers of V5 keep each queue's total.
    "ALTER TABLE messages ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
     UPDATE messages SET size = CASE
         WHEN payload_id IS NULL THEN length(payload)
         ELSE (SELECT length(body) FROM payloads WHERE payloads.id = messages.payload_id)
     END;
     ALTER TABLE queue_depths ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
     UPDATE queue_depths SET bytes = (
         SELECT coalesce(sum(size), 0) FROM messages WHERE messages.recipient_key = queue_depths.recipient_key
     );
     DROP TRIGGER messages_count_insert;
     DROP TRIGGER messages_count_delete;
     CREATE TRIGGER messages_count_insert AFTER INSERT ON messages
     BEGIN
         INSERT INTO queue_depths (recipient_key, depth, bytes) VALUES (new.recipient_key, 1, new.size)
         ON CONFLICT (recipient_key) DO UPDATE SET depth = depth + 1, bytes = bytes + new.size;
     END;
     CREATE TRIGGER messages_count_delete AFTER DELETE ON messages
     BEGIN
         UPDATE queue_depths SET depth = depth - 1, bytes = bytes - old.size
         WHERE recipient_key = old.recipient_key;
     END;",
    // V10: when each group's view last changed, so that views of groups
    // idle for the group retention period can be forgotten (their epoch
    // row stays). Views from before count as changed now.
    "ALTER TABLE group_views ADD COLUMN changed_at INTEGER NOT NULL DEFAULT 0;
     UPDATE group_views SET changed_at = CAST(strftime('%s', 'now') AS INTEGER);
     CREATE INDEX group_views_by_age ON group_views (changed_at);",
    // V11: retention finds old messages by sequence number (they are
    // numbered in arrival order), not by an index every enqueue and ack had
    // to update.
    "DROP INDEX messages_by_age;",
    // V12: each user's signed device list (protocol 5), the latest only.
    // `version` is the u64's bit pattern (see `DeviceListColumns`);
    // `devices` the 32-byte device keys, concatenated, ascending (1 to 64).
    // A rowid table: a row of 64 devices passes 2 KiB.
    "CREATE TABLE device_lists (
         user_key BLOB PRIMARY KEY CHECK (length(user_key) = 32),
         version INTEGER NOT NULL,
         devices BLOB NOT NULL
             CHECK (length(devices) BETWEEN 32 AND 2048 AND length(devices) % 32 = 0),
         signature BLOB NOT NULL CHECK (length(signature) = 64),
         updated_at INTEGER NOT NULL
     );",
    // V13: KeyPackages of each MLS ciphersuite (protocol 6) are a stock of
    // their own: served, counted and limited per identity and suite.
    // `ciphersuite` is the suite's code point (a u16); every KeyPackage
    // stored before is 0x0001, the only suite uploads took. Every fetch and
    // count names identity and suite, so the serving index leads with both;
    // V1's index on (identity_key, id) only cost writes since V2's serving
    // index, whose prefix it is, and goes.
    "ALTER TABLE key_packages ADD COLUMN ciphersuite INTEGER NOT NULL DEFAULT 1
         CHECK (ciphersuite BETWEEN 0 AND 65535);
     DROP INDEX key_packages_serving;
     DROP INDEX key_packages_by_identity;
     CREATE INDEX key_packages_serving ON key_packages (identity_key, ciphersuite, last_resort, id);",
    // V14: a digest of each group's current state (protocol 7), kept past
    // the view: a forgotten group is handed over again only in exactly
    // that state, so a stranger who knows its id cannot take it. NULL for
    // groups changed before.
    "ALTER TABLE group_epochs ADD COLUMN fingerprint BLOB
         CHECK (fingerprint IS NULL OR length(fingerprint) = 32);",
    // V15: devices a user's list dropped (protocol 7): no later list may
    // name them again, whoever uploads it, so a removed device that still
    // holds the user key cannot put itself back.
    "CREATE TABLE removed_devices (
         user_key BLOB NOT NULL CHECK (length(user_key) = 32),
         device_key BLOB NOT NULL CHECK (length(device_key) = 32),
         removed_at INTEGER NOT NULL,
         PRIMARY KEY (user_key, device_key)
     ) WITHOUT ROWID;",
    // V16: standalone proposals kept beside the group's view, one row each,
    // so that keeping one does not rewrite the whole view (the tree). The
    // rowid keeps their order; a Commit (a new view) deletes them.
    "CREATE TABLE group_proposals (
         id INTEGER PRIMARY KEY,
         group_id BLOB NOT NULL,
         epoch INTEGER NOT NULL,
         item BLOB NOT NULL
     );
     CREATE INDEX group_proposals_by_group ON group_proposals (group_id, epoch, id);",
    // V17: the SHA-256 of each KeyPackage, so one stored already is not
    // stored (and served) twice. NULL for KeyPackages stored before.
    "ALTER TABLE key_packages ADD COLUMN fingerprint BLOB
         CHECK (fingerprint IS NULL OR length(fingerprint) = 32);
     CREATE INDEX key_packages_by_fingerprint ON key_packages (identity_key, fingerprint);",
    // V18: groups keyed by `group_ref`, SHA-256("quicnprotochat group" ||
    // id) (`GroupRef`), never by their id: a copy of the file does not
    // hold the ids, which creators may have put names in. Tables with the
    // id as key are rebuilt rather than updated in place, so that no id
    // can collide with another group's new key half-way.
    // `quicnprotochat_group_ref` is registered by `open`.
    "CREATE TABLE group_epochs_v18 (
         group_ref BLOB PRIMARY KEY CHECK (length(group_ref) = 32),
         epoch INTEGER NOT NULL,
         fingerprint BLOB CHECK (fingerprint IS NULL OR length(fingerprint) = 32)
     );
     INSERT INTO group_epochs_v18 (group_ref, epoch, fingerprint)
         SELECT quicnprotochat_group_ref(group_id), epoch, fingerprint FROM group_epochs;
     DROP TABLE group_epochs;
     ALTER TABLE group_epochs_v18 RENAME TO group_epochs;
     CREATE TABLE group_views_v18 (
         group_ref BLOB PRIMARY KEY CHECK (length(group_ref) = 32),
         view BLOB NOT NULL,
         changed_at INTEGER NOT NULL DEFAULT 0
     );
     INSERT INTO group_views_v18 (group_ref, view, changed_at)
         SELECT quicnprotochat_group_ref(group_id), view, changed_at FROM group_views;
     DROP TABLE group_views;
     ALTER TABLE group_views_v18 RENAME TO group_views;
     CREATE INDEX group_views_by_age ON group_views (changed_at);
     CREATE TABLE welcome_trees_v18 (
         group_ref BLOB NOT NULL CHECK (length(group_ref) = 32),
         epoch INTEGER NOT NULL,
         tree BLOB NOT NULL,
         joiners BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         PRIMARY KEY (group_ref, epoch)
     );
     INSERT INTO welcome_trees_v18 (group_ref, epoch, tree, joiners, created_at)
         SELECT quicnprotochat_group_ref(group_id), epoch, tree, joiners, created_at FROM welcome_trees;
     DROP TABLE welcome_trees;
     ALTER TABLE welcome_trees_v18 RENAME TO welcome_trees;
     CREATE INDEX welcome_trees_by_age ON welcome_trees (created_at);
     UPDATE group_proposals SET group_id = quicnprotochat_group_ref(group_id);
     ALTER TABLE group_proposals RENAME COLUMN group_id TO group_ref;",
    // V19: message ids kept as `MessageKey`, SHA-256("quicnprotochat
    // message id" || sender || id), so a copy of the file does not say who
    // sent what. The ids already claimed carry over, so a retry across the
    // upgrade is still stored once. `quicnprotochat_message_key` is
    // registered by `open`.
    "CREATE TABLE message_keys (
         message_key BLOB PRIMARY KEY CHECK (length(message_key) = 32),
         created_at INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT OR IGNORE INTO message_keys (message_key, created_at)
         SELECT quicnprotochat_message_key(sender, message_id), created_at FROM message_ids;
     DROP TABLE message_ids;",
    // V20: each device's key backup, one opaque sealed blob, kept under
    // `backup`, SHA-256("quicnprotochat key backup" || secret)
    // (`BackupRef`): the secret its device presents is never stored, so
    // the file does not say whose backup a row is. Never purged (see
    // `delivery::key_backups`). A rowid table: a backup (up to 64 KiB)
    // is too big for the B-tree of a WITHOUT ROWID table.
    "CREATE TABLE key_backups (
         backup BLOB PRIMARY KEY CHECK (length(backup) = 32),
         sealed BLOB NOT NULL,
         updated_at INTEGER NOT NULL
     );",
    // V21: groups' public views and proposals are kept sealed under the
    // group's state key (protocol 9), which the node never holds at rest,
    // so it cannot seal those kept before. It forgets them instead, as it
    // forgets an idle group's (their epochs and fingerprints stay): each
    // group's next change hands its state over again, under its key. The
    // rows go with `secure_delete`, and `open` rebuilds the file once.
    "DELETE FROM group_proposals;
     DELETE FROM group_views;",
];

/// Registers `quicnprotochat_group_ref(id)` on `connection`: the
/// [`GroupRef`] of a group id, for migration V18.
fn register_group_ref(connection: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    connection.create_scalar_function(
        "quicnprotochat_group_ref",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |context| {
            let id: Vec<u8> = context.get(0)?;
            // Every stored id was admitted as a GroupId; one that is not
            // (empty or too long) stops the migration rather than vanish.
            let id = GroupId::new(id).ok_or_else(|| {
                rusqlite::Error::UserFunctionError("a stored group id is not a group id".into())
            })?;
            Ok(GroupRef::of(&id).as_bytes().to_vec())
        },
    )
}

/// Registers `quicnprotochat_message_key(sender, id)` on `connection`:
/// the [`MessageKey`] of a sender's message id, for migration V19.
fn register_message_key(connection: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    connection.create_scalar_function(
        "quicnprotochat_message_key",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |context| {
            let sender: Vec<u8> = context.get(0)?;
            let id: Vec<u8> = context.get(1)?;
            // Every stored sender was an authenticated identity key; one
            // that is not stops the migration rather than vanish.
            let sender = IdentityKey::try_from(sender.as_slice()).map_err(|_| {
                rusqlite::Error::UserFunctionError("a stored sender is not an identity key".into())
            })?;
            Ok(MessageKey::of(&sender, &id).as_bytes().to_vec())
        },
    )
}

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens the database at `path`, sets durability pragmas and applies pending
/// migrations. Returns the connection and the database's instance id.
pub(in crate::store) fn open(
    path: &Path,
    durability: Durability,
) -> Result<(Connection, [u8; 16]), StoreError> {
    let mut connection = Connection::open(path)?;
    // Before anything writes (even the journal mode): refuse a file that is
    // not ours.
    match quicnprotochat_sqlite::check_ownership(&connection, APPLICATION_ID).map_err(refusal)? {
        Ownership::Foreign { application_id } => return Err(StoreError::ForeignDatabase(application_id)),
        Ownership::NotADatabase => return Err(StoreError::NotADatabase),
        _ => {}
    }
    // WAL: readers never block the writer and commits append sequentially.
    let mode: String = connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal(mode));
    }
    // FULL: every commit is fsynced before it is acknowledged, so an answered
    // enqueue survives a power cut. NORMAL: the WAL is fsynced only at
    // checkpoints; an answered enqueue survives a crash of the node process
    // but the last commits may be lost in a power cut. Group commit shares
    // one fsync among every command in a batch.
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    connection.pragma_update(None, "synchronous", synchronous)?;
    // Checkpoints run in the background (see `readers`); this is only the
    // backstop if they fall behind (10,000 pages, about 40 MiB of WAL).
    connection.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    // After a checkpoint resets the WAL, give back space beyond 64 MiB
    // instead of keeping the file at its high-water mark.
    connection.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    connection.pragma_update(None, "foreign_keys", true)?;
    // A deleted row (an acked or expired message, a replaced group view)
    // would otherwise stay readable in its page, or in a freed overflow
    // page, until SQLite reuses the space: a copy of the file would show
    // what was delivered long ago. ON overwrites it with zeros where it
    // lay, freed pages included (docs/seized-node.md; its cost is in
    // BENCHMARKS.md).
    connection.pragma_update(None, "secure_delete", "ON")?;
    check_integrity(&connection)?;
    register_group_ref(&connection)?;
    register_message_key(&connection)?;
    let found: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    quicnprotochat_sqlite::migrate(&mut connection, APPLICATION_ID, MIGRATIONS).map_err(refusal)?;
    if (1..KEYED_BY_HASHES).contains(&found) {
        scrub_freed_pages(&connection, found)?;
    }
    let id: Vec<u8> =
        connection.query_row("SELECT value FROM meta WHERE key = 'instance_id'", [], |row| {
            row.get(0)
        })?;
    let instance_id = id
        .try_into()
        .map_err(|_| StoreError::Transaction("the stored instance id is damaged".into()))?;
    Ok((connection, instance_id))
}

/// The schema from which every row names groups and message ids only by
/// hash (V18 rekeyed the group tables, V19 the message ids) and keeps no
/// group's state in clear (V21).
const KEYED_BY_HASHES: i64 = 21;

/// Rebuilds a file that the migrations to [`KEYED_BY_HASHES`] just
/// rewrote: the rows they replaced (group ids, the senders of message ids,
/// views in clear) stay byte for byte in free pages, and in the WAL, until
/// something overwrites them, so a copy of the file would still show them. `VACUUM`
/// writes the file anew without free pages; the checkpoint then copies it
/// into place and empties the WAL. Once per upgrade, and it takes as long
/// as copying the file.
fn scrub_freed_pages(connection: &Connection, found: i64) -> Result<(), StoreError> {
    tracing::info!(
        "rebuilding the database after its upgrade from schema {found}, so that no copy of it keeps the group ids and senders the upgrade replaced"
    );
    connection.execute_batch("VACUUM")?;
    connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// Refuses a database with damaged pages. `quick_check` reads every page
/// but skips `integrity_check`'s index-to-table cross checks: a 1.4 GB
/// file of a million 1 KiB messages passed in 1.0 s here (page cache warm;
/// a cold start reads the file once more). Serving from a damaged file
/// would answer calls with "database disk image is malformed", or worse,
/// with whatever the damaged pages hold.
fn check_integrity(connection: &Connection) -> Result<(), StoreError> {
    let mut statement = connection.prepare("PRAGMA quick_check(8)")?;
    let mut rows = statement.query([])?;
    let mut findings = Vec::new();
    loop {
        match rows.next() {
            Ok(Some(row)) => findings.push(row.get::<_, String>(0)?),
            Ok(None) => break,
            // SQLite may give up reading a damaged page instead of
            // reporting it.
            Err(rusqlite::Error::SqliteFailure(e, message))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
                ) =>
            {
                findings.push(message.unwrap_or_else(|| e.to_string()));
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if findings == ["ok"] {
        Ok(())
    } else {
        Err(StoreError::Damaged(findings.join("; ")))
    }
}

/// The store's error for a file the migration helper refused or failed on.
fn refusal(error: MigrationError) -> StoreError {
    match error {
        MigrationError::Foreign { application_id } => StoreError::ForeignDatabase(application_id),
        MigrationError::NotADatabase => StoreError::NotADatabase,
        MigrationError::TooNew { found, supported } => StoreError::SchemaTooNew { found, supported },
        other => StoreError::Migration(other),
    }
}
