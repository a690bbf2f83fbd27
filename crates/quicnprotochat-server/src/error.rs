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
    /// The database's disk failed to make commits durable, so what it
    /// holds is unknown: the node stopped rather than answer more writes.
    #[error(
        "the database's disk failed a sync ({0}); the node stopped rather than acknowledge \
         writes it cannot make durable. Check the disk, then start the node again: SQLite \
         recovers what the disk holds, and clients resend what was not acknowledged"
    )]
    DiskFailed(String),
}

/// Errors answering one RPC call; each becomes a `capnp::Error` whose text
/// tells the caller what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A parameter does not hold what the schema requires.
    #[error("invalid argument: {0}")]
    Field(#[from] FieldError),
    /// The store failed; [`StoreError::effect`] tells whether the call had
    /// an effect.
    #[error("storage failure: {0}")]
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

impl ServiceError {
    /// The exception type the peer gets for this error: the one table from
    /// every failure to what a client may conclude from it (`schemas/`,
    /// "Outcomes and exceptions").
    ///
    /// - `failed`: the call was wrong; nothing was stored and the same call
    ///   will fail again.
    /// - `overloaded`: nothing was stored, and the same call may pass later
    ///   (rate, shutdown, a transaction or read that failed).
    /// - `disconnected`: the call's effect is unknown (the database went
    ///   away mid-call, a commit whose durability is unknown): repeat it
    ///   with the same message ids, never read it as a refusal.
    pub fn exception(&self) -> capnp::ErrorKind {
        use capnp::ErrorKind::{Disconnected, Failed, Overloaded};
        match self {
            ServiceError::Field(_) | ServiceError::PermissionDenied(_) | ServiceError::Internal(_) => Failed,
            ServiceError::RateLimited(_) | ServiceError::TooManyCalls(_) | ServiceError::ShuttingDown => {
                Overloaded
            }
            ServiceError::Store(store) => match store.effect() {
                Effect::Unknown => Disconnected,
                Effect::NoneYet => Overloaded,
                Effect::None => Failed,
            },
        }
    }
}

/// What a failed store call did to the database, as far as the node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing, and nothing will come of trying again: the store is
    /// unusable as configured (wrong file, newer schema, damaged).
    None,
    /// Nothing, but the same call may pass later: a transaction that
    /// rolled back, a read that failed, a store that is closing.
    NoneYet,
    /// Unknown: the database went away while committing, or the commit's
    /// sync to disk failed.
    Unknown,
}

impl StoreError {
    /// What the failed call did; see [`Effect`].
    pub fn effect(&self) -> Effect {
        match self {
            StoreError::Unavailable(_) | StoreError::NotDurable(_) | StoreError::Sync(_) => Effect::Unknown,
            StoreError::Sqlite(_)
            | StoreError::Postgres(_)
            | StoreError::Transaction(_)
            | StoreError::Closed
            | StoreError::Io(_)
            | StoreError::Thread(_) => Effect::NoneYet,
            StoreError::SchemaTooNew { .. }
            | StoreError::Migration(_)
            | StoreError::ForeignDatabase(_)
            | StoreError::NotADatabase
            | StoreError::Damaged(_)
            | StoreError::NoWal(_)
            | StoreError::InUse { .. }
            | StoreError::BadUrl(_)
            | StoreError::ForeignPostgres(_) => Effect::None,
        }
    }
}

impl From<ServiceError> for capnp::Error {
    fn from(error: ServiceError) -> Self {
        let kind = error.exception();
        capnp::Error {
            kind,
            extra: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use capnp::ErrorKind::{Disconnected, Failed, Overloaded};

    use super::*;

    /// Every error a call can end in, with the exception its peer must get.
    /// A new variant that is missing here fails to compile in `effect` or
    /// `exception` first, then here by its absence from this table.
    #[test]
    fn every_error_maps_to_its_exception_type() {
        let io = || std::io::Error::other("disk");
        let table: Vec<(ServiceError, capnp::ErrorKind)> = vec![
            (
                ServiceError::Field(FieldError {
                    field: "payload".into(),
                    reason: "is empty".into(),
                }),
                Failed,
            ),
            (ServiceError::PermissionDenied("not yours".into()), Failed),
            (ServiceError::Internal("bug".into()), Failed),
            (
                ServiceError::RateLimited(std::time::Duration::from_millis(5)),
                Overloaded,
            ),
            (ServiceError::TooManyCalls(64), Overloaded),
            (ServiceError::ShuttingDown, Overloaded),
            (StoreError::Unavailable("gone".into()).into(), Disconnected),
            (StoreError::NotDurable("fsync".into()).into(), Disconnected),
            (StoreError::Sync(io()).into(), Disconnected),
            (StoreError::Transaction("rolled back".into()).into(), Overloaded),
            (
                StoreError::Sqlite(rusqlite::Error::InvalidQuery).into(),
                Overloaded,
            ),
            (StoreError::Closed.into(), Overloaded),
            (StoreError::Io(io()).into(), Overloaded),
            (StoreError::Thread(io()).into(), Overloaded),
            (
                StoreError::SchemaTooNew {
                    found: 9,
                    supported: 8,
                }
                .into(),
                Failed,
            ),
            (StoreError::ForeignDatabase(1).into(), Failed),
            (StoreError::NotADatabase.into(), Failed),
            (StoreError::Damaged("page 3".into()).into(), Failed),
            (StoreError::NoWal("delete".into()).into(), Failed),
            (StoreError::BadUrl("x".into()).into(), Failed),
            (StoreError::ForeignPostgres("t".into()).into(), Failed),
        ];
        for (error, kind) in table {
            let text = error.to_string();
            let exception = capnp::Error::from(error);
            assert_eq!(exception.kind, kind, "{text}");
            assert_eq!(exception.extra, text);
        }
    }
}
