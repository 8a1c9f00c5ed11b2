"""Reconstruction and attention pictures: the equations behind them and the commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.checkpoints import save_checkpoint
from cfmae_cli.cli import app
from cfmae_cli.labeling.demo import load_photo
from cfmae_cli.model import CFMAE
from cfmae_cli.model.losses import normalise_patches, patchify_image
from cfmae_cli.viz.attention import encoder_attention, keep_mass, rollout
from cfmae_cli.viz.recon import rgb_prediction
from tests.conftest import pretrained_run, tiny_config

runner = CliRunner()


def test_fused_attention_weights_equal_the_explicit_softmax() -> None:
    torch.manual_seed(0)
    model = CFMAE.from_config(tiny_config(), 3).eval()
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
    pred = normalise_patches(patchify_image(images, 8))
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(rgb_prediction(pred, images, mask, 8, norm_pix=True), images, atol=1e-4)
    partly = torch.tensor([[True, False, True, False]] * 2)
    zeros = torch.zeros_like(pred)
    out = rgb_prediction(zeros, images, partly, 8, norm_pix=False)
    assert torch.equal(patchify_image(out, 8)[:, 1], patchify_image(images, 8)[:, 1])  # visible patches pasted


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny CFMAE pre-trained for one epoch on a synthetic dataset."""
    return pretrained_run(tmp_path_factory.mktemp("viz"))


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


def test_masked_reconstruction_of_a_dataset_image_reports_every_modality(trained: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    from cfmae_cli.viz import recon

    image = sorted((trained / "data" / "rgb" / "a").iterdir())[0]  # in a dataset: its own maps are used
    out = tmp_path / "all.png"
    drawn = {}
    real = recon.save_image_grid
    monkeypatch.setattr(recon, "save_image_grid", lambda *a, **kw: drawn.update(labels=a[3]) or real(*a, **kw))
    result = runner.invoke(app, ["reconstruct", str(image), "--checkpoint", str(trained / "run"),
                                 "--modality", "rgb,instance,semantic", "--masking", "semantic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # rows named after the file, as attention-map names them
    assert drawn["labels"] == [f"{image.name}: {m}" for m in ("rgb", "instance", "semantic")]
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


# the attention statistics (attention-map --stats): tests/test_attention_stats.py
