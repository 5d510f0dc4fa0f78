//! The WebSocket transport for browsers: the same sessions as the TCP listener, one protobuf
//! frame per binary WebSocket message (no length prefix). This module is the async shell around
//! [`engine`]: it reads the upgrade request under the handshake deadline, answers or refuses it,
//! then hands the connection to `connection::session` through a frame source and a frame sink,
//! so deadlines, frame caps (enforced by the engine before a message is buffered), rate limits,
//! keepalive, the slow-consumer deadline and the end of the session are the TCP listener's own
//! code. The engine sits behind a mutex that reader and writer take in turn, never across an
//! `.await` (both are polled by the same task, so it is never contended).

pub mod config;
pub mod engine;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

pub use config::WebSocketConfig;
use engine::{Engine, EngineError, Incoming, Upgrade, UpgradeStep};

use crate::connection::{ConnectionContext, End, FrameSink, FrameSource, Read};
use crate::metrics as m;
use crate::model::{CloseKind, OfflineReason};
use crate::outbound::Item;
use crate::pb;

/// Bytes read from the socket at a time (on the stack of one poll, never kept).
const READ_CHUNK: usize = 4096;
/// A write buffer above this is given back after its batch, so idle connections stay small.
const IDLE_BUFFER_BYTES: usize = 1024;
/// How long a refusal or a final Close frame may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// The wss listener's TLS configuration: the broker's, with the ALPN ids a WebSocket client
/// offers. Browsers offer `http/1.1` (and nothing of ours): a server that insists on
/// `presence/1` would refuse every browser at the handshake.
pub fn wss_config(tls: &Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut config = (**tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec(), crate::tls::ALPN.to_vec()];
    Arc::new(config)
}

/// Serves one WebSocket connection over an established stream (TLS for wss, TCP for ws): the
/// upgrade, which must be done by `deadline` (the handshake deadline counted from the accept,
/// so TLS and the upgrade share it), then the session. `permit` is held until the socket
/// closes.
pub async fn run<S, P>(
    stream: S,
    peer: SocketAddr,
    transport: crate::embed::Transport,
    ctx: Arc<ConnectionContext>,
    permit: P,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Send + 'static,
{
    // Boxed like the TLS handshake: its buffers are freed once it is over.
    let Some((stream, engine)) = Box::pin(upgrade(stream, peer, &ctx, deadline)).await else {
        return;
    };
    let (reader, writer) = tokio::io::split(stream);
    let engine = Arc::new(Mutex::new(engine));
    let source = WsSource {
        reader,
        engine: engine.clone(),
    };
    let sink = WsSink {
        writer,
        engine,
        out: Vec::new(),
        close: None,
    };
    crate::connection::session(source, sink, peer, transport, ctx, permit).await;
}

/// Reads and answers the upgrade request; `None` when it was refused, failed or timed out
/// (counted by reason), or the client did not ask for the subprotocol (closed with a reason).
async fn upgrade<S>(
    mut stream: S,
    peer: SocketAddr,
    ctx: &ConnectionContext,
    deadline: tokio::time::Instant,
) -> Option<(S, Engine)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_message = ctx.config.limits.max_frame_bytes_pre_auth as usize;
    let mut upgrade = Upgrade::default();
    let mut buf = vec![0u8; READ_CHUNK];
    let fail = |reason: &'static str| {
        metrics::counter!(m::WS_UPGRADES, "result" => reason).increment(1);
        None
    };
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut buf)) => r,
            _ = ctx.shutdown.cancelled() => return None,
        };
        let n = match read {
            Err(_) => return fail("timeout"),
            Ok(Err(_)) | Ok(Ok(0)) => return fail("closed"),
            Ok(Ok(n)) => n,
        };
        match upgrade.feed(&buf[..n], &ctx.config.websocket, max_message) {
            UpgradeStep::NeedMore => continue,
            UpgradeStep::Refused(refusal) => {
                tracing::debug!(%peer, "WebSocket upgrade refused: {}", refusal.reason);
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
                    stream.write_all(&refusal.response()).await?;
                    stream.shutdown().await
                })
                .await;
                return fail(refusal.label);
            }
            UpgradeStep::Upgraded(mut engine) => {
                let mut out = Vec::new();
                engine.take_output(&mut out);
                let written = tokio::select! {
                    r = tokio::time::timeout_at(deadline, stream.write_all(&out)) => r,
                    _ = ctx.shutdown.cancelled() => return None,
                };
                if !matches!(written, Ok(Ok(()))) {
                    return fail("closed");
                }
                if !engine.can_write() {
                    // No subprotocol: the response carried a Close frame saying so.
                    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, stream.shutdown()).await;
                    return fail("subprotocol");
                }
                metrics::counter!(m::WS_UPGRADES, "result" => "ok").increment(1);
                return Some((stream, *engine));
            }
        }
    }
}

