//! Linking a new device to a user: the link code, the new device's keys,
//! and the handoff that carries them to it, encrypted.
//!
//! The steps, and who does what:
//! 1. The new device makes a *link key* (an Ed25519 key: its TLS identity
//!    until it is linked, so it can read its own queue) and shows a
//!    [`LinkCode`]: the link key, an HPKE public key derived from the link
//!    key's secret, the code's expiry, and a checksum that catches typos.
//! 2. The user's first device, the one device holding the user key, reads
//!    the code and derives the new device's key from the user key's secret
//!    and the link key ([`derive_device`]): the same code always yields the
//!    same device, so a used code is told apart (its device is in the
//!    user's list already). It signs the new device into the list, makes
//!    KeyPackages for it (one per group it adds it to), and sends the
//!    [`Handoff`] — the new device's own secret key, the list and those
//!    KeyPackages' private keys — sealed with HPKE to the code's public key,
//!    to the link key's queue. The node sees only ciphertext.
//! 3. The new device opens the handoff ([`LinkSecret::open`]), checks that
//!    the list is validly signed by its user and names the device, and from
//!    then on is that device.
//!
//! Why the user key never leaves the first device: every device holding it
//! could sign lists and log in as the first device (whose key it is), so a
//! device removed later could add devices of its own choosing back. A
//! linked device holds only its own key, which the user's next list drops
//! and the node then refuses for good.
//!
//! Why the first device makes the new device's first keys: it has to add
//! the device to the user's groups in the same command, and a group Add
//! needs a KeyPackage signed by the device. It holds the user key, which
//! can act as the user anyway, so this trusts nobody new; the new device
//! replaces those keys with its own on its first `update` in each group.

use openmls::prelude::{KeyPackage, KeyPackageBundle};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::crypto::OpenMlsCrypto as _;
use openmls_traits::storage::StorageProvider as _;
use openmls_traits::types::{HpkeAeadType, HpkeCiphertext, HpkeConfig, HpkeKdfType, HpkeKemType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tls_codec::{DeserializeBytes as _, Serialize as _};
use zeroize::Zeroizing;

use crate::device_lists::{DeviceList, SignedDeviceList};
use crate::error::CoreError;
use crate::identity::{IdentityKey, IdentityKeypair};
use crate::suite::Suite;

/// What a link code starts with, so it is recognised as one.
pub const LINK_CODE_PREFIX: &str = "qnpc-link-";

/// What a handoff payload starts with. No MLS message starts this way (they
/// start with the protocol version, 0x0001), so a queue can carry both.
///
/// Version 2 carries the device's own key where version 1 carried the user
/// key; a device waiting with older software does not open it.
pub const HANDOFF_MAGIC: &[u8] = b"QNPC-HANDOFF-2";

/// Labels keeping each derivation and signature apart from every other use
/// of the same secrets.
const DEVICE_LABEL: &[u8] = b"quicnprotochat linked device v1";
const HPKE_LABEL: &[u8] = b"quicnprotochat link hpke v1";
const HPKE_INFO: &[u8] = b"quicnprotochat device handoff v1";
const CHECK_LABEL: &[u8] = b"quicnprotochat link code v1";

const HPKE: HpkeConfig = HpkeConfig(
    HpkeKemType::DhKem25519,
    HpkeKdfType::HkdfSha256,
    HpkeAeadType::AesGcm128,
);

/// Why a link code or handoff is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Not a link code at all, or mistyped (the checksum does not match).
    #[error("this is not a valid link code (mistyped or cut short?); copy the whole line `link` printed")]
    BadCode,
    /// The code's time is up.
    #[error(
        "this link code expired {0} second{s} ago; run `link` on the new device again for a fresh one",
        s = if *.0 == 1 { "" } else { "s" }
    )]
    Expired(u64),
    /// The handoff could not be opened with this device's link key: it was
    /// made for another code.
    #[error("the handoff is not for this device's link code")]
    NotForUs,
    /// No handoff has reached this device yet.
    #[error(
        "this device is not linked yet: run `devices add CODE` on one of your devices with the code `link` printed, then `recv` here again"
    )]
    NotYet,
    /// The handoff opened but does not hold what it must.
    #[error("the handoff is malformed: {0}")]
    Malformed(String),
}

