//! Shared test helpers: a real node on 127.0.0.1 with a temporary data
//! directory, and a way to run the real client binary against it.

#![allow(dead_code)] // each test binary uses a different subset

pub mod tampered;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use quicnprotochat_client::node_client::{ConnectOptions, NodeClient};
use quicnprotochat_client::passphrase::PASSPHRASE_VARIABLE;
use quicnprotochat_core::{IdentityKey, IdentityKeypair, StateKey};
use quicnprotochat_proto::outcome::SendOutcome;
use quicnprotochat_server::Config;
use quicnprotochat_server::testing;

/// The node every test starts (`quicnprotochat_server::testing`), with
/// ways to run the client against it.
pub struct TestNode {
    node: testing::TestNode,
}

impl std::ops::Deref for TestNode {
    type Target = testing::TestNode;

    fn deref(&self) -> &testing::TestNode {
        &self.node
    }
}

impl std::ops::DerefMut for TestNode {
    fn deref_mut(&mut self) -> &mut testing::TestNode {
        &mut self.node
    }
}

impl TestNode {
    /// A node with a fresh temporary data directory.
    pub fn start() -> TestNode {
        TestNode {
            node: testing::TestNode::start(),
        }
    }

    /// A node keeping its certificate and database in `dir`, on `port`
    /// (0: any free port).
    pub fn start_in(dir: PathBuf, port: u16) -> TestNode {
        TestNode {
            node: testing::TestNode::builder().in_dir(dir).port(port).start(),
        }
    }

    /// A node in `dir` on any free port, its defaults changed by
    /// `configure`.
    pub fn start_configured(dir: &Path, configure: impl FnOnce(&mut Config)) -> TestNode {
        TestNode {
            node: testing::TestNode::builder()
                .in_dir(dir)
                .configure(configure)
                .start(),
        }
    }

    /// A node with a custom configuration, its files in `dir`.
    pub fn start_with(config: Config, dir: PathBuf) -> TestNode {
        TestNode {
            node: testing::TestNode::builder().in_dir(dir).config(config).start(),
        }
    }

    /// The node's certificate, which clients trust.
    pub fn cert(&self) -> PathBuf {
        self.node.cert().to_owned()
    }

    /// Stops the node and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.node.restart_with(|_| {});
    }

    /// Connection options for library clients.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            server: self.addr.to_string(),
            server_name: None,
            ca_cert: self.cert(),
        }
    }

    /// An anonymous library client connected to this node (call inside a
    /// LocalSet).
    pub async fn connect(&self) -> NodeClient {
        NodeClient::connect(&self.options(), None)
            .await
            .expect("client connects")
    }

    /// A library client authenticated as `identity`.
    pub async fn connect_as(&self, identity: &IdentityKeypair) -> NodeClient {
        NodeClient::connect(&self.options(), Some(identity))
            .await
            .expect("client connects")
    }

    /// Runs the client binary against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full = vec![
            "--server".to_owned(),
            self.addr.to_string(),
            "--ca-cert".to_owned(),
        ];
        full.push(self.cert().display().to_string());
        full.extend(args.iter().map(|a| a.to_string()));
        run_client(&full)
    }

    /// The client binary's command line against this node with `args`, as
    /// one string for a shell (`script -c`, which runs it on a terminal),
    /// with the tests' passphrase in its environment.
    pub fn shell_line(&self, args: &[&str]) -> String {
        format!(
            "env {PASSPHRASE_VARIABLE}={PASSPHRASE} {}",
            self.shell_line_asking(args)
        )
    }

    /// [`TestNode::shell_line`] without a passphrase: at a terminal, the
    /// client asks for it.
    #[allow(dead_code)] // only the state file tests type one
    pub fn shell_line_asking(&self, args: &[&str]) -> String {
        let (server, cert) = (self.addr.to_string(), self.cert().display().to_string());
        [
            env!("CARGO_BIN_EXE_quicnprotochat-client"),
            "--server",
            &server,
            "--ca-cert",
            &cert,
        ]
        .into_iter()
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
    }

    /// The client binary set up to talk to this node with `args`, to spawn
    /// (for long-running commands: `chat`, `recv --follow`).
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_through(self.addr, args)
    }

    /// [`TestNode::command`] reaching the node at `server` (a [`Relay`]
    /// in front of it).
    pub fn command_through(&self, server: SocketAddr, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"));
        command
            .args(["--server", &server.to_string()])
            .args(["--ca-cert", &self.cert().display().to_string()])
            .args(args)
            .env_remove("QUICNPROTOCHAT_SERVER")
            .env_remove("QUICNPROTOCHAT_CA_CERT")
            .env_remove("QUICNPROTOCHAT_STATE")
            .env(PASSPHRASE_VARIABLE, PASSPHRASE);
        command
    }

    /// Runs the client binary and returns its stdout, failing the test (with
    /// its stderr) if it exits non-zero.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "client {args:?} failed: {}\n{}",
            stderr(&output),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }
}

