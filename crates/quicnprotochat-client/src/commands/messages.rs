//! `send`, `recv` and `join`: application messages and the inbox.
//!
//! Fetched payloads go to the local inbox in one transaction before any is
//! processed; each is then processed and removed in one transaction, so a
//! crash loses nothing and applies nothing twice.

use std::path::Path;

use quicnprotochat_core::{GroupMember, IdentityKeypair, Incoming, Received, classify};

use super::node::top_up_key_packages;
use super::{
    Change, Nodes, envelope, group_name, in_transaction, load_group, member_name, others, resolve_peers,
    send_publication, stage,
};
use crate::cli::{ConnectionArgs, PeerArgs};
use crate::error::ClientError;
use crate::state::{Direction, StateError, StateFile};

/// Test hook: when this environment variable is set, `recv` and `join` exit
/// right after storing the fetched messages in the inbox, before
/// acknowledging them to the node and before processing any, as a crash
/// there would. Tests use it to prove nothing is lost or applied twice.
pub const EXIT_AFTER_FETCH_ENV: &str = "QUICNPROTOCHAT_TEST_EXIT_AFTER_FETCH";

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
    let me = identity.public_key();
    let (group_id, mut group) = load_group(&state, group_id)?;
    let name = group_name(&group_id);
    let others = others(&group, &me);
    let chosen = resolve_peers(&state, peers)?;
    if let Some(stranger) = chosen.iter().find(|peer| !others.contains(peer)) {
        return Err(ClientError::Usage(format!(
            "{stranger} is not another member of {name}; `invite` them first"
        )));
    }
    if others.is_empty() {
        return Err(ClientError::Usage(format!(
            "you are the only member of {name}; `invite` someone first"
        )));
    }
    let recipients = if chosen.is_empty() { others } else { chosen };
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    if group.has_pending_proposals() {
        if !group.should_commit_pending_proposals() {
            return Err(ClientError::Usage(format!(
                "a member's proposal (e.g. leaving) in {name} awaits a commit by another member; run `recv` later, or `update --group-id {name}` to commit it yourself"
            )));
        }
        commit_proposals(&nodes, &state, &identity, &group_id, &mut group).await?;
    }
    let ciphertext = in_transaction(&state, || {
        let ciphertext = group.send(&state.provider(), &identity, message.as_bytes())?;
        state.record_message(&group_id, Direction::Sent, &me, message.as_bytes(), group.epoch())?;
        Ok(ciphertext)
    })?;
    let count = recipients.len();
    nodes
        .delivery()
        .enqueue_batch(&[envelope(recipients, ciphertext)])
        .await?;
    eprintln!("sent to {count} member(s) of {name}");
    nodes.close().await;
    Ok(())
}

/// `recv`: fetches everything queued, processes it in order, then commits
/// proposals this member is responsible for. With `follow`, then stays
/// subscribed and does the same for every pushed batch until Ctrl-C.
pub(crate) async fn recv(args: &ConnectionArgs, path: &Path, follow: bool) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let mut seen = catch_up(&nodes, &state, &identity).await?;
    // Stay invitable: replace the KeyPackages others used up.
    top_up_key_packages(&nodes, &state, &identity).await?;
    commit_due_proposals(&nodes, &state, &identity).await?;
    if follow {
        let me = identity.public_key();
        let (sink, mut pushed) = tokio::sync::mpsc::channel(1);
        let _subscription = nodes.delivery().subscribe(&me, seen.after, sink).await?;
        eprintln!("following; press Ctrl-C to stop");
        loop {
            let batch = tokio::select! {
                batch = pushed.recv() => batch,
                _ = tokio::signal::ctrl_c() => break,
            };
            let Some(batch) = batch else {
                return Err(ClientError::Connect {
                    server: args.server.clone(),
                    reason: "the node ended the subscription".into(),
                });
            };
            seen = store_batch(&state, seen, batch)?;
            nodes.delivery().ack(&me, seen.after).await?;
            process_inbox(&state)?;
            commit_due_proposals(&nodes, &state, &identity).await?;
        }
    }
    nodes.close().await;
    Ok(())
}

