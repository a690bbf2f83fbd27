//! The QUIC endpoint: the accept loop, the RPC worker threads and shutdown.
//!
//! Cap'n Proto RPC is `!Send`, so each RPC thread ("worker") runs a
//! single-threaded runtime with a `LocalSet`; each accepted connection goes
//! to the worker serving the fewest, and every stream a client opens gets
//! its own RPC session. The first worker also runs the store's writer: a
//! call served there reaches the writer, and gets its answer, without
//! waking another thread (each such wake-up costs more CPU than the call's
//! own work; docs/benchmarks/journal.md, "Cost per message"). The caller's runtime runs
//! the QUIC endpoint's socket I/O, accepts connections and runs the
//! retention task. (The socket I/O ran on the first worker too, which saved
//! a wake-up per packet, but under the abuse test's floods a busy worker
//! left every client's packets waiting: pings stalled for 2 s.)
//!
//! Shutdown: stop accepting, refuse new calls, wait (bounded) for calls in
//! flight to finish, close the endpoint, let the workers' sessions end,
//! wait for the connections to close, then close the store, which commits
//! what is queued, and join the worker threads.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use capnp::message::ReaderOptions;
use quicnprotochat_proto::guard::GuardState;
use quicnprotochat_proto::memory::{AnswerBounds, MemoryBudget, PeerMemory, Pool};
use quicnprotochat_proto::{cert, peer, rpc, transport, wire};
use tokio::sync::mpsc;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::admission::{AddressSlot, Admission, Decision};
use crate::api::Shared;
use crate::config::{Config, MAX_PAYLOAD_CEILING};
use crate::error::ServerError;
use crate::limits::{Caller, RateLimits};
use crate::metrics::{self, GaugeGuard};
use crate::service::{NodeServiceImpl, Session};
use crate::store::{Limits, Store, StoreCloser};

/// How long shutdown waits for calls in flight before closing connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits, once no call is in flight, for clients to hang up
/// by themselves, so that answers already written reach them before the
/// endpoint closes every connection.
const HANG_UP_GRACE: Duration = Duration::from_secs(1);

/// How long shutdown waits for closed connections to be acknowledged.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a handshake may take: well under the idle timeout, so a peer
/// that starts handshakes and never finishes them holds a slot briefly.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The QUIC application error code a refused anonymous connection is closed
/// with (after the handshake, when the node learns it is anonymous).
const TOO_MANY_ANONYMOUS: u32 = 0x51;

/// The QUIC application error code a stranger's connection is closed with
/// (after the handshake) when strangers hold their whole share.
const TOO_MANY_STRANGERS: u32 = 0x53;

/// The QUIC application error code a connection is closed with (after the
/// handshake) when its identity holds as many connections as it may.
const TOO_MANY_FOR_IDENTITY: u32 = 0x54;

/// The QUIC application error code a connection is closed with when it kept
/// the node waiting longer than the stall timeout.
pub const STALLED: u32 = 0x52;

/// What each account of a connection may hold without drawing on the
/// node's pool: enough for a member's small calls and pushes, however
/// full the pool is.
const MEMORY_FLOOR: usize = 64 * 1024;

/// How a connection is served: the same for all, set at bind.
#[derive(Debug, Clone)]
struct Serving {
    options: ReaderOptions,
    memory: MemoryBudget,
    /// The memory of each peer with a connection open, shared by all its
    /// connections.
    peers: Arc<Mutex<HashMap<Caller, Weak<PeerMemory>>>>,
    bounds: AnswerBounds,
    stall_timeout: Duration,
}

impl Serving {
    /// The memory accounts of `caller`: those its other connections use, or
    /// new ones.
    fn memory_of(&self, caller: Caller) -> Arc<PeerMemory> {
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(memory) = peers.get(&caller).and_then(Weak::upgrade) {
            return memory;
        }
        // Forget peers that left while the map is at hand; it holds at most
        // one entry per open connection.
        peers.retain(|_, memory| memory.strong_count() > 0);
        let memory = Arc::new(self.memory.peer());
        peers.insert(caller, Arc::downgrade(&memory));
        memory
    }
}

