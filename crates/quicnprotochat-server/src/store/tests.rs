use std::collections::HashSet;

use quicnprotochat_core::IdentityKey;

use super::*;

/// An ordinary, never-expiring KeyPackage record (the store does not parse
/// KeyPackages; the service validates them before).
fn package(bytes: &[u8]) -> Vec<ValidKeyPackage> {
    vec![ValidKeyPackage {
        bytes: bytes.to_vec(),
        last_resort: false,
        expires_at: u64::MAX,
    }]
}

fn key(byte: u8) -> IdentityKey {
    IdentityKey::from_bytes([byte; 32])
}

async fn open(dir: &tempfile::TempDir) -> (Store, StoreCloser) {
    Store::open(&dir.path().join("node.db")).unwrap()
}

async fn close((store, closer): (Store, StoreCloser)) {
    drop(store);
    closer.close().await;
}

#[tokio::test]
async fn drain_returns_messages_in_fifo_order_and_empties_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    for i in 0..10u8 {
        store.enqueue(key(0), key(1), vec![i], None).await.unwrap();
    }
    store
        .enqueue(key(0), key(2), b"other".to_vec(), None)
        .await
        .unwrap();
    let drained = store.drain(key(1)).await.unwrap();
    assert_eq!(drained, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    assert!(store.drain(key(1)).await.unwrap().is_empty());
    assert_eq!(store.drain(key(2)).await.unwrap(), vec![b"other".to_vec()]);
    close((store, closer)).await;
}

#[tokio::test]
async fn queued_messages_and_key_packages_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    store
        .enqueue(key(0), key(1), b"kept".to_vec(), None)
        .await
        .unwrap();
    store.upload_key_packages(key(1), package(b"kp")).await.unwrap();
    close((store, closer)).await;

    let (store, closer) = open(&dir).await;
    assert_eq!(store.drain(key(1)).await.unwrap(), vec![b"kept".to_vec()]);
    assert_eq!(
        store.take_key_package(key(1)).await.unwrap(),
        Some(b"kp".to_vec())
    );
    close((store, closer)).await;
}

#[tokio::test]
async fn key_packages_are_served_once_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    store
        .upload_key_packages(key(1), package(b"first"))
        .await
        .unwrap();
    store
        .upload_key_packages(key(1), package(b"second"))
        .await
        .unwrap();
    assert_eq!(
        store.take_key_package(key(1)).await.unwrap(),
        Some(b"first".to_vec())
    );
    assert_eq!(
        store.take_key_package(key(1)).await.unwrap(),
        Some(b"second".to_vec())
    );
    assert_eq!(store.take_key_package(key(1)).await.unwrap(), None);
    assert_eq!(store.take_key_package(key(9)).await.unwrap(), None);
    close((store, closer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_takes_never_hand_out_a_key_package_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    for i in 0..50u32 {
        store
            .upload_key_packages(key(1), package(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    let takers: Vec<_> = (0..100)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.take_key_package(key(1)).await.unwrap() })
        })
        .collect();
    let mut served = Vec::new();
    for taker in takers {
        if let Some(package) = taker.await.unwrap() {
            served.push(package);
        }
    }
    assert_eq!(served.len(), 50);
    assert_eq!(served.iter().collect::<HashSet<_>>().len(), 50);
    close((store, closer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_are_all_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let senders: Vec<_> = (0..500u32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .enqueue(key(0), key(3), i.to_be_bytes().to_vec(), None)
                    .await
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap().unwrap();
    }
    close((store, closer)).await;
    let (store, closer) = open(&dir).await;
    let drained: HashSet<_> = store.drain(key(3)).await.unwrap().into_iter().collect();
    assert_eq!(drained.len(), 500);
    close((store, closer)).await;
}

#[tokio::test]
async fn a_large_queue_is_drained_over_several_fetches_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let big = vec![7u8; FETCH_BUDGET_BYTES / 3 + 1];
    for _ in 0..4 {
        store.enqueue(key(0), key(1), big.clone(), None).await.unwrap();
    }
    assert_eq!(store.drain(key(1)).await.unwrap().len(), 2);
    assert_eq!(store.drain(key(1)).await.unwrap().len(), 2);
    assert!(store.drain(key(1)).await.unwrap().is_empty());
    close((store, closer)).await;
}

#[tokio::test]
async fn a_foreign_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    {
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("CREATE TABLE notes (text TEXT)").unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::ForeignDatabase(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[tokio::test]
async fn a_database_is_stamped_with_the_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    close(open(&dir).await).await;
    let db = rusqlite::Connection::open(dir.path().join("node.db")).unwrap();
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[tokio::test]
async fn a_queue_of_tiny_messages_is_drained_in_bounded_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let total = FETCH_MAX_MESSAGES + 100;
    for i in 0..total as u32 {
        store
            .enqueue(key(0), key(5), i.to_be_bytes().to_vec(), None)
            .await
            .unwrap();
    }
    let first = store.drain(key(5)).await.unwrap();
    assert_eq!(first.len(), FETCH_MAX_MESSAGES);
    let second = store.drain(key(5)).await.unwrap();
    assert_eq!(second.len(), 100);
    assert_eq!(second[0], (FETCH_MAX_MESSAGES as u32).to_be_bytes().to_vec());
    close((store, closer)).await;
}

#[tokio::test]
async fn the_last_resort_is_served_only_when_nothing_else_is_left_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let last = ValidKeyPackage {
        bytes: b"last resort".to_vec(),
        last_resort: true,
        expires_at: u64::MAX,
    };
    store.upload_key_packages(key(1), vec![last]).await.unwrap();
    store
        .upload_key_packages(key(1), package(b"ordinary"))
        .await
        .unwrap();
    assert_eq!(store.count_key_packages(key(1)).await.unwrap(), (1, true));
    assert_eq!(
        store.take_key_package(key(1)).await.unwrap(),
        Some(b"ordinary".to_vec())
    );
    for _ in 0..3 {
        assert_eq!(
            store.take_key_package(key(1)).await.unwrap(),
            Some(b"last resort".to_vec())
        );
    }
    assert_eq!(store.count_key_packages(key(1)).await.unwrap(), (0, true));
    close((store, closer)).await;
}

#[tokio::test]
async fn an_expired_key_package_is_never_served_or_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let expired = ValidKeyPackage {
        bytes: b"old".to_vec(),
        last_resort: false,
        expires_at: 1,
    };
    let expired_last = ValidKeyPackage {
        bytes: b"old last resort".to_vec(),
        last_resort: true,
        expires_at: 1,
    };
    store
        .upload_key_packages(key(1), vec![expired, expired_last])
        .await
        .unwrap();
    assert_eq!(store.count_key_packages(key(1)).await.unwrap(), (0, false));
    assert_eq!(store.take_key_package(key(1)).await.unwrap(), None);
    close((store, closer)).await;
}

