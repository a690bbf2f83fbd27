//! How commands name things and find them: identity keys and contacts given
//! on the command line, groups by the name people gave them, members as
//! shown to people, and who else is in a group.

use quicnprotochat_core::{GroupId, GroupMember, IdentityKey};

use crate::cli::PeerArgs;
use crate::error::ClientError;
use crate::state::{StateError, StateFile};

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

/// Shows a group id as text when it is printable UTF-8, else as hex.
/// A group id made by `create-group` is `NAME#` plus 16 random hex digits:
/// the name is for people, the suffix keeps ids unique and unguessable, so
/// nobody can collide with or squat on another group's id at the node.
pub(crate) fn group_name(group_id: &[u8]) -> String {
    match std::str::from_utf8(group_id) {
        Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => match text.rsplit_once('#') {
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

/// A fresh group id for a group people call `name`; refused when the id
/// would be longer than a node accepts.
pub(crate) fn new_group_id(name: &str) -> Result<GroupId, ClientError> {
    let id = format!("{name}#{}", hex::encode(rand::random::<[u8; 8]>())).into_bytes();
    GroupId::new(id).ok_or_else(|| {
        ClientError::Usage(format!(
            "--group-id is too long: at most {} bytes",
            GroupId::MAX_LEN - 17
        ))
    })
}

/// The group id as a node takes it: 1 to [`GroupId::MAX_LEN`] bytes. A
/// group joined from someone else's Welcome may have any MLS group id.
pub(crate) fn node_group_id(group_id: &[u8]) -> Result<GroupId, ClientError> {
    GroupId::new(group_id.to_vec()).ok_or_else(|| {
        ClientError::Usage(format!(
            "the id of group {} is {} bytes long; a node takes 1 to {} bytes, so changes to this group cannot be published",
            group_name(group_id),
            group_id.len(),
            GroupId::MAX_LEN
        ))
    })
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
) -> Result<(Vec<u8>, GroupMember), ClientError> {
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
            group_name(&group_id),
            state.path().display()
        ))
    })?;
    Ok((group_id, group))
}

/// The id of the group called `name` (or with exactly that id).
fn find_group(state: &StateFile, name: &str) -> Result<Vec<u8>, ClientError> {
    let matching: Vec<Vec<u8>> = state
        .groups()?
        .into_iter()
        .map(|record| record.group_id)
        .filter(|id| id.as_slice() == name.as_bytes() || group_name(id) == name)
        .collect();
    match matching.as_slice() {
        [id] => Ok(id.clone()),
        [] => Err(ClientError::NoGroup(format!(
            "{name} is not one of your groups; `groups --state {}` lists them",
            state.path().display()
        ))),
        several => Err(ClientError::Usage(format!(
            "several of your groups are called {name}; pass the full id as --group-id: {}",
            several
                .iter()
                .map(|id| String::from_utf8_lossy(id).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Every member of `group` but us.
pub(crate) fn others(group: &GroupMember, me: &IdentityKey) -> Vec<IdentityKey> {
    group
        .members()
        .into_iter()
        .filter(|member| member != me)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_shown_by_the_name_its_creator_gave_it() {
        let id = new_group_id("team").unwrap();
        assert_eq!(group_name(id.as_bytes()), "team");
        assert_eq!(group_name(b"plain"), "plain");
        assert_eq!(group_name(b"\x00\x01"), "0001");
        assert!(new_group_id(&"x".repeat(239)).is_ok());
        assert!(matches!(
            new_group_id(&"x".repeat(240)),
            Err(ClientError::Usage(_))
        ));
    }
}
