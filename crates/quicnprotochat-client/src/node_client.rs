//! A connection to a node and typed calls on its `NodeService`.
//!
//! Connecting verifies the node's certificate against the trusted one given
//! with `--ca-cert`; there is no way to skip that. The RPC session is `!Send`
//! and runs as a task on the current `LocalSet`. A [`Dialer`] prepares the
//! TLS side once and connects to one node, or to the first of a list of
//! nodes that completes a handshake ([`Dialer::dial_first`]).
//!
//! Calls return the node's typed outcomes ([`SendOutcome`],
//! [`ChangeOutcome`], [`FetchedKeyPackage`],
//! [`FetchedGroupInfo`]) as values: deciding what to do about a rate limit, a full queue, a lost race
//! or a change the node found not valid is the caller's business.
//! An exception comes back as [`ClientError::Rpc`]; only its
//! [`capnp::ErrorKind`] means anything to code, its text is for people.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capnp::capability::FromClientHook;
use quicnprotochat_core::{
    EpochKey, GroupId, IdentityKey, IdentityKeypair, KeyPackageStock, QueuedMessage, Seq, SignedDeviceList,
    StateKey, Suite,
};
use quicnprotochat_proto::auth_capnp::auth_service;
use quicnprotochat_proto::delivery_capnp as delivery_service_capnp;
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::node_capnp::node_service;
use quicnprotochat_proto::outcome::{
    BackupOutcome, ChangeOutcome, DeviceListOutcome, FetchedGroupInfo, FetchedKeyPackage, FetchedWelcomeTree,
    SendOutcome, UploadOutcome,
};
use quicnprotochat_proto::wire::{
    CommitToSend, Envelope, MAX_DEVICE_LIST_FETCH, read_device_list, read_key_package_stock, read_messages,
    write_commit_publication, write_device_list, write_envelope, write_proposal_publication,
    write_state_keys,
};
use quicnprotochat_proto::{cert, peer, rpc, transport};
use rustls::AlertDescription;

use crate::error::ClientError;

/// How long to wait for the QUIC + TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Dialer::dial_first`] waits for a node's handshake before it
/// also tries the next one (RFC 8305's connection attempt delay): a node
/// that is down over UDP says nothing, and waiting out its whole timeout
/// before trying the next would add 5 s to every command.
pub const NEXT_NODE_AFTER: Duration = Duration::from_millis(250);

/// How long to wait for any one call's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest RPC message this client reads from a node; a fetch answer carries
/// up to 16 MiB of payloads.
const MAX_INCOMING: usize = 32 * 1024 * 1024;

/// Completes if the host at `remote` says nothing listens on its port;
/// pending otherwise. QUIC learns of a node that is down only by its
/// handshake timing out, but the host usually says so at once: a datagram
/// from a connected UDP socket draws an ICMP "port unreachable", which the
/// OS reports as a refused connection. A node that does listen drops the
/// single byte (no QUIC packet is that short); a host or firewall that says
/// nothing leaves this pending, and the handshake's timeout decides.
async fn nothing_listens(remote: SocketAddr, bind: SocketAddr) {
    let refused = async {
        let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
        socket.connect(remote).await.ok()?;
        socket.send(&[0]).await.ok()?;
        let answer = socket.recv(&mut [0; 1]).await;
        matches!(answer, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused).then_some(())
    };
    if refused.await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// Where the node is and whom to trust.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port` of the node.
    pub server: String,
    /// Name to verify in the node's certificate; defaults to the host part
    /// of `server`.
    pub server_name: Option<String>,
    /// The node's certificate (or the CA that issued it), DER.
    pub ca_cert: PathBuf,
}

pub use quicnprotochat_proto::wire::NodeInfo;

/// An open connection to a node.
pub struct NodeClient {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    node: node_service::Client,
    // NodeService extends both; the inherited methods are called through
    // clients of the parent interfaces on the same capability.
    auth: auth_service::Client,
    delivery: delivery_service::Client,
    server: String,
    remote: SocketAddr,
}

