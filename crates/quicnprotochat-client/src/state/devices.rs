//! The user behind this device: the user's public key (when it is not the
//! device key itself), the highest verified device list seen of each user,
//! a new device's link key until its handoff arrives, and the leaf keys the
//! linking device made for it until they are replaced.

use quicnprotochat_core::link::{Handoff, LinkSecret};
use quicnprotochat_core::{DeviceList, Freshness, GroupId, IdentityKey, IdentityKeypair, SignedDeviceList};
use rusqlite::{OptionalExtension, params};

use super::{StateError, StateFile};

impl StateFile {
    /// The user key pair, which signs device lists: held by the user's
    /// first device alone, whose device key it is. `None` on a linked
    /// device, which holds only its own key (see `core::link`).
    pub fn user(&self) -> Result<Option<IdentityKeypair>, StateError> {
        if self.linked_to()?.is_some() {
            return Ok(None);
        }
        self.stored_identity()?
            .map(Some)
            .ok_or_else(|| self.no_identity())
    }

    /// The user this device was linked to; `None` on a first device (its
    /// key is its own user).
    pub(super) fn linked_to(&self) -> Result<Option<IdentityKey>, StateError> {
        let public: Option<Vec<u8>> = self
            .connection
            .query_row("SELECT public_key FROM user_key WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?;
        public
            .map(|bytes| {
                IdentityKey::try_from(bytes.as_slice())
                    .map_err(|_| StateError::BadIdentity(self.path.clone()))
            })
            .transpose()
    }

    /// The highest verified device list of `user` seen so far.
    pub fn device_list(&self, user: &IdentityKey) -> Result<Option<SignedDeviceList>, StateError> {
        let row: Option<(i64, Vec<u8>, Vec<u8>)> = self
            .connection
            .query_row(
                "SELECT version, devices, signature FROM device_lists WHERE user_key = ?1",
                params![user.as_bytes()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        let Some((version, devices, signature)) = row else {
            return Ok(None);
        };
        let damaged = || StateError::Damaged(format!("the stored device list of {}", user.short()));
        let devices = devices
            .chunks(32)
            .map(IdentityKey::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| damaged())?;
        let signature: [u8; 64] = signature.try_into().map_err(|_| damaged())?;
        // Stored as the bit pattern of the u64 version.
        let list = DeviceList::new(*user, version as u64, devices).map_err(|_| damaged())?;
        Ok(Some(SignedDeviceList::from_parts(list, signature)))
    }

    /// Remembers a verified list if it is newer than the one seen before;
    /// says how it compares (a [`Freshness::Stale`] one is not stored).
    pub fn remember_device_list(&self, signed: &SignedDeviceList) -> Result<Freshness, StateError> {
        let list = signed.list();
        let freshness = signed.freshness(self.device_list(list.user())?.as_ref());
        if freshness == Freshness::Newer {
            let devices: Vec<u8> = list.devices().iter().flat_map(|d| *d.as_bytes()).collect();
            self.connection.execute(
                "INSERT INTO device_lists (user_key, version, devices, signature) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_key) DO UPDATE SET version = excluded.version,
                     devices = excluded.devices, signature = excluded.signature",
                params![
                    list.user().as_bytes(),
                    list.version() as i64,
                    devices,
                    signed.signature().as_slice()
                ],
            )?;
        }
        Ok(freshness)
    }

    /// Makes this (new, empty) state file a device waiting to be linked,
    /// replacing an earlier pending link (its code stops working).
    pub fn start_link(&self, link: &LinkSecret) -> Result<(), StateError> {
        if self.stored_identity()?.is_some() {
            return Err(StateError::AlreadyRegistered(self.path.clone()));
        }
        self.connection.execute(
            "INSERT INTO pending_link (id, link_secret, expires_at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET link_secret = excluded.link_secret, expires_at = excluded.expires_at",
            params![
                link.link_key().secret_bytes().as_slice(),
                link.expires_at() as i64
            ],
        )?;
        Ok(())
    }

    /// The link key of a device waiting to be linked.
    pub fn pending_link(&self) -> Result<Option<LinkSecret>, StateError> {
        let row: Option<(Vec<u8>, i64)> = self
            .connection
            .query_row(
                "SELECT link_secret, expires_at FROM pending_link WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((secret, expires_at)) = row else {
            return Ok(None);
        };
        let secret = zeroize::Zeroizing::new(secret);
        let secret: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| StateError::Damaged("the stored link key".into()))?;
        Ok(Some(LinkSecret::from_secret(&secret, expires_at.max(0) as u64)))
    }

    /// Completes a link in one transaction: this file becomes `device` of
    /// the handoff's user, with its list and the KeyPackages made for it.
    pub fn complete_link(&self, handoff: &Handoff, device: &IdentityKeypair) -> Result<(), StateError> {
        self.atomically(|| {
            self.store_device(device)?;
            self.remember_device_list(&handoff.list)?;
            handoff.key_packages.install(&self.provider())?;
            for key in handoff.key_packages.leaf_keys() {
                self.connection.execute(
                    "INSERT OR IGNORE INTO handed_leaf_keys (encryption_key) VALUES (?1)",
                    params![key],
                )?;
            }
            self.connection.execute("DELETE FROM pending_link", [])?;
            Ok::<_, StateError>(())
        })
    }

    /// Notes that we joined `group_id` with leaf key `key`; true if the key
    /// is one the device that linked us made, so the leaf must be updated.
    pub fn note_joined_leaf(&self, group_id: &GroupId, key: &[u8]) -> Result<bool, StateError> {
        let changed = self.connection.execute(
            "UPDATE handed_leaf_keys SET group_id = ?1 WHERE encryption_key = ?2",
            params![group_id.as_bytes(), key],
        )?;
        Ok(changed > 0)
    }

    /// The groups whose leaf still has a key the linking device made.
    pub fn handed_leaves(&self) -> Result<Vec<GroupId>, StateError> {
        let mut select = self
            .connection
            .prepare("SELECT group_id FROM handed_leaf_keys WHERE group_id IS NOT NULL ORDER BY group_id")?;
        let rows = select.query_map([], |row| row.get::<_, Vec<u8>>(0))?;
        // Only groups we joined are noted, and a group's id is a GroupId.
        Ok(rows
            .filter_map(|row| row.map(GroupId::new).transpose())
            .collect::<Result<_, _>>()?)
    }

    /// Forgets the handed-over leaf key of `group_id` (updated, or the
    /// group is gone).
    pub fn forget_handed_leaf(&self, group_id: &GroupId) -> Result<(), StateError> {
        self.connection.execute(
            "DELETE FROM handed_leaf_keys WHERE group_id = ?1",
            params![group_id.as_bytes()],
        )?;
        Ok(())
    }
}
