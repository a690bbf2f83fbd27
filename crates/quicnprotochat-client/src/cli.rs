//! Command-line interface definitions (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use quicnprotochat_core::Suite;

/// quicnprotochat client: end-to-end encrypted MLS groups over a quicnprotochat node.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// Connection options, accepted before or after the command.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Print JSON instead of text: one document per command, one object
    /// per line for what arrives (`recv`, `chat`); on failure, an error
    /// object with a stable `kind` as the last line of stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// The client state file (SQLite, encrypted): holds your identity key
    /// and MLS state. Every command but `ping`, `register`, `fetch-key`,
    /// `demo-group` and `completions` needs one.
    #[arg(long, global = true, env = "QUICNPROTOCHAT_STATE")]
    pub state: Option<PathBuf>,
    /// A file whose first line is the state file's passphrase. Without it,
    /// the passphrase is QUICNPROTOCHAT_STATE_PASSPHRASE, or is asked for
    /// when stdin is a terminal.
    #[arg(long, global = true, value_name = "FILE")]
    pub state_passphrase_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the nodes are and how to trust them.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// The node(s) serving KeyPackages (the Authentication Service), as
    /// host:port. Several nodes sharing one database may be given, comma
    /// separated or by repeating the flag: each command connects to the
    /// first that completes a handshake, in the order given; one that
    /// answered is never skipped. `recv --follow` goes on to the next when
    /// its connection drops.
    #[arg(
        long,
        global = true,
        env = "QUICNPROTOCHAT_SERVER",
        value_delimiter = ',',
        value_parser = node_address,
        default_value = DEFAULT_NODE
    )]
    pub server: Vec<String>,
    /// The node(s) serving message queues (the Delivery Service), as
    /// --server; defaults to --server, since one node serves both roles.
    #[arg(
        long,
        global = true,
        env = "QUICNPROTOCHAT_DS_SERVER",
        value_delimiter = ',',
        value_parser = node_address
    )]
    pub ds_server: Vec<String>,
    /// The nodes' certificate (DER) to trust; a node writes it to
    /// data/server-cert.der on first start, and nodes started in one
    /// directory share it.
    #[arg(
        long,
        global = true,
        env = "QUICNPROTOCHAT_CA_CERT",
        default_value = quicnprotochat_proto::DEFAULT_CERT_PATH
    )]
    pub ca_cert: PathBuf,
    /// Name to verify in the node's certificate [default: the host part of
    /// the node being connected to].
    #[arg(long, global = true, env = "QUICNPROTOCHAT_SERVER_NAME")]
    pub server_name: Option<String>,
}

/// The ciphersuite of new groups and of KeyPackages asked for (see
/// docs/cli.md, "Post-quantum groups", for why).
const DEFAULT_SUITE: &str = "x25519";

/// The node a command talks to unless told otherwise: one on this machine,
/// at [`quicnprotochat_proto::DEFAULT_PORT`].
const DEFAULT_NODE: &str = "127.0.0.1:4201";

/// A ciphersuite by its short name.
fn suite(name: &str) -> Result<Suite, String> {
    Suite::from_name(name).ok_or_else(|| {
        format!(
            "unknown ciphersuite {name:?}; choose one of: {}",
            Suite::ALL.map(Suite::name).join(", ")
        )
    })
}

