//! Measures a running node's resident memory under the memory attacks of
//! `tests/memory.rs` (answers never read, pushes never taken, frames never
//! finished), for BENCHMARKS.md; works against any node binary, older ones
//! included (nothing is asserted).
//!
//! ```sh
//! quicnprotochat-server --listen 127.0.0.1:4201 --send-bytes-rate 0 --enqueue-rate 0 &
//! cargo run --release -p quicnprotochat-server --example memory_attacks -- \
//!     127.0.0.1:4201 PID data/server-cert.der answers,pushes,frames 1,3,16
//! ```

#![allow(clippy::unwrap_used)] // a measurement tool: a failed step ends it

#[path = "../tests/support/attacks.rs"]
mod attacks;

use std::path::PathBuf;

use attacks::{Attack, STEP, mib};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, pid, cert, kinds, counts] = &args[..] else {
        eprintln!("usage: memory_attacks ADDR PID CERT answers,pushes,frames 1,3,16");
        std::process::exit(2);
    };
    let addr = addr.parse().unwrap();
    let pid: u32 = pid.parse().unwrap();
    let trusted = PathBuf::from(cert);
    let kinds: Vec<Attack> = kinds
        .split(',')
        .map(|kind| match kind {
            "answers" => Attack::AnswersNeverRead,
            "pushes" => Attack::PushesNeverTaken,
            "frames" => Attack::FramesNeverFinished,
            other => panic!("unknown attack {other}"),
        })
        .collect();
    let counts: Vec<usize> = counts.split(',').map(|n| n.parse().unwrap()).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        tokio::time::timeout(STEP, attacks::fill_queue(addr, &trusted))
            .await
            .unwrap();
        println!("| attack | connections | RSS before | RSS while it holds | growth | member served in |");
        println!("|---|---|---|---|---|---|");
        for kind in &kinds {
            for &connections in &counts {
                let report = attacks::attack(addr, pid, &trusted, *kind, connections, false).await;
                println!(
                    "| {kind:?} | {connections} | {:.1} MiB | {:.1} MiB | +{:.1} MiB | {:.0?} |",
                    mib(report.before),
                    mib(report.during),
                    mib(report.during.saturating_sub(report.before)),
                    report.served_in,
                );
                // Let the node give back what the attack held.
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    });
}
