//! Group answers only for members, and group changes only through the
//! node's ordering, through a real node over real QUIC with groups the real
//! CLI made: a stranger who knows a group's id learns neither its epoch nor
//! that it exists; a member cannot fork a group by sending different
//! Commits around `publishCommit` (by `enqueue`, or as the Welcome of one);
//! proposals per epoch are bounded.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, group_id_of, group_of, identity, local, private_message, state_key_of};
use openmls::prelude::tls_codec::{DeserializeBytes as _, Serialize as _};
use openmls::prelude::{KeyPackageIn, MlsGroup, OpenMlsProvider as _, ProtocolVersion};
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_client::node_client::NodeClient;
use quicnprotochat_client::state::StateFile;
use quicnprotochat_core::{EpochKey, GroupId, GroupMember, IdentityKeypair, StateKey};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedGroupInfo, FetchedWelcomeTree, SendOutcome};
use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};

fn identity_of(member: &Member) -> IdentityKeypair {
    StateFile::open(&common::access(&member.state))
        .unwrap()
        .identity()
        .unwrap()
}

/// A Commit framed for `group` in `epoch` 0, made by `stranger` in a group of
/// its own under the same id, with that group's state key: what someone
/// outside can send.
fn strangers_commit(stranger: &IdentityKeypair, group: &GroupId) -> (Vec<u8>, GroupState, Vec<u8>, StateKey) {
    let provider = OpenMlsRustCrypto::default();
    let mut own = GroupMember::create(&provider, stranger, group).unwrap();
    let state_key = own.current_state_key(&provider).unwrap();
    let state = own.export_public_state(&provider, stranger).unwrap();
    let commit = own.self_update(&provider, stranger).unwrap();
    let group_info = own.pending_group_info().unwrap().to_vec();
    (
        commit,
        GroupState {
            group_info: state.group_info,
            ratchet_tree: state.ratchet_tree,
        },
        group_info,
        state_key,
    )
}

/// Every answer a stranger gets about `group`.
async fn what_a_stranger_learns(client: &NodeClient, stranger: &IdentityKeypair, group: &GroupId) -> String {
    // The state key of the stranger's own group: the best a stranger has.
    let (commit, state, group_info, state_key) = strangers_commit(stranger, group);
    let envelope = |payload: Vec<u8>| Envelope {
        recipients: Vec::new(),
        payload,
        message_id: None,
    };
    let commit_alone = client
        .publish_commit(&CommitToSend {
            group_id: group,
            epoch: 0,
            commit: &envelope(commit.clone()),
            welcome: None,
            initial_state: None,
            group_info: Some(&group_info),
            epoch_key: None,
            state_key: &state_key,
            new_state_key: None,
        })
        .await
        .unwrap();
    let served = client.fetch_group_info(group, &state_key).await.unwrap();
    // A key of the stranger's guessing: the node keeps a group's trees
    // sealed under keys only its members can compute.
    let tree = client
        .fetch_welcome_tree(group, 1, &EpochKey::from_bytes([77; 32]))
        .await
        .unwrap();
    // A PrivateMessage from epoch 0 of the group, to a queue of the
    // stranger's choosing, with the stranger's key.
    let stale = client
        .enqueue_batch_with_keys(
            &[Envelope {
                recipients: vec![identity(99).public_key()],
                payload: private_message(group.as_bytes(), 0, 64),
                message_id: None,
            }],
            &[&state_key],
        )
        .await
        .unwrap();
    let with_state = client
        .publish_commit(&CommitToSend {
            group_id: group,
            epoch: 0,
            commit: &envelope(commit),
            welcome: None,
            initial_state: Some(&state),
            group_info: Some(&group_info),
            epoch_key: None,
            state_key: &state_key,
            new_state_key: None,
        })
        .await
        .unwrap();
    format!("{commit_alone:?} {served:?} {tree:?} {stale:?} | created: {with_state:?}")
}

