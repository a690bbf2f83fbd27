//! The side connections: reads and WAL checkpoints, beside the writer.
//!
//! Reads do not go through the writer: in WAL mode a reader sees every
//! committed transaction without waiting for the writer's next batch, so a
//! push reaches its subscriber right after the enqueue is synced. Queue
//! reads (push, `fetchSince`, `fetchWait`), a group's GroupInfo or
//! Welcome tree (which may take tens of milliseconds to decode in a big
//! group) and device lists run on the reader thread, so that they hold no RPC thread;
//! [`serve`] answers them, for the PostgreSQL readers too. Checkpoints
//! (copying the WAL back into the database file, with an fsync) run here in
//! the background (`PASSIVE`: never blocking the writer or readers) rather
//! than inside whichever commit crosses SQLite's threshold, which would stall
//! every command of that batch.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use quicnprotochat_core::{GroupId, IdentityKey, QueuedMessage, Seq, SignedDeviceList};
use rusqlite::Connection;
use tokio::sync::mpsc;

use super::sqlite::SqliteStorage;
use super::{GroupState, Reply, StoreError};
use crate::delivery::{NotAMember, Storage, Totals, rules};

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// One read for the reader thread.
#[derive(Debug)]
pub(super) enum Read {
    MessagesAfter {
        recipient: IdentityKey,
        after: Seq,
        limit: usize,
        reply: Reply<Vec<QueuedMessage>>,
    },
    GroupInfo {
        group: GroupId,
        caller: IdentityKey,
        reply: Reply<Result<Option<GroupState>, NotAMember>>,
    },
    WelcomeTree {
        group: GroupId,
        epoch: u64,
        caller: IdentityKey,
        reply: Reply<Option<Vec<u8>>>,
    },
    DeviceLists {
        users: Vec<IdentityKey>,
        reply: Reply<Vec<SignedDeviceList>>,
    },
    Knows {
        identity: IdentityKey,
        reply: Reply<bool>,
    },
    Totals {
        reply: Reply<Totals>,
    },
}

/// The reader and checkpointer threads; the writer stops them before it
/// closes the database, so that its connection is the last one and closing
/// it checkpoints and removes the WAL.
#[derive(Debug)]
pub(super) struct SideThreads {
    reader: JoinHandle<()>,
    checkpointer: JoinHandle<()>,
    stop_checkpoints: std_mpsc::Sender<()>,
}

impl SideThreads {
    /// Opens the side connections to the (already migrated) database at
    /// `path` and starts their threads. The reader ends once every sender
    /// of `reads` is dropped.
    pub(super) fn spawn(path: &Path, reads: mpsc::Receiver<Read>) -> Result<SideThreads, StoreError> {
        let reader_connection = open_side(path)?;
        reader_connection.pragma_update(None, "query_only", true)?;
        // A long queue's rows lie on as many pages as it has messages once
        // the database outgrows the cache; 32 MiB of cache (default 2 MiB)
        // keeps the pages of recently written queues at hand.
        reader_connection.pragma_update(None, "cache_size", -32 * 1024)?;
        let checkpoint_connection = open_side(path)?;
        let reader = std::thread::Builder::new()
            .name("store-reader".into())
            .spawn(move || read_loop(&reader_connection, reads))
            .map_err(StoreError::Thread)?;
        let (stop_checkpoints, stop) = std_mpsc::channel();
        let checkpointer = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoint_connection, &stop))
            .map_err(StoreError::Thread)?;
        Ok(SideThreads {
            reader,
            checkpointer,
            stop_checkpoints,
        })
    }

    /// Waits for the reader to finish its reads and stops the checkpointer.
    pub(super) fn stop(self) {
        if self.reader.join().is_err() {
            tracing::error!("the store reader thread panicked");
        }
        drop(self.stop_checkpoints);
        if self.checkpointer.join().is_err() {
            tracing::error!("the store checkpoint thread panicked");
        }
    }
}

fn open_side(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open(path)?;
    // Readers wait only while SQLite recovers or restarts the WAL.
    connection.busy_timeout(Duration::from_secs(5))?;
    Ok(connection)
}

fn read_loop(db: &Connection, mut reads: mpsc::Receiver<Read>) {
    while let Some(read) = reads.blocking_recv() {
        serve(&mut SqliteStorage::new(db), read);
    }
}

/// Answers one read from `storage`, on any backend; true if the answer is
/// that the database is unavailable (the connection is worth making again).
pub(super) fn serve<S: Storage<Error: Into<StoreError>>>(storage: &mut S, read: Read) -> bool {
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
        Read::GroupInfo { group, caller, reply } => {
            answer(reply, rules::group_info(storage, &group, &caller))
        }
        Read::WelcomeTree {
            group,
            epoch,
            caller,
            reply,
        } => answer(reply, rules::welcome_tree(storage, &group, epoch, &caller)),
        Read::DeviceLists { users, reply } => answer(reply, rules::device_lists(storage, &users)),
        Read::Knows { identity, reply } => answer(reply, storage.knows(&identity)),
        Read::Totals { reply } => answer(reply, storage.totals()),
    }
}

impl Read {
    /// Answers a read that could not run with `error`.
    pub(super) fn fail(self, error: StoreError) {
        // The caller may have gone away; nothing to do then.
        match self {
            Read::MessagesAfter { reply, .. } => drop(reply.send(Err(error))),
            Read::GroupInfo { reply, .. } => drop(reply.send(Err(error))),
            Read::WelcomeTree { reply, .. } => drop(reply.send(Err(error))),
            Read::DeviceLists { reply, .. } => drop(reply.send(Err(error))),
            Read::Knows { reply, .. } => drop(reply.send(Err(error))),
            Read::Totals { reply } => drop(reply.send(Err(error))),
        }
    }
}

fn checkpoint_loop(db: &Connection, stop: &std_mpsc::Receiver<()>) {
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        let outcome = db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match outcome {
            Ok((frames, copied)) => tracing::trace!("checkpoint: {copied} of {frames} WAL frames copied"),
            Err(e) => tracing::warn!("background WAL checkpoint: {e}"),
        }
    }
}
