//! The server's TLS engine (`tls_stream::engine`) against a client that forges records with its
//! own keys (`tls_stream::forge`). A real rustls client completes the handshake in memory; the
//! input then decides what follows: application data, handshake messages cut anywhere and
//! spread over padded records (partial KeyUpdates, renegotiation ClientHellos, 64 KiB
//! announcements), KeyUpdates with and without request, alerts, arbitrary records, garbage, the
//! size of every delivery, server reads, writes and close_notify.
//!
//! Invariants, checked after every step: no panic; no buffer above its named cap; the plaintext
//! the server reads is exactly a prefix of the client's application data, and all of the data
//! sent before the first hostile record is read even when the connection then fails; everything
//! the server sends decrypts in order with the keys it announced, and its application data is a
//! prefix of what it wrote.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::tls_stream::engine::{Status, TlsEngine, INCOMING_CAP, MAX_UNSENT, OUTGOING_CAP};
use presenced::tls_stream::forge::{content_type, open_in_memory, ForgedClient, Received};

#[derive(Debug, Arbitrary)]
enum Op {
    /// Client application data (a counting pattern), `len` bytes.
    AppData { len: u16 },
    /// A handshake message of `msg_type` announcing `announced` bytes, of which `body` are sent,
    /// `per_record` per record, each record padded by `padding`.
    Handshake {
        msg_type: u8,
        announced: u16,
        body: u16,
        per_record: u8,
        padding: u16,
    },
    /// A well-formed KeyUpdate.
    KeyUpdate { request: bool },
    /// An alert record.
    Alert { level: u8, description: u8 },
    /// Any encrypted record.
    Record {
        content_type: u8,
        payload: Vec<u8>,
        padding: u16,
    },
    /// Unencrypted bytes.
    Garbage(Vec<u8>),
    /// Deliver up to `n` pending client bytes to the server.
    Deliver { n: u16 },
    /// The server reads up to `n` plaintext bytes.
    ServerRead { n: u16 },
    /// The server writes `n` bytes (when its writer would: below MAX_UNSENT unsent).
    ServerWrite { n: u16 },
    /// The socket takes `n` of the server's bytes, which the client decrypts.
    Transmit { n: u16 },
    /// The server sends close_notify.
    CloseNotify,
}

#[derive(Debug, Arbitrary)]
struct Input {
    ops: Vec<Op>,
}

fn server_config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            presenced::tls::server_config(&presenced::config::TlsConfig::default())
                .expect("dev certificate")
        })
        .clone()
}

/// The first byte that breaks the counting pattern.
fn first_mismatch(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find(|&i| bytes[i] != (i % 251) as u8)
}

fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| (i % 251) as u8).collect()
}

struct Run {
    engine: TlsEngine,
    client: ForgedClient,
    /// Client bytes not yet delivered.
    wire: Vec<u8>,
    /// Client application data sent, and how much of it preceded the first hostile record.
    sent_app: usize,
    clean_app: usize,
    hostile: bool,
    key_updates_in_a_row: usize,
    /// Plaintext the server read.
    read: Vec<u8>,
    /// Server application data written, and what the client decrypted of it.
    written: usize,
    received: Vec<u8>,
    failed: bool,
}

impl Run {
    fn check(&self) {
        let b = self.engine.buffered();
        assert!(b.incoming <= INCOMING_CAP, "incoming {} > cap", b.incoming);
        assert!(
            b.plaintext <= INCOMING_CAP,
            "plaintext {} > cap",
            b.plaintext
        );
        assert!(b.outgoing <= OUTGOING_CAP, "outgoing {} > cap", b.outgoing);
        if let Some(i) = first_mismatch(&self.read) {
            panic!("plaintext out of order at byte {i} of {}", self.read.len());
        }
        assert!(self.read.len() <= self.sent_app);
        if let Some(i) = first_mismatch(&self.received) {
            panic!(
                "server data out of order at byte {i} of {}",
                self.received.len()
            );
        }
        assert!(self.received.len() <= self.written);
    }

    fn hostile(&mut self) {
        if !self.hostile {
            self.hostile = true;
            self.clean_app = self.sent_app;
        }
    }

    fn deliver(&mut self, n: usize) {
        let n = n.min(self.wire.len()).min(self.engine.room());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.wire.drain(..n).collect();
        if self.engine.receive(&chunk).is_err() {
            self.failed = true;
        }
    }

    fn server_read(&mut self, n: usize) {
        let mut buf = vec![0u8; n];
        let got = self.engine.read(&mut buf);
        self.read.extend_from_slice(&buf[..got]);
    }

