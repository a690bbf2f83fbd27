//! The client's commands, one module per family, and what they share:
//! connecting to the node(s), naming groups and peers, and publishing group
//! changes.
//!
//! Conventions: stdout carries results (identity keys, decrypted messages,
//! listings) so scripts can read them; progress and warnings go to stderr.
//!
//! # Layout
//! - `node` — stateless commands: ping, register, fetch-key.
//! - `demo` — demo-group.
//! - `identity` — register-state, whoami, contacts.
//! - `group` — create-group, invite, remove, update, leave, groups, members, history.
//! - `messages` — send, recv, join: the inbox and its processing.

mod demo;
mod group;
mod identity;
pub(crate) mod messages;
mod node;

use quicnprotochat_core::{GroupMember, IdentityKey, IdentityKeypair};
use quicnprotochat_proto::wire::Envelope;

use crate::cli::{Cli, Command, ConnectionArgs, PeerArgs};
use crate::error::ClientError;
use crate::node_client::{ConnectOptions, NodeClient};
use crate::state::{Publication, StateError, StateFile};

/// Runs one parsed command line. Must run inside a tokio `LocalSet`.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let connection = &cli.connection;
    match cli.command {
        Command::Ping => node::ping(connection).await,
        Command::Register => node::register(connection).await,
        Command::FetchKey { identity_key } => node::fetch_key(connection, &identity_key).await,
        Command::DemoGroup => demo::demo_group(connection).await,
        Command::RegisterState(state) => identity::register_state(connection, &state.state).await,
        Command::Whoami(state) => identity::whoami(&state.state),
        Command::Contacts { state, action } => identity::contacts(&state.state, action),
        Command::CreateGroup { state, group_id } => group::create_group(&state.state, &group_id),
        Command::Invite {
            state,
            peers,
            group_id,
        } => group::invite(connection, &state.state, &peers, group_id.as_deref()).await,
        Command::Remove {
            state,
            peers,
            group_id,
        } => group::remove(connection, &state.state, &peers, group_id.as_deref()).await,
        Command::Update { state, group_id } => {
            group::update(connection, &state.state, group_id.as_deref()).await
        }
        Command::Leave { state, group_id } => {
            group::leave(connection, &state.state, group_id.as_deref()).await
        }
        Command::Groups(state) => group::groups(&state.state),
        Command::Members { state, group_id } => group::members(&state.state, group_id.as_deref()),
        Command::History { state, group_id } => group::history(&state.state, group_id.as_deref()),
        Command::Join(state) => messages::join(connection, &state.state).await,
        Command::Send {
            state,
            peers,
            group_id,
            msg,
        } => messages::send(connection, &state.state, &peers, group_id.as_deref(), &msg).await,
        Command::Recv { state, follow } => messages::recv(connection, &state.state, follow).await,
    }
}

/// Connections to the Authentication Service and the Delivery Service; one
/// connection when both are the same node.
pub(crate) struct Nodes {
    auth: NodeClient,
    delivery: Option<NodeClient>,
}

impl Nodes {
    /// Connects as `identity`, or anonymously.
    pub(crate) async fn connect(
        args: &ConnectionArgs,
        identity: Option<&IdentityKeypair>,
    ) -> Result<Nodes, ClientError> {
        let auth = NodeClient::connect(&options(args, &args.server), identity).await?;
        let delivery = match &args.ds_server {
            Some(ds) if *ds != args.server => Some(NodeClient::connect(&options(args, ds), identity).await?),
            _ => None,
        };
        Ok(Nodes { auth, delivery })
    }

    /// The node holding KeyPackages.
    pub(crate) fn auth(&self) -> &NodeClient {
        &self.auth
    }

    /// The node holding message queues.
    pub(crate) fn delivery(&self) -> &NodeClient {
        self.delivery.as_ref().unwrap_or(&self.auth)
    }

    pub(crate) async fn close(self) {
        if let Some(delivery) = self.delivery {
            delivery.close().await;
        }
        self.auth.close().await;
    }
}

fn options(args: &ConnectionArgs, server: &str) -> ConnectOptions {
    ConnectOptions {
        server: server.to_owned(),
        server_name: args.server_name.clone(),
        ca_cert: args.ca_cert.clone(),
    }
}

/// Parses an identity key given on the command line as `flag`.
pub(crate) fn parse_key(flag: &str, text: &str) -> Result<IdentityKey, ClientError> {
    text.trim()
        .parse()
        .map_err(|e| ClientError::Usage(format!("{flag}: {e}")))
}

