//! The delivery rules, over any [`Storage`]: one Commit per group and epoch,
//! message-id deduplication per sender, queue depth, KeyPackage selection,
//! device lists that only move forward, acks and the fetch budget.
//!
//! Each function is one command: the caller runs it inside one transaction
//! (a savepoint of the writer's batch) and undoes that transaction when the
//! function returns a refusal or an error, so a refusal never leaves half a
//! call behind. Refusals ([`QueueFull`], [`CommitRefusal`]) are outcomes a
//! correct client must handle; the storage's own error is a failure.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use quicnprotochat_core::public_view::Invalid;
use quicnprotochat_core::sealed::{self, Sealed};
use quicnprotochat_core::{
    EpochKey, GroupId, GroupRef, IdentityKey, KeyPackageStock, MemberKey, MessageKey, PublicView,
    QueuedMessage, Seq, SignedDeviceList, StateKey, Suite, framing,
};
use quicnprotochat_proto::outcome::{QueueFull, StaleEpoch};
use quicnprotochat_proto::wire;
use quicnprotochat_proto::wire::{
    CommitPublication, Envelope, GroupState, ProposalPublication, ValidKeyPackage,
};

use super::storage::Storage;

/// A fetch answer carries whole messages, oldest first, until it reaches this
/// many bytes of encoded payloads (and always at least one message); the rest
/// stay queued for the next fetch. The wire contract's number
/// ([`wire::FETCH_ANSWER_BYTES`]): the node's memory budget counts on it.
pub const FETCH_BUDGET_BYTES: usize = wire::FETCH_ANSWER_BYTES;

/// A fetch answer carries at most this many messages, which bounds the rows
/// one command reads or deletes while other commands wait.
pub const FETCH_MAX_MESSAGES: usize = 4096;

/// Most standalone proposals the node keeps for one group and epoch: each
/// is rewritten with the group's state on every change of this epoch, and
/// every member's next Commit must carry them all. A Commit frees the count.
pub const MAX_PROPOSALS_PER_EPOCH: u32 = 100;

/// Most epochs of one group whose ratchet tree the node keeps for joiners
/// (the newest): a group's kept trees cost at most this many times its
/// current tree, however many Commits add members. A joiner whose Welcome
/// is older than that finds no tree and is told to be invited again (or,
/// as a member the node knows, to `rejoin`).
pub const WELCOME_TREES_PER_GROUP: usize = 4;

/// Most a device list's version may move forward in one upload (and a
/// user's first list may start at): versions only go up, and a bounded
/// step keeps anyone from spending them (a list at `u64::MAX` could never
/// be replaced). 2^32 steps of 2^32 each still leave room.
pub const MAX_DEVICE_LIST_STEP: u64 = 1 << 32;

/// The node's default for [`Limits::max_queue_depth`].
pub const DEFAULT_MAX_QUEUE_DEPTH: usize = 10_000;

/// The node's default for [`Limits::max_queue_bytes`]: 256 MiB, a long
/// absence in busy groups or 256 messages at the largest payload; beyond
/// it, `queueFull`.
pub const DEFAULT_MAX_QUEUE_BYTES: u64 = 256 * 1024 * 1024;

/// The node's default for [`Limits::max_key_packages`], unexpired
/// KeyPackages of one identity and ciphersuite: far above what a client
/// keeps (10 and a last resort per suite), far below what fills a
/// disk.
pub const DEFAULT_MAX_KEY_PACKAGES: u32 = 1_000;

/// Limits the rules enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most messages one queue may hold; a call that would go beyond it is
    /// refused whole.
    pub max_queue_depth: usize,
    /// Most payload bytes one queue may hold, likewise.
    pub max_queue_bytes: u64,
    /// Most unexpired KeyPackages one identity may keep of each
    /// ciphersuite.
    pub max_key_packages: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            max_key_packages: DEFAULT_MAX_KEY_PACKAGES,
        }
    }
}

/// Why `enqueue` stored nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRefusal {
    /// A recipient's queue has no room.
    QueueFull(QueueFull),
    /// An application message from an epoch its group has left.
    StaleEpoch(StaleEpoch),
    /// A handshake (Commit, proposal, Welcome): only the publish calls,
    /// which order them, carry those.
    Handshake,
}

/// An upload would leave the identity with more KeyPackages of one
/// ciphersuite than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyKeyPackages {
    /// The ciphersuite whose stock is full (the first such, in
    /// [`Suite::ALL`] order).
    pub suite: Suite,
    /// Unexpired KeyPackages of that suite the identity holds now.
    pub stored: u64,
    /// The limit.
    pub max: u32,
}

