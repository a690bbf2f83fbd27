//! Group management: `create-group`, `invite`, `remove`, `update`, `leave`,
//! `rejoin`, and the read-only `groups`, `members`, `history`.
//!
//! Every change is a Commit (or, for `leave`, a proposal) that the node
//! checks against the group's public state. A Commit stays pending until
//! the node has accepted all its messages in one atomic call; only then is
//! it merged. If the node refuses a Commit or a proposal, the group is left
//! as it was.

use std::time::{Duration, UNIX_EPOCH};

use quicnprotochat_core::{Content, CoreError, GroupMember, Suite};
use serde_json::json;

use crate::changes::{self, propose, remove_from_group, update_through};
use crate::cli::{ConnectionArgs, PeerArgs};
use crate::connections::Nodes;
use crate::error::ClientError;
use crate::key_backup;
use crate::naming::print_members;
use crate::naming::{
    group_name, load_group, load_group_as_member, member_name, new_group_id, others, rejoin_group_id,
    resolve_peers, valid_group_name,
};
use crate::output::counted;
use crate::output::{self, print_json, shown};
use crate::publish;
use crate::state::{Direction, StateAccess, StateFile};

/// `create-group`: a new group with us as its only member, in `suite`. Its
/// MLS group id is random; `name` stays in the state file, and reaches the
/// members we invite inside the group (see `group_names`).
pub(crate) fn create_group(access: &StateAccess, name: &str, suite: Suite) -> Result<(), ClientError> {
    if !valid_group_name(name) {
        return Err(ClientError::Usage(format!(
            "--group-id must be 1 to {} bytes of text that shows as written",
            Content::MAX_NAME_LEN
        )));
    }
    let state = StateFile::open(access)?;
    if state
        .groups()?
        .iter()
        .any(|record| group_name(&state, &record.group_id) == name)
    {
        return Err(ClientError::Usage(format!(
            "you already have a group called {name}; choose another name"
        )));
    }
    let identity = state.identity()?;
    let id = new_group_id();
    let group = state.create_group(&identity, &id, name, suite)?;
    if output::json() {
        print_json(&json!({
            "group": name,
            "group_id": hex::encode(id.as_bytes()),
            "epoch": group.epoch(),
            "members": 1,
            "ciphersuite": suite.name(),
        }))?;
    }
    note!(
        "created group {name} (id {}, epoch {}, 1 member, ciphersuite {suite})",
        hex::encode(id.as_bytes()),
        group.epoch()
    );
    Ok(())
}

/// `invite`: adds every peer in one Commit; the Commit goes to the existing
/// members and the Welcome to the new ones, in one atomic delivery.
pub(crate) async fn invite(
    args: &ConnectionArgs,
    access: &StateAccess,
    peers: &PeerArgs,
    group_id: Option<&str>,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    // Refuse a missing group or unknown peer before dialling a node.
    load_group_as_member(&state, group_id)?;
    if resolve_peers(&state, peers)?.is_empty() {
        return Err(ClientError::Usage(
            "name at least one peer with --peer-key HEX or --peer NAME".into(),
        ));
    }
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    changes::invite(&nodes, &state, &identity, peers, group_id).await?;
    nodes.close().await;
    Ok(())
}

/// `remove`: removes members in one Commit, sent to everyone including the
/// removed, so they learn of it.
pub(crate) async fn remove(
    args: &ConnectionArgs,
    access: &StateAccess,
    peers: &PeerArgs,
    group_id: Option<&str>,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let me = identity.public_key();
    let (group_id, _) = load_group_as_member(&state, group_id)?;
    let peers = resolve_peers(&state, peers)?;
    if peers.is_empty() {
        return Err(ClientError::Usage(
            "name at least one member with --peer-key HEX or --peer NAME".into(),
        ));
    }
    if peers.contains(&me) || peers.contains(&identity.user()) {
        return Err(ClientError::Usage("to remove yourself, use `leave`".into()));
    }
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let group = remove_from_group(&nodes, &state, &identity, &group_id, &peers).await?;
    note!(
        "removed {} from {}: epoch {}, {}",
        counted(peers.len(), "person", "people"),
        group_name(&state, &group_id),
        group.epoch(),
        counted(group.user_count(), "member", "members")
    );
    nodes.close().await;
    Ok(())
}

