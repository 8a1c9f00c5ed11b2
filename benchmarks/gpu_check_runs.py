"""The training-run phases of benchmarks/gpu_check.sh: tiny `cfmae pretrain` runs (tests/conftest.py's model and
data) started as fresh processes, compared, and summarised into the phase's result.json.

  python benchmarks/gpu_check_runs.py precision --work DIR --gpus 1   # bf16 vs fp32 loss curves
  python benchmarks/gpu_check_runs.py resume --work DIR --gpus 1      # SIGTERM, resume, equal to an unbroken run
  python benchmarks/gpu_check_runs.py ddp --work DIR --gpus 2         # 2 processes vs 1 with accumulation 2
                                                                       # (--gpus 0: CPU processes over gloo)
Each writes DIR/result.json (gpu_check_table.write_result); the dataset is made once under --data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from gpu_check_table import write_result  # noqa: E402


def tiny_overrides() -> list[str]:
    """tests/conftest.py's TINY_OVERRIDES, read without importing it (and cfmae with it: a second per process)."""
    import ast
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "TINY_OVERRIDES")


KEYS = ("loss", "loss_rgb", "loss_instance", "loss_semantic")
SCHEDULE = ("lr", "alpha_i", "alpha_s")
#: bf16 vs fp32: the largest relative gap between the two loss curves (step by step) that still passes
PRECISION_TOLERANCE = 0.05
#: 2 processes vs 1 with 2 accumulation steps, fp32 (TF32 matmuls on a GPU): relative gap of each loss
DDP_TOLERANCE = 1e-3
#: a resumed run vs an unbroken one: as tests/test_resume.py
RESUME_TOLERANCE = 1e-6


def dataset(root: Path, per_class: int) -> Path:
    """tests/conftest.py's dataset (2 classes), made once: written beside and renamed, so a killed phase leaves
    no half-written folder behind."""
    if not root.exists():
        from tests.conftest import make_dataset
        part = root.with_name(root.name + f".part{os.getpid()}")
        make_dataset(part, n_per_class=per_class)
        part.rename(root)
    return root


def command(data: Path, out: Path, epochs: int, gpus: int, extra: list[str], procs: int = 1) -> list[str]:
    sets = [*tiny_overrides(), "train.plot_every=1000", *extra]
    if gpus == 0:
        sets.append("train.threads=1")  # a CPU dry run: processes side by side on few cores
    args = [sys.executable, "-m", "cfmae_cli", "pretrain", "--data", str(data), "--out", str(out),
            "--epochs", str(epochs), "--gpus", str(gpus)] + (["--procs", str(procs)] if procs > 1 else [])
    return args + [x for item in sets for x in ("--set", item)]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print("$", " ".join(args[1:]), flush=True)
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def finish(proc: subprocess.Popen, log: Path, expect: int = 0) -> None:
    rc = proc.wait()
    if rc != expect:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{log.parent.name}: exit {rc} (expected {expect}): " + " / ".join(tail))


def steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("type") == "step"]


