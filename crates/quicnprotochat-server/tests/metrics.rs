//! Operating a node: the Prometheus endpoint (`--metrics-listen`) serves
//! every series the node records and calls move them, over real QUIC
//! against the node library on 127.0.0.1:0; the real binary's
//! `--log-format json` lines parse and carry the connection's span (its
//! push tasks' lines too); the
//! Grafana dashboard in `deploy/` is valid JSON graphing the main series.
//!
//! The recorder is one per process (see `metrics.rs`), so the tests here
//! assert that values moved, never what they are.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use capnp::capability::FromClientHook;
use node::TestNode;
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{IdentityKeypair, KeyPackageOptions, Suite};
use quicnprotochat_proto::delivery_capnp::{delivery_service, message_receiver};
use quicnprotochat_proto::outcome::{FetchedKeyPackage, SendOutcome, UploadOutcome};
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, rpc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every series the node exports.
const SERIES: &[&str] = &[
    "quicnprotochat_rpc_calls_total",
    "quicnprotochat_rpc_duration_seconds",
    "quicnprotochat_connections_open",
    "quicnprotochat_subscriptions_open",
    "quicnprotochat_messages_enqueued_total",
    "quicnprotochat_messages_pushed_total",
    "quicnprotochat_messages_acked_total",
    "quicnprotochat_messages_queued",
    "quicnprotochat_key_packages_stored",
    "quicnprotochat_key_packages_served_total",
    "quicnprotochat_store_batch_size",
    "quicnprotochat_store_commit_seconds",
    "quicnprotochat_push_lag_seconds",
    "quicnprotochat_refusals_total",
    "quicnprotochat_guard_aborts_total",
    "quicnprotochat_rejoins_total",
];

/// `GET path` over plain TCP; the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// A node serving metrics on a port of its own, configured further by
/// `adjust`.
async fn metrics_node(adjust: impl FnOnce(&mut quicnprotochat_server::Config)) -> TestNode {
    TestNode::start(|config| {
        config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        adjust(config);
    })
    .await
}

