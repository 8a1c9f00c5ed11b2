"""What a cluster does that a laptop does not (issue 29, item 4), where a CPU can show it: ``srun`` without
torchrun is refused before anything is written; a resumed run restores the CUDA RNG of its own GPU whatever
the number of GPUs it sees now; the k-NN monitor says what it holds out of pre-training, and on an
ImageNet-sized class list how to keep it in."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli.checkpoints import rng_state, set_rng_state
from cfmae_cli.cli import app
from cfmae_cli.config import load_config
from cfmae_cli.data.layout import Sample
from cfmae_cli.train.monitor import monitor_samples
from tests.conftest import make_dataset, TINY_OVERRIDES

SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]


def test_srun_without_torchrun_is_refused_before_anything_is_written(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "3")
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *SETS])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "task 3 of 8 without torchrun" in text and "srun --ntasks-per-node=1 torchrun" in text, text
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_one_srun_task_and_torchrun_workers_are_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from cfmae_cli.train.distributed import refuse_bare_srun

    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # srun -n 1 cfmae pretrain --gpus 8: one launcher
    refuse_bare_srun()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun torchrun ...: torchrun's workers have RANK
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    refuse_bare_srun()


def test_the_cuda_rng_of_this_process_gpu_is_restored_whatever_the_gpus_seen(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """A process on cuda:1 (LOCAL_RANK 1). Its checkpoint holds its own GPU's state; one written before issue 29
    holds every visible GPU's: the state of cuda:1 is taken from it, and a list from a process that saw fewer
    GPUs than this one's index is no IndexError (restoring every visible GPU's state was one)."""
    restored: list[tuple[list[int], int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": restored.append((state.tolist(), device)))
    state = rng_state()
    set_rng_state(state)
    assert restored == [([7] * 4, 1)]
    every_gpu = dict(state, cuda=[torch.full((4,), k, dtype=torch.uint8) for k in range(8)])
    set_rng_state(every_gpu)
    assert restored[-1] == ([1] * 4, 1)
    set_rng_state(dict(state, cuda=[torch.zeros(4, dtype=torch.uint8)]))  # saved where one GPU was visible
    assert len(restored) == 2


def _samples(classes: int, per_class: int) -> tuple[list[Sample], list[str]]:
    names = [f"n{k:08d}" for k in range(classes)]
    return [Sample(Path(f"/data/rgb/{name}/{i:04d}.JPEG"), {}, k) for k, name in enumerate(names)
            for i in range(per_class)], names


@pytest.mark.parametrize("classes, advice", [(3, False), (100, True)])
def test_the_monitor_says_what_it_holds_out(classes: int, advice: bool, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("demo", ["train.monitor.val_fraction=0.2"])
    samples, names = _samples(classes, 40)
    with caplog.at_level(logging.INFO, logger="cfmae_cli.train.monitor"):
        picked = monitor_samples(cfg, None, samples, names)
    assert picked is not None
    kept, _, val, _ = picked
    assert kept is not None and len(kept) + len(val) == len(samples)
    text = caplog.text
    assert f"{len(val)} of the {len(samples)} images (train.monitor.val_fraction 0.2 of each class) are held out" \
        in text
    assert ("--monitor-data FOLDER" in text) == advice