/// Runs `command` with `input` piped to its stdin, then closed, as a
/// script does; returns once it exits.
pub fn run_piped(mut command: Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("the client reads its stdin");
    child.wait_with_output().expect("the client exits")
}

/// Runs the client binary with exactly `args`.
pub fn run_client<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quicnprotochat-client"))
        .args(args)
        .env_remove("QUICNPROTOCHAT_SERVER")
        .env_remove("QUICNPROTOCHAT_CA_CERT")
        .env_remove("QUICNPROTOCHAT_STATE")
        .env(PASSPHRASE_VARIABLE, PASSPHRASE)
        .output()
        .expect("client binary runs")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The passphrase of every state file the tests make (through the CLI,
/// which reads it from the environment, or in the test itself).
pub const PASSPHRASE: &str = "test-passphrase";

/// The state file at `path`, unlocked with [`PASSPHRASE`].
#[allow(dead_code)] // not every test binary opens a state file itself
pub fn access(path: &str) -> quicnprotochat_client::state::StateAccess {
    quicnprotochat_client::state::StateAccess::with_passphrase(path, PASSPHRASE)
}

/// A path for a state file in `dir`.
pub fn state(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Runs `body` on a current-thread runtime inside a LocalSet, as the client
/// does (Cap'n Proto RPC is !Send).
pub fn local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

/// Alice and Bob, each with a state file in `dir`, in a group `group_id`
/// that Alice created and Bob joined. Returns (alice state, bob state, alice
/// key, bob key).
pub fn alice_and_bob_in_a_group(node: &TestNode, dir: &std::path::Path, group_id: &str) -> [String; 4] {
    let (alice, bob) = (state(dir, "alice.state"), state(dir, "bob.state"));
    let alice_key = node
        .cli_ok(&["register-state", "--state", &alice])
        .trim()
        .to_owned();
    let bob_key = node
        .cli_ok(&["register-state", "--state", &bob])
        .trim()
        .to_owned();
    node.cli_ok(&["create-group", "--state", &alice, "--group-id", group_id]);
    node.cli_ok(&["invite", "--state", &alice, "--peer-key", &bob_key]);
    node.cli_ok(&["join", "--state", &bob]);
    [alice, bob, alice_key, bob_key]
}

/// A fixed identity for tests: the same `n` gives the same key.
pub fn identity(n: u8) -> IdentityKeypair {
    IdentityKeypair::from_secret_bytes(&[n; 32])
}

/// Enqueues `payload` for `recipient` and fails the test unless the node
/// accepted it.
pub async fn enqueue_ok(client: &NodeClient, recipient: &IdentityKey, payload: &[u8]) {
    assert_eq!(
        client
            .enqueue(recipient, payload)
            .await
            .expect("the node answers"),
        SendOutcome::Accepted
    );
}

/// Gets `welcome` (a Welcome the node has no Commit for) into the queue
/// of `recipient` the one way the node still takes a Welcome: as the
/// Welcome of an accepted Commit, here the first change of a throwaway
/// group of `adder`'s that adds `recipient` (see [`add_to_new_group`]),
/// since a Welcome goes only to those its Commit adds. The node keeps no
/// tree for the Welcome's own group and epoch, as a hostile adder would
/// arrange.
pub async fn smuggle_welcome(
    client: &NodeClient,
    adder: &IdentityKeypair,
    recipient: IdentityKey,
    welcome: Vec<u8>,
) {
    let cover_id = format!("cover-{}", rand::random::<u64>());
    add_to_new_group(client, adder, recipient, cover_id.as_bytes(), Some(welcome)).await;
}

/// The key of the epoch `welcome` starts, as its joiner computes it: from
/// the Welcome alone, before it has the ratchet tree (which the node keeps
/// sealed under this key).
pub fn welcome_epoch_key(
    provider: &impl openmls::storage::OpenMlsProvider,
    welcome: &[u8],
) -> quicnprotochat_core::EpochKey {
    use quicnprotochat_core::{CoreError, GroupMember, NoDeviceLists};
    match GroupMember::join(provider, welcome, None, &NoDeviceLists).err() {
        Some(CoreError::RatchetTreeNeeded { epoch_key, .. }) => epoch_key,
        other => panic!("a Welcome without its tree names the key to fetch it with, not {other:?}"),
    }
}

/// `adder` makes the group `group_id` and adds `recipient` with a
/// KeyPackage of theirs from the node, through the node's ordering like any
/// `invite`: the Commit is the group's first change (with its initial
/// state), its Welcome goes to `recipient` (`welcome` instead, if given).
/// Returns the group, merged, its provider, to send into it, and the
/// group's state key, which the node keeps the group's state under.
pub async fn add_to_new_group(
    client: &NodeClient,
    adder: &IdentityKeypair,
    recipient: IdentityKey,
    group_id: &[u8],
    welcome: Option<Vec<u8>>,
) -> (
    quicnprotochat_core::GroupMember,
    openmls_rust_crypto::OpenMlsRustCrypto,
    StateKey,
) {
    use quicnprotochat_core::{GroupId, GroupMember, NoDeviceLists};
    use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedKeyPackage};
    use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};

    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let group_id = GroupId::new(group_id.to_vec()).unwrap();
    let mut group = GroupMember::create(&provider, adder, &group_id).unwrap();
    let state_key = group.current_state_key(&provider).unwrap();
    let state = group.export_public_state(&provider, adder).unwrap();
    let FetchedKeyPackage::Package(package) = client.fetch_key_package(&recipient).await.unwrap() else {
        panic!("the recipient has KeyPackages on the node");
    };
    let added = group
        .add_members(&provider, adder, &[package], &NoDeviceLists)
        .unwrap();
    let group_info = group.pending_group_info().map(<[u8]>::to_vec);
    let envelope = |recipients: Vec<IdentityKey>, payload| Envelope {
        recipients,
        payload,
        message_id: None,
    };
    let outcome = client
        .publish_commit(&CommitToSend {
            group_id: &group_id,
            epoch: 0,
            commit: &envelope(Vec::new(), added.commit),
            welcome: Some(&envelope(vec![recipient], welcome.unwrap_or(added.welcome))),
            initial_state: Some(&GroupState {
                group_info: state.group_info,
                ratchet_tree: state.ratchet_tree,
            }),
            group_info: group_info.as_deref(),
            epoch_key: Some(&group.pending_epoch_key(&provider).unwrap()),
            state_key: &state_key,
            new_state_key: None,
        })
        .await
        .unwrap();
    assert_eq!(outcome, ChangeOutcome::Accepted);
    group.merge_pending_commit(&provider).unwrap();
    (group, provider, state_key)
}

