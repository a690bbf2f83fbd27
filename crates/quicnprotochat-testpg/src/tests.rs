//! Tests against real clusters (skipped, with the one-line notice, when
//! PostgreSQL is missing; failing under `QUICNPROTOCHAT_REQUIRE_POSTGRES=1`),
//! plus the pure helpers: binary discovery, URL handling, the skip line.

use std::net::TcpStream;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::*;

/// Runs `sql` on `url` and returns its output, failing the test on error.
fn psql(pg: &TestPostgres, url: &str, sql: &str) -> String {
    run_psql(pg.psql(), url, sql).unwrap_or_else(|error| panic!("psql {url} -c {sql:?}: {error}"))
}

/// Whether something accepts TCP connections on the port.
fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn shared_cluster_gives_fresh_separate_databases() {
    let Some(pg) = TestPostgres::shared() else { return };
    let first = pg.create_database();
    let second = pg.create_database();
    assert_ne!(first, second);
    assert_eq!(psql(pg, &first, "SELECT 1"), "1");
    assert_eq!(
        psql(pg, &first, "SELECT current_database()"),
        database_of(&first).unwrap()
    );

    psql(pg, &first, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
    assert_eq!(psql(pg, &first, "SELECT x FROM t"), "7");
    assert_eq!(
        psql(
            pg,
            &second,
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'"
        ),
        "0"
    );

    assert_eq!(psql(pg, &pg.admin_url(), "SELECT current_database()"), "postgres");
    assert_eq!(pg.port(), port_of(&first));
    if let Some(socket) = pg.socket_url(&first) {
        assert!(socket.contains("?host=/"), "{socket}");
        assert_eq!(psql(pg, &socket, "SELECT x FROM t"), "7");
    }
}

#[test]
fn shared_is_one_cluster_per_process() {
    let (Some(a), Some(b)) = (TestPostgres::shared(), TestPostgres::shared()) else {
        return;
    };
    assert!(std::ptr::eq(a, b));
}

#[test]
fn own_cluster_survives_stop_and_start_and_vanishes_on_drop() {
    let Some(pg) = TestPostgres::start_own() else {
        return;
    };
    let port = pg.port();
    let url = pg.create_database();
    psql(&pg, &url, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)");

    pg.stop_server();
    assert!(!listening(port), "server still listening after stop_server");
    assert!(run_psql(pg.psql(), &url, "SELECT 1").is_err());

    pg.start_server();
    assert_eq!(pg.port(), port);
    assert_eq!(psql(&pg, &url, "SELECT x FROM t"), "42");
    let socket = pg.socket_url(&url).expect("a cluster we started has a socket");
    assert_eq!(psql(&pg, &socket, "SELECT x FROM t"), "42");

    let Kind::Started(cluster) = &pg.kind else {
        panic!("start_own gave an external server")
    };
    let base = cluster.base.path().to_path_buf();
    assert!(base.join("data/postmaster.pid").exists());
    drop(pg);
    assert!(!base.exists(), "{} left behind", base.display());
    assert!(!listening(port), "server still listening after drop");
}

#[test]
fn dropping_a_stopped_own_cluster_cleans_up() {
    let Some(pg) = TestPostgres::start_own() else {
        return;
    };
    let Kind::Started(cluster) = &pg.kind else {
        panic!("start_own gave an external server")
    };
    let base = cluster.base.path().to_path_buf();
    pg.stop_server();
    drop(pg);
    assert!(!base.exists(), "{} left behind", base.display());
}

#[test]
fn two_own_clusters_are_independent() {
    let (Some(a), Some(b)) = (TestPostgres::start_own(), TestPostgres::start_own()) else {
        return;
    };
    assert_ne!(a.port(), b.port());
    let url = a.create_database();
    b.stop_server();
    assert_eq!(psql(&a, &url, "SELECT 1"), "1");
}

#[test]
fn an_external_server_is_used_as_given() {
    let Some(server) = TestPostgres::start_own() else {
        return;
    };
    let url = server.admin_url();
    // What `shared()` opens when QUICNPROTOCHAT_TEST_POSTGRES names a server.
    let pg = TestPostgres::external(url.clone()).expect("the server answers");
    assert_eq!(pg.admin_url(), url);
    assert_eq!(pg.port(), port_of(&url));
    assert!(matches!(pg.kind, Kind::External { .. }));
    assert_eq!(pg.socket_url(&url), None);
    let database = pg.create_database();
    let name = format!("qnpc_test_{}_", std::process::id());
    assert!(database.contains(&name), "{database}");
    assert_eq!(
        psql(&pg, &database, "SELECT current_database()"),
        database_of(&database).unwrap()
    );
    // The database landed on the server we named.
    let created = psql(
        &server,
        &server.admin_url(),
        &format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            database_of(&database).unwrap()
        ),
    );
    assert_eq!(created, "1");
    // A server of someone else's is never stopped or started.
    assert!(catch_unwind(AssertUnwindSafe(|| pg.stop_server())).is_err());
    assert!(catch_unwind(AssertUnwindSafe(|| pg.start_server())).is_err());
}