/// One entry of a node list, without the blanks around it (`a:1, b:2`).
/// Whether it is a usable `host:port` is found out when it is dialled, so
/// commands that need no node run whatever the list holds.
fn node_address(entry: &str) -> Result<String, String> {
    Ok(entry.trim().to_owned())
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
        /// Which ciphersuite's KeyPackage: x25519 or mlkem768x25519.
        #[arg(long, default_value = DEFAULT_SUITE, value_parser = suite)]
        ciphersuite: Suite,
    },
    /// Run Alice and Bob end to end against the node: group, invite, join,
    /// and one message each way.
    DemoGroup,
    /// Create the state file (or reuse its identity), upload a fresh
    /// KeyPackage, print the identity key.
    RegisterState,
    /// Print your user key (64 hex characters: what peers invite) and
    /// nothing else.
    Whoami {
        /// Print this device's key instead (its own key among your
        /// devices; the same as the user key for a state made before users
        /// had several devices).
        #[arg(long)]
        device: bool,
    },
    /// Make a new state file a new device of yours: prints a one-line link
    /// code to give to `devices add` on one of your devices; the next
    /// `recv` here completes the link.
    Link {
        /// How long the code is accepted.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        valid_for: std::time::Duration,
    },
    /// Your devices: link one, list them, remove one.
    Devices {
        /// What to do with devices.
        #[command(subcommand)]
        action: DevicesAction,
    },
    /// Create a group with you as its only member; it becomes the current group.
    CreateGroup {
        /// The group's id (any text, unique to you and your peers).
        #[arg(long)]
        group_id: String,
        /// The group's MLS ciphersuite: `x25519`, or `mlkem768x25519`
        /// (ML-KEM-768 + X25519 hybrid: group secrets stay confidential
        /// against a future quantum attacker; provisional code point).
        #[arg(long, default_value = DEFAULT_SUITE, value_parser = suite)]
        ciphersuite: Suite,
    },
    /// Add peers to a group in one Commit: takes each peer's KeyPackage
    /// from the node, sends the Commit to the members and the Welcome to the
    /// new members, in one atomic delivery.
    Invite {
        /// The peers to add (at least one).
        #[command(flatten)]
        peers: PeerArgs,
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Remove members from a group in one Commit.
    Remove {
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
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Ask to leave a group; another member commits your removal.
    Leave {
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Join the group(s) whose Welcome is waiting in your queue, and every
    /// waiting invitation (your consent to all); the last one joined
    /// becomes the current group.
    Join,
    /// List the waiting invitations: Welcomes from people who are neither
    /// your contacts nor your own devices, which `recv` does not join.
    Invitations,
    /// Join the group of a waiting invitation (by the name `invitations`
    /// shows, or its id), or of all of them with `--all`; it becomes the
    /// current group.
    Accept {
        /// The group's name or id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        group: Option<String>,
        /// Every waiting invitation.
        #[arg(long)]
        all: bool,
    },
    /// Refuse a waiting invitation: it is forgotten, and what the group
    /// sends you is dropped.
    Decline {
        /// The group's name or id, as `invitations` shows it.
        group: String,
    },
    /// Rejoin a group whose state this state file lost (e.g. it was restored
    /// from an older backup) but whose member you still are: an external
    /// Commit from the group's current state on the node replaces your old
    /// leaf. The group becomes the current group.
    Rejoin {
        /// The group's full id, as text (e.g. team#0123456789abcdef) or, for
        /// an id that is not printable text, as hex; the name alone works
        /// while the state file still lists the group.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        group_id: Option<String>,
        /// Every group this device's key backup on the node names and this
        /// state file has no current state of (a device restored from a
        /// backup of its identity alone gets all its groups back).
        #[arg(long)]
        all: bool,
    },
    /// Encrypt a message to a group and queue it for its members.
    Send {
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
        /// Stay connected and process messages as the node pushes them,
        /// until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
    /// List your groups with their epoch and member count (`*` marks the
    /// current group).
    Groups,
    /// List a group's members' identity keys (and contact names).
    Members {
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Show a group's sent and received messages from local storage.
    History {
        /// The group [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Talk in a group from one process: show messages as the node pushes
    /// them, send each line typed on stdin. Commands: `/members`,
    /// `/invite NAME|HEX`, `/group NAME` (switch), `/quit`.
    ///
    /// With stdin not a terminal it sends each line, waits until the node
    /// has taken every one, and exits at the end of input:
    /// `echo hi | quicnprotochat-client chat --state F`.
    Chat {
        /// The group to talk in [default: the current group].
        #[arg(long)]
        group_id: Option<String>,
    },
    /// Print a completion script for your shell on stdout, e.g.
    /// `quicnprotochat-client completions bash > ~/.local/share/bash-completion/completions/quicnprotochat-client`.
    Completions {
        /// The shell to complete in.
        shell: Shell,
    },
    /// Names for identity keys, usable as `--peer NAME`.
    Contacts {
        /// What to do with contacts.
        #[command(subcommand)]
        action: ContactsAction,
    },
    /// The state file itself.
    State {
        /// What to do with it.
        #[command(subcommand)]
        action: StateAction,
    },
}

/// `state` subcommands.
#[derive(Debug, Subcommand)]
pub enum StateAction {
    /// Encrypt a state file made before state files were encrypted, under a
    /// new passphrase (asked twice at a terminal). Stop every other command
    /// using the file first.
    Encrypt,
    /// Change the state file's passphrase: the current one as for any
    /// command, the new one asked twice at a terminal or read from
    /// --new-passphrase-file.
    Passphrase {
        /// A file whose first line is the new passphrase (for scripts).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
}

/// The shells `completions` writes scripts for: the three people use most
/// and the tests cover (clap_complete knows a few more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum Shell {
    /// GNU Bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
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

/// `devices` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevicesAction {
    /// Link the new device whose code `link` printed (on your first
    /// device, which holds your user key): sign it into your device list,
    /// hand it its own key through the node (encrypted to it), and add it
    /// to every group you are in, one Commit per group.
    Add {
        /// The link code.
        code: String,
    },
    /// One line per device: its key, and `(this device)`.
    List,
    /// Remove a device (on your first device, which holds your user key
    /// and stays): a new device list without it, and its leaves removed
    /// from every group; it can no longer act for you.
    Remove {
        /// The device key, 64 hex characters (see `devices list`).
        device_key: String,
    },
}

/// Peers given by key or by contact name.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// A peer's user key, 64 hex characters (repeatable); every device of
    /// the user is meant.
    #[arg(long = "peer-key")]
    pub keys: Vec<String>,
    /// A peer's contact name, see `contacts add` (repeatable).
    #[arg(long = "peer")]
    pub names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn connection(args: &[&str]) -> ConnectionArgs {
        let mut full = vec!["quicnprotochat-client"];
        full.extend_from_slice(args);
        full.push("ping");
        Cli::try_parse_from(full).unwrap().connection
    }

    #[test]
    fn nodes_are_listed_with_commas_or_by_repeating_the_flag_in_order() {
        let expected = ["a:1", "b:2", "c:3"];
        assert_eq!(
            connection(&["--server", "a:1,b:2", "--server", "c:3"]).server,
            expected
        );
        assert_eq!(connection(&["--server", " a:1 , b:2,c:3"]).server, expected);
        let both = connection(&["--server", "a:1", "--ds-server", "b:2,c:3"]);
        assert_eq!(both.server, ["a:1"]);
        assert_eq!(both.ds_server, ["b:2", "c:3"]);
    }

    #[test]
    fn the_defaults_are_the_ones_stated_once() {
        let defaults = connection(&[]);
        assert_eq!(
            defaults.server,
            [format!("127.0.0.1:{}", quicnprotochat_proto::DEFAULT_PORT)]
        );
        assert_eq!(
            defaults.ca_cert,
            std::path::Path::new(quicnprotochat_proto::DEFAULT_CERT_PATH)
        );
        assert_eq!(suite(DEFAULT_SUITE), Ok(Suite::default()));
    }

    #[test]
    fn the_delivery_nodes_default_to_none_meaning_the_same_as_server() {
        assert!(connection(&["--server", "a:1"]).ds_server.is_empty());
    }
}
