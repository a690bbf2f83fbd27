//! TLS 1.3 and QUIC configuration shared by the node and its clients.
//!
//! Exactly one rustls crypto provider (aws-lc-rs) is compiled in and passed
//! explicitly: with two providers compiled, rustls cannot pick a default and
//! panics. aws-lc-rs also gives the hybrid post-quantum key exchange
//! X25519MLKEM768, which rustls prefers when both ends support it.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::peer::IdentityVerifier;

/// The ALPN protocol identifier of quicnprotochat's wire protocol, version 1.
pub const ALPN: &[u8] = b"quicnprotochat/1";

/// How long a client lets a connection be silent before dropping it (the
/// node's own idle timeout is configurable).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a client pings an otherwise idle connection to keep it open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Errors building a TLS or QUIC configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// rustls rejected the certificate, key or protocol settings.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The trusted certificate could not be used as a trust anchor.
    #[error("the trusted certificate is not a usable X.509 certificate: {0}")]
    TrustAnchor(String),
    /// quinn rejected the TLS configuration (e.g. no TLS 1.3 cipher suite).
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

/// The single crypto provider both ends use.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A QUIC server configuration presenting `cert` (signed by `key`), TLS 1.3
/// only, speaking [`ALPN`].
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(IdentityVerifier::new(&crypto_provider()))
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quic_idle_timeout(idle_timeout)))
        // One RPC stream per connection; a few spare so a reconnecting client
        // is never refused a stream, but a peer cannot open thousands.
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A QUIC client configuration that trusts exactly `trusted` (the node's
/// self-signed certificate, or the CA that issued it), TLS 1.3 only, and
/// authenticates as `identity` (a client certificate and its key, see
/// [`crate::peer`]) or, with `None`, connects anonymously.
///
/// The certificate chain and the server name are always verified by rustls'
/// WebPKI verifier; there is no option to skip verification.
pub fn client_config(
    trusted: CertificateDer<'static>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(trusted)
        .map_err(|e| TransportError::TrustAnchor(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quic_idle_timeout(IDLE_TIMEOUT)))
        .keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn quic_idle_timeout(timeout: Duration) -> quinn::IdleTimeout {
    // Beyond QUIC's varint range (~146 years) means "as long as possible".
    quinn::IdleTimeout::try_from(timeout).unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::MAX))
}
