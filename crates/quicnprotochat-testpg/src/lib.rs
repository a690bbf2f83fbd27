//! A real, throwaway PostgreSQL for the integration tests of quicnprotochat:
//! tests ask for a cluster ([`TestPostgres`]), get a fresh empty database from
//! it for each test ([`TestPostgres::create_database`]), and leave nothing
//! behind when the test process ends. Without PostgreSQL on the machine the
//! suite is skipped with one line on stderr, so `cargo test` stays green on a
//! laptop without a database server, while CI can demand that it runs.
//!
//! # Layout
//! - [`TestPostgres::shared`] — the one cluster of the test process: an
//!   external server named by `QUICNPROTOCHAT_TEST_POSTGRES`, or a throwaway
//!   cluster started on first use.
//! - [`TestPostgres::start_own`] — a throwaway cluster owned by the caller,
//!   for tests that stop and restart the server
//!   ([`TestPostgres::stop_server`], [`TestPostgres::start_server`]).
//! - [`TestPostgres::create_database`], [`TestPostgres::socket_url`],
//!   [`TestPostgres::admin_url`], [`TestPostgres::port`] — where to connect.
//! - Private: finding the server binaries (`find_server_bins`), the life
//!   cycle of a cluster we started (`Cluster`, with its watchdog), and the
//!   few URL manipulations the crate needs (`split_url` and friends).
//!
//! # Environment
//! - `QUICNPROTOCHAT_TEST_POSTGRES=postgres://user@host:port/db` — use this
//!   server for [`TestPostgres::shared`] instead of starting one. The user
//!   must be allowed to `CREATE DATABASE`; each test database gets a unique
//!   name `qnpc_test_<pid>_<n>` and is left on that server afterwards. Only
//!   `psql` is needed on the machine then. A URL that cannot be reached is a
//!   configuration error and panics rather than skipping.
//! - `QUICNPROTOCHAT_REQUIRE_POSTGRES=1` — turn "PostgreSQL is not available,
//!   skip" into a panic, for CI jobs that must not pass by skipping.
//!
//! Without either, the server binaries (`initdb`, `pg_ctl`, `postgres`,
//! `psql`) are looked up on `PATH`, then in the highest version of
//! `/usr/lib/postgresql/*/bin` (Debian and Ubuntu do not put them on `PATH`).
//! When the tests run as root, `initdb` and `pg_ctl` run as the `postgres`
//! user through `runuser`, because PostgreSQL refuses to run as root.
//!
//! # Usage
//! ```no_run
//! use quicnprotochat_testpg::TestPostgres;
//!
//! // `None`: no PostgreSQL here, the skip was already reported.
//! let Some(pg) = TestPostgres::shared() else { return };
//! let url = pg.create_database();
//! // ... connect to `url` with the crate under test ...
//! # let _ = url;
//! ```

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tempfile::TempDir;

/// Names an external server to use instead of starting one.
const URL_ENV: &str = "QUICNPROTOCHAT_TEST_POSTGRES";
/// Makes a missing PostgreSQL a failure instead of a skip.
const REQUIRE_ENV: &str = "QUICNPROTOCHAT_REQUIRE_POSTGRES";
/// Where Debian-style packages keep one `bin` directory per major version.
const FALLBACK_ROOT: &str = "/usr/lib/postgresql";
/// The database superuser `initdb` creates, and the OS user the server runs
/// as when the tests run as root.
const SUPERUSER: &str = "postgres";
/// How long `pg_ctl` may wait for a start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// A PostgreSQL cluster the tests may use.
///
/// Either an external server (from `QUICNPROTOCHAT_TEST_POSTGRES`) or a
/// throwaway cluster this crate started in a directory under `/tmp`; only
/// the latter can be stopped and restarted, and only it has a Unix socket
/// we know of.
#[derive(Debug)]
pub struct TestPostgres {
    kind: Kind,
}

