//! Group changes, one Commit per epoch, published so that a crash or a lost
//! answer never leaves a group half-changed.
//!
//! The protocol:
//! 1. [`stage`] makes the change against the group as stored and saves the
//!    publication (Commit, Welcome, their recipients and message ids, and
//!    the GroupInfo of the epoch the Commit starts, which the node serves to
//!    members who rejoin) in the outbox, in one transaction with the pending
//!    Commit.
//! 2. [`send_publication`] publishes it and settles it by the node's typed
//!    answer: accepted → merge; conflict (another Commit won the epoch) →
//!    discard; rate limited → wait as told and publish the same Commit
//!    again; queue full, not valid (the node's check against the group's
//!    public state failed) or refused → discard and report; unknown group
//!    (the node keeps no state for it) → discard and tell the user to make a
//!    new group. Merging or discarding and forgetting the publication are
//!    one transaction. The group's first change (made in epoch 0, when only
//!    its creator can be in it) carries the group's public state of epoch 0,
//!    from which the node checks every later change.
//! 3. Without an answer (the session broke, no reply in time) the change
//!    stays pending and [`resume_publications`] resends it, with the same
//!    message ids, at the start of the next command.
//!
//! `changes::change_group` runs the whole thing for a command and, when
//! another member's Commit won, catches up and makes the change again.
//!
//! [`rejoin`] brings back a group whose state we lost: from the group's
//! GroupInfo and tree on the node it makes an external Commit that replaces
//! our old leaf. openmls merges that Commit at once, so the outbox marks
//! the publication as a rejoin: the node's answer keeps the group (and
//! records it as ours) or deletes it again; a lost race is retried with the
//! group's new state.
//!
//! Standalone proposals (a request to leave) go out with [`send_proposal`]: the
//! node checks them too and keeps them for the Commit that will reference
//! them. One the node did not take is withdrawn from the group again, since
//! no Commit can ever cover it.

use std::time::Duration;

use quicnprotochat_core::{GroupId, GroupMember, IdentityKey, IdentityKeypair};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedGroupInfo};
use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};

use crate::connections::{Nodes, Patience, envelope};
use crate::error::ClientError;
use crate::key_backup::{backed_up_state_key, sync_key_backup};
use crate::naming::{group_name, others};
use crate::output::counted;
use crate::state::{Publication, Settlement, StateError, StateFile};

/// A group change built against the group's current state: a pending
/// Commit, who gets it, and the Welcome for new members if any.
pub(crate) struct Change {
    /// The Commit (pending in the group until published).
    pub(crate) commit: Vec<u8>,
    /// Who gets the Commit: every other member, including removed ones.
    pub(crate) commit_to: Vec<IdentityKey>,
    /// The Welcome and the new members.
    pub(crate) welcome: Option<(Vec<u8>, Vec<IdentityKey>)>,
}

/// How a published change ended, when the node took or rejected it as a
/// competitor (any other end is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The node took it; our Commit is merged.
    Merged,
    /// Another member's Commit won the epoch; ours was discarded.
    Lost {
        /// The epoch the group is in on the node.
        current_epoch: u64,
    },
    /// The node found no group our state key opens, and took no state of
    /// ours in its place; ours was discarded. A member who missed a Commit
    /// that moved the group's key on gets this: catching up brings the
    /// key (and the epoch) the node has.
    Unknown,
}

/// How often a change is redone after losing the race for an epoch.
pub(crate) const CHANGE_ATTEMPTS: usize = 3;

/// How often an unanswered publication is sent again within one command.
const PUBLISH_ATTEMPTS: usize = 3;

/// Pause before sending an unanswered publication again.
const RESEND_PAUSE: Duration = Duration::from_millis(300);

/// Makes a change with `make` and saves it in the outbox in the same
/// transaction, so a pending Commit never exists without the publication
/// that settles it. Send it with [`send_publication`].
pub(crate) fn stage(
    state: &StateFile,
    group: &mut GroupMember,
    group_id: &GroupId,
    make: impl FnOnce(&mut GroupMember) -> Result<Change, ClientError>,
) -> Result<Publication, ClientError> {
    let epoch = group.epoch();
    state.stage_publication(|| {
        let change = make(group)?;
        Ok(Publication {
            group_id: group_id.clone(),
            epoch,
            commit: envelope(change.commit_to, change.commit),
            welcome: change.welcome.map(|(payload, to)| envelope(to, payload)),
            // Made with the Commit and never again: saved so a resend
            // carries it too.
            group_info: group.pending_group_info().map(<[u8]>::to_vec),
            rejoin: false,
        })
    })
}

