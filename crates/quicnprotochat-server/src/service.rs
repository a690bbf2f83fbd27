//! The `NodeService` RPC adapter. Each method parses its parameters into
//! domain types, makes one store call and fills the results; all storage
//! logic lives in [`crate::store`].

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc as LocalRc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use capnp::capability::Rc;
use quicnprotochat_core::{IdentityKey, fingerprint};
use quicnprotochat_proto::wire;
use quicnprotochat_proto::{PROTOCOL_VERSION, auth_capnp, delivery_capnp, node_capnp};
use tokio::sync::oneshot;

use crate::error::ServiceError;
use crate::limits::{Caller, RateLimits};
use crate::store::{QueueWatch, Store};

/// State shared by every connection's service object.
#[derive(Debug)]
pub struct Shared {
    /// The store all calls go to.
    pub store: Store,
    /// Largest payload accepted, in bytes.
    pub max_payload: usize,
    /// Calls currently being answered; shutdown waits for this to reach zero.
    pub in_flight: AtomicUsize,
    /// Set at shutdown: new calls are refused so in-flight ones can finish.
    pub draining: AtomicBool,
    /// Connections currently open; shutdown gives them a moment to hang up
    /// on their own so answers already sent are not cut off.
    pub connections: AtomicUsize,
    /// Per-caller rate limits.
    pub rate_limits: RateLimits,
}

/// Most KeyPackages one `uploadKeyPackages` call may carry.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: u32 = 1000;

/// Most calls one RPC session may have unanswered at once. capnp-rpc reads
/// every incoming call as it arrives, so without a cap one peer could pile
/// up payloads in memory faster than the store commits them.
pub const MAX_CALLS_PER_SESSION: usize = 256;

impl Shared {
    /// Shared state over `store`.
    pub fn new(store: Store, max_payload: usize, rate_limits: RateLimits) -> Arc<Self> {
        Arc::new(Self {
            store,
            max_payload,
            rate_limits,
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        })
    }
}

/// The bootstrap capability served on each connection.
pub struct NodeServiceImpl {
    shared: Arc<Shared>,
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
    pub fn new(shared: Arc<Shared>, peer: Option<IdentityKey>, remote: IpAddr) -> Self {
        Self {
            shared,
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
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        self.session_calls.set(self.session_calls.get() + 1);
        let guard = CallGuard {
            shared: self.shared.clone(),
            session_calls: self.session_calls.clone(),
        };
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(ServiceError::ShuttingDown);
        }
        Ok(guard)
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

    /// Charges `messages` queued messages to this caller's send rate.
    fn limit_sends(&self, messages: usize) -> Result<(), ServiceError> {
        self.shared
            .rate_limits
            .check_enqueue(self.caller(), messages)
            .map_err(ServiceError::RateLimited)
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
}

/// Counts a call as in flight until dropped.
struct CallGuard {
    shared: Arc<Shared>,
    session_calls: LocalRc<Cell<usize>>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.session_calls.set(self.session_calls.get() - 1);
    }
}

impl node_capnp::node_service::Server for NodeServiceImpl {
    async fn ping(
        self: Rc<Self>,
        _: node_capnp::node_service::PingParams,
        mut results: node_capnp::node_service::PingResults,
    ) -> Result<(), capnp::Error> {
        self.shared
            .rate_limits
            .check_ping(self.caller())
            .map_err(ServiceError::RateLimited)?;
        let mut info = results.get().init_info();
        info.set_version(env!("CARGO_PKG_VERSION"));
        info.set_protocol_version(PROTOCOL_VERSION);
        info.set_max_payload_bytes(u32::try_from(self.shared.max_payload).unwrap_or(u32::MAX));
        info.set_instance_id(&self.shared.store.instance_id());
        Ok(())
    }
}

impl auth_capnp::auth_service::Server for NodeServiceImpl {
    async fn upload_key_package(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadKeyPackageParams,
        mut results: auth_capnp::auth_service::UploadKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let params = params.get()?;
        let identity =
            wire::identity_key("identityKey", params.get_identity_key()?).map_err(ServiceError::from)?;
        self.require_owner("identityKey", &identity)?;
        let package = wire::key_package(
            "package",
            params.get_package()?,
            self.shared.max_payload,
            &identity,
        )
        .map_err(ServiceError::from)?;
        let digest = fingerprint(&package.bytes);
        self.shared
            .store
            .upload_key_packages(identity, vec![package])
            .await
            .map_err(ServiceError::from)?;
        results.get().set_fingerprint(&digest);
        Ok(())
    }

