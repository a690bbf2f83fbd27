//! The groups this client is in, and the current group (the one commands
//! use when no `--group-id` is given); creating, leaving and rejoining one.

use quicnprotochat_core::{GroupId, GroupMember, IdentityKeypair, KeyBackup, StateKey, Suite};
use rusqlite::{OptionalExtension, params};

use super::{GroupRecord, StateError, StateFile, unix_now};

impl StateFile {
    /// Creates the MLS group `group_id` called `name` with `identity` as
    /// its only member and records it as the current group, in one
    /// transaction.
    pub fn create_group(
        &self,
        identity: &IdentityKeypair,
        group_id: &GroupId,
        name: &str,
        suite: Suite,
    ) -> Result<GroupMember, StateError> {
        self.atomically(|| {
            let group = GroupMember::create_with_suite(&self.provider(), identity, group_id, suite)?;
            self.record_group(group_id, true)?;
            self.set_state_key(group_id, &group.current_state_key(&self.provider())?)?;
            self.name_group(group_id, name)?;
            Ok(group)
        })
    }

    /// Gives `group_id` the name `name` unless it has one; returns whether
    /// it did. The first name sticks, so a member who sends another one
    /// later cannot make `--group-id NAME` mean a different group.
    pub fn name_group(&self, group_id: &GroupId, name: &str) -> Result<bool, StateError> {
        let named = self.connection.execute(
            "UPDATE groups SET name = ?2 WHERE group_id = ?1 AND name IS NULL",
            params![group_id.as_bytes(), name],
        )?;
        Ok(named == 1)
    }

    /// The name of `group_id`, if it is ours and has one.
    pub fn group_name(&self, group_id: &[u8]) -> Result<Option<String>, StateError> {
        Ok(self
            .connection
            .query_row(
                "SELECT name FROM groups WHERE group_id = ?1",
                params![group_id],
                |row| row.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Makes our request to leave `group` and notes that we asked, in one
    /// transaction; returns the proposal to send to the other members.
    pub fn leave_group(
        &self,
        group_id: &GroupId,
        group: &mut GroupMember,
        identity: &IdentityKeypair,
    ) -> Result<Vec<u8>, StateError> {
        self.atomically(|| {
            let proposal = group.leave(&self.provider(), identity)?;
            self.mark_left(group_id)?;
            Ok(proposal)
        })
    }

    /// Takes back our own proposals in `group` (the node did not take our
    /// request to leave) and the note that we asked to leave, in one
    /// transaction.
    pub fn withdraw_proposals(&self, group_id: &GroupId, group: &mut GroupMember) -> Result<(), StateError> {
        self.atomically(|| {
            group.withdraw_own_proposals(&self.provider())?;
            self.connection.execute(
                "UPDATE groups SET left_at = NULL WHERE group_id = ?1",
                params![group_id.as_bytes()],
            )?;
            Ok(())
        })
    }

    /// Records that this client is in `group_id`; with `make_current`, it
    /// becomes the current group.
    pub fn record_group(&self, group_id: &GroupId, make_current: bool) -> Result<(), StateError> {
        let now = unix_now();
        self.connection.execute(
            "INSERT INTO groups (group_id, joined_at, last_used) VALUES (?1, ?2, ?2)
             ON CONFLICT (group_id) DO UPDATE SET last_used = excluded.last_used, left_at = NULL",
            params![group_id.as_bytes(), now],
        )?;
        if make_current {
            self.make_current(group_id)?;
        }
        Ok(())
    }

    /// Records that we rejoined `group_id` and makes it the current group:
    /// a record left from before (e.g. in a restored backup) is replaced,
    /// as if we had just joined.
    pub fn record_rejoined_group(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "INSERT INTO groups (group_id, joined_at, last_used) VALUES (?1, ?2, ?2)
             ON CONFLICT (group_id) DO UPDATE SET joined_at = excluded.joined_at,
                 last_used = excluded.last_used, left_at = NULL",
            params![group_id.as_bytes(), unix_now()],
        )?;
        self.make_current(group_id)
    }

    fn make_current(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "INSERT INTO settings (key, value) VALUES ('current_group', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![group_id.as_bytes()],
        )?;
        Ok(())
    }

    /// Notes that we asked to leave `group_id`; it stays listed until the
    /// other members commit our removal.
    pub fn mark_left(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "UPDATE groups SET left_at = ?2 WHERE group_id = ?1",
            params![group_id.as_bytes(), unix_now()],
        )?;
        Ok(())
    }

    /// The current group, if any.
    pub fn current_group(&self) -> Result<Option<GroupId>, StateError> {
        Ok(self
            .connection
            .query_row(
                "SELECT value FROM settings WHERE key = 'current_group'",
                [],
                |row| row.get::<_, Vec<u8>>(0),
            )
            .optional()?
            .and_then(GroupId::new))
    }

