//! The SQLite backend: one node per file, a writer that commits batches of
//! commands as one transaction (group commit), a sync thread that makes
//! them durable before they are answered, and side threads for reads and
//! WAL checkpoints.
//!
//! # Layout
//! - `lock` — one node per SQLite file: a lock file held for the node's
//!   life.
//! - `migrations` — numbered schema migrations, tracked in `PRAGMA user_version`.
//! - `storage` — the [`Storage`](crate::delivery::Storage) of one SQLite
//!   connection: the node's data statements (migrations and pragmas excepted).
//! - `writer` — the writer and its batching loop.
//! - `sync` — makes committed batches durable, then answers them and lets
//!   reads see them.
//! - `readers` — the reader thread and background WAL checkpoints.

mod lock;
mod migrations;
mod readers;
mod storage;
mod sync;
mod writer;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

pub use migrations::SCHEMA_VERSION;
pub(super) use sync::Watermark;

use super::{Durability, Limits, Notifier, QUEUE_CAPACITY, Store, StoreCloser, StoreError};

/// Opens (creating if needed) and migrates the database at `path`, and
/// starts its writer on a thread of its own; see [`Store::open_with`].
pub(super) fn open_with(
    path: &Path,
    limits: Limits,
    durability: Durability,
) -> Result<(Store, StoreCloser), StoreError> {
    let (store, writer) = prepare(path, limits, durability)?;
    let finished = writer.finished.subscribe();
    let failure = Some(writer.syncer.failure());
    let thread = writer::spawn(writer)?;
    Ok((
        store,
        StoreCloser {
            thread: Some(thread),
            finished,
            failure,
        },
    ))
}

/// [`open_with`], with the writer a task of `runtime`; see
/// [`Store::open_on`].
pub(super) fn open_on(
    path: &Path,
    limits: Limits,
    durability: Durability,
    runtime: &tokio::runtime::Handle,
) -> Result<(Store, StoreCloser), StoreError> {
    let (store, writer) = prepare(path, limits, durability)?;
    let finished = writer.finished.subscribe();
    let failure = Some(writer.syncer.failure());
    writer::spawn_on(writer, runtime);
    Ok((
        store,
        StoreCloser {
            thread: None,
            finished,
            failure,
        },
    ))
}

fn prepare(
    path: &Path,
    limits: Limits,
    durability: Durability,
) -> Result<(Store, writer::Writer), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Before anything touches the file: a second node must not even
    // migrate it.
    let lock = lock::NodeLock::acquire(path)?;
    let (connection, instance_id) = migrations::open(path, durability)?;
    // Commits append to the WAL without waiting for the disk; the
    // syncer makes them durable before they are answered (`sync`).
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    // Each command runs in a savepoint, which keeps the old copy of
    // every page it changes in a statement journal. On a temp file (the
    // default once it passes 64 KiB) that is a `pwrite` per page per
    // command, never truncated until the batch ends: at 64 busy clients
    // that was a quarter of the node's CPU. In memory it is a copy,
    // dropped at each `RELEASE`.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    let (commands, receiver) = mpsc::channel(QUEUE_CAPACITY);
    let (reads, read_receiver) = mpsc::channel(QUEUE_CAPACITY);
    let side = readers::SideThreads::spawn(path, read_receiver)?;
    let notifier = Notifier::new();
    let watermark = Arc::new(sync::Watermark::new(writer::last_seq(&connection)?));
    let syncer = sync::Syncer::start(
        path,
        durability == Durability::Full,
        notifier.clone(),
        watermark.clone(),
    )?;
    let store = Store {
        watermark: Some(watermark),
        commands,
        reads,
        instance_id,
        notifier,
    };
    let writer = writer::Writer {
        connection,
        commands: receiver,
        syncer,
        notifier: store.notifier.clone(),
        limits,
        side,
        lock,
        finished: watch::Sender::new(false),
    };
    Ok((store, writer))
}
