//! Identifiers that cross crates: queue sequence numbers, group ids and
//! the hashes the node keys groups, message ids and key backups by.
//! Newtypes, so a sequence number is never mistaken for an epoch or a count,
//! and a group id for a payload.

use std::fmt;

/// A message's place in its recipient's queue: unique and strictly
/// increasing within the queue, never reused. [`Seq::ZERO`] comes before
/// the first message ("from the start").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Seq(u64);

impl Seq {
    /// Before every message of a queue.
    pub const ZERO: Seq = Seq(0);

    /// The sequence number `value`.
    pub const fn new(value: u64) -> Seq {
        Seq(value)
    }

    /// Its value on the wire.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for Seq {
    fn from(value: u64) -> Seq {
        Seq(value)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An MLS group id as the node sees it: 1 to [`GroupId::MAX_LEN`] opaque
/// bytes chosen by the group's creator.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    /// Longest group id accepted.
    pub const MAX_LEN: usize = 256;

    /// The id's bytes, if they are 1 to [`Self::MAX_LEN`] long.
    pub fn new(bytes: Vec<u8>) -> Option<GroupId> {
        (!bytes.is_empty() && bytes.len() <= Self::MAX_LEN).then_some(GroupId(bytes))
    }

    /// An id a group was created, joined or rejoined with: those check it
    /// is one [`Self::new`] takes, so a group's id is one.
    pub(crate) fn admitted(bytes: Vec<u8>) -> GroupId {
        GroupId(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// What the node keys a group's rows by: `SHA-256("quicnprotochat group"
/// || id)`. The node learns a group's id from each message of it while it
/// checks that message, and stores only this, so its files do not hold the
/// id (whose creator may have put a name in it). A hash of a random id
/// reveals nothing; a key would add nothing against a copy of the files
/// taken with the node's own keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupRef([u8; 32]);

impl GroupRef {
    /// The reference of the group with `id`.
    pub fn of(id: &GroupId) -> GroupRef {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"quicnprotochat group");
        hash.update(id.as_bytes());
        GroupRef(hash.finalize().into())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for GroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupRef({})", hex::encode(&self.0[..8]))
    }
}

impl AsRef<[u8]> for GroupId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "GroupId({text:?})"),
            Err(_) => write!(f, "GroupId({})", hex::encode(&self.0)),
        }
    }
}

/// What the node keeps of a sender's message id, to store each message at
/// most once: SHA-256("quicnprotochat message id" || sender || message id).
/// The sender's identity key is 32 bytes, so the two cannot run into each
/// other. A copy of the node's files then shows neither who sent a message
/// nor its id; telling whether a given person sent one would take its
/// random id, which the node keeps nowhere else.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageKey([u8; 32]);

impl MessageKey {
    /// The key of `message_id` sent by `sender`.
    pub fn of(sender: &IdentityKey, message_id: &[u8]) -> MessageKey {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"quicnprotochat message id");
        hash.update(sender.as_bytes());
        hash.update(message_id);
        MessageKey(hash.finalize().into())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageKey({})", hex::encode(&self.0[..8]))
    }
}

/// What the node keeps a device's key backup (its groups and their state
/// keys, sealed by the device) under: SHA-256("quicnprotochat key backup"
/// || secret), where the secret is 32 bytes the device derives from its
/// identity secret and presents with each call. The node never stores the
/// secret, so a copy of its files cannot tell whose backup a row is, and
/// only a holder of the secret can name the row to read or replace it.
/// The label keeps these hashes apart from the node's other ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupRef([u8; 32]);

impl BackupRef {
    /// The reference of the backup of the device that presents `secret`.
    pub fn of(secret: &[u8; 32]) -> BackupRef {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"quicnprotochat key backup");
        hash.update(secret);
        BackupRef(hash.finalize().into())
    }

    /// A reference read back from storage, which holds only references
    /// [`Self::of`] made.
    pub fn from_bytes(bytes: [u8; 32]) -> BackupRef {
        BackupRef(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for BackupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackupRef({})", hex::encode(&self.0[..8]))
    }
}

/// One message waiting in a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Its place in the queue.
    pub seq: Seq,
    /// The opaque message.
    pub payload: Vec<u8>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The reference is the documented hash (docs/protocol.md), which the
    /// PostgreSQL migration computes in SQL too.
    #[test]
    fn a_group_ref_is_sha256_of_the_label_and_the_id() {
        let team = GroupRef::of(&GroupId::new(b"team".to_vec()).unwrap());
        assert_eq!(
            hex::encode(team.as_bytes()),
            "f3fcd028f524e991dea055443cf1604be98324059a5c5e1683f5f762cef89f9f"
        );
        assert_ne!(team, GroupRef::of(&GroupId::new(b"teams".to_vec()).unwrap()));
    }

    /// The PostgreSQL migration computes the same hash in SQL.
    #[test]
    fn a_message_key_is_sha256_of_the_label_the_sender_and_the_id() {
        let sender = IdentityKey::from_bytes([7; 32]);
        let key = MessageKey::of(&sender, b"id-1");
        let mut input = b"quicnprotochat message id".to_vec();
        input.extend_from_slice(&[7; 32]);
        input.extend_from_slice(b"id-1");
        use sha2::Digest;
        assert_eq!(key.as_bytes()[..], sha2::Sha256::digest(&input)[..]);
        assert_ne!(key, MessageKey::of(&IdentityKey::from_bytes([8; 32]), b"id-1"));
        assert_ne!(key, MessageKey::of(&sender, b"id-2"));
    }

    /// Each secret names a backup of its own, the same one every time, and
    /// the reference is the documented hash, which does not hold the
    /// secret.
    #[test]
    fn a_backup_ref_is_sha256_of_the_label_and_the_secret() {
        let secret = [7; 32];
        let backup = BackupRef::of(&secret);
        assert_eq!(backup, BackupRef::of(&[7; 32]));
        assert_ne!(backup, BackupRef::of(&[8; 32]));
        assert_ne!(backup.as_bytes(), &secret);
        let mut input = b"quicnprotochat key backup".to_vec();
        input.extend_from_slice(&secret);
        use sha2::Digest;
        assert_eq!(backup.as_bytes()[..], sha2::Sha256::digest(&input)[..]);
        assert_eq!(BackupRef::from_bytes(*backup.as_bytes()), backup);
    }

    #[test]
    fn a_group_id_is_one_to_256_bytes() {
        assert!(GroupId::new(Vec::new()).is_none());
        assert!(GroupId::new(vec![7; 257]).is_none());
        assert_eq!(
            GroupId::new(vec![7; 256]).map(|id| id.as_bytes().len()),
            Some(256)
        );
        assert_eq!(
            format!("{:?}", GroupId::new(b"g#1".to_vec()).unwrap()),
            "GroupId(\"g#1\")"
        );
    }

    #[test]
    fn sequence_numbers_order_by_value() {
        assert!(Seq::ZERO < Seq::new(1));
        assert_eq!(Seq::from(9).get(), 9);
    }
}

/// Length of an identity key in bytes.
const KEY_LEN: usize = 32;

/// A user's public identity: a 32-byte Ed25519 public key.
///
/// Displayed and parsed as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey([u8; KEY_LEN]);

impl IdentityKey {
    /// Wraps raw key bytes. No point validation: the bytes are only ever
    /// used for comparison and as MLS signature keys, which openmls checks
    /// when verifying signatures.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The first 16 hex characters, for compact display to humans.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..KEY_LEN / 4])
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({}…)", self.short())
    }
}
