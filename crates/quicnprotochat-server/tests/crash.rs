//! Crash without loss: a client sends steadily, and the recipient fetches
//! and acks steadily, while the real node binary is killed with SIGKILL at
//! random moments and restarted on the same data. Every enqueue the node
//! answered with success must be stored exactly once (one sequence number)
//! and reach the recipient, every ack the node answered must hold after the
//! kills (acks commit without a sync of their own, which a process crash
//! must not undo), and nothing that was never sent may appear.
//!
//! The same with two nodes sharing one PostgreSQL database: the clients
//! move to the other node while one is killed.

#![cfg(unix)]
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use capnp::capability::FromClientHook;
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};
use rand::Rng;

const KILLS: usize = 5;

fn start(dir: &Path, addr: SocketAddr, extra: &[String]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir)
        .args(["--listen", &addr.to_string(), "--enqueue-rate", "0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (ready, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = Some(ready);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("NODE: {line}");
            if line.contains("node listening")
                && let Some(ready) = ready.take()
            {
                let _ = ready.send(());
            }
        }
    });
    listening
        .recv_timeout(Duration::from_secs(30))
        .expect("node starts");
    child
}

fn free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Session {
    _endpoint: quinn::Endpoint,
    delivery: delivery_service::Client,
}

async fn connect(addr: SocketAddr, ca: &Path, identity: &IdentityKeypair) -> Option<Session> {
    let certificate = peer::client_certificate(&identity.pkcs8_der().ok()?).ok()?;
    let config = transport::client_config(cert::load_certificate(ca).ok()?, Some(certificate)).ok()?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().ok()?).ok()?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(addr, "localhost").ok()?;
    let connection = tokio::time::timeout(Duration::from_secs(2), connecting)
        .await
        .ok()?
        .ok()?;
    let (send, recv) = connection.open_bi().await.ok()?;
    let (session, node) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
    tokio::task::spawn_local(session);
    Some(Session {
        _endpoint: endpoint,
        delivery: node.cast_to(),
    })
}

async fn enqueue(session: &Session, recipient: &[u8], id: u64) -> bool {
    let mut request = session.delivery.enqueue_request();
    request.get().set_recipient_key(recipient);
    request.get().set_payload(&id.to_le_bytes());
    request.get().set_message_id(&id.to_le_bytes());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), request.send().promise).await,
        Ok(Ok(_))
    )
}

/// Connects `session` if it is not, to the node at `nodes[*next]`; false
/// (after a short wait, and with `next` moved on to another node) if that
/// node does not answer.
async fn reconnect(
    session: &mut Option<Session>,
    nodes: &[SocketAddr],
    next: &mut usize,
    ca: &Path,
    identity: &IdentityKeypair,
) -> bool {
    if session.is_none() {
        *session = connect(nodes[*next % nodes.len()], ca, identity).await;
        if session.is_none() {
            *next += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return false;
        }
    }
    true
}

/// The messages after `after` as (sequence number, id); `None` if the call
/// failed.
async fn fetch_since(session: &Session, recipient: &[u8], after: u64) -> Option<Vec<(u64, u64)>> {
    let mut request = session.delivery.fetch_since_request();
    request.get().set_recipient_key(recipient);
    request.get().set_after_seq(after);
    let response = tokio::time::timeout(Duration::from_secs(2), request.send().promise)
        .await
        .ok()?
        .ok()?;
    let messages = response.get().ok()?.get_messages().ok()?;
    let mut fetched = Vec::new();
    for message in messages.iter() {
        let payload: [u8; 8] = message.get_payload().ok()?.try_into().ok()?;
        fetched.push((message.get_seq(), u64::from_le_bytes(payload)));
    }
    Some(fetched)
}

async fn ack(session: &Session, recipient: &[u8], up_to: u64) -> bool {
    let mut request = session.delivery.ack_request();
    request.get().set_recipient_key(recipient);
    request.get().set_up_to_seq(up_to);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), request.send().promise).await,
        Ok(Ok(_))
    )
}

fn local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

#[test]
fn acknowledged_messages_survive_repeated_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    survive_kills(dir.path(), &[addr], &[]);
}

#[test]
fn nodes_sharing_postgres_are_killed_and_clients_carry_on_through_the_other() {
    let Some(cluster) = quicnprotochat_testpg::TestPostgres::shared() else {
        return;
    };
    let url = cluster.create_database();
    let dir = tempfile::tempdir().unwrap();
    survive_kills(dir.path(), &[free_port(), free_port()], &["--db".into(), url]);
}