/// What connecting to a node needs besides its address: the trusted
/// certificate and our own client certificate, prepared once for however
/// many nodes are dialled.
pub struct Dialer {
    config: quinn::ClientConfig,
    server_name: Option<String>,
    ca_cert: PathBuf,
}

impl Dialer {
    /// Reads the trusted certificate `ca_cert` and prepares connections
    /// authenticated as `identity` (or anonymous), verifying `server_name`
    /// in the node's certificate, or by default the host part of the address
    /// dialled. Every error here is local: no node is asked yet.
    pub fn new(
        ca_cert: &Path,
        server_name: Option<String>,
        identity: Option<&IdentityKeypair>,
    ) -> Result<Dialer, ClientError> {
        let trusted = cert::load_certificate(ca_cert).map_err(|source| ClientError::CaCert {
            path: ca_cert.to_owned(),
            source,
        })?;
        let client_certificate = match identity {
            Some(identity) => Some(peer::client_certificate(&identity.pkcs8_der()?)?),
            None => None,
        };
        let config = transport::client_config(trusted, client_certificate).map_err(|e| {
            ClientError::CaCertUnusable {
                path: ca_cert.to_owned(),
                reason: e.to_string(),
            }
        })?;
        Ok(Dialer {
            config,
            server_name,
            ca_cert: ca_cert.to_owned(),
        })
    }

    /// Connects to the node at `server` (`host:port`), verifying its
    /// certificate, and opens the RPC session. Every error here is about
    /// that node (its address, its answer, its certificate) and names it.
    /// Must run inside a tokio `LocalSet`.
    pub async fn dial(&self, server: &str) -> Result<NodeClient, ClientError> {
        let failed = |reason: String| ClientError::Connect {
            server: server.to_owned(),
            reason,
        };
        let (host, remote) = resolve(server).await?;
        let server_name = self.server_name.clone().unwrap_or(host);
        let bind: SocketAddr = if remote.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| ClientError::Internal("IPv6 wildcard address"))?
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        // The socket's address family follows the node's, so a host without
        // IPv6 fails here for an IPv6 node only: a failure of this node.
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| failed(format!("opening a UDP socket: {e}")))?;
        endpoint.set_default_client_config(self.config.clone());
        let connecting = endpoint
            .connect(remote, &server_name)
            .map_err(|e| failed(e.to_string()))?;
        let handshake = tokio::select! {
            handshake = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => handshake,
            () = nothing_listens(remote, bind) => {
                return Err(ClientError::NothingListens {
                    server: server.to_owned(),
                });
            }
        };
        let connection = match handshake {
            Err(_) => {
                return Err(ClientError::Unreachable {
                    server: server.to_owned(),
                    after: CONNECT_TIMEOUT,
                });
            }
            Ok(Err(e)) => return Err(classify_connect_error(server, &self.ca_cert, &server_name, e)),
            Ok(Ok(connection)) => connection,
        };
        let (send, recv) = connection.open_bi().await.map_err(|e| failed(e.to_string()))?;
        let (session, node) = rpc::connect(send, recv, rpc::reader_options(MAX_INCOMING / 2));
        tokio::task::spawn_local(async move {
            if let Err(e) = session.await {
                tracing::debug!("RPC session ended: {e}");
            }
        });
        Ok(NodeClient {
            endpoint,
            connection,
            auth: node.clone().cast_to(),
            delivery: node.clone().cast_to(),
            node,
            server: server.to_owned(),
            remote,
        })
    }

    /// Connects to the first of `servers` that completes a handshake,
    /// trying them in order from index `start` and wrapping around: each
    /// next node once the one before has failed, or has not answered
    /// within [`NEXT_NODE_AFTER`] (the attempts then run side by side, and
    /// the first handshake to complete wins).
    ///
    /// Only a failure to connect (no answer, refused, the handshake or its
    /// TLS failed, the address does not resolve) moves on to the next node:
    /// once a node has answered, what it says is the answer. When every node
    /// fails, the error lists each with why
    /// ([`ClientError::NoNodeReachable`]); with a single node it is that
    /// node's own error.
    pub async fn dial_first(&self, servers: &[String], start: usize) -> Result<Dialled, ClientError> {
        use futures::StreamExt;

        let order: Vec<usize> = (0..servers.len())
            .map(|offset| (start + offset) % servers.len())
            .collect();
        let attempt = |index: usize| async move { (index, self.dial(&servers[index]).await) };
        let mut attempts = futures::stream::FuturesUnordered::new();
        let mut launched = 0;
        let mut failures: Vec<(usize, ClientError)> = Vec::new();
        loop {
            if attempts.is_empty() {
                let Some(&index) = order.get(launched) else { break };
                launched += 1;
                attempts.push(attempt(index));
            }
            let more = launched < order.len();
            tokio::select! {
                Some((index, result)) = attempts.next() => match result {
                    Ok(client) => {
                        // Nodes before it that have not answered yet are
                        // given up on: say so, like the ones that failed.
                        let position = order.iter().position(|i| *i == index).unwrap_or(0);
                        for &earlier in &order[..position] {
                            if !failures.iter().any(|(failed, _)| *failed == earlier) {
                                failures.push((earlier, ClientError::Unreachable {
                                    server: servers[earlier].clone(),
                                    after: NEXT_NODE_AFTER,
                                }));
                            }
                        }
                        // In list order, as tried.
                        failures.sort_by_key(|(index, _)| order.iter().position(|i| i == index));
                        return Ok(Dialled {
                            index,
                            client,
                            skipped: failures.into_iter().map(|(_, error)| error).collect(),
                        });
                    }
                    Err(error) => failures.push((index, error)),
                },
                () = tokio::time::sleep(NEXT_NODE_AFTER), if more => {
                    attempts.push(attempt(order[launched]));
                    launched += 1;
                }
            }
        }
        failures.sort_by_key(|(index, _)| order.iter().position(|i| i == index));
        let mut skipped: Vec<ClientError> = failures.into_iter().map(|(_, error)| error).collect();
        match skipped.len() {
            0 => Err(ClientError::Usage(
                "no node given; pass --server HOST:PORT".into(),
            )),
            1 => Err(skipped.remove(0)),
            _ => Err(ClientError::NoNodeReachable { failures: skipped }),
        }
    }
}

