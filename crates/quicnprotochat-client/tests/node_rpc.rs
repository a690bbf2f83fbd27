//! NodeService over real QUIC: exactly-once KeyPackages, FIFO queues, and
//! bad input that gets precise errors while the node keeps serving others.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use quicnprotochat_core::KeyPackageStock;
use std::collections::HashSet;

use capnp::capability::FromClientHook;
use common::tampered::{Tampered, Tampering};
use common::{TestNode, enqueue_ok, identity, local, welcome_epoch_key};
use quicnprotochat_core::{
    GroupId, GroupMember, IdentityKey, KeyPackageOptions, Seq, StateKey, Suite, generate_key_package_with,
};
use quicnprotochat_proto::delivery_capnp::delivery_service;
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedKeyPackage, FetchedWelcomeTree, SendOutcome};
use quicnprotochat_proto::wire::{CommitToSend, Envelope, GroupState};
use quicnprotochat_proto::{DEFAULT_MAX_PAYLOAD, cert, peer, rpc, transport};

fn key(n: u8) -> IdentityKey {
    identity(n).public_key()
}

/// A real KeyPackage of `identity(n)` (its private keys are thrown away).
fn key_package(n: u8, options: KeyPackageOptions) -> Vec<u8> {
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    generate_key_package_with(&provider, &identity(n), options).unwrap()
}

/// A raw connection to the node authenticated as `identity(n)`, for sending
/// what the typed client never would. Returns the connection and the node's
/// Delivery Service.
async fn raw(node: &TestNode, n: u8) -> (quinn::Endpoint, quinn::Connection, delivery_service::Client) {
    let certificate = peer::client_certificate(&identity(n).pkcs8_der().unwrap()).unwrap();
    let config =
        transport::client_config(cert::load_certificate(&node.cert()).unwrap(), Some(certificate)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connection = endpoint.connect(node.addr, "localhost").unwrap().await.unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let (session, service) = rpc::connect(send, recv, rpc::reader_options(DEFAULT_MAX_PAYLOAD));
    tokio::task::spawn_local(session);
    (endpoint, connection, service.cast_to())
}

#[test]
fn a_key_package_is_served_exactly_once_to_concurrent_fetchers() {
    let node = TestNode::start();
    local(async {
        let uploader = node.connect_as(&identity(1)).await;
        let only = key_package(1, KeyPackageOptions::default());
        uploader.upload_key_package(&key(1), &only).await.unwrap();
        let mut fetchers = Vec::new();
        for _ in 0..8 {
            fetchers.push(node.connect().await);
        }
        // All eight calls are in flight at once, on eight connections.
        let wanted = key(1);
        let results = futures::future::join_all(fetchers.iter().map(|f| f.fetch_key_package(&wanted))).await;
        let served: Vec<_> = results
            .into_iter()
            .filter_map(|fetched| match fetched.unwrap() {
                FetchedKeyPackage::Package(package) => Some(package),
                FetchedKeyPackage::None => None,
                limited => panic!("{limited:?}"),
            })
            .collect();
        assert_eq!(served, vec![only]);
    });
}

#[test]
fn two_cli_processes_fetching_the_same_key_package_get_it_once() {
    let node = TestNode::start();
    let key = node.cli_ok(&["register"]).trim().to_owned();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let args = vec![
                "--server".to_owned(),
                node.addr.to_string(),
                "--ca-cert".to_owned(),
                node.cert().display().to_string(),
                "fetch-key".to_owned(),
                key.clone(),
            ];
            std::thread::spawn(move || common::run_client(&args))
        })
        .collect();
    let outputs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(outputs.iter().filter(|o| o.status.success()).count(), 1);
    let refused = outputs.iter().find(|o| !o.status.success()).unwrap();
    assert!(common::stderr(refused).contains("has no KeyPackage"));
}