/// The keys named by `--peer-key` and `--peer` (contact names), in order,
/// without duplicates.
pub(crate) fn resolve_peers(state: &StateFile, peers: &PeerArgs) -> Result<Vec<IdentityKey>, ClientError> {
    let mut keys = Vec::new();
    for text in &peers.keys {
        keys.push(parse_key("--peer-key", text)?);
    }
    for name in &peers.names {
        let key = state.contact_key(name)?.ok_or_else(|| {
            ClientError::Usage(format!(
                "--peer {name}: no such contact; add one with `contacts add {name} HEX`"
            ))
        })?;
        keys.push(key);
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|key| seen.insert(*key));
    Ok(keys)
}

/// Shows a group id as text when it is printable UTF-8, else as hex.
/// A group id made by `create-group` is `NAME#` plus 16 random hex digits:
/// the name is for people, the suffix keeps ids unique and unguessable, so
/// nobody can collide with or squat on another group's id at the node.
pub(crate) fn group_name(group_id: &[u8]) -> String {
    match std::str::from_utf8(group_id) {
        Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => match text.rsplit_once('#') {
            Some((name, suffix))
                if !name.is_empty()
                    && suffix.len() == 16
                    && suffix.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                name.to_owned()
            }
            _ => text.to_owned(),
        },
        _ => hex::encode(group_id),
    }
}

/// A fresh group id for a group people call `name`.
pub(crate) fn new_group_id(name: &str) -> Vec<u8> {
    format!("{name}#{}", hex::encode(rand::random::<[u8; 8]>())).into_bytes()
}

/// Shows a member as its contact name, or the first 16 hex characters of
/// its key.
pub(crate) fn member_name(state: &StateFile, key: &IdentityKey) -> Result<String, StateError> {
    Ok(state.contact_name(key)?.unwrap_or_else(|| key.short()))
}

/// Resolves `--group-id` (or the current group) and loads it.
pub(crate) fn load_group(
    state: &StateFile,
    group_id: Option<&str>,
) -> Result<(Vec<u8>, GroupMember), ClientError> {
    let group_id = match group_id {
        Some(name) => find_group(state, name)?,
        None => state.current_group()?.ok_or_else(|| {
            ClientError::NoGroup(
                "no group yet; run `create-group --group-id NAME`, or `join` a group you were invited to"
                    .into(),
            )
        })?,
    };
    let group = GroupMember::load(&state.provider(), &group_id)?.ok_or_else(|| {
        ClientError::NoGroup(format!(
            "{} is not one of your groups; `groups --state {}` lists them",
            group_name(&group_id),
            state.path().display()
        ))
    })?;
    Ok((group_id, group))
}

/// An envelope with a fresh random message id, so a retried delivery is
/// stored only once.
pub(crate) fn envelope(recipients: Vec<IdentityKey>, payload: Vec<u8>) -> Envelope {
    Envelope {
        recipients,
        payload,
        message_id: Some(rand::random::<[u8; 16]>().to_vec()),
    }
}

