//! Several real nodes on one real PostgreSQL database, driven by the real
//! CLI and the client library over real QUIC: what one node takes, every
//! node serves. Without PostgreSQL these tests say so and pass, unless
//! `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Follower, Member, TestNode, identity, local};
use quicnprotochat_core::Seq;
use quicnprotochat_proto::outcome::{FetchedKeyPackage, SendOutcome};
use quicnprotochat_proto::wire::Envelope;
use quicnprotochat_server::Config;
use quicnprotochat_server::config::Database;
use quicnprotochat_testpg::TestPostgres;

/// `count` nodes on the database at `url`, sharing one data directory (so
/// one generated certificate, which every client trusts).
fn nodes_on(url: &str, count: usize, dir: &std::path::Path) -> Vec<TestNode> {
    (0..count)
        .map(|_| {
            let mut config = Config::in_dir(dir, SocketAddr::from(([127, 0, 0, 1], 0)));
            config.db = Database::Postgres(url.to_owned());
            // One identity's KeyPackages are fetched many times below.
            config.key_package_serve_rate = 0;
            config.key_package_fetch_rate = 0;
            config.enqueue_rate = 0;
            TestNode::start_with(config, dir.to_owned())
        })
        .collect()
}

/// A fresh database on the shared test cluster.
fn database() -> Option<String> {
    Some(TestPostgres::shared()?.create_database())
}

#[test]
fn register_on_one_node_invite_through_another_and_follow_on_a_third() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 3, dir.path());
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    let alice = Member::register(a, dir.path(), "alice");
    let bob = Member::register(a, dir.path(), "bob");
    alice.run(a, "create-group", &["--group-id", "spread"]);
    alice.run(b, "invite", &["--peer-key", &bob.key]);
    bob.run(c, "join", &[]);

    let mut follow = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"));
    follow
        .args([
            "--server",
            &c.addr.to_string(),
            "--ca-cert",
            c.cert().to_str().unwrap(),
        ])
        .args(["recv", "--follow", "--state", &bob.state])
        .env_remove("QUICNPROTOCHAT_SERVER")
        .env("QUICNPROTOCHAT_STATE_PASSPHRASE", common::PASSPHRASE);
    let mut follower = Follower::start(follow);
    follower.await_note("following", Duration::from_secs(20));
    for (node, text) in [(a, "sent through A"), (b, "sent through B")] {
        let started = Instant::now();
        alice.run(node, "send", &["--msg", text]);
        let line = follower.next_line();
        assert_eq!(line, format!("spread {}: {text}", alice.short()));
        eprintln!(
            "{text}: printed by the follower on C {:?} after the send started",
            started.elapsed()
        );
    }
    // A Commit made through B reaches the follower on C as well.
    alice.run(b, "update", &[]);
    alice.run(a, "send", &["--msg", "after the update"]);
    let line = follower.next_line();
    assert_eq!(line, format!("spread {}: after the update", alice.short()));
    assert!(follower.interrupt().success());

    // And back: Bob answers through B, Alice reads through C.
    bob.run(b, "send", &["--msg", "hello from bob"]);
    let read = alice.run(c, "recv", &[]);
    assert!(
        read.ends_with(&format!("spread {}: hello from bob\n", bob.short())),
        "{read}"
    );
    // Everything was acknowledged, whichever node took the ack.
    assert_eq!(bob.run(a, "recv", &[]), "");
}

#[test]
fn every_node_answers_with_the_databases_instance_id() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 2, dir.path());
    let ids = local(async {
        let mut ids = Vec::new();
        for node in &nodes {
            ids.push(node.connect().await.ping().await.unwrap().instance_id);
        }
        ids
    });
    assert_eq!(ids[0].len(), 16);
    assert_eq!(ids[0], ids[1]);
}

