//! The synchronous WebSocket core: tungstenite driven over an in-memory pipe, with no socket and
//! no `.await`. The async shell (`super`) feeds it the bytes it read and writes out the bytes it
//! produced; in between, tungstenite does the HTTP parsing of the upgrade request and all the
//! framing (masking, fragments, control frames, the close handshake) under caps set here: the
//! upgrade request is at most [`MAX_REQUEST_BYTES`]; a message, and each of its frames, at most
//! the session's frame cap, which starts at the pre-auth cap and is raised after Connect, so a
//! hostile frame header never makes tungstenite reserve more than the cap in force. Bytes wait
//! in the pipe only until tungstenite asks for them, and the shell feeds more only once the
//! pipe is empty.

use std::io::{self, Read, Write};

use bytes::{Buf, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{create_response, write_response, Request};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig as EngineConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, WebSocket};

use super::config::{WebSocketConfig, PATH, SUBPROTOCOL};

/// Most bytes of an upgrade request (request line and headers, cookies included).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// tungstenite's read chunk: what it pulls from the pipe at a time, and the buffer an idle
/// connection keeps between messages.
const ENGINE_READ_BYTES: usize = 512;
/// Longest close reason a WebSocket Close frame carries (125 bytes less the code).
const MAX_CLOSE_REASON: usize = 123;

/// Bytes between the socket and tungstenite: what was read and not yet taken, and what
/// tungstenite wrote and the shell has not yet sent. Reading an empty pipe is `WouldBlock`,
/// which is how tungstenite learns that it must wait for the socket.
#[derive(Debug, Default)]
pub struct Pipe {
    input: BytesMut,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        if self.input.is_empty() {
            // Give the read's memory back: an idle connection keeps no input buffer.
            self.input = BytesMut::new();
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why an upgrade request was refused: the HTTP status and a reason for the response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// Human-readable reason (the response body).
    pub reason: String,
    /// The metric label.
    pub label: &'static str,
}

impl Refusal {
    fn new(status: StatusCode, reason: String, label: &'static str) -> Refusal {
        Refusal {
            status: status.as_u16(),
            reason,
            label,
        }
    }

    /// The HTTP response bytes.
    pub fn response(&self) -> Vec<u8> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = format!("{}\n", self.reason);
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
        )
        .into_bytes()
    }
}

/// What feeding the upgrade request produced.
#[derive(Debug)]
pub enum UpgradeStep {
    /// The request is not complete yet.
    NeedMore,
    /// Upgraded: send the 101 response in `Engine::take_output`, then serve. When the client
    /// did not ask for the subprotocol, the engine already holds a Close frame saying so.
    Upgraded(Box<Engine>),
    /// Refused: send `Refusal::response` and close.
    Refused(Refusal),
}

/// Accumulates an upgrade request (at most [`MAX_REQUEST_BYTES`]) and answers it.
#[derive(Debug, Default)]
pub struct Upgrade {
    request: Vec<u8>,
}

impl Upgrade {
    /// Adds bytes read from the socket and tries to answer the request.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        config: &WebSocketConfig,
        max_message: usize,
    ) -> UpgradeStep {
        if self.request.len() + bytes.len() > MAX_REQUEST_BYTES {
            return UpgradeStep::Refused(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the upgrade request exceeds {MAX_REQUEST_BYTES} bytes"),
                "too_large",
            ));
        }
        self.request.extend_from_slice(bytes);
        let (size, request) = match Request::try_parse(&self.request) {
            Ok(None) => return UpgradeStep::NeedMore,
            Ok(Some(parsed)) => parsed,
            Err(e) => {
                return UpgradeStep::Refused(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("not a WebSocket upgrade request: {e}"),
                    "bad_request",
                ))
            }
        };
        if let Err(refusal) = check_path(&request) {
            return UpgradeStep::Refused(refusal);
        }
        let mut response = match create_response(&request) {
            Ok(response) => response,
            Err(e) => {
                return UpgradeStep::Refused(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("not a WebSocket upgrade request: {e}"),
                    "bad_request",
                ))
            }
        };
        if let Err(refusal) = check_origin(&request, config) {
            return UpgradeStep::Refused(refusal);
        }
        let subprotocol = offers_subprotocol(&request);
        if subprotocol {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        let mut pipe = Pipe::default();
        if write_response(&mut pipe, &response).is_err() {
            return UpgradeStep::Refused(Refusal::new(
                StatusCode::BAD_REQUEST,
                "cannot encode the upgrade response".into(),
                "bad_request",
            ));
        }
        // Frames the client sent right behind its request are kept, not refused.
        pipe.input.extend_from_slice(&self.request[size..]);
        self.request = Vec::new();
        let config = EngineConfig::default()
            .read_buffer_size(ENGINE_READ_BYTES)
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let mut bounds = Boundaries::default();
        bounds.feed(&pipe.input);
        let mut engine = Engine {
            ws: WebSocket::from_raw_socket(pipe, Role::Server, Some(config)),
            bounds,
        };
        if !subprotocol {
            engine.close(
                CloseCode::Protocol.into(),
                &format!("subprotocol {SUBPROTOCOL} required (Sec-WebSocket-Protocol)"),
            );
        }
        UpgradeStep::Upgraded(Box::new(engine))
    }
}

