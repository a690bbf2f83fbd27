//! Post-quantum groups (M7) through the real CLI and a real node: a group in
//! the hybrid ML-KEM-768 + X25519 ciphersuite, every step a separate client
//! process with its own state file; and the mistakes that mix suites.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, local};
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{KeyPackageOptions, Suite, generate_key_package_with};

const HYBRID: &str = "mlkem768x25519";

#[test]
fn two_users_talk_update_and_remove_in_a_hybrid_group() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    let bob = Member::register(&node, dir.path(), "bob");
    let carol = Member::register(&node, dir.path(), "carol");

    // `register-state` keeps KeyPackages of both suites on the node.
    let described = node.cli_ok(&["fetch-key", &bob.key, "--ciphersuite", HYBRID]);
    assert!(
        described
            .contains("ciphersuite mlkem768x25519 (MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519, 0x004f)"),
        "{described}"
    );

    alice.run(
        &node,
        "create-group",
        &["--group-id", "pq", "--ciphersuite", HYBRID],
    );
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* pq epoch 0 members 1 mlkem768x25519"
    );
    alice.run(&node, "invite", &["--group-id", "pq", "--peer-key", &bob.key]);
    bob.run(&node, "join", &[]);
    assert_eq!(
        bob.run(&node, "groups", &[]).trim(),
        "* pq epoch 1 members 2 mlkem768x25519"
    );

    alice.run(
        &node,
        "send",
        &["--group-id", "pq", "--msg", "quantum-safe hello"],
    );
    let got = bob.run(&node, "recv", &[]);
    assert!(
        got.contains(&format!("pq {}: quantum-safe hello", alice.short())),
        "{got}"
    );
    bob.run(&node, "send", &["--group-id", "pq", "--msg", "and back"]);
    let got = alice.run(&node, "recv", &[]);
    assert!(got.contains(&format!("pq {}: and back", bob.short())), "{got}");

    // Fresh keys, then a third member in and out again.
    bob.run(&node, "update", &["--group-id", "pq"]);
    alice.run(&node, "recv", &[]);
    alice.run(&node, "invite", &["--group-id", "pq", "--peer-key", &carol.key]);
    carol.run(&node, "join", &[]);
    bob.run(&node, "recv", &[]);
    carol.run(&node, "send", &["--group-id", "pq", "--msg", "hi from carol"]);
    for member in [&alice, &bob] {
        let got = member.run(&node, "recv", &[]);
        assert!(got.contains("hi from carol"), "{got}");
    }
    alice.run(&node, "remove", &["--group-id", "pq", "--peer-key", &carol.key]);
    let (_, _, err) = carol.try_run(&node, "recv", &[]);
    assert!(err.contains("you were removed"), "{err}");
    bob.run(&node, "recv", &[]);
    bob.run(&node, "send", &["--group-id", "pq", "--msg", "just us"]);
    let got = alice.run(&node, "recv", &[]);
    assert!(got.contains("just us"), "{got}");
    let (_, got, _) = carol.try_run(&node, "recv", &[]);
    assert!(!got.contains("just us"), "{got}");
    assert_eq!(
        alice.run(&node, "groups", &[]).trim(),
        "* pq epoch 4 members 2 mlkem768x25519"
    );
}

#[test]
fn mixing_suites_is_refused_clearly() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");

    // A peer whose client only speaks x25519 (it uploaded nothing else).
    let classic = common::identity(7);
    local(async {
        let package = generate_key_package_with(
            &OpenMlsRustCrypto::default(),
            &classic,
            KeyPackageOptions {
                suite: Suite::X25519,
                ..KeyPackageOptions::default()
            },
        )
        .unwrap();
        let connection = node.connect_as(&classic).await;
        connection
            .upload_key_package(&classic.public_key(), &package)
            .await
            .unwrap();
    });
    alice.run(
        &node,
        "create-group",
        &["--group-id", "pq", "--ciphersuite", HYBRID],
    );
    let (ok, _, err) = alice.try_run(
        &node,
        "invite",
        &[
            "--group-id",
            "pq",
            "--peer-key",
            &classic.public_key().to_string(),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("has no KeyPackage for") && err.contains("in ciphersuite mlkem768x25519"),
        "{err}"
    );
    // The same peer joins a classic group.
    alice.run(&node, "create-group", &["--group-id", "classic"]);
    alice.run(
        &node,
        "invite",
        &[
            "--group-id",
            "classic",
            "--peer-key",
            &classic.public_key().to_string(),
        ],
    );

    let (ok, _, err) = alice.try_run(
        &node,
        "create-group",
        &["--group-id", "x", "--ciphersuite", "kyber"],
    );
    assert!(!ok);
    assert!(
        err.contains("unknown ciphersuite \"kyber\"; choose one of: x25519, mlkem768x25519"),
        "{err}"
    );
}

#[test]
fn a_client_offering_only_x25519_key_exchange_connects_to_the_node_over_quic() {
    use std::sync::Arc;

    use quicnprotochat_proto::transport;

    let node = TestNode::start();
    let trusted = quicnprotochat_proto::cert::load_certificate(&node.cert()).unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let tls = transport::client_tls(Arc::new(provider), trusted, None).unwrap();
    let config = transport::quic_client_config(tls).unwrap();
    local(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let connection = endpoint
            .connect(node.addr, "localhost")
            .unwrap()
            .await
            .expect("the node accepts a classic key exchange");
        let data = connection
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap();
        assert_eq!(data.protocol.as_deref(), Some(transport::ALPN));
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
}

#[test]
fn a_device_linked_later_joins_its_users_hybrid_group() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    let bob = Member::register(&node, dir.path(), "bob");
    bob.run(
        &node,
        "create-group",
        &["--group-id", "pq", "--ciphersuite", HYBRID],
    );
    bob.run(&node, "invite", &["--group-id", "pq", "--peer-key", &alice.key]);
    alice.run(&node, "join", &[]);

    // The linking device makes the new device's KeyPackage in the group's
    // suite.
    let laptop = common::state(dir.path(), "laptop.state");
    let code = node.cli_ok(&["link", "--state", &laptop]);
    node.cli_ok(&["devices", "add", "--state", &alice.state, code.trim()]);
    node.cli_ok(&["recv", "--state", &laptop]);
    let groups = node.cli_ok(&["groups", "--state", &laptop]);
    // Epoch 2 added the laptop; its update of the leaf keys the phone made
    // for it, epoch 3. Two members: Bob, and Alice on two devices.
    assert_eq!(groups.trim(), "* pq epoch 3 members 2 mlkem768x25519");
    bob.run(&node, "send", &["--group-id", "pq", "--msg", "to both of alice"]);
    let got = node.cli_ok(&["recv", "--state", &laptop]);
    assert!(got.contains("to both of alice"), "{got}");
}
