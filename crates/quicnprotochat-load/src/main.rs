//! `quicnprotochat-load`: starts a node and puts load on it; see the crate
//! docs and BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use quicnprotochat_load::{
    Database, Idle, IdleReport, NodeSpec, Nodes, Report, Scenario, Shape, check_nodes, default_binary, local,
};

/// Puts load on a fresh quicnprotochat node (a child process) and reports
/// messages/s, MB/s, enqueue→delivery latency and the node's CPU, context
/// switches and memory, in all and per delivered message; with PostgreSQL,
/// also PostgreSQL's CPU.
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
    /// Give every message an id, as real clients do (the node claims each
    /// one to store it at most once); sent with enqueueBatch.
    #[arg(long)]
    message_ids: bool,
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
    /// The nodes' --db: a PostgreSQL URL (postgres://user@host/database) or
    /// a SQLite file (default: a fresh SQLite file per run). A PostgreSQL
    /// database must exist already (e.g. made with createdb); a SQLite file
    /// is created when missing. Neither is emptied: each run uses fresh
    /// random identities, so rows of earlier runs are harmless.
    /// PostgreSQL's CPU is measured only if its processes run on this
    /// machine.
    #[arg(long, value_name = "URL|PATH")]
    db: Option<String>,
    /// Start this many nodes (each on its own 127.0.0.1 port, one
    /// certificate for all) on the same --db, which must then be
    /// PostgreSQL, and spread the clients round-robin over them, senders
    /// and recipients on different nodes; node usage is summed.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    nodes: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let database = args.db.as_deref().map_or(Database::Private, Database::parse);
    // Refused before anything starts, not at the first run's nodes.
    check_nodes(args.nodes, &database)?;
    let spec = NodeSpec {
        binary: args.node_bin.clone().unwrap_or_else(default_binary),
        durability: args.durability.clone(),
        max_payload: args.max_payload,
        rpc_threads: args.rpc_threads,
        database,
    };
    let setup = Setup {
        spec: &spec,
        nodes: args.nodes,
    };
    if let Some(clients) = args.idle {
        let idle = Idle {
            clients,
            duration: Duration::from_secs_f64(args.duration),
            threads: args.threads,
        };
        return run_idle(&setup, &idle, args.runs);
    }
    let scenario = Scenario {
        shape: args.fanout.map_or(Shape::Ring(args.clients), Shape::FanOut),
        payload: args.payload,
        duration: Duration::from_secs_f64(args.duration),
        rate: args.rate,
        window: args.window,
        batch: args.batch,
        message_ids: args.message_ids,
        ack_every: Duration::from_millis(args.ack_ms),
        threads: args.threads,
    };
    let mut reports = Vec::new();
    for run in 1..=args.runs.max(1) {
        let nodes = setup.start()?;
        let probe = || nodes.sample();
        let report = quicnprotochat_load::run_on(&nodes.options(), &scenario, Some(&probe))
            .with_context(|| format!("run {run}"))?;
        println!(
            "run {run}: {scenario_line}{setup_line}",
            scenario_line = describe(&scenario),
            setup_line = setup.describe()
        );
        print!("{report}");
        setup.warn_if_postgres_unseen(report.postgres_cpu);
        reports.push(report);
    }
    println!("{}", markdown_row(&scenario, &setup, &reports));
    Ok(())
}

/// The nodes of each run, as the flags ask for them.
struct Setup<'a> {
    spec: &'a NodeSpec,
    nodes: usize,
}

impl Setup<'_> {
    /// Starts a run's fresh nodes.
    fn start(&self) -> anyhow::Result<Nodes> {
        let what = if self.nodes > 1 {
            "starting the nodes"
        } else {
            "starting the node"
        };
        local(Nodes::start(self.spec, self.nodes)).context(what)
    }

    /// What a run's description adds for its nodes: nothing for the
    /// default of one node on SQLite, so that rows stay comparable with
    /// earlier ones. The URL stays out (it may hold a password).
    fn describe(&self) -> String {
        let nodes = if self.nodes > 1 {
            format!(", {} nodes", self.nodes)
        } else {
            String::new()
        };
        let database = if self.spec.database.is_postgres() {
            ", PostgreSQL"
        } else {
            ""
        };
        format!("{nodes}{database}")
    }

    /// Says why a PostgreSQL run shows no PostgreSQL CPU, rather than
    /// letting `-` pass for an idle database.
    fn warn_if_postgres_unseen(&self, postgres_cpu: Option<Duration>) {
        if self.spec.database.is_postgres() && postgres_cpu.is_none() {
            eprintln!(
                "no process named postgres is visible in /proc (PostgreSQL on another host, or in a PID namespace hidden from here): its CPU is not reported"
            );
        }
    }
}

