//! Long-term Ed25519 identities.
//!
//! A user *is* their Ed25519 public key: it is the MLS signature key of every
//! leaf they own and, verbatim, the identity inside their MLS basic
//! credential. Keeping the two identical means "who sent this" never needs a
//! separate directory lookup; the group layer rejects leaves where they
//! differ.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer as _, SigningKey};
use openmls::credentials::{BasicCredential, Credential, CredentialWithKey};
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::error::CoreError;

/// Length of an identity key in bytes.
const KEY_LEN: usize = 32;

pub use crate::ids::IdentityKey;

impl TryFrom<&[u8]> for IdentityKey {
    type Error = CoreError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let array: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            CoreError::InvalidIdentityKey(format!(
                "identity key must be {KEY_LEN} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self::from_bytes(array))
    }
}

impl FromStr for IdentityKey {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 2 * KEY_LEN {
            return Err(CoreError::InvalidIdentityKey(format!(
                "identity key must be {} hex characters, got {}",
                2 * KEY_LEN,
                s.len()
            )));
        }
        let mut bytes = [0u8; KEY_LEN];
        hex::decode_to_slice(s, &mut bytes)
            .map_err(|e| CoreError::InvalidIdentityKey(format!("identity key is not valid hex: {e}")))?;
        Ok(Self::from_bytes(bytes))
    }
}

/// A user's Ed25519 signing key pair.
///
/// The secret is zeroized on drop (ed25519-dalek's `zeroize` feature) and
/// never printed by `Debug`.
pub struct IdentityKeypair {
    signing_key: SigningKey,
    /// The user this key is a device of, when that is another key (see
    /// [`Self::of_user`]); `None`: the key is its own user.
    user: Option<IdentityKey>,
}

impl IdentityKeypair {
    /// Generates a fresh key pair from the operating system's RNG.
    pub fn generate() -> Self {
        Self {
            signing_key: SigningKey::generate(&mut OsRng),
            user: None,
        }
    }

    /// Rebuilds a key pair from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: &[u8; KEY_LEN]) -> Self {
        Self {
            signing_key: SigningKey::from_bytes(secret),
            user: None,
        }
    }

    /// The 32-byte secret seed, for persisting; wiped when dropped.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.signing_key.to_bytes())
    }

    /// The secret key as PKCS#8 DER (RFC 8410), e.g. to present the identity
    /// in a TLS client certificate; wiped when dropped.
    pub fn pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, CoreError> {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let document = self
            .signing_key
            .to_pkcs8_der()
            .map_err(|e| CoreError::InvalidIdentityKey(format!("encoding as PKCS#8: {e}")))?;
        Ok(Zeroizing::new(document.as_bytes().to_vec()))
    }

    /// The public half.
    pub fn public_key(&self) -> IdentityKey {
        IdentityKey::from_bytes(self.signing_key.verifying_key().to_bytes())
    }

    /// A plain Ed25519 signature of `message`, for the project's own signed
    /// structures (device lists); MLS signs through [`Signer`].
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.signing_key.sign(message).to_bytes()
    }

    /// This key as a device of `user`: the MLS credentials it makes from
    /// now on name that user ([`Self::credential_with_key`]). A key given
    /// itself as user stays its own user.
    pub fn of_user(mut self, user: IdentityKey) -> Self {
        self.user = (user != self.public_key()).then_some(user);
        self
    }

    /// The user this key is a device of: another key, or itself.
    pub fn user(&self) -> IdentityKey {
        self.user.unwrap_or_else(|| self.public_key())
    }

    /// The MLS credential for this key, bound to it as signature key: a
    /// basic credential whose identity is the public key (a key that is its
    /// own user), or the user key followed by the public key (a device of
    /// another user key). See [`MemberKey`].
    pub fn credential_with_key(&self) -> CredentialWithKey {
        let public = self.public_key();
        let identity = match self.user {
            None => public.as_bytes().to_vec(),
            Some(user) => [user.as_bytes().as_slice(), public.as_bytes().as_slice()].concat(),
        };
        CredentialWithKey {
            credential: BasicCredential::new(identity).into(),
            signature_key: public.as_bytes().as_slice().into(),
        }
    }
}

impl fmt::Debug for IdentityKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeypair")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// openmls hands the signer the fully labelled `SignContent` bytes and
/// openmls_rust_crypto verifies with `verify_strict` over exactly those bytes,
/// so this is plain (non-prehashed) Ed25519 over the payload.
impl Signer for IdentityKeypair {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.signing_key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Who a leaf is: the user it belongs to and its device key (the leaf's
/// signature key, which also owns its queue). A key that is its own user has
/// `user == device`.
///
/// Encoded in a basic credential as 32 bytes (the key, both user and device)
/// or 64 bytes (user key, then device key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    /// The user key, what peers know and invite.
    pub user: IdentityKey,
    /// The device key: the leaf's signature key and queue owner.
    pub device: IdentityKey,
}

/// How many users the `members` are: what the client calls a group's
/// members (each user may have several devices, one leaf each).
pub fn user_count(members: &[MemberKey]) -> usize {
    let mut users: Vec<IdentityKey> = members.iter().map(|member| member.user).collect();
    users.sort_unstable();
    users.dedup();
    users.len()
}

impl MemberKey {
    /// Whether the device is the user key itself, which needs no device
    /// list: only the user key's holder can sign as it.
    pub fn is_own_user(&self) -> bool {
        self.user == self.device
    }
}

/// The member a credential names, if it is one of ours: a basic credential
/// holding a 32-byte key or a 64-byte user and device key pair.
pub(crate) fn credential_member(credential: &Credential) -> Result<MemberKey, CoreError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| CoreError::InvalidCredential("not a basic credential".into()))?;
    let identity = basic.identity();
    let key =
        |bytes: &[u8]| IdentityKey::try_from(bytes).map_err(|e| CoreError::InvalidCredential(e.to_string()));
    match identity.len() {
        KEY_LEN => {
            let key = key(identity)?;
            Ok(MemberKey {
                user: key,
                device: key,
            })
        }
        64 => Ok(MemberKey {
            user: key(&identity[..KEY_LEN])?,
            device: key(&identity[KEY_LEN..])?,
        }),
        other => Err(CoreError::InvalidCredential(format!(
            "a credential names a 32-byte key or a 64-byte user and device key pair, not {other} bytes"
        ))),
    }
}

