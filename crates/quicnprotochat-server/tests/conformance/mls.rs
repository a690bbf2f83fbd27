//! Real MLS groups for the node's tests: the Commits and proposals the
//! rules check are made by `quicnprotochat_core::GroupMember`, as a client
//! makes them. Shared by the rules' unit tests and the conformance suite.

#![allow(dead_code)] // each test file uses what it needs

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    CoreError, EpochKey, GroupId, GroupMember, IdentityKey, IdentityKeypair, StateKey, generate_key_package,
};
use quicnprotochat_proto::wire::{CommitPublication, Envelope, GroupState, ProposalPublication};

/// The GroupInfo, the key and the new state key (if it takes a device out)
/// of the epoch a Commit starts.
type NextEpoch = (Option<Vec<u8>>, Option<EpochKey>, Option<StateKey>);

/// One member of a real group: its identity, its MLS state.
pub struct Member {
    pub provider: OpenMlsRustCrypto,
    pub identity: IdentityKeypair,
    pub group: GroupMember,
    /// The group's state key, as a client keeps it.
    pub state_key: StateKey,
    /// The GroupInfo and the key of the epoch each Commit made here starts,
    /// by Commit: a test may publish a Commit after making (and discarding)
    /// others.
    next_epochs: std::collections::HashMap<Vec<u8>, NextEpoch>,
}

impl Member {
    /// Creates the group `group_id` with `identity(seed)` as its only member.
    pub fn create(seed: u8, group_id: &[u8]) -> Member {
        let provider = OpenMlsRustCrypto::default();
        let identity = identity(seed);
        let group_id = GroupId::new(group_id.to_vec()).unwrap();
        let group = GroupMember::create(&provider, &identity, &group_id).unwrap();
        let state_key = group.current_state_key(&provider).unwrap();
        Member {
            provider,
            identity,
            group,
            state_key,
            next_epochs: Default::default(),
        }
    }

    /// This member's identity key.
    pub fn key(&self) -> IdentityKey {
        self.identity.public_key()
    }

    pub fn epoch(&self) -> u64 {
        self.group.epoch()
    }

    /// The group's public state in the current epoch.
    pub fn state(&self) -> GroupState {
        let state = self
            .group
            .export_public_state(&self.provider, &self.identity)
            .unwrap();
        GroupState {
            group_info: state.group_info,
            ratchet_tree: state.ratchet_tree,
        }
    }

    /// A self-update Commit of the current epoch, left pending.
    pub fn update(&mut self) -> Vec<u8> {
        let commit = self.group.self_update(&self.provider, &self.identity).unwrap();
        self.note_group_info(&commit);
        commit
    }

    /// Keeps the GroupInfo and key of the epoch the Commit just made
    /// starts, for its publication.
    fn note_group_info(&mut self, commit: &[u8]) {
        self.next_epochs
            .insert(commit.to_vec(), self.pending_next_epoch());
    }

    /// The GroupInfo and key of the epoch the pending Commit starts.
    fn pending_next_epoch(&self) -> NextEpoch {
        (
            self.group.pending_group_info().map(<[u8]>::to_vec),
            self.group.pending_epoch_key(&self.provider).ok(),
            self.group.pending_state_key(&self.provider).ok().flatten(),
        )
    }

    /// Adds `identity(seed)` (a fresh KeyPackage of it): the Commit, left
    /// pending, and the Welcome.
    pub fn add(&mut self, seed: u8) -> (Vec<u8>, Vec<u8>, OpenMlsRustCrypto) {
        let joiner = OpenMlsRustCrypto::default();
        let key_package = generate_key_package(&joiner, &identity(seed)).unwrap();
        let added = self
            .group
            .add_members(
                &self.provider,
                &self.identity,
                &[key_package],
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        self.note_group_info(&added.commit);
        (added.commit, added.welcome, joiner)
    }

    pub fn merge(&mut self) {
        self.group.merge_pending_commit(&self.provider).unwrap();
        self.follow_state_key();
    }

    /// Takes the group's new state key after a Commit that took a device
    /// out, as a client does.
    pub fn follow_state_key(&mut self) {
        if self.group.state_key_rotated() {
            self.state_key = self.group.current_state_key(&self.provider).unwrap();
        }
    }

    pub fn discard(&mut self) {
        self.group.discard_pending_commit(&self.provider).unwrap();
    }

    /// The publication of `commit`, made in this member's current epoch, for
    /// `to`, with the GroupInfo of the epoch its pending Commit starts; with
    /// the group's initial state when `with_state`.
    pub fn publication(
        &self,
        commit: Vec<u8>,
        to: &[IdentityKey],
        id: &[u8],
        with_state: bool,
    ) -> CommitPublication {
        // A Commit made straight on `group` has the pending GroupInfo and key.
        let (group_info, epoch_key, new_state_key) = self
            .next_epochs
            .get(&commit)
            .cloned()
            .unwrap_or_else(|| self.pending_next_epoch());
        CommitPublication {
            group_id: group_id(&self.group),
            epoch: self.epoch(),
            group_info,
            epoch_key,
            commit: Envelope {
                recipients: to.to_vec(),
                payload: commit,
                message_id: Some(id.to_vec()),
            },
            welcome: None,
            initial_state: with_state.then(|| self.state()),
            state_key: self.state_key.clone(),
            new_state_key,
        }
    }

    /// A request to leave, as a standalone proposal for `to`.
    pub fn leave(&mut self, to: &[IdentityKey], id: &[u8]) -> ProposalPublication {
        let proposal = self.group.leave(&self.provider, &self.identity).unwrap();
        ProposalPublication {
            group_id: group_id(&self.group),
            epoch: self.epoch(),
            proposal: Envelope {
                recipients: to.to_vec(),
                payload: proposal,
                message_id: Some(id.to_vec()),
            },
            state_key: self.state_key.clone(),
        }
    }
}

/// Joins the group of `welcome` as `identity(seed)`, with the provider that
/// made its KeyPackage, the ratchet tree of the Welcome's epoch and the
/// group's state key (both as the node serves them to joiners).
pub fn join(
    seed: u8,
    provider: OpenMlsRustCrypto,
    welcome: &[u8],
    tree: &[u8],
    state_key: StateKey,
) -> Member {
    let group = GroupMember::join(
        &provider,
        welcome,
        Some(tree),
        &quicnprotochat_core::NoDeviceLists,
    )
    .unwrap();
    Member {
        provider,
        identity: identity(seed),
        group,
        state_key,
        next_epochs: Default::default(),
    }
}

/// The key of the epoch `welcome` starts, as its joiner computes it from the
/// Welcome alone (with the provider that holds its KeyPackage).
pub fn welcome_key(provider: &OpenMlsRustCrypto, welcome: &[u8]) -> EpochKey {
    match GroupMember::join(provider, welcome, None, &quicnprotochat_core::NoDeviceLists).err() {
        Some(CoreError::RatchetTreeNeeded { epoch_key, .. }) => epoch_key,
        other => panic!("a Welcome without its tree names its epoch's key, not {other:?}"),
    }
}

/// A deterministic identity.
pub fn identity(seed: u8) -> IdentityKeypair {
    IdentityKeypair::from_secret_bytes(&[seed; 32])
}

fn group_id(group: &GroupMember) -> GroupId {
    group.group_id()
}
