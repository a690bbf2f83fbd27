//! The client's state file under crashes and abuse, with the real CLI and a
//! real node: a write interrupted by the death of its process, `recv`
//! killed at random moments, an empty file, a send the node refused, and a
//! flood of messages from "later epochs" that would fill the file.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    let db = StateFile::raw_connection(&common::access(&path.display().to_string())).unwrap();
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
    let settings: i64 = StateFile::raw_connection(&common::access(&bob.state))
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
            .env("QUICNPROTOCHAT_STATE_PASSPHRASE", common::PASSPHRASE)
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
    // Bob's Welcome and the group's name fit; then two messages.
    config.max_queue_depth = 2;
    let node = TestNode::start_with(config, dir.path().to_owned());
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "full", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "fits"]);
    alice.run(&node, "send", &["--msg", "fits too"]);
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
    let group_id = StateFile::open(&common::access(&bob.state))
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

/// Runs the client against `node` with `args`, its stdin closed, and the
/// passphrase from `passphrase` (`None`: no variable at all).
fn with_passphrase(node: &TestNode, passphrase: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut command = node.command(args);
    match passphrase {
        Some(passphrase) => command.env("QUICNPROTOCHAT_STATE_PASSPHRASE", passphrase),
        None => command.env_remove("QUICNPROTOCHAT_STATE_PASSPHRASE"),
    };
    command.stdin(std::process::Stdio::null()).output().unwrap()
}

/// The JSON error object on the last line of a failed command's stderr,
/// after checking its exit code.
fn error_object(output: &std::process::Output, exit_code: i32) -> serde_json::Value {
    assert_eq!(
        output.status.code(),
        Some(exit_code),
        "{}",
        common::stderr(output)
    );
    let err = common::stderr(output);
    serde_json::from_str(err.lines().last().unwrap()).unwrap()
}

#[test]
fn a_state_file_opens_only_with_its_passphrase_and_a_wrong_one_changes_nothing() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    let before = std::fs::read(&alice.state).unwrap();
    assert!(!before.starts_with(b"SQLite format 3"), "encrypted");

    let wrong = with_passphrase(
        &node,
        Some("not it"),
        &["--json", "whoami", "--state", &alice.state],
    );
    let error = error_object(&wrong, 7);
    assert_eq!(error["kind"], "bad_passphrase");
    assert!(
        error["message"].as_str().unwrap().contains("does not open"),
        "{error}"
    );

    // No passphrase and stdin not a terminal: an error, not a prompt.
    let none = with_passphrase(&node, None, &["--json", "groups", "--state", &alice.state]);
    let error = error_object(&none, 7);
    assert_eq!(error["kind"], "bad_passphrase");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("QUICNPROTOCHAT_STATE_PASSPHRASE") && message.contains("--state-passphrase-file"),
        "{message}"
    );
    assert_eq!(std::fs::read(&alice.state).unwrap(), before, "left as it was");

    // The passphrase file's first line, whatever the variable says.
    let file = dir.path().join("passphrase.txt");
    std::fs::write(&file, format!("{}\n", common::PASSPHRASE)).unwrap();
    let file_arg = file.display().to_string();
    let output = with_passphrase(
        &node,
        Some("not it"),
        &[
            "whoami",
            "--state",
            &alice.state,
            "--state-passphrase-file",
            &file_arg,
        ],
    );
    assert!(output.status.success(), "{}", common::stderr(&output));
    assert_eq!(String::from_utf8(output.stdout).unwrap().trim(), alice.key);

    // A new state file without a passphrase is not made at all.
    let new = common::state(dir.path(), "new.state");
    let refused = with_passphrase(&node, None, &["--json", "register-state", "--state", &new]);
    assert_eq!(error_object(&refused, 7)["kind"], "bad_passphrase");
    assert!(!Path::new(&new).exists());
}

