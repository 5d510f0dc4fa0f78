//! A TLS client (1.3, or 1.2 with AES-128-GCM) that, once rustls has completed its handshake,
//! writes hand-made records with its own traffic keys: application data, handshake messages cut
//! at any byte and spread over any number of records (renegotiation ClientHellos, KeyUpdates),
//! alerts, padding up to the record limit (TLS 1.3). It is how
//! the tests and the `tls_engine` fuzz target attack the server's TLS layer with input no
//! well-behaved TLS library would produce. It never runs in the broker. Transport-agnostic: it
//! turns bytes into bytes, so it drives a socket or a [`super::engine::TlsEngine`] in memory.

use std::sync::{Arc, Mutex};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hmac;

/// TLS record content types.
pub mod content_type {
    /// change_cipher_spec
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    /// alert
    pub const ALERT: u8 = 21;
    /// handshake
    pub const HANDSHAKE: u8 = 22;
    /// application_data
    pub const APPLICATION_DATA: u8 = 23;
}

const HANDSHAKE_KEY_UPDATE: u8 = 24;
/// Largest inner plaintext of a TLS 1.3 record (2^14 + 1 for the content type).
pub const MAX_INNER_PLAINTEXT: usize = 16_384 + 1;

/// Traffic keys of one direction, following KeyUpdates.
struct Direction {
    secret: [u8; 32],
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

fn expand_label(secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
    // HKDF-Expand-Label (RFC 8446 §7.1) with an empty context, for outputs of one SHA-256 block.
    let mut info = Vec::with_capacity(4 + 6 + label.len());
    info.extend_from_slice(&(len as u16).to_be_bytes());
    info.push((6 + label.len()) as u8);
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(0);
    info.push(1);
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::sign(&key, &info).as_ref()[..len].to_vec()
}

impl Direction {
    fn new(secret: &[u8]) -> Direction {
        let mut s = [0u8; 32];
        s.copy_from_slice(&secret[..32]);
        let key = expand_label(&s, b"key", 16);
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&expand_label(&s, b"iv", 12));
        Direction {
            secret: s,
            // A 16-byte key always makes an AES-128 key.
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).expect("16-byte key")),
            iv,
            seq: 0,
        }
    }

    fn update(&mut self) {
        let next = expand_label(&self.secret, b"traffic upd", 32);
        *self = Direction::new(&next);
    }

    fn nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }
}

/// TLS 1.2 AES-GCM keys of one direction: explicit nonces, the sequence number in the AAD.
struct Gcm12 {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Gcm12 {
    fn new(seq: u64, secrets: rustls::ConnectionTrafficSecrets) -> Option<Gcm12> {
        let rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets else {
            return None;
        };
        let mut base = [0u8; 12];
        base.copy_from_slice(iv.as_ref());
        Some(Gcm12 {
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key.as_ref()).ok()?),
            iv: base,
            seq,
        })
    }

    fn aad(&self, content_type: u8, len: usize) -> [u8; 13] {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8] = content_type;
        aad[9] = 3;
        aad[10] = 3;
        aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
        aad
    }

    fn nonce(&self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }
}

/// The hand-held keys once the handshake is over.
enum Keys {
    Tls13 { tx: Direction, rx: Direction },
    Tls12 { tx: Gcm12, rx: Gcm12 },
}

#[derive(Debug, Default)]
struct Secrets(Mutex<Vec<(String, Vec<u8>)>>);

impl rustls::KeyLog for Secrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if let Ok(mut s) = self.0.lock() {
            s.push((label.to_string(), secret.to_vec()));
        }
    }

    fn will_log(&self, _label: &str) -> bool {
        true
    }
}

impl Secrets {
    fn get(&self, label: &str) -> Option<Vec<u8>> {
        let s = self.0.lock().ok()?;
        s.iter().find(|(l, _)| l == label).map(|(_, v)| v.clone())
    }
}

/// What the server sent, decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Application data.
    AppData(Vec<u8>),
    /// An alert: level and description.
    Alert(u8, u8),
    /// A post-handshake handshake message (KeyUpdates are applied).
    Handshake(Vec<u8>),
}

/// The forging client. See the module doc.
pub struct ForgedClient {
    /// rustls, until the handshake completes (a TLS 1.2 connection is consumed then).
    handshake: Option<rustls::ClientConnection>,
    secrets: Arc<Secrets>,
    keys: Option<Keys>,
    alpn: Option<Vec<u8>>,
    /// Server bytes not yet handled.
    from_server: Vec<u8>,
}

impl std::fmt::Debug for ForgedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgedClient")
            .field("open", &self.is_open())
            .finish()
    }
}

/// A complete record at the start of `bytes`: its length with header.
fn record_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 5 {
        return None;
    }
    let len = 5 + u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
    (bytes.len() >= len).then_some(len)
}

impl ForgedClient {
    /// A client of the development CA for `localhost`, TLS 1.3 with AES-128-GCM only, offering
    /// `alpn` (none when empty).
    pub fn new(alpn: &[&[u8]]) -> ForgedClient {
        ForgedClient::with_version(alpn, false)
    }

