//! The node's TLS certificate: a self-signed pair generated on first start
//! (with rcgen) and reused afterwards, so clients can pin it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// How long a process that finds a key without its certificate waits for
/// the certificate to appear: another process publishing a pair links the
/// certificate a moment after the key (both are fully written before
/// either is linked), so only a crash leaves the key alone for longer.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(2);

/// How often to look again while waiting for the certificate.
const PUBLISH_POLL: Duration = Duration::from_millis(10);

/// Loads the pair at `cert_path` / `key_path`, or generates a self-signed one
/// valid for [`DEFAULT_NAMES`] plus `extra_names` and writes it there when
/// neither file exists.
///
/// Safe against other processes doing the same at the same moment (several
/// nodes started together in one directory): exactly one pair is published,
/// and every caller returns that pair, never a certificate from one process
/// with a key from another. See [`publish`].
pub fn load_or_generate(
    cert_path: &Path,
    key_path: &Path,
    extra_names: &[String],
) -> Result<CertifiedKey, CertError> {
    if let Some(existing) = existing_pair(cert_path, key_path)? {
        return Ok(existing);
    }
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
    if publish(cert_path, key_path, generated.cert.der(), &key_der)? {
        return Ok(CertifiedKey {
            cert: generated.cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            generated: true,
        });
    }
    // Another process published its pair first: use that one, so one
    // `--ca-cert` trusts every node sharing these files.
    existing_pair(cert_path, key_path)?.ok_or_else(|| CertError::Io {
        path: key_path.to_owned(),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            "another process published this key and it was removed again",
        ),
    })
}

/// Reads a DER certificate, e.g. the node certificate a client trusts.
pub fn load_certificate(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    read_nonempty(path).map(CertificateDer::from)
}

/// The pair at the paths, or `None` when neither file exists. A key without
/// its certificate may be a pair another process is publishing right now,
/// so it is given [`PUBLISH_PATIENCE`] to complete before it is reported as
/// half a pair; a certificate without its key never is (the key is always
/// published first).
fn existing_pair(cert_path: &Path, key_path: &Path) -> Result<Option<CertifiedKey>, CertError> {
    let give_up = Instant::now() + PUBLISH_PATIENCE;
    loop {
        match (exists(cert_path)?, exists(key_path)?) {
            (true, true) => {
                return Ok(Some(CertifiedKey {
                    cert: load_certificate(cert_path)?,
                    key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read_nonempty(key_path)?)),
                    generated: false,
                }));
            }
            (false, false) => return Ok(None),
            (true, false) => {
                return Err(CertError::HalfPair {
                    present: cert_path.to_owned(),
                    missing: key_path.to_owned(),
                });
            }
            (false, true) if Instant::now() < give_up => std::thread::sleep(PUBLISH_POLL),
            (false, true) => {
                return Err(CertError::HalfPair {
                    present: key_path.to_owned(),
                    missing: cert_path.to_owned(),
                });
            }
        }
    }
}

/// Publishes a freshly generated pair unless another process published one
/// first; returns whether ours was published.
///
/// Both files are written in full to temporary files beside their final
/// names, then linked to those names with `hard_link`, which (unlike
/// `rename`) fails when the name exists, so nothing is ever replaced and no
/// reader sees a partly written file. The key is linked first and decides
/// the race: only its winner links a certificate, so a certificate on disk
/// always belongs to the key beside it.
fn publish(cert_path: &Path, key_path: &Path, cert: &[u8], key: &[u8]) -> Result<bool, CertError> {
    let key_temp = TempFile::write(key_path, key, true)?;
    let cert_temp = TempFile::write(cert_path, cert, false)?;
    match fs::hard_link(&key_temp.path, key_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(source) => {
            return Err(CertError::Io {
                path: key_path.to_owned(),
                source,
            });
        }
    }
    if let Err(source) = fs::hard_link(&cert_temp.path, cert_path) {
        // Our key without its certificate would be refused as half a pair
        // by every later start; it is ours (the link above created it), so
        // take it back.
        let _ = fs::remove_file(key_path);
        return Err(CertError::Io {
            path: cert_path.to_owned(),
            source,
        });
    }
    Ok(true)
}

