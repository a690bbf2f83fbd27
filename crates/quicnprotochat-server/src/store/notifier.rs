//! Wakes the waiters of a queue (push subscriptions, long polls) when
//! messages for it are committed, and all of them when the node shuts down.
//!
//! One `watch` channel per queue that someone waits on: a watch remembers
//! that it changed, so a commit between a waiter's read and its wait is
//! never missed. Each change carries a version (one per synced batch that
//! wrote to the queue) and, when they are few and small, that batch's
//! messages for the queue: a push that has seen the previous version sends
//! them on without reading the database. A waiter that missed a version, or
//! a change that carries nothing, reads the database instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quicnprotochat_core::{IdentityKey, QueuedMessage, Seq};
use tokio::sync::watch;

/// Most payload bytes of one queue's messages a change carries. Small, as
/// every watched queue keeps its last change in memory until the next one
/// (1,000 subscribers: at most 16 MiB); a chat message is well below it.
pub(super) const CARRY_BYTES: usize = 16 * 1024;

/// Most messages of one queue a change carries.
pub(super) const CARRY_MESSAGES: usize = 64;

/// The last change of one queue.
#[derive(Debug, Clone, Default)]
struct Change {
    /// Counts the synced batches that wrote to the queue while watched.
    version: u64,
    /// That batch's messages for the queue, oldest first; `None` when they
    /// did not fit [`CARRY_BYTES`] and [`CARRY_MESSAGES`].
    messages: Option<Arc<[QueuedMessage]>>,
    /// The sequence number right before them, when the backend numbers each
    /// queue without gaps (PostgreSQL): several writers commit to one queue,
    /// so a waiter may use them only once it has everything up to there.
    follows: Option<Seq>,
}

/// The registry of queue watchers.
#[derive(Debug)]
pub struct Notifier {
    queues: Mutex<HashMap<IdentityKey, watch::Sender<Change>>>,
    closing: watch::Sender<bool>,
}

impl Notifier {
    /// An empty registry.
    pub fn new() -> Arc<Notifier> {
        Arc::new(Notifier {
            queues: Mutex::new(HashMap::new()),
            closing: watch::Sender::new(false),
        })
    }

    /// Starts watching the queue of `recipient`.
    pub fn watch(&self, recipient: IdentityKey) -> QueueWatch {
        let mut changes = self
            .lock()
            .entry(recipient)
            .or_insert_with(|| watch::Sender::new(Change::default()))
            .subscribe();
        let seen = changes.borrow_and_update().version;
        QueueWatch {
            changes,
            seen,
            closing: self.closing.subscribe(),
        }
    }

    /// Which of `recipients` someone watches: only their messages are worth
    /// carrying.
    pub(super) fn watched(&self, recipients: &[IdentityKey]) -> Vec<IdentityKey> {
        let queues = self.lock();
        recipients
            .iter()
            .filter(|recipient| {
                queues
                    .get(recipient)
                    .is_some_and(|sender| sender.receiver_count() > 0)
            })
            .copied()
            .collect()
    }

    /// Tells the watchers of these queues that a batch writing to them was
    /// synced, handing on its messages for the queues in `carried`.
    /// `recipients` are distinct: a watcher counts one version per batch.
    pub(super) fn notify(
        &self,
        recipients: &[IdentityKey],
        carried: &HashMap<IdentityKey, Arc<[QueuedMessage]>>,
    ) {
        self.notify_carrying(recipients, carried, false);
    }

    /// [`Self::notify`] from a backend whose queues number their messages
    /// without gaps, where other writers (nodes) commit to the same queues:
    /// each carried run of messages is marked with the number right before
    /// it (see [`Fresh::Messages`]).
    pub(super) fn notify_gapless(
        &self,
        recipients: &[IdentityKey],
        carried: &HashMap<IdentityKey, Arc<[QueuedMessage]>>,
    ) {
        self.notify_carrying(recipients, carried, true);
    }

