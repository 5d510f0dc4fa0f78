//! Keeps the NATS test harness honest before cluster mode leans on it: a 3-server cluster
//! starts with JetStream replicating across all three; killing one server leaves a quorum
//! that still acks writes, killing a second leaves none (publishes fail instead of acking)
//! and a restart brings a quorum back; a client behind `TcpProxy` loses its connection on
//! `cut` and gets it back after `restore`. Every wait is bounded.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, stream};
use common::nats::NatsCluster;
use common::proxy::TcpProxy;
use common::within;

/// A JetStream context whose API requests and publish acks give up after `timeout`.
fn js(client: async_nats::Client, timeout: Duration) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client)
}

async fn r3_stream(js: &jetstream::Context, name: &str, subject: &str) -> stream::Info {
    let mut stream = within(js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    }))
    .await
    .expect("create an R3 stream");
    within(stream.info()).await.unwrap().clone()
}

/// Publishes until one is acked, for at most `limit` (a new stream leader may be electing).
async fn publish_until_acked(
    js: &jetstream::Context,
    subject: &str,
    payload: &'static str,
    limit: Duration,
) -> jetstream::publish::PublishAck {
    let started = Instant::now();
    let deadline = started + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match js.publish(subject.to_string(), payload.into()).await {
            Ok(ack) => match ack.await {
                Ok(ack) => return ack,
                Err(e) => last = format!("ack: {e}"),
            },
            Err(e) => last = format!("publish: {e}"),
        }
        eprintln!("{subject}: not acked after {:?}: {last}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no publish acked within {limit:?} (last: {last})");
}

#[tokio::test]
async fn three_servers_replicate_a_stream_and_ack_publishes() {
    let started = Instant::now();
    let cluster = NatsCluster::start(3).await;
    eprintln!("NatsCluster::start(3) took {:?}", started.elapsed());
    assert_eq!(cluster.urls().len(), 3);
    for i in 0..3 {
        assert_eq!(
            cluster.url(i),
            format!("nats://127.0.0.1:{}", cluster.client_port(i))
        );
    }

    let client = cluster.connect(0).await;
    let js = js(client, Duration::from_secs(5));
    let info = r3_stream(&js, "HARNESS_A", "harness.a").await;
    assert_eq!(info.config.num_replicas, 3);
    let replicas = info.cluster.expect("cluster info").replicas.len();
    assert_eq!(replicas, 2, "a leader and two followers");

    for n in 1..=10u64 {
        let ack = within(js.publish("harness.a", "x".into())).await.unwrap();
        let ack = within(ack.into_future()).await.expect("publish acked");
        assert_eq!(ack.stream, "HARNESS_A");
        assert_eq!(ack.sequence, n);
    }
    let mut stream = within(js.get_stream("HARNESS_A")).await.unwrap();
    assert_eq!(within(stream.info()).await.unwrap().state.messages, 10);
}

#[tokio::test]
async fn a_quorum_acks_and_a_minority_does_not() {
    let mut cluster = NatsCluster::start(3).await;
    {
        let js0 = js(cluster.connect(0).await, Duration::from_secs(5));
        r3_stream(&js0, "HARNESS_B", "harness.b").await;
        publish_until_acked(&js0, "harness.b", "before", Duration::from_secs(10)).await;
    }

    // One of three down: the two left elect leaders as needed and keep acking.
    cluster.kill(0).await;
    assert!(!cluster.is_running(0));
    let js1 = js(cluster.connect(1).await, Duration::from_secs(2));
    let started = Instant::now();
    let ack = publish_until_acked(&js1, "harness.b", "two of three", Duration::from_secs(25)).await;
    eprintln!("first ack with n0 down after {:?}", started.elapsed());
    assert_eq!(ack.stream, "HARNESS_B");
    assert!(ack.sequence >= 2);

    // Two of three down: nothing may be acked.
    cluster.kill(1).await;
    let js2 = js(cluster.connect(2).await, Duration::from_millis(1500));
    for attempt in 0..3 {
        let result = within(async {
            js2.publish("harness.b", "one of three".into())
                .await?
                .await
                .map_err(async_nats::Error::from)
        })
        .await;
        eprintln!("minority publish {attempt}: {result:?}");
        assert!(result.is_err(), "acked without a quorum: {result:?}");
    }

    // Back to two of three: acks again.
    let started = Instant::now();
    cluster.restart(1).await;
    eprintln!("restart(1) took {:?}", started.elapsed());
    assert!(cluster.is_running(1));
    let started = Instant::now();
    publish_until_acked(&js2, "harness.b", "quorum again", Duration::from_secs(25)).await;
    eprintln!(
        "first ack after restarting n1 after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_behind_the_proxy_drops_on_cut_and_reconnects_on_restore() {
    let cluster = NatsCluster::start(1).await;
    let proxy = TcpProxy::start(cluster.addr(0)).await;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let client = within(
        async_nats::ConnectOptions::new()
            // Else the client would learn the server's own address and reconnect around the proxy.
            .ignore_discovered_servers()
            .event_callback(move |event| {
                let _ = events_tx.send(event.to_string());
                async {}
            })
            .connect(proxy.nats_url()),
    )
    .await
    .expect("connect through the proxy");
    assert_eq!(client.connection_state(), State::Connected);
    assert_eq!(proxy.active(), 1);
    within(client.flush())
        .await
        .expect("flush through the proxy");

    proxy.cut().await;
    assert_eq!(proxy.active(), 0);
    within(async {
        while client.connection_state() != State::Disconnected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The events: "connected" (the first connection), then "disconnected".
    within(async { while events.recv().await.unwrap() != "disconnected" {} }).await;
    // Reconnects fail while cut: the proxy closes them at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.connection_state(), State::Disconnected);
    assert_eq!(proxy.forwarded(), 1);

    proxy.restore();
    within(async {
        while client.connection_state() != State::Connected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within(async { while events.recv().await.unwrap() != "connected" {} }).await;
    assert_eq!(proxy.active(), 1);
    assert_eq!(proxy.forwarded(), 2);

    // The reconnected client works: a round trip through the proxy.
    let mut sub = within(client.subscribe("harness.c")).await.unwrap();
    within(client.publish("harness.c", "after restore".into()))
        .await
        .unwrap();
    let message = within(futures_util::StreamExt::next(&mut sub))
        .await
        .expect("message after restore");
    assert_eq!(&message.payload[..], b"after restore");
}
