//! `send`, `recv` and `join`: application messages and the inbox (the
//! `incoming` module fetches and applies queued messages).

use quicnprotochat_core::{GroupId, Incoming, classify};

use crate::changes::replace_handed_leaves;
use crate::cli::{ConnectionArgs, PeerArgs};
use crate::connections::Nodes;
use crate::error::ClientError;
use crate::incoming::{accept_invitation, fetch_into_inbox, process_entry};
use crate::key_backup::sync_key_backup;
use crate::key_packages::top_up_key_packages;
use crate::link::complete_link;
use crate::naming::group_name;
use crate::naming::invitation_to;
use crate::output::counted;
use crate::output::{self, print_json};
use crate::publish::commit_due_proposals;
use crate::sending::send_through;
use crate::state::{Invitation, StateAccess, StateError, StateFile};
use crate::sync::catch_up;

/// `send`: encrypts to the group and queues the ciphertext for the chosen
/// members (default: every other member) in one atomic delivery.
pub(crate) async fn send(
    args: &ConnectionArgs,
    access: &StateAccess,
    peers: &PeerArgs,
    group_id: Option<&str>,
    message: &str,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    // Delivering again after a lost connection is `chat`'s; `send` reports
    // the loss (exit code 3) and its history says "not delivered".
    let outcome = send_through(&nodes, &state, &identity, peers, group_id, message, &mut None).await;
    nodes.close().await;
    outcome
}

/// `recv`: fetches everything queued, processes it in order, then commits
/// proposals this member is responsible for. With `follow`, then stays
/// subscribed and does the same for every pushed batch until Ctrl-C,
/// through the next node given when the connection is lost (see
/// [`crate::follow`]).
pub(crate) async fn recv(
    args: &ConnectionArgs,
    access: &StateAccess,
    follow: bool,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = match state.identity() {
        Err(StateError::LinkPending(_)) => {
            // A new device: its first `recv` completes the link, then goes
            // on as that device (joining the groups it was added to).
            let link = state
                .pending_link()?
                .ok_or(ClientError::Internal("a pending link vanished"))?;
            complete_link(args, &state, &link).await?
        }
        identity => identity?,
    };
    let mut nodes = Nodes::connect(args, Some(&identity)).await?;
    let seen = catch_up(&nodes, &state, &identity).await?;
    replace_handed_leaves(&nodes, &state, &identity).await?;
    // Stay invitable: replace the KeyPackages others used up.
    top_up_key_packages(&nodes, &state, &identity).await?;
    commit_due_proposals(&nodes, &state, &identity).await?;
    tell_invitations(&state)?;
    if follow {
        crate::follow::follow(&mut nodes, &state, &identity, seen).await?;
    }
    nodes.close().await;
    Ok(())
}

/// Says on stderr how many invitations wait, if any.
fn tell_invitations(state: &StateFile) -> Result<(), ClientError> {
    let waiting = state.invitation_count()?;
    if waiting > 0 && !output::json() {
        note!(
            "{waiting} invitation{} from people you have not named as contacts wait{}: `invitations` lists them, `accept GROUP` joins, `decline GROUP` refuses",
            if waiting == 1 { "" } else { "s" },
            if waiting == 1 { "s" } else { "" }
        );
    }
    Ok(())
}

/// `invitations`: the waiting invitations, oldest first.
pub(crate) fn invitations(access: &StateAccess) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let waiting = state.invitations()?;
    if output::json() {
        let mut listed = Vec::new();
        for invitation in &waiting {
            listed.push(serde_json::json!({
                "group": group_name(&state, &invitation.group_id),
                "group_id": hex::encode(&invitation.group_id),
                "inviter_key": invitation.inviter.user.to_string(),
                "inviter": state.contact_name(&invitation.inviter.user)?,
                "epoch": invitation.epoch,
                "members": invitation.members,
                "received_at": invitation.received_at,
            }));
        }
        return print_json(&serde_json::json!({ "invitations": listed }));
    }
    for invitation in &waiting {
        say!(
            "{} from {} ({})",
            group_name(&state, &invitation.group_id),
            invitation.inviter.user,
            counted(invitation.members, "member", "members")
        );
    }
    Ok(())
}

