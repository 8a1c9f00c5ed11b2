"""The table of modalities: a modality registered here, in the test alone, is read, augmented, embedded, masked,
predicted, scored and drawn by the rest of the package without a change to any other module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli import modalities as table
from cfmae_cli.cli import app
from cfmae_cli.config import load_config
from cfmae_cli.errors import ConfigError
from cfmae_cli.modalities import Modality
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the masked patches (B, N, P), (B, N)."""
    per_patch = (pred.float() - target).abs().mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


@pytest.fixture
def edge():
    """A grey-level edge map: an image modality of one channel, at the image's resolution, with an L1 loss."""
    from cfmae_cli.model import losses

    losses.register_loss("edge_l1", l1_loss)
    spec = table.register(Modality("edge", kind="image", channels=1, at_map_stride=False, loss="edge_l1"))
    yield spec
    table.unregister("edge")
    losses.LOSSES.pop("edge_l1")


def add_edge_maps(root: Path) -> None:
    """DATA/edge/<class>/<stem>.png: the gradient magnitude of each image's grey levels."""
    for path in sorted((root / "rgb").rglob("*.png")):
        grey = np.asarray(Image.open(path).convert("L"), np.float64)
        gy, gx = np.gradient(grey)
        edges = np.clip(np.hypot(gx, gy) * 2, 0, 255).astype(np.uint8)
        target = root / "edge" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(edges).save(target)


def test_a_modality_registered_in_a_test_pretrains_the_tiny_model(edge: Modality, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    add_edge_maps(root)
    sets = TINY_OVERRIDES + ["data.modalities=[rgb,instance,semantic,edge]",
                             "model.decoder.order=[semantic,instance,edge,rgb]", "train.plot_every=1"]
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(root), "--out", str(out), "--epochs", "2",
                                 *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert all(np.isfinite(r["loss_edge"]) and r["loss_edge"] > 0 for r in epochs)
    total = epochs[-1]["loss_rgb"] + epochs[-1]["loss_instance"] + epochs[-1]["loss_semantic"] + \
        epochs[-1]["loss_edge"]
    assert epochs[-1]["loss"] == pytest.approx(total, rel=1e-5)  # λ = 1 for a modality without a weight
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    assert tuple(state["adapters.edge.proj.weight"].shape) == (32, 1, 8, 8)  # 1 channel, the image's patch 8
    assert tuple(state["heads.edge.1.weight"].shape) == (8 * 8 * 1, 16)  # 64 grey values per token
    assert (out / "plots/recon-epoch-0002.png").is_file()


def test_the_loss_of_the_entry_is_the_one_used(edge: Modality) -> None:
    """The model scores the registered modality with the entry's own loss (L1 here), on the masked patches."""
    from cfmae_cli.model.losses import modality_loss, patchify_image

    x = torch.rand(2, 1, 16, 16)
    pred = torch.rand(2, 4, 64)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    want = l1_loss(pred, patchify_image(x, 8), mask)
    assert torch.allclose(modality_loss(edge, pred, x, mask, 8, 0, norm_pix=True), want)


def test_an_unregistered_modality_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown modality .edge. .known: rgb, instance, semantic, depth"):
        load_config("demo", ["data.modalities=[rgb,edge]"])
    with pytest.raises(ConfigError, match="model.decoder.order.*has no place for semantic"):
        load_config("demo", ["model.decoder.order=[instance,rgb]"])


def test_the_table_names_its_losses_and_the_loss_module_holds_them() -> None:
    """The table (bottom layer) holds each loss by name; model/losses.py maps the names to functions."""
    from cfmae_cli.model import losses

    assert {m.name: m.loss for m in table.TABLE.values()} == {"rgb": "mse", "instance": "cross_entropy",
                                                              "semantic": "cross_entropy", "depth": "l1"}
    assert all(isinstance(m.loss, str) for m in table.TABLE.values())
    assert all(m.loss in losses.LOSSES for m in table.TABLE.values() if m.kind == "image")
    with pytest.raises(ValueError, match="scored by cross_entropy"):
        Modality("bad", kind="ids", classes="manifest", loss="mse")
    with pytest.raises(KeyError, match="unknown image loss 'huber'"):
        losses.loss_named("huber")
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    want = (pred - target).abs().mean(-1)[mask].mean()
    assert torch.equal(losses.LOSSES["l1"](pred, target, mask), losses.l1_loss(pred, target, mask))
    assert torch.allclose(losses.l1_loss(pred, target, mask), want)
