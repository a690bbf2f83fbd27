//! Welcomes without the ratchet tree, through the real CLI and a real node:
//! a group whose tree is bigger than the node's payload limit is still
//! joined, because the joiner fetches the tree from the node (and checks it
//! against the tree hash the Welcome's signed GroupInfo commits to) instead
//! of receiving it inside the Welcome; a Welcome whose tree the node does
//! not keep, or will not give the caller, is reported and dropped.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;

use common::{Member, TestNode, local, smuggle_welcome};
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_client::node_client::NodeClient;
use quicnprotochat_client::state::StateFile;
use quicnprotochat_core::{GroupId, GroupMember, IdentityKey, IdentityKeypair, Seq, generate_key_package};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedKeyPackage, FetchedWelcomeTree, SendOutcome};
use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};
use quicnprotochat_server::Config;

/// The node's payload limit in this test: below a 66-member tree (~14 KB),
/// above a Commit adding four people.
const MAX_PAYLOAD: usize = 8 * 1024;

/// People outside the CLI with KeyPackages on the node.
const OTHERS: usize = 64;

#[test]
fn a_group_whose_tree_exceeds_the_payload_limit_is_joined_with_the_tree_the_node_keeps() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = Config::in_dir(temp.path(), SocketAddr::from(([127, 0, 0, 1], 0)));
    config.max_payload = MAX_PAYLOAD;
    let node = TestNode::start_with(config, temp.path().to_owned());
    let alice = Member::register(&node, temp.path(), "alice");
    let bob = Member::register(&node, temp.path(), "bob");

    let others: Vec<IdentityKeypair> = (0..OTHERS).map(|_| IdentityKeypair::generate()).collect();
    local(async {
        for identity in &others {
            let package = generate_key_package(&OpenMlsRustCrypto::default(), identity).unwrap();
            let client = node.connect_as(identity).await;
            client
                .upload_key_package(&identity.public_key(), &package)
                .await
                .unwrap();
            // One address holds at most 64 connections at the node.
            client.close().await;
        }
    });
    alice.run(&node, "create-group", &["--group-id", "big"]);
    // A Commit carries each KeyPackage it adds (~300 B) under the same
    // limit: a few people per invite.
    for batch in others.chunks(4) {
        let keys: Vec<String> = batch.iter().map(|i| i.public_key().to_string()).collect();
        let mut args = vec!["--group-id", "big"];
        for key in &keys {
            args.extend_from_slice(&["--peer-key", key]);
        }
        alice.run(&node, "invite", &args);
    }
    alice.run(&node, "invite", &["--group-id", "big", "--peer-key", &bob.key]);

    // What Bob finds on the node: a Welcome within the limit, and a tree
    // beyond it (a Welcome carrying the tree, bigger than the tree itself,
    // could not have been sent).
    let bob_identity = StateFile::open(&common::access(&bob.state))
        .unwrap()
        .identity()
        .unwrap();
    let epoch = (OTHERS / 4 + 1) as u64;
    let alice_state = StateFile::open(&common::access(&alice.state)).unwrap();
    let group = alice_state.current_group().unwrap().unwrap();
    // Bob computes it from his Welcome; Alice, who made the epoch, has it.
    let epoch_key = quicnprotochat_core::GroupMember::load(&alice_state.provider(), &group)
        .unwrap()
        .unwrap()
        .epoch_key(&alice_state.provider())
        .unwrap();
    let (welcome, tree) = local(async {
        let client: NodeClient = node.connect_as(&bob_identity).await;
        let queued = client
            .fetch_since(&bob_identity.public_key(), Seq::ZERO, 0)
            .await
            .unwrap();
        let FetchedWelcomeTree::Tree { tree, state_key } = client
            .fetch_welcome_tree(&group, epoch, &epoch_key)
            .await
            .unwrap()
        else {
            panic!("the node keeps the tree of the epoch that added Bob");
        };
        // With the tree, the group's state key, as Alice keeps it.
        assert_eq!(state_key, alice_state.kept_state_key(&group).unwrap());
        (queued, tree)
    });
    // His Welcome, then the group's name in the epoch it starts.
    assert_eq!(
        welcome.len(),
        2,
        "Bob's queue holds his Welcome and the group's name"
    );
    assert!(matches!(
        quicnprotochat_core::classify(&welcome[0].payload),
        Ok(quicnprotochat_core::Incoming::Welcome)
    ));
    assert!(welcome[0].payload.len() <= MAX_PAYLOAD);
    assert!(
        tree.len() > MAX_PAYLOAD,
        "the tree ({} B) is bigger than the limit",
        tree.len()
    );

    bob.run(&node, "join", &[]);
    let groups = bob.run(&node, "groups", &[]);
    assert!(
        groups.contains(&format!("big epoch {epoch} members {}", OTHERS + 2)),
        "{groups}"
    );
    alice.run(
        &node,
        "send",
        &["--group-id", "big", "--msg", "hello, all 66 of us"],
    );
    let read = bob.run(&node, "recv", &[]);
    assert!(read.contains("hello, all 66 of us"), "{read}");
}

