//! The CLI for scripts: `--json` output of the real client binary against
//! a real node, and exit codes that tell unreachable, refused, bad input
//! and local failure apart (docs/cli.md, "Scripting").

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::process::{Command, Output, Stdio};

use common::{Member, TestNode, enqueue_ok, group_of, local, private_message, run_client};
use serde_json::Value;

/// Every line of `text` as JSON; fails the test on a line that is not.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// `text` as exactly one JSON document on one line.
fn document(text: &str) -> Value {
    let lines = json_lines(text);
    assert_eq!(lines.len(), 1, "one document expected: {text}");
    lines.into_iter().next().unwrap()
}

/// The error object a failed `--json` command printed last on stderr,
/// after checking that its exit code is `code` and says the same.
fn failure(output: &Output, code: i32) -> Value {
    let stderr = common::stderr(output);
    assert_eq!(output.status.code(), Some(code), "exit code; stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let error: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["exit_code"], code, "{error}");
    assert!(!error["message"].as_str().unwrap().is_empty(), "{error}");
    error
}

/// Only the `type` of each object.
fn types(objects: &[Value]) -> Vec<&str> {
    objects.iter().map(|o| o["type"].as_str().unwrap()).collect()
}

#[test]
fn recv_json_prints_one_object_per_line_with_group_sender_text_and_sequence_number() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);
    bob.run(&node, "contacts", &["add", "alice", &alice.key]);

    let sent = document(&alice.run(&node, "send", &["--json", "--msg", "hello \"bob\""]));
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["group"], "talk");
    assert_eq!(sent["recipients"], 1);
    assert_eq!(sent["text"], "hello \"bob\"");
    alice.run(&node, "send", &["--msg", "second"]);
    // A Commit is reported as the group's new epoch.
    alice.run(&node, "update", &[]);
    alice.run(&node, "send", &["--msg", "third"]);

    let events = json_lines(&bob.run(&node, "recv", &["--json"]));
    assert_eq!(
        types(&events),
        ["message", "message", "changed", "message"],
        "{events:#?}"
    );
    let group_id = sent["group_id"].as_str().unwrap();
    let messages: Vec<&Value> = events.iter().filter(|e| e["type"] == "message").collect();
    for message in &messages {
        assert_eq!(message["group"], "talk");
        assert_eq!(message["group_id"], group_id);
        assert_eq!(message["sender"], "alice");
        assert_eq!(message["sender_key"], alice.key.as_str());
        assert_eq!(message["from_me"], false);
        assert!(message["epoch"].is_u64(), "{message}");
    }
    let texts: Vec<&str> = messages.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["hello \"bob\"", "second", "third"]);
    // The node's sequence numbers of Bob's queue: present and rising.
    let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    let changed = &events[2];
    assert_eq!(changed["epoch"], messages[2]["epoch"]);
    assert_eq!(changed["members"], 2);
    // An update adds and removes nobody.
    assert_eq!(changed["joined"], serde_json::json!([]));
    assert_eq!(changed["left"], serde_json::json!([]));

    // Nothing new: no lines at all.
    assert_eq!(bob.run(&node, "recv", &["--json"]), "");

    // The hex group id printed is accepted wherever a group is named.
    let reply = document(&bob.run(&node, "send", &["--json", "--group-id", group_id, "--msg", "ok"]));
    assert_eq!(reply["group_id"], group_id);
}

#[test]
fn recv_follow_json_prints_each_pushed_message_as_an_object_as_it_arrives() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "live", &alice, &[&bob]);

    let follow = node.command(&["--json", "recv", "--follow", "--state", &bob.state]);
    let mut follower = common::Follower::start(follow);
    follower.await_note("following", std::time::Duration::from_secs(20));
    let mut last_seq = 0;
    for text in ["first", "second"] {
        alice.run(&node, "send", &["--msg", text]);
        let message: Value = serde_json::from_str(&follower.next_line()).unwrap();
        assert_eq!(message["type"], "message");
        assert_eq!(message["group"], "live");
        assert_eq!(message["sender_key"], alice.key.as_str());
        assert_eq!(message["text"], text);
        let seq = message["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "{message}");
        last_seq = seq;
    }
    alice.run(&node, "update", &[]);
    let changed: Value = serde_json::from_str(&follower.next_line()).unwrap();
    assert_eq!(changed["type"], "changed", "{changed}");
    assert!(follower.interrupt().success());
}

