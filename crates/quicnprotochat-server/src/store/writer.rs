//! The writer thread: the only owner of the SQLite connection.
//!
//! Loop: wait for a command, take every other command already waiting (up to
//! [`MAX_BATCH`]), run them in one transaction with a savepoint each, commit,
//! and only then answer. A command that fails rolls back to its savepoint and
//! gets its error; the others still commit. If the commit itself fails, every
//! command of the batch gets the error and nothing of it is kept.

use std::sync::Arc;
use std::thread::JoinHandle;

use quicnprotochat_core::IdentityKey;
use rusqlite::Connection;
use tokio::sync::mpsc;

use super::readers::SideThreads;
use super::{Command, Notifier, StoreError, StoreLimits, queries};

/// Most commands committed together; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;

pub(super) fn spawn(
    connection: Connection,
    commands: mpsc::Receiver<Command>,
    notifier: Arc<Notifier>,
    limits: StoreLimits,
    side: SideThreads,
) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(connection, commands, &notifier, limits, side))
        .map_err(StoreError::Thread)
}

fn run(
    mut connection: Connection,
    mut commands: mpsc::Receiver<Command>,
    notifier: &Notifier,
    limits: StoreLimits,
    side: SideThreads,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Ends when every `Store` handle is dropped and the queue is empty.
    while let Some(first) = commands.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        execute_batch(&mut connection, &mut batch, notifier, &limits);
    }
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
}

/// An answer computed inside the transaction, sent once it commits.
type Answer = Box<dyn FnOnce(Result<(), &StoreError>)>;

fn execute_batch(
    connection: &mut Connection,
    batch: &mut Vec<Command>,
    notifier: &Notifier,
    limits: &StoreLimits,
) {
    let transaction = match connection.transaction() {
        Ok(transaction) => transaction,
        Err(e) => {
            let error = StoreError::from(e);
            tracing::error!("starting a transaction: {error}");
            for command in batch.drain(..) {
                fail(command, &error);
            }
            return;
        }
    };
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    // Queues that received messages in this batch, woken after the commit.
    let mut touched: Vec<IdentityKey> = Vec::new();
    let mut commands = batch.drain(..);
    for command in commands.by_ref() {
        answers.push(apply(&transaction, command, limits, &mut touched));
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
        return;
    }
    match transaction.commit() {
        Ok(()) => {
            answers.into_iter().for_each(|answer| answer(Ok(())));
            notifier.notify(&touched);
        }
        Err(e) => {
            let error = StoreError::from(e);
            tracing::error!("committing a batch of {} commands: {error}", answers.len());
            answers.into_iter().for_each(|answer| answer(Err(&error)));
        }
    }
}

/// Runs one command inside its own savepoint and returns how to answer it;
/// adds the queues it wrote to `touched`.
fn apply(db: &Connection, command: Command, limits: &StoreLimits, touched: &mut Vec<IdentityKey>) -> Answer {
    match command {
        Command::UploadKeyPackages {
            identity,
            packages,
            reply,
        } => answer(
            reply,
            in_savepoint(db, |db| {
                for package in &packages {
                    queries::insert_key_package(db, &identity, package)?;
                }
                Ok(())
            }),
        ),
        Command::CountKeyPackages { identity, reply } => answer(
            reply,
            in_savepoint(db, |db| Ok(queries::count_key_packages(db, &identity)?)),
        ),
        Command::TakeKeyPackage { identity, reply } => answer(
            reply,
            in_savepoint(db, |db| Ok(queries::take_key_package(db, &identity)?)),
        ),
        Command::EnqueueBatch {
            sender,
            envelopes,
            reply,
        } => {
            let outcome = in_savepoint(db, |db| {
                queries::insert_envelopes(db, &sender, &envelopes, limits)
            });
            if outcome.is_ok() {
                touched.extend(
                    envelopes
                        .iter()
                        .flat_map(|envelope| envelope.recipients.iter().copied()),
                );
            }
            answer(reply, outcome)
        }
        Command::PublishCommit {
            sender,
            publication,
            reply,
        } => {
            let outcome = in_savepoint(db, |db| {
                queries::publish_commit(db, &sender, &publication, limits)
            });
            if outcome.is_ok() {
                touched.extend(publication.commit.recipients.iter().copied());
                if let Some(welcome) = &publication.welcome {
                    touched.extend(welcome.recipients.iter().copied());
                }
            }
            answer(reply, outcome)
        }
        Command::Ack {
            recipient,
            up_to_seq,
            reply,
        } => answer(
            reply,
            in_savepoint(db, |db| Ok(queries::delete_through(db, &recipient, up_to_seq)?)),
        ),
        Command::Purge { older_than, reply } => {
            answer(reply, in_savepoint(db, |db| Ok(queries::purge(db, older_than)?)))
        }
        Command::Drain { recipient, reply } => answer(
            reply,
            in_savepoint(db, |db| Ok(queries::drain_messages(db, &recipient)?)),
        ),
    }
}

fn answer<T: 'static>(reply: super::Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |committed| {
        let outcome = match committed {
            Ok(()) => result,
            // The batch did not commit: whatever this command did is gone.
            Err(e) => Err(StoreError::Transaction(e.to_string())),
        };
        // The caller may have gone away (connection closed); nothing to do.
        let _ = reply.send(outcome);
    })
}

fn in_savepoint<T>(
    db: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Cached statements: a savepoint per command is on the hot path.
    db.prepare_cached("SAVEPOINT command")?.execute([])?;
    match work(db) {
        Ok(value) => {
            db.prepare_cached("RELEASE command")?.execute([])?;
            Ok(value)
        }
        Err(e) => {
            if let Err(rollback) = db.execute_batch("ROLLBACK TO command; RELEASE command") {
                tracing::error!("rolling back a failed command: {rollback}");
            }
            Err(e)
        }
    }
}

fn fail(command: Command, error: &StoreError) {
    let error = || StoreError::Transaction(error.to_string());
    match command {
        Command::UploadKeyPackages { reply, .. }
        | Command::EnqueueBatch { reply, .. }
        | Command::PublishCommit { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::TakeKeyPackage { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::CountKeyPackages { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::Drain { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::Ack { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::Purge { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
    }
}
