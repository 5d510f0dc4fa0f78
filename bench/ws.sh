#!/usr/bin/env bash
# WebSocket vs TCP on one presenced: a release broker with its TLS, plain, wss and ws listeners
# (bench/run.sh's limits), the same fanout workload at the same offered rates over tls and wss,
# and over plain and ws, interleaved per rate (tls, wss, plain, ws) so each pair sees the same
# machine; then broker memory per idle connection over tls and wss, on a fresh broker each.
# Prints the runs and the wss/tls and ws/plain ratios as markdown (bench/ws_report.py). Called
# at the end of bench/run.sh; by hand only, never in CI.
#   bench/ws.sh                                  # about 4 minutes
#   QUICK=1 bench/ws.sh                          # a short smoke of the same steps
#   ROUNDS=3 bench/ws.sh                         # repeat the fanout rounds (medians reported)
#   RATES="200 400 600" IDLE="5000" bench/ws.sh  # fanout-1,000 offered rates, idle sizes
#   NO_BUILD=1 bench/ws.sh                       # use the binaries in target/release as they are
#   PRESENCED=/tmp/b/presenced BENCH=/tmp/b/presence-bench NO_BUILD=1 bench/ws.sh   # copies
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NO_BUILD:-}" ]; then cargo build --release -q --bins; fi
presenced=${PRESENCED:-target/release/presenced}
bench=${BENCH:-target/release/presence-bench}
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
work=$(mktemp -d)
pid=""
stop() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  pid=""
}
trap 'stop; if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi' EXIT

# bench/run.sh's configuration (production defaults except the limits one load-generating host
# would trip), plus both WebSocket listeners.
cat >"$work/presenced.toml" <<CONF
listen = "127.0.0.1:17883"
plain_listen = "127.0.0.1:17884"
data_dir = "$work/data"
[websocket]
listen = "127.0.0.1:17885"
plain_listen = "127.0.0.1:17886"
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

declare -A port=([tls]=17883 [plain]=17884 [wss]=17885 [ws]=17886)
wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
start() {
  rm -rf "$work/data"
  "$presenced" --config "$work/presenced.toml" 2>>"$work/presenced.log" &
  pid=$!
  for p in "${port[@]}"; do wait_port "$p"; done
}
scrape() { python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:19464/metrics").read().decode())'; }

results="$work/results.jsonl"
run() { # run ROUND TRANSPORT WORKLOAD ARGS...: one run, tagged with its round
  local round=$1 transport=$2
  shift 2
  echo "round $round $transport: $*" >&2
  scrape >"$work/before.prom"
  "$bench" --driver native --sources 16 --transport "$transport" \
    --addr "127.0.0.1:${port[$transport]}" --pid "$pid" "$@" >"$work/run.json"
  scrape >"$work/after.prom"
  python3 bench/report.py histogram "$work/run.json" "$work/before.prom" "$work/after.prom" |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$round" >>"$results"
}

if [ -n "${QUICK:-}" ]; then
  rates=${RATES:-20}
  small=(--watchers 100 --changes 200 --rate 100)
  idle=${IDLE:-200}
else
  rates=${RATES:-200 400 600}
  small=(--watchers 100 --changes 5000 --rate 1000)
  idle=${IDLE:-5000}
fi
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start
for round in $(seq 1 "${ROUNDS:-1}"); do
  for rate in $rates; do
    for t in tls wss plain ws; do
      run "$round" "$t" fanout --watchers 1000 --changes $((rate * 5)) --rate "$rate"
    done
  done
  # 100k deliveries/s in small bursts (bench/run.sh's p99 ≤ 5 ms shape).
  for t in tls wss plain ws; do run "$round" "$t" fanout "${small[@]}"; done
done
stop
for n in $idle; do
  for t in ${IDLE_TRANSPORTS:-tls wss}; do
    start
    run 1 "$t" idle --connections "$n"
    stop
  done
done
if grep -q -E "panicked|ERROR" "$work/presenced.log"; then
  echo "the broker logged errors:" >&2
  grep -E "panicked|ERROR" "$work/presenced.log" | head >&2
fi
python3 bench/ws_report.py "$results" "$(nproc) cores, load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
