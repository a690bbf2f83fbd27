//! Prometheus metrics: the series the node records, the process-wide
//! recorder, and the small HTTP listener serving `GET /metrics`.
//!
//! Recording goes through the `metrics` facade, the de-facto Rust one: each
//! `counter!`/`gauge!`/`histogram!` with static names and labels is a
//! registry lookup and an atomic operation, so the RPC path pays nothing
//! measurable. `metrics-exporter-prometheus` keeps the values and renders the
//! text format; its own HTTP listener (hyper) is left out, the node serves
//! the one page it needs from a tokio `TcpListener` so that the listener
//! stops with the node.
//!
//! One recorder per process. The facade's macros talk to one global
//! recorder, and the node records from many threads (RPC workers, the store
//! writer, PostgreSQL threads), which a thread-local recorder
//! (`metrics::with_local_recorder`) would not follow. So the first node that
//! asks for metrics installs the recorder (in a `OnceLock`) and every node
//! of the process renders the same handle. A process runs one node in
//! production; tests that start several nodes see their sums, and assert
//! that a value moved rather than what it is. With `--metrics-listen` unset
//! no recorder is installed and every macro is a no-op.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use quicnprotochat_proto::outcome::{
    BackupOutcome, ChangeOutcome, DeviceListOutcome, FetchedGroupInfo, FetchedKeyPackage, FetchedWelcomeTree,
    SendOutcome, UploadOutcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// RPC calls answered, by `method` and `outcome` (`ok`, a refusal kind, or `error`).
pub const RPC_CALLS: &str = "quicnprotochat_rpc_calls_total";
/// Time to answer an RPC call, by `method`.
pub const RPC_DURATION: &str = "quicnprotochat_rpc_duration_seconds";
/// QUIC connections open (handshakes in progress included).
pub const CONNECTIONS_OPEN: &str = "quicnprotochat_connections_open";
/// Push subscriptions open.
pub const SUBSCRIPTIONS_OPEN: &str = "quicnprotochat_subscriptions_open";
/// Messages queued for a recipient (one per recipient of an envelope).
pub const MESSAGES_ENQUEUED: &str = "quicnprotochat_messages_enqueued_total";
/// External Commits accepted: members rejoining a group, after losing
/// their state or failing to process a Commit (a resync). Not labelled by
/// group: a group id in a metric would name a group to whoever scrapes it.
pub const REJOINS: &str = "quicnprotochat_rejoins_total";
/// Messages handed to a push subscriber.
pub const MESSAGES_PUSHED: &str = "quicnprotochat_messages_pushed_total";
/// Messages deleted by acknowledgement.
pub const MESSAGES_ACKED: &str = "quicnprotochat_messages_acked_total";
/// Messages waiting in all queues (sampled).
pub const MESSAGES_QUEUED: &str = "quicnprotochat_messages_queued";
/// KeyPackages stored (sampled).
pub const KEY_PACKAGES_STORED: &str = "quicnprotochat_key_packages_stored";
/// KeyPackages handed out, by `last_resort`.
pub const KEY_PACKAGES_SERVED: &str = "quicnprotochat_key_packages_served_total";
/// Commands per store batch (one transaction).
pub const STORE_BATCH_SIZE: &str = "quicnprotochat_store_batch_size";
/// Time to run and commit one store batch.
pub const STORE_COMMIT: &str = "quicnprotochat_store_commit_seconds";
/// Time from a message's enqueue (its commit) to its push.
pub const PUSH_LAG: &str = "quicnprotochat_push_lag_seconds";
/// Refused calls, by `kind`.
pub const REFUSALS: &str = "quicnprotochat_refusals_total";
/// RPC sessions the node ended because the peer broke the protocol.
pub const GUARD_ABORTS: &str = "quicnprotochat_guard_aborts_total";
/// Connections closed for keeping the node waiting past the stall timeout.
pub const STALLED_CONNECTIONS: &str = "quicnprotochat_stalled_connections_total";
/// Bytes held in the node's memory pools, by `pool` (`calls`, `pushes`),
/// beyond each connection's floor (sampled).
pub const MEMORY_HELD: &str = "quicnprotochat_memory_held_bytes";
/// Log lines that could not be written (stderr full or gone).
pub const LOG_LINES_LOST: &str = "quicnprotochat_log_lines_lost_total";

/// How often the sampled gauges are read from the store.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// How often the recorder folds the histogram samples it holds into their
/// buckets: what it holds meanwhile is one interval of samples (~1 MiB at
/// 30k messages/s), whether or not anyone scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Latency buckets (seconds): 100 µs to 10 s, roughly ×2.5 apart.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Batch size buckets (commands), up to the writers' caps.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Largest request head read from a scraper.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's recorder handle, installing the recorder on first use.
/// `None` if another global recorder was installed first (by an embedding
/// program); the node then serves an empty page and says so once.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = buckets(PrometheusBuilder::new())
                .map(PrometheusBuilder::build_recorder)
                .map_err(|e| tracing::warn!("metrics: {e}"))
                .ok()?;
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "metrics: another recorder is installed in this process; /metrics stays empty"
                );
                return None;
            }
            describe();
            Some(handle)
        })
        .clone()
}

