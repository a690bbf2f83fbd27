//! The node's memory under peers that make it hold what they do not take:
//! the real node binary (so its resident memory is its own) and hostile
//! clients over real QUIC, with 1, 3 and 16 connections each:
//! - **answers never read**: a peer fills its own queue with 8 messages of
//!   1 MB, stops reading its stream (so grants no flow-control credit) and
//!   pipelines 250 `fetchSince` calls on each connection;
//! - **pushes never taken**: 16 subscriptions from seq 0 of that queue on
//!   each connection (four streams of four), nothing read;
//! - **frames never finished**: on each of the connection's four streams, a
//!   frame declaring 3 MB, of which 1 KB is sent.
//!
//! Throughout each attack a member (another identity) pings, sends and
//! fetches, and the node's resident memory stays within the documented
//! bound: the attacker's budget (its calls and pushes accounts, shared by
//! all its connections), QUIC's windows per connection, and slack for the
//! allocator. Then the node closes an attacking connection as stalled once
//! the stall timeout has passed.
//! The figures are printed for BENCHMARKS.md (`--nocapture`).

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

#[path = "support/attacks.rs"]
mod attacks;
mod node;

use std::path::PathBuf;

use attacks::{Attack, STEP, mib};
use node::process::{start, terminate};
use quicnprotochat_proto::transport::{CONNECTION_RECEIVE_WINDOW, SEND_WINDOW};

/// The node's stall timeout in this test.
const STALL_SECS: u64 = 4;

/// What a peer's accounts may hold at the defaults: four frames of 3 MiB
/// with their answers' room, and two pushes of 2 MiB (see the node's
/// `memory_budget`).
const PEER_BUDGET: u64 = 4 * 3 * 1024 * 1024 + 2 * (2 * 1024 * 1024 + 4096);

/// Per connection, besides the budget: QUIC's windows, and its own state
/// (TLS, streams, the RPC sessions' tables).
const PER_CONNECTION: u64 = CONNECTION_RECEIVE_WINDOW as u64 + SEND_WINDOW + 256 * 1024;

/// Slack for the allocator: freed memory it keeps, arenas of the threads.
const SLACK: u64 = 24 * 1024 * 1024;

#[test]
fn memory_stays_bounded_while_peers_hold_what_they_do_not_take() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(
        dir.path(),
        &[
            "--stall-timeout",
            &STALL_SECS.to_string(),
            "--send-bytes-rate",
            "0",
            "--enqueue-rate",
            "0",
        ],
    );
    let trusted: PathBuf = dir.path().join("data/server-cert.der");
    let pid = running.child.id();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        tokio::time::timeout(STEP, attacks::fill_queue(running.addr, &trusted))
            .await
            .unwrap();
        for kind in [
            Attack::AnswersNeverRead,
            Attack::PushesNeverTaken,
            Attack::FramesNeverFinished,
        ] {
            for connections in [1, 3, 16] {
                let report = tokio::time::timeout(
                    STEP * 2,
                    attacks::attack(running.addr, pid, &trusted, kind, connections, true),
                )
                .await
                .unwrap_or_else(|_| panic!("{kind:?} x{connections} finished in time"));
                let grown = report.during.saturating_sub(report.before);
                let bound = PEER_BUDGET + connections as u64 * PER_CONNECTION + SLACK;
                println!(
                    "{kind:?} x{connections}: RSS {:.1} -> {:.1} MiB (+{:.1} MiB, bound {:.1} MiB); member served in {:?}",
                    mib(report.before),
                    mib(report.during),
                    mib(grown),
                    mib(bound),
                    report.served_in,
                );
                assert!(
                    grown <= bound,
                    "{kind:?} with {connections} connections grew the node by {:.1} MiB, more than {:.1} MiB",
                    mib(grown),
                    mib(bound)
                );
                // The node closes an attacking connection once it has waited
                // on it for the stall timeout.
                match report.closed {
                    Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                        assert_eq!(close.error_code, 0x52u32.into(), "{kind:?}: closed as stalled, {close:?}")
                    }
                    other => panic!("{kind:?}: the node should close a connection as stalled, got {other:?}"),
                }
            }
        }
    });
    let (status, log) = terminate(running);
    assert!(status.success(), "the node stopped cleanly: {log}");
}
