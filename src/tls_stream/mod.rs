//! Server-side TLS on rustls's unbuffered API, as an async shell around the synchronous
//! [`engine::TlsEngine`]. rustls's buffered `ServerConnection` keeps a 4 KiB read buffer for the
//! life of every connection, a third of what an idle session costs; here ciphertext and
//! plaintext sit in buffers that exist only while they hold bytes, each under a cap named in
//! `engine`. [`read_client_hello`] reads the first record of the ClientHello (before the caller
//! commits a handshake slot), [`ClientHello::handshake`] completes the handshake (sending
//! rustls's alert when it fails), and [`TlsStream`] is the `AsyncRead + AsyncWrite` a session
//! runs on: it hands over every byte decrypted before a TLS error, then the error, and writes
//! nothing but the pending alert once the connection has failed. The session tickets rustls
//! issues at the end of a handshake leave with its last flight, before the handshake returns,
//! so an idle client has them too; each completed handshake is counted by kind (full or
//! resumed). `forge` is a TLS 1.3 client that writes hand-made records with its own keys, for
//! tests and the fuzz target.

pub mod engine;
pub mod forge;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use engine::{Status, TlsEngine, MAX_UNSENT, READ_CHUNK_BYTES};

/// A socket whose first TLS record, the start of a ClientHello, has arrived.
#[derive(Debug)]
pub struct ClientHello {
    tcp: TcpStream,
    incoming: Vec<u8>,
}

