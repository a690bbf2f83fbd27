//! Device lists (protocol 5): stored only when signed by the user key, sent
//! by a device of the user, newer than the stored one (by a bounded step)
//! and naming no device an earlier list dropped; served in the order asked.

use openmls_traits::signatures::Signer;
use quicnprotochat_core::{DeviceList, IdentityKey, IdentityKeypair, SignedDeviceList};
use quicnprotochat_server::delivery::rules::MAX_DEVICE_LIST_STEP;
use quicnprotochat_server::store::DeviceListRefusal;

use super::{Backend, close};

/// The key pair of seed `seed`: a user key, or a device's.
pub fn keypair(seed: u8) -> IdentityKeypair {
    IdentityKeypair::from_secret_bytes(&[seed; 32])
}

/// The public key of seed `seed`.
pub fn public(seed: u8) -> IdentityKey {
    keypair(seed).public_key()
}

/// The list of the devices of seeds `devices` of the user of seed `user`
/// at `version`, signed by that user.
pub fn signed_list(user: u8, version: u64, devices: &[u8]) -> SignedDeviceList {
    DeviceList::new(public(user), version, devices.iter().copied().map(public))
        .unwrap()
        .sign(&keypair(user))
        .unwrap()
}

/// `list` with a plain Ed25519 signature over its signing bytes by the key
/// of seed `signer` (MLS's signer signs exactly the bytes it is given).
pub fn signed_by(signer: u8, list: DeviceList) -> SignedDeviceList {
    let signature = keypair(signer).sign(&list.signing_bytes()).unwrap();
    SignedDeviceList::from_parts(list, signature.try_into().unwrap())
}

/// The user key of the lists these checks store.
const USER: u8 = 1;
/// Devices of that user.
const PHONE: u8 = 10;
const LAPTOP: u8 = 11;
const TABLET: u8 = 12;
/// A device of nobody in particular.
const STRANGER: u8 = 99;

pub async fn the_node_knows_whom_it_holds_key_packages_messages_or_a_device_list_for(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let (owner, recipient, sender) = (super::key(60), super::key(61), super::key(69));
    for stranger in [owner, recipient, sender, public(USER)] {
        assert!(!store.knows(stranger).await.unwrap());
    }
    store
        .upload_key_packages(owner, super::package(b"kp"))
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(sender, recipient, b"for you".to_vec(), None)
        .await
        .unwrap()
        .unwrap();
    store
        .upload_device_list(public(PHONE), signed_list(USER, 1, &[PHONE]))
        .await
        .unwrap()
        .unwrap();
    assert!(store.knows(owner).await.unwrap(), "KeyPackages");
    assert!(store.knows(recipient).await.unwrap(), "queued messages");
    assert!(store.knows(public(USER)).await.unwrap(), "a device list");
    assert!(!store.knows(sender).await.unwrap(), "a sender alone is not known");
    // A queue emptied no longer counts.
    store.drain(recipient).await.unwrap();
    assert!(!store.knows(recipient).await.unwrap());
    close((store, closer)).await;
}

pub async fn a_device_list_is_stored_by_its_device_and_served_in_the_order_asked(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let first = signed_list(USER, 1, &[PHONE, LAPTOP]);
    assert_eq!(
        store
            .upload_device_list(public(PHONE), first.clone())
            .await
            .unwrap(),
        Ok(())
    );
    // The user key itself may store a first list that does not name it.
    let other = signed_list(2, 7, &[TABLET]);
    assert_eq!(
        store.upload_device_list(public(2), other.clone()).await.unwrap(),
        Ok(())
    );
    close((store, closer)).await;

    // Stored durably: served after a restart, unknown users left out, the
    // rest in the order asked (twice if asked twice).
    let (store, closer) = backend.open();
    let asked = vec![public(2), public(50), public(USER), public(51), public(2)];
    assert_eq!(
        store.device_lists(asked).await.unwrap(),
        vec![other.clone(), first.clone(), other]
    );
    assert!(store.device_lists(vec![public(50)]).await.unwrap().is_empty());
    assert!(store.device_lists(Vec::new()).await.unwrap().is_empty());
    close((store, closer)).await;
}

