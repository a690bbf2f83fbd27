//! The LISTEN connection: wakes this node's waiters when another node
//! commits messages for their queues.
//!
//! A wake-up only says "look": the waiter reads the queue from the
//! database, so a lost or doubled notification costs a read, never a
//! message. Notifications sent while this connection was down are lost,
//! so after every (re)connect every watched queue is woken once.

use std::collections::HashSet;
use std::pin::pin;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::super::Notifier;
use super::RECONNECT_PAUSE;
use super::conn::classify;

/// Listens until `stop` turns true, on a runtime of this thread's own: the
/// wait for a notification and the wait for `stop` are one `select`, so
/// stopping takes no polling.
pub(super) fn listen_loop(
    config: &tokio_postgres::Config,
    notifier: &Notifier,
    tag: &str,
    mut stop: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot listen for other nodes' messages: no runtime: {e}");
            return;
        }
    };
    runtime.block_on(async {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => {}
            () = listen(config, notifier, tag) => {}
        }
    });
}

/// Listens for ever, connecting again whenever the connection goes.
async fn listen(config: &tokio_postgres::Config, notifier: &Notifier, tag: &str) {
    // Its own name, so that an operator (or a test) can tell it apart in
    // `pg_stat_activity`.
    let mut config = config.clone();
    config.application_name("quicnprotochat-node-listen");
    let mut warned = false;
    loop {
        match listen_once(&config, notifier, tag, &mut warned).await {
            Ok(()) => {}
            Err(error) if !warned => {
                tracing::warn!(
                    "listening for other nodes' messages: {}; retrying",
                    classify(error)
                );
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// One connection: LISTEN, then wake waiters for each notification until
/// the connection ends (`Ok`) or cannot be made (`Err`).
async fn listen_once(
    config: &tokio_postgres::Config,
    notifier: &Notifier,
    tag: &str,
    warned: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    // The connection does the I/O of the client's requests as it is polled
    // for messages, so LISTEN is sent while the messages are read.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let mut listening = pin!(client.batch_execute("LISTEN quicnprotochat"));
    loop {
        tokio::select! {
            listened = &mut listening => {
                listened?;
                break;
            }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
        }
    }
    if *warned {
        tracing::info!("listening for other nodes' messages again");
        *warned = false;
    }
    // Whatever was committed while nobody here listened.
    notifier.wake_all();
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(notification)) => wake(notifier, tag, notification.payload()),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(
                    "the listening connection failed: {}; reconnecting",
                    super::conn::describe(&error)
                );
                return Ok(());
            }
        }
    }
    Ok(())
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
