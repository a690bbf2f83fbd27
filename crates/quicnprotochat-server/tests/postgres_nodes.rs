//! Guarantees that must hold when several nodes share one PostgreSQL
//! database, checked with two stores (two nodes' worth of connections) on
//! one real database, called at the same moment. Without PostgreSQL the
//! checks say so and pass, unless `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use quicnprotochat_core::KeyPackageStock;
use std::collections::HashSet;

use conformance::device_lists::{public, signed_list};
use conformance::{close, key, mls};
use quicnprotochat_core::{Seq, Suite};
use quicnprotochat_proto::wire::ValidKeyPackage;
use quicnprotochat_server::store::{
    CommitRefusal, DeviceListRefusal, Limits, SendRefusal, Store, StoreCloser, StoreError,
};
use quicnprotochat_testpg::TestPostgres;

/// A fresh database on the shared test cluster.
fn database() -> Option<String> {
    Some(TestPostgres::shared()?.create_database())
}

/// Two nodes' stores on `url`.
fn two_nodes(url: &str, limits: Limits) -> [(Store, StoreCloser); 2] {
    [
        Store::open_postgres(url, limits).unwrap(),
        Store::open_postgres(url, limits).unwrap(),
    ]
}

async fn close_both([a, b]: [(Store, StoreCloser); 2]) {
    close(a).await;
    close(b).await;
}