/// The one line a new device shows, to be typed or pasted into an existing
/// device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCode {
    /// The new device's link key: its identity until it is linked, whose
    /// queue receives the handoff.
    pub link_key: IdentityKey,
    /// X25519 HPKE public key the handoff is sealed to.
    pub hpke_key: [u8; 32],
    /// When the code stops being accepted (Unix seconds).
    pub expires_at: u64,
}

impl LinkCode {
    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(72);
        body.extend_from_slice(self.link_key.as_bytes());
        body.extend_from_slice(&self.hpke_key);
        body.extend_from_slice(&self.expires_at.to_be_bytes());
        body
    }

    fn check(body: &[u8]) -> [u8; 4] {
        let digest = Sha256::new()
            .chain_update(CHECK_LABEL)
            .chain_update(body)
            .finalize();
        [digest[0], digest[1], digest[2], digest[3]]
    }

    /// The code as one line: the prefix, then hex of the link key, the HPKE
    /// key, the expiry (big-endian u64) and a 4-byte checksum.
    pub fn encode(&self) -> String {
        let mut bytes = self.body();
        bytes.extend_from_slice(&Self::check(&bytes));
        format!("{LINK_CODE_PREFIX}{}", hex::encode(bytes))
    }

    /// Reads a code as [`Self::encode`] wrote it (blanks around it and the
    /// case of the hex do not matter).
    pub fn parse(text: &str) -> Result<LinkCode, LinkError> {
        let text = text.trim();
        let hex_part = text
            .get(..LINK_CODE_PREFIX.len())
            .filter(|prefix| prefix.eq_ignore_ascii_case(LINK_CODE_PREFIX))
            .and_then(|_| text.get(LINK_CODE_PREFIX.len()..))
            .ok_or(LinkError::BadCode)?;
        let bytes = hex::decode(hex_part).map_err(|_| LinkError::BadCode)?;
        let [body @ .., c0, c1, c2, c3] = bytes.as_slice() else {
            return Err(LinkError::BadCode);
        };
        if body.len() != 72 || Self::check(body) != [*c0, *c1, *c2, *c3] {
            return Err(LinkError::BadCode);
        }
        let key: [u8; 32] = body[..32].try_into().map_err(|_| LinkError::BadCode)?;
        let hpke_key: [u8; 32] = body[32..64].try_into().map_err(|_| LinkError::BadCode)?;
        let expires: [u8; 8] = body[64..].try_into().map_err(|_| LinkError::BadCode)?;
        Ok(LinkCode {
            link_key: IdentityKey::from_bytes(key),
            hpke_key,
            expires_at: u64::from_be_bytes(expires),
        })
    }

    /// Fails with [`LinkError::Expired`] once `now` (Unix seconds) is past
    /// the expiry.
    pub fn check_fresh(&self, now: u64) -> Result<(), LinkError> {
        if now > self.expires_at {
            Err(LinkError::Expired(now - self.expires_at))
        } else {
            Ok(())
        }
    }
}

/// The device key a link code makes for a user: derived from the user
/// key's secret and the link key, so every device of the user derives the
/// same one from the same code, and only holders of the user key can.
pub fn derive_device(user: &IdentityKeypair, link_key: &IdentityKey) -> IdentityKeypair {
    let seed = Zeroizing::new(<[u8; 32]>::from(
        Sha256::new()
            .chain_update(DEVICE_LABEL)
            .chain_update(user.secret_bytes().as_slice())
            .chain_update(link_key.as_bytes())
            .finalize(),
    ));
    IdentityKeypair::from_secret_bytes(&seed).of_user(user.public_key())
}

