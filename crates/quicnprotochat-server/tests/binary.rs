//! The real `quicnprotochat-server` binary: first start generates the
//! certificate, a client can talk to it, SIGTERM shuts it down cleanly, and a
//! second start reuses the certificate and the stored data.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use capnp::capability::FromClientHook;
use node::process::{start, terminate};
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};

/// The queue the test writes and reads: that of the identity with seed 9.
static QUEUE: std::sync::LazyLock<quicnprotochat_core::IdentityKey> = std::sync::LazyLock::new(|| {
    quicnprotochat_core::IdentityKeypair::from_secret_bytes(&[9; 32]).public_key()
});

fn with_delivery<T>(
    addr: SocketAddr,
    trusted: &Path,
    body: impl AsyncFnOnce(delivery_service::Client) -> T,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        // Authenticated as the owner of the queue the test uses.
        let owner = quicnprotochat_core::IdentityKeypair::from_secret_bytes(&[9; 32]);
        let certificate = peer::client_certificate(&owner.pkcs8_der().unwrap()).unwrap();
        let config =
            transport::client_config(cert::load_certificate(trusted).unwrap(), Some(certificate)).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (send, recv) = connection.open_bi().await.unwrap();
        let (session, node) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
        tokio::task::spawn_local(session);
        let result = body(node.cast_to()).await;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        result
    })
}

/// Queues `payload` in the test's queue through the node at `addr`.
fn enqueue(addr: SocketAddr, trusted: &Path, payload: &[u8]) {
    with_delivery(addr, trusted, async |delivery| {
        let mut request = delivery.enqueue_request();
        request.get().set_recipient_key(QUEUE.as_bytes());
        request.get().set_payload(payload);
        request.send().promise.await.unwrap();
    });
}

#[cfg(unix)]
#[test]
fn the_binary_generates_its_certificate_serves_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), &[]);
    let cert_path = dir.path().join("data/server-cert.der");
    let first_cert = std::fs::read(&cert_path).expect("certificate generated in data/");
    assert!(dir.path().join("data/server-key.der").exists());
    assert!(dir.path().join("data/node.db").exists());

    enqueue(running.addr, &cert_path, b"kept across restarts");
    let (exit, log) = terminate(running);
    assert!(exit.success(), "exit status {exit:?}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("database closed cleanly"), "{log}");

    let running = start(dir.path(), &[]);
    assert_eq!(
        std::fs::read(&cert_path).unwrap(),
        first_cert,
        "certificate reused"
    );
    let fetched = with_delivery(running.addr, &cert_path, async |delivery| {
        let mut request = delivery.fetch_request();
        request.get().set_recipient_key(QUEUE.as_bytes());
        let response = request.send().promise.await.unwrap();
        let payloads = response.get().unwrap().get_payloads().unwrap();
        payloads.iter().map(|p| p.unwrap().to_vec()).collect::<Vec<_>>()
    });
    assert_eq!(fetched, vec![b"kept across restarts".to_vec()]);
    let (exit, _) = terminate(running);
    assert!(exit.success());
}

#[test]
fn an_invalid_flag_value_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:0", "--max-payload", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--max-payload must be between"), "{err}");
}

/// Two nodes on one SQLite file would each wake only their own subscribers,
/// splitting delivery: the second refuses to start, naming the first, and
/// the file is free again once the first stops.
#[test]
fn a_second_node_on_a_sqlite_file_in_use_exits_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &[]);
    let second = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!(
            "another node is using this database (process {} holds data/node.db.lock)",
            first.child.id()
        )),
        "{err}"
    );
    assert!(err.contains("give this node another --db"), "{err}");
    // The first node was not disturbed.
    let cert_path = dir.path().join("data/server-cert.der");
    enqueue(first.addr, &cert_path, b"still the one node");
    let (exit, log) = terminate(first);
    assert!(exit.success(), "exit status {exit:?}\n{log}");
    // Stopped, it leaves the file to the next node.
    let next = start(dir.path(), &[]);
    let (exit, log) = terminate(next);
    assert!(exit.success(), "exit status {exit:?}\n{log}");
}

/// Asked for more than Linux grants (`net.core.rmem_max`), the node still
/// starts and serves, and says what to raise.
#[cfg(target_os = "linux")]
#[test]
fn a_node_granted_smaller_udp_buffers_than_asked_says_so() {
    // Asking for a gigabyte shows the most a socket gets (twice the cap).
    let most = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
        state.set_recv_buffer_size((&socket).into(), 1 << 30).unwrap();
        state.recv_buffer_size((&socket).into()).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let asked = (2 * most).to_string();
    let running = start(dir.path(), &["--udp-buffer", &asked]);
    let startup = running.startup.join("\n");
    assert!(
        startup.contains("the kernel granted smaller UDP buffers than asked for")
            && startup.contains("net.core.rmem_max"),
        "{startup}"
    );
    let cert_path = dir.path().join("data/server-cert.der");
    enqueue(running.addr, &cert_path, b"served all the same");
    let (exit, log) = terminate(running);
    assert!(exit.success(), "exit status {exit:?}\n{log}");
}

