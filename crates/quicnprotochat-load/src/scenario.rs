//! One load run: clients connect, subscribe to their own queues, then send
//! for a while; every message carries its send time, so each delivery gives
//! an enqueue→delivery latency. An idle run connects and subscribes the same
//! way, then sends nothing while the node's usage is measured.
//!
//! Clients are spread over a few threads, each a current-thread runtime with
//! a `LocalSet` (Cap'n Proto RPC is `!Send`). All threads start sending at
//! once (a barrier), stop at the deadline, then wait until every accepted
//! message has been pushed to its recipient.
//!
//! With several nodes, clients are spread over them round-robin, arranged
//! so that senders and their recipients are on different nodes wherever
//! that is possible ([`assign`]): each delivery then crosses from the node
//! that accepted it to the node that pushes it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use quicnprotochat_client::node_client::{ConnectOptions, NodeClient, Subscription};
use quicnprotochat_core::{IdentityKey, IdentityKeypair, QueuedMessage, Seq};
use quicnprotochat_proto::outcome::SendOutcome;
use quicnprotochat_proto::wire::Envelope;
use tokio::task::JoinHandle;

use crate::LoadError;
use crate::node::{Sample, Used};
use crate::stats::{IdleReport, Report};

/// Reads what the processes under test have used so far.
type Probe<'a> = &'a dyn Fn() -> Result<Sample, LoadError>;

/// Send times are nanoseconds since this instant, shared by all threads.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// How long to wait for the last deliveries after sending stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Most calls one client keeps in flight (the node allows 256 per session).
const MAX_WINDOW: usize = 240;

/// Handshakes in progress at once, over all threads: on a small machine,
/// thousands at once would only queue up (client and node share the cores)
/// and run into the connect timeout.
const HANDSHAKES_IN_FLIGHT: usize = 32;

/// The pause between an idle run's setup and its measured window, so the
/// tail of the setup (handshake and subscription packets still in flight,
/// their acks) is not counted as idle cost.
const SETTLE: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Who sends to whom.
    pub shape: Shape,
    /// Payload size in bytes (at least 16: the send time and sender).
    pub payload: usize,
    /// How long the senders send.
    pub duration: Duration,
    /// Steady total rate in messages/s; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// Enqueue calls each sender keeps in flight (unpaced runs).
    pub window: usize,
    /// Envelopes per `enqueueBatch` call (1: plain `enqueue`).
    pub batch: usize,
    /// Give every envelope a message id, as real clients do (the node then
    /// claims each id); sent with `enqueueBatch` even one at a time.
    pub message_ids: bool,
    /// Receivers ack at most this often (zero: after every pushed batch).
    pub ack_every: Duration,
    /// Client threads.
    pub threads: usize,
}

/// An idle run: clients that hold a push subscription and send nothing.
#[derive(Debug, Clone)]
pub struct Idle {
    /// Clients, each subscribed by push to its own queue.
    pub clients: usize,
    /// How long the node's usage is measured once they are all subscribed.
    pub duration: Duration,
    /// Client threads.
    pub threads: usize,
}

/// Who sends to whom.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `n` clients; client i sends to client i+1 (the last to the first),
    /// every client receives by push.
    Ring(usize),
    /// One sender; every message goes to all `n` recipients, who receive
    /// by push.
    FanOut(usize),
}

struct ClientSpec {
    identity: IdentityKeypair,
    /// Recipients of each message this client sends (empty: it only
    /// receives).
    targets: Vec<IdentityKey>,
    receives: bool,
    /// Where in the pacing interval this client's sends fall (0..1): paced
    /// senders are spread evenly over the interval, so that a steady rate
    /// is steady at the node too, not a burst from every client at once.
    phase: f64,
    /// The node this client connects to (an index into the run's nodes).
    node: usize,
}

