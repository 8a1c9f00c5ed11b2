"""`cfmae label` with the classical backend: layout, resume after a kill, bad inputs, preview."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.data.layout import list_samples, read_manifest
from cfmae_cli.labeling.classical import SEMANTIC_CLASSES
from cfmae_cli.labeling.demo import DEMO_PHOTOS, load_photo
from tests.conftest import TINY_OVERRIDES

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def photo_folder(root: Path, photos: int = 4, per_photo: int = 2, size: int = 96) -> Path:
    """Real photographs (scikit-image's), resized, one class folder per photo."""
    for name in DEMO_PHOTOS[:photos]:
        (root / name).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(load_photo(name))
        for i in range(per_photo):
            image.resize((size + 16 * i, size - 8 * i)).save(root / name / f"{name}_{i:02d}.jpg", quality=90)
    return root


def label(*args: str) -> str:
    result = runner.invoke(app, ["label", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_classical_labelling_writes_a_dataset_that_pretrain_trains_on(tmp_path: Path) -> None:
    src = photo_folder(tmp_path / "src")
    data = tmp_path / "data"
    out = label(str(src), "--out", str(data), "--workers", "0", "--preview", "3")
    assert out.strip().splitlines()[-1] == f"Dataset: {data}"
    samples, classes = list_samples(data)
    assert len(samples) == 8 and classes == list(DEMO_PHOTOS[:4])
    for s in samples:  # maps have the RGB image's size
        size = Image.open(s.rgb).size
        assert Image.open(s.maps["instance"]).size == size == Image.open(s.maps["semantic"]).size
        assert np.asarray(Image.open(s.maps["semantic"])).max() < len(SEMANTIC_CLASSES)
    manifest = read_manifest(data)
    assert manifest["semantic_classes"] == SEMANTIC_CLASSES and manifest["counts"]["images"] == 8
    assert manifest["labelling"]["instance"]["backend"] == "classical"
    sidecar = [json.loads(x) for x in (data / "meta" / "astronaut.jsonl").read_text().splitlines()]
    assert [r["stem"] for r in sidecar] == ["astronaut_00", "astronaut_01"] and sidecar[0]["width"] == 96
    assert Image.open(data / "preview.png").size[0] > 3 * 192
    sets = []
    for item in TINY_OVERRIDES:
        sets += ["--set", item]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                 *sets])
    assert result.exit_code == 0, result.output


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_run_finishes_identically_and_labels_nothing_twice(tmp_path: Path) -> None:
    src = photo_folder(tmp_path / "src", photos=8, per_photo=4, size=128)  # 32 images
    label(str(src), "--out", str(tmp_path / "whole"), "--workers", "0", "--batch-size", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cfmae_cli", "label", str(src), "--out", str(killed),
                             "--workers", "0", "--batch-size", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in (killed / "meta").glob("*.jsonl")) \
            if (killed / "meta").exists() else 0
        if lines >= 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "cfmae-dataset.json").exists()  # not complete: no manifest
    done_before = sum(len(p.read_text().splitlines()) for p in (killed / "meta").glob("*.jsonl"))
    assert 10 <= done_before < 32
    out = label(str(src), "--out", str(killed), "--workers", "0", "--batch-size", "1")
    match = re.search(r"labelled (\d+) image\(s\) now, (\d+) were already done", out)
    assert match, out
    now, already = int(match[1]), int(match[2])
    assert now + already == 32 and already >= done_before - 1  # a line cut by the kill is redone, nothing else
    assert _tree(killed) == _tree(tmp_path / "whole")


def test_bad_inputs_are_listed_or_converted_never_a_traceback(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    photo = load_photo("coffee")
    Image.fromarray(photo).resize((80, 64)).save(src / "good.jpg")
    Image.fromarray(photo).resize((80, 64)).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(photo).resize((80, 64)).convert("L").save(src / "grey.png")
    Image.fromarray(photo).resize((80, 64)).convert("RGBA").save(src / "alpha.png")
    Image.fromarray((photo[..., 0].astype(np.uint16) * 257)[:64, :80]).save(src / "deep.png")  # 16-bit
    (src / "notes.txt").write_text("not an image")
    (src / "fake.jpg").write_bytes(b"this is not a jpeg")
    full = (src / "good.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(full[: len(full) // 2])
    data = tmp_path / "data"
    label(str(src), "--out", str(data), "--workers", "0")
    errors = {Path(e["path"]).name: e["error"] for e in map(json.loads, (data / "label-errors.jsonl").read_text()
                                                            .splitlines())}
    assert set(errors) == {"fake.jpg", "cut.jpg"}
    assert "truncated" in errors["cut.jpg"] or "OSError" in errors["cut.jpg"]
    samples, _ = list_samples(data)
    assert sorted(s.rgb.name for s in samples) == ["alpha.png", "cmyk.jpg", "deep.png", "good.jpg", "grey.png"]
    deep = Image.open(data / "rgb" / "deep.png")
    assert deep.mode == "RGB" and np.asarray(deep).max() > 100  # rescaled to 8 bits, not clipped white
    assert read_manifest(data)["counts"] == {"images": 5, "classes": 0, "errors": 2}


def test_empty_folder_and_bad_options_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args, message in [
        (["label", str(tmp_path / "empty"), "--out", str(tmp_path / "d")], "no images found"),
        (["label", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], "nope: folder not found"),
        (["label", str(tmp_path / "empty"), "--out", str(tmp_path / "d"), "--instance", "sam"],
         "--instance sam: choose classical or grounded-sam"),
        (["label", str(tmp_path / "empty"), "--out", str(tmp_path / "d"), "--instance", "grounded-sam"],
         "needs --detector-model"),
    ]:
        if "grounded-sam" in args:
            photo_folder(tmp_path / "empty", photos=1, per_photo=1)
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_two_processes_shard_the_images_and_write_the_same_dataset(tmp_path: Path) -> None:
    src = photo_folder(tmp_path / "src", photos=3, per_photo=3)
    label(str(src), "--out", str(tmp_path / "one"), "--workers", "0")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cfmae_cli", "label", str(src), "--out", str(tmp_path / "two"),
                           "--gpus", "0", "--procs", "2", "--workers", "0"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"Dataset: {tmp_path / 'two'}"
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
