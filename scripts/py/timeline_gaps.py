#!/usr/bin/env python3
"""Where a training step's GPU sits idle: the gaps between kernels in a kernel trace.

Reads a CSV of kernels and copies with their start and duration, graph nodes one by one: the
recorder cuda/tools/cupti_trace.cpp writes it (so does `nsys stats --report cuda_gpu_trace
--format csv` of a trace taken with --cuda-graph-trace=node). Steps are cut at the end of each
launch of the step's last kernel (AdamW by default, which ends every step). Per step: its length,
the time when at least one kernel or copy runs (the union over streams), and the rest, the idle
time. Then the idle gaps summed by the pair of kernels around them, longest first: what to look
at to make the step's kernels run back to back.

    python3 scripts/py/timeline_gaps.py trace.csv [--marker adamw] [--skip 1] [--top 15]
                                                   [--json out.json]
"""
import argparse
import csv
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_profile  # noqa: E402  (short_name)


def short_name(name: str) -> str:
    # kernel_profile's name, template arguments dropped too: one entry per kernel
    return re.sub(r"<.*>$", "<>", kernel_profile.short_name(name))[:60]


def column(header, *words):
    for h in header:
        if all(w.lower() in h.lower() for w in words):
            return h
    sys.exit(f"timeline_gaps.py: no column with {words} in {header}")


def read_events(path):
    with open(path, newline="") as f:
        lines = [l for l in f if "," in l]
    rows = list(csv.DictReader(lines))
    if not rows:
        sys.exit(f"timeline_gaps.py: {path}: no rows")
    header = list(rows[0].keys())
    start, dur, name = column(header, "start"), column(header, "duration"), column(header, "name")
    events = []
    for r in rows:
        try:
            s, d = float(r[start]), float(r[dur])
        except ValueError:
            continue
        events.append((s, s + d, short_name(r[name])))
    events.sort()
    return events


def split_api(events):
    """The GPU's events and the host's runtime calls ("[api] ..." rows, BLM_TRACE_API=1)."""
    gpu = [e for e in events if not e[2].startswith("[api] ")]
    api = [e for e in events if e[2].startswith("[api] ")]
    return gpu, api


def step_cuts(events, marker, skip):
    """The ends of the steps: the end of each run of `marker` kernels (several within 0.2 ms end
    one step), the first `skip` dropped."""
    ends = [e for (_, e, n) in events if marker.lower() in n.lower()]
    cuts = [e for i, e in enumerate(ends) if not any(0 <= x - e < 200e3 for x in ends[i + 1:])]
    return cuts[skip:]


def summarize(events, cuts):
    """Per step between consecutive cuts: its length and the time some event runs (the union
    over streams), in ns; the idle gaps summed by (event before, event after) over all steps,
    {(before, after): [ns, count]}; and the idle intervals themselves."""
    steps, gaps, idle = [], defaultdict(lambda: [0.0, 0]), []
    for lo, hi in zip(cuts, cuts[1:]):
        busy, cur_end, prev = 0.0, lo, "(step start)"
        for s, e, n in (ev for ev in events if ev[1] > lo and ev[0] < hi):
            s, e = max(s, lo), min(e, hi)
            if s > cur_end:
                gaps[(prev, n)][0] += s - cur_end
                gaps[(prev, n)][1] += 1
                idle.append((cur_end, s))
            busy += max(0.0, e - max(s, cur_end))
            if e > cur_end:
                cur_end, prev = e, n
        if hi > cur_end:
            idle.append((cur_end, hi))
        steps.append((hi - lo, busy))
    return steps, dict(gaps), idle


def host_during(idle, api):
    """ns of each runtime call inside the idle intervals, longest first, and the idle ns in no
    call at all (the host computing, or waiting outside CUDA)."""
    by_call, covered = defaultdict(float), 0.0
    for lo, hi in idle:
        spans = sorted((max(s, lo), min(e, hi), n) for s, e, n in api if e > lo and s < hi)
        end = lo
        for s, e, n in spans:
            by_call[n[len("[api] "):]] += e - s
            covered += max(0.0, e - max(s, end))
            end = max(end, e)
    total = sum(hi - lo for lo, hi in idle)
    return sorted(by_call.items(), key=lambda kv: -kv[1]), total - covered


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--marker", default="adamw", help="substring of the step's last kernel")
    ap.add_argument("--skip", type=int, default=1, help="steps to skip at the start (warm-up)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json")
    a = ap.parse_args()
    events, api = split_api(read_events(a.csv))
    cuts = step_cuts(events, a.marker, a.skip)
    if len(cuts) < 2:
        sys.exit("timeline_gaps.py: fewer than two step ends found; check --marker / --skip")
    steps, gaps, idle = summarize(events, cuts)
    n = len(steps)
    step_ms = sum(s for s, _ in steps) / n / 1e6
    busy_ms = sum(b for _, b in steps) / n / 1e6
    print(f"{n} steps: step {step_ms:.3f} ms, GPU busy {busy_ms:.3f} ms, "
          f"idle {step_ms - busy_ms:.3f} ms ({100 * (1 - busy_ms / step_ms):.1f}%) per step")
    print(f"{'idle ms/step':>12} {'gaps/step':>9}  after -> before")
    top = sorted(gaps.items(), key=lambda kv: -kv[1][0])[: a.top]
    for (p, q), (t, c) in top:
        print(f"{t / n / 1e6:12.4f} {c / n:9.1f}  {p} -> {q}")
    if api:
        calls, outside = host_during(idle, api)
        print(f"host during the idle time: {outside / n / 1e6:.4f} ms/step in no CUDA call; "
              "runtime calls (ms/step):")
        for name, t in calls[:8]:
            print(f"{t / n / 1e6:12.4f}  {name}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"steps": n, "step_ms": step_ms, "busy_ms": busy_ms,
                       "gaps": [{"after": p, "before": q, "idle_ms_per_step": t / n / 1e6,
                                 "count_per_step": c / n} for (p, q), (t, c) in top]}, f, indent=1)


if __name__ == "__main__":
    main()
