//! Bringing groups up to date from the node's queue: fetch → store → ack,
//! then apply each stored message.
//!
//! Fetched payloads go to the local inbox in one transaction before any is
//! processed, and only then are they acknowledged to the node; each is then
//! applied and removed in one transaction, so a crash loses nothing and
//! applies nothing twice.

use quicnprotochat_core::{
    Content, CoreError, EpochKey, GroupId, GroupMember, IdentityKey, IdentityKeypair, Incoming, MessageKind,
    QueuedMessage, Received, Seq, StateKey, classify,
};
use quicnprotochat_proto::outcome::FetchedWelcomeTree;

use crate::connections::Nodes;
use crate::directory::Directory;
use crate::error::ClientError;
use crate::group_names::send_group_name;
use crate::key_backup::sync_key_backup;
use crate::naming::{changed_event, group_name, id_label, users, valid_group_name};
use crate::output::{Event, Person, Progress};
use crate::state::{Direction, InboxEntry, Invitation, KeptWelcome, NotKept, StateFile, unix_now};

/// Test hook: when this environment variable is set, `recv` and `join` exit
/// right after storing the fetched messages in the inbox, before
/// acknowledging them to the node and before processing any, as a crash
/// there would. Tests use it to prove nothing is lost or applied twice.
pub const EXIT_AFTER_FETCH_ENV: &str = "QUICNPROTOCHAT_TEST_EXIT_AFTER_FETCH";

/// How far a client has read a node's queue.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// The node database's instance id.
    instance: Vec<u8>,
    /// The highest sequence number stored in the state file.
    stored: Seq,
    /// The highest sequence number seen (and stored) in this run.
    after: Seq,
}

impl Seen {
    /// The highest sequence number seen and stored in this run: ack up to
    /// it, and continue after it.
    pub(crate) fn after(&self) -> Seq {
        self.after
    }

    /// Takes in what another fetch on the same queue (e.g. the catch-up
    /// before a send) stored meanwhile, so a pushed batch repeating it is
    /// not stored and applied a second time.
    pub(crate) fn refresh(mut self, state: &StateFile) -> Result<Seen, ClientError> {
        let stored = state.stored_seq(&self.instance)?;
        self.stored = self.stored.max(stored);
        self.after = self.after.max(stored);
        Ok(self)
    }
}

/// Copies our queue on the node into the local inbox, then acknowledges it.
///
/// Fetch, store, then ack: the node deletes messages only after they are
/// committed locally, so a crash anywhere loses nothing. A message the node
/// delivers again (the crash fell between store and ack) has a sequence
/// number at or below the highest stored one and is skipped.
pub(crate) async fn fetch_into_inbox(
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
        after: Seq::ZERO,
    };
    loop {
        let batch = nodes.delivery().fetch_since(&me, seen.after, 0).await?;
        if batch.is_empty() {
            break;
        }
        seen = store_batch(state, seen, batch)?;
    }
    if std::env::var_os(EXIT_AFTER_FETCH_ENV).is_some() {
        note!("exiting after fetch ({EXIT_AFTER_FETCH_ENV} is set)");
        std::process::exit(3);
    }
    if seen.after > Seq::ZERO {
        nodes.delivery().ack(&me, seen.after).await?;
    }
    Ok(seen)
}

/// Stores the messages of `batch` not stored before in the inbox, together
/// with the new high-water mark, in one transaction.
pub(crate) fn store_batch(
    state: &StateFile,
    mut seen: Seen,
    batch: Vec<QueuedMessage>,
) -> Result<Seen, ClientError> {
    let Some(last) = batch.last().map(|message| message.seq) else {
        return Ok(seen);
    };
    let fresh: Vec<QueuedMessage> = batch
        .into_iter()
        .filter(|message| message.seq > seen.stored)
        .collect();
    if !fresh.is_empty() {
        state.push_queued(&seen.instance, &fresh, last)?;
    }
    seen.after = seen.after.max(last);
    seen.stored = seen.stored.max(last);
    Ok(seen)
}

/// Processes every inbox entry, oldest first, printing what each did. A
/// long backlog shows a progress bar on a terminal.
pub(crate) async fn process_inbox(nodes: &Nodes, state: &StateFile) -> Result<(), ClientError> {
    let inbox = state.inbox()?;
    let progress = Progress::new(inbox.len(), PROGRESS_WORTH, "catching up");
    for entry in &inbox {
        let applied = process_entry(nodes, state, entry, false).await?;
        progress.suspend(|| applied.tell())?;
        progress.step();
    }
    state.compact_if_sparse()?;
    // A join or a Commit that moved a group's key on changed what our
    // key backup must hold.
    sync_key_backup(nodes, state).await;
    Ok(())
}

