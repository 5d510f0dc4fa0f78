//! A TCP proxy on 127.0.0.1:0 in front of one address, for network-failure tests: `cut`
//! closes every forwarded connection at once and, until `restore`, closes each new one as soon
//! as it is accepted, so a client sees a dead link and fails every reconnect in between.
//! Forwarding is tokio's `copy_bidirectional` (an 8 KiB buffer each way). Dropping the proxy
//! stops its accept loop and closes every connection it forwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running proxy; see the module comment.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    /// true while cut.
    cut: watch::Sender<bool>,
    shutdown: CancellationToken,
    /// Connections being forwarded right now.
    active: Arc<AtomicUsize>,
    /// Connections accepted and forwarded since the start.
    forwarded: Arc<AtomicUsize>,
}

impl TcpProxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let active = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept_loop(
            listener,
            target,
            cut.subscribe(),
            shutdown.clone(),
            active.clone(),
            forwarded.clone(),
        ));
        TcpProxy {
            addr,
            target,
            cut,
            shutdown,
            active,
            forwarded,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "nats://ADDR" of the proxy, for a NATS client.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Closes every forwarded connection and refuses (accepts and closes at once) new ones
    /// until `restore`. Returns once every forwarded connection is closed (bounded: 5 s).
    pub async fn cut(&self) {
        self.cut.send_replace(true);
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while self.active.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "proxy connections still open 5 s after cut");
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// Connections being forwarded right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Connections forwarded since the start (those refused while cut are not counted).
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    cut: watch::Receiver<bool>,
    shutdown: CancellationToken,
    active: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
) {
    loop {
        let inbound = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors and the like: try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if *cut.borrow() {
            drop(inbound);
            continue;
        }
        // Counted before the task runs, so `cut` waits for a connection accepted just before.
        active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(active.clone());
        tokio::spawn(forward(
            inbound,
            target,
            cut.clone(),
            shutdown.clone(),
            guard,
            forwarded.clone(),
        ));
    }
}

/// Decrements the active count however the connection task ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<bool>,
    shutdown: CancellationToken,
    _guard: ActiveGuard,
    forwarded: Arc<AtomicUsize>,
) {
    let outbound = tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = cut.wait_for(|c| *c) => return,
        connected = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)) => {
            match connected {
                Ok(Ok(stream)) => stream,
                // Target down: close the client's side, as the target would have.
                _ => return,
            }
        }
    };
    let mut outbound = outbound;
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    forwarded.fetch_add(1, Ordering::SeqCst);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = cut.wait_for(|c| *c) => {}
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
    }
    // Both sockets close here.
}
