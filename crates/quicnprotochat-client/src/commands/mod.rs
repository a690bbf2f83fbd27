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
//! - `identity` — register-state, whoami, contacts.
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

use crate::cli::{Cli, Command};
use crate::error::ClientError;

/// Runs one parsed command line. Must run inside a tokio `LocalSet`.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let connection = &cli.connection;
    match cli.command {
        Command::Ping => node::ping(connection).await,
        Command::Register => node::register(connection).await,
        Command::FetchKey {
            identity_key,
            ciphersuite,
        } => node::fetch_key(connection, &identity_key, ciphersuite).await,
        Command::DemoGroup => demo::demo_group(connection).await,
        Command::RegisterState(state) => identity::register_state(connection, &state.state).await,
        Command::Whoami { state, device } => identity::whoami(&state.state, device),
        Command::Link { state, valid_for } => devices::link(&state.state, valid_for),
        Command::Devices { action } => devices::devices(connection, action).await,
        Command::Contacts { state, action } => identity::contacts(&state.state, action),
        Command::CreateGroup {
            state,
            group_id,
            ciphersuite,
        } => group::create_group(&state.state, &group_id, ciphersuite),
        Command::Invite {
            state,
            peers,
            group_id,
        } => group::invite(connection, &state.state, &peers, group_id.as_deref()).await,
        Command::Remove {
            state,
            peers,
            group_id,
        } => group::remove(connection, &state.state, &peers, group_id.as_deref()).await,
        Command::Update { state, group_id } => {
            group::update(connection, &state.state, group_id.as_deref()).await
        }
        Command::Leave { state, group_id } => {
            group::leave(connection, &state.state, group_id.as_deref()).await
        }
        Command::Rejoin { state, group_id } => group::rejoin(connection, &state.state, &group_id).await,
        Command::Groups(state) => group::groups(&state.state),
        Command::Members { state, group_id } => group::members(&state.state, group_id.as_deref()),
        Command::History { state, group_id } => group::history(&state.state, group_id.as_deref()),
        Command::Join(state) => messages::join(connection, &state.state).await,
        Command::Invitations(state) => messages::invitations(&state.state),
        Command::Accept { state, group, all } => {
            messages::accept(connection, &state.state, group.as_deref(), all).await
        }
        Command::Decline { state, group } => messages::decline(&state.state, &group),
        Command::Send {
            state,
            peers,
            group_id,
            msg,
        } => messages::send(connection, &state.state, &peers, group_id.as_deref(), &msg).await,
        Command::Recv { state, follow } => messages::recv(connection, &state.state, follow).await,
        Command::Chat { state, group_id } => chat::chat(connection, &state.state, group_id).await,
        Command::Completions { shell } => completions::completions(shell),
    }
}
