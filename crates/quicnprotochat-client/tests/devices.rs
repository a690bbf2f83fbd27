//! One person, several devices, through the real CLI and a real node: every
//! step is a separate client process with its own state file, as a user
//! would run it.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod common;

use common::{Member, TestNode, state};
use openmls::prelude::tls_codec::{DeserializeBytes as _, Serialize as _};
use openmls::prelude::{
    KeyPackage, KeyPackageIn, MlsGroup, MlsGroupCreateConfig, PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
    ProtocolVersion,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use quicnprotochat_client::state::StateFile;
use quicnprotochat_core::{CIPHERSUITE, GroupId, GroupMember, IdentityKey, IdentityKeypair, Seq};
use quicnprotochat_proto::outcome::{
    ChangeOutcome, DeviceListOutcome, FetchedKeyPackage, FetchedWelcomeTree,
};
use quicnprotochat_proto::wire::{CommitToSend, Envelope};

/// `link` on a new state file: the one line it prints.
fn link(node: &TestNode, state: &str, extra: &[&str]) -> String {
    let mut args = vec!["link", "--state", state];
    args.extend_from_slice(extra);
    let out = node.cli_ok(&args);
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    out.trim().to_owned()
}

/// A second device of `of`, linked with `devices add` and completed with
/// `recv` on the new device; returns it as a member (its key is the user's).
/// Links a new device `name` to `of`; returns it, the code used, and what
/// its first `recv` (which completes the link) said on stderr.
fn linked_device(
    node: &TestNode,
    dir: &std::path::Path,
    of: &Member,
    name: &str,
) -> (Member, String, String) {
    let path = state(dir, &format!("{name}.state"));
    let code = link(node, &path, &[]);
    devices_ok(node, of, &["add", &code]);
    let device = Member {
        name: name.to_owned(),
        state: path,
        key: of.key.clone(),
    };
    let (ok, _, err) = device.try_run(node, "recv", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("linked: this device"), "{err}");
    (device, code, err)
}

/// `devices SUBCOMMAND --state F ARGS...`, as the user types it.
fn devices_try(node: &TestNode, member: &Member, args: &[&str]) -> (bool, String, String) {
    let mut full = vec!["devices", args[0], "--state", &member.state];
    full.extend_from_slice(&args[1..]);
    let out = node.cli(&full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        common::stderr(&out),
    )
}

fn devices_ok(node: &TestNode, member: &Member, args: &[&str]) -> String {
    let (ok, out, err) = devices_try(node, member, args);
    assert!(ok, "devices {args:?} failed: {err}\n{out}");
    out
}

fn device_key(node: &TestNode, member: &Member) -> String {
    member.run(node, "whoami", &["--device"]).trim().to_owned()
}

#[test]
fn a_user_with_two_devices_reads_and_writes_from_both_and_can_cut_one_off() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let phone = Member::register(&node, dir.path(), "alice-phone");
    let bob = Member::register(&node, dir.path(), "bob");
    // Alice joins a group with her only device first.
    bob.run(&node, "create-group", &["--group-id", "early"]);
    bob.run(
        &node,
        "invite",
        &["--group-id", "early", "--peer-key", &phone.key],
    );
    phone.run(&node, "join", &[]);

    // Her laptop becomes a second device; its first `recv` completes the
    // link and joins the group she was already in.
    let (laptop, code, notes) = linked_device(&node, dir.path(), &phone, "alice-laptop");
    assert_eq!(laptop.run(&node, "whoami", &[]).trim(), phone.key);
    // The phone made the laptop's first leaf keys: the laptop replaced
    // them at once (epoch 2 added it, its update made epoch 3).
    assert!(
        notes.contains("replaced the keys your other device made for this one in early: epoch 3"),
        "{notes}"
    );
    let groups = laptop.run(&node, "groups", &[]);
    assert!(groups.contains("early epoch 3 members 2"), "{groups}");
    let laptop_device = device_key(&node, &laptop);
    let phone_device = device_key(&node, &phone);
    assert_ne!(laptop_device, phone_device);
    assert_eq!(laptop_device.len(), 64);
    assert_eq!(phone_device, phone.key, "a user's first device is the user key");
    // The code was used: a second `devices add` is refused.
    let (ok, _, err) = devices_try(&node, &phone, &["add", &code]);
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");

    for (member, this) in [(&phone, &phone_device), (&laptop, &laptop_device)] {
        let listed = devices_ok(&node, member, &["list"]);
        let mut lines: Vec<&str> = listed.lines().collect();
        lines.sort();
        let mut expected = vec![phone_device.clone(), laptop_device.clone()];
        expected.sort();
        let expected: Vec<String> = expected
            .into_iter()
            .map(|key| {
                if key == **this {
                    format!("{key} (this device)")
                } else {
                    key
                }
            })
            .collect();
        assert_eq!(lines, expected);
    }

    // What Bob sends to the old group after the link reaches both devices.
    bob.run(&node, "recv", &[]);
    bob.run(&node, "send", &["--group-id", "early", "--msg", "after the link"]);
    for device in [&phone, &laptop] {
        let got = device.run(&node, "recv", &[]);
        assert!(
            got.contains(&format!("early {}: after the link", bob.short())),
            "{got}"
        );
    }

    // Inviting Alice by her user key adds both devices in one Commit.
    bob.run(&node, "create-group", &["--group-id", "g2"]);
    let (ok, _, err) = bob.try_run(&node, "invite", &["--group-id", "g2", "--peer-key", &phone.key]);
    assert!(ok, "{err}");
    assert!(err.contains("invited 1 person (2 devices)"), "{err}");
    let members = bob.run(&node, "members", &["--group-id", "g2"]);
    assert!(members.contains(&format!("{} 2 devices", phone.key)), "{members}");
    assert!(
        members.contains(&format!("{} (you) 1 device", bob.key)),
        "{members}"
    );
    // Bob is no contact of Alice's: each device joins on `join`.
    phone.run(&node, "join", &[]);
    laptop.run(&node, "join", &[]);

    // A message from either device is Alice's for Bob, and shows on her
    // other device as her own.
    laptop.run(&node, "send", &["--group-id", "g2", "--msg", "from the laptop"]);
    phone.run(&node, "send", &["--group-id", "g2", "--msg", "from the phone"]);
    let got = bob.run(&node, "recv", &[]);
    assert!(
        got.contains(&format!("g2 {}: from the laptop", phone.short())),
        "{got}"
    );
    assert!(
        got.contains(&format!("g2 {}: from the phone", phone.short())),
        "{got}"
    );
    let got = laptop.run(&node, "recv", &[]);
    assert!(got.contains("g2 me: from the phone"), "{got}");
    // (The phone printed the laptop's message while catching up to send.)
    let history = phone.run(&node, "history", &["--group-id", "g2"]);
    assert!(
        history.contains("you (another device): from the laptop"),
        "{history}"
    );
    assert!(history.contains("you: from the phone"), "{history}");

    // The phone cuts the laptop off: a new list without it, and its leaves
    // removed from both groups. What is sent afterwards, it cannot read.
    devices_ok(&node, &phone, &["remove", &laptop_device]);
    let listed = devices_ok(&node, &phone, &["list"]);
    assert_eq!(listed.trim(), format!("{phone_device} (this device)"));
    bob.run(&node, "recv", &[]);
    let members = bob.run(&node, "members", &["--group-id", "g2"]);
    assert!(members.contains(&format!("{} 1 device", phone.key)), "{members}");
    bob.run(&node, "send", &["--group-id", "g2", "--msg", "after the removal"]);
    let (_, got, err) = laptop.try_run(&node, "recv", &[]);
    assert!(!got.contains("after the removal"), "{got}");
    assert!(err.contains("you were removed"), "{err}");
    let got = phone.run(&node, "recv", &[]);
    assert!(
        got.contains(&format!("g2 {}: after the removal", bob.short())),
        "{got}"
    );
    // It holds no key its user still uses: the user key's secret was never
    // in its state file (so it cannot log in as the phone, whose key that
    // is, nor sign a list), and it may not link or remove devices.
    let user = StateFile::open(&common::access(&phone.state))
        .unwrap()
        .user()
        .unwrap()
        .expect("the first device holds the user key");
    let secret = user.secret_bytes();
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let file = file.unwrap().path();
        if file.to_string_lossy().contains("alice-laptop") {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes
                    .windows(secret.len())
                    .any(|window| window == secret.as_slice()),
                "{} holds the user key",
                file.display()
            );
        }
    }
    let laptop_state = StateFile::open(&common::access(&laptop.state)).unwrap();
    assert!(laptop_state.user().unwrap().is_none());
    let spare = link(&node, &state(dir.path(), "spare.state"), &[]);
    for args in [vec!["add", spare.as_str()], vec!["remove", phone_device.as_str()]] {
        let (ok, _, err) = devices_try(&node, &laptop, &args);
        assert!(!ok);
        assert!(err.contains("only your first device"), "{err}");
    }
    // Nor by any other way it can try with what it has: the last list it
    // saw (which names it), and a newer one naming it and a device of its
    // own under the user's last signature (it cannot make one), each
    // uploaded as itself.
    let laptop_identity = laptop_state.identity().unwrap();
    let outcomes = common::local(async {
        let anyone = node.connect().await;
        let current = anyone.fetch_device_lists(&[user.public_key()]).await.unwrap();
        let current = current[0].list().clone();
        let seen = laptop_state.device_list(&user.public_key()).unwrap().unwrap();
        assert!(seen.list().contains(&laptop_identity.public_key()));
        let mine = IdentityKeypair::generate().public_key();
        let devices = [user.public_key(), laptop_identity.public_key(), mine];
        let forged = quicnprotochat_core::SignedDeviceList::from_parts(
            quicnprotochat_core::DeviceList::new(user.public_key(), current.version() + 1, devices).unwrap(),
            *seen.signature(),
        );
        let client = node.connect_as(&laptop_identity).await;
        let mut outcomes = Vec::new();
        for list in [&seen, &forged] {
            outcomes.push(client.upload_device_list(list).await.unwrap());
        }
        outcomes
    });
    assert_eq!(
        outcomes,
        [DeviceListOutcome::NotADevice, DeviceListOutcome::BadSignature]
    );
    let listed = devices_ok(&node, &phone, &["list"]);
    assert_eq!(listed.trim(), format!("{phone_device} (this device)"));
}

