//! The typed outcomes of the wire contract, as both ends use them.
//!
//! A call that was understood but did not take effect says why in its
//! results (see the head of `schemas/delivery.capnp`): these types mirror
//! those unions one to one, with a `write` for the node and a `read` for
//! clients, so neither end ever looks at an exception's text to decide
//! anything.

use std::time::Duration;

use quicnprotochat_core::{IdentityKey, StateKey};

use crate::wire::{FieldError, GroupState, identity_key, write_group_state};
use crate::{auth_capnp, delivery_capnp};

/// Over a rate limit: how long to wait before the same call can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// At least one millisecond.
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole milliseconds to wait, at least 1, as the schema carries them.
    pub fn retry_after_ms(&self) -> u32 {
        u32::try_from(self.retry_after.as_millis())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    fn write(&self, mut builder: delivery_capnp::rate_limited::Builder<'_>) {
        builder.set_retry_after_ms(self.retry_after_ms());
    }

    fn read(reader: delivery_capnp::rate_limited::Reader<'_>) -> RateLimited {
        RateLimited {
            retry_after: Duration::from_millis(u64::from(reader.get_retry_after_ms().max(1))),
        }
    }
}

/// Queues without room for what a call would add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    /// Whose queues, each once, in the order the call first named them.
    pub recipients: Vec<IdentityKey>,
    /// The node's limit of messages waiting in one queue.
    pub max_depth: u32,
    /// The node's limit of payload bytes waiting in one queue (0 from a
    /// node before protocol 4).
    pub max_bytes: u64,
}

impl QueueFull {
    fn write(&self, mut builder: delivery_capnp::queue_full::Builder<'_>) {
        builder.set_max_depth(self.max_depth);
        builder.set_max_bytes(self.max_bytes);
        // A call names at most MAX_BATCH_RECIPIENTS recipients, far below u32.
        let mut keys = builder.init_recipient_keys(self.recipients.len() as u32);
        for (slot, recipient) in self.recipients.iter().enumerate() {
            keys.set(slot as u32, recipient.as_bytes());
        }
    }

    fn read(reader: delivery_capnp::queue_full::Reader<'_>) -> Result<QueueFull, OutcomeError> {
        let keys = reader.get_recipient_keys()?;
        let recipients = keys
            .iter()
            .enumerate()
            .map(|(slot, key)| Ok(identity_key(&format!("queueFull.recipientKeys[{slot}]"), key?)?))
            .collect::<Result<Vec<_>, OutcomeError>>()?;
        Ok(QueueFull {
            recipients,
            max_depth: reader.get_max_depth(),
            max_bytes: reader.get_max_bytes(),
        })
    }
}

/// A call bigger than the sender may ever queue at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// Most messages (recipients, summed over envelopes) one call may queue.
    pub max_messages: u32,
    /// Most payload bytes one call may carry.
    pub max_bytes: u64,
}

/// An application message from an epoch its group has left on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleEpoch {
    /// The group.
    pub group_id: Vec<u8>,
    /// The group's epoch on the node.
    pub current_epoch: u64,
}

/// What became of `enqueue` or `enqueueBatch` (`SendOutcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Every message is durably committed.
    Accepted,
    /// Over the sender's rate limit; nothing was stored.
    RateLimited(RateLimited),
    /// Some queues are full; nothing was stored.
    QueueFull(QueueFull),
    /// More than one call may carry; nothing was stored.
    TooLarge(TooLarge),
    /// A message from an epoch its group has left; nothing was stored.
    StaleEpoch(StaleEpoch),
    /// A payload is an MLS Commit, proposal or Welcome, which only
    /// `publishCommit`/`publishProposal` carry; nothing was stored.
    Handshake,
}

