//! Making commits durable apart from committing them.
//!
//! The writer commits with `PRAGMA synchronous = NORMAL`: `COMMIT` appends
//! the batch to the WAL with `pwrite` and returns without waiting for the
//! disk. The sync thread then syncs the WAL file (`fdatasync`), once for
//! every batch committed by then, and only after that answers the batches'
//! callers, wakes the queues they wrote and lets reads see their messages.
//! Meanwhile the writer commits the next batch.
//!
//! The sync never runs on the writer's thread, which is an RPC thread: an
//! `fdatasync` usually takes a fraction of a millisecond, but behind a
//! checkpoint writing out megabytes it took hundreds (the abuse test saw
//! 70–370 ms), and that thread would serve no call meanwhile.
//!
//! Why a sync of the WAL file makes a `NORMAL` commit as durable as a
//! `FULL` one: `FULL` differs only in syncing the WAL at each commit.
//! SQLite's recovery replays the WAL's frames up to the last complete
//! commit whose checksums hold, and a checkpoint syncs the WAL before it
//! copies frames into the database file (and syncs that after). So once the
//! WAL is synced, every commit in it survives a power cut. The WAL file
//! keeps its inode while any connection is open, and the node's connections
//! stay open until it closes.
//!
//! Reads see only messages whose commit is synced ([`Watermark`]): a
//! message is never pushed or fetched before its sender's enqueue is
//! answered, so a power cut cannot take back a message a recipient has.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use quicnprotochat_core::{IdentityKey, QueuedMessage, Seq};

use tokio::sync::watch;

use crate::store::{Notifier, StoreError};

/// The highest message sequence number whose commit is synced: reads show
/// messages up to it. Sequence numbers grow with every commit, so every
/// message at or below it is synced.
#[derive(Debug)]
pub(in crate::store) struct Watermark(AtomicI64);

impl Watermark {
    pub(in crate::store) fn new(synced: i64) -> Watermark {
        Watermark(AtomicI64::new(synced))
    }

    fn raise(&self, synced: i64) {
        self.0.fetch_max(synced, Ordering::AcqRel);
    }

    /// Drops the messages (sorted by sequence number) not yet synced.
    pub(in crate::store) fn hide_unsynced(&self, messages: &mut Vec<QueuedMessage>) {
        let synced = Seq::new(self.0.load(Ordering::Acquire).max(0) as u64);
        let visible = messages.partition_point(|message| message.seq <= synced);
        messages.truncate(visible);
    }
}

/// How a batch's callers are answered once it is durable.
pub(in crate::store) type Answers = Vec<Box<dyn FnOnce(Result<(), &StoreError>) + Send>>;

/// A committed batch waiting for its sync.
pub(in crate::store) struct Committed {
    pub(in crate::store) answers: Answers,
    /// Queues the batch wrote to, each once, woken once it is synced.
    pub(in crate::store) touched: Vec<IdentityKey>,
    /// The batch's messages for the watched queues among them, where they
    /// are few and small enough to hand to their waiters.
    pub(in crate::store) carried: HashMap<IdentityKey, Arc<[QueuedMessage]>>,
    /// The highest message sequence number committed so far.
    pub(in crate::store) last_seq: i64,
}

/// Syncs committed batches and then answers them; see the module docs.
pub(in crate::store) struct Syncer {
    wal: Arc<File>,
    /// `None` with `Durability::Normal`: commits are answered unsynced.
    jobs: Option<mpsc::Sender<Committed>>,
    /// Batches handed to the sync thread and not yet answered.
    in_flight: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the writer and the sync thread share.
struct Shared {
    notifier: Arc<Notifier>,
    watermark: Arc<Watermark>,
    /// The first failed sync, for good. After `fdatasync` fails, Linux may
    /// have dropped the WAL pages it could not write and the next sync
    /// "succeeds" without them, so nothing committed after can be called
    /// durable any more: the store stops writing and the node stops
    /// (PostgreSQL too stops on a failed fsync). A restart lets SQLite
    /// recover what the disk actually holds.
    failed: watch::Sender<Option<String>>,
}

impl Syncer {
    /// Opens the WAL of the database at `path` (the writer's connection
    /// holds it open) and, if `durable`, starts the sync thread. Syncs the
    /// WAL once: a node killed before may have left commits unsynced.
    pub(in crate::store) fn start(
        path: &Path,
        durable: bool,
        notifier: Arc<Notifier>,
        watermark: Arc<Watermark>,
    ) -> Result<Syncer, StoreError> {
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        // The writer's connection has opened (and so created) it by now.
        let wal = Arc::new(File::open(&wal_path).map_err(StoreError::Sync)?);
        wal.sync_data().map_err(StoreError::Sync)?;
        let shared = Arc::new(Shared {
            notifier,
            watermark,
            failed: watch::Sender::new(None),
        });
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (jobs, thread) = if durable {
            let (jobs, queue) = mpsc::channel();
            let (wal, shared, in_flight) = (wal.clone(), shared.clone(), in_flight.clone());
            let thread = std::thread::Builder::new()
                .name("store-sync".into())
                .spawn(move || sync_loop(&wal, &queue, &shared, &in_flight))
                .map_err(StoreError::Thread)?;
            (Some(jobs), Some(thread))
        } else {
            (None, None)
        };
        Ok(Syncer {
            wal,
            jobs,
            in_flight,
            shared,
            thread,
        })
    }

