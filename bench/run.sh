#!/usr/bin/env bash
# Side-by-side presence benchmark: presenced vs Mosquitto doing presence the MQTT way (retained
# presence/<user> topics, Last Will = offline), on loopback, same workload code (presence-bench)
# and payload bytes, TLS with the certs-dev/ certificates for the headline figures and plain TCP
# as a secondary figure. Installs Mosquitto from Debian's packages if missing, starts both
# brokers, runs the suite, stops both by PID and prints markdown tables (bench/report.py).
# For presenced fanout runs it also reads the broker's own presence_fanout_latency_seconds
# histogram to compare with the client-measured latency. Idle memory and the reconnect storm run
# on freshly started brokers; the storm runs with TLS session resumption on and off (each client
# its own ticket store, or none) and reports full vs resumed handshakes on reconnect and the
# broker's CPU time per reconnect (/proc/<pid>/stat). Then bench/ws.sh compares presenced's
# WebSocket listeners (wss, ws) with its TCP ones (tls, plain) on one broker. By hand only: never
# in CI.
#   bench/run.sh                                 # the suite (about 30 minutes)
#   NO_WS=1 bench/run.sh                         # without the WebSocket comparison
#   QUICK=1 bench/run.sh                         # a short smoke of the same steps
#   IDLE="1000 5000 10000 19000" bench/run.sh    # idle-memory sizes
#   STORM="2000 10000" RESUMPTION="on off" bench/run.sh   # reconnect-storm sizes and modes
#   NATIVE_RATES="200 400" MQTT_RATES="25 50" bench/run.sh   # fanout-1,000 offered rates
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v mosquitto >/dev/null 2>&1; then
  apt-get update -q && apt-get install -y -q mosquitto
fi
cargo build --release -q --bins
work=$(mktemp -d)
presenced_pid=""
mosquitto_pid=""
stop_brokers() {
  for p in $presenced_pid $mosquitto_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  presenced_pid=""
  mosquitto_pid=""
}
trap 'stop_brokers; rm -rf "$work"' EXIT

# Production defaults except the limits a load generator on one machine would trip: the
# per-user publish and request rates, the accept rate (a defense against connect floods, which a
# reconnect storm from one host resembles), and each address's share of the accept rate and of
# connections (the storm reconnects 10,000 clients at once and idle holds 19,000, from only 16
# loopback addresses).
cat >"$work/presenced.toml" <<CONF
listen = "127.0.0.1:17883"
plain_listen = "127.0.0.1:17884"
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
accept_rate_per_address_per_sec = 1000000
accept_burst_per_address = 1000000
max_connections_per_address = 100000
CONF
cat >"$work/mosquitto.conf" <<CONF
user root
persistence false
log_type error
log_type warning
max_connections -1
listener 18883 127.0.0.1
cafile $root/certs-dev/ca.pem
certfile $root/certs-dev/server.pem
keyfile $root/certs-dev/server.key
allow_anonymous true
listener 18884 127.0.0.1
allow_anonymous true
CONF

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
start_brokers() {
  rm -rf "$work/data"
  target/release/presenced --config "$work/presenced.toml" 2>>"$work/presenced.log" &
  presenced_pid=$!
  mosquitto -c "$work/mosquitto.conf" 2>>"$work/mosquitto.log" &
  mosquitto_pid=$!
  wait_port 17883
  wait_port 18883
}

scrape() { python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:19464/metrics").read().decode())'; }

bench=target/release/presence-bench
results="$work/results.jsonl"
# Clients come from 16 loopback addresses, as clients of a real service come from many.
common=(--sources 16)
native() { # native [--plain] ARGS...: one presenced run, with its fanout histogram
  local port=17883
  if [ "$1" = "--plain" ]; then port=17884; fi
  scrape >"$work/before.prom"
  "$bench" --driver native --addr "127.0.0.1:$port" --pid "$presenced_pid" --metrics 127.0.0.1:19464 "${common[@]}" "$@" >"$work/run.json"
  scrape >"$work/after.prom"
  python3 bench/report.py histogram "$work/run.json" "$work/before.prom" "$work/after.prom" >>"$results"
}
mqtt() { # mqtt [--plain] ARGS...
  local port=18883
  if [ "$1" = "--plain" ]; then port=18884; fi
  "$bench" --driver mqtt --addr "127.0.0.1:$port" --pid "$mosquitto_pid" "${common[@]}" "$@" >>"$results"
}
fanout1000() { # fanout1000 DRIVER [--plain] RATE...
  local driver=$1; shift
  local plain=()
  if [ "${1:-}" = "--plain" ]; then plain=(--plain); shift; fi
  for rate in "$@"; do
    "$driver" "${plain[@]}" fanout --watchers 1000 --changes $((rate * 5)) --rate "$rate"
  done
}

start_brokers
if [ -n "${QUICK:-}" ]; then
  fanout1000 native 20
  fanout1000 mqtt 20
  native fanout --watchers 100 --changes 200 --rate 100
  mqtt fanout --watchers 100 --changes 200 --rate 100
  native mix --users 200 --watch 5 --percent-per-sec 10 --seconds 3
  mqtt mix --users 200 --watch 5 --percent-per-sec 10 --seconds 3
else
  fanout1000 native ${NATIVE_RATES:-200 400 600 800 1000}
  fanout1000 mqtt ${MQTT_RATES:-25 50 60 75 100}
  fanout1000 native --plain ${NATIVE_PLAIN_RATES:-400 800 1200}
  fanout1000 mqtt --plain ${MQTT_PLAIN_RATES:-50 75 100 150}
  # 100k deliveries/s in small bursts: the p99 ≤ 5 ms goal.
  for t in "" --plain; do
    native $t fanout --watchers 100 --changes 5000 --rate 1000
    mqtt $t fanout --watchers 100 --changes 5000 --rate 1000
  done
  native fanout --watchers 10000 --changes 20 --rate 10
  mqtt fanout --watchers 10000 --changes 20 --rate 10
  # The realistic mix: 10,000 users each watching 50 others, 1% (then 10%) changing per second.
  for pct in 1 10; do
    native mix --users 10000 --watch 50 --percent-per-sec "$pct" --seconds 20
    mqtt mix --users 10000 --watch 50 --percent-per-sec "$pct" --seconds 20
  done
fi
stop_brokers

# Resumption on and off for each size, on a fresh broker each (a storm's clients then hold only
# tickets from this broker's run), so the report can set them side by side.
for clients in ${STORM:-$([ -n "${QUICK:-}" ] && echo 500 || echo "2000 10000")}; do
  for resumption in ${RESUMPTION:-on off}; do
    start_brokers
    native storm --clients "$clients" --resumption "$resumption"
    mqtt storm --clients "$clients" --resumption "$resumption"
    stop_brokers
  done
done

for n in ${IDLE:-$([ -n "${QUICK:-}" ] && echo 200 || echo "1000 5000 10000 19000")}; do
  start_brokers
  native idle --connections "$n"
  mqtt idle --connections "$n"
  stop_brokers
done

python3 bench/report.py tables "$results"

# WebSocket vs TCP: its own broker (all four listeners), after the brokers above stopped.
if [ -z "${NO_WS:-}" ]; then
  echo
  NO_BUILD=1 bench/ws.sh
fi
