//! Real MLS groups for the node's tests: the Commits and proposals the
//! rules check are made by `quicnprotochat_core::GroupMember`, as a client
//! makes them. Shared by the rules' unit tests and the conformance suite.

#![allow(dead_code)] // each test file uses what it needs

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    CoreError, EpochKey, GroupId, GroupMember, IdentityKey, IdentityKeypair, generate_key_package,
};
use quicnprotochat_proto::wire::{CommitPublication, Envelope, GroupState, ProposalPublication};

/// One member of a real group: its identity, its MLS state.
pub struct Member {
    pub provider: OpenMlsRustCrypto,
    pub identity: IdentityKeypair,
    pub group: GroupMember,
    /// The GroupInfo of the epoch each Commit made here starts, by Commit:
    /// a test may publish a Commit after making (and discarding) others.
    group_infos: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    /// The key of the epoch each Commit made here starts, likewise.
    epoch_keys: std::collections::HashMap<Vec<u8>, EpochKey>,
}

impl Member {
    /// Creates the group `group_id` with `identity(seed)` as its only member.
    pub fn create(seed: u8, group_id: &[u8]) -> Member {
        let provider = OpenMlsRustCrypto::default();
        let identity = identity(seed);
        let group_id = GroupId::new(group_id.to_vec()).unwrap();
        let group = GroupMember::create(&provider, &identity, &group_id).unwrap();
        Member {
            provider,
            identity,
            group,
            group_infos: Default::default(),
            epoch_keys: Default::default(),
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

    /// Keeps the GroupInfo of the Commit just made, for its publication.
    fn note_group_info(&mut self, commit: &[u8]) {
        if let Some(info) = self.group.pending_group_info() {
            self.group_infos.insert(commit.to_vec(), info.to_vec());
        }
        if let Ok(key) = self.group.pending_epoch_key(&self.provider) {
            self.epoch_keys.insert(commit.to_vec(), key);
        }
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
        CommitPublication {
            group_id: group_id(&self.group),
            epoch: self.epoch(),
            // A Commit made straight on `group` has the pending GroupInfo.
            group_info: self
                .group_infos
                .get(&commit)
                .cloned()
                .or_else(|| self.group.pending_group_info().map(<[u8]>::to_vec)),
            epoch_key: self
                .epoch_keys
                .get(&commit)
                .cloned()
                .or_else(|| self.group.pending_epoch_key(&self.provider).ok()),
            commit: Envelope {
                recipients: to.to_vec(),
                payload: commit,
                message_id: Some(id.to_vec()),
            },
            welcome: None,
            initial_state: with_state.then(|| self.state()),
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
        }
    }
}

/// Joins the group of `welcome` as `identity(seed)`, with the provider that
/// made its KeyPackage and the ratchet tree of the Welcome's epoch.
pub fn join(seed: u8, provider: OpenMlsRustCrypto, welcome: &[u8], tree: &[u8]) -> Member {
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
        group_infos: Default::default(),
        epoch_keys: Default::default(),
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
