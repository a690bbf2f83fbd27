//! One SQLite file, one node: a lock file beside the database, held for the
//! node's life. Two nodes on one file would each wake only their own push
//! subscriptions and long polls, splitting delivery without an error; the
//! second refuses to start instead, naming the process that holds the file.
//! SQLite's own locks cannot say this: they are taken per transaction.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// An exclusive lock on `DB.lock`, released when dropped (or when the
/// process ends, however it ends: the kernel drops the lock with the file).
#[derive(Debug)]
pub(in crate::store) struct NodeLock {
    _file: File,
}

impl NodeLock {
    /// Locks the database at `db` for this process, or says who holds it.
    pub(in crate::store) fn acquire(db: &Path) -> Result<NodeLock, StoreError> {
        let path = lock_path(db);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder wrote its process id; a read that fails only
                // loses that detail.
                let _ = file.read_to_string(&mut holder);
                return Err(StoreError::InUse {
                    lock: path,
                    holder: holder.trim().to_owned(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::Io(e)),
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        Ok(NodeLock { _file: file })
    }
}

/// `DB.lock` beside the database file `DB`.
fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_database_names_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        let first = NodeLock::acquire(&db).unwrap();
        match NodeLock::acquire(&db) {
            Err(StoreError::InUse { lock, holder }) => {
                assert_eq!(lock, dir.path().join("node.db.lock"));
                assert_eq!(holder, std::process::id().to_string());
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        NodeLock::acquire(&db).unwrap();
    }
}
