//! A node running on 127.0.0.1:0 in a temporary directory, and typed
//! Cap'n Proto clients over real QUIC to it, as a device authenticated with
//! its key (a TLS client certificate) or as an anonymous caller.

#![allow(dead_code)] // each test file uses what it needs

pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capnp::capability::FromClientHook;
use quicnprotochat_core::IdentityKeypair;
use quicnprotochat_proto::auth_capnp::auth_service;
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::node_capnp::node_service;
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};
use quicnprotochat_server::{Config, Node, ServerError, UdpBuffers};

/// Bounds startup, each conversation and shutdown, so a stall fails the
/// test instead of hanging it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A node running until [`TestNode::stop`], or told to stop when dropped
/// (a failed test).
pub struct TestNode {
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    udp_buffers: UdpBuffers,
    cert: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with one RPC thread and the defaults, changed by
    /// `configure`.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::in_dir(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)));
        config.rpc_threads = 1;
        configure(&mut config);
        let cert = config.tls_cert.clone();
        let node = tokio::time::timeout(STEP_TIMEOUT, Node::bind(config))
            .await
            .unwrap()
            .unwrap();
        let addr = node.local_addr();
        let metrics = node.metrics_addr();
        let udp_buffers = node.udp_buffers();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(node.run(async {
            let _ = stopped.await;
        }));
        TestNode {
            addr,
            metrics,
            udp_buffers,
            cert,
            stop: Some(stop),
            running: Some(running),
            _dir: dir,
        }
    }

    /// The node's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's `/metrics` TCP address, when started with
    /// `metrics_listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// The sizes of the node's UDP socket buffers.
    pub fn udp_buffers(&self) -> UdpBuffers {
        self.udp_buffers
    }

    /// The node's (self-signed) certificate, to trust.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// Stops the node and checks that it stopped cleanly.
    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let running = self.running.take().unwrap();
        tokio::time::timeout(STEP_TIMEOUT, running)
            .await
            .expect("the node stops in time")
            .unwrap()
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
            let endpoint = client_endpoint(&self.cert, device);
            let connection = endpoint.connect(self.addr, "localhost").unwrap().await.unwrap();
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

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The node may be gone already; nothing to do then.
            let _ = stop.send(());
        }
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
