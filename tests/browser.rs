//! The browser example end to end in a real headless Chromium: a test broker with its wss
//! listener, `presencectl web` serving examples/web, and two isolated browser contexts (alice and
//! bob) driven over the DevTools protocol (`browser/cdp.rs`). The pages watch each other and
//! join one room; the test reads their DOM and checks that presence set from a page, presence
//! set by a TCP client of the same user, the page's keepalive Pings, and a page closed (offline
//! after the grace period, gone from the room) all show up live. It never skips: without Chromium it fails and says how
//! to install it. Screenshots land in target/browser/.

mod common;

#[path = "browser/cdp.rs"]
mod cdp;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use presenced::client::{Client, ClientOptions};
use presenced::pb;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use cdp::{Chromium, Page};

/// How long one expected change may take to show on a page.
const STEP: Duration = Duration::from_secs(10);
/// How often a page's DOM is read while waiting.
const POLL: Duration = Duration::from_millis(50);
/// The broker's grace period: a closed page's user goes offline this long after.
const GRACE_MS: u64 = 300;
/// Alice's page asks for this keepalive (the broker allows it): silent for 1.5 x this long, the
/// session would be closed, so her page must ping (every half keepalive).
const KEEPALIVE_SECS: u32 = 2;

/// What a page shows, read from its DOM in one evaluation.
const SNAPSHOT: &str = r##"(() => {
  const q = (s) => document.querySelector(s);
  const watched = {};
  for (const li of document.querySelectorAll("#watch-list li")) {
    watched[li.dataset.user] = {
      badge: li.querySelector(".badge").textContent,
      status: li.querySelector(".status-text").textContent,
      last_seen_ms: Number(li.querySelector(".last-seen").dataset.lastSeenMs || 0),
      last_seen: li.querySelector(".last-seen").textContent,
    };
  }
  return {
    status_line: q("#status-line").textContent,
    state: q("#status-line").dataset.state,
    pongs: Number(q("#status-line").dataset.pongs || 0),
    error: q("#error-line").textContent,
    me: { badge: q("#me-badge").textContent, status: q("#me-status").textContent },
    watched,
    room: q("#room").dataset.channel,
    members: [...document.querySelectorAll("#room-members li")].map((li) => li.dataset.member),
  };
})()"##;

/// `presencectl web`, killed when dropped.
struct WebServer {
    _child: tokio::process::Child,
    url: String,
}

/// Starts `presencectl web --listen 127.0.0.1:0` on the repository's example folder and reads
/// the `serving http://...` line.
async fn start_web() -> WebServer {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_presencectl"))
        .args(["web", "--listen", "127.0.0.1:0", "--dir"])
        .arg(repo.join("examples/web"))
        .arg("--proto")
        .arg(repo.join("proto/presence/v1/presence.proto"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("presencectl starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let line = common::within(stdout.next_line()).await.unwrap();
    let Some(url) = line
        .as_deref()
        .and_then(|l| l.strip_prefix("serving "))
        .map(str::to_string)
    else {
        let mut err = String::new();
        let _ = common::within(stderr.read_to_string(&mut err)).await;
        panic!("presencectl web did not start (stdout {line:?}):\n{err}");
    };
    // Its stderr (one hint, then refused requests) is shown with the test's output.
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[presencectl web] {line}");
        }
    });
    WebServer { _child: child, url }
}

