//! Stateful commands: `register-state`, `whoami`, `create-group`, `invite`,
//! `join`, `send`, `recv`.
//!
//! Every change to MLS state happens inside a state-file transaction, and the
//! order of local commits and node calls is chosen so that nothing is lost:
//! - a KeyPackage's private keys are committed before it is uploaded;
//! - an invite's Commit stays pending until the node has accepted the Commit
//!   and the Welcome, and is discarded if it did not;
//! - a message is encrypted and the ratchet committed before it is sent, so a
//!   key is never used twice;
//! - fetched messages go to the local inbox before any is processed, and each
//!   is processed and removed in one transaction.

use std::path::Path;

use quicnprotochat_core::{
    GroupMember, IdentityKey, IdentityKeypair, Incoming, Received, classify, generate_key_package,
};

use super::node::{fetch_verified_key_package, upload};
use super::{Nodes, group_name, parse_key};
use crate::cli::ConnectionArgs;
use crate::error::ClientError;
use crate::state::StateFile;

/// `register-state`: creates the state file (or reuses its identity),
/// uploads a fresh KeyPackage and prints the identity key.
pub(crate) async fn register_state(args: &ConnectionArgs, path: &Path) -> Result<(), ClientError> {
    let nodes = Nodes::connect(args).await?;
    let state = StateFile::open_or_create(path)?;
    let identity = state.identity_or_generate()?;
    let package = {
        let transaction = state.transaction()?;
        let package = generate_key_package(&state.provider(), &identity)?;
        // The private keys must be durable before anyone can use the
        // KeyPackage to invite us.
        transaction.commit().map_err(crate::state::StateError::from)?;
        package
    };
    upload(&nodes, &identity, &package).await?;
    println!("{}", identity.public_key());
    nodes.close().await;
    Ok(())
}

/// `whoami`: prints the identity key and nothing else.
pub(crate) fn whoami(path: &Path) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    println!("{}", state.identity_key()?);
    Ok(())
}

/// `create-group`: a new group with us as its only member.
pub(crate) fn create_group(path: &Path, group_id: &str) -> Result<(), ClientError> {
    if group_id.is_empty() {
        return Err(ClientError::Usage("--group-id must not be empty".into()));
    }
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let transaction = state.transaction()?;
    let group = GroupMember::create(&state.provider(), &identity, group_id.as_bytes())?;
    state.record_group(group_id.as_bytes(), true)?;
    transaction.commit().map_err(crate::state::StateError::from)?;
    eprintln!("created group {group_id} (epoch {}, 1 member)", group.epoch());
    Ok(())
}

/// `invite`: adds a peer with one Commit; the Commit goes to the other
/// members and the Welcome to the peer, through the node.
pub(crate) async fn invite(
    args: &ConnectionArgs,
    path: &Path,
    peer_key: &str,
    group_id: Option<&str>,
) -> Result<(), ClientError> {
    let peer = parse_key("--peer-key", peer_key)?;
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let provider = state.provider();
    let (group_id, mut group) = load_group(&state, group_id)?;
    if group.members().contains(&peer) {
        return Err(ClientError::Usage(format!(
            "{peer} is already a member of {}",
            group_name(&group_id)
        )));
    }
    let nodes = Nodes::connect(args).await?;
    let package = fetch_verified_key_package(&nodes, &peer).await?;
    let me = identity.public_key();
    let existing: Vec<IdentityKey> = group.members().into_iter().filter(|m| *m != me).collect();

    let added = {
        let transaction = state.transaction()?;
        let added = group.add_members(&provider, &identity, &[package])?;
        transaction.commit().map_err(crate::state::StateError::from)?;
        added
    };
    // Deliver the Commit to every existing member, then the Welcome. Once
    // any member has the Commit it has moved on, so we must merge too.
    let mut undelivered = Vec::new();
    let mut reached = 0;
    for member in &existing {
        match nodes.delivery().enqueue(member, &added.commit).await {
            Ok(()) => reached += 1,
            Err(e) => undelivered.push(format!("the Commit to {}: {e}", member.short())),
        }
    }
    let mut first_error = None;
    if (existing.is_empty() || reached > 0)
        && let Err(e) = nodes.delivery().enqueue(&peer, &added.welcome).await
    {
        undelivered.push(format!("the Welcome to {}: {e}", peer.short()));
        first_error = Some(e);
    }
    let transaction = state.transaction()?;
    if reached == 0 && !undelivered.is_empty() {
        // Nobody has the Commit: the group stays as it was.
        group.discard_pending_commit(&provider)?;
        transaction.commit().map_err(crate::state::StateError::from)?;
        return Err(first_error.unwrap_or_else(|| {
            ClientError::PartialDelivery(format!("nothing was delivered: {}", undelivered.join("; ")))
        }));
    }
    group.merge_pending_commit(&provider)?;
    state.record_group(&group_id, true)?;
    transaction.commit().map_err(crate::state::StateError::from)?;
    if !undelivered.is_empty() {
        return Err(ClientError::PartialDelivery(format!(
            "{} was added to {} (epoch {}), but the node did not take {}",
            peer.short(),
            group_name(&group_id),
            group.epoch(),
            undelivered.join("; ")
        )));
    }
    eprintln!(
        "invited {} to {}: epoch {}, {} members",
        peer.short(),
        group_name(&group_id),
        group.epoch(),
        group.members().len()
    );
    nodes.close().await;
    Ok(())
}

