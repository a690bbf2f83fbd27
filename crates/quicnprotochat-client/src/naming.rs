//! How commands name things and find them: identity keys and contacts given
//! on the command line, groups by the name people gave them, members as
//! shown to people, and who else is in a group.

use std::collections::BTreeSet;

use quicnprotochat_core::{Content, GroupId, GroupMember, IdentityKey};

use serde_json::json;

use crate::cli::PeerArgs;
use crate::error::ClientError;
use crate::output::{self, Event, Person, print_json, unsafe_to_show};
use crate::state::{Invitation, StateError, StateFile};

/// Parses an identity key given on the command line as `flag`.
pub(crate) fn parse_key(flag: &str, text: &str) -> Result<IdentityKey, ClientError> {
    text.trim()
        .parse()
        .map_err(|e| ClientError::Usage(format!("{flag}: {e}")))
}

/// The keys named by `--peer-key` and `--peer` (contact names), in order,
/// without duplicates.
pub(crate) fn resolve_peers(state: &StateFile, peers: &PeerArgs) -> Result<Vec<IdentityKey>, ClientError> {
    let mut keys = Vec::new();
    for text in &peers.keys {
        keys.push(parse_key("--peer-key", text)?);
    }
    for name in &peers.names {
        let key = state.contact_key(name)?.ok_or_else(|| {
            ClientError::Usage(format!(
                "--peer {name}: no such contact; add one with `contacts add {name} HEX`"
            ))
        })?;
        keys.push(key);
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|key| seen.insert(*key));
    Ok(keys)
}

/// How a group is shown to people: the name it has in the state file (see
/// [`StateFile::name_group`]), else as its id shows it ([`id_label`]).
///
/// A display label only: if the state file cannot be read here, the id is
/// shown, and the next command that needs the file reports why.
pub(crate) fn group_name(state: &StateFile, group_id: impl AsRef<[u8]>) -> String {
    let group_id = group_id.as_ref();
    match state.group_name(group_id) {
        Ok(Some(name)) => name,
        _ => id_label(group_id),
    }
}

/// Shows a group id: as hex, or as text when it is printable UTF-8. Groups
/// made before group ids were random had ids `NAME#` plus 16 hex digits,
/// shown as NAME.
pub(crate) fn id_label(group_id: &[u8]) -> String {
    match std::str::from_utf8(group_id) {
        Ok(text) if !text.is_empty() && !text.chars().any(unsafe_to_show) => match text.rsplit_once('#') {
            Some((name, suffix))
                if !name.is_empty()
                    && suffix.len() == 16
                    && suffix.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                name.to_owned()
            }
            _ => text.to_owned(),
        },
        _ => hex::encode(group_id),
    }
}

/// Whether `name` may name a group: not empty, at most
/// [`Content::MAX_NAME_LEN`] bytes, and nothing that would reorder or hide
/// text when shown. Checked for our own names and for names members send.
pub(crate) fn valid_group_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= Content::MAX_NAME_LEN && !name.chars().any(unsafe_to_show)
}

/// A fresh group id: 16 random bytes, so that it says nothing about the
/// group (its name stays with the members) and nobody can guess it to
/// collide with or squat on it at the node.
pub(crate) fn new_group_id() -> GroupId {
    GroupId::new(rand::random::<[u8; 16]>().to_vec()).expect("16 bytes is a valid group id")
}

/// The group id as a node takes it: 1 to [`GroupId::MAX_LEN`] bytes. A
/// group joined from someone else's Welcome may have any MLS group id.
pub(crate) fn node_group_id(group_id: &[u8]) -> Result<GroupId, ClientError> {
    GroupId::new(group_id.to_vec()).ok_or_else(|| {
        ClientError::Usage(format!(
            "the id of group {} is {} bytes long; a node takes 1 to {} bytes, so changes to this group cannot be published",
            id_label(group_id),
            group_id.len(),
            GroupId::MAX_LEN
        ))
    })
}

/// The group `rejoin --group-id` names: one the state file still lists (by
/// name or full id), else the full id itself, taken as text, or as hex when
/// that is how [`id_label`] shows it (an id that is not printable text).
pub(crate) fn rejoin_group_id(state: &StateFile, text: &str) -> Result<GroupId, ClientError> {
    if text.is_empty() {
        return Err(ClientError::Usage("--group-id must not be empty".into()));
    }
    match find_group(state, text) {
        Ok(id) => return Ok(id),
        Err(ClientError::NoGroup(_)) => {}
        Err(e) => return Err(e),
    }
    let id = match hex::decode(text) {
        Ok(bytes) if id_label(&bytes).eq_ignore_ascii_case(text) => bytes,
        _ => text.as_bytes().to_vec(),
    };
    node_group_id(&id)
}

