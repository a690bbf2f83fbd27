//! `demo-group`: Alice and Bob, each with an in-memory MLS state and their
//! own authenticated connection, run the whole lifecycle through the node
//! and check both messages decrypt.

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    Content, CoreError, GroupMember, IdentityKeypair, NoDeviceLists, Received, generate_key_package,
};
use quicnprotochat_proto::outcome::{ChangeOutcome, FetchedKeyPackage, FetchedWelcomeTree};
use quicnprotochat_proto::wire::{CommitToSend, Envelope};

use crate::cli::ConnectionArgs;
use crate::connections::{Nodes, accepted};
use crate::error::ClientError;
use crate::key_packages::upload;
use crate::output::counted;

struct Person {
    name: &'static str,
    identity: IdentityKeypair,
    provider: OpenMlsRustCrypto,
    nodes: Nodes,
}

impl Person {
    async fn connect(name: &'static str, args: &ConnectionArgs) -> Result<Person, ClientError> {
        let identity = IdentityKeypair::generate();
        let nodes = Nodes::connect(args, Some(&identity)).await?;
        say!("{name}: identity key {}", identity.public_key());
        Ok(Person {
            name,
            identity,
            provider: OpenMlsRustCrypto::default(),
            nodes,
        })
    }

    /// Fetches this person's queue and decrypts the one expected message.
    async fn receive_one(&self, group: &mut GroupMember) -> Result<String, ClientError> {
        let queued = self
            .nodes
            .delivery()
            .fetch_all(&self.identity.public_key())
            .await?;
        let [payload] = queued.as_slice() else {
            return Err(ClientError::Demo(format!(
                "{} expected one queued message, found {}",
                self.name,
                queued.len()
            )));
        };
        match group.receive(&self.provider, payload, &NoDeviceLists)? {
            Received::Application { plaintext, .. } => match Content::decode(&plaintext) {
                Content::Text(text) => Ok(text),
                other => Err(ClientError::Demo(format!(
                    "{} expected text, got {other:?}",
                    self.name
                ))),
            },
            other => Err(ClientError::Demo(format!(
                "{} expected an application message, got {other:?}",
                self.name
            ))),
        }
    }
}

