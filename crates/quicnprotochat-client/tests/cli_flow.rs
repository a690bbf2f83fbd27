//! The real client binary against a real node, as a user would run it.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{TestNode, alice_and_bob_in_a_group, state};
use quicnprotochat_client::ClientError;
use quicnprotochat_client::node_client::NodeClient;

#[test]
fn demo_group_decrypts_both_directions() {
    let node = TestNode::start();
    let out = node.cli_ok(&["demo-group"]);
    assert!(out.contains("Bob decrypted: Hello Bob, this is Alice."), "{out}");
    assert!(
        out.contains("Alice decrypted: Hi Alice, Bob here. Got it."),
        "{out}"
    );
}

#[test]
fn alice_and_bob_talk_both_ways_with_every_step_a_separate_process() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (state(dir.path(), "alice.state"), state(dir.path(), "bob.state"));

    let alice_key = node
        .cli_ok(&["register-state", "--state", &alice])
        .trim()
        .to_owned();
    let bob_key = node
        .cli_ok(&["register-state", "--state", &bob])
        .trim()
        .to_owned();
    assert_eq!(alice_key.len(), 64);
    assert_eq!(node.cli_ok(&["whoami", "--state", &alice]).trim(), alice_key);
    assert_eq!(node.cli_ok(&["whoami", "--state", &bob]).trim(), bob_key);

    node.cli_ok(&["create-group", "--state", &alice, "--group-id", "team"]);
    node.cli_ok(&["invite", "--state", &alice, "--peer-key", &bob_key]);
    node.cli_ok(&["join", "--state", &bob]);

    node.cli_ok(&[
        "send",
        "--state",
        &alice,
        "--peer-key",
        &bob_key,
        "--msg",
        "hello bob",
    ]);
    node.cli_ok(&[
        "send",
        "--state",
        &alice,
        "--peer-key",
        &bob_key,
        "--msg",
        "second",
    ]);
    let bob_got = node.cli_ok(&["recv", "--state", &bob]);
    let alice_short = &alice_key[..16];
    assert_eq!(
        bob_got.lines().collect::<Vec<_>>(),
        [
            format!("team {alice_short}: hello bob"),
            format!("team {alice_short}: second")
        ]
    );

    node.cli_ok(&[
        "send",
        "--state",
        &bob,
        "--peer-key",
        &alice_key,
        "--msg",
        "hi alice",
    ]);
    let alice_got = node.cli_ok(&["recv", "--state", &alice]);
    assert_eq!(alice_got.trim(), format!("team {}: hi alice", &bob_key[..16]));

    // Nothing is delivered twice.
    assert_eq!(node.cli_ok(&["recv", "--state", &bob]), "");
    assert_eq!(node.cli_ok(&["recv", "--state", &alice]), "");
}

#[test]
fn queued_messages_survive_a_node_restart() {
    let mut node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (state(dir.path(), "alice.state"), state(dir.path(), "bob.state"));
    node.cli_ok(&["register-state", "--state", &alice]);
    let bob_key = node
        .cli_ok(&["register-state", "--state", &bob])
        .trim()
        .to_owned();
    node.cli_ok(&["create-group", "--state", &alice, "--group-id", "durable"]);
    node.cli_ok(&["invite", "--state", &alice, "--peer-key", &bob_key]);

    node.restart();
    node.cli_ok(&["join", "--state", &bob]);
    node.cli_ok(&["send", "--state", &alice, "--msg", "written before the restart"]);

    node.restart();
    let got = node.cli_ok(&["recv", "--state", &bob]);
    assert!(got.ends_with(": written before the restart\n"), "{got}");
}

#[test]
fn an_unreachable_node_fails_fast_with_a_clear_message() {
    let node = TestNode::start();
    let cert = node.cert();
    // A port nothing listens on: bind a UDP socket, note its port, close it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let out = common::run_client(&[
        "--server",
        &format!("127.0.0.1:{port}"),
        "--ca-cert",
        cert.to_str().unwrap(),
        "ping",
    ]);
    assert!(!out.status.success());
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    let err = common::stderr(&out);
    assert!(err.contains("no node answered"), "{err}");
    assert!(err.contains("is quicnprotochat-server running"), "{err}");
}

