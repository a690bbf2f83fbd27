//! Why the PostgreSQL store uses the synchronous `postgres` client: the
//! measurement behind the choice (docs/benchmarks/journal.md, "Several
//! nodes on PostgreSQL").
//!
//! The rules decide each command statement by statement (a claimed message
//! id, then the queue's usage, then the append), so one command's
//! statements cannot be pipelined whatever the client. What a client adds
//! is its cost per round trip. This measures a prepared one-row statement
//! on one connection:
//! - `postgres` (synchronous, as the store's writer threads use it),
//! - `tokio-postgres` awaited one by one on a current-thread runtime (what
//!   an async store would do per statement),
//! - `tokio-postgres` pipelined, 64 in flight (only possible for
//!   statements that do not depend on each other: an upper bound).
//!
//! Run: `cargo run --release -p quicnprotochat-server --example
//! pg_client_choice -- postgres://…` (a database the role may create a
//! temporary table in), or without an argument to start a throwaway
//! cluster.

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap is a failed run

use std::time::Instant;

const ROUNDS: usize = 20_000;

fn main() {
    let cluster;
    let url = match std::env::args().nth(1) {
        Some(url) => url,
        None => {
            cluster = quicnprotochat_testpg::TestPostgres::start_own().expect("PostgreSQL to start");
            cluster.create_database()
        }
    };
    let sync = synchronous(&url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (one_by_one, pipelined) = runtime.block_on(asynchronous(&url));
    println!("| client | µs per statement |");
    println!("|---|---|");
    println!("| postgres (sync), one by one | {sync:.1} |");
    println!("| tokio-postgres, awaited one by one | {one_by_one:.1} |");
    println!("| tokio-postgres, 64 pipelined | {pipelined:.1} |");
}

const STATEMENT: &str = "SELECT depth, bytes FROM queues WHERE recipient_key = $1";

fn setup(client: &mut postgres::Client) {
    client
        .batch_execute(
            "CREATE TEMP TABLE queues (recipient_key bytea PRIMARY KEY, depth bigint, bytes bigint);
             INSERT INTO queues SELECT decode(lpad(to_hex(i), 64, '0'), 'hex'), i, i FROM generate_series(1, 1000) i",
        )
        .unwrap();
}

fn key(i: usize) -> Vec<u8> {
    let mut key = vec![0u8; 32];
    key[24..].copy_from_slice(&((i % 1000 + 1) as u64).to_be_bytes());
    key
}

fn synchronous(url: &str) -> f64 {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        setup(&mut client);
        let statement = client.prepare(STATEMENT).unwrap();
        let started = Instant::now();
        for i in 0..ROUNDS {
            let row = client.query_one(&statement, &[&key(i)]).unwrap();
            assert!(row.get::<_, i64>(0) > 0);
        }
        started.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64
    })
    .join()
    .unwrap()
}

async fn asynchronous(url: &str) -> (f64, f64) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TEMP TABLE queues (recipient_key bytea PRIMARY KEY, depth bigint, bytes bigint);
             INSERT INTO queues SELECT decode(lpad(to_hex(i), 64, '0'), 'hex'), i, i FROM generate_series(1, 1000) i",
        )
        .await
        .unwrap();
    let statement = client.prepare(STATEMENT).await.unwrap();
    let started = Instant::now();
    for i in 0..ROUNDS {
        let row = client.query_one(&statement, &[&key(i)]).await.unwrap();
        assert!(row.get::<_, i64>(0) > 0);
    }
    let one_by_one = started.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64;
    let started = Instant::now();
    for chunk in (0..ROUNDS).collect::<Vec<_>>().chunks(64) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|i| key(*i)).collect();
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
            keys.iter().map(|key| [key as _]).collect();
        let queries = params.iter().map(|params| client.query_one(&statement, params));
        for row in futures::future::join_all(queries).await {
            assert!(row.unwrap().get::<_, i64>(0) > 0);
        }
    }
    let pipelined = started.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64;
    (one_by_one, pipelined)
}
