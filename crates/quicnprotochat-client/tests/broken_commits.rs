//! A member who sends what the others cannot process, through the real node
//! and the real CLI: the node orders the Commit (it cannot check what only
//! members can, such as the membership tag or a path secret sealed to one
//! member), the others find they cannot process it, rejoin by external
//! commit from the GroupInfo every Commit must carry, and then remove the
//! offender and carry on. Without that GroupInfo the node refuses the
//! Commit, so the group cannot be frozen.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::sync::atomic::Ordering;

use common::tampered::{Tampered, Tampering};
use common::{Member, TestNode, group_of, local};
use quicnprotochat_client::state::{StateFile, StateProvider};
use quicnprotochat_core::{GroupMember, IdentityKey};
use quicnprotochat_proto::outcome::ChangeOutcome;
use quicnprotochat_proto::wire::{CommitToSend, Envelope};

/// Mallory publishes a self-update Commit to `others` that `spoil` breaks
/// after (or while) making it. The node refuses it without the new epoch's
/// GroupInfo and orders it with. Returns the epoch it was made in.
fn mallory_publishes(
    node: &TestNode,
    mallory: &Member,
    others: &[&Member],
    make: impl FnOnce(&StateProvider<'_>, &mut GroupMember, &quicnprotochat_core::IdentityKeypair) -> Vec<u8>,
) -> u64 {
    let state = StateFile::open(&common::access(&mallory.state)).unwrap();
    let identity = state.identity().unwrap();
    let group_id = state.current_group().unwrap().unwrap();
    let provider = state.provider();
    let mut club = GroupMember::load(&provider, &group_id).unwrap().unwrap();
    let epoch = club.epoch();
    let state_key = state.kept_state_key(&group_id).unwrap().unwrap();
    let commit = make(&provider, &mut club, &identity);
    let group_info = club.pending_group_info().unwrap().to_vec();
    let to_others = Envelope {
        recipients: others.iter().map(|m| m.key.parse().unwrap()).collect(),
        payload: commit,
        message_id: None,
    };
    local(async {
        let client = node.connect_as(&identity).await;
        // Without the GroupInfo of the new epoch nobody could rejoin past
        // it: the node refuses such a Commit.
        match client
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch,
                commit: &to_others,
                welcome: None,
                initial_state: None,
                group_info: None,
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap()
        {
            ChangeOutcome::Invalid { reason } => assert!(reason.contains("must carry groupInfo"), "{reason}"),
            other => panic!("a Commit without groupInfo: {other:?}"),
        }
        let outcome = client
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch,
                commit: &to_others,
                welcome: None,
                initial_state: None,
                group_info: Some(&group_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(
            outcome,
            ChangeOutcome::Accepted,
            "the node cannot check what only members can"
        );
    });
    club.merge_pending_commit(&provider).unwrap();
    epoch
}

/// Runs `recv` for `member` and asserts it told of a Commit from `culprit`
/// it could not process and rejoined.
fn resyncs_naming(node: &TestNode, member: &Member, culprit: &Member) {
    let (ok, _, err) = member.try_run(node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "a Commit from {} could not be processed here",
            culprit.short()
        )) && err.contains("rejoined to carry on"),
        "{err}"
    );
}