#[test]
fn wrong_and_expired_link_codes_are_refused_clearly() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let phone = Member::register(&node, dir.path(), "phone");

    let code = link(&node, &state(dir.path(), "tablet.state"), &[]);
    let mut typo = code.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
    let typo = String::from_utf8(typo).unwrap();
    let (ok, _, err) = devices_try(&node, &phone, &["add", &typo]);
    assert!(!ok);
    assert!(err.contains("not a valid link code"), "{err}");

    let expiring = state(dir.path(), "old.state");
    let code = link(&node, &expiring, &["--valid-for", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let (ok, _, err) = devices_try(&node, &phone, &["add", &code]);
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");
    // Nothing was linked: the waiting device says what to do.
    let out = node.cli(&["recv", "--state", &expiring]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("not linked yet"),
        "{}",
        common::stderr(&out)
    );
    let listed = devices_ok(&node, &phone, &["list"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

/// A directory that believes every device belongs to its user: what a
/// careless or malicious member would use.
struct Credulous;

impl quicnprotochat_core::DeviceDirectory for Credulous {
    fn listed(&self, _user: &IdentityKey, _device: &IdentityKey) -> quicnprotochat_core::Listed {
        quicnprotochat_core::Listed::Yes
    }
}

/// A KeyPackage of a device that claims to be `user`'s without being in
/// its list.
fn rogue_key_package(user: &IdentityKey) -> (OpenMlsRustCrypto, KeyPackage) {
    let rogue = IdentityKeypair::generate().of_user(*user);
    let provider = OpenMlsRustCrypto::default();
    let bundle = KeyPackage::builder()
        .build(CIPHERSUITE, &provider, &rogue, rogue.credential_with_key())
        .unwrap();
    let package = bundle.key_package().clone();
    (provider, package)
}

#[test]
fn a_leaf_for_a_device_its_user_did_not_list_is_refused_by_the_node_and_by_members() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = Member::register(&node, dir.path(), "alice");
    let alice_user: IdentityKey = alice.key.parse().unwrap();
    let mallory = common::identity(42);
    let mallory_provider = OpenMlsRustCrypto::default();
    let package = quicnprotochat_core::generate_key_package(&mallory_provider, &mallory).unwrap();
    common::local(async {
        let connection = node.connect_as(&mallory).await;
        connection
            .upload_key_package(&mallory.public_key(), &package)
            .await
            .unwrap();
    });
    alice.run(&node, "create-group", &["--group-id", "g"]);
    alice.run(
        &node,
        "invite",
        &["--group-id", "g", "--peer-key", &mallory.public_key().to_string()],
    );

    // Mallory, a member, commits an Add of a device claiming to be one of
    // Alice's. The node checks Alice's list and refuses it, so it cannot
    // take the group's epoch.
    let (_rogue_provider, rogue) = rogue_key_package(&alice_user);
    let rogue_bytes = rogue.tls_serialize_detached().unwrap();
    let outcome = common::local(async {
        let connection = node.connect_as(&mallory).await;
        let queued = connection
            .fetch_since(&mallory.public_key(), Seq::ZERO, 0)
            .await
            .unwrap();
        // The Welcome, before the group's name sent after it.
        let welcome = &queued
            .iter()
            .rev()
            .find(|message| {
                matches!(
                    quicnprotochat_core::classify(&message.payload),
                    Ok(quicnprotochat_core::Incoming::Welcome)
                )
            })
            .unwrap()
            .payload;
        let (group_id, epoch, epoch_key) =
            match GroupMember::join(&mallory_provider, welcome, None, &Credulous) {
                Err(quicnprotochat_core::CoreError::RatchetTreeNeeded {
                    group_id,
                    epoch,
                    epoch_key,
                }) => (group_id, epoch, epoch_key),
                other => panic!("a Welcome without its tree: {other:?}"),
            };
        let group_id = GroupId::new(group_id).unwrap();
        // The group's state key comes with the tree: Mallory is a member.
        let FetchedWelcomeTree::Tree {
            tree,
            state_key: Some(state_key),
        } = connection
            .fetch_welcome_tree(&group_id, epoch, &epoch_key)
            .await
            .unwrap()
        else {
            panic!("the node keeps the tree and the state key");
        };
        let mut group = GroupMember::join(&mallory_provider, welcome, Some(&tree), &Credulous).unwrap();
        let added = group
            .add_members(&mallory_provider, &mallory, &[rogue_bytes], &Credulous)
            .unwrap();
        let envelope = Envelope {
            recipients: vec![alice_user],
            payload: added.commit,
            message_id: Some(b"rogue-add".to_vec()),
        };
        connection
            .publish_commit(&CommitToSend {
                group_id: &group_id,
                epoch: group.epoch(),
                commit: &envelope,
                welcome: None,
                initial_state: None,
                group_info: None,
                epoch_key: None,
                state_key: &state_key,
                new_state_key: None,
            })
            .await
            .unwrap()
    });
    match outcome {
        ChangeOutcome::Invalid { reason } => assert!(reason.contains("does not name it"), "{reason}"),
        other => panic!("the node must refuse the Add: {other:?}"),
    }

    // A Welcome of a Commit the node never saw (here the Welcome of
    // another group's change, the one way the node still queues a Welcome)
    // may carry its own tree: one naming a device Alice never listed is
    // refused by Alice herself.
    let welcome = common::local(async {
        let connection = node.connect_as(&mallory).await;
        let FetchedKeyPackage::Package(real) = connection.fetch_key_package(&alice_user).await.unwrap()
        else {
            panic!("Alice has KeyPackages on the node");
        };
        let real = KeyPackageIn::tls_deserialize_exact_bytes(&real)
            .unwrap()
            .validate(mallory_provider.crypto(), ProtocolVersion::Mls10)
            .unwrap();
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        let provider = OpenMlsRustCrypto::default();
        let mut group = MlsGroup::new(&provider, &mallory, &config, mallory.credential_with_key()).unwrap();
        let (_, welcome, _) = group.add_members(&provider, &mallory, &[real, rogue]).unwrap();
        let welcome = welcome.tls_serialize_detached().unwrap();
        common::smuggle_welcome(&connection, &mallory, alice_user, welcome.clone()).await;
        welcome
    });
    assert!(!welcome.is_empty());
    let (_, _, err) = alice.try_run(&node, "recv", &[]);
    assert!(err.contains("is not a device of user"), "{err}");
    let groups = alice.run(&node, "groups", &[]);
    assert_eq!(groups.lines().count(), 1, "only her own group: {groups}");
    assert!(groups.contains("g epoch 1 members 2"), "{groups}");
}

#[test]
fn a_device_list_the_node_rolls_back_forges_or_withholds_is_refused_by_the_client() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let phone = Member::register(&node, dir.path(), "phone");
    let (laptop, _, _) = linked_device(&node, dir.path(), &phone, "laptop");
    let laptop_device = device_key(&node, &laptop);
    let db = rusqlite::Connection::open(node.dir.join("node.db")).unwrap();
    let user = hex::decode(&phone.key).unwrap();
    let row = |db: &rusqlite::Connection| -> (i64, Vec<u8>, Vec<u8>) {
        db.query_row(
            "SELECT version, devices, signature FROM device_lists WHERE user_key = ?1",
            [&user],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap()
    };
    let first = row(&db);
    assert_eq!(first.0, 1);
    devices_ok(&node, &phone, &["remove", &laptop_device]);
    let second = row(&db);
    assert_eq!(second.0, 2);

    let serve = |version: i64, devices: &[u8], signature: &[u8]| {
        db.execute(
            "UPDATE device_lists SET version = ?2, devices = ?3, signature = ?4 WHERE user_key = ?1",
            rusqlite::params![&user, version, devices, signature],
        )
        .unwrap();
    };
    // The old list, validly signed, put back: the laptop would be Alice's
    // again. The phone saw version 2 and refuses it.
    serve(first.0, &first.1, &first.2);
    let (ok, _, err) = devices_try(&node, &phone, &["list"]);
    assert!(!ok);
    assert!(
        err.contains("the node serves version 1, but version 2 was seen before"),
        "{err}"
    );
    // A list the user never signed.
    let mut forged = second.2.clone();
    forged[0] ^= 1;
    serve(3, &first.1, &forged);
    let (ok, _, err) = devices_try(&node, &phone, &["list"]);
    assert!(!ok);
    assert!(err.contains("not signed by that user key"), "{err}");
    // A node whose answer fails verification has its own exit code (5) and
    // error kind, for scripts to alert on.
    let out = node.cli(&["--json", "devices", "list", "--state", &phone.state]);
    assert_eq!(out.status.code(), Some(5), "{}", common::stderr(&out));
    let error: serde_json::Value =
        serde_json::from_str(common::stderr(&out).lines().last().unwrap()).unwrap();
    assert_eq!(error["kind"], "bad_device_list", "{error}");
    // No list at all, after one was seen.
    db.execute("DELETE FROM device_lists WHERE user_key = ?1", [&user])
        .unwrap();
    let (ok, _, err) = devices_try(&node, &phone, &["list"]);
    assert!(!ok);
    assert!(err.contains("withholds"), "{err}");
    // The true list back: all is well.
    db.execute(
        "INSERT INTO device_lists (user_key, version, devices, signature, updated_at) VALUES (?1, ?2, ?3, ?4, 0)",
        rusqlite::params![&user, second.0, &second.1, &second.2],
    )
    .unwrap();
    assert_eq!(
        devices_ok(&node, &phone, &["list"]).trim(),
        format!("{} (this device)", phone.key)
    );
}
