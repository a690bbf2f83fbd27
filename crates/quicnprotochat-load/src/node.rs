//! The nodes under test: `quicnprotochat-server` child processes sharing a
//! temporary directory (their certificate) and a database, and what they
//! used (CPU time, context switches, peak RSS) read from `/proc`.

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicnprotochat_client::node_client::{ConnectOptions, NodeClient};

use crate::LoadError;
use crate::postgres::{PostgresSnapshot, ticks_to_duration};

/// How the node is started.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The server binary.
    pub binary: PathBuf,
    /// `--durability` value (`full` or `normal`).
    pub durability: String,
    /// `--max-payload` in bytes.
    pub max_payload: usize,
    /// `--rpc-threads`, or the node's default.
    pub rpc_threads: Option<usize>,
    /// Where the node keeps its data.
    pub database: Database,
}

/// Where the nodes keep their data (their `--db`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Database {
    /// A fresh SQLite file in each run's temporary directory.
    Private,
    /// This SQLite file, kept from run to run.
    Sqlite(PathBuf),
    /// The PostgreSQL database at this `postgres://` URL, which several
    /// nodes can share.
    Postgres(String),
}

impl Database {
    /// A `--db` value: a `postgres://` or `postgresql://` URL (the two
    /// schemes libpq accepts) names PostgreSQL, anything else a SQLite file.
    pub fn parse(value: &str) -> Database {
        let is_url = ["postgres://", "postgresql://"].iter().any(|scheme| {
            value
                .get(..scheme.len())
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case(scheme))
        });
        if is_url {
            Database::Postgres(value.to_owned())
        } else {
            Database::Sqlite(PathBuf::from(value))
        }
    }

    /// Whether the nodes use PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }
}

/// Leaves the URL out: it may hold a password.
impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Private => f.write_str("Private"),
            Database::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Database::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// Refuses `nodes` nodes on `database` unless they can share it: a SQLite
/// file is one node's (the node holds it open and exclusively), so only
/// PostgreSQL takes more than one.
pub fn check_nodes(nodes: usize, database: &Database) -> Result<(), LoadError> {
    match nodes {
        0 => Err(LoadError::Scenario("a run needs at least one node".into())),
        1 => Ok(()),
        _ if database.is_postgres() => Ok(()),
        _ => Err(LoadError::SqliteShared { nodes }),
    }
}

/// A running node; killed when dropped.
pub struct NodeProcess {
    child: Child,
    /// Shared by the nodes of a run (one certificate for all), removed
    /// when the last of them is dropped, after its process is killed.
    dir: Arc<tempfile::TempDir>,
    address: SocketAddr,
}

/// The nodes of a run: node processes sharing one certificate (so one CA
/// file trusts them all) and one database; killed when dropped.
pub struct Nodes {
    nodes: Vec<NodeProcess>,
    postgres: bool,
}

/// The most connections the node started here accepts, in all and from one
/// address. Every client of a run connects from 127.0.0.1, so the node's
/// per-address default (64) would refuse all but the first few of a large
/// run; these caps are far above any run this machine can hold.
const MAX_CONNECTIONS: usize = 100_000;

/// CPU time, context switches and memory of the node process (or the sum
/// over the nodes of a run).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU time so far.
    pub cpu: Duration,
    /// Voluntary + involuntary context switches so far, summed over the
    /// threads alive when read: Linux keeps no per-process total of a
    /// running process, so the switches of a thread that has exited are
    /// lost (a delta can then undercount, never overcount).
    pub context_switches: u64,
    /// Peak resident set size (VmHWM), bytes; summed over several nodes,
    /// so an upper bound of what they held at once.
    pub peak_rss: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            cpu: self.cpu + other.cpu,
            context_switches: self.context_switches + other.context_switches,
            peak_rss: self.peak_rss + other.peak_rss,
        }
    }
}

/// What the processes under test have used so far, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The node processes, summed.
    pub nodes: Usage,
    /// Every PostgreSQL process, when the nodes use PostgreSQL.
    pub postgres: Option<PostgresSnapshot>,
}

/// What was used between two [`Sample`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct Used {
    /// The node processes, summed (peak RSS as of the later sample).
    pub nodes: Usage,
    /// PostgreSQL's CPU time, when both samples saw PostgreSQL processes.
    pub postgres_cpu: Option<Duration>,
}