fn buckets(builder: PrometheusBuilder) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let mut builder = builder;
    for name in [RPC_DURATION, STORE_COMMIT, PUSH_LAG] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), SECONDS_BUCKETS)?;
    }
    builder.set_buckets_for_metric(Matcher::Full(STORE_BATCH_SIZE.into()), BATCH_BUCKETS)
}

/// Help lines, and a zero for the series without labels, so that a scrape
/// lists them before their first event.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(RPC_CALLS, "RPC calls answered, by method and outcome");
    describe_histogram!(RPC_DURATION, metrics::Unit::Seconds, "Time to answer an RPC call");
    describe_gauge!(CONNECTIONS_OPEN, "QUIC connections open, handshakes included");
    describe_gauge!(SUBSCRIPTIONS_OPEN, "Push subscriptions open");
    describe_counter!(MESSAGES_ENQUEUED, "Messages queued, one per recipient");
    describe_counter!(MESSAGES_PUSHED, "Messages handed to push subscribers");
    describe_counter!(
        REJOINS,
        "Rejoins by external Commit: members that lost their state or could not process a Commit"
    );
    describe_counter!(MESSAGES_ACKED, "Messages deleted by acknowledgement");
    describe_gauge!(MESSAGES_QUEUED, "Messages waiting in all queues (sampled)");
    describe_gauge!(KEY_PACKAGES_STORED, "KeyPackages stored (sampled)");
    describe_counter!(KEY_PACKAGES_SERVED, "KeyPackages handed out");
    describe_histogram!(STORE_BATCH_SIZE, "Commands per store transaction");
    describe_histogram!(
        STORE_COMMIT,
        metrics::Unit::Seconds,
        "Time to run and commit a store batch"
    );
    describe_histogram!(PUSH_LAG, metrics::Unit::Seconds, "Time from enqueue to push");
    describe_counter!(REFUSALS, "Refused calls, by kind");
    describe_counter!(LOG_LINES_LOST, "Log lines that could not be written");
    describe_counter!(
        STALLED_CONNECTIONS,
        "Connections closed for keeping the node waiting past the stall timeout"
    );
    describe_gauge!(
        MEMORY_HELD,
        metrics::Unit::Bytes,
        "Bytes of frames, answers and pushes held in the memory pools, by pool (sampled)"
    );
    describe_counter!(
        GUARD_ABORTS,
        "RPC sessions the RPC guard ended for breaking the protocol"
    );
    for name in [
        MESSAGES_ENQUEUED,
        MESSAGES_PUSHED,
        MESSAGES_ACKED,
        GUARD_ABORTS,
        STALLED_CONNECTIONS,
        REJOINS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        CONNECTIONS_OPEN,
        SUBSCRIPTIONS_OPEN,
        MESSAGES_QUEUED,
        KEY_PACKAGES_STORED,
    ] {
        metrics::gauge!(name).increment(0.0);
    }
}

/// Outcomes that are no refusal: success, an exception, and answers that
/// there is nothing to hand out.
pub const NOT_REFUSALS: &[&str] = &["ok", "error", "none", "unavailable"];

/// Counts one answered call of `method` with `outcome`, and its duration.
pub fn record_call(method: &'static str, outcome: &'static str, started: std::time::Instant) {
    metrics::counter!(RPC_CALLS, "method" => method, "outcome" => outcome).increment(1);
    metrics::histogram!(RPC_DURATION, "method" => method).record(started.elapsed().as_secs_f64());
    if !NOT_REFUSALS.contains(&outcome) {
        metrics::counter!(REFUSALS, "kind" => outcome).increment(1);
    }
}

/// Counts `n` messages queued (one per recipient) by a call the store
/// accepted.
pub fn messages_queued(n: u64) {
    metrics::counter!(MESSAGES_ENQUEUED).increment(n);
}

/// Counts `n` messages deleted by an acknowledgement.
pub fn messages_acked(n: usize) {
    metrics::counter!(MESSAGES_ACKED).increment(n as u64);
}

/// Counts a member who rejoined by an external Commit.
pub fn rejoined() {
    metrics::counter!(REJOINS).increment(1);
}

/// The `outcome` label of a call's typed result: `ok`, or the refusal's
/// kind in snake case; `none` and `unavailable` (nothing to hand out) are
/// answers, not refusals (see [`NOT_REFUSALS`]). Results with no outcome
/// are `ok`.
pub trait Label {
    /// The label.
    fn label(&self) -> &'static str;
}