#[test]
fn fetch_drains_the_queue_in_fifo_order() {
    let node = TestNode::start();
    local(async {
        let client = node.connect_as(&identity(2)).await;
        for i in 0..50u32 {
            enqueue_ok(&client, &key(2), &i.to_be_bytes()).await;
        }
        let fetched = client.fetch(&key(2)).await.unwrap();
        assert_eq!(
            fetched,
            (0..50u32).map(|i| i.to_be_bytes().to_vec()).collect::<Vec<_>>()
        );
        assert!(client.fetch(&key(2)).await.unwrap().is_empty());
        assert_eq!(
            client.fetch_key_package(&key(99)).await.unwrap(),
            FetchedKeyPackage::None
        );
    });
}

#[test]
fn an_oversize_payload_is_refused_and_nothing_is_stored() {
    let node = TestNode::start();
    local(async {
        let client = node.connect_as(&identity(3)).await;
        let err = client
            .enqueue(&key(3), &vec![0u8; DEFAULT_MAX_PAYLOAD + 1])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("payload"), "{err}");
        assert!(err.contains("limit of 1048576 bytes"), "{err}");
        let err = client
            .upload_key_package(&key(3), &vec![0u8; DEFAULT_MAX_PAYLOAD + 1])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("package"), "{err}");
        // The same connection still works, and nothing was queued.
        enqueue_ok(&client, &key(3), &vec![1u8; DEFAULT_MAX_PAYLOAD]).await;
        assert_eq!(client.fetch(&key(3)).await.unwrap().len(), 1);
    });
}

#[test]
fn malformed_keys_and_empty_payloads_get_errors_naming_the_field() {
    let node = TestNode::start();
    local(async {
        let (_endpoint, _connection, delivery) = raw(&node, 5).await;
        for (recipient, payload, field) in [
            (vec![0u8; 31], b"x".to_vec(), "recipientKey"),
            (vec![0u8; 33], b"x".to_vec(), "recipientKey"),
            (Vec::new(), b"x".to_vec(), "recipientKey"),
            (vec![0u8; 32], Vec::new(), "payload"),
        ] {
            let mut request = delivery.enqueue_request();
            request.get().set_recipient_key(&recipient);
            request.get().set_payload(&payload);
            let err = request.send().promise.await.err().expect("refused").to_string();
            assert!(err.contains(field), "{err}");
        }
        let mut request = delivery.fetch_request();
        request.get().set_recipient_key(&[1, 2, 3]);
        let err = request.send().promise.await.err().expect("refused").to_string();
        assert!(err.contains("recipientKey") && err.contains("got 3"), "{err}");

        // A well-behaved client is unaffected.
        let client = node.connect().await;
        client.ping().await.unwrap();
    });
}

#[test]
fn garbage_on_the_stream_does_not_disturb_other_clients() {
    let node = TestNode::start();
    local(async {
        let config = transport::client_config(cert::load_certificate(&node.cert()).unwrap(), None).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let attacks: [&[u8]; 3] = [
            // A segment table claiming one enormous segment.
            &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f],
            // A segment table claiming 2^31 segments.
            &[0xff, 0xff, 0xff, 0x7f, 1, 0, 0, 0],
            // Plain noise.
            b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        ];
        for attack in attacks {
            let connection = endpoint.connect(node.addr, "localhost").unwrap().await.unwrap();
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            send.write_all(attack).await.unwrap();
            let _ = send.finish();
            // The node ends the session; it must not answer with anything
            // but an RPC abort or a closed stream.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), recv.read_to_end(1 << 16)).await;
        }
        let client = node.connect_as(&identity(4)).await;
        let info = client.ping().await.unwrap();
        assert_eq!(info.protocol_version, quicnprotochat_proto::PROTOCOL_VERSION);
        enqueue_ok(&client, &key(4), b"still works").await;
        assert_eq!(
            client.fetch(&key(4)).await.unwrap(),
            vec![b"still works".to_vec()]
        );
    });
}