/// Binds the node described by `config` and serves until `shutdown`
/// completes, then shuts down cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Node::bind(config).await?.run(shutdown).await
}

/// A bound node: certificate loaded, database open, socket listening,
/// RPC threads waiting for connections.
#[derive(Debug)]
pub struct Node {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    store_closer: StoreCloser,
    workers: Vec<Worker>,
    max_connections: usize,
    admission: Arc<Admission>,
    /// The memory pools, for the sampled gauge.
    pools: [(&'static str, Arc<Pool>); 2],
    retention: Duration,
    group_retention: Duration,
    /// The UDP socket's kernel buffers, as the kernel granted them.
    udp_buffers: UdpBuffers,
    /// The `/metrics` listener and the recorder it renders, when asked for.
    metrics: Option<(
        tokio::net::TcpListener,
        metrics_exporter_prometheus::PrometheusHandle,
    )>,
}

impl Node {
    /// Loads (or generates) the certificate, opens the database and binds the
    /// UDP socket. Must be called within a tokio runtime, which then drives
    /// the endpoint.
    pub async fn bind(config: Config) -> Result<Node, ServerError> {
        if config.max_payload == 0 || config.max_payload > MAX_PAYLOAD_CEILING {
            return Err(ServerError::Config(format!(
                "--max-payload must be between 1 and {MAX_PAYLOAD_CEILING} bytes, got {}",
                config.max_payload
            )));
        }
        if config.max_queue_depth == 0 || config.max_connections == 0 {
            return Err(ServerError::Config(
                "--max-queue-depth and --max-connections must be at least 1".into(),
            ));
        }
        if config.rpc_threads == 0 {
            return Err(ServerError::Config("--rpc-threads must be at least 1".into()));
        }
        // Bound first: a busy metrics port fails start-up before any
        // thread or database is set up.
        let metrics = match config.metrics_listen {
            Some(addr) => match metrics::install() {
                Some(handle) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind { addr, source })?;
                    Some((listener, handle))
                }
                None => None,
            },
            None => None,
        };
        let identity = cert::load_or_generate(&config.tls_cert, &config.tls_key, &config.tls_names)?;
        if identity.generated {
            info!(
                cert = %config.tls_cert.display(),
                key = %config.tls_key.display(),
                "generated a self-signed TLS certificate; give clients the certificate file as --ca-cert"
            );
        }
        let server_config = transport::server_config(identity.cert, identity.key, config.idle_timeout)?;
        let limits = Limits {
            max_queue_depth: config.max_queue_depth,
            max_queue_bytes: config.max_queue_bytes,
            max_key_packages: config.max_key_packages,
        };
        let mut runtimes = Runtimes(Vec::with_capacity(config.rpc_threads));
        for _ in 0..config.rpc_threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ServerError::Thread)?;
            runtimes.0.push(runtime);
        }
        let first = runtimes.0[0].handle().clone();
        let (store, store_closer) = Store::open_database(&config.db, limits, config.durability, &first)
            .map_err(|source| ServerError::Store {
                db: config.db.to_string(),
                source,
            })?;
        let bind_error = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let (socket, udp_buffers) = bind_udp(config.listen, config.udp_buffer).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let shared = Shared::new(
            store,
            config.max_payload,
            RateLimits::new(
                config.enqueue_rate,
                config.send_bytes_rate,
                2 * config.max_payload as u64,
                config.key_package_fetch_rate,
                config.ping_rate,
                config.key_package_serve_rate,
                config.key_package_upload_rate,
            ),
            wire::KeyPackagePolicy {
                max_lifetime_secs: config.max_key_package_lifetime.as_secs(),
                ..wire::KeyPackagePolicy::default()
            },
        );
        let admission = Admission::new(
            config.max_connections_per_address,
            config.ipv6_prefix,
            config.max_anonymous_connections,
            config.retry_above,
            strangers_share(config.max_connections, config.reserved_connections_percent),
            config.max_connections_per_identity,
        );
        let reader_options = rpc::reader_options(config.max_payload);
        let serving = Serving {
            options: reader_options,
            memory: memory_budget(&config, reader_options),
            peers: Arc::default(),
            bounds: AnswerBounds::new(config.max_payload, max_frame(reader_options)),
            stall_timeout: config.stall_timeout,
        };
        let pools = [
            ("calls", serving.memory.calls.clone()),
            ("pushes", serving.memory.pushes.clone()),
        ];
        let workers = std::mem::take(&mut runtimes.0)
            .into_iter()
            .enumerate()
            .map(|(index, runtime)| {
                // The first worker's thread runs the writer to its end.
                let writer = (index == 0).then(|| store_closer.finished());
                Worker::spawn(
                    index,
                    runtime,
                    writer,
                    shared.clone(),
                    admission.clone(),
                    serving.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Node {
            endpoint,
            shared,
            max_connections: config.max_connections,
            admission,
            pools,
            retention: config.retention,
            group_retention: config.group_retention,
            udp_buffers,
            metrics,
            store_closer,
            workers,
        })
    }

    /// The sizes of the UDP socket's kernel buffers.
    pub fn udp_buffers(&self) -> UdpBuffers {
        self.udp_buffers
    }

    /// The address the node listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound quinn endpoint always knows its socket address; the error
        // case is unreachable after a successful bind.
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The TCP address serving `/metrics`, if the node serves metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then shuts down cleanly.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let mut workers = std::mem::take(&mut self.workers);
        info!(addr = %self.local_addr(), alpn = %String::from_utf8_lossy(transport::ALPN), "node listening");
        let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
        let mut metrics_tasks = Vec::new();
        if let Some((listener, handle)) = self.metrics.take() {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "serving Prometheus metrics at /metrics");
            }
            metrics_tasks.push(tokio::spawn(metrics::serve(
                listener,
                handle.clone(),
                metrics_stopped.clone(),
            )));
            metrics_tasks.push(tokio::spawn(sample_task(
                self.shared.clone(),
                self.pools.clone(),
                handle,
                metrics_stopped,
            )));
        }

        let (stop_retention, retention_stopped) = tokio::sync::oneshot::channel();
        let retention = tokio::spawn(retention_task(
            self.shared.clone(),
            self.retention,
            self.group_retention,
            retention_stopped,
        ));
        tokio::pin!(shutdown);
        let disk_failed = self.store_closer.failed();
        tokio::pin!(disk_failed);
        let mut failure = None;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                failed = &mut disk_failed => {
                    error!("the database's disk failed a sync: {failed}; stopping the node");
                    failure = Some(failed);
                    break;
                }
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) if self.shared.connections.len() >= self.max_connections => {
                        debug!(remote = %incoming.remote_address(), "refused: {} connections open", self.max_connections);
                        incoming.refuse();
                    }
                    Some(incoming) => {
                        let remote = incoming.remote_address();
                        match self.admission.admit(
                            remote.ip(),
                            incoming.remote_address_validated(),
                            incoming.may_retry(),
                        ) {
                            Decision::Retry => {
                                // Stateless: the client comes back with a
                                // token proving its address, or never.
                                if let Err(e) = incoming.retry() {
                                    debug!(%remote, "retry: {e}");
                                }
                            }
                            Decision::Refuse => {
                                debug!(%remote, "refused: its address holds as many connections as it may");
                                incoming.refuse();
                            }
                            Decision::Admit(slot) => {
                                // Counted from here, so handshakes in
                                // progress count too.
                                let open = self.shared.connections.token();
                                // The least busy thread; the first (which
                                // also runs the writer) on a tie, so that a
                                // lone client pays no hand-off to it.
                                if let Some(worker) = workers.iter().min_by_key(|worker| worker.load()) {
                                    worker.hand_over(incoming, open, slot);
                                }
                            }
                        }
                    }
                    None => break,
                },
            }
        }

        info!("shutting down: no new connections; finishing calls in flight");
        let _ = stop_retention.send(());
        let _ = retention.await;
        let _ = stop_metrics.send(true);
        for task in metrics_tasks {
            let _ = task.await;
        }
        // New calls are refused from here on; wait for the last one in flight.
        self.shared.calls.close();
        // Ends push subscriptions and long polls now instead of at the drain
        // timeout.
        self.shared.store.notifier().close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.shared.calls.wait())
            .await
            .is_err()
        {
            warn!(
                calls = self.shared.calls.len(),
                "calls still in flight after {DRAIN_TIMEOUT:?}; closing anyway"
            );
        }
        self.shared.connections.close();
        let _ = tokio::time::timeout(HANG_UP_GRACE, self.shared.connections.wait()).await;
        self.endpoint.close(0u32.into(), b"node shutting down");
        for worker in &mut workers {
            worker.finish_sessions().await;
        }
        if tokio::time::timeout(CLOSE_TIMEOUT, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            debug!("some peers did not acknowledge the close in time");
        }
        // The sessions are gone, so this is the last handle to the store.
        drop(self.shared);
        self.store_closer.close().await;
        for worker in workers {
            worker.join().await;
        }
        match failure {
            Some(failed) => Err(ServerError::DiskFailed(failed)),
            None => {
                info!("node stopped");
                Ok(())
            }
        }
    }
}

