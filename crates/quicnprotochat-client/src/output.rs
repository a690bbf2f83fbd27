//! How the client prints: text for people, or (with `--json`) JSON for
//! scripts; and progress bars on a terminal.
//!
//! With `--json`, stdout carries only JSON: one document per command that
//! prints data, and one object per line (`"type"`: `message`, `joined`,
//! ...) for what arrives from the node and for each message sent. Stderr
//! stays for people (notes, warnings); when a command fails its last line
//! is the error object (see [`ClientError::report`]).
//!
//! The mode is process-wide, set once from the command line, as the log
//! subscriber is: it decides how every path that receives messages prints,
//! and those are reached from nearly every command.
//!
//! Every line goes through [`out`] or [`note`] (the `say!` and `note!`
//! macros): while `chat` edits a line on a terminal, they hand it to the
//! line editor, which prints it above the line being typed and leaves
//! that line intact.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use quicnprotochat_core::CoreError;

use crate::error::ClientError;

static JSON: OnceLock<bool> = OnceLock::new();

/// Sets the output mode for the rest of the process (the first call wins).
pub fn set_json(json: bool) {
    let _ = JSON.set(json);
}

/// Whether output is JSON (`--json`).
pub fn json() -> bool {
    JSON.get().copied().unwrap_or(false)
}

/// The line editor's printer while `chat` edits a line on a terminal.
static EDITOR: Mutex<Option<Box<dyn rustyline::ExternalPrinter + Send>>> = Mutex::new(None);

/// From now on, prints every line through `printer` (`None`: directly).
pub(crate) fn print_through(printer: Option<Box<dyn rustyline::ExternalPrinter + Send>>) {
    *EDITOR.lock().unwrap_or_else(PoisonError::into_inner) = printer;
}

/// Prints a line of results (a listing, a message) on stdout.
pub(crate) fn out(line: fmt::Arguments<'_>) {
    if !through_editor(line) {
        println!("{line}");
    }
}

/// Prints a line for people (a note, a warning) on stderr.
pub(crate) fn note(line: fmt::Arguments<'_>) {
    if !through_editor(line) {
        eprintln!("{line}");
    }
}

/// Hands `line` to the line editor, if one is editing; false if none is
/// (or it could not take it: then the line is printed directly).
fn through_editor(line: fmt::Arguments<'_>) -> bool {
    let mut editor = EDITOR.lock().unwrap_or_else(PoisonError::into_inner);
    editor
        .as_mut()
        .is_some_and(|printer| printer.print(format!("{line}\n")).is_ok())
}

/// Whether a line editor holds the terminal (no progress bar then: it
/// would tear the line being typed).
fn editing() -> bool {
    EDITOR.lock().unwrap_or_else(PoisonError::into_inner).is_some()
}

