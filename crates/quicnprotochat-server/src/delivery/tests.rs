//! The rules against [`MemoryStorage`]: no database involved.

use quicnprotochat_core::KeyPackageStock;
use quicnprotochat_core::{EpochKey, GroupId, GroupRef, IdentityKey, Seq, StateKey, Suite};
use quicnprotochat_proto::outcome::QueueFull;
use quicnprotochat_proto::wire::{CommitPublication, Envelope, ProposalPublication, ValidKeyPackage};

use super::rules;
use super::*;

#[path = "../../tests/conformance/mls.rs"]
mod mls;

const NOW: i64 = 1_000_000;

fn key(byte: u8) -> IdentityKey {
    IdentityKey::from_bytes([byte; 32])
}

fn envelope(recipients: &[u8], payload: &[u8], id: Option<&[u8]>) -> Envelope {
    Envelope {
        recipients: recipients.iter().copied().map(key).collect(),
        payload: payload.to_vec(),
        message_id: id.map(<[u8]>::to_vec),
    }
}

fn enqueue(
    storage: &mut MemoryStorage,
    sender: u8,
    envelopes: &[Envelope],
    depth: usize,
) -> Result<(), QueueFull> {
    let limits = Limits {
        max_queue_depth: depth,
        ..Limits::default()
    };
    storage
        .command(|s| rules::enqueue(s, &key(sender), envelopes, &[], &limits, NOW))
        .map_err(|refusal| match refusal {
            SendRefusal::QueueFull(full) => full,
            other => panic!("not a full queue: {other:?}"),
        })
}

fn queue(storage: &mut MemoryStorage, of: u8) -> Vec<(u64, Vec<u8>)> {
    storage
        .run(|s| rules::messages_after(s, &key(of), Seq::ZERO, 0))
        .into_iter()
        .map(|message| (message.seq.get(), message.payload))
        .collect()
}

fn payloads(storage: &mut MemoryStorage, of: u8) -> Vec<Vec<u8>> {
    payloads_of(storage, &key(of))
}

fn payloads_of(storage: &mut MemoryStorage, of: &IdentityKey) -> Vec<Vec<u8>> {
    storage
        .run(|s| rules::messages_after(s, of, Seq::ZERO, 0))
        .into_iter()
        .map(|message| message.payload)
        .collect()
}

/// `welcome` as the Welcome envelope for `to`.
fn welcome_to(to: IdentityKey, welcome: &[u8]) -> Envelope {
    Envelope {
        recipients: vec![to],
        payload: welcome.to_vec(),
        message_id: None,
    }
}

fn key_package(bytes: &[u8], last_resort: bool, expires_at: u64) -> ValidKeyPackage {
    ValidKeyPackage::new(bytes.to_vec(), last_resort, expires_at, Suite::X25519)
}

/// An unexpiring KeyPackage record of `suite`.
fn of_suite(bytes: &[u8], last_resort: bool, suite: Suite) -> ValidKeyPackage {
    ValidKeyPackage {
        suite,
        ..key_package(bytes, last_resort, u64::MAX)
    }
}

#[test]
fn sequence_numbers_increase_per_queue_and_are_never_reused() {
    let mut storage = MemoryStorage::default();
    for n in 0..3u8 {
        enqueue(&mut storage, 9, &[envelope(&[1, 2], &[n], None)], 100).unwrap();
    }
    let first = queue(&mut storage, 1);
    assert!(first.windows(2).all(|pair| pair[0].0 < pair[1].0), "{first:?}");
    let last = first.last().unwrap().0;
    storage.run(|s| rules::ack(s, &key(1), Seq::new(last)));
    enqueue(&mut storage, 9, &[envelope(&[1], b"later", None)], 100).unwrap();
    let after = queue(&mut storage, 1);
    assert_eq!(after.len(), 1);
    assert!(after[0].0 > last, "a number is never given twice");
}

#[test]
fn a_message_id_is_stored_once_per_sender() {
    let mut storage = MemoryStorage::default();
    let once = [envelope(&[1], b"hi", Some(b"id-1"))];
    enqueue(&mut storage, 7, &once, 100).unwrap();
    enqueue(&mut storage, 7, &once, 100).unwrap();
    // Another sender may use the same id.
    enqueue(&mut storage, 8, &once, 100).unwrap();
    // The same id twice in one batch: the second is a retry too.
    enqueue(
        &mut storage,
        6,
        &[envelope(&[1], b"a", Some(b"x")), envelope(&[1], b"b", Some(b"x"))],
        100,
    )
    .unwrap();
    assert_eq!(
        payloads(&mut storage, 1),
        [b"hi".to_vec(), b"hi".to_vec(), b"a".to_vec()]
    );
}

#[test]
fn a_queue_never_exceeds_its_depth_however_the_call_is_shaped() {
    let mut storage = MemoryStorage::default();
    enqueue(&mut storage, 9, &[envelope(&[1], b"first", None)], 3).unwrap();
    // Three envelopes naming the victim: one more than its room.
    let flood: Vec<Envelope> = (0..3).map(|_| envelope(&[1, 2], b"flood", None)).collect();
    let refused = enqueue(&mut storage, 9, &flood, 3).unwrap_err();
    assert_eq!(
        refused,
        QueueFull {
            recipients: vec![key(1)],
            max_depth: 3,
            max_bytes: Limits::default().max_queue_bytes,
        }
    );
    assert_eq!(payloads(&mut storage, 1).len(), 1, "all or nothing");
    assert!(payloads(&mut storage, 2).is_empty(), "all or nothing");
    // One envelope naming a recipient many times counts (and queues) once.
    enqueue(&mut storage, 9, &[envelope(&[1, 1, 1, 1, 1], b"once", None)], 3).unwrap();
    assert_eq!(payloads(&mut storage, 1), [b"first".to_vec(), b"once".to_vec()]);
}