#[test]
fn a_key_package_is_served_once_whichever_node_is_asked() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 2, dir.path());
    let alice = Member::register(&nodes[0], dir.path(), "alice");
    let key = quicnprotochat_core::IdentityKey::from_bytes(hex_key(&alice.key));
    // `register-state` stores a batch (8 or so) and a last resort: ask for
    // more than that.
    let fetches = 24;
    let served = local(async {
        let clients = [nodes[0].connect().await, nodes[1].connect().await];
        // Both nodes at once, twice as often as there are KeyPackages.
        let fetches = (0..fetches).map(|i| clients[i % 2].fetch_key_package(&key));
        futures::future::join_all(fetches).await
    });
    let mut times: HashMap<Vec<u8>, usize> = HashMap::new();
    for fetched in served {
        match fetched.unwrap() {
            FetchedKeyPackage::Package(package) => *times.entry(package).or_insert(0) += 1,
            other => panic!("every fetch is served: {other:?}"),
        }
    }
    // Each ordinary KeyPackage once; the last resort, kept, for the rest.
    let mut counts: Vec<usize> = times.into_values().collect();
    counts.sort_unstable();
    let last_resort = counts.pop().unwrap();
    assert!(counts.len() >= 8, "the batch was served: {counts:?}");
    assert!(
        counts.iter().all(|served| *served == 1),
        "none served twice: {counts:?}"
    );
    assert_eq!(
        last_resort,
        fetches - counts.len(),
        "the last resort is kept and served"
    );
}

fn hex_key(text: &str) -> [u8; 32] {
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Terminates the listening connections of every node on `url`.
fn drop_listeners(url: &str) -> u64 {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let row = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'quicnprotochat-node-listen' AND datname = current_database()",
                &[],
            )
            .unwrap();
        row.get::<_, i64>(0) as u64
    })
    .join()
    .unwrap()
}

#[test]
fn pushes_cross_nodes_and_survive_the_listening_connection_dropping() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 2, dir.path());
    let (sender, recipient) = (identity(1), identity(2));
    let latencies = local(async {
        let on_a = nodes[0].connect_as(&sender).await;
        let on_b = nodes[1].connect_as(&recipient).await;
        let (sink, mut pushed) = tokio::sync::mpsc::channel(64);
        let _subscription = on_b
            .subscribe(&recipient.public_key(), Seq::new(0), sink)
            .await
            .unwrap();
        let mut latencies = Vec::new();
        for round in 0..30u32 {
            if round % 10 == 5 {
                // The node re-checks every subscribed queue once it
                // listens again, so a wake-up sent meanwhile is not lost.
                assert!(drop_listeners(&url) >= 2, "both nodes were listening");
            }
            let started = Instant::now();
            let outcome = on_a
                .enqueue(&recipient.public_key(), &round.to_be_bytes())
                .await
                .unwrap();
            assert_eq!(outcome, SendOutcome::Accepted);
            let batch = tokio::time::timeout(Duration::from_secs(10), pushed.recv())
                .await
                .expect("pushed by the other node")
                .unwrap();
            latencies.push(started.elapsed());
            assert_eq!(batch.len(), 1);
            assert_eq!(batch[0].payload, round.to_be_bytes());
            assert_eq!(batch[0].seq, Seq::new(u64::from(round) + 1));
            on_b.ack(&recipient.public_key(), batch[0].seq).await.unwrap();
        }
        latencies
    });
    let mut sorted = latencies.clone();
    sorted.sort();
    eprintln!(
        "enqueue on A to push on B: median {:?}, max {:?}",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
}

