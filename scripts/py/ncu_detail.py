#!/usr/bin/env python3
"""One line per kernel from Nsight Compute's detail pages: what bounds a latency-bound kernel.

Reads the text that `ncu --set full --print-details all` prints (one or more files, one or more
kernels each) and prints a markdown table: duration, registers, warps per scheduler, issue slots
busy, tensor pipe activity, warp-level instructions executed per warp, and the most sampled
stall reasons. Used by scripts/kernel-detail.sh; also works on any such ncu output.

    python3 scripts/py/ncu_detail.py a-s.txt b-bwd.txt [--json out.json]
"""
import argparse
import json
import re
import sys

# "  unnamed>::s_kernel(const float *, ...) (16, 192, 1)x(128, 1, 1), Context 1, ..."
KERNEL_LINE = re.compile(r"^  (\S.*?)\((?:.*)\) "
                         r"\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
METRICS = {
    "Duration": "duration",
    "SM Frequency": "sm_hz",
    "Registers Per Thread": "registers",
    "Executed Instructions": "instructions",
    "Active Warps Per Scheduler": "warps_per_scheduler",
    "Issue Slots Busy": "issue_busy_pct",
    "SM: Pipe Tensor Cycles Active": "tensor_pct",
}
# "    Duration                 us      501.82": label, unit, value (compiled once, not per line)
METRIC_LINES = [(re.compile(r"^\s+" + re.escape(label) + r"\s+(\S+)\s+([\d,.]+)\s*$"), key)
                for label, key in METRICS.items()]
STALL = re.compile(r"^\s+(?:Warp Stall Sampling \(All Samples\) )?\(?"
                   r"smsp__pcsamp_warps_issue_stalled_([a-z_]+?)\)?\s+\S+\s+([\d,]+)\s*$")
UNIT_SCALE = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def short_name(name: str) -> str:
    name = re.sub(r"^.*::", "", name.replace("unnamed>::", ""))
    return name if len(name) <= 60 else name[:57] + "..."


def parse(path: str):
    """Yields one dict per kernel in the file, with the first value of each metric."""
    kernel = None
    with open(path, errors="replace") as f:
        for line in f:
            m = KERNEL_LINE.match(line)
            if m:
                if kernel:
                    yield kernel
                grid = [int(g) for g in m.group(2, 3, 4)]
                block = [int(b) for b in m.group(5, 6, 7)]
                kernel = {"file": path, "kernel": short_name(m.group(1)), "grid": grid,
                          "block": block, "stalls": {}}
                continue
            if kernel is None:
                continue
            s = STALL.match(line)
            if s and not s.group(1).endswith("_not_issued"):
                kernel["stalls"].setdefault(s.group(1), number(s.group(2)))
                continue
            for pattern, key in METRIC_LINES:
                mm = pattern.match(line)
                if mm and key not in kernel:
                    value = number(mm.group(2))
                    if key == "duration":
                        value *= UNIT_SCALE.get(mm.group(1), 1e-9)
                    kernel[key] = value
    if kernel:
        yield kernel


def per_warp_instructions(k) -> float:
    blocks = k["grid"][0] * k["grid"][1] * k["grid"][2]
    warps = blocks * ((k["block"][0] * k["block"][1] * k["block"][2] + 31) // 32)
    return k.get("instructions", 0.0) / warps if warps else 0.0


def top_stalls(k, n=4) -> str:
    stalls = {name: v for name, v in k["stalls"].items() if name != "selected"}
    total = sum(k["stalls"].values()) or 1.0
    best = sorted(stalls.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {100 * v / total:.0f}%" for name, v in best)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json", help="also write the parsed values here")
    args = ap.parse_args()
    kernels = [k for path in args.files for k in parse(path)]
    if not kernels:
        print("ncu_detail.py: no kernel found (is this `ncu --print-details all` output?)",
              file=sys.stderr)
        return 1
    print("| file | kernel | ms | regs | warps/scheduler | issue busy | tensor pipe | "
          "instructions per warp | top stalls (share of samples) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in kernels:
        name = k["file"].rsplit("/", 1)[-1]
        print(f"| {name} | {k['kernel']} | {1e3 * k.get('duration', 0):.3f} "
              f"| {k.get('registers', 0):.0f} | {k.get('warps_per_scheduler', 0):.2f} "
              f"| {k.get('issue_busy_pct', 0):.0f}% | {k.get('tensor_pct', 0):.0f}% "
              f"| {per_warp_instructions(k):,.0f} | {top_stalls(k)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(kernels, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