/// The state key `member`'s state file keeps for `group_id`: what its
/// client presents to the node for that group.
pub fn state_key_of(member: &Member, group_id: &quicnprotochat_core::GroupId) -> StateKey {
    quicnprotochat_client::state::StateFile::open(&access(&member.state))
        .unwrap()
        .kept_state_key(group_id)
        .unwrap()
        .unwrap_or_else(|| panic!("{} keeps a state key for {group_id:?}", member.name))
}

/// One person driving the real CLI: a state file and the identity key
/// `register-state` printed.
pub struct Member {
    pub name: String,
    pub state: String,
    pub key: String,
}

impl Member {
    /// Registers `name` with a state file in `dir`.
    pub fn register(node: &TestNode, dir: &Path, name: &str) -> Member {
        let state = state(dir, &format!("{name}.state"));
        let key = node
            .cli_ok(&["register-state", "--state", &state])
            .trim()
            .to_owned();
        Member {
            name: name.to_owned(),
            state,
            key,
        }
    }

    /// The first 16 hex characters of the key, as the CLI shows members.
    pub fn short(&self) -> &str {
        &self.key[..16]
    }

    /// Runs a stateful command for this member; returns stdout, failing the
    /// test if the command fails.
    pub fn run(&self, node: &TestNode, command: &str, args: &[&str]) -> String {
        let (ok, out, err) = self.try_run(node, command, args);
        assert!(ok, "{command} {args:?} failed: {err}\n{out}");
        out
    }

    /// Runs a stateful command; returns (success, stdout, stderr).
    pub fn try_run(&self, node: &TestNode, command: &str, args: &[&str]) -> (bool, String, String) {
        let mut full = vec![command, "--state", &self.state];
        full.extend_from_slice(args);
        let out = node.cli(&full);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr(&out),
        )
    }
}

/// `first` creates `group` and invites `rest` in one commit; they all join.
pub fn group_of(node: &TestNode, group: &str, first: &Member, rest: &[&Member]) {
    first.run(node, "create-group", &["--group-id", group]);
    invite_all(node, group, first, rest);
}

