"""Bad input and faults, as a new user meets them (issue #17): every case ends with one clear line and exit
code 2 (no traceback) that names the bad file or key, and nothing the user already had is changed.

Cases already checked elsewhere, kept there: bad samples (maps of another size, ids out of range,
unreadable images) in test_data.py; CMYK / 16-bit / RGBA / non-UTF-8 names and truncated / empty /
duplicate-stem sources in test_label_pipeline.py; model folders and backends in test_label_backends.py;
eval-robustness heads, checkpoints, datasets and folders in test_robustness.py; reconstruct's classifier
checkpoint and --modality in test_viz.py; --init of another width in test_export.py; a truncated last.pt
in test_resume.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()
SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its md5: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): md5(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def bad(args: list[str], *names: str, code: int = 2) -> str:
    """Run cfmae ARGS; it must exit with ``code``, without a traceback, on a message that holds every one of
    ``names``; returns the output with its line breaks undone."""
    result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception,
                                                                                        SystemExit), result.output
    for name in names:
        assert " ".join(str(name).split()) in text, (name, result.output)
    return text


def ok(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """8 labelled images, a tiny one-epoch pre-training run (checkpoints/epoch-0001.pt and last.pt) and a
    photo; tests copy what they damage."""
    root = tmp_path_factory.mktemp("bad")
    data = make_dataset(root / "data", n_per_class=4)
    ok(["pretrain", "--data", data, "--out", root / "run", "--epochs", "1", *SETS])
    photo = root / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(photo)
    return {"root": root, "data": data, "run": root / "run", "photo": photo}


def copy_run(world: dict[str, Path], to: Path) -> Path:
    shutil.copytree(world["run"], to)
    return to


# -- 1-3: nothing a user owns is ever replaced ---------------------------------------------------------------
def test_reconstruct_and_attention_map_never_write_over_an_input_or_a_foreign_file(world, tmp_path) -> None:
    photo = tmp_path / "img.png"
    shutil.copy(world["photo"], photo)
    before = md5(photo)
    ckpt = ["--checkpoint", world["run"]]
    bad(["reconstruct", photo, "--out", photo, *ckpt], f"--out {photo}", "input of this command")
    bad(["attention-map", photo, "--out", photo, *ckpt], f"--out {photo}", "input of this command")
    foreign = tmp_path / "holiday.png"
    shutil.copy(world["photo"], foreign)
    bad(["reconstruct", photo, "--out", foreign, *ckpt], f"--out {foreign}", "not written by cfmae")
    (tmp_path / "grid.json").write_text('{"mine": 1}\n')  # the JSON written beside the grid
    bad(["reconstruct", photo, "--out", tmp_path / "grid.png", *ckpt], "grid.json", "not written by cfmae")
    bad(["attention-map", photo, "--out", tmp_path, *ckpt], "a folder; give a file name")
    assert md5(photo) == before and md5(foreign) == md5(world["photo"])
    assert (tmp_path / "grid.json").read_text() == '{"mine": 1}\n' and not (tmp_path / "grid.png").exists()
    out = tmp_path / "ours.png"
    ok(["reconstruct", photo, "--out", out, "--num-visible", "4", *ckpt])
    first = md5(out)
    ok(["reconstruct", photo, "--out", out, "--num-visible", "4", "--seed", "1", *ckpt])  # ours: replaced
    assert md5(out) != first and json.loads(out.with_suffix(".json").read_text())["tool"].startswith("cfmae")
    assert Image.open(out).info["Software"].startswith("cfmae")


def test_bench_refuses_a_foreign_json(tmp_path) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"mine": 1}\n')
    bad(["bench", "--device", "cpu", "--what", "masks", "--out", report], f"--out {report}", "not written by cfmae")
    assert report.read_text() == '{"mine": 1}\n'


def test_label_reruns_resume_only_the_same_source_and_settings(world, tmp_path) -> None:
    sources = {}
    for name, seed in (("a", 1), ("b", 2)):
        sources[name] = tmp_path / name
        make_dataset(tmp_path / f"made-{name}", n_per_class=2, seed=seed)
        shutil.copytree(tmp_path / f"made-{name}" / "rgb", sources[name])
    data = tmp_path / "DATA"
    ok(["label", sources["a"], "--out", data, "--workers", "0"])
    made = tree(data)
    bad(["label", sources["b"], "--out", data, "--workers", "0"], f"--out {data}", "another source",
        f"source '{sources['a'].resolve()}' → '{sources['b'].resolve()}'")
    bad(["label", sources["a"], "--out", data, "--workers", "0", "--rgb", "symlink"], "rgb 'copy' → 'symlink'")
    assert tree(data) == made
    assert "resuming the labelling" in ok(["label", sources["a"], "--out", data, "--workers", "0"])
    assert tree(data) == made  # a finished dataset, rerun: the same files, byte for byte
    manifest = json.loads((data / "cfmae-dataset.json").read_text())
    assert manifest["labelling"]["settings"]["source"] == str(sources["a"].resolve())
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    bad(["label", sources["a"], "--out", foreign, "--workers", "0"], "notes.txt", "not a cfmae dataset")
    assert tree(foreign) == {"notes.txt": md5(foreign / "notes.txt")}
    flat = tmp_path / "flat"
    shutil.copytree(sources["a"] / "a", flat)
    bad(["label", flat, "--out", flat / "labels", "--workers", "0"], f"--out {flat / 'labels'}",
        "inside the source folder")
    assert not (flat / "labels").exists()


def test_export_goes_into_a_new_folder_or_over_its_own_export_only(world, tmp_path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"their": "config"}\n')
    bad(["export", world["run"], "--out", out], f"--out {out}", "not a cfmae export", "config.json")
    assert (out / "config.json").read_text() == '{"their": "config"}\n' and len(list(out.iterdir())) == 1
    export = tmp_path / "export"
    ok(["export", world["run"], "--out", export])
    assert "replaced the export that was there" in ok(["export", world["run"], "--out", export])
    (export / "notes.txt").write_text("mine")
    bad(["export", world["run"], "--out", export], "notes.txt")


# -- 4-8: one clear line -------------------------------------------------------------------------------------
def test_packed_data_with_a_missing_shard_file_stops_before_training(world, tmp_path) -> None:
    packed = tmp_path / "packed"
    ok(["pack", world["data"], "--out", packed, "--size", "48", "--shard-size", "4", "--workers", "1"])
    missing = packed / "shard-00001.instance.npy"
    missing.unlink()
    bad(["pretrain", "--data", packed, "--out", tmp_path / "r", "--epochs", "1", *SETS], str(missing), "missing")
    assert not (tmp_path / "r").exists()


def test_a_full_disk_during_pack_names_the_file_and_leaves_nothing_that_blocks_the_rerun(world, tmp_path,
                                                                                        monkeypatch) -> None:
    import cfmae_cli.data.packed as packed_mod

    real = packed_mod.atomic_write

    def full(path, *args, **kwargs):
        if Path(path).name == "shard-00001.jpg.bin":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(packed_mod, "atomic_write", full)  # shards are written in a forked worker
    out = tmp_path / "packed"
    bad(["pack", world["data"], "--out", out, "--size", "48", "--shard-size", "4", "--workers", "1"],
        "shard-00001.jpg.bin", "No space left on device", "run `cfmae pack` again")
    assert not out.exists()  # made by this pack: removed, with no .tmp or partial shard left in it
    monkeypatch.setattr(packed_mod, "atomic_write", real)
    ok(["pack", world["data"], "--out", out, "--size", "48", "--shard-size", "4", "--workers", "1"])


@pytest.mark.parametrize("kind", ["empty", "random", "pickle-garbage"])
def test_a_damaged_weights_file_is_named_without_unsafe_advice(world, tmp_path, kind) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes({"empty": b"", "random": np.random.default_rng(0).bytes(5000),
                      "pickle-garbage": b"\x80\x02garbage"}[kind])
    why = {"empty": "the file is empty", "random": "not a file written by torch.save",
           "pickle-garbage": "the file is damaged"}[kind]
    for args in (["pretrain", "--init", path, "--data", world["data"], "--out", tmp_path / "r", *SETS],
                 ["export", path, "--out", tmp_path / "x"],
                 ["finetune", "--checkpoint", path, "--data", world["data"], "--out", tmp_path / "f",
                  "--set", "data.val_fraction=0.5", "--set", "data.num_workers=0"]):
        text = bad(args, f"{path}: {why}")
        assert "weights_only" not in text and not (tmp_path / "r").exists() and not (tmp_path / "f").exists()


def test_an_empty_last_pt_on_resume_offers_the_periodic_checkpoint(world, tmp_path) -> None:
    run = copy_run(world, tmp_path / "run")
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    bad(["pretrain", "--resume", run], f"{run / 'checkpoints' / 'last.pt'}: the file is empty",
        f"--resume {run / 'checkpoints' / 'epoch-0001.pt'}")


def test_resume_of_a_run_of_the_other_command_names_the_command(world, tmp_path) -> None:
    ft = tmp_path / "ft"
    ok(["finetune", "--checkpoint", world["run"], "--data", world["data"], "--out", ft, "--epochs", "1",
        "--set", "data.val_fraction=0.5", "--set", "data.num_workers=0", "--set", "train.batch_size=4",
        "--set", "optim.effective_batch=4"])
    text = bad(["pretrain", "--resume", ft], "a run of `cfmae finetune`, not of `cfmae pretrain`",
               f"`cfmae finetune --resume {ft}`")
    assert "unknown key" not in text
    bad(["finetune", "--resume", world["run"]], "a run of `cfmae pretrain`, not of `cfmae finetune`")


def test_paths_that_are_files_or_halves(world, tmp_path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    bad(["pretrain", "--data", afile], f"--data {afile}: a file, not a folder")
    text = bad(["pretrain", "--data", world["data"], "--out", afile, *SETS], f"--out {afile}: a file, not a folder")
    assert "--resume" not in text and afile.read_text() == "x"
    half = tmp_path / "half"
    shutil.copytree(world["data"], half / "train")
    bad(["finetune", "--data", half, "--checkpoint", "random"], f"{half}: has train/ but no val/ folder")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    bad(["pretrain", "--preset", empty], f"{empty}: the preset file is empty")


def test_a_symlink_loop_in_the_data_is_named(world, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    loop = data / "rgb" / "a" / "loopy.png"
    loop.symlink_to(loop)
    bad(["pretrain", "--data", data, "--out", tmp_path / "r", *SETS], str(loop), "loops")
    bad(["pack", data, "--out", tmp_path / "p"], str(loop))


def test_a_read_only_output_is_one_line_naming_it(world, tmp_path, monkeypatch) -> None:
    import cfmae_cli.formats as formats

    real = formats.tempfile.mkstemp
    locked = tmp_path / "locked"

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(locked))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(formats.tempfile, "mkstemp", mkstemp)
    text = bad(["reconstruct", world["photo"], "--checkpoint", world["run"], "--out", locked / "grid.png"],
               f"{locked}: Permission denied", "choose a writable place")
    assert "OSError" not in text


def test_weights_of_another_head_size_for_eval_robustness(tmp_path) -> None:
    import timm

    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=1).state_dict(), weights)
    (tmp_path / "ood" / "imagenet-sketch").mkdir(parents=True)
    text = bad(["eval-robustness", "--model", "vit_tiny_patch16_224", "--checkpoint", weights, "--root",
                tmp_path / "ood", "--datasets", "sketch"], str(weights))
    assert "head.weight: the file has [10, 192], the model [1000, 192]" in text, text


def test_procs_that_cannot_split_the_batch_say_so_once_before_launching(world, tmp_path) -> None:
    text = bad(["pretrain", "--data", world["data"], "--gpus", "0", "--procs", "3", "--out", tmp_path / "r", *SETS],
               "optim.effective_batch: 4 is not a multiple of train.batch_size x devices = 4 x 3 = 12")
    assert text.count("is not a multiple") == 1 and "launching" not in text and not (tmp_path / "r").exists()


def test_a_name_with_square_brackets_is_printed_as_it_is(world, tmp_path) -> None:
    bad(["reconstruct", tmp_path / "img[bold].png", "--checkpoint", world["run"]], "img[bold].png: image not found")


# -- 9: no half-made run folder, no --resume that cannot work ------------------------------------------------
def test_a_run_that_fails_in_its_set_up_leaves_no_folder(world, tmp_path, monkeypatch) -> None:
    import cfmae_cli.train.engine as engine

    def broken(*args, **kwargs):
        raise RuntimeError("a fault in the set-up")

    monkeypatch.setattr(engine.Engine, "__init__", broken)
    bad(["pretrain", "--data", world["data"], "--out", tmp_path / "r", *SETS], "a fault in the set-up", code=1)
    assert not (tmp_path / "r").exists()


def test_an_out_holding_a_run_without_checkpoints_is_reused_and_no_resume_is_offered(world, tmp_path,
                                                                                     monkeypatch) -> None:
    import cfmae_cli.checkpoints as ckpt

    out = tmp_path / "r"
    real = ckpt.atomic_write

    def full(path, *args, **kwargs):
        if Path(path).suffix == ".pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "atomic_write", full)
    text = bad(["pretrain", "--data", world["data"], "--out", out, "--epochs", "1", *SETS], "could not write the "
               "checkpoint", "run the same command again", code=1)
    assert "--resume" not in text and (out / "config.yaml").exists() and not list(out.rglob("*.pt"))
    monkeypatch.setattr(ckpt, "atomic_write", real)
    ok(["pretrain", "--data", world["data"], "--out", out, "--epochs", "1", *SETS])  # the same --out again
    assert (out / "checkpoints" / "last.pt").exists()
    bad(["pretrain", "--data", world["data"], "--out", out, *SETS], f"continue it with `cfmae pretrain --resume {out}`")


# -- 10: huge images -----------------------------------------------------------------------------------------
def test_a_huge_image_is_read_small_without_a_bomb_warning_and_a_bigger_one_is_refused(world, tmp_path,
                                                                                       monkeypatch) -> None:
    import cfmae_cli.data.layout as layout
    from cfmae_cli.data.layout import read_image

    big = tmp_path / "big.jpg"
    Image.fromarray((np.random.default_rng(0).random((1200, 1600, 3)) * 255).astype(np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 1.9 MP counts as huge here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, _ = read_image(big, short_side=64)
        full, _ = read_image(big)
    assert 64 <= min(image.shape[:2]) < 128 and full.shape == (1200, 1600, 3)
    small = np.asarray(Image.fromarray(full).resize(image.shape[1::-1], Image.BOX)).astype(int)
    assert np.abs(small - image).mean() < 8  # the same picture, smaller
    text = ok(["reconstruct", big, "--checkpoint", world["run"], "--out", tmp_path / "g.png"])
    assert "1600x1200 is large; read at" in text and "DecompressionBomb" not in text
    monkeypatch.setattr(layout, "MAX_PIXELS", 1_000_000)
    bad(["reconstruct", big, "--checkpoint", world["run"], "--out", tmp_path / "g2.png"], str(big),
        "1600x1200 = 2 MP, above the 1 MP cfmae reads")


# -- 11: a diverged run keeps the last good weights ----------------------------------------------------------
def test_an_exploding_then_diverging_run_keeps_the_checkpoint_from_before_the_explosion(world, tmp_path,
                                                                                       monkeypatch) -> None:
    import cfmae_cli.model.losses as losses

    calls = {"n": 0}
    real = losses.image_loss

    def exploding(*args, **kwargs):  # 2 micro-batches an epoch: epoch 3 explodes, epoch 4 is NaN
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * 1e6 if calls["n"] in (5, 6) else loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(losses, "image_loss", exploding)
    out = tmp_path / "r"
    text = bad(["pretrain", "--data", world["data"], "--out", out, "--epochs", "5", *SETS,
                "--set", "train.keep_last=5"], "non-finite loss at step 7", code=1)
    folder = out / "checkpoints"
    assert f"The last good checkpoint is {folder / 'epoch-0001.pt'} (step 2), copied to {folder / 'last.pt'}" in text
    assert "epoch-0002.pt" in text and "epoch-0003.pt" in text
    assert sorted(p.name for p in folder.glob("*.pt")) == ["epoch-0001.pt", "last.pt"]
    assert sorted(p.name for p in (folder / "diverged").iterdir()) == ["epoch-0002.pt", "epoch-0003.pt", "last.pt"]
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2


# -- already clean: keep them so -----------------------------------------------------------------------------
def _preset(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


CLEAN: dict[str, tuple[Callable[[dict, Path], list], list[str]]] = {
    "unknown preset": (lambda w, t: ["pretrain", "--preset", "vitb-400"], ["unknown preset 'vitb-400'",
                                                                           "Did you mean 'vitb-400e'"]),
    "typo'd key": (lambda w, t: ["pretrain", "--set", "optim.base_lrr=1"], ["did you mean 'optim.base_lr'"]),
    "wrong type": (lambda w, t: ["pretrain", "--set", "train.epochs=many"], ["train.epochs"]),
    "negative": (lambda w, t: ["pretrain", "--set", "train.epochs=-1"], ["train.epochs"]),
    "NaN": (lambda w, t: ["pretrain", "--set", "optim.base_lr=nan"], ["optim.base_lr"]),
    "YAML syntax": (lambda w, t: ["pretrain", "--preset", _preset(t, "p.yaml", "train: [1, 2\n")],
                    ["p.yaml: not readable as YAML"]),
    "malformed --set": (lambda w, t: ["pretrain", "--set", "train.epochs"], ["train.epochs"]),
    "num_visible above the tokens": (lambda w, t: ["pretrain", "--set", "masking.num_visible=100000"],
                                     ["masking.num_visible"]),
    "unknown modality": (lambda w, t: ["pretrain", "--set", "data.modalities=[rgb,depthx]"], ["depthx"]),
    "base loop": (lambda w, t: ["pretrain", "--preset", _loop(t)], ["loops"]),
    "--gpus 1 without a GPU": (lambda w, t: ["pretrain", "--gpus", "1", "--data", w["data"], *SETS],
                               ["--gpus 1"]),
    "empty data folder": (lambda w, t: ["pretrain", "--data", (t / "e").mkdir() or t / "e", *SETS],
                          ["no 'rgb' folder"]),
    "no manifest": (lambda w, t: ["pretrain", "--data", _no_manifest(w, t), *SETS],
                    ["cfmae-dataset.json: missing dataset manifest"]),
    "fewer images than a batch": (lambda w, t: ["pretrain", "--data", w["data"], "--out", t / "r", *SETS,
                                                "--set", "train.batch_size=16", "--set", "optim.effective_batch=16"],
                                  ["fewer than one optimizer step", "train.batch_size 16 x 1 process(es)",
                                   "give --set train.batch_size=2 --set optim.effective_batch=2"]),
    "images without maps": (lambda w, t: ["pretrain", "--data", _without_map(w, t), "--out", t / "r", *SETS],
                            ["a_01.png (no instance map"]),
    "resume a missing run": (lambda w, t: ["pretrain", "--resume", t / "nope"], ["nope"]),
    "resume with --out": (lambda w, t: ["pretrain", "--resume", w["run"], "--out", t / "x"], ["--resume"]),
    "resume with changed keys": (lambda w, t: ["pretrain", "--resume", w["run"], "--set", "model.depth=3"],
                                 ["model.depth"]),
    "--init of a pickled object": (lambda w, t: ["pretrain", "--init", _pickled(t), "--data", w["data"], *SETS],
                                   ["holds Python objects besides tensors"]),
    "--init of a dict without weights": (lambda w, t: ["pretrain", "--init", _no_weights(t), "--data", w["data"],
                                                       *SETS], ["noweights.pt"]),
    "reconstruct a missing file": (lambda w, t: ["reconstruct", t / "none.jpg", "--checkpoint", w["run"]],
                                   ["none.jpg: image not found"]),
    "reconstruct a non-image": (lambda w, t: ["reconstruct", _preset(t, "text.jpg", "hello"), "--checkpoint",
                                              w["run"]], ["text.jpg: not a readable image"]),
    "reconstruct --layer": (lambda w, t: ["attention-map", w["photo"], "--checkpoint", w["run"], "--layer", "9"],
                            ["--layer 9"]),
    "reconstruct --head": (lambda w, t: ["attention-map", w["photo"], "--checkpoint", w["run"], "--head", "7"],
                           ["--head 7"]),
    "label an unknown backend": (lambda w, t: ["label", w["root"], "--out", t / "d", "--semantic", "sam"],
                                 ["--semantic sam"]),
    "pack into a non-empty folder": (lambda w, t: ["pack", w["data"], "--out", w["root"]], ["not empty"]),
    "pack without a manifest": (lambda w, t: ["pack", _no_manifest(w, t), "--out", t / "p"],
                                ["cfmae-dataset.json"]),
    "bench without CUDA": (lambda w, t: ["bench", "--device", "cuda"], ["--device cuda: no GPU"]),
    "bench --what": (lambda w, t: ["bench", "--what", "speed"], ["--what speed"]),
}


def _loop(tmp_path: Path) -> Path:
    _preset(tmp_path, "b.yaml", f"base: {tmp_path / 'a.yaml'}\n")
    return _preset(tmp_path, "a.yaml", f"base: {tmp_path / 'b.yaml'}\n")


def _no_manifest(world: dict, tmp_path: Path) -> Path:
    data = tmp_path / "nomanifest"
    if not data.exists():
        shutil.copytree(world["data"], data)
        (data / "cfmae-dataset.json").unlink()
    return data


def _without_map(world: dict, tmp_path: Path) -> Path:
    data = tmp_path / "nomap"
    shutil.copytree(world["data"], data)
    (data / "instance" / "a" / "a_01.png").unlink()
    return data


def _pickled(tmp_path: Path) -> Path:
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    return tmp_path / "pickled.pt"


def _no_weights(tmp_path: Path) -> Path:
    torch.save({"epoch": 3}, tmp_path / "noweights.pt")
    return tmp_path / "noweights.pt"


@pytest.mark.parametrize("case", list(CLEAN))
def test_already_clean(world, tmp_path, case, monkeypatch) -> None:
    if case == "--gpus 1 without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    if case == "bench without CUDA" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    make, names = CLEAN[case]
    bad(make(world, tmp_path), *names)
    assert not (tmp_path / "r").exists()


def test_a_folder_of_photos_points_to_label_and_a_refused_run_leaves_no_runs_folder(world, tmp_path,
                                                                                    monkeypatch) -> None:
    """Issue 26: a raw photo folder is not a dataset: the message says how it becomes one. A bad --checkpoint is
    refused before the (demo) data is built, and neither leaves `runs/` behind in the working folder."""
    photos = tmp_path / "photos"
    (photos / "cats").mkdir(parents=True)
    shutil.copy(world["photo"], photos / "cats" / "tom.png")
    monkeypatch.chdir(tmp_path)
    bad(["pretrain", "--data", photos, *SETS], f"{photos}: a folder of photos (1 image(s), e.g. cats/tom.png)",
        f"cfmae label {photos} --out {tmp_path / 'photos-cfmae'}")
    import cfmae_cli.labeling.demo as demo

    monkeypatch.setattr(demo, "build_demo_dataset", lambda *a, **k: pytest.fail("the demo data was built"))
    bad(["pretrain", "--checkpoint", tmp_path / "nonexistent.pt"], f"--checkpoint {tmp_path / 'nonexistent.pt'}: "
        f"checkpoint not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no runs/pretrain left by either


def test_the_advice_for_too_few_images_works(world, tmp_path) -> None:
    """Issue 26: the advice of a "too few images" message failed again. The values it gives make a run."""
    import re

    text = bad(["pretrain", "--data", world["data"], "--out", tmp_path / "r", *SETS, "--set", "train.batch_size=16",
                "--set", "optim.effective_batch=16"], "fewer than one optimizer step")
    advice = re.search(r"give (--set \S+ --set \S+)", text).group(1).split()
    ok(["pretrain", "--data", world["data"], "--out", tmp_path / "r2", "--epochs", "1", *SETS, *advice])
