//! What `chat` reads. On a terminal: lines typed through a line editor
//! (rustyline), with history, and every line the client prints meanwhile
//! shown above the line being typed, which stays intact. Otherwise (a pipe,
//! a file): the lines of stdin, as they come.
//!
//! rustyline rather than reedline: it is the smaller dependency (no
//! crossterm; its `nix` is one we link anyway), and its external printer
//! wakes its read loop through a pipe, so a pushed message costs nothing
//! until it arrives, where reedline's printer is polled while it waits for
//! keys. Its `readline` blocks, so it runs on a thread of its own and hands
//! lines to the async loop over a channel.

use std::io::IsTerminal;
use std::sync::mpsc as std_mpsc;

use rustyline::error::ReadlineError;
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::sync::mpsc;

use crate::output;

/// The prompt of the line editor.
const PROMPT: &str = "> ";

/// Where `chat`'s lines come from.
pub(crate) enum Input {
    /// Stdin is not a terminal: its lines.
    Piped(Lines<BufReader<Stdin>>),
    /// A person at a terminal, through the line editor.
    Edited(Edited),
}

/// The line editor running on its own thread.
pub(crate) struct Edited {
    /// Each line typed; `None` once the person ends the input (Ctrl-D) or
    /// interrupts it (Ctrl-C, which the editor reads as a key).
    lines: mpsc::Receiver<std::io::Result<Option<String>>>,
    /// Tells the editor the last line is handled: it prompts again.
    handled: std_mpsc::Sender<()>,
    /// The terminal's settings before the editor took it, given back if
    /// `chat` ends while the editor waits for keys in raw mode.
    #[cfg(unix)]
    terminal: Option<nix::sys::termios::Termios>,
}

impl Input {
    /// The line editor when stdin and stdout are a terminal; stdin's lines
    /// otherwise, or if the editor cannot start.
    pub(crate) fn open() -> Input {
        if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
            match Edited::start() {
                Ok(edited) => return Input::Edited(edited),
                Err(e) => tracing::debug!("no line editor ({e}); reading lines as they come"),
            }
        }
        Input::Piped(BufReader::new(tokio::io::stdin()).lines())
    }

    /// The next line, `None` at the end of the input. Cancel-safe: a line
    /// not taken stays for the next call.
    pub(crate) async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        match self {
            Input::Piped(lines) => lines.next_line().await,
            Input::Edited(edited) => edited.lines.recv().await.unwrap_or(Ok(None)),
        }
    }

    /// The last line is handled: what it printed is out, and the editor
    /// may prompt for the next (keys typed meanwhile are not lost: they
    /// wait in the terminal).
    pub(crate) fn handled(&self) {
        if let Input::Edited(edited) = self {
            let _ = edited.handled.send(());
        }
    }
}

impl Edited {
    /// Starts the editor on its own thread; from here on the client prints
    /// through it.
    fn start() -> Result<Edited, ReadlineError> {
        #[cfg(unix)]
        let terminal = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
        let mut editor = rustyline::DefaultEditor::new()?;
        let printer = editor.create_external_printer()?;
        let (typed, lines) = mpsc::channel(1);
        let (handled, next) = std_mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("line editor".into())
            .spawn(move || {
                loop {
                    let line = match editor.readline(PROMPT) {
                        Ok(line) => {
                            let _ = editor.add_history_entry(line.as_str());
                            Ok(Some(line))
                        }
                        Err(ReadlineError::Eof | ReadlineError::Interrupted) => Ok(None),
                        Err(ReadlineError::Io(e)) => Err(e),
                        Err(e) => Err(std::io::Error::other(e)),
                    };
                    let more = matches!(line, Ok(Some(_)));
                    if typed.blocking_send(line).is_err() || !more || next.recv().is_err() {
                        break;
                    }
                }
            })?;
        output::print_through(Some(Box::new(printer)));
        Ok(Edited {
            lines,
            handled,
            #[cfg(unix)]
            terminal,
        })
    }
}

impl Drop for Edited {
    fn drop(&mut self) {
        output::print_through(None);
        // `chat` may end (a failing state file) while the editor waits for
        // keys with the terminal in raw mode: the shell gets it back as it
        // was. The editor's thread ends with the process.
        #[cfg(unix)]
        if let Some(terminal) = &self.terminal {
            let _ =
                nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, terminal);
        }
    }
}
