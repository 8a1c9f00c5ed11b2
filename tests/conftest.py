"""Shared fixtures: a tiny synthetic dataset in the layout of docs/design.md §5.1 and a tiny config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests: set before huggingface_hub is imported

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cfmae_cli.config import load_config  # noqa: E402
from cfmae_cli.data.layout import save_map, save_rgb, write_manifest  # noqa: E402

SEM_CLASSES = ["sky", "grass", "thing"]


def make_dataset(root: Path, n_per_class: int = 4, classes: tuple[str, ...] = ("a", "b"), size: int = 48,
                 seed: int = 0) -> Path:
    """Images whose rectangles are both instances and the 'thing' class, on a sky/grass background."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        for i in range(n_per_class):
            h, w = size, size + 8 * (i % 2)
            sem = np.zeros((h, w), np.uint8)
            sem[h // 2:] = 1
            inst = np.zeros((h, w), np.uint8)
            rgb = np.zeros((h, w, 3), np.uint8)
            rgb[..., 2] = 200
            rgb[h // 2:, :, 1] = 180
            for k in range(1, 4):
                y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
                dy, dx = rng.integers(6, 12, size=2)
                inst[y:y + dy, x:x + dx] = k
                sem[y:y + dy, x:x + dx] = 2
                rgb[y:y + dy, x:x + dx] = rng.integers(0, 255, size=3)
            stem = f"{cls}_{i:02d}"
            save_rgb(root / "rgb" / cls / f"{stem}.png", rgb)
            save_map(root / "instance" / cls / f"{stem}.png", inst)
            save_map(root / "semantic" / cls / f"{stem}.png", sem)
    write_manifest(root, SEM_CLASSES, {"instance": "synthetic", "semantic": "synthetic"},
                   {"images": n_per_class * len(classes), "classes": len(classes)})
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


TINY_OVERRIDES = [
    "data.img_size=32", "data.num_workers=0", "model.patch_size=8", "model.map_stride=2", "model.embed_dim=32",
    "model.depth=2", "model.num_heads=2", "model.map_embed_dim=8", "model.decoder.dim=16",
    "model.decoder.num_heads=2", "model.decoder.self_blocks=1", "masking.num_visible=8",
    "optim.effective_batch=4", "optim.warmup_epochs=1", "train.batch_size=4", "train.epochs=2",
    "train.log_every=1", "train.save_every=1",
]


def tiny_config(*extra: str):
    return load_config("demo", TINY_OVERRIDES + list(extra))


def pretrained_run(root: Path) -> Path:
    """``root``/data (:func:`make_dataset`, 4 images per class) and ``root``/run: a tiny CFMAE (TINY_OVERRIDES)
    pre-trained on it for one epoch. Returns ``root``."""
    from typer.testing import CliRunner

    from cfmae_cli.cli import app

    data = make_dataset(root / "data", n_per_class=4)
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--out", str(root / "run"), "--epochs", "1",
                                      *sets])
    assert result.exit_code == 0, result.output
    return root
