//! presenced: a presence broker. Mobile and web clients connect over TLS TCP, speak
//! length-delimited protobuf (`proto/presence/v1/presence.proto`), publish their presence and
//! learn other users' presence within milliseconds.
//!
//! # Embedding
//! A Rust program can run the broker in-process: [`Server::builder`] takes a [`Config`] and
//! lets it plug in an [`embed::Authenticator`] (its own sessions instead of tokens), an
//! [`embed::PresenceHook`] (presence transitions as [`events::Event`]s, without HTTP) and a
//! [`store::SubscriptionStore`]; see [`embed`] and `examples/embed.rs`. [`client`] is the Rust
//! client. The documented modules are the public interface; the others are public only for
//! the binaries, tests, benchmarks and fuzz targets and may change at any time.
//!
//! # Layout
//! The crate is a synchronous core inside an async shell:
//!
//! | module | owns |
//! |---|---|
//! | `codec` | bytes ⇄ frames: the varint-delimited protobuf codec and its frame caps |
//! | `wire` | domain values ⇄ protobuf messages; encodes server frames once |
//! | `command` | a `ClientFrame` → a validated domain command → a reply |
//! | [`model`] | domain values: availability, presence snapshots, changes, reasons |
//! | `registry` | live presence, sessions and fanout to watchers (no `.await`) |
//! | `outbound` | each connection's bounded outbound queue with coalescing |
//! | `delivery` | a connection's delivery contract (background mode): held, trimmed and batched presence events |
//! | `privacy` | privacy settings, blocks and approvals, and the one rule that decides what a viewer is shown of a user (SPEC §13) |
//! | [`store`] | the `SubscriptionStore` interface and its in-memory implementation |
//! | `address` | what one address is for per-address limits (IPv4, or an IPv6 /64) |
//! | [`auth`] | HMAC-SHA256 (JWT HS256) token minting and verification |
//! | `auth_guard` | per-address auth-failure delays and bans, handshake slots per address |
//! | `tls` | certificates → `rustls` configs |
//! | `tls_stream` | server-side TLS on rustls's unbuffered API: a synchronous engine with capped buffers (kept only while bytes are in flight) in an async shell; a record-forging client for tests |
//! | `tls_tickets` | stateless TLS session tickets: AES-256-GCM under rotating period keys (random, from a secret file, or shared by the cluster) |
//! | `connection` | one task per client: handshake, session, reader loop and writer in one task, a guard that cleans up however it ends |
//! | `ws` | the WebSocket transport for browsers: the upgrade and tungstenite driven over an in-memory pipe (a synchronous engine in an async shell), feeding the same session code |
//! | [`server`] | listeners, connection permits, shutdown |
//! | [`embed`] | running the broker in-process: the builder, the `Authenticator` and `PresenceHook` plug-ins |
//! | `cluster` | cluster mode on NATS: the link, delta publisher and receiver, heartbeats, peer liveness, state transfer, fencing |
//! | [`events`] | the backend event catalogue, its JSON shape, and the bus that numbers events for webhooks and `GET /v1/events` |
//! | `webhooks` | `[[webhooks]]` endpoints: bounded queues, batching, Standard Webhooks signing, retries |
//! | `mqtt_bridge` | `[mqtt_bridge]`: user presence and channel occupancy published to an MQTT broker as retained messages, with a Last Will, reconnects and full passes |
//! | `admin` | the admin HTTP API (axum) for the application's backend |
//! | `metrics` | metric names, the Prometheus exporter and its HTTP endpoint |
//! | [`config`] | `Config` with embedded defaults, TOML loading and validation |
//! | [`client`] | the Rust client (used by the tests, `presencectl` and benchmarks too) |
//!
//! Modules named without a link are public only for the binaries, tests, benchmarks and fuzz
//! targets (hidden from the documentation, no stability promise).

#![warn(missing_docs)]

#[doc(hidden)]
pub mod address;
#[doc(hidden)]
pub mod admin;
pub mod auth;
#[doc(hidden)]
pub mod auth_guard;
pub mod client;
#[doc(hidden)]
pub mod cluster;
#[doc(hidden)]
pub mod codec;
#[doc(hidden)]
pub mod command;
pub mod config;
#[doc(hidden)]
pub mod connection;
#[doc(hidden)]
pub mod delivery;
pub mod embed;
pub mod events;
#[doc(hidden)]
pub mod metrics;
pub mod model;
#[doc(hidden)]
pub mod mqtt_bridge;
#[doc(hidden)]
pub mod outbound;
#[doc(hidden)]
pub mod privacy;
#[doc(hidden)]
pub mod registry;
pub mod server;
pub mod store;
#[doc(hidden)]
pub mod tls;
#[doc(hidden)]
pub mod tls_stream;
#[doc(hidden)]
pub mod tls_tickets;
#[doc(hidden)]
pub mod webhooks;
#[doc(hidden)]
pub mod wire;
#[doc(hidden)]
pub mod ws;

/// Protobuf types generated from `proto/presence/v1/presence.proto` (see that file for the
/// meaning of every field).
#[allow(missing_docs, clippy::all, unreachable_pub, unused_qualifications)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/presence.v1.rs"));
}

pub use config::Config;
pub use embed::ServerBuilder;
pub use server::Server;

/// Milliseconds since the Unix epoch, the time unit of the wire protocol.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