#[tokio::test]
async fn fetch_after_a_sequence_number_keeps_messages_until_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    for i in 0..5u8 {
        store.enqueue(key(0), key(1), vec![i], None).await.unwrap();
    }
    let all = store.messages_after(key(1), 0, 0).await.unwrap();
    assert_eq!(all.iter().map(|(_, p)| p[0]).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "strictly increasing");
    let (third, _) = all[2];
    assert_eq!(store.messages_after(key(1), third, 0).await.unwrap().len(), 2);
    assert_eq!(store.messages_after(key(1), 0, 2).await.unwrap().len(), 2);
    // Reading removes nothing; acking removes exactly up to the number.
    assert_eq!(store.messages_after(key(1), 0, 0).await.unwrap().len(), 5);
    assert_eq!(store.ack(key(1), third).await.unwrap(), 3);
    let rest = store.messages_after(key(1), 0, 0).await.unwrap();
    assert_eq!(rest, all[3..].to_vec());
    // Sequence numbers are never reused, even after the queue empties.
    store.ack(key(1), u64::MAX).await.unwrap();
    store.enqueue(key(0), key(1), vec![9], None).await.unwrap();
    let after = store.messages_after(key(1), 0, 0).await.unwrap();
    assert!(after[0].0 > all[4].0);
    close((store, closer)).await;
}

#[tokio::test]
async fn a_repeated_message_id_is_stored_once_per_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let id = Some(b"id-1".to_vec());
    store
        .enqueue(key(0), key(1), b"once".to_vec(), id.clone())
        .await
        .unwrap();
    store
        .enqueue(key(0), key(1), b"once".to_vec(), id.clone())
        .await
        .unwrap();
    // The same id from another sender is another message.
    store
        .enqueue(key(2), key(1), b"other sender".to_vec(), id)
        .await
        .unwrap();
    let got: Vec<Vec<u8>> = store.drain(key(1)).await.unwrap();
    assert_eq!(got, vec![b"once".to_vec(), b"other sender".to_vec()]);
    close((store, closer)).await;
}

