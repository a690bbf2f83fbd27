//! A member that is not our client: plain openmls (no `GroupMember`), with
//! its own KeyPackage, joins from the Welcome a CLI member sent through the
//! node and makes a PublicMessage Commit; the node checks it and CLI members
//! process it, as they would one from another implementation.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{TestNode, identity, local, state};
use openmls::prelude::tls_codec::{DeserializeBytes as _, Serialize as _};
use openmls::prelude::{
    KeyPackage, LeafNodeParameters, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, OpenMlsProvider as _,
    PURE_PLAINTEXT_WIRE_FORMAT_POLICY, ProcessedMessageContent, RatchetTreeIn, StagedWelcome,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{CIPHERSUITE, EpochKey, GroupId, Seq};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedWelcomeTree};
use quicnprotochat_proto::wire::{CommitToSend, Envelope};

#[test]
fn a_commit_made_by_plain_openmls_is_checked_by_the_node_and_processed_by_cli_members() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = state(dir.path(), "alice.state");
    let alice_key = node
        .cli_ok(&["register-state", "--state", &alice])
        .trim()
        .to_owned();
    let outsider = identity(42);
    let provider = OpenMlsRustCrypto::default();

    // Its KeyPackage, made and uploaded without our client library's help
    // beyond the connection.
    let bundle = KeyPackage::builder()
        .build(CIPHERSUITE, &provider, &outsider, outsider.credential_with_key())
        .unwrap();
    let key_package = bundle.key_package().tls_serialize_detached().unwrap();
    local(async {
        let connection = node.connect_as(&outsider).await;
        connection
            .upload_key_package(&outsider.public_key(), &key_package)
            .await
            .unwrap();
    });

    node.cli_ok(&["create-group", "--state", &alice, "--group-id", "mixed"]);
    let outsider_hex = outsider.public_key().to_string();
    node.cli_ok(&["invite", "--state", &alice, "--peer-key", &outsider_hex]);

    let message = local(async {
        let connection = node.connect_as(&outsider).await;
        let queued = connection
            .fetch_since(&outsider.public_key(), Seq::ZERO, 0)
            .await
            .unwrap();
        let welcome = queued
            .iter()
            .find_map(|message| {
                match MlsMessageIn::tls_deserialize_exact_bytes(&message.payload)
                    .unwrap()
                    .extract()
                {
                    MlsMessageBodyIn::Welcome(welcome) => Some(welcome),
                    _ => None,
                }
            })
            .expect("Alice's Welcome is queued");
        let config = MlsGroupJoinConfig::builder()
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        // The Welcome carries no ratchet tree: as any client would, ask the
        // node for the tree of the Welcome's group and epoch.
        let staged = StagedWelcome::build_from_welcome(&provider, &config, welcome).unwrap();
        let info = staged.processed_welcome().unverified_group_info();
        assert!(info.extensions().ratchet_tree().is_none());
        let group_id = GroupId::new(info.group_id().as_slice().to_vec()).unwrap();
        // The node keeps the tree sealed under the epoch's key, which the
        // Welcome alone yields: the MLS exporter under the documented label.
        let epoch_key = staged
            .processed_welcome()
            .export_secret(provider.crypto(), "quicnprotochat epoch key", &[], 32)
            .unwrap();
        // With the tree comes the group's state key, which the node keeps
        // the group's state under and asks of members with each change.
        let FetchedWelcomeTree::Tree {
            tree,
            state_key: Some(state_key),
        } = connection
            .fetch_welcome_tree(
                &group_id,
                info.epoch().as_u64(),
                &EpochKey::from_slice(&epoch_key).unwrap(),
            )
            .await
            .unwrap()
        else {
            panic!("the node keeps the tree and the state key for the member Alice added");
        };
        let tree = RatchetTreeIn::tls_deserialize_exact_bytes(&tree).unwrap();
        let mut group = staged
            .with_ratchet_tree(tree)
            .build()
            .unwrap()
            .into_group(&provider)
            .unwrap();
        let epoch = group.epoch().as_u64();
        let commit = group
            .self_update(&provider, &outsider, LeafNodeParameters::default())
            .unwrap()
            .commit()
            .tls_serialize_detached()
            .unwrap();
        // Every Commit brings the GroupInfo of the epoch it starts (with
        // external_pub, which openmls puts in): exported once merged.
        group.merge_pending_commit(&provider).unwrap();
        let group_info = group
            .export_group_info(provider.crypto(), &outsider, false)
            .unwrap()
            .tls_serialize_detached()
            .unwrap();
        let envelope = Envelope {
            recipients: vec![alice_key.parse().unwrap()],
            payload: commit,
            message_id: Some(b"outsider-update".to_vec()),
        };
        let outcome = connection
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch,
                commit: &envelope,
                welcome: None,
                initial_state: None,
                group_info: Some(&group_info),
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap();
        assert_eq!(outcome, ChangeOutcome::Accepted, "the node checked and took it");
        group
    });
    let mut group = message;

    // Alice's CLI processes the foreign Commit and moves on with it.
    node.cli_ok(&["recv", "--state", &alice]);
    let groups = node.cli_ok(&["groups", "--state", &alice]);
    assert!(groups.contains("mixed epoch 2 members 2"), "{groups}");
    node.cli_ok(&[
        "send",
        "--state",
        &alice,
        "--group-id",
        "mixed",
        "--msg",
        "hello outsider",
    ]);

    local(async {
        // A new connection: the last one's session ended with its task set.
        let connection = node.connect_as(&outsider).await;
        let queued = connection
            .fetch_since(&outsider.public_key(), Seq::ZERO, 0)
            .await
            .unwrap();
        let text = queued
            .iter()
            .filter_map(|message| {
                let parsed = MlsMessageIn::tls_deserialize_exact_bytes(&message.payload).ok()?;
                let protocol = parsed.try_into_protocol_message().ok()?;
                match group.process_message(&provider, protocol).ok()?.into_content() {
                    ProcessedMessageContent::ApplicationMessage(application) => {
                        Some(application.into_bytes())
                    }
                    _ => None,
                }
            })
            .next_back()
            .expect("Alice's message reaches the outsider");
        // Content type text (0x01), then the text (docs/protocol.md).
        assert_eq!(text, b"\x01hello outsider");
    });
}