#[test]
fn many_clients_at_once_each_get_their_own_messages() {
    let node = TestNode::start();
    local(async {
        let mut clients = Vec::new();
        for i in 0..16u8 {
            clients.push(node.connect_as(&identity(100 + i)).await);
        }
        let sends = clients.iter().enumerate().map(|(i, client)| async move {
            for n in 0..20u8 {
                enqueue_ok(client, &key(100 + i as u8), &[n]).await;
            }
        });
        futures::future::join_all(sends).await;
        for (i, client) in clients.iter().enumerate() {
            let got = client.fetch(&key(100 + i as u8)).await.unwrap();
            assert_eq!(got, (0..20u8).map(|n| vec![n]).collect::<Vec<_>>());
        }
        let distinct: HashSet<_> = (0..16u8).map(|i| key(100 + i)).collect();
        assert_eq!(distinct.len(), 16);
    });
}

#[test]
fn every_enqueue_answered_before_a_shutdown_is_kept() {
    let mut node = TestNode::start();
    let options = node.options();
    // A client pipelining enqueues on its own thread while the node stops.
    let sender = std::thread::spawn(move || {
        local(async move {
            let client =
                quicnprotochat_client::node_client::NodeClient::connect(&options, Some(&identity(7)))
                    .await
                    .unwrap();
            let mut acknowledged = Vec::new();
            let mut next = 0u32;
            'outer: loop {
                let batch: Vec<u32> = (next..next + 32).collect();
                next += 32;
                let recipient = key(7);
                let payloads: Vec<[u8; 4]> = batch.iter().map(|n| n.to_be_bytes()).collect();
                let calls = payloads.iter().map(|p| client.enqueue(&recipient, p));
                for (n, result) in batch.iter().zip(futures::future::join_all(calls).await) {
                    match result {
                        Ok(SendOutcome::Accepted) => acknowledged.push(*n),
                        Ok(_) | Err(_) => break 'outer,
                    }
                }
            }
            (acknowledged, next)
        })
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    node.restart();
    let (acknowledged, attempted) = sender.join().unwrap();
    assert!(
        !acknowledged.is_empty(),
        "some enqueues were answered before the shutdown"
    );

    let stored: HashSet<u32> = local(async {
        let client = node.connect_as(&identity(7)).await;
        client
            .fetch_all(&key(7))
            .await
            .unwrap()
            .into_iter()
            .map(|p| u32::from_be_bytes(p.try_into().unwrap()))
            .collect()
    });
    for n in &acknowledged {
        assert!(stored.contains(n), "acknowledged enqueue {n} was lost");
    }
    assert!(
        stored.iter().all(|n| *n < attempted),
        "nothing appears that was not sent"
    );
}

#[test]
fn a_batch_with_one_bad_envelope_stores_nothing() {
    let node = TestNode::start();
    local(async {
        let (_endpoint, _connection, delivery) = raw(&node, 8).await;
        let mut request = delivery.enqueue_batch_request();
        let mut envelopes = request.get().init_envelopes(2);
        {
            let mut good = envelopes.reborrow().get(0);
            good.set_payload(b"would be queued");
            good.init_recipient_keys(1).set(0, key(8).as_bytes());
        }
        {
            let mut bad = envelopes.reborrow().get(1);
            bad.set_payload(b"x");
            let mut keys = bad.init_recipient_keys(2);
            keys.set(0, key(9).as_bytes());
            keys.set(1, &[1, 2, 3]);
        }
        let err = request.send().promise.await.err().expect("refused").to_string();
        assert!(err.contains("envelopes[1].recipientKeys[1]"), "{err}");

        let client = node.connect_as(&identity(8)).await;
        let nine = node.connect_as(&identity(9)).await;
        assert!(client.fetch(&key(8)).await.unwrap().is_empty());
        assert!(nine.fetch(&key(9)).await.unwrap().is_empty());

        let batch = [
            quicnprotochat_proto::wire::Envelope {
                recipients: vec![key(8), key(9)],
                payload: b"to both".to_vec(),
                message_id: None,
            },
            quicnprotochat_proto::wire::Envelope {
                recipients: vec![key(9)],
                payload: b"to nine".to_vec(),
                message_id: None,
            },
        ];
        assert_eq!(client.enqueue_batch(&batch).await.unwrap(), SendOutcome::Accepted);
        assert_eq!(client.fetch(&key(8)).await.unwrap(), vec![b"to both".to_vec()]);
        assert_eq!(
            nine.fetch(&key(9)).await.unwrap(),
            vec![b"to both".to_vec(), b"to nine".to_vec()]
        );
    });
}

#[test]
fn only_the_owner_may_read_a_queue_or_upload_its_key_packages() {
    let node = TestNode::start();
    local(async {
        let owner = node.connect_as(&identity(10)).await;
        let stranger = node.connect_as(&identity(11)).await;
        let anonymous = node.connect().await;
        enqueue_ok(&owner, &key(10), b"private").await;

        for client in [&stranger, &anonymous] {
            let err = client.fetch(&key(10)).await.unwrap_err().to_string();
            assert!(err.contains("permission denied"), "{err}");
            let err = client
                .upload_key_package(&key(10), b"forged")
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("permission denied"), "{err}");
        }
        let err = anonymous
            .enqueue(&key(10), b"spam")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("permission denied") && err.contains("authenticated"),
            "{err}"
        );
        let err = anonymous
            .enqueue_batch(&[quicnprotochat_proto::wire::Envelope {
                recipients: vec![key(10)],
                payload: b"spam".to_vec(),
                message_id: None,
            }])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("permission denied"), "{err}");

        // Anonymous clients may still ping and take KeyPackages.
        anonymous.ping().await.unwrap();
        assert_eq!(
            anonymous.fetch_key_package(&key(10)).await.unwrap(),
            FetchedKeyPackage::None
        );
        // The owner's queue is intact: only the owner's message, once.
        assert_eq!(owner.fetch(&key(10)).await.unwrap(), vec![b"private".to_vec()]);
        // A stranger may send to the owner.
        enqueue_ok(&stranger, &key(10), b"hello").await;
        assert_eq!(owner.fetch(&key(10)).await.unwrap(), vec![b"hello".to_vec()]);
    });
}

