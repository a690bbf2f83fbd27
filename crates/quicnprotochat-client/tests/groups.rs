//! Multi-party groups through the real CLI and a real node: every step is a
//! separate client process with its own state file.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, group_of};
use quicnprotochat_core::KeyPackageStock;
use quicnprotochat_proto::outcome::{FetchedKeyPackage, SendOutcome};
use quicnprotochat_proto::wire::CommitToSend;

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn five_members_invited_in_one_commit_all_read_each_other() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let names = ["alice", "bob", "carol", "dave", "erin"];
    let members: Vec<Member> = names
        .iter()
        .map(|n| Member::register(&node, dir.path(), n))
        .collect();
    let rest: Vec<&Member> = members[1..].iter().collect();
    group_of(&node, "five", &members[0], &rest);

    for member in &members {
        let listed = member.run(&node, "members", &["--group-id", "five"]);
        assert_eq!(listed.lines().count(), 5, "{listed}");
        assert!(listed.contains(&format!("{} (you)", member.key)), "{listed}");
        let groups = member.run(&node, "groups", &[]);
        assert_eq!(groups.trim(), "* five epoch 1 members 5 x25519");
    }
    // `send` catches up first, printing what arrived, as `recv` does.
    let mut printed: Vec<String> = Vec::new();
    for member in &members {
        printed.push(member.run(
            &node,
            "send",
            &[
                "--group-id",
                "five",
                "--msg",
                &format!("hello from {}", member.name),
            ],
        ));
    }
    for (member, by_send) in members.iter().zip(printed) {
        let got = by_send + &member.run(&node, "recv", &[]);
        let expected: Vec<String> = members
            .iter()
            .filter(|other| other.key != member.key)
            .map(|other| format!("five {}: hello from {}", other.short(), other.name))
            .collect();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(
            sorted_lines(&got),
            expected_sorted,
            "{} received:\n{got}",
            member.name
        );
    }
}

#[test]
fn a_removed_member_is_told_and_cannot_read_new_messages() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "trio", &alice, &[&bob, &carol]);

    alice.run(&node, "remove", &["--group-id", "trio", "--peer-key", &carol.key]);
    let (ok, _, err) = carol.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("group trio: you were removed from the group at epoch 2"),
        "{err}"
    );
    bob.run(&node, "recv", &[]);

    alice.run(
        &node,
        "send",
        &["--group-id", "trio", "--msg", "carol cannot read this"],
    );
    assert_eq!(
        bob.run(&node, "send", &["--group-id", "trio", "--msg", "nor this"])
            .trim(),
        format!("trio {}: carol cannot read this", alice.short())
    );
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("trio {}: nor this", bob.short())
    );
    let (_, out, _) = carol.try_run(&node, "recv", &[]);
    assert_eq!(out, "", "a removed member decrypts nothing");
    let groups = carol.run(&node, "groups", &[]);
    assert!(groups.contains("trio epoch 2 removed"), "{groups}");
    assert_eq!(
        alice
            .run(&node, "members", &["--group-id", "trio"])
            .lines()
            .count(),
        2
    );
}

#[test]
fn update_advances_the_epoch_and_everyone_still_reads() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "fresh", &alice, &[&bob, &carol]);

    bob.run(&node, "update", &["--group-id", "fresh"]);
    alice.run(&node, "recv", &[]);
    carol.run(&node, "recv", &[]);
    for member in [&alice, &bob, &carol] {
        assert_eq!(
            member.run(&node, "groups", &[]).trim(),
            "* fresh epoch 2 members 3 x25519"
        );
    }
    carol.run(&node, "send", &["--msg", "after the update"]);
    for member in [&alice, &bob] {
        assert_eq!(
            member.run(&node, "recv", &[]).trim(),
            format!("fresh {}: after the update", carol.short())
        );
    }
}

#[test]
fn leaving_is_committed_by_a_remaining_member() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "club", &alice, &[&bob, &carol]);

    carol.run(&node, "leave", &["--group-id", "club"]);
    assert!(carol.run(&node, "groups", &[]).contains("(leaving)"));
    // Alice has the lowest leaf: her recv commits Carol's removal.
    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(
        ok && err.contains("committed pending proposals; now epoch 2, 2 members"),
        "{err}"
    );
    let (_, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(err.contains("now at epoch 2, 2 members"), "{err}");
    let (_, _, err) = carol.try_run(&node, "recv", &[]);
    assert!(err.contains("you were removed"), "{err}");

    bob.run(&node, "send", &["--group-id", "club", "--msg", "just us"]);
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("club {}: just us", bob.short())
    );
}

