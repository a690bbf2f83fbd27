//! Group changes the node checks against each group's public state, through
//! the real CLI and a real node: the first change hands the node the group's
//! state, a change the node finds not valid or a group it does not know is
//! reported and dropped, and a request to leave goes through the node's
//! check too.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, group_of, state_key_of};
use quicnprotochat_client::state::{Publication, StateError, StateFile};
use quicnprotochat_core::GroupMember;
use quicnprotochat_proto::outcome::ChangeOutcome;
use quicnprotochat_proto::wire::{CommitToSend, Envelope};

/// Opens a member's state file directly, as the client does.
fn open(member: &Member) -> StateFile {
    StateFile::open(&common::access(&member.state)).unwrap()
}

/// Stages a self-update of `member`'s current group in its outbox as if the
/// client had crashed before sending it; `tamper` may change the Commit.
fn stage_unsent_update(member: &Member, recipients: &[&Member], tamper: impl FnOnce(&mut Vec<u8>)) {
    let state = open(member);
    let identity = state.identity().unwrap();
    let group_id = state.current_group().unwrap().unwrap();
    let mut group = GroupMember::load(&state.provider(), &group_id).unwrap().unwrap();
    let epoch = group.epoch();
    state
        .stage_publication(|| -> Result<Publication, StateError> {
            let mut commit = group.self_update(&state.provider(), &identity)?;
            tamper(&mut commit);
            Ok(Publication {
                group_id: group_id.clone(),
                epoch,
                commit: Envelope {
                    recipients: recipients.iter().map(|m| m.key.parse().unwrap()).collect(),
                    payload: commit,
                    message_id: Some(b"unsent".to_vec()),
                },
                welcome: None,
                group_info: group.pending_group_info().map(<[u8]>::to_vec),
                rejoin: false,
            })
        })
        .unwrap();
}

#[test]
fn a_groups_first_change_left_unsent_is_published_later_with_the_groups_state() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    alice.run(&node, "create-group", &["--group-id", "first"]);

    // The group's first change, staged in epoch 0 but never sent: the node
    // has no state for the group yet. The resend exports it from the group
    // as stored, the Commit still pending.
    stage_unsent_update(&alice, &[], |_| {});
    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("first: the node has it; now epoch 1"), "{err}");

    // From that state the node checks the group's later changes.
    alice.run(&node, "invite", &["--group-id", "first", "--peer-key", &bob.key]);
    bob.run(&node, "join", &[]);
    bob.run(&node, "update", &[]);
    let (_, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(err.contains("now at epoch 3, 2 members"), "{err}");
    alice.run(&node, "send", &["--msg", "checked all along"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("first {}: checked all along", alice.short())
    );
}

#[test]
fn a_commit_the_node_finds_not_valid_is_dropped_with_the_nodes_reason() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "strict", &alice, &[&bob]);

    // A Commit damaged on its way: 80 bytes from the end of a PublicMessage
    // Commit is inside its signature (the two tags follow it).
    stage_unsent_update(&alice, &[&bob], |commit| {
        let inside_signature = commit.len() - 80;
        commit[inside_signature] ^= 0xff;
    });
    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(
            "strict is unchanged: the node refused it as not valid for the group (the node's reason: "
        ),
        "{err}"
    );

    // Dropped for good: the group is as it was and takes the next change.
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* strict epoch 1 members 2 x25519"
    );
    let (ok, _, err) = alice.try_run(&node, "update", &[]);
    assert!(ok && !err.contains("resending"), "{err}");
    let (_, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(
        err.contains("now at epoch 2") && !err.contains("warning"),
        "only the valid Commit reached Bob: {err}"
    );
}

#[test]
fn a_group_the_node_has_no_state_for_is_handed_over_again_with_its_next_change() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    alice.run(&node, "create-group", &["--group-id", "old"]);

    // A group changed where this node never saw it (the node lost its
    // database, or forgot the group after a year without a change).
    {
        let state = open(&alice);
        let identity = state.identity().unwrap();
        let group_id = state.current_group().unwrap().unwrap();
        let mut group = GroupMember::load(&state.provider(), &group_id).unwrap().unwrap();
        group.self_update(&state.provider(), &identity).unwrap();
        group.merge_pending_commit(&state.provider()).unwrap();
    }

    // The next change hands the node the group's state in epoch 1 with it,
    // and from then on the node checks the group's changes again.
    alice.run(&node, "update", &[]);
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* old epoch 2 members 1 x25519"
    );
    alice.run(&node, "update", &[]);
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* old epoch 3 members 1 x25519"
    );
}

