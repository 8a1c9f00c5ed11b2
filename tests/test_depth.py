"""Depth as a fourth modality (issue #19, first part): an entry of the table read from 8- or 16-bit grey PNGs
in DATA/depth/, MultiMAE's L1 loss on per-patch normalised targets, its place in the cascade, the exact token
budget over four modalities, and a clear refusal of a depth map of the wrong size or type."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli import modalities as table
from cfmae_cli.cli import app
from cfmae_cli.config import Config
from cfmae_cli.data.dataset import BadSample, read_map
from cfmae_cli.masking import MaskGenerator
from cfmae_cli.model.losses import modality_loss, normalise_patches, patchify_rgb
from tests.conftest import TINY_OVERRIDES, make_dataset
from tests.tiny_label_models import make_dpt_depth

runner = CliRunner()
FOUR = ["rgb", "instance", "semantic", "depth"]


def add_depth(root: Path, bits: int = 16) -> None:
    """DATA/depth/<class>/<stem>.png: a vertical ramp (far at the top) plus the image's brightness."""
    for path in sorted((root / "rgb").rglob("*.png")):
        grey = np.asarray(Image.open(path).convert("L"), np.float64)
        ramp = np.linspace(1.0, 0.0, grey.shape[0])[:, None]
        depth = 0.7 * ramp + 0.3 * grey / 255
        target = root / "depth" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if bits == 16:
            Image.fromarray((depth * 65535).round().astype(np.uint16)).save(target)
        else:
            Image.fromarray((depth * 255).round().astype(np.uint8)).save(target)


def test_sixteen_bit_depth_is_read_at_eight_bits_in_order(tmp_path: Path) -> None:
    path = tmp_path / "depth-16.png"
    values = np.array([[0, 257, 32767, 65535]], np.uint16)
    Image.fromarray(values).save(path)
    got = read_map(path, (4, 1), table.get("depth"))
    assert got.dtype == torch.uint8 and got.shape == (1, 1, 4)
    assert got.flatten().tolist() == [0, 1, 127, 255]


def test_a_depth_map_of_another_type_or_size_is_named(tmp_path: Path) -> None:
    rgb = tmp_path / "d.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb)
    with pytest.raises(BadSample, match=r"d\.png: a depth map must be a single-channel 8- or 16-bit PNG, got PIL "
                                        r"mode RGB"):
        read_map(rgb, (8, 8), table.get("depth"))
    grey = tmp_path / "g.png"
    Image.fromarray(np.zeros((6, 8), np.uint16)).save(grey)
    with pytest.raises(BadSample, match=r"g\.png: map size 8x6 differs from the image's 8x8"):
        read_map(grey, (8, 8), table.get("depth"))


