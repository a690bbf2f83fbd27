//! Users' device lists as this client learns them: fetched from the node,
//! verified here, and compared with the highest version seen before, so a
//! node can withhold a list but never forge or roll one back unnoticed.
//!
//! A command asks the node once per user: [`Directory`] keeps what it
//! fetched for the rest of the command and answers core's device checks
//! from it; a check it cannot answer fails with
//! `CoreError::DeviceListsNeeded`, and [`with_lists`] fetches those lists
//! and runs the step again.

use std::cell::RefCell;
use std::collections::HashMap;

use quicnprotochat_core::{
    CoreError, DeviceDirectory, Freshness, IdentityKey, IdentityKeypair, Listed, SignedDeviceList,
};
use quicnprotochat_proto::outcome::DeviceListOutcome;
use quicnprotochat_proto::wire::MAX_DEVICE_LIST_FETCH;

use crate::error::ClientError;
use crate::nodes::{Nodes, Patience};
use crate::state::StateFile;

/// The device lists fetched in this command: `Some(list)`, or `None` for a
/// user without one (whose only device is the user key).
#[derive(Debug, Default)]
pub(crate) struct Directory {
    fetched: RefCell<HashMap<IdentityKey, Option<SignedDeviceList>>>,
}

impl DeviceDirectory for Directory {
    fn listed(&self, user: &IdentityKey, device: &IdentityKey) -> Listed {
        match self.fetched.borrow().get(user) {
            Some(Some(list)) if list.list().contains(device) => Listed::Yes,
            Some(_) => Listed::No,
            // Not asked in this command: a list remembered from before may
            // be out of date (a device linked or removed since).
            None => Listed::Unknown,
        }
    }
}

impl Directory {
    /// The devices of `user` as fetched in this command (the user key alone
    /// for a user without a list); `None` if not fetched yet.
    pub(crate) fn devices(&self, user: &IdentityKey) -> Option<Vec<IdentityKey>> {
        self.fetched.borrow().get(user).map(|list| match list {
            Some(list) => list.list().devices().to_vec(),
            None => vec![*user],
        })
    }

    /// The list of `user` as fetched in this command.
    pub(crate) fn list(&self, user: &IdentityKey) -> Option<Option<SignedDeviceList>> {
        self.fetched.borrow().get(user).cloned()
    }

    /// Records a list this client just signed and the node stored.
    pub(crate) fn record(&self, list: &SignedDeviceList) {
        self.fetched
            .borrow_mut()
            .insert(*list.list().user(), Some(list.clone()));
    }

    /// Fetches the lists of `users` not fetched yet in this command,
    /// checks each (signed by its user, not older than the one seen before,
    /// not withheld after one was seen) and remembers it.
    pub(crate) async fn fetch(
        &self,
        nodes: &Nodes,
        state: &StateFile,
        users: &[IdentityKey],
    ) -> Result<(), ClientError> {
        let mut wanted: Vec<IdentityKey> = users
            .iter()
            .filter(|user| !self.fetched.borrow().contains_key(user))
            .copied()
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        for chunk in wanted.chunks(MAX_DEVICE_LIST_FETCH) {
            let served = nodes.auth().fetch_device_lists(chunk).await?;
            let mut found: HashMap<IdentityKey, SignedDeviceList> = HashMap::new();
            for list in served {
                let user = *list.list().user();
                if !chunk.contains(&user) || found.contains_key(&user) {
                    return Err(ClientError::Protocol(format!(
                        "fetchDeviceLists served a list of {} unasked or twice",
                        user.short()
                    )));
                }
                found.insert(user, list);
            }
            for user in chunk {
                let list = match found.remove(user) {
                    Some(list) => {
                        accept(state, &list)?;
                        Some(list)
                    }
                    None => {
                        if let Some(seen) = state.device_list(user)? {
                            return Err(ClientError::DeviceList {
                                user: user.short(),
                                reason: format!(
                                    "the node serves none, but version {} was seen before: the node withholds it",
                                    seen.list().version()
                                ),
                            });
                        }
                        None
                    }
                };
                self.fetched.borrow_mut().insert(*user, list);
            }
        }
        Ok(())
    }
}

/// Checks a list served for its user and remembers it if newer.
fn accept(state: &StateFile, list: &SignedDeviceList) -> Result<(), ClientError> {
    let user = list.list().user().short();
    list.verify().map_err(|_| ClientError::DeviceList {
        user: user.clone(),
        reason: "not signed by that user key: the node serves a forged list".into(),
    })?;
    match state.remember_device_list(list)? {
        Freshness::Newer | Freshness::Same => Ok(()),
        Freshness::Stale => {
            let seen = state
                .device_list(list.list().user())?
                .map_or(0, |seen| seen.list().version());
            Err(ClientError::DeviceList {
                user,
                reason: format!(
                    "the node serves version {}, but version {seen} was seen before: an old or conflicting list",
                    list.list().version()
                ),
            })
        }
    }
}

/// Runs `step` with this command's directory; if it needs lists not
/// fetched yet, fetches them and runs it once more. `step` must change
/// nothing when it fails (core's operations fail before writing, and the
/// state file's methods roll back).
pub(crate) async fn with_lists<T>(
    nodes: &Nodes,
    state: &StateFile,
    mut step: impl FnMut(&Directory) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    match step(nodes.directory()) {
        Err(ClientError::Core(CoreError::DeviceListsNeeded(users))) => {
            nodes.directory().fetch(nodes, state, &users).await?;
            step(nodes.directory())
        }
        other => other,
    }
}

/// Signs `devices` as the user's next list (one version above the current
/// one) and stores it on the node, waiting out rate limits. Returns the
/// stored list, also recorded in the state file and the directory.
pub(crate) async fn publish_list(
    nodes: &Nodes,
    state: &StateFile,
    user: &IdentityKeypair,
    version: u64,
    devices: Vec<IdentityKey>,
) -> Result<SignedDeviceList, ClientError> {
    let list = quicnprotochat_core::DeviceList::new(user.public_key(), version, devices)
        .and_then(|list| list.sign(user))
        .map_err(|e| ClientError::Usage(e.to_string()))?;
    let patience = Patience::new();
    loop {
        match nodes.auth().upload_device_list(&list).await? {
            DeviceListOutcome::Stored => break,
            DeviceListOutcome::RateLimited(limited) => {
                if !patience.wait(&limited).await {
                    return Err(limited.into());
                }
            }
            DeviceListOutcome::Stale { current } => {
                return Err(ClientError::DeviceListRefused(format!(
                    "the node holds version {current}, at or above {version}: another device changed the list meanwhile; run the command again"
                )));
            }
            DeviceListOutcome::BadSignature => {
                return Err(ClientError::DeviceListRefused(
                    "the node says the signature is not the user key's".into(),
                ));
            }
            DeviceListOutcome::NotADevice => {
                return Err(ClientError::DeviceListRefused(
                    "this device is not in the user's current list on the node (it was removed)".into(),
                ));
            }
            DeviceListOutcome::RemovedDevice => {
                return Err(ClientError::DeviceListRefused(
                    "the list names a device removed earlier; removed devices stay removed (link it anew)"
                        .into(),
                ));
            }
            DeviceListOutcome::TooFar { current, max_step } => {
                return Err(ClientError::DeviceListRefused(format!(
                    "version {version} is more than {max_step} above the node's {current}; lists move forward one step at a time"
                )));
            }
        }
    }
    state.remember_device_list(&list)?;
    nodes.directory().record(&list);
    Ok(list)
}
