//! Wall-time benchmark of the command-line client: what a user waits for,
//! from starting the process to its exit.
//!
//! Starts a node in this process (temporary directory, real SQLite file,
//! QUIC + TLS 1.3 on 127.0.0.1, rate limits off), then runs the release
//! client binary as a user would: every member runs `register-state` (one
//! state file each), member 0 runs `create-group` and one `invite` with
//! every other member's `--peer-key`, and each of them runs `join`
//! (several at a time). Then it measures, each repeated:
//! - `send` by member 0 to the whole group;
//! - `recv` by member 1 with exactly that one message waiting;
//! - `recv` by member 1 with nothing waiting;
//! - `ping`.
//!
//! Prints a Markdown table (median, min, max per command).
//!
//! The client binary is `quicnprotochat-client` in the same target directory
//! as this example, so build it first:
//!
//! Run: `cargo build --release -p quicnprotochat-client && cargo run --release -p quicnprotochat-client --example cli_bench [-- --members N --reps N]`
//! (defaults: 100 members, 10 repetitions).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use support::start_node;

/// The group every member ends up in.
const GROUP: &str = "bench";

/// Runs the client binary against one node.
struct Client {
    binary: PathBuf,
    server: String,
    ca_cert: PathBuf,
}

/// One member: a state file and its identity key.
struct Member {
    state: String,
    key: String,
}

/// One table row: a command and its wall times.
struct Row {
    what: String,
    times: Vec<Duration>,
}

fn main() {
    let (members, reps) = parse_args();
    assert!(members >= 2, "--members must be at least 2");
    let binary = client_binary();
    let temp = tempfile::tempdir().unwrap();
    let node_dir = temp.path().join("node");
    let node = start_node(node_dir.clone());
    let client = Client {
        binary,
        server: node.addr.to_string(),
        ca_cert: node_dir.join("server-cert.der"),
    };
    let mut rows = Vec::new();

    // Set-up, timed too: it is what a user waits for when building a group.
    let mut times = Vec::new();
    let group: Vec<Member> = (0..members)
        .map(|i| {
            let state = temp.path().join(format!("member{i}.state")).display().to_string();
            let (time, out) = client.run(&["register-state", "--state", &state]);
            times.push(time);
            Member {
                state,
                key: out.trim().to_owned(),
            }
        })
        .collect();
    rows.push(row(
        "`register-state` (new state file), one at a time".into(),
        times,
    ));

    let creator = &group[0];
    let (time, _) = client.run(&["create-group", "--state", &creator.state, "--group-id", GROUP]);
    rows.push(row("`create-group`".into(), vec![time]));

    let mut invite = vec!["invite", "--state", &creator.state];
    for member in &group[1..] {
        invite.extend(["--peer-key", &member.key]);
    }
    let (time, _) = client.run(&invite);
    rows.push(row(
        format!("`invite` {} peers in one Commit", members - 1),
        vec![time],
    ));

    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let times = in_parallel(&group[1..], parallel, |member| {
        client.run(&["join", "--state", &member.state]).0
    });
    rows.push(row(
        format!("`join` from the Welcome, {parallel} at a time"),
        times,
    ));
    let listed = client.run(&["members", "--state", &group[members - 1].state]).1;
    assert_eq!(
        listed.lines().count(),
        members,
        "the last joiner sees everyone:\n{listed}"
    );

    // The measured commands.
    let reader = &group[1];
    let mut sends = Vec::new();
    let mut one_waiting = Vec::new();
    for rep in 0..reps {
        let text = format!("message {rep}");
        let (time, _) = client.run(&["send", "--state", &creator.state, "--msg", &text]);
        sends.push(time);
        let (time, out) = client.run(&["recv", "--state", &reader.state]);
        one_waiting.push(time);
        assert!(
            out.lines().count() == 1 && out.contains(&text),
            "recv prints exactly the one message waiting, got:\n{out}"
        );
    }
    rows.push(row(
        format!("`send` to the whole group ({} recipients)", members - 1),
        sends,
    ));
    rows.push(row("`recv`, one message waiting".into(), one_waiting));

    let times = (0..reps)
        .map(|_| {
            let (time, out) = client.run(&["recv", "--state", &reader.state]);
            assert!(out.is_empty(), "nothing was waiting, got:\n{out}");
            time
        })
        .collect();
    rows.push(row("`recv`, nothing waiting".into(), times));

    let times = (0..reps).map(|_| client.run(&["ping"]).0).collect();
    rows.push(row("`ping`".into(), times));

    println!("# cli_bench: {members}-member group, wall time from process start to exit\n");
    println!("| command | runs | median | min | max |");
    println!("|---|---:|---:|---:|---:|");
    for Row { what, mut times } in rows {
        times.sort();
        println!(
            "| {what} | {} | {} | {} | {} |",
            times.len(),
            show(times[times.len() / 2]),
            show(times[0]),
            show(times[times.len() - 1])
        );
    }
}

fn parse_args() -> (usize, usize) {
    let (mut members, mut reps) = (100, 10);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|n| n.parse().ok());
        match arg.as_str() {
            "--members" => members = value.expect("--members N"),
            "--reps" => reps = value.expect("--reps N"),
            other => panic!("unknown argument {other}; usage: cli_bench [--members N] [--reps N]"),
        }
    }
    (members, reps)
}

/// The client binary in this example's target directory
/// (`target/release/examples/cli_bench` → `target/release/quicnprotochat-client`).
fn client_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the example runs from target/<profile>/examples");
    let binary = dir.join(format!("quicnprotochat-client{}", std::env::consts::EXE_SUFFIX));
    if !binary.is_file() {
        eprintln!(
            "{} is missing; build it first: cargo build --release -p quicnprotochat-client",
            binary.display()
        );
        std::process::exit(2);
    }
    binary
}

impl Client {
    /// Runs the client with `args`; returns the wall time from spawning it
    /// to its exit, and its standard output. Stops the benchmark (showing
    /// its standard error) if it fails.
    fn run(&self, args: &[&str]) -> (Duration, String) {
        let mut command = Command::new(&self.binary);
        command
            .arg("--server")
            .arg(&self.server)
            .arg("--ca-cert")
            .arg(&self.ca_cert)
            .args(args)
            .env_remove("QUICNPROTOCHAT_SERVER")
            .env_remove("QUICNPROTOCHAT_DS_SERVER")
            .env_remove("QUICNPROTOCHAT_CA_CERT")
            .env_remove("QUICNPROTOCHAT_SERVER_NAME")
            .env_remove("QUICNPROTOCHAT_STATE")
            .env("QUICNPROTOCHAT_STATE_PASSPHRASE", "bench");
        let started = Instant::now();
        let output = command.output().expect("the client binary runs");
        let time = started.elapsed();
        assert!(
            output.status.success(),
            "client {} failed ({}): {}",
            args.first().unwrap_or(&""),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        (time, String::from_utf8(output.stdout).expect("UTF-8 output"))
    }
}

/// Runs `work` on every item, `threads` at a time; returns the results in
/// the order they finished.
fn in_parallel<T: Sync, R: Send>(items: &[T], threads: usize, work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let result = work(item);
                    results.lock().unwrap().push(result);
                }
            });
        }
    });
    results.into_inner().unwrap()
}

fn row(what: String, times: Vec<Duration>) -> Row {
    Row { what, times }
}

fn show(duration: Duration) -> String {
    let millis = duration.as_secs_f64() * 1e3;
    if millis >= 1000.0 {
        format!("{:.2} s", millis / 1e3)
    } else {
        format!("{millis:.1} ms")
    }
}