#[test]
fn two_groups_sharing_members_in_one_state_file_do_not_mix() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    // Bob needs a KeyPackage per invitation.
    bob.run(&node, "register-state", &[]);
    group_of(&node, "work", &alice, &[&bob]);
    alice.run(&node, "create-group", &["--group-id", "home"]);
    alice.run(
        &node,
        "invite",
        &[
            "--group-id",
            "home",
            "--peer-key",
            &bob.key,
            "--peer-key",
            &carol.key,
        ],
    );
    // Bob names Alice as a contact: `recv` joins her new group at once.
    bob.run(&node, "contacts", &["add", "alice", &alice.key]);
    let (_, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(
        err.contains("joined group ") && err.contains(" is called home"),
        "{err}"
    );
    carol.run(&node, "join", &[]);

    alice.run(&node, "send", &["--group-id", "work", "--msg", "about work"]);
    alice.run(&node, "send", &["--group-id", "home", "--msg", "about home"]);
    // Carol's send catches up first: she reads Alice's message then.
    assert_eq!(
        carol
            .run(&node, "send", &["--group-id", "home", "--msg", "carol at home"])
            .trim(),
        format!("home {}: about home", alice.short())
    );
    // Bob shows Alice by the contact name he gave her.
    let got = bob.run(&node, "recv", &[]);
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [
            "work alice: about work".to_owned(),
            "home alice: about home".to_owned(),
            format!("home {}: carol at home", carol.short()),
        ]
    );
    let work = bob.run(&node, "history", &["--group-id", "work"]);
    assert_eq!(work.lines().count(), 1, "{work}");
    assert!(work.trim_end().ends_with("alice: about work"), "{work}");
    let home = bob.run(&node, "history", &["--group-id", "home"]);
    assert_eq!(home.lines().count(), 2, "{home}");
    let groups = bob.run(&node, "groups", &[]);
    assert!(groups.contains("work epoch 1 members 2"), "{groups}");
    assert!(groups.contains("home epoch 1 members 3"), "{groups}");
    assert_eq!(carol.run(&node, "recv", &[]).trim(), "", "read when she sent");
    let alice_history = alice.run(&node, "history", &["--group-id", "home"]);
    assert!(alice_history.contains("you: about home"), "{alice_history}");
}

#[test]
fn garbage_and_messages_for_unknown_groups_are_skipped_and_the_rest_processed() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "ours", &alice, &[&bob]);
    group_of(&node, "theirs", &carol, &[&alice]);
    // A real MLS message of a group Bob is not in, moved into his queue.
    carol.run(&node, "send", &["--group-id", "theirs", "--msg", "not for bob"]);
    let bob_key: quicnprotochat_core::IdentityKey = bob.key.parse().unwrap();
    let alice_identity = quicnprotochat_client::state::StateFile::open(&common::access(&alice.state))
        .unwrap()
        .identity()
        .unwrap();
    common::local(async {
        let client = node.connect_as(&alice_identity).await;
        let foreign = client.fetch_all(&alice_identity.public_key()).await.unwrap();
        assert_eq!(foreign.len(), 1);
        for payload in [b"\x00\x01 garbage".as_slice(), &foreign[0]] {
            assert_eq!(
                client.enqueue(&bob_key, payload).await.unwrap(),
                SendOutcome::Accepted
            );
        }
    });
    alice.run(&node, "send", &["--group-id", "ours", "--msg", "still delivered"]);

    let (ok, out, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("warning: skipped a queued message").count(),
        2,
        "{err}"
    );
    // Bob is no member: he knows the group by its id only.
    assert!(err.contains("message for unknown group "), "{err}");
    assert!(!err.contains("theirs"), "{err}");
    assert_eq!(out.trim(), format!("ours {}: still delivered", alice.short()));
}

