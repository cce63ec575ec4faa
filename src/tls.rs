//! TLS material: each tenant's certificate (configured, or issued by the
//! data dir's local CA), chosen by SNI, and the
//! root store outbound connections verify against (system roots plus
//! `tls.trust_roots`; there is deliberately no "skip verification").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::{Error, Result};
use crate::ids::ServerName;

pub const SELF_SIGNED_CERT_FILE: &str = "tls-cert.pem";
pub const SELF_SIGNED_KEY_FILE: &str = "tls-key.pem";
pub const LOCAL_CA_CERT_FILE: &str = "tls-ca.pem";
pub const LOCAL_CA_KEY_FILE: &str = "tls-ca-key.pem";

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

/// Where a tenant's certificate comes from: the configured pair, or one
/// issued by the data dir's local CA (self-signed mode, SPEC §14) and kept
/// in `leaf_dir` (the data dir for the first tenant, its tenant dir for
/// the others), made on first use.
pub(crate) fn certificate_paths(
    configured: Option<(&Path, &Path)>,
    data_dir: &Path,
    leaf_dir: &Path,
    server_name: &ServerName,
) -> Result<(PathBuf, PathBuf)> {
    if let Some((c, k)) = configured {
        return Ok((c.to_path_buf(), k.to_path_buf()));
    }
    let cert_path = leaf_dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = leaf_dir.join(SELF_SIGNED_KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        let ca = local_ca(data_dir)?;
        let mut names = vec![server_name.host().to_string()];
        if server_name.host() != "localhost" {
            names.push("localhost".into());
        }
        let key = rcgen::KeyPair::generate().map_err(|e| Error::internal("tls key", e))?;
        let cert = rcgen::CertificateParams::new(names)
            .and_then(|p| p.signed_by(&key, &ca))
            .map_err(|e| Error::internal("issue a certificate", e))?;
        std::fs::create_dir_all(leaf_dir).map_err(|e| Error::internal("tenant dir", e))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&cert_path, cert.pem().as_bytes())?;
        tracing::info!(path = %cert_path.display(), ca = %data_dir.join(LOCAL_CA_CERT_FILE).display(), "issued a TLS certificate from the local CA; peers trust it once they add the CA file to tls.trust_roots");
    }
    Ok((cert_path, key_path))
}

/// The distinguished name of every local CA: fixed, so the issuer can be
/// rebuilt from its key alone (the leaf names it, and its key identifier
/// comes from the key).
fn local_ca_params() -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| Error::internal("local CA", e))?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "scaiwave local CA");
    Ok(params)
}

/// The data dir's local CA, made on first use: `tls-ca.pem` (what peers
/// add to `tls.trust_roots`) and its key `tls-ca-key.pem`.
fn local_ca(data_dir: &Path) -> Result<rcgen::Issuer<'static, rcgen::KeyPair>> {
    let cert_path = data_dir.join(LOCAL_CA_CERT_FILE);
    let key_path = data_dir.join(LOCAL_CA_KEY_FILE);
    let params = local_ca_params()?;
    if cert_path.exists() && key_path.exists() {
        let pem = std::fs::read_to_string(&key_path)
            .map_err(|e| Error::bad_request(format!("cannot read {}: {e}", key_path.display())))?;
        let key = rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| Error::bad_request(format!("{} is not a key: {e}", key_path.display())))?;
        return Ok(rcgen::Issuer::new(params, key));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| Error::internal("local CA key", e))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::internal("local CA", e))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_private(&cert_path, cert.pem().as_bytes())?;
    tracing::info!(path = %cert_path.display(), "created the local TLS CA");
    Ok(rcgen::Issuer::new(params, key))
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

/// A certificate and its key, checked to form a pair.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>> {
    let ck =
        CertifiedKey::from_der(read_certs(cert)?, read_key(key)?, &provider()).map_err(|e| {
            Error::bad_request(format!(
                "the TLS certificate {} and key {} do not form a pair: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(ck))
}

/// Each tenant's certificate, chosen by the SNI of the handshake (SPEC
/// §14). A hello naming no tenant gets the first tenant's: the request it
/// carries is then refused by name (§4 step 2), not by a failed handshake.
#[derive(Debug)]
pub struct Certificates {
    first: Arc<CertifiedKey>,
    /// host → certificate. A std lock: written when a tenant is created,
    /// never held across `.await`.
    by_host: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Certificates {
    pub fn new(first_host: &str, first: Arc<CertifiedKey>) -> Arc<Certificates> {
        let by_host = HashMap::from([(first_host.to_ascii_lowercase(), first.clone())]);
        Arc::new(Certificates {
            first,
            by_host: RwLock::new(by_host),
        })
    }

    pub fn add(&self, host: &str, ck: Arc<CertifiedKey>) {
        self.by_host
            .write()
            .expect("certificates lock")
            .insert(host.to_ascii_lowercase(), ck);
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let named = hello.server_name().and_then(|sni| {
            self.by_host
                .read()
                .expect("certificates lock")
                .get(&sni.to_ascii_lowercase())
                .cloned()
        });
        Some(named.unwrap_or_else(|| self.first.clone()))
    }
}

/// The rustls server configuration (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(certs: Arc<Certificates>) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal("tls versions", e))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
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