/// `join`: fetches the queue and joins from the Welcome(s) in it. Other
/// messages stay in the local inbox for `recv`.
pub(crate) async fn join(args: &ConnectionArgs, path: &Path) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args).await?;
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

/// `send`: encrypts to the group and queues the ciphertext for each
/// recipient.
pub(crate) async fn send(
    args: &ConnectionArgs,
    path: &Path,
    peer_key: Option<&str>,
    group_id: Option<&str>,
    message: &str,
) -> Result<(), ClientError> {
    let peer = peer_key.map(|key| parse_key("--peer-key", key)).transpose()?;
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let (group_id, mut group) = load_group(&state, group_id)?;
    let me = identity.public_key();
    let others: Vec<IdentityKey> = group.members().into_iter().filter(|m| *m != me).collect();
    let recipients = match peer {
        Some(peer) if others.contains(&peer) => vec![peer],
        Some(peer) => {
            return Err(ClientError::Usage(format!(
                "{peer} is not a member of {}; `invite` them first",
                group_name(&group_id)
            )));
        }
        None if others.is_empty() => {
            return Err(ClientError::Usage(format!(
                "you are the only member of {}; `invite` someone first",
                group_name(&group_id)
            )));
        }
        None => others,
    };
    let nodes = Nodes::connect(args).await?;
    let ciphertext = {
        let transaction = state.transaction()?;
        let ciphertext = group.send(&state.provider(), &identity, message.as_bytes())?;
        transaction.commit().map_err(crate::state::StateError::from)?;
        ciphertext
    };
    for recipient in &recipients {
        nodes.delivery().enqueue(recipient, &ciphertext).await?;
    }
    eprintln!(
        "sent to {} member(s) of {}",
        recipients.len(),
        group_name(&group_id)
    );
    nodes.close().await;
    Ok(())
}

/// `recv`: fetches everything queued and processes it in order.
pub(crate) async fn recv(args: &ConnectionArgs, path: &Path) -> Result<(), ClientError> {
    let state = StateFile::open(path)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args).await?;
    fetch_into_inbox(&nodes, &state, &identity).await?;
    nodes.close().await;
    for (entry, payload) in state.inbox()? {
        process_entry(&state, entry, &payload, false)?;
    }
    Ok(())
}

/// Drains our queue on the node into the local inbox.
async fn fetch_into_inbox(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<(), ClientError> {
    let me = identity.public_key();
    loop {
        let batch = nodes.delivery().fetch(&me).await?;
        if batch.is_empty() {
            return Ok(());
        }
        state.push_inbox(&batch)?;
    }
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
            transaction.commit().map_err(crate::state::StateError::from)?;
            Ok(joined)
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
                    println!(
                        "{name} {}: {}",
                        sender.short(),
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

/// Resolves `--group-id` (or the current group) and loads it.
fn load_group(state: &StateFile, group_id: Option<&str>) -> Result<(Vec<u8>, GroupMember), ClientError> {
    let group_id = match group_id {
        Some(id) => id.as_bytes().to_vec(),
        None => state.current_group()?.ok_or_else(|| {
            ClientError::NoGroup(
                "no group yet; run `create-group --group-id NAME`, or `join` a group you were invited to"
                    .into(),
            )
        })?,
    };
    let group = GroupMember::load(&state.provider(), &group_id)?.ok_or_else(|| {
        ClientError::NoGroup(format!(
            "{} is not a group in {}; see the groups you created or joined",
            group_name(&group_id),
            state.path().display()
        ))
    })?;
    Ok((group_id, group))
}
