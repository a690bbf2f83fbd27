//! The `NodeService` RPC adapter. Each method reads its parameters into
//! domain types, calls one [`crate::api`] function and writes what it
//! returns: an expected outcome (rate limited, queue full, commit conflict,
//! no KeyPackage) as a typed value, a wrong call or a failure as an
//! exception. Who may call, the limits and the rules live in the API, the
//! storage in [`crate::store`]. Every method runs inside `observed`, which
//! counts the call by method and outcome (the typed result's
//! [`Label`], or `error` for an exception) and times it.

use std::future::Future;
use std::net::IpAddr;
use std::rc::Rc as LocalRc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp::capability::Rc;
use quicnprotochat_core::{IdentityKey, Seq};
use quicnprotochat_proto::memory::Account;
use quicnprotochat_proto::wire;
use quicnprotochat_proto::{auth_capnp, delivery_capnp, node_capnp};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::api::{Api, KeyPackageUpload, Shared};
use crate::error::ServiceError;
use crate::metrics::{self, Label};
use crate::push;

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
    api: Api,
    session: LocalRc<Session>,
}

impl NodeServiceImpl {
    /// A service object for one RPC session of a connection authenticated
    /// as `peer` (or anonymous), answering from `shared`.
    pub fn new(shared: Arc<Shared>, peer: Option<IdentityKey>, remote: IpAddr, session: Session) -> Self {
        Self {
            api: Api::new(shared, peer, remote),
            session: LocalRc::new(session),
        }
    }
}

/// A field's parse error, as the call's.
fn parsed<T>(result: Result<T, wire::FieldError>) -> Result<T, ServiceError> {
    result.map_err(ServiceError::from)
}

