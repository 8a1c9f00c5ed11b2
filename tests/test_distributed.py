"""Distributed pre-training on CPU processes (gloo): the same computation as one process, synchronised
gradients, and a clear refusal of GPUs that are not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.masking import visible_indices
from cfmae_cli.model import CFMAE
from tests.conftest import TINY_OVERRIDES, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cfmae_cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def sets(*extra: str) -> list[str]:
    out = []
    for item in [*TINY_OVERRIDES, *extra]:
        out += ["--set", item]
    return out


def steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_effective_batch(tiny_data: Path, tmp_path: Path) -> None:
    common = ["--data", str(tiny_data), "--epochs", "2", *sets("optim.effective_batch=8", "train.batch_size=4")]
    two = cli("pretrain", "--gpus", "0", "--procs", "2", "--out", str(tmp_path / "two"), *common, cwd=tmp_path)
    assert two.stdout.strip().splitlines()[-1] == f"Run folder: {tmp_path / 'two'}"
    one = CliRunner().invoke(app, ["pretrain", "--gpus", "0", "--out", str(tmp_path / "one"), *common])
    assert one.exit_code == 0, one.output  # (in this process: only the two need processes of their own)
    a, b = steps(tmp_path / "two"), steps(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]  # 8 images / 8 per step x 2 epochs
    for x, y in zip(a, b):
        for key in ("loss", "loss_rgb", "loss_instance", "loss_semantic"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
        assert (x["lr"], x["alpha_i"], x["alpha_s"]) == (y["lr"], y["alpha_i"], y["alpha_s"])
    w2 = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)["model"]
    w1 = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)
    log = (tmp_path / "two/log.txt").read_text()
    assert "plan: 2 process(es) x per-device batch 4 x 1 accumulation step(s) = effective batch 8" in log


def _grad_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = tiny_config()
    model = CFMAE.from_config(cfg, 3)
    net = DistributedDataParallel(model)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    s, ms, n = cfg.data.img_size, cfg.data.img_size // cfg.model.map_stride, cfg.tokens_per_modality
    batch = {"rgb": torch.randn(2, 3, s, s, generator=g), "instance": torch.randint(0, 16, (2, ms, ms), generator=g),
             "semantic": torch.randint(0, 3, (2, ms, ms), generator=g)}
    keep = torch.rand(2, 3 * n, generator=g).argsort(1)[:, : cfg.masking.num_visible]
    mask = torch.ones(2, 3 * n, dtype=torch.bool).scatter_(1, keep, False).reshape(2, 3, n)
    net(batch, mask, visible_indices(mask))["loss"].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    torch.save(grads, f"{out}/grads-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gradients_are_identical_across_ranks_after_a_step(tmp_path: Path) -> None:
    mp.spawn(_grad_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    g0 = torch.load(tmp_path / "grads-0.pt", weights_only=True)
    g1 = torch.load(tmp_path / "grads-1.pt", weights_only=True)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for key in g0:  # every trainable parameter got a gradient (no unused parameters) and ranks agree
        assert torch.equal(g0[key], g1[key]), key
    assert any(g0[k].abs().sum() > 0 for k in g0)


def test_gpus_without_gpus_prints_the_plan_and_exits_2(tiny_data: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = CliRunner().invoke(app, ["pretrain", "--preset", "vitb-400e", "--gpus", "8", "--data", str(tiny_data),
                                      "--set", "train.batch_size=1", "--set", "optim.effective_batch=8"])
    assert result.exit_code == 2, result.output
    text = result.output
    assert "plan: 8 process(es) x per-device batch 1 x 1 accumulation step(s) = effective batch 8" in text
    assert "lr 3.13e-06" in text and "steps per epoch" in text and "steps in 400 epochs" in text
    assert "--gpus 8: torch sees 0 GPU(s)" in text and "Traceback" not in text


@pytest.mark.slow
def test_bad_files_of_every_rank_are_listed_once(tmp_path: Path) -> None:
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "d", n_per_class=8)
    broken = [data / "rgb" / "a" / "a_01.png", data / "rgb" / "b" / "b_05.png"]
    for path in broken:
        path.write_bytes(b"broken")
    out = tmp_path / "run"
    cli("pretrain", "--gpus", "0", "--procs", "2", "--out", str(out), "--data", str(data), "--epochs", "3",
        *sets("optim.effective_batch=8", "data.max_bad_fraction=0.2"), cwd=tmp_path)
    listed = sorted(line.split("\t")[0] for line in (out / "bad_files.txt").read_text().splitlines())
    assert listed == sorted(map(str, broken))
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
    assert epochs[-1]["skipped_files"] == 2
    assert len(torch.load(out / "checkpoints/last.pt", weights_only=True)["skipped"]) == 2
