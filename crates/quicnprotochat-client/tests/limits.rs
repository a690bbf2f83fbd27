//! The node's limits answer with typed outcomes (queue full, rate limited)
//! or refusals (too many connections), never by dropping anything silently;
//! and retention.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use quicnprotochat_core::KeyPackageStock;
use std::time::Duration;

use common::{TestNode, alice_and_bob_in_a_group, identity, local};
use quicnprotochat_core::Seq;
use quicnprotochat_proto::outcome::{FetchedKeyPackage, QueueFull, SendOutcome, TooLarge};
use quicnprotochat_proto::wire::Envelope;
use quicnprotochat_server::Config;

fn node_with(adjust: impl FnOnce(&mut Config)) -> (TestNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::in_dir(dir.path(), "127.0.0.1:0".parse().unwrap());
    adjust(&mut config);
    (TestNode::start_with(config, dir.path().to_owned()), dir)
}

#[test]
fn a_full_queue_refuses_more_and_keeps_what_it_has() {
    let (node, _dir) = node_with(|config| config.max_queue_depth = 3);
    local(async {
        let sender = node.connect_as(&identity(1)).await;
        let owner = node.connect_as(&identity(2)).await;
        let queue = identity(2).public_key();
        for n in 0..3u8 {
            assert_eq!(sender.enqueue(&queue, &[n]).await.unwrap(), SendOutcome::Accepted);
        }
        assert_eq!(
            sender.enqueue(&queue, &[3]).await.unwrap(),
            SendOutcome::QueueFull(QueueFull {
                recipients: vec![queue],
                max_depth: 3,
                max_bytes: quicnprotochat_server::config::DEFAULT_MAX_QUEUE_BYTES,
            })
        );
        let stored = owner.fetch_since(&queue, Seq::ZERO, 0).await.unwrap();
        assert_eq!(stored.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), [0, 1, 2]);
        // Once the owner acks, there is room again.
        owner.ack(&queue, stored[2].seq).await.unwrap();
        assert_eq!(sender.enqueue(&queue, &[4]).await.unwrap(), SendOutcome::Accepted);
    });
}

#[test]
fn a_batch_naming_a_queue_more_often_than_it_has_room_is_refused_whole() {
    let (node, _dir) = node_with(|config| config.max_queue_depth = 3);
    local(async {
        let sender = node.connect_as(&identity(8)).await;
        let owner = node.connect_as(&identity(9)).await;
        let roomy = node.connect_as(&identity(10)).await;
        let (queue, other) = (identity(9).public_key(), identity(10).public_key());
        assert_eq!(
            sender.enqueue(&queue, b"waiting").await.unwrap(),
            SendOutcome::Accepted
        );
        // One waiting plus three incoming is one more than the queue holds;
        // the other recipient has room but gets nothing either.
        let batch: Vec<Envelope> = (0..3u8)
            .map(|n| Envelope {
                recipients: vec![other, queue],
                payload: vec![n],
                message_id: None,
            })
            .collect();
        assert_eq!(
            sender.enqueue_batch(&batch).await.unwrap(),
            SendOutcome::QueueFull(QueueFull {
                recipients: vec![queue],
                max_depth: 3,
                max_bytes: quicnprotochat_server::config::DEFAULT_MAX_QUEUE_BYTES,
            })
        );
        let stored = owner.fetch_since(&queue, Seq::ZERO, 0).await.unwrap();
        assert_eq!(
            stored.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
            [b"waiting".as_slice()]
        );
        assert!(roomy.fetch_since(&other, Seq::ZERO, 0).await.unwrap().is_empty());

        // A recipient named twice in one envelope gets that payload once:
        // one waiting plus two incoming fits.
        let fits = [
            Envelope {
                recipients: vec![queue, queue],
                payload: b"once".to_vec(),
                message_id: None,
            },
            Envelope {
                recipients: vec![queue],
                payload: b"twice".to_vec(),
                message_id: None,
            },
        ];
        assert_eq!(sender.enqueue_batch(&fits).await.unwrap(), SendOutcome::Accepted);
        let stored = owner.fetch_since(&queue, Seq::ZERO, 0).await.unwrap();
        assert_eq!(
            stored.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
            [b"waiting".as_slice(), b"once", b"twice"]
        );
    });
}