def test_the_depth_loss_is_l1_on_per_patch_normalised_targets() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16)
    pred = torch.randn(2, 4, 64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    target = normalise_patches(patchify_rgb(x, 8).float())
    per_token = (pred - target).abs().mean(-1)
    want = per_token[mask].mean()
    assert torch.allclose(modality_loss(table.get("depth"), pred, x, mask, 8, 0, norm_pix=True), want)


@pytest.mark.parametrize("visible", [98, 196])
def test_the_token_budget_is_exact_over_four_modalities(visible: int) -> None:
    cfg = Config().masking.model_copy(update={"num_visible": visible})
    gen = MaskGenerator(cfg, FOUR, grid=14, num_semantic_classes=133, num_instance_ids=16)
    v = gen.budgets(512, torch.device("cpu"))
    assert v.shape == (512, 4) and (v.sum(1) == visible).all() and (v >= 0).all() and (v <= 196).all()
    assert torch.allclose(v.double().mean(0) / visible, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_pretraining_on_four_modalities_and_a_checkpoint_without_depth_still_loads(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_per_class=4)
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    three = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "three"), *sets])
    assert three.exit_code == 0, three.output
    add_depth(data)
    four = ["--set", "data.modalities=[rgb,instance,semantic,depth]",
            "--set", "model.decoder.order=[semantic,instance,depth,rgb]"]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "four"), *sets, *four])
    assert result.exit_code == 0, result.output
    epochs = [r for r in map(json.loads, (tmp_path / "four" / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "epoch"]
    assert all(np.isfinite(r["loss_depth"]) and r["loss_depth"] > 0 for r in epochs)
    state = torch.load(tmp_path / "four" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert tuple(state["adapters.depth.proj.weight"].shape) == (32, 1, 8, 8)
    # the three-modality checkpoint: reconstruct and export read it as before
    photo = data / "rgb" / "a" / "a_00.png"
    out = runner.invoke(app, ["reconstruct", str(photo), "-c", str(tmp_path / "three"), "--out",
                              str(tmp_path / "g.png")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["reconstruct", str(photo), "-c", str(tmp_path / "four"), "--out",
                              str(tmp_path / "g4.png")])  # depth comes from the dataset folder, and is drawn
    assert out.exit_code == 0, out.output
    assert "depth" in json.loads((tmp_path / "g4.json").read_text())["images"][0]["errors"]
    out = runner.invoke(app, ["export", str(tmp_path / "four"), "--out", str(tmp_path / "x")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "x" / "config.json").read_text())["cfmae"]["modalities"] == FOUR


def test_depth_maps_of_the_wrong_type_stop_the_run_naming_them(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_per_class=4)
    for path in sorted((data / "rgb").rglob("*.png")):
        target = data / "depth" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").save(target)  # colour, not a depth map
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *sets,
                                 "--set", "data.modalities=[rgb,instance,semantic,depth]",
                                 "--set", "model.decoder.order=[semantic,instance,depth,rgb]"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "more than data.max_bad_fraction" in " ".join(result.output.split())
    assert "a depth map must be a single-channel 8- or 16-bit PNG" in (tmp_path / "r" / "bad_files.txt").read_text()


def test_label_writes_depth_with_a_tiny_model_then_pretraining_reads_four_modalities(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = make_dpt_depth(tmp_path / "dpt")
    made = make_dataset(tmp_path / "made", n_per_class=3)
    src = tmp_path / "src"
    shutil.copytree(made / "rgb", src)
    data = tmp_path / "DATA"
    args = ["label", str(src), "--out", str(data), "--workers", "0", "--depth", "depth-anything", "--depth-model",
            str(model), "--preview", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    depths = sorted((data / "depth").rglob("*.png"))
    assert len(depths) == 6
    for path in depths:
        with Image.open(path) as im, Image.open(src / path.relative_to(data / "depth")) as rgb:
            assert im.mode.startswith("I;16") and im.size == rgb.size
            values = np.asarray(im)
            assert values.min() == 0 and values.max() == 65535  # scaled per image
    manifest = json.loads((data / "cfmae-dataset.json").read_text())
    assert manifest["labelling"]["depth"]["depth_model"] == str(model)
    assert manifest["labelling"]["settings"]["depth_model"] == str(model)
    before = {p: p.read_bytes() for p in depths}
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0 and "6 were already done" in rerun.output and \
        {p: p.read_bytes() for p in depths} == before
    refused = runner.invoke(app, ["label", str(src), "--out", str(data), "--workers", "0"])
    assert refused.exit_code == 2 and "depth" in refused.output
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *sets,
                                 "--set", "data.modalities=[rgb,instance,semantic,depth]",
                                 "--set", "model.decoder.order=[semantic,instance,depth,rgb]"])
    assert result.exit_code == 0, result.output


def test_depth_options_are_checked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(make_dataset(tmp_path / "made", n_per_class=1) / "rgb", src)
    for extra, message in ((["--depth", "zoe"], "--depth zoe: choose none, depth-anything or classical"),
                           (["--depth", "depth-anything"], "--depth depth-anything needs --depth-model"),
                           (["--depth", "depth-anything", "--depth-model", str(tmp_path / "nope")],
                            "--depth-model " + str(tmp_path / "nope") + ": folder not found")):
        result = runner.invoke(app, ["label", str(src), "--out", str(tmp_path / "d"), "--workers", "0", *extra])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


# -- the classical depth cue and the demo with depth (issue #19, third part) -----------------------------------
def test_the_classical_cue_puts_objects_and_the_ground_nearer(tmp_path: Path) -> None:
    """What the cue is for: on a plain wall with a textured object in front, the object is nearer than the
    wall around it, and lower rows of the wall are nearer than higher ones; stored as uint16 at the image size."""
    from cfmae_cli.labeling.classical import ClassicalLabeller

    rng = np.random.default_rng(0)
    image = np.full((96, 128, 3), 150, np.uint8)
    image[:, :, 2] = 170  # a smooth, slightly blue wall
    image[30:66, 44:84] = rng.integers(0, 255, (36, 40, 3), dtype=np.uint8) // 2 + np.array([120, 40, 20], np.uint8)
    depth = ClassicalLabeller().depth(image)
    assert depth.shape == (96, 128) and depth.dtype == np.uint16
    assert depth.min() == 0 and depth.max() == 65535
    wall = np.ones((96, 128), bool)
    wall[24:72, 38:90] = False
    assert depth[34:62, 48:80].mean() > depth[wall].mean() + 10000  # the object stands out
    assert depth[80:, :].mean() > depth[:16, :].mean() + 10000  # the floor side is nearer


def test_the_demo_with_depth_adds_depth_maps_beside_the_same_images(tmp_path: Path, monkeypatch) -> None:
    from cfmae_cli.labeling import demo

    monkeypatch.setenv("CFMAE_CACHE", str(tmp_path / "cache"))
    assert demo.default_demo_root(True) == tmp_path / "cache" / "demo-depth-v1"
    plain = demo.build_demo_dataset(tmp_path / "plain", crops_per_photo=1, size=32, seed=3)
    deep = demo.build_demo_dataset(tmp_path / "deep", crops_per_photo=1, size=32, seed=3, depth=True)
    assert not (plain / "depth").exists()
    images = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.suffix in (".jpg", ".png"))
    assert len(images) == 3 * len(demo.DEMO_PHOTOS)  # rgb, instance, semantic
    for rel in images:
        assert (deep / rel).read_bytes() == (plain / rel).read_bytes(), rel
    depths = sorted((deep / "depth").rglob("*.png"))
    assert len(depths) == len(demo.DEMO_PHOTOS)
    with Image.open(depths[0]) as im:
        assert im.mode.startswith("I;16") and im.size == (32, 32)
    assert json.loads((deep / "cfmae-dataset.json").read_text())["labelling"]["depth"]["backend"] == "classical"


def test_pretrain_demo_depth_trains_on_four_modalities_of_the_built_in_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CFMAE_CACHE", str(tmp_path / "cache"))
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--preset", "demo-depth", "--out", str(tmp_path / "run"), *sets,
                                 "--set", "data.demo_crops_per_photo=2", "--set", "data.demo_size=32",
                                 "--set", "train.monitor.enabled=false"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "demo-depth-v1" / "depth").is_dir()
    last = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "epoch"][-1]
    assert np.isfinite(last["loss_depth"]) and last["loss_depth"] > 0


def test_label_depth_classical_needs_no_model(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(make_dataset(tmp_path / "made", n_per_class=2) / "rgb", src)
    result = runner.invoke(app, ["label", str(src), "--out", str(tmp_path / "D"), "--workers", "0",
                                 "--depth", "classical"])
    assert result.exit_code == 0, result.output
    depths = sorted((tmp_path / "D" / "depth").rglob("*.png"))
    assert len(depths) == 4
    manifest = json.loads((tmp_path / "D" / "cfmae-dataset.json").read_text())
    assert manifest["labelling"]["depth"]["backend"] == "classical"
    assert manifest["labelling"]["settings"]["depth"] == "classical"
