//! Token checks, black-box through real sockets: `exp` is exclusive (RFC 7519: valid only while
//! now < exp), the leeway applies to `exp` and `nbf` alike, `nbf` is honoured, a configured `iss`
//! or `aud` is required, and an unknown key id is refused exactly like a bad signature, without
//! the attacker's `kid` echoed back. (A session whose token expires later is in `session.rs`.)

mod common;

use common::*;
use presenced::auth::{mint, mint_with, Audience, Claims, Validity};
use presenced::client::{Client, ClientOptions};
use presenced::config::DEV_SECRET;
use presenced::pb;

/// `claims` with `validity`, signed with the dev secret.
fn dev(claims: &Claims, validity: Validity) -> String {
    mint_with(DEV_SECRET.as_bytes(), None, claims, &validity)
}

fn nbf(nbf: u64) -> Validity {
    Validity {
        nbf: Some(nbf),
        ..Validity::default()
    }
}

fn iss(iss: &str) -> Validity {
    Validity {
        iss: Some(iss.into()),
        ..Validity::default()
    }
}

fn aud(aud: Audience) -> Validity {
    Validity {
        aud: Some(aud),
        ..Validity::default()
    }
}

/// A broker whose failure guard neither delays nor bans, so one test can try many bad tokens
/// from 127.0.0.1.
async fn broker(tweak: impl FnOnce(&mut presenced::Config)) -> Broker {
    start(|c| {
        c.limits.auth_failure_delay_ms = 0;
        c.limits.auth_failures_before_ban = 1000;
        tweak(c);
    })
    .await
}

/// The error a Connect with `token` gets.
async fn refused(broker: &Broker, token: String) -> pb::Error {
    server_error(within(Client::connect(ClientOptions::new(broker.addr, token))).await)
}

/// Connects with `token` and checks the session works.
async fn accepted(broker: &Broker, token: String) {
    let client = within(Client::connect(ClientOptions::new(broker.addr, token)))
        .await
        .expect("the token is accepted");
    within(client.ping()).await.unwrap();
}

#[tokio::test]
async fn a_token_is_refused_from_the_second_of_its_exp() {
    let broker = broker(|_| {}).await;
    let now = now_secs();
    let e = refused(
        &broker,
        mint(DEV_SECRET.as_bytes(), None, &claims("alice", now)),
    )
    .await;
    assert_eq!(code(&e), pb::ErrorCode::TokenExpired, "{}", e.reason);
    accepted(
        &broker,
        mint(DEV_SECRET.as_bytes(), None, &claims("alice", now + 60)),
    )
    .await;
}

#[tokio::test]
async fn an_unknown_key_id_is_refused_like_a_bad_signature_without_echo() {
    let broker = broker(|_| {}).await;
    let exp = now_secs() + 60;
    let unknown_kid = mint(
        DEV_SECRET.as_bytes(),
        Some("attacker-chosen-kid-<script>"),
        &claims("mallory", exp),
    );
    let wrong_key = mint(
        b"not-the-server-secret-at-all",
        None,
        &claims("mallory", exp),
    );
    let by_kid = refused(&broker, unknown_kid).await;
    let by_key = refused(&broker, wrong_key).await;
    assert_eq!(code(&by_kid), pb::ErrorCode::BadSignature);
    assert_eq!(code(&by_key), pb::ErrorCode::BadSignature);
    assert_eq!(
        by_kid.reason, by_key.reason,
        "an unknown kid and a bad signature are indistinguishable"
    );
    assert!(!by_kid.reason.contains("attacker"), "{}", by_kid.reason);
    let bystander = connect(&broker, "bob").await;
    within(bystander.ping()).await.unwrap();
}

#[tokio::test]
async fn a_token_used_before_its_nbf_is_refused_with_the_reason() {
    let broker = broker(|_| {}).await;
    let now = now_secs();
    let e = refused(&broker, dev(&claims("alice", now + 7200), nbf(now + 3600))).await;
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated);
    assert!(
        e.reason
            .contains(&format!("token not valid before {}", now + 3600)),
        "{}",
        e.reason
    );
    accepted(&broker, dev(&claims("alice", now + 60), nbf(now))).await;
}