/// The one path served.
fn check_path(request: &Request) -> Result<(), Refusal> {
    if request.uri().path() != PATH {
        let path: String = request.uri().path().chars().take(64).collect();
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no WebSocket endpoint at {path:?}: connect to {PATH}"),
            "path",
        ));
    }
    Ok(())
}

/// The `Origin` allow-list, checked once the request is a valid upgrade.
fn check_origin(request: &Request, config: &WebSocketConfig) -> Result<(), Refusal> {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("<not ASCII>"));
    if !config.origin_allowed(origin) {
        let shown: String = origin.unwrap_or("<none>").chars().take(64).collect();
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("origin {shown:?} is not in websocket.allowed_origins"),
            "origin",
        ));
    }
    Ok(())
}

fn offers_subprotocol(request: &Request) -> bool {
    request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

/// What the engine read.
#[derive(Debug)]
pub enum Incoming {
    /// A binary message: one frame's protobuf bytes.
    Binary(Bytes),
    /// A text message (not part of the protocol).
    Text,
    /// A ping, pong or other control frame; a pong reply may be waiting in the output.
    Control,
    /// The client's Close frame (the engine queued the answer).
    Closed,
}

/// Why the engine gave up on the connection.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A message or frame larger than the cap in force.
    #[error("message of {size} bytes exceeds the {max}-byte frame cap")]
    TooLarge {
        /// The announced size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// Broken WebSocket framing (unmasked frame, bad opcode, bad continuation, ...).
    #[error("{0}")]
    Protocol(String),
    /// The connection already closed.
    #[error("the WebSocket connection is closed")]
    Closed,
}

/// Where the client's bytes stand against WebSocket frame boundaries. tungstenite does the
/// framing; this only follows the frame headers (length and FIN) beside it, to know whether
/// bytes of an unfinished frame or message are held (the partial-frame deadline) and whether
/// the engine sits exactly between messages (when its buffers can be given back).
#[derive(Debug, Default)]
struct Boundaries {
    /// The current frame header so far (at most 14 bytes).
    header: [u8; 14],
    header_len: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// A data frame without FIN was seen: a fragmented message is unfinished.
    in_fragmented: bool,
    /// The largest frame payload since the engine's buffers were last renewed.
    largest: u64,
}

impl Boundaries {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = (bytes.len() as u64).min(self.remaining);
                self.remaining -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            if usize::from(self.header_len) >= self.header.len() {
                return; // Not a header tungstenite accepts: it ends the connection.
            }
            self.header[usize::from(self.header_len)] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if let Some((fin, opcode, len)) =
                parse_header(&self.header[..usize::from(self.header_len)])
            {
                self.header_len = 0;
                self.remaining = len;
                self.largest = self.largest.max(len);
                // Control frames (opcode 8 and up) may sit between fragments.
                if opcode < 8 {
                    self.in_fragmented = !fin;
                }
            }
        }
    }

    /// Bytes of an unfinished frame or message are held.
    fn partial(&self) -> bool {
        self.header_len > 0 || self.remaining > 0 || self.in_fragmented
    }
}