#[test]
fn a_refused_batch_names_every_full_queue_and_forgets_its_message_ids() {
    let mut storage = MemoryStorage::default();
    for recipient in [1, 3] {
        enqueue(&mut storage, 9, &[envelope(&[recipient], b"x", None)], 1).unwrap();
    }
    let batch = [envelope(&[3, 2, 1], b"y", Some(b"retry-me"))];
    let refused = enqueue(&mut storage, 9, &batch, 1).unwrap_err();
    assert_eq!(refused.recipients, [key(3), key(1)]);
    assert_eq!(refused.max_depth, 1);
    // Once there is room, the same call with the same id is stored: the
    // refused one did not use up its id.
    for recipient in [1, 3] {
        let last = queue(&mut storage, recipient)[0].0;
        storage.run(|s| rules::ack(s, &key(recipient), Seq::new(last)));
    }
    enqueue(&mut storage, 9, &batch, 1).unwrap();
    for recipient in [1, 2, 3] {
        assert_eq!(payloads(&mut storage, recipient), [b"y".to_vec()]);
    }
}

#[test]
fn key_packages_are_served_ordinary_first_each_once_last_resort_kept_expired_never() {
    let mut storage = MemoryStorage::default();
    let owner = key(1);
    let packages = [
        key_package(b"old", false, u64::MAX),
        key_package(b"expired", false, (NOW - 1) as u64),
        key_package(b"resort-1", true, u64::MAX),
        key_package(b"new", false, u64::MAX),
        key_package(b"resort-2", true, u64::MAX),
        key_package(b"resort-expired", true, NOW as u64),
    ];
    storage
        .command(|s| rules::upload_key_packages(s, &owner, &packages, &Limits::default(), NOW))
        .unwrap();
    assert_eq!(
        storage.run(|s| rules::count_key_packages(s, &owner, Suite::X25519, NOW)),
        KeyPackageStock {
            count: 2,
            has_last_resort: true
        }
    );
    let mut take = || storage.run(|s| rules::take_key_package(s, &owner, Suite::X25519, true, NOW));
    assert_eq!(take().as_deref(), Some(&b"old"[..]));
    assert_eq!(take().as_deref(), Some(&b"new"[..]));
    // Nothing ordinary left: the newest last resort, again and again.
    assert_eq!(take().as_deref(), Some(&b"resort-2"[..]));
    assert_eq!(take().as_deref(), Some(&b"resort-2"[..]));
    assert_eq!(
        storage.run(|s| rules::take_key_package(s, &key(2), Suite::X25519, true, NOW)),
        None
    );
    // Once the last resort expires too, there is nothing.
    assert_eq!(
        storage.run(|s| rules::take_key_package(s, &owner, Suite::X25519, true, i64::MAX)),
        None
    );
}

#[test]
fn each_suites_key_packages_are_a_stock_of_their_own() {
    let mut storage = MemoryStorage::default();
    let owner = key(1);
    let limits = Limits {
        max_key_packages: 2,
        ..Limits::default()
    };
    let (classic, hybrid) = (Suite::X25519, Suite::MlKem768X25519);
    let mut upload = |packages: &[ValidKeyPackage]| {
        storage.command(|s| rules::upload_key_packages(s, &owner, packages, &limits, NOW))
    };
    // Two of each suite: each stock is full, neither blocks the other.
    upload(&[
        of_suite(b"classic", false, classic),
        of_suite(b"hybrid", false, hybrid),
        of_suite(b"hybrid resort", true, hybrid),
    ])
    .unwrap();
    upload(&[of_suite(b"classic resort", true, classic)]).unwrap();
    assert_eq!(
        upload(&[
            of_suite(b"one more", false, classic),
            of_suite(b"spare", false, hybrid)
        ]),
        Err(TooManyKeyPackages {
            suite: classic,
            stored: 2,
            max: 2
        })
    );
    assert_eq!(
        upload(&[of_suite(b"spare", false, hybrid)]),
        Err(TooManyKeyPackages {
            suite: hybrid,
            stored: 2,
            max: 2
        })
    );
    let count = |storage: &mut MemoryStorage, suite| {
        storage.run(|s| rules::count_key_packages(s, &owner, suite, NOW))
    };
    assert_eq!(
        count(&mut storage, classic),
        KeyPackageStock {
            count: 1,
            has_last_resort: true
        }
    );
    assert_eq!(
        count(&mut storage, hybrid),
        KeyPackageStock {
            count: 1,
            has_last_resort: true
        }
    );
    let mut take =
        |suite, ordinary| storage.run(|s| rules::take_key_package(s, &owner, suite, ordinary, NOW));
    // The serve rate of one suite spent: that suite's last resort only.
    assert_eq!(take(hybrid, false).as_deref(), Some(&b"hybrid resort"[..]));
    assert_eq!(take(hybrid, true).as_deref(), Some(&b"hybrid"[..]));
    assert_eq!(take(hybrid, true).as_deref(), Some(&b"hybrid resort"[..]));
    assert_eq!(take(classic, true).as_deref(), Some(&b"classic"[..]));
    assert_eq!(take(classic, true).as_deref(), Some(&b"classic resort"[..]));
    assert_eq!(
        count(&mut storage, classic),
        KeyPackageStock {
            count: 0,
            has_last_resort: true
        }
    );
    assert_eq!(
        count(&mut storage, hybrid),
        KeyPackageStock {
            count: 0,
            has_last_resort: true
        }
    );
}

