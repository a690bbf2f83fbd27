//! MLS groups: create, join, add members, send and receive.
//!
//! [`GroupMember`] is a thin policy layer over openmls' `MlsGroup`. openmls
//! writes the group state to the provider's storage on every state change,
//! so a group survives restarts as long as the storage does;
//! [`GroupMember::load`] picks it up again. Everything here takes and returns
//! TLS-encoded `MlsMessage` bytes, ready for the delivery service.
//!
//! Our policy on top of openmls:
//! - every leaf's credential is a basic credential naming its Ed25519
//!   signature key (the device), alone or after its user key (checked on
//!   join, on every commit and proposal);
//! - a leaf whose device is not its user key must be in that user's
//!   current signed device list ([`DeviceDirectory`]): checked when adding,
//!   when joining and rejoining, and for every Add we receive, so nobody
//!   (the node included) can add a device to a user;
//! - a member may not change its user or device in an Update or commit path;
//! - only Add, Update, Remove and SelfRemove proposals are accepted (and the
//!   ExternalInit of a rejoin, below);
//! - our own commits stay pending until the caller merges them, so they are
//!   applied only once the delivery service has accepted them; each comes
//!   with the GroupInfo of the epoch it starts
//!   ([`GroupMember::pending_group_info`]), which the delivery service keeps
//!   for members who rejoin;
//! - a commit from a non-member (an external commit) is accepted only as a
//!   member's rejoin ([`GroupMember::rejoin`]): its new leaf has the identity
//!   of the one leaf it removes, and it adds nobody;
//! - handshake messages (commits, proposals) travel as MLS PublicMessages and
//!   only PublicMessages are accepted for them; application messages are
//!   always PrivateMessages.
//!
//! Why handshakes are not encrypted: the delivery service keeps each group's
//! public state (see [`GroupMember::export_public_state`]) and accepts a
//! commit only if it is valid for that state (RFC 9750's Delivery Service
//! validation). Otherwise any member, or anyone able to publish, could
//! freeze a group with a commit the other members cannot apply: it would win
//! its epoch at the node and nobody could move past it. The price is that the
//! node learns who is in each group (credentials, adds and removes); it still
//! learns nothing of application messages.

use std::collections::HashSet;
use std::fmt;

use openmls::framing::{ContentType, Sender};
use openmls::group::{
    MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig, MlsGroupStateError, NewGroupError,
    PURE_PLAINTEXT_WIRE_FORMAT_POLICY, ProcessMessageError, StagedCommit, StagedWelcome, ValidationError,
    WelcomeError,
};
use openmls::prelude::{
    CommitBuilder, CommitMessageBundle, GroupId, Initial, KeyPackageBundle, LeafNodeIndex, MlsMessageBodyIn,
    MlsMessageIn, MlsMessageOut, ProcessedMessageContent, Proposal, ProtocolMessage, RatchetTreeIn,
    SenderRatchetConfiguration, WireFormat,
    tls_codec::{DeserializeBytes as _, Serialize as _},
};
use openmls::storage::OpenMlsProvider;
use openmls_traits::storage::StorageProvider as _;

use crate::device_lists::{DeviceDirectory, check_devices};
use crate::error::CoreError;
use crate::identity::{IdentityKey, IdentityKeypair, MemberKey, checked_member, credential_member};
use crate::key_package::{leaf_member, validate_key_package};
use crate::sealed::{EpochKey, StateKey};
use crate::suite::Suite;

/// How many past epochs' message keys we keep, so application messages sent
/// just before a commit (but delivered after it) still decrypt. Small on
/// purpose: every retained epoch weakens forward secrecy.
const MAX_PAST_EPOCHS: usize = 5;

/// How many skipped messages per sender we keep keys for (reordering
/// within an epoch). Our delivery service is FIFO per recipient, so this only
/// covers messages lost or reordered by clients.
const OUT_OF_ORDER_TOLERANCE: u32 = 20;

/// How far ahead in a sender's ratchet we are willing to jump: bounds the
/// work an attacker-chosen generation can cause.
const MAX_FORWARD_DISTANCE: u32 = 1000;

/// One member's view of one MLS group.
pub struct GroupMember {
    group: MlsGroup,
    /// The GroupInfo (a TLS-encoded `MlsMessage`) of the epoch our pending
    /// commit starts, made with that commit. openmls does not store it, so
    /// it lives only here: see [`Self::pending_group_info`].
    pending_group_info: Option<Vec<u8>>,
    /// Whether the last Commit merged through this value took a device
    /// out of the group, so the group's [`StateKey`] is now the current
    /// epoch's: see [`Self::state_key_rotated`].
    state_key_rotated: bool,
}

/// The messages produced by [`GroupMember::add_members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedMembers {
    /// The Commit, a TLS-encoded `MlsMessage`, for the existing members.
    pub commit: Vec<u8>,
    /// The Welcome, a TLS-encoded `MlsMessage`, for all added members.
    pub welcome: Vec<u8>,
}

/// What [`GroupMember::rejoin`] made: the group, already in the new epoch,
/// and the messages for the delivery service.
#[derive(Debug)]
pub struct Rejoined {
    /// The group as we rejoined it, stored and at `epoch + 1`.
    pub group: GroupMember,
    /// The epoch the external Commit was made in (the GroupInfo's).
    pub epoch: u64,
    /// The external Commit, a TLS-encoded `MlsMessage` (a PublicMessage),
    /// for every other member.
    pub commit: Vec<u8>,
    /// The GroupInfo of the epoch the Commit starts, signed by us, without
    /// the ratchet tree extension, for the delivery service to serve.
    pub group_info: Vec<u8>,
}

/// A group's public state in one epoch: what every member may see and
/// nothing secret. A member exports it for the delivery service
/// ([`GroupMember::export_public_state`]), which checks the group's
/// commits from it ([`crate::PublicView`]) and hands it to members who
/// rejoin; the wire's `GroupState` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// The GroupInfo as a TLS-encoded `MlsMessage`, signed by a member,
    /// without the ratchet tree extension (the tree travels in
    /// `ratchet_tree`).
    pub group_info: Vec<u8>,
    /// The TLS-encoded ratchet tree: the data of a `ratchet_tree` extension.
    pub ratchet_tree: Vec<u8>,
}

/// What [`GroupMember::receive`] made of a message.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// An application message, decrypted and authenticated.
    Application {
        /// The member who sent it: its user and the device it sent from.
        sender: MemberKey,
        /// The decrypted content.
        plaintext: Vec<u8>,
    },
    /// Another member's commit, validated and merged: the group moved on to
    /// `epoch`. If we had a pending commit of our own, it was dropped (the
    /// delivery service cannot have accepted both).
    Commit {
        /// The new epoch.
        epoch: u64,
    },
    /// A commit that removed us, merged: the group is now inactive
    /// ([`GroupMember::is_active`] is false) and every further operation
    /// fails with [`CoreError::NotAMember`]. The caller may
    /// [`GroupMember::delete`] it.
    Removed {
        /// The epoch the remaining members moved to.
        epoch: u64,
    },
    /// A member who had lost its group state rejoined by external commit: its
    /// old leaf is gone, a fresh one took its place, and the group moved on
    /// to `epoch`.
    Rejoined {
        /// Who rejoined.
        member: IdentityKey,
        /// The new epoch.
        epoch: u64,
    },
    /// A standalone proposal, validated and stored. It takes effect with the
    /// next commit; until then [`GroupMember::send`] fails with
    /// [`CoreError::ProposalsPending`], and our next commit includes it.
    Proposal,
    /// A message we sent ourselves, fanned back by the delivery service.
    /// MLS senders cannot decrypt their own messages, so there is nothing to
    /// do.
    OwnMessage,
}

/// Where a queued message belongs, from its unencrypted framing.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A Welcome: pass it to [`GroupMember::join`].
    Welcome,
    /// A commit, proposal or application message for an existing group:
    /// pass it to that group's [`GroupMember::receive`].
    Group {
        /// The group it is for.
        group_id: Vec<u8>,
        /// The epoch it was sent in.
        epoch: u64,
        /// What it carries (visible in the clear in MLS framing).
        kind: MessageKind,
    },
}

/// The content type of a group message, from its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// An application message.
    Application,
    /// A proposal.
    Proposal,
    /// A Commit: moves the group to the next epoch.
    Commit,
}

impl GroupMember {
    /// Creates a new group with us as the only member, at epoch 0.
    ///
    /// Fails with [`CoreError::GroupExists`] if `provider`'s storage already
    /// holds a group with this id.
    pub fn create<P: OpenMlsProvider>(
        provider: &P,
        identity: &IdentityKeypair,
        group_id: &crate::GroupId,
    ) -> Result<Self, CoreError> {
        Self::create_with_suite(provider, identity, group_id, Suite::default())
    }

    /// [`Self::create`] in the given ciphersuite: members are added with
    /// KeyPackages of that suite only.
    pub fn create_with_suite<P: OpenMlsProvider>(
        provider: &P,
        identity: &IdentityKeypair,
        group_id: &crate::GroupId,
        suite: Suite,
    ) -> Result<Self, CoreError> {
        let group = MlsGroup::new_with_group_id(
            provider,
            identity,
            &create_config(suite),
            GroupId::from_slice(group_id.as_bytes()),
            identity.credential_with_key(),
        )
        .map_err(|e| match e {
            NewGroupError::GroupAlreadyExists => CoreError::GroupExists(hex::encode(group_id.as_bytes())),
            NewGroupError::StorageError(e) => CoreError::storage(e),
            e => CoreError::mls("creating the group")(e),
        })?;
        Ok(Self::wrap(group))
    }