    fn transmit(&mut self, n: usize) {
        let n = n.min(self.engine.unsent().len());
        let bytes = self.engine.unsent()[..n].to_vec();
        self.engine.sent(n);
        for r in self.client.read(&bytes) {
            match r {
                Received::AppData(d) => self.received.extend_from_slice(&d),
                Received::Alert(0, 0) => panic!("server record does not decrypt"),
                Received::Alert(..) | Received::Handshake(_) => {}
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let (client, engine) = open_in_memory(ForgedClient::new(&[b"presence/1"]), server_config())
        .expect("a well-behaved handshake completes");
    let mut run = Run {
        engine,
        client,
        wire: Vec::new(),
        sent_app: 0,
        clean_app: 0,
        hostile: false,
        key_updates_in_a_row: 0,
        read: Vec::new(),
        written: 0,
        received: Vec::new(),
        failed: false,
    };
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::AppData { len } => {
                let data = pattern(run.sent_app, usize::from(len) % 20_000);
                let bytes = run.client.app_data(&data);
                run.wire.extend(bytes);
                run.sent_app += data.len();
                run.key_updates_in_a_row = 0;
            }
            Op::Handshake {
                msg_type,
                announced,
                body,
                per_record,
                padding,
            } => {
                run.hostile();
                let announced = usize::from(announced);
                let body = usize::from(body).min(announced).min(70_000);
                let mut msg = vec![msg_type];
                msg.extend_from_slice(&(announced as u32).to_be_bytes()[1..]);
                msg.extend(std::iter::repeat_n(0u8, body));
                let per = usize::from(per_record).max(1);
                for chunk in msg.chunks(per).take(64) {
                    let r = run
                        .client
                        .record(content_type::HANDSHAKE, chunk, usize::from(padding));
                    run.wire.extend(r);
                }
            }
            Op::KeyUpdate { request } => {
                run.key_updates_in_a_row += 1;
                if run.key_updates_in_a_row > 16 {
                    run.hostile();
                }
                let r = run.client.key_update(request);
                run.wire.extend(r);
            }
            Op::Alert { level, description } => {
                run.hostile();
                let r = run.client.alert(level, description);
                run.wire.extend(r);
            }
            Op::Record {
                content_type,
                payload,
                padding,
            } => {
                let payload = if content_type == content_type::APPLICATION_DATA {
                    // Valid application data, padded: it must arrive like any other.
                    let data = pattern(run.sent_app, payload.len().min(16_384));
                    run.sent_app += data.len();
                    data
                } else {
                    run.hostile();
                    payload
                };
                let r = run
                    .client
                    .record(content_type, &payload, usize::from(padding));
                run.wire.extend(r);
            }
            Op::Garbage(bytes) => {
                run.hostile();
                run.wire.extend(bytes);
            }
            Op::Deliver { n } => run.deliver(usize::from(n)),
            Op::ServerRead { n } => run.server_read(usize::from(n)),
            Op::ServerWrite { n } => {
                if run.engine.unsent().len() < MAX_UNSENT {
                    let data = pattern(run.written, usize::from(n));
                    if let Ok(taken) = run.engine.encrypt(&data) {
                        run.written += taken;
                    }
                }
            }
            Op::Transmit { n } => run.transmit(usize::from(n)),
            Op::CloseNotify => {
                let _ = run.engine.close_notify();
            }
        }
        run.check();
    }
    // Everything left goes to the server, which reads all it can.
    for _ in 0..10_000 {
        run.server_read(64 * 1024);
        let before = run.wire.len();
        run.deliver(usize::MAX);
        run.check();
        if run.wire.len() == before && !run.engine.has_plaintext() {
            break;
        }
    }
    run.server_read(64 * 1024);
    run.transmit(usize::MAX);
    run.check();
    let clean = if run.hostile {
        run.clean_app
    } else {
        run.sent_app
    };
    let status = run.engine.status();
    if run.engine.error().is_none() && matches!(status, Status::Open) {
        // A healthy connection has delivered everything.
        assert!(run.wire.is_empty() || run.engine.room() == 0);
    }
    if !run.hostile {
        assert!(
            !run.failed,
            "a well-behaved client failed: {:?}",
            run.engine.error()
        );
    }
    assert!(
        run.read.len() >= clean || !run.wire.is_empty(),
        "read {} of the {} bytes sent before the first hostile record",
        run.read.len(),
        clean
    );
});