/// Why `publishCommit` or `publishProposal` stored nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitRefusal {
    /// The group is at `current_epoch`, not at the message's epoch: another
    /// Commit won.
    Conflict {
        /// The group's epoch now.
        current_epoch: u64,
    },
    /// A recipient's queue has no room.
    QueueFull(QueueFull),
    /// Not valid for the group's public view.
    Invalid {
        /// Why, for people.
        reason: String,
    },
    /// The node has no view of the group, and none was handed over; or
    /// the sender is not a member of the group the node knows (told apart
    /// from no group by nobody, so a stranger learns nothing of it).
    UnknownGroup,
    /// The group keeps [`MAX_PROPOSALS_PER_EPOCH`] proposals already.
    TooManyProposals {
        /// The limit.
        max: u32,
    },
}

impl From<quicnprotochat_core::public_view::Invalid> for CommitRefusal {
    fn from(invalid: quicnprotochat_core::public_view::Invalid) -> Self {
        CommitRefusal::Invalid { reason: invalid.0 }
    }
}

/// Stores validated KeyPackages of `identity`, each under its suite, all
/// or none. Each suite has a stock of its own, limited on its own: a client
/// keeps a full stock of every suite it speaks, and filling one never
/// refuses uploads of another. A KeyPackage stored already (or twice in the
/// upload) is stored once: served twice, its init key would be used for
/// two Welcomes.
pub fn upload_key_packages<S: Storage>(
    storage: &mut S,
    identity: &IdentityKey,
    packages: &[ValidKeyPackage],
    limits: &Limits,
    now: i64,
) -> Result<Result<(), TooManyKeyPackages>, S::Error> {
    let mut seen = HashSet::new();
    let mut fresh = Vec::with_capacity(packages.len());
    for package in packages {
        if seen.insert(package.fingerprint) && !storage.has_key_package(identity, &package.fingerprint)? {
            fresh.push(package);
        }
    }
    let packages = fresh;
    for suite in Suite::ALL {
        let adding = packages.iter().filter(|package| package.suite == suite).count() as u64;
        if adding == 0 {
            continue;
        }
        let stored = storage.stored_key_packages(identity, suite, now)?;
        if stored.saturating_add(adding) > u64::from(limits.max_key_packages) {
            return Ok(Err(TooManyKeyPackages {
                suite,
                stored,
                max: limits.max_key_packages,
            }));
        }
    }
    for package in packages {
        storage.insert_key_package(identity, package, now)?;
    }
    Ok(Ok(()))
}

/// Takes a KeyPackage of `identity` in `suite` (a group can only add its
/// members with KeyPackages of its own suite): the oldest unexpired
/// ordinary one, deleted so that nobody gets it again (its HPKE init key
/// must serve one Welcome only); when none is left, or `ordinary` is false
/// (the serve rate of the identity's stock of that suite is spent), the
/// newest unexpired last-resort one of that suite, kept so that its owner
/// stays reachable. Expired ones are never served, nor ones of another
/// suite.
pub fn take_key_package<S: Storage>(
    storage: &mut S,
    identity: &IdentityKey,
    suite: Suite,
    ordinary: bool,
    now: i64,
) -> Result<Option<Vec<u8>>, S::Error> {
    // Counted here, the one place that knows which kind it hands out; a
    // batch that fails after this (rare) counts one too many.
    if ordinary && let Some((row, package)) = storage.oldest_key_package(identity, suite, now)? {
        storage.delete_key_package(row)?;
        metrics::counter!(crate::metrics::KEY_PACKAGES_SERVED, "last_resort" => "false").increment(1);
        return Ok(Some(package));
    }
    let package = storage.newest_last_resort(identity, suite, now)?;
    if package.is_some() {
        metrics::counter!(crate::metrics::KEY_PACKAGES_SERVED, "last_resort" => "true").increment(1);
    }
    Ok(package)
}

/// How many unexpired ordinary KeyPackages `identity` has in `suite`, and
/// whether it has an unexpired last-resort one of that suite.
pub fn count_key_packages<S: Storage>(
    storage: &mut S,
    identity: &IdentityKey,
    suite: Suite,
    now: i64,
) -> Result<KeyPackageStock, S::Error> {
    storage.count_key_packages(identity, suite, now)
}

/// Why `uploadDeviceList` stored nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceListRefusal {
    /// The node holds a list of the user at `current`, this version or a
    /// higher one (another list under the same version, if the same).
    Stale {
        /// The stored version.
        current: u64,
    },
    /// The signature is not the user key's over the list.
    BadSignature,
    /// The caller is not a device of the stored list (nor, for a user's
    /// first list, of the new one or the user key).
    NotADevice,
    /// The list names a device an earlier list of the user dropped:
    /// removed devices stay removed.
    RemovedDevice,
    /// The version is more than `max_step` above `current` (0: no list
    /// stored).
    TooFar {
        /// The stored version, 0 if none.
        current: u64,
        /// [`MAX_DEVICE_LIST_STEP`].
        max_step: u64,
    },
}

