//! A node running on 127.0.0.1:0 in a temporary directory, and typed
//! Cap'n Proto clients over real QUIC to it, as a device authenticated with
//! its key (a TLS client certificate) or as an anonymous caller.

#![allow(dead_code)] // each test file uses what it needs

pub mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use capnp::capability::FromClientHook;
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::auth_capnp::auth_service;
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::node_capnp::node_service;
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};
use quicnprotochat_server::testing;
use quicnprotochat_server::{Config, UdpBuffers};

/// Bounds startup, each conversation and shutdown, so a stall fails the
/// test instead of hanging it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The node every test starts (`quicnprotochat_server::testing`), with one
/// RPC thread; running until [`TestNode::stop`], or stopped when dropped
/// (a failed test).
pub struct TestNode {
    node: testing::TestNode,
}

impl TestNode {
    /// Starts a node with one RPC thread and the defaults, changed by
    /// `configure`.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TestNode {
        let node = testing::TestNode::builder()
            .configure(|config| config.rpc_threads = 1)
            .configure(configure)
            .start();
        TestNode { node }
    }

    /// The node's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.node.addr()
    }

    /// The node's `/metrics` TCP address, when started with
    /// `metrics_listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.node.metrics_addr()
    }

    /// The sizes of the node's UDP socket buffers.
    pub fn udp_buffers(&self) -> UdpBuffers {
        self.node.udp_buffers()
    }

    /// The node's (self-signed) certificate, to trust.
    pub fn cert(&self) -> &Path {
        self.node.cert()
    }

    /// Stops the node and checks that it stopped cleanly.
    pub async fn stop(mut self) {
        let stopped = tokio::task::spawn_blocking(move || self.node.stop());
        tokio::time::timeout(STEP_TIMEOUT, stopped)
            .await
            .expect("the node stops in time")
            .unwrap();
    }

    /// Runs `body` with the node's AuthService, connected as `device`, or
    /// anonymously; on a `LocalSet`, as RPC sessions run.
    pub async fn with_auth<T>(
        &self,
        device: Option<&IdentityKeypair>,
        body: impl AsyncFnOnce(auth_service::Client) -> T,
    ) -> T {
        self.with_client(device, body).await
    }

    /// [`Self::with_auth`] with the DeliveryService.
    pub async fn with_delivery<T>(
        &self,
        device: Option<&IdentityKeypair>,
        body: impl AsyncFnOnce(delivery_service::Client) -> T,
    ) -> T {
        self.with_client(device, body).await
    }

    /// [`Self::with_auth`] with the whole NodeService.
    pub async fn with_node<T>(
        &self,
        device: Option<&IdentityKeypair>,
        body: impl AsyncFnOnce(node_service::Client) -> T,
    ) -> T {
        self.with_client(device, body).await
    }

    /// The protocol version a ping over a fresh anonymous connection
    /// reports.
    pub async fn pinged_protocol(&self) -> u16 {
        self.with_node(None, async |node| {
            let response = node.ping_request().send().promise.await.unwrap();
            response.get().unwrap().get_info().unwrap().get_protocol_version()
        })
        .await
    }

    async fn with_client<C: FromClientHook, T>(
        &self,
        device: Option<&IdentityKeypair>,
        body: impl AsyncFnOnce(C) -> T,
    ) -> T {
        let local = tokio::task::LocalSet::new();
        let conversation = local.run_until(async {
            let endpoint = client_endpoint(self.cert(), device);
            let connection = endpoint.connect(self.addr(), "localhost").unwrap().await.unwrap();
            let (send, recv) = connection.open_bi().await.unwrap();
            let (session, node) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
            tokio::task::spawn_local(session);
            let result = body(node.cast_to()).await;
            connection.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            result
        });
        tokio::time::timeout(STEP_TIMEOUT, conversation)
            .await
            .expect("the conversation finishes in time")
    }
}

/// A client endpoint trusting the node certificate at `trusted`, presenting
/// `device`'s certificate (anonymous without one). Inside a tokio runtime.
pub fn client_endpoint(trusted: &Path, device: Option<&IdentityKeypair>) -> quinn::Endpoint {
    client_endpoint_at(trusted, device, "127.0.0.1:0".parse().unwrap())
}

/// [`client_endpoint`] on the local address `bind`.
pub fn client_endpoint_at(
    trusted: &Path,
    device: Option<&IdentityKeypair>,
    bind: SocketAddr,
) -> quinn::Endpoint {
    let identity = device.map(|keypair| peer::client_certificate(&keypair.pkcs8_der().unwrap()).unwrap());
    let config = transport::client_config(cert::load_certificate(trusted).unwrap(), identity).unwrap();
    let mut endpoint = quinn::Endpoint::client(bind).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// A failed call's kind and text.
pub fn failure<T>(result: Result<T, capnp::Error>) -> (capnp::ErrorKind, String) {
    match result {
        Ok(_) => panic!("the call succeeded"),
        Err(error) => (error.kind, error.extra),
    }
}