    /// Loads a group from `provider`'s storage; `None` if there is none with
    /// this id.
    pub fn load<P: OpenMlsProvider>(
        provider: &P,
        group_id: &crate::GroupId,
    ) -> Result<Option<Self>, CoreError> {
        let group = MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id.as_bytes()))
            .map_err(CoreError::storage)?;
        Ok(group.map(Self::wrap))
    }

    /// Joins a group from a Welcome (a TLS-encoded `MlsMessage`).
    ///
    /// The Welcome must address one of the KeyPackages generated with this
    /// provider's storage; that KeyPackage's private keys are consumed (even
    /// if joining fails later on, except with
    /// [`CoreError::RatchetTreeNeeded`]), so a Welcome can be used only once.
    ///
    /// `ratchet_tree` (TLS-encoded) is the group's tree in the Welcome's
    /// epoch, as the delivery service keeps it; openmls checks it against
    /// the tree hash the Welcome's signed GroupInfo commits to, so a node
    /// cannot slip in another tree. A Welcome whose GroupInfo carries the
    /// tree itself needs none (and ignores this one). Without either, fails
    /// with [`CoreError::RatchetTreeNeeded`], naming the group and epoch
    /// whose tree to fetch, and leaves the KeyPackage in storage for the
    /// next try.
    ///
    /// A Welcome to a group we were removed from replaces its stored state
    /// (we are invited back); one to a group we are still in fails with
    /// [`CoreError::GroupExists`].
    pub fn join<P: OpenMlsProvider>(
        provider: &P,
        welcome: &[u8],
        ratchet_tree: Option<&[u8]>,
        directory: &impl DeviceDirectory,
    ) -> Result<Self, CoreError> {
        Self::join_if(provider, welcome, ratchet_tree, directory, |_| true)
    }

    /// [`Self::join`], if `consent` agrees to join from the Welcome's
    /// sender (the member that signed its GroupInfo), told once the Welcome
    /// is fully checked; otherwise nothing is joined, the KeyPackage stays,
    /// and the answer is [`CoreError::Invitation`], for the caller to keep
    /// and join later (with consent). Refuses a group id longer than any
    /// node takes ([`crate::GroupId::MAX_LEN`]).
    pub fn join_if<P: OpenMlsProvider>(
        provider: &P,
        welcome: &[u8],
        ratchet_tree: Option<&[u8]>,
        directory: &impl DeviceDirectory,
        consent: impl FnOnce(&MemberKey) -> bool,
    ) -> Result<Self, CoreError> {
        let message = decode(welcome)?;
        let wire_format = message.wire_format();
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(CoreError::UnexpectedMessage {
                expected: "a Welcome",
                got: format!("{wire_format:?}"),
            });
        };

        // openmls deletes the KeyPackage it joins with (unless it is a last
        // resort) as soon as it has decrypted the Welcome, before it needs
        // the tree; keep it to put back if we must come again with the tree.
        let addressed = welcome.secrets().iter().find_map(|secret| {
            let reference = secret.new_member();
            provider
                .storage()
                .key_package::<_, KeyPackageBundle>(&reference)
                .ok()
                .flatten()
                .map(|bundle| (reference, bundle))
        });
        let mut builder = StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
            .map_err(welcome_error(None))?;
        let info = builder.processed_welcome().unverified_group_info();
        let group_id = info.group_id().as_slice().to_vec();
        if group_id.is_empty() || group_id.len() > crate::GroupId::MAX_LEN {
            return Err(CoreError::MalformedMessage(format!(
                "the Welcome's group id has {} bytes; groups have 1 to {}",
                group_id.len(),
                crate::GroupId::MAX_LEN
            )));
        }
        if info.extensions().ratchet_tree().is_none() {
            let Some(tree) = ratchet_tree else {
                if let Some((reference, bundle)) = addressed {
                    provider
                        .storage()
                        .write_key_package(&reference, &bundle)
                        .map_err(CoreError::storage)?;
                }
                let epoch_key = epoch_key_of(|label, length| {
                    builder
                        .processed_welcome()
                        .export_secret(provider.crypto(), label, &[], length)
                })?;
                return Err(CoreError::RatchetTreeNeeded {
                    epoch: info.epoch().as_u64(),
                    group_id,
                    epoch_key,
                });
            };
            let tree = RatchetTreeIn::tls_deserialize_exact_bytes(tree)
                .map_err(|e| CoreError::MalformedMessage(format!("ratchet tree: {e}")))?;
            builder = builder.with_ratchet_tree(tree);
        }
        // A group we were removed from and are invited to again: the new
        // Welcome replaces the dead state (deleted first, so nothing of the
        // old epochs survives under keys the new state does not write). A
        // group we are still in stays, and the Welcome is refused.
        if let Some(mut old) =
            MlsGroup::load(provider.storage(), &GroupId::from_slice(&group_id)).map_err(CoreError::storage)?
        {
            if old.is_active() {
                return Err(CoreError::GroupExists(hex::encode(&group_id)));
            }
            old.delete(provider.storage()).map_err(CoreError::storage)?;
            builder = builder.replace_old_group();
        }
        // The adder validated each KeyPackage (lifetime included) when it
        // committed the Add. Re-checking the lifetimes of untouched leaves
        // here would lock newcomers out of any group where some member has
        // not committed for longer than a KeyPackage lifetime (12 weeks).
        let staged = builder
            .skip_lifetime_validation()
            .build()
            .map_err(welcome_error(Some(&group_id)))?;

        let members = staged
            .members()
            .map(|member| checked_member(&member.credential, &member.signature_key))
            .collect::<Result<Vec<_>, _>>()?;
        // As for a missing tree: the caller may come again (once it has
        // the lists, or consents), and needs the KeyPackage then.
        let keep_key_package = || -> Result<(), CoreError> {
            if let Some((reference, bundle)) = &addressed {
                provider
                    .storage()
                    .write_key_package(reference, bundle)
                    .map_err(CoreError::storage)?;
            }
            Ok(())
        };
        if let Err(e) = check_devices(directory, &members) {
            keep_key_package()?;
            return Err(e);
        }
        let inviter = staged
            .welcome_sender()
            .ok()
            .and_then(|leaf| checked_member(leaf.credential(), leaf.signature_key().as_slice()).ok())
            .ok_or_else(|| CoreError::MalformedMessage("the Welcome's sender has no valid leaf".into()))?;
        if !consent(&inviter) {
            keep_key_package()?;
            return Err(CoreError::Invitation {
                group_id,
                epoch: staged.group_context().epoch().as_u64(),
                inviter,
                members: crate::identity::user_count(&members),
            });
        }

        let group = staged
            .into_group(provider)
            .map_err(welcome_error(Some(&group_id)))?;
        Ok(Self::wrap(group))
    }

    /// Rejoins a group we are a member of but whose state we lost (e.g. a
    /// restored backup), by external commit, from the group's current
    /// `group_info` (a TLS-encoded `MlsMessage`, as the delivery service
    /// serves it) and `ratchet_tree` (TLS-encoded; ignored if the GroupInfo
    /// carries the tree itself).
    ///
    /// The commit removes our old leaf (the one with our identity) and puts
    /// a fresh one in its place; other members accept exactly that from a
    /// non-member (see the module docs). Unlike our other commits, openmls
    /// merges it at once: the group is stored in the new epoch. If the
    /// delivery service does not take the commit, [`Self::delete`] the group
    /// again (or run this in a storage transaction and roll it back).
    ///
    /// Any state of this group already in storage is replaced: it is what
    /// the rejoin repairs. Fails with [`CoreError::UpToDate`] instead if that
    /// state is in the GroupInfo's epoch with the same group context (there
    /// is nothing to repair), with [`CoreError::NotAMember`] if no leaf of
    /// the tree has our identity, and with [`CoreError::WrongGroup`] if the
    /// GroupInfo is for another group than `group_id`.
    pub fn rejoin<P: OpenMlsProvider>(
        provider: &P,
        identity: &IdentityKeypair,
        group_id: &crate::GroupId,
        group_info: &[u8],
        ratchet_tree: &[u8],
        directory: &impl DeviceDirectory,
    ) -> Result<Rejoined, CoreError> {
        let message = decode(group_info)?;
        let wire_format = message.wire_format();
        let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
            return Err(CoreError::UnexpectedMessage {
                expected: "a GroupInfo",
                got: format!("{wire_format:?}"),
            });
        };
        if group_info.group_id().as_slice() != group_id.as_bytes() {
            return Err(CoreError::WrongGroup {
                group: hex::encode(group_id.as_bytes()),
                message_group: hex::encode(group_info.group_id().as_slice()),
            });
        }
        let tree = RatchetTreeIn::tls_deserialize_exact_bytes(ratchet_tree)
            .map_err(|e| CoreError::MalformedMessage(format!("ratchet tree: {e}")))?;
        let before = {
            // The tree openmls will use. Its signatures are checked while
            // building; our identity rules and our own membership are
            // checked here, before anything is written.
            let used = group_info
                .extensions()
                .ratchet_tree()
                .map_or(&tree, |extension| extension.ratchet_tree());
            let me = identity.public_key();
            let members = used
                .leaves()
                .map(|leaf| checked_member(leaf.credential(), leaf.signature_key().as_slice()))
                .collect::<Result<Vec<_>, _>>()?;
            if !members.iter().any(|member| member.device == me) {
                return Err(CoreError::NotAMember);
            }
            check_devices(directory, &members)?;
            members.iter().map(|member| member.device).collect::<Vec<_>>()
        };

        let mls_group_id = GroupId::from_slice(group_id.as_bytes());
        let epoch = group_info.epoch().as_u64();
        if let Some(mut stale) =
            MlsGroup::load(provider.storage(), &mls_group_id).map_err(CoreError::storage)?
        {
            if stale.is_active() && stale.public_group().group_context() == group_info.group_context() {
                return Err(CoreError::UpToDate { epoch });
            }
            // openmls would write the new state over the old one key by
            // key; whatever the new state has no key for (past epochs'
            // secrets, leftover proposals) must not survive.
            stale.delete(provider.storage()).map_err(CoreError::storage)?;
        }

        let operation = "rejoining the group";
        let (group, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(tree)
            .with_config(join_config())
            // As in `join`: leaves that never updated keep their KeyPackage
            // lifetime, which must not lock a member out of its own group.
            .skip_lifetime_validation()
            .build_group(provider, group_info, identity.credential_with_key())
            .map_err(CoreError::mls(operation))?
            .load_psks(provider.storage())
            .map_err(CoreError::mls(operation))?
            // The delivery service serves the tree on its own.
            .create_group_info(true)
            .use_ratchet_tree_extension(false)
            .build(provider.rand(), provider.crypto(), identity, |_| true)
            .map_err(CoreError::mls(operation))?
            .finalize(provider)
            .map_err(CoreError::mls(operation))?;
        let mut group = Self::wrap(group);
        // A rejoin that covers another member's request to leave takes
        // that device out: the group's state key moves on.
        group.state_key_rotated = lost_a_device(&before, &group.members());
        let encoded = encode(bundle.commit()).and_then(|commit| Ok((commit, encode_group_info(&bundle)?)));
        match encoded {
            Ok((commit, group_info)) => Ok(Rejoined {
                group,
                epoch,
                commit,
                group_info,
            }),
            Err(e) => {
                // Nobody can ever see this commit; don't keep its state.
                group
                    .group
                    .delete(provider.storage())
                    .map_err(CoreError::storage)?;
                Err(e)
            }
        }
    }

    fn wrap(group: MlsGroup) -> Self {
        Self {
            group,
            pending_group_info: None,
            state_key_rotated: false,
        }
    }

    /// The group id: 1 to [`crate::GroupId::MAX_LEN`] bytes, as every way
    /// into a group (create, join, rejoin) requires.
    pub fn group_id(&self) -> crate::GroupId {
        crate::GroupId::admitted(self.group.group_id().as_slice().to_vec())
    }

    /// The group's ciphersuite (a group stored by this crate is always in
    /// one of ours).
    pub fn suite(&self) -> Suite {
        Suite::from_ciphersuite(self.group.ciphersuite()).unwrap_or_default()
    }

    /// The current epoch (0 at creation, +1 per merged commit).
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// The identities of all members, ourselves included, in tree order.
    pub fn members(&self) -> Vec<IdentityKey> {
        // Every leaf passed `leaf_identity` when it entered our view of the
        // tree (join, commit, own creation), so no member is skipped here.
        self.group
            .members()
            .filter_map(|member| IdentityKey::try_from(member.signature_key.as_slice()).ok())
            .collect()
    }

    /// Every member's user and device, ourselves included, in tree order.
    pub fn member_keys(&self) -> Vec<MemberKey> {
        // As in `members`: every leaf passed our credential rule.
        self.group
            .members()
            .filter_map(|member| checked_member(&member.credential, &member.signature_key).ok())
            .collect()
    }

    /// Whether ours is the lowest leaf of the group but `device`'s: the
    /// one member who acts towards `device` for the group (tells a member
    /// who rejoined the group's name, say), so it is done once rather than
    /// by everyone. False once we have been removed.
    pub fn first_besides(&self, device: &IdentityKey) -> bool {
        if !self.group.is_active() {
            return false;
        }
        let first = self
            .group
            .members()
            .filter(|member| member.signature_key != device.as_bytes())
            .map(|member| member.index.u32())
            .min();
        first == Some(self.group.own_leaf_index().u32())
    }

    /// How many users are members (ourselves included); each of their
    /// devices is a leaf of its own.
    pub fn user_count(&self) -> usize {
        crate::identity::user_count(&self.member_keys())
    }

    /// Our own identity in this group; `None` once we have been removed.
    pub fn own_identity(&self) -> Option<IdentityKey> {
        if !self.group.is_active() {
            return None;
        }
        self.group
            .own_leaf_node()
            .and_then(|leaf| IdentityKey::try_from(leaf.signature_key().as_slice()).ok())
    }

    /// Our leaf's HPKE encryption key (public, TLS-encoded), which path
    /// secrets are encrypted to; `None` once we have been removed.
    pub fn own_leaf_key(&self) -> Option<Vec<u8>> {
        if !self.group.is_active() {
            return None;
        }
        self.group
            .own_leaf_node()
            .and_then(|leaf| leaf.encryption_key().tls_serialize_detached().ok())
    }

    /// False once a commit removed us from the group.
    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    /// Whether a commit of ours awaits [`Self::merge_pending_commit`] or
    /// [`Self::discard_pending_commit`].
    pub fn has_pending_commit(&self) -> bool {
        self.group.pending_commit().is_some()
    }

    /// The underlying openmls group, for anything not wrapped here.
    pub fn mls_group(&self) -> &MlsGroup {
        &self.group
    }

    /// Exports the group's public state in the current epoch: a GroupInfo
    /// signed with `identity` and the ratchet tree, for the delivery service
    /// to check this epoch's commit and every later one against.
    ///
    /// A pending commit of ours does not change it (the group is still in
    /// the epoch the commit was made in), so the state can be exported again
    /// when resending that commit.
    pub fn export_public_state<P: OpenMlsProvider>(
        &self,
        provider: &P,
        identity: &IdentityKeypair,
    ) -> Result<GroupState, CoreError> {
        self.ensure_active()?;
        // Without the tree: the node gets it separately, and a GroupInfo
        // carrying it would be sent (and stored) twice.
        let group_info = self
            .group
            .export_group_info(provider.crypto(), identity, false)
            .map_err(CoreError::mls("exporting the GroupInfo"))?;
        let ratchet_tree = self.ratchet_tree()?;
        Ok(GroupState {
            group_info: encode(&group_info)?,
            ratchet_tree,
        })
    }

    /// The group's ratchet tree in the current epoch, TLS-encoded (the data
    /// of a `ratchet_tree` extension): what a joiner of this epoch needs
    /// with its Welcome.
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, CoreError> {
        self.group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .map_err(CoreError::mls("encoding the ratchet tree"))
    }

    /// The [`EpochKey`] of the group's current epoch.
    pub fn epoch_key<P: OpenMlsProvider>(&self, provider: &P) -> Result<EpochKey, CoreError> {
        epoch_key_of(|label, length| self.group.export_secret(provider.crypto(), label, &[], length))
    }

    /// The [`EpochKey`] of the epoch our pending commit starts: the node
    /// seals the tree it keeps for the commit's joiners under it.
    pub fn pending_epoch_key<P: OpenMlsProvider>(&self, provider: &P) -> Result<EpochKey, CoreError> {
        let pending = self.group.pending_commit().ok_or(CoreError::NoPendingCommit)?;
        epoch_key_of(|label, length| pending.export_secret(provider.crypto(), label, &[], length))
    }

    /// The [`StateKey`] a group would take in its current epoch: the group's
    /// state key at creation, after a Commit that took a device out
    /// ([`Self::state_key_rotated`]), and for a group whose key was never
    /// kept (all members of one epoch compute the same).
    pub fn current_state_key<P: OpenMlsProvider>(&self, provider: &P) -> Result<StateKey, CoreError> {
        key_of(crate::sealed::STATE_KEY_LABEL, |label, length| {
            self.group.export_secret(provider.crypto(), label, &[], length)
        })
        .map(|bytes| StateKey::from_bytes(*bytes.as_bytes()))
    }

    /// The [`StateKey`] of the epoch our pending commit starts, if that
    /// commit takes a device out of the group ([`Self::pending_commit_rotates`]):
    /// it goes to the node with the commit, which keeps the group's state
    /// under it from then on.
    pub fn pending_state_key<P: OpenMlsProvider>(&self, provider: &P) -> Result<Option<StateKey>, CoreError> {
        if !self.pending_commit_rotates()? {
            return Ok(None);
        }
        let pending = self.group.pending_commit().ok_or(CoreError::NoPendingCommit)?;
        key_of(crate::sealed::STATE_KEY_LABEL, |label, length| {
            pending.export_secret(provider.crypto(), label, &[], length)
        })
        .map(|bytes| Some(StateKey::from_bytes(*bytes.as_bytes())))
    }

    /// Whether our pending commit takes a device out of the group: it
    /// removes (or covers the self-removal of) a leaf whose device it does
    /// not add again. Such a commit rotates the group's [`StateKey`].
    pub fn pending_commit_rotates(&self) -> Result<bool, CoreError> {
        let pending = self.group.pending_commit().ok_or(CoreError::NoPendingCommit)?;
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for queued in pending.queued_proposals() {
            match queued.proposal() {
                Proposal::Remove(remove) => removed.push(self.identity_at(remove.removed())?),
                Proposal::SelfRemove => {
                    if let Sender::Member(index) = queued.sender() {
                        removed.push(self.identity_at(*index)?);
                    }
                }
                Proposal::Add(add) => {
                    let leaf = add.key_package().leaf_node();
                    added.push(checked_member(leaf.credential(), leaf.signature_key().as_slice())?.device);
                }
                _ => {}
            }
        }
        Ok(removed.iter().any(|device| !added.contains(device)))
    }

    /// Whether the last Commit merged through this value (ours, another
    /// member's, or our rejoin) took a device out of the group: the
    /// group's [`StateKey`] is then [`Self::current_state_key`], and a
    /// member keeps it in place of the one before.
    pub fn state_key_rotated(&self) -> bool {
        self.state_key_rotated
    }

    /// The ratchet tree of the epoch our pending commit starts, TLS-encoded:
    /// what its joiners need if they cannot get it from the delivery service
    /// (which computes the same tree when it accepts the commit).
    pub fn pending_ratchet_tree<P: OpenMlsProvider>(&self, provider: &P) -> Result<Vec<u8>, CoreError> {
        let pending = self.group.pending_commit().ok_or(CoreError::NoPendingCommit)?;
        pending
            .export_ratchet_tree(provider.crypto(), self.group.export_ratchet_tree())
            .map_err(CoreError::mls("building the pending ratchet tree"))?
            .ok_or_else(|| CoreError::Mls {
                operation: "building the pending ratchet tree",
                detail: "the pending commit has no tree of its own".into(),
            })?
            .tls_serialize_detached()
            .map_err(CoreError::mls("encoding the ratchet tree"))
    }

    /// Adds everyone whose KeyPackage is given, in one commit.
    ///
    /// Each KeyPackage is validated as in [`crate::key_package_identity`] and
    /// must belong to someone not yet in the group. The commit is left
    /// pending: send both messages to the delivery service, then call
    /// [`Self::merge_pending_commit`] if it accepted them, or
    /// [`Self::discard_pending_commit`] if not.
    pub fn add_members<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
        key_packages: &[Vec<u8>],
        directory: &impl DeviceDirectory,
    ) -> Result<AddedMembers, CoreError> {
        self.ensure_can_commit()?;
        if key_packages.is_empty() {
            return Err(CoreError::NoKeyPackages);
        }

        let mut seen: HashSet<IdentityKey> = self.members().into_iter().collect();
        let mut validated = Vec::with_capacity(key_packages.len());
        let mut joiners = Vec::with_capacity(key_packages.len());
        for bytes in key_packages {
            let (key_package, joiner) = validate_key_package(provider.crypto(), bytes)?;
            if key_package.ciphersuite() != self.group.ciphersuite() {
                return Err(CoreError::WrongSuite {
                    group: self.suite().name(),
                    key_package: Suite::from_ciphersuite(key_package.ciphersuite())
                        .map_or("another suite", Suite::name),
                });
            }
            if !seen.insert(joiner.device) {
                return Err(CoreError::AlreadyMember(joiner.device.to_string()));
            }
            validated.push(key_package);
            joiners.push(joiner);
        }
        check_devices(directory, &joiners)?;

        let (commit, welcome) = self.stage_commit(provider, identity, "adding members", true, |builder| {
            // As openmls' own `add_members`: fresh keys for us as well.
            builder.propose_adds(validated).force_self_update(true)
        })?;
        match welcome {
            Some(welcome) => Ok(AddedMembers { commit, welcome }),
            None => {
                self.discard_pending_commit(provider)?;
                Err(CoreError::Mls {
                    operation: "adding members",
                    detail: "the commit came without a Welcome".into(),
                })
            }
        }
    }

    /// Removes the given members in one commit, returned as a TLS-encoded
    /// `MlsMessage` for the delivery service. Like [`Self::add_members`],
    /// the commit is left pending.
    pub fn remove_members<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
        members: &[IdentityKey],
    ) -> Result<Vec<u8>, CoreError> {
        self.ensure_can_commit()?;
        let indices = members
            .iter()
            .map(|member| {
                self.leaf_index_of(member)
                    .ok_or_else(|| CoreError::UnknownMember(member.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (commit, _) = self.stage_commit(provider, identity, "removing members", false, |builder| {
            builder.propose_removals(indices)
        })?;
        Ok(commit)
    }

    /// Commits fresh leaf keys for ourselves (post-compromise security): after
    /// the commit is merged, secrets an attacker may have stolen from us no
    /// longer protect new messages. Includes any pending proposals. Like
    /// [`Self::add_members`], the commit is left pending.
    pub fn self_update<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
    ) -> Result<Vec<u8>, CoreError> {
        self.ensure_can_commit()?;
        // A commit without proposals always has an update path: our fresh
        // leaf. Pending proposals are included (the builder's default).
        let (commit, _) =
            self.stage_commit(provider, identity, "updating our leaf", false, |builder| builder)?;
        Ok(commit)
    }

    /// Asks the group to remove us: returns a Remove proposal (a TLS-encoded
    /// `MlsMessage` carrying a PublicMessage, so the delivery service can
    /// check it) for the other members. MLS does not let a member commit
    /// its own removal, so one of the others commits it (see
    /// [`Self::should_commit_pending_proposals`]); until then we are still a
    /// member and can read.
    pub fn leave<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
    ) -> Result<Vec<u8>, CoreError> {
        self.ensure_can_commit()?;
        let proposal = self
            .group
            .leave_group(provider, identity)
            .map_err(CoreError::mls("leaving the group"))?;
        encode(&proposal)
    }

    /// Takes back the proposals we made ourselves in this epoch (e.g. a
    /// [`Self::leave`] the delivery service refused): they are removed from
    /// the group's pending proposals, so nothing of ours waits for a commit
    /// and [`Self::send`] works again unless others' proposals are pending.
    ///
    /// Only for proposals the delivery service did not take: a commit that
    /// references one of them could no longer be processed. Returns how many
    /// were withdrawn.
    pub fn withdraw_own_proposals<P: OpenMlsProvider>(&mut self, provider: &P) -> Result<usize, CoreError> {
        self.ensure_active()?;
        let own = Sender::Member(self.group.own_leaf_index());
        let ours: Vec<_> = self
            .group
            .pending_proposals()
            .filter(|queued| *queued.sender() == own)
            .map(|queued| queued.proposal_reference_ref().clone())
            .collect();
        for reference in &ours {
            self.group
                .remove_pending_proposal(provider.storage(), reference)
                .map_err(CoreError::mls("withdrawing our proposal"))?;
        }
        Ok(ours.len())
    }

    /// Whether proposals from other members are waiting for a commit.
    pub fn has_pending_proposals(&self) -> bool {
        self.group.has_pending_proposals()
    }

    /// Whether we are the member who should commit the pending proposals:
    /// the one with the lowest leaf index among those the proposals do not
    /// remove. One deterministic choice keeps members from committing the same
    /// proposals at the same time.
    pub fn should_commit_pending_proposals(&self) -> bool {
        if !self.group.is_active() || !self.group.has_pending_proposals() || self.has_pending_commit() {
            return false;
        }
        let removed: HashSet<LeafNodeIndex> = self
            .group
            .pending_proposals()
            .filter_map(|queued| match queued.proposal() {
                Proposal::Remove(remove) => Some(remove.removed()),
                _ => None,
            })
            .collect();
        let committer = self
            .group
            .members()
            .map(|member| member.index)
            .filter(|index| !removed.contains(index))
            .min();
        committer == Some(self.group.own_leaf_index())
    }

    /// Commits every pending proposal (e.g. a member's request to leave).
    /// Like [`Self::add_members`], the commit is left pending.
    pub fn commit_pending_proposals<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
    ) -> Result<Vec<u8>, CoreError> {
        self.ensure_can_commit()?;
        let (commit, _) = self.stage_commit(
            provider,
            identity,
            "committing pending proposals",
            false,
            |builder| builder.consume_proposal_store(true),
        )?;
        Ok(commit)
    }

    /// The GroupInfo of the epoch our pending commit starts (a TLS-encoded
    /// `MlsMessage`, signed by us), made with the commit, for the delivery
    /// service to check and serve to members who rejoin. It never carries
    /// the ratchet tree: the delivery service has it.
    ///
    /// Only the `GroupMember` that made the commit has it: openmls does not
    /// store it, so a group loaded again has none. Save it with the commit
    /// if it may be sent again later.
    pub fn pending_group_info(&self) -> Option<&[u8]> {
        self.pending_group_info.as_deref()
    }

    /// Builds a commit with the proposals `propose` adds, leaves it pending
    /// and keeps the GroupInfo of the epoch it starts; returns the Commit
    /// and, with `welcome`, the Welcome (TLS-encoded `MlsMessage`s).
    fn stage_commit<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
        operation: &'static str,
        welcome: bool,
        propose: impl for<'a> FnOnce(CommitBuilder<'a, Initial>) -> CommitBuilder<'a, Initial>,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), CoreError> {
        let bundle = propose(self.group.commit_builder())
            .load_psks(provider.storage())
            .map_err(CoreError::mls(operation))?
            .create_group_info(true)
            // Neither the Welcome nor the GroupInfo carries the tree: the
            // delivery service keeps it and serves it to joiners (and to
            // members who rejoin), so a Welcome stays small whatever the
            // group's size (the tree is ~350 B per member).
            .use_ratchet_tree_extension(false)
            .build(provider.rand(), provider.crypto(), identity, |_| true)
            .map_err(CoreError::mls(operation))?
            .stage_commit(provider)
            .map_err(CoreError::mls(operation))?;
        let encoded = (|| {
            let commit = encode(bundle.commit())?;
            let welcome = match bundle.to_welcome_msg() {
                Some(message) if welcome => Some(encode(&message)?),
                _ => None,
            };
            Ok((commit, welcome, encode_group_info(&bundle)?))
        })();
        match encoded {
            Ok((commit, welcome, group_info)) => {
                self.pending_group_info = Some(group_info);
                Ok((commit, welcome))
            }
            Err(e) => {
                // Nobody can ever see this commit; don't leave it pending.
                self.discard_pending_commit(provider)?;
                Err(e)
            }
        }
    }

    /// Applies our pending commit: the group moves to the next epoch.
    pub fn merge_pending_commit<P: OpenMlsProvider>(&mut self, provider: &P) -> Result<(), CoreError> {
        self.ensure_active()?;
        if !self.has_pending_commit() {
            return Err(CoreError::NoPendingCommit);
        }
        let rotates = self.pending_commit_rotates()?;
        self.group
            .merge_pending_commit(provider)
            .map_err(CoreError::mls("merging our commit"))?;
        self.pending_group_info = None;
        self.state_key_rotated = rotates;
        Ok(())
    }

    /// Throws our pending commit away; the group stays in its current epoch
    /// as if the commit had never been created. Does nothing if there is no
    /// pending commit.
    pub fn discard_pending_commit<P: OpenMlsProvider>(&mut self, provider: &P) -> Result<(), CoreError> {
        self.group
            .clear_pending_commit(provider.storage())
            .map_err(CoreError::storage)?;
        self.pending_group_info = None;
        Ok(())
    }

    /// Encrypts an application message for the group, returned as a
    /// TLS-encoded `MlsMessage` (a PrivateMessage).
    ///
    /// Allowed while a commit of ours is pending: the message is in the
    /// current epoch, which the other members are still in.
    pub fn send<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        identity: &IdentityKeypair,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CoreError> {
        self.ensure_active()?;
        if self.group.has_pending_proposals() {
            return Err(CoreError::ProposalsPending);
        }
        let message = self
            .group
            .create_message(provider, identity, plaintext)
            .map_err(CoreError::mls("encrypting a message"))?;
        encode(&message)
    }

    /// Processes a TLS-encoded `MlsMessage` for this group.
    ///
    /// Commits and proposals must be PublicMessages (what the delivery
    /// service checked); application messages are PrivateMessages.
    /// Commits from other members are validated against our policy and
    /// merged right away. On error nothing was applied (the group stays in
    /// its epoch), so the caller can drop the message and carry on.
    pub fn receive<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        message: &[u8],
        directory: &impl DeviceDirectory,
    ) -> Result<Received, CoreError> {
        self.ensure_active()?;
        let message = into_protocol_message(decode(message)?, "a group message")?;

        if message.group_id() != self.group.group_id() {
            return Err(CoreError::WrongGroup {
                group: hex::encode(self.group.group_id().as_slice()),
                message_group: hex::encode(message.group_id().as_slice()),
            });
        }
        let message_epoch = message.epoch().as_u64();
        let group_epoch = self.epoch();
        if message_epoch > group_epoch {
            return Err(CoreError::FutureEpoch {
                message_epoch,
                group_epoch,
            });
        }
        let past_epoch = CoreError::PastEpoch {
            message_epoch,
            group_epoch,
        };
        // Handshake messages are only valid in the epoch they were made for.
        if message_epoch < group_epoch && message.is_handshake_message() {
            return Err(past_epoch);
        }

        // A Commit of our epoch that fails to process is one the others
        // applied: told apart, so the caller can resync instead of staying
        // behind for good. Only a PublicMessage Commit counts: that is what
        // the delivery service checks and orders, and it refuses every
        // other handshake, so a Commit in a PrivateMessage was ordered by
        // nobody and is simply refused (our wire format policy).
        let ordered_commit = message.content_type() == ContentType::Commit
            && message.wire_format() == WireFormat::PublicMessage;
        // Taken before processing borrows the group; nothing is copied for
        // application messages, the common case.
        let commit_from = ordered_commit.then(|| {
            (
                self.group.group_id().as_slice().to_vec(),
                self.committer(&message),
            )
        });
        let broken = |reason: String| match commit_from {
            Some((group_id, committer)) => CoreError::BrokenCommit {
                group_id,
                epoch: message_epoch,
                committer,
                reason,
            },
            None => CoreError::mls("processing a message")(reason),
        };
        let processed = self
            .group
            .process_message(provider, message)
            .map_err(|e| match e {
                ProcessMessageError::ValidationError(
                    ValidationError::NoPastEpochData | ValidationError::WrongEpoch,
                ) => past_epoch,
                ProcessMessageError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
                    CoreError::NotAMember
                }
                ProcessMessageError::StorageError(e) => CoreError::storage(e),
                e => broken(e.to_string()),
            })?;

        let sender = processed.sender().clone();
        let credential = processed.credential().clone();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(message) => Ok(Received::Application {
                // openmls matched the credential to the sending leaf of the
                // message's epoch, and every leaf passed our checks.
                sender: credential_member(&credential)?,
                plaintext: message.into_bytes(),
            }),
            ProcessedMessageContent::ProposalMessage(queued) => {
                self.check_proposal(queued.sender(), queued.proposal(), directory)?;
                self.group
                    .store_pending_proposal(provider.storage(), *queued)
                    .map_err(CoreError::storage)?;
                Ok(Received::Proposal)
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let rejoined = self.check_commit(&sender, &staged, directory)?;
                let removed = staged.self_removed();
                let before = self.members();
                self.group
                    .merge_staged_commit(provider, *staged)
                    .map_err(CoreError::mls("merging a commit"))?;
                // Merging another's commit dropped any pending one of ours.
                self.pending_group_info = None;
                self.state_key_rotated = !removed && lost_a_device(&before, &self.members());
                let epoch = self.epoch();
                Ok(match rejoined {
                    _ if removed => Received::Removed { epoch },
                    Some(member) => Received::Rejoined { member, epoch },
                    None => Received::Commit { epoch },
                })
            }
            ProcessedMessageContent::OwnPrivateMessage | ProcessedMessageContent::OwnPendingCommit => {
                Ok(Received::OwnMessage)
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(CoreError::Rejected {
                what: "proposal",
                reason: "external join proposals are not supported".into(),
            }),
            // Variants behind openmls draft features, in case another crate
            // in the build enables them.
            #[allow(unreachable_patterns)]
            _ => Err(CoreError::Rejected {
                what: "message",
                reason: "content type not supported".into(),
            }),
        }
    }

    /// The device key of the member whose leaf sent `message`, for a
    /// PublicMessage from a member.
    fn committer(&self, message: &ProtocolMessage) -> Option<IdentityKey> {
        let ProtocolMessage::PublicMessage(public) = message else {
            return None;
        };
        let Sender::Member(index) = public.sender() else {
            return None;
        };
        let member = self.group.member_at(*index)?;
        IdentityKey::try_from(member.signature_key.as_slice()).ok()
    }

    /// Deletes this group's state from `provider`'s storage, e.g. after we
    /// were removed.
    pub fn delete<P: OpenMlsProvider>(mut self, provider: &P) -> Result<(), CoreError> {
        self.group.delete(provider.storage()).map_err(CoreError::storage)
    }

    fn ensure_active(&self) -> Result<(), CoreError> {
        if self.group.is_active() {
            Ok(())
        } else {
            Err(CoreError::NotAMember)
        }
    }

    fn ensure_can_commit(&self) -> Result<(), CoreError> {
        self.ensure_active()?;
        if self.has_pending_commit() {
            return Err(CoreError::CommitPending);
        }
        Ok(())
    }

    fn leaf_index_of(&self, identity: &IdentityKey) -> Option<LeafNodeIndex> {
        self.group
            .members()
            .find(|member| member.signature_key == identity.as_bytes())
            .map(|member| member.index)
    }

    fn identity_at(&self, index: LeafNodeIndex) -> Result<IdentityKey, CoreError> {
        self.member_at(index).map(|member| member.device)
    }

    fn member_at(&self, index: LeafNodeIndex) -> Result<MemberKey, CoreError> {
        let member = self
            .group
            .member_at(index)
            .ok_or_else(|| CoreError::InvalidCredential(format!("no member at leaf {}", index.u32())))?;
        checked_member(&member.credential, &member.signature_key)
    }

    /// Our policy for another member's commit, checked before merging.
    /// Returns who rejoined, for a member's rejoin.
    fn check_commit(
        &self,
        sender: &Sender,
        staged: &StagedCommit,
        directory: &impl DeviceDirectory,
    ) -> Result<Option<IdentityKey>, CoreError> {
        for queued in staged.queued_proposals() {
            self.check_proposal(queued.sender(), queued.proposal(), directory)?;
        }
        let new = staged.update_path_leaf_node().map(leaf_member).transpose()?;
        match sender {
            Sender::Member(index) => match new {
                Some(new) if new != self.member_at(*index)? => Err(CoreError::Rejected {
                    what: "commit",
                    reason: "the committer changed its identity".into(),
                }),
                _ => Ok(None),
            },
            Sender::NewMemberCommit => {
                // openmls requires an external commit to have a path.
                let joiner = new
                    .ok_or_else(|| CoreError::Rejected {
                        what: "commit",
                        reason: "an external commit without a new leaf".into(),
                    })?
                    .device;
                self.check_rejoin(&joiner, staged)?;
                Ok(Some(joiner))
            }
            _ => Err(CoreError::Rejected {
                what: "commit",
                reason: "commits from non-members are not supported".into(),
            }),
        }
    }

    /// An external commit is accepted only as a member's rejoin (resync):
    /// it removes the one leaf with the joiner's identity and nobody else,
    /// and adds nobody. A stranger holding a GroupInfo gets nowhere, and
    /// the delivery service applies the same rule.
    fn check_rejoin(&self, joiner: &IdentityKey, staged: &StagedCommit) -> Result<(), CoreError> {
        let refuse = |reason: &str| CoreError::Rejected {
            what: "commit",
            reason: format!("an external commit is accepted only as a member's rejoin: {reason}"),
        };
        let mut removes_old_leaf = false;
        for queued in staged.queued_proposals() {
            match queued.proposal() {
                Proposal::ExternalInit(_) => {}
                Proposal::Remove(remove) => {
                    if self.identity_at(remove.removed())? != *joiner {
                        return Err(refuse("it removes another member"));
                    }
                    removes_old_leaf = true;
                }
                // Another member's stored request to leave, which an
                // external commit may cover (the delivery service allows
                // it too).
                Proposal::SelfRemove if matches!(queued.sender(), Sender::Member(_)) => {}
                other => {
                    return Err(refuse(&format!(
                        "it carries a {:?} proposal",
                        other.proposal_type()
                    )));
                }
            }
        }
        if removes_old_leaf {
            Ok(())
        } else {
            Err(refuse("it does not remove the joiner's old leaf"))
        }
    }

    /// Our policy for a proposal, standalone or inside a commit.
    fn check_proposal(
        &self,
        sender: &Sender,
        proposal: &Proposal,
        directory: &impl DeviceDirectory,
    ) -> Result<(), CoreError> {
        match proposal {
            Proposal::Add(add) => {
                let joiner = leaf_member(add.key_package().leaf_node())?;
                check_devices(directory, [&joiner])
            }
            Proposal::Update(update) => {
                let new = leaf_member(update.leaf_node())?;
                let Sender::Member(index) = sender else {
                    return Err(CoreError::Rejected {
                        what: "proposal",
                        reason: "update from a non-member".into(),
                    });
                };
                if new == self.member_at(*index)? {
                    Ok(())
                } else {
                    Err(CoreError::Rejected {
                        what: "proposal",
                        reason: "a member may not change its identity".into(),
                    })
                }
            }
            Proposal::Remove(_) | Proposal::SelfRemove => Ok(()),
            // Only an external commit carries one; `check_rejoin` decides.
            Proposal::ExternalInit(_) if *sender == Sender::NewMemberCommit => Ok(()),
            other => Err(CoreError::Rejected {
                what: "proposal",
                reason: format!("{:?} proposals are not supported", other.proposal_type()),
            }),
        }
    }
}

