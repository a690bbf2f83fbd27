//! The writer: the only owner of the SQLite write connection.
//!
//! Loop: wait for a command, gather every other command that is ready (up to
//! [`MAX_BATCH`]), run them in one transaction with a savepoint each, commit,
//! and only then answer. A command that fails rolls back to its savepoint and
//! gets its error; the others still commit. If the commit itself fails, every
//! command of the batch gets the error and nothing of it is kept.
//!
//! "Commit" here is SQLite's `COMMIT` without an fsync; the batch's answers
//! go out once the sync thread ([`super::sync`]) has made it durable.
//!
//! The loop is a task, run either on a thread of its own ([`spawn`]) or on
//! the node's first RPC thread ([`spawn_on`]), beside the RPC sessions of
//! that thread. There it takes their calls without waking another thread:
//! each hand-off between threads costs more CPU than the SQLite work of a
//! message (docs/benchmarks/journal.md, "Cost per message"). A heavy batch, which would
//! hold that thread for milliseconds, runs on a blocking-pool thread
//! instead ([`light`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use quicnprotochat_core::{IdentityKey, QueuedMessage, Seq};
use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use super::readers::SideThreads;
use super::storage::SqliteStorage;
use super::sync::{Answers, Committed, Syncer};
use crate::delivery::rules;
use crate::store::commands::{apply, fail};
use crate::store::notifier::{CARRY_BYTES, CARRY_MESSAGES};
use crate::store::{Command, Limits, Notifier, StoreError};

/// Most commands committed together; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;

/// Everything the write loop owns.
pub(in crate::store) struct Writer {
    pub(in crate::store) connection: Connection,
    pub(in crate::store) commands: mpsc::Receiver<Command>,
    pub(in crate::store) syncer: Syncer,
    pub(in crate::store) notifier: Arc<Notifier>,
    pub(in crate::store) limits: Limits,
    pub(in crate::store) side: SideThreads,
    /// This node's hold on the SQLite file, given up once it is closed.
    pub(in crate::store) lock: super::lock::NodeLock,
    /// Set once the database is closed.
    pub(in crate::store) finished: watch::Sender<bool>,
}

/// Runs the writer on a thread of its own.
pub(in crate::store) fn spawn(writer: Writer) -> Result<JoinHandle<()>, StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(StoreError::Thread)?;
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || runtime.block_on(write_loop(writer)))
        .map_err(StoreError::Thread)
}

/// Runs the writer as a task of `runtime`, which must be a current-thread
/// runtime whose thread keeps running until the writer has finished.
pub(in crate::store) fn spawn_on(writer: Writer, runtime: &tokio::runtime::Handle) {
    drop(runtime.spawn(write_loop(writer)));
}

