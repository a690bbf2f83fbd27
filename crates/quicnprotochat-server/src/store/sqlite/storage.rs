//! [`Storage`] on SQLite: the statements the rules need, as typed functions
//! on the writer's (or the reader's) connection, inside its current
//! transaction. Statements are cached by the connection. The schema they
//! run against is in `migrations`.

use quicnprotochat_core::{
    BackupRef, GroupRef, IdentityKey, KeyPackageStock, MessageKey, Seq, SignedDeviceList, Suite,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::delivery::{DeviceListColumns, KeyPackageRow, QueueUsage, Storage, Totals, WelcomeTree};
use crate::store::commands::Transact;
use crate::store::{StoreError, ValidKeyPackage};

/// One command's view of a connection.
pub(in crate::store) struct SqliteStorage<'c> {
    db: &'c Connection,
}

impl<'c> SqliteStorage<'c> {
    pub(in crate::store) fn new(db: &'c Connection) -> Self {
        Self { db }
    }
}

impl Transact for SqliteStorage<'_> {
    fn decide<T, R>(
        &mut self,
        mut work: impl FnMut(&mut Self) -> rusqlite::Result<Result<T, R>>,
    ) -> Result<Result<T, R>, StoreError> {
        // Cached statements: a savepoint per command is on the hot path.
        self.db.prepare_cached("SAVEPOINT command")?.execute([])?;
        let outcome = work(self);
        if matches!(outcome, Ok(Ok(_))) {
            self.db.prepare_cached("RELEASE command")?.execute([])?;
        } else if let Err(rollback) = self.db.execute_batch("ROLLBACK TO command; RELEASE command") {
            tracing::error!("rolling back a refused or failed command: {rollback}");
        }
        Ok(outcome?)
    }
}

