//! The node's durable state: KeyPackages, device lists, devices' key
//! backups and message queues in SQLite (module `sqlite`), or in
//! PostgreSQL shared by several nodes ([`Store::open_postgres`], module
//! `postgres`), or in memory for tests.
//! The rules of what to store live in [`crate::delivery`]; this module runs
//! them against each backend through the same commands (`commands`) and
//! reads (`reads`), behind one [`Store`] handle.
//!
//! A backend's writer owns the write connection. RPC tasks send it
//! [`Command`]s and await the answer. The writer takes every command that
//! is waiting, runs them all in one transaction (each inside its own
//! savepoint, so one failing command does not undo the others), commits,
//! and answers them only once the commit is durable: many concurrent
//! enqueues share one commit and one sync ("group commit"), and a success
//! answer always means the data is committed and durable. The node runs
//! SQLite's writer on its first RPC thread ([`Store::open_on`]); tests and
//! tools give it a thread of its own ([`Store::open_with`]).
//!
//! # Layout
//! - `commands` — one command's rules inside a batch's transaction, for
//!   every backend.
//! - `reads` — the reads answered beside the writer, for every backend.
//! - `notifier` — wakes push subscriptions and long polls after a commit.
//! - `sqlite` — the SQLite backend: file lock, migrations, its `Storage`,
//!   the writer, the sync thread, the reader and checkpoint threads.
//! - `postgres` — the PostgreSQL backend: writer and reader connections,
//!   migrations, LISTEN/NOTIFY between nodes.
//! - `memory` — the store over the in-memory reference storage: the same
//!   commands and reads, no database.
//!
//! The behaviour any backend must show is checked by the conformance suite in
//! `tests/conformance/`, which `tests/store_memory.rs`, `tests/store_sqlite.rs`
//! and `tests/store_postgres.rs` run against each.

mod commands;
mod memory;
mod notifier;
mod postgres;
mod reads;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

use quicnprotochat_core::{
    EpochKey, GroupId, IdentityKey, KeyPackageStock, QueuedMessage, Seq, SignedDeviceList, StateKey, Suite,
};
use tokio::sync::{mpsc, oneshot, watch};

pub use quicnprotochat_proto::wire::{
    CommitPublication, Envelope, GroupState, ProposalPublication, ValidKeyPackage,
};

pub use crate::delivery::{
    BackupTooLarge, CommitRefusal, DeviceListRefusal, FETCH_BUDGET_BYTES, FETCH_MAX_MESSAGES, Limits,
    NotAMember, SendRefusal, TooManyKeyPackages, Totals,
};

pub use memory::MemoryDatabase;
pub use notifier::{Fresh, Notifier, QueueWatch};
pub use sqlite::SCHEMA_VERSION;

