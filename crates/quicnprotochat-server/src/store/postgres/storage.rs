//! [`Storage`] on one PostgreSQL connection: the statements the rules need,
//! each prepared once per connection.
//!
//! Several nodes (and several writers of one node) run batches at the same
//! time, so each guarantee the SQLite store gets from its single writer is
//! made explicit here:
//! - a batch first locks the rows of every queue it writes, in one sorted
//!   statement ([`PgStorage::lock_queues`]): batches never deadlock on
//!   queues, depth checks see every committed message, and each queue's
//!   counter hands out numbers in commit order;
//! - the oldest KeyPackage is taken `FOR UPDATE SKIP LOCKED`, so two nodes
//!   never serve the same one;
//! - a group's epoch moves only from the value its command read
//!   ([`PgError::Raced`] otherwise, and the command runs again and sees the
//!   winner's epoch);
//! - an identity's KeyPackage count (of one suite) is taken under an
//!   advisory lock of that identity;
//! - a user's device list is replaced only if it is still the one its
//!   command read ([`PgError::Raced`] otherwise, as for epochs): two nodes
//!   storing lists of one user at once never both win with one lost.

use std::collections::HashMap;
use std::sync::Arc;

use postgres::Row;
use postgres::types::ToSql;
use quicnprotochat_core::{
    BackupRef, GroupRef, IdentityKey, KeyPackageStock, MessageKey, QueuedMessage, Seq, SignedDeviceList,
    Suite,
};

use super::conn::{Conn, classify, describe};

use super::super::commands::Transact;
use super::super::notifier::{CARRY_BYTES, CARRY_MESSAGES};
use super::super::{StoreError, ValidKeyPackage};
use crate::delivery::{
    DamagedDeviceList, DeviceListColumns, KeyPackageRow, QueueUsage, Storage, Totals, WelcomeTree,
};

/// A failure inside one command.
#[derive(Debug)]
pub(in crate::store) enum PgError {
    /// PostgreSQL failed or refused a statement.
    Db(postgres::Error),
    /// Another transaction changed what this command read (a group's
    /// epoch, a user's device list); running the command again sees the
    /// change.
    Raced(&'static str),
    /// A stored row does not hold what the node writes.
    Damaged(DamagedDeviceList),
}

impl From<postgres::Error> for PgError {
    fn from(error: postgres::Error) -> Self {
        PgError::Db(error)
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Db(error) => write!(f, "{}", describe(error)),
            PgError::Raced(what) => write!(f, "{what} changed meanwhile"),
            PgError::Damaged(damaged) => write!(f, "{damaged}"),
        }
    }
}

impl PgError {
    /// Whether running the command again may well succeed: a conflict with
    /// a concurrent transaction, not a fault.
    fn retryable(&self) -> bool {
        use postgres::error::SqlState;
        match self {
            PgError::Raced(_) => true,
            PgError::Damaged(_) => false,
            PgError::Db(error) => error.code().is_some_and(|code| {
                *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::UNIQUE_VIOLATION
            }),
        }
    }
}

impl From<PgError> for StoreError {
    fn from(error: PgError) -> Self {
        match error {
            PgError::Db(error) => classify(error),
            PgError::Raced(what) => StoreError::Transaction(format!("{what} kept changing; retry")),
            PgError::Damaged(damaged) => StoreError::Transaction(damaged.to_string()),
        }
    }
}

/// Where the running command's savepoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    /// No command has taken one in this transaction.
    None,
    /// Taken when the command sends its first statement (with it, in one
    /// round trip); `release`: the previous command's is released first.
    Pending { release: bool },
    /// Sent: statements have run since.
    Open,
}

