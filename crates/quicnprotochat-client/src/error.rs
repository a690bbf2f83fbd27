//! The client's error type. Every message says what went wrong and what to do.

use std::path::PathBuf;
use std::time::Duration;

use quicnprotochat_core::{CoreError, IdentityKey};
use quicnprotochat_proto::cert::CertError;

use crate::state::StateError;

/// Errors of client commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The trusted certificate file could not be read.
    #[error(
        "cannot read the node's certificate ({source}); pass the node's certificate file (its data/server-cert.der) with --ca-cert"
    )]
    CaCert {
        /// The file given.
        path: PathBuf,
        /// Why it could not be read.
        source: CertError,
    },
    /// The trusted certificate file is not a usable certificate.
    #[error(
        "{path} is not a usable DER certificate ({reason}); pass the node's data/server-cert.der with --ca-cert"
    )]
    CaCertUnusable {
        /// The file given.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// `--server` is not a usable address.
    #[error("--server {server}: {reason}")]
    BadServer {
        /// What was given.
        server: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No answer to the handshake in time.
    #[error(
        "no node answered at {server} within {after:?}; is quicnprotochat-server running there? (set --server or QUICNPROTOCHAT_SERVER)"
    )]
    Unreachable {
        /// The address tried.
        server: String,
        /// How long we waited.
        after: Duration,
    },
    /// The node's certificate is not the trusted one.
    #[error(
        "the node at {server} is not trusted: its certificate does not match {ca_cert} ({reason}); pass the node's own certificate with --ca-cert"
    )]
    UntrustedNode {
        /// The address tried.
        server: String,
        /// The trusted certificate.
        ca_cert: PathBuf,
        /// What TLS reported.
        reason: String,
    },
    /// The node's certificate is trusted but not valid for the name used.
    #[error(
        "the node at {server} presented a trusted certificate that is not valid for the name {name:?} ({reason}); connect by a name the certificate lists (localhost, 127.0.0.1, ::1 or a --tls-san of the node), or pass --server-name"
    )]
    WrongName {
        /// The address tried.
        server: String,
        /// The name verified.
        name: String,
        /// What TLS reported.
        reason: String,
    },
    /// Any other connection failure.
    #[error("connecting to {server}: {reason}")]
    Connect {
        /// The address tried.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// The local UDP socket could not be opened.
    #[error("opening a UDP socket: {0}")]
    Socket(std::io::Error),
    /// The node did not answer a call in time.
    #[error("the node did not answer within {0:?}; try again")]
    Timeout(Duration),
    /// The node answered a call with an error, or the session broke.
    #[error("node: {0}")]
    Rpc(#[from] capnp::Error),
    /// Another member's Commit was accepted for the epoch ours was made in.
    #[error("another member changed the group first{}", .current_epoch.map(|e| format!(" (it is at epoch {e})")).unwrap_or_default())]
    CommitConflict {
        /// The group's epoch on the node, if it said.
        current_epoch: Option<u64>,
    },
    /// No answer came to a group change; it may or may not have reached the
    /// node.
    #[error(
        "the node did not confirm the change to {group} ({reason}); it stays pending and your next command (e.g. `recv`) sends it again"
    )]
    Unconfirmed {
        /// The group.
        group: String,
        /// What happened instead of an answer.
        reason: String,
    },
    /// The node has no KeyPackage left for a peer.
    #[error(
        "the node has no KeyPackage for {0}; ask its owner to run `register-state` (or `register`) to upload a fresh one"
    )]
    NoKeyPackage(IdentityKey),
    /// A KeyPackage the node served is not valid for the requested identity.
    #[error("the KeyPackage served for {requested} is not valid: {reason}")]
    BadKeyPackage {
        /// The identity asked for.
        requested: IdentityKey,
        /// What is wrong with it.
        reason: String,
    },
    /// The node stored something other than what we uploaded.
    #[error("the node's fingerprint of the uploaded KeyPackage does not match ours; the upload was altered")]
    FingerprintMismatch,
    /// The state file failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// MLS processing failed.
    #[error("MLS: {0}")]
    Core(#[from] CoreError),
    /// A queued message is for a group this client is not in.
    #[error("message for unknown group {0}")]
    UnknownGroup(String),
    /// Some of the messages of a change could not be handed to the node.
    #[error("{0}")]
    PartialDelivery(String),
    /// A command needs a group and none is selected.
    #[error("{0}")]
    NoGroup(String),
    /// A command-line argument is not usable.
    #[error("{0}")]
    Usage(String),
    /// The demo's end-to-end check failed.
    #[error("demo failed: {0}")]
    Demo(String),
    /// A bug: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ClientError {
    /// How long the node asked to wait, if it refused a call for its rate
    /// limit ("rate limited, retry after N ms"); at most 5 s.
    pub fn retry_after(&self) -> Option<Duration> {
        let ClientError::Rpc(e) = self else {
            return None;
        };
        let rest = e.extra.split("rate limited, retry after ").nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let millis: u64 = digits.parse().ok()?;
        Some(Duration::from_millis(millis.clamp(1, 5_000)))
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn the_nodes_retry_hint_is_read_from_a_rate_limit_error() {
        let limited = ClientError::Rpc(capnp::Error::overloaded(
            "remote exception: rate limited, retry after 16 ms".into(),
        ));
        assert_eq!(limited.retry_after(), Some(Duration::from_millis(16)));
        let other = ClientError::Rpc(capnp::Error::failed("queue full".into()));
        assert_eq!(other.retry_after(), None);
        assert_eq!(ClientError::Timeout(Duration::from_secs(1)).retry_after(), None);
    }
}