/// One binary message → one `ClientFrame`. Protobuf would merge two frames sent in one
/// message into one (the first request lost without a word), and a TCP client's habit of a
/// length prefix fails with an obscure reason; both get a reason that says what is wrong.
pub fn decode_message(bytes: Bytes) -> Result<pb::ClientFrame, String> {
    if let Some(fields) = top_level_fields(&bytes) {
        let ids = fields.iter().filter(|&&f| f == 1).count();
        let bodies = fields.iter().filter(|&&f| f >= 2).count();
        if ids > 1 || bodies > 1 {
            return Err(format!(
                "one message holds more than one frame ({} request ids, {} requests): send each \
                 frame as its own binary message",
                ids, bodies
            ));
        }
    }
    pb::ClientFrame::decode(bytes.clone()).map_err(|e| {
        let mut rest = &bytes[..];
        let prefixed = prost::encoding::decode_varint(&mut rest)
            .is_ok_and(|len| len > 0 && len as usize == rest.len());
        if prefixed {
            format!(
                "malformed frame: {e} (it starts with its own length: a WebSocket message is one \
                 frame WITHOUT the varint length prefix)"
            )
        } else {
            format!("malformed frame: {e}")
        }
    })
}

/// The field numbers at the top level of a protobuf message, in order; `None` when it does not
/// parse (prost then says why).
fn top_level_fields(mut bytes: &[u8]) -> Option<Vec<u64>> {
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let key = prost::encoding::decode_varint(&mut bytes).ok()?;
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut bytes).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(prost::encoding::decode_varint(&mut bytes).ok()?).ok()?,
            5 => 4,
            _ => return None,
        };
        if skip > bytes.len() {
            return None;
        }
        bytes = &bytes[skip..];
        fields.push(key >> 3);
        if fields.len() > 64 {
            // Far more than any frame has: prost decides.
            return None;
        }
    }
    Some(fields)
}

fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    // A panic while the engine was locked ends this connection's task; nothing else shares it.
    engine
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Frames from WebSocket messages.
struct WsSource<R> {
    reader: ReadHalf<R>,
    engine: Arc<Mutex<Engine>>,
}