/// `runs` idle runs, each on fresh nodes; prints each and a row of medians.
fn run_idle(setup: &Setup<'_>, idle: &Idle, runs: usize) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for run in 1..=runs.max(1) {
        let nodes = setup.start()?;
        let probe = || nodes.sample();
        let report = quicnprotochat_load::idle_on(&nodes.options(), idle, Some(&probe))
            .with_context(|| format!("idle run {run}"))?;
        println!("run {run}:");
        print!("{report}");
        setup.warn_if_postgres_unseen(report.postgres_cpu);
        reports.push(report);
    }
    println!("{}", idle_markdown_row(idle, setup, &reports));
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

/// The median of `value` over `reports` as [`median`] does, formatted by
/// `show`; `-` if any run lacks the value (a SQLite run has no PostgreSQL
/// figures, and a median over some of the runs would mislead).
fn median_or_dash<R>(
    reports: &[R],
    value: &dyn Fn(&R) -> Option<f64>,
    show: &dyn Fn(f64) -> String,
) -> String {
    let values: Option<Vec<f64>> = reports.iter().map(value).collect();
    match values {
        Some(values) if !values.is_empty() => show(median(&values, &|v| *v)),
        _ => "-".to_owned(),
    }
}

/// One Markdown table row of medians over the runs, with the columns of the
/// crate docs: run, delivered msgs/s (runs), MB/s, latency p50 / p99 /
/// p99.9, node CPU, node peak RSS, node CPU per msg, node context switches
/// per msg, PostgreSQL CPU per msg, PostgreSQL share of CPU.
fn markdown_row(scenario: &Scenario, setup: &Setup<'_>, reports: &[Report]) -> String {
    let median = |value: &dyn Fn(&Report) -> f64| median(reports, value);
    let ms = |q: f64| move |r: &Report| r.latency(q).as_secs_f64() * 1000.0;
    let runs: Vec<String> = reports
        .iter()
        .map(|r| format!("{:.0}", r.messages_per_second()))
        .collect();
    format!(
        "| {}{} | {:.0} msgs/s ({}) | {:.2} MB/s | {:.2} / {:.2} / {:.2} ms | {:.0} % | {:.0} MiB | {:.0} µs | {:.1} | {} | {} |",
        describe(scenario),
        setup.describe(),
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
        median_or_dash(
            reports,
            &|r| r.postgres_cpu_per_message().map(|cpu| cpu.as_secs_f64() * 1e6),
            &|us| format!("{us:.0} µs")
        ),
        median_or_dash(reports, &Report::postgres_cpu_share, &|share| format!(
            "{share:.0} %"
        )),
    )
}

/// One Markdown table row of medians over the idle runs, with the columns
/// of the crate docs: idle run, node CPU, node CPU s, node context
/// switches/s, node peak RSS, PostgreSQL CPU.
fn idle_markdown_row(idle: &Idle, setup: &Setup<'_>, reports: &[IdleReport]) -> String {
    let median = |value: &dyn Fn(&IdleReport) -> f64| median(reports, value);
    format!(
        "| idle, {} subscribed clients, {} s{} | {:.1} % | {:.2} s | {:.0} /s | {:.0} MiB | {} |",
        idle.clients,
        idle.duration.as_secs_f64(),
        setup.describe(),
        median(&|r| r.cpu_percent().unwrap_or(0.0)),
        median(&|r| r.node.map_or(0.0, |n| n.cpu.as_secs_f64())),
        median(&|r| r.context_switches_per_second().unwrap_or(0.0)),
        median(&|r| r.node.map_or(0.0, |n| n.peak_rss as f64 / (1024.0 * 1024.0))),
        median_or_dash(reports, &IdleReport::postgres_cpu_percent, &|percent| format!(
            "{percent:.1} %"
        )),
    )
}