#[test]
fn key_packages_whose_keys_have_the_wrong_length_for_their_suite_are_refused() {
    let node = TestNode::start();
    local(async {
        let client = node.connect_as(&identity(22)).await;
        // Validly signed by their owner, made through openmls with crypto
        // that derives 32-byte HPKE public keys: right for X25519, wrong for
        // the hybrid suite (1,216 bytes).
        let with_keys_of = |length, suite| {
            let inner = openmls_rust_crypto::OpenMlsRustCrypto::default();
            let provider = Tampering {
                inner: &inner,
                crypto: Tampered {
                    hpke_public_key_len: Some(length),
                    ..Tampered::default()
                },
            };
            let options = KeyPackageOptions {
                suite,
                ..KeyPackageOptions::default()
            };
            generate_key_package_with(&provider, &identity(22), options).unwrap()
        };
        let short = with_keys_of(32, Suite::MlKem768X25519);
        let err = client
            .upload_key_package(&key(22), &short)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("init key has 32 bytes") && err.contains("1216"),
            "{err}"
        );
        // One byte short in the classic suite too.
        let err = client
            .upload_key_package(&key(22), &with_keys_of(31, Suite::X25519))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("init key has 31 bytes"), "{err}");
        // The same tampering that changes nothing passes: the check is the
        // length, not the provider.
        client
            .upload_key_package(&key(22), &with_keys_of(32, Suite::X25519))
            .await
            .unwrap();
        assert_eq!(
            client.key_package_count(&key(22)).await.unwrap(),
            KeyPackageStock {
                count: 1,
                has_last_resort: false
            }
        );
    });
}

