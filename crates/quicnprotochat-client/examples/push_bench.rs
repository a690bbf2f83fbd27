//! Push latency and fan-out throughput of a node over real QUIC on loopback.
//!
//! Starts a node in this process (temporary directory, real SQLite file,
//! synchronous=FULL, rate limits off), then:
//! - push: one client subscribes to its queue; another, on its own thread,
//!   enqueues 10,000 100-byte messages at a steady 2,000/s, each carrying its
//!   send time; reports enqueue→push latency p50/p99/p99.9/max;
//! - fan-out: one client sends `enqueueBatch` calls of one 1 KiB payload to
//!   100 recipients, 16 calls in flight; reports deliveries/s.
//!
//! Run: `cargo run --release -p quicnprotochat-client --example push_bench [-- MESSAGES RATE]`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use quicnprotochat_client::node_client::{ConnectOptions, NodeClient};
use quicnprotochat_core::{IdentityKeypair, Seq};
use quicnprotochat_proto::outcome::SendOutcome;
use quicnprotochat_proto::wire::Envelope;

#[path = "support/mod.rs"]
mod support;

use support::start_node;

fn main() {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().map_or(10_000, |n| n.parse().expect("MESSAGES"));
    let rate: u64 = args.next().map_or(2_000, |n| n.parse().expect("RATE"));
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path().to_owned());
    let options = ConnectOptions {
        server: node.addr.to_string(),
        server_name: None,
        ca_cert: dir.path().join("server-cert.der"),
    };
    push_latency(&options, messages, rate);
    fan_out(&options, 2_000, 100);
}

fn push_latency(options: &ConnectOptions, messages: usize, rate: u64) {
    let receiver = IdentityKeypair::generate();
    let queue = receiver.public_key();
    let start = Instant::now();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sender_options = options.clone();
    let sender = std::thread::spawn(move || {
        ready_rx.recv().unwrap();
        local(async move {
            let identity = IdentityKeypair::generate();
            let client = NodeClient::connect(&sender_options, Some(&identity))
                .await
                .unwrap();
            let interval = Duration::from_nanos(1_000_000_000 / rate);
            let mut next = tokio::time::Instant::now();
            let client = &client;
            let mut pending = FuturesUnordered::new();
            let mut sent = 0;
            while sent < messages || !pending.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep_until(next), if sent < messages => {
                        next += interval;
                        sent += 1;
                        let mut payload = vec![0u8; 100];
                        payload[..8].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
                        pending.push(async move {
                            let outcome = client.enqueue(&queue, &payload).await.unwrap();
                            assert_eq!(outcome, SendOutcome::Accepted);
                        });
                    }
                    Some(()) = pending.next(), if !pending.is_empty() => {}
                }
            }
        });
    });
    let latencies = local(async {
        let client = NodeClient::connect(options, Some(&receiver)).await.unwrap();
        let (sink, mut pushed) = tokio::sync::mpsc::channel(64);
        let _subscription = client.subscribe(&queue, Seq::ZERO, sink).await.unwrap();
        ready_tx.send(()).unwrap();
        let mut latencies = Vec::with_capacity(messages);
        while latencies.len() < messages {
            let batch = pushed.recv().await.unwrap();
            let now = start.elapsed().as_nanos() as u64;
            for message in &batch {
                let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap());
                latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
            }
            if let Some(last) = batch.last() {
                client.ack(&queue, last.seq).await.unwrap();
            }
        }
        latencies
    });
    sender.join().unwrap();
    let mut sorted = latencies;
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)];
    println!(
        "push latency, {} messages of 100 B at {rate}/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        sorted.len(),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(0.999)),
        ms(*sorted.last().unwrap())
    );
}

fn fan_out(options: &ConnectOptions, batches: usize, recipients: usize) {
    local(async {
        let identity = IdentityKeypair::generate();
        let client = NodeClient::connect(options, Some(&identity)).await.unwrap();
        let to: Vec<_> = (0..recipients)
            .map(|_| IdentityKeypair::generate().public_key())
            .collect();
        let envelope = [Envelope {
            recipients: to.clone(),
            payload: vec![7u8; 1024],
            message_id: None,
        }];
        let started = Instant::now();
        let mut sent = 0;
        let mut pending = FuturesUnordered::new();
        while sent < batches || !pending.is_empty() {
            while sent < batches && pending.len() < 16 {
                pending.push(client.enqueue_batch(&envelope));
                sent += 1;
            }
            assert_eq!(pending.next().await.unwrap().unwrap(), SendOutcome::Accepted);
        }
        let elapsed = started.elapsed();
        println!(
            "fan-out, {batches} payloads of 1 KiB to {recipients} recipients each, 16 calls in flight: {:.0} payloads/s = {:.0} deliveries/s",
            batches as f64 / elapsed.as_secs_f64(),
            (batches * recipients) as f64 / elapsed.as_secs_f64()
        );
    });
}

fn local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
