//! What opening an encrypted state file costs, per command: the key
//! derivation the client uses (Argon2id, 7 MiB, 5 passes, 2 lanes side by
//! side), other settings OWASP lists as equivalent, and SQLCipher's own
//! passphrase KDF (PBKDF2-HMAC-SHA512, 256,000 rounds) that a raw key
//! skips; then opening a keyed file and reading from it.
//!
//! Prints a Markdown table: the best and the median of `--reps` runs. In one
//! process the allocator hands later runs memory already paged in; a new
//! CLI process pays the page faults too (a few ms more: `cli_bench` shows
//! what a command waits for).
//!
//! Run: `cargo run --release -p quicnprotochat-client --example state_key_bench [-- --reps N]`
//! (default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

fn main() {
    let reps = std::env::args()
        .skip_while(|arg| arg != "--reps")
        .nth(1)
        .map(|n| n.parse().expect("--reps N"))
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let salt = [7u8; 16];
    let passphrase = b"correct horse battery staple";
    let argon = |memory_kib: u32, passes: u32, lanes: u32| {
        move || {
            let params = argon2::Params::new(memory_kib, passes, lanes, Some(32)).unwrap();
            let mut key = [0u8; 32];
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(passphrase, &salt, &mut key)
                .unwrap();
        }
    };

    // A file keyed by passphrase (SQLCipher's PBKDF2) and one by raw key.
    let pbkdf2_file = dir.path().join("pbkdf2.db");
    let raw_file = dir.path().join("raw.db");
    let raw_key = format!("PRAGMA key = \"x'{}'\"", "ab".repeat(32));
    for (file, key) in [
        (&pbkdf2_file, "PRAGMA key = 'passphrase'".to_owned()),
        (&raw_file, raw_key.clone()),
    ] {
        let connection = rusqlite::Connection::open(file).unwrap();
        connection.execute_batch(&key).unwrap();
        connection
            .execute_batch("CREATE TABLE t (x BLOB); INSERT INTO t VALUES (zeroblob(100000));")
            .unwrap();
    }
    let open = |file: std::path::PathBuf, key: String| {
        move || {
            let connection = rusqlite::Connection::open(&file).unwrap();
            connection.execute_batch(&key).unwrap();
            let _: i64 = connection
                .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
                .unwrap();
        }
    };

    println!("| step | best | median |");
    println!("|---|---:|---:|");
    row(
        reps,
        "Argon2id 7 MiB, 5 passes, 2 lanes (the client's)",
        argon(7 * 1024, 5, 2),
    );
    row(reps, "Argon2id 7 MiB, 5 passes, 1 lane", argon(7 * 1024, 5, 1));
    row(reps, "Argon2id 12 MiB, 3 passes, 2 lanes", argon(12 * 1024, 3, 2));
    row(reps, "Argon2id 12 MiB, 3 passes, 1 lane", argon(12 * 1024, 3, 1));
    row(reps, "Argon2id 19 MiB, 2 passes, 1 lane", argon(19 * 1024, 2, 1));
    row(
        reps,
        "open + first read, SQLCipher passphrase (PBKDF2-SHA512 256,000)",
        open(pbkdf2_file, "PRAGMA key = 'passphrase'".to_owned()),
    );
    row(reps, "open + first read, raw key", open(raw_file, raw_key));
}

fn row(reps: usize, what: &str, mut work: impl FnMut()) {
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| {what} | {:.1} ms | {:.1} ms |",
        ms(times[0]),
        ms(times[reps / 2])
    );
}
