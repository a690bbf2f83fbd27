//! The Delivery Service's rules, in plain Rust apart from any database and
//! any I/O.
//!
//! # Layout
//! - [`rules`] — one function per command (enqueue, publish a Commit, take
//!   a KeyPackage, store or read device lists, read, ack, drain, purge) over
//!   a [`Storage`].
//! - [`key_backups`] — storing and reading a device's sealed key backup,
//!   kept under a hash of the secret the device presents.
//! - [`storage`] — the [`Storage`] trait: one transaction's reads and writes.
//! - [`memory`] — [`MemoryStorage`], the in-memory reference implementation
//!   the rules are unit-tested against.

pub mod key_backups;
pub mod memory;
pub mod rules;
pub mod storage;

pub use key_backups::{BackupTooLarge, MAX_KEY_BACKUP_BYTES};
pub use memory::MemoryStorage;
pub use rules::{
    CommitRefusal, DEFAULT_MAX_KEY_PACKAGES, DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_QUEUE_DEPTH,
    DeviceListRefusal, FETCH_BUDGET_BYTES, FETCH_MAX_MESSAGES, Limits, NotAMember, SendRefusal,
    TooManyKeyPackages,
};
pub use storage::{
    DamagedDeviceList, DeviceListColumns, KeyPackageRow, QueueUsage, Storage, Totals, WelcomeTree,
};

#[cfg(test)]
mod tests;