/// Rejoins `group_id`, whose state we lost (or whose stored state is stale),
/// by external commit from the group's current GroupInfo and tree on the
/// node; returns the group in its new epoch. The node serves those only to
/// a member and takes the Commit only as that member's rejoin. If another
/// Commit won the epoch, the rejoin is undone and made again from the
/// group's new state.
pub(crate) async fn rejoin(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
) -> Result<GroupMember, ClientError> {
    let name = group_name(state, group_id.as_bytes());
    let me = identity.public_key();
    // An unanswered rejoin of an earlier run is settled first.
    resume_publications(nodes, state, identity).await?;
    let mut current_epoch = 0;
    for attempt in 1..=CHANGE_ATTEMPTS {
        let (group_info, ratchet_tree) = match fetch_group_info(nodes, state, identity, group_id).await {
            Ok(FetchedGroupInfo::State(current)) => (current.group_info, current.ratchet_tree),
            Ok(FetchedGroupInfo::Unavailable) => return Err(ClientError::NoGroupInfo { group: name }),
            // The node knows no leaf of ours in the group (or no group).
            Ok(FetchedGroupInfo::NotMember) => {
                return Err(ClientError::RejoinRefused {
                    group: name,
                    reason: "the node knows you as no member of it, or neither this device nor its key backup holds the group's state key".into(),
                });
            }
            // The call itself was wrong: the same call fails again.
            Err(ClientError::Rpc(e)) if e.kind == capnp::ErrorKind::Failed => {
                return Err(ClientError::RejoinRefused {
                    group: name,
                    reason: e.to_string(),
                });
            }
            // Overloaded or outcome unknown: nothing to drop, try later.
            Err(e) => return Err(e),
        };
        let publication = nodes
            .with_lists(state, |directory| {
                state.stage_publication(|| -> Result<Publication, ClientError> {
                    let rejoined = GroupMember::rejoin(
                        &state.provider(),
                        identity,
                        group_id,
                        &group_info,
                        &ratchet_tree,
                        directory,
                    )?;
                    Ok(Publication {
                        group_id: group_id.clone(),
                        epoch: rejoined.epoch,
                        commit: envelope(others(&rejoined.group, &me), rejoined.commit),
                        welcome: None,
                        group_info: Some(rejoined.group_info),
                        rejoin: true,
                    })
                })
            })
            .await?;
        let mut group = GroupMember::load(&state.provider(), group_id)?
            .ok_or(ClientError::Internal("a staged rejoin left no group"))?;
        match send_publication(nodes, state, identity, &mut group, &publication).await? {
            Settled::Merged => {
                sync_key_backup(nodes, state).await;
                return Ok(group);
            }
            Settled::Lost { current_epoch: now } => {
                current_epoch = now;
                if attempt < CHANGE_ATTEMPTS {
                    note!(
                        "{name} changed while you rejoined (now at epoch {now}); trying again from its new state"
                    );
                }
            }
            // The key that served the state no longer opens it: a Commit
            // moved it on meanwhile, and this device cannot learn the new
            // key (its key backup may, once another device of ours wrote
            // it).
            Settled::Unknown => {
                return Err(ClientError::RejoinRefused {
                    group: name,
                    reason: "the group's state key changed while you rejoined; run `rejoin` again".into(),
                });
            }
        }
    }
    Err(ClientError::CommitConflict { current_epoch })
}

