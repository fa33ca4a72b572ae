#!/usr/bin/env python3
"""Opcode counts of the SASS of chosen kernels (static: each instruction of the code once).

Reads `cuobjdump -sass OBJECT` text and, for every function whose (mangled) name matches the
pattern, prints its instruction count and its most frequent opcodes (the mnemonic before the
first dot, predicates dropped). What the source hides shows up here: cvt.rna.tf32.f32 as FSETP,
IADD and LOP3; a strided loop over threadIdx.x as an unrolled body plus a remainder loop.

    cuobjdump -sass build-gpu/cuda/CMakeFiles/blm_cuda.dir/barrier_fused_s.cu.o > s.sass
    python3 scripts/py/sass_histogram.py s.sass 's_kernel' [--top 12]
"""
import argparse
import collections
import re
import sys

FUNCTION = re.compile(r"^\s*Function : (\S+)")
# A SASS instruction's opcode: the mnemonic before the first dot, its predicate dropped.
OPCODE = r"(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)"
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+" + OPCODE)
BARE_INSTRUCTION = re.compile(r"\s*" + OPCODE)


def opcode(sass: str) -> str:
    """The opcode of one SASS instruction as text ('@!P0 BRA 0x..' -> 'BRA'), '?' if none."""
    m = BARE_INSTRUCTION.match(sass)
    return m.group(1) if m else "?"


def histograms(path: str, pattern: str):
    """{function: Counter of opcodes} for the functions whose name matches pattern."""
    found = {}
    current = None
    with open(path, errors="replace") as f:
        for line in f:
            m = FUNCTION.match(line)
            if m:
                current = m.group(1) if re.search(pattern, m.group(1)) else None
                if current:
                    found[current] = collections.Counter()
                continue
            if current:
                i = INSTRUCTION.match(line)
                if i:
                    found[current][i.group(1)] += 1
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sass", help="cuobjdump -sass output")
    ap.add_argument("pattern", help="regular expression on the mangled function name")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    found = histograms(args.sass, args.pattern)
    if not found:
        print(f"sass_histogram.py: no function matches {args.pattern!r} in {args.sass}",
              file=sys.stderr)
        return 1
    for name, counts in found.items():
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top))
        print(f"{name}: {sum(counts.values())} instructions; {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
