//! Stateless commands: `ping`, `register`, `fetch-key`.

use std::time::Instant;

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    IdentityKey, IdentityKeypair, KeyPackageOptions, Suite, fingerprint, generate_key_package,
    generate_key_package_with, inspect_key_package,
};
use quicnprotochat_proto::outcome::{FetchedKeyPackage, RateLimited};
use serde_json::json;

use crate::cli::ConnectionArgs;
use crate::error::ClientError;
use crate::naming::parse_key;
use crate::nodes::{Nodes, Patience};
use crate::output::{self, print_json};
use crate::state::StateFile;

/// `ping`: prints the node's version and the round trip time of one call.
pub(crate) async fn ping(args: &ConnectionArgs) -> Result<(), ClientError> {
    let nodes = Nodes::connect(args, None).await?;
    let started = Instant::now();
    let info = nodes.auth().ping().await?;
    let rtt = started.elapsed();
    if output::json() {
        print_json(&json!({
            "server": nodes.auth().server(),
            "remote": nodes.auth().remote().to_string(),
            "version": info.version,
            "protocol": info.protocol_version,
            "max_payload_bytes": info.max_payload_bytes,
            "round_trip_ms": rtt.as_secs_f64() * 1000.0,
        }))?;
    } else {
        println!(
            "pong from {} ({}): quicnprotochat-server {}, protocol {}, max payload {} bytes, round trip {:.3} ms",
            nodes.auth().server(),
            nodes.auth().remote(),
            info.version,
            info.protocol_version,
            info.max_payload_bytes,
            rtt.as_secs_f64() * 1000.0
        );
    }
    nodes.close().await;
    Ok(())
}

/// `register`: a throwaway identity with one KeyPackage on the node; prints
/// the identity key. The secret key is not kept: use `register-state` for an
/// identity you can use later.
pub(crate) async fn register(args: &ConnectionArgs) -> Result<(), ClientError> {
    let identity = IdentityKeypair::generate();
    let nodes = Nodes::connect(args, Some(&identity)).await?;
    let provider = OpenMlsRustCrypto::default();
    let package = generate_key_package(&provider, &identity)?;
    upload(&nodes, &identity, &package).await?;
    if output::json() {
        print_json(&json!({ "user_key": identity.public_key().to_string() }))?;
    } else {
        println!("{}", identity.public_key());
    }
    nodes.close().await;
    Ok(())
}

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
    eprintln!(
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
    let (count, has_last_resort) = nodes
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
        eprintln!(
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

/// `fetch-key`: takes one KeyPackage of an identity (in `suite`) and
/// describes it.
pub(crate) async fn fetch_key(
    args: &ConnectionArgs,
    identity_key: &str,
    suite: Suite,
) -> Result<(), ClientError> {
    let identity = parse_key("identity key", identity_key)?;
    // Anyone may take a KeyPackage: that is how strangers invite each other.
    let nodes = Nodes::connect(args, None).await?;
    let package = fetch_verified_key_package(&nodes, None, &identity, suite).await?;
    let info = inspect_key_package(&package)?;
    let sha256 = hex::encode(fingerprint(&package));
    if output::json() {
        print_json(&json!({
            "identity_key": identity.to_string(),
            "user_key": info.user.to_string(),
            "bytes": package.len(),
            "ciphersuite": info.suite.name(),
            "ciphersuite_name": info.suite.full_name(),
            "ciphersuite_code": info.suite.code(),
            "sha256": sha256,
            "signature_valid": true,
        }))?;
    } else {
        let user = if info.user == identity {
            String::new()
        } else {
            format!(" (a device of user {})", info.user)
        };
        println!(
            "KeyPackage for {identity}{user}: {} bytes, ciphersuite {} ({}, 0x{:04x}), SHA-256 {sha256}, signature valid",
            package.len(),
            info.suite,
            info.suite.full_name(),
            info.suite.code(),
        );
    }
    nodes.close().await;
    Ok(())
}
