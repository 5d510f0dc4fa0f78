//! Cluster-test harness: presenced nodes as real processes (so a test can SIGKILL or SIGSTOP
//! one), each on 127.0.0.1 port 0 with metrics on port 0 and its own data folder, joined to a
//! NATS cluster from `nats.rs`. Signals go only to the PIDs this harness started. The nodes'
//! digests of every origin's sessions are read from their metrics endpoints, so a test can
//! wait until every replica agrees.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use presenced::client::{Client, ClientOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A presenced node process.
pub struct Node {
    pub id: String,
    pub child: tokio::process::Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// The admin API, when the node's config turns it on.
    #[allow(dead_code)]
    pub admin: Option<SocketAddr>,
    /// The wss listener, when started with `--ws-listen`.
    #[allow(dead_code)]
    pub ws: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
    pub data_dir: tempfile::TempDir,
}

fn parse_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(key).nth(1).map(|rest| {
        rest.trim_start_matches(['"', '(', '='])
            .split(|c: char| c.is_whitespace() || c == '"' || c == ')')
            .next()
            .unwrap()
    })
}

impl Node {
    /// Starts node `id` against `nats_urls` and waits until it accepts clients.
    pub async fn start(id: &str, nats_urls: &[String], extra: &[&str]) -> Node {
        Node::start_in(id, nats_urls, extra, tempfile::tempdir().unwrap()).await
    }

    /// The same on an existing data folder (a restart).
    pub async fn start_in(
        id: &str,
        nats_urls: &[String],
        extra: &[&str],
        data_dir: tempfile::TempDir,
    ) -> Node {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_presenced"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--node-id",
            id,
            "--data-dir",
        ])
        .arg(data_dir.path());
        for url in nats_urls {
            cmd.args(["--cluster-nats", url]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "presenced=info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("presenced starts");
        let pid = child.id().expect("pid");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr, metrics, admin, ws) = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("node starts within 30 s")
                .unwrap()
                .unwrap_or_else(|| {
                    panic!(
                        "node {id} exited early:\n{}",
                        log.lock().unwrap().join("\n")
                    )
                });
            log.lock().unwrap().push(line.clone());
            if line.contains("accepting clients") {
                let addr = parse_after(&line, "listen=").unwrap().parse().unwrap();
                let metrics = parse_after(&line, "http://").unwrap();
                let metrics = metrics.trim_end_matches("/metrics").parse().unwrap();
                let admin = parse_after(&line, "admin://").map(|a| a.parse().unwrap());
                let ws = parse_after(&line, "wss://")
                    .map(|a| a.trim_end_matches("/v1/ws").parse().unwrap());
                break (addr, metrics, admin, ws);
            }
        };
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Node {
            id: id.to_string(),
            child,
            pid,
            addr,
            metrics,
            admin,
            ws,
            log,
            data_dir,
        }
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL, then reap.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }

    /// Sends `signal` (STOP, CONT, TERM) to this node's PID only.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.pid);
    }

    /// Options for a client of this node.
    pub fn options(&self, user: &str, device: &str) -> ClientOptions {
        ClientOptions::new(self.addr, super::token(user)).device(device)
    }

    /// Connects (user, device) here.
    pub async fn connect(&self, user: &str, device: &str) -> Client {
        super::within(Client::connect(self.options(user, device)))
            .await
            .unwrap_or_else(|e| panic!("{user}/{device} connects to {}: {e}", self.id))
    }

    /// The metrics page.
    pub async fn scrape(&self) -> String {
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    /// This node's view of every origin's digest: its own under its id.
    pub async fn digests(&self) -> BTreeMap<String, u64> {
        let page = self.scrape().await;
        let mut out = BTreeMap::new();
        for line in page.lines() {
            if let Some(v) = line.strip_prefix("presence_cluster_digest ") {
                out.insert(self.id.clone(), v.trim().parse::<f64>().unwrap() as u64);
            } else if let Some(rest) = line.strip_prefix("presence_cluster_peer_digest{node=\"") {
                let (node, v) = rest.split_once("\"} ").unwrap();
                out.insert(node.to_string(), v.trim().parse::<f64>().unwrap() as u64);
            }
        }
        out.retain(|_, d| *d != 0);
        out
    }

    /// A metric's value (first sample whose line starts with `prefix`), 0 when absent.
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.scrape()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Waits (bounded by `limit`) until every node reports the same digest for every origin
/// among `nodes`; returns how long it took.
pub async fn digests_agree(nodes: &[&Node], limit: Duration) -> Duration {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < limit {
        last.clear();
        for n in nodes {
            let mut d = n.digests().await;
            d.retain(|k, _| nodes.iter().any(|n| &n.id == k));
            last.push(d);
        }
        if last.windows(2).all(|w| w[0] == w[1]) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("digests did not agree within {limit:?}: {last:?}");
}
