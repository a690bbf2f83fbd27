//! The outbox: a group change (Commit, Welcome and the new epoch's
//! GroupInfo) staged for the node, or handed to it without an answer yet.
//! Its Commit stays pending in MLS until the answer settles it; a later
//! command resends it with the same message ids, which the node stores at
//! most once.
//!
//! A rejoin is the exception: openmls merges an external Commit as it makes
//! it, so its group is already in the new epoch while the publication
//! waits; the answer either keeps the group (recording it as ours) or
//! deletes it again.

use quicnprotochat_core::{GroupId, GroupMember, IdentityKey};
use quicnprotochat_proto::wire::Envelope;
use rusqlite::{OptionalExtension, params};

use super::{StateError, StateFile};

/// A group change waiting for the node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The group.
    pub group_id: GroupId,
    /// The epoch the Commit was made in.
    pub epoch: u64,
    /// The Commit, its recipients and message id.
    pub commit: Envelope,
    /// The Welcome, if any.
    pub welcome: Option<Envelope>,
    /// The GroupInfo of the epoch the Commit starts, for the node to serve
    /// to members who rejoin; `None` only for changes staged by a client
    /// that made none.
    pub group_info: Option<Vec<u8>>,
    /// Whether this is our rejoin of the group: its external Commit is
    /// already merged (see the module docs).
    pub rejoin: bool,
}

/// What the node's answer did to a staged change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The node took it: the pending Commit is merged.
    Merge,
    /// The node stored none of it: the pending Commit is discarded.
    Discard,
}

impl StateFile {
    /// Stages a group change: `make` changes the group (leaving a pending
    /// Commit in MLS state) and returns the publication that carries it,
    /// which is saved in the outbox in the same transaction, so a pending
    /// Commit never exists without the publication that settles it.
    pub fn stage_publication<E: From<StateError>>(
        &self,
        make: impl FnOnce() -> Result<Publication, E>,
    ) -> Result<Publication, E> {
        self.atomically(|| {
            let publication = make()?;
            self.save_publication(&publication)?;
            Ok(publication)
        })
    }

    /// Settles the staged change of `group` by the node's answer: merges or
    /// discards its pending Commit and forgets the publication, in one
    /// transaction. A merged change that added `joiners` leaves them owed
    /// the group's name, if it has one ([`Self::names_owed`]), in the same
    /// transaction, so a command cut off before it sent the name leaves the
    /// debt to the next.
    pub fn settle_publication(
        &self,
        group_id: &GroupId,
        group: &mut GroupMember,
        settlement: Settlement,
        joiners: &[IdentityKey],
    ) -> Result<(), StateError> {
        self.atomically(|| {
            match settlement {
                Settlement::Merge => {
                    group.merge_pending_commit(&self.provider())?;
                    self.follow_state_key(group_id, group)?;
                    if !joiners.is_empty() {
                        self.owe_name(group_id, joiners)?;
                    }
                }
                Settlement::Discard => group.discard_pending_commit(&self.provider())?,
            }
            self.forget_publication(group_id)
        })
    }

