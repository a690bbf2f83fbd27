//! The node's TLS certificate: a self-signed pair generated on first start
//! (with rcgen) and reused afterwards, so clients can pin it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Names a generated certificate is always valid for.
pub const DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Errors loading or generating a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// Only one of the certificate and the key exists; generating a new pair
    /// would silently replace the one that does.
    #[error(
        "{present} exists but {missing} does not; restore {missing} or remove {present} to generate a new pair"
    )]
    HalfPair {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// rcgen could not build the certificate.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file exists but is empty, so it cannot be a DER certificate or key.
    #[error("{0} is empty; expected a DER-encoded certificate or key")]
    Empty(PathBuf),
}

/// A certificate and its private key, both DER.
#[derive(Debug)]
pub struct CertifiedKey {
    /// The certificate the node presents.
    pub cert: CertificateDer<'static>,
    /// Its PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// Whether this call generated the pair (rather than loading it).
    pub generated: bool,
}

/// Loads the pair at `cert_path` / `key_path`, or generates a self-signed one
/// valid for [`DEFAULT_NAMES`] plus `extra_names` and writes it there when
/// neither file exists.
pub fn load_or_generate(
    cert_path: &Path,
    key_path: &Path,
    extra_names: &[String],
) -> Result<CertifiedKey, CertError> {
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => Ok(CertifiedKey {
            cert: load_certificate(cert_path)?,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read_nonempty(key_path)?)),
            generated: false,
        }),
        (true, false) => Err(CertError::HalfPair {
            present: cert_path.to_owned(),
            missing: key_path.to_owned(),
        }),
        (false, true) => Err(CertError::HalfPair {
            present: key_path.to_owned(),
            missing: cert_path.to_owned(),
        }),
        (false, false) => {
            let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|n| n.to_string()).collect();
            names.extend(
                extra_names
                    .iter()
                    .filter(|n| !names.contains(n))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            let generated = rcgen::generate_simple_self_signed(names)?;
            let key_der = generated.signing_key.serialize_der();
            // Key first and private: if writing the certificate fails, the
            // next start reports the half pair instead of serving a key that
            // no certificate matches.
            write_file(key_path, &key_der, true)?;
            write_file(cert_path, generated.cert.der(), false)?;
            Ok(CertifiedKey {
                cert: generated.cert.der().clone(),
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
                generated: true,
            })
        }
    }
}

/// Reads a DER certificate, e.g. the node certificate a client trusts.
pub fn load_certificate(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    read_nonempty(path).map(CertificateDer::from)
}

fn read_nonempty(path: &Path) -> Result<Vec<u8>, CertError> {
    let bytes = fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(CertError::Empty(path.to_owned()));
    }
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place,
/// so a crash never leaves a truncated certificate or key.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), CertError> {
    let io_error = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_error)?;
    }
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    fs::rename(&tmp, path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses_the_pair() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("sub/cert.der");
        let key = dir.path().join("sub/key.der");
        let first = load_or_generate(&cert, &key, &["node.example".into()]).unwrap();
        assert!(first.generated);
        let second = load_or_generate(&cert, &key, &[]).unwrap();
        assert!(!second.generated);
        assert_eq!(first.cert, second.cert);
        assert_eq!(first.key.secret_der(), second.key.secret_der());
    }

    #[test]
    fn refuses_to_replace_half_a_pair() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.der");
        let key = dir.path().join("key.der");
        fs::write(&cert, b"not really").unwrap();
        let err = load_or_generate(&cert, &key, &[]).unwrap_err();
        assert!(matches!(err, CertError::HalfPair { .. }), "{err}");
        assert_eq!(fs::read(&cert).unwrap(), b"not really");
    }

    #[cfg(unix)]
    #[test]
    fn private_key_is_readable_by_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.der");
        load_or_generate(&dir.path().join("cert.der"), &key, &[]).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
