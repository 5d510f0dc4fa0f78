#!/usr/bin/env bash
# Cluster-mode benchmark, by hand only (never in CI): 3 presenced nodes on loopback over NATS
# (3 nats-server processes routed into one JetStream cluster, or one server with
# NATS_SERVERS=1), next to a single presenced without cluster mode, all on this machine at once.
#
#   fanout  same-node: publisher and watchers all on node 1;
#           cross-node: publisher on node 1, watchers on nodes 2 and 3 (half each);
#           single: one presenced without [cluster] (bench/run.sh's configuration).
#           The three alternate (same, cross, single, same, cross, ...) for ROUNDS rounds, at
#           each fanout shape, TLS, 16 loopback source addresses like bench/run.sh.
#   node death: DEVICES users connected once each on node 1, DEATH_WATCHERS watchers on nodes 2
#           and 3 subscribed to all of them; node 1 is SIGKILLed and the run measures from the
#           kill until every watcher saw every device's OFFLINE (peer timeout 3 s + the grace
#           period), once per grace period in GRACES, DEATH_RUNS times each, on a fresh cluster
#           each time.
#
# Every process is started here and stopped by its PID (SIGTERM, then SIGKILL) in a trap.
# Prints markdown tables (bench/cluster_report.py); the raw JSON lines stay in
# $work/results.jsonl when KEEP=1 (the work folder is printed).
#   bench/cluster.sh                        # about 15 minutes
#   QUICK=1 bench/cluster.sh                # a short smoke of the same steps
#   NATS_SERVERS=1 bench/cluster.sh         # one nats-server, subscription_replicas = 1
#   ROUNDS=3 SHAPES="1000:400 100:1000" GRACES="1000 5000" DEATH_RUNS=2 bench/cluster.sh
# SHAPES are fanout shapes WATCHERS:CHANGES_PER_SEC (each publishes for 5 s).
set -euo pipefail
cd "$(dirname "$0")/.."

nats_servers=${NATS_SERVERS:-3}
if [ -n "${QUICK:-}" ]; then
  rounds=${ROUNDS:-1}
  shapes=${SHAPES:-"100:100"}
  graces=${GRACES:-"1000"}
  death_runs=${DEATH_RUNS:-1}
  devices=${DEVICES:-200}
  death_watchers=${DEATH_WATCHERS:-20}
else
  rounds=${ROUNDS:-3}
  shapes=${SHAPES:-"100:100 1000:200 1000:400"}
  graces=${GRACES:-"1000 5000"}
  death_runs=${DEATH_RUNS:-2}
  devices=${DEVICES:-1000}
  death_watchers=${DEATH_WATCHERS:-100}
fi
settle=${SETTLE:-6} # seconds between fanout runs: the last run's sessions pass their grace period
presenced=${PRESENCED:-target/release/presenced}
bench=${BENCH:-target/release/presence-bench}
nats=${PRESENCED_NATS_SERVER:-nats-server}

command -v "$nats" >/dev/null 2>&1 || {
  echo "nats-server (>= 2.11) not on PATH; scripts/test.sh shows how to get one" >&2
  exit 1
}
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -q --bin presenced --bin presence-bench
fi
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

work=$(mktemp -d)
results="$work/results.jsonl"
nats_pids=()
node_pids=()
single_pid=""

