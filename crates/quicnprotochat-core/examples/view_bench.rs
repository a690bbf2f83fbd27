//! What the node pays to check a group's Commits (`PublicView`), in memory:
//! for groups of each size, the time to start a view from a GroupInfo and
//! ratchet tree, the stored view's size, and the time the node spends per
//! Commit (decode the stored view, check and apply the Commit, encode the
//! view again) for a self-update and for adding one member, and the bytes
//! the node writes to keep one standalone proposal (a row of its own; the
//! view is not written). The tree kept for a joiner is sealed under the new
//! epoch's key (protocol 8); the time that takes is shown beside its size.
//! Since protocol 9 the stored view is sealed under the group's state key:
//! each Commit opens it and seals the new one; that cost is shown on its
//! own, so the table holds the times before and after protocol 9 side by
//! side (whether a device left is read from the Commit's proposals, within
//! check+apply).
//! Single-threaded, so wall time is the node's CPU time. Prints a Markdown
//! table.
//!
//! Run: `cargo run --release -p quicnprotochat-core --example view_bench [-- SIZE ...]`
//! (default sizes: 10 100 1000 10000; 5 Commits of each kind per size).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::sealed::{self, Sealed};
use quicnprotochat_core::{
    EpochKey, GroupMember, GroupRef, IdentityKeypair, PublicView, StateKey, generate_key_package,
};

/// Members added per Commit while building a group.
const BATCH: usize = 1000;

/// Commits of each kind measured per size.
const RUNS: usize = 5;

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
        "| members | start the view | stored view | per self-update Commit (decode / check+apply / encode) | per add-one Commit (total, tree kept and sealed included) | protocol 9 adds per Commit (open and seal the view) | tree kept for the joiner (sealing it) | proposal kept (written) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in sizes {
        run(size);
    }
}