/// The group's current GroupInfo and tree, asked with the state key this
/// device keeps for it or, when that opens nothing (we never had it, or a
/// Commit we missed moved it on), with the one in our key backup on the
/// node, which every device of ours updates as it follows the group. The
/// key that opened the state is kept for the rejoin.
async fn fetch_group_info(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
) -> Result<FetchedGroupInfo, ClientError> {
    let kept = state.kept_state_key(group_id)?;
    if let Some(key) = &kept {
        let fetched = nodes.delivery().fetch_group_info(group_id, key).await?;
        if fetched != FetchedGroupInfo::NotMember {
            return Ok(fetched);
        }
    }
    match backed_up_state_key(nodes, identity, group_id).await? {
        Some(key) if Some(&key) != kept.as_ref() => {
            let fetched = nodes.delivery().fetch_group_info(group_id, &key).await?;
            if fetched != FetchedGroupInfo::NotMember {
                state.set_state_key(group_id, &key)?;
            }
            Ok(fetched)
        }
        _ => Ok(FetchedGroupInfo::NotMember),
    }
}

/// Publishes a staged change and settles it by the node's answer (see the
/// module docs). Returns [`ClientError::Unconfirmed`] when no answer came:
/// the change then stays pending.
pub(crate) async fn send_publication(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group: &mut GroupMember,
    publication: &Publication,
) -> Result<Settled, ClientError> {
    let group_id = &publication.group_id;
    // The group's first change: the node has no state for the group yet.
    // Exported now from the group as stored (still in epoch 0, the Commit
    // pending), not saved with the publication, so a resend after a crash
    // carries it as well; a node that already has the state ignores it. A
    // rejoin needs none: the node served the state it started from.
    let mut initial_state = if publication.epoch == 0 && !publication.rejoin {
        Some(initial_state(state, identity, group, publication.epoch)?)
    } else {
        None
    };
    // The node seals the tree it keeps for the members a Commit adds under
    // the key of the epoch the Commit starts (they compute it from their
    // Welcome); the pending Commit is in storage, so a resend after a
    // crash computes the same key.
    let epoch_key = match &publication.welcome {
        Some(_) => Some(group.pending_epoch_key(&state.provider())?),
        None => None,
    };
    // The group's state key opens its state on the node; a Commit that
    // takes a device out brings the next one (computed likewise from the
    // pending Commit). A rejoin is merged already and takes nobody out.
    let state_key = state.state_key(group_id, group)?;
    let new_state_key = if publication.rejoin {
        None
    } else {
        group.pending_state_key(&state.provider())?
    };
    let patience = Patience::new();
    let mut unanswered = 0;
    let refusal = loop {
        let answer = nodes
            .delivery()
            .publish_commit(&CommitToSend {
                group_id,
                epoch: publication.epoch,
                commit: &publication.commit,
                welcome: publication.welcome.as_ref(),
                initial_state: initial_state.as_ref(),
                group_info: publication.group_info.as_deref(),
                epoch_key: epoch_key.as_ref(),
                state_key: &state_key,
                new_state_key: new_state_key.as_ref(),
            })
            .await;
        match answer {
            Ok(ChangeOutcome::Accepted) => {
                settle(state, publication, group, Settlement::Merge)?;
                return Ok(Settled::Merged);
            }
            Ok(ChangeOutcome::Conflict { current_epoch }) => {
                settle(state, publication, group, Settlement::Discard)?;
                return Ok(Settled::Lost { current_epoch });
            }
            Ok(ChangeOutcome::RateLimited(limited)) => {
                // Nothing was stored: the same Commit may be published again.
                if !patience.wait(&limited).await {
                    break limited.into();
                }
            }
            Ok(ChangeOutcome::QueueFull(full)) => break full.into(),
            Ok(ChangeOutcome::Invalid { reason }) => break ClientError::InvalidChange { reason },
            // A Commit's answer has no such member: `read_commit` never
            // yields it.
            Ok(ChangeOutcome::TooManyProposals { max }) => {
                break ClientError::InvalidChange {
                    reason: format!("the group holds {max} proposals in this epoch already"),
                };
            }
            Ok(ChangeOutcome::UnknownGroup) if initial_state.is_none() && !publication.rejoin => {
                // The node forgot the group's public state (it was idle for
                // the node's group retention), or keeps it under a key we
                // do not hold: hand it over again, in the epoch the node
                // still knows the group to be in.
                initial_state = Some(self::initial_state(state, identity, group, publication.epoch)?);
            }
            Ok(ChangeOutcome::UnknownGroup) => {
                // The node has the group in another state than ours (we
                // may have missed a Commit that moved its key on), or not
                // at all: drop the change so the group is at least
                // readable as it was; the caller catches up and tells.
                settle(state, publication, group, Settlement::Discard)?;
                return Ok(Settled::Unknown);
            }
            Err(refused) if refused_by_node(&refused) => break refused,
            Err(e) => {
                unanswered += 1;
                if unanswered >= PUBLISH_ATTEMPTS {
                    return Err(ClientError::Unconfirmed {
                        group: group_name(state, group_id.as_bytes()),
                        reason: e.to_string(),
                    });
                }
                tokio::time::sleep(RESEND_PAUSE).await;
            }
        }
    };
    // The node stored none of it: drop the change, the group stays as it was.
    settle(state, publication, group, Settlement::Discard)?;
    Err(ClientError::ChangeRefused {
        group: group_name(state, group_id.as_bytes()),
        reason: Box::new(refusal),
    })
}