/// The node [`Dialer::dial_first`] connected to, and why the ones tried
/// before it were skipped.
pub struct Dialled {
    /// Its index in the list.
    pub index: usize,
    /// The connection.
    pub client: NodeClient,
    /// The failures of the nodes tried before it, in order.
    pub skipped: Vec<ClientError>,
}

impl NodeClient {
    /// Connects to the node, verifying its certificate, and opens the RPC
    /// session, authenticated as `identity` (needed to send, to read one's
    /// own queue and to upload KeyPackages) or anonymous. Must run inside a
    /// tokio `LocalSet`.
    pub async fn connect(
        options: &ConnectOptions,
        identity: Option<&IdentityKeypair>,
    ) -> Result<NodeClient, ClientError> {
        Dialer::new(&options.ca_cert, options.server_name.clone(), identity)?
            .dial(&options.server)
            .await
    }

    /// The node's address as given (`host:port`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the connection has ended (closed by either end, or timed
    /// out): every call on it fails from then on.
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
    }

    /// The node's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Asks the node who it is.
    pub async fn ping(&self) -> Result<NodeInfo, ClientError> {
        let request = self.node.ping_request();
        let response = call(request.send().promise).await?;
        Ok(NodeInfo::read(response.get()?.get_info()?)?)
    }

    /// Uploads a KeyPackage for `identity`; returns the node's SHA-256
    /// fingerprint of what it stored. A refusal (rate limit, KeyPackage
    /// limit) is its typed [`ClientError`].
    pub async fn upload_key_package(
        &self,
        identity: &IdentityKey,
        package: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let mut request = self.auth.upload_key_package_request();
        request.get().set_identity_key(identity.as_bytes());
        request.get().set_package(package);
        let response = call(request.send().promise).await?;
        let response = response.get()?;
        stored(UploadOutcome::read(response.get_outcome()?)?)?;
        Ok(response.get_fingerprint()?.to_vec())
    }

    /// Uploads several KeyPackages of `identity` in one atomic call; returns
    /// the node's SHA-256 fingerprints, in order.
    pub async fn upload_key_packages(
        &self,
        identity: &IdentityKey,
        packages: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut request = self.auth.upload_key_packages_request();
        request.get().set_identity_key(identity.as_bytes());
        let length =
            u32::try_from(packages.len()).map_err(|_| ClientError::Internal("too many KeyPackages"))?;
        let mut list = request.get().init_packages(length);
        for (index, package) in packages.iter().enumerate() {
            list.set(index as u32, package);
        }
        let response = call(request.send().promise).await?;
        let response = response.get()?;
        stored(UploadOutcome::read(response.get_outcome()?)?)?;
        let fingerprints = response.get_fingerprints()?;
        fingerprints.iter().map(|f| Ok(f?.to_vec())).collect()
    }

    /// How many ordinary KeyPackages of `identity` the node still has, and
    /// whether it has a last-resort one.
    pub async fn key_package_count(&self, identity: &IdentityKey) -> Result<KeyPackageStock, ClientError> {
        self.key_package_count_in(identity, Suite::X25519).await
    }

    /// [`Self::key_package_count`] for the KeyPackages of `suite`.
    pub async fn key_package_count_in(
        &self,
        identity: &IdentityKey,
        suite: Suite,
    ) -> Result<KeyPackageStock, ClientError> {
        let mut request = self.auth.key_package_count_request();
        request.get().set_identity_key(identity.as_bytes());
        request.get().set_ciphersuite(suite.code());
        let response = call(request.send().promise).await?;
        Ok(read_key_package_stock(response.get()?))
    }

    /// Takes one KeyPackage of `identity`: the package, none left, or over
    /// the fetch rate (with how long to wait).
    pub async fn fetch_key_package(&self, identity: &IdentityKey) -> Result<FetchedKeyPackage, ClientError> {
        self.fetch_key_package_in(identity, Suite::X25519).await
    }

    /// [`Self::fetch_key_package`] of a KeyPackage of `suite`.
    pub async fn fetch_key_package_in(
        &self,
        identity: &IdentityKey,
        suite: Suite,
    ) -> Result<FetchedKeyPackage, ClientError> {
        let mut request = self.auth.fetch_key_package_request();
        request.get().set_identity_key(identity.as_bytes());
        request.get().set_ciphersuite(suite.code());
        let response = call(request.send().promise).await?;
        Ok(FetchedKeyPackage::read(response.get()?.get_outcome()?)?)
    }

    /// Uploads a user's signed device list; the node's typed answer.
    pub async fn upload_device_list(
        &self,
        list: &SignedDeviceList,
    ) -> Result<DeviceListOutcome, ClientError> {
        let mut request = self.auth.upload_device_list_request();
        write_device_list(list, request.get().init_list());
        let response = call(request.send().promise).await?;
        Ok(DeviceListOutcome::read(response.get()?.get_outcome()?)?)
    }

    /// The device lists the node stores for `users` (at most
    /// [`MAX_DEVICE_LIST_FETCH`]), as read from the wire: the signatures are
    /// not checked here.
    pub async fn fetch_device_lists(
        &self,
        users: &[IdentityKey],
    ) -> Result<Vec<SignedDeviceList>, ClientError> {
        let mut request = self.auth.fetch_device_lists_request();
        let count = u32::try_from(users.len().min(MAX_DEVICE_LIST_FETCH)).unwrap_or(0);
        let mut keys = request.get().init_user_keys(count);
        for (index, user) in users.iter().take(count as usize).enumerate() {
            keys.set(index as u32, user.as_bytes());
        }
        let response = call(request.send().promise).await?;
        let lists = response.get()?.get_lists()?;
        lists
            .iter()
            .enumerate()
            .map(|(index, list)| {
                read_device_list(&format!("lists[{index}]"), list)
                    .map_err(|e| ClientError::Protocol(format!("fetchDeviceLists: {e}")))
            })
            .collect()
    }

    /// Queues `payload` for `recipient`. [`SendOutcome::Accepted`] comes only
    /// once the node committed it; any other outcome stored nothing.
    pub async fn enqueue(&self, recipient: &IdentityKey, payload: &[u8]) -> Result<SendOutcome, ClientError> {
        let mut request = self.delivery.enqueue_request();
        request.get().set_recipient_key(recipient.as_bytes());
        request.get().set_payload(payload);
        let response = call(request.send().promise).await?;
        Ok(SendOutcome::read(response.get()?.get_outcome()?)?)
    }

    /// Queues every envelope's payload for each of its recipients in one
    /// atomic call: [`SendOutcome::Accepted`] means all are committed on the
    /// node; any other outcome, or an error, means none is.
    pub async fn enqueue_batch(&self, envelopes: &[Envelope]) -> Result<SendOutcome, ClientError> {
        self.enqueue_batch_with_keys(envelopes, &[]).await
    }

    /// [`Self::enqueue_batch`] with the state keys of the groups the
    /// messages belong to (protocol 9): with them, the node tells a member
    /// whose message is from an epoch the group has left
    /// ([`SendOutcome::StaleEpoch`]) instead of queueing it.
    pub async fn enqueue_batch_with_keys(
        &self,
        envelopes: &[Envelope],
        state_keys: &[&StateKey],
    ) -> Result<SendOutcome, ClientError> {
        let mut request = self.delivery.enqueue_batch_request();
        let length =
            u32::try_from(envelopes.len()).map_err(|_| ClientError::Internal("too many envelopes"))?;
        let mut list = request.get().init_envelopes(length);
        for (index, envelope) in envelopes.iter().enumerate() {
            write_envelope(envelope, list.reborrow().get(index as u32))?;
        }
        if !state_keys.is_empty() {
            let length =
                u32::try_from(state_keys.len()).map_err(|_| ClientError::Internal("too many state keys"))?;
            write_state_keys(state_keys, request.get().init_state_keys(length));
        }
        let response = call(request.send().promise).await?;
        Ok(SendOutcome::read(response.get()?.get_outcome()?)?)
    }

    /// Publishes a group change (the fields of `publication`): `commit`
    /// (made in `epoch` of `group_id`) and,
    /// delivered only with it, `welcome`. With the group's first change,
    /// `initial_state` hands the node the group's public state in `epoch`,
    /// which it checks this and every later Commit against. `group_info` is
    /// the GroupInfo of the epoch the Commit starts (`epoch + 1`, signed by
    /// us), which the node checks and serves to members who rejoin
    /// ([`Self::fetch_group_info`]); without one it has nothing to serve
    /// until the next Commit that brings one. `epoch_key`, the key of
    /// `epoch + 1`, must come with a Commit that adds members: the node
    /// seals their ratchet tree under it.
    ///
    /// [`ChangeOutcome::Conflict`] says another Commit won that epoch, and
    /// which epoch the group is in now; [`ChangeOutcome::Invalid`] that the
    /// node found the Commit not valid for the group;
    /// [`ChangeOutcome::UnknownGroup`] that it has no state for the group and
    /// none was given.
    pub async fn publish_commit(&self, publication: &CommitToSend<'_>) -> Result<ChangeOutcome, ClientError> {
        let mut request = self.delivery.publish_commit_request();
        write_commit_publication(request.get(), publication)?;
        let response = call(request.send().promise).await?;
        Ok(ChangeOutcome::read_commit(response.get()?.get_outcome()?)?)
    }

    /// The current GroupInfo and ratchet tree of `group_id`, for rejoining it
    /// by external commit; [`FetchedGroupInfo::Unavailable`] while the
    /// group's last Commit brought no GroupInfo. Only a member of the group
    /// (an identity with a leaf in the node's current tree) may ask; anyone
    /// else gets a [`capnp::ErrorKind::Failed`] exception.
    pub async fn fetch_group_info(
        &self,
        group_id: &GroupId,
        state_key: &StateKey,
    ) -> Result<FetchedGroupInfo, ClientError> {
        let mut request = self.delivery.fetch_group_info_request();
        request.get().set_group_id(group_id.as_bytes());
        request.get().set_state_key(state_key.as_bytes());
        let response = call(request.send().promise).await?;
        Ok(FetchedGroupInfo::read(response.get()?.get_outcome()?)?)
    }

    /// The ratchet tree of `group_id` in `epoch`, kept by the node for the
    /// members the Commit that started `epoch` added, to join with their
    /// Welcome, sealed under `key` (that epoch's key, which a joiner
    /// computes from its Welcome); [`FetchedWelcomeTree::Unavailable`] if
    /// it keeps none, or `key` is not the epoch's.
    pub async fn fetch_welcome_tree(
        &self,
        group_id: &GroupId,
        epoch: u64,
        key: &EpochKey,
    ) -> Result<FetchedWelcomeTree, ClientError> {
        let mut request = self.delivery.fetch_welcome_tree_request();
        request.get().set_group_id(group_id.as_bytes());
        request.get().set_epoch(epoch);
        request.get().set_epoch_key(key.as_bytes());
        let response = call(request.send().promise).await?;
        Ok(FetchedWelcomeTree::read(response.get()?.get_outcome()?)?)
    }

    /// Publishes a standalone `proposal` (made in `epoch` of `group_id`) to
    /// its recipients; the node checks it against the group's public state
    /// and keeps it for the Commit that will reference it.
    /// [`ChangeOutcome::Accepted`] comes only once it is stored; any other
    /// outcome stored nothing.
    pub async fn publish_proposal(
        &self,
        group_id: &GroupId,
        epoch: u64,
        proposal: &Envelope,
        state_key: &StateKey,
    ) -> Result<ChangeOutcome, ClientError> {
        let mut request = self.delivery.publish_proposal_request();
        write_proposal_publication(request.get(), group_id, epoch, proposal, state_key)?;
        let response = call(request.send().promise).await?;
        Ok(ChangeOutcome::read_proposal(response.get()?.get_outcome()?)?)
    }

    /// Keeps `backup` (sealed by us) as our key backup on the node, filed
    /// under `lookup` (protocol 9).
    pub async fn put_key_backup(
        &self,
        lookup: &[u8; 32],
        backup: &[u8],
    ) -> Result<BackupOutcome, ClientError> {
        let mut request = self.delivery.put_key_backup_request();
        request.get().set_lookup(lookup);
        request.get().set_backup(backup);
        let response = call(request.send().promise).await?;
        Ok(BackupOutcome::read(response.get()?.get_outcome()?)?)
    }

    /// The key backup filed under `lookup`; empty if there is none.
    pub async fn fetch_key_backup(&self, lookup: &[u8; 32]) -> Result<Vec<u8>, ClientError> {
        let mut request = self.delivery.fetch_key_backup_request();
        request.get().set_lookup(lookup);
        let response = call(request.send().promise).await?;
        Ok(response.get()?.get_backup()?.to_vec())
    }

    /// Reads (without removing) the messages of `recipient` after `after`,
    /// oldest first: at most `limit` (0: the node's own limit).
    pub async fn fetch_since(
        &self,
        recipient: &IdentityKey,
        after: Seq,
        limit: u32,
    ) -> Result<Vec<QueuedMessage>, ClientError> {
        let mut request = self.delivery.fetch_since_request();
        request.get().set_recipient_key(recipient.as_bytes());
        request.get().set_after_seq(after.get());
        request.get().set_limit(limit);
        let response = call(request.send().promise).await?;
        Ok(read_messages(response.get()?.get_messages()?)?)
    }

    /// Long poll: like [`Self::fetch_since`], but waits up to `timeout_ms`
    /// for messages to arrive when there are none yet.
    pub async fn fetch_wait(
        &self,
        recipient: &IdentityKey,
        after: Seq,
        limit: u32,
        timeout_ms: u32,
    ) -> Result<Vec<QueuedMessage>, ClientError> {
        let mut request = self.delivery.fetch_wait_request();
        request.get().set_recipient_key(recipient.as_bytes());
        request.get().set_after_seq(after.get());
        request.get().set_limit(limit);
        request.get().set_timeout_ms(timeout_ms);
        let wait = Duration::from_millis(u64::from(timeout_ms));
        let response = match tokio::time::timeout(CALL_TIMEOUT + wait, request.send().promise).await {
            Err(_) => return Err(ClientError::Timeout(CALL_TIMEOUT + wait)),
            Ok(response) => response?,
        };
        Ok(read_messages(response.get()?.get_messages()?)?)
    }

    /// Subscribes to the queue of `recipient` after `after`: the node pushes
    /// batches of messages into `sink` as they are committed, waiting while
    /// `sink` is full. Dropping the returned [`Subscription`] ends it.
    pub async fn subscribe(
        &self,
        recipient: &IdentityKey,
        after: Seq,
        sink: tokio::sync::mpsc::Sender<Vec<QueuedMessage>>,
    ) -> Result<Subscription, ClientError> {
        let mut request = self.delivery.subscribe_request();
        request.get().set_recipient_key(recipient.as_bytes());
        request.get().set_after_seq(after.get());
        request
            .get()
            .set_receiver(capnp_rpc::new_client(MessageReceiverImpl { sink }));
        let response = call(request.send().promise).await?;
        Ok(Subscription {
            _client: response.get()?.get_subscription()?,
        })
    }

    /// Deletes the messages of `recipient` up to and including `up_to`.
    pub async fn ack(&self, recipient: &IdentityKey, up_to: Seq) -> Result<(), ClientError> {
        let mut request = self.delivery.ack_request();
        request.get().set_recipient_key(recipient.as_bytes());
        request.get().set_up_to_seq(up_to.get());
        call(request.send().promise).await?;
        Ok(())
    }

    /// Drains one batch of the queue of `recipient`, oldest first.
    pub async fn fetch(&self, recipient: &IdentityKey) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut request = self.delivery.fetch_request();
        request.get().set_recipient_key(recipient.as_bytes());
        let response = call(request.send().promise).await?;
        let payloads = response.get()?.get_payloads()?;
        payloads.iter().map(|p| Ok(p?.to_vec())).collect()
    }

    /// Drains the whole queue of `recipient`, batch after batch.
    pub async fn fetch_all(&self, recipient: &IdentityKey) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut all = Vec::new();
        loop {
            let batch = self.fetch(recipient).await?;
            if batch.is_empty() {
                return Ok(all);
            }
            all.extend(batch);
        }
    }

    /// Closes the connection at once, without waiting for anything; every
    /// call on it fails from then on.
    pub fn hang_up(&self) {
        self.connection.close(0u32.into(), b"bye");
    }

    /// Closes the connection, giving the close frame a moment to leave.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"bye");
        // The close frame leaves at once; waiting out QUIC's whole draining
        // period (three probe timeouts, ~85 ms on loopback) would only delay
        // the exit of every command. A node that missed the frame drops the
        // connection at its idle timeout.
        let _ = tokio::time::timeout(Duration::from_millis(25), self.endpoint.wait_idle()).await;
    }
}