/// `update`: a Commit with fresh keys for our leaf (and any pending
/// proposals).
pub(crate) async fn update(
    args: &ConnectionArgs,
    access: &StateAccess,
    group_id: Option<&str>,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let (group_id, _) = load_group_as_member(&state, group_id)?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let group = update_through(&nodes, &state, &identity, &group_id).await?;
    note!(
        "updated your keys in {}: epoch {}, {}",
        group_name(&state, &group_id),
        group.epoch(),
        counted(group.user_count(), "member", "members")
    );
    nodes.close().await;
    Ok(())
}

/// `leave`: sends a request to be removed; the remaining member with the
/// lowest leaf index commits it on their next `recv`.
pub(crate) async fn leave(
    args: &ConnectionArgs,
    access: &StateAccess,
    group_id: Option<&str>,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let (group_id, group) = load_group_as_member(&state, group_id)?;
    if others(&group, &identity.public_key()).is_empty() {
        return Err(ClientError::Usage(format!(
            "you are the only member of {}; there is nobody to leave",
            group_name(&state, &group_id)
        )));
    }
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    propose(&nodes, &state, &identity, &group_id, |group| {
        Ok(state.leave_group(&group_id, group, &identity)?)
    })
    .await?;
    note!(
        "asked to leave {}; a remaining member removes you on their next `recv`",
        group_name(&state, &group_id)
    );
    nodes.close().await;
    Ok(())
}

/// `rejoin`: brings back a group whose state this client lost (or holds
/// only in a stale form), by external commit from the group's state on the
/// node. Only an identity that still owns a leaf of the group may.
pub(crate) async fn rejoin(
    args: &ConnectionArgs,
    access: &StateAccess,
    group_id: &str,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let group_id = rejoin_group_id(&state, group_id)?;
    let name = group_name(&state, group_id.as_bytes());
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    match publish::rejoin(&nodes, &state, &identity, &group_id).await {
        Ok(group) => note!(
            "rejoined {name}: epoch {}, {}",
            group.epoch(),
            counted(group.user_count(), "member", "members")
        ),
        // Not a failure: what the user wanted is already the case.
        Err(ClientError::Core(CoreError::UpToDate { epoch })) => {
            note!("{name} is up to date here (epoch {epoch}); there is nothing to rejoin")
        }
        Err(e) => return Err(e),
    }
    nodes.close().await;
    Ok(())
}

/// `rejoin --all`: rejoins every group the device's key backup on the node
/// names that this state file holds no active state of, one after the
/// other; a group that cannot be rejoined is reported and the others go
/// on. Fails only if some could not be rejoined and none could.
pub(crate) async fn rejoin_all(args: &ConnectionArgs, access: &StateAccess) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let backed_up = key_backup::backed_up_groups(&nodes, &identity).await?;
    let mut rejoined = 0;
    let mut failed = None;
    for group_id in &backed_up {
        if GroupMember::load(&state.provider(), group_id)?.is_some_and(|group| group.is_active()) {
            continue;
        }
        let name = group_name(&state, group_id.as_bytes());
        match publish::rejoin(&nodes, &state, &identity, group_id).await {
            Ok(group) => {
                rejoined += 1;
                note!(
                    "rejoined {name}: epoch {}, {}",
                    group.epoch(),
                    counted(group.user_count(), "member", "members")
                );
            }
            Err(ClientError::Core(CoreError::UpToDate { .. })) => {}
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => {
                note!("could not rejoin {name}: {e}");
                failed = Some(e);
            }
        }
    }
    nodes.close().await;
    note!(
        "your key backup names {}; rejoined {rejoined}",
        counted(backed_up.len(), "group", "groups")
    );
    match failed {
        Some(e) if rejoined == 0 => Err(e),
        _ => Ok(()),
    }
}