/// What the new device keeps until the handoff arrives: its link key.
#[derive(Debug)]
pub struct LinkSecret {
    link: IdentityKeypair,
    expires_at: u64,
}

impl LinkSecret {
    /// A fresh link key, valid until `expires_at` (Unix seconds).
    pub fn generate(expires_at: u64) -> LinkSecret {
        LinkSecret {
            link: IdentityKeypair::generate(),
            expires_at,
        }
    }

    /// The link key stored before, from its secret.
    pub fn from_secret(secret: &[u8; 32], expires_at: u64) -> LinkSecret {
        LinkSecret {
            link: IdentityKeypair::from_secret_bytes(secret),
            expires_at,
        }
    }

    /// The link key: the new device's identity until it is linked.
    pub fn link_key(&self) -> &IdentityKeypair {
        &self.link
    }

    /// When the code expires (Unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    fn hpke_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(
            Sha256::new()
                .chain_update(HPKE_LABEL)
                .chain_update(self.link.secret_bytes().as_slice())
                .finalize()
                .into(),
        )
    }

    /// The code to show.
    pub fn code(&self) -> Result<LinkCode, CoreError> {
        let pair = OpenMlsRustCrypto::default()
            .crypto()
            .derive_hpke_keypair(HPKE, self.hpke_seed().as_slice())
            .map_err(CoreError::mls("deriving the link's HPKE key"))?;
        let hpke_key: [u8; 32] = pair
            .public
            .as_slice()
            .try_into()
            .map_err(|_| CoreError::mls("deriving the link's HPKE key")("not 32 bytes"))?;
        Ok(LinkCode {
            link_key: self.link.public_key(),
            hpke_key,
            expires_at: self.expires_at,
        })
    }

    /// Opens a handoff sent to this link and checks it: the list must be
    /// validly signed by its user and name the device this link makes for
    /// that user. Returns the handoff and that device's key pair (a device
    /// of the user).
    pub fn open(&self, payload: &[u8]) -> Result<(Handoff, IdentityKeypair), LinkError> {
        let sealed = payload.strip_prefix(HANDOFF_MAGIC).ok_or(LinkError::NotForUs)?;
        let ciphertext = HpkeCiphertext::tls_deserialize_exact_bytes(sealed)
            .map_err(|e| LinkError::Malformed(e.to_string()))?;
        let crypto = OpenMlsRustCrypto::default();
        let pair = crypto
            .crypto()
            .derive_hpke_keypair(HPKE, self.hpke_seed().as_slice())
            .map_err(|e| LinkError::Malformed(format!("{e:?}")))?;
        let plaintext = Zeroizing::new(
            crypto
                .crypto()
                .hpke_open(
                    HPKE,
                    &ciphertext,
                    &pair.private,
                    HPKE_INFO,
                    self.link.public_key().as_bytes(),
                )
                .map_err(|_| LinkError::NotForUs)?,
        );
        let wire: WireHandoff =
            serde_json::from_slice(&plaintext).map_err(|e| LinkError::Malformed(e.to_string()))?;
        let handoff = wire.into_handoff()?;
        handoff
            .list
            .verify()
            .map_err(|e| LinkError::Malformed(e.to_string()))?;
        let user = *handoff.list.list().user();
        let device = IdentityKeypair::from_secret_bytes(&handoff.device_secret).of_user(user);
        if device.public_key() == user {
            // That would hand over the user key, which stays on the first
            // device.
            return Err(LinkError::Malformed("the handoff holds the user key".into()));
        }
        if !handoff.list.list().contains(&device.public_key()) {
            return Err(LinkError::Malformed("the list does not name this device".into()));
        }
        Ok((handoff, device))
    }
}

