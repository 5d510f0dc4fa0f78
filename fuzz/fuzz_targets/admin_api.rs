//! The admin HTTP API's whole request path, hostile input first: arbitrary methods, paths
//! (ids with `%`, `/`, control bytes), query strings, Authorization headers (right key with a
//! read or write scope, wrong keys, garbage) and bodies (truncated, oversized, deeply nested,
//! unknown fields, privacy writes and `viewer` reads) go through the real axum router over a live registry with sessions in it.
//! Nothing panics; every answer is a JSON body, and every non-2xx answer is the documented
//! `{"error": {"code", "code_number", "reason"}}`.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::admin::{AdminConfig, AdminKey, Scope};
use presenced::connection::ConnectionContext;
use presenced::events::EventBus;
use presenced::outbound::Outbound;
use presenced::registry::Attach;
use presenced::store::MemoryStore;
use tower::ServiceExt;

const WRITE: &str = "fuzz-write-key-0123456789abcdef0123456789";
const READ: &str = "fuzz-read-key-0123456789abcdef01234567890";

struct World {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let router = runtime.block_on(async {
            let mut config = presenced::Config::default();
            config.admin.rate_per_sec = 1_000_000;
            config.admin.burst = 1_000_000;
            config.admin.max_wait_ms = 0;
            let mut admin = AdminConfig {
                rate_per_sec: 1_000_000,
                burst: 1_000_000,
                max_wait_ms: 5,
                ..AdminConfig::default()
            };
            admin.keys.insert(
                "w".into(),
                AdminKey {
                    key: WRITE.into(),
                    scope: Scope::Write,
                },
            );
            admin.keys.insert(
                "r".into(),
                AdminKey {
                    key: READ.into(),
                    scope: Scope::Read,
                },
            );
            let ctx = Arc::new(ConnectionContext::new(
                config,
                Arc::new(MemoryStore::new()),
            ));
            // A few live sessions, one in a channel, so kicks and queries find something.
            for (i, user) in ["alice", "bob", "a/b", "%"].iter().enumerate() {
                let outbound = Outbound::new(i as u64 + 1, 64, 64, 4);
                let _ = ctx.registry.attach(Attach {
                    user_id: user.to_string(),
                    device_id: "phone".into(),
                    platform: "fuzz".into(),
                    outbound,
                    initial: None,
                    user_data: Default::default(),
                    received_at: std::time::Instant::now(),
                invisible: false,
                });
            }
            let events = Arc::new(EventBus::new(1, None, Vec::new()));
            ctx.registry.set_observer(events.clone());
            presenced::admin::router_for_fuzzing(&admin, ctx, events)
        });
        World { runtime, router }
    })
}

#[derive(Debug, Arbitrary)]
enum Auth {
    None,
    Write,
    Read,
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    post: bool,
    route: u8,
    segment: String,
    query: String,
    auth: Auth,
    body: Vec<u8>,
    body_json: Option<String>,
}

const ROUTES: [&str; 16] = [
    "/v1/presence:query",
    "/v1/presence:online",
    "/v1/channels:occupancy",
    "/v1/channels/{}/members",
    "/v1/users/{}/channels",
    "/v1/users/{}/disconnect",
    "/v1/users/{}/revoke",
    "/v1/users/{}/presence",
    "/v1/users/{}/subscriptions",
    "/v1/users/{}/privacy",
    "/v1/users/{}/invisible",
    "/v1/users/{}/blocks",
    "/v1/users/{}/approvals",
    "/v1/events",
    "/{}",
    "/v1/users/{}",
];

fuzz_target!(|input: Input| {
    let w = world();
    let segment: String = input
        .segment
        .bytes()
        .map(|b| format!("%{b:02X}"))
        .collect();
    let path = ROUTES[input.route as usize % ROUTES.len()].replace("{}", &segment);
    let query: String = input
        .query
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '#')
        .collect();
    let uri = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    let Ok(uri) = uri.parse::<axum::http::Uri>() else {
        return;
    };
    let mut request = axum::http::Request::builder()
        .method(if input.post { "POST" } else { "GET" })
        .uri(uri);
    match &input.auth {
        Auth::None => {}
        Auth::Write => request = request.header("authorization", format!("Bearer {WRITE}")),
        Auth::Read => request = request.header("authorization", format!("Bearer {READ}")),
        Auth::Raw(raw) => {
            if let Ok(v) = axum::http::HeaderValue::from_bytes(raw) {
                request = request.header("authorization", v);
            }
        }
    }
    let body = match input.body_json {
        Some(json) => json.into_bytes(),
        None => input.body,
    };
    let Ok(request) = request
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
    else {
        return;
    };
    w.runtime.block_on(async {
        let response = w.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
        if !status.is_success() {
            let error = &value["error"];
            assert!(error["code"].is_string(), "{status}: {value}");
            assert!(error["reason"].is_string(), "{status}: {value}");
        }
    });
});
