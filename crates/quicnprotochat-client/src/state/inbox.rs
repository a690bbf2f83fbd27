//! The local inbox: payloads fetched from the node wait here until they are
//! processed. The node's fetch removes them from its queue, so they are
//! written here in one transaction before any is processed, and each is
//! deleted in the same transaction that applies it.

use rusqlite::params;

use super::{StateError, StateFile, unix_now};

impl StateFile {
    /// Appends fetched payloads to the inbox in one transaction.
    pub fn push_inbox(&self, payloads: &[Vec<u8>]) -> Result<(), StateError> {
        let transaction = self.transaction()?;
        {
            let mut insert =
                transaction.prepare_cached("INSERT INTO inbox (payload, received_at) VALUES (?1, ?2)")?;
            let now = unix_now();
            for payload in payloads {
                insert.execute(params![payload, now])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    /// The inbox, oldest first, as (entry id, payload).
    pub fn inbox(&self) -> Result<Vec<(i64, Vec<u8>)>, StateError> {
        let mut select = self
            .connection
            .prepare("SELECT id, payload FROM inbox ORDER BY id")?;
        let rows = select.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes an inbox entry (within the caller's transaction, if any).
    pub fn remove_inbox(&self, id: i64) -> Result<(), StateError> {
        self.connection
            .execute("DELETE FROM inbox WHERE id = ?1", params![id])?;
        Ok(())
    }
}
