"""Wall time of a model's generated suite, as a new user runs it: record, then compare.

In a fresh empty directory, runs ``pytest --eq-model MODEL --eq-update-baselines`` and then
``pytest --eq-model MODEL`` (each a new process, as on the command line), and prints for each
the session's wall time, pytest's own ``--durations`` lines and the 1-minute load average before
and after: on a shared machine another process's threads slow torch's OpenMP ops many times
over, so a run with a high load is not comparable. Not a test; nothing is asserted.

Usage: python benchmarks/bench_suite.py MODEL [MODEL ...] [--durations 4] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def run(model: str, *, update: bool, cwd: str, durations: int, extra: list[str]) -> None:
    command = [sys.executable, "-m", "pytest", "--eq-model", model, "-q", "-p", "no:cacheprovider",
               f"--durations={durations}", *extra]
    if update:
        command.append("--eq-update-baselines")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = result.stdout.splitlines()
    slowest = [line for line in lines if line.endswith(("call", "setup")) or " call " in line][:durations]
    verdict = next((line for line in reversed(lines) if " in " in line and ("passed" in line or "failed" in line)), "")
    mode = "record " if update else "compare"
    print(f"{model} {mode}: {wall:6.1f} s wall (exit {result.returncode}; load {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}) {verdict.strip('= ')}")
    for line in slowest:
        print(f"    {line}")
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--durations", type=int, default=4)
    args, extra = parser.parse_known_args()
    extra = [arg for arg in extra if arg != "--"]
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="eq-suite-") as empty:
            run(model, update=True, cwd=empty, durations=args.durations, extra=extra)
            run(model, update=False, cwd=empty, durations=args.durations, extra=extra)


if __name__ == "__main__":
    main()