/// Where a [`TestPostgres`] comes from.
#[derive(Debug)]
enum Kind {
    /// A server someone else runs; we only create databases on it.
    External {
        /// The URL from the environment (its database is where we connect
        /// to run `CREATE DATABASE`).
        url: String,
        /// The client used to create databases.
        psql: PathBuf,
    },
    /// A cluster we started and must stop again.
    Started(Cluster),
}

impl TestPostgres {
    /// The cluster shared by every test of this process: the one named by env
    /// `QUICNPROTOCHAT_TEST_POSTGRES` (a `postgres://` URL of a server where
    /// we may `CREATE DATABASE`), else a throwaway cluster started on first
    /// use and removed (server stopped, directory deleted) by a watchdog
    /// process once the test process has exited.
    ///
    /// Returns `None` when no PostgreSQL is available (binaries missing or
    /// start failed), after printing to stderr one line per process:
    /// `PostgreSQL suite skipped: <why>; install PostgreSQL server binaries
    /// (initdb, pg_ctl) or set QUICNPROTOCHAT_TEST_POSTGRES=postgres://... to
    /// run it`.
    ///
    /// # Panics
    /// When `QUICNPROTOCHAT_REQUIRE_POSTGRES=1` and no PostgreSQL is
    /// available (with the reason), and when `QUICNPROTOCHAT_TEST_POSTGRES`
    /// is set but is no `postgres://` URL or its server cannot be reached.
    pub fn shared() -> Option<&'static TestPostgres> {
        static SHARED: OnceLock<Option<TestPostgres>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let opened = match env_value(URL_ENV) {
                    Some(url) => TestPostgres::external(url),
                    None => TestPostgres::throwaway(),
                };
                available(opened)
            })
            .as_ref()
    }

    /// A throwaway cluster of the caller's own, for tests that stop and
    /// restart the server. Same `None` and panic rules as
    /// [`TestPostgres::shared`], but it never uses
    /// `QUICNPROTOCHAT_TEST_POSTGRES`: an external server cannot be stopped.
    /// Dropping it stops the server (`pg_ctl stop -m immediate`) and deletes
    /// its directory.
    pub fn start_own() -> Option<TestPostgres> {
        available(TestPostgres::throwaway())
    }

    /// Creates a fresh, empty database with a name unique to this process
    /// and call, and returns its URL, e.g.
    /// `postgres://postgres@127.0.0.1:PORT/qnpc_test_<pid>_<n>`.
    ///
    /// # Panics
    /// When `psql` fails to create it (the server is stopped, the external
    /// user may not create databases, ...): a test cannot go on without it.
    pub fn create_database(&self) -> String {
        // One counter for the whole process, so two clusters (or two
        // processes' databases on one external server) never collide.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // An external server keeps the databases of earlier runs, and a pid
        // comes round again eventually: step past names that already exist
        // instead of failing.
        const ATTEMPTS: u32 = 100;
        let admin = self.admin_url();
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            let name = format!(
                "qnpc_test_{}_{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            match run_psql(self.psql(), &admin, &format!("CREATE DATABASE \"{name}\"")) {
                Ok(_) => return self.database_url(&name),
                Err(error) if error.contains("already exists") => last_error = error,
                Err(error) => panic!("cannot create test database {name} on {admin}: {error}"),
            }
        }
        panic!("cannot create a test database on {admin}: {ATTEMPTS} names taken, last: {last_error}");
    }

    /// The same database as `database_url` (a URL from
    /// [`TestPostgres::create_database`]) reached over the Unix socket:
    /// `postgres://postgres@/DBNAME?host=SOCKETDIR&port=PORT`. Only for
    /// clusters we started; `None` for an external server, whose socket we
    /// do not know.
    ///
    /// # Panics
    /// When `database_url` names no database.
    pub fn socket_url(&self, database_url: &str) -> Option<String> {
        let Kind::Started(cluster) = &self.kind else {
            return None;
        };
        let database = database_of(database_url).unwrap_or_else(|| {
            panic!("socket_url: {database_url:?} is no postgres:// URL naming a database")
        });
        Some(format!(
            "postgres://{SUPERUSER}@/{database}?host={}&port={}",
            percent_encode(&cluster.socket_dir().to_string_lossy()),
            cluster.port
        ))
    }

    /// Stops the server with a fast shutdown (`pg_ctl stop -m fast -w`):
    /// clients are disconnected, and it is down when this returns.
    ///
    /// Meant for a cluster from [`TestPostgres::start_own`]; stopping the
    /// shared cluster would pull it from under every other test.
    ///
    /// # Panics
    /// When this cluster was not started by us (an external server), or
    /// `pg_ctl` fails.
    pub fn stop_server(&self) {
        let cluster = self.started("stop_server");
        if let Err(error) = cluster.stop("fast") {
            panic!(
                "cannot stop the test PostgreSQL on port {}: {error}",
                cluster.port
            );
        }
    }

    /// Crashes the server: `pg_ctl stop -m immediate`, which ends every
    /// process at once without a checkpoint, as a power cut or a killed
    /// server would; the next start recovers from the WAL. Commits
    /// answered before are durable; calls in flight get no answer.
    ///
    /// # Panics
    /// As [`Self::stop_server`].
    pub fn crash_server(&self) {
        let cluster = self.started("crash_server");
        if let Err(error) = cluster.stop("immediate") {
            panic!(
                "cannot crash the test PostgreSQL on port {}: {error}",
                cluster.port
            );
        }
    }

    /// Starts the server again, on the same port and directory, and returns
    /// once it accepts connections.
    ///
    /// # Panics
    /// When this cluster was not started by us (an external server), or the
    /// server does not come up (e.g. another process took the port).
    pub fn start_server(&self) {
        let cluster = self.started("start_server");
        if let Err(error) = cluster.start_at(cluster.port) {
            panic!(
                "cannot restart the test PostgreSQL on port {}: {error}",
                cluster.port
            );
        }
    }

    /// The TCP port of the server (for an external URL: its port, 5432 when
    /// it names none).
    pub fn port(&self) -> u16 {
        match &self.kind {
            Kind::External { url, .. } => port_of(url),
            Kind::Started(cluster) => cluster.port,
        }
    }

    /// The URL of the administrative database (`postgres` on a cluster we
    /// started; the configured URL for an external server).
    pub fn admin_url(&self) -> String {
        match &self.kind {
            Kind::External { url, .. } => url.clone(),
            Kind::Started(cluster) => format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", cluster.port),
        }
    }

    /// Opens an external server: needs `psql`, and the server must answer.
    fn external(url: String) -> Result<TestPostgres, String> {
        if split_url(&url).is_none() {
            panic!("{URL_ENV} must be a postgres:// or postgresql:// URL, not {url:?}");
        }
        let path = std::env::var_os("PATH");
        let psql = find_psql(path.as_deref(), Path::new(FALLBACK_ROOT))
            .ok_or_else(|| format!("{URL_ENV} is set but no psql client was found"))?;
        // Set but unreachable is a mistake to fix, not a reason to skip
        // quietly: whoever set it wants the suite to run.
        if let Err(error) = run_psql(&psql, &url, "SELECT 1") {
            panic!("{URL_ENV}={url} cannot be reached: {error}");
        }
        Ok(TestPostgres {
            kind: Kind::External { url, psql },
        })
    }

    /// Finds the binaries and starts a new cluster.
    fn throwaway() -> Result<TestPostgres, String> {
        let path = std::env::var_os("PATH");
        let bins = find_server_bins(path.as_deref(), Path::new(FALLBACK_ROOT))?;
        Ok(TestPostgres {
            kind: Kind::Started(Cluster::start_new(bins)?),
        })
    }

    /// The cluster we started, or a panic naming `what` was refused.
    fn started(&self, what: &str) -> &Cluster {
        match &self.kind {
            Kind::Started(cluster) => cluster,
            Kind::External { url, .. } => {
                panic!(
                    "{what}: the PostgreSQL at {url} comes from {URL_ENV} and was not started by the tests"
                )
            }
        }
    }

    /// A `pg_dump` of the database at `database_url` (a URL from
    /// [`TestPostgres::create_database`]), in plain SQL: what a copy of the
    /// database shows. `bytea` columns come out in hex.
    ///
    /// # Panics
    /// When `pg_dump` (beside `psql`) cannot be run or fails.
    pub fn dump(&self, database_url: &str) -> Vec<u8> {
        let pg_dump = self.psql().with_file_name("pg_dump");
        let output = Command::new(&pg_dump)
            .args(["--no-owner", "--dbname", database_url])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", pg_dump.display()));
        assert!(
            output.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// The client used to create databases.
    fn psql(&self) -> &Path {
        match &self.kind {
            Kind::External { psql, .. } => psql,
            Kind::Started(cluster) => &cluster.bins.psql,
        }
    }

    /// The URL of database `name` on this server.
    fn database_url(&self, name: &str) -> String {
        match &self.kind {
            Kind::External { url, .. } => {
                with_database(url, name).unwrap_or_else(|| panic!("{URL_ENV} is no postgres:// URL: {url:?}"))
            }
            Kind::Started(cluster) => format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", cluster.port),
        }
    }
}

/// Turns a failed open into `None` after reporting it (or panics under
/// `QUICNPROTOCHAT_REQUIRE_POSTGRES`).
fn available(opened: Result<TestPostgres, String>) -> Option<TestPostgres> {
    match opened {
        Ok(postgres) => Some(postgres),
        Err(why) => {
            report_unavailable(&why, require_postgres());
            None
        }
    }
}

/// Panics when PostgreSQL is required, else prints the skip line, once per
/// process: every test of the suite lands here, and one line says it all.
fn report_unavailable(why: &str, require: bool) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if require {
        panic!("{REQUIRE_ENV}=1 but PostgreSQL is not available: {why}");
    }
    if !REPORTED.swap(true, Ordering::SeqCst) {
        // Straight to the stderr handle, not `eprintln!`: the test harness
        // captures the macros' output of passing tests, and a skip nobody
        // sees is what this line is meant to prevent.
        let _ = writeln!(std::io::stderr().lock(), "{}", skip_line(why));
    }
}

