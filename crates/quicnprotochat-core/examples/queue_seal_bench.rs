//! What encrypting every queued message at rest would cost the node, for
//! the two designs docs/seized-node.md (mechanism 4) weighs before
//! choosing: a symmetric per-queue ratchet (two HKDF-Expand steps to derive
//! the message key and move the chain on, then AES-256-GCM), and HPKE to a
//! public key per queue (an X25519 agreement for every message, then
//! AES-128-GCM; DHKEM(X25519, HKDF-SHA256), as openmls seals Welcomes).
//! Both through openmls_rust_crypto, the crypto the node already links.
//! Single-threaded; prints a Markdown table of the time per message.
//!
//! Run: `cargo run --release -p quicnprotochat-core --example queue_seal_bench`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::crypto::OpenMlsCrypto as _;
use openmls_traits::types::{AeadType, HashType, HpkeAeadType, HpkeConfig, HpkeKdfType, HpkeKemType};

/// Messages sealed per measurement.
const MESSAGES: u32 = 20_000;

fn main() {
    let provider = OpenMlsRustCrypto::default();
    let crypto = provider.crypto();
    println!(
        "| payload | ratchet (2 × HKDF-Expand + AES-256-GCM) | HPKE to the queue's key (X25519 + AES-128-GCM) |"
    );
    println!("|---:|---:|---:|");
    for size in [100usize, 16 * 1024] {
        let payload = vec![0x5a; size];

        let mut chain = vec![7u8; 32];
        let nonce = [0u8; 12];
        let ratchet = per_message(|| {
            let key = crypto
                .hkdf_expand(HashType::Sha2_256, &chain, b"message", 32)
                .unwrap();
            let sealed = crypto
                .aead_encrypt(AeadType::Aes256Gcm, key.as_slice(), &payload, &nonce, &[])
                .unwrap();
            chain = crypto
                .hkdf_expand(HashType::Sha2_256, &chain, b"next", 32)
                .unwrap()
                .as_slice()
                .to_vec();
            sealed.len()
        });

        let queue_key = crypto.derive_hpke_keypair(hpke_config(), &[9u8; 32]).unwrap();
        let hpke = per_message(|| {
            let sealed = crypto
                .hpke_seal(
                    hpke_config(),
                    &queue_key.public,
                    b"quicnprotochat queue",
                    &[],
                    &payload,
                )
                .unwrap();
            sealed.ciphertext.as_slice().len()
        });

        println!("| {size} B | {} | {} |", us(ratchet), us(hpke));
    }
}

/// HPKE as openmls seals a Welcome to an X25519 KeyPackage.
fn hpke_config() -> HpkeConfig {
    HpkeConfig(
        HpkeKemType::DhKem25519,
        HpkeKdfType::HkdfSha256,
        HpkeAeadType::AesGcm128,
    )
}

/// The mean time of `seal` over [`MESSAGES`] calls.
fn per_message(mut seal: impl FnMut() -> usize) -> Duration {
    let mut bytes = 0;
    let started = Instant::now();
    for _ in 0..MESSAGES {
        bytes += seal();
    }
    let took = started.elapsed();
    assert!(bytes > 0);
    took / MESSAGES
}

fn us(took: Duration) -> String {
    format!("{:.2} µs", took.as_secs_f64() * 1e6)
}
