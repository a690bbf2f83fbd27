//! KeyPackages: the one-time "add me" tokens a client uploads so others can
//! put it into groups while it is offline.

use openmls::prelude::{
    Capabilities, ExtensionType, KeyPackage, KeyPackageIn, LeafNode, Lifetime, OpenMlsCrypto,
    ProtocolVersion,
    tls_codec::{self, DeserializeBytes as _, Serialize as _, Size as _},
};
use openmls::storage::OpenMlsProvider;
use sha2::{Digest, Sha256};

#[cfg(test)]
use crate::CIPHERSUITE;
use crate::error::CoreError;
use crate::identity::{IdentityKey, IdentityKeypair, MemberKey, checked_identity, checked_member};
use crate::suite::Suite;

/// Creates a fresh KeyPackage for `identity` and returns its TLS encoding
/// (a bare `KeyPackage`, not wrapped in an `MlsMessage`).
///
/// The private init and leaf keys are written to `provider`'s storage, keyed
/// by the KeyPackage's hash reference; [`crate::GroupMember::join`] looks them
/// up there, so the storage must outlive the upload (persist it if the Welcome
/// may arrive in a later process). They are deleted when a Welcome consumes
/// them.
pub fn generate_key_package<P: OpenMlsProvider>(
    provider: &P,
    identity: &IdentityKeypair,
) -> Result<Vec<u8>, CoreError> {
    generate_key_package_with(provider, identity, KeyPackageOptions::default())
}

/// What an identity has in stock on a node of one ciphersuite's
/// KeyPackages (`keyPackageCount`): the unexpired ordinary ones, and
/// whether an unexpired last-resort one is among them besides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyPackageStock {
    /// Unexpired ordinary KeyPackages.
    pub count: u32,
    /// Whether an unexpired last-resort KeyPackage is kept too.
    pub has_last_resort: bool,
}

/// How to make a KeyPackage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyPackageOptions {
    /// Mark it with the `last_resort` extension (type 0x000A, from the MLS
    /// extensions draft): a delivery service hands it out only when no other
    /// KeyPackage is left, and keeps it, so the owner stays reachable (at the
    /// cost of init-key reuse).
    pub last_resort: bool,
    /// Valid for this many seconds from now (default: openmls' 12 weeks).
    pub lifetime_seconds: Option<u64>,
    /// The ciphersuite (a group of that suite can add its owner).
    pub suite: Suite,
}

/// [`generate_key_package`] with options.
pub fn generate_key_package_with<P: OpenMlsProvider>(
    provider: &P,
    identity: &IdentityKeypair,
    options: KeyPackageOptions,
) -> Result<Vec<u8>, CoreError> {
    let mut builder = KeyPackage::builder();
    if options.last_resort {
        // A KeyPackage may only carry extensions its leaf declares support for.
        builder = builder
            .mark_as_last_resort()
            .leaf_node_capabilities(Capabilities::new(
                None,
                None,
                Some(&[ExtensionType::LastResort]),
                None,
                None,
            ));
    }
    if let Some(seconds) = options.lifetime_seconds {
        builder = builder.key_package_lifetime(Lifetime::new(seconds));
    }
    let bundle = builder
        .build(
            options.suite.ciphersuite(),
            provider,
            identity,
            identity.credential_with_key(),
        )
        .map_err(CoreError::mls("generating a KeyPackage"))?;
    bundle
        .key_package()
        .tls_serialize_detached()
        .map_err(CoreError::mls("encoding a KeyPackage"))
}

