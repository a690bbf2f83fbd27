//! Several nodes in `--server` / QUICNPROTOCHAT_SERVER: the client connects
//! to the first that answers, in order, reports every node when none does,
//! never skips one that answered, and `recv --follow` carries on through the
//! list when its node goes away.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Follower, Member, TestNode, group_of, stderr};
use quicnprotochat_server::Config;
use quicnprotochat_server::config::Database;

/// A UDP port that is bound but never answers, as a node that is down (or
/// unreachable) looks to a client: the handshake times out. Holding the
/// socket keeps the port from being given to a node of another test.
struct DeadNode {
    _socket: UdpSocket,
    addr: String,
}

impl DeadNode {
    fn new() -> DeadNode {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap().to_string();
        DeadNode {
            _socket: socket,
            addr,
        }
    }
}

/// The address of a port nothing listens on (bound, noted, closed).
fn closed_port() -> String {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// The client binary with `--ca-cert` and no node settings from the
/// environment of the test run.
fn client(ca_cert: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"));
    command
        .env_remove("QUICNPROTOCHAT_SERVER")
        .env_remove("QUICNPROTOCHAT_DS_SERVER")
        .env_remove("QUICNPROTOCHAT_STATE")
        .env("QUICNPROTOCHAT_STATE_PASSPHRASE", common::PASSPHRASE)
        .arg("--ca-cert")
        .arg(ca_cert);
    command
}

fn succeeded(output: Output) -> (String, String) {
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr(&output),
    );
    assert!(output.status.success(), "client failed: {err}\n{out}");
    (out, err)
}

#[test]
fn commands_work_through_the_live_node_when_the_first_one_is_dead() {
    let node = TestNode::start();
    let dead = DeadNode::new();
    let list = format!("{},{}", dead.addr, node.addr);

    let started = std::time::Instant::now();
    let (out, err) = succeeded(
        client(&node.cert())
            .args(["--server", &list, "ping"])
            .output()
            .unwrap(),
    );
    // The live node is tried while the silent one is still waited for, so
    // the command does not sit out the silent one's whole handshake timeout.
    assert!(
        started.elapsed() < quicnprotochat_client::node_client::CONNECT_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    assert!(out.starts_with(&format!("pong from {} ", node.addr)), "{out}");
    assert!(
        err.contains("skipped a node") && err.contains(&dead.addr),
        "{err}"
    );

    // A stateful exchange, with the dead node first for the steps that
    // matter: send and recv.
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "detour", &alice, &[&bob]);
    succeeded(
        client(&node.cert())
            .args(["--server", &list, "send", "--state", &alice.state])
            .args(["--msg", "through the second node"])
            .output()
            .unwrap(),
    );
    let (out, _) = succeeded(
        client(&node.cert())
            .args(["--server", &dead.addr, "--server", &node.addr.to_string()])
            .args(["recv", "--state", &bob.state])
            .output()
            .unwrap(),
    );
    assert_eq!(
        out,
        format!("detour {}: through the second node\n", alice.short())
    );
}

#[test]
fn the_environment_variable_takes_a_comma_separated_list() {
    let node = TestNode::start();
    let dead = DeadNode::new();
    // Blanks around the entries are allowed.
    let list = format!("{} , {}", dead.addr, node.addr);
    let (out, err) = succeeded(
        client(&node.cert())
            .env("QUICNPROTOCHAT_SERVER", &list)
            .arg("ping")
            .output()
            .unwrap(),
    );
    assert!(out.starts_with(&format!("pong from {} ", node.addr)), "{out}");
    assert!(err.contains(&dead.addr), "{err}");
}

