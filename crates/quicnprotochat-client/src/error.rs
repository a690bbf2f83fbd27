//! The client's error type. Every message says what went wrong and what to do.

use std::path::PathBuf;
use std::time::Duration;

use quicnprotochat_core::{CoreError, IdentityKey};
use quicnprotochat_proto::cert::CertError;
use quicnprotochat_proto::outcome::{OutcomeError, QueueFull, RateLimited};
use quicnprotochat_proto::peer::IdentityCertError;

use crate::state::StateError;

/// Errors of client commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The trusted certificate file could not be read.
    #[error(
        "cannot read the node's certificate ({source}); pass the node's certificate file (its data/server-cert.der) with --ca-cert"
    )]
    CaCert {
        /// The file given.
        path: PathBuf,
        /// Why it could not be read.
        source: CertError,
    },
    /// The trusted certificate file is not a usable certificate.
    #[error(
        "{path} is not a usable DER certificate ({reason}); pass the node's data/server-cert.der with --ca-cert"
    )]
    CaCertUnusable {
        /// The file given.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// `--server` is not a usable address.
    #[error("--server {server}: {reason}")]
    BadServer {
        /// What was given.
        server: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No answer to the handshake in time.
    #[error(
        "no node answered at {server} within {after:?}; is quicnprotochat-server running there? (set --server or QUICNPROTOCHAT_SERVER)"
    )]
    Unreachable {
        /// The address tried.
        server: String,
        /// How long we waited.
        after: Duration,
    },
    /// The node's host said nothing listens on the port (ICMP port
    /// unreachable), so there is no point waiting for a handshake.
    #[error(
        "no node answered at {server}: nothing listens there (its host refused the connection); is quicnprotochat-server running there? (set --server or QUICNPROTOCHAT_SERVER)"
    )]
    NothingListens {
        /// The address tried.
        server: String,
    },
    /// The node's certificate is not the trusted one.
    #[error(
        "the node at {server} is not trusted: its certificate does not match {ca_cert} ({reason}); pass the node's own certificate with --ca-cert"
    )]
    UntrustedNode {
        /// The address tried.
        server: String,
        /// The trusted certificate.
        ca_cert: PathBuf,
        /// What TLS reported.
        reason: String,
    },
    /// The node's certificate is trusted but not valid for the name used.
    #[error(
        "the node at {server} presented a trusted certificate that is not valid for the name {name:?} ({reason}); connect by a name the certificate lists (localhost, 127.0.0.1, ::1 or a --tls-san of the node), or pass --server-name"
    )]
    WrongName {
        /// The address tried.
        server: String,
        /// The name verified.
        name: String,
        /// What TLS reported.
        reason: String,
    },
    /// Any other connection failure.
    #[error("connecting to {server}: {reason}")]
    Connect {
        /// The address tried.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// Several nodes were given and none could be connected to; each
    /// failure names its node and what to do.
    #[error(
        "could not connect to any of the {} nodes given (tried in this order):{}",
        .failures.len(),
        bulleted(.failures)
    )]
    NoNodeReachable {
        /// Why each node failed, in the order tried.
        failures: Vec<ClientError>,
    },
    /// Our client certificate (which carries the identity key) could not be
    /// made.
    #[error("{0}; the identity key in the state file may be damaged")]
    IdentityCertificate(#[from] IdentityCertError),
    /// The node did not answer a call in time.
    #[error("the node did not answer within {0:?}; try again")]
    Timeout(Duration),
    /// The node answered a call with an error, or the session broke.
    #[error("node: {0}")]
    Rpc(#[from] capnp::Error),
    /// Another member's Commit was accepted for the epoch ours was made in,
    /// every time we tried.
    #[error(
        "another member changed the group first (it is at epoch {current_epoch}); run `recv` to catch up, then make your change again"
    )]
    CommitConflict {
        /// The group's epoch on the node.
        current_epoch: u64,
    },
    /// The node refused a call for this identity's (or address's) rate
    /// limit for longer than we were willing to wait; nothing was stored.
    #[error(
        "the node is rate limiting you and nothing was sent; wait at least {retry_after:?}, then run the command again"
    )]
    RateLimited {
        /// How long the node said to wait.
        retry_after: Duration,
    },
    /// Some recipients' queues on the node are full; nothing was stored.
    #[error(
        "the node's queue of {} is full (it holds at most {max_depth} messages or {max_bytes} bytes) and nothing was sent; ask them to run `recv` so their queue drains, then try again",
        short_keys(.recipients)
    )]
    QueueFull {
        /// Whose queues are full.
        recipients: Vec<IdentityKey>,
        /// The node's limit of messages waiting in one queue.
        max_depth: u32,
        /// The node's limit of payload bytes waiting in one queue.
        max_bytes: u64,
    },
    /// A message was encrypted in an epoch its group has left on the node,
    /// every time we tried; nothing was stored.
    #[error(
        "the group moved on (epoch {current_epoch}) while this message was being sent, every time it was tried; run `recv`, then send it again"
    )]
    StaleEpoch {
        /// The group's epoch on the node.
        current_epoch: u64,
    },
    /// The identity already keeps as many KeyPackages on the node as it
    /// allows; nothing was stored.
    #[error(
        "the node already keeps {stored} KeyPackages of yours (its limit is {max}); nothing was uploaded. Others take them when they invite you"
    )]
    TooManyKeyPackages {
        /// How many it keeps.
        stored: u32,
        /// The node's limit.
        max: u32,
    },
    /// The node refused a group change (its queues were full, it rate
    /// limited us past our patience, or it refused the call); the change
    /// was dropped and the group is as it was.
    #[error("{group} is unchanged: {reason}")]
    ChangeRefused {
        /// The group.
        group: String,
        /// Why, with what to do.
        reason: Box<ClientError>,
    },
    /// A Welcome came without its ratchet tree and the node keeps none for
    /// it (too old, or no Commit the node accepted added us then).
    #[error(
        "the invitation to group {group} (epoch {epoch}) cannot be used: the node no longer keeps the group's tree for it; ask a member to invite you again (the node keeps the trees of a group's newest 4 epochs that added members, for 30 days)"
    )]
    WelcomeTreeUnavailable {
        /// The group, by name.
        group: String,
        /// The epoch the Welcome starts.
        epoch: u64,
    },
    /// The node refused to hand us the ratchet tree for a Welcome: it does
    /// not know us as a member added in that epoch.
    #[error(
        "the invitation to group {group} cannot be used: the node refused its tree ({reason}); ask a member to invite you again"
    )]
    WelcomeTreeRefused {
        /// The group, by name.
        group: String,
        /// The node's words.
        reason: String,
    },
    /// A stranger's Welcome that was not kept as an invitation: as many
    /// wait already, or it is too big (only in `dropped` events).
    #[error("an invitation to {group} from {inviter} was dropped: {why}")]
    InvitationDropped {
        /// The group, by name.
        group: String,
        /// The inviter's short user key.
        inviter: String,
        /// Which bound it crossed.
        why: String,
    },
    /// The node checked a group change (a Commit or a proposal) against the
    /// group's public state and found it not valid; it stored nothing.
    #[error(
        "the node refused it as not valid for the group (the node's reason: {reason}); if it happens again, this client and the group's other members may disagree about the group: report it with that reason"
    )]
    InvalidChange {
        /// The node's words, for people.
        reason: String,
    },
    /// The node keeps no public state for the group, so it cannot check
    /// (and will not take) changes to it; the change was dropped.
    #[error(
        "the node has no state for {group}, so it takes no changes to it: the group was created before the node checked group changes, or the node lost its database; create a new group with `create-group` and invite its members again"
    )]
    GroupUnknownToNode {
        /// The group.
        group: String,
    },
    /// The node has no GroupInfo of the group's current epoch to rejoin
    /// from (the group's last change brought none).
    #[error(
        "the node has no current GroupInfo of {group} to rejoin from (its last change brought none, e.g. one made by an older client); ask a member to run `update --group-id {group}`, then run `rejoin` again"
    )]
    NoGroupInfo {
        /// The group.
        group: String,
    },
    /// The node would not serve the group's state for a rejoin: it serves
    /// it only to identities that own a leaf of the group, and takes a
    /// rejoin only from them.
    #[error(
        "the node refused to let you rejoin {group} ({reason}); only a current member can rejoin, so if you left or were removed, ask a member to `invite` you again"
    )]
    RejoinRefused {
        /// The group.
        group: String,
        /// The node's words, for people.
        reason: String,
    },
    /// The node's answer does not hold what the schema says.
    #[error("the node's answer could not be read ({0}); is the client older than the node? update it")]
    Outcome(#[from] OutcomeError),
    /// No answer came to a group change; it may or may not have reached the
    /// node.
    #[error(
        "the node did not confirm the change to {group} ({reason}); it stays pending and your next command (e.g. `recv`) sends it again"
    )]
    Unconfirmed {
        /// The group.
        group: String,
        /// What happened instead of an answer.
        reason: String,
    },
    /// The group holds as many proposals in this epoch as the node keeps.
    #[error(
        "{group} already has {max} requests waiting for a Commit; run `recv` (a member commits them), then try again"
    )]
    TooManyProposals {
        /// The group.
        group: String,
        /// The node's limit per group and epoch.
        max: u32,
    },
    /// No answer came to a proposal (e.g. a request to leave); it may or may
    /// not have reached the node.
    #[error(
        "the node did not confirm your request to {group} ({reason}); it may have reached the other members: run `recv` later, and if nothing changed, run the command again"
    )]
    ProposalUnconfirmed {
        /// The group.
        group: String,
        /// What happened instead of an answer.
        reason: String,
    },
    /// The node has no KeyPackage left for a peer.
    #[error(
        "the node has no KeyPackage for {0} in ciphersuite {1}; ask its owner to run `register-state` (or `recv`) with a client that speaks {1}, to upload fresh ones"
    )]
    NoKeyPackage(IdentityKey, quicnprotochat_core::Suite),
    /// A KeyPackage the node served is not valid for the requested identity.
    #[error("the KeyPackage served for {requested} is not valid: {reason}")]
    BadKeyPackage {
        /// The identity asked for.
        requested: IdentityKey,
        /// What is wrong with it.
        reason: String,
    },
    /// The node stored something other than what we uploaded.
    #[error("the node's fingerprint of the uploaded KeyPackage does not match ours; the upload was altered")]
    FingerprintMismatch,
    /// The state file failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// MLS processing failed.
    #[error("MLS: {0}")]
    Core(#[from] CoreError),
    /// A queued message is for a group this client is not in.
    #[error("message for unknown group {0}")]
    UnknownGroup(String),
    /// Some of the messages of a change could not be handed to the node.
    #[error("{0}")]
    PartialDelivery(String),
    /// A command that acts as a member, in a group this client was removed
    /// from (or whose leave was committed): a normal state, not a failure.
    #[error(
        "you are no longer a member of {group}: a member removed you (or committed your leave); `history` still shows what was said, and a new invitation lets you back in"
    )]
    NotAMember {
        /// The group's name.
        group: String,
    },
    /// A command needs a group and none is selected.
    #[error("{0}")]
    NoGroup(String),
    /// A command-line argument is not usable.
    #[error("{0}")]
    Usage(String),
    /// `chat` could not read the next line of stdin.
    #[error("reading stdin: {0}")]
    Stdin(#[source] std::io::Error),
    /// The demo's end-to-end check failed.
    #[error("demo failed: {0}")]
    Demo(String),
    /// A bug: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A node's answer breaks the schema.
    #[error("the node's answer is malformed: {0}")]
    Protocol(String),
    /// A device list the node served (or that we were about to trust) is
    /// not acceptable: not signed by its user, older than one seen before,
    /// or withheld after we saw one.
    #[error("device list of {user}: {reason}")]
    DeviceList {
        /// The user key, short.
        user: String,
        /// What is wrong.
        reason: String,
    },
    /// The node refused a device list we uploaded.
    #[error("the node refused the device list: {0}")]
    DeviceListRefused(String),
    /// A link code or handoff was refused.
    #[error(transparent)]
    Link(#[from] quicnprotochat_core::link::LinkError),
}

impl ClientError {
    /// Whether the error says the connection to the node is gone or no
    /// longer answers (it dropped, a call got no answer in time, a group
    /// change got no answer), as opposed to the node answering with a
    /// refusal or an error. Work interrupted so is safe to resume through
    /// another connection: fetching is acknowledged only after storing, and
    /// an unanswered change stays pending and is sent again.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ClientError::Rpc(e) => e.kind == capnp::ErrorKind::Disconnected,
            ClientError::Timeout(_) | ClientError::Unconfirmed { .. } => true,
            _ => false,
        }
    }
}

