//! The store on PostgreSQL: any number of nodes share one database.
//!
//! The same commands as on SQLite, run by the same rules
//! ([`super::commands::apply`]), but by several writer threads, each with a
//! connection of its own, taking batches from one queue: while one waits
//! for PostgreSQL, the next gathers its batch. A batch is one transaction:
//! it locks the rows of the queues it writes (sorted, in one statement),
//! runs each command (those that may refuse in a savepoint), sends one
//! small NOTIFY naming the queues it wrote, and commits. PostgreSQL answers
//! a commit once it is durable (`synchronous_commit`), so the answers go
//! out right away and reads need no watermark.
//!
//! # Layout
//! - `conn` — a connection that sends the statements deciding nothing
//!   (`BEGIN`, savepoints, `NOTIFY`, `COMMIT`) with the next one.
//! - `migrations` — numbered schema migrations under an advisory lock.
//! - `storage` — [`Storage`](crate::delivery::Storage) on one connection,
//!   and how each guarantee holds across nodes.
//! - `listen` — the LISTEN connection: other nodes' commits wake this
//!   node's waiters.

mod conn;
mod listen;
mod migrations;
mod storage;

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quicnprotochat_core::IdentityKey;
use tokio::sync::{mpsc, watch};

use self::conn::Conn;
use self::conn::{classify, describe};
use self::storage::PgStorage;
use super::commands::{apply, fail};
use super::reads::{Read, serve};
use super::{Command, Limits, Notifier, QUEUE_CAPACITY, Store, StoreCloser, StoreError};

/// Writer connections per node: one gathers a batch while the other's
/// commits. More only split the same busy queues' lock waits into smaller
/// batches: measured at 64 clients, one node, 1 / 2 / 3 writers: 11,363 /
/// 11,034 / 9,140 msgs/s (docs/benchmarks/journal.md, "Several nodes on PostgreSQL");
/// two keep commits of batches on different queues overlapping.
const WRITERS: usize = 2;

/// Reader connections per node (queue reads for push and fetch, group
/// views).
const READERS: usize = 2;

/// Most commands in one batch.
const MAX_BATCH: usize = 512;

/// Most commands of one batch that run in a savepoint. A savepoint that
/// writes is a subtransaction until the commit, and a transaction with
/// more than 64 of them makes every snapshot in the cluster look them up
/// in `pg_subtrans`, a known cliff.
const MAX_SAVEPOINTS: usize = 48;

/// How long a connection that failed waits before trying again; calls
/// meanwhile fail at once with "database unavailable".
pub(super) const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// Most queues one wake-up names; a batch that wrote more wakes every
/// waiter of the other nodes (NOTIFY payloads stop at 8000 bytes).
const MAX_NAMED_QUEUES: usize = 400;

/// Whether `db` names a PostgreSQL database rather than a SQLite file.
pub fn is_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Connects to the database at `url`, creates or migrates its tables, and
/// starts the writer, reader and listener threads.
pub(super) fn open(url: &str, limits: Limits) -> Result<(Store, StoreCloser), StoreError> {
    let config = config(url)?;
    // The synchronous client runs a runtime of its own, which must not be
    // started (or dropped) on an async thread: migrate on a thread of its
    // own, like every connection after it.
    let migrating = config.clone();
    let instance_id = std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let mut client = postgres::Config::from(migrating)
                    .connect(postgres::NoTls)
                    .map_err(classify)?;
                migrations::migrate(&mut client)
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Transaction("the migration thread panicked".into())))
    })?;
    let notifier = Notifier::new();
    // Names this node's wake-ups so that its listener skips them.
    let tag = hex::encode(rand::random::<[u8; 8]>());
    let (commands, receiver) = mpsc::channel(QUEUE_CAPACITY);
    let (reads, read_receiver) = mpsc::channel(QUEUE_CAPACITY);
    let receiver = Arc::new(Mutex::new(receiver));
    let read_receiver = Arc::new(Mutex::new(read_receiver));
    let mut threads = Vec::with_capacity(WRITERS + READERS);
    for index in 0..WRITERS {
        let link = Link::new(config.clone());
        let (queue, notifier, tag) = (receiver.clone(), notifier.clone(), tag.clone());
        threads.push(spawn(format!("store-pg-writer-{index}"), move || {
            write_loop(link, &queue, &limits, &notifier, &tag);
        })?);
    }
    for index in 0..READERS {
        let link = Link::new(config.clone());
        let queue = read_receiver.clone();
        threads.push(spawn(format!("store-pg-reader-{index}"), move || {
            read_loop(link, &queue)
        })?);
    }
    let (stop, stopped) = watch::channel(false);
    let listener = {
        let (config, notifier, tag) = (config.clone(), notifier.clone(), tag.clone());
        spawn("store-pg-listen".into(), move || {
            listen::listen_loop(&config, &notifier, &tag, stopped);
        })?
    };
    let (finished, finished_receiver) = watch::channel(false);
    let supervisor = spawn("store-pg".into(), move || {
        // Writers and readers end once every `Store` handle is gone and
        // their queues are empty.
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a PostgreSQL store thread panicked");
            }
        }
        stop.send_replace(true);
        if listener.join().is_err() {
            tracing::error!("the PostgreSQL listener thread panicked");
        }
        tracing::info!("database connections closed");
        finished.send_replace(true);
    })?;
    let store = Store {
        watermark: None,
        commands,
        reads,
        instance_id,
        notifier,
    };
    Ok((
        store,
        StoreCloser {
            thread: Some(supervisor),
            finished: finished_receiver,
            // PostgreSQL stops by itself on a failed fsync; the node sees
            // the connections go.
            failure: None,
        },
    ))
}