impl Label for () {
    fn label(&self) -> &'static str {
        "ok"
    }
}

impl<T> Label for Vec<T> {
    fn label(&self) -> &'static str {
        "ok"
    }
}

impl Label for quicnprotochat_core::KeyPackageStock {
    fn label(&self) -> &'static str {
        "ok"
    }
}

impl Label for quicnprotochat_proto::wire::NodeInfo {
    fn label(&self) -> &'static str {
        "ok"
    }
}

impl Label for SendOutcome {
    fn label(&self) -> &'static str {
        match self {
            SendOutcome::Accepted => "ok",
            SendOutcome::RateLimited(_) => "rate_limited",
            SendOutcome::QueueFull(_) => "queue_full",
            SendOutcome::TooLarge(_) => "too_large",
            SendOutcome::StaleEpoch(_) => "stale_epoch",
            SendOutcome::Handshake => "handshake",
        }
    }
}

impl Label for UploadOutcome {
    fn label(&self) -> &'static str {
        match self {
            UploadOutcome::Stored => "ok",
            UploadOutcome::RateLimited(_) => "rate_limited",
            UploadOutcome::TooMany { .. } => "too_many",
        }
    }
}

impl Label for DeviceListOutcome {
    fn label(&self) -> &'static str {
        match self {
            DeviceListOutcome::Stored => "ok",
            DeviceListOutcome::Stale { .. } => "stale",
            DeviceListOutcome::BadSignature => "bad_signature",
            DeviceListOutcome::NotADevice => "not_a_device",
            DeviceListOutcome::TooFar { .. } => "too_far",
            DeviceListOutcome::RemovedDevice => "removed_device",
            DeviceListOutcome::RateLimited(_) => "rate_limited",
        }
    }
}

impl Label for ChangeOutcome {
    fn label(&self) -> &'static str {
        match self {
            ChangeOutcome::Accepted => "ok",
            ChangeOutcome::Conflict { .. } => "conflict",
            ChangeOutcome::RateLimited(_) => "rate_limited",
            ChangeOutcome::QueueFull(_) => "queue_full",
            ChangeOutcome::Invalid { .. } => "invalid",
            ChangeOutcome::UnknownGroup => "unknown_group",
            ChangeOutcome::TooManyProposals { .. } => "too_many_proposals",
        }
    }
}

impl Label for FetchedGroupInfo {
    fn label(&self) -> &'static str {
        match self {
            FetchedGroupInfo::State(_) => "ok",
            FetchedGroupInfo::Unavailable => "unavailable",
            FetchedGroupInfo::NotMember => "not_member",
        }
    }
}

impl Label for FetchedWelcomeTree {
    fn label(&self) -> &'static str {
        match self {
            FetchedWelcomeTree::Tree { .. } => "ok",
            FetchedWelcomeTree::Unavailable => "unavailable",
        }
    }
}

impl Label for BackupOutcome {
    fn label(&self) -> &'static str {
        match self {
            BackupOutcome::Stored => "ok",
            BackupOutcome::RateLimited(_) => "rate_limited",
            BackupOutcome::TooLarge { .. } => "too_large",
        }
    }
}

impl Label for FetchedKeyPackage {
    fn label(&self) -> &'static str {
        match self {
            FetchedKeyPackage::Package(_) => "ok",
            FetchedKeyPackage::None => "none",
            FetchedKeyPackage::RateLimited(_) => "rate_limited",
        }
    }
}

/// Counts a gauge up until dropped.
#[derive(Debug)]
pub struct GaugeGuard(&'static str);

impl GaugeGuard {
    /// Adds one to `name` now; takes it back when dropped.
    pub fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// Serves `GET /metrics` on `listener` from `handle` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &handle).await {
                            tracing::debug!(%remote, "metrics request: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Reads one request head and answers it: the rendered metrics for
/// `GET /metrics`, 404 for anything else; then closes.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    match read {
        Ok(result) => result?,
        Err(_) => return Ok(()),
    }
    let (status, content_type, body) = if is_metrics_request(&head) {
        ("200 OK", "text/plain; version=0.0.4", handle.render())
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether the request line is `GET /metrics` (with or without a query).
fn is_metrics_request(head: &[u8]) -> bool {
    let line = head.split(|&byte| byte == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&byte| byte == b' ');
    let (method, target) = (parts.next(), parts.next());
    method == Some(b"GET")
        && target.is_some_and(|target| target == b"/metrics" || target.starts_with(b"/metrics?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_a_metrics_request() {
        assert!(is_metrics_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_metrics_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"));
        assert!(!is_metrics_request(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_request(b"POST /metrics HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_request(b"GET /metricsx HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_request(b""));
    }
}
