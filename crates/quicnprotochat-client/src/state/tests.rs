use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{CoreError, GroupMember, IdentityKeypair, QueuedMessage, Received, Seq};

use super::*;

/// `bytes` as a group id.
fn gid(bytes: &[u8]) -> quicnprotochat_core::GroupId {
    quicnprotochat_core::GroupId::new(bytes.to_vec()).unwrap()
}

#[test]
fn identity_survives_reopening_and_the_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice.state");
    let key = {
        let state = StateFile::open_or_create(&path).unwrap();
        state.identity_or_generate().unwrap()
    };
    let state = StateFile::open(&path).unwrap();
    // A new user's first device is the user key itself.
    assert_eq!(key.user(), key.public_key());
    assert_eq!(state.identity_key().unwrap(), key.user());
    assert_eq!(state.identity().unwrap().public_key(), key.public_key());
    assert_eq!(
        state.identity_or_generate().unwrap().public_key(),
        key.public_key()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn a_missing_file_is_reported_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let err = StateFile::open(&dir.path().join("nope.state")).unwrap_err();
    assert!(matches!(err, StateError::Missing(_)));
    assert!(err.to_string().contains("register-state"), "{err}");
}

#[test]
fn a_corrupt_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.state");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = StateFile::open(&path).unwrap_err();
    assert!(matches!(err, StateError::NotAStateFile { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
    assert!(StateFile::open_or_create(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[test]
fn a_foreign_sqlite_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = StateFile::open(&path).unwrap_err();
    assert!(matches!(err, StateError::NotAStateFile { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// Bob's user lists his device (what the node would serve).
struct BobsList;

impl quicnprotochat_core::DeviceDirectory for BobsList {
    fn listed(
        &self,
        _user: &quicnprotochat_core::IdentityKey,
        _device: &quicnprotochat_core::IdentityKey,
    ) -> quicnprotochat_core::Listed {
        quicnprotochat_core::Listed::Yes
    }
}

#[test]
fn a_key_package_made_before_a_restart_can_be_joined_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bob.state");
    let package = {
        let state = StateFile::open_or_create(&path).unwrap();
        let bob = state.identity_or_generate().unwrap();
        let mut packages = state
            .generate_key_packages(&bob, Default::default(), 1, false)
            .unwrap();
        packages.pop().unwrap()
    };

    let alice = IdentityKeypair::generate();
    let alice_provider = OpenMlsRustCrypto::default();
    let mut alice_group = GroupMember::create(&alice_provider, &alice, &gid(b"g")).unwrap();
    let added = alice_group
        .add_members(&alice_provider, &alice, &[package], &BobsList)
        .unwrap();
    alice_group.merge_pending_commit(&alice_provider).unwrap();
    let ciphertext = alice_group
        .send(&alice_provider, &alice, b"after restart")
        .unwrap();

    // A new StateFile, as a new process would open it.
    let state = StateFile::open(&path).unwrap();
    let tree = alice_group.ratchet_tree().unwrap();
    let mut bob_group = GroupMember::join(&state.provider(), &added.welcome, Some(&tree), &BobsList).unwrap();
    let received = bob_group
        .receive(&state.provider(), &ciphertext, &BobsList)
        .unwrap();
    assert_eq!(
        received,
        Received::Application {
            sender: quicnprotochat_core::MemberKey {
                user: alice.public_key(),
                device: alice.public_key(),
            },
            plaintext: b"after restart".to_vec()
        }
    );
    drop(bob_group);
    drop(state);
    let state = StateFile::open(&path).unwrap();
    assert!(
        GroupMember::load(&state.provider(), &gid(b"g"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_rolled_back_transaction_leaves_no_mls_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&dir.path().join("s.state")).unwrap();
    let identity = state.identity_or_generate().unwrap();
    {
        let _transaction = state.transaction().unwrap();
        GroupMember::create(&state.provider(), &identity, &gid(b"rolled-back")).unwrap();
    }
    assert!(
        GroupMember::load(&state.provider(), &gid(b"rolled-back"))
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_failed_inbox_entry_rolls_back_what_it_wrote_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&dir.path().join("s.state")).unwrap();
    let identity = state.identity_or_generate().unwrap();
    state.push_inbox(&[b"entry".to_vec()]).unwrap();
    let entry = state.inbox().unwrap()[0].id;
    let failed: Result<(), StateError> = state.consume_inbox_entry(entry, || {
        GroupMember::create(&state.provider(), &identity, &gid(b"half-done"))?;
        Err(StateError::Mls(CoreError::MalformedMessage("refused".into())))
    });
    assert!(failed.is_err());
    assert!(
        GroupMember::load(&state.provider(), &gid(b"half-done"))
            .unwrap()
            .is_none()
    );
    assert_eq!(state.inbox().unwrap().len(), 1, "the entry stays");

    state
        .consume_inbox_entry(entry, || state.record_group(&gid(b"applied"), false))
        .unwrap();
    assert!(state.inbox().unwrap().is_empty(), "applied and removed");
    assert_eq!(state.groups().unwrap().len(), 1);
}

#[test]
fn a_settled_publication_merges_or_discards_its_commit_and_is_forgotten() {
    use quicnprotochat_core::GroupId;
    use quicnprotochat_proto::wire::Envelope;

    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&dir.path().join("s.state")).unwrap();
    let identity = state.identity_or_generate().unwrap();
    let id = GroupId::new(b"settle".to_vec()).unwrap();
    let mut group = state.create_group(&identity, &id, Default::default()).unwrap();
    for (settlement, epoch) in [(Settlement::Discard, 0), (Settlement::Merge, 1)] {
        let publication = state
            .stage_publication(|| -> Result<Publication, StateError> {
                let commit = group.self_update(&state.provider(), &identity)?;
                Ok(Publication {
                    group_id: id.clone(),
                    epoch: group.epoch(),
                    commit: Envelope {
                        recipients: Vec::new(),
                        payload: commit,
                        message_id: Some(b"id".to_vec()),
                    },
                    welcome: None,
                    group_info: group.pending_group_info().map(<[u8]>::to_vec),
                    rejoin: false,
                })
            })
            .unwrap();
        assert!(publication.group_info.is_some());
        assert_eq!(state.publications().unwrap(), vec![publication]);
        assert!(group.has_pending_commit());
        state.settle_publication(&id, &mut group, settlement).unwrap();
        assert!(!group.has_pending_commit());
        assert_eq!(group.epoch(), epoch, "{settlement:?}");
        assert!(state.publications().unwrap().is_empty());
    }
}

#[test]
fn inbox_keeps_order_until_entries_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&dir.path().join("s.state")).unwrap();
    state.push_inbox(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
    let inbox = state.inbox().unwrap();
    assert_eq!(
        inbox.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(),
        [b"one".as_slice(), b"two".as_slice()]
    );
    assert!(inbox.iter().all(|e| e.seq.is_none()), "from no queue");
    state.remove_inbox(inbox[0].id).unwrap();
    assert_eq!(state.inbox().unwrap().len(), 1);

    // Fetched messages keep the node's sequence numbers, and the batch's
    // last one is remembered as stored.
    let queued = [7, 9].map(|seq| QueuedMessage {
        seq: Seq::new(seq),
        payload: format!("m{seq}").into_bytes(),
    });
    state.push_queued(b"node", &queued, Seq::new(10)).unwrap();
    let seqs: Vec<_> = state.inbox().unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [None, Some(Seq::new(7)), Some(Seq::new(9))]);
    assert_eq!(state.stored_seq(b"node").unwrap(), Seq::new(10));
}

#[test]
fn the_last_created_or_joined_group_is_current() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&dir.path().join("s.state")).unwrap();
    assert_eq!(state.current_group().unwrap(), None);
    state.record_group(&gid(b"first"), true).unwrap();
    state.record_group(&gid(b"second"), true).unwrap();
    assert_eq!(state.current_group().unwrap(), Some(gid(b"second")));
    state.record_group(&gid(b"third"), false).unwrap();
    assert_eq!(state.current_group().unwrap(), Some(gid(b"second")));
    assert_eq!(state.groups().unwrap().len(), 3);
}

#[test]
fn a_device_linked_before_v9_drops_its_copy_of_the_user_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("laptop.state");
    let user = IdentityKeypair::generate();
    let device = IdentityKeypair::generate();
    {
        // A state file as version 8 left a linked device: the user key's
        // secret beside the device's.
        let mut connection = rusqlite::Connection::open(&path).unwrap();
        quicnprotochat_sqlite::migrate(&mut connection, schema::APPLICATION_ID, &schema::MIGRATIONS[..8])
            .unwrap();
        connection
            .execute(
                "INSERT INTO identity (id, secret_key, public_key, created_at) VALUES (1, ?1, ?2, 0)",
                rusqlite::params![device.secret_bytes().as_slice(), device.public_key().as_bytes()],
            )
            .unwrap();
        connection
            .execute(
                "INSERT INTO user_key (id, secret_key, public_key) VALUES (1, ?1, ?2)",
                rusqlite::params![user.secret_bytes().as_slice(), user.public_key().as_bytes()],
            )
            .unwrap();
        // Our tables alone, so nothing else reuses the freed page.
        quicnprotochat_sqlite::migrate(&mut connection, schema::APPLICATION_ID, schema::MIGRATIONS).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    let secret = user.secret_bytes();
    assert!(
        !bytes
            .windows(secret.len())
            .any(|window| window == secret.as_slice()),
        "the secret's bytes are overwritten, not just unlinked"
    );
    let state = StateFile::open(&path).unwrap();
    let identity = state.identity().unwrap();
    assert_eq!(identity.public_key(), device.public_key());
    assert_eq!(identity.user(), user.public_key(), "still the user's device");
    assert_eq!(state.identity_key().unwrap(), user.public_key());
    assert!(state.user().unwrap().is_none(), "no user key to sign lists with");
}
