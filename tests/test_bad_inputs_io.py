"""Faults of the machine, not of the data's content (issue 25): any OSError is one line naming the path (exit 2);
temporary names fit NAME_MAX for any valid name; a full disk during `label` names the output and leaves no
temporary file; malformed COCO annotations are named before training; a segmentation batch of one image
trains; a closed or ASCII-only stdout never stops training; workers end with their launcher."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.cli.common import os_error_line
from cfmae_cli.errors import DataError
from cfmae_cli.formats import NAME_MAX, atomic_write, fit_name, temporary_name
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]


def run(args: list[object], code: int) -> str:
    """cfmae ARGS must exit with ``code`` and no traceback; the output with its line breaks undone."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception,
                                                                                        SystemExit)), result.output
    return " ".join(result.output.split())


def photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


# -- 1: names at NAME_MAX, and every OSError one line --------------------------------------------------------
def test_temporary_names_fit_name_max_for_any_valid_name() -> None:
    for name in ("a" * 255, "é" * 127 + "a", "😀" * 63 + "abc", "photo.jpg", os.fsdecode(b"\xff" * 250 + b".png")):
        assert len(os.fsencode(name)) <= NAME_MAX
        for tag in ("tmp", f"tmp-{2**22}-{2**47}"):
            assert len(os.fsencode(temporary_name(name, tag))) <= NAME_MAX
        assert len(os.fsencode(fit_name(name, NAME_MAX - 14))) <= NAME_MAX - 14
    assert fit_name("a" * 250 + "1", 100) != fit_name("a" * 250 + "2", 100)  # a shared start stays apart
    assert temporary_name("photo.jpg", "tmp") == ".photo.jpg.tmp"


def test_atomic_write_names_its_target_and_leaves_nothing(tmp_path) -> None:
    target = tmp_path / ("b" * 255)
    atomic_write(target, lambda fh: fh.write("ok"))  # a 255-byte name is written
    assert target.read_text() == "ok"

    def full(fh) -> None:
        fh.write("x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")  # what a write on a full disk raises: no file named

    with pytest.raises(OSError) as caught:
        atomic_write(target, full)
    assert caught.value.filename == str(target) and target.read_text() == "ok"
    assert os.listdir(tmp_path) == [target.name]
    line = os_error_line(caught.value)
    assert line.startswith(f"{target}: No space left on device; free disk space on the disk mounted at "), line


@pytest.mark.parametrize("byte_name", [
    b"a" * 240 + b".png",  # 244 bytes
    "é".encode() * 125 + b"a.png",  # 255 bytes, two per character
    b"c" * 251 + b".jpg",  # 255 bytes
])
def test_a_source_photo_with_a_name_at_name_max_labels_and_resumes(tmp_path, byte_name) -> None:
    name = os.fsdecode(byte_name)
    src = photos(tmp_path / "src", [name, "short.png"])
    out = tmp_path / "data"
    text = run(["label", src, "--out", out, "--workers", "0"], 0)
    assert "labelled 2 image(s) now" in text
    assert (out / "rgb" / name).is_file() and not temporaries(out)
    assert "labelled 0 image(s) now, 2 were already done" in run(["label", src, "--out", out, "--workers", "0"], 0)


def test_any_os_error_is_one_line_naming_the_path(tmp_path, monkeypatch) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    src = photos(tmp_path / "src", ["x.png"])
    text = run(["label", src, "--out", a_file / "data", "--workers", "0"], 2)  # ENOTDIR
    assert text.startswith(f"error: {a_file}") and "not a folder" in text, text
    assert os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", str(a_file / "data"))) == (
        f"{a_file / 'data'}: Not a directory; {a_file} is a file, not a folder: give a path whose folders are folders.")
    text = run(["pretrain", "--preset", "p" * 300, *SETS], 2)  # ENAMETOOLONG: a preset name, not a file
    assert "p" * 300 in text, text
    assert "has 305 bytes, more than the 255" in os_error_line(
        OSError(errno.ENAMETOOLONG, "File name too long", f"/x/{'p' * 300}.yaml"))
    monkeypatch.setenv("CFMAE_CACHE", str(a_file))  # the demo data's cache is a file
    text = run(["pretrain", "--out", tmp_path / "run", *SETS], 2)
    assert f"{a_file}: a file, not a folder" in text and "CFMAE_CACHE" in text, text
    assert "no file named" in os_error_line(OSError(errno.EIO, "Input/output error"))
    assert os_error_line(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")).startswith(
        "/a → /b: Invalid cross-device link; check the path")