/// Settles `publication` by the node's answer: a change's pending Commit is
/// merged or discarded; a rejoin's group (merged when it was made) is kept
/// and recorded as ours, or deleted.
fn settle(
    state: &StateFile,
    publication: &Publication,
    group: &mut GroupMember,
    settlement: Settlement,
) -> Result<(), StateError> {
    if publication.rejoin {
        state.settle_rejoin(&publication.group_id, settlement)
    } else {
        let joiners = publication
            .welcome
            .as_ref()
            .map_or(&[][..], |welcome| &welcome.recipients[..]);
        state.settle_publication(&publication.group_id, group, settlement, joiners)
    }
}

/// The group's public state in `epoch`, for the node, from the group as
/// stored (its pending Commit does not change it).
fn initial_state(
    state: &StateFile,
    identity: &IdentityKeypair,
    group: &GroupMember,
    epoch: u64,
) -> Result<GroupState, ClientError> {
    // A pending Commit keeps its group in the epoch it was made in.
    if group.epoch() != epoch {
        return Err(ClientError::Internal(
            "a pending change is not in its group's epoch",
        ));
    }
    Ok(group.export_public_state(&state.provider(), identity)?)
}

/// Whether an error is the node refusing the call for good (`failed`:
/// nothing stored, and the same call fails again), as opposed to no
/// answer, an unknown outcome (`disconnected`: it may have the change) or
/// a passing failure (`overloaded`: nothing stored, try later), after
/// which the change is kept and sent again. Decided by the exception's
/// kind, never its text.
fn refused_by_node(error: &ClientError) -> bool {
    matches!(error, ClientError::Rpc(e) if e.kind == capnp::ErrorKind::Failed)
}

