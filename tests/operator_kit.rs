//! The operator kit in `deploy/` against the real broker: every metric the Grafana dashboard and
//! the Prometheus rules query exists in the `/metrics` of a `presenced` process started on the
//! production config example (before any client, and still after traffic has moved the series);
//! the rules pass `promtool check rules` and their unit tests; the dashboard is a Grafana
//! dashboard whose panels all have a data source and a query; the config example loads with
//! its cluster block on too and marks every secret and certificate; the systemd unit carries
//! the hardening, limits and credentials the config relies on.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::within;
use presenced::client::{Client, ClientOptions};
use presenced::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const CONFIG: &str = "deploy/presenced.toml";
const UNIT: &str = "deploy/presenced.service";
const DASHBOARD: &str = "deploy/grafana/presenced-dashboard.json";
const RULES: &str = "deploy/prometheus/presenced-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/presenced-alerts.test.yml";
/// Where systemd puts the unit's `LoadCredential=` files.
const CREDENTIALS: &str = "/run/credentials/presenced.service/";

// ---- metric names in PromQL ----

/// Every identifier starting with `presence_` in a PromQL expression, outside quoted strings
/// (label values) — the series names the expression reads, exactly as written (`_bucket`,
/// `_count` included, since those are the names a histogram's samples carry).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut chars = expr.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            // Skip the string, honouring backslash escapes.
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = start + c.len_utf8();
            while let Some(&(i, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    end = i + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let ident = &expr[start..end];
            if ident.starts_with("presence_") {
                into.insert(ident.to_string());
            }
        }
    }
}

/// The `expr:` values of a Prometheus rule file (one line, or a `|` block below it).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        i += 1;
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                i += 1;
            }
            exprs.push(block);
        } else {
            exprs.push(rest.trim_matches('\'').to_string());
        }
    }
    exprs
}

/// The `series:` selectors of a `promtool test rules` file.
fn test_series(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- series:"))
        .map(|s| s.trim().trim_matches('\'').to_string())
        .collect()
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// The names the dashboard, the rules and the rule tests read, each with where it is used.
fn referenced_metrics() -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut by_source: Vec<(&'static str, BTreeSet<String>)> = Vec::new();
    let mut names = BTreeSet::new();
    let dash = dashboard();
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            metric_names(t["expr"].as_str().unwrap_or(""), &mut names);
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        metric_names(v["definition"].as_str().unwrap_or(""), &mut names);
    }
    by_source.push((DASHBOARD, std::mem::take(&mut names)));
    for e in rule_exprs(&read(RULES)) {
        metric_names(&e, &mut names);
    }
    by_source.push((RULES, std::mem::take(&mut names)));
    for s in test_series(&read(RULE_TESTS)) {
        metric_names(&s, &mut names);
    }
    by_source.push((RULE_TESTS, names));
    let mut out: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for (source, names) in by_source {
        for n in names {
            out.entry(n).or_default().insert(source);
        }
    }
    out
}