impl Sample {
    /// What was used from `before` to `self`. PostgreSQL's CPU time is
    /// left unknown when no PostgreSQL process was seen: that means it is
    /// out of sight, not idle.
    pub fn since(&self, before: &Sample) -> Used {
        let postgres_cpu = match (&before.postgres, &self.postgres) {
            (Some(before), Some(after)) if !after.is_empty() => Some(after.since(before)),
            _ => None,
        };
        Used {
            nodes: self.nodes.since(before.nodes),
            postgres_cpu,
        }
    }
}

impl Usage {
    /// What was used from `before` to `self`; the peak RSS is `self`'s.
    pub fn since(self, before: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(before.cpu),
            context_switches: self.context_switches.saturating_sub(before.context_switches),
            peak_rss: self.peak_rss,
        }
    }
}

impl NodeProcess {
    /// Starts the node on a free loopback port with rate limits off and a
    /// queue depth large enough for the run, and waits until it answers a
    /// ping.
    pub async fn start(spec: &NodeSpec) -> Result<NodeProcess, LoadError> {
        let dir = Arc::new(tempfile::tempdir().map_err(LoadError::Io)?);
        NodeProcess::start_in(spec, dir).await
    }

    /// [`NodeProcess::start`] with its certificate (and private database)
    /// in `dir`: the first node there creates the certificate, later ones
    /// load it.
    async fn start_in(spec: &NodeSpec, dir: Arc<tempfile::TempDir>) -> Result<NodeProcess, LoadError> {
        let address = free_port()?;
        let database = match &spec.database {
            Database::Private => dir.path().join("node.db").into_os_string(),
            Database::Sqlite(path) => path.clone().into_os_string(),
            Database::Postgres(url) => url.into(),
        };
        let mut command = Command::new(&spec.binary);
        command
            .arg("--listen")
            .arg(address.to_string())
            .arg("--tls-cert")
            .arg(dir.path().join("server-cert.der"))
            .arg("--tls-key")
            .arg(dir.path().join("server-key.der"))
            // In the environment rather than on the command line, where
            // `ps` would show a PostgreSQL URL's password.
            .env("QUICNPROTOCHAT_DB", database)
            .args([
                "--enqueue-rate",
                "0",
                "--send-bytes-rate",
                "0",
                "--ping-rate",
                "0",
                "--max-queue-depth",
                "10000000",
                "--max-queue-bytes",
                "1099511627776",
            ])
            .arg("--max-connections")
            .arg(MAX_CONNECTIONS.to_string())
            .arg("--max-connections-per-address")
            .arg(MAX_CONNECTIONS.to_string())
            .arg("--max-payload")
            .arg(spec.max_payload.to_string())
            .arg("--durability")
            .arg(&spec.durability)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(threads) = spec.rpc_threads {
            command.arg("--rpc-threads").arg(threads.to_string());
        }
        let child = command.spawn().map_err(|e| LoadError::Spawn {
            binary: spec.binary.clone(),
            source: e,
        })?;
        let mut node = NodeProcess { child, dir, address };
        node.wait_ready().await?;
        Ok(node)
    }

    /// How clients reach the node.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            server: self.address.to_string(),
            server_name: None,
            ca_cert: self.dir.path().join("server-cert.der"),
        }
    }

    /// The node's CPU time, context switches and peak RSS so far.
    pub fn usage(&self) -> Result<Usage, LoadError> {
        process_usage(&format!("/proc/{}", self.child.id()))
    }

    /// Where the node keeps its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_ready(&mut self) -> Result<(), LoadError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().map_err(LoadError::Io)? {
                return Err(LoadError::NodeExited(status.to_string()));
            }
            if self.options().ca_cert.exists()
                && let Ok(client) = NodeClient::connect(&self.options(), None).await
                && client.ping().await.is_ok()
            {
                client.close().await;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LoadError::NodeNotReady(self.address));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nodes {
    /// Starts `count` nodes as [`NodeProcess::start`] does, all on `spec`'s
    /// database, after [`check_nodes`]. They start one after another: the
    /// first creates the certificate the others load (started together,
    /// several would each write one), and a fresh database's schema is
    /// created by one node, not raced for.
    pub async fn start(spec: &NodeSpec, count: usize) -> Result<Nodes, LoadError> {
        check_nodes(count, &spec.database)?;
        let dir = Arc::new(tempfile::tempdir().map_err(LoadError::Io)?);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            nodes.push(NodeProcess::start_in(spec, dir.clone()).await?);
        }
        Ok(Nodes {
            nodes,
            postgres: spec.database.is_postgres(),
        })
    }

    /// How clients reach each node, in order.
    pub fn options(&self) -> Vec<ConnectOptions> {
        self.nodes.iter().map(NodeProcess::options).collect()
    }

    /// The nodes' usage so far, summed, and with PostgreSQL, what every
    /// PostgreSQL process has used.
    pub fn sample(&self) -> Result<Sample, LoadError> {
        let mut nodes = Usage::default();
        for node in &self.nodes {
            nodes = nodes + node.usage()?;
        }
        let postgres = if self.postgres {
            Some(PostgresSnapshot::take()?)
        } else {
            None
        };
        Ok(Sample { nodes, postgres })
    }
}

