//! Hostile clients that make a node hold what they never take, over real
//! QUIC, and the node's resident memory meanwhile: shared by
//! `tests/memory.rs` (which checks the bounds) and
//! `examples/memory_attacks.rs` (which measures any node binary).

#![allow(dead_code)] // each user takes what it needs

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use capnp::capability::FromClientHook;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::AsyncRead;
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::delivery_capnp::{delivery_service, message_receiver};
use quicnprotochat_proto::node_capnp::node_service;
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// The attacker's seed and the member's.
const ATTACKER: [u8; 32] = [5; 32];
const MEMBER: [u8; 32] = [6; 32];

/// Bounds each step, so a stall fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(60);

/// The resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A reader that, once `frozen` is set, never returns another byte: the
/// connection's flow-control credit is never extended again.
struct Freezable<R> {
    inner: R,
    frozen: Rc<Cell<bool>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Freezable<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.frozen.get() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// A client endpoint for `seed`'s identity whose streams grant little
/// credit (16 KiB), so that not reading soon blocks the node's writes (a
/// client that reads is merely slower on big answers).
fn endpoint(trusted: &Path, seed: [u8; 32]) -> quinn::Endpoint {
    let keypair = IdentityKeypair::from_secret_bytes(&seed);
    let identity = peer::client_certificate(&keypair.pkcs8_der().unwrap()).unwrap();
    let mut config =
        transport::client_config(cert::load_certificate(trusted).unwrap(), Some(identity)).unwrap();
    let mut quic = quinn::TransportConfig::default();
    quic.stream_receive_window((16u32 * 1024).into())
        .receive_window((64u32 * 1024).into())
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().unwrap()));
    config.transport_config(Arc::new(quic));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// An RPC session on a new stream of `connection` whose reading stops when
/// the returned flag is set; its `NodeService`.
async fn session(connection: &quinn::Connection) -> (node_service::Client, Rc<Cell<bool>>) {
    let (send, recv) = connection.open_bi().await.unwrap();
    let frozen = Rc::new(Cell::new(false));
    let reader = Freezable {
        inner: futures::io::BufReader::new(recv.compat()),
        frozen: frozen.clone(),
    };
    let options = rpc::reader_options(DEFAULT_MAX_PAYLOAD);
    let network = twoparty::VatNetwork::new(reader, send.compat_write(), Side::Client, options);
    let mut system = RpcSystem::new(Box::new(network), None);
    let node: node_service::Client = system.bootstrap(Side::Server);
    tokio::task::spawn_local(system);
    (node, frozen)
}

/// A `MessageReceiver` that never answers.
struct Deaf;

impl message_receiver::Server for Deaf {
    async fn deliver(
        self: capnp::capability::Rc<Self>,
        _: message_receiver::DeliverParams,
        _: message_receiver::DeliverResults,
    ) -> Result<(), capnp::Error> {
        std::future::pending().await
    }
}

/// One attack: what it opens on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    AnswersNeverRead,
    PushesNeverTaken,
    FramesNeverFinished,
}

/// What an attacking connection keeps alive: its streams, requests and
/// their answers.
#[derive(Default)]
struct Held {
    fetches: Vec<capnp::capability::RemotePromise<delivery_service::fetch_since_results::Owned>>,
    subscriptions: Vec<capnp::capability::RemotePromise<delivery_service::subscribe_results::Owned>>,
    streams: Vec<(quinn::SendStream, quinn::RecvStream)>,
}

/// Opens `attack` on `connection`.
async fn open(attack: Attack, connection: &quinn::Connection, queue: &[u8], held: &mut Held) {
    match attack {
        Attack::AnswersNeverRead => {
            let (node, frozen) = session(connection).await;
            frozen.set(true);
            let delivery: delivery_service::Client = node.cast_to();
            for _ in 0..250 {
                let mut request = delivery.fetch_since_request();
                request.get().set_recipient_key(queue);
                held.fetches.push(request.send());
            }
        }
        Attack::PushesNeverTaken => {
            for _ in 0..4 {
                let (node, frozen) = session(connection).await;
                frozen.set(true);
                let delivery: delivery_service::Client = node.cast_to();
                for _ in 0..4 {
                    let mut request = delivery.subscribe_request();
                    request.get().set_recipient_key(queue);
                    request.get().set_receiver(capnp_rpc::new_client(Deaf));
                    held.subscriptions.push(request.send());
                }
            }
        }
        Attack::FramesNeverFinished => {
            for _ in 0..4 {
                let (mut send, recv) = connection.open_bi().await.unwrap();
                // One segment of 3,000,000 bytes declared; 1 KB sent.
                let mut frame = 0u32.to_le_bytes().to_vec();
                frame.extend((3_000_000u32 / 8).to_le_bytes());
                frame.extend([0u8; 1024]);
                send.write_all(&frame).await.unwrap();
                held.streams.push((send, recv));
            }
        }
    }
}

