//! What the delivery rules need from a database: one transaction's reads and
//! writes, row by row, with no rule of its own.
//!
//! A backend implements [`Storage`] for the duration of one command inside
//! its transaction; the rules in [`super::rules`] decide everything else. The
//! conformance suite (`tests/conformance/`) holds every backend to the same
//! behaviour.

use quicnprotochat_core::{
    BackupRef, DeviceList, GroupRef, IdentityKey, KeyPackageStock, MessageKey, Seq, SignedDeviceList, Suite,
};
use quicnprotochat_proto::wire::ValidKeyPackage;

/// A stored KeyPackage's row id, to delete the one that was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackageRow(pub i64);

/// What waits in one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueUsage {
    /// Messages.
    pub messages: u64,
    /// Their payloads' bytes (a payload queued for many counts in each
    /// queue).
    pub bytes: u64,
}

/// What the whole store holds, for the node's gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages waiting in all queues.
    pub messages_queued: u64,
    /// KeyPackages stored, expired ones not yet purged included.
    pub key_packages_stored: u64,
}

/// A ratchet tree kept for the members a Commit added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeTree {
    /// The tree sealed under the key of its epoch
    /// (`quicnprotochat_core::sealed`); or, kept before protocol 8 (when
    /// `joiners` is not empty), TLS-encoded in clear.
    pub tree: Vec<u8>,
    /// Before protocol 8, who may fetch the tree: the members the Commit
    /// added. Empty for a sealed tree, whose key is the permission.
    pub joiners: Vec<IdentityKey>,
}

impl WelcomeTree {
    /// A tree and the joiners read back from their columns: the joiners'
    /// keys one after another (nothing, for a sealed tree).
    pub fn from_columns(tree: Vec<u8>, joiners: &[u8]) -> WelcomeTree {
        WelcomeTree {
            tree,
            joiners: joiners
                .chunks_exact(32)
                .filter_map(|key| <[u8; 32]>::try_from(key).ok())
                .map(IdentityKey::from_bytes)
                .collect(),
        }
    }
}

/// A device list as database columns keep it; both backends convert
/// through here, so they store exactly the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListColumns {
    /// The version's 64 bits as a signed integer (SQL has no unsigned
    /// one). Versions are compared in Rust only (and for equality in SQL),
    /// so a version of 2^63 or more is stored and compared like any other
    /// instead of being refused.
    pub version: i64,
    /// The device keys, 32 bytes each, one after another, ascending.
    pub devices: Vec<u8>,
    /// The user key's signature.
    pub signature: [u8; 64],
}

/// A stored device list row does not hold a list: the database was changed
/// behind the node's back (the tables' checks keep the node from writing
/// one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stored device list of {user} is damaged: {reason}")]
pub struct DamagedDeviceList {
    /// The user key, short.
    pub user: String,
    /// What is wrong with the row.
    pub reason: String,
}

impl DeviceListColumns {
    /// The columns of `signed`.
    pub fn of(signed: &SignedDeviceList) -> DeviceListColumns {
        let list = signed.list();
        DeviceListColumns {
            version: i64::from_be_bytes(list.version().to_be_bytes()),
            devices: list.devices().iter().flat_map(|key| *key.as_bytes()).collect(),
            signature: *signed.signature(),
        }
    }

    /// The list of `user` read back from its columns.
    pub fn read(
        user: IdentityKey,
        version: i64,
        devices: &[u8],
        signature: &[u8],
    ) -> Result<SignedDeviceList, DamagedDeviceList> {
        let damaged = |reason: String| DamagedDeviceList {
            user: user.short(),
            reason,
        };
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| damaged(format!("a signature of {} bytes", signature.len())))?;
        if !devices.len().is_multiple_of(32) {
            return Err(damaged(format!("{} bytes of device keys", devices.len())));
        }
        let devices = devices
            .chunks_exact(32)
            .filter_map(|key| <[u8; 32]>::try_from(key).ok())
            .map(IdentityKey::from_bytes);
        let version = u64::from_be_bytes(version.to_be_bytes());
        let list = DeviceList::new(user, version, devices).map_err(|e| damaged(e.to_string()))?;
        Ok(SignedDeviceList::from_parts(list, signature))
    }
}

