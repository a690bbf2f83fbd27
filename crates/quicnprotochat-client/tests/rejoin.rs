//! Rejoining a group by external commit, through the real CLI and a real
//! node: a member whose state file lost the group (a restored backup) gets
//! back in from the GroupInfo the group's last Commit brought, the others
//! accept it, and strangers get nowhere. Also the node's side of it over
//! the typed client: each Commit's GroupInfo is served to members only.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::path::Path;

use common::{Member, TestNode, identity, invite_all, local, welcome_epoch_key};
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_client::ClientError;
use quicnprotochat_client::state::{Publication, StateError, StateFile};
use quicnprotochat_core::{
    BackupSecrets, GroupId, GroupMember, IdentityKey, KeyBackup, StateKey, generate_key_package,
};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedGroupInfo, FetchedWelcomeTree};
use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};

/// Copies a member's state file aside, as a backup.
fn back_up(member: &Member) -> String {
    let backup = format!("{}.backup", member.state);
    assert!(
        !Path::new(&format!("{}-wal", member.state)).exists(),
        "the state file is one file"
    );
    std::fs::copy(&member.state, &backup).unwrap();
    backup
}

/// Puts a backup back in place of a member's state file.
fn restore(member: &Member, backup: &str) {
    std::fs::copy(backup, &member.state).unwrap();
}

/// `first` creates `name` and invites `rest` in one Commit; they all join.
/// Returns the group's id in hex, as `create-group` prints it.
fn create_and_invite(node: &TestNode, name: &str, first: &Member, rest: &[&Member]) -> String {
    let (ok, _, err) = first.try_run(node, "create-group", &["--group-id", name]);
    assert!(ok, "{err}");
    let full_id = err
        .split("(id ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no group id in {err:?}"))
        .to_owned();
    assert!(
        full_id.len() == 32 && full_id.chars().all(|c| c.is_ascii_hexdigit()),
        "16 random bytes: {full_id}"
    );
    invite_all(node, name, first, rest);
    full_id
}

#[test]
fn a_member_restored_from_an_old_backup_rejoins_and_reads_and_writes_again() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    // Bob's backup holds his identity and nothing else.
    let backup = back_up(&bob);
    let full_id = create_and_invite(&node, "team", &alice, &[&bob, &carol]);
    alice.run(&node, "send", &["--msg", "before"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("team {}: before", alice.short())
    );
    carol.run(&node, "recv", &[]);

    // Bob's device is wiped; he restores the backup and lost the group.
    restore(&bob, &backup);
    assert_eq!(bob.run(&node, "groups", &[]), "");
    let (ok, _, err) = bob.try_run(&node, "rejoin", &["--group-id", &full_id]);
    assert!(ok, "{err}");
    // The backup held no name for the group: it is known by its id.
    assert!(
        err.contains(&format!("rejoined {full_id}: epoch 2, 3 members")),
        "{err}"
    );
    assert_eq!(
        bob.run(&node, "groups", &[]).trim(),
        format!("* {full_id} epoch 2 members 3 x25519")
    );

    // The others accept it and stay in the group.
    for member in [&alice, &carol] {
        let (ok, out, err) = member.try_run(&node, "recv", &[]);
        assert!(ok, "{err}");
        assert_eq!(out, "");
        assert!(
            err.contains(&format!(
                "group team: {} rejoined; now at epoch 2, 3 members",
                bob.short()
            )),
            "{err}"
        );
        assert!(!err.contains("warning"), "{err}");
        assert_eq!(
            member.run(&node, "groups", &[]).trim(),
            "* team epoch 2 members 3 x25519"
        );
    }

    // One of them (the first member besides Bob) told him the name.
    let (ok, out, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert_eq!(out, "");
    assert_eq!(err.matches(" is called team").count(), 1, "{err}");

    // Nothing left to repair: a second rejoin changes nothing.
    let (ok, _, err) = bob.try_run(&node, "rejoin", &["--group-id", "team"]);
    assert!(ok, "{err}");
    assert!(err.contains("team is up to date here (epoch 2)"), "{err}");

    alice.run(&node, "send", &["--msg", "welcome back"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("team {}: welcome back", alice.short())
    );
    bob.run(&node, "send", &["--msg", "good to be back"]);
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("team {}: good to be back", bob.short())
    );
    assert_eq!(
        carol.run(&node, "recv", &[]).trim(),
        [
            format!("team {}: welcome back", alice.short()),
            format!("team {}: good to be back", bob.short()),
        ]
        .join("\n")
    );

    // Bob changes the group like any member, and everyone follows.
    bob.run(&node, "update", &["--group-id", "team"]);
    for member in [&alice, &carol] {
        let (ok, _, err) = member.try_run(&node, "recv", &[]);
        assert!(ok && err.contains("now at epoch 3, 3 members"), "{err}");
    }
}

#[test]
fn a_stranger_or_a_removed_member_cannot_rejoin_and_the_group_is_unaffected() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol, mallory] =
        ["alice", "bob", "carol", "mallory"].map(|n| Member::register(&node, dir.path(), n));
    let full_id = create_and_invite(&node, "club", &alice, &[&bob, &carol]);
    alice.run(&node, "remove", &["--group-id", "club", "--peer-key", &carol.key]);
    carol.run(&node, "recv", &[]);
    bob.run(&node, "recv", &[]);

    for (outsider, group_id) in [(&mallory, full_id.as_str()), (&carol, "club")] {
        let (ok, _, err) = outsider.try_run(&node, "rejoin", &["--group-id", group_id]);
        assert!(!ok, "{err}");
        // Mallory never knew the name, Carol keeps it.
        let shown = if group_id == "club" { "club" } else { group_id };
        assert!(
            err.contains(&format!("the node refused to let you rejoin {shown}"))
                && err.contains("the node knows you as no member of it")
                && err.contains("only a current member can rejoin"),
            "{err}"
        );
    }
    assert_eq!(mallory.run(&node, "groups", &[]), "");
    assert!(carol.run(&node, "groups", &[]).contains("club epoch 2 removed"));

    alice.run(&node, "send", &["--msg", "still us"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("club {}: still us", alice.short())
    );
    bob.run(&node, "send", &["--msg", "indeed"]);
    let (ok, out, err) = alice.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("club {}: indeed", bob.short()));
    assert!(!err.contains("rejoined"), "{err}");
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* club epoch 2 members 2 x25519"
    );
}