/// What the first device hands the new one.
pub struct Handoff {
    /// The new device's secret key ([`derive_device`]); never the user
    /// key's.
    pub device_secret: Zeroizing<[u8; 32]>,
    /// The user's device list naming the new device.
    pub list: SignedDeviceList,
    /// The new device's first KeyPackages with their private keys
    /// ([`DeviceKeyPackages`]), each used by one group's Add.
    pub key_packages: DeviceKeyPackages,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("user", self.list.list().user())
            .field("key_packages", &self.key_packages.bundles.len())
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// Seals the handoff to `code`'s HPKE key, bound to its link key.
    pub fn seal(&self, code: &LinkCode) -> Result<Vec<u8>, CoreError> {
        let list = self.list.list();
        let wire = WireHandoff {
            device_secret: hex::encode(self.device_secret.as_slice()),
            user: list.user().to_string(),
            version: list.version(),
            devices: list.devices().iter().map(|device| device.to_string()).collect(),
            signature: hex::encode(self.list.signature()),
            key_packages: self
                .key_packages
                .bundles
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<_, _>>()
                .map_err(CoreError::mls("encoding the handoff"))?,
        };
        let plaintext =
            Zeroizing::new(serde_json::to_vec(&wire).map_err(CoreError::mls("encoding the handoff"))?);
        let sealed = OpenMlsRustCrypto::default()
            .crypto()
            .hpke_seal(
                HPKE,
                &code.hpke_key,
                HPKE_INFO,
                code.link_key.as_bytes(),
                &plaintext,
            )
            .map_err(CoreError::mls("sealing the handoff"))?;
        let mut payload = HANDOFF_MAGIC.to_vec();
        payload.extend_from_slice(
            &sealed
                .tls_serialize_detached()
                .map_err(CoreError::mls("encoding the handoff"))?,
        );
        Ok(payload)
    }
}

/// The handoff's plaintext, as JSON (our own client talks to itself here;
/// the format is versioned by [`HANDOFF_MAGIC`]).
#[derive(Serialize, Deserialize)]
struct WireHandoff {
    device_secret: String,
    user: String,
    version: u64,
    devices: Vec<String>,
    signature: String,
    /// openmls `KeyPackageBundle`s as JSON, as openmls stores them.
    key_packages: Vec<String>,
}

impl WireHandoff {
    fn into_handoff(self) -> Result<Handoff, LinkError> {
        let bad = |what: &str| LinkError::Malformed(what.to_owned());
        let secret: [u8; 32] = hex::decode(&self.device_secret)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| bad("device secret"))?;
        let secret = Zeroizing::new(secret);
        let user: IdentityKey = self.user.parse().map_err(|_| bad("user key"))?;
        let devices = self
            .devices
            .iter()
            .map(|device| device.parse::<IdentityKey>().map_err(|_| bad("device key")))
            .collect::<Result<Vec<_>, _>>()?;
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| bad("signature"))?;
        let list =
            DeviceList::new(user, self.version, devices).map_err(|e| LinkError::Malformed(e.to_string()))?;
        let bundles = self
            .key_packages
            .iter()
            .map(|bundle| serde_json::from_str(bundle).map_err(|_| bad("KeyPackage bundle")))
            .collect::<Result<Vec<KeyPackageBundle>, _>>()?;
        Ok(Handoff {
            device_secret: secret,
            list: SignedDeviceList::from_parts(list, signature),
            key_packages: DeviceKeyPackages { bundles },
        })
    }
}

/// KeyPackages made for a device by another device, with their private
/// keys, to be installed on the device they belong to.
#[derive(Default)]
pub struct DeviceKeyPackages {
    bundles: Vec<KeyPackageBundle>,
}

