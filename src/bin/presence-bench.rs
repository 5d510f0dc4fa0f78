//! `presence-bench`: a load generator that runs the same presence workload against presenced's
//! native protocol or an MQTT 3.1.1 broker doing presence the MQTT way (a retained
//! `presence/<user>` topic per user, Last Will = offline), over TLS, with the same payload bytes
//! (an encoded `Presence` whose status carries a sequence number and a send timestamp). Prints
//! one JSON line per run: deliveries/s, latency percentiles from an HDR histogram, delivery and
//! final-state ratios, and (with `--pid`) broker memory per connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use presenced::auth::dev_token;
use presenced::client::{tls_connect, Client, ClientOptions};
use presenced::pb;
use prost::Message;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    /// presenced's delimited-protobuf protocol.
    Native,
    /// MQTT 3.1.1: retained presence/<user> topics and a Last Will.
    Mqtt,
}

/// Presence load generator (native presenced or MQTT, same workload).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[arg(long, value_enum, default_value = "native")]
    driver: Driver,
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7883")]
    addr: SocketAddr,
    /// CA to trust (the embedded dev CA when the file is missing).
    #[arg(long, default_value = "certs-dev/ca.pem")]
    ca: PathBuf,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Broker process id, to report its memory (RSS) per connection.
    #[arg(long)]
    pid: Option<u32>,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
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
    /// Idle connections: broker memory per connection (needs --pid).
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
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

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 client: CONNECT (with a retained Last Will), SUBSCRIBE, PUBLISH QoS 0.
// ---------------------------------------------------------------------------------------------

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

struct MqttReader {
    read: ReadHalf<TlsStream>,
    buf: BytesMut,
}

struct MqttWriter {
    write: WriteHalf<TlsStream>,
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

fn packet(header: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(header);
    put_remaining_length(&mut out, body.len());
    out.put_slice(body);
    out
}

impl MqttReader {
    /// The next packet: (first header byte, body).
    async fn next(&mut self) -> anyhow::Result<(u8, Bytes)> {
        loop {
            if self.buf.len() >= 2 {
                let mut len = 0usize;
                let mut shift = 0;
                let mut i = 1;
                let mut complete = false;
                while i < self.buf.len() && i <= 4 {
                    let b = self.buf[i];
                    len |= ((b & 0x7f) as usize) << shift;
                    shift += 7;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if complete && self.buf.len() >= i + len {
                    let header = self.buf[0];
                    self.buf.advance(i);
                    return Ok((header, self.buf.split_to(len).freeze()));
                }
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                bail!("mqtt connection closed");
            }
        }
    }
}

impl MqttWriter {
    async fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) -> anyhow::Result<()> {
        let mut body = BytesMut::with_capacity(topic.len() + payload.len() + 2);
        put_str(&mut body, topic.as_bytes());
        body.put_slice(payload);
        let header = 0x30 | u8::from(retain);
        self.write.write_all(&packet(header, &body)).await?;
        Ok(())
    }
}

async fn mqtt_connect(
    args: &Args,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
    will: (&str, &[u8]),
) -> anyhow::Result<(MqttReader, MqttWriter)> {
    let stream = tls_connect(args.addr, &args.server_name, tls).await?;
    let (read, mut write) = tokio::io::split(stream);
    let mut body = BytesMut::new();
    put_str(&mut body, b"MQTT");
    body.put_u8(4); // protocol level 3.1.1
    body.put_u8(0x02 | 0x04 | 0x20); // clean session, will flag, will retain (QoS 0)
    body.put_u16(60); // keepalive
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, will.0.as_bytes());
    put_str(&mut body, will.1);
    write.write_all(&packet(0x10, &body)).await?;
    let mut reader = MqttReader {
        read,
        buf: BytesMut::with_capacity(4096),
    };
    let (header, ack) = reader.next().await?;
    if header >> 4 != 2 || ack.get(1) != Some(&0) {
        bail!("mqtt CONNACK refused: {header:#x} {ack:?}");
    }
    Ok((reader, MqttWriter { write }))
}

async fn mqtt_subscribe(
    reader: &mut MqttReader,
    writer: &mut MqttWriter,
    topic: &str,
) -> anyhow::Result<()> {
    let mut body = BytesMut::new();
    body.put_u16(1);
    put_str(&mut body, topic.as_bytes());
    body.put_u8(0);
    writer.write.write_all(&packet(0x82, &body)).await?;
    loop {
        let (header, _) = reader.next().await?;
        if header >> 4 == 9 {
            return Ok(());
        }
    }
}

/// The payload of an MQTT PUBLISH body (QoS 0: no packet id).
fn publish_payload(body: &Bytes) -> Option<&[u8]> {
    let topic_len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    body.get(2 + topic_len..)
}

// ---------------------------------------------------------------------------------------------
// The shared workload.
// ---------------------------------------------------------------------------------------------

