//! What a run measured, and how it is printed: a load run's [`Report`] and
//! an idle run's [`IdleReport`].

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
    /// How many nodes the clients were spread over.
    pub nodes: usize,
    /// The node's CPU time and context switches during the run and its peak
    /// RSS, summed over the nodes, when the nodes are processes of ours.
    pub node: Option<Usage>,
    /// PostgreSQL's CPU time during the run, when the nodes use a
    /// PostgreSQL server on this machine.
    pub postgres_cpu: Option<Duration>,
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

    /// The node's CPU time per delivered message, when its usage is known
    /// and something was delivered.
    pub fn node_cpu_per_message(&self) -> Option<Duration> {
        let node = self.node.filter(|_| self.delivered > 0)?;
        Some(node.cpu.div_f64(self.delivered as f64))
    }

    /// The node's context switches per delivered message, when its usage is
    /// known and something was delivered.
    pub fn context_switches_per_message(&self) -> Option<f64> {
        let node = self.node.filter(|_| self.delivered > 0)?;
        Some(node.context_switches as f64 / self.delivered as f64)
    }

    /// PostgreSQL's CPU time per delivered message, when known and
    /// something was delivered.
    pub fn postgres_cpu_per_message(&self) -> Option<Duration> {
        let postgres = self.postgres_cpu.filter(|_| self.delivered > 0)?;
        Some(postgres.div_f64(self.delivered as f64))
    }

    /// PostgreSQL's share, in percent, of all the CPU time the run used:
    /// the nodes', PostgreSQL's and the load generator's (the kernel's
    /// loopback work lands in these too), when all three are known.
    pub fn postgres_cpu_share(&self) -> Option<f64> {
        let postgres = self.postgres_cpu?.as_secs_f64();
        let total = self.node?.cpu.as_secs_f64() + postgres + self.clients_cpu?.as_secs_f64();
        (total > 0.0).then(|| 100.0 * postgres / total)
    }
}

/// "node" for one node, "N nodes" for several (whose usage is summed).
fn nodes_label(nodes: usize) -> String {
    if nodes > 1 {
        format!("{nodes} nodes")
    } else {
        "node".to_owned()
    }
}

/// What the node used while clients were connected and subscribed but
/// nothing was sent: the cost of holding them (keep-alives, timers).
#[derive(Debug, Clone)]
pub struct IdleReport {
    /// Clients connected, each subscribed by push to its own queue.
    pub clients: usize,
    /// How many nodes the clients were spread over.
    pub nodes: usize,
    /// How long it took to connect and subscribe them all.
    pub setup: Duration,
    /// The measured window (after setup and a settling pause).
    pub window: Duration,
    /// The node's CPU time and context switches during the window and its
    /// peak RSS, summed over the nodes, when the nodes are processes of
    /// ours.
    pub node: Option<Usage>,
    /// PostgreSQL's CPU time during the window, when the nodes use a
    /// PostgreSQL server on this machine.
    pub postgres_cpu: Option<Duration>,
}

impl IdleReport {
    /// The node's CPU time as a percentage of one core, when known.
    pub fn cpu_percent(&self) -> Option<f64> {
        self.node
            .map(|node| 100.0 * node.cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9))
    }

    /// The node's context switches per second, when known.
    pub fn context_switches_per_second(&self) -> Option<f64> {
        self.node
            .map(|node| node.context_switches as f64 / self.window.as_secs_f64().max(1e-9))
    }

    /// PostgreSQL's CPU time as a percentage of one core, when known.
    pub fn postgres_cpu_percent(&self) -> Option<f64> {
        self.postgres_cpu
            .map(|cpu| 100.0 * cpu.as_secs_f64() / self.window.as_secs_f64().max(1e-9))
    }
}

