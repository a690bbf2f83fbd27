//! Group state the node keeps encrypted under keys only members hold.
//!
//! An [`EpochKey`] is an MLS exporter secret of one epoch
//! (`MLS-Exporter("quicnprotochat epoch key", "", 32)`, RFC 9420 §8.5):
//! every member of that epoch computes it, a joiner from its Welcome alone
//! (before it has the ratchet tree), and the node only ever holds it in
//! memory for the call that brought it. What the node stores under it is
//! sealed with AES-256-GCM, a random nonce, and associated data naming
//! what it is, the group (by [`GroupRef`]) and the epoch, so a sealed row
//! cannot be passed off as another's.
//!
//! Sealed bytes: one version byte (1), the 12-byte nonce, then the
//! ciphertext with its 16-byte tag.

use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore as _;
use zeroize::Zeroize as _;

use crate::ids::GroupRef;

/// The exporter label of [`EpochKey`].
pub const EPOCH_KEY_LABEL: &str = "quicnprotochat epoch key";

/// The first byte of everything [`seal`] makes.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// 32 bytes every member of one epoch of a group can compute, and nobody
/// else: see the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey([u8; 32]);

impl Drop for EpochKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl EpochKey {
    /// Its length on the wire.
    pub const LEN: usize = 32;

    /// The key with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> EpochKey {
        EpochKey(bytes)
    }

    /// The key in `bytes`, if they are exactly [`Self::LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<EpochKey> {
        <[u8; 32]>::try_from(bytes).ok().map(EpochKey)
    }

    /// The 32 bytes, for the wire.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A key is never printed, not even in a test's failure.
        f.write_str("EpochKey(..)")
    }
}

/// What a sealed blob holds, bound into its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// The ratchet tree kept for the members a Commit added, under the
    /// key of the epoch that Commit starts.
    WelcomeTree,
}

impl Sealed {
    fn label(self) -> &'static [u8] {
        match self {
            Sealed::WelcomeTree => b"quicnprotochat welcome tree",
        }
    }
}

fn associated_data(what: Sealed, group: &GroupRef, epoch: u64) -> Vec<u8> {
    let label = what.label();
    let mut aad = Vec::with_capacity(label.len() + 1 + 32 + 8);
    aad.extend_from_slice(label);
    aad.push(0);
    aad.extend_from_slice(group.as_bytes());
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad
}

/// `plaintext` sealed under `key` as `what` of `group` in `epoch`.
pub fn seal(key: &EpochKey, what: Sealed, group: &GroupRef, epoch: u64, plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = associated_data(what, group, epoch);
    let ciphertext = Aes256Gcm::new((&key.0).into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        // Only a plaintext beyond 64 GiB fails; nothing the node holds is.
        .unwrap_or_default();
    let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    sealed.push(VERSION);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    sealed
}

/// The plaintext `sealed` holds, if it was sealed under `key` as `what` of
/// `group` in `epoch`; `None` for any other key, label, group or epoch and
/// for bytes [`seal`] did not make (the caller cannot tell these apart,
/// and need not).
pub fn open(key: &EpochKey, what: Sealed, group: &GroupRef, epoch: u64, sealed: &[u8]) -> Option<Vec<u8>> {
    let (&version, rest) = sealed.split_first()?;
    if version != VERSION || rest.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let aad = associated_data(what, group, epoch);
    Aes256Gcm::new((&key.0).into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::GroupId;

    fn group(name: &[u8]) -> GroupRef {
        GroupRef::of(&GroupId::new(name.to_vec()).unwrap())
    }

    #[test]
    fn what_is_sealed_opens_only_with_its_key_group_and_epoch() {
        let key = EpochKey::from_bytes([7; 32]);
        let tree = b"the ratchet tree".to_vec();
        let sealed = seal(&key, Sealed::WelcomeTree, &group(b"g"), 3, &tree);
        assert_eq!(sealed.len(), 1 + NONCE_LEN + tree.len() + TAG_LEN);
        assert!(!sealed.windows(tree.len()).any(|window| window == tree));
        assert_eq!(
            open(&key, Sealed::WelcomeTree, &group(b"g"), 3, &sealed),
            Some(tree.clone())
        );

        let other = EpochKey::from_bytes([8; 32]);
        assert_eq!(open(&other, Sealed::WelcomeTree, &group(b"g"), 3, &sealed), None);
        assert_eq!(open(&key, Sealed::WelcomeTree, &group(b"h"), 3, &sealed), None);
        assert_eq!(open(&key, Sealed::WelcomeTree, &group(b"g"), 4, &sealed), None);

        // A flipped bit anywhere, a cut, or a blob of another version.
        for at in 0..sealed.len() {
            let mut broken = sealed.clone();
            broken[at] ^= 1;
            assert_eq!(
                open(&key, Sealed::WelcomeTree, &group(b"g"), 3, &broken),
                None,
                "{at}"
            );
        }
        assert_eq!(
            open(&key, Sealed::WelcomeTree, &group(b"g"), 3, &sealed[..20]),
            None
        );
        assert_eq!(open(&key, Sealed::WelcomeTree, &group(b"g"), 3, &[]), None);
    }

    #[test]
    fn two_seals_of_one_tree_differ() {
        let key = EpochKey::from_bytes([1; 32]);
        let one = seal(&key, Sealed::WelcomeTree, &group(b"g"), 1, b"tree");
        let two = seal(&key, Sealed::WelcomeTree, &group(b"g"), 1, b"tree");
        assert_ne!(one, two, "a fresh nonce each time");
    }

    #[test]
    fn a_key_is_never_printed() {
        assert_eq!(format!("{:?}", EpochKey::from_bytes([9; 32])), "EpochKey(..)");
        assert_eq!(EpochKey::from_slice(&[1; 31]), None);
        assert!(EpochKey::from_slice(&[1; 32]).is_some());
    }
}
