//! A Cap'n Proto two-party RPC session over one QUIC bidirectional stream.
//!
//! Standard framing, nothing added: any Cap'n Proto implementation that can
//! open a QUIC stream can talk to a node. `RpcSystem` is `!Send`, so sessions
//! run on a tokio `LocalSet`.

use std::rc::Rc;
use std::sync::Arc;

use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::io::{BufReader, BufWriter};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::guard::{GuardState, GuardedReader, GuardedWriter};
use crate::memory::{Account, AnswerBounds};
use crate::node_capnp::node_service;

/// The RPC system type both ends run.
pub type NodeRpcSystem = RpcSystem<twoparty::VatId>;

/// Reader options for a peer allowed payloads of up to `max_payload` bytes.
///
/// The traversal limit bounds how much of a message the reader will walk (and
/// so how large a message it accepts at all). It leaves room for a payload of
/// twice the limit plus framing, so a merely oversize payload reaches the
/// service and gets a precise error instead of a broken connection; anything
/// far larger is refused by the framing layer before it is buffered.
pub fn reader_options(max_payload: usize) -> ReaderOptions {
    let mut options = ReaderOptions::new();
    let limit_bytes = max_payload.saturating_mul(2).saturating_add(1024 * 1024);
    options.traversal_limit_in_words(Some(limit_bytes / 8));
    // Our schemas nest a few levels at most; a deep message is an attack.
    options.nesting_limit(64);
    options
}

/// An RPC session on an accepted stream, serving `bootstrap` to the peer,
/// and its guard's state, which tells afterwards whether the guard ended it
/// ([`GuardState::refused`]) and meanwhile whether it waits on its peer.
/// Its frames and answers are held in `calls` (see [`crate::memory`]).
pub fn serve(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    bootstrap: node_service::Client,
    options: ReaderOptions,
    calls: Arc<Account>,
    bounds: AnswerBounds,
) -> (NodeRpcSystem, Rc<GuardState>) {
    let state = GuardState::with_memory(calls, bounds);
    let network = network(send, recv, Side::Server, options, state.clone());
    (RpcSystem::new(Box::new(network), Some(bootstrap.client)), state)
}

/// An RPC session serving `bootstrap` over any byte stream pair, e.g. an
/// in-memory pipe in tests and fuzzing; with `memory`, held as [`serve`]
/// holds it.
pub fn serve_stream<R, W>(
    reader: R,
    writer: W,
    bootstrap: node_service::Client,
    options: ReaderOptions,
    memory: Option<(Arc<Account>, AnswerBounds)>,
) -> NodeRpcSystem
where
    R: futures::AsyncRead + Unpin + 'static,
    W: futures::AsyncWrite + Unpin + 'static,
{
    let state = match memory {
        Some((calls, bounds)) => GuardState::with_memory(calls, bounds),
        None => GuardState::new(),
    };
    let network = twoparty::VatNetwork::new(
        GuardedReader::new(reader, options, state.clone(), true),
        GuardedWriter::new(writer, state),
        Side::Server,
        options,
    );
    RpcSystem::new(Box::new(network), Some(bootstrap.client))
}

/// An RPC session on a stream this side opened, and the node's `NodeService`.
pub fn connect(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    options: ReaderOptions,
) -> (NodeRpcSystem, node_service::Client) {
    let network = network(send, recv, Side::Client, options, GuardState::new());
    let mut system = RpcSystem::new(Box::new(network), None);
    let node = system.bootstrap(Side::Server);
    (system, node)
}

type Reader = GuardedReader<BufReader<tokio_util::compat::Compat<quinn::RecvStream>>>;

/// Both ends guard what they read (see [`crate::guard`]); only the node stops
/// reading while its replies are not being read, since a client that did the
/// same could deadlock with it.
fn network(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    side: Side,
    options: ReaderOptions,
    state: Rc<GuardState>,
) -> twoparty::VatNetwork<Reader> {
    let backpressure = side == Side::Server;
    twoparty::VatNetwork::new(
        GuardedReader::new(
            BufReader::new(recv.compat()),
            options,
            state.clone(),
            backpressure,
        ),
        BufWriter::new(GuardedWriter::new(send.compat_write(), state)),
        side,
        options,
    )
}
