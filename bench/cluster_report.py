#!/usr/bin/env python3
"""Markdown tables for bench/cluster.sh.

  cluster_report.py RESULTS.jsonl [NOTE]
  cluster_report.py scrape PORT...
      prints, as one JSON object, the counters below summed over the brokers' /metrics on
      127.0.0.1:PORT (one key per metric and label set).
  cluster_report.py annotate BEFORE.json AFTER.json KEY=VALUE... < RUN.json
      prints RUN.json as one line with the KEY=VALUE fields and "broker_counters": the
      counters that moved between the two scrapes.

Fanout lines carry "topology" (same, cross, single) and "round"; node-death lines carry
"grace_ms" and "round". Prints every run (so the noise between rounds shows), the median of
each topology per shape, the ratios against same-node and single-node medians, and the
node-death times.
"""
import json
import statistics
import sys
import urllib.request

# What explains a delivery below 100 %: events folded into a later state (full queues), NATS
# slow-consumer gaps repaired by state transfer, deltas dropped, peers declared dead.
COUNTERS = (
    "presence_coalesced_events_total",
    "presence_slow_consumer_disconnects_total",
    "presence_cluster_gaps_total",
    "presence_cluster_state_transfers_total",
    'presence_cluster_deltas_total{dir="dropped"}',
    "presence_cluster_fences_total",
)


def scrape(ports):
    out = {}
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("#") or not any(line.startswith(c) for c in COUNTERS):
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    print(json.dumps(out))


def annotate(before, after, fields):
    b, a = json.load(open(before)), json.load(open(after))
    run = json.loads(sys.stdin.read())
    for kv in fields:
        k, v = kv.split("=", 1)
        run[k] = int(v) if v.isdigit() else v
    run["broker_counters"] = {k: a[k] - b.get(k, 0.0) for k in a if a[k] != b.get(k, 0.0)}
    print(json.dumps(run))

TOPOLOGIES = ["same", "cross", "single"]
NAMES = {
    "same": "cluster, same node",
    "cross": "cluster, cross node",
    "single": "single node (no cluster)",
}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def counters(r):
    c = r.get("broker_counters") or {}
    return "; ".join(
        f"{k.replace('presence_', '').replace('_total', '')} {v:.0f}" for k, v in sorted(c.items())
    )


def main():
    if sys.argv[1] == "scrape":
        return scrape(sys.argv[2:])
    if sys.argv[1] == "annotate":
        return annotate(sys.argv[2], sys.argv[3], sys.argv[4:])
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    if len(sys.argv) > 2:
        print(f"Machine: {sys.argv[2]}\n")
    fan = [r for r in runs if r.get("workload") == "fanout"]
    death = [r for r in runs if r.get("workload") == "node-death"]
    shapes = sorted({(r["watchers"], r["rate_per_sec"]) for r in fan})

    if fan:
        print("### Fanout, every run (in the order run)\n")
        print("| round | watchers | changes/s | topology | deliveries/s | p50 ms | p99 ms | p999 ms | delivered | final state | per watch node p50 / p99 ms | broker counters that moved |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in fan:
            nodes = "; ".join(
                f"{n['addr'].rsplit(':', 1)[1]}: {fmt(n['p50_ms'])} / {fmt(n['p99_ms'])}"
                for n in r.get("by_watch_addr", [])
            )
            print(
                f"| {r['round']} | {r['watchers']} | {r['rate_per_sec']} | {r['topology']} "
                f"| {r['deliveries_per_sec']:.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} "
                f"| {fmt(r['p999_ms'])} | {100 * r['delivery_ratio']:.1f}% "
                f"| {100 * r['final_state_ratio']:.1f}% | {nodes} | {counters(r)} |"
            )
        print()
        print("### Fanout, median of the rounds\n")
        print("| watchers | changes/s | topology | runs | deliveries/s | p50 ms | p99 ms | delivered (worst run) |")
        print("|---|---|---|---|---|---|---|---|")
        medians = {}
        for w, rate in shapes:
            for t in TOPOLOGIES:
                rs = [r for r in fan if (r["watchers"], r["rate_per_sec"], r["topology"]) == (w, rate, t)]
                if not rs:
                    continue
                m = {
                    "dps": med([r["deliveries_per_sec"] for r in rs]),
                    "p50": med([r["p50_ms"] for r in rs]),
                    "p99": med([r["p99_ms"] for r in rs]),
                    "worst": min(r["delivery_ratio"] for r in rs),
                }
                medians[(w, rate, t)] = m
                print(
                    f"| {w} | {rate} | {NAMES[t]} | {len(rs)} | {m['dps']:.0f} | {fmt(m['p50'])} "
                    f"| {fmt(m['p99'])} | {100 * m['worst']:.1f}% |"
                )
        print()
        print("### Ratios (medians; same run)\n")
        print("| watchers | changes/s | cross − same p50 / p99 ms | cross / same p50 / p99 | cross / same deliveries/s | same / single p50 / p99 | same / single deliveries/s | cross / single deliveries/s |")
        print("|---|---|---|---|---|---|---|---|")
        for w, rate in shapes:
            s, c, o = (medians.get((w, rate, t)) for t in TOPOLOGIES)
            if not (s and c and o):
                continue
            print(
                f"| {w} | {rate} | {c['p50'] - s['p50']:+.2f} / {c['p99'] - s['p99']:+.2f} "
                f"| {c['p50'] / s['p50']:.2f} / {c['p99'] / s['p99']:.2f} "
                f"| {c['dps'] / s['dps']:.3f} "
                f"| {s['p50'] / o['p50']:.2f} / {s['p99'] / o['p99']:.2f} "
                f"| {s['dps'] / o['dps']:.3f} | {c['dps'] / o['dps']:.3f} |"
            )
        print()

    if death:
        print("### Node death: kill -9 of the devices' node until every watcher saw every OFFLINE\n")
        print("| grace ms | run | devices | watchers (nodes 2+3) | OFFLINE events | first OFFLINE s | p50 s | p99 s | every watcher done s | broker counters that moved (nodes 2+3) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in death:
            print(
                f"| {r['grace_ms']} | {r['round']} | {r['devices']} | {r['watchers']} "
                f"| {r['offline_events']} / {r['offline_events_expected']} "
                f"| {fmt(r['first_offline_secs'])} | {fmt(r['offline_p50_secs'])} "
                f"| {fmt(r['offline_p99_secs'])} | {fmt(r['all_watchers_offline_secs'])} | {counters(r)} |"
            )
        print()


if __name__ == "__main__":
    main()