/// Reads `userKeys` of `fetchDeviceLists`, each 32 bytes (the API limits
/// how many).
fn user_keys(keys: capnp::data_list::Reader<'_>) -> Result<Vec<IdentityKey>, ServiceError> {
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

impl node_capnp::node_service::Server for NodeServiceImpl {
    async fn ping(
        self: Rc<Self>,
        _: node_capnp::node_service::PingParams,
        mut results: node_capnp::node_service::PingResults,
    ) -> Result<(), capnp::Error> {
        observed("ping", async move {
            let info = self.api.ping()?;
            info.write(results.get().init_info());
            Ok(info.label())
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
            let params = params.get()?;
            let identity = parsed(wire::identity_key("identityKey", params.get_identity_key()?))?;
            let package = KeyPackageUpload::One(params.get_package()?.to_vec());
            let uploaded = self.api.upload_key_packages(identity, package).await?;
            let mut results = results.get();
            if let Some(fingerprint) = uploaded.fingerprints.first() {
                results.set_fingerprint(fingerprint);
            }
            uploaded.outcome.write(results.init_outcome());
            Ok(uploaded.label())
        })
        .await
    }

    async fn upload_key_packages(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadKeyPackagesParams,
        mut results: auth_capnp::auth_service::UploadKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        observed("uploadKeyPackages", async move {
            let params = params.get()?;
            let identity = parsed(wire::identity_key("identityKey", params.get_identity_key()?))?;
            let packages = params
                .get_packages()?
                .iter()
                .map(|bytes| bytes.map(<[u8]>::to_vec))
                .collect::<Result<Vec<_>, _>>()?;
            let uploaded = self
                .api
                .upload_key_packages(identity, KeyPackageUpload::List(packages))
                .await?;
            let mut results = results.get();
            // At most MAX_KEY_PACKAGES_PER_UPLOAD: fits a list length.
            let mut list = results
                .reborrow()
                .init_fingerprints(uploaded.fingerprints.len() as u32);
            for (index, fingerprint) in uploaded.fingerprints.iter().enumerate() {
                list.set(index as u32, fingerprint);
            }
            uploaded.outcome.write(results.init_outcome());
            Ok(uploaded.label())
        })
        .await
    }

    async fn key_package_count(
        self: Rc<Self>,
        params: auth_capnp::auth_service::KeyPackageCountParams,
        mut results: auth_capnp::auth_service::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        observed("keyPackageCount", async move {
            let params = params.get()?;
            let identity = parsed(wire::identity_key("identityKey", params.get_identity_key()?))?;
            let suite = parsed(wire::ciphersuite("ciphersuite", params.get_ciphersuite()))?;
            let stock = self.api.key_package_count(identity, suite).await?;
            wire::write_key_package_stock(&stock, results.get());
            Ok(stock.label())
        })
        .await
    }

    async fn fetch_key_package(
        self: Rc<Self>,
        params: auth_capnp::auth_service::FetchKeyPackageParams,
        mut results: auth_capnp::auth_service::FetchKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchKeyPackage", async move {
            let params = params.get()?;
            let identity = parsed(wire::identity_key("identityKey", params.get_identity_key()?))?;
            let suite = parsed(wire::ciphersuite("ciphersuite", params.get_ciphersuite()))?;
            let outcome = self.api.fetch_key_package(identity, suite).await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn upload_device_list(
        self: Rc<Self>,
        params: auth_capnp::auth_service::UploadDeviceListParams,
        mut results: auth_capnp::auth_service::UploadDeviceListResults,
    ) -> Result<(), capnp::Error> {
        observed("uploadDeviceList", async move {
            let list = parsed(wire::read_device_list("list", params.get()?.get_list()?))?;
            let outcome = self.api.upload_device_list(list).await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn fetch_device_lists(
        self: Rc<Self>,
        params: auth_capnp::auth_service::FetchDeviceListsParams,
        mut results: auth_capnp::auth_service::FetchDeviceListsResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchDeviceLists", async move {
            let users = user_keys(params.get()?.get_user_keys()?)?;
            let lists = self.api.fetch_device_lists(users).await?;
            // At most MAX_DEVICE_LIST_FETCH: fits a list length.
            let mut list = results.get().init_lists(lists.len() as u32);
            for (index, signed) in lists.iter().enumerate() {
                wire::write_device_list(signed, list.reborrow().get(index as u32));
            }
            Ok(lists.label())
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
            let params = params.get()?;
            let recipient = parsed(wire::identity_key("recipientKey", params.get_recipient_key()?))?;
            let payload = parsed(wire::payload(
                "payload",
                params.get_payload()?,
                self.api.max_payload(),
            ))?;
            let message_id = parsed(wire::message_id("messageId", params.get_message_id()?))?;
            let outcome = self.api.enqueue(recipient, payload, message_id).await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn enqueue_batch(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::EnqueueBatchParams,
        mut results: delivery_capnp::delivery_service::EnqueueBatchResults,
    ) -> Result<(), capnp::Error> {
        observed("enqueueBatch", async move {
            let params = params.get()?;
            let envelopes = parsed(wire::envelopes(params.get_envelopes()?, self.api.max_payload()))?;
            let state_keys = parsed(wire::state_keys(params.get_state_keys()))?;
            let outcome = self.api.enqueue_batch(envelopes, state_keys).await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn publish_commit(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::PublishCommitParams,
        mut results: delivery_capnp::delivery_service::PublishCommitResults,
    ) -> Result<(), capnp::Error> {
        observed("publishCommit", async move {
            let publication = parsed(wire::commit_publication(params.get()?, self.api.max_payload()))?;
            let outcome = self.api.publish_commit(publication).await?;
            outcome.write_commit(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn fetch_group_info(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchGroupInfoParams,
        mut results: delivery_capnp::delivery_service::FetchGroupInfoResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchGroupInfo", async move {
            let params = params.get()?;
            let group = parsed(wire::group_id("groupId", params.get_group_id()?))?;
            let key = parsed(wire::state_key("stateKey", params.get_state_key()))?;
            let outcome = self.api.fetch_group_info(group, key).await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn fetch_welcome_tree(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchWelcomeTreeParams,
        mut results: delivery_capnp::delivery_service::FetchWelcomeTreeResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchWelcomeTree", async move {
            let params = params.get()?;
            let group = parsed(wire::group_id("groupId", params.get_group_id()?))?;
            let key = parsed(wire::epoch_key("epochKey", params.get_epoch_key()))?;
            let outcome = self
                .api
                .fetch_welcome_tree(group, params.get_epoch(), key)
                .await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn publish_proposal(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::PublishProposalParams,
        mut results: delivery_capnp::delivery_service::PublishProposalResults,
    ) -> Result<(), capnp::Error> {
        observed("publishProposal", async move {
            let publication = parsed(wire::proposal_publication(params.get()?, self.api.max_payload()))?;
            let outcome = self.api.publish_proposal(publication).await?;
            outcome.write_proposal(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn put_key_backup(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::PutKeyBackupParams,
        mut results: delivery_capnp::delivery_service::PutKeyBackupResults,
    ) -> Result<(), capnp::Error> {
        observed("putKeyBackup", async move {
            let params = params.get()?;
            let lookup = parsed(wire::backup_lookup("lookup", params.get_lookup()))?;
            let outcome = self
                .api
                .put_key_backup(lookup, params.get_backup()?.to_vec())
                .await?;
            outcome.write(results.get().init_outcome());
            Ok(outcome.label())
        })
        .await
    }

    async fn fetch_key_backup(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchKeyBackupParams,
        mut results: delivery_capnp::delivery_service::FetchKeyBackupResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchKeyBackup", async move {
            let lookup = parsed(wire::backup_lookup("lookup", params.get()?.get_lookup()))?;
            let backup = self.api.fetch_key_backup(lookup).await?;
            results.get().set_backup(&backup);
            Ok("ok")
        })
        .await
    }

    async fn subscribe(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::SubscribeParams,
        mut results: delivery_capnp::delivery_service::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        observed("subscribe", async move {
            let params = params.get()?;
            let recipient = parsed(wire::identity_key("recipientKey", params.get_recipient_key()?))?;
            let receiver = params.get_receiver()?;
            let subscription = self.api.subscribe(recipient, Seq::new(params.get_after_seq()))?;
            let label = subscription.label();
            let (cancel, cancelled) = oneshot::channel();
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
                    let (store, recipient, after) = (
                        subscription.store.clone(),
                        subscription.recipient,
                        subscription.after,
                    );
                    if push::push(store, recipient, after, subscriber, cancelled).await
                        == push::Ended::Stalled
                    {
                        (session.close)();
                    }
                    drop(subscription);
                }
                .in_current_span(),
            );
            results
                .get()
                .set_subscription(capnp_rpc::new_client(SubscriptionImpl { _cancel: cancel }));
            Ok(label)
        })
        .await
    }

    async fn fetch_wait(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchWaitParams,
        mut results: delivery_capnp::delivery_service::FetchWaitResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchWait", async move {
            let params = params.get()?;
            let recipient = parsed(wire::identity_key("recipientKey", params.get_recipient_key()?))?;
            let messages = self
                .api
                .fetch_wait(
                    recipient,
                    Seq::new(params.get_after_seq()),
                    params.get_limit() as usize,
                    Duration::from_millis(u64::from(params.get_timeout_ms())),
                )
                .await?;
            // At most FETCH_MAX_MESSAGES: fits a list length.
            wire::write_messages(results.get().init_messages(messages.len() as u32), &messages);
            Ok(messages.label())
        })
        .await
    }

    async fn fetch_since(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchSinceParams,
        mut results: delivery_capnp::delivery_service::FetchSinceResults,
    ) -> Result<(), capnp::Error> {
        observed("fetchSince", async move {
            let params = params.get()?;
            let recipient = parsed(wire::identity_key("recipientKey", params.get_recipient_key()?))?;
            let messages = self
                .api
                .fetch_since(
                    recipient,
                    Seq::new(params.get_after_seq()),
                    params.get_limit() as usize,
                )
                .await?;
            // At most FETCH_MAX_MESSAGES: fits a list length.
            wire::write_messages(results.get().init_messages(messages.len() as u32), &messages);
            Ok(messages.label())
        })
        .await
    }

    async fn ack(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::AckParams,
        _: delivery_capnp::delivery_service::AckResults,
    ) -> Result<(), capnp::Error> {
        observed("ack", async move {
            let params = params.get()?;
            let recipient = parsed(wire::identity_key("recipientKey", params.get_recipient_key()?))?;
            self.api.ack(recipient, Seq::new(params.get_up_to_seq())).await?;
            Ok(().label())
        })
        .await
    }

    async fn fetch(
        self: Rc<Self>,
        params: delivery_capnp::delivery_service::FetchParams,
        mut results: delivery_capnp::delivery_service::FetchResults,
    ) -> Result<(), capnp::Error> {
        observed("fetch", async move {
            let recipient = parsed(wire::identity_key(
                "recipientKey",
                params.get()?.get_recipient_key()?,
            ))?;
            let payloads = self.api.fetch(recipient).await?;
            // At most FETCH_MAX_MESSAGES: fits a list length.
            let mut list = results.get().init_payloads(payloads.len() as u32);
            for (index, payload) in payloads.iter().enumerate() {
                list.set(index as u32, payload);
            }
            Ok(payloads.label())
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

/// A live push subscription; dropping it (or the connection) ends the push.
struct SubscriptionImpl {
    _cancel: oneshot::Sender<()>,
}

impl delivery_capnp::subscription::Server for SubscriptionImpl {}