#[test]
fn the_cli_names_a_full_queue_and_drops_a_change_the_node_refused() {
    let (node, dir) = node_with(|config| config.max_queue_depth = 2);
    let [alice, bob, _, bob_key] = alice_and_bob_in_a_group(&node, dir.path(), "small");
    for text in ["one", "two"] {
        node.cli_ok(&["send", "--state", &alice, "--msg", text]);
    }

    let out = node.cli(&["send", "--state", &alice, "--msg", "three"]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains(&format!("queue of {} is full", &bob_key[..16])) && err.contains("`recv`"),
        "{err}"
    );

    // A Commit that cannot be queued is dropped: the group stays as it was.
    let out = node.cli(&["update", "--state", &alice]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("small is unchanged") && err.contains("is full"),
        "{err}"
    );
    assert_eq!(
        node.cli_ok(&["groups", "--state", &alice]).trim(),
        "* small epoch 1 members 2 x25519"
    );

    // Once Bob drains his queue there is room again.
    assert_eq!(
        node.cli_ok(&["recv", "--state", &bob]).lines().count(),
        2,
        "bob reads what was queued"
    );
    node.cli_ok(&["update", "--state", &alice]);
    node.cli_ok(&["recv", "--state", &bob]);
    assert_eq!(
        node.cli_ok(&["groups", "--state", &bob]).trim(),
        "* small epoch 2 members 2 x25519"
    );
}

