//! Every SQL statement of the node, as typed functions. Each runs inside the
//! writer's current transaction; statements are cached by the connection.

use std::time::{SystemTime, UNIX_EPOCH};

use quicnprotochat_core::IdentityKey;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    CommitPublication, Envelope, FETCH_BUDGET_BYTES, FETCH_MAX_MESSAGES, StoreError, StoreLimits,
    ValidKeyPackage,
};

pub(super) fn insert_key_package(
    db: &Connection,
    identity: &IdentityKey,
    package: &ValidKeyPackage,
) -> rusqlite::Result<()> {
    db.prepare_cached(
        "INSERT INTO key_packages (identity_key, package, uploaded_at, last_resort, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        identity.as_bytes(),
        package.bytes,
        unix_now(),
        package.last_resort,
        i64::try_from(package.expires_at).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

/// Deletes and returns the oldest unexpired ordinary KeyPackage of
/// `identity`; if there is none, returns (and keeps) the newest unexpired
/// last-resort one. Runs on the single writer connection, so two callers can
/// never take the same row.
pub(super) fn take_key_package(db: &Connection, identity: &IdentityKey) -> rusqlite::Result<Option<Vec<u8>>> {
    let now = unix_now();
    let taken = db
        .prepare_cached(
            "DELETE FROM key_packages WHERE id =
                 (SELECT id FROM key_packages
                  WHERE identity_key = ?1 AND last_resort = 0 AND expires_at > ?2
                  ORDER BY id LIMIT 1)
             RETURNING package",
        )?
        .query_row(params![identity.as_bytes(), now], |row| row.get(0))
        .optional()?;
    if taken.is_some() {
        return Ok(taken);
    }
    db.prepare_cached(
        "SELECT package FROM key_packages
         WHERE identity_key = ?1 AND last_resort = 1 AND expires_at > ?2
         ORDER BY id DESC LIMIT 1",
    )?
    .query_row(params![identity.as_bytes(), now], |row| row.get(0))
    .optional()
}

/// (unexpired ordinary KeyPackages, whether an unexpired last-resort one exists).
pub(super) fn count_key_packages(db: &Connection, identity: &IdentityKey) -> rusqlite::Result<(u32, bool)> {
    db.prepare_cached(
        "SELECT coalesce(sum(last_resort = 0), 0), coalesce(max(last_resort), 0) FROM key_packages
         WHERE identity_key = ?1 AND expires_at > ?2",
    )?
    .query_row(params![identity.as_bytes(), unix_now()], |row| {
        Ok((
            row.get::<_, i64>(0)?.clamp(0, i64::from(u32::MAX)) as u32,
            row.get::<_, i64>(1)? != 0,
        ))
    })
}

/// Records that `sender` used `message_id`; false if it already had, in
/// which case the message was stored before and must not be stored again.
pub(super) fn claim_message_id(
    db: &Connection,
    sender: &IdentityKey,
    message_id: &[u8],
) -> rusqlite::Result<bool> {
    let inserted = db
        .prepare_cached(
            "INSERT OR IGNORE INTO message_ids (sender, message_id, created_at) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![sender.as_bytes(), message_id, unix_now()])?;
    Ok(inserted == 1)
}

/// Queues `payload` for every recipient: inline for one recipient, stored
/// once and referenced for several.
pub(super) fn insert_message(
    db: &Connection,
    recipients: &[IdentityKey],
    payload: &[u8],
) -> rusqlite::Result<()> {
    let now = unix_now();
    if let [recipient] = recipients {
        db.prepare_cached("INSERT INTO messages (recipient_key, payload, enqueued_at) VALUES (?1, ?2, ?3)")?
            .execute(params![recipient.as_bytes(), payload, now])?;
        return Ok(());
    }
    let payload_id: i64 = db
        .prepare_cached("INSERT INTO payloads (body, refs) VALUES (?1, ?2) RETURNING id")?
        .query_row(params![payload, recipients.len() as i64], |row| row.get(0))?;
    let mut insert = db.prepare_cached(
        "INSERT INTO messages (recipient_key, payload, enqueued_at, payload_id) VALUES (?1, X'', ?2, ?3)",
    )?;
    for recipient in recipients {
        insert.execute(params![recipient.as_bytes(), now, payload_id])?;
    }
    Ok(())
}

/// Queues each envelope whose message id (if any) `sender` has not used
/// yet. Fails with [`StoreError::QueueFull`] if a recipient's queue is at the
/// limit; the caller's savepoint then undoes the whole call.
pub(super) fn insert_envelopes(
    db: &Connection,
    sender: &IdentityKey,
    envelopes: &[Envelope],
    limits: &StoreLimits,
) -> Result<(), StoreError> {
    for envelope in envelopes {
        if let Some(id) = &envelope.message_id
            && !claim_message_id(db, sender, id)?
        {
            continue;
        }
        check_room(db, &envelope.recipients, limits)?;
        insert_message(db, &envelope.recipients, &envelope.payload)?;
    }
    Ok(())
}

/// Fails if any recipient's queue already holds the maximum.
fn check_room(db: &Connection, recipients: &[IdentityKey], limits: &StoreLimits) -> Result<(), StoreError> {
    let mut depth = db.prepare_cached("SELECT depth FROM queue_depths WHERE recipient_key = ?1")?;
    for recipient in recipients {
        let current: i64 = depth
            .query_row(params![recipient.as_bytes()], |row| row.get(0))
            .optional()?
            .unwrap_or(0);
        if current >= i64::try_from(limits.max_queue_depth).unwrap_or(i64::MAX) {
            return Err(StoreError::QueueFull {
                recipient: *recipient,
                limit: limits.max_queue_depth,
            });
        }
    }
    Ok(())
}

/// Deletes what has outlived the retention period: undelivered messages
/// and used message ids enqueued before `older_than` (Unix seconds), and
/// expired KeyPackages. Returns how many messages went.
pub(super) fn purge(db: &Connection, older_than: i64) -> rusqlite::Result<usize> {
    let messages = db
        .prepare_cached("DELETE FROM messages WHERE enqueued_at < ?1")?
        .execute(params![older_than])?;
    db.prepare_cached("DELETE FROM message_ids WHERE created_at < ?1")?
        .execute(params![older_than])?;
    db.prepare_cached("DELETE FROM key_packages WHERE expires_at <= ?1")?
        .execute(params![unix_now()])?;
    db.prepare_cached("DELETE FROM queue_depths WHERE depth <= 0")?
        .execute([])?;
    Ok(messages)
}

/// Publishes a group change if it is the first Commit for its group and
/// epoch: queues the Commit and the Welcome and moves the group's epoch on.
/// Returns `Err(current epoch)` on a conflict, having written nothing. A
/// retry of an accepted publication (same sender and message id) succeeds
/// without storing anything again.
pub(super) fn publish_commit(
    db: &Connection,
    sender: &IdentityKey,
    publication: &CommitPublication,
    limits: &StoreLimits,
) -> Result<(), StoreError> {
    if let Some(id) = &publication.commit.message_id
        && message_id_used(db, sender, id)?
    {
        return Ok(());
    }
    let current: Option<i64> = db
        .prepare_cached("SELECT epoch FROM group_epochs WHERE group_id = ?1")?
        .query_row(params![publication.group_id], |row| row.get(0))
        .optional()?;
    let epoch = i64::try_from(publication.epoch).unwrap_or(i64::MAX);
    // The first Commit seen for a group fixes its epoch; from then on only a
    // Commit for exactly the current epoch is accepted, so nobody can jump a
    // group's epoch ahead of its members.
    if let Some(current) = current
        && epoch != current
    {
        return Err(StoreError::CommitConflict {
            current_epoch: current as u64,
        });
    }
    db.prepare_cached(
        "INSERT INTO group_epochs (group_id, epoch) VALUES (?1, ?2)
         ON CONFLICT (group_id) DO UPDATE SET epoch = excluded.epoch",
    )?
    .execute(params![publication.group_id, epoch.saturating_add(1)])?;
    if let Some(id) = &publication.commit.message_id {
        claim_message_id(db, sender, id)?;
    }
    if !publication.commit.recipients.is_empty() {
        check_room(db, &publication.commit.recipients, limits)?;
        insert_message(db, &publication.commit.recipients, &publication.commit.payload)?;
    }
    if let Some(welcome) = &publication.welcome {
        insert_envelopes(db, sender, std::slice::from_ref(welcome), limits)?;
    }
    Ok(())
}

fn message_id_used(db: &Connection, sender: &IdentityKey, message_id: &[u8]) -> rusqlite::Result<bool> {
    db.prepare_cached("SELECT 1 FROM message_ids WHERE sender = ?1 AND message_id = ?2")?
        .query_row(params![sender.as_bytes(), message_id], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}

/// The messages of `recipient` after `after_seq`, oldest first, at most
/// `limit` and within the fetch budget. The budget counts what each message
/// costs in the Cap'n Proto answer (payload padded to a word, plus its list
/// pointer and sequence number), so a queue of many tiny messages cannot make
/// an answer the client refuses.
pub(super) fn messages_after(
    db: &Connection,
    recipient: &IdentityKey,
    after_seq: u64,
    limit: usize,
) -> rusqlite::Result<Vec<(u64, Vec<u8>)>> {
    let limit = if limit == 0 {
        FETCH_MAX_MESSAGES
    } else {
        limit.min(FETCH_MAX_MESSAGES)
    };
    let mut select = db.prepare_cached(
        "SELECT m.seq, coalesce(p.body, m.payload) FROM messages m
         LEFT JOIN payloads p ON p.id = m.payload_id
         WHERE m.recipient_key = ?1 AND m.seq > ?2 ORDER BY m.seq",
    )?;
    let mut rows = select.query(params![
        recipient.as_bytes(),
        i64::try_from(after_seq).unwrap_or(i64::MAX)
    ])?;
    let mut messages = Vec::new();
    let mut total = 0usize;
    while let Some(row) = rows.next()? {
        let payload: Vec<u8> = row.get(1)?;
        let cost = payload.len().next_multiple_of(8) + 24;
        if !messages.is_empty() && (total + cost > FETCH_BUDGET_BYTES || messages.len() >= limit) {
            break;
        }
        total += cost;
        messages.push((row.get::<_, i64>(0)? as u64, payload));
    }
    Ok(messages)
}

/// Deletes the messages of `recipient` up to and including `up_to_seq`.
pub(super) fn delete_through(
    db: &Connection,
    recipient: &IdentityKey,
    up_to_seq: u64,
) -> rusqlite::Result<usize> {
    db.prepare_cached("DELETE FROM messages WHERE recipient_key = ?1 AND seq <= ?2")?
        .execute(params![
            recipient.as_bytes(),
            i64::try_from(up_to_seq).unwrap_or(i64::MAX)
        ])
}

/// Reads the queue of `recipient` oldest first, within the fetch budget, and
/// deletes what it read.
pub(super) fn drain_messages(db: &Connection, recipient: &IdentityKey) -> rusqlite::Result<Vec<Vec<u8>>> {
    let messages = messages_after(db, recipient, 0, 0)?;
    if let Some((last, _)) = messages.last() {
        delete_through(db, recipient, *last)?;
    }
    Ok(messages.into_iter().map(|(_, payload)| payload).collect())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}
