//! Optional TLS (`--tls-cert`, `--tls-key`), so that a small deployment needs no proxy in
//! front: rustls with its ring provider, TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 announced by
//! ALPN. The certificate file holds the chain in PEM (leaf first), the key file one PEM
//! private key (PKCS #8, PKCS #1 or SEC1).
//!
//! The certificate can be replaced while the server runs (a [`ReloadStep`]: on SIGHUP and
//! `POST /admin/reload`): handshakes from then on present the new one; connections already open keep
//! the session they have. A reload that fails (a missing file, a key that does not match)
//! leaves the certificate in use as it was.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::reload::ReloadStep;

/// The server's certificate and key, as last read from their files.
#[derive(Debug)]
pub struct Certificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Reads the certificate chain and key; the error names the file and what is wrong.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Certificate>, String> {
        let provider = Arc::new(ring::default_provider());
        let current = read(cert_path, key_path, &provider)?;
        Ok(Arc::new(Certificate {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: RwLock::new(Arc::new(current)),
        }))
    }

    /// The acceptor of TLS connections presenting this certificate.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Reads the files again; new handshakes present what they hold. On an error the
/// certificate in use stays.
impl ReloadStep for Certificate {
    fn name(&self) -> &'static str {
        "TLS certificate"
    }

    fn reload(&self) -> Result<String, String> {
        let fresh = read(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(format!(
            "{} with the key {}",
            self.cert_path.display(),
            self.key_path.display()
        ))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// Reads a chain and its key, and checks that the key is the leaf certificate's.
fn read(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("--tls-cert {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no PEM certificate in the file",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("--tls-key {}: {e}", key_path.display()))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        format!(
            "--tls-cert {} / --tls-key {}: {e}",
            cert_path.display(),
            key_path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn leaf(certificate: &Certificate) -> CertificateDer<'static> {
        certificate.current.read().unwrap().cert[0].clone()
    }

    #[test]
    fn a_reload_presents_the_new_files_and_a_failed_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::copy(fixture("cert.pem"), &cert).unwrap();
        std::fs::copy(fixture("key.pem"), &key).unwrap();
        let certificate = Certificate::load(&cert, &key).unwrap();
        let first = leaf(&certificate);

        std::fs::copy(fixture("public-name-cert.pem"), &cert).unwrap();
        // The new chain with the old key: refused, the old pair stays.
        let error = certificate.reload().unwrap_err();
        assert!(error.contains("--tls-key"), "{error}");
        assert_eq!(leaf(&certificate), first);

        std::fs::copy(fixture("public-name-key.pem"), &key).unwrap();
        certificate.reload().unwrap();
        assert_ne!(leaf(&certificate), first);

        std::fs::remove_file(&cert).unwrap();
        let error = certificate.reload().unwrap_err();
        assert!(error.contains("--tls-cert"), "{error}");
        assert_ne!(leaf(&certificate), first);
    }
}
