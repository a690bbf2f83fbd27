//! `send`, `recv` and `join`: application messages and the inbox (the
//! `incoming` module fetches and applies queued messages).

use std::path::Path;

use quicnprotochat_core::{CoreError, IdentityKeypair, Incoming, classify};
use quicnprotochat_proto::wire::Envelope;

use super::devices::replace_handed_leaves;
use crate::cli::{ConnectionArgs, PeerArgs};
use crate::error::ClientError;
use crate::incoming::{accept_invitation, catch_up, fetch_into_inbox, process_entry};
use crate::key_packages::top_up_key_packages;
use crate::naming::{devices_of, group_name, load_group_as_member, others, resolve_peers};
use crate::nodes::{Nodes, envelope};
use crate::output::counted;
use crate::output::{self, Event, print_json};
use crate::publish::{commit_due_proposals, commit_proposals};
use crate::state::{Invitation, SentMessage, StateError, StateFile};

/// `send`: encrypts to the group and queues the ciphertext for the chosen
/// members (default: every other member) in one atomic delivery.
pub(crate) async fn send(
    args: &ConnectionArgs,
    path: &Path,
    peers: &PeerArgs,
    group_id: Option<&str>,
    message: &str,
) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    // Delivering again after a lost connection is `chat`'s; `send` reports
    // the loss (exit code 3) and its history says "not delivered".
    let outcome = send_through(&nodes, &state, &identity, peers, group_id, message, &mut None).await;
    nodes.close().await;
    outcome
}

/// Sends one message through open connections, as `send` does; `chat`
/// sends each line with it. Returns once the node has taken the message.
/// If the connection is lost after the message was encrypted, before the
/// node answered, `unconfirmed` gets what [`deliver_again`] needs.
pub(crate) async fn send_through(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    peers: &PeerArgs,
    group_id: Option<&str>,
    message: &str,
    unconfirmed: &mut Option<Unconfirmed>,
) -> Result<(), ClientError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match send_once(nodes, state, identity, peers, group_id, message, unconfirmed).await {
            // The group moved on while we encrypted: catch up and encrypt
            // again (the node refused the stale one, so nobody has it).
            Err(ClientError::StaleEpoch { .. }) if tries < SEND_TRIES => continue,
            outcome => return outcome,
        }
    }
}

/// How often `send` encrypts a message again after the node said its group
/// had moved on.
const SEND_TRIES: usize = 5;

/// A message encrypted and kept in the history whose delivery a lost
/// connection cut off before the node answered: the node may have taken
/// it or not. Its envelope keeps its message id, so delivering it again
/// stores it at most once.
#[derive(Debug)]
pub(crate) struct Unconfirmed {
    envelope: Envelope,
    sent: SentMessage,
    group_id: Vec<u8>,
    text: String,
}

