//! The node's UDP socket: the kernel buffers it asks for (Linux's default
//! of about 208 KiB drops datagrams in a burst of many clients' packets),
//! what the kernel grants, and clients served through it.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use node::TestNode;
use quicnprotochat_proto::PROTOCOL_VERSION;

/// The receive and send buffers a fresh UDP socket gets after asking for
/// `bytes` (`None`: not asking).
fn granted(bytes: Option<usize>) -> (usize, usize) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
    if let Some(bytes) = bytes {
        state.set_recv_buffer_size((&socket).into(), bytes).unwrap();
        state.set_send_buffer_size((&socket).into(), bytes).unwrap();
    }
    (
        state.recv_buffer_size((&socket).into()).unwrap(),
        state.send_buffer_size((&socket).into()).unwrap(),
    )
}

#[tokio::test]
async fn the_node_asks_for_the_configured_udp_buffers_and_serves_through_them() {
    // Linux grants at most its cap (net.core.rmem_max, wmem_max), doubled
    // for its bookkeeping: asking for a gigabyte shows twice the cap.
    let (receive_cap, send_cap) = granted(Some(1 << 30));
    let (default_receive, default_send) = granted(None);
    let asked = 1 << 20;
    let node = TestNode::start(|config| config.udp_buffer = asked).await;
    let buffers = node.udp_buffers();
    assert_eq!(buffers.receive, (2 * asked).min(receive_cap));
    assert_eq!(buffers.send, (2 * asked).min(send_cap));
    assert!(
        buffers.receive > default_receive || receive_cap <= default_receive,
        "more than the default of {default_receive} bytes, where the cap allows"
    );
    assert_eq!(node.pinged_protocol().await, PROTOCOL_VERSION);
    node.stop().await;

    // 0 leaves the system's defaults.
    let node = TestNode::start(|config| config.udp_buffer = 0).await;
    let buffers = node.udp_buffers();
    assert_eq!((buffers.receive, buffers.send), (default_receive, default_send));
    assert_eq!(node.pinged_protocol().await, PROTOCOL_VERSION);
    node.stop().await;
}