#[test]
fn garbage_and_foreign_key_packages_are_refused_with_the_reason() {
    let node = TestNode::start();
    local(async {
        let client = node.connect_as(&identity(20)).await;
        let err = client
            .upload_key_package(&key(20), b"garbage")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("package: invalid KeyPackage"), "{err}");
        // Validly signed, but by someone else.
        let foreign = key_package(21, KeyPackageOptions::default());
        let err = client
            .upload_key_package(&key(20), &foreign)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("belongs to") && err.contains("not to identityKey"),
            "{err}"
        );
        let err = client
            .upload_key_packages(
                &key(20),
                &[key_package(20, KeyPackageOptions::default()), foreign],
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("packages[1]"), "{err}");
        assert_eq!(
            client.key_package_count(&key(20)).await.unwrap(),
            KeyPackageStock {
                count: 0,
                has_last_resort: false
            },
            "all or none"
        );
    });
}

#[test]
fn the_last_resort_is_served_again_and_again_after_the_others() {
    let node = TestNode::start();
    local(async {
        let owner = node.connect_as(&identity(22)).await;
        let ordinary = key_package(22, KeyPackageOptions::default());
        let last = key_package(
            22,
            KeyPackageOptions {
                last_resort: true,
                lifetime_seconds: None,
                suite: Default::default(),
            },
        );
        owner
            .upload_key_packages(&key(22), &[last.clone(), ordinary.clone()])
            .await
            .unwrap();
        assert_eq!(
            owner.key_package_count(&key(22)).await.unwrap(),
            KeyPackageStock {
                count: 1,
                has_last_resort: true
            }
        );
        let anyone = node.connect().await;
        assert_eq!(
            anyone.fetch_key_package(&key(22)).await.unwrap(),
            FetchedKeyPackage::Package(ordinary)
        );
        for _ in 0..3 {
            assert_eq!(
                anyone.fetch_key_package(&key(22)).await.unwrap(),
                FetchedKeyPackage::Package(last.clone())
            );
        }
        assert_eq!(
            owner.key_package_count(&key(22)).await.unwrap(),
            KeyPackageStock {
                count: 0,
                has_last_resort: true
            }
        );
        let err = anyone.key_package_count(&key(22)).await.unwrap_err().to_string();
        assert!(err.contains("permission denied"), "{err}");
    });
}

#[test]
fn an_expired_key_package_is_not_served() {
    let node = TestNode::start();
    local(async {
        let owner = node.connect_as(&identity(23)).await;
        // Valid for 3 s: enough to be uploaded on a busy machine (the node
        // refuses a KeyPackage already expired), then let expire.
        let short = KeyPackageOptions {
            last_resort: false,
            lifetime_seconds: Some(3),
            suite: Default::default(),
        };
        owner
            .upload_key_package(&key(23), &key_package(23, short))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(4100)).await;
        assert_eq!(
            node.connect().await.fetch_key_package(&key(23)).await.unwrap(),
            FetchedKeyPackage::None
        );
        assert_eq!(
            owner.key_package_count(&key(23)).await.unwrap(),
            KeyPackageStock {
                count: 0,
                has_last_resort: false
            }
        );
    });
}

#[test]
fn a_retried_batch_with_the_same_message_ids_is_stored_once() {
    let node = TestNode::start();
    local(async {
        let sender = node.connect_as(&identity(30)).await;
        let batch = [quicnprotochat_proto::wire::Envelope {
            recipients: vec![key(31), key(32)],
            payload: b"exactly once".to_vec(),
            message_id: Some(b"retry-me".to_vec()),
        }];
        for _ in 0..2 {
            assert_eq!(sender.enqueue_batch(&batch).await.unwrap(), SendOutcome::Accepted);
        }
        for n in [31, 32] {
            let owner = node.connect_as(&identity(n)).await;
            let got = owner.fetch_since(&key(n), Seq::ZERO, 0).await.unwrap();
            assert_eq!(got.len(), 1, "recipient {n}");
            assert_eq!(got[0].payload, b"exactly once".to_vec());
            owner.ack(&key(n), got[0].seq).await.unwrap();
            assert!(owner.fetch_since(&key(n), Seq::ZERO, 0).await.unwrap().is_empty());
        }
        let err = sender
            .ack(&key(31), Seq::new(u64::MAX))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("permission denied"), "{err}");
        let err = sender
            .fetch_since(&key(31), Seq::ZERO, 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("permission denied"), "{err}");
    });
}

