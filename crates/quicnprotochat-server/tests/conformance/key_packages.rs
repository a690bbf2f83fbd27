//! KeyPackages of each MLS ciphersuite (protocol 6): a stock of their own
//! per identity and suite, served, counted and limited apart; KeyPackages
//! stored before suites existed are X25519 ones.

use quicnprotochat_core::KeyPackageStock;
use quicnprotochat_core::Suite;
use quicnprotochat_server::store::{Limits, TooManyKeyPackages, ValidKeyPackage};

use super::{Backend, close, key};

const CLASSIC: Suite = Suite::X25519;
const HYBRID: Suite = Suite::MlKem768X25519;

/// A never-expiring KeyPackage record of `suite` (the store does not parse
/// KeyPackages; the service validates them and reads their suite before).
fn of_suite(bytes: &[u8], last_resort: bool, suite: Suite) -> ValidKeyPackage {
    ValidKeyPackage::new(bytes.to_vec(), last_resort, u64::MAX, suite)
}

pub async fn key_packages_are_served_only_to_fetches_of_their_suite(backend: &impl Backend) {
    let (store, closer) = backend.open();
    // Interleaved, so that "oldest" alone would pick the wrong suite.
    let packages = vec![
        of_suite(b"hybrid 1", false, HYBRID),
        of_suite(b"classic 1", false, CLASSIC),
        of_suite(b"hybrid 2", false, HYBRID),
        of_suite(b"classic 2", false, CLASSIC),
    ];
    store
        .upload_key_packages(key(1), packages)
        .await
        .unwrap()
        .unwrap();
    let take = |suite| store.take_key_package(key(1), suite, true);
    assert_eq!(take(CLASSIC).await.unwrap(), Some(b"classic 1".to_vec()));
    assert_eq!(take(HYBRID).await.unwrap(), Some(b"hybrid 1".to_vec()));
    assert_eq!(take(HYBRID).await.unwrap(), Some(b"hybrid 2".to_vec()));
    // The hybrid stock is empty; the classic one is not touched by that.
    assert_eq!(take(HYBRID).await.unwrap(), None);
    assert_eq!(take(CLASSIC).await.unwrap(), Some(b"classic 2".to_vec()));
    assert_eq!(take(CLASSIC).await.unwrap(), None);
    close((store, closer)).await;
}

pub async fn each_suite_has_its_own_last_resort_and_count(backend: &impl Backend) {
    let (store, closer) = backend.open();
    let packages = vec![
        of_suite(b"classic resort", true, CLASSIC),
        of_suite(b"classic", false, CLASSIC),
        of_suite(b"hybrid", false, HYBRID),
        of_suite(b"hybrid 2", false, HYBRID),
    ];
    store
        .upload_key_packages(key(1), packages)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.count_key_packages(key(1), CLASSIC).await.unwrap(),
        KeyPackageStock {
            count: 1,
            has_last_resort: true
        }
    );
    assert_eq!(
        store.count_key_packages(key(1), HYBRID).await.unwrap(),
        KeyPackageStock {
            count: 2,
            has_last_resort: false
        }
    );
    // The hybrid stock has no last resort: spent means nothing, never the
    // classic one (a group of one suite cannot add a KeyPackage of the
    // other).
    assert_eq!(store.take_key_package(key(1), HYBRID, false).await.unwrap(), None);
    store
        .upload_key_packages(key(1), vec![of_suite(b"hybrid resort", true, HYBRID)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.take_key_package(key(1), HYBRID, false).await.unwrap(),
        Some(b"hybrid resort".to_vec()),
        "the serve rate spent: the suite's last resort, ordinary ones kept"
    );
    assert_eq!(
        store.count_key_packages(key(1), HYBRID).await.unwrap(),
        KeyPackageStock {
            count: 2,
            has_last_resort: true
        }
    );
    for expected in [&b"hybrid"[..], b"hybrid 2", b"hybrid resort", b"hybrid resort"] {
        assert_eq!(
            store
                .take_key_package(key(1), HYBRID, true)
                .await
                .unwrap()
                .as_deref(),
            Some(expected)
        );
    }
    assert_eq!(
        store.count_key_packages(key(1), HYBRID).await.unwrap(),
        KeyPackageStock {
            count: 0,
            has_last_resort: true
        }
    );
    assert_eq!(
        store.count_key_packages(key(1), CLASSIC).await.unwrap(),
        KeyPackageStock {
            count: 1,
            has_last_resort: true
        },
        "untouched by the other suite's fetches"
    );
    close((store, closer)).await;
}