/// The workers' runtimes until their threads take them. Dropping a runtime
/// waits for its blocking tasks, which may not happen on an async thread,
/// so when `bind` fails half-way they are shut down in the background.
struct Runtimes(Vec<tokio::runtime::Runtime>);

impl Drop for Runtimes {
    fn drop(&mut self) {
        for runtime in self.0.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// The sizes, in bytes, of a UDP socket's kernel buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpBuffers {
    /// Datagrams received but not yet read by the node.
    pub receive: usize,
    /// Datagrams written but not yet sent by the kernel.
    pub send: usize,
}

/// Binds the node's UDP socket and asks for `buffer` bytes for each of its
/// kernel buffers (0: the system's default).
///
/// Every client's packets land in one socket, and the endpoint reads it
/// between other work: a burst (a thousand keep-alives, a client sending a
/// megabyte, a wave of handshakes) overflows Linux's default of about
/// 208 KiB and the kernel drops datagrams. QUIC resends them, but a
/// dropped handshake packet costs its client a second or more, and the
/// abuse test saw one handshake wait for 30 s. The kernel caps what it
/// grants (`net.core.rmem_max`, `net.core.wmem_max`); the node says so
/// rather than fail.
fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<(std::net::UdpSocket, UdpBuffers)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if buffer > 0 {
        // Refusals are reported below, with the sizes the socket has.
        let _ = state.set_recv_buffer_size((&socket).into(), buffer);
        let _ = state.set_send_buffer_size((&socket).into(), buffer);
    }
    let buffers = UdpBuffers {
        receive: state.recv_buffer_size((&socket).into())?,
        send: state.send_buffer_size((&socket).into())?,
    };
    if buffer > 0 && (buffers.receive < buffer || buffers.send < buffer) {
        warn!(
            asked = buffer,
            receive = buffers.receive,
            send = buffers.send,
            "the kernel granted smaller UDP buffers than asked for: bursts of packets may be dropped; \
             on Linux raise net.core.rmem_max and net.core.wmem_max (sysctl) to at least the size asked for"
        );
    } else {
        debug!(
            receive = buffers.receive,
            send = buffers.send,
            "UDP socket buffers"
        );
    }
    Ok((socket, buffers))
}

