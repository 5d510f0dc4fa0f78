//! Certificates → `rustls` configurations, built once at start and shared behind an `Arc`.
//! TLS 1.3 and 1.2 with the `ring` provider, ALPN `presence/1`. The development CA and server
//! certificate from `certs-dev/` are embedded so the broker and `presencectl` run with no files
//! at all; production deployments point `[tls]` at their own. Handshakes themselves run in each
//! connection's task (see `connection`), never here.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::TlsConfig;

/// The ALPN protocol id of this wire protocol.
pub const ALPN: &[u8] = b"presence/1";

/// The development CA certificate (`certs-dev/ca.pem`).
pub const DEV_CA_PEM: &[u8] = include_bytes!("../certs-dev/ca.pem");
const DEV_SERVER_CERT_PEM: &[u8] = include_bytes!("../certs-dev/server.pem");
const DEV_SERVER_KEY_PEM: &[u8] = include_bytes!("../certs-dev/server.key");

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed as PEM.
    #[error("cannot load {what} from {path}: {detail}")]
    Load {
        /// "certificate", "private key" or "CA".
        what: &'static str,
        /// Where from.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the material.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's provider: AES-128-GCM with SHA-256 first. Its key schedule hashes with SHA-256,
/// which CPUs accelerate, where AES-256's SHA-384 runs in software; that is a visible share of
/// every handshake in a reconnect storm, for no security a presence service needs.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

fn load_err(what: &'static str, path: &str, detail: impl ToString) -> TlsError {
    TlsError::Load {
        what,
        path: path.to_string(),
        detail: detail.to_string(),
    }
}

fn parse_certs(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err("certificate", origin, e))?;
    if certs.is_empty() {
        return Err(load_err("certificate", origin, "no CERTIFICATE block"));
    }
    Ok(certs)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| load_err(what, &path.display().to_string(), e))
}

/// True when `config` names no certificate, so the embedded development one is used.
pub fn uses_dev_certificate(config: &TlsConfig) -> bool {
    config.cert.is_none()
}

/// The server side: the configured certificate and key, or the embedded dev pair.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert_pem, key_pem, origin) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (
            read(cert, "certificate")?,
            read(key, "private key")?,
            cert.display().to_string(),
        ),
        _ => (
            DEV_SERVER_CERT_PEM.to_vec(),
            DEV_SERVER_KEY_PEM.to_vec(),
            "embedded dev certificate".to_string(),
        ),
    };
    let certs = parse_certs(&cert_pem, &origin)?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| load_err("private key", &origin, e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.ignore_client_order = true;
    // Sessions are long-lived; resumption tickets would only cost memory per connection.
    server.send_tls13_tickets = 0;
    Ok(Arc::new(server))
}

/// The client side: trusts the CA in `ca_pem` (PEM bytes) and offers ALPN `presence/1`.
pub fn client_config_from_pem(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA")? {
        roots.add(cert)?;
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(client))
}

/// The client side trusting the CA file at `path`.
pub fn client_config_from_file(path: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_from_pem(&read(path, "CA")?)
}

/// The client side trusting the embedded development CA.
pub fn dev_client_config() -> Arc<rustls::ClientConfig> {
    // The embedded CA is part of the build and is checked by the tests; it always parses.
    client_config_from_pem(DEV_CA_PEM).expect("embedded dev CA parses")
}

/// Parses a host name or IP address for SNI and certificate checks.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string()).map_err(|e| load_err("server name", host, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_dev_material_loads() {
        server_config(&TlsConfig::default()).unwrap();
        dev_client_config();
    }

    #[test]
    fn missing_files_are_errors() {
        let config = TlsConfig {
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
        };
        let err = server_config(&config).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