/// Stores `list`, uploaded by `caller` (the connection's identity), as its
/// user's device list, if the user key signed it, the caller may replace
/// the user's list, and it moves the list forward.
///
/// Checked in this order, so that an answer never says more than the
/// caller may know:
/// 1. the signature (strict Ed25519), before anything is read;
/// 2. exactly the stored list again (a retry after a lost answer): stored,
///    nothing written. Checked before who the caller is, because such an
///    upload changes nothing (and the list is public anyway); a device
///    that removed itself can then still retry its upload;
/// 3. who may replace the list: a device named in the stored list; for a
///    user's first list, a device named in it or the user key itself. A
///    removed device cannot put itself back, even with an old list the
///    user once signed;
/// 4. the version: higher than the stored one, or the list is stale; and
///    at most [`MAX_DEVICE_LIST_STEP`] above it (or above 0 for a first
///    list), so that versions cannot be used up;
/// 5. no device an earlier list dropped: a removed device still holds the
///    user key (every device does), so it could sign a list naming itself
///    again and upload it as the user key; whoever uploads, it stays out.
///
/// The devices a stored list names and the new one does not are recorded
/// as removed.
pub fn upload_device_list<S: Storage>(
    storage: &mut S,
    caller: &IdentityKey,
    list: &SignedDeviceList,
    now: i64,
) -> Result<Result<(), DeviceListRefusal>, S::Error> {
    if list.verify().is_err() {
        return Ok(Err(DeviceListRefusal::BadSignature));
    }
    let user = list.list().user();
    let stored = storage.device_list(user)?;
    if stored.as_ref() == Some(list) {
        return Ok(Ok(()));
    }
    let may_replace = match &stored {
        Some(stored) => stored.list().contains(caller),
        None => list.list().contains(caller) || caller == user,
    };
    if !may_replace {
        return Ok(Err(DeviceListRefusal::NotADevice));
    }
    if let Some(stored) = &stored
        && list.list().version() <= stored.list().version()
    {
        return Ok(Err(DeviceListRefusal::Stale {
            current: stored.list().version(),
        }));
    }
    let current = stored.as_ref().map_or(0, |stored| stored.list().version());
    if list.list().version() - current > MAX_DEVICE_LIST_STEP {
        return Ok(Err(DeviceListRefusal::TooFar {
            current,
            max_step: MAX_DEVICE_LIST_STEP,
        }));
    }
    for device in list.list().devices() {
        if storage.is_removed_device(user, device)? {
            return Ok(Err(DeviceListRefusal::RemovedDevice));
        }
    }
    storage.put_device_list(list, now)?;
    if let Some(stored) = &stored {
        let dropped: Vec<IdentityKey> = stored
            .list()
            .devices()
            .iter()
            .filter(|device| !list.list().contains(device))
            .copied()
            .collect();
        if !dropped.is_empty() {
            storage.remove_devices(user, &dropped, now)?;
        }
    }
    Ok(Ok(()))
}

/// The stored device lists of `users`, in the order asked (a user asked
/// twice, twice), leaving out users without one.
pub fn device_lists<S: Storage>(
    storage: &mut S,
    users: &[IdentityKey],
) -> Result<Vec<SignedDeviceList>, S::Error> {
    let found: HashMap<IdentityKey, SignedDeviceList> = storage
        .device_lists(users)?
        .into_iter()
        .map(|list| (*list.list().user(), list))
        .collect();
    Ok(users.iter().filter_map(|user| found.get(user).cloned()).collect())
}

/// Queues each envelope's payload for each of its recipients, all or none.
/// An envelope whose message id `sender` already used is skipped (a retry);
/// a recipient named twice in one envelope gets the payload once. Refused
/// whole if a payload is an MLS handshake (Commits, proposals and Welcomes
/// go through the publish calls, which order them: sent around them, a
/// member could make others apply different Commits of one epoch), if any
/// queue would go beyond the depth or byte limit, or if an application
/// message of a member is from an epoch its group has left (its readers
/// may no longer be able to open it; the sender should catch up and
/// encrypt it again).
pub fn enqueue<S: Storage>(
    storage: &mut S,
    sender: &IdentityKey,
    envelopes: &[Envelope],
    state_keys: &[StateKey],
    limits: &Limits,
    now: i64,
) -> Result<Result<(), SendRefusal>, S::Error> {
    if envelopes
        .iter()
        .any(|envelope| framing::is_handshake(&envelope.payload))
    {
        return Ok(Err(SendRefusal::Handshake));
    }
    let mut fresh = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        if is_new(storage, sender, envelope, now)? {
            fresh.push(envelope);
        }
    }
    for envelope in &fresh {
        if let Some(stale) = stale_epoch(storage, sender, &envelope.payload, state_keys)? {
            return Ok(Err(SendRefusal::StaleEpoch(stale)));
        }
    }
    let mut incoming = Incoming::default();
    for envelope in &fresh {
        incoming.add(&envelope.recipients, envelope.payload.len());
    }
    if let Err(full) = incoming.check_room(storage, limits)? {
        return Ok(Err(SendRefusal::QueueFull(full)));
    }
    for envelope in fresh {
        append(storage, envelope, now)?;
    }
    Ok(Ok(()))
}

