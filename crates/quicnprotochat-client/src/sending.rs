//! Sending an application message through open connections, as `send`
//! and `chat` do: encrypted to the group, queued for the chosen members in
//! one atomic delivery, encrypted again when the group moved on, and kept
//! for delivering again when the connection was lost before the node
//! answered.

use quicnprotochat_core::{CoreError, GroupId, IdentityKeypair};
use quicnprotochat_proto::wire::Envelope;

use crate::cli::PeerArgs;
use crate::connections::{Nodes, envelope};
use crate::error::ClientError;
use crate::naming::{devices_of, group_name, load_group_as_member, others, resolve_peers};
use crate::output::Event;
use crate::publish::commit_proposals;
use crate::state::{SentMessage, StateFile};
use crate::sync::catch_up;

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
    group_id: GroupId,
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
    let state_key = state.kept_state_key(&unconfirmed.group_id)?;
    match nodes
        .deliver(std::slice::from_ref(&unconfirmed.envelope), state_key.as_ref())
        .await
    {
        Ok(()) => {
            state.confirm_sent(unconfirmed.sent)?;
            Event::Sent {
                group: group_name(state, &unconfirmed.group_id),
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
    let name = group_name(state, &group_id);
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
    let state_key = state.state_key(&group_id, &group)?;
    let (ciphertext, sent) = state.encrypt_message(&group_id, &mut group, identity, message)?;
    let count = recipients.len();
    let envelope = envelope(recipients, ciphertext);
    match nodes
        .deliver(std::slice::from_ref(&envelope), Some(&state_key))
        .await
    {
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
