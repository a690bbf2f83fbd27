//! Numbered schema migrations for the SQLite files of quicnprotochat (the
//! node's database and the client's state file), and the check that a file
//! is ours before anything writes to it.
//!
//! A file's schema version is kept in `PRAGMA user_version`; entry `i` of a
//! migration list brings the schema to version `i + 1`. `PRAGMA
//! application_id` marks the file as belonging to one program, so a wrong
//! path (another program's database, a file that is no database) is refused
//! instead of being written into.
//!
//! # Layout
//! - [`check_ownership`] — read-only: is the file fresh, ours (at which
//!   version), someone else's, or no database at all ([`Ownership`]).
//! - [`migrate`] — refuses what is not ours or is newer than we understand,
//!   then applies each pending migration in its own transaction
//!   ([`Applied`]).
//! - [`MigrationError`] — why a file was refused or a migration failed.

use rusqlite::{Connection, ErrorCode};

/// Whose a SQLite file is, as [`check_ownership`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ownership {
    /// No application id, no schema version, no tables: a new or empty
    /// file, free to be made ours.
    Fresh,
    /// Marked with our application id.
    Ours {
        /// Its schema version (`user_version`).
        version: i64,
    },
    /// It holds something else: another application id, or tables or a
    /// schema version without our id.
    Foreign {
        /// The application id it carries (0: none).
        application_id: i64,
    },
    /// SQLite says the file is not a database (or is encrypted).
    NotADatabase,
}

/// Which migrations [`migrate`] applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The schema version before.
    pub from: i64,
    /// The schema version now: the number of migrations known.
    pub to: i64,
}

impl Applied {
    /// How many migrations ran.
    pub fn count(&self) -> i64 {
        self.to - self.from
    }
}

