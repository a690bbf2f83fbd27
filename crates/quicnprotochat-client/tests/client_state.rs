//! The client's state file under crashes and abuse, with the real CLI and a
//! real node: a write interrupted by the death of its process, `recv`
//! killed at random moments, an empty file, a send the node refused, and a
//! flood of messages from "later epochs" that would fill the file.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{Member, TestNode, enqueue_ok, group_of, local, private_message};
use quicnprotochat_client::state::StateFile;
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_server::Config;

/// Set in a child process of this test binary: the state file to die in
/// the middle of writing to.
const DIE_INSIDE_A_WRITE: &str = "QUICNPROTOCHAT_TEST_DIE_INSIDE_A_WRITE";

/// Writes far more than SQLite's page cache holds in one transaction (so
/// changed pages reach the file before the commit, their originals saved in
/// the rollback journal), then dies without committing or cleaning up.
fn die_inside_a_write(path: &Path) -> ! {
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "cache_size", 4).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    for n in 0..400 {
        db.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)",
            rusqlite::params![format!("junk-{n}"), vec![0x5a_u8; 8 * 1024]],
        )
        .unwrap();
    }
    std::process::abort();
}

#[test]
fn a_state_file_left_inside_a_write_by_a_dead_process_works_and_loses_nothing() {
    if let Some(path) = std::env::var_os(DIE_INSIDE_A_WRITE) {
        die_inside_a_write(Path::new(&path));
    }
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "kept", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "before the crash"]);
    bob.run(&node, "recv", &[]);

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_state_file_left_inside_a_write_by_a_dead_process_works_and_loses_nothing",
        ])
        .env(DIE_INSIDE_A_WRITE, &bob.state)
        .output()
        .unwrap();
    assert!(!child.status.success(), "the child died");
    let journal = std::fs::metadata(format!("{}-journal", bob.state)).unwrap();
    assert!(journal.len() > 0, "a hot journal is left behind");

    // Every command works: the interrupted write is rolled back, and what
    // was committed before it is all there.
    assert!(bob.run(&node, "groups", &[]).contains("kept epoch 1 members 2"));
    bob.run(&node, "send", &["--msg", "after the crash"]);
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("kept {}: after the crash", bob.short())
    );
    alice.run(&node, "send", &["--msg", "and back"]);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("kept {}: and back", alice.short())
    );
    let history = bob.run(&node, "history", &[]);
    for line in ["before the crash", "after the crash", "and back"] {
        assert_eq!(history.matches(line).count(), 1, "{history}");
    }
    let settings: i64 = rusqlite::Connection::open(&bob.state)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM settings WHERE key LIKE 'junk-%'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(settings, 0, "the uncommitted write is gone");
}

#[test]
fn a_recv_killed_at_random_moments_never_prints_a_message_twice_and_loses_none() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "killed", &alice, &[&bob]);
    let mut printed: HashMap<String, usize> = HashMap::new();
    let mut sent = Vec::new();
    let mut count = |output: &std::process::Output| {
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            *printed.entry(line.to_owned()).or_default() += 1;
        }
    };
    for round in 0..12u64 {
        for n in 0..3 {
            let text = format!("round {round} message {n}");
            alice.run(&node, "send", &["--msg", &text]);
            sent.push(text);
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"))
            .args(["--server", &node.addr.to_string(), "--ca-cert"])
            .arg(node.cert())
            .args(["recv", "--state", &bob.state])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Somewhere between start-up and the end of processing.
        std::thread::sleep(Duration::from_millis(5 + round * 9 % 60));
        let _ = child.kill();
        count(&child.wait_with_output().unwrap());
    }
    count(&node.cli(&["recv", "--state", &bob.state]));
    for (line, times) in &printed {
        assert_eq!(*times, 1, "{line:?} printed {times} times");
    }
    // A kill between a message's commit and its printing loses the print,
    // never the message: history has every one exactly once.
    let history = bob.run(&node, "history", &[]);
    for text in &sent {
        assert_eq!(
            history.matches(&format!(": {text}\n")).count(),
            1,
            "{text}: {history}"
        );
    }
}