#[test]
fn a_state_file_shows_no_group_name_message_or_key_and_the_group_works_on() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "secret-union-meeting", &alice, &[&bob, &carol]);
    // The invitees learnt the name inside the group, on `join`.
    for member in [&bob, &carol] {
        let groups = member.run(&node, "groups", &["--json"]);
        assert!(
            groups.contains("\"secret-union-meeting\""),
            "{}: {groups}",
            member.name
        );
    }
    alice.run(&node, "send", &["--msg", "the meeting is on thursday"]);
    bob.run(&node, "recv", &[]);
    bob.run(&node, "send", &["--msg", "bring the leaflets"]);
    alice.run(&node, "recv", &[]);

    // Nothing the node keeps (its database, WAL and all) names the group:
    // its id is random and its name went to the members encrypted.
    for file in std::fs::read_dir(&node.dir).unwrap() {
        let path = file.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes
                    .windows(b"secret-union-meeting".len())
                    .any(|window| window == b"secret-union-meeting"),
                "the node's {} holds the group's name",
                path.display()
            );
        }
    }

    // The tree kept for Bob's and Carol's Welcomes is sealed under the key
    // of the epoch their Welcome started: its row shows neither who was
    // invited nor who is in the group (protocol 8).
    let db = rusqlite::Connection::open_with_flags(
        node.dir.join("node.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let kept: Vec<(Vec<u8>, Vec<u8>)> = db
        .prepare("SELECT tree, joiners FROM welcome_trees")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!kept.is_empty(), "the node keeps the tree the invite started");
    for (tree, joiners) in &kept {
        assert!(joiners.is_empty(), "a Welcome tree names its joiners");
        for member in [&alice, &bob, &carol] {
            let key = hex_bytes(&member.key);
            assert!(
                !tree.windows(key.len()).any(|window| window == key.as_slice()),
                "a Welcome tree holds {}'s key in clear",
                member.name
            );
        }
    }
    drop(db);

    for member in [&alice, &bob, &carol] {
        let bytes = std::fs::read(&member.state).unwrap();
        assert!(
            !bytes.starts_with(b"SQLite format 3"),
            "{} is not a plain SQLite file",
            member.name
        );
        let key = hex_bytes(&alice.key);
        for (what, needle) in [
            ("the group's name", b"secret-union-meeting".to_vec()),
            ("a message", b"the meeting is on thursday".to_vec()),
            ("a message", b"bring the leaflets".to_vec()),
            ("alice's user key", key.clone()),
            ("alice's user key in hex", alice.key.as_bytes().to_vec()),
        ] {
            assert!(
                !bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_slice()),
                "{}'s state file holds {what}",
                member.name
            );
        }
    }
    // Carol, who got the messages queued, reads them, and everyone goes on.
    let carol_saw = carol.run(&node, "recv", &[]);
    assert!(carol_saw.contains("the meeting is on thursday") && carol_saw.contains("bring the leaflets"));
    carol.run(&node, "send", &["--msg", "see you there"]);
    assert!(alice.run(&node, "recv", &[]).contains("see you there"));
    assert!(bob.run(&node, "recv", &[]).contains("see you there"));
}

/// The tables of a copy of the node's database where each of `needles`
/// shows, in a live row (raw or in hex), by what it is.
fn tables_holding(
    db: &std::path::Path,
    needles: &[(&'static str, Vec<u8>)],
) -> BTreeMap<&'static str, BTreeSet<String>> {
    let db = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut found: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for table in tables {
        let mut statement = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = statement.column_count();
        let mut rows = statement.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for column in 0..columns {
                let cell: Vec<u8> = match row.get_ref(column).unwrap() {
                    rusqlite::types::ValueRef::Blob(bytes) | rusqlite::types::ValueRef::Text(bytes) => {
                        bytes.to_vec()
                    }
                    _ => continue,
                };
                for (what, needle) in needles {
                    let hex = hex::encode(needle).into_bytes();
                    let holds = |needle: &[u8]| cell.windows(needle.len()).any(|window| window == needle);
                    if holds(needle) || holds(&hex) {
                        found.entry(what).or_default().insert(table.clone());
                    }
                }
            }
        }
    }
    found
}