/// SHA-256 of a KeyPackage's bytes: a stable name for it on the wire (the
/// delivery service does not need to parse MLS to compute it).
pub fn fingerprint(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parses and fully validates a KeyPackage (signatures, protocol version,
/// ciphersuite, lifetime) and returns the identity it belongs to.
///
/// Fails unless the credential is a basic credential whose identity is the
/// 32-byte leaf signature key, so the returned key is the one that signed it.
pub fn key_package_identity(crypto: &impl OpenMlsCrypto, bytes: &[u8]) -> Result<IdentityKey, CoreError> {
    validate_key_package(crypto, bytes).map(|(_, member)| member.device)
}

/// The bare KeyPackage in `bytes`: the bytes themselves, or the KeyPackage
/// inside them if they are an MLSMessage wrapping one (RFC 9420, section 6:
/// version `mls10` (0x0001), wire format `mls_key_package` (0x0005)), which
/// is how mls-rs and other libraries hand KeyPackages out. A bare
/// KeyPackage starts with the version and then its ciphersuite, which is
/// never 0x0005 for a KeyPackage we accept.
pub fn unwrap_key_package(bytes: &[u8]) -> &[u8] {
    match bytes {
        [0x00, 0x01, 0x00, 0x05, inner @ ..] if !inner.is_empty() => inner,
        bare => bare,
    }
}

/// What a delivery service needs to know of a validated KeyPackage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackageInfo {
    /// Whose it is: the device key that signed it, which owns it.
    pub identity: IdentityKey,
    /// The user its credential names (equal to `identity` for a key that is
    /// its own user).
    pub user: IdentityKey,
    /// Whether it carries the `last_resort` extension.
    pub last_resort: bool,
    /// Start of its lifetime, in seconds since the Unix epoch.
    pub not_before: u64,
    /// End of its lifetime, in seconds since the Unix epoch.
    pub not_after: u64,
    /// Its ciphersuite.
    pub suite: Suite,
    /// The larger of its own extensions' and its leaf's extensions'
    /// encoded size, in bytes.
    pub extensions_size: usize,
}

/// Parses and fully validates a KeyPackage as [`key_package_identity`] does
/// and reports its owner, last-resort mark and expiry. Needs no provider:
/// validation uses only public keys.
pub fn inspect_key_package(bytes: &[u8]) -> Result<KeyPackageInfo, CoreError> {
    // Validation uses only public-key operations, so one shared provider
    // serves every call instead of seeding a fresh RNG per upload.
    static CRYPTO: std::sync::LazyLock<openmls_rust_crypto::RustCrypto> =
        std::sync::LazyLock::new(openmls_rust_crypto::RustCrypto::default);
    let (key_package, member) = validate_key_package(&*CRYPTO, bytes)?;
    let extensions_size = key_package
        .extensions()
        .tls_serialized_len()
        .max(key_package.leaf_node().extensions().tls_serialized_len());
    Ok(KeyPackageInfo {
        identity: member.device,
        user: member.user,
        last_resort: key_package.last_resort(),
        not_before: key_package.life_time().not_before(),
        not_after: key_package.life_time().not_after(),
        // Validation admitted only our suites.
        suite: Suite::from_ciphersuite(key_package.ciphersuite()).unwrap_or_default(),
        extensions_size,
    })
}

/// [`key_package_identity`], also returning the validated KeyPackage for
/// committing it.
pub(crate) fn validate_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
) -> Result<(KeyPackage, MemberKey), CoreError> {
    let unverified = KeyPackageIn::tls_deserialize_exact_bytes(bytes).map_err(|e| {
        CoreError::InvalidKeyPackage(format!(
            "cannot decode a KeyPackage ({e}); send a TLS-encoded KeyPackage (RFC 9420, section 10), bare or wrapped in an MLSMessage"
        ))
    })?;
    let key_package = unverified
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| CoreError::InvalidKeyPackage(e.to_string()))?;
    let Some(suite) = Suite::from_ciphersuite(key_package.ciphersuite()) else {
        return Err(CoreError::InvalidKeyPackage(format!(
            "ciphersuite {:?} is not one of ours ({})",
            key_package.ciphersuite(),
            Suite::ALL.map(Suite::full_name).join(", ")
        )));
    };
    check_rfc_rules(&key_package, suite)?;
    let member =
        leaf_member(key_package.leaf_node()).map_err(|e| CoreError::InvalidKeyPackage(e.to_string()))?;
    Ok((key_package, member))
}

/// What RFC 9420 asks of a KeyPackage beyond what openmls checks when it
/// verifies one: its init key and its leaf's encryption key are public
/// keys of its ciphersuite's KEM (section 10.1: a key of another length
/// is one nobody can encrypt to, and the Welcome to it fails for every
/// adder), its leaf lists its own ciphersuite among its capabilities, and
/// every extension it carries that is not a default one (section 7.2),
/// its own and its leaf's, is listed in those capabilities.
fn check_rfc_rules(key_package: &KeyPackage, suite: Suite) -> Result<(), CoreError> {
    let expected = suite.kem_public_key_len();
    let leaf = key_package.leaf_node();
    // openmls shows a leaf's key only TLS-encoded (`opaque<V>`).
    let leaf_key = leaf
        .encryption_key()
        .tls_serialize_detached()
        .ok()
        .and_then(|encoded| tls_codec::VLBytes::tls_deserialize_exact_bytes(&encoded).ok())
        .ok_or_else(|| CoreError::InvalidKeyPackage("its leaf's encryption key cannot be read".into()))?;
    for (what, length) in [
        ("init key", key_package.hpke_init_key().as_slice().len()),
        ("leaf's encryption key", leaf_key.as_slice().len()),
    ] {
        if length != expected {
            return Err(CoreError::InvalidKeyPackage(format!(
                "its {what} has {length} bytes, but a public key of its ciphersuite has {expected}"
            )));
        }
    }
    let capabilities = leaf.capabilities();
    if !capabilities
        .ciphersuites()
        .iter()
        .any(|listed| *listed == suite.ciphersuite().into())
    {
        return Err(CoreError::InvalidKeyPackage(format!(
            "its leaf does not list its own ciphersuite {} among its capabilities",
            suite.full_name()
        )));
    }
    let carried = key_package
        .extensions()
        .iter()
        .chain(leaf.extensions().iter())
        .map(|extension| extension.extension_type());
    for extension in carried {
        let default = matches!(
            extension,
            ExtensionType::ApplicationId
                | ExtensionType::RatchetTree
                | ExtensionType::RequiredCapabilities
                | ExtensionType::ExternalPub
                | ExtensionType::ExternalSenders
        );
        if !default && !capabilities.extensions().contains(&extension) {
            return Err(CoreError::InvalidKeyPackage(format!(
                "it carries extension {extension:?}, which its leaf does not list among its capabilities"
            )));
        }
    }
    Ok(())
}