#[test]
fn the_database_stopping_under_load_loses_nothing_and_the_node_recovers() {
    let Some(cluster) = TestPostgres::start_own() else {
        return;
    };
    let url = cluster.create_database();
    let mut cluster = Some(cluster);
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 1, dir.path());
    let (sender, recipient) = (identity(3), identity(4));
    let to = recipient.public_key();
    let envelope = |i: u32| Envelope {
        recipients: vec![to],
        payload: i.to_be_bytes().to_vec(),
        message_id: Some(i.to_be_bytes().to_vec()),
    };
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (accepted, failed, errors, total) = local(async {
        let client = nodes[0].connect_as(&sender).await;
        let mut accepted = Vec::new();
        let mut failed = Vec::new();
        let mut errors = Vec::new();
        let mut i = 0u32;
        let started = Instant::now();
        let mut outage = None;
        // Send steadily; stop the database a second in, start it again two
        // seconds later, go on until sends have succeeded for two seconds.
        loop {
            let elapsed = started.elapsed();
            if outage.is_none()
                && elapsed > Duration::from_secs(1)
                && let Some(cluster) = cluster.take()
            {
                let stopped = stopped.clone();
                outage = Some(std::thread::spawn(move || {
                    cluster.stop_server();
                    stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_secs(2));
                    cluster.start_server();
                    cluster
                }));
            }
            match client.enqueue_batch(&[envelope(i)]).await {
                Ok(SendOutcome::Accepted) => accepted.push(i),
                Ok(other) => panic!("unexpected outcome {other:?}"),
                Err(error) => {
                    failed.push(i);
                    errors.push(error.to_string());
                }
            }
            i += 1;
            let recovered = outage.as_ref().is_some_and(|outage| outage.is_finished())
                && failed.last().is_some_and(|last| i > last + 200);
            if recovered || elapsed > Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let cluster = outage.unwrap().join().unwrap();
        // The client retries what failed, with the same message ids.
        for id in &failed {
            let outcome = client.enqueue_batch(&[envelope(*id)]).await.unwrap();
            assert_eq!(outcome, SendOutcome::Accepted);
        }
        // Every message is there exactly once: each acknowledged one, and
        // each retried one, whether or not its first try had taken effect.
        let reader = nodes[0].connect_as(&recipient).await;
        let mut delivered: HashMap<Vec<u8>, usize> = HashMap::new();
        for payload in reader.fetch_all(&to).await.unwrap() {
            *delivered.entry(payload).or_insert(0) += 1;
        }
        assert_eq!(delivered.len(), i as usize, "every message delivered");
        assert!(delivered.values().all(|copies| *copies == 1), "none twice");
        drop(cluster);
        (accepted, failed, errors, i)
    });
    assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
    assert!(!failed.is_empty(), "some sends met the stopped database");
    assert!(
        errors.iter().any(|error| error.contains("database unavailable")),
        "the error says why: {errors:?}"
    );
    assert!(accepted.len() + failed.len() == total as usize && !accepted.is_empty());
}

#[test]
fn members_changing_the_group_through_two_nodes_at_once_agree_on_one_history() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 2, dir.path());
    let [a, b] = [&nodes[0], &nodes[1]];
    let alice = Member::register(a, dir.path(), "alice");
    let bob = Member::register(b, dir.path(), "bob");
    alice.run(a, "create-group", &["--group-id", "race"]);
    alice.run(a, "invite", &["--peer-key", &bob.key]);
    bob.run(b, "join", &[]);
    for round in 0..3 {
        // Both publish a Commit for the same epoch, through different nodes,
        // at the same moment: the nodes accept one, the other member is
        // told `conflict`, catches up and makes its change again.
        let (alice_done, bob_done) = std::thread::scope(|scope| {
            let alice_update = scope.spawn(|| alice.try_run(a, "update", &[]));
            let bob_update = scope.spawn(|| bob.try_run(b, "update", &[]));
            (alice_update.join().unwrap(), bob_update.join().unwrap())
        });
        assert!(alice_done.0, "round {round}: alice's update: {}", alice_done.2);
        assert!(bob_done.0, "round {round}: bob's update: {}", bob_done.2);
        // One history: each reads the other's message in the same epoch.
        alice.run(b, "send", &["--msg", &format!("from alice {round}")]);
        let read = bob.run(a, "recv", &[]);
        assert!(
            read.ends_with(&format!(": from alice {round}\n")),
            "round {round}: {read}"
        );
        bob.run(a, "send", &["--msg", &format!("from bob {round}")]);
        let read = alice.run(b, "recv", &[]);
        assert!(
            read.ends_with(&format!(": from bob {round}\n")),
            "round {round}: {read}"
        );
    }
    let alice_groups = alice.run(a, "groups", &[]);
    assert_eq!(alice_groups, bob.run(b, "groups", &[]), "both in the same epoch");
    // Two changes per round, each its own epoch: 1 (invite) + 2 × 3.
    assert_eq!(alice_groups.trim(), "* race epoch 7 members 2 x25519");
}

