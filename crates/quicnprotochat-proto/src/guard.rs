//! Looks at every incoming RPC frame before capnp-rpc does, to bound what a
//! peer can make this side hold.
//!
//! capnp-rpc trusts its peer in four ways that a delivery node cannot:
//! - it builds an entry for every element of a message's capability table,
//!   so a 7 KiB message claiming 390,000 empty capabilities costs megabytes
//!   for as long as the call is pending;
//! - it keeps every answer that needs a `Finish` until the peer sends it, so
//!   a peer that never does makes the session grow without bound;
//! - it queues replies without limit while the peer does not read them;
//! - it keeps a promise capability that the peer resolves to itself alive
//!   forever (found by fuzzing `rpc_session`).
//!
//! [`GuardedReader`] checks each whole frame (segment count, size, cap tables
//! of calls and returns, no promise capabilities, open questions) and ends the
//! session with an error naming the violation; with backpressure on, it also
//! stops reading new calls while [`GuardedWriter`] cannot write (the peer is
//! not reading its replies), and it yields to other sessions on the thread
//! now and then so one busy peer cannot starve them.
//!
//! With a memory budget (the node's side, see [`crate::memory`]), the reader
//! takes each frame's declared size from its peer's calls account
//! before it reads the frame's body, and grows the frame's buffer only as
//! bytes arrive; a call also takes the largest answer its method can give.
//! A call's bytes go back when the writer has written its `Return`; any other
//! frame's once capnp-rpc has it. So answers a peer does not read, calls it
//! pipelines and frames it never finishes all hold budget, and when the
//! account is spent the reader stops reading: the peer's cost is bounded,
//! and a peer that stops reading stops being read.
//!
//! A question stays open from the peer's `Call` or `Bootstrap` until its
//! `Finish`, or until this side's `Return` for it says `noFinishNeeded`:
//! capnp-rpc so answers every call whose results carry no capabilities, and
//! the caller then never finishes it. [`GuardedWriter`] follows the framing
//! of what it writes and reads just the head of each frame to catch those
//! returns, so the count matches capnp-rpc's own table of answers whether or
//! not the peer reuses question ids.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use capnp::Word;
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_capnp::{cap_descriptor, message, payload, resolve, return_};
use futures::{AsyncRead, AsyncWrite};

use crate::memory::{Account, AnswerBounds};

/// Most capabilities one call or return may carry. Every node method takes
/// or returns at most one.
pub const MAX_CAPS_PER_MESSAGE: u32 = 16;

/// Most questions (calls and bootstraps) the peer may have open at once.
///
/// A question is open until the peer's `Finish` for it or this side's
/// `Return` with `noFinishNeeded` (see the module docs), just as long as
/// capnp-rpc keeps its answer; so this bounds calls in flight and answers
/// holding capabilities, not how many calls a session makes, and ids need
/// not be reused.
pub const MAX_OPEN_QUESTIONS: usize = 1024;

/// Cap'n Proto's default traversal limit, used when none is given.
const DEFAULT_LIMIT_WORDS: usize = 8 * 1024 * 1024;

/// Cap'n Proto's own limit on segments in one message.
const MAX_SEGMENTS: usize = 512;

/// A frame buffer larger than this (64 KiB) is released once handed on.
const KEEP_WORDS: usize = 8192;

/// A frame's buffer starts this big (64 KiB) and doubles as bytes arrive,
/// never beyond the frame's size: memory follows what the peer sent, not
/// what it declared.
const FIRST_BODY_WORDS: usize = 8192;

/// Frames handed on before yielding to the other sessions of the thread.
const FRAMES_PER_YIELD: u32 = 32;

/// Words kept of each outgoing frame's first segment. capnp-rpc starts every
/// message with the root pointer, the `Message` struct and then the struct
/// of its variant, so a `Return`'s fixed fields lie within the first six.
const HEAD_WORDS: usize = 64;

/// What the reader and writer halves of one session share.
#[derive(Debug, Default)]
pub struct GuardState {
    open_questions: RefCell<HashSet<u32>>,
    write_blocked: Cell<bool>,
    reader_waiting: RefCell<Option<Waker>>,
    /// The reader refused a message, ending the session.
    refused: Cell<bool>,
    /// The peer's calls account and the answer bounds, on the node.
    memory: Option<(Arc<Account>, AnswerBounds)>,
    /// Bytes each unanswered question holds in `memory`: its frame and its
    /// answer's bound.
    answers: RefCell<HashMap<u32, usize>>,
    /// Since when the writer has been unable to write (the peer grants no
    /// flow-control credit).
    write_waiting_since: Cell<Option<Instant>>,
    /// Since when the reader has been waiting inside a frame for the peer's
    /// next byte.
    frame_waiting_since: Cell<Option<Instant>>,
}

