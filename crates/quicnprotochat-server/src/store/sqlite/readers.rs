//! The side connections: reads and WAL checkpoints, beside the writer.
//!
//! Reads do not go through the writer: in WAL mode a reader sees every
//! committed transaction without waiting for the writer's next batch, so a
//! push reaches its subscriber right after the enqueue is synced. Queue
//! reads (push, `fetchSince`, `fetchWait`), a group's GroupInfo or
//! Welcome tree (which may take tens of milliseconds to decode in a big
//! group) and device lists run on the reader thread, so that they hold no RPC thread;
//! `reads::serve` answers them, as it does for the other backends. Checkpoints
//! (copying the WAL back into the database file, with an fsync) run here in
//! the background (`PASSIVE`: never blocking the writer or readers) rather
//! than inside whichever commit crosses SQLite's threshold, which would stall
//! every command of that batch.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::storage::SqliteStorage;
use crate::store::StoreError;
use crate::store::reads::{Read, serve};

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// The reader and checkpointer threads; the writer stops them before it
/// closes the database, so that its connection is the last one and closing
/// it checkpoints and removes the WAL.
#[derive(Debug)]
pub(in crate::store) struct SideThreads {
    reader: JoinHandle<()>,
    checkpointer: JoinHandle<()>,
    stop_checkpoints: std_mpsc::Sender<()>,
}

impl SideThreads {
    /// Opens the side connections to the (already migrated) database at
    /// `path` and starts their threads. The reader ends once every sender
    /// of `reads` is dropped.
    pub(in crate::store) fn spawn(
        path: &Path,
        reads: mpsc::Receiver<Read>,
    ) -> Result<SideThreads, StoreError> {
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
    pub(in crate::store) fn stop(self) {
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