/// Stages `member`'s rejoin of `group_id` from the node's current state as
/// if the client had crashed before the node answered: the group is merged
/// in the state file and the publication waits in the outbox. The state
/// file, restored from before the group, has no state key for it: the
/// group's state is asked for with the key in the member's key backup on
/// the node, which is kept for the rejoin, as `rejoin` does.
fn stage_unanswered_rejoin(node: &TestNode, member: &Member, group_id: &str, message_id: &[u8]) {
    let state = StateFile::open(&common::access(&member.state)).unwrap();
    let identity = state.identity().unwrap();
    let me = identity.public_key();
    let group_id = GroupId::new(hex::decode(group_id).unwrap()).unwrap();
    assert_eq!(state.kept_state_key(&group_id).unwrap(), None);
    let (fetched, state_key) = local(async {
        let client = node.connect_as(&identity).await;
        let secrets = BackupSecrets::of(&identity);
        let sealed = client.fetch_key_backup(&secrets.lookup).await.unwrap();
        let state_key = KeyBackup::open(&secrets.key, &sealed)
            .and_then(|backup| backup.state_key(&group_id).cloned())
            .expect("the key backup on the node holds the group's state key");
        (
            client.fetch_group_info(&group_id, &state_key).await.unwrap(),
            state_key,
        )
    });
    let FetchedGroupInfo::State(served) = fetched else {
        panic!("no GroupInfo served");
    };
    state.set_state_key(&group_id, &state_key).unwrap();
    state
        .stage_publication(|| -> Result<Publication, StateError> {
            let rejoined = GroupMember::rejoin(
                &state.provider(),
                &identity,
                &group_id,
                &served.group_info,
                &served.ratchet_tree,
                &quicnprotochat_core::NoDeviceLists,
            )?;
            Ok(Publication {
                group_id: group_id.clone(),
                epoch: rejoined.epoch,
                commit: Envelope {
                    recipients: rejoined
                        .group
                        .members()
                        .into_iter()
                        .filter(|member| *member != me)
                        .collect(),
                    payload: rejoined.commit,
                    message_id: Some(message_id.to_vec()),
                },
                welcome: None,
                group_info: Some(rejoined.group_info),
                rejoin: true,
            })
        })
        .unwrap();
}