/// What a worker is handed for each connection: the connection, its place
/// among the open ones and its address's, and its place in the worker's
/// load.
type Handed = (quinn::Incoming, TaskTrackerToken, AddressSlot, LoadToken);

/// Counts a connection in its worker's load until dropped.
#[derive(Debug)]
struct LoadToken(Arc<AtomicUsize>);

impl Drop for LoadToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One RPC thread: a single-threaded runtime and `LocalSet` serving the
/// connections handed to it.
#[derive(Debug)]
struct Worker {
    connections: Option<mpsc::UnboundedSender<Handed>>,
    /// Connections it serves now.
    load: Arc<AtomicUsize>,
    /// Fires once the thread's sessions have ended and it has let go of the
    /// shared state.
    sessions_done: Option<tokio::sync::oneshot::Receiver<()>>,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts the thread. With `writer`, the thread also runs the store's
    /// writer (spawned on `runtime`) and keeps going until it has finished.
    fn spawn(
        index: usize,
        runtime: tokio::runtime::Runtime,
        writer: Option<tokio::sync::watch::Receiver<bool>>,
        shared: Arc<Shared>,
        admission: Arc<Admission>,
        serving: Serving,
    ) -> Result<Worker, ServerError> {
        let (connections, mut receiver) = mpsc::unbounded_channel::<Handed>();
        let (sessions_ended, sessions_done) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("rpc-{index}"))
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async {
                    while let Some((incoming, open, slot, load)) = receiver.recv().await {
                        tokio::task::spawn_local(serve_connection(
                            incoming,
                            (open, slot, load),
                            shared.clone(),
                            admission.clone(),
                            serving.clone(),
                        ));
                    }
                });
                drop((shared, admission));
                // The endpoint is closed by now, so every session ends soon;
                // the timeout only guards against a bug keeping one alive.
                let finished = runtime.block_on(async { tokio::time::timeout(CLOSE_TIMEOUT, local).await });
                if finished.is_err() {
                    warn!("RPC worker {index}: sessions still open at shutdown; dropping them");
                }
                let _ = sessions_ended.send(());
                if let Some(mut writer) = writer {
                    // The writer ends once the last store handle is dropped,
                    // after every session; it needs this runtime until then.
                    let _ = runtime.block_on(writer.wait_for(|done| *done));
                }
            })
            .map_err(ServerError::Thread)?;
        Ok(Worker {
            connections: Some(connections),
            load: Arc::new(AtomicUsize::new(0)),
            sessions_done: Some(sessions_done),
            thread,
        })
    }

    fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    fn hand_over(&self, incoming: quinn::Incoming, open: TaskTrackerToken, slot: AddressSlot) {
        self.load.fetch_add(1, Ordering::Relaxed);
        let load = LoadToken(self.load.clone());
        // The receiver lives as long as the thread's sessions, which only
        // end after this sender is dropped in `finish_sessions`.
        let sent = self
            .connections
            .as_ref()
            .is_some_and(|connections| connections.send((incoming, open, slot, load)).is_ok());
        if !sent {
            warn!("RPC worker stopped unexpectedly; connection dropped");
        }
    }

    /// Stops handing it connections and waits until its sessions have ended.
    async fn finish_sessions(&mut self) {
        self.connections = None;
        if let Some(done) = self.sessions_done.take() {
            // An error means the thread ended early (a panic); `join` says so.
            let _ = done.await;
        }
    }

    async fn join(mut self) {
        self.finish_sessions().await;
        let thread = self.thread;
        if !matches!(
            tokio::task::spawn_blocking(move || thread.join()).await,
            Ok(Ok(()))
        ) {
            warn!("an RPC worker thread panicked");
        }
    }
}

