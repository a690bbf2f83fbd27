//! The real crypto (openmls_rust_crypto) with one operation altered, for
//! members who send what others cannot process and KeyPackages the node
//! must refuse, all validly signed.

use std::sync::atomic::{AtomicUsize, Ordering};

use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig, HpkeKeyPair,
    KemOutput, SignatureScheme,
};

/// The real crypto, except:
/// - what is sealed to the HPKE key `wrong_secret_to` is altered after its
///   length prefix (a well-formed, wrong path secret), counted in `sealed`;
/// - HPKE public keys derived are cut to `hpke_public_key_len` bytes (a
///   KeyPackage's init and leaf keys of the wrong length for its suite).
#[derive(Default)]
pub struct Tampered {
    pub crypto: RustCrypto,
    pub wrong_secret_to: Option<Vec<u8>>,
    pub sealed: AtomicUsize,
    pub hpke_public_key_len: Option<usize>,
}

/// A provider with `inner`'s storage and randomness and tampered crypto.
pub struct Tampering<'a, P> {
    pub inner: &'a P,
    pub crypto: Tampered,
}

impl<'a, P: OpenMlsProvider> OpenMlsProvider for Tampering<'a, P> {
    type CryptoProvider = Tampered;
    type RandProvider = P::RandProvider;
    type StorageProvider = P::StorageProvider;

    fn storage(&self) -> &Self::StorageProvider {
        self.inner.storage()
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        self.inner.rand()
    }
}

impl OpenMlsCrypto for Tampered {
    fn hpke_seal(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        aad: &[u8],
        ptxt: &[u8],
    ) -> Result<HpkeCiphertext, CryptoError> {
        if self.wrong_secret_to.as_deref() != Some(pk_r) {
            return self.crypto.hpke_seal(config, pk_r, info, aad, ptxt);
        }
        self.sealed.fetch_add(1, Ordering::Relaxed);
        let mut wrong = ptxt.to_vec();
        wrong.iter_mut().skip(1).for_each(|byte| *byte ^= 0xff);
        self.crypto.hpke_seal(config, pk_r, info, aad, &wrong)
    }

    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        self.crypto.supports(ciphersuite)
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        self.crypto.supported_ciphersuites()
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<tls_codec::SecretVLBytes, CryptoError> {
        self.crypto.hkdf_extract(hash_type, salt, ikm)
    }

    fn hmac(
        &self,
        hash_type: HashType,
        key: &[u8],
        message: &[u8],
    ) -> Result<tls_codec::SecretVLBytes, CryptoError> {
        self.crypto.hmac(hash_type, key, message)
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<tls_codec::SecretVLBytes, CryptoError> {
        self.crypto.hkdf_expand(hash_type, prk, info, okm_len)
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.crypto.hash(hash_type, data)
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.crypto.aead_encrypt(alg, key, data, nonce, aad)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.crypto.aead_decrypt(alg, key, ct_tag, nonce, aad)
    }

    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        self.crypto.signature_key_gen(alg)
    }

    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.crypto.verify_signature(alg, data, pk, signature)
    }

    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.crypto.sign(alg, data, key)
    }

    fn hpke_open(
        &self,
        config: HpkeConfig,
        input: &HpkeCiphertext,
        sk_r: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.crypto.hpke_open(config, input, sk_r, info, aad)
    }

    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        self.crypto
            .hpke_setup_sender_and_export(config, pk_r, info, exporter_context, exporter_length)
    }

    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        self.crypto
            .hpke_setup_receiver_and_export(config, enc, sk_r, info, exporter_context, exporter_length)
    }

    fn derive_hpke_keypair(&self, config: HpkeConfig, ikm: &[u8]) -> Result<HpkeKeyPair, CryptoError> {
        let mut pair = self.crypto.derive_hpke_keypair(config, ikm)?;
        if let Some(length) = self.hpke_public_key_len {
            pair.public.truncate(length);
        }
        Ok(pair)
    }
}
