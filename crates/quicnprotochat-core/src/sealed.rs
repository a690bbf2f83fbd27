//! Group state the node keeps encrypted under keys only members hold.
//!
//! An [`EpochKey`] is an MLS exporter secret of one epoch
//! (`MLS-Exporter("quicnprotochat epoch key", "", 32)`, RFC 9420 §8.5):
//! every member of that epoch computes it, a joiner from its Welcome alone
//! (before it has the ratchet tree). The node seals under it what only the
//! joiners of that epoch may read: the tree and the group's state key.
//!
//! A [`StateKey`] is the `"quicnprotochat state key"` exporter of the epoch
//! in which the group last lost a device (or of its epoch 0): it outlives
//! the epochs in between, so members keep it (and back it up) rather than
//! derive it, and it changes whenever someone leaves, so a removed member's
//! key opens nothing written after. The node keeps the group's public view
//! and proposals sealed under it.
//!
//! The node only ever holds either key in memory, for the call that
//! brought it. What it stores under them is sealed with AES-256-GCM, a
//! random nonce, and associated data naming what it is, the group (by
//! [`GroupRef`]) and the epoch, so a sealed row cannot be passed off as
//! another's.
//!
//! Sealed bytes: one version byte (1), the 12-byte nonce, then the
//! ciphertext with its 16-byte tag.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rand::RngCore as _;
use zeroize::Zeroize as _;

use crate::ids::GroupRef;

/// The exporter label of [`EpochKey`].
pub const EPOCH_KEY_LABEL: &str = "quicnprotochat epoch key";

/// The exporter label of [`StateKey`].
pub const STATE_KEY_LABEL: &str = "quicnprotochat state key";

/// The first byte of everything [`seal`] makes.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A 32-byte AES-256-GCM key that is never printed and is zeroed when
/// dropped.
macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name([u8; 32]);

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }

        impl $name {
            /// Its length on the wire.
            pub const LEN: usize = 32;

            /// The key with these bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> $name {
                $name(bytes)
            }

            /// The key in `bytes`, if they are exactly [`Self::LEN`] long.
            pub fn from_slice(bytes: &[u8]) -> Option<$name> {
                <[u8; 32]>::try_from(bytes).ok().map($name)
            }

            /// The 32 bytes, for the wire.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // A key is never printed, not even in a test's failure.
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }

        impl SealingKey for $name {
            fn key_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }
    };
}

/// A key [`seal`] and [`open`] use.
pub trait SealingKey {
    /// The AES-256 key.
    fn key_bytes(&self) -> &[u8; 32];
}

secret_key!(
    /// 32 bytes every member of one epoch of a group can compute, and
    /// nobody else: see the module docs.
    EpochKey
);

secret_key!(
    /// The key a device's key backup is sealed under, derived from its
    /// identity secret (`crate::backup`).
    BackupKey
);

secret_key!(
    /// The key a group's public state is kept under on the node: the
    /// [`STATE_KEY_LABEL`] exporter of the epoch in which the group last
    /// lost a device (or of its first epoch). Members keep it from one
    /// such epoch to the next; joiners get it sealed under their Welcome's
    /// [`EpochKey`]. See the module docs.
    StateKey
);

/// What a sealed blob holds, bound into its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// The ratchet tree kept for the members a Commit added, under the
    /// key of the epoch that Commit starts: as protocol 8 kept it.
    WelcomeTree,
    /// The group's [`StateKey`] and the ratchet tree kept for the members
    /// a Commit added, under the key of the epoch that Commit starts
    /// ([`seal_welcome`]).
    Welcome,
    /// A group's public view (tree, context and GroupInfo), under its
    /// [`StateKey`].
    View,
    /// A proposal kept for a Commit of the epoch, under the [`StateKey`].
    Proposal,
    /// A device's key backup: its groups' ids and state keys, under a key
    /// derived from its identity (`group` and `epoch` are unused: zero).
    KeyBackup,
}

impl Sealed {
    fn label(self) -> &'static [u8] {
        match self {
            Sealed::WelcomeTree => b"quicnprotochat welcome tree",
            Sealed::Welcome => b"quicnprotochat welcome state",
            Sealed::View => b"quicnprotochat group view",
            Sealed::Proposal => b"quicnprotochat group proposal",
            Sealed::KeyBackup => b"quicnprotochat key backup",
        }
    }
}

fn associated_data(what: Sealed, group: &[u8; 32], epoch: u64) -> Vec<u8> {
    let label = what.label();
    let mut aad = Vec::with_capacity(label.len() + 1 + 32 + 8);
    aad.extend_from_slice(label);
    aad.push(0);
    aad.extend_from_slice(group);
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad
}

/// `plaintext` sealed under `key` as `what` of `group` in `epoch`.
pub fn seal(key: &impl SealingKey, what: Sealed, group: &GroupRef, epoch: u64, plaintext: &[u8]) -> Vec<u8> {
    seal_in(key, what, group.as_bytes(), epoch, plaintext)
}

