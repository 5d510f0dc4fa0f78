//! The synchronous core of server-side TLS: one rustls `UnbufferedServerConnection` and the
//! bytes in flight around it, with no socket and no `.await`. The async shell (`super`) feeds
//! it ciphertext and drains what it writes; the fuzz target `tls_engine` drives it in memory.
//!
//! Every buffer has a cap you can name:
//! - `incoming` (received ciphertext) never exceeds [`INCOMING_CAP`]: at most one partial
//!   record is held between reads, so after processing, anything above [`MAX_HELD`] can only
//!   be a handshake message spread over many records, which no legitimate client sends once the
//!   handshake is done; the connection fails with "TLS message spans too many records".
//! - `plaintext` only holds what `incoming` decrypted to, and no ciphertext is taken while any
//!   plaintext is unread ([`TlsEngine::room`] is 0), so it stays below [`INCOMING_CAP`].
//! - `outgoing` (ciphertext not yet on the socket) takes at most [`MAX_WRITE_CHUNK`] per
//!   [`TlsEngine::encrypt`]; the shell waits for the socket above [`MAX_UNSENT`], and bytes
//!   rustls itself queues (alerts, key update answers) are refused above [`OUTGOING_CAP`].
//!
//! A rustls error poisons the engine: its alert (if any) is encoded once, no further input is
//! processed, writes fail, and the plaintext decrypted before the error can still be read, in
//! order, before the error is reported.

use std::io;
use std::sync::Arc;

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, ReadTraffic,
    UnbufferedStatus, WriteTraffic,
};

/// Bytes of a TLS record header.
pub const RECORD_HEADER_BYTES: usize = 5;
/// The largest TLS record body a peer may send (TLSCiphertext: 2^14 + 2048).
pub const MAX_RECORD_BYTES: usize = 16_384 + 2_048;
/// Most ciphertext held after processing: one partial record.
pub const MAX_HELD: usize = RECORD_HEADER_BYTES + MAX_RECORD_BYTES;
/// Most ciphertext taken from the socket in one read.
pub const READ_CHUNK_BYTES: usize = 8 * 1024;
/// Cap of the incoming ciphertext buffer: one partial record plus one read.
pub const INCOMING_CAP: usize = MAX_HELD + READ_CHUNK_BYTES;
/// Most plaintext one [`TlsEngine::encrypt`] call takes.
pub const MAX_WRITE_CHUNK: usize = 64 * 1024;
/// Unsent ciphertext above which writers wait for the socket.
pub const MAX_UNSENT: usize = 64 * 1024;
/// Cap of the outgoing ciphertext buffer: a full `MAX_UNSENT`, one more chunk with its record
/// overhead, and room for the alerts and key-update answers rustls queues itself.
pub const OUTGOING_CAP: usize = MAX_UNSENT + MAX_WRITE_CHUNK + 8 * 1024;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;

fn invalid(reason: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.into())
}

/// The length of the first record with its header, once its header is in `bytes`.
pub fn first_record_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= RECORD_HEADER_BYTES)
        .then(|| RECORD_HEADER_BYTES + u16::from_be_bytes([bytes[3], bytes[4]]) as usize)
}

/// Checks the first record header of a connection: a handshake record no larger than TLS
/// allows. `Ok(true)` once the whole record is in `bytes`.
pub fn first_record_complete(bytes: &[u8]) -> io::Result<bool> {
    let Some(len) = first_record_len(bytes) else {
        return Ok(false);
    };
    if bytes[0] != CONTENT_TYPE_HANDSHAKE {
        return Err(invalid("not a TLS handshake"));
    }
    if len > MAX_HELD {
        return Err(invalid("TLS record too large"));
    }
    Ok(bytes.len() >= len)
}

/// Where the connection stands after processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The handshake needs more bytes from the peer (or its last flight to go out).
    Handshaking,
    /// Application data flows both ways.
    Open,
    /// The peer sent close_notify: nothing more will be read; writing is still possible.
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

/// What one call into rustls led to.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Progress,
    NeedData,
    Writable,
    Wrote,
    Closed,
}

/// Buffer sizes, for tests and the fuzz target's invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffered {
    /// Ciphertext received and not yet discarded.
    pub incoming: usize,
    /// Plaintext decrypted and not yet read.
    pub plaintext: usize,
    /// Ciphertext not yet sent.
    pub outgoing: usize,
}

/// The TLS state of one server connection and its buffers (see the module doc for the caps).
pub struct TlsEngine {
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    plaintext: Vec<u8>,
    plaintext_read: usize,
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    peer_closed: bool,
    closed: bool,
    /// The first error, reported again by every later call (boxed: idle connections carry
    /// only the pointer).
    failed: Option<Box<(io::ErrorKind, String)>>,
}

