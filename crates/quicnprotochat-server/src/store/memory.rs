//! The store over [`MemoryStorage`]: the same commands, rules and reads as
//! the database backends, with nothing kept past the process. It lets the
//! conformance suite hold the in-memory reference to the same contract as
//! SQLite and PostgreSQL, and tests open a store without a file.
//!
//! One thread applies commands one at a time (each is its own
//! "transaction": a refusal restores the snapshot taken before it), another
//! answers reads; both share the storage behind a mutex, so a read sees
//! every command answered before it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use quicnprotochat_core::IdentityKey;
use tokio::sync::{mpsc, watch};

use super::commands::{Transact, apply};
use super::reads::{Read, serve};
use super::{Command, Limits, Notifier, QUEUE_CAPACITY, Store, StoreCloser, StoreError};
use crate::delivery::MemoryStorage;

/// A database in memory: what stores opened on it keep, shared, so that a
/// store opened again (a "restart") finds what was committed before.
#[derive(Debug, Clone, Default)]
pub struct MemoryDatabase {
    storage: Arc<Mutex<MemoryStorage>>,
}

impl MemoryDatabase {
    /// Runs `work` on the stored data directly, outside any store: for
    /// tests that set up what an older node would have left.
    pub fn with<T>(&self, work: impl FnOnce(&mut MemoryStorage) -> T) -> T {
        work(&mut self.storage.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Transact for MemoryStorage {
    fn decide<T, R>(
        &mut self,
        mut work: impl FnMut(&mut Self) -> Result<Result<T, R>, Infallible>,
    ) -> Result<Result<T, R>, StoreError> {
        Ok(self.command(|storage| work(storage)))
    }
}

impl From<Infallible> for StoreError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// Opens a store on `database`; see [`Store::open_memory`].
pub(super) fn open(database: &MemoryDatabase, limits: Limits) -> Result<(Store, StoreCloser), StoreError> {
    let notifier = Notifier::new();
    let (commands, mut command_receiver) = mpsc::channel::<Command>(QUEUE_CAPACITY);
    let (reads, mut read_receiver) = mpsc::channel::<Read>(QUEUE_CAPACITY);
    let writer = {
        let (storage, notifier) = (database.storage.clone(), notifier.clone());
        spawn("store-memory-writer", move || {
            while let Some(command) = command_receiver.blocking_recv() {
                let mut touched: Vec<IdentityKey> = Vec::new();
                let answer = {
                    let mut storage = storage.lock().unwrap_or_else(PoisonError::into_inner);
                    apply(&mut *storage, command, &limits, &mut touched)
                };
                answer(Ok(()));
                touched.sort_unstable();
                touched.dedup();
                // Nothing carried: watchers read the queue (as after
                // another node's write).
                notifier.notify(&touched, &Default::default());
            }
        })?
    };
    let reader = {
        let storage = database.storage.clone();
        spawn("store-memory-reader", move || {
            while let Some(read) = read_receiver.blocking_recv() {
                serve(&mut *storage.lock().unwrap_or_else(PoisonError::into_inner), read);
            }
        })?
    };
    let (finished, finished_receiver) = watch::channel(false);
    let supervisor = spawn("store-memory", move || {
        // Both end once every `Store` handle is gone and their queues are
        // empty.
        for thread in [writer, reader] {
            if thread.join().is_err() {
                tracing::error!("an in-memory store thread panicked");
            }
        }
        finished.send_replace(true);
    })?;
    Ok((
        Store {
            watermark: None,
            commands,
            reads,
            instance_id: rand::random(),
            notifier,
        },
        StoreCloser {
            thread: Some(supervisor),
            finished: finished_receiver,
            failure: None,
        },
    ))
}

fn spawn(
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map_err(StoreError::Thread)
}