/// [`seal`] with any 32 bytes in the group's place.
pub(crate) fn seal_in(
    key: &impl SealingKey,
    what: Sealed,
    group: &[u8; 32],
    epoch: u64,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = associated_data(what, group, epoch);
    // Encrypted in place behind the version and nonce: one copy of a view
    // (2 MiB at 10,000 members), not two.
    let mut sealed = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
    sealed.push(VERSION);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(plaintext);
    let tag = cipher(key).seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&aad),
        &mut sealed[1 + NONCE_LEN..],
    );
    match tag {
        Ok(tag) => sealed.extend_from_slice(tag.as_ref()),
        // Only a plaintext beyond 64 GiB fails; nothing the node holds is.
        Err(_) => sealed.clear(),
    }
    sealed
}

/// AES-256-GCM under `key`. aws-lc-rs rather than RustCrypto's `aes-gcm`:
/// the node opens and seals a group's whole view with every Commit, and
/// measured on a 2 MiB view (10,000 members) aws-lc-rs, already linked for
/// TLS, took a fraction of the time (BENCHMARKS.md, "State keys").
fn cipher(key: &impl SealingKey) -> LessSafeKey {
    // A 32-byte key is exactly what AES-256 takes: this cannot fail.
    let unbound = UnboundKey::new(&AES_256_GCM, key.key_bytes()).unwrap_or_else(|_| unreachable!());
    LessSafeKey::new(unbound)
}

/// The plaintext `sealed` holds, if it was sealed under `key` as `what` of
/// `group` in `epoch`; `None` for any other key, label, group or epoch and
/// for bytes [`seal`] did not make (the caller cannot tell these apart,
/// and need not).
pub fn open(
    key: &impl SealingKey,
    what: Sealed,
    group: &GroupRef,
    epoch: u64,
    sealed: &[u8],
) -> Option<Vec<u8>> {
    open_in(key, what, group.as_bytes(), epoch, sealed)
}

/// [`open`] with any 32 bytes in the group's place.
pub(crate) fn open_in(
    key: &impl SealingKey,
    what: Sealed,
    group: &[u8; 32],
    epoch: u64,
    sealed: &[u8],
) -> Option<Vec<u8>> {
    let (&version, rest) = sealed.split_first()?;
    if version != VERSION || rest.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let aad = associated_data(what, group, epoch);
    let mut buffer = ciphertext.to_vec();
    let length = cipher(key)
        .open_in_place(nonce, Aad::from(&aad), &mut buffer)
        .ok()?
        .len();
    buffer.truncate(length);
    Some(buffer)
}

/// What the node keeps for the members a Commit adds: the group's
/// `state` key and the new epoch's `tree`, sealed under that epoch's key
/// (`state` first, then the tree).
pub fn seal_welcome(key: &EpochKey, group: &GroupRef, epoch: u64, state: &StateKey, tree: &[u8]) -> Vec<u8> {
    let mut plaintext = Vec::with_capacity(StateKey::LEN + tree.len());
    plaintext.extend_from_slice(state.as_bytes());
    plaintext.extend_from_slice(tree);
    let sealed = seal(key, Sealed::Welcome, group, epoch, &plaintext);
    plaintext.zeroize();
    sealed
}

/// The state key and tree [`seal_welcome`] sealed, if `key`, `group` and
/// `epoch` are the ones it was sealed with.
pub fn open_welcome(
    key: &EpochKey,
    group: &GroupRef,
    epoch: u64,
    sealed: &[u8],
) -> Option<(StateKey, Vec<u8>)> {
    let mut plaintext = open(key, Sealed::Welcome, group, epoch, sealed)?;
    let state = StateKey::from_slice(plaintext.get(..StateKey::LEN)?);
    let tree = plaintext.get(StateKey::LEN..).map(<[u8]>::to_vec);
    plaintext.zeroize();
    Some((state?, tree?))
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
    fn a_welcome_holds_the_state_key_and_the_tree() {
        let key = EpochKey::from_bytes([3; 32]);
        let state = StateKey::from_bytes([4; 32]);
        let sealed = seal_welcome(&key, &group(b"g"), 5, &state, b"tree");
        assert!(!sealed.windows(32).any(|window| window == state.as_bytes()));
        let (opened, tree) = open_welcome(&key, &group(b"g"), 5, &sealed).unwrap();
        assert_eq!((opened, tree.as_slice()), (state, &b"tree"[..]));
        assert_eq!(open_welcome(&key, &group(b"g"), 6, &sealed), None);
        assert_eq!(
            open_welcome(&EpochKey::from_bytes([9; 32]), &group(b"g"), 5, &sealed),
            None
        );
        // A blob sealed as something else is not a Welcome.
        let view = seal(&key, Sealed::View, &group(b"g"), 5, &[4; 40]);
        assert_eq!(open_welcome(&key, &group(b"g"), 5, &view), None);
        // Too short to hold a key.
        let short = seal(&key, Sealed::Welcome, &group(b"g"), 5, &[4; 31]);
        assert_eq!(open_welcome(&key, &group(b"g"), 5, &short), None);
    }

    #[test]
    fn a_key_is_never_printed() {
        assert_eq!(format!("{:?}", StateKey::from_bytes([9; 32])), "StateKey(..)");
        assert_eq!(format!("{:?}", EpochKey::from_bytes([9; 32])), "EpochKey(..)");
        assert_eq!(EpochKey::from_slice(&[1; 31]), None);
        assert!(EpochKey::from_slice(&[1; 32]).is_some());
    }
}
