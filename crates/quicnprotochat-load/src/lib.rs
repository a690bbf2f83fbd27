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
//! runs a [`Scenario`] against any node.
//!
//! The binary ends with one Markdown table row of medians over the runs;
//! the columns of a load run are
//!
//! ```text
//! | run | delivered msgs/s (runs) | MB/s | latency p50 / p99 / p99.9 | node CPU | node peak RSS | node CPU per msg | node context switches per msg |
//! ```
//!
//! and of an idle run (`--idle N`)
//!
//! ```text
//! | idle run | node CPU | node CPU s | node context switches/s | node peak RSS |
//! ```
//!
//! # Layout
//! - `scenario` — clients, threads, sending, push receiving, the run itself,
//!   and the idle run.
//! - `node` — the node child process and its CPU time / context switches /
//!   peak RSS.
//! - `stats` — the [`Report`] of a run and the [`IdleReport`] of an idle
//!   run, and how they print.

mod node;
mod scenario;
mod stats;

use std::path::PathBuf;

pub use node::{NodeProcess, NodeSpec, Usage, default_binary};
pub use scenario::{Idle, Scenario, Shape, idle, local, run};
pub use stats::{IdleReport, Report};

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The scenario cannot run as given.
    #[error("{0}")]
    Scenario(String),
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