/// [`credential_member`], additionally requiring that the credential's
/// device is the signature key it is bound to, so that whoever signs as
/// this leaf is the device it shows.
pub(crate) fn checked_member(credential: &Credential, signature_key: &[u8]) -> Result<MemberKey, CoreError> {
    let member = credential_member(credential)?;
    if member.device.as_bytes().as_slice() != signature_key {
        return Err(CoreError::InvalidCredential(format!(
            "credential device {} differs from its signature key",
            member.device.short()
        )));
    }
    Ok(member)
}

/// The device key of [`checked_member`]: what queues, callers and leaves
/// are matched by.
pub(crate) fn checked_identity(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<IdentityKey, CoreError> {
    checked_member(credential, signature_key).map(|member| member.device)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ed25519_dalek::{Signature, VerifyingKey};
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use openmls_traits::OpenMlsProvider as _;
    use openmls_traits::crypto::OpenMlsCrypto as _;

    use super::*;

    #[test]
    fn identity_key_hex_round_trips() {
        let key = IdentityKeypair::generate().public_key();
        let text = key.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<IdentityKey>().unwrap(), key);
        assert!(text.starts_with(&key.short()));
        assert_eq!(key.short().len(), 16);
    }

    #[test]
    fn identity_key_parse_accepts_uppercase_hex() {
        let key = IdentityKeypair::generate().public_key();
        let upper = key.to_string().to_uppercase();
        assert_eq!(upper.parse::<IdentityKey>().unwrap(), key);
    }

    #[test]
    fn identity_key_parse_rejects_wrong_length() {
        let err = "abcd".parse::<IdentityKey>().unwrap_err();
        assert!(err.to_string().contains("64 hex characters, got 4"), "{err}");
    }

    #[test]
    fn identity_key_parse_rejects_bad_hex() {
        let err = "zz".repeat(32).parse::<IdentityKey>().unwrap_err();
        assert!(err.to_string().contains("not valid hex"), "{err}");
    }

    #[test]
    fn identity_key_from_slice_names_the_wrong_length() {
        let err = IdentityKey::try_from(&[0u8; 31][..]).unwrap_err();
        assert!(
            err.to_string().contains("identity key must be 32 bytes, got 31"),
            "{err}"
        );
        assert!(IdentityKey::try_from(&[7u8; 32][..]).is_ok());
    }

    #[test]
    fn keypair_survives_secret_bytes_round_trip() {
        let keypair = IdentityKeypair::generate();
        let restored = IdentityKeypair::from_secret_bytes(&keypair.secret_bytes());
        assert_eq!(restored.public_key(), keypair.public_key());
    }

    #[test]
    fn signer_output_verifies_with_ed25519_dalek() {
        let keypair = IdentityKeypair::generate();
        let payload = b"labelled MLS sign content";
        let signature = keypair.sign(payload).unwrap();
        assert_eq!(keypair.signature_scheme(), SignatureScheme::ED25519);

        let verifying_key = VerifyingKey::from_bytes(keypair.public_key().as_bytes()).unwrap();
        let signature = Signature::from_slice(&signature).unwrap();
        verifying_key.verify_strict(payload, &signature).unwrap();
        assert!(verifying_key.verify_strict(b"other", &signature).is_err());

        // And the way openmls_rust_crypto checks MLS signatures.
        OpenMlsRustCrypto::default()
            .crypto()
            .verify_signature(
                SignatureScheme::ED25519,
                payload,
                keypair.public_key().as_bytes(),
                &signature.to_bytes(),
            )
            .unwrap();
    }

    #[test]
    fn debug_does_not_leak_the_secret() {
        let keypair = IdentityKeypair::generate();
        let debug = format!("{keypair:?}");
        let secret = keypair.secret_bytes();
        assert!(!debug.contains(&hex::encode(*secret)), "{debug}");
        assert!(!debug.contains(&format!("{:?}", *secret)), "{debug}");
        assert!(debug.contains(&keypair.public_key().short()), "{debug}");
    }

    #[test]
    fn credential_carries_the_public_key_twice() {
        let keypair = IdentityKeypair::generate();
        let cwk = keypair.credential_with_key();
        let basic = BasicCredential::try_from(cwk.credential).unwrap();
        assert_eq!(basic.identity(), keypair.public_key().as_bytes());
        assert_eq!(cwk.signature_key.as_slice(), keypair.public_key().as_bytes());
    }
}