    /// Every group this client is in, oldest first.
    pub fn groups(&self) -> Result<Vec<GroupRecord>, StateError> {
        let mut select = self
            .connection
            .prepare("SELECT group_id, joined_at, left_at, name FROM groups ORDER BY joined_at, group_id")?;
        let rows = select.query_map([], |row| {
            let (joined_at, left_at, name) = (row.get(1)?, row.get(2)?, row.get(3)?);
            Ok(GroupId::new(row.get(0)?).map(|group_id| GroupRecord {
                group_id,
                joined_at,
                left_at,
                name,
            }))
        })?;
        // A group's id is a GroupId: creating and joining check it.
        Ok(rows.filter_map(Result::transpose).collect::<Result<_, _>>()?)
    }
}

impl StateFile {
    /// The state key of `group_id` (protocol 9) as we keep it; a group
    /// joined before we kept one takes its current epoch's, which every
    /// member of that epoch computes alike, and keeps it from then on.
    pub fn state_key(&self, group_id: &GroupId, group: &GroupMember) -> Result<StateKey, StateError> {
        if let Some(key) = self.kept_state_key(group_id)? {
            return Ok(key);
        }
        let key = group.current_state_key(&self.provider())?;
        self.set_state_key(group_id, &key)?;
        Ok(key)
    }

    /// The state key of `group_id` if we keep one (none for a group we are
    /// not in, or joined before keys were kept).
    pub fn kept_state_key(&self, group_id: &GroupId) -> Result<Option<StateKey>, StateError> {
        let kept: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT state_key FROM state_keys WHERE group_id = ?1",
                params![group_id.as_bytes()],
                |row| row.get(0),
            )
            .optional()?;
        Ok(kept.as_deref().and_then(StateKey::from_slice))
    }

    /// Keeps `key` as the state key of `group_id`.
    pub fn set_state_key(&self, group_id: &GroupId, key: &StateKey) -> Result<(), StateError> {
        self.connection.execute(
            "INSERT INTO state_keys (group_id, state_key) VALUES (?1, ?2)
             ON CONFLICT (group_id) DO UPDATE SET state_key = excluded.state_key",
            params![group_id.as_bytes(), &key.as_bytes()[..]],
        )?;
        Ok(())
    }

    /// Takes the group's new state key if the last Commit merged into
    /// `group` took a device out (see `GroupMember::state_key_rotated`).
    pub fn follow_state_key(&self, group_id: &GroupId, group: &GroupMember) -> Result<(), StateError> {
        if group.state_key_rotated() {
            self.set_state_key(group_id, &group.current_state_key(&self.provider())?)?;
        }
        Ok(())
    }

    /// Our groups and their state keys, for the key backup: every group we
    /// keep a key for (a removal forgets it: [`Self::forget_state_key`]).
    /// Read on every sync of the backup, so from our tables alone, without
    /// loading any group's MLS state.
    pub fn state_keys(&self) -> Result<KeyBackup, StateError> {
        let mut statement = self.connection.prepare(
            "SELECT k.group_id, k.state_key FROM state_keys k JOIN groups g ON g.group_id = k.group_id
                 ORDER BY k.group_id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?;
        let mut groups = Vec::new();
        for row in rows {
            let (id, key) = row?;
            if let (Some(id), Some(key)) = (GroupId::new(id), StateKey::from_slice(&key)) {
                groups.push((id, key));
            }
        }
        Ok(KeyBackup { groups })
    }

    /// Forgets the state key of `group_id`: we were removed from it.
    pub fn forget_state_key(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "DELETE FROM state_keys WHERE group_id = ?1",
            params![group_id.as_bytes()],
        )?;
        Ok(())
    }

    /// Whether this state file knows `group_id` as one it is no longer in:
    /// we were removed (its MLS state is inactive).
    pub fn is_out_of(&self, group_id: &GroupId) -> Result<bool, StateError> {
        Ok(GroupMember::load(&self.provider(), group_id)?.is_some_and(|group| !group.is_active()))
    }

    /// The digest of the key backup last stored on the node, if any.
    pub fn stored_backup_digest(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .connection
            .query_row("SELECT value FROM settings WHERE key = 'key_backup'", [], |row| {
                row.get::<_, Vec<u8>>(0)
            })
            .optional()?)
    }

    /// Notes that the node holds the key backup with `digest`.
    pub fn note_backup_stored(&self, digest: &[u8]) -> Result<(), StateError> {
        self.connection.execute(
            "INSERT INTO settings (key, value) VALUES ('key_backup', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![digest],
        )?;
        Ok(())
    }
}