#[tokio::test]
async fn the_leeway_widens_exp_and_nbf_alike() {
    let broker = broker(|c| c.auth.leeway_secs = 60).await;
    let now = now_secs();
    accepted(
        &broker,
        dev(&claims("alice", now - 30), Validity::default()),
    )
    .await;
    let e = refused(
        &broker,
        dev(&claims("alice", now - 60), Validity::default()),
    )
    .await;
    assert_eq!(code(&e), pb::ErrorCode::TokenExpired, "{}", e.reason);
    accepted(&broker, dev(&claims("alice", now + 600), nbf(now + 30))).await;
    let e = refused(&broker, dev(&claims("alice", now + 600), nbf(now + 120))).await;
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated, "{}", e.reason);
}

#[tokio::test]
async fn a_configured_issuer_is_required_and_not_echoed() {
    let broker = broker(|c| c.auth.issuer = Some("https://auth.example".into())).await;
    let exp = now_secs() + 60;
    let hostile = format!("https://{}", "evil".repeat(200));
    for token in [
        dev(&claims("alice", exp), Validity::default()),
        dev(&claims("alice", exp), iss(&hostile)),
    ] {
        let e = refused(&broker, token).await;
        assert_eq!(code(&e), pb::ErrorCode::Unauthenticated);
        assert!(e.reason.contains("issuer"), "{}", e.reason);
        assert!(!e.reason.contains("evil"), "{}", e.reason);
    }
    accepted(
        &broker,
        dev(&claims("alice", exp), iss("https://auth.example")),
    )
    .await;
}

#[tokio::test]
async fn a_configured_audience_may_be_one_string_or_one_of_an_array() {
    let broker = broker(|c| c.auth.audience = Some("presenced".into())).await;
    let exp = now_secs() + 60;
    let many = |v: &[&str]| Audience::Many(v.iter().map(|s| s.to_string()).collect());
    for validity in [
        Validity::default(),
        aud(Audience::One("webmail".into())),
        aud(many(&["webmail", "chat"])),
    ] {
        let e = refused(&broker, dev(&claims("alice", exp), validity)).await;
        assert_eq!(code(&e), pb::ErrorCode::Unauthenticated);
        assert!(e.reason.contains("audience"), "{}", e.reason);
        assert!(!e.reason.contains("webmail"), "{}", e.reason);
    }
    accepted(
        &broker,
        dev(
            &claims("alice", exp),
            aud(Audience::One("presenced".into())),
        ),
    )
    .await;
    accepted(
        &broker,
        dev(&claims("alice", exp), aud(many(&["webmail", "presenced"]))),
    )
    .await;
}

#[tokio::test]
async fn without_a_configured_issuer_or_audience_any_or_none_is_accepted() {
    let broker = broker(|_| {}).await;
    let exp = now_secs() + 60;
    let validity = Validity {
        iss: Some("anyone".into()),
        aud: Some(Audience::One("anything".into())),
        ..Validity::default()
    };
    accepted(&broker, dev(&claims("alice", exp), validity)).await;
    accepted(&broker, dev(&claims("bob", exp), Validity::default())).await;
}

/// The value of `name{reason="label"}` in a Prometheus text scrape.
fn counter(scrape: &str, name: &str, label: &str) -> Option<f64> {
    let prefix = format!("{name}{{reason=\"{label}\"}} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    within(tcp.read_to_end(&mut response)).await.unwrap();
    String::from_utf8(response).unwrap()
}

#[tokio::test]
async fn refusals_are_counted_by_reason_on_the_metrics_endpoint() {
    let broker = broker(|c| {
        c.metrics.enabled = true;
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
        c.auth.issuer = Some("https://auth.example".into());
        c.auth.audience = Some("presenced".into());
    })
    .await;
    let now = now_secs();
    let right_iss = iss("https://auth.example");
    let both = Validity {
        aud: Some(Audience::One("presenced".into())),
        ..right_iss.clone()
    };
    let cases = [
        (
            "bad_issuer",
            Validity {
                iss: None,
                ..both.clone()
            },
        ),
        ("bad_audience", right_iss),
        (
            "not_yet_valid",
            Validity {
                nbf: Some(now + 3600),
                ..both.clone()
            },
        ),
    ];
    for (label, validity) in cases {
        refused(&broker, dev(&claims("alice", now + 7200), validity)).await;
        let metrics = scrape(broker.metrics_addr.expect("metrics enabled")).await;
        let n = counter(&metrics, "presence_auth_failures_total", label);
        assert!(n.is_some_and(|n| n >= 1.0), "{label} counted:\n{metrics}");
    }
    accepted(&broker, dev(&claims("alice", now + 60), both)).await;
}