impl fmt::Display for IdleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idle: {} subscribed clients for {:.1} s: ",
            self.clients,
            self.window.as_secs_f64()
        )?;
        match (self.node, self.cpu_percent(), self.context_switches_per_second()) {
            (Some(node), Some(percent), Some(switches)) => writeln!(
                f,
                "{} {percent:.1} % of one core ({:.2} s CPU), {switches:.0} context switches/s, peak RSS {:.1} MiB",
                nodes_label(self.nodes),
                node.cpu.as_secs_f64(),
                node.peak_rss as f64 / (1024.0 * 1024.0)
            )?,
            _ => writeln!(f, "{} usage unknown", nodes_label(self.nodes))?,
        }
        if let (Some(cpu), Some(percent)) = (self.postgres_cpu, self.postgres_cpu_percent()) {
            writeln!(
                f,
                "PostgreSQL: {percent:.1} % of one core ({:.2} s CPU)",
                cpu.as_secs_f64()
            )?;
        }
        writeln!(f, "connected and subscribed in {:.2} s", self.setup.as_secs_f64())
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
                "{}: {:.2} s CPU ({:.0} % of one core), peak RSS {:.1} MiB",
                nodes_label(self.nodes),
                node.cpu.as_secs_f64(),
                100.0 * node.cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9),
                node.peak_rss as f64 / (1024.0 * 1024.0)
            )?;
        }
        if let (Some(cpu), Some(switches)) =
            (self.node_cpu_per_message(), self.context_switches_per_message())
        {
            writeln!(
                f,
                "{} cost per delivered message: {:.0} µs CPU, {switches:.1} context switches",
                nodes_label(self.nodes),
                cpu.as_secs_f64() * 1e6
            )?;
        }
        if let Some(cpu) = self.clients_cpu {
            writeln!(f, "load generator: {:.2} s CPU", cpu.as_secs_f64())?;
        }
        if let Some(postgres) = self.postgres_cpu {
            write!(
                f,
                "PostgreSQL: {:.2} s CPU ({:.0} % of one core)",
                postgres.as_secs_f64(),
                100.0 * postgres.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
            )?;
            if let Some(per_message) = self.postgres_cpu_per_message() {
                write!(
                    f,
                    ", {:.0} µs per delivered message",
                    per_message.as_secs_f64() * 1e6
                )?;
            }
            if let Some(share) = self.postgres_cpu_share() {
                write!(
                    f,
                    ", {share:.0} % of the CPU time used (nodes + PostgreSQL + load generator)"
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

    use super::*;

    fn report(delivered: u64, node: Option<Usage>) -> Report {
        Report {
            sent: delivered,
            delivered,
            bytes: delivered * 100,
            refused: 0,
            elapsed: Duration::from_secs(1),
            latencies: Vec::new(),
            nodes: 1,
            node,
            postgres_cpu: None,
            clients_cpu: None,
        }
    }

    #[test]
    fn the_per_message_cost_divides_the_node_usage_by_the_deliveries() {
        let node = Usage {
            cpu: Duration::from_millis(312),
            context_switches: 14_200,
            peak_rss: 0,
        };
        let report = report(1000, Some(node));
        assert_eq!(report.node_cpu_per_message(), Some(Duration::from_micros(312)));
        assert_eq!(report.context_switches_per_message(), Some(14.2));
        assert!(
            report
                .to_string()
                .contains("node cost per delivered message: 312 µs CPU, 14.2 context switches"),
            "{report}"
        );
    }

    #[test]
    fn there_is_no_per_message_cost_without_deliveries_or_node_usage() {
        assert_eq!(report(0, Some(Usage::default())).node_cpu_per_message(), None);
        assert_eq!(report(10, None).context_switches_per_message(), None);
        assert!(!report(10, None).to_string().contains("cost per"));
    }

    #[test]
    fn postgresql_is_reported_per_message_and_as_a_share_of_all_cpu_time() {
        let node = Usage {
            cpu: Duration::from_millis(600),
            context_switches: 0,
            peak_rss: 0,
        };
        let report = Report {
            nodes: 2,
            postgres_cpu: Some(Duration::from_millis(300)),
            clients_cpu: Some(Duration::from_millis(100)),
            ..report(1000, Some(node))
        };
        assert_eq!(
            report.postgres_cpu_per_message(),
            Some(Duration::from_micros(300))
        );
        // 0.3 s of 0.6 + 0.3 + 0.1 s.
        let share = report.postgres_cpu_share().unwrap();
        assert!((share - 30.0).abs() < 1e-9, "{share}");
        let text = report.to_string();
        assert!(text.contains("2 nodes: 0.60 s CPU"), "{text}");
        assert!(
            text.contains("PostgreSQL: 0.30 s CPU (30 % of one core), 300 µs per delivered message, 30 % of the CPU time used"),
            "{text}"
        );
    }

    #[test]
    fn without_postgresql_nothing_about_it_is_reported() {
        let report = report(10, Some(Usage::default()));
        assert_eq!(report.postgres_cpu_per_message(), None);
        assert_eq!(report.postgres_cpu_share(), None);
        assert!(!report.to_string().contains("PostgreSQL"), "{report}");
        assert!(report.to_string().contains("node: "), "{report}");
    }
}