#[test]
fn fetches_stop_at_the_message_limit_and_the_byte_budget_but_carry_at_least_one() {
    let mut storage = MemoryStorage::default();
    let tiny: Vec<Envelope> = (0..FETCH_MAX_MESSAGES + 10)
        .map(|_| envelope(&[1], b"t", None))
        .collect();
    enqueue(&mut storage, 9, &tiny, usize::MAX).unwrap();
    assert_eq!(queue(&mut storage, 1).len(), FETCH_MAX_MESSAGES);
    let some = storage.run(|s| rules::messages_after(s, &key(1), Seq::ZERO, 5));
    assert_eq!(some.len(), 5);

    let big = vec![0u8; FETCH_BUDGET_BYTES / 3];
    let bigger = vec![0u8; FETCH_BUDGET_BYTES + 1];
    enqueue(&mut storage, 9, &[envelope(&[2], &bigger, None)], 100).unwrap();
    for _ in 0..4 {
        enqueue(&mut storage, 9, &[envelope(&[2], &big, None)], 100).unwrap();
    }
    let first = storage.run(|s| rules::messages_after(s, &key(2), Seq::ZERO, 0));
    assert_eq!(first.len(), 1, "one message over the budget still comes alone");
    let next = storage.run(|s| rules::messages_after(s, &key(2), first[0].seq, 0));
    assert_eq!(next.len(), 2, "then as many as fit in the budget");
}

#[test]
fn ack_deletes_through_the_given_number_and_repeating_it_is_harmless() {
    let mut storage = MemoryStorage::default();
    for n in 0..4u8 {
        enqueue(&mut storage, 9, &[envelope(&[1], &[n], None)], 100).unwrap();
    }
    let seqs: Vec<u64> = queue(&mut storage, 1).into_iter().map(|(seq, _)| seq).collect();
    assert_eq!(storage.run(|s| rules::ack(s, &key(1), Seq::new(seqs[1]))), 2);
    assert_eq!(storage.run(|s| rules::ack(s, &key(1), Seq::new(seqs[1]))), 0);
    assert_eq!(payloads(&mut storage, 1), [vec![2], vec![3]]);
    assert_eq!(storage.run(|s| rules::drain(s, &key(1))), [vec![2], vec![3]]);
    assert!(queue(&mut storage, 1).is_empty());
}

#[test]
fn retention_purges_old_messages_ids_and_expired_key_packages() {
    let mut storage = MemoryStorage::default();
    enqueue(&mut storage, 9, &[envelope(&[1], b"old", Some(b"id"))], 100).unwrap();
    storage
        .command(|s| {
            rules::upload_key_packages(
                s,
                &key(1),
                &[key_package(b"kp", false, (NOW + 5) as u64)],
                &Limits::default(),
                NOW,
            )
        })
        .unwrap();
    assert_eq!(storage.run(|s| rules::purge(s, NOW + 1, NOW + 10)), 1);
    assert!(queue(&mut storage, 1).is_empty());
    assert_eq!(
        storage.run(|s| rules::count_key_packages(s, &key(1), Suite::X25519, NOW)),
        KeyPackageStock {
            count: 0,
            has_last_resort: false
        }
    );
    // The id was forgotten with the message: the same id is new again.
    enqueue(&mut storage, 9, &[envelope(&[1], b"new", Some(b"id"))], 100).unwrap();
    assert_eq!(payloads(&mut storage, 1), [b"new".to_vec()]);
}

fn publish(
    storage: &mut MemoryStorage,
    sender: &IdentityKey,
    publication: &CommitPublication,
    depth: usize,
) -> Result<(), CommitRefusal> {
    let limits = Limits {
        max_queue_depth: depth,
        ..Limits::default()
    };
    storage.command(|s| rules::publish_commit(s, sender, publication, &limits, NOW))
}

fn propose(
    storage: &mut MemoryStorage,
    sender: &IdentityKey,
    publication: &ProposalPublication,
) -> Result<(), CommitRefusal> {
    storage.command(|s| rules::publish_proposal(s, sender, publication, &Limits::default(), NOW))
}

/// Group `g` of Alice (`identity(1)`) and Bob (`identity(2)`), its view
/// handed to the node with the Commit that added Bob: now at epoch 1.
fn alice_and_bob(storage: &mut MemoryStorage) -> (mls::Member, mls::Member) {
    let mut alice = mls::Member::create(1, b"g");
    let (add, welcome, provider) = alice.add(2);
    let publication = alice.publication(add, &[], b"add", true);
    publish(storage, &alice.key(), &publication, 100).unwrap();
    alice.merge();
    // Bob joins with the tree the node kept for him, sealed under the key
    // of the epoch his Welcome starts.
    let key = mls::welcome_key(&provider, &welcome);
    let tree = storage
        .run(|s| {
            rules::welcome_tree(
                s,
                &publication.group_id,
                1,
                Some(&key),
                &mls::identity(2).public_key(),
            )
        })
        .expect("a tree for Bob");
    let (tree, state_key) = tree;
    (
        alice,
        mls::join(
            2,
            provider,
            &welcome,
            &tree,
            state_key.expect("the group's state key"),
        ),
    )
}

fn invalid(refusal: Result<(), CommitRefusal>) -> String {
    match refusal {
        Err(CommitRefusal::Invalid { reason }) => reason,
        other => panic!("expected an invalid refusal, got {other:?}"),
    }
}

#[test]
fn a_group_the_node_has_no_view_of_accepts_nothing_but_its_initial_state() {
    let mut storage = MemoryStorage::default();
    let mut alice = mls::Member::create(1, b"g");
    let commit = alice.update();
    let bare = alice.publication(commit.clone(), &[key(2)], b"a", false);
    assert_eq!(
        publish(&mut storage, &alice.key(), &bare, 100),
        Err(CommitRefusal::UnknownGroup)
    );
    // Handed over by someone who is not in it: refused.
    let with_state = alice.publication(commit, &[key(2)], b"a", true);
    let reason = invalid(publish(&mut storage, &key(9), &with_state, 100));
    assert!(reason.contains("not a member"), "{reason}");
    publish(&mut storage, &alice.key(), &with_state, 100).unwrap();
    assert_eq!(payloads(&mut storage, 2).len(), 1);
}

