//! Storage scale benchmark: does fetching one queue stay as cheap when the
//! database holds a million messages for other people?
//!
//! Contract: with 1,000,000 messages queued across 10,000 recipients,
//! fetching one recipient's queue costs the same as with an empty database,
//! and the process RSS stays bounded.
//!
//! Uses the public [`Store`] API on a real SQLite file in a temporary
//! directory (WAL, `synchronous=FULL`, as the node runs by default):
//! 1. with only the measured recipient's messages in the database, repeats:
//!    queue 100 messages of 100 B for it in one call (timed as "enqueue"),
//!    `messages_after` (all 100) and `ack` through the last one. The same
//!    again with each message shared with a second recipient (one stored
//!    payload, as a group message is), which is acked first so that the
//!    measured ack frees the payloads, as the last group member's does;
//! 2. fills the database to MESSAGES messages of 100 B (distinct payloads)
//!    spread round-robin over RECIPIENTS recipients, CHUNK envelopes per
//!    `enqueue_batch` call;
//! 3. repeats step 1 on the full database, and also fetches and acks queues
//!    of the filled recipients, whose messages lie scattered through the
//!    table.
//!
//! Prints Markdown tables: fill time, database size, fetch costs before and
//! after (median, p99), process RSS (VmRSS / VmHWM from `/proc/self/status`)
//! along the way, and the query plans of the statements a fetch runs.
//!
//! Run: `cargo run --release -p quicnprotochat-server --example store_scale [-- MESSAGES RECIPIENTS [--reps N] [--chunk CHUNK]]`
//! (defaults: 1000000 10000, 300 repetitions per measurement, 1000 envelopes
//! per fill call; a measurement also stops after 30 s).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use quicnprotochat_core::{IdentityKey, Seq};
use quicnprotochat_server::store::{Durability, Envelope, FETCH_MAX_MESSAGES, Limits, Store};
use rusqlite::{Connection, OpenFlags};

/// Messages per measured queue.
const QUEUE: usize = 100;
/// Bytes per payload.
const PAYLOAD: usize = 100;
/// Fill calls in flight (the writer commits what waits together).
const FILL_IN_FLIGHT: usize = 4;
/// Longest one measurement may run; a slow one is cut short, not awaited.
const BUDGET: Duration = Duration::from_secs(30);
/// Repetitions thrown away before each measurement.
const WARM_UP: usize = 5;

struct Args {
    messages: usize,
    recipients: usize,
    reps: usize,
    /// Envelopes per `enqueue_batch` call while filling. One call is one
    /// savepoint, whose cost grows faster than its size.
    chunk: usize,
}

/// The costs of one fetch cycle, repeated.
#[derive(Default)]
struct Samples {
    enqueue: Vec<Duration>,
    fetch: Vec<Duration>,
    ack: Vec<Duration>,
}