#[test]
fn the_cli_waits_out_a_rate_limit_on_sends_and_group_changes() {
    let (node, dir) = node_with(|config| config.enqueue_rate = 1);
    let [alice, bob, _, _] = alice_and_bob_in_a_group(&node, dir.path(), "slow");
    // A burst of two passes (the Welcome was one); after that the node
    // says when to come back and the client waits that long.
    let mut waited = 0;
    for command in [
        vec!["send", "--msg", "one"],
        vec!["send", "--msg", "two"],
        vec!["update"],
        vec!["send", "--msg", "three"],
    ] {
        let mut args = command.clone();
        args.extend(["--state", alice.as_str()]);
        let out = node.cli(&args);
        let err = common::stderr(&out);
        assert!(out.status.success(), "{command:?}: {err}");
        waited += usize::from(err.contains("the node asks us to slow down"));
    }
    assert!(waited >= 2, "the client waited for the rate limit");
    assert_eq!(
        node.cli_ok(&["recv", "--state", &bob])
            .lines()
            .map(|line| line.rsplit(' ').next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert_eq!(
        node.cli_ok(&["groups", "--state", &bob]).trim(),
        "* slow epoch 2 members 2 x25519"
    );
}

#[test]
fn senders_and_key_package_fetchers_over_their_rate_are_told_when_to_retry() {
    let (node, _dir) = node_with(|config| {
        config.enqueue_rate = 5;
        config.key_package_fetch_rate = 2;
    });
    local(async {
        let sender = node.connect_as(&identity(3)).await;
        let queue = identity(4).public_key();
        let mut refused = None;
        for n in 0..20u8 {
            match sender.enqueue(&queue, &[n]).await.unwrap() {
                SendOutcome::Accepted => {}
                SendOutcome::RateLimited(limited) => {
                    refused = Some((n, limited));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let (at, limited) = refused.expect("the burst runs out");
        assert!(
            at >= 10,
            "a burst of twice the rate passes first, refused at {at}"
        );
        assert!(limited.retry_after > Duration::ZERO, "{limited:?}");
        assert!(limited.retry_after <= Duration::from_secs(1), "{limited:?}");
        // Another identity has its own bucket.
        assert_eq!(
            node.connect_as(&identity(5))
                .await
                .enqueue(&queue, b"fine")
                .await
                .unwrap(),
            SendOutcome::Accepted
        );

        let anonymous = node.connect().await;
        let mut refused = None;
        for _ in 0..10 {
            if let FetchedKeyPackage::RateLimited(limited) =
                anonymous.fetch_key_package(&queue).await.unwrap()
            {
                refused = Some(limited);
                break;
            }
        }
        let limited = refused.expect("anonymous fetches are limited per address");
        assert!(limited.retry_after > Duration::ZERO, "{limited:?}");
        tokio::time::sleep(Duration::from_millis(600).max(limited.retry_after)).await;
        assert_eq!(
            anonymous.fetch_key_package(&queue).await.unwrap(),
            FetchedKeyPackage::None
        );
    });
}

#[test]
fn connections_beyond_the_maximum_are_refused() {
    let (node, _dir) = node_with(|config| config.max_connections = 2);
    local(async {
        let first = node.connect().await;
        let second = node.connect().await;
        first.ping().await.unwrap();
        second.ping().await.unwrap();
        let third = quicnprotochat_client::node_client::NodeClient::connect(&node.options(), None).await;
        assert!(
            matches!(third, Err(quicnprotochat_client::ClientError::Connect { .. })),
            "a third connection is refused"
        );
        drop(first);
        tokio::time::sleep(Duration::from_millis(300)).await;
        second.ping().await.unwrap();
    });
}

#[test]
fn undelivered_messages_older_than_the_retention_period_are_deleted() {
    let (node, _dir) = node_with(|config| config.retention = Duration::from_secs(1));
    local(async {
        let sender = node.connect_as(&identity(6)).await;
        let owner = node.connect_as(&identity(7)).await;
        let queue = identity(7).public_key();
        assert_eq!(
            sender.enqueue(&queue, b"stale").await.unwrap(),
            SendOutcome::Accepted
        );
        assert_eq!(owner.fetch_since(&queue, Seq::ZERO, 0).await.unwrap().len(), 1);
        // Timestamps have one-second resolution: past two seconds it is old.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(owner.fetch_since(&queue, Seq::ZERO, 0).await.unwrap().is_empty());
    });
}

#[test]
fn inviting_more_people_than_the_key_package_fetch_rate_allows_waits_and_succeeds() {
    let (node, dir) = node_with(|config| config.key_package_fetch_rate = 2);
    let state = |name: &str| dir.path().join(name).display().to_string();
    let keys: Vec<String> = (0..6)
        .map(|n| {
            node.cli_ok(&["register-state", "--state", &state(&format!("p{n}.state"))])
                .trim()
                .to_owned()
        })
        .collect();
    let alice = state("alice.state");
    node.cli_ok(&["register-state", "--state", &alice]);
    node.cli_ok(&["create-group", "--state", &alice, "--group-id", "many"]);
    // Six fetches against a burst of four: the client waits as told.
    let mut args = vec!["invite", "--state", &alice];
    for key in &keys {
        args.extend(["--peer-key", key.as_str()]);
    }
    node.cli_ok(&args);
    let members = node.cli_ok(&["members", "--state", &alice]);
    assert_eq!(members.lines().count(), 7, "{members}");
}

#[test]
fn a_send_bigger_than_the_burst_is_refused_whole_and_the_cli_splits_it() {
    let (node, dir) = node_with(|config| config.enqueue_rate = 2);
    local(async {
        let sender = node.connect_as(&identity(3)).await;
        let many: Vec<_> = (10..15).map(|n| identity(n).public_key()).collect();
        let envelope = Envelope {
            recipients: many.clone(),
            payload: b"to five".to_vec(),
            message_id: None,
        };
        assert_eq!(
            sender.enqueue_batch(&[envelope]).await.unwrap(),
            SendOutcome::TooLarge(TooLarge {
                max_messages: 4,
                max_bytes: 2 * quicnprotochat_server::config::DEFAULT_SEND_BYTES_RATE,
            })
        );
        // Nothing was stored, and nothing was charged: a full burst passes.
        let owner = node.connect_as(&identity(10)).await;
        assert!(
            owner
                .fetch_since(&many[0], Seq::ZERO, 0)
                .await
                .unwrap()
                .is_empty()
        );
        let four = Envelope {
            recipients: many[..4].to_vec(),
            payload: b"to four".to_vec(),
            message_id: None,
        };
        assert_eq!(
            sender.enqueue_batch(&[four]).await.unwrap(),
            SendOutcome::Accepted
        );
    });
    // The CLI sends a message to a group bigger than the burst in parts.
    let [alice, _, _, _] = alice_and_bob_in_a_group(&node, dir.path(), "split");
    let others: Vec<common::Member> = ["carol", "dave", "erin", "frank", "grace"]
        .iter()
        .map(|name| common::Member::register(&node, dir.path(), name))
        .collect();
    let mut args = vec!["invite", "--state", alice.as_str(), "--group-id", "split"];
    for member in &others {
        args.extend(["--peer-key", member.key.as_str()]);
    }
    node.cli_ok(&args);
    for member in &others {
        member.run(&node, "join", &[]);
    }
    node.cli_ok(&[
        "send",
        "--state",
        &alice,
        "--group-id",
        "split",
        "--msg",
        "to all six",
    ]);
    for member in &others {
        assert!(
            member.run(&node, "recv", &[]).contains("to all six"),
            "{}",
            member.name
        );
    }
}

#[test]
fn a_sender_is_held_to_its_byte_rate_and_a_queue_to_its_byte_limit() {
    let (node, _dir) = node_with(|config| {
        config.max_payload = 4096;
        config.send_bytes_rate = 4096;
        config.max_queue_bytes = 10_000;
    });
    local(async {
        let sender = node.connect_as(&identity(3)).await;
        let queue = identity(4).public_key();
        // The byte burst is twice the payload limit: two full payloads.
        for _ in 0..2 {
            assert_eq!(
                sender.enqueue(&queue, &[7; 4096]).await.unwrap(),
                SendOutcome::Accepted
            );
        }
        let SendOutcome::RateLimited(limited) = sender.enqueue(&queue, &[7; 4096]).await.unwrap() else {
            panic!("over the byte budget");
        };
        assert!(limited.retry_after > Duration::from_millis(500), "{limited:?}");
        // Another sender fills the queue to its byte limit: 8,192 of 10,000.
        let other = node.connect_as(&identity(5)).await;
        assert_eq!(
            other.enqueue(&queue, &[1; 2000]).await.unwrap(),
            SendOutcome::QueueFull(QueueFull {
                recipients: vec![queue],
                max_depth: quicnprotochat_server::config::DEFAULT_MAX_QUEUE_DEPTH as u32,
                max_bytes: 10_000,
            })
        );
        assert_eq!(
            other.enqueue(&queue, &[1; 1808]).await.unwrap(),
            SendOutcome::Accepted
        );
    });
}

#[test]
fn key_packages_beyond_the_stock_limit_or_the_lifetime_limit_are_refused() {
    let (node, _dir) = node_with(|config| config.max_key_packages = 3);
    local(async {
        let owner = identity(6);
        let client = node.connect_as(&owner).await;
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let make = |lifetime_seconds| {
            quicnprotochat_core::generate_key_package_with(
                &provider,
                &owner,
                quicnprotochat_core::KeyPackageOptions {
                    last_resort: false,
                    lifetime_seconds,
                    suite: Default::default(),
                },
            )
            .unwrap()
        };
        // RFC 9420 asks for a maximum lifetime: a century is refused.
        let err = client
            .upload_key_package(&owner.public_key(), &make(Some(100 * 365 * 86_400)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("valid for at most 90 days"), "{err}");
        let three: Vec<Vec<u8>> = (0..3).map(|_| make(None)).collect();
        client
            .upload_key_packages(&owner.public_key(), &three)
            .await
            .unwrap();
        let err = client
            .upload_key_package(&owner.public_key(), &make(None))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                quicnprotochat_client::ClientError::TooManyKeyPackages { stored: 3, max: 3 }
            ),
            "{err}"
        );
        assert_eq!(
            client.key_package_count(&owner.public_key()).await.unwrap(),
            KeyPackageStock {
                count: 3,
                has_last_resort: false
            }
        );
    });
}

#[test]
fn nobody_drains_an_identitys_key_packages_in_a_burst_and_the_last_resort_keeps_it_reachable() {
    // Each caller's own fetch rate off (all these callers share 127.0.0.1):
    // what is under test is the rate per target identity.
    let (node, dir) = node_with(|config| config.key_package_fetch_rate = 0);
    let bob = common::Member::register(&node, dir.path(), "bob");
    let bob_key = bob.key.parse().unwrap();
    local(async {
        // Fifty fetches from 25 connections, as fast as they come.
        let mut served = std::collections::HashMap::<Vec<u8>, usize>::new();
        for _ in 0..25 {
            let stranger = node.connect().await;
            for _ in 0..2 {
                if let FetchedKeyPackage::Package(package) =
                    stranger.fetch_key_package(&bob_key).await.unwrap()
                {
                    *served.entry(package).or_default() += 1;
                }
            }
        }
        // The serve rate lets a few ordinary ones go; every other answer is
        // the last resort, which stays.
        let ordinary = served.values().filter(|&&times| times == 1).count();
        assert_eq!(
            ordinary,
            quicnprotochat_server::config::DEFAULT_KEY_PACKAGE_SERVE_RATE as usize
        );
        assert_eq!(served.values().sum::<usize>(), 50);
        let owner = node.connect_as(&identity_of(&bob)).await;
        let KeyPackageStock {
            count: left,
            has_last_resort: last_resort,
        } = owner.key_package_count(&bob_key).await.unwrap();
        assert!(left >= 3 && last_resort, "{left} {last_resort}");
    });
}

fn identity_of(member: &common::Member) -> quicnprotochat_core::IdentityKeypair {
    quicnprotochat_client::state::StateFile::open(&common::access(&member.state))
        .unwrap()
        .identity()
        .unwrap()
}

#[test]
fn one_address_holds_at_most_its_share_of_connections() {
    let (node, _dir) = node_with(|config| config.max_connections_per_address = 2);
    local(async {
        let first = node.connect().await;
        let _second = node.connect_as(&identity(1)).await;
        let third = quicnprotochat_client::node_client::NodeClient::connect(&node.options(), None).await;
        assert!(
            matches!(third, Err(quicnprotochat_client::ClientError::Connect { .. })),
            "a third connection from 127.0.0.1 is refused"
        );
        // Once one closes, the address has room again.
        first.close().await;
        let mut again = None;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(client) =
                quicnprotochat_client::node_client::NodeClient::connect(&node.options(), None).await
            {
                again = Some(client);
                break;
            }
        }
        again.expect("room again after a close").ping().await.unwrap();
    });
}

#[test]
fn anonymous_connections_cannot_lock_out_members() {
    let (node, _dir) = node_with(|config| {
        config.max_connections = 3;
        config.max_anonymous_connections = 1;
    });
    local(async {
        let stranger = node.connect().await;
        stranger.ping().await.unwrap();
        // A second anonymous connection is closed once the node sees it has
        // no certificate.
        let refused = quicnprotochat_client::node_client::NodeClient::connect(&node.options(), None).await;
        let refused_ping = match refused {
            Ok(client) => client.ping().await.map(drop),
            Err(e) => Err(e),
        };
        assert!(
            refused_ping.is_err(),
            "a second anonymous connection is turned away"
        );
        // Members still get in.
        let member = node.connect_as(&identity(1)).await;
        member.ping().await.unwrap();
        stranger.ping().await.unwrap();
    });
}

#[test]
fn under_a_handshake_flood_new_clients_prove_their_address_and_still_connect() {
    // Every handshake counts as "beyond the threshold": each new client
    // gets a QUIC Retry first, and comes back with its token.
    let (node, _dir) = node_with(|config| config.retry_above = 0);
    local(async {
        let client = node.connect_as(&identity(1)).await;
        client.ping().await.unwrap();
        let anonymous = node.connect().await;
        anonymous.ping().await.unwrap();
    });
}

#[test]
fn initial_packets_from_a_sender_that_keeps_no_state_do_not_lock_clients_out() {
    // The node of the report: room for 50 connections.
    let (node, _dir) = node_with(|config| config.max_connections = 50);
    local(async {
        // 120 genuine QUIC Initial packets, captured on a socket of ours, then
        // sent to the node from an address that never answers (it keeps no
        // state: it cannot take part in any handshake).
        let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let trusted = quicnprotochat_proto::cert::load_certificate(&node.cert()).unwrap();
        let mut capturer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        capturer.set_default_client_config(
            quicnprotochat_proto::transport::client_config(trusted, None).unwrap(),
        );
        let mut attempts = Vec::new();
        let mut initials = Vec::new();
        let mut buffer = [0u8; 2048];
        for _ in 0..120 {
            attempts.push(capturer.connect(trap.local_addr().unwrap(), "localhost").unwrap());
            let (len, _) = tokio::time::timeout(Duration::from_secs(2), trap.recv_from(&mut buffer))
                .await
                .expect("an Initial packet")
                .unwrap();
            initials.push(buffer[..len].to_vec());
        }
        let spoofer = tokio::net::UdpSocket::bind("127.0.0.21:0").await.unwrap();
        for initial in &initials {
            spoofer.send_to(initial, node.addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        // A real client still gets in at once (through a Retry).
        let started = std::time::Instant::now();
        let client = node.connect_as(&identity(1)).await;
        client.ping().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        drop(attempts);
    });
}

/// A joiner whose queue is full when the inviter sends it the group's
/// name (it stopped reading) keeps the name owed, and blocks nothing: the
/// inviter's next commands, in other groups, go on; once the joiner reads
/// again, the next command tells it.
#[test]
fn a_joiner_that_stops_reading_keeps_the_groups_name_owed_and_blocks_nothing() {
    let (node, dir) = node_with(|config| config.max_queue_depth = 2);
    let [alice, bob, carol] =
        ["alice", "bob", "carol"].map(|n| common::Member::register(&node, dir.path(), n));
    common::group_of(&node, "with-carol", &alice, &[&carol]);
    alice.run(&node, "create-group", &["--group-id", "with-bob"]);
    // Bob's queue holds a message already, then takes the Welcome; the name
    // finds it full.
    let bob_key: quicnprotochat_core::IdentityKey = bob.key.parse().unwrap();
    local(async {
        let stranger = node.connect_as(&identity(7)).await;
        assert_eq!(
            stranger.enqueue(&bob_key, b"unread").await.unwrap(),
            SendOutcome::Accepted
        );
    });
    let (ok, _, err) = alice.try_run(
        &node,
        "invite",
        &["--group-id", "with-bob", "--peer-key", &bob.key],
    );
    assert!(ok && err.contains("were not told its name yet"), "{err}");
    // Alice's send to Carol tries the name again first, and goes on.
    let (ok, _, err) = alice.try_run(&node, "send", &["--group-id", "with-carol", "--msg", "hi carol"]);
    assert!(ok && err.contains("were not told a group's name yet"), "{err}");
    assert!(carol.run(&node, "recv", &[]).contains("hi carol"));
    // Bob reads again; Alice's next command names the group for him.
    bob.run(&node, "join", &[]);
    alice.run(&node, "recv", &[]);
    let (ok, _, err) = bob.try_run(&node, "recv", &[]);
    assert!(ok && err.contains(" is called with-bob"), "{err}");
}