#[test]
fn the_first_valid_commit_of_an_epoch_wins_and_the_others_learn_the_epoch() {
    let mut storage = MemoryStorage::default();
    let mut alice = mls::Member::create(1, b"g");
    let (first, welcome, _) = alice.add(3);
    alice.discard();
    let second = alice.update();
    let carol = mls::identity(3).public_key();
    let mut winner = alice.publication(first, &[key(2)], b"a", true);
    winner.welcome = Some(welcome_to(carol, &welcome));
    publish(&mut storage, &alice.key(), &winner, 100).unwrap();
    assert_eq!(
        payloads_of(&mut storage, &carol),
        [welcome],
        "the Welcome goes with its Commit"
    );
    // Made in the same epoch: lost the race.
    let loser = alice.publication(second, &[key(2)], b"b", true);
    assert_eq!(
        publish(&mut storage, &alice.key(), &loser, 100),
        Err(CommitRefusal::Conflict { current_epoch: 1 })
    );
    // A retry of the accepted one is accepted again and stores nothing new.
    publish(&mut storage, &alice.key(), &winner, 100).unwrap();
    assert_eq!(payloads(&mut storage, 2).len(), 1);
    // The group goes on from the winner's epoch.
    alice.discard();
    let mut alice = mls::Member::create(1, b"h");
    let commit = alice.update();
    publish(
        &mut storage,
        &alice.key(),
        &alice.publication(commit, &[], b"h0", true),
        100,
    )
    .unwrap();
    alice.merge();
    let next = alice.update();
    publish(
        &mut storage,
        &alice.key(),
        &alice.publication(next, &[key(2)], b"h1", false),
        100,
    )
    .unwrap();
}

#[test]
fn noise_framed_as_a_commit_or_a_strangers_commit_is_refused_and_the_epoch_stays_free() {
    let mut storage = MemoryStorage::default();
    let (mut alice, bob) = alice_and_bob(&mut storage);

    // Alice's next Commit with bytes of its signature flipped (it ends
    // with signature, confirmation tag and membership tag: 64, 32 and 32
    // bytes, each after a length byte): the framing still names the group
    // and epoch 1.
    let mut noise = alice.update();
    alice.discard();
    let end = noise.len();
    for byte in &mut noise[end - 100..end - 92] {
        *byte ^= 0xa5;
    }
    let reason = invalid(publish(
        &mut storage,
        &alice.key(),
        &alice.publication(noise, &[key(2)], b"n", false),
        100,
    ));
    assert!(reason.contains("not valid"), "{reason}");

    // A stranger's own group with the same id and epoch: signed by nobody
    // in Alice's group.
    let mut stranger = mls::Member::create(9, b"g");
    let (stranger_add, _, _) = stranger.add(8);
    stranger.merge();
    drop(stranger_add);
    let forged = stranger.update();
    // Not a member: told nothing, as if the group did not exist.
    assert_eq!(
        publish(
            &mut storage,
            &stranger.key(),
            &stranger.publication(forged, &[key(2)], b"s", false),
            100,
        ),
        Err(CommitRefusal::UnknownGroup)
    );
    // Signed by Alice but sent on another member's connection.
    let genuine = alice.update();
    let publication = alice.publication(genuine, &[bob.key()], b"ok", false);
    let reason = invalid(publish(&mut storage, &bob.key(), &publication, 100));
    assert!(reason.contains("this connection is"), "{reason}");
    // Nothing took epoch 1: Alice's real Commit is accepted.
    publish(&mut storage, &alice.key(), &publication, 100).unwrap();
    assert_eq!(payloads_of(&mut storage, &bob.key()).len(), 1);
}

#[test]
fn a_commit_must_go_to_every_member_it_keeps() {
    let mut storage = MemoryStorage::default();
    let (mut alice, bob) = alice_and_bob(&mut storage);
    // Alice leaves Bob out of her update: he would stay behind for good.
    let update = alice.update();
    let reason = invalid(publish(
        &mut storage,
        &alice.key(),
        &alice.publication(update.clone(), &[key(7)], b"u", false),
        100,
    ));
    assert!(reason.contains("leaves out"), "{reason}");
    // Nothing was stored, and with Bob it is accepted.
    assert!(payloads(&mut storage, 7).is_empty());
    publish(
        &mut storage,
        &alice.key(),
        &alice.publication(update, &[bob.key()], b"u", false),
        100,
    )
    .unwrap();
}