/// How many commands may wait for the writer before callers are made to wait.
const QUEUE_CAPACITY: usize = 8192;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer version of the node.
    #[error(
        "schema version {found} is newer than this node understands ({supported}); run a newer quicnprotochat-server"
    )]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// A migration failed (it was rolled back; earlier ones stay applied).
    #[error("{0}")]
    Migration(quicnprotochat_sqlite::MigrationError),
    /// The file is a SQLite database of some other application.
    #[error("not a quicnprotochat node database (application_id {0:#x}); pass another --db path")]
    ForeignDatabase(i64),
    /// The file is not a SQLite database at all.
    #[error("not a SQLite database; pass another --db path")]
    NotADatabase,
    /// The database directory could not be created.
    #[error("creating the database directory: {0}")]
    Io(#[from] std::io::Error),
    /// The writer thread could not be started.
    #[error("starting the database writer thread: {0}")]
    Thread(std::io::Error),
    /// SQLite's `quick_check` found damaged pages: the node refuses to serve
    /// from the file rather than answer with errors or wrong data.
    #[error(
        "the database is damaged (quick_check: {0}); the node serves nothing from it. Stop here, keep a copy of the file, then either restore a backup or recover what is readable: `sqlite3 DB .recover | sqlite3 RECOVERED` (needs free space about the database's size) and start the node with --db RECOVERED"
    )]
    Damaged(String),
    /// SQLite refused to use write-ahead logging for this file.
    #[error("SQLite refused WAL mode (journal_mode is {0}); put the database on a local file system")]
    NoWal(String),
    /// The transaction holding this command could not start or commit, so
    /// nothing of it was kept.
    #[error("transaction failed, nothing was stored: {0}")]
    Transaction(String),
    /// PostgreSQL refused a statement.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// The database server cannot be reached (stopped, restarting, network
    /// down). If it went away while a batch was committing, nobody can tell
    /// whether that batch took effect; a retry with the same message id is
    /// safe either way. The node keeps trying to reconnect.
    #[error("database unavailable, retry later: {0}")]
    Unavailable(String),
    /// The PostgreSQL URL cannot be parsed.
    #[error("bad PostgreSQL URL: {0}")]
    BadUrl(String),
    /// The PostgreSQL database holds tables of something else.
    #[error("not a quicnprotochat node database ({0}); pass an empty database or one a node created")]
    ForeignPostgres(String),
    /// The writer thread has stopped (the node is shutting down).
    #[error("the store is closed")]
    Closed,
    /// Syncing the WAL to the disk failed.
    #[error("syncing the database to disk: {0}")]
    Sync(std::io::Error),
    /// Another node (process `holder`) serves this SQLite file: two nodes
    /// on one file would split delivery between them.
    #[error(
        "another node is using this database (process {holder} holds {}); stop it, or give this node another --db",
        lock.display()
    )]
    InUse {
        /// The lock file beside the database.
        lock: std::path::PathBuf,
        /// The process id the holder wrote into it (empty if unreadable).
        holder: String,
    },
    /// The command was committed but syncing it to the disk failed: it may
    /// or may not survive a power cut. A retry with the same message id is
    /// safe.
    #[error("committed, but syncing to disk failed, so it may not survive a power cut: {0}")]
    NotDurable(String),
}

/// Where the node keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, created when missing: one node.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database (`postgres://…` or `postgresql://…`, libpq URL
    /// form) that any number of nodes share.
    Postgres(String),
}

impl Database {
    /// A PostgreSQL URL or else a SQLite path.
    pub fn parse(db: &str) -> Database {
        if postgres::is_url(db) {
            Database::Postgres(db.to_owned())
        } else {
            Database::Sqlite(db.into())
        }
    }
}

impl std::fmt::Display for Database {
    /// The path, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl From<std::path::PathBuf> for Database {
    fn from(path: std::path::PathBuf) -> Database {
        Database::Sqlite(path)
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// How hard a commit tries to survive failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: acknowledged data survives a power cut.
    #[default]
    Full,
    /// fsync at checkpoints only: acknowledged data survives a crash of the
    /// node process; the last commits may be lost in a power cut.
    Normal,
}

/// A handle to the store; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct Store {
    /// Reads show messages up to here: those whose commit is synced (SQLite;
    /// PostgreSQL answers a commit once it is durable).
    watermark: Option<Arc<sqlite::Watermark>>,
    commands: mpsc::Sender<Command>,
    reads: mpsc::Sender<reads::Read>,
    instance_id: [u8; 16],
    notifier: Arc<Notifier>,
}

