//! Telling members a group's name. Group ids are random and the node never
//! sees a name, so a member that adds others tells them the name inside
//! the group (content type group-name, docs/protocol.md) in the epoch its
//! Commit starts. The debt is written with the merge (the state file's
//! `names_owed`), so a command cut off before it paid it leaves it to the
//! next command's catch-up.

use quicnprotochat_core::{GroupId, GroupMember, IdentityKey, IdentityKeypair};

use crate::connections::{Nodes, envelope};
use crate::error::ClientError;
use crate::state::StateFile;

/// Tells the members our change to `group_id` added its name, as
/// [`StateFile::name_owed`] lists them, with `group` as the change left
/// it; the other members know the name already. A group that moved on
/// meanwhile leaves the name owed, to the next catch-up.
pub(crate) async fn pay_name_owed(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    group: &mut GroupMember,
) -> Result<(), ClientError> {
    let Some(joiners) = state.name_owed(group_id)? else {
        return Ok(());
    };
    match send_group_name(nodes, state, identity, group_id, group, &joiners).await {
        Ok(true) => Ok(state.forget_name_owed(group_id)?),
        Ok(false) | Err(ClientError::StaleEpoch { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Pays every name still owed (see [`pay_name_owed`]), once each; run at
/// the end of a catch-up, when the groups are as current as the queue
/// makes them. One the group's state does not allow yet (a proposal
/// waits, or the group moved on again), or the node refused (a joiner's
/// queue is full, say), stays owed: the command that caught up goes on
/// with what it was asked to do. Only a lost connection ends it.
pub(crate) async fn pay_names_owed(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<(), ClientError> {
    for group_id in state.names_owed()? {
        let Some(mut group) = GroupMember::load(&state.provider(), &group_id)? else {
            // The group is gone here: nobody to tell.
            state.forget_name_owed(&group_id)?;
            continue;
        };
        match pay_name_owed(nodes, state, identity, &group_id, &mut group).await {
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => note!("warning: members you added were not told a group's name yet: {e}"),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// Sends the name of `group_id` to those of `recipients` still in `group`,
/// in its current epoch (a group that moved on on the node is
/// `StaleEpoch`). True once nothing more is owed (sent, or nobody or no
/// name left to tell); false when the group cannot send now (a proposal
/// waits for a Commit).
pub(crate) async fn send_group_name(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &GroupId,
    group: &mut GroupMember,
    recipients: &[IdentityKey],
) -> Result<bool, ClientError> {
    let Some(name) = state.group_name(group_id.as_bytes())? else {
        return Ok(true);
    };
    if !group.is_active() {
        return Ok(true);
    }
    if group.has_pending_proposals() {
        return Ok(false);
    }
    // Those still in the group (a Commit that won meanwhile may have
    // removed one).
    let members = group.members();
    let recipients: Vec<IdentityKey> = recipients
        .iter()
        .filter(|r| members.contains(r))
        .copied()
        .collect();
    if recipients.is_empty() {
        return Ok(true);
    }
    let state_key = state.state_key(group_id, group)?;
    let ciphertext = state.encrypt_group_name(group, identity, &name)?;
    nodes
        .deliver(&[envelope(recipients, ciphertext)], Some(&state_key))
        .await?;
    Ok(true)
}