#[test]
fn chat_json_reports_what_it_sent_and_what_arrived_as_objects() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);
    bob.run(&node, "send", &["--msg", "before the chat"]);

    let output = common::run_piped(
        node.command(&["--json", "chat", "--state", &alice.state, "--group-id", "talk"]),
        "one\n/members\ntwo\n",
    );
    assert!(output.status.success(), "{}", common::stderr(&output));

    let objects = json_lines(&String::from_utf8(output.stdout).unwrap());
    // Bob's message caught up on start, each line sent, and `/members` as
    // one document between them.
    assert_eq!(objects[0]["type"], "message", "{objects:#?}");
    assert_eq!(objects[0]["text"], "before the chat");
    assert_eq!(objects[0]["sender_key"], bob.key.as_str());
    assert_eq!(objects[1]["type"], "sent");
    assert_eq!(objects[1]["text"], "one");
    assert_eq!(objects[2]["members"].as_array().unwrap().len(), 2, "{objects:#?}");
    assert_eq!(objects[3]["type"], "sent");
    assert_eq!(objects[3]["text"], "two");
    assert_eq!(objects.len(), 4, "{objects:#?}");

    let received = json_lines(&bob.run(&node, "recv", &["--json"]));
    let texts: Vec<&str> = received.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["one", "two"]);
}

#[test]
fn own_group_changes_print_the_changed_object_the_members_see() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    alice.run(&node, "contacts", &["add", "bob", &bob.key]);

    let created = document(&alice.run(&node, "create-group", &["--json", "--group-id", "team"]));
    assert_eq!(created["group"], "team");
    assert_eq!(created["epoch"], 0);
    assert_eq!(created["ciphersuite"], "x25519");
    // The MLS id: 16 random bytes, which say nothing of the name.
    let id = hex::decode(created["group_id"].as_str().unwrap()).unwrap();
    assert_eq!(id.len(), 16, "{created}");
    assert!(!id.windows(4).any(|w| w == b"team"), "{created}");

    let invited = document(&alice.run(&node, "invite", &["--json", "--peer", "bob"]));
    assert_eq!(invited["type"], "changed");
    assert_eq!(invited["group_id"], created["group_id"]);
    assert_eq!(invited["epoch"], 1);
    assert_eq!(invited["members"], 2);
    assert_eq!(
        invited["joined"],
        serde_json::json!([{ "user_key": bob.key, "name": "bob" }])
    );
    assert_eq!(invited["left"], serde_json::json!([]));
    bob.run(&node, "join", &[]);

    let updated = document(&alice.run(&node, "update", &["--json"]));
    assert_eq!(updated["epoch"], 2);
    assert_eq!(updated["joined"], serde_json::json!([]));
    assert_eq!(updated["left"], serde_json::json!([]));

    let removed = document(&alice.run(&node, "remove", &["--json", "--peer", "bob"]));
    assert_eq!(removed["epoch"], 3);
    assert_eq!(removed["members"], 1);
    assert_eq!(removed["left"][0]["user_key"], bob.key.as_str());

    // Bob is told, as an object too.
    let told = json_lines(&bob.run(&node, "recv", &["--json"]));
    assert_eq!(types(&told), ["changed", "removed"], "{told:#?}");
    assert_eq!(told[1]["group_id"], created["group_id"]);
}