fn spawn(name: String, work: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(work)
        .map_err(StoreError::Thread)
}

/// The connection settings in `url`, plus the node's own.
fn config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| StoreError::BadUrl(describe(&e)))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        // Without a TLS connector the client could only fail the handshake;
        // say why instead, and never fall back to plaintext.
        return Err(StoreError::BadUrl(
            "sslmode=require: the node speaks to PostgreSQL without TLS; connect over a Unix socket \
             (?host=/var/run/postgresql) or a private network, without sslmode=require"
                .into(),
        ));
    }
    config.application_name("quicnprotochat-node");
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    Ok(config)
}

/// One thread's connection, made again after it is lost.
struct Link {
    config: tokio_postgres::Config,
    conn: Option<Conn>,
    /// No new attempt before then, after a failed one.
    retry_at: Option<Instant>,
    /// When the connection last served a call.
    used_at: Instant,
}

/// A connection idle this long is probed before it serves a call: the
/// server may have restarted meanwhile, and a connection it dropped is only
/// noticed when used. Without the probe the first call after an outage
/// would fail on the dead connection (one per thread) although the
/// database is back.
const IDLE_PROBE: Duration = Duration::from_secs(1);

impl Link {
    fn new(config: tokio_postgres::Config) -> Link {
        Link {
            config,
            conn: None,
            retry_at: None,
            used_at: Instant::now(),
        }
    }

    /// [`Self::connected`], after making sure a connection that sat idle
    /// ([`IDLE_PROBE`]) is still alive, with an empty query (one round
    /// trip, sent before anything of the call, so a dead one is replaced
    /// with nothing lost or left in doubt).
    fn probed(&mut self) -> Result<&mut Conn, StoreError> {
        let idle = self.used_at.elapsed() >= IDLE_PROBE;
        self.used_at = Instant::now();
        if idle
            && let Some(conn) = &mut self.conn
            && conn.batch_execute("").is_err()
        {
            tracing::info!("an idle connection to PostgreSQL was gone; connecting again");
            self.conn = None;
            self.retry_at = None;
        }
        self.connected()
    }

    /// The connection, made now if there is none (at most every
    /// [`RECONNECT_PAUSE`]).
    fn connected(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.as_ref().is_some_and(Conn::is_closed) {
            self.lost();
        }
        if self.conn.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(StoreError::Unavailable("reconnecting to PostgreSQL".into()));
            }
            match Conn::connect(&self.config) {
                Ok(conn) => {
                    if self.retry_at.take().is_some() {
                        tracing::info!("reconnected to PostgreSQL");
                    }
                    self.conn = Some(conn);
                }
                Err(error) => {
                    if self.retry_at.is_none() {
                        tracing::warn!("connecting to PostgreSQL: {error}");
                    }
                    self.retry_at = Some(Instant::now() + RECONNECT_PAUSE);
                    return Err(error);
                }
            }
        }
        match &mut self.conn {
            Some(conn) => Ok(conn),
            None => Err(StoreError::Unavailable("not connected".into())),
        }
    }

    /// Drops the connection: the next call makes a new one.
    fn lost(&mut self) {
        self.conn = None;
        self.retry_at.get_or_insert_with(Instant::now);
    }
}