impl SendOutcome {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: delivery_capnp::send_outcome::Builder<'_>) {
        match self {
            SendOutcome::Accepted => builder.set_accepted(()),
            SendOutcome::RateLimited(limited) => limited.write(builder.init_rate_limited()),
            SendOutcome::QueueFull(full) => full.write(builder.init_queue_full()),
            SendOutcome::TooLarge(large) => {
                let mut slot = builder.init_too_large();
                slot.set_max_messages(large.max_messages);
                slot.set_max_bytes(large.max_bytes);
            }
            SendOutcome::StaleEpoch(stale) => {
                let mut slot = builder.init_stale_epoch();
                slot.set_group_id(&stale.group_id);
                slot.set_current_epoch(stale.current_epoch);
            }
            SendOutcome::Handshake => builder.set_handshake(()),
        }
    }

    /// Reads the node's answer.
    pub fn read(reader: delivery_capnp::send_outcome::Reader<'_>) -> Result<SendOutcome, OutcomeError> {
        use delivery_capnp::send_outcome::Which;
        Ok(match reader.which()? {
            Which::Accepted(()) => SendOutcome::Accepted,
            Which::RateLimited(limited) => SendOutcome::RateLimited(RateLimited::read(limited?)),
            Which::QueueFull(full) => SendOutcome::QueueFull(QueueFull::read(full?)?),
            Which::TooLarge(large) => {
                let large = large?;
                SendOutcome::TooLarge(TooLarge {
                    max_messages: large.get_max_messages(),
                    max_bytes: large.get_max_bytes(),
                })
            }
            Which::StaleEpoch(stale) => {
                let stale = stale?;
                SendOutcome::StaleEpoch(StaleEpoch {
                    group_id: stale.get_group_id()?.to_vec(),
                    current_epoch: stale.get_current_epoch(),
                })
            }
            Which::Handshake(()) => SendOutcome::Handshake,
        })
    }
}

/// What became of `uploadKeyPackage` or `uploadKeyPackages`
/// (`UploadOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Every KeyPackage is durably stored.
    Stored,
    /// Over the uploader's send budget; nothing was stored.
    RateLimited(RateLimited),
    /// The identity's stock of one suite would exceed the node's limit;
    /// nothing was stored.
    TooMany {
        /// Unexpired KeyPackages of that suite the identity holds now.
        stored: u32,
        /// The node's limit per identity and suite.
        max: u32,
    },
}

impl UploadOutcome {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: auth_capnp::upload_outcome::Builder<'_>) {
        match self {
            UploadOutcome::Stored => builder.set_stored(()),
            UploadOutcome::RateLimited(limited) => limited.write(builder.init_rate_limited()),
            UploadOutcome::TooMany { stored, max } => {
                let mut slot = builder.init_too_many();
                slot.set_stored(*stored);
                slot.set_max(*max);
            }
        }
    }

    /// Reads the node's answer.
    pub fn read(reader: auth_capnp::upload_outcome::Reader<'_>) -> Result<UploadOutcome, OutcomeError> {
        use auth_capnp::upload_outcome::Which;
        Ok(match reader.which()? {
            Which::Stored(()) => UploadOutcome::Stored,
            Which::RateLimited(limited) => UploadOutcome::RateLimited(RateLimited::read(limited?)),
            Which::TooMany(many) => {
                let many = many?;
                UploadOutcome::TooMany {
                    stored: many.get_stored(),
                    max: many.get_max(),
                }
            }
        })
    }
}

/// What became of `uploadDeviceList` (`DeviceListOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceListOutcome {
    /// The list is durably stored (or exactly this list already was).
    Stored,
    /// The node holds this user's list at `current`, this version or a
    /// higher one; nothing was stored.
    Stale {
        /// The stored version.
        current: u64,
    },
    /// The signature is not the user key's over this list.
    BadSignature,
    /// The caller is not a device of the stored list (nor, for a first
    /// list, of the new one or the user key).
    NotADevice,
    /// Over the caller's send budget; nothing was stored.
    RateLimited(RateLimited),
    /// The list names a device an earlier list of the user dropped;
    /// nothing was stored.
    RemovedDevice,
    /// The version is more than `max_step` above `current` (0: no stored
    /// list); nothing was stored.
    TooFar {
        /// The stored version, 0 if none.
        current: u64,
        /// The most a new version may exceed it by.
        max_step: u64,
    },
}

