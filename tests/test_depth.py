"""Depth as a fourth modality (issue #19, first part): an entry of the table read from 8- or 16-bit grey PNGs
in DATA/depth/, its place in the cascade, the exact token budget over four modalities, and a clear refusal of
a depth map of the wrong size or type. Issue #24 (item 4): a 16-bit map is read at its full precision all the
way into the target, and the target (and input) is MultiMAE's truncated per-image standardisation with an L1
loss; ``model.image_targets`` switches back to per-patch normalisation, as runs made before the key have."""

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
from cfmae_cli.model.losses import modality_loss, normalise_patches, patchify_image
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


def test_sixteen_bit_depth_is_read_at_full_precision_in_order(tmp_path: Path) -> None:
    path = tmp_path / "depth-16.png"
    values = np.array([[0, 1, 257, 32767, 65534, 65535]], np.uint16)
    Image.fromarray(values).save(path)
    got = read_map(path, (6, 1), table.get("depth"))
    assert got.dtype == torch.float32 and got.shape == (1, 1, 6)
    assert torch.equal(got.flatten(), torch.from_numpy(values.astype(np.float32).flatten() / np.float32(65535)))
    assert (got.flatten().diff() > 0).all()  # every 16-bit level its own value, in order
    eight = tmp_path / "depth-8.png"
    Image.fromarray(np.array([[0, 1, 128, 255]], np.uint8)).save(eight)
    got = read_map(eight, (4, 1), table.get("depth"))
    assert got.dtype == torch.float32 and got.flatten().tolist() == pytest.approx([0, 1 / 255, 128 / 255, 1])


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


def _depth_pair(tmp_path: Path) -> list[Path]:
    """Two 16-bit depth maps (24 x 24) on exact 8-bit levels (multiples of 257) that differ only by 100 / 65535
    (less than 1/255 of the range: the same map at 8 bits) in their left half, with a few extreme values."""
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (24, 24)).astype(np.int64) * 257
    base[0, :3], base[-1, -3:] = 0, 65535 - 257  # outliers: the cut of the truncated standardisation matters
    other = base.copy()
    other[:, :12] += 100
    paths = []
    for k, arr in enumerate((base, other)):
        paths.append(tmp_path / f"d{k}.png")
        Image.fromarray(arr.astype(np.uint16)).save(paths[-1])
    return paths


def _through_the_reader(paths: list[Path], targets: dict[str, str] | None = None) -> torch.Tensor:
    """The maps as the model reads them: read_map → the joint transform (resampled 24 → 16 px) → collate →
    inputs_on_device (with ``model.image_targets`` = ``targets``): (B, 1, 16, 16) float."""
    from cfmae_cli.data.dataset import collate, make_item
    from cfmae_cli.data.transforms import JointTransform, inputs_on_device

    t = JointTransform(16, 4, 16, (0.2, 1.0), (0.75, 1.33), 0.0, (0.5,) * 3, (0.5,) * 3, train=False,
                       normalise=False)
    items = [make_item(*t(torch.zeros(3, 24, 24, dtype=torch.uint8), {"depth": read_map(p, (24, 24),
                                                                                          table.get("depth"))}), 0)
             for p in paths]
    batch = collate(items)
    args = (batch, ["depth"], (0.5,) * 3, (0.5,) * 3)
    return (inputs_on_device(*args, targets) if targets is not None else inputs_on_device(*args))["depth"]