/// The storage of one connection: inside a writer's batch transaction, or
/// statement by statement on a reader.
pub(super) struct PgStorage<'c> {
    conn: &'c mut Conn,
    /// Usage of the queues this transaction holds locked, kept up to date
    /// by its own appends and deletes; dropped when a command is undone.
    usage: HashMap<IdentityKey, QueueUsage>,
    /// The epochs the running command read, by group: a move of the epoch
    /// must start from it.
    epochs_read: HashMap<GroupRef, Option<u64>>,
    /// The device list versions the running command read, by user (`None`:
    /// no list): a new list replaces only the one read.
    device_lists_read: HashMap<IdentityKey, Option<i64>>,
    /// Group epochs this transaction read or set: every application
    /// message in a batch asks for its group's (the stale-epoch check),
    /// which costs a round trip each without this. Unlocked reads, as
    /// before: a Commit moves an epoch only from the value it was checked
    /// against ([`Storage::set_group_epoch`]), so a stale entry makes it run
    /// again, never wins.
    epochs: HashMap<GroupRef, Option<u64>>,
    /// The last sequence number of each queue this transaction holds
    /// locked, moved by its own appends: under the lock, nobody else
    /// numbers that queue's messages, and each append takes the next one.
    last_seqs: HashMap<IdentityKey, u64>,
    /// Messages appended to watched queues, handed to their waiters with the
    /// wake-up (see [`PgStorage::take_carried`]); `None` for a queue whose
    /// messages did not all fit, or could not all be numbered.
    carried: HashMap<IdentityKey, Option<Vec<QueuedMessage>>>,
    /// Whether `carried` still tells the truth (no command was undone).
    carrying: bool,
    savepoint: Savepoint,
    /// Whether a statement failed outside a savepoint, or a deferred one
    /// failed: the whole transaction is aborted.
    broken: bool,
}

impl<'c> PgStorage<'c> {
    pub(super) fn new(conn: &'c mut Conn) -> Self {
        Self {
            conn,
            usage: HashMap::new(),
            epochs_read: HashMap::new(),
            device_lists_read: HashMap::new(),
            epochs: HashMap::new(),
            last_seqs: HashMap::new(),
            carried: HashMap::new(),
            carrying: true,
            savepoint: Savepoint::None,
            broken: false,
        }
    }

    /// Whether the transaction is aborted and can only be rolled back.
    pub(super) fn broken(&self) -> bool {
        self.broken
    }

    /// Keeps the messages appended to these queues, for their waiters.
    pub(super) fn carry_for(&mut self, watched: &[IdentityKey]) {
        for queue in watched {
            self.carried.insert(*queue, Some(Vec::new()));
        }
    }

    /// The messages appended to each watched queue, where few and small
    /// enough to hand over with the wake-up (as the SQLite store does).
    pub(super) fn take_carried(&mut self) -> HashMap<IdentityKey, Arc<[QueuedMessage]>> {
        if !self.carrying {
            return HashMap::new();
        }
        self.carried
            .drain()
            .filter_map(|(queue, messages)| Some((queue, messages?)))
            .filter(|(_, messages)| !messages.is_empty())
            .map(|(queue, messages)| (queue, messages.into()))
            .collect()
    }

    /// Forgets what the transaction remembered of its own writes: a command
    /// was undone, and with it some of them.
    fn forget_own_writes(&mut self) {
        self.usage.clear();
        self.epochs.clear();
        self.last_seqs.clear();
        self.carrying = false;
    }

    /// Takes the running command's savepoint with its first statement.
    fn before_statement(&mut self) {
        if let Savepoint::Pending { release } = self.savepoint {
            self.conn.defer(if release {
                "RELEASE command; SAVEPOINT command"
            } else {
                "SAVEPOINT command"
            });
            self.savepoint = Savepoint::Open;
        }
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        self.before_statement();
        let result = self.conn.query(sql, params);
        self.broken |= result.is_err();
        result
    }

    /// Whether the transaction can no longer be trusted: a deferred
    /// statement failed, maybe one of a command already decided.
    fn poisoned(&self) -> bool {
        self.conn.poisoned()
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        self.before_statement();
        let result = self.conn.execute(sql, params);
        self.broken |= result.is_err();
        result
    }

    /// Locks the queue rows of `recipients` (distinct), creating missing
    /// ones, in key order, and remembers their usage. Every batch takes its
    /// queue locks here first and in the same order, so two batches (of
    /// this node or another) wait for each other instead of deadlocking.
    pub(super) fn lock_queues(&mut self, recipients: &[&[u8]]) -> Result<(), postgres::Error> {
        let rows = self.query(
            "INSERT INTO queues AS q (recipient_key)
             SELECT r FROM unnest($1::bytea[]) AS r ORDER BY r
             ON CONFLICT (recipient_key) DO UPDATE SET last_seq = q.last_seq
             RETURNING recipient_key, depth, bytes, last_seq",
            &[&recipients],
        )?;
        for row in rows {
            let key: &[u8] = row.get(0);
            if let Ok(key) = <[u8; 32]>::try_from(key) {
                let key = IdentityKey::from_bytes(key);
                self.usage.insert(
                    key,
                    QueueUsage {
                        messages: count(row.get(1)),
                        bytes: count(row.get(2)),
                    },
                );
                self.last_seqs.insert(key, count(row.get(3)));
            }
        }
        Ok(())
    }
}