/// Sequence numbers and epochs are below 2^63 in practice; a larger value
/// asked for (a client's `afterSeq` of u64::MAX) means "beyond everything".
fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Storage for SqliteStorage<'_> {
    type Error = rusqlite::Error;

    fn insert_key_package(
        &mut self,
        identity: &IdentityKey,
        package: &ValidKeyPackage,
        now: i64,
    ) -> rusqlite::Result<()> {
        self.db
            .prepare_cached(
                "INSERT INTO key_packages (identity_key, package, uploaded_at, last_resort, expires_at, ciphersuite, fingerprint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                identity.as_bytes(),
                package.bytes,
                now,
                package.last_resort,
                sql_int(package.expires_at),
                package.suite.code(),
                &package.fingerprint[..],
            ])?;
        Ok(())
    }

    fn has_key_package(&mut self, identity: &IdentityKey, fingerprint: &[u8; 32]) -> rusqlite::Result<bool> {
        Ok(self
            .db
            .prepare_cached("SELECT 1 FROM key_packages WHERE identity_key = ?1 AND fingerprint = ?2")?
            .query_row(params![identity.as_bytes(), &fingerprint[..]], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn oldest_key_package(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> rusqlite::Result<Option<(KeyPackageRow, Vec<u8>)>> {
        self.db
            .prepare_cached(
                "SELECT id, package FROM key_packages
                 WHERE identity_key = ?1 AND ciphersuite = ?2 AND last_resort = 0 AND expires_at > ?3
                 ORDER BY id LIMIT 1",
            )?
            .query_row(params![identity.as_bytes(), suite.code(), now], |row| {
                Ok((KeyPackageRow(row.get(0)?), row.get(1)?))
            })
            .optional()
    }

    fn delete_key_package(&mut self, row: KeyPackageRow) -> rusqlite::Result<()> {
        self.db
            .prepare_cached("DELETE FROM key_packages WHERE id = ?1")?
            .execute(params![row.0])?;
        Ok(())
    }

    fn newest_last_resort(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> rusqlite::Result<Option<Vec<u8>>> {
        self.db
            .prepare_cached(
                "SELECT package FROM key_packages
                 WHERE identity_key = ?1 AND ciphersuite = ?2 AND last_resort = 1 AND expires_at > ?3
                 ORDER BY id DESC LIMIT 1",
            )?
            .query_row(params![identity.as_bytes(), suite.code(), now], |row| row.get(0))
            .optional()
    }

    fn count_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> rusqlite::Result<KeyPackageStock> {
        self.db
            .prepare_cached(
                "SELECT coalesce(sum(last_resort = 0), 0), coalesce(max(last_resort), 0) FROM key_packages
                 WHERE identity_key = ?1 AND ciphersuite = ?2 AND expires_at > ?3",
            )?
            .query_row(params![identity.as_bytes(), suite.code(), now], |row| {
                Ok(KeyPackageStock {
                    count: row.get::<_, i64>(0)?.clamp(0, i64::from(u32::MAX)) as u32,
                    has_last_resort: row.get::<_, i64>(1)? != 0,
                })
            })
    }

    fn stored_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> rusqlite::Result<u64> {
        let count: i64 = self
            .db
            .prepare_cached(
                "SELECT count(*) FROM key_packages
                 WHERE identity_key = ?1 AND ciphersuite = ?2 AND expires_at > ?3",
            )?
            .query_row(params![identity.as_bytes(), suite.code(), now], |row| row.get(0))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    fn message_id_used(&mut self, key: &MessageKey) -> rusqlite::Result<bool> {
        self.db
            .prepare_cached("SELECT 1 FROM message_keys WHERE message_key = ?1")?
            .query_row(params![key.as_bytes()], |_| Ok(()))
            .optional()
            .map(|found| found.is_some())
    }

    fn claim_message_id(&mut self, key: &MessageKey, now: i64) -> rusqlite::Result<bool> {
        let inserted = self
            .db
            .prepare_cached("INSERT OR IGNORE INTO message_keys (message_key, created_at) VALUES (?1, ?2)")?
            .execute(params![key.as_bytes(), now])?;
        Ok(inserted == 1)
    }

    fn queue_usage(&mut self, recipient: &IdentityKey) -> rusqlite::Result<QueueUsage> {
        // Kept by triggers on `messages` (V5, V9), so this is one lookup.
        let usage: Option<(i64, i64)> = self
            .db
            .prepare_cached("SELECT depth, bytes FROM queue_depths WHERE recipient_key = ?1")?
            .query_row(params![recipient.as_bytes()], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        Ok(
            usage.map_or(QueueUsage::default(), |(messages, bytes)| QueueUsage {
                messages: u64::try_from(messages).unwrap_or(0),
                bytes: u64::try_from(bytes).unwrap_or(0),
            }),
        )
    }

    /// Inline for one recipient; stored once in `payloads` and referenced
    /// for several. `seq` is the table's AUTOINCREMENT key: increasing
    /// across all queues, never reused, and with one writer, committed in
    /// order.
    fn append(&mut self, recipients: &[IdentityKey], payload: &[u8], now: i64) -> rusqlite::Result<()> {
        if let [recipient] = recipients {
            self.db
                .prepare_cached(
                    "INSERT INTO messages (recipient_key, payload, enqueued_at, size) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![recipient.as_bytes(), payload, now, payload.len() as i64])?;
            return Ok(());
        }
        let payload_id: i64 = self
            .db
            .prepare_cached("INSERT INTO payloads (body, refs) VALUES (?1, ?2) RETURNING id")?
            .query_row(params![payload, recipients.len() as i64], |row| row.get(0))?;
        let mut insert = self.db.prepare_cached(
            "INSERT INTO messages (recipient_key, payload, enqueued_at, payload_id, size) VALUES (?1, X'', ?2, ?3, ?4)",
        )?;
        for recipient in recipients {
            insert.execute(params![
                recipient.as_bytes(),
                now,
                payload_id,
                payload.len() as i64
            ])?;
        }
        Ok(())
    }

    fn scan_queue(
        &mut self,
        recipient: &IdentityKey,
        after: Seq,
        visit: &mut dyn FnMut(Seq, Vec<u8>) -> bool,
    ) -> rusqlite::Result<()> {
        let mut select = self.db.prepare_cached(
            "SELECT m.seq, coalesce(p.body, m.payload) FROM messages m
             LEFT JOIN payloads p ON p.id = m.payload_id
             WHERE m.recipient_key = ?1 AND m.seq > ?2 ORDER BY m.seq",
        )?;
        let mut rows = select.query(params![recipient.as_bytes(), sql_int(after.get())])?;
        while let Some(row) = rows.next()? {
            let seq = Seq::new(u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0));
            if !visit(seq, row.get(1)?) {
                break;
            }
        }
        Ok(())
    }

    fn delete_through(&mut self, recipient: &IdentityKey, up_to: Seq) -> rusqlite::Result<usize> {
        self.db
            .prepare_cached("DELETE FROM messages WHERE recipient_key = ?1 AND seq <= ?2")?
            .execute(params![recipient.as_bytes(), sql_int(up_to.get())])
    }

    fn group_epoch(&mut self, group: &GroupRef) -> rusqlite::Result<Option<u64>> {
        let epoch: Option<i64> = self
            .db
            .prepare_cached("SELECT epoch FROM group_epochs WHERE group_ref = ?1")?
            .query_row(params![group.as_bytes()], |row| row.get(0))
            .optional()?;
        Ok(epoch.map(|epoch| u64::try_from(epoch).unwrap_or(0)))
    }

    fn set_group_epoch(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        fingerprint: &[u8; 32],
    ) -> rusqlite::Result<()> {
        self.db
            .prepare_cached(
                "INSERT INTO group_epochs (group_ref, epoch, fingerprint) VALUES (?1, ?2, ?3)
                 ON CONFLICT (group_ref) DO UPDATE SET epoch = excluded.epoch, fingerprint = excluded.fingerprint",
            )?
            .execute(params![group.as_bytes(), sql_int(epoch), &fingerprint[..]])?;
        Ok(())
    }

    fn group_fingerprint(&mut self, group: &GroupRef) -> rusqlite::Result<Option<[u8; 32]>> {
        let fingerprint: Option<Option<Vec<u8>>> = self
            .db
            .prepare_cached("SELECT fingerprint FROM group_epochs WHERE group_ref = ?1")?
            .query_row(params![group.as_bytes()], |row| row.get(0))
            .optional()?;
        Ok(fingerprint.flatten().and_then(|bytes| bytes.try_into().ok()))
    }

    fn group_view(&mut self, group: &GroupRef) -> rusqlite::Result<Option<Vec<u8>>> {
        self.db
            .prepare_cached("SELECT view FROM group_views WHERE group_ref = ?1")?
            .query_row(params![group.as_bytes()], |row| row.get(0))
            .optional()
    }

    fn set_group_view(&mut self, group: &GroupRef, view: &[u8], now: i64) -> rusqlite::Result<()> {
        self.db
            .prepare_cached(
                "INSERT INTO group_views (group_ref, view, changed_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (group_ref) DO UPDATE SET view = excluded.view, changed_at = excluded.changed_at",
            )?
            .execute(params![group.as_bytes(), view, now])?;
        self.db
            .prepare_cached("DELETE FROM group_proposals WHERE group_ref = ?1")?
            .execute(params![group.as_bytes()])?;
        Ok(())
    }

    fn group_proposals(&mut self, group: &GroupRef, epoch: u64) -> rusqlite::Result<Vec<Vec<u8>>> {
        self.db
            .prepare_cached(
                "SELECT item FROM group_proposals WHERE group_ref = ?1 AND epoch = ?2 ORDER BY id",
            )?
            .query_map(params![group.as_bytes(), sql_int(epoch)], |row| row.get(0))?
            .collect()
    }

    fn add_group_proposal(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        item: &[u8],
        now: i64,
    ) -> rusqlite::Result<()> {
        self.db
            .prepare_cached("INSERT INTO group_proposals (group_ref, epoch, item) VALUES (?1, ?2, ?3)")?
            .execute(params![group.as_bytes(), sql_int(epoch), item])?;
        self.db
            .prepare_cached("UPDATE group_views SET changed_at = ?2 WHERE group_ref = ?1")?
            .execute(params![group.as_bytes(), now])?;
        Ok(())
    }

    fn purge_idle_groups(&mut self, before: i64) -> rusqlite::Result<usize> {
        let purged = self
            .db
            .prepare_cached("DELETE FROM group_views WHERE changed_at < ?1")?
            .execute(params![before])?;
        if purged > 0 {
            self.db
                .prepare_cached(
                    "DELETE FROM group_proposals
                     WHERE NOT EXISTS (SELECT 1 FROM group_views WHERE group_views.group_ref = group_proposals.group_ref)",
                )?
                .execute([])?;
        }
        Ok(purged)
    }

    fn put_welcome_tree(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        sealed: &[u8],
        keep: usize,
        now: i64,
    ) -> rusqlite::Result<()> {
        // No joiners: the seal's key is the permission (protocol 8).
        self.db
            .prepare_cached(
                "INSERT OR REPLACE INTO welcome_trees (group_ref, epoch, tree, joiners, created_at)
                 VALUES (?1, ?2, ?3, X'', ?4)",
            )?
            .execute(params![group.as_bytes(), sql_int(epoch), sealed, now])?;
        self.db
            .prepare_cached(
                "DELETE FROM welcome_trees WHERE group_ref = ?1 AND epoch NOT IN
                     (SELECT epoch FROM welcome_trees WHERE group_ref = ?1 ORDER BY epoch DESC LIMIT ?2)",
            )?
            .execute(params![group.as_bytes(), i64::try_from(keep).unwrap_or(i64::MAX)])?;
        Ok(())
    }

    fn welcome_tree(&mut self, group: &GroupRef, epoch: u64) -> rusqlite::Result<Option<WelcomeTree>> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .db
            .prepare_cached("SELECT tree, joiners FROM welcome_trees WHERE group_ref = ?1 AND epoch = ?2")?
            .query_row(params![group.as_bytes(), sql_int(epoch)], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        Ok(row.map(|(tree, joiners): (Vec<u8>, Vec<u8>)| WelcomeTree::from_columns(tree, &joiners)))
    }

    fn purge(&mut self, older_than: i64, now: i64) -> rusqlite::Result<usize> {
        self.db
            .prepare_cached("DELETE FROM welcome_trees WHERE created_at < ?1")?
            .execute(params![older_than])?;
        // Sequence numbers follow arrival, so the old messages are the ones
        // before the first young one: a scan in sequence order that stops
        // there, instead of an index on the arrival time that every enqueue
        // and ack would update. (A message stamped before a backward step
        // of the clock waits until the ones before it are old too.)
        let messages = self
            .db
            .prepare_cached(
                "DELETE FROM messages WHERE seq < coalesce(
                     (SELECT seq FROM messages WHERE enqueued_at >= ?1 ORDER BY seq LIMIT 1),
                     (SELECT max(seq) FROM messages) + 1)",
            )?
            .execute(params![older_than])?;
        self.db
            .prepare_cached("DELETE FROM message_keys WHERE created_at < ?1")?
            .execute(params![older_than])?;
        self.db
            .prepare_cached("DELETE FROM key_packages WHERE expires_at <= ?1")?
            .execute(params![now])?;
        self.db
            .prepare_cached("DELETE FROM queue_depths WHERE depth <= 0")?
            .execute([])?;
        Ok(messages)
    }

    fn device_list(&mut self, user: &IdentityKey) -> rusqlite::Result<Option<SignedDeviceList>> {
        self.db
            .prepare_cached("SELECT version, devices, signature FROM device_lists WHERE user_key = ?1")?
            .query_row(params![user.as_bytes()], |row| device_list_row(*user, row))
            .optional()
    }

    /// One lookup per user: each is a primary-key probe on a connection in
    /// this process, cheaper than building a statement for the whole set.
    fn device_lists(&mut self, users: &[IdentityKey]) -> rusqlite::Result<Vec<SignedDeviceList>> {
        let mut lists = Vec::new();
        for user in users {
            lists.extend(self.device_list(user)?);
        }
        Ok(lists)
    }

    fn put_device_list(&mut self, list: &SignedDeviceList, now: i64) -> rusqlite::Result<()> {
        let columns = DeviceListColumns::of(list);
        self.db
            .prepare_cached(
                "INSERT INTO device_lists (user_key, version, devices, signature, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_key) DO UPDATE SET version = excluded.version,
                     devices = excluded.devices, signature = excluded.signature,
                     updated_at = excluded.updated_at",
            )?
            .execute(params![
                list.list().user().as_bytes(),
                columns.version,
                columns.devices,
                columns.signature,
                now
            ])?;
        Ok(())
    }

    fn is_removed_device(&mut self, user: &IdentityKey, device: &IdentityKey) -> rusqlite::Result<bool> {
        self.db
            .prepare_cached("SELECT 1 FROM removed_devices WHERE user_key = ?1 AND device_key = ?2")?
            .exists(params![user.as_bytes(), device.as_bytes()])
    }

    fn remove_devices(
        &mut self,
        user: &IdentityKey,
        devices: &[IdentityKey],
        now: i64,
    ) -> rusqlite::Result<()> {
        let mut insert = self.db.prepare_cached(
            "INSERT INTO removed_devices (user_key, device_key, removed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )?;
        for device in devices {
            insert.execute(params![user.as_bytes(), device.as_bytes(), now])?;
        }
        Ok(())
    }

    fn key_backup(&mut self, backup: &BackupRef) -> rusqlite::Result<Option<Vec<u8>>> {
        self.db
            .prepare_cached("SELECT sealed FROM key_backups WHERE backup = ?1")?
            .query_row(params![backup.as_bytes()], |row| row.get(0))
            .optional()
    }

    fn put_key_backup(&mut self, backup: &BackupRef, sealed: &[u8], now: i64) -> rusqlite::Result<()> {
        self.db
            .prepare_cached(
                "INSERT INTO key_backups (backup, sealed, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (backup) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            )?
            .execute(params![backup.as_bytes(), sealed, now])?;
        Ok(())
    }

    fn knows(&mut self, identity: &IdentityKey) -> rusqlite::Result<bool> {
        let key = identity.as_bytes().as_slice();
        self.db
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM key_packages WHERE identity_key = ?1)
                     OR EXISTS (SELECT 1 FROM queue_depths WHERE recipient_key = ?1 AND depth > 0)
                     OR EXISTS (SELECT 1 FROM device_lists WHERE user_key = ?1)",
            )?
            .query_row([key], |row| row.get(0))
    }

    fn totals(&mut self) -> rusqlite::Result<Totals> {
        // `queue_depths` is kept by triggers: one row per queue, not per
        // message.
        let (messages, key_packages): (i64, i64) = self
            .db
            .prepare_cached(
                "SELECT (SELECT coalesce(sum(depth), 0) FROM queue_depths),
                        (SELECT count(*) FROM key_packages)",
            )?
            .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(Totals {
            messages_queued: u64::try_from(messages).unwrap_or(0),
            key_packages_stored: u64::try_from(key_packages).unwrap_or(0),
        })
    }
}

/// The device list of `user` in a row of `version, devices, signature`.
fn device_list_row(user: IdentityKey, row: &rusqlite::Row<'_>) -> rusqlite::Result<SignedDeviceList> {
    let devices: Vec<u8> = row.get(1)?;
    let signature: Vec<u8> = row.get(2)?;
    DeviceListColumns::read(user, row.get(0)?, &devices, &signature).map_err(|damaged| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, Box::new(damaged))
    })
}
