//! Server-side TLS on rustls's unbuffered API. rustls's buffered `ServerConnection` keeps a
//! 4 KiB read buffer for the life of every connection, a third of what an idle session costs;
//! here ciphertext and plaintext sit in buffers that exist only while they hold bytes, so an
//! idle connection keeps the TLS state and its keys and nothing else. [`read_client_hello`]
//! reads the first record of the ClientHello (before the caller commits a handshake slot),
//! [`ClientHello::handshake`] completes the handshake, and [`TlsStream`] is the
//! `AsyncRead + AsyncWrite` a session runs on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, ReadTraffic,
    UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const RECORD_HEADER_BYTES: usize = 5;
/// The largest TLS record a peer may send (TLSCiphertext: 2^14 + 2048).
const MAX_RECORD_BYTES: usize = 16_384 + 2_048;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Bytes read from the socket per read call; on the stack, never kept.
const READ_CHUNK_BYTES: usize = 8 * 1024;
/// Encrypted bytes a writer may leave unsent before `poll_write` waits for the socket.
const MAX_UNSENT_BYTES: usize = 64 * 1024;

fn invalid(reason: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.into())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A socket whose first TLS record, the start of a ClientHello, has arrived.
#[derive(Debug)]
pub struct ClientHello {
    tcp: TcpStream,
    incoming: Vec<u8>,
}

/// Reads until the first TLS record is complete. Anything that is not a TLS handshake record,
/// or announces a record larger than TLS allows, is refused at once.
pub async fn read_client_hello(mut tcp: TcpStream) -> io::Result<ClientHello> {
    let mut incoming = Vec::new();
    loop {
        if incoming.len() >= RECORD_HEADER_BYTES {
            if incoming[0] != CONTENT_TYPE_HANDSHAKE {
                return Err(invalid("not a TLS handshake"));
            }
            let len = u16::from_be_bytes([incoming[3], incoming[4]]) as usize;
            if len > MAX_RECORD_BYTES {
                return Err(invalid("TLS record too large"));
            }
            if incoming.len() >= RECORD_HEADER_BYTES + len {
                return Ok(ClientHello { tcp, incoming });
            }
        }
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        incoming.extend_from_slice(&chunk[..n]);
    }
}

/// What one call into rustls left to do.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Something was decrypted, encoded or acknowledged: call again.
    Progress,
    /// Nothing more can happen without bytes from the peer.
    NeedData,
    /// Application data may be written (the handshake may still await the client's Finished).
    Writable,
    /// The peer sent close_notify: no more data will come.
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

/// The TLS state and the bytes in flight around it.
struct Engine {
    conn: UnbufferedServerConnection,
    /// Received ciphertext not yet processed: at most a partial record between reads.
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// Ciphertext not yet written to the socket.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("handshaking", &self.conn.is_handshaking())
            .field("incoming", &self.incoming.len())
            .field("plaintext", &(self.plaintext.len() - self.plaintext_read))
            .field("unsent", &(self.outgoing.len() - self.outgoing_sent))
            .finish()
    }
}

/// Whether [`Engine::when_writable`] reached the write state.
#[derive(Debug, PartialEq, Eq)]
enum Writable {
    Wrote,
    /// Both sides sent close_notify.
    Closed,
    /// The handshake has not completed.
    NotYet,
}

/// Appends every decrypted record to `plaintext`.
fn keep_plaintext(
    mut traffic: ReadTraffic<'_, '_, ServerConnectionData>,
    plaintext: &mut Vec<u8>,
) -> io::Result<()> {
    while let Some(record) = traffic.next_record() {
        plaintext.extend_from_slice(record.map_err(tls_error)?.payload);
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

impl Engine {
    /// One call into rustls over the received ciphertext, handling the state it reports.
    fn step(&mut self) -> io::Result<Step> {
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        let step = match state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(traffic) => {
                keep_plaintext(traffic, &mut self.plaintext)?;
                Step::Progress
            }
            ConnectionState::EncodeTlsData(mut data) => {
                encode(&mut data, &mut self.outgoing);
                Step::Progress
            }
            ConnectionState::TransmitTlsData(transmit) => {
                // The bytes are in `outgoing`; they go out before anything written after them.
                transmit.done();
                Step::Progress
            }
            ConnectionState::BlockedHandshake => Step::NeedData,
            ConnectionState::WriteTraffic(_) => Step::Writable,
            ConnectionState::PeerClosed => Step::PeerClosed,
            ConnectionState::Closed => Step::Closed,
            // 0-RTT is not enabled, and any future state is unexpected.
            _ => return Err(invalid("unexpected TLS state")),
        };
        self.incoming.drain(..discard);
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
        }
        Ok(step)
    }

    /// Steps until rustls needs data from the peer or allows writing.
    fn settle(&mut self) -> io::Result<Step> {
        loop {
            match self.step()? {
                Step::Progress => continue,
                other => return Ok(other),
            }
        }
    }

    /// Brings rustls to its write state (encoding and acknowledging any queued handshake data,
    /// keeping any decrypted bytes) and lets `write` append to `outgoing` there.
    fn when_writable(
        &mut self,
        write: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<Writable> {
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    write(&mut traffic, &mut self.outgoing)?;
                    return Ok(Writable::Wrote);
                }
                ConnectionState::EncodeTlsData(mut data) => encode(&mut data, &mut self.outgoing),
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::ReadTraffic(traffic) => {
                    keep_plaintext(traffic, &mut self.plaintext)?
                }
                ConnectionState::PeerClosed => {}
                ConnectionState::Closed => return Ok(Writable::Closed),
                _ => return Ok(Writable::NotYet),
            }
        }
    }

    /// Encrypts `data` into `outgoing`.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        let written = self.when_writable(|traffic, outgoing| {
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
        })?;
        match written {
            Writable::Wrote => Ok(()),
            Writable::Closed => Err(io::ErrorKind::BrokenPipe.into()),
            Writable::NotYet => Err(invalid("cannot write before the handshake completes")),
        }
    }

    /// Appends a close_notify alert to `outgoing`; nothing when the connection cannot write.
    fn close_notify(&mut self) -> io::Result<()> {
        self.when_writable(|traffic, outgoing| {
            let start = outgoing.len();
            outgoing.resize(start + 64, 0);
            let n = traffic
                .queue_close_notify(&mut outgoing[start..])
                .map_err(|e| invalid(e.to_string()))?;
            outgoing.truncate(start + n);
            Ok(())
        })?;
        Ok(())
    }

    fn unsent(&self) -> &[u8] {
        &self.outgoing[self.outgoing_sent..]
    }

    fn sent(&mut self, n: usize) {
        self.outgoing_sent += n;
        if self.outgoing_sent == self.outgoing.len() {
            // Idle connections keep no buffer.
            self.outgoing = Vec::new();
            self.outgoing_sent = 0;
        }
    }
}

