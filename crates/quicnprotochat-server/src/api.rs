//! The node's API: one async function per `NodeService` call, in domain
//! types, under the Cap'n Proto adapter (`service`). Each checks
//! who may call, charges the caller's limits, runs one store command and
//! returns a typed result: an expected outcome (rate limited, queue full,
//! a conflict, nothing to hand out) as data, a wrong call or a failure as a
//! [`ServiceError`]. Nothing here knows capnp, so the policy is tested on
//! its own (see the tests below) and the adapter only reads, calls and
//! writes.
//!
//! An [`Api`] is one RPC session's view of the node: the peer it speaks
//! for, and the session's calls and subscriptions in flight.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use quicnprotochat_core::{
    EpochKey, GroupId, IdentityKey, KeyPackageStock, QueuedMessage, Seq, SignedDeviceList, StateKey, Suite,
    fingerprint, framing,
};
use quicnprotochat_proto::PROTOCOL_VERSION;
use quicnprotochat_proto::outcome::{
    BackupOutcome, ChangeOutcome, DeviceListOutcome, FetchedGroupInfo, FetchedKeyPackage, FetchedWelcomeTree,
    RateLimited, SendOutcome, TooLarge, UploadOutcome,
};
use quicnprotochat_proto::wire::{self, NodeInfo};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::delivery::{CommitRefusal, DeviceListRefusal, NotAMember, SendRefusal};
use crate::error::ServiceError;
use crate::limits::{BudgetRefusal, Caller, Cost, RateLimits, UploadRefusal, Wait};
use crate::metrics::{self, GaugeGuard, Label};
use crate::push;
use crate::store::Store;

/// Most KeyPackages one `uploadKeyPackages` call may carry.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: u32 = 1000;

/// Most calls one RPC session may have unanswered at once. capnp-rpc reads
/// every incoming call as it arrives, so without a cap one peer could pile
/// up payloads in memory faster than the store commits them.
pub const MAX_CALLS_PER_SESSION: usize = 256;

/// Most live subscriptions one session may hold: each pins a push task.
pub const MAX_SUBSCRIPTIONS_PER_SESSION: usize = 4;

/// State shared by every connection's sessions.
#[derive(Debug)]
pub struct Shared {
    /// The store all calls go to.
    pub store: Store,
    /// Largest payload accepted, in bytes.
    pub max_payload: usize,
    /// Calls being answered, one token each. Shutdown closes it (new calls
    /// are then refused) and waits until the last token is dropped.
    pub calls: TaskTracker,
    /// Open connections, one token each from the start of the handshake;
    /// shutdown gives them a moment to hang up on their own so answers
    /// already sent are not cut off.
    pub connections: TaskTracker,
    /// Per-caller rate limits.
    pub rate_limits: RateLimits,
    /// What KeyPackages the node takes beyond MLS validity.
    pub key_package_policy: wire::KeyPackagePolicy,
}

impl Shared {
    /// Shared state over `store`.
    pub fn new(
        store: Store,
        max_payload: usize,
        rate_limits: RateLimits,
        key_package_policy: wire::KeyPackagePolicy,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            max_payload,
            rate_limits,
            key_package_policy,
            calls: TaskTracker::new(),
            connections: TaskTracker::new(),
        })
    }
}

/// KeyPackages as an upload carries them: `uploadKeyPackage`'s one
/// (`package`) or `uploadKeyPackages`' list (`packages`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPackageUpload {
    /// One KeyPackage.
    One(Vec<u8>),
    /// A list of them, stored all or none.
    List(Vec<Vec<u8>>),
}

/// What became of an upload: the outcome, and each KeyPackage's SHA-256 as
/// received when they were stored (empty otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Stored, or why not.
    pub outcome: UploadOutcome,
    /// In upload order, when stored.
    pub fingerprints: Vec<[u8; 32]>,
}

/// A subscription the node agreed to: the adapter starts its push loop
/// ([`push::push`]) with the subscriber's receiver. It counts against the
/// session's live subscriptions, and the open-subscriptions gauge, until
/// dropped.
pub struct Subscription {
    /// The store to read the queue from.
    pub store: Store,
    /// Whose queue.
    pub recipient: IdentityKey,
    /// Push what comes after this.
    pub after: Seq,
    _live: Count,
    _open: GaugeGuard,
}