#[test]
fn a_group_idle_for_the_group_retention_is_forgotten_and_handed_over_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        quicnprotochat_server::Config::in_dir(dir.path(), std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    // The retention task runs every 100 ms here; a group idle for 1 s goes.
    config.retention = std::time::Duration::from_secs(1);
    config.group_retention = std::time::Duration::from_secs(1);
    let node = TestNode::start_with(config, dir.path().to_owned());
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "idle", &alice, &[&bob]);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let group_id = open(&alice).current_group().unwrap().unwrap();
    let bobs_key = state_key_of(&bob, &group_id);
    let forgotten = common::local(async {
        let client = node.connect_as(&open(&bob).identity().unwrap()).await;
        client.fetch_group_info(&group_id, &bobs_key).await.unwrap()
    });
    assert_eq!(
        forgotten,
        quicnprotochat_proto::outcome::FetchedGroupInfo::NotMember,
        "the node no longer knows the group's members"
    );

    // A stranger who knows the id hands over a state of its own making, at
    // the group's epoch: refused, told nothing, the group stays its
    // members'.
    let taken = common::local(async {
        let stranger = common::identity(77);
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let mut own = GroupMember::create(&provider, &stranger, &group_id).unwrap();
        let state_key = own.current_state_key(&provider).unwrap();
        own.self_update(&provider, &stranger).unwrap();
        own.merge_pending_commit(&provider).unwrap();
        let state = own.export_public_state(&provider, &stranger).unwrap();
        let commit = own.self_update(&provider, &stranger).unwrap();
        let group_info = own.pending_group_info().unwrap().to_vec();
        node.connect_as(&stranger)
            .await
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 1,
                commit: &Envelope {
                    recipients: vec![alice.key.parse().unwrap()],
                    payload: commit,
                    message_id: None,
                },
                welcome: None,
                initial_state: Some(&quicnprotochat_proto::wire::GroupState {
                    group_info: state.group_info,
                    ratchet_tree: state.ratchet_tree,
                }),
                group_info: Some(&group_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap()
    });
    assert_eq!(taken, ChangeOutcome::UnknownGroup);

    // Bob's next change hands the state over again, in the state the node
    // kept the fingerprint of; everyone goes on.
    bob.run(&node, "update", &[]);
    alice.run(&node, "recv", &[]);
    alice.run(&node, "send", &["--group-id", "idle", "--msg", "awake again"]);
    assert!(bob.run(&node, "recv", &[]).contains("awake again"));
    assert!(bob.run(&node, "groups", &[]).contains("idle epoch 2 members 2"));
}

#[test]
fn a_leave_made_in_a_past_epoch_is_made_again_after_catching_up() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "moving", &alice, &[&bob, &carol]);

    // Alice moves the group to epoch 2 before Bob has seen it.
    alice.run(&node, "update", &[]);
    let (ok, _, err) = bob.try_run(&node, "leave", &["--group-id", "moving"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("moving changed meanwhile (now at epoch 2); catching up and asking again"),
        "{err}"
    );
    assert!(err.contains("asked to leave moving"), "{err}");
    assert_eq!(
        bob.run(&node, "groups", &[]).trim(),
        "* moving epoch 2 members 3 x25519 (leaving)"
    );

    // The node kept the proposal of epoch 2, so Alice's Commit that
    // references it passes the node's check.
    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(
        ok && err.contains("committed pending proposals; now epoch 3, 2 members"),
        "{err}"
    );
    let (_, _, err) = carol.try_run(&node, "recv", &[]);
    assert!(
        err.contains("now at epoch 3, 2 members") && !err.contains("warning"),
        "{err}"
    );
    let (_, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(err.contains("you were removed"), "{err}");

    carol.run(&node, "send", &["--group-id", "moving", "--msg", "two of us"]);
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("moving {}: two of us", carol.short())
    );
}

