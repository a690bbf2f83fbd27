//! Group changes as commands and `chat` make them, through open
//! connections: invite, remove, update, leave (a proposal), and replacing
//! the leaf keys another device made for this one. Each is made against
//! the group as stored and published ([`crate::publish`]); when another
//! member's Commit won the epoch, the queue is caught up
//! ([`crate::sync`]) and the change made again.

use std::collections::BTreeSet;

use quicnprotochat_core::{CoreError, GroupId, GroupMember, IdentityKey, IdentityKeypair};

use crate::cli::PeerArgs;
use crate::connections::{Nodes, envelope};
use crate::error::ClientError;
use crate::group_names::pay_name_owed;
use crate::key_backup::sync_key_backup;
use crate::key_packages::fetch_verified_key_package;
use crate::naming::{
    changed_event, devices_of, group_name, load_group_as_member, others, resolve_peers, users,
};
use crate::output::{self, Progress, counted};
use crate::publish::{
    CHANGE_ATTEMPTS, Change, Proposed, Settled, resume_publications, send_proposal, send_publication, stage,
};
use crate::state::StateFile;
use crate::sync::catch_up;

/// Makes and publishes a group change: `make` builds it against the group
/// as stored; the node accepts it only if no other Commit won that epoch.
/// If another member's Commit won, ours is discarded, the queue is processed
/// (bringing the group up to date) and the change is made again, telling
/// the user.
pub(crate) async fn change_group(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    mut make: impl FnMut(&mut GroupMember) -> Result<Change, ClientError>,
) -> Result<GroupMember, ClientError> {
    let name = group_name(state, group_id);
    resume_publications(nodes, state, identity).await?;
    let mut current_epoch = 0;
    for attempt in 1..=CHANGE_ATTEMPTS {
        let mut group = GroupMember::load(&state.provider(), group_id)?
            .ok_or_else(|| ClientError::NoGroup(format!("{name} is not one of your groups")))?;
        // A change that adds devices of users whose lists this command has
        // not fetched fails without staging anything; fetch and make it
        // again.
        let publication = match stage(state, &mut group, group_id, &mut make) {
            Err(ClientError::Core(CoreError::DeviceListsNeeded(users))) => {
                nodes.fetch_device_lists(state, &users).await?;
                stage(state, &mut group, group_id, &mut make)?
            }
            other => other?,
        };
        let settled = send_publication(nodes, state, identity, &mut group, &publication).await?;
        if settled == Settled::Merged {
            // The change may have created the group on the node, or moved
            // its key on: our key backup follows.
            sync_key_backup(nodes, state).await;
        }
        match settled {
            Settled::Merged if publication.welcome.is_some() => {
                // The change is made whatever happens to the name: if it
                // could not be sent, the next command sends it.
                if let Err(e) = pay_name_owed(nodes, state, identity, group_id, &mut group).await {
                    note!(
                        "warning: the members added to {name} were not told its name yet ({e}); your next command tells them"
                    );
                    // The copy in hand may have moved on without being
                    // stored (or caught up past it): the stored one holds.
                    return GroupMember::load(&state.provider(), group_id)?
                        .ok_or(ClientError::Internal("a group vanished after a change"));
                }
                return Ok(group);
            }
            Settled::Merged => return Ok(group),
            Settled::Lost { current_epoch: now } => {
                current_epoch = now;
                if attempt < CHANGE_ATTEMPTS {
                    note!(
                        "another member changed {name} first (now at epoch {now}); catching up and trying again"
                    );
                    catch_up(nodes, state, identity).await?;
                }
            }
            Settled::Unknown => {
                caught_up_past(nodes, state, identity, group_id, publication.epoch).await?;
                current_epoch = publication.epoch;
            }
        }
    }
    Err(ClientError::CommitConflict { current_epoch })
}

/// After the node found no group our state key opens: catches up, which
/// brings any Commit we missed (and the key it moved the group to). Fails
/// with [`ClientError::GroupUnknownToNode`] if that moved the group past
/// `epoch` no further: the node has no state of it that we can reach.
async fn caught_up_past(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    epoch: u64,
) -> Result<(), ClientError> {
    catch_up(nodes, state, identity).await?;
    let moved = GroupMember::load(&state.provider(), group_id)?.is_some_and(|group| group.epoch() > epoch);
    if moved {
        note!(
            "{} changed meanwhile; caught up and trying again",
            group_name(state, group_id)
        );
        Ok(())
    } else {
        Err(ClientError::GroupUnknownToNode {
            group: group_name(state, group_id),
        })
    }
}