impl Label for Uploaded {
    fn label(&self) -> &'static str {
        self.outcome.label()
    }
}

impl Label for Subscription {
    fn label(&self) -> &'static str {
        "ok"
    }
}

/// One RPC session's view of the node.
pub struct Api {
    shared: Arc<Shared>,
    /// Who this connection proved to be (TLS client certificate), if anyone.
    peer: Option<IdentityKey>,
    /// The connection's remote address, for limiting anonymous callers.
    remote: IpAddr,
    /// Unanswered calls of this session.
    calls: Rc<Cell<usize>>,
    /// Live push subscriptions of this session.
    subscriptions: Rc<Cell<usize>>,
}

impl Api {
    /// The node as a session of a connection authenticated as `peer` (or
    /// anonymous, from `remote`) sees it.
    pub fn new(shared: Arc<Shared>, peer: Option<IdentityKey>, remote: IpAddr) -> Self {
        Self {
            shared,
            peer,
            remote,
            calls: Rc::new(Cell::new(0)),
            subscriptions: Rc::new(Cell::new(0)),
        }
    }

    /// The largest payload the node takes, for reading a call's fields.
    pub fn max_payload(&self) -> usize {
        self.shared.max_payload
    }

    /// `ping`: who the node is. Rate limited per caller; the answer has no
    /// outcome to carry that, so it is an exception.
    pub fn ping(&self) -> Result<NodeInfo, ServiceError> {
        self.shared
            .rate_limits
            .check_ping(self.caller())
            .map_err(exception)?;
        Ok(NodeInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            max_payload_bytes: u32::try_from(self.shared.max_payload).unwrap_or(u32::MAX),
            instance_id: self.shared.store.instance_id().to_vec(),
        })
    }

    /// `uploadKeyPackage(s)`: stores KeyPackages of `identity`, the caller's
    /// own. The upload rate is charged before anything is checked (checks
    /// are what cost), the bytes to the send budget before storing.
    pub async fn upload_key_packages(
        &self,
        identity: IdentityKey,
        upload: KeyPackageUpload,
    ) -> Result<Uploaded, ServiceError> {
        let _call = self.begin()?;
        self.require_owner("identityKey", &identity)?;
        let (received, list) = match upload {
            KeyPackageUpload::One(package) => (vec![package], None),
            KeyPackageUpload::List(packages) => (packages, Some("packages")),
        };
        let count = u32::try_from(received.len()).unwrap_or(u32::MAX);
        if list.is_some() && !(1..=MAX_KEY_PACKAGES_PER_UPLOAD).contains(&count) {
            return Err(field(
                "packages",
                format!("must hold 1 to {MAX_KEY_PACKAGES_PER_UPLOAD} KeyPackages, got {count}"),
            ));
        }
        let refused = |outcome| Uploaded {
            outcome,
            fingerprints: Vec::new(),
        };
        match self.shared.rate_limits.check_key_package_upload(&identity, count) {
            Ok(()) => {}
            Err(UploadRefusal::Wait(wait)) => return Ok(refused(UploadOutcome::RateLimited(limited(wait)))),
            Err(UploadRefusal::OverBurst { burst }) => {
                return Err(field(
                    "packages",
                    format!(
                        "{count} KeyPackages at once are more than this node takes in one upload ({burst}); upload fewer"
                    ),
                ));
            }
        }
        let (packages, fingerprints) = self.check_key_packages(identity, received, list).await?;
        // Uploads queue nothing, so they do not count as messages; how many
        // an identity keeps is bounded by its KeyPackage limit instead.
        // Indivisible: a client's batch passes whatever the rate (and
        // leaves a debt).
        let cost = Cost {
            messages: 0,
            bytes: packages.iter().map(|package| package.bytes.len() as u64).sum(),
        };
        if let Err(wait) = self.shared.rate_limits.charge_indivisible(self.caller(), cost) {
            return Ok(refused(UploadOutcome::RateLimited(limited(wait))));
        }
        Ok(
            match self.shared.store.upload_key_packages(identity, packages).await? {
                Ok(()) => Uploaded {
                    outcome: UploadOutcome::Stored,
                    fingerprints,
                },
                // Of the suite whose stock is full; the limit is per suite.
                Err(too_many) => refused(UploadOutcome::TooMany {
                    stored: u32::try_from(too_many.stored).unwrap_or(u32::MAX),
                    max: too_many.max,
                }),
            },
        )
    }

    /// `keyPackageCount`: how many KeyPackages of `suite` the caller's
    /// `identity` has in stock, and whether a last-resort one is among them.
    pub async fn key_package_count(
        &self,
        identity: IdentityKey,
        suite: Suite,
    ) -> Result<KeyPackageStock, ServiceError> {
        let _call = self.begin()?;
        self.require_owner("identityKey", &identity)?;
        Ok(self.shared.store.count_key_packages(identity, suite).await?)
    }

    /// `fetchKeyPackage`: takes one of `identity`'s KeyPackages of `suite`;
    /// only its last-resort one while its ordinary ones are served over
    /// their rate.
    pub async fn fetch_key_package(
        &self,
        identity: IdentityKey,
        suite: Suite,
    ) -> Result<FetchedKeyPackage, ServiceError> {
        let _call = self.begin()?;
        if let Err(wait) = self.shared.rate_limits.check_key_package_fetch(self.caller()) {
            return Ok(FetchedKeyPackage::RateLimited(limited(wait)));
        }
        let ordinary = self
            .shared
            .rate_limits
            .may_serve_ordinary_key_package(&identity, suite);
        Ok(
            match self
                .shared
                .store
                .take_key_package(identity, suite, ordinary)
                .await?
            {
                Some(package) => FetchedKeyPackage::Package(package),
                None => FetchedKeyPackage::None,
            },
        )
    }

    /// `uploadDeviceList`: stores a user's signed device list, uploaded by
    /// one of its devices. Charged first as one message of the list's
    /// size: storing it costs the node a write and a signature check.
    /// Indivisible, like a KeyPackage upload: a list (about 2 KiB at most)
    /// is never refused as bigger than the burst.
    pub async fn upload_device_list(
        &self,
        list: SignedDeviceList,
    ) -> Result<DeviceListOutcome, ServiceError> {
        let _call = self.begin()?;
        let caller = self.peer.ok_or_else(|| {
            ServiceError::PermissionDenied(
                "uploading a device list needs a connection authenticated as one of the user's devices (a TLS client certificate for its key)"
                    .into(),
            )
        })?;
        let cost = Cost {
            messages: 1,
            // User key, version, devices, signature.
            bytes: (32 + 8 + 32 * list.list().devices().len() + 64) as u64,
        };
        if let Err(wait) = self.shared.rate_limits.charge_indivisible(self.caller(), cost) {
            return Ok(DeviceListOutcome::RateLimited(limited(wait)));
        }
        Ok(match self.shared.store.upload_device_list(caller, list).await? {
            Ok(()) => DeviceListOutcome::Stored,
            Err(DeviceListRefusal::Stale { current }) => DeviceListOutcome::Stale { current },
            Err(DeviceListRefusal::BadSignature) => DeviceListOutcome::BadSignature,
            Err(DeviceListRefusal::NotADevice) => DeviceListOutcome::NotADevice,
            Err(DeviceListRefusal::RemovedDevice) => DeviceListOutcome::RemovedDevice,
            Err(DeviceListRefusal::TooFar { current, max_step }) => {
                DeviceListOutcome::TooFar { current, max_step }
            }
        })
    }

    /// `fetchDeviceLists`: the lists the node holds of `users` (at most
    /// [`wire::MAX_DEVICE_LIST_FETCH`]). One KeyPackage fetch of the rate
    /// whatever their number: a client asks for a group's worth in one
    /// call. The answer has no outcome to carry a rate limit, so it is an
    /// exception, as for pings.
    pub async fn fetch_device_lists(
        &self,
        users: Vec<IdentityKey>,
    ) -> Result<Vec<SignedDeviceList>, ServiceError> {
        let _call = self.begin()?;
        if users.len() > wire::MAX_DEVICE_LIST_FETCH {
            return Err(field(
                "userKeys",
                format!(
                    "names {} users; at most {} per call, ask for the rest in another",
                    users.len(),
                    wire::MAX_DEVICE_LIST_FETCH
                ),
            ));
        }
        self.shared
            .rate_limits
            .check_key_package_fetch(self.caller())
            .map_err(exception)?;
        Ok(self.shared.store.device_lists(users).await?)
    }

    /// `enqueue`: queues `payload` for `recipient`. Charged before the
    /// payload is copied: a flood over the budget costs no copies.
    pub async fn enqueue(
        &self,
        recipient: IdentityKey,
        payload: &[u8],
        message_id: Option<Vec<u8>>,
    ) -> Result<SendOutcome, ServiceError> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        let cost = Cost {
            messages: 1,
            bytes: payload.len() as u64,
        };
        if let Err(refusal) = self.shared.rate_limits.check_send(self.caller(), cost) {
            return Ok(over_budget(refusal));
        }
        let outcome = sent(
            self.shared
                .store
                .enqueue(sender, recipient, payload.to_vec(), message_id)
                .await?,
        );
        if outcome == SendOutcome::Accepted {
            metrics::messages_queued(1);
        }
        Ok(outcome)
    }

    /// `enqueueBatch`: queues each envelope's payload for its recipients,
    /// all or nothing; each recipient is a message of the budget, each
    /// payload its bytes once.
    pub async fn enqueue_batch(
        &self,
        envelopes: Vec<wire::Envelope>,
        state_keys: Vec<StateKey>,
    ) -> Result<SendOutcome, ServiceError> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        let cost = cost_of(&envelopes, 0);
        if let Err(refusal) = self.shared.rate_limits.check_send(self.caller(), cost) {
            return Ok(over_budget(refusal));
        }
        let outcome = sent(
            self.shared
                .store
                .enqueue_batch_with_keys(sender, envelopes, state_keys)
                .await?,
        );
        if outcome == SendOutcome::Accepted {
            metrics::messages_queued(cost.messages);
        }
        Ok(outcome)
    }

    /// `publishCommit`: checks a Commit against the group's public state
    /// and stores and queues it with its Welcome, or says why not.
    pub async fn publish_commit(
        &self,
        publication: wire::CommitPublication,
    ) -> Result<ChangeOutcome, ServiceError> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        let extra = publication.group_info.as_ref().map_or(0, Vec::len)
            + publication
                .initial_state
                .as_ref()
                .map_or(0, |state| state.group_info.len() + state.ratchet_tree.len());
        let cost = cost_of(
            std::iter::once(&publication.commit).chain(publication.welcome.as_ref()),
            extra,
        );
        let queued = cost.messages;
        let cost = as_change(cost);
        let rejoin = framing::is_external_commit(&publication.commit.payload);
        if let Err(wait) = self.shared.rate_limits.charge_indivisible(self.caller(), cost) {
            return Ok(ChangeOutcome::RateLimited(limited(wait)));
        }
        let outcome = match self.shared.store.publish_commit(sender, publication).await? {
            Ok(()) => ChangeOutcome::Accepted,
            // Proposals only; a Commit frees the count.
            Err(CommitRefusal::TooManyProposals { .. }) => {
                return Err(ServiceError::Internal(
                    "a Commit refused for too many proposals".into(),
                ));
            }
            Err(refusal) => refused_change(refusal),
        };
        if outcome == ChangeOutcome::Accepted {
            metrics::messages_queued(queued);
            if rejoin {
                metrics::rejoined();
            }
        }
        Ok(outcome)
    }

    /// `publishProposal`: checks a standalone proposal against the group's
    /// public state and stores and queues it, or says why not.
    pub async fn publish_proposal(
        &self,
        publication: wire::ProposalPublication,
    ) -> Result<ChangeOutcome, ServiceError> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        let cost = cost_of([&publication.proposal], 0);
        let queued = cost.messages;
        let cost = as_change(cost);
        if let Err(wait) = self.shared.rate_limits.charge_indivisible(self.caller(), cost) {
            return Ok(ChangeOutcome::RateLimited(limited(wait)));
        }
        let outcome = match self.shared.store.publish_proposal(sender, publication).await? {
            Ok(()) => ChangeOutcome::Accepted,
            Err(refusal) => refused_change(refusal),
        };
        if outcome == ChangeOutcome::Accepted {
            metrics::messages_queued(queued);
        }
        Ok(outcome)
    }

    /// `fetchGroupInfo`: the group's current GroupInfo and tree, for a
    /// member who rejoins.
    pub async fn fetch_group_info(
        &self,
        group: GroupId,
        key: StateKey,
    ) -> Result<FetchedGroupInfo, ServiceError> {
        let _call = self.begin()?;
        let caller = self.require_authenticated()?;
        Ok(match self.shared.store.group_info(group, key, caller).await? {
            Ok(Some(state)) => FetchedGroupInfo::State(state),
            Ok(None) => FetchedGroupInfo::Unavailable,
            Err(NotAMember) => FetchedGroupInfo::NotMember,
        })
    }

    /// `fetchWelcomeTree`: the ratchet tree a Welcome into `epoch` of the
    /// group needs, for whoever presents that epoch's `key` (a member the
    /// Welcome added).
    pub async fn fetch_welcome_tree(
        &self,
        group: GroupId,
        epoch: u64,
        key: Option<EpochKey>,
    ) -> Result<FetchedWelcomeTree, ServiceError> {
        let _call = self.begin()?;
        let caller = self.require_authenticated()?;
        Ok(
            match self.shared.store.welcome_tree(group, epoch, key, caller).await? {
                Some((tree, state_key)) => FetchedWelcomeTree::Tree { tree, state_key },
                None => FetchedWelcomeTree::Unavailable,
            },
        )
    }

    /// `putKeyBackup`: keeps a device's sealed key backup under the hash of
    /// `lookup`. Charged like a change of that many bytes, so nobody fills
    /// the node with backups faster than with messages.
    pub async fn put_key_backup(
        &self,
        lookup: [u8; 32],
        backup: Vec<u8>,
    ) -> Result<BackupOutcome, ServiceError> {
        let _call = self.begin()?;
        self.require_authenticated()?;
        let cost = as_change(Cost {
            messages: 1,
            bytes: backup.len() as u64,
        });
        if let Err(wait) = self.shared.rate_limits.charge_indivisible(self.caller(), cost) {
            return Ok(BackupOutcome::RateLimited(limited(wait)));
        }
        Ok(match self.shared.store.put_key_backup(lookup, backup).await? {
            Ok(()) => BackupOutcome::Stored,
            Err(too_large) => BackupOutcome::TooLarge {
                max_bytes: u32::try_from(too_large.max_bytes).unwrap_or(u32::MAX),
            },
        })
    }

    /// `fetchKeyBackup`: the key backup kept under the hash of `lookup`.
    pub async fn fetch_key_backup(&self, lookup: [u8; 32]) -> Result<Vec<u8>, ServiceError> {
        let _call = self.begin()?;
        self.require_authenticated()?;
        Ok(self.shared.store.key_backup(lookup).await?.unwrap_or_default())
    }

    /// `subscribe`: agrees to push the caller's queue after `after`; the
    /// adapter starts the push with the subscriber's receiver.
    pub fn subscribe(&self, recipient: IdentityKey, after: Seq) -> Result<Subscription, ServiceError> {
        let _call = self.begin()?;
        self.require_owner("recipientKey", &recipient)?;
        if self.subscriptions.get() >= MAX_SUBSCRIPTIONS_PER_SESSION {
            return Err(ServiceError::TooManyCalls(MAX_SUBSCRIPTIONS_PER_SESSION));
        }
        Ok(Subscription {
            store: self.shared.store.clone(),
            recipient,
            after,
            _live: Count::new(&self.subscriptions),
            _open: GaugeGuard::new(metrics::SUBSCRIPTIONS_OPEN),
        })
    }

    /// `fetchWait`: the caller's messages after `after` (at most `limit`),
    /// waiting up to `timeout` for some if there are none yet.
    pub async fn fetch_wait(
        &self,
        recipient: IdentityKey,
        after: Seq,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<QueuedMessage>, ServiceError> {
        let _call = self.begin()?;
        self.require_owner("recipientKey", &recipient)?;
        Ok(push::wait_for_messages(&self.shared.store, recipient, after, limit, timeout).await?)
    }

    /// `fetchSince`: the caller's messages after `after`, at most `limit`.
    pub async fn fetch_since(
        &self,
        recipient: IdentityKey,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<QueuedMessage>, ServiceError> {
        let _call = self.begin()?;
        self.require_owner("recipientKey", &recipient)?;
        Ok(self.shared.store.messages_after(recipient, after, limit).await?)
    }

    /// `ack`: deletes the caller's messages up to `up_to`.
    pub async fn ack(&self, recipient: IdentityKey, up_to: Seq) -> Result<(), ServiceError> {
        let _call = self.begin()?;
        self.require_owner("recipientKey", &recipient)?;
        let acked = self.shared.store.ack(recipient, up_to).await?;
        metrics::messages_acked(acked);
        Ok(())
    }

    /// `fetch` (protocol 1): takes the caller's oldest messages off its
    /// queue.
    pub async fn fetch(&self, recipient: IdentityKey) -> Result<Vec<Vec<u8>>, ServiceError> {
        let _call = self.begin()?;
        self.require_owner("recipientKey", &recipient)?;
        Ok(self.shared.store.drain(recipient).await?)
    }

    /// Registers a call as in flight, or refuses it while shutting down or
    /// when the session has too many calls unanswered.
    fn begin(&self) -> Result<Count, ServiceError> {
        if self.calls.get() >= MAX_CALLS_PER_SESSION {
            return Err(ServiceError::TooManyCalls(MAX_CALLS_PER_SESSION));
        }
        if self.shared.calls.is_closed() {
            return Err(ServiceError::ShuttingDown);
        }
        let mut count = Count::new(&self.calls);
        count.token = Some(self.shared.calls.token());
        Ok(count)
    }

    /// The caller, for rate limits.
    fn caller(&self) -> Caller {
        self.peer.map_or(Caller::Address(self.remote), Caller::Identity)
    }

    /// Only the owner of `key` may act on it (its queue, its KeyPackages).
    fn require_owner(&self, field: &str, key: &IdentityKey) -> Result<(), ServiceError> {
        match &self.peer {
            Some(peer) if peer == key => Ok(()),
            Some(peer) => Err(ServiceError::PermissionDenied(format!(
                "{field} {} belongs to someone else; this connection is authenticated as {}",
                key.short(),
                peer.short()
            ))),
            None => Err(ServiceError::PermissionDenied(format!(
                "{field} {}: this needs a connection authenticated as that identity (a TLS client certificate for its key)",
                key.short()
            ))),
        }
    }

    /// Sending needs an authenticated connection.
    fn require_authenticated(&self) -> Result<IdentityKey, ServiceError> {
        self.peer.ok_or_else(|| {
            ServiceError::PermissionDenied(
                "sending needs an authenticated connection (a TLS client certificate for your identity key)"
                    .into(),
            )
        })
    }

    /// Checks each of `received` as a KeyPackage of `owner` (the field
    /// named `list[i]`, or `package` when not a list) and fingerprints it
    /// as received (also when a wrapped KeyPackage is stored bare); the
    /// first invalid one's error.
    ///
    /// On a blocking-pool thread: a KeyPackage's signatures cost the node
    /// real CPU, and an upload of a hundred held this RPC thread, and every
    /// connection it serves, for 11 ms in a release build and 2 s in a
    /// debug one (docs/benchmarks/journal.md, "KeyPackage checks off the RPC
    /// threads").
    async fn check_key_packages(
        &self,
        owner: IdentityKey,
        received: Vec<Vec<u8>>,
        list: Option<&'static str>,
    ) -> Result<(Vec<wire::ValidKeyPackage>, Vec<[u8; 32]>), ServiceError> {
        let (max, policy) = (self.shared.max_payload, self.shared.key_package_policy);
        let checked = tokio::task::spawn_blocking(move || {
            received
                .iter()
                .enumerate()
                .map(|(index, bytes)| {
                    let field = match list {
                        Some(list) => format!("{list}[{index}]"),
                        None => "package".to_owned(),
                    };
                    let package = wire::key_package(&field, bytes, max, &owner, &policy)?;
                    // As received: a wrapped one was stored bare.
                    let digest = if package.bytes.len() == bytes.len() {
                        package.fingerprint
                    } else {
                        fingerprint(bytes)
                    };
                    Ok((package, digest))
                })
                .collect::<Result<(Vec<_>, Vec<_>), wire::FieldError>>()
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("checking KeyPackages failed: {e}")))?;
        Ok(checked?)
    }
}

/// Counts one of a session's calls or subscriptions until dropped; a call
/// also holds a token of the node's calls, which shutdown waits for.
struct Count {
    count: Rc<Cell<usize>>,
    token: Option<TaskTrackerToken>,
}

impl Count {
    fn new(count: &Rc<Cell<usize>>) -> Count {
        count.set(count.get() + 1);
        Count {
            count: count.clone(),
            token: None,
        }
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        self.count.set(self.count.get() - 1);
    }
}

/// What queueing `envelopes` costs: each recipient a message, each payload
/// its bytes once, plus `extra_bytes` stored beside them.
fn cost_of<'a>(envelopes: impl IntoIterator<Item = &'a wire::Envelope>, extra_bytes: usize) -> Cost {
    let mut cost = Cost {
        messages: 0,
        bytes: extra_bytes as u64,
    };
    for envelope in envelopes {
        cost.messages += envelope.recipients.len() as u64;
        cost.bytes += envelope.payload.len() as u64;
    }
    cost
}

