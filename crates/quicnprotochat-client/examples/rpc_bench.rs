//! Round-trip benchmark of a node over real QUIC on loopback.
//!
//! Starts a node in this process (temporary directory, real SQLite file,
//! synchronous=FULL) unless `--server HOST:PORT --ca-cert FILE` name a running
//! one, then measures with one client connection:
//! - `ping` round trip (sequential);
//! - sequential enqueue + fetch pairs per second (100-byte payloads);
//! - enqueues per second with 64 calls in flight (group commit at work);
//! - with its own node of one RPC thread (so that both connections share
//!   it), `ping` round trips on one connection while another uploads
//!   batches of 100 KeyPackages back to back.
//!
//! Run: `cargo run --release -p quicnprotochat-client --example rpc_bench [-- --iterations N]`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use quicnprotochat_client::node_client::{ConnectOptions, NodeClient};
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::outcome::SendOutcome;

#[path = "support/mod.rs"]
mod support;

use support::{start_node, start_node_with};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut iterations = 5000usize;
    let mut external: Option<(String, PathBuf)> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--iterations" => iterations = args.next().and_then(|n| n.parse().ok()).expect("--iterations N"),
            "--server" => {
                let server = args.next().expect("--server HOST:PORT");
                let cert = PathBuf::from("data/server-cert.der");
                external = Some((server, cert));
            }
            "--ca-cert" => {
                let cert = args.next().expect("--ca-cert FILE");
                if let Some((_, c)) = external.as_mut() {
                    *c = PathBuf::from(cert);
                }
            }
            other => panic!("unknown argument {other}"),
        }
    }

    let temp = tempfile::tempdir().unwrap();
    let own_node = external.is_none();
    let (options, _node) = match external {
        Some((server, ca_cert)) => (
            ConnectOptions {
                server,
                server_name: None,
                ca_cert,
            },
            None,
        ),
        None => {
            let node = start_node(temp.path().to_owned());
            (
                ConnectOptions {
                    server: node.addr.to_string(),
                    server_name: None,
                    ca_cert: node.cert().to_owned(),
                },
                Some(node),
            )
        }
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let identity = IdentityKeypair::generate();
        let client = NodeClient::connect(&options, Some(&identity)).await.unwrap();
        let recipient = identity.public_key();
        let payload = vec![0x5au8; 100];

        // Warm up the connection and the database.
        for _ in 0..200 {
            client.ping().await.unwrap();
        }

        let mut rtts = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let started = Instant::now();
            client.ping().await.unwrap();
            rtts.push(started.elapsed());
        }
        rtts.sort();
        println!(
            "ping round trip ({iterations} sequential): p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs",
            micros(rtts[rtts.len() / 2]),
            micros(rtts[rtts.len() * 99 / 100]),
            micros(rtts.iter().sum::<Duration>() / rtts.len() as u32)
        );

        let started = Instant::now();
        for _ in 0..iterations {
            assert_eq!(client.enqueue(&recipient, &payload).await.unwrap(), SendOutcome::Accepted);
            let fetched = client.fetch(&recipient).await.unwrap();
            assert_eq!(fetched.len(), 1);
        }
        let elapsed = started.elapsed();
        println!(
            "sequential enqueue+fetch ({iterations} pairs, 100 B): {:.0} pairs/s ({:.0} calls/s), {:.1} µs per pair",
            iterations as f64 / elapsed.as_secs_f64(),
            2.0 * iterations as f64 / elapsed.as_secs_f64(),
            micros(elapsed / iterations as u32)
        );

        let in_flight = 64;
        let total = iterations * 4;
        let started = Instant::now();
        {
            let mut sent = 0;
            let mut pending = FuturesUnordered::new();
            while sent < total || !pending.is_empty() {
                while sent < total && pending.len() < in_flight {
                    pending.push(client.enqueue(&recipient, &payload));
                    sent += 1;
                }
                assert_eq!(pending.next().await.unwrap().unwrap(), SendOutcome::Accepted);
            }
        }
        let elapsed = started.elapsed();
        println!(
            "pipelined enqueue ({total} calls, {in_flight} in flight, 100 B): {:.0} enqueues/s",
            total as f64 / elapsed.as_secs_f64()
        );
        let mut drained = 0;
        loop {
            let batch = client.fetch(&recipient).await.unwrap();
            if batch.is_empty() {
                break;
            }
            drained += batch.len();
        }
        assert_eq!(drained, total);
        client.close().await;
    });

    if own_node {
        pings_beside_key_package_uploads(&runtime);
    }
}

/// Pings on one connection while another uploads batches of 100
/// KeyPackages (each checked by the node: two signatures and more), on a
/// node of one RPC thread with the upload limits off.
fn pings_beside_key_package_uploads(runtime: &tokio::runtime::Runtime) {
    const BATCHES: usize = 20;
    let temp = tempfile::tempdir().unwrap();
    let node = start_node_with(temp.path().to_owned(), |config| {
        config.rpc_threads = 1;
        config.key_package_upload_rate = 0;
        config.send_bytes_rate = 0;
        config.max_key_packages = 1_000_000;
    });
    let options = ConnectOptions {
        server: node.addr.to_string(),
        server_name: None,
        ca_cert: node.cert().to_owned(),
    };
    let uploader = IdentityKeypair::generate();
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let batches: Vec<Vec<Vec<u8>>> = (0..BATCHES)
        .map(|_| {
            (0..100)
                .map(|_| quicnprotochat_core::generate_key_package(&provider, &uploader).unwrap())
                .collect()
        })
        .collect();
    tokio::task::LocalSet::new().block_on(runtime, async {
        let pinger = NodeClient::connect(&options, Some(&IdentityKeypair::generate()))
            .await
            .unwrap();
        let uploading = NodeClient::connect(&options, Some(&uploader)).await.unwrap();
        for _ in 0..200 {
            pinger.ping().await.unwrap();
        }
        let (done, mut finished) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        let uploads = tokio::task::spawn_local(async move {
            for batch in &batches {
                uploading
                    .upload_key_packages(&uploader.public_key(), batch)
                    .await
                    .unwrap();
            }
            let elapsed = started.elapsed();
            let _ = done.send(());
            uploading.close().await;
            elapsed
        });
        let mut rtts = Vec::new();
        while finished.try_recv().is_err() {
            let sent = Instant::now();
            pinger.ping().await.unwrap();
            rtts.push(sent.elapsed());
        }
        let elapsed = uploads.await.unwrap();
        rtts.sort();
        println!(
            "ping beside 100-KeyPackage uploads (one RPC thread; {BATCHES} uploads in {:.0} ms, {:.0} KeyPackages/s): \
             {} pings, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            elapsed.as_secs_f64() * 1e3,
            (BATCHES * 100) as f64 / elapsed.as_secs_f64(),
            rtts.len(),
            micros(rtts[rtts.len() / 2]),
            micros(rtts[rtts.len() * 99 / 100]),
            micros(rtts[rtts.len() - 1]),
        );
        pinger.close().await;
    });
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
