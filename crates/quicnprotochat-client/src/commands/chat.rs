//! `chat`: one process that shows what the node pushes and sends what is
//! typed, so nobody has to juggle `send` and `recv --follow`.
//!
//! One loop selects between the next line of stdin and the next pushed
//! batch. Each line is handled to the end (a message is sent, and answered
//! by the node, before the next line is read), so when stdin is a pipe,
//! reaching its end means every line was taken by the node and `chat` can
//! exit 0. Pushed batches go through the same fetch → store → ack → apply
//! path as `recv --follow`; the notes it prints (joined, removed, a new
//! epoch) are the announcements. On a terminal, lines are typed through a
//! line editor (`crate::editor`): what arrives is printed above the line
//! being typed, which stays as it was.
//!
//! A lost connection is cured as `recv --follow` cures it: `chat` goes on
//! through the next node that answers (the same one, restarted, for a
//! single node), catching up and subscribing again; lines typed meanwhile
//! wait in stdin. A message line whose sending the lost connection
//! interrupted is sent first once reconnected: encrypted already, it goes
//! again with the same message id, which the node stores at most once
//! (it may have taken it before the connection went); not encrypted yet,
//! it is sent as if just typed. Other lines (`/invite`) are not repeated:
//! a person is told, a script's chat fails (exit code 3).

use std::future::Future;
use std::io::IsTerminal;
use std::pin::{Pin, pin};

use quicnprotochat_core::{IdentityKeypair, QueuedMessage};
use tokio::time::Instant;

use crate::changes::{invite, replace_handed_leaves};
use crate::cli::{ConnectionArgs, PeerArgs};
use crate::connections::Nodes;
use crate::editor::Input;
use crate::error::ClientError;
use crate::follow::{Pause, reconnect};
use crate::incoming::{Seen, accept_invitation, process_inbox, store_batch};
use crate::key_packages::top_up_key_packages;
use crate::naming::{group_name, invitation_to, load_group, print_members};
use crate::publish::commit_due_proposals;
use crate::sending::{Unconfirmed, deliver_again, send_through};
use crate::state::{StateAccess, StateFile};
use crate::sync::catch_up;

/// What `/help` and an unknown command show.
const COMMANDS: &str = "/members, /invite NAME|HEX..., /group NAME, /accept GROUP, /quit (start a message with // to send a leading /)";

/// `chat`: talks in `group_id` (default: the current group, or the first
/// one joined while chatting) until `/quit`, the end of stdin, or Ctrl-C.
pub(crate) async fn chat(
    args: &ConnectionArgs,
    access: &StateAccess,
    group_id: Option<String>,
) -> Result<(), ClientError> {
    let state = StateFile::open(access)?;
    let identity = state.identity()?;
    // A group named but not ours is refused before dialling a node. With
    // no group at all, chat still starts: it can wait for an invitation,
    // and the group joined becomes the current one.
    if group_id.is_some() {
        load_group(&state, group_id.as_deref())?;
    }
    let mut nodes = Nodes::connect(args, Some(&identity)).await?;
    let seen = catch_up(&nodes, &state, &identity).await?;
    replace_handed_leaves(&nodes, &state, &identity).await?;
    // Stay invitable while chatting, as `recv` does.
    top_up_key_packages(&nodes, &state, &identity).await?;
    commit_due_proposals(&nodes, &state, &identity).await?;
    let interactive = std::io::stdin().is_terminal();
    let outcome = Session {
        nodes: &mut nodes,
        state: &state,
        identity: &identity,
        group: group_id,
        interactive,
        interrupted: None,
    }
    .run(seen)
    .await;
    nodes.close().await;
    outcome
}

/// One line of input, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Nothing to do (a blank line).
    Blank,
    /// Text to send to the group.
    Message(String),
    /// `/members`.
    Members,
    /// `/invite NAME|HEX...`: contact names or user keys.
    Invite(Vec<String>),
    /// `/group NAME`.
    Group(String),
    /// `/accept GROUP`: join the group of a waiting invitation.
    Accept(String),
    /// `/quit`.
    Quit,
    /// `/help`.
    Help,
}