/// Counters all threads share.
struct Shared {
    barrier: tokio::sync::Barrier,
    /// Messages the node accepted (one per recipient).
    accepted: AtomicU64,
    delivered: AtomicU64,
    refused: AtomicU64,
    senders_left: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

/// What one thread measured.
#[derive(Default)]
struct ThreadResult {
    sent: u64,
    bytes: u64,
    latencies: Vec<Duration>,
    last_delivery: u64,
}

/// Runs `scenario` against the node at `options`. `probe`, if given, reads
/// the node's resource use; it is sampled when sending starts and at the end.
pub fn run(
    options: &ConnectOptions,
    scenario: &Scenario,
    probe: Option<Probe<'_>>,
) -> Result<Report, LoadError> {
    run_on(std::slice::from_ref(options), scenario, probe)
}

/// Runs `scenario` against the nodes at `nodes`, which share one database:
/// the clients are spread over them as [`assign`] says. `probe`, if given,
/// reads what the nodes (and their database) used; it is sampled when
/// sending starts and at the end.
pub fn run_on(
    nodes: &[ConnectOptions],
    scenario: &Scenario,
    probe: Option<Probe<'_>>,
) -> Result<Report, LoadError> {
    if scenario.payload < 16 {
        return Err(LoadError::Scenario("payloads must be at least 16 bytes".into()));
    }
    if nodes.is_empty() {
        return Err(LoadError::Scenario("a run needs at least one node".into()));
    }
    let specs = clients(scenario.shape, nodes.len());
    let senders = senders(&specs);
    let per_thread = spread(specs, scenario.threads);
    let shared = Shared::new(per_thread.len(), senders);
    let pacing = scenario
        .rate
        .map(|rate| Duration::from_secs_f64((senders * scenario.batch) as f64 / rate));
    let in_flight = handshakes_per_thread(per_thread.len());
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|specs| {
            let (shared, nodes, scenario) = (shared.clone(), nodes.to_vec(), scenario.clone());
            std::thread::spawn(move || {
                local(client_thread(nodes, scenario, pacing, specs, in_flight, shared))
            })
        })
        .collect();

    let _ = *EPOCH;
    // Every thread waits here once its clients are connected and subscribed.
    // A thread that failed to connect still arrives, so nobody hangs.
    local(shared.barrier.wait());
    let start = EPOCH.elapsed();
    let before = probe.map(|probe| probe()).transpose()?;
    let own_before = crate::node::own_usage()?;

    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.join().map_err(|_| LoadError::ThreadPanicked)??);
    }
    let after = probe.map(|probe| probe()).transpose()?;
    let own_after = crate::node::own_usage()?;
    let used = before.zip(after).map(|(before, after)| after.since(&before));

    let mut latencies: Vec<Duration> = results.iter_mut().flat_map(|r| r.latencies.drain(..)).collect();
    latencies.sort_unstable();
    let last = results.iter().map(|r| r.last_delivery).max().unwrap_or(0);
    if let Some(error) = shared.first_error.lock().ok().and_then(|e| e.clone()) {
        eprintln!("first refused enqueue: {error}");
    }
    Ok(Report {
        sent: results.iter().map(|r| r.sent).sum(),
        delivered: shared.delivered.load(Ordering::Relaxed),
        bytes: results.iter().map(|r| r.bytes).sum(),
        refused: shared.refused.load(Ordering::Relaxed),
        elapsed: Duration::from_nanos(last).saturating_sub(start),
        latencies,
        nodes: nodes.len(),
        node: used.map(|used| used.nodes),
        postgres_cpu: used.and_then(|used| used.postgres_cpu),
        clients_cpu: Some(own_after.cpu.saturating_sub(own_before.cpu)),
    })
}

/// Connects `idle.clients` clients, subscribes each by push to its own
/// queue, waits until all are subscribed and a moment more, then measures
/// the node's resource use (through `probe`, if given) for `idle.duration`
/// while nothing is sent.
pub fn idle(
    options: &ConnectOptions,
    idle: &Idle,
    probe: Option<Probe<'_>>,
) -> Result<IdleReport, LoadError> {
    idle_on(std::slice::from_ref(options), idle, probe)
}

