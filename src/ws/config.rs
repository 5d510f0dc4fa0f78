//! `[websocket]`: the WebSocket listeners browsers connect to (wss on the TLS certificates, and
//! plain ws only when configured), and which page origins may open them. Values only; checked
//! by `validate`, used by `crate::ws` and the server.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The URL path of the WebSocket endpoint.
pub const PATH: &str = "/v1/ws";
/// The subprotocol a client must request (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "presence.v1";

/// The `[websocket]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// wss listener (TLS with the broker's certificates); off when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Plain ws listener for trusted networks and local development; off when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_listen: Option<SocketAddr>,
    /// Page origins allowed to connect (the `Origin` header, e.g. `https://app.example.com`),
    /// compared exactly (ASCII case-insensitive). Empty: any origin, and clients that send none
    /// (development only: set it in production, or any web page can use a visitor's token).
    pub allowed_origins: Vec<String>,
}

impl WebSocketConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        for origin in &self.allowed_origins {
            let ok = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && !origin.contains(char::is_whitespace);
            if !ok {
                return Err(format!(
                    "websocket.allowed_origins: {origin:?} is not an origin \
                     (scheme://host[:port], no path, no trailing slash)"
                ));
            }
        }
        Ok(())
    }

    /// Whether a request with this `Origin` header (None: absent) may connect.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        origin.is_some_and(|o| {
            self.allowed_origins
                .iter()
                .any(|a| a.eq_ignore_ascii_case(o))
        })
    }
}
