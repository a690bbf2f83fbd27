//! A group's public state as a Delivery Service keeps it (RFC 9750): the
//! ratchet tree and the group context, no secret. The node checks every
//! handshake message of a group against it, so a Commit the members could
//! not apply (noise, a non-member's, a broken one) is refused instead of
//! taking the group's epoch for good.
//!
//! Built on openmls' `PublicGroup`. What it checks: the framing (group,
//! epoch, a PublicMessage), the sender's signature by a current member, the
//! proposals by value and by reference, the update path's public keys and
//! parent hashes, and our identity rules (every leaf's basic credential is
//! its signature key, a member never changes identity, no identity twice,
//! the caller is the sender). What only members can check (the path's
//! encrypted secrets, the confirmation and membership tags' values) it
//! cannot.
//!
//! The view is stored as one opaque blob per group ([`PublicView::encode`]),
//! rewritten by each Commit, and the standalone proposals of its epoch as
//! one small item each ([`PublicView::add_proposal`]), so that keeping a
//! proposal writes that proposal, not the whole tree again.

use std::cell::RefCell;
use std::collections::HashSet;

use openmls::group::{GroupId as MlsGroupId, ProposalStore, PublicGroup, QueuedProposal, StagedCommit};
use openmls::prelude::{
    MlsMessageBodyIn, MlsMessageIn, OpenMlsSignaturePublicKey, ProcessedMessageContent, Proposal,
    RatchetTreeIn, Sender, SignaturePublicKey, SignatureScheme, Verifiable as _, WireFormat,
    tls_codec::{DeserializeBytes as _, Serialize as _},
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::public_storage::PublicStorageProvider;
use openmls_traits::storage::{CURRENT_VERSION, traits};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityKey, MemberKey};
use crate::key_package::{leaf_identity, leaf_member};

/// Why a handshake message or an initial state is refused; the text is for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A stored state that cannot be read back: the node's storage is damaged.
#[derive(Debug, thiserror::Error)]
#[error("the stored public state of the group is damaged: {0}")]
pub struct DamagedState(String);

/// What [`PublicView::apply_commit`] found in a Commit it applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The members it added.
    pub added: Vec<MemberKey>,
    /// Whether it took a device out of the group: removed (or covered the
    /// self-removal of) a leaf whose device it does not add again. Such a
    /// Commit moves the group's state key on (protocol 9).
    pub takes_out_a_device: bool,
}

/// One group's public state.
pub struct PublicView {
    group: PublicGroup,
    items: Items,
}