/// Publishes a group change if its Commit is valid and the first for its
/// group and epoch: checks the Commit against the group's public view,
/// queues the Commit and the Welcome, and moves the group (and its view) to
/// the next epoch. A group's view starts from the state its creator hands
/// over with the group's first change; a group the node has no view of
/// accepts nothing else. From then on only a Commit for exactly the current
/// epoch is accepted, so nobody can move a group's epoch ahead of its
/// members, and only one its members can apply, so nobody can take an
/// epoch with noise. A retry of an accepted publication (same sender and
/// Commit message id) is accepted again without storing anything.
pub fn publish_commit<S: Storage>(
    storage: &mut S,
    sender: &IdentityKey,
    publication: &CommitPublication,
    limits: &Limits,
    now: i64,
) -> Result<Result<(), CommitRefusal>, S::Error> {
    if let Some(id) = &publication.commit.message_id
        && storage.message_id_used(&MessageKey::of(sender, id))?
    {
        return Ok(Ok(()));
    }
    let group = &publication.group_id;
    let group_ref = GroupRef::of(group);
    // Read first: a backend shared by several nodes moves an epoch only
    // from the value the command read (`Storage::set_group_epoch`).
    let known_epoch = storage.group_epoch(&group_ref)?;
    let mut view = match load_view(storage, group, &publication.state_key)? {
        // A stranger learns neither the epoch nor that the group exists.
        Ok(view) if !view.is_member(sender) => return Ok(Err(CommitRefusal::UnknownGroup)),
        Ok(view) => view,
        Err(CommitRefusal::UnknownGroup) => match &publication.initial_state {
            None => return Ok(Err(CommitRefusal::UnknownGroup)),
            Some(state) => {
                let view = match PublicView::start(
                    group.as_bytes(),
                    publication.epoch,
                    &state.group_info,
                    &state.ratchet_tree,
                    sender,
                ) {
                    Ok(view) => view,
                    Err(invalid) => return Ok(Err(invalid.into())),
                };
                // A forgotten group is handed over again only in the very
                // state the node last knew it in (of which it kept the
                // fingerprint): a stranger, or anyone holding an older
                // state, is told nothing, as for a group it does not know.
                if storage
                    .group_fingerprint(&group_ref)?
                    .is_some_and(|kept| kept != view.fingerprint())
                {
                    return Ok(Err(CommitRefusal::UnknownGroup));
                }
                // Groups from before fingerprints: never an older epoch.
                if let Some(current_epoch) = known_epoch.filter(|epoch| *epoch != publication.epoch) {
                    return Ok(Err(CommitRefusal::Conflict { current_epoch }));
                }
                view
            }
        },
        Err(refusal) => return Ok(Err(refusal)),
    };
    let current_epoch = known_epoch.unwrap_or(view.epoch());
    if current_epoch != publication.epoch || view.epoch() != publication.epoch {
        return Ok(Err(CommitRefusal::Conflict { current_epoch }));
    }
    let commit = &publication.commit;
    let applied = match view.apply_commit(&commit.payload, sender) {
        Ok(applied) => applied,
        Err(invalid) => return Ok(Err(invalid.into())),
    };
    let added = applied.added;
    // A Commit that takes a device out moves the group's state key on
    // (protocol 9), so that device's key opens nothing written after; the
    // members compute the new key from the Commit as the committer did.
    let state_key = match (&publication.new_state_key, applied.takes_out_a_device) {
        (Some(key), true) => key,
        (None, false) => &publication.state_key,
        (None, true) => {
            return Ok(Err(CommitRefusal::Invalid {
                reason: "a Commit that takes a device out of the group must carry newStateKey, the state key of the epoch it starts (protocol 9)".into(),
            }));
        }
        (Some(_), false) => {
            return Ok(Err(CommitRefusal::Invalid {
                reason: "newStateKey goes only with a Commit that takes a device out of the group (protocol 9): this one keeps the state key".into(),
            }));
        }
    };
    if let Err(invalid) = check_listed(storage, &added)? {
        return Ok(Err(invalid.into()));
    }
    let added: Vec<IdentityKey> = added.iter().map(|member| member.device).collect();
    // Every member of the new epoch but its sender and those it adds (who
    // get the Welcome) must get the Commit: one left out would stay behind
    // while the others move on, frozen out by the sender.
    let told: HashSet<&IdentityKey> = commit.recipients.iter().chain(&added).chain([sender]).collect();
    if let Some(left_out) = view
        .member_devices()
        .into_iter()
        .find(|device| !told.contains(device))
    {
        return Ok(Err(CommitRefusal::Invalid {
            reason: format!(
                "the Commit must go to every member of the group, and it leaves out {}",
                left_out.short()
            ),
        }));
    }
    // The Welcome goes with its Commit to those it adds, and is a Welcome:
    // anything else here (another Commit for some members, say) would
    // reach them unordered and could fork the group.
    if let Some(welcome) = &publication.welcome {
        if !framing::is_welcome(&welcome.payload) {
            return Ok(Err(CommitRefusal::Invalid {
                reason: "the welcome envelope must carry an MLS Welcome".into(),
            }));
        }
        if let Some(other) = welcome
            .recipients
            .iter()
            .find(|recipient| !added.contains(recipient))
        {
            return Ok(Err(CommitRefusal::Invalid {
                reason: format!(
                    "the Welcome may go only to the devices the Commit adds, and {} is not one",
                    other.short()
                ),
            }));
        }
    }
    // The tree kept for joiners is sealed under the key of the epoch the
    // Commit starts (protocol 8); without it they could not read it.
    let tree_key = match (&publication.epoch_key, added.is_empty()) {
        (_, true) => None,
        (Some(key), false) => Some(key),
        (None, false) => {
            return Ok(Err(CommitRefusal::Invalid {
                reason: "a Commit that adds members must carry epochKey, the key of the epoch it starts (protocol 8): the node keeps the joiners' ratchet tree sealed under it".into(),
            }));
        }
    };
    // Every Commit brings the GroupInfo of the epoch it starts: a member
    // that cannot process the Commit (its sender broke it) rejoins from it
    // and the group carries on, instead of freezing for all but its sender.
    let Some(group_info) = &publication.group_info else {
        return Ok(Err(CommitRefusal::Invalid {
            reason: "a Commit must carry groupInfo, the GroupInfo of the epoch it starts (with external_pub), so that members who cannot process it can rejoin".into(),
        }));
    };
    if let Err(invalid) = view.accept_group_info(group_info, sender) {
        return Ok(Err(invalid.into()));
    }
    if let Some(id) = &commit.message_id {
        storage.claim_message_id(&MessageKey::of(sender, id), now)?;
    }
    let welcome = match &publication.welcome {
        Some(welcome) if is_new(storage, sender, welcome, now)? => Some(welcome),
        _ => None,
    };
    let mut incoming = Incoming::default();
    incoming.add(&commit.recipients, commit.payload.len());
    if let Some(welcome) = welcome {
        incoming.add(&welcome.recipients, welcome.payload.len());
    }
    if let Err(full) = incoming.check_room(storage, limits)? {
        return Ok(Err(CommitRefusal::QueueFull(full)));
    }
    // The view (the tree with every member's key, the group context with
    // the group's id) only ever reaches storage sealed under the state key.
    let sealed_view = sealed::seal(state_key, Sealed::View, &group_ref, view.epoch(), &view.encode());
    storage.set_group_view(&group_ref, &sealed_view, now)?;
    storage.set_group_epoch(&group_ref, view.epoch(), &view.fingerprint())?;
    if let Some(key) = &tree_key {
        // Welcomes do not carry the tree; the new members fetch it, with the
        // group's state key, by the key of the epoch their Welcome starts,
        // so the node need not keep who they are, and its files show
        // neither them nor the tree.
        let sealed = sealed::seal_welcome(key, &group_ref, view.epoch(), state_key, &view.ratchet_tree());
        storage.put_welcome_tree(&group_ref, view.epoch(), &sealed, WELCOME_TREES_PER_GROUP, now)?;
    }
    // A group of one has nobody to send its Commit to; its epoch still counts.
    if !commit.recipients.is_empty() {
        append(storage, commit, now)?;
    }
    if let Some(welcome) = welcome {
        append(storage, welcome, now)?;
    }
    Ok(Ok(()))
}

