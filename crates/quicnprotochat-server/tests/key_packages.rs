//! KeyPackages of both MLS ciphersuites (protocol 6) over real QUIC against
//! the node library on 127.0.0.1:0, through typed Cap'n Proto clients:
//! uploaded together, fetched and counted per suite (a call that leaves
//! `ciphersuite` unset asks for X25519, as every client before protocol 6
//! does), limited per suite, and an unknown suite refused.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

mod node;

use node::{TestNode, failure};
use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{IdentityKey, IdentityKeypair, KeyPackageOptions, Suite};
use quicnprotochat_proto::auth_capnp::auth_service;
use quicnprotochat_proto::outcome::{FetchedKeyPackage, UploadOutcome};

/// The device of seed `seed`.
fn device(seed: u8) -> IdentityKeypair {
    IdentityKeypair::from_secret_bytes(&[seed; 32])
}

/// A fresh KeyPackage of `device` in `suite`.
fn key_package(device: &IdentityKeypair, suite: Suite, last_resort: bool) -> Vec<u8> {
    let options = KeyPackageOptions {
        last_resort,
        lifetime_seconds: None,
        suite,
    };
    quicnprotochat_core::generate_key_package_with(&OpenMlsRustCrypto::default(), device, options).unwrap()
}

/// Calls `uploadKeyPackages` for `owner`.
async fn upload(auth: &auth_service::Client, owner: &IdentityKeypair, packages: &[Vec<u8>]) -> UploadOutcome {
    let mut request = auth.upload_key_packages_request();
    request.get().set_identity_key(owner.public_key().as_bytes());
    let mut list = request.get().init_packages(packages.len() as u32);
    for (index, package) in packages.iter().enumerate() {
        list.set(index as u32, package);
    }
    let response = request.send().promise.await.unwrap();
    UploadOutcome::read(response.get().unwrap().get_outcome().unwrap()).unwrap()
}

/// Calls `fetchKeyPackage` for `owner`, with `ciphersuite` set to `suite`
/// or left unset.
async fn fetch(
    auth: &auth_service::Client,
    owner: &IdentityKey,
    suite: Option<u16>,
) -> Result<FetchedKeyPackage, capnp::Error> {
    let mut request = auth.fetch_key_package_request();
    let mut params = request.get();
    params.set_identity_key(owner.as_bytes());
    if let Some(code) = suite {
        params.set_ciphersuite(code);
    }
    let response = request.send().promise.await?;
    Ok(FetchedKeyPackage::read(response.get()?.get_outcome()?).unwrap())
}

/// Calls `keyPackageCount` for `owner`, with `ciphersuite` set to `suite`
/// or left unset.
async fn count(
    auth: &auth_service::Client,
    owner: &IdentityKey,
    suite: Option<u16>,
) -> Result<(u32, bool), capnp::Error> {
    let mut request = auth.key_package_count_request();
    let mut params = request.get();
    params.set_identity_key(owner.as_bytes());
    if let Some(code) = suite {
        params.set_ciphersuite(code);
    }
    let response = request.send().promise.await?;
    let results = response.get()?;
    Ok((results.get_count(), results.get_has_last_resort()))
}

/// The bytes of a fetched KeyPackage.
fn package(fetched: Result<FetchedKeyPackage, capnp::Error>) -> Vec<u8> {
    match fetched.unwrap() {
        FetchedKeyPackage::Package(bytes) => bytes,
        other => panic!("no KeyPackage: {other:?}"),
    }
}

