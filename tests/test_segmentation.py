"""Segmentation transfer: the pyramid's strides and channels, mIoU from a hand-made confusion matrix, ADE20K's
label convention, layer-wise decay, and a fine-tuning run on the dataset layout's semantic maps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.config import EncoderArch
from cfmae_cli.errors import DataError
from cfmae_cli.eval.config import FinetuneConfig, FtOptimConfig
from cfmae_cli.eval.segmentation import ViTSegmenter, confusion, segmentation_datasets, segmentation_metrics
from cfmae_cli.eval.task import layer_decay_groups
from cfmae_cli.formats import UNLABELLED
from tests.conftest import make_dataset
from tests.test_export import _ours

runner = CliRunner()
ARCH = EncoderArch(patch_size=8, embed_dim=32, depth=3, num_heads=2, map_stride=2, map_embed_dim=8)


def test_pyramid_strides_and_channels() -> None:
    model = ViTSegmenter(ARCH, 64, 5, [0, 1, 1, 2], channels=16)
    x = torch.randn(2, 3, 64, 64)
    feats = model.features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8)] * 4  # the patch grid, D channels
    levels = model.pyramid(feats)
    assert [tuple(f.shape) for f in levels] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    assert [64 // f.shape[-1] for f in levels] == [2, 4, 8, 16]  # patch 8: strides p/4, p/2, p, 2p
    assert tuple(model({"rgb": x}).shape) == (2, 5, 64, 64)


def test_miou_from_a_hand_made_confusion_matrix() -> None:
    target = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, UNLABELLED, UNLABELLED])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2, 0])
    conf = confusion(pred, target, 3)
    assert conf.tolist() == [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # the two unlabelled pixels are left out
    m = segmentation_metrics(conf)
    iou0, iou1 = 5 / (5 + 1 + 2), 3 / (3 + 2 + 1)
    assert m["iou"][0] == pytest.approx(100 * iou0) and m["iou"][1] == pytest.approx(100 * iou1)
    assert math.isnan(m["iou"][2])  # a class in neither labels nor predictions does not count
    assert m["mIoU"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert m["pixel_acc"] == pytest.approx(100 * 8 / 11)
    assert m["mAcc"] == pytest.approx(100 * (5 / 6 + 3 / 5) / 2)


def test_pyramid_and_head_take_the_full_lr() -> None:
    model = ViTSegmenter(ARCH, 32, 4, [0, 1, 1, 2], channels=8)
    groups = layer_decay_groups(model, FtOptimConfig(layer_decay=0.5))
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.classifier.weight"] == scale["pyramid.up2.weight"] == 1.0
    assert scale["encoder.blocks.2.mlp.fc1.weight"] == 0.5 and scale["encoder.patch_embed.proj.weight"] == 0.5 ** 4


def ade20k(root: Path, missing: bool = False) -> Path:
    for split in ("training", "validation"):
        for i in range(3):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            if missing and split == "validation" and i == 2:
                continue
            ann = np.zeros((40, 50), np.uint8)
            ann[:, 10:] = 1
            ann[:, 30:] = 150
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def test_ade20k_layout_ignores_other_and_shifts_the_ids(tmp_path: Path) -> None:
    cfg = FinetuneConfig.model_validate({"kind": "segmentation", "data": {"img_size": 48}})
    data = segmentation_datasets(cfg, ade20k(tmp_path / "ade"))
    assert data["num_classes"] == 150 and len(data["train"]) == len(data["val"]) == 3
    sem = data["val"][0]["semantic"]
    assert set(sem.unique().tolist()) == {0, 149, UNLABELLED}  # 0 → ignored, 1 → 0, 150 → 149
    with pytest.raises(DataError, match="annotation"):
        segmentation_datasets(cfg, ade20k(tmp_path / "broken", missing=True))


def test_segmentation_finetuning_on_the_dataset_layout(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data" / "train", n_per_class=4, seed=0)
    make_dataset(tmp_path / "data" / "val", n_per_class=2, seed=1)
    source, ckpt = _ours(tmp_path)  # patch 8, width 32, depth 2
    out = tmp_path / "run"
    sets = ["data.img_size=32", "data.num_workers=0", "optim.effective_batch=4", "train.batch_size=4",
            "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "model.out_indices=[0,0,1,1]",
            "model.head_channels=8", "optim.lr=1e-12", "model.drop_path=0.0"]
    result = runner.invoke(app, ["finetune", "--task", "segmentation", "--checkpoint", str(ckpt), "--data",
                                 str(tmp_path / "data"), "--out", str(out),
                                 *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["mIoU"] <= 100 and 0 <= r["pixel_acc"] <= 100 for r in records)
    assert (out / "checkpoints/best.pt").is_file()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["kind"] == "segmentation" and cfg["model"]["encoder"]["depth"] == 2
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    assert torch.allclose(state["encoder.blocks.1.attn.qkv.weight"], source.state_dict()["encoder.blocks.1.attn.qkv.weight"],
                          atol=1e-6)
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "segmentation model" in " ".join(result.output.split())
