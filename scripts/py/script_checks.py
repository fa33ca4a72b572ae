"""The one assertion of the scripts' own tests (test_profile_parsers.py, test_bench_report.py):
print ok or FAIL for each checked value and stop at the first mismatch."""
import sys


def expect(what, got, want):
    if got != want:
        print(f"FAIL {what}: got {got!r}, want {want!r}")
        sys.exit(1)
    print(f"ok   {what}: {got!r}")