#[test]
fn a_proposal_is_kept_for_the_commit_that_references_it() {
    let mut storage = MemoryStorage::default();
    let (mut alice, mut bob) = alice_and_bob(&mut storage);

    // Bob asks to leave; the node checks and keeps the proposal, on its
    // own: the group's view (its whole tree) is not written again.
    let leave = bob.leave(&[alice.key()], b"leave");
    let group = leave.group_id.clone();
    let view = storage.group_view(&GroupRef::of(&group)).unwrap();
    propose(&mut storage, &bob.key(), &leave).unwrap();
    assert_eq!(storage.group_view(&GroupRef::of(&group)).unwrap(), view);
    assert_eq!(
        storage.group_proposals(&GroupRef::of(&group), 1).unwrap().len(),
        1
    );
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
    publish(
        &mut storage,
        &alice.key(),
        &alice.publication(commit, &[bob.key()], b"c", false),
        100,
    )
    .unwrap();
    // The new epoch starts with none.
    assert!(
        storage
            .group_proposals(&GroupRef::of(&group), 1)
            .unwrap()
            .is_empty()
    );
    assert!(
        storage
            .group_proposals(&GroupRef::of(&group), 2)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_commit_referencing_a_proposal_the_node_has_not_seen_is_refused() {
    let mut storage = MemoryStorage::default();
    let (mut alice, mut bob) = alice_and_bob(&mut storage);
    // The proposal reaches Alice but never the node.
    let leave = bob.leave(&[alice.key()], b"leave");
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
    let reason = invalid(publish(
        &mut storage,
        &alice.key(),
        &alice.publication(commit, &[bob.key()], b"c", false),
        100,
    ));
    assert!(reason.contains("not valid"), "{reason}");
}

#[test]
fn a_commit_with_a_full_queue_is_refused_and_the_epoch_stays() {
    let mut storage = MemoryStorage::default();
    let carol = mls::identity(9).public_key();
    enqueue(&mut storage, 9, &[welcome_to(carol, b"waiting")], 1).unwrap();
    let mut alice = mls::Member::create(1, b"g");
    let (commit, welcome, _) = alice.add(9);
    let mut publication = alice.publication(commit, &[key(2)], b"a", true);
    publication.welcome = Some(welcome_to(carol, &welcome));
    assert_eq!(
        publish(&mut storage, &alice.key(), &publication, 1),
        Err(CommitRefusal::QueueFull(QueueFull {
            recipients: vec![carol],
            max_depth: 1,
            max_bytes: Limits::default().max_queue_bytes,
        }))
    );
    assert!(payloads(&mut storage, 2).is_empty());
    // Neither the epoch nor the view nor the id was taken.
    publication.welcome = None;
    publish(&mut storage, &alice.key(), &publication, 1).unwrap();
    assert_eq!(payloads(&mut storage, 2).len(), 1);
}

#[test]
fn the_welcome_envelope_carries_a_welcome_for_the_added_devices_only() {
    let mut storage = MemoryStorage::default();
    let mut alice = mls::Member::create(1, b"g");
    let (add, welcome, _) = alice.add(3);
    let carol = mls::identity(3).public_key();
    let mut publication = alice.publication(add, &[], b"add", true);
    // Another Commit of the epoch for some members, in the Welcome's place:
    // they would apply it unordered, and the group would fork.
    alice.discard();
    let other = alice.update();
    publication.welcome = Some(welcome_to(carol, &other));
    let reason = invalid(publish(&mut storage, &alice.key(), &publication, 100));
    assert!(reason.contains("must carry an MLS Welcome"), "{reason}");
    // A Welcome for someone the Commit does not add.
    publication.welcome = Some(welcome_to(key(4), &welcome));
    let reason = invalid(publish(&mut storage, &alice.key(), &publication, 100));
    assert!(reason.contains("only to the devices the Commit adds"), "{reason}");
    assert!(payloads(&mut storage, 4).is_empty() && payloads_of(&mut storage, &carol).is_empty());
    // To Carol, whom it adds: accepted.
    publication.welcome = Some(welcome_to(carol, &welcome));
    publish(&mut storage, &alice.key(), &publication, 100).unwrap();
    assert_eq!(payloads_of(&mut storage, &carol), [welcome]);
}

#[test]
fn the_groupinfo_of_a_new_epoch_is_checked_and_served_only_to_members() {
    let mut storage = MemoryStorage::default();
    let mut alice = mls::Member::create(1, b"g");
    let (add, welcome, provider) = alice.add(2);
    let mut publication = alice.publication(add, &[], b"add", true);
    alice.merge();
    let bob = mls::join(
        2,
        provider,
        &welcome,
        &alice.group.ratchet_tree().unwrap(),
        alice.state_key.clone(),
    );
    // The GroupInfo of epoch 1, signed by Alice, who made the Commit.
    publication.group_info = Some(alice.state().group_info);
    // Signed by Bob instead: refused with the whole change.
    let mut forged = publication.clone();
    forged.group_info = Some(bob.state().group_info);
    let reason = invalid(publish(&mut storage, &alice.key(), &forged, 100));
    assert!(reason.contains("not signed by the committer"), "{reason}");
    publish(&mut storage, &alice.key(), &publication, 100).unwrap();

    let group = publication.group_id.clone();
    let served = storage
        .run(|s| rules::group_info(s, &group, &bob.state_key, &bob.key()))
        .unwrap();
    let state = served.expect("the node serves epoch 1's GroupInfo");
    assert_eq!(Some(&state.group_info), publication.group_info.as_ref());
    assert!(!state.ratchet_tree.is_empty());
    assert_eq!(
        storage.run(|s| rules::group_info(s, &group, &bob.state_key, &key(9))),
        Err(NotAMember),
        "strangers get nothing"
    );
    assert_eq!(
        storage.run(|s| rules::group_info(s, &group, &StateKey::from_bytes([9; 32]), &bob.key())),
        Err(NotAMember),
        "nor a member without the group's key"
    );

    // A Commit without a GroupInfo is refused: members who could not
    // process it would have nothing to rejoin from.
    let next = alice.update();
    let mut bare = alice.publication(next, &[bob.key()], b"u", false);
    bare.group_info = None;
    let reason = invalid(publish(&mut storage, &alice.key(), &bare, 100));
    assert!(reason.contains("must carry groupInfo"), "{reason}");
    assert_eq!(
        storage.run(|s| rules::group_info(s, &group, &bob.state_key, &bob.key())),
        Ok(Some(state)),
        "the last one is still served"
    );
}

#[test]
fn a_well_signed_commit_whose_path_breaks_the_identity_rules_is_refused() {
    use openmls::prelude::{
        BasicCredential, CredentialWithKey, LeafNodeParameters, MlsGroup, MlsGroupCreateConfig,
        OpenMlsProvider as _, PURE_PLAINTEXT_WIRE_FORMAT_POLICY, tls_codec::Serialize as _,
    };
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use quicnprotochat_core::{CIPHERSUITE, GroupId};

    // A group made with plain openmls, so its member can put what it likes
    // in its path: its signature key stays, its credential names another
    // identity.
    let provider = OpenMlsRustCrypto::default();
    let alice = mls::identity(1);
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut group = MlsGroup::new(&provider, &alice, &config, alice.credential_with_key()).unwrap();
    let group_info = group
        .export_group_info(provider.crypto(), &alice, false)
        .unwrap()
        .tls_serialize_detached()
        .unwrap();
    let ratchet_tree = group.export_ratchet_tree().tls_serialize_detached().unwrap();
    let disguise = CredentialWithKey {
        credential: BasicCredential::new(key(7).as_bytes().to_vec()).into(),
        signature_key: alice.credential_with_key().signature_key,
    };
    let commit = group
        .self_update(
            &provider,
            &alice,
            LeafNodeParameters::builder()
                .with_credential_with_key(disguise)
                .build(),
        )
        .unwrap()
        .commit()
        .tls_serialize_detached()
        .unwrap();
    let publication = CommitPublication {
        group_id: GroupId::new(group.group_id().as_slice().to_vec()).unwrap(),
        epoch: 0,
        commit: envelope(&[2], &commit, Some(b"disguised")),
        welcome: None,
        initial_state: Some(quicnprotochat_proto::wire::GroupState {
            group_info,
            ratchet_tree,
        }),
        group_info: None,
        epoch_key: None,
        state_key: StateKey::from_bytes([1; 32]),
        new_state_key: None,
    };
    let mut storage = MemoryStorage::default();
    let reason = invalid(publish(&mut storage, &alice.public_key(), &publication, 100));
    assert!(reason.contains("new leaf"), "{reason}");
    assert!(payloads(&mut storage, 2).is_empty());
}

#[test]
fn the_tree_of_an_epoch_that_added_members_is_sealed_under_its_key_until_purged() {
    let mut storage = MemoryStorage::default();
    let (mut alice, bob) = alice_and_bob(&mut storage);
    let group = alice.publication(Vec::new(), &[], b"-", false).group_id;
    let stranger = key(9);
    let tree_of = |storage: &mut MemoryStorage, epoch, with: Option<&EpochKey>| {
        storage.run(|s| rules::welcome_tree(s, &group, epoch, with, &stranger))
    };
    // Whoever presents the key of epoch 1 reads its tree, whoever they
    // are: Bob computed it from his Welcome in `alice_and_bob`.
    let epoch_1 = bob.group.epoch_key(&bob.provider).unwrap();
    let tree = alice.group.ratchet_tree().unwrap();
    assert_eq!(
        tree_of(&mut storage, 1, Some(&epoch_1)),
        Some((tree.clone(), Some(alice.state_key.clone())))
    );
    // Without it, or with another key, the same answer as for an epoch
    // without a tree: nobody outside learns that the group exists.
    assert_eq!(tree_of(&mut storage, 1, None), None);
    assert_eq!(
        tree_of(&mut storage, 1, Some(&EpochKey::from_bytes([9; 32]))),
        None
    );
    // No add started epoch 0, and none started epoch 2; a key is bound to
    // its epoch.
    assert_eq!(tree_of(&mut storage, 0, Some(&epoch_1)), None);
    // What the node stores shows neither the tree nor who may read it.
    let kept = storage.run(|s| s.welcome_tree(&GroupRef::of(&group), 1)).unwrap();
    assert!(kept.joiners.is_empty());
    assert!(!kept.tree.windows(32).any(|window| window == bob.key().as_bytes()));
    assert!(
        !kept
            .tree
            .windows(64)
            .any(|window| tree.windows(64).any(|part| part == window))
    );
    let update = alice.update();
    let publication = alice.publication(update, &[bob.key()], b"update", false);
    publish(&mut storage, &alice.key(), &publication, 100).unwrap();
    alice.merge();
    let epoch_2 = alice.group.epoch_key(&alice.provider).unwrap();
    assert_eq!(tree_of(&mut storage, 2, Some(&epoch_2)), None);
    // Kept as long as undelivered messages, then purged with them.
    storage.run(|s| rules::purge(s, NOW, NOW));
    assert!(tree_of(&mut storage, 1, Some(&epoch_1)).is_some());
    storage.run(|s| rules::purge(s, NOW + 1, NOW + 1));
    assert_eq!(tree_of(&mut storage, 1, Some(&epoch_1)), None);
}

#[test]
fn a_commit_that_adds_members_without_the_new_epochs_key_is_refused() {
    let mut storage = MemoryStorage::default();
    let mut alice = mls::Member::create(1, b"g");
    let (add, _welcome, _provider) = alice.add(2);
    let mut publication = alice.publication(add, &[], b"add", true);
    publication.epoch_key = None;
    let reason = invalid(publish(&mut storage, &alice.key(), &publication, 100));
    assert!(reason.contains("epochKey"), "{reason}");
    // Nothing was stored: the same Commit with its key is taken.
    let group = GroupRef::of(&publication.group_id);
    assert_eq!(storage.run(|s| s.group_epoch(&group)), None);
    publication.epoch_key = alice.group.pending_epoch_key(&alice.provider).ok();
    publish(&mut storage, &alice.key(), &publication, 100).unwrap();
    // A Commit that adds nobody needs none.
    alice.merge();
    let update = alice.update();
    let mut publication = alice.publication(update, &[mls::identity(2).public_key()], b"update", false);
    publication.epoch_key = None;
    publish(&mut storage, &alice.key(), &publication, 100).unwrap();
}

#[test]
fn a_tree_kept_before_protocol_8_is_read_by_the_members_it_names_alone() {
    let mut storage = MemoryStorage::default();
    let group = GroupId::new(b"old".to_vec()).unwrap();
    let joiner = key(2);
    storage.put_plain_welcome_tree(&GroupRef::of(&group), 1, b"tree", &[joiner], NOW);
    let tree_of = |storage: &mut MemoryStorage, who: &IdentityKey, with: Option<&EpochKey>| {
        storage.run(|s| rules::welcome_tree(s, &group, 1, with, who))
    };
    assert_eq!(
        tree_of(&mut storage, &joiner, None),
        Some((b"tree".to_vec(), None))
    );
    let any_key = EpochKey::from_bytes([1; 32]);
    assert_eq!(
        tree_of(&mut storage, &joiner, Some(&any_key)),
        Some((b"tree".to_vec(), None))
    );
    assert_eq!(tree_of(&mut storage, &key(3), Some(&any_key)), None);
    assert_eq!(tree_of(&mut storage, &key(3), None), None);
}

#[test]
fn a_well_signed_commit_with_a_broken_update_path_is_refused_and_the_group_goes_on() {
    use openmls::prelude::{
        LeafNodeParameters, MlsGroup, MlsGroupCreateConfig, OpenMlsProvider as _,
        PURE_PLAINTEXT_WIRE_FORMAT_POLICY, SignatureScheme, tls_codec::Serialize as _,
    };
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use openmls_traits::signatures::{Signer, SignerError};
    use quicnprotochat_core::{CIPHERSUITE, GroupId, IdentityKeypair};

    /// Signs everything as Alice would, except the new leaf of her update
    /// path, whose signature is garbage: the Commit itself is well signed,
    /// its path is not valid.
    struct BreaksItsPath<'a>(&'a IdentityKeypair);
    impl Signer for BreaksItsPath<'_> {
        fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
            // SignContent: label<V> ("MLS 1.0 " + label), then content<V>.
            let label = b"MLS 1.0 LeafNodeTBS";
            if payload.get(1..1 + label.len()) == Some(&label[..]) {
                Ok(vec![0x55; 64])
            } else {
                self.0.sign(payload)
            }
        }
        fn signature_scheme(&self) -> SignatureScheme {
            self.0.signature_scheme()
        }
    }

    let provider = OpenMlsRustCrypto::default();
    let alice = mls::identity(1);
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut group = MlsGroup::new(&provider, &alice, &config, alice.credential_with_key()).unwrap();
    let initial_state = quicnprotochat_proto::wire::GroupState {
        group_info: group
            .export_group_info(provider.crypto(), &alice, false)
            .unwrap()
            .tls_serialize_detached()
            .unwrap(),
        ratchet_tree: group.export_ratchet_tree().tls_serialize_detached().unwrap(),
    };
    let commit = group
        .self_update(&provider, &BreaksItsPath(&alice), LeafNodeParameters::default())
        .unwrap()
        .commit()
        .tls_serialize_detached()
        .unwrap();
    let group_id = GroupId::new(group.group_id().as_slice().to_vec()).unwrap();
    let broken = CommitPublication {
        group_id: group_id.clone(),
        epoch: 0,
        commit: envelope(&[2], &commit, Some(b"broken")),
        welcome: None,
        initial_state: Some(initial_state.clone()),
        group_info: None,
        epoch_key: None,
        state_key: StateKey::from_bytes([1; 32]),
        new_state_key: None,
    };
    let mut storage = MemoryStorage::default();
    let reason = invalid(publish(&mut storage, &alice.public_key(), &broken, 100));
    // openmls' words for a bad leaf signature; a bad signature on the
    // Commit itself reads "Verifying the signature failed".
    assert!(
        reason.contains("not valid for the group: Signature verification failed"),
        "{reason}"
    );
    assert!(payloads(&mut storage, 2).is_empty());

    // The epoch was not taken: Alice's honest update goes through.
    group.clear_pending_commit(provider.storage()).unwrap();
    let honest = group
        .self_update(&provider, &alice, LeafNodeParameters::default())
        .unwrap()
        .commit()
        .tls_serialize_detached()
        .unwrap();
    // The GroupInfo of epoch 1, as the node will see the group after it.
    group.merge_pending_commit(&provider).unwrap();
    let group_info = group
        .export_group_info(provider.crypto(), &alice, false)
        .unwrap()
        .tls_serialize_detached()
        .unwrap();
    let publication = CommitPublication {
        group_id,
        epoch: 0,
        commit: envelope(&[2], &honest, Some(b"honest")),
        welcome: None,
        initial_state: Some(initial_state),
        group_info: Some(group_info),
        epoch_key: None,
        state_key: StateKey::from_bytes([1; 32]),
        new_state_key: None,
    };
    publish(&mut storage, &alice.public_key(), &publication, 100).unwrap();
    assert_eq!(payloads(&mut storage, 2), vec![honest]);
}