/// Runs the demo; succeeds only if both directions decrypted correctly.
pub(crate) async fn demo_group(args: &ConnectionArgs) -> Result<(), ClientError> {
    let alice = Person::connect("Alice", args).await?;
    let bob = Person::connect("Bob", args).await?;
    let info = alice.nodes.auth().ping().await?;
    say!(
        "connected to {} (quicnprotochat-server {})",
        alice.nodes.auth().server(),
        info.version
    );

    let package = generate_key_package(&bob.provider, &bob.identity)?;
    upload(&bob.nodes, &bob.identity, &package).await?;
    say!("Bob: uploaded a KeyPackage to the node");

    let fetched = match alice
        .nodes
        .auth()
        .fetch_key_package(&bob.identity.public_key())
        .await?
    {
        FetchedKeyPackage::Package(package) => package,
        FetchedKeyPackage::None => {
            return Err(ClientError::NoKeyPackage(
                bob.identity.public_key(),
                Default::default(),
            ));
        }
        FetchedKeyPackage::RateLimited(limited) => return Err(limited.into()),
    };
    say!("Alice: fetched Bob's KeyPackage ({} bytes)", fetched.len());

    let name = format!(
        "demo-{}",
        hex::encode(&alice.identity.public_key().as_bytes()[..4])
    );
    // The name is for this output only; the id the node sees is random.
    let group_id = crate::naming::new_group_id();
    let mut alice_group = GroupMember::create(&alice.provider, &alice.identity, &group_id)?;
    say!("Alice: created group {name} (epoch {})", alice_group.epoch());

    // The node checks every group change against the group's public state,
    // which Alice hands over with her first change.
    let initial_state = alice_group.export_public_state(&alice.provider, &alice.identity)?;
    // It keeps that state sealed under the group's state key, which only
    // members hold (the demo's group is created in this epoch).
    let state_key = alice_group.current_state_key(&alice.provider)?;
    let added = alice_group.add_members(&alice.provider, &alice.identity, &[fetched], &NoDeviceLists)?;
    let group = alice_group.group_id();
    let welcome = Envelope {
        recipients: vec![bob.identity.public_key()],
        payload: added.welcome.clone(),
        message_id: None,
    };
    let commit = Envelope {
        recipients: Vec::new(),
        payload: added.commit,
        message_id: None,
    };
    let outcome = alice
        .nodes
        .delivery()
        .publish_commit(&CommitToSend {
            group_id: &group,
            epoch: alice_group.epoch(),
            commit: &commit,
            welcome: Some(&welcome),
            initial_state: Some(&initial_state),
            group_info: alice_group.pending_group_info(),
            epoch_key: Some(&alice_group.pending_epoch_key(&alice.provider)?),
            state_key: &state_key,
            new_state_key: None,
        })
        .await?;
    if outcome != ChangeOutcome::Accepted {
        return Err(ClientError::Demo(format!(
            "the node refused Alice's add: {outcome:?}"
        )));
    }
    alice_group.merge_pending_commit(&alice.provider)?;
    say!(
        "Alice: added Bob (the node checked the Commit) and queued his Welcome ({} bytes); epoch {}",
        added.welcome.len(),
        alice_group.epoch()
    );

    let queued = bob.nodes.delivery().fetch_all(&bob.identity.public_key()).await?;
    let welcome = queued
        .first()
        .ok_or_else(|| ClientError::Demo("Bob's queue holds no Welcome".into()))?;
    // The Welcome does not carry the group's ratchet tree: the node keeps
    // it sealed under the new epoch's key, which Bob computes from the
    // Welcome.
    let mut bob_group = match GroupMember::join(&bob.provider, welcome, None, &NoDeviceLists) {
        Err(CoreError::RatchetTreeNeeded { epoch, epoch_key, .. }) => {
            let FetchedWelcomeTree::Tree { tree, .. } = bob
                .nodes
                .delivery()
                .fetch_welcome_tree(&group, epoch, &epoch_key)
                .await?
            else {
                return Err(ClientError::Demo(
                    "the node keeps no tree for Bob's Welcome".into(),
                ));
            };
            say!(
                "Bob: fetched the group's ratchet tree from the node ({} bytes)",
                tree.len()
            );
            GroupMember::join(&bob.provider, welcome, Some(&tree), &NoDeviceLists)?
        }
        joined => joined?,
    };
    say!(
        "Bob: joined {name} from the Welcome (epoch {}, {})",
        bob_group.epoch(),
        counted(bob_group.user_count(), "member", "members")
    );

    let to_bob = "Hello Bob, this is Alice.";
    let ciphertext = alice_group.send(
        &alice.provider,
        &alice.identity,
        &Content::Text(to_bob.into()).encode(),
    )?;
    accepted(
        alice
            .nodes
            .delivery()
            .enqueue(&bob.identity.public_key(), &ciphertext)
            .await?,
    )?;
    say!("Alice: sent {} encrypted bytes", ciphertext.len());
    let received = bob.receive_one(&mut bob_group).await?;
    say!("Bob decrypted: {received}");

    let to_alice = "Hi Alice, Bob here. Got it.";
    let ciphertext = bob_group.send(
        &bob.provider,
        &bob.identity,
        &Content::Text(to_alice.into()).encode(),
    )?;
    accepted(
        bob.nodes
            .delivery()
            .enqueue(&alice.identity.public_key(), &ciphertext)
            .await?,
    )?;
    say!("Bob: sent {} encrypted bytes", ciphertext.len());
    let replied = alice.receive_one(&mut alice_group).await?;
    say!("Alice decrypted: {replied}");

    alice.nodes.close().await;
    bob.nodes.close().await;
    if received != to_bob || replied != to_alice {
        return Err(ClientError::Demo(
            "a decrypted message differs from what was sent".into(),
        ));
    }
    say!("demo-group: both messages decrypted end to end");
    Ok(())
}
