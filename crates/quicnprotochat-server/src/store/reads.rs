//! The reads a store answers beside its writer (queue reads, a group's
//! GroupInfo or Welcome tree, device lists, a device's key backup, whether
//! it knows an identity, totals), as requests to a reader, and [`serve`],
//! which answers one from any backend's [`Storage`]: SQLite's reader
//! thread, PostgreSQL's reader connections and the memory store all run
//! it.

use quicnprotochat_core::{EpochKey, GroupId, IdentityKey, QueuedMessage, Seq, SignedDeviceList, StateKey};

use super::{BackupSecret, GroupState, Reply, StoreError};
use crate::delivery::{NotAMember, Storage, Totals, key_backups, rules};

/// One read for the reader thread.
#[derive(Debug)]
pub(crate) enum Read {
    MessagesAfter {
        recipient: IdentityKey,
        after: Seq,
        limit: usize,
        reply: Reply<Vec<QueuedMessage>>,
    },
    GroupInfo {
        group: GroupId,
        key: StateKey,
        caller: IdentityKey,
        reply: Reply<Result<Option<GroupState>, NotAMember>>,
    },
    WelcomeTree {
        group: GroupId,
        epoch: u64,
        key: Option<EpochKey>,
        caller: IdentityKey,
        reply: Reply<Option<rules::ForJoiners>>,
    },
    DeviceLists {
        users: Vec<IdentityKey>,
        reply: Reply<Vec<SignedDeviceList>>,
    },
    KeyBackup {
        secret: BackupSecret,
        reply: Reply<Option<Vec<u8>>>,
    },
    Knows {
        identity: IdentityKey,
        reply: Reply<bool>,
    },
    Totals {
        reply: Reply<Totals>,
    },
}

/// Answers one read from `storage`, on any backend; true if the answer is
/// that the database is unavailable (the connection is worth making again).
pub(crate) fn serve<S: Storage<Error: Into<StoreError>>>(storage: &mut S, read: Read) -> bool {
    fn answer<T, E: Into<StoreError>>(reply: Reply<T>, result: Result<T, E>) -> bool {
        let result = result.map_err(Into::into);
        let unavailable = matches!(result, Err(StoreError::Unavailable(_)));
        // The caller may have gone away (its connection closed); nothing to
        // do then.
        let _ = reply.send(result);
        unavailable
    }
    match read {
        Read::MessagesAfter {
            recipient,
            after,
            limit,
            reply,
        } => answer(reply, rules::messages_after(storage, &recipient, after, limit)),
        Read::GroupInfo {
            group,
            key,
            caller,
            reply,
        } => answer(reply, rules::group_info(storage, &group, &key, &caller)),
        Read::WelcomeTree {
            group,
            epoch,
            key,
            caller,
            reply,
        } => answer(
            reply,
            rules::welcome_tree(storage, &group, epoch, key.as_ref(), &caller),
        ),
        Read::DeviceLists { users, reply } => answer(reply, rules::device_lists(storage, &users)),
        Read::KeyBackup { secret, reply } => answer(reply, key_backups::key_backup(storage, &secret.0)),
        Read::Knows { identity, reply } => answer(reply, storage.knows(&identity)),
        Read::Totals { reply } => answer(reply, storage.totals()),
    }
}

impl Read {
    /// Answers a read that could not run with `error`.
    pub(crate) fn fail(self, error: StoreError) {
        // The caller may have gone away; nothing to do then.
        match self {
            Read::MessagesAfter { reply, .. } => drop(reply.send(Err(error))),
            Read::GroupInfo { reply, .. } => drop(reply.send(Err(error))),
            Read::WelcomeTree { reply, .. } => drop(reply.send(Err(error))),
            Read::DeviceLists { reply, .. } => drop(reply.send(Err(error))),
            Read::KeyBackup { reply, .. } => drop(reply.send(Err(error))),
            Read::Knows { reply, .. } => drop(reply.send(Err(error))),
            Read::Totals { reply } => drop(reply.send(Err(error))),
        }
    }
}