/// The list of the devices of seeds `devices` of the user of seed `user`,
/// at `version`, signed by that user.
fn device_list(user: u8, version: u64, devices: &[u8]) -> quicnprotochat_core::SignedDeviceList {
    use quicnprotochat_core::{DeviceList, IdentityKeypair};
    let public = |seed: u8| IdentityKeypair::from_secret_bytes(&[seed; 32]).public_key();
    DeviceList::new(public(user), version, devices.iter().copied().map(public))
        .unwrap()
        .sign(&IdentityKeypair::from_secret_bytes(&[user; 32]))
        .unwrap()
}

fn upload_list(
    storage: &mut MemoryStorage,
    caller: u8,
    list: &quicnprotochat_core::SignedDeviceList,
) -> Result<(), DeviceListRefusal> {
    let caller = quicnprotochat_core::IdentityKeypair::from_secret_bytes(&[caller; 32]).public_key();
    storage.command(|s| rules::upload_device_list(s, &caller, list, NOW))
}

#[test]
fn a_first_device_list_may_come_from_a_device_it_names_or_the_user_key() {
    let mut storage = MemoryStorage::default();
    assert_eq!(
        upload_list(&mut storage, 9, &device_list(1, 1, &[10])),
        Err(DeviceListRefusal::NotADevice)
    );
    assert_eq!(upload_list(&mut storage, 1, &device_list(1, 1, &[10])), Ok(()));
    assert_eq!(
        upload_list(&mut storage, 10, &device_list(2, 1, &[10, 11])),
        Ok(())
    );
    // Once a list is stored, only its devices count: not the user key.
    assert_eq!(
        upload_list(&mut storage, 1, &device_list(1, 2, &[10, 11])),
        Err(DeviceListRefusal::NotADevice)
    );
}