#[test]
fn an_unreachable_external_server_fails_loudly() {
    let opened = catch_unwind(|| TestPostgres::external("postgres://postgres@127.0.0.1:1/postgres".into()));
    match opened {
        // Whoever named a server wants the suite to run on it: a panic,
        // not a quiet skip.
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                .unwrap_or_default();
            assert!(message.contains("cannot be reached"), "{message}");
        }
        // Without a psql client there is nothing to reach it with.
        Ok(Err(why)) => assert!(why.contains("no psql"), "{why}"),
        Ok(Ok(_)) => panic!("a server on port 1 was taken as reachable"),
    }
}

#[test]
fn skip_line_names_the_reason_and_the_remedies() {
    assert_eq!(
        skip_line("no initdb on PATH"),
        "PostgreSQL suite skipped: no initdb on PATH; install PostgreSQL server binaries (initdb, pg_ctl) \
         or set QUICNPROTOCHAT_TEST_POSTGRES=postgres://... to run it"
    );
}

#[test]
#[should_panic(expected = "QUICNPROTOCHAT_REQUIRE_POSTGRES=1 but PostgreSQL is not available: no initdb")]
fn required_postgres_panics_instead_of_skipping() {
    report_unavailable("no initdb", true);
}

/// Writes an executable stub at `path`.
fn stub(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, "#!/bin/sh\n").unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn discovery_prefers_path_then_the_highest_version() {
    let root = tempfile::tempdir().unwrap();
    let versions = root.path().join("lib");
    for version in ["9.6", "10", "15"] {
        for program in ["initdb", "pg_ctl", "psql"] {
            stub(&versions.join(version).join("bin").join(program));
        }
    }
    // A directory without a version number and one without initdb are ignored.
    stub(&versions.join("common/bin/initdb"));
    stub(&versions.join("16/bin/psql"));

    let found = find_server_bins(None, &versions).unwrap();
    assert_eq!(found.initdb, versions.join("15/bin/initdb"));
    assert_eq!(found.pg_ctl, versions.join("15/bin/pg_ctl"));
    assert_eq!(found.psql, versions.join("15/bin/psql"));

    // On PATH through a symlink (as /usr/local/bin/initdb here): the
    // siblings come from the installation the link points into.
    let path_dir = root.path().join("path");
    fs::create_dir_all(&path_dir).unwrap();
    std::os::unix::fs::symlink(versions.join("10/bin/initdb"), path_dir.join("initdb")).unwrap();
    let path = std::env::join_paths([&path_dir]).unwrap();
    let found = find_server_bins(Some(&path), &versions).unwrap();
    let real_10 = fs::canonicalize(versions.join("10/bin")).unwrap();
    assert_eq!(found.pg_ctl, real_10.join("pg_ctl"));
    assert_eq!(found.psql, real_10.join("psql"));

    // A non-executable file is no binary.
    let empty = root.path().join("none");
    fs::create_dir_all(&empty).unwrap();
    fs::write(empty.join("initdb"), "").unwrap();
    let path = std::env::join_paths([&empty]).unwrap();
    let error = find_server_bins(Some(&path), &empty).unwrap_err();
    assert!(error.contains("no initdb"), "{error}");
    assert_eq!(find_psql(Some(&path), &empty), None);

    // psql alone is enough for an external server.
    assert_eq!(find_psql(None, &versions), Some(versions.join("15/bin/psql")));
    let only_psql = root.path().join("only-psql");
    stub(&only_psql.join("16/bin/psql"));
    assert_eq!(find_psql(None, &only_psql), Some(only_psql.join("16/bin/psql")));
}

#[test]
fn urls_are_taken_apart_and_rebuilt() {
    assert_eq!(
        with_database("postgres://u:p@db.example:6543/postgres?sslmode=disable", "x").as_deref(),
        Some("postgres://u:p@db.example:6543/x?sslmode=disable")
    );
    assert_eq!(
        with_database("postgresql://u@h", "x").as_deref(),
        Some("postgresql://u@h/x")
    );
    assert_eq!(
        with_database("postgres://u@/postgres?host=/run/pg&port=5433", "x").as_deref(),
        Some("postgres://u@/x?host=/run/pg&port=5433")
    );
    assert_eq!(with_database("mysql://h/db", "x"), None);

    assert_eq!(database_of("postgres://u@h:1/abc?x=1"), Some("abc"));
    assert_eq!(database_of("postgres://u@h:1"), None);

    assert_eq!(port_of("postgres://u@h:6543/db"), 6543);
    assert_eq!(port_of("postgres://u@h/db"), 5432);
    assert_eq!(port_of("postgres://u@[::1]:7000/db"), 7000);
    assert_eq!(port_of("postgres://[::1]/db"), 5432);
    assert_eq!(port_of("postgres://u@h1:7001,h2:7002/db"), 7001);
    assert_eq!(port_of("postgres://u@/db?host=/tmp&port=7003"), 7003);

    assert_eq!(percent_encode("/tmp/qnpc-testpg-Ab1"), "/tmp/qnpc-testpg-Ab1");
    assert_eq!(percent_encode("/a b&c"), "/a%20b%26c");
}
