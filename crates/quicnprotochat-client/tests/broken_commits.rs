//! A member who sends what the others cannot process, through the real node
//! and the real CLI: the node orders the Commit (it cannot check what only
//! members can, such as the membership tag), the others find they cannot
//! process it, rejoin by external commit from the GroupInfo every Commit
//! must carry, and then remove the offender and carry on. Without that
//! GroupInfo the node refuses the Commit, so the group cannot be frozen.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, group_of, local};
use quicnprotochat_client::state::StateFile;
use quicnprotochat_core::{GroupId, GroupMember, IdentityKey};
use quicnprotochat_proto::outcome::CommitOutcome;
use quicnprotochat_proto::wire::Envelope;

#[test]
fn members_resync_past_a_commit_with_a_broken_membership_tag_and_remove_its_sender() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, mallory] =
        ["alice", "bob", "mallory"].map(|name| Member::register(&node, dir.path(), name));
    group_of(&node, "club", &alice, &[&bob, &mallory]);
    let mallory_key: IdentityKey = mallory.key.parse().unwrap();
    let others: Vec<IdentityKey> = [&alice, &bob].map(|m| m.key.parse().unwrap()).to_vec();

    // Mallory makes a valid self-update and breaks its membership tag (the
    // message's last 32 bytes), which only members can check.
    let state = StateFile::open(std::path::Path::new(&mallory.state)).unwrap();
    let identity = state.identity().unwrap();
    let group_id = GroupId::new(state.current_group().unwrap().unwrap()).unwrap();
    let provider = state.provider();
    let mut club = GroupMember::load(&provider, group_id.as_bytes())
        .unwrap()
        .unwrap();
    let epoch = club.epoch();
    let mut commit = club.self_update(&provider, &identity).unwrap();
    let group_info = club.pending_group_info().unwrap().to_vec();
    let last = commit.len() - 1;
    commit[last] ^= 0x01;
    let to_others = Envelope {
        recipients: others.clone(),
        payload: commit,
        message_id: None,
    };
    local(async {
        let client = node.connect_as(&identity).await;
        // Without the GroupInfo of the new epoch nobody could rejoin past
        // it: the node refuses such a Commit.
        match client
            .publish_commit(&group_id, epoch, &to_others, None, None, None)
            .await
            .unwrap()
        {
            CommitOutcome::Invalid { reason } => assert!(reason.contains("must carry groupInfo"), "{reason}"),
            other => panic!("a Commit without groupInfo: {other:?}"),
        }
        let outcome = client
            .publish_commit(&group_id, epoch, &to_others, None, None, Some(&group_info))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            CommitOutcome::Accepted,
            "the node cannot check a membership tag"
        );
    });
    club.merge_pending_commit(&provider).unwrap();
    drop(state);

    // Bob cannot process it: he says so, naming Mallory, and rejoins.
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "a Commit from {} could not be processed here",
            mallory.short()
        )) && err.contains("rejoined to carry on"),
        "{err}"
    );
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
