//! The conformance suite (`tests/conformance/`) against the PostgreSQL
//! store: a fresh database per check on a real PostgreSQL server (a
//! throwaway cluster this test process starts, or the server named by
//! `QUICNPROTOCHAT_TEST_POSTGRES`). Without PostgreSQL the checks say so
//! and pass, unless `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use proptest::prelude::*;
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
}

/// One test per check, each on a fresh database.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let Some(backend) = Postgres::new() else { return };
            conformance::$check(&backend).await;
        }
    )*};
}

conformance::every_check!(conformance);

proptest! {
    // Fewer cases than on SQLite: each creates a database on the server.
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn queues_behave_like_the_model(ops in conformance::queue_ops()) {
        let Some(backend) = Postgres::new() else { return Ok(()) };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(conformance::queues_behave_like_the_model(&backend, ops));
    }
}
