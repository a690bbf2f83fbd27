//! Looks at every incoming RPC frame before capnp-rpc does, to bound what a
//! peer can make this side hold.
//!
//! capnp-rpc trusts its peer in three ways that a delivery node cannot:
//! - it builds an entry for every element of a message's capability table,
//!   so a 7 KiB message claiming 390,000 empty capabilities costs megabytes
//!   for as long as the call is pending;
//! - it keeps every answer until the peer sends `Finish`, so a peer that never
//!   does makes the session grow without bound;
//! - it queues replies without limit while the peer does not read them;
//! - it keeps a promise capability that the peer resolves to itself alive
//!   forever (found by fuzzing `rpc_session`).
//!
//! [`GuardedReader`] checks each whole frame (segment count, size, cap tables
//! of calls and returns, no promise capabilities, open questions) and ends the session with an error
//! naming the violation; with backpressure on, it also stops reading new
//! calls while [`GuardedWriter`] cannot write (the peer is not reading its
//! replies), and it yields to other sessions on the thread now and then so one
//! busy peer cannot starve them.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp::Word;
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_capnp::{cap_descriptor, message, payload, resolve, return_};
use futures::{AsyncRead, AsyncWrite};

/// Most capabilities one call or return may carry. Every node method takes
/// or returns at most one.
pub const MAX_CAPS_PER_MESSAGE: u32 = 16;

/// Most distinct question ids (calls and bootstraps) the peer may have
/// open before it sends their `Finish`.
///
/// An id is only forgotten on `Finish`. capnp-rpc answers a call without
/// capabilities with `noFinishNeeded`, so its callers never finish those and
/// the set holds every id used at once; that stays small because capnp-rpc
/// (Rust and C++) reuses the lowest free id. A peer that never reuses ids
/// would be refused after this many calls; counting only answers that need
/// a `Finish` means reading our own outgoing `Return`s, not done yet.
pub const MAX_OPEN_QUESTIONS: usize = 1024;

/// Cap'n Proto's default traversal limit, used when none is given.
const DEFAULT_LIMIT_WORDS: usize = 8 * 1024 * 1024;

/// Cap'n Proto's own limit on segments in one message.
const MAX_SEGMENTS: usize = 512;

/// A frame buffer larger than this (64 KiB) is released once handed on.
const KEEP_WORDS: usize = 8192;

/// Frames handed on before yielding to the other sessions of the thread.
const FRAMES_PER_YIELD: u32 = 32;

/// What the reader and writer halves of one session share.
#[derive(Debug, Default)]
pub struct GuardState {
    open_questions: RefCell<HashSet<u32>>,
    write_blocked: Cell<bool>,
    reader_waiting: RefCell<Option<Waker>>,
}

impl GuardState {
    /// A fresh state for one session.
    pub fn new() -> Rc<GuardState> {
        Rc::new(GuardState::default())
    }

    fn set_write_blocked(&self, blocked: bool) {
        if self.write_blocked.replace(blocked)
            && !blocked
            && let Some(waker) = self.reader_waiting.borrow_mut().take()
        {
            waker.wake();
        }
    }
}

enum Phase {
    /// Filling the first word: segment count and first segment size.
    Header,
    /// Filling the rest of the segment table.
    Table,
    /// Filling the segments.
    Body,
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
        }
    }

    /// Reads from `inner` until the current phase has its bytes; `Ok(false)`
    /// at a clean end of stream between frames.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.filled < self.needed {
            let bytes = Word::words_to_bytes_mut(&mut self.frame);
            let read = match Pin::new(&mut self.inner).poll_read(cx, &mut bytes[self.filled..self.needed]) {
                Poll::Ready(Ok(read)) => read,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
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

    fn resize(&mut self, bytes: usize) {
        self.needed = bytes;
        let words = bytes.div_ceil(8);
        if self.frame.len() < words {
            let mut bigger = Word::allocate_zeroed_vec(words);
            bigger[..self.frame.len()].copy_from_slice(&self.frame);
            self.frame = bigger;
        }
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
                        return Poll::Ready(Err(invalid(format!(
                            "a message of {segments} segments (at most {MAX_SEGMENTS})"
                        ))));
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
                            return Poll::Ready(Err(invalid(format!(
                                "a message of {} bytes (at most {})",
                                words.saturating_mul(8),
                                this.limit_words.saturating_mul(8)
                            ))));
                        }
                    };
                    this.resize(table_bytes + words * 8);
                    this.phase = Phase::Body;
                }
                Phase::Body => {
                    std::task::ready!(this.fill(cx))?;
                    let frame = &Word::words_to_bytes(&this.frame)[..this.needed];
                    inspect(frame, this.options, &this.state).map_err(invalid)?;
                    this.frames += 1;
                    this.phase = Phase::Out(0);
                }
            }
        }
    }
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("refused RPC message: {reason}"),
    )
}

/// Checks one whole frame. Messages capnp-rpc itself would refuse (unknown
/// kinds, broken pointers) are passed on for it to answer.
fn inspect(frame: &[u8], options: ReaderOptions, state: &GuardState) -> Result<(), String> {
    let Ok(reader) = capnp::serialize::read_message_from_flat_slice(&mut &frame[..], options) else {
        return Ok(());
    };
    let Ok(root) = reader.get_root::<message::Reader<'_>>() else {
        return Ok(());
    };
    match root.which() {
        Ok(message::Call(Ok(call))) => {
            if let Ok(params) = call.get_params() {
                check_caps(params)?;
            }
            open_question(state, call.get_question_id())
        }
        Ok(message::Bootstrap(Ok(bootstrap))) => open_question(state, bootstrap.get_question_id()),
        Ok(message::Resolve(Ok(resolve))) => match resolve.which() {
            Ok(resolve::Cap(Ok(cap))) => check_descriptor(cap),
            _ => Ok(()),
        },
        Ok(message::Finish(Ok(finish))) => {
            state
                .open_questions
                .borrow_mut()
                .remove(&finish.get_question_id());
            Ok(())
        }
        Ok(message::Return(Ok(answer))) => match answer.which() {
            Ok(return_::Results(Ok(results))) => check_caps(results),
            _ => Ok(()),
        },
        _ => Ok(()),
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

/// An `AsyncWrite` that tells the reader of its session when it is blocked.
pub struct GuardedWriter<W> {
    inner: W,
    state: Rc<GuardState>,
}

impl<W> GuardedWriter<W> {
    /// Guards `inner`, reporting to `state`.
    pub fn new(inner: W, state: Rc<GuardState>) -> Self {
        GuardedWriter { inner, state }
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
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(poll)
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

#[cfg(test)]
mod tests {
    use futures::AsyncReadExt;

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