/// Every added device must be its user key or named by its user's stored
/// device list: the members check the same, and a Commit they would refuse
/// must not take the group's epoch here.
fn check_listed<S: Storage>(storage: &mut S, added: &[MemberKey]) -> Result<Result<(), Invalid>, S::Error> {
    for member in added.iter().filter(|member| !member.is_own_user()) {
        let listed = storage
            .device_list(&member.user)?
            .is_some_and(|list| list.list().contains(&member.device));
        if !listed {
            return Ok(Err(Invalid(format!(
                "it adds device {} as a device of user {}, whose device list does not name it",
                member.device.short(),
                member.user.short()
            ))));
        }
    }
    Ok(Ok(()))
}

/// Publishes a standalone proposal (e.g. a member's request to leave) if it
/// is valid for the group's public view in its epoch: the view keeps it for
/// a Commit of this epoch to reference, and it is queued for its
/// recipients. A retry (same sender and message id) is accepted again
/// without storing anything.
pub fn publish_proposal<S: Storage>(
    storage: &mut S,
    sender: &IdentityKey,
    publication: &ProposalPublication,
    limits: &Limits,
    now: i64,
) -> Result<Result<(), CommitRefusal>, S::Error> {
    let proposal = &publication.proposal;
    if let Some(id) = &proposal.message_id
        && storage.message_id_used(&MessageKey::of(sender, id))?
    {
        return Ok(Ok(()));
    }
    let mut view = match load_view(storage, &publication.group_id, &publication.state_key)? {
        // A stranger learns neither the epoch nor that the group exists.
        Ok(view) if !view.is_member(sender) => return Ok(Err(CommitRefusal::UnknownGroup)),
        Ok(view) => view,
        Err(refusal) => return Ok(Err(refusal)),
    };
    if view.epoch() != publication.epoch {
        return Ok(Err(CommitRefusal::Conflict {
            current_epoch: view.epoch(),
        }));
    }
    if view.proposal_count() >= MAX_PROPOSALS_PER_EPOCH as usize {
        return Ok(Err(CommitRefusal::TooManyProposals {
            max: MAX_PROPOSALS_PER_EPOCH,
        }));
    }
    let item = match view.add_proposal(&proposal.payload, sender) {
        Ok((added, item)) => {
            if let Err(invalid) = check_listed(storage, &added)? {
                return Ok(Err(invalid.into()));
            }
            item
        }
        Err(invalid) => return Ok(Err(invalid.into())),
    };
    if let Some(id) = &proposal.message_id {
        storage.claim_message_id(&MessageKey::of(sender, id), now)?;
    }
    let mut incoming = Incoming::default();
    incoming.add(&proposal.recipients, proposal.payload.len());
    if let Err(full) = incoming.check_room(storage, limits)? {
        return Ok(Err(CommitRefusal::QueueFull(full)));
    }
    // The proposal alone: the view (the whole tree) stays as it is.
    let group_ref = GroupRef::of(&publication.group_id);
    let item = sealed::seal(
        &publication.state_key,
        Sealed::Proposal,
        &group_ref,
        view.epoch(),
        &item,
    );
    storage.add_group_proposal(&group_ref, view.epoch(), &item, now)?;
    if !proposal.recipients.is_empty() {
        append(storage, proposal, now)?;
    }
    Ok(Ok(()))
}