#[test]
fn a_client_killed_between_fetch_and_ack_loses_nothing_and_applies_once() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "safe", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "first"]);
    alice.run(&node, "send", &["--msg", "second"]);

    let mut args = vec![
        "--server".to_owned(),
        node.addr.to_string(),
        "--ca-cert".to_owned(),
        node.cert().display().to_string(),
    ];
    args.extend(["recv", "--state", &bob.state].map(str::to_owned));
    let crashed = std::process::Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"))
        .args(&args)
        .env("QUICNPROTOCHAT_TEST_EXIT_AFTER_FETCH", "1")
        .env("QUICNPROTOCHAT_STATE_PASSPHRASE", common::PASSPHRASE)
        .output()
        .unwrap();
    assert_eq!(crashed.status.code(), Some(3), "{}", common::stderr(&crashed));
    assert!(crashed.stdout.is_empty(), "nothing was processed");
    // Not acknowledged: the node still holds both and will deliver them again.
    let bob_identity = quicnprotochat_client::state::StateFile::open(&common::access(&bob.state))
        .unwrap()
        .identity()
        .unwrap();
    common::local(async {
        let owner = node.connect_as(&bob_identity).await;
        assert_eq!(
            owner
                .fetch_since(&bob_identity.public_key(), quicnprotochat_core::Seq::ZERO, 0)
                .await
                .unwrap()
                .len(),
            2
        );
    });

    let got = bob.run(&node, "recv", &[]);
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [
            format!("safe {}: first", alice.short()),
            format!("safe {}: second", alice.short())
        ]
    );
    assert_eq!(bob.run(&node, "recv", &[]), "", "nothing is applied twice");
}

#[test]
fn contacts_name_peers_for_commands_and_output() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    alice.run(&node, "contacts", &["add", "bob", &bob.key]);
    bob.run(&node, "contacts", &["add", "alice", &alice.key]);
    assert_eq!(
        alice.run(&node, "contacts", &["list"]).trim(),
        format!("bob {}", bob.key)
    );
    let (ok, _, err) = alice.try_run(&node, "contacts", &["add", "bob", &alice.key]);
    assert!(!ok && err.contains("already used"), "{err}");

    alice.run(&node, "create-group", &["--group-id", "named"]);
    alice.run(&node, "invite", &["--peer", "bob"]);
    bob.run(&node, "join", &[]);
    alice.run(&node, "send", &["--peer", "bob", "--msg", "by name"]);
    assert_eq!(bob.run(&node, "recv", &[]).trim(), "named alice: by name");
    assert!(
        alice
            .run(&node, "members", &[])
            .contains(&format!("{} bob", bob.key))
    );
    let (ok, _, err) = alice.try_run(&node, "send", &["--peer", "nobody", "--msg", "x"]);
    assert!(!ok && err.contains("no such contact"), "{err}");
}

#[test]
fn a_failed_invite_leaves_the_group_as_it_was() {
    let mut node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "stable", &alice, &[&bob]);

    // Nobody registered this key, so the invite fails before anything is sent.
    let (ok, _, err) = alice.try_run(&node, "invite", &["--peer-key", &"cd".repeat(32)]);
    assert!(!ok && err.contains("has no KeyPackage"), "{err}");

    // A node that takes KeyPackages and messages but not a Welcome this big:
    // the Commit and the Welcome are refused together, nothing is queued.
    node.restart_with(|config| config.max_payload = 700);
    let carol = Member::register(&node, dir.path(), "carol");
    let (ok, _, err) = alice.try_run(&node, "invite", &["--peer-key", &carol.key]);
    assert!(
        !ok && err.contains("exceeds this node's limit of 700 bytes"),
        "{err}"
    );
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* stable epoch 1 members 2 x25519"
    );
    assert_eq!(bob.run(&node, "recv", &[]), "", "bob got no commit");
    alice.run(&node, "send", &["--msg", "still fine"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("stable {}: still fine", alice.short())
    );
}

