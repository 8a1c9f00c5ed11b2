"""Reconstruction and attention pictures: the equations behind them and the commands end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.checkpoints import save_checkpoint
from cfmae_cli.cli import app
from cfmae_cli.labeling.demo import load_photo
from cfmae_cli.model import CFMAE
from cfmae_cli.model.losses import normalise_patches, patchify_rgb
from cfmae_cli.viz.attention import encoder_attention, keep_mass, rollout
from cfmae_cli.viz.recon import rgb_prediction
from tests.conftest import TINY_OVERRIDES, tiny_config

runner = CliRunner()


def test_fused_attention_weights_equal_the_explicit_softmax() -> None:
    torch.manual_seed(0)
    model = CFMAE(tiny_config(), 3).eval()
    blocks = model.encoder.blocks
    assert all(b.attn.fused_attn for b in blocks)  # SDPA stays on
    x = torch.randn(2, 9, model.encoder.cls_token.shape[-1])
    _, ours = encoder_attention(blocks, lambda: blocks(x))
    # explicit softmax(QK^T / sqrt(d)) from the block's own weights, layer by layer
    h = x
    for block, weights in zip(blocks, ours):
        attn = block.attn
        qkv = torch.nn.functional.linear(block.norm1(h), attn.qkv.weight, attn.qkv.bias)
        q, k, _ = qkv.reshape(2, 9, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        explicit = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        assert torch.allclose(weights, explicit, atol=1e-6)
        h = block(h)
    # and timm's own unfused branch produces the same matrices
    captured = []
    for block in blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out))
    h = x
    for block in blocks:
        h = block(h)
    for a, b in zip(ours, captured):
        assert torch.allclose(a, b, atol=1e-6)


def test_rollout_of_identity_attention_is_the_identity() -> None:
    eye = torch.eye(7).expand(2, 4, 7, 7)
    assert torch.allclose(rollout([eye, eye, eye]), torch.eye(7).expand(2, 7, 7))
    uniform = torch.full((1, 2, 4, 4), 0.25)
    r = rollout([uniform])
    assert torch.allclose(r.sum(-1), torch.ones(1, 4))  # rows stay distributions
    assert torch.allclose(r[0], 0.5 * torch.full((4, 4), 0.25) + 0.5 * torch.eye(4))


def test_keep_mass_keeps_the_top_sixty_percent() -> None:
    v = torch.tensor([[0.5, 0.05, 0.3, 0.1, 0.05]])
    kept = keep_mass(v, 0.6)
    assert torch.equal(kept > 0, torch.tensor([[True, False, True, False, False]]))  # 0.5 < 0.6; 0.3 reaches 0.8
    assert torch.equal(kept[kept > 0], v[kept > 0])


def test_unnormalising_the_normalised_target_gives_back_the_image() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    pred = normalise_patches(patchify_rgb(images, 8))
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(rgb_prediction(pred, images, mask, 8, norm_pix=True), images, atol=1e-4)
    partly = torch.tensor([[True, False, True, False]] * 2)
    zeros = torch.zeros_like(pred)
    out = rgb_prediction(zeros, images, partly, 8, norm_pix=False)
    assert torch.equal(patchify_rgb(out, 8)[:, 1], patchify_rgb(images, 8)[:, 1])  # visible patches pasted


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny CFMAE pre-trained for one epoch on the demo photographs' classical labels."""
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("viz")
    data = make_dataset(root / "data", n_per_class=4)
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(root / "run"), "--epochs", "1", *sets])
    assert result.exit_code == 0, result.output
    return root


def _photo(path: Path, mode: str, size: tuple[int, int]) -> Path:
    Image.fromarray(load_photo("chelsea")).resize(size).convert(mode).save(path)
    return path