# -- 2: a full disk during `label` ----------------------------------------------------------------------------
def test_a_full_disk_during_label_names_the_output_removes_temporaries_and_resumes(tmp_path, monkeypatch) -> None:
    src = photos(tmp_path / "src" / "c", [f"{i:02d}.png" for i in range(12)]).parent
    photos(tmp_path / "src" / "c", ["13.jpg"])  # a copied original too (--rgb copy)
    out = tmp_path / "data"
    real = os.fdopen
    opened = {"files": 0}

    class Full:
        """A file on a disk that is full from the 21st file on: a write takes what fits, then fails with ENOSPC
        (naming no file, as a real one)."""

        def __init__(self, fh):
            self.fh = fh
            opened["files"] += 1

        def write(self, data):
            if opened["files"] > 20:
                self.fh.write(data[:100])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real(*a, **k)))
    text = run(["label", src, "--out", out, "--workers", "0", "--batch-size", "2"], 2).split("error: ")[1]
    assert text.startswith(f"{out}/") and "could not be written (No space left on device; the disk of" in text, text
    assert "run the same command again: it resumes" in text and str(src) not in text  # the output, not the source
    assert not temporaries(out)
    assert not (out / "label-errors.jsonl").exists()  # a write error is not an unreadable source
    monkeypatch.setattr(os, "fdopen", real)
    done = len((out / "meta" / "c.jsonl").read_text().splitlines())
    text = run(["label", src, "--out", out, "--workers", "0"], 0)
    assert done > 0 and f"{done} were already done" in text and "dataset: 13 image(s)" in text, text


def test_a_sidecar_line_cut_by_a_kill_does_not_swallow_the_next(tmp_path) -> None:
    src = photos(tmp_path / "src" / "c", ["a.png", "b.png", "c.png"]).parent
    out = tmp_path / "data"
    run(["label", src, "--out", out, "--workers", "0"], 0)
    sidecar = out / "meta" / "c.jsonl"
    lines = sidecar.read_text().splitlines(keepends=True)
    sidecar.write_text("".join(lines[:2]) + lines[2][:30])  # killed while it appended c's line
    (out / "cfmae-dataset.json").unlink()
    text = run(["label", src, "--out", out, "--workers", "0"], 0)
    assert "2 were already done; dataset: 3 image(s)" in text, text


# -- 3: bad annotations, a batch of one ----------------------------------------------------------------------
def coco_file(tmp_path: Path, annotations: list[dict]) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
            "categories": [{"id": 7, "name": "thing"}], "annotations": annotations}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path / "ann.json"


def test_malformed_coco_annotations_are_named_before_training(tmp_path, caplog) -> None:
    from cfmae_cli.eval.coco import CocoDetection, coco_ap, read_coco

    good = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12]]}
    for bad, what in (({"bbox": None}, "annotation 2 (image 1): no 'bbox'"),
                      ({"bbox": [1, 2, 3]}, "annotation 2 (image 1): 'bbox' is [1, 2, 3], not 4 numbers"),
                      ({"segmentation": None}, "annotation 2 (image 1): no 'segmentation'"),
                      ({"segmentation": {"counts": "abc", "size": [5, 5]}}, "annotation 2 (image 1): the RLE's size "
                                                                            "[5, 5] is not its image's [20, 30]"),
                      ({"segmentation": "x"}, "annotation 2 (image 1): 'segmentation' is str, not polygons")):
        ann = {**good, "id": 2, **bad}
        path = coco_file(tmp_path, [good, {k: v for k, v in ann.items() if v is not None}])
        with pytest.raises(DataError) as caught:
            read_coco(path, tmp_path / "img")
        assert str(caught.value).startswith(f"{path}: {what}"), str(caught.value)
    # a polygon of two points (a line, which pycocotools reads as a box and fails on) is left out, with a warning
    path = coco_file(tmp_path, [good, {**good, "id": 2, "segmentation": [[1, 2, 3, 4]]}, {**good, "id": 3,
                                                                                           "iscrowd": 0}])
    coco = read_coco(path, tmp_path / "img")
    assert [a["id"] for a in coco["annotations"]] == [1, 3] and "annotation 2 of image 1" in caplog.text
    assert coco["annotations"][0]["area"] > 0 and coco["annotations"][0]["iscrowd"] == 0  # completed for the AP
    item = CocoDetection(coco, train=True, hflip=0.0)[0]
    assert item["target"]["masks"].shape == (2, 20, 30)
    assert coco_ap(coco, [])["AP_box"] == 0.0