/// A complete frame header: (FIN, opcode, payload length); `None` while more bytes are needed.
fn parse_header(h: &[u8]) -> Option<(bool, u8, u64)> {
    let (&b0, &b1) = (h.first()?, h.get(1)?);
    let extended = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let masked = if b1 & 0x80 != 0 { 4 } else { 0 };
    if h.len() < 2 + extended + masked {
        return None;
    }
    let len = match extended {
        0 => u64::from(b1 & 0x7f),
        2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        _ => u64::from_be_bytes(h[2..10].try_into().ok()?),
    };
    Some((b0 & 0x80 != 0, b0 & 0x0f, len))
}

/// A frame payload above this makes the engine renew its buffers once it is between messages.
const RENEW_AFTER_BYTES: u64 = 4096;

/// A connection after its upgrade: tungstenite over the pipe.
#[derive(Debug)]
pub struct Engine {
    ws: WebSocket<Pipe>,
    bounds: Boundaries,
}

impl Engine {
    /// Whether the engine has taken every fed byte (the shell reads more only then).
    pub fn wants_input(&self) -> bool {
        self.ws.get_ref().input.is_empty()
    }

    /// Bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.ws.get_mut().input.extend_from_slice(bytes);
        self.bounds.feed(bytes);
    }

    /// Whether bytes of an unfinished frame, or an unfinished fragmented message, are held.
    pub fn has_partial(&self) -> bool {
        self.bounds.partial()
    }

    /// Gives back the read buffer a large message grew, once nothing is held: tungstenite keeps
    /// its buffer's capacity for the connection's life, so an idle connection would otherwise
    /// keep its largest message's worth (up to the frame cap). Only between messages, with
    /// everything read and written, while the connection is open: a new `WebSocket` over the
    /// same pipe then starts from the same state.
    fn renew_if_grown(&mut self) {
        if self.bounds.largest <= RENEW_AFTER_BYTES
            || self.bounds.partial()
            || !self.ws.get_ref().input.is_empty()
            || !self.ws.can_write()
        {
            return;
        }
        if self.ws.flush().is_err() {
            return;
        }
        let config = *self.ws.get_config();
        let pipe = std::mem::take(self.ws.get_mut());
        self.ws = WebSocket::from_raw_socket(pipe, Role::Server, Some(config));
        self.bounds.largest = 0;
    }

    /// The next message, `None` when more bytes are needed.
    pub fn read_message(&mut self) -> Result<Option<Incoming>, EngineError> {
        match self.ws.read() {
            Ok(message) => {
                let incoming = match message {
                    Message::Binary(bytes) => Incoming::Binary(bytes),
                    Message::Text(_) => Incoming::Text,
                    Message::Ping(_) => {
                        // tungstenite queued the pong; this moves it into the output now.
                        let _ = self.ws.flush();
                        Incoming::Control
                    }
                    Message::Pong(_) | Message::Frame(_) => Incoming::Control,
                    Message::Close(_) => Incoming::Closed,
                };
                Ok(Some(incoming))
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // tungstenite took every byte and returned every complete frame.
                self.renew_if_grown();
                Ok(None)
            }
            Err(WsError::Capacity(e)) => Err(capacity(e)),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Err(EngineError::Closed),
            Err(e) => Err(EngineError::Protocol(e.to_string())),
        }
    }

    /// Raises (or lowers) the message and frame cap.
    pub fn set_max_message(&mut self, max: usize) {
        self.ws.set_config(|c| {
            c.max_message_size = Some(max);
            c.max_frame_size = Some(max);
        });
    }

    /// Queues a binary message.
    pub fn send(&mut self, payload: Bytes) -> Result<(), EngineError> {
        match self.ws.write(Message::Binary(payload)) {
            Ok(()) => Ok(()),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Err(EngineError::Closed),
            Err(e) => Err(EngineError::Protocol(e.to_string())),
        }
    }

    /// Queues a Close frame with `code` and `reason` (cut to what a Close frame carries).
    pub fn close(&mut self, code: u16, reason: &str) {
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason[..end].to_string().into(),
        };
        // Closing twice, or after the client closed, is refused by tungstenite: nothing to do.
        let _ = self.ws.close(Some(frame));
    }

    /// Moves the bytes to send into `into` (after a `flush` of tungstenite's own buffer).
    pub fn take_output(&mut self, into: &mut Vec<u8>) {
        let _ = self.ws.flush();
        let out = &mut self.ws.get_mut().output;
        if into.is_empty() {
            std::mem::swap(into, out);
        } else {
            into.append(out);
        }
    }

    /// Whether messages can still be sent (no Close frame sent or received yet).
    pub fn can_write(&self) -> bool {
        self.ws.can_write()
    }

    /// Whether there are bytes to send.
    pub fn has_output(&self) -> bool {
        !self.ws.get_ref().output.is_empty()
    }
}

