"""How long the test tiers and CI take (README, "Tests: three tiers"), in a fresh clone of this checkout's HEAD.

    python -m benchmarks.test_tiers               # .ci/run in a fresh clone (install, set-up, every test), then
                                                  # the unit and middle tiers there (the middle one also in one
                                                  # process, -n 0), and a step's --help
    python -m benchmarks.test_tiers --no-ci       # the tiers only (the set-up command must have run here once)

`.ci/run` installs into the current Python (as CI does); run it where that is what you want. Writes
benchmarks/results/test_tiers.{md,json} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf2mlflow import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
# The middle tier again in one process: what the two workers (-n 2 in pyproject.toml) gain, side by side.
TIERS = {"unit": ["-m", "unit"], "middle": ["-m", "not slow"], "middle, one worker": ["-m", "not slow", "-n", "0"]}
SUMMARY = re.compile(r"^=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in (?P<seconds>[\d.]+)s", re.M)


def timed(command: list[str], cwd: Path, log: Path) -> tuple[float, int, str]:
    """Run `command` with its output appended to `log` and shown as it comes; wall seconds, exit code, output."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            out.write(line)
            lines.append(line)
            if line.startswith(("[main]", "FAILED", "ERROR")) or line.rstrip().endswith("%]") or SUMMARY.match(line):
                print(line, end="", flush=True)
        proc.wait()
    return time.perf_counter() - start, proc.returncode, "".join(lines)


def pytest_summary(output: str) -> dict:
    """The last pytest summary line: its counts ("412 passed, 1 skipped") and pytest's own seconds."""
    found = list(SUMMARY.finditer(output))
    if not found:
        return {"counts": "no pytest summary", "pytest_seconds": None}
    return {"counts": found[-1]["counts"], "pytest_seconds": float(found[-1]["seconds"])}


def help_seconds(checkout: Path, rounds: int = 5) -> float:
    """Median wall seconds of `python steps/convert_onnx.py --help`, fresh process each."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "steps/convert_onnx.py", "--help"], cwd=checkout, check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-ci", action="store_true", help="skip .ci/run; time the tiers in this checkout")
    parser.add_argument("--output", default=str(RESULTS / "test_tiers"), help="results path, without suffix")
    args = parser.parse_args(argv)
    from hf2mlflow.measure import cpu_name

    work = Path(tempfile.mkdtemp(prefix="test-tiers-"))
    log = work / "test_tiers.log"
    if args.no_ci:
        checkout = PROJECT_ROOT
    else:
        checkout = work / "hf2mlflow"
        subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(checkout)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True,
                            check=True).stdout.strip()
    print(f"[test_tiers] {checkout} at {commit}; everything it runs is logged in {log}")
    env_note = f"{os.cpu_count()} cores, {cpu_name()}"
    rows = {}
    if not args.no_ci:
        seconds, code, output = timed(["bash", ".ci/run"], checkout, log)
        rows["ci"] = {"command": "bash .ci/run (install, set-up command, test command)", "seconds": seconds,
                      "exit_code": code, **pytest_summary(output)}
        if code != 0:
            print(f"[test_tiers] .ci/run failed (exit {code}); see {log}", file=sys.stderr)
    for tier, options in TIERS.items():
        seconds, code, output = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options],
                                      checkout, log)
        rows[tier] = {"command": "python -m pytest " + " ".join(f'"{o}"' if " " in o else o for o in options),
                      "seconds": seconds, "exit_code": code, **pytest_summary(output)}
    rows["help"] = {"command": "python steps/convert_onnx.py --help (median of 5)", "seconds": help_seconds(checkout),
                    "exit_code": 0, "counts": "", "pytest_seconds": None}

    lines = [f"`python -m benchmarks.test_tiers{' --no-ci' if args.no_ci else ''}` at {commit}, {env_note}",
             "", "| what | command | result | wall s | pytest s |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        result = row["counts"] if row["exit_code"] == 0 else f"exit {row['exit_code']}: {row['counts']}"
        pytest_s = "" if row["pytest_seconds"] is None else f"{row['pytest_seconds']:.0f}"
        lines.append(f"| {name} | `{row['command']}` | {result} | {row['seconds']:.1f} | {pytest_s} |")
    table = "\n".join(lines) + "\n"
    results = {"commit": commit, "machine": env_note, "rows": rows}
    Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.output).with_suffix(".md").write_text(table)
    print("\n" + table + f"\n[test_tiers] written: {Path(args.output).with_suffix('.md')} and .json; log: {log}")
    if any(row["exit_code"] for row in rows.values()):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