/// The JSON error object of a failure of `kind` in `category`, as `--json`
/// prints it last on stderr (docs/cli.md, "Scripting"); [`ClientError::report`]
/// adds the numbers behind some kinds.
pub fn error_object(kind: &str, category: Category, message: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "error",
        "kind": kind,
        "exit_code": category.exit_code(),
        "message": message,
    })
}

/// What kind of failure an error is, as the exit code tells it (docs/cli.md,
/// "Scripting"): a script retries an unreachable node, reports a refusal,
/// fixes its input, and alerts on the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Category {
    /// Something failed here: the state file, MLS processing, a bug. Exit 1.
    Local,
    /// The command line, a name, a key or a code is not usable. Exit 2
    /// (as clap's own usage errors).
    BadInput,
    /// No trusted node answered, or the connection was lost before the
    /// node confirmed anything. Exit 3.
    Unreachable,
    /// The node answered and refused (rate limited, queue full, a lost
    /// race, nothing to serve, not valid). Exit 4.
    Refused,
    /// The node's answer is malformed or fails verification (a forged
    /// KeyPackage or device list). Exit 5.
    BadAnswer,
    /// This client is no longer a member of the group the command acts
    /// in: it was removed, or its leave was committed. Exit 6.
    NotAMember,
    /// The state file is encrypted and its passphrase is missing, cannot
    /// be read, or does not open it. Exit 7.
    Locked,
}

