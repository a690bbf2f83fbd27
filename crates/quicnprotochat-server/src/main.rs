//! `quicnprotochat-server`: parses flags, then runs the node until Ctrl-C or
//! SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use quicnprotochat_server::Config;
use quicnprotochat_server::config::{self, Durability};
use tracing_subscriber::EnvFilter;

/// The quicnprotochat node: KeyPackage directory, device lists and message
/// queues for MLS clients, over QUIC + TLS 1.3 + Cap'n Proto RPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, env = "QUICNPROTOCHAT_LISTEN", default_value_t = config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// TLS certificate (DER); a self-signed one is generated here when missing.
    #[arg(long, env = "QUICNPROTOCHAT_TLS_CERT", default_value = config::DEFAULT_TLS_CERT)]
    tls_cert: PathBuf,
    /// TLS private key (PKCS#8 DER); generated with the certificate when missing.
    #[arg(long, env = "QUICNPROTOCHAT_TLS_KEY", default_value = config::DEFAULT_TLS_KEY)]
    tls_key: PathBuf,
    /// Extra DNS name or IP address for a generated certificate (repeatable;
    /// localhost, 127.0.0.1 and ::1 are always included).
    #[arg(long = "tls-san", env = "QUICNPROTOCHAT_TLS_SAN", value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Database: a SQLite file (created when missing), or a PostgreSQL URL
    /// (postgres://user@host:port/dbname, postgresql://…, ?host=/socket/dir)
    /// naming an existing database that any number of nodes may share.
    #[arg(long, env = "QUICNPROTOCHAT_DB", default_value = config::DEFAULT_DB)]
    db: String,
    /// Largest KeyPackage or message payload accepted, in bytes.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_PAYLOAD", default_value_t = config::DEFAULT_MAX_PAYLOAD)]
    max_payload: usize,
    /// Threads running RPC sessions [default: number of CPUs].
    #[arg(long, env = "QUICNPROTOCHAT_RPC_THREADS")]
    rpc_threads: Option<usize>,
    /// Most messages one recipient's queue may hold; a send beyond it is refused (queueFull).
    #[arg(long, env = "QUICNPROTOCHAT_MAX_QUEUE_DEPTH", default_value_t = config::DEFAULT_MAX_QUEUE_DEPTH)]
    max_queue_depth: usize,
    /// Messages one identity may queue per second, bursts of twice that (0: unlimited).
    #[arg(long, env = "QUICNPROTOCHAT_ENQUEUE_RATE", default_value_t = config::DEFAULT_ENQUEUE_RATE)]
    enqueue_rate: u32,
    /// Payload bytes one identity may store per second, bursts of twice that (0: unlimited).
    #[arg(long, env = "QUICNPROTOCHAT_SEND_BYTES_RATE", default_value_t = config::DEFAULT_SEND_BYTES_RATE)]
    send_bytes_rate: u64,
    /// Most payload bytes waiting in one recipient's queue.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_QUEUE_BYTES", default_value_t = config::DEFAULT_MAX_QUEUE_BYTES)]
    max_queue_bytes: u64,
    /// Most unexpired KeyPackages one identity may keep on the node, per ciphersuite.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_KEY_PACKAGES", default_value_t = config::DEFAULT_MAX_KEY_PACKAGES)]
    max_key_packages: u32,
    /// Longest KeyPackage lifetime accepted, in days.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_KEY_PACKAGE_LIFETIME_DAYS", default_value_t = config::DEFAULT_MAX_KEY_PACKAGE_LIFETIME_DAYS)]
    max_key_package_lifetime_days: u64,
    /// KeyPackages one identity may upload per minute, bursts of as many (0: unlimited).
    #[arg(long, env = "QUICNPROTOCHAT_KEY_PACKAGE_UPLOAD_RATE", default_value_t = config::DEFAULT_KEY_PACKAGE_UPLOAD_RATE)]
    key_package_upload_rate: u32,
    /// Ordinary KeyPackages of one identity and ciphersuite handed out per minute, whoever asks (0: unlimited).
    #[arg(long, env = "QUICNPROTOCHAT_KEY_PACKAGE_SERVE_RATE", default_value_t = config::DEFAULT_KEY_PACKAGE_SERVE_RATE)]
    key_package_serve_rate: u32,
    /// KeyPackage (and device list) fetches per second per identity, or per address when anonymous (0: unlimited).
    #[arg(long, env = "QUICNPROTOCHAT_KEY_PACKAGE_FETCH_RATE", default_value_t = config::DEFAULT_KEY_PACKAGE_FETCH_RATE)]
    key_package_fetch_rate: u32,
    /// Pings per second per identity, or per address when anonymous (0: unlimited).
    #[arg(long, env = "QUICNPROTOCHAT_PING_RATE", default_value_t = config::DEFAULT_PING_RATE)]
    ping_rate: u32,
    /// Most connections one remote IP address may hold.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = config::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,
    /// How many leading bits of an IPv6 address count as one address for
    /// --max-connections-per-address (64: a /64, what one subscriber gets).
    #[arg(long, env = "QUICNPROTOCHAT_IPV6_PREFIX", default_value_t = config::DEFAULT_IPV6_PREFIX,
          value_parser = clap::value_parser!(u8).range(0..=128))]
    ipv6_prefix: u8,
    /// Most connections one client identity may hold, from any address; further
    /// ones are closed after the handshake.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_CONNECTIONS_PER_IDENTITY", default_value_t = config::DEFAULT_MAX_CONNECTIONS_PER_IDENTITY)]
    max_connections_per_identity: usize,
    /// Most connections without a client certificate.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_ANONYMOUS_CONNECTIONS", default_value_t = config::DEFAULT_MAX_ANONYMOUS_CONNECTIONS)]
    max_anonymous_connections: usize,
    /// Most connections open at once; further ones are refused.
    #[arg(long, env = "QUICNPROTOCHAT_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Percent of --max-connections kept for identities the node already serves (with
    /// KeyPackages, queued messages or a device list): strangers, anonymous or not,
    /// share the rest.
    #[arg(long, env = "QUICNPROTOCHAT_RESERVED_CONNECTIONS_PERCENT",
          default_value_t = config::DEFAULT_RESERVED_CONNECTIONS_PERCENT,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    reserved_connections_percent: u8,
    /// Seconds of silence after which a connection is closed.
    #[arg(long, env = "QUICNPROTOCHAT_IDLE_TIMEOUT", default_value_t = config::DEFAULT_IDLE_TIMEOUT_SECS)]
    idle_timeout: u64,
    /// MiB the node may hold for all peers together: frames being read, answers and
    /// pushes not yet taken (3/4 for calls, 1/4 for pushes). Each connection may also
    /// hold 64 KiB of each beyond it, so a member's small calls are always served.
    #[arg(long, env = "QUICNPROTOCHAT_MEMORY_BUDGET_MIB", default_value_t = config::DEFAULT_MEMORY_BUDGET_MIB)]
    memory_budget_mib: usize,
    /// Seconds a connection may keep the node waiting (no credit for its answers,
    /// a frame begun and not finished, a push not taken) before it is closed.
    #[arg(long, env = "QUICNPROTOCHAT_STALL_TIMEOUT", default_value_t = config::DEFAULT_STALL_TIMEOUT_SECS)]
    stall_timeout: u64,
    /// Bytes asked of the kernel for each UDP socket buffer (0: the system's default).
    /// Linux grants at most net.core.rmem_max / wmem_max; the node warns when it gets less.
    #[arg(long, env = "QUICNPROTOCHAT_UDP_BUFFER", default_value_t = config::DEFAULT_UDP_BUFFER)]
    udp_buffer: usize,
    /// full: fsync every commit (acknowledged messages survive a power cut);
    /// normal: fsync at checkpoints (they survive a node crash, not always a power cut).
    #[arg(long, env = "QUICNPROTOCHAT_DURABILITY", value_enum, default_value_t = DurabilityArg::Full)]
    durability: DurabilityArg,
    /// Days an undelivered message is kept before it is deleted.
    #[arg(long, env = "QUICNPROTOCHAT_RETENTION_DAYS", default_value_t = config::DEFAULT_RETENTION_DAYS)]
    retention_days: u64,
    /// Days a group may go without a change before the node forgets its public view (0: never).
    #[arg(long, env = "QUICNPROTOCHAT_GROUP_RETENTION_DAYS", default_value_t = config::DEFAULT_GROUP_RETENTION_DAYS)]
    group_retention_days: u64,
    /// TCP address serving Prometheus metrics at http://ADDR/metrics (off when unset).
    #[arg(long, env = "QUICNPROTOCHAT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines on stderr as text, or as one JSON object per line.
    #[arg(long, env = "QUICNPROTOCHAT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--durability` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DurabilityArg {
    Full,
    Normal,
}