fn run(size: usize) {
    let provider = OpenMlsRustCrypto::default();
    let creator = IdentityKeypair::generate();
    let group_id = quicnprotochat_core::GroupId::new(format!("bench-{size}").into_bytes()).unwrap();
    let mut group = GroupMember::create(&provider, &creator, &group_id).unwrap();
    // Joiners' KeyPackages from one scratch provider: nobody joins here.
    let scratch = OpenMlsRustCrypto::default();
    let mut left = size - 1;
    while left > 0 {
        let batch = left.min(BATCH);
        let key_packages: Vec<Vec<u8>> = (0..batch)
            .map(|_| generate_key_package(&scratch, &IdentityKeypair::generate()).unwrap())
            .collect();
        group
            .add_members(
                &provider,
                &creator,
                &key_packages,
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        group.merge_pending_commit(&provider).unwrap();
        left -= batch;
    }
    let me = creator.public_key();
    let state = group.export_public_state(&provider, &creator).unwrap();
    let started = Instant::now();
    let view = PublicView::start(
        group_id.as_bytes(),
        group.epoch(),
        &state.group_info,
        &state.ratchet_tree,
        &me,
    )
    .unwrap();
    let start = started.elapsed();
    let state_key = StateKey::from_bytes([7; 32]);
    let group_ref = GroupRef::of(&group_id);
    let mut stored = sealed::seal(&state_key, Sealed::View, &group_ref, view.epoch(), &view.encode());
    assert_eq!(view.member_count(), size);

    let mut updates = Vec::new();
    let mut adds = Vec::new();
    let mut tree = (0, Duration::ZERO);
    let mut seals = Vec::new();
    let mut sealing_state = Vec::new();
    for _ in 0..RUNS {
        let commit = group.self_update(&provider, &creator).unwrap();
        let (timings, next, _, added_by_9) =
            apply(&group_id, &state_key, group.epoch(), &stored, &commit, &me, None);
        sealing_state.push(added_by_9);
        group.merge_pending_commit(&provider).unwrap();
        stored = next;
        updates.push(timings);

        let key_package = generate_key_package(&scratch, &IdentityKeypair::generate()).unwrap();
        let added = group
            .add_members(
                &provider,
                &creator,
                &[key_package],
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        let key = group.pending_epoch_key(&provider).unwrap();
        let (timings, next, kept, added_by_9) = apply(
            &group_id,
            &state_key,
            group.epoch(),
            &stored,
            &added.commit,
            &me,
            Some(&key),
        );
        sealing_state.push(added_by_9);
        group.merge_pending_commit(&provider).unwrap();
        stored = next;
        adds.push(timings);
        tree = kept.unwrap_or_default();
        seals.push(tree.1);
    }
    // A request to leave, as the node keeps it.
    let leave = group.leave(&provider, &creator).unwrap();
    let opened = sealed::open(&state_key, Sealed::View, &group_ref, group.epoch(), &stored).unwrap();
    let mut view = PublicView::decode(group_id.as_bytes(), &opened, &[]).unwrap();
    let (_, proposal) = view.add_proposal(&leave, &me).unwrap();
    let median = |runs: &[[Duration; 3]], part: usize| -> Duration {
        let mut values: Vec<Duration> = runs.iter().map(|run| run[part]).collect();
        values.sort();
        values[values.len() / 2]
    };
    let total = |runs: &[[Duration; 3]]| -> Duration {
        let mut values: Vec<Duration> = runs.iter().map(|run| run.iter().sum()).collect();
        values.sort();
        values[values.len() / 2]
    };
    sealing_state.sort();
    println!(
        "| {size} | {} | {} | {} ({} / {} / {}) | {} | {} | {} ({}) | {} |",
        ms(start),
        bytes(stored.len()),
        ms(total(&updates)),
        ms(median(&updates, 0)),
        ms(median(&updates, 1)),
        ms(median(&updates, 2)),
        ms(total(&adds)),
        ms(sealing_state[sealing_state.len() / 2]),
        bytes(tree.0),
        ms({
            seals.sort();
            seals[seals.len() / 2]
        }),
        bytes(proposal.len()),
    );
}

/// What [`apply`] measured of one Commit: see there.
type Handled = ([Duration; 3], Vec<u8>, Option<(usize, Duration)>, Duration);

/// Does what the node does for one Commit in `epoch`; returns the three
/// times of protocol 8 (decode, check+apply, encode), the new stored view
/// (sealed under `state_key`), for a Commit that adds members the size of
/// the tree kept for them and the time sealing it under `key` took
/// (encoding and sealing it count in the third time), and what protocol 9
/// adds: opening the stored view and sealing the new one.
fn apply(
    group: &quicnprotochat_core::GroupId,
    state_key: &StateKey,
    epoch: u64,
    stored: &[u8],
    commit: &[u8],
    caller: &quicnprotochat_core::IdentityKey,
    key: Option<&EpochKey>,
) -> Handled {
    let group_id = group.as_bytes();
    let group_ref = GroupRef::of(group);
    let started = Instant::now();
    let opened = sealed::open(state_key, Sealed::View, &group_ref, epoch, stored).unwrap();
    let mut protocol_9 = started.elapsed();
    let started = Instant::now();
    let mut view = PublicView::decode(group_id, &opened, &[]).unwrap();
    let decoded = started.elapsed();
    let started = Instant::now();
    let applied_commit = view.apply_commit(commit, caller).unwrap();
    let applied = started.elapsed();
    assert!(!applied_commit.takes_out_a_device, "nobody leaves here");
    let added = applied_commit.added;
    let started = Instant::now();
    let next = view.encode();
    // A Commit that adds members also leaves the new epoch's tree for
    // them, sealed under the new epoch's key.
    let tree = (!added.is_empty()).then(|| {
        let tree = view.ratchet_tree();
        let sealing = Instant::now();
        let key = key.expect("a Commit that adds members comes with its epoch key");
        let sealed = sealed::seal_welcome(key, &GroupRef::of(group), view.epoch(), state_key, &tree);
        (sealed.len(), sealing.elapsed())
    });
    let encoded = started.elapsed();
    let started = Instant::now();
    let next = sealed::seal(state_key, Sealed::View, &group_ref, view.epoch(), &next);
    protocol_9 += started.elapsed();
    ([decoded, applied, encoded], next, tree, protocol_9)
}

fn ms(took: Duration) -> String {
    format!("{:.2} ms", took.as_secs_f64() * 1000.0)
}

fn bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