impl Category {
    /// The process exit code of a command failing with this category.
    pub fn exit_code(self) -> u8 {
        match self {
            Category::Local => 1,
            Category::BadInput => 2,
            Category::Unreachable => 3,
            Category::Refused => 4,
            Category::BadAnswer => 5,
            Category::NotAMember => 6,
            Category::Locked => 7,
        }
    }
}

impl ClientError {
    /// A stable name for what went wrong (`rate_limited`, `no_group`, ...),
    /// the `kind` of the JSON error object; with its category. A change
    /// the node refused is reported by why it was refused.
    pub fn kind(&self) -> (&'static str, Category) {
        use Category::*;
        match self {
            ClientError::CaCert { .. } | ClientError::CaCertUnusable { .. } => ("ca_cert", BadInput),
            ClientError::BadServer { .. } => ("bad_server", BadInput),
            ClientError::Unreachable { .. }
            | ClientError::NothingListens { .. }
            | ClientError::NoNodeReachable { .. } => ("unreachable", Unreachable),
            ClientError::UntrustedNode { .. } => ("untrusted_node", Unreachable),
            ClientError::WrongName { .. } => ("wrong_server_name", Unreachable),
            ClientError::Connect { .. } => ("connect_failed", Unreachable),
            ClientError::IdentityCertificate(_) => ("identity_damaged", Local),
            ClientError::Timeout(_) => ("timeout", Unreachable),
            ClientError::Rpc(e) if e.kind == capnp::ErrorKind::Disconnected => {
                ("connection_lost", Unreachable)
            }
            // Nothing was stored and the same call may pass later (the
            // node's storage failed for now, or it is shutting down).
            ClientError::Rpc(e) if e.kind == capnp::ErrorKind::Overloaded => ("node_busy", Unreachable),
            ClientError::Rpc(_) => ("node_error", Refused),
            ClientError::CommitConflict { .. } => ("commit_conflict", Refused),
            ClientError::RateLimited { .. } => ("rate_limited", Refused),
            ClientError::QueueFull { .. } => ("queue_full", Refused),
            ClientError::StaleEpoch { .. } => ("stale_epoch", Refused),
            ClientError::TooManyProposals { .. } => ("too_many_proposals", Refused),
            ClientError::TooManyKeyPackages { .. } => ("too_many_key_packages", Refused),
            ClientError::ChangeRefused { reason, .. } => reason.kind(),
            ClientError::WelcomeTreeUnavailable { .. } => ("welcome_tree_unavailable", Refused),
            ClientError::WelcomeTreeRefused { .. } => ("welcome_tree_refused", Refused),
            ClientError::InvitationDropped { .. } => ("invitation_dropped", Local),
            ClientError::InvalidChange { .. } => ("invalid_change", Refused),
            ClientError::GroupUnknownToNode { .. } => ("group_unknown_to_node", Refused),
            ClientError::NoGroupInfo { .. } => ("no_group_info", Refused),
            ClientError::RejoinRefused { .. } => ("rejoin_refused", Refused),
            ClientError::Outcome(_) | ClientError::Protocol(_) => ("bad_answer", BadAnswer),
            ClientError::Unconfirmed { .. } | ClientError::ProposalUnconfirmed { .. } => {
                ("unconfirmed", Unreachable)
            }
            ClientError::NoKeyPackage(..) => ("no_key_package", Refused),
            ClientError::BadKeyPackage { .. } => ("bad_key_package", BadAnswer),
            ClientError::FingerprintMismatch => ("fingerprint_mismatch", BadAnswer),
            ClientError::State(e) => state_kind(e),
            ClientError::Core(e) => core_kind(e),
            ClientError::UnknownGroup(_) => ("unknown_group", Local),
            ClientError::PartialDelivery(_) => ("partial_delivery", Refused),
            ClientError::NoGroup(_) => ("no_group", BadInput),
            ClientError::NotAMember { .. } => ("not_a_member", NotAMember),
            ClientError::Usage(_) => ("usage", BadInput),
            ClientError::Stdin(_) => ("stdin", Local),
            ClientError::Demo(_) => ("demo_failed", Local),
            ClientError::Internal(_) => ("internal", Local),
            ClientError::DeviceList { .. } => ("bad_device_list", BadAnswer),
            ClientError::DeviceListRefused(_) => ("device_list_refused", Refused),
            ClientError::Link(quicnprotochat_core::link::LinkError::NotYet) => ("link_pending", BadInput),
            ClientError::Link(_) => ("bad_link_code", BadInput),
        }
    }