/// Short on purpose: openmls' own `Debug` dumps the whole tree.
impl fmt::Debug for GroupMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupMember")
            .field("group_id", &hex::encode(self.group.group_id().as_slice()))
            .field("epoch", &self.epoch())
            .field("members", &self.group.members().count())
            .field("active", &self.is_active())
            .field("pending_commit", &self.has_pending_commit())
            .finish()
    }
}

/// An [`EpochKey`] from an exporter of one epoch: `export(label, length)`.
fn epoch_key_of<E: std::fmt::Debug>(
    export: impl FnOnce(&str, usize) -> Result<Vec<u8>, E>,
) -> Result<EpochKey, CoreError> {
    key_of(crate::sealed::EPOCH_KEY_LABEL, export)
}

/// The 32-byte exporter secret with `label` of one epoch:
/// `export(label, length)`.
fn key_of<E: std::fmt::Debug>(
    label: &str,
    export: impl FnOnce(&str, usize) -> Result<Vec<u8>, E>,
) -> Result<EpochKey, CoreError> {
    let mut bytes = export(label, EpochKey::LEN).map_err(|e| CoreError::Mls {
        operation: "exporting a key",
        detail: format!("{e:?}"),
    })?;
    let key = EpochKey::from_slice(&bytes).ok_or_else(|| CoreError::Mls {
        operation: "exporting a key",
        detail: format!("{} bytes instead of {}", bytes.len(), EpochKey::LEN),
    });
    zeroize::Zeroize::zeroize(&mut bytes);
    key
}