impl Unconfirmed {
    /// The message's text.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

/// Delivers `unconfirmed` again through the (new) connection and reports
/// it as sent. If the group moved on meanwhile and the node refuses the
/// old epoch (so it never took the message), the text is encrypted and
/// sent anew, to everyone in the group as `chat` sends. A connection lost
/// again puts it back into `slot`.
pub(crate) async fn deliver_again(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    unconfirmed: Unconfirmed,
    slot: &mut Option<Unconfirmed>,
) -> Result<(), ClientError> {
    match nodes.deliver(std::slice::from_ref(&unconfirmed.envelope)).await {
        Ok(()) => {
            state.confirm_sent(unconfirmed.sent)?;
            Event::Sent {
                group: group_name(&unconfirmed.group_id),
                group_id: hex::encode(&unconfirmed.group_id),
                recipients: unconfirmed.envelope.recipients.len(),
                text: unconfirmed.text,
            }
            .print()
        }
        Err(ClientError::StaleEpoch { .. }) => {
            state.forget_sent(unconfirmed.sent)?;
            let everyone = PeerArgs {
                keys: Vec::new(),
                names: Vec::new(),
            };
            let group = hex::encode(&unconfirmed.group_id);
            send_through(
                nodes,
                state,
                identity,
                &everyone,
                Some(&group),
                &unconfirmed.text,
                slot,
            )
            .await
        }
        Err(e) if e.is_connection_lost() => {
            *slot = Some(unconfirmed);
            Err(e)
        }
        Err(e) => Err(e),
    }
}

async fn send_once(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    peers: &PeerArgs,
    group_id: Option<&str>,
    message: &str,
    unconfirmed: &mut Option<Unconfirmed>,
) -> Result<(), ClientError> {
    let me = identity.public_key();
    // Catch up first (printing what arrived, as `recv` does): a message
    // encrypted in an epoch the group has left is one its readers may no
    // longer be able to open, and the node refuses it.
    catch_up(nodes, state, identity).await?;
    let (group_id, mut group) = load_group_as_member(state, group_id)?;
    let name = group_name(&group_id);
    let others = others(&group, &me);
    let chosen = resolve_peers(state, peers)?;
    // A chosen user gets the message on each of its devices in the group.
    let chosen = match devices_of(&group, &chosen) {
        Ok(devices) => devices
            .into_iter()
            .filter(|device| *device != me)
            .collect::<Vec<_>>(),
        Err(ClientError::Core(CoreError::UnknownMember(stranger))) => {
            return Err(ClientError::Usage(format!(
                "{stranger} is not another member of {name}; `invite` them first"
            )));
        }
        Err(e) => return Err(e),
    };
    if others.is_empty() {
        return Err(ClientError::Usage(format!(
            "you are the only member of {name}; `invite` someone first"
        )));
    }
    let recipients = if chosen.is_empty() { others } else { chosen };
    if group.has_pending_proposals() {
        if !group.should_commit_pending_proposals() {
            return Err(ClientError::Usage(format!(
                "a member's proposal (e.g. leaving) in {name} awaits a commit by another member; run `recv` later, or `update --group-id {name}` to commit it yourself"
            )));
        }
        commit_proposals(nodes, state, identity, &group_id, &mut group).await?;
    }
    let (ciphertext, sent) = state.encrypt_message(&group_id, &mut group, identity, message.as_bytes())?;
    let count = recipients.len();
    let envelope = envelope(recipients, ciphertext);
    match nodes.deliver(std::slice::from_ref(&envelope)).await {
        Ok(()) => state.confirm_sent(sent)?,
        Err(e @ ClientError::StaleEpoch { .. }) => {
            // Refused whole: this copy is no message of the history.
            state.forget_sent(sent)?;
            return Err(e);
        }
        Err(e) if e.is_connection_lost() => {
            *unconfirmed = Some(Unconfirmed {
                envelope,
                sent,
                group_id: group_id.clone(),
                text: message.to_owned(),
            });
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    Event::Sent {
        group: name,
        group_id: hex::encode(&group_id),
        recipients: count,
        text: message.to_owned(),
    }
    .print()
}

/// `recv`: fetches everything queued, processes it in order, then commits
/// proposals this member is responsible for. With `follow`, then stays
/// subscribed and does the same for every pushed batch until Ctrl-C,
/// through the next node given when the connection is lost (see
/// [`crate::follow`]).
pub(crate) async fn recv(args: &ConnectionArgs, path: &Path, follow: bool) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = match state.identity() {
        Err(StateError::LinkPending(_)) => {
            // A new device: its first `recv` completes the link, then goes
            // on as that device (joining the groups it was added to).
            let link = state
                .pending_link()?
                .ok_or(ClientError::Internal("a pending link vanished"))?;
            super::devices::complete_link(args, &state, &link).await?
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

/// The waiting invitation to `group` (its name as shown, or its id as
/// text or hex).
pub(crate) fn invitation_to(state: &StateFile, group: &str) -> Result<Invitation, ClientError> {
    state
        .invitations()?
        .into_iter()
        .find(|invitation| {
            let id = &invitation.group_id;
            group_name(id) == group
                || id.as_slice() == group.as_bytes()
                || hex::encode(id) == group.to_lowercase()
        })
        .ok_or_else(|| {
            ClientError::Usage(format!(
                "no invitation to {group} waits; `invitations` lists them"
            ))
        })
}

/// `invitations`: the waiting invitations, oldest first.
pub(crate) fn invitations(path: &Path) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let waiting = state.invitations()?;
    if output::json() {
        let mut listed = Vec::new();
        for invitation in &waiting {
            listed.push(serde_json::json!({
                "group": group_name(&invitation.group_id),
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
            group_name(&invitation.group_id),
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
    path: &Path,
    group: Option<&str>,
    all: bool,
) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
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
pub(crate) fn decline(path: &Path, group: &str) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let invitation = invitation_to(&state, group)?;
    state.remove_invitation(&invitation.group_id)?;
    note!(
        "declined the invitation to {} from {}",
        group_name(&invitation.group_id),
        invitation.inviter.user.short()
    );
    Ok(())
}

/// `join`: fetches the queue and joins from the Welcome(s) in it. Other
/// messages stay in the local inbox for `recv`.
pub(crate) async fn join(args: &ConnectionArgs, path: &Path) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    fetch_into_inbox(&nodes, &state, &identity).await?;
    // `join` is consent to every waiting invitation too.
    let mut joined = accept_all(&nodes, &state, &state.invitations()?).await?;
    for entry in state.inbox()? {
        if matches!(classify(&entry.payload), Ok(Incoming::Welcome))
            && process_entry(&nodes, &state, &entry, true).await?.tell()?
        {
            joined += 1;
        }
    }
    state.compact_if_sparse()?;
    replace_handed_leaves(&nodes, &state, &identity).await?;
    nodes.close().await;
    if joined == 0 {
        return Err(ClientError::NoGroup(
            "no Welcome is waiting for you; ask a member to `invite` you (with your identity key from `whoami`), then run `join` again".into(),
        ));
    }
    Ok(())
}
