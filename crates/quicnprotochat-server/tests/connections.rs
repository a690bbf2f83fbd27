//! Strangers cannot take the connections the node keeps for the identities
//! it already serves: fresh identities from six loopback addresses and from
//! [::1] fill all they may of a node's total (scaled down to 40, a quarter
//! kept), and a member (an identity with a message queued) still connects
//! and is served, while one more stranger is turned away; and one identity
//! holds at most its cap of connections, from any address.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use capnp::capability::FromClientHook;
use node::{STEP_TIMEOUT, TestNode, client_endpoint_at};
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, rpc};

/// The node's total, the share kept for members, and each address's cap.
const TOTAL: usize = 40;
const RESERVED_PERCENT: u8 = 25;
const PER_ADDRESS: usize = 8;
const PER_IDENTITY: usize = 3;

/// The QUIC application error codes of a stranger turned away, and of a
/// connection beyond its identity's cap.
const TOO_MANY_STRANGERS: u32 = 0x53;
const TOO_MANY_FOR_IDENTITY: u32 = 0x54;

/// A fresh identity, never seen by the node.
fn stranger(n: u8) -> IdentityKeypair {
    IdentityKeypair::from_secret_bytes(&[n.wrapping_add(100); 32])
}

/// Connects as `device` from `from` to the node's `port`; the connection if
/// the handshake completed.
async fn connect(
    node: &TestNode,
    device: &IdentityKeypair,
    from: IpAddr,
) -> Option<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = client_endpoint_at(node.cert(), Some(device), SocketAddr::new(from, 0));
    let to = SocketAddr::new(
        if from.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        },
        node.addr().port(),
    );
    let connecting = endpoint.connect(to, "localhost").unwrap();
    match tokio::time::timeout(STEP_TIMEOUT, connecting).await.unwrap() {
        Ok(connection) => Some((endpoint, connection)),
        Err(_) => None,
    }
}

/// Runs `body` with the DeliveryService over a new stream of `connection`.
async fn with_delivery(connection: &quinn::Connection, body: impl AsyncFnOnce(delivery_service::Client)) {
    let (send, recv) = connection.open_bi().await.unwrap();
    let (session, service) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            tokio::task::spawn_local(session);
            tokio::time::timeout(STEP_TIMEOUT, body(service.cast_to()))
                .await
                .unwrap();
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_from_many_addresses_cannot_lock_a_member_out() {
    let node = TestNode::start(|config| {
        config.listen = "[::]:0".parse().unwrap();
        config.max_connections = TOTAL;
        config.reserved_connections_percent = RESERVED_PERCENT;
        config.max_connections_per_address = PER_ADDRESS;
        config.max_connections_per_identity = PER_IDENTITY;
    })
    .await;
    let strangers_share = TOTAL - TOTAL * usize::from(RESERVED_PERCENT) / 100;

    // The member: the node holds a message for it.
    let member = IdentityKeypair::from_secret_bytes(&[3; 32]);
    let (endpoint, connection) = connect(&node, &member, IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .unwrap();
    with_delivery(&connection, async |delivery| {
        let mut request = delivery.enqueue_request();
        request.get().set_recipient_key(member.public_key().as_bytes());
        request.get().set_payload(b"kept");
        request.send().promise.await.unwrap();
    })
    .await;
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;

    // Strangers from [::1] first, then from 127.0.0.2 to 127.0.0.7: more
    // than the strangers' share and than the total, within each address's cap.
    let mut addresses = vec![IpAddr::V6(Ipv6Addr::LOCALHOST)];
    addresses.extend((2..=7).map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))));
    let mut held = Vec::new();
    let mut n = 0u8;
    for address in &addresses {
        for _ in 0..PER_ADDRESS {
            n += 1;
            if let Some(connection) = connect(&node, &stranger(n), *address).await {
                held.push((*address, connection));
            }
        }
    }
    assert_eq!(usize::from(n), addresses.len() * PER_ADDRESS);
    assert!(usize::from(n) > TOTAL, "the strangers try more than the total");
    // Those beyond the share are closed right after their handshake.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut open = 0;
    let mut open_v6 = 0;
    for (address, (_, connection)) in &held {
        match connection.close_reason() {
            None => {
                open += 1;
                open_v6 += usize::from(address.is_ipv6());
            }
            Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                assert_eq!(close.error_code, TOO_MANY_STRANGERS.into(), "{close:?}")
            }
            Some(other) => panic!("a stranger's connection ended otherwise: {other}"),
        }
    }
    assert_eq!(open, strangers_share, "strangers hold exactly their share");
    assert_eq!(open_v6, PER_ADDRESS, "[::1] holds its address's cap");

    // The member still gets in, from an address of its own, and is served.
    let (endpoint, connection) = connect(&node, &member, IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .expect("the member's handshake completes");
    with_delivery(&connection, async |delivery| {
        let mut fetch = delivery.fetch_since_request();
        fetch.get().set_recipient_key(member.public_key().as_bytes());
        let answer = fetch.send().promise.await.unwrap();
        let messages = answer.get().unwrap().get_messages().unwrap();
        assert_eq!(messages.get(0).get_payload().unwrap(), b"kept");
    })
    .await;
    assert!(connection.close_reason().is_none(), "the member stays connected");

    // The member may hold a few more, from another address, up to its
    // identity's cap; beyond it, a connection is closed after its handshake.
    let mut more = Vec::new();
    for _ in 1..PER_IDENTITY {
        more.push(
            connect(&node, &member, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)))
                .await
                .unwrap(),
        );
    }
    let (_endpoint, beyond) = connect(&node, &member, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)))
        .await
        .unwrap();
    match tokio::time::timeout(STEP_TIMEOUT, beyond.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, TOO_MANY_FOR_IDENTITY.into())
        }
        other => panic!("a connection beyond the identity's cap should be closed, got {other}"),
    }
    assert!(
        more.iter()
            .all(|(_, connection)| connection.close_reason().is_none())
    );

    // One more stranger, from the member's address: turned away.
    let (_stranger_endpoint, late) = connect(&node, &stranger(200), IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .expect("its handshake completes before the node knows it is a stranger");
    match tokio::time::timeout(STEP_TIMEOUT, late.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, TOO_MANY_STRANGERS.into())
        }
        other => panic!("the late stranger should be turned away, got {other}"),
    }

    connection.close(0u32.into(), b"done");
    drop(held);
    let _ = tokio::time::timeout(STEP_TIMEOUT, endpoint.wait_idle()).await;
    node.stop().await;
}
