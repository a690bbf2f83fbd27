//! The node connections a command works with, and sending through them the
//! way a user expects: a rate limit is waited out (within
//! [`RATE_LIMIT_PATIENCE`]), a full queue is reported naming whose it is.
//!
//! Each role (`--server`, `--ds-server`) may name several interchangeable
//! nodes: a command connects to the first that answers, and a long-running
//! one reconnects to the next when its connection is lost.

use std::cell::Cell;
use std::time::Duration;

use quicnprotochat_core::{CoreError, IdentityKey, IdentityKeypair, StateKey};
use quicnprotochat_proto::outcome::{RateLimited, SendOutcome, TooLarge};
use quicnprotochat_proto::wire::Envelope;

use crate::cli::ConnectionArgs;
use crate::directory::Directory;
use crate::error::ClientError;
use crate::node_client::{Dialer, NodeClient};
use crate::state::StateFile;

/// How long one command keeps retrying calls the node rate-limits, in all.
pub(crate) const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(30);

/// Connections to the Authentication Service and the Delivery Service; one
/// connection when both are the same nodes.
pub(crate) struct Nodes {
    dialer: Dialer,
    auth: Link,
    delivery: Option<Link>,
    /// The device lists this command fetched through these connections.
    directory: Directory,
}

/// A connection to one node of a list of interchangeable nodes (they share
/// one database), remembering which, so that a reconnect can go on with the
/// next.
struct Link {
    servers: Vec<String>,
    index: usize,
    client: NodeClient,
}

impl Link {
    /// Connects to the first node of `servers` that answers, from `start`.
    async fn connect(dialer: &Dialer, servers: &[String], start: usize) -> Result<Link, ClientError> {
        let dialled = dialer.dial_first(servers, start).await?;
        for skipped in &dialled.skipped {
            note!("warning: skipped a node: {skipped}");
        }
        Ok(Link {
            servers: servers.to_vec(),
            index: dialled.index,
            client: dialled.client,
        })
    }

    /// Replaces the connection with one to the next node that answers,
    /// starting after the current one (which is tried last).
    async fn reconnect(&mut self, dialer: &Dialer) -> Result<(), ClientError> {
        // The connection is lost or of no use: tell the node at once (one
        // shutting down waits for its clients to go) rather than after the
        // next node is found.
        self.client.hang_up();
        let next = Link::connect(dialer, &self.servers, self.index + 1).await?;
        let old = std::mem::replace(self, next);
        old.client.close().await;
        Ok(())
    }
}

impl Nodes {
    /// Connects as `identity`, or anonymously, to the first node of each
    /// list that answers.
    pub(crate) async fn connect(
        args: &ConnectionArgs,
        identity: Option<&IdentityKeypair>,
    ) -> Result<Nodes, ClientError> {
        let dialer = Dialer::new(&args.ca_cert, args.server_name.clone(), identity)?;
        let auth = Link::connect(&dialer, &args.server, 0).await?;
        let delivery = if args.ds_server.is_empty() || args.ds_server == args.server {
            None
        } else {
            Some(Link::connect(&dialer, &args.ds_server, 0).await?)
        };
        Ok(Nodes {
            dialer,
            auth,
            delivery,
            directory: Directory::default(),
        })
    }

    /// Fetches the device lists of `users` this command has not fetched
    /// yet into its directory (see [`Directory::fetch`]).
    pub(crate) async fn fetch_device_lists(
        &self,
        state: &StateFile,
        users: &[IdentityKey],
    ) -> Result<(), ClientError> {
        self.directory.fetch(self.auth(), state, users).await
    }

    /// Runs `step` with this command's directory; if it needs lists not
    /// fetched yet, fetches them and runs it once more. `step` must change
    /// nothing when it fails (core's operations fail before writing, and
    /// the state file's methods roll back).
    pub(crate) async fn with_lists<T>(
        &self,
        state: &StateFile,
        mut step: impl FnMut(&Directory) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        match step(&self.directory) {
            Err(ClientError::Core(CoreError::DeviceListsNeeded(users))) => {
                self.fetch_device_lists(state, &users).await?;
                step(&self.directory)
            }
            other => other,
        }
    }

    /// The device lists fetched in this command.
    pub(crate) fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The node holding KeyPackages.
    pub(crate) fn auth(&self) -> &NodeClient {
        &self.auth.client
    }

    /// The node holding message queues.
    pub(crate) fn delivery(&self) -> &NodeClient {
        &self.delivery.as_ref().unwrap_or(&self.auth).client
    }

    /// After the delivery node's connection was lost: connects to the next
    /// delivery node that answers (the lost one is tried last), and does the
    /// same for the Authentication Service if it shares that connection or
    /// lost its own.
    pub(crate) async fn reconnect(&mut self) -> Result<(), ClientError> {
        match &mut self.delivery {
            Some(delivery) => {
                delivery.reconnect(&self.dialer).await?;
                if self.auth.client.is_closed() {
                    self.auth.reconnect(&self.dialer).await?;
                }
            }
            None => self.auth.reconnect(&self.dialer).await?,
        }
        Ok(())
    }