/// Runs SQL on `url` from a thread of its own (the synchronous client must
/// not run on an async thread).
fn sql(url: &str, statements: &str) {
    let (url, statements) = (url.to_owned(), statements.to_owned());
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client.batch_execute(&statements).unwrap();
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_the_databases_instance_id() {
    let Some(url) = database() else { return };
    let nodes = two_nodes(&url, Limits::default());
    assert_eq!(nodes[0].0.instance_id(), nodes[1].0.instance_id());
    close_both(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let Some(url) = database() else { return };
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                Store::open_postgres(&url, Limits::default())
                    .map(|(store, closer)| (store.instance_id(), store, closer))
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for start in starts {
        let (id, store, closer) = start.join().unwrap().unwrap();
        ids.insert(id);
        close((store, closer)).await;
    }
    assert_eq!(ids.len(), 1, "every node sees the one instance id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_something_else_or_a_newer_schema_is_refused() {
    let Some(foreign) = database() else { return };
    sql(&foreign, "CREATE TABLE customers (id int)");
    let error = Store::open_postgres(&foreign, Limits::default()).unwrap_err();
    assert!(matches!(error, StoreError::ForeignPostgres(_)), "{error}");
    assert!(
        error.to_string().contains("not a quicnprotochat node database"),
        "{error}"
    );

    let Some(newer) = database() else { return };
    close(Store::open_postgres(&newer, Limits::default()).unwrap()).await;
    sql(
        &newer,
        "UPDATE quicnprotochat_meta SET value = '999' WHERE key = 'schema_version'",
    );
    let error = Store::open_postgres(&newer, Limits::default()).unwrap_err();
    assert!(
        matches!(error, StoreError::SchemaTooNew { found: 999, .. }),
        "{error}"
    );

    let error = Store::open_postgres(
        "postgres://nobody@127.0.0.1:1/none?connect_timeout=2",
        Limits::default(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("database unavailable"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_queue_written_from_two_nodes_is_read_in_order_without_gaps() {
    let Some(url) = database() else { return };
    let [a, b] = two_nodes(&url, Limits::default());
    const EACH: u32 = 300;
    let sender = |store: Store, tag: u8| {
        tokio::spawn(async move {
            for i in 0..EACH {
                let mut payload = vec![tag];
                payload.extend_from_slice(&i.to_be_bytes());
                store
                    .enqueue(key(1), key(9), payload, None)
                    .await
                    .unwrap()
                    .unwrap();
            }
        })
    };
    let senders = [sender(a.0.clone(), b'a'), sender(b.0.clone(), b'b')];
    // The reader acks everything it sees as it goes: a message committed
    // later under a lower number would be deleted unseen by such an ack.
    let reader = a.0.clone();
    let reading = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut last = 0u64;
        while seen.len() < 2 * EACH as usize {
            let messages = reader.messages_after(key(9), Seq::new(last), 0).await.unwrap();
            for message in messages {
                assert!(message.seq.get() > last, "sequence numbers rise");
                last = message.seq.get();
                seen.push(message.payload);
            }
            reader.ack(key(9), Seq::new(last)).await.unwrap();
            tokio::task::yield_now().await;
        }
        (seen, last)
    });
    for sender in senders {
        sender.await.unwrap();
    }
    let (seen, last) = tokio::time::timeout(std::time::Duration::from_secs(60), reading)
        .await
        .expect("the reader sees every message")
        .unwrap();
    let distinct: HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 2 * EACH as usize, "each message seen once");
    assert_eq!(last, u64::from(2 * EACH), "a queue's numbers have no gaps");
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_package_is_served_once_across_nodes_and_the_last_resort_kept() {
    let Some(url) = database() else { return };
    let [a, b] = two_nodes(&url, Limits::default());
    let mut packages: Vec<ValidKeyPackage> = (0..30u32)
        .map(|i| ValidKeyPackage::new(i.to_be_bytes().to_vec(), false, u64::MAX, Suite::X25519))
        .collect();
    packages.push(ValidKeyPackage::new(
        b"last resort".to_vec(),
        true,
        u64::MAX,
        Suite::X25519,
    ));
    a.0.upload_key_packages(key(1), packages).await.unwrap().unwrap();
    let takers: Vec<_> = (0..80)
        .map(|i| {
            let store = if i % 2 == 0 { a.0.clone() } else { b.0.clone() };
            tokio::spawn(async move { store.take_key_package(key(1), Suite::X25519, true).await.unwrap() })
        })
        .collect();
    let mut ordinary = Vec::new();
    let mut last_resort = 0;
    for taker in takers {
        match taker.await.unwrap() {
            Some(package) if package == b"last resort" => last_resort += 1,
            Some(package) => ordinary.push(package),
            None => panic!("the last resort is kept"),
        }
    }
    assert_eq!(ordinary.len(), 30);
    assert_eq!(
        ordinary.iter().collect::<HashSet<_>>().len(),
        30,
        "none served twice"
    );
    assert_eq!(last_resort, 50);
    assert_eq!(
        b.0.count_key_packages(key(1), Suite::X25519).await.unwrap(),
        KeyPackageStock {
            count: 0,
            has_last_resort: true
        }
    );
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_commits_on_two_nodes_leave_one_per_epoch() {
    let Some(url) = database() else { return };
    let [a, b] = two_nodes(&url, Limits::default());
    for round in 0..6u8 {
        let group = [b'g', round];
        let mut alice = mls::Member::create(1, &group);
        let first_change = round % 2 == 1;
        if first_change {
            // Move the group to epoch 1 first: the race is then on a group
            // the node already knows.
            let commit = alice.update();
            let publication = alice.publication(commit, &[key(7)], &[round, 0], true);
            a.0.publish_commit(alice.key(), publication)
                .await
                .unwrap()
                .unwrap();
            alice.merge();
        }
        let first = alice.update();
        alice.discard();
        let second = alice.update();
        let one = alice.publication(first.clone(), &[key(7)], &[round, 1], !first_change);
        let other = alice.publication(second.clone(), &[key(7)], &[round, 2], !first_change);
        let (x, y) = tokio::join!(
            a.0.publish_commit(alice.key(), one),
            b.0.publish_commit(alice.key(), other)
        );
        let outcomes = [x.unwrap(), y.unwrap()];
        let epoch = alice.epoch();
        let accepted = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        assert_eq!(accepted, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes.contains(&Err(CommitRefusal::Conflict {
                current_epoch: epoch + 1
            })),
            "round {round}: {outcomes:?}"
        );
    }
    // Each round queued exactly its winner (and the setup Commits).
    let queued = a.0.drain(key(7)).await.unwrap();
    assert_eq!(queued.len(), 6 + 3);
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lists_stored_on_two_nodes_at_once_never_lose_the_newest() {
    let Some(url) = database() else { return };
    let [a, b] = two_nodes(&url, Limits::default());
    let (user, phone) = (1u8, 10u8);
    for round in 0..10u64 {
        // Two lists under one version, one through each node: one wins.
        // Each round names devices of its own: a device a list dropped
        // may never come back.
        let version = 3 * round + 1;
        let device = 20 + 4 * round as u8;
        let one = signed_list(user, version, &[phone, device]);
        let other = signed_list(user, version, &[phone, device + 1]);
        let (x, y) = tokio::join!(
            a.0.upload_device_list(public(phone), one.clone()),
            b.0.upload_device_list(public(phone), other.clone())
        );
        let outcomes = [x.unwrap(), y.unwrap()];
        let stale = Err(DeviceListRefusal::Stale { current: version });
        assert!(
            outcomes == [Ok(()), stale] || outcomes == [stale, Ok(())],
            "round {round}: {outcomes:?}"
        );
        let winner = if outcomes[0].is_ok() { one } else { other };
        assert_eq!(b.0.device_lists(vec![public(user)]).await.unwrap(), vec![winner]);

        // Two newer versions at once: the higher one is stored, whichever
        // commits first.
        let newer = signed_list(user, version + 1, &[phone, device + 2]);
        let newest = signed_list(user, version + 2, &[phone, device + 3]);
        let (x, y) = tokio::join!(
            a.0.upload_device_list(public(phone), newer),
            b.0.upload_device_list(public(phone), newest.clone())
        );
        let x = x.unwrap();
        assert!(
            x == Ok(()) || x == Err(DeviceListRefusal::Stale { current: version + 2 }),
            "round {round}: {x:?}"
        );
        assert_eq!(y.unwrap(), Ok(()), "round {round}: the newest is stored");
        assert_eq!(a.0.device_lists(vec![public(user)]).await.unwrap(), vec![newest]);
    }
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_and_queue_limits_hold_across_nodes() {
    let Some(url) = database() else { return };
    let limits = Limits {
        max_queue_depth: 10,
        ..Limits::default()
    };
    let [a, b] = two_nodes(&url, limits);
    // The same message id through both nodes at once: stored once.
    for i in 0..20u8 {
        let (x, y) = tokio::join!(
            a.0.enqueue(key(1), key(2), vec![i], Some(vec![i])),
            b.0.enqueue(key(1), key(2), vec![i], Some(vec![i]))
        );
        x.unwrap().unwrap();
        y.unwrap().unwrap();
        let queued = a.0.drain(key(2)).await.unwrap();
        assert_eq!(queued, vec![vec![i]], "message id {i} stored once");
    }
    // Twenty sends at a queue of ten, half through each node: ten fit.
    let sends: Vec<_> = (0..20u8)
        .map(|i| {
            let store = if i % 2 == 0 { a.0.clone() } else { b.0.clone() };
            tokio::spawn(async move { store.enqueue(key(1), key(3), vec![i], None).await.unwrap() })
        })
        .collect();
    let mut refused = 0;
    for send in sends {
        match send.await.unwrap() {
            Ok(()) => {}
            Err(SendRefusal::QueueFull(_)) => refused += 1,
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    assert_eq!(refused, 10);
    assert_eq!(
        b.0.messages_after(key(3), Seq::new(0), 0).await.unwrap().len(),
        10
    );
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_may_run_on_every_node_at_once() {
    let Some(url) = database() else { return };
    let limits = Limits {
        max_queue_depth: 12,
        ..Limits::default()
    };
    let [a, b] = two_nodes(&url, limits);
    for i in 0..60u8 {
        a.0.enqueue(key(1), key(10 + i % 5), vec![i], None)
            .await
            .unwrap()
            .unwrap();
    }
    let future = i64::MAX / 2;
    let (x, y) = tokio::join!(a.0.purge(future), b.0.purge(future));
    assert_eq!(x.unwrap() + y.unwrap(), 60, "each message purged once");
    // The queues' counters moved by exactly what went: each takes its full
    // depth again, and no more.
    for i in 0..12u8 {
        b.0.enqueue(key(1), key(10), vec![i], None)
            .await
            .unwrap()
            .unwrap();
    }
    let refused = a.0.enqueue(key(1), key(10), vec![99], None).await.unwrap();
    assert!(matches!(refused, Err(SendRefusal::QueueFull(_))), "{refused:?}");
    // Numbers go on from where they were, never back to 1.
    let after = a.0.messages_after(key(10), Seq::new(0), 0).await.unwrap();
    assert_eq!(after.first().map(|message| message.seq.get()), Some(13));
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_one_node_wakes_a_waiter_on_the_other() {
    let Some(url) = database() else { return };
    let [a, b] = two_nodes(&url, Limits::default());
    let mut watch = b.0.notifier().watch(key(5));
    watch.mark_seen();
    let started = std::time::Instant::now();
    a.0.enqueue(key(1), key(5), b"across".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    let woken = tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed()).await;
    assert_eq!(woken, Ok(true), "node B's waiter is woken");
    eprintln!(
        "woken on the other node {:?} after the enqueue started",
        started.elapsed()
    );
    let messages = b.0.messages_after(key(5), Seq::new(0), 0).await.unwrap();
    assert_eq!(messages.len(), 1);
    close_both([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_failing_in_a_batch_leaves_only_what_was_answered() {
    let Some(url) = database() else { return };
    let (store, closer) = Store::open_postgres(&url, Limits::default()).unwrap();
    // A payload the database refuses: its append fails where it is queued,
    // among the appends of other sends in the same batch.
    sql(
        &url,
        "ALTER TABLE messages ADD CONSTRAINT refuse_bad CHECK (payload <> '\\xbad0'::bytea)",
    );
    let sends: Vec<_> = (0..200u32)
        .map(|i| {
            let store = store.clone();
            let payload = if i % 50 == 25 {
                vec![0xba, 0xd0]
            } else {
                i.to_be_bytes().to_vec()
            };
            tokio::spawn(async move {
                (
                    payload.clone(),
                    store.enqueue(key(1), key(2), payload, None).await,
                )
            })
        })
        .collect();
    let mut answered = HashSet::new();
    let mut failed = 0;
    for send in sends {
        let (payload, outcome) = send.await.unwrap();
        match outcome {
            Ok(Ok(())) => {
                assert_ne!(
                    payload,
                    vec![0xba, 0xd0],
                    "a refused statement is never answered as stored"
                );
                answered.insert(payload);
            }
            Ok(Err(refusal)) => panic!("unexpected refusal {refusal:?}"),
            Err(_) => failed += 1,
        }
    }
    assert!(failed >= 4, "each bad send fails");
    let stored: HashSet<Vec<u8>> = store
        .messages_after(key(2), Seq::new(0), 0)
        .await
        .unwrap()
        .into_iter()
        .map(|message| message.payload)
        .collect();
    assert_eq!(stored, answered, "stored is exactly what was answered as stored");
    // The failures were the batches', not the connections': sends go on
    // (more than the writers, so each writer serves some).
    for i in 0..20u32 {
        store
            .enqueue(key(1), key(3), (1000 + i).to_be_bytes().to_vec(), None)
            .await
            .unwrap()
            .unwrap();
    }
    close((store, closer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_naming_a_unix_socket_directory_works() {
    let Some(cluster) = TestPostgres::shared() else {
        return;
    };
    let url = cluster.create_database();
    // Only for a cluster these tests started (its socket directory is known).
    let Some(socket) = cluster.socket_url(&url) else {
        return;
    };
    assert!(socket.contains("?host=/"), "{socket}");
    let (store, closer) = Store::open_postgres(&socket, Limits::default()).unwrap();
    store
        .enqueue(key(1), key(2), b"by socket".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
    // And the same database over TCP sees it.
    let (store, closer) = Store::open_postgres(&url, Limits::default()).unwrap();
    assert_eq!(store.drain(key(2)).await.unwrap(), vec![b"by socket".to_vec()]);
    close((store, closer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_requiring_tls_is_refused_not_sent_in_the_clear() {
    let Some(url) = database() else { return };
    let separator = if url.contains('?') { '&' } else { '?' };
    let error =
        Store::open_postgres(&format!("{url}{separator}sslmode=require"), Limits::default()).unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, StoreError::BadUrl(_)), "{text}");
    assert!(text.contains("without TLS"), "{text}");
}