/// `n` of something, in words that agree with it: "1 member", "2 members".
pub(crate) fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Prints `value` as one line of JSON on stdout and flushes it, so a
/// script reading the stream sees each object as soon as it is printed.
pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<(), ClientError> {
    let line = serde_json::to_string(value)
        .map_err(|_| ClientError::Internal("a result could not be written as JSON"))?;
    if through_editor(format_args!("{line}")) {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (the reader went away) is not the command's failure.
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    Ok(())
}

/// Something that happened, as `recv`, `chat` and the catch-up of other
/// commands report it: with `--json`, one object per line on stdout, its
/// `type` the variant's name; as text, a received message on stdout and
/// the rest on stderr. `group` is the group's name for people, `group_id`
/// its id in hex.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub(crate) enum Event {
    /// An application message arrived.
    Message {
        group: String,
        group_id: String,
        /// The sender's contact name, if it has one.
        sender: Option<String>,
        /// The sender's user key (whichever of its devices sent it).
        sender_key: String,
        /// Sent by this user from another of its devices.
        from_me: bool,
        /// The text (invalid UTF-8 replaced).
        text: String,
        /// The node's sequence number of the message in our queue.
        seq: Option<u64>,
        /// The group's epoch it was sent in.
        epoch: u64,
    },
    /// We joined a group by a Welcome.
    Joined {
        group: String,
        group_id: String,
        epoch: u64,
        members: usize,
    },
    /// A Welcome from someone who is neither a contact nor one of our
    /// devices: kept as an invitation until `accept` or `decline`.
    Invited {
        group: String,
        group_id: String,
        inviter: Person,
        epoch: u64,
        members: usize,
    },
    /// A Commit moved the group to a new epoch; `joined` and `left` are
    /// the users it added and removed (a user with several devices joins
    /// with the first and leaves with the last).
    Changed {
        group: String,
        group_id: String,
        epoch: u64,
        members: usize,
        joined: Vec<Person>,
        left: Vec<Person>,
    },
    /// A member rejoined by external commit.
    Rejoined {
        group: String,
        group_id: String,
        member: Option<String>,
        member_key: String,
        epoch: u64,
        members: usize,
    },
    /// A Commit the others applied could not be processed here (its
    /// sender broke it, by mistake or on purpose), so we rejoined by
    /// external commit: the group carries on, and its members may want to
    /// remove `culprit`.
    Resynced {
        group: String,
        group_id: String,
        /// The member whose Commit was broken (its device key), and its
        /// contact name if known.
        culprit: Option<Person>,
        /// What MLS found wrong with the Commit.
        reason: String,
        /// The epoch our rejoin started.
        epoch: u64,
        members: usize,
    },
    /// We were removed from the group.
    Removed {
        group: String,
        group_id: String,
        epoch: u64,
    },
    /// A member told us the group's name (`group`), which it had none of
    /// here: the first name a group gets sticks.
    Named {
        group: String,
        group_id: String,
        /// The sender's contact name, if it has one.
        sender: Option<String>,
        /// The sender's user key.
        sender_key: String,
    },
    /// An application message of a content type this client cannot show.
    UnknownContent {
        group: String,
        group_id: String,
        /// The sender's user key.
        sender_key: String,
        /// The message's content type (its first byte).
        content_type: u8,
    },
    /// A proposal was stored for the next Commit.
    Proposal { group: String, group_id: String },
    /// A handshake message was processed that changed nothing to report.
    Processed { group: String, group_id: String },
    /// A queued message from a later epoch than its group is at (a
    /// Commit before it has not arrived yet): kept, and tried again on
    /// later runs.
    Kept {
        /// The node's sequence number of the message in our queue.
        seq: Option<u64>,
        /// The message's epoch.
        epoch: u64,
        /// The epoch its group is at here.
        group_epoch: u64,
    },
    /// A queued message given up: unreadable (garbage, not for us, a past
    /// epoch), for a group we do not know, or kept too long for the
    /// Commits it needs (`gave_up` says which bound it crossed).
    Dropped {
        /// The node's sequence number of the message in our queue.
        seq: Option<u64>,
        /// The kind of error, as in the error object's `kind`.
        error: &'static str,
        /// The error, for people.
        message: String,
        /// Why a message kept for later was given up; none for the others.
        gave_up: Option<String>,
    },
    /// The node took a message we sent.
    Sent {
        group: String,
        group_id: String,
        recipients: usize,
        text: String,
    },
}

/// A user as events name them: the user key, and the contact name if it
/// has one.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Person {
    pub(crate) user_key: String,
    pub(crate) name: Option<String>,
}

impl Person {
    /// The contact name, else the short key.
    fn shown(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or(self.user_key.get(..16).unwrap_or(&self.user_key))
    }
}

