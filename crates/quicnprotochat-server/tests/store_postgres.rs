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

conformance!(
    drain_returns_messages_in_fifo_order_and_empties_the_queue,
    queued_messages_and_key_packages_survive_a_restart,
    key_packages_are_served_once_oldest_first,
    concurrent_takes_never_hand_out_a_key_package_twice,
    concurrent_enqueues_are_all_committed,
    a_large_queue_is_drained_over_several_fetches_within_the_budget,
    a_queue_of_tiny_messages_is_drained_in_bounded_batches,
    the_last_resort_is_served_only_when_nothing_else_is_left_and_kept,
    an_expired_key_package_is_never_served_or_counted,
    fetch_after_a_sequence_number_keeps_messages_until_acked,
    a_repeated_message_id_is_stored_once_per_sender,
    a_fanned_out_payload_reaches_every_recipient_once,
    only_the_first_valid_commit_of_an_epoch_is_accepted_and_its_welcome_goes_with_it,
    a_commit_for_any_other_epoch_or_not_valid_for_the_group_is_refused,
    the_tree_of_an_epoch_that_added_members_is_kept_for_them_across_a_restart,
    a_queue_never_holds_more_than_its_depth_and_a_refusal_stores_nothing,
    a_read_sees_every_commit_as_soon_as_it_is_answered,
    a_queue_never_holds_more_bytes_than_its_limit_and_acks_make_room,
    an_identity_keeps_at_most_its_limit_of_key_packages,
    an_application_message_from_an_epoch_its_group_left_is_refused,
    an_idle_groups_view_is_forgotten_but_its_epoch_kept,
);

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