/// Makes a standalone proposal with `make` (against the group as stored;
/// it returns the TLS-encoded proposal, which it leaves pending in the
/// group as ours) and publishes it to every other member. If the group had
/// moved to another epoch on the node, the proposal is withdrawn, the queue
/// processed and the proposal made again, telling the user. Every other
/// refusal withdraws it and is reported.
pub(crate) async fn propose(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    mut make: impl FnMut(&mut GroupMember) -> Result<Vec<u8>, ClientError>,
) -> Result<GroupMember, ClientError> {
    let name = group_name(state, group_id);
    let me = identity.public_key();
    // A change of ours left unanswered must be settled first: it decides
    // the epoch the proposal is made in.
    resume_publications(nodes, state, identity).await?;
    let mut current_epoch = 0;
    for attempt in 1..=CHANGE_ATTEMPTS {
        let mut group = GroupMember::load(&state.provider(), group_id)?
            .ok_or_else(|| ClientError::NoGroup(format!("{name} is not one of your groups")))?;
        let recipients = others(&group, &me);
        if recipients.is_empty() {
            return Err(ClientError::Usage(format!(
                "you are the only member of {name}; there is nobody to ask"
            )));
        }
        let epoch = group.epoch();
        let proposal = envelope(recipients, make(&mut group)?);
        match send_proposal(nodes, state, group_id, &mut group, epoch, &proposal).await? {
            Proposed::Accepted => return Ok(group),
            Proposed::Unknown => {
                caught_up_past(nodes, state, identity, group_id, epoch).await?;
                current_epoch = epoch;
            }
            Proposed::Lost { current_epoch: now } => {
                current_epoch = now;
                if attempt < CHANGE_ATTEMPTS {
                    note!("{name} changed meanwhile (now at epoch {now}); catching up and asking again");
                    catch_up(nodes, state, identity).await?;
                }
            }
        }
    }
    Err(ClientError::CommitConflict { current_epoch })
}