impl std::fmt::Debug for TlsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsEngine")
            .field("handshaking", &self.conn.is_handshaking())
            .field("buffered", &self.buffered())
            .field("failed", &self.failed)
            .finish()
    }
}

/// Appends every decrypted record to `plaintext`.
fn keep_plaintext(
    mut traffic: ReadTraffic<'_, '_, ServerConnectionData>,
    plaintext: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    while let Some(record) = traffic.next_record() {
        plaintext.extend_from_slice(record?.payload);
    }
    Ok(())
}

fn encode(encode: &mut rustls::unbuffered::EncodeTlsData<'_, impl Sized>, outgoing: &mut Vec<u8>) {
    let start = outgoing.len();
    let mut room = 512;
    loop {
        outgoing.resize(start + room, 0);
        match encode.encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                outgoing.truncate(start);
                return;
            }
        }
    }
}

/// What a writer does in rustls's write state.
type WriteFn<'a> =
    &'a mut dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()>;

impl TlsEngine {
    /// A fresh server connection; `client_hello` holds the bytes read so far (at least the
    /// first record, see [`first_record_complete`]).
    pub fn new(config: Arc<rustls::ServerConfig>, client_hello: Vec<u8>) -> io::Result<TlsEngine> {
        if client_hello.len() > INCOMING_CAP {
            return Err(invalid("ClientHello larger than the incoming buffer"));
        }
        let conn = UnbufferedServerConnection::new(config)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(TlsEngine {
            conn,
            incoming: client_hello,
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_sent: 0,
            peer_closed: false,
            closed: false,
            failed: None,
        })
    }

