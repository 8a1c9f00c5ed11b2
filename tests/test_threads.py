"""Threads: a run's intra-op threads are its share of the cores minus its data workers (train.threads wins), the
plan says so, a slow first epoch says why, and `cfmae bench` says what it does and when its machine is busy."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli.bench import load_warning
from cfmae_cli.cli import app
from cfmae_cli.train import distributed, setup
from cfmae_cli.train.setup import choose_threads, describe_schedule, make_plan, slow_run_warning, usable_cores
from tests.conftest import make_dataset, tiny_config, TINY_OVERRIDES

runner = CliRunner()


@pytest.fixture
def keep_threads():
    """Tests that set torch's threads put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads, workers, procs, cores, expected", [
    (None, 1, 1, 2, 1),     # the demo on 2 cores: one thread beside its one worker (torch's default was 2)
    (None, 3, 2, 16, 5),    # 16 cores among 2 processes, 3 workers each
    (None, 8, 4, 2, 1),     # more workers than cores: still one thread
    (None, 0, 1, 8, 8),     # no workers: every core
    (3, 8, 4, 2, 3),        # train.threads wins
])
def test_threads_are_the_cores_share_minus_the_workers(threads, workers, procs, cores, expected) -> None:
    assert choose_threads(threads, workers, procs, cores) == expected


def test_usable_cores_follow_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
        assert usable_cores() == 3  # e.g. taskset or a container: 3 of the machine's 64
        monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == 64  # no affinity call (macOS, Windows): the machine's count


def test_local_processes_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup, "usable_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = tiny_config("data.num_workers=1")
    assert setup.train_threads(cfg, 1) == 7 and setup.train_threads(cfg, 2) == 3  # --procs 2: 4 cores each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # under a launcher: the processes on this machine
    assert setup.train_threads(cfg, 8) == 1
    assert setup.train_threads(tiny_config("data.num_workers=1", "train.threads=6"), 8) == 6


def test_the_plan_shows_threads_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setup, "usable_cores", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = tiny_config("data.num_workers=1")
    lines = describe_schedule(make_plan(cfg, 16, 1), cfg)
    assert "plan: threads 3, data workers 1 per process (train.threads unset: 4 core(s) among 1 process(es), " \
           "minus the workers)" in lines
    cfg = tiny_config("data.num_workers=2", "train.threads=2")
    assert "plan: threads 2, data workers 2 per process" in describe_schedule(make_plan(cfg, 16, 1), cfg)


def test_finetuning_sets_the_threads(monkeypatch: pytest.MonkeyPatch, keep_threads) -> None:
    from cfmae_cli.eval.task import FinetuneTask

    monkeypatch.setattr(setup, "usable_cores", lambda: 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = SimpleNamespace(train=SimpleNamespace(threads=None), data=SimpleNamespace(num_workers=1, root="data", val_fraction=None),
                          model=SimpleNamespace(encoder="vit"))
    torch.set_num_threads(1)
    FinetuneTask().setup(cfg, distributed.DistInfo(0, 1, 0, torch.device("cpu")), "src")  # type: ignore[arg-type]
    assert torch.get_num_threads() == 2


def test_slow_run_warning_says_why() -> None:
    assert slow_run_warning(2, 1.9, 1, 1, 1, 80.0) is None  # the demo alone on 2 cores
    assert slow_run_warning(16, 15.0, 5, 2, 3, 500.0) is None
    over = slow_run_warning(2, 1.0, 2, 1, 1, 6.9)
    assert over is not None and "6.9 img/s" in over and "2 thread(s) x 1 process(es) + 1 data worker(s) = 3" in over
    assert "train.threads" in over and "load average" not in over
    busy = slow_run_warning(2, 4.2, 1, 1, 1, 30.0)
    assert busy is not None and "load average is 4.2 on 2 core(s)" in busy and "thread(s) x" not in busy
    both = slow_run_warning(2, 6.0, 2, 1, 2, 5.0)
    assert both is not None and "thread(s) x" in both and "load average" in both


def test_a_slow_first_epoch_is_explained_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               keep_threads) -> None:
    """Two epochs of the tiny config: the plan shows the chosen threads, pre-training sets them, and epoch 1 (not
    epoch 2) warns, here about a busy machine (load average 9 on 3 cores)."""
    from cfmae_cli.train import engine

    monkeypatch.setattr(setup, "usable_cores", lambda: 3)
    monkeypatch.setattr(engine, "usable_cores", lambda: 3)
    monkeypatch.setattr(engine, "load_average", lambda: 9.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    data = make_dataset(tmp_path / "data", n_per_class=2)
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *sets,
                                 "--set", "train.monitor.enabled=false"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "plan: threads 3, data workers 0 per process" in text
    assert torch.get_num_threads() == 3
    assert text.count("slower than this machine can go") == 1 and "load average is 9.0 on 3 core(s)" in text


def test_bench_warns_on_a_busy_machine() -> None:
    assert load_warning(None, 2) is None and load_warning(0.4, 2) is None
    warning = load_warning(2.5, 2)
    assert warning is not None and "2.5 on 2 core(s)" in warning and "not meaningful" in warning