/// What a copy of the node's database still shows of who is in a group:
/// exactly the tables docs/seized-node.md ("What a snapshot then shows")
/// lists as not yet encrypted, and nothing else. A table that starts to
/// show a member or the group's id fails this, and so does one a
/// mechanism of that design cleans (then shrink the lists here and there).
#[test]
fn a_copy_of_the_nodes_file_shows_members_and_the_group_only_where_the_design_says() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "team", &alice, &[&bob, &carol]);
    alice.run(&node, "send", &["--msg", "one"]);
    bob.run(&node, "recv", &[]);
    // Carol's copy stays queued; Bob proposes to leave, and the node keeps
    // the proposal (by leaf index, it names nobody).
    bob.run(&node, "leave", &["--group-id", "team"]);

    let group_id = common::group_id_of(&node, &alice, "team").into_bytes();
    let mut needles = vec![("the group id", group_id)];
    for member in [&alice, &bob, &carol] {
        needles.push(("a member's key", hex_bytes(&member.key)));
    }
    let found = tables_holding(&node.dir.join("node.db"), &needles);
    let tables = |names: &[&str]| -> BTreeSet<String> { names.iter().map(|name| name.to_string()).collect() };
    // The directory is public by design; the queues (recipients) and the
    // queued payloads (their clear MLS header) wait for mechanisms 3 and 4.
    // The group's view, its proposals (sealed under its state key, protocol
    // 9), Welcome trees, group epochs, message ids and key backups show
    // neither.
    assert_eq!(
        found["a member's key"],
        tables(&["key_packages", "messages", "queue_depths"]),
        "{found:?}"
    );
    assert_eq!(found["the group id"], tables(&["payloads"]), "{found:?}");
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_plain_state_file_keeps_working_and_state_encrypt_encrypts_it() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "old", &alice, &[&bob]);

    // Bob's file as a client from before encryption left it: a plain copy
    // of the same database.
    let plain = dir.path().join("plain.state");
    {
        let connection = StateFile::raw_connection(&common::access(&bob.state)).unwrap();
        connection
            .execute(
                "ATTACH DATABASE ?1 AS plain KEY ''",
                [plain.display().to_string()],
            )
            .unwrap();
        connection
            .query_row("SELECT sqlcipher_export('plain')", [], |_| Ok(()))
            .unwrap();
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        let id: i64 = connection
            .pragma_query_value(None, "application_id", |row| row.get(0))
            .unwrap();
        connection
            .execute_batch(&format!(
                "PRAGMA plain.user_version = {version}; PRAGMA plain.application_id = {id}; DETACH DATABASE plain;"
            ))
            .unwrap();
    }
    std::fs::remove_file(&bob.state).unwrap();
    std::fs::rename(&plain, &bob.state).unwrap();
    assert!(
        std::fs::read(&bob.state)
            .unwrap()
            .starts_with(b"SQLite format 3\0")
    );

    // It still works, with a note, and needs no passphrase.
    alice.run(&node, "send", &["--msg", "to the old file"]);
    let output = with_passphrase(&node, None, &["recv", "--state", &bob.state]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("to the old file"));
    assert!(
        common::stderr(&output).contains("state encrypt"),
        "{}",
        common::stderr(&output)
    );

    let output = node.cli(&["--json", "state", "encrypt", "--state", &bob.state]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let done: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (done["encrypted"].clone(), done["already"].clone()),
        (true.into(), false.into())
    );
    let bytes = std::fs::read(&bob.state).unwrap();
    assert!(!bytes.starts_with(b"SQLite format 3"));
    assert!(!bytes.windows(15).any(|w| w == b"to the old file"));

    // Now it takes the passphrase, and nothing was lost.
    let locked = with_passphrase(&node, None, &["--json", "groups", "--state", &bob.state]);
    assert_eq!(error_object(&locked, 7)["kind"], "bad_passphrase");
    assert!(bob.run(&node, "history", &[]).contains("to the old file"));
    bob.run(&node, "send", &["--msg", "encrypted now"]);
    assert!(alice.run(&node, "recv", &[]).contains("encrypted now"));
    let again = node.cli(&["--json", "state", "encrypt", "--state", &bob.state]);
    let done: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(done["already"], true);
}

