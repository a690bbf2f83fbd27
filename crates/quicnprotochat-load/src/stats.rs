//! What a run measured, and how it is printed.

use std::fmt;
use std::time::Duration;

use crate::node::Usage;

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct Report {
    /// Messages sent (each enqueue of one payload for one recipient).
    pub sent: u64,
    /// Messages delivered by push to their recipient.
    pub delivered: u64,
    /// Payload bytes delivered.
    pub bytes: u64,
    /// Enqueue calls the node refused.
    pub refused: u64,
    /// From the first send to the last delivery.
    pub elapsed: Duration,
    /// Enqueue→delivery latency of every delivered message, sorted.
    pub latencies: Vec<Duration>,
    /// The node's CPU time during the run and its peak RSS, when the node
    /// is a process of ours.
    pub node: Option<Usage>,
    /// This process's CPU time during the run (clients, encoding, QUIC).
    pub clients_cpu: Option<Duration>,
}

impl Report {
    /// Delivered messages per second.
    pub fn messages_per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Delivered payload megabytes (10^6 bytes) per second.
    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0..=1), or zero without deliveries.
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank: the smallest value with at least q of the samples at
        // or below it.
        let n = self.latencies.len();
        let index = ((n as f64 * q).ceil() as usize).saturating_sub(1).min(n - 1);
        self.latencies[index]
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "delivered {} of {} sent ({} refused) in {:.2} s: {:.0} msgs/s, {:.2} MB/s",
            self.delivered,
            self.sent,
            self.refused,
            self.elapsed.as_secs_f64(),
            self.messages_per_second(),
            self.megabytes_per_second()
        )?;
        writeln!(
            f,
            "enqueue→delivery latency: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            ms(self.latency(0.5)),
            ms(self.latency(0.99)),
            ms(self.latency(0.999)),
            ms(self.latency(1.0))
        )?;
        if let Some(node) = self.node {
            writeln!(
                f,
                "node: {:.2} s CPU ({:.0} % of one core), peak RSS {:.1} MiB",
                node.cpu.as_secs_f64(),
                100.0 * node.cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9),
                node.peak_rss as f64 / (1024.0 * 1024.0)
            )?;
        }
        if let Some(cpu) = self.clients_cpu {
            writeln!(f, "load generator: {:.2} s CPU", cpu.as_secs_f64())?;
        }
        Ok(())
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