const HYBRID: u16 = 0x004F;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_suites_key_packages_are_fetched_and_counted_apart_and_unset_means_x25519() {
    let node = TestNode::start(|_| {}).await;
    let owner = device(1);
    let owner_key = owner.public_key();
    let classic = key_package(&owner, Suite::X25519, false);
    let hybrid = key_package(&owner, Suite::MlKem768X25519, false);
    // Two HPKE keys of 1,216 bytes each (init and leaf encryption key):
    // well within the node's default payload limit.
    assert!(hybrid.len() > 2 * 1216, "{} bytes", hybrid.len());

    node.with_auth(Some(&owner), async |auth| {
        assert_eq!(
            upload(&auth, &owner, &[classic.clone(), hybrid.clone()]).await,
            UploadOutcome::Stored
        );
        assert_eq!(count(&auth, &owner_key, None).await.unwrap(), (1, false));
        assert_eq!(count(&auth, &owner_key, Some(0x0001)).await.unwrap(), (1, false));
        assert_eq!(count(&auth, &owner_key, Some(HYBRID)).await.unwrap(), (1, false));
    })
    .await;

    node.with_auth(None, async |auth| {
        // Unset: what every client before protocol 6 asks for.
        let served = package(fetch(&auth, &owner_key, None).await);
        assert_eq!(served, classic);
        assert_eq!(
            quicnprotochat_core::inspect_key_package(&served).unwrap().suite,
            Suite::X25519
        );
        let served = package(fetch(&auth, &owner_key, Some(HYBRID)).await);
        assert_eq!(served, hybrid);
        let info = quicnprotochat_core::inspect_key_package(&served).unwrap();
        assert_eq!(info.suite, Suite::MlKem768X25519);
        assert_eq!(info.identity, owner_key);
        // Each stock is empty now, whichever suite is asked for.
        assert_eq!(
            fetch(&auth, &owner_key, Some(HYBRID)).await.unwrap(),
            FetchedKeyPackage::None
        );
        assert_eq!(
            fetch(&auth, &owner_key, Some(0x0001)).await.unwrap(),
            FetchedKeyPackage::None
        );

        let (kind, text) = failure(fetch(&auth, &owner_key, Some(0x0002)).await);
        assert_eq!(kind, capnp::ErrorKind::Failed);
        for expected in [
            "ciphersuite: 0x0002",
            "0x0001 (MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519)",
            "0x004F (MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519)",
        ] {
            assert!(text.contains(expected), "{text}");
        }
    })
    .await;

    node.with_auth(Some(&owner), async |auth| {
        assert_eq!(count(&auth, &owner_key, None).await.unwrap(), (0, false));
        assert_eq!(count(&auth, &owner_key, Some(HYBRID)).await.unwrap(), (0, false));
        let (kind, text) = failure(count(&auth, &owner_key, Some(0xFFFF)).await);
        assert_eq!(kind, capnp::ErrorKind::Failed);
        assert!(text.contains("ciphersuite: 0xFFFF"), "{text}");
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_suite_has_its_own_serve_rate_last_resort_and_limit() {
    // One ordinary KeyPackage a minute per identity and suite; two kept per
    // identity and suite.
    let node = TestNode::start(|config| {
        config.key_package_serve_rate = 1;
        config.max_key_packages = 2;
    })
    .await;
    let owner = device(2);
    let owner_key = owner.public_key();
    let classic = key_package(&owner, Suite::X25519, false);
    let hybrid = [
        key_package(&owner, Suite::MlKem768X25519, false),
        key_package(&owner, Suite::MlKem768X25519, false),
    ];
    let hybrid_resort = key_package(&owner, Suite::MlKem768X25519, true);

    node.with_auth(Some(&owner), async |auth| {
        let full = [classic.clone(), hybrid[0].clone(), hybrid[1].clone()];
        assert_eq!(upload(&auth, &owner, &full).await, UploadOutcome::Stored);
        // The hybrid stock is full; the classic one has room.
        assert_eq!(
            upload(&auth, &owner, std::slice::from_ref(&hybrid_resort)).await,
            UploadOutcome::TooMany { stored: 2, max: 2 }
        );
        let another = key_package(&owner, Suite::X25519, true);
        assert_eq!(upload(&auth, &owner, &[another]).await, UploadOutcome::Stored);
    })
    .await;

    node.with_auth(None, async |auth| {
        assert_eq!(package(fetch(&auth, &owner_key, Some(HYBRID)).await), hybrid[0]);
        // The hybrid serve rate is spent and there is no hybrid last resort.
        assert_eq!(
            fetch(&auth, &owner_key, Some(HYBRID)).await.unwrap(),
            FetchedKeyPackage::None
        );
        // The classic stock's rate is its own.
        assert_eq!(package(fetch(&auth, &owner_key, None).await), classic);
    })
    .await;

    node.with_auth(Some(&owner), async |auth| {
        // Room again in the hybrid stock: a last resort, served from now
        // on while the rate is spent.
        assert_eq!(
            upload(&auth, &owner, std::slice::from_ref(&hybrid_resort)).await,
            UploadOutcome::Stored
        );
        assert_eq!(count(&auth, &owner_key, Some(HYBRID)).await.unwrap(), (1, true));
    })
    .await;
    node.with_auth(None, async |auth| {
        for _ in 0..2 {
            assert_eq!(
                package(fetch(&auth, &owner_key, Some(HYBRID)).await),
                hybrid_resort
            );
        }
    })
    .await;
    node.with_auth(Some(&owner), async |auth| {
        assert_eq!(
            count(&auth, &owner_key, Some(HYBRID)).await.unwrap(),
            (1, true),
            "the ordinary one is kept while the rate is spent"
        );
        assert_eq!(count(&auth, &owner_key, None).await.unwrap(), (0, true));
    })
    .await;
    node.stop().await;
}