def test_reconstruct_and_attention_handle_odd_images(trained: Path, tmp_path: Path) -> None:
    run = trained / "run"
    images = [_photo(tmp_path / "grey.png", "L", (64, 48)), _photo(tmp_path / "alpha.png", "RGBA", (40, 40)),
              _photo(tmp_path / "tiny.jpg", "RGB", (12, 20)), _photo(tmp_path / "huge.jpg", "RGB", (900, 700))]
    out = tmp_path / "rec.png"
    result = runner.invoke(app, ["reconstruct", *map(str, images), "--checkpoint", str(run), "--modality", "rgb",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "L image converted to RGB" in text and "RGBA image converted to RGB" in text
    assert "smaller than the model's 32 px" in text and "is large" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["images"]) == 4 and report["num_visible"] == 16  # all rgb tokens of a 32 px / patch 8 image
    # the synthetic training classes differ from the classical labeller's: no semantic reference, said so
    assert "semantic" not in report["images"][0]["errors"] and "instance" in report["images"][0]["errors"]
    assert Image.open(out).size[1] > 4 * 3 * 32
    att = tmp_path / "att.png"
    for method in ("cls", "mean", "rollout"):
        result = runner.invoke(app, ["attention-map", str(images[0]), "--checkpoint", str(run), "--method", method,
                                     "--out", str(att)])
        assert result.exit_code == 0, result.output
        assert att.is_file()


def test_masked_reconstruction_of_a_dataset_image_reports_every_modality(trained: Path, tmp_path: Path) -> None:
    image = sorted((trained / "data" / "rgb" / "a").iterdir())[0]  # in a dataset: its own maps are used
    out = tmp_path / "all.png"
    result = runner.invoke(app, ["reconstruct", str(image), "--checkpoint", str(trained / "run"),
                                 "--modality", "rgb,instance,semantic", "--masking", "semantic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    errors = json.loads(out.with_suffix(".json").read_text())["images"][0]["errors"]
    assert set(errors) == {"rgb", "instance", "semantic"}
    assert 0 <= errors["semantic"]["pixel_accuracy"] <= 1 and errors["rgb"]["mse"] >= 0


def test_wrong_checkpoint_kind_and_no_run_exit_2(trained: Path, tmp_path: Path, monkeypatch) -> None:
    classifier = tmp_path / "classifier.pt"
    save_checkpoint(classifier, {"model": {"encoder.norm.weight": torch.ones(4), "head.weight": torch.ones(2, 4)},
                                 "config": {}})
    photo = _photo(tmp_path / "p.jpg", "RGB", (64, 64))
    for command in ("reconstruct", "attention-map"):
        result = runner.invoke(app, [command, str(photo), "--checkpoint", str(classifier)])
        assert result.exit_code == 2 and "not a CFMAE pre-training checkpoint" in result.output
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["reconstruct", str(photo)])
    assert result.exit_code == 2 and "Run `cfmae pretrain` first" in " ".join(result.output.split())
    result = runner.invoke(app, ["reconstruct", str(photo), "--checkpoint", str(trained / "run"), "--modality",
                                 "depth"])
    assert result.exit_code == 2 and "--modalities depth: choose from rgb, instance, semantic" in result.output


# -- attention statistics (attention-map --stats) ------------------------------------------------------------
def test_patch_fractions_follow_the_patches_row_by_row_and_cell_by_cell() -> None:
    from cfmae_cli.viz.attention_stats import patch_fractions

    ids = torch.zeros(32, 32, dtype=torch.long)  # a 4 x 4 grid of 8-pixel patches
    ids[0:8, 0:16] = 3  # the first two patches of the top row: an object
    ids[8:12, 24:32] = 1  # the upper half of the last patch of the second row
    ids[31, 31] = 255  # unlabelled is no object
    objects = patch_fractions(ids, 4).reshape(4, 4)
    expected = torch.zeros(4, 4)
    expected[0, :2], expected[1, 3] = 1.0, 0.5
    assert torch.equal(objects, expected)  # not transposed, not half a patch off
    regions = patch_fractions(ids, 4, classes=4)
    assert torch.allclose(regions[7], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # the patch's cells, class by class
    assert torch.allclose(regions[15], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # its unlabelled cell is left out


def test_the_statistics_read_the_patch_the_global_token_looks_at_after_the_prefix() -> None:
    from cfmae_cli.viz.attention_stats import image_stats

    n, prefix = 16, 2  # e.g. a class and a register token
    attention = torch.zeros(1, 3, prefix + n, prefix + n)
    attention[:, :, 0, 1] = 0.5  # the global token's attention to a prefix token is left out
    attention[:, :, 0, prefix + 5] = 0.5
    objects = torch.zeros(1, n)
    objects[0, 5], objects[0, 6] = 1.0, 1.0
    regions = torch.zeros(1, n, 2)
    regions[0, :, 0], regions[0, 5] = 1.0, torch.tensor([0.25, 0.75])
    stats = image_stats([attention], prefix, objects, regions)
    assert stats["object_share_last"].item() == 1.0 and stats["object_pixel_share"].item() == 2 / 16
    assert stats["spatial_entropy_last"].item() == 0.0  # one patch
    assert stats["region_entropy_last"].item() == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def _zero_query_key(blocks: torch.nn.Module) -> None:
    with torch.no_grad():
        for block in blocks:
            dim = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * dim] = 0
            block.attn.qkv.bias[: 2 * dim] = 0


def test_with_query_and_key_zeroed_the_object_share_is_the_object_pixel_share(trained: Path) -> None:
    import timm

    from cfmae_cli.data.layout import list_samples
    from cfmae_cli.viz import attention_stats as st

    samples, _ = list_samples(trained / "data", ["instance", "semantic"])
    cpu = torch.device("cpu")
    ours, _ = st.ours(trained / "run", cpu)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=2, no_embed_class=True)
    theirs = st.Subject("timm", "", vit.blocks, vit.forward_features, 64, 16, vit.num_prefix_tokens,
                        st.IMAGENET_MEAN, st.IMAGENET_STD)
    for subject in (ours, theirs):
        before = st.measure(subject, samples, 3, batch_size=3)
        assert not np.allclose(before["object_share_last"], before["object_pixel_share"])  # a real model looks
        _zero_query_key(subject.blocks)
        after = st.measure(subject, samples, 3, batch_size=3)
        assert after["object_pixel_share"].min() > 0
        for attended in ("object_share_last", "object_share_rollout"):
            assert np.allclose(after[attended], after["object_pixel_share"], atol=1e-6)
        assert np.allclose(after["region_entropy_last"], after["region_entropy_uniform"], atol=1e-5)
        assert np.allclose(after["spatial_entropy_last"], 1.0, atol=1e-6)
        assert np.allclose(after["spatial_entropy_rollout"], 1.0, atol=1e-6)


def test_stats_table_for_a_run_a_random_init_and_a_timm_model(trained: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224")
    save_file(vit.state_dict(), str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "stats.json"
    result = runner.invoke(app, ["attention-map", "--stats", str(trained / "data"), "--checkpoint",
                                 str(trained / "run"), "--checkpoint", "random", "--model", "vit_tiny_patch16_224",
                                 "--weights", str(tmp_path / "tiny.safetensors"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [m["name"] for m in report["models"]] == ["run", "random", "vit_tiny_patch16_224"]
    assert report["images"] == 8 and [m["img_size"] for m in report["models"]] == [32, 32, 224]
    share = report["statistics"]["object_pixel_share"]
    assert share["run"]["mean"] == share["random"]["mean"]  # the same maps at the same grid
    for key, row in report["statistics"].items():
        for name in ("run", "random", "vit_tiny_patch16_224"):
            lo, hi = row[name]["ci95"]
            assert lo <= row[name]["mean"] <= hi, (key, name)
    assert "object share, last block" in result.output and "vit_tiny_patch16_224" in result.output
    # 'random' is the encoder the run started from (its seed 0)
    from cfmae_cli.viz import attention_stats as st

    _, template = st.ours(trained / "run", torch.device("cpu"))
    first = st.random_init(template, torch.device("cpu"), seed=0)
    ckpt = torch.load(trained / "run/checkpoints/epoch-0001.pt", weights_only=True)
    torch.manual_seed(ckpt["config"]["train"]["seed"])
    start = CFMAE(tiny_config(), 3).encoder
    ours, theirs = first.blocks.state_dict(), start.blocks.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_stats_of_a_folder_without_instance_maps_exit_2_and_write_nothing(trained: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    shutil.rmtree(data / "instance")
    out = tmp_path / "stats.json"
    result = runner.invoke(app, ["attention-map", "--stats", str(data), "--checkpoint", str(trained / "run"),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "no instance/ folder" in result.output and str(data) in result.output
    assert not out.exists()
    result = runner.invoke(app, ["attention-map", "--stats", str(trained / "data"), "--model", "vit_tiny_patch16_224"])
    assert result.exit_code == 2 and "give each --model its --weights" in result.output