    async fn upload_key_packages(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadKeyPackagesParams,
        mut results: auth_capnp::auth_service::UploadKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
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
        let mut packages = Vec::with_capacity(list.len() as usize);
        for (index, bytes) in list.iter().enumerate() {
            let field = format!("packages[{index}]");
            packages.push(
                wire::key_package(&field, bytes?, self.shared.max_payload, &identity)
                    .map_err(ServiceError::from)?,
            );
        }
        let digests: Vec<[u8; 32]> = packages
            .iter()
            .map(|package| fingerprint(&package.bytes))
            .collect();
        self.shared
            .store
            .upload_key_packages(identity, packages)
            .await
            .map_err(ServiceError::from)?;
        let mut list = results.get().init_fingerprints(digests.len() as u32);
        for (index, digest) in digests.iter().enumerate() {
            list.set(index as u32, digest);
        }
        Ok(())
    }

    async fn key_package_count(
        self: Rc<Self>,
        params: auth_capnp::auth_service::KeyPackageCountParams,
        mut results: auth_capnp::auth_service::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let identity = wire::identity_key("identityKey", params.get()?.get_identity_key()?)
            .map_err(ServiceError::from)?;
        self.require_owner("identityKey", &identity)?;
        let (count, has_last_resort) = self
            .shared
            .store
            .count_key_packages(identity)
            .await
            .map_err(ServiceError::from)?;
        let mut results = results.get();
        results.set_count(count);
        results.set_has_last_resort(has_last_resort);
        Ok(())
    }