#[test]
fn every_listing_command_prints_one_json_document() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice_state = common::state(dir.path(), "alice.state");
    let registered = document(&node.cli_ok(&["--json", "register-state", "--state", &alice_state]));
    let alice_key = registered["user_key"].as_str().unwrap().to_owned();
    assert_eq!(
        registered["device_key"],
        alice_key.as_str(),
        "one device: the user key"
    );
    assert!(registered["key_packages_uploaded"].as_u64().unwrap() >= 1);
    let alice = Member {
        name: "alice".into(),
        state: alice_state,
        key: alice_key,
    };
    let bob = Member::register(&node, dir.path(), "bob");

    let pong = document(&node.cli_ok(&["--json", "ping"]));
    assert_eq!(pong["protocol"], quicnprotochat_proto::PROTOCOL_VERSION);
    assert!(pong["max_payload_bytes"].as_u64().unwrap() > 0);
    assert!(pong["round_trip_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(pong["version"], env!("CARGO_PKG_VERSION"));

    let me = document(&alice.run(&node, "whoami", &["--json"]));
    assert_eq!(me["user_key"], alice.key.as_str());
    assert_eq!(me["device_key"], alice.key.as_str());

    let key_package = document(&node.cli_ok(&["--json", "fetch-key", &bob.key]));
    assert_eq!(key_package["identity_key"], bob.key.as_str());
    assert_eq!(key_package["user_key"], bob.key.as_str());
    assert_eq!(key_package["ciphersuite"], "x25519");
    assert_eq!(key_package["ciphersuite_code"], 1);
    assert_eq!(key_package["signature_valid"], true);
    assert_eq!(key_package["sha256"].as_str().unwrap().len(), 64);

    alice.run(&node, "contacts", &["add", "bob", &bob.key]);
    let contacts = document(&alice.run(&node, "contacts", &["list", "--json"]));
    assert_eq!(contacts["contacts"][0]["name"], "bob");
    assert_eq!(contacts["contacts"][0]["user_key"], bob.key.as_str());

    group_of(&node, "talk", &alice, &[&bob]);
    alice.run(&node, "create-group", &["--group-id", "quiet"]);
    alice.run(&node, "send", &["--group-id", "talk", "--msg", "hi"]);
    bob.run(&node, "send", &["--msg", "hi back"]);
    alice.run(&node, "recv", &[]);

    let groups = document(&alice.run(&node, "groups", &["--json"]));
    let groups = groups["groups"].as_array().unwrap();
    let talk = groups.iter().find(|g| g["group"] == "talk").unwrap();
    assert_eq!(talk["status"], "active");
    assert_eq!(talk["members"], 2);
    assert_eq!(talk["ciphersuite"], "x25519");
    let quiet = groups.iter().find(|g| g["group"] == "quiet").unwrap();
    assert_eq!(quiet["members"], 1);
    let current = groups.iter().filter(|g| g["current"] == true).count();
    assert_eq!(current, 1, "{groups:#?}");

    let members = document(&alice.run(&node, "members", &["--group-id", "talk", "--json"]));
    assert_eq!(members["group"], "talk");
    assert_eq!(members["group_id"], talk["group_id"]);
    let listed = members["members"].as_array().unwrap();
    let bob_entry = listed.iter().find(|m| m["user_key"] == bob.key.as_str()).unwrap();
    assert_eq!(bob_entry["name"], "bob");
    assert_eq!(bob_entry["you"], false);
    assert_eq!(bob_entry["devices"], 1);
    let alice_entry = listed
        .iter()
        .find(|m| m["user_key"] == alice.key.as_str())
        .unwrap();
    assert_eq!(alice_entry["you"], true);
    assert_eq!(alice_entry["name"], Value::Null);

    let history = document(&alice.run(&node, "history", &["--group-id", "talk", "--json"]));
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    assert_eq!(messages[0]["direction"], "sent");
    assert_eq!(messages[0]["from_me"], true);
    assert_eq!(messages[0]["delivered"], true);
    assert_eq!(messages[0]["text"], "hi");
    assert_eq!(messages[1]["direction"], "received");
    assert_eq!(messages[1]["sender"], "bob");
    assert_eq!(messages[1]["sender_key"], bob.key.as_str());
    assert_eq!(messages[1]["text"], "hi back");
    assert!(
        humantime::parse_rfc3339(messages[1]["at"].as_str().unwrap()).is_ok(),
        "{history}"
    );
}

#[test]
fn exit_codes_and_error_kinds_tell_failures_apart() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");

    // Bad input (2): a key that is not one, and a flag clap does not know.
    let error = failure(&node.cli(&["--json", "fetch-key", "not-a-key"]), 2);
    assert_eq!(error["kind"], "usage");
    let error = failure(&node.cli(&["--json", "send", "--no-such-flag"]), 2);
    assert_eq!(error["kind"], "usage");
    assert!(
        error["message"].as_str().unwrap().contains("--no-such-flag"),
        "{error}"
    );
    let error = failure(
        &node.cli(&["--json", "send", "--state", &alice.state, "--msg", "hi"]),
        2,
    );
    assert_eq!(error["kind"], "no_group");
    let missing = common::state(dir.path(), "nobody.state");
    let error = failure(&node.cli(&["--json", "whoami", "--state", &missing]), 2);
    assert_eq!(error["kind"], "no_state_file");

    // Refused (4): the node has no KeyPackage left for a throwaway identity
    // whose only one was taken.
    let throwaway = node.cli_ok(&["register"]).trim().to_owned();
    node.cli_ok(&["fetch-key", &throwaway]);
    let error = failure(&node.cli(&["--json", "fetch-key", &throwaway]), 4);
    assert_eq!(error["kind"], "no_key_package");

    // Local failure (1): a state file written by a newer client.
    let newer = common::state(dir.path(), "newer.state");
    std::fs::copy(&alice.state, &newer).unwrap();
    quicnprotochat_client::state::StateFile::raw_connection(&common::access(&newer))
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();
    let error = failure(&node.cli(&["--json", "whoami", "--state", &newer]), 1);
    assert_eq!(error["kind"], "state_too_new");

    // Unreachable (3): nothing listens on the port.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let output = run_client(&[
        "--server",
        &address,
        "--ca-cert",
        &node.cert().display().to_string(),
        "--json",
        "ping",
    ]);
    let error = failure(&output, 3);
    assert_eq!(error["kind"], "unreachable");

    // The same codes without --json, with the message for people.
    let output = node.cli(&["fetch-key", &throwaway]);
    assert_eq!(output.status.code(), Some(4));
    assert!(
        common::stderr(&output).starts_with("error: the node has no KeyPackage"),
        "{}",
        common::stderr(&output)
    );
    assert_eq!(node.cli(&["fetch-key", "not-a-key"]).status.code(), Some(2));
}

