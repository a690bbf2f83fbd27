//! MLS group scaling benchmark, in memory (no network, no disk).
//!
//! For each group size: the creator adds everyone in one Commit and, in a
//! second group, in batches; a newcomer joins from the Welcome; one
//! application message is sent and received. Prints a Markdown table.
//!
//! Run: `cargo run --release -p quicnprotochat-core --example group_bench [-- SIZE ...]`
//! (default sizes: 10 100 1000 10000; batch size 100).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{GroupMember, IdentityKeypair, Received, generate_key_package};

const BATCH: usize = 100;

struct Person {
    identity: IdentityKeypair,
    provider: OpenMlsRustCrypto,
}

impl Person {
    fn new() -> Person {
        Person {
            identity: IdentityKeypair::generate(),
            provider: OpenMlsRustCrypto::default(),
        }
    }
}

fn main() {
    let sizes: Vec<usize> = {
        let given: Vec<usize> = std::env::args()
            .skip(1)
            .map(|a| a.parse().expect("sizes are numbers"))
            .collect();
        if given.is_empty() {
            vec![10, 100, 1000, 10_000]
        } else {
            given
        }
    };
    println!(
        "| members | KeyPackages made | add all, one commit | commit | welcome | add in batches of {BATCH} | join from welcome | send 1 KiB | receive 1 KiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in sizes {
        run(size);
    }
}

fn run(size: usize) {
    let creator = Person::new();
    let payload = vec![0x42u8; 1024];

    // Everyone but the creator, each with a KeyPackage in their own storage.
    let started = Instant::now();
    let joiners: Vec<Person> = (1..size).map(|_| Person::new()).collect();
    let packages: Vec<Vec<u8>> = joiners
        .iter()
        .map(|p| generate_key_package(&p.provider, &p.identity).unwrap())
        .collect();
    let made = started.elapsed();

    // One commit adding everyone.
    let mut group = GroupMember::create(
        &creator.provider,
        &creator.identity,
        &quicnprotochat_core::GroupId::new(b"bench-one".to_vec()).unwrap(),
    )
    .unwrap();
    let started = Instant::now();
    let added = group
        .add_members(
            &creator.provider,
            &creator.identity,
            &packages,
            &quicnprotochat_core::NoDeviceLists,
        )
        .unwrap();
    group.merge_pending_commit(&creator.provider).unwrap();
    let add_one = started.elapsed();

    // The last joiner joins from the Welcome and the ratchet tree (which
    // the node serves; the Welcome does not carry it).
    let newcomer = joiners.last().expect("at least one joiner");
    let tree = group.ratchet_tree().unwrap();
    let started = Instant::now();
    let mut joined = GroupMember::join(
        &newcomer.provider,
        &added.welcome,
        Some(&tree),
        &quicnprotochat_core::NoDeviceLists,
    )
    .unwrap();
    let join = started.elapsed();
    assert_eq!(joined.members().len(), size);

    let started = Instant::now();
    let message = group
        .send(&creator.provider, &creator.identity, &payload)
        .unwrap();
    let send = started.elapsed();
    let started = Instant::now();
    let received = joined
        .receive(&newcomer.provider, &message, &quicnprotochat_core::NoDeviceLists)
        .unwrap();
    let receive = started.elapsed();
    assert!(matches!(received, Received::Application { .. }));

    // A second group, built in batches (fresh KeyPackages: each is single use).
    let fresh: Vec<Vec<u8>> = joiners
        .iter()
        .map(|p| generate_key_package(&p.provider, &p.identity).unwrap())
        .collect();
    let mut batched = GroupMember::create(
        &creator.provider,
        &creator.identity,
        &quicnprotochat_core::GroupId::new(b"bench-batches".to_vec()).unwrap(),
    )
    .unwrap();
    let started = Instant::now();
    for chunk in fresh.chunks(BATCH) {
        batched
            .add_members(
                &creator.provider,
                &creator.identity,
                chunk,
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        batched.merge_pending_commit(&creator.provider).unwrap();
    }
    let add_batches = started.elapsed();
    assert_eq!(batched.members().len(), size);

    println!(
        "| {size} | {} | {} | {} | {} | {} ({} commits) | {} | {} | {} |",
        fmt(made),
        fmt(add_one),
        bytes(added.commit.len()),
        bytes(added.welcome.len()),
        fmt(add_batches),
        fresh.len().div_ceil(BATCH),
        fmt(join),
        fmt(send),
        fmt(receive),
    );
}

fn fmt(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1000.0 {
        format!("{micros:.0} µs")
    } else if micros < 1e6 {
        format!("{:.1} ms", micros / 1000.0)
    } else {
        format!("{:.2} s", micros / 1e6)
    }
}

fn bytes(n: usize) -> String {
    if n < 10 * 1024 {
        format!("{n} B")
    } else if n < 10 * 1024 * 1024 {
        format!("{:.0} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / 1048576.0)
    }
}
