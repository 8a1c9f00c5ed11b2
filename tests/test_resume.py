"""Resume that loses nothing, preemption, damaged checkpoints, full disks, --init, and keep-last-K."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli import checkpoints as ckpt_mod
from cfmae_cli.checkpoints import CheckpointWriteError, save_checkpoint
from cfmae_cli.cli import app
from tests.conftest import make_dataset
from tests.test_distributed import ROOT, sets, steps

runner = CliRunner()
KEYS = ("loss", "loss_rgb", "loss_instance", "loss_semantic", "lr", "alpha_i", "alpha_s")


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cfmae_cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        metrics = run / "metrics.jsonl"
        # the run appends while we read: only the lines up to the last newline are complete
        lines = metrics.read_text().rpartition("\n")[0].splitlines() if metrics.exists() else []
        if any(r.get("step", 0) >= step for r in map(json.loads, lines) if r.get("type") == "step"):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    raise AssertionError("the run never reached the step")


def here(*args: str) -> None:
    """A run in this process: where only the broken run needs to be a real process (to kill it), the runs it is
    compared with, and its resumption, skip a fresh interpreter's imports."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]  # every step once, none lost or repeated
    for x, y in zip(a, b):
        for key in KEYS:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", n_per_class=4)


def run_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            *sets("train.plot_every=1000", "train.save_every=2")]


