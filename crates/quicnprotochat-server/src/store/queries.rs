//! Every SQL statement of the node, as typed functions. Each runs inside the
//! writer's current transaction; statements are cached by the connection.

use std::time::{SystemTime, UNIX_EPOCH};

use quicnprotochat_core::IdentityKey;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Envelope, FETCH_BUDGET_BYTES, FETCH_MAX_MESSAGES, ValidKeyPackage};

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

pub(super) fn insert_message(
    db: &Connection,
    recipient: &IdentityKey,
    payload: &[u8],
) -> rusqlite::Result<()> {
    db.prepare_cached("INSERT INTO messages (recipient_key, payload, enqueued_at) VALUES (?1, ?2, ?3)")?
        .execute(params![recipient.as_bytes(), payload, unix_now()])?;
    Ok(())
}

/// Queues each envelope's payload for each of its recipients.
pub(super) fn insert_envelopes(db: &Connection, envelopes: &[Envelope]) -> rusqlite::Result<()> {
    for envelope in envelopes {
        for recipient in &envelope.recipients {
            insert_message(db, recipient, &envelope.payload)?;
        }
    }
    Ok(())
}

/// Reads the queue of `recipient` oldest first, up to the fetch budget, and
/// deletes what it read. The budget counts what each message costs in the
/// Cap'n Proto answer (payload padded to a word, plus its list pointer), so a
/// queue of many tiny messages cannot make an answer the client refuses.
pub(super) fn drain_messages(db: &Connection, recipient: &IdentityKey) -> rusqlite::Result<Vec<Vec<u8>>> {
    let mut payloads = Vec::new();
    let mut last_seq = None;
    let mut total = 0usize;
    {
        let mut select =
            db.prepare_cached("SELECT seq, payload FROM messages WHERE recipient_key = ?1 ORDER BY seq")?;
        let mut rows = select.query(params![recipient.as_bytes()])?;
        while let Some(row) = rows.next()? {
            let payload: Vec<u8> = row.get(1)?;
            let cost = payload.len().next_multiple_of(8) + 8;
            if !payloads.is_empty()
                && (total + cost > FETCH_BUDGET_BYTES || payloads.len() >= FETCH_MAX_MESSAGES)
            {
                break;
            }
            total += cost;
            last_seq = Some(row.get::<_, i64>(0)?);
            payloads.push(payload);
        }
    }
    if let Some(last_seq) = last_seq {
        db.prepare_cached("DELETE FROM messages WHERE recipient_key = ?1 AND seq <= ?2")?
            .execute(params![recipient.as_bytes(), last_seq])?;
    }
    Ok(payloads)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}