/// The one line that announces a skipped suite.
fn skip_line(why: &str) -> String {
    format!(
        "PostgreSQL suite skipped: {why}; install PostgreSQL server binaries (initdb, pg_ctl) \
         or set {URL_ENV}=postgres://... to run it"
    )
}

/// Whether `QUICNPROTOCHAT_REQUIRE_POSTGRES` asks for a failure over a skip.
fn require_postgres() -> bool {
    env_value(REQUIRE_ENV)
        .is_some_and(|value| matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// A variable's value, with unset, empty and non-UTF-8 all meaning "none".
fn env_value(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// The binaries a throwaway cluster needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bins {
    /// Creates the cluster.
    initdb: PathBuf,
    /// Starts and stops the server.
    pg_ctl: PathBuf,
    /// Creates databases (taken from the same installation when it has one,
    /// so client and server versions match).
    psql: PathBuf,
}

/// Finds `initdb` on `path` (following symlinks to the installation's own
/// `bin` directory, where its siblings live), else in the highest version
/// under `fallback_root` (`/usr/lib/postgresql/<version>/bin`); `pg_ctl` and
/// `psql` come from the same directory, else from `path`.
fn find_server_bins(path: Option<&OsStr>, fallback_root: &Path) -> Result<Bins, String> {
    let bin_dir = match find_on_path(path, "initdb") {
        Some(initdb) => {
            let real = fs::canonicalize(&initdb).unwrap_or(initdb);
            real.parent().map(Path::to_path_buf).unwrap_or_default()
        }
        None => highest_bin_dir(fallback_root, "initdb")
            .ok_or_else(|| format!("no initdb on PATH or in {}/*/bin", fallback_root.display()))?,
    };
    let sibling = |name: &str| {
        let candidate = bin_dir.join(name);
        if is_executable(&candidate) {
            Some(candidate)
        } else {
            find_on_path(path, name)
        }
    };
    let initdb = bin_dir.join("initdb");
    let pg_ctl = sibling("pg_ctl").ok_or_else(|| {
        format!(
            "initdb found in {} but no pg_ctl there or on PATH",
            bin_dir.display()
        )
    })?;
    let psql = sibling("psql").ok_or_else(|| {
        format!(
            "initdb found in {} but no psql there or on PATH",
            bin_dir.display()
        )
    })?;
    Ok(Bins { initdb, pg_ctl, psql })
}

/// A `psql` for an external server: the server installation's, else the
/// one on `path`, else the highest version under `fallback_root`.
fn find_psql(path: Option<&OsStr>, fallback_root: &Path) -> Option<PathBuf> {
    find_server_bins(path, fallback_root)
        .ok()
        .map(|bins| bins.psql)
        .or_else(|| find_on_path(path, "psql"))
        .or_else(|| highest_bin_dir(fallback_root, "psql").map(|dir| dir.join("psql")))
}

/// The first directory of `path` holding an executable `name`.
fn find_on_path(path: Option<&OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// `root/<version>/bin` of the highest version (compared numerically, so
/// 15 beats 9.6) whose `bin` holds an executable `name`.
fn highest_bin_dir(root: &Path, name: &str) -> Option<PathBuf> {
    fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            is_executable(&bin.join(name)).then_some((version, bin))
        })
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, bin)| bin)
}