#[test]
fn a_welcome_whose_tree_the_node_does_not_keep_is_reported_and_dropped() {
    let node = TestNode::start();
    let bob = Member::register(&node, &node.dir, "bob");
    let bob_key: IdentityKey = bob.key.parse().unwrap();
    // Someone adds Bob but never publishes the Commit through the node, only
    // the Welcome (as another group's): the node has no tree for its epoch.
    let adder = IdentityKeypair::generate();
    local(async {
        let client = node.connect_as(&adder).await;
        let FetchedKeyPackage::Package(package) = client.fetch_key_package(&bob_key).await.unwrap() else {
            panic!("Bob's KeyPackages are on the node");
        };
        let provider = OpenMlsRustCrypto::default();
        let mut group =
            GroupMember::create(&provider, &adder, &GroupId::new(b"unpublished".to_vec()).unwrap()).unwrap();
        let added = group
            .add_members(&provider, &adder, &[package], &quicnprotochat_core::NoDeviceLists)
            .unwrap();
        smuggle_welcome(&client, &adder, bob_key, added.welcome).await;
    });

    let (ok, _, err) = bob.try_run(&node, "join", &[]);
    assert!(!ok);
    assert!(
        err.contains("the node no longer keeps the group's tree for it; ask a member to invite you again"),
        "{err}"
    );
    // Dropped, not retried forever: the next run finds nothing to join.
    let (ok, _, err) = bob.try_run(&node, "join", &[]);
    assert!(!ok);
    assert!(err.contains("no Welcome is waiting for you"), "{err}");
}

#[test]
fn the_tree_of_an_epoch_is_refused_to_anyone_its_commit_did_not_add() {
    let node = TestNode::start();
    let bob = Member::register(&node, &node.dir, "bob");
    let carol = Member::register(&node, &node.dir, "carol");
    let (bob_key, carol_key): (IdentityKey, IdentityKey) =
        (bob.key.parse().unwrap(), carol.key.parse().unwrap());
    // The node accepts a Commit adding Carol; the adder also makes a
    // Welcome for Bob in the same epoch (from a Commit it never publishes)
    // and queues it for him.
    let adder = IdentityKeypair::generate();
    local(async {
        let client = node.connect_as(&adder).await;
        let mut packages = Vec::new();
        for key in [&carol_key, &bob_key] {
            let FetchedKeyPackage::Package(package) = client.fetch_key_package(key).await.unwrap() else {
                panic!("KeyPackages are on the node");
            };
            packages.push(package);
        }
        let provider = OpenMlsRustCrypto::default();
        let mut group =
            GroupMember::create(&provider, &adder, &GroupId::new(b"one-epoch".to_vec()).unwrap()).unwrap();
        let state_key = group.current_state_key(&provider).unwrap();
        let state = group.export_public_state(&provider, &adder).unwrap();
        let for_bob = group
            .add_members(
                &provider,
                &adder,
                &packages[1..],
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        group.discard_pending_commit(&provider).unwrap();
        let for_carol = group
            .add_members(
                &provider,
                &adder,
                &packages[..1],
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        let group_info = group.pending_group_info().unwrap().to_vec();
        let outcome = client
            .publish_commit(&CommitToSend {
                group_id: &GroupId::new(b"one-epoch".to_vec()).unwrap(),
                epoch: 0,
                commit: &Envelope {
                    recipients: Vec::new(),
                    payload: for_carol.commit,
                    message_id: None,
                },
                welcome: Some(&Envelope {
                    recipients: vec![carol_key],
                    payload: for_carol.welcome,
                    message_id: None,
                }),
                initial_state: Some(&GroupState {
                    group_info: state.group_info,
                    ratchet_tree: state.ratchet_tree,
                }),
                group_info: Some(&group_info),
                epoch_key: Some(&group.pending_epoch_key(&provider).unwrap()),
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::Accepted);
        // A Welcome sent around the node's ordering is refused outright.
        assert_eq!(
            client.enqueue(&bob_key, &for_bob.welcome).await.unwrap(),
            SendOutcome::Handshake
        );
        smuggle_welcome(&client, &adder, bob_key, for_bob.welcome).await;
    });

    // Bob learns nothing beyond "no tree for you": the same answer as for
    // a tree the node never kept, so a Welcome tells nobody whether a group
    // exists.
    let (ok, _, err) = bob.try_run(&node, "join", &[]);
    assert!(!ok);
    assert!(
        err.contains("the node no longer keeps the group's tree for it; ask a member to invite you again"),
        "{err}"
    );
    let (ok, _, err) = bob.try_run(&node, "join", &[]);
    assert!(!ok && err.contains("no Welcome is waiting for you"), "{err}");
    // Carol, whom the accepted Commit added, joins with the tree.
    carol.run(&node, "join", &[]);
    let groups = carol.run(&node, "groups", &[]);
    assert!(groups.contains("epoch 1 members 2"), "{groups}");
}
