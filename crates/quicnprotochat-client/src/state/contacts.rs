//! Contacts: local names for identity keys, so `--peer NAME` works wherever
//! a peer key is taken and output can show names.

use quicnprotochat_core::IdentityKey;
use rusqlite::{OptionalExtension, params};

use super::{StateError, StateFile, unix_now};

impl StateFile {
    /// Names `key`. Fails if the name is taken or the key already has one.
    pub fn add_contact(&self, name: &str, key: &IdentityKey) -> Result<(), StateError> {
        if let Some(existing) = self.contact_key(name)? {
            return Err(StateError::Contact(format!(
                "the name {name:?} is already used for {existing}"
            )));
        }
        if let Some(existing) = self.contact_name(key)? {
            return Err(StateError::Contact(format!(
                "{key} is already known as {existing:?}"
            )));
        }
        self.connection.execute(
            "INSERT INTO contacts (name, identity_key, added_at) VALUES (?1, ?2, ?3)",
            params![name, key.as_bytes(), unix_now()],
        )?;
        Ok(())
    }

    /// Forgets the name `name`; false if there was none.
    pub fn remove_contact(&self, name: &str) -> Result<bool, StateError> {
        Ok(self
            .connection
            .execute("DELETE FROM contacts WHERE name = ?1", params![name])?
            > 0)
    }

    /// The key named `name`.
    pub fn contact_key(&self, name: &str) -> Result<Option<IdentityKey>, StateError> {
        let bytes: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT identity_key FROM contacts WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .optional()?;
        bytes
            .map(|bytes| {
                IdentityKey::try_from(bytes.as_slice())
                    .map_err(|_| StateError::Contact(format!("contact {name:?} has a damaged key")))
            })
            .transpose()
    }

    /// The name of `key`, if it has one.
    pub fn contact_name(&self, key: &IdentityKey) -> Result<Option<String>, StateError> {
        Ok(self
            .connection
            .query_row(
                "SELECT name FROM contacts WHERE identity_key = ?1",
                params![key.as_bytes()],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Every contact, by name.
    pub fn contacts(&self) -> Result<Vec<(String, IdentityKey)>, StateError> {
        let mut select = self
            .connection
            .prepare("SELECT name, identity_key FROM contacts ORDER BY name")?;
        let rows = select.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?;
        let mut contacts = Vec::new();
        for row in rows {
            let (name, bytes) = row?;
            let key = IdentityKey::try_from(bytes.as_slice())
                .map_err(|_| StateError::Contact(format!("contact {name:?} has a damaged key")))?;
            contacts.push((name, key));
        }
        Ok(contacts)
    }
}