#[tokio::test]
async fn a_fanned_out_payload_is_stored_once_and_freed_with_its_last_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let envelope = Envelope {
        recipients: (1..=100u8).map(key).collect(),
        payload: vec![7u8; 1000],
        message_id: None,
    };
    store.enqueue_batch(key(0), vec![envelope]).await.unwrap();
    close((store, closer)).await;
    let count = |sql: &str| -> i64 {
        let db = rusqlite::Connection::open(dir.path().join("node.db")).unwrap();
        db.query_row(sql, [], |row| row.get(0)).unwrap()
    };
    assert_eq!(count("SELECT count(*) FROM payloads"), 1);
    assert_eq!(count("SELECT count(*) FROM messages"), 100);

    let (store, closer) = open(&dir).await;
    for n in 1..=99u8 {
        assert_eq!(store.drain(key(n)).await.unwrap(), vec![vec![7u8; 1000]]);
    }
    close((store, closer)).await;
    assert_eq!(count("SELECT refs FROM payloads"), 1);
    let (store, closer) = open(&dir).await;
    store.drain(key(100)).await.unwrap();
    close((store, closer)).await;
    assert_eq!(count("SELECT count(*) FROM payloads"), 0);
}

#[tokio::test]
async fn only_the_first_commit_of_an_epoch_is_accepted_and_its_welcome_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let publication = |payload: &[u8], welcome_to: u8| CommitPublication {
        group_id: b"g".to_vec(),
        epoch: 1,
        commit: Envelope {
            recipients: vec![key(1)],
            payload: payload.to_vec(),
            message_id: Some(payload.to_vec()),
        },
        welcome: Some(Envelope {
            recipients: vec![key(welcome_to)],
            payload: b"welcome".to_vec(),
            message_id: None,
        }),
    };
    store
        .publish_commit(key(0), publication(b"first", 8))
        .await
        .unwrap();
    // A retry of the accepted one is fine and stores nothing new.
    store
        .publish_commit(key(0), publication(b"first", 8))
        .await
        .unwrap();
    let err = store
        .publish_commit(key(2), publication(b"second", 9))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::CommitConflict { current_epoch: 2 }),
        "{err}"
    );
    assert!(err.to_string().contains("epoch 2"), "{err}");
    assert_eq!(store.drain(key(1)).await.unwrap(), vec![b"first".to_vec()]);
    assert_eq!(store.drain(key(8)).await.unwrap(), vec![b"welcome".to_vec()]);
    assert!(
        store.drain(key(9)).await.unwrap().is_empty(),
        "the losing Welcome is not delivered"
    );
    close((store, closer)).await;
}

#[tokio::test]
async fn a_commit_for_any_other_epoch_than_the_current_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let at = |epoch: u64| CommitPublication {
        group_id: b"g".to_vec(),
        epoch,
        commit: Envelope {
            recipients: vec![key(1)],
            payload: epoch.to_be_bytes().to_vec(),
            message_id: None,
        },
        welcome: None,
    };
    store.publish_commit(key(0), at(3)).await.unwrap();
    for wrong in [0, 3, 5, 1 << 40] {
        let err = store.publish_commit(key(0), at(wrong)).await.unwrap_err();
        assert!(
            matches!(err, StoreError::CommitConflict { current_epoch: 4 }),
            "{wrong}: {err}"
        );
    }
    store.publish_commit(key(0), at(4)).await.unwrap();
    close((store, closer)).await;
}

#[tokio::test]
async fn reads_see_each_commit_and_closing_checkpoints_and_removes_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.db");
    let (store, closer) = Store::open(&path).unwrap();
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    for i in 0..200u8 {
        store.enqueue(key(0), key(1), vec![i; 100], None).await.unwrap();
        // The reader connection sees the commit the moment it is answered.
        let read = store.messages_after(key(1), 0, 0).await.unwrap();
        assert_eq!(read.len(), usize::from(i) + 1);
        assert_eq!(read.last().unwrap().1, vec![i; 100]);
    }
    // The background checkpointer copies the WAL into the database file
    // (SQLite's own checkpoint threshold is far above these few pages).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() <= before + 16 * 1024 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint ran");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    close((store, closer)).await;
    assert!(
        !dir.path().join("node.db-wal").exists(),
        "closing removed the WAL"
    );
    let (store, closer) = Store::open(&path).unwrap();
    assert_eq!(store.messages_after(key(1), 0, 0).await.unwrap().len(), 200);
    close((store, closer)).await;
}

#[tokio::test]
async fn freeing_a_shared_payload_never_scans_the_queued_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.db");
    close(Store::open(&path).unwrap()).await;
    let db = rusqlite::Connection::open(&path).unwrap();
    db.pragma_update(None, "foreign_keys", true).unwrap();
    let mut plan = db
        .prepare("EXPLAIN QUERY PLAN DELETE FROM payloads WHERE id = 1")
        .unwrap();
    let steps: Vec<String> = plan
        .query_map([], |row| row.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        steps.iter().any(|step| step.contains("messages_by_payload")),
        "the foreign-key check uses the index: {steps:?}"
    );
    assert!(
        !steps.iter().any(|step| step.starts_with("SCAN messages")),
        "{steps:?}"
    );
}