/// The member pings, sends itself a message, fetches it and acknowledges
/// it, over a connection of its own; how long that took.
pub async fn member_is_served(addr: SocketAddr, trusted: &Path) -> Duration {
    let started = Instant::now();
    let keypair = IdentityKeypair::from_secret_bytes(&MEMBER);
    let endpoint = endpoint(trusted, MEMBER);
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let (session, node) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
    tokio::task::spawn_local(session);
    let info = node.ping_request().send().promise.await.unwrap();
    assert!(info.get().unwrap().get_info().unwrap().get_protocol_version() > 0);
    let delivery: delivery_service::Client = node.cast_to();
    let mut enqueue = delivery.enqueue_request();
    enqueue.get().set_recipient_key(keypair.public_key().as_bytes());
    enqueue.get().set_payload(b"still here");
    enqueue.send().promise.await.unwrap();
    let mut fetch = delivery.fetch_since_request();
    fetch.get().set_recipient_key(keypair.public_key().as_bytes());
    let answer = fetch.send().promise.await.unwrap();
    let messages = answer.get().unwrap().get_messages().unwrap();
    let last = messages.get(messages.len() - 1);
    assert_eq!(last.get_payload().unwrap(), b"still here");
    let mut ack = delivery.ack_request();
    ack.get().set_recipient_key(keypair.public_key().as_bytes());
    ack.get().set_up_to_seq(last.get_seq());
    ack.send().promise.await.unwrap();
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    started.elapsed()
}

/// Fills the attacker's own queue with 8 messages of 1 MB.
pub async fn fill_queue(addr: SocketAddr, trusted: &Path) {
    let keypair = IdentityKeypair::from_secret_bytes(&ATTACKER);
    let endpoint = endpoint(trusted, ATTACKER);
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let (session, node) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
    tokio::task::spawn_local(session);
    let delivery: delivery_service::Client = node.cast_to();
    for i in 0..8u8 {
        let mut request = delivery.enqueue_request();
        request.get().set_recipient_key(keypair.public_key().as_bytes());
        request.get().set_payload(&vec![i; 1_000_000]);
        request.send().promise.await.unwrap();
    }
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

/// What one attack did to the node.
#[derive(Debug)]
pub struct Report {
    /// The node's resident memory before the attack, and while it held.
    pub before: u64,
    pub during: u64,
    /// How long the member's calls took while it held.
    pub served_in: Duration,
    /// How the node closed the first attacking connection it closed, if it
    /// did within `STEP` (only waited for when asked).
    pub closed: Option<quinn::ConnectionError>,
}

/// Runs `attack` with `connections` connections against the node at
/// `addr` (process `pid`): measures its memory before and while the attack
/// holds, has the member served meanwhile, and with `wait_for_close` waits
/// for the node to close an attacking connection.
pub async fn attack(
    addr: SocketAddr,
    pid: u32,
    trusted: &Path,
    attack: Attack,
    connections: usize,
    wait_for_close: bool,
) -> Report {
    let queue = IdentityKeypair::from_secret_bytes(&ATTACKER).public_key();
    // Warm: the member's calls allocate what they always will.
    member_is_served(addr, trusted).await;
    let before = rss(pid);
    let endpoint = endpoint(trusted, ATTACKER);
    let mut open_connections = Vec::new();
    let mut held = Held::default();
    for _ in 0..connections {
        let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        open(attack, &connection, queue.as_bytes(), &mut held).await;
        open_connections.push(connection);
    }
    // Let the node take in all it will.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let served_in = member_is_served(addr, trusted).await;
    let during = rss(pid);
    let closed = if wait_for_close {
        // Only connections holding budget keep the node waiting; the others
        // wait for budget, not for their peer, until those go.
        let closing = open_connections
            .iter()
            .map(|connection| Box::pin(connection.closed()));
        tokio::time::timeout(STEP, futures::future::select_all(closing))
            .await
            .ok()
            .map(|(closed, ..)| closed)
    } else {
        None
    };
    for connection in &open_connections {
        connection.close(0u32.into(), b"done");
    }
    drop(held);
    endpoint.wait_idle().await;
    Report {
        before,
        during,
        served_in,
        closed,
    }
}
