//! A user's device list: the device keys that belong to one user key,
//! versioned and signed by that user key.
//!
//! A person is known to others by a user key (what they compare out of band
//! and invite); each of their devices has a key of its own (its TLS identity
//! and the signature key of its MLS leaf). The list says which devices are
//! the user's. Because the user key signs it, a node that stores and serves
//! lists can withhold one but cannot forge one, and because it is
//! versioned, a reader that remembers the highest version it has seen
//! notices a node serving an older one ([`Freshness`]).
//!
//! The signature covers, in this order: the label
//! `quicnprotochat device list v1`, the 32-byte user key, the version as a
//! big-endian u64, the number of devices as a big-endian u16, and each
//! device key (32 bytes), in ascending byte order. Clients in other
//! languages rebuild exactly these bytes ([`DeviceList::signing_bytes`]).

use ed25519_dalek::{Signature, VerifyingKey};

use crate::error::CoreError;
use crate::identity::{IdentityKey, IdentityKeypair, MemberKey};

/// What the signature begins with, so that it can never be taken for a
/// signature over anything else the user key signs.
pub const DEVICE_LIST_LABEL: &[u8] = b"quicnprotochat device list v1";

/// Most devices one user may have: a person's phones, laptops and tablets,
/// with room to spare; bounds what every member checks.
pub const MAX_DEVICES: usize = 64;

/// Why a device list is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceListError {
    /// A list must name at least one device.
    #[error("a device list names no device")]
    Empty,
    /// More devices than [`MAX_DEVICES`].
    #[error("a device list names {0} devices; at most {MAX_DEVICES} are allowed")]
    TooMany(usize),
    /// The signature is not the user key's over this list.
    #[error("the device list of {0} is not signed by that user key")]
    BadSignature(String),
    /// Signing was asked of a key that is not the list's user key.
    #[error("a device list of {list} cannot be signed with the key of {signer}")]
    WrongSigner {
        /// The list's user key, short.
        list: String,
        /// The key offered, short.
        signer: String,
    },
}

/// The devices of one user, at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    user: IdentityKey,
    version: u64,
    /// Sorted and distinct: one list, one encoding.
    devices: Vec<IdentityKey>,
}

impl DeviceList {
    /// The list of `devices` of `user` at `version`; duplicates are dropped
    /// and the order does not matter.
    pub fn new(
        user: IdentityKey,
        version: u64,
        devices: impl IntoIterator<Item = IdentityKey>,
    ) -> Result<Self, DeviceListError> {
        let mut devices: Vec<IdentityKey> = devices.into_iter().collect();
        devices.sort_unstable();
        devices.dedup();
        match devices.len() {
            0 => Err(DeviceListError::Empty),
            count if count > MAX_DEVICES => Err(DeviceListError::TooMany(count)),
            _ => Ok(DeviceList {
                user,
                version,
                devices,
            }),
        }
    }

    /// The user key.
    pub fn user(&self) -> &IdentityKey {
        &self.user
    }

    /// The version: a new list of the same user must have a higher one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The device keys, in ascending order.
    pub fn devices(&self) -> &[IdentityKey] {
        &self.devices
    }

    /// Whether `device` is one of the user's devices.
    pub fn contains(&self, device: &IdentityKey) -> bool {
        self.devices.binary_search(device).is_ok()
    }

    /// The bytes the user key signs (see the module documentation).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(DEVICE_LIST_LABEL.len() + 32 + 8 + 2 + 32 * self.devices.len());
        bytes.extend_from_slice(DEVICE_LIST_LABEL);
        bytes.extend_from_slice(self.user.as_bytes());
        bytes.extend_from_slice(&self.version.to_be_bytes());
        // At most MAX_DEVICES (64): fits.
        bytes.extend_from_slice(&(self.devices.len() as u16).to_be_bytes());
        for device in &self.devices {
            bytes.extend_from_slice(device.as_bytes());
        }
        bytes
    }

    /// Signs the list with the user's key pair.
    pub fn sign(self, user: &IdentityKeypair) -> Result<SignedDeviceList, DeviceListError> {
        if user.public_key() != self.user {
            return Err(DeviceListError::WrongSigner {
                list: self.user.short(),
                signer: user.public_key().short(),
            });
        }
        let signature = user.sign_raw(&self.signing_bytes());
        Ok(SignedDeviceList {
            list: self,
            signature,
        })
    }
}