/// Whether `path` exists; an error (e.g. a directory we may not read) is
/// reported rather than taken for "missing", which would generate a pair.
fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
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

/// A fully written and synced file with a name of its own beside its final
/// name (hard links cannot cross file systems); removed on drop, as the
/// final name, once linked, keeps the contents.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `bytes` to a new temporary file in the directory of `target`,
    /// creating the directory if needed; `private` makes it readable by its
    /// owner only.
    fn write(target: &Path, bytes: &[u8], private: bool) -> Result<TempFile, CertError> {
        // Unique among concurrent callers: the process id tells processes
        // apart, the counter threads and calls; `create_new` skips a name a
        // crashed process left behind.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let io_error = |source| CertError::Io {
            path: target.to_owned(),
            source,
        };
        let dir = target.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            fs::create_dir_all(dir).map_err(io_error)?;
        }
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut tries = 0;
        let (path, mut file) = loop {
            let unique = format!(
                ".{name}.{}.{}.tmp",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = dir.map_or_else(|| PathBuf::from(&unique), |dir| dir.join(&unique));
            match options.open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 100 => tries += 1,
                Err(source) => return Err(io_error(source)),
            }
        };
        // From here on the guard removes the file whatever happens.
        let temp = TempFile { path };
        file.write_all(bytes).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        Ok(temp)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: a leftover temporary file is harmless clutter.
        let _ = fs::remove_file(&self.path);
    }
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

    #[test]
    fn concurrent_generation_publishes_one_matching_pair_for_everyone() {
        const CALLERS: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("data/server-cert.der");
        let key = dir.path().join("data/server-key.der");
        let start = std::sync::Barrier::new(CALLERS);
        let pairs: Vec<CertifiedKey> = std::thread::scope(|scope| {
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        load_or_generate(&cert, &key, &[]).unwrap()
                    })
                })
                .collect();
            callers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert_eq!(pairs.iter().filter(|p| p.generated).count(), 1);
        let on_disk = (fs::read(&cert).unwrap(), fs::read(&key).unwrap());
        for pair in &pairs {
            assert_eq!(pair.cert.as_ref(), on_disk.0.as_slice());
            assert_eq!(pair.key.secret_der(), on_disk.1.as_slice());
        }
        let provider = crate::transport::crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(pairs[0].key.clone_key())
            .unwrap();
        rustls::sign::CertifiedKey::new(vec![pairs[0].cert.clone()], signing_key)
            .keys_match()
            .unwrap();
        // Every temporary file was cleaned up.
        let mut left: Vec<_> = fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["server-cert.der", "server-key.der"]);
    }

    #[test]
    fn a_key_whose_certificate_is_being_published_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.der");
        let key = dir.path().join("key.der");
        let theirs = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        fs::write(&key, theirs.signing_key.serialize_der()).unwrap();
        let publisher = std::thread::spawn({
            let cert = cert.clone();
            let der = theirs.cert.der().to_vec();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                fs::write(cert, der).unwrap();
            }
        });
        let loaded = load_or_generate(&cert, &key, &[]).unwrap();
        publisher.join().unwrap();
        assert!(!loaded.generated);
        assert_eq!(&loaded.cert, theirs.cert.der());
        assert_eq!(loaded.key.secret_der(), theirs.signing_key.serialize_der());
    }

    #[test]
    fn a_key_left_alone_is_reported_as_half_a_pair_after_a_short_wait() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.der");
        let key = dir.path().join("key.der");
        fs::write(&key, b"a key").unwrap();
        let started = Instant::now();
        let err = load_or_generate(&cert, &key, &[]).unwrap_err();
        assert!(
            matches!(&err, CertError::HalfPair { present, .. } if *present == key),
            "{err}"
        );
        assert!(started.elapsed() >= PUBLISH_PATIENCE);
        assert!(!cert.exists());
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
