//! A device's key backup: the ids and state keys of its groups, kept on the
//! node so that a device restored from a backup of its identity alone can
//! find its groups again and rejoin them.
//!
//! Both what the node files the backup under and the key it is sealed with
//! are derived from the device's identity secret (HKDF-SHA256, one label
//! each), so only that device computes them. The node stores the backup
//! under a hash of the first ([`crate::BackupRef`]), so a copy
//! of its database can tell neither whose backup a row is nor what it holds.
//!
//! The plaintext: a 2-byte count, then per group its id (2-byte length and
//! the bytes) and its 32-byte state key, zero-padded to a multiple of
//! [`PAD_TO`] bytes so the size tells little about how many groups there
//! are.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize as _, Zeroizing};

use crate::identity::IdentityKeypair;
use crate::ids::GroupId;
use crate::sealed::{self, BackupKey, Sealed, StateKey};

/// The HKDF label of [`BackupSecrets::lookup`].
const LOOKUP_LABEL: &[u8] = b"quicnprotochat key backup lookup";
/// The HKDF label of [`BackupSecrets::key`].
const KEY_LABEL: &[u8] = b"quicnprotochat key backup key";
/// The plaintext is padded to a multiple of this.
pub const PAD_TO: usize = 1024;
/// The most a sealed backup may take: the node refuses larger ones. A
/// thousand groups fit.
pub const MAX_SEALED: usize = 64 * 1024;

/// What a device derives from its identity secret to store and read its
/// key backup.
pub struct BackupSecrets {
    /// Presented to the node, which files the backup under its hash.
    pub lookup: Zeroizing<[u8; 32]>,
    /// Seals the backup; never leaves the device.
    pub key: BackupKey,
}

impl BackupSecrets {
    /// The secrets of the device with `identity`.
    pub fn of(identity: &IdentityKeypair) -> BackupSecrets {
        let secret = identity.secret_bytes();
        let hkdf = Hkdf::<Sha256>::new(None, &secret[..]);
        let mut lookup = Zeroizing::new([0u8; 32]);
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit: expanding cannot fail.
        let _ = hkdf.expand(LOOKUP_LABEL, &mut lookup[..]);
        let _ = hkdf.expand(KEY_LABEL, &mut key);
        let key_ = BackupKey::from_bytes(key);
        key.zeroize();
        BackupSecrets { lookup, key: key_ }
    }
}

/// The groups a device is in and their state keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyBackup {
    /// Each group's id and state key.
    pub groups: Vec<(GroupId, StateKey)>,
}

impl KeyBackup {
    /// The backup sealed under `key`, for the node.
    pub fn seal(&self, key: &BackupKey) -> Vec<u8> {
        let mut plaintext = Zeroizing::new(Vec::with_capacity(PAD_TO));
        let count = u16::try_from(self.groups.len()).unwrap_or(u16::MAX);
        plaintext.extend_from_slice(&count.to_be_bytes());
        for (id, state) in self.groups.iter().take(usize::from(count)) {
            // A group id is at most 256 bytes.
            plaintext.extend_from_slice(&(id.as_bytes().len() as u16).to_be_bytes());
            plaintext.extend_from_slice(id.as_bytes());
            plaintext.extend_from_slice(state.as_bytes());
        }
        let padded = plaintext.len().next_multiple_of(PAD_TO);
        plaintext.resize(padded, 0);
        sealed::seal_in(key, Sealed::KeyBackup, &[0; 32], 0, &plaintext)
    }

    /// The backup in `sealed`, if it was sealed under `key` and is well
    /// formed.
    pub fn open(key: &BackupKey, sealed: &[u8]) -> Option<KeyBackup> {
        let plaintext = Zeroizing::new(sealed::open_in(key, Sealed::KeyBackup, &[0; 32], 0, sealed)?);
        let mut rest: &[u8] = &plaintext;
        let count = take_u16(&mut rest)?;
        let mut groups = Vec::with_capacity(usize::from(count).min(1024));
        for _ in 0..count {
            let len = usize::from(take_u16(&mut rest)?);
            let id = GroupId::new(take(&mut rest, len)?.to_vec())?;
            let state = StateKey::from_slice(take(&mut rest, StateKey::LEN)?)?;
            groups.push((id, state));
        }
        Some(KeyBackup { groups })
    }

    /// The state key of `group`, if the backup has it.
    pub fn state_key(&self, group: &GroupId) -> Option<&StateKey> {
        self.groups.iter().find(|(id, _)| id == group).map(|(_, key)| key)
    }
}

fn take<'a>(rest: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if rest.len() < len {
        return None;
    }
    let (taken, left) = rest.split_at(len);
    *rest = left;
    Some(taken)
}

fn take_u16(rest: &mut &[u8]) -> Option<u16> {
    take(rest, 2).map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(byte: u8, len: usize) -> GroupId {
        GroupId::new(vec![byte; len]).unwrap()
    }

    #[test]
    fn a_backup_opens_only_with_its_devices_key() {
        let device = IdentityKeypair::generate();
        let secrets = BackupSecrets::of(&device);
        let again = BackupSecrets::of(&IdentityKeypair::from_secret_bytes(&device.secret_bytes()));
        assert_eq!(*secrets.lookup, *again.lookup, "derived, not random");
        assert_eq!(secrets.key, again.key);
        assert_ne!(&secrets.lookup[..], secrets.key.as_bytes());
        assert_ne!(&secrets.lookup[..], &device.secret_bytes()[..]);

        let backup = KeyBackup {
            groups: vec![
                (group(1, 16), StateKey::from_bytes([7; 32])),
                (group(2, 256), StateKey::from_bytes([8; 32])),
            ],
        };
        let sealed = backup.seal(&secrets.key);
        assert_eq!((sealed.len() - 29) % PAD_TO, 0, "padded");
        assert!(!sealed.windows(16).any(|window| window == [1; 16]));
        assert_eq!(KeyBackup::open(&again.key, &sealed), Some(backup.clone()));
        assert_eq!(
            backup.state_key(&group(2, 256)),
            Some(&StateKey::from_bytes([8; 32]))
        );
        assert_eq!(backup.state_key(&group(3, 16)), None);

        let other = BackupSecrets::of(&IdentityKeypair::generate());
        assert_ne!(*other.lookup, *secrets.lookup);
        assert_eq!(KeyBackup::open(&other.key, &sealed), None);
        assert_eq!(KeyBackup::open(&secrets.key, &sealed[..sealed.len() - 1]), None);
    }

    #[test]
    fn an_empty_backup_and_one_of_a_thousand_groups_round_trip() {
        let key = BackupKey::from_bytes([5; 32]);
        let empty = KeyBackup::default();
        assert_eq!(KeyBackup::open(&key, &empty.seal(&key)), Some(empty));
        let many = KeyBackup {
            groups: (0..1000u16)
                .map(|n| {
                    let id = GroupId::new(n.to_be_bytes().repeat(8)).unwrap();
                    (id, StateKey::from_bytes([n as u8; 32]))
                })
                .collect(),
        };
        let sealed = many.seal(&key);
        assert!(sealed.len() < crate::backup::MAX_SEALED, "{}", sealed.len());
        assert_eq!(KeyBackup::open(&key, &sealed), Some(many));
    }
}