impl<R: AsyncRead + AsyncWrite + Send + Unpin> FrameSource for WsSource<R> {
    fn poll_frame(&mut self, cx: &mut Context<'_>, watch_partial: bool) -> Poll<Read> {
        loop {
            let mut engine = lock(&self.engine);
            let read = match engine.read_message() {
                Ok(Some(Incoming::Binary(bytes))) => Some(match decode_message(bytes) {
                    Ok(frame) => Read::Frame(frame),
                    Err(reason) => Read::End(End::Close(CloseKind::ProtocolViolation, reason)),
                }),
                Ok(Some(Incoming::Text)) => Some(Read::End(End::Close(
                    CloseKind::ProtocolViolation,
                    "text messages are not part of the protocol: send each frame as one binary message"
                        .into(),
                ))),
                Ok(Some(Incoming::Control)) if engine.has_output() => Some(Read::WakeWriter),
                Ok(Some(Incoming::Control)) => continue,
                // The client closed: like a socket that closed, the device lingers for the grace
                // period (a page reload comes back within it). The engine queued the answer,
                // which the writer sends as it finishes.
                Ok(Some(Incoming::Closed)) | Err(EngineError::Closed) => {
                    Some(Read::End(End::Lost(OfflineReason::ConnectionLost)))
                }
                Err(e @ EngineError::TooLarge { .. }) => {
                    Some(Read::End(End::Close(CloseKind::FrameTooLarge, e.to_string())))
                }
                Err(e @ EngineError::Protocol(_)) => {
                    Some(Read::End(End::Close(CloseKind::ProtocolViolation, e.to_string())))
                }
                Ok(None) => None,
            };
            if let Some(read) = read {
                return Poll::Ready(read);
            }
            // The engine took every byte and needs more.
            let mut buf = [0u8; READ_CHUNK];
            let mut filled = ReadBuf::new(&mut buf);
            match Pin::new(&mut self.reader).poll_read(cx, &mut filled) {
                Poll::Ready(Ok(())) if filled.filled().is_empty() => {
                    return Poll::Ready(Read::End(End::Lost(OfflineReason::ConnectionLost)))
                }
                Poll::Ready(Ok(())) => engine.feed(filled.filled()),
                Poll::Ready(Err(_)) => {
                    return Poll::Ready(Read::End(End::Lost(OfflineReason::ConnectionLost)))
                }
                Poll::Pending if watch_partial && engine.has_partial() => {
                    return Poll::Ready(Read::PartialStarted)
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn set_max_frame_bytes(&mut self, max: usize) {
        lock(&self.engine).set_max_message(max);
    }

    fn settle(&mut self) -> bool {
        lock(&self.engine).has_partial()
    }
}

/// WebSocket messages from pre-encoded delimited frames.
struct WsSink<W> {
    writer: WriteHalf<W>,
    engine: Arc<Mutex<Engine>>,
    out: Vec<u8>,
    /// The session's Close frame (code, reason), repeated in the WebSocket Close frame.
    close: Option<(u16, String)>,
}

/// The WebSocket close code for a session's close code: 1000 for a normal close, else 4000 plus
/// the protobuf `CloseCode` (4000-4999 are the application's own), so a browser's
/// `CloseEvent.code - 4000` is the `CloseCode`.
pub fn ws_close_code(code: i32) -> u16 {
    if code == pb::CloseCode::Normal as i32 {
        1000
    } else {
        4000 + code.clamp(0, 999) as u16
    }
}

/// A delimited frame without its length prefix.
fn without_prefix(frame: &Bytes) -> Bytes {
    let mut rest = &frame[..];
    match prost::encoding::decode_varint(&mut rest) {
        Ok(_) => frame.slice(frame.len() - rest.len()..),
        Err(_) => frame.clone(),
    }
}

impl<W: AsyncRead + AsyncWrite + Send + Unpin> FrameSink for WsSink<W> {
    async fn write_batch(&mut self, items: &[Item]) -> std::io::Result<usize> {
        {
            let mut engine = lock(&self.engine);
            for item in items.iter().filter(|i| !i.bytes.is_empty()) {
                let payload = without_prefix(&item.bytes);
                if item.kind == "close" {
                    if let Ok(pb::ServerFrame {
                        body: Some(pb::server_frame::Body::Close(c)),
                        ..
                    }) = pb::ServerFrame::decode(payload.clone())
                    {
                        self.close = Some((ws_close_code(c.code), c.reason));
                    }
                }
                engine
                    .send(payload)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))?;
            }
            engine.take_output(&mut self.out);
        }
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await?;
        let n = self.out.len();
        self.out.clear();
        if self.out.capacity() > IDLE_BUFFER_BYTES {
            self.out = Vec::new();
        }
        Ok(n)
    }

    async fn finish(&mut self) {
        {
            let mut engine = lock(&self.engine);
            let (code, reason) = self.close.take().unwrap_or((1001, "going away".into()));
            engine.close(code, &reason);
            engine.take_output(&mut self.out);
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            self.writer.write_all(&self.out).await?;
            self.writer.shutdown().await
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(request_id: u64) -> Vec<u8> {
        pb::ClientFrame {
            request_id,
            body: Some(pb::client_frame::Body::Ping(pb::Ping::default())),
        }
        .encode_to_vec()
    }

    #[test]
    fn one_frame_per_message_and_helpful_reasons() {
        assert_eq!(decode_message(frame(3).into()).unwrap().request_id, 3);
        let mut two = frame(3);
        two.extend(frame(4));
        let reason = decode_message(two.into()).unwrap_err();
        assert!(reason.contains("more than one frame"), "{reason}");
        let prefixed = pb::ClientFrame {
            request_id: 1,
            body: Some(pb::client_frame::Body::Connect(pb::Connect {
                token: "x".repeat(40),
                ..Default::default()
            })),
        }
        .encode_length_delimited_to_vec();
        let reason = decode_message(prefixed.into()).unwrap_err();
        assert!(
            reason.contains("WITHOUT the varint length prefix"),
            "{reason}"
        );
        assert!(top_level_fields(&[0x0b]).is_none(), "groups are not frames");
    }
}