/// Owns the writer; [`StoreCloser::close`] finishes queued work and closes
/// the database cleanly.
#[derive(Debug)]
pub struct StoreCloser {
    thread: Option<std::thread::JoinHandle<()>>,
    finished: watch::Receiver<bool>,
    /// SQLite's: turns to what failed once the WAL could not be synced.
    failure: Option<watch::Receiver<Option<String>>>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`, and
    /// starts its writer thread, with default limits.
    pub fn open(path: &Path) -> Result<(Store, StoreCloser), StoreError> {
        Self::open_with(path, Limits::default(), Durability::default())
    }

    /// [`Self::open`] with the given limits and durability.
    pub fn open_with(
        path: &Path,
        limits: Limits,
        durability: Durability,
    ) -> Result<(Store, StoreCloser), StoreError> {
        sqlite::open_with(path, limits, durability)
    }

    /// [`Self::open_with`], but the writer runs as a task of `runtime` (a
    /// current-thread runtime) instead of on a thread of its own: the node
    /// puts it on its first RPC thread, so that calls served there reach
    /// the writer without waking another thread. That
    /// thread must keep running its runtime until [`StoreCloser::finished`]
    /// says the writer is done.
    pub fn open_on(
        path: &Path,
        limits: Limits,
        durability: Durability,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(Store, StoreCloser), StoreError> {
        sqlite::open_on(path, limits, durability, runtime)
    }

    /// Opens the PostgreSQL database at `url` (`postgres://…`), which must
    /// exist: creates or migrates the node's tables, and starts the
    /// connections. Any number of nodes may open the same database.
    pub fn open_postgres(url: &str, limits: Limits) -> Result<(Store, StoreCloser), StoreError> {
        postgres::open(url, limits)
    }

    /// Opens a store on `database`, in memory: the rules and reads of the
    /// other backends with nothing written anywhere (tests; the reference
    /// the conformance suite holds the databases to).
    pub fn open_memory(
        database: &MemoryDatabase,
        limits: Limits,
    ) -> Result<(Store, StoreCloser), StoreError> {
        memory::open(database, limits)
    }

    /// Opens `db`: a SQLite file with its writer on `runtime` (see
    /// [`Self::open_on`]), or a PostgreSQL database.
    pub fn open_database(
        db: &Database,
        limits: Limits,
        durability: Durability,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(Store, StoreCloser), StoreError> {
        match db {
            Database::Sqlite(path) => Self::open_on(path, limits, durability, runtime),
            Database::Postgres(url) => Self::open_postgres(url, limits),
        }
    }

    /// Deletes messages and message ids older than `older_than` (Unix
    /// seconds) and expired KeyPackages; returns how many messages went.
    pub async fn purge(&self, older_than: i64) -> Result<usize, StoreError> {
        self.call(|reply| Command::Purge { older_than, reply }).await
    }

    /// Forgets the public views of groups unchanged since before `before`
    /// (Unix seconds); their epochs stay. Returns how many.
    pub async fn purge_idle_groups(&self, before: i64) -> Result<usize, StoreError> {
        self.call(|reply| Command::PurgeIdleGroups { before, reply })
            .await
    }

    /// Watchers of queues, woken after each commit that adds to them.
    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.notifier
    }

    /// 16 random bytes naming this database, created with it.
    pub fn instance_id(&self) -> [u8; 16] {
        self.instance_id
    }

    /// Stores validated KeyPackages of `identity`, all or none; none if the
    /// identity would hold more than the limit of one suite's KeyPackages.
    pub async fn upload_key_packages(
        &self,
        identity: IdentityKey,
        packages: Vec<ValidKeyPackage>,
    ) -> Result<Result<(), TooManyKeyPackages>, StoreError> {
        self.call(|reply| Command::UploadKeyPackages {
            identity,
            packages,
            reply,
        })
        .await
    }

    /// How many unexpired ordinary KeyPackages `identity` has in `suite`,
    /// and whether it has an unexpired last-resort one of that suite.
    pub async fn count_key_packages(
        &self,
        identity: IdentityKey,
        suite: Suite,
    ) -> Result<KeyPackageStock, StoreError> {
        self.call(|reply| Command::CountKeyPackages {
            identity,
            suite,
            reply,
        })
        .await
    }

    /// Takes a KeyPackage of `identity` in `suite`: the oldest unexpired
    /// ordinary one (deleted) if `ordinary`, else (or when none is left)
    /// the newest unexpired last-resort one (kept).
    pub async fn take_key_package(
        &self,
        identity: IdentityKey,
        suite: Suite,
        ordinary: bool,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.call(|reply| Command::TakeKeyPackage {
            identity,
            suite,
            ordinary,
            reply,
        })
        .await
    }