/// A live push subscription; dropping it ends the push.
pub struct Subscription {
    _client: delivery_service_capnp::subscription::Client,
}

/// Receives pushed messages and hands them to a channel; the node waits
/// for each `deliver` to return, so a full channel slows the push down.
struct MessageReceiverImpl {
    sink: tokio::sync::mpsc::Sender<Vec<QueuedMessage>>,
}

impl delivery_service_capnp::message_receiver::Server for MessageReceiverImpl {
    async fn deliver(
        self: capnp::capability::Rc<Self>,
        params: delivery_service_capnp::message_receiver::DeliverParams,
        _: delivery_service_capnp::message_receiver::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let messages = read_messages(params.get()?.get_messages()?)
            .map_err(|e| capnp::Error::failed(format!("reading pushed messages: {e}")))?;
        self.sink
            .send(messages)
            .await
            .map_err(|_| capnp::Error::disconnected("the client stopped following".into()))
    }
}

async fn call<T>(promise: capnp::capability::Promise<T, capnp::Error>) -> Result<T, ClientError> {
    match tokio::time::timeout(CALL_TIMEOUT, promise).await {
        Err(_) => Err(ClientError::Timeout(CALL_TIMEOUT)),
        Ok(result) => result.map_err(ClientError::from),
    }
}

