//! Identity on the connection: a client proves it holds its Ed25519 identity
//! key with TLS 1.3 client authentication.
//!
//! The client presents a self-signed certificate whose public key is its
//! identity key. No CA is involved and none is needed: the certificate only
//! carries the key. What proves possession is the TLS 1.3 CertificateVerify
//! signature over the handshake transcript, which rustls checks against that
//! key through [`IdentityVerifier::verify_tls13_signature`]. The proof is
//! bound to this handshake, so it cannot be replayed on another connection.
//! A client that presents no certificate is anonymous.

use std::sync::Arc;

use quicnprotochat_core::IdentityKey;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE,
/// AlgorithmIdentifier id-Ed25519, BIT STRING of 32 bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Errors making a client certificate.
#[derive(Debug, thiserror::Error)]
#[error("making the identity certificate: {0}")]
pub struct IdentityCertError(String);

/// A self-signed certificate for the identity whose Ed25519 secret key is
/// `pkcs8` (PKCS#8 DER), and that key, ready for a TLS client config.
pub fn client_certificate(
    pkcs8: &[u8],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), IdentityCertError> {
    let der = PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| IdentityCertError(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec!["quicnprotochat-client".to_owned()])
        .map_err(|e| IdentityCertError(e.to_string()))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| IdentityCertError(e.to_string()))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The identity key a certificate carries: its Ed25519 public key, read
/// from the SubjectPublicKeyInfo as parsed by webpki (the same key rustls
/// verifies the handshake signature with).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<IdentityKey> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(ED25519_SPKI_PREFIX.as_slice())?;
    IdentityKey::try_from(key).ok()
}

/// The identity a connection was authenticated as, if any.
pub fn peer_identity(connection: &quinn::Connection) -> Option<IdentityKey> {
    let certificates = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    identity_of(certificates.first()?)
}

/// The node's client-certificate check: optional client authentication with
/// an Ed25519 identity certificate, see the module docs.
#[derive(Debug)]
pub struct IdentityVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl IdentityVerifier {
    /// A verifier using `provider`'s signature algorithms.
    pub fn new(provider: &CryptoProvider) -> Arc<Self> {
        Arc::new(Self {
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Anonymous connections may ping and fetch KeyPackages.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The certificate is only a carrier for the key: its issuer, validity
        // and self-signature grant nothing. What matters is that it holds an
        // Ed25519 key, which the CertificateVerify signature must then prove.
        if !intermediates.is_empty() || identity_of(end_entity).is_none() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Configs are TLS 1.3 only; QUIC requires it.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadSignature));
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use quicnprotochat_core::IdentityKeypair;

    use super::*;

    #[test]
    fn a_client_certificate_carries_the_identity_key() {
        let identity = IdentityKeypair::generate();
        let (cert, _) = client_certificate(&identity.pkcs8_der().unwrap()).unwrap();
        assert_eq!(identity_of(&cert), Some(identity.public_key()));
    }

    #[test]
    fn a_certificate_with_another_key_type_carries_no_identity() {
        let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        assert_eq!(identity_of(other.cert.der()), None);
        assert_eq!(identity_of(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
