//! The `NodeService` RPC adapter. Each method parses its parameters into
//! domain types, makes one store call and fills the results: an expected
//! outcome (rate limited, queue full, commit conflict, no KeyPackage) as a
//! typed value, a wrong call or a failure as an exception. The rules live in
//! [`crate::delivery`], the storage in [`crate::store`]. Every method runs
//! inside `observed`, which counts the call by method and outcome (a typed
//! outcome's kind, or `error` for an exception) and times it.

use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;
use std::rc::Rc as LocalRc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp::capability::Rc;
use quicnprotochat_core::{IdentityKey, Seq, SignedDeviceList, fingerprint};
use quicnprotochat_proto::memory::Account;
use quicnprotochat_proto::outcome::{
    CommitOutcome, DeviceListOutcome, FetchedGroupInfo, FetchedKeyPackage, FetchedWelcomeTree,
    ProposalOutcome, RateLimited, SendOutcome, TooLarge, UploadOutcome,
};
use quicnprotochat_proto::wire;
use quicnprotochat_proto::{PROTOCOL_VERSION, auth_capnp, delivery_capnp, node_capnp};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::delivery::{CommitRefusal, DeviceListRefusal, NotAMember, SendRefusal, push};
use crate::error::ServiceError;
use crate::limits::{self, Caller, Cost, RateLimits};
use crate::metrics::{self, GaugeGuard};
use crate::store::Store;

/// State shared by every connection's service object.
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

/// Most KeyPackages one `uploadKeyPackages` call may carry.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: u32 = 1000;

/// Most calls one RPC session may have unanswered at once. capnp-rpc reads
/// every incoming call as it arrives, so without a cap one peer could pile
/// up payloads in memory faster than the store commits them.
pub const MAX_CALLS_PER_SESSION: usize = 256;

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

/// What a session knows of its connection, for pushes.
pub struct Session {
    /// The peer's pushes account.
    pub pushes: Arc<Account>,
    /// Closes the connection: a subscriber stalled.
    pub close: Box<dyn Fn()>,
    /// How long a pushed batch may wait for the subscriber's answer.
    pub stall_timeout: Duration,
    /// The most bytes one push can carry.
    pub push_bound: usize,
}

/// The bootstrap capability served on each connection.
pub struct NodeServiceImpl {
    shared: Arc<Shared>,
    session: LocalRc<Session>,
    /// Who this connection proved to be (TLS client certificate), if anyone.
    peer: Option<IdentityKey>,
    /// The connection's remote address, for limiting anonymous callers.
    remote: IpAddr,
    /// Unanswered calls of this session.
    session_calls: LocalRc<Cell<usize>>,
    /// Live push subscriptions of this session.
    subscriptions: LocalRc<Cell<usize>>,
}

impl NodeServiceImpl {
    /// A service object for one RPC session of a connection authenticated
    /// as `peer` (or anonymous), answering from `shared`.
    pub fn new(shared: Arc<Shared>, peer: Option<IdentityKey>, remote: IpAddr, session: Session) -> Self {
        Self {
            shared,
            session: LocalRc::new(session),
            peer,
            remote,
            session_calls: LocalRc::new(Cell::new(0)),
            subscriptions: LocalRc::new(Cell::new(0)),
        }
    }

    /// Registers a call as in flight, or refuses it while shutting down or
    /// when the session has too many calls unanswered.
    fn begin(&self) -> Result<CallGuard, ServiceError> {
        if self.session_calls.get() >= MAX_CALLS_PER_SESSION {
            return Err(ServiceError::TooManyCalls(MAX_CALLS_PER_SESSION));
        }
        if self.shared.calls.is_closed() {
            return Err(ServiceError::ShuttingDown);
        }
        self.session_calls.set(self.session_calls.get() + 1);
        Ok(CallGuard {
            _token: self.shared.calls.token(),
            session_calls: self.session_calls.clone(),
        })
    }
}

impl NodeServiceImpl {
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

    /// The caller, for rate limits.
    fn caller(&self) -> Caller {
        self.peer.map_or(Caller::Address(self.remote), Caller::Identity)
    }

