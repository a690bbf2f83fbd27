//! Completing a device link on the new device's first `recv`: the handoff
//! waits in the link key's queue. The protocol (codes, key derivation,
//! handoff) is `quicnprotochat_core::link`.

use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_core::link::{HANDOFF_MAGIC, LinkError, LinkSecret};

use crate::cli::ConnectionArgs;
use crate::connections::Nodes;
use crate::error::ClientError;
use crate::state::StateFile;

/// On a new device's first `recv`: reads the handoff from the link key's
/// queue and becomes a device of the user. Returns the device's key pair.
pub(crate) async fn complete_link(
    args: &ConnectionArgs,
    state: &StateFile,
    link: &LinkSecret,
) -> Result<IdentityKeypair, ClientError> {
    let nodes = Nodes::connect(args, Some(link.link_key())).await?;
    let me = link.link_key().public_key();
    let queued = nodes.delivery().fetch_since(&me, Default::default(), 0).await?;
    let mut linked = None;
    let mut refused = None;
    for message in &queued {
        if !message.payload.starts_with(HANDOFF_MAGIC) {
            continue;
        }
        match link.open(&message.payload) {
            Ok((handoff, device)) => {
                linked = Some((handoff, device));
                break;
            }
            Err(e) => refused = Some(e),
        }
    }
    let Some((handoff, device)) = linked else {
        nodes.close().await;
        return Err(match refused {
            Some(e) => e.into(),
            None => ClientError::Link(LinkError::NotYet),
        });
    };
    state.complete_link(&handoff, &device)?;
    // Only now is it safe to let the node drop the handoff.
    if let Some(last) = queued.last() {
        nodes.delivery().ack(&me, last.seq).await?;
    }
    nodes.close().await;
    note!(
        "linked: this device ({}) is now a device of {}",
        device.public_key().short(),
        device.user()
    );
    Ok(device)
}
