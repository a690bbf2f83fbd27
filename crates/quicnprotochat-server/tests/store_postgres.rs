//! The conformance suite (`tests/conformance/`) against the PostgreSQL
//! store: a fresh database per check on a real PostgreSQL server (a
//! throwaway cluster this test process starts, or the server named by
//! `QUICNPROTOCHAT_TEST_POSTGRES`). Without PostgreSQL the checks say so
//! and pass, unless `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use quicnprotochat_core::{GroupId, GroupRef, IdentityKey};
use quicnprotochat_server::store::{Limits, Store, StoreCloser};
use quicnprotochat_testpg::TestPostgres;

/// A fresh database; every open is another node start on it.
struct Postgres {
    url: String,
}

impl Postgres {
    fn new() -> Option<Postgres> {
        let cluster = TestPostgres::shared()?;
        Some(Postgres {
            url: cluster.create_database(),
        })
    }
}

impl Backend for Postgres {
    fn open_with(&self, limits: Limits) -> (Store, StoreCloser) {
        Store::open_postgres(&self.url, limits).unwrap()
    }

    fn store_key_packages_before_suites(&self, identity: IdentityKey, packages: &[(&[u8], bool)]) {
        let url = self.url.clone();
        let packages: Vec<(Vec<u8>, bool)> = packages
            .iter()
            .map(|(bytes, last_resort)| (bytes.to_vec(), *last_resort))
            .collect();
        // The synchronous client must not run on an async thread.
        std::thread::spawn(move || {
            let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            // Migration 3 added the ciphersuite; undone here with 4 to 10
            // after it (8's group tables and 9's message keys, empty here,
            // made again as 7 left them; 10's key backups dropped; 11 only
            // forgets views, and has nothing to undo).
            let version: Vec<u8> = db
                .query_one(
                    "SELECT value FROM quicnprotochat_meta WHERE key = 'schema_version'",
                    &[],
                )
                .unwrap()
                .get(0);
            assert_eq!(version, b"11", "undo the migrations after 3 here too");
            drop_key_backups(&mut db);
            key_message_ids_by_sender(&mut db);
            key_group_tables_by_id(&mut db);
            db.batch_execute(
                "DROP INDEX key_packages_by_fingerprint;
                 ALTER TABLE key_packages DROP COLUMN fingerprint;
                 DROP TABLE group_proposals;
                 DROP TABLE removed_devices;
                 ALTER TABLE group_epochs DROP COLUMN fingerprint;
                 DROP INDEX key_packages_serving;
                 ALTER TABLE key_packages DROP COLUMN ciphersuite;
                 CREATE INDEX key_packages_serving ON key_packages (identity_key, last_resort, id);
                 UPDATE quicnprotochat_meta SET value = '2' WHERE key = 'schema_version';",
            )
            .unwrap();
            for (bytes, last_resort) in packages {
                db.execute(
                    "INSERT INTO key_packages (identity_key, package, uploaded_at, last_resort, expires_at)
                     VALUES ($1, $2, 0, $3, 9223372036854775807)",
                    &[&identity.as_bytes().as_slice(), &bytes, &last_resort],
                )
                .unwrap();
            }
        })
        .join()
        .unwrap();
    }

    fn claim_message_id_by_sender(&self, sender: IdentityKey, message_id: &[u8]) {
        let (url, message_id) = (self.url.clone(), message_id.to_vec());
        std::thread::spawn(move || {
            let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            drop_key_backups(&mut db);
            key_message_ids_by_sender(&mut db);
            db.execute(
                "INSERT INTO message_ids (sender, message_id, created_at)
                 VALUES ($1, $2, extract(epoch FROM now())::bigint)",
                &[&sender.as_bytes().as_slice(), &message_id],
            )
            .unwrap();
            db.batch_execute("UPDATE quicnprotochat_meta SET value = '8' WHERE key = 'schema_version';")
                .unwrap();
        })
        .join()
        .unwrap();
    }