#[test]
fn a_subscriber_gets_every_message_once_in_order_when_two_nodes_write_its_queue() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 2, dir.path());
    let recipient = identity(20);
    let to = recipient.public_key();
    const EACH: u32 = 150;
    let pushed = local(async {
        let reader = nodes[0].connect_as(&recipient).await;
        let (sink, mut batches) = tokio::sync::mpsc::channel(64);
        let _subscription = reader.subscribe(&to, Seq::new(0), sink).await.unwrap();
        // One sender on the subscriber's node (its messages come with the
        // wake-up) and one on the other (read after a NOTIFY), at once.
        let senders = [(&nodes[0], identity(21), 1u8), (&nodes[1], identity(22), 2u8)];
        let sending = futures::future::join_all(senders.iter().map(|(node, sender, tag)| async move {
            let client = node.connect_as(sender).await;
            for i in 0..EACH {
                let mut payload = vec![*tag];
                payload.extend_from_slice(&i.to_be_bytes());
                assert_eq!(
                    client.enqueue(&to, &payload).await.unwrap(),
                    SendOutcome::Accepted
                );
            }
        }));
        let receiving = async {
            let mut pushed = Vec::new();
            while pushed.len() < 2 * EACH as usize {
                let batch = tokio::time::timeout(Duration::from_secs(20), batches.recv())
                    .await
                    .expect("every message is pushed")
                    .unwrap();
                let last = batch.last().unwrap().seq;
                pushed.extend(batch);
                // Acked as it goes: a message pushed out of order would be
                // deleted unseen.
                reader.ack(&to, last).await.unwrap();
            }
            pushed
        };
        let (_, pushed) = tokio::join!(sending, receiving);
        pushed
    });
    let seqs: Vec<u64> = pushed.iter().map(|message| message.seq.get()).collect();
    assert_eq!(
        seqs,
        (1..=u64::from(2 * EACH)).collect::<Vec<_>>(),
        "every number once, in order"
    );
    let distinct: std::collections::HashSet<_> = pushed.iter().map(|message| &message.payload).collect();
    assert_eq!(distinct.len(), 2 * EACH as usize, "every message once");
}

