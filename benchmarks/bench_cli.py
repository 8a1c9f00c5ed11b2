"""How fast the command line answers: wall time of `cfmae --help`, `--version`, `presets` and each command's
`--help` in a fresh process (median of 5), as a table. Target (issue #18): under 1 s on a 2-core CPU.

    python benchmarks/bench_cli.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = [["--help"], ["--version"], ["presets"], ["pretrain", "--help"], ["finetune", "--help"],
         ["label", "--help"], ["reconstruct", "--help"], ["eval-robustness", "--help"]]


def wall(args: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cfmae_cli", *args], capture_output=True)  # (exit code not checked)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    wall(["--version"], 1)  # warms the file cache
    python = statistics.median([_python() for _ in range(5)])
    print(f"{'command':<32} {'seconds':>8}")
    print(f"{'python -c pass (interpreter)':<32} {python:>8.2f}")
    for args in CASES:
        print(f"{'cfmae ' + ' '.join(args):<32} {wall(args):>8.2f}")


def _python() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