/// A device list with the user key's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDeviceList {
    list: DeviceList,
    signature: [u8; 64],
}

/// How a list compares with the highest version of the same user seen
/// before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Nothing seen before, or a higher version: take it.
    Newer,
    /// The very list seen before.
    Same,
    /// A lower version, or another list under the same version: someone
    /// (a node) serves an old or conflicting list.
    Stale,
}

impl SignedDeviceList {
    /// A list and its signature as received; check it with [`Self::verify`].
    pub fn from_parts(list: DeviceList, signature: [u8; 64]) -> Self {
        SignedDeviceList { list, signature }
    }

    /// The list.
    pub fn list(&self) -> &DeviceList {
        &self.list
    }

    /// The signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// Checks that the user key signed exactly this list (strict Ed25519,
    /// as MLS verifies).
    pub fn verify(&self) -> Result<(), DeviceListError> {
        let bad = || DeviceListError::BadSignature(self.list.user.short());
        let key = VerifyingKey::from_bytes(self.list.user.as_bytes()).map_err(|_| bad())?;
        key.verify_strict(
            &self.list.signing_bytes(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| bad())
    }

    /// How this list compares with `seen`, the highest version of the same
    /// user seen before (both verified).
    pub fn freshness(&self, seen: Option<&SignedDeviceList>) -> Freshness {
        match seen {
            None => Freshness::Newer,
            Some(seen) if self.list.version > seen.list.version => Freshness::Newer,
            Some(seen) if self == seen => Freshness::Same,
            Some(_) => Freshness::Stale,
        }
    }
}

/// What the caller knows of a user's current device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// The user's current list names the device.
    Yes,
    /// The user's current list does not name it, or the user has no list
    /// (then its only device is the user key).
    No,
    /// The caller has not looked the user's list up yet.
    Unknown,
}

/// Where group operations learn which devices users listed. Core does no
/// I/O: a directory answers from what its owner already fetched and
/// verified, and says [`Listed::Unknown`] otherwise; the operation then
/// fails with [`CoreError::DeviceListsNeeded`], changing nothing, and the
/// caller fetches those lists and tries again.
pub trait DeviceDirectory {
    /// Whether `user`'s current list names `device`.
    fn listed(&self, user: &IdentityKey, device: &IdentityKey) -> Listed;
}

/// A directory that knows no lists: every user's only device is its user
/// key. For callers whose peers never use device lists (and tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDeviceLists;

impl DeviceDirectory for NoDeviceLists {
    fn listed(&self, _user: &IdentityKey, _device: &IdentityKey) -> Listed {
        Listed::No
    }
}

