//! The node API on the in-memory store, with no capnp and no network: who
//! may call, what each limit answers, how store refusals become outcomes.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    GroupId, IdentityKey, IdentityKeypair, KeyPackageStock, Seq, Suite, generate_key_package,
};
use quicnprotochat_proto::outcome::{
    ChangeOutcome, FetchedGroupInfo, FetchedKeyPackage, SendOutcome, TooLarge, UploadOutcome,
};
use quicnprotochat_proto::wire;

use super::*;
use crate::limits::RateLimits;
use crate::store::{Limits, MemoryDatabase, Store, StoreCloser};

const HOME: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A node on a fresh in-memory store with `rate_limits`.
fn node(rate_limits: RateLimits) -> (Arc<Shared>, StoreCloser) {
    let (store, closer) = Store::open_memory(&MemoryDatabase::default(), Limits::default()).unwrap();
    let shared = Shared::new(store, 64 * 1024, rate_limits, wire::KeyPackagePolicy::default());
    (shared, closer)
}

/// No limit switched on.
fn unlimited() -> RateLimits {
    RateLimits::new(0, 0, 0, 0, 0, 0, 0)
}

fn key(byte: u8) -> IdentityKey {
    IdentityKey::from_bytes([byte; 32])
}

fn envelope(recipients: &[IdentityKey], payload: &[u8]) -> wire::Envelope {
    wire::Envelope {
        recipients: recipients.to_vec(),
        payload: payload.to_vec(),
        message_id: None,
    }
}

