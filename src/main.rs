//! `presenced`: flags and an optional TOML file → `Config` → tracing → metrics → serve until
//! SIGTERM or Ctrl-C. With no arguments it runs on the embedded defaults (dev certificates, dev
//! token secret, data in `./presenced-data`, metrics on 127.0.0.1:9464).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use presenced::{Config, Server};
use tokio_util::sync::CancellationToken;

/// A presence broker: TLS TCP, delimited protobuf, subscriptions persisted.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Flags {
    /// TOML config file; flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// TLS listener address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Plain TCP listener for trusted networks and benchmarks.
    #[arg(long)]
    plain_listen: Option<SocketAddr>,
    /// WebSocket (wss) listener for browsers, on the TLS certificates.
    #[arg(long, value_name = "ADDR")]
    ws_listen: Option<SocketAddr>,
    /// Plain WebSocket (ws) listener, for local development and trusted networks.
    #[arg(long, value_name = "ADDR")]
    ws_plain_listen: Option<SocketAddr>,
    /// Metrics endpoint address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Turn the metrics endpoint off.
    #[arg(long)]
    no_metrics: bool,
    /// Data folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PEM certificate chain (with --tls-key).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key (with --tls-cert).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Grace period for lost connections, milliseconds.
    #[arg(long)]
    grace_period_ms: Option<u64>,
    /// Cluster mode: a NATS server URL (repeatable); replaces `[cluster] nats_urls`.
    #[arg(long = "cluster-nats", value_name = "URL")]
    cluster_nats: Vec<String>,
    /// Cluster mode: this node's id (default: host name and listen port).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Print the effective configuration as TOML (secrets shown as "<redacted>") and exit.
    #[arg(long)]
    print_config: bool,
}

fn effective_config(flags: &Flags) -> anyhow::Result<Config> {
    let mut config = match &flags.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = flags.listen {
        config.listen = v;
    }
    if let Some(v) = flags.plain_listen {
        config.plain_listen = Some(v);
    }
    if let Some(v) = flags.ws_listen {
        config.websocket.listen = Some(v);
    }
    if let Some(v) = flags.ws_plain_listen {
        config.websocket.plain_listen = Some(v);
    }
    if let Some(v) = flags.metrics_listen {
        config.metrics.listen = v;
    }
    if flags.no_metrics {
        config.metrics.enabled = false;
    }
    if let Some(v) = &flags.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = &flags.tls_cert {
        config.tls.cert = Some(v.clone());
    }
    if let Some(v) = &flags.tls_key {
        config.tls.key = Some(v.clone());
    }
    if let Some(v) = flags.grace_period_ms {
        config.session.grace_period_ms = v;
    }
    if !flags.cluster_nats.is_empty() {
        config
            .cluster
            .get_or_insert_with(Default::default)
            .nats_urls = flags.cluster_nats.clone();
    }
    if let Some(id) = &flags.node_id {
        config.cluster.get_or_insert_with(Default::default).node_id = Some(id.clone());
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let config = effective_config(&flags)?;
    if flags.print_config {
        let mut config = config;
        // Show the node id the broker would use (with port 0 it is the bound port at start).
        if let Some(cluster) = &mut config.cluster {
            if cluster.node_id.is_none() && config.listen.port() != 0 {
                cluster.node_id = Some(presenced::config::ClusterConfig::default_node_id(
                    config.listen,
                ));
            }
        }
        print!("{}", config.to_toml());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "presenced=info".into()),
        )
        .init();
    if config.auth.uses_dev_secret() {
        tracing::warn!(
            "!!! USING THE PUBLIC DEV TOKEN SECRET: anyone can sign in as anyone. Set [auth] secrets for production. !!!"
        );
    }
    let websocket = &config.websocket;
    if (websocket.listen.is_some() || websocket.plain_listen.is_some())
        && websocket.allowed_origins.is_empty()
    {
        tracing::warn!(
            "WebSocket listener on with no [websocket] allowed_origins: any web page can use a \
             visitor's token against this broker; list your pages' origins in production"
        );
    }
    if presenced::tls::uses_dev_certificate(&config.tls) {
        tracing::warn!("using the embedded development TLS certificate (localhost only)");
    }
    raise_open_file_limit(config.limits.max_connections);
    let server = Server::bind(config.clone())
        .await
        .context("cannot start presenced")?;
    tracing::info!(
        listen = %server.local_addr(),
        plain = ?server.plain_addr(),
        websocket = ?server.ws_addr().map(|a| format!("wss://{a}{}", presenced::ws::config::PATH)),
        websocket_plain = ?server.ws_plain_addr().map(|a| format!("ws://{a}{}", presenced::ws::config::PATH)),
        metrics = ?server.metrics_addr().map(|a| format!("http://{a}/metrics")),
        admin = ?server.admin_addr().map(|a| format!("admin://{a}")),
        webhooks = config.webhooks.len(),
        data_dir = %config.data_dir.display(),
        cluster = ?server.cluster_origin().map(|o| o.node),
        "presenced is accepting clients"
    );
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    server.run(shutdown).await?;
    Ok(())
}

/// Raises the soft open-file limit to the hard one: each connection is a descriptor, and a
/// soft limit of 1,024 (a common default) would refuse clients long before `max_connections`.
/// Warns when even the hard limit is below what the connection limit needs.
fn raise_open_file_limit(max_connections: u32) {
    // Descriptors beyond connections: listeners, the store, the metrics endpoint, logs.
    let wanted = u64::from(max_connections) + 256;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            "the open-file limit is {limit}, below the {wanted} that limits.max_connections \
             ({max_connections}) needs: raise it (ulimit -n, LimitNOFILE=) or lower \
             max_connections"
        ),
        Ok(limit) => tracing::debug!("open-file limit {limit}"),
        Err(e) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
