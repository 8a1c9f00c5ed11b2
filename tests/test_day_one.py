"""What a researcher meets on day one (issue #18): the demo preset on their data is named, a warmup longer
than the run is flagged, a finished run is left alone, a run folder says how it was made, exports carry a
model card and load as the docs say, and one vocabulary works across the commands (old spellings too)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.formats import FILE_MODE
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()
SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]


def run(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("day1")
    data = make_dataset(root / "data", n_per_class=4)
    out = run("pretrain", "--data", data, "--out", root / "run", *SETS, "--set", "train.epochs=1")
    return {"root": root, "data": data, "run": root / "run", "output": out}


def test_the_demo_preset_on_your_data_is_named_and_a_long_warmup_is_flagged(made) -> None:
    assert "--data without --preset trains the 'demo' preset" in made["output"]
    assert "--preset vitb-400e" in made["output"]
    log = (made["run"] / "log.txt").read_text()
    assert "optim.warmup_epochs 1 is not shorter than train.epochs 1: the lr never leaves its warmup" in log


def test_the_run_folder_says_how_it_was_made_and_how_it_ended(made) -> None:
    sessions = json.loads((made["run"] / "run.json").read_text())["sessions"]
    assert len(sessions) == 1
    s = sessions[0]
    assert s["command"] == "pretrain" and s["argv"][:2] == ["cfmae", "pretrain"] and "--data" in s["argv"]
    assert s["versions"]["torch"] == torch.__version__ and s["world_size"] == 1 and s["devices"]
    manifest = made["data"] / "cfmae-dataset.json"
    assert s["data"] == {"root": str(made["data"].resolve()), "manifest": "cfmae-dataset.json",
                         "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    last = [r for r in map(json.loads, (made["run"] / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "epoch"][-1]
    assert s["outcome"] == "done" and f"last epoch loss {last['loss']:.4f}" in s["reason"]
    assert (made["run"] / "log.txt").read_text().splitlines()[-1].split(": ", 1)[1].startswith("done: 1 epochs")


def test_a_failed_run_says_failed_with_the_reason(made, tmp_path, monkeypatch) -> None:
    import cfmae_cli.model.losses as losses

    real = losses.image_loss
    monkeypatch.setattr(losses, "image_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    result = runner.invoke(app, ["pretrain", "--data", str(made["data"]), "--out", str(tmp_path / "r"), *SETS])
    assert result.exit_code == 1
    s = json.loads((tmp_path / "r" / "run.json").read_text())["sessions"][-1]
    assert s["outcome"] == "failed" and "non-finite loss at step 1" in s["reason"]
    assert "failed: non-finite loss at step 1" in (tmp_path / "r" / "log.txt").read_text().splitlines()[-1]


def test_resuming_a_finished_run_says_so_and_touches_nothing(made, tmp_path) -> None:
    folder = shutil.copytree(made["run"], tmp_path / "run")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    out = run("pretrain", "--resume", folder)
    assert f"{folder}: the run is complete (1 of 1 epochs); nothing to do" in out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_an_export_has_a_model_card_usual_file_modes_and_loads_as_the_docs_say(made, tmp_path) -> None:
    import timm

    out = tmp_path / "export"
    run("export", "-c", made["run"], "--out", out)
    card = (out / "README.md").read_text()
    assert "CFMAE" in card and str(made["data"]) in card and "timm.create_model(" in card
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (out / name).stat().st_mode & 0o777 == FILE_MODE
    cfg = json.loads((out / "config.json").read_text())
    encoder = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,  # docs/export.md, as written
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0),
                                **cfg["model_args"])
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=1000,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0),
                              **cfg["model_args"])
    assert model.head.out_features == 1000
    x = torch.randn(1, 3, cfg["model_args"]["img_size"], cfg["model_args"]["img_size"])
    assert torch.equal(encoder.forward_features(x), model.forward_features(x))  # the same encoder weights


def test_old_spellings_still_work(made, tmp_path) -> None:
    ckpt = made["run"] / "checkpoints" / "last.pt"
    a = runner.invoke(app, ["pretrain", "--data", str(made["data"]), "--out", str(tmp_path / "a"), "--init",
                            str(ckpt), *SETS, "--set", "train.epochs=1"])
    b = runner.invoke(app, ["pretrain", "--data", str(made["data"]), "--out", str(tmp_path / "b"), "-c",
                            str(ckpt), *SETS, "--set", "train.epochs=1"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert "initialised from" in (tmp_path / "a" / "log.txt").read_text()
    steps = [[r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "step"] for n in "ab"]
    assert steps[0] == steps[1]  # --init and --checkpoint: the same run
    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(photo)
    for flags in (["--modality", "rgb"], ["--modalities", "rgb", "--gpus", "0"]):
        out = tmp_path / f"g{len(flags)}.png"
        run("reconstruct", photo, "-c", made["run"], "--out", out, *flags)
        assert out.exists()
    result = runner.invoke(app, ["export", str(made["run"]), "-c", str(made["run"]), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "give the checkpoint once" in result.output