fn write_loop(
    mut link: Link,
    queue: &Mutex<mpsc::Receiver<Command>>,
    limits: &Limits,
    notifier: &Notifier,
    tag: &str,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // A purge taken while gathering, kept for a batch of its own.
    let mut held = None;
    loop {
        if let Some(purge) = held.take() {
            batch.push(purge);
        } else {
            let mut receiver = queue.lock().unwrap_or_else(PoisonError::into_inner);
            match receiver.blocking_recv() {
                Some(command) => batch.push(command),
                // Every `Store` handle is gone and the queue is empty.
                None => return,
            }
            if !alone(&batch[0]) {
                held = gather(&mut receiver, &mut batch);
            }
        }
        // Through COMMIT, which waits for PostgreSQL's WAL flush.
        let size = batch.len();
        let started = std::time::Instant::now();
        let kept = execute_batch(&mut link, &mut batch, limits, notifier, tag);
        metrics::histogram!(crate::metrics::STORE_BATCH_SIZE).record(size as f64);
        metrics::histogram!(crate::metrics::STORE_COMMIT).record(started.elapsed().as_secs_f64());
        if !kept {
            link.lost();
        }
    }
}

/// Whether the command runs in a batch of its own: a purge locks the rows
/// of every queue it deletes from, in key order, which a batch that
/// already holds some queue's lock would take out of order.
fn alone(command: &Command) -> bool {
    matches!(command, Command::Purge { .. } | Command::PurgeIdleGroups { .. })
}

/// Adds every ready command to `batch`, within [`MAX_BATCH`] and
/// [`MAX_SAVEPOINTS`]; returns a command that must run alone, taken but
/// not added.
fn gather(receiver: &mut mpsc::Receiver<Command>, batch: &mut Vec<Command>) -> Option<Command> {
    let mut savepoints = batch.iter().filter(|command| uses_savepoint(command)).count();
    while batch.len() < MAX_BATCH && savepoints < MAX_SAVEPOINTS {
        match receiver.try_recv() {
            Ok(command) if alone(&command) => return Some(command),
            Ok(command) => {
                savepoints += usize::from(uses_savepoint(&command));
                batch.push(command);
            }
            Err(_) => return None,
        }
    }
    None
}

/// Whether the command may leave a subtransaction behind: one that may
/// refuse after writing runs in a savepoint, which is sent (and, once it
/// writes, becomes a subtransaction) only if the command runs a statement
/// whose answer it waits for. A send without message ids whose payloads
/// are no MLS application messages only queues its appends (`conn`), so it
/// never does, and need not shorten the batch.
fn uses_savepoint(command: &Command) -> bool {
    match command {
        Command::UploadKeyPackages { .. }
        | Command::UploadDeviceList { .. }
        | Command::PublishCommit { .. }
        | Command::PublishProposal { .. } => true,
        Command::EnqueueBatch { envelopes, .. } => envelopes.iter().any(|envelope| {
            envelope.message_id.is_some()
                || quicnprotochat_core::framing::private_message_epoch(&envelope.payload).is_some()
        }),
        _ => false,
    }
}

/// The queues `batch` may write, sorted and distinct.
fn written_queues(batch: &[Command]) -> Vec<IdentityKey> {
    let mut queues = Vec::new();
    for command in batch {
        match command {
            Command::EnqueueBatch { envelopes, .. } => {
                queues.extend(
                    envelopes
                        .iter()
                        .flat_map(|envelope| envelope.recipients.iter().copied()),
                );
            }
            Command::PublishCommit { publication, .. } => {
                queues.extend(publication.commit.recipients.iter().copied());
                if let Some(welcome) = &publication.welcome {
                    queues.extend(welcome.recipients.iter().copied());
                }
            }
            Command::PublishProposal { publication, .. } => {
                queues.extend(publication.proposal.recipients.iter().copied());
            }
            Command::Ack { recipient, .. } | Command::Drain { recipient, .. } => queues.push(*recipient),
            _ => {}
        }
    }
    queues.sort_unstable();
    queues.dedup();
    queues
}

