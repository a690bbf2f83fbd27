//! The node's limits answer with errors, never by dropping anything
//! silently: queue full, rate limited, too many connections, retention.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{TestNode, identity, local};
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
            sender.enqueue(&queue, &[n]).await.unwrap();
        }
        let err = sender.enqueue(&queue, &[3]).await.unwrap_err().to_string();
        assert!(
            err.contains("queue full") && err.contains("3 messages waiting"),
            "{err}"
        );
        let stored = owner.fetch_since(&queue, 0, 0).await.unwrap();
        assert_eq!(stored.iter().map(|(_, p)| p[0]).collect::<Vec<_>>(), [0, 1, 2]);
        // Once the owner acks, there is room again.
        owner.ack(&queue, stored[2].0).await.unwrap();
        sender.enqueue(&queue, &[4]).await.unwrap();
    });
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
            if let Err(e) = sender.enqueue(&queue, &[n]).await {
                refused = Some((n, e.to_string()));
                break;
            }
        }
        let (at, err) = refused.expect("the burst runs out");
        assert!(
            at >= 10,
            "a burst of twice the rate passes first, refused at {at}"
        );
        assert!(
            err.contains("rate limited, retry after") && err.contains(" ms"),
            "{err}"
        );
        // Another identity has its own bucket.
        node.connect_as(&identity(5))
            .await
            .enqueue(&queue, b"fine")
            .await
            .unwrap();

        let anonymous = node.connect().await;
        let mut refused = None;
        for _ in 0..10 {
            if let Err(e) = anonymous.fetch_key_package(&queue).await {
                refused = Some(e.to_string());
                break;
            }
        }
        let err = refused.expect("anonymous fetches are limited per address");
        assert!(err.contains("rate limited"), "{err}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        anonymous.fetch_key_package(&queue).await.unwrap();
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
        assert!(third.is_err(), "a third connection is refused");
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
        sender.enqueue(&queue, b"stale").await.unwrap();
        assert_eq!(owner.fetch_since(&queue, 0, 0).await.unwrap().len(), 1);
        // Timestamps have one-second resolution: past two seconds it is old.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(owner.fetch_since(&queue, 0, 0).await.unwrap().is_empty());
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
