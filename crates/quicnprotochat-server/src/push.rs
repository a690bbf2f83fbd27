//! Handing a queue's messages to a client that waits for them: push
//! subscriptions (the node calls the client's `MessageReceiver`) and long
//! polls (`fetchWait`). Both read from the store and sleep on the
//! [`Notifier`](crate::store::Notifier) until a commit touches the queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quicnprotochat_core::{IdentityKey, QueuedMessage, Seq};
use quicnprotochat_proto::memory::Account;
use quicnprotochat_proto::{delivery_capnp, wire};
use tokio::sync::oneshot;

use crate::store::{Fresh, Store, StoreError};

/// Longest a long poll waits.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Most messages in one push.
const PUSH_BATCH: usize = 256;

/// The messages of `recipient` after `after` (at most `limit`, 0: the
/// node's maximum); if there are none yet, waits up to `wait` (at most
/// [`MAX_WAIT`]) for some to be committed. Empty if none came, or the node
/// is shutting down.
pub async fn wait_for_messages(
    store: &Store,
    recipient: IdentityKey,
    after: Seq,
    limit: usize,
    wait: Duration,
) -> Result<Vec<QueuedMessage>, StoreError> {
    let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
    let mut watch = store.notifier().watch(recipient);
    loop {
        // Before the read: anything committed after it wakes the wait below.
        watch.mark_seen();
        let messages = store.messages_after(recipient, after, limit).await?;
        if !messages.is_empty() {
            return Ok(messages);
        }
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(true) => continue,
            // Timed out, or the node is shutting down: answer empty.
            _ => return Ok(messages),
        }
    }
}

/// Where a subscription's pushes go: the subscriber's receiver, the
/// peer's pushes account and how long a push may wait for its answer.
pub struct Subscriber {
    /// The client's `MessageReceiver`.
    pub receiver: delivery_capnp::message_receiver::Client,
    /// Holds each push's messages until the subscriber answers it.
    pub memory: Arc<Account>,
    /// A push unanswered this long ends the subscription as stalled.
    pub stall_timeout: Duration,
    /// The most bytes one read of the queue can return (a push's bound).
    pub most: usize,
}

/// Why a push ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The subscription was dropped, the receiver failed, the node is
    /// shutting down or the store failed.
    Done,
    /// The subscriber did not answer a push within the stall timeout: the
    /// caller closes the connection.
    Stalled,
}

/// Pushes the queue of `recipient` after `after` to the subscriber, one
/// `deliver` call at a time (so a slow client slows only its own stream),
/// waking on commits, until `cancelled` fires (the subscription was
/// dropped), the receiver fails, it stalls or the node shuts down.
///
/// Each push holds its messages in its peer's pushes account from
/// before they are read until the subscriber answers; with the account (or
/// the node's pool) spent, the push waits. So a subscriber that does not
/// read costs the node at most its account, and past the stall timeout its
/// connection.
///
/// It reads the database when it starts, when a read filled a whole push,
/// and when it missed a change or a change carried no messages; otherwise
/// it sends on the messages a change carries (see
/// [`Notifier`](crate::store::Notifier)), so a subscriber that keeps up
/// costs the node no read per message.
pub async fn push(
    store: Store,
    recipient: IdentityKey,
    mut after: Seq,
    subscriber: Subscriber,
    mut cancelled: oneshot::Receiver<()>,
) -> Ended {
    let Subscriber {
        receiver,
        memory,
        stall_timeout,
        most,
    } = subscriber;
    let mut watch = store.notifier().watch(recipient);
    // Messages handed over with a change, not yet pushed.
    let mut carried: Option<Arc<[QueuedMessage]>> = None;
    // When the commit that queued what comes next woke this push; none for
    // the backlog a subscription starts with, whose age is unknown.
    let mut woken: Option<Instant> = None;
    loop {
        // Before the read, room for the most a read can return.
        let room = match &carried {
            Some(messages) => answer_bytes(messages),
            None => most,
        };
        let mut held = tokio::select! {
            held = memory.take(room) => held,
            _ = &mut cancelled => return Ended::Done,
        };
        let (batch, read_more): (Arc<[QueuedMessage]>, bool) = match carried.take() {
            Some(messages) => (messages, false),
            None => {
                watch.mark_seen();
                match store.messages_after(recipient, after, PUSH_BATCH).await {
                    Ok(messages) => {
                        let full = messages.len() == PUSH_BATCH;
                        (messages.into(), full)
                    }
                    Err(e) => {
                        tracing::debug!("push to {}: {e}", recipient.short());
                        return Ended::Done;
                    }
                }
            }
        };
        // A read since the previous change may have pushed some of a
        // change's messages already.
        let messages = &batch[batch.partition_point(|message| message.seq <= after)..];
        held.shrink_to(answer_bytes(messages));
        if let Some(last) = messages.last().map(|message| message.seq) {
            metrics::counter!(crate::metrics::MESSAGES_PUSHED).increment(messages.len() as u64);
            let mut request = receiver.deliver_request();
            // At most PUSH_BATCH messages (a change carries fewer): fits a
            // list length.
            wire::write_messages(request.get().init_messages(messages.len() as u32), messages);
            // The request holds its own copy; don't keep two while waiting.
            drop(batch);
            if let Some(woken) = woken.take() {
                metrics::histogram!(crate::metrics::PUSH_LAG).record(woken.elapsed().as_secs_f64());
            }
            let delivered = tokio::select! {
                delivered = tokio::time::timeout(stall_timeout, request.send().promise) => delivered,
                _ = &mut cancelled => return Ended::Done,
            };
            match delivered {
                Err(_) => {
                    tracing::debug!(
                        "push to {}: no answer within {stall_timeout:?}",
                        recipient.short()
                    );
                    return Ended::Stalled;
                }
                Ok(Err(e)) => {
                    tracing::debug!("push to {} ended: {e}", recipient.short());
                    return Ended::Done;
                }
                Ok(Ok(_)) => {}
            }
            drop(held);
            after = last;
            if read_more {
                continue;
            }
        } else {
            drop((held, batch));
        }
        tokio::select! {
            more = watch.changed() => if !more { return Ended::Done },
            _ = &mut cancelled => return Ended::Done,
        }
        woken = Some(Instant::now());
        match watch.fresh() {
            // Unless another node's messages may lie between what was
            // pushed and these.
            Fresh::Messages { messages, follows } if follows.is_none_or(|follows| follows <= after) => {
                carried = Some(messages);
            }
            _ => {}
        }
    }
}

/// What `messages` cost in a push: each payload padded to a word, plus its
/// list entry, and the call's framing.
fn answer_bytes(messages: &[QueuedMessage]) -> usize {
    messages
        .iter()
        .map(|message| message.payload.len().next_multiple_of(8) + 24)
        .sum::<usize>()
        + 1024
}