def gap(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> float:
    """The largest relative difference of ``keys`` between two runs' step records (inf when the steps differ)."""
    if [r["step"] for r in a] != [r["step"] for r in b] or not a:
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        for key in keys:
            if not (math.isfinite(x[key]) and math.isfinite(y[key])):
                return math.inf
            worst = max(worst, abs(x[key] - y[key]) / max(abs(y[key]), 1e-7))
    return worst


def precision(work: Path, data: Path, gpus: int) -> tuple[str, str]:
    """Two runs from the same seed, train.precision bf16 and fp32, side by side; their loss curves compared."""
    procs = {p: start(command(data, work / p, 3, gpus, [f"train.precision={p}"]), work / f"{p}.log")
             for p in ("bf16", "fp32")}
    for p, proc in procs.items():
        finish(proc, work / f"{p}.log")
    a, b = steps(work / "bf16"), steps(work / "fp32")
    worst = gap(a, b, ("loss",))
    first, last = a[-1]["loss"], b[-1]["loss"]
    mode = "" if gpus else " (CPU: both fp32, bf16 autocast is the GPU's)"
    numbers = (f"{len(a)} steps, max relative loss gap {worst:.2e} (tolerance {PRECISION_TOLERANCE}); last loss "
               f"bf16 {first:.4f} / fp32 {last:.4f}{mode}")
    return ("PASS" if worst <= PRECISION_TOLERANCE else "FAIL"), numbers


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().rpartition("\n")[0].splitlines() if metrics.exists() else []
        if any(r.get("step", 0) >= step for r in map(json.loads, lines) if r.get("type") == "step"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (exit {proc.returncode}) before step {step}: {log.read_text()[-400:]}")
        time.sleep(0.01)
    raise SystemExit(f"the run never reached step {step}")


def resume(work: Path, data: Path, gpus: int) -> tuple[str, str]:
    """tests/test_resume.py's SIGTERM case on this device: a run stopped by SIGTERM at step 9 of 120 (24 in the
    CPU dry run), resumed, equals an unbroken run step by step. On a GPU a second unbroken run gives the noise floor of the device."""
    epochs, extra = (20, ["train.save_every=5"]) if gpus else (4, ["train.save_every=2"])  # 120 / 24 steps
    names = ["unbroken", "term"] + (["unbroken2"] if gpus else [])
    procs = {n: start(command(data, work / n, epochs, gpus, extra), work / f"{n}.log") for n in names}
    wait_for_step(work / "term", 9, procs["term"], work / "term.log")
    procs["term"].send_signal(signal.SIGTERM)
    finish(procs["term"], work / "term.log", expect=128 + signal.SIGTERM)
    said = (work / "term.log").read_text(errors="replace")
    if "stopped by SIGTERM after step" not in said:
        return "FAIL", "SIGTERM: exit 143 but no 'stopped by SIGTERM after step' line"
    stopped = max(r["step"] for r in steps(work / "term"))
    finish(start([sys.executable, "-m", "cfmae_cli", "pretrain", "--resume", str(work / "term")],
                 work / "resume.log"), work / "resume.log")
    for n in names:
        if n != "term":
            finish(procs[n], work / f"{n}.log")
    worst = gap(steps(work / "term"), steps(work / "unbroken"), KEYS + SCHEDULE)
    numbers = (f"stopped after step {stopped} of {len(steps(work / 'unbroken'))}, resumed: max relative gap "
               f"{worst:.1e} (tolerance {RESUME_TOLERANCE:.0e})")
    if "unbroken2" in names:
        numbers += f"; two unbroken runs: {gap(steps(work / 'unbroken2'), steps(work / 'unbroken'), KEYS):.1e}"
    return ("PASS" if worst <= RESUME_TOLERANCE else "FAIL"), numbers


def ddp(work: Path, data: Path, gpus: int) -> tuple[str, str]:
    """2 processes (NCCL on 2 GPUs; gloo on CPU processes with --gpus 0) against 1 process with 2 accumulation
    steps: the same effective batch 8, fp32, so the losses agree to rounding."""
    extra = ["optim.effective_batch=8", "train.batch_size=4", "train.precision=fp32"]
    two = command(data, work / "two", 3, 2 if gpus else 0, extra, procs=1 if gpus else 2)
    one = command(data, work / "one", 3, 1 if gpus else 0, extra)
    procs = {"two": start(two, work / "two.log"), "one": start(one, work / "one.log")}
    for n, proc in procs.items():
        finish(proc, work / f"{n}.log")
    plans = {n: (work / n / "log.txt").read_text() for n in procs}
    if "plan: 2 process(es) x per-device batch 4 x 1 accumulation" not in plans["two"] or \
            "x per-device batch 4 x 2 accumulation" not in plans["one"]:
        return "FAIL", "the runs' plans are not 2 x 4 x 1 and 1 x 4 x 2 (log.txt)"
    a, b = steps(work / "two"), steps(work / "one")
    worst = gap(a, b, KEYS)
    same = gap(a, b, SCHEDULE) == 0
    how = "NCCL, 2 GPUs" if gpus else "gloo, 2 CPU processes (dry run)"
    numbers = (f"{how} vs 1 with accumulation 2: {len(a)} steps, max relative loss gap {worst:.1e} "
               f"(tolerance {DDP_TOLERANCE:.0e}); lr and alphas {'equal' if same else 'DIFFER'}")
    return ("PASS" if worst <= DDP_TOLERANCE and same else "FAIL"), numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dataset", "precision", "resume", "ddp"])
    parser.add_argument("--work", type=Path, help="the phase's folder (result.json goes here)")
    parser.add_argument("--data", type=Path, required=True, help="the tiny dataset (made when missing)")
    parser.add_argument("--gpus", type=int, default=1, help="0 = CPU processes (the dry run)")
    args = parser.parse_args()
    data = dataset(args.data, per_class=12)  # 24 images: 6 steps of 4 per epoch
    if args.what == "dataset":
        return
    if args.work is None:
        parser.error(f"{args.what} needs --work")
    args.work.mkdir(parents=True, exist_ok=True)
    result, numbers = {"precision": precision, "resume": resume, "ddp": ddp}[args.what](args.work, data, args.gpus)
    write_result(args.work / "result.json", result, numbers)
    print(result, numbers)


if __name__ == "__main__":
    main()
