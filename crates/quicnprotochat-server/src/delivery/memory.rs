//! [`Storage`] in memory: the reference of the storage contract, used by the
//! rules' unit tests so they run with no database.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;

use quicnprotochat_core::{
    BackupRef, GroupRef, IdentityKey, KeyPackageStock, MessageKey, Seq, SignedDeviceList, Suite,
};
use quicnprotochat_proto::wire::ValidKeyPackage;

use super::storage::{KeyPackageRow, QueueUsage, Storage, Totals, WelcomeTree};

/// Everything a node stores, in maps. Cloning it is a snapshot: see
/// [`MemoryStorage::command`].
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    key_packages: BTreeMap<i64, (IdentityKey, ValidKeyPackage)>,
    next_key_package: i64,
    message_ids: HashMap<MessageKey, i64>,
    queues: HashMap<IdentityKey, BTreeMap<Seq, (Vec<u8>, i64)>>,
    /// One counter for all queues, like SQLite's AUTOINCREMENT: numbers are
    /// increasing per queue and never reused.
    last_seq: u64,
    groups: HashMap<GroupRef, u64>,
    /// The fingerprint of each group's current state.
    fingerprints: HashMap<GroupRef, [u8; 32]>,
    views: HashMap<GroupRef, (Vec<u8>, i64)>,
    /// The proposals kept for each group: (epoch, item), in order.
    proposals: HashMap<GroupRef, Vec<(u64, Vec<u8>)>>,
    welcome_trees: HashMap<(GroupRef, u64), (WelcomeTree, i64)>,
    device_lists: HashMap<IdentityKey, SignedDeviceList>,
    removed_devices: std::collections::HashSet<(IdentityKey, IdentityKey)>,
    /// Each device's sealed key backup and when it was stored.
    key_backups: HashMap<BackupRef, (Vec<u8>, i64)>,
}

impl MemoryStorage {
    /// Keeps `tree` in clear for `joiners`, as nodes before protocol 8 kept
    /// a Welcome's tree (a database upgraded since may still hold such).
    #[cfg(test)]
    pub fn put_plain_welcome_tree(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        tree: &[u8],
        joiners: &[IdentityKey],
        now: i64,
    ) {
        let kept = WelcomeTree {
            tree: tree.to_vec(),
            joiners: joiners.to_vec(),
        };
        self.welcome_trees.insert((*group, epoch), (kept, now));
    }

    /// Runs one command as in a transaction: whatever it wrote is undone if
    /// it refuses.
    pub fn command<T, R>(
        &mut self,
        work: impl FnOnce(&mut MemoryStorage) -> Result<Result<T, R>, Infallible>,
    ) -> Result<T, R> {
        let before = self.clone();
        let Ok(outcome) = work(self);
        if outcome.is_err() {
            *self = before;
        }
        outcome
    }

    /// Runs one command that cannot refuse.
    pub fn run<T>(&mut self, work: impl FnOnce(&mut MemoryStorage) -> Result<T, Infallible>) -> T {
        let Ok(value) = work(self);
        value
    }
}

impl Storage for MemoryStorage {
    type Error = Infallible;

    fn insert_key_package(
        &mut self,
        identity: &IdentityKey,
        package: &ValidKeyPackage,
        _now: i64,
    ) -> Result<(), Infallible> {
        self.next_key_package += 1;
        self.key_packages
            .insert(self.next_key_package, (*identity, package.clone()));
        Ok(())
    }

    fn has_key_package(
        &mut self,
        identity: &IdentityKey,
        fingerprint: &[u8; 32],
    ) -> Result<bool, Infallible> {
        Ok(self
            .key_packages
            .values()
            .any(|(owner, package)| owner == identity && package.fingerprint == *fingerprint))
    }

    fn oldest_key_package(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<Option<(KeyPackageRow, Vec<u8>)>, Infallible> {
        Ok(self
            .key_packages
            .iter()
            .find(|(_, (owner, package))| {
                serves(owner, package, identity, suite, now) && !package.last_resort
            })
            .map(|(row, (_, package))| (KeyPackageRow(*row), package.bytes.clone())))
    }

    fn delete_key_package(&mut self, row: KeyPackageRow) -> Result<(), Infallible> {
        self.key_packages.remove(&row.0);
        Ok(())
    }

    fn newest_last_resort(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self
            .key_packages
            .values()
            .rev()
            .find(|(owner, package)| serves(owner, package, identity, suite, now) && package.last_resort)
            .map(|(_, package)| package.bytes.clone()))
    }

