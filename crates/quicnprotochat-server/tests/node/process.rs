//! The real `quicnprotochat-server` binary as a child process, for tests
//! that need the node in a process of its own (exit codes, signals, its
//! memory).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The node binary running as a child process.
pub struct Running {
    pub child: Child,
    pub addr: SocketAddr,
    /// What the node logged up to the line with its address.
    pub startup: Vec<String>,
    pub log: mpsc::Receiver<String>,
}

/// Starts the binary in `dir` on a free port, with `flags` besides.
pub fn start(dir: &Path, flags: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-server"))
        .current_dir(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(flags)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("server binary starts");
    let (lines, log) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut startup = Vec::new();
    let addr = loop {
        let line = log
            .recv_timeout(Duration::from_secs(30))
            .expect("node logs its address");
        let addr = line
            .split("addr=")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap());
        startup.push(line);
        if let Some(addr) = addr {
            break addr;
        }
    };
    Running {
        child,
        addr,
        startup,
        log,
    }
}

/// Sends SIGTERM and returns the exit status and the rest of the log.
pub fn terminate(mut running: Running) -> (std::process::ExitStatus, String) {
    let status = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = running.child.wait().unwrap();
    let rest: Vec<String> = running.log.try_iter().collect();
    (exit, rest.join("\n"))
}