def test_a_segmentation_training_batch_of_one_image_trains(tmp_path) -> None:
    from cfmae_cli.config import EncoderArch
    from cfmae_cli.eval.segmentation import SegmentationTask, ViTSegmenter

    arch = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = ViTSegmenter(arch, 32, 3, [0, 0, 1, 1], channels=8).train()
    task = SegmentationTask.__new__(SegmentationTask)  # forward needs only the config's mean and std
    task.cfg = type("Cfg", (), {"data": type("Data", (), {"mean": (0.5,) * 3, "std": (0.25,) * 3})})()
    task.noted_single = False
    batch = {"rgb": torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8),
             "semantic": torch.randint(0, 3, (1, 32, 32))}
    torch.manual_seed(0)  # the head's dropout
    loss, values = task.forward(model, batch, None)
    loss.backward()
    assert torch.isfinite(loss) and task.noted_single
    torch.manual_seed(0)
    twice = {k: torch.cat([v, v]) for k, v in batch.items()}
    assert task.forward(model, twice, None)[0].item() == loss.item()  # what it trains on: the image twice


# -- 4: output streams ---------------------------------------------------------------------------------------
def test_a_closed_and_ascii_output_never_stops_training(tmp_path) -> None:
    """`PYTHONIOENCODING=ascii cfmae pretrain … | head -1`: the first print holding α (stdout) and the log (stderr)
    cannot encode it, and stdout's reader is gone after one line; training goes on to its checkpoint and exit 0."""
    data = make_dataset(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "ascii"}
    with (tmp_path / "stderr.txt").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cfmae_cli", "pretrain", "--data", str(data), "--out",
                                 str(tmp_path / "run"), "--epochs", "1", *SETS], env=env, stdout=subprocess.PIPE,
                                stderr=log, cwd=tmp_path)
        assert proc.stdout.readline()  # `| head -1`: one line, then the reader goes away
        proc.stdout.close()
        code = proc.wait(timeout=180)
    text = (tmp_path / "stderr.txt").read_text(encoding="ascii")
    assert code == 0 and (tmp_path / "run" / "checkpoints" / "last.pt").is_file(), text
    assert "?_I" in text and "Traceback" not in text  # α replaced, not fatal


# -- 5: workers end with their launcher ----------------------------------------------------------------------
def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_a_worker_of_a_launcher_killed_with_sigkill_ends_too(tmp_path) -> None:
    """The launcher's side as :func:`cfmae_cli.train.distributed.launch` sets it up (its PID in the workers'
    environment, the worker in a session of its own); the worker is the cfmae program."""
    worker = ("import sys, time\nfrom cfmae_cli.cli import main\nsys.argv = ['cfmae', '--version']\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nprint('ready', flush=True)\ntime.sleep(60)\n")
    launcher = ("import os, subprocess, sys, time\nos.environ['CFMAE_LAUNCHED_BY_PARENT'] = str(os.getpid())\n"
                f"child = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True, "
                "stdout=subprocess.PIPE)\nready = next((True for line in child.stdout if line == b'ready\\n'), False)\n"
                "print(child.pid if ready else 0, flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "WORLD_SIZE": "2"}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert child, "the worker did not start"
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            if not alive(child):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker outlived its launcher")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