    /// The process exit code for this error (see [`Category`]).
    pub fn exit_code(&self) -> u8 {
        self.kind().1.exit_code()
    }

    /// The JSON error object `--json` prints on stderr: `type` "error", a
    /// stable `kind`, the `exit_code`, the `message` for people, and, where
    /// a script can act on them, the numbers behind it.
    pub fn report(&self) -> serde_json::Value {
        let (kind, category) = self.kind();
        let mut report = error_object(kind, category, &self.to_string());
        let detail = match self.innermost() {
            ClientError::RateLimited { retry_after } => Some((
                "retry_after_ms",
                serde_json::json!(retry_after.as_millis() as u64),
            )),
            ClientError::CommitConflict { current_epoch } | ClientError::StaleEpoch { current_epoch } => {
                Some(("current_epoch", serde_json::json!(current_epoch)))
            }
            ClientError::QueueFull { recipients, .. } => Some((
                "recipients",
                serde_json::json!(recipients.iter().map(ToString::to_string).collect::<Vec<_>>()),
            )),
            _ => None,
        };
        if let (Some((field, value)), Some(object)) = (detail, report.as_object_mut()) {
            object.insert(field.to_owned(), value);
        }
        report
    }

    /// The error a refused change wraps, else this one.
    fn innermost(&self) -> &ClientError {
        match self {
            ClientError::ChangeRefused { reason, .. } => reason.innermost(),
            other => other,
        }
    }
}