    /// The ALPN protocol agreed in the handshake.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Whether the handshake was full or resumed a session ticket (`None` before it is known).
    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// The first error, if the engine failed.
    pub fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|failed| io::Error::new(failed.0, failed.1.clone()))
    }

    fn check(&self) -> io::Result<()> {
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Current buffer sizes.
    pub fn buffered(&self) -> Buffered {
        Buffered {
            incoming: self.incoming.len(),
            plaintext: self.plaintext.len() - self.plaintext_read,
            outgoing: self.outgoing.len() - self.outgoing_sent,
        }
    }

    /// Ciphertext the engine takes now: none while plaintext waits to be read, after the peer
    /// closed or after an error; else up to [`INCOMING_CAP`] in all.
    pub fn room(&self) -> usize {
        if self.failed.is_some() || self.peer_closed || self.has_plaintext() {
            0
        } else {
            INCOMING_CAP.saturating_sub(self.incoming.len())
        }
    }

    /// Takes `ciphertext` (at most [`TlsEngine::room`] bytes) and processes it.
    pub fn receive(&mut self, ciphertext: &[u8]) -> io::Result<Status> {
        self.check()?;
        if ciphertext.len() > self.room() {
            return Err(invalid("more ciphertext than the engine has room for"));
        }
        self.incoming.extend_from_slice(ciphertext);
        self.process()
    }

    /// Processes the ciphertext held, encoding whatever rustls wants sent.
    pub fn process(&mut self) -> io::Result<Status> {
        self.check()?;
        loop {
            match self.step(None)? {
                Step::Progress => continue,
                Step::Closed => break,
                Step::NeedData | Step::Writable | Step::Wrote => break,
            }
        }
        if self.peer_closed {
            // Nothing after close_notify is ever read.
            self.incoming = Vec::new();
        } else if self.incoming.len() > MAX_HELD {
            return Err(self.fail_with(invalid("TLS message spans too many records")));
        }
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
        }
        if self.buffered().outgoing > OUTGOING_CAP {
            return Err(self.fail_with(invalid("the peer does not read what TLS must send")));
        }
        Ok(self.status())
    }

    /// Where the connection stands.
    pub fn status(&self) -> Status {
        if self.closed {
            Status::Closed
        } else if self.peer_closed {
            Status::PeerClosed
        } else if self.conn.is_handshaking() {
            Status::Handshaking
        } else {
            Status::Open
        }
    }

    /// One call into rustls over the held ciphertext; `write` runs in the write state.
    fn step(&mut self, write: Option<WriteFn<'_>>) -> io::Result<Step> {
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        let step = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(traffic)) => {
                keep_plaintext(traffic, &mut self.plaintext).map(|()| Step::Progress)
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(&mut data, &mut self.outgoing);
                Ok(Step::Progress)
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                // The bytes are in `outgoing`; they go out before anything written after them.
                transmit.done();
                Ok(Step::Progress)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedData),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match write {
                Some(write) => {
                    let wrote = write(&mut traffic, &mut self.outgoing);
                    self.incoming.drain(..discard);
                    wrote?;
                    return Ok(Step::Wrote);
                }
                None => Ok(Step::Writable),
            },
            Ok(ConnectionState::PeerClosed) => {
                self.peer_closed = true;
                Ok(Step::Progress)
            }
            Ok(ConnectionState::Closed) => {
                self.peer_closed = true;
                self.closed = true;
                Ok(Step::Closed)
            }
            // 0-RTT is not enabled, and any future state is unexpected.
            Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
        };
        self.incoming.drain(..discard);
        match step {
            Ok(step) => Ok(step),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Poisons the engine with rustls's error, encoding what rustls queued before it (a
    /// ServerHello, then the alert, when a handshake fails half-way).
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        // rustls queued its records before returning the error; they come out as encode and
        // transmit states. The first other state ends it: no plaintext is read after an error.
        // (A call after the queue is empty looks at the remaining input once more, which can
        // make rustls queue a second alert; it is encoded too, and the loop is bounded.)
        for _ in 0..16 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut data, &mut self.outgoing);
                    true
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    true
                }
                _ => false,
            };
            self.incoming.drain(..discard);
            if !more {
                break;
            }
        }
        self.fail_with(io::Error::new(io::ErrorKind::InvalidData, e))
    }

    fn fail_with(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some(Box::new((e.kind(), e.to_string())));
        }
        // Nothing more is ever processed.
        self.incoming = Vec::new();
        e
    }

    /// True when decrypted bytes wait to be read.
    pub fn has_plaintext(&self) -> bool {
        self.plaintext_read < self.plaintext.len()
    }

    /// Copies decrypted bytes into `buf`; returns how many.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let available = &self.plaintext[self.plaintext_read..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.plaintext_read += n;
        if self.plaintext_read == self.plaintext.len() {
            // Idle connections keep no buffer.
            self.plaintext = Vec::new();
            self.plaintext_read = 0;
        }
        n
    }

    /// Encrypts up to [`MAX_WRITE_CHUNK`] bytes of `data` into the outgoing buffer; returns how
    /// many were taken.
    pub fn encrypt(&mut self, data: &[u8]) -> io::Result<usize> {
        let data = &data[..data.len().min(MAX_WRITE_CHUNK)];
        if data.is_empty() {
            return Ok(0);
        }
        let mut encrypt = |traffic: &mut WriteTraffic<'_, ServerConnectionData>,
                           outgoing: &mut Vec<u8>| {
            let start = outgoing.len();
            // 22 bytes per record of at most 16 KiB: header, content type and tag.
            let mut room = data.len() + 22 * (data.len() / 16_384 + 1);
            loop {
                outgoing.resize(start + room, 0);
                match traffic.encrypt(data, &mut outgoing[start..]) {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        return Ok(());
                    }
                    Err(EncryptError::InsufficientSize(e)) => room = e.required_size,
                    Err(e) => {
                        outgoing.truncate(start);
                        return Err(invalid(e.to_string()));
                    }
                }
            }
        };
        self.when_writable(&mut encrypt)?;
        Ok(data.len())
    }

    /// Brings rustls to its write state (encoding and acknowledging queued handshake data and
    /// keeping decrypted bytes on the way) and runs `write` there.
    fn when_writable(&mut self, write: WriteFn<'_>) -> io::Result<()> {
        self.check()?;
        loop {
            match self.step(Some(&mut *write))? {
                Step::Wrote => return Ok(()),
                Step::Progress => continue,
                Step::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                Step::NeedData | Step::Writable => {
                    return Err(invalid("cannot write before the handshake completes"))
                }
            }
        }
    }

    /// Queues a close_notify alert; nothing when the connection cannot write any more.
    pub fn close_notify(&mut self) -> io::Result<()> {
        if self.failed.is_some() || self.closed {
            return Ok(());
        }
        let mut close = |traffic: &mut WriteTraffic<'_, ServerConnectionData>,
                         outgoing: &mut Vec<u8>| {
            let start = outgoing.len();
            outgoing.resize(start + 64, 0);
            match traffic.queue_close_notify(&mut outgoing[start..]) {
                Ok(n) => {
                    outgoing.truncate(start + n);
                    Ok(())
                }
                Err(e) => {
                    outgoing.truncate(start);
                    Err(invalid(e.to_string()))
                }
            }
        };
        match self.when_writable(&mut close) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Ciphertext waiting for the socket.
    pub fn unsent(&self) -> &[u8] {
        &self.outgoing[self.outgoing_sent..]
    }

    /// Marks `n` bytes of [`TlsEngine::unsent`] as written.
    pub fn sent(&mut self, n: usize) {
        self.outgoing_sent = (self.outgoing_sent + n).min(self.outgoing.len());
        if self.outgoing_sent == self.outgoing.len() {
            // Idle connections keep no buffer.
            self.outgoing = Vec::new();
            self.outgoing_sent = 0;
        }
    }

    /// Capacities held, in bytes (for memory tests).
    pub fn capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls_stream::forge::ForgedClient;

    fn server_config() -> Arc<rustls::ServerConfig> {
        crate::tls::server_config(&crate::config::TlsConfig::default()).unwrap()
    }

    #[test]
    fn a_failed_handshake_hands_over_its_alert() {
        let mut client = ForgedClient::new(&[b"h2"]);
        let hello = client.handshake_bytes();
        let mut engine = TlsEngine::new(server_config(), hello).unwrap();
        let err = engine.process().unwrap_err();
        assert!(err.to_string().contains("known protocol"), "{err}");
        // ServerHello went out before the ALPN check, so the alert is encrypted after it.
        let flight = engine.unsent().to_vec();
        let e = client.receive_handshake(&flight).unwrap_err();
        assert!(format!("{e:?}").contains("NoApplicationProtocol"), "{e:?}");
    }

    /// A client and a server engine with the handshake done in memory.
    fn open_pair() -> (ForgedClient, TlsEngine) {
        crate::tls_stream::forge::open_in_memory(
            ForgedClient::new(&[b"presence/1"]),
            server_config(),
        )
        .unwrap()
    }

    fn read_all(engine: &mut TlsEngine) -> Vec<u8> {
        let mut out = vec![0u8; 64 * 1024];
        let n = engine.read(&mut out);
        out.truncate(n);
        out
    }

    #[test]
    fn data_before_a_fatal_alert_is_read_then_nothing_more_is_written() {
        let (mut client, mut engine) = open_pair();
        let mut bytes = client.app_data(b"goodbye");
        bytes.extend(client.alert(2, 10));
        assert!(engine.receive(&bytes).is_err());
        assert_eq!(read_all(&mut engine), b"goodbye");
        assert!(engine.error().is_some());
        assert!(engine.encrypt(b"late frame").is_err());
        engine.close_notify().unwrap();
        assert!(
            engine.unsent().is_empty(),
            "no close_notify after a fatal alert"
        );
        assert_eq!(engine.room(), 0);
    }

    #[test]
    fn a_handshake_message_spread_over_many_records_fails_at_the_cap() {
        let (mut client, mut engine) = open_pair();
        let records = client.handshake_message(24, &vec![0u8; 65_535], 1, 16_000);
        let mut failed = false;
        let mut fed = 0;
        for chunk in records.chunks(READ_CHUNK_BYTES) {
            let room = engine.room();
            if room == 0 {
                break;
            }
            let take = chunk.len().min(room);
            fed += take;
            if engine.receive(&chunk[..take]).is_err() {
                failed = true;
                break;
            }
            assert!(engine.buffered().incoming <= INCOMING_CAP);
        }
        assert!(failed, "still buffering after {fed} bytes");
        assert!(fed <= INCOMING_CAP + READ_CHUNK_BYTES, "fed {fed}");
        assert_eq!(
            engine.buffered().incoming,
            0,
            "nothing is kept after the failure"
        );
    }

    #[test]
    fn a_half_sent_key_update_does_not_break_writes() {
        let (mut client, mut engine) = open_pair();
        let partial = client.record(
            crate::tls_stream::forge::content_type::HANDSHAKE,
            &[24, 0, 0, 1],
            0,
        );
        engine.receive(&partial).unwrap();
        assert_eq!(engine.encrypt(b"event").unwrap(), 5);
        let out = engine.unsent().to_vec();
        engine.sent(out.len());
        let got = client.read(&out);
        assert!(
            got.contains(&crate::tls_stream::forge::Received::AppData(
                b"event".to_vec()
            )),
            "{got:?}"
        );
    }

    #[test]
    fn key_updates_are_answered_and_followed() {
        let (mut client, mut engine) = open_pair();
        for round in 0..3u8 {
            let mut bytes = client.key_update(true);
            bytes.extend(client.app_data(&[round; 3]));
            engine.receive(&bytes).unwrap();
            assert_eq!(read_all(&mut engine), [round; 3]);
            engine.encrypt(&[round; 2]).unwrap();
            let out = engine.unsent().to_vec();
            engine.sent(out.len());
            let got = client.read(&out);
            assert!(
                got.contains(&crate::tls_stream::forge::Received::AppData(vec![round; 2])),
                "{got:?}"
            );
        }
    }
}