    /// Notes that `recipients` are to be told the name of `group_id`, if it
    /// has one.
    fn owe_name(&self, group_id: &GroupId, recipients: &[IdentityKey]) -> Result<(), StateError> {
        let keys: Vec<u8> = recipients.iter().flat_map(|key| *key.as_bytes()).collect();
        self.connection.execute(
            "INSERT INTO names_owed (group_id, recipients)
                 SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM groups WHERE group_id = ?1 AND name IS NOT NULL)
             ON CONFLICT (group_id) DO UPDATE SET recipients = recipients || excluded.recipients",
            params![group_id.as_bytes(), keys],
        )?;
        Ok(())
    }

    /// The members still owed the name of `group_id`.
    pub fn name_owed(&self, group_id: &GroupId) -> Result<Option<Vec<IdentityKey>>, StateError> {
        let keys: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT recipients FROM names_owed WHERE group_id = ?1",
                params![group_id.as_bytes()],
                |row| row.get(0),
            )
            .optional()?;
        Ok(keys.map(|keys| {
            keys.chunks_exact(32)
                .filter_map(|key| IdentityKey::try_from(key).ok())
                .collect()
        }))
    }

    /// Every group whose name some members are still owed.
    pub fn names_owed(&self) -> Result<Vec<GroupId>, StateError> {
        let mut select = self.connection.prepare("SELECT group_id FROM names_owed")?;
        let rows = select.query_map([], |row| row.get::<_, Vec<u8>>(0))?;
        Ok(rows
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter_map(GroupId::new)
            .collect())
    }

    /// Forgets what the members of `group_id` were owed: they were told.
    pub fn forget_name_owed(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "DELETE FROM names_owed WHERE group_id = ?1",
            params![group_id.as_bytes()],
        )?;
        Ok(())
    }

    /// Settles our rejoin of `group` by the node's answer: on
    /// [`Settlement::Merge`] the group (merged when the rejoin was made) is
    /// recorded as ours and becomes the current group; on
    /// [`Settlement::Discard`] its state is deleted again. Forgets the
    /// publication, in the same transaction.
    pub fn settle_rejoin(&self, group_id: &GroupId, settlement: Settlement) -> Result<(), StateError> {
        self.atomically(|| {
            match settlement {
                Settlement::Merge => self.record_rejoined_group(group_id)?,
                Settlement::Discard => {
                    if let Some(group) = GroupMember::load(&self.provider(), group_id)? {
                        group.delete(&self.provider())?;
                    }
                }
            }
            self.forget_publication(group_id)
        })
    }

    /// Remembers a change before it is sent.
    pub fn save_publication(&self, publication: &Publication) -> Result<(), StateError> {
        let welcome = publication.welcome.as_ref();
        self.connection.execute(
            "INSERT OR REPLACE INTO outbox (group_id, epoch, commit_payload, commit_to, commit_id,
                 welcome_payload, welcome_to, welcome_id, group_info, rejoin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                publication.group_id.as_bytes(),
                i64::try_from(publication.epoch).unwrap_or(i64::MAX),
                publication.commit.payload,
                keys(&publication.commit.recipients),
                publication.commit.message_id.clone().unwrap_or_default(),
                welcome.map(|w| w.payload.clone()),
                welcome.map(|w| keys(&w.recipients)),
                welcome.and_then(|w| w.message_id.clone()),
                publication.group_info,
                publication.rejoin,
            ],
        )?;
        Ok(())
    }

    /// Forgets the change of `group_id` (answered, either way).
    pub fn forget_publication(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "DELETE FROM outbox WHERE group_id = ?1",
            params![group_id.as_bytes()],
        )?;
        Ok(())
    }

    /// Every unanswered change.
    pub fn publications(&self) -> Result<Vec<Publication>, StateError> {
        let mut select = self.connection.prepare("SELECT group_id FROM outbox")?;
        let groups = select
            .query_map([], |row| row.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut publications = Vec::with_capacity(groups.len());
        for group_id in groups {
            let group_id = GroupId::new(group_id)
                .ok_or_else(|| StateError::Damaged("an outbox entry has an impossible group id".into()))?;
            publications.extend(self.publication(&group_id)?);
        }
        Ok(publications)
    }

    /// The unanswered change of `group_id`, if any.
    pub fn publication(&self, group_id: &GroupId) -> Result<Option<Publication>, StateError> {
        type Row = (
            i64,
            Vec<u8>,
            Vec<u8>,
            Vec<u8>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            bool,
        );
        let row: Option<Row> = self
            .connection
            .query_row(
                "SELECT epoch, commit_payload, commit_to, commit_id, welcome_payload, welcome_to, welcome_id,
                     group_info, rejoin
                 FROM outbox WHERE group_id = ?1",
                params![group_id.as_bytes()],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                        row.get(6)?,
                        row.get(7)?,
                        row.get(8)?,
                    ))
                },
            )
            .optional()?;
        let Some((epoch, commit, commit_to, commit_id, welcome, welcome_to, welcome_id, group_info, rejoin)) =
            row
        else {
            return Ok(None);
        };
        let welcome = match (welcome, welcome_to) {
            (Some(payload), Some(to)) => Some(Envelope {
                recipients: parse_keys(&to)?,
                payload,
                message_id: welcome_id,
            }),
            _ => None,
        };
        Ok(Some(Publication {
            group_id: group_id.clone(),
            epoch: epoch.max(0) as u64,
            commit: Envelope {
                recipients: parse_keys(&commit_to)?,
                payload: commit,
                message_id: Some(commit_id),
            },
            welcome,
            group_info,
            rejoin,
        }))
    }
}

fn keys(recipients: &[IdentityKey]) -> Vec<u8> {
    recipients
        .iter()
        .flat_map(|key| key.as_bytes().to_vec())
        .collect()
}

fn parse_keys(bytes: &[u8]) -> Result<Vec<IdentityKey>, StateError> {
    bytes
        .chunks(32)
        .map(|chunk| {
            IdentityKey::try_from(chunk)
                .map_err(|_| StateError::Damaged("an outbox entry has a malformed recipient key".into()))
        })
        .collect()
}
