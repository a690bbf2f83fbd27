//! The local inbox: payloads fetched from the node wait here until they are
//! processed. The node's fetch removes them from its queue, so they are
//! written here in one transaction before any is processed, and each is
//! deleted in the same transaction that applies it.

use quicnprotochat_core::{QueuedMessage, Seq};
use rusqlite::{OptionalExtension, params};

use super::{StateError, StateFile, unix_now};

/// Inbox entries waiting for Commits not processed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptBack {
    /// How many.
    pub entries: i64,
    /// Their payloads' total size.
    pub bytes: i64,
}

/// A message waiting in the inbox.
#[derive(Debug, Clone)]
pub struct InboxEntry {
    /// Its row, to apply or remove it by.
    pub id: i64,
    /// The node's sequence number for it, if it came from a queue.
    pub seq: Option<Seq>,
    /// The message as the node delivered it.
    pub payload: Vec<u8>,
}

impl StateFile {
    /// Appends payloads to the inbox in one transaction, without sequence
    /// numbers (tests store payloads that came from no queue).
    pub fn push_inbox(&self, payloads: &[Vec<u8>]) -> Result<(), StateError> {
        let transaction = self.transaction()?;
        insert_entries(
            &transaction,
            payloads.iter().map(|payload| (None, payload.as_slice())),
        )?;
        transaction.commit()?;
        Ok(())
    }

    /// Appends messages fetched from node `instance` to the inbox and, in
    /// the same transaction, records the highest sequence number of the
    /// batch they came in (`last`) as stored, so a redelivery is
    /// recognised.
    pub fn push_queued(
        &self,
        instance: &[u8],
        messages: &[QueuedMessage],
        last: Seq,
    ) -> Result<(), StateError> {
        let transaction = self.transaction()?;
        transaction.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![cursor_key(instance), seq_column(last).to_be_bytes().to_vec()],
        )?;
        insert_entries(
            &transaction,
            messages
                .iter()
                .map(|message| (Some(message.seq), message.payload.as_slice())),
        )?;
        transaction.commit()?;
        Ok(())
    }

    /// The highest sequence number of node `instance` already stored.
    pub fn stored_seq(&self, instance: &[u8]) -> Result<Seq, StateError> {
        let value: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![cursor_key(instance)],
                |row| row.get(0),
            )
            .optional()?;
        Ok(value
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map_or(Seq::ZERO, |bytes| {
                Seq::new(i64::from_be_bytes(bytes).max(0) as u64)
            }))
    }

    /// The inbox, oldest first.
    pub fn inbox(&self) -> Result<Vec<InboxEntry>, StateError> {
        let mut select = self
            .connection
            .prepare("SELECT id, seq, payload FROM inbox ORDER BY id")?;
        let rows = select.query_map([], |row| {
            Ok(InboxEntry {
                id: row.get(0)?,
                seq: row
                    .get::<_, Option<i64>>(1)?
                    .map(|seq| Seq::new(seq.max(0) as u64)),
                payload: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Applies inbox entry `id` with `apply` (which changes MLS state
    /// through [`Self::provider`] and records what it learnt) and removes
    /// the entry, in one transaction. If `apply` fails, everything it wrote
    /// is rolled back and the entry stays; the caller decides whether to
    /// keep it for a later run or [`Self::remove_inbox`] it.
    pub fn consume_inbox_entry<T, E: From<StateError>>(
        &self,
        id: i64,
        apply: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.atomically(|| {
            let value = apply()?;
            self.remove_inbox(id)?;
            Ok(value)
        })
    }

    /// Marks entry `id` as kept back for a later run (from a later epoch
    /// than its group), unless it already is; returns when it was first kept
    /// back (Unix seconds) and whether that is now.
    pub fn keep_back(&self, id: i64) -> Result<(i64, bool), StateError> {
        let now = unix_now();
        let newly = self.connection.execute(
            "UPDATE inbox SET kept_at = ?2 WHERE id = ?1 AND kept_at IS NULL",
            params![id, now],
        )? > 0;
        let first: Option<i64> = self
            .connection
            .query_row("SELECT kept_at FROM inbox WHERE id = ?1", params![id], |row| {
                row.get(0)
            })
            .optional()?
            .flatten();
        Ok((first.unwrap_or(now), newly))
    }

    /// How many entries besides `id`, with how many payload bytes, are
    /// kept back.
    pub fn kept_back_besides(&self, id: i64) -> Result<KeptBack, StateError> {
        let (entries, bytes) = self.connection.query_row(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM inbox
             WHERE kept_at IS NOT NULL AND id != ?1",
            params![id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok(KeptBack { entries, bytes })
    }

    /// Removes an inbox entry.
    pub fn remove_inbox(&self, id: i64) -> Result<(), StateError> {
        self.connection
            .execute("DELETE FROM inbox WHERE id = ?1", params![id])?;
        Ok(())
    }
}

fn cursor_key(instance: &[u8]) -> String {
    format!("stored_seq:{}", hex::encode(instance))
}

/// A sequence number as SQLite's signed integer.
fn seq_column(seq: Seq) -> i64 {
    i64::try_from(seq.get()).unwrap_or(i64::MAX)
}

/// Inserts inbox rows: (sequence number, payload).
fn insert_entries<'a>(
    transaction: &rusqlite::Transaction<'_>,
    entries: impl Iterator<Item = (Option<Seq>, &'a [u8])>,
) -> Result<(), StateError> {
    let mut insert =
        transaction.prepare_cached("INSERT INTO inbox (payload, received_at, seq) VALUES (?1, ?2, ?3)")?;
    let now = unix_now();
    for (seq, payload) in entries {
        insert.execute(params![payload, now, seq.map(seq_column)])?;
    }
    Ok(())
}
