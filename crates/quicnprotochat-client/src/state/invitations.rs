//! Invitations: Welcomes from someone who is neither a contact nor one of
//! our own devices, kept (with the ratchet tree the node served for them)
//! until the user accepts or declines them, within fixed bounds so that a
//! stranger's flood costs little disk.

use quicnprotochat_core::{IdentityKey, MemberKey};
use rusqlite::{OptionalExtension, params};

use super::{StateError, StateFile};

/// Most invitations kept at once; a Welcome beyond them is dropped.
pub const MAX_INVITATIONS: usize = 32;

/// Most bytes (Welcome and tree) one invitation may keep: a tree of about
/// 10,000 members.
pub const MAX_INVITATION_BYTES: usize = 4 * 1024 * 1024;

/// A Welcome waiting for the user's consent, as listed (its bytes are read
/// only to accept it: [`StateFile::invitation_welcome`]).
#[derive(Debug, Clone)]
pub struct Invitation {
    /// The group it is for.
    pub group_id: Vec<u8>,
    /// Who sent it (signed its GroupInfo).
    pub inviter: MemberKey,
    /// The epoch it starts.
    pub epoch: u64,
    /// How many members the group had.
    pub members: usize,
    /// When it arrived (Unix seconds).
    pub received_at: i64,
}

/// What joining from an invitation takes.
#[derive(Debug, Clone)]
pub struct KeptWelcome {
    /// The Welcome.
    pub welcome: Vec<u8>,
    /// The tree the node kept for it (none if the Welcome carried its
    /// own).
    pub tree: Option<Vec<u8>>,
}

/// Why an invitation was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotKept {
    /// [`MAX_INVITATIONS`] wait already.
    TooMany,
    /// It is bigger than [`MAX_INVITATION_BYTES`].
    TooBig,
}

impl StateFile {
    /// Keeps `invitation` with what joining from it takes (replacing an
    /// older one for the same group) and removes inbox entry `entry`, in
    /// one transaction; or, past the bounds, removes the entry only and
    /// says why.
    pub fn keep_invitation(
        &self,
        entry: i64,
        invitation: &Invitation,
        kept: &KeptWelcome,
    ) -> Result<Result<(), NotKept>, StateError> {
        self.atomically(|| {
            self.remove_inbox(entry)?;
            let size = kept.welcome.len() + kept.tree.as_ref().map_or(0, Vec::len);
            if size > MAX_INVITATION_BYTES {
                return Ok(Err(NotKept::TooBig));
            }
            let others: i64 = self.connection.query_row(
                "SELECT count(*) FROM invitations WHERE group_id != ?1",
                params![invitation.group_id],
                |row| row.get(0),
            )?;
            if others >= MAX_INVITATIONS as i64 {
                return Ok(Err(NotKept::TooMany));
            }
            self.connection.execute(
                "INSERT OR REPLACE INTO invitations
                     (group_id, inviter_user, inviter_device, epoch, members, welcome, tree, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    invitation.group_id,
                    invitation.inviter.user.as_bytes(),
                    invitation.inviter.device.as_bytes(),
                    i64::try_from(invitation.epoch).unwrap_or(i64::MAX),
                    i64::try_from(invitation.members).unwrap_or(i64::MAX),
                    kept.welcome,
                    kept.tree,
                    invitation.received_at,
                ],
            )?;
            Ok(Ok(()))
        })
    }

    /// The invitations waiting, oldest first.
    pub fn invitations(&self) -> Result<Vec<Invitation>, StateError> {
        let mut statement = self.connection.prepare(
            "SELECT group_id, inviter_user, inviter_device, epoch, members, received_at
             FROM invitations ORDER BY received_at, group_id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
            ))
        })?;
        let damaged = || StateError::Damaged("a kept invitation".into());
        rows.map(|row| {
            let (group_id, user, device, epoch, members, received_at) = row?;
            let key = |bytes: &[u8]| IdentityKey::try_from(bytes).map_err(|_| damaged());
            Ok(Invitation {
                group_id,
                inviter: MemberKey {
                    user: key(&user)?,
                    device: key(&device)?,
                },
                epoch: u64::try_from(epoch).map_err(|_| damaged())?,
                members: usize::try_from(members).map_err(|_| damaged())?,
                received_at,
            })
        })
        .collect()
    }

    /// How many invitations wait.
    pub fn invitation_count(&self) -> Result<usize, StateError> {
        let count: i64 = self
            .connection
            .query_row("SELECT count(*) FROM invitations", [], |row| row.get(0))?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// The Welcome (and tree) of the invitation to `group_id`.
    pub fn invitation_welcome(&self, group_id: &[u8]) -> Result<Option<KeptWelcome>, StateError> {
        Ok(self
            .connection
            .query_row(
                "SELECT welcome, tree FROM invitations WHERE group_id = ?1",
                params![group_id],
                |row| {
                    Ok(KeptWelcome {
                        welcome: row.get(0)?,
                        tree: row.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// Whether an invitation to `group_id` waits.
    pub fn has_invitation(&self, group_id: &[u8]) -> Result<bool, StateError> {
        Ok(self
            .connection
            .query_row(
                "SELECT 1 FROM invitations WHERE group_id = ?1",
                params![group_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Runs `apply` (joining the group) and forgets the invitation to
    /// `group_id`, in one transaction.
    pub fn consume_invitation<T, E: From<StateError>>(
        &self,
        group_id: &[u8],
        apply: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.atomically(|| {
            let value = apply()?;
            self.remove_invitation(group_id)?;
            Ok(value)
        })
    }

    /// Forgets the invitation to `group_id`; false if there was none.
    pub fn remove_invitation(&self, group_id: &[u8]) -> Result<bool, StateError> {
        Ok(self
            .connection
            .execute("DELETE FROM invitations WHERE group_id = ?1", params![group_id])?
            > 0)
    }
}
