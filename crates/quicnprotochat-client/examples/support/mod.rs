//! What the benchmark examples share: a node in this process.

use std::net::SocketAddr;
use std::path::PathBuf;

use quicnprotochat_server::{Config, Node};

/// Starts a node on 127.0.0.1 (any port) keeping its files in `dir`, with
/// the abuse limits off so the benchmarks measure the node itself; runs
/// until the process exits. Returns its address.
pub fn start_node(dir: PathBuf) -> SocketAddr {
    start_node_with(dir, |_| {})
}

/// [`start_node`] with the configuration changed by `configure` last.
pub fn start_node_with(dir: PathBuf, configure: impl FnOnce(&mut Config) + Send + 'static) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut config = Config::in_dir(&dir, SocketAddr::from(([127, 0, 0, 1], 0)));
            config.enqueue_rate = 0;
            config.key_package_fetch_rate = 0;
            config.ping_rate = 0;
            config.max_queue_depth = 1_000_000;
            configure(&mut config);
            let node = Node::bind(config).await.expect("node binds");
            tx.send(node.local_addr()).expect("report address");
            node.run(std::future::pending()).await.expect("node runs");
        });
    });
    rx.recv().expect("node started")
}
