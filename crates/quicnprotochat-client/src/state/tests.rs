use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{CoreError, GroupMember, IdentityKeypair, QueuedMessage, Received, Seq};

use super::*;

/// The passphrase of the state files these tests make.
const PASSPHRASE: &str = "correct horse battery staple";

/// The state file at `path` under the tests' passphrase.
fn sealed(path: &std::path::Path) -> StateAccess {
    StateAccess::with_passphrase(path, PASSPHRASE)
}

/// `bytes` as a group id.
fn gid(bytes: &[u8]) -> quicnprotochat_core::GroupId {
    quicnprotochat_core::GroupId::new(bytes.to_vec()).unwrap()
}

#[test]
fn identity_survives_reopening_and_the_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice.state");
    let key = {
        let state = StateFile::open_or_create(&sealed(&path)).unwrap();
        state.identity_or_generate().unwrap()
    };
    let state = StateFile::open(&sealed(&path)).unwrap();
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
    let err = StateFile::open(&sealed(&dir.path().join("nope.state"))).unwrap_err();
    assert!(matches!(err, StateError::Missing(_)));
    assert!(err.to_string().contains("register-state"), "{err}");
}

#[test]
fn a_corrupt_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.state");
    // Not a whole number of pages: no database of any kind.
    let garbage: Vec<u8> = (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = StateFile::open(&sealed(&path)).unwrap_err();
    assert!(matches!(err, StateError::NotAStateFile { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
    assert!(StateFile::open_or_create(&sealed(&path)).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), garbage);

    // A whole page of noise looks like an encrypted file whose first page
    // the key does not decrypt: refused as the wrong passphrase, untouched.
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &page).unwrap();
    let err = StateFile::open(&sealed(&path)).unwrap_err();
    assert!(matches!(err, StateError::WrongPassphrase(_)), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert!(StateFile::open_or_create(&sealed(&path)).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), page);
}

#[test]
fn the_file_is_ciphertext_and_only_its_passphrase_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bob.state");
    {
        let state = StateFile::open_or_create(&sealed(&path)).unwrap();
        let bob = state.identity_or_generate().unwrap();
        state
            .add_contact("secret-union-meeting", &bob.public_key())
            .unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.starts_with(b"SQLite format 3"), "not a plain SQLite file");
    assert!(
        !bytes.windows(20).any(|w| w == b"secret-union-meeting"),
        "no text in clear"
    );

    let wrong = StateFile::open(&StateAccess::with_passphrase(&path, "wrong")).unwrap_err();
    assert!(matches!(wrong, StateError::WrongPassphrase(_)), "{wrong}");
    let none = StateFile::open(&StateAccess::with_passphrase(&path, "")).unwrap_err();
    assert!(matches!(none, StateError::NoPassphrase(_)), "{none}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "left untouched");

    let state = StateFile::open(&sealed(&path)).unwrap();
    assert_eq!(state.contacts().unwrap()[0].0, "secret-union-meeting");
}

#[test]
fn no_passphrase_makes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.state");
    let err = StateFile::open_or_create(&StateAccess::with_passphrase(&path, "")).unwrap_err();
    assert!(matches!(err, StateError::NoPassphrase(_)), "{err}");
    assert!(!path.exists());
}

/// Counts `opened_plain` calls.
struct Counting(std::rc::Rc<std::cell::Cell<usize>>);

impl Unlock for Counting {
    fn passphrase(
        &self,
        _path: &std::path::Path,
        _new: bool,
    ) -> Result<zeroize::Zeroizing<String>, StateError> {
        Ok(zeroize::Zeroizing::new(PASSPHRASE.to_owned()))
    }

    fn opened_plain(&self, _path: &std::path::Path) {
        self.0.set(self.0.get() + 1);
    }
}

#[test]
fn a_plain_file_still_opens_and_encrypt_converts_it_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.state");
    // A state file as clients made them before encryption.
    let key = {
        let mut connection = rusqlite::Connection::open(&path).unwrap();
        schema::migrate(&path, &mut connection).unwrap();
        let state = StateFile {
            path: path.clone(),
            connection,
        };
        let key = state.identity_or_generate().unwrap();
        state.add_contact("carol", &key.public_key()).unwrap();
        key
    };
    assert!(std::fs::read(&path).unwrap().starts_with(b"SQLite format 3\0"));
    let told = std::rc::Rc::new(std::cell::Cell::new(0));
    {
        let state = StateFile::open(&StateAccess::new(&path, Counting(told.clone()))).unwrap();
        assert_eq!(state.identity_key().unwrap(), key.user());
    }
    assert_eq!(told.get(), 1, "the caller is told the file is plain");

    assert_eq!(StateFile::encrypt(&sealed(&path)).unwrap(), Encryption::Encrypted);
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.starts_with(b"SQLite format 3"));
    assert!(!bytes.windows(5).any(|w| w == b"carol"));
    assert!(!dir.path().join("old.state.encrypting").exists());
    let err = StateFile::open(&StateAccess::with_passphrase(&path, "wrong")).unwrap_err();
    assert!(matches!(err, StateError::WrongPassphrase(_)), "{err}");
    let state = StateFile::open(&StateAccess::new(&path, Counting(told.clone()))).unwrap();
    assert_eq!(told.get(), 1, "no longer plain");
    assert_eq!(state.identity_key().unwrap(), key.user());
    assert_eq!(
        state.contacts().unwrap(),
        vec![("carol".to_owned(), key.public_key())]
    );
    drop(state);
    assert_eq!(
        StateFile::encrypt(&sealed(&path)).unwrap(),
        Encryption::AlreadyEncrypted
    );
}