/// [`idle`] with the clients spread round-robin over `nodes`.
pub fn idle_on(
    nodes: &[ConnectOptions],
    idle: &Idle,
    probe: Option<Probe<'_>>,
) -> Result<IdleReport, LoadError> {
    if idle.clients == 0 {
        return Err(LoadError::Scenario(
            "an idle run needs at least one client".into(),
        ));
    }
    if nodes.is_empty() {
        return Err(LoadError::Scenario("a run needs at least one node".into()));
    }
    let setup_start = Instant::now();
    let specs = (0..idle.clients)
        .map(|i| ClientSpec {
            identity: IdentityKeypair::generate(),
            targets: Vec::new(),
            receives: true,
            phase: 0.0,
            node: i % nodes.len(),
        })
        .collect();
    let per_thread = spread(specs, idle.threads);
    let shared = Shared::new(per_thread.len(), 0);
    let in_flight = handshakes_per_thread(per_thread.len());
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|specs| {
            let (shared, nodes) = (shared.clone(), nodes.to_vec());
            std::thread::spawn(move || local(idle_thread(nodes, specs, in_flight, shared)))
        })
        .collect();

    // Every thread arrives here once its clients are subscribed, or failed.
    local(shared.barrier.wait());
    let setup = setup_start.elapsed();
    let failed = shared.first_error.lock().map_or(true, |error| error.is_some());
    let measured = if failed {
        // The failing thread's own error is returned below.
        Ok((Duration::ZERO, None))
    } else {
        std::thread::sleep(SETTLE);
        measure(idle.duration, probe)
    };
    // Released only now, so no client closes during the window; released
    // even when probing failed, so no thread waits forever.
    local(shared.barrier.wait());
    for handle in handles {
        handle.join().map_err(|_| LoadError::ThreadPanicked)??;
    }
    let (window, used) = measured?;
    Ok(IdleReport {
        clients: idle.clients,
        nodes: nodes.len(),
        setup,
        window,
        node: used.map(|used| used.nodes),
        postgres_cpu: used.and_then(|used| used.postgres_cpu),
    })
}

/// Sleeps for `duration` between two readings of `probe`; returns the time
/// between the readings and what the nodes and PostgreSQL used in it.
fn measure(duration: Duration, probe: Option<Probe<'_>>) -> Result<(Duration, Option<Used>), LoadError> {
    let before = probe.map(|probe| probe()).transpose()?;
    let start = Instant::now();
    std::thread::sleep(duration);
    let after = probe.map(|probe| probe()).transpose()?;
    let window = start.elapsed();
    Ok((
        window,
        before.zip(after).map(|(before, after)| after.since(&before)),
    ))
}

impl Shared {
    fn new(threads: usize, senders: usize) -> Arc<Shared> {
        Arc::new(Shared {
            // The threads and the thread that measures.
            barrier: tokio::sync::Barrier::new(threads + 1),
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            senders_left: AtomicUsize::new(senders),
            first_error: Mutex::new(None),
        })
    }
}

/// Deals `specs` out over at most `threads` threads (at least one, and no
/// thread without clients).
fn spread(specs: Vec<ClientSpec>, threads: usize) -> Vec<Vec<ClientSpec>> {
    let threads = threads.clamp(1, specs.len().max(1));
    let mut per_thread: Vec<Vec<ClientSpec>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, spec) in specs.into_iter().enumerate() {
        per_thread[i % threads].push(spec);
    }
    per_thread
}

/// Each thread's share of [`HANDSHAKES_IN_FLIGHT`].
fn handshakes_per_thread(threads: usize) -> usize {
    (HANDSHAKES_IN_FLIGHT / threads.max(1)).max(1)
}

/// How many of `specs` send.
fn senders(specs: &[ClientSpec]) -> usize {
    specs.iter().filter(|spec| !spec.targets.is_empty()).count()
}

/// The clients of `shape`, each on its node of [`assign`].
fn clients(shape: Shape, nodes: usize) -> Vec<ClientSpec> {
    let specs: Vec<ClientSpec> = match shape {
        Shape::Ring(n) => {
            let identities: Vec<IdentityKeypair> = (0..n).map(|_| IdentityKeypair::generate()).collect();
            let keys: Vec<IdentityKey> = identities.iter().map(IdentityKeypair::public_key).collect();
            identities
                .into_iter()
                .enumerate()
                .map(|(i, identity)| ClientSpec {
                    identity,
                    targets: vec![keys[(i + 1) % n]],
                    receives: true,
                    phase: i as f64 / n as f64,
                    node: 0,
                })
                .collect()
        }
        Shape::FanOut(n) => {
            let recipients: Vec<IdentityKeypair> = (0..n).map(|_| IdentityKeypair::generate()).collect();
            let sender = ClientSpec {
                identity: IdentityKeypair::generate(),
                targets: recipients.iter().map(IdentityKeypair::public_key).collect(),
                receives: false,
                phase: 0.0,
                node: 0,
            };
            std::iter::once(sender)
                .chain(recipients.into_iter().map(|identity| ClientSpec {
                    identity,
                    targets: Vec::new(),
                    receives: true,
                    phase: 0.0,
                    node: 0,
                }))
                .collect()
        }
    };
    specs
        .into_iter()
        .zip(assign(shape, nodes))
        .map(|(spec, node)| ClientSpec { node, ..spec })
        .collect()
}

