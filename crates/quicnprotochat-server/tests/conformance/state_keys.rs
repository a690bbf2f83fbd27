//! A group's public state kept under its state key (protocol 9): sealed in
//! the database, opened only by a caller presenting the key, moved to a new
//! key by a Commit that takes a device out, and handed over again by a
//! member whose key does not open it, so that a wrong key freezes nobody.

use quicnprotochat_core::{GroupId, NoDeviceLists, StateKey};
use quicnprotochat_server::delivery::CommitRefusal;

use super::{Backend, alice_adds_bob_to, close, mls, unknown_until_the_state_comes_with_it};

/// A group id long enough that finding it in a copy of the database means
/// it was stored.
const GROUP: &[u8] = b"the id of a group nobody may see";

/// Alice (`identity(1)`) makes the group and adds Bob (`identity(2)`), who
/// joins with the tree and state key the node keeps for him.
async fn alice_and_bob(store: &quicnprotochat_server::store::Store) -> (mls::Member, mls::Member) {
    let (alice, added) = alice_adds_bob_to(store, GROUP).await;
    let bob = mls::identity(2).public_key();
    let key = mls::welcome_key(&added.provider, &added.welcome);
    let (tree, state_key) = store
        .welcome_tree(added.group, 1, Some(key), bob)
        .await
        .unwrap()
        .expect("the tree kept for Bob");
    let state_key = state_key.expect("the group's state key comes with the tree");
    assert_eq!(state_key, alice.state_key, "the joiner gets the members' key");
    (
        alice,
        mls::join(2, added.provider, &added.welcome, &tree, state_key),
    )
}

fn group() -> GroupId {
    GroupId::new(GROUP.to_vec()).unwrap()
}

pub async fn a_groups_state_is_sealed_and_opens_only_with_its_state_key(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let (mut alice, bob) = alice_and_bob(&store).await;
    // Bob rejoins from what the node serves to a member with the key.
    let served = store
        .group_info(group(), bob.state_key.clone(), bob.key())
        .await
        .unwrap()
        .expect("served to a member with the key");
    assert!(served.is_some());
    // A member with another key is told what a stranger is.
    assert_eq!(
        store
            .group_info(group(), StateKey::from_bytes([7; 32]), bob.key())
            .await
            .unwrap(),
        Err(quicnprotochat_server::delivery::NotAMember)
    );
    // A Commit with another key finds no group: neither its epoch nor that
    // it exists is told.
    let update = alice.update();
    let mut publication = alice.publication(update, &[bob.key()], b"update", false);
    publication.state_key = StateKey::from_bytes([7; 32]);
    assert_eq!(
        store.publish_commit(alice.key(), publication).await.unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    close((store, closer)).await;
    // The database holds neither the group's id nor Alice's key (Bob's is
    // on his queue, which holds the Welcome: mechanism 3's part).
    if let Some(holds) = backend.copy_holds(GROUP) {
        assert!(!holds, "the group's id is in the database");
    }
    if let Some(holds) = backend.copy_holds(alice.key().as_bytes()) {
        assert!(!holds, "a member's identity key is in the database");
    }
}

pub async fn a_commit_that_takes_a_device_out_moves_the_state_key_on(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let (mut alice, bob) = alice_and_bob(&store).await;
    // An update takes nobody out: it keeps the key, and a new one with it
    // is refused.
    let update = alice.update();
    let mut publication = alice.publication(update, &[bob.key()], b"update", false);
    assert_eq!(publication.new_state_key, None);
    publication.new_state_key = Some(StateKey::from_bytes([8; 32]));
    let Err(CommitRefusal::Invalid { reason }) =
        store.publish_commit(alice.key(), publication).await.unwrap()
    else {
        panic!("a new state key without anyone leaving");
    };
    assert!(reason.contains("newStateKey"), "{reason}");
    alice.discard();

    // Removing Bob needs the next epoch's key.
    let remove = alice
        .group
        .remove_members(&alice.provider, &alice.identity, &[bob.key()])
        .unwrap();
    let mut publication = alice.publication(remove, &[bob.key()], b"remove", false);
    let new_key = publication
        .new_state_key
        .take()
        .expect("the Commit takes Bob out");
    assert_ne!(new_key, alice.state_key);
    let Err(CommitRefusal::Invalid { reason }) = store
        .publish_commit(alice.key(), publication.clone())
        .await
        .unwrap()
    else {
        panic!("a removal without the new key");
    };
    assert!(reason.contains("newStateKey"), "{reason}");
    publication.new_state_key = Some(new_key.clone());
    store
        .publish_commit(alice.key(), publication)
        .await
        .unwrap()
        .unwrap();
    alice.merge();
    assert_eq!(alice.state_key, new_key, "the committer follows");

    // Bob's key (the one before) opens nothing written after.
    assert_eq!(
        store
            .group_info(group(), bob.state_key.clone(), alice.key())
            .await
            .unwrap(),
        Err(quicnprotochat_server::delivery::NotAMember)
    );
    assert!(
        store
            .group_info(group(), new_key, alice.key())
            .await
            .unwrap()
            .is_ok()
    );
    close((store, closer)).await;
}

pub async fn a_member_whose_key_does_not_open_the_state_hands_it_over_and_nobody_is_frozen(
    backend: &impl Backend,
) {
    let (store, closer) = backend.open();
    let (mut alice, mut bob) = alice_and_bob(&store).await;
    // Bob holds a wrong key (lost, or a hostile member's choice): his
    // Commit finds no group, and he hands over the state of the epoch the
    // node is in, which it takes (it matches the fingerprint it kept) and
    // keeps under his key from then on.
    bob.state_key = StateKey::from_bytes([9; 32]);
    let update = bob.update();
    unknown_until_the_state_comes_with_it(&store, &bob, &[alice.key()], update.clone(), b"b").await;
    bob.merge();
    alice
        .group
        .receive(&alice.provider, &update, &NoDeviceLists)
        .unwrap();
    alice.follow_state_key();

    // Alice's key no longer opens it; she hands it over in turn, and her
    // Commit goes through: the group goes on.
    let next = alice.update();
    unknown_until_the_state_comes_with_it(&store, &alice, &[bob.key()], next, b"a").await;
    alice.merge();
    // A state that is not the one the node is in is never taken: Bob's
    // epoch is behind now.
    let behind = bob.update();
    assert_eq!(
        store
            .publish_commit(bob.key(), bob.publication(behind, &[alice.key()], b"late", true))
            .await
            .unwrap(),
        Err(CommitRefusal::UnknownGroup)
    );
    close((store, closer)).await;
}
