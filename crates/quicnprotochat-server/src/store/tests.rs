//! What only the SQLite store has to show: file ownership, the schema
//! version, how payloads and the WAL are kept, query plans. The behaviour
//! every backend shares is checked by the conformance suite
//! (`tests/conformance/`).

use quicnprotochat_core::{IdentityKey, QueuedMessage, Seq};

use super::*;

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
async fn a_database_with_damaged_pages_is_refused_with_how_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    for n in 0..200u32 {
        store
            .enqueue_batch(
                key(1),
                vec![Envelope {
                    recipients: vec![key(2)],
                    payload: n.to_be_bytes().repeat(64),
                    message_id: None,
                }],
            )
            .await
            .unwrap()
            .unwrap();
    }
    close((store, closer)).await;
    // Overwrite a page three quarters into the file: one of the queued
    // messages. (Not the middle: the schema outgrew its first page with
    // V12, and its next pages came right before the messages'.)
    let path = dir.path().join("node.db");
    let mut bytes = std::fs::read(&path).unwrap();
    let page = bytes.len() * 3 / 4 / 4096 * 4096;
    bytes[page..page + 4096].fill(0x5a);
    std::fs::write(&path, &bytes).unwrap();

    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Damaged(_)), "{err}");
    assert!(err.to_string().contains(".recover"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it was");
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
async fn a_fanned_out_payload_is_stored_once_and_freed_with_its_last_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let envelope = Envelope {
        recipients: (1..=100u8).map(key).collect(),
        payload: vec![7u8; 1000],
        message_id: None,
    };
    store
        .enqueue_batch(key(0), vec![envelope])
        .await
        .unwrap()
        .unwrap();
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
async fn reads_see_each_commit_and_closing_checkpoints_and_removes_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.db");
    let (store, closer) = Store::open(&path).unwrap();
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    for i in 0..200u8 {
        store
            .enqueue(key(0), key(1), vec![i; 100], None)
            .await
            .unwrap()
            .unwrap();
        // The reader connection sees the commit the moment it is answered.
        let read = store.messages_after(key(1), Seq::ZERO, 0).await.unwrap();
        assert_eq!(read.len(), usize::from(i) + 1);
        assert_eq!(read.last().unwrap().payload, vec![i; 100]);
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
    assert_eq!(
        store.messages_after(key(1), Seq::ZERO, 0).await.unwrap().len(),
        200
    );
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

#[tokio::test]
async fn a_change_carries_its_small_messages_and_a_missed_or_big_one_says_read() {
    let dir = tempfile::tempdir().unwrap();
    let (store, closer) = open(&dir).await;
    let mut watch = store.notifier().watch(key(1));
    watch.mark_seen();
    let send = |payload: Vec<u8>| store.enqueue(key(0), key(1), payload, None);
    // The waiter's next look after one change: exactly that change's one
    // message.
    async fn carried_one(watch: &mut QueueWatch, payload: &[u8]) -> QueuedMessage {
        assert!(watch.changed().await);
        let Fresh::Messages { messages, .. } = watch.fresh() else {
            panic!("the next change carries its message")
        };
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].payload, payload);
        messages[0].clone()
    }
    send(vec![1; 10]).await.unwrap().unwrap();
    let first = carried_one(&mut watch, &[1; 10]).await;
    // Exactly what a read of the queue after the previous state shows.
    let read = store.messages_after(key(1), Seq::ZERO, 0).await.unwrap();
    assert_eq!(read[0].seq, first.seq);

    // Two changes before the waiter looks: it missed one, so it must read.
    send(vec![2; 10]).await.unwrap().unwrap();
    send(vec![3; 10]).await.unwrap().unwrap();
    assert!(watch.changed().await);
    assert!(matches!(watch.fresh(), Fresh::Unknown));

    // Too big to carry: the waiter reads.
    send(vec![4; notifier::CARRY_BYTES + 1]).await.unwrap().unwrap();
    assert!(watch.changed().await);
    assert!(matches!(watch.fresh(), Fresh::Unknown));

    // Back to small: carried again, and only this batch's message.
    send(vec![5; 10]).await.unwrap().unwrap();
    carried_one(&mut watch, &[5; 10]).await;
    assert_eq!(store.messages_after(key(1), Seq::ZERO, 0).await.unwrap().len(), 5);
    drop(watch);
    close((store, closer)).await;
}