#[test]
fn a_wrong_or_missing_ca_certificate_is_reported() {
    let node = TestNode::start();
    let other = TestNode::start();
    let wrong = common::run_client(&[
        "--server",
        &node.addr.to_string(),
        "--ca-cert",
        other.cert().to_str().unwrap(),
        "ping",
    ]);
    assert!(!wrong.status.success());
    let err = common::stderr(&wrong);
    assert!(err.contains("is not trusted"), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
    common::local(async {
        let mut options = node.options();
        options.ca_cert = other.cert();
        let refused = NodeClient::connect(&options, None).await.err();
        assert!(
            matches!(refused, Some(ClientError::UntrustedNode { .. })),
            "{refused:?}"
        );
    });

    let missing = common::run_client(&[
        "--server",
        &node.addr.to_string(),
        "--ca-cert",
        "/nonexistent/cert.der",
        "ping",
    ]);
    assert!(!missing.status.success());
    let err = common::stderr(&missing);
    assert!(err.contains("cannot read the node's certificate"), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
}

#[test]
fn a_name_the_nodes_certificate_does_not_list_is_reported() {
    let node = TestNode::start();
    let out = node.cli(&["--server-name", "elsewhere.example", "ping"]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("not valid for the name \"elsewhere.example\""),
        "{err}"
    );
    assert!(err.contains("--server-name"), "{err}");
    common::local(async {
        let mut options = node.options();
        options.server_name = Some("elsewhere.example".into());
        let refused = NodeClient::connect(&options, None).await.err();
        assert!(
            matches!(refused, Some(ClientError::WrongName { ref name, .. }) if name == "elsewhere.example"),
            "{refused:?}"
        );
        // The names the certificate lists work.
        for name in ["localhost", "127.0.0.1"] {
            options.server_name = Some(name.into());
            NodeClient::connect(&options, None)
                .await
                .unwrap()
                .ping()
                .await
                .unwrap();
        }
    });
}

#[test]
fn inviting_a_peer_without_key_packages_says_so() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = state(dir.path(), "alice.state");
    node.cli_ok(&["register-state", "--state", &alice]);
    node.cli_ok(&["create-group", "--state", &alice, "--group-id", "g"]);
    let nobody = "ab".repeat(32);
    let out = node.cli(&["invite", "--state", &alice, "--peer-key", &nobody]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("has no KeyPackage for"), "{err}");

    let out = node.cli(&["fetch-key", &nobody]);
    assert!(!out.status.success());
    assert!(common::stderr(&out).contains("has no KeyPackage for"));
}

#[test]
fn a_corrupt_or_foreign_state_file_is_reported_and_left_untouched() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.state");
    let garbage = b"this is not a database, just some text that someone saved here".repeat(64);
    std::fs::write(&path, &garbage).unwrap();
    for args in [
        vec!["whoami", "--state", path.to_str().unwrap()],
        vec!["recv", "--state", path.to_str().unwrap()],
        vec!["register-state", "--state", path.to_str().unwrap()],
    ] {
        let out = node.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = common::stderr(&out);
        assert!(err.contains("is not a usable quicnprotochat state file"), "{err}");
        assert!(err.contains("left untouched"), "{err}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), garbage);

    let missing = node.cli(&[
        "whoami",
        "--state",
        dir.path().join("none.state").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(common::stderr(&missing).contains("register-state"));
}

#[test]
fn register_prints_a_key_whose_package_fetch_key_can_take_once() {
    let node = TestNode::start();
    let key = node.cli_ok(&["register"]).trim().to_owned();
    assert_eq!(key.len(), 64);
    let described = node.cli_ok(&["fetch-key", &key]);
    assert!(described.contains("signature valid"), "{described}");
    let again = node.cli(&["fetch-key", &key]);
    assert!(!again.status.success());
}

#[test]
fn ping_reports_the_node_version() {
    let node = TestNode::start();
    let out = node.cli_ok(&["ping"]);
    assert!(
        out.contains(&format!("quicnprotochat-server {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

#[test]
fn recv_skips_undecodable_messages_with_a_warning_and_processes_the_rest() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, _, bob_key] = alice_and_bob_in_a_group(&node, dir.path(), "g");

    let bob_identity: quicnprotochat_core::IdentityKey = bob_key.parse().unwrap();
    common::local(async {
        let client = node
            .connect_as(&quicnprotochat_core::IdentityKeypair::generate())
            .await;
        common::enqueue_ok(&client, &bob_identity, b"definitely not MLS").await;
    });
    node.cli_ok(&["send", "--state", &alice, "--msg", "after the garbage"]);

    let out = node.cli(&["recv", "--state", &bob]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("warning: skipped a queued message"));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": after the garbage\n"));
}

#[test]
fn joining_from_recv_does_not_change_the_current_group() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (state(dir.path(), "alice.state"), state(dir.path(), "bob.state"));
    let alice_key = node
        .cli_ok(&["register-state", "--state", &alice])
        .trim()
        .to_owned();
    let bob_key = node
        .cli_ok(&["register-state", "--state", &bob])
        .trim()
        .to_owned();
    node.cli_ok(&["create-group", "--state", &bob, "--group-id", "bobs-own"]);
    node.cli_ok(&["create-group", "--state", &alice, "--group-id", "alices"]);
    node.cli_ok(&["invite", "--state", &alice, "--peer-key", &bob_key]);
    // Alice is Bob's contact, so `recv` joins her group at once.
    node.cli_ok(&["contacts", "--state", &bob, "add", "alice", &alice_key]);
    let out = node.cli(&["recv", "--state", &bob]);
    // Joined by the Welcome, then named by the message Alice sent after it.
    let notes = common::stderr(&out);
    assert!(
        notes.contains("joined group ") && notes.contains(" is called alices"),
        "{notes}"
    );
    // A send without --group-id still goes to bob's own group.
    let out = node.cli(&["send", "--state", &bob, "--msg", "to whom?"]);
    assert!(!out.status.success());
    assert!(common::stderr(&out).contains("only member of bobs-own"));
    node.cli_ok(&["send", "--state", &bob, "--group-id", "alices", "--msg", "hi"]);
    assert!(node.cli_ok(&["recv", "--state", &alice]).ends_with(": hi\n"));
}