    async fn fetch_key_package(
        self: Rc<Self>,
        params: auth_capnp::auth_service::FetchKeyPackageParams,
        mut results: auth_capnp::auth_service::FetchKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let identity = wire::identity_key("identityKey", params.get()?.get_identity_key()?)
            .map_err(ServiceError::from)?;
        self.shared
            .rate_limits
            .check_key_package_fetch(self.caller())
            .map_err(ServiceError::RateLimited)?;
        let package = self
            .shared
            .store
            .take_key_package(identity)
            .await
            .map_err(ServiceError::from)?;
        results.get().set_package(package.as_deref().unwrap_or_default());
        Ok(())
    }
}

impl delivery_capnp::delivery_service::Server for NodeServiceImpl {
    async fn enqueue(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::EnqueueParams,
        _: delivery_capnp::delivery_service::EnqueueResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        // Before copying the payload: a flood over the rate costs no copies.
        self.limit_sends(1)?;
        let params = params.get()?;
        let recipient =
            wire::identity_key("recipientKey", params.get_recipient_key()?).map_err(ServiceError::from)?;
        let payload = wire::payload("payload", params.get_payload()?, self.shared.max_payload)
            .map_err(ServiceError::from)?
            .to_vec();
        let message_id =
            wire::message_id("messageId", params.get_message_id()?).map_err(ServiceError::from)?;
        self.shared
            .store
            .enqueue(sender, recipient, payload, message_id)
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    async fn enqueue_batch(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::EnqueueBatchParams,
        _: delivery_capnp::delivery_service::EnqueueBatchResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        let envelopes = wire::envelopes(params.get()?.get_envelopes()?, self.shared.max_payload)
            .map_err(ServiceError::from)?;
        let messages = envelopes.iter().map(|envelope| envelope.recipients.len()).sum();
        self.limit_sends(messages)?;
        self.shared
            .store
            .enqueue_batch(sender, envelopes)
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    async fn publish_commit(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::PublishCommitParams,
        _: delivery_capnp::delivery_service::PublishCommitResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let sender = self.require_authenticated()?;
        let publication =
            wire::commit_publication(params.get()?, self.shared.max_payload).map_err(ServiceError::from)?;
        let messages = publication.commit.recipients.len()
            + publication
                .welcome
                .as_ref()
                .map_or(0, |welcome| welcome.recipients.len());
        self.limit_sends(messages)?;
        self.shared
            .store
            .publish_commit(sender, publication)
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    async fn subscribe(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::SubscribeParams,
        mut results: delivery_capnp::delivery_service::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let params = params.get()?;
        let recipient =
            wire::identity_key("recipientKey", params.get_recipient_key()?).map_err(ServiceError::from)?;
        self.require_owner("recipientKey", &recipient)?;
        let receiver = params.get_receiver()?;
        if self.subscriptions.get() >= MAX_SUBSCRIPTIONS_PER_SESSION {
            return Err(ServiceError::TooManyCalls(MAX_SUBSCRIPTIONS_PER_SESSION).into());
        }
        self.subscriptions.set(self.subscriptions.get() + 1);
        let live = SubscriptionCount(self.subscriptions.clone());
        let (cancel, cancelled) = oneshot::channel();
        let watch = self.shared.store.notifier().watch(recipient);
        let (shared, after) = (self.shared.clone(), params.get_after_seq());
        tokio::task::spawn_local(async move {
            push(shared, recipient, after, receiver, watch, cancelled).await;
            drop(live);
        });
        results
            .get()
            .set_subscription(capnp_rpc::new_client(SubscriptionImpl { _cancel: cancel }));
        Ok(())
    }

    async fn fetch_wait(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchWaitParams,
        mut results: delivery_capnp::delivery_service::FetchWaitResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let params = params.get()?;
        let recipient =
            wire::identity_key("recipientKey", params.get_recipient_key()?).map_err(ServiceError::from)?;
        self.require_owner("recipientKey", &recipient)?;
        let after = params.get_after_seq();
        let limit = params.get_limit() as usize;
        let wait = Duration::from_millis(u64::from(params.get_timeout_ms().min(MAX_WAIT_MS)));
        let deadline = tokio::time::Instant::now() + wait;
        let mut watch = self.shared.store.notifier().watch(recipient);
        let messages = loop {
            watch.mark_seen();
            let messages = self
                .shared
                .store
                .messages_after(recipient, after, limit)
                .await
                .map_err(ServiceError::from)?;
            if !messages.is_empty() {
                break messages;
            }
            match tokio::time::timeout_at(deadline, watch.changed()).await {
                Ok(true) => continue,
                // Timed out, or the node is shutting down: answer empty.
                _ => break messages,
            }
        };
        fill_messages(results.get().init_messages(messages.len() as u32), &messages);
        Ok(())
    }

    async fn fetch_since(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchSinceParams,
        mut results: delivery_capnp::delivery_service::FetchSinceResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let params = params.get()?;
        let recipient =
            wire::identity_key("recipientKey", params.get_recipient_key()?).map_err(ServiceError::from)?;
        self.require_owner("recipientKey", &recipient)?;
        let messages = self
            .shared
            .store
            .messages_after(recipient, params.get_after_seq(), params.get_limit() as usize)
            .await
            .map_err(ServiceError::from)?;
        fill_messages(results.get().init_messages(messages.len() as u32), &messages);
        Ok(())
    }

    async fn ack(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::AckParams,
        _: delivery_capnp::delivery_service::AckResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.begin()?;
        let params = params.get()?;
        let recipient =
            wire::identity_key("recipientKey", params.get_recipient_key()?).map_err(ServiceError::from)?;
        self.require_owner("recipientKey", &recipient)?;
        self.shared
            .store
            .ack(recipient, params.get_up_to_seq())
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    async fn fetch(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchParams,
        mut results: delivery_capnp::delivery_service::FetchResults,
    ) -> Result<(), capnp::Error> {
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
        let length =
            u32::try_from(payloads.len()).map_err(|_| capnp::Error::failed("too many messages".into()))?;
        let mut list = results.get().init_payloads(length);
        for (index, payload) in payloads.iter().enumerate() {
            list.set(index as u32, payload);
        }
        Ok(())
    }
}

/// Longest a long poll waits.
const MAX_WAIT_MS: u32 = 60_000;

/// Most messages in one push.
const PUSH_BATCH: usize = 256;

fn fill_messages(
    mut list: capnp::struct_list::Builder<'_, delivery_capnp::queued_message::Owned>,
    messages: &[(u64, Vec<u8>)],
) {
    for (index, (seq, payload)) in messages.iter().enumerate() {
        let mut entry = list.reborrow().get(index as u32);
        entry.set_seq(*seq);
        entry.set_payload(payload);
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

/// Pushes the queue of `recipient` after `after` to `receiver`, one
/// `deliver` call at a time, waking on commits, until cancelled, the
/// receiver fails or the node shuts down.
async fn push(
    shared: Arc<Shared>,
    recipient: IdentityKey,
    mut after: u64,
    receiver: delivery_capnp::message_receiver::Client,
    mut watch: QueueWatch,
    mut cancelled: oneshot::Receiver<()>,
) {
    loop {
        watch.mark_seen();
        let messages = match shared.store.messages_after(recipient, after, PUSH_BATCH).await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::debug!("push to {}: {e}", recipient.short());
                return;
            }
        };
        if let Some(&(last, _)) = messages.last() {
            let mut request = receiver.deliver_request();
            fill_messages(request.get().init_messages(messages.len() as u32), &messages);
            // The request holds its own copy; don't keep two while waiting.
            drop(messages);
            let delivered = tokio::select! {
                delivered = request.send().promise => delivered,
                _ = &mut cancelled => return,
            };
            if let Err(e) = delivered {
                tracing::debug!("push to {} ended: {e}", recipient.short());
                return;
            }
            after = last;
            continue;
        }
        tokio::select! {
            more = watch.changed() => if !more { return },
            _ = &mut cancelled => return,
        }
    }
}