/// The MLS id of the group `name` of `member`, as `groups --json` prints it.
pub fn group_id_of(node: &TestNode, member: &Member, name: &str) -> quicnprotochat_core::GroupId {
    let listed = member.run(node, "groups", &["--json"]);
    let document: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let group = document["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|group| group["group"] == name)
        .unwrap_or_else(|| panic!("{name} in {listed}"));
    quicnprotochat_core::GroupId::new(hex::decode(group["group_id"].as_str().unwrap()).unwrap()).unwrap()
}

/// `first` invites `rest` to its `group` in one commit; they all join.
pub fn invite_all(node: &TestNode, group: &str, first: &Member, rest: &[&Member]) {
    let mut args = vec!["--group-id", group];
    for member in rest {
        args.extend_from_slice(&["--peer-key", &member.key]);
    }
    first.run(node, "invite", &args);
    for member in rest {
        member.run(node, "join", &[]);
    }
}

/// A `recv --follow` process with its output read line by line.
pub struct Follower {
    child: Child,
    lines: Receiver<String>,
    notes: Receiver<String>,
}

impl Follower {
    /// Starts `command` (a `recv --follow`) with its output piped.
    pub fn start(mut command: Command) -> Follower {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, notes) = (
            Self::read(child.stdout.take().unwrap()),
            Self::read(child.stderr.take().unwrap()),
        );
        Follower { child, lines, notes }
    }

    fn read(from: impl std::io::Read + Send + 'static) -> Receiver<String> {
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        receiver
    }

    /// Waits for a note on stderr containing `text`; returns the notes seen.
    pub fn await_note(&self, text: &str, within: Duration) -> Vec<String> {
        let give_up = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.notes.recv_timeout(left) {
                Ok(note) if note.contains(text) => {
                    seen.push(note);
                    return seen;
                }
                Ok(note) => seen.push(note),
                Err(_) => panic!("no note containing {text:?} within {within:?}; got {seen:#?}"),
            }
        }
    }

    /// The next line on stdout, waiting up to 20 s.
    pub fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("pushed and printed")
    }
}

impl Follower {
    /// Every line it printed and nobody read yet, once it has exited.
    pub fn rest(&self) -> Vec<String> {
        self.lines.iter().collect()
    }

    /// Interrupts it (SIGINT, as Ctrl-C) and waits for it to exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        self.child.wait().expect("the follower exits")
    }
}

impl Follower {
    /// Writes `line` and a newline to its stdin, which the command given to
    /// [`Follower::start`] must have piped.
    pub fn type_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").expect("the process reads its stdin");
    }

    /// Waits for it to exit on its own, up to `within`, and returns how.
    pub fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let give_up = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                return status;
            }
            assert!(Instant::now() < give_up, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MLS PrivateMessage (RFC 9420, section 6.3) of `group_id` in `epoch`
/// whose ciphertext is `size` bytes of noise: what anyone can send to a
/// member without being in the group.
pub fn private_message(group_id: &[u8], epoch: u64, size: usize) -> Vec<u8> {
    let mut message = vec![0x00, 0x01, 0x00, 0x02];
    message.push(group_id.len() as u8);
    message.extend_from_slice(group_id);
    message.extend_from_slice(&epoch.to_be_bytes());
    message.push(0x01); // application
    message.push(0x00); // no authenticated data
    message.push(0x04); // encrypted sender data
    message.extend_from_slice(&[0xa5; 4]);
    // The size in MLS's variable-length form, which must be the shortest.
    match u32::try_from(size).unwrap() {
        short @ 0..64 => message.push(short as u8),
        medium @ 64..16_384 => message.extend_from_slice(&(medium as u16 | 0x4000).to_be_bytes()),
        long => message.extend_from_slice(&(long | 0x8000_0000).to_be_bytes()),
    }
    message.resize(message.len() + size, 0x5a);
    message
}

/// A UDP relay in front of a node whose link can be cut, as a network
/// outage cuts it: while cut, every datagram either way is dropped. Serves
/// one client address (the last one heard from). Its threads end with the
/// test process.
pub struct Relay {
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(target).unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (front_in, back_out) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (is_cut, seen) = (cut.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buffer = [0u8; 65_536];
            while let Ok((len, from)) = front_in.recv_from(&mut buffer) {
                *seen.lock().unwrap() = Some(from);
                if !is_cut.load(Ordering::SeqCst) {
                    let _ = back_out.send(&buffer[..len]);
                }
            }
        });
        let is_cut = cut.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 65_536];
            while let Ok(len) = back.recv(&mut buffer) {
                let to = *client.lock().unwrap();
                if let Some(to) = to
                    && !is_cut.load(Ordering::SeqCst)
                {
                    let _ = front.send_to(&buffer[..len], to);
                }
            }
        });
        Relay { addr, cut }
    }

    /// Cuts the link (`true`) or restores it.
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}
