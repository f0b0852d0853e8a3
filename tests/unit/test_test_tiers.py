"""benchmarks/test_tiers.py reads pytest's own summary line (counts and seconds) out of a run's output."""

from benchmarks.test_tiers import pytest_summary


def test_the_last_summary_line_is_read():
    output = ("........ [ 50%]\n3 passed in 1.00s\n........ [100%]\n"
              "409 passed, 1 skipped, 37 warnings in 201.93s (0:03:21)\n")
    assert pytest_summary(output) == {"counts": "409 passed, 1 skipped, 37 warnings", "pytest_seconds": 201.93}
    assert pytest_summary("= 2 failed, 7 passed in 3.50s =")["counts"] == "2 failed, 7 passed"
    assert pytest_summary("no tests ran")["pytest_seconds"] is None