    fn count_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<KeyPackageStock, Infallible> {
        let mine = || {
            self.key_packages
                .values()
                .filter(move |(owner, package)| serves(owner, package, identity, suite, now))
        };
        let ordinary = mine().filter(|(_, package)| !package.last_resort).count();
        let last_resort = mine().any(|(_, package)| package.last_resort);
        Ok(KeyPackageStock {
            count: u32::try_from(ordinary).unwrap_or(u32::MAX),
            has_last_resort: last_resort,
        })
    }

    fn stored_key_packages(
        &mut self,
        identity: &IdentityKey,
        suite: Suite,
        now: i64,
    ) -> Result<u64, Infallible> {
        Ok(self
            .key_packages
            .values()
            .filter(|(owner, package)| serves(owner, package, identity, suite, now))
            .count() as u64)
    }

    fn message_id_used(&mut self, key: &MessageKey) -> Result<bool, Infallible> {
        Ok(self.message_ids.contains_key(key))
    }

    fn claim_message_id(&mut self, key: &MessageKey, now: i64) -> Result<bool, Infallible> {
        if self.message_ids.contains_key(key) {
            return Ok(false);
        }
        self.message_ids.insert(*key, now);
        Ok(true)
    }

    fn queue_usage(&mut self, recipient: &IdentityKey) -> Result<QueueUsage, Infallible> {
        Ok(self
            .queues
            .get(recipient)
            .map_or(QueueUsage::default(), |queue| QueueUsage {
                messages: queue.len() as u64,
                bytes: queue.values().map(|(payload, _)| payload.len() as u64).sum(),
            }))
    }

    fn append(&mut self, recipients: &[IdentityKey], payload: &[u8], now: i64) -> Result<(), Infallible> {
        for recipient in recipients {
            self.last_seq += 1;
            self.queues
                .entry(*recipient)
                .or_default()
                .insert(Seq::new(self.last_seq), (payload.to_vec(), now));
        }
        Ok(())
    }

