//! Certificates → `rustls` configurations, built once at start and shared behind an `Arc`.
//! TLS 1.3 and 1.2 with the `ring` provider, ALPN `presence/1`, stateless session tickets
//! (`tls_tickets`) unless `[tls] tickets = false`, never 0-RTT. The development CA and server
//! certificate from `certs-dev/` are embedded so the broker and `presencectl` run with no files
//! at all; production deployments point `[tls]` at their own. Handshakes themselves run in each
//! connection's task (see `connection`), never here.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::TlsConfig;
use crate::tls_tickets::{TicketError, TicketKeys};

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
    /// The session-ticket keys could not be set up.
    #[error(transparent)]
    Tickets(#[from] TicketError),
}

/// TLS 1.3 tickets sent after each handshake (full or resumed). A client spends one per
/// resumption (RFC 8446 recommends single use; rustls clients do so), so with one ticket a
/// reconnect that dies after its ClientHello leaves the phone with none and its next attempt
/// pays a full handshake; the second ticket covers that, common on mobile networks. Each costs
/// the server one AES-GCM seal (about a microsecond) and ~200 bytes on the wire; more than two
/// would only cover parallel connections, which a presence client does not open.
pub const TLS13_TICKETS_PER_HANDSHAKE: usize = 2;

/// TLS 1.2 sessions remembered by id when tickets are off (one shared, bounded cache, never
/// per connection). With tickets on, 1.2 clients resume by ticket and nothing is stored.
pub const TLS12_SESSION_CACHE: usize = 256;

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

/// The server side: the configured certificate and key, or the embedded dev pair, with the
/// session tickets `config` asks for (a single node's: see [`server_config_with_tickets`]).
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with_tickets(config, TicketKeys::from_config(config, false)?)
}

/// The server side with `tickets` as its ticket keys (`None`: no tickets, as with
/// `tickets = false`). The keys are shared with the cluster link in cluster mode.
pub fn server_config_with_tickets(
    config: &TlsConfig,
    tickets: Option<Arc<TicketKeys>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
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
    match tickets {
        Some(keys) => {
            // Stateless: the ticket carries the sealed session, the server keeps nothing.
            server.ticketer = keys;
            server.send_tls13_tickets = TLS13_TICKETS_PER_HANDSHAKE;
            server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
        None => {
            server.send_tls13_tickets = 0;
            server.session_storage =
                rustls::server::ServerSessionMemoryCache::new(TLS12_SESSION_CACHE);
        }
    }
    // No 0-RTT. Early data can be replayed by anyone on the path, and the first frame here is
    // Connect: a replay would take over the device's live session (and any request after it
    // could change presence twice). rustls also refuses early data with stateless tickets,
    // since RFC 8446 8.1's anti-replay needs server state; keep both reasons in mind before
    // turning it on.
    server.max_early_data_size = 0;
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

/// The client side trusting the embedded development CA. Its resumption store (rustls's
/// default, 256 sessions in memory) belongs to this value: clients built from one call resume
/// each other's sessions, clients from separate calls do not.
pub fn dev_client_config() -> Arc<rustls::ClientConfig> {
    // The embedded CA is part of the build and is checked by the tests; it always parses.
    client_config_from_pem(DEV_CA_PEM).expect("embedded dev CA parses")
}

/// A copy of `config` with a resumption store of its own holding up to `sessions` sessions (a
/// simulated phone: tickets it received are offered on its reconnects; 0 turns resumption
/// off). The copy shares everything else with `config`.
pub fn with_resumption(
    config: &rustls::ClientConfig,
    sessions: usize,
) -> Arc<rustls::ClientConfig> {
    let mut config = config.clone();
    config.resumption = if sessions == 0 {
        rustls::client::Resumption::disabled()
    } else {
        rustls::client::Resumption::in_memory_sessions(sessions)
    };
    Arc::new(config)
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
            ..TlsConfig::default()
        };
        let err = server_config(&config).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
        let config = TlsConfig {
            ticket_secret_file: Some("/nonexistent/ticket.key".into()),
            ..TlsConfig::default()
        };
        let err = server_config(&config).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ticket.key"), "{err}");
    }

    #[test]
    fn tickets_are_stateless_and_never_allow_early_data() {
        let on = server_config(&TlsConfig::default()).unwrap();
        assert!(on.ticketer.enabled());
        assert_eq!(on.send_tls13_tickets, TLS13_TICKETS_PER_HANDSHAKE);
        assert!(
            !on.session_storage.can_cache(),
            "no per-session server memory"
        );
        assert_eq!(on.max_early_data_size, 0);
        let off = server_config(&TlsConfig {
            tickets: false,
            ..TlsConfig::default()
        })
        .unwrap();
        assert!(!off.ticketer.enabled());
        assert_eq!(off.send_tls13_tickets, 0);
        assert_eq!(off.max_early_data_size, 0);
    }
}
