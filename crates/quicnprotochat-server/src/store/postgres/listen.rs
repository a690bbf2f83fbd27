//! The LISTEN connection: wakes this node's waiters when another node
//! commits messages for their queues.
//!
//! A wake-up only says "look": the waiter reads the queue from the
//! database, so a lost or doubled notification costs a read, never a
//! message. Notifications sent while this connection was down are lost,
//! so after every (re)connect every watched queue is woken once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use super::super::Notifier;
use super::RECONNECT_PAUSE;
use super::storage::classify;

/// How often the loop looks at `stop` while no notification comes.
const POLL: Duration = Duration::from_millis(200);

pub(super) fn listen_loop(
    config: &tokio_postgres::Config,
    notifier: &Notifier,
    tag: &str,
    stop: &AtomicBool,
) {
    // Its own name, so that an operator (or a test) can tell it apart in
    // `pg_stat_activity`.
    let mut config = postgres::Config::from(config.clone());
    config.application_name("quicnprotochat-node-listen");
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let mut client = match config.connect(postgres::NoTls).and_then(|mut client| {
            client.batch_execute("LISTEN quicnprotochat")?;
            Ok(client)
        }) {
            Ok(client) => client,
            Err(error) => {
                if !warned {
                    let error = classify(error);
                    tracing::warn!("listening for other nodes' messages: {error}; retrying");
                    warned = true;
                }
                std::thread::sleep(RECONNECT_PAUSE);
                continue;
            }
        };
        if warned {
            tracing::info!("listening for other nodes' messages again");
            warned = false;
        }
        // Whatever was committed while nobody here listened.
        notifier.wake_all();
        while !stop.load(Ordering::Relaxed) {
            let next = client.notifications().timeout_iter(POLL).next();
            match next {
                Ok(Some(notification)) => wake(notifier, tag, notification.payload()),
                Ok(None) if client.is_closed() => break,
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(
                        "the listening connection failed: {}; reconnecting",
                        super::storage::describe(&error)
                    );
                    break;
                }
            }
        }
    }
}

/// Wakes the waiters a wake-up of another node names (see
/// [`super::wake_up`]).
fn wake(notifier: &Notifier, tag: &str, payload: &str) {
    let Some((from, queues)) = payload.split_once(' ') else {
        return;
    };
    if from == tag {
        // This node's own batch: its writer woke the waiters already.
        return;
    }
    if queues == "*" {
        notifier.wake_all();
        return;
    }
    let prefixes: HashSet<[u8; 8]> = queues
        .split(',')
        .filter_map(|prefix| hex::decode(prefix).ok())
        .filter_map(|prefix| <[u8; 8]>::try_from(prefix).ok())
        .collect();
    notifier.wake_prefixes(&prefixes);
}