#[test]
fn an_unanswered_rejoin_is_resent_and_settled_by_the_next_command() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    let backup = back_up(&bob);
    let full_id = create_and_invite(&node, "resume", &alice, &[&bob]);
    // A command after the join writes Bob's key backup on the node, which
    // the restored device asks for the group's state key (`join` alone
    // leaves it unwritten: see the next test).
    bob.run(&node, "recv", &[]);

    // Bob rejoins after a restore, but the node never got the Commit.
    restore(&bob, &backup);
    stage_unanswered_rejoin(&node, &bob, &full_id, b"rejoin-1");
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("resending your unconfirmed rejoin of {full_id}"))
            && err.contains(&format!("{full_id}: the node has it; now epoch 2")),
        "{err}"
    );
    assert_eq!(
        bob.run(&node, "groups", &[]).trim(),
        format!("* {full_id} epoch 2 members 2 x25519")
    );
    let (_, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(err.contains("rejoined; now at epoch 2, 2 members"), "{err}");
    alice.run(&node, "send", &["--msg", "settled"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("resume {}: settled", alice.short())
    );

    // Again, but Alice's update wins the epoch before the resend: the
    // rejoin is dropped with its group state, and a new one succeeds.
    restore(&bob, &backup);
    stage_unanswered_rejoin(&node, &bob, &full_id, b"rejoin-2");
    alice.run(&node, "update", &[]);
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("another member's change won (the group is at epoch 3); your rejoin was dropped: run `rejoin` again"),
        "{err}"
    );
    assert_eq!(bob.run(&node, "groups", &[]), "");
    let (ok, _, err) = bob.try_run(&node, "rejoin", &["--group-id", &full_id]);
    assert!(
        ok && err.contains(&format!("rejoined {full_id}: epoch 4, 2 members")),
        "{err}"
    );
    bob.run(&node, "send", &["--msg", "back for good"]);
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("resume {}: back for good", bob.short())
    );
}

/// A device restored from a backup taken before it joined holds neither
/// the group nor its state key: the key backup on the node, which the
/// join brought up to date, gives it the key, and it rejoins.
#[test]
fn a_member_restored_from_a_backup_taken_before_it_joined_rejoins_with_its_key_backup() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    let backup = back_up(&bob);
    // Bob's one command in the group is `join`.
    let full_id = create_and_invite(&node, "fresh", &alice, &[&bob]);
    restore(&bob, &backup);
    let (ok, _, err) = bob.try_run(&node, "rejoin", &["--group-id", &full_id]);
    assert!(
        ok && err.contains(&format!("rejoined {full_id}: epoch 2, 2 members")),
        "{err}"
    );
    let (_, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(err.contains("rejoined; now at epoch 2, 2 members"), "{err}");
    alice.run(&node, "send", &["--msg", "still with us"]);
    let read = bob.run(&node, "recv", &[]);
    assert!(read.contains("still with us"), "{read}");
}

fn key(n: u8) -> IdentityKey {
    identity(n).public_key()
}

fn envelope(to: &[u8], payload: Vec<u8>, id: &[u8]) -> Envelope {
    Envelope {
        recipients: to.iter().map(|n| key(*n)).collect(),
        payload,
        message_id: Some(id.to_vec()),
    }
}

