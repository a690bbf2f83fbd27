//! The quicnprotochat client: a command-line program that drives the whole
//! MLS group lifecycle against a quicnprotochat node, keeping its identity
//! and all MLS state in a SQLite state file.
//!
//! Data flows one way: command → state file → core (MLS) → node client →
//! QUIC → node, and back.
//!
//! # Layout
//! - [`cli`] — the command line (clap).
//! - [`commands`] — one module per command family; `run` only dispatches.
//!   Commands parse arguments and call the modules below, never each other.
//! - `changes` — group changes as commands make them (invite, remove,
//!   update, leave): made, published, and made again after catching up
//!   when another member's Commit won.
//! - `sending` — an application message encrypted and queued, delivered
//!   again after a lost connection.
//! - `sync` — catching up: the outbox settled, then the queue fetched and
//!   applied, then group names still owed sent.
//! - `group_names` — telling the members a change added the group's name
//!   (and paying that debt later when a command was cut off).
//! - `publish` — one group change: stage, publish, settle by the node's
//!   typed outcome, resume unanswered ones; rejoining a group by external
//!   commit.
//! - `incoming` — fetch → store → ack, then apply each queued message.
//! - `follow` — `recv --follow`: pushed batches until Ctrl-C, resumed through
//!   the next node when the connection is lost.
//! - `key_backup` — the device's groups and their state keys, sealed and
//!   kept on the node, for a device restored from its identity alone.
//! - `key_packages` — uploading KeyPackages, keeping a stock of them on the
//!   node, taking a peer's one verified.
//! - `link` — completing a device link on the new device.
//! - `connections` — the connections a command uses (the first of each list of
//!   nodes that answers, the next one on a reconnect); sending with rate
//!   limits waited out and full queues reported.
//! - `directory` — users' device lists: fetched once per command, verified,
//!   checked against the highest version seen.
//! - `naming` — groups and peers by name: parse, resolve, show.
//! - `editor` — what `chat` reads: a line editor on a terminal (history,
//!   lines printed above the one being typed), stdin's lines otherwise.
//! - [`node_client`] — connect to a node (verifying it) and make typed calls.
//! - [`passphrase`] — the state file's passphrase: a file, the
//!   environment or the terminal.
//! - [`state`] — the state file: identity, groups, inbox, outbox, OpenMLS
//!   storage; each unit of work one transaction.
//! - [`output`] — text or `--json`, and progress bars on a terminal.
//! - [`error`] — [`ClientError`], whose messages say what to do, and the
//!   kind and exit code of each.

/// `println!` through [`output::out`]: shown above the line `chat` is
/// editing, when it is.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::out(format_args!($($arg)*))
    };
}

/// `eprintln!` through [`output::note`], as `say!`.
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::output::note(format_args!($($arg)*))
    };
}

mod changes;
pub mod cli;
pub mod commands;
mod connections;
mod directory;
mod editor;
pub mod error;
mod follow;
mod group_names;
mod incoming;
mod key_backup;
mod key_packages;
mod link;
mod naming;
pub mod node_client;
pub mod output;
pub mod passphrase;
mod publish;
mod sending;
pub mod state;
mod sync;

pub use cli::Cli;
pub use error::ClientError;