    /// Stores `list`, uploaded by `caller`, as its user's device list if it
    /// is signed by the user key, `caller` may replace the user's list, and
    /// it moves the list forward; see
    /// [`crate::delivery::rules::upload_device_list`]. Answered once the
    /// list is durably stored.
    pub async fn upload_device_list(
        &self,
        caller: IdentityKey,
        list: SignedDeviceList,
    ) -> Result<Result<(), DeviceListRefusal>, StoreError> {
        self.call(|reply| Command::UploadDeviceList { caller, list, reply })
            .await
    }

    /// The stored device lists of `users`, in the order asked, leaving out
    /// users without one. Runs on the reader connection, so it never waits
    /// for the writer.
    pub async fn device_lists(&self, users: Vec<IdentityKey>) -> Result<Vec<SignedDeviceList>, StoreError> {
        ask(&self.reads, |reply| reads::Read::DeviceLists { users, reply }).await
    }

    /// Stores `sealed` as the key backup of the device presenting
    /// `secret`, replacing its earlier one, unless it is larger than
    /// [`crate::delivery::MAX_KEY_BACKUP_BYTES`]; see
    /// [`crate::delivery::key_backups`]. Answered once the backup is
    /// durably stored.
    pub async fn put_key_backup(
        &self,
        secret: [u8; 32],
        sealed: Vec<u8>,
    ) -> Result<Result<(), BackupTooLarge>, StoreError> {
        self.call(|reply| Command::PutKeyBackup {
            secret: BackupSecret(secret),
            sealed,
            reply,
        })
        .await
    }