async fn write_loop(writer: Writer) {
    let Writer {
        mut connection,
        mut commands,
        syncer,
        notifier,
        limits,
        side,
        lock,
        finished,
    } = writer;
    // The highest message sequence number committed so far: the messages of
    // the next batch lie above it.
    let mut committed_seq = match last_seq(&connection) {
        Ok(seq) => seq,
        Err(e) => {
            tracing::error!("reading the last sequence number: {e}");
            i64::MAX
        }
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Ends when every `Store` handle is dropped and the queue is empty.
    while let Some(first) = commands.recv().await {
        batch.push(first);
        gather(&mut commands, &mut batch).await;
        if syncer.failed() {
            // The disk lost what it was given (see `sync`): write nothing
            // more, so nothing more is answered as stored. The node stops.
            for command in batch.drain(..) {
                fail(command, &StoreError::Closed);
            }
            continue;
        }
        let needs_sync = batch.iter().any(Command::needs_fsync);
        let light = light(&batch);
        // Run and COMMIT, without the fsync the syncer does apart.
        let size = batch.len();
        let started = std::time::Instant::now();
        let committed = if light {
            execute_batch(&mut connection, &mut batch, &limits, &notifier, committed_seq)
        } else {
            // A heavy batch (big payloads, a Commit, KeyPackages) would hold
            // this thread, and every call it serves, for milliseconds: run
            // it on a blocking-pool thread, with the connection, meanwhile.
            let work = (connection, std::mem::take(&mut batch), notifier.clone());
            let before = committed_seq;
            let ran = tokio::task::spawn_blocking(move || {
                let (mut connection, mut batch, notifier) = work;
                let committed = execute_batch(&mut connection, &mut batch, &limits, &notifier, before);
                (connection, batch, committed)
            })
            .await;
            match ran {
                Ok((returned, emptied, committed)) => {
                    connection = returned;
                    batch = emptied;
                    committed
                }
                Err(e) => {
                    // The batch panicked (a bug) and took the connection
                    // with it: nothing more can be written. Its callers and
                    // all later ones get "the store is closed"; what waits
                    // for a sync is answered as the sync thread ends.
                    tracing::error!("the store writer failed: {e}");
                    return;
                }
            }
        };
        metrics::histogram!(crate::metrics::STORE_BATCH_SIZE).record(size as f64);
        metrics::histogram!(crate::metrics::STORE_COMMIT).record(started.elapsed().as_secs_f64());
        if let Some(committed) = committed {
            committed_seq = committed.last_seq;
            syncer.finish(committed, needs_sync);
        }
    }
    // Answers what waits for a sync.
    syncer.stop();
    // The reader's queue closed with ours; once it and the checkpointer are
    // gone this connection is the last, and closing it removes the WAL.
    side.stop();
    // Let SQLite refresh its query planner statistics, then close: closing the
    // last connection checkpoints the WAL into the main file.
    if let Err(e) = connection.execute_batch("PRAGMA optimize") {
        tracing::warn!("PRAGMA optimize on close: {e}");
    }
    if let Err((_, e)) = connection.close() {
        tracing::error!("closing the database: {e}");
    } else {
        tracing::info!("database closed cleanly");
    }
    // Released before anyone hears of the close, so a node started right
    // after (a restart) finds the file free.
    drop(lock);
    finished.send_replace(true);
}

/// Most commands in a batch the writer runs on its own thread. A lightly
/// loaded node makes batches of one or two (a send, an ack arriving with
/// it); bigger ones run on a blocking-pool thread, where the hand-off is
/// small beside their work.
const LIGHT_COMMANDS: usize = 8;

/// Most payload bytes in a batch the writer runs on its own thread: writing
/// a megabyte into SQLite takes milliseconds in which the thread would
/// serve no call.
const LIGHT_BYTES: usize = 64 * 1024;

/// Whether `batch` is light enough to run on the writer's own thread: few
/// commands, few bytes, and none whose work the writer cannot tell before
/// it runs (a Commit checks and rewrites its group's public view;
/// KeyPackages come in dozens; a purge may delete many rows).
fn light(batch: &[Command]) -> bool {
    let mut bytes = 0usize;
    for command in batch {
        bytes += match command {
            Command::EnqueueBatch { envelopes, .. } => {
                envelopes.iter().map(|envelope| envelope.payload.len()).sum()
            }
            Command::Ack { .. } | Command::CountKeyPackages { .. } | Command::TakeKeyPackage { .. } => 0,
            _ => return false,
        };
    }
    batch.len() <= LIGHT_COMMANDS && bytes <= LIGHT_BYTES
}

/// Adds to `batch` every command that is ready, letting the tasks of this
/// thread run in between: sessions woken before the writer (by the same
/// burst of packets) may send more commands. Stops when a yield brought nothing
/// new or the batch is full.
async fn gather(commands: &mut mpsc::Receiver<Command>, batch: &mut Vec<Command>) {
    loop {
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        if batch.len() >= MAX_BATCH {
            return;
        }
        YieldOnce(false).await;
        if commands.is_empty() {
            return;
        }
    }
}

/// Goes to the back of the runtime's queue once. Unlike
/// `tokio::task::yield_now`, which waits for the runtime to poll its
/// sockets too (an `epoll_wait` per batch), this only lets the tasks that
/// are already woken run first.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        context.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Runs `batch` in one transaction and commits it; `None` if it failed (its
/// callers have their errors then). `before`: the highest message sequence
/// number committed before it.
fn execute_batch(
    connection: &mut Connection,
    batch: &mut Vec<Command>,
    limits: &Limits,
    notifier: &Notifier,
    before: i64,
) -> Option<Committed> {
    let transaction = match connection.transaction() {
        Ok(transaction) => transaction,
        Err(e) => {
            let error = StoreError::from(e);
            tracing::error!("starting a transaction: {error}");
            for command in batch.drain(..) {
                fail(command, &error);
            }
            return None;
        }
    };
    let mut answers: Answers = Vec::with_capacity(batch.len());
    // Queues that received messages in this batch, woken after the commit.
    let mut touched: Vec<IdentityKey> = Vec::new();
    let mut commands = batch.drain(..);
    for command in commands.by_ref() {
        answers.push(apply(
            &mut SqliteStorage::new(&transaction),
            command,
            limits,
            &mut touched,
        ));
        if transaction.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O
            // error). Running more commands now would commit each on its own
            // and break the all-or-nothing answer, so fail the rest unrun.
            break;
        }
    }
    let rolled_back = transaction.is_autocommit();
    if rolled_back {
        let error = StoreError::Transaction("SQLite rolled the transaction back".into());
        tracing::error!("{error}");
        for command in commands {
            fail(command, &error);
        }
        drop(transaction);
        answers.into_iter().for_each(|answer| answer(Err(&error)));
        return None;
    }
    // Read inside the transaction, which spares a read transaction (and
    // its locks) of its own; only a batch that queued messages moves it.
    let last_seq = if touched.is_empty() && before != i64::MAX {
        Ok(before)
    } else {
        last_seq(&transaction)
    };
    let last_seq = match last_seq {
        Ok(last_seq) => last_seq,
        Err(e) => {
            // Without it the batch's messages could not be shown once
            // synced: undo the batch rather than answer success.
            let error = StoreError::from(e);
            tracing::error!("reading the last sequence number: {error}");
            drop(transaction);
            answers.into_iter().for_each(|answer| answer(Err(&error)));
            return None;
        }
    };
    // Each queue once: the carried messages and the wake-up are per queue.
    touched.sort_unstable();
    touched.dedup();
    let carried = carry(&transaction, notifier, &touched, before);
    match transaction.commit() {
        Ok(()) => Some(Committed {
            answers,
            touched,
            carried,
            last_seq,
        }),
        Err(e) => {
            let error = StoreError::from(e);
            tracing::error!("committing a batch of {} commands: {error}", answers.len());
            answers.into_iter().for_each(|answer| answer(Err(&error)));
            None
        }
    }
}

