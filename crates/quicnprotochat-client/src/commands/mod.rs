//! The client's commands, one module per family; [`run`] only dispatches.
//! What commands share lives beside this module: `nodes` (connections and
//! sending), `naming` (groups and peers by name), `publish` (group changes)
//! and `incoming` (the queue). Commands never manage the state file's atomicity:
//! each unit of work is one method of the state file.
//!
//! Conventions: stdout carries results (identity keys, decrypted messages,
//! listings) so scripts can read them, as JSON with `--json` (see
//! [`crate::output`]); progress and warnings go to stderr.
//!
//! # Layout
//! - `node` — stateless commands: ping, register, fetch-key.
//! - `demo` — demo-group.
//! - `identity` — register-state, whoami, contacts, state encrypt | passphrase.
//! - `devices` — link, devices add | list | remove, and completing a link.
//! - `group` — create-group, invite, remove, update, leave, rejoin, groups, members,
//!   history.
//! - `messages` — send, recv, join.
//! - `chat` — chat: push and stdin in one loop.
//! - `completions` — shell completion scripts.

mod chat;
mod completions;
mod demo;
mod devices;
mod group;
mod identity;
mod messages;
mod node;

use crate::cli::{Cli, Command, StateAction};
use crate::error::ClientError;
use crate::passphrase::CliPassphrase;
use crate::state::StateAccess;

/// Runs one parsed command line. Must run inside a tokio `LocalSet`.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let Cli {
        connection,
        state,
        state_passphrase_file,
        command,
        ..
    } = cli;
    let connection = &connection;
    // `--state` is global (before or after any subcommand), so clap cannot
    // require it of the commands that need it: they ask here.
    let access = state.map(|path| {
        StateAccess::new(
            path,
            CliPassphrase {
                file: state_passphrase_file,
                environment: true,
            },
        )
    });
    let state = || {
        access.as_ref().ok_or_else(|| {
            ClientError::Usage(
                "this command needs a state file: --state FILE (or QUICNPROTOCHAT_STATE)".into(),
            )
        })
    };
    match command {
        Command::Ping => node::ping(connection).await,
        Command::Register => node::register(connection).await,
        Command::FetchKey {
            identity_key,
            ciphersuite,
        } => node::fetch_key(connection, &identity_key, ciphersuite).await,
        Command::DemoGroup => demo::demo_group(connection).await,
        Command::RegisterState => identity::register_state(connection, state()?).await,
        Command::Whoami { device } => identity::whoami(state()?, device),
        Command::Link { valid_for } => devices::link(state()?, valid_for),
        Command::Devices { action } => devices::devices(connection, state()?, action).await,
        Command::Contacts { action } => identity::contacts(state()?, action),
        Command::CreateGroup {
            group_id,
            ciphersuite,
        } => group::create_group(state()?, &group_id, ciphersuite),
        Command::Invite { peers, group_id } => {
            group::invite(connection, state()?, &peers, group_id.as_deref()).await
        }
        Command::Remove { peers, group_id } => {
            group::remove(connection, state()?, &peers, group_id.as_deref()).await
        }
        Command::Update { group_id } => group::update(connection, state()?, group_id.as_deref()).await,
        Command::Leave { group_id } => group::leave(connection, state()?, group_id.as_deref()).await,
        Command::Rejoin {
            group_id: Some(group_id),
            ..
        } => group::rejoin(connection, state()?, &group_id).await,
        Command::Rejoin { group_id: None, .. } => group::rejoin_all(connection, state()?).await,
        Command::Groups => group::groups(state()?),
        Command::Members { group_id } => group::members(state()?, group_id.as_deref()),
        Command::History { group_id } => group::history(state()?, group_id.as_deref()),
        Command::Join => messages::join(connection, state()?).await,
        Command::Invitations => messages::invitations(state()?),
        Command::Accept { group, all } => messages::accept(connection, state()?, group.as_deref(), all).await,
        Command::Decline { group } => messages::decline(state()?, &group),
        Command::Send { peers, group_id, msg } => {
            messages::send(connection, state()?, &peers, group_id.as_deref(), &msg).await
        }
        Command::Recv { follow } => messages::recv(connection, state()?, follow).await,
        Command::Chat { group_id } => chat::chat(connection, state()?, group_id).await,
        Command::Completions { shell } => completions::completions(shell),
        Command::State {
            action: StateAction::Encrypt,
        } => identity::encrypt_state(state()?),
        Command::State {
            action: StateAction::Passphrase { new_passphrase_file },
        } => identity::change_passphrase(state()?, new_passphrase_file),
    }
}