/// Parses a typed line; the error is for the person typing.
fn parse(line: &str) -> Result<Line, String> {
    if line.trim().is_empty() {
        return Ok(Line::Blank);
    }
    // `//text` sends `/text`: a way to start a message with a slash.
    if let Some(text) = line.strip_prefix("//") {
        return Ok(Line::Message(format!("/{text}")));
    }
    let Some(command) = line.strip_prefix('/') else {
        return Ok(Line::Message(line.to_owned()));
    };
    let mut words = command.split_whitespace();
    let name = words.next().unwrap_or_default();
    let rest: Vec<String> = words.map(str::to_owned).collect();
    match (name, rest.as_slice()) {
        ("members", []) => Ok(Line::Members),
        ("quit", []) => Ok(Line::Quit),
        ("help", []) => Ok(Line::Help),
        ("group", [group]) => Ok(Line::Group(group.clone())),
        ("accept", [group]) => Ok(Line::Accept(group.clone())),
        ("invite", [_, ..]) => Ok(Line::Invite(rest)),
        ("members" | "quit" | "help", _) => Err(format!("/{name} takes no arguments")),
        ("group", _) => Err("usage: /group NAME".into()),
        ("accept", _) => Err("usage: /accept GROUP".into()),
        ("invite", _) => Err("usage: /invite NAME|HEX...".into()),
        _ => Err(format!("unknown command /{name}; commands: {COMMANDS}")),
    }
}

/// Peers as `/invite` names them: a 64-hex-character word is a user key,
/// anything else a contact name.
fn peers(words: Vec<String>) -> PeerArgs {
    let (keys, names) = words
        .into_iter()
        .partition(|word| word.len() == 64 && word.chars().all(|c| c.is_ascii_hexdigit()));
    PeerArgs { keys, names }
}

/// Whether `chat` goes on after `error` while a person is typing: a
/// mistake or a refusal is theirs to correct; a lost node or a failing
/// state file is not.
fn recoverable(error: &ClientError) -> bool {
    !error.is_connection_lost() && !matches!(error, ClientError::State(_) | ClientError::Internal(_))
}

/// Whether the loop goes on after a line.
enum Flow {
    Continue,
    Quit,
}

/// How chatting through one connection ended.
enum Ended {
    /// The input ended, `/quit`, or Ctrl-C.
    Done,
    /// The connection was lost (why): reconnect.
    Lost(String),
}

/// A running chat: open connections, the state file, the group lines go to
/// (`None`: the current group), whether a person is typing, and the
/// message line a lost connection interrupted.
struct Session<'a> {
    nodes: &'a mut Nodes,
    state: &'a StateFile,
    identity: &'a IdentityKeypair,
    group: Option<String>,
    interactive: bool,
    interrupted: Option<Interrupted>,
}

/// A message line whose sending a lost connection cut off.
enum Interrupted {
    /// Before it was encrypted: nothing of it left this device.
    Typed(String),
    /// After: the node may have it.
    Encrypted(Unconfirmed),
}

