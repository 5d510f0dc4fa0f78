#!/usr/bin/env bash
# Single-node A/B: two presenced release binaries (e.g. before and after a change), each on
# bench/run.sh's configuration (no [cluster]), driven by the same presence-bench binary with
# bench/run.sh's fanout shapes, alternating A B A B on a fresh broker for every run. By hand
# only. Prints every run, the medians and the B/A ratios (bench/ab_report.py).
#   bench/single_ab.sh A_PRESENCED B_PRESENCED
#   ROUNDS=3 SHAPES="1000:200 1000:400 1000:600 1000:800 100:1000" bench/single_ab.sh A B
#   PLAIN_SHAPES="1000:400" ...   # the same over plain TCP (default: none)
# SHAPES are WATCHERS:CHANGES_PER_SEC; each run publishes for 5 s, as bench/run.sh does.
# To build the baseline:  git worktree add /tmp/base COMMIT && (cd /tmp/base && cargo build
# --release --bin presenced), then pass /tmp/base/target/release/presenced as A.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || {
  echo "usage: $0 A_PRESENCED B_PRESENCED" >&2
  exit 2
}
a=$(realpath "$1")
b=$(realpath "$2")
rounds=${ROUNDS:-3}
shapes=${SHAPES:-"1000:200 1000:400 1000:600 1000:800 100:1000"}
plain_shapes=${PLAIN_SHAPES:-}
bench=${BENCH:-target/release/presence-bench}
if [ -z "${NO_BUILD:-}" ]; then cargo build --release -q --bin presence-bench; fi
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

work=$(mktemp -d)
results="$work/results.jsonl"
pid=""
stop() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  pid=""
}
trap 'stop; if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi' EXIT

cat >"$work/presenced.toml" <<CONF
listen = "127.0.0.1:25883"
plain_listen = "127.0.0.1:25884"
data_dir = "$work/data"
[metrics]
listen = "127.0.0.1:25464"
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

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}
run() { # run LABEL BINARY ROUND [--plain] WATCHERS RATE
  local label=$1 bin=$2 round=$3 port=25883 transport=()
  shift 3
  if [ "$1" = "--plain" ]; then port=25884 transport=(--plain); shift; fi
  rm -rf "$work/data"
  "$bin" --config "$work/presenced.toml" 2>>"$work/$label.log" &
  pid=$!
  wait_port 25883
  echo "$label round $round ${transport[*]:-tls}: $1 watchers × $2 changes/s" >&2
  "$bench" --driver native --sources 16 --addr "127.0.0.1:$port" --pid "$pid" "${transport[@]}" \
    fanout --watchers "$1" --changes $(($2 * 5)) --rate "$2" |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["build"]=sys.argv[1]; r["round"]=int(sys.argv[2]); print(json.dumps(r))' "$label" "$round" >>"$results"
  stop
}

note="$(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$note; A=$a B=$b" >&2
for r in $(seq 1 "$rounds"); do
  for shape in $shapes; do
    run A "$a" "$r" "${shape%%:*}" "${shape##*:}"
    run B "$b" "$r" "${shape%%:*}" "${shape##*:}"
  done
  for shape in $plain_shapes; do
    run A "$a" "$r" --plain "${shape%%:*}" "${shape##*:}"
    run B "$b" "$r" --plain "${shape%%:*}" "${shape##*:}"
  done
done
note="$note, after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/ab_report.py "$results" "$note"