#[test]
fn a_commits_group_info_is_served_to_members_only_and_lets_them_rejoin() {
    let node = TestNode::start();
    local(async {
        let (one, two) = (OpenMlsRustCrypto::default(), OpenMlsRustCrypto::default());
        let group_id = GroupId::new(b"served#1".to_vec()).unwrap();
        let mut creator = GroupMember::create(&one, &identity(1), &group_id).unwrap();
        let state_key = creator.current_state_key(&one).unwrap();
        let package = generate_key_package(&two, &identity(2)).unwrap();
        let added = creator
            .add_members(
                &one,
                &identity(1),
                &[package],
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        let group_info = creator.pending_group_info().unwrap().to_vec();
        let state = creator.export_public_state(&one, &identity(1)).unwrap();
        let state = GroupState {
            group_info: state.group_info,
            ratchet_tree: state.ratchet_tree,
        };
        let (member, joiner, stranger) = (
            node.connect_as(&identity(1)).await,
            node.connect_as(&identity(2)).await,
            node.connect_as(&identity(3)).await,
        );
        let outcome = member
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 0,
                commit: &envelope(&[], added.commit, b"add"),
                welcome: Some(&envelope(&[2], added.welcome.clone(), b"welcome")),
                initial_state: Some(&state),
                group_info: Some(&group_info),
                epoch_key: Some(&creator.pending_epoch_key(&one).unwrap()),
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::Accepted);
        creator.merge_pending_commit(&one).unwrap();
        let FetchedWelcomeTree::Tree {
            tree,
            state_key: joiners_key,
        } = joiner
            .fetch_welcome_tree(&group_id, 1, &welcome_epoch_key(&two, &added.welcome))
            .await
            .unwrap()
        else {
            panic!("the node keeps the tree for the member it added");
        };
        assert_eq!(
            joiners_key.as_ref(),
            Some(&state_key),
            "the joiner gets the group's state key"
        );
        GroupMember::join(
            &two,
            &added.welcome,
            Some(&tree),
            &quicnprotochat_core::NoDeviceLists,
        )
        .unwrap();

        // Both members get epoch 1's GroupInfo, as published, and the tree.
        for client in [&member, &joiner] {
            let FetchedGroupInfo::State(served) =
                client.fetch_group_info(&group_id, &state_key).await.unwrap()
            else {
                panic!("no GroupInfo served");
            };
            assert_eq!(served.group_info, group_info);
            assert!(!served.ratchet_tree.is_empty());
        }
        // A member asking with a key that does not open the group's state
        // gets `notMember`, as does a stranger, even one holding the key:
        // the answer for no group at all. An anonymous caller gets a
        // permission error (it is nobody).
        let wrong_key = StateKey::from_bytes([3; 32]);
        assert_eq!(
            member.fetch_group_info(&group_id, &wrong_key).await.unwrap(),
            FetchedGroupInfo::NotMember
        );
        let nothing = GroupId::new(b"no such group".to_vec()).unwrap();
        for group in [&group_id, &nothing] {
            for key in [&state_key, &wrong_key] {
                assert_eq!(
                    stranger.fetch_group_info(group, key).await.unwrap(),
                    FetchedGroupInfo::NotMember
                );
            }
        }
        match node.connect().await.fetch_group_info(&group_id, &state_key).await {
            Err(ClientError::Rpc(e)) => assert_eq!(e.kind, capnp::ErrorKind::Failed, "{e}"),
            other => panic!("served to an anonymous caller: {other:?}"),
        }

        // identity(2) lost its state: it rejoins from what the node serves.
        let FetchedGroupInfo::State(served) = joiner.fetch_group_info(&group_id, &state_key).await.unwrap()
        else {
            panic!("no GroupInfo served");
        };
        let wiped = OpenMlsRustCrypto::default();
        let rejoined = GroupMember::rejoin(
            &wiped,
            &identity(2),
            &group_id,
            &served.group_info,
            &served.ratchet_tree,
            &quicnprotochat_core::NoDeviceLists,
        )
        .unwrap();
        assert_eq!(rejoined.epoch, 1);
        // The stranger may not publish it for identity(2), even with the
        // group's state key.
        let stolen = stranger
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 1,
                commit: &envelope(&[1], rejoined.commit.clone(), b"stolen"),
                welcome: None,
                initial_state: None,
                group_info: Some(&rejoined.group_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        // Not a member: told nothing about the group.
        assert_eq!(stolen, ChangeOutcome::UnknownGroup);
        let outcome = joiner
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 1,
                commit: &envelope(&[1], rejoined.commit.clone(), b"rejoin"),
                welcome: None,
                initial_state: None,
                group_info: Some(&rejoined.group_info),
                epoch_key: None,
                // A rejoin replaces the device's own leaf: nobody is out,
                // the state key stays.
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::Accepted);
        let FetchedGroupInfo::State(served) = member.fetch_group_info(&group_id, &state_key).await.unwrap()
        else {
            panic!("no GroupInfo served");
        };
        assert_eq!(served.group_info, rejoined.group_info, "the rejoin's, of epoch 2");

        // A Commit without a GroupInfo is refused (nobody could rejoin past
        // it), and the rejoin's stays served.
        creator
            .receive(&one, &rejoined.commit, &quicnprotochat_core::NoDeviceLists)
            .unwrap();
        assert!(!creator.state_key_rotated(), "a rejoin takes nobody out");
        let update = creator.self_update(&one, &identity(1)).unwrap();
        let outcome = member
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 2,
                commit: &envelope(&[2], update, b"update"),
                welcome: None,
                initial_state: None,
                group_info: None,
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        match outcome {
            ChangeOutcome::Invalid { reason } => assert!(reason.contains("must carry groupInfo"), "{reason}"),
            other => panic!("a Commit without groupInfo: {other:?}"),
        }
        let FetchedGroupInfo::State(served) = joiner.fetch_group_info(&group_id, &state_key).await.unwrap()
        else {
            panic!("no GroupInfo served");
        };
        assert_eq!(served.group_info, rejoined.group_info);
    });
}