impl ClientHello {
    /// Completes the handshake with `config`. The caller bounds it with a deadline.
    pub async fn handshake(self, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
        let ClientHello { mut tcp, incoming } = self;
        let mut engine = Engine {
            conn: UnbufferedServerConnection::new(config).map_err(tls_error)?,
            incoming,
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_sent: 0,
        };
        loop {
            let step = engine.settle()?;
            if !engine.unsent().is_empty() {
                tcp.write_all(engine.unsent()).await?;
                let n = engine.unsent().len();
                engine.sent(n);
            }
            match step {
                Step::Writable if !engine.conn.is_handshaking() => break,
                Step::Writable | Step::NeedData => {
                    let mut chunk = [0u8; 2048];
                    let n = tcp.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    engine.incoming.extend_from_slice(&chunk[..n]);
                }
                Step::PeerClosed | Step::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Step::Progress => unreachable!("settle never returns Progress"),
            }
        }
        Ok(TlsStream {
            tcp,
            engine,
            read_closed: false,
            close_notify_queued: false,
        })
    }
}

/// An established server-side TLS connection.
#[derive(Debug)]
pub struct TlsStream {
    tcp: TcpStream,
    engine: Engine,
    read_closed: bool,
    close_notify_queued: bool,
}

impl TlsStream {
    /// The ALPN protocol agreed in the handshake.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.engine.conn.alpn_protocol()
    }

    /// Writes unsent ciphertext until none is left or the socket would block.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.engine.unsent().is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, self.engine.unsent()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.engine.sent(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let engine = &mut this.engine;
            if engine.plaintext_read < engine.plaintext.len() {
                let available = &engine.plaintext[engine.plaintext_read..];
                let n = available.len().min(buf.remaining());
                buf.put_slice(&available[..n]);
                engine.plaintext_read += n;
                if engine.plaintext_read == engine.plaintext.len() {
                    engine.plaintext = Vec::new();
                    engine.plaintext_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Nothing to process without ciphertext: the writer's wake-ups poll this too.
            if !engine.incoming.is_empty() {
                match engine.settle()? {
                    Step::PeerClosed | Step::Closed => this.read_closed = true,
                    _ => {}
                }
            }
            // A key update answer may have been queued: send it if the socket takes it now,
            // else it goes out with the next write. `try_write` registers no waker, so the
            // writer's registration for writability is left alone.
            while !this.engine.unsent().is_empty() {
                match this.tcp.try_write(this.engine.unsent()) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => this.engine.sent(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if !this.engine.plaintext.is_empty() || this.read_closed {
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The socket closed without close_notify: the end of the stream all the same.
                return Poll::Ready(Ok(()));
            }
            this.engine.incoming.extend_from_slice(read.filled());
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.engine.unsent().len() >= MAX_UNSENT_BYTES {
            ready!(this.poll_send(cx))?;
        }
        this.engine.encrypt(data)?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued {
            this.close_notify_queued = true;
            this.engine.close_notify()?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_config =
            crate::tls::server_config(&crate::config::TlsConfig::default()).unwrap();
        let client = tokio::spawn(async move {
            crate::client::tls_connect(addr, "localhost", crate::tls::dev_client_config())
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = read_client_hello(tcp)
            .await
            .unwrap()
            .handshake(server_config)
            .await
            .unwrap();
        (server, client.await.unwrap())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_in_records_of_every_size_and_close_cleanly() {
        let (mut server, mut client) = pair().await;
        assert_eq!(server.alpn_protocol(), Some(&b"presence/1"[..]));
        assert_eq!(
            client
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "the server's preference wins over the client's AES-256-first order"
        );
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        client.write_all(&big).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        server.write_all(&big[..70_000]).await.unwrap();
        server.write_all(b"end").await.unwrap();
        server.flush().await.unwrap();
        let mut back = vec![0u8; 70_003];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back[..70_000], &big[..70_000]);
        assert_eq!(&back[70_000..], b"end");
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "close_notify ends the client's stream cleanly"
        );
        drop(client);
        let mut tail = Vec::new();
        server.read_to_end(&mut tail).await.unwrap();
        assert!(tail.is_empty());
        assert!(server.engine.incoming.capacity() == 0 && server.engine.outgoing.capacity() == 0);
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let err = read_client_hello(tcp).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