/// What a copy of the database (a `pg_dump`) shows after people talked in
/// a group through two nodes: not the group's name, not a message's text,
/// and no sender beside a message id; members' keys and the group's id
/// only in the tables docs/seized-node.md lists as not yet encrypted (the
/// queues and their messages), not in the group's public view, which is
/// sealed under the group's state key (protocol 9); the group then works
/// on.
#[test]
fn a_dump_of_the_database_names_no_group_and_no_sender_of_a_message() {
    let Some(cluster) = TestPostgres::shared() else {
        return;
    };
    let url = cluster.create_database();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, 2, dir.path());
    let [a, b] = [&nodes[0], &nodes[1]];
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(a, dir.path(), n));
    alice.run(a, "create-group", &["--group-id", "secret-union-meeting"]);
    alice.run(b, "invite", &["--peer-key", &bob.key, "--peer-key", &carol.key]);
    bob.run(a, "join", &[]);
    carol.run(b, "join", &[]);
    alice.run(a, "send", &["--msg", "the meeting is on thursday"]);
    bob.run(b, "recv", &[]);
    // Carol's copy stays queued.
    bob.run(b, "send", &["--msg", "bring the leaflets"]);

    let dump = cluster.dump(&url);
    let holds = |needle: &[u8]| dump.windows(needle.len()).any(|window| window == needle);
    for (what, text) in [
        ("the group's name", "secret-union-meeting"),
        ("a message", "the meeting is on thursday"),
        ("a message", "bring the leaflets"),
    ] {
        // pg_dump writes bytea in hex.
        assert!(!holds(text.as_bytes()), "the dump holds {what}");
        assert!(
            !holds(hex::encode(text).as_bytes()),
            "the dump holds {what} in hex"
        );
    }
    let dump = String::from_utf8(dump).unwrap();
    assert!(
        !dump.contains("message_ids"),
        "message ids are no longer kept by sender"
    );
    // The tree kept for the invitees is sealed, and names no joiner.
    let trees = dump
        .split("COPY public.welcome_trees")
        .nth(1)
        .and_then(|rest| rest.split("\n\\.\n").next())
        .expect("the dump has the Welcome trees");
    assert!(trees.lines().count() > 1, "the invite kept a tree: {trees}");
    for member in [&alice, &bob, &carol] {
        assert!(
            !trees.contains(&member.key),
            "a Welcome tree names {}",
            member.name
        );
    }
    let claimed = dump
        .split("COPY public.message_keys")
        .nth(1)
        .and_then(|rest| rest.split("\n\\.\n").next())
        .expect("the dump has the message keys");
    assert!(
        claimed.lines().count() > 3,
        "the sends claimed message ids: {claimed}"
    );
    for member in [&alice, &bob, &carol] {
        assert!(
            !claimed.contains(&member.key),
            "a message key names {}",
            member.name
        );
    }

    // Table by table, as `client_state.rs` checks a SQLite file: members'
    // keys and the group's id show only where docs/seized-node.md says
    // they still do.
    let group_id = hex::encode(common::group_id_of(a, &alice, "secret-union-meeting").as_bytes());
    let mut found: std::collections::BTreeMap<&str, std::collections::BTreeSet<String>> = Default::default();
    for section in dump.split("COPY public.").skip(1) {
        let table = section.split([' ', '(']).next().unwrap().to_owned();
        let rows = section.split("\n\\.\n").next().unwrap();
        let rows = rows.split_once('\n').map_or("", |(_, rows)| rows);
        for member in [&alice, &bob, &carol] {
            if rows.contains(&member.key) {
                found.entry("a member's key").or_default().insert(table.clone());
            }
        }
        if rows.contains(&group_id) {
            found.entry("the group id").or_default().insert(table.clone());
        }
    }
    let views = dump
        .split("COPY public.group_views")
        .nth(1)
        .and_then(|rest| rest.split("\n\\.\n").next())
        .expect("the dump has the group views");
    assert!(
        views.lines().count() > 1,
        "the node keeps the group's view: {views}"
    );
    // PostgreSQL keeps a queue's counters in `queues` and a payload in its
    // message row (SQLite: `queue_depths`, `payloads`). The group's view
    // (its tree with every member's key, its context with the group's id)
    // is sealed under the group's state key: neither shows in it.
    let tables = |names: &[&str]| names.iter().map(|name| name.to_string()).collect();
    assert_eq!(
        found["a member's key"],
        tables(&["key_packages", "messages", "queues"]),
        "{found:?}"
    );
    assert_eq!(found["the group id"], tables(&["messages"]), "{found:?}");

    let read = carol.run(a, "recv", &[]);
    assert!(
        read.contains("the meeting is on thursday") && read.contains("bring the leaflets"),
        "{read}"
    );
    carol.run(b, "send", &["--msg", "see you there"]);
    assert!(alice.run(a, "recv", &[]).contains("see you there"));
}