/// The framing of an MLS PublicMessage Commit (RFC 9420, section 6):
/// version, wire format, group id, epoch, a member sender, no authenticated
/// data, content type commit, then `noise`: what anyone who has seen one
/// message of the group can make.
fn framed_as_a_commit(group_id: &[u8], epoch: u64, noise: &[u8]) -> Vec<u8> {
    let mut message = vec![0x00, 0x01, 0x00, 0x01];
    assert!(group_id.len() < 64, "a one-byte length");
    message.push(group_id.len() as u8);
    message.extend_from_slice(group_id);
    message.extend_from_slice(&epoch.to_be_bytes());
    message.extend_from_slice(&[0x01, 0, 0, 0, 2]); // member at leaf 2
    message.push(0x00); // no authenticated data
    message.push(0x03); // commit
    message.extend_from_slice(noise);
    message
}

#[test]
fn a_removed_members_noise_framed_as_a_commit_is_refused_and_the_others_change_the_group_freely() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, eve, carol] =
        ["alice", "bob", "eve", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "team", &alice, &[&bob, &eve]);
    // The state key Eve holds while she is a member (she could copy it).
    let group_id = open(&eve).current_group().unwrap().unwrap();
    let old_key = state_key_of(&eve, &group_id);
    alice.run(&node, "remove", &["--group-id", "team", "--peer-key", &eve.key]);
    bob.run(&node, "recv", &[]);
    eve.try_run(&node, "recv", &[]);

    // Eve, removed at epoch 2, publishes noise framed as a Commit of the
    // group's current epoch, on her own authenticated connection, with the
    // state key she held (from before her removal moved it on) or, say
    // leaked, the group's current one. Her client forgot the key when it
    // learnt of her removal.
    let state = open(&eve);
    let eve_identity = state.identity().unwrap();
    assert_eq!(state.kept_state_key(&group_id).unwrap(), None);
    let current_key = state_key_of(&alice, &group_id);
    assert_ne!(old_key, current_key, "removing Eve moved the state key on");
    let publish = |payload: Vec<u8>, state_key| {
        common::local(async {
            node.connect_as(&eve_identity)
                .await
                .publish_commit(&CommitToSend {
                    group_id: &group_id,
                    epoch: 2,
                    commit: &Envelope {
                        recipients: vec![alice.key.parse().unwrap(), bob.key.parse().unwrap()],
                        payload,
                        message_id: None,
                    },
                    welcome: None,
                    initial_state: None,
                    group_info: None,
                    epoch_key: None,
                    state_key,
                    new_state_key: None,
                })
                .await
        })
    };
    // Bytes that do not even parse as a Commit: refused as a wrong call.
    let err = publish(framed_as_a_commit(group_id.as_bytes(), 2, &[0x5a; 117]), &old_key).unwrap_err();
    assert!(err.to_string().contains("malformed MLS message"), "{err}");
    // A well-formed Commit of noise: no proposals, no path, and random
    // signature, confirmation tag and membership tag.
    // (64 needs a two-byte variable-length size: 0x40 0x40.)
    let mut body = vec![0x00, 0x00, 0x40, 0x40];
    body.extend_from_slice(&[0x5a; 64]);
    body.push(0x20);
    body.extend_from_slice(&[0xa5; 32]);
    body.push(0x20);
    body.extend_from_slice(&[0x3c; 32]);
    // Eve is no member any more: she is told nothing about the group,
    // whichever key she holds.
    for key in [&old_key, &current_key] {
        let outcome = publish(framed_as_a_commit(group_id.as_bytes(), 2, &body), key).unwrap();
        assert_eq!(outcome, ChangeOutcome::UnknownGroup);
    }

    // The epoch stayed free: the others add, update and remove as before.
    alice.run(&node, "invite", &["--group-id", "team", "--peer-key", &carol.key]);
    carol.run(&node, "join", &[]);
    bob.run(&node, "recv", &[]);
    bob.run(&node, "update", &["--group-id", "team"]);
    alice.run(&node, "recv", &[]);
    carol.run(&node, "recv", &[]);
    alice.run(&node, "remove", &["--group-id", "team", "--peer-key", &bob.key]);
    carol.run(&node, "recv", &[]);
    let groups = carol.run(&node, "groups", &[]);
    assert!(groups.contains("team epoch 5 members 2"), "{groups}");
    alice.run(&node, "send", &["--group-id", "team", "--msg", "still ours"]);
    let read = carol.run(&node, "recv", &[]);
    assert!(read.contains("still ours"), "{read}");
    let (_, out, _) = eve.try_run(&node, "recv", &[]);
    assert_eq!(out, "", "the removed member reads nothing");
}