EPOCHS = 3  # of 6 steps (24 images, batch 4): a checkpoint at each epoch's end, the kills fall between them


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, run): one unbroken run that the kill -9 and the SIGTERM test each compare their resumed run
    against (read only: neither writes to it)."""
    root = tmp_path_factory.mktemp("unbroken")
    data = make_dataset(root / "data", n_per_class=12)
    here(*run_args(data, root / "run", EPOCHS))
    return data, root / "run"


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_unbroken_run(unbroken: tuple[Path, Path], tmp_path: Path) -> None:
    data, reference = unbroken
    proc = start(run_args(data, tmp_path / "killed", EPOCHS), tmp_path)
    wait_for_step(tmp_path / "killed", 10, proc)  # mid epoch 2: steps 7-10 are past last.pt (step 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in steps(tmp_path / "killed"))
    assert killed_at < 6 * EPOCHS  # it really died before the end
    here("pretrain", "--resume", str(tmp_path / "killed"))
    assert_same_steps(steps(tmp_path / "killed"), steps(reference))
    a = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(reference / "checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_the_resumed_run_is_exact(unbroken: tuple[Path, Path], tmp_path: Path) -> None:
    data, reference = unbroken
    proc = start(run_args(data, tmp_path / "term", EPOCHS), tmp_path)
    wait_for_step(tmp_path / "term", 9, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM after step" in output and "cfmae pretrain --resume" in output
    state = torch.load(tmp_path / "term/checkpoints/last.pt", weights_only=True)
    assert state["step"] < 6 * EPOCHS and state["next_step"] > 0  # saved mid-epoch, not at an epoch's end
    here("pretrain", "--resume", str(tmp_path / "term"))
    assert_same_steps(steps(tmp_path / "term"), steps(reference))


@pytest.mark.slow
def test_resume_auto_on_a_slurm_like_requeue_ends_as_the_unbroken_run(unbroken: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    """A requeued job runs the same command every time: the first start trains into --out, SIGTERM stops it
    mid-epoch after saving, the same command resumes it, and the run ends with the unbroken run's steps."""
    data, reference = unbroken
    command = [*run_args(data, tmp_path / "job", EPOCHS), "--resume", "auto"]
    proc = start(command, tmp_path)
    wait_for_step(tmp_path / "job", 9, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "no checkpoint in" in output and "Continue with: the same command (--resume auto)" in output
    assert max(r["step"] for r in steps(tmp_path / "job")) < 6 * EPOCHS
    result = runner.invoke(app, command)  # the requeued job: the very same command
    assert result.exit_code == 0, result.output
    assert "holds this run; resuming it" in result.output
    assert_same_steps(steps(tmp_path / "job"), steps(reference))
    result = runner.invoke(app, command)  # requeued once more after the end: nothing to do
    assert result.exit_code == 0 and "the run is complete" in result.output, result.output


def test_truncated_checkpoint_names_the_file_and_offers_the_periodic_one(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "3",
                                 *sets("train.save_every=2")])
    assert result.exit_code == 0, result.output
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    result = runner.invoke(app, ["pretrain", "--resume", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{last}: the file is damaged: cut off or corrupt" in result.output
    assert f"continue from it with --resume {out / 'checkpoints' / 'epoch-0002.pt'}" in result.output
    result = runner.invoke(app, ["pretrain", "--resume", str(out / "checkpoints" / "epoch-0002.pt")])
    assert result.exit_code == 0, result.output
    assert torch.load(last, weights_only=True)["epoch"] == 3


def test_resume_refuses_a_changed_config_and_lists_the_keys(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "1",
                               *sets()]).exit_code == 0
    result = runner.invoke(app, ["pretrain", "--resume", str(out), "--set", "optim.base_lr=0.5",
                                 "--set", "masking.alpha_obj=0.9", "--set", "data.num_workers=0"])
    assert result.exit_code == 2
    assert "change the run's config (masking.alpha_obj, optim.base_lr)" in result.output
    grown = runner.invoke(app, ["pretrain", "--resume", str(out), "--set", "data.num_workers=0"])
    assert grown.exit_code == 0, grown.output  # operational keys may change; the finished run stays finished
    assert "--resume continues a run with its own weights; it takes no --checkpoint" in runner.invoke(
        app, ["pretrain", "--resume", str(out), "--init", str(out)]).output
    assert "--resume continues a run in its own folder; it takes no --out" in runner.invoke(
        app, ["pretrain", "--resume", str(out), "--out", str(tmp_path / "elsewhere")]).output


def test_init_takes_weights_only(data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(src), "--epochs", "2",
                               *sets()]).exit_code == 0
    new = tmp_path / "new"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(new), "--epochs", "1",
                                 "--init", str(src), *sets("optim.base_lr=1e-12", "optim.warmup_epochs=0")])
    assert result.exit_code == 0, result.output
    first = steps(new)[0]
    assert first["step"] == 1 and first["epoch"] == 1  # a new run: counters start again
    a = torch.load(src / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(new / "checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # lr ~0: the weights are the source's
    assert "initialised from" in (new / "log.txt").read_text()


def test_disk_full_while_saving_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 1})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*the previous last.pt is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_keep_last_k_and_observability_files(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "4",
                                 *sets("train.save_every=1", "train.keep_last=2", "train.plot_every=2")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0003.pt", "epoch-0004.pt", "last.pt"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["loss.png", "recon-epoch-0002.png",
                                                                 "recon-epoch-0004.png"]
    assert list(out.glob("events.out.tfevents.*"))
    epoch = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"][0]
    assert epoch["img_per_s"] > 0 and epoch["img_per_s_per_device"] > 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data: Path, tmp_path: Path, monkeypatch) -> None:
    import cfmae_cli.model.losses as model_mod

    calls = {"n": 0}
    real = model_mod.image_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss  # steps 1-3 are fine: last.pt (step 2) is good

    monkeypatch.setattr(model_mod, "image_loss", poisoned)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "3", *sets()])
    assert result.exit_code == 1
    assert "non-finite loss at step 4" in result.output and "rgb nan" in result.output
    assert f"The last good checkpoint is {out / 'checkpoints' / 'last.pt'} (step 2)" in " ".join(result.output.split())
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_sigterm_to_the_launcher_then_resume_on_one_process_is_exact(tmp_path: Path) -> None:
    """2 CPU processes are preempted mid-epoch; the run goes on in 1 process with 2 accumulation steps."""
    data = make_dataset(tmp_path / "big", n_per_class=12)  # 24 images, effective batch 8: 3 steps per epoch
    extra = ["optim.effective_batch=8", "train.plot_every=1000"]
    base = ["--data", str(data), "--epochs", "3", *sets(*extra)]
    here("pretrain", "--out", str(tmp_path / "unbroken"), *base)
    proc = start(["pretrain", "--gpus", "0", "--procs", "2", "--out", str(tmp_path / "pre"), *base], tmp_path)
    wait_for_step(tmp_path / "pre", 5, proc)  # mid epoch 2
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    state = torch.load(tmp_path / "pre/checkpoints/last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    here("pretrain", "--resume", str(tmp_path / "pre"), "--gpus", "0")
    assert_same_steps(steps(tmp_path / "pre"), steps(tmp_path / "unbroken"))


def test_init_refuses_a_checkpoint_with_no_tensor_of_this_model(data: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(foreign, {"model": {"backbone.layer1.weight": torch.zeros(3)}})
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--init", str(foreign),
                                 *sets()])
    assert result.exit_code == 2
    assert f"{foreign}: unknown weights format (keys such as ['backbone.layer1.weight'])" in result.output
    assert not (tmp_path / "r").exists()