/// The id of the group called `name` (or with exactly that id).
fn find_group(state: &StateFile, name: &str) -> Result<Vec<u8>, ClientError> {
    let matching: Vec<Vec<u8>> = state
        .groups()?
        .into_iter()
        .map(|record| record.group_id)
        .filter(|id| id.as_slice() == name.as_bytes() || group_name(id) == name)
        .collect();
    match matching.as_slice() {
        [id] => Ok(id.clone()),
        [] => Err(ClientError::NoGroup(format!(
            "{name} is not one of your groups; `groups --state {}` lists them",
            state.path().display()
        ))),
        several => Err(ClientError::Usage(format!(
            "several of your groups are called {name}; pass the full id as --group-id: {}",
            several
                .iter()
                .map(|id| String::from_utf8_lossy(id).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Every member of `group` but us.
pub(crate) fn others(group: &GroupMember, me: &IdentityKey) -> Vec<IdentityKey> {
    group
        .members()
        .into_iter()
        .filter(|member| member != me)
        .collect()
}

/// A group change built against the group's current state: a pending
/// Commit, who gets it, and the Welcome for new members if any.
pub(crate) struct Change {
    /// The Commit (pending in the group until published).
    pub(crate) commit: Vec<u8>,
    /// Who gets the Commit: every other member, including removed ones.
    pub(crate) commit_to: Vec<IdentityKey>,
    /// The Welcome and the new members.
    pub(crate) welcome: Option<(Vec<u8>, Vec<IdentityKey>)>,
}

/// How often a change is redone after losing the race for an epoch.
const CHANGE_ATTEMPTS: usize = 3;

/// Makes and publishes a group change, one Commit per epoch: `make` builds
/// it against the group as stored; the node accepts it only if no other
/// Commit won that epoch. The Commit is merged only after the node took it
/// (with its Welcome, atomically). If another member's Commit won, ours is
/// discarded, the queue is processed (bringing the group up to date) and the
/// change is made again, telling the user.
pub(crate) async fn change_group(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    group_id: &[u8],
    mut make: impl FnMut(&mut GroupMember) -> Result<Change, ClientError>,
) -> Result<GroupMember, ClientError> {
    let name = group_name(group_id);
    resume_publications(nodes, state).await?;
    for attempt in 1..=CHANGE_ATTEMPTS {
        let mut group = GroupMember::load(&state.provider(), group_id)?
            .ok_or_else(|| ClientError::NoGroup(format!("{name} is not one of your groups")))?;
        let publication = stage(state, &mut group, group_id, &mut make)?;
        match send_publication(nodes, state, &mut group, &publication).await {
            Ok(()) => return Ok(group),
            Err(ClientError::CommitConflict { current_epoch }) if attempt < CHANGE_ATTEMPTS => {
                let at = current_epoch
                    .map(|e| format!(" (now at epoch {e})"))
                    .unwrap_or_default();
                eprintln!("another member changed {name} first{at}; catching up and trying again");
                messages::catch_up(nodes, state, identity).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::CommitConflict { current_epoch: None })
}

/// Makes a change with `make` and saves it in the outbox in the same
/// transaction, so a pending Commit never exists without the publication
/// that settles it. Send it with [`send_publication`]: the node's answer
/// merges or discards it; without an answer it stays pending and the next
/// command resends it with the same message ids.
pub(crate) fn stage(
    state: &StateFile,
    group: &mut GroupMember,
    group_id: &[u8],
    make: impl FnOnce(&mut GroupMember) -> Result<Change, ClientError>,
) -> Result<Publication, ClientError> {
    let epoch = group.epoch();
    in_transaction(state, || {
        let change = make(group)?;
        let publication = Publication {
            group_id: group_id.to_vec(),
            epoch,
            commit: envelope(change.commit_to, change.commit),
            welcome: change.welcome.map(|(payload, to)| envelope(to, payload)),
        };
        state.save_publication(&publication)?;
        Ok(publication)
    })
}

/// How often an unanswered publication is sent again within one command.
const PUBLISH_ATTEMPTS: usize = 3;

/// Sends a staged change and settles it by the node's answer.
pub(crate) async fn send_publication(
    nodes: &Nodes,
    state: &StateFile,
    group: &mut GroupMember,
    publication: &Publication,
) -> Result<(), ClientError> {
    let mut answer = Err(ClientError::Internal("not sent"));
    for attempt in 1..=PUBLISH_ATTEMPTS {
        answer = nodes
            .delivery()
            .publish_commit(
                &publication.group_id,
                publication.epoch,
                &publication.commit,
                publication.welcome.as_ref(),
            )
            .await;
        if answered(&answer) {
            break;
        }
        if attempt < PUBLISH_ATTEMPTS {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
    if !answered(&answer) {
        return Err(ClientError::Unconfirmed {
            group: group_name(&publication.group_id),
            reason: answer.err().map(|e| e.to_string()).unwrap_or_default(),
        });
    }
    let transaction = state.transaction()?;
    match answer {
        Ok(()) => group.merge_pending_commit(&state.provider())?,
        Err(_) => group.discard_pending_commit(&state.provider())?,
    }
    state.forget_publication(&publication.group_id)?;
    transaction.commit().map_err(StateError::from)?;
    answer
}

/// Whether the node answered (took or refused the change), as opposed to no
/// answer arriving, after which it may or may not have the change.
fn answered(answer: &Result<(), ClientError>) -> bool {
    match answer {
        Ok(()) | Err(ClientError::CommitConflict { .. }) => true,
        Err(ClientError::Rpc(e)) => matches!(e.kind, capnp::ErrorKind::Failed | capnp::ErrorKind::Overloaded),
        Err(_) => false,
    }
}

/// Settles group changes left unanswered by earlier runs: resends them with
/// the same message ids (the node stores them at most once) and merges or
/// discards them by the answer.
pub(crate) async fn resume_publications(nodes: &Nodes, state: &StateFile) -> Result<(), ClientError> {
    for publication in state.publications()? {
        let name = group_name(&publication.group_id);
        match GroupMember::load(&state.provider(), &publication.group_id)? {
            Some(mut group) if group.has_pending_commit() => {
                eprintln!("resending an unconfirmed change to {name}");
                match send_publication(nodes, state, &mut group, &publication).await {
                    Ok(()) => eprintln!("{name}: the node has it; now epoch {}", group.epoch()),
                    Err(ClientError::CommitConflict { .. }) => {
                        eprintln!("{name}: another member's change won; yours was dropped")
                    }
                    Err(e) => return Err(e),
                }
            }
            // Nothing pending any more: the entry is stale.
            _ => state.forget_publication(&publication.group_id)?,
        }
    }
    Ok(())
}

/// Runs `work` in a state-file transaction and commits it if it succeeds.
pub(crate) fn in_transaction<T>(
    state: &StateFile,
    work: impl FnOnce() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let transaction = state.transaction()?;
    let value = work()?;
    transaction.commit().map_err(StateError::from)?;
    Ok(value)
}
