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

/// Bytes a client may send on one stream ahead of the node reading them.
pub const STREAM_RECEIVE_WINDOW: u32 = 512 * 1024;

/// Bytes a client may send on all its streams ahead of the node reading
/// them.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes the node may have written to one connection and not yet had
/// acknowledged. With the receive window, the most QUIC holds for one
/// connection: 2 MiB.
pub const SEND_WINDOW: u64 = 1024 * 1024;

/// A QUIC server configuration presenting `cert` (signed by `key`), TLS 1.3
/// only, speaking [`ALPN`].
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TransportError> {
    let tls = server_tls(cert, key)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quic_idle_timeout(idle_timeout)))
        // One RPC stream per connection; a few spare so a reconnecting client
        // is never refused a stream, but a peer cannot open thousands.
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into())
        // What QUIC itself may hold for one connection, beyond the node's
        // memory budget: bytes received and not yet read (per stream and in
        // all), bytes written and not yet acknowledged, and no datagrams
        // (the protocol has none; quinn would buffer 1.25 MB of them).
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .send_window(SEND_WINDOW)
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The node's TLS configuration inside [`server_config`]: TLS 1.3 only,
/// [`ALPN`], client certificates checked by [`IdentityVerifier`], and the
/// provider's key exchange groups in its order of preference
/// (X25519MLKEM768 first).
pub fn server_tls(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(IdentityVerifier::new(&crypto_provider()))
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
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
    quic_client_config(client_tls(crypto_provider(), trusted, identity)?)
}

/// The client's TLS configuration inside [`client_config`], with
/// `provider`'s key exchange groups offered (in its order: the default
/// provider offers X25519MLKEM768 first, then X25519, ...).
pub fn client_tls(
    provider: Arc<CryptoProvider>,
    trusted: CertificateDer<'static>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, TransportError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(trusted)
        .map_err(|e| TransportError::TrustAnchor(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A QUIC client configuration around `tls` (see [`client_tls`]), with the
/// client's idle timeout and keep-alive.
pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TransportError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rustls::NamedGroup;
    use rustls::pki_types::ServerName;
    use rustls::quic::{self, Connection, Version};

    use super::*;

    /// A node certificate and a client identity, as the node and the
    /// client make them.
    fn parties() -> (
        rustls::ServerConfig,
        CertificateDer<'static>,
        (CertificateDer<'static>, PrivateKeyDer<'static>),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let node =
            crate::cert::load_or_generate(&dir.path().join("c.der"), &dir.path().join("k.der"), &[]).unwrap();
        let identity = quicnprotochat_core::IdentityKeypair::generate();
        let client = crate::peer::client_certificate(&identity.pkcs8_der().unwrap()).unwrap();
        (
            server_tls(node.cert.clone(), node.key).unwrap(),
            node.cert,
            client,
        )
    }

    /// Runs a QUIC-TLS handshake between the two configurations in memory
    /// and returns the key exchange group each side ended with.
    fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> (NamedGroup, NamedGroup) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = Connection::Client(
            quic::ClientConnection::new(Arc::new(client), Version::V1, name, b"client".to_vec()).unwrap(),
        );
        let mut server = Connection::Server(
            quic::ServerConnection::new(Arc::new(server), Version::V1, b"server".to_vec()).unwrap(),
        );
        // Each key change moves on to the next packet space; each space's
        // bytes arrive on their own and in order, as QUIC delivers them.
        let pass = |from: &mut Connection, to: &mut Connection| {
            loop {
                let mut bytes = Vec::new();
                let change = from.write_hs(&mut bytes);
                if !bytes.is_empty() {
                    to.read_hs(&bytes).unwrap();
                }
                if change.is_none() {
                    break;
                }
            }
        };
        for _ in 0..8 {
            pass(&mut client, &mut server);
            pass(&mut server, &mut client);
            if !client.is_handshaking() && !server.is_handshaking() {
                let group = |conn: &Connection| conn.negotiated_key_exchange_group().unwrap().name();
                return (group(&client), group(&server));
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn our_client_and_node_agree_on_the_hybrid_x25519mlkem768_key_exchange() {
        let (server, trusted, identity) = parties();
        let client = client_tls(crypto_provider(), trusted, Some(identity)).unwrap();
        assert_eq!(
            handshake(client, server),
            (NamedGroup::X25519MLKEM768, NamedGroup::X25519MLKEM768)
        );
    }

    #[test]
    fn a_client_offering_only_x25519_still_gets_in() {
        let (server, trusted, identity) = parties();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        let client = client_tls(Arc::new(provider), trusted, Some(identity)).unwrap();
        assert_eq!(
            handshake(client, server),
            (NamedGroup::X25519, NamedGroup::X25519)
        );
    }
}
