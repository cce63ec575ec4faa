//! TLS material: the server certificate (configured or self-signed) and the
//! root store outbound connections verify against (system roots plus
//! `tls.trust_roots`; there is deliberately no "skip verification").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};
use crate::ids::ServerName;

pub const SELF_SIGNED_CERT_FILE: &str = "tls-cert.pem";
pub const SELF_SIGNED_KEY_FILE: &str = "tls-key.pem";

/// Install the process-wide crypto provider once (ring). Safe to call again.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::bad_request(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::bad_request(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::bad_request(format!(
            "cannot read the private key in {}: {e}",
            path.display()
        ))
    })
}

/// Where the certificate comes from: the configured pair, or a self-signed
/// one kept in the data dir (created on first start).
pub(crate) fn certificate_paths(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
    server_name: &ServerName,
) -> Result<(PathBuf, PathBuf)> {
    if let (Some(c), Some(k)) = (cert, key) {
        return Ok((c.to_path_buf(), k.to_path_buf()));
    }
    let cert_path = data_dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = data_dir.join(SELF_SIGNED_KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        let mut names = vec![server_name.host().to_string()];
        if server_name.host() != "localhost" {
            names.push("localhost".into());
        }
        let ck = rcgen::generate_simple_self_signed(names)
            .map_err(|e| Error::internal("self-signed certificate", e))?;
        write_private(&key_path, ck.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, ck.cert.pem())
            .map_err(|e| Error::internal("write certificate", e))?;
        tracing::info!(path = %cert_path.display(), "created a self-signed TLS certificate; peers will not trust it unless they add it to tls.trust_roots");
    }
    Ok((cert_path, key_path))
}

/// Write a file only its owner can read (keys, tokens).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::internal("write private file", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::internal("write private file", e))
}

/// The rustls server configuration (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs = read_certs(cert)?;
    let key = read_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal("tls versions", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            Error::bad_request(format!(
                "the TLS certificate and key do not form a pair: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client configuration for outbound S2S: system roots + trust_roots.
pub fn client_config(trust_roots: &[PathBuf]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    for path in trust_roots {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| {
                Error::bad_request(format!(
                    "tls.trust_roots: {} is not a usable CA certificate: {e}",
                    path.display()
                ))
            })?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal("tls versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
