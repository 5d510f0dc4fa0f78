//! Shared by the benchmarks: sizes from the environment, and the real release `presenced`
//! binary started on loopback with its addresses read from its start-up log, plus its RSS.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

/// `name` from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A running `presenced` process.
pub struct Broker {
    pub child: tokio::process::Child,
    /// The TLS listener.
    pub addr: SocketAddr,
    /// The metrics endpoint, when enabled.
    pub metrics: Option<SocketAddr>,
    /// Log lines up to and including the "accepting clients" line.
    pub log: Vec<String>,
}

impl Broker {
    /// The broker's resident memory, MiB (0 when unreadable).
    pub fn rss_mib(&self) -> f64 {
        let pid = self.child.id().expect("running");
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

/// Starts the release `presenced` with `args` and waits until it accepts clients. The rest of
/// its log is drained in the background.
pub async fn start(args: &[&std::ffi::OsStr]) -> Broker {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(args)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("presenced starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let (addr, metrics) = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("presenced exited during start:\n{}", log.join("\n")));
        let addr: Option<SocketAddr> = line
            .split("listen=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
        let metrics = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next()?.parse().ok());
        log.push(line);
        if let Some(addr) = addr {
            break (addr, metrics);
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Broker {
        child,
        addr,
        metrics,
        log,
    }
}