#[test]
fn members_resync_past_a_commit_with_a_broken_membership_tag_and_remove_its_sender() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, mallory] =
        ["alice", "bob", "mallory"].map(|name| Member::register(&node, dir.path(), name));
    group_of(&node, "club", &alice, &[&bob, &mallory]);
    let mallory_key: IdentityKey = mallory.key.parse().unwrap();

    // Mallory makes a valid self-update and breaks its membership tag (the
    // message's last 32 bytes), which only members can check.
    let epoch = mallory_publishes(&node, &mallory, &[&alice, &bob], |provider, club, identity| {
        let mut commit = club.self_update(provider, identity).unwrap();
        let last = commit.len() - 1;
        commit[last] ^= 0x01;
        commit
    });

    // Bob cannot process it: he says so, naming Mallory, and rejoins.
    resyncs_naming(&node, &bob, &mallory);
    // Alice, with --json, gets the event naming the culprit.
    let (ok, out, err) = alice.try_run(&node, "recv", &["--json"]);
    assert!(ok, "{err}");
    let resynced: serde_json::Value = out
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|event| event["type"] == "resynced")
        .unwrap_or_else(|| panic!("no resynced event: {out}"));
    assert_eq!(resynced["culprit"]["user_key"], mallory_key.to_string());
    assert!(resynced["epoch"].as_u64().unwrap() > epoch + 1, "{resynced}");

    // Everyone but Mallory at one epoch: Alice removes her and they talk.
    bob.run(&node, "recv", &[]);
    alice.run(
        &node,
        "remove",
        &["--group-id", "club", "--peer-key", &mallory.key],
    );
    bob.run(&node, "recv", &[]);
    alice.run(&node, "send", &["--msg", "carrying on"]);
    let out = bob.run(&node, "recv", &[]);
    assert_eq!(out.trim(), format!("club {}: carrying on", alice.short()));
    let members = bob.run(&node, "members", &[]);
    assert!(!members.contains(&mallory.key[..16]), "{members}");
    let groups = alice.run(&node, "groups", &[]);
    assert!(groups.contains("members 2"), "{groups}");
}

#[test]
fn members_resync_past_a_commit_with_a_wrong_path_secret_for_one_of_them() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol, mallory] =
        ["alice", "bob", "carol", "mallory"].map(|name| Member::register(&node, dir.path(), name));
    // Leaves 0 to 3 in this order: Carol's leaf is the sibling of
    // Mallory's, so an update path seals one path secret to Carol alone and
    // one to Alice and Bob together.
    group_of(&node, "club", &alice, &[&bob, &carol, &mallory]);
    let carol_key: IdentityKey = carol.key.parse().unwrap();

    // Mallory's self-update seals a wrong path secret to Carol: signature,
    // confirmation and membership tags are all valid, as openmls makes them
    // over what was sealed. Only Carol can tell.
    mallory_publishes(
        &node,
        &mallory,
        &[&alice, &bob, &carol],
        |provider, club, identity| {
            let victim = club
                .mls_group()
                .members()
                .find(|member| member.signature_key == carol_key.as_bytes())
                .unwrap()
                .encryption_key;
            let saboteur = Tampering {
                inner: provider,
                crypto: Tampered {
                    wrong_secret_to: Some(victim),
                    ..Tampered::default()
                },
            };
            let commit = club.self_update(&saboteur, identity).unwrap();
            assert_eq!(
                saboteur.crypto.sealed.load(Ordering::Relaxed),
                1,
                "one secret sealed to Carol"
            );
            commit
        },
    );

    // Alice and Bob process it as any Commit; Carol cannot, says so and
    // rejoins; the others take her rejoin.
    for member in [&alice, &bob] {
        let (ok, _, err) = member.try_run(&node, "recv", &[]);
        assert!(ok && !err.contains("could not be processed"), "{err}");
    }
    resyncs_naming(&node, &carol, &mallory);
    for member in [&alice, &bob] {
        let (ok, _, err) = member.try_run(&node, "recv", &[]);
        assert!(ok, "{err}");
    }

    // Alice removes Mallory; the three carry on at one epoch.
    alice.run(
        &node,
        "remove",
        &["--group-id", "club", "--peer-key", &mallory.key],
    );
    alice.run(&node, "send", &["--msg", "without her"]);
    for member in [&bob, &carol] {
        let out = member.run(&node, "recv", &[]);
        assert_eq!(out.trim(), format!("club {}: without her", alice.short()));
    }
    let groups: Vec<String> = [&alice, &bob, &carol]
        .map(|member| {
            let line = member.run(&node, "groups", &[]);
            // "* club epoch N members 3 ..." minus the current-group mark.
            line.trim().trim_start_matches('*').trim().to_owned()
        })
        .to_vec();
    assert!(groups[0].contains("members 3"), "{groups:?}");
    let epochs: Vec<&str> = groups
        .iter()
        .map(|line| line.split_whitespace().nth(2).unwrap())
        .collect();
    assert!(epochs.iter().all(|epoch| *epoch == epochs[0]), "{groups:?}");
}