stop_pid() { # SIGTERM, up to 5 s, then SIGKILL; only PIDs started here
  local p=$1
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
stop_cluster() {
  for p in "${node_pids[@]}"; do stop_pid "$p"; done
  node_pids=()
  for p in "${nats_pids[@]}"; do stop_pid "$p"; done
  nats_pids=()
}
stop_single() {
  stop_pid "$single_pid"
  single_pid=""
}
cleanup() {
  stop_single
  stop_cluster
  if [ -n "${KEEP:-}" ]; then echo "results and logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}

# Ports: NATS clients 24221.., routes 24231.., monitoring 24241..; node k: TLS 2488k, plain
# 2489k, metrics 2496k; the single node: 24880, 24890, 24960.
nats_port() { echo $((24220 + $1)); }
node_addr() { echo "127.0.0.1:$((24880 + $1))"; }

start_nats() {
  rm -rf "$work/nats"
  mkdir -p "$work/nats"
  for i in $(seq 1 "$nats_servers"); do
    mkdir -p "$work/nats/s$i"
    echo "=== start" >>"$work/nats-s$i.log"
    {
      echo "server_name: \"s$i\""
      echo "listen: \"127.0.0.1:$(nats_port "$i")\""
      echo "http: \"127.0.0.1:$((24240 + i))\""
      echo "jetstream { store_dir: \"$work/nats/s$i\", max_memory_store: 256MB, max_file_store: 2GB }"
      if [ "$nats_servers" -gt 1 ]; then
        routes=""
        for j in $(seq 1 "$nats_servers"); do
          [ "$j" = "$i" ] || routes="$routes\"nats-route://127.0.0.1:$((24230 + j))\", "
        done
        echo "cluster { name: \"bench\", listen: \"127.0.0.1:$((24230 + i))\", routes: [${routes%, }] }"
      fi
    } >"$work/nats/s$i.conf"
    "$nats" -c "$work/nats/s$i.conf" >>"$work/nats-s$i.log" 2>&1 &
    nats_pids+=($!)
  done
  # JetStream is usable once every server's /healthz says so (meta leader elected).
  for i in $(seq 1 "$nats_servers"); do
    for _ in $(seq 1 300); do
      if curl -sf "http://127.0.0.1:$((24240 + i))/healthz" >/dev/null 2>&1; then break; fi
      sleep 0.1
    done
    curl -sf "http://127.0.0.1:$((24240 + i))/healthz" >/dev/null ||
      { echo "nats server s$i never became healthy" >&2; return 1; }
  done
}

limits='[limits]
publish_rate_per_sec = 1000000
publish_burst = 1000000
request_rate_per_sec = 1000000
request_burst = 1000000
accept_rate_per_sec = 1000000
accept_burst = 1000000
accept_rate_per_address_per_sec = 1000000
accept_burst_per_address = 1000000
max_connections_per_address = 100000'

start_cluster() { # start_cluster GRACE_MS: NATS, then nodes 1..3 (node k on NATS server k)
  local grace=$1
  start_nats
  for k in 1 2 3; do
    local s=$(((k - 1) % nats_servers + 1))
    rm -rf "$work/node$k"
    cat >"$work/node$k.toml" <<CONF
listen = "127.0.0.1:$((24880 + k))"
plain_listen = "127.0.0.1:$((24890 + k))"
data_dir = "$work/node$k"
[metrics]
listen = "127.0.0.1:$((24960 + k))"
[session]
grace_period_ms = $grace
$limits
[cluster]
nats_urls = ["nats://127.0.0.1:$(nats_port "$s")"]
node_id = "n$k"
subscription_replicas = $nats_servers
CONF
    echo "=== start (grace $grace ms)" >>"$work/node$k.log"
    "$presenced" --config "$work/node$k.toml" >>"$work/node$k.log" 2>&1 &
    node_pids+=($!)
  done
  for k in 1 2 3; do wait_port $((24880 + k)); done
}

start_single() {
  rm -rf "$work/single"
  cat >"$work/single.toml" <<CONF
listen = "127.0.0.1:24880"
plain_listen = "127.0.0.1:24890"
data_dir = "$work/single"
[metrics]
listen = "127.0.0.1:24960"
$limits
CONF
  "$presenced" --config "$work/single.toml" >>"$work/single.log" 2>&1 &
  single_pid=$!
  wait_port 24880
}

report=bench/cluster_report.py
common=(--driver native --sources 16)
fanout() { # fanout TOPOLOGY ROUND WATCHERS RATE
  local where=() ports="24961 24962 24963"
  case $1 in
    same) where=(--addr "$(node_addr 1)" --pid "${node_pids[0]}") ;;
    cross) where=(--addr "$(node_addr 1)" --watch-addr "$(node_addr 2)" --watch-addr "$(node_addr 3)") ;;
    single) where=(--addr "$(node_addr 0)" --pid "$single_pid") ports=24960 ;;
  esac
  echo "fanout $1 round $2: $3 watchers × $4 changes/s" >&2
  python3 "$report" scrape $ports >"$work/before.json"
  "$bench" "${common[@]}" "${where[@]}" fanout --watchers "$3" --changes $(($4 * 5)) --rate "$4" >"$work/run.json"
  python3 "$report" scrape $ports >"$work/after.json"
  python3 "$report" annotate "$work/before.json" "$work/after.json" topology="$1" round="$2" \
    <"$work/run.json" >>"$results"
  sleep "$settle"
}