def test_depth_below_an_eighth_bit_reaches_the_target_and_the_loss(tmp_path: Path) -> None:
    """Two maps equal at 8 bits, different at 16: different inputs, targets and losses, by the real reader, the
    real resampling and the real target (standardised by default, and per patch under the option)."""
    x = _through_the_reader(_depth_pair(tmp_path))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 16, 16)
    assert (x[0] - x[1]).abs().max() > 1e-3  # standardised units: the 100 / 65535 step is there
    pred, mask = torch.zeros(1, 4, 64), torch.ones(1, 4, dtype=torch.bool)
    depth = table.get("depth")
    losses = [modality_loss(depth, pred, x[k:k + 1], mask, 8, 0, norm_pix=True) for k in range(2)]
    assert abs(float(losses[0]) - float(losses[1])) > 1e-4
    from cfmae_cli.model.losses import image_target

    for target in ("standardise", "patch_norm", "raw"):
        t = image_target(x, 8, target)
        assert (t[0] - t[1]).abs().max() > 1e-4, target
    raw = _through_the_reader(_depth_pair(tmp_path), {"depth": "patch_norm"})  # the input in [0, 1]
    step = (raw[1] - raw[0])[0]  # the left half 100 / 65535 higher, the right half equal
    assert step[:, :7].min() > 0.9 * 100 / 65535 and step[:, 9:].abs().max() < 1e-7
    assert step[:, :7].max() < 1.1 * 100 / 65535


def test_the_default_depth_target_and_input_are_multimaes_truncated_standardisation(tmp_path: Path) -> None:
    """Per image: mean 0 and std 1 over the middle 80 % of its values (sorted, int(0.1 n) to int(0.9 n)),
    MultiMAE's formula; the model's depth input is that map, its target the same map, and the loss L1 to it."""
    from cfmae_cli.model.losses import image_target

    depth = table.get("depth")
    assert depth.target == "standardise" and table.target_of(depth) == "standardise"
    assert table.target_of(depth, {}, norm_pix_loss=False) == "standardise"  # MAE's flag is RGB's
    raw = _through_the_reader(_depth_pair(tmp_path), {"depth": "raw"})
    x = _through_the_reader(_depth_pair(tmp_path))  # the default: standardised
    target = image_target(x, 8, table.target_of(depth))
    for k in range(2):
        values = np.sort(target[k].flatten().double().numpy())
        n = values.size
        middle = values[int(0.1 * n):int(0.9 * n)]
        assert abs(middle.mean()) < 1e-5 and abs(middle.std(ddof=1) - 1) < 1e-3  # (the 1e-6 under the root)
        # MultiMAE's formula on the map in [0, 1], written out: (d - mean_trunc) / sqrt(var_trunc + 1e-6)
        d = raw[k].flatten().double().numpy()
        trunc = np.sort(d)[int(0.1 * n):int(0.9 * n)]
        want = (d - trunc.mean()) / np.sqrt(trunc.var(ddof=1) + 1e-6)
        assert np.allclose(x[k].flatten().double().numpy(), want, atol=1e-5)  # the input
        assert np.allclose(target[k].reshape(4, 8, 8).numpy().reshape(2, 2, 8, 8).transpose(0, 2, 1, 3)
                           .reshape(-1), want, atol=1e-5)  # the target (patches back in raster order)
    assert not np.allclose(x.numpy(), raw.numpy())
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    want = (pred - patchify_image(x, 8)).abs().mean(-1)[mask].mean()
    assert torch.allclose(modality_loss(depth, pred, x, mask, 8, 0, norm_pix=True), want, atol=1e-5)


def test_model_image_targets_switches_depth_back_to_per_patch_normalisation(tmp_path: Path) -> None:
    from cfmae_cli.config import load_config

    cfg = load_config("demo", ["model.image_targets={depth: patch_norm}"]).model
    assert cfg.image_targets == {"depth": "patch_norm"}
    depth = table.get("depth")
    assert table.target_of(depth, cfg.image_targets, cfg.norm_pix_loss) == "patch_norm"
    x = _through_the_reader(_depth_pair(tmp_path), cfg.image_targets)  # the input: the map in [0, 1]
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    want = (pred - normalise_patches(patchify_image(x, 8))).abs().mean(-1)[mask].mean()
    got = modality_loss(depth, pred, x, mask, 8, 0, cfg.norm_pix_loss, cfg.image_targets)
    assert torch.allclose(got, want)
    raw = modality_loss(depth, pred, x, mask, 8, 0, cfg.norm_pix_loss, {"depth": "raw"})
    assert torch.allclose(raw, (pred - patchify_image(x, 8)).abs().mean(-1)[mask].mean())
    # RGB keeps MAE's norm-pix loss under model.norm_pix_loss, whatever depth does
    rgb = table.get("rgb")
    assert table.target_of(rgb, cfg.image_targets, True) == "patch_norm"
    assert table.target_of(rgb, cfg.image_targets, False) == "raw"


