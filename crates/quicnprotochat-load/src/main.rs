//! `quicnprotochat-load`: starts a node and puts load on it; see the crate
//! docs and BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use quicnprotochat_load::{
    Idle, IdleReport, NodeProcess, NodeSpec, Report, Scenario, Shape, default_binary, local,
};

/// Puts load on a fresh quicnprotochat node (a child process) and reports
/// messages/s, MB/s, enqueue→delivery latency and the node's CPU, context
/// switches and memory, in all and per delivered message.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Clients in a ring: each sends to the next and receives by push.
    #[arg(long, default_value_t = 64, conflicts_with = "fanout")]
    clients: usize,
    /// Instead of a ring: one sender, every message to this many recipients.
    #[arg(long)]
    fanout: Option<usize>,
    /// Instead of sending: connect this many clients, each subscribed by
    /// push to its own queue, and measure the node for --duration seconds
    /// while nothing is sent.
    #[arg(long, conflicts_with_all = ["clients", "fanout", "rate"])]
    idle: Option<usize>,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of sending (idle: of measuring).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Steady total rate in messages/s (default: as fast as the window allows).
    #[arg(long)]
    rate: Option<f64>,
    /// Calls in flight per sender (unpaced runs).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Messages per enqueueBatch call (1: plain enqueue).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Receivers ack at most once per this many milliseconds (0: after
    /// every pushed batch).
    #[arg(long, default_value_t = 0)]
    ack_ms: u64,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Repeat the run this many times, each on a fresh node, and print medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The node binary (default: quicnprotochat-server next to this binary).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// The node's --durability.
    #[arg(long, default_value = "full")]
    durability: String,
    /// The node's --max-payload.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_payload: usize,
    /// The node's --rpc-threads.
    #[arg(long)]
    rpc_threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = NodeSpec {
        binary: args.node_bin.clone().unwrap_or_else(default_binary),
        durability: args.durability.clone(),
        max_payload: args.max_payload,
        rpc_threads: args.rpc_threads,
    };
    if let Some(clients) = args.idle {
        let idle = Idle {
            clients,
            duration: Duration::from_secs_f64(args.duration),
            threads: args.threads,
        };
        return run_idle(&spec, &idle, args.runs);
    }
    let scenario = Scenario {
        shape: args.fanout.map_or(Shape::Ring(args.clients), Shape::FanOut),
        payload: args.payload,
        duration: Duration::from_secs_f64(args.duration),
        rate: args.rate,
        window: args.window,
        batch: args.batch,
        ack_every: Duration::from_millis(args.ack_ms),
        threads: args.threads,
    };
    let mut reports = Vec::new();
    for run in 1..=args.runs.max(1) {
        let node = local(NodeProcess::start(&spec)).context("starting the node")?;
        let probe = || node.usage();
        let report = quicnprotochat_load::run(&node.options(), &scenario, Some(&probe))
            .with_context(|| format!("run {run}"))?;
        println!("run {run}: {scenario_line}", scenario_line = describe(&scenario));
        print!("{report}");
        reports.push(report);
    }
    println!("{}", markdown_row(&scenario, &reports));
    Ok(())
}

/// `runs` idle runs, each on a fresh node; prints each and a row of medians.
fn run_idle(spec: &NodeSpec, idle: &Idle, runs: usize) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for run in 1..=runs.max(1) {
        let node = local(NodeProcess::start(spec)).context("starting the node")?;
        let probe = || node.usage();
        let report = quicnprotochat_load::idle(&node.options(), idle, Some(&probe))
            .with_context(|| format!("idle run {run}"))?;
        println!("run {run}:");
        print!("{report}");
        reports.push(report);
    }
    println!("{}", idle_markdown_row(idle, &reports));
    Ok(())
}

fn describe(scenario: &Scenario) -> String {
    let shape = match scenario.shape {
        Shape::Ring(n) => format!("{n} clients in a ring"),
        Shape::FanOut(n) => format!("fan-out to {n}"),
    };
    let pace = scenario.rate.map_or(format!("window {}", scenario.window), |r| {
        format!("{r:.0} msgs/s")
    });
    let acks = if scenario.ack_every.is_zero() {
        String::new()
    } else {
        format!(", ack every {} ms", scenario.ack_every.as_millis())
    };
    format!(
        "{shape}, {} B, {pace}, batch {}{acks}, {} s",
        scenario.payload,
        scenario.batch,
        scenario.duration.as_secs_f64()
    )
}

/// The median of `value` over `reports` (the upper one of an even count;
/// zero without reports).
fn median<R>(reports: &[R], value: &dyn Fn(&R) -> f64) -> f64 {
    let mut values: Vec<f64> = reports.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// One Markdown table row of medians over the runs, with the columns of the
/// crate docs: run, delivered msgs/s (runs), MB/s, latency p50 / p99 /
/// p99.9, node CPU, node peak RSS, node CPU per msg, node context switches
/// per msg.
fn markdown_row(scenario: &Scenario, reports: &[Report]) -> String {
    let median = |value: &dyn Fn(&Report) -> f64| median(reports, value);
    let ms = |q: f64| move |r: &Report| r.latency(q).as_secs_f64() * 1000.0;
    let runs: Vec<String> = reports
        .iter()
        .map(|r| format!("{:.0}", r.messages_per_second()))
        .collect();
    format!(
        "| {} | {:.0} msgs/s ({}) | {:.2} MB/s | {:.2} / {:.2} / {:.2} ms | {:.0} % | {:.0} MiB | {:.0} µs | {:.1} |",
        describe(scenario),
        median(&Report::messages_per_second),
        runs.join(" / "),
        median(&Report::megabytes_per_second),
        median(&ms(0.5)),
        median(&ms(0.99)),
        median(&ms(0.999)),
        median(&|r| r
            .node
            .map_or(0.0, |n| 100.0 * n.cpu.as_secs_f64() / r.elapsed.as_secs_f64())),
        median(&|r| r.node.map_or(0.0, |n| n.peak_rss as f64 / (1024.0 * 1024.0))),
        median(&|r| r
            .node_cpu_per_message()
            .map_or(0.0, |cpu| cpu.as_secs_f64() * 1e6)),
        median(&|r| r.context_switches_per_message().unwrap_or(0.0)),
    )
}

/// One Markdown table row of medians over the idle runs, with the columns
/// of the crate docs: idle run, node CPU, node CPU s, node context
/// switches/s, node peak RSS.
fn idle_markdown_row(idle: &Idle, reports: &[IdleReport]) -> String {
    let median = |value: &dyn Fn(&IdleReport) -> f64| median(reports, value);
    format!(
        "| idle, {} subscribed clients, {} s | {:.1} % | {:.2} s | {:.0} /s | {:.0} MiB |",
        idle.clients,
        idle.duration.as_secs_f64(),
        median(&|r| r.cpu_percent().unwrap_or(0.0)),
        median(&|r| r.node.map_or(0.0, |n| n.cpu.as_secs_f64())),
        median(&|r| r.context_switches_per_second().unwrap_or(0.0)),
        median(&|r| r.node.map_or(0.0, |n| n.peak_rss as f64 / (1024.0 * 1024.0))),
    )
}