/// Checks that every member's device belongs to its user: the user key
/// itself always does; any other device only if the user's current list
/// names it. Collects every user whose list the directory lacks into one
/// [`CoreError::DeviceListsNeeded`], so the caller fetches them in one go.
pub fn check_devices<'a>(
    directory: &impl DeviceDirectory,
    members: impl IntoIterator<Item = &'a MemberKey>,
) -> Result<(), CoreError> {
    let mut needed: Vec<IdentityKey> = Vec::new();
    for member in members {
        if member.is_own_user() {
            continue;
        }
        match directory.listed(&member.user, &member.device) {
            Listed::Yes => {}
            Listed::No => {
                return Err(CoreError::UnlistedDevice {
                    user: member.user.to_string(),
                    device: member.device.to_string(),
                });
            }
            Listed::Unknown => {
                if !needed.contains(&member.user) {
                    needed.push(member.user);
                }
            }
        }
    }
    if needed.is_empty() {
        Ok(())
    } else {
        Err(CoreError::DeviceListsNeeded(needed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(n: u8) -> IdentityKey {
        IdentityKeypair::from_secret_bytes(&[n; 32]).public_key()
    }

    fn signed(user: &IdentityKeypair, version: u64, devices: &[u8]) -> SignedDeviceList {
        DeviceList::new(user.public_key(), version, devices.iter().map(|n| key(*n)))
            .unwrap()
            .sign(user)
            .unwrap()
    }

    #[test]
    fn a_list_signed_by_its_user_verifies_and_any_change_breaks_it() {
        let user = IdentityKeypair::from_secret_bytes(&[1; 32]);
        let list = signed(&user, 3, &[7, 8]);
        assert_eq!(list.verify(), Ok(()));
        let other_version = DeviceList::new(user.public_key(), 4, [key(7), key(8)]).unwrap();
        let other_devices = DeviceList::new(user.public_key(), 3, [key(7), key(9)]).unwrap();
        let other_user = DeviceList::new(key(2), 3, [key(7), key(8)]).unwrap();
        for list in [other_version, other_devices, other_user] {
            let forged = SignedDeviceList::from_parts(list, *signed(&user, 3, &[7, 8]).signature());
            assert!(matches!(forged.verify(), Err(DeviceListError::BadSignature(_))));
        }
    }

    #[test]
    fn only_the_user_key_can_sign_its_list() {
        let user = IdentityKeypair::from_secret_bytes(&[1; 32]);
        let stranger = IdentityKeypair::from_secret_bytes(&[2; 32]);
        let list = DeviceList::new(user.public_key(), 1, [key(7)]).unwrap();
        assert!(matches!(
            list.clone().sign(&stranger),
            Err(DeviceListError::WrongSigner { .. })
        ));
        // Nor does a stranger's signature over the same bytes pass.
        let forged = SignedDeviceList::from_parts(list.clone(), stranger.sign_raw(&list.signing_bytes()));
        assert!(forged.verify().is_err());
    }

    #[test]
    fn the_order_of_devices_does_not_change_the_list_and_duplicates_count_once() {
        let user = key(1);
        let one = DeviceList::new(user, 1, [key(9), key(7), key(8), key(7)]).unwrap();
        let other = DeviceList::new(user, 1, [key(8), key(9), key(7)]).unwrap();
        assert_eq!(one, other);
        assert_eq!(one.signing_bytes(), other.signing_bytes());
        assert_eq!(one.devices().len(), 3);
        assert!(one.contains(&key(8)));
        assert!(!one.contains(&key(6)));
    }

    #[test]
    fn the_signed_bytes_are_the_documented_layout() {
        let list = DeviceList::new(key(1), 0x0102, [key(7)]).unwrap();
        let bytes = list.signing_bytes();
        let (label, rest) = bytes.split_at(DEVICE_LIST_LABEL.len());
        assert_eq!(label, b"quicnprotochat device list v1");
        assert_eq!(&rest[..32], key(1).as_bytes());
        assert_eq!(&rest[32..40], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&rest[40..42], &[0, 1]);
        assert_eq!(&rest[42..], key(7).as_bytes());
    }

    #[test]
    fn a_list_names_one_to_max_devices() {
        assert_eq!(DeviceList::new(key(1), 1, []), Err(DeviceListError::Empty));
        let many = (0..=MAX_DEVICES).map(|n| {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&(n as u64).to_be_bytes());
            IdentityKey::from_bytes(bytes)
        });
        assert_eq!(
            DeviceList::new(key(1), 1, many),
            Err(DeviceListError::TooMany(MAX_DEVICES + 1))
        );
    }

    #[test]
    fn a_reader_tells_newer_lists_from_rollbacks_and_forks() {
        let user = IdentityKeypair::from_secret_bytes(&[1; 32]);
        let v1 = signed(&user, 1, &[7]);
        let v2 = signed(&user, 2, &[7, 8]);
        let v2_other = signed(&user, 2, &[7, 9]);
        assert_eq!(v1.freshness(None), Freshness::Newer);
        assert_eq!(v2.freshness(Some(&v1)), Freshness::Newer);
        assert_eq!(v2.freshness(Some(&v2)), Freshness::Same);
        assert_eq!(v1.freshness(Some(&v2)), Freshness::Stale, "a rollback");
        assert_eq!(
            v2_other.freshness(Some(&v2)),
            Freshness::Stale,
            "two lists under one version"
        );
    }
}