/// Completes the handshake (within [`HANDSHAKE_TIMEOUT`]), then runs one
/// RPC session per stream the client opens until the connection closes.
/// `held` counts the connection as open, and against its address, until
/// this returns, however it ends; an anonymous one also takes an anonymous
/// slot, or is closed.
async fn serve_connection(
    incoming: quinn::Incoming,
    held: (TaskTrackerToken, AddressSlot, LoadToken),
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    serving: Serving,
) {
    let (_open, mut slot, _load) = held;
    let _gauge = GaugeGuard::new(metrics::CONNECTIONS_OPEN);
    let remote = incoming.remote_address();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
    slot.handshake_done();
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            debug!(%remote, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%remote, "handshake not finished within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let peer = peer::peer_identity(&connection);
    let _identity = match peer {
        Some(identity) => match admission.identity(identity) {
            Some(slot) => Some(slot),
            None => {
                debug!(%remote, "refused: its identity holds as many connections as it may");
                connection.close(
                    TOO_MANY_FOR_IDENTITY.into(),
                    b"too many connections for this identity",
                );
                return;
            }
        },
        None => None,
    };
    let _anonymous = match peer {
        Some(_) => None,
        None => match admission.anonymous() {
            Some(anonymous) => Some(anonymous),
            None => {
                debug!(%remote, "refused: as many anonymous connections as allowed are open");
                connection.close(
                    TOO_MANY_ANONYMOUS.into(),
                    b"too many anonymous connections; try later",
                );
                return;
            }
        },
    };
    let _stranger = match admission.stranger() {
        Some(slot) => Some(slot),
        // Strangers hold their share: the rest is for identities the node
        // already serves. A store that cannot say lets them in: members
        // must not be locked out by a database hiccup.
        None => match peer {
            Some(identity) if shared.store.knows(identity).await.unwrap_or(true) => None,
            _ => {
                debug!(%remote, "refused: strangers hold their share of connections");
                connection.close(
                    TOO_MANY_STRANGERS.into(),
                    b"the node is busy with connections of strangers; try later",
                );
                return;
            }
        },
    };
    // Every line logged for this connection, its sessions and the calls
    // they run carries its number and where from, so one client's story
    // can be grepped. Who it is is logged at debug level only: at the
    // default level the log names no identity (docs/seized-node.md).
    let number = CONNECTION_NUMBERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = tracing::info_span!("connection", connection = number, %remote);
    span.in_scope(|| {
        debug!(
            peer = %peer.map_or_else(|| "anonymous".to_owned(), |peer| peer.short()),
            "connection from"
        );
    });
    let memory = serving.memory_of(match peer {
        Some(identity) => Caller::Identity(identity),
        None => Caller::Address(admission.counted_as(remote.ip())),
    });
    serve_sessions(connection, peer, remote, shared, serving, memory)
        .instrument(span)
        .await;
}

/// Numbers connections in the log, in the order they are admitted.
static CONNECTION_NUMBERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Runs one RPC session per stream the client opens until the connection
/// closes; inside the connection's span. All its sessions hold their frames,
/// answers and pushes in `memory`, the peer's accounts; a connection that keeps
/// a session waiting on it longer than the stall timeout is closed.
async fn serve_sessions(
    connection: quinn::Connection,
    peer: Option<quicnprotochat_core::IdentityKey>,
    remote: SocketAddr,
    shared: Arc<Shared>,
    serving: Serving,
    memory: Arc<PeerMemory>,
) {
    debug!("connection established");
    let mut sessions: Vec<std::rc::Weak<GuardState>> = Vec::new();
    let mut watch = tokio::time::interval((serving.stall_timeout / 4).max(Duration::from_millis(100)));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let node = capnp_rpc::new_client(NodeServiceImpl::new(
                        shared.clone(),
                        peer,
                        remote.ip(),
                        Session {
                            pushes: memory.pushes.clone(),
                            close: {
                                let (connection, timeout) = (connection.clone(), serving.stall_timeout);
                                Box::new(move || stalled(&connection, timeout))
                            },
                            stall_timeout: serving.stall_timeout,
                            push_bound: serving.bounds.messages,
                        },
                    ));
                    let (session, guard) = rpc::serve(
                        send,
                        recv,
                        node,
                        serving.options,
                        memory.calls.clone(),
                        serving.bounds,
                    );
                    sessions.retain(|session| session.strong_count() > 0);
                    sessions.push(Rc::downgrade(&guard));
                    tokio::task::spawn_local(
                        async move {
                            let ended = session.await;
                            if guard.refused() {
                                ::metrics::counter!(metrics::GUARD_ABORTS).increment(1);
                            }
                            if let Err(e) = ended {
                                debug!("RPC session ended: {e}");
                            }
                        }
                        .in_current_span(),
                    );
                }
                Err(e) => {
                    debug!("connection closed: {e}");
                    return;
                }
            },
            _ = watch.tick() => {
                if let Some(since) = waiting_since(&sessions)
                    && since.elapsed() >= serving.stall_timeout
                {
                    stalled(&connection, serving.stall_timeout);
                }
            }
        }
    }
}