    /// The same over TLS 1.2 (ECDHE with AES-128-GCM).
    pub fn new_tls12(alpn: &[&[u8]]) -> ForgedClient {
        ForgedClient::with_version(alpn, true)
    }

    fn with_version(alpn: &[&[u8]], tls12: bool) -> ForgedClient {
        use rustls::crypto::ring::cipher_suite as suite;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(crate::tls::DEV_CA_PEM) {
            // The embedded dev CA parses; the library's own tests check it.
            roots.add(cert.expect("dev CA")).expect("dev CA");
        }
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = if tls12 {
            vec![
                suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ]
        } else {
            vec![suite::TLS13_AES_128_GCM_SHA256]
        };
        let version: &'static rustls::SupportedProtocolVersion = if tls12 {
            &rustls::version::TLS12
        } else {
            &rustls::version::TLS13
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .expect("one version with AES-128-GCM is a valid configuration")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_secret_extraction = tls12;
        let secrets = Arc::new(Secrets::default());
        config.key_log = secrets.clone();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("valid name");
        ForgedClient {
            handshake: Some(
                rustls::ClientConnection::new(Arc::new(config), name).expect("client connection"),
            ),
            secrets,
            keys: None,
            alpn: None,
            from_server: Vec::new(),
        }
    }

    /// True once the handshake is done and records are forged by hand.
    pub fn is_open(&self) -> bool {
        self.keys.is_some()
    }