pub async fn the_key_package_limit_holds_per_suite(backend: &impl Backend) {
    let limits = Limits {
        max_key_packages: 2,
        ..Limits::default()
    };
    let (store, closer) = backend.open_with(limits);
    let full = vec![
        of_suite(b"classic", false, CLASSIC),
        of_suite(b"classic resort", true, CLASSIC),
        of_suite(b"hybrid", false, HYBRID),
    ];
    store.upload_key_packages(key(1), full).await.unwrap().unwrap();
    // A full classic stock refuses the whole upload, hybrid part included.
    let mixed = vec![
        of_suite(b"hybrid 2", false, HYBRID),
        of_suite(b"classic 2", false, CLASSIC),
    ];
    assert_eq!(
        store.upload_key_packages(key(1), mixed).await.unwrap(),
        Err(TooManyKeyPackages {
            suite: CLASSIC,
            stored: 2,
            max: 2
        })
    );
    assert_eq!(
        store.count_key_packages(key(1), HYBRID).await.unwrap(),
        KeyPackageStock {
            count: 1,
            has_last_resort: false
        },
        "refused whole"
    );
    // The hybrid stock has room of its own.
    store
        .upload_key_packages(key(1), vec![of_suite(b"hybrid 2", false, HYBRID)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .upload_key_packages(key(1), vec![of_suite(b"hybrid 3", false, HYBRID)])
            .await
            .unwrap(),
        Err(TooManyKeyPackages {
            suite: HYBRID,
            stored: 2,
            max: 2
        })
    );
    // Taking a hybrid one makes room for a hybrid one only.
    store
        .take_key_package(key(1), HYBRID, true)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .upload_key_packages(key(1), vec![of_suite(b"classic 3", false, CLASSIC)])
            .await
            .unwrap()
            .is_err()
    );
    store
        .upload_key_packages(key(1), vec![of_suite(b"hybrid 3", false, HYBRID)])
        .await
        .unwrap()
        .unwrap();
    close((store, closer)).await;
}

pub async fn a_key_package_stored_before_suites_is_an_x25519_one(backend: &impl Backend) {
    close(backend.open()).await;
    backend.store_key_packages_before_suites(key(1), &[(b"old", false), (b"old resort", true)]);
    let (store, closer) = backend.open();
    assert_eq!(
        store.count_key_packages(key(1), CLASSIC).await.unwrap(),
        KeyPackageStock {
            count: 1,
            has_last_resort: true
        }
    );
    assert_eq!(
        store.count_key_packages(key(1), HYBRID).await.unwrap(),
        KeyPackageStock {
            count: 0,
            has_last_resort: false
        }
    );
    assert_eq!(store.take_key_package(key(1), HYBRID, true).await.unwrap(), None);
    store
        .upload_key_packages(key(1), vec![of_suite(b"new hybrid", false, HYBRID)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.take_key_package(key(1), CLASSIC, true).await.unwrap(),
        Some(b"old".to_vec())
    );
    assert_eq!(
        store.take_key_package(key(1), CLASSIC, true).await.unwrap(),
        Some(b"old resort".to_vec())
    );
    assert_eq!(
        store.take_key_package(key(1), HYBRID, true).await.unwrap(),
        Some(b"new hybrid".to_vec())
    );
    close((store, closer)).await;
}