impl DeviceListOutcome {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: auth_capnp::device_list_outcome::Builder<'_>) {
        match self {
            DeviceListOutcome::Stored => builder.set_stored(()),
            DeviceListOutcome::Stale { current } => builder.init_stale().set_current(*current),
            DeviceListOutcome::BadSignature => builder.set_bad_signature(()),
            DeviceListOutcome::NotADevice => builder.set_not_a_device(()),
            DeviceListOutcome::RateLimited(limited) => limited.write(builder.init_rate_limited()),
            DeviceListOutcome::RemovedDevice => builder.set_removed_device(()),
            DeviceListOutcome::TooFar { current, max_step } => {
                let mut slot = builder.init_too_far();
                slot.set_current(*current);
                slot.set_max_step(*max_step);
            }
        }
    }

    /// Reads the node's answer.
    pub fn read(
        reader: auth_capnp::device_list_outcome::Reader<'_>,
    ) -> Result<DeviceListOutcome, OutcomeError> {
        use auth_capnp::device_list_outcome::Which;
        Ok(match reader.which()? {
            Which::Stored(()) => DeviceListOutcome::Stored,
            Which::Stale(stale) => DeviceListOutcome::Stale {
                current: stale?.get_current(),
            },
            Which::BadSignature(()) => DeviceListOutcome::BadSignature,
            Which::NotADevice(()) => DeviceListOutcome::NotADevice,
            Which::RateLimited(limited) => DeviceListOutcome::RateLimited(RateLimited::read(limited?)),
            Which::RemovedDevice(()) => DeviceListOutcome::RemovedDevice,
            Which::TooFar(far) => {
                let far = far?;
                DeviceListOutcome::TooFar {
                    current: far.get_current(),
                    max_step: far.get_max_step(),
                }
            }
        })
    }
}

/// What became of a group change: `publishCommit` (`CommitOutcome`) or
/// `publishProposal` (`ProposalOutcome`). The two unions share their
/// members in the schema; only a proposal can meet
/// [`ChangeOutcome::TooManyProposals`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Durably stored and queued: a Commit moved the group to the next
    /// epoch; a proposal waits for the Commit that references it.
    Accepted,
    /// The group is at `current_epoch`: another Commit won the epoch, or a
    /// proposal was made in another one.
    Conflict {
        /// The group's epoch on the node.
        current_epoch: u64,
    },
    /// Over the sender's rate limit; nothing was stored.
    RateLimited(RateLimited),
    /// Some queues are full; nothing was stored.
    QueueFull(QueueFull),
    /// Not valid for the group's public state.
    Invalid {
        /// Why, for people.
        reason: String,
    },
    /// The node has no state for the group (a Commit: publish again with
    /// the group's initial state), or the caller is not a member.
    UnknownGroup,
    /// The group holds `max` proposals in this epoch already (proposals
    /// only: a Commit frees the count).
    TooManyProposals {
        /// The node's limit per group and epoch.
        max: u32,
    },
}

/// A `write_*` and a `read_*` of [`ChangeOutcome`] for one of the schema's
/// two unions, which share their first members (each has its own generated
/// builder and reader); the arms of the members only one of them has are
/// passed in.
macro_rules! change_outcome_io {
    ($write_fn:ident, $read_fn:ident, $schema:ident, |$builder:ident, $reader:ident| { $($write:tt)* } { $($read:tt)* }) => {
        impl ChangeOutcome {
            /// Fills the node's answer.
            pub fn $write_fn(&self, mut $builder: delivery_capnp::$schema::Builder<'_>) {
                match self {
                    ChangeOutcome::Accepted => $builder.set_accepted(()),
                    ChangeOutcome::Conflict { current_epoch } => {
                        $builder.init_conflict().set_current_epoch(*current_epoch)
                    }
                    ChangeOutcome::RateLimited(limited) => limited.write($builder.init_rate_limited()),
                    ChangeOutcome::QueueFull(full) => full.write($builder.init_queue_full()),
                    ChangeOutcome::Invalid { reason } => $builder.init_invalid().set_reason(reason),
                    ChangeOutcome::UnknownGroup => $builder.set_unknown_group(()),
                    $($write)*
                }
            }

            /// Reads the node's answer.
            pub fn $read_fn($reader: delivery_capnp::$schema::Reader<'_>) -> Result<ChangeOutcome, OutcomeError> {
                use delivery_capnp::$schema::Which;
                Ok(match $reader.which()? {
                    Which::Accepted(()) => ChangeOutcome::Accepted,
                    Which::Conflict(conflict) => ChangeOutcome::Conflict {
                        current_epoch: conflict?.get_current_epoch(),
                    },
                    Which::RateLimited(limited) => ChangeOutcome::RateLimited(RateLimited::read(limited?)),
                    Which::QueueFull(full) => ChangeOutcome::QueueFull(QueueFull::read(full?)?),
                    Which::Invalid(invalid) => ChangeOutcome::Invalid {
                        reason: read_reason(invalid?)?,
                    },
                    Which::UnknownGroup(()) => ChangeOutcome::UnknownGroup,
                    $($read)*
                })
            }
        }
    };
}