pub async fn a_device_list_only_moves_to_a_higher_version(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let upload = |list: SignedDeviceList| {
        let store = store.clone();
        async move { store.upload_device_list(public(PHONE), list).await.unwrap() }
    };
    // A first list starts within the step, too.
    assert_eq!(
        upload(signed_list(USER, MAX_DEVICE_LIST_STEP + 1, &[PHONE])).await,
        Err(DeviceListRefusal::TooFar {
            current: 0,
            max_step: MAX_DEVICE_LIST_STEP
        })
    );
    let v3 = signed_list(USER, 3, &[PHONE, LAPTOP]);
    assert_eq!(upload(v3.clone()).await, Ok(()));

    // The very same list again (a retry): stored, nothing changes.
    assert_eq!(upload(v3.clone()).await, Ok(()));
    // Another list under the same version, or an older one: stale.
    assert_eq!(
        upload(signed_list(USER, 3, &[PHONE, TABLET])).await,
        Err(DeviceListRefusal::Stale { current: 3 })
    );
    assert_eq!(
        upload(signed_list(USER, 2, &[PHONE, TABLET])).await,
        Err(DeviceListRefusal::Stale { current: 3 })
    );
    assert_eq!(store.device_lists(vec![public(USER)]).await.unwrap(), vec![v3]);

    // A higher version replaces it, within the bounded step.
    let v4 = signed_list(USER, 4, &[PHONE, TABLET]);
    assert_eq!(upload(v4.clone()).await, Ok(()));
    assert_eq!(
        store.device_lists(vec![public(USER)]).await.unwrap(),
        vec![v4.clone()]
    );
    // Versions cannot be used up: a jump past the step (to u64::MAX, after
    // which no list could replace it) is refused and changes nothing.
    for far in [4 + MAX_DEVICE_LIST_STEP + 1, u64::MAX] {
        assert_eq!(
            upload(signed_list(USER, far, &[PHONE])).await,
            Err(DeviceListRefusal::TooFar {
                current: 4,
                max_step: MAX_DEVICE_LIST_STEP
            })
        );
    }
    assert_eq!(store.device_lists(vec![public(USER)]).await.unwrap(), vec![v4]);
    let huge = signed_list(USER, 4 + MAX_DEVICE_LIST_STEP, &[PHONE]);
    assert_eq!(upload(huge.clone()).await, Ok(()));
    assert_eq!(
        upload(signed_list(USER, 5, &[PHONE, LAPTOP])).await,
        Err(DeviceListRefusal::Stale {
            current: 4 + MAX_DEVICE_LIST_STEP
        })
    );
    assert_eq!(store.device_lists(vec![public(USER)]).await.unwrap(), vec![huge]);
    close((store, closer)).await;
}

pub async fn a_device_list_not_signed_by_its_user_key_is_refused(backend: &impl Backend) {
    let (store, closer) = backend.open();
    // Signed by a device (the caller), not by the user key it names.
    let forged = signed_by(PHONE, DeviceList::new(public(USER), 1, [public(PHONE)]).unwrap());
    assert_eq!(
        store.upload_device_list(public(PHONE), forged).await.unwrap(),
        Err(DeviceListRefusal::BadSignature)
    );
    // The user's signature over another version does not carry over.
    let signed = signed_list(USER, 2, &[PHONE]);
    let moved = DeviceList::new(public(USER), 3, [public(PHONE)]).unwrap();
    assert_eq!(
        store
            .upload_device_list(
                public(PHONE),
                SignedDeviceList::from_parts(moved, *signed.signature())
            )
            .await
            .unwrap(),
        Err(DeviceListRefusal::BadSignature)
    );
    assert!(store.device_lists(vec![public(USER)]).await.unwrap().is_empty());
    close((store, closer)).await;
}

pub async fn only_a_device_of_the_stored_list_may_replace_it(backend: &impl Backend) {
    let (store, closer) = backend.open();
    // A first list from a caller it does not name (nor the user key).
    assert_eq!(
        store
            .upload_device_list(public(STRANGER), signed_list(USER, 1, &[PHONE]))
            .await
            .unwrap(),
        Err(DeviceListRefusal::NotADevice)
    );
    assert!(store.device_lists(vec![public(USER)]).await.unwrap().is_empty());

    // The phone lists the laptop, then removes it.
    let v1 = signed_list(USER, 1, &[PHONE, LAPTOP]);
    let v2 = signed_list(USER, 2, &[PHONE]);
    assert_eq!(store.upload_device_list(public(PHONE), v1).await.unwrap(), Ok(()));
    assert_eq!(
        store
            .upload_device_list(public(LAPTOP), v2.clone())
            .await
            .unwrap(),
        Ok(())
    );
    // The removed laptop cannot put itself back, even with a newer list
    // the user signed; nor can the user key, which the list does not name.
    let v3 = signed_list(USER, 3, &[PHONE, LAPTOP]);
    for caller in [LAPTOP, USER, STRANGER] {
        assert_eq!(
            store
                .upload_device_list(public(caller), v3.clone())
                .await
                .unwrap(),
            Err(DeviceListRefusal::NotADevice),
            "caller {caller}"
        );
    }
    assert_eq!(
        store.device_lists(vec![public(USER)]).await.unwrap(),
        vec![v2.clone()]
    );
    // The laptop's own retry of the list that removed it still says stored.
    assert_eq!(
        store.upload_device_list(public(LAPTOP), v2).await.unwrap(),
        Ok(())
    );
    // A listed device may replace the list, but not with the removed
    // laptop in it (removed devices stay removed): with a new device.
    assert_eq!(
        store.upload_device_list(public(PHONE), v3).await.unwrap(),
        Err(DeviceListRefusal::RemovedDevice)
    );
    let v3 = signed_list(USER, 3, &[PHONE, TABLET]);
    assert_eq!(
        store.upload_device_list(public(PHONE), v3.clone()).await.unwrap(),
        Ok(())
    );
    assert_eq!(store.device_lists(vec![public(USER)]).await.unwrap(), vec![v3]);
    close((store, closer)).await;
}

