#!/usr/bin/env python3
"""Helpers for bench/run.sh.

  report.py histogram RUN.json BEFORE.prom AFTER.prom
      prints RUN.json as one line, with the broker's own fanout-latency histogram over the run
      (the delta of presence_fanout_latency_seconds between the two scrapes) as p50/p99 bucket
      bounds in ms.
  report.py tables RESULTS.jsonl
      prints the markdown tables of BENCHMARKS.md, and the presenced/Mosquitto ratio of the
      highest sustained fanout-1,000 deliveries/s with p99 <= 50 ms and 100% delivered; for
      the reconnect storm, the handshakes on reconnect (resumed / full) and the broker's CPU per
      reconnect, with the ratio of TLS resumption on to off where both ran.
"""
import json
import sys


def buckets(path):
    out = {}
    for line in open(path):
        if line.startswith('presence_fanout_latency_seconds_bucket{le="'):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def histogram(run, before, after):
    report = json.load(open(run))
    b, a = buckets(before), buckets(after)
    delta = sorted(
        ((float("inf") if le == "+Inf" else float(le)), a[le] - b.get(le, 0)) for le in a
    )
    total = delta[-1][1] if delta else 0

    def quantile(q):
        for le, count in delta:
            if total and count >= q * total:
                return le * 1000
        return None

    if report.get("workload") == "fanout":
        report["broker_p50_ms_bucket"] = quantile(0.50)
        report["broker_p99_ms_bucket"] = quantile(0.99)
    print(json.dumps(report))


def pct(x):
    return f"{100 * x:.1f}%"


def tables(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = lambda w: [r for r in rows if r["workload"] == w]

    print("### Fanout (one user watched by many)\n")
    print("| driver | transport | watchers | offered changes/s | deliveries/s | p50 ms | p99 ms | p999 ms | delivered | final state | broker histogram p50 / p99 (bucket bound, ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in by("fanout"):
        hist = ""
        if r.get("broker_p50_ms_bucket") is not None:
            hist = f"≤ {r['broker_p50_ms_bucket']:g} / ≤ {r['broker_p99_ms_bucket']:g}"
        print(f"| {r['driver']} | {r['transport']} | {r['watchers']} | {r['rate_per_sec']} | {r['deliveries_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {pct(r['delivery_ratio'])} | {pct(r['final_state_ratio'])} | {hist} |")

    print("\n### Highest sustained fanout-1,000 deliveries/s with p99 ≤ 50 ms and 100% delivered\n")
    print("| transport | presenced | Mosquitto | ratio |")
    print("|---|---|---|---|")
    for transport in ("tls", "plain"):
        best = {}
        for driver in ("native", "mqtt"):
            ok = [
                r["deliveries_per_sec"]
                for r in by("fanout")
                if r["driver"] == driver and r["transport"] == transport and r["watchers"] == 1000
                and r["p99_ms"] <= 50 and r["delivery_ratio"] == 1.0
            ]
            best[driver] = max(ok) if ok else None
        if best["native"] is None and best["mqtt"] is None:
            continue
        fmt = lambda v: f"{v:.0f}" if v is not None else "none passed"
        ratio = (
            f"{best['native'] / best['mqtt']:.1f}×"
            if best["native"] and best["mqtt"]
            else "n/a"
        )
        print(f"| {transport} | {fmt(best['native'])} | {fmt(best['mqtt'])} | {ratio} |")

    if by("mix"):
        print("\n### Realistic mix (each user watches K others; a share of users change per second)\n")
        print("| driver | transport | users | watching | changes/s | deliveries/s | p50 ms | p99 ms | p999 ms | delivered |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in by("mix"):
            print(f"| {r['driver']} | {r['transport']} | {r['users']} | {r['watch']} | {r['changes_per_sec']:.0f} | {r['deliveries_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {pct(r['delivery_ratio'])} |")

    if by("storm"):
        print("\n### Reconnect storm (every client drops and reconnects at once; until its snapshot is back)\n")
        print("| driver | transport | clients | resumption | restored | all restored after | restore p50 / p99 | retries | reconnect handshakes resumed / full | broker CPU per reconnect |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in by("storm"):
            all_back = f"{r['all_restored_secs']:.2f} s" if r["all_restored_secs"] is not None else "never"
            handshakes = ""
            if r.get("reconnect_full") is not None:
                handshakes = f"{r['reconnect_resumed']} / {r['reconnect_full']}"
            cpu = ""
            if r.get("broker_cpu_us_per_reconnect") is not None:
                cpu = f"{r['broker_cpu_us_per_reconnect']:.0f} µs"
            print(f"| {r['driver']} | {r['transport']} | {r['clients']} | {r.get('resumption', '')} | {pct(r['restored_ratio'])} | {all_back} | {r['restore_p50_ms']:.0f} / {r['restore_p99_ms']:.0f} ms | {r['reconnect_retries']} | {handshakes} | {cpu} |")
        # Resumption on vs off at the same size: the mean of each mode's runs, then the ratio.
        ratios = []
        for key in dict.fromkeys((r["driver"], r["transport"], r["clients"]) for r in by("storm")):
            cpu = {}
            for mode in ("on", "off"):
                runs = [
                    r["broker_cpu_us_per_reconnect"]
                    for r in by("storm")
                    if (r["driver"], r["transport"], r["clients"]) == key
                    and r.get("resumption") == mode
                    and r.get("broker_cpu_us_per_reconnect") is not None
                ]
                cpu[mode] = sum(runs) / len(runs) if runs else None
            if cpu["on"] and cpu["off"]:
                ratios.append(f"{key[0]} {key[1]} {key[2]}: {cpu['on'] / cpu['off']:.2f}× ({cpu['on']:.0f} / {cpu['off']:.0f} µs)")
        if ratios:
            print("\nBroker CPU per reconnect, resumption on / off: " + "; ".join(ratios) + ".")

    if by("idle"):
        print("\n### Idle connections (fresh broker each size)\n")
        print("| driver | transport | connections | broker RSS before → after | per connection |")
        print("|---|---|---|---|---|")
        for r in by("idle"):
            print(f"| {r['driver']} | {r['transport']} | {r['connections']} | {r['broker_rss_kib_before'] / 1024:.1f} → {r['broker_rss_kib_after'] / 1024:.1f} MiB | {r['broker_rss_kib_per_connection']:.1f} KiB |")


if __name__ == "__main__":
    if sys.argv[1] == "histogram":
        histogram(*sys.argv[2:5])
    elif sys.argv[1] == "tables":
        tables(sys.argv[2])
    else:
        sys.exit(__doc__)
