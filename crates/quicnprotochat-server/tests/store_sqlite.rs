//! The conformance suite (`tests/conformance/`) against the SQLite store:
//! a real database file in a temporary directory, full durability.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use quicnprotochat_core::IdentityKey;
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
        // V13 added the ciphersuite; undone here with V14 to V17 after it.
        assert_eq!(SCHEMA_VERSION, 17, "undo the migrations after V13 here too");
        let db = rusqlite::Connection::open(self.dir.path().join("node.db")).unwrap();
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
}

// Each check and case on a fresh database file.
conformance::suite_on!(Some(Sqlite::new()), cases: 64);