/// A Commit that removes a member moves the group's state key on: the
/// others follow it and go on, the removed member's key opens nothing, and
/// a member that missed the removal when it makes a change catches up and
/// makes it again instead of failing.
#[test]
fn a_removal_moves_the_state_key_on_and_a_member_who_missed_it_catches_up() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    create_and_invite(&node, "team", &alice, &[&bob, &carol]);
    alice.run(&node, "remove", &["--group-id", "team", "--peer-key", &carol.key]);

    // Bob has not read the removal: his update is made in the epoch
    // before, under the key before. The node finds no group that key
    // opens; Bob catches up (taking the new key from the removal) and
    // makes it again.
    let (ok, _, err) = bob.try_run(&node, "update", &["--group-id", "team"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("team changed meanwhile; caught up and trying again"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "group team: {} left; now at epoch 2, 2 members",
            carol.short()
        )),
        "{err}"
    );
    assert!(
        err.contains("updated your keys in team: epoch 3, 2 members"),
        "{err}"
    );
    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(ok && err.contains("now at epoch 3, 2 members"), "{err}");

    alice.run(&node, "send", &["--msg", "without carol"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("team {}: without carol", alice.short())
    );
    // Carol learns she was removed and cannot get back in.
    carol.run(&node, "recv", &[]);
    let (ok, _, err) = carol.try_run(&node, "rejoin", &["--group-id", "team"]);
    assert!(!ok, "{err}");
}

/// A device restored from a backup of its identity alone gets all its
/// groups back with `rejoin --all`, including one whose state key moved on
/// after the backup was taken: it finds them and their keys in the key
/// backup its live self kept on the node.
#[test]
fn a_device_restored_from_its_identity_alone_rejoins_all_its_groups_with_its_key_backup() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    let backup = back_up(&bob);
    let team = create_and_invite(&node, "team", &alice, &[&bob, &carol]);
    let club = create_and_invite(&node, "club", &carol, &[&bob]);
    alice.run(&node, "remove", &["--group-id", "team", "--peer-key", &carol.key]);
    // Bob follows the removal: his key backup on the node now holds the
    // group's new key.
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok && err.contains("now at epoch 2, 2 members"), "{err}");

    restore(&bob, &backup);
    assert_eq!(bob.run(&node, "groups", &[]), "");
    let (ok, _, err) = bob.try_run(&node, "rejoin", &["--all"]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("rejoined {team}: epoch 3, 2 members")),
        "{err}"
    );
    assert!(
        err.contains(&format!("rejoined {club}: epoch 2, 2 members")),
        "{err}"
    );
    assert!(
        err.contains("your key backup names 2 groups; rejoined 2"),
        "{err}"
    );
    // Nothing is left to rejoin.
    let (ok, _, err) = bob.try_run(&node, "rejoin", &["--all"]);
    assert!(
        ok && err.contains("your key backup names 2 groups; rejoined 0"),
        "{err}"
    );
    let (ok, _, err) = carol.try_run(&node, "recv", &[]);
    assert!(ok && err.contains("rejoined"), "{err}");
    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(ok && err.contains("rejoined"), "{err}");
    alice.run(&node, "send", &["--msg", "welcome back"]);
    let read = bob.run(&node, "recv", &[]);
    assert!(read.contains("welcome back"), "{read}");
}
