//! Wakes the waiters of a queue (push subscriptions, long polls) when
//! messages for it are committed, and all of them when the node shuts down.
//!
//! One `watch` channel per queue that someone waits on: a watch remembers
//! that it changed, so a commit between a waiter's read and its wait is
//! never missed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quicnprotochat_core::IdentityKey;
use tokio::sync::watch;

/// The registry of queue watchers.
#[derive(Debug)]
pub struct Notifier {
    queues: Mutex<HashMap<IdentityKey, watch::Sender<()>>>,
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
        let changes = {
            let mut queues = self
                .queues
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            queues
                .entry(recipient)
                .or_insert_with(|| watch::Sender::new(()))
                .subscribe()
        };
        QueueWatch {
            changes,
            closing: self.closing.subscribe(),
        }
    }

    /// Tells the watchers of these queues that messages were committed.
    pub(super) fn notify<'a>(&self, recipients: impl IntoIterator<Item = &'a IdentityKey>) {
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for recipient in recipients {
            if let Some(sender) = queues.get(recipient) {
                if sender.receiver_count() == 0 {
                    // Nobody waits any more: forget the queue.
                    queues.remove(recipient);
                } else {
                    sender.send_replace(());
                }
            }
        }
    }

    /// Forgets queues nobody watches any more, bounding the registry.
    pub fn forget_unwatched(&self) {
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        queues.retain(|_, sender| sender.receiver_count() > 0);
    }

    /// Wakes every watcher for good: the node is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

/// A waiter's view of one queue.
#[derive(Debug)]
pub struct QueueWatch {
    changes: watch::Receiver<()>,
    closing: watch::Receiver<bool>,
}

impl QueueWatch {
    /// Forgets changes seen so far: call before reading the queue, so that
    /// [`Self::changed`] returns for anything committed after the read.
    pub fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
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