#[test]
fn register_uploads_a_batch_with_a_last_resort_and_recv_tops_up() {
    let dir = tempfile::tempdir().unwrap();
    // Strangers take Bob's whole stock below; the node's per-identity serve
    // rate (tested in `limits`) would hand them his last resort instead.
    let mut config =
        quicnprotochat_server::Config::in_dir(dir.path(), std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.key_package_serve_rate = 0;
    let node = TestNode::start_with(config, dir.path().to_owned());
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    let bob_identity = quicnprotochat_client::state::StateFile::open(&common::access(&bob.state))
        .unwrap()
        .identity()
        .unwrap();
    common::local(async {
        let owner = node.connect_as(&bob_identity).await;
        let KeyPackageStock {
            count,
            has_last_resort: last_resort,
        } = owner.key_package_count(&bob_identity.public_key()).await.unwrap();
        assert!(count >= 3 && last_resort, "{count} {last_resort}");
        // Strangers use up every ordinary KeyPackage.
        let stranger = node.connect().await;
        for _ in 0..count {
            let fetched = stranger
                .fetch_key_package(&bob_identity.public_key())
                .await
                .unwrap();
            assert!(matches!(fetched, FetchedKeyPackage::Package(_)), "{fetched:?}");
        }
        assert_eq!(
            owner.key_package_count(&bob_identity.public_key()).await.unwrap(),
            KeyPackageStock {
                count: 0,
                has_last_resort: true
            }
        );
    });
    // Bob is still invitable through his last-resort KeyPackage.
    group_of(&node, "still-reachable", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "via last resort"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("still-reachable {}: via last resort", alice.short())
    );
    // That recv saw Bob running low and uploaded a fresh batch.
    common::local(async {
        let owner = node.connect_as(&bob_identity).await;
        let KeyPackageStock {
            count,
            has_last_resort: last_resort,
        } = owner.key_package_count(&bob_identity.public_key()).await.unwrap();
        assert!(count >= 3 && last_resort, "{count} {last_resort}");
    });
}

#[test]
fn a_member_whose_commit_loses_catches_up_and_retries() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "race", &alice, &[&bob]);

    // Alice commits epoch 1 first; Bob, still in epoch 1, commits too.
    alice.run(&node, "update", &["--group-id", "race"]);
    let (ok, _, err) = bob.try_run(&node, "update", &["--group-id", "race"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("another member changed race first (now at epoch 2); catching up"),
        "{err}"
    );
    assert!(err.contains("epoch 3"), "{err}");
    alice.run(&node, "recv", &[]);
    for member in [&alice, &bob] {
        assert_eq!(
            member.run(&node, "groups", &[]).trim(),
            "* race epoch 3 members 2 x25519"
        );
    }
    bob.run(&node, "send", &["--msg", "after the race"]);
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("race {}: after the race", bob.short())
    );
}

#[test]
fn two_members_committing_at_the_same_moment_end_up_agreeing() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "same-time", &alice, &[&bob]);

    // Alice invites Carol while Bob updates, both from epoch 1.
    let args = |member: &Member, command: &[&str]| -> Vec<String> {
        let mut full = vec![
            "--server".to_owned(),
            node.addr.to_string(),
            "--ca-cert".to_owned(),
            node.cert().display().to_string(),
        ];
        full.extend(command.iter().map(|a| a.to_string()));
        full.extend(["--state".to_owned(), member.state.clone()]);
        full
    };
    let alice_args = args(
        &alice,
        &["invite", "--group-id", "same-time", "--peer-key", &carol.key],
    );
    let bob_args = args(&bob, &["update", "--group-id", "same-time"]);
    let first = std::thread::spawn(move || common::run_client(&alice_args));
    let second = std::thread::spawn(move || common::run_client(&bob_args));
    let (first, second) = (first.join().unwrap(), second.join().unwrap());
    assert!(first.status.success(), "{}", common::stderr(&first));
    assert!(second.status.success(), "{}", common::stderr(&second));

    carol.run(&node, "join", &[]);
    alice.run(&node, "recv", &[]);
    bob.run(&node, "recv", &[]);
    carol.run(&node, "recv", &[]);
    let expected = alice.run(&node, "groups", &[]);
    assert!(expected.contains("epoch 3 members 3"), "{expected}");
    for member in [&bob, &carol] {
        assert_eq!(
            member.run(&node, "groups", &[]).trim_start_matches('*').trim(),
            expected.trim_start_matches('*').trim()
        );
        assert_eq!(
            member
                .run(&node, "members", &["--group-id", "same-time"])
                .lines()
                .count(),
            3
        );
    }
    carol.run(&node, "send", &["--group-id", "same-time", "--msg", "all agree"]);
    for member in [&alice, &bob] {
        assert!(member.run(&node, "recv", &[]).ends_with(": all agree\n"));
    }
}