/// Whether a device of `before` has no leaf in `after`.
fn lost_a_device(before: &[IdentityKey], after: &[IdentityKey]) -> bool {
    let after: std::collections::HashSet<&IdentityKey> = after.iter().collect();
    before.iter().any(|device| !after.contains(device))
}

/// Reads the routing information of a queued message without decrypting it.
///
/// Errors for anything but a Welcome or a group (Public/PrivateMessage)
/// message, including KeyPackages, GroupInfos and undecodable bytes.
pub fn classify(message: &[u8]) -> Result<Incoming, CoreError> {
    let message = decode(message)?;
    if message.wire_format() == WireFormat::Welcome {
        return Ok(Incoming::Welcome);
    }
    let message = into_protocol_message(message, "a Welcome or a group message")?;
    Ok(Incoming::Group {
        group_id: message.group_id().as_slice().to_vec(),
        epoch: message.epoch().as_u64(),
        kind: match message.content_type() {
            ContentType::Application => MessageKind::Application,
            ContentType::Proposal => MessageKind::Proposal,
            ContentType::Commit => MessageKind::Commit,
        },
    })
}

/// The configuration of groups we create.
fn create_config(suite: Suite) -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(suite.ciphersuite())
        // No ratchet tree in Welcomes or GroupInfos: the delivery service
        // keeps each group's tree and serves it to joiners, who check it
        // against the tree hash (a Welcome carrying the tree would grow by
        // ~350 B per member and stop at the node's payload limit).
        .use_ratchet_tree_extension(false)
        // Commits and proposals go out as PublicMessages and we accept no
        // others, so the delivery service can check every commit against the
        // group's public state before anyone applies it (a commit it could
        // not read might be one that members cannot apply, freezing the
        // group). The trade-off: the node sees who joins and leaves.
        // Application messages are encrypted whatever this policy says.
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
}

/// The configuration of groups we join: the same runtime settings, so a
/// joiner's own commits and Welcomes look like the creator's.
fn join_config() -> MlsGroupJoinConfig {
    // The join configuration holds no ciphersuite: a Welcome brings its own.
    create_config(Suite::default()).join_config().clone()
}

fn decode(bytes: &[u8]) -> Result<MlsMessageIn, CoreError> {
    MlsMessageIn::tls_deserialize_exact_bytes(bytes).map_err(|e| CoreError::MalformedMessage(e.to_string()))
}

fn encode(message: &MlsMessageOut) -> Result<Vec<u8>, CoreError> {
    message.to_bytes().map_err(CoreError::mls("encoding a message"))
}

/// The new epoch's GroupInfo of a commit built with `create_group_info`.
fn encode_group_info(bundle: &CommitMessageBundle) -> Result<Vec<u8>, CoreError> {
    let group_info = bundle.group_info().cloned().ok_or_else(|| CoreError::Mls {
        operation: "exporting the GroupInfo",
        detail: "the commit came without one".into(),
    })?;
    encode(&MlsMessageOut::from(group_info))
}

fn into_protocol_message(
    message: MlsMessageIn,
    expected: &'static str,
) -> Result<ProtocolMessage, CoreError> {
    let wire_format = message.wire_format();
    message
        .try_into_protocol_message()
        .map_err(|_| CoreError::UnexpectedMessage {
            expected,
            got: format!("{wire_format:?}"),
        })
}