#[test]
fn a_device_list_refusal_says_no_more_than_the_caller_may_know() {
    let mut storage = MemoryStorage::default();
    let v2 = device_list(1, 2, &[10]);
    assert_eq!(upload_list(&mut storage, 10, &v2), Ok(()));
    // A stranger learns nothing about the stored version from a list it may
    // not store, but a forged one is bad whoever sends it.
    assert_eq!(
        upload_list(&mut storage, 9, &device_list(1, 1, &[9])),
        Err(DeviceListRefusal::NotADevice)
    );
    let forged = quicnprotochat_core::SignedDeviceList::from_parts(
        device_list(1, 3, &[9]).list().clone(),
        *v2.signature(),
    );
    assert_eq!(
        upload_list(&mut storage, 9, &forged),
        Err(DeviceListRefusal::BadSignature)
    );
    // Exactly the stored list is a retry: stored, whoever retries it.
    assert_eq!(upload_list(&mut storage, 9, &v2), Ok(()));
    assert_eq!(
        upload_list(&mut storage, 10, &device_list(1, 2, &[10, 11])),
        Err(DeviceListRefusal::Stale { current: 2 })
    );
    let users = [
        quicnprotochat_core::IdentityKeypair::from_secret_bytes(&[5; 32]).public_key(),
        *v2.list().user(),
    ];
    assert_eq!(storage.run(|s| rules::device_lists(s, &users)), vec![v2]);
}