    fn notify_carrying(
        &self,
        recipients: &[IdentityKey],
        carried: &HashMap<IdentityKey, Arc<[QueuedMessage]>>,
        gapless: bool,
    ) {
        let mut queues = self.lock();
        for recipient in recipients {
            if let Some(sender) = queues.get(recipient) {
                if sender.receiver_count() == 0 {
                    // Nobody waits any more: forget the queue.
                    queues.remove(recipient);
                } else {
                    sender.send_modify(|change| {
                        change.version += 1;
                        change.messages = carried.get(recipient).cloned();
                        change.follows = match (&change.messages, gapless) {
                            (Some(messages), true) => messages
                                .first()
                                .map(|first| Seq::new(first.seq.get().saturating_sub(1))),
                            _ => None,
                        };
                    });
                }
            }
        }
    }

    /// Wakes the watchers of every queue whose key starts with one of
    /// `prefixes`, carrying nothing: another node wrote to the queue, and
    /// the watchers read it from the database.
    pub(super) fn wake_prefixes(&self, prefixes: &std::collections::HashSet<[u8; 8]>) {
        self.wake_where(|key| {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&key.as_bytes()[..8]);
            prefixes.contains(&prefix)
        });
    }

    /// Wakes every watcher, carrying nothing, so that each reads its queue
    /// from the database (after wake-ups may have been missed).
    pub(super) fn wake_all(&self) {
        self.wake_where(|_| true);
    }

    fn wake_where(&self, wanted: impl Fn(&IdentityKey) -> bool) {
        let queues = self.lock();
        for (key, sender) in queues.iter() {
            if sender.receiver_count() > 0 && wanted(key) {
                sender.send_modify(|change| {
                    change.version += 1;
                    change.messages = None;
                    change.follows = None;
                });
            }
        }
    }

    /// Forgets queues nobody watches any more, bounding the registry.
    pub fn forget_unwatched(&self) {
        self.lock().retain(|_, sender| sender.receiver_count() > 0);
    }

    /// Wakes every watcher for good: the node is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IdentityKey, watch::Sender<Change>>> {
        // A panic while holding the lock leaves the map intact.
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A waiter's view of one queue.
#[derive(Debug)]
pub struct QueueWatch {
    changes: watch::Receiver<Change>,
    /// The version this waiter has accounted for.
    seen: u64,
    closing: watch::Receiver<bool>,
}

/// What a waiter learns from [`QueueWatch::fresh`].
#[derive(Debug)]
pub enum Fresh {
    /// Exactly the messages the change committed (some may already have
    /// been read from the database). With `follows`, they are the ones
    /// right after that number: a waiter that has not had every message up
    /// to it must read the database instead (another node's commit may lie
    /// between).
    Messages {
        /// The messages, oldest first.
        messages: Arc<[QueuedMessage]>,
        /// The sequence number right before the first of them, when known.
        follows: Option<Seq>,
    },
    /// Something changed that the waiter must read from the database.
    Unknown,
}

impl QueueWatch {
    /// Forgets changes seen so far: call before reading the queue from the
    /// database, so that [`Self::changed`] returns for anything synced
    /// after the read.
    pub fn mark_seen(&mut self) {
        self.seen = self.changes.borrow_and_update().version;
    }

    /// Takes the latest change: its messages if it is the one right after
    /// the version this waiter accounted for and it carries them, else
    /// [`Fresh::Unknown`]. Either way the waiter has now seen it.
    pub fn fresh(&mut self) -> Fresh {
        let change = self.changes.borrow_and_update();
        let next = change.version == self.seen.wrapping_add(1);
        self.seen = change.version;
        match &change.messages {
            Some(messages) if next => Fresh::Messages {
                messages: messages.clone(),
                follows: change.follows,
            },
            _ => Fresh::Unknown,
        }
    }

    /// Waits until the queue may hold new messages. False when the node is
    /// shutting down and the waiter should stop.
    pub async fn changed(&mut self) -> bool {
        if *self.closing.borrow() {
            return false;
        }
        let changed = tokio::select! {
            changed = self.changes.changed() => changed.is_ok(),
            _ = self.closing.wait_for(|closing| *closing) => false,
        };
        changed && !*self.closing.borrow()
    }
}