/// Whether `path` is a file someone may execute.
fn is_executable(path: &Path) -> bool {
    let Ok(metadata) = fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        metadata.is_file()
    }
}

/// Whether this process runs as root (effective uid 0), in which case
/// PostgreSQL must run as another user.
fn running_as_root() -> bool {
    // `Uid:` lists real, effective, saved and filesystem uid; initdb checks
    // the effective one.
    if let Ok(status) = fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|line| line.starts_with("Uid:"))
    {
        return line.split_whitespace().nth(2) == Some("0");
    }
    // No /proc (not Linux): ask `id`. If that fails too, assume not root and
    // let initdb say otherwise.
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|output| output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A cluster we created: its binaries, its directory and its server.
///
/// Layout of the directory (under `/tmp`, so the socket path stays far below
/// the ~107-byte limit of Unix socket names whatever `TMPDIR` says, and so
/// the `postgres` user can reach it when we run as root):
/// `data/` (the cluster), `log` (the server log), and the socket
/// `.s.PGSQL.<port>`.
#[derive(Debug)]
struct Cluster {
    /// The binaries it was created with.
    bins: Bins,
    /// Whether `initdb`/`pg_ctl` run as the `postgres` user (we are root).
    as_postgres: bool,
    /// The data directory, `<base>/data`.
    data: PathBuf,
    /// The TCP port, fixed at the first start so URLs stay valid across
    /// restarts.
    port: u16,
    /// Stops the server and deletes `base` once this process has exited,
    /// for the shared cluster whose `Drop` never runs (statics are not
    /// dropped) and for a process that dies without unwinding.
    watchdog: Option<Child>,
    /// The directory; declared last so it is deleted after `Drop` has
    /// stopped the server.
    base: TempDir,
}

