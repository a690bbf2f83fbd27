//! The conformance suite: what every storage backend of the node must do,
//! checked through the public `Store` API only, so that each backend
//! (`tests/store_sqlite.rs`, `tests/store_postgres.rs`) runs exactly the
//! same checks. Device lists' checks are in `device_lists`, those of
//! KeyPackages of several ciphersuites in `key_packages`, those of devices'
//! key backups in `key_backups`.
//!
//! Each check takes a fresh [`Backend`] and closes every store it opens.

#![allow(dead_code)] // each runner file uses the checks it can run

pub mod device_lists;
pub mod key_backups;
pub mod key_packages;
pub mod mls;
pub mod state_keys;

use quicnprotochat_core::KeyPackageStock;
use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use quicnprotochat_core::{IdentityKey, QueuedMessage, Seq, StateKey, Suite};
use quicnprotochat_proto::outcome::QueueFull;
use quicnprotochat_server::store::{
    CommitRefusal, Envelope, FETCH_BUDGET_BYTES, FETCH_MAX_MESSAGES, Limits, SendRefusal, Store, StoreCloser,
    TooManyKeyPackages, Totals, ValidKeyPackage,
};

/// The whole suite as tests of the runner file that calls it: one test per
/// check, and the queue property test with `cases` cases, each on a fresh
/// backend from `$fresh`, an `Option` (`None` skips: PostgreSQL without a
/// server). Each runner states only its backend.
#[allow(unused_macros)] // files checking other things use the helpers only
macro_rules! suite_on {
    ($fresh:expr, cases: $cases:expr) => {
        conformance::one_test_per_check!(
            $fresh;
            drain_returns_messages_in_fifo_order_and_empties_the_queue,
            queued_messages_and_key_packages_survive_a_restart,
            key_packages_are_served_once_oldest_first,
            a_key_package_uploaded_again_is_stored_once,
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
            a_kept_proposal_survives_a_restart_and_a_commit_of_its_epoch_takes_it,
            a_queue_never_holds_more_than_its_depth_and_a_refusal_stores_nothing,
            a_read_sees_every_commit_as_soon_as_it_is_answered,
            a_queue_never_holds_more_bytes_than_its_limit_and_acks_make_room,
            an_identity_keeps_at_most_its_limit_of_key_packages,
            an_application_message_from_an_epoch_its_group_left_is_refused,
            an_idle_groups_view_is_forgotten_but_its_epoch_kept,
            a_device_list_is_stored_by_its_device_and_served_in_the_order_asked,
            the_node_knows_whom_it_holds_key_packages_messages_or_a_device_list_for,
            a_device_list_only_moves_to_a_higher_version,
            a_device_a_list_dropped_stays_out_whoever_uploads,
            a_device_list_not_signed_by_its_user_key_is_refused,
            only_a_device_of_the_stored_list_may_replace_it,
            concurrent_uploads_of_one_users_list_never_lose_the_newest,
            key_packages_are_served_only_to_fetches_of_their_suite,
            each_suite_has_its_own_last_resort_and_count,
            the_key_package_limit_holds_per_suite,
            a_key_package_stored_before_suites_is_an_x25519_one,
            the_totals_count_queued_messages_and_stored_key_packages,
            a_group_stored_by_its_id_is_kept_under_its_reference,
            a_message_id_claimed_before_message_keys_stays_claimed,
            a_key_backup_is_read_back_with_its_secret_and_replaced_by_the_next,
            a_key_backup_over_the_limit_is_refused_and_nothing_stored,
            a_copy_of_the_database_holds_no_key_backup_secret,
            a_groups_state_is_sealed_and_opens_only_with_its_state_key,
            a_commit_that_takes_a_device_out_moves_the_state_key_on,
            a_member_whose_key_does_not_open_the_state_hands_it_over_and_nobody_is_frozen,
        );

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig {
                cases: $cases,
                ..proptest::prelude::ProptestConfig::default()
            })]

            #[test]
            fn queues_behave_like_the_model(ops in conformance::queue_ops()) {
                let Some(backend) = $fresh else { return Ok(()) };
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(conformance::queues_behave_like_the_model(&backend, ops));
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use suite_on;

/// One test per named check, each on a fresh backend from `$fresh`.
#[allow(unused_macros)]
macro_rules! one_test_per_check {
    ($fresh:expr; $($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let Some(backend) = $fresh else { return };
            conformance::$check(&backend).await;
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use one_test_per_check;

#[allow(unused_imports)] // files checking other things use the helpers only
pub use device_lists::{
    a_device_a_list_dropped_stays_out_whoever_uploads,
    a_device_list_is_stored_by_its_device_and_served_in_the_order_asked,
    a_device_list_not_signed_by_its_user_key_is_refused, a_device_list_only_moves_to_a_higher_version,
    concurrent_uploads_of_one_users_list_never_lose_the_newest,
    only_a_device_of_the_stored_list_may_replace_it,
    the_node_knows_whom_it_holds_key_packages_messages_or_a_device_list_for,
};
#[allow(unused_imports)] // files checking other things use the helpers only
pub use key_backups::{
    a_copy_of_the_database_holds_no_key_backup_secret,
    a_key_backup_is_read_back_with_its_secret_and_replaced_by_the_next,
    a_key_backup_over_the_limit_is_refused_and_nothing_stored,
};
#[allow(unused_imports)] // files checking other things use the helpers only
pub use key_packages::{
    a_key_package_stored_before_suites_is_an_x25519_one, each_suite_has_its_own_last_resort_and_count,
    key_packages_are_served_only_to_fetches_of_their_suite, the_key_package_limit_holds_per_suite,
};
#[allow(unused_imports)] // files checking other things use the helpers only
pub use state_keys::{
    a_commit_that_takes_a_device_out_moves_the_state_key_on,
    a_groups_state_is_sealed_and_opens_only_with_its_state_key,
    a_member_whose_key_does_not_open_the_state_hands_it_over_and_nobody_is_frozen,
};

/// A way to open a backend's store.
pub trait Backend {
    /// Opens the store with `limits`: empty the first time, holding what was
    /// committed before on later calls (a restart).
    fn open_with(&self, limits: Limits) -> (Store, StoreCloser);

    /// [`Backend::open_with`] the default limits.
    fn open(&self) -> (Store, StoreCloser) {
        self.open_with(Limits::default())
    }

    /// Turns the backend's database (created by an open, closed since)
    /// back into one a node before protocol 6 left: KeyPackages without a
    /// ciphersuite, at the schema version before the one that added it,
    /// holding `packages` (bytes, last-resort mark; never expiring) of
    /// `identity`. The next open migrates it.
    fn store_key_packages_before_suites(&self, identity: IdentityKey, packages: &[(&[u8], bool)]);

    /// Turns the backend's database (created by an open, closed since,
    /// holding the one group `group`) back into one a node before group
    /// references left: every group table keyed by the group's id, at the
    /// schema version before the one that added them. The next open
    /// migrates it.
    fn key_groups_by_id(&self, group: &quicnprotochat_core::GroupId);

    /// Turns the backend's database (created by an open, closed since)
    /// back into one a node before message keys left, with message ids
    /// kept beside their sender, holding `sender`'s claim of `message_id`
    /// (made now). The next open migrates it.
    fn claim_message_id_by_sender(&self, sender: IdentityKey, message_id: &[u8]);

    /// Whether a copy of the backend's database (every store on it closed)
    /// holds `bytes`, raw or as the backend writes bytes out (hex); `None`
    /// where there is no copy to take (memory).
    fn copy_holds(&self, bytes: &[u8]) -> Option<bool>;
}

/// Closes a store: drops the handle and waits for its writer to finish.
pub async fn close((store, closer): (Store, StoreCloser)) {
    drop(store);
    closer.close().await;
}

pub fn key(byte: u8) -> IdentityKey {
    IdentityKey::from_bytes([byte; 32])
}

/// One ordinary, never-expiring KeyPackage record (the store does not parse
/// KeyPackages; the service validates them before).
fn package(bytes: &[u8]) -> Vec<ValidKeyPackage> {
    vec![ValidKeyPackage::new(
        bytes.to_vec(),
        false,
        u64::MAX,
        Suite::X25519,
    )]
}

fn envelope(recipients: &[u8], payload: &[u8]) -> Envelope {
    Envelope {
        recipients: recipients.iter().copied().map(key).collect(),
        payload: payload.to_vec(),
        message_id: None,
    }
}

async fn all(store: &Store, of: u8) -> Vec<QueuedMessage> {
    store.messages_after(key(of), Seq::ZERO, 0).await.unwrap()
}

pub async fn drain_returns_messages_in_fifo_order_and_empties_the_queue(backend: &impl Backend) {
    let (store, closer) = backend.open();
    for i in 0..10u8 {
        store
            .enqueue(key(0), key(1), vec![i], None)
            .await
            .unwrap()
            .unwrap();
    }
    store
        .enqueue(key(0), key(2), b"other".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    let drained = store.drain(key(1)).await.unwrap();
    assert_eq!(drained, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    assert!(store.drain(key(1)).await.unwrap().is_empty());
    assert_eq!(store.drain(key(2)).await.unwrap(), vec![b"other".to_vec()]);
    close((store, closer)).await;
}

/// What the node's `messages_queued` and `key_packages_stored` gauges read.
pub async fn the_totals_count_queued_messages_and_stored_key_packages(backend: &impl Backend) {
    let (store, closer) = backend.open();
    assert_eq!(store.totals().await.unwrap(), Totals::default());
    store
        .enqueue_batch(key(0), vec![envelope(&[1, 2, 3], b"fanned out")])
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(key(0), key(1), b"second".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    store
        .upload_key_packages(key(1), package(b"kp"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.totals().await.unwrap(),
        Totals {
            messages_queued: 4,
            key_packages_stored: 1
        }
    );
    store.drain(key(1)).await.unwrap();
    assert_eq!(store.totals().await.unwrap().messages_queued, 2);
    close((store, closer)).await;
}

pub async fn queued_messages_and_key_packages_survive_a_restart(backend: &impl Backend) {
    let (store, closer) = backend.open();
    store
        .enqueue(key(0), key(1), b"kept".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    store
        .upload_key_packages(key(1), package(b"kp"))
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;

    let (store, closer) = backend.open();
    assert_eq!(store.drain(key(1)).await.unwrap(), vec![b"kept".to_vec()]);
    assert_eq!(
        store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
        Some(b"kp".to_vec())
    );
    close((store, closer)).await;
}

pub async fn key_packages_are_served_once_oldest_first(backend: &impl Backend) {
    let (store, closer) = backend.open();
    store
        .upload_key_packages(key(1), package(b"first"))
        .await
        .unwrap()
        .unwrap();
    store
        .upload_key_packages(key(1), package(b"second"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
        Some(b"first".to_vec())
    );
    assert_eq!(
        store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
        Some(b"second".to_vec())
    );
    assert_eq!(
        store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
        None
    );
    assert_eq!(
        store.take_key_package(key(9), Suite::X25519, true).await.unwrap(),
        None
    );
    close((store, closer)).await;
}

/// Run on a multi-threaded runtime.
/// The same KeyPackage uploaded twice, or twice in one upload, is stored
/// once: served twice, its init key would open two Welcomes. Another
/// identity's copy is its own.
pub async fn a_key_package_uploaded_again_is_stored_once(backend: &impl Backend) {
    let (store, closer) = backend.open();
    for _ in 0..2 {
        store
            .upload_key_packages(key(1), package(b"same"))
            .await
            .unwrap()
            .unwrap();
    }
    let mut twice = package(b"other");
    twice.extend(package(b"other"));
    store.upload_key_packages(key(1), twice).await.unwrap().unwrap();
    store
        .upload_key_packages(key(2), package(b"same"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.count_key_packages(key(1), Suite::X25519).await.unwrap(),
        KeyPackageStock {
            count: 2,
            has_last_resort: false
        }
    );
    for expected in [Some(b"same".to_vec()), Some(b"other".to_vec()), None] {
        assert_eq!(
            store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
            expected
        );
    }
    assert_eq!(
        store.take_key_package(key(2), Suite::X25519, true).await.unwrap(),
        Some(b"same".to_vec())
    );
    close((store, closer)).await;
}

pub async fn concurrent_takes_never_hand_out_a_key_package_twice(backend: &impl Backend) {
    let (store, closer) = backend.open();
    for i in 0..50u32 {
        store
            .upload_key_packages(key(1), package(&i.to_be_bytes()))
            .await
            .unwrap()
            .unwrap();
    }
    let takers: Vec<_> = (0..100)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.take_key_package(key(1), Suite::X25519, true).await.unwrap() })
        })
        .collect();
    let mut served = Vec::new();
    for taker in takers {
        if let Some(package) = taker.await.unwrap() {
            served.push(package);
        }
    }
    assert_eq!(served.len(), 50);
    assert_eq!(served.iter().collect::<HashSet<_>>().len(), 50);
    close((store, closer)).await;
}

/// Run on a multi-threaded runtime.
pub async fn concurrent_enqueues_are_all_committed(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let senders: Vec<_> = (0..500u32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .enqueue(key(0), key(3), i.to_be_bytes().to_vec(), None)
                    .await
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap().unwrap().unwrap();
    }
    close((store, closer)).await;
    let (store, closer) = backend.open();
    let drained: HashSet<_> = store.drain(key(3)).await.unwrap().into_iter().collect();
    assert_eq!(drained.len(), 500);
    close((store, closer)).await;
}

pub async fn a_large_queue_is_drained_over_several_fetches_within_the_budget(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let big = vec![7u8; FETCH_BUDGET_BYTES / 3 + 1];
    for _ in 0..4 {
        store
            .enqueue(key(0), key(1), big.clone(), None)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(store.drain(key(1)).await.unwrap().len(), 2);
    assert_eq!(store.drain(key(1)).await.unwrap().len(), 2);
    assert!(store.drain(key(1)).await.unwrap().is_empty());
    close((store, closer)).await;
}

pub async fn a_queue_of_tiny_messages_is_drained_in_bounded_batches(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let total = FETCH_MAX_MESSAGES + 100;
    let envelopes: Vec<Envelope> = (0..total as u32)
        .map(|i| envelope(&[5], &i.to_be_bytes()))
        .collect();
    store.enqueue_batch(key(0), envelopes).await.unwrap().unwrap();
    let first = store.drain(key(5)).await.unwrap();
    assert_eq!(first.len(), FETCH_MAX_MESSAGES);
    let second = store.drain(key(5)).await.unwrap();
    assert_eq!(second.len(), 100);
    assert_eq!(second[0], (FETCH_MAX_MESSAGES as u32).to_be_bytes().to_vec());
    close((store, closer)).await;
}

pub async fn the_last_resort_is_served_only_when_nothing_else_is_left_and_kept(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let last = ValidKeyPackage::new(b"last resort".to_vec(), true, u64::MAX, Suite::X25519);
    store
        .upload_key_packages(key(1), vec![last])
        .await
        .unwrap()
        .unwrap();
    store
        .upload_key_packages(key(1), package(b"ordinary"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.count_key_packages(key(1), Suite::X25519).await.unwrap(),
        KeyPackageStock {
            count: 1,
            has_last_resort: true
        }
    );
    assert_eq!(
        store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
        Some(b"ordinary".to_vec())
    );
    for _ in 0..3 {
        assert_eq!(
            store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
            Some(b"last resort".to_vec())
        );
    }
    assert_eq!(
        store.count_key_packages(key(1), Suite::X25519).await.unwrap(),
        KeyPackageStock {
            count: 0,
            has_last_resort: true
        }
    );
    close((store, closer)).await;
}

pub async fn an_expired_key_package_is_never_served_or_counted(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let expired =
        |bytes: &[u8], last_resort| ValidKeyPackage::new(bytes.to_vec(), last_resort, 1, Suite::X25519);
    store
        .upload_key_packages(
            key(1),
            vec![expired(b"old", false), expired(b"old last resort", true)],
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.count_key_packages(key(1), Suite::X25519).await.unwrap(),
        KeyPackageStock {
            count: 0,
            has_last_resort: false
        }
    );
    assert_eq!(
        store.take_key_package(key(1), Suite::X25519, true).await.unwrap(),
        None
    );
    close((store, closer)).await;
}

pub async fn fetch_after_a_sequence_number_keeps_messages_until_acked(backend: &impl Backend) {
    let (store, closer) = backend.open();
    for i in 0..5u8 {
        store
            .enqueue(key(0), key(1), vec![i], None)
            .await
            .unwrap()
            .unwrap();
    }
    let every = all(&store, 1).await;
    assert_eq!(
        every.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert!(
        every.windows(2).all(|w| w[0].seq < w[1].seq),
        "strictly increasing"
    );
    let third = every[2].seq;
    assert_eq!(store.messages_after(key(1), third, 0).await.unwrap().len(), 2);
    assert_eq!(store.messages_after(key(1), Seq::ZERO, 2).await.unwrap().len(), 2);
    // Reading removes nothing; acking removes exactly up to the number.
    assert_eq!(all(&store, 1).await.len(), 5);
    assert_eq!(store.ack(key(1), third).await.unwrap(), 3);
    assert_eq!(all(&store, 1).await, every[3..].to_vec());
    // Sequence numbers are never reused, even after the queue empties.
    store.ack(key(1), Seq::new(u64::MAX)).await.unwrap();
    store
        .enqueue(key(0), key(1), vec![9], None)
        .await
        .unwrap()
        .unwrap();
    assert!(all(&store, 1).await[0].seq > every[4].seq);
    close((store, closer)).await;
}

pub async fn a_repeated_message_id_is_stored_once_per_sender(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let id = Some(b"id-1".to_vec());
    for _ in 0..2 {
        store
            .enqueue(key(0), key(1), b"once".to_vec(), id.clone())
            .await
            .unwrap()
            .unwrap();
    }
    // The same id from another sender is another message.
    store
        .enqueue(key(2), key(1), b"other sender".to_vec(), id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.drain(key(1)).await.unwrap(),
        vec![b"once".to_vec(), b"other sender".to_vec()]
    );
    close((store, closer)).await;
}

pub async fn a_fanned_out_payload_reaches_every_recipient_once(backend: &impl Backend) {
    let (store, closer) = backend.open();
    // Recipient 7 named twice: it still gets the payload once.
    let mut recipients: Vec<u8> = (1..=100).collect();
    recipients.push(7);
    store
        .enqueue_batch(key(0), vec![envelope(&recipients, &[7u8; 1000])])
        .await
        .unwrap()
        .unwrap();
    for n in 1..=100u8 {
        assert_eq!(
            store.drain(key(n)).await.unwrap(),
            vec![vec![7u8; 1000]],
            "recipient {n}"
        );
    }
    close((store, closer)).await;
}

pub async fn only_the_first_valid_commit_of_an_epoch_is_accepted_and_its_welcome_goes_with_it(
    backend: &impl Backend,
) {
    let (store, closer) = backend.open();
    let mut alice = mls::Member::create(1, b"g");
    let (first, first_welcome, _) = alice.add(8);
    alice.discard();
    let (second, second_welcome, _) = alice.add(9);
    let welcome_to = |seed: u8, welcome: &[u8]| Envelope {
        recipients: vec![mls::identity(seed).public_key()],
        payload: welcome.to_vec(),
        message_id: None,
    };
    let mut winner = alice.publication(first.clone(), &[key(7)], b"first", true);
    winner.welcome = Some(welcome_to(8, &first_welcome));
    store
        .publish_commit(alice.key(), winner.clone())
        .await
        .unwrap()
        .unwrap();
    // A retry of the accepted one is accepted and stores nothing new.
    store.publish_commit(alice.key(), winner).await.unwrap().unwrap();
    let mut loser = alice.publication(second, &[key(7)], b"second", true);
    loser.welcome = Some(welcome_to(9, &second_welcome));
    let refused = store.publish_commit(alice.key(), loser).await.unwrap();
    assert_eq!(refused, Err(CommitRefusal::Conflict { current_epoch: 1 }));
    assert_eq!(store.drain(key(7)).await.unwrap(), vec![first]);
    assert_eq!(
        store.drain(mls::identity(8).public_key()).await.unwrap(),
        vec![first_welcome]
    );
    assert!(
        store
            .drain(mls::identity(9).public_key())
            .await
            .unwrap()
            .is_empty(),
        "the losing Welcome is not delivered"
    );
    close((store, closer)).await;
}

/// What [`alice_adds_bob`] leaves for Bob to join with.
pub(crate) struct Added {
    pub(crate) group: quicnprotochat_core::GroupId,
    pub(crate) welcome: Vec<u8>,
    /// The provider holding Bob's KeyPackage.
    pub(crate) provider: openmls_rust_crypto::OpenMlsRustCrypto,
}

/// Alice makes group `g` and adds Bob (`mls::identity(2)`) with its first
/// Commit, the Welcome to him; her Commit is merged.
async fn alice_adds_bob(store: &Store) -> (mls::Member, Added) {
    alice_adds_bob_to(store, b"g").await
}

/// [`alice_adds_bob`] to a group with the id `group_id`.
pub(crate) async fn alice_adds_bob_to(store: &Store, group_id: &[u8]) -> (mls::Member, Added) {
    let mut alice = mls::Member::create(1, group_id);
    let (add, welcome, provider) = alice.add(2);
    let mut publication = alice.publication(add, &[], b"add", true);
    publication.welcome = Some(Envelope {
        recipients: vec![mls::identity(2).public_key()],
        payload: welcome.clone(),
        message_id: None,
    });
    let group = publication.group_id.clone();
    store
        .publish_commit(alice.key(), publication)
        .await
        .unwrap()
        .unwrap();
    alice.merge();
    (
        alice,
        Added {
            group,
            welcome,
            provider,
        },
    )
}

/// A group a node from before group references kept under its id is kept
/// under its reference (`GroupRef`) by the migration: its Welcome tree,
/// view and epoch are all found, and it goes on as before.
pub async fn a_group_stored_by_its_id_is_kept_under_its_reference(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let (mut alice, added) = alice_adds_bob(&store).await;
    close((store, closer)).await;
    backend.key_groups_by_id(&added.group);

    let (store, closer) = backend.open();
    let bob = mls::identity(2).public_key();
    let key = mls::welcome_key(&added.provider, &added.welcome);
    assert!(
        store
            .welcome_tree(added.group.clone(), 1, Some(key), bob)
            .await
            .unwrap()
            .is_some(),
        "the tree kept for Bob"
    );
    // A Commit from the epoch before is one the node knows is stale.
    let mut behind = mls::Member::create(1, b"g");
    let old = behind.update();
    assert!(
        store
            .publish_commit(alice.key(), behind.publication(old, &[bob], b"old", false))
            .await
            .unwrap()
            .is_err()
    );
    let update = alice.update();
    let first = store
        .publish_commit(
            alice.key(),
            alice.publication(update.clone(), &[bob], b"after", false),
        )
        .await
        .unwrap();
    if first == Err(CommitRefusal::UnknownGroup) {
        // A database whose views were kept in clear forgets them on the
        // upgrade to sealed state (SQLite V21, PostgreSQL 11): the member
        // hands the state over, in the epoch the node kept.
        store
            .publish_commit(alice.key(), alice.publication(update, &[bob], b"after", true))
            .await
            .unwrap()
            .unwrap();
    } else {
        first.unwrap();
    }
    close((store, closer)).await;
}

/// A message id claimed before the node kept message keys is still
/// claimed after the upgrade: a retry across it is stored once, and the
/// same id from another sender is still another message.
pub async fn a_message_id_claimed_before_message_keys_stays_claimed(backend: &impl Backend) {
    close(backend.open()).await;
    backend.claim_message_id_by_sender(key(0), b"id-1");
    let (store, closer) = backend.open();
    let id = Some(b"id-1".to_vec());
    store
        .enqueue(key(0), key(1), b"retried".to_vec(), id.clone())
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(key(2), key(1), b"other sender".to_vec(), id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.drain(key(1)).await.unwrap(), vec![b"other sender".to_vec()]);
    close((store, closer)).await;
}

/// A standalone proposal is kept on its own beside the group's view: it
/// survives a restart, the Commit of its epoch that references it is
/// accepted, and the next epoch goes on without it.
pub async fn a_kept_proposal_survives_a_restart_and_a_commit_of_its_epoch_takes_it(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let (mut alice, added) = alice_adds_bob(&store).await;
    let bob_key = mls::identity(2).public_key();
    let key = mls::welcome_key(&added.provider, &added.welcome);
    let tree = store
        .welcome_tree(added.group, 1, Some(key), bob_key)
        .await
        .unwrap()
        .unwrap();
    let (welcome, provider) = (added.welcome, added.provider);
    let (tree, state_key) = tree;
    let mut bob = mls::join(2, provider, &welcome, &tree, state_key.expect("the state key"));
    let leave = bob.leave(&[alice.key()], b"leave");
    store
        .publish_proposal(bob.key(), leave.clone())
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;

    let (store, closer) = backend.open();
    alice
        .group
        .receive(
            &alice.provider,
            &leave.proposal.payload,
            &quicnprotochat_core::NoDeviceLists,
        )
        .unwrap();
    let commit = alice
        .group
        .commit_pending_proposals(&alice.provider, &alice.identity)
        .unwrap();
    store
        .publish_commit(alice.key(), alice.publication(commit, &[bob.key()], b"c", false))
        .await
        .unwrap()
        .unwrap();
    alice.merge();
    // The next epoch goes on without it.
    let update = alice.update();
    store
        .publish_commit(alice.key(), alice.publication(update, &[], b"u", false))
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
}

pub async fn the_tree_of_an_epoch_that_added_members_is_kept_for_them_across_a_restart(
    backend: &impl Backend,
) {
    let (store, closer) = backend.open();
    let (
        alice,
        Added {
            group,
            welcome,
            provider,
        },
    ) = alice_adds_bob(&store).await;
    let bob = mls::identity(2).public_key();
    close((store, closer)).await;

    let (store, closer) = backend.open();
    // Bob computes the key of the epoch his Welcome starts from the
    // Welcome alone.
    let key = mls::welcome_key(&provider, &welcome);
    let tree = store
        .welcome_tree(group.clone(), 1, Some(key.clone()), bob)
        .await
        .unwrap()
        .unwrap();
    // The Welcome carries no tree; the kept one is the one it commits to.
    let (tree, state_key) = tree;
    let joined = mls::join(2, provider, &welcome, &tree, state_key.expect("the state key"));
    assert_eq!(joined.group.members(), alice.group.members());
    // Without the key, or with another, the caller gets what an epoch
    // without a tree gets: nothing, told apart by nobody.
    assert_eq!(
        store.welcome_tree(group.clone(), 1, None, bob).await.unwrap(),
        None
    );
    let guessed = quicnprotochat_core::EpochKey::from_bytes([2; 32]);
    assert_eq!(
        store
            .welcome_tree(group.clone(), 1, Some(guessed), bob)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .welcome_tree(group.clone(), 0, Some(key.clone()), bob)
            .await
            .unwrap(),
        None
    );
    // Purged with the messages it came with.
    store.purge(i64::MAX).await.unwrap();
    assert_eq!(store.welcome_tree(group, 1, Some(key), bob).await.unwrap(), None);
    close((store, closer)).await;
}

/// Publishes `commit` of `member` to `to`: refused as an unknown group
/// without the group's state, accepted with it.
pub(crate) async fn unknown_until_the_state_comes_with_it(
    store: &Store,
    member: &mls::Member,
    to: &[IdentityKey],
    commit: Vec<u8>,
    id: &[u8],
) {
    assert_eq!(
        store
            .publish_commit(member.key(), member.publication(commit.clone(), to, id, false))
            .await
            .unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    store
        .publish_commit(member.key(), member.publication(commit, to, id, true))
        .await
        .unwrap()
        .unwrap();
}

pub async fn a_commit_for_any_other_epoch_or_not_valid_for_the_group_is_refused(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let mut alice = mls::Member::create(1, b"g");
    let commit = alice.update();
    unknown_until_the_state_comes_with_it(&store, &alice, &[], commit, b"0").await;
    alice.merge();
    // Another epoch-0 Commit of the group, under another id: epoch 0 is
    // taken. Only a caller whose state key opens the group learns its epoch
    // (protocol 9); with any other key the group is one the node does not
    // know.
    let mut stale = mls::Member::create(1, b"g");
    let old = stale.update();
    assert_eq!(
        store
            .publish_commit(alice.key(), stale.publication(old.clone(), &[], b"again", false))
            .await
            .unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    stale.state_key = alice.state_key.clone();
    assert_eq!(
        store
            .publish_commit(alice.key(), stale.publication(old, &[], b"again", false))
            .await
            .unwrap(),
        Err(CommitRefusal::Conflict { current_epoch: 1 })
    );
    // Epoch 1, but from someone else's connection: a non-member, told
    // nothing about the group (as if there were none).
    let next = alice.update();
    let publication = alice.publication(next, &[key(2)], b"1", false);
    assert_eq!(
        store.publish_commit(key(2), publication.clone()).await.unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    store
        .publish_commit(alice.key(), publication)
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
}

pub async fn a_queue_never_holds_more_than_its_depth_and_a_refusal_stores_nothing(backend: &impl Backend) {
    let (store, closer) = backend.open_with(Limits {
        max_queue_depth: 3,
        ..Limits::default()
    });
    store
        .enqueue(key(0), key(1), b"a".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    // One batch naming the queue three more times than it has room for,
    // beside a queue with room: refused whole, naming only the full queue.
    let batch: Vec<Envelope> = (0..3).map(|_| envelope(&[2, 1], b"flood")).collect();
    assert_eq!(
        store.enqueue_batch(key(0), batch).await.unwrap(),
        Err(SendRefusal::QueueFull(QueueFull {
            recipients: vec![key(1)],
            max_depth: 3,
            max_bytes: Limits::default().max_queue_bytes,
        }))
    );
    assert_eq!(all(&store, 1).await.len(), 1);
    assert!(all(&store, 2).await.is_empty());
    // A refused Commit fixes no epoch and uses no message id.
    store
        .enqueue(key(0), key(1), b"b".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(key(0), key(1), b"c".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    let mut alice = mls::Member::create(7, b"g");
    let payload = alice.update();
    let commit = alice.publication(payload.clone(), &[key(1)], b"commit", true);
    assert_eq!(
        store.publish_commit(alice.key(), commit.clone()).await.unwrap(),
        Err(CommitRefusal::QueueFull(QueueFull {
            recipients: vec![key(1)],
            max_depth: 3,
            max_bytes: Limits::default().max_queue_bytes,
        }))
    );
    let last = all(&store, 1).await.last().unwrap().seq;
    store.ack(key(1), last).await.unwrap();
    store.publish_commit(alice.key(), commit).await.unwrap().unwrap();
    assert_eq!(store.drain(key(1)).await.unwrap(), vec![payload]);
    close((store, closer)).await;
}

pub async fn a_queue_never_holds_more_bytes_than_its_limit_and_acks_make_room(backend: &impl Backend) {
    let limits = Limits {
        max_queue_bytes: 1000,
        ..Limits::default()
    };
    let (store, closer) = backend.open_with(limits);
    // A payload shared by two queues counts in each.
    store
        .enqueue_batch(key(0), vec![envelope(&[1, 2], &[7; 600])])
        .await
        .unwrap()
        .unwrap();
    let refused = store
        .enqueue_batch(
            key(0),
            vec![envelope(&[2], &[8; 300]), envelope(&[1, 3], &[9; 401])],
        )
        .await
        .unwrap();
    assert_eq!(
        refused,
        Err(SendRefusal::QueueFull(QueueFull {
            recipients: vec![key(1)],
            max_depth: u32::try_from(limits.max_queue_depth).unwrap(),
            max_bytes: 1000,
        }))
    );
    assert_eq!(all(&store, 2).await.len(), 1, "refused whole");
    close((store, closer)).await;
    // Across a restart, and once acked, the bytes are counted right.
    let (store, closer) = backend.open_with(limits);
    store
        .enqueue(key(0), key(1), vec![1; 400], None)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        store.enqueue(key(0), key(1), vec![1; 1], None).await.unwrap(),
        Err(SendRefusal::QueueFull(_))
    ));
    let first = all(&store, 1).await[0].seq;
    store.ack(key(1), first).await.unwrap();
    store
        .enqueue(key(0), key(1), vec![1; 600], None)
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
}

pub async fn an_identity_keeps_at_most_its_limit_of_key_packages(backend: &impl Backend) {
    let limits = Limits {
        max_key_packages: 3,
        ..Limits::default()
    };
    let (store, closer) = backend.open_with(limits);
    let two = [package(b"a"), package(b"b")].concat();
    store.upload_key_packages(key(1), two).await.unwrap().unwrap();
    let two = [package(b"c"), package(b"d")].concat();
    assert_eq!(
        store.upload_key_packages(key(1), two).await.unwrap(),
        Err(TooManyKeyPackages {
            suite: Suite::X25519,
            stored: 2,
            max: 3
        })
    );
    assert_eq!(
        store.count_key_packages(key(1), Suite::X25519).await.unwrap(),
        KeyPackageStock {
            count: 2,
            has_last_resort: false
        },
        "refused whole"
    );
    store
        .upload_key_packages(key(1), package(b"c"))
        .await
        .unwrap()
        .unwrap();
    // Taking one makes room again.
    store
        .take_key_package(key(1), Suite::X25519, true)
        .await
        .unwrap()
        .unwrap();
    store
        .upload_key_packages(key(1), package(b"d"))
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
}

pub async fn an_application_message_from_an_epoch_its_group_left_is_refused(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let mut alice = mls::Member::create(1, b"g");
    let old = alice
        .group
        .send(&alice.provider, &alice.identity, b"epoch 0")
        .unwrap();
    let update = alice.update();
    let publication = alice.publication(update, &[], b"up", true);
    store
        .publish_commit(alice.key(), publication)
        .await
        .unwrap()
        .unwrap();
    alice.merge();
    let stale = vec![Envelope {
        recipients: vec![key(2)],
        payload: old.clone(),
        message_id: None,
    }];
    assert_eq!(
        store
            .enqueue_batch_with_keys(alice.key(), stale.clone(), vec![alice.state_key.clone()])
            .await
            .unwrap(),
        Err(SendRefusal::StaleEpoch(
            quicnprotochat_proto::outcome::StaleEpoch {
                group_id: b"g".to_vec(),
                current_epoch: 1,
            }
        ))
    );
    assert!(all(&store, 2).await.is_empty());
    // The group's key, but not from a member: nothing said about the group.
    store
        .enqueue_batch_with_keys(key(3), stale.clone(), vec![alice.state_key.clone()])
        .await
        .unwrap()
        .unwrap();
    // A member without the key (or with a wrong one) is told nothing
    // either: the node cannot tell it is a member, and the message is
    // queued as any opaque payload.
    store
        .enqueue_batch_with_keys(alice.key(), stale, vec![StateKey::from_bytes([3; 32])])
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(alice.key(), key(2), old, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all(&store, 2).await.len(), 3);
    store.ack(key(2), Seq::new(3)).await.unwrap();
    let current = alice
        .group
        .send(&alice.provider, &alice.identity, b"epoch 1")
        .unwrap();
    store
        .enqueue(alice.key(), key(2), current, None)
        .await
        .unwrap()
        .unwrap();
    // Payloads that are no PrivateMessage stay opaque.
    store
        .enqueue(alice.key(), key(2), b"opaque".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
}

pub async fn an_idle_groups_view_is_forgotten_but_its_epoch_kept(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let mut alice = mls::Member::create(1, b"g");
    let stale = alice.update();
    alice.discard();
    let update = alice.update();
    store
        .publish_commit(alice.key(), alice.publication(update, &[], b"first", true))
        .await
        .unwrap()
        .unwrap();
    let stale = mls::Member::publication(&alice, stale, &[], b"stale", true);
    alice.merge();
    assert_eq!(
        store.purge_idle_groups(0).await.unwrap(),
        0,
        "nothing is that old"
    );
    assert_eq!(store.purge_idle_groups(i64::MAX).await.unwrap(), 1);

    // Nobody can hand the node an older state than the one it kept the
    // fingerprint of, and it says nothing of the group to whoever tries.
    assert_eq!(
        store.publish_commit(alice.key(), stale).await.unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    // Nor a state of the right epoch of someone's own making.
    let mut stranger = mls::Member::create(9, b"g");
    let own = stranger.update();
    stranger.group.merge_pending_commit(&stranger.provider).unwrap();
    drop(own);
    assert_eq!(stranger.epoch(), 1);
    let taken = stranger.update();
    assert_eq!(
        store
            .publish_commit(stranger.key(), stranger.publication(taken, &[], b"take", true))
            .await
            .unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    // In the kept epoch: unknown until a member hands the state over again.
    let next = alice.update();
    unknown_until_the_state_comes_with_it(&store, &alice, &[], next, b"next").await;
    close((store, closer)).await;
}

pub async fn a_read_sees_every_commit_as_soon_as_it_is_answered(backend: &impl Backend) {
    let (store, closer) = backend.open();
    for i in 0..200u8 {
        store
            .enqueue(key(0), key(1), vec![i; 100], None)
            .await
            .unwrap()
            .unwrap();
        let read = all(&store, 1).await;
        assert_eq!(read.len(), usize::from(i) + 1);
        assert_eq!(read.last().unwrap().payload, vec![i; 100]);
    }
    close((store, closer)).await;
}

/// One step of [`queues_behave_like_the_model`].
#[derive(Debug, Clone)]
pub enum QueueOp {
    Enqueue { to: u8, payload: Vec<u8> },
    Batch { to: Vec<u8>, payload: Vec<u8> },
    FetchAfter { of: u8, index: usize },
    Ack { of: u8, index: usize },
    Drain { of: u8 },
}

/// Random sequences of [`QueueOp`]s on three queues.
pub fn queue_ops() -> impl Strategy<Value = Vec<QueueOp>> {
    let payload = proptest::collection::vec(any::<u8>(), 1..24);
    let op = prop_oneof![
        4 => (0..3u8, payload.clone()).prop_map(|(to, payload)| QueueOp::Enqueue { to, payload }),
        2 => (proptest::sample::subsequence(vec![0u8, 1, 2], 1..=3), payload)
            .prop_map(|(to, payload)| QueueOp::Batch { to, payload }),
        2 => (0..3u8, 0..12usize).prop_map(|(of, index)| QueueOp::FetchAfter { of, index }),
        2 => (0..3u8, 0..12usize).prop_map(|(of, index)| QueueOp::Ack { of, index }),
        1 => (0..3u8).prop_map(|of| QueueOp::Drain { of }),
    ];
    proptest::collection::vec(op, 1..40)
}

/// What each queue must hold, oldest first, and the highest sequence number
/// ever seen per queue.
#[derive(Default)]
struct Model {
    queues: HashMap<u8, Vec<Vec<u8>>>,
    highest_seen: HashMap<u8, Seq>,
}

impl Model {
    /// Reads the whole queue of `of` and checks it against the model: same
    /// payloads in the same order, sequence numbers strictly increasing.
    async fn check(&mut self, store: &Store, of: u8) -> Vec<QueuedMessage> {
        let messages = all(store, of).await;
        let expected = self.queues.get(&of).cloned().unwrap_or_default();
        let payloads: Vec<Vec<u8>> = messages.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(payloads, expected, "queue {of} is FIFO and complete");
        assert!(
            messages.windows(2).all(|w| w[0].seq < w[1].seq),
            "seq strictly increasing"
        );
        messages
    }

    fn saw(&mut self, of: u8, seq: Seq) {
        let seen = self.highest_seen.entry(of).or_default();
        *seen = (*seen).max(seq);
    }
}

/// The queues behave like a simple model — FIFO per recipient, sequence
/// numbers strictly increasing and never reused, ack deletes exactly up to
/// the number, drain empties — under `ops`.
pub async fn queues_behave_like_the_model(backend: &impl Backend, ops: Vec<QueueOp>) {
    let (store, closer) = backend.open();
    let mut model = Model::default();
    for op in ops {
        match op {
            QueueOp::Enqueue { to, payload } => {
                store
                    .enqueue(key(9), key(to), payload.clone(), None)
                    .await
                    .unwrap()
                    .unwrap();
                model.queues.entry(to).or_default().push(payload);
            }
            QueueOp::Batch { to, payload } => {
                store
                    .enqueue_batch(key(9), vec![envelope(&to, &payload)])
                    .await
                    .unwrap()
                    .unwrap();
                for n in to {
                    model.queues.entry(n).or_default().push(payload.clone());
                }
            }
            QueueOp::FetchAfter { of, index } => {
                let every = model.check(&store, of).await;
                if let Some(message) = every.get(index) {
                    let after = store.messages_after(key(of), message.seq, 0).await.unwrap();
                    assert_eq!(
                        after,
                        every[index + 1..].to_vec(),
                        "fetch after a seq is the suffix"
                    );
                }
                if let Some(last) = every.last() {
                    let seen = model.highest_seen.get(&of).copied().unwrap_or_default();
                    assert!(
                        every[0].seq > seen || every.iter().any(|m| m.seq == seen),
                        "no seq reused"
                    );
                    model.saw(of, last.seq);
                }
            }
            QueueOp::Ack { of, index } => {
                let every = model.check(&store, of).await;
                if let Some(message) = every.get(index) {
                    let deleted = store.ack(key(of), message.seq).await.unwrap();
                    assert_eq!(deleted, index + 1, "ack deletes exactly up to the number");
                    model.queues.get_mut(&of).unwrap().drain(..=index);
                    model.saw(of, every.last().unwrap().seq);
                }
                model.check(&store, of).await;
            }
            QueueOp::Drain { of } => {
                let expected = model.queues.remove(&of).unwrap_or_default();
                assert_eq!(
                    store.drain(key(of)).await.unwrap(),
                    expected,
                    "drain returns everything in order"
                );
                assert!(all(&store, of).await.is_empty(), "drain empties");
            }
        }
    }
    // New messages get sequence numbers above everything seen before.
    for of in 0..3u8 {
        store
            .enqueue(key(9), key(of), vec![0xff], None)
            .await
            .unwrap()
            .unwrap();
        model.queues.entry(of).or_default().push(vec![0xff]);
        let every = model.check(&store, of).await;
        let newest = every.last().unwrap().seq;
        assert!(
            newest > model.highest_seen.get(&of).copied().unwrap_or_default(),
            "never reused"
        );
    }
    close((store, closer)).await;
}