#[test]
fn an_encrypted_file_left_inside_a_write_rolls_back_and_a_wrong_key_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.state");
    {
        let state = StateFile::open_or_create(&sealed(&path)).unwrap();
        state.identity_or_generate().unwrap();
    }
    // A writer that spills pages into the file mid-transaction; the files
    // copied then are what its death would leave.
    let crashed = dir.path().join("crashed.state");
    {
        let writer = StateFile::raw_connection(&sealed(&path)).unwrap();
        writer.pragma_update(None, "cache_size", 4).unwrap();
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        for n in 0..200 {
            writer
                .execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2)",
                    rusqlite::params![format!("junk-{n}"), vec![0x5a_u8; 8 * 1024]],
                )
                .unwrap();
        }
        std::fs::copy(&path, &crashed).unwrap();
        let mut journal = crashed.as_os_str().to_owned();
        journal.push("-journal");
        std::fs::copy(dir.path().join("live.state-journal"), &journal).unwrap();
        assert!(std::fs::metadata(&journal).unwrap().len() > 0, "a hot journal");
    }
    let err = StateFile::open(&StateAccess::with_passphrase(&crashed, "wrong")).unwrap_err();
    assert!(matches!(err, StateError::WrongPassphrase(_)), "{err}");
    let state = StateFile::open(&sealed(&crashed)).unwrap();
    state.identity().unwrap();
    let junk: i64 = state
        .connection
        .query_row(
            "SELECT count(*) FROM settings WHERE key LIKE 'junk-%'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(junk, 0, "the interrupted write is rolled back");
    let integrity: String = state
        .connection
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
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
    let err = StateFile::open(&sealed(&path)).unwrap_err();
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
        let state = StateFile::open_or_create(&sealed(&path)).unwrap();
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
    let state = StateFile::open(&sealed(&path)).unwrap();
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
    let state = StateFile::open(&sealed(&path)).unwrap();
    assert!(
        GroupMember::load(&state.provider(), &gid(b"g"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_rolled_back_transaction_leaves_no_mls_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&sealed(&dir.path().join("s.state"))).unwrap();
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
    let state = StateFile::open_or_create(&sealed(&dir.path().join("s.state"))).unwrap();
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
    let state = StateFile::open_or_create(&sealed(&dir.path().join("s.state"))).unwrap();
    let identity = state.identity_or_generate().unwrap();
    let id = GroupId::new(b"settle".to_vec()).unwrap();
    let mut group = state
        .create_group(&identity, &id, "settle", Default::default())
        .unwrap();
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
        state
            .settle_publication(&id, &mut group, settlement, &[])
            .unwrap();
        assert!(!group.has_pending_commit());
        assert_eq!(group.epoch(), epoch, "{settlement:?}");
        assert!(state.publications().unwrap().is_empty());
    }
}

#[test]
fn inbox_keeps_order_until_entries_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateFile::open_or_create(&sealed(&dir.path().join("s.state"))).unwrap();
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
    let state = StateFile::open_or_create(&sealed(&dir.path().join("s.state"))).unwrap();
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
    let state = StateFile::open(&sealed(&path)).unwrap();
    let identity = state.identity().unwrap();
    assert_eq!(identity.public_key(), device.public_key());
    assert_eq!(identity.user(), user.public_key(), "still the user's device");
    assert_eq!(state.identity_key().unwrap(), user.public_key());
    assert!(state.user().unwrap().is_none(), "no user key to sign lists with");
}

#[test]
fn a_changed_passphrase_opens_the_file_and_the_old_one_no_longer_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.state");
    let key = {
        let state = StateFile::open_or_create(&sealed(&path)).unwrap();
        let key = state.identity_or_generate().unwrap();
        state.change_passphrase("a new one").unwrap();
        key
    };
    let old = StateFile::open(&sealed(&path)).unwrap_err();
    assert!(matches!(old, StateError::WrongPassphrase(_)), "{old}");
    let state = StateFile::open(&StateAccess::with_passphrase(&path, "a new one")).unwrap();
    assert_eq!(state.identity_key().unwrap(), key.user());
    let integrity: String = state
        .connection
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");

    // A plain file has no passphrase to change.
    let plain_path = dir.path().join("plain.state");
    let mut connection = rusqlite::Connection::open(&plain_path).unwrap();
    schema::migrate(&plain_path, &mut connection).unwrap();
    let plain = StateFile {
        path: plain_path,
        connection,
    };
    let refused = plain.change_passphrase("x").unwrap_err();
    assert!(refused.to_string().contains("state encrypt"), "{refused}");
}
