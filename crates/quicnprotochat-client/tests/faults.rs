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
use std::sync::atomic::{AtomicUsize, Ordering};

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
    Some((node_on_postgres(&url, dir), Outside::Postgres(url)))
}

/// A node on the PostgreSQL database at `url`, its files in `dir`.
fn node_on_postgres(url: &str, dir: &Path) -> TestNode {
    let mut config = Config::in_dir(dir, SocketAddr::from(([127, 0, 0, 1], 0)));
    config.db = Database::Postgres(url.to_owned());
    TestNode::start_with(config, dir.to_owned())
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
/// receive work, nothing delivered twice. Then it cannot read it when Bob
/// receives: nothing is lost, and his next receive gets it, once.
fn a_failed_queue_write_or_read_loses_nothing(node: &TestNode, db: &Outside, dir: &Path) {
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

    alice.run(node, "send", &["--msg", "waiting"]);
    db.break_table("messages");
    let (ok, out, err) = bob.try_run(node, "recv", &[]);
    assert!(!ok && out.is_empty(), "the queue cannot be read: {err}");
    db.mend_table("messages");
    let out = bob.run(node, "recv", &[]);
    assert_eq!(out.trim(), format!("writes {}: waiting", alice.short()), "{out}");
}

/// A failed read of the group's state (a rejoin's GroupInfo, a Commit's
/// check), and of the KeyPackage directory (an invite), is no refusal
/// either: nothing is dropped, the change stays pending and goes through
/// once the table is back.
fn failed_group_and_key_package_reads_cost_nothing(node: &TestNode, db: &Outside, dir: &Path) {
    let alice = Member::register(node, dir, "alice3");
    let bob = Member::register(node, dir, "bob3");
    let carol = Member::register(node, dir, "carol3");
    common::group_of(node, "paths", &alice, &[&bob]);

    db.break_table("group_views");
    // A rejoin cannot read the GroupInfo: not told it may not rejoin.
    let (ok, _, err) = bob.try_run(node, "rejoin", &["--group-id", "paths"]);
    assert!(!ok, "{err}");
    assert!(!err.contains("refused to let you rejoin"), "{err}");
    // A Commit cannot be checked: it stays pending, not dropped.
    let (ok, _, err) = alice.try_run(node, "update", &[]);
    assert!(!ok, "{err}");
    assert!(err.contains("stays pending"), "{err}");
    db.mend_table("group_views");
    let (ok, _, err) = alice.try_run(node, "recv", &[]);
    assert!(ok && err.contains("the node has it; now epoch 2"), "{err}");

    db.break_table("key_packages");
    let (ok, _, err) = alice.try_run(node, "invite", &["--peer-key", &carol.key]);
    assert!(!ok, "{err}");
    assert!(!err.contains("no KeyPackage"), "not told Carol has none: {err}");
    db.mend_table("key_packages");
    alice.run(node, "invite", &["--peer-key", &carol.key]);
    carol.run(node, "join", &[]);
    bob.run(node, "recv", &[]);
    alice.run(node, "send", &["--msg", "all three"]);
    for member in [&bob, &carol] {
        let out = member.run(node, "recv", &[]);
        assert_eq!(out.trim(), format!("paths {}: all three", alice.short()));
    }
}

/// One test per backend for each check taking the node, the database as
/// reached from outside, and the directory for state files.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let (node, db) = super::sqlite_node(dir.path());
                    super::$check(&node, &db, dir.path());
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let Some((node, db)) = super::postgres_node(dir.path()) else { return };
                    super::$check(&node, &db, dir.path());
                }
            )*
        }
    };
}

on_both_backends!(
    a_failed_welcome_tree_read_keeps_the_welcome,
    a_failed_queue_write_or_read_loses_nothing,
    failed_group_and_key_package_reads_cost_nothing,
);

