//! What the benchmark examples share: a node in this process.

use std::path::PathBuf;

use quicnprotochat_server::Config;
use quicnprotochat_server::testing::TestNode;

/// Starts a node on 127.0.0.1 (any port) keeping its files in `dir`, with
/// the abuse limits off so the benchmarks measure the node itself; runs
/// until dropped.
pub fn start_node(dir: PathBuf) -> TestNode {
    start_node_with(dir, |_| {})
}

/// [`start_node`] with the configuration changed by `configure` last.
pub fn start_node_with(dir: PathBuf, configure: impl FnOnce(&mut Config)) -> TestNode {
    TestNode::builder()
        .in_dir(dir)
        .configure(|config| {
            config.enqueue_rate = 0;
            config.key_package_fetch_rate = 0;
            config.ping_rate = 0;
            config.max_queue_depth = 1_000_000;
        })
        .configure(configure)
        .start()
}