/// A node whose stderr cannot be written when it starts exits at once with
/// code 74 (EX_IOERR), rather than panic (101) or run without a log.
#[cfg(unix)]
#[test]
fn a_node_that_cannot_write_its_log_at_start_exits_74() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .stderr(std::fs::File::create("/dev/full").unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(74));
}

/// A node whose log stops being writable while it runs (the reader of its
/// stderr went away) serves on: every log line after is dropped, none kills
/// a thread, and it still stops cleanly.
#[cfg(unix)]
#[test]
fn a_node_whose_log_breaks_while_it_runs_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        // Every call logs, so every call meets the broken log.
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = {
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
        lines
            .find_map(|line| {
                line.split("addr=")
                    .nth(1)
                    .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            })
            .expect("node logs its address")
        // The read end of its stderr closes here.
    };
    for n in 0..3u8 {
        enqueue(addr, &dir.path().join("data/server-cert.der"), &[n]);
    }
    let drained = with_delivery(addr, &dir.path().join("data/server-cert.der"), async |delivery| {
        let mut request = delivery.fetch_request();
        request.get().set_recipient_key(QUEUE.as_bytes());
        let response = request.send().promise.await.unwrap();
        response.get().unwrap().get_payloads().unwrap().len()
    });
    assert_eq!(drained, 3, "every call was served with the log gone");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Queues `payload` in the test's queue through `delivery`; the exception's
/// kind if the node refused.
async fn try_enqueue(delivery: &delivery_service::Client, payload: &[u8]) -> Result<(), capnp::ErrorKind> {
    let mut request = delivery.enqueue_request();
    request.get().set_recipient_key(QUEUE.as_bytes());
    request.get().set_payload(payload);
    request.send().promise.await.map(|_| ()).map_err(|e| e.kind)
}

/// The node's database and its log on one small disk (a tmpfs) that fills
/// up: writes are refused (`overloaded`), the log lines it cannot write are
/// dropped, and once there is room again the node carries on by itself,
/// with every acknowledged message kept and no refused one. Mounting needs
/// root (CI runs as root): elsewhere the test says so and passes.
#[cfg(unix)]
#[test]
fn a_node_whose_database_and_log_share_a_full_disk_refuses_then_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&disk)
        .output()
        .is_ok_and(|output| output.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&disk);
    let log_path = disk.join("node.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(&disk)
        .args(["--listen", "127.0.0.1:0"])
        // Every call logs, so the log meets the full disk too.
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addr: SocketAddr = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(rest) = log.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no address in {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let cert = disk.join("data/server-cert.der");

    let filler = disk.join("filler");
    let (kept, refused) = with_delivery(addr, &cert, async |delivery| {
        let mut kept = Vec::new();
        let first = vec![1u8; 64 * 1024];
        try_enqueue(&delivery, &first).await.unwrap();
        kept.push(first);
        // Fill the disk to the last byte.
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0x5a; 64 * 1024];
            while file.write_all(&chunk).and_then(|()| file.sync_data()).is_ok() {}
        }
        // Big payloads until one finds no room (a few fit in pages SQLite
        // holds already).
        let mut refused = None;
        for n in 2..60u8 {
            let payload = vec![n; 200 * 1024];
            match try_enqueue(&delivery, &payload).await {
                Ok(()) => kept.push(payload),
                Err(kind) => {
                    refused = Some(kind);
                    break;
                }
            }
        }
        (kept, refused)
    });
    assert_eq!(
        refused,
        Some(capnp::ErrorKind::Overloaded),
        "a full disk refuses a write as `overloaded` (nothing stored)"
    );
    std::fs::remove_file(&filler).unwrap();
    // Room again: the same node takes writes, without a restart.
    let last = vec![0xee; 1024];
    let fetched = with_delivery(addr, &cert, async |delivery| {
        try_enqueue(&delivery, &last).await.unwrap();
        let mut request = delivery.fetch_request();
        request.get().set_recipient_key(QUEUE.as_bytes());
        let response = request.send().promise.await.unwrap();
        let payloads = response.get().unwrap().get_payloads().unwrap();
        payloads.iter().map(|p| p.unwrap().to_vec()).collect::<Vec<_>>()
    });
    let mut expected = kept;
    expected.push(last);
    assert_eq!(fetched.len(), expected.len());
    assert!(
        fetched == expected,
        "every acknowledged message once, the refused one never"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
}