impl DeviceKeyPackages {
    /// Makes one KeyPackage per entry of `suites` for `device` (a device
    /// key pair of its user, see [`derive_device`]), in a throwaway store.
    pub fn generate(device: &IdentityKeypair, suites: &[Suite]) -> Result<DeviceKeyPackages, CoreError> {
        let provider = OpenMlsRustCrypto::default();
        let bundles = suites
            .iter()
            .map(|suite| {
                KeyPackage::builder()
                    .build(
                        suite.ciphersuite(),
                        &provider,
                        device,
                        device.credential_with_key(),
                    )
                    .map_err(CoreError::mls("generating a KeyPackage"))
            })
            .collect::<Result<_, _>>()?;
        Ok(DeviceKeyPackages { bundles })
    }

    /// The public KeyPackages, TLS-encoded, in order.
    pub fn public(&self) -> Result<Vec<Vec<u8>>, CoreError> {
        self.bundles
            .iter()
            .map(|bundle| {
                bundle
                    .key_package()
                    .tls_serialize_detached()
                    .map_err(CoreError::mls("encoding a KeyPackage"))
            })
            .collect()
    }

    /// The HPKE encryption keys (public) of their leaves: the leaf keys
    /// the device has in a group it joins with one of them, until it
    /// updates. The device that made them knows their private keys.
    /// Encoded as [`crate::GroupMember::own_leaf_key`] encodes them.
    pub fn leaf_keys(&self) -> Vec<Vec<u8>> {
        self.bundles
            .iter()
            .filter_map(|bundle| {
                bundle
                    .key_package()
                    .leaf_node()
                    .encryption_key()
                    .tls_serialize_detached()
                    .ok()
            })
            .collect()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// Writes them, private keys included, into `provider`'s storage, where
    /// [`crate::GroupMember::join`] finds them for the Welcomes that use
    /// them.
    pub fn install<P: OpenMlsProvider>(&self, provider: &P) -> Result<(), CoreError> {
        for bundle in &self.bundles {
            let reference = bundle
                .key_package()
                .hash_ref(provider.crypto())
                .map_err(CoreError::mls("naming a KeyPackage"))?;
            provider
                .storage()
                .write_key_package(&reference, bundle)
                .map_err(CoreError::storage)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::device_lists::NoDeviceLists;
    use crate::group::GroupMember;

    #[test]
    fn a_code_round_trips_and_any_typo_is_caught() {
        let link = LinkSecret::generate(1_000);
        let code = link.code().unwrap();
        let text = code.encode();
        assert!(text.starts_with(LINK_CODE_PREFIX));
        assert_eq!(
            LinkCode::parse(&format!(
                "  {}\n",
                text.to_uppercase().replacen("QNPC-LINK-", "qnpc-link-", 1)
            ))
            .unwrap(),
            code
        );
        // Flip each hex digit in turn: every change is refused.
        for i in LINK_CODE_PREFIX.len()..text.len() {
            let mut typo = text.clone().into_bytes();
            typo[i] = if typo[i] == b'0' { b'1' } else { b'0' };
            assert_eq!(
                LinkCode::parse(&String::from_utf8(typo).unwrap()),
                Err(LinkError::BadCode)
            );
        }
        assert_eq!(LinkCode::parse(&text[..text.len() - 2]), Err(LinkError::BadCode));
        assert_eq!(LinkCode::parse("hello"), Err(LinkError::BadCode));
        assert_eq!(code.check_fresh(1_000), Ok(()));
        assert_eq!(code.check_fresh(1_061), Err(LinkError::Expired(61)));
    }

    #[test]
    fn the_new_device_opens_the_handoff_and_joins_with_its_key_packages() {
        let user = IdentityKeypair::generate();
        let link = LinkSecret::generate(u64::MAX);
        let code = link.code().unwrap();
        let device = derive_device(&user, &code.link_key);
        assert_eq!(device.user(), user.public_key());
        // Derived the same way every time: a second use finds it listed.
        assert_eq!(
            derive_device(&user, &code.link_key).public_key(),
            device.public_key()
        );

        let list = DeviceList::new(user.public_key(), 2, [user.public_key(), device.public_key()])
            .unwrap()
            .sign(&user)
            .unwrap();
        let packages = DeviceKeyPackages::generate(&device, &[Suite::X25519]).unwrap();
        let public = packages.public().unwrap();
        let handoff = Handoff {
            device_secret: device.secret_bytes(),
            list: list.clone(),
            key_packages: packages,
        };
        let sealed = handoff.seal(&code).unwrap();

        // Another link cannot open it.
        assert_eq!(
            LinkSecret::generate(u64::MAX).open(&sealed).unwrap_err(),
            LinkError::NotForUs
        );
        let (opened, opened_device) = link.open(&sealed).unwrap();
        assert_eq!(opened.list, list);
        assert_eq!(opened_device.public_key(), device.public_key());
        assert_eq!(opened_device.user(), user.public_key());
        assert_eq!(opened.device_secret.as_slice(), device.secret_bytes().as_slice());

        // The user's first device adds the new one with the KeyPackage made
        // for it; the new device joins with the private keys handed over.
        let phone = OpenMlsRustCrypto::default();
        let mut group =
            GroupMember::create(&phone, &user, &crate::GroupId::new(b"g".to_vec()).unwrap()).unwrap();
        struct Listed(SignedDeviceList);
        impl crate::DeviceDirectory for Listed {
            fn listed(&self, user: &IdentityKey, device: &IdentityKey) -> crate::Listed {
                if self.0.list().user() == user && self.0.list().contains(device) {
                    crate::Listed::Yes
                } else {
                    crate::Listed::No
                }
            }
        }
        let added = group
            .add_members(&phone, &user, &public, &Listed(list.clone()))
            .unwrap();
        group.merge_pending_commit(&phone).unwrap();
        let laptop = OpenMlsRustCrypto::default();
        opened.key_packages.install(&laptop).unwrap();
        let tree = group.ratchet_tree().unwrap();
        assert!(GroupMember::join(&laptop, &added.welcome, Some(&tree), &NoDeviceLists).is_err());
        let mut joined = GroupMember::join(&laptop, &added.welcome, Some(&tree), &Listed(list)).unwrap();
        assert_eq!(joined.members().len(), 2);
        // Its leaf key is the handed-over one (the phone knows its private
        // key) until it updates.
        let handed = opened.key_packages.leaf_keys();
        assert!(handed.contains(&joined.own_leaf_key().unwrap()));
        joined.self_update(&laptop, &device).unwrap();
        joined.merge_pending_commit(&laptop).unwrap();
        assert!(!handed.contains(&joined.own_leaf_key().unwrap()));
    }

    #[test]
    fn a_handoff_whose_list_omits_the_device_is_refused() {
        let user = IdentityKeypair::generate();
        let link = LinkSecret::generate(u64::MAX);
        let code = link.code().unwrap();
        let list = DeviceList::new(user.public_key(), 2, [user.public_key()])
            .unwrap()
            .sign(&user)
            .unwrap();
        let handoff = Handoff {
            device_secret: derive_device(&user, &code.link_key).secret_bytes(),
            list,
            key_packages: DeviceKeyPackages::default(),
        };
        let sealed = handoff.seal(&code).unwrap();
        assert!(matches!(link.open(&sealed), Err(LinkError::Malformed(_))));
    }

    #[test]
    fn a_handoff_carrying_the_user_key_is_refused() {
        let user = IdentityKeypair::generate();
        let link = LinkSecret::generate(u64::MAX);
        let code = link.code().unwrap();
        let list = DeviceList::new(user.public_key(), 2, [user.public_key()])
            .unwrap()
            .sign(&user)
            .unwrap();
        let handoff = Handoff {
            device_secret: user.secret_bytes(),
            list,
            key_packages: DeviceKeyPackages::default(),
        };
        let sealed = handoff.seal(&code).unwrap();
        assert_eq!(
            link.open(&sealed).unwrap_err(),
            LinkError::Malformed("the handoff holds the user key".into())
        );
    }
}
