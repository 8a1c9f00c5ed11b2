"""Sizes in stored configs are checked before memory is spent: an absurd architecture (dim 8192, depth 400) is
refused in one line, exit 2, before torch is imported or a model built; every published ViT passes; a config
that lies about its tensors is refused; the parameter estimate agrees with the models that are built."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli import config_sizes as config_module  # machine_memory lives there
from cfmae_cli.checkpoints import TensorShape, peek_checkpoint, save_checkpoint
from cfmae_cli.cli import app
from cfmae_cli.config import (ConfigError, check_config_sizes, check_weights_file, load_config, pretrain_parameters)
from cfmae_cli.errors import CfmaeError
from cfmae_cli.model import CFMAE
from tests.conftest import tiny_config

runner = CliRunner()
GiB = 1 << 30


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def checkpoint(path: Path, *sets: str, **model: object) -> Path:
    """A tiny pre-training checkpoint (the tensors of TINY_OVERRIDES) whose stored config's model section says
    ``model`` (e.g. embed_dim=8192, depth=400): a small file that describes a huge model."""
    cfg = tiny_config(*sets)
    torch.manual_seed(0)
    raw = cfg.model_dump(mode="json")
    raw["model"].update(model)
    save_checkpoint(path, {"model": CFMAE.from_config(cfg, 3).state_dict(), "config": raw, "semantic_classes": ["a", "b", "c"],
                           "task": "pretrain", "epoch": 1, "step": 2})
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("big") / "BIG.pt", embed_dim=8192, depth=400, num_heads=64)


def test_export_of_a_small_file_that_says_dim_8192_depth_400_is_refused_at_once(big: Path, tmp_path: Path) -> None:
    """`cfmae export` in its own process: exit 2, one line naming the file, the key and the size, well under
    500 MB and without importing torch (whose import alone is hundreds of MB); --out is not made."""
    out = tmp_path / "X"
    probe = ("import json, resource, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             f"r = subprocess.run([sys.executable, '-m', 'cfmae_cli', 'export', {str(big)!r}, '--out', {str(out)!r}],"
             " capture_output=True, text=True)\n"
             "print(json.dumps({'code': r.returncode, 'out': r.stdout + r.stderr, 'wall': time.perf_counter() - t,"
             " 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    measured = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         check=True).stdout)
    text = " ".join(measured["out"].split())
    assert measured["code"] == 2, measured
    assert text.startswith("error:") and str(big) in text and "model.depth 400" in text, text
    assert measured["out"].strip().count("\n") == 0, measured["out"]  # one line
    assert measured["rss_kb"] < 500 * 1024, measured  # torch is not imported: ~60 MB
    assert measured["wall"] < 30, measured  # building it would take minutes or end in an OOM kill
    assert not out.exists()


def test_every_command_that_builds_from_the_file_refuses_it(big: Path, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (40, 90, 200)).save(image)
    for args in (["finetune", "--checkpoint", big, "--out", tmp_path / "ft", "--epochs", "1"],
                 ["reconstruct", image, "--checkpoint", big, "--out", tmp_path / "r.png"],
                 ["attention-map", image, "--checkpoint", big, "--out", tmp_path / "a.png"],
                 ["pretrain", "--resume", big]):
        code, text = run(*args)
        assert code == 2 and "model.depth" in text and "400" in text, (args, text)
        if args[0] != "pretrain":  # --resume validates the run's config (docs/errors.md: the key is named)
            assert str(big) in text and text.count("error:") == 1, text
    assert not (tmp_path / "ft").exists() and not (tmp_path / "r.png").exists()


def test_published_vits_pass_and_sizes_beyond_reason_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """ViT-H/14 at 448 px, ViT-g/14 and ViT-G/14 (with the CFMAE decoder) on a 64 GiB machine pass; 8192 x 400,
    a grid of 4096 x 4096 patches, a NaN, or 2^21 classes never do; ViT-L does not fit in 1 GiB."""
    monkeypatch.setattr(config_module, "machine_memory", lambda: 64 * GiB)
    vits = {"ViT-H/14@448": (1280, 32, 16, 4.0, 14, 448), "ViT-g/14": (1408, 40, 16, 48 / 11, 14, 224),
            "ViT-G/14": (1664, 48, 16, 64 / 13, 14, 224)}
    for name, (dim, depth, heads, ratio, patch, size) in vits.items():
        sets = [f"model.embed_dim={dim}", f"model.depth={depth}", f"model.num_heads={heads}",
                f"model.mlp_ratio={ratio}", f"model.patch_size={patch}", "model.map_stride=2",
                f"data.img_size={size}", "masking.num_visible=98"]
        raw = load_config("vitb-400e", sets).model_dump(mode="json")  # validated: bounds and memory
        check_config_sizes(raw, name, "pretrain", semantic_classes=150)
        fine = {"model": {"encoder": {"embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": ratio,
                                      "patch_size": patch}}, "data": {"img_size": size}}
        check_config_sizes(fine, name, "finetune", classes=21841)
    raw = load_config("vitb-400e").model_dump(mode="json")
    for change, words in [({"embed_dim": 8192, "depth": 400}, "model.depth 400 is above the 256 blocks"),
                          ({"embed_dim": 8192, "depth": 48}, "more than the 64.0 GiB of memory"),
                          ({"patch_size": 4}, None), ({"mlp_ratio": float("nan")}, "model.mlp_ratio nan")]:
        bad = json.loads(json.dumps(raw))
        bad["model"].update(change)
        if words is None:
            bad["data"]["img_size"] = 16384
            words = "a 4,096 x 4,096 patch grid"
        with pytest.raises(ConfigError, match="FILE: .*") as info:
            check_config_sizes(bad, "FILE")
        assert words in str(info.value) and "\n" not in str(info.value), info.value
    with pytest.raises(ConfigError, match="classes 2097152 is above"):
        check_config_sizes({"model": {"encoder": {}}}, "FILE", "finetune", classes=1 << 21)
    with pytest.raises(ConfigError, match="model.depth"):  # a new run's config is bounded the same way
        load_config("vitb-400e", ["model.depth=400"])
    monkeypatch.setattr(config_module, "machine_memory", lambda: GiB)
    with pytest.raises(ConfigError, match=r"about 31\d.\d M parameters: 1.\d GiB in float32, more than the 1.0 GiB"):
        check_config_sizes(load_config("vitl-400e").model_dump(mode="json"), "FILE")


def test_the_estimate_is_the_count_of_the_model_built() -> None:
    for sets in ([], ["model.decoder.kind=multimae", "model.decoder.cascade=false"],
                 ["data.modalities=[rgb,depth,semantic]", "model.decoder.order=[semantic,depth,rgb]"]):
        cfg = tiny_config(*sets)
        built = sum(p.numel() for p in CFMAE.from_config(cfg, 3).parameters())
        estimate = pretrain_parameters(cfg.model.model_dump(mode="json"), cfg.data.img_size, cfg.data.modalities, 3)
        assert abs(estimate / built - 1) < 0.02, (sets, estimate, built)


def test_a_config_that_lies_about_its_tensors_is_refused_before_building(tmp_path: Path) -> None:
    cases = {"embed_dim": (dict(embed_dim=64), "model.embed_dim 64 in the config, 32 in encoder.patch_embed.proj"),
             "depth": (dict(depth=3), "model.depth 3 in the config, 2 in encoder.blocks.1"),
             "mlp": (dict(mlp_ratio=2.0), "model.mlp_ratio 2.0 (an MLP of 64) in the config, 128 in"),
             "decoder": (dict(decoder={**tiny_config().model.decoder.model_dump(mode="json"), "dim": 32}),
                         "model.decoder.dim 32 in the config, 16 in decoder.embed.weight")}
    for name, (change, words) in cases.items():
        file = checkpoint(tmp_path / f"{name}.pt", **change)
        with pytest.raises(CfmaeError) as info:  # without torch: the file's index
            check_weights_file(file)
        assert str(file) in str(info.value) and words in str(info.value), info.value
        code, text = run("export", file, "--out", tmp_path / f"x-{name}")
        assert code == 2 and words in text and not (tmp_path / f"x-{name}").exists(), text
    grid = checkpoint(tmp_path / "grid.pt")
    top = torch.load(grid, weights_only=True)
    top["config"]["data"]["img_size"] = 64
    torch.save(top, grid)
    from cfmae_cli.model.weights import read_weights

    with pytest.raises(CfmaeError, match=r"data.img_size 64 \(a grid of 64 patches\) in the config, 16 in "
                                         r"encoder.pos_embed"):
        read_weights(grid)  # the door for weights checks the same after reading


def test_an_export_folder_beyond_reason_is_refused_by_every_reader(tmp_path: Path) -> None:
    """A config.json (an export's) that says depth 400 is refused before timm builds it: by eval-robustness's
    reader, the one door for weights, and the check before torch."""
    from safetensors.torch import save_file

    from cfmae_cli.model.weights import read_state

    folder = tmp_path / "export"
    folder.mkdir()
    save_file({"patch_embed.proj.weight": torch.zeros(32, 3, 8, 8)}, str(folder / "model.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 10,
              "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 400, "num_heads": 2}}
    (folder / "config.json").write_text(json.dumps(config))
    for check in (check_weights_file, read_state):
        with pytest.raises(CfmaeError, match="config.json: model_args.depth 400 is above the 256 blocks"):
            check(folder)
    code, text = run("eval-robustness", "--checkpoint", folder, "--data", tmp_path, "--out", tmp_path / "r.json")
    assert code == 2 and "model_args.depth 400" in text, text
    config["model_args"]["depth"] = 2
    config["model_args"]["embed_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CfmaeError, match="model_args.embed_dim 64 in the config, 32 in encoder.patch_embed"):
        check_weights_file(folder)


def test_the_look_without_torch_runs_nothing_of_the_file(tmp_path: Path) -> None:
    """peek_checkpoint gives the shapes of a checkpoint's tensors; a file with other Python objects (argparse's
    Namespace) or one built to run a command when unpickled is not looked into (None), and nothing runs."""
    file = checkpoint(tmp_path / "ok.pt")
    top = peek_checkpoint(file)
    assert top["config"]["model"]["embed_dim"] == 32 and top["semantic_classes"] == ["a", "b", "c"]
    assert top["model"]["encoder.patch_embed.proj.weight"] == TensorShape((32, 3, 8, 8))
    pickled = tmp_path / "args.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, pickled)
    assert peek_checkpoint(pickled) is None

    class Payload:
        def __reduce__(self):  # what a malicious file does: a call on unpickling
            return (Path.touch, (tmp_path / "ran",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"config": {}, "x": Payload()}, protocol=2))
    assert peek_checkpoint(evil) is None and not (tmp_path / "ran").exists()
    check_weights_file(evil)  # left to the reader, which refuses it with its own message
    assert not (tmp_path / "ran").exists()
