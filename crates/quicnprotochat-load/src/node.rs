//! The node under test: a `quicnprotochat-server` child process with its own
//! temporary directory, and what it used (CPU time, context switches, peak
//! RSS) read from `/proc`.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quicnprotochat_client::node_client::{ConnectOptions, NodeClient};

use crate::LoadError;

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
}

/// A running node; killed when dropped.
pub struct NodeProcess {
    child: Child,
    dir: tempfile::TempDir,
    address: SocketAddr,
}

/// The most connections the node started here accepts, in all and from one
/// address. Every client of a run connects from 127.0.0.1, so the node's
/// per-address default (64) would refuse all but the first few of a large
/// run; these caps are far above any run this machine can hold.
const MAX_CONNECTIONS: usize = 100_000;

/// CPU time, context switches and memory of the node process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU time so far.
    pub cpu: Duration,
    /// Voluntary + involuntary context switches so far, summed over the
    /// threads alive when read: Linux keeps no per-process total of a
    /// running process, so the switches of a thread that has exited are
    /// lost (a delta can then undercount, never overcount).
    pub context_switches: u64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss: u64,
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
        let dir = tempfile::tempdir().map_err(LoadError::Io)?;
        let address = free_port()?;
        let mut command = Command::new(&spec.binary);
        command
            .arg("--listen")
            .arg(address.to_string())
            .arg("--tls-cert")
            .arg(dir.path().join("server-cert.der"))
            .arg("--tls-key")
            .arg(dir.path().join("server-key.der"))
            .arg("--db")
            .arg(dir.path().join("node.db"))
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
        // USER_HZ is 100 on every Linux architecture the node targets.
        cpu: Duration::from_millis(cpu_ticks * 10),
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
