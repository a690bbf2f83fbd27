//! KeyPackages: uploading them (checking the node stored exactly those
//! bytes), keeping a stock of them on the node for each ciphersuite, and
//! taking a peer's one with its signature, owner and suite verified: the
//! node is not trusted to serve only genuine KeyPackages.

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    IdentityKey, IdentityKeypair, KeyPackageOptions, KeyPackageStock, Suite, fingerprint,
    generate_key_package_with, inspect_key_package,
};
use quicnprotochat_proto::outcome::{FetchedKeyPackage, RateLimited};

use crate::connections::{Nodes, Patience};
use crate::error::ClientError;
use crate::state::StateFile;

/// Uploads a KeyPackage and checks the node stored exactly these bytes.
pub(crate) async fn upload(
    nodes: &Nodes,
    identity: &IdentityKeypair,
    package: &[u8],
) -> Result<(), ClientError> {
    let patience = Patience::new();
    let stored = loop {
        match nodes
            .auth()
            .upload_key_package(&identity.public_key(), package)
            .await
        {
            Err(ClientError::RateLimited { retry_after })
                if patience.wait(&RateLimited { retry_after }).await => {}
            outcome => break outcome?,
        }
    };
    if stored != fingerprint(package) {
        return Err(ClientError::FingerprintMismatch);
    }
    note!(
        "uploaded a KeyPackage ({} bytes, SHA-256 {})",
        package.len(),
        hex::encode(&stored)
    );
    Ok(())
}

/// Takes one KeyPackage of `identity` from the node and checks that it is
/// validly signed and belongs to `identity`: the node is not trusted to
/// serve only genuine KeyPackages.
pub(crate) async fn fetch_verified_key_package(
    nodes: &Nodes,
    user: Option<&IdentityKey>,
    identity: &IdentityKey,
    suite: Suite,
) -> Result<Vec<u8>, ClientError> {
    // Inviting many people at once can outrun the node's KeyPackage fetch
    // rate; the node says when to retry, so wait that long (within reason).
    let patience = Patience::new();
    let package = loop {
        match nodes.auth().fetch_key_package_in(identity, suite).await? {
            FetchedKeyPackage::Package(package) => break package,
            FetchedKeyPackage::None => return Err(ClientError::NoKeyPackage(*identity, suite)),
            FetchedKeyPackage::RateLimited(limited) => {
                if !patience.wait(&limited).await {
                    return Err(limited.into());
                }
            }
        }
    };
    let info = inspect_key_package(&package).map_err(|e| ClientError::BadKeyPackage {
        requested: *identity,
        reason: e.to_string(),
    })?;
    if info.identity != *identity {
        return Err(ClientError::BadKeyPackage {
            requested: *identity,
            reason: format!("its credential is for {}", info.identity),
        });
    }
    if info.suite != suite {
        return Err(ClientError::BadKeyPackage {
            requested: *identity,
            reason: format!("it is a {} KeyPackage, not {suite}", info.suite),
        });
    }
    if let Some(user) = user.filter(|user| info.user != **user) {
        return Err(ClientError::BadKeyPackage {
            requested: *identity,
            reason: format!("its credential names user {}, not {user}", info.user),
        });
    }
    Ok(package)
}

/// How many ordinary KeyPackages a stateful client keeps on the node, and
/// the level below which it uploads more.
pub(crate) const KEY_PACKAGE_BATCH: usize = 8;
const KEY_PACKAGE_LOW_WATER: u32 = 3;

/// Tops up `identity`'s KeyPackages on the node, for each ciphersuite: a
/// batch when fewer than the low-water mark remain, and a last-resort one
/// if it has none, so the identity stays reachable in groups of either
/// suite. The private keys are committed to the state file before the
/// upload. Returns how many were uploaded.
pub(crate) async fn top_up_key_packages(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
) -> Result<usize, ClientError> {
    let mut uploaded = 0;
    for suite in Suite::ALL {
        uploaded += top_up_suite(nodes, state, identity, suite).await?;
    }
    Ok(uploaded)
}

async fn top_up_suite(
    nodes: &Nodes,
    state: &StateFile,
    identity: &IdentityKeypair,
    suite: Suite,
) -> Result<usize, ClientError> {
    let KeyPackageStock {
        count,
        has_last_resort,
    } = nodes
        .auth()
        .key_package_count_in(&identity.public_key(), suite)
        .await?;
    let ordinary = if count < KEY_PACKAGE_LOW_WATER {
        KEY_PACKAGE_BATCH
    } else {
        0
    };
    if ordinary == 0 && has_last_resort {
        return Ok(0);
    }
    // A node whose payload limit is below this suite's KeyPackages (a
    // hybrid one is 2.7 KB) can never take them: say so, and keep none in
    // the state file that could never be used.
    let sample = generate_key_package_with(
        &OpenMlsRustCrypto::default(),
        identity,
        KeyPackageOptions {
            suite,
            last_resort: true,
            ..KeyPackageOptions::default()
        },
    )?;
    let max = nodes.auth().ping().await?.max_payload_bytes;
    if sample.len() > max as usize {
        note!(
            "note: this node takes payloads up to {max} bytes and a {suite} KeyPackage is {} bytes: nobody can invite you to {suite} groups through it",
            sample.len()
        );
        return Ok(0);
    }
    let packages = state.generate_key_packages(identity, suite, ordinary, !has_last_resort)?;
    let patience = Patience::new();
    let stored = loop {
        match nodes
            .auth()
            .upload_key_packages(&identity.public_key(), &packages)
            .await
        {
            Err(ClientError::RateLimited { retry_after })
                if patience.wait(&RateLimited { retry_after }).await => {}
            outcome => break outcome?,
        }
    };
    let expected: Vec<Vec<u8>> = packages.iter().map(|p| fingerprint(p).to_vec()).collect();
    if stored != expected {
        return Err(ClientError::FingerprintMismatch);
    }
    Ok(packages.len())
}
