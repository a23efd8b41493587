//! TLS material read once at start and checked with rustls: the certificate chain parses, the
//! key parses and belongs to the certificate, the client CA file holds at least one certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// A TLS file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("TLS {what} {path}: cannot read it: {error}")]
    Read {
        /// Which file (`certificate (--tls-cert)`, ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file was read but does not hold what it should.
    #[error("TLS {what} {path}: {problem}")]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

const CERT: &str = "certificate (--tls-cert)";
const KEY: &str = "key (--tls-key)";
const CLIENT_CA: &str = "client CA (--tls-client-ca)";

/// TLS files, read and checked; the same material configures tonic (gRPC) and rustls (web).
pub struct LoadedTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    web: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for LoadedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })
}

fn invalid(what: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            what,
            path,
            "holds no certificate (expected \"-----BEGIN CERTIFICATE-----\")",
        ));
    }
    Ok(certs)
}

/// ring, explicitly: the provider tonic's `tls-ring` uses too, and no process-wide default to
/// depend on. (rustls 0.23.48 deprecates it for lacking post-quantum key exchange, which only
/// aws-lc-rs offers; that needs a C toolchain and cmake to build.)
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl LoadedTls {
    /// Reads the files `config` names and checks them.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file: unreadable, not PEM, no certificate or key in it, a key
    /// that does not match the certificate, a client CA that is not a CA certificate.
    pub fn load(config: &TlsConfig) -> Result<LoadedTls, TlsError> {
        let cert_pem = read(CERT, &config.cert)?;
        let key_pem = read(KEY, &config.key)?;
        let certs = certificates(CERT, &config.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            invalid(
                KEY,
                &config.key,
                format!("no private key in it (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            )
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| invalid(CERT, &config.cert, e.to_string()))?;
        let (builder, client_ca_pem) = match &config.client_ca {
            Some(path) => {
                let pem = read(CLIENT_CA, path)?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(CLIENT_CA, path, &pem)? {
                    roots
                        .add(cert)
                        .map_err(|e| invalid(CLIENT_CA, path, e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| invalid(CLIENT_CA, path, e.to_string()))?;
                (
                    builder.with_client_cert_verifier(verifier),
                    Some(pem.clone()),
                )
            }
            None => (builder.with_no_client_auth(), None),
        };
        let mut web = builder.with_single_cert(certs, key).map_err(|e| {
            invalid(
                KEY,
                &config.key,
                format!(
                    "cannot be used with the certificate {}: {e}",
                    config.cert.display()
                ),
            )
        })?;
        web.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(LoadedTls {
            cert_pem,
            key_pem,
            client_ca_pem,
            web: Arc::new(web),
        })
    }

    /// True when clients must present a certificate (mTLS).
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The rustls configuration of the web server (ALPN `h2`, `http/1.1`).
    pub fn web_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.web)
    }

    /// The gRPC server's TLS configuration.
    #[cfg(feature = "grpc")]
    pub fn grpc_config(&self) -> tonic::transport::ServerTlsConfig {
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(super::HEADER_READ_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        config
    }

    /// The TLS configuration a cluster process calls its peers with (they serve with the same
    /// kind of material): it trusts the client CA (`--tls-client-ca`) if one is set, else every
    /// certificate of the server's own `--tls-cert` file (a self-signed certificate, or a chain
    /// that ends with the CA that signed the peers' certificates), and presents the server's
    /// certificate and key as its client identity when clients must present one (mTLS; the
    /// certificate then needs the `clientAuth` extended key usage too).
    #[cfg(feature = "grpc")]
    pub fn grpc_client_config(&self) -> tonic::transport::ClientTlsConfig {
        let root = self.client_ca_pem.as_ref().unwrap_or(&self.cert_pem);
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(root));
        if self.requires_client_certificates() {
            config = config.identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ));
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, cert: &str, key: &str, ca: Option<&str>) -> TlsConfig {
        TlsConfig {
            cert: dir.join(cert),
            key: dir.join(key),
            client_ca: ca.map(|c| dir.join(c)),
        }
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        std::fs::write(dir.path().join("junk.pem"), "hello\n").unwrap();

        let err = LoadedTls::load(&config(dir.path(), "missing.pem", "empty.pem", None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        assert!(err.contains("missing.pem"), "{err}");
        assert!(err.contains("cannot read"), "{err}");

        let err = LoadedTls::load(&config(dir.path(), "junk.pem", "empty.pem", None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        assert!(err.contains("no certificate"), "{err}");
    }
}