/// The caller of [`group_info`] owns no leaf of the group (or the node has
/// no view of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAMember;

/// The current GroupInfo and ratchet tree of `group`, for `caller` to
/// rejoin by external commit; `Ok(None)` if the last Commit brought no
/// GroupInfo.
pub fn group_info<S: Storage>(
    storage: &mut S,
    group: &GroupId,
    key: &StateKey,
    caller: &IdentityKey,
) -> Result<Result<Option<GroupState>, NotAMember>, S::Error> {
    let Ok(view) = load_view(storage, group, key)? else {
        return Ok(Err(NotAMember));
    };
    if !view.is_member(caller) {
        return Ok(Err(NotAMember));
    }
    Ok(Ok(view.group_info()))
}

/// What the node serves the members a Commit added ([`welcome_tree`]): the
/// ratchet tree of the epoch it started, and the group's state key (none
/// for a tree kept before protocol 9).
pub type ForJoiners = (Vec<u8>, Option<StateKey>);

/// The ratchet tree of `group` in `epoch`, for `caller` to join with a
/// Welcome of that epoch. Only whoever presents the epoch's `key` reads
/// it: the members the Commit that started the epoch added compute it from
/// their Welcome (a tree kept before protocol 8 is in clear, and read only
/// by the members it names). `None` for anyone else, and when the node
/// keeps none (purged, or no Commit it accepted started that epoch by
/// adding members): one answer, so that it tells nobody outside whether
/// the group exists.
pub fn welcome_tree<S: Storage>(
    storage: &mut S,
    group: &GroupId,
    epoch: u64,
    key: Option<&EpochKey>,
    caller: &IdentityKey,
) -> Result<Option<ForJoiners>, S::Error> {
    let group_ref = GroupRef::of(group);
    let Some(kept) = storage.welcome_tree(&group_ref, epoch)? else {
        return Ok(None);
    };
    if !kept.joiners.is_empty() {
        return Ok(kept.joiners.contains(caller).then_some((kept.tree, None)));
    }
    let Some(key) = key else {
        return Ok(None);
    };
    if let Some((state_key, tree)) = sealed::open_welcome(key, &group_ref, epoch, &kept.tree) {
        return Ok(Some((tree, Some(state_key))));
    }
    // Kept by a protocol 8 node: the tree alone.
    Ok(sealed::open(key, Sealed::WelcomeTree, &group_ref, epoch, &kept.tree).map(|tree| (tree, None)))
}