impl Session<'_> {
    /// Handles lines and pushed batches, from `seen` on, until the input
    /// ends, `/quit`, or Ctrl-C, reconnecting whenever the connection is
    /// lost. When a person is typing, a refused line is reported and the
    /// chat goes on; a script's chat ends with that error.
    async fn run(&mut self, seen: Seen) -> Result<(), ClientError> {
        let mut lines = Input::open();
        let mut interrupted = pin!(tokio::signal::ctrl_c());
        let mut caught_up = Some(seen);
        let mut pause = Pause::default();
        let mut first = true;
        loop {
            let connected_at = Instant::now();
            let ended = self
                .connection(caught_up.take(), &mut lines, interrupted.as_mut(), first)
                .await?;
            first = false;
            let Ended::Lost(lost) = ended else {
                return Ok(());
            };
            if !reconnect(self.nodes, &mut pause, connected_at, &lost, interrupted.as_mut()).await {
                return Ok(());
            }
            note!("chatting through {}", self.nodes.delivery().server());
        }
    }

    /// Chats through the current connection: catches up first unless
    /// `caught_up` says that was done on it, subscribes after the last
    /// message seen, then handles lines and pushed batches.
    async fn connection<F: Future>(
        &mut self,
        caught_up: Option<Seen>,
        lines: &mut Input,
        mut interrupted: Pin<&mut F>,
        first: bool,
    ) -> Result<Ended, ClientError> {
        let lost = |e: ClientError| {
            if e.is_connection_lost() {
                Ok(Ended::Lost(e.to_string()))
            } else {
                Err(e)
            }
        };
        let mut seen = match caught_up {
            Some(seen) => seen,
            None => match self.catch_up().await {
                Ok(seen) => seen,
                Err(e) => return lost(e),
            },
        };
        let me = self.identity.public_key();
        let (sink, mut pushed) = tokio::sync::mpsc::channel(1);
        let _subscription = match self.nodes.delivery().subscribe(&me, seen.after(), sink).await {
            Ok(subscription) => subscription,
            Err(e) => return lost(e),
        };
        if first {
            // Printed once subscribed, also for scripts: from here on, what
            // is sent to us shows up without delay (tests wait for this).
            match load_group(self.state, self.group.as_deref()) {
                Ok((id, _)) => note!(
                    "chatting in {}; type a message, or {COMMANDS}",
                    group_name(self.state, &id)
                ),
                Err(ClientError::NoGroup(_)) => {
                    note!("chatting; you are in no group yet: wait for an invitation, or type {COMMANDS}")
                }
                Err(e) => return Err(e),
            }
        }
        // Before any new line, so that the interrupted one keeps its place.
        if let Some(interrupted) = self.interrupted.take() {
            match self.send_interrupted(interrupted).await {
                Ok(()) => {}
                Err(e) if e.is_connection_lost() => return Ok(Ended::Lost(e.to_string())),
                Err(e) if self.interactive && recoverable(&e) => note!("error: {e}"),
                Err(e) => return Err(e),
            }
        }
        loop {
            // All three are cancel-safe: a line or batch not taken in this
            // round stays for the next.
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line.map_err(ClientError::Stdin)? else {
                        return Ok(Ended::Done);
                    };
                    let handled = self.handle(&line).await;
                    // The editor prompts for the next line, unless this
                    // one ends the chat.
                    if !matches!(handled, Ok(Flow::Quit)) {
                        lines.handled();
                    }
                    match handled {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Quit) => return Ok(Ended::Done),
                        Err(e) if self.interactive && recoverable(&e) => note!("error: {e}"),
                        Err(e) if e.is_connection_lost() && self.interrupted.is_some() => {
                            note!("{e}\nthat message is sent once reconnected");
                            return Ok(Ended::Lost(e.to_string()));
                        }
                        Err(e) if self.interactive && e.is_connection_lost() => {
                            note!("error: {e}\nthat line may not have been carried out; check once reconnected");
                            return Ok(Ended::Lost(e.to_string()));
                        }
                        Err(e) => return Err(e),
                    }
                }
                batch = pushed.recv() => {
                    let Some(batch) = batch else {
                        return Ok(Ended::Lost("the node ended the subscription".into()));
                    };
                    if let Err(e) = self.take(&mut seen, batch).await {
                        return lost(e);
                    }
                }
                _ = interrupted.as_mut() => return Ok(Ended::Done),
            }
        }
    }

    /// Catches up through a new connection, as at the start.
    async fn catch_up(&self) -> Result<Seen, ClientError> {
        let seen = catch_up(self.nodes, self.state, self.identity).await?;
        commit_due_proposals(self.nodes, self.state, self.identity).await?;
        Ok(seen)
    }

    /// Stores, acknowledges and applies a pushed batch.
    async fn take(&self, seen: &mut Seen, batch: Vec<QueuedMessage>) -> Result<(), ClientError> {
        // A send's catch-up may have stored part of this batch.
        *seen = store_batch(self.state, seen.clone().refresh(self.state)?, batch)?;
        self.nodes
            .delivery()
            .ack(&self.identity.public_key(), seen.after())
            .await?;
        process_inbox(self.nodes, self.state).await?;
        commit_due_proposals(self.nodes, self.state, self.identity).await
    }

    /// Sends the message line a lost connection interrupted; lost again,
    /// it stays for the next connection.
    async fn send_interrupted(&mut self, interrupted: Interrupted) -> Result<(), ClientError> {
        match interrupted {
            Interrupted::Encrypted(unconfirmed) => {
                let text = unconfirmed.text().to_owned();
                let mut slot = None;
                let sent = deliver_again(self.nodes, self.state, self.identity, unconfirmed, &mut slot).await;
                // Refused for its old epoch, it is encrypted anew, and the
                // connection may go before that.
                self.keep_if_lost(&sent, slot, text);
                sent
            }
            Interrupted::Typed(text) => self.send_message(text).await,
        }
    }

    /// Sends a message line to everyone in the chat's group. If the
    /// connection is lost meanwhile, keeps it (encrypted or not) for the
    /// next connection.
    async fn send_message(&mut self, text: String) -> Result<(), ClientError> {
        let everyone = PeerArgs {
            keys: Vec::new(),
            names: Vec::new(),
        };
        let mut unconfirmed = None;
        let sent = send_through(
            self.nodes,
            self.state,
            self.identity,
            &everyone,
            self.group.as_deref(),
            &text,
            &mut unconfirmed,
        )
        .await;
        self.keep_if_lost(&sent, unconfirmed, text);
        sent
    }

    /// After sending `text`: if the connection was lost, keeps the message
    /// for the next connection, encrypted (`unconfirmed`) or not.
    fn keep_if_lost(
        &mut self,
        sent: &Result<(), ClientError>,
        unconfirmed: Option<Unconfirmed>,
        text: String,
    ) {
        if let Err(e) = sent
            && e.is_connection_lost()
        {
            self.interrupted = Some(match unconfirmed {
                Some(unconfirmed) => Interrupted::Encrypted(unconfirmed),
                None => Interrupted::Typed(text),
            });
        }
    }

    /// Handles one line of input.
    async fn handle(&mut self, line: &str) -> Result<Flow, ClientError> {
        let group = self.group.as_deref();
        match parse(line).map_err(ClientError::Usage)? {
            Line::Blank => {}
            Line::Message(text) => self.send_message(text).await?,
            Line::Members => print_members(self.state, group)?,
            Line::Invite(words) => {
                invite(self.nodes, self.state, self.identity, &peers(words), group).await?;
            }
            Line::Group(name) => {
                let (id, _) = load_group(self.state, Some(&name))?;
                note!("now chatting in {}", group_name(self.state, &id));
                // By its id: a name another group may come to share.
                self.group = Some(hex::encode(&id));
            }
            Line::Accept(name) => {
                let invitation = invitation_to(self.state, &name)?;
                accept_invitation(self.nodes, self.state, &invitation)
                    .await?
                    .tell()?;
                // What the group sent while we were invited.
                process_inbox(self.nodes, self.state).await?;
                note!("now chatting in {}", group_name(self.state, &invitation.group_id));
                self.group = Some(hex::encode(&invitation.group_id));
            }
            Line::Help => note!("commands: {COMMANDS}"),
            Line::Quit => return Ok(Flow::Quit),
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_messages_unless_they_start_with_one_slash() {
        assert_eq!(parse("hello"), Ok(Line::Message("hello".into())));
        assert_eq!(
            parse(" /not at the start"),
            Ok(Line::Message(" /not at the start".into()))
        );
        assert_eq!(parse("//members"), Ok(Line::Message("/members".into())));
        assert_eq!(parse("   "), Ok(Line::Blank));
    }

    #[test]
    fn commands_take_their_arguments_and_refuse_others() {
        assert_eq!(parse("/members"), Ok(Line::Members));
        assert_eq!(parse("/quit"), Ok(Line::Quit));
        assert_eq!(parse("/group team"), Ok(Line::Group("team".into())));
        assert_eq!(parse("/accept offers"), Ok(Line::Accept("offers".into())));
        assert!(parse("/accept").is_err());
        assert_eq!(
            parse("/invite bob carol"),
            Ok(Line::Invite(vec!["bob".into(), "carol".into()]))
        );
        assert!(parse("/invite").is_err());
        assert!(parse("/group").is_err());
        assert!(parse("/group a b").is_err());
        assert!(parse("/quit now").is_err());
        assert!(parse("/dance").unwrap_err().contains("unknown command /dance"));
    }

    #[test]
    fn an_invitee_is_a_key_when_it_is_64_hex_characters_else_a_contact() {
        let key = "ab".repeat(32);
        let peers = peers(vec![key.clone(), "bob".into(), "abcd".into()]);
        assert_eq!(peers.keys, [key]);
        assert_eq!(peers.names, ["bob", "abcd"]);
    }
}