change_outcome_io!(write_commit, read_commit, commit_outcome, |builder, reader| {
    // The node never refuses a Commit so (it frees the count); if it did,
    // the Commit's union can only say it is not valid, and why.
    ChangeOutcome::TooManyProposals { max } => builder
        .init_invalid()
        .set_reason(format!("the group holds {max} proposals in this epoch already")),
} {});
change_outcome_io!(write_proposal, read_proposal, proposal_outcome, |builder, reader| {
    ChangeOutcome::TooManyProposals { max } => builder.init_too_many_proposals().set_max(*max),
} {
    Which::TooManyProposals(many) => ChangeOutcome::TooManyProposals { max: many?.get_max() },
});

/// What `fetchGroupInfo` found (`FetchedGroupInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchedGroupInfo {
    /// The current epoch's GroupInfo and ratchet tree.
    State(GroupState),
    /// No GroupInfo of the current epoch.
    Unavailable,
    /// The caller owns no leaf of the group, or the node knows no such
    /// group.
    NotMember,
}

impl FetchedGroupInfo {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: delivery_capnp::fetched_group_info::Builder<'_>) {
        match self {
            FetchedGroupInfo::State(state) => write_group_state(state, builder.init_state()),
            FetchedGroupInfo::Unavailable => builder.set_unavailable(()),
            FetchedGroupInfo::NotMember => builder.set_not_member(()),
        }
    }

    /// Reads the node's answer.
    pub fn read(
        reader: delivery_capnp::fetched_group_info::Reader<'_>,
    ) -> Result<FetchedGroupInfo, OutcomeError> {
        use delivery_capnp::fetched_group_info::Which;
        Ok(match reader.which()? {
            Which::State(state) => {
                let state = state?;
                FetchedGroupInfo::State(GroupState {
                    group_info: state.get_group_info()?.to_vec(),
                    ratchet_tree: state.get_ratchet_tree()?.to_vec(),
                })
            }
            Which::Unavailable(()) => FetchedGroupInfo::Unavailable,
            Which::NotMember(()) => FetchedGroupInfo::NotMember,
        })
    }
}

/// What `fetchWelcomeTree` found (`FetchedWelcomeTree`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchedWelcomeTree {
    /// The group's ratchet tree in the asked epoch, TLS-encoded, and the
    /// group's state key (protocol 9; none for a tree kept before).
    Tree {
        /// The TLS-encoded ratchet tree.
        tree: Vec<u8>,
        /// The group's state key.
        state_key: Option<StateKey>,
    },
    /// The node keeps no tree for that epoch.
    Unavailable,
}

impl FetchedWelcomeTree {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: delivery_capnp::fetched_welcome_tree::Builder<'_>) {
        match self {
            FetchedWelcomeTree::Tree { tree, state_key } => {
                builder.set_tree(tree);
                if let Some(key) = state_key {
                    builder.set_state_key(key.as_bytes());
                }
            }
            FetchedWelcomeTree::Unavailable => builder.set_unavailable(()),
        }
    }

    /// Reads the node's answer.
    pub fn read(
        reader: delivery_capnp::fetched_welcome_tree::Reader<'_>,
    ) -> Result<FetchedWelcomeTree, OutcomeError> {
        use delivery_capnp::fetched_welcome_tree::Which;
        Ok(match reader.which()? {
            Which::Tree(tree) => FetchedWelcomeTree::Tree {
                tree: tree?.to_vec(),
                state_key: crate::wire::optional_state_key("stateKey", reader.get_state_key())?,
            },
            Which::Unavailable(()) => FetchedWelcomeTree::Unavailable,
        })
    }
}

