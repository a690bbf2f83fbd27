//! `chat`: the real client binary, driven through its stdin, against a
//! real node; a second client checks what arrived.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Follower, Member, Relay, TestNode, group_of};

/// `chat` for `member` against `node` (in `group`, else the current
/// group), ready to spawn.
fn chat(node: &TestNode, member: &Member, group: Option<&str>) -> Command {
    let mut args = vec!["chat", "--state", &member.state];
    args.extend(group.map(|group| ["--group-id", group]).into_iter().flatten());
    node.command(&args)
}

/// `member` chatting in `group` with stdin piped, once it is subscribed.
fn chatting(node: &TestNode, member: &Member, group: &str) -> Follower {
    let mut command = chat(node, member, Some(group));
    command.stdin(Stdio::piped());
    let chat = Follower::start(command);
    chat.await_note(&format!("chatting in {group}"), Duration::from_secs(20));
    chat
}

/// Runs `chat` in `group` with `input` piped, as a script does.
fn chat_piped(node: &TestNode, member: &Member, group: &str, input: &str) -> Output {
    common::run_piped(chat(node, member, Some(group)), input)
}

#[test]
fn piped_lines_are_each_sent_before_chat_exits_at_the_end_of_input() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);

    let output = chat_piped(&node, &alice, "talk", "first line\n\nsecond line\n");
    assert!(
        output.status.success(),
        "chat failed: {}",
        common::stderr(&output)
    );

    // Exited 0 means the node took both: Bob's plain `recv` finds them.
    let received = bob.run(&node, "recv", &[]);
    let lines: Vec<&str> = received.lines().collect();
    assert_eq!(
        lines,
        [
            format!("talk {}: first line", alice.short()),
            format!("talk {}: second line", alice.short()),
        ]
    );
}

#[test]
fn a_refused_line_fails_a_piped_chat() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);

    let output = chat_piped(&node, &alice, "talk", "/dance\n");
    assert!(!output.status.success());
    assert!(common::stderr(&output).contains("unknown command /dance"));
}

#[test]
fn chat_shows_pushed_messages_sends_typed_lines_and_ends_on_quit() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);

    let mut bob_chat = chatting(&node, &bob, "talk");

    // Pushed while chat waits on its stdin.
    alice.run(&node, "send", &["--msg", "hello bob"]);
    assert_eq!(bob_chat.next_line(), format!("talk {}: hello bob", alice.short()));

    bob_chat.type_line("/members");
    let members = [bob_chat.next_line(), bob_chat.next_line()];
    assert!(
        members.iter().any(|line| line.starts_with(&alice.key)),
        "{members:?}"
    );
    assert!(
        members
            .iter()
            .any(|line| line.starts_with(&bob.key) && line.contains("(you)")),
        "{members:?}"
    );

    bob_chat.type_line("hello alice");
    bob_chat.await_note("sent to 1 member(s) of talk", Duration::from_secs(20));
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("talk {}: hello alice", bob.short())
    );

    bob_chat.type_line("/quit");
    assert!(bob_chat.wait_for_exit(Duration::from_secs(20)).success());
}

#[test]
fn chat_goes_on_through_a_restarted_node() {
    let mut node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);

    let mut bob_chat = chatting(&node, &bob, "talk");

    // The node goes away and comes back on the same address and database.
    node.restart();
    bob_chat.await_note("chatting through", Duration::from_secs(60));
    alice.run(&node, "send", &["--msg", "after the restart"]);
    assert_eq!(
        bob_chat.next_line(),
        format!("talk {}: after the restart", alice.short())
    );
    bob_chat.type_line("still here");
    bob_chat.await_note("sent to 1 member(s) of talk", Duration::from_secs(20));
    bob_chat.type_line("/quit");
    assert!(bob_chat.wait_for_exit(Duration::from_secs(20)).success());
    assert_eq!(
        alice.run(&node, "recv", &[]).trim(),
        format!("talk {}: still here", bob.short())
    );
}

/// A message line the connection was lost under, after it was encrypted
/// and before the node answered, is delivered once reconnected, with the
/// same message id, and arrives once; the lines after it keep their order.
#[test]
fn a_message_cut_off_by_a_lost_connection_is_sent_once_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    // One message a second for each sender (bursts of two): Bob's third
    // line waits on the rate limit, encrypted, and the link goes down
    // while it waits.
    let node = TestNode::start_configured(dir.path(), |config| config.enqueue_rate = 1);
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);

    let relay = Relay::start(node.addr);
    let mut command =
        node.command_through(relay.addr, &["chat", "--state", &bob.state, "--group-id", "talk"]);
    command.stdin(Stdio::piped());
    let mut bob_chat = Follower::start(command);
    bob_chat.await_note("chatting in talk", Duration::from_secs(20));
    for line in ["one", "two", "three"] {
        bob_chat.type_line(line);
    }
    bob_chat.await_note("the node asks us to slow down", Duration::from_secs(20));
    relay.cut(true);
    // The client gives the silent connection up after its idle timeout.
    bob_chat.await_note("that message is sent once reconnected", Duration::from_secs(60));
    relay.cut(false);
    bob_chat.await_note("chatting through", Duration::from_secs(60));
    // Each line is handled to the end before the next is read.
    bob_chat.type_line("four");
    bob_chat.type_line("/quit");
    assert!(bob_chat.wait_for_exit(Duration::from_secs(30)).success());

    let received = alice.run(&node, "recv", &[]);
    let lines: Vec<&str> = received.lines().collect();
    assert_eq!(
        lines,
        ["one", "two", "three", "four"].map(|text| format!("talk {}: {text}", bob.short())),
        "{received}"
    );
    let history = bob.run(&node, "history", &[]);
    assert!(!history.contains("not delivered"), "{history}");
}

