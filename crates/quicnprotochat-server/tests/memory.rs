//! The node's memory under peers that make it hold what they do not take:
//! the real node binary (so its resident memory is its own) and hostile
//! clients over real QUIC, with 1, 3 and 16 connections each:
//! - **answers never read**: a peer fills its own queue with 8 messages of
//!   1 MB, stops reading its stream (so grants no flow-control credit) and
//!   pipelines 250 `fetchSince` calls on each connection;
//! - **pushes never taken**: 16 subscriptions from seq 0 of that queue on
//!   each connection (four streams of four), nothing read;
//! - **frames never finished**: on each of the connection's four streams, a
//!   frame declaring 3 MB, of which 1 KB is sent.
//!
//! Throughout each attack a member (another identity) pings, sends and
//! fetches, and the node's resident memory stays within the documented
//! bound: the attacker's budget (its calls and pushes accounts, shared by
//! all its connections), QUIC's windows per connection, and slack for the
//! allocator. Then the node closes an attacking connection as stalled once
//! the stall timeout has passed.
//! The figures are printed for BENCHMARKS.md (`--nocapture`).

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use capnp::capability::FromClientHook;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::AsyncRead;
use node::process::{Running, start, terminate};
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::delivery_capnp::{delivery_service, message_receiver};
use quicnprotochat_proto::node_capnp::node_service;
use quicnprotochat_proto::transport::{CONNECTION_RECEIVE_WINDOW, SEND_WINDOW};
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// The attacker's seed and the member's.
const ATTACKER: [u8; 32] = [5; 32];
const MEMBER: [u8; 32] = [6; 32];

/// The node's stall timeout in this test.
const STALL_SECS: u64 = 4;

/// What a peer's accounts may hold at the defaults: four frames of 3 MiB
/// with their answers' room, and two pushes of 2 MiB (see the node's
/// `memory_budget`).
const PEER_BUDGET: u64 = 4 * 3 * 1024 * 1024 + 2 * (2 * 1024 * 1024 + 4096);

/// Per connection, besides the budget: QUIC's windows, and its own state
/// (TLS, streams, the RPC sessions' tables).
const PER_CONNECTION: u64 = CONNECTION_RECEIVE_WINDOW as u64 + SEND_WINDOW + 256 * 1024;

/// Slack for the allocator: freed memory it keeps, arenas of the threads.
const SLACK: u64 = 24 * 1024 * 1024;

/// Bounds each step, so a stall fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(60);

/// The node's resident memory, in bytes.
fn rss(running: &Running) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", running.child.id())).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn mib(bytes: u64) -> f64 {
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
/// credit (16 KiB), so that not reading soon blocks the node's writes.
fn endpoint(trusted: &Path, seed: [u8; 32]) -> quinn::Endpoint {
    let keypair = IdentityKeypair::from_secret_bytes(&seed);
    let identity = peer::client_certificate(&keypair.pkcs8_der().unwrap()).unwrap();
    let mut config = transport::client_config(cert::load_certificate(trusted).unwrap(), Some(identity)).unwrap();
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
enum Attack {
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
async fn member_is_served(addr: SocketAddr, trusted: &Path) -> Duration {
    let started = Instant::now();
    let keypair = IdentityKeypair::from_secret_bytes(&MEMBER);
    let endpoint = node::client_endpoint(trusted, Some(&keypair));
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
async fn fill_queue(addr: SocketAddr, trusted: &Path) {
    let keypair = IdentityKeypair::from_secret_bytes(&ATTACKER);
    let endpoint = node::client_endpoint(trusted, Some(&keypair));
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

/// Runs `attack` with `connections` connections: checks the member is
/// served and the node's memory bounded while it holds, then that the node
/// closes every attacking connection as stalled. Returns the growth of the
/// node's resident memory.
async fn attack(running: &Running, trusted: &Path, attack: Attack, connections: usize) -> u64 {
    let queue = IdentityKeypair::from_secret_bytes(&ATTACKER).public_key();
    // Warm: the member's calls allocate what they always will.
    member_is_served(running.addr, trusted).await;
    let before = rss(running);
    let endpoint = endpoint(trusted, ATTACKER);
    let mut open_connections = Vec::new();
    let mut held = Held::default();
    for _ in 0..connections {
        let connection = endpoint.connect(running.addr, "localhost").unwrap().await.unwrap();
        open(attack, &connection, queue.as_bytes(), &mut held).await;
        open_connections.push(connection);
    }
    // Let the node take in all it will.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let served_in = member_is_served(running.addr, trusted).await;
    let during = rss(running);
    let grown = during.saturating_sub(before);
    let bound = PEER_BUDGET + connections as u64 * PER_CONNECTION + SLACK;
    println!(
        "{attack:?} x{connections}: RSS {:.1} -> {:.1} MiB (+{:.1} MiB, bound {:.1} MiB); member served in {served_in:?}",
        mib(before),
        mib(during),
        mib(grown),
        mib(bound),
    );
    assert!(
        grown <= bound,
        "{attack:?} with {connections} connections grew the node by {:.1} MiB, more than {:.1} MiB",
        mib(grown),
        mib(bound)
    );
    // The node closes an attacking connection once it has waited on it for
    // the stall timeout. (Only those holding the budget keep it waiting;
    // the others wait for budget, not for their peer, until those go.)
    let closing = open_connections.iter().map(|connection| Box::pin(connection.closed()));
    let (closed, ..) = tokio::time::timeout(STEP, futures::future::select_all(closing))
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, 0x52u32.into(), "{attack:?}: closed as stalled, {close:?}")
        }
        other => panic!("{attack:?}: the node should close a connection as stalled, got {other}"),
    }
    for connection in &open_connections {
        connection.close(0u32.into(), b"done");
    }
    drop(held);
    endpoint.wait_idle().await;
    grown
}

#[test]
fn memory_stays_bounded_while_peers_hold_what_they_do_not_take() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(
        dir.path(),
        &[
            "--stall-timeout",
            &STALL_SECS.to_string(),
            "--send-bytes-rate",
            "0",
            "--enqueue-rate",
            "0",
        ],
    );
    let trusted: PathBuf = dir.path().join("data/server-cert.der");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        tokio::time::timeout(STEP, fill_queue(running.addr, &trusted))
            .await
            .unwrap();
        for kind in [
            Attack::AnswersNeverRead,
            Attack::PushesNeverTaken,
            Attack::FramesNeverFinished,
        ] {
            for connections in [1, 3, 16] {
                tokio::time::timeout(
                    STEP * 2,
                    attack(&running, &trusted, kind, connections),
                )
                .await
                .unwrap_or_else(|_| panic!("{kind:?} x{connections} finished in time"));
            }
        }
    });
    let (status, log) = terminate(running);
    assert!(status.success(), "the node stopped cleanly: {log}");
}