/// Runs the load against `nodes` (all started in `dir` with `extra`
/// arguments) and kills one of them, in turn, [`KILLS`] times.
fn survive_kills(dir: &Path, nodes: &[SocketAddr], extra: &[String]) {
    let ca: PathBuf = dir.join("data/server-cert.der");
    let mut running: Vec<Child> = nodes.iter().map(|addr| start(dir, *addr, extra)).collect();
    let addrs: Vec<SocketAddr> = nodes.to_vec();
    let recipient = IdentityKeypair::from_secret_bytes(&[42; 32]);
    let queue = recipient.public_key();

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (stop, ca, progress, addrs) = (stop.clone(), ca.clone(), progress.clone(), addrs.clone());
        std::thread::spawn(move || {
            local(async move {
                let identity = IdentityKeypair::from_secret_bytes(&[41; 32]);
                let mut acknowledged = Vec::new();
                let mut session = None;
                let mut next = 0;
                let mut id = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if !reconnect(&mut session, &addrs, &mut next, &ca, &identity).await {
                        continue;
                    }
                    let current = session.as_ref().unwrap();
                    if enqueue(current, queue.as_bytes(), id).await {
                        acknowledged.push(id);
                        progress.store(acknowledged.len(), Ordering::SeqCst);
                        id += 1;
                    } else {
                        // Retry the same id on a new connection, to the
                        // next node if there are several: the nodes store
                        // it at most once.
                        session = None;
                        next += 1;
                    }
                }
                (acknowledged, id)
            })
        })
    };

    let receiver = {
        let (stop, ca, addrs) = (stop.clone(), ca.clone(), addrs.clone());
        std::thread::spawn(move || {
            local(async move {
                let recipient = IdentityKeypair::from_secret_bytes(&[42; 32]);
                let queue = recipient.public_key();
                let mut fetched = Vec::new();
                // The highest sequence number whose ack the node answered.
                let mut acked = 0u64;
                let mut after = 0u64;
                let mut session = None;
                // Reads from another node than the sender writes to.
                let mut next = 1;
                while !stop.load(Ordering::SeqCst) {
                    if !reconnect(&mut session, &addrs, &mut next, &ca, &recipient).await {
                        continue;
                    }
                    let current = session.as_ref().unwrap();
                    match fetch_since(current, queue.as_bytes(), after).await {
                        Some(batch) if batch.is_empty() => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Some(batch) => {
                            let last = batch.last().unwrap().0;
                            fetched.extend(batch);
                            after = last;
                            if ack(current, queue.as_bytes(), last).await {
                                acked = last;
                            } else {
                                session = None;
                                next += 1;
                            }
                        }
                        None => {
                            session = None;
                            next += 1;
                        }
                    }
                }
                (fetched, acked)
            })
        })
    };

    let mut rng = rand::thread_rng();
    for kill in 0..KILLS {
        let victim = kill % running.len();
        // Kill only once the load flows again (slow machines take a while
        // to restart), then at a random moment.
        let before = progress.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while progress.load(Ordering::SeqCst) < before + 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "no enqueue acknowledged for 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        Command::new("kill")
            .args(["-9", &running[victim].id().to_string()])
            .status()
            .unwrap();
        running[victim].wait().unwrap();
        running[victim] = start(dir, addrs[victim], extra);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (acknowledged, attempted) = sender.join().unwrap();
    assert!(
        acknowledged.len() > 20,
        "the load kept flowing: {} acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "{} enqueues acknowledged across {KILLS} kills",
        acknowledged.len()
    );

    let (fetched, acked) = receiver.join().unwrap();
    assert!(acked > 0, "the recipient acked while the node was killed");
    let remaining: Vec<(u64, u64)> = local(async {
        let session = connect(addrs[0], &ca, &recipient).await.expect("owner connects");
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let batch = fetch_since(&session, queue.as_bytes(), after)
                .await
                .expect("fetchSince answers");
            let Some(&(last, _)) = batch.last() else { break };
            after = last;
            all.extend(batch);
        }
        all
    });
    assert!(
        remaining.iter().all(|(seq, _)| *seq > acked),
        "every answered ack survived the kills: acked up to {acked}, still queued {:?}",
        remaining
            .iter()
            .map(|(seq, _)| seq)
            .filter(|seq| **seq <= acked)
            .collect::<Vec<_>>()
    );
    // Every id with the sequence numbers it was seen under, fetched during
    // the run (maybe more than once, if an ack was lost with a kill) or
    // still queued.
    let mut stored: HashMap<u64, HashSet<u64>> = HashMap::new();
    for (seq, id) in fetched.iter().chain(&remaining) {
        stored.entry(*id).or_default().insert(*seq);
    }
    for id in &acknowledged {
        assert!(stored.contains_key(id), "acknowledged message {id} was lost");
    }
    for (id, seqs) in &stored {
        assert_eq!(seqs.len(), 1, "message {id} stored once, found under {seqs:?}");
    }
    let sent: HashSet<u64> = (0..=attempted).collect();
    assert!(
        stored.keys().all(|id| sent.contains(id)),
        "nothing appears that was not sent"
    );

    for mut node in running {
        Command::new("kill")
            .args(["-TERM", &node.id().to_string()])
            .status()
            .unwrap();
        assert!(node.wait().unwrap().success());
    }
}