#[tokio::test]
async fn a_queue_is_its_owners_alone_and_sending_needs_an_identity() {
    let (shared, _closer) = node(unlimited());
    let anonymous = Api::new(shared.clone(), None, HOME);
    let other = Api::new(shared.clone(), Some(key(2)), HOME);
    let owner = Api::new(shared, Some(key(1)), HOME);

    let denied = anonymous.enqueue(key(1), b"hi", None).await.unwrap_err();
    assert!(matches!(denied, ServiceError::PermissionDenied(_)), "{denied}");
    assert_eq!(
        other.enqueue(key(1), b"hi", None).await.unwrap(),
        SendOutcome::Accepted
    );

    for reader in [&anonymous, &other] {
        let denied = reader.fetch_since(key(1), Seq::new(0), 0).await.unwrap_err();
        assert!(matches!(denied, ServiceError::PermissionDenied(_)), "{denied}");
        let denied = reader.ack(key(1), Seq::new(1)).await.unwrap_err();
        assert!(matches!(denied, ServiceError::PermissionDenied(_)), "{denied}");
    }
    let messages = owner.fetch_since(key(1), Seq::new(0), 0).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].payload, b"hi");
    owner.ack(key(1), messages[0].seq).await.unwrap();
    assert!(
        owner
            .fetch_since(key(1), Seq::new(0), 0)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_send_budget_answers_a_wait_or_too_large_and_stores_nothing() {
    // 10 messages a second: a burst of 20.
    let (shared, _closer) = node(RateLimits::new(10, 0, 0, 0, 0, 0, 0));
    let sender = Api::new(shared.clone(), Some(key(1)), HOME);
    let owner = Api::new(shared, Some(key(2)), HOME);

    let too_many = vec![envelope(&[key(2)], b"x"); 21];
    assert_eq!(
        sender.enqueue_batch(too_many, Vec::new()).await.unwrap(),
        SendOutcome::TooLarge(TooLarge {
            max_messages: 20,
            max_bytes: 0
        })
    );
    let burst = vec![envelope(&[key(2)], b"x"); 20];
    assert_eq!(
        sender.enqueue_batch(burst, Vec::new()).await.unwrap(),
        SendOutcome::Accepted
    );
    let SendOutcome::RateLimited(limited) = sender.enqueue(key(2), b"y", None).await.unwrap() else {
        panic!("over the budget");
    };
    assert!(limited.retry_after > Duration::ZERO && limited.retry_after <= Duration::from_millis(100));
    assert_eq!(owner.fetch_since(key(2), Seq::new(0), 0).await.unwrap().len(), 20);
}

#[tokio::test]
async fn a_group_change_is_never_too_large_only_told_to_wait() {
    let (shared, _closer) = node(RateLimits::new(1, 0, 0, 0, 0, 0, 0));
    let sender = Api::new(shared, Some(key(1)), HOME);
    let recipients: Vec<IdentityKey> = (2..40).map(key).collect();
    let proposal = |epoch| wire::ProposalPublication {
        group_id: GroupId::new(vec![7; 16]).unwrap(),
        epoch,
        proposal: envelope(&recipients, b"not a proposal"),
        state_key: StateKey::from_bytes([7; 32]),
    };
    // 38 recipients against a burst of 2: charged whole (the store then
    // refuses it, for a group it does not know), and the debt it leaves
    // makes the next one wait.
    let first = sender.publish_proposal(proposal(0)).await.unwrap();
    assert!(!matches!(first, ChangeOutcome::RateLimited(_)), "{first:?}");
    let ChangeOutcome::RateLimited(limited) = sender.publish_proposal(proposal(0)).await.unwrap() else {
        panic!("in debt");
    };
    assert!(limited.retry_after > Duration::from_secs(30), "{limited:?}");
}

#[tokio::test]
async fn group_state_is_for_members_and_an_unknown_group_is_told_apart() {
    let (shared, _closer) = node(unlimited());
    let member = Api::new(shared.clone(), Some(key(1)), HOME);
    let anonymous = Api::new(shared, None, HOME);
    let group = GroupId::new(vec![9; 16]).unwrap();
    assert_eq!(
        member
            .fetch_group_info(group.clone(), StateKey::from_bytes([1; 32]))
            .await
            .unwrap(),
        FetchedGroupInfo::NotMember
    );
    let denied = anonymous
        .fetch_group_info(group, StateKey::from_bytes([1; 32]))
        .await
        .unwrap_err();
    assert!(matches!(denied, ServiceError::PermissionDenied(_)), "{denied}");
}

#[tokio::test]
async fn key_packages_are_checked_stored_counted_and_handed_out() {
    let (shared, _closer) = node(unlimited());
    let alice = IdentityKeypair::generate();
    let provider = OpenMlsRustCrypto::default();
    let package = generate_key_package(&provider, &alice).unwrap();
    let owner = Api::new(shared.clone(), Some(alice.public_key()), HOME);
    let stranger = Api::new(shared, None, HOME);

    let denied = stranger
        .upload_key_packages(alice.public_key(), KeyPackageUpload::One(package.clone()))
        .await
        .unwrap_err();
    assert!(matches!(denied, ServiceError::PermissionDenied(_)), "{denied}");
    let invalid = owner
        .upload_key_packages(
            alice.public_key(),
            KeyPackageUpload::List(vec![package.clone(), b"junk".to_vec()]),
        )
        .await
        .unwrap_err();
    assert!(invalid.to_string().contains("packages[1]"), "{invalid}");
    let empty = owner
        .upload_key_packages(alice.public_key(), KeyPackageUpload::List(Vec::new()))
        .await
        .unwrap_err();
    assert!(empty.to_string().contains("1 to 1000"), "{empty}");

    let uploaded = owner
        .upload_key_packages(alice.public_key(), KeyPackageUpload::One(package.clone()))
        .await
        .unwrap();
    assert_eq!(uploaded.outcome, UploadOutcome::Stored);
    assert_eq!(uploaded.fingerprints, vec![fingerprint(&package)]);
    assert_eq!(
        owner
            .key_package_count(alice.public_key(), Suite::X25519)
            .await
            .unwrap(),
        KeyPackageStock {
            count: 1,
            has_last_resort: false
        }
    );
    assert_eq!(
        stranger
            .fetch_key_package(alice.public_key(), Suite::X25519)
            .await
            .unwrap(),
        FetchedKeyPackage::Package(package)
    );
    assert_eq!(
        stranger
            .fetch_key_package(alice.public_key(), Suite::X25519)
            .await
            .unwrap(),
        FetchedKeyPackage::None
    );
}

#[tokio::test]
async fn an_upload_over_its_rate_waits_and_one_over_the_burst_is_refused_by_name() {
    // 3 KeyPackages a minute per identity, in bursts of 3.
    let (shared, _closer) = node(RateLimits::new(0, 0, 0, 0, 0, 0, 3));
    let owner = Api::new(shared, Some(key(1)), HOME);
    let junk = |n| KeyPackageUpload::List(vec![b"junk".to_vec(); n]);

    let over = owner.upload_key_packages(key(1), junk(4)).await.unwrap_err();
    assert!(
        over.to_string()
            .contains("more than this node takes in one upload (3)"),
        "{over}"
    );
    // Charged before they are checked: three invalid ones spend the rate.
    assert!(owner.upload_key_packages(key(1), junk(3)).await.is_err());
    let uploaded = owner.upload_key_packages(key(1), junk(1)).await.unwrap();
    assert!(
        matches!(uploaded.outcome, UploadOutcome::RateLimited(_)),
        "{uploaded:?}"
    );
    assert!(uploaded.fingerprints.is_empty());
}

#[tokio::test]
async fn pings_and_device_list_fetches_over_their_rate_are_exceptions() {
    let (shared, _closer) = node(RateLimits::new(0, 0, 0, 1, 1, 0, 0));
    let api = Api::new(shared, None, HOME);
    let info = api.ping().unwrap();
    assert_eq!(info.protocol_version, quicnprotochat_proto::PROTOCOL_VERSION);
    assert_eq!(info.max_payload_bytes, 64 * 1024);
    api.ping().unwrap();
    assert!(matches!(api.ping(), Err(ServiceError::RateLimited(_))));

    let too_many = vec![key(1); wire::MAX_DEVICE_LIST_FETCH + 1];
    let refused = api.fetch_device_lists(too_many).await.unwrap_err();
    assert!(refused.to_string().contains("userKeys"), "{refused}");
    assert!(api.fetch_device_lists(vec![key(1)]).await.unwrap().is_empty());
    assert!(api.fetch_device_lists(vec![key(1)]).await.unwrap().is_empty());
    assert!(matches!(
        api.fetch_device_lists(vec![key(1)]).await,
        Err(ServiceError::RateLimited(_))
    ));
}

#[tokio::test]
async fn a_session_holds_a_few_subscriptions_and_a_closing_node_takes_no_calls() {
    let (shared, _closer) = node(unlimited());
    let api = Api::new(shared.clone(), Some(key(1)), HOME);
    let denied = api.subscribe(key(2), Seq::new(0)).err().unwrap();
    assert!(matches!(denied, ServiceError::PermissionDenied(_)), "{denied}");
    let live: Vec<Subscription> = (0..MAX_SUBSCRIPTIONS_PER_SESSION)
        .map(|_| api.subscribe(key(1), Seq::new(0)).unwrap())
        .collect();
    assert!(matches!(
        api.subscribe(key(1), Seq::new(0)),
        Err(ServiceError::TooManyCalls(MAX_SUBSCRIPTIONS_PER_SESSION))
    ));
    drop(live);
    api.subscribe(key(1), Seq::new(0)).unwrap();

    shared.calls.close();
    assert!(matches!(
        api.fetch_since(key(1), Seq::new(0), 0).await,
        Err(ServiceError::ShuttingDown)
    ));
}
