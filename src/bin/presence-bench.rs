//! `presence-bench`: a load generator that runs the same presence workloads against presenced's
//! native protocol or an MQTT 3.1.1 broker doing presence the MQTT way (a retained
//! `presence/<user>` topic per user, Last Will = offline), over TLS or plain TCP (and, for the
//! native protocol, over WebSocket: wss or ws, one frame per binary message), with the same
//! payload bytes (an encoded `Presence` whose status carries a sequence number and a send
//! timestamp). Connections are raw sockets driven many per task (one task per group, not per
//! connection), so the generator stays light next to the broker. Prints one JSON line per run:
//! deliveries/s, latency percentiles from HDR histograms, delivery and final-state ratios,
//! restore times, and (with `--pid`) broker memory per connection.
//!
//! The reconnect storm gives each simulated client (a phone) a TLS configuration of its own, so
//! its resumption store holds only the tickets it was given (`--resumption on`, the default) or
//! nothing (`off`). It counts how each reconnect's handshake went (full or resumed, as the
//! client's rustls connection reports it) and, with `--pid`, the broker's CPU time (utime +
//! stime from `/proc/<pid>/stat`) from just before the drop until every client is back; with
//! `--metrics`, the broker's own handshake counters over the same span.
//!
//! Cluster mode: `--watch-addr` (repeatable) puts the watching connections of `fanout` and
//! `node-death` on other nodes than the publisher (`--addr`), so a run measures the cross-node
//! hop; `node-death` SIGKILLs a node holding many devices and measures how long the watchers on
//! the other nodes take to learn that every device went offline.
//!
//! WebSocket (`--transport wss|ws`): the upgrade is tokio-tungstenite's client handshake; after
//! it the connection is framed by the small client-side framer below (see `WsFraming`), so a
//! WebSocket connection is read and written through the same byte-level halves as a TCP one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use presenced::auth::dev_token;
use presenced::client::ClientCodec;
use presenced::pb;
use presenced::pb::client_frame::Body as ClientBody;
use presenced::pb::server_frame::Body as ServerBody;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;

/// The listener a run connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// TLS TCP (the broker's `listen`).
    Tls,
    /// Plain TCP (`plain_listen`).
    Plain,
    /// WebSocket over TLS (`[websocket] listen`), native driver only.
    Wss,
    /// WebSocket over plain TCP (`[websocket] plain_listen`), native driver only.
    Ws,
}

impl Transport {
    fn tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    fn websocket(self) -> bool {
        matches!(self, Transport::Wss | Transport::Ws)
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Plain => "plain",
            Transport::Wss => "wss",
            Transport::Ws => "ws",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    /// presenced's delimited-protobuf protocol.
    Native,
    /// MQTT 3.1.1: retained presence/<user> topics and a Last Will.
    Mqtt,
}

/// Presence load generator (native presenced or MQTT, same workload).
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator for presenced and MQTT brokers: fanout, mix, idle and storm workloads"
)]
struct Args {
    #[arg(long, value_enum, default_value = "native")]
    driver: Driver,
    /// Broker address (the publisher's node, in cluster runs).
    #[arg(long, default_value = "127.0.0.1:7883")]
    addr: SocketAddr,
    /// Where the watching connections go (repeatable, spread round-robin): fanout's watchers
    /// and node-death's watchers. Default: `--addr`. Other workloads refuse it.
    #[arg(long = "watch-addr", value_name = "ADDR")]
    watch_addrs: Vec<SocketAddr>,
    /// The listener `--addr` (and `--watch-addr`) point at: TLS, plain TCP, or WebSocket over
    /// TLS (wss) or plain TCP (ws) at `/v1/ws` with the `presence.v1` subprotocol.
    #[arg(long, value_enum, default_value = "tls")]
    transport: Transport,
    /// Same as `--transport plain` (kept for existing scripts).
    #[arg(long, conflicts_with = "transport")]
    plain: bool,
    /// CA to trust (the embedded dev CA when the file is missing).
    #[arg(long, default_value = "certs-dev/ca.pem")]
    ca: PathBuf,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Broker process id, to report its memory (RSS) per connection (idle) and its CPU time
    /// per reconnect (storm).
    #[arg(long)]
    pid: Option<u32>,
    /// The broker's Prometheus endpoint (host:port, `GET /metrics`): the storm reports the
    /// change of its `presence_tls_handshakes_total` by kind, and of its failed handshakes, over
    /// the reconnects. presenced only.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Connections driven by one task.
    #[arg(long, default_value_t = 250)]
    per_task: usize,
    /// Spread connections over this many IPv4 loopback source addresses (127.0.0.1, .2, ...),
    /// as clients behind different addresses would be; 1 keeps them all on 127.0.0.1.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// A prefix for every user name, so runs against the same broker never see each other's
    /// retained state (default: derived from the clock).
    #[arg(long)]
    run_id: Option<String>,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Clone, Subcommand)]
