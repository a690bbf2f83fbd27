//! Errors of the node, one enum per layer, each converted once at its
//! boundary: [`StoreError`](crate::store::StoreError) and field errors become
//! [`ServiceError`], which becomes a `capnp::Error` for the peer.

use std::io;

use quicnprotochat_proto::cert::CertError;
use quicnprotochat_proto::transport::TransportError;
use quicnprotochat_proto::wire::FieldError;

use crate::store::StoreError;

/// Errors that stop the node from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The TLS certificate or key could not be loaded or generated.
    #[error("TLS certificate: {0}")]
    Cert(#[from] CertError),
    /// The TLS/QUIC configuration was rejected.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// The database could not be opened or migrated.
    #[error("database {db}: {source}")]
    Store {
        /// The database file, or URL without its password.
        db: String,
        /// What went wrong.
        source: StoreError,
    },
    /// A worker thread could not be started.
    #[error("starting RPC worker thread: {0}")]
    Thread(io::Error),
}

/// Errors answering one RPC call; each becomes a `capnp::Error` whose text
/// tells the caller what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A parameter does not hold what the schema requires.
    #[error("invalid argument: {0}")]
    Field(#[from] FieldError),
    /// The store failed; the call had no effect.
    #[error("storage failure; retry later: {0}")]
    Store(#[from] StoreError),
    /// The connection's identity may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller pings faster than the ping rate, or fetches device lists
    /// faster than its fetch rate: calls whose results have no outcome to
    /// carry it (calls that carry work answer a rate limit as a typed
    /// outcome instead).
    #[error("rate limited, retry after {} ms", .0.as_millis().max(1))]
    RateLimited(std::time::Duration),
    /// The session has too many calls unanswered.
    #[error(
        "overloaded: {0} calls are already waiting on this connection; wait for answers before sending more"
    )]
    TooManyCalls(usize),
    /// The node is shutting down and takes no new work.
    #[error("the node is shutting down; retry in a moment")]
    ShuttingDown,
    /// A bug on the node (a check that panicked); the call had no effect.
    #[error("internal error; the call had no effect: {0}")]
    Internal(String),
}

impl From<ServiceError> for capnp::Error {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::ShuttingDown | ServiceError::TooManyCalls(_) => {
                capnp::Error::overloaded(error.to_string())
            }
            ServiceError::Store(StoreError::Closed) => capnp::Error::overloaded(error.to_string()),
            ServiceError::RateLimited(_) => capnp::Error::overloaded(error.to_string()),
            _ => capnp::Error::failed(error.to_string()),
        }
    }
}