/// The stored public view of `group`; [`CommitRefusal::UnknownGroup`] if
/// there is none.
fn load_view<S: Storage>(
    storage: &mut S,
    group: &GroupId,
    key: &StateKey,
) -> Result<Result<PublicView, CommitRefusal>, S::Error> {
    let group_ref = GroupRef::of(group);
    let Some(sealed_view) = storage.group_view(&group_ref)? else {
        return Ok(Err(CommitRefusal::UnknownGroup));
    };
    // The view's epoch is the group's: both move with each Commit.
    let Some(epoch) = storage.group_epoch(&group_ref)? else {
        return Ok(Err(CommitRefusal::UnknownGroup));
    };
    // A key that does not open the view (a stranger's guess, a removed
    // member's old key, a view kept before protocol 9) finds no group: the
    // caller learns nothing, and a member hands the state over again.
    let Some(bytes) = sealed::open(key, Sealed::View, &group_ref, epoch, &sealed_view) else {
        return Ok(Err(CommitRefusal::UnknownGroup));
    };
    let mut proposals = Vec::new();
    for item in storage.group_proposals(&group_ref, epoch)? {
        match sealed::open(key, Sealed::Proposal, &group_ref, epoch, &item) {
            Some(item) => proposals.push(item),
            None => return Ok(Err(CommitRefusal::UnknownGroup)),
        }
    }
    Ok(
        PublicView::decode(group.as_bytes(), &bytes, &proposals).map_err(|damaged| {
            // Our own storage failed us; the caller can do nothing but know.
            tracing::error!("{damaged}");
            CommitRefusal::Invalid {
                reason: format!("the node cannot check this group: {damaged}"),
            }
        }),
    )
}

/// The messages of `recipient` after `after`, oldest first, without removing
/// them: at most `limit` (0: [`FETCH_MAX_MESSAGES`]) and within
/// [`FETCH_BUDGET_BYTES`], but always the first if there is one. The budget
/// counts what each message costs in the Cap'n Proto answer (payload padded
/// to a word, plus its list entry), so a queue of many tiny messages cannot
/// make an answer the client refuses.
pub fn messages_after<S: Storage>(
    storage: &mut S,
    recipient: &IdentityKey,
    after: Seq,
    limit: usize,
) -> Result<Vec<QueuedMessage>, S::Error> {
    let limit = if limit == 0 {
        FETCH_MAX_MESSAGES
    } else {
        limit.min(FETCH_MAX_MESSAGES)
    };
    let mut messages = Vec::new();
    let mut total = 0usize;
    storage.scan_queue(recipient, after, &mut |seq, payload| {
        let cost = payload.len().next_multiple_of(8) + 24;
        if !messages.is_empty() && total + cost > FETCH_BUDGET_BYTES {
            return false;
        }
        total += cost;
        messages.push(QueuedMessage { seq, payload });
        messages.len() < limit
    })?;
    Ok(messages)
}

/// The messages of `recipient` after `after`, if there are at most
/// `max_messages` of them with at most `max_bytes` of payload in all; else
/// `None`, having read no more than one message beyond either bound.
pub fn messages_within<S: Storage>(
    storage: &mut S,
    recipient: &IdentityKey,
    after: Seq,
    max_messages: usize,
    max_bytes: usize,
) -> Result<Option<Vec<QueuedMessage>>, S::Error> {
    let mut messages = Vec::new();
    let mut total = 0usize;
    let mut fits = true;
    storage.scan_queue(recipient, after, &mut |seq, payload| {
        total += payload.len();
        fits = total <= max_bytes && messages.len() < max_messages;
        messages.push(QueuedMessage { seq, payload });
        fits
    })?;
    Ok(fits.then_some(messages))
}

/// Deletes the messages of `recipient` up to and including `up_to`, once
/// its owner has stored them; returns how many. Acking what is already gone
/// (a repeated ack) deletes nothing and is no error.
pub fn ack<S: Storage>(storage: &mut S, recipient: &IdentityKey, up_to: Seq) -> Result<usize, S::Error> {
    storage.delete_through(recipient, up_to)
}

/// Reads the queue of `recipient` oldest first, within the fetch budget, and
/// deletes what it read.
pub fn drain<S: Storage>(storage: &mut S, recipient: &IdentityKey) -> Result<Vec<Vec<u8>>, S::Error> {
    let messages = messages_after(storage, recipient, Seq::ZERO, 0)?;
    if let Some(last) = messages.last() {
        storage.delete_through(recipient, last.seq)?;
    }
    Ok(messages.into_iter().map(|message| message.payload).collect())
}

/// Deletes what outlived the retention period (messages and message ids
/// from before `older_than`) and expired KeyPackages; returns how many
/// messages went.
pub fn purge<S: Storage>(storage: &mut S, older_than: i64, now: i64) -> Result<usize, S::Error> {
    storage.purge(older_than, now)
}

