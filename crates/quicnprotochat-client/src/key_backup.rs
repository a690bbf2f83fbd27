//! The device's key backup on the node (protocol 9): its groups' ids and
//! state keys, sealed under a key derived from its identity secret and
//! filed under another such derivation, so that a device restored from a
//! backup of its identity alone finds its groups and their keys again and
//! can `rejoin` them (`quicnprotochat_core::backup`).
//!
//! The backup is sent again whenever what this state file would put in it
//! changed since the node last stored it (a digest of it is kept in the
//! state file): after a change of ours is merged, after a join, and after
//! the queue is processed (a Commit that moved a group's key on). It is
//! merged with what the node holds, never written over it blindly: a
//! device restored from an old state file knows only some of its groups
//! until it has rejoined the rest, and must not drop their keys from the
//! backup in the meantime. A group leaves the backup only once this state
//! file knows it was removed from it.

use quicnprotochat_core::{BackupSecrets, GroupId, IdentityKeypair, KeyBackup, StateKey};
use quicnprotochat_proto::outcome::BackupOutcome;
use sha2::Digest as _;

use crate::connections::Nodes;
use crate::error::ClientError;
use crate::state::StateFile;

/// Sends the key backup if it changed since the node last stored it. A
/// failure is only noted: the backup is sent again by the next command,
/// and nothing of the command that called this depends on it.
pub(crate) async fn sync_key_backup(nodes: &Nodes, state: &StateFile) {
    if let Err(e) = try_sync(nodes, state).await {
        note!("warning: the key backup on the node was not updated ({e}); the next command tries again");
    }
}

async fn try_sync(nodes: &Nodes, state: &StateFile) -> Result<(), ClientError> {
    let ours = state.state_keys()?;
    let digest = digest(&ours);
    if state.stored_backup_digest()?.as_deref() == Some(&digest[..]) {
        return Ok(());
    }
    let identity = state.identity()?;
    let secrets = BackupSecrets::of(&identity);
    let mut backup = ours;
    let kept = nodes.delivery().fetch_key_backup(&secrets.lookup).await?;
    // One that does not open (damaged) is replaced by ours.
    if let Some(kept) = KeyBackup::open(&secrets.key, &kept) {
        for (id, key) in kept.groups {
            if backup.state_key(&id).is_none() && !state.is_out_of(&id)? {
                backup.groups.push((id, key));
            }
        }
    }
    match nodes
        .delivery()
        .put_key_backup(&secrets.lookup, &backup.seal(&secrets.key))
        .await?
    {
        BackupOutcome::Stored => Ok(state.note_backup_stored(&digest)?),
        // Nothing stored; the next command sends it again.
        BackupOutcome::RateLimited(_) => Ok(()),
        BackupOutcome::TooLarge { max_bytes } => Err(ClientError::Usage(format!(
            "the key backup of {} groups is larger than the {max_bytes} bytes the node keeps",
            backup.groups.len()
        ))),
    }
}

/// The state key of `group_id` in our key backup on the node, if it holds
/// one.
pub(crate) async fn backed_up_state_key(
    nodes: &Nodes,
    identity: &IdentityKeypair,
    group_id: &GroupId,
) -> Result<Option<StateKey>, ClientError> {
    let secrets = BackupSecrets::of(identity);
    let sealed = nodes.delivery().fetch_key_backup(&secrets.lookup).await?;
    if sealed.is_empty() {
        return Ok(None);
    }
    Ok(KeyBackup::open(&secrets.key, &sealed).and_then(|backup| backup.state_key(group_id).cloned()))
}

/// The groups our key backup on the node names (none if there is none).
pub(crate) async fn backed_up_groups(
    nodes: &Nodes,
    identity: &IdentityKeypair,
) -> Result<Vec<GroupId>, ClientError> {
    let secrets = BackupSecrets::of(identity);
    let sealed = nodes.delivery().fetch_key_backup(&secrets.lookup).await?;
    if sealed.is_empty() {
        return Ok(Vec::new());
    }
    // Only this device seals what is filed under its lookup: anything else
    // there is the node's doing (or damage), not ours.
    let backup = KeyBackup::open(&secrets.key, &sealed).ok_or_else(|| {
        ClientError::Protocol("the node's key backup for this device does not open with its key".into())
    })?;
    Ok(backup.groups.into_iter().map(|(id, _)| id).collect())
}

/// What the backup holds, in a form that changes exactly when it does.
fn digest(backup: &KeyBackup) -> [u8; 32] {
    let mut hash = sha2::Sha256::new();
    hash.update(b"quicnprotochat key backup digest");
    for (id, key) in &backup.groups {
        hash.update((id.as_bytes().len() as u16).to_be_bytes());
        hash.update(id.as_bytes());
        hash.update(key.as_bytes());
    }
    hash.finalize().into()
}