fn main() {
    let args = parse_args();
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("node.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(&args, &path));
}

fn parse_args() -> Args {
    let mut args = Args {
        messages: 1_000_000,
        recipients: 10_000,
        reps: 300,
        chunk: 1000,
    };
    let mut positional = 0;
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        let number = |value: Option<String>| -> usize {
            value
                .and_then(|n| n.replace(['_', ','], "").parse().ok())
                .expect("usage: store_scale [MESSAGES RECIPIENTS] [--reps N] [--chunk N]")
        };
        match arg.as_str() {
            "--reps" => args.reps = number(given.next()),
            "--chunk" => args.chunk = number(given.next()),
            _ if positional == 0 => {
                args.messages = number(Some(arg));
                positional += 1;
            }
            _ if positional == 1 => {
                args.recipients = number(Some(arg));
                positional += 1;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        args.recipients > 0 && args.reps > 0 && args.chunk > 0,
        "RECIPIENTS, --reps and --chunk must be positive"
    );
    args
}

async fn run(args: &Args, path: &Path) {
    let mut memory = vec![("start", memory_status())];
    // Deep enough for every filled queue plus the measured ones.
    let limits = Limits {
        max_queue_depth: args.messages / args.recipients + 10 * QUEUE,
        max_queue_bytes: u64::MAX,
        ..Limits::default()
    };
    let (store, closer) = Store::open_with(path, limits, Durability::Full).unwrap();
    memory.push(("store opened", memory_status()));

    let sender = key(u64::MAX, 0xEE);
    let target = key(u64::MAX, 0xAA);
    let peer = key(u64::MAX, 0xBB);

    let empty_single = measure(&store, sender, target, None, args.reps).await;
    let empty_shared = measure(&store, sender, target, Some(peer), args.reps).await;
    let empty_size = database_size(path);
    memory.push(("after fetches, empty database", memory_status()));

    let started = Instant::now();
    fill(&store, sender, args).await;
    let fill_time = started.elapsed();
    let full_size = database_size(path);
    let full_count = count_messages(path);
    memory.push(("after filling", memory_status()));

    let full_single = measure(&store, sender, target, None, args.reps).await;
    let full_shared = measure(&store, sender, target, Some(peer), args.reps).await;
    let scattered = measure_filled(&store, args, args.recipients.min(args.reps)).await;
    memory.push(("after fetches, full database", memory_status()));

    println!(
        "# store_scale: {} messages over {} recipients, {PAYLOAD} B payloads\n",
        args.messages, args.recipients
    );
    println!("| fill | value |");
    println!("|---|---:|");
    println!(
        "| fill time ({} per call, {FILL_IN_FLIGHT} calls in flight) | {:.1} s ({:.0} messages/s) |",
        args.chunk,
        fill_time.as_secs_f64(),
        args.messages as f64 / fill_time.as_secs_f64()
    );
    println!("| database before filling (main + WAL) | {} |", empty_size);
    println!("| database after filling (main + WAL) | {} |", full_size);
    println!("| messages in the database after filling | {full_count} |");
    println!();

    println!(
        "| step ({QUEUE} messages of {PAYLOAD} B) | only this queue: median | p99 | full: median | p99 | full / only (medians) | reps |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let rows = [
        (
            "enqueue, own messages",
            &empty_single.enqueue,
            &full_single.enqueue,
        ),
        (
            "messages_after, own messages",
            &empty_single.fetch,
            &full_single.fetch,
        ),
        ("ack, own messages", &empty_single.ack, &full_single.ack),
        (
            "enqueue, shared payloads",
            &empty_shared.enqueue,
            &full_shared.enqueue,
        ),
        (
            "messages_after, shared payloads",
            &empty_shared.fetch,
            &full_shared.fetch,
        ),
        (
            "ack, shared payloads, last to ack",
            &empty_shared.ack,
            &full_shared.ack,
        ),
        // A filled queue's rows lie scattered through the table; compared
        // with a queue of own messages in the otherwise empty database.
        (
            "messages_after, a filled queue",
            &empty_single.fetch,
            &scattered.fetch,
        ),
        ("ack, a filled queue", &empty_single.ack, &scattered.ack),
    ];
    for (step, only, full) in rows {
        let (only_median, only_p99) = percentiles(only);
        let (full_median, full_p99) = percentiles(full);
        println!(
            "| {step} | {} | {} | {} | {} | ×{:.2} | {} / {} |",
            show(only_median),
            show(only_p99),
            show(full_median),
            show(full_p99),
            full_median.as_secs_f64() / only_median.as_secs_f64(),
            only.len(),
            full.len()
        );
    }
    println!();

    println!("| memory | VmRSS | VmHWM |");
    println!("|---|---:|---:|");
    for (when, status) in &memory {
        println!("| {when} | {} | {} |", status.0, status.1);
    }
    println!();

    print_query_plans(path);

    drop(store);
    closer.close().await;
}

/// Repeats one fetch cycle on `target`'s queue: queue [`QUEUE`] messages,
/// read them all, ack them. With `shared`, each message also goes to that
/// second recipient (one stored payload), which reads and acks first,
/// unmeasured, so the measured ack is the one that frees the payloads.
async fn measure(
    store: &Store,
    sender: IdentityKey,
    target: IdentityKey,
    shared: Option<IdentityKey>,
    reps: usize,
) -> Samples {
    let mut samples = Samples::default();
    let started = Instant::now();
    for rep in 0.. {
        if samples.fetch.len() >= reps || (started.elapsed() > BUDGET && samples.fetch.len() >= 3) {
            break;
        }
        let envelopes = (0..QUEUE)
            .map(|i| Envelope {
                recipients: std::iter::once(target).chain(shared).collect(),
                payload: payload((rep * QUEUE + i) as u64),
                message_id: None,
            })
            .collect();
        let timer = Instant::now();
        store.enqueue_batch(sender, envelopes).await.unwrap().unwrap();
        let enqueue = timer.elapsed();
        if let Some(other) = shared {
            let messages = store.messages_after(other, Seq::ZERO, 0).await.unwrap();
            store.ack(other, messages.last().unwrap().seq).await.unwrap();
        }
        let (fetch, ack) = fetch_and_ack(store, target, QUEUE).await;
        // Warm-up rounds are thrown away, unless rounds are too slow to spare.
        if rep < WARM_UP && started.elapsed() < BUDGET / 10 {
            continue;
        }
        samples.enqueue.push(enqueue);
        samples.fetch.push(fetch);
        samples.ack.push(ack);
    }
    samples
}

/// Fetches and acks the queues of `count` filled recipients, each once.
async fn measure_filled(store: &Store, args: &Args, count: usize) -> Samples {
    let mut samples = Samples::default();
    let started = Instant::now();
    for index in 0..count {
        if index > 0 && started.elapsed() > BUDGET {
            break;
        }
        // What `fill` queued for this recipient, as far as one fetch returns.
        let queued = args.messages / args.recipients + usize::from(index < args.messages % args.recipients);
        let expected = queued.min(FETCH_MAX_MESSAGES);
        let (fetch, ack) = fetch_and_ack(store, key(index as u64, 0x11), expected).await;
        samples.fetch.push(fetch);
        samples.ack.push(ack);
    }
    samples
}

/// Times `messages_after` of the whole queue and the `ack` through the last
/// message it returned; checks that `expected` messages came.
async fn fetch_and_ack(store: &Store, recipient: IdentityKey, expected: usize) -> (Duration, Duration) {
    let timer = Instant::now();
    let messages = store.messages_after(recipient, Seq::ZERO, 0).await.unwrap();
    let fetch = timer.elapsed();
    assert_eq!(messages.len(), expected);
    let last = messages.last().expect("the queue is not empty").seq;
    let timer = Instant::now();
    let acked = store.ack(recipient, last).await.unwrap();
    let ack = timer.elapsed();
    assert_eq!(acked, messages.len());
    (fetch, ack)
}

/// Queues MESSAGES distinct payloads, message `n` for recipient
/// `n % RECIPIENTS`, so each queue's rows are spread over the whole table.
async fn fill(store: &Store, sender: IdentityKey, args: &Args) {
    let Args {
        messages,
        recipients,
        chunk,
        ..
    } = *args;
    let calls = (0..messages).step_by(chunk).map(|first| {
        let envelopes: Vec<Envelope> = (first..messages.min(first + chunk))
            .map(|n| Envelope {
                recipients: vec![key((n % recipients) as u64, 0x11)],
                payload: payload(n as u64),
                message_id: None,
            })
            .collect();
        store.enqueue_batch(sender, envelopes)
    });
    let mut calls = futures::stream::iter(calls).buffer_unordered(FILL_IN_FLIGHT);
    while let Some(result) = calls.next().await {
        result.unwrap().expect("the store has no depth limit here");
    }
}

/// An identity key: `index` in the first eight bytes, `fill` elsewhere.
fn key(index: u64, fill: u8) -> IdentityKey {
    let mut bytes = [fill; 32];
    bytes[..8].copy_from_slice(&index.to_be_bytes());
    IdentityKey::from_bytes(bytes)
}

/// A distinct [`PAYLOAD`]-byte payload.
fn payload(n: u64) -> Vec<u8> {
    let mut bytes = vec![0x5a; PAYLOAD];
    bytes[..8].copy_from_slice(&n.to_be_bytes());
    bytes
}

/// VmRSS and VmHWM of this process, as `/proc/self/status` shows them.
fn memory_status() -> (String, String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map_or_else(|| "n/a".to_owned(), |value| value.trim().to_owned())
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sizes of the database file and its WAL.
fn database_size(path: &Path) -> String {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let wal = path.with_extension("db-wal");
    format!(
        "{:.1} MiB + {:.1} MiB",
        size(path) as f64 / 1048576.0,
        size(&wal) as f64 / 1048576.0
    )
}

fn read_only(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

fn count_messages(path: &Path) -> i64 {
    read_only(path)
        .query_row("SELECT count(*) FROM messages", [], |row| row.get(0))
        .unwrap()
}

/// Query plans of what one fetch cycle runs (statements copied from
/// `store/sqlite/storage.rs` and the V3/V5 triggers in `store/sqlite/migrations.rs`). A
/// plan of a `DELETE FROM payloads` includes the lookup SQLite makes in
/// `messages` to enforce the `payload_id` foreign key.
fn print_query_plans(path: &Path) {
    let statements = [
        (
            "messages_after",
            "SELECT m.seq, coalesce(p.body, m.payload) FROM messages m
             LEFT JOIN payloads p ON p.id = m.payload_id
             WHERE m.recipient_key = ?1 AND m.seq > ?2 ORDER BY m.seq",
        ),
        (
            "ack (delete_through)",
            "DELETE FROM messages WHERE recipient_key = ?1 AND seq <= ?2",
        ),
        (
            "trigger messages_count_delete",
            "UPDATE queue_depths SET depth = depth - 1 WHERE recipient_key = ?1",
        ),
        (
            "trigger messages_release_payload",
            "DELETE FROM payloads WHERE id = ?1 AND refs <= 0",
        ),
    ];
    let db = read_only(path);
    let foreign_keys: i64 = db
        .query_row(
            "SELECT count(*) FROM pragma_foreign_key_list('messages')",
            [],
            |row| row.get(0),
        )
        .unwrap();
    println!("Query plans (`messages` has {foreign_keys} foreign key(s); the node sets foreign_keys=ON):\n");
    for (what, sql) in statements {
        let mut plan = db.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = std::iter::repeat_n(rusqlite::types::Null, plan.parameter_count());
        let details: Vec<String> = plan
            .query_map(rusqlite::params_from_iter(nulls), |row| row.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        println!("- {what}: `{}`", details.join("; "));
    }
}

/// Median and 99th percentile.
fn percentiles(times: &[Duration]) -> (Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let p99 = ((sorted.len() * 99).div_ceil(100)).clamp(1, sorted.len()) - 1;
    (sorted[sorted.len() / 2], sorted[p99])
}

fn show(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros >= 10_000.0 {
        format!("{:.1} ms", micros / 1000.0)
    } else {
        format!("{micros:.0} µs")
    }
}