/// Since when the longest-waiting session of a connection has been waiting
/// on its peer, if any is.
fn waiting_since(sessions: &[std::rc::Weak<GuardState>]) -> Option<std::time::Instant> {
    sessions
        .iter()
        .filter_map(|session| session.upgrade()?.waiting_on_peer_since())
        .min()
}

/// Closes a connection that kept the node waiting for `timeout`, which
/// gives back everything it held.
fn stalled(connection: &quinn::Connection, timeout: Duration) {
    debug!("closing: the peer kept the node waiting for {timeout:?}");
    ::metrics::counter!(metrics::STALLED_CONNECTIONS).increment(1);
    connection.close(STALLED.into(), b"stalled: the node waited too long for this peer");
}

/// Connections strangers may hold: what `reserved_percent` of `total`
/// leaves.
fn strangers_share(total: usize, reserved_percent: u8) -> usize {
    let reserved = total.saturating_mul(usize::from(reserved_percent.min(100))) / 100;
    total - reserved
}

/// The largest frame a peer may send, in bytes.
fn max_frame(options: ReaderOptions) -> usize {
    options
        .traversal_limit_in_words
        .map_or(usize::MAX, |words| words.saturating_mul(8))
}

/// The node's pools and each peer's limits: a peer may hold four of the
/// largest frames with their answers' room, and two of the largest pushes;
/// all peers together, the configured budget (3/4 for calls, 1/4 for
/// pushes), beyond each one's floor.
fn memory_budget(config: &Config, options: ReaderOptions) -> MemoryBudget {
    let bounds = AnswerBounds::new(config.max_payload, max_frame(options));
    MemoryBudget {
        calls: Pool::new(config.memory_budget / 4 * 3),
        pushes: Pool::new(config.memory_budget / 4),
        peer_calls: 4 * max_frame(options),
        peer_pushes: 2 * bounds.messages,
        floor: MEMORY_FLOOR,
    }
}