#[test]
fn an_empty_file_is_refused_by_every_command_but_register_state() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.state");
    std::fs::write(&empty, b"").unwrap();
    let path = empty.display().to_string();
    for command in [
        vec!["whoami", "--state", &path],
        vec!["groups", "--state", &path],
        vec!["recv", "--state", &path],
        vec!["create-group", "--state", &path, "--group-id", "g"],
    ] {
        let out = node.cli(&command);
        assert!(!out.status.success(), "{command:?}");
        let err = common::stderr(&out);
        assert!(
            err.contains("it is empty; `register-state` creates a state file"),
            "{err}"
        );
        assert_eq!(std::fs::read(&empty).unwrap(), b"", "left as it was");
    }
    let key = node.cli_ok(&["register-state", "--state", &path]);
    assert_eq!(key.trim().len(), 64);
    assert_eq!(node.cli_ok(&["whoami", "--state", &path]), key);
}

#[test]
fn a_send_the_node_refused_is_not_recorded_as_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::in_dir(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)));
    config.max_queue_depth = 1;
    let node = TestNode::start_with(config, dir.path().to_owned());
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "full", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "fits"]);
    let (ok, _, err) = alice.try_run(&node, "send", &["--msg", "does not fit"]);
    assert!(!ok && err.contains("is full"), "{err}");
    let history = alice.run(&node, "history", &[]);
    assert!(history.contains("you: fits"), "{history}");
    assert!(history.contains("you (not delivered): does not fit"), "{history}");
}

#[test]
fn messages_from_later_epochs_wait_within_bounds_and_the_rest_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // The node's byte budget would slow the flood down; here it is the
    // client's bounds that are under test.
    let mut config = Config::in_dir(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)));
    config.send_bytes_rate = 0;
    let node = TestNode::start_with(config, dir.path().to_owned());
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "flooded", &alice, &[&bob]);
    let bob_key = bob.key.parse().unwrap();
    let group_id = StateFile::open(Path::new(&bob.state))
        .unwrap()
        .current_group()
        .unwrap()
        .unwrap();
    let size_before = std::fs::metadata(&bob.state).unwrap().len();

    // A stranger sends 40 messages of ~1 MB "from epoch 2" (a Commit Bob
    // has not seen, as far as he can tell), and one from epoch 500.
    let stranger = IdentityKeypair::generate();
    local(async {
        let client = node.connect_as(&stranger).await;
        for _ in 0..40 {
            enqueue_ok(
                &client,
                &bob_key,
                &private_message(group_id.as_bytes(), 2, 1_000_000),
            )
            .await;
        }
        enqueue_ok(&client, &bob_key, &private_message(group_id.as_bytes(), 500, 100)).await;
    });
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("kept a queued message for later").count(),
        17,
        "{err}"
    );
    assert_eq!(
        err.matches("dropped a queued message from a later epoch").count(),
        24,
        "{err}"
    );
    assert!(err.contains("more than 100 epochs ahead"), "{err}");
    // What waits (16 MiB and one more message at most), plus less than
    // 4 MiB of free pages: the rest was given back.
    let grown = std::fs::metadata(&bob.state).unwrap().len() - size_before;
    assert!(grown < 22 * 1024 * 1024, "the state file grew by {grown} bytes");

    // The next run drops nothing it kept and keeps nothing more.
    local(async {
        let client = node.connect_as(&stranger).await;
        enqueue_ok(&client, &bob_key, &private_message(group_id.as_bytes(), 2, 1_000)).await;
    });
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("dropped a queued message from a later epoch").count(),
        1,
        "{err}"
    );
    // The group works as before.
    alice.run(&node, "send", &["--msg", "still here"]);
    assert!(bob.run(&node, "recv", &[]).contains("still here"));
}
