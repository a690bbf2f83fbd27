//! The conformance suite (`tests/conformance/`) against the SQLite store:
//! a real database file in a temporary directory, full durability.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use proptest::prelude::*;
use quicnprotochat_server::store::{Durability, Limits, Store, StoreCloser};

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
}

/// One test per check, each on a fresh database.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            conformance::$check(&Sqlite::new()).await;
        }
    )*};
}

conformance::every_check!(conformance);

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn queues_behave_like_the_model(ops in conformance::queue_ops()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(conformance::queues_behave_like_the_model(&Sqlite::new(), ops));
    }
}
