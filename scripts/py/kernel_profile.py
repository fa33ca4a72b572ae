#!/usr/bin/env python3
"""Summarise an Nsight Compute CSV (ncu --csv --metrics gpu__time_duration.sum) by kernel.

Groups kernels by a short name (template arguments and parameter lists dropped) and prints, per
group, the launch count, total and mean duration and the share of the total, longest first.
Used by scripts/kernel-profile.sh; also works on any ncu CSV with that metric.

    python3 scripts/py/kernel_profile.py profile.csv [--steps N] [--top 25] [--json out.json]
"""
import argparse
import csv
import json
import re
import sys


def drop_parameters(name: str) -> str:
    """The name without its trailing parameter list (balanced: "(anonymous namespace)" stays)."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def short_name(name: str) -> str:
    # "void blm::cuda::(anonymous namespace)::det_kernel<64>(const float*, ...)" -> "det_kernel<64>"
    name = drop_parameters(name.strip())
    name = re.sub(r"^void ", "", name)
    name = name.replace("(anonymous namespace)::", "").replace("<unnamed>::", "")
    name = re.sub(r"^[A-Za-z_0-9]+::", "", name)  # outer namespaces
    name = re.sub(r"^[A-Za-z_0-9]+::", "", name)
    if len(name) > 90:
        name = name[:87] + "..."
    return name


def read_rows(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prints its own log lines first
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}.get(unit, 1e-9)
        yield short_name(row["Kernel Name"]), value * scale


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=1, help="divide totals by this (per step)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", help="write the grouped table here")
    args = ap.parse_args()
    groups = {}
    for name, sec in read_rows(args.csv):
        g = groups.setdefault(name, [0, 0.0])
        g[0] += 1
        g[1] += sec
    if not groups:
        sys.exit(f"kernel_profile.py: no gpu__time_duration.sum rows in {args.csv}")
    total = sum(g[1] for g in groups.values())
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    print(f"{'kernel':<70} {'launches':>8} {'ms/step':>9} {'us/launch':>10} {'share':>6}")
    for name, (n, sec) in rows[: args.top]:
        print(f"{name:<70} {n / args.steps:>8.0f} {1e3 * sec / args.steps:>9.3f} "
              f"{1e6 * sec / n:>10.1f} {100 * sec / total:>5.1f}%")
    print(f"{'total GPU time (kernels only)':<70} {sum(g[0] for g in groups.values()) / args.steps:>8.0f} "
          f"{1e3 * total / args.steps:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"kernel": k, "launches": n / args.steps, "ms_per_step": 1e3 * s / args.steps}
                       for k, (n, s) in rows], f, indent=1)


if __name__ == "__main__":
    main()
