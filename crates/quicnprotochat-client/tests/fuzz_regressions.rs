//! Replays the fuzz regression inputs (`fuzz/regressions/<target>/*`: every
//! input that once crashed or hung a target, plus hand-made seeds) through
//! the same harness the fuzz targets use. Long fuzzing runs stay outside CI;
//! see fuzz/README.md.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

#[path = "../../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

/// Runs `target` on every file in its regression folder and on `seeds`;
/// returns how many inputs ran.
fn replay(target: &str, run: fn(&[u8]), seeds: &[Vec<u8>]) -> usize {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = seeds.to_vec();
    if let Ok(entries) = std::fs::read_dir(&folder) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() && path.extension().is_none_or(|ext| ext != "md") {
                inputs.push(std::fs::read(&path).unwrap());
            }
        }
    }
    for input in &inputs {
        run(input);
    }
    inputs.len()
}

fn noise(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn real_key_package() -> Vec<u8> {
    let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
    quicnprotochat_core::generate_key_package(&provider, &quicnprotochat_core::IdentityKeypair::generate())
        .unwrap()
}

#[test]
fn key_package_inputs_never_crash_validation() {
    let package = real_key_package();
    let mut flipped = package.clone();
    flipped[package.len() / 2] ^= 0x55;
    let seeds = vec![
        Vec::new(),
        noise(300, 1),
        package.clone(),
        package[..package.len() / 2].to_vec(),
        flipped,
    ];
    assert!(replay("key_package", harness::key_package, &seeds) >= 5);
}

#[test]
fn incoming_payloads_never_crash_or_corrupt_a_client() {
    let package = real_key_package();
    let seeds = vec![
        Vec::new(),
        noise(200, 2),
        // MLS framing headers with nonsense after them.
        vec![0x00, 0x01, 0x00, 0x02, 0xff, 0xff],
        vec![0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, 0x10],
        package,
    ];
    assert!(replay("incoming_payload", harness::incoming_payload, &seeds) >= 5);
}

#[test]
fn state_files_never_crash_the_client_and_refused_ones_stay_untouched() {
    let mut sqlite_header = b"SQLite format 3\0".to_vec();
    sqlite_header.extend(noise(4080, 3));
    let seeds = vec![noise(1, 4), noise(4096, 5), sqlite_header];
    assert!(replay("state_file", harness::state_file, &seeds) >= 3);
}

#[test]
fn raw_rpc_bytes_never_crash_the_node_or_keep_a_session_alive() {
    let seeds = vec![
        Vec::new(),
        // Segment tables claiming huge segments or counts.
        vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f],
        vec![1, 0xff, 0xff, 0xff, 0x7f, 1, 0, 0, 0],
        vec![0xff, 0xff, 0xff, 0x7f, 1, 0, 0, 0],
        noise(512, 6),
        noise(513, 7),
    ];
    assert!(replay("rpc_session", harness::rpc_session, &seeds) >= 6);
}