/// Forgets the public views of groups without a change since `before`. A
/// member's next change finds the group unknown and hands the node the
/// group's state again, in exactly the state the node last knew (its
/// fingerprint is kept with the epoch), so nobody can roll the group back
/// or hand over a state of its own making.
pub fn purge_idle_groups<S: Storage>(storage: &mut S, before: i64) -> Result<usize, S::Error> {
    storage.purge_idle_groups(before)
}

/// Whether `envelope` is to be stored: it has no message id, or `sender`
/// uses its id for the first time (which this records).
fn is_new<S: Storage>(
    storage: &mut S,
    sender: &IdentityKey,
    envelope: &Envelope,
    now: i64,
) -> Result<bool, S::Error> {
    match &envelope.message_id {
        Some(id) => storage.claim_message_id(&MessageKey::of(sender, id), now),
        None => Ok(true),
    }
}

/// Appends an envelope's payload once to each distinct recipient.
/// The group and epoch of `payload` if it is an MLS PrivateMessage from an
/// epoch before the one its group is in on the node, and `sender` is a
/// member of that group. Anyone else's message is opaque, so the answer
/// tells nobody outside a group whether it exists or where it is. Only a
/// stale message costs reading the group's view.
fn stale_epoch<S: Storage>(
    storage: &mut S,
    sender: &IdentityKey,
    payload: &[u8],
    keys: &[StateKey],
) -> Result<Option<StaleEpoch>, S::Error> {
    let Some((group_id, epoch)) = framing::private_message_epoch(payload) else {
        return Ok(None);
    };
    let Some(group) = GroupId::new(group_id.to_vec()) else {
        return Ok(None);
    };
    let current_epoch = match storage.group_epoch(&GroupRef::of(&group))? {
        Some(current_epoch) if epoch < current_epoch => current_epoch,
        _ => return Ok(None),
    };
    let mut member = false;
    for key in keys {
        if let Ok(view) = load_view(storage, &group, key)? {
            member = view.is_member(sender);
            break;
        }
    }
    Ok(member.then(|| StaleEpoch {
        group_id: group_id.to_vec(),
        current_epoch,
    }))
}

fn append<S: Storage>(storage: &mut S, envelope: &Envelope, now: i64) -> Result<(), S::Error> {
    match envelope.recipients.as_slice() {
        [_] => storage.append(&envelope.recipients, &envelope.payload, now),
        many => {
            let mut seen = std::collections::HashSet::with_capacity(many.len());
            let distinct: Vec<IdentityKey> = many.iter().copied().filter(|key| seen.insert(*key)).collect();
            storage.append(&distinct, &envelope.payload, now)
        }
    }
}

/// How many messages one call adds to each queue, in the order the call
/// first names them.
#[derive(Default)]
struct Incoming {
    order: Vec<IdentityKey>,
    /// Per queue: messages and bytes added, and the last envelope that
    /// added one.
    counts: HashMap<IdentityKey, (u64, u64, usize)>,
    envelopes: usize,
}

impl Incoming {
    /// Counts one message of `bytes` for each distinct recipient of an
    /// envelope.
    fn add(&mut self, recipients: &[IdentityKey], bytes: usize) {
        self.envelopes += 1;
        let envelope = self.envelopes;
        let bytes = bytes as u64;
        for recipient in recipients {
            match self.counts.entry(*recipient) {
                Entry::Occupied(mut entry) => {
                    let (count, size, last) = entry.get_mut();
                    // Named twice in one envelope: queued (and counted) once.
                    if *last != envelope {
                        *count += 1;
                        *size += bytes;
                        *last = envelope;
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert((1, bytes, envelope));
                    self.order.push(*recipient);
                }
            }
        }
    }

    /// Refuses if any queue would hold more messages or bytes than the
    /// limits afterwards.
    fn check_room<S: Storage>(
        &self,
        storage: &mut S,
        limits: &Limits,
    ) -> Result<Result<(), QueueFull>, S::Error> {
        let max = u64::try_from(limits.max_queue_depth).unwrap_or(u64::MAX);
        let mut full = Vec::new();
        for recipient in &self.order {
            let (adding, bytes) = self
                .counts
                .get(recipient)
                .map_or((0, 0), |(count, bytes, _)| (*count, *bytes));
            let usage = storage.queue_usage(recipient)?;
            if usage.messages.saturating_add(adding) > max
                || usage.bytes.saturating_add(bytes) > limits.max_queue_bytes
            {
                full.push(*recipient);
            }
        }
        if full.is_empty() {
            return Ok(Ok(()));
        }
        Ok(Err(QueueFull {
            recipients: full,
            max_depth: u32::try_from(limits.max_queue_depth).unwrap_or(u32::MAX),
            max_bytes: limits.max_queue_bytes,
        }))
    }
}