/// Why a file was refused, or a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The file belongs to another program; nothing was written.
    #[error(
        "the database belongs to another application (application_id {application_id:#x}); nothing was written to it"
    )]
    Foreign {
        /// The application id it carries (0: none).
        application_id: i64,
    },
    /// The file is not a SQLite database; nothing was written.
    #[error("the file is not a SQLite database (or is encrypted); nothing was written to it")]
    NotADatabase,
    /// The file was written by a newer build; nothing was written.
    #[error("schema version {found} is newer than this build understands ({supported}); upgrade")]
    TooNew {
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A migration failed; it was rolled back, earlier ones stay applied.
    #[error("migrating the schema to version {version}: {source}")]
    Failed {
        /// The version the failed migration would have reached.
        version: i64,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// Reading the file's markers failed.
    #[error("reading the schema version: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Finds out, without writing, whether the file behind `connection` is
/// fresh, marked with `application_id` (and at which schema version),
/// someone else's, or not a database at all.
pub fn check_ownership(connection: &Connection, application_id: i64) -> Result<Ownership, MigrationError> {
    // The first read of a file that is no database fails with NOTADB.
    let found: i64 = match connection.pragma_query_value(None, "application_id", |row| row.get(0)) {
        Ok(found) => found,
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) => {
            return Ok(Ownership::NotADatabase);
        }
        Err(e) => return Err(e.into()),
    };
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found == application_id {
        return Ok(Ownership::Ours { version });
    }
    let tables: i64 = connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
    if found == 0 && version == 0 && tables == 0 {
        Ok(Ownership::Fresh)
    } else {
        Ok(Ownership::Foreign {
            application_id: found,
        })
    }
}

/// Brings the file behind `connection` to the newest schema: entry `i` of
/// `migrations` (SQL, possibly several statements) takes it to version
/// `i + 1`.
///
/// Refuses, before writing anything, a file that is not fresh or ours and
/// one whose version is newer than `migrations` knows. Each pending
/// migration runs in its own transaction together with setting
/// `user_version` and `application_id`, so a crash leaves the file at the
/// last version fully applied.
pub fn migrate(
    connection: &mut Connection,
    application_id: i64,
    migrations: &[&str],
) -> Result<Applied, MigrationError> {
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    let from = match check_ownership(connection, application_id)? {
        Ownership::Fresh => 0,
        Ownership::Ours { version } => version,
        Ownership::Foreign { application_id } => return Err(MigrationError::Foreign { application_id }),
        Ownership::NotADatabase => return Err(MigrationError::NotADatabase),
    };
    if from > supported {
        return Err(MigrationError::TooNew {
            found: from,
            supported,
        });
    }
    // A negative version (only a hand-edited file has one) starts from 0.
    let first = usize::try_from(from).unwrap_or(0);
    for (index, sql) in migrations.iter().enumerate().skip(first) {
        let version = index as i64 + 1;
        let failed = |source| MigrationError::Failed { version, source };
        let transaction = connection.transaction().map_err(failed)?;
        transaction.execute_batch(sql).map_err(failed)?;
        transaction
            .pragma_update(None, "user_version", version)
            .map_err(failed)?;
        transaction
            .pragma_update(None, "application_id", application_id)
            .map_err(failed)?;
        transaction.commit().map_err(failed)?;
        tracing::info!(application_id, version, "applied schema migration");
    }
    Ok(Applied { from, to: supported })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test
mod tests {
    use super::*;

    const ID: i64 = 0x5445_5354;
    const MIGRATIONS: &[&str] = &[
        "CREATE TABLE notes (text TEXT NOT NULL);",
        "ALTER TABLE notes ADD COLUMN at INTEGER NOT NULL DEFAULT 0;",
    ];

    fn marker(connection: &Connection, pragma: &str) -> i64 {
        connection
            .pragma_query_value(None, pragma, |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_fresh_file_gets_every_migration_and_our_mark() {
        let mut connection = Connection::open_in_memory().unwrap();
        assert_eq!(check_ownership(&connection, ID).unwrap(), Ownership::Fresh);
        let applied = migrate(&mut connection, ID, MIGRATIONS).unwrap();
        assert_eq!(applied, Applied { from: 0, to: 2 });
        assert_eq!(applied.count(), 2);
        assert_eq!(marker(&connection, "user_version"), 2);
        assert_eq!(marker(&connection, "application_id"), ID);
        assert_eq!(
            check_ownership(&connection, ID).unwrap(),
            Ownership::Ours { version: 2 }
        );
        connection
            .execute("INSERT INTO notes (text, at) VALUES ('x', 1)", [])
            .unwrap();
    }

    #[test]
    fn only_pending_migrations_run() {
        let mut connection = Connection::open_in_memory().unwrap();
        migrate(&mut connection, ID, &MIGRATIONS[..1]).unwrap();
        let applied = migrate(&mut connection, ID, MIGRATIONS).unwrap();
        assert_eq!(applied, Applied { from: 1, to: 2 });
        let again = migrate(&mut connection, ID, MIGRATIONS).unwrap();
        assert_eq!(again.count(), 0);
    }

    #[test]
    fn another_applications_database_is_refused_untouched() {
        let mut connection = Connection::open_in_memory().unwrap();
        connection.execute_batch("CREATE TABLE theirs (x);").unwrap();
        assert_eq!(
            check_ownership(&connection, ID).unwrap(),
            Ownership::Foreign { application_id: 0 }
        );
        let err = migrate(&mut connection, ID, MIGRATIONS).unwrap_err();
        assert!(
            matches!(err, MigrationError::Foreign { application_id: 0 }),
            "{err}"
        );
        assert_eq!(marker(&connection, "user_version"), 0);

        let mut marked = Connection::open_in_memory().unwrap();
        marked.pragma_update(None, "application_id", 7).unwrap();
        assert!(matches!(
            migrate(&mut marked, ID, MIGRATIONS),
            Err(MigrationError::Foreign { application_id: 7 })
        ));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut connection = Connection::open_in_memory().unwrap();
        migrate(&mut connection, ID, MIGRATIONS).unwrap();
        let err = migrate(&mut connection, ID, &MIGRATIONS[..1]).unwrap_err();
        assert!(
            matches!(
                err,
                MigrationError::TooNew {
                    found: 2,
                    supported: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_failing_migration_rolls_back_alone() {
        let mut connection = Connection::open_in_memory().unwrap();
        let broken = [MIGRATIONS[0], "CREATE TABLE half (x); THIS IS NOT SQL;"];
        let err = migrate(&mut connection, ID, &broken).unwrap_err();
        assert!(matches!(err, MigrationError::Failed { version: 2, .. }), "{err}");
        assert_eq!(marker(&connection, "user_version"), 1);
        let half: i64 = connection
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'half'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(half, 0, "the failed migration left nothing behind");
    }

    #[test]
    fn a_file_that_is_no_database_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise");
        let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&path, &noise).unwrap();
        let mut connection = Connection::open(&path).unwrap();
        assert_eq!(check_ownership(&connection, ID).unwrap(), Ownership::NotADatabase);
        assert!(matches!(
            migrate(&mut connection, ID, MIGRATIONS),
            Err(MigrationError::NotADatabase)
        ));
        drop(connection);
        assert_eq!(std::fs::read(&path).unwrap(), noise);
    }
}