/// The node of each client of `shape` over `nodes` nodes, in the order of
/// [`clients`]. Round-robin, so each node holds as many clients as another
/// (give or take one), and arranged so that a sender's recipients are on
/// other nodes than the sender wherever possible, so that deliveries cross
/// nodes:
/// - a ring puts client i on node i mod `nodes`, so client i's recipient
///   i+1 is on the next node. Only the pair that closes the ring (last →
///   first) can meet on node 0: with 3 or more nodes the last client moves
///   to node 1 (node 0 held the one extra client, so the balance holds);
///   with 2 nodes and an odd ring no arrangement avoids one same-node pair.
/// - a fan-out puts its sender on node 0 and the recipients round-robin on
///   the others.
fn assign(shape: Shape, nodes: usize) -> Vec<usize> {
    let nodes = nodes.max(1);
    match shape {
        Shape::Ring(n) => (0..n)
            .map(|i| {
                let closes_on_node_zero = n > 1 && i == n - 1 && i % nodes == 0;
                if nodes >= 3 && closes_on_node_zero {
                    1
                } else {
                    i % nodes
                }
            })
            .collect(),
        Shape::FanOut(n) => std::iter::once(0)
            .chain((0..n).map(|j| if nodes == 1 { 0 } else { 1 + j % (nodes - 1) }))
            .collect(),
    }
}

/// What the receivers of one thread collect.
#[derive(Default)]
struct Received {
    bytes: u64,
    latencies: Vec<Duration>,
    last_delivery: u64,
}

async fn client_thread(
    nodes: Vec<ConnectOptions>,
    scenario: Scenario,
    pacing: Option<Duration>,
    specs: Vec<ClientSpec>,
    in_flight: usize,
    shared: Arc<Shared>,
) -> Result<ThreadResult, LoadError> {
    // After a failure here, nobody waits for this thread's senders.
    let abandon = || shared.senders_left.fetch_sub(senders(&specs), Ordering::AcqRel);
    let connected = connect_all(&nodes, &specs, in_flight).await;
    if connected.is_err() {
        abandon();
    }
    shared.barrier.wait().await;
    let clients = connected?;
    let received = Rc::new(RefCell::new(Received::default()));
    let receivers = match subscribe_all(&specs, &clients, &received, &shared, scenario.ack_every).await {
        Ok(receivers) => receivers,
        Err(e) => {
            abandon();
            return Err(e);
        }
    };
    // Senders start when first polled below, after every subscription.
    let mut senders = FuturesUnordered::new();
    for (spec, client) in specs.iter().zip(&clients) {
        if !spec.targets.is_empty() {
            senders.push(send(client, spec, &scenario, pacing, &shared));
        }
    }
    let mut sent = 0;
    while let Some(count) = senders.next().await {
        sent += count;
        shared.senders_left.fetch_sub(1, Ordering::AcqRel);
    }
    drop(senders);
    // Wait until every accepted message is delivered, everywhere.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while (shared.senders_left.load(Ordering::Acquire) > 0
        || shared.delivered.load(Ordering::Acquire) < shared.accepted.load(Ordering::Acquire))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    receivers.stop().await;
    let received = std::mem::take(&mut *received.borrow_mut());
    close_all(clients).await;
    Ok(ThreadResult {
        sent,
        bytes: received.bytes,
        latencies: received.latencies,
        last_delivery: received.last_delivery,
    })
}