/// Maps join errors, naming the group where it is already known.
fn welcome_error<E: fmt::Display>(group_id: Option<&[u8]>) -> impl FnOnce(WelcomeError<E>) -> CoreError + '_ {
    move |e| match e {
        WelcomeError::NoMatchingKeyPackage => CoreError::NoMatchingKeyPackage,
        WelcomeError::GroupAlreadyExists => {
            CoreError::GroupExists(group_id.map(hex::encode).unwrap_or_default())
        }
        WelcomeError::StorageError(e) => CoreError::storage(e),
        e => CoreError::mls("joining from a Welcome")(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use openmls::prelude::{BasicCredential, CredentialWithKey, KeyPackage, LeafNodeParameters};
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use openmls_traits::OpenMlsProvider as _;

    use super::*;
    use crate::CIPHERSUITE;
    use crate::device_lists::NoDeviceLists;
    use crate::generate_key_package;

    const GROUP_ID: &[u8] = b"test-group";

    /// `bytes` as a group id.
    fn id(bytes: &[u8]) -> crate::GroupId {
        crate::GroupId::new(bytes.to_vec()).unwrap()
    }

    /// One user: an identity and its own provider (its private storage).
    struct Client {
        provider: OpenMlsRustCrypto,
        identity: IdentityKeypair,
    }

    impl Client {
        fn new() -> Self {
            Self {
                provider: OpenMlsRustCrypto::default(),
                identity: IdentityKeypair::generate(),
            }
        }

        fn key(&self) -> IdentityKey {
            self.identity.public_key()
        }

        fn key_package(&self) -> Vec<u8> {
            generate_key_package(&self.provider, &self.identity).unwrap()
        }

        fn create(&self) -> GroupMember {
            GroupMember::create(&self.provider, &self.identity, &id(GROUP_ID)).unwrap()
        }

        /// Joins from the Welcome with the tree the node would serve.
        fn join(&self, added: &Added) -> GroupMember {
            GroupMember::join(&self.provider, &added.welcome, Some(&added.tree), &NoDeviceLists).unwrap()
        }

        /// Joins from `welcome` with the tree of `adder`, which merged the
        /// add.
        fn join_from(&self, welcome: &[u8], adder: &GroupMember) -> GroupMember {
            let tree = adder.ratchet_tree().unwrap();
            GroupMember::join(&self.provider, welcome, Some(&tree), &NoDeviceLists).unwrap()
        }

        /// Adds `joiners` in one commit, merges it and returns the messages
        /// with the new epoch's tree.
        fn add(&self, group: &mut GroupMember, joiners: &[&Client]) -> Added {
            let key_packages: Vec<_> = joiners.iter().map(|c| c.key_package()).collect();
            let AddedMembers { commit, welcome } = group
                .add_members(&self.provider, &self.identity, &key_packages, &NoDeviceLists)
                .unwrap();
            group.merge_pending_commit(&self.provider).unwrap();
            Added {
                commit,
                welcome,
                tree: group.ratchet_tree().unwrap(),
            }
        }

        fn send(&self, group: &mut GroupMember, text: &str) -> Vec<u8> {
            group
                .send(&self.provider, &self.identity, text.as_bytes())
                .unwrap()
        }

        fn receive(&self, group: &mut GroupMember, message: &[u8]) -> Received {
            group.receive(&self.provider, message, &NoDeviceLists).unwrap()
        }
    }

    /// What an add produced, and the tree of the epoch it started (which the
    /// node keeps for the joiners).
    struct Added {
        commit: Vec<u8>,
        welcome: Vec<u8>,
        tree: Vec<u8>,
    }

    fn application(sender: &Client, text: &str) -> Received {
        Received::Application {
            sender: MemberKey {
                user: sender.key(),
                device: sender.key(),
            },
            plaintext: text.as_bytes().to_vec(),
        }
    }

    /// Alice creates the group and adds Bob.
    fn alice_and_bob() -> (Client, GroupMember, Client, GroupMember) {
        let alice = Client::new();
        let bob = Client::new();
        let mut alice_group = alice.create();
        let added = alice.add(&mut alice_group, &[&bob]);
        let bob_group = bob.join(&added);
        (alice, alice_group, bob, bob_group)
    }

    #[test]
    fn created_group_has_only_its_creator_at_epoch_zero() {
        let alice = Client::new();
        let group = alice.create();
        assert_eq!(group.group_id().as_bytes(), GROUP_ID);
        assert_eq!(group.epoch(), 0);
        assert_eq!(group.members(), vec![alice.key()]);
        assert_eq!(group.own_identity(), Some(alice.key()));
        assert!(group.is_active());
        assert!(!group.has_pending_commit());
    }

    #[test]
    fn creating_an_existing_group_fails() {
        let alice = Client::new();
        let _group = alice.create();
        let err = GroupMember::create(&alice.provider, &alice.identity, &id(GROUP_ID)).unwrap_err();
        assert!(matches!(err, CoreError::GroupExists(_)), "{err}");
    }

    #[test]
    fn two_members_exchange_messages_both_ways() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();

        assert_eq!(alice_group.epoch(), 1);
        assert_eq!(bob_group.epoch(), 1);
        assert_eq!(bob_group.group_id().as_bytes(), GROUP_ID);
        assert_eq!(alice_group.members(), bob_group.members());
        assert_eq!(alice_group.members(), vec![alice.key(), bob.key()]);
        assert_eq!(bob_group.own_identity(), Some(bob.key()));

        let hello = alice.send(&mut alice_group, "hello bob");
        assert_eq!(
            bob.receive(&mut bob_group, &hello),
            application(&alice, "hello bob")
        );

        let reply = bob.send(&mut bob_group, "hi alice");
        assert_eq!(
            alice.receive(&mut alice_group, &reply),
            application(&bob, "hi alice")
        );

        // Several in a row, in order.
        for i in 0..3 {
            let text = format!("message {i}");
            let message = bob.send(&mut bob_group, &text);
            assert_eq!(
                alice.receive(&mut alice_group, &message),
                application(&bob, &text)
            );
        }
    }

    #[test]
    fn three_members_exchange_messages_after_sequential_adds() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();

        let added = alice.add(&mut alice_group, &[&carol]);
        assert_eq!(
            bob.receive(&mut bob_group, &added.commit),
            Received::Commit { epoch: 2 }
        );
        let mut carol_group = carol.join(&added);

        for group in [&alice_group, &bob_group, &carol_group] {
            assert_eq!(group.epoch(), 2);
            assert_eq!(group.members(), vec![alice.key(), bob.key(), carol.key()]);
        }

        let from_alice = alice.send(&mut alice_group, "from alice");
        assert_eq!(
            bob.receive(&mut bob_group, &from_alice),
            application(&alice, "from alice")
        );
        assert_eq!(
            carol.receive(&mut carol_group, &from_alice),
            application(&alice, "from alice")
        );

        let from_bob = bob.send(&mut bob_group, "from bob");
        assert_eq!(
            alice.receive(&mut alice_group, &from_bob),
            application(&bob, "from bob")
        );
        assert_eq!(
            carol.receive(&mut carol_group, &from_bob),
            application(&bob, "from bob")
        );

        let from_carol = carol.send(&mut carol_group, "from carol");
        assert_eq!(
            alice.receive(&mut alice_group, &from_carol),
            application(&carol, "from carol")
        );
        assert_eq!(
            bob.receive(&mut bob_group, &from_carol),
            application(&carol, "from carol")
        );
    }

    #[test]
    fn a_joined_member_can_add_others() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();

        let added = bob.add(&mut bob_group, &[&carol]);
        assert_eq!(
            alice.receive(&mut alice_group, &added.commit),
            Received::Commit { epoch: 2 }
        );
        let mut carol_group = carol.join(&added);

        let message = carol.send(&mut carol_group, "thanks bob");
        assert_eq!(
            alice.receive(&mut alice_group, &message),
            application(&carol, "thanks bob")
        );
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&carol, "thanks bob")
        );
    }

    #[test]
    fn one_commit_adds_two_members() {
        let alice = Client::new();
        let bob = Client::new();
        let carol = Client::new();
        let mut alice_group = alice.create();

        let added = alice.add(&mut alice_group, &[&bob, &carol]);
        assert_eq!(alice_group.epoch(), 1);
        let mut bob_group = bob.join(&added);
        let mut carol_group = carol.join(&added);

        for group in [&alice_group, &bob_group, &carol_group] {
            assert_eq!(group.epoch(), 1);
            assert_eq!(group.members(), vec![alice.key(), bob.key(), carol.key()]);
        }

        let message = bob.send(&mut bob_group, "hi both");
        assert_eq!(
            alice.receive(&mut alice_group, &message),
            application(&bob, "hi both")
        );
        assert_eq!(
            carol.receive(&mut carol_group, &message),
            application(&bob, "hi both")
        );
    }

    #[test]
    fn discarded_commit_leaves_group_at_old_epoch_and_working() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();

        let added = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[carol.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        assert!(alice_group.has_pending_commit());
        assert_eq!(alice_group.epoch(), 1);
        alice_group.discard_pending_commit(&alice.provider).unwrap();
        assert!(!alice_group.has_pending_commit());
        assert_eq!(alice_group.epoch(), 1);
        assert_eq!(alice_group.members(), vec![alice.key(), bob.key()]);

        // Still talking in epoch 1.
        let message = alice.send(&mut alice_group, "still here");
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&alice, "still here")
        );
        let reply = bob.send(&mut bob_group, "me too");
        assert_eq!(
            alice.receive(&mut alice_group, &reply),
            application(&bob, "me too")
        );

        // The add can simply be retried (the delivery service never saw the
        // discarded commit, so Bob never processes it).
        drop(added);
        let retried = alice.add(&mut alice_group, &[&carol]);
        assert_eq!(
            bob.receive(&mut bob_group, &retried.commit),
            Received::Commit { epoch: 2 }
        );
        let mut carol_group = carol.join(&retried);
        let message = carol.send(&mut carol_group, "made it");
        assert_eq!(
            alice.receive(&mut alice_group, &message),
            application(&carol, "made it")
        );
    }

    #[test]
    fn discarded_commit_survives_reload() {
        let alice = Client::new();
        let bob = Client::new();
        let mut group = alice.create();
        group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[bob.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        group.discard_pending_commit(&alice.provider).unwrap();

        let reloaded = GroupMember::load(&alice.provider, &id(GROUP_ID))
            .unwrap()
            .unwrap();
        assert!(!reloaded.has_pending_commit());
        assert_eq!(reloaded.epoch(), 0);
    }

    #[test]
    fn pending_commit_blocks_another_commit_but_not_sending() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();
        let dave = Client::new();

        alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[carol.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        let err = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[dave.key_package()],
                &NoDeviceLists,
            )
            .unwrap_err();
        assert_eq!(err, CoreError::CommitPending);

        let message = alice.send(&mut alice_group, "pending");
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&alice, "pending")
        );
    }

    #[test]
    fn merging_without_pending_commit_fails() {
        let alice = Client::new();
        let mut group = alice.create();
        assert_eq!(
            group.merge_pending_commit(&alice.provider).unwrap_err(),
            CoreError::NoPendingCommit
        );
    }

    #[test]
    fn adding_an_existing_member_fails() {
        let (alice, mut alice_group, bob, _bob_group) = alice_and_bob();
        let err = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[bob.key_package()],
                &NoDeviceLists,
            )
            .unwrap_err();
        assert_eq!(err, CoreError::AlreadyMember(bob.key().to_string()));
        assert!(!alice_group.has_pending_commit());
    }

    #[test]
    fn adding_the_same_identity_twice_in_one_commit_fails() {
        let alice = Client::new();
        let bob = Client::new();
        let mut group = alice.create();
        let err = group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[bob.key_package(), bob.key_package()],
                &NoDeviceLists,
            )
            .unwrap_err();
        assert_eq!(err, CoreError::AlreadyMember(bob.key().to_string()));
    }

    #[test]
    fn adding_garbage_or_nothing_fails() {
        let alice = Client::new();
        let mut group = alice.create();
        let err = group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[b"junk".to_vec()],
                &NoDeviceLists,
            )
            .unwrap_err();
        assert!(matches!(err, CoreError::InvalidKeyPackage(_)), "{err}");
        let err = group
            .add_members(&alice.provider, &alice.identity, &[], &NoDeviceLists)
            .unwrap_err();
        assert_eq!(err, CoreError::NoKeyPackages);
        assert!(!group.has_pending_commit());
    }

    #[test]
    fn welcome_for_someone_else_is_rejected() {
        let alice = Client::new();
        let bob = Client::new();
        let eve = Client::new();
        let mut group = alice.create();
        let added = alice.add(&mut group, &[&bob]);

        let err =
            GroupMember::join(&eve.provider, &added.welcome, Some(&added.tree), &NoDeviceLists).unwrap_err();
        assert_eq!(err, CoreError::NoMatchingKeyPackage);
        assert_eq!(err.to_string(), "welcome is not for any of our KeyPackages");
    }

    #[test]
    fn welcome_works_only_once() {
        let alice = Client::new();
        let bob = Client::new();
        let mut group = alice.create();
        let added = alice.add(&mut group, &[&bob]);
        let _bob_group = bob.join(&added);
        assert!(GroupMember::join(&bob.provider, &added.welcome, Some(&added.tree), &NoDeviceLists).is_err());
    }

    #[test]
    fn the_committer_the_joiners_and_the_members_share_the_new_epochs_key() {
        let alice = Client::new();
        let bob = Client::new();
        let carol = Client::new();
        let mut group = alice.create();
        let before = group.epoch_key(&alice.provider).unwrap();
        let added = alice.add(&mut group, &[&bob]);
        let mut bob_group = bob.join(&added);
        assert_eq!(
            bob_group.epoch_key(&bob.provider).unwrap(),
            group.epoch_key(&alice.provider).unwrap()
        );
        assert_ne!(
            before,
            group.epoch_key(&alice.provider).unwrap(),
            "a new epoch, a new key"
        );

        // Known before the commit is merged (the committer hands it to the
        // node with the commit), equal to what members compute after.
        let key_package = carol.key_package();
        bob_group
            .add_members(&bob.provider, &bob.identity, &[key_package], &NoDeviceLists)
            .unwrap();
        let pending = bob_group.pending_epoch_key(&bob.provider).unwrap();
        assert_ne!(pending, bob_group.epoch_key(&bob.provider).unwrap());
        bob_group.merge_pending_commit(&bob.provider).unwrap();
        assert_eq!(pending, bob_group.epoch_key(&bob.provider).unwrap());
        assert_eq!(
            bob_group.pending_epoch_key(&bob.provider).unwrap_err(),
            CoreError::NoPendingCommit
        );
    }

    #[test]
    fn the_state_key_moves_on_only_when_a_device_leaves() {
        let alice = Client::new();
        let (bob, carol) = (Client::new(), Client::new());
        let mut group = alice.create();
        let first = group.current_state_key(&alice.provider).unwrap();
        let added = alice.add(&mut group, &[&bob, &carol]);
        assert!(!group.state_key_rotated(), "adding takes nobody out");
        let mut bob_group = bob.join(&added);
        let mut carol_group = carol.join(&added);
        assert_ne!(first, group.current_state_key(&alice.provider).unwrap());

        // An update keeps the key.
        let commit = bob_group.self_update(&bob.provider, &bob.identity).unwrap();
        assert!(!bob_group.pending_commit_rotates().unwrap());
        assert_eq!(bob_group.pending_state_key(&bob.provider).unwrap(), None);
        bob_group.merge_pending_commit(&bob.provider).unwrap();
        assert!(!bob_group.state_key_rotated());
        alice.receive(&mut group, &commit);
        assert!(!group.state_key_rotated());
        carol.receive(&mut carol_group, &commit);

        // Removing Carol moves it on: Alice knows the new key before the
        // commit is merged, Bob computes the same from the commit, and
        // Carol's old key is not it.
        let commit = group
            .remove_members(&alice.provider, &alice.identity, &[carol.key()])
            .unwrap();
        assert!(group.pending_commit_rotates().unwrap());
        let next = group.pending_state_key(&alice.provider).unwrap().unwrap();
        group.merge_pending_commit(&alice.provider).unwrap();
        assert!(group.state_key_rotated());
        assert_eq!(next, group.current_state_key(&alice.provider).unwrap());
        bob.receive(&mut bob_group, &commit);
        assert!(bob_group.state_key_rotated());
        assert_eq!(next, bob_group.current_state_key(&bob.provider).unwrap());
        assert_ne!(next, carol_group.current_state_key(&carol.provider).unwrap());
        carol.receive(&mut carol_group, &commit);
        assert!(!carol_group.state_key_rotated(), "Carol is out: no key for her");
    }

    #[test]
    fn a_welcome_without_its_tree_names_the_tree_to_fetch() {
        let alice = Client::new();
        let bob = Client::new();
        let mut group = alice.create();
        let added = alice.add(&mut group, &[&bob]);
        assert_eq!(
            GroupMember::join(&bob.provider, &added.welcome, None, &NoDeviceLists).unwrap_err(),
            CoreError::RatchetTreeNeeded {
                group_id: GROUP_ID.to_vec(),
                epoch: 1,
                // Every member of the epoch the Welcome starts has it.
                epoch_key: group.epoch_key(&alice.provider).unwrap()
            }
        );
        // Nothing was consumed: the same Welcome works with the tree.
        let bob_group = bob.join(&added);
        assert_eq!(bob_group.members(), group.members());
    }

    #[test]
    fn a_tree_that_is_not_the_welcomes_is_refused() {
        let alice = Client::new();
        let (bob, carol, dave) = (Client::new(), Client::new(), Client::new());
        let mut group = alice.create();
        let first = alice.add(&mut group, &[&bob]);
        let second = alice.add(&mut group, &[&carol, &dave]);
        // The tree of another epoch (what a lying node could serve): its
        // hash is not the one the Welcome's signed GroupInfo commits to.
        let err = GroupMember::join(
            &carol.provider,
            &second.welcome,
            Some(&first.tree),
            &NoDeviceLists,
        )
        .unwrap_err();
        assert!(err.to_string().contains("joining from a Welcome"), "{err}");
        let err =
            GroupMember::join(&dave.provider, &second.welcome, Some(b"junk"), &NoDeviceLists).unwrap_err();
        assert!(matches!(err, CoreError::MalformedMessage(_)), "{err}");
    }

    #[test]
    fn a_removed_member_invited_again_joins_and_the_old_state_is_replaced() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let removed = alice_group
            .remove_members(&alice.provider, &alice.identity, &[bob.key()])
            .unwrap();
        alice_group.merge_pending_commit(&alice.provider).unwrap();
        bob.receive(&mut bob_group, &removed);
        assert!(!bob_group.is_active());

        let again = alice.add(&mut alice_group, &[&bob]);
        let mut bob_group = bob.join(&again);
        assert!(bob_group.is_active());
        assert_eq!(bob_group.epoch(), alice_group.epoch());
        let message = alice.send(&mut alice_group, "welcome back");
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&alice, "welcome back")
        );

        // While he is in, a Welcome to another group with the same id
        // does not replace his.
        let carol = Client::new();
        let mut impostor = carol.create();
        let added = carol.add(&mut impostor, &[&bob]);
        let err =
            GroupMember::join(&bob.provider, &added.welcome, Some(&added.tree), &NoDeviceLists).unwrap_err();
        assert!(matches!(err, CoreError::GroupExists(_)), "{err}");
        let kept = GroupMember::load(&bob.provider, &id(GROUP_ID)).unwrap().unwrap();
        assert!(kept.is_active());
        assert_eq!(kept.epoch(), bob_group.epoch());
    }

    #[test]
    fn join_rejects_non_welcome_messages() {
        let (alice, mut alice_group, bob, _bob_group) = alice_and_bob();
        let message = alice.send(&mut alice_group, "not a welcome");
        let err = GroupMember::join(&bob.provider, &message, None, &NoDeviceLists).unwrap_err();
        assert!(matches!(err, CoreError::UnexpectedMessage { .. }), "{err}");
        let err = GroupMember::join(&bob.provider, b"junk", None, &NoDeviceLists).unwrap_err();
        assert!(matches!(err, CoreError::MalformedMessage(_)), "{err}");
    }

    #[test]
    fn classify_routes_welcomes_and_group_messages() {
        let alice = Client::new();
        let bob = Client::new();
        let mut alice_group = alice.create();
        let added = alice.add(&mut alice_group, &[&bob]);

        assert_eq!(classify(&added.welcome).unwrap(), Incoming::Welcome);
        assert_eq!(
            classify(&added.commit).unwrap(),
            Incoming::Group {
                group_id: GROUP_ID.to_vec(),
                epoch: 0,
                kind: MessageKind::Commit,
            }
        );
        let message = alice.send(&mut alice_group, "hi");
        assert_eq!(
            classify(&message).unwrap(),
            Incoming::Group {
                group_id: GROUP_ID.to_vec(),
                epoch: 1,
                kind: MessageKind::Application,
            }
        );
    }

    #[test]
    fn classify_rejects_garbage_and_key_packages() {
        let err = classify(b"garbage").unwrap_err();
        assert!(matches!(err, CoreError::MalformedMessage(_)), "{err}");
        assert!(err.to_string().starts_with("malformed MLS message"), "{err}");
        assert!(classify(&[]).is_err());

        // A bare KeyPackage is not an MlsMessage at all...
        let bob = Client::new();
        let key_package = bob.key_package();
        assert!(classify(&key_package).is_err());

        // ...and one wrapped in an MlsMessage is the wrong kind.
        let (key_package, _) = validate_key_package(
            openmls_traits::OpenMlsProvider::crypto(&bob.provider),
            &key_package,
        )
        .unwrap();
        let wrapped = MlsMessageOut::from(key_package).to_bytes().unwrap();
        let err = classify(&wrapped).unwrap_err();
        assert_eq!(
            err,
            CoreError::UnexpectedMessage {
                expected: "a Welcome or a group message",
                got: "KeyPackage".into()
            }
        );
    }

    #[test]
    fn garbage_message_is_rejected_and_group_still_works() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();

        let err = bob_group
            .receive(&bob.provider, b"garbage", &NoDeviceLists)
            .unwrap_err();
        assert!(matches!(err, CoreError::MalformedMessage(_)), "{err}");

        // A well-framed message with a corrupted ciphertext.
        let mut corrupted = alice.send(&mut alice_group, "lost");
        let last = corrupted.len() - 1;
        corrupted[last] ^= 0xff;
        assert!(
            bob_group
                .receive(&bob.provider, &corrupted, &NoDeviceLists)
                .is_err()
        );

        assert_eq!(bob_group.epoch(), 1);
        let message = alice.send(&mut alice_group, "after garbage");
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&alice, "after garbage")
        );
        let reply = bob.send(&mut bob_group, "fine");
        assert_eq!(alice.receive(&mut alice_group, &reply), application(&bob, "fine"));
    }

    #[test]
    fn message_for_another_group_is_rejected() {
        let (alice, _alice_group, bob, mut bob_group) = alice_and_bob();
        let mut other = GroupMember::create(&alice.provider, &alice.identity, &id(b"other")).unwrap();
        let message = alice.send(&mut other, "wrong place");
        let err = bob_group
            .receive(&bob.provider, &message, &NoDeviceLists)
            .unwrap_err();
        assert!(matches!(err, CoreError::WrongGroup { .. }), "{err}");
    }

    #[test]
    fn replayed_commit_is_from_a_past_epoch() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();
        let added = alice.add(&mut alice_group, &[&carol]);

        bob.receive(&mut bob_group, &added.commit);
        let err = bob_group
            .receive(&bob.provider, &added.commit, &NoDeviceLists)
            .unwrap_err();
        assert_eq!(
            err,
            CoreError::PastEpoch {
                message_epoch: 1,
                group_epoch: 2
            }
        );
        assert!(err.to_string().starts_with("message from a past epoch"), "{err}");
    }

    #[test]
    fn message_after_a_missed_commit_is_from_a_future_epoch() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();
        let added = alice.add(&mut alice_group, &[&carol]);

        let message = alice.send(&mut alice_group, "epoch 2");
        let err = bob_group
            .receive(&bob.provider, &message, &NoDeviceLists)
            .unwrap_err();
        assert_eq!(
            err,
            CoreError::FutureEpoch {
                message_epoch: 2,
                group_epoch: 1
            }
        );

        // Catching up fixes it.
        bob.receive(&mut bob_group, &added.commit);
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&alice, "epoch 2")
        );
    }

    #[test]
    fn application_message_from_the_previous_epoch_still_decrypts() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();

        // Bob sends in epoch 1 while Alice's add moves her to epoch 2.
        let late = bob.send(&mut bob_group, "sent in epoch 1");
        let added = alice.add(&mut alice_group, &[&carol]);
        assert_eq!(
            alice.receive(&mut alice_group, &late),
            application(&bob, "sent in epoch 1")
        );
        bob.receive(&mut bob_group, &added.commit);
    }

    #[test]
    fn own_message_echoed_back_is_recognised() {
        let (alice, mut alice_group, _bob, _bob_group) = alice_and_bob();
        let message = alice.send(&mut alice_group, "echo");
        assert_eq!(alice.receive(&mut alice_group, &message), Received::OwnMessage);
    }

    #[test]
    fn removed_member_learns_it_and_can_no_longer_send() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let commit = alice_group
            .remove_members(&alice.provider, &alice.identity, &[bob.key()])
            .unwrap();
        alice_group.merge_pending_commit(&alice.provider).unwrap();
        assert_eq!(alice_group.members(), vec![alice.key()]);

        assert_eq!(
            bob.receive(&mut bob_group, &commit),
            Received::Removed { epoch: 2 }
        );
        assert!(!bob_group.is_active());
        assert_eq!(bob_group.own_identity(), None);
        let err = bob_group
            .send(&bob.provider, &bob.identity, b"let me in")
            .unwrap_err();
        assert_eq!(err, CoreError::NotAMember);

        bob_group.delete(&bob.provider).unwrap();
        assert!(GroupMember::load(&bob.provider, &id(GROUP_ID)).unwrap().is_none());
    }

    #[test]
    fn removing_a_stranger_fails() {
        let alice = Client::new();
        let mut group = alice.create();
        let stranger = IdentityKeypair::generate().public_key();
        let err = group
            .remove_members(&alice.provider, &alice.identity, &[stranger])
            .unwrap_err();
        assert_eq!(err, CoreError::UnknownMember(stranger.to_string()));
    }

    #[test]
    fn load_returns_the_created_group_at_the_same_epoch() {
        let alice = Client::new();
        let group = alice.create();
        let loaded = GroupMember::load(&alice.provider, &id(GROUP_ID))
            .unwrap()
            .unwrap();
        assert_eq!(loaded.epoch(), group.epoch());
        assert_eq!(loaded.group_id().as_bytes(), GROUP_ID);
        assert_eq!(loaded.members(), vec![alice.key()]);
        assert!(
            GroupMember::load(&alice.provider, &id(b"unknown"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn loaded_groups_keep_working_after_commits_and_messages() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let first = alice.send(&mut alice_group, "first");
        bob.receive(&mut bob_group, &first);
        drop(alice_group);
        drop(bob_group);

        let mut alice_group = GroupMember::load(&alice.provider, &id(GROUP_ID))
            .unwrap()
            .unwrap();
        let mut bob_group = GroupMember::load(&bob.provider, &id(GROUP_ID)).unwrap().unwrap();
        assert_eq!(alice_group.epoch(), 1);
        assert_eq!(bob_group.epoch(), 1);

        let second = alice.send(&mut alice_group, "second");
        assert_eq!(
            bob.receive(&mut bob_group, &second),
            application(&alice, "second")
        );
        let reply = bob.send(&mut bob_group, "reply");
        assert_eq!(
            alice.receive(&mut alice_group, &reply),
            application(&bob, "reply")
        );
    }

    #[test]
    fn pending_commit_survives_reload_and_can_be_merged() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();
        let added = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[carol.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        drop(alice_group);

        let mut alice_group = GroupMember::load(&alice.provider, &id(GROUP_ID))
            .unwrap()
            .unwrap();
        assert!(alice_group.has_pending_commit());
        alice_group.merge_pending_commit(&alice.provider).unwrap();
        assert_eq!(alice_group.epoch(), 2);

        bob.receive(&mut bob_group, &added.commit);
        let mut carol_group = carol.join_from(&added.welcome, &alice_group);
        let message = carol.send(&mut carol_group, "hello");
        assert_eq!(
            alice.receive(&mut alice_group, &message),
            application(&carol, "hello")
        );
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&carol, "hello")
        );
    }

    #[test]
    fn commit_adding_a_forged_credential_is_rejected() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        // Mallory signs with her own key but claims to be Carol.
        let mallory = Client::new();
        let carol = IdentityKeypair::generate().public_key();
        let forged = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &mallory.provider,
                &mallory.identity,
                CredentialWithKey {
                    credential: BasicCredential::new(carol.as_bytes().to_vec()).into(),
                    signature_key: mallory.key().as_bytes().as_slice().into(),
                },
            )
            .unwrap()
            .key_package()
            .clone();

        // A careless (or malicious) Alice that skips our checks.
        let (commit, _welcome, _) = alice_group
            .group
            .add_members(&alice.provider, &alice.identity, &[forged])
            .unwrap();
        alice_group.group.merge_pending_commit(&alice.provider).unwrap();

        let err = bob_group
            .receive(&bob.provider, &commit.to_bytes().unwrap(), &NoDeviceLists)
            .unwrap_err();
        assert!(matches!(err, CoreError::InvalidCredential(_)), "{err}");
        assert_eq!(bob_group.epoch(), 1);
        assert_eq!(bob_group.members(), vec![alice.key(), bob.key()]);
    }

    /// A directory holding some users' lists (user, devices); any other
    /// user is `unknown` or has no list.
    struct Lists {
        lists: Vec<(IdentityKey, Vec<IdentityKey>)>,
        others_unknown: bool,
    }

    impl DeviceDirectory for Lists {
        fn listed(&self, user: &IdentityKey, device: &IdentityKey) -> crate::Listed {
            match self.lists.iter().find(|(listed, _)| listed == user) {
                Some((_, devices)) if devices.contains(device) => crate::Listed::Yes,
                Some(_) => crate::Listed::No,
                None if self.others_unknown => crate::Listed::Unknown,
                None => crate::Listed::No,
            }
        }
    }

    /// A second device of `user`, with its own key.
    fn device_of(user: &Client) -> Client {
        Client {
            provider: OpenMlsRustCrypto::default(),
            identity: IdentityKeypair::generate().of_user(user.key()),
        }
    }

    #[test]
    fn a_device_joins_only_when_its_user_lists_it_and_speaks_as_that_user() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let laptop = device_of(&bob);
        let package = laptop.key_package();
        let info = crate::inspect_key_package(&package).unwrap();
        assert_eq!((info.identity, info.user), (laptop.key(), bob.key()));

        // Alice has not looked Bob's list up: she is told whose she needs,
        // and nothing changes.
        let unknown = Lists {
            lists: vec![],
            others_unknown: true,
        };
        let err = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                std::slice::from_ref(&package),
                &unknown,
            )
            .unwrap_err();
        assert_eq!(err, CoreError::DeviceListsNeeded(vec![bob.key()]));
        assert!(!alice_group.has_pending_commit());
        // A list that does not name the laptop refuses it.
        let without = Lists {
            lists: vec![(bob.key(), vec![bob.key()])],
            others_unknown: false,
        };
        let err = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                std::slice::from_ref(&package),
                &without,
            )
            .unwrap_err();
        assert!(matches!(err, CoreError::UnlistedDevice { .. }), "{err}");

        let with = Lists {
            lists: vec![(bob.key(), vec![bob.key(), laptop.key()])],
            others_unknown: false,
        };
        let added = alice_group
            .add_members(&alice.provider, &alice.identity, &[package], &with)
            .unwrap();
        alice_group.merge_pending_commit(&alice.provider).unwrap();
        let tree = alice_group.ratchet_tree().unwrap();
        // Bob's phone checks the Add against the list too.
        assert!(matches!(
            bob_group.receive(&bob.provider, &added.commit, &without),
            Err(CoreError::UnlistedDevice { .. })
        ));
        assert_eq!(
            bob_group.receive(&bob.provider, &added.commit, &with).unwrap(),
            Received::Commit { epoch: 2 }
        );
        // Joining checks every leaf; the laptop asks for the list first.
        let err = GroupMember::join(&laptop.provider, &added.welcome, Some(&tree), &unknown).unwrap_err();
        assert_eq!(err, CoreError::DeviceListsNeeded(vec![bob.key()]));
        let mut laptop_group =
            GroupMember::join(&laptop.provider, &added.welcome, Some(&tree), &with).unwrap();

        let message = laptop.send(&mut laptop_group, "from the laptop");
        let from_laptop = Received::Application {
            sender: MemberKey {
                user: bob.key(),
                device: laptop.key(),
            },
            plaintext: b"from the laptop".to_vec(),
        };
        assert_eq!(
            alice_group.receive(&alice.provider, &message, &with).unwrap(),
            from_laptop
        );
        assert_eq!(
            bob_group.receive(&bob.provider, &message, &with).unwrap(),
            from_laptop
        );
        assert_eq!(laptop_group.member_keys().len(), 3);
    }

    #[test]
    fn a_credential_whose_device_is_not_its_signature_key_is_refused() {
        let bob = Client::new();
        let mallory = Client::new();
        let claimed = [bob.key().as_bytes().as_slice(), bob.key().as_bytes().as_slice()].concat();
        let forged = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &mallory.provider,
                &mallory.identity,
                CredentialWithKey {
                    credential: BasicCredential::new(claimed).into(),
                    signature_key: mallory.key().as_bytes().as_slice().into(),
                },
            )
            .unwrap()
            .key_package()
            .tls_serialize_detached()
            .unwrap();
        let err = crate::inspect_key_package(&forged).unwrap_err();
        assert!(
            err.to_string().contains("differs from its signature key"),
            "{err}"
        );
    }

    #[test]
    fn losing_a_commit_race_drops_our_pending_commit() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();
        let dave = Client::new();

        // Both commit in epoch 1; the delivery service takes Alice's.
        let alices = alice.add(&mut alice_group, &[&carol]);
        bob_group
            .add_members(
                &bob.provider,
                &bob.identity,
                &[dave.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        assert_eq!(
            bob.receive(&mut bob_group, &alices.commit),
            Received::Commit { epoch: 2 }
        );
        assert!(!bob_group.has_pending_commit());
        assert_eq!(bob_group.members(), alice_group.members());

        // Bob simply retries in the new epoch.
        let bobs = bob.add(&mut bob_group, &[&dave]);
        assert_eq!(
            alice.receive(&mut alice_group, &bobs.commit),
            Received::Commit { epoch: 3 }
        );
        let mut dave_group = dave.join(&bobs);
        let message = dave.send(&mut dave_group, "hi all");
        assert_eq!(
            alice.receive(&mut alice_group, &message),
            application(&dave, "hi all")
        );
    }

    #[test]
    fn stored_proposal_blocks_sending_until_our_next_commit_covers_it() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let carol = Client::new();

        let leave = bob_group.group.leave_group(&bob.provider, &bob.identity).unwrap();
        assert_eq!(
            alice.receive(&mut alice_group, &leave.to_bytes().unwrap()),
            Received::Proposal
        );
        let err = alice_group
            .send(&alice.provider, &alice.identity, b"blocked")
            .unwrap_err();
        assert_eq!(err, CoreError::ProposalsPending);

        // Alice's next commit includes Bob's removal.
        let added = alice.add(&mut alice_group, &[&carol]);
        assert_eq!(alice_group.members(), vec![alice.key(), carol.key()]);
        assert_eq!(
            bob.receive(&mut bob_group, &added.commit),
            Received::Removed { epoch: 2 }
        );
        let mut carol_group = carol.join(&added);
        let message = alice.send(&mut alice_group, "unblocked");
        assert_eq!(
            carol.receive(&mut carol_group, &message),
            application(&alice, "unblocked")
        );
    }

    #[test]
    fn self_update_advances_the_epoch_and_everyone_still_reads() {
        let (alice, bob, carol) = (Client::new(), Client::new(), Client::new());
        let mut a = alice.create();
        let added = alice.add(&mut a, &[&bob, &carol]);
        let (mut b, mut c) = (bob.join(&added), carol.join(&added));

        let commit = b.self_update(&bob.provider, &bob.identity).unwrap();
        b.merge_pending_commit(&bob.provider).unwrap();
        assert_eq!(alice.receive(&mut a, &commit), Received::Commit { epoch: 2 });
        assert_eq!(carol.receive(&mut c, &commit), Received::Commit { epoch: 2 });
        assert_eq!((a.epoch(), b.epoch(), c.epoch()), (2, 2, 2));

        let message = carol.send(&mut c, "after update");
        assert_eq!(
            alice.receive(&mut a, &message),
            application(&carol, "after update")
        );
        assert_eq!(bob.receive(&mut b, &message), application(&carol, "after update"));
    }

    #[test]
    fn a_leave_is_committed_by_exactly_one_remaining_member() {
        let (alice, bob, carol) = (Client::new(), Client::new(), Client::new());
        let mut a = alice.create();
        let added = alice.add(&mut a, &[&bob, &carol]);
        let (mut b, mut c) = (bob.join(&added), carol.join(&added));

        // Alice (leaf 0) leaves: Bob and Carol store the proposal.
        let proposal = a.leave(&alice.provider, &alice.identity).unwrap();
        assert_eq!(bob.receive(&mut b, &proposal), Received::Proposal);
        assert_eq!(carol.receive(&mut c, &proposal), Received::Proposal);
        assert!(!a.should_commit_pending_proposals());
        assert!(
            b.should_commit_pending_proposals(),
            "lowest remaining leaf commits"
        );
        assert!(!c.should_commit_pending_proposals());

        let commit = b.commit_pending_proposals(&bob.provider, &bob.identity).unwrap();
        b.merge_pending_commit(&bob.provider).unwrap();
        assert_eq!(carol.receive(&mut c, &commit), Received::Commit { epoch: 2 });
        assert_eq!(alice.receive(&mut a, &commit), Received::Removed { epoch: 2 });
        assert!(!a.is_active());
        assert_eq!(b.members(), c.members());
        assert_eq!(b.members().len(), 2);

        let message = carol.send(&mut c, "without alice");
        assert_eq!(
            bob.receive(&mut b, &message),
            application(&carol, "without alice")
        );
        assert!(a.receive(&alice.provider, &message, &NoDeviceLists).is_err());
    }

    /// The wire format of a TLS-encoded `MlsMessage`.
    fn wire_format(message: &[u8]) -> WireFormat {
        decode(message).unwrap().wire_format()
    }

    #[test]
    fn handshakes_are_public_messages_and_application_messages_private() {
        let alice = Client::new();
        let bob = Client::new();
        let carol = Client::new();
        let mut alice_group = alice.create();
        let added = alice.add(&mut alice_group, &[&bob, &carol]);
        let mut bob_group = bob.join(&added);
        let mut carol_group = carol.join(&added);

        assert_eq!(wire_format(&added.commit), WireFormat::PublicMessage);
        assert!(matches!(
            decode(&added.commit).unwrap().extract(),
            MlsMessageBodyIn::PublicMessage(_)
        ));
        assert_eq!(wire_format(&added.welcome), WireFormat::Welcome);

        let message = alice.send(&mut alice_group, "secret");
        assert_eq!(wire_format(&message), WireFormat::PrivateMessage);
        assert_eq!(
            bob.receive(&mut bob_group, &message),
            application(&alice, "secret")
        );

        let update = bob_group.self_update(&bob.provider, &bob.identity).unwrap();
        assert_eq!(wire_format(&update), WireFormat::PublicMessage);
        bob_group.merge_pending_commit(&bob.provider).unwrap();
        assert_eq!(
            alice.receive(&mut alice_group, &update),
            Received::Commit { epoch: 2 }
        );
        assert_eq!(
            carol.receive(&mut carol_group, &update),
            Received::Commit { epoch: 2 }
        );

        // A proposal is public too, and classified from its public framing.
        let leave = carol_group.leave(&carol.provider, &carol.identity).unwrap();
        assert_eq!(wire_format(&leave), WireFormat::PublicMessage);
        assert_eq!(
            classify(&leave).unwrap(),
            Incoming::Group {
                group_id: GROUP_ID.to_vec(),
                epoch: 2,
                kind: MessageKind::Proposal,
            }
        );
        assert_eq!(alice.receive(&mut alice_group, &leave), Received::Proposal);
        assert_eq!(bob.receive(&mut bob_group, &leave), Received::Proposal);
        let commit = alice_group
            .commit_pending_proposals(&alice.provider, &alice.identity)
            .unwrap();
        assert_eq!(wire_format(&commit), WireFormat::PublicMessage);
        assert_eq!(
            classify(&commit).unwrap(),
            Incoming::Group {
                group_id: GROUP_ID.to_vec(),
                epoch: 2,
                kind: MessageKind::Commit,
            }
        );
        alice_group.merge_pending_commit(&alice.provider).unwrap();
        assert_eq!(
            bob.receive(&mut bob_group, &commit),
            Received::Commit { epoch: 3 }
        );
        assert_eq!(
            carol.receive(&mut carol_group, &commit),
            Received::Removed { epoch: 3 }
        );
    }

    #[test]
    fn a_public_commit_made_by_plain_openmls_is_processed_and_a_private_one_refused() {
        use openmls::group::{MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, PURE_CIPHERTEXT_WIRE_FORMAT_POLICY};

        let alice = Client::new();
        let bob = Client::new();
        let mut alice_group = alice.create();
        let added = alice.add(&mut alice_group, &[&bob]);

        // Bob is another implementation: openmls without our layer, whose
        // handshake messages are encrypted at first.
        let MlsMessageBodyIn::Welcome(welcome) = decode(&added.welcome).unwrap().extract() else {
            panic!("not a Welcome");
        };
        let ciphertext_config = MlsGroupJoinConfig::builder()
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .build();
        let tree = RatchetTreeIn::tls_deserialize_exact_bytes(&added.tree).unwrap();
        let mut bob_group =
            StagedWelcome::new_from_welcome(&bob.provider, &ciphertext_config, welcome, Some(tree))
                .unwrap()
                .into_group(&bob.provider)
                .unwrap();

        // An encrypted Commit is one the node could not have checked: refused.
        let bundle = bob_group
            .self_update(&bob.provider, &bob.identity, LeafNodeParameters::default())
            .unwrap();
        let private = bundle.commit().to_bytes().unwrap();
        assert_eq!(wire_format(&private), WireFormat::PrivateMessage);
        let err = alice_group
            .receive(&alice.provider, &private, &NoDeviceLists)
            .unwrap_err();
        assert!(matches!(err, CoreError::Mls { .. }), "{err}");
        assert_eq!(alice_group.epoch(), 1);
        bob_group.clear_pending_commit(bob.provider.storage()).unwrap();

        // The same member with plaintext handshakes gets through.
        let plaintext_config = MlsGroupJoinConfig::builder()
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        bob_group
            .set_configuration(bob.provider.storage(), &plaintext_config)
            .unwrap();
        let bundle = bob_group
            .self_update(&bob.provider, &bob.identity, LeafNodeParameters::default())
            .unwrap();
        let public = bundle.commit().to_bytes().unwrap();
        assert_eq!(wire_format(&public), WireFormat::PublicMessage);
        assert_eq!(
            classify(&public).unwrap(),
            Incoming::Group {
                group_id: GROUP_ID.to_vec(),
                epoch: 1,
                kind: MessageKind::Commit,
            }
        );
        assert_eq!(
            alice.receive(&mut alice_group, &public),
            Received::Commit { epoch: 2 }
        );
        bob_group.merge_pending_commit(&bob.provider).unwrap();

        // Application messages stay encrypted, both ways.
        let message = bob_group
            .create_message(&bob.provider, &bob.identity, b"from openmls")
            .unwrap()
            .to_bytes()
            .unwrap();
        assert_eq!(wire_format(&message), WireFormat::PrivateMessage);
        assert_eq!(
            alice.receive(&mut alice_group, &message),
            application(&bob, "from openmls")
        );
        let reply = alice.send(&mut alice_group, "from us");
        let MlsMessageBodyIn::PrivateMessage(reply) = decode(&reply).unwrap().extract() else {
            panic!("not a PrivateMessage");
        };
        let processed = bob_group.process_message(&bob.provider, reply).unwrap();
        let ProcessedMessageContent::ApplicationMessage(reply) = processed.into_content() else {
            panic!("not an application message");
        };
        assert_eq!(reply.into_bytes(), b"from us");
    }

    #[test]
    fn the_public_state_lets_a_node_check_the_groups_commits() {
        use openmls::group::{ProposalStore, PublicGroup};
        use openmls::prelude::RatchetTreeIn;

        let alice = Client::new();
        let bob = Client::new();
        let mut alice_group = alice.create();
        // Exported while the first commit is pending: still epoch 0's state.
        let added = alice_group
            .add_members(
                &alice.provider,
                &alice.identity,
                &[bob.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        let state = alice_group
            .export_public_state(&alice.provider, &alice.identity)
            .unwrap();

        let MlsMessageBodyIn::GroupInfo(group_info) = decode(&state.group_info).unwrap().extract() else {
            panic!("not a GroupInfo");
        };
        assert_eq!(group_info.group_id().as_slice(), GROUP_ID);
        assert_eq!(group_info.epoch().as_u64(), 0);
        assert!(
            group_info.extensions().ratchet_tree().is_none(),
            "the tree travels on its own"
        );
        let tree = RatchetTreeIn::tls_deserialize_exact_bytes(&state.ratchet_tree).unwrap();

        // What the node does: build the group's public state from it...
        let node = OpenMlsRustCrypto::default();
        let (mut public, _) = PublicGroup::from_external(
            node.crypto(),
            node.storage(),
            tree,
            group_info,
            ProposalStore::new(),
        )
        .unwrap();
        assert_eq!(public.members().count(), 1);

        // ...and check the first commit against it.
        let commit = into_protocol_message(decode(&added.commit).unwrap(), "a commit").unwrap();
        let processed = public.process_message(node.crypto(), commit).unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("not a commit");
        };
        public.merge_commit(node.storage(), *staged).unwrap();
        assert_eq!(public.group_context().epoch().as_u64(), 1);
        assert_eq!(public.members().count(), 2);

        alice_group.merge_pending_commit(&alice.provider).unwrap();
        let MlsMessageBodyIn::GroupInfo(next) = decode(
            &alice_group
                .export_public_state(&alice.provider, &alice.identity)
                .unwrap()
                .group_info,
        )
        .unwrap()
        .extract() else {
            panic!("not a GroupInfo");
        };
        assert_eq!(next.epoch().as_u64(), 1);
        let mut bob_group = bob.join_from(&added.welcome, &alice_group);

        // Bob's update is checked by the node too, and a forged one is not.
        // A PublicMessage Commit ends with its signature, the confirmation
        // tag (33 bytes) and the membership tag (33 or 34 bytes); the node
        // cannot check the tags (their keys are epoch secrets), but 80
        // bytes from the end is inside the signature, which it checks.
        let update = bob_group.self_update(&bob.provider, &bob.identity).unwrap();
        let mut forged = update.clone();
        let inside_signature = forged.len() - 80;
        forged[inside_signature] ^= 0xff;
        let forged = into_protocol_message(decode(&forged).unwrap(), "a commit").unwrap();
        assert!(public.process_message(node.crypto(), forged).is_err());
        let update = into_protocol_message(decode(&update).unwrap(), "a commit").unwrap();
        let processed = public.process_message(node.crypto(), update).unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("not a commit");
        };
        public.merge_commit(node.storage(), *staged).unwrap();
        assert_eq!(public.group_context().epoch().as_u64(), 2);

        // A commit from a past epoch is not valid any more.
        let stale = into_protocol_message(decode(&added.commit).unwrap(), "a commit").unwrap();
        assert!(public.process_message(node.crypto(), stale).is_err());
    }

    #[test]
    fn a_withdrawn_leave_unblocks_sending_and_keeps_others_proposals() {
        let (alice, bob, carol) = (Client::new(), Client::new(), Client::new());
        let mut a = alice.create();
        let added = alice.add(&mut a, &[&bob, &carol]);
        let (mut b, mut c) = (bob.join(&added), carol.join(&added));

        // Carol asks to leave; Bob then asks too, but the node refuses his.
        let carols = c.leave(&carol.provider, &carol.identity).unwrap();
        assert_eq!(bob.receive(&mut b, &carols), Received::Proposal);
        b.leave(&bob.provider, &bob.identity).unwrap();
        assert_eq!(b.withdraw_own_proposals(&bob.provider).unwrap(), 1);
        assert!(b.has_pending_proposals(), "Carol's stays");
        assert_eq!(b.withdraw_own_proposals(&bob.provider).unwrap(), 0);

        // Without Carol's request Bob could send again.
        let mut b = GroupMember::load(&bob.provider, &id(GROUP_ID)).unwrap().unwrap();
        assert_eq!(b.group.pending_proposals().count(), 1, "withdrawn in storage too");
        assert_eq!(alice.receive(&mut a, &carols), Received::Proposal);
        let commit = a
            .commit_pending_proposals(&alice.provider, &alice.identity)
            .unwrap();
        a.merge_pending_commit(&alice.provider).unwrap();
        assert_eq!(bob.receive(&mut b, &commit), Received::Commit { epoch: 2 });
        assert_eq!(a.members(), vec![alice.key(), bob.key()]);
        let message = bob.send(&mut b, "still here");
        assert_eq!(alice.receive(&mut a, &message), application(&bob, "still here"));

        // Withdrawing our only proposal unblocks sending at once.
        a.leave(&alice.provider, &alice.identity).unwrap();
        assert_eq!(
            a.send(&alice.provider, &alice.identity, b"blocked").unwrap_err(),
            CoreError::ProposalsPending
        );
        assert_eq!(a.withdraw_own_proposals(&alice.provider).unwrap(), 1);
        let message = alice.send(&mut a, "staying after all");
        assert_eq!(
            bob.receive(&mut b, &message),
            application(&alice, "staying after all")
        );
    }

    #[test]
    fn a_removed_member_exports_no_public_state() {
        let (alice, mut alice_group, bob, mut bob_group) = alice_and_bob();
        let commit = alice_group
            .remove_members(&alice.provider, &alice.identity, &[bob.key()])
            .unwrap();
        alice_group.merge_pending_commit(&alice.provider).unwrap();
        bob.receive(&mut bob_group, &commit);
        assert_eq!(
            bob_group
                .export_public_state(&bob.provider, &bob.identity)
                .unwrap_err(),
            CoreError::NotAMember
        );
    }

    /// The GroupInfo in `bytes` (a TLS-encoded `MlsMessage`).
    fn group_info_of(bytes: &[u8]) -> openmls::messages::group_info::VerifiableGroupInfo {
        let MlsMessageBodyIn::GroupInfo(info) = decode(bytes).unwrap().extract() else {
            panic!("not a GroupInfo");
        };
        info
    }

    /// Whether `info` is signed by `signer`, as the node checks it.
    fn signed_by(info: &openmls::messages::group_info::VerifiableGroupInfo, signer: &Client) -> bool {
        use openmls::prelude::{
            OpenMlsSignaturePublicKey, SignaturePublicKey, SignatureScheme, Verifiable as _,
        };

        let key = OpenMlsSignaturePublicKey::from_signature_key(
            SignaturePublicKey::from(signer.key().as_bytes().to_vec()),
            SignatureScheme::ED25519,
        );
        info.clone().verify_no_out(signer.provider.crypto(), &key).is_ok()
    }

    /// The same identity with empty storage: a member who lost its state.
    fn restored(client: &Client) -> Client {
        Client {
            provider: OpenMlsRustCrypto::default(),
            identity: IdentityKeypair::from_secret_bytes(&client.identity.secret_bytes()),
        }
    }

    /// The GroupInfo `committer`'s self-update brought and the tree after
    /// it, as the node serves them; the update is merged and returned.
    fn update_with_group_info(committer: &Client, group: &mut GroupMember) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let update = group
            .self_update(&committer.provider, &committer.identity)
            .unwrap();
        let group_info = group.pending_group_info().unwrap().to_vec();
        group.merge_pending_commit(&committer.provider).unwrap();
        let tree = group
            .export_public_state(&committer.provider, &committer.identity)
            .unwrap()
            .ratchet_tree;
        (update, group_info, tree)
    }

    #[test]
    fn every_commit_comes_with_the_group_info_of_the_epoch_it_starts() {
        let (alice, bob, carol) = (Client::new(), Client::new(), Client::new());
        let mut a = alice.create();
        assert_eq!(a.pending_group_info(), None);

        // An add: neither the Welcome nor this GroupInfo carries the tree
        // (the node serves it).
        let added = a
            .add_members(
                &alice.provider,
                &alice.identity,
                &[bob.key_package(), carol.key_package()],
                &NoDeviceLists,
            )
            .unwrap();
        let info = group_info_of(a.pending_group_info().unwrap());
        assert_eq!(info.epoch().as_u64(), 1);
        assert!(info.extensions().ratchet_tree().is_none());
        assert!(
            GroupMember::load(&alice.provider, &id(GROUP_ID))
                .unwrap()
                .unwrap()
                .pending_group_info()
                .is_none(),
            "not stored"
        );
        a.merge_pending_commit(&alice.provider).unwrap();
        assert_eq!(a.pending_group_info(), None);
        assert_eq!(info.group_context(), a.group.public_group().group_context());
        assert!(signed_by(&info, &alice));
        let (mut b, mut c) = (
            bob.join_from(&added.welcome, &a),
            carol.join_from(&added.welcome, &a),
        );

        // Commits without a Welcome: without the tree.
        let update = b.self_update(&bob.provider, &bob.identity).unwrap();
        let info = group_info_of(b.pending_group_info().unwrap());
        assert!(info.extensions().ratchet_tree().is_none());
        assert!(info.extensions().external_pub().is_some(), "for rejoins");
        b.merge_pending_commit(&bob.provider).unwrap();
        assert_eq!(info.group_context(), b.group.public_group().group_context());
        assert!(signed_by(&info, &bob) && !signed_by(&info, &alice));
        alice.receive(&mut a, &update);
        carol.receive(&mut c, &update);

        let leave = c.leave(&carol.provider, &carol.identity).unwrap();
        alice.receive(&mut a, &leave);
        a.commit_pending_proposals(&alice.provider, &alice.identity)
            .unwrap();
        let info = group_info_of(a.pending_group_info().unwrap());
        assert_eq!(info.epoch().as_u64(), 3);
        assert!(info.extensions().ratchet_tree().is_none());
        a.discard_pending_commit(&alice.provider).unwrap();
        assert_eq!(a.pending_group_info(), None, "goes with the commit");

        a.remove_members(&alice.provider, &alice.identity, &[bob.key()])
            .unwrap();
        let info = group_info_of(a.pending_group_info().unwrap());
        a.merge_pending_commit(&alice.provider).unwrap();
        assert_eq!(info.group_context(), a.group.public_group().group_context());
        assert_eq!(a.members(), vec![alice.key()], "the Remove covered Carol's leave");
    }

    #[test]
    fn a_member_who_lost_its_state_rejoins_and_everyone_reads() {
        let (alice, bob, carol) = (Client::new(), Client::new(), Client::new());
        let mut a = alice.create();
        let added = alice.add(&mut a, &[&bob, &carol]);
        let (mut old_b, mut c) = (bob.join(&added), carol.join(&added));
        let (update, group_info, tree) = update_with_group_info(&alice, &mut a);
        bob.receive(&mut old_b, &update);
        carol.receive(&mut c, &update);

        let new_bob = restored(&bob);
        let rejoined = GroupMember::rejoin(
            &new_bob.provider,
            &new_bob.identity,
            &id(GROUP_ID),
            &group_info,
            &tree,
            &NoDeviceLists,
        )
        .unwrap();
        assert_eq!(rejoined.epoch, 2);
        assert_eq!(wire_format(&rejoined.commit), WireFormat::PublicMessage);
        let mut b = rejoined.group;
        assert_eq!(b.epoch(), 3);
        assert!(!b.has_pending_commit(), "openmls merged it");
        let info = group_info_of(&rejoined.group_info);
        assert_eq!(info.epoch().as_u64(), 3);
        assert!(info.extensions().ratchet_tree().is_none());
        assert_eq!(info.group_context(), b.group.public_group().group_context());
        assert!(signed_by(&info, &bob));

        let rejoin = Received::Rejoined {
            member: bob.key(),
            epoch: 3,
        };
        assert_eq!(alice.receive(&mut a, &rejoined.commit), rejoin);
        assert_eq!(carol.receive(&mut c, &rejoined.commit), rejoin);
        // A device still holding the old leaf learns it was replaced.
        assert_eq!(
            bob.receive(&mut old_b, &rejoined.commit),
            Received::Removed { epoch: 3 }
        );
        assert_eq!(a.members(), vec![alice.key(), bob.key(), carol.key()]);
        assert_eq!(b.members(), a.members());
        assert_eq!(c.members(), a.members());

        let message = alice.send(&mut a, "welcome back");
        assert_eq!(
            new_bob.receive(&mut b, &message),
            application(&alice, "welcome back")
        );
        assert_eq!(
            carol.receive(&mut c, &message),
            application(&alice, "welcome back")
        );
        let reply = new_bob.send(&mut b, "thanks");
        assert_eq!(alice.receive(&mut a, &reply), application(&bob, "thanks"));
        assert_eq!(carol.receive(&mut c, &reply), application(&bob, "thanks"));

        // The rejoined member commits like any other.
        let update = b.self_update(&new_bob.provider, &new_bob.identity).unwrap();
        b.merge_pending_commit(&new_bob.provider).unwrap();
        assert_eq!(alice.receive(&mut a, &update), Received::Commit { epoch: 4 });
        assert_eq!(carol.receive(&mut c, &update), Received::Commit { epoch: 4 });
    }

    #[test]
    fn rejoining_replaces_a_stale_state_but_not_an_up_to_date_one() {
        let (alice, mut a, bob, _) = alice_and_bob();
        // Bob misses Alice's update: his state is stuck in epoch 1.
        let (_, group_info, tree) = update_with_group_info(&alice, &mut a);

        assert_eq!(
            GroupMember::rejoin(
                &alice.provider,
                &alice.identity,
                &id(GROUP_ID),
                &group_info,
                &tree,
                &NoDeviceLists
            )
            .unwrap_err(),
            CoreError::UpToDate { epoch: 2 }
        );
        assert_eq!(
            GroupMember::load(&alice.provider, &id(GROUP_ID))
                .unwrap()
                .unwrap()
                .epoch(),
            2
        );

        let rejoined = GroupMember::rejoin(
            &bob.provider,
            &bob.identity,
            &id(GROUP_ID),
            &group_info,
            &tree,
            &NoDeviceLists,
        )
        .unwrap();
        assert_eq!(
            alice.receive(&mut a, &rejoined.commit),
            Received::Rejoined {
                member: bob.key(),
                epoch: 3
            }
        );
        let mut b = GroupMember::load(&bob.provider, &id(GROUP_ID)).unwrap().unwrap();
        assert_eq!(b.epoch(), 3);
        let message = alice.send(&mut a, "in sync again");
        assert_eq!(
            bob.receive(&mut b, &message),
            application(&alice, "in sync again")
        );
    }

    #[test]
    fn a_stranger_can_neither_rejoin_nor_join_by_external_commit() {
        let (alice, mut a, bob, mut b) = alice_and_bob();
        let (update, group_info, tree) = update_with_group_info(&alice, &mut a);
        let stranger = Client::new();
        assert_eq!(
            GroupMember::rejoin(
                &stranger.provider,
                &stranger.identity,
                &id(GROUP_ID),
                &group_info,
                &tree,
                &NoDeviceLists
            )
            .unwrap_err(),
            CoreError::NotAMember
        );
        assert!(
            GroupMember::load(&stranger.provider, &id(GROUP_ID))
                .unwrap()
                .is_none()
        );

        // With openmls alone, the stranger's external commit adds it and
        // removes nobody: refused.
        let (_, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(RatchetTreeIn::tls_deserialize_exact_bytes(&tree).unwrap())
            .with_config(join_config())
            .build_group(
                &stranger.provider,
                group_info_of(&group_info),
                stranger.identity.credential_with_key(),
            )
            .unwrap()
            .load_psks(stranger.provider.storage())
            .unwrap()
            .build(
                stranger.provider.rand(),
                stranger.provider.crypto(),
                &stranger.identity,
                |_| true,
            )
            .unwrap()
            .finalize(&stranger.provider)
            .unwrap();
        let commit = bundle.commit().to_bytes().unwrap();
        let err = a.receive(&alice.provider, &commit, &NoDeviceLists).unwrap_err();
        assert!(
            matches!(&err, CoreError::Rejected { reason, .. } if reason.contains("does not remove")),
            "{err}"
        );
        assert_eq!(a.epoch(), 2);
        assert_eq!(a.members(), vec![alice.key(), bob.key()]);
        assert_eq!(bob.receive(&mut b, &update), Received::Commit { epoch: 2 });
        let message = alice.send(&mut a, "still just us");
        assert_eq!(
            bob.receive(&mut b, &message),
            application(&alice, "still just us")
        );
    }

    #[test]
    fn rejoin_refuses_what_is_not_this_groups_group_info() {
        let (alice, mut a, bob, _) = alice_and_bob();
        let (update, group_info, tree) = update_with_group_info(&alice, &mut a);
        let bob = restored(&bob);
        let rejoin = |group_id: &[u8], group_info: &[u8], tree: &[u8]| {
            GroupMember::rejoin(
                &bob.provider,
                &bob.identity,
                &id(group_id),
                group_info,
                tree,
                &NoDeviceLists,
            )
            .unwrap_err()
        };
        assert!(matches!(
            rejoin(b"another-group", &group_info, &tree),
            CoreError::WrongGroup { .. }
        ));
        assert!(matches!(
            rejoin(GROUP_ID, &update, &tree),
            CoreError::UnexpectedMessage { .. }
        ));
        assert!(matches!(
            rejoin(GROUP_ID, b"garbage", &tree),
            CoreError::MalformedMessage(_)
        ));
        assert!(matches!(
            rejoin(GROUP_ID, &group_info, b"garbage"),
            CoreError::MalformedMessage(_)
        ));
        assert!(GroupMember::load(&bob.provider, &id(GROUP_ID)).unwrap().is_none());
    }
}