/// Shows a member as its contact name, or the first 16 hex characters of
/// its key.
pub(crate) fn member_name(state: &StateFile, key: &IdentityKey) -> Result<String, StateError> {
    Ok(state.contact_name(key)?.unwrap_or_else(|| key.short()))
}

/// Resolves `--group-id` (or the current group) and loads it.
pub(crate) fn load_group(
    state: &StateFile,
    group_id: Option<&str>,
) -> Result<(GroupId, GroupMember), ClientError> {
    let group_id = match group_id {
        Some(name) => find_group(state, name)?,
        None => state.current_group()?.ok_or_else(|| {
            ClientError::NoGroup(
                "no group yet; run `create-group --group-id NAME`, or `join` a group you were invited to"
                    .into(),
            )
        })?,
    };
    let group = GroupMember::load(&state.provider(), &group_id)?.ok_or_else(|| {
        ClientError::NoGroup(format!(
            "{} is not one of your groups; `groups --state {}` lists them",
            group_name(state, &group_id),
            state.path().display()
        ))
    })?;
    Ok((group_id, group))
}

/// As [`load_group`], for a command that acts as a member (sends, changes
/// the group): a group this client was removed from is its own failure,
/// not an MLS one.
pub(crate) fn load_group_as_member(
    state: &StateFile,
    group_id: Option<&str>,
) -> Result<(GroupId, GroupMember), ClientError> {
    let (group_id, group) = load_group(state, group_id)?;
    if !group.is_active() {
        return Err(ClientError::NotAMember {
            group: group_name(state, &group_id),
        });
    }
    Ok((group_id, group))
}