/// Runs `batch` in one transaction and answers it. False when the
/// connection must be made again.
fn execute_batch(
    link: &mut Link,
    batch: &mut Vec<Command>,
    limits: &Limits,
    notifier: &Notifier,
    tag: &str,
) -> bool {
    let conn = match link.probed() {
        Ok(conn) => conn,
        Err(error) => {
            batch.drain(..).for_each(|command| fail(command, &error));
            return true;
        }
    };
    // Goes out with the first statement.
    conn.defer("BEGIN");
    if !batch.iter().any(Command::needs_fsync) {
        // Acks alone need not wait for PostgreSQL's WAL flush, for the
        // reason they skip SQLite's sync (docs/operating.md, "Durability"): one lost
        // in a crash of PostgreSQL only makes the node deliver those
        // messages again, which clients drop by sequence number.
        conn.defer("SET LOCAL synchronous_commit = off");
    }
    let mut storage = PgStorage::new(conn);
    let queues = written_queues(batch);
    // A batch that only deletes from one queue (acks, a drain) locks that
    // queue's row with its first delete: nothing to order, and no send to
    // check a depth for. Every other batch takes its locks up front.
    let sends = batch.iter().any(|command| {
        matches!(
            command,
            Command::EnqueueBatch { .. } | Command::PublishCommit { .. } | Command::PublishProposal { .. }
        )
    });
    if sends || queues.len() > 1 {
        let keys: Vec<&[u8]> = queues.iter().map(|key| key.as_bytes().as_slice()).collect();
        if let Err(e) = storage.lock_queues(&keys) {
            let error = classify(e);
            drop(storage);
            return abandon(conn, batch.drain(..), Vec::new(), &error);
        }
    }
    if sends {
        storage.carry_for(&notifier.watched(&queues));
    }
    let mut answers = Vec::with_capacity(batch.len());
    let mut touched: Vec<IdentityKey> = Vec::new();
    let mut commands = batch.drain(..);
    for command in commands.by_ref() {
        answers.push(apply(&mut storage, command, limits, &mut touched));
        if storage.broken() {
            break;
        }
    }
    if storage.broken() {
        drop(storage);
        let error = if conn.is_closed() {
            StoreError::Unavailable("the connection to PostgreSQL was lost".into())
        } else {
            StoreError::Transaction("a statement failed and PostgreSQL aborted the batch".into())
        };
        tracing::error!("{error}");
        return abandon(conn, commands, answers, &error);
    }
    drop(commands);
    let carried = storage.take_carried();
    drop(storage);
    touched.sort_unstable();
    touched.dedup();
    let payload = (!touched.is_empty()).then(|| wake_up(tag, &touched));
    let notify = payload.as_deref().map(|payload| (NOTIFY, payload));
    match conn.commit(notify) {
        Ok(()) => {
            answers.into_iter().for_each(|answer| answer(Ok(())));
            // This node's waiters get the messages with the wake-up,
            // marked with where they follow on (other nodes write to the
            // same queues).
            notifier.notify_gapless(&touched, &carried);
            true
        }
        Err(e) => {
            // Lost while committing: the batch may or may not have taken
            // effect, which `Unavailable` says.
            let error = classify(e);
            tracing::error!("committing a batch: {error}");
            answers.into_iter().for_each(|answer| answer(Err(&error)));
            // A queued statement that failed poisoned the connection's
            // transaction, not the connection: the next batch starts clean.
            conn.discard_deferred();
            let _ = conn.batch_execute("ROLLBACK");
            !matches!(error, StoreError::Unavailable(_))
        }
    }
}

/// Wakes the other nodes' waiters of the queues a batch wrote; sent with
/// the batch's `COMMIT`, delivered by PostgreSQL once it commits.
const NOTIFY: &str = "SELECT pg_notify('quicnprotochat', $1)";

/// Rolls the batch back and answers everything in it with `error`.
fn abandon(
    conn: &mut Conn,
    unrun: impl Iterator<Item = Command>,
    answers: Vec<super::commands::Answer>,
    error: &StoreError,
) -> bool {
    unrun.for_each(|command| fail(command, error));
    answers.into_iter().for_each(|answer| answer(Err(error)));
    conn.discard_deferred();
    match conn.batch_execute("ROLLBACK") {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("rolling back a failed batch: {}", describe(&e));
            false
        }
    }
}