/// Until `stop` fires: every [`metrics::SAMPLE_INTERVAL`], reads the gauges
/// that need a count from the database (messages queued, KeyPackages
/// stored); every [`metrics::UPKEEP_INTERVAL`], lets the recorder fold its
/// histogram buffers, so they stay small between scrapes.
async fn sample_task(
    shared: Arc<Shared>,
    pools: [(&'static str, Arc<Pool>); 2],
    handle: metrics_exporter_prometheus::PrometheusHandle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut samples = tokio::time::interval(metrics::SAMPLE_INTERVAL);
    let mut upkeep = tokio::time::interval(metrics::UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = samples.tick() => {}
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
            _ = stop.changed() => return,
        }
        for (name, pool) in &pools {
            ::metrics::gauge!(metrics::MEMORY_HELD, "pool" => *name).set(pool.held() as f64);
        }
        match shared.store.totals().await {
            Ok(totals) => {
                ::metrics::gauge!(metrics::MESSAGES_QUEUED).set(totals.messages_queued as f64);
                ::metrics::gauge!(metrics::KEY_PACKAGES_STORED).set(totals.key_packages_stored as f64);
            }
            Err(e) => debug!("metrics: counting queued messages and KeyPackages: {e}"),
        }
    }
}

/// Deletes what outlived the retention period, at start and then every
/// tenth of the period (at most hourly, at least every 100 ms), until
/// `stop` fires; also trims the rate limiters' memory.
async fn retention_task(
    shared: Arc<Shared>,
    retention: Duration,
    group_retention: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // Also the cadence of trimming the limiter and watcher maps, so at most
    // a minute.
    let period = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut stop => return,
        }
        match shared.store.purge(unix_cutoff(retention)).await {
            Ok(0) => {}
            Ok(purged) => info!(
                purged,
                "deleted undelivered messages older than the retention period"
            ),
            Err(e) => warn!("retention: {e}"),
        }
        if !group_retention.is_zero() {
            match shared.store.purge_idle_groups(unix_cutoff(group_retention)).await {
                Ok(0) => {}
                Ok(purged) => info!(
                    purged,
                    "forgot the public views of groups idle for the group retention period"
                ),
                Err(e) => warn!("group retention: {e}"),
            }
        }
        shared.rate_limits.shrink();
        shared.store.notifier().forget_unwatched();
    }
}

/// Unix seconds `age` ago (0 if that is before 1970).
fn unix_cutoff(age: Duration) -> i64 {
    std::time::SystemTime::now()
        .checked_sub(age)
        .and_then(|cutoff| cutoff.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_secs() as i64)
}