/// Kinds of state file failures: a missing or wrong file is the user's to
/// fix; a damaged one is local.
fn state_kind(error: &StateError) -> (&'static str, Category) {
    match error {
        StateError::Missing(_) => ("no_state_file", Category::BadInput),
        StateError::NoPassphrase(_) | StateError::WrongPassphrase(_) | StateError::PassphraseFile { .. } => {
            ("bad_passphrase", Category::Locked)
        }
        StateError::NotAStateFile { .. } => ("not_a_state_file", Category::BadInput),
        StateError::NoIdentity(_) => ("no_identity", Category::BadInput),
        StateError::LinkPending(_) => ("link_pending", Category::BadInput),
        StateError::AlreadyRegistered(_) => ("already_registered", Category::BadInput),
        StateError::Contact(_) => ("contact", Category::BadInput),
        StateError::TooNew { .. } => ("state_too_new", Category::Local),
        StateError::BadIdentity(_) => ("identity_damaged", Category::Local),
        StateError::Mls(e) => core_kind(e),
        _ => ("state_file", Category::Local),
    }
}

/// Kinds of MLS failures: asking for something the group makes impossible
/// is bad input; the rest is local.
fn core_kind(error: &CoreError) -> (&'static str, Category) {
    match error {
        CoreError::AlreadyMember(_) => ("already_member", Category::BadInput),
        CoreError::UnknownMember(_) => ("unknown_member", Category::BadInput),
        CoreError::GroupExists(_) => ("group_exists", Category::BadInput),
        CoreError::InvalidIdentityKey(_) => ("bad_key", Category::BadInput),
        CoreError::WrongSuite { .. } => ("wrong_suite", Category::BadInput),
        CoreError::UnlistedDevice { .. } => ("unlisted_device", Category::BadInput),
        CoreError::NotAMember => ("not_a_member", Category::NotAMember),
        _ => ("mls", Category::Local),
    }
}

