//! TLS session resumption through real sockets: a reconnecting client resumes with a ticket
//! (TLS 1.3 and 1.2) and its session works; an idle connection has its tickets right after the
//! handshake; a ticket from a broker with another secret means a full handshake that still
//! works; brokers sharing a secret file, and cluster nodes sharing the cluster's secret through
//! NATS, resume each other's tickets (also a node started after the ticket was issued); with
//! `tickets = false` nothing resumes; handshakes are counted by kind. An ignored test measures
//! the server's CPU time per full and per resumed handshake in memory
//! (`cargo test --release --test tls_resumption -- --ignored --nocapture`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Node;
use common::nats::NatsCluster;
use common::*;
use futures_util::StreamExt;
use presenced::client::{tls_connect, ClientCodec};
use presenced::codec::encode_delimited;
use presenced::pb::{self, client_frame::Body as C, server_frame::Body as S};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::pki_types::ServerName;
use rustls::HandshakeKind::{self, Full, Resumed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::codec::FramedRead;

/// A client's resumption store that counts the TLS 1.3 tickets it receives and wakes waiters.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tls13_tickets: AtomicUsize,
    tls12_sessions: AtomicUsize,
    changed: Notify,
}

impl CountingStore {
    fn new() -> Arc<CountingStore> {
        Arc::new(CountingStore {
            inner: ClientSessionMemoryCache::new(32),
            tls13_tickets: AtomicUsize::new(0),
            tls12_sessions: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    fn tls13_tickets(&self) -> usize {
        self.tls13_tickets.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` TLS 1.3 tickets have arrived in all.
    async fn wait_for_tickets(&self, n: usize) {
        within(async {
            loop {
                let changed = self.changed.notified();
                if self.tls13_tickets() >= n {
                    return;
                }
                changed.await;
            }
        })
        .await
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.tls12_sessions.fetch_add(1, Ordering::SeqCst);
        self.inner.set_tls12_session(server_name, value)
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value);
        self.tls13_tickets.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// A phone's TLS configuration: the dev CA, TLS 1.3 and 1.2, resumption through `store`.
fn phone(store: &Arc<CountingStore>) -> Arc<rustls::ClientConfig> {
    let mut config = (*presenced::tls::dev_client_config()).clone();
    config.resumption = Resumption::store(store.clone());
    Arc::new(config)
}

/// The same over TLS 1.2 only.
fn tls12_phone(store: &Arc<CountingStore>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(presenced::tls::DEV_CA_PEM) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![presenced::tls::ALPN.to_vec()];
    config.resumption = Resumption::store(store.clone());
    Arc::new(config)
}

fn connect_frame(user: &str) -> Vec<u8> {
    encode_delimited(&pb::ClientFrame {
        request_id: 1,
        body: Some(C::Connect(pb::Connect {
            token: token(user),
            device_id: "phone".into(),
            ..Default::default()
        })),
    })
    .to_vec()
}

/// Opens a TLS connection with `config`, sends Connect for `user`, reads the ConnAck (the
/// tickets arrive before it), closes cleanly and returns how the handshake went.
async fn session(addr: SocketAddr, config: Arc<rustls::ClientConfig>, user: &str) -> HandshakeKind {
    let stream = within(tls_connect(addr, "localhost", config))
        .await
        .unwrap();
    let kind = stream.get_ref().1.handshake_kind().expect("handshake done");
    let (read, mut write) = tokio::io::split(stream);
    write.write_all(&connect_frame(user)).await.unwrap();
    let mut reader = FramedRead::new(read, ClientCodec::new(1 << 20));
    let frame = within(reader.next()).await.unwrap().unwrap();
    assert!(
        matches!(frame.body, Some(S::ConnAck(_))),
        "the session works after a {kind:?} handshake: {frame:?}"
    );
    let mut stream = reader.into_inner().unsplit(write);
    let _ = within(stream.shutdown()).await;
    kind
}

#[tokio::test]
async fn a_reconnecting_client_resumes_with_a_ticket_over_tls13() {
    let broker = start(|_| {}).await;
    let store = CountingStore::new();
    let config = phone(&store);
    assert_eq!(session(broker.addr, config.clone(), "alice").await, Full);
    assert_eq!(
        store.tls13_tickets(),
        presenced::tls::TLS13_TICKETS_PER_HANDSHAKE
    );
    // Every resumed handshake brings fresh tickets: the phone keeps resuming.
    for _ in 0..3 {
        assert_eq!(session(broker.addr, config.clone(), "alice").await, Resumed);
    }
    assert_eq!(
        store.tls13_tickets(),
        4 * presenced::tls::TLS13_TICKETS_PER_HANDSHAKE
    );
}

#[tokio::test]
async fn an_idle_connection_receives_its_tickets_right_after_the_handshake() {
    let broker = start(|_| {}).await;
    let store = CountingStore::new();
    let config = phone(&store);
    let mut idle = within(tls_connect(broker.addr, "localhost", config.clone()))
        .await
        .unwrap();
    // The client sends nothing; the server has nothing to say before Connect. Reading only
    // lets the client process what arrives: the tickets.
    let mut buf = [0u8; 64];
    tokio::select! {
        _ = store.wait_for_tickets(presenced::tls::TLS13_TICKETS_PER_HANDSHAKE) => {}
        r = idle.read(&mut buf) => panic!("the server sent data or closed first: {r:?}"),
    }
    assert_eq!(session(broker.addr, config, "bob").await, Resumed);
    drop(idle);
}

#[tokio::test]
async fn a_tls12_client_resumes_with_a_ticket() {
    let broker = start(|_| {}).await;
    let store = CountingStore::new();
    let config = tls12_phone(&store);
    assert_eq!(session(broker.addr, config.clone(), "carol").await, Full);
    assert_eq!(store.tls12_sessions.load(Ordering::SeqCst), 1);
    assert_eq!(session(broker.addr, config.clone(), "carol").await, Resumed);
    assert_eq!(session(broker.addr, config, "carol").await, Resumed);
}

#[tokio::test]
async fn a_ticket_from_a_broker_with_another_secret_means_a_full_handshake_that_works() {
    let first = start(|_| {}).await;
    let second = start(|_| {}).await;
    let store = CountingStore::new();
    let config = phone(&store);
    assert_eq!(session(first.addr, config.clone(), "dave").await, Full);
    assert_eq!(session(second.addr, config.clone(), "dave").await, Full);
    // TLS 1.2's ticket from the first broker is refused the same way.
    let store12 = CountingStore::new();
    let config12 = tls12_phone(&store12);
    assert_eq!(session(first.addr, config12.clone(), "dave").await, Full);
    assert_eq!(session(second.addr, config12.clone(), "dave").await, Full);
    // The second broker's own tickets resume there.
    assert_eq!(session(second.addr, config, "dave").await, Resumed);
    assert_eq!(session(second.addr, config12, "dave").await, Resumed);
}

#[tokio::test]
async fn brokers_sharing_a_ticket_secret_file_resume_each_other_s_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("ticket.key");
    std::fs::write(
        &secret,
        "Zm9yIHRlc3RzIG9ubHk6IGEgc2hhcmVkIHRpY2tldCBzZWNyZXQh\n",
    )
    .unwrap();
    let with_secret = |c: &mut presenced::Config| c.tls.ticket_secret_file = Some(secret.clone());
    let first = start(with_secret).await;
    let second = start(with_secret).await;
    let store = CountingStore::new();
    let config = phone(&store);
    assert_eq!(session(first.addr, config.clone(), "erin").await, Full);
    assert_eq!(session(second.addr, config.clone(), "erin").await, Resumed);
    // A restart keeps accepting them: the keys come from the file, not the process.
    first.stop().await;
    let restarted = start(with_secret).await;
    assert_eq!(session(restarted.addr, config, "erin").await, Resumed);
}

#[tokio::test]
async fn with_tickets_off_no_ticket_is_sent_and_nothing_resumes() {
    let broker = start(|c| c.tls.tickets = false).await;
    let store = CountingStore::new();
    let config = phone(&store);
    assert_eq!(session(broker.addr, config.clone(), "frank").await, Full);
    assert_eq!(session(broker.addr, config, "frank").await, Full);
    assert_eq!(store.tls13_tickets(), 0);
}

/// The value of the sample `line_prefix` on the metrics page at `addr` (0 when absent).
async fn metric(addr: SocketAddr, line_prefix: &str) -> f64 {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    within(tcp.read_to_string(&mut page)).await.unwrap();
    page.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

const FULL: &str = "presence_tls_handshakes_total{kind=\"full\"}";
const RESUMED: &str = "presence_tls_handshakes_total{kind=\"resumed\"}";

#[tokio::test]
async fn handshakes_are_counted_by_kind() {
    let broker = start(|c| {
        c.metrics.enabled = true;
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let metrics = broker.metrics_addr.unwrap();
    // The counters are the process's, shared with the other tests here: compare before/after.
    let (full, resumed) = (metric(metrics, FULL).await, metric(metrics, RESUMED).await);
    let store = CountingStore::new();
    let config = phone(&store);
    session(broker.addr, config.clone(), "gina").await;
    session(broker.addr, config, "gina").await;
    assert!(metric(metrics, FULL).await >= full + 1.0);
    assert!(metric(metrics, RESUMED).await >= resumed + 1.0);
    let accepted = "presence_tls_tickets_total{result=\"decrypted\"}";
    assert!(metric(metrics, accepted).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ticket_from_one_node_resumes_on_another_and_on_a_node_started_later() {
    let nats = NatsCluster::start(1).await;
    let n1 = Node::start("node1", &nats.urls(), &[]).await;
    let n2 = Node::start("node2", &nats.urls(), &[]).await;
    let store = CountingStore::new();
    let config = phone(&store);
    let store12 = CountingStore::new();
    let config12 = tls12_phone(&store12);
    assert_eq!(session(n1.addr, config.clone(), "hana").await, Full);
    assert_eq!(session(n1.addr, config12.clone(), "hana").await, Full);
    // The phone moves node: it resumes there, over TLS 1.3 and 1.2.
    let kind = session(n2.addr, config.clone(), "hana").await;
    assert_eq!(kind, Resumed, "{}\n{}", n1.log_text(), n2.log_text());
    assert_eq!(session(n2.addr, config12.clone(), "hana").await, Resumed);
    assert_eq!(n2.metric(RESUMED).await, 2.0, "{}", n2.log_text());
    assert_eq!(n2.metric(FULL).await, 0.0);
    // A node that joins later reads the same secret from the cluster's bucket.
    let n3 = Node::start("node3", &nats.urls(), &[]).await;
    assert_eq!(session(n3.addr, config, "hana").await, Resumed);
    assert_eq!(session(n3.addr, config12, "hana").await, Resumed);
    let synced = "presence_tls_ticket_key_syncs_total{result=\"ok\"}";
    assert!(n3.metric(synced).await >= 1.0);
    drop(n1);
}

/// What one in-memory handshake cost the server.
struct Cost {
    /// CPU time in the server's `TlsEngine` calls.
    server: Duration,
    /// Bytes the server sent (its flights and the session tickets).
    bytes_out: usize,
    kind: Option<HandshakeKind>,
}

/// Drives one handshake in memory between a rustls client and the server's engine.
fn handshake_in_memory(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> Cost {
    use presenced::tls_stream::engine::TlsEngine;
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    let started = Instant::now();
    let mut engine = TlsEngine::new(server.clone(), hello).unwrap();
    engine.process().unwrap();
    let mut spent = started.elapsed();
    let mut bytes_out = 0;
    loop {
        let flight = engine.unsent().to_vec();
        engine.sent(flight.len());
        bytes_out += flight.len();
        let mut rd = &flight[..];
        while !rd.is_empty() {
            conn.read_tls(&mut rd).unwrap();
            conn.process_new_packets().unwrap();
        }
        let mut back = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut back).unwrap();
        }
        if back.is_empty() {
            break;
        }
        let started = Instant::now();
        engine.receive(&back).unwrap();
        spent += started.elapsed();
    }
    assert!(!conn.is_handshaking());
    Cost {
        server: spent,
        bytes_out,
        kind: engine.handshake_kind(),
    }
}

/// An RSA-2048 certificate for localhost signed by the dev CA, made with `openssl` (None
/// without it).
fn rsa_material(dir: &std::path::Path) -> Option<presenced::config::TlsConfig> {
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev");
    let (key, csr, ext, cert) = (
        dir.join("rsa.key"),
        dir.join("rsa.csr"),
        dir.join("rsa.ext"),
        dir.join("rsa.pem"),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n",
    )
    .unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let made = run(&[
        os("req"),
        os("-new"),
        os("-newkey"),
        os("rsa:2048"),
        os("-nodes"),
        os("-subj"),
        os("/CN=localhost"),
        os("-keyout"),
        key.as_os_str(),
        os("-out"),
        csr.as_os_str(),
    ]) && run(&[
        os("x509"),
        os("-req"),
        os("-in"),
        csr.as_os_str(),
        os("-CA"),
        ca.join("ca.pem").as_os_str(),
        os("-CAkey"),
        ca.join("ca.key").as_os_str(),
        os("-CAcreateserial"),
        os("-CAserial"),
        dir.join("ca.srl").as_os_str(),
        os("-days"),
        os("1"),
        os("-sha256"),
        os("-extfile"),
        ext.as_os_str(),
        os("-out"),
        cert.as_os_str(),
    ]);
    made.then(|| presenced::config::TlsConfig {
        cert: Some(cert),
        key: Some(key),
        ..Default::default()
    })
}

fn client_for(ca_pem: &[u8], tls12: bool, resume: bool) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![presenced::tls::ALPN.to_vec()];
    config.resumption = if resume {
        Resumption::in_memory_sessions(16)
    } else {
        Resumption::disabled()
    };
    Arc::new(config)
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn measure_server_cpu_per_full_and_resumed_handshake() {
    const N: u32 = 1000;
    const ROUNDS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut certs = vec![("ECDSA P-256 (dev)", presenced::config::TlsConfig::default())];
    match rsa_material(dir.path()) {
        Some(config) => certs.push(("RSA-2048", config)),
        None => println!("(no openssl: RSA-2048 skipped)"),
    }
    println!("| certificate | version | full: server CPU, bytes out | resumed: server CPU, bytes out | CPU ratio |");
    println!("|---|---|---|---|---|");
    let ca = presenced::tls::DEV_CA_PEM;
    for (cert, tls) in &certs {
        let server = presenced::tls::server_config(tls).unwrap();
        for (version, tls12) in [("TLS 1.3", false), ("TLS 1.2", true)] {
            let fresh = client_for(ca, tls12, false);
            let resuming = client_for(ca, tls12, true);
            // Warm up, and give the resuming client its first tickets.
            for _ in 0..50 {
                handshake_in_memory(&server, &fresh);
                handshake_in_memory(&server, &resuming);
            }
            // The best of several rounds: the machine is shared, the minimum is the least noisy.
            let (mut full, mut resumed) = (Duration::MAX, Duration::MAX);
            let (mut full_bytes, mut resumed_bytes) = (0, 0);
            for _ in 0..ROUNDS {
                let (mut f, mut r) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..N {
                    let cost = handshake_in_memory(&server, &fresh);
                    assert_eq!(cost.kind, Some(Full));
                    f += cost.server;
                    full_bytes = cost.bytes_out;
                    let cost = handshake_in_memory(&server, &resuming);
                    assert_eq!(cost.kind, Some(Resumed));
                    r += cost.server;
                    resumed_bytes = cost.bytes_out;
                }
                full = full.min(f / N);
                resumed = resumed.min(r / N);
            }
            println!(
                "| {cert} | {version} | {:.1} µs, {full_bytes} B | {:.1} µs, {resumed_bytes} B | {:.2} |",
                full.as_secs_f64() * 1e6,
                resumed.as_secs_f64() * 1e6,
                full.as_secs_f64() / resumed.as_secs_f64()
            );
        }
    }
    let keys = presenced::tls_tickets::TicketKeys::derived(&[7u8; 32], 21_600);
    let state = vec![0u8; 120];
    let started = Instant::now();
    for _ in 0..N * 10 {
        let ticket = keys.seal_at(&state, 1_000_000).unwrap();
        assert!(keys.open_at(&ticket, 1_000_000).is_some());
    }
    println!(
        "ticket seal + open (120-byte state): {:.2} µs",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(N * 10)
    );
}
