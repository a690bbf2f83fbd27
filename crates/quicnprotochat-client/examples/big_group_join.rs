//! Joining a big group with the node's default limits, end to end: a real
//! node (default configuration: 1 MiB payload limit) on 127.0.0.1, a creator
//! that builds a group of SIZE members through it (Commits of 250 adds, each
//! checked by the node), and the real CLI code (`register-state`, then
//! `join`, run in this process) joining as the last member, added alone. Prints the
//! Welcome's size, the size of the tree the joiner fetched from the node,
//! and the wall time of `join`.
//!
//! Run: `cargo run --release -p quicnprotochat-client --example big_group_join [-- SIZE]`
//! (default 10000).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::Instant;

use clap::Parser;
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_client::node_client::{ConnectOptions, NodeClient};
use quicnprotochat_client::state::{StateAccess, StateFile};

/// The joiner's state file passphrase.
const PASSPHRASE: &str = "example";
use quicnprotochat_client::{Cli, commands};
use quicnprotochat_core::{GroupId, GroupMember, IdentityKeypair, Seq, generate_key_package};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedKeyPackage, FetchedWelcomeTree};
use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};
use quicnprotochat_server::testing::TestNode;

/// Members added per Commit: a creator-only group's Commit carries an update
/// path encrypted to nearly every member (~85 B each), plus each added
/// KeyPackage; 250 keeps a Commit at 10,000 members under 1 MiB.
const BATCH: usize = 250;

fn main() {
    let size: usize = std::env::args()
        .nth(1)
        .map_or(10_000, |a| a.parse().expect("SIZE is a number"));
    assert!(size >= 2, "a group to join has at least its creator");
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::builder().in_dir(dir.path()).start();
    let addr = node.addr;
    let cert = dir.path().join("server-cert.der");
    let state = dir.path().join("joiner.state");
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, PASSPHRASE).unwrap();
    let connection = [
        "--server".to_owned(),
        addr.to_string(),
        "--ca-cert".to_owned(),
        cert.display().to_string(),
        "--state-passphrase-file".to_owned(),
        passphrase.display().to_string(),
    ];
    let cli = |args: &[&str]| {
        let mut full = vec!["quicnprotochat-client".to_owned()];
        full.extend(connection.iter().cloned());
        full.extend(args.iter().map(|a| a.to_string()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new()
            .block_on(&runtime, commands::run(Cli::parse_from(full)))
            .unwrap();
    };
    let state_arg = state.display().to_string();
    cli(&["register-state", "--state", &state_arg]);
    let joiner = StateFile::open(&StateAccess::with_passphrase(&state, PASSPHRASE))
        .unwrap()
        .identity()
        .unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let options = ConnectOptions {
        server: addr.to_string(),
        server_name: None,
        ca_cert: cert.clone(),
    };
    let (welcome, tree) = local.block_on(&runtime, async {
        let creator = IdentityKeypair::generate();
        let client = NodeClient::connect(&options, Some(&creator)).await.unwrap();
        let provider = OpenMlsRustCrypto::default();
        let scratch = OpenMlsRustCrypto::default();
        let group_id = GroupId::new(b"big".to_vec()).unwrap();
        let mut group = GroupMember::create(&provider, &creator, &group_id).unwrap();
        // Adds never take a device out: the group keeps epoch 0's state key.
        let state_key = group.current_state_key(&provider).unwrap();
        let mut initial_state = Some(group.export_public_state(&provider, &creator).unwrap());
        let started = Instant::now();
        // Everyone but the joiner, BATCH per Commit; then the joiner alone,
        // so its Welcome is the Welcome of one new member.
        let mut left = size - 2;
        let mut commits = 0;
        let last_welcome = loop {
            let joining = left == 0;
            let packages: Vec<Vec<u8>> = if !joining {
                let batch = left.min(BATCH);
                left -= batch;
                (0..batch)
                    .map(|_| generate_key_package(&scratch, &IdentityKeypair::generate()).unwrap())
                    .collect()
            } else {
                let FetchedKeyPackage::Package(package) =
                    client.fetch_key_package(&joiner.public_key()).await.unwrap()
                else {
                    panic!("the joiner uploaded KeyPackages");
                };
                vec![package]
            };
            let epoch = group.epoch();
            // The Commit goes to every member but its sender (the node
            // refuses one that leaves a member behind); those it adds get
            // the Welcome.
            let members: Vec<_> = group
                .members()
                .into_iter()
                .filter(|member| *member != creator.public_key())
                .collect();
            let added = group
                .add_members(
                    &provider,
                    &creator,
                    &packages,
                    &quicnprotochat_core::NoDeviceLists,
                )
                .unwrap();
            let state = initial_state.take().map(|state| GroupState {
                group_info: state.group_info,
                ratchet_tree: state.ratchet_tree,
            });
            let commit_len = added.commit.len();
            let welcome = joining.then(|| Envelope {
                recipients: vec![joiner.public_key()],
                payload: added.welcome.clone(),
                message_id: None,
            });
            // Every Commit that adds members carries the key of the epoch it
            // starts (protocol 8), under which the node seals the tree it
            // keeps for them.
            let epoch_key = group.pending_epoch_key(&provider).unwrap();
            let outcome = client
                .publish_commit(&CommitToSend {
                    group_id: &group_id,
                    epoch,
                    commit: &Envelope {
                        recipients: members,
                        payload: added.commit,
                        message_id: None,
                    },
                    welcome: welcome.as_ref(),
                    initial_state: state.as_ref(),
                    group_info: group.pending_group_info(),
                    epoch_key: Some(&epoch_key),
                    state_key: &state_key,
                    new_state_key: None,
                })
                .await
                .unwrap();
            assert_eq!(
                outcome,
                ChangeOutcome::Accepted,
                "Commit of {commit_len} B at epoch {epoch}"
            );
            group.merge_pending_commit(&provider).unwrap();
            commits += 1;
            if joining {
                break added.welcome;
            }
        };
        eprintln!(
            "built a group of {} members in {:.1} s ({commits} Commits)",
            group.members().len(),
            started.elapsed().as_secs_f64(),
        );
        let joiner_client = NodeClient::connect(&options, Some(&joiner)).await.unwrap();
        let queued = joiner_client
            .fetch_since(&joiner.public_key(), Seq::ZERO, 0)
            .await
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].payload, last_welcome);
        let FetchedWelcomeTree::Tree { tree, .. } = joiner_client
            .fetch_welcome_tree(&group_id, group.epoch(), &group.epoch_key(&provider).unwrap())
            .await
            .unwrap()
        else {
            panic!("the node keeps the tree");
        };
        (queued[0].payload.clone(), tree)
    });

    let started = Instant::now();
    cli(&["join", "--state", &state_arg]);
    let join = started.elapsed();
    let joined = StateFile::open(&StateAccess::with_passphrase(&state, PASSPHRASE)).unwrap();
    let group = GroupMember::load(&joined.provider(), &GroupId::new(b"big".to_vec()).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(group.members().len(), size);
    println!("| members | Welcome | tree fetched from the node | `join` (CLI, wall) | node payload limit |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {size} | {} B | {} B | {:.2} s | {} B (default) |",
        welcome.len(),
        tree.len(),
        join.as_secs_f64(),
        quicnprotochat_server::config::DEFAULT_MAX_PAYLOAD
    );
    node.stop();
}