/// How many queued messages make a backlog worth a progress bar.
const PROGRESS_WORTH: usize = 200;

/// Processes one inbox entry and removes it, in one transaction. A message
/// that MLS rejects (garbage, unknown group, past epoch, ...) is reported
/// (a `dropped` event) and removed; a local failure (the state file) or a node that
/// cannot be asked stops processing and keeps the entry for the next run.
/// Returns what it did, to [`Applied::tell`] once it is committed;
/// `explicit_join` makes a group it joins the current one.
///
/// A Welcome without its ratchet tree (ours never carry it) is joined with
/// the tree the node kept for us: the first try names the group and epoch
/// and changes nothing, the second has the tree.
pub(crate) async fn process_entry(
    nodes: &Nodes,
    state: &StateFile,
    entry: &InboxEntry,
    explicit_join: bool,
) -> Result<Applied, ClientError> {
    let (payload, seq) = (entry.payload.as_slice(), entry.seq);
    let entry = entry.id;
    let mut tree = None;
    let mut state_key = None;
    let mut fetched_lists = false;
    loop {
        let directory = nodes.directory();
        let outcome = state.consume_inbox_entry(entry, || {
            apply(
                state,
                payload,
                seq,
                tree.as_deref(),
                state_key.as_ref(),
                explicit_join,
                directory,
            )
        });
        let (group_id, epoch, epoch_key) = match outcome {
            Ok(applied) => {
                if let Some(group_id) = &applied.joined_group {
                    learn_state_key(nodes, state, group_id).await?;
                }
                if let Some((group_id, rejoiner)) = &applied.name_for {
                    // Once, in this epoch: a member who rejoined from a
                    // backup without the group has no name for it.
                    let identity = state.identity()?;
                    let mut group = GroupMember::load(&state.provider(), group_id)?
                        .ok_or(ClientError::Internal("a group vanished while it was named"))?;
                    let sent =
                        send_group_name(nodes, state, &identity, group_id, &mut group, &[*rejoiner]).await;
                    if let Err(e) = sent {
                        note!("warning: a member who rejoined was not told the group's name: {e}");
                    }
                }
                return Ok(applied);
            }
            Err(ClientError::Core(CoreError::RatchetTreeNeeded {
                group_id,
                epoch,
                epoch_key,
            })) if tree.is_none() => (group_id, epoch, epoch_key),
            // The message adds (or, for a Welcome, holds) devices of users
            // whose lists this command has not fetched: fetch them and
            // apply it again. A list the node forged or rolled back stops
            // processing with that error, keeping the message.
            Err(ClientError::Core(CoreError::DeviceListsNeeded(users))) if !fetched_lists => {
                fetched_lists = true;
                nodes.fetch_device_lists(state, &users).await?;
                continue;
            }
            Err(ClientError::Core(broken @ CoreError::BrokenCommit { .. })) => {
                return resync(nodes, state, entry, seq, broken).await;
            }
            Err(ClientError::Core(CoreError::Invitation {
                group_id,
                epoch,
                inviter,
                members,
            })) => {
                let invitation = Invitation {
                    group_id,
                    inviter,
                    epoch,
                    members,
                    received_at: unix_now(),
                };
                let kept = KeptWelcome {
                    welcome: payload.to_vec(),
                    tree,
                };
                return keep_invitation(state, entry, seq, invitation, &kept);
            }
            // A message for a group we are invited to waits for the answer
            // (asked only of messages for groups we are not in): on
            // `accept` it is applied after the Welcome, on `decline` dropped.
            Err(ClientError::UnknownGroup(_)) if awaits_answer(state, payload)? => {
                return Ok(Applied::default());
            }
            Err(e) => return settle_failure(state, entry, seq, e).map(|()| Applied::default()),
        };
        match fetch_tree(nodes, &group_id, epoch, &epoch_key).await {
            Ok((fetched, key)) => {
                tree = Some(fetched);
                state_key = key;
            }
            Err(
                e @ (ClientError::WelcomeTreeUnavailable { .. } | ClientError::WelcomeTreeRefused { .. }),
            ) => {
                return settle_failure(state, entry, seq, e).map(|()| Applied::default());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `payload` is a message for a group an invitation waits for.
fn awaits_answer(state: &StateFile, payload: &[u8]) -> Result<bool, ClientError> {
    match classify(payload) {
        Ok(Incoming::Group { group_id, .. }) => Ok(state.has_invitation(&group_id)?),
        _ => Ok(false),
    }
}

/// The ratchet tree the node kept for the Welcome to `group_id` that starts
/// `epoch`, sealed under `key`, that epoch's key, and the group's state key
/// kept with it (none from a node before protocol 9).
async fn fetch_tree(
    nodes: &Nodes,
    group_id: &[u8],
    epoch: u64,
    key: &EpochKey,
) -> Result<(Vec<u8>, Option<StateKey>), ClientError> {
    let fetched = match GroupId::new(group_id.to_vec()) {
        Some(group) => nodes.delivery().fetch_welcome_tree(&group, epoch, key).await,
        None => Err(ClientError::Core(CoreError::MalformedMessage(
            "the Welcome's group id is not 1 to 256 bytes".into(),
        ))),
    };
    match fetched {
        Ok(FetchedWelcomeTree::Tree { tree, state_key }) => Ok((tree, state_key)),
        Ok(FetchedWelcomeTree::Unavailable) => Err(ClientError::WelcomeTreeUnavailable {
            group: id_label(group_id),
            epoch,
        }),
        // The node refused the call itself: it does not know us as a
        // member this Welcome added (a forged or misdirected Welcome).
        Err(ClientError::Rpc(e)) if e.kind == capnp::ErrorKind::Failed => {
            Err(ClientError::WelcomeTreeRefused {
                group: id_label(group_id),
                reason: e.extra,
            })
        }
        Err(e) => Err(e),
    }
}

/// Joins the group of a kept invitation (the user consented) and forgets
/// the invitation, in one transaction; the messages of the group kept
/// meanwhile are applied by the next [`process_inbox`].
pub(crate) async fn accept_invitation(
    nodes: &Nodes,
    state: &StateFile,
    invitation: &Invitation,
) -> Result<Applied, ClientError> {
    let KeptWelcome { welcome, mut tree } = state
        .invitation_welcome(&invitation.group_id)?
        .ok_or(ClientError::Internal("an invitation vanished"))?;
    let mut state_key = None;
    let mut fetched_lists = false;
    loop {
        let directory = nodes.directory();
        let outcome = state.consume_invitation(&invitation.group_id, || {
            apply(
                state,
                &welcome,
                None,
                tree.as_deref(),
                state_key.as_ref(),
                true,
                directory,
            )
        });
        match outcome {
            Ok(applied) => {
                if let Some(group_id) = &applied.joined_group {
                    learn_state_key(nodes, state, group_id).await?;
                }
                return Ok(applied);
            }
            Err(ClientError::Core(CoreError::RatchetTreeNeeded {
                group_id,
                epoch,
                epoch_key,
            })) if tree.is_none() => {
                let (fetched, key) = fetch_tree(nodes, &group_id, epoch, &epoch_key).await?;
                tree = Some(fetched);
                state_key = key;
            }
            Err(ClientError::Core(CoreError::DeviceListsNeeded(users))) if !fetched_lists => {
                fetched_lists = true;
                nodes.fetch_device_lists(state, &users).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Learns the state key of `group_id`, joined by a Welcome that carried its
/// tree (other clients may send one) or whose tree was fetched before the
/// user accepted it: the node keeps the key beside the tree, sealed under
/// the key of the epoch the Welcome started, which we are in. Without it
/// (the node purged it, or kept none) the group takes its current
/// epoch's, and our first change hands the node its state again under it.
async fn learn_state_key(nodes: &Nodes, state: &StateFile, group_id: &GroupId) -> Result<(), ClientError> {
    if state.kept_state_key(group_id)?.is_some() {
        return Ok(());
    }
    let Some(group) = GroupMember::load(&state.provider(), group_id)? else {
        return Ok(());
    };
    let epoch_key = group.epoch_key(&state.provider())?;
    match fetch_tree(nodes, group_id.as_bytes(), group.epoch(), &epoch_key).await {
        Ok((_, Some(key))) => state.set_state_key(group_id, &key)?,
        Ok((_, None))
        | Err(ClientError::WelcomeTreeUnavailable { .. } | ClientError::WelcomeTreeRefused { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Keeps a Welcome from a stranger as an invitation, or drops it past the
/// bounds on invitations, saying so.
fn keep_invitation(
    state: &StateFile,
    entry: i64,
    seq: Option<Seq>,
    invitation: Invitation,
    kept: &KeptWelcome,
) -> Result<Applied, ClientError> {
    let why = match state.keep_invitation(entry, &invitation, kept)? {
        Ok(()) => {
            let inviter = Person {
                user_key: invitation.inviter.user.to_string(),
                name: state.contact_name(&invitation.inviter.user)?,
            };
            return Ok(Applied {
                joined: false,
                joined_group: None,
                name_for: None,
                event: Some(Event::Invited {
                    group: group_name(state, &invitation.group_id),
                    group_id: hex::encode(&invitation.group_id),
                    inviter,
                    epoch: invitation.epoch,
                    members: invitation.members,
                }),
            });
        }
        Err(NotKept::TooMany) => format!(
            "{} invitations wait already; accept or decline some",
            crate::state::MAX_INVITATIONS
        ),
        Err(NotKept::TooBig) => format!("it is bigger than {} bytes", crate::state::MAX_INVITATION_BYTES),
    };
    let dropped = ClientError::InvitationDropped {
        group: group_name(state, &invitation.group_id),
        inviter: invitation.inviter.user.short().to_owned(),
        why,
    };
    Ok(Applied {
        joined: false,
        joined_group: None,
        name_for: None,
        event: Some(Event::Dropped {
            seq: seq.map(Seq::get),
            error: dropped.kind().0,
            message: dropped.to_string(),
            gave_up: None,
        }),
    })
}

/// Follows the others past a Commit they applied and we cannot process
/// (`broken`, a [`CoreError::BrokenCommit`]): rejoins the group by external
/// commit from its current GroupInfo on the node, then drops the Commit
/// (now of a past epoch). Without this, one broken Commit would leave us
/// behind for good, unable to read or change the group. If the node cannot
/// be asked now the Commit stays in the inbox and the next run tries again;
/// if the rejoin is refused, the Commit is dropped, saying why.
async fn resync(
    nodes: &Nodes,
    state: &StateFile,
    entry: i64,
    seq: Option<Seq>,
    broken: CoreError,
) -> Result<Applied, ClientError> {
    let CoreError::BrokenCommit {
        group_id,
        committer,
        reason,
        ..
    } = &broken
    else {
        return Err(ClientError::Core(broken));
    };
    let group = GroupId::new(group_id.clone()).ok_or(ClientError::Internal("a group id out of bounds"))?;
    let identity = state.identity()?;
    match crate::publish::rejoin(nodes, state, &identity, &group).await {
        Ok(rejoined) => {
            state.remove_inbox(entry)?;
            let culprit = match committer {
                Some(key) => Some(crate::output::Person {
                    user_key: key.to_string(),
                    name: state.contact_name(key)?,
                }),
                None => None,
            };
            Ok(Applied {
                joined: false,
                joined_group: None,
                name_for: None,
                event: Some(Event::Resynced {
                    group: group_name(state, group_id),
                    group_id: hex::encode(group_id),
                    culprit,
                    reason: reason.clone(),
                    epoch: rejoined.epoch(),
                    members: rejoined.user_count(),
                }),
            })
        }
        // Not asked, or the node could not answer now: keep the Commit.
        Err(e)
            if e.is_connection_lost() || e.exit_code() == crate::error::Category::Unreachable.exit_code() =>
        {
            Err(e)
        }
        Err(e) => {
            let error = ClientError::Core(broken);
            Event::Dropped {
                seq: seq.map(Seq::get),
                error: error.kind().0,
                message: error.to_string(),
                gave_up: Some(format!("could not rejoin to carry on: {e}")),
            }
            .print()?;
            state.remove_inbox(entry)?;
            Ok(Applied::default())
        }
    }
}

/// How long an entry from a later epoch than its group may wait for the
/// Commits it needs, and how many of them, with how many bytes, may wait at
/// once, and how far ahead their epoch may be. A real gap closes within a
/// few runs (the node delivers each member's queue in order); beyond these
/// bounds an entry is someone filling the state file, and is dropped.
const KEPT_MAX_AGE_SECS: i64 = 7 * 24 * 60 * 60;
const KEPT_MAX_ENTRIES: i64 = 1_000;
const KEPT_MAX_BYTES: i64 = 16 * 1024 * 1024;
const KEPT_MAX_EPOCHS_AHEAD: u64 = 100;

/// After processing an entry failed (and everything it wrote was rolled
/// back): keeps the entry when it may work later and the bounds allow,
/// drops it otherwise (either way reported as a `kept` or `dropped`
/// event, so a script learns of it), and stops on a local failure.
fn settle_failure(
    state: &StateFile,
    entry: i64,
    seq: Option<Seq>,
    error: ClientError,
) -> Result<(), ClientError> {
    let seq = seq.map(Seq::get);
    match error {
        ClientError::Core(CoreError::FutureEpoch {
            message_epoch,
            group_epoch,
        }) => {
            // A Commit we have not processed yet is missing; dropping this
            // would lose it for good. Keep it for a later run, within bounds.
            let e = CoreError::FutureEpoch {
                message_epoch,
                group_epoch,
            };
            let (first_kept, newly) = state.keep_back(entry)?;
            let over = if message_epoch.saturating_sub(group_epoch) > KEPT_MAX_EPOCHS_AHEAD {
                Some(format!("more than {KEPT_MAX_EPOCHS_AHEAD} epochs ahead"))
            } else if crate::state::unix_now() - first_kept > KEPT_MAX_AGE_SECS {
                Some("waited 7 days for the Commits it needs".to_owned())
            } else if newly {
                // Only an entry kept for the first time is measured against
                // what already waits (so a run re-reading the kept ones does
                // not sum them again for each).
                let kept = state.kept_back_besides(entry)?;
                (kept.entries >= KEPT_MAX_ENTRIES || kept.bytes > KEPT_MAX_BYTES).then(|| {
                    format!(
                        "{} messages ({} bytes) already wait for missing Commits",
                        kept.entries, kept.bytes
                    )
                })
            } else {
                None
            };
            match over {
                None => Event::Kept {
                    seq,
                    epoch: message_epoch,
                    group_epoch,
                }
                .print()?,
                Some(why) => {
                    let e = ClientError::Core(e);
                    Event::Dropped {
                        seq,
                        error: e.kind().0,
                        message: e.to_string(),
                        gave_up: Some(why),
                    }
                    .print()?;
                    state.remove_inbox(entry)?;
                }
            }
            Ok(())
        }
        e @ (ClientError::Core(_)
        | ClientError::UnknownGroup(_)
        | ClientError::WelcomeTreeUnavailable { .. }
        | ClientError::WelcomeTreeRefused { .. }) => {
            Event::Dropped {
                seq,
                error: e.kind().0,
                message: e.to_string(),
                gave_up: None,
            }
            .print()?;
            state.remove_inbox(entry)?;
            Ok(())
        }
        e => Err(e),
    }
}

/// What applying one entry did, to tell the user once it is committed: a
/// message printed before its transaction commits would be printed again
/// after a crash, when the entry is applied again.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The entry joined a group.
    pub(crate) joined: bool,
    /// The group it joined without learning the group's state key.
    joined_group: Option<GroupId>,
    /// What to report.
    event: Option<Event>,
    /// A member who rejoined, whom this client (the first member besides
    /// it) tells the group's name.
    name_for: Option<(GroupId, IdentityKey)>,
}

impl Applied {
    /// Prints what happened (see [`Event::print`]); returns whether the
    /// entry joined a group.
    pub(crate) fn tell(self) -> Result<bool, ClientError> {
        if let Some(event) = &self.event {
            event.print()?;
        }
        Ok(self.joined)
    }
}

fn apply(
    state: &StateFile,
    payload: &[u8],
    seq: Option<Seq>,
    tree: Option<&[u8]>,
    state_key: Option<&StateKey>,
    explicit_join: bool,
    directory: &Directory,
) -> Result<Applied, ClientError> {
    let provider = state.provider();
    match classify(payload)? {
        Incoming::Welcome => {
            // Joined at once only from our own devices and our contacts
            // (or on `join`): anyone else's Welcome is an invitation.
            let me = state.identity_key()?;
            let consent = |inviter: &quicnprotochat_core::MemberKey| {
                explicit_join
                    || inviter.user == me
                    || state.contact_name(&inviter.user).ok().flatten().is_some()
            };
            let group = GroupMember::join_if(&provider, payload, tree, directory, consent)?;
            let group_id = group.group_id();
            // Joining from `recv` must not silently redirect a later `send`
            // without --group-id into a group someone invited us to.
            let make_current = explicit_join || state.current_group()?.is_none();
            state.record_group(&group_id, make_current)?;
            if let Some(key) = state_key {
                state.set_state_key(&group_id, key)?;
            }
            // Joined with a KeyPackage the device that linked us made: its
            // leaf key is noted, to be replaced (`replace_handed_leaves`).
            if let Some(key) = group.own_leaf_key() {
                state.note_joined_leaf(&group_id, &key)?;
            }
            Ok(Applied {
                joined: true,
                joined_group: state_key.is_none().then(|| group_id.clone()),
                name_for: None,
                event: Some(Event::Joined {
                    group: group_name(state, &group_id),
                    group_id: hex::encode(&group_id),
                    epoch: group.epoch(),
                    members: group.user_count(),
                }),
            })
        }
        Incoming::Group { group_id, kind, .. } => {
            // No group of ours has an id a node would not take.
            let unknown = || ClientError::UnknownGroup(group_name(state, &group_id));
            let group_id = GroupId::new(group_id.clone()).ok_or_else(unknown)?;
            let mut group = GroupMember::load(&provider, &group_id)?.ok_or_else(unknown)?;
            let (name, id) = (group_name(state, &group_id), hex::encode(&group_id));
            // Who a Commit adds or removes is told by comparing the users
            // before and after (only for Commits: a big group's member list
            // is not free).
            let users_before = (kind == MessageKind::Commit).then(|| users(&group));
            let mut name_for = None;
            let event = match group.receive(&provider, payload, directory)? {
                Received::Application { sender, plaintext } => match Content::decode(&plaintext) {
                    Content::Text(text) => {
                        // Attributed to the user, whichever of its devices
                        // sent it.
                        state.record_message(
                            &group_id,
                            Direction::Received,
                            &sender.user,
                            text.as_bytes(),
                            group.epoch(),
                        )?;
                        Some(Event::Message {
                            group: name,
                            group_id: id,
                            sender: state.contact_name(&sender.user)?,
                            sender_key: sender.user.to_string(),
                            // Our own user: sent from another of our devices.
                            from_me: sender.user == state.identity_key()?,
                            text,
                            seq: seq.map(Seq::get),
                            epoch: group.epoch(),
                        })
                    }
                    // The first name a group gets sticks; a later one (the
                    // same, from the next invite) changes nothing.
                    Content::GroupName(named)
                        if valid_group_name(&named) && state.name_group(&group_id, &named)? =>
                    {
                        Some(Event::Named {
                            group: named,
                            group_id: id,
                            sender: state.contact_name(&sender.user)?,
                            sender_key: sender.user.to_string(),
                        })
                    }
                    Content::GroupName(_) => None,
                    Content::Unreadable { content_type } => Some(Event::UnknownContent {
                        group: name,
                        group_id: id,
                        sender_key: sender.user.to_string(),
                        content_type,
                    }),
                },
                Received::Commit { .. } => {
                    state.follow_state_key(&group_id, &group)?;
                    let before = users_before.unwrap_or_else(|| users(&group));
                    Some(changed_event(state, &group_id, &before, &group)?)
                }
                Received::Rejoined { member, epoch } => {
                    state.follow_state_key(&group_id, &group)?;
                    // Restored from a backup without the group, it has no
                    // name for it: one member tells it.
                    if group.first_besides(&member) {
                        name_for = Some((group_id.clone(), member));
                    }
                    Some(Event::Rejoined {
                        group: name,
                        group_id: id,
                        member: state.contact_name(&member)?,
                        member_key: member.to_string(),
                        epoch,
                        members: group.user_count(),
                    })
                }
                Received::Removed { epoch } => {
                    // Its key is of no use to us any more, and leaves our
                    // key backup with it.
                    state.forget_state_key(&group_id)?;
                    Some(Event::Removed {
                        group: name,
                        group_id: id,
                        epoch,
                    })
                }
                Received::Proposal => Some(Event::Proposal {
                    group: name,
                    group_id: id,
                }),
                Received::OwnMessage => None,
                _ => Some(Event::Processed {
                    group: name,
                    group_id: id,
                }),
            };
            Ok(Applied {
                joined: false,
                joined_group: None,
                event,
                name_for,
            })
        }
        other => Err(ClientError::Core(CoreError::MalformedMessage(format!(
            "cannot route {other:?}"
        )))),
    }
}