/// The messages this batch added to the watched queues among `touched`
/// (distinct)
/// (those above `before`), where few and small enough to hand to the
/// waiters with the wake-up, sparing each a database read. Read inside the
/// batch's transaction: the pages are in memory and no lock is taken.
fn carry(
    db: &Connection,
    notifier: &Notifier,
    touched: &[IdentityKey],
    before: i64,
) -> HashMap<IdentityKey, Arc<[QueuedMessage]>> {
    let mut carried = HashMap::new();
    if touched.is_empty() || before == i64::MAX {
        return carried;
    }
    let after = Seq::new(u64::try_from(before).unwrap_or(0));
    for recipient in notifier.watched(touched) {
        let storage = &mut SqliteStorage::new(db);
        match rules::messages_within(storage, &recipient, after, CARRY_MESSAGES, CARRY_BYTES) {
            Ok(Some(messages)) => {
                carried.insert(recipient, messages.into());
            }
            // Too many: the waiters read the database.
            Ok(None) => {}
            Err(e) => tracing::warn!("reading a batch's messages for its waiters: {e}"),
        }
    }
    carried
}

/// The highest message sequence number ever handed out (`AUTOINCREMENT`
/// keeps it even after the message is gone).
pub(in crate::store) fn last_seq(connection: &Connection) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    let seq = connection
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")?
        .query_row([], |row| row.get(0))
        .optional()?;
    Ok(seq.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use quicnprotochat_proto::wire::Envelope;
    use tokio::sync::oneshot;

    use super::*;

    fn enqueue(bytes: usize) -> Command {
        Command::EnqueueBatch {
            sender: IdentityKey::from_bytes([1; 32]),
            state_keys: Vec::new(),
            envelopes: vec![Envelope {
                recipients: vec![IdentityKey::from_bytes([2; 32])],
                payload: vec![0; bytes],
                message_id: None,
            }],
            reply: oneshot::channel().0,
        }
    }

    fn ack() -> Command {
        Command::Ack {
            recipient: IdentityKey::from_bytes([2; 32]),
            up_to: Seq::new(1),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn only_few_small_messages_and_acks_run_on_the_writers_own_thread() {
        assert!(light(&[enqueue(100), ack()]));
        assert!(light(&(0..LIGHT_COMMANDS).map(|_| ack()).collect::<Vec<_>>()));
        assert!(!light(&(0..=LIGHT_COMMANDS).map(|_| ack()).collect::<Vec<_>>()));
        assert!(!light(&[enqueue(LIGHT_BYTES + 1)]));
        let purge = Command::Purge {
            older_than: 0,
            reply: oneshot::channel().0,
        };
        assert!(!light(&[purge]), "a purge may delete many rows");
    }
}
