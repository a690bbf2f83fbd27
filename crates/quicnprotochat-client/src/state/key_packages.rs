//! KeyPackages of our identity: made with their private keys (the HPKE init
//! keys a Welcome is encrypted to) committed to the state file before any
//! leaves this machine, so nobody can invite us with one we cannot open.

use quicnprotochat_core::{IdentityKeypair, KeyPackageOptions, Suite, generate_key_package_with};

use super::{StateError, StateFile};

impl StateFile {
    /// Makes `ordinary` KeyPackages and, with `last_resort`, one last-resort
    /// KeyPackage (served when no other is left, so the identity stays
    /// invitable), storing their private keys in one transaction.
    pub fn generate_key_packages(
        &self,
        identity: &IdentityKeypair,
        suite: Suite,
        ordinary: usize,
        last_resort: bool,
    ) -> Result<Vec<Vec<u8>>, StateError> {
        self.atomically(|| {
            let provider = self.provider();
            let mut packages = Vec::with_capacity(ordinary + usize::from(last_resort));
            for _ in 0..ordinary {
                let options = KeyPackageOptions {
                    suite,
                    ..KeyPackageOptions::default()
                };
                packages.push(generate_key_package_with(&provider, identity, options)?);
            }
            if last_resort {
                let options = KeyPackageOptions {
                    last_resort: true,
                    lifetime_seconds: None,
                    suite,
                };
                packages.push(generate_key_package_with(&provider, identity, options)?);
            }
            Ok(packages)
        })
    }
}
