//! `uploadDeviceList` and `fetchDeviceLists` over real QUIC against the
//! node library on 127.0.0.1:0, through typed Cap'n Proto clients, as a
//! device authenticated with its key (a TLS client certificate) and as an
//! anonymous caller.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod conformance;
mod node;

use conformance::device_lists::{keypair, public, signed_by, signed_list};
use node::{TestNode, failure};
use quicnprotochat_core::{DeviceList, IdentityKey, SignedDeviceList};
use quicnprotochat_proto::auth_capnp::auth_service;
use quicnprotochat_proto::outcome::DeviceListOutcome;
use quicnprotochat_proto::wire;

/// Calls `uploadDeviceList` with `list`: its outcome, or the exception.
async fn upload(
    auth: &auth_service::Client,
    list: &SignedDeviceList,
) -> Result<DeviceListOutcome, capnp::Error> {
    let mut request = auth.upload_device_list_request();
    wire::write_device_list(list, request.get().init_list());
    let response = request.send().promise.await?;
    Ok(DeviceListOutcome::read(response.get()?.get_outcome()?).unwrap())
}

/// Calls `fetchDeviceLists` with `keys` (raw bytes, to send wrong ones too).
async fn fetch(auth: &auth_service::Client, keys: &[Vec<u8>]) -> Result<Vec<SignedDeviceList>, capnp::Error> {
    let mut request = auth.fetch_device_lists_request();
    let mut list = request.get().init_user_keys(keys.len() as u32);
    for (index, key) in keys.iter().enumerate() {
        list.set(index as u32, key);
    }
    let response = request.send().promise.await?;
    let lists = response.get()?.get_lists()?;
    Ok(lists
        .iter()
        .enumerate()
        .map(|(index, list)| wire::read_device_list(&format!("lists[{index}]"), list).unwrap())
        .collect())
}

fn raw(keys: &[IdentityKey]) -> Vec<Vec<u8>> {
    keys.iter().map(|key| key.as_bytes().to_vec()).collect()
}

const USER: u8 = 1;
const PHONE: u8 = 10;
const LAPTOP: u8 = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_stores_its_users_list_and_anyone_fetches_it() {
    let node = TestNode::start(|_| {}).await;
    let v2 = signed_list(USER, 2, &[PHONE, LAPTOP]);
    node.with_auth(Some(&keypair(PHONE)), async |auth| {
        assert_eq!(upload(&auth, &v2).await.unwrap(), DeviceListOutcome::Stored);
        // A retry of the same list is answered the same.
        assert_eq!(upload(&auth, &v2).await.unwrap(), DeviceListOutcome::Stored);
        // Signed by the phone, not by the user key the list names.
        let forged = signed_by(PHONE, DeviceList::new(public(USER), 3, [public(PHONE)]).unwrap());
        assert_eq!(
            upload(&auth, &forged).await.unwrap(),
            DeviceListOutcome::BadSignature
        );
        assert_eq!(
            upload(&auth, &signed_list(USER, 1, &[PHONE])).await.unwrap(),
            DeviceListOutcome::Stale { current: 2 }
        );
        // Another user's list that does not name the phone.
        assert_eq!(
            upload(&auth, &signed_list(2, 1, &[LAPTOP])).await.unwrap(),
            DeviceListOutcome::NotADevice
        );
    })
    .await;

    node.with_auth(None, async |auth| {
        // Anonymous: fetching is for anyone, storing is not.
        let asked = [public(50), public(USER), public(2)];
        assert_eq!(fetch(&auth, &raw(&asked)).await.unwrap(), vec![v2.clone()]);
        assert_eq!(fetch(&auth, &[]).await.unwrap(), Vec::new());
        let (kind, text) = failure(upload(&auth, &signed_list(USER, 3, &[PHONE])).await);
        assert_eq!(kind, capnp::ErrorKind::Failed);
        assert!(text.contains("permission denied"), "{text}");
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_device_list_calls_are_refused_with_the_field() {
    let node = TestNode::start(|_| {}).await;
    node.with_auth(Some(&keypair(PHONE)), async |auth| {
        // More users than one call may name.
        let many = raw(&vec![public(USER); wire::MAX_DEVICE_LIST_FETCH + 1]);
        let (kind, text) = failure(fetch(&auth, &many).await);
        assert_eq!(kind, capnp::ErrorKind::Failed);
        assert!(
            text.contains("userKeys") && text.contains("at most 256"),
            "{text}"
        );
        let (kind, text) = failure(fetch(&auth, &[public(USER).as_bytes().to_vec(), vec![7; 31]]).await);
        assert_eq!(kind, capnp::ErrorKind::Failed);
        assert!(text.contains("userKeys[1]") && text.contains("got 31"), "{text}");
        // Exactly the most is fine.
        let most = raw(&vec![public(USER); wire::MAX_DEVICE_LIST_FETCH]);
        assert_eq!(fetch(&auth, &most).await.unwrap(), Vec::new());

        // A list whose devices are out of order: not a list at all.
        let mut request = auth.upload_device_list_request();
        {
            let mut list = request.get().init_list();
            list.set_user_key(public(USER).as_bytes());
            list.set_version(1);
            let mut devices = list.reborrow().init_devices(2);
            let (low, high) = (
                public(PHONE).min(public(LAPTOP)),
                public(PHONE).max(public(LAPTOP)),
            );
            devices.set(0, high.as_bytes());
            devices.set(1, low.as_bytes());
            list.set_signature(&[0; 64]);
        }
        let (kind, text) = failure(request.send().promise.await);
        assert_eq!(kind, capnp::ErrorKind::Failed);
        assert!(text.contains("list.devices[1]"), "{text}");
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_rates_a_caller_is_told_to_wait() {
    // One message and one fetch a second, bursts of two.
    let node = TestNode::start(|config| {
        config.enqueue_rate = 1;
        config.key_package_fetch_rate = 1;
    })
    .await;
    node.with_auth(Some(&keypair(PHONE)), async |auth| {
        // Each upload counts as a message of the send budget.
        for version in 1..=2 {
            let list = signed_list(USER, version, &[PHONE]);
            assert_eq!(upload(&auth, &list).await.unwrap(), DeviceListOutcome::Stored);
        }
        let limited = upload(&auth, &signed_list(USER, 3, &[PHONE])).await.unwrap();
        assert!(
            matches!(limited, DeviceListOutcome::RateLimited(_)),
            "{limited:?}"
        );

        // A fetch has no outcome to say so: it is refused as overloaded.
        let asked = raw(&[public(USER)]);
        let stored = vec![signed_list(USER, 2, &[PHONE])];
        assert_eq!(fetch(&auth, &asked).await.unwrap(), stored);
        assert_eq!(fetch(&auth, &asked).await.unwrap(), stored);
        let (kind, text) = failure(fetch(&auth, &asked).await);
        assert_eq!(kind, capnp::ErrorKind::Overloaded);
        assert!(text.contains("rate limited"), "{text}");
    })
    .await;
    node.stop().await;
}
