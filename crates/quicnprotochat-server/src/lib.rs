//! The quicnprotochat node: one QUIC + TLS 1.3 endpoint serving `NodeService`
//! (the Authentication Service's KeyPackage directory and users' signed
//! device lists, and the Delivery Service's message queues) over Cap'n
//! Proto RPC, backed by SQLite, or by a PostgreSQL database that any number
//! of nodes share.
//!
//! The node never sees plaintext: KeyPackages and messages are opaque MLS
//! bytes, stored by the 32-byte Ed25519 identity key of their owner. Device
//! lists are signed by their user key, so the node can withhold one but
//! never forge one.
//!
//! ```no_run
//! # async fn example() -> Result<(), quicnprotochat_server::ServerError> {
//! let config = quicnprotochat_server::Config::default();
//! quicnprotochat_server::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! # Layout
//! - [`config`] — everything the node can be told, with defaults.
//! - [`listener`] — the QUIC endpoint: accept loop, RPC worker threads,
//!   graceful shutdown.
//! - [`service`] — the `NodeService` RPC adapter: each method reads its
//!   parameters, calls one [`api`] function and writes its result.
//! - [`api`] — the node's calls in domain types: who may call, the limits
//!   charged, one store command, a typed result (no capnp).
//! - [`push`] — push subscriptions and long polls, woken by commits.
//! - [`delivery`] — the delivery rules in plain Rust over a storage trait.
//! - [`limits`] — per-caller rate limits (the send budget, token buckets).
//! - [`admission`] — who may hold a connection: per-address and anonymous
//!   caps, QUIC Retry under a handshake flood.
//! - [`store`] — SQLite (migrations, the rows the rules read and write, a
//!   group-committing writer, syncs apart from commits, a reader thread) or
//!   PostgreSQL (writer and reader connections, LISTEN/NOTIFY between
//!   nodes), behind one `Store` handle.
//! - [`metrics`] — the Prometheus series the node records, the recorder
//!   and the `/metrics` HTTP listener.
//! - [`error`] — the node's error types and their conversion to RPC errors.
//! - `testing` (feature `testing`) — the node every test and example starts.

pub mod admission;
pub mod api;
pub mod config;
pub mod delivery;
pub mod error;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod push;
pub mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::Config;
pub use error::ServerError;
pub use listener::{Node, UdpBuffers, run};
