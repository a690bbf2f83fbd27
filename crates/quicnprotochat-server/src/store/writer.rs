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
use super::sqlite::SqliteStorage;
use super::{Command, Limits, Notifier, StoreError, unix_now};
use crate::delivery::rules;

/// Most commands committed together; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;

pub(super) fn spawn(
    connection: Connection,
    commands: mpsc::Receiver<Command>,
    notifier: Arc<Notifier>,
    limits: Limits,
    side: SideThreads,
) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || write_loop(connection, commands, &notifier, limits, side))
        .map_err(StoreError::Thread)
}

fn write_loop(
    mut connection: Connection,
    mut commands: mpsc::Receiver<Command>,
    notifier: &Notifier,
    limits: Limits,
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
    limits: &Limits,
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
fn apply(db: &Connection, command: Command, limits: &Limits, touched: &mut Vec<IdentityKey>) -> Answer {
    let now = unix_now();
    match command {
        Command::UploadKeyPackages {
            identity,
            packages,
            reply,
        } => answer(
            reply,
            decide(db, |s| {
                rules::upload_key_packages(s, &identity, &packages, limits, now)
            }),
        ),
        Command::CountKeyPackages { identity, reply } => {
            answer(reply, run(db, |s| rules::count_key_packages(s, &identity, now)))
        }
        Command::TakeKeyPackage {
            identity,
            ordinary,
            reply,
        } => answer(
            reply,
            run(db, |s| rules::take_key_package(s, &identity, ordinary, now)),
        ),
        Command::EnqueueBatch {
            sender,
            envelopes,
            reply,
        } => {
            let outcome = decide(db, |s| rules::enqueue(s, &sender, &envelopes, limits, now));
            if matches!(outcome, Ok(Ok(()))) {
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
            let outcome = decide(db, |s| {
                rules::publish_commit(s, &sender, &publication, limits, now)
            });
            if matches!(outcome, Ok(Ok(()))) {
                touched.extend(publication.commit.recipients.iter().copied());
                if let Some(welcome) = &publication.welcome {
                    touched.extend(welcome.recipients.iter().copied());
                }
            }
            answer(reply, outcome)
        }
        Command::PublishProposal {
            sender,
            publication,
            reply,
        } => {
            let outcome = decide(db, |s| {
                rules::publish_proposal(s, &sender, &publication, limits, now)
            });
            if matches!(outcome, Ok(Ok(()))) {
                touched.extend(publication.proposal.recipients.iter().copied());
            }
            answer(reply, outcome)
        }
        Command::Ack {
            recipient,
            up_to,
            reply,
        } => answer(reply, run(db, |s| rules::ack(s, &recipient, up_to))),
        Command::Purge { older_than, reply } => answer(reply, run(db, |s| rules::purge(s, older_than, now))),
        Command::PurgeIdleGroups { before, reply } => {
            answer(reply, run(db, |s| rules::purge_idle_groups(s, before)))
        }
        Command::Drain { recipient, reply } => answer(reply, run(db, |s| rules::drain(s, &recipient))),
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

/// Runs one command that may refuse inside its own savepoint, which is
/// undone if the command refuses or fails: nothing of a refused call stays.
fn decide<T, R>(
    db: &Connection,
    work: impl FnOnce(&mut SqliteStorage<'_>) -> rusqlite::Result<Result<T, R>>,
) -> Result<Result<T, R>, StoreError> {
    // Cached statements: a savepoint per command is on the hot path.
    db.prepare_cached("SAVEPOINT command")?.execute([])?;
    let outcome = work(&mut SqliteStorage::new(db));
    if matches!(outcome, Ok(Ok(_))) {
        db.prepare_cached("RELEASE command")?.execute([])?;
    } else if let Err(rollback) = db.execute_batch("ROLLBACK TO command; RELEASE command") {
        tracing::error!("rolling back a refused or failed command: {rollback}");
    }
    Ok(outcome?)
}

/// [`decide`] for a command that never refuses.
fn run<T>(
    db: &Connection,
    work: impl FnOnce(&mut SqliteStorage<'_>) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    let Ok(value) = decide(db, |storage| work(storage).map(Ok::<T, std::convert::Infallible>))?;
    Ok(value)
}

/// Answers a command that never ran because its batch failed.
fn fail(command: Command, error: &StoreError) {
    fn send<T>(reply: super::Reply<T>, error: &StoreError) {
        // The caller may have gone away; nothing to do then.
        let _ = reply.send(Err(StoreError::Transaction(error.to_string())));
    }
    match command {
        Command::UploadKeyPackages { reply, .. } => send(reply, error),
        Command::EnqueueBatch { reply, .. } => send(reply, error),
        Command::PublishCommit { reply, .. } => send(reply, error),
        Command::PublishProposal { reply, .. } => send(reply, error),
        Command::TakeKeyPackage { reply, .. } => send(reply, error),
        Command::CountKeyPackages { reply, .. } => send(reply, error),
        Command::Drain { reply, .. } => send(reply, error),
        Command::Ack { reply, .. } => send(reply, error),
        Command::Purge { reply, .. } => send(reply, error),
        Command::PurgeIdleGroups { reply, .. } => send(reply, error),
    }
}