#[test]
fn progress_bars_show_on_a_terminal_and_never_in_a_pipe() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    // 20 invitees make a bar worth drawing; each joins both groups.
    let invitees: Vec<Member> = (0..20)
        .map(|i| Member::register(&node, dir.path(), &format!("peer{i}")))
        .collect();
    let peer_keys = |members: &[Member]| -> Vec<String> {
        members
            .iter()
            .flat_map(|m| ["--peer-key".to_owned(), m.key.clone()])
            .collect()
    };
    alice.run(&node, "create-group", &["--group-id", "piped"]);
    alice.run(&node, "create-group", &["--group-id", "shown"]);

    // Piped: stderr has no bar.
    let keys = peer_keys(&invitees);
    let mut args = vec!["--group-id", "piped"];
    args.extend(keys.iter().map(String::as_str));
    let (ok, _, err) = alice.try_run(&node, "invite", &args);
    assert!(ok, "{err}");
    assert!(!err.contains("fetching KeyPackages"), "{err}");
    assert_eq!(
        err.trim(),
        "invited 20 people (20 devices) to piped: epoch 1, 21 members"
    );

    // On a terminal.
    let mut args = vec!["invite", "--state", &alice.state, "--group-id", "shown"];
    args.extend(keys.iter().map(String::as_str));
    let (ok, terminal) = on_terminal(&node, &args);
    assert!(ok, "{terminal}");
    assert!(terminal.contains("fetching KeyPackages"), "{terminal}");
    assert!(terminal.contains("/20"), "{terminal}");
    assert!(
        terminal.contains("invited 20 people (20 devices) to shown"),
        "{terminal}"
    );
}

#[test]
fn a_long_backlog_shows_a_catch_up_bar_on_a_terminal() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);
    // 200 queued messages make the bar worth drawing.
    let lines: String = (0..200).map(|i| format!("message {i}\n")).collect();
    let sent = common::run_piped(
        node.command(&["chat", "--state", &alice.state, "--group-id", "talk"]),
        &lines,
    );
    assert!(sent.status.success(), "{}", common::stderr(&sent));

    let (ok, terminal) = on_terminal(&node, &["recv", "--state", &bob.state]);
    assert!(ok, "{terminal}");
    assert!(terminal.contains("catching up"), "{terminal}");
    assert!(terminal.contains("/200"), "{terminal}");
    // The messages are printed whole around the bar.
    assert!(
        terminal.contains(&format!("talk {}: message 199", alice.short())),
        "{terminal}"
    );
}