    /// The key backup the device presenting `secret` stored last, if any.
    /// Runs on the reader connection, so it never waits for the writer.
    pub async fn key_backup(&self, secret: [u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        ask(&self.reads, |reply| reads::Read::KeyBackup {
            secret: BackupSecret(secret),
            reply,
        })
        .await
    }

    /// Appends `payload` to the queue of `recipient`, unless `sender` already
    /// used `message_id`.
    pub async fn enqueue(
        &self,
        sender: IdentityKey,
        recipient: IdentityKey,
        payload: Vec<u8>,
        message_id: Option<Vec<u8>>,
    ) -> Result<Result<(), SendRefusal>, StoreError> {
        let envelopes = vec![Envelope {
            recipients: vec![recipient],
            payload,
            message_id,
        }];
        self.enqueue_batch(sender, envelopes).await
    }

    /// Appends each payload to the queue of each of its recipients, all in
    /// one savepoint: either every message is committed or none is (a
    /// refusal, or an error). Envelopes whose message id `sender` already
    /// used are skipped.
    pub async fn enqueue_batch(
        &self,
        sender: IdentityKey,
        envelopes: Vec<Envelope>,
    ) -> Result<Result<(), SendRefusal>, StoreError> {
        self.enqueue_batch_with_keys(sender, envelopes, Vec::new()).await
    }

    /// [`Self::enqueue_batch`], with the state keys of the groups the
    /// messages belong to: a member that presents one is told when its
    /// message is from an epoch its group has left.
    pub async fn enqueue_batch_with_keys(
        &self,
        sender: IdentityKey,
        envelopes: Vec<Envelope>,
        state_keys: Vec<StateKey>,
    ) -> Result<Result<(), SendRefusal>, StoreError> {
        self.call(|reply| Command::EnqueueBatch {
            sender,
            envelopes,
            state_keys,
            reply,
        })
        .await
    }

    /// Publishes a group change if it is the first Commit for its group and
    /// epoch; otherwise stores nothing and says why.
    pub async fn publish_commit(
        &self,
        sender: IdentityKey,
        publication: CommitPublication,
    ) -> Result<Result<(), CommitRefusal>, StoreError> {
        self.call(|reply| Command::PublishCommit {
            sender,
            publication: Box::new(publication),
            reply,
        })
        .await
    }

    /// Publishes a standalone proposal if it is valid for its group's public
    /// view in its epoch; otherwise stores nothing and says why.
    pub async fn publish_proposal(
        &self,
        sender: IdentityKey,
        publication: ProposalPublication,
    ) -> Result<Result<(), CommitRefusal>, StoreError> {
        self.call(|reply| Command::PublishProposal {
            sender,
            publication,
            reply,
        })
        .await
    }

    /// The current GroupInfo and ratchet tree of `group` for `caller`; see
    /// [`crate::delivery::rules::group_info`]. Runs on the reader
    /// connection: decoding a big group's view must not hold the writer.
    pub async fn group_info(
        &self,
        group: GroupId,
        key: StateKey,
        caller: IdentityKey,
    ) -> Result<Result<Option<GroupState>, NotAMember>, StoreError> {
        ask(&self.reads, |reply| reads::Read::GroupInfo {
            group,
            key,
            caller,
            reply,
        })
        .await
    }

    /// The ratchet tree of `group` in `epoch` for `caller`, who joins with
    /// a Welcome of that epoch and presents its `key`; see
    /// [`crate::delivery::rules::welcome_tree`]. Runs on the reader
    /// connection.
    pub async fn welcome_tree(
        &self,
        group: GroupId,
        epoch: u64,
        key: Option<EpochKey>,
        caller: IdentityKey,
    ) -> Result<Option<crate::delivery::rules::ForJoiners>, StoreError> {
        ask(&self.reads, |reply| reads::Read::WelcomeTree {
            group,
            epoch,
            key,
            caller,
            reply,
        })
        .await
    }

    /// The committed messages of `recipient` after `after`, oldest first,
    /// without removing them: at most `limit` (0: the node's maximum) and
    /// within the fetch budget, and only those whose commit is synced. Runs
    /// on the reader connection, so it never waits for the writer.
    pub async fn messages_after(
        &self,
        recipient: IdentityKey,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        let mut messages = ask(&self.reads, |reply| reads::Read::MessagesAfter {
            recipient,
            after,
            limit,
            reply,
        })
        .await?;
        if let Some(watermark) = &self.watermark {
            watermark.hide_unsynced(&mut messages);
        }
        Ok(messages)
    }

    /// Deletes the messages of `recipient` up to and including `up_to`;
    /// returns how many.
    pub async fn ack(&self, recipient: IdentityKey, up_to: Seq) -> Result<usize, StoreError> {
        self.call(|reply| Command::Ack {
            recipient,
            up_to,
            reply,
        })
        .await
    }

    /// Removes and returns the queued messages of `recipient`, oldest first,
    /// up to [`FETCH_BUDGET_BYTES`].
    pub async fn drain(&self, recipient: IdentityKey) -> Result<Vec<Vec<u8>>, StoreError> {
        self.call(|reply| Command::Drain { recipient, reply }).await
    }

    /// Whether the node holds KeyPackages, queued messages or a device
    /// list for `identity` (see [`Storage::knows`]); on the reader
    /// connection.
    pub async fn knows(&self, identity: IdentityKey) -> Result<bool, StoreError> {
        ask(&self.reads, |reply| reads::Read::Knows { identity, reply }).await
    }

    /// Messages queued and KeyPackages stored in all, for the node's
    /// gauges; on the reader connection.
    pub async fn totals(&self) -> Result<Totals, StoreError> {
        ask(&self.reads, |reply| reads::Read::Totals { reply }).await
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        ask(&self.commands, command).await
    }
}

/// Sends a request to the writer or the reader thread and waits for its answer.
async fn ask<R, T>(queue: &mpsc::Sender<R>, request: impl FnOnce(Reply<T>) -> R) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send(request(reply)).await.map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}