fn capacity(e: tokio_tungstenite::tungstenite::error::CapacityError) -> EngineError {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e {
        CapacityError::MessageTooLong { size, max_size } => EngineError::TooLarge {
            size,
            max: max_size,
        },
        other => EngineError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &str = "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: presence.v1\r\n\r\n";

    /// A masked client frame.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let mask = [1u8, 2, 3, 4];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn upgraded(extra: &[u8]) -> Engine {
        let mut bytes = REQUEST.as_bytes().to_vec();
        bytes.extend_from_slice(extra);
        match Upgrade::default().feed(&bytes, &WebSocketConfig::default(), 64) {
            UpgradeStep::Upgraded(engine) => *engine,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_upgrade_answers_101_with_the_subprotocol_and_keeps_pipelined_frames() {
        let mut engine = upgraded(&client_frame(2, true, b"abc"));
        let mut out = Vec::new();
        engine.take_output(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.contains("presence.v1"), "{text}");
        match engine.read_message().unwrap() {
            Some(Incoming::Binary(b)) => assert_eq!(&b[..], b"abc"),
            other => panic!("{other:?}"),
        }
        assert!(engine.read_message().unwrap().is_none());
        assert!(!engine.has_partial());
    }

    #[test]
    fn a_frame_header_over_the_cap_is_refused_before_its_body() {
        let mut engine = upgraded(&[]);
        // Announces 1 MiB, sends 4 bytes of it.
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        engine.feed(&frame);
        match engine.read_message() {
            Err(EngineError::TooLarge { max: 64, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fragments_beyond_the_cap_are_refused() {
        let mut engine = upgraded(&[]);
        let part = [7u8; 40];
        engine.feed(&client_frame(2, false, &part));
        engine.feed(&client_frame(0, false, &part));
        assert!(matches!(
            engine.read_message(),
            Err(EngineError::TooLarge { .. })
        ));
    }

    #[test]
    fn half_a_frame_is_partial() {
        let mut engine = upgraded(&[]);
        let frame = client_frame(2, true, b"hello");
        engine.feed(&frame[..4]);
        assert!(engine.read_message().unwrap().is_none());
        assert!(engine.has_partial());
        engine.feed(&frame[4..]);
        assert!(matches!(
            engine.read_message().unwrap(),
            Some(Incoming::Binary(_))
        ));
        assert!(!engine.has_partial());
    }

    #[test]
    fn a_ping_or_pong_is_a_whole_frame_not_a_partial_one() {
        for opcode in [9u8, 10] {
            let mut engine = upgraded(&[]);
            engine.feed(&client_frame(opcode, true, b"hb"));
            assert!(matches!(engine.read_message(), Ok(Some(Incoming::Control))));
            assert!(engine.read_message().unwrap().is_none());
            assert!(
                !engine.has_partial(),
                "opcode {opcode}: nothing unfinished is held"
            );
        }
    }

    #[test]
    fn a_message_followed_by_half_of_the_next_leaves_a_partial() {
        let mut engine = upgraded(&[]);
        let mut bytes = client_frame(2, true, b"one");
        let next = client_frame(2, true, &[5u8; 40]);
        bytes.extend_from_slice(&next[..10]);
        engine.feed(&bytes);
        assert!(matches!(
            engine.read_message(),
            Ok(Some(Incoming::Binary(_)))
        ));
        assert!(engine.read_message().unwrap().is_none());
        assert!(engine.has_partial(), "10 bytes of the next frame are held");
        engine.feed(&next[10..]);
        assert!(matches!(
            engine.read_message(),
            Ok(Some(Incoming::Binary(_)))
        ));
        assert!(!engine.has_partial());
    }

    #[test]
    fn between_fragments_a_message_is_partial() {
        let mut engine = upgraded(&[]);
        engine.feed(&client_frame(2, false, b"ab"));
        assert!(engine.read_message().unwrap().is_none());
        assert!(engine.has_partial(), "a fragmented message is unfinished");
        engine.feed(&client_frame(0, true, b"cd"));
        match engine.read_message() {
            Ok(Some(Incoming::Binary(b))) => assert_eq!(&b[..], b"abcd"),
            other => panic!("{other:?}"),
        }
        assert!(!engine.has_partial());
    }

    #[test]
    fn after_a_large_message_the_engine_renews_its_buffers_and_goes_on() {
        let mut bytes = REQUEST.as_bytes().to_vec();
        bytes.extend_from_slice(&client_frame(2, true, &[1u8; 10_000]));
        let UpgradeStep::Upgraded(mut engine) =
            Upgrade::default().feed(&bytes, &WebSocketConfig::default(), 64 * 1024)
        else {
            panic!("upgraded")
        };
        assert!(
            matches!(engine.read_message(), Ok(Some(Incoming::Binary(b))) if b.len() == 10_000)
        );
        assert!(engine.read_message().unwrap().is_none());
        assert_eq!(engine.bounds.largest, 0, "renewed");
        // The new engine keeps the cap in force and the connection's state.
        engine.feed(&client_frame(2, true, b"next"));
        assert!(
            matches!(engine.read_message(), Ok(Some(Incoming::Binary(b))) if &b[..] == b"next")
        );
        engine.feed(&client_frame(9, true, b"p"));
        assert!(matches!(engine.read_message(), Ok(Some(Incoming::Control))));
        let mut out = Vec::new();
        engine.take_output(&mut out);
        assert!(
            out.windows(3).any(|w| w == [0x8a, 1, b'p']),
            "the pong: {out:?}"
        );
    }

    #[test]
    fn refusals_name_the_reason() {
        let config = WebSocketConfig {
            allowed_origins: vec!["https://app.example".into()],
            ..Default::default()
        };
        let wrong_path = REQUEST.replace("/v1/ws", "/ws");
        let cases = [
            (wrong_path.as_str(), 404, "path"),
            (REQUEST, 403, "origin"),
            (
                "POST /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n",
                400,
                "bad_request",
            ),
            ("GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        ];
        for (request, status, label) in cases {
            match Upgrade::default().feed(request.as_bytes(), &config, 64) {
                UpgradeStep::Refused(r) => {
                    assert_eq!((r.status, r.label), (status, label), "{request}: {r:?}");
                    let response = String::from_utf8(r.response()).unwrap();
                    assert!(response.ends_with(&format!("{}\n", r.reason)), "{response}");
                }
                other => panic!("{request}: {other:?}"),
            }
        }
        let mut upgrade = Upgrade::default();
        let big = vec![b'a'; MAX_REQUEST_BYTES];
        assert!(matches!(
            upgrade.feed(b"GET /v1/ws HTTP/1.1\r\nX: ", &config, 64),
            UpgradeStep::NeedMore
        ));
        assert!(matches!(
            upgrade.feed(&big, &config, 64),
            UpgradeStep::Refused(Refusal { status: 431, .. })
        ));
    }

    #[test]
    fn without_the_subprotocol_the_upgrade_is_closed_with_a_reason() {
        let request = REQUEST.replace("Sec-WebSocket-Protocol: presence.v1\r\n", "");
        let UpgradeStep::Upgraded(mut engine) =
            Upgrade::default().feed(request.as_bytes(), &WebSocketConfig::default(), 64)
        else {
            panic!("upgraded")
        };
        let mut out = Vec::new();
        engine.take_output(&mut out);
        let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let close = &out[at..];
        assert_eq!(close[0], 0x88, "a Close frame");
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002);
        assert!(String::from_utf8_lossy(&close[4..]).contains("presence.v1"));
    }
}
