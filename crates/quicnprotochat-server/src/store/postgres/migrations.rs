//! The node's tables on PostgreSQL: numbered migrations, applied in one
//! transaction under an advisory lock, so that nodes starting together
//! migrate once and never see a half-made schema.
//!
//! A table `quicnprotochat_meta` marks the database as a node's and records
//! the schema version and the instance id. A database with other tables and
//! no marker belongs to something else and is refused; one whose version is
//! newer than this build knows is refused too.
//!
//! Every hot statement is keyed by one recipient, one identity or one group
//! and joins no other queue, so each table can later be partitioned by hash
//! of that key or distributed by it (docs/operating.md, "Running several
//! nodes"; docs/benchmarks/journal.md, "One primary, and past it").

use postgres::Client;

use super::super::StoreError;

/// The advisory lock the migrations run under ("QNPN" and the table
/// marker's name in spirit; any fixed number would do).
const MIGRATION_LOCK: i64 = 0x514E_504E_6D69_6772;

/// What `quicnprotochat_meta.application` holds.
const APPLICATION: &[u8] = b"quicnprotochat-node";

/// The schema, one entry per version. Never edit an entry that shipped;
/// append a new one.
const MIGRATIONS: &[&str] = &[
    // Payloads are stored once per recipient (no shared payload rows), so
    // that no statement joins across queues and `messages` can be split by
    // recipient. Queue counters live in `queues`: `last_seq` gives each
    // queue its own gapless sequence, taken under the row's lock, so a
    // queue's numbers rise in commit order; `depth` and `bytes` make the
    // queue limits one lookup. Queue rows are never deleted: a queue that
    // restarted at 1 would hide new messages from a reader that acked more.
    "CREATE TABLE key_packages (
         id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         identity_key bytea NOT NULL CHECK (octet_length(identity_key) = 32),
         package bytea NOT NULL,
         uploaded_at bigint NOT NULL,
         last_resort boolean NOT NULL,
         expires_at bigint NOT NULL
     );
     CREATE INDEX key_packages_serving ON key_packages (identity_key, last_resort, id);
     CREATE INDEX key_packages_by_expiry ON key_packages (expires_at);
     CREATE TABLE queues (
         recipient_key bytea PRIMARY KEY CHECK (octet_length(recipient_key) = 32),
         last_seq bigint NOT NULL DEFAULT 0,
         depth bigint NOT NULL DEFAULT 0,
         bytes bigint NOT NULL DEFAULT 0
     );
     CREATE TABLE messages (
         recipient_key bytea NOT NULL,
         seq bigint NOT NULL,
         payload bytea NOT NULL,
         enqueued_at bigint NOT NULL,
         PRIMARY KEY (recipient_key, seq)
     );
     -- Ciphertext does not compress: skip the attempt.
     ALTER TABLE messages ALTER COLUMN payload SET STORAGE EXTERNAL;
     -- Retention scans by age; a BRIN index costs next to nothing per insert.
     CREATE INDEX messages_by_age ON messages USING brin (enqueued_at);
     CREATE TABLE message_ids (
         sender bytea NOT NULL,
         message_id bytea NOT NULL,
         created_at bigint NOT NULL,
         PRIMARY KEY (sender, message_id)
     );
     CREATE INDEX message_ids_by_age ON message_ids USING brin (created_at);
     CREATE TABLE group_epochs (
         group_id bytea PRIMARY KEY,
         epoch bigint NOT NULL
     );
     CREATE TABLE group_views (
         group_id bytea PRIMARY KEY,
         view bytea NOT NULL,
         changed_at bigint NOT NULL
     );
     CREATE INDEX group_views_by_age ON group_views (changed_at);
     CREATE TABLE welcome_trees (
         group_id bytea NOT NULL,
         epoch bigint NOT NULL,
         tree bytea NOT NULL,
         joiners bytea NOT NULL,
         created_at bigint NOT NULL,
         PRIMARY KEY (group_id, epoch)
     );
     CREATE INDEX welcome_trees_by_age ON welcome_trees (created_at);",
    // 2: each user's signed device list (protocol 5), the latest only.
    // `version` is the u64's bit pattern (see `DeviceListColumns`);
    // `devices` the 32-byte device keys, concatenated, ascending (1 to 64).
    "CREATE TABLE device_lists (
         user_key bytea PRIMARY KEY CHECK (octet_length(user_key) = 32),
         version bigint NOT NULL,
         devices bytea NOT NULL
             CHECK (octet_length(devices) BETWEEN 32 AND 2048 AND octet_length(devices) % 32 = 0),
         signature bytea NOT NULL CHECK (octet_length(signature) = 64),
         updated_at bigint NOT NULL
     );",
    // 3: KeyPackages of each MLS ciphersuite (protocol 6) are a stock of
    // their own: served, counted and limited per identity and suite.
    // `ciphersuite` is the suite's code point (a u16, too big for
    // smallint); every KeyPackage stored before is 0x0001, the only suite
    // uploads took. The default only fills those rows: the node names the
    // suite of every new one, and an insert that forgot it must fail.
    // Every fetch and count names identity and suite, so the serving index
    // leads with both.
    "ALTER TABLE key_packages ADD COLUMN ciphersuite integer NOT NULL DEFAULT 1
         CHECK (ciphersuite BETWEEN 0 AND 65535);
     ALTER TABLE key_packages ALTER COLUMN ciphersuite DROP DEFAULT;
     DROP INDEX key_packages_serving;
     CREATE INDEX key_packages_serving ON key_packages (identity_key, ciphersuite, last_resort, id);",
    // 4: a digest of each group's current state (protocol 7), kept past
    // the view: a forgotten group is handed over again only in exactly
    // that state, so a stranger who knows its id cannot take it. NULL for
    // groups changed before.
    "ALTER TABLE group_epochs ADD COLUMN fingerprint bytea
         CHECK (fingerprint IS NULL OR octet_length(fingerprint) = 32);",
    // 5: devices a user's list dropped (protocol 7): no later list may name
    // them again, whoever uploads it, so a removed device that still holds
    // the user key cannot put itself back.
    "CREATE TABLE removed_devices (
         user_key bytea NOT NULL CHECK (octet_length(user_key) = 32),
         device_key bytea NOT NULL CHECK (octet_length(device_key) = 32),
         removed_at bigint NOT NULL,
         PRIMARY KEY (user_key, device_key)
     );",
    // 6: standalone proposals kept beside the group's view, one row each,
    // so that keeping one does not rewrite the whole view (the tree); and
    // two nodes keeping proposals of one group at once both keep theirs.
    // `id` keeps their order; a Commit (a new view) deletes them.
    "CREATE TABLE group_proposals (
         id bigserial PRIMARY KEY,
         group_id bytea NOT NULL,
         epoch bigint NOT NULL,
         item bytea NOT NULL
     );
     CREATE INDEX group_proposals_by_group ON group_proposals (group_id, epoch, id);",
    // 7: the SHA-256 of each KeyPackage, so one stored already is not
    // stored (and served) twice. NULL for KeyPackages stored before.
    "ALTER TABLE key_packages ADD COLUMN fingerprint bytea
         CHECK (fingerprint IS NULL OR octet_length(fingerprint) = 32);
     CREATE INDEX key_packages_by_fingerprint ON key_packages (identity_key, fingerprint);",
    // 8: groups keyed by `group_ref`, SHA-256("quicnprotochat group" ||
    // id) (`GroupRef`), never by their id: a dump does not hold the ids,
    // which creators may have put names in. Tables with the id as key are
    // rebuilt rather than updated in place, so that no id can collide
    // with another group's new key half-way.
    "CREATE TABLE group_epochs_v8 (
         group_ref bytea PRIMARY KEY CHECK (octet_length(group_ref) = 32),
         epoch bigint NOT NULL,
         fingerprint bytea CHECK (fingerprint IS NULL OR octet_length(fingerprint) = 32)
     );
     INSERT INTO group_epochs_v8 (group_ref, epoch, fingerprint)
         SELECT sha256(convert_to('quicnprotochat group', 'UTF8') || group_id), epoch, fingerprint
         FROM group_epochs;
     DROP TABLE group_epochs;
     ALTER TABLE group_epochs_v8 RENAME TO group_epochs;
     CREATE TABLE group_views_v8 (
         group_ref bytea PRIMARY KEY CHECK (octet_length(group_ref) = 32),
         view bytea NOT NULL,
         changed_at bigint NOT NULL
     );
     INSERT INTO group_views_v8 (group_ref, view, changed_at)
         SELECT sha256(convert_to('quicnprotochat group', 'UTF8') || group_id), view, changed_at
         FROM group_views;
     DROP TABLE group_views;
     ALTER TABLE group_views_v8 RENAME TO group_views;
     CREATE INDEX group_views_by_age ON group_views (changed_at);
     CREATE TABLE welcome_trees_v8 (
         group_ref bytea NOT NULL CHECK (octet_length(group_ref) = 32),
         epoch bigint NOT NULL,
         tree bytea NOT NULL,
         joiners bytea NOT NULL,
         created_at bigint NOT NULL,
         PRIMARY KEY (group_ref, epoch)
     );
     INSERT INTO welcome_trees_v8 (group_ref, epoch, tree, joiners, created_at)
         SELECT sha256(convert_to('quicnprotochat group', 'UTF8') || group_id), epoch, tree, joiners, created_at
         FROM welcome_trees;
     DROP TABLE welcome_trees;
     ALTER TABLE welcome_trees_v8 RENAME TO welcome_trees;
     CREATE INDEX welcome_trees_by_age ON welcome_trees (created_at);
     UPDATE group_proposals SET group_id = sha256(convert_to('quicnprotochat group', 'UTF8') || group_id);
     ALTER TABLE group_proposals RENAME COLUMN group_id TO group_ref;",
    // 9: message ids kept as `MessageKey`, SHA-256("quicnprotochat message
    // id" || sender || id), so a dump does not say who sent what. The ids
    // already claimed carry over, so a retry across the upgrade is still
    // stored once.
    "CREATE TABLE message_keys (
         message_key bytea PRIMARY KEY CHECK (octet_length(message_key) = 32),
         created_at bigint NOT NULL
     );
     INSERT INTO message_keys (message_key, created_at)
         SELECT sha256(convert_to('quicnprotochat message id', 'UTF8') || sender || message_id), created_at
         FROM message_ids
         ON CONFLICT DO NOTHING;
     DROP TABLE message_ids;
     CREATE INDEX message_keys_by_age ON message_keys USING brin (created_at);",
    // 10: each device's key backup, one opaque sealed blob, kept under
    // `backup`, SHA-256("quicnprotochat key backup" || secret)
    // (`BackupRef`): the secret its device presents is never stored, so a
    // dump does not say whose backup a row is. Never purged (see
    // `delivery::key_backups`).
    "CREATE TABLE key_backups (
         backup bytea PRIMARY KEY CHECK (octet_length(backup) = 32),
         sealed bytea NOT NULL,
         updated_at bigint NOT NULL
     );
     -- Sealed: it does not compress, skip the attempt.
     ALTER TABLE key_backups ALTER COLUMN sealed SET STORAGE EXTERNAL;",
    // 11: groups' public views and proposals are kept sealed under the
    // group's state key (protocol 9), which the node never holds at rest,
    // so it cannot seal those kept before. It forgets them instead, as it
    // forgets an idle group's (their epochs and fingerprints stay): each
    // group's next change hands its state over again, under its key. The
    // old rows stay as dead tuples until the table is vacuumed.
    "DELETE FROM group_proposals;
     DELETE FROM group_views;",
];

