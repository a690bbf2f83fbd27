//! The node's configuration. `main.rs` fills it from flags and environment
//! variables; tests build it directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use quicnprotochat_proto::DEFAULT_PORT;

pub use crate::delivery::DEFAULT_MAX_QUEUE_DEPTH;
pub use crate::store::{Database, Durability};
pub use quicnprotochat_proto::DEFAULT_MAX_PAYLOAD;

// The defaults, each stated once: `Config::default` and the flags of
// `quicnprotochat-server` both read these.

/// Where the node listens: every IPv4 address, port 4201.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT);
/// The node's certificate file.
pub const DEFAULT_TLS_CERT: &str = quicnprotochat_proto::DEFAULT_CERT_PATH;
/// The node's private key file.
pub const DEFAULT_TLS_KEY: &str = "data/server-key.der";
/// The node's database.
pub const DEFAULT_DB: &str = "data/node.db";
/// Messages one identity may queue per second.
pub const DEFAULT_ENQUEUE_RATE: u32 = 1_000;
/// Payload bytes one identity may store per second: 4 MiB/s, bursts of
/// 8 MiB (and never less than twice the payload limit). A chat uses a tiny
/// part of it; a client pushing media at full speed is slowed down, instead
/// of filling the disk at tens of MB/s.
pub const DEFAULT_SEND_BYTES_RATE: u64 = 4 * 1024 * 1024;
pub use crate::delivery::{DEFAULT_MAX_KEY_PACKAGES, DEFAULT_MAX_QUEUE_BYTES};
/// Longest KeyPackage lifetime accepted (RFC 9420, section 7.2, asks for a
/// maximum): 90 days; this project's client makes them with OpenMLS's
/// default lifetime (12 weeks) and renews them.
pub const DEFAULT_MAX_KEY_PACKAGE_LIFETIME_DAYS: u64 = 90;
/// KeyPackages one identity may upload per minute (bursts of as many):
/// checking a KeyPackage's signatures costs the node real CPU, and a client
/// uploads 11 when it registers and 10 when it runs low.
pub const DEFAULT_KEY_PACKAGE_UPLOAD_RATE: u32 = 100;
/// Ordinary KeyPackages of one identity and ciphersuite handed out per
/// minute, whoever asks (beyond it, the last-resort one of that suite):
/// enough for a few invitations a minute, too few to drain a stock in a
/// burst.
pub const DEFAULT_KEY_PACKAGE_SERVE_RATE: u32 = 6;
/// KeyPackage fetches per second per caller.
pub const DEFAULT_KEY_PACKAGE_FETCH_RATE: u32 = 20;
/// Pings per second per caller.
pub const DEFAULT_PING_RATE: u32 = 100;
/// Connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections one remote address may hold: enough for a household or an
/// office behind one NAT, far below the total.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// How many leading bits of an IPv6 address name one "address" for the
/// per-address cap: a /64 is what one subscriber (or one virtual machine)
/// is handed, and holds more addresses than could ever be counted one by
/// one.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Connections without a client certificate (strangers fetching KeyPackages,
/// pinging): a quarter of the total, so they can never lock out members.
pub const DEFAULT_MAX_ANONYMOUS_CONNECTIONS: usize = 2_500;
/// Handshakes from unvalidated addresses in progress before new ones must
/// prove their address with a QUIC Retry (one more round trip).
pub const DEFAULT_RETRY_ABOVE: usize = 32;
/// Bytes asked of the kernel for each of the UDP socket's buffers: about
/// 2,800 full datagrams, so bursts from many clients are read, not dropped
/// (Linux grants at most `net.core.rmem_max`; its default is 208 KiB).
pub const DEFAULT_UDP_BUFFER: usize = 4 << 20;
/// Seconds of silence before a connection is closed.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;

/// Default for [`Config::max_connections_per_identity`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IDENTITY: usize = 32;

/// Default for [`Config::reserved_connections_percent`]: a quarter of the
/// total.
pub const DEFAULT_RESERVED_CONNECTIONS_PERCENT: u8 = 25;

/// Default for [`Config::memory_budget`], in MiB.
pub const DEFAULT_MEMORY_BUDGET_MIB: usize = 256;

/// Default for [`Config::stall_timeout`], in seconds.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 30;
/// Days an undelivered message is kept.
pub const DEFAULT_RETENTION_DAYS: u64 = 30;
/// Days a group may go without a change before the node forgets its public
/// view (a member's next change hands it over again).
pub const DEFAULT_GROUP_RETENTION_DAYS: u64 = 365;

