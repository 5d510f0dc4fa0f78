//! The real `presenced` binary: `--print-config` shows the embedded defaults, a config file and
//! flags override them, bad config is a clear error, and a running broker serves clients and
//! shuts down cleanly on SIGTERM, telling its clients to reconnect.

mod common;

use common::*;
use presenced::client::{Client, ClientOptions};
use tokio::process::Command;

fn presenced() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presenced"));
    cmd.kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn print_config_shows_embedded_defaults_and_overrides() {
    let out = within(presenced().arg("--print-config").output())
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let config = presenced::Config::from_toml(&text).unwrap();
    assert_eq!(config, presenced::Config::default());
    assert!(text.contains("listen = \"127.0.0.1:7883\""), "{text}");
    assert!(text.contains("127.0.0.1:9464"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("presenced.toml");
    std::fs::write(
        &file,
        "[session]\ngrace_period_ms = 1234\n[limits]\nmax_subscriptions = 10\n",
    )
    .unwrap();
    let out = within(
        presenced()
            .arg("--config")
            .arg(&file)
            .args(["--grace-period-ms", "99", "--print-config"])
            .output(),
    )
    .await
    .unwrap();
    let config = presenced::Config::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(config.session.grace_period_ms, 99, "flags beat the file");
    assert_eq!(
        config.limits.max_subscriptions, 10,
        "the file beats defaults"
    );

    std::fs::write(&file, "[session]\ngrace = 1\n").unwrap();
    let out = within(presenced().arg("--config").arg(&file).output())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    let out = within(presenced().args(["--grace-period-ms", "400000"]).output())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("grace_period_ms"));
}

#[tokio::test]
async fn print_config_redacts_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("presenced.toml");
    let secrets = [
        "token-secret-0123456789abcdef0123456789",
        "admin-key-0123456789abcdef0123456789abcdef",
        "whsec-0123456789abcdef0123456789abcdef",
        "nats-password-0123456789",
        "mqtt-password-0123456789",
        "hook-url-password-0123",
    ];
    std::fs::write(
        &file,
        format!(
            "[auth]\ndefault_kid = \"k1\"\n[auth.secrets]\nk1 = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[admin.keys.ops]\nkey = \"{}\"\nscope = \"write\"\n\
             [[webhooks]]\nurl = \"http://hooks:{}@127.0.0.1:9/hook\"\n[webhooks.secrets]\nv1 = \"{}\"\n\
             [cluster]\nnats_urls = [\"nats://presenced:{}@127.0.0.1:4222\"]\n\
             [mqtt_bridge]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"presenced-1\"\n\
             username = \"bridge\"\npassword = \"{}\"\n",
            secrets[0], secrets[1], secrets[5], secrets[2], secrets[3], secrets[4]
        ),
    )
    .unwrap();
    let out = within(
        presenced()
            .arg("--config")
            .arg(&file)
            .arg("--print-config")
            .output(),
    )
    .await
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    assert_eq!(text.matches("<redacted>").count(), 6, "{text}");
    // What is not secret is still shown: key ids, the user in the NATS URL, the webhook URL.
    assert!(text.contains("k1 = \"<redacted>\""), "{text}");
    assert!(
        text.contains("nats://presenced:<redacted>@127.0.0.1:4222"),
        "{text}"
    );
    assert!(
        text.contains("http://hooks:<redacted>@127.0.0.1:9/hook"),
        "{text}"
    );
}

#[tokio::test]
async fn the_binary_serves_and_shuts_down_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let Spawned {
        mut child,
        addr,
        early_log,
    } = spawn_presenced(dir.path(), &[]).await;
    assert!(
        early_log.iter().any(|l| l.contains("DEV TOKEN SECRET")),
        "the dev secret warning comes first"
    );
    let mut alice = within(Client::connect(ClientOptions::new(addr, token("alice"))))
        .await
        .unwrap();
    within(alice.ping()).await.unwrap();
    let pid = child.id().unwrap().to_string();
    let status = within(Command::new("kill").args(["-TERM", &pid]).status())
        .await
        .unwrap();
    assert!(status.success());
    let close = within(alice.closed()).await.expect("close frame");
    assert_eq!(close_code(&close), presenced::pb::CloseCode::ServerShutdown);
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
}