/// Run on a multi-threaded runtime: uploads of one user's lists at the same
/// moment (on PostgreSQL, from both writer connections) never lose one that
/// was answered as stored.
pub async fn concurrent_uploads_of_one_users_list_never_lose_the_newest(backend: &impl Backend) {
    let (store, closer) = backend.open();
    // Different lists under one version: exactly one is stored.
    let same_version: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            let list = signed_list(USER, 1, &[PHONE, 20 + i]);
            tokio::spawn(async move {
                let answer = store
                    .upload_device_list(public(PHONE), list.clone())
                    .await
                    .unwrap();
                (answer, list)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for upload in same_version {
        match upload.await.unwrap() {
            (Ok(()), list) => winners.push(list),
            (refusal, _) => assert_eq!(refusal, Err(DeviceListRefusal::Stale { current: 1 })),
        }
    }
    assert_eq!(winners.len(), 1, "one list per version");
    assert_eq!(store.device_lists(vec![public(USER)]).await.unwrap(), winners);

    // Rising versions at once: the highest is stored whatever the order,
    // and every answer names a version no older than its own.
    let rising: Vec<_> = (2..=17u64)
        .map(|version| {
            let store = store.clone();
            tokio::spawn(async move {
                let list = signed_list(USER, version, &[PHONE, LAPTOP]);
                (
                    version,
                    store.upload_device_list(public(PHONE), list).await.unwrap(),
                )
            })
        })
        .collect();
    for upload in rising {
        match upload.await.unwrap() {
            (_, Ok(())) => {}
            (version, Err(DeviceListRefusal::Stale { current })) => assert!(current >= version),
            (version, other) => panic!("version {version}: {other:?}"),
        }
    }
    assert_eq!(
        store.device_lists(vec![public(USER)]).await.unwrap(),
        vec![signed_list(USER, 17, &[PHONE, LAPTOP])]
    );
    close((store, closer)).await;
}

pub async fn a_device_a_list_dropped_stays_out_whoever_uploads(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let upload = |caller: u8, list: SignedDeviceList| {
        let store = store.clone();
        async move { store.upload_device_list(public(caller), list).await.unwrap() }
    };
    // The user key is a device (the first one); the laptop is linked, then
    // removed by a list the phone uploads.
    assert_eq!(
        upload(USER, signed_list(USER, 1, &[USER, PHONE, LAPTOP])).await,
        Ok(())
    );
    let without = signed_list(USER, 2, &[USER, PHONE]);
    assert_eq!(upload(PHONE, without.clone()).await, Ok(()));
    // The laptop still holds the user key: it signs a list naming itself
    // again and tries every identity it has. None gets it back in.
    let back = signed_list(USER, 3, &[USER, PHONE, LAPTOP]);
    assert_eq!(
        upload(LAPTOP, back.clone()).await,
        Err(DeviceListRefusal::NotADevice)
    );
    for caller in [USER, PHONE] {
        assert_eq!(
            upload(caller, back.clone()).await,
            Err(DeviceListRefusal::RemovedDevice)
        );
    }
    close((store, closer)).await;
    // Durably: after a restart too, and in a list of its own making.
    let (store, closer) = backend.open();
    assert_eq!(
        store
            .upload_device_list(public(USER), signed_list(USER, 9, &[USER, LAPTOP]))
            .await
            .unwrap(),
        Err(DeviceListRefusal::RemovedDevice)
    );
    assert_eq!(
        store.device_lists(vec![public(USER)]).await.unwrap(),
        vec![without]
    );
    // A newly linked device is welcome.
    assert_eq!(
        store
            .upload_device_list(public(PHONE), signed_list(USER, 3, &[USER, PHONE, TABLET]))
            .await
            .unwrap(),
        Ok(())
    );
    close((store, closer)).await;
}
