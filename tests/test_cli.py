"""The command line: a pre-training run end to end, presets, and exit code 2 with one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from cfmae_cli.cli import app
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _sets(*extra: str) -> list[str]:
    out = []
    for item in TINY_OVERRIDES + list(extra):
        out += ["--set", item]
    return out


def test_pretrain_writes_the_run_folder(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--epochs", "3"] + _sets())
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"Run folder: {out}"
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/epoch-0003.pt",
                 "plots/loss.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 3 and len(steps) == 3 * 2  # 8 images / batch 4 = 2 steps per epoch, logged each
    for key in ("loss_rgb", "loss_instance", "loss_semantic", "lr", "alpha_i", "alpha_s", "img_per_s"):
        assert key in steps[0]
    assert steps[0]["alpha_s"] == 1.0  # the curriculum starts semantic-guided
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 6 and ckpt["format_version"] == 1
    assert ckpt["config"]["data"]["root"] == str(tiny_data.resolve())
    assert "encoder.blocks.0.attn.qkv.weight" in ckpt["model"]


def test_run_folders_are_numbered(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--epochs", "1"] + _sets())
        assert result.exit_code == 0, result.output
    name = tiny_data.resolve().name  # --data without --preset: the run is named after the data folder
    assert (tmp_path / f"runs/pretrain/{name}/checkpoints/last.pt").is_file()
    assert (tmp_path / f"runs/pretrain/{name}-2/checkpoints/last.pt").is_file()


def test_gradient_accumulation_counts_optimizer_steps(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "acc"
    result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--epochs", "1"]
                           + _sets("train.batch_size=2", "optim.effective_batch=4"))
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2  # 8 images, micro-batch 2, 2 accumulation steps


def test_presets_command_shows_derived_values() -> None:
    result = runner.invoke(app, ["presets", "vitb-400e"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "lr                  8.0e-04" in text and "effective batch     2048 = 256 per device x 1" in text
    assert "98 visible of 588" in text and "semantic → instance → rgb" in text
    assert "dim: 256" in text and "num_heads: 8" in text
    listing = runner.invoke(app, ["presets"])
    assert listing.exit_code == 0 and "vitb-1600e" in listing.output


def _bad(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_bad_input_exits_2_with_one_clear_message(tiny_data: Path, tmp_path: Path) -> None:
    assert "optim.base_lrr: unknown key; did you mean 'optim.base_lr'" in \
        _bad(["pretrain", "--set", "optim.base_lrr=1"])
    assert "train.epochs: Input should be greater than or equal to 1" in \
        _bad(["pretrain", "--set", "train.epochs=-1"])
    assert "--data /nonexistent/data: folder not found" in _bad(["pretrain", "--data", "/nonexistent/data"])
    assert "--procs 2: CPU processes need --gpus 0" in _bad(["pretrain", "--procs", "2"])
    (tiny_data / "instance" / "a" / "a_02.png").unlink()
    out = _bad(["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / "r")] + _sets())
    assert "a_02.png (no instance map" in out
    assert not (tmp_path / "r").exists()  # nothing half-written
    existing = tmp_path / "full"
    (existing / "checkpoints").mkdir(parents=True)
    (existing / "checkpoints" / "last.pt").write_bytes(b"keep me")
    assert f"holds a run; continue it with `cfmae pretrain --resume {existing}`" in \
        _bad(["pretrain", "--out", str(existing)])
    assert (existing / "checkpoints" / "last.pt").read_bytes() == b"keep me"


def test_too_many_bad_files_stop_the_run(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_per_class=4)
    for stem in ("a_00", "a_01"):
        (data / "rgb" / "a" / f"{stem}.png").write_bytes(b"broken")
    out = _bad(["pretrain", "--data", str(data), "--out", str(tmp_path / "r")]
               + _sets("data.max_bad_fraction=0.1"))
    assert "could not be used, more than data.max_bad_fraction allows" in out
    assert "a_0" in (tmp_path / "r" / "bad_files.txt").read_text()


def test_real_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cfmae_cli", "pretrain", "--preset", "vitb-40e"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown preset 'vitb-40e'. Did you mean 'vitb-400e'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    ok = subprocess.run([sys.executable, "-m", "cfmae_cli", "--help"], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0 and "pretrain" in ok.stdout


def test_a_file_that_stays_broken_counts_once(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_per_class=4)
    (data / "rgb" / "b" / "b_03.png").write_bytes(b"broken")
    out = tmp_path / "r"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--epochs", "2"]
                           + _sets("data.max_bad_fraction=0.15"))  # 1 of 8 allowed, 2 epochs load it twice
    assert result.exit_code == 0, result.output
    lines = (out / "bad_files.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(data / "rgb" / "b" / "b_03.png"))


def test_inconsistent_config_is_refused_before_anything_is_written(tiny_data: Path, tmp_path: Path) -> None:
    out = _bad(["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / "w")]
               + _sets("masking.semantic_class_weights=[1.0, 2.0]"))
    assert "masking.semantic_class_weights: need 4 weights" in out
    assert not (tmp_path / "w").exists()
    assert "model.decoder.dim: 18 must be divisible by 4" in _bad(["pretrain", "--set", "model.decoder.dim=18",
                                                                    "--set", "model.decoder.num_heads=2"])