    /// Handshake bytes the client wants to send.
    pub fn handshake_bytes(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(conn) = self.handshake.as_mut() {
            while conn.wants_write() {
                if conn.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        out
    }

    /// Feeds server bytes to the handshake, a record at a time, until it completes; later
    /// records stay for [`ForgedClient::read`].
    pub fn receive_handshake(&mut self, bytes: &[u8]) -> Result<(), rustls::Error> {
        self.from_server.extend_from_slice(bytes);
        while !self.is_open() {
            let Some(len) = record_len(&self.from_server) else {
                return Ok(());
            };
            let record: Vec<u8> = self.from_server.drain(..len).collect();
            let Some(conn) = self.handshake.as_mut() else {
                return Err(rustls::Error::General("no handshake in progress".into()));
            };
            let mut reader = &record[..];
            while !reader.is_empty() {
                conn.read_tls(&mut reader)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            conn.process_new_packets()?;
            if !conn.is_handshaking() {
                self.alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                self.keys = Some(self.take_keys()?);
            }
        }
        Ok(())
    }

    fn take_keys(&mut self) -> Result<Keys, rustls::Error> {
        let missing = || rustls::Error::General("traffic secrets not available".into());
        let tls12 = self.handshake.as_ref().and_then(|c| c.protocol_version())
            == Some(rustls::ProtocolVersion::TLSv1_2);
        if tls12 {
            let conn = self.handshake.take().ok_or_else(missing)?;
            let extracted = conn.dangerous_extract_secrets()?;
            let (tx_seq, tx) = extracted.tx;
            let (rx_seq, rx) = extracted.rx;
            return Ok(Keys::Tls12 {
                tx: Gcm12::new(tx_seq, tx).ok_or_else(missing)?,
                rx: Gcm12::new(rx_seq, rx).ok_or_else(missing)?,
            });
        }
        let c = self
            .secrets
            .get("CLIENT_TRAFFIC_SECRET_0")
            .ok_or_else(missing)?;
        let s = self
            .secrets
            .get("SERVER_TRAFFIC_SECRET_0")
            .ok_or_else(missing)?;
        Ok(Keys::Tls13 {
            tx: Direction::new(&c),
            rx: Direction::new(&s),
        })
    }

    /// The ALPN protocol the server chose.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// One encrypted record carrying `payload` as `content_type`, with `padding` zero bytes
    /// (TLS 1.3 only; the inner plaintext is cut to the TLS maximum). Empty until open.
    pub fn record(&mut self, content_type: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        match self.keys.as_mut() {
            None => Vec::new(),
            Some(Keys::Tls13 { tx, .. }) => {
                let mut inner = payload.to_vec();
                inner.push(content_type);
                let padding = padding.min(MAX_INNER_PLAINTEXT.saturating_sub(inner.len()));
                inner.resize(inner.len() + padding, 0);
                let len = inner.len() + AES_128_GCM.tag_len();
                let header = [
                    content_type::APPLICATION_DATA,
                    3,
                    3,
                    (len >> 8) as u8,
                    len as u8,
                ];
                let nonce = tx.nonce();
                // Sealing cannot fail for AES-GCM below its message limit.
                tx.key
                    .seal_in_place_append_tag(nonce, Aad::from(header), &mut inner)
                    .expect("seal");
                let mut out = header.to_vec();
                out.extend_from_slice(&inner);
                out
            }
            Some(Keys::Tls12 { tx, .. }) => {
                let payload = &payload[..payload.len().min(16_384)];
                let aad = tx.aad(content_type, payload.len());
                let nonce = tx.nonce();
                tx.seq += 1;
                let mut body = payload.to_vec();
                tx.key
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut body,
                    )
                    .expect("seal");
                let len = 8 + body.len();
                let mut out = vec![content_type, 3, 3, (len >> 8) as u8, len as u8];
                out.extend_from_slice(&nonce[4..]);
                out.extend_from_slice(&body);
                out
            }
        }
    }

    /// Application data in records of at most 16 KiB.
    pub fn app_data(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in data.chunks(16_384) {
            out.extend(self.record(content_type::APPLICATION_DATA, chunk, 0));
        }
        out
    }

    /// A handshake message of `msg_type` with `body`, cut into records of `per_record` bytes
    /// (at least 1), each padded by `padding`.
    pub fn handshake_message(
        &mut self,
        msg_type: u8,
        body: &[u8],
        per_record: usize,
        padding: usize,
    ) -> Vec<u8> {
        let mut msg = vec![msg_type];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(body);
        let mut out = Vec::new();
        for chunk in msg.chunks(per_record.clamp(1, 16_384)) {
            out.extend(self.record(content_type::HANDSHAKE, chunk, padding));
        }
        out
    }

    /// A KeyUpdate (asking the server to update too when `request`); later records use the
    /// new keys.
    pub fn key_update(&mut self, request: bool) -> Vec<u8> {
        let out = self.handshake_message(HANDSHAKE_KEY_UPDATE, &[u8::from(request)], 16, 0);
        if let Some(Keys::Tls13 { tx, .. }) = self.keys.as_mut() {
            tx.update();
        }
        out
    }

    /// An encrypted alert.
    pub fn alert(&mut self, level: u8, description: u8) -> Vec<u8> {
        self.record(content_type::ALERT, &[level, description], 0)
    }

    /// Decrypts the server's complete records received so far (and `bytes`), applying its
    /// KeyUpdates. Undecryptable records are reported as an `Alert(0, 0)` and skipped.
    pub fn read(&mut self, bytes: &[u8]) -> Vec<Received> {
        self.from_server.extend_from_slice(bytes);
        let mut out = Vec::new();
        while self.keys.is_some() {
            let Some(len) = record_len(&self.from_server) else {
                break;
            };
            let record: Vec<u8> = self.from_server.drain(..len).collect();
            match self.open(&record) {
                Some((kind, payload)) => out.push(match kind {
                    content_type::APPLICATION_DATA => Received::AppData(payload),
                    content_type::ALERT if payload.len() == 2 => {
                        Received::Alert(payload[0], payload[1])
                    }
                    _ => Received::Handshake(payload),
                }),
                None => out.push(Received::Alert(0, 0)),
            }
        }
        out
    }

    /// Decrypts one server record: its content type and payload.
    fn open(&mut self, record: &[u8]) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        header.copy_from_slice(&record[..5]);
        match self.keys.as_mut()? {
            Keys::Tls13 { rx, .. } => {
                let mut body = record[5..].to_vec();
                let nonce = rx.nonce();
                let plain = rx
                    .key
                    .open_in_place(nonce, Aad::from(header), &mut body)
                    .ok()?;
                let end = plain.iter().rposition(|&b| b != 0)?;
                let (kind, payload) = (plain[end], plain[..end].to_vec());
                if kind == content_type::HANDSHAKE && payload.first() == Some(&HANDSHAKE_KEY_UPDATE)
                {
                    rx.update();
                }
                Some((kind, payload))
            }
            Keys::Tls12 { rx, .. } => {
                if record.len() < 5 + 8 + 16 {
                    return None;
                }
                let mut nonce = rx.iv;
                nonce[4..].copy_from_slice(&record[5..13]);
                let aad = rx.aad(header[0], record.len() - 5 - 8 - 16);
                rx.seq += 1;
                let mut body = record[13..].to_vec();
                let plain = rx
                    .key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut body,
                    )
                    .ok()?;
                Some((header[0], plain.to_vec()))
            }
        }
    }
}

/// A client and a server engine for `config` with the handshake done in memory, for tests and
/// the fuzz target: the client's ClientHello, the server's flight, the client's Finished.
pub fn open_in_memory(
    mut client: ForgedClient,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<(ForgedClient, super::engine::TlsEngine)> {
    use super::engine::{Status, TlsEngine};
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let hello = client.handshake_bytes();
    let mut engine = TlsEngine::new(config, hello)?;
    engine.process()?;
    let flight = engine.unsent().to_vec();
    engine.sent(flight.len());
    client
        .receive_handshake(&flight)
        .map_err(|e| invalid(e.to_string()))?;
    if !client.is_open() {
        return Err(invalid("the client did not finish its handshake".into()));
    }
    let finished = client.handshake_bytes();
    match engine.receive(&finished)? {
        Status::Open => {}
        other => return Err(invalid(format!("the server is {other:?} after Finished"))),
    }
    // What the server queued with the handshake's end (TLS 1.3 session tickets) reaches the
    // client, as the async shell sends it before the handshake returns.
    let tail = engine.unsent().to_vec();
    engine.sent(tail.len());
    if client.read(&tail).contains(&Received::Alert(0, 0)) {
        return Err(invalid("a record after Finished does not decrypt".into()));
    }
    Ok((client, engine))
}
