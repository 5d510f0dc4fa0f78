//! Fanout and operations through real TLS sockets (SPEC §6, §7): a watcher that stops reading
//! still ends up with the latest state, in order, while the publisher never waits; a watcher
//! whose socket stays blocked is disconnected; the Prometheus endpoint exports what an operator
//! needs. One process-wide metrics recorder serves every test in this file.

mod common;

use std::collections::BTreeMap;

use common::*;
use presenced::client::Client;
use presenced::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A change of about 8 KiB, so a few thousand of them overflow any socket buffer.
fn bulky(i: usize) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(format!("s{i}")),
        state: (0..32)
            .map(|k| (format!("key{k}"), format!("{i:0>250}")))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    }
}

fn unthrottled(c: &mut presenced::Config) {
    c.limits.publish_rate_per_sec = 1_000_000;
    c.limits.publish_burst = 1_000_000;
    c.limits.request_rate_per_sec = 1_000_000;
    c.limits.request_burst = 1_000_000;
}

async fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    within(tcp.read_to_string(&mut body)).await.unwrap();
    body
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_watcher_that_stops_reading_still_gets_the_latest_state_in_order() {
    let broker = start(|c| {
        unthrottled(c);
        c.fanout.queue_capacity = 8;
        c.fanout.slow_consumer_timeout_ms = 60_000;
    })
    .await;
    let mut opts = options(&broker, "bob", "phone");
    opts.event_capacity = 1; // the client stops reading its socket almost at once
    let mut bob = within(Client::connect(opts)).await.unwrap();
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    const CHANGES: usize = 3000;
    for i in 0..CHANGES {
        // The publisher never waits for the stalled watcher.
        within(alice.set_presence(bulky(i))).await.unwrap();
    }
    within(alice.set_presence(pb::SetPresence {
        status: Some("final".into()),
        replace_state: true,
        ..Default::default()
    }))
    .await
    .unwrap();
    let mut received = 0;
    let mut last_version = 0;
    loop {
        let e = within(bob.next_presence_event()).await.unwrap();
        assert!(
            e.version > last_version,
            "per-user order holds under coalescing"
        );
        last_version = e.version;
        received += 1;
        if e.presence.unwrap().status == "final" {
            break;
        }
    }
    assert!(
        received < CHANGES,
        "{received} events for {CHANGES} changes: nothing was coalesced"
    );
    // Memory stayed bounded and the session is healthy.
    within(bob.ping()).await.unwrap();
}

#[tokio::test]
async fn a_watcher_whose_socket_stays_blocked_is_disconnected() {
    let broker = start(|c| {
        unthrottled(c);
        c.fanout.queue_capacity = 8;
        c.fanout.slow_consumer_timeout_ms = 300;
        c.session.grace_period_ms = 0;
    })
    .await;
    let mut carol = connect(&broker, "carol").await;
    within(carol.subscribe(&["bob"])).await.unwrap();
    let mut opts = options(&broker, "bob", "phone");
    opts.event_capacity = 1;
    let bob = within(Client::connect(opts)).await.unwrap();
    within(bob.subscribe(&["alice"])).await.unwrap();
    assert_eq!(
        kind(&within(carol.next_presence_event()).await.unwrap()),
        pb::EventKind::Online
    );
    let alice = connect(&broker, "alice").await;
    // Publish until bob is gone; bounded by the count.
    let mut i = 0;
    let offline = loop {
        assert!(i < 20_000, "bob was never disconnected");
        within(alice.set_presence(bulky(i))).await.unwrap();
        i += 1;
        if i % 100 == 0 {
            let r = within(carol.get_presence(&["bob"])).await.unwrap();
            if r[0].availability == pb::Availability::Offline as i32 {
                break within(carol.next_presence_event()).await.unwrap();
            }
        }
    };
    assert_eq!(kind(&offline), pb::EventKind::Offline);
    assert_eq!(reason(&offline), pb::OfflineReason::Kicked);
    within(alice.ping()).await.unwrap();
    drop(bob);
}

#[tokio::test]
async fn metrics_endpoint_exports_what_an_operator_needs() {
    let broker = start(|c| {
        c.metrics.enabled = true;
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let metrics_addr = broker.metrics_addr.expect("metrics enabled");
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(bob.next_presence_event()).await.unwrap();
    within(alice.set_presence(pb::SetPresence {
        status: Some("measured".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    within(bob.next_presence_event()).await.unwrap();
    let bad = presenced::auth::mint(
        b"wrong-secret-wrong-secret",
        None,
        &presenced::auth::Claims {
            sub: "x".into(),
            exp: now_secs() + 60,
            did: None,
            iat: None,
        },
    );
    assert!(
        Client::connect(presenced::client::ClientOptions::new(broker.addr, bad))
            .await
            .is_err()
    );

    let text = scrape(metrics_addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for name in [
        "presence_connections ",
        "presence_online_users ",
        "presence_subscriptions ",
        "presence_frames_in_total{kind=\"set_presence\"} ",
        "presence_frames_out_total{kind=\"presence_event\"} ",
        "presence_deliveries_total ",
        "presence_auth_failures_total{reason=\"bad_signature\"} ",
        "presence_errors_total{code=\"ERROR_CODE_BAD_SIGNATURE\"} ",
        "presence_fanout_latency_seconds_bucket{le=\"0.005\"} ",
        "presence_fanout_latency_seconds_count ",
        "presence_tls_handshake_duration_seconds_count ",
    ] {
        let value = sample(&text, name).unwrap_or_else(|| panic!("missing {name}\n{text}"));
        assert!(value >= 1.0, "{name} = {value}");
    }
    assert!(text.contains("# HELP presence_fanout_latency_seconds"));
    assert!(!text.contains("alice"), "no user ids in metrics");
    let not_found = scrape(metrics_addr, "/other").await;
    assert!(not_found.starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn coalesced_events_are_counted() {
    let broker = start(|c| {
        unthrottled(c);
        c.fanout.queue_capacity = 2;
        c.metrics.enabled = true;
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let mut opts = options(&broker, "bob", "phone");
    opts.event_capacity = 1;
    let mut bob = within(Client::connect(opts)).await.unwrap();
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    for i in 0..2000 {
        within(alice.set_presence(bulky(i))).await.unwrap();
    }
    within(alice.set_presence(pb::SetPresence {
        status: Some("final".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    while within(bob.next_presence_event())
        .await
        .unwrap()
        .presence
        .unwrap()
        .status
        != "final"
    {}
    let text = scrape(broker.metrics_addr.unwrap(), "/metrics").await;
    let coalesced = sample(&text, "presence_coalesced_events_total ").unwrap_or(0.0);
    assert!(coalesced >= 1.0, "coalesced = {coalesced}");
}