/// PostgreSQL restarts while the node sits idle: every connection the node
/// held died with it, unnoticed. The first calls after (a send, then a
/// receive) are answered all the same, none refused or left in doubt.
#[test]
fn postgres_restarted_while_the_node_idles_answers_the_first_calls() {
    let Some(postgres) = TestPostgres::start_own() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = node_on_postgres(&postgres.create_database(), dir.path());
    let alice = Member::register(&node, dir.path(), "alice");
    let bob = Member::register(&node, dir.path(), "bob");
    common::group_of(&node, "restart", &alice, &[&bob]);

    postgres.stop_server();
    postgres.start_server();
    // Idle past the probe's threshold, as a node between calls would be.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    alice.run(&node, "send", &["--msg", "after the restart"]);
    let out = bob.run(&node, "recv", &[]);
    assert_eq!(
        out.trim(),
        format!("restart {}: after the restart", alice.short())
    );
}

/// Runs `command` as a script would right after an outage: a call that
/// meets a database connection the crash left dead is answered
/// `disconnected` (exit 3), and docs/cli.md ("Scripting") says to retry those.
/// Returns what every attempt printed.
fn run_retrying(node: &TestNode, member: &Member, command: &str, args: &[&str]) -> String {
    let mut printed = String::new();
    for _ in 0..5 {
        let (ok, out, err) = member.try_run(node, command, args);
        printed.push_str(&out);
        if ok {
            return printed;
        }
        eprintln!(
            "{command}: {}; trying again",
            err.lines().last().unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    printed + &member.run(node, command, args)
}

/// The epoch `member`'s `groups` shows for `group`.
fn epoch_of(node: &TestNode, member: &Member, group: &str) -> Option<u64> {
    let listed = member.run(node, "groups", &[]);
    let line = listed
        .lines()
        .find(|line| line.split_whitespace().any(|word| word == group))?;
    let mut words = line.split_whitespace().skip_while(|word| *word != "epoch");
    words.nth(1)?.parse().ok()
}

/// A storm: Alice, Bob and Carol in a group; while `disrupt` runs on a
/// thread of its own (given the count of sends refused so far), Alice sends
/// a message each round (18 rounds at least, and on until `disrupt` is
/// over, so that every fault it makes meets members at work), Bob and
/// Carol update, Alice invites Dave, and Bob receives after each round;
/// each message is padded
/// with `pad` bytes. `tend` runs before
/// every command (it may restart a node that stopped). Afterwards every
/// message whose send was acknowledged is delivered exactly once, nothing
/// twice, Dave joins, and every member is at one epoch. Returns how many
/// sends the node refused.
fn storm(
    node: &mut TestNode,
    dir: &Path,
    pad: usize,
    disrupt: impl FnOnce(&AtomicUsize) + Send,
    mut tend: impl FnMut(&mut TestNode),
) -> usize {
    let [alice, bob, carol, dave] =
        ["alice", "bob", "carol", "dave"].map(|name| Member::register(node, dir, name));
    common::group_of(node, "storm", &alice, &[&bob, &carol]);

    let mut acknowledged = Vec::new();
    let mut received: Vec<String> = Vec::new();
    let mut invite_taken = false;
    // What the clients said on stderr, shown when an assertion fails.
    let mut notes: Vec<String> = Vec::new();
    let refused = AtomicUsize::new(0);
    let disrupted = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            disrupt(&refused);
            disrupted.store(true, Ordering::SeqCst);
        });
        // Bounded, should a disruption take far longer than it plans to.
        for round in 0..300 {
            if round >= 18 && disrupted.load(Ordering::SeqCst) {
                break;
            }
            let text = format!("storm message {round} {}", "x".repeat(pad));
            tend(node);
            let (ok, _, err) = alice.try_run(node, "send", &["--msg", &text]);
            notes.extend(err.lines().map(|line| format!("alice ({text}): {line}")));
            if ok {
                acknowledged.push(text);
            } else {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            tend(node);
            match round % 6 {
                // Its catch-up prints what arrived, as `recv` does.
                1 => received.extend(bob.try_run(node, "update", &[]).1.lines().map(str::to_owned)),
                3 => drop(carol.try_run(node, "update", &[])),
                5 if !invite_taken => {
                    // Taken means answered, or left pending for the next
                    // command to send again: either way Dave must get in.
                    let (ok, _, err) = alice.try_run(node, "invite", &["--peer-key", &dave.key]);
                    invite_taken = ok || err.contains("stays pending");
                }
                _ => {}
            }
            tend(node);
            let (_, out, err) = bob.try_run(node, "recv", &[]);
            received.extend(out.lines().map(str::to_owned));
            notes.extend(err.lines().map(|line| format!("bob: {line}")));
        }
    });
    tend(node);
    if !invite_taken {
        // Every try met the fault before anything was staged.
        run_retrying(node, &alice, "invite", &["--peer-key", &dave.key]);
    }

    // The fault is over now: everyone settles what is pending.
    let mut epochs = Vec::new();
    for _ in 0..6 {
        for member in [&alice, &carol] {
            run_retrying(node, member, "recv", &[]);
        }
        let out = run_retrying(node, &bob, "recv", &[]);
        received.extend(out.lines().map(str::to_owned));
        epochs = [&alice, &bob, &carol]
            .iter()
            .map(|member| epoch_of(node, member, "storm"))
            .collect();
        if epochs.windows(2).all(|pair| pair[0] == pair[1]) {
            break;
        }
    }
    assert!(
        epochs.windows(2).all(|pair| pair[0] == pair[1]),
        "one epoch: {epochs:?}"
    );
    run_retrying(node, &dave, "join", &[]);
    run_retrying(node, &dave, "recv", &[]);
    assert_eq!(
        epoch_of(node, &dave, "storm"),
        epochs[0],
        "Dave joined the group as it is"
    );

    let prefix = format!("storm {}: ", alice.short());
    let texts: Vec<&str> = received
        .iter()
        .filter_map(|line| line.strip_prefix(&prefix))
        .collect();
    for text in &acknowledged {
        let copies = texts.iter().filter(|got| *got == text).count();
        assert_eq!(
            copies,
            1,
            "{text}: delivered {copies} times; received {texts:?}\n{}",
            notes.join("\n")
        );
    }
    let mut distinct = texts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), texts.len(), "nothing twice: {texts:?}");
    assert!(
        !acknowledged.is_empty(),
        "some sends went through between the faults"
    );
    let refused = refused.load(Ordering::SeqCst);
    eprintln!(
        "{} of {} sends acknowledged, {} messages delivered, final epoch {:?}",
        acknowledged.len(),
        acknowledged.len() + refused,
        texts.len(),
        epochs[0]
    );
    refused
}

