//! One node for tests and examples (feature `testing`): the real node on
//! 127.0.0.1, on a thread and runtime of its own, with its certificate and
//! SQLite database in a directory of the test's (a fresh temporary one by
//! default); stopped when dropped. Every test and example that needs a
//! node starts it here, so that a change to how a node starts is made once.
//!
//! ```no_run
//! use quicnprotochat_server::testing::TestNode;
//!
//! let node = TestNode::builder().configure(|config| config.max_payload = 4096).start();
//! println!("node at {}, trust {}", node.addr, node.cert().display());
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::{Config, Node, UdpBuffers};

/// How to start a [`TestNode`].
pub struct Builder<'a> {
    dir: Option<PathBuf>,
    port: u16,
    base: Option<Config>,
    configure: Box<dyn FnOnce(&mut Config) + 'a>,
}

impl<'a> Builder<'a> {
    /// Keeps the certificate and database in `dir` (kept after the node
    /// stops, so a node started there again finds them), instead of a
    /// fresh temporary directory.
    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Builder<'a> {
        self.dir = Some(dir.into());
        self
    }

    /// Listens on `port` of 127.0.0.1 instead of any free one.
    pub fn port(mut self, port: u16) -> Builder<'a> {
        self.port = port;
        self
    }

    /// Starts from `config` as it is (its address and files; keep them in
    /// the [`Builder::in_dir`] directory) instead of `Config::in_dir` of the
    /// directory on 127.0.0.1.
    pub fn config(mut self, config: Config) -> Builder<'a> {
        self.base = Some(config);
        self
    }

    /// Changes the configuration (`Config::in_dir` of the directory and
    /// address) before the node starts; called after earlier ones.
    pub fn configure(mut self, change: impl FnOnce(&mut Config) + 'a) -> Builder<'a> {
        let before = self.configure;
        self.configure = Box::new(move |config| {
            before(config);
            change(config);
        });
        self
    }

    /// Starts the node and returns once it listens.
    ///
    /// # Panics
    /// If the node cannot start: the test cannot go on.
    pub fn start(self) -> TestNode {
        let (dir, temp) = match self.dir {
            Some(dir) => (dir, None),
            #[allow(clippy::expect_used)] // a test that cannot make a directory cannot run
            None => {
                let temp = tempfile::tempdir().expect("a temporary directory for the node");
                (temp.path().to_owned(), Some(temp))
            }
        };
        let mut config = self
            .base
            .unwrap_or_else(|| Config::in_dir(&dir, SocketAddr::from(([127, 0, 0, 1], self.port))));
        (self.configure)(&mut config);
        TestNode::run(config, dir, temp)
    }
}

/// The real node, running until dropped (or [`TestNode::stop`]ped).
pub struct TestNode {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// The directory of its certificate and database.
    pub dir: PathBuf,
    metrics: Option<SocketAddr>,
    udp_buffers: UdpBuffers,
    cert: PathBuf,
    temp: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Ends with what `Node::run` returned.
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// What a started node reports before it runs.
struct Started {
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    udp_buffers: UdpBuffers,
}

impl TestNode {
    /// A node to configure before it starts.
    pub fn builder() -> Builder<'static> {
        Builder {
            dir: None,
            port: 0,
            base: None,
            configure: Box::new(|_| {}),
        }
    }

    /// A node with the defaults, in a fresh temporary directory, on any
    /// free port.
    pub fn start() -> TestNode {
        Self::builder().start()
    }

    /// Runs a node with `config`, which keeps its files in `dir`.
    #[allow(clippy::expect_used)] // a node that cannot start fails the test
    fn run(config: Config, dir: PathBuf, temp: Option<tempfile::TempDir>) -> TestNode {
        let cert = config.tls_cert.clone();
        let (shutdown, stop) = oneshot::channel::<()>();
        let (started, report) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("test-node".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async move {
                    let node = match Node::bind(config).await {
                        Ok(node) => node,
                        Err(e) => {
                            let _ = started.send(Err(e.to_string()));
                            return Err("did not start".to_owned());
                        }
                    };
                    let _ = started.send(Ok(Started {
                        addr: node.local_addr(),
                        metrics: node.metrics_addr(),
                        udp_buffers: node.udp_buffers(),
                    }));
                    node.run(async {
                        let _ = stop.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
                })
            })
            .expect("a thread for the node");
        let started = match report.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => panic!("the node did not start: {e}"),
            Err(_) => panic!("the node's thread ended before it started"),
        };
        TestNode {
            addr: started.addr,
            dir,
            metrics: started.metrics,
            udp_buffers: started.udp_buffers,
            cert,
            temp,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The node's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's (self-signed) certificate, which clients trust.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The node's `/metrics` TCP address, when configured with
    /// `metrics_listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// The sizes of the node's UDP socket buffers.
    pub fn udp_buffers(&self) -> UdpBuffers {
        self.udp_buffers
    }

    /// Stops the node and waits until its database is closed.
    ///
    /// # Panics
    /// If the node did not stop cleanly.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("the node stopped with an error: {e}"),
                Err(_) => panic!("the node's thread panicked"),
            }
        }
    }

    /// What the node's run ended with, if it stopped by itself (it was
    /// not told to); `None` while it runs.
    pub fn stopped_by_itself(&mut self) -> Option<Result<(), String>> {
        if !self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            return None;
        }
        self.shutdown = None;
        self.thread.take().map(|thread| {
            thread
                .join()
                .unwrap_or_else(|_| Err("the node's thread panicked".into()))
        })
    }

    /// Stops the node and starts it again on the same port and files, its
    /// configuration changed by `adjust` (from `Config::in_dir`).
    pub fn restart_with(&mut self, adjust: impl FnOnce(&mut Config)) {
        self.stop();
        let mut config = Config::in_dir(&self.dir, SocketAddr::from(([127, 0, 0, 1], self.addr.port())));
        adjust(&mut config);
        let mut node = Self::run(config, self.dir.clone(), self.temp.take());
        std::mem::swap(self, &mut node);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The node may be gone already; nothing to do then.
            let _ = shutdown.send(());
        }
        // Waited for, so that its files are closed before the directory
        // goes; not while a failed test unwinds, which must not hang.
        if let Some(thread) = self.thread.take()
            && !std::thread::panicking()
        {
            let _ = thread.join();
        }
    }
}
