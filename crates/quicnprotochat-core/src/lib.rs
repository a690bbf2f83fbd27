//! The cryptographic core of quicnprotochat: Ed25519 identities, MLS
//! (RFC 9420) KeyPackages and end-to-end encrypted groups, built on openmls.
//!
//! This crate does no I/O. Every operation takes an openmls provider, whose
//! storage holds all MLS state (KeyPackage private keys, group state); make
//! the storage persistent to keep groups across restarts. Messages go in and
//! out as TLS-encoded `MlsMessage` bytes that the transport treats as opaque
//! blobs.
//!
//! Layout:
//! - [`identity`] — [`IdentityKey`]'s parsing (users and devices are
//!   Ed25519 public keys), its signing [`IdentityKeypair`], and
//!   [`MemberKey`]: the user and device a leaf's credential names.
//! - [`device_lists`] — [`SignedDeviceList`]: which device keys belong to a user
//!   key, versioned and signed by it; [`DeviceDirectory`], through which
//!   group operations check that every leaf's device is listed.
//! - [`link`] — linking a new device: the link code, the device key it
//!   yields, and the sealed handoff of the user key.
//! - [`backup`] — [`KeyBackup`]: a device's groups and their state keys,
//!   sealed under a key derived from its identity, for the node to keep.
//! - [`content`] — [`Content`]: what an application message carries
//!   inside its encryption (text, or the group's name), by content type.
//! - [`ids`] — [`IdentityKey`], [`Seq`], [`GroupId`] and [`QueuedMessage`]:
//!   identifiers the node and clients share; [`GroupRef`], [`MessageKey`]
//!   and [`BackupRef`]: the hashes the node keys rows by.
//! - [`key_package`] — generating KeyPackages and validating uploaded ones.
//! - [`group`] — [`GroupMember`] (create, join, rejoin, add, send, receive) and [`classify`] for routing.
//! - [`framing`] — what a message's clear MLS header says (handshake or
//!   not, group and epoch), read without openmls, for the node's routing.
//! - [`public_view`] — [`PublicView`]: a group's public state as the node
//!   keeps it, checking Commits and proposals (RFC 9750).
//! - [`sealed`] — [`EpochKey`] and [`StateKey`]: exporter keys under which the
//!   node keeps group state sealed that only members may read.
//! - [`suite`] — [`Suite`]: the ciphersuites we speak (X25519 and the
//!   ML-KEM-768 + X25519 hybrid).
//! - [`error`] — [`CoreError`].

pub mod backup;
pub mod content;
pub mod device_lists;
pub mod error;
pub mod framing;
pub mod group;
pub mod identity;
pub mod ids;
pub mod key_package;
pub mod link;
pub mod public_view;
pub mod sealed;
pub mod suite;

use openmls_traits::types::Ciphersuite;

pub use backup::{BackupSecrets, KeyBackup};
pub use content::Content;
pub use device_lists::{
    DeviceDirectory, DeviceList, DeviceListError, Freshness, Listed, NoDeviceLists, SignedDeviceList,
    check_devices,
};
pub use error::CoreError;
pub use group::{AddedMembers, GroupMember, GroupState, Incoming, MessageKind, Received, Rejoined, classify};
pub use identity::{IdentityKey, IdentityKeypair, MemberKey};
pub use ids::{BackupRef, GroupId, GroupRef, MessageKey, QueuedMessage, Seq};
pub use key_package::{
    KeyPackageInfo, KeyPackageOptions, KeyPackageStock, fingerprint, generate_key_package,
    generate_key_package_with, inspect_key_package, key_package_identity, unwrap_key_package,
};
pub use public_view::PublicView;
pub use sealed::{EpochKey, StateKey};
pub use suite::Suite;

/// The default suite's MLS ciphersuite: X25519 HPKE, AES-128-GCM, SHA-256
/// and Ed25519 signatures (so identities are Ed25519 keys). See [`Suite`]
/// for all we speak.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
