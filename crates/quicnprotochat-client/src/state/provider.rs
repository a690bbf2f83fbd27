//! The OpenMLS provider of a state file: RustCrypto for cryptography and
//! randomness, `openmls_sqlite_storage` on the state file's connection for
//! every piece of MLS state (group secrets, HPKE init keys of KeyPackages,
//! pending commits). Sharing the connection means MLS state and our own
//! tables commit in the same transactions.

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::Connection;

/// Serialises OpenMLS' stored values as JSON: self-describing, so a state
/// file can be inspected and migrated.
#[derive(Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// The storage type of a state file.
pub type StateStorage<'a> = SqliteStorageProvider<JsonCodec, &'a Connection>;

/// An OpenMLS provider over an open state file.
pub struct StateProvider<'a> {
    crypto: RustCrypto,
    storage: StateStorage<'a>,
}

impl<'a> StateProvider<'a> {
    /// A provider storing into `connection`, whose OpenMLS tables must
    /// already be migrated.
    pub fn new(connection: &'a Connection) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(connection),
        }
    }
}

impl<'a> OpenMlsProvider for StateProvider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = StateStorage<'a>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}