/// Sample names in a Prometheus text page (`name{labels} value` or `name value`).
fn sample_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The value of the first sample whose line starts with `prefix` (`name` or `name{labels}`).
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', '{', ',']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ---- the broker on the production config ----

/// `deploy/presenced.toml` made runnable here: each production value below must occur in the
/// file (so the example cannot drift from what this test runs) and is swapped for a local one.
fn local_config(dir: &Path, webhook: SocketAddr) -> String {
    let ticket = dir.join("ticket.key");
    std::fs::write(&ticket, [0x5au8; 48]).unwrap();
    let data = dir.join("data");
    let swaps: Vec<(String, String)> = vec![
        ("\"0.0.0.0:7883\"".into(), "\"127.0.0.1:0\"".into()),
        ("\"0.0.0.0:9464\"".into(), "\"127.0.0.1:0\"".into()),
        ("\"0.0.0.0:8443\"".into(), "\"127.0.0.1:0\"".into()),
        ("\"10.0.0.10:9465\"".into(), "\"127.0.0.1:0\"".into()),
        (
            "\"/var/lib/presenced\"".into(),
            format!("{:?}", data.display().to_string()),
        ),
        (
            format!("\"{CREDENTIALS}tls.crt\""),
            format!("{:?}", repo("certs-dev/server.pem").display().to_string()),
        ),
        (
            format!("\"{CREDENTIALS}tls.key\""),
            format!("{:?}", repo("certs-dev/server.key").display().to_string()),
        ),
        (
            format!("\"{CREDENTIALS}ticket.key\""),
            format!("{:?}", ticket.display().to_string()),
        ),
        (
            "\"https://backend.example.com/presence/webhooks\"".into(),
            format!("\"http://{webhook}/presence/webhooks\""),
        ),
    ];
    // The example's placeholder secrets are refused at start: fresh ones, as an operator would.
    let mut text = read(CONFIG).replace("\"REPLACE-ME-", "\"local-test-");
    for (from, to) in &swaps {
        assert!(
            text.contains(from.as_str()),
            "{CONFIG} no longer contains {from}: update this test with it"
        );
        text = text.replace(from.as_str(), to);
    }
    text
}

/// A `presenced` process this test started; killed (by its PID, through tokio) when dropped.
struct Broker {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// Starts the real binary on `config` and waits for its "accepting clients" line.
async fn spawn(config: &Path) -> Broker {
    let spawned = common::spawn_presenced_args(&["--config", config.to_str().unwrap()]).await;
    let metrics = spawned
        .metrics()
        .unwrap_or_else(|| panic!("no metrics listener in {:?}", spawned.early_log.last()));
    Broker {
        child: spawned.child,
        addr: spawned.addr,
        metrics,
    }
}

async fn scrape(metrics: SocketAddr) -> String {
    let mut tcp = within(TcpStream::connect(metrics)).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    within(tcp.read_to_string(&mut page)).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    page
}

/// A webhook receiver on loopback that acknowledges every request with 204, counting them.
async fn webhook_receiver() -> (SocketAddr, tokio::sync::watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // Keep-alive: one request after another, each head then its body.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + 4 + length {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + 4 + length);
                    let reply = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
                    if tcp.write_all(reply).await.is_err() {
                        return;
                    }
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
    });
    (addr, rx)
}

/// A token the production config accepts: its default key, issuer and audience.
fn token(config: &presenced::Config, user: &str) -> String {
    let auth = &config.auth;
    let secret = &auth.secrets[&auth.default_kid];
    let now = presenced::now_ms() / 1000;
    presenced::auth::mint_with(
        secret.as_bytes(),
        Some(&auth.default_kid),
        &common::claims(user, now + 600),
        &presenced::auth::Validity {
            nbf: None,
            iss: auth.issuer.clone(),
            aud: auth.audience.clone().map(presenced::auth::Audience::One),
        },
    )
}