impl From<RateLimited> for ClientError {
    fn from(limited: RateLimited) -> Self {
        ClientError::RateLimited {
            retry_after: limited.retry_after,
        }
    }
}

impl From<QueueFull> for ClientError {
    fn from(full: QueueFull) -> Self {
        ClientError::QueueFull {
            recipients: full.recipients,
            max_depth: full.max_depth,
            max_bytes: full.max_bytes,
        }
    }
}

/// Errors one per line, each as a bullet: `\n  - …`.
fn bulleted(errors: &[ClientError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

/// Recipients as their short keys: `0123456789abcdef, …`.
fn short_keys(recipients: &[IdentityKey]) -> String {
    recipients
        .iter()
        .map(IdentityKey::short)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_change_is_reported_by_why_with_the_numbers_behind_it() {
        let refused = ClientError::ChangeRefused {
            group: "team".into(),
            reason: Box::new(ClientError::RateLimited {
                retry_after: Duration::from_millis(1500),
            }),
        };
        assert_eq!(refused.kind(), ("rate_limited", Category::Refused));
        assert_eq!(refused.exit_code(), 4);
        let report = refused.report();
        assert_eq!(report["kind"], "rate_limited");
        assert_eq!(report["retry_after_ms"], 1500);
        assert_eq!(report["exit_code"], 4);
        assert!(
            report["message"]
                .as_str()
                .unwrap()
                .starts_with("team is unchanged")
        );
    }

    #[test]
    fn a_lost_connection_is_unreachable_and_a_node_error_a_refusal() {
        let lost = ClientError::Rpc(capnp::Error::disconnected("gone".into()));
        assert_eq!(lost.kind(), ("connection_lost", Category::Unreachable));
        let failed = ClientError::Rpc(capnp::Error::failed("no".into()));
        assert_eq!(failed.kind(), ("node_error", Category::Refused));
        let conflict = ClientError::CommitConflict { current_epoch: 7 };
        assert_eq!(conflict.report()["current_epoch"], 7);
        let exits: Vec<u8> = [
            Category::Local,
            Category::BadInput,
            Category::Unreachable,
            Category::Refused,
            Category::BadAnswer,
        ]
        .map(Category::exit_code)
        .to_vec();
        assert_eq!(exits, [1, 2, 3, 4, 5]);
    }

    /// One error of every kind (three variants that are hard to build
    /// share their kind with one here: `CaCert`, `IdentityCertificate`,
    /// `Outcome`).
    fn one_of_each_kind() -> Vec<ClientError> {
        use quicnprotochat_core::link::LinkError;
        let path = || PathBuf::from("s.state");
        let text = || "x".to_owned();
        let key = IdentityKey::from_bytes([1; 32]);
        let core = |e: CoreError| ClientError::Core(e);
        let state = |e: StateError| ClientError::State(e);
        vec![
            ClientError::CaCertUnusable {
                path: path(),
                reason: text(),
            },
            ClientError::BadServer {
                server: text(),
                reason: text(),
            },
            ClientError::Unreachable {
                server: text(),
                after: Duration::from_secs(5),
            },
            ClientError::NothingListens { server: text() },
            ClientError::UntrustedNode {
                server: text(),
                ca_cert: path(),
                reason: text(),
            },
            ClientError::WrongName {
                server: text(),
                name: text(),
                reason: text(),
            },
            ClientError::Connect {
                server: text(),
                reason: text(),
            },
            ClientError::Timeout(Duration::from_secs(1)),
            ClientError::Rpc(capnp::Error::disconnected(text())),
            ClientError::Rpc(capnp::Error::failed(text())),
            ClientError::Rpc(capnp::Error::overloaded(text())),
            ClientError::CommitConflict { current_epoch: 1 },
            ClientError::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            ClientError::QueueFull {
                recipients: vec![key],
                max_depth: 1,
                max_bytes: 1,
            },
            ClientError::StaleEpoch { current_epoch: 1 },
            ClientError::TooManyProposals {
                group: text(),
                max: 100,
            },
            ClientError::TooManyKeyPackages { stored: 1, max: 1 },
            ClientError::WelcomeTreeUnavailable {
                group: text(),
                epoch: 1,
            },
            ClientError::WelcomeTreeRefused {
                group: text(),
                reason: text(),
            },
            ClientError::InvitationDropped {
                group: text(),
                inviter: text(),
                why: text(),
            },
            ClientError::InvalidChange { reason: text() },
            ClientError::GroupUnknownToNode { group: text() },
            ClientError::NoGroupInfo { group: text() },
            ClientError::RejoinRefused {
                group: text(),
                reason: text(),
            },
            ClientError::Protocol(text()),
            ClientError::Unconfirmed {
                group: text(),
                reason: text(),
            },
            ClientError::NoKeyPackage(key, quicnprotochat_core::Suite::X25519),
            ClientError::BadKeyPackage {
                requested: key,
                reason: text(),
            },
            ClientError::FingerprintMismatch,
            state(StateError::Missing(path())),
            state(StateError::NotAStateFile {
                path: path(),
                reason: text(),
            }),
            state(StateError::NoIdentity(path())),
            state(StateError::NoPassphrase(path())),
            state(StateError::WrongPassphrase(path())),
            state(StateError::PassphraseFile {
                file: path(),
                reason: text(),
            }),
            state(StateError::LinkPending(path())),
            state(StateError::AlreadyRegistered(path())),
            state(StateError::Contact(text())),
            state(StateError::TooNew {
                path: path(),
                found: 9,
                supported: 8,
            }),
            state(StateError::BadIdentity(path())),
            state(StateError::Damaged(text())),
            core(CoreError::AlreadyMember(text())),
            core(CoreError::UnknownMember(text())),
            core(CoreError::GroupExists(text())),
            core(CoreError::InvalidIdentityKey(text())),
            core(CoreError::WrongSuite {
                group: "x25519",
                key_package: "mlkem768x25519",
            }),
            core(CoreError::UnlistedDevice {
                user: text(),
                device: text(),
            }),
            core(CoreError::MalformedMessage(text())),
            ClientError::UnknownGroup(text()),
            ClientError::PartialDelivery(text()),
            ClientError::NoGroup(text()),
            ClientError::NotAMember { group: text() },
            core(CoreError::NotAMember),
            ClientError::Usage(text()),
            ClientError::Stdin(std::io::Error::other(text())),
            ClientError::Demo(text()),
            ClientError::Internal("x"),
            ClientError::DeviceList {
                user: text(),
                reason: text(),
            },
            ClientError::DeviceListRefused(text()),
            ClientError::Link(LinkError::NotYet),
            ClientError::Link(LinkError::BadCode),
        ]
    }

    /// The exit code table of docs/cli.md ("Scripting") is the contract
    /// scripts read: every kind is listed in the row of its exit code.
    #[test]
    fn every_kind_is_in_the_docs_row_of_its_exit_code() {
        let docs = include_str!("../../../docs/cli.md");
        let mut kinds = std::collections::BTreeSet::new();
        for error in one_of_each_kind() {
            let (kind, category) = error.kind();
            kinds.insert(kind);
            let row = docs
                .lines()
                .find(|line| line.starts_with(&format!("| {} | ", category.exit_code())))
                .unwrap_or_else(|| panic!("no docs/cli.md row for exit code {}", category.exit_code()));
            assert!(
                row.contains(&format!("`{kind}`")),
                "{kind} (exit {}) is not in its docs/cli.md row: {row}",
                category.exit_code()
            );
        }
        // Every kind `kind()` returns today (`runtime` is main's own).
        assert_eq!(kinds.len(), 56, "{kinds:?}");
    }

    #[test]
    fn a_full_queue_names_the_recipients_and_what_to_do() {
        let full = ClientError::QueueFull {
            recipients: vec![
                IdentityKey::from_bytes([0xab; 32]),
                IdentityKey::from_bytes([0x01; 32]),
            ],
            max_depth: 3,
            max_bytes: 1024,
        };
        let text = full.to_string();
        assert!(
            text.contains(&format!("{}, {}", "ab".repeat(8), "01".repeat(8))),
            "{text}"
        );
        assert!(
            text.contains("at most 3 messages or 1024 bytes") && text.contains("`recv`"),
            "{text}"
        );
    }
}
