#!/usr/bin/env python3
"""Checks the profile summarisers (ncu_detail.py, sass_histogram.py, ncu_stalls_by_instruction.py,
kernel_profile.py's names, timeline_gaps.py) on recorded or made-up output.

tests/data/ncu_detail_sample.txt is an excerpt of `ncu --set full --print-details all` from an
H200 (2026-11-29: the wgmma S kernel at GPT-2 small, the Gauss-Jordan kernel at the paper's
size); tests/data/sass_sample.txt the start of two functions of `cuobjdump -sass`;
tests/data/ncu_source_sample.csv 37 rows (first 8 columns) of `ncu --page source --csv
--print-source sass` for an experimental S kernel (2026-11-29, the mbarrier wait that dominated
it among them); tests/data/cupti_trace_sample.csv three made-up steps in the CUPTI recorder's
format (cuda/tools/cupti_trace.cpp), with overlapping kernels, a second stream and two runtime
calls. Run by ctest (test_profile_parsers) when Python 3 is found; exits non-zero on
the first mismatch.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kernel_profile  # noqa: E402
import ncu_detail  # noqa: E402
import ncu_stalls_by_instruction as stalls  # noqa: E402
import sass_histogram  # noqa: E402
import timeline_gaps  # noqa: E402
from script_checks import expect  # noqa: E402


def main() -> int:
    kernels = list(ncu_detail.parse(os.path.join(ROOT, "tests/data/ncu_detail_sample.txt")))
    expect("kernels found", [k["kernel"] for k in kernels], ["s_kernel", "void forward_kernel<64>"])
    s = kernels[0]
    expect("grid x block", (s["grid"], s["block"]), ([16, 192, 1], [128, 1, 1]))
    expect("duration (us)", round(s["duration"] * 1e6, 3), 561.376)
    expect("registers", s["registers"], 244.0)
    expect("warps per scheduler", s["warps_per_scheduler"], 1.96)
    expect("issue slots busy", s["issue_busy_pct"], 35.94)
    expect("tensor pipe", s["tensor_pct"], 20.67)
    # 190,267,620 warp instructions over 16 x 192 blocks of 4 warps
    expect("instructions per warp", round(ncu_detail.per_warp_instructions(s)), 15484)
    expect("stalls (not-issued lines left out)", sorted(s["stalls"]),
           ["barrier", "mio_throttle", "selected", "short_scoreboard", "wait"])
    expect("top stall", ncu_detail.top_stalls(s, 1), "wait 31%")
    gj = kernels[1]
    expect("second kernel's registers", gj["registers"], 168.0)
    expect("second kernel's top stalls", ncu_detail.top_stalls(gj, 2),
           "wait 28%, not_selected 26%")  # of the 4 stalls in the excerpt

    found = sass_histogram.histograms(os.path.join(ROOT, "tests/data/sass_sample.txt"),
                                      "stats_combine_kernelILi64")
    expect("functions matched", len(found), 1)
    counts = next(iter(found.values()))
    expect("instructions", sum(counts.values()), 15)
    expect("opcodes (predicated EXIT counted, suffixes dropped)",
           {op: counts[op] for op in ("LDC", "S2R", "HFMA2", "ISETP", "EXIT", "MOV")},
           {"LDC": 2, "S2R": 2, "HFMA2": 1, "ISETP": 2, "EXIT": 1, "MOV": 1})
    both = sass_histogram.histograms(os.path.join(ROOT, "tests/data/sass_sample.txt"),
                                     "stats_combine")
    expect("both functions, second one's predicated branches",
           [c["BRA"] for c in both.values()], [0, 2])

    rows = stalls.parse(os.path.join(ROOT, "tests/data/ncu_source_sample.csv"))
    expect("source rows", len(rows), 37)
    expect("first row", rows[0], ("0x7f55037c8e90", "BSYNC B1", 34.0, 196608))
    expect("all samples", sum(r[2] for r in rows), 56084.0)
    top = max(rows, key=lambda r: r[2])
    expect("most sampled: the spin on an mbarrier", (top[0], top[1], top[3]),
           ("0x7f55037cdae0", "@!P0  BRA 0x7f55037d0f20", 453120))
    expect("opcode of a predicated branch",
           sass_histogram.opcode("@!P0  BRA 0x7f55037d0f20"), "BRA")
    expect("opcode without its modifiers",
           sass_histogram.opcode("LDS.128 R76, [R23+0x35870]"), "LDS")
    shares = stalls.by_opcode(rows)
    expect("opcodes by share", list(shares)[:3], ["BRA", "FFMA", "STS"])
    expect("BRA share", round(shares["BRA"], 3), 0.626)
    try:
        stalls.parse(os.path.join(ROOT, "tests/data/sass_sample.txt"))
        expect("a file without the source page's header is refused", "accepted", "refused")
    except ValueError:
        expect("a file without the source page's header is refused", "refused", "refused")

    expect("kernel name: namespaces, parameters dropped",
           kernel_profile.short_name("void blm::cuda::(anonymous namespace)::det_kernel<64, 4>"
                                     "(float const*, int)"), "det_kernel<64, 4>")
    expect("kernel name: ncu's unnamed namespace",
           kernel_profile.short_name("void blm::cuda::<unnamed>::forward_kernel<64>(float *)"),
           "forward_kernel<64>")
    events = timeline_gaps.read_events(os.path.join(ROOT, "tests/data/cupti_trace_sample.csv"))
    cuts = timeline_gaps.step_cuts(events, "adamw", 1)
    expect("step ends (the first dropped)", cuts, [1e6, 2e6, 3e6])
    events, api = timeline_gaps.split_api(events)
    expect("runtime calls apart", [e[2] for e in api],
           ["[api] cudaStreamSynchronize", "[api] cudaMemcpyAsync"])
    steps, gaps, idle = timeline_gaps.summarize(events, cuts)
    # step 1: copy 10, k1 380 (the side stream inside it), k2 overlapping k1 by 10, AdamW 50
    expect("steps: length, busy (ns)", steps, [(1e6, 840e3), (1e6, 750e3)])
    expect("gaps by neighbours", {k: (round(v[0]), v[1]) for k, v in gaps.items()},
           {("(step start)", "[memcpy]"): (300000, 2), ("[memcpy]", "k1<>"): (10000, 1),
            ("k2<>", "adamw_kernel<>"): (50000, 1), ("k1<>", "k2<>"): (50000, 1)})
    # step 2's first gap (2000-2200 us): a sync until 2020, nothing, a copy call 2150-2210
    calls, outside = timeline_gaps.host_during(idle, api)
    expect("host calls in the idle time", [(c, round(t)) for c, t in calls],
           [("cudaMemcpyAsync", 50000), ("cudaStreamSynchronize", 20000)])
    expect("idle ns in no call", round(outside), 410000 - 70000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
