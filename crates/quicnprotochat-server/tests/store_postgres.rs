//! The conformance suite (`tests/conformance/`) against the PostgreSQL
//! store: a fresh database per check on a real PostgreSQL server (a
//! throwaway cluster this test process starts, or the server named by
//! `QUICNPROTOCHAT_TEST_POSTGRES`). Without PostgreSQL the checks say so
//! and pass, unless `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use quicnprotochat_core::IdentityKey;
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
            // Migration 3 added the ciphersuite; undone here with 4 to 7
            // after it.
            let version: Vec<u8> = db
                .query_one(
                    "SELECT value FROM quicnprotochat_meta WHERE key = 'schema_version'",
                    &[],
                )
                .unwrap()
                .get(0);
            assert_eq!(version, b"7", "undo the migrations after 3 here too");
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
}

// Each check and case on a fresh database on the server; fewer cases than
// on SQLite, as each creates a database.
conformance::suite_on!(Postgres::new(), cases: 24);