#[test]
fn a_subscriber_receives_messages_enqueued_on_another_connection() {
    let node = TestNode::start();
    local(async {
        let owner = node.connect_as(&identity(40)).await;
        let sender = node.connect_as(&identity(41)).await;
        enqueue_ok(&sender, &key(40), b"before").await;
        let (sink, mut pushed) = tokio::sync::mpsc::channel(1);
        let subscription = owner.subscribe(&key(40), Seq::ZERO, sink).await.unwrap();
        let first = pushed.recv().await.unwrap();
        assert_eq!(
            first.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
            [b"before".as_slice()]
        );
        for n in 0..3u8 {
            enqueue_ok(&sender, &key(40), &[n]).await;
        }
        let mut received = Vec::new();
        while received.len() < 3 {
            let batch = tokio::time::timeout(std::time::Duration::from_secs(5), pushed.recv())
                .await
                .expect("pushed in time")
                .unwrap();
            received.extend(batch);
        }
        assert_eq!(
            received.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(received.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(received[0].seq > first[0].seq);
        // A stranger may not subscribe to someone else's queue.
        let (stranger_sink, _) = tokio::sync::mpsc::channel(1);
        let err = sender
            .subscribe(&key(40), Seq::ZERO, stranger_sink)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("permission denied"), "{err}");
        // Dropping the subscription ends the push.
        drop(subscription);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        enqueue_ok(&sender, &key(40), b"after").await;
        let late = tokio::time::timeout(std::time::Duration::from_millis(500), pushed.recv()).await;
        assert!(
            matches!(late, Err(_) | Ok(None)),
            "no push after the subscription ended: {late:?}"
        );
    });
}

#[test]
fn a_long_poll_answers_when_a_message_arrives_or_when_the_wait_ends() {
    let node = TestNode::start();
    local(async {
        let owner = node.connect_as(&identity(42)).await;
        let sender = node.connect_as(&identity(43)).await;
        let started = std::time::Instant::now();
        assert!(
            owner
                .fetch_wait(&key(42), Seq::ZERO, 0, 300)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));

        let queue = key(42);
        let poll = owner.fetch_wait(&queue, Seq::ZERO, 0, 10_000);
        let send = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            enqueue_ok(&sender, &key(42), b"wake up").await;
        };
        let started = std::time::Instant::now();
        let (got, ()) = futures::join!(poll, send);
        assert_eq!(got.unwrap()[0].payload, b"wake up".to_vec());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "answered on arrival"
        );
    });
}

#[test]
fn a_session_may_hold_only_a_few_subscriptions() {
    let node = TestNode::start();
    local(async {
        let owner = node.connect_as(&identity(50)).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            let (sink, _) = tokio::sync::mpsc::channel(1);
            held.push(owner.subscribe(&key(50), Seq::ZERO, sink).await.unwrap());
        }
        let (sink, _) = tokio::sync::mpsc::channel(1);
        let err = owner
            .subscribe(&key(50), Seq::ZERO, sink)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("overloaded"), "{err}");
    });
}

