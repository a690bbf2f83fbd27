//! Command-line interface definitions (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// quicnprotochat client: end-to-end encrypted MLS groups over a quicnprotochat node.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// Connection options, accepted before or after the command.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the node is and how to trust it.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// The node (host:port) serving KeyPackages (the Authentication Service).
    #[arg(
        long,
        global = true,
        env = "QUICNPROTOCHAT_SERVER",
        default_value = "127.0.0.1:4201"
    )]
    pub server: String,
    /// The node (host:port) serving message queues (the Delivery Service);
    /// defaults to --server, since one node serves both roles.
    #[arg(long, global = true, env = "QUICNPROTOCHAT_DS_SERVER")]
    pub ds_server: Option<String>,
    /// The node's certificate (DER) to trust; the node writes it to
    /// data/server-cert.der on first start.
    #[arg(
        long,
        global = true,
        env = "QUICNPROTOCHAT_CA_CERT",
        default_value = "data/server-cert.der"
    )]
    pub ca_cert: PathBuf,
    /// Name to verify in the node's certificate [default: the host part of --server].
    #[arg(long, global = true, env = "QUICNPROTOCHAT_SERVER_NAME")]
    pub server_name: Option<String>,
}

/// The client's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that the node answers; prints its version and the round trip time.
    Ping,
    /// Create a throwaway identity, upload a KeyPackage for it, print its key.
    Register,
    /// Take one KeyPackage of an identity from the node and describe it.
    ///
    /// This consumes the KeyPackage: the node serves each one only once.
    FetchKey {
        /// The identity key, 64 hex characters.
        identity_key: String,
    },
    /// Run Alice and Bob end to end against the node: group, invite, join,
    /// and one message each way.
    DemoGroup,
    /// Create the state file (or reuse its identity), upload a fresh
    /// KeyPackage, print the identity key.
    RegisterState(StateArg),
    /// Print the state file's identity key (64 hex characters) and nothing else.
    Whoami(StateArg),
    /// Create a group with you as its only member; it becomes the current group.
    CreateGroup {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The group's id (any text, unique to you and your peers).
        #[arg(long)]
        group_id: String,
    },
    /// Add a peer to a group: takes their KeyPackage from the node, sends
    /// the Commit to the other members and the Welcome to the peer.
    Invite {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The peer's identity key, 64 hex characters.
        #[arg(long)]
        peer_key: String,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Join a group from a Welcome waiting in your queue.
    Join(StateArg),
    /// Encrypt a message to a group and queue it for its members.
    Send {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// Send to this member only [default: every other member].
        #[arg(long)]
        peer_key: Option<String>,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
        /// The message text.
        #[arg(long)]
        msg: String,
    },
    /// Fetch and process everything queued for you; print each message as
    /// `<group> <sender>: <text>`.
    Recv(StateArg),
}

/// The state file option shared by stateful commands.
#[derive(Debug, Args)]
pub struct StateArg {
    /// The client state file (SQLite); holds your identity key and MLS state.
    #[arg(long, env = "QUICNPROTOCHAT_STATE")]
    pub state: PathBuf,
}
