//! The conformance suite (`tests/conformance/`) against the store in
//! memory: the reference storage behind the same commands, rules and reads
//! as the databases, so that it is held to the same contract.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;

use conformance::Backend;
use quicnprotochat_core::{IdentityKey, MessageKey, Suite};
use quicnprotochat_server::delivery::Storage;
use quicnprotochat_server::store::{Limits, MemoryDatabase, Store, StoreCloser, ValidKeyPackage};

/// A database in memory; stores opened on it again find what was
/// committed before, as after a restart.
#[derive(Default)]
struct Memory {
    database: MemoryDatabase,
}

impl Backend for Memory {
    fn open_with(&self, limits: Limits) -> (Store, StoreCloser) {
        Store::open_memory(&self.database, limits).unwrap()
    }

    fn store_key_packages_before_suites(&self, identity: IdentityKey, packages: &[(&[u8], bool)]) {
        // Memory has no older format to migrate: what the migration makes
        // of such KeyPackages (x25519 ones, never expiring) is stored as is.
        self.database.with(|storage| {
            for (bytes, last_resort) in packages {
                let package =
                    ValidKeyPackage::new(bytes.to_vec(), *last_resort, u64::MAX >> 1, Suite::X25519);
                storage.insert_key_package(&identity, &package, 0).unwrap();
            }
        });
    }

    fn key_groups_by_id(&self, _group: &quicnprotochat_core::GroupId) {
        // Memory has no older format: its groups were always kept by
        // reference, and stay so.
    }

    fn claim_message_id_by_sender(&self, sender: IdentityKey, message_id: &[u8]) {
        // Memory has no older format: the claim is stored as the migration
        // leaves it.
        self.database.with(|storage| {
            assert!(
                storage
                    .claim_message_id(&MessageKey::of(&sender, message_id), now())
                    .unwrap()
            );
        });
    }

    fn copy_holds(&self, _bytes: &[u8]) -> Option<bool> {
        // Nothing outlives the process to be copied.
        None
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// Each check and case on a fresh database.
conformance::suite_on!(Some(Memory::default()), cases: 64);