/// Splits `host:port` and resolves it to one address.
async fn resolve(server: &str) -> Result<(String, SocketAddr), ClientError> {
    let bad = |reason: &str| ClientError::BadServer {
        server: server.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, _port) = server
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port, e.g. 127.0.0.1:4201"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let remote = tokio::net::lookup_host(server)
        .await
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name resolves to no address"))?;
    Ok((host, remote))
}

/// Says why a handshake failed, from quinn's error type and, for TLS
/// failures, the TLS alert in its code; never from error text.
fn classify_connect_error(
    server: &str,
    ca_cert: &Path,
    name: &str,
    error: quinn::ConnectionError,
) -> ClientError {
    let server = server.to_owned();
    match &error {
        // Our own TLS stack refused the node: quinn reports the alert we
        // sent as a local transport error of the crypto class.
        quinn::ConnectionError::TransportError(local) => match alert(local.code) {
            // rustls checks the chain first (unknown_ca when it does not
            // lead to the trusted certificate), then the name: bad_certificate
            // after a good chain means the name. (It is also sent for a
            // certificate that does not parse at all, before any chain
            // check; only a broken node presents one, and the advice still
            // points at the node.)
            Some(AlertDescription::BadCertificate) => ClientError::WrongName {
                server,
                name: name.to_owned(),
                reason: local.reason.clone(),
            },
            Some(
                AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::DecryptError,
            ) => ClientError::UntrustedNode {
                server,
                ca_cert: ca_cert.to_owned(),
                reason: local.reason.clone(),
            },
            _ => ClientError::Connect {
                server,
                reason: error.to_string(),
            },
        },
        quinn::ConnectionError::ConnectionClosed(close) => ClientError::Connect {
            server,
            reason: match alert(close.error_code) {
                Some(AlertDescription::NoApplicationProtocol) => format!(
                    "the node does not speak {} ({error}); is it a quicnprotochat node of a matching version?",
                    String::from_utf8_lossy(quicnprotochat_proto::ALPN)
                ),
                Some(_) => format!("the node refused the TLS handshake ({error})"),
                None if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
                    format!(
                        "the node refused the connection ({error}); it may be at its connection limit, try again later"
                    )
                }
                None => error.to_string(),
            },
        },
        quinn::ConnectionError::TimedOut => ClientError::Unreachable {
            server,
            after: CONNECT_TIMEOUT,
        },
        _ => ClientError::Connect {
            server,
            reason: error.to_string(),
        },
    }
}