/// The id of the group called `name` (or with exactly that id).
fn find_group(state: &StateFile, name: &str) -> Result<GroupId, ClientError> {
    let matching: Vec<GroupId> = state
        .groups()?
        .into_iter()
        // By its name, its id in hex (as `--json` prints it), or an id
        // made before ids were random, as text or as it was shown.
        .filter(|record| {
            let id = &record.group_id;
            record.name.as_deref() == Some(name)
                || hex::encode(id) == name.to_ascii_lowercase()
                || (record.name.is_none()
                    && (id.as_bytes() == name.as_bytes() || id_label(id.as_bytes()) == name))
        })
        .map(|record| record.group_id)
        .collect();
    match matching.as_slice() {
        [id] => Ok(id.clone()),
        [] => Err(ClientError::NoGroup(format!(
            "{name} is not one of your groups; `groups --state {}` lists them",
            state.path().display()
        ))),
        several => Err(ClientError::Usage(format!(
            "several of your groups are called {name}; pass the id in hex as --group-id: {}",
            several.iter().map(hex::encode).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The devices in `group` of the given keys: every device of a user key,
/// or the device a device key names. A key with none is an error naming it.
pub(crate) fn devices_of(group: &GroupMember, keys: &[IdentityKey]) -> Result<Vec<IdentityKey>, ClientError> {
    let members = group.member_keys();
    let mut devices = Vec::new();
    for key in keys {
        let before = devices.len();
        for member in members.iter().filter(|m| m.user == *key || m.device == *key) {
            if !devices.contains(&member.device) {
                devices.push(member.device);
            }
        }
        if devices.len() == before {
            return Err(ClientError::Core(quicnprotochat_core::CoreError::UnknownMember(
                key.to_string(),
            )));
        }
    }
    Ok(devices)
}

/// Every member device of `group` but this one (our other devices too).
pub(crate) fn others(group: &GroupMember, me: &IdentityKey) -> Vec<IdentityKey> {
    group
        .members()
        .into_iter()
        .filter(|member| member != me)
        .collect()
}

/// The users with a device in `group`.
pub(crate) fn users(group: &GroupMember) -> BTreeSet<IdentityKey> {
    group
        .member_keys()
        .into_iter()
        .map(|member| member.user)
        .collect()
}

/// The `changed` event of `group` (`group_id`) now at a new epoch: the
/// users who joined and left since it had the users `before`.
pub(crate) fn changed_event(
    state: &StateFile,
    group_id: &GroupId,
    before: &BTreeSet<IdentityKey>,
    group: &GroupMember,
) -> Result<Event, ClientError> {
    let after = users(group);
    Ok(Event::Changed {
        group: group_name(state, group_id),
        group_id: hex::encode(group_id),
        epoch: group.epoch(),
        members: group.user_count(),
        joined: people(state, after.difference(before))?,
        left: people(state, before.difference(&after))?,
    })
}

/// Users as events name them.
fn people<'a>(
    state: &StateFile,
    users: impl Iterator<Item = &'a IdentityKey>,
) -> Result<Vec<Person>, ClientError> {
    users
        .map(|user| {
            Ok(Person {
                user_key: user.to_string(),
                name: state.contact_name(user)?,
            })
        })
        .collect()
}

/// The waiting invitation to `group` (its name as shown, or its id as
/// text or hex).
pub(crate) fn invitation_to(state: &StateFile, group: &str) -> Result<Invitation, ClientError> {
    state
        .invitations()?
        .into_iter()
        .find(|invitation| {
            let id = &invitation.group_id;
            group_name(state, id) == group
                || id.as_slice() == group.as_bytes()
                || hex::encode(id) == group.to_lowercase()
        })
        .ok_or_else(|| {
            ClientError::Usage(format!(
                "no invitation to {group} waits; `invitations` lists them"
            ))
        })
}

/// Prints the `members` listing from an open state file (`chat`'s
/// `/members` too).
pub(crate) fn print_members(state: &StateFile, group_id: Option<&str>) -> Result<(), ClientError> {
    let me = state.identity_key()?;
    let (group_id, group) = load_group(state, group_id)?;
    let mut users: Vec<(IdentityKey, usize)> = Vec::new();
    for member in group.member_keys() {
        match users.iter_mut().find(|(user, _)| *user == member.user) {
            Some((_, count)) => *count += 1,
            None => users.push((member.user, 1)),
        }
    }
    let mut listed = Vec::new();
    for (user, devices) in users {
        let name = state.contact_name(&user)?;
        if output::json() {
            listed.push(json!({
                "user_key": user.to_string(),
                "name": name,
                "you": user == me,
                "devices": devices,
            }));
            continue;
        }
        let mut line = user.to_string();
        if let Some(name) = name {
            line.push(' ');
            line.push_str(&name);
        }
        if user == me {
            line.push_str(" (you)");
        }
        let plural = if devices == 1 { "" } else { "s" };
        say!("{line} {devices} device{plural}");
    }
    if output::json() {
        print_json(&json!({
            "group": group_name(state, &group_id),
            "group_id": hex::encode(&group_id),
            "epoch": group.epoch(),
            "members": listed,
        }))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejoin_takes_a_full_group_id_as_text_or_hex_as_groups_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open_or_create(&crate::state::StateAccess::with_passphrase(
            dir.path().join("s.state"),
            "pass",
        ))
        .unwrap();
        let id = |text: &str| rejoin_group_id(&state, text).unwrap().as_bytes().to_vec();
        assert_eq!(id("team#0123456789abcdef"), b"team#0123456789abcdef");
        assert_eq!(id("0001ff"), [0x00, 0x01, 0xff]);
        assert_eq!(id("0001FF"), [0x00, 0x01, 0xff]);
        // Hex of printable text is shown as that text, so it is the id.
        assert_eq!(id("61626364"), b"61626364");
        assert_eq!(id("plain"), b"plain");
        assert!(matches!(rejoin_group_id(&state, ""), Err(ClientError::Usage(_))));

        // A group the state file still lists: its name is enough.
        state
            .record_group(&GroupId::new(b"club#00112233aabbccdd".to_vec()).unwrap(), false)
            .unwrap();
        assert_eq!(id("club"), b"club#00112233aabbccdd");
    }

    #[test]
    fn a_group_is_shown_by_its_name_else_by_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open_or_create(&crate::state::StateAccess::with_passphrase(
            dir.path().join("s.state"),
            "pass",
        ))
        .unwrap();
        let id = new_group_id();
        assert_eq!(id.as_bytes().len(), 16);
        assert_ne!(id, new_group_id());
        state.record_group(&id, false).unwrap();
        assert_eq!(group_name(&state, &id), hex::encode(&id));
        assert!(state.name_group(&id, "team").unwrap());
        assert_eq!(group_name(&state, &id), "team");
        // The first name sticks.
        assert!(!state.name_group(&id, "other").unwrap());
        assert_eq!(group_name(&state, &id), "team");
        assert_eq!(find_group(&state, "team").unwrap(), id);
        assert_eq!(find_group(&state, &hex::encode(&id)).unwrap(), id);

        // Ids made before they were random show the name they carry.
        assert_eq!(id_label(b"team#0123456789abcdef"), "team");
        assert_eq!(id_label(b"plain"), "plain");
        assert_eq!(id_label(b"\x00\x01"), "0001");
        // A name that would reorder or hide text is shown as hex.
        assert_eq!(id_label("a\u{202e}b".as_bytes()), "61e280ae62");
        assert!(valid_group_name("secret-union-meeting"));
        assert!(!valid_group_name(""));
        assert!(!valid_group_name("a\u{202e}b"));
        assert!(valid_group_name(&"x".repeat(Content::MAX_NAME_LEN)));
        assert!(!valid_group_name(&"x".repeat(Content::MAX_NAME_LEN + 1)));
    }
}