/// Polls the metrics page until `done` holds for it (bounded at 10 s); returns the last page.
async fn scrape_until(metrics: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = scrape(metrics).await;
        if done(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "{what} within 10 s:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn missing(page: &str) -> Vec<String> {
    let present = sample_names(page);
    referenced_metrics()
        .into_iter()
        .filter(|(name, _)| !present.contains(name))
        .map(|(name, used)| format!("{name} (used in {})", Vec::from_iter(used).join(", ")))
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_served_by_a_broker_on_the_production_config()
{
    let referenced = referenced_metrics();
    assert!(
        referenced.len() >= 40,
        "the dashboard and rules read {} metrics: is the parser broken? {referenced:?}",
        referenced.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let (webhook, mut webhook_requests) = webhook_receiver().await;
    let config_text = local_config(dir.path(), webhook);
    let config_path = dir.path().join("presenced.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    let config = presenced::Config::from_toml(&config_text).unwrap();
    let mut broker = spawn(&config_path).await;

    // Before any client: every series the dashboard and the rules read is already there.
    let idle = scrape(broker.metrics).await;
    let absent = missing(&idle);
    assert!(
        absent.is_empty(),
        "missing from a fresh broker's /metrics:\n  {}",
        absent.join("\n  ")
    );

    // Traffic: a watcher, a publisher, a durable subscribe, a refused token, a webhook batch.
    let options = |user: &str| {
        ClientOptions::new(broker.addr, token(&config, user)).device(format!("{user}-phone"))
    };
    let mut bob = within(Client::connect(options("bob"))).await.unwrap();
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = within(Client::connect(options("alice"))).await.unwrap();
    within(alice.set_presence(pb::SetPresence {
        status: Some("deploying".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    loop {
        let event = within(bob.next_presence_event()).await.unwrap();
        if event.user_id == "alice" && event.presence.is_some_and(|p| p.status == "deploying") {
            break;
        }
    }
    let forged = ClientOptions::new(broker.addr, presenced::auth::dev_token("mallory", 600));
    assert!(
        within(Client::connect(forged)).await.is_err(),
        "the dev secret is not among the production keys"
    );
    within(webhook_requests.wait_for(|n| *n >= 1))
        .await
        .expect("the webhook receiver runs");

    let busy = scrape_until(broker.metrics, "the traffic counted", |page| {
        let at_least = |prefix: &str, n: f64| sample(page, prefix).is_some_and(|v| v >= n);
        at_least("presence_connections", 2.0)
            && at_least("presence_online_users", 2.0)
            && at_least("presence_fanout_latency_seconds_count", 1.0)
            && at_least("presence_store_commit_duration_seconds_count", 1.0)
            && at_least(
                "presence_auth_failures_total{reason=\"bad_signature\"}",
                1.0,
            )
            && at_least("presence_webhook_events_delivered_total", 1.0)
            && at_least("presence_webhook_delivery_seconds_count", 1.0)
            && at_least("presence_process_open_fds", 3.0)
            && at_least("presence_process_resident_memory_bytes", 1.0)
    })
    .await;
    let absent = missing(&busy);
    assert!(
        absent.is_empty(),
        "missing from /metrics after traffic:\n  {}",
        absent.join("\n  ")
    );

    // A graceful stop, as systemd's KillSignal=SIGTERM does it.
    let pid = broker.child.id().unwrap().to_string();
    let status = within(Command::new("kill").args(["-TERM", &pid]).status())
        .await
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(25), broker.child.wait())
        .await
        .expect("stops within the unit's TimeoutStopSec")
        .unwrap();
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    drop(alice);
}

// ---- promtool ----

fn promtool(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo("deploy/prometheus"))
        .output();
    match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: `apt-get install prometheus` (Debian) provides it; \
             scripts/test.sh installs it when missing. The alert rules cannot be checked \
             without it."
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    }
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    for args in [
        &["check", "rules", "presenced-alerts.yml"][..],
        &["test", "rules", "presenced-alerts.test.yml"][..],
    ] {
        let out = promtool(args);
        assert!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each alert the issue asks for exists, with `for:`, a severity and both annotations.
    let rules = read(RULES);
    for alert in [
        "PresencedFanoutLatencyHigh",
        "PresencedSlowConsumers",
        "PresencedAuthFailureBurst",
        "PresencedStoreCommitSlow",
        "PresencedClusterPeerDown",
        "PresencedWebhookEventsDropped",
        "PresencedDown",
        "PresencedConnectionsNearLimit",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "{alert} missing"
        );
        assert!(
            read(RULE_TESTS).contains(&format!("alertname: {alert}\n")),
            "{alert} has no promtool unit test"
        );
    }
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap();
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(block.contains(key), "alert {name} has no {key}");
        }
    }
}

// ---- the dashboard ----

#[test]
fn the_dashboard_is_a_grafana_dashboard_whose_panels_all_query_the_chosen_data_source() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = dash["templating"]["list"].as_array().expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("instance")["type"], "query");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        if p["type"] == "row" {
            continue;
        }
        titles.push(title.to_string());
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "{title}: empty query");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            if expr.contains("presence_") {
                assert!(
                    expr.contains("instance=~\"$instance\""),
                    "{title}: {expr} ignores $instance"
                );
            }
        }
    }
    // What the issue lists, by the metric each area is read from.
    let referenced = referenced_metrics();
    for needed in [
        "presence_connections",
        "presence_online_users",
        "presence_fanout_latency_seconds_bucket",
        "presence_errors_total",
        "presence_auth_failures_total",
        "presence_slow_consumer_disconnects_total",
        "presence_store_commit_duration_seconds_bucket",
        "presence_cluster_peers",
        "presence_cluster_replication_lag_seconds_bucket",
        "presence_webhook_dropped_total",
        "presence_webhook_delivery_seconds_bucket",
        "presence_ws_upgrades_total",
        "presence_privacy_ops_total",
        "presence_process_resident_memory_bytes",
    ] {
        assert!(
            referenced
                .get(needed)
                .is_some_and(|used| used.contains(DASHBOARD)),
            "the dashboard has no panel on {needed}"
        );
    }
    assert!(titles.len() >= 30, "{titles:?}");
}

