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

impl TryFrom<&[u8]> for IdentityKey {
    type Error = CoreError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let array: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            CoreError::InvalidIdentityKey(format!(
                "identity key must be {KEY_LEN} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self(array))
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
        Ok(Self(bytes))
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

/// A user's Ed25519 signing key pair.
///
/// The secret is zeroized on drop (ed25519-dalek's `zeroize` feature) and
/// never printed by `Debug`.
pub struct IdentityKeypair {
    signing_key: SigningKey,
}

impl IdentityKeypair {
    /// Generates a fresh key pair from the operating system's RNG.
    pub fn generate() -> Self {
        Self {
            signing_key: SigningKey::generate(&mut OsRng),
        }
    }

    /// Rebuilds a key pair from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: &[u8; KEY_LEN]) -> Self {
        Self {
            signing_key: SigningKey::from_bytes(secret),
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
        IdentityKey(self.signing_key.verifying_key().to_bytes())
    }

    /// A plain Ed25519 signature of `message`, for the project's own signed
    /// structures (device lists); MLS signs through [`Signer`].
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.signing_key.sign(message).to_bytes()
    }

    /// The MLS credential for this identity: a basic credential whose
    /// identity is the public key, bound to that same key as signature key.
    pub fn credential_with_key(&self) -> CredentialWithKey {
        let public = self.public_key();
        CredentialWithKey {
            credential: BasicCredential::new(public.as_bytes().to_vec()).into(),
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

/// The identity a credential names, if it is one of ours: a basic credential
/// holding exactly a 32-byte key.
pub(crate) fn credential_identity(credential: &Credential) -> Result<IdentityKey, CoreError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| CoreError::InvalidCredential("not a basic credential".into()))?;
    IdentityKey::try_from(basic.identity()).map_err(|e| CoreError::InvalidCredential(e.to_string()))
}

/// [`credential_identity`], additionally requiring that the credential names
/// the signature key it is bound to, so that whoever signs as this leaf is
/// the identity it shows.
pub(crate) fn checked_identity(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<IdentityKey, CoreError> {
    let identity = credential_identity(credential)?;
    if identity.as_bytes().as_slice() != signature_key {
        return Err(CoreError::InvalidCredential(format!(
            "credential identity {} differs from its signature key",
            identity.short()
        )));
    }
    Ok(identity)
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
