#!/usr/bin/env bash
# Side-by-side presence benchmark: presenced vs Mosquitto doing presence the MQTT way (retained
# presence/<user> topics, Last Will = offline), both over TLS with the certs-dev/ certificates,
# on loopback, same workload code (presence-bench) and payload bytes. Installs Mosquitto from
# Debian's packages if missing, starts both brokers, runs the suite, stops both by PID and prints
# a markdown table. By hand only: never in CI.
#   bench/run.sh              # the suite
#   QUICK=1 bench/run.sh      # a short smoke of the same steps
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v mosquitto >/dev/null 2>&1; then
  apt-get update -q && apt-get install -y -q mosquitto
fi
cargo build --release -q --bin presenced --bin presence-bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cat >"$work/presenced.toml" <<CONF
listen = "127.0.0.1:17883"
data_dir = "$work/data"
[metrics]
listen = "127.0.0.1:19464"
[limits]
publish_rate_per_sec = 1000000
publish_burst = 1000000
request_rate_per_sec = 1000000
request_burst = 1000000
accept_rate_per_sec = 1000000
accept_burst = 1000000
max_handshakes_per_address = 256
CONF
cat >"$work/mosquitto.conf" <<CONF
user root
persistence false
listener 18883 127.0.0.1
cafile $root/certs-dev/ca.pem
certfile $root/certs-dev/server.pem
keyfile $root/certs-dev/server.key
allow_anonymous true
max_connections -1
CONF

target/release/presenced --config "$work/presenced.toml" 2>"$work/presenced.log" &
presenced_pid=$!
pids+=("$presenced_pid")
mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
mosquitto_pid=$!
pids+=("$mosquitto_pid")

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
wait_port 17883
wait_port 18883

bench=target/release/presence-bench
results="$work/results.jsonl"
run_both() {
  "$bench" --driver native --addr 127.0.0.1:17883 --pid "$presenced_pid" "$@" >>"$results"
  "$bench" --driver mqtt --addr 127.0.0.1:18883 --pid "$mosquitto_pid" "$@" >>"$results"
}

if [ -n "${QUICK:-}" ]; then
  run_both fanout --watchers 50 --changes 20 --rate 50
else
  for rate in 50 100 200 400; do
    run_both fanout --watchers 1000 --changes $((rate * 5)) --rate "$rate"
  done
  run_both fanout --watchers 10000 --changes 20 --rate 10
  run_both idle --connections 5000
fi

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| driver | workload | watchers/conns | offered changes/s | deliveries/s | p50 ms | p99 ms | p999 ms | delivered | final state | broker KiB/conn |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["workload"] == "fanout":
        print(f"| {r['driver']} | fanout | {r['watchers']} | {r['rate_per_sec']} | {r['deliveries_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {100*r['delivery_ratio']:.1f}% | {100*r['final_state_ratio']:.1f}% | {r['broker_rss_kib_per_connection'] or 0:.1f} |")
    else:
        print(f"| {r['driver']} | idle | {r['connections']} | | | | | | | | {r['broker_rss_kib_per_connection']:.1f} |")
PY