/// Adds every peer in one Commit through open connections, as `invite`
/// does; `chat`'s `/invite` uses it too.
pub(crate) async fn invite(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    peers: &PeerArgs,
    group_id: Option<&str>,
) -> Result<(), ClientError> {
    let (group_id, group) = load_group_as_member(state, group_id)?;
    let peers = resolve_peers(state, peers)?;
    if peers.is_empty() {
        return Err(ClientError::Usage(
            "name at least one peer with --peer-key HEX or --peer NAME".into(),
        ));
    }
    // Every current device of each peer, and of our own user (so that our
    // other devices are in every group we are), that is not in the group.
    let own_user = identity.user();
    let mut users = peers.clone();
    users.push(own_user);
    nodes.fetch_device_lists(state, &users).await?;
    let present = group.members();
    let mut targets: Vec<(IdentityKey, IdentityKey)> = Vec::new();
    for user in &users {
        let devices = nodes
            .directory()
            .devices(user)
            .ok_or(ClientError::Internal("a fetched user has no devices"))?;
        let missing: Vec<IdentityKey> = devices.into_iter().filter(|d| !present.contains(d)).collect();
        if missing.is_empty() && *user != own_user {
            return Err(ClientError::Usage(format!(
                "{user} is already a member of {}",
                group_name(state, &group_id)
            )));
        }
        targets.extend(missing.into_iter().map(|device| (*user, device)));
    }
    let mut packages = Vec::with_capacity(targets.len());
    let mut joiners = Vec::with_capacity(targets.len());
    let progress = Progress::new(targets.len(), 20, "fetching KeyPackages");
    for user in &users {
        let mut reached = 0;
        let mut last_error = None;
        for (_, device) in targets.iter().filter(|(owner, _)| owner == user) {
            let fetched = fetch_verified_key_package(nodes, Some(user), device, group.suite()).await;
            progress.step();
            match fetched {
                Ok(package) => {
                    packages.push(package);
                    joiners.push(*device);
                    reached += 1;
                }
                // One device without a KeyPackage (long offline) must not
                // keep the user's other devices out.
                Err(e @ ClientError::NoKeyPackage(..)) => {
                    progress.suspend(|| {
                        note!(
                            "warning: skipped device {} of {}: {e}",
                            device.short(),
                            user.short()
                        )
                    });
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if reached == 0 && *user != own_user {
            return Err(last_error.unwrap_or(ClientError::NoKeyPackage(*user, group.suite())));
        }
    }
    // Cleared before the Commit goes out.
    drop(progress);
    let me = identity.public_key();
    let group = change_reported(nodes, state, identity, &group_id, |group| {
        let commit_to = others(group, &me);
        let added = group.add_members(&state.provider(), identity, &packages, nodes.directory())?;
        Ok(Change {
            commit: added.commit,
            commit_to,
            welcome: Some((added.welcome, joiners.clone())),
        })
    })
    .await?;
    state.record_group(&group_id, true)?;
    note!(
        "invited {} ({}) to {}: epoch {}, {}",
        counted(peers.len(), "person", "people"),
        counted(joiners.len(), "device", "devices"),
        group_name(state, &group_id),
        group.epoch(),
        counted(group.user_count(), "member", "members")
    );
    Ok(())
}

/// [`change_group`], then with `--json` the `changed` object of our own
/// change, as the other members see it: who joined and left.
async fn change_reported(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    mut make: impl FnMut(&mut GroupMember) -> Result<Change, ClientError>,
) -> Result<GroupMember, ClientError> {
    let report = output::json();
    let mut before = BTreeSet::new();
    let group = change_group(nodes, state, identity, group_id, |group| {
        // The users in the epoch the change is made in (after a lost race
        // it is made again in a later one); a big group's member list is
        // not free, so only when it is reported.
        if report {
            before = users(group);
        }
        make(group)
    })
    .await?;
    if report {
        changed_event(state, group_id, &before, &group)?.print()?;
    }
    Ok(group)
}

/// Removes `keys` from the group in one Commit: every device of a user
/// key, or the device a device key names; sent to everyone including the
/// removed, so they learn of it.
pub(crate) async fn remove_from_group(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    keys: &[IdentityKey],
) -> Result<GroupMember, ClientError> {
    let me = identity.public_key();
    change_reported(nodes, state, identity, group_id, |group| {
        let commit_to = others(group, &me);
        let devices = devices_of(group, keys)?;
        let commit = group.remove_members(&state.provider(), identity, &devices)?;
        Ok(Change {
            commit,
            commit_to,
            welcome: None,
        })
    })
    .await
}

/// Replaces our leaf's keys in `group_id` with a Commit (which also
/// commits pending proposals), through open connections.
pub(crate) async fn update_through(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
) -> Result<GroupMember, ClientError> {
    let me = identity.public_key();
    change_reported(nodes, state, identity, group_id, |group| {
        let commit_to = others(group, &me);
        let commit = group.self_update(&state.provider(), identity)?;
        Ok(Change {
            commit,
            commit_to,
            welcome: None,
        })
    })
    .await
}

/// Replaces our leaf keys in every group we joined with a KeyPackage the
/// device that linked us made (and so whose private keys it knows), one
/// `update` Commit per group: otherwise, were that device removed later,
/// it could still open what is encrypted to our leaf. The first `recv` of a
/// new device does it; a group that cannot be updated now is tried again
/// by the next `recv`.
pub(crate) async fn replace_handed_leaves(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<(), ClientError> {
    for group_id in state.handed_leaves()? {
        let name = group_name(state, &group_id);
        if !GroupMember::load(&state.provider(), &group_id)?.is_some_and(|group| group.is_active()) {
            state.forget_handed_leaf(&group_id)?;
            continue;
        }
        match update_through(nodes, state, identity, &group_id).await {
            Ok(group) => {
                state.forget_handed_leaf(&group_id)?;
                note!(
                    "replaced the keys your other device made for this one in {name}: epoch {}",
                    group.epoch()
                );
            }
            Err(e) => {
                note!(
                    "warning: could not yet replace the keys your other device made for this one in {name} ({e}); the next `recv` tries again"
                );
                if e.is_connection_lost() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