#[test]
fn a_stranger_learns_neither_the_epoch_nor_the_existence_of_a_group() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|name| Member::register(&node, dir.path(), name));
    group_of(&node, "secret", &alice, &[&bob]);
    alice.run(&node, "update", &[]);
    let secret = group_id_of(&node, &alice, "secret");
    let nothing = GroupId::new(b"no such group".to_vec()).unwrap();
    let stranger = identity(77);

    let (about_secret, about_nothing) = local(async {
        let client = node.connect_as(&stranger).await;
        (
            what_a_stranger_learns(&client, &stranger, &secret).await,
            what_a_stranger_learns(&client, &stranger, &nothing).await,
        )
    });
    // Everything but the attempt to create the group under its id answers
    // alike: the stranger cannot tell the real group from no group.
    let (secret_answers, secret_created) = about_secret.split_once(" | ").unwrap();
    let (nothing_answers, nothing_created) = about_nothing.split_once(" | ").unwrap();
    assert_eq!(secret_answers, nothing_answers);
    assert_eq!(
        secret_answers, "UnknownGroup NotMember Unavailable Accepted",
        "no epoch, no existence"
    );
    // Creating a group under a taken id fails without saying more; under a
    // free one it works (the one thing a stranger can still learn).
    assert_eq!(secret_created, "created: UnknownGroup");
    assert_eq!(nothing_created, "created: Accepted");

    // A member of the group does get its epoch when a message is stale,
    // once it shows the group's state key; without it, the node says
    // nothing about the group even to a member, and queues the message.
    let bob_identity = identity_of(&bob);
    let bobs_key = state_key_of(&bob, &secret);
    local(async {
        let client = node.connect_as(&bob_identity).await;
        let stale = [Envelope {
            recipients: vec![identity(99).public_key()],
            payload: private_message(secret.as_bytes(), 0, 64),
            message_id: None,
        }];
        match client
            .enqueue_batch_with_keys(&stale, &[&bobs_key])
            .await
            .unwrap()
        {
            SendOutcome::StaleEpoch(stale) => assert_eq!(stale.current_epoch, 2),
            other => panic!("a member's stale message: {other:?}"),
        }
        assert_eq!(client.enqueue_batch(&stale).await.unwrap(), SendOutcome::Accepted);
    });
    // The group carries on.
    alice.run(&node, "send", &["--msg", "still ours"]);
    let out = bob.run(&node, "recv", &[]);
    assert_eq!(out.trim(), format!("secret {}: still ours", alice.short()));
}

#[test]
fn commits_sent_around_the_nodes_ordering_are_refused_so_no_member_can_fork_a_group() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|name| Member::register(&node, dir.path(), name));
    group_of(&node, "trio", &alice, &[&bob, &carol]);
    let group = group_id_of(&node, &alice, "trio");
    let (bob_key, carol_key) = (bob.key.parse().unwrap(), carol.key.parse().unwrap());

    // Alice makes two valid Commits of one epoch: one removing Carol, for
    // Bob; one removing Bob, for Carol.
    let alice_identity = identity_of(&alice);
    let state_key = state_key_of(&alice, &group);
    let (for_bob, for_carol, carols_group_info, carols_state_key) = {
        let state = StateFile::open(&common::access(&alice.state)).unwrap();
        let provider = state.provider();
        let mut trio = GroupMember::load(&provider, &group).unwrap().unwrap();
        let for_bob = trio
            .remove_members(&provider, &alice_identity, &[carol_key])
            .unwrap();
        trio.discard_pending_commit(&provider).unwrap();
        let for_carol = trio
            .remove_members(&provider, &alice_identity, &[bob_key])
            .unwrap();
        let group_info = trio.pending_group_info().unwrap().to_vec();
        // Removing Bob moves the group's state key on.
        let new_state_key = trio.pending_state_key(&provider).unwrap().unwrap();
        trio.discard_pending_commit(&provider).unwrap();
        (for_bob, for_carol, group_info, new_state_key)
    };
    // A Commit in a PrivateMessage is refused by its framing as well.
    let mut private_commit = private_message(group.as_bytes(), 1, 64);
    private_commit[4 + 1 + group.as_bytes().len() + 8] = 0x03;
    local(async {
        let client = node.connect_as(&alice_identity).await;
        for (to, payload) in [
            (bob_key, &for_bob),
            (carol_key, &for_carol),
            (bob_key, &private_commit),
        ] {
            assert_eq!(
                client.enqueue(&to, payload).await.unwrap(),
                SendOutcome::Handshake
            );
        }
        // Also inside a batch, which is refused whole.
        let batch = [
            Envelope {
                recipients: vec![bob_key],
                payload: b"harmless".to_vec(),
                message_id: None,
            },
            Envelope {
                recipients: vec![carol_key],
                payload: for_carol.clone(),
                message_id: None,
            },
        ];
        assert_eq!(
            client.enqueue_batch(&batch).await.unwrap(),
            SendOutcome::Handshake
        );
        // Nor in the Welcome's place beside an ordered Commit: the one for
        // Carol published, the one for Bob as its "Welcome".
        let to = |recipient, payload: &Vec<u8>| Envelope {
            recipients: vec![recipient],
            payload: payload.clone(),
            message_id: None,
        };
        let outcome = client
            .publish_commit(&CommitToSend {
                group_id: &group,
                epoch: 1,
                commit: &to(carol_key, &for_carol),
                welcome: Some(&to(bob_key, &for_bob)),
                initial_state: None,
                group_info: Some(&carols_group_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: Some(&carols_state_key),
            })
            .await
            .unwrap();
        match outcome {
            ChangeOutcome::Invalid { reason } => {
                assert!(reason.contains("must carry an MLS Welcome"), "{reason}")
            }
            other => panic!("a Commit in the Welcome's place: {other:?}"),
        }
    });

    // Nobody moved: all three are still in one group at one epoch.
    alice.run(&node, "send", &["--msg", "one group"]);
    for member in [&bob, &carol] {
        let out = member.run(&node, "recv", &[]);
        assert_eq!(out.trim(), format!("trio {}: one group", alice.short()), "{out}");
    }
    for member in [&alice, &bob, &carol] {
        let groups = member.run(&node, "groups", &[]);
        assert!(groups.contains("trio epoch 1 members 3"), "{groups}");
    }
}