impl Cluster {
    /// Creates the directory, arms the watchdog, runs `initdb` and starts the
    /// server on a free port.
    fn start_new(bins: Bins) -> Result<Cluster, String> {
        let as_postgres = running_as_root();
        let base = tempfile::Builder::new()
            .prefix("qnpc-testpg-")
            .tempdir_in("/tmp")
            .map_err(|error| format!("cannot create a directory under /tmp: {error}"))?;
        // From here on a failure drops `cluster`, which cleans up.
        let mut cluster = Cluster {
            bins,
            as_postgres,
            data: base.path().join("data"),
            port: 0,
            watchdog: None,
            base,
        };
        if as_postgres {
            // initdb runs as `postgres` and must create `data` in here, and
            // the server writes its log and socket here.
            run(
                Command::new("chown")
                    .arg(format!("{SUPERUSER}:{SUPERUSER}"))
                    .arg(cluster.base.path()),
                "chown",
            )?;
        }
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        let mut initdb = cluster.pg_command(&cluster.bins.initdb);
        // Trust: the server listens on 127.0.0.1 and a private socket only.
        // No sync: a test cluster does not need to survive a power cut.
        initdb.arg("-D").arg(&cluster.data).args([
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb")?;
        cluster.first_start()?;
        Ok(cluster)
    }

    /// Starts the server on a free port, retrying a few times because the
    /// port is only free when we look: another process may bind it before
    /// the server does.
    fn first_start(&mut self) -> Result<(), String> {
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            match self.start_at(port) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(error) if attempt < ATTEMPTS && is_bind_error(&error) => attempt += 1,
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts the server on `port` and waits until it accepts connections
    /// (`pg_ctl -w` watches the server's own "ready" status).
    fn start_at(&self, port: u16) -> Result<(), String> {
        // `-o` goes through a shell inside pg_ctl, hence the quotes. fsync
        // stays on, as in production, so commit costs are not flattered. A
        // shared cluster serves every test of a process, each with its own
        // connection pool, so allow more connections than the default 100.
        let options = format!(
            "-p {port} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            self.socket_dir().display()
        );
        let log = self.base.path().join("log");
        let mut pg_ctl = self.pg_command(&self.bins.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .arg("-o")
            .arg(options)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
        run(&mut pg_ctl, "pg_ctl start")
            .map(drop)
            .map_err(|error| format!("{error}; server log: {}", log_tail(&log)))
    }

    /// Stops the server (`mode`: `fast` or `immediate`) and waits until it is
    /// gone.
    fn stop(&self, mode: &str) -> Result<(), String> {
        let mut pg_ctl = self.pg_command(&self.bins.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]);
        run(&mut pg_ctl, "pg_ctl stop").map(drop)
    }

    /// Where the server puts its Unix socket.
    fn socket_dir(&self) -> &Path {
        self.base.path()
    }

    /// A command running `program` as the user the server runs as.
    fn pg_command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", SUPERUSER, "--"]).arg(program);
            runuser
        } else {
            Command::new(program)
        };
        // The `postgres` user may not be able to enter our working directory
        // (initdb complains); the cluster's own directory it can.
        command.current_dir(self.base.path()).stdin(Stdio::null());
        command
    }

    /// Starts the detached shell that cleans up after this process: it polls
    /// until our pid is gone (or the directory was removed by `Drop`), then
    /// stops the server and deletes the directory.
    fn spawn_watchdog(&self) -> Result<Child, String> {
        // Arguments: $1 our pid, $2 pg_ctl, $3 data dir, $4 base dir,
        // $5 "1" when pg_ctl must run as postgres. If pg_ctl cannot stop the
        // server, kill the postmaster by the pid it recorded. An initdb or
        // `pg_ctl start` of ours may outlive the test process and recreate
        // the directory (initdb makes missing parents) or start the server
        // after we looked, hence the rounds until the directory stays gone.
        const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null && [ -d "$4" ]; do sleep 0.5; done
round=0
while [ -e "$4" ] && [ "$round" -lt 10 ]; do
    round=$((round + 1))
    if [ "$5" = 1 ]; then
        runuser -u postgres -- "$2" -D "$3" -m immediate -w stop
    else
        "$2" -D "$3" -m immediate -w stop
    fi
    pid=$(head -n 1 "$3/postmaster.pid" 2>/dev/null)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then kill -KILL "$pid"; fi
    rm -rf "$4"
    sleep 1
done
"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SCRIPT)
            .arg("quicnprotochat-testpg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.bins.pg_ctl)
            .arg(&self.data)
            .arg(self.base.path())
            .arg(if self.as_postgres { "1" } else { "0" })
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a Ctrl-C to the test run must not take the
        // watchdog down before it has cleaned up (the server, started by
        // pg_ctl in a session of its own, survives the Ctrl-C).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command
            .spawn()
            .map_err(|error| format!("cannot start the cleanup watchdog (sh): {error}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nothing here may panic (we may be unwinding already); each step
        // that fails leaves the next one to do the job.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        // Immediate: the data is thrown away anyway, no need to checkpoint.
        if self.stop("immediate").is_err() {
            // Stopped already (stop_server without start_server), or pg_ctl
            // failed: a pid file still present means a server still running.
            kill_postmaster(&self.data);
        }
        // `base` (TempDir) deletes the directory when the fields drop.
    }
}

/// Kills the postmaster recorded in `data/postmaster.pid`, if that process
/// is still a postgres (the pid may have been reused since).
fn kill_postmaster(data: &Path) {
    let Ok(pid_file) = fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pid_file
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<u32>().ok())
    else {
        return;
    };
    let is_postgres =
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres");
    if is_postgres {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `command` to completion; a failure becomes the last line it wrote
/// (where programs put the reason).
fn run(command: &mut Command, what: &str) -> Result<Output, String> {
    let output = command
        .output()
        .map_err(|error| format!("cannot run {what}: {error}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            output.status,
            last_line(&output)
        ))
    }
}

/// The last non-empty line of a command's stderr, else of its stdout.
fn last_line(output: &Output) -> String {
    let last = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .map(str::to_owned)
    };
    last(&output.stderr)
        .or_else(|| last(&output.stdout))
        .unwrap_or_else(|| "no output".to_owned())
}

/// The last few lines of the server log, joined into one line.
fn log_tail(log: &Path) -> String {
    const LINES: usize = 5;
    let Ok(text) = fs::read_to_string(log) else {
        return "(none)".to_owned();
    };
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LINES)..].join(" | ")
}

/// Whether a failed start failed because the port was taken.
fn is_bind_error(error: &str) -> bool {
    error.contains("could not bind") || error.contains("Address already in use")
}

/// A port nobody listens on right now (the kernel picks it).
fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).map_err(|error| format!("cannot pick a port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| format!("cannot pick a port: {error}"))
}

/// Runs one SQL command with `psql` against `url` and returns its unaligned,
/// tuples-only output (trimmed), or psql's error.
fn run_psql(psql: &Path, url: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(psql)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        // A server that does not answer must not hang the test run.
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run {}: {error}", psql.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Splits a `postgres://` (or `postgresql://`) URL into the part up to the
/// end of the authority, the database path (without its `/`), and the rest
/// (query and fragment, with their `?`/`#`).
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let after_scheme = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))?;
    let authority_end =
        url.len() - after_scheme.len() + after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    let (head, rest) = url.split_at(authority_end);
    let (path, tail) = rest.split_at(rest.find(['?', '#']).unwrap_or(rest.len()));
    Some((head, path.strip_prefix('/').unwrap_or(path), tail))
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> Option<String> {
    let (head, _, tail) = split_url(url)?;
    Some(format!("{head}/{database}{tail}"))
}