nproc_note="$(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$nproc_note; NATS servers: $nats_servers; work folder $work" >&2

# Fanout: same-node, cross-node and single-node alternate, all processes up throughout.
start_cluster 5000
start_single
for r in $(seq 1 "$rounds"); do
  for shape in $shapes; do
    w=${shape%%:*}
    rate=${shape##*:}
    for topo in same cross single; do fanout "$topo" "$r" "$w" "$rate"; done
  done
done
stop_single
stop_cluster

# Node death, on a fresh cluster each run.
for grace in $graces; do
  for r in $(seq 1 "$death_runs"); do
    start_cluster "$grace"
    sleep 2 # heartbeats: every node knows the others
    echo "node death, grace $grace ms, run $r: $devices devices, $death_watchers watchers" >&2
    python3 "$report" scrape 24962 24963 >"$work/before.json"
    "$bench" "${common[@]}" --addr "$(node_addr 1)" --watch-addr "$(node_addr 2)" \
      --watch-addr "$(node_addr 3)" node-death --devices "$devices" \
      --watchers "$death_watchers" --kill-pid "${node_pids[0]}" >"$work/run.json"
    python3 "$report" scrape 24962 24963 >"$work/after.json"
    python3 "$report" annotate "$work/before.json" "$work/after.json" grace_ms="$grace" round="$r" \
      <"$work/run.json" >>"$results"
    stop_cluster
  done
done

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 "$report" "$results" "$nproc_note, NATS servers: $nats_servers"
# What the nodes logged at WARN or above (the killed node's last words included).
echo
echo "Log lines at WARN/ERROR, beyond presenced's start-up warnings (dev certificate, dev token"
echo "secret, open-file limit) and NATS's while its routes and meta leader form (count, then the"
echo "commonest kinds, digits as N):"
startup='development TLS certificate|PUBLIC DEV TOKEN SECRET|open-file limit|connect to route|Waiting for routing|contact with a meta leader|Healthcheck failed'
for f in "$work"/node*.log "$work"/single.log "$work"/nats-s*.log; do
  [ -f "$f" ] || continue
  n=$(grep -E ' (WARN|ERROR) |\[(WRN|ERR)\]' "$f" | grep -cvE "$startup" || true)
  echo "- $(basename "$f"): $n"
  grep -E ' (WARN|ERROR) |\[(WRN|ERR)\]' "$f" | grep -vE "$startup" |
    sed -E 's/^[^ ]+ +//; s/^[0-9/]+ [0-9:.]+ //; s/[0-9]+/N/g' |
    sort | uniq -c | sort -rn | head -5 | sed 's/^/    /' || true
done
if grep -l 'panicked' "$work"/*.log >/dev/null 2>&1; then
  echo "PANICS in: $(grep -l 'panicked' "$work"/*.log | xargs -n1 basename | tr '\n' ' ')"
fi