def test_a_stored_config_without_image_targets_keeps_per_patch_normalisation() -> None:
    """A run written before the key (its stored config lacks it) resumes and is read with per-patch normalised
    depth targets, on the depth map in [0, 1], and, as before, raw targets when it ran without norm-pix."""
    from cfmae_cli.config import Config, stored_config

    old = Config().model_dump(mode="json")
    del old["model"]["image_targets"]
    cfg = stored_config(old, "an old checkpoint")
    assert cfg.model.image_targets == {"depth": "patch_norm"}
    assert table.target_of(table.get("depth"), cfg.model.image_targets, cfg.model.norm_pix_loss) == "patch_norm"
    old["model"]["norm_pix_loss"] = False
    cfg = stored_config(old, "an old checkpoint")
    assert table.target_of(table.get("depth"), cfg.model.image_targets, cfg.model.norm_pix_loss) == "raw"
    new = stored_config(Config().model_dump(mode="json"), "a new checkpoint")  # the key stored: {} = defaults
    assert table.target_of(table.get("depth"), new.model.image_targets, new.model.norm_pix_loss) == "standardise"


def test_image_targets_names_image_modalities_only() -> None:
    from cfmae_cli.config import load_config
    from cfmae_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="model.image_targets: instance: a map of ids"):
        load_config("demo", ["model.image_targets={instance: raw}"])
    with pytest.raises(ConfigError, match="model.image_targets.depth: Input should be 'standardise', "
                                          "'patch_norm' or 'raw'"):
        load_config("demo", ["model.image_targets={depth: per_patch}"])


def test_pack_leaves_depth_to_the_folder_layout_and_says_so(tmp_path: Path, caplog) -> None:
    from cfmae_cli.data.packed import PackedDataset, pack_dataset
    from cfmae_cli.data.transforms import JointTransform
    from cfmae_cli.errors import DataError

    data = make_dataset(tmp_path / "data", n_per_class=1)
    add_depth(data)
    with caplog.at_level("WARNING"):
        manifest = pack_dataset(data, tmp_path / "packed", size=32)
    assert manifest["maps"] == ["instance", "semantic"] and "depth/ not packed" in caplog.text
    t = JointTransform(32, 2, 16, (0.3, 1.0), (0.75, 1.33), 0.0, (0.0,) * 3, (1.0,) * 3, normalise=False)
    with pytest.raises(DataError, match="asks for depth too: `cfmae pack` stores the id maps only"):
        PackedDataset(tmp_path / "packed", t, ["instance", "semantic", "depth"])


def test_the_model_loss_follows_model_image_targets() -> None:
    """End to end: the model's depth loss is the per-patch normalised one for a config that asks for it (an old
    run's), the standardised one by default."""
    from cfmae_cli.model import CFMAE
    from tests.conftest import tiny_config

    four = ["data.modalities=[rgb,instance,semantic,depth]", "model.decoder.order=[semantic,instance,depth,rgb]"]
    cfg = tiny_config(*four, "model.image_targets={depth: patch_norm}")
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, 3)
    n = model.grid ** 2
    x = torch.rand(2, 1, 32, 32)
    batch = {"rgb": torch.randn(2, 3, 32, 32), "instance": torch.zeros(2, 16, 16, dtype=torch.long),
             "semantic": torch.zeros(2, 16, 16, dtype=torch.long), "depth": x}
    pred = {name: torch.randn(2, n, model.head_dim(name)) for name in model.modalities}
    mask = torch.ones(2, 4, n, dtype=torch.bool)
    got = model.losses(pred, batch, mask)["losses"]["depth"]
    want = (pred["depth"] - normalise_patches(patchify_image(x, 8))).abs().mean(-1).mean()
    assert torch.allclose(got, want)


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
                                 "--set", "train.monitor.enabled=false", "--set", "train.epochs=1"])
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