/// The database a URL names, if any.
fn database_of(url: &str) -> Option<&str> {
    split_url(url)
        .map(|(_, database, _)| database)
        .filter(|database| !database.is_empty())
}

/// The port a URL names (a `port=` parameter wins, as in libpq; the first
/// host's port otherwise), 5432 when it names none.
fn port_of(url: &str) -> u16 {
    const DEFAULT: u16 = 5432;
    let Some((head, _, tail)) = split_url(url) else {
        return DEFAULT;
    };
    let query = tail.strip_prefix('?').unwrap_or_default();
    let from_query = query
        .split(['&', '#'])
        .find_map(|pair| pair.strip_prefix("port="));
    let authority = head.split_once("://").map_or(head, |(_, authority)| authority);
    let host = authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts);
    let first_host = host.split(',').next().unwrap_or_default();
    let from_authority = match first_host.rsplit_once(']') {
        // [IPv6]:port
        Some((_, after)) => after.strip_prefix(':'),
        None => first_host.rsplit_once(':').map(|(_, port)| port),
    };
    from_query
        .or(from_authority)
        .and_then(|port| port.split(',').next()?.parse().ok())
        .unwrap_or(DEFAULT)
}

/// Percent-encodes all but unreserved characters and `/`, for a path in a
/// URL's query.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests;