/// CPU time, context switches and peak RSS of this process.
pub fn own_usage() -> Result<Usage, LoadError> {
    process_usage("/proc/self")
}

fn process_usage(proc_dir: &str) -> Result<Usage, LoadError> {
    let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).map_err(LoadError::Io)?;
    // Fields after the command name (which may hold spaces) start at ")";
    // utime and stime are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Field 14 is at index 11 after the state field (index 0 = field 3).
    let cpu_ticks = ticks(11) + ticks(12);
    let status = std::fs::read_to_string(format!("{proc_dir}/status")).map_err(LoadError::Io)?;
    let peak_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Usage {
        cpu: ticks_to_duration(cpu_ticks),
        context_switches: context_switches(proc_dir)?,
        peak_rss: peak_kib * 1024,
    })
}

/// Context switches of every thread of the process: `{proc_dir}/status`
/// counts only the main thread, and the node works on its other threads.
fn context_switches(proc_dir: &str) -> Result<u64, LoadError> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("{proc_dir}/task")).map_err(LoadError::Io)? {
        let task = task.map_err(LoadError::Io)?;
        // A thread may exit between the listing and the read; it just
        // no longer counts.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|line| {
                line.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|count| count.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// A loopback UDP port nobody uses right now.
fn free_port() -> Result<SocketAddr, LoadError> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(LoadError::Io)?;
    socket.local_addr().map_err(LoadError::Io)
}

/// The server binary built next to this one (`target/<profile>/`).
pub fn default_binary() -> PathBuf {
    let name = format!("quicnprotochat-server{}", std::env::consts::EXE_SUFFIX);
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

    use super::*;

    #[test]
    fn a_postgres_url_names_postgresql_and_anything_else_a_sqlite_file() {
        for url in [
            "postgres://load@localhost/quicnprotochat",
            "postgresql:///quicnprotochat?host=/run/postgresql",
            "POSTGRES://x",
        ] {
            assert!(Database::parse(url).is_postgres(), "{url}");
        }
        assert_eq!(
            Database::parse("data/node.db"),
            Database::Sqlite(PathBuf::from("data/node.db"))
        );
        assert_eq!(
            Database::parse("postgres.db"),
            Database::Sqlite(PathBuf::from("postgres.db"))
        );
    }

    #[test]
    fn several_nodes_are_refused_on_sqlite_and_taken_on_postgresql() {
        let sqlite = Database::Sqlite(PathBuf::from("node.db"));
        let postgres = Database::parse("postgres://localhost/load");
        for database in [&Database::Private, &sqlite] {
            assert!(check_nodes(1, database).is_ok());
            let refusal = check_nodes(3, database).unwrap_err();
            assert!(
                matches!(refusal, LoadError::SqliteShared { nodes: 3 }),
                "{refusal:?}"
            );
            assert!(refusal.to_string().contains("postgres://"), "{refusal}");
        }
        assert!(check_nodes(1, &postgres).is_ok());
        assert!(check_nodes(3, &postgres).is_ok());
        assert!(check_nodes(0, &postgres).is_err());
    }

    #[test]
    fn the_debug_form_of_a_postgres_database_hides_its_url() {
        let database = Database::parse("postgres://load:secret@localhost/load");
        assert!(!format!("{database:?}").contains("secret"));
    }

    #[test]
    fn own_usage_counts_the_context_switches_of_other_threads() {
        let (start, started) = std::sync::mpsc::channel::<()>();
        let (ready, wait) = std::sync::mpsc::channel();
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            let _ = started.recv();
            // Each sleep blocks the thread: one voluntary switch at least.
            for _ in 0..50 {
                std::thread::sleep(Duration::from_micros(100));
            }
            ready.send(()).unwrap();
            // Alive while the main thread reads, so its counts are there.
            let _ = finished.recv();
        });
        let before = own_usage().unwrap();
        start.send(()).unwrap();
        wait.recv().unwrap();
        let after = own_usage().unwrap();
        finish.send(()).unwrap();
        sleeper.join().unwrap();
        assert!(
            after.context_switches >= before.context_switches + 50,
            "{} then {}",
            before.context_switches,
            after.context_switches
        );
    }
}
