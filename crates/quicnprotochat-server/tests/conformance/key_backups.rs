//! Devices' key backups: one sealed blob per device, read and replaced
//! only with the secret the device presents, bounded in size, and kept
//! under a hash of that secret, never the secret itself.

use quicnprotochat_server::delivery::MAX_KEY_BACKUP_BYTES;
use quicnprotochat_server::store::BackupTooLarge;

use super::{Backend, close};

/// A device's backup secret, distinct from every other byte the checks
/// store, so that finding it in a copy of the database means it was
/// stored.
fn secret(device: u8) -> [u8; 32] {
    std::array::from_fn(|i| device ^ (i as u8).wrapping_mul(37) ^ 0xa5)
}

pub async fn a_key_backup_is_read_back_with_its_secret_and_replaced_by_the_next(backend: &impl Backend) {
    let (store, closer) = backend.open();
    assert_eq!(store.key_backup(secret(1)).await.unwrap(), None);
    store
        .put_key_backup(secret(1), b"first backup".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.key_backup(secret(1)).await.unwrap(),
        Some(b"first backup".to_vec())
    );
    store
        .put_key_backup(secret(1), b"second backup".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.key_backup(secret(1)).await.unwrap(),
        Some(b"second backup".to_vec())
    );
    assert_eq!(
        store.key_backup(secret(2)).await.unwrap(),
        None,
        "another device's"
    );
    close((store, closer)).await;

    // Stored, so it survives a restart.
    let (store, closer) = backend.open();
    assert_eq!(
        store.key_backup(secret(1)).await.unwrap(),
        Some(b"second backup".to_vec())
    );
    close((store, closer)).await;
}

pub async fn a_key_backup_over_the_limit_is_refused_and_nothing_stored(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let too_large = vec![0x5a; MAX_KEY_BACKUP_BYTES + 1];
    let refused = BackupTooLarge {
        max_bytes: MAX_KEY_BACKUP_BYTES,
    };
    assert_eq!(
        store.put_key_backup(secret(1), too_large.clone()).await.unwrap(),
        Err(refused)
    );
    assert_eq!(store.key_backup(secret(1)).await.unwrap(), None);
    // Nor does a refusal touch the backup stored before.
    store
        .put_key_backup(secret(2), b"kept".to_vec())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.put_key_backup(secret(2), too_large).await.unwrap(),
        Err(refused)
    );
    assert_eq!(store.key_backup(secret(2)).await.unwrap(), Some(b"kept".to_vec()));
    // The largest allowed is stored whole.
    let largest = vec![0x5a; MAX_KEY_BACKUP_BYTES];
    store
        .put_key_backup(secret(2), largest.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.key_backup(secret(2)).await.unwrap(), Some(largest));
    close((store, closer)).await;
}

/// A copy of the database holds the backup but not the secret it is read
/// with: whoever has the copy cannot tell whose backup it is, nor ask the
/// node for it.
pub async fn a_copy_of_the_database_holds_no_key_backup_secret(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let sealed = b"a sealed key backup, long enough to find again".to_vec();
    store
        .put_key_backup(secret(1), sealed.clone())
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
    let Some(holds_backup) = backend.copy_holds(&sealed) else {
        return;
    };
    assert!(holds_backup, "the copy holds the backup");
    assert_eq!(
        backend.copy_holds(&secret(1)),
        Some(false),
        "the copy holds the secret"
    );
}
