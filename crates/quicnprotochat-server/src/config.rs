//! The node's configuration. `main.rs` fills it from flags and environment
//! variables; tests build it directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, DEFAULT_PORT};

pub use crate::store::Durability;

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
    /// Most messages one recipient's queue may hold; beyond it enqueue
    /// answers "queue full".
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
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            tls_cert: PathBuf::from("data/server-cert.der"),
            tls_key: PathBuf::from("data/server-key.der"),
            tls_names: Vec::new(),
            db: PathBuf::from("data/node.db"),
            max_payload: DEFAULT_MAX_PAYLOAD,
            rpc_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_queue_depth: 10_000,
            enqueue_rate: 1_000,
            key_package_fetch_rate: 20,
            ping_rate: 100,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 24 * 60 * 60),
            durability: Durability::Full,
        }
    }
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