impl Event {
    /// Prints the event in the current mode.
    pub(crate) fn print(&self) -> Result<(), ClientError> {
        if json() {
            return print_json(self);
        }
        match self {
            Event::Message {
                group,
                sender,
                sender_key,
                from_me,
                text,
                ..
            } => {
                let from = match (from_me, sender) {
                    (true, _) => "me",
                    (false, Some(name)) => name,
                    // The short form, as `members` and contacts show it.
                    (false, None) => sender_key.get(..16).unwrap_or(sender_key),
                };
                say!("{group} {}: {}", shown(from), shown(text));
            }
            Event::Joined {
                group,
                epoch,
                members,
                ..
            } => note!(
                "joined group {group} (epoch {epoch}, {})",
                counted(*members, "member", "members")
            ),
            Event::Invited {
                group,
                inviter,
                members,
                ..
            } => note!(
                "{} invites you to group {group} ({}); `accept {group}` to join, `decline {group}` to refuse",
                inviter.shown(),
                counted(*members, "member", "members")
            ),
            Event::Changed {
                group,
                epoch,
                members,
                joined,
                left,
                ..
            } => {
                // "ann joined, bob left; " before the epoch, when anyone did.
                let mut changes: Vec<String> =
                    joined.iter().map(|p| format!("{} joined", p.shown())).collect();
                changes.extend(left.iter().map(|p| format!("{} left", p.shown())));
                let changes = if changes.is_empty() {
                    String::new()
                } else {
                    format!("{}; ", changes.join(", "))
                };
                note!(
                    "group {group}: {changes}now at epoch {epoch}, {}",
                    counted(*members, "member", "members")
                )
            }
            Event::Rejoined {
                group,
                member,
                member_key,
                epoch,
                members,
                ..
            } => {
                let who = member
                    .as_deref()
                    .unwrap_or(member_key.get(..16).unwrap_or(member_key));
                note!(
                    "group {group}: {who} rejoined; now at epoch {epoch}, {}",
                    counted(*members, "member", "members")
                );
            }
            Event::Resynced {
                group,
                culprit,
                reason,
                epoch,
                members,
                ..
            } => {
                let who = culprit.as_ref().map_or("a member", Person::shown);
                note!(
                    "group {group}: a Commit from {who} could not be processed here ({}); rejoined to carry on, now at epoch {epoch}, {}. If it happens again, remove {who}",
                    shown(reason),
                    counted(*members, "member", "members")
                );
            }
            Event::Removed { group, epoch, .. } => {
                note!("group {group}: you were removed from the group at epoch {epoch}")
            }
            Event::Named {
                group,
                group_id,
                sender,
                sender_key,
            } => {
                let from = sender
                    .as_deref()
                    .unwrap_or(sender_key.get(..16).unwrap_or(sender_key));
                note!(
                    "group {} is called {}, says {}",
                    group_id.get(..16).unwrap_or(group_id),
                    shown(group),
                    shown(from)
                )
            }
            Event::UnknownContent {
                group,
                sender_key,
                content_type,
                ..
            } => note!(
                "group {group}: {} sent a message of content type {content_type}, which this client cannot show",
                sender_key.get(..16).unwrap_or(sender_key)
            ),
            Event::Proposal { group, .. } => {
                note!("group {group}: stored a proposal for the next commit")
            }
            Event::Processed { group, .. } => note!("group {group}: processed a message"),
            Event::Kept {
                epoch, group_epoch, ..
            } => note!(
                "warning: kept a queued message for later: {}",
                CoreError::FutureEpoch {
                    message_epoch: *epoch,
                    group_epoch: *group_epoch,
                }
            ),
            Event::Dropped {
                message,
                gave_up: Some(why),
                ..
            } => note!("warning: dropped a queued message from a later epoch ({why}): {message}"),
            Event::Dropped { message, .. } => note!("warning: skipped a queued message: {message}"),
            Event::Sent {
                group, recipients, ..
            } => note!("sent to {recipients} member(s) of {group}"),
        }
        Ok(())
    }
}

/// A progress bar on stderr for a long operation: drawn only when stderr is
/// a terminal and the work is long enough to be worth one (`len` at least
/// `worth`), hidden otherwise, so scripts and logs never see it.
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `len` steps described by `what` ("fetching KeyPackages").
    pub(crate) fn new(len: usize, worth: usize, what: &'static str) -> Progress {
        let bar = if len >= worth && std::io::stderr().is_terminal() && !editing() {
            let bar = ProgressBar::new(len as u64);
            // The template is a constant; should it ever be refused, the
            // default style is just as usable.
            if let Ok(style) = ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} {elapsed}") {
                bar.set_style(style);
            }
            bar.set_message(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Progress { bar }
    }

    /// One step done.
    pub(crate) fn step(&self) {
        self.bar.inc(1);
    }

    /// Runs `print` with the bar cleared, so lines printed to the same
    /// terminal are not torn by it.
    pub(crate) fn suspend<R>(&self, print: impl FnOnce() -> R) -> R {
        self.bar.suspend(print)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Whether `c` must not reach a terminal as it is: a control character
/// (C0 with newline and ESC, DEL, C1), or a character that reorders or
/// hides text (bidirectional overrides and isolates, zero-width ones, line
/// and paragraph separators), with which a peer could move the cursor,
/// retitle the window, forge a line from someone else or disguise text.
pub(crate) fn unsafe_to_show(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// `text` with every character [`unsafe_to_show`] written as an escape
/// (`\n`, `\t`, `\r`, else `\u{1b}`), so a message prints as one line of
/// visible characters; `--json` carries the exact text instead.
pub(crate) fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(unsafe_to_show) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if unsafe_to_show(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_shown_as_visible_characters_on_one_line() {
        assert_eq!(shown("plain, ünïcode ✓"), "plain, ünïcode ✓");
        assert_eq!(shown("a\nb\tc\rd"), r"a\nb\tc\rd");
        assert_eq!(shown("\u{1b}[2J\u{7f}\u{85}"), r"\u{1b}[2J\u{7f}\u{85}");
        assert_eq!(
            shown("x\u{202e}y\u{200b}z\u{2028}"),
            r"x\u{202e}y\u{200b}z\u{2028}"
        );
    }
}
