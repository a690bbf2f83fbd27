//! Catching up: our own unanswered change settled first (the outbox), then
//! the queue fetched into the inbox and applied. Above both
//! [`crate::publish`] and [`crate::incoming`], which never call each other.

use quicnprotochat_core::IdentityKeypair;

use crate::connections::Nodes;
use crate::error::ClientError;
use crate::group_names::pay_names_owed;
use crate::incoming::{Seen, fetch_into_inbox, process_inbox};
use crate::publish::resume_publications;
use crate::state::StateFile;

/// Brings every group up to date: settles our own unanswered change, fetches
/// the queue into the inbox and processes it, printing application messages
/// as `recv` does; then tells members a change of ours added the group's
/// name if a command cut off before could not.
pub(crate) async fn catch_up(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<Seen, ClientError> {
    // First settle our own unanswered change: if the node took it, later
    // messages are in the epoch after it.
    resume_publications(nodes, state, identity).await?;
    let seen = fetch_into_inbox(nodes, state, identity).await?;
    process_inbox(nodes, state).await?;
    pay_names_owed(nodes, state, identity).await?;
    Ok(seen)
}