impl GuardState {
    /// A fresh state for one session.
    pub fn new() -> Rc<GuardState> {
        Rc::new(GuardState::default())
    }

    /// A fresh state for one session whose frames and answers are held in
    /// `calls`, answers counted by `bounds`.
    pub fn with_memory(calls: Arc<Account>, bounds: AnswerBounds) -> Rc<GuardState> {
        let mut state = GuardState::default();
        state.memory = Some((calls, bounds));
        Rc::new(state)
    }

    /// Since when the session has been waiting on its peer: for it to grant
    /// credit for this side's writes, or to send the rest of a frame it
    /// began. `None` while neither.
    pub fn waiting_on_peer_since(&self) -> Option<Instant> {
        match (self.write_waiting_since.get(), self.frame_waiting_since.get()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn give(&self, bytes: usize) {
        if let Some((account, _)) = &self.memory {
            account.give(bytes);
        }
    }

    /// The `Return` for `question` has been written: its bytes go back.
    fn answered(&self, question: u32) {
        if let Some(bytes) = self.answers.borrow_mut().remove(&question) {
            self.give(bytes);
        }
    }

    /// Whether the reader refused a message of the peer (which ends the
    /// session), as opposed to the session ending any other way; the node
    /// counts these.
    pub fn refused(&self) -> bool {
        self.refused.get()
    }

    fn set_write_blocked(&self, blocked: bool) {
        match (blocked, self.write_waiting_since.get()) {
            (true, None) => self.write_waiting_since.set(Some(Instant::now())),
            (false, Some(_)) => self.write_waiting_since.set(None),
            _ => {}
        }
        if self.write_blocked.replace(blocked)
            && !blocked
            && let Some(waker) = self.reader_waiting.borrow_mut().take()
        {
            waker.wake();
        }
    }
}

impl Drop for GuardState {
    fn drop(&mut self) {
        let held: usize = self.answers.get_mut().values().sum();
        self.give(held);
    }
}

enum Phase {
    /// Filling the first word: segment count and first segment size.
    Header,
    /// Filling the rest of the segment table.
    Table,
    /// Waiting for the calls account to hold the frame's declared size.
    Charge,
    /// Filling the segments.
    Body,
    /// A checked call waiting for the account to hold its answer.
    Admit {
        /// The call's question id.
        question: u32,
        /// Its method's answer bound.
        answer: usize,
    },
    /// Handing the checked frame on, from this byte.
    Out(usize),
}

/// An `AsyncRead` that passes on only whole frames that pass the checks.
pub struct GuardedReader<R> {
    inner: R,
    frame: Vec<Word>,
    filled: usize,
    needed: usize,
    phase: Phase,
    options: ReaderOptions,
    limit_words: usize,
    state: Rc<GuardState>,
    backpressure: bool,
    frames: u32,
    /// Bytes the frame being read or handed on holds in the calls account.
    charged: usize,
}

impl<R> Drop for GuardedReader<R> {
    fn drop(&mut self) {
        self.state.give(self.charged);
    }
}

impl<R: AsyncRead + Unpin> GuardedReader<R> {
    /// Guards `inner`, accepting messages within `options` (the same options
    /// capnp-rpc reads with). With `backpressure`, stops reading while the
    /// writer sharing `state` is blocked.
    pub fn new(inner: R, options: ReaderOptions, state: Rc<GuardState>, backpressure: bool) -> Self {
        // Without a traversal limit, still never buffer more than capnp's
        // own default allows (64 MiB).
        let limit_words = options.traversal_limit_in_words.unwrap_or(DEFAULT_LIMIT_WORDS);
        GuardedReader {
            inner,
            frame: Word::allocate_zeroed_vec(1),
            filled: 0,
            needed: 8,
            phase: Phase::Header,
            options,
            limit_words,
            state,
            backpressure,
            frames: 0,
            charged: 0,
        }
    }

    /// Reads from `inner` until the current phase has its bytes; `Ok(false)`
    /// at a clean end of stream between frames.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.filled < self.needed {
            self.grow();
            let until = self.needed.min(self.frame.len() * 8);
            let bytes = Word::words_to_bytes_mut(&mut self.frame);
            let read = match Pin::new(&mut self.inner).poll_read(cx, &mut bytes[self.filled..until]) {
                Poll::Ready(Ok(read)) => {
                    self.state.frame_waiting_since.set(None);
                    read
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Between frames a peer may be silent as long as it
                    // likes; inside one, it owes the rest.
                    if self.filled > 0 && self.state.frame_waiting_since.get().is_none() {
                        self.state.frame_waiting_since.set(Some(Instant::now()));
                    }
                    return Poll::Pending;
                }
            };
            if read == 0 {
                if self.filled == 0 && matches!(self.phase, Phase::Header) {
                    return Poll::Ready(Ok(false));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer ended the stream inside a message",
                )));
            }
            self.filled += read;
        }
        Poll::Ready(Ok(true))
    }

    /// Sets how many bytes the current phase needs; the buffer grows as
    /// they arrive ([`Self::grow`]).
    fn resize(&mut self, bytes: usize) {
        self.needed = bytes;
    }

    /// Makes room for the next bytes: the buffer doubles (from
    /// [`FIRST_BODY_WORDS`]) when full, up to what the phase needs.
    fn grow(&mut self) {
        let have = self.frame.len();
        let needed = self.needed.div_ceil(8);
        if have * 8 > self.filled || have >= needed {
            return;
        }
        let words = needed.min((2 * have).max(FIRST_BODY_WORDS));
        let mut bigger = Word::allocate_zeroed_vec(words);
        bigger[..have].copy_from_slice(&self.frame);
        self.frame = bigger;
    }

    /// The segment count the header claims (u64: the peer may claim 2^32)
    /// and, if it is within [`MAX_SEGMENTS`], the segment table's size.
    fn table(&self) -> (u64, Option<usize>) {
        let bytes = Word::words_to_bytes(&self.frame);
        let segments = u64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])) + 1;
        // Count word plus one size per segment, padded to a whole word.
        let table_bytes = usize::try_from(segments)
            .ok()
            .filter(|&n| n <= MAX_SEGMENTS)
            .map(|n| (4 + 4 * n).next_multiple_of(8));
        (segments, table_bytes)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for GuardedReader<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            match this.phase {
                Phase::Out(from) => {
                    let bytes = &Word::words_to_bytes(&this.frame)[from..this.needed];
                    let n = bytes.len().min(out.len());
                    out[..n].copy_from_slice(&bytes[..n]);
                    this.phase = if from + n == this.needed {
                        // A call's bytes moved to its question in `Admit`;
                        // any other frame is capnp-rpc's now.
                        this.state.give(std::mem::take(&mut this.charged));
                        this.filled = 0;
                        this.needed = 8;
                        if this.frame.len() > KEEP_WORDS {
                            // Don't hold a big message's buffer in an idle session.
                            this.frame = Word::allocate_zeroed_vec(1);
                        }
                        Phase::Header
                    } else {
                        Phase::Out(from + n)
                    };
                    return Poll::Ready(Ok(n));
                }
                Phase::Header => {
                    if this.filled == 0 {
                        if this.backpressure && this.state.write_blocked.get() {
                            *this.state.reader_waiting.borrow_mut() = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                        if this.frames >= FRAMES_PER_YIELD {
                            this.frames = 0;
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        this.resize(8);
                    }
                    if !std::task::ready!(this.fill(cx))? {
                        return Poll::Ready(Ok(0));
                    }
                    let (segments, table_bytes) = this.table();
                    let Some(table_bytes) = table_bytes else {
                        return Poll::Ready(Err(invalid(
                            &this.state,
                            format!("a message of {segments} segments (at most {MAX_SEGMENTS})"),
                        )));
                    };
                    this.resize(table_bytes);
                    this.phase = Phase::Table;
                }
                Phase::Table => {
                    std::task::ready!(this.fill(cx))?;
                    let (segments, table_bytes) = this.table();
                    let table_bytes = table_bytes.unwrap_or_default();
                    let bytes = Word::words_to_bytes(&this.frame);
                    // u64: up to 512 sizes of up to 2^32 words each.
                    let words: u64 = (0..segments as usize)
                        .map(|i| {
                            let at = 4 + 4 * i;
                            u64::from(u32::from_le_bytes([
                                bytes[at],
                                bytes[at + 1],
                                bytes[at + 2],
                                bytes[at + 3],
                            ]))
                        })
                        .sum();
                    let words = match usize::try_from(words) {
                        Ok(words) if words <= this.limit_words => words,
                        _ => {
                            return Poll::Ready(Err(invalid(
                                &this.state,
                                format!(
                                    "a message of {} bytes (at most {})",
                                    words.saturating_mul(8),
                                    this.limit_words.saturating_mul(8)
                                ),
                            )));
                        }
                    };
                    this.resize(table_bytes + words * 8);
                    this.phase = Phase::Charge;
                }
                Phase::Charge => {
                    if let Some((account, _)) = &this.state.memory {
                        std::task::ready!(account.poll_take(this.needed, cx));
                        this.charged = this.needed;
                    }
                    this.phase = Phase::Body;
                }
                Phase::Body => {
                    std::task::ready!(this.fill(cx))?;
                    let frame = &Word::words_to_bytes(&this.frame)[..this.needed];
                    let question = inspect(frame, this.options, &this.state)
                        .map_err(|reason| invalid(&this.state, reason))?;
                    this.frames += 1;
                    this.phase = match (question, &this.state.memory) {
                        (Some((question, interface, method)), Some((_, bounds))) => Phase::Admit {
                            question,
                            answer: bounds.of(interface, method),
                        },
                        _ => Phase::Out(0),
                    };
                }
                Phase::Admit { question, answer } => {
                    if let Some((account, _)) = &this.state.memory {
                        std::task::ready!(account.poll_take(answer, cx));
                        let held = answer + std::mem::take(&mut this.charged);
                        // A question id the peer reuses before its answer adds up.
                        *this.state.answers.borrow_mut().entry(question).or_default() += held;
                    }
                    this.phase = Phase::Out(0);
                }
            }
        }
    }
}

