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
    /// Add peers to a group in one Commit: takes each peer's KeyPackage
    /// from the node, sends the Commit to the members and the Welcome to the
    /// new members, in one atomic delivery.
    Invite {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The peers to add (at least one).
        #[command(flatten)]
        peers: PeerArgs,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Remove members from a group in one Commit.
    Remove {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The members to remove (at least one).
        #[command(flatten)]
        peers: PeerArgs,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Refresh your keys in a group (post-compromise security): a Commit with
    /// a fresh leaf; also commits any pending proposals.
    Update {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Ask to leave a group; another member commits your removal.
    Leave {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Join the group(s) whose Welcome is waiting in your queue; the last one
    /// joined becomes the current group.
    Join(StateArg),
    /// Rejoin a group whose state this state file lost (e.g. it was restored
    /// from an older backup) but whose member you still are: an external
    /// Commit from the group's current state on the node replaces your old
    /// leaf. The group becomes the current group.
    Rejoin {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The group's full id, as text (e.g. team#0123456789abcdef) or, for
        /// an id that is not printable text, as hex; the name alone works
        /// while the state file still lists the group.
        #[arg(long)]
        group_id: String,
    },
    /// Encrypt a message to a group and queue it for its members.
    Send {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// Send to these members only [default: every other member].
        #[command(flatten)]
        peers: PeerArgs,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
        /// The message text.
        #[arg(long)]
        msg: String,
    },
    /// Fetch and process everything queued for you, in order; print each
    /// message as `<group> <sender>: <text>`.
    Recv {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// Stay connected and process messages as the node pushes them,
        /// until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
    /// List your groups with their epoch and member count (`*` marks the
    /// current group).
    Groups(StateArg),
    /// List a group's members' identity keys (and contact names).
    Members {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Show a group's sent and received messages from local storage.
    History {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Names for identity keys, usable as `--peer NAME`.
    Contacts {
        /// The state file.
        #[command(flatten)]
        state: StateArg,
        /// What to do with contacts.
        #[command(subcommand)]
        action: ContactsAction,
    },
}

/// `contacts` subcommands.
#[derive(Debug, Subcommand)]
pub enum ContactsAction {
    /// Name an identity key.
    Add {
        /// The name (e.g. bob).
        name: String,
        /// The identity key, 64 hex characters.
        identity_key: String,
    },
    /// List contacts.
    List,
    /// Forget a name.
    Remove {
        /// The name.
        name: String,
    },
}

/// Peers given by key or by contact name.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// A peer's identity key, 64 hex characters (repeatable).
    #[arg(long = "peer-key")]
    pub keys: Vec<String>,
    /// A peer's contact name, see `contacts add` (repeatable).
    #[arg(long = "peer")]
    pub names: Vec<String>,
}

/// The state file option shared by stateful commands.
#[derive(Debug, Args)]
pub struct StateArg {
    /// The client state file (SQLite); holds your identity key and MLS state.
    #[arg(long, env = "QUICNPROTOCHAT_STATE")]
    pub state: PathBuf,
}