enum Watcher {
    Native(Box<Client>),
    /// The writer is held so the connection stays open.
    Mqtt {
        reader: MqttReader,
        _writer: MqttWriter,
    },
}

enum Publisher {
    Native(Box<Client>),
    /// The reader is held so the connection stays open (QoS 0 gets no replies).
    Mqtt {
        _reader: MqttReader,
        writer: MqttWriter,
    },
}

const STAR: &str = "star";

impl Args {
    fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let config = if self.ca.exists() {
            presenced::tls::client_config_from_file(&self.ca)?
        } else {
            presenced::tls::dev_client_config()
        };
        if self.driver == Driver::Mqtt {
            // MQTT brokers speak no presence/1 ALPN.
            let mut plain = (*config).clone();
            plain.alpn_protocols.clear();
            return Ok(Arc::new(plain));
        }
        Ok(config)
    }

    async fn native(&self, tls: &Arc<rustls::ClientConfig>, user: &str) -> anyhow::Result<Client> {
        let mut options = ClientOptions::new(self.addr, dev_token(user, 3600));
        options.tls = tls.clone();
        options.server_name = self.server_name.clone();
        options.event_capacity = 4096;
        Ok(Client::connect(options).await?)
    }

    async fn watcher(&self, tls: &Arc<rustls::ClientConfig>, i: usize) -> anyhow::Result<Watcher> {
        let user = format!("watcher{i}");
        match self.driver {
            Driver::Native => {
                let client = self.native(tls, &user).await?;
                client.subscribe(&[STAR]).await?;
                Ok(Watcher::Native(Box::new(client)))
            }
            Driver::Mqtt => {
                let offline = pb::Presence {
                    user_id: user.clone(),
                    availability: pb::Availability::Offline as i32,
                    ..Default::default()
                }
                .encode_to_vec();
                let will = format!("presence/{user}");
                let (mut r, mut w) =
                    mqtt_connect(self, tls.clone(), &user, (&will, &offline)).await?;
                mqtt_subscribe(&mut r, &mut w, &format!("presence/{STAR}")).await?;
                Ok(Watcher::Mqtt {
                    reader: r,
                    _writer: w,
                })
            }
        }
    }

    async fn publisher(&self, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<Publisher> {
        match self.driver {
            Driver::Native => Ok(Publisher::Native(Box::new(self.native(tls, STAR).await?))),
            Driver::Mqtt => {
                let offline = pb::Presence {
                    user_id: STAR.into(),
                    availability: pb::Availability::Offline as i32,
                    ..Default::default()
                }
                .encode_to_vec();
                let topic = format!("presence/{STAR}");
                let (r, w) = mqtt_connect(self, tls.clone(), STAR, (&topic, &offline)).await?;
                Ok(Publisher::Mqtt {
                    _reader: r,
                    writer: w,
                })
            }
        }
    }
}

impl Publisher {
    async fn publish(&mut self, seq: u64) -> anyhow::Result<()> {
        let p = presence(STAR, seq);
        match self {
            Publisher::Native(client) => {
                client
                    .set_presence(pb::SetPresence {
                        status: Some(p.status),
                        ..Default::default()
                    })
                    .await?;
            }
            Publisher::Mqtt { writer: w, .. } => {
                w.publish(&format!("presence/{STAR}"), &p.encode_to_vec(), true)
                    .await?
            }
        }
        Ok(())
    }
}

impl Watcher {
    /// The next status carried by an event about STAR, if any arrives.
    async fn next_status(&mut self) -> anyhow::Result<Option<String>> {
        match self {
            Watcher::Native(client) => {
                let e = client.next_presence_event().await?;
                Ok(e.presence.map(|p| p.status))
            }
            Watcher::Mqtt { reader, .. } => loop {
                let (header, body) = reader.next().await?;
                if header >> 4 == 3 {
                    let payload = publish_payload(&body).context("short PUBLISH")?;
                    return Ok(Some(pb::Presence::decode(payload)?.status));
                }
            },
        }
    }
}

/// What one watcher saw.
struct Seen {
    latency_us: Histogram<u64>,
    received: u64,
    got_final: bool,
    last_at: Option<Instant>,
    /// The connection failed (closed by the broker, or garbage) before the final change.
    failed: bool,
}

async fn watch(mut w: Watcher, final_seq: u64, deadline: Instant) -> Seen {
    let mut seen = Seen {
        latency_us: Histogram::new(3).expect("histogram"),
        received: 0,
        got_final: false,
        last_at: None,
        failed: false,
    };
    loop {
        let status = match tokio::time::timeout_at(deadline.into(), w.next_status()).await {
            Ok(Ok(Some(status))) => status,
            Ok(Ok(None)) => continue,
            Ok(Err(_)) => {
                seen.failed = true;
                break;
            }
            Err(_) => break,
        };
        let Some((seq, sent)) = parse_status(&status) else {
            continue;
        };
        let latency = now_ns().saturating_sub(sent) / 1000;
        let _ = seen.latency_us.record(latency.max(1));
        seen.received += 1;
        seen.last_at = Some(Instant::now());
        if seq == final_seq {
            seen.got_final = true;
            break;
        }
    }
    seen
}

