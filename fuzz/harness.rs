//! What each fuzz target feeds its input to. Shared with the regression test
//! (`crates/quicnprotochat-client/tests/fuzz_regressions.rs`), which replays
//! every file under `fuzz/regressions/<target>/` through the same function on
//! every `cargo test`.
//!
//! Each function must neither panic nor hang on any input; where it can, it
//! also checks that nothing was corrupted.

#![allow(dead_code)] // each target uses one function

use std::cell::RefCell;
use std::net::IpAddr;
use std::time::Duration;

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    GroupMember, IdentityKey, IdentityKeypair, Received, classify, generate_key_package,
};
use quicnprotochat_proto::memory::{AnswerBounds, MemoryBudget, Pool};
use quicnprotochat_server::api::Shared;
use quicnprotochat_server::limits::RateLimits;
use quicnprotochat_server::service::{NodeServiceImpl, Session};
use quicnprotochat_server::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// KeyPackage validation (what the node runs on every upload, bare or
/// wrapped in an MLSMessage, of either ciphersuite) and routing. A
/// KeyPackage the node takes must be stored as exactly the bare bytes, under
/// the ciphersuite it has.
pub fn key_package(data: &[u8]) {
    let bare = quicnprotochat_core::unwrap_key_package(data);
    if let Ok(info) = quicnprotochat_core::inspect_key_package(bare) {
        // Any lifetime: the seeds (`regressions/key_package/seed-*`) are
        // made valid for a century, so that they keep reaching every check.
        let policy = quicnprotochat_proto::wire::KeyPackagePolicy {
            max_lifetime_secs: u64::MAX,
            ..Default::default()
        };
        if let Ok(taken) =
            quicnprotochat_proto::wire::key_package("package", data, data.len(), &info.identity, &policy)
        {
            assert_eq!(taken.bytes, bare, "stored bare, as received");
            assert_eq!(taken.suite, info.suite, "stored under its own suite");
            assert_eq!(taken.last_resort, info.last_resort);
        }
    }
    let _ = classify(data);
}

/// Two members of one group, kept across inputs.
struct Pair {
    alice: IdentityKeypair,
    alice_provider: OpenMlsRustCrypto,
    alice_group: GroupMember,
    bob_provider: OpenMlsRustCrypto,
    bob_group: GroupMember,
}

impl Pair {
    fn new() -> Pair {
        let alice = IdentityKeypair::generate();
        let bob = IdentityKeypair::generate();
        let alice_provider = OpenMlsRustCrypto::default();
        let bob_provider = OpenMlsRustCrypto::default();
        let mut alice_group = GroupMember::create(
            &alice_provider,
            &alice,
            &quicnprotochat_core::GroupId::new(b"fuzz".to_vec()).expect("a group id"),
        )
        .expect("create");
        let package = generate_key_package(&bob_provider, &bob).expect("key package");
        let added = alice_group
            .add_members(
                &alice_provider,
                &alice,
                &[package],
                &quicnprotochat_core::NoDeviceLists,
            )
            .expect("add");
        alice_group.merge_pending_commit(&alice_provider).expect("merge");
        let tree = alice_group.ratchet_tree().expect("tree");
        let bob_group = GroupMember::join(
            &bob_provider,
            &added.welcome,
            Some(&tree),
            &quicnprotochat_core::NoDeviceLists,
        )
        .expect("join");
        Pair {
            alice,
            alice_provider,
            alice_group,
            bob_provider,
            bob_group,
        }
    }
}

thread_local! {
    static PAIR: RefCell<Option<Pair>> = const { RefCell::new(None) };
}

