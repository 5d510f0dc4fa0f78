//! A small Chrome DevTools Protocol driver for tests/browser.rs: finds and launches headless
//! Chromium (kill_on_drop, its own temporary profile), reads the browser's DevTools WebSocket
//! URL from its stderr, and speaks CDP over tokio-tungstenite: commands matched to replies by
//! id (events ignored), one isolated browser context per page, `Runtime.evaluate` by value,
//! `Page.captureScreenshot` and `Target.closeTarget`. Every wait is bounded.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long Chromium may take to print its DevTools address.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CDP command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The browser binary: `$PRESENCED_CHROMIUM`, else the first of `chromium`, `chromium-browser`
/// and `google-chrome` on PATH; `Err` says how to install one.
pub(crate) fn find_chromium() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("PRESENCED_CHROMIUM") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "PRESENCED_CHROMIUM={} is not a file",
                path.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(
        "no Chromium found: tests/browser.rs drives a real headless browser. Install one \
         (Debian/Ubuntu: `apt-get install -y chromium`; scripts/test.sh does this for you) or set \
         PRESENCED_CHROMIUM to a Chromium or Chrome binary"
            .into(),
    )
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One CDP connection (the browser-level endpoint; page sessions are flattened into it).
pub(crate) struct Cdp {
    sink: tokio::sync::Mutex<SplitSink<WebSocketStream<TcpStream>, Message>>,
    pending: Pending,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Cdp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Cdp {
    /// Connects to `ws://127.0.0.1:PORT/devtools/browser/ID`.
    async fn connect(url: &str) -> Result<Cdp, String> {
        let host = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
        let tcp = TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot reach DevTools at {host}: {e}"))?;
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .map_err(|e| format!("DevTools handshake with {url}: {e}"))?;
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let replies = pending.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let text = match &message {
                    Message::Text(text) => text.as_str(),
                    _ => continue,
                };
                let Ok(value) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                // Events have no id; replies go to their caller.
                if let Some(id) = value.get("id").and_then(Value::as_u64) {
                    let waiter = replies.lock().unwrap().remove(&id);
                    if let Some(tx) = waiter {
                        let _ = tx.send(value);
                    }
                }
            }
            replies.lock().unwrap().clear();
        });
        Ok(Cdp {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next_id: AtomicU64::new(1),
            reader,
        })
    }

    /// Sends `method` (to a page session when given) and returns its `result`.
    pub(crate) async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::text(message.to_string()))
            .await
            .map_err(|e| format!("{method}: cannot send: {e}"))?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .map_err(|_| format!("{method}: no reply within {CALL_TIMEOUT:?}"))?
            .map_err(|_| format!("{method}: the DevTools connection closed"))?;
        if let Some(error) = reply.get("error") {
            return Err(format!("{method}: {error}"));
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }
}

/// A headless Chromium started by the test; killed when dropped.
pub(crate) struct Chromium {
    child: tokio::process::Child,
    cdp: Arc<Cdp>,
    /// The last lines Chromium wrote on stderr (after its DevTools address), for failures.
    log: Arc<Mutex<VecDeque<String>>>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Finds and starts the browser and connects to its DevTools endpoint. Panics (never
    /// skips) when there is no browser, saying how to install one.
    pub(crate) async fn launch() -> Chromium {
        let binary = find_chromium().unwrap_or_else(|e| panic!("{e}"));
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(&binary)
            .args([
                "--headless=new",
                // Root in a container: no user namespaces for the sandbox, a small /dev/shm.
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                // The broker's dev certificate is not in the browser's trust store.
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--mute-audio",
                "--password-store=basic",
                "--use-mock-keychain",
                // Several pages at once, none in front: keep their timers and sockets running.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--window-size=1100,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut early = Vec::new();
        let found = tokio::time::timeout(LAUNCH_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let url = line
                    .strip_prefix("DevTools listening on ")
                    .map(|u| u.trim().to_string());
                early.push(line);
                if url.is_some() {
                    return url;
                }
            }
            None
        })
        .await;
        let url = match found {
            Ok(Some(url)) => url,
            Ok(None) => panic!(
                "{} exited before printing its DevTools address:\n{}",
                binary.display(),
                early.join("\n")
            ),
            Err(_) => panic!(
                "{} printed no DevTools address within {LAUNCH_TIMEOUT:?}:\n{}",
                binary.display(),
                early.join("\n")
            ),
        };
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let tail = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut tail = tail.lock().unwrap();
                if tail.len() == 40 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let cdp = Cdp::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        Chromium {
            child,
            cdp: Arc::new(cdp),
            log,
            _profile: profile,
        }
    }

    /// Opens `url` in a new, isolated browser context (its own cookies and storage) and
    /// attaches to it.
    pub(crate) async fn open(&self, name: &str, url: &str) -> Page {
        let context = self
            .cdp
            .call(None, "Target.createBrowserContext", json!({}))
            .await
            .unwrap();
        let context_id = context["browserContextId"].as_str().unwrap().to_string();
        let target = self
            .cdp
            .call(
                None,
                "Target.createTarget",
                json!({"url": url, "browserContextId": context_id}),
            )
            .await
            .unwrap();
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await
            .unwrap();
        Page {
            name: name.to_string(),
            cdp: self.cdp.clone(),
            log: self.log.clone(),
            target_id,
            session_id: attached["sessionId"].as_str().unwrap().to_string(),
        }
    }

    /// Asks the browser to quit, then makes sure it has.
    pub(crate) async fn close(mut self) {
        let _ = self.cdp.call(None, "Browser.close", json!({})).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// One attached page.
pub(crate) struct Page {
    pub(crate) name: String,
    cdp: Arc<Cdp>,
    log: Arc<Mutex<VecDeque<String>>>,
    target_id: String,
    session_id: String,
}

impl Page {
    /// Evaluates `expression` in the page and returns its value (JSON).
    pub(crate) async fn eval(&self, expression: &str) -> Result<Value, String> {
        let result = self
            .cdp
            .call(
                Some(&self.session_id),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("{expression}: {exception}"));
        }
        Ok(result["result"]
            .get("value")
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// The browser's last stderr lines (TLS and network errors show there), D-Bus noise left
    /// out, for failure messages.
    pub(crate) fn browser_log(&self) -> String {
        let tail = self.log.lock().unwrap();
        let lines: Vec<&str> = tail
            .iter()
            .map(String::as_str)
            .filter(|l| !l.contains("dbus") && !l.contains("D-Bus"))
            .collect();
        lines.join("\n")
    }

    /// Saves a PNG of the viewport at `path`.
    pub(crate) async fn screenshot(&self, path: &Path) -> Result<(), String> {
        let shot = self
            .cdp
            .call(
                Some(&self.session_id),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await?;
        let data = shot["data"].as_str().ok_or("no screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Closes the page's tab, as a user closing it would (its sockets go with it).
    pub(crate) async fn close(&self) -> Result<(), String> {
        self.cdp
            .call(
                None,
                "Target.closeTarget",
                json!({"targetId": self.target_id}),
            )
            .await
            .map(|_| ())
    }
}
