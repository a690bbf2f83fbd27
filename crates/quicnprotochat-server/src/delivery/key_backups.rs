//! Key backups: one opaque blob per device (its groups and their state
//! keys, sealed by the device before it leaves it), kept under the
//! [`BackupRef`] of a 32-byte secret the device derives from its identity
//! secret and presents with each call. The node keeps only the hash, so its
//! files do not say whose backup a row is, and only a holder of the secret
//! can name the row to read or replace it.
//!
//! Backups are never purged, unlike messages and Welcome trees: a device
//! turns to its backup after losing its own state, which may follow any
//! idle period, and a backup that had expired would be gone exactly when it
//! is needed. What they cost stays bounded all the same: each row is at
//! most [`MAX_KEY_BACKUP_BYTES`], and how many rows a caller can create is
//! bounded by the per-identity rate limits of the call that stores them.

use quicnprotochat_core::BackupRef;

use super::storage::Storage;

/// Most bytes one key backup may hold: the client format's bound
/// (`quicnprotochat_core::backup`), which fits a thousand groups with
/// 16-byte ids (a couple of hundred with the longest ids), and what one
/// stored backup costs the node at most.
pub const MAX_KEY_BACKUP_BYTES: usize = quicnprotochat_core::backup::MAX_SEALED;

/// Why `put_key_backup` stored nothing: the backup is larger than
/// [`MAX_KEY_BACKUP_BYTES`]. The earlier backup, if any, is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupTooLarge {
    /// The most bytes a backup may hold.
    pub max_bytes: usize,
}

/// Stores `sealed` as the key backup of the device presenting `secret`,
/// replacing the one it stored before, unless it is larger than
/// [`MAX_KEY_BACKUP_BYTES`].
pub fn put_key_backup<S: Storage>(
    storage: &mut S,
    secret: &[u8; 32],
    sealed: &[u8],
    now: i64,
) -> Result<Result<(), BackupTooLarge>, S::Error> {
    if sealed.len() > MAX_KEY_BACKUP_BYTES {
        return Ok(Err(BackupTooLarge {
            max_bytes: MAX_KEY_BACKUP_BYTES,
        }));
    }
    storage.put_key_backup(&BackupRef::of(secret), sealed, now)?;
    Ok(Ok(()))
}

/// The key backup the device presenting `secret` stored last, if any.
pub fn key_backup<S: Storage>(storage: &mut S, secret: &[u8; 32]) -> Result<Option<Vec<u8>>, S::Error> {
    storage.key_backup(&BackupRef::of(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::MemoryStorage;

    #[test]
    fn a_backup_is_read_back_only_with_its_secret_and_replaced_by_the_next() {
        let mut storage = MemoryStorage::default();
        let (mine, other) = ([1; 32], [2; 32]);
        assert_eq!(storage.run(|s| key_backup(s, &mine)), None);
        storage
            .command(|s| put_key_backup(s, &mine, b"first", 10))
            .unwrap();
        storage
            .command(|s| put_key_backup(s, &mine, b"second", 20))
            .unwrap();
        assert_eq!(storage.run(|s| key_backup(s, &mine)), Some(b"second".to_vec()));
        assert_eq!(storage.run(|s| key_backup(s, &other)), None);
        // Kept under the hash of the secret, never under the secret.
        let by_secret = BackupRef::from_bytes(mine);
        assert_eq!(storage.run(|s| s.key_backup(&by_secret)), None);
    }

    #[test]
    fn a_backup_over_the_limit_is_refused_and_the_earlier_one_kept() {
        let mut storage = MemoryStorage::default();
        let secret = [1; 32];
        storage
            .command(|s| put_key_backup(s, &secret, b"kept", 10))
            .unwrap();
        let largest = vec![7; MAX_KEY_BACKUP_BYTES];
        let too_large = vec![7; MAX_KEY_BACKUP_BYTES + 1];
        assert_eq!(
            storage.command(|s| put_key_backup(s, &secret, &too_large, 20)),
            Err(BackupTooLarge {
                max_bytes: MAX_KEY_BACKUP_BYTES
            })
        );
        assert_eq!(storage.run(|s| key_backup(s, &secret)), Some(b"kept".to_vec()));
        storage
            .command(|s| put_key_backup(s, &secret, &largest, 30))
            .unwrap();
        assert_eq!(storage.run(|s| key_backup(s, &secret)), Some(largest));
    }
}