/// A batch's NOTIFY payload: this node's tag, then the first 8 bytes (hex)
/// of each queue it wrote, or `*` for "any". Small on purpose: PostgreSQL
/// queues every payload in one shared area and serialises committing
/// transactions that notified.
fn wake_up(tag: &str, touched: &[IdentityKey]) -> String {
    let mut payload = String::with_capacity(tag.len() + 1 + touched.len().min(MAX_NAMED_QUEUES) * 17);
    payload.push_str(tag);
    payload.push(' ');
    if touched.len() > MAX_NAMED_QUEUES {
        payload.push('*');
        return payload;
    }
    for (index, key) in touched.iter().enumerate() {
        if index > 0 {
            payload.push(',');
        }
        payload.push_str(&hex::encode(&key.as_bytes()[..8]));
    }
    payload
}

fn read_loop(mut link: Link, queue: &Mutex<mpsc::Receiver<Read>>) {
    loop {
        let read = {
            let mut receiver = queue.lock().unwrap_or_else(PoisonError::into_inner);
            match receiver.blocking_recv() {
                Some(read) => read,
                None => return,
            }
        };
        let lost = match link.probed() {
            Ok(conn) => {
                let lost = serve(&mut PgStorage::new(conn), read);
                lost || conn.is_closed()
            }
            Err(error) => {
                read.fail(error);
                false
            }
        };
        if lost {
            link.lost();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_up_names_queues_by_prefix_and_falls_back_to_everyone() {
        let keys = [
            IdentityKey::from_bytes([0xab; 32]),
            IdentityKey::from_bytes([1; 32]),
        ];
        assert_eq!(wake_up("t", &keys), "t abababababababab,0101010101010101");
        let many: Vec<IdentityKey> = (0..=MAX_NAMED_QUEUES)
            .map(|index| {
                let mut key = [0; 32];
                key[..8].copy_from_slice(&(index as u64).to_be_bytes());
                IdentityKey::from_bytes(key)
            })
            .collect();
        assert_eq!(wake_up("t", &many), "t *");
        assert!(wake_up("0123456789abcdef", &many[..MAX_NAMED_QUEUES]).len() < 8000);
    }

    #[test]
    fn a_purge_is_kept_out_of_a_batch_for_one_of_its_own() {
        let (sender, mut receiver) = mpsc::channel(8);
        let ack = || Command::Ack {
            recipient: IdentityKey::from_bytes([2; 32]),
            up_to: quicnprotochat_core::Seq::new(1),
            reply: tokio::sync::oneshot::channel().0,
        };
        let purge = Command::Purge {
            older_than: 0,
            reply: tokio::sync::oneshot::channel().0,
        };
        for command in [ack(), purge, ack()] {
            assert!(sender.try_send(command).is_ok());
        }
        let mut batch = vec![ack()];
        let held = gather(&mut receiver, &mut batch);
        assert_eq!(batch.len(), 2, "the ack before the purge joins the batch");
        assert!(
            held.as_ref().is_some_and(alone),
            "the purge waits for its own batch"
        );
        assert!(receiver.try_recv().is_ok(), "the ack after it waits too");
    }

    #[test]
    fn only_commands_that_wait_on_a_statement_count_toward_the_savepoint_cap() {
        let send = |message_id: Option<Vec<u8>>| Command::EnqueueBatch {
            sender: IdentityKey::from_bytes([1; 32]),
            state_keys: Vec::new(),
            envelopes: vec![quicnprotochat_proto::wire::Envelope {
                recipients: vec![IdentityKey::from_bytes([2; 32])],
                payload: b"opaque".to_vec(),
                message_id,
            }],
            reply: tokio::sync::oneshot::channel().0,
        };
        assert!(!uses_savepoint(&send(None)), "its append only queues");
        assert!(
            uses_savepoint(&send(Some(b"id".to_vec()))),
            "its message id is claimed and awaited"
        );
    }

    #[test]
    fn postgres_urls_are_told_from_sqlite_paths() {
        assert!(is_url("postgres://node@db.example/chat"));
        assert!(is_url("postgresql://node@/chat?host=/run/postgresql"));
        assert!(!is_url("data/node.db"));
        assert!(!is_url("postgres.db"));
    }
}