/// Reads until the first TLS record is complete. Anything that is not a TLS handshake record,
/// or announces a record larger than TLS allows, is refused at once.
/// The buffer holds exactly the first record (at most 18,437 bytes), however it is sent: it is
/// sized from the record header and never grows past it.
pub async fn read_client_hello(mut tcp: TcpStream) -> io::Result<ClientHello> {
    let mut incoming = Vec::new();
    while !engine::first_record_complete(&incoming)? {
        let want = match engine::first_record_len(&incoming) {
            Some(len) => {
                incoming.reserve_exact(len.saturating_sub(incoming.len()));
                len - incoming.len()
            }
            None => engine::RECORD_HEADER_BYTES - incoming.len(),
        };
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk[..want.min(1024)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        incoming.extend_from_slice(&chunk[..n]);
    }
    Ok(ClientHello { tcp, incoming })
}

/// Writes everything the engine has to send.
async fn send_all(tcp: &mut TcpStream, engine: &mut TlsEngine) -> io::Result<()> {
    while !engine.unsent().is_empty() {
        let n = tcp.write(engine.unsent()).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        engine.sent(n);
    }
    Ok(())
}

impl ClientHello {
    /// Completes the handshake with `config`. The caller bounds it with a deadline. On a TLS
    /// error, rustls's alert (e.g. `no_application_protocol`) is sent before the error returns.
    pub async fn handshake(self, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
        let ClientHello { mut tcp, incoming } = self;
        let mut engine = TlsEngine::new(config, incoming)?;
        let mut status = engine.process();
        loop {
            // The alert of a failed handshake goes out too; its own failure does not matter.
            let sent = send_all(&mut tcp, &mut engine).await;
            match status {
                Err(e) => {
                    let _ = tcp.shutdown().await;
                    return Err(e);
                }
                Ok(Status::Open) => {
                    // Everything rustls queued with the handshake's end (its Finished, or the
                    // session tickets after the client's) has been written by `send_all`, or
                    // the client left right after its Finished: the handshake is complete all
                    // the same (and counted so); the session then finds the socket closed.
                    if let Err(e) = sent {
                        tracing::debug!("writing after the handshake's end failed: {e}");
                    }
                    break;
                }
                Ok(Status::Handshaking) => {
                    sent?;
                    let mut chunk = [0u8; 2048];
                    let want = engine.room().min(chunk.len());
                    let n = tcp.read(&mut chunk[..want]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    status = engine.receive(&chunk[..n]);
                }
                Ok(Status::PeerClosed | Status::Closed) => {
                    return Err(io::ErrorKind::UnexpectedEof.into())
                }
            }
        }
        let kind = match engine.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        metrics::counter!(crate::metrics::TLS_HANDSHAKES, "kind" => kind).increment(1);
        Ok(TlsStream {
            tcp,
            engine,
            close_notify_queued: false,
        })
    }
}

/// An established server-side TLS connection.
#[derive(Debug)]
pub struct TlsStream {
    tcp: TcpStream,
    engine: TlsEngine,
    close_notify_queued: bool,
}

impl TlsStream {
    /// The ALPN protocol agreed in the handshake.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.engine.alpn_protocol()
    }

    /// True when the handshake resumed a session (a ticket) instead of a full handshake.
    pub fn resumed(&self) -> bool {
        self.engine.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
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

    /// Sends what the socket takes now without registering a waker, so the writer's
    /// registration for writability is left alone (the reader uses this for alerts and
    /// key-update answers; what does not fit goes out with the next write).
    fn try_send(&mut self) -> io::Result<()> {
        while !self.engine.unsent().is_empty() {
            match self.tcp.try_write(self.engine.unsent()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.engine.sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
            // Plaintext first: bytes decrypted before an error still reach the reader.
            if this.engine.has_plaintext() {
                let n = this.engine.read(buf.initialize_unfilled());
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.engine.error() {
                let _ = this.try_send();
                return Poll::Ready(Err(e));
            }
            if matches!(this.engine.status(), Status::PeerClosed | Status::Closed) {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let want = this.engine.room().min(chunk.len());
            let mut read = ReadBuf::new(&mut chunk[..want]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The socket closed without close_notify: the end of the stream all the same.
                return Poll::Ready(Ok(()));
            }
            // An error is kept by the engine and reported once the plaintext before it is read.
            let _ = this.engine.receive(read.filled());
            if this.engine.error().is_none() {
                this.try_send()?;
            }
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
        if let Some(e) = this.engine.error() {
            // Only the alert goes out after a failure; queued frames do not.
            let _ = this.try_send();
            return Poll::Ready(Err(e));
        }
        if this.engine.unsent().len() >= MAX_UNSENT {
            ready!(this.poll_send(cx))?;
        }
        let n = this.engine.encrypt(data)?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if let Some(e) = this.engine.error() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued {
            this.close_notify_queued = true;
            // After a failure this queues nothing: the pending alert is the last word.
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
        let server_config =
            crate::tls::server_config(&crate::config::TlsConfig::default()).unwrap();
        pair_with(server_config, crate::tls::dev_client_config()).await
    }

    async fn pair_with(
        server_config: Arc<rustls::ServerConfig>,
        client_config: Arc<rustls::ClientConfig>,
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            crate::client::tls_connect(addr, "localhost", client_config)
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
        assert_eq!(server.engine.capacity(), 0);
    }

    #[tokio::test]
    async fn the_next_connection_resumes_with_a_ticket_from_the_first() {
        let server_config =
            crate::tls::server_config(&crate::config::TlsConfig::default()).unwrap();
        let client_config = crate::tls::with_resumption(&crate::tls::dev_client_config(), 8);
        for (round, resumed) in [(0u8, false), (1, true), (2, true)] {
            let (mut server, mut client) =
                pair_with(server_config.clone(), client_config.clone()).await;
            assert_eq!(server.resumed(), resumed, "round {round}");
            let kind = client.get_ref().1.handshake_kind();
            let expected = if resumed {
                rustls::HandshakeKind::Resumed
            } else {
                rustls::HandshakeKind::Full
            };
            assert_eq!(kind, Some(expected), "round {round}");
            // The tickets precede this byte, so the client has them once it reads it.
            server.write_all(&[round]).await.unwrap();
            server.flush().await.unwrap();
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).await.unwrap();
            assert_eq!(byte, [round]);
            assert_eq!(server.engine.capacity(), 0, "nothing kept for the tickets");
        }
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