/// A non-negative SQL count.
fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Sequence numbers and epochs are below 2^63 in practice; a larger value
/// asked for (a client's `afterSeq` of u64::MAX) means "beyond everything".
fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The `ciphersuite` column of `suite`: its code point, as `integer` (a
/// u16 does not fit `smallint`).
fn suite_column(suite: Suite) -> i32 {
    i32::from(suite.code())
}

/// Rows a queue read fetches per statement: a fetch stops early at its
/// budget, so reading the whole queue at once would waste the rest.
const SCAN_PAGE: i64 = 128;

impl Transact for PgStorage<'_> {
    /// The savepoint, and the rollback to it, go out with the next
    /// statement (see `conn`): a command that refuses before writing
    /// anything sends neither.
    fn decide<T, R>(
        &mut self,
        mut work: impl FnMut(&mut Self) -> Result<Result<T, R>, PgError>,
    ) -> Result<Result<T, R>, StoreError> {
        let before = self.savepoint;
        let pending = match before {
            Savepoint::None => Savepoint::Pending { release: false },
            Savepoint::Open => Savepoint::Pending { release: true },
            pending @ Savepoint::Pending { .. } => pending,
        };
        let mark = self.conn.mark();
        let mut attempts = 0;
        loop {
            self.savepoint = pending;
            self.epochs_read.clear();
            self.device_lists_read.clear();
            let outcome = work(self);
            if self.poisoned() {
                // Not this command's fault, maybe: the batch fails whole.
                self.broken = true;
                return Err(StoreError::Transaction(
                    "a statement of the batch failed; nothing of it was stored".into(),
                ));
            }
            let unsent = self.conn.unsent_since(mark);
            if matches!(outcome, Ok(Ok(_))) {
                if unsent && self.savepoint == Savepoint::Open {
                    // All it did is still queued: its writes need no
                    // savepoint of their own.
                    self.conn.unqueue_at(mark);
                    self.savepoint = before;
                }
                return outcome.map_err(StoreError::from);
            }
            if unsent {
                // Nothing of it reached PostgreSQL: forget it.
                self.conn.unqueue_since(mark);
                self.savepoint = before;
                self.forget_own_writes();
            } else if self.savepoint == Savepoint::Open {
                // `ROLLBACK TO` keeps the savepoint, for another attempt or
                // for the next command to release.
                self.conn.defer("ROLLBACK TO command");
                self.broken = false;
                self.forget_own_writes();
            }
            match outcome {
                Err(e) if e.retryable() && attempts < 3 => {
                    attempts += 1;
                    tracing::debug!("running a command again after a conflict: {e}");
                }
                other => return other.map_err(StoreError::from),
            }
        }
    }

    /// No savepoint: these commands write at most one statement's worth,
    /// and if that fails the whole batch fails (see [`PgStorage::broken`]).
    fn run<T>(&mut self, mut work: impl FnMut(&mut Self) -> Result<T, PgError>) -> Result<T, StoreError> {
        work(self).map_err(StoreError::from)
    }
}