/// Connect attempts that failed and were retried, reported with the results.
static CONNECT_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Connects `n` watchers, `--connect-concurrency` at a time, in index order.
async fn connect_all(
    args: &Args,
    tls: &Arc<rustls::ClientConfig>,
    n: usize,
) -> anyhow::Result<Vec<Watcher>> {
    let in_flight = args.connect_concurrency.max(1);
    let mut out = Vec::with_capacity(n);
    for chunk_start in (0..n).step_by(in_flight) {
        let chunk = chunk_start..(chunk_start + in_flight).min(n);
        let connecting = chunk.map(|i| async move {
            // A broker may drop a connection under a connect burst (Mosquitto does); retry a
            // few times and count it, so the report shows it.
            let mut attempt = 0;
            loop {
                match args.watcher(tls, i).await {
                    Ok(w) => return Ok(w),
                    Err(e) if attempt >= 5 => {
                        return Err(e).with_context(|| format!("connection {i}"))
                    }
                    Err(_) => {
                        attempt += 1;
                        CONNECT_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        for watcher in futures_util::future::join_all(connecting).await {
            out.push(watcher?);
        }
    }
    Ok(out)
}

async fn fanout(
    args: &Args,
    watchers: usize,
    changes: u64,
    rate: u64,
) -> anyhow::Result<serde_json::Value> {
    let tls = args.tls()?;
    let rss_before = args.pid.and_then(rss_kib);
    let connected = connect_all(args, &tls, watchers).await?;
    let rss_connected = args.pid.and_then(rss_kib);
    let mut publisher = args.publisher(&tls).await?;
    let final_seq = changes;
    let publish_window = Duration::from_secs_f64(changes as f64 / rate.max(1) as f64);
    let deadline = Instant::now() + publish_window + Duration::from_secs(10);
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|w| tokio::spawn(watch(w, final_seq, deadline)))
        .collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 1..=changes {
        tick.tick().await;
        publisher.publish(seq).await?;
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut received, mut finals, mut failed, mut last) = (0u64, 0usize, 0usize, started);
    for t in tasks {
        let seen = t.await?;
        latency.add(&seen.latency_us)?;
        received += seen.received;
        finals += usize::from(seen.got_final);
        failed += usize::from(seen.failed);
        if let Some(at) = seen.last_at {
            last = last.max(at);
        }
    }
    let elapsed = last.duration_since(started).as_secs_f64().max(1e-9);
    let expected = watchers as u64 * changes;
    let per_conn = match (rss_before, rss_connected) {
        (Some(b), Some(a)) => Some((a - b) / watchers as f64),
        _ => None,
    };
    Ok(json!({
        "driver": format!("{:?}", args.driver).to_lowercase(),
        "workload": "fanout",
        "watchers": watchers,
        "changes": changes,
        "rate_per_sec": rate,
        "deliveries": received,
        "deliveries_per_sec": received as f64 / elapsed,
        "delivery_ratio": received as f64 / expected as f64,
        "final_state_ratio": finals as f64 / watchers as f64,
        "watchers_disconnected": failed,
        "p50_ms": latency.value_at_quantile(0.50) as f64 / 1000.0,
        "p99_ms": latency.value_at_quantile(0.99) as f64 / 1000.0,
        "p999_ms": latency.value_at_quantile(0.999) as f64 / 1000.0,
        "max_ms": latency.max() as f64 / 1000.0,
        "broker_rss_kib_per_connection": per_conn,
        "connect_retries": CONNECT_RETRIES.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

async fn idle(args: &Args, connections: usize) -> anyhow::Result<serde_json::Value> {
    let pid = args.pid.context("idle needs --pid of the broker")?;
    let tls = args.tls()?;
    let before = rss_kib(pid).context("cannot read the broker's RSS")?;
    let _held = connect_all(args, &tls, connections).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid).context("cannot read the broker's RSS")?;
    Ok(json!({
        "driver": format!("{:?}", args.driver).to_lowercase(),
        "workload": "idle",
        "connections": connections,
        "broker_rss_kib_before": before,
        "broker_rss_kib_after": after,
        "broker_rss_kib_per_connection": (after - before) / connections as f64,
        "connect_retries": CONNECT_RETRIES.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = match &args.workload {
        Workload::Fanout {
            watchers,
            changes,
            rate,
        } => fanout(&args, *watchers, *changes, *rate).await?,
        Workload::Idle { connections } => idle(&args, *connections).await?,
    };
    println!("{report}");
    Ok(())
}