/// The error that ends the session for a refused message, noted in `state`.
fn invalid(state: &GuardState, reason: String) -> io::Error {
    state.refused.set(true);
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("refused RPC message: {reason}"),
    )
}

/// A question the peer asked: its id, and the interface and method it
/// calls (a bootstrap: none, 0).
type Asked = (u32, u64, u16);

/// Checks one whole frame; for a call or bootstrap, says what it asks.
/// Messages capnp-rpc itself would refuse (unknown kinds, broken pointers)
/// are passed on for it to answer.
fn inspect(frame: &[u8], options: ReaderOptions, state: &GuardState) -> Result<Option<Asked>, String> {
    let Ok(reader) = capnp::serialize::read_message_from_flat_slice(&mut &frame[..], options) else {
        return Ok(None);
    };
    let Ok(root) = reader.get_root::<message::Reader<'_>>() else {
        return Ok(None);
    };
    match root.which() {
        Ok(message::Call(Ok(call))) => {
            if let Ok(params) = call.get_params() {
                check_caps(params)?;
            }
            open_question(state, call.get_question_id())?;
            Ok(Some((
                call.get_question_id(),
                call.get_interface_id(),
                call.get_method_id(),
            )))
        }
        Ok(message::Bootstrap(Ok(bootstrap))) => {
            open_question(state, bootstrap.get_question_id())?;
            Ok(Some((bootstrap.get_question_id(), 0, 0)))
        }
        Ok(message::Resolve(Ok(resolve))) => match resolve.which() {
            Ok(resolve::Cap(Ok(cap))) => check_descriptor(cap).map(|()| None),
            _ => Ok(None),
        },
        Ok(message::Finish(Ok(finish))) => {
            state
                .open_questions
                .borrow_mut()
                .remove(&finish.get_question_id());
            Ok(None)
        }
        Ok(message::Return(Ok(answer))) => match answer.which() {
            Ok(return_::Results(Ok(results))) => check_caps(results).map(|()| None),
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

/// Checks a payload's capability table: its length as its pointer claims
/// (read without walking the list), then each descriptor.
fn check_caps(payload: payload::Reader<'_>) -> Result<(), String> {
    let table = payload
        .get_cap_table()
        .map_err(|e| format!("a capability table that cannot be read ({e})"))?;
    if table.len() > MAX_CAPS_PER_MESSAGE {
        return Err(format!(
            "{} capabilities in one message (at most {MAX_CAPS_PER_MESSAGE})",
            table.len()
        ));
    }
    table.iter().try_for_each(check_descriptor)
}

/// Refuses promise capabilities. Nothing in this protocol passes one (the
/// node's and the client's capabilities are all settled objects), and
/// capnp-rpc keeps a promise that is resolved to itself alive forever: a
/// peer could leak the session's memory with one 80-byte `Resolve`.
fn check_descriptor(descriptor: cap_descriptor::Reader<'_>) -> Result<(), String> {
    match descriptor.which() {
        Ok(cap_descriptor::SenderPromise(_)) => {
            Err("a promise capability (this protocol passes only settled capabilities)".into())
        }
        _ => Ok(()),
    }
}

fn open_question(state: &GuardState, id: u32) -> Result<(), String> {
    let mut open = state.open_questions.borrow_mut();
    open.insert(id);
    if open.len() > MAX_OPEN_QUESTIONS {
        return Err(format!(
            "more than {MAX_OPEN_QUESTIONS} questions open; send Finish for answered calls"
        ));
    }
    Ok(())
}

/// An `AsyncWrite` that tells the reader of its session when it is blocked,
/// and closes the questions its `Return`s need no `Finish` for.
pub struct GuardedWriter<W> {
    inner: W,
    state: Rc<GuardState>,
    outgoing: OutgoingFrames,
}

impl<W> GuardedWriter<W> {
    /// Guards `inner`, reporting to `state`.
    pub fn new(inner: W, state: Rc<GuardState>) -> Self {
        GuardedWriter {
            inner,
            state,
            outgoing: OutgoingFrames::new(),
        }
    }
}

impl<W: AsyncWrite + Unpin> GuardedWriter<W> {
    fn track<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.state.set_write_blocked(poll.is_pending());
        poll
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for GuardedWriter<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = poll {
            // Only what the inner writer took is on its way to the peer; the
            // rest comes again in a later call.
            this.outgoing.follow(&buf[..written.min(buf.len())], &this.state);
        }
        this.track(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.track(poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_close(cx);
        self.track(poll)
    }
}

/// Where [`OutgoingFrames`] is in the stream it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// The segment count.
    Count,
    /// The segment sizes, this many read so far.
    Sizes(u32),
    /// The padding after an even number of sizes, this many bytes left.
    Padding(usize),
    /// The segments, this many bytes seen so far.
    Segments(u64),
    /// The framing made no sense, so frame boundaries are unknown from here.
    /// capnp never writes such a frame; open questions are then only closed
    /// by `Finish`, as the peer is told to.
    Lost,
}

/// Follows the standard framing of the bytes this side writes, keeping only
/// the head of each frame's first segment: a push can carry megabytes, none
/// of which matter here.
struct OutgoingFrames {
    scan: Scan,
    /// A size field of the segment table split across writes.
    field: [u8; 4],
    field_len: usize,
    segments: u32,
    first_segment_words: u32,
    frame_body_bytes: u64,
    head: [Word; HEAD_WORDS],
}

impl OutgoingFrames {
    fn new() -> Self {
        OutgoingFrames {
            scan: Scan::Count,
            field: [0; 4],
            field_len: 0,
            segments: 0,
            first_segment_words: 0,
            frame_body_bytes: 0,
            head: [capnp::word(0, 0, 0, 0, 0, 0, 0, 0); HEAD_WORDS],
        }
    }

    /// Follows `bytes`, the next ones written; closes in `state` the question
    /// of each complete `Return` that needs no `Finish`.
    fn follow(&mut self, mut bytes: &[u8], state: &GuardState) {
        while !bytes.is_empty() {
            match self.scan {
                Scan::Count | Scan::Sizes(_) => {
                    let take = (4 - self.field_len).min(bytes.len());
                    self.field[self.field_len..self.field_len + take].copy_from_slice(&bytes[..take]);
                    self.field_len += take;
                    bytes = &bytes[take..];
                    if self.field_len == 4 {
                        self.field_len = 0;
                        self.table_field(u32::from_le_bytes(self.field), state);
                    }
                }
                Scan::Padding(left) => {
                    let take = left.min(bytes.len());
                    bytes = &bytes[take..];
                    if take == left {
                        self.start_segments(state);
                    } else {
                        self.scan = Scan::Padding(left - take);
                    }
                }
                Scan::Segments(seen) => {
                    let left = self.frame_body_bytes - seen;
                    let take = usize::try_from(left).map_or(bytes.len(), |left| left.min(bytes.len()));
                    let head_bytes = self.head_words() * 8;
                    // The head is the start of the first segment, so of the segments.
                    if let Some(from) = usize::try_from(seen).ok().filter(|&from| from < head_bytes) {
                        let to = head_bytes.min(from + take);
                        Word::words_to_bytes_mut(&mut self.head)[from..to]
                            .copy_from_slice(&bytes[..to - from]);
                    }
                    bytes = &bytes[take..];
                    let seen = seen + take as u64;
                    if seen == self.frame_body_bytes {
                        self.end_frame(state);
                    } else {
                        self.scan = Scan::Segments(seen);
                    }
                }
                Scan::Lost => return,
            }
        }
    }

    /// Takes the next 4-byte field of a segment table.
    fn table_field(&mut self, value: u32, state: &GuardState) {
        match self.scan {
            Scan::Count => match value.checked_add(1) {
                Some(segments) if segments as usize <= MAX_SEGMENTS => {
                    self.segments = segments;
                    self.frame_body_bytes = 0;
                    self.scan = Scan::Sizes(0);
                }
                _ => self.scan = Scan::Lost,
            },
            Scan::Sizes(read) => {
                if read == 0 {
                    self.first_segment_words = value;
                }
                self.frame_body_bytes += u64::from(value) * 8;
                let read = read + 1;
                if read < self.segments {
                    self.scan = Scan::Sizes(read);
                } else if self.segments.is_multiple_of(2) {
                    // The count and an even number of sizes end mid-word.
                    self.scan = Scan::Padding(4);
                } else {
                    self.start_segments(state);
                }
            }
            Scan::Padding(_) | Scan::Segments(_) | Scan::Lost => {}
        }
    }

    fn start_segments(&mut self, state: &GuardState) {
        if self.frame_body_bytes == 0 {
            self.end_frame(state);
        } else {
            self.scan = Scan::Segments(0);
        }
    }

    fn head_words(&self) -> usize {
        HEAD_WORDS.min(self.first_segment_words as usize)
    }

    fn end_frame(&mut self, state: &GuardState) {
        self.scan = Scan::Count;
        if let Some((question, no_finish_needed)) = self.answer() {
            state.answered(question);
            if no_finish_needed {
                state.open_questions.borrow_mut().remove(&question);
            }
        }
    }

    /// The answer id of the frame just ended, if it is a `Return`, and
    /// whether it said `noFinishNeeded`. Reads only the kept head; a frame
    /// whose `Return` lies beyond it is ignored (its question then waits
    /// for a `Finish`, and its bytes for the session's end).
    fn answer(&self) -> Option<(u32, bool)> {
        let segments = [Word::words_to_bytes(&self.head[..self.head_words()])];
        let reader =
            capnp::message::Reader::new(capnp::message::SegmentArray::new(&segments), ReaderOptions::new());
        let root = reader.get_root::<message::Reader<'_>>().ok()?;
        match root.which() {
            Ok(message::Return(Ok(answer))) => Some((answer.get_answer_id(), answer.get_no_finish_needed())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn call(question: u32, caps: u32) -> Vec<u8> {
        let mut builder = capnp::message::Builder::new_default();
        let mut call = builder.init_root::<message::Builder<'_>>().init_call();
        call.set_question_id(question);
        call.init_params().init_cap_table(caps);
        capnp::serialize::write_message_to_words(&builder)
    }

    fn finish(question: u32) -> Vec<u8> {
        let mut builder = capnp::message::Builder::new_default();
        builder
            .init_root::<message::Builder<'_>>()
            .init_finish()
            .set_question_id(question);
        capnp::serialize::write_message_to_words(&builder)
    }

    fn read_all(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let options = crate::rpc::reader_options(1024 * 1024);
        let mut reader =
            GuardedReader::new(futures::io::Cursor::new(input), options, GuardState::new(), true);
        let mut out = Vec::new();
        futures::executor::block_on(reader.read_to_end(&mut out))?;
        Ok(out)
    }

    #[test]
    fn ordinary_messages_pass_through_unchanged() {
        let input: Vec<u8> = (0..100).flat_map(|q| [call(q, 1), finish(q)].concat()).collect();
        assert_eq!(read_all(input.clone()).unwrap(), input);
    }

    #[test]
    fn a_message_claiming_many_capabilities_ends_the_session() {
        let err = read_all(call(1, 1000)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("1000 capabilities"), "{err}");
        assert!(read_all(call(1, MAX_CAPS_PER_MESSAGE)).is_ok());
    }

    #[test]
    fn oversize_and_overfragmented_frames_are_refused_before_they_are_buffered() {
        // 600 segments.
        let mut frame = 599u32.to_le_bytes().to_vec();
        frame.extend([0; 4]);
        let err = read_all(frame).unwrap_err().to_string();
        assert!(err.contains("600 segments"), "{err}");
        // The largest count a header can claim.
        let err = read_all(vec![0xff; 8]).unwrap_err().to_string();
        assert!(err.contains("4294967296 segments"), "{err}");
        // 512 segments of 2^32-1 words each: refused, never summed into an overflow.
        let mut frame = 511u32.to_le_bytes().to_vec();
        frame.extend(std::iter::repeat_n(0xffu8, 4 * 512 + 4));
        let err = read_all(frame).unwrap_err().to_string();
        assert!(err.contains("a message of"), "{err}");
        // One segment claiming 256 MiB: refused from the table alone.
        let mut frame = 0u32.to_le_bytes().to_vec();
        frame.extend((32u32 << 20).to_le_bytes());
        let err = read_all(frame).unwrap_err().to_string();
        assert!(err.contains("a message of 268435456 bytes"), "{err}");
        // Cut off inside a message.
        let whole = call(1, 0);
        let err = read_all(whole[..whole.len() - 3].to_vec()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn promise_capabilities_are_refused() {
        // A promise resolved to itself: capnp-rpc would keep it forever.
        let mut builder = capnp::message::Builder::new_default();
        let mut resolve = builder.init_root::<message::Builder<'_>>().init_resolve();
        resolve.set_promise_id(0);
        resolve.init_cap().set_sender_promise(0);
        let err = read_all(capnp::serialize::write_message_to_words(&builder)).unwrap_err();
        assert!(err.to_string().contains("a promise capability"), "{err}");
        // The same inside a call's capability table.
        let mut builder = capnp::message::Builder::new_default();
        let mut call = builder.init_root::<message::Builder<'_>>().init_call();
        call.set_question_id(1);
        call.init_params().init_cap_table(1).get(0).set_sender_promise(7);
        let err = read_all(capnp::serialize::write_message_to_words(&builder)).unwrap_err();
        assert!(err.to_string().contains("a promise capability"), "{err}");
        // A settled capability passes.
        let mut builder = capnp::message::Builder::new_default();
        let mut call = builder.init_root::<message::Builder<'_>>().init_call();
        call.set_question_id(1);
        call.init_params().init_cap_table(1).get(0).set_sender_hosted(7);
        assert!(read_all(capnp::serialize::write_message_to_words(&builder)).is_ok());
    }

    #[test]
    fn questions_must_be_finished() {
        let unfinished: Vec<u8> = (0..=MAX_OPEN_QUESTIONS as u32).flat_map(|q| call(q, 0)).collect();
        let err = read_all(unfinished).unwrap_err().to_string();
        assert!(err.contains("questions open"), "{err}");
        let finished: Vec<u8> = (0..5000).flat_map(|q| [call(q, 0), finish(q)].concat()).collect();
        assert!(read_all(finished).is_ok());
    }

    /// A `Return` for `question` carrying `payload` bytes of results.
    fn answer(question: u32, no_finish_needed: bool, payload: usize) -> Vec<u8> {
        let mut builder = capnp::message::Builder::new_default();
        let mut answer = builder.init_root::<message::Builder<'_>>().init_return();
        answer.set_answer_id(question);
        answer.set_no_finish_needed(no_finish_needed);
        let mut results = answer.init_results();
        results
            .reborrow()
            .get_content()
            .set_as::<capnp::data::Owned>(&vec![7u8; payload][..])
            .unwrap();
        results.init_cap_table(0);
        capnp::serialize::write_message_to_words(&builder)
    }

    /// Takes at most `chunk` bytes per write.
    struct Trickle {
        written: Vec<u8>,
        chunk: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer for `state` whose inner writer takes `chunk` bytes at a time.
    fn trickle_writer(state: &Rc<GuardState>, chunk: usize) -> GuardedWriter<Trickle> {
        let inner = Trickle {
            written: Vec::new(),
            chunk,
        };
        GuardedWriter::new(inner, state.clone())
    }

    /// Writes `bytes` in pieces of `piece` bytes, as a `BufWriter` might.
    fn write_in_pieces<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8], piece: usize) {
        for part in bytes.chunks(piece) {
            futures::executor::block_on(writer.write_all(part)).unwrap();
        }
    }

    fn open(state: &GuardState, questions: impl IntoIterator<Item = u32>) {
        for question in questions {
            open_question(state, question).unwrap();
        }
    }

    fn open_ids(state: &GuardState) -> Vec<u32> {
        let mut open: Vec<u32> = state.open_questions.borrow().iter().copied().collect();
        open.sort_unstable();
        open
    }

    #[test]
    fn returns_needing_no_finish_close_their_questions_however_the_bytes_are_split() {
        let frames: Vec<u8> = (0..20).flat_map(|q| answer(q, true, 3 * q as usize)).collect();
        for (piece, chunk) in [
            (1, 1),
            (3, 5),
            (7, 2),
            (13, 1000),
            (frames.len(), 11),
            (frames.len(), usize::MAX),
        ] {
            let state = GuardState::new();
            open(&state, 0..25);
            let mut writer = trickle_writer(&state, chunk);
            write_in_pieces(&mut writer, &frames, piece);
            assert_eq!(writer.inner.written, frames, "passed on unchanged");
            assert_eq!(
                open_ids(&state),
                (20..25).collect::<Vec<_>>(),
                "pieces of {piece}, chunks of {chunk}"
            );
        }
    }

    #[test]
    fn returns_that_need_a_finish_leave_their_questions_open() {
        let state = GuardState::new();
        open(&state, [1, 2, 3]);
        let mut writer = trickle_writer(&state, 5);
        let frames = [answer(1, false, 10), answer(2, true, 10), finish(3), call(3, 0)].concat();
        write_in_pieces(&mut writer, &frames, 9);
        assert_eq!(open_ids(&state), [1, 3]);
    }

    #[test]
    fn only_bytes_the_inner_writer_took_are_followed() {
        let state = GuardState::new();
        open(&state, [4]);
        let frame = answer(4, true, 0);
        let mut writer = trickle_writer(&state, frame.len() - 1);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let poll = Pin::new(&mut writer).poll_write(&mut cx, &frame);
        assert!(matches!(poll, Poll::Ready(Ok(n)) if n == frame.len() - 1));
        assert_eq!(open_ids(&state), [4], "the frame is not complete yet");
        let poll = Pin::new(&mut writer).poll_write(&mut cx, &frame[frame.len() - 1..]);
        assert!(matches!(poll, Poll::Ready(Ok(1))));
        assert!(open_ids(&state).is_empty());
    }

    #[test]
    fn a_large_multi_segment_return_is_recognised_from_its_head() {
        let state = GuardState::new();
        open(&state, [9]);
        // Larger than the first segment, so the payload goes to a second one.
        let frame = answer(9, true, 1 << 20);
        assert!(
            u32::from_le_bytes(frame[..4].try_into().unwrap()) > 0,
            "several segments"
        );
        let mut writer = trickle_writer(&state, 8192);
        write_in_pieces(&mut writer, &frame, 8192);
        assert!(open_ids(&state).is_empty());
    }

    #[test]
    fn nonsense_output_is_passed_on_and_ignored() {
        let state = GuardState::new();
        open(&state, [0, 1]);
        let mut writer = trickle_writer(&state, 100);
        // A return whose head holds no valid message, then a frame claiming
        // 600 segments: framing is lost, never an error.
        let mut junk = 0u32.to_le_bytes().to_vec();
        junk.extend(2u32.to_le_bytes());
        junk.extend([0xff; 16]);
        junk.extend(599u32.to_le_bytes());
        junk.extend([0; 4]);
        let frames = [junk.clone(), answer(1, true, 0)].concat();
        write_in_pieces(&mut writer, &frames, 7);
        assert_eq!(writer.inner.written, frames);
        assert_eq!(open_ids(&state), [0, 1]);
    }

    #[test]
    fn a_peer_that_never_reuses_question_ids_stays_within_the_limit() {
        let calls: Vec<u8> = (0..5000).flat_map(|q| call(q, 0)).collect();
        let state = GuardState::new();
        let options = crate::rpc::reader_options(1024 * 1024);
        let mut reader = GuardedReader::new(futures::io::Cursor::new(calls), options, state.clone(), true);
        let mut writer = trickle_writer(&state, 13);
        // The bootstrap's answer carries a capability, so it stays open.
        open(&state, [u32::MAX]);
        futures::executor::block_on(async {
            for question in 0..5000 {
                let mut frame = vec![0; call(question, 0).len()];
                reader.read_exact(&mut frame).await.unwrap();
                writer.write_all(&answer(question, true, 40)).await.unwrap();
            }
        });
        assert_eq!(open_ids(&state), [u32::MAX]);
    }

    #[test]
    fn a_blocked_writer_stops_the_reader_until_it_can_write_again() {
        let state = GuardState::new();
        let options = crate::rpc::reader_options(1024);
        let mut reader =
            GuardedReader::new(futures::io::Cursor::new(call(1, 0)), options, state.clone(), true);
        state.set_write_blocked(true);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 64];
        assert!(Pin::new(&mut reader).poll_read(&mut cx, &mut buf).is_pending());
        assert!(
            state.reader_waiting.borrow().is_some(),
            "the reader waits to be woken"
        );
        state.set_write_blocked(false);
        assert!(state.reader_waiting.borrow().is_none(), "unblocking woke it");
        assert!(matches!(Pin::new(&mut reader).poll_read(&mut cx, &mut buf), Poll::Ready(Ok(n)) if n > 0));
    }
}