/// The bytes of a publication as its sender sent them.
fn sent_bytes(publication: &CommitPublication) -> usize {
    publication.commit.payload.len()
        + publication
            .welcome
            .as_ref()
            .map_or(0, |welcome| welcome.payload.len())
        + publication.group_info.as_ref().map_or(0, Vec::len)
        + publication
            .initial_state
            .as_ref()
            .map_or(0, |state| state.group_info.len() + state.ratchet_tree.len())
}

#[test]
fn sixty_adds_to_a_big_group_keep_trees_of_a_few_epochs_only() {
    use quicnprotochat_core::{IdentityKeypair, NoDeviceLists, generate_key_package};

    let mut storage = MemoryStorage::default();
    let mut alice = mls::Member::create(1, b"big");
    let group = quicnprotochat_core::GroupId::new(b"big".to_vec()).unwrap();
    // 100 members, added in the group's first Commit.
    let scratch = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let joiners: Vec<IdentityKeypair> = (0..99).map(|_| IdentityKeypair::generate()).collect();
    let packages: Vec<Vec<u8>> = joiners
        .iter()
        .map(|joiner| generate_key_package(&scratch, joiner).unwrap())
        .collect();
    let added = alice
        .group
        .add_members(&alice.provider, &alice.identity, &packages, &NoDeviceLists)
        .unwrap();
    let mut publication = alice.publication(added.commit, &[], b"first", true);
    publication.welcome = Some(Envelope {
        recipients: joiners.iter().map(IdentityKeypair::public_key).collect(),
        payload: added.welcome,
        message_id: None,
    });
    let mut sent = sent_bytes(&publication);
    publish(&mut storage, &alice.key(), &publication, 1000).unwrap();
    alice.merge();
    // Then 60 Commits adding one member each.
    for seed in 10..70u8 {
        let me = alice.key();
        let (commit, welcome, _) = alice.add(seed);
        let newcomer = mls::identity(seed).public_key();
        let others: Vec<IdentityKey> = alice
            .group
            .members()
            .into_iter()
            .filter(|member| *member != me)
            .collect();
        let mut publication = alice.publication(commit, &others, &[seed], false);
        publication.welcome = Some(Envelope {
            recipients: vec![newcomer],
            payload: welcome,
            message_id: None,
        });
        sent += sent_bytes(&publication);
        publish(&mut storage, &alice.key(), &publication, 1000).unwrap();
        alice.merge();
    }

    let trees: Vec<usize> = (1..=61u64)
        .filter_map(|epoch| storage.welcome_tree(&GroupRef::of(&group), epoch).unwrap())
        .map(|kept| kept.tree.len())
        .collect();
    assert_eq!(
        trees.len(),
        rules::WELCOME_TREES_PER_GROUP,
        "the newest epochs' trees only"
    );
    let newest = *trees.last().unwrap();
    let kept: usize = trees.iter().sum();
    assert!(kept <= rules::WELCOME_TREES_PER_GROUP * newest);
    let view = storage.group_view(&GroupRef::of(&group)).unwrap().unwrap().len();
    // The group's state and its kept trees against what was sent to make
    // them: a few times, where keeping every epoch's tree was ~55 times.
    let ratio = (kept + view) as f64 / sent as f64;
    assert!(
        ratio <= 5.0,
        "stored {} bytes for {sent} sent ({ratio:.2}×)",
        kept + view
    );
    eprintln!(
        "61 epochs of a group grown to 160 members: {sent} bytes sent, {kept} bytes of trees and {view} of state kept ({ratio:.2}×)"
    );
}