    /// Queues `envelopes` on the delivery node in one atomic call, sending
    /// it again (same message ids, so stored at most once) while the node
    /// rate-limits us and our patience lasts. `state_key`, the state key of
    /// the group the messages belong to, lets the node tell us when they
    /// are from an epoch the group has left.
    pub(crate) async fn deliver(
        &self,
        envelopes: &[Envelope],
        state_key: Option<&StateKey>,
    ) -> Result<(), ClientError> {
        let patience = Patience::new();
        let keys: Vec<&StateKey> = state_key.into_iter().collect();
        loop {
            match self.delivery().enqueue_batch_with_keys(envelopes, &keys).await? {
                SendOutcome::Accepted => return Ok(()),
                SendOutcome::RateLimited(limited) => {
                    if !patience.wait(&limited).await {
                        return Err(limited.into());
                    }
                }
                SendOutcome::QueueFull(full) => return Err(full.into()),
                SendOutcome::TooLarge(large) => {
                    return Box::pin(self.deliver_in_parts(envelopes, large, state_key)).await;
                }
                SendOutcome::StaleEpoch(stale) => {
                    return Err(ClientError::StaleEpoch {
                        current_epoch: stale.current_epoch,
                    });
                }
                SendOutcome::Handshake => return Err(HANDSHAKE_REFUSED),
            }
        }
    }

    /// Delivers envelopes too big for one call (a message to a group
    /// larger than the sender's burst) in calls within the node's maxima,
    /// one after the other: each part is atomic, the whole is not. A part's
    /// message id is the envelope's with the part's number appended, so a
    /// retry of the whole stores no part twice.
    async fn deliver_in_parts(
        &self,
        envelopes: &[Envelope],
        large: TooLarge,
        state_key: Option<&StateKey>,
    ) -> Result<(), ClientError> {
        let per_call = usize::try_from(large.max_messages).unwrap_or(usize::MAX).max(1);
        for envelope in envelopes {
            if envelope.payload.len() as u64 > large.max_bytes {
                return Err(ClientError::Internal("a payload above the node's burst of bytes"));
            }
            for (part, recipients) in envelope.recipients.chunks(per_call).enumerate() {
                let message_id = envelope.message_id.as_ref().map(|id| {
                    let mut id = id.clone();
                    id.truncate(60);
                    id.extend_from_slice(&(part as u32).to_be_bytes());
                    id
                });
                let piece = Envelope {
                    recipients: recipients.to_vec(),
                    payload: envelope.payload.clone(),
                    message_id,
                };
                self.deliver(std::slice::from_ref(&piece), state_key).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn close(self) {
        if let Some(delivery) = self.delivery {
            delivery.client.close().await;
        }
        self.auth.client.close().await;
    }
}

/// `Ok` for [`SendOutcome::Accepted`], the matching error otherwise.
pub(crate) fn accepted(outcome: SendOutcome) -> Result<(), ClientError> {
    match outcome {
        SendOutcome::Accepted => Ok(()),
        SendOutcome::RateLimited(limited) => Err(limited.into()),
        SendOutcome::QueueFull(full) => Err(full.into()),
        SendOutcome::TooLarge(_) => Err(ClientError::Internal("one message is more than the node's burst")),
        SendOutcome::StaleEpoch(stale) => Err(ClientError::StaleEpoch {
            current_epoch: stale.current_epoch,
        }),
        SendOutcome::Handshake => Err(HANDSHAKE_REFUSED),
    }
}

/// This client publishes every handshake through `publishCommit` or
/// `publishProposal`; a `handshake` answer to a plain send is a bug here.
const HANDSHAKE_REFUSED: ClientError =
    ClientError::Internal("the node refused a plain message as an MLS handshake");

/// An envelope with a fresh random message id, so a retried delivery is
/// stored only once.
pub(crate) fn envelope(recipients: Vec<IdentityKey>, payload: Vec<u8>) -> Envelope {
    Envelope {
        recipients,
        payload,
        message_id: Some(rand::random::<[u8; 16]>().to_vec()),
    }
}

/// How long one command is still willing to wait out rate limits.
pub(crate) struct Patience {
    give_up: tokio::time::Instant,
    told: Cell<bool>,
}

impl Patience {
    /// [`RATE_LIMIT_PATIENCE`] from now.
    pub(crate) fn new() -> Patience {
        Patience {
            give_up: tokio::time::Instant::now() + RATE_LIMIT_PATIENCE,
            told: Cell::new(false),
        }
    }

    /// Waits as long as the node asked and returns true, or returns false
    /// at once if that would end past our patience.
    pub(crate) async fn wait(&self, limited: &RateLimited) -> bool {
        if tokio::time::Instant::now() + limited.retry_after >= self.give_up {
            return false;
        }
        if !self.told.replace(true) {
            note!("the node asks us to slow down; waiting and trying again");
        }
        tokio::time::sleep(limited.retry_after).await;
        true
    }
}