#[test]
fn proposals_beyond_the_cap_of_an_epoch_are_refused_until_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_configured(dir.path(), |config| config.enqueue_rate = 0);
    let owner = identity(5);
    let provider = OpenMlsRustCrypto::default();
    let group = GroupId::new(b"proposals".to_vec()).unwrap();
    let mut first = GroupMember::create(&provider, &owner, &group).unwrap();
    let state_key = first.current_state_key(&provider).unwrap();
    let state = first.export_public_state(&provider, &owner).unwrap();
    let commit = first.self_update(&provider, &owner).unwrap();
    let group_info = first.pending_group_info().unwrap().to_vec();
    first.merge_pending_commit(&provider).unwrap();
    let mut mls = MlsGroup::load(
        provider.storage(),
        &openmls::group::GroupId::from_slice(group.as_bytes()),
    )
    .unwrap()
    .unwrap();
    let cap = quicnprotochat_server::delivery::rules::MAX_PROPOSALS_PER_EPOCH as usize;
    let proposals: Vec<Vec<u8>> = (0..=cap)
        .map(|_| {
            let joiner = IdentityKeypair::generate();
            let package =
                quicnprotochat_core::generate_key_package(&OpenMlsRustCrypto::default(), &joiner).unwrap();
            let package = KeyPackageIn::tls_deserialize_exact_bytes(&package)
                .unwrap()
                .validate(provider.crypto(), ProtocolVersion::Mls10)
                .unwrap();
            let (message, _) = mls.propose_add_member(&provider, &owner, &package).unwrap();
            message.tls_serialize_detached().unwrap()
        })
        .collect();
    local(async {
        let client = node.connect_as(&owner).await;
        let none = |payload: Vec<u8>| Envelope {
            recipients: Vec::new(),
            payload,
            message_id: None,
        };
        let outcome = client
            .publish_commit(&CommitToSend {
                group_id: &group,
                epoch: 0,
                commit: &none(commit),
                welcome: None,
                initial_state: Some(&GroupState {
                    group_info: state.group_info,
                    ratchet_tree: state.ratchet_tree,
                }),
                group_info: Some(&group_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::Accepted);
        for proposal in &proposals[..cap] {
            let outcome = client
                .publish_proposal(&group, 1, &none(proposal.clone()), &state_key)
                .await
                .unwrap();
            assert_eq!(outcome, ChangeOutcome::Accepted);
        }
        let outcome = client
            .publish_proposal(&group, 1, &none(proposals[cap].clone()), &state_key)
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::TooManyProposals { max: cap as u32 });
        // The group itself is untouched: still at epoch 1, its GroupInfo
        // served, and no epoch started by adding anyone.
        assert_eq!(
            client
                .fetch_welcome_tree(&group, 1, &EpochKey::from_bytes([1; 32]))
                .await
                .unwrap(),
            FetchedWelcomeTree::Unavailable
        );
        assert!(matches!(
            client.fetch_group_info(&group, &state_key).await.unwrap(),
            FetchedGroupInfo::State(_)
        ));
    });
}