/// What became of `putKeyBackup` (`BackupOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupOutcome {
    /// The backup is durably stored in place of the one before.
    Stored,
    /// Over the caller's rate limit; nothing was stored.
    RateLimited(RateLimited),
    /// Larger than `max_bytes`; nothing was stored.
    TooLarge {
        /// The most a backup may take.
        max_bytes: u32,
    },
}

impl BackupOutcome {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: delivery_capnp::backup_outcome::Builder<'_>) {
        match self {
            BackupOutcome::Stored => builder.set_stored(()),
            BackupOutcome::RateLimited(limited) => limited.write(builder.init_rate_limited()),
            BackupOutcome::TooLarge { max_bytes } => builder.init_too_large().set_max_bytes(*max_bytes),
        }
    }

    /// Reads the node's answer.
    pub fn read(reader: delivery_capnp::backup_outcome::Reader<'_>) -> Result<BackupOutcome, OutcomeError> {
        use delivery_capnp::backup_outcome::Which;
        Ok(match reader.which()? {
            Which::Stored(()) => BackupOutcome::Stored,
            Which::RateLimited(limited) => BackupOutcome::RateLimited(RateLimited::read(limited?)),
            Which::TooLarge(large) => BackupOutcome::TooLarge {
                max_bytes: large?.get_max_bytes(),
            },
        })
    }
}

fn read_reason(invalid: delivery_capnp::invalid_message::Reader<'_>) -> Result<String, OutcomeError> {
    invalid
        .get_reason()?
        .to_string()
        .map_err(|e| OutcomeError::Capnp(capnp::Error::failed(format!("invalid.reason is not UTF-8: {e}"))))
}

/// What `fetchKeyPackage` found (`FetchedKeyPackage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchedKeyPackage {
    /// A KeyPackage of the identity.
    Package(Vec<u8>),
    /// The identity has no unexpired KeyPackage.
    None,
    /// Over the caller's fetch rate.
    RateLimited(RateLimited),
}

impl FetchedKeyPackage {
    /// Fills the node's answer.
    pub fn write(&self, mut builder: auth_capnp::fetched_key_package::Builder<'_>) {
        match self {
            FetchedKeyPackage::Package(package) => builder.set_package(package),
            FetchedKeyPackage::None => builder.set_none(()),
            FetchedKeyPackage::RateLimited(limited) => limited.write(builder.init_rate_limited()),
        }
    }

    /// Reads the node's answer.
    pub fn read(
        reader: auth_capnp::fetched_key_package::Reader<'_>,
    ) -> Result<FetchedKeyPackage, OutcomeError> {
        use auth_capnp::fetched_key_package::Which;
        Ok(match reader.which()? {
            Which::Package(package) => FetchedKeyPackage::Package(package?.to_vec()),
            Which::None(()) => FetchedKeyPackage::None,
            Which::RateLimited(limited) => FetchedKeyPackage::RateLimited(RateLimited::read(limited?)),
        })
    }
}