/// A client processing a queued payload: routing, receiving into a group,
/// joining from it. Afterwards the group must still work.
pub fn incoming_payload(data: &[u8]) {
    let _ = classify(data);
    PAIR.with(|pair| {
        let mut pair = pair.borrow_mut();
        let pair = pair.get_or_insert_with(Pair::new);
        let _ = pair
            .bob_group
            .receive(&pair.bob_provider, data, &quicnprotochat_core::NoDeviceLists);
        let _ = GroupMember::join(
            &pair.bob_provider,
            data,
            None,
            &quicnprotochat_core::NoDeviceLists,
        );
        let _ = GroupMember::join(
            &pair.bob_provider,
            data,
            Some(data),
            &quicnprotochat_core::NoDeviceLists,
        );
        let message = pair
            .alice_group
            .send(&pair.alice_provider, &pair.alice, b"still fine")
            .expect("alice can still send");
        match pair
            .bob_group
            .receive(&pair.bob_provider, &message, &quicnprotochat_core::NoDeviceLists)
        {
            Ok(Received::Application { plaintext, .. }) => assert_eq!(plaintext, b"still fine"),
            other => panic!("the group was corrupted by an input: {other:?}"),
        }
    });
}

/// Opening a state file: refused files are left untouched. Inputs that
/// are plain SQLite files test the checks of an unencrypted file; the rest
/// reach the encrypted path, with a passphrase that fails them.
pub fn state_file(data: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fuzzed.state");
    std::fs::write(&path, data).expect("write input");
    let access = quicnprotochat_client::state::StateAccess::with_passphrase(&path, "fuzz");
    match quicnprotochat_client::state::StateFile::open(&access) {
        Ok(state) => {
            let _ = state.identity();
            let _ = state.groups();
            let _ = state.inbox();
        }
        Err(_) => assert_eq!(
            std::fs::read(&path).expect("read back"),
            data,
            "a refused state file is left untouched"
        ),
    }
}

/// A node, kept across inputs.
struct TestNode {
    runtime: tokio::runtime::Runtime,
    store: Store,
    _dir: tempfile::TempDir,
}

thread_local! {
    static NODE: TestNode = {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, _closer) = Store::open(&dir.path().join("node.db")).expect("store");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        TestNode { runtime, store, _dir: dir }
    };
}

/// Raw bytes into a node's RPC session (as a connection's stream would
/// deliver them), anonymous or, when the first byte is odd, authenticated.
/// The session must end by itself once the input ends.
pub fn rpc_session(data: &[u8]) {
    NODE.with(|node| {
        let local = tokio::task::LocalSet::new();
        local.block_on(&node.runtime, async {
            let peer =
                (data.first().copied().unwrap_or(0) % 2 == 1).then(|| IdentityKey::from_bytes([7; 32]));
            let shared = Shared::new(
                node.store.clone(),
                64 * 1024,
                RateLimits::new(0, 0, 0, 0, 0, 0, 0),
                quicnprotochat_proto::wire::KeyPackagePolicy::default(),
            );
            // The node's accounting, with small pools so inputs reach their limits.
            let options = quicnprotochat_proto::rpc::reader_options(64 * 1024);
            let bounds = AnswerBounds::new(64 * 1024, 256 * 1024);
            let budget = MemoryBudget {
                calls: Pool::new(1 << 20),
                pushes: Pool::new(1 << 20),
                peer_calls: 1 << 20,
                peer_pushes: 2 * bounds.messages,
                floor: 64 * 1024,
            };
            let memory = budget.peer();
            let session = Session {
                pushes: memory.pushes.clone(),
                close: Box::new(|| {}),
                stall_timeout: Duration::from_secs(1),
                push_bound: bounds.messages,
            };
            let service = capnp_rpc::new_client(NodeServiceImpl::new(
                shared,
                peer,
                IpAddr::from([127, 0, 0, 1]),
                session,
            ));
            let (client, server) = tokio::io::duplex(1 << 16);
            let (read, write) = tokio::io::split(server);
            let session = quicnprotochat_proto::rpc::serve_stream(
                read.compat(),
                write.compat_write(),
                service,
                options,
                Some((memory.calls.clone(), bounds)),
            );
            let session = tokio::task::spawn_local(session);
            let (mut answers, mut input) = tokio::io::split(client);
            let feed = async {
                let _ = input.write_all(data).await;
                let _ = input.shutdown().await;
                let mut buffer = vec![0u8; 4096];
                while matches!(answers.read(&mut buffer).await, Ok(n) if n > 0) {}
            };
            let ended = tokio::time::timeout(Duration::from_secs(5), async {
                feed.await;
                let _ = session.await;
            })
            .await;
            assert!(ended.is_ok(), "the RPC session did not end after its input did");
        });
    });
}