#[test]
fn at_a_terminal_the_passphrase_is_asked_for_twice_for_a_new_file_then_once() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let state = common::state(dir.path(), "typed.state");
    // `env -u` drops the tests' passphrase variable, so the client asks.
    // Each answer is typed once its prompt shows, as a person would (keys
    // typed before the prompt turns echo off would be echoed).
    let typed = |args: &[&str], answers: &[(&str, &str)]| -> (bool, String) {
        use std::io::{Read, Write};
        let line = format!(
            "env -u QUICNPROTOCHAT_STATE_PASSPHRASE {}",
            node.shell_line_asking(args)
        );
        let mut terminal = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("script (util-linux) runs");
        let mut keys = terminal.stdin.take().unwrap();
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = terminal.stdout.take().unwrap();
        let shown = screen.clone();
        let reader = std::thread::spawn(move || {
            let mut buffer = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                shown
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        let mut seen = 0;
        for (prompt, answer) in answers {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let text = screen.lock().unwrap().clone();
                if let Some(at) = text[seen..].find(prompt) {
                    seen += at + prompt.len();
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no prompt {prompt:?}: {text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // The prompt is written just before echo is turned off.
            std::thread::sleep(Duration::from_millis(200));
            keys.write_all(format!("{answer}\n").as_bytes()).unwrap();
            keys.flush().unwrap();
        }
        let status = terminal.wait().unwrap();
        drop(keys);
        reader.join().unwrap();
        let shown = screen.lock().unwrap().clone();
        (status.success(), shown)
    };
    let (made, shown) = typed(
        &["register-state", "--state", &state],
        &[
            ("new passphrase for", "typed secret"),
            ("the same again", "typed secret"),
        ],
    );
    assert!(made, "{shown}");
    assert!(!shown.contains("typed secret"), "not echoed: {shown}");

    let (opened, shown) = typed(
        &["whoami", "--state", &state],
        &[("passphrase of", "typed secret")],
    );
    assert!(opened, "{shown}");
    let key = StateFile::open(&quicnprotochat_client::state::StateAccess::with_passphrase(
        &state,
        "typed secret",
    ))
    .unwrap()
    .identity_key()
    .unwrap();
    assert!(shown.contains(&key.to_string()), "{shown}");
}

#[test]
fn state_passphrase_changes_what_opens_the_file() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    let new = dir.path().join("new-passphrase");
    std::fs::write(&new, "a better one\n").unwrap();
    let new_arg = new.display().to_string();

    // Without a new passphrase and without a terminal: a usage error.
    let missing = with_passphrase(
        &node,
        Some(common::PASSPHRASE),
        &["--json", "state", "passphrase", "--state", &alice.state],
    );
    assert_eq!(error_object(&missing, 2)["kind"], "usage");

    let changed = with_passphrase(
        &node,
        Some(common::PASSPHRASE),
        &[
            "--json",
            "state",
            "passphrase",
            "--state",
            &alice.state,
            "--new-passphrase-file",
            &new_arg,
        ],
    );
    assert!(changed.status.success(), "{}", common::stderr(&changed));
    let done: serde_json::Value = serde_json::from_slice(&changed.stdout).unwrap();
    assert_eq!(done["passphrase_changed"], true);

    let old = with_passphrase(
        &node,
        Some(common::PASSPHRASE),
        &["--json", "whoami", "--state", &alice.state],
    );
    assert_eq!(error_object(&old, 7)["kind"], "bad_passphrase");
    let opened = with_passphrase(&node, Some("a better one"), &["whoami", "--state", &alice.state]);
    assert!(opened.status.success(), "{}", common::stderr(&opened));
    assert_eq!(String::from_utf8(opened.stdout).unwrap().trim(), alice.key);
}