enum Workload {
    /// One user watched by many: the publisher changes status at a fixed rate.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        /// Status changes to publish.
        #[arg(long, default_value_t = 200)]
        changes: u64,
        /// Changes per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
    },
    /// N users, each watching the K users after it (so each is watched by K), a share of them
    /// changing status every second.
    Mix {
        #[arg(long, default_value_t = 5000)]
        users: usize,
        #[arg(long, default_value_t = 20)]
        watch: usize,
        /// Percent of users changing status per second.
        #[arg(long, default_value_t = 1.0)]
        percent_per_sec: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Idle connections: broker memory per connection (needs --pid).
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
    /// Clients watching one user all lose their connections at once and reconnect together;
    /// measured until every client has its presence snapshot back.
    Storm {
        #[arg(long, default_value_t = 10000)]
        clients: usize,
        /// TLS session resumption: `on`, each client keeps the tickets it received in a store
        /// of its own and offers one when it reconnects; `off`, every reconnect is a full
        /// handshake.
        #[arg(long, value_enum, default_value = "on")]
        resumption: Resumption,
    },
    /// Cluster mode: watchers on the `--watch-addr` nodes subscribe to `devices` users, each
    /// then connected once on the `--addr` node; once every watcher saw them all online, the
    /// `--addr` node (process `--kill-pid`) is SIGKILLed, and the run measures from the kill
    /// until each watcher saw every device's OFFLINE (peer timeout + grace period).
    NodeDeath {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// The process id of the `--addr` node, SIGKILLed by the run.
        #[arg(long)]
        kill_pid: u32,
        /// Longest wait for the OFFLINEs after the kill, seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

/// Whether storm clients resume their TLS sessions (`Workload::Storm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Resumption {
    /// Each client keeps the tickets it received and offers one when it reconnects.
    On,
    /// No client keeps anything: every handshake is full.
    Off,
}

impl Resumption {
    fn name(self) -> &'static str {
        match self {
            Resumption::On => "on",
            Resumption::Off => "off",
        }
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The payload both drivers carry: a Presence whose status is "<seq>:<sent_ns>".
fn presence(user: &str, seq: u64) -> pb::Presence {
    pb::Presence {
        user_id: user.into(),
        availability: pb::Availability::Online as i32,
        status: format!("{seq}:{}", now_ns()),
        ..Default::default()
    }
}

fn parse_status(status: &str) -> Option<(u64, u64)> {
    let (seq, sent) = status.split_once(':')?;
    Some((seq.parse().ok()?, sent.parse().ok()?))
}

fn rss_kib(pid: u32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time `pid` has used so far, user plus system, in clock ticks (fields 14 and 15 of
/// `/proc/<pid>/stat`, counted after the command name, which may hold spaces and parentheses).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    // After the name: state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`), the unit of `/proc/<pid>/stat`'s times. libc is
/// not a dependency of this crate, so `sysconf` is asked through `getconf`; 100 (Linux's value
/// on every common architecture) when that fails.
fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// The broker's TLS handshakes so far, from its Prometheus endpoint.
#[derive(Debug, Clone, Copy, Default)]
struct BrokerHandshakes {
    /// Completed full handshakes (`presence_tls_handshakes_total{kind="full"}`; one after a
    /// HelloRetryRequest included).
    full: u64,
    /// Completed resumed handshakes (`kind="resumed"`).
    resumed: u64,
    /// Failed handshakes, every reason (`presence_tls_handshake_failures_total`): a deadline
    /// passed under load, or the client went away.
    failed: u64,
}

/// Scrapes [`BrokerHandshakes`] from the Prometheus endpoint at `addr`; `None` when the scrape
/// fails.
async fn scrape_handshakes(addr: SocketAddr) -> Option<BrokerHandshakes> {
    let scrape = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        // HTTP/1.0: the answer is the whole body, then the close; no chunked encoding.
        socket
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: presence-bench\r\n\r\n")
            .await?;
        let mut body = String::new();
        socket.read_to_string(&mut body).await?;
        std::io::Result::Ok(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), scrape)
        .await
        .ok()?
        .ok()?;
    if !body.starts_with("HTTP/1.") || !body.contains(" 200 ") {
        return None;
    }
    let mut counts = BrokerHandshakes::default();
    for line in body.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let value = value as u64;
        match name {
            "presence_tls_handshakes_total" if labels.contains("kind=\"resumed\"") => {
                counts.resumed += value
            }
            "presence_tls_handshakes_total" => counts.full += value,
            "presence_tls_handshake_failures_total" => counts.failed += value,
            _ => {}
        }
    }
    Some(counts)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is a valid histogram")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Connections: TLS or plain, native or MQTT, read and written through the same two halves.
// ---------------------------------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type Stream = Box<dyn Io>;

/// What a connection received that the workloads care about.
enum Incoming {
    /// A presence of `user` with this status, live or (`snapshot`) as current state;
    /// `online` is false for an OFFLINE event (native) or an offline presence (MQTT).
    Status {
        user: String,
        status: String,
        snapshot: bool,
        online: bool,
    },
    /// The broker acknowledged a subscription.
    Subscribed,
    Other,
}

struct Reader {
    driver: Driver,
    half: ReadHalf<Stream>,
    buf: BytesMut,
    codec: ClientCodec,
    /// WebSocket transports: the framing state (`None` on TCP, where frames are delimited).
    ws: Option<WsFraming>,
}

struct Writer {
    driver: Driver,
    /// Shared with the reader on WebSocket transports, which answers Pings and Closes itself.
    out: Arc<tokio::sync::Mutex<Out>>,
    websocket: bool,
    next_id: u64,
}

/// A connection's write half.
struct Out {
    half: WriteHalf<Stream>,
    /// xorshift64 state for WebSocket masking keys.
    mask_state: u64,
}

impl Out {
    /// Writes `bytes` and flushes them out of the TLS layer.
    async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.half.write_all(bytes).await?;
        self.half.flush().await?;
        Ok(())
    }

    /// Writes one masked WebSocket frame (FIN set) with `opcode` and `payload`.
    async fn write_ws(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        // The key only has to be fresh per frame for the server's unmasking to cost what it
        // costs a browser; RFC 6455's unpredictability (against proxy cache poisoning) does not
        // matter on loopback, so a xorshift stands in for a CSPRNG.
        self.mask_state ^= self.mask_state << 13;
        self.mask_state ^= self.mask_state >> 7;
        self.mask_state ^= self.mask_state << 17;
        let frame = ws_frame(opcode, payload, (self.mask_state as u32).to_be_bytes());
        self.write(&frame).await
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket framing, client side.
//
// Why a framer here rather than tokio-tungstenite's `WebSocketStream` after the upgrade: the
// generator drives raw connections, 250 per task, each read through its own `BytesMut` and
// written through its own half, and measures latency where a frame comes out of that buffer.
// A `WebSocketStream` per connection would add, on the same 2 cores as the broker, a BiLock
// between its split halves, waker proxies on every poll, a `Message` per frame and a read
// buffer of its own (128 KiB by default) per connection: client costs that the WebSocket
// figures would then carry and the TCP ones not. With this framer a server frame costs the
// client a 2-4 byte header parse more than a delimited frame, and a client frame its masking,
// so wss/tls and ws/plain ratios measure the broker's WebSocket path. The upgrade itself is
// tungstenite's client handshake (`Generator::upgrade`).
// ---------------------------------------------------------------------------------------------

const WS_CONTINUATION: u8 = 0x0;
const WS_TEXT: u8 = 0x1;
const WS_BINARY: u8 = 0x2;
const WS_CLOSE: u8 = 0x8;
const WS_PING: u8 = 0x9;
const WS_PONG: u8 = 0xA;

/// Largest message (and frame) accepted from the broker, as for delimited frames.
const MAX_SERVER_MESSAGE: usize = 1024 * 1024;

/// A client frame: FIN, `opcode`, the mask bit and key, and `payload` masked with it.
fn ws_frame(opcode: u8, payload: &[u8], key: [u8; 4]) -> BytesMut {
    let mut out = BytesMut::with_capacity(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.put_u8(0x80 | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0x80 | 127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// One whole server frame from the front of `buf`: (FIN, opcode, payload); `None` until it is
/// all there. Server frames must be unmasked, with no reserved bits (no extension was
/// negotiated), at most `MAX_SERVER_MESSAGE` bytes.
fn take_ws_frame(buf: &mut BytesMut) -> anyhow::Result<Option<(bool, u8, Bytes)>> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        bail!("WebSocket frame with reserved bits set: {b0:#04x}");
    }
    if b1 & 0x80 != 0 {
        bail!("masked WebSocket frame from the server");
    }
    let (header, len) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as u64),
        127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into()?)),
        126 | 127 => return Ok(None),
        n => (2, n as u64),
    };
    if len > MAX_SERVER_MESSAGE as u64 {
        bail!("WebSocket frame of {len} bytes from the server");
    }
    let len = len as usize;
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    buf.advance(header);
    Ok(Some((
        b0 & 0x80 != 0,
        b0 & 0x0f,
        buf.split_to(len).freeze(),
    )))
}

/// A WebSocket connection's read side: fragments of a message in progress, and the write half
/// for the answers to control frames.
struct WsFraming {
    out: Arc<tokio::sync::Mutex<Out>>,
    /// The opcode and bytes of a fragmented message so far.
    fragments: Option<(u8, BytesMut)>,
}

fn put_remaining_length(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if n == 0 {
            return;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

fn mqtt_packet(header: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(header);
    put_remaining_length(&mut out, body.len());
    out.put_slice(body);
    out
}

/// One whole MQTT packet from the front of `buf`: (first header byte, body).
fn take_mqtt_packet(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if buf.len() < i + len {
        return None;
    }
    let header = buf[0];
    buf.advance(i);
    Some((header, buf.split_to(len).freeze()))
}

fn status_of(payload: &[u8], snapshot: bool) -> anyhow::Result<Incoming> {
    let p = pb::Presence::decode(payload)?;
    Ok(Incoming::Status {
        online: p.availability != pb::Availability::Offline as i32,
        user: p.user_id,
        status: p.status,
        snapshot,
    })
}

impl Reader {
    /// Reads more bytes into the buffer; an error once the connection closed.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.half.read_buf(&mut self.buf).await? == 0 {
            bail!("connection closed");
        }
        Ok(())
    }

    /// The next binary WebSocket message, answering Pings and the broker's Close on the way.
    async fn next_ws_message(&mut self) -> anyhow::Result<Bytes> {
        loop {
            let Some((fin, opcode, payload)) = take_ws_frame(&mut self.buf)? else {
                self.fill().await?;
                continue;
            };
            let ws = self.ws.as_mut().context("not a WebSocket connection")?;
            match opcode {
                WS_PING => {
                    if payload.len() > 125 {
                        bail!("WebSocket Ping of {} bytes", payload.len());
                    }
                    ws.out.lock().await.write_ws(WS_PONG, &payload).await?;
                }
                WS_PONG => {}
                WS_CLOSE => {
                    // Echo the close (best effort), as RFC 6455 asks, then end the connection.
                    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                    let echo = payload.get(..2).unwrap_or_default();
                    let _ = ws.out.lock().await.write_ws(WS_CLOSE, echo).await;
                    bail!("closed by the broker: WebSocket close {code:?} {reason:?}");
                }
                WS_BINARY | WS_TEXT if fin && ws.fragments.is_none() => {
                    if opcode == WS_TEXT {
                        bail!("text message from the broker");
                    }
                    return Ok(payload);
                }
                WS_BINARY | WS_TEXT if ws.fragments.is_none() => {
                    ws.fragments = Some((opcode, BytesMut::from(&payload[..])));
                }
                WS_CONTINUATION if ws.fragments.is_some() => {
                    let Some((first, mut message)) = ws.fragments.take() else {
                        unreachable!("checked by the guard");
                    };
                    if message.len() + payload.len() > MAX_SERVER_MESSAGE {
                        bail!("fragmented WebSocket message over {MAX_SERVER_MESSAGE} bytes");
                    }
                    message.extend_from_slice(&payload);
                    if !fin {
                        ws.fragments = Some((first, message));
                    } else if first == WS_TEXT {
                        bail!("text message from the broker");
                    } else {
                        return Ok(message.freeze());
                    }
                }
                other => bail!("unexpected WebSocket opcode {other:#x} (fin {fin})"),
            }
        }
    }

    /// The next native frame.
    async fn next_frame(&mut self) -> anyhow::Result<pb::ServerFrame> {
        if self.ws.is_some() {
            let message = self.next_ws_message().await?;
            return Ok(pb::ServerFrame::decode(message)?);
        }
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// The next MQTT packet: (first header byte, body).
    async fn next_packet(&mut self) -> anyhow::Result<(u8, Bytes)> {
        loop {
            if let Some(packet) = take_mqtt_packet(&mut self.buf) {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// The next frame or packet; an error when the connection closed or sent garbage.
    async fn next(&mut self) -> anyhow::Result<Incoming> {
        match self.driver {
            Driver::Native => Ok(match self.next_frame().await?.body {
                Some(ServerBody::PresenceEvent(e)) => match e.presence {
                    Some(p) => Incoming::Status {
                        online: e.kind != pb::EventKind::Offline as i32
                            && p.availability != pb::Availability::Offline as i32,
                        user: e.user_id,
                        status: p.status,
                        snapshot: false,
                    },
                    None => Incoming::Other,
                },
                Some(ServerBody::Close(c)) => bail!("closed by the broker: {c:?}"),
                Some(ServerBody::Error(e)) => bail!("error frame: {e:?}"),
                _ => Incoming::Other,
            }),
            Driver::Mqtt => {
                let (header, body) = self.next_packet().await?;
                match header >> 4 {
                    3 => {
                        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize + 2;
                        let payload = body.get(topic_len..).context("short PUBLISH")?;
                        status_of(payload, header & 1 == 1)
                    }
                    9 => Ok(Incoming::Subscribed),
                    _ => Ok(Incoming::Other),
                }
            }
        }
    }

    /// Reads until the reply to a subscription or presence query; the snapshot statuses it
    /// carries (native) or that came with it (MQTT sends retained messages after SUBACK; see
    /// `Workload::Storm`).
    async fn until_snapshot(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        if self.driver == Driver::Native {
            loop {
                let presences = match self.next_frame().await?.body {
                    Some(ServerBody::GetPresenceResult(r)) => r.presences,
                    Some(ServerBody::SubscribeResult(r)) => r.presences,
                    Some(ServerBody::Error(e)) => bail!("subscribe refused: {e:?}"),
                    _ => continue,
                };
                return Ok(presences
                    .into_iter()
                    .map(|p| (p.user_id, p.status))
                    .collect());
            }
        }
        let mut snapshot = Vec::new();
        loop {
            match self.next().await? {
                Incoming::Subscribed => return Ok(snapshot),
                Incoming::Status {
                    user,
                    status,
                    snapshot: true,
                    ..
                } => snapshot.push((user, status)),
                _ => {}
            }
        }
    }
}

impl Writer {
    /// Writes `bytes` and flushes them out of the TLS layer.
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out.lock().await.write(bytes).await
    }

    /// Sends one native frame: length-delimited on TCP, one binary message on WebSocket.
    async fn send_native(&mut self, body: ClientBody) -> anyhow::Result<()> {
        self.next_id += 1;
        let frame = pb::ClientFrame {
            request_id: self.next_id,
            body: Some(body),
        };
        if self.websocket {
            let payload = frame.encode_to_vec();
            return self.out.lock().await.write_ws(WS_BINARY, &payload).await;
        }
        let mut buf = BytesMut::new();
        ClientCodec::new(usize::MAX).encode(frame, &mut buf)?;
        self.send(&buf).await
    }

    async fn subscribe(&mut self, users: &[String]) -> anyhow::Result<()> {
        match self.driver {
            Driver::Native => {
                self.send_native(ClientBody::Subscribe(pb::Subscribe {
                    user_ids: users.to_vec(),
                    expiry_seconds: 0,
                    idempotency_key: String::new(),
                }))
                .await
            }
            Driver::Mqtt => {
                let mut body = BytesMut::new();
                body.put_u16(1);
                for user in users {
                    put_str(&mut body, format!("presence/{user}").as_bytes());
                    body.put_u8(0);
                }
                self.send(&mqtt_packet(0x82, &body)).await
            }
        }
    }

    /// Asks for the current presence of `users` after a reconnect. presenced keeps
    /// subscriptions across sessions, so a native client only queries (GetPresence, nothing
    /// written); an MQTT client with a clean session must subscribe again to get the retained
    /// messages.
    async fn request_snapshot(&mut self, users: &[String]) -> anyhow::Result<()> {
        match self.driver {
            Driver::Native => {
                self.send_native(ClientBody::GetPresence(pb::GetPresence {
                    user_ids: users.to_vec(),
                }))
                .await
            }
            Driver::Mqtt => self.subscribe(users).await,
        }
    }

    /// Sets `user`'s status to `<seq>:<now>` (MQTT: a retained PUBLISH to its topic).
    async fn publish(&mut self, user: &str, seq: u64) -> anyhow::Result<()> {
        let p = presence(user, seq);
        match self.driver {
            Driver::Native => {
                self.send_native(ClientBody::SetPresence(pb::SetPresence {
                    status: Some(p.status),
                    ..Default::default()
                }))
                .await
            }
            Driver::Mqtt => {
                let topic = format!("presence/{user}");
                let payload = p.encode_to_vec();
                let mut body = BytesMut::with_capacity(topic.len() + payload.len() + 2);
                put_str(&mut body, topic.as_bytes());
                body.put_slice(&payload);
                self.send(&mqtt_packet(0x31, &body)).await
            }
        }
    }
}

/// Connect attempts that failed and were retried, reported with the results.
static CONNECT_RETRIES: AtomicU64 = AtomicU64::new(0);

/// Completed client TLS handshakes of this run, full (a HelloRetryRequest included) and
/// resumed, as rustls reports them once each handshake is done.
static HANDSHAKES_FULL: AtomicU64 = AtomicU64::new(0);
static HANDSHAKES_RESUMED: AtomicU64 = AtomicU64::new(0);

/// (full, resumed) client handshakes so far.
fn handshakes() -> (u64, u64) {
    (
        HANDSHAKES_FULL.load(Ordering::Relaxed),
        HANDSHAKES_RESUMED.load(Ordering::Relaxed),
    )
}

/// Sessions a phone's store remembers: rustls's in-memory cache keyed by server name (one
/// here), each name holding up to 8 TLS 1.3 tickets; the size `with_resumption(&base, 2)` uses.
const PHONE_SESSIONS: usize = 2;

/// A simulated phone's resumption store: rustls's in-memory cache, as
/// `presenced::tls::with_resumption(&base, PHONE_SESSIONS)` builds it, counting what it is
/// given so the storm can check that every client holds a ticket before the drop.
#[derive(Debug)]
struct PhoneSessions {
    inner: rustls::client::ClientSessionMemoryCache,
    /// TLS 1.3 tickets and TLS 1.2 sessions received, in all.
    received: AtomicU64,
}

impl rustls::client::ClientSessionStore for PhoneSessions {
    fn set_kx_hint(&self, name: rustls::pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group)
    }

    fn kx_hint(&self, name: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.inner.set_tls12_session(name, value)
    }

    fn tls12_session(
        &self,
        name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &rustls::pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(name)
    }

    fn insert_tls13_ticket(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(name, value)
    }

    fn take_tls13_ticket(
        &self,
        name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

/// One storm client's TLS configuration: `base` with a resumption store of its own, or with
/// resumption disabled.
struct Phone {
    config: Arc<rustls::ClientConfig>,
    /// The store, with resumption on.
    sessions: Option<Arc<PhoneSessions>>,
}

impl Phone {
    fn new(base: &rustls::ClientConfig, resumption: Resumption) -> Phone {
        match resumption {
            Resumption::Off => Phone {
                config: presenced::tls::with_resumption(base, 0),
                sessions: None,
            },
            Resumption::On => {
                let sessions = Arc::new(PhoneSessions {
                    inner: rustls::client::ClientSessionMemoryCache::new(PHONE_SESSIONS),
                    received: AtomicU64::new(0),
                });
                let mut config = base.clone();
                config.resumption = rustls::client::Resumption::store(sessions.clone());
                Phone {
                    config: Arc::new(config),
                    sessions: Some(sessions),
                }
            }
        }
    }

    /// Tickets (or TLS 1.2 sessions) this phone has received so far.
    fn received(&self) -> u64 {
        self.sessions
            .as_ref()
            .map_or(0, |s| s.received.load(Ordering::Relaxed))
    }
}

struct Generator {
    args: Args,
    /// `--transport`, or `plain` with `--plain`.
    transport: Transport,
    /// The TLS configuration of every connection that is not a storm client. Its resumption
    /// store (rustls's default) is shared by all of them.
    tls: Arc<rustls::ClientConfig>,
    /// Storm client `i`'s own TLS configuration, so each resumes only with the tickets it was
    /// given (empty for other workloads and without TLS).
    phones: Vec<Phone>,
    prefix: String,
}

impl Generator {
    fn new(args: Args) -> anyhow::Result<Generator> {
        let transport = if args.plain {
            Transport::Plain
        } else {
            args.transport
        };
        if transport.websocket() && args.driver != Driver::Native {
            bail!("--transport {} needs --driver native", transport.name());
        }
        let config = if args.ca.exists() {
            presenced::tls::client_config_from_file(&args.ca)?
        } else {
            presenced::tls::dev_client_config()
        };
        let mut config = (*config).clone();
        if args.driver == Driver::Mqtt || transport.websocket() {
            // MQTT brokers speak no presence/1 ALPN, and a WebSocket is HTTP/1.1 underneath. A
            // browser offers `http/1.1`, which presenced's wss listener refuses today (its TLS
            // configuration lists only presence/1); offering none is accepted by both and costs
            // the same.
            config.alpn_protocols.clear();
        }
        let prefix = args
            .run_id
            .clone()
            .unwrap_or_else(|| format!("r{}", now_ns() / 1_000_000 % 100_000_000));
        let phones = match args.workload {
            Workload::Storm {
                clients,
                resumption,
            } if transport.tls() => (0..clients)
                .map(|_| Phone::new(&config, resumption))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Generator {
            args,
            transport,
            tls: Arc::new(config),
            phones,
            prefix,
        })
    }

    fn user(&self, name: impl std::fmt::Display) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The node watching connection `i` goes to: `--watch-addr`s round-robin, else `--addr`.
    fn watch_addr(&self, i: usize) -> SocketAddr {
        match self.args.watch_addrs.len() {
            0 => self.args.addr,
            n => self.args.watch_addrs[i % n],
        }
    }

    fn source(&self, addr: SocketAddr, i: usize) -> Option<SocketAddr> {
        if self.args.sources <= 1 || !addr.ip().is_loopback() {
            return None;
        }
        let host = 1 + (i % self.args.sources as usize) as u8;
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
            0,
        ))
    }

    /// Connection `i`'s byte stream to `addr`: TCP, TLS, then the WebSocket upgrade if any.
    async fn stream(&self, addr: SocketAddr, i: usize) -> anyhow::Result<Stream> {
        let tcp = match self.source(addr, i) {
            Some(local) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(local)?;
                socket.connect(addr).await?
            }
            None => tokio::net::TcpStream::connect(addr).await?,
        };
        tcp.set_nodelay(true)?;
        let stream: Stream = if self.transport.tls() {
            let name = presenced::tls::server_name(&self.args.server_name)?;
            let config = self.phones.get(i).map_or(&self.tls, |p| &p.config);
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await?;
            match tls.get_ref().1.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => &HANDSHAKES_RESUMED,
                _ => &HANDSHAKES_FULL,
            }
            .fetch_add(1, Ordering::Relaxed);
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        if self.transport.websocket() {
            return self.upgrade(stream, addr).await;
        }
        Ok(stream)
    }

    /// The WebSocket upgrade at `/v1/ws` with the `presence.v1` subprotocol, by tungstenite's
    /// client handshake; returns the byte stream behind it, framed from then on by `WsFraming`.
    /// Nothing is lost with the handshake's buffer: the broker sends nothing after its 101
    /// response until the client's first frame (it sends a Close only when the subprotocol is
    /// missing, which the response check below would catch).
    async fn upgrade(&self, stream: Stream, addr: SocketAddr) -> anyhow::Result<Stream> {
        use presenced::ws::config::{PATH, SUBPROTOCOL};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
        let scheme = if self.transport.tls() { "wss" } else { "ws" };
        let url = format!("{scheme}://{}:{}{PATH}", self.args.server_name, addr.port());
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        // The handshake's WebSocket is dropped at once: keep its read buffer small.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .context("WebSocket upgrade")?;
        let protocol = response.headers().get(header::SEC_WEBSOCKET_PROTOCOL);
        if protocol.and_then(|p| p.to_str().ok()) != Some(SUBPROTOCOL) {
            bail!("the upgrade response did not select {SUBPROTOCOL}: {protocol:?}");
        }
        Ok(ws.into_inner())
    }

    /// Opens connection `i` as `user` and waits for the broker's acceptance. MQTT connections
    /// carry a retained Last Will saying the user is offline.
    async fn open(&self, i: usize, user: &str) -> anyhow::Result<(Reader, Writer)> {
        self.open_at(self.args.addr, i, user).await
    }

    /// `open` on the broker (node) at `addr`.
    async fn open_at(
        &self,
        addr: SocketAddr,
        i: usize,
        user: &str,
    ) -> anyhow::Result<(Reader, Writer)> {
        let driver = self.args.driver;
        let (read, write) = tokio::io::split(self.stream(addr, i).await?);
        let websocket = self.transport.websocket();
        let out = Arc::new(tokio::sync::Mutex::new(Out {
            half: write,
            mask_state: (now_ns() ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
        }));
        let mut reader = Reader {
            driver,
            half: read,
            buf: BytesMut::with_capacity(4096),
            codec: ClientCodec::new(MAX_SERVER_MESSAGE),
            ws: websocket.then(|| WsFraming {
                out: out.clone(),
                fragments: None,
            }),
        };
        let mut writer = Writer {
            driver,
            out,
            websocket,
            next_id: 0,
        };
        match driver {
            Driver::Native => {
                writer
                    .send_native(ClientBody::Connect(pb::Connect {
                        token: dev_token(user, 3600),
                        ..Default::default()
                    }))
                    .await?;
                loop {
                    let frame = reader.next_frame().await.context("before ConnAck")?;
                    match frame.body {
                        Some(ServerBody::ConnAck(_)) => break,
                        Some(ServerBody::Error(e)) => bail!("connect refused: {e:?}"),
                        Some(ServerBody::Close(c)) => bail!("connect closed: {c:?}"),
                        _ => {}
                    }
                }
            }
            Driver::Mqtt => {
                let offline = pb::Presence {
                    user_id: user.into(),
                    availability: pb::Availability::Offline as i32,
                    ..Default::default()
                }
                .encode_to_vec();
                let mut body = BytesMut::new();
                put_str(&mut body, b"MQTT");
                body.put_u8(4); // protocol level 3.1.1
                body.put_u8(0x02 | 0x04 | 0x20); // clean session, will flag, will retain (QoS 0)
                body.put_u16(60); // keepalive
                put_str(&mut body, user.as_bytes());
                put_str(&mut body, format!("presence/{user}").as_bytes());
                put_str(&mut body, &offline);
                writer.send(&mqtt_packet(0x10, &body)).await?;
                let ack = reader.next_packet().await.context("before CONNACK")?;
                if ack.0 >> 4 != 2 || ack.1.get(1) != Some(&0) {
                    bail!("mqtt CONNACK refused: {:#x} {:?}", ack.0, ack.1);
                }
            }
        }
        Ok((reader, writer))
    }

    /// `open`, retried a few times (a broker may drop connections under a connect burst;
    /// Mosquitto does), each retry counted so the report shows it.
    async fn open_retrying(&self, i: usize, user: &str) -> anyhow::Result<(Reader, Writer)> {
        self.open_retrying_at(self.args.addr, i, user).await
    }

    /// `open_retrying` on the broker (node) at `addr`.
    async fn open_retrying_at(
        &self,
        addr: SocketAddr,
        i: usize,
        user: &str,
    ) -> anyhow::Result<(Reader, Writer)> {
        let mut attempt = 0;
        loop {
            match self.open_at(addr, i, user).await {
                Ok(c) => return Ok(c),
                Err(e) if attempt >= 5 => return Err(e).with_context(|| format!("connection {i}")),
                Err(_) => {
                    attempt += 1;
                    CONNECT_RETRIES.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
    }

    /// Opens connection `i` for each user on `--addr`, `--connect-concurrency` at a time, each
    /// subscribed to `watch(i)` when that is not empty.
    async fn open_all(
        &self,
        users: &[String],
        watch: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<Vec<(Reader, Writer)>> {
        self.open_all_at(users, |_| self.args.addr, watch).await
    }

    /// `open_all` with connection `i` on the broker (node) at `addr(i)`.
    async fn open_all_at(
        &self,
        users: &[String],
        addr: impl Fn(usize) -> SocketAddr,
        watch: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<Vec<(Reader, Writer)>> {
        let in_flight = self.args.connect_concurrency.max(1);
        let mut out = Vec::with_capacity(users.len());
        for chunk_start in (0..users.len()).step_by(in_flight) {
            let chunk = chunk_start..(chunk_start + in_flight).min(users.len());
            let opening = chunk.map(|i| {
                let targets = watch(i);
                let at = addr(i);
                async move {
                    let (mut r, mut w) = self.open_retrying_at(at, i, &users[i]).await?;
                    if !targets.is_empty() {
                        w.subscribe(&targets).await?;
                        r.until_snapshot().await?;
                    }
                    anyhow::Ok((r, w))
                }
            });
            for conn in futures_util::future::join_all(opening).await {
                out.push(conn?);
            }
        }
        Ok(out)
    }

    fn report(&self, workload: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "driver".into(),
            format!("{:?}", self.args.driver).to_lowercase().into(),
        );
        m.insert("workload".into(), workload.into());
        m.insert("transport".into(), self.transport.name().into());
        m
    }

    fn rss(&self) -> Option<f64> {
        self.args.pid.and_then(rss_kib)
    }
}

/// Drains a connection whose incoming frames nobody needs (replies to a publisher), so the
/// broker never sees it as a slow consumer.
fn drain(mut reader: Reader) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while reader.next().await.is_ok() {} })
}

// ---------------------------------------------------------------------------------------------
// Receiving: readers grouped many per task, latency into one histogram per group.
// ---------------------------------------------------------------------------------------------

/// What a group of readers saw.
struct Seen {
    latency_us: Histogram<u64>,
    received: u64,
    /// Readers that saw `final_seq` from every user they watch.
    finals: usize,
    failed: usize,
    last_at: Option<Instant>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            latency_us: new_histogram(),
            received: 0,
            finals: 0,
            failed: 0,
            last_at: None,
        }
    }

    fn add(&mut self, other: &Seen) {
        let _ = self.latency_us.add(&other.latency_us);
        self.received += other.received;
        self.finals += other.finals;
        self.failed += other.failed;
        self.last_at = self.last_at.max(other.last_at);
    }
}

/// Reads live statuses on `reader` until `final_seq` arrived from each of `watched` users, the
/// connection fails, or `stop` fires. Counts into `seen` and `total`.
async fn receive(
    mut reader: Reader,
    watched: usize,
    final_seq: Option<u64>,
    stop: CancellationToken,
    total: Arc<AtomicU64>,
) -> Seen {
    let mut seen = Seen::new();
    let mut finals = 0;
    loop {
        let incoming = tokio::select! {
            r = reader.next() => r,
            _ = stop.cancelled() => break,
        };
        FRAMES_RECEIVED.fetch_add(1, Ordering::Relaxed);
        let status = match incoming {
            Ok(Incoming::Status {
                status,
                snapshot: false,
                ..
            }) => status,
            Ok(_) => continue,
            Err(_) => {
                seen.failed += 1;
                break;
            }
        };
        let Some((seq, sent)) = parse_status(&status) else {
            continue;
        };
        let latency = now_ns().saturating_sub(sent) / 1000;
        let _ = seen.latency_us.record(latency.max(1));
        seen.received += 1;
        total.fetch_add(1, Ordering::Relaxed);
        seen.last_at = Some(Instant::now());
        if Some(seq) == final_seq {
            finals += 1;
            if finals == watched {
                seen.finals = 1;
                break;
            }
        }
    }
    seen
}

/// Spawns one task per `--per-task` readers; each task drives its readers together.
fn spawn_groups(
    per_task: usize,
    readers: Vec<Reader>,
    watched: usize,
    final_seq: Option<u64>,
    stop: &CancellationToken,
    total: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let mut groups = Vec::new();
    let mut readers = readers.into_iter().peekable();
    while readers.peek().is_some() {
        let group: Vec<Reader> = readers.by_ref().take(per_task.max(1)).collect();
        let (stop, total) = (stop.clone(), total.clone());
        groups.push(tokio::spawn(async move {
            let each = group
                .into_iter()
                .map(|r| receive(r, watched, final_seq, stop.clone(), total.clone()));
            let mut seen = Seen::new();
            for s in futures_util::future::join_all(each).await {
                seen.add(&s);
            }
            seen
        }));
    }
    groups
}

async fn collect(groups: Vec<tokio::task::JoinHandle<Seen>>) -> anyhow::Result<Seen> {
    let mut seen = Seen::new();
    for g in groups {
        seen.add(&g.await?);
    }
    Ok(seen)
}

/// Frames the receivers have read, of any kind.
static FRAMES_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Waits until the receivers have drained what setup caused (presenced tells watchers when a
/// watched user comes online: with 10,000 users watching 50 each, half a million events) and
/// read nothing for half a second, so the measured phase starts from quiet sockets. At most
/// 60 s.
async fn quiesce() {
    let until = Instant::now() + Duration::from_secs(60);
    let mut last = FRAMES_RECEIVED.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while Instant::now() < until && quiet_since.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = FRAMES_RECEIVED.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

/// Waits until `total` reaches `expected` or `limit` passes, then stops the readers.
async fn settle(total: &AtomicU64, expected: u64, limit: Duration, stop: &CancellationToken) {
    let until = Instant::now() + limit;
    while total.load(Ordering::Relaxed) < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
}

fn latency_fields(
    m: &mut serde_json::Map<String, serde_json::Value>,
    seen: &Seen,
    expected: u64,
    started: Instant,
) {
    let elapsed = seen
        .last_at
        .map(|at| at.duration_since(started).as_secs_f64())
        .unwrap_or(0.0)
        .max(1e-9);
    m.insert("deliveries".into(), seen.received.into());
    m.insert(
        "deliveries_per_sec".into(),
        (seen.received as f64 / elapsed).into(),
    );
    m.insert(
        "delivery_ratio".into(),
        (seen.received as f64 / expected.max(1) as f64).into(),
    );
    m.insert("p50_ms".into(), ms(&seen.latency_us, 0.50).into());
    m.insert("p99_ms".into(), ms(&seen.latency_us, 0.99).into());
    m.insert("p999_ms".into(), ms(&seen.latency_us, 0.999).into());
    m.insert(
        "max_ms".into(),
        (seen.latency_us.max() as f64 / 1000.0).into(),
    );
    m.insert("watchers_disconnected".into(), seen.failed.into());
    m.insert(
        "connect_retries".into(),
        CONNECT_RETRIES.load(Ordering::Relaxed).into(),
    );
}

// ---------------------------------------------------------------------------------------------
// Workloads.
// ---------------------------------------------------------------------------------------------

async fn fanout(
    g: &Generator,
    watchers: usize,
    changes: u64,
    rate: u64,
) -> anyhow::Result<serde_json::Value> {
    let star = g.user("star");
    let rss_before = g.rss();
    let users: Vec<String> = (0..watchers).map(|i| g.user(format!("w{i}"))).collect();
    let conns = g
        .open_all_at(&users, |i| g.watch_addr(i), |_| vec![star.clone()])
        .await?;
    let rss_connected = g.rss();
    let (publisher_reader, mut publisher) = g.open_retrying(watchers, &star).await?;
    let publisher_drain = drain(publisher_reader);
    // Writers stay open (held here) while their readers are driven in groups, the groups of
    // each watch address apart so each address gets its own figures.
    let (readers, _writers): (Vec<_>, Vec<_>) = conns.into_iter().unzip();
    let nodes = g.args.watch_addrs.len().max(1);
    let mut by_node: Vec<Vec<Reader>> = (0..nodes).map(|_| Vec::new()).collect();
    for (i, r) in readers.into_iter().enumerate() {
        by_node[i % nodes].push(r);
    }
    let stop = CancellationToken::new();
    let total = Arc::new(AtomicU64::new(0));
    let node_groups: Vec<_> = by_node
        .into_iter()
        .map(|rs| {
            let n = rs.len();
            let groups = spawn_groups(g.args.per_task, rs, 1, Some(changes), &stop, &total);
            (n, groups)
        })
        .collect();
    quiesce().await;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 1..=changes {
        tick.tick().await;
        publisher.publish(&star, seq).await?;
    }
    let expected = watchers as u64 * changes;
    settle(&total, expected, Duration::from_secs(10), &stop).await;
    let mut seen = Seen::new();
    let mut per_node = Vec::new();
    for (k, (n, groups)) in node_groups.into_iter().enumerate() {
        let s = collect(groups).await?;
        let mut node = serde_json::Map::new();
        node.insert("addr".into(), g.watch_addr(k).to_string().into());
        node.insert("watchers".into(), n.into());
        latency_fields(&mut node, &s, n as u64 * changes, started);
        per_node.push(serde_json::Value::from(node));
        seen.add(&s);
    }
    publisher_drain.abort();
    let mut m = g.report("fanout");
    m.insert("watchers".into(), watchers.into());
    m.insert("changes".into(), changes.into());
    m.insert("rate_per_sec".into(), rate.into());
    latency_fields(&mut m, &seen, expected, started);
    if !g.args.watch_addrs.is_empty() {
        m.insert("publisher_addr".into(), g.args.addr.to_string().into());
        m.insert("by_watch_addr".into(), per_node.into());
    }
    m.insert(
        "final_state_ratio".into(),
        (seen.finals as f64 / watchers as f64).into(),
    );
    if let (Some(b), Some(a)) = (rss_before, rss_connected) {
        m.insert(
            "broker_rss_kib_per_connection".into(),
            ((a - b) / watchers as f64).into(),
        );
    }
    Ok(m.into())
}

/// A small deterministic generator for picking who changes next.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

async fn mix(
    g: &Generator,
    n: usize,
    k: usize,
    percent_per_sec: f64,
    seconds: u64,
) -> anyhow::Result<serde_json::Value> {
    if k == 0 || k >= n {
        bail!("--watch must be between 1 and users - 1");
    }
    let users: Vec<String> = (0..n).map(|i| g.user(format!("u{i}"))).collect();
    let watch_of = |i: usize| (1..=k).map(|d| users[(i + d) % n].clone()).collect();
    let conns = g.open_all(&users, watch_of).await?;
    let (readers, mut writers): (Vec<_>, Vec<_>) = conns.into_iter().unzip();
    let stop = CancellationToken::new();
    let total = Arc::new(AtomicU64::new(0));
    let groups = spawn_groups(g.args.per_task, readers, k, None, &stop, &total);
    quiesce().await;
    let changes_per_sec = (n as f64 * percent_per_sec / 100.0).max(1.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / changes_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let changes = (changes_per_sec * seconds as f64).round() as u64;
    let mut pick = XorShift(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    for seq in 1..=changes {
        tick.tick().await;
        let i = pick.below(n);
        writers[i].publish(&users[i], seq).await?;
    }
    let expected = changes * k as u64;
    settle(&total, expected, Duration::from_secs(10), &stop).await;
    let seen = collect(groups).await?;
    let mut m = g.report("mix");
    m.insert("users".into(), n.into());
    m.insert("watch".into(), k.into());
    m.insert("changes".into(), changes.into());
    m.insert("changes_per_sec".into(), changes_per_sec.into());
    latency_fields(&mut m, &seen, expected, started);
    Ok(m.into())
}

async fn idle(g: &Generator, connections: usize) -> anyhow::Result<serde_json::Value> {
    let before = g.rss().context("idle needs --pid of the broker")?;
    let users: Vec<String> = (0..connections).map(|i| g.user(format!("i{i}"))).collect();
    let _held = g.open_all(&users, |_| Vec::new()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = g.rss().context("cannot read the broker's RSS")?;
    let mut m = g.report("idle");
    m.insert("connections".into(), connections.into());
    m.insert("broker_rss_kib_before".into(), before.into());
    m.insert("broker_rss_kib_after".into(), after.into());
    m.insert(
        "broker_rss_kib_per_connection".into(),
        ((after - before) / connections as f64).into(),
    );
    m.insert(
        "connect_retries".into(),
        CONNECT_RETRIES.load(Ordering::Relaxed).into(),
    );
    Ok(m.into())
}

/// Reconnects client `i` and waits for `star`'s presence with `marker` as status: the reply to
/// the presence query (native; the subscription itself survived) or the retained message that
/// follows SUBACK (MQTT).
async fn restore(g: &Generator, i: usize, user: &str, star: &str, marker: &str) -> Restored {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        let attempt = async {
            let (mut r, mut w) = g.open(i, user).await?;
            w.request_snapshot(&[star.to_string()]).await?;
            let mut snapshot = r.until_snapshot().await?;
            while !snapshot.iter().any(|(u, s)| u == star && s == marker) {
                if let Incoming::Status {
                    user, status: s, ..
                } = r.next().await?
                {
                    snapshot.push((user, s));
                }
            }
            anyhow::Ok((r, w))
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(conn)) => {
                return Restored {
                    after: Some(started.elapsed()),
                    attempts,
                    _conn: Some(conn),
                }
            }
            _ if attempts >= 5 => {
                return Restored {
                    after: None,
                    attempts,
                    _conn: None,
                }
            }
            _ => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100 << attempts)).await;
            }
        }
    }
}

struct Restored {
    after: Option<Duration>,
    attempts: u32,
    /// Held so the restored connection stays open until every client is back.
    _conn: Option<(Reader, Writer)>,
}

/// The storm: `clients` watchers of one user connect (each a full handshake), all lose their
/// connections at once and reconnect together, each until its snapshot shows the user's last
/// status. Reports how long that took and, for the reconnects only, how many TLS handshakes
/// were full and how many resumed, and the broker's CPU time per reconnect (with `--pid`).
///
/// Tickets come before the drop: a TLS 1.3 server sends its tickets right after it reads the
/// client's Finished, so they precede the ConnAck in the byte stream and rustls has stored
/// them by the time the client reads the ConnAck, well before the subscribe reply (MQTT:
/// OpenSSL sends them before the CONNACK likewise). The run counts them per client anyway and
/// reports how many clients held one at the drop.
async fn storm(
    g: Arc<Generator>,
    clients: usize,
    resumption: Resumption,
) -> anyhow::Result<serde_json::Value> {
    let star = g.user("star");
    let (star_reader, mut star_writer) = g.open_retrying(clients, &star).await?;
    let star_drain = drain(star_reader);
    star_writer.publish(&star, 1).await?;
    // The marker is what every client must find in its snapshot after reconnecting.
    let users: Vec<String> = (0..clients).map(|i| g.user(format!("s{i}"))).collect();
    let conns = g.open_all(&users, |_| vec![star.clone()]).await?;
    star_writer.publish(&star, 2).await?;
    let marker = loop {
        // Read back the status the broker now holds for star, through a fresh subscription.
        let (mut r, mut w) = g.open_retrying(clients + 1, &g.user("probe")).await?;
        w.subscribe(std::slice::from_ref(&star)).await?;
        let mut snapshot = r.until_snapshot().await?;
        while snapshot.is_empty() {
            if let Incoming::Status { user, status, .. } = r.next().await? {
                snapshot.push((user, status));
            }
        }
        match snapshot.into_iter().find(|(u, _)| *u == star) {
            Some((_, s)) if parse_status(&s).map(|(seq, _)| seq) == Some(2) => break s,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let with_ticket = g.phones.iter().filter(|p| p.received() > 0).count();
    let fewest_tickets = g.phones.iter().map(Phone::received).min();
    // The broker's counters and CPU time just before the drop (the scrape first, so its own
    // cost falls outside the span), the client's handshake counts.
    let broker_before = match g.args.metrics {
        Some(addr) => scrape_handshakes(addr).await,
        None => None,
    };
    let cpu_before = g.args.pid.and_then(cpu_ticks);
    let handshakes_before = handshakes();
    // Every connection drops at once (as when a load balancer or a network path fails), and
    // every client reconnects at once.
    drop(conns);
    let started = Instant::now();
    let mut handles = Vec::new();
    let per_task = g.args.per_task.max(1);
    for chunk_start in (0..clients).step_by(per_task) {
        let (g, users, star, marker) = (g.clone(), users.clone(), star.clone(), marker.clone());
        handles.push(tokio::spawn(async move {
            let chunk = chunk_start..(chunk_start + per_task).min(clients);
            let each = chunk.map(|i| restore(&g, i, &users[i], &star, &marker));
            futures_util::future::join_all(each).await
        }));
    }
    let mut times = new_histogram();
    let (mut restored, mut retries, mut slowest) = (0usize, 0u64, Duration::ZERO);
    let mut held = Vec::new();
    for h in handles {
        for r in h.await? {
            retries += u64::from(r.attempts);
            if let Some(after) = r.after {
                restored += 1;
                slowest = slowest.max(after);
                let _ = times.record(after.as_micros() as u64);
            }
            held.push(r);
        }
    }
    let all_back = started.elapsed();
    let cpu_after = g.args.pid.and_then(cpu_ticks);
    let handshakes_after = handshakes();
    let broker_after = match g.args.metrics {
        Some(addr) => scrape_handshakes(addr).await,
        None => None,
    };
    star_drain.abort();
    let mut m = g.report("storm");
    m.insert("clients".into(), clients.into());
    m.insert("resumption".into(), resumption.name().into());
    // Every handshake of the reconnects, those of retried attempts included.
    m.insert(
        "reconnect_full".into(),
        (handshakes_after.0 - handshakes_before.0).into(),
    );
    m.insert(
        "reconnect_resumed".into(),
        (handshakes_after.1 - handshakes_before.1).into(),
    );
    m.insert("clients_with_ticket_at_drop".into(), with_ticket.into());
    m.insert("fewest_tickets_at_drop".into(), fewest_tickets.into());
    // The broker's own counts over the same span (with `--metrics`); a client that gave up on
    // a handshake the broker had not finished shows as a failure here and a retry above.
    let broker = broker_before.zip(broker_after);
    m.insert(
        "broker_reconnect_full".into(),
        broker.map(|(b, a)| a.full.saturating_sub(b.full)).into(),
    );
    m.insert(
        "broker_reconnect_resumed".into(),
        broker
            .map(|(b, a)| a.resumed.saturating_sub(b.resumed))
            .into(),
    );
    m.insert(
        "broker_handshake_failures".into(),
        broker
            .map(|(b, a)| a.failed.saturating_sub(b.failed))
            .into(),
    );
    // The broker's CPU time from just before the drop until every client is back: the
    // reconnects' handshakes and sessions, and tearing down the dropped ones.
    let hz = clock_ticks_per_sec();
    let cpu_ms = cpu_before
        .zip(cpu_after)
        .map(|(b, a)| a.saturating_sub(b) as f64 * 1000.0 / hz as f64);
    m.insert("clk_tck".into(), hz.into());
    m.insert("broker_cpu_ms".into(), cpu_ms.into());
    m.insert(
        "broker_cpu_us_per_reconnect".into(),
        cpu_ms.map(|ms| ms * 1000.0 / clients.max(1) as f64).into(),
    );
    m.insert("restored".into(), restored.into());
    m.insert(
        "restored_ratio".into(),
        (restored as f64 / clients as f64).into(),
    );
    m.insert(
        "all_restored_secs".into(),
        (restored == clients)
            .then_some(slowest.as_secs_f64())
            .into(),
    );
    m.insert("storm_wall_secs".into(), all_back.as_secs_f64().into());
    m.insert("restore_p50_ms".into(), ms(&times, 0.50).into());
    m.insert("restore_p99_ms".into(), ms(&times, 0.99).into());
    m.insert("reconnect_retries".into(), retries.into());
    Ok(m.into())
}

/// A node-death watcher: subscribes to every device (in requests of at most 100 ids, the
/// default `max_ids_per_request`) before the devices connect.
async fn death_watcher(
    g: &Generator,
    i: usize,
    devices: &[String],
) -> anyhow::Result<(Reader, Writer)> {
    let (mut r, mut w) = g
        .open_retrying_at(g.watch_addr(i), i, &g.user(format!("dw{i}")))
        .await?;
    for chunk in devices.chunks(100) {
        w.subscribe(chunk).await?;
        r.until_snapshot().await?;
    }
    Ok((r, w))
}

/// Reads `reader` until every user in `devices` was seen online (`online`) or offline, or the
/// connection fails; with `since`, the time from it to each OFFLINE goes into `times` (µs).
/// Returns the time from `since` at which the last one was seen, if all were.
async fn await_all(
    reader: &mut Reader,
    devices: &std::collections::HashSet<String>,
    online: bool,
    since: Option<Instant>,
    times: &mut Histogram<u64>,
) -> anyhow::Result<Option<Duration>> {
    let mut left = devices.clone();
    while !left.is_empty() {
        if let Incoming::Status {
            user,
            online: is_online,
            snapshot: false,
            ..
        } = reader.next().await?
        {
            if is_online == online && left.remove(&user) {
                if let Some(since) = since {
                    let _ = times.record((since.elapsed().as_micros() as u64).max(1));
                }
            }
        }
    }
    Ok(since.map(|s| s.elapsed()))
}

async fn node_death(
    g: &Generator,
    devices: usize,
    watchers: usize,
    kill_pid: u32,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    if g.args.watch_addrs.contains(&g.args.addr) {
        bail!("node-death: the watchers must be on other nodes than --addr, which is killed");
    }
    let names: Vec<String> = (0..devices).map(|i| g.user(format!("d{i}"))).collect();
    let set: std::collections::HashSet<String> = names.iter().cloned().collect();
    let in_flight = g.args.connect_concurrency.max(1);
    let mut conns = Vec::with_capacity(watchers);
    for start in (0..watchers).step_by(in_flight) {
        let each = (start..(start + in_flight).min(watchers)).map(|i| death_watcher(g, i, &names));
        for c in futures_util::future::join_all(each).await {
            conns.push(c?);
        }
    }
    let (mut readers, _writers): (Vec<_>, Vec<_>) = conns.into_iter().unzip();
    // Every watcher follows its own socket while the devices connect on the doomed node.
    let set = Arc::new(set);
    let online = readers.drain(..).map(|mut r| {
        let set = set.clone();
        tokio::spawn(async move {
            let mut unused = new_histogram();
            let r2 = await_all(&mut r, &set, true, None, &mut unused).await;
            r2.map(|_| r)
        })
    });
    let online: Vec<_> = online.collect();
    let connect_started = Instant::now();
    let held = g.open_all(&names, |_| Vec::new()).await?;
    let mut readers = Vec::with_capacity(watchers);
    for h in online {
        let r = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .context("watchers did not see every device online within 60 s")???;
        readers.push(r);
    }
    let all_online = connect_started.elapsed();
    // Let the setup's last heartbeats and acknowledgements pass before the kill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &kill_pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -KILL {kill_pid} failed: {status}");
    }
    let kill_returned = killed_at.elapsed();
    let waits = readers.into_iter().map(|mut r| {
        let set = set.clone();
        tokio::spawn(async move {
            let mut times = new_histogram();
            let done = tokio::time::timeout(
                timeout,
                await_all(&mut r, &set, false, Some(killed_at), &mut times),
            )
            .await;
            let done = match done {
                Ok(Ok(done)) => done,
                _ => None,
            };
            (done, times)
        })
    });
    let waits: Vec<_> = waits.collect();
    let mut times = new_histogram();
    let mut per_watcher = new_histogram();
    let mut complete = 0usize;
    let mut last = Duration::ZERO;
    for w in waits {
        let (done, t) = w.await?;
        let _ = times.add(&t);
        if let Some(d) = done {
            complete += 1;
            last = last.max(d);
            let _ = per_watcher.record((d.as_micros() as u64).max(1));
        }
    }
    drop(held);
    let secs = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    let mut m = g.report("node-death");
    m.insert("devices".into(), devices.into());
    m.insert("watchers".into(), watchers.into());
    m.insert("killed_addr".into(), g.args.addr.to_string().into());
    m.insert(
        "watch_addrs".into(),
        (0..g.args.watch_addrs.len().max(1))
            .map(|k| g.watch_addr(k).to_string())
            .collect::<Vec<_>>()
            .into(),
    );
    m.insert(
        "setup_all_online_secs".into(),
        all_online.as_secs_f64().into(),
    );
    m.insert(
        "kill_command_secs".into(),
        kill_returned.as_secs_f64().into(),
    );
    m.insert("offline_events".into(), times.len().into());
    m.insert(
        "offline_events_expected".into(),
        (devices as u64 * watchers as u64).into(),
    );
    m.insert("watchers_complete".into(), complete.into());
    m.insert(
        "first_offline_secs".into(),
        (times.min() as f64 / 1e6).into(),
    );
    m.insert("offline_p50_secs".into(), secs(&times, 0.50).into());
    m.insert("offline_p99_secs".into(), secs(&times, 0.99).into());
    m.insert(
        "watcher_done_p50_secs".into(),
        secs(&per_watcher, 0.50).into(),
    );
    m.insert(
        "all_watchers_offline_secs".into(),
        (complete == watchers).then_some(last.as_secs_f64()).into(),
    );
    m.insert(
        "connect_retries".into(),
        CONNECT_RETRIES.load(Ordering::Relaxed).into(),
    );
    Ok(m.into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workload = args.workload.clone();
    if !args.watch_addrs.is_empty()
        && !matches!(
            workload,
            Workload::Fanout { .. } | Workload::NodeDeath { .. }
        )
    {
        bail!("--watch-addr applies to fanout and node-death only");
    }
    let g = Arc::new(Generator::new(args)?);
    let report = match workload {
        Workload::Fanout {
            watchers,
            changes,
            rate,
        } => fanout(&g, watchers, changes, rate).await?,
        Workload::Mix {
            users,
            watch,
            percent_per_sec,
            seconds,
        } => mix(&g, users, watch, percent_per_sec, seconds).await?,
        Workload::Idle { connections } => idle(&g, connections).await?,
        Workload::Storm {
            clients,
            resumption,
        } => storm(g.clone(), clients, resumption).await?,
        Workload::NodeDeath {
            devices,
            watchers,
            kill_pid,
            timeout_secs,
        } => {
            node_death(
                &g,
                devices,
                watchers,
                kill_pid,
                Duration::from_secs(timeout_secs),
            )
            .await?
        }
    };
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked (server) frame.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= u16::MAX as usize => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn client_frames_are_masked_with_their_key() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let key = [0xa1, 0x02, 0x73, 0xf4];
            let frame = ws_frame(WS_BINARY, &payload, key);
            assert_eq!(frame[0], 0x82);
            assert_eq!(frame[1] & 0x80, 0x80, "mask bit");
            let (header, announced) = match frame[1] & 0x7f {
                126 => (4, u16::from_be_bytes([frame[2], frame[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, n as usize),
            };
            assert_eq!(announced, len);
            assert_eq!(&frame[header..header + 4], &key);
            let unmasked: Vec<u8> = frame[header + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn server_frames_come_out_whole_and_only_whole() {
        let mut bytes = server_frame(true, WS_BINARY, b"hello");
        bytes.extend(server_frame(false, WS_BINARY, &[7u8; 200]));
        bytes.extend(server_frame(true, WS_CONTINUATION, &[8u8; 70_000]));
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        // Fed a few bytes at a time, as reads may split them anywhere.
        for chunk in bytes.chunks(7) {
            buf.extend_from_slice(chunk);
            while let Some(frame) = take_ws_frame(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], (true, WS_BINARY, Bytes::from_static(b"hello")));
        assert_eq!(
            (frames[1].0, frames[1].1, frames[1].2.len()),
            (false, WS_BINARY, 200)
        );
        assert_eq!(
            (frames[2].0, frames[2].1, frames[2].2.len()),
            (true, WS_CONTINUATION, 70_000)
        );
    }

    #[test]
    fn masked_or_oversized_server_frames_are_refused() {
        let mut masked = BytesMut::from(&[0x82u8, 0x81, 1, 2, 3, 4, 5][..]);
        assert!(take_ws_frame(&mut masked).is_err());
        let mut reserved = BytesMut::from(&[0xc2u8, 0x01, 0][..]);
        assert!(take_ws_frame(&mut reserved).is_err());
        let mut huge = BytesMut::from(&[0x82u8, 127][..]);
        huge.extend_from_slice(&(MAX_SERVER_MESSAGE as u64 + 1).to_be_bytes());
        assert!(take_ws_frame(&mut huge).is_err());
    }
}
