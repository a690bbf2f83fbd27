//! The MLS ciphersuites we speak, by the names people use for them.
//!
//! Both sign with Ed25519 (identities are Ed25519 keys) and encrypt with
//! AES-128-GCM under SHA-256; they differ in the KEM that protects the
//! group's secrets in Welcomes and update paths:
//! - `x25519`: `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519` (0x0001, RFC
//!   9420);
//! - `mlkem768x25519`: `MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519`
//!   (0x004F), the hybrid of ML-KEM-768 and X25519 (X-Wing) from the IETF
//!   draft on post-quantum MLS ciphersuites. Its code point is provisional
//!   until that draft is final.

use openmls_traits::types::Ciphersuite;

/// An MLS ciphersuite of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Suite {
    /// X25519 HPKE (RFC 9420's mandatory suite).
    #[default]
    X25519,
    /// ML-KEM-768 + X25519 hybrid HPKE: group secrets stay confidential
    /// against a future quantum attacker.
    MlKem768X25519,
}

impl Suite {
    /// Every suite, the default first.
    pub const ALL: [Suite; 2] = [Suite::X25519, Suite::MlKem768X25519];

    /// The openmls ciphersuite.
    pub fn ciphersuite(self) -> Ciphersuite {
        match self {
            Suite::X25519 => Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
            Suite::MlKem768X25519 => Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519,
        }
    }

    /// The length of a public key of the suite's HPKE KEM (an init key, a
    /// leaf's encryption key): X25519's 32 bytes, or X-Wing's ML-KEM-768
    /// encapsulation key (1,184) followed by an X25519 key.
    pub fn kem_public_key_len(self) -> usize {
        match self {
            Suite::X25519 => 32,
            Suite::MlKem768X25519 => 1184 + 32,
        }
    }

    /// The IANA code point (0x004F is provisional).
    pub fn code(self) -> u16 {
        self.ciphersuite().into()
    }

    /// The short name the CLI takes and shows.
    pub fn name(self) -> &'static str {
        match self {
            Suite::X25519 => "x25519",
            Suite::MlKem768X25519 => "mlkem768x25519",
        }
    }

    /// The full MLS name.
    pub fn full_name(self) -> &'static str {
        match self {
            Suite::X25519 => "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
            Suite::MlKem768X25519 => "MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519",
        }
    }

    /// The suite with this short name.
    pub fn from_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|suite| suite.name() == name)
    }

    /// The suite with this code point.
    pub fn from_code(code: u16) -> Option<Suite> {
        Suite::ALL.into_iter().find(|suite| suite.code() == code)
    }

    /// The suite of an openmls ciphersuite, if it is one of ours.
    pub fn from_ciphersuite(ciphersuite: Ciphersuite) -> Option<Suite> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.ciphersuite() == ciphersuite)
    }
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kem_public_keys_have_the_length_the_provider_makes() {
        use openmls_rust_crypto::OpenMlsRustCrypto;
        use openmls_traits::OpenMlsProvider as _;
        use openmls_traits::crypto::OpenMlsCrypto as _;

        let provider = OpenMlsRustCrypto::default();
        for suite in Suite::ALL {
            let pair = provider
                .crypto()
                .derive_hpke_keypair(suite.ciphersuite().hpke_config(), &[7; 32])
                .unwrap();
            assert_eq!(pair.public.len(), suite.kem_public_key_len(), "{suite:?}");
        }
    }

    #[test]
    fn names_and_code_points_round_trip() {
        assert_eq!(Suite::X25519.code(), 0x0001);
        assert_eq!(Suite::MlKem768X25519.code(), 0x004F);
        for suite in Suite::ALL {
            assert_eq!(Suite::from_name(suite.name()), Some(suite));
            assert_eq!(Suite::from_code(suite.code()), Some(suite));
            assert_eq!(Suite::from_ciphersuite(suite.ciphersuite()), Some(suite));
        }
        assert_eq!(Suite::from_name("kyber"), None);
        assert_eq!(Suite::from_code(0x0002), None);
    }
}
