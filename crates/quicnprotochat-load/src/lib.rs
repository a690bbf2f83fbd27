//! Load generator for a quicnprotochat node: many authenticated clients over
//! real QUIC sending to each other and receiving by push, measuring
//! messages/s, MB/s, enqueue→delivery latency and the node's CPU time,
//! context switches and peak RSS, also per delivered message. An idle run
//! ([`idle`]) measures what the node spends holding subscribed clients that
//! send nothing.
//!
//! The `quicnprotochat-load` binary starts a release node as a child process
//! (fresh temporary directory, real SQLite file, rate limits off) for each
//! run, so the node's resource use can be read from `/proc`; the library
//! runs a [`Scenario`] against any node, or spread over several
//! ([`run_on`]).
//!
//! With `--db postgres://…` the binary's nodes use that PostgreSQL database
//! instead, and `--nodes N` starts N of them on it, clients spread
//! round-robin with senders and recipients on different nodes, so delivery
//! crosses nodes. The PostgreSQL database must exist; the load generator
//! never empties it (every run uses fresh random identities, so earlier
//! rows are only bystanders). The nodes' usage is summed, and PostgreSQL's CPU time is
//! that of every process named `postgres` this machine's `/proc` shows.
//!
//! The binary ends with one Markdown table row of medians over the runs;
//! the columns of a load run are
//!
//! ```text
//! | run | delivered msgs/s (runs) | MB/s | latency p50 / p99 / p99.9 | node CPU | node peak RSS | node CPU per msg | node context switches per msg | PostgreSQL CPU per msg | PostgreSQL share of CPU |
//! ```
//!
//! and of an idle run (`--idle N`)
//!
//! ```text
//! | idle run | node CPU | node CPU s | node context switches/s | node peak RSS | PostgreSQL CPU |
//! ```
//!
//! The node columns are sums over the nodes; PostgreSQL's share is of the
//! CPU time the nodes, PostgreSQL and the load generator used together; a
//! run without PostgreSQL shows `-` in its columns.
//!
//! # Layout
//! - `scenario` — clients, threads, which client uses which node, sending,
//!   push receiving, the run itself, and the idle run.
//! - `node` — the node child processes, their database, and their CPU time
//!   / context switches / peak RSS.
//! - `postgres` — PostgreSQL's CPU time, from every `postgres` process.
//! - `stats` — the [`Report`] of a run and the [`IdleReport`] of an idle
//!   run, and how they print.

mod node;
mod postgres;
mod scenario;
mod stats;

use std::path::PathBuf;

pub use node::{Database, NodeProcess, NodeSpec, Nodes, Sample, Usage, Used, check_nodes, default_binary};
pub use postgres::PostgresSnapshot;
pub use scenario::{Idle, Scenario, Shape, idle, idle_on, local, run, run_on};
pub use stats::{IdleReport, Report};

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The scenario cannot run as given.
    #[error("{0}")]
    Scenario(String),
    /// Several nodes were asked for on SQLite.
    #[error(
        "--nodes {nodes} needs a PostgreSQL database (--db postgres://…): a SQLite file is one node's, so only one node can run on SQLite"
    )]
    SqliteShared {
        /// The nodes asked for.
        nodes: usize,
    },
    /// A client call failed outside of enqueueing (connect, subscribe).
    #[error(transparent)]
    Client(#[from] quicnprotochat_client::ClientError),
    /// The node binary could not be started.
    #[error("starting {}: {source}; build it with `cargo build --release -p quicnprotochat-server` or pass --node-bin", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node exited before it answered.
    #[error("the node exited at start ({0}); run it by hand to see why")]
    NodeExited(String),
    /// The node did not answer a ping in time.
    #[error("the node at {0} did not answer within 20 s")]
    NodeNotReady(std::net::SocketAddr),
    /// Local I/O (temporary directory, /proc).
    #[error("I/O: {0}")]
    Io(std::io::Error),
    /// A client thread panicked.
    #[error("a client thread panicked")]
    ThreadPanicked,
}
