//! One command's rules inside a batch's transaction, for every backend: a
//! backend opens the transaction, runs each command through [`apply`], and
//! commits; how a command is isolated from the others (a savepoint) is the
//! backend's [`Transact`].

use quicnprotochat_core::IdentityKey;

use super::{Command, Limits, StoreError, unix_now};
use crate::delivery::{Storage, key_backups, rules};

/// An answer computed inside the transaction, sent once it is committed
/// (and, where the backend needs it, synced).
pub(super) type Answer = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// A backend's [`Storage`] inside an open transaction, able to run one
/// command so that nothing of it stays if it refuses or fails.
pub(super) trait Transact: Storage<Error: Into<StoreError>> + Sized {
    /// Runs `work` in a savepoint that is undone if it refuses or fails. A
    /// backend may run `work` again after a transient conflict with another
    /// transaction (a node of its own), so it must only read and write
    /// through the storage it is given.
    fn decide<T, R>(
        &mut self,
        work: impl FnMut(&mut Self) -> Result<Result<T, R>, Self::Error>,
    ) -> Result<Result<T, R>, StoreError>;

    /// [`Transact::decide`] for a command that never refuses.
    fn run<T>(&mut self, mut work: impl FnMut(&mut Self) -> Result<T, Self::Error>) -> Result<T, StoreError> {
        let Ok(value) = self.decide(|storage| work(storage).map(Ok::<T, std::convert::Infallible>))?;
        Ok(value)
    }
}

/// Runs one command inside its own savepoint and returns how to answer it;
/// adds the queues it wrote to `touched`.
pub(super) fn apply<D: Transact>(
    db: &mut D,
    command: Command,
    limits: &Limits,
    touched: &mut Vec<IdentityKey>,
) -> Answer {
    let now = unix_now();
    match command {
        Command::UploadKeyPackages {
            identity,
            packages,
            reply,
        } => answer(
            reply,
            db.decide(|s| rules::upload_key_packages(s, &identity, &packages, limits, now)),
        ),
        Command::CountKeyPackages {
            identity,
            suite,
            reply,
        } => answer(
            reply,
            db.run(|s| rules::count_key_packages(s, &identity, suite, now)),
        ),
        Command::TakeKeyPackage {
            identity,
            suite,
            ordinary,
            reply,
        } => answer(
            reply,
            db.run(|s| rules::take_key_package(s, &identity, suite, ordinary, now)),
        ),
        Command::UploadDeviceList { caller, list, reply } => answer(
            reply,
            db.decide(|s| rules::upload_device_list(s, &caller, &list, now)),
        ),
        Command::PutKeyBackup {
            secret,
            sealed,
            reply,
        } => answer(
            reply,
            db.decide(|s| key_backups::put_key_backup(s, &secret.0, &sealed, now)),
        ),
        Command::EnqueueBatch {
            sender,
            envelopes,
            state_keys,
            reply,
        } => {
            let outcome = db.decide(|s| rules::enqueue(s, &sender, &envelopes, &state_keys, limits, now));
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
            let outcome = db.decide(|s| rules::publish_commit(s, &sender, &publication, limits, now));
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
            let outcome = db.decide(|s| rules::publish_proposal(s, &sender, &publication, limits, now));
            if matches!(outcome, Ok(Ok(()))) {
                touched.extend(publication.proposal.recipients.iter().copied());
            }
            answer(reply, outcome)
        }
        Command::Ack {
            recipient,
            up_to,
            reply,
        } => answer(reply, db.run(|s| rules::ack(s, &recipient, up_to))),
        Command::Purge { older_than, reply } => answer(reply, db.run(|s| rules::purge(s, older_than, now))),
        Command::PurgeIdleGroups { before, reply } => {
            answer(reply, db.run(|s| rules::purge_idle_groups(s, before)))
        }
        Command::Drain { recipient, reply } => answer(reply, db.run(|s| rules::drain(s, &recipient))),
    }
}

fn answer<T: Send + 'static>(reply: super::Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |committed| {
        let outcome = match committed {
            Ok(()) => result,
            // Committed, but maybe not on the disk: nobody can tell.
            Err(StoreError::Sync(e)) => Err(StoreError::NotDurable(e.to_string())),
            // The database went away: while committing, nobody can tell
            // whether the batch took effect.
            Err(StoreError::Unavailable(e)) => Err(StoreError::Unavailable(e.clone())),
            // The batch did not commit: whatever this command did is gone.
            Err(e) => Err(StoreError::Transaction(e.to_string())),
        };
        // The caller may have gone away (connection closed); nothing to do.
        let _ = reply.send(outcome);
    })
}

/// Answers a command that never ran because its batch failed.
pub(super) fn fail(command: Command, error: &StoreError) {
    fn send<T>(reply: super::Reply<T>, error: &StoreError) {
        // The caller may have gone away; nothing to do then.
        let error = match error {
            StoreError::Unavailable(e) => StoreError::Unavailable(e.clone()),
            other => StoreError::Transaction(other.to_string()),
        };
        let _ = reply.send(Err(error));
    }
    match command {
        Command::UploadKeyPackages { reply, .. } => send(reply, error),
        Command::EnqueueBatch { reply, .. } => send(reply, error),
        Command::PublishCommit { reply, .. } => send(reply, error),
        Command::PublishProposal { reply, .. } => send(reply, error),
        Command::TakeKeyPackage { reply, .. } => send(reply, error),
        Command::CountKeyPackages { reply, .. } => send(reply, error),
        Command::UploadDeviceList { reply, .. } => send(reply, error),
        Command::PutKeyBackup { reply, .. } => send(reply, error),
        Command::Drain { reply, .. } => send(reply, error),
        Command::Ack { reply, .. } => send(reply, error),
        Command::Purge { reply, .. } => send(reply, error),
        Command::PurgeIdleGroups { reply, .. } => send(reply, error),
    }
}
