//! `register-state`, `whoami`, `contacts`, `state encrypt` and `state
//! passphrase`.

use std::path::PathBuf;

use serde_json::json;

use crate::cli::{ConnectionArgs, ContactsAction};
use crate::connections::Nodes;
use crate::error::ClientError;
use crate::key_packages::{top_up_key_packages, upload};
use crate::naming::parse_key;
use crate::output::{self, print_json};
use crate::passphrase::CliPassphrase;
use crate::state::{Encryption, StateAccess, StateError, StateFile, Unlock};

/// `register-state`: creates the state file (or reuses its identity),
/// uploads a fresh KeyPackage and prints the identity key.
pub(crate) async fn register_state(args: &ConnectionArgs, access: &StateAccess) -> Result<(), ClientError> {
    let state = StateFile::open_or_create(access)?;
    let identity = state.identity_or_generate()?;
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    // Always one fresh KeyPackage, then fill up to a batch (plus a last
    // resort) if the node is running low. The private keys are durable
    // before anyone can use a KeyPackage to invite us.
    for package in state.generate_key_packages(&identity, Default::default(), 1, false)? {
        upload(&nodes, &identity, &package).await?;
    }
    let more = top_up_key_packages(&nodes, &state, &identity).await?;
    if more > 0 {
        note!("uploaded {more} more KeyPackages (including a last-resort one if there was none)");
    }
    if output::json() {
        print_json(&json!({
            "user_key": identity.user().to_string(),
            "device_key": identity.public_key().to_string(),
            "key_packages_uploaded": 1 + more,
        }))?;
    } else {
        say!("{}", identity.user());
    }
    nodes.close().await;
    Ok(())
}

/// `whoami`: prints the user key (or, with `device`, this device's key)
/// and nothing else.
pub(crate) fn whoami(access: &StateAccess, device: bool) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    if output::json() {
        // Both keys, whichever was asked for.
        print_json(&json!({
            "user_key": identity.user().to_string(),
            "device_key": identity.public_key().to_string(),
        }))?;
    } else if device {
        say!("{}", identity.public_key());
    } else {
        say!("{}", identity.user());
    }
    Ok(())
}

/// `contacts add | list | remove`.
pub(crate) fn contacts(access: &StateAccess, action: ContactsAction) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    match action {
        ContactsAction::Add { name, identity_key } => {
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || crate::output::unsafe_to_show(c))
            {
                return Err(ClientError::Usage(format!(
                    "contact name {name:?} must be non-empty, without spaces"
                )));
            }
            let key = parse_key("identity key", &identity_key)?;
            state.add_contact(&name, &key)?;
            note!("{name} is {key}");
        }
        ContactsAction::List => {
            let contacts = state.contacts()?;
            if output::json() {
                let contacts: Vec<_> = contacts
                    .iter()
                    .map(|(name, key)| json!({ "name": name, "user_key": key.to_string() }))
                    .collect();
                print_json(&json!({ "contacts": contacts }))?;
            } else {
                for (name, key) in contacts {
                    say!("{name} {key}");
                }
            }
        }
        ContactsAction::Remove { name } => {
            if !state.remove_contact(&name)? {
                return Err(ClientError::Usage(format!("no contact named {name:?}")));
            }
        }
    }
    Ok(())
}

/// `state encrypt`: encrypts a state file made before state files were
/// encrypted; one that is encrypted already is left as it is.
pub(crate) fn encrypt_state(access: &StateAccess) -> Result<(), ClientError> {
    let done = StateFile::encrypt(access)?;
    let path = access.path().display();
    if output::json() {
        print_json(&json!({
            "state": path.to_string(),
            "encrypted": true,
            "already": done == Encryption::AlreadyEncrypted,
        }))?;
    } else if done == Encryption::AlreadyEncrypted {
        note!("{path} is encrypted already; nothing changed");
    } else {
        note!("{path} is now encrypted; the same passphrase opens it from now on");
    }
    Ok(())
}

/// `state passphrase`: re-encrypts the state file under a new passphrase.
pub(crate) fn change_passphrase(access: &StateAccess, new_file: Option<PathBuf>) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let new = match (CliPassphrase {
        file: new_file,
        environment: false,
    })
    .passphrase(access.path(), true)
    {
        Ok(new) if !new.is_empty() => new,
        Ok(_) | Err(StateError::NoPassphrase(_)) => {
            return Err(ClientError::Usage(
                "give the new passphrase at a terminal, or its file with --new-passphrase-file FILE".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    state.change_passphrase(&new)?;
    let path = access.path().display();
    if output::json() {
        print_json(&json!({ "state": path.to_string(), "passphrase_changed": true }))?;
    } else {
        note!("{path} now opens with the new passphrase only");
    }
    Ok(())
}