/// One idle thread: connects and subscribes its clients, then holds them
/// until the measuring thread has passed the barrier twice (all subscribed,
/// window over).
async fn idle_thread(
    nodes: Vec<ConnectOptions>,
    specs: Vec<ClientSpec>,
    in_flight: usize,
    shared: Arc<Shared>,
) -> Result<(), LoadError> {
    let received = Rc::new(RefCell::new(Received::default()));
    let held = match connect_all(&nodes, &specs, in_flight).await {
        Ok(clients) => subscribe_all(&specs, &clients, &received, &shared, Duration::ZERO)
            .await
            .map(|receivers| (clients, receivers)),
        Err(e) => Err(e),
    };
    if let Err(e) = &held
        && let Ok(mut first) = shared.first_error.lock()
    {
        first.get_or_insert(e.to_string());
    }
    shared.barrier.wait().await;
    shared.barrier.wait().await;
    let (clients, receivers) = held?;
    receivers.stop().await;
    close_all(clients).await;
    Ok(())
}

/// Connects a client for each of `specs` to its node, `in_flight`
/// handshakes at a time.
async fn connect_all(
    nodes: &[ConnectOptions],
    specs: &[ClientSpec],
    in_flight: usize,
) -> Result<Vec<Rc<NodeClient>>, LoadError> {
    futures::stream::iter(specs)
        .map(|spec| async move {
            let options = nodes
                .get(spec.node)
                .ok_or_else(|| LoadError::Scenario(format!("no node {} for a client", spec.node)))?;
            NodeClient::connect(options, Some(&spec.identity))
                .await
                .map(Rc::new)
                .map_err(LoadError::Client)
        })
        .buffered(in_flight.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// The push subscriptions of one thread's receiving clients and the tasks
/// that take their batches.
struct Receivers {
    subscriptions: Vec<Subscription>,
    tasks: Vec<JoinHandle<()>>,
}

impl Receivers {
    /// Ends the subscriptions and the tasks, which hold clones of the
    /// clients (so the clients can be closed after this).
    async fn stop(self) {
        drop(self.subscriptions);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Subscribes every receiving client of `specs` by push to its own queue
/// and starts a [`receive`] task for it.
async fn subscribe_all(
    specs: &[ClientSpec],
    clients: &[Rc<NodeClient>],
    received: &Rc<RefCell<Received>>,
    shared: &Arc<Shared>,
    ack_every: Duration,
) -> Result<Receivers, LoadError> {
    let mut receivers = Receivers {
        subscriptions: Vec::new(),
        tasks: Vec::new(),
    };
    for (spec, client) in specs.iter().zip(clients).filter(|(spec, _)| spec.receives) {
        let (sink, pushed) = tokio::sync::mpsc::channel(64);
        let key = spec.identity.public_key();
        let subscription = match client.subscribe(&key, Seq::ZERO, sink).await {
            Ok(subscription) => subscription,
            Err(e) => {
                receivers.stop().await;
                return Err(LoadError::Client(e));
            }
        };
        receivers.subscriptions.push(subscription);
        let (client, received, shared) = (client.clone(), received.clone(), shared.clone());
        receivers.tasks.push(tokio::task::spawn_local(receive(
            client, key, pushed, received, shared, ack_every,
        )));
    }
    Ok(receivers)
}

/// Closes every client not still shared, all at once: one at a time, each
/// close's short wait for its frame to leave would add up.
async fn close_all(clients: Vec<Rc<NodeClient>>) {
    clients
        .into_iter()
        .filter_map(|client| Rc::try_unwrap(client).ok())
        .map(NodeClient::close)
        .collect::<FuturesUnordered<_>>()
        .collect::<()>()
        .await;
}

/// Sends until the scenario's duration is over; returns how many messages
/// (per recipient) were sent.
async fn send(
    client: &NodeClient,
    spec: &ClientSpec,
    scenario: &Scenario,
    pacing: Option<Duration>,
    shared: &Shared,
) -> u64 {
    let targets = &spec.targets[..];
    let until = tokio::time::Instant::now() + scenario.duration;
    let window = if pacing.is_some() {
        MAX_WINDOW
    } else {
        scenario.window.clamp(1, MAX_WINDOW)
    };
    let per_call = (scenario.batch.max(1) * targets.len()) as u64;
    let mut next =
        tokio::time::Instant::now() + pacing.map_or(Duration::ZERO, |interval| interval.mul_f64(spec.phase));
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    loop {
        let now = tokio::time::Instant::now();
        let more = now < until;
        if !more && in_flight.is_empty() {
            return sent;
        }
        let due = pacing.is_none_or(|_| now >= next);
        if more && due && in_flight.len() < window {
            if let Some(interval) = pacing {
                next += interval;
            }
            sent += per_call;
            in_flight.push(enqueue(client, targets, scenario, shared));
            continue;
        }
        match pacing {
            Some(_) if more && in_flight.len() < window => {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                }
            }
            _ => {
                in_flight.next().await;
            }
        }
    }
}

/// A message id no other envelope of this process has, 16 bytes that look
/// random as the CLI's do (a store's index then takes them at random
/// places, as it does real clients' ids): a counter mixed by splitmix64,
/// then the time since the process started, mixed too (which keeps two
/// processes' ids apart on a reused database).
fn next_message_id() -> Vec<u8> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    // mix is a bijection, so distinct counters give distinct ids.
    let mut id = mix(NEXT.fetch_add(1, Ordering::Relaxed)).to_le_bytes().to_vec();
    id.extend_from_slice(&mix(EPOCH.elapsed().as_nanos() as u64).to_le_bytes());
    id
}

async fn enqueue(client: &NodeClient, targets: &[IdentityKey], scenario: &Scenario, shared: &Shared) {
    let stamp = || {
        let mut payload = vec![0x5au8; scenario.payload];
        payload[..8].copy_from_slice(&(EPOCH.elapsed().as_nanos() as u64).to_le_bytes());
        payload
    };
    let outcome = if scenario.batch <= 1 && targets.len() == 1 && !scenario.message_ids {
        client.enqueue(&targets[0], &stamp()).await
    } else {
        let envelopes: Vec<Envelope> = (0..scenario.batch.max(1))
            .map(|_| Envelope {
                recipients: targets.to_vec(),
                payload: stamp(),
                message_id: scenario.message_ids.then(next_message_id),
            })
            .collect();
        client.enqueue_batch(&envelopes).await
    };
    let messages = (scenario.batch.max(1) * targets.len()) as u64;
    // The node the binary starts has its rate limits off and a deep queue
    // limit, so a refusal means the run overloaded something: it is counted
    // (and the first one shown), not retried, so the figures stay honest.
    let refusal = match outcome {
        Ok(SendOutcome::Accepted) => {
            shared.accepted.fetch_add(messages, Ordering::AcqRel);
            return;
        }
        Ok(SendOutcome::RateLimited(limited)) => {
            format!("rate limited, retry after {:?}", limited.retry_after)
        }
        Ok(SendOutcome::QueueFull(full)) => format!(
            "queue full ({} recipients at the node's limit of {} messages or {} bytes)",
            full.recipients.len(),
            full.max_depth,
            full.max_bytes
        ),
        Ok(SendOutcome::TooLarge(large)) => format!(
            "too large for one call (at most {} messages, {} bytes)",
            large.max_messages, large.max_bytes
        ),
        Ok(SendOutcome::StaleEpoch(stale)) => {
            format!("from a past epoch (the group is at {})", stale.current_epoch)
        }
        Ok(SendOutcome::Handshake) => "an MLS handshake, which only the publish calls carry".to_owned(),
        Err(e) => e.to_string(),
    };
    shared.refused.fetch_add(messages, Ordering::Relaxed);
    if let Ok(mut first) = shared.first_error.lock() {
        first.get_or_insert(refusal);
    }
}

/// Takes pushed batches, records each message's latency and acks what it
/// took: one ack for everything waiting, or with `ack_every`, at most one
/// per interval (a client that acks less often costs the node less).
async fn receive(
    client: Rc<NodeClient>,
    key: IdentityKey,
    mut pushed: tokio::sync::mpsc::Receiver<Vec<QueuedMessage>>,
    received: Rc<RefCell<Received>>,
    shared: Arc<Shared>,
    ack_every: Duration,
) {
    let mut unacked = Seq::ZERO;
    let mut ack_at: Option<tokio::time::Instant> = None;
    loop {
        let next = match ack_at {
            Some(at) => tokio::select! {
                batch = pushed.recv() => batch,
                () = tokio::time::sleep_until(at) => {
                    ack_at = None;
                    if client.ack(&key, std::mem::take(&mut unacked)).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => pushed.recv().await,
        };
        let Some(batch) = next else { return };
        unacked = record(&batch, &received, &shared).max(unacked);
        while let Ok(batch) = pushed.try_recv() {
            unacked = record(&batch, &received, &shared).max(unacked);
        }
        if unacked == Seq::ZERO {
            continue;
        }
        if ack_every.is_zero() {
            if client.ack(&key, std::mem::take(&mut unacked)).await.is_err() {
                return;
            }
        } else if ack_at.is_none() {
            ack_at = Some(tokio::time::Instant::now() + ack_every);
        }
    }
}

/// Records a pushed batch; returns the last sequence number in it.
fn record(batch: &[QueuedMessage], received: &RefCell<Received>, shared: &Shared) -> Seq {
    let now = EPOCH.elapsed().as_nanos() as u64;
    let mut received = received.borrow_mut();
    for QueuedMessage { payload, .. } in batch {
        let sent = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(now, u64::from_le_bytes);
        received
            .latencies
            .push(Duration::from_nanos(now.saturating_sub(sent)));
        received.bytes += payload.len() as u64;
    }
    received.last_delivery = received.last_delivery.max(now);
    shared.delivered.fetch_add(batch.len() as u64, Ordering::AcqRel);
    batch.last().map_or(Seq::ZERO, |message| message.seq)
}

/// Runs `body` on a fresh current-thread runtime inside a `LocalSet`.
pub fn local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients per node.
    fn counts(assigned: &[usize], nodes: usize) -> Vec<usize> {
        (0..nodes)
            .map(|node| assigned.iter().filter(|&&n| n == node).count())
            .collect()
    }

    #[test]
    fn one_node_takes_every_client() {
        assert_eq!(assign(Shape::Ring(5), 1), vec![0; 5]);
        assert_eq!(assign(Shape::FanOut(3), 1), vec![0; 4]);
    }

    #[test]
    fn a_ring_is_round_robin_and_its_sends_cross_nodes() {
        for nodes in 2..=6 {
            for n in 1..=40 {
                let assigned = assign(Shape::Ring(n), nodes);
                assert_eq!(assigned.len(), n);
                let counts = counts(&assigned, nodes);
                let (least, most) = (counts.iter().min(), counts.iter().max());
                assert!(
                    most.zip(least).is_some_and(|(most, least)| most - least <= 1),
                    "{n} clients on {nodes} nodes: {counts:?}"
                );
                // Client i sends to client i+1; count the sends that stay
                // on their node.
                let same_node = (0..n).filter(|&i| assigned[i] == assigned[(i + 1) % n]).count();
                // One client sends to itself; two nodes cannot alternate
                // around an odd ring; otherwise every send crosses.
                let unavoidable = usize::from(n == 1 || (nodes == 2 && n % 2 == 1));
                assert_eq!(
                    same_node, unavoidable,
                    "{n} clients on {nodes} nodes: {assigned:?}"
                );
            }
        }
        assert_eq!(assign(Shape::Ring(4), 2), vec![0, 1, 0, 1]);
        assert_eq!(assign(Shape::Ring(4), 3), vec![0, 1, 2, 1]);
    }

    #[test]
    fn a_fan_out_sends_only_to_other_nodes() {
        for nodes in 2..=5 {
            for n in 1..=30 {
                let assigned = assign(Shape::FanOut(n), nodes);
                assert_eq!(assigned.len(), n + 1);
                assert_eq!(assigned[0], 0, "the sender");
                let recipients = counts(&assigned[1..], nodes);
                assert_eq!(recipients[0], 0, "{n} recipients, {nodes} nodes: {assigned:?}");
                let others = &recipients[1..];
                let (least, most) = (others.iter().min(), others.iter().max());
                assert!(
                    most.zip(least).is_some_and(|(most, least)| most - least <= 1),
                    "{n} recipients on {nodes} nodes: {recipients:?}"
                );
            }
        }
    }

    #[test]
    fn the_clients_of_a_shape_carry_their_nodes() {
        let ring = clients(Shape::Ring(6), 3);
        let nodes: Vec<usize> = ring.iter().map(|spec| spec.node).collect();
        assert_eq!(nodes, assign(Shape::Ring(6), 3));
        // The targets are unchanged: client i still sends to client i+1.
        for (i, spec) in ring.iter().enumerate() {
            assert_eq!(spec.targets, vec![ring[(i + 1) % 6].identity.public_key()]);
        }
        let fan_out = clients(Shape::FanOut(4), 2);
        assert_eq!(
            fan_out.iter().map(|spec| spec.node).collect::<Vec<_>>(),
            vec![0, 1, 1, 1, 1]
        );
    }
}