/// The TLS alert a QUIC transport error code carries, if it is of the
/// crypto class (0x0100 to 0x01ff, RFC 9001 section 4.8).
fn alert(code: quinn::TransportErrorCode) -> Option<AlertDescription> {
    let code = u64::from(code);
    (code & !0xff == 0x100).then(|| AlertDescription::from((code & 0xff) as u8))
}

/// An upload's outcome as the client's error, if it stored nothing.
fn stored(outcome: UploadOutcome) -> Result<(), ClientError> {
    match outcome {
        UploadOutcome::Stored => Ok(()),
        UploadOutcome::RateLimited(limited) => Err(limited.into()),
        UploadOutcome::TooMany { stored, max } => Err(ClientError::TooManyKeyPackages { stored, max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alerts_are_read_from_crypto_class_codes_only() {
        assert_eq!(
            alert(quinn::TransportErrorCode::crypto(48)),
            Some(AlertDescription::UnknownCA)
        );
        assert_eq!(
            alert(quinn::TransportErrorCode::crypto(42)),
            Some(AlertDescription::BadCertificate)
        );
        assert_eq!(alert(quinn::TransportErrorCode::CONNECTION_REFUSED), None);
        assert_eq!(alert(quinn::TransportErrorCode::PROTOCOL_VIOLATION), None);
    }
}
