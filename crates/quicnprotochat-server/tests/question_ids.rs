//! A peer that never reuses question ids keeps its session: raw Cap'n Proto
//! RPC over real QUIC against the real node, 5,000 pings with ever-increasing
//! question ids and no `Finish` for answers that say `noFinishNeeded`, far
//! more than the guard's limit on open questions.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use std::time::Duration;

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp::serialize::OwnedSegments;
use capnp::traits::HasTypeId;
use capnp_rpc::rpc_capnp::{cap_descriptor, message, return_};
use node::{STEP_TIMEOUT, TestNode};
use quicnprotochat_proto::PROTOCOL_VERSION;
use quicnprotochat_proto::guard::MAX_OPEN_QUESTIONS;
use quicnprotochat_proto::node_capnp::node_service;

/// Pings sent with fresh question ids, after the bootstrap's id 0.
const PINGS: u32 = 5_000;

/// Bounds the whole conversation, so a stalled session fails the test
/// instead of hanging it.
const CONVERSATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Writes one message in standard stream framing.
async fn send(stream: &mut quinn::SendStream, builder: &Builder<HeapAllocator>) {
    let bytes = capnp::serialize::write_message_to_words(builder);
    stream.write_all(&bytes).await.unwrap();
}

/// Reads one message in standard stream framing.
async fn receive(stream: &mut quinn::RecvStream) -> capnp::message::Reader<OwnedSegments> {
    let mut count = [0u8; 4];
    stream.read_exact(&mut count).await.unwrap();
    let segments = u32::from_le_bytes(count) as usize + 1;
    assert!(segments <= 512, "a sane segment count, got {segments}");
    // The sizes, padded so the table fills whole words.
    let mut table = vec![0u8; (4 + 4 * segments).next_multiple_of(8) - 4];
    stream.read_exact(&mut table).await.unwrap();
    let words: usize = table[..4 * segments]
        .chunks_exact(4)
        .map(|size| u32::from_le_bytes(size.try_into().unwrap()) as usize)
        .sum();
    let mut body = vec![0u8; words * 8];
    stream.read_exact(&mut body).await.unwrap();
    let frame = [&count[..], &table, &body].concat();
    capnp::serialize::read_message(&mut frame.as_slice(), ReaderOptions::new()).unwrap()
}

/// Reads messages until the `Return` for `question` and hands it to `check`;
/// anything else the node may send first is skipped, an `Abort` fails.
async fn receive_return<T>(
    stream: &mut quinn::RecvStream,
    question: u32,
    check: impl FnOnce(return_::Reader<'_>) -> T,
) -> T {
    loop {
        let reader = receive(stream).await;
        let root = reader.get_root::<message::Reader<'_>>().unwrap();
        match root.which().unwrap() {
            message::Return(answer) => {
                let answer = answer.unwrap();
                assert_eq!(answer.get_answer_id(), question, "answers arrive in order");
                return check(answer);
            }
            message::Abort(abort) => panic!(
                "the node aborted the session at question {question}: {:?}",
                abort.unwrap().get_reason()
            ),
            _ => {}
        }
    }
}

/// Asks the node's bootstrap capability as question 0; returns its export id.
async fn bootstrap(send_stream: &mut quinn::SendStream, recv: &mut quinn::RecvStream) -> u32 {
    let mut builder = Builder::new_default();
    builder
        .init_root::<message::Builder<'_>>()
        .init_bootstrap()
        .set_question_id(0);
    send(send_stream, &builder).await;
    receive_return(recv, 0, |answer| {
        // Results carrying a capability need a Finish, so the node does not
        // waive it; leaving it unsent keeps this one question open throughout.
        assert!(!answer.get_no_finish_needed());
        let return_::Results(results) = answer.which().unwrap() else {
            panic!("the bootstrap failed");
        };
        let table = results.unwrap().get_cap_table().unwrap();
        assert_eq!(table.len(), 1);
        match table.get(0).which().unwrap() {
            cap_descriptor::SenderHosted(export) => export,
            _ => panic!("the node hosts its NodeService itself"),
        }
    })
    .await
}

/// Calls `ping` on `node` as `question`, checking the node answered with
/// results and waived the `Finish`.
async fn ping(send_stream: &mut quinn::SendStream, recv: &mut quinn::RecvStream, node: u32, question: u32) {
    let mut builder = Builder::new_default();
    {
        let mut call = builder.init_root::<message::Builder<'_>>().init_call();
        call.set_question_id(question);
        call.set_interface_id(node_service::Client::TYPE_ID);
        call.set_method_id(0);
        call.reborrow().init_target().set_imported_cap(node);
        let mut params = call.init_params();
        params
            .reborrow()
            .get_content()
            .init_as::<node_service::ping_params::Builder<'_>>();
        params.init_cap_table(0);
    }
    send(send_stream, &builder).await;
    receive_return(recv, question, |answer| {
        assert!(
            answer.get_no_finish_needed(),
            "question {question}: the node waives Finish for results without capabilities"
        );
        match answer.which().unwrap() {
            return_::Results(results) => {
                let info = results
                    .unwrap()
                    .get_content()
                    .get_as::<node_service::ping_results::Reader<'_>>()
                    .unwrap()
                    .get_info()
                    .unwrap();
                assert_eq!(info.get_protocol_version(), PROTOCOL_VERSION);
            }
            return_::Exception(e) => panic!("question {question}: {:?}", e.unwrap().get_reason()),
            _ => panic!("question {question}: neither results nor an exception"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reuses_question_ids_keeps_its_session() {
    assert!(
        PINGS as usize > 2 * MAX_OPEN_QUESTIONS,
        "the test exceeds the limit"
    );
    let node = TestNode::start(|config| config.ping_rate = 0).await;

    let endpoint = node::client_endpoint(node.cert(), None);
    let connection = tokio::time::timeout(STEP_TIMEOUT, endpoint.connect(node.addr(), "localhost").unwrap())
        .await
        .unwrap()
        .unwrap();

    tokio::time::timeout(CONVERSATION_TIMEOUT, async {
        let (mut send_stream, mut recv) = connection.open_bi().await.unwrap();
        let service = bootstrap(&mut send_stream, &mut recv).await;
        // Fresh ids only, and no Finish for any of them: only the node's
        // noFinishNeeded tells its guard these questions are closed.
        for question in 1..=PINGS {
            ping(&mut send_stream, &mut recv, service, question).await;
        }
        // The session is still up: one more call is answered.
        ping(&mut send_stream, &mut recv, service, PINGS + 1).await;
    })
    .await
    .expect("the conversation finishes in time");

    connection.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(STEP_TIMEOUT, endpoint.wait_idle()).await;
    node.stop().await;
}
