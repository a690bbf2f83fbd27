//! The client's commands, one module per family, and what they share:
//! connecting to the node(s) and naming groups.
//!
//! Conventions: stdout carries results (identity keys, decrypted messages) so
//! scripts can read them; progress and warnings go to stderr.

mod demo;
mod group;
mod node;

use quicnprotochat_core::IdentityKey;

use crate::cli::{Cli, Command, ConnectionArgs};
use crate::error::ClientError;
use crate::node_client::{ConnectOptions, NodeClient};

/// Runs one parsed command line. Must run inside a tokio `LocalSet`.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let connection = &cli.connection;
    match cli.command {
        Command::Ping => node::ping(connection).await,
        Command::Register => node::register(connection).await,
        Command::FetchKey { identity_key } => node::fetch_key(connection, &identity_key).await,
        Command::DemoGroup => demo::demo_group(connection).await,
        Command::RegisterState(state) => group::register_state(connection, &state.state).await,
        Command::Whoami(state) => group::whoami(&state.state),
        Command::CreateGroup { state, group_id } => group::create_group(&state.state, &group_id),
        Command::Invite {
            state,
            peer_key,
            group_id,
        } => group::invite(connection, &state.state, &peer_key, group_id.as_deref()).await,
        Command::Join(state) => group::join(connection, &state.state).await,
        Command::Send {
            state,
            peer_key,
            group_id,
            msg,
        } => {
            group::send(
                connection,
                &state.state,
                peer_key.as_deref(),
                group_id.as_deref(),
                &msg,
            )
            .await
        }
        Command::Recv(state) => group::recv(connection, &state.state).await,
    }
}

/// Connections to the Authentication Service and the Delivery Service; one
/// connection when both are the same node.
pub(crate) struct Nodes {
    auth: NodeClient,
    delivery: Option<NodeClient>,
}

impl Nodes {
    pub(crate) async fn connect(args: &ConnectionArgs) -> Result<Nodes, ClientError> {
        let auth = NodeClient::connect(&options(args, &args.server)).await?;
        let delivery = match &args.ds_server {
            Some(ds) if *ds != args.server => Some(NodeClient::connect(&options(args, ds)).await?),
            _ => None,
        };
        Ok(Nodes { auth, delivery })
    }

    /// The node holding KeyPackages.
    pub(crate) fn auth(&self) -> &NodeClient {
        &self.auth
    }

    /// The node holding message queues.
    pub(crate) fn delivery(&self) -> &NodeClient {
        self.delivery.as_ref().unwrap_or(&self.auth)
    }

    pub(crate) async fn close(self) {
        if let Some(delivery) = self.delivery {
            delivery.close().await;
        }
        self.auth.close().await;
    }
}

fn options(args: &ConnectionArgs, server: &str) -> ConnectOptions {
    ConnectOptions {
        server: server.to_owned(),
        server_name: args.server_name.clone(),
        ca_cert: args.ca_cert.clone(),
    }
}

/// Parses an identity key given on the command line as `flag`.
pub(crate) fn parse_key(flag: &str, text: &str) -> Result<IdentityKey, ClientError> {
    text.trim()
        .parse()
        .map_err(|e| ClientError::Usage(format!("{flag}: {e}")))
}

/// Shows a group id as text when it is printable UTF-8, else as hex.
pub(crate) fn group_name(group_id: &[u8]) -> String {
    match std::str::from_utf8(group_id) {
        Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => text.to_owned(),
        _ => hex::encode(group_id),
    }
}