#[test]
fn when_every_node_fails_the_error_names_each_with_why() {
    let node = TestNode::start();
    let dead = DeadNode::new();
    let closed = closed_port();
    let started = Instant::now();
    let output = client(&node.cert())
        .args(["--server", &format!("{closed},{}", dead.addr), "ping"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    // One handshake timeout per node, nothing more.
    assert!(started.elapsed() < Duration::from_secs(25));
    let err = stderr(&output);
    assert!(
        err.contains("could not connect to any of the 2 nodes given"),
        "{err}"
    );
    let closed_at = err.find(&closed).expect("names the first node");
    let dead_at = err.find(&dead.addr).expect("names the second node");
    assert!(closed_at < dead_at, "in the order tried: {err}");
    assert!(err.contains("is quicnprotochat-server running"), "{err}");
}

#[test]
fn a_node_failing_the_tls_handshake_is_skipped_for_the_next() {
    let trusted = TestNode::start();
    let other = TestNode::start();
    let (out, err) = succeeded(
        client(&trusted.cert())
            .args(["--server", &format!("{},{}", other.addr, trusted.addr), "ping"])
            .output()
            .unwrap(),
    );
    assert!(out.starts_with(&format!("pong from {} ", trusted.addr)), "{out}");
    assert!(
        err.contains(&format!("the node at {} is not trusted", other.addr)),
        "{err}"
    );
}

/// Two nodes started together in one directory, as several stateless nodes
/// would be: they share one certificate (so one --ca-cert trusts both), but
/// here each keeps its own SQLite database, so that which node answered
/// shows.
fn two_nodes_sharing_a_certificate(dir: &Path) -> [TestNode; 2] {
    let start = |db: &str| {
        let mut config = Config::in_dir(dir, "127.0.0.1:0".parse().unwrap());
        config.db = Database::Sqlite(dir.join(db));
        let dir = dir.to_owned();
        move || TestNode::start_with(config, dir)
    };
    let (first, second) = (start("first.db"), start("second.db"));
    std::thread::scope(|scope| {
        let first = scope.spawn(first);
        let second = scope.spawn(second);
        [first.join().unwrap(), second.join().unwrap()]
    })
}

#[test]
fn a_node_that_answered_is_final_even_when_the_next_would_say_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let [first, second] = two_nodes_sharing_a_certificate(dir.path());
    let ca_cert = first.cert();
    assert_eq!(ca_cert, second.cert());
    let bob = Member::register(&second, dir.path(), "bob");

    // The first node answers that it has no KeyPackage of Bob's: that is the
    // answer, although the second node has one.
    let output = client(&ca_cert)
        .args(["--server", &format!("{},{}", first.addr, second.addr)])
        .args(["fetch-key", &bob.key])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("has no KeyPackage"), "{err}");
    assert!(!err.contains("skipped"), "{err}");

    // In the other order the second node answers first.
    let (out, _) = succeeded(
        client(&ca_cert)
            .args(["--server", &format!("{},{}", second.addr, first.addr)])
            .args(["fetch-key", &bob.key])
            .output()
            .unwrap(),
    );
    assert!(out.contains("signature valid"), "{out}");
}

#[cfg(unix)]
#[test]
fn a_follower_carries_on_through_the_list_when_its_node_goes_away() {
    let mut node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "relay", &alice, &[&bob]);
    let dead = DeadNode::new();
    let address = node.addr.to_string();

    let mut follow = client(&node.cert());
    follow
        .args(["--server", &format!("{address},{}", dead.addr)])
        .args(["recv", "--follow", "--state", &bob.state]);
    let mut follower = Follower::start(follow);
    follower.await_note("following", Duration::from_secs(20));
    alice.run(&node, "send", &["--msg", "before"]);
    assert_eq!(follower.next_line(), format!("relay {}: before", alice.short()));

    // The node goes away and comes back on the same port and database. The
    // follower tries the next node (dead, a handshake timeout) and then
    // this one again; what is sent meanwhile waits in the queue.
    node.restart();
    alice.run(&node, "send", &["--msg", "while away"]);
    let notes = follower.await_note(&format!("following through {address}"), Duration::from_secs(60));
    assert!(
        notes
            .iter()
            .any(|note| note.contains(&format!("lost the node at {address}"))),
        "{notes:#?}"
    );
    alice.run(&node, "send", &["--msg", "after"]);
    assert_eq!(
        follower.next_line(),
        format!("relay {}: while away", alice.short())
    );
    assert_eq!(follower.next_line(), format!("relay {}: after", alice.short()));

    let status = follower.interrupt();
    assert!(status.success(), "{status:?}");
    // Nothing was printed twice, and everything was acknowledged.
    let rest = follower.rest();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(bob.run(&node, "recv", &[]), "");
}
