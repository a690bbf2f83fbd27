//! `link` and `devices add | list | remove`: a new device waiting to be
//! linked, and the user's device list changed from one of its devices (the
//! new device completes its link in `link.rs`, on its first `recv`). The
//! protocol (codes, key derivation, handoff) is `quicnprotochat_core::link`;
//! here it meets the node and the groups.

use std::time::Duration;

use quicnprotochat_core::link::{DeviceKeyPackages, Handoff, LinkCode, LinkSecret, derive_device};
use quicnprotochat_core::{GroupId, GroupMember, IdentityKey, IdentityKeypair, SignedDeviceList, Suite};
use quicnprotochat_proto::outcome::DeviceListOutcome;
use serde_json::json;

use crate::changes::change_group;
use crate::changes::remove_from_group;
use crate::cli::{ConnectionArgs, DevicesAction};
use crate::connections::Patience;
use crate::connections::{Nodes, envelope};
use crate::error::ClientError;
use crate::naming::{group_name, others, parse_key};
use crate::output::counted;
use crate::output::{self, print_json};
use crate::publish::Change;
use crate::state::{StateAccess, StateFile, unix_now};

/// `link`: makes this new state file a device waiting to be linked and
/// prints its link code (valid for `valid_for`).
pub(crate) fn link(access: &StateAccess, valid_for: Duration) -> Result<(), ClientError> {
    let state = StateFile::open_or_create(access)?;
    let expires_at = (unix_now().max(0) as u64).saturating_add(valid_for.as_secs());
    let secret = LinkSecret::generate(expires_at);
    state.start_link(&secret)?;
    let code = secret.code()?.encode();
    if output::json() {
        print_json(&json!({ "code": code }))?;
    } else {
        say!("{code}");
    }
    note!(
        "on one of your devices run: devices add --state FILE CODE (the code above, valid for {}), then `recv` here",
        humantime::format_duration(valid_for)
    );
    Ok(())
}

/// `devices add | list | remove`.
pub(crate) async fn devices(
    args: &ConnectionArgs,
    access: &StateAccess,
    action: DevicesAction,
) -> Result<(), ClientError> {
    match action {
        DevicesAction::Add { code } => add(args, access, &code).await,
        DevicesAction::List => list(args, access).await,
        DevicesAction::Remove { device_key } => remove(args, access, &device_key).await,
    }
}

/// The user's current devices and list version on the node (version 0 and
/// this device alone for a user who never published a list).
async fn current_devices(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<(u64, Vec<IdentityKey>), ClientError> {
    let user = identity.user();
    nodes.fetch_device_lists(state, &[user]).await?;
    Ok(match nodes.directory().list(&user).flatten() {
        Some(list) => (list.list().version(), list.list().devices().to_vec()),
        None => (0, vec![identity.public_key()]),
    })
}

/// The groups this device is an active member of and has not asked to
/// leave, with their ciphersuites.
fn active_groups(state: &StateFile) -> Result<Vec<(GroupId, Suite)>, ClientError> {
    let mut groups = Vec::new();
    for record in state.groups()? {
        if record.left_at.is_some() {
            continue;
        }
        if let Some(group) = GroupMember::load(&state.provider(), &record.group_id)?
            && group.is_active()
        {
            groups.push((record.group_id, group.suite()));
        }
    }
    Ok(groups)
}

/// The user key pair, or why this device cannot `what` (a linked device
/// does not hold it).
fn user_key(
    state: &StateFile,
    identity: &IdentityKeypair,
    what: &str,
) -> Result<IdentityKeypair, ClientError> {
    state.user()?.ok_or_else(|| {
        ClientError::Usage(format!(
            "only your first device, which holds your user key {}, can {what}; this device was linked to it: run the command there",
            identity.user()
        ))
    })
}

/// `devices add CODE`: signs the new device into the user's list, hands it
/// its key (sealed to the code) and adds it to every group.
async fn add(args: &ConnectionArgs, access: &StateAccess, code: &str) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let user = user_key(&state, &identity, "link devices")?;
    let code = LinkCode::parse(code)?;
    code.check_fresh(unix_now().max(0) as u64)?;
    let device = derive_device(&user, &code.link_key);
    let new = device.public_key();
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let (version, mut devices) = current_devices(&nodes, &state, &identity).await?;
    if devices.contains(&new) {
        return Err(ClientError::Usage(format!(
            "this link code was already used: device {new} is one of your devices; run `link` on the new device for a fresh code"
        )));
    }
    devices.push(new);
    let groups = active_groups(&state)?;
    // One KeyPackage per group Add, made before anything is published so
    // the handoff can carry their private keys.
    let suites: Vec<Suite> = groups.iter().map(|(_, suite)| *suite).collect();
    let packages = DeviceKeyPackages::generate(&device, &suites)?;
    let public = packages.public()?;
    let list = publish_list(&nodes, &state, &user, version + 1, devices).await?;
    let handoff = Handoff {
        device_secret: device.secret_bytes(),
        list,
        key_packages: packages,
    }
    .seal(&code)?;
    // The handoff waits in the link key's queue; the new device reads it on
    // its next `recv`, before the Welcomes in its own queue.
    nodes
        .deliver(&[envelope(vec![code.link_key], handoff)], None)
        .await?;
    note!("device {} is now one of your devices", new.short());

    let me = identity.public_key();
    let mut failed = Vec::new();
    for ((group_id, _), package) in groups.iter().zip(public) {
        let added = change_group(&nodes, &state, &identity, group_id, |group| {
            let commit_to = others(group, &me);
            let added = group.add_members(
                &state.provider(),
                &identity,
                std::slice::from_ref(&package),
                nodes.directory(),
            )?;
            Ok(Change {
                commit: added.commit,
                commit_to,
                welcome: Some((added.welcome, vec![new])),
            })
        })
        .await;
        match added {
            Ok(group) => note!(
                "added it to {}: epoch {}, {}",
                group_name(&state, group_id),
                group.epoch(),
                counted(group.user_count(), "member", "members")
            ),
            // The device is linked whatever happens to one group; say
            // which groups it is missing, and go on with the others.
            Err(e) => {
                note!(
                    "warning: could not add it to {}: {e}",
                    group_name(&state, group_id)
                );
                failed.push(group_name(&state, group_id));
            }
        }
    }
    nodes.close().await;
    if failed.is_empty() {
        note!(
            "the new device joins {} group(s) on its next `recv`",
            groups.len()
        );
        Ok(())
    } else {
        Err(ClientError::Usage(format!(
            "the device is linked, but was not added to: {}; invite it there with `invite --peer-key {}`",
            failed.join(", "),
            identity.user()
        )))
    }
}