#[test]
fn a_commit_that_loses_the_race_is_told_the_groups_epoch_as_data() {
    let node = TestNode::start();
    local(async {
        // identity(1) creates the group and adds identity(2); the first
        // change hands the node the group's public state of epoch 0.
        let (one, two) = (
            openmls_rust_crypto::OpenMlsRustCrypto::default(),
            openmls_rust_crypto::OpenMlsRustCrypto::default(),
        );
        let mut creator =
            GroupMember::create(&one, &identity(1), &GroupId::new(b"race#1".to_vec()).unwrap()).unwrap();
        let state_key = creator.current_state_key(&one).unwrap();
        let package = quicnprotochat_core::generate_key_package(&two, &identity(2)).unwrap();
        let added = creator
            .add_members(
                &one,
                &identity(1),
                &[package],
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        let added_info = creator.pending_group_info().unwrap().to_vec();
        let state = creator.export_public_state(&one, &identity(1)).unwrap();
        let state = GroupState {
            group_info: state.group_info,
            ratchet_tree: state.ratchet_tree,
        };
        let group_id = GroupId::new(b"race#1".to_vec()).unwrap();
        let envelope = |to: u8, payload: Vec<u8>, id: &[u8]| Envelope {
            recipients: vec![key(to)],
            payload,
            message_id: Some(id.to_vec()),
        };
        let winner = node.connect_as(&identity(1)).await;
        let loser = node.connect_as(&identity(2)).await;
        let commit = Envelope {
            recipients: vec![],
            payload: added.commit,
            message_id: Some(b"add".to_vec()),
        };
        let welcome = envelope(2, added.welcome.clone(), b"welcome");
        let started = winner
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 0,
                commit: &commit,
                welcome: Some(&welcome),
                initial_state: Some(&state),
                group_info: Some(&added_info),
                epoch_key: Some(&creator.pending_epoch_key(&one).unwrap()),
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(started, ChangeOutcome::Accepted);
        creator.merge_pending_commit(&one).unwrap();
        let FetchedWelcomeTree::Tree {
            tree,
            state_key: Some(joiners_key),
        } = loser
            .fetch_welcome_tree(&group_id, 1, &welcome_epoch_key(&two, &added.welcome))
            .await
            .unwrap()
        else {
            panic!("the node keeps the tree and the state key for the member it added");
        };
        assert_eq!(joiners_key, state_key);
        let mut joiner = GroupMember::join(
            &two,
            &added.welcome,
            Some(&tree),
            &quicnprotochat_core::NoDeviceLists,
        )
        .unwrap();

        // Two Commits made in epoch 1, as two members racing would make them.
        let first = creator.self_update(&one, &identity(1)).unwrap();
        let first_info = creator.pending_group_info().unwrap().to_vec();
        let second = joiner.self_update(&two, &identity(2)).unwrap();
        let second_info = joiner.pending_group_info().unwrap().to_vec();
        let won = winner
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 1,
                commit: &envelope(2, first.clone(), b"a"),
                welcome: None,
                initial_state: None,
                group_info: Some(&first_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(won, ChangeOutcome::Accepted);
        // Without the group's state key the loser is told nothing about
        // the group, not even its epoch; with it, the epoch, as data.
        let second = envelope(1, second, b"b");
        let wrong_key = StateKey::from_bytes([9; 32]);
        for (key, told) in [
            (&wrong_key, ChangeOutcome::UnknownGroup),
            (&joiners_key, ChangeOutcome::Conflict { current_epoch: 2 }),
        ] {
            let lost = loser
                .publish_commit(&CommitToSend {
                    group_id: &group_id,
                    epoch: 1,
                    commit: &second,
                    welcome: None,
                    initial_state: None,
                    group_info: Some(&second_info),
                    epoch_key: None,
                    state_key: key,
                    new_state_key: None,
                })
                .await
                .unwrap();
            assert_eq!(lost, told);
        }
        // The winner's retry (same message id) is accepted again, and only
        // the winning Commit was queued.
        let again = winner
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: 1,
                commit: &envelope(2, first.clone(), b"a"),
                welcome: None,
                initial_state: None,
                group_info: Some(&first_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(again, ChangeOutcome::Accepted);
        let queued = loser.fetch_since(&key(2), Seq::ZERO, 0).await.unwrap();
        let payloads: Vec<_> = queued.into_iter().map(|message| message.payload).collect();
        assert_eq!(payloads, vec![added.welcome, first]);
        let queued = winner.fetch_since(&key(1), Seq::ZERO, 0).await.unwrap();
        assert!(queued.is_empty(), "the losing Commit was not queued");
    });
}