/// `groups`: one line per group: current marker, name, epoch, members,
/// ciphersuite (with `--json`, one document listing them).
pub(crate) fn groups(access: &StateAccess) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let current = state.current_group()?;
    let mut listed = Vec::new();
    for record in state.groups()? {
        let is_current = current.as_ref() == Some(&record.group_id);
        let mark = if is_current { "*" } else { " " };
        let name = group_name(&state, &record.group_id);
        let group = GroupMember::load(&state.provider(), &record.group_id)?;
        // active | leaving | removed | no_state (the MLS state is gone).
        let status = match &group {
            Some(group) if group.is_active() && record.left_at.is_some() => "leaving",
            Some(group) if group.is_active() => "active",
            Some(_) => "removed",
            None => "no_state",
        };
        if output::json() {
            listed.push(json!({
                "group": name,
                "group_id": hex::encode(&record.group_id),
                "current": is_current,
                "status": status,
                "epoch": group.as_ref().map(GroupMember::epoch),
                "members": group.as_ref().filter(|g| g.is_active()).map(|g| g.user_count()),
                "ciphersuite": group.as_ref().map(|g| g.suite().name()),
            }));
            continue;
        }
        match group {
            Some(group) if group.is_active() => {
                let leaving = if status == "leaving" { " (leaving)" } else { "" };
                say!(
                    "{mark} {name} epoch {} members {} {}{leaving}",
                    group.epoch(),
                    group.user_count(),
                    group.suite()
                );
            }
            Some(group) => say!("{mark} {name} epoch {} removed", group.epoch()),
            None => say!("{mark} {name} (no MLS state)"),
        }
    }
    if output::json() {
        print_json(&json!({ "groups": listed }))?;
    }
    Ok(())
}

/// `members`: one line per member user: user key, contact name, `(you)`,
/// and how many of its devices are in the group.
pub(crate) fn members(access: &StateAccess, group_id: Option<&str>) -> Result<(), ClientError> {
    print_members(&StateFile::open(access)?, group_id)
}

/// `history`: the group's messages from local storage, oldest first.
pub(crate) fn history(access: &StateAccess, group_id: Option<&str>) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let me = state.identity_key()?;
    let (group_id, _) = load_group(&state, group_id)?;
    let mut listed = Vec::new();
    for entry in state.history(&group_id)? {
        let when =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(entry.at.max(0) as u64));
        let text = String::from_utf8_lossy(&entry.body);
        if output::json() {
            let sent = entry.direction == Direction::Sent;
            listed.push(json!({
                "at": when.to_string(),
                "direction": if sent { "sent" } else { "received" },
                "sender_key": entry.sender.to_string(),
                "sender": state.contact_name(&entry.sender)?,
                // Sent by us, from this device or another.
                "from_me": sent || entry.sender == me,
                // False for a sent message the node never confirmed taking.
                "delivered": entry.confirmed,
                "epoch": entry.epoch,
                "text": text,
            }));
            continue;
        }
        let who = match entry.direction {
            Direction::Sent if entry.confirmed => "you".to_owned(),
            // Encrypted, but the node never confirmed taking it.
            Direction::Sent => "you (not delivered)".to_owned(),
            // Sent by this user from another of its devices.
            Direction::Received if entry.sender == me => "you (another device)".to_owned(),
            Direction::Received => member_name(&state, &entry.sender)?,
        };
        say!("{when} {}: {}", shown(&who), shown(&text));
    }
    if output::json() {
        print_json(&json!({
            "group": group_name(&state, &group_id),
            "group_id": hex::encode(&group_id),
            "messages": listed,
        }))?;
    }
    Ok(())
}
