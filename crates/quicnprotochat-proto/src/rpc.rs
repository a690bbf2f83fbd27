//! A Cap'n Proto two-party RPC session over one QUIC bidirectional stream.
//!
//! Standard framing, nothing added: any Cap'n Proto implementation that can
//! open a QUIC stream can talk to a node. `RpcSystem` is `!Send`, so sessions
//! run on a tokio `LocalSet`.

use std::rc::Rc;

use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::io::{BufReader, BufWriter};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::guard::{GuardState, GuardedReader, GuardedWriter};
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
/// ([`GuardState::refused`]).
pub fn serve(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    bootstrap: node_service::Client,
    options: ReaderOptions,
) -> (NodeRpcSystem, Rc<GuardState>) {
    let (network, guard) = network(send, recv, Side::Server, options);
    (RpcSystem::new(Box::new(network), Some(bootstrap.client)), guard)
}

/// An RPC session serving `bootstrap` over any byte stream pair, e.g. an
/// in-memory pipe in tests and fuzzing.
pub fn serve_stream<R, W>(
    reader: R,
    writer: W,
    bootstrap: node_service::Client,
    options: ReaderOptions,
) -> NodeRpcSystem
where
    R: futures::AsyncRead + Unpin + 'static,
    W: futures::AsyncWrite + Unpin + 'static,
{
    let state = GuardState::new();
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
    let (network, _) = network(send, recv, Side::Client, options);
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
) -> (twoparty::VatNetwork<Reader>, Rc<GuardState>) {
    let state = GuardState::new();
    let backpressure = side == Side::Server;
    let network = twoparty::VatNetwork::new(
        GuardedReader::new(
            BufReader::new(recv.compat()),
            options,
            state.clone(),
            backpressure,
        ),
        BufWriter::new(GuardedWriter::new(send.compat_write(), state.clone())),
        side,
        options,
    );
    (network, state)
}
