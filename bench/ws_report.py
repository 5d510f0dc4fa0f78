#!/usr/bin/env python3
"""Markdown tables for bench/ws.sh.

  ws_report.py RESULTS.jsonl [NOTE]

Prints every fanout run, then per shape (watchers × offered changes/s) the wss/tls and ws/plain
ratios of deliveries/s, p50 and p99 (medians over rounds when there are several), then broker
memory per idle connection per transport and the WebSocket/TCP ratio at each size.
"""
import json
import statistics
import sys

PAIRS = (("wss", "tls"), ("ws", "plain"))


def pct(x):
    return f"{100 * x:.1f}%"


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    if len(sys.argv) > 2:
        print(f"Machine: {sys.argv[2]}\n")
    fanout = [r for r in rows if r["workload"] == "fanout"]
    idle = [r for r in rows if r["workload"] == "idle"]

    print("### Fanout, every run (in the order run)\n")
    print("| round | transport | watchers | offered changes/s | deliveries/s | p50 ms | p99 ms | p999 ms | delivered | final state | broker histogram p50 / p99 (bucket bound, ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in fanout:
        hist = ""
        if r.get("broker_p50_ms_bucket") is not None:
            hist = f"≤ {r['broker_p50_ms_bucket']:g} / ≤ {r['broker_p99_ms_bucket']:g}"
        print(
            f"| {r.get('round', 1)} | {r['transport']} | {r['watchers']} | {r['rate_per_sec']} "
            f"| {r['deliveries_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} "
            f"| {pct(r['delivery_ratio'])} | {pct(r['final_state_ratio'])} | {hist} |"
        )

    shapes = []
    for r in fanout:
        if (r["watchers"], r["rate_per_sec"]) not in shapes:
            shapes.append((r["watchers"], r["rate_per_sec"]))
    rounds = len({r.get("round", 1) for r in fanout})
    print(f"\n### WebSocket / TCP, same offered rate ({'median of ' + str(rounds) + ' rounds' if rounds > 1 else 'one round'})\n")
    print("| watchers × changes/s | pair | deliveries/s (WS / TCP) | ratio | p50 ms (WS / TCP) | ratio | p99 ms (WS / TCP) | ratio | per-round ratio, deliveries / p99 (min–max) | delivered (WS / TCP) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for watchers, rate in shapes:
        for ws, tcp in PAIRS:
            a = [r for r in fanout if r["transport"] == ws and (r["watchers"], r["rate_per_sec"]) == (watchers, rate)]
            b = [r for r in fanout if r["transport"] == tcp and (r["watchers"], r["rate_per_sec"]) == (watchers, rate)]
            if not a or not b:
                continue
            m = lambda rs, f: statistics.median(r[f] for r in rs)
            ratio = lambda f: m(a, f) / m(b, f) if m(b, f) else float("nan")
            # Each WebSocket run against the TCP run of the same round (run just before it).
            by_round = {r.get("round", 1): r for r in b}
            pairs = [(r, by_round[r.get("round", 1)]) for r in a if r.get("round", 1) in by_round]
            spread = lambda f: [x[f] / y[f] for x, y in pairs if y[f]]
            span = lambda v: f"{min(v):.2f}–{max(v):.2f}" if v else "n/a"
            print(
                f"| {watchers} × {rate} | {ws}/{tcp} "
                f"| {m(a, 'deliveries_per_sec'):.0f} / {m(b, 'deliveries_per_sec'):.0f} | {ratio('deliveries_per_sec'):.3f} "
                f"| {m(a, 'p50_ms'):.2f} / {m(b, 'p50_ms'):.2f} | {ratio('p50_ms'):.2f} "
                f"| {m(a, 'p99_ms'):.2f} / {m(b, 'p99_ms'):.2f} | {ratio('p99_ms'):.2f} "
                f"| {span(spread('deliveries_per_sec'))} / {span(spread('p99_ms'))} "
                f"| {pct(min(r['delivery_ratio'] for r in a))} / {pct(min(r['delivery_ratio'] for r in b))} |"
            )

    if idle:
        print("\n### Idle connections (fresh broker each)\n")
        print("| transport | connections | broker RSS before → after | per connection |")
        print("|---|---|---|---|")
        for r in idle:
            print(
                f"| {r['transport']} | {r['connections']} | {r['broker_rss_kib_before'] / 1024:.1f} → "
                f"{r['broker_rss_kib_after'] / 1024:.1f} MiB | {r['broker_rss_kib_per_connection']:.2f} KiB |"
            )
        print()
        print("| connections | pair | per connection (WS / TCP) | WS − TCP | ratio |")
        print("|---|---|---|---|---|")
        for n in sorted({r["connections"] for r in idle}):
            for ws, tcp in PAIRS:
                a = [r["broker_rss_kib_per_connection"] for r in idle if r["transport"] == ws and r["connections"] == n]
                b = [r["broker_rss_kib_per_connection"] for r in idle if r["transport"] == tcp and r["connections"] == n]
                if not a or not b:
                    continue
                a, b = statistics.median(a), statistics.median(b)
                print(f"| {n} | {ws}/{tcp} | {a:.2f} / {b:.2f} KiB | {a - b:+.2f} KiB | {a / b:.2f} |")


if __name__ == "__main__":
    main()