/// One transaction's reads and writes. Times are Unix seconds, passed in so
/// that the rules stay deterministic.
pub trait Storage {
    /// The backend's failure (I/O, disk full, connection lost); the command
    /// it happened in has no effect.
    type Error;

    /// Stores a validated KeyPackage of `identity`, under its suite.
    fn insert_key_package(
        &mut self,
        identity: &IdentityKey,
        package: &ValidKeyPackage,
        now: i64,
    ) -> Result<(), Self::Error>;

    /// Whether `identity` has a KeyPackage stored whose bytes have this
    /// SHA-256 `fingerprint` (served ones are gone; ones stored before
    /// fingerprints were kept are not found).
    fn has_key_package(
        &mut self,
        identity: &IdentityKey,
        fingerprint: &[u8; 32],
    ) -> Result<bool, Self::Error>;

    /// The oldest ordinary (not last-resort) KeyPackage of `identity` in
    /// `suite` that expires after `now`.
    fn oldest_key_package(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<Option<(KeyPackageRow, Vec<u8>)>, Self::Error>;

    /// Deletes one KeyPackage.
    fn delete_key_package(&mut self, row: KeyPackageRow) -> Result<(), Self::Error>;

    /// The newest last-resort KeyPackage of `identity` in `suite` that
    /// expires after `now`.
    fn newest_last_resort(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<Option<Vec<u8>>, Self::Error>;

    /// How many KeyPackages of `identity` in `suite` (ordinary and
    /// last-resort) expire after `now`.
    fn stored_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<u64, Self::Error>;

    /// How many ordinary KeyPackages of `identity` in `suite` expire after
    /// `now`, and whether a last-resort one of that suite does.
    fn count_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<KeyPackageStock, Self::Error>;

    /// Whether a sender already used a message id ([`MessageKey`]: the
    /// backend never sees who sent it).
    fn message_id_used(&mut self, key: &MessageKey) -> Result<bool, Self::Error>;

    /// Records that a sender used a message id; false (recording nothing)
    /// if it already had.
    fn claim_message_id(&mut self, key: &MessageKey, now: i64) -> Result<bool, Self::Error>;

    /// How many messages, with how many payload bytes, wait in the queue of
    /// `recipient`.
    fn queue_usage(&mut self, recipient: &IdentityKey) -> Result<QueueUsage, Self::Error>;

    /// Appends `payload` to the queue of each of `recipients` (distinct).
    /// Each queue gives it a sequence number above every number it ever
    /// gave, and a reader of that queue sees them in increasing order once
    /// this transaction commits.
    fn append(&mut self, recipients: &[IdentityKey], payload: &[u8], now: i64) -> Result<(), Self::Error>;

    /// Hands the messages of `recipient` after `after` to `visit`, oldest
    /// first, until `visit` returns false or the queue ends.
    fn scan_queue(
        &mut self,
        recipient: &IdentityKey,
        after: Seq,
        visit: &mut dyn FnMut(Seq, Vec<u8>) -> bool,
    ) -> Result<(), Self::Error>;

    /// Deletes the messages of `recipient` up to and including `up_to`;
    /// returns how many.
    fn delete_through(&mut self, recipient: &IdentityKey, up_to: Seq) -> Result<usize, Self::Error>;

    /// The epoch `group` is in, if the node has seen a Commit for it.
    ///
    /// A group is named by its [`GroupRef`], a hash of its id, in every
    /// method: the node never stores a group id.
    fn group_epoch(&mut self, group: &GroupRef) -> Result<Option<u64>, Self::Error>;

    /// Moves `group` to `epoch`, whose state has `fingerprint`
    /// (`PublicView::fingerprint`).
    fn set_group_epoch(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        fingerprint: &[u8; 32],
    ) -> Result<(), Self::Error>;

    /// The fingerprint of the state `group` is in, if the node kept one
    /// (groups of nodes before it have none).
    fn group_fingerprint(&mut self, group: &GroupRef) -> Result<Option<[u8; 32]>, Self::Error>;

    /// The stored public view of `group` (an opaque blob, see
    /// `quicnprotochat_core::PublicView`), if the node has one.
    fn group_view(&mut self, group: &GroupRef) -> Result<Option<Vec<u8>>, Self::Error>;

    /// Stores the public view of `group`, replacing the old one, as changed
    /// at `now`, and forgets the proposals kept for it: a new view starts
    /// an epoch, which has none yet.
    fn set_group_view(&mut self, group: &GroupRef, view: &[u8], now: i64) -> Result<(), Self::Error>;

    /// The proposals kept for `group` in `epoch`, in the order they came
    /// (opaque items, see `quicnprotochat_core::PublicView::add_proposal`).
    fn group_proposals(&mut self, group: &GroupRef, epoch: u64) -> Result<Vec<Vec<u8>>, Self::Error>;

    /// Keeps one more proposal for `group` in `epoch`, at `now` (which
    /// counts as a change of the group for [`Self::purge_idle_groups`]),
    /// leaving the view as it is.
    fn add_group_proposal(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        item: &[u8],
        now: i64,
    ) -> Result<(), Self::Error>;

    /// Forgets the public views of groups unchanged since before `before`,
    /// with their proposals (their epochs stay, so nobody can hand the node
    /// an older state); returns how many.
    fn purge_idle_groups(&mut self, before: i64) -> Result<usize, Self::Error>;

    /// Keeps `sealed`, the ratchet tree of `group` in `epoch` sealed under
    /// that epoch's key, for the members the Commit that started `epoch`
    /// added to fetch with their Welcome, and forgets the trees of the
    /// group's older epochs but the newest `keep` (this one included).
    fn put_welcome_tree(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        sealed: &[u8],
        keep: usize,
        now: i64,
    ) -> Result<(), Self::Error>;

    /// The tree kept for the joiners of `epoch` of `group` (and, for one
    /// kept before protocol 8, who they are).
    fn welcome_tree(&mut self, group: &GroupRef, epoch: u64) -> Result<Option<WelcomeTree>, Self::Error>;

    /// Deletes messages, message ids and Welcome trees recorded before
    /// `older_than`, and KeyPackages expired at `now`; returns how many
    /// messages went.
    fn purge(&mut self, older_than: i64, now: i64) -> Result<usize, Self::Error>;

    /// The stored device list of `user`, if any, as it was stored.
    fn device_list(&mut self, user: &IdentityKey) -> Result<Option<SignedDeviceList>, Self::Error>;

    /// The stored device lists of those of `users` that have one, in any
    /// order.
    fn device_lists(&mut self, users: &[IdentityKey]) -> Result<Vec<SignedDeviceList>, Self::Error>;

    /// Stores `list` as its user's list, replacing the stored one, which
    /// this command read with [`Self::device_list`] (a backend shared by
    /// several nodes fails with a retryable error, never overwriting, if
    /// the stored list changed since).
    fn put_device_list(&mut self, list: &SignedDeviceList, now: i64) -> Result<(), Self::Error>;

    /// Whether a list of `user` once dropped `device`.
    fn is_removed_device(&mut self, user: &IdentityKey, device: &IdentityKey) -> Result<bool, Self::Error>;

    /// Records that a list of `user` dropped `devices`, for good.
    fn remove_devices(
        &mut self,
        user: &IdentityKey,
        devices: &[IdentityKey],
        now: i64,
    ) -> Result<(), Self::Error>;

    /// The key backup kept under `backup`, if any: the opaque blob its
    /// device sealed, as last stored.
    ///
    /// A backup is named only by its [`BackupRef`], a hash of a secret its
    /// device presents: the node never stores the secret, nor whose backup
    /// it is (so [`Self::knows`] does not count backups).
    fn key_backup(&mut self, backup: &BackupRef) -> Result<Option<Vec<u8>>, Self::Error>;

    /// Keeps `sealed` as the key backup under `backup`, replacing any
    /// earlier one, as written at `now`.
    fn put_key_backup(&mut self, backup: &BackupRef, sealed: &[u8], now: i64) -> Result<(), Self::Error>;

    /// Whether the node holds anything for `identity`: KeyPackages, queued
    /// messages or a device list (as its user). Such an identity is one the
    /// node already serves, for the connections reserved to them; every
    /// registered device keeps at least its last-resort KeyPackage.
    fn knows(&mut self, identity: &IdentityKey) -> Result<bool, Self::Error>;

    /// Messages queued and KeyPackages stored in all, for metrics; read
    /// every few seconds, so it must stay cheap (one row per queue at most).
    fn totals(&mut self) -> Result<Totals, Self::Error>;
}