    /// Charges a call that queues `envelopes` to this caller's send budget:
    /// each recipient a message, each payload its bytes once, and at least
    /// `min_messages` messages.
    fn charge_sends<'a>(
        &self,
        envelopes: impl IntoIterator<Item = &'a wire::Envelope>,
        extra_bytes: usize,
        min_messages: u64,
        indivisible: bool,
    ) -> Result<(), limits::SendRefusal> {
        let mut cost = Cost {
            messages: 0,
            bytes: extra_bytes as u64,
        };
        for envelope in envelopes {
            cost.messages += envelope.recipients.len() as u64;
            cost.bytes += envelope.payload.len() as u64;
        }
        cost.messages = cost.messages.max(min_messages);
        self.shared
            .rate_limits
            .check_send(self.caller(), cost, indivisible)
    }

    /// Charges a group change, which cannot be split: it may go over the
    /// burst (and leave a debt); a refusal is only ever a wait. It counts as
    /// one message at least: checking it costs the node CPU even when it
    /// goes to nobody (a group of one).
    fn charge_change<'a>(
        &self,
        envelopes: impl IntoIterator<Item = &'a wire::Envelope>,
        extra_bytes: usize,
    ) -> Result<(), RateLimited> {
        match self.charge_sends(envelopes, extra_bytes, 1, true) {
            Ok(()) => Ok(()),
            Err(limits::SendRefusal::Wait(retry_after)) => Err(RateLimited { retry_after }),
            // Indivisible costs are never refused as too large.
            Err(limits::SendRefusal::TooLarge { .. }) => Err(RateLimited {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Takes `count` KeyPackages from `owner`'s upload rate before anything
    /// is validated (validation is what costs); a refusal to answer with.
    fn limit_uploads(&self, owner: &IdentityKey, count: u32) -> Result<Option<UploadOutcome>, ServiceError> {
        match self.shared.rate_limits.check_key_package_upload(owner, count) {
            Ok(()) => Ok(None),
            Err(Ok(retry_after)) => Ok(Some(UploadOutcome::RateLimited(RateLimited { retry_after }))),
            Err(Err(burst)) => Err(ServiceError::from(wire::FieldError {
                field: "packages".into(),
                reason: format!(
                    "{count} KeyPackages at once are more than this node takes in one upload ({burst}); upload fewer"
                ),
            })),
        }
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

    /// Charges an upload's bytes to the send budget and stores it, within
    /// the identity's KeyPackage limit of each suite. Uploads queue nothing, so they do
    /// not count as messages; how many an identity keeps is bounded by the
    /// limit instead. Indivisible: a client's batch passes whatever the
    /// rate (and leaves a debt).
    async fn store_key_packages(
        &self,
        identity: IdentityKey,
        packages: Vec<wire::ValidKeyPackage>,
    ) -> Result<UploadOutcome, ServiceError> {
        let cost = Cost {
            messages: 0,
            bytes: packages.iter().map(|package| package.bytes.len() as u64).sum(),
        };
        if let Err(refusal) = self.shared.rate_limits.check_send(self.caller(), cost, true) {
            let retry_after = match refusal {
                limits::SendRefusal::Wait(wait) => wait,
                // Indivisible costs are never refused as too large.
                limits::SendRefusal::TooLarge { .. } => Duration::from_secs(1),
            };
            return Ok(UploadOutcome::RateLimited(RateLimited { retry_after }));
        }
        Ok(
            match self.shared.store.upload_key_packages(identity, packages).await? {
                Ok(()) => UploadOutcome::Stored,
                // Of the suite whose stock is full; the limit is per suite.
                Err(too_many) => UploadOutcome::TooMany {
                    stored: u32::try_from(too_many.stored).unwrap_or(u32::MAX),
                    max: too_many.max,
                },
            },
        )
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

    /// Stores a device list, charged to the caller's send budget first as
    /// one message of the list's size: storing it costs the node a write
    /// and a signature check. Indivisible, like a KeyPackage upload: a list
    /// (about 2 KiB at most) is never refused as bigger than the burst.
    async fn store_device_list(
        &self,
        caller: IdentityKey,
        list: SignedDeviceList,
    ) -> Result<DeviceListOutcome, ServiceError> {
        let cost = Cost {
            messages: 1,
            // User key, version, devices, signature.
            bytes: (32 + 8 + 32 * list.list().devices().len() + 64) as u64,
        };
        if let Err(refusal) = self.shared.rate_limits.check_send(self.caller(), cost, true) {
            let retry_after = match refusal {
                limits::SendRefusal::Wait(wait) => wait,
                // Indivisible costs are never refused as too large.
                limits::SendRefusal::TooLarge { .. } => Duration::from_secs(1),
            };
            return Ok(DeviceListOutcome::RateLimited(RateLimited { retry_after }));
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
}

/// Parses `userKeys` of `fetchDeviceLists`: at most
/// [`wire::MAX_DEVICE_LIST_FETCH`] keys of 32 bytes each.
fn user_keys(keys: capnp::data_list::Reader<'_>) -> Result<Vec<IdentityKey>, ServiceError> {
    if keys.len() as usize > wire::MAX_DEVICE_LIST_FETCH {
        return Err(wire::FieldError {
            field: "userKeys".into(),
            reason: format!(
                "names {} users; at most {} per call, ask for the rest in another",
                keys.len(),
                wire::MAX_DEVICE_LIST_FETCH
            ),
        }
        .into());
    }
    let mut users = Vec::with_capacity(keys.len() as usize);
    for (index, key) in keys.iter().enumerate() {
        let field = format!("userKeys[{index}]");
        let key = key.map_err(|e| wire::FieldError {
            field: field.clone(),
            reason: format!("unreadable: {e}"),
        })?;
        users.push(wire::identity_key(&field, key)?);
    }
    Ok(users)
}

/// Counts a call as in flight, for its session and for shutdown, until
/// dropped.
struct CallGuard {
    _token: TaskTrackerToken,
    session_calls: LocalRc<Cell<usize>>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.session_calls.set(self.session_calls.get() - 1);
    }
}

impl node_capnp::node_service::Server for NodeServiceImpl {
    async fn ping(
        self: Rc<Self>,
        _: node_capnp::node_service::PingParams,
        mut results: node_capnp::node_service::PingResults,
    ) -> Result<(), capnp::Error> {
        observed("ping", async move {
            self.shared
                .rate_limits
                .check_ping(self.caller())
                .map_err(ServiceError::RateLimited)?;
            let mut info = results.get().init_info();
            info.set_version(env!("CARGO_PKG_VERSION"));
            info.set_protocol_version(PROTOCOL_VERSION);
            info.set_max_payload_bytes(u32::try_from(self.shared.max_payload).unwrap_or(u32::MAX));
            info.set_instance_id(&self.shared.store.instance_id());
            Ok("ok")
        })
        .await
    }
}

impl auth_capnp::auth_service::Server for NodeServiceImpl {
    async fn upload_key_package(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadKeyPackageParams,
        mut results: auth_capnp::auth_service::UploadKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        observed("uploadKeyPackage", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let identity =
                wire::identity_key("identityKey", params.get_identity_key()?).map_err(ServiceError::from)?;
            self.require_owner("identityKey", &identity)?;
            if let Some(refused) = self.limit_uploads(&identity, 1)? {
                let label = refused.label();
                refused.write(results.get().init_outcome());
                return Ok(label);
            }
            let received = params.get_package()?.to_vec();
            let (packages, digests) = self.check_key_packages(identity, vec![received], None).await?;
            let outcome = self.store_key_packages(identity, packages).await?;
            let mut results = results.get();
            if outcome == UploadOutcome::Stored
                && let Some(digest) = digests.first()
            {
                results.set_fingerprint(digest);
            }
            let label = outcome.label();
            outcome.write(results.init_outcome());
            Ok(label)
        })
        .await
    }

    async fn upload_key_packages(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadKeyPackagesParams,
        mut results: auth_capnp::auth_service::UploadKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        observed("uploadKeyPackages", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let identity =
                wire::identity_key("identityKey", params.get_identity_key()?).map_err(ServiceError::from)?;
            self.require_owner("identityKey", &identity)?;
            let list = params.get_packages()?;
            if list.is_empty() || list.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
                return Err(ServiceError::from(wire::FieldError {
                    field: "packages".into(),
                    reason: format!(
                        "must hold 1 to {MAX_KEY_PACKAGES_PER_UPLOAD} KeyPackages, got {}",
                        list.len()
                    ),
                })
                .into());
            }
            if let Some(refused) = self.limit_uploads(&identity, list.len())? {
                let label = refused.label();
                refused.write(results.get().init_outcome());
                return Ok(label);
            }
            let received = list
                .iter()
                .map(|bytes| bytes.map(<[u8]>::to_vec))
                .collect::<Result<Vec<_>, _>>()?;
            let (packages, digests) = self
                .check_key_packages(identity, received, Some("packages"))
                .await?;
            let outcome = self.store_key_packages(identity, packages).await?;
            let mut results = results.get();
            if outcome == UploadOutcome::Stored {
                let mut list = results.reborrow().init_fingerprints(digests.len() as u32);
                for (index, digest) in digests.iter().enumerate() {
                    list.set(index as u32, digest);
                }
            }
            let label = outcome.label();
            outcome.write(results.init_outcome());
            Ok(label)
        })
        .await
    }

    async fn key_package_count(
        self: Rc<Self>,
        params: auth_capnp::auth_service::KeyPackageCountParams,
        mut results: auth_capnp::auth_service::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        observed("keyPackageCount", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let identity =
                wire::identity_key("identityKey", params.get_identity_key()?).map_err(ServiceError::from)?;
            let suite =
                wire::ciphersuite("ciphersuite", params.get_ciphersuite()).map_err(ServiceError::from)?;
            self.require_owner("identityKey", &identity)?;
            let (count, has_last_resort) = self
                .shared
                .store
                .count_key_packages(identity, suite)
                .await
                .map_err(ServiceError::from)?;
            let mut results = results.get();
            results.set_count(count);
            results.set_has_last_resort(has_last_resort);
            Ok("ok")
        })
        .await
    }

    async fn fetch_key_package(
        self: Rc<Self>,
        params: auth_capnp::auth_service::FetchKeyPackageParams,
        mut results: auth_capnp::auth_service::FetchKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchKeyPackage", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let identity =
                wire::identity_key("identityKey", params.get_identity_key()?).map_err(ServiceError::from)?;
            let suite =
                wire::ciphersuite("ciphersuite", params.get_ciphersuite()).map_err(ServiceError::from)?;
            let outcome = match self.shared.rate_limits.check_key_package_fetch(self.caller()) {
                Err(retry_after) => FetchedKeyPackage::RateLimited(RateLimited { retry_after }),
                Ok(()) => match self
                    .shared
                    .store
                    .take_key_package(
                        identity,
                        suite,
                        self.shared
                            .rate_limits
                            .may_serve_ordinary_key_package(&identity, suite),
                    )
                    .await
                    .map_err(ServiceError::from)?
                {
                    Some(package) => FetchedKeyPackage::Package(package),
                    None => FetchedKeyPackage::None,
                },
            };
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn upload_device_list(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadDeviceListParams,
        mut results: auth_capnp::auth_service::UploadDeviceListResults,
    ) -> Result<(), capnp::Error> {
        observed("uploadDeviceList", async move {
            let _call = self.begin()?;
            let caller = self.peer.ok_or_else(|| {
                ServiceError::PermissionDenied(
                    "uploading a device list needs a connection authenticated as one of the user's devices (a TLS client certificate for its key)"
                        .into(),
                )
            })?;
            let list = wire::read_device_list("list", params.get()?.get_list()?).map_err(ServiceError::from)?;
            let outcome = self.store_device_list(caller, list).await?;
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn fetch_device_lists(
        self: Rc<Self>,
        params: auth_capnp::auth_service::FetchDeviceListsParams,
        mut results: auth_capnp::auth_service::FetchDeviceListsResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchDeviceLists", async move {
            let _call = self.begin()?;
            let users = user_keys(params.get()?.get_user_keys()?)?;
            // One fetch whatever the number of users: a client asks for a
            // group's worth in one call. The answer has no outcome to carry a
            // rate limit, so it is an exception, as for pings.
            self.shared
                .rate_limits
                .check_key_package_fetch(self.caller())
                .map_err(ServiceError::RateLimited)?;
            let lists = self
                .shared
                .store
                .device_lists(users)
                .await
                .map_err(ServiceError::from)?;
            // At most MAX_DEVICE_LIST_FETCH: fits a list length.
            let mut list = results.get().init_lists(lists.len() as u32);
            for (index, signed) in lists.iter().enumerate() {
                wire::write_device_list(signed, list.reborrow().get(index as u32));
            }
            Ok("ok")
        })
        .await
    }
}

impl delivery_capnp::delivery_service::Server for NodeServiceImpl {
    async fn enqueue(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::EnqueueParams,
        mut results: delivery_capnp::delivery_service::EnqueueResults,
    ) -> Result<(), capnp::Error> {
        observed("enqueue", async move {
            let _call = self.begin()?;
            let sender = self.require_authenticated()?;
            let params = params.get()?;
            let recipient = wire::identity_key("recipientKey", params.get_recipient_key()?)
                .map_err(ServiceError::from)?;
            let payload = wire::payload("payload", params.get_payload()?, self.shared.max_payload)
                .map_err(ServiceError::from)?;
            let message_id =
                wire::message_id("messageId", params.get_message_id()?).map_err(ServiceError::from)?;
            // Charged before the payload is copied: a flood over the budget
            // costs no copies.
            let cost = Cost {
                messages: 1,
                bytes: payload.len() as u64,
            };
            let outcome = match self.shared.rate_limits.check_send(self.caller(), cost, false) {
                Err(refusal) => refused_send(refusal),
                Ok(()) => send_outcome(
                    self.shared
                        .store
                        .enqueue(sender, recipient, payload.to_vec(), message_id)
                        .await
                        .map_err(ServiceError::from)?,
                ),
            };
            if outcome == SendOutcome::Accepted {
                ::metrics::counter!(metrics::MESSAGES_ENQUEUED).increment(1);
            }
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn enqueue_batch(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::EnqueueBatchParams,
        mut results: delivery_capnp::delivery_service::EnqueueBatchResults,
    ) -> Result<(), capnp::Error> {
        observed("enqueueBatch", async move {
            let _call = self.begin()?;
            let sender = self.require_authenticated()?;
            let envelopes = wire::envelopes(params.get()?.get_envelopes()?, self.shared.max_payload)
                .map_err(ServiceError::from)?;
            let messages: u64 = envelopes
                .iter()
                .map(|envelope| envelope.recipients.len() as u64)
                .sum();
            let outcome = match self.charge_sends(&envelopes, 0, 0, false) {
                Err(refusal) => refused_send(refusal),
                Ok(()) => send_outcome(
                    self.shared
                        .store
                        .enqueue_batch(sender, envelopes)
                        .await
                        .map_err(ServiceError::from)?,
                ),
            };
            if outcome == SendOutcome::Accepted {
                ::metrics::counter!(metrics::MESSAGES_ENQUEUED).increment(messages);
            }
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn publish_commit(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::PublishCommitParams,
        mut results: delivery_capnp::delivery_service::PublishCommitResults,
    ) -> Result<(), capnp::Error> {
        observed("publishCommit", async move {
            let _call = self.begin()?;
            let sender = self.require_authenticated()?;
            let publication = wire::commit_publication(params.get()?, self.shared.max_payload)
                .map_err(ServiceError::from)?;
            let extra = publication.group_info.as_ref().map_or(0, Vec::len)
                + publication
                    .initial_state
                    .as_ref()
                    .map_or(0, |state| state.group_info.len() + state.ratchet_tree.len());
            let messages: u64 = std::iter::once(&publication.commit)
                .chain(publication.welcome.as_ref())
                .map(|envelope| envelope.recipients.len() as u64)
                .sum();
            let rejoin = wire::is_external_commit(&publication.commit.payload);
            let outcome = match self.charge_change(
                std::iter::once(&publication.commit).chain(publication.welcome.as_ref()),
                extra,
            ) {
                Err(limited) => CommitOutcome::RateLimited(limited),
                Ok(()) => match self
                    .shared
                    .store
                    .publish_commit(sender, publication)
                    .await
                    .map_err(ServiceError::from)?
                {
                    Ok(()) => CommitOutcome::Accepted,
                    Err(CommitRefusal::Conflict { current_epoch }) => {
                        CommitOutcome::Conflict { current_epoch }
                    }
                    Err(CommitRefusal::QueueFull(full)) => CommitOutcome::QueueFull(full),
                    Err(CommitRefusal::Invalid { reason }) => CommitOutcome::Invalid { reason },
                    Err(CommitRefusal::UnknownGroup) => CommitOutcome::UnknownGroup,
                    // Proposals only; a Commit frees the count.
                    Err(CommitRefusal::TooManyProposals { .. }) => {
                        return Err(
                            ServiceError::Internal("a Commit refused for too many proposals".into()).into(),
                        );
                    }
                },
            };
            if outcome == CommitOutcome::Accepted {
                ::metrics::counter!(metrics::MESSAGES_ENQUEUED).increment(messages);
                if rejoin {
                    ::metrics::counter!(metrics::REJOINS).increment(1);
                }
            }
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn fetch_group_info(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchGroupInfoParams,
        mut results: delivery_capnp::delivery_service::FetchGroupInfoResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchGroupInfo", async move {
            let _call = self.begin()?;
            let caller = self.require_authenticated()?;
            let group =
                wire::group_id("groupId", params.get()?.get_group_id()?).map_err(ServiceError::from)?;
            let outcome = match self
                .shared
                .store
                .group_info(group, caller)
                .await
                .map_err(ServiceError::from)?
            {
                Ok(Some(state)) => FetchedGroupInfo::State(state),
                Ok(None) => FetchedGroupInfo::Unavailable,
                Err(NotAMember) => FetchedGroupInfo::NotMember,
            };
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn fetch_welcome_tree(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchWelcomeTreeParams,
        mut results: delivery_capnp::delivery_service::FetchWelcomeTreeResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchWelcomeTree", async move {
            let _call = self.begin()?;
            let caller = self.require_authenticated()?;
            let params = params.get()?;
            let group = wire::group_id("groupId", params.get_group_id()?).map_err(ServiceError::from)?;
            let outcome = match self
                .shared
                .store
                .welcome_tree(group, params.get_epoch(), caller)
                .await
                .map_err(ServiceError::from)?
            {
                Some(tree) => FetchedWelcomeTree::Tree(tree),
                None => FetchedWelcomeTree::Unavailable,
            };
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn publish_proposal(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::PublishProposalParams,
        mut results: delivery_capnp::delivery_service::PublishProposalResults,
    ) -> Result<(), capnp::Error> {
        observed("publishProposal", async move {
            let _call = self.begin()?;
            let sender = self.require_authenticated()?;
            let publication = wire::proposal_publication(params.get()?, self.shared.max_payload)
                .map_err(ServiceError::from)?;
            let messages = publication.proposal.recipients.len() as u64;
            let outcome = match self.charge_change([&publication.proposal], 0) {
                Err(limited) => ProposalOutcome::RateLimited(limited),
                Ok(()) => match self
                    .shared
                    .store
                    .publish_proposal(sender, publication)
                    .await
                    .map_err(ServiceError::from)?
                {
                    Ok(()) => ProposalOutcome::Accepted,
                    Err(CommitRefusal::Conflict { current_epoch }) => {
                        ProposalOutcome::Conflict { current_epoch }
                    }
                    Err(CommitRefusal::QueueFull(full)) => ProposalOutcome::QueueFull(full),
                    Err(CommitRefusal::Invalid { reason }) => ProposalOutcome::Invalid { reason },
                    Err(CommitRefusal::UnknownGroup) => ProposalOutcome::UnknownGroup,
                    Err(CommitRefusal::TooManyProposals { max }) => ProposalOutcome::TooManyProposals { max },
                },
            };
            if outcome == ProposalOutcome::Accepted {
                ::metrics::counter!(metrics::MESSAGES_ENQUEUED).increment(messages);
            }
            let label = outcome.label();
            outcome.write(results.get().init_outcome());
            Ok(label)
        })
        .await
    }

    async fn subscribe(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::SubscribeParams,
        mut results: delivery_capnp::delivery_service::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        observed("subscribe", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let recipient = wire::identity_key("recipientKey", params.get_recipient_key()?)
                .map_err(ServiceError::from)?;
            self.require_owner("recipientKey", &recipient)?;
            let receiver = params.get_receiver()?;
            if self.subscriptions.get() >= MAX_SUBSCRIPTIONS_PER_SESSION {
                return Err(ServiceError::TooManyCalls(MAX_SUBSCRIPTIONS_PER_SESSION).into());
            }
            self.subscriptions.set(self.subscriptions.get() + 1);
            let live = SubscriptionCount(self.subscriptions.clone());
            let (cancel, cancelled) = oneshot::channel();
            let (store, after) = (self.shared.store.clone(), Seq::new(params.get_after_seq()));
            let open = GaugeGuard::new(metrics::SUBSCRIPTIONS_OPEN);
            let session = self.session.clone();
            // In the connection's span, so its push lines name the peer too.
            tokio::task::spawn_local(
                async move {
                    let subscriber = push::Subscriber {
                        receiver,
                        memory: session.pushes.clone(),
                        stall_timeout: session.stall_timeout,
                        most: session.push_bound,
                    };
                    if push::push(store, recipient, after, subscriber, cancelled).await
                        == push::Ended::Stalled
                    {
                        (session.close)();
                    }
                    drop((live, open));
                }
                .in_current_span(),
            );
            results
                .get()
                .set_subscription(capnp_rpc::new_client(SubscriptionImpl { _cancel: cancel }));
            Ok("ok")
        })
        .await
    }

    async fn fetch_wait(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchWaitParams,
        mut results: delivery_capnp::delivery_service::FetchWaitResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchWait", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let recipient = wire::identity_key("recipientKey", params.get_recipient_key()?)
                .map_err(ServiceError::from)?;
            self.require_owner("recipientKey", &recipient)?;
            let messages = push::wait_for_messages(
                &self.shared.store,
                recipient,
                Seq::new(params.get_after_seq()),
                params.get_limit() as usize,
                Duration::from_millis(u64::from(params.get_timeout_ms())),
            )
            .await
            .map_err(ServiceError::from)?;
            wire::fill_messages(results.get().init_messages(messages.len() as u32), &messages);
            Ok("ok")
        })
        .await
    }

    async fn fetch_since(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchSinceParams,
        mut results: delivery_capnp::delivery_service::FetchSinceResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchSince", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let recipient = wire::identity_key("recipientKey", params.get_recipient_key()?)
                .map_err(ServiceError::from)?;
            self.require_owner("recipientKey", &recipient)?;
            let messages = self
                .shared
                .store
                .messages_after(
                    recipient,
                    Seq::new(params.get_after_seq()),
                    params.get_limit() as usize,
                )
                .await
                .map_err(ServiceError::from)?;
            // At most FETCH_MAX_MESSAGES: fits a list length.
            wire::fill_messages(results.get().init_messages(messages.len() as u32), &messages);
            Ok("ok")
        })
        .await
    }

    async fn ack(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::AckParams,
        _: delivery_capnp::delivery_service::AckResults,
    ) -> Result<(), capnp::Error> {
        observed("ack", async move {
            let _call = self.begin()?;
            let params = params.get()?;
            let recipient = wire::identity_key("recipientKey", params.get_recipient_key()?)
                .map_err(ServiceError::from)?;
            self.require_owner("recipientKey", &recipient)?;
            let acked = self
                .shared
                .store
                .ack(recipient, Seq::new(params.get_up_to_seq()))
                .await
                .map_err(ServiceError::from)?;
            ::metrics::counter!(metrics::MESSAGES_ACKED).increment(acked as u64);
            Ok("ok")
        })
        .await
    }

    async fn fetch(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchParams,
        mut results: delivery_capnp::delivery_service::FetchResults,
    ) -> Result<(), capnp::Error> {
        observed("fetch", async move {
            let _call = self.begin()?;
            let recipient = wire::identity_key("recipientKey", params.get()?.get_recipient_key()?)
                .map_err(ServiceError::from)?;
            self.require_owner("recipientKey", &recipient)?;
            let payloads = self
                .shared
                .store
                .drain(recipient)
                .await
                .map_err(ServiceError::from)?;
            // At most FETCH_MAX_MESSAGES: fits a list length.
            let mut list = results.get().init_payloads(payloads.len() as u32);
            for (index, payload) in payloads.iter().enumerate() {
                list.set(index as u32, payload);
            }
            Ok("ok")
        })
        .await
    }
}

/// Answers a call with `body`, then counts it under `method` with the
/// outcome `body` names (or `error` for an exception), and times it.
async fn observed(
    method: &'static str,
    body: impl Future<Output = Result<&'static str, capnp::Error>>,
) -> Result<(), capnp::Error> {
    let started = Instant::now();
    let result = body.await;
    let outcome = result.as_ref().map_or("error", |label| label);
    metrics::record_call(method, outcome, started);
    result.map(drop)
}

/// The `outcome` label of a typed result: `ok`, or the refusal's kind in
/// snake case; `none` and `unavailable` (nothing to hand out) are answers,
/// not refusals (see [`metrics::NOT_REFUSALS`]).
trait Label {
    fn label(&self) -> &'static str;
}

impl Label for SendOutcome {
    fn label(&self) -> &'static str {
        match self {
            SendOutcome::Accepted => "ok",
            SendOutcome::RateLimited(_) => "rate_limited",
            SendOutcome::QueueFull(_) => "queue_full",
            SendOutcome::TooLarge(_) => "too_large",
            SendOutcome::StaleEpoch(_) => "stale_epoch",
            SendOutcome::Handshake => "handshake",
        }
    }
}

impl Label for UploadOutcome {
    fn label(&self) -> &'static str {
        match self {
            UploadOutcome::Stored => "ok",
            UploadOutcome::RateLimited(_) => "rate_limited",
            UploadOutcome::TooMany { .. } => "too_many",
        }
    }
}

impl Label for DeviceListOutcome {
    fn label(&self) -> &'static str {
        match self {
            DeviceListOutcome::Stored => "ok",
            DeviceListOutcome::Stale { .. } => "stale",
            DeviceListOutcome::BadSignature => "bad_signature",
            DeviceListOutcome::NotADevice => "not_a_device",
            DeviceListOutcome::TooFar { .. } => "too_far",
            DeviceListOutcome::RemovedDevice => "removed_device",
            DeviceListOutcome::RateLimited(_) => "rate_limited",
        }
    }
}

impl Label for CommitOutcome {
    fn label(&self) -> &'static str {
        match self {
            CommitOutcome::Accepted => "ok",
            CommitOutcome::Conflict { .. } => "conflict",
            CommitOutcome::RateLimited(_) => "rate_limited",
            CommitOutcome::QueueFull(_) => "queue_full",
            CommitOutcome::Invalid { .. } => "invalid",
            CommitOutcome::UnknownGroup => "unknown_group",
        }
    }
}

impl Label for ProposalOutcome {
    fn label(&self) -> &'static str {
        match self {
            ProposalOutcome::Accepted => "ok",
            ProposalOutcome::Conflict { .. } => "conflict",
            ProposalOutcome::RateLimited(_) => "rate_limited",
            ProposalOutcome::QueueFull(_) => "queue_full",
            ProposalOutcome::Invalid { .. } => "invalid",
            ProposalOutcome::UnknownGroup => "unknown_group",
            ProposalOutcome::TooManyProposals { .. } => "too_many_proposals",
        }
    }
}

impl Label for FetchedGroupInfo {
    fn label(&self) -> &'static str {
        match self {
            FetchedGroupInfo::State(_) => "ok",
            FetchedGroupInfo::Unavailable => "unavailable",
            FetchedGroupInfo::NotMember => "not_member",
        }
    }
}

impl Label for FetchedWelcomeTree {
    fn label(&self) -> &'static str {
        match self {
            FetchedWelcomeTree::Tree(_) => "ok",
            FetchedWelcomeTree::Unavailable => "unavailable",
        }
    }
}

impl Label for FetchedKeyPackage {
    fn label(&self) -> &'static str {
        match self {
            FetchedKeyPackage::Package(_) => "ok",
            FetchedKeyPackage::None => "none",
            FetchedKeyPackage::RateLimited(_) => "rate_limited",
        }
    }
}

/// The wire outcome of an enqueue the store accepted or refused.
fn send_outcome(outcome: Result<(), SendRefusal>) -> SendOutcome {
    match outcome {
        Ok(()) => SendOutcome::Accepted,
        Err(SendRefusal::QueueFull(full)) => SendOutcome::QueueFull(full),
        Err(SendRefusal::StaleEpoch(stale)) => SendOutcome::StaleEpoch(stale),
        Err(SendRefusal::Handshake) => SendOutcome::Handshake,
    }
}

/// The outcome of a send the budget refused.
fn refused_send(refusal: limits::SendRefusal) -> SendOutcome {
    match refusal {
        limits::SendRefusal::Wait(retry_after) => SendOutcome::RateLimited(RateLimited { retry_after }),
        limits::SendRefusal::TooLarge {
            max_messages,
            max_bytes,
        } => SendOutcome::TooLarge(TooLarge {
            max_messages: u32::try_from(max_messages).unwrap_or(u32::MAX),
            max_bytes,
        }),
    }
}

/// Most live subscriptions one session may hold: each pins a push task.
const MAX_SUBSCRIPTIONS_PER_SESSION: usize = 4;

/// Counts a live subscription of a session until its push task ends.
struct SubscriptionCount(LocalRc<Cell<usize>>);

impl Drop for SubscriptionCount {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A live push subscription; dropping it (or the connection) ends the push.
struct SubscriptionImpl {
    _cancel: oneshot::Sender<()>,
}

impl delivery_capnp::subscription::Server for SubscriptionImpl {}
