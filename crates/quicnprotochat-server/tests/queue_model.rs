//! Property test: the store's queues behave like a simple model — FIFO per
//! recipient, sequence numbers strictly increasing and never reused, ack
//! deletes exactly up to the number, drain empties — under random sequences
//! of operations on a real SQLite file.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

use std::collections::HashMap;

use proptest::prelude::*;
use quicnprotochat_core::IdentityKey;
use quicnprotochat_server::store::{Envelope, Store};

#[derive(Debug, Clone)]
enum Op {
    Enqueue { to: u8, payload: Vec<u8> },
    Batch { to: Vec<u8>, payload: Vec<u8> },
    FetchAfter { of: u8, index: usize },
    Ack { of: u8, index: usize },
    Drain { of: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let payload = proptest::collection::vec(any::<u8>(), 1..24);
    prop_oneof![
        4 => (0..3u8, payload.clone()).prop_map(|(to, payload)| Op::Enqueue { to, payload }),
        2 => (proptest::sample::subsequence(vec![0u8, 1, 2], 1..=3), payload)
            .prop_map(|(to, payload)| Op::Batch { to, payload }),
        2 => (0..3u8, 0..12usize).prop_map(|(of, index)| Op::FetchAfter { of, index }),
        2 => (0..3u8, 0..12usize).prop_map(|(of, index)| Op::Ack { of, index }),
        1 => (0..3u8).prop_map(|of| Op::Drain { of }),
    ]
}

fn key(n: u8) -> IdentityKey {
    IdentityKey::from_bytes([n; 32])
}

/// What each queue must hold, oldest first, and the highest sequence number
/// ever seen per queue.
#[derive(Default)]
struct Model {
    queues: HashMap<u8, Vec<Vec<u8>>>,
    highest_seen: HashMap<u8, u64>,
}

impl Model {
    /// Reads the whole queue of `of` and checks it against the model:
    /// same payloads in the same order, sequence numbers strictly increasing.
    async fn check(&mut self, store: &Store, of: u8) -> Vec<(u64, Vec<u8>)> {
        let messages = store.messages_after(key(of), 0, 0).await.unwrap();
        let expected = self.queues.get(&of).cloned().unwrap_or_default();
        let payloads: Vec<Vec<u8>> = messages.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(payloads, expected, "queue {of} is FIFO and complete");
        assert!(
            messages.windows(2).all(|w| w[0].0 < w[1].0),
            "seq strictly increasing"
        );
        messages
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn queues_behave_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (store, closer) = Store::open(&dir.path().join("node.db")).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Enqueue { to, payload } => {
                        store.enqueue(key(9), key(to), payload.clone(), None).await.unwrap();
                        model.queues.entry(to).or_default().push(payload);
                    }
                    Op::Batch { to, payload } => {
                        let envelope = Envelope {
                            recipients: to.iter().map(|n| key(*n)).collect(),
                            payload: payload.clone(),
                            message_id: None,
                        };
                        store.enqueue_batch(key(9), vec![envelope]).await.unwrap();
                        for n in to {
                            model.queues.entry(n).or_default().push(payload.clone());
                        }
                    }
                    Op::FetchAfter { of, index } => {
                        let all = model.check(&store, of).await;
                        if let Some(&(seq, _)) = all.get(index) {
                            let after = store.messages_after(key(of), seq, 0).await.unwrap();
                            assert_eq!(after, all[index + 1..].to_vec(), "fetch after a seq is the suffix");
                        }
                        if let Some(&(last, _)) = all.last() {
                            let seen = model.highest_seen.entry(of).or_default();
                            assert!(all[0].0 > *seen || all.iter().any(|(s, _)| *s == *seen), "no seq reused");
                            *seen = (*seen).max(last);
                        }
                    }
                    Op::Ack { of, index } => {
                        let all = model.check(&store, of).await;
                        if let Some(&(seq, _)) = all.get(index) {
                            let deleted = store.ack(key(of), seq).await.unwrap();
                            assert_eq!(deleted, index + 1, "ack deletes exactly up to the number");
                            model.queues.get_mut(&of).unwrap().drain(..=index);
                            let seen = model.highest_seen.entry(of).or_default();
                            *seen = (*seen).max(all.last().unwrap().0);
                        }
                        model.check(&store, of).await;
                    }
                    Op::Drain { of } => {
                        let expected = model.queues.remove(&of).unwrap_or_default();
                        assert_eq!(store.drain(key(of)).await.unwrap(), expected, "drain returns everything in order");
                        assert!(store.messages_after(key(of), 0, 0).await.unwrap().is_empty(), "drain empties");
                    }
                }
            }
            // New messages get sequence numbers above everything seen before.
            for of in 0..3u8 {
                store.enqueue(key(9), key(of), vec![0xff], None).await.unwrap();
                model.queues.entry(of).or_default().push(vec![0xff]);
                let all = model.check(&store, of).await;
                let newest = all.last().unwrap().0;
                assert!(newest > model.highest_seen.get(&of).copied().unwrap_or(0), "never reused");
            }
            drop(store);
            closer.close().await;
        });
    }
}