/// An answer that does not hold what the schema says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutcomeError {
    /// The message could not be read (including a union member this build
    /// does not know, from a newer node).
    #[error("unreadable outcome: {0}")]
    Capnp(#[from] capnp::Error),
    /// An unknown union member, from a newer protocol version.
    #[error("an outcome this client does not know (union member {0}); update the client")]
    Unknown(u16),
    /// A field breaks the schema's rules.
    #[error("outcome: {0}")]
    Field(#[from] FieldError),
}

impl From<capnp::NotInSchema> for OutcomeError {
    fn from(unknown: capnp::NotInSchema) -> Self {
        OutcomeError::Unknown(unknown.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip_send(outcome: &SendOutcome) -> SendOutcome {
        let mut message = capnp::message::Builder::new_default();
        outcome.write(message.init_root());
        SendOutcome::read(message.get_root_as_reader().unwrap()).unwrap()
    }

    #[test]
    fn every_outcome_reads_back_as_written() {
        let full = QueueFull {
            recipients: vec![IdentityKey::from_bytes([1; 32]), IdentityKey::from_bytes([2; 32])],
            max_depth: 10,
            max_bytes: 1 << 20,
        };
        for outcome in [
            SendOutcome::Accepted,
            SendOutcome::RateLimited(RateLimited {
                retry_after: Duration::from_millis(16),
            }),
            SendOutcome::QueueFull(full.clone()),
            SendOutcome::TooLarge(TooLarge {
                max_messages: 2000,
                max_bytes: 8 << 20,
            }),
            SendOutcome::StaleEpoch(StaleEpoch {
                group_id: b"g".to_vec(),
                current_epoch: 4,
            }),
            SendOutcome::Handshake,
        ] {
            assert_eq!(round_trip_send(&outcome), outcome);
        }
        for outcome in [
            UploadOutcome::Stored,
            UploadOutcome::RateLimited(RateLimited {
                retry_after: Duration::from_millis(3),
            }),
            UploadOutcome::TooMany {
                stored: 1000,
                max: 1000,
            },
        ] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write(message.init_root());
            assert_eq!(
                UploadOutcome::read(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
        for outcome in [
            ChangeOutcome::Accepted,
            ChangeOutcome::Conflict { current_epoch: 7 },
            ChangeOutcome::QueueFull(full),
        ] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write_commit(message.init_root());
            assert_eq!(
                ChangeOutcome::read_commit(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
        for outcome in [
            ChangeOutcome::Accepted,
            ChangeOutcome::Conflict { current_epoch: 3 },
            ChangeOutcome::Invalid {
                reason: "not a member".into(),
            },
            ChangeOutcome::UnknownGroup,
            ChangeOutcome::TooManyProposals { max: 256 },
        ] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write_proposal(message.init_root());
            assert_eq!(
                ChangeOutcome::read_proposal(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
        for outcome in [
            FetchedWelcomeTree::Tree {
                tree: vec![3, 4],
                state_key: Some(StateKey::from_bytes([5; 32])),
            },
            FetchedWelcomeTree::Tree {
                tree: vec![3, 4],
                state_key: None,
            },
            FetchedWelcomeTree::Unavailable,
        ] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write(message.init_root());
            assert_eq!(
                FetchedWelcomeTree::read(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
        for outcome in [
            FetchedGroupInfo::State(GroupState {
                group_info: vec![1],
                ratchet_tree: vec![2, 3],
            }),
            FetchedGroupInfo::Unavailable,
            FetchedGroupInfo::NotMember,
        ] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write(message.init_root());
            assert_eq!(
                FetchedGroupInfo::read(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
        for outcome in [
            DeviceListOutcome::Stored,
            DeviceListOutcome::Stale { current: 4 },
            DeviceListOutcome::BadSignature,
            DeviceListOutcome::NotADevice,
            DeviceListOutcome::RemovedDevice,
            DeviceListOutcome::TooFar {
                current: 2,
                max_step: 1 << 20,
            },
        ] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write(message.init_root());
            assert_eq!(
                DeviceListOutcome::read(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
        for outcome in [FetchedKeyPackage::Package(vec![1, 2]), FetchedKeyPackage::None] {
            let mut message = capnp::message::Builder::new_default();
            outcome.write(message.init_root());
            assert_eq!(
                FetchedKeyPackage::read(message.get_root_as_reader().unwrap()).unwrap(),
                outcome
            );
        }
    }

    #[test]
    fn a_wait_below_a_millisecond_is_sent_as_one() {
        let limited = RateLimited {
            retry_after: Duration::from_micros(10),
        };
        assert_eq!(limited.retry_after_ms(), 1);
        assert_eq!(
            round_trip_send(&SendOutcome::RateLimited(limited)),
            SendOutcome::RateLimited(RateLimited {
                retry_after: Duration::from_millis(1)
            })
        );
    }
}