/// PostgreSQL crashes (immediate shutdown: no checkpoint, calls in flight
/// unanswered) three times during a storm.
#[test]
fn postgres_crashing_while_members_send_update_and_invite_loses_nothing_acknowledged() {
    let Some(postgres) = TestPostgres::start_own() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut node = node_on_postgres(&postgres.create_database(), dir.path());
    let crashes = |_: &AtomicUsize| {
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            postgres.crash_server();
            std::thread::sleep(std::time::Duration::from_millis(400));
            postgres.start_server();
        }
    };
    storm(&mut node, dir.path(), 0, crashes, |_| {});
}

/// The disk under the node's SQLite file fails (EIO) three times during a
/// storm: every sync (writes land in the page cache, never on the disk),
/// then every read and write, then all of them. A failed read or write
/// stores nothing; a failed sync of the WAL stops the node (what the disk
/// holds is unknown; see the node's `store/sqlite/sync.rs`), which is started
/// again once the disk is back, as a supervisor would, and SQLite recovers
/// what the disk holds.
#[test]
fn sqlite_disk_failing_while_members_send_update_and_invite_loses_nothing_acknowledged() {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let config = Config::in_dir(&node_dir, SocketAddr::from(([127, 0, 0, 1], 0)));
    let Database::Sqlite(db) = config.db.clone() else {
        unreachable!("in_dir makes a SQLite node")
    };
    let mut node = TestNode::start_with(config, node_dir);
    let Some(failing) = FailingDisk::check() else {
        return;
    };
    let db = std::fs::canonicalize(db).unwrap();
    // The disk is failing now; the node stopped (seen between commands).
    let (failing_now, stopped) = (AtomicBool::new(false), AtomicBool::new(false));
    let failures = |_: &AtomicUsize| {
        for calls in [
            "fsync,fdatasync",
            "pread64,pwrite64",
            "pread64,pwrite64,fsync,fdatasync",
        ] {
            std::thread::sleep(Duration::from_millis(1500));
            failing_now.store(true, Ordering::SeqCst);
            let eio = failing.fail(&db, calls);
            // A failing sync lasts until the node stopped on it (the
            // members keep writing meanwhile), or for 5 s.
            let until =
                Instant::now() + Duration::from_millis(if calls.contains("sync") { 5000 } else { 400 });
            while Instant::now() < until && !(calls.contains("sync") && stopped.load(Ordering::SeqCst)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(eio);
            failing_now.store(false, Ordering::SeqCst);
        }
    };
    let mut restarts = 0;
    let tend = |node: &mut TestNode| {
        if let Some(ran) = node.stopped_by_itself() {
            let error = ran.expect_err("a node stops by itself only on an error");
            assert!(error.contains("disk failed a sync"), "{error}");
            stopped.store(true, Ordering::SeqCst);
            // Started again once the disk works.
            while failing_now.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            stopped.store(false, Ordering::SeqCst);
            restarts += 1;
            node.restart();
        }
    };
    let refused = storm(&mut node, dir.path(), 0, failures, tend);
    eprintln!(
        "the node stopped on a failed sync and was started again {restarts} times; {refused} sends refused"
    );
    // The failing disk was met: the node stopped on a failed sync of its
    // own, or (when SQLite met the failing sync first, inside a write) it
    // refused what it could not store. Which one a run sees depends on
    // timing; either way nothing acknowledged was lost (checked by storm).
    assert!(
        restarts > 0 || refused > 0,
        "the failing disk was met: the node stopped or refused"
    );
}

/// Makes every read, write and sync of a file fail with EIO, by tracing
/// this process with strace's fault injection: the node's real SQLite
/// meets real I/O errors from the system calls it makes.
struct FailingDisk;

impl FailingDisk {
    /// `None` (saying why) where strace cannot trace this process.
    fn check() -> Option<FailingDisk> {
        let works = std::process::Command::new("strace")
            .args(["-qq", "-o", "/dev/null", "true"])
            .status()
            .is_ok_and(|status| status.success());
        if !works {
            assert!(
                std::env::var_os("QUICNPROTOCHAT_REQUIRE_STRACE").is_none(),
                "QUICNPROTOCHAT_REQUIRE_STRACE is set but strace cannot run here"
            );
            eprintln!("skipped: strace is missing or cannot trace here");
            return None;
        }
        Some(FailingDisk)
    }

    /// Fails `calls` (system calls, comma-separated) on `db` and its WAL
    /// until the returned guard drops.
    fn fail(&self, db: &Path, calls: &str) -> FailingIo {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let mut tracer = std::process::Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-p"])
            .arg(std::process::id().to_string())
            .arg("-P")
            .arg(db)
            .arg("-P")
            .arg(&wal)
            .args(["-e", &format!("trace={calls}")])
            .args(["-e", &format!("inject={calls}:error=EIO")])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // strace attaches to every thread before it says anything; give it
        // the moment that takes.
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert!(tracer.try_wait().unwrap().is_none(), "strace stopped at once");
        FailingIo(tracer)
    }
}

/// Stops strace, which leaves the node's I/O alone.
struct FailingIo(std::process::Child);

impl Drop for FailingIo {
    /// SIGKILL, not SIGINT: on SIGINT strace detaches thread by thread and
    /// waits for each to stop, and a thread of this process inside a
    /// `vfork` (every `Command::spawn`: the members' CLI runs, a `kill`)
    /// never stops while its child, traced too, waits for strace: both hang
    /// for good. A killed tracer's tracees are detached by the kernel at
    /// once. (Nor is `kill` spawned for it: that was such a spawn.)
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A small file system of its own (tmpfs) for the node's data, so that a
/// test can fill it; unmounted on drop. Mounting needs root (CI runs as
/// root): elsewhere the test says so and passes.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: std::path::PathBuf, megabytes: u32) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .output()
            .is_ok_and(|output| output.status.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { path })
    }

    /// Fills the disk with a file of its own until the file system says
    /// it is full; returns the file.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a; 64 * 1024];
        while file.write_all(&chunk).and_then(|()| file.sync_data()).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the node may still hold its files while it stops.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// The node's SQLite file on a disk that fills up: a send that needs room
/// fails without being acknowledged and stores nothing, and once space is
/// free again the node carries on by itself: the next send is delivered,
/// once, and the failed one never.
#[test]
fn sqlite_on_a_full_disk_stores_nothing_and_carries_on_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path().join("disk"), 24) else {
        return;
    };
    let node = TestNode::start_with(
        Config::in_dir(&disk.path, SocketAddr::from(([127, 0, 0, 1], 0))),
        disk.path.clone(),
    );
    let alice = Member::register(&node, dir.path(), "alice");
    let bob = Member::register(&node, dir.path(), "bob");
    common::group_of(&node, "full", &alice, &[&bob]);

    let filler = disk.fill();
    // Sends big enough that the write-ahead log must grow, until one finds
    // no room (a few may still fit in pages SQLite holds already).
    let mut acknowledged = Vec::new();
    let mut refused = false;
    for n in 0..40 {
        let text = format!("{n} {}", "x".repeat(100 * 1024));
        let (ok, _, err) = alice.try_run(&node, "send", &["--msg", &text]);
        if ok {
            acknowledged.push(text);
        } else {
            eprintln!(
                "send {n} on the full disk: {}",
                err.lines().last().unwrap_or_default()
            );
            refused = true;
            break;
        }
    }
    assert!(refused, "a full disk took 40 sends of 100 KiB");
    std::fs::remove_file(filler).unwrap();

    alice.run(&node, "send", &["--msg", "room again"]);
    let out = bob.run(&node, "recv", &[]);
    let prefix = format!("full {}: ", alice.short());
    let received: Vec<&str> = out
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .collect();
    let mut expected: Vec<&str> = acknowledged.iter().map(String::as_str).collect();
    expected.push("room again");
    assert_eq!(
        received, expected,
        "every acknowledged message once, the refused one never"
    );
    drop(node);
}

/// The disk under the node's SQLite file fills up three times during a
/// storm: what finds no room stores nothing, and the node carries on by
/// itself once there is room again.
#[test]
fn sqlite_disk_filling_up_while_members_send_update_and_invite_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path().join("disk"), 24) else {
        return;
    };
    let mut node = TestNode::start_with(
        Config::in_dir(&disk.path, SocketAddr::from(([127, 0, 0, 1], 0))),
        disk.path.clone(),
    );
    // Full until a send finds no room (or for 5 s): the node needs room
    // only where its files must grow, and reuses what it freed.
    let fill_ups = |refused: &AtomicUsize| {
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            let before = refused.load(Ordering::SeqCst);
            let filler = disk.fill();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < until && refused.load(Ordering::SeqCst) == before {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            std::fs::remove_file(filler).unwrap();
        }
    };
    // Messages big enough that the WAL and the database file must grow.
    let refused = storm(&mut node, dir.path(), 100 * 1024, fill_ups, |_| {});
    assert!(refused > 0, "the full disk refused some sends");
}
