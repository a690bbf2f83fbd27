//! Storage faults under the real node and the real CLI, on a real SQLite
//! file and a real PostgreSQL: a read the database fails is an answer whose
//! effect is "nothing yet" (`overloaded`) or unknown (`disconnected`), never
//! a refusal, so the client keeps what it needs and carries on once the
//! database is back.
//!
//! The fault is a real one: the table a call reads is renamed away under the
//! running node (by another connection to the same database), so its
//! statements fail as they would on a damaged or missing table, then renamed
//! back. Without PostgreSQL the PostgreSQL cases say so and pass, unless
//! `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{Member, TestNode};
use quicnprotochat_server::Config;
use quicnprotochat_server::config::Database;
use quicnprotochat_testpg::TestPostgres;

/// The node's database, reached from outside the node.
enum Outside {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Outside {
    fn execute(&self, statement: &str) {
        match self {
            Outside::Sqlite(path) => {
                let connection = rusqlite::Connection::open(path).unwrap();
                connection
                    .busy_timeout(std::time::Duration::from_secs(10))
                    .unwrap();
                connection.execute_batch(statement).unwrap();
            }
            Outside::Postgres(url) => {
                let (url, statement) = (url.clone(), statement.to_owned());
                // The postgres client runs a runtime of its own: not inside
                // a test's.
                std::thread::spawn(move || {
                    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                    client.batch_execute(&statement).unwrap();
                })
                .join()
                .unwrap();
            }
        }
    }

    /// Renames `table` away, so that the node's statements on it fail.
    fn break_table(&self, table: &str) {
        self.execute(&format!("ALTER TABLE {table} RENAME TO {table}_away"));
    }

    fn mend_table(&self, table: &str) {
        self.execute(&format!("ALTER TABLE {table}_away RENAME TO {table}"));
    }
}

fn sqlite_node(dir: &Path) -> (TestNode, Outside) {
    let config = Config::in_dir(dir, SocketAddr::from(([127, 0, 0, 1], 0)));
    let Database::Sqlite(path) = config.db.clone() else {
        unreachable!("in_dir makes a SQLite node")
    };
    (
        TestNode::start_with(config, dir.to_owned()),
        Outside::Sqlite(path),
    )
}

fn postgres_node(dir: &Path) -> Option<(TestNode, Outside)> {
    let url = TestPostgres::shared()?.create_database();
    let mut config = Config::in_dir(dir, SocketAddr::from(([127, 0, 0, 1], 0)));
    config.db = Database::Postgres(url.clone());
    Some((
        TestNode::start_with(config, dir.to_owned()),
        Outside::Postgres(url),
    ))
}

/// Bob is invited; the node cannot read the Welcome's tree when he first
/// tries to join. He keeps the Welcome, is told to try again (not to ask for
/// a new invitation), and joins once the table is back.
fn a_failed_welcome_tree_read_keeps_the_welcome(node: &TestNode, db: &Outside, dir: &Path) {
    let alice = Member::register(node, dir, "alice");
    let bob = Member::register(node, dir, "bob");
    alice.run(node, "create-group", &["--group-id", "blip"]);
    alice.run(node, "invite", &["--peer-key", &bob.key]);

    db.break_table("welcome_trees");
    let (ok, _, err) = bob.try_run(node, "join", &[]);
    assert!(!ok, "the tree cannot be read: {err}");
    assert!(
        !err.contains("invite you again"),
        "a passing failure is no refusal: {err}"
    );
    assert!(!err.contains("dropped"), "{err}");
    db.mend_table("welcome_trees");

    bob.run(node, "join", &[]);
    alice.run(node, "send", &["--msg", "after the blip"]);
    let out = bob.run(node, "recv", &[]);
    assert_eq!(out.trim(), format!("blip {}: after the blip", alice.short()));
}

/// The node cannot write the queue table when Alice sends: the send fails
/// without a refusal, and once the table is back her next send and Bob's
/// receive work, nothing delivered twice.
fn a_failed_queue_write_stores_nothing_and_the_next_send_goes_through(
    node: &TestNode,
    db: &Outside,
    dir: &Path,
) {
    let alice = Member::register(node, dir, "alice2");
    let bob = Member::register(node, dir, "bob2");
    alice.run(node, "create-group", &["--group-id", "writes"]);
    alice.run(node, "invite", &["--peer-key", &bob.key]);
    bob.run(node, "join", &[]);

    db.break_table("messages");
    let (ok, _, err) = alice.try_run(node, "send", &["--msg", "during"]);
    assert!(!ok, "the queue cannot be written: {err}");
    db.mend_table("messages");

    alice.run(node, "send", &["--msg", "after"]);
    let out = bob.run(node, "recv", &[]);
    assert_eq!(out.trim(), format!("writes {}: after", alice.short()), "{out}");
}

#[test]
fn sqlite_a_failed_welcome_tree_read_keeps_the_welcome() {
    let dir = tempfile::tempdir().unwrap();
    let (node, db) = sqlite_node(dir.path());
    a_failed_welcome_tree_read_keeps_the_welcome(&node, &db, dir.path());
}

#[test]
fn postgres_a_failed_welcome_tree_read_keeps_the_welcome() {
    let dir = tempfile::tempdir().unwrap();
    let Some((node, db)) = postgres_node(dir.path()) else {
        return;
    };
    a_failed_welcome_tree_read_keeps_the_welcome(&node, &db, dir.path());
}

#[test]
fn sqlite_a_failed_queue_write_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, db) = sqlite_node(dir.path());
    a_failed_queue_write_stores_nothing_and_the_next_send_goes_through(&node, &db, dir.path());
}

#[test]
fn postgres_a_failed_queue_write_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some((node, db)) = postgres_node(dir.path()) else {
        return;
    };
    a_failed_queue_write_stores_nothing_and_the_next_send_goes_through(&node, &db, dir.path());
}