/// `accept GROUP | --all`: joins the groups of waiting invitations, then
/// applies what those groups sent meanwhile.
pub(crate) async fn accept(
    args: &ConnectionArgs,
    access: &StateAccess,
    group: Option<&str>,
    all: bool,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let chosen = match group {
        Some(group) if !all => vec![invitation_to(&state, group)?],
        _ => state.invitations()?,
    };
    if chosen.is_empty() {
        return Err(ClientError::NoGroup("no invitation waits".into()));
    }
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    accept_all(&nodes, &state, &chosen).await?;
    catch_up(&nodes, &state, &identity).await?;
    top_up_key_packages(&nodes, &state, &identity).await?;
    nodes.close().await;
    Ok(())
}

/// Joins the group of each of `chosen`; returns how many it joined.
async fn accept_all(nodes: &Nodes, state: &StateFile, chosen: &[Invitation]) -> Result<usize, ClientError> {
    let mut joined = 0;
    for invitation in chosen {
        if accept_invitation(nodes, state, invitation).await?.tell()? {
            joined += 1;
        }
    }
    Ok(joined)
}

/// `decline GROUP`: forgets the invitation; what the group sent is dropped
/// by the next `recv` (as for any group we are not in).
pub(crate) fn decline(access: &StateAccess, group: &str) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let invitation = invitation_to(&state, group)?;
    state.remove_invitation(&invitation.group_id)?;
    note!(
        "declined the invitation to {} from {}",
        group_name(&state, &invitation.group_id),
        invitation.inviter.user.short()
    );
    Ok(())
}

/// `join`: fetches the queue and joins from the Welcome(s) in it, then
/// reads each joined group's name, which its inviter sent right after the
/// Welcome. Other messages stay in the local inbox for `recv`.
pub(crate) async fn join(args: &ConnectionArgs, access: &StateAccess) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    fetch_into_inbox(&nodes, &state, &identity).await?;
    let before: Vec<GroupId> = state
        .groups()?
        .into_iter()
        .map(|record| record.group_id)
        .collect();
    // `join` is consent to every waiting invitation too.
    let mut joined = accept_all(&nodes, &state, &state.invitations()?).await?;
    for entry in state.inbox()? {
        if matches!(classify(&entry.payload), Ok(Incoming::Welcome))
            && process_entry(&nodes, &state, &entry, true).await?.tell()?
        {
            joined += 1;
        }
    }
    for record in state.groups()? {
        if !before.contains(&record.group_id) {
            read_name(&nodes, &state, &record.group_id).await?;
        }
    }
    state.compact_if_sparse()?;
    // The groups joined belong in our key backup before anything else can
    // go wrong: a device restored from its identity finds them there.
    sync_key_backup(&nodes, &state).await;
    replace_handed_leaves(&nodes, &state, &identity).await?;
    nodes.close().await;
    if joined == 0 {
        return Err(ClientError::NoGroup(
            "no Welcome is waiting for you; ask a member to `invite` you (with your identity key from `whoami`), then run `join` again".into(),
        ));
    }
    Ok(())
}

/// Applies the queued messages of the group we just joined, in order, until
/// it has a name: the name its inviter sent right after the Welcome is
/// usually the first of them. What comes before it is reported as `recv`
/// would.
async fn read_name(nodes: &Nodes, state: &StateFile, group_id: &GroupId) -> Result<(), ClientError> {
    for entry in state.inbox()? {
        if state.group_name(group_id.as_bytes())?.is_some() {
            break;
        }
        let ours = matches!(
            classify(&entry.payload),
            Ok(Incoming::Group { group_id: id, .. }) if id.as_slice() == group_id.as_bytes()
        );
        if ours {
            process_entry(nodes, state, &entry, true).await?.tell()?;
        }
    }
    Ok(())
}