#[test]
fn an_invitation_typed_in_chat_reaches_the_invitees_chat_and_is_joined_on_accept() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);

    // Carol is in no group yet: her chat waits for an invitation.
    let mut command = chat(&node, &carol, None);
    command.stdin(Stdio::piped());
    let mut carol_chat = Follower::start(command);
    carol_chat.await_note("no group yet", Duration::from_secs(20));

    let input = format!("/invite {}\nwelcome carol\n", carol.key);
    let output = chat_piped(&node, &alice, "talk", &input);
    assert!(
        output.status.success(),
        "chat failed: {}",
        common::stderr(&output)
    );

    // Alice is no contact of Carol's: an invitation, joined on /accept. Its
    // name is for members only, so the invitation shows the group's id.
    let invited = carol_chat.await_note("invites you to group", Duration::from_secs(20));
    let id = invited
        .last()
        .and_then(|note| note.split("invites you to group ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32, "a random 16-byte id in hex: {invited:?}");
    carol_chat.type_line(&format!("/accept {id}"));
    carol_chat.await_note(&format!("joined group {id}"), Duration::from_secs(20));
    carol_chat.await_note(
        &format!("group {} is called talk", &id[..16]),
        Duration::from_secs(20),
    );
    assert_eq!(
        carol_chat.next_line(),
        format!("talk {}: welcome carol", alice.short())
    );
    // The group joined is where her lines go.
    carol_chat.type_line("hi all");
    carol_chat.await_note("sent to 2 member(s) of talk", Duration::from_secs(20));
    carol_chat.type_line("/quit");
    assert!(carol_chat.wait_for_exit(Duration::from_secs(20)).success());

    // Bob, not chatting, is told who joined when he catches up.
    let (ok, received, notes) = bob.try_run(&node, "recv", &[]);
    assert!(ok, "{notes}");
    assert!(
        received.ends_with(&format!("talk {}: hi all\n", carol.short())),
        "{received}"
    );
    assert!(
        notes.contains(&format!(
            "group talk: {} joined; now at epoch 2, 3 members",
            carol.short()
        )),
        "{notes}"
    );
    // And who left, by contact name when he has one.
    bob.run(&node, "contacts", &["add", "carol", &carol.key]);
    alice.run(&node, "remove", &["--group-id", "talk", "--peer-key", &carol.key]);
    let (ok, _, notes) = bob.try_run(&node, "recv", &[]);
    assert!(
        ok && notes.contains("group talk: carol left; now at epoch 3, 2 members"),
        "{notes}"
    );
}

/// What a terminal (a pseudo-terminal `script` opens) has shown so far,
/// read as it comes.
struct Screen {
    shown: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Screen {
    fn watch(from: impl std::io::Read + Send + 'static) -> Screen {
        let shown = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let into = shown.clone();
        std::thread::spawn(move || {
            let mut from = from;
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut from, &mut buffer) {
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Screen { shown }
    }

    /// Waits until the screen shows `text` after byte `from`; returns
    /// where it starts.
    fn await_text(&self, text: &str, from: usize) -> usize {
        let give_up = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let shown = self.shown.lock().unwrap().clone();
            if let Some(at) = shown.get(from..).and_then(|rest| rest.find(text)) {
                return from + at;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "the terminal never showed {text:?} after byte {from}:\n{shown:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A person chatting at a terminal: a message that arrives while a line is
/// half typed is shown above it, and the line stays as typed (its rest
/// typed afterwards makes one message); the editor keeps a history.
#[test]
fn a_message_arriving_in_chat_leaves_the_half_typed_line_intact() {
    use std::io::Write;

    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let [alice, bob] = ["alice", "bob"].map(|n| Member::register(&node, dir.path(), n));
    group_of(&node, "talk", &alice, &[&bob]);
    alice.run(&node, "contacts", &["add", "bob", &bob.key]);

    let command = node.shell_line(&["chat", "--state", &alice.state]);
    let mut terminal = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux) runs");
    let mut keys = terminal.stdin.take().unwrap();
    let screen = Screen::watch(terminal.stdout.take().unwrap());
    let mut type_keys = |text: &str| {
        keys.write_all(text.as_bytes()).unwrap();
        keys.flush().unwrap();
    };

    let ready = screen.await_text("chatting in talk", 0);
    let prompt = screen.await_text("> ", ready);
    type_keys("half");
    let typed = screen.await_text("half", prompt);

    bob.run(&node, "send", &["--msg", "hello from bob"]);
    let arrived = screen.await_text("talk bob: hello from bob", typed);
    // Below the message, the prompt is drawn again with the half-typed line.
    screen.await_text("> half", arrived);

    type_keys(" typed\r");
    screen.await_text("sent to 1 member(s) of talk", arrived);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("talk {}: half typed", alice.short())
    );

    // Up brings the last line back; Enter sends it again.
    let before = screen.shown.lock().unwrap().len();
    type_keys("\x1b[A\r");
    screen.await_text("sent to 1 member(s) of talk", before);
    assert_eq!(
        bob.run(&node, "recv", &[]).trim(),
        format!("talk {}: half typed", alice.short())
    );

    // Ctrl-D on an empty line ends the chat, and the terminal is left as
    // it was.
    type_keys("\x04");
    let exit = terminal.wait().unwrap();
    assert!(exit.success(), "{:?}", screen.shown.lock().unwrap());
}