impl Storage for PgStorage<'_> {
    type Error = PgError;

    fn insert_key_package(
        &mut self,
        identity: &IdentityKey,
        package: &ValidKeyPackage,
        now: i64,
    ) -> Result<(), PgError> {
        self.execute(
            "INSERT INTO key_packages (identity_key, package, uploaded_at, last_resort, expires_at, ciphersuite, fingerprint)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &identity.as_bytes().as_slice(),
                &package.bytes,
                &now,
                &package.last_resort,
                &sql_int(package.expires_at),
                &suite_column(package.suite),
                &&package.fingerprint[..],
            ],
        )?;
        Ok(())
    }

    fn has_key_package(&mut self, identity: &IdentityKey, fingerprint: &[u8; 32]) -> Result<bool, PgError> {
        let row = self.query_opt(
            "SELECT 1 FROM key_packages WHERE identity_key = $1 AND fingerprint = $2",
            &[&identity.as_bytes().as_slice(), &&fingerprint[..]],
        )?;
        Ok(row.is_some())
    }

    fn oldest_key_package(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<Option<(KeyPackageRow, Vec<u8>)>, PgError> {
        // SKIP LOCKED: one another node is handing out right now is not
        // there for us; we take the next.
        let row = self.query_opt(
            "SELECT id, package FROM key_packages
             WHERE identity_key = $1 AND ciphersuite = $2 AND NOT last_resort AND expires_at > $3
             ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
            &[&identity.as_bytes().as_slice(), &suite_column(suite), &now],
        )?;
        Ok(row.map(|row| (KeyPackageRow(row.get(0)), row.get(1))))
    }

    fn delete_key_package(&mut self, row: KeyPackageRow) -> Result<(), PgError> {
        self.execute("DELETE FROM key_packages WHERE id = $1", &[&row.0])?;
        Ok(())
    }

    fn newest_last_resort(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<Option<Vec<u8>>, PgError> {
        let row = self.query_opt(
            "SELECT package FROM key_packages
             WHERE identity_key = $1 AND ciphersuite = $2 AND last_resort AND expires_at > $3
             ORDER BY id DESC LIMIT 1",
            &[&identity.as_bytes().as_slice(), &suite_column(suite), &now],
        )?;
        Ok(row.map(|row| row.get(0)))
    }

    fn stored_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<u64, PgError> {
        // Counted to decide whether an upload fits: hold the identity's
        // lock until the batch commits, so that two nodes storing for one
        // identity at once cannot both fit under the limit. One lock for
        // all its suites: an upload of several suites takes it once per
        // suite, which PostgreSQL allows.
        let mut lock = [0u8; 8];
        lock.copy_from_slice(&identity.as_bytes()[..8]);
        self.execute("SELECT pg_advisory_xact_lock($1)", &[&i64::from_le_bytes(lock)])?;
        let row = self.query_opt(
            "SELECT count(*) FROM key_packages
             WHERE identity_key = $1 AND ciphersuite = $2 AND expires_at > $3",
            &[&identity.as_bytes().as_slice(), &suite_column(suite), &now],
        )?;
        Ok(row.map_or(0, |row| count(row.get(0))))
    }

    fn count_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<KeyPackageStock, PgError> {
        let row = self.query_opt(
            "SELECT count(*) FILTER (WHERE NOT last_resort), coalesce(bool_or(last_resort), false)
             FROM key_packages WHERE identity_key = $1 AND ciphersuite = $2 AND expires_at > $3",
            &[&identity.as_bytes().as_slice(), &suite_column(suite), &now],
        )?;
        Ok(row.map_or(KeyPackageStock::default(), |row| KeyPackageStock {
            count: u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX),
            has_last_resort: row.get(1),
        }))
    }

    fn message_id_used(&mut self, key: &MessageKey) -> Result<bool, PgError> {
        let row = self.query_opt(
            "SELECT 1 FROM message_keys WHERE message_key = $1",
            &[&key.as_bytes().as_slice()],
        )?;
        Ok(row.is_some())
    }

    fn claim_message_id(&mut self, key: &MessageKey, now: i64) -> Result<bool, PgError> {
        // A claim another node's open transaction made waits for it here,
        // then counts as used once it commits.
        let inserted = self.execute(
            "INSERT INTO message_keys (message_key, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&key.as_bytes().as_slice(), &now],
        )?;
        Ok(inserted == 1)
    }

    fn queue_usage(&mut self, recipient: &IdentityKey) -> Result<QueueUsage, PgError> {
        if let Some(usage) = self.usage.get(recipient) {
            return Ok(*usage);
        }
        let row = self.query_opt(
            "SELECT depth, bytes FROM queues WHERE recipient_key = $1 FOR UPDATE",
            &[&recipient.as_bytes().as_slice()],
        )?;
        let Some(row) = row else {
            // No row, no lock: nothing to remember.
            return Ok(QueueUsage::default());
        };
        let usage = QueueUsage {
            messages: count(row.get(0)),
            bytes: count(row.get(1)),
        };
        self.usage.insert(*recipient, usage);
        Ok(usage)
    }

    /// One statement for any number of recipients: each queue's counter
    /// row moves by one under its lock, and the message takes the new
    /// number. Deferred: it goes out with the next statement whose answer
    /// is needed, or the commit (see `conn`).
    fn append(&mut self, recipients: &[IdentityKey], payload: &[u8], now: i64) -> Result<(), PgError> {
        let keys: Vec<Vec<u8>> = recipients.iter().map(|key| key.as_bytes().to_vec()).collect();
        let size = i64::try_from(payload.len()).unwrap_or(i64::MAX);
        self.before_statement();
        let deferred = self.conn.defer_statement(
            "WITH q AS (
                 INSERT INTO queues AS q (recipient_key, last_seq, depth, bytes)
                 SELECT r, 1, 1, $3 FROM unnest($1::bytea[]) AS r ORDER BY r
                 ON CONFLICT (recipient_key) DO UPDATE
                 SET last_seq = q.last_seq + 1, depth = q.depth + 1, bytes = q.bytes + excluded.bytes
                 RETURNING recipient_key, last_seq)
             INSERT INTO messages (recipient_key, seq, payload, enqueued_at)
             SELECT recipient_key, last_seq, $2, $4 FROM q",
            vec![
                Box::new(keys),
                Box::new(payload.to_vec()),
                Box::new(size),
                Box::new(now),
            ],
        );
        if let Err(e) = deferred {
            self.broken = true;
            return Err(e.into());
        }
        for recipient in recipients {
            if let Some(usage) = self.usage.get_mut(recipient) {
                usage.messages += 1;
                usage.bytes += payload.len() as u64;
            }
            let seq = self.last_seqs.get_mut(recipient).map(|last| {
                *last += 1;
                Seq::new(*last)
            });
            if let Some(carried) = self.carried.get_mut(recipient) {
                let fits = |messages: &Vec<QueuedMessage>| {
                    messages.len() < CARRY_MESSAGES
                        && messages
                            .iter()
                            .map(|message| message.payload.len())
                            .sum::<usize>()
                            + payload.len()
                            <= CARRY_BYTES
                };
                *carried = match (carried.take(), seq) {
                    (Some(mut messages), Some(seq)) if fits(&messages) => {
                        messages.push(QueuedMessage {
                            seq,
                            payload: payload.to_vec(),
                        });
                        Some(messages)
                    }
                    // Too many, or a number not known: the waiters read.
                    _ => None,
                };
            }
        }
        Ok(())
    }

    fn scan_queue(
        &mut self,
        recipient: &IdentityKey,
        after: Seq,
        visit: &mut dyn FnMut(Seq, Vec<u8>) -> bool,
    ) -> Result<(), PgError> {
        let mut after = sql_int(after.get());
        loop {
            let rows = self.query(
                "SELECT seq, payload FROM messages
                 WHERE recipient_key = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&recipient.as_bytes().as_slice(), &after, &SCAN_PAGE],
            )?;
            let full = rows.len() as i64 == SCAN_PAGE;
            for row in rows {
                after = row.get(0);
                if !visit(Seq::new(count(after)), row.get(1)) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn delete_through(&mut self, recipient: &IdentityKey, up_to: Seq) -> Result<usize, PgError> {
        let row = self.query_opt(
            "WITH d AS (
                 DELETE FROM messages WHERE recipient_key = $1 AND seq <= $2
                 RETURNING octet_length(payload) AS size),
             t AS (SELECT count(*) AS n, coalesce(sum(size), 0)::bigint AS b FROM d),
             u AS (UPDATE queues SET depth = depth - t.n, bytes = bytes - t.b
                   FROM t WHERE recipient_key = $1 AND t.n > 0)
             SELECT n, b FROM t",
            &[&recipient.as_bytes().as_slice(), &sql_int(up_to.get())],
        )?;
        let (deleted, bytes) = row.map_or((0, 0), |row| (count(row.get(0)), count(row.get(1))));
        if let Some(usage) = self.usage.get_mut(recipient) {
            usage.messages = usage.messages.saturating_sub(deleted);
            usage.bytes = usage.bytes.saturating_sub(bytes);
        }
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    fn group_epoch(&mut self, group: &GroupRef) -> Result<Option<u64>, PgError> {
        let epoch = match self.epochs.get(group) {
            Some(epoch) => *epoch,
            None => {
                let row = self.query_opt(
                    "SELECT epoch FROM group_epochs WHERE group_ref = $1",
                    &[&group.as_bytes().as_slice()],
                )?;
                let epoch = row.map(|row| count(row.get(0)));
                self.epochs.insert(*group, epoch);
                epoch
            }
        };
        self.epochs_read.insert(*group, epoch);
        Ok(epoch)
    }

    /// Moves the epoch only from the one this command read: a competing
    /// Commit that another node accepted meanwhile makes this one run
    /// again, and then it sees that epoch.
    fn set_group_epoch(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        fingerprint: &[u8; 32],
    ) -> Result<(), PgError> {
        let fingerprint = &fingerprint[..];
        let moved = match self.epochs_read.get(group).copied() {
            Some(Some(read)) => self.execute(
                "UPDATE group_epochs SET epoch = $2, fingerprint = $4 WHERE group_ref = $1 AND epoch = $3",
                &[&group.as_bytes().as_slice(), &sql_int(epoch), &sql_int(read), &fingerprint],
            )?,
            Some(None) => self.execute(
                "INSERT INTO group_epochs (group_ref, epoch, fingerprint) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&group.as_bytes().as_slice(), &sql_int(epoch), &fingerprint],
            )?,
            None => self.execute(
                "INSERT INTO group_epochs (group_ref, epoch, fingerprint) VALUES ($1, $2, $3)
                 ON CONFLICT (group_ref) DO UPDATE SET epoch = excluded.epoch, fingerprint = excluded.fingerprint",
                &[&group.as_bytes().as_slice(), &sql_int(epoch), &fingerprint],
            )?,
        };
        if moved == 0 {
            // Read it afresh when the command runs again.
            self.epochs.remove(group);
            return Err(PgError::Raced("the group's epoch"));
        }
        self.epochs_read.insert(*group, Some(epoch));
        self.epochs.insert(*group, Some(epoch));
        Ok(())
    }

    fn group_fingerprint(&mut self, group: &GroupRef) -> Result<Option<[u8; 32]>, PgError> {
        let row = self.query_opt(
            "SELECT fingerprint FROM group_epochs WHERE group_ref = $1",
            &[&group.as_bytes().as_slice()],
        )?;
        let fingerprint: Option<Vec<u8>> = row.and_then(|row| row.get(0));
        Ok(fingerprint.and_then(|bytes| bytes.try_into().ok()))
    }

    fn group_view(&mut self, group: &GroupRef) -> Result<Option<Vec<u8>>, PgError> {
        let row = self.query_opt(
            "SELECT view FROM group_views WHERE group_ref = $1",
            &[&group.as_bytes().as_slice()],
        )?;
        Ok(row.map(|row| row.get(0)))
    }

    fn set_group_view(&mut self, group: &GroupRef, view: &[u8], now: i64) -> Result<(), PgError> {
        self.execute(
            "INSERT INTO group_views (group_ref, view, changed_at) VALUES ($1, $2, $3)
             ON CONFLICT (group_ref) DO UPDATE SET view = excluded.view, changed_at = excluded.changed_at",
            &[&group.as_bytes().as_slice(), &view, &now],
        )?;
        self.execute(
            "DELETE FROM group_proposals WHERE group_ref = $1",
            &[&group.as_bytes().as_slice()],
        )?;
        Ok(())
    }

    fn group_proposals(&mut self, group: &GroupRef, epoch: u64) -> Result<Vec<Vec<u8>>, PgError> {
        let rows = self.query(
            "SELECT item FROM group_proposals WHERE group_ref = $1 AND epoch = $2 ORDER BY id",
            &[&group.as_bytes().as_slice(), &sql_int(epoch)],
        )?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn add_group_proposal(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        item: &[u8],
        now: i64,
    ) -> Result<(), PgError> {
        self.execute(
            "INSERT INTO group_proposals (group_ref, epoch, item) VALUES ($1, $2, $3)",
            &[&group.as_bytes().as_slice(), &sql_int(epoch), &item],
        )?;
        self.execute(
            "UPDATE group_views SET changed_at = $2 WHERE group_ref = $1",
            &[&group.as_bytes().as_slice(), &now],
        )?;
        Ok(())
    }

    fn purge_idle_groups(&mut self, before: i64) -> Result<usize, PgError> {
        let deleted = self.execute("DELETE FROM group_views WHERE changed_at < $1", &[&before])?;
        if deleted > 0 {
            self.execute(
                "DELETE FROM group_proposals p
                 WHERE NOT EXISTS (SELECT 1 FROM group_views v WHERE v.group_ref = p.group_ref)",
                &[],
            )?;
        }
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    fn put_welcome_tree(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        sealed: &[u8],
        keep: usize,
        now: i64,
    ) -> Result<(), PgError> {
        // No joiners: the seal's key is the permission (protocol 8).
        self.execute(
            "INSERT INTO welcome_trees (group_ref, epoch, tree, joiners, created_at)
             VALUES ($1, $2, $3, ''::bytea, $4)
             ON CONFLICT (group_ref, epoch) DO UPDATE
             SET tree = excluded.tree, joiners = excluded.joiners, created_at = excluded.created_at",
            &[&group.as_bytes().as_slice(), &sql_int(epoch), &sealed, &now],
        )?;
        self.execute(
            "DELETE FROM welcome_trees WHERE group_ref = $1 AND epoch NOT IN
                 (SELECT epoch FROM welcome_trees WHERE group_ref = $1 ORDER BY epoch DESC LIMIT $2)",
            &[
                &group.as_bytes().as_slice(),
                &i64::try_from(keep).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(())
    }

    fn welcome_tree(&mut self, group: &GroupRef, epoch: u64) -> Result<Option<WelcomeTree>, PgError> {
        let row = self.query_opt(
            "SELECT tree, joiners FROM welcome_trees WHERE group_ref = $1 AND epoch = $2",
            &[&group.as_bytes().as_slice(), &sql_int(epoch)],
        )?;
        Ok(row.map(|row| WelcomeTree::from_columns(row.get(0), row.get(1))))
    }

    /// Safe on every node at once: a row two purges both find is deleted
    /// by one and skipped by the other, and queue counters move by what
    /// each really deleted. Queue rows are locked first, in the same order
    /// batches lock them.
    fn purge(&mut self, older_than: i64, now: i64) -> Result<usize, PgError> {
        self.execute("DELETE FROM welcome_trees WHERE created_at < $1", &[&older_than])?;
        let old: Vec<Vec<u8>> = self
            .query(
                "SELECT DISTINCT recipient_key FROM messages WHERE enqueued_at < $1",
                &[&older_than],
            )?
            .into_iter()
            .map(|row| row.get(0))
            .collect();
        let mut purged = 0;
        if !old.is_empty() {
            let keys: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
            self.query(
                "SELECT 1 FROM queues WHERE recipient_key = ANY($1) ORDER BY recipient_key FOR UPDATE",
                &[&keys],
            )?;
            let row = self.query_opt(
                "WITH d AS (
                     DELETE FROM messages WHERE recipient_key = ANY($1) AND enqueued_at < $2
                     RETURNING recipient_key, octet_length(payload) AS size),
                 per AS (SELECT recipient_key, count(*) AS n, sum(size)::bigint AS b FROM d GROUP BY recipient_key),
                 u AS (UPDATE queues q SET depth = q.depth - per.n, bytes = q.bytes - per.b
                       FROM per WHERE q.recipient_key = per.recipient_key)
                 SELECT coalesce(sum(n), 0)::bigint FROM per",
                &[&keys, &older_than],
            )?;
            purged = row.map_or(0, |row| count(row.get(0)));
            self.usage.clear();
        }
        self.execute("DELETE FROM message_keys WHERE created_at < $1", &[&older_than])?;
        self.execute("DELETE FROM key_packages WHERE expires_at <= $1", &[&now])?;
        Ok(usize::try_from(purged).unwrap_or(usize::MAX))
    }

    /// Unlocked: [`Storage::put_device_list`] checks that the list is still
    /// the one read here.
    fn device_list(&mut self, user: &IdentityKey) -> Result<Option<SignedDeviceList>, PgError> {
        let row = self.query_opt(
            "SELECT version, devices, signature FROM device_lists WHERE user_key = $1",
            &[&user.as_bytes().as_slice()],
        )?;
        let list = row.map(|row| device_list_row(*user, &row)).transpose()?;
        self.device_lists_read.insert(
            *user,
            list.as_ref().map(|list| DeviceListColumns::of(list).version),
        );
        Ok(list)
    }

    /// One statement for every user: a reader answers up to 256 at once.
    fn device_lists(&mut self, users: &[IdentityKey]) -> Result<Vec<SignedDeviceList>, PgError> {
        let keys: Vec<&[u8]> = users.iter().map(|user| user.as_bytes().as_slice()).collect();
        let rows = self.query(
            "SELECT user_key, version, devices, signature FROM device_lists WHERE user_key = ANY($1)",
            &[&keys],
        )?;
        let mut lists = Vec::with_capacity(rows.len());
        for row in rows {
            let key: &[u8] = row.get(0);
            // The column's check keeps every key 32 bytes long.
            let Ok(user) = IdentityKey::try_from(key) else {
                continue;
            };
            lists.push(device_list_row(user, &row)?);
        }
        Ok(lists)
    }

    /// Replaces the list only if it is still the one this command read (the
    /// same version, or none): another node's list stored meanwhile makes
    /// this command run again, and then it sees that list. Versions only
    /// rise, so an equal version is the very list that was read.
    fn is_removed_device(&mut self, user: &IdentityKey, device: &IdentityKey) -> Result<bool, PgError> {
        let row = self.query_opt(
            "SELECT 1 FROM removed_devices WHERE user_key = $1 AND device_key = $2",
            &[&user.as_bytes().as_slice(), &device.as_bytes().as_slice()],
        )?;
        Ok(row.is_some())
    }

    fn remove_devices(
        &mut self,
        user: &IdentityKey,
        devices: &[IdentityKey],
        now: i64,
    ) -> Result<(), PgError> {
        for device in devices {
            self.execute(
                "INSERT INTO removed_devices (user_key, device_key, removed_at) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&user.as_bytes().as_slice(), &device.as_bytes().as_slice(), &now],
            )?;
        }
        Ok(())
    }

    fn put_device_list(&mut self, list: &SignedDeviceList, now: i64) -> Result<(), PgError> {
        let user = list.list().user();
        let columns = DeviceListColumns::of(list);
        let params: [&(dyn ToSql + Sync); 5] = [
            &user.as_bytes().as_slice(),
            &columns.version,
            &columns.devices,
            &columns.signature.as_slice(),
            &now,
        ];
        let written = match self.device_lists_read.get(user).copied() {
            Some(Some(read)) => self.execute(
                "UPDATE device_lists SET version = $2, devices = $3, signature = $4, updated_at = $5
                 WHERE user_key = $1 AND version = $6",
                &[params[0], params[1], params[2], params[3], params[4], &read],
            )?,
            // No list when read: one inserted meanwhile wins; the insert
            // waits for its transaction and then does nothing.
            Some(None) => self.execute(
                "INSERT INTO device_lists (user_key, version, devices, signature, updated_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &params,
            )?,
            // Not read by this command: the rules always read first, so
            // this is a caller that means to overwrite.
            None => self.execute(
                "INSERT INTO device_lists (user_key, version, devices, signature, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_key) DO UPDATE SET version = excluded.version,
                     devices = excluded.devices, signature = excluded.signature,
                     updated_at = excluded.updated_at",
                &params,
            )?,
        };
        if written == 0 {
            return Err(PgError::Raced("the user's device list"));
        }
        self.device_lists_read.insert(*user, Some(columns.version));
        Ok(())
    }

    fn key_backup(&mut self, backup: &BackupRef) -> Result<Option<Vec<u8>>, PgError> {
        let row = self.query_opt(
            "SELECT sealed FROM key_backups WHERE backup = $1",
            &[&backup.as_bytes().as_slice()],
        )?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Two nodes storing one device's backup at once: the one committed
    /// last wins, as it would on one node.
    fn put_key_backup(&mut self, backup: &BackupRef, sealed: &[u8], now: i64) -> Result<(), PgError> {
        self.execute(
            "INSERT INTO key_backups (backup, sealed, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (backup) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            &[&backup.as_bytes().as_slice(), &sealed, &now],
        )?;
        Ok(())
    }

    fn knows(&mut self, identity: &IdentityKey) -> Result<bool, PgError> {
        let key = identity.as_bytes().as_slice();
        let row = self.query_opt(
            "SELECT EXISTS (SELECT 1 FROM key_packages WHERE identity_key = $1)
                 OR EXISTS (SELECT 1 FROM queues WHERE recipient_key = $1 AND depth > 0)
                 OR EXISTS (SELECT 1 FROM device_lists WHERE user_key = $1)",
            &[&key],
        )?;
        Ok(row.is_some_and(|row| row.get(0)))
    }

    fn totals(&mut self) -> Result<Totals, PgError> {
        // `queues` keeps each queue's depth: one row per queue.
        let row = self.query_opt(
            "SELECT (SELECT coalesce(sum(depth), 0)::bigint FROM queues),
                    (SELECT count(*) FROM key_packages)",
            &[],
        )?;
        Ok(row.map_or(Totals::default(), |row| Totals {
            messages_queued: count(row.get(0)),
            key_packages_stored: count(row.get(1)),
        }))
    }
}

/// The device list of `user` in a row ending in `version, devices,
/// signature`.
fn device_list_row(user: IdentityKey, row: &Row) -> Result<SignedDeviceList, PgError> {
    let columns = row.len();
    let version: i64 = row.get(columns - 3);
    let devices: &[u8] = row.get(columns - 2);
    let signature: &[u8] = row.get(columns - 1);
    DeviceListColumns::read(user, version, devices, signature).map_err(PgError::Damaged)
}