#[cfg(unix)]
#[test]
fn recv_follow_prints_messages_as_they_arrive_until_interrupted() {
    use std::process::Command;

    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "live", &alice, &[&bob]);

    let mut follow = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"));
    follow
        .env("QUICNPROTOCHAT_STATE_PASSPHRASE", common::PASSPHRASE)
        .args([
            "--server",
            &node.addr.to_string(),
            "--ca-cert",
            node.cert().to_str().unwrap(),
        ])
        .args(["recv", "--follow", "--state", &bob.state]);
    let mut follower = common::Follower::start(follow);
    follower.await_note("following", std::time::Duration::from_secs(20));
    for text in ["first live", "second live"] {
        alice.run(&node, "send", &["--msg", text]);
        let line = follower.next_line();
        assert_eq!(line, format!("live {}: {text}", alice.short()));
    }
    // A Commit arrives live too: Alice updates, then sends in the new epoch.
    alice.run(&node, "update", &[]);
    alice.run(&node, "send", &["--msg", "after the update"]);
    let line = follower.next_line();
    assert_eq!(line, format!("live {}: after the update", alice.short()));

    let status = follower.interrupt();
    assert!(status.success(), "{status:?}");
    // Everything was acknowledged: nothing is delivered again.
    assert_eq!(bob.run(&node, "recv", &[]), "");
}

#[test]
fn groups_with_the_same_name_do_not_collide_at_the_node() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol, dave] =
        ["alice", "bob", "carol", "dave"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "team", &alice, &[&bob]);
    group_of(&node, "team", &carol, &[&dave]);
    alice.run(&node, "update", &["--group-id", "team"]);
    carol.run(&node, "update", &["--group-id", "team"]);
    bob.run(&node, "recv", &[]);
    dave.run(&node, "recv", &[]);
    for member in [&alice, &bob, &carol, &dave] {
        assert_eq!(
            member.run(&node, "groups", &[]).trim(),
            "* team epoch 2 members 2 x25519"
        );
    }
    let (ok, _, err) = alice.try_run(&node, "create-group", &["--group-id", "team"]);
    assert!(!ok && err.contains("already have a group called team"), "{err}");
}

#[test]
fn an_unconfirmed_change_is_resent_and_settled_by_the_next_command() {
    use quicnprotochat_client::state::{Publication, StateError, StateFile};
    use quicnprotochat_core::GroupMember;
    use quicnprotochat_proto::outcome::ChangeOutcome;

    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "resume", &alice, &[&bob]);

    // Alice updated; the node took the Commit but its answer was lost: the
    // Commit is still pending in her state and the change is in her outbox.
    let state = StateFile::open(&common::access(&alice.state)).unwrap();
    let identity = state.identity().unwrap();
    let group_id = state.current_group().unwrap().unwrap();
    let mut group = GroupMember::load(&state.provider(), &group_id).unwrap().unwrap();
    let epoch = group.epoch();
    let state_key = state.kept_state_key(&group_id).unwrap().unwrap();
    let publication = state
        .stage_publication(|| -> Result<Publication, StateError> {
            Ok(Publication {
                group_id: group_id.clone(),
                epoch,
                commit: quicnprotochat_proto::wire::Envelope {
                    recipients: vec![bob.key.parse().unwrap()],
                    payload: group.self_update(&state.provider(), &identity)?,
                    message_id: Some(b"answer-lost".to_vec()),
                },
                welcome: None,
                group_info: group.pending_group_info().map(<[u8]>::to_vec),
                rejoin: false,
            })
        })
        .unwrap();
    drop((group, state));
    common::local(async {
        let client = node.connect_as(&identity).await;
        let outcome = client
            .publish_commit(&CommitToSend {
                group_id: &publication.group_id,
                epoch,
                commit: &publication.commit,
                welcome: None,
                initial_state: None,
                group_info: publication.group_info.as_deref(),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::Accepted);
    });

    let (ok, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("resending an unconfirmed change to resume"), "{err}");
    assert!(err.contains("resume: the node has it; now epoch 2"), "{err}");
    let (_, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(
        err.contains("now at epoch 2") && !err.contains("warning"),
        "one Commit, once: {err}"
    );
    for member in [&alice, &bob] {
        assert_eq!(
            member.run(&node, "groups", &[]).trim(),
            "* resume epoch 2 members 2 x25519"
        );
    }
    alice.run(&node, "send", &["--msg", "settled"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("resume {}: settled", alice.short())
    );
}

#[test]
fn a_removed_member_invited_again_rejoins_and_reads_new_messages() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "again", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "first time"]);
    bob.run(&node, "recv", &[]);
    alice.run(&node, "remove", &["--group-id", "again", "--peer-key", &bob.key]);
    bob.run(&node, "recv", &[]);
    assert!(bob.run(&node, "groups", &[]).contains("again epoch 2 removed"));

    alice.run(&node, "invite", &["--group-id", "again", "--peer-key", &bob.key]);
    let (ok, _, err) = bob.try_run(&node, "join", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("joined group again (epoch 3, 2 members)"), "{err}");
    let groups = bob.run(&node, "groups", &[]);
    assert!(groups.contains("again epoch 3 members 2"), "{groups}");
    alice.run(&node, "send", &["--msg", "welcome back"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("again {}: welcome back", alice.short())
    );
    bob.run(
        &node,
        "send",
        &["--group-id", "again", "--msg", "glad to be back"],
    );
    assert!(alice.run(&node, "recv", &[]).contains("glad to be back"));
    // The history from before the removal is kept.
    let history = bob.run(&node, "history", &["--group-id", "again"]);
    assert!(
        history.contains("first time") && history.contains("welcome back"),
        "{history}"
    );
}

