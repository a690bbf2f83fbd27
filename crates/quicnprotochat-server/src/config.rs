//! The node's configuration. `main.rs` fills it from flags and environment
//! variables; tests build it directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, DEFAULT_PORT};

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