/// Exit code when stderr cannot be written at start (`EX_IOERR`): the node
/// would run blind, and there is nowhere to say why.
const EXIT_STDERR_UNWRITABLE: i32 = 74;

/// stderr for log lines, where a line that cannot be written (a full disk
/// under a redirected log, a closed pipe) is counted
/// (`quicnprotochat_log_lines_lost_total`) and dropped: the node serves on
/// without its log. (tracing-subscriber's own report of such a failure is
/// an `eprintln!`, which panics the thread that logged, a store writer
/// say; it is turned off below.)
struct LossyStderr;

/// Log lines lost so far (see [`LossyStderr`]).
static LOG_LINES_LOST: AtomicU64 = AtomicU64::new(0);

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            LOG_LINES_LOST.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(quicnprotochat_server::metrics::LOG_LINES_LOST).increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(|| LossyStderr)
            .log_internal_errors(false)
            .init(),
        // One object per line, with the current span's fields (the
        // connection's peer and remote address) and the spans above it.
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(|| LossyStderr)
            .log_internal_errors(false)
            .init(),
    }
    // A node whose stderr is unwritable from the start (`2>/dev/full`)
    // exits with a code of its own rather than run without a log (later,
    // lost lines are only counted).
    tracing::info!("quicnprotochat-server {} starting", env!("CARGO_PKG_VERSION"));
    if LOG_LINES_LOST.load(Ordering::Relaxed) > 0 {
        std::process::exit(EXIT_STDERR_UNWRITABLE);
    }
    let defaults = Config::default();
    let config = Config {
        listen: args.listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_names: args.tls_san,
        db: config::Database::parse(&args.db),
        max_payload: args.max_payload,
        rpc_threads: args.rpc_threads.unwrap_or(defaults.rpc_threads),
        max_queue_depth: args.max_queue_depth,
        enqueue_rate: args.enqueue_rate,
        send_bytes_rate: args.send_bytes_rate,
        max_queue_bytes: args.max_queue_bytes,
        max_key_packages: args.max_key_packages,
        max_key_package_lifetime: config::retention_days(args.max_key_package_lifetime_days),
        key_package_serve_rate: args.key_package_serve_rate,
        key_package_upload_rate: args.key_package_upload_rate,
        key_package_fetch_rate: args.key_package_fetch_rate,
        ping_rate: args.ping_rate,
        max_connections: args.max_connections,
        reserved_connections_percent: args.reserved_connections_percent,
        max_connections_per_address: args.max_connections_per_address,
        ipv6_prefix: args.ipv6_prefix,
        max_connections_per_identity: args.max_connections_per_identity,
        max_anonymous_connections: args.max_anonymous_connections,
        retry_above: config::DEFAULT_RETRY_ABOVE,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        memory_budget: args.memory_budget_mib.saturating_mul(1024 * 1024),
        stall_timeout: Duration::from_secs(args.stall_timeout),
        udp_buffer: args.udp_buffer,
        retention: config::retention_days(args.retention_days),
        group_retention: config::retention_days(args.group_retention_days),
        durability: match args.durability {
            DurabilityArg::Full => Durability::Full,
            DurabilityArg::Normal => Durability::Normal,
        },
        metrics_listen: args.metrics_listen,
    };
    quicnprotochat_server::run(config, shutdown_signal())
        .await
        .context("the node stopped with an error")
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
///
/// The handlers are installed here, before the node starts, not when the
/// future is first polled: a SIGTERM arriving just after the node logs its
/// address must stop it cleanly, not kill it.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let (mut interrupt, mut terminate) = match (interrupt, terminate) {
            (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot listen for Ctrl-C and SIGTERM: {e}");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("Ctrl-C received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    }
}
