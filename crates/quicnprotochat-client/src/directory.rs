//! Users' device lists as this client learns them: fetched from the node,
//! verified here, and compared with the highest version seen before, so a
//! node can withhold a list but never forge or roll one back unnoticed.
//!
//! A command asks the node once per user: [`Directory`] keeps what it
//! fetched for the rest of the command and answers core's device checks
//! from it; a check it cannot answer fails with
//! `CoreError::DeviceListsNeeded`, and `Nodes::with_lists` fetches those
//! lists and runs the step again.

use std::cell::RefCell;
use std::collections::HashMap;

use quicnprotochat_core::{DeviceDirectory, Freshness, IdentityKey, Listed, SignedDeviceList};
use quicnprotochat_proto::wire::MAX_DEVICE_LIST_FETCH;

use crate::error::ClientError;
use crate::node_client::NodeClient;
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
        auth: &NodeClient,
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
            let served = auth.fetch_device_lists(chunk).await?;
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