/// The device key behind a leaf, enforcing our credential rule.
pub(crate) fn leaf_identity(leaf: &LeafNode) -> Result<IdentityKey, CoreError> {
    checked_identity(leaf.credential(), leaf.signature_key().as_slice())
}

/// The user and device behind a leaf, enforcing our credential rule.
pub(crate) fn leaf_member(leaf: &LeafNode) -> Result<MemberKey, CoreError> {
    checked_member(leaf.credential(), leaf.signature_key().as_slice())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use openmls::prelude::{BasicCredential, CredentialWithKey};
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use openmls_traits::OpenMlsProvider as _;

    use super::*;

    #[test]
    fn a_key_package_wrapped_in_an_mls_message_is_unwrapped() {
        let provider = OpenMlsRustCrypto::default();
        let alice = IdentityKeypair::generate();
        let bare = generate_key_package(&provider, &alice).unwrap();
        // MLSMessage { version mls10, wire format mls_key_package, key_package }.
        let wrapped = [&[0x00, 0x01, 0x00, 0x05][..], &bare].concat();
        assert_eq!(unwrap_key_package(&wrapped), bare.as_slice());
        assert_eq!(unwrap_key_package(&bare), bare.as_slice());
        let info = inspect_key_package(unwrap_key_package(&wrapped)).unwrap();
        assert_eq!(info.identity, alice.public_key());
        // Something else gets an error that says what to send.
        let err = inspect_key_package(b"\x00\x01\x00\x02garbage").unwrap_err();
        assert!(err.to_string().contains("send a TLS-encoded KeyPackage"), "{err}");
    }

    #[test]
    fn key_package_identity_returns_the_uploader() {
        let provider = OpenMlsRustCrypto::default();
        let alice = IdentityKeypair::generate();
        let bytes = generate_key_package(&provider, &alice).unwrap();

        let identity = key_package_identity(provider.crypto(), &bytes).unwrap();
        assert_eq!(identity, alice.public_key());

        // Anyone can validate it; no private state is needed.
        let other = OpenMlsRustCrypto::default();
        assert_eq!(
            key_package_identity(other.crypto(), &bytes).unwrap(),
            alice.public_key()
        );
    }

    #[test]
    fn key_packages_are_fresh_each_time() {
        let provider = OpenMlsRustCrypto::default();
        let alice = IdentityKeypair::generate();
        let first = generate_key_package(&provider, &alice).unwrap();
        let second = generate_key_package(&provider, &alice).unwrap();
        assert_ne!(fingerprint(&first), fingerprint(&second));
    }

    #[test]
    fn inspect_reports_last_resort_and_expiry() {
        let provider = OpenMlsRustCrypto::default();
        let alice = IdentityKeypair::generate();
        let normal = generate_key_package(&provider, &alice).unwrap();
        let info = inspect_key_package(&normal).unwrap();
        assert_eq!(info.identity, alice.public_key());
        assert!(!info.last_resort);
        let options = KeyPackageOptions {
            last_resort: true,
            lifetime_seconds: Some(60),
            suite: Default::default(),
        };
        let last = generate_key_package_with(&provider, &alice, options).unwrap();
        let info = inspect_key_package(&last).unwrap();
        assert!(info.last_resort);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(info.not_after >= now + 59 && info.not_after <= now + 61);
    }

    /// A KeyPackage of `alice` built by openmls' builder as `build` sets it
    /// up, TLS-encoded.
    fn built(
        alice: &IdentityKeypair,
        build: impl FnOnce(openmls::prelude::KeyPackageBuilder) -> openmls::prelude::KeyPackageBuilder,
    ) -> Vec<u8> {
        let provider = OpenMlsRustCrypto::default();
        build(KeyPackage::builder())
            .build(CIPHERSUITE, &provider, alice, alice.credential_with_key())
            .unwrap()
            .key_package()
            .tls_serialize_detached()
            .unwrap()
    }

    #[test]
    fn a_key_package_must_list_its_suite_and_every_extension_it_carries() {
        use openmls::prelude::{Ciphersuite, Extension, Extensions, UnknownExtension};

        let provider = OpenMlsRustCrypto::default();
        let alice = IdentityKeypair::generate();
        // Ours, plain and last resort, pass.
        for last_resort in [false, true] {
            let options = KeyPackageOptions {
                last_resort,
                ..KeyPackageOptions::default()
            };
            let ours = generate_key_package_with(&provider, &alice, options).unwrap();
            key_package_identity(provider.crypto(), &ours).unwrap();
        }
        // Its leaf claims only another suite.
        let elsewhere = built(&alice, |builder| {
            builder.leaf_node_capabilities(Capabilities::new(
                None,
                Some(&[Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256]),
                None,
                None,
                None,
            ))
        });
        let err = key_package_identity(provider.crypto(), &elsewhere).unwrap_err();
        assert!(
            err.to_string().contains("does not list its own ciphersuite"),
            "{err}"
        );
        // It carries an extension its leaf does not list.
        let unlisted = built(&alice, |builder| {
            builder.key_package_extensions(
                Extensions::single(Extension::Unknown(0xff00, UnknownExtension(vec![1, 2, 3]))).unwrap(),
            )
        });
        // (openmls refuses this one itself; ours covers the leaf's own.)
        let err = key_package_identity(provider.crypto(), &unlisted).unwrap_err();
        assert!(err.to_string().contains("capabilities"), "{err}");
    }

    #[test]
    fn key_package_identity_rejects_garbage() {
        let provider = OpenMlsRustCrypto::default();
        let err = key_package_identity(provider.crypto(), b"not a key package").unwrap_err();
        assert!(matches!(err, CoreError::InvalidKeyPackage(_)), "{err}");
        assert!(err.to_string().starts_with("invalid KeyPackage"), "{err}");
    }

    #[test]
    fn key_package_identity_rejects_trailing_bytes() {
        let provider = OpenMlsRustCrypto::default();
        let mut bytes = generate_key_package(&provider, &IdentityKeypair::generate()).unwrap();
        bytes.push(0);
        assert!(key_package_identity(provider.crypto(), &bytes).is_err());
    }

    #[test]
    fn key_package_identity_rejects_a_tampered_package() {
        let provider = OpenMlsRustCrypto::default();
        let mut bytes = generate_key_package(&provider, &IdentityKeypair::generate()).unwrap();
        // Flip a bit inside the trailing signature.
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let err = key_package_identity(provider.crypto(), &bytes).unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
    }

    #[test]
    fn fingerprint_is_sha256() {
        assert_eq!(
            hex::encode(fingerprint(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn key_package_identity_rejects_a_credential_naming_someone_else() {
        let provider = OpenMlsRustCrypto::default();
        let mallory = IdentityKeypair::generate();
        let victim = IdentityKeypair::generate().public_key();
        let forged = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &provider,
                &mallory,
                CredentialWithKey {
                    credential: BasicCredential::new(victim.as_bytes().to_vec()).into(),
                    signature_key: mallory.public_key().as_bytes().as_slice().into(),
                },
            )
            .unwrap();
        let bytes = forged.key_package().tls_serialize_detached().unwrap();
        let err = key_package_identity(provider.crypto(), &bytes).unwrap_err();
        assert!(
            err.to_string().contains("differs from its signature key"),
            "{err}"
        );
    }

    #[test]
    fn key_package_identity_rejects_a_credential_of_the_wrong_length() {
        let provider = OpenMlsRustCrypto::default();
        let mallory = IdentityKeypair::generate();
        let forged = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &provider,
                &mallory,
                CredentialWithKey {
                    credential: BasicCredential::new(b"mallory".to_vec()).into(),
                    signature_key: mallory.public_key().as_bytes().as_slice().into(),
                },
            )
            .unwrap();
        let bytes = forged.key_package().tls_serialize_detached().unwrap();
        let err = key_package_identity(provider.crypto(), &bytes).unwrap_err();
        assert!(err.to_string().contains("not 7 bytes"), "{err}");
    }
}
