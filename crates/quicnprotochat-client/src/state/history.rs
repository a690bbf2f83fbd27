//! Message history: every application message sent or received, per group,
//! written in the same transaction as the MLS state change that produced it.
//! A sent message counts as delivered only once the node took it.

use quicnprotochat_core::{Content, GroupId, GroupMember, IdentityKey, IdentityKeypair};
use rusqlite::params;

use super::{StateError, StateFile, unix_now};

/// Whether we sent or received a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We sent it.
    Sent,
    /// Another member sent it.
    Received,
}

/// One message of a group's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Sent or received.
    pub direction: Direction,
    /// Who sent it.
    pub sender: IdentityKey,
    /// The text.
    pub body: Vec<u8>,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// When we stored it (Unix seconds).
    pub at: i64,
    /// Received, or sent and taken by the node; false for a sent message
    /// the node did not confirm (the send failed or was interrupted).
    pub confirmed: bool,
}

/// A sent message's history row, to confirm once the node took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentMessage(i64);

impl StateFile {
    /// Encrypts `text` for `group` (as [`Content::Text`]) and records it as
    /// sent but not yet confirmed, in one transaction (the ratchet step
    /// must be kept before the ciphertext leaves); returns the ciphertext
    /// to deliver and the row to [`Self::confirm_sent`] once the node took
    /// it.
    pub fn encrypt_message(
        &self,
        group_id: &GroupId,
        group: &mut GroupMember,
        identity: &IdentityKeypair,
        text: &str,
    ) -> Result<(Vec<u8>, SentMessage), StateError> {
        let plaintext = text.as_bytes();
        self.atomically(|| {
            let ciphertext = group.send(
                &self.provider(),
                identity,
                &Content::Text(text.to_owned()).encode(),
            )?;
            self.connection.execute(
                "INSERT INTO history (group_id, outgoing, sender, body, epoch, at, confirmed)
                 VALUES (?1, 1, ?2, ?3, ?4, ?5, 0)",
                params![
                    group_id.as_bytes(),
                    identity.public_key().as_bytes(),
                    plaintext,
                    group.epoch() as i64,
                    unix_now()
                ],
            )?;
            Ok((ciphertext, SentMessage(self.connection.last_insert_rowid())))
        })
    }

    /// Encrypts the group's name for `group` (as [`Content::GroupName`]),
    /// keeping the ratchet step; it is no message of the history.
    pub fn encrypt_group_name(
        &self,
        group: &mut GroupMember,
        identity: &IdentityKeypair,
        name: &str,
    ) -> Result<Vec<u8>, StateError> {
        self.atomically(|| {
            Ok(group.send(
                &self.provider(),
                identity,
                &Content::GroupName(name.to_owned()).encode(),
            )?)
        })
    }

    /// Forgets a sent message the node refused whole (it is sent again as a
    /// new one).
    pub fn forget_sent(&self, sent: SentMessage) -> Result<(), StateError> {
        self.connection.execute(
            "DELETE FROM history WHERE id = ?1 AND confirmed = 0",
            params![sent.0],
        )?;
        Ok(())
    }

    /// Marks a sent message as taken by the node.
    pub fn confirm_sent(&self, sent: SentMessage) -> Result<(), StateError> {
        self.connection
            .execute("UPDATE history SET confirmed = 1 WHERE id = ?1", params![sent.0])?;
        Ok(())
    }

    /// Appends a message to the history of `group_id`.
    pub fn record_message(
        &self,
        group_id: &GroupId,
        direction: Direction,
        sender: &IdentityKey,
        body: &[u8],
        epoch: u64,
    ) -> Result<(), StateError> {
        self.connection.execute(
            "INSERT INTO history (group_id, outgoing, sender, body, epoch, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                group_id.as_bytes(),
                direction == Direction::Sent,
                sender.as_bytes(),
                body,
                epoch as i64,
                unix_now()
            ],
        )?;
        Ok(())
    }

    /// The history of `group_id`, oldest first.
    pub fn history(&self, group_id: &GroupId) -> Result<Vec<HistoryEntry>, StateError> {
        let mut select = self.connection.prepare(
            "SELECT outgoing, sender, body, epoch, at, confirmed FROM history WHERE group_id = ?1 ORDER BY id",
        )?;
        let rows = select.query_map(params![group_id.as_bytes()], |row| {
            Ok((
                row.get::<_, bool>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, bool>(5)?,
            ))
        })?;
        let mut entries = Vec::new();
        for row in rows {
            let (outgoing, sender, body, epoch, at, confirmed) = row?;
            entries.push(HistoryEntry {
                direction: if outgoing {
                    Direction::Sent
                } else {
                    Direction::Received
                },
                sender: IdentityKey::try_from(sender.as_slice())
                    .map_err(|_| StateError::Contact("a history entry has a damaged sender key".into()))?,
                body,
                epoch: epoch as u64,
                at,
                confirmed,
            });
        }
        Ok(entries)
    }
}