/// Reads a page's snapshot until `ok` accepts it, at most `STEP`; the failure shows the last
/// snapshot, the page's text and the browser's last stderr lines.
async fn wait_for(page: &Page, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let last = match page.eval(SNAPSHOT).await {
            Ok(snapshot) if ok(&snapshot) => return snapshot,
            Ok(snapshot) => snapshot,
            Err(e) => Value::String(format!("evaluate failed: {e}")),
        };
        if tokio::time::Instant::now() >= deadline {
            let text = page
                .eval("document.body ? document.body.innerText : '(no body)'")
                .await
                .unwrap_or_else(Value::String);
            panic!(
                "{}'s page: {what}: not within {STEP:?}.\nlast snapshot: {last:#}\npage text:\n{}\n\
                 browser stderr (tail):\n{}",
                page.name,
                text.as_str().unwrap_or_default(),
                page.browser_log()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn watched<'a>(snapshot: &'a Value, user: &str, field: &str) -> &'a Value {
    &snapshot["watched"][user][field]
}

fn members(snapshot: &Value) -> Vec<&str> {
    snapshot["members"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Where screenshots go: `$CARGO_TARGET_DIR/browser`, else target/browser in the repository.
fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("browser")
}

async fn screenshot(page: &Page) -> PathBuf {
    let path = screenshot_dir().join(format!("{}.png", page.name));
    page.screenshot(&path)
        .await
        .unwrap_or_else(|e| panic!("screenshot of {}'s page: {e}", page.name));
    println!("screenshot: {}", path.display());
    path
}

/// The page's address with everything it needs in the fragment.
fn page_url(web: &WebServer, ws: &str, user: &str, watch: &str, room: &str) -> String {
    let token = common::token(user);
    format!(
        "{}#ws={ws}&token={token}&device=web-{user}&watch={watch}&room={room}",
        web.url
    )
}

#[tokio::test]
async fn two_browsers_see_each_other_a_tcp_client_and_a_closed_tab() {
    let broker = common::start(|c| {
        c.websocket.listen = Some("127.0.0.1:0".parse().unwrap());
        c.websocket.plain_listen = Some("127.0.0.1:0".parse().unwrap());
        c.session.grace_period_ms = GRACE_MS;
        c.session.keepalive_min_secs = 1;
    })
    .await;
    // Alice comes through the wss listener (TLS with the dev certificate, which the browser is
    // told to accept), Bob through the plain ws one that local development uses.
    let wss = format!(
        "wss://{}/v1/ws",
        broker.ws_addr.expect("the wss listener is on")
    );
    let ws = format!(
        "ws://{}/v1/ws",
        broker.ws_plain_addr.expect("the ws listener is on")
    );
    let web = start_web().await;
    let browser = Chromium::launch().await;

    let alice = browser
        .open(
            "alice",
            &format!(
                "{}&keepalive={KEEPALIVE_SECS}",
                page_url(&web, &wss, "alice", "bob", "lobby")
            ),
        )
        .await;
    let bob = browser
        .open("bob", &page_url(&web, &ws, "bob", "alice", "lobby"))
        .await;
    for (page, user) in [(&alice, "alice"), (&bob, "bob")] {
        wait_for(page, "connected", |s| {
            s["state"] == "connected"
                && s["status_line"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(&format!("connected as {user} ")))
        })
        .await;
    }

    // Each sees the other online, and both in the room.
    wait_for(&alice, "bob online", |s| {
        watched(s, "bob", "badge") == "online"
    })
    .await;
    wait_for(&bob, "alice online", |s| {
        watched(s, "alice", "badge") == "online"
    })
    .await;
    for page in [&alice, &bob] {
        wait_for(page, "both in lobby", |s| {
            s["room"] == "lobby" && members(s) == ["alice", "bob"]
        })
        .await;
    }

    // Alice uses her page's own controls: away, "brb".
    alice
        .eval(
            r#"(() => {
              const select = document.getElementById("availability");
              select.value = [...select.options].find((o) => o.textContent === "away").value;
              document.getElementById("status-text").value = "brb";
              document.getElementById("set-presence").click();
            })()"#,
        )
        .await
        .unwrap();
    wait_for(&alice, "own badge away", |s| {
        s["me"]["badge"] == "away" && s["me"]["status"] == "brb"
    })
    .await;
    wait_for(&bob, "alice away, brb", |s| {
        watched(s, "alice", "badge") == "away" && watched(s, "alice", "status") == "brb"
    })
    .await;

    // Alice on another device over TLS TCP. It connects away (the aggregate is the most
    // available device, so an online desk device would keep her online) and sets a status.
    let mut options = ClientOptions::new(broker.addr, common::token("alice")).device("desk");
    options.initial_presence = Some(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        ..Default::default()
    });
    let desk = common::within(Client::connect(options))
        .await
        .expect("alice's desk connects");
    common::within(desk.set_presence(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        status: Some("in a meeting".into()),
        ..Default::default()
    }))
    .await
    .expect("alice's desk sets presence");
    wait_for(&bob, "alice away, in a meeting (from TCP)", |s| {
        watched(s, "alice", "badge") == "away" && watched(s, "alice", "status") == "in a meeting"
    })
    .await;
    wait_for(&alice, "own status from the other device", |s| {
        s["me"]["status"] == "in a meeting"
    })
    .await;
    screenshot(&alice).await;
    common::within(desk.disconnect())
        .await
        .expect("alice's desk disconnects");

    // Alice's page has been quiet but for its Pings for longer than 1.5 x keepalive: still on.
    let pongs = 2 * KEEPALIVE_SECS as u64;
    wait_for(&alice, "pinged past 1.5 x keepalive", |s| {
        s["state"] == "connected" && s["pongs"].as_u64().is_some_and(|n| n >= pongs)
    })
    .await;

    // Alice closes her tab: offline after the grace period, out of the room.
    alice.close().await.expect("alice's tab closes");
    let seen = wait_for(&bob, "alice offline and gone from lobby", |s| {
        watched(s, "alice", "badge") == "offline" && members(s) == ["bob"]
    })
    .await;
    assert!(
        watched(&seen, "alice", "last_seen_ms")
            .as_u64()
            .is_some_and(|ms| ms > 0),
        "an offline user shows when she was last seen: {seen:#}"
    );
    assert_eq!(seen["state"], "connected", "{seen:#}");
    let shot = screenshot(&bob).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{shot:?}");

    // Bob's Disconnect button: the Close frame's code ends up on the status line.
    bob.eval(r#"document.getElementById("disconnect-button").click()"#)
        .await
        .unwrap();
    wait_for(&bob, "closed normally", |s| {
        s["state"] == "closed"
            && s["status_line"]
                .as_str()
                .is_some_and(|t| t.starts_with("closed: normal"))
    })
    .await;

    browser.close().await;
    drop(web);
    broker.stop().await;
}
