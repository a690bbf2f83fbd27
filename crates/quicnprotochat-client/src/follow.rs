//! `recv --follow`: stay subscribed to our queue and process each pushed
//! batch as `recv` does, until Ctrl-C.
//!
//! When the connection is lost (the node stopped or was killed, a call got
//! no answer) the follower connects to the next node of the list that
//! answers and resumes: it catches up with what was queued meanwhile and
//! subscribes after the last message it stored. The nodes share one
//! database, so the queue and its sequence numbers are the same through any
//! of them; messages stored but not yet acknowledged come again and are
//! skipped by their sequence number, so nothing is lost or shown twice.

use std::future::Future;
use std::pin::{Pin, pin};
use std::time::Duration;

use quicnprotochat_core::IdentityKeypair;
use tokio::time::Instant;

use crate::connections::Nodes;
use crate::error::ClientError;
use crate::incoming::{Seen, process_inbox, store_batch};
use crate::publish::commit_due_proposals;
use crate::state::StateFile;
use crate::sync::catch_up;

/// How long a connection must have lasted for its loss to be news: the
/// reconnect is then immediate. A shorter one continues the streak of
/// failures and waits like a failed reconnect.
const STEADY: Duration = Duration::from_secs(30);

/// The pause after the first failure of a streak; it doubles with each
/// further failure up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// The longest pause between two rounds through the nodes.
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// Follows the queue of `identity` through `nodes`, already caught up to
/// `seen`, until Ctrl-C. Returns an error only for failures a reconnect
/// cannot cure (the state file, MLS, a node's refusal); while no node
/// answers it keeps trying, pausing longer and longer.
pub(crate) async fn follow(
    nodes: &mut Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    seen: Seen,
) -> Result<(), ClientError> {
    let mut interrupted = pin!(tokio::signal::ctrl_c());
    // The first poll installs the signal handler; until then Ctrl-C would
    // kill the process instead of ending the follow cleanly. Tests (and
    // users) press it once "following" is printed.
    if futures::poll!(interrupted.as_mut()).is_ready() {
        return Ok(());
    }
    note!("following; press Ctrl-C to stop");
    let mut caught_up = Some(seen);
    let mut pause = Pause::default();
    loop {
        let connected_at = Instant::now();
        let outcome = follow_connection(nodes, state, identity, caught_up.take(), interrupted.as_mut()).await;
        let lost = match outcome {
            Ok(Ended::Interrupted) => return Ok(()),
            Ok(Ended::Unsubscribed) => "the node ended the subscription".to_owned(),
            Err(e) if e.is_connection_lost() => e.to_string(),
            Err(e) => return Err(e),
        };
        if !reconnect(nodes, &mut pause, connected_at, &lost, interrupted.as_mut()).await {
            return Ok(());
        }
        note!("following through {}", nodes.delivery().server());
    }
}

/// After the connection made at `connected_at` was lost (`lost` says how):
/// reconnects `nodes` to the next node that answers, pausing between
/// rounds as `pause` says, until one does (true) or `interrupted` fires
/// (false). `chat` reconnects with it too.
pub(crate) async fn reconnect<F: Future>(
    nodes: &mut Nodes,
    pause: &mut Pause,
    connected_at: Instant,
    lost: &str,
    mut interrupted: Pin<&mut F>,
) -> bool {
    note!(
        "warning: lost the node at {} ({lost}); reconnecting",
        nodes.delivery().server()
    );
    if connected_at.elapsed() >= STEADY {
        pause.reset();
    }
    loop {
        tokio::select! {
            () = pause.wait() => {}
            _ = interrupted.as_mut() => return false,
        }
        let reconnected = tokio::select! {
            reconnected = nodes.reconnect() => reconnected,
            _ = interrupted.as_mut() => return false,
        };
        match reconnected {
            Ok(()) => return true,
            // Everything local was checked before the first connection;
            // what fails now is the nodes, which may come back.
            Err(e) => note!("warning: {e}\ntrying again in {:?}", pause.upcoming()),
        }
    }
}

/// Why following one connection ended without an error.
enum Ended {
    /// Ctrl-C.
    Interrupted,
    /// The node dropped our subscription (it is shutting down, or the
    /// connection broke).
    Unsubscribed,
}

/// Follows through the current connection: catches up first unless
/// `caught_up` says that was done on it, then subscribes after the last
/// message seen and handles each pushed batch: store, acknowledge, apply.
async fn follow_connection<F: Future>(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    caught_up: Option<Seen>,
    mut interrupted: Pin<&mut F>,
) -> Result<Ended, ClientError> {
    let mut seen = match caught_up {
        Some(seen) => seen,
        None => {
            let seen = catch_up(nodes, state, identity).await?;
            commit_due_proposals(nodes, state, identity).await?;
            seen
        }
    };
    let me = identity.public_key();
    let (sink, mut pushed) = tokio::sync::mpsc::channel(1);
    let _subscription = nodes.delivery().subscribe(&me, seen.after(), sink).await?;
    loop {
        let batch = tokio::select! {
            batch = pushed.recv() => batch,
            _ = interrupted.as_mut() => return Ok(Ended::Interrupted),
        };
        let Some(batch) = batch else {
            return Ok(Ended::Unsubscribed);
        };
        seen = store_batch(state, seen, batch)?;
        nodes.delivery().ack(&me, seen.after()).await?;
        process_inbox(nodes, state).await?;
        commit_due_proposals(nodes, state, identity).await?;
    }
}

/// The wait before the next reconnect: none at first, then doubling from
/// [`FIRST_PAUSE`] up to [`LONGEST_PAUSE`] while nodes keep failing, so a
/// node that drops every connection at once is not hammered.
#[derive(Debug, Default)]
pub(crate) struct Pause {
    next: Duration,
}

impl Pause {
    /// Starts a new streak: the next wait is none.
    fn reset(&mut self) {
        self.next = Duration::ZERO;
    }

    /// How long the next [`Self::wait`] will take.
    fn upcoming(&self) -> Duration {
        self.next
    }

    /// Waits the current pause and lengthens the next.
    async fn wait(&mut self) {
        tokio::time::sleep(self.advance()).await;
    }

    /// The current pause; the next one is longer.
    fn advance(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_start_at_none_and_double_up_to_the_longest() {
        let mut pause = Pause::default();
        let waits: Vec<u128> = (0..9).map(|_| pause.advance().as_millis()).collect();
        assert_eq!(
            waits,
            [0, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
        );
        pause.reset();
        assert_eq!(pause.upcoming(), Duration::ZERO);
    }
}
