#!/usr/bin/env python3
"""Markdown tables for bench/single_ab.sh.

  ab_report.py RESULTS.jsonl [NOTE]

Lines carry "build" (A or B) and "round". Prints every run, then per shape the medians of A
and B, the B/A ratios of the medians, and the range of the per-round B/A ratios (each B run
against the A run just before it), which shows how noisy the machine was.
"""
import json
import statistics
import sys


def main():
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    if len(sys.argv) > 2:
        print(f"Machine: {sys.argv[2]}\n")
    key = lambda r: (r["transport"], r["watchers"], r["rate_per_sec"])
    shapes = []
    for r in runs:
        if key(r) not in shapes:
            shapes.append(key(r))

    print("### Every run (in the order run)\n")
    print("| round | build | transport | watchers | changes/s | deliveries/s | p50 ms | p99 ms | p999 ms | delivered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['round']} | {r['build']} | {r['transport']} | {r['watchers']} | {r['rate_per_sec']} "
            f"| {r['deliveries_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['p999_ms']:.2f} | {100 * r['delivery_ratio']:.1f}% |"
        )
    print()
    print("### Medians and B/A\n")
    print("| transport | watchers | changes/s | A deliveries/s | B deliveries/s | B/A deliveries | A p50 / p99 ms | B p50 / p99 ms | B/A p50 | B/A p99 | per-round B/A p99 (min–max) | delivered (worst) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in shapes:
        a = [r for r in runs if key(r) == s and r["build"] == "A"]
        b = [r for r in runs if key(r) == s and r["build"] == "B"]
        if not a or not b:
            continue
        m = lambda rs, f: statistics.median(r[f] for r in rs)
        pairs = {}
        for r in a + b:
            pairs.setdefault(r["round"], {})[r["build"]] = r
        per_round = [p["B"]["p99_ms"] / p["A"]["p99_ms"] for p in pairs.values() if "A" in p and "B" in p]
        worst = min(r["delivery_ratio"] for r in a + b)
        print(
            f"| {s[0]} | {s[1]} | {s[2]} | {m(a, 'deliveries_per_sec'):.0f} | {m(b, 'deliveries_per_sec'):.0f} "
            f"| {m(b, 'deliveries_per_sec') / m(a, 'deliveries_per_sec'):.3f} "
            f"| {m(a, 'p50_ms'):.2f} / {m(a, 'p99_ms'):.2f} | {m(b, 'p50_ms'):.2f} / {m(b, 'p99_ms'):.2f} "
            f"| {m(b, 'p50_ms') / m(a, 'p50_ms'):.2f} | {m(b, 'p99_ms') / m(a, 'p99_ms'):.2f} "
            f"| {min(per_round):.2f}–{max(per_round):.2f} | {100 * worst:.1f}% |"
        )
    print()


if __name__ == "__main__":
    main()