    fn scan_queue(
        &mut self,
        recipient: &IdentityKey,
        after: Seq,
        visit: &mut dyn FnMut(Seq, Vec<u8>) -> bool,
    ) -> Result<(), Infallible> {
        if let Some(queue) = self.queues.get(recipient) {
            for (seq, (payload, _)) in queue.range(Seq::new(after.get().saturating_add(1))..) {
                if !visit(*seq, payload.clone()) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn delete_through(&mut self, recipient: &IdentityKey, up_to: Seq) -> Result<usize, Infallible> {
        let Some(queue) = self.queues.get_mut(recipient) else {
            return Ok(0);
        };
        let kept = queue.split_off(&Seq::new(up_to.get().saturating_add(1)));
        let deleted = queue.len();
        *queue = kept;
        Ok(deleted)
    }

    fn group_epoch(&mut self, group: &GroupRef) -> Result<Option<u64>, Infallible> {
        Ok(self.groups.get(group).copied())
    }

    fn set_group_epoch(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        fingerprint: &[u8; 32],
    ) -> Result<(), Infallible> {
        self.groups.insert(*group, epoch);
        self.fingerprints.insert(*group, *fingerprint);
        Ok(())
    }

    fn group_fingerprint(&mut self, group: &GroupRef) -> Result<Option<[u8; 32]>, Infallible> {
        Ok(self.fingerprints.get(group).copied())
    }

    fn group_view(&mut self, group: &GroupRef) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self.views.get(group).map(|(view, _)| view.clone()))
    }

    fn set_group_view(&mut self, group: &GroupRef, view: &[u8], now: i64) -> Result<(), Infallible> {
        self.views.insert(*group, (view.to_vec(), now));
        self.proposals.remove(group);
        Ok(())
    }

    fn group_proposals(&mut self, group: &GroupRef, epoch: u64) -> Result<Vec<Vec<u8>>, Infallible> {
        Ok(self
            .proposals
            .get(group)
            .into_iter()
            .flatten()
            .filter(|(kept, _)| *kept == epoch)
            .map(|(_, item)| item.clone())
            .collect())
    }

    fn add_group_proposal(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        item: &[u8],
        now: i64,
    ) -> Result<(), Infallible> {
        self.proposals
            .entry(*group)
            .or_default()
            .push((epoch, item.to_vec()));
        if let Some((_, changed_at)) = self.views.get_mut(group) {
            *changed_at = now;
        }
        Ok(())
    }

    fn purge_idle_groups(&mut self, before: i64) -> Result<usize, Infallible> {
        let count = self.views.len();
        self.views.retain(|_, (_, changed_at)| *changed_at >= before);
        let views = &self.views;
        self.proposals.retain(|group, _| views.contains_key(group));
        Ok(count - self.views.len())
    }

    fn put_welcome_tree(
        &mut self,
        group: &GroupRef,
        epoch: u64,
        sealed: &[u8],
        keep: usize,
        now: i64,
    ) -> Result<(), Infallible> {
        let kept = WelcomeTree {
            tree: sealed.to_vec(),
            joiners: Vec::new(),
        };
        self.welcome_trees.insert((*group, epoch), (kept, now));
        let mut epochs: Vec<u64> = self
            .welcome_trees
            .keys()
            .filter(|(kept_group, _)| kept_group == group)
            .map(|(_, epoch)| *epoch)
            .collect();
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        for old in epochs.into_iter().skip(keep) {
            self.welcome_trees.remove(&(*group, old));
        }
        Ok(())
    }

    fn welcome_tree(&mut self, group: &GroupRef, epoch: u64) -> Result<Option<WelcomeTree>, Infallible> {
        Ok(self
            .welcome_trees
            .get(&(*group, epoch))
            .map(|(kept, _)| kept.clone()))
    }

    fn purge(&mut self, older_than: i64, now: i64) -> Result<usize, Infallible> {
        self.welcome_trees
            .retain(|_, (_, created_at)| *created_at >= older_than);
        let mut purged = 0;
        for queue in self.queues.values_mut() {
            let before = queue.len();
            queue.retain(|_, (_, enqueued_at)| *enqueued_at >= older_than);
            purged += before - queue.len();
        }
        self.message_ids.retain(|_, created_at| *created_at >= older_than);
        self.key_packages
            .retain(|_, (_, package)| unexpired(package, now));
        Ok(purged)
    }

    fn device_list(&mut self, user: &IdentityKey) -> Result<Option<SignedDeviceList>, Infallible> {
        Ok(self.device_lists.get(user).cloned())
    }

    fn device_lists(&mut self, users: &[IdentityKey]) -> Result<Vec<SignedDeviceList>, Infallible> {
        Ok(users
            .iter()
            .filter_map(|user| self.device_lists.get(user).cloned())
            .collect())
    }

    fn put_device_list(&mut self, list: &SignedDeviceList, _now: i64) -> Result<(), Infallible> {
        self.device_lists.insert(*list.list().user(), list.clone());
        Ok(())
    }

    fn is_removed_device(&mut self, user: &IdentityKey, device: &IdentityKey) -> Result<bool, Infallible> {
        Ok(self.removed_devices.contains(&(*user, *device)))
    }

    fn remove_devices(
        &mut self,
        user: &IdentityKey,
        devices: &[IdentityKey],
        _now: i64,
    ) -> Result<(), Infallible> {
        self.removed_devices
            .extend(devices.iter().map(|device| (*user, *device)));
        Ok(())
    }

    fn key_backup(&mut self, backup: &BackupRef) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self.key_backups.get(backup).map(|(sealed, _)| sealed.clone()))
    }

    fn put_key_backup(&mut self, backup: &BackupRef, sealed: &[u8], now: i64) -> Result<(), Infallible> {
        self.key_backups.insert(*backup, (sealed.to_vec(), now));
        Ok(())
    }

    fn knows(&mut self, identity: &IdentityKey) -> Result<bool, Infallible> {
        Ok(self.key_packages.values().any(|(owner, _)| owner == identity)
            || self.queues.get(identity).is_some_and(|queue| !queue.is_empty())
            || self.device_lists.contains_key(identity))
    }

    fn totals(&mut self) -> Result<Totals, Infallible> {
        Ok(Totals {
            messages_queued: self.queues.values().map(|queue| queue.len() as u64).sum(),
            key_packages_stored: self.key_packages.len() as u64,
        })
    }
}

/// Whether `package`, stored for `owner`, is one of `identity` in `suite`
/// that has not expired at `now`.
fn serves(
    owner: &IdentityKey,
    package: &ValidKeyPackage,
    identity: &IdentityKey,
    suite: Suite,
    now: i64,
) -> bool {
    owner == identity && package.suite == suite && unexpired(package, now)
}

fn unexpired(package: &ValidKeyPackage, now: i64) -> bool {
    i64::try_from(package.expires_at).unwrap_or(i64::MAX) > now
}
