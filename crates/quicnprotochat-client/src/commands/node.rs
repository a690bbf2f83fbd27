//! Stateless commands: `ping`, `register`, `fetch-key`.

use std::time::Instant;

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{IdentityKeypair, Suite, fingerprint, generate_key_package, inspect_key_package};
use serde_json::json;

use crate::cli::ConnectionArgs;
use crate::connections::Nodes;
use crate::error::ClientError;
use crate::key_packages::{fetch_verified_key_package, upload};
use crate::naming::parse_key;
use crate::output::{self, print_json};

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
        say!(
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
        say!("{}", identity.public_key());
    }
    nodes.close().await;
    Ok(())
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
        say!(
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