/// Commits pending proposals in every group where it is our turn.
async fn commit_due_proposals(
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

/// `join`: fetches the queue and joins from the Welcome(s) in it. Other
/// messages stay in the local inbox for `recv`.
pub(crate) async fn join(args: &ConnectionArgs, path: &Path) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    fetch_into_inbox(&nodes, &state, &identity).await?;
    nodes.close().await;
    let mut joined = 0;
    for (entry, payload) in state.inbox()? {
        if matches!(classify(&payload), Ok(Incoming::Welcome))
            && process_entry(&state, entry, &payload, true)?
        {
            joined += 1;
        }
    }
    if joined == 0 {
        return Err(ClientError::NoGroup(
            "no Welcome is waiting for you; ask a member to `invite` you (with your identity key from `whoami`), then run `join` again".into(),
        ));
    }
    Ok(())
}

/// Commits the pending proposals of `group` (e.g. a member leaving) and
/// publishes the commit to every other member, including those it removes.
/// If another member committed first, ours is dropped: theirs covers it.
async fn commit_proposals(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &[u8],
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
    match send_publication(nodes, state, group, &publication).await {
        Ok(()) => {
            eprintln!(
                "group {}: committed pending proposals; now epoch {}, {} members",
                group_name(group_id),
                group.epoch(),
                group.members().len()
            );
            Ok(())
        }
        Err(ClientError::CommitConflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Brings every group up to date: fetches the queue into the inbox and
/// processes it, printing application messages as `recv` does.
pub(crate) async fn catch_up(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<Seen, ClientError> {
    // First settle our own unanswered change: if the node took it, later
    // messages are in the epoch after it.
    super::resume_publications(nodes, state).await?;
    let seen = fetch_into_inbox(nodes, state, identity).await?;
    process_inbox(state)?;
    Ok(seen)
}

/// How far a client has read a node's queue.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// The node database's instance id.
    instance: Vec<u8>,
    /// The highest sequence number stored in the state file before this run.
    stored: u64,
    /// The highest sequence number seen (and stored) so far.
    after: u64,
}

/// Copies our queue on the node into the local inbox, then acknowledges it.
///
/// Fetch, store, then ack: the node deletes messages only after they are
/// committed locally, so a crash anywhere loses nothing. A message the node
/// delivers again (the crash fell between store and ack) has a sequence
/// number at or below the highest stored one and is skipped.
async fn fetch_into_inbox(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<Seen, ClientError> {
    let me = identity.public_key();
    let instance = nodes.delivery().ping().await?.instance_id;
    let stored = state.stored_seq(&instance)?;
    let mut seen = Seen {
        instance,
        stored,
        after: 0,
    };
    loop {
        let batch = nodes.delivery().fetch_since(&me, seen.after, 0).await?;
        if batch.is_empty() {
            break;
        }
        seen = store_batch(state, seen, batch)?;
    }
    if std::env::var_os(EXIT_AFTER_FETCH_ENV).is_some() {
        eprintln!("exiting after fetch ({EXIT_AFTER_FETCH_ENV} is set)");
        std::process::exit(3);
    }
    if seen.after > 0 {
        nodes.delivery().ack(&me, seen.after).await?;
    }
    Ok(seen)
}

/// Stores the messages of `batch` not stored before in the inbox, together
/// with the new high-water mark, in one transaction.
fn store_batch(state: &StateFile, mut seen: Seen, batch: Vec<(u64, Vec<u8>)>) -> Result<Seen, ClientError> {
    let Some(&(last, _)) = batch.last() else {
        return Ok(seen);
    };
    let fresh: Vec<Vec<u8>> = batch
        .into_iter()
        .filter(|(seq, _)| *seq > seen.stored)
        .map(|(_, payload)| payload)
        .collect();
    if !fresh.is_empty() {
        state.push_inbox_at(&fresh, Some((&seen.instance, last)))?;
    }
    seen.after = seen.after.max(last);
    seen.stored = seen.stored.max(last);
    Ok(seen)
}

/// Processes every inbox entry, oldest first.
fn process_inbox(state: &StateFile) -> Result<(), ClientError> {
    for (entry, payload) in state.inbox()? {
        process_entry(state, entry, &payload, false)?;
    }
    Ok(())
}

/// Processes one inbox entry and removes it, in one transaction. A message
/// that MLS rejects (garbage, unknown group, past epoch, ...) is reported on
/// stderr and removed; a local failure (the state file) stops processing and
/// keeps the entry for the next run. Returns whether the entry joined a group;
/// `explicit_join` makes that group the current one.
fn process_entry(
    state: &StateFile,
    entry: i64,
    payload: &[u8],
    explicit_join: bool,
) -> Result<bool, ClientError> {
    let transaction = state.transaction()?;
    match apply(state, payload, explicit_join) {
        Ok(joined) => {
            state.remove_inbox(entry)?;
            transaction.commit().map_err(StateError::from)?;
            Ok(joined)
        }
        Err(e @ ClientError::Core(quicnprotochat_core::CoreError::FutureEpoch { .. })) => {
            // A Commit we have not processed yet is missing; dropping this
            // would lose it for good. Keep it for a later run.
            drop(transaction);
            eprintln!("warning: kept a queued message for later: {e}");
            Ok(false)
        }
        Err(e @ (ClientError::Core(_) | ClientError::UnknownGroup(_))) => {
            // Undo whatever the failed processing wrote, then drop the entry.
            drop(transaction);
            eprintln!("warning: skipped a queued message: {e}");
            state.remove_inbox(entry)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn apply(state: &StateFile, payload: &[u8], explicit_join: bool) -> Result<bool, ClientError> {
    let provider = state.provider();
    match classify(payload)? {
        Incoming::Welcome => {
            let group = GroupMember::join(&provider, payload)?;
            let group_id = group.group_id();
            // Joining from `recv` must not silently redirect a later `send`
            // without --group-id into a group someone invited us to.
            let make_current = explicit_join || state.current_group()?.is_none();
            state.record_group(&group_id, make_current)?;
            eprintln!(
                "joined group {} (epoch {}, {} members)",
                group_name(&group_id),
                group.epoch(),
                group.members().len()
            );
            Ok(true)
        }
        Incoming::Group { group_id, .. } => {
            let mut group = GroupMember::load(&provider, &group_id)?
                .ok_or_else(|| ClientError::UnknownGroup(group_name(&group_id)))?;
            let name = group_name(&group_id);
            match group.receive(&provider, payload)? {
                Received::Application { sender, plaintext } => {
                    state.record_message(
                        &group_id,
                        Direction::Received,
                        &sender,
                        &plaintext,
                        group.epoch(),
                    )?;
                    println!(
                        "{name} {}: {}",
                        member_name(state, &sender)?,
                        String::from_utf8_lossy(&plaintext)
                    );
                }
                Received::Commit { epoch } => {
                    eprintln!(
                        "group {name}: now at epoch {epoch}, {} members",
                        group.members().len()
                    );
                }
                Received::Removed { epoch } => {
                    eprintln!("group {name}: you were removed from the group at epoch {epoch}");
                }
                Received::Proposal => eprintln!("group {name}: stored a proposal for the next commit"),
                Received::OwnMessage => {}
                _ => eprintln!("group {name}: processed a message"),
            }
            Ok(false)
        }
        other => Err(ClientError::Core(
            quicnprotochat_core::CoreError::MalformedMessage(format!("cannot route {other:?}")),
        )),
    }
}