/// A command cut off after its invite was accepted but before it sent the
/// group's name leaves the name owed in the state file (written with the
/// merge); the inviter's next command sends it, and the invitee learns it.
#[test]
fn a_group_name_an_invite_could_not_send_is_sent_by_the_next_command() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    alice.run(&node, "create-group", &["--group-id", "club"]);
    let raw =
        || quicnprotochat_client::state::StateFile::raw_connection(&common::access(&alice.state)).unwrap();
    let owed = || -> i64 {
        raw()
            .query_row("SELECT count(*) FROM names_owed", [], |row| row.get(0))
            .unwrap()
    };

    // The invite as a cut-off command leaves it: the Commit accepted and
    // merged, the name not sent (here: the name hidden while it ran).
    raw().execute("UPDATE groups SET name = NULL", []).unwrap();
    alice.run(
        &node,
        "invite",
        &["--group-id", &group_hex(&alice), "--peer-key", &bob.key],
    );
    raw().execute("UPDATE groups SET name = 'club'", []).unwrap();
    let bob_key = hex_bytes(&bob.key);
    raw()
        .execute(
            "INSERT INTO names_owed (group_id, recipients) SELECT group_id, ?1 FROM groups",
            [bob_key],
        )
        .unwrap();
    let (ok, _, err) = bob.try_run(&node, "join", &[]);
    assert!(ok, "{err}");
    assert!(!err.contains("is called"), "{err}");

    // Alice's next command pays the debt; Bob's next `recv` learns the name.
    alice.run(&node, "recv", &[]);
    assert_eq!(owed(), 0, "the name was sent");
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok && err.contains(" is called club"), "{err}");
    bob.run(&node, "send", &["--group-id", "club", "--msg", "named at last"]);
    assert!(alice.run(&node, "recv", &[]).contains("named at last"));

    // An invite that runs to its end owes nothing.
    let carol = Member::register(&node, dir.path(), "carol");
    alice.run(&node, "invite", &["--group-id", "club", "--peer-key", &carol.key]);
    assert_eq!(owed(), 0);
}

/// The hex id of `member`'s current group, as `--json` prints it.
fn group_hex(member: &Member) -> String {
    let state = quicnprotochat_client::state::StateFile::open(&common::access(&member.state)).unwrap();
    hex::encode(state.current_group().unwrap().unwrap())
}

fn hex_bytes(text: &str) -> Vec<u8> {
    hex::decode(text).unwrap()
}