impl PublicView {
    /// Starts following a group from its public state in `epoch`, as its
    /// creator hands it over: `group_info` (an MLSMessage carrying a
    /// GroupInfo, signed by a member) and `ratchet_tree` (TLS-encoded).
    /// openmls checks the GroupInfo's signature, that the tree matches its
    /// tree hash, every leaf's signature and the parent hashes; on top,
    /// every member must follow our identity rules and `caller` must be one.
    pub fn start(
        group_id: &[u8],
        epoch: u64,
        group_info: &[u8],
        ratchet_tree: &[u8],
        caller: &IdentityKey,
    ) -> Result<PublicView, Invalid> {
        let message = MlsMessageIn::tls_deserialize_exact_bytes(group_info)
            .map_err(|e| Invalid(format!("initialState.groupInfo is not an MLS message: {e}")))?;
        let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
            return Err(Invalid(
                "initialState.groupInfo does not carry a GroupInfo".into(),
            ));
        };
        if group_info.group_id().as_slice() != group_id || group_info.epoch().as_u64() != epoch {
            return Err(Invalid(format!(
                "initialState.groupInfo is for another group or epoch (epoch {}), not this group's epoch {epoch}",
                group_info.epoch().as_u64()
            )));
        }
        let tree = RatchetTreeIn::tls_deserialize_exact_bytes(ratchet_tree)
            .map_err(|e| Invalid(format!("initialState.ratchetTree is not a ratchet tree: {e}")))?;
        let items = Items::default();
        let (group, _) = PublicGroup::from_external(
            &RustCrypto::default(),
            &items,
            tree,
            group_info,
            ProposalStore::new(),
        )
        .map_err(|e| Invalid(format!("initialState is not a valid group state: {e}")))?;
        let state = PublicView { group, items };
        state.check_members()?;
        if !state.is_member(caller) {
            return Err(Invalid(format!(
                "{} is not a member of the group it hands over",
                caller.short()
            )));
        }
        Ok(state)
    }

    /// Reads a state stored with [`Self::encode`], with the proposals kept
    /// for its epoch (the items [`Self::add_proposal`] returned, in order).
    pub fn decode(group_id: &[u8], bytes: &[u8], proposals: &[Vec<u8>]) -> Result<PublicView, DamagedState> {
        let mut snapshot: Snapshot = decode(bytes).map_err(|e| DamagedState(e.0))?;
        for item in proposals {
            let (reference, proposal): (Vec<u8>, Vec<u8>) = decode(item).map_err(|e| DamagedState(e.0))?;
            snapshot.proposals.retain(|(stored, _)| *stored != reference);
            snapshot.proposals.push((reference, proposal));
        }
        let items = Items(RefCell::new(snapshot));
        let group = PublicGroup::load(&items, &MlsGroupId::from_slice(group_id))
            .map_err(|e| DamagedState(e.0))?
            .ok_or_else(|| DamagedState("incomplete".into()))?;
        Ok(PublicView { group, items })
    }

    /// The state as one blob, for storage, without the proposals (each
    /// kept on its own; a Commit's new epoch starts with none).
    pub fn encode(&self) -> Vec<u8> {
        let mut snapshot = self.items.0.borrow_mut();
        let proposals = std::mem::take(&mut snapshot.proposals);
        // Serializing plain byte vectors into a vector cannot fail.
        let bytes = encode(&*snapshot).unwrap_or_default();
        snapshot.proposals = proposals;
        bytes
    }

    /// The group's current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// How many members the group has.
    pub fn member_count(&self) -> usize {
        self.group.members().count()
    }

    /// A digest of the group's current state (its GroupContext: group id,
    /// epoch, tree hash, transcript hash, extensions): what a member of
    /// this epoch, and only one, can show again. The node keeps it when it
    /// forgets a group's view, so that only a state of exactly this epoch
    /// of this group can be handed over again.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest as _;
        // Encoding a context openmls built cannot fail.
        let context = self
            .group
            .group_context()
            .tls_serialize_detached()
            .unwrap_or_default();
        let mut hash = sha2::Sha256::new();
        hash.update(b"quicnprotochat group fingerprint v1");
        hash.update(&context);
        hash.finalize().into()
    }

    /// How many standalone proposals the view keeps for a Commit of the
    /// current epoch.
    pub fn proposal_count(&self) -> usize {
        self.items.0.borrow().proposals.len()
    }

    /// The device key of every member (the leaves' signature keys), in
    /// tree order.
    pub fn member_devices(&self) -> Vec<IdentityKey> {
        self.group
            .members()
            .filter_map(|member| IdentityKey::try_from(member.signature_key.as_slice()).ok())
            .collect()
    }

    /// Whether `identity` owns a leaf of the group.
    pub fn is_member(&self, identity: &IdentityKey) -> bool {
        self.group
            .members()
            .any(|member| member.signature_key == identity.as_bytes())
    }

    /// Checks `commit` (a TLS-encoded MLSMessage carrying a PublicMessage
    /// Commit of the current epoch, sent by `caller`) and applies it: the
    /// group moves to the next epoch. Returns the members the Commit added
    /// (they join by Welcome and need the new epoch's
    /// [`Self::ratchet_tree`]; the caller checks their devices against
    /// their users' lists) and whether it took a device out (which moves
    /// the group's state key on). On `Err` the state may be partly changed:
    /// drop it and decode the stored one again.
    pub fn apply_commit(&mut self, commit: &[u8], caller: &IdentityKey) -> Result<Applied, Invalid> {
        let processed = self.process(commit, "Commit")?;
        let sender = processed.sender().clone();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(Invalid("the message is not a Commit".into()));
        };
        self.check_commit(&sender, &staged, caller)?;
        let added = staged
            .add_proposals()
            .map(|add| leaf_member(add.add_proposal().key_package().leaf_node()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Invalid(format!("an added member: {e}")))?;
        // Read from the proposals, not by comparing the members before and
        // after: the same answer at the cost of the proposals, not of the
        // group's size. An external Commit's new leaf is its sender (the
        // same device, rejoining).
        let removed = staged.queued_proposals().filter_map(|queued| {
            let index = match (queued.proposal(), queued.sender()) {
                (Proposal::Remove(remove), _) => remove.removed(),
                (Proposal::SelfRemove, Sender::Member(index)) => *index,
                _ => return None,
            };
            self.group.leaf(index).and_then(|leaf| leaf_member(leaf).ok())
        });
        let rejoiner = matches!(sender, Sender::NewMemberCommit).then_some(*caller);
        let takes_out_a_device = removed
            .collect::<Vec<_>>()
            .iter()
            .any(|gone| Some(gone.device) != rejoiner && !added.iter().any(|new| new.device == gone.device));
        self.group
            .merge_commit(&self.items, *staged)
            .map_err(|e| Invalid(format!("the Commit cannot be applied: {e}")))?;
        self.check_members()?;
        Ok(Applied {
            added,
            takes_out_a_device,
        })
    }

    /// The current epoch's ratchet tree, TLS-encoded: what a member joining
    /// by a Welcome of this epoch needs.
    pub fn ratchet_tree(&self) -> Vec<u8> {
        // Encoding a tree openmls built and checked cannot fail.
        self.group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .unwrap_or_default()
    }

    /// Keeps `group_info` (a TLS-encoded MLSMessage carrying the GroupInfo of
    /// the current epoch, without the ratchet tree) to serve to members who
    /// rejoin by external commit: its group context must be the group's
    /// current one and `signer` (the member whose Commit started the epoch)
    /// must have signed it.
    pub fn accept_group_info(&mut self, group_info: &[u8], signer: &IdentityKey) -> Result<(), Invalid> {
        let message = MlsMessageIn::tls_deserialize_exact_bytes(group_info)
            .map_err(|e| Invalid(format!("groupInfo is not an MLS message: {e}")))?;
        let MlsMessageBodyIn::GroupInfo(info) = message.extract() else {
            return Err(Invalid("groupInfo does not carry a GroupInfo".into()));
        };
        // Without it nobody can rejoin from it, and rejoining is how a
        // member that cannot process a Commit carries on.
        if info.extensions().external_pub().is_none() {
            return Err(Invalid(
                "groupInfo lacks the external_pub extension, without which nobody can rejoin from it".into(),
            ));
        }
        if info.group_context() != self.group.group_context() {
            return Err(Invalid(format!(
                "groupInfo does not describe the group in epoch {} as the Commit left it",
                self.epoch()
            )));
        }
        let key = OpenMlsSignaturePublicKey::from_signature_key(
            SignaturePublicKey::from(signer.as_bytes().to_vec()),
            SignatureScheme::ED25519,
        );
        info.verify_no_out(&RustCrypto::default(), &key)
            .map_err(|_| Invalid("groupInfo is not signed by the committer".into()))?;
        self.items.0.borrow_mut().group_info = Some(group_info.to_vec());
        Ok(())
    }

    /// The current epoch's GroupInfo (as accepted) and the ratchet tree
    /// (TLS-encoded), for a member rejoining by external commit; `None`
    /// while no Commit of this epoch brought a GroupInfo.
    pub fn group_info(&self) -> Option<crate::GroupState> {
        let group_info = self.items.0.borrow().group_info.clone()?;
        Some(crate::GroupState {
            group_info,
            ratchet_tree: self.ratchet_tree(),
        })
    }

    /// Checks a standalone proposal (a TLS-encoded MLSMessage carrying a
    /// PublicMessage proposal of the current epoch, sent by `caller`) and
    /// keeps it for a Commit of this epoch to reference. Returns the member
    /// it adds, if it is an Add (the caller checks its device), and the
    /// item to store beside the view for [`Self::decode`].
    pub fn add_proposal(
        &mut self,
        proposal: &[u8],
        caller: &IdentityKey,
    ) -> Result<(Vec<MemberKey>, Vec<u8>), Invalid> {
        let processed = self.process(proposal, "proposal")?;
        let sender = processed.sender().clone();
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(Invalid("the message is not a proposal from a member".into()));
        };
        self.check_sender(&sender, caller)?;
        self.check_proposal(&queued)?;
        let added = match queued.proposal() {
            Proposal::Add(add) => vec![
                leaf_member(add.key_package().leaf_node())
                    .map_err(|e| Invalid(format!("an added member: {e}")))?,
            ],
            _ => Vec::new(),
        };
        self.group
            .add_proposal(&self.items, *queued)
            .map_err(|e| Invalid(format!("the proposal cannot be kept: {e}")))?;
        // `queue_proposal` put it last.
        let item = self
            .items
            .0
            .borrow()
            .proposals
            .last()
            .map(encode)
            .transpose()
            .map_err(|e| Invalid(format!("the proposal cannot be kept: {e}")))?
            .ok_or_else(|| Invalid("the proposal was not kept".into()))?;
        Ok((added, item))
    }

    fn process(&self, bytes: &[u8], what: &str) -> Result<openmls::prelude::ProcessedMessage, Invalid> {
        let message = MlsMessageIn::tls_deserialize_exact_bytes(bytes)
            .map_err(|e| Invalid(format!("the {what} is not an MLS message: {e}")))?;
        if message.wire_format() != WireFormat::PublicMessage {
            return Err(Invalid(format!(
                "the {what} is a {:?}; handshake messages must be PublicMessages so the node can check them",
                message.wire_format()
            )));
        }
        let message = message
            .try_into_protocol_message()
            .map_err(|e| Invalid(format!("the {what} is not a group message: {e}")))?;
        self.group
            .process_message(&RustCrypto::default(), message)
            .map_err(|e| Invalid(format!("the {what} is not valid for the group: {e}")))
    }

    /// The sender must be `caller`: a member at a leaf with its identity.
    fn check_sender(&self, sender: &Sender, caller: &IdentityKey) -> Result<(), Invalid> {
        match sender {
            Sender::Member(index) => {
                let identity = self
                    .group
                    .leaf(*index)
                    .and_then(|leaf| leaf_identity(leaf).ok())
                    .ok_or_else(|| Invalid("the sender's leaf has no valid identity".into()))?;
                if identity == *caller {
                    Ok(())
                } else {
                    Err(Invalid(format!(
                        "signed by {}, but this connection is {}",
                        identity.short(),
                        caller.short()
                    )))
                }
            }
            other => Err(Invalid(format!("sent by {other:?}, not by a member"))),
        }
    }

    fn check_commit(
        &self,
        sender: &Sender,
        staged: &StagedCommit,
        caller: &IdentityKey,
    ) -> Result<(), Invalid> {
        for queued in staged.queued_proposals() {
            self.check_proposal(queued)?;
        }
        // Compared as user and device both: a leaf that kept its device but
        // named another user would be refused by every member.
        let path_member = staged
            .update_path_leaf_node()
            .map(|leaf| leaf_member(leaf).map_err(|e| Invalid(format!("the Commit's new leaf: {e}"))))
            .transpose()?;
        match sender {
            Sender::NewMemberCommit => {
                // An external commit is accepted only as a member's rejoin:
                // its new leaf is the caller, and it removes the caller's
                // old leaf. A stranger holding a GroupInfo gets nothing.
                let Some(joiner) = path_member.filter(|member| member.device == *caller) else {
                    return Err(Invalid(
                        "an external Commit's new leaf must be the caller's".into(),
                    ));
                };
                let removes_own_leaf = staged.remove_proposals().any(|remove| {
                    self.group
                        .leaf(remove.remove_proposal().removed())
                        .and_then(|leaf| leaf_member(leaf).ok())
                        == Some(joiner)
                });
                if !removes_own_leaf {
                    return Err(Invalid(
                        "an external Commit is accepted only from a member rejoining (it must remove the caller's old leaf)"
                            .into(),
                    ));
                }
                Ok(())
            }
            _ => {
                self.check_sender(sender, caller)?;
                let old = match sender {
                    Sender::Member(index) => self.group.leaf(*index).and_then(|leaf| leaf_member(leaf).ok()),
                    _ => None,
                };
                match path_member {
                    Some(new) if Some(new) != old => {
                        Err(Invalid("the committer changed its identity".into()))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    fn check_proposal(&self, queued: &QueuedProposal) -> Result<(), Invalid> {
        match queued.proposal() {
            Proposal::Add(add) => leaf_identity(add.key_package().leaf_node())
                .map(drop)
                .map_err(|e| Invalid(format!("an added member: {e}"))),
            Proposal::Update(update) => {
                let new = leaf_member(update.leaf_node()).map_err(|e| Invalid(format!("an update: {e}")))?;
                let Sender::Member(index) = queued.sender() else {
                    return Err(Invalid("an update from a non-member".into()));
                };
                let old = self.group.leaf(*index).and_then(|leaf| leaf_member(leaf).ok());
                if old == Some(new) {
                    Ok(())
                } else {
                    Err(Invalid("a member may not change its identity".into()))
                }
            }
            Proposal::Remove(_) | Proposal::SelfRemove | Proposal::ExternalInit(_) => Ok(()),
            other => Err(Invalid(format!(
                "{:?} proposals are not supported",
                other.proposal_type()
            ))),
        }
    }

    /// Every member's leaf follows our identity rules, and no identity owns
    /// two leaves.
    fn check_members(&self) -> Result<(), Invalid> {
        let mut seen = HashSet::new();
        for member in self.group.members() {
            let leaf = self
                .group
                .leaf(member.index)
                .ok_or_else(|| Invalid("a member without a leaf".into()))?;
            let identity = leaf_identity(leaf).map_err(|e| Invalid(format!("a member's leaf: {e}")))?;
            if !seen.insert(identity) {
                return Err(Invalid(format!("{} would own two leaves", identity.short())));
            }
        }
        Ok(())
    }
}

/// What `PublicGroup` stores, each item encoded on its own.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    tree: Option<Vec<u8>>,
    context: Option<Vec<u8>>,
    interim_transcript_hash: Option<Vec<u8>>,
    confirmation_tag: Option<Vec<u8>>,
    /// (proposal reference, proposal), in the order they came.
    proposals: Vec<(Vec<u8>, Vec<u8>)>,
    /// The current epoch's GroupInfo, as its committer sent it.
    group_info: Option<Vec<u8>>,
}

/// `PublicGroup`'s storage for one command: the items of one group, in
/// memory, written back as one blob.
#[derive(Debug, Default)]
struct Items(RefCell<Snapshot>);

/// An item that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CodecError(String);

/// postcard: compact (a byte vector is its length and its bytes) and
/// deterministic; JSON would spend about four bytes per byte of a tree.
fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(value).map_err(|e| CodecError(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()))
}

fn read<T: DeserializeOwned>(item: &Option<Vec<u8>>) -> Result<Option<T>, CodecError> {
    item.as_deref().map(decode).transpose()
}

impl PublicStorageProvider<CURRENT_VERSION> for Items {
    type PublicError = CodecError;

    fn write_tree<G: traits::GroupId<CURRENT_VERSION>, T: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        _: &G,
        tree: &T,
    ) -> Result<(), CodecError> {
        self.0.borrow_mut().tree = Some(encode(tree)?);
        Ok(())
    }

    fn write_interim_transcript_hash<
        G: traits::GroupId<CURRENT_VERSION>,
        H: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        hash: &H,
    ) -> Result<(), CodecError> {
        self.0.borrow_mut().interim_transcript_hash = Some(encode(hash)?);
        Ok(())
    }

    fn write_context<G: traits::GroupId<CURRENT_VERSION>, C: traits::GroupContext<CURRENT_VERSION>>(
        &self,
        _: &G,
        context: &C,
    ) -> Result<(), CodecError> {
        self.0.borrow_mut().context = Some(encode(context)?);
        Ok(())
    }

    fn write_confirmation_tag<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        tag: &C,
    ) -> Result<(), CodecError> {
        self.0.borrow_mut().confirmation_tag = Some(encode(tag)?);
        Ok(())
    }

    fn queue_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
        reference: &R,
        proposal: &P,
    ) -> Result<(), CodecError> {
        let reference = encode(reference)?;
        let proposal = encode(proposal)?;
        let mut snapshot = self.0.borrow_mut();
        snapshot.proposals.retain(|(stored, _)| *stored != reference);
        snapshot.proposals.push((reference, proposal));
        Ok(())
    }

    fn queued_proposals<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> Result<Vec<(R, P)>, CodecError> {
        self.0
            .borrow()
            .proposals
            .iter()
            .map(|(reference, proposal)| Ok((decode(reference)?, decode(proposal)?)))
            .collect()
    }

    fn tree<G: traits::GroupId<CURRENT_VERSION>, T: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> Result<Option<T>, CodecError> {
        read(&self.0.borrow().tree)
    }

    fn group_context<G: traits::GroupId<CURRENT_VERSION>, C: traits::GroupContext<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> Result<Option<C>, CodecError> {
        read(&self.0.borrow().context)
    }

    fn interim_transcript_hash<
        G: traits::GroupId<CURRENT_VERSION>,
        H: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        _: &G,
    ) -> Result<Option<H>, CodecError> {
        read(&self.0.borrow().interim_transcript_hash)
    }

    fn confirmation_tag<G: traits::GroupId<CURRENT_VERSION>, C: traits::ConfirmationTag<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> Result<Option<C>, CodecError> {
        read(&self.0.borrow().confirmation_tag)
    }

    fn delete_tree<G: traits::GroupId<CURRENT_VERSION>>(&self, _: &G) -> Result<(), CodecError> {
        self.0.borrow_mut().tree = None;
        Ok(())
    }

    fn delete_confirmation_tag<G: traits::GroupId<CURRENT_VERSION>>(&self, _: &G) -> Result<(), CodecError> {
        self.0.borrow_mut().confirmation_tag = None;
        Ok(())
    }

    fn delete_context<G: traits::GroupId<CURRENT_VERSION>>(&self, _: &G) -> Result<(), CodecError> {
        self.0.borrow_mut().context = None;
        Ok(())
    }

    fn delete_interim_transcript_hash<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> Result<(), CodecError> {
        self.0.borrow_mut().interim_transcript_hash = None;
        Ok(())
    }

    fn remove_proposal<G: traits::GroupId<CURRENT_VERSION>, R: traits::ProposalRef<CURRENT_VERSION>>(
        &self,
        _: &G,
        reference: &R,
    ) -> Result<(), CodecError> {
        let reference = encode(reference)?;
        self.0
            .borrow_mut()
            .proposals
            .retain(|(stored, _)| *stored != reference);
        Ok(())
    }

    fn clear_proposal_queue<G: traits::GroupId<CURRENT_VERSION>, R: traits::ProposalRef<CURRENT_VERSION>>(
        &self,
        _: &G,
    ) -> Result<(), CodecError> {
        self.0.borrow_mut().proposals.clear();
        Ok(())
    }
}