/// Settles group changes left unanswered by earlier runs: resends them with
/// the same message ids (the node stores them at most once) and merges or
/// discards them by the answer.
pub(crate) async fn resume_publications(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<(), ClientError> {
    for publication in state.publications()? {
        let name = group_name(state, publication.group_id.as_bytes());
        match GroupMember::load(&state.provider(), &publication.group_id)? {
            // A rejoin's Commit is merged already; a change's is pending.
            Some(mut group) if publication.rejoin || group.has_pending_commit() => {
                let what = if publication.rejoin {
                    "your unconfirmed rejoin of"
                } else {
                    "an unconfirmed change to"
                };
                note!("resending {what} {name}");
                match send_publication(nodes, state, identity, &mut group, &publication).await? {
                    Settled::Merged => note!("{name}: the node has it; now epoch {}", group.epoch()),
                    Settled::Lost { current_epoch } if publication.rejoin => note!(
                        "{name}: another member's change won (the group is at epoch {current_epoch}); your rejoin was dropped: run `rejoin` again"
                    ),
                    Settled::Lost { current_epoch } => note!(
                        "{name}: another member's change won (the group is at epoch {current_epoch}); yours was dropped"
                    ),
                    Settled::Unknown => note!(
                        "{name}: the node has the group in another state than yours; your change was dropped: catch up (recv) and make it again"
                    ),
                }
            }
            // Nothing pending any more: the entry is stale.
            _ => state.forget_publication(&publication.group_id)?,
        }
    }
    Ok(())
}

/// Commits pending proposals in every group where it is our turn.
pub(crate) async fn commit_due_proposals(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<(), ClientError> {
    for record in state.groups()? {
        if let Some(mut group) = GroupMember::load(&state.provider(), &record.group_id)?
            && group.should_commit_pending_proposals()
        {
            commit_proposals(nodes, state, identity, &record.group_id, &mut group).await?;
        }
    }
    Ok(())
}

/// Commits the pending proposals of `group` (e.g. a member leaving) and
/// publishes the commit to every other member, including those it removes.
/// If another member committed first, ours is dropped: theirs covers it.
pub(crate) async fn commit_proposals(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    group: &mut GroupMember,
) -> Result<(), ClientError> {
    let me = identity.public_key();
    let publication = stage(state, group, group_id, |group| {
        Ok(Change {
            commit_to: others(group, &me),
            commit: group.commit_pending_proposals(&state.provider(), identity)?,
            welcome: None,
        })
    })?;
    if send_publication(nodes, state, identity, group, &publication).await? == Settled::Merged {
        note!(
            "group {}: committed pending proposals; now epoch {}, {}",
            group_name(state, group_id),
            group.epoch(),
            counted(group.user_count(), "member", "members")
        );
    }
    Ok(())
}

/// How a published proposal ended, when the node took it or another
/// member's Commit had moved the group on (any other end is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proposed {
    /// The node stored it and queued it for the other members.
    Accepted,
    /// The group is in another epoch on the node; ours was withdrawn.
    Lost {
        /// The epoch the group is in on the node.
        current_epoch: u64,
    },
    /// The node found no group our state key opens; ours was withdrawn
    /// (see [`Settled::Unknown`]).
    Unknown,
}

/// Publishes a proposal made in `epoch` and acts on the node's answer: a
/// rate limit is waited out (within our patience), anything the node did
/// not take withdraws the proposal from `group`.
pub(crate) async fn send_proposal(
    nodes: &Nodes,
    state: &StateFile,
    group_id: &GroupId,
    group: &mut GroupMember,
    epoch: u64,
    proposal: &Envelope,
) -> Result<Proposed, ClientError> {
    let name = group_name(state, group_id.as_bytes());
    let patience = Patience::new();
    let mut unanswered = 0;
    let refusal = loop {
        let state_key = state.state_key(group_id, group)?;
        match nodes
            .delivery()
            .publish_proposal(group_id, epoch, proposal, &state_key)
            .await
        {
            Ok(ChangeOutcome::Accepted) => return Ok(Proposed::Accepted),
            Ok(ChangeOutcome::Conflict { current_epoch }) => {
                state.withdraw_proposals(group_id, group)?;
                return Ok(Proposed::Lost { current_epoch });
            }
            Ok(ChangeOutcome::RateLimited(limited)) => {
                // Nothing was stored: the same proposal may be sent again.
                if !patience.wait(&limited).await {
                    break limited.into();
                }
            }
            Ok(ChangeOutcome::QueueFull(full)) => break full.into(),
            Ok(ChangeOutcome::Invalid { reason }) => break ClientError::InvalidChange { reason },
            Ok(ChangeOutcome::UnknownGroup) => {
                state.withdraw_proposals(group_id, group)?;
                return Ok(Proposed::Unknown);
            }
            Ok(ChangeOutcome::TooManyProposals { max }) => {
                break ClientError::TooManyProposals {
                    group: name.clone(),
                    max,
                };
            }
            Err(refused) if refused_by_node(&refused) => break refused,
            Err(e) => {
                // The node may have it: the proposal stays, since a Commit
                // referencing it can only be processed while we hold it.
                unanswered += 1;
                if unanswered >= PUBLISH_ATTEMPTS {
                    return Err(ClientError::ProposalUnconfirmed {
                        group: name,
                        reason: e.to_string(),
                    });
                }
                tokio::time::sleep(RESEND_PAUSE).await;
            }
        }
    };
    state.withdraw_proposals(group_id, group)?;
    Err(ClientError::ChangeRefused {
        group: name,
        reason: Box::new(refusal),
    })
}
