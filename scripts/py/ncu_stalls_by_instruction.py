#!/usr/bin/env python3
"""Where one kernel's warps stall, instruction by instruction, from Nsight Compute's source page.

ncu_detail.py says which stall reasons dominate a kernel; this says at which SASS instructions
the samples fall: a spin on an mbarrier (SYNCS.PHASECHK ... TRYWAIT and its BRA), a
cp.async wait (DEPBAR), a block barrier, a long FMA chain.  Input: the CSV that

    ncu --set full --import-source yes -k regex:KERNEL --launch-count 1 -o report ./program
    ncu -i report.ncu-rep --page source --csv --print-source sass > source.csv

writes (one kernel).  Prints the share of stall samples by opcode, then the instructions with the
most samples (address, share, times executed, SASS), and with --around ADDRESS the instructions
next to one address (its last hex digits are enough).

    python3 scripts/py/ncu_stalls_by_instruction.py source.csv [--top 30] [--around cdae0]
"""
import argparse
import csv
import sys

from sass_histogram import opcode  # the same reading of an instruction as the SASS histograms

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def parse(path):
    """[(address, sass, samples, executed)] in address order, from the source page's CSV."""
    with open(path, errors="replace", newline="") as f:
        rows = list(csv.reader(f))
    try:
        header_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    except StopIteration:
        raise ValueError(f"{path}: no 'Address','Source' header (is this `--page source --csv`?)")
    header = rows[header_at]
    if SAMPLES not in header:
        raise ValueError(f"{path}: no '{SAMPLES}' column (profile with --set full)")
    address, source = header.index("Address"), header.index("Source")
    samples = header.index(SAMPLES)
    executed = header.index(EXECUTED) if EXECUTED in header else None
    out = []
    for r in rows[header_at + 1:]:
        if len(r) <= samples or not r[samples].replace(",", "").replace(".", "").isdigit():
            continue
        n = int(r[executed].replace(",", "")) if executed is not None and r[executed] else 0
        out.append((r[address], r[source].strip(), float(r[samples].replace(",", "")), n))
    return out


def by_opcode(instructions):
    """{opcode: share of all samples}, largest first."""
    total = sum(s for _, _, s, _ in instructions) or 1.0
    shares = {}
    for _, sass, s, _ in instructions:
        op = opcode(sass)
        shares[op] = shares.get(op, 0.0) + s / total
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--around", help="list the instructions next to this address (hex suffix)")
    args = ap.parse_args(argv)
    try:
        instructions = parse(args.csv)
    except (OSError, ValueError) as e:
        print(f"ncu_stalls_by_instruction.py: {e}", file=sys.stderr)
        return 1
    total = sum(s for _, _, s, _ in instructions) or 1.0
    lines = [f"{len(instructions)} instructions, {total:.0f} stall samples", "by opcode:"]
    lines += [f"  {100 * v:5.1f}%  {op}" for op, v in list(by_opcode(instructions).items())[:15]]
    lines.append("most sampled instructions (share, address, times executed, SASS):")
    for a, sass, s, n in sorted(instructions, key=lambda x: -x[2])[:args.top]:
        lines.append(f"  {100 * s / total:5.1f}%  {a}  {n:>10}  {sass[:90]}")
    if args.around:
        at = [i for i, (a, _, _, _) in enumerate(instructions) if a.endswith(args.around)]
        if not at:
            lines.append(f"no address ending in {args.around}")
        for i in at[:1]:
            lines.append(f"around {instructions[i][0]}:")
            for a, sass, s, n in instructions[max(0, i - 8):i + 6]:
                lines.append(f"  {100 * s / total:5.1f}%  {a}  {n:>10}  {sass[:90]}")
    try:
        print("\n".join(lines))
    except BrokenPipeError:  # e.g. piped into head
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
