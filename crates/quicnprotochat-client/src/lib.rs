//! The quicnprotochat client: a command-line program that drives the whole
//! MLS group lifecycle against a quicnprotochat node, keeping its identity
//! and all MLS state in a SQLite state file.
//!
//! Data flows one way: command → state file → core (MLS) → node client →
//! QUIC → node, and back.
//!
//! # Layout
//! - [`cli`] — the command line (clap).
//! - [`commands`] — one module per command family; `run` dispatches.
//! - [`node_client`] — connect to a node (verifying it) and make typed calls.
//! - [`state`] — the state file: identity, groups, inbox, OpenMLS storage.
//! - [`error`] — [`ClientError`], whose messages say what to do.

pub mod cli;
pub mod commands;
pub mod error;
pub mod node_client;
pub mod state;

pub use cli::Cli;
pub use error::ClientError;