async fn scrape(node: &TestNode) -> String {
    let (status, body) = get(node.metrics_addr().unwrap(), "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// The value of the sample of `name` carrying every one of `labels`
/// (`key="value"`), if the page has one.
fn sample(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let series = line.split_whitespace().next().unwrap_or_default();
            series == name || series.starts_with(&format!("{name}{{"))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

fn device(seed: u8) -> IdentityKeypair {
    IdentityKeypair::from_secret_bytes(&[seed; 32])
}

/// Hands pushed sequence numbers to a channel.
struct Receiver(tokio::sync::mpsc::UnboundedSender<u64>);

impl message_receiver::Server for Receiver {
    async fn deliver(
        self: capnp::capability::Rc<Self>,
        params: message_receiver::DeliverParams,
        _: message_receiver::DeliverResults,
    ) -> Result<(), capnp::Error> {
        for message in params.get()?.get_messages()? {
            let _ = self.0.send(message.get_seq());
        }
        Ok(())
    }
}

async fn enqueue(delivery: &delivery_service::Client, recipient: &IdentityKeypair, id: u8) -> SendOutcome {
    let mut request = delivery.enqueue_request();
    request.get().set_recipient_key(recipient.public_key().as_bytes());
    request.get().set_payload(b"counted");
    request.get().set_message_id(&[id; 16]);
    let response = request.send().promise.await.unwrap();
    SendOutcome::read(response.get().unwrap().get_outcome().unwrap()).unwrap()
}

#[tokio::test]
async fn the_metrics_endpoint_serves_every_series_and_calls_move_them() {
    let node = metrics_node(|config| {
        // The second message to a queue is refused: a refusal to count.
        config.max_queue_depth = 1;
    })
    .await;
    let before = scrape(&node).await;

    // A KeyPackage stored and served.
    let owner = device(1);
    node.with_auth(Some(&owner), async |auth| {
        let package = quicnprotochat_core::generate_key_package_with(
            &OpenMlsRustCrypto::default(),
            &owner,
            KeyPackageOptions {
                last_resort: false,
                lifetime_seconds: None,
                suite: Suite::X25519,
            },
        )
        .unwrap();
        let mut request = auth.upload_key_packages_request();
        request.get().set_identity_key(owner.public_key().as_bytes());
        request.get().init_packages(1).set(0, &package);
        let response = request.send().promise.await.unwrap();
        let outcome = UploadOutcome::read(response.get().unwrap().get_outcome().unwrap()).unwrap();
        assert_eq!(outcome, UploadOutcome::Stored);
        let mut request = auth.fetch_key_package_request();
        request.get().set_identity_key(owner.public_key().as_bytes());
        let response = request.send().promise.await.unwrap();
        let fetched = FetchedKeyPackage::read(response.get().unwrap().get_outcome().unwrap()).unwrap();
        assert!(matches!(fetched, FetchedKeyPackage::Package(_)));
    })
    .await;

    // A message queued, pushed and acknowledged; a second one refused.
    let me = device(2);
    let during = node
        .with_delivery(Some(&me), async |delivery| {
            let (pushed, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
            let mut request = delivery.subscribe_request();
            request.get().set_recipient_key(me.public_key().as_bytes());
            request
                .get()
                .set_receiver(capnp_rpc::new_client(Receiver(pushed)));
            let subscription = request.send().promise.await.unwrap();
            assert_eq!(enqueue(&delivery, &me, 1).await, SendOutcome::Accepted);
            let seq = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(
                enqueue(&delivery, &me, 2).await,
                SendOutcome::QueueFull(_)
            ));
            // Scraped while the connection and the subscription are open.
            let during = scrape(&node).await;
            let mut request = delivery.ack_request();
            request.get().set_recipient_key(me.public_key().as_bytes());
            request.get().set_up_to_seq(seq);
            request.send().promise.await.unwrap();
            drop(subscription);
            during
        })
        .await;
    let after = scrape(&node).await;

    for name in SERIES {
        assert!(
            after.contains(&format!("\n{name}")) || after.starts_with(name),
            "{name} missing from\n{after}"
        );
    }
    let moved = |name: &str, labels: &[&str]| {
        let was = sample(&before, name, labels).unwrap_or(0.0);
        let is = sample(&after, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{after}"));
        assert!(is > was, "{name} {labels:?}: {was} → {is}");
    };
    moved(
        "quicnprotochat_rpc_calls_total",
        &["method=\"enqueue\"", "outcome=\"ok\""],
    );
    moved(
        "quicnprotochat_rpc_calls_total",
        &["method=\"enqueue\"", "outcome=\"queue_full\""],
    );
    moved("quicnprotochat_refusals_total", &["kind=\"queue_full\""]);
    moved(
        "quicnprotochat_rpc_duration_seconds_count",
        &["method=\"uploadKeyPackages\""],
    );
    moved("quicnprotochat_messages_enqueued_total", &[]);
    moved("quicnprotochat_messages_pushed_total", &[]);
    moved("quicnprotochat_messages_acked_total", &[]);
    moved(
        "quicnprotochat_key_packages_served_total",
        &["last_resort=\"false\""],
    );
    moved("quicnprotochat_store_batch_size_count", &[]);
    moved("quicnprotochat_store_commit_seconds_count", &[]);
    moved("quicnprotochat_push_lag_seconds_count", &[]);
    // Explicit buckets, not the exporter's summaries.
    assert!(
        after.contains("quicnprotochat_store_commit_seconds_bucket{le=\"0.001\"}"),
        "{after}"
    );
    let open = |page: &str, name: &str| sample(page, name, &[]).unwrap();
    assert!(
        open(&during, "quicnprotochat_connections_open") >= 1.0,
        "{during}"
    );
    assert!(
        open(&during, "quicnprotochat_subscriptions_open") >= 1.0,
        "{during}"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_session_the_rpc_guard_ends_is_counted() {
    let node = metrics_node(|_| {}).await;
    let aborts = |page: &str| sample(page, "quicnprotochat_guard_aborts_total", &[]).unwrap_or(0.0);
    let before = aborts(&scrape(&node).await);

    let endpoint = node::client_endpoint(node.cert(), None);
    let connection = endpoint.connect(node.addr(), "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // A frame header claiming 2^32 segments: the guard refuses it before
    // reading on, and the node ends the session.
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0])
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await;
    assert!(ended.is_ok(), "the node ends the session");

    // The count moves once the session's task has seen it end.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = aborts(&scrape(&node).await);
        if now > before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "guard aborts stayed at {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    node.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_answers_only_get_metrics() {
    let node = metrics_node(|_| {}).await;
    let addr = node.metrics_addr().unwrap();
    let (status, _) = get(addr, "/").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("# HELP quicnprotochat_"), "{body}");
    node.stop().await;
    // The listener stops with the node.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn a_node_without_metrics_listen_serves_no_metrics() {
    let config = quicnprotochat_server::Config::default();
    assert_eq!(config.metrics_listen, None);
}

/// A receiver that refuses every push, which ends the push task.
struct Refuser;

impl message_receiver::Server for Refuser {
    async fn deliver(
        self: capnp::capability::Rc<Self>,
        _: message_receiver::DeliverParams,
        _: message_receiver::DeliverResults,
    ) -> Result<(), capnp::Error> {
        Err(capnp::Error::failed("not taking pushes".into()))
    }
}

/// One connection to `addr` as `device`, subscribed to its own queue with a
/// receiver refusing pushes, then enqueueing to it.
fn connect_and_enqueue(addr: SocketAddr, trusted: &std::path::Path, device: &IdentityKeypair) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let endpoint = node::client_endpoint(trusted, Some(device));
        let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (send, recv) = connection.open_bi().await.unwrap();
        let (session, node) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
        tokio::task::spawn_local(session);
        let delivery: delivery_service::Client = node.cast_to();
        let mut request = delivery.subscribe_request();
        request.get().set_recipient_key(device.public_key().as_bytes());
        request.get().set_receiver(capnp_rpc::new_client(Refuser));
        let _subscription = request.send().promise.await.unwrap();
        enqueue(&delivery, device, 7).await;
        // Long enough for the push to be made and refused.
        tokio::time::sleep(Duration::from_millis(300)).await;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
}

#[cfg(unix)]
#[test]
fn json_log_lines_parse_and_carry_the_connection_span_without_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "info,quicnprotochat_server=debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("server binary starts");
    let (lines, log) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let next = || -> serde_json::Value {
        let line = log.recv_timeout(Duration::from_secs(30)).expect("a log line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr: SocketAddr = loop {
        let line = next();
        assert!(line["level"].is_string(), "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
        if line["fields"]["message"] == "node listening" {
            break line["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let me = device(9);
    connect_and_enqueue(addr, &dir.path().join("data/server-cert.der"), &me);
    // The connection's first line names the peer, at debug level only: the
    // span, which every line of the connection carries at any level, names
    // its number and address, never the identity.
    let opened = loop {
        let line = next();
        if line["fields"]["message"] == "connection from" {
            break line;
        }
    };
    assert_eq!(opened["level"], "DEBUG", "{opened}");
    assert_eq!(opened["fields"]["peer"], me.public_key().short(), "{opened}");
    let span = opened["span"].clone();
    assert_eq!(span["name"], "connection", "{span}");
    assert!(span["connection"].as_u64().is_some(), "{span}");
    assert!(span.get("peer").is_none(), "{span}");
    assert!(
        span["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{span}"
    );
    // The push task's lines carry the connection's span too.
    let push = loop {
        let line = next();
        if line["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("push to"))
        {
            break line;
        }
    };
    assert_eq!(push["span"], span, "{push}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_grafana_dashboard_is_json_and_graphs_the_main_series() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|panels| !panels.is_empty())
    );
    for name in [
        "quicnprotochat_rpc_calls_total",
        "quicnprotochat_rpc_duration_seconds_bucket",
        "quicnprotochat_connections_open",
        "quicnprotochat_subscriptions_open",
        "quicnprotochat_messages_enqueued_total",
        "quicnprotochat_messages_pushed_total",
        "quicnprotochat_messages_acked_total",
        "quicnprotochat_messages_queued",
        "quicnprotochat_store_commit_seconds_bucket",
        "quicnprotochat_refusals_total",
        "quicnprotochat_push_lag_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} not graphed");
    }
}
