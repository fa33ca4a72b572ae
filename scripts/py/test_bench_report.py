#!/usr/bin/env python3
"""Checks bench_report.py's bf16 tracking line on a made-up bench directory: the tracking bound
is on the Brown corpus, so runs on other text (bench.sh's fallback) must come out n/a with their
value named, never PASS.  Run by ctest (test_bench_report) when Python 3 is found; exits non-zero
on the first mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from script_checks import expect  # noqa: E402


def write_run(track, name, val_ce):
    os.makedirs(os.path.join(track, name))
    with open(os.path.join(track, name, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"kind": "train", "step": 500, "loss": 2.0}) + "\n")
        f.write(json.dumps({"kind": "eval", "step": 500, "val_ce": val_ce}) + "\n")


def tracking_check(data_line):
    with tempfile.TemporaryDirectory() as d:
        track = os.path.join(d, "track")
        write_run(track, "bf16-s1", 1.99)
        write_run(track, "fp32-s1", 2.00)
        if data_line is not None:
            with open(os.path.join(track, "data.txt"), "w") as f:
                f.write(data_line + "\n")
        out = os.path.join(d, "summary.json")
        subprocess.run([sys.executable, os.path.join(HERE, "bench_report.py"), d, "--out", out],
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            summary = json.load(f)
    return [c for c in summary["acceptance"] if "bf16 vs fp32" in c["criterion"]][0]


def main() -> int:
    brown = tracking_check("tracking data: data/corpus/brown/train.txt")
    expect("Brown: result", brown["result"], "PASS")
    expect("Brown: |relative diff|", round(brown["value"], 6), 0.005)
    other = tracking_check("tracking data: build-gpu/bench/track/train.txt")
    expect("other text: result", other["result"], "n/a")
    expect("other text: value and data named", "0.005 on build-gpu/bench/track/train.txt"
           in other["detail"], True)
    unrecorded = tracking_check(None)  # older bench directories: no data.txt
    expect("no data.txt: result", unrecorded["result"], "PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