/// `devices list`: the user's devices as the node serves them, verified.
async fn list(args: &ConnectionArgs, access: &StateAccess) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let (_, devices) = current_devices(&nodes, &state, &identity).await?;
    nodes.close().await;
    if output::json() {
        let devices: Vec<_> = devices
            .iter()
            .map(|device| json!({ "device_key": device.to_string(), "this_device": *device == identity.public_key() }))
            .collect();
        return print_json(&json!({ "user_key": identity.user().to_string(), "devices": devices }));
    }
    for device in devices {
        if device == identity.public_key() {
            say!("{device} (this device)");
        } else {
            say!("{device}");
        }
    }
    Ok(())
}

/// `devices remove KEY`: a new list without the device, then its leaves
/// removed from every group. Runs on the first device, which stays.
async fn remove(args: &ConnectionArgs, access: &StateAccess, device_key: &str) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    let user = user_key(&state, &identity, "remove devices")?;
    let gone = parse_key("device key", device_key)?;
    if gone == user.public_key() {
        return Err(ClientError::Usage(
            "this device holds your user key and stays one of your devices; remove the others from here"
                .into(),
        ));
    }
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let (version, devices) = current_devices(&nodes, &state, &identity).await?;
    if !devices.contains(&gone) {
        return Err(ClientError::Usage(format!(
            "{gone} is not one of your devices; `devices list` shows them"
        )));
    }
    let rest: Vec<IdentityKey> = devices.into_iter().filter(|device| *device != gone).collect();
    if rest.is_empty() {
        return Err(ClientError::Usage("you cannot remove your only device".into()));
    }
    publish_list(&nodes, &state, &user, version + 1, rest).await?;
    note!("device {} is no longer one of your devices", gone.short());

    for (group_id, _) in active_groups(&state)? {
        let Some(group) = GroupMember::load(&state.provider(), &group_id)? else {
            continue;
        };
        if !group.members().contains(&gone) {
            continue;
        }
        let group = remove_from_group(&nodes, &state, &identity, &group_id, &[gone]).await?;
        note!(
            "removed it from {}: epoch {}, {}",
            group_name(&state, &group_id),
            group.epoch(),
            counted(group.user_count(), "member", "members")
        );
    }
    nodes.close().await;
    Ok(())
}

/// Signs `devices` as the user's next list (one version above the current
/// one) and stores it on the node, waiting out rate limits. Returns the
/// stored list, also recorded in the state file and the directory.
async fn publish_list(
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