/// What a group change of `cost` is charged: one message at least, since
/// checking it costs the node CPU even when it goes to nobody (a group of
/// one).
fn as_change(cost: Cost) -> Cost {
    Cost {
        messages: cost.messages.max(1),
        ..cost
    }
}

/// The outcome of a wait a rate asked for.
fn limited(wait: Wait) -> RateLimited {
    RateLimited {
        retry_after: wait.retry_after,
    }
}

/// A rate refusal of a call whose answer has no outcome to carry it.
fn exception(wait: Wait) -> ServiceError {
    ServiceError::RateLimited(wait.retry_after)
}

/// A parameter that breaks a limit of its shape.
fn field(name: &str, reason: String) -> ServiceError {
    ServiceError::from(wire::FieldError {
        field: name.into(),
        reason,
    })
}

/// The outcome of a send the budget refused.
fn over_budget(refusal: BudgetRefusal) -> SendOutcome {
    match refusal {
        BudgetRefusal::Wait(retry_after) => SendOutcome::RateLimited(RateLimited { retry_after }),
        BudgetRefusal::TooLarge {
            max_messages,
            max_bytes,
        } => SendOutcome::TooLarge(TooLarge {
            max_messages: u32::try_from(max_messages).unwrap_or(u32::MAX),
            max_bytes,
        }),
    }
}

/// The outcome of a send the store accepted or refused.
fn sent(outcome: Result<(), SendRefusal>) -> SendOutcome {
    match outcome {
        Ok(()) => SendOutcome::Accepted,
        Err(SendRefusal::QueueFull(full)) => SendOutcome::QueueFull(full),
        Err(SendRefusal::StaleEpoch(stale)) => SendOutcome::StaleEpoch(stale),
        Err(SendRefusal::Handshake) => SendOutcome::Handshake,
    }
}

/// The outcome of a group change the store refused.
fn refused_change(refusal: CommitRefusal) -> ChangeOutcome {
    match refusal {
        CommitRefusal::Conflict { current_epoch } => ChangeOutcome::Conflict { current_epoch },
        CommitRefusal::QueueFull(full) => ChangeOutcome::QueueFull(full),
        CommitRefusal::Invalid { reason } => ChangeOutcome::Invalid { reason },
        CommitRefusal::UnknownGroup => ChangeOutcome::UnknownGroup,
        CommitRefusal::TooManyProposals { max } => ChangeOutcome::TooManyProposals { max },
    }
}

#[cfg(test)]
mod tests;
