"""benchmarks/gpu_check.sh, the first script of a lent GPU machine, cannot rot: its --cpu-dry-run runs every phase
on the CPU with tiny sizes and prints one table with a row per phase; it reruns into the same folders (each phase
empties its own first), and a phase that fails or runs over its budget says FAIL / TIMEOUT in the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def check(out: Path, work: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--out", str(out), "--work", str(work), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def table(stdout: str, phases: list[str]) -> dict[str, tuple[str, str]]:
    """{phase: (result, numbers)} from the table printed last (phase | result | numbers | seconds)."""
    text = stdout[stdout.rindex("phase "):]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if cells[0] in phases and len(cells) == 4:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.mark.slow
def test_the_dry_run_fills_every_row_reruns_in_place_and_reports_failures(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    phases = [line.split()[0] for line in subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True,
                                                         text=True, check=True).stdout.splitlines()[:-1]]
    assert {"setup", "cuda_tests", "step_eager", "step_compiled", "data", "bf16_fp32", "sigterm_resume",
            "nccl_2gpu", "masks"} <= set(phases)
    # what an earlier check left: run folders that `cfmae pretrain --out` refuses, and an old table in OUT
    for run in ("bf16_fp32/bf16", "sigterm_resume/term"):
        (work / run).mkdir(parents=True)
        (work / run / "config.yaml").write_text("left by an earlier check\n")
    out.mkdir()
    (out / "table.json").write_text(json.dumps({"rows": {"old_phase": {"phase": "old_phase", "result": "FAIL",
                                                                       "numbers": "", "seconds": 1}}}))

    first = check(out, work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    rows = table(first.stdout, phases + ["old_phase"])
    assert sorted(rows) == sorted(phases), first.stdout[-3000:]  # every phase, the old table's row gone
    for phase, (result, numbers) in rows.items():
        assert result == "PASS" or result.startswith("SKIPPED ("), (phase, result, numbers)
    assert rows["cuda_tests"][0] == rows["nccl_2gpu"][0] == "SKIPPED (no CUDA)"
    assert "CUDA tests collected" in rows["cuda_tests"][1]  # the GPU's pytest selection still finds tests
    for phase in ("step_eager", "step_compiled"):
        assert rows[phase][0] == "PASS" and "img/s" in rows[phase][1]
    assert rows["data"][0] == "PASS" and "samples/s" in rows["data"][1]
    assert rows["bf16_fp32"][0] == "PASS" and "loss gap" in rows["bf16_fp32"][1]
    assert rows["sigterm_resume"][0] == "PASS" and "resumed" in rows["sigterm_resume"][1]
    assert (out / "table.md").read_text().count("\n") == len(phases) + 2
    assert json.loads((out / "step-eager.json").read_text())["presets"]  # the bench JSON comes back in OUT

    # a rerun of two phases into the same folders: one fails, one outlasts its budget; the other rows stay
    again = check(out, work, "--only", "cuda_tests,nccl_2gpu", GPU_CHECK_FAIL="cuda_tests",
                  GPU_CHECK_HANG="nccl_2gpu", GPU_CHECK_BUDGETS="nccl_2gpu=2")
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-2000:]
    rerun = table(again.stdout, phases)
    assert rerun["cuda_tests"][0] == "FAIL" and "exit 3" in rerun["cuda_tests"][1]
    assert rerun["nccl_2gpu"][0] == "TIMEOUT" and "budget of 2 s" in rerun["nccl_2gpu"][1]
    assert {p: r for p, r in rerun.items() if p not in ("cuda_tests", "nccl_2gpu")} == \
        {p: r for p, r in rows.items() if p not in ("cuda_tests", "nccl_2gpu")}
    assert "failure injected" in (out / "log.txt").read_text()