impl StoreCloser {
    /// Waits until every handle is dropped and the writer has committed what
    /// was queued and closed the database (checkpointing the WAL).
    pub async fn close(mut self) {
        if let Some(thread) = self.thread.take() {
            // Joining blocks, so it must not run on an async worker thread.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the store writer thread panicked");
            }
        } else if self.finished.wait_for(|done| *done).await.is_err() {
            // The writer's task was dropped before it finished: its runtime
            // stopped early. SQLite's journal keeps the file consistent.
            tracing::error!("the store writer stopped before closing the database");
        }
    }

    /// Resolves, with what failed, once the store can no longer make a
    /// write durable (a failed sync of SQLite's WAL: see `sync`); from then
    /// on it stores nothing and the node must stop. Never resolves before.
    pub fn failed(&self) -> impl Future<Output = String> + Send + 'static {
        let failure = self.failure.clone();
        async move {
            if let Some(mut failure) = failure
                && let Ok(failed) = failure.wait_for(Option::is_some).await
            {
                return failed.clone().unwrap_or_default();
            }
            std::future::pending().await
        }
    }

    /// A receiver that turns true once the writer has closed the database;
    /// the thread running the writer (see [`Store::open_on`]) waits on it.
    pub fn finished(&self) -> watch::Receiver<bool> {
        self.finished.clone()
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The secret a device presents for its key backup, on its way to the
/// rules. Commands and reads derive `Debug`; this keeps the secret out of
/// whatever prints them.
pub(crate) struct BackupSecret([u8; 32]);

impl std::fmt::Debug for BackupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupSecret(..)")
    }
}

/// Now in Unix seconds: the clock the rules are given.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
}

/// One unit of work for the writer.
#[derive(Debug)]
enum Command {
    UploadKeyPackages {
        identity: IdentityKey,
        packages: Vec<ValidKeyPackage>,
        reply: Reply<Result<(), TooManyKeyPackages>>,
    },
    CountKeyPackages {
        identity: IdentityKey,
        suite: Suite,
        reply: Reply<KeyPackageStock>,
    },
    TakeKeyPackage {
        identity: IdentityKey,
        suite: Suite,
        ordinary: bool,
        reply: Reply<Option<Vec<u8>>>,
    },
    UploadDeviceList {
        caller: IdentityKey,
        list: SignedDeviceList,
        reply: Reply<Result<(), DeviceListRefusal>>,
    },
    PutKeyBackup {
        secret: BackupSecret,
        sealed: Vec<u8>,
        reply: Reply<Result<(), BackupTooLarge>>,
    },
    EnqueueBatch {
        sender: IdentityKey,
        envelopes: Vec<Envelope>,
        state_keys: Vec<StateKey>,
        reply: Reply<Result<(), SendRefusal>>,
    },
    PublishCommit {
        sender: IdentityKey,
        // Boxed: it is much larger than every other command.
        publication: Box<CommitPublication>,
        reply: Reply<Result<(), CommitRefusal>>,
    },
    PublishProposal {
        sender: IdentityKey,
        publication: ProposalPublication,
        reply: Reply<Result<(), CommitRefusal>>,
    },
    Ack {
        recipient: IdentityKey,
        up_to: Seq,
        reply: Reply<usize>,
    },
    Drain {
        recipient: IdentityKey,
        reply: Reply<Vec<Vec<u8>>>,
    },
    Purge {
        older_than: i64,
        reply: Reply<usize>,
    },
    PurgeIdleGroups {
        before: i64,
        reply: Reply<usize>,
    },
}

impl Command {
    /// Whether the commit holding this command must reach the disk before
    /// it is answered. An ack need not: committed without an fsync it
    /// survives a crash of the node (the WAL write is in the kernel's page
    /// cache), and the next commit that fsyncs carries it to the disk. A
    /// power cut in between loses it, which only makes the node deliver
    /// those messages again, and clients drop what they already have by
    /// sequence number (docs/operating.md, "Durability").
    pub(super) fn needs_fsync(&self) -> bool {
        !matches!(self, Command::Ack { .. } | Command::CountKeyPackages { .. })
    }
}

#[cfg(test)]
mod tests;
