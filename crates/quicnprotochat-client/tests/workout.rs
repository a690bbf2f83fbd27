//! A group worked hard through the real CLI and a real node: five people
//! sending, updating, receiving at the same time, one of them removed and
//! invited back meanwhile. Whatever single commands lose a race (and say
//! so), the group must end with every member at the same epoch with the
//! same members, and every last message read by everyone.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::thread;

use common::{Member, TestNode, group_of};

/// Runs each member's commands in its own thread, all at once; returns the
/// stdout of each member's commands, and the failures (command, stderr).
fn at_once(node: &TestNode, work: Vec<(&Member, Vec<Vec<&str>>)>) -> (Vec<String>, Vec<String>) {
    thread::scope(|scope| {
        let runs: Vec<_> = work
            .into_iter()
            .map(|(member, commands)| {
                scope.spawn(move || {
                    let mut printed = String::new();
                    let mut failed = Vec::new();
                    for command in commands {
                        let (ok, out, err) = member.try_run(node, command[0], &command[1..]);
                        printed.push_str(&out);
                        if !ok {
                            failed.push(format!("{} {command:?}: {err}", member.name));
                        }
                    }
                    (printed, failed)
                })
            })
            .collect();
        let mut printed = Vec::new();
        let mut failed = Vec::new();
        for run in runs {
            let (out, errors) = run.join().unwrap();
            printed.push(out);
            failed.extend(errors);
        }
        (printed, failed)
    })
}

/// What a command failing in a race may say: it lost a Commit race (or,
/// sending, the race to the group's epoch) every time it tried, or the
/// member was not in the group at that moment.
fn an_expected_loss(failure: &str) -> bool {
    failure.contains("another member changed the group first")
        || failure.contains("the group moved on")
        || failure.contains("no longer a member")
        || failure.contains("you were removed")
        || failure.contains("is not a member")
        || failure.contains("is already a member")
}

#[test]
fn five_members_changing_a_group_at_once_end_in_the_same_state_and_read_everything() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let members = ["ana", "ben", "cyd", "dov", "eve"].map(|n| Member::register(&node, dir.path(), n));
    let [ana, ben, cyd, dov, eve] = &members;
    group_of(&node, "gym", ana, &[ben, cyd, dov, eve]);
    // Ben invites Eve back later, and her `recv` joins: she knows him.
    eve.run(&node, "contacts", &["add", "ben", &ben.key]);
    let send = |text: &'static str| vec!["send", "--group-id", "gym", "--msg", text];
    let update = || vec!["update", "--group-id", "gym"];
    let recv = || vec!["recv"];

    let mut failures = Vec::new();
    // Everyone at once.
    let (_, failed) = at_once(
        &node,
        vec![
            (ana, vec![send("a1"), update(), recv(), send("a2")]),
            (ben, vec![recv(), send("b1"), update(), send("b2")]),
            (cyd, vec![send("c1"), recv(), send("c2"), update()]),
            (dov, vec![update(), send("d1"), recv(), send("d2")]),
            (eve, vec![send("e1"), recv(), update(), send("e2")]),
        ],
    );
    failures.extend(failed);
    // Ana removes Eve while the others go on, and Eve keeps trying.
    let (_, failed) = at_once(
        &node,
        vec![
            (
                ana,
                vec![
                    recv(),
                    vec!["remove", "--group-id", "gym", "--peer-key", &eve.key],
                ],
            ),
            (ben, vec![send("b3"), recv(), update()]),
            (cyd, vec![recv(), send("c3")]),
            (dov, vec![send("d3"), update(), recv()]),
            (eve, vec![send("e3"), recv(), send("e4")]),
        ],
    );
    failures.extend(failed);
    // Eve is invited back (by Ben, once he has seen the removal) while
    // the others go on.
    let mut invited = false;
    for _ in 0..5 {
        ben.run(&node, "recv", &[]);
        let (ok, _, err) = ben.try_run(&node, "invite", &["--group-id", "gym", "--peer-key", &eve.key]);
        if ok {
            invited = true;
            break;
        }
        failures.push(format!("ben invite: {err}"));
    }
    assert!(invited, "{failures:#?}");
    let (_, failed) = at_once(
        &node,
        vec![
            (ana, vec![send("a4"), update(), recv()]),
            (ben, vec![recv(), send("b4")]),
            (cyd, vec![update(), send("c4"), recv()]),
            (dov, vec![recv(), send("d4"), update()]),
            (eve, vec![recv(), send("e5"), update()]),
        ],
    );
    failures.extend(failed);
    for failure in &failures {
        assert!(an_expected_loss(failure), "an unexpected failure: {failure}");
    }

    // Quiet: everyone catches up until nothing changes.
    let state = |member: &Member| {
        let groups = member.run(&node, "groups", &[]);
        let line = groups
            .lines()
            .find(|line| line.contains("gym"))
            .unwrap_or_default()
            .to_owned();
        let listed = member.run(&node, "members", &["--group-id", "gym"]);
        let mut keys: Vec<String> = listed
            .lines()
            .map(|line| line.split_whitespace().next().unwrap_or_default().to_owned())
            .collect();
        keys.sort();
        (line.trim_start_matches("* ").to_owned(), keys)
    };
    let mut states = Vec::new();
    for _ in 0..4 {
        for member in &members {
            member.run(&node, "recv", &[]);
        }
        states = members.iter().map(state).collect();
        if states.windows(2).all(|pair| pair[0] == pair[1]) {
            break;
        }
    }
    for (member, member_state) in members.iter().zip(&states) {
        assert_eq!(member_state, &states[0], "{} disagrees", member.name);
    }
    assert!(states[0].0.contains("members 5"), "{:?}", states[0]);
    assert_eq!(states[0].1.len(), 5);

    // Every last message reaches everyone else.
    let mut read: Vec<String> = Vec::new();
    for member in &members {
        let text = format!("last from {}", member.name);
        read.push(member.run(&node, "send", &["--group-id", "gym", "--msg", &text]));
    }
    for (member, seen) in members.iter().zip(read.iter_mut()) {
        seen.push_str(&member.run(&node, "recv", &[]));
    }
    for (member, seen) in members.iter().zip(&read) {
        for other in members.iter().filter(|other| other.key != member.key) {
            let text = format!("last from {}", other.name);
            assert_eq!(
                seen.matches(&text).count(),
                1,
                "{} read {text:?} not exactly once:\n{seen}",
                member.name
            );
        }
    }
}