    /// Answers `batch` once it is durable. `needs_sync`: whether any of
    /// its commands must reach the disk before its answer (see
    /// `Command::needs_fsync`).
    pub(in crate::store) fn finish(&self, batch: Committed, needs_sync: bool) {
        let Some(jobs) = &self.jobs else {
            // Durability::Normal: the WAL is synced at checkpoints only.
            self.shared.complete(batch, Ok(()));
            return;
        };
        // Nothing syncing means every earlier batch is answered, so this
        // one may be answered now without getting ahead of them.
        if !needs_sync && self.in_flight.load(Ordering::Acquire) == 0 {
            self.shared.complete(batch, Ok(()));
            return;
        }
        // The sync thread syncs this batch (with whatever else is committed
        // meanwhile) while the writer goes on. A batch that needs no sync
        // queues too when one is under way, so that it is not answered, nor
        // shows messages, ahead of earlier ones.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(batch)) = jobs.send(batch) {
            // The sync thread is gone (it panicked): sync here instead.
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.sync_here(batch);
        }
    }

    /// Whether a sync has failed: nothing more may be written.
    pub(in crate::store) fn failed(&self) -> bool {
        self.shared.failed.borrow().is_some()
    }

    /// Turns to what failed once a sync has failed.
    pub(in crate::store) fn failure(&self) -> watch::Receiver<Option<String>> {
        self.shared.failed.subscribe()
    }

    fn sync_here(&self, batch: Committed) {
        let synced = self.wal.sync_data().map_err(StoreError::Sync);
        self.shared.complete(batch, synced.as_ref().map(|_| ()));
    }

    /// Answers what is queued and stops the sync thread.
    pub(in crate::store) fn stop(mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the store sync thread panicked");
        }
    }
}

impl Shared {
    /// Publishes a synced (or failed) batch: reads may show its messages,
    /// its queues' waiters wake, its callers get their answers.
    fn complete(&self, batch: Committed, synced: Result<(), &StoreError>) {
        let earlier;
        let synced = match synced {
            Err(error) => {
                self.failed.send_if_modified(|failed| {
                    let first = failed.is_none();
                    if first {
                        *failed = Some(error.to_string());
                    }
                    first
                });
                Err(error)
            }
            // Once one sync failed, no later one proves anything.
            Ok(()) => match self.failed.borrow().as_deref() {
                None => Ok(()),
                Some(failed) => {
                    earlier =
                        StoreError::Sync(std::io::Error::other(format!("an earlier sync failed: {failed}")));
                    Err(&earlier)
                }
            },
        };
        match synced {
            Ok(()) => {
                self.watermark.raise(batch.last_seq);
                // Wake the waiters first: a caller that has its answer
                // knows the recipients' pushes are under way.
                self.notifier.notify(&batch.touched, &batch.carried);
                batch.answers.into_iter().for_each(|answer| answer(Ok(())));
            }
            Err(error) => {
                tracing::error!("syncing the WAL: {error}");
                batch.answers.into_iter().for_each(|answer| answer(Err(error)));
            }
        }
    }
}

fn sync_loop(wal: &File, queue: &mpsc::Receiver<Committed>, shared: &Shared, in_flight: &AtomicUsize) {
    while let Ok(first) = queue.recv() {
        // One sync for every batch committed by now.
        let mut batches = vec![first];
        batches.extend(queue.try_iter());
        let synced = wal.sync_data().map_err(StoreError::Sync);
        let count = batches.len();
        for batch in batches {
            shared.complete(batch, synced.as_ref().map(|_| ()));
        }
        in_flight.fetch_sub(count, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(seqs: &[u64]) -> Vec<QueuedMessage> {
        seqs.iter()
            .map(|seq| QueuedMessage {
                seq: Seq::new(*seq),
                payload: vec![1],
            })
            .collect()
    }

    /// A batch answering into `answers`, its last message `last_seq`.
    fn batch(last_seq: i64, answers: &std::sync::Arc<std::sync::Mutex<Vec<bool>>>) -> Committed {
        let answers = answers.clone();
        Committed {
            answers: vec![Box::new(move |synced| {
                answers.lock().unwrap().push(synced.is_ok())
            })],
            touched: Vec::new(),
            carried: HashMap::new(),
            last_seq,
        }
    }

    #[test]
    fn after_one_failed_sync_no_batch_is_answered_durable_nor_shown() {
        let shared = Shared {
            notifier: Notifier::new(),
            watermark: Arc::new(Watermark::new(0)),
            failed: watch::Sender::new(None),
        };
        let answers = Arc::default();
        shared.complete(batch(1, &answers), Ok(()));
        let failure = StoreError::Sync(std::io::Error::other("EIO"));
        shared.complete(batch(2, &answers), Err(&failure));
        // The next sync "succeeds": the pages it lost are not in it.
        shared.complete(batch(3, &answers), Ok(()));
        assert_eq!(*answers.lock().unwrap(), [true, false, false]);
        assert!(
            shared
                .failed
                .borrow()
                .as_deref()
                .is_some_and(|f| f.contains("EIO"))
        );
        let mut read = messages(&[1, 2, 3]);
        shared.watermark.hide_unsynced(&mut read);
        assert_eq!(read.len(), 1, "only what was synced before the failure shows");
    }

    #[test]
    fn reads_show_messages_up_to_the_watermark_and_it_never_goes_back() {
        let watermark = Watermark::new(3);
        let mut read = messages(&[1, 3, 4, 7]);
        watermark.hide_unsynced(&mut read);
        assert_eq!(read.iter().map(|m| m.seq.get()).collect::<Vec<_>>(), [1, 3]);
        watermark.raise(7);
        // Once shown, a message stays shown.
        watermark.raise(4);
        let mut read = messages(&[4, 7, 9]);
        watermark.hide_unsynced(&mut read);
        assert_eq!(read.iter().map(|m| m.seq.get()).collect::<Vec<_>>(), [4, 7]);
    }
}
