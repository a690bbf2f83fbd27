//! The conformance suite (`tests/conformance/`) against the SQLite store:
//! a real database file in a temporary directory, full durability.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use quicnprotochat_core::{GroupId, GroupRef, IdentityKey};
use quicnprotochat_server::store::{Durability, Limits, SCHEMA_VERSION, Store, StoreCloser};

/// A SQLite database file in its own temporary directory.
struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Sqlite {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Backend for Sqlite {
    fn open_with(&self, limits: Limits) -> (Store, StoreCloser) {
        Store::open_with(&self.dir.path().join("node.db"), limits, Durability::Full).unwrap()
    }

    fn store_key_packages_before_suites(&self, identity: IdentityKey, packages: &[(&[u8], bool)]) {
        // V13 added the ciphersuite; undone here with V14 to V20 after it
        // (V18's group tables and V19's message keys, empty here, made
        // again as V17 left them; V20's key backups dropped; V21 only
        // forgets views, and has nothing to undo).
        assert_eq!(SCHEMA_VERSION, 21, "undo the migrations after V13 here too");
        let db = rusqlite::Connection::open(self.dir.path().join("node.db")).unwrap();
        drop_key_backups(&db);
        key_message_ids_by_sender(&db);
        key_group_tables_by_id(&db);
        db.execute_batch(
            "DROP INDEX key_packages_by_fingerprint;
             ALTER TABLE key_packages DROP COLUMN fingerprint;
             DROP TABLE group_proposals;
             DROP TABLE removed_devices;
             ALTER TABLE group_epochs DROP COLUMN fingerprint;
             DROP INDEX key_packages_serving;
             ALTER TABLE key_packages DROP COLUMN ciphersuite;
             CREATE INDEX key_packages_by_identity ON key_packages (identity_key, id);
             CREATE INDEX key_packages_serving ON key_packages (identity_key, last_resort, id);
             PRAGMA user_version = 12;",
        )
        .unwrap();
        for (bytes, last_resort) in packages {
            db.execute(
                "INSERT INTO key_packages (identity_key, package, uploaded_at, last_resort, expires_at)
                 VALUES (?1, ?2, 0, ?3, 9223372036854775807)",
                rusqlite::params![identity.as_bytes(), bytes, last_resort],
            )
            .unwrap();
        }
    }

    fn claim_message_id_by_sender(&self, sender: IdentityKey, message_id: &[u8]) {
        self.claim_message_id_by_sender_v18(sender, message_id);
    }

    fn key_groups_by_id(&self, group: &GroupId) {
        // V18 keyed groups by reference; undone here, each table made again
        // as V17 left it, with the one group's rows under its id (and V19
        // and V20 after it).
        assert_eq!(SCHEMA_VERSION, 21, "undo the migrations after V17 here too");
        let db = rusqlite::Connection::open(self.dir.path().join("node.db")).unwrap();
        drop_key_backups(&db);
        key_message_ids_by_sender(&db);
        key_group_tables_by_id(&db);
        db.execute_batch("PRAGMA user_version = 17;").unwrap();
        let reference = GroupRef::of(group);
        for table in ["group_epochs", "group_views", "welcome_trees", "group_proposals"] {
            db.execute(
                &format!("UPDATE {table} SET group_id = ?1 WHERE group_id = ?2"),
                rusqlite::params![group.as_bytes(), reference.as_bytes()],
            )
            .unwrap();
        }
        let keyed: i64 = db
            .query_row(
                "SELECT count(*) FROM group_epochs WHERE group_id = ?1",
                [group.as_bytes()],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(keyed, 1, "the group is keyed by its id, as before V18");
    }

    fn copy_holds(&self, bytes: &[u8]) -> Option<bool> {
        let hex = hex::encode(bytes).into_bytes();
        let holds = |file: &[u8], needle: &[u8]| file.windows(needle.len()).any(|window| window == needle);
        Some(["node.db", "node.db-wal"].iter().any(|name| {
            std::fs::read(self.dir.path().join(name))
                .is_ok_and(|file| holds(&file, bytes) || holds(&file, &hex))
        }))
    }
}

impl Sqlite {
    fn claim_message_id_by_sender_v18(&self, sender: IdentityKey, message_id: &[u8]) {
        assert_eq!(SCHEMA_VERSION, 21, "undo the migrations after V18 here too");
        let db = rusqlite::Connection::open(self.dir.path().join("node.db")).unwrap();
        drop_key_backups(&db);
        key_message_ids_by_sender(&db);
        db.execute(
            "INSERT INTO message_ids (sender, message_id, created_at) VALUES (?1, ?2, unixepoch())",
            rusqlite::params![sender.as_bytes(), message_id],
        )
        .unwrap();
        db.execute_batch("PRAGMA user_version = 18;").unwrap();
    }
}

/// Undoes V20 on `db`: no table of key backups (those it holds go).
fn drop_key_backups(db: &rusqlite::Connection) {
    db.execute_batch("DROP TABLE key_backups;").unwrap();
}

/// Undoes V19 on `db`: message ids kept beside their sender, as V18 left
/// them (the keys it holds cannot be turned back, and are dropped).
fn key_message_ids_by_sender(db: &rusqlite::Connection) {
    db.execute_batch(
        "DROP TABLE message_keys;
         CREATE TABLE message_ids (
             sender BLOB NOT NULL,
             message_id BLOB NOT NULL,
             created_at INTEGER NOT NULL,
             PRIMARY KEY (sender, message_id)
         ) WITHOUT ROWID;",
    )
    .unwrap();
}

/// Undoes V18 on `db`: each group table made again as V17 left it, keyed
/// by `group_id`, with the rows it holds (their keys still references).
fn key_group_tables_by_id(db: &rusqlite::Connection) {
    db.execute_batch(
        "CREATE TABLE group_epochs_v17 (group_id BLOB PRIMARY KEY, epoch INTEGER NOT NULL, fingerprint BLOB);
         INSERT INTO group_epochs_v17 SELECT group_ref, epoch, fingerprint FROM group_epochs;
         DROP TABLE group_epochs;
         ALTER TABLE group_epochs_v17 RENAME TO group_epochs;
         CREATE TABLE group_views_v17 (
             group_id BLOB PRIMARY KEY,
             view BLOB NOT NULL,
             changed_at INTEGER NOT NULL DEFAULT 0
         );
         INSERT INTO group_views_v17 SELECT group_ref, view, changed_at FROM group_views;
         DROP TABLE group_views;
         ALTER TABLE group_views_v17 RENAME TO group_views;
         CREATE INDEX group_views_by_age ON group_views (changed_at);
         CREATE TABLE welcome_trees_v17 (
             group_id BLOB NOT NULL,
             epoch INTEGER NOT NULL,
             tree BLOB NOT NULL,
             joiners BLOB NOT NULL,
             created_at INTEGER NOT NULL,
             PRIMARY KEY (group_id, epoch)
         );
         INSERT INTO welcome_trees_v17 SELECT group_ref, epoch, tree, joiners, created_at FROM welcome_trees;
         DROP TABLE welcome_trees;
         ALTER TABLE welcome_trees_v17 RENAME TO welcome_trees;
         CREATE INDEX welcome_trees_by_age ON welcome_trees (created_at);
         ALTER TABLE group_proposals RENAME COLUMN group_ref TO group_id;",
    )
    .unwrap();
}

/// An upgrade that rekeyed rows by hash leaves nothing of the old rows in
/// the file: the sender of a message id claimed before V19 (and so a group
/// id before V18) is not in the file or its WAL after the node opened it.
#[test]
fn an_upgraded_file_keeps_no_trace_of_the_rows_it_rekeyed() {
    let sqlite = Sqlite::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { conformance::close(sqlite.open()).await });
    let sender = IdentityKey::from_bytes([0xa7; 32]);
    sqlite.claim_message_id_by_sender_v18(sender, b"a retried message");
    let files = || -> Vec<u8> {
        let mut bytes = Vec::new();
        for name in ["node.db", "node.db-wal"] {
            if let Ok(file) = std::fs::read(sqlite.dir.path().join(name)) {
                bytes.extend(file);
            }
        }
        bytes
    };
    let holds_sender = |bytes: &[u8]| bytes.windows(32).any(|window| window == sender.as_bytes());
    assert!(holds_sender(&files()), "the old row names its sender");

    runtime.block_on(async { conformance::close(sqlite.open()).await });
    assert!(
        !holds_sender(&files()),
        "the upgraded file still holds the sender"
    );
}

/// A message its recipient acked leaves no copy of itself in the database
/// file: the node zeroes a deleted row where it lay, freed overflow pages
/// included (`secure_delete = ON`; `FAST` leaves those), so a copy of the
/// file taken after holds neither the message nor its clear MLS header.
#[test]
fn an_acked_message_leaves_no_copy_in_the_database_file() {
    use quicnprotochat_core::Seq;

    let sqlite = Sqlite::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (sender, recipient) = (IdentityKey::from_bytes([1; 32]), IdentityKey::from_bytes([2; 32]));
    let marker: Vec<u8> = b"an acked message, long enough to find again: "
        .iter()
        .copied()
        .chain((0..=255u8).cycle().take(400))
        .collect();
    // Beyond a page: SQLite keeps it on overflow pages of its own.
    let large: Vec<u8> = b"an acked large message: "
        .iter()
        .copied()
        .chain((0..=255u8).rev().cycle().take(20_000))
        .collect();
    let kept = b"a message still waiting".to_vec();
    runtime.block_on(async {
        let (store, closer) = sqlite.open();
        store
            .enqueue(sender, recipient, marker.clone(), None)
            .await
            .unwrap()
            .unwrap();
        store
            .enqueue(sender, recipient, large.clone(), None)
            .await
            .unwrap()
            .unwrap();
        store
            .enqueue(sender, recipient, kept.clone(), None)
            .await
            .unwrap()
            .unwrap();
        let queued = store.messages_after(recipient, Seq::ZERO, 0).await.unwrap();
        assert_eq!(queued.len(), 3);
        store.ack(recipient, queued[1].seq).await.unwrap();
        // Closing checkpoints the WAL into the file and removes it.
        conformance::close((store, closer)).await;
    });
    let file = std::fs::read(sqlite.dir.path().join("node.db")).unwrap();
    let holds = |needle: &[u8]| file.windows(needle.len()).any(|window| window == needle);
    assert!(holds(&kept), "the waiting message is in the file");
    assert!(!holds(&marker[..64]), "the acked message is still in the file");
    for part in large.chunks(4096) {
        assert!(
            !holds(&part[..64]),
            "a part of the acked large message is still in the file"
        );
    }
}

// Each check and case on a fresh database file.
conformance::suite_on!(Some(Sqlite::new()), cases: 64);