/// Runs the client against `node` with `args` on a pseudo-terminal (util-
/// linux `script` makes one), as a person would; whether it succeeded, and
/// everything the terminal showed.
fn on_terminal(node: &TestNode, args: &[&str]) -> (bool, String) {
    let command = node.shell_line(args);
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Queued messages the client cannot use are events too, so that a script
/// learns of them: `kept` for one from a later epoch (it waits for the
/// Commits before it), `dropped` for garbage; the rest is processed.
#[test]
fn queued_messages_kept_for_later_or_dropped_are_reported_as_objects() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "ours", &alice, &[&bob]);
    let group_id = quicnprotochat_client::state::StateFile::open(&common::access(&bob.state))
        .unwrap()
        .current_group()
        .unwrap()
        .unwrap();
    let bob_key: quicnprotochat_core::IdentityKey = bob.key.parse().unwrap();
    local(async {
        let stranger = node
            .connect_as(&quicnprotochat_core::IdentityKeypair::generate())
            .await;
        enqueue_ok(&stranger, &bob_key, b"\x00\x01 garbage").await;
        enqueue_ok(&stranger, &bob_key, &private_message(group_id.as_bytes(), 7, 100)).await;
    });
    alice.run(&node, "send", &["--msg", "still read"]);

    let (ok, out, err) = bob.try_run(&node, "recv", &["--json"]);
    assert!(ok, "{err}");
    assert!(!err.contains("warning"), "events are not repeated as text: {err}");
    let objects = json_lines(&out);
    assert_eq!(types(&objects), ["dropped", "kept", "message"], "{objects:?}");
    let (dropped, kept, message) = (&objects[0], &objects[1], &objects[2]);
    assert_eq!(dropped["error"], "mls", "{dropped}");
    assert!(!dropped["message"].as_str().unwrap().is_empty(), "{dropped}");
    assert_eq!(dropped["gave_up"], Value::Null, "{dropped}");
    assert_eq!(kept["epoch"], 7, "{kept}");
    assert_eq!(kept["group_epoch"], 1, "{kept}");
    assert_eq!(message["text"], "still read");
    // Each names its place in the queue, in order.
    let seqs: Vec<u64> = objects.iter().map(|o| o["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
}

/// `--state`, like every global option, goes before or after any
/// subcommand, at any depth.
#[test]
fn global_options_go_before_or_after_any_subcommand() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    let bob = Member::register(&node, dir.path(), "bob");
    let state = alice.state.as_str();
    node.cli_ok(&["contacts", "add", "bob", &bob.key, "--state", state]);
    for args in [
        vec!["contacts", "list", "--state", state],
        vec!["contacts", "--state", state, "list"],
        vec!["--state", state, "contacts", "list"],
    ] {
        assert_eq!(node.cli_ok(&args).trim(), format!("bob {}", bob.key), "{args:?}");
    }
    for args in [
        vec!["devices", "--state", state, "list"],
        vec!["devices", "list", "--state", state],
        vec!["--state", state, "devices", "list"],
    ] {
        let listed = node.cli_ok(&args);
        assert!(listed.contains(&alice.key), "{args:?}: {listed}");
    }
    let listed = document(&node.cli_ok(&["groups", "--state", state, "--json"]));
    assert_eq!(listed["groups"], serde_json::json!([]), "{listed}");
    // Without a state file, a command that needs one says so.
    let error = failure(&run_client(&["--json", "groups"]), 2);
    assert_eq!(error["kind"], "usage");
    assert!(
        error["message"].as_str().unwrap().contains("--state FILE"),
        "{error}"
    );
}

/// Being removed is a state a member can be in, not a local failure: its
/// sends and changes fail with their own kind and exit code, and what was
/// said stays readable.
#[test]
fn a_removed_members_sends_and_changes_fail_with_their_own_kind() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    common::group_of(&node, "team", &alice, &[&bob]);
    alice.run(&node, "send", &["--msg", "before"]);
    alice.run(&node, "remove", &["--peer-key", &bob.key]);
    bob.run(&node, "recv", &[]);

    for (command, args) in [
        ("send", vec!["--json", "--msg", "still here?"]),
        ("update", vec!["--json"]),
        ("leave", vec!["--json"]),
    ] {
        let mut full = vec![command, "--state", bob.state.as_str()];
        full.extend(args);
        let error = failure(&node.cli(&full), 6);
        assert_eq!(error["kind"], "not_a_member", "{command}: {error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("no longer a member of team"),
            "{command}: {error}"
        );
    }
    let (ok, _, err) = bob.try_run(&node, "send", &["--msg", "text"]);
    assert!(!ok);
    assert!(
        err.starts_with("error: you are no longer a member of team"),
        "{err}"
    );
    let history = bob.run(&node, "history", &[]);
    assert!(history.contains("before"), "{history}");
}

/// A node that is down on a host that says so (a datagram to a closed port
/// draws "port unreachable", as loopback does): the command fails at once
/// with the kind scripts retry, instead of waiting out the handshake.
#[test]
fn a_command_aimed_at_a_closed_port_fails_without_waiting_for_the_handshake() {
    let node = TestNode::start();
    let closed = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let started = std::time::Instant::now();
    let output = run_client(&[
        "--server",
        &closed,
        "--ca-cert",
        &node.cert().display().to_string(),
        "--json",
        "ping",
    ]);
    let waited = started.elapsed();
    let error = failure(&output, 3);
    assert_eq!(error["kind"], "unreachable");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&format!("no node answered at {closed}: nothing listens there")),
        "{error}"
    );
    assert!(
        waited < quicnprotochat_client::node_client::CONNECT_TIMEOUT,
        "waited {waited:?}, as long as for a node that says nothing"
    );
}