/// The schema version this build creates.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Creates or migrates the node's tables; returns the database's instance
/// id.
pub(super) fn migrate(client: &mut Client) -> Result<[u8; 16], StoreError> {
    let mut transaction = client.transaction()?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let marked: bool = transaction
        .query_one("SELECT to_regclass('quicnprotochat_meta') IS NOT NULL", &[])?
        .get(0);
    if !marked {
        let tables: i64 = transaction
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()",
                &[],
            )?
            .get(0);
        if tables > 0 {
            return Err(StoreError::ForeignPostgres(format!(
                "it has {tables} tables and no quicnprotochat_meta"
            )));
        }
        let instance_id: [u8; 16] = rand::random();
        transaction
            .batch_execute("CREATE TABLE quicnprotochat_meta (key text PRIMARY KEY, value bytea NOT NULL)")?;
        transaction.execute(
            "INSERT INTO quicnprotochat_meta (key, value) VALUES
                 ('application', $1), ('schema_version', '0'), ('instance_id', $2)",
            &[&APPLICATION, &instance_id.as_slice()],
        )?;
    }
    let meta = |transaction: &mut postgres::Transaction<'_>, key: &str| -> Result<Vec<u8>, StoreError> {
        let row = transaction.query_opt("SELECT value FROM quicnprotochat_meta WHERE key = $1", &[&key])?;
        row.map(|row| row.get::<_, Vec<u8>>(0))
            .ok_or_else(|| StoreError::ForeignPostgres(format!("quicnprotochat_meta has no {key}")))
    };
    let application = meta(&mut transaction, "application")?;
    if application != APPLICATION {
        return Err(StoreError::ForeignPostgres(format!(
            "quicnprotochat_meta names the application {:?}",
            String::from_utf8_lossy(&application)
        )));
    }
    let found = meta(&mut transaction, "schema_version")?;
    let found: i64 = std::str::from_utf8(&found)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| StoreError::ForeignPostgres("its schema_version is not a number".into()))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let start = usize::try_from(found).unwrap_or(0);
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(start) {
        transaction.batch_execute(migration)?;
        tracing::info!(version = index + 1, "applied PostgreSQL migration");
    }
    if found < SCHEMA_VERSION {
        transaction.execute(
            "UPDATE quicnprotochat_meta SET value = $1 WHERE key = 'schema_version'",
            &[&SCHEMA_VERSION.to_string().into_bytes()],
        )?;
    }
    let instance_id = meta(&mut transaction, "instance_id")?;
    let instance_id = instance_id
        .try_into()
        .map_err(|_| StoreError::ForeignPostgres("its instance_id is not 16 bytes".into()))?;
    transaction.commit()?;
    Ok(instance_id)
}