/// Largest payload limit a node can be configured with. Fetch answers carry
/// whole payloads, and this project's client refuses RPC messages above
/// 32 MiB.
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
    pub db: Database,
    /// Largest KeyPackage or message payload accepted, in bytes.
    pub max_payload: usize,
    /// Threads running Cap'n Proto RPC sessions; the first also runs the
    /// store's writer. Each new connection goes to the
    /// thread serving the fewest, the first on a tie. Defaults to the number
    /// of CPUs: with one thread, a flood of TLS handshakes or a heavy
    /// client holds up every other client's calls
    /// (docs/benchmarks/journal.md, "Cost per message").
    pub rpc_threads: usize,
    /// Most messages one recipient's queue may hold; a send that would go
    /// beyond it is refused with the `queueFull` outcome.
    pub max_queue_depth: usize,
    /// Messages one identity may queue per second (bursts of twice that);
    /// 0: unlimited. KeyPackage uploads count too; a group change bigger
    /// than the burst passes when the budget is full and is paid off after.
    pub enqueue_rate: u32,
    /// Payload bytes one identity may store per second (bursts of twice
    /// that, at least twice `max_payload`); 0: unlimited.
    pub send_bytes_rate: u64,
    /// Most payload bytes one recipient's queue may hold; a send beyond it
    /// is refused with the `queueFull` outcome.
    pub max_queue_bytes: u64,
    /// Most unexpired KeyPackages one identity may keep on the node, per
    /// ciphersuite.
    pub max_key_packages: u32,
    /// Longest KeyPackage lifetime accepted.
    pub max_key_package_lifetime: Duration,
    /// Ordinary KeyPackages of one identity and ciphersuite handed out per
    /// minute, whoever asks (beyond it, the last-resort one of that suite);
    /// 0: unlimited.
    pub key_package_serve_rate: u32,
    /// KeyPackages one identity may upload per minute, bursts of as many
    /// (checked before they are validated); 0: unlimited.
    pub key_package_upload_rate: u32,
    /// KeyPackage fetches per second per identity, or per address for
    /// anonymous callers (bursts of twice that); a `fetchDeviceLists` call
    /// counts as one fetch too; 0: unlimited.
    pub key_package_fetch_rate: u32,
    /// Pings per second per identity, or per address for anonymous callers
    /// (bursts of twice that); 0: unlimited.
    pub ping_rate: u32,
    /// Most connections open at once; further ones are refused.
    pub max_connections: usize,
    /// The share of `max_connections`, in percent, that strangers
    /// (anonymous callers, and identities the node holds no KeyPackage,
    /// message or device list for) cannot take: kept for the identities the
    /// node already serves.
    pub reserved_connections_percent: u8,
    /// Most connections one remote IP address may hold (an IPv6 address
    /// counts as its prefix of `ipv6_prefix` bits).
    pub max_connections_per_address: usize,
    /// Most connections one client identity may hold, from anywhere.
    pub max_connections_per_identity: usize,
    /// The IPv6 prefix length (0 to 128) counted as one address.
    pub ipv6_prefix: u8,
    /// Most connections without a client certificate; further ones are
    /// closed after the handshake.
    pub max_anonymous_connections: usize,
    /// Handshakes from unvalidated addresses in progress beyond which new
    /// clients must prove their address (QUIC Retry) first.
    pub retry_above: usize,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// Bytes the node may hold for all peers together (frames being read,
    /// answers and pushes not yet taken), besides each connection's small
    /// floor; see `quicnprotochat_proto::memory`.
    pub memory_budget: usize,
    /// How long a connection may keep the node waiting (no flow-control
    /// credit for its answers, a frame begun and not finished, a push not
    /// answered) before it is closed.
    pub stall_timeout: Duration,
    /// Bytes asked for each of the UDP socket's kernel buffers (receive and
    /// send); 0 keeps the system's default. The kernel may grant less.
    pub udp_buffer: usize,
    /// Undelivered messages older than this are deleted.
    pub retention: Duration,
    /// The public view of a group without a change for this long is
    /// forgotten (its epoch is kept); zero: never.
    pub group_retention: Duration,
    /// fsync every commit (Full) or only at checkpoints (Normal).
    pub durability: Durability,
    /// TCP address serving Prometheus metrics at `/metrics`; none: no
    /// metrics are recorded.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            tls_cert: PathBuf::from(DEFAULT_TLS_CERT),
            tls_key: PathBuf::from(DEFAULT_TLS_KEY),
            tls_names: Vec::new(),
            db: Database::Sqlite(PathBuf::from(DEFAULT_DB)),
            max_payload: DEFAULT_MAX_PAYLOAD,
            rpc_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            enqueue_rate: DEFAULT_ENQUEUE_RATE,
            send_bytes_rate: DEFAULT_SEND_BYTES_RATE,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            max_key_packages: DEFAULT_MAX_KEY_PACKAGES,
            max_key_package_lifetime: retention_days(DEFAULT_MAX_KEY_PACKAGE_LIFETIME_DAYS),
            key_package_serve_rate: DEFAULT_KEY_PACKAGE_SERVE_RATE,
            key_package_upload_rate: DEFAULT_KEY_PACKAGE_UPLOAD_RATE,
            key_package_fetch_rate: DEFAULT_KEY_PACKAGE_FETCH_RATE,
            ping_rate: DEFAULT_PING_RATE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            reserved_connections_percent: DEFAULT_RESERVED_CONNECTIONS_PERCENT,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_connections_per_identity: DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            max_anonymous_connections: DEFAULT_MAX_ANONYMOUS_CONNECTIONS,
            retry_above: DEFAULT_RETRY_ABOVE,
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            memory_budget: DEFAULT_MEMORY_BUDGET_MIB * 1024 * 1024,
            stall_timeout: Duration::from_secs(DEFAULT_STALL_TIMEOUT_SECS),
            udp_buffer: DEFAULT_UDP_BUFFER,
            retention: retention_days(DEFAULT_RETENTION_DAYS),
            group_retention: retention_days(DEFAULT_GROUP_RETENTION_DAYS),
            durability: Durability::Full,
            metrics_listen: None,
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
            db: Database::Sqlite(dir.join("node.db")),
            ..Self::default()
        }
    }
}