// ---- the config example ----

/// `presenced --config FILE --print-config`: parses (unknown keys are errors) and validates,
/// without opening anything.
async fn print_config(path: &Path) -> String {
    let out = within(
        Command::new(env!("CARGO_BIN_EXE_presenced"))
            .arg("--config")
            .arg(path)
            .arg("--print-config")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_config_example_loads_with_and_without_its_cluster_block_and_marks_its_secrets() {
    // Unedited, the example is refused: its placeholder secrets are public.
    let unedited = presenced::Config::from_toml(&read(CONFIG)).expect("parses, no unknown keys");
    let err = unedited
        .validate()
        .expect_err("placeholder secrets refused");
    assert!(err.to_string().contains("placeholder (REPLACE-ME"), "{err}");
    // Edited as the comments say (every secret replaced), it loads.
    let text = read(CONFIG).replace("\"REPLACE-ME-", "\"edited-");
    assert!(
        !text.contains("REPLACE-ME-"),
        "every placeholder is a quoted secret"
    );
    let edited_path = tempfile::tempdir().unwrap();
    let edited = edited_path.path().join("presenced.toml");
    std::fs::write(&edited, &text).unwrap();
    let config = presenced::Config::from_toml(&text).expect("parses, no unknown keys");
    // Unknown keys are errors in every section, so a parse that passes means every key is real.
    for section in [
        "[tls]",
        "[session]",
        "[admin]",
        "[[webhooks]]",
        "[websocket]",
    ] {
        let typo = text.replacen(section, &format!("{section}\nshutdown_timeout = 1"), 1);
        let err = presenced::Config::from_toml(&typo).expect_err(section);
        assert!(
            err.to_string().contains("unknown field"),
            "{section}: {err}"
        );
    }
    config.validate().expect("valid");
    let mut printed = presenced::Config::from_toml(&print_config(&edited).await).unwrap();
    // `--print-config` may redact secret values: compare everything else.
    printed.auth.secrets = config.auth.secrets.clone();
    printed.admin.keys = config.admin.keys.clone();
    for (p, c) in printed.webhooks.iter_mut().zip(&config.webhooks) {
        p.secrets = c.secrets.clone();
    }
    assert!(printed == config, "the binary reads the same config");

    // Production shape: real certificates, no dev secret, listeners off loopback, origins set.
    assert!(!config.auth.uses_dev_secret());
    assert!(config.tls.cert.is_some() && config.tls.key.is_some());
    assert!(!config.listen.ip().is_loopback());
    assert!(!config.metrics.listen.ip().is_loopback() && config.metrics.enabled);
    assert!(!config.websocket.allowed_origins.is_empty());
    assert!(config.admin.enabled() && !config.admin.listen.ip().is_loopback());
    assert_eq!(config.webhooks.len(), 1);
    assert!(config.cluster.is_none(), "cluster mode is commented out");

    // The cluster block, uncommented in place, is valid too.
    let mut inside = false;
    let mut uncommented = Vec::new();
    let mut cluster_lines = 0;
    for line in text.lines() {
        if line.starts_with("# >>> cluster mode") {
            inside = true;
        } else if line.starts_with("# <<< cluster mode") {
            inside = false;
        } else if inside {
            let line = line.strip_prefix("# ").unwrap_or_else(|| {
                panic!("in the cluster block, not commented with \"# \": {line}")
            });
            uncommented.push(line);
            cluster_lines += 1;
        } else {
            uncommented.push(line);
        }
    }
    assert!(cluster_lines > 10, "the cluster block is there");
    let dir = tempfile::tempdir().unwrap();
    let cluster_path = dir.path().join("cluster.toml");
    std::fs::write(&cluster_path, uncommented.join("\n")).unwrap();
    let cluster = presenced::Config::from_toml(&print_config(&cluster_path).await).unwrap();
    let c = cluster.cluster.expect("[cluster] on");
    assert_eq!(c.nats_urls.len(), 3);
    assert!(c.node_id.is_some());

    // Markers: every secret and certificate sits under a comment saying so.
    let mut comment = String::new();
    let mut section = String::new();
    let mut marked = 0;
    for line in text.lines() {
        let t = line.trim();
        if let Some(c) = t.strip_prefix('#') {
            comment.push_str(c);
            continue;
        }
        if t.starts_with('[') {
            section = t.to_string();
        }
        let key = t.split('=').next().unwrap_or("").trim();
        let needs = match (section.as_str(), key) {
            ("[tls]", "cert") => Some("CERT:"),
            ("[tls]", "key" | "ticket_secret_file") => Some("SECRET:"),
            ("[auth.secrets]", k) if !k.is_empty() && !k.starts_with('[') => Some("SECRET:"),
            (s, "key") if s.starts_with("[admin.keys.") => Some("SECRET:"),
            ("[[webhooks]]", "secrets") => Some("SECRET:"),
            _ => None,
        };
        if let Some(marker) = needs {
            assert!(
                comment.contains(marker),
                "{CONFIG}: `{t}` is not marked {marker} in the comment above it"
            );
            marked += 1;
        }
        if !t.is_empty() {
            comment.clear();
        }
    }
    assert!(marked >= 7, "{marked} marked values");
    assert!(text.contains("# CERT: SECRET:"), "the private key is both");
}

// ---- the systemd unit ----

/// `Key=value` lines by section, in order (a key may repeat).
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_string();
            continue;
        }
        let (k, v) = line.split_once('=').expect("Key=value");
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

#[test]
fn the_unit_is_hardened_and_agrees_with_the_config() {
    let text = read(UNIT);
    let entries = unit_entries(&text);
    let values = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        match values(key)[..] {
            [v] => v,
            ref other => panic!("{UNIT}: [Service] {key}= set {} times", other.len()),
        }
    };
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("StateDirectory", "presenced"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
    ] {
        assert_eq!(one(key), want, "{UNIT}: {key}");
    }
    assert!(values("SystemCallFilter").contains(&"@system-service"));
    let families = one("RestrictAddressFamilies");
    assert!(families.contains("AF_INET") && families.contains("AF_INET6"));

    let config = presenced::Config::from_toml(&read(CONFIG)).unwrap();
    assert_eq!(
        config.data_dir,
        Path::new("/var/lib").join(one("StateDirectory")),
        "data_dir is the unit's state directory"
    );
    let nofile: u64 = one("LimitNOFILE").parse().expect("a number");
    assert!(
        nofile >= u64::from(config.limits.max_connections) + 256,
        "LimitNOFILE={nofile} below max_connections + 256"
    );
    let stop_secs: u64 = one("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("seconds");
    assert!(
        stop_secs * 1000 >= config.session.shutdown_timeout_ms + 10_000,
        "TimeoutStopSec={stop_secs}s leaves under 10 s beyond session.shutdown_timeout_ms"
    );

    // Every credential path in the config is loaded by the unit, and the config itself is one.
    let credentials: BTreeMap<&str, &str> = values("LoadCredential")
        .into_iter()
        .map(|v| v.split_once(':').expect("name:path"))
        .collect();
    assert!(one("ExecStart").ends_with("--config %d/presenced.toml"));
    assert!(credentials.contains_key("presenced.toml"));
    let settings: String = read(CONFIG)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = 0;
    for part in settings.split(CREDENTIALS).skip(1) {
        let name = part.split('"').next().unwrap();
        assert!(
            credentials.contains_key(name),
            "{CONFIG} reads {CREDENTIALS}{name}, which {UNIT} does not load"
        );
        used += 1;
    }
    assert_eq!(used, 3, "certificate, key and ticket secret");

    // systemd's own check, on a copy whose ExecStart names the binary just built.
    let verify = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if verify.is_err() {
        eprintln!(
            "systemd-analyze is not installed: the unit was checked by the parser above only"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("presenced.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/presenced", env!("CARGO_BIN_EXE_presenced")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("presenced.service"),
        "systemd-analyze verify:\n{stderr}"
    );
}