    fn key_groups_by_id(&self, group: &GroupId) {
        let url = self.url.clone();
        let (id, reference) = (group.as_bytes().to_vec(), GroupRef::of(group).as_bytes().to_vec());
        std::thread::spawn(move || {
            let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            // Migration 8 keyed groups by reference; undone here, each table
            // made again as 7 left it, with the one group's rows under its
            // id (and 9 and 10 after it).
            drop_key_backups(&mut db);
            key_message_ids_by_sender(&mut db);
            key_group_tables_by_id(&mut db);
            db.batch_execute("UPDATE quicnprotochat_meta SET value = '7' WHERE key = 'schema_version';")
                .unwrap();
            for table in ["group_epochs", "group_views", "welcome_trees", "group_proposals"] {
                db.execute(
                    &format!("UPDATE {table} SET group_id = $1 WHERE group_id = $2"),
                    &[&id, &reference],
                )
                .unwrap();
            }
            let keyed: i64 = db
                .query_one("SELECT count(*) FROM group_epochs WHERE group_id = $1", &[&id])
                .unwrap()
                .get(0);
            assert_eq!(keyed, 1, "the group is keyed by its id, as before migration 8");
        })
        .join()
        .unwrap();
    }

    fn copy_holds(&self, bytes: &[u8]) -> Option<bool> {
        let dump = TestPostgres::shared()?.dump(&self.url);
        // `bytea` comes out in hex.
        let hex = hex::encode(bytes).into_bytes();
        let holds = |needle: &[u8]| dump.windows(needle.len()).any(|window| window == needle);
        Some(holds(bytes) || holds(&hex))
    }
}

/// Undoes migration 10 on `db`: no table of key backups (those it holds
/// go).
fn drop_key_backups(db: &mut postgres::Client) {
    db.batch_execute("DROP TABLE key_backups;").unwrap();
}

/// Undoes migration 9 on `db`: message ids kept beside their sender, as 8
/// left them (the keys it holds cannot be turned back, and are dropped).
fn key_message_ids_by_sender(db: &mut postgres::Client) {
    db.batch_execute(
        "DROP TABLE message_keys;
         CREATE TABLE message_ids (
             sender bytea NOT NULL,
             message_id bytea NOT NULL,
             created_at bigint NOT NULL,
             PRIMARY KEY (sender, message_id)
         );
         CREATE INDEX message_ids_by_age ON message_ids USING brin (created_at);",
    )
    .unwrap();
}

/// Undoes migration 8 on `db`: each group table made again as 7 left it,
/// keyed by `group_id`, with the rows it holds (their keys still
/// references).
fn key_group_tables_by_id(db: &mut postgres::Client) {
    db.batch_execute(
        "CREATE TABLE group_epochs_v7 (group_id bytea PRIMARY KEY, epoch bigint NOT NULL, fingerprint bytea);
         INSERT INTO group_epochs_v7 SELECT group_ref, epoch, fingerprint FROM group_epochs;
         DROP TABLE group_epochs;
         ALTER TABLE group_epochs_v7 RENAME TO group_epochs;
         CREATE TABLE group_views_v7 (group_id bytea PRIMARY KEY, view bytea NOT NULL, changed_at bigint NOT NULL);
         INSERT INTO group_views_v7 SELECT group_ref, view, changed_at FROM group_views;
         DROP TABLE group_views;
         ALTER TABLE group_views_v7 RENAME TO group_views;
         CREATE INDEX group_views_by_age ON group_views (changed_at);
         CREATE TABLE welcome_trees_v7 (
             group_id bytea NOT NULL,
             epoch bigint NOT NULL,
             tree bytea NOT NULL,
             joiners bytea NOT NULL,
             created_at bigint NOT NULL,
             PRIMARY KEY (group_id, epoch)
         );
         INSERT INTO welcome_trees_v7 SELECT group_ref, epoch, tree, joiners, created_at FROM welcome_trees;
         DROP TABLE welcome_trees;
         ALTER TABLE welcome_trees_v7 RENAME TO welcome_trees;
         CREATE INDEX welcome_trees_by_age ON welcome_trees (created_at);
         ALTER TABLE group_proposals RENAME COLUMN group_ref TO group_id;",
    )
    .unwrap();
}

// Each check and case on a fresh database on the server; fewer cases than
// on SQLite, as each creates a database.
conformance::suite_on!(Postgres::new(), cases: 24);
