//! The node's configuration. `main.rs` fills it from flags and environment
//! variables; tests build it directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use quicnprotochat_proto::DEFAULT_PORT;

pub use crate::delivery::DEFAULT_MAX_QUEUE_DEPTH;
pub use crate::store::Durability;
pub use quicnprotochat_proto::DEFAULT_MAX_PAYLOAD;

// The defaults, each stated once: `Config::default` and the flags of
// `quicnprotochat-server` both read these.

/// Where the node listens: every IPv4 address, port 4201.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT);
/// The node's certificate file.
pub const DEFAULT_TLS_CERT: &str = "data/server-cert.der";
/// The node's private key file.
pub const DEFAULT_TLS_KEY: &str = "data/server-key.der";
/// The node's database.
pub const DEFAULT_DB: &str = "data/node.db";
/// Messages one identity may queue per second.
pub const DEFAULT_ENQUEUE_RATE: u32 = 1_000;
/// KeyPackage fetches per second per caller.
pub const DEFAULT_KEY_PACKAGE_FETCH_RATE: u32 = 20;
/// Pings per second per caller.
pub const DEFAULT_PING_RATE: u32 = 100;
/// Connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Seconds of silence before a connection is closed.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;
/// Days an undelivered message is kept.
pub const DEFAULT_RETENTION_DAYS: u64 = 30;

/// Largest payload limit a node can be configured with. Fetch answers carry
/// whole payloads, and clients refuse RPC messages above 64 MiB.
pub const MAX_PAYLOAD_CEILING: usize = 16 * 1024 * 1024;

/// Everything the node can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// DER certificate the node presents; generated when missing.
    pub tls_cert: PathBuf,
    /// DER (PKCS#8) private key of the certificate; generated when missing.
    pub tls_key: PathBuf,
    /// Extra DNS names or IP addresses a generated certificate is valid for,
    /// besides localhost, 127.0.0.1 and ::1.
    pub tls_names: Vec<String>,
    /// SQLite database file; created with its directory when missing.
    pub db: PathBuf,
    /// Largest KeyPackage or message payload accepted, in bytes.
    pub max_payload: usize,
    /// Threads running Cap'n Proto RPC sessions (connections are spread over
    /// them). Defaults to the number of CPUs.
    pub rpc_threads: usize,
    /// Most messages one recipient's queue may hold; a send that would go
    /// beyond it is refused with the `queueFull` outcome.
    pub max_queue_depth: usize,
    /// Messages one identity may queue per second (bursts of twice that);
    /// 0: unlimited.
    pub enqueue_rate: u32,
    /// KeyPackage fetches per second per identity, or per address for
    /// anonymous callers (bursts of twice that); 0: unlimited.
    pub key_package_fetch_rate: u32,
    /// Pings per second per identity, or per address for anonymous callers
    /// (bursts of twice that); 0: unlimited.
    pub ping_rate: u32,
    /// Most connections open at once; further ones are refused.
    pub max_connections: usize,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// Undelivered messages older than this are deleted.
    pub retention: Duration,
    /// fsync every commit (Full) or only at checkpoints (Normal).
    pub durability: Durability,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            tls_cert: PathBuf::from(DEFAULT_TLS_CERT),
            tls_key: PathBuf::from(DEFAULT_TLS_KEY),
            tls_names: Vec::new(),
            db: PathBuf::from(DEFAULT_DB),
            max_payload: DEFAULT_MAX_PAYLOAD,
            rpc_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            enqueue_rate: DEFAULT_ENQUEUE_RATE,
            key_package_fetch_rate: DEFAULT_KEY_PACKAGE_FETCH_RATE,
            ping_rate: DEFAULT_PING_RATE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            retention: retention_days(DEFAULT_RETENTION_DAYS),
            durability: Durability::Full,
        }
    }
}

/// `days` as a duration (saturating).
pub fn retention_days(days: u64) -> Duration {
    Duration::from_secs(days.saturating_mul(24 * 60 * 60))
}

impl Config {
    /// A configuration keeping the certificate and database in `dir`,
    /// listening on `listen`; the rest default. Handy for tests.
    pub fn in_dir(dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        let dir = dir.into();
        Self {
            listen,
            tls_cert: dir.join("server-cert.der"),
            tls_key: dir.join("server-key.der"),
            db: dir.join("node.db"),
            ..Self::default()
        }
    }
}
