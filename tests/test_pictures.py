"""What the figures show: colours that match the class names of their legends, instances in their own palette,
rows named after their files, loss curves without an empty band."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfmae_cli.labeling.classical import SEMANTIC_CLASSES, classify_colours
from cfmae_cli.viz import palette as pal
from cfmae_cli.viz import recon
from tests.conftest import SEM_CLASSES, make_dataset


def test_classical_classes_are_drawn_in_the_colour_their_name_says() -> None:
    # the labeller itself puts each class's drawn colour back into that class (textured: with texture)
    colours = pal.semantic_palette(SEMANTIC_CLASSES)[: len(SEMANTIC_CLASSES)] / 255.0
    texture = np.array([0.2 if name == "textured" else 0.0 for name in SEMANTIC_CLASSES])
    assert classify_colours(colours, texture).tolist() == list(range(len(SEMANTIC_CLASSES)))


def test_semantic_palette_names_fixed_distinct_and_instances_apart() -> None:
    assert pal.named_colour("Orange-Brown") == pal.NAMED["orange-brown"]
    assert pal.named_colour("blue green") is not None and pal.named_colour("traffic light") is None
    names = [f"class {k}" for k in range(150)]  # ADE20K-sized, no colour words
    colours = pal.semantic_palette(names)
    assert np.array_equal(colours, pal.semantic_palette(names))  # the same in every figure
    assert len({tuple(c) for c in colours[:150].tolist()}) == 150
    assert tuple(colours[255]) == (0, 0, 0)
    # a class without a colour word is not drawn like a class named by a colour ("textured" was lime green)
    mixed = pal.semantic_palette(["red", "green", "blue", "person"])
    assert min(np.linalg.norm(mixed[3].astype(float) - mixed[k]) for k in range(3)) > 60
    inst = pal.instance_palette()
    assert tuple(inst[0]) == (0, 0, 0) and len({tuple(c) for c in inst[1:255].tolist()}) == 254


def _batch(ids: torch.Tensor) -> tuple[dict, torch.Tensor, dict]:
    """A batch of 2 × 32 px images with the same 8 × 8 map as instance and semantic ids, nothing masked."""
    batch = {"rgb": torch.zeros(2, 3, 32, 32), "instance": ids.clone(), "semantic": ids.clone()}
    mask = torch.zeros(2, 3, 16, dtype=torch.bool)
    pred = {"rgb": torch.zeros(2, 16, 8 * 8 * 3), "instance": torch.zeros(2, 16, 4 * 8),
            "semantic": torch.zeros(2, 16, 4 * 3)}
    return batch, mask, pred


def _colours(panel: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(c) for c in panel.reshape(-1, 3).tolist()}


def test_maps_are_drawn_in_their_own_palette_and_the_legend_matches_the_drawing() -> None:
    ids = torch.tensor([0, 1, 2, 1]).repeat_interleave(16).reshape(1, 8, 8).expand(2, 8, 8)
    batch, mask, pred = _batch(ids)
    names = ["dark", "red", "person"]
    panels = recon.reconstruction_panels(batch, mask, pred, ["rgb", "instance", "semantic"],
                                         {"instance": 8, "semantic": 3}, {"rgb": 8, "instance": 2, "semantic": 2},
                                         {"rgb": "raw"}, (0.0,) * 3, (1.0,) * 3, names)
    semantic, instance = pal.semantic_palette(names), pal.instance_palette()
    assert _colours(panels["semantic"][2]) == {tuple(semantic[k]) for k in range(3)}
    assert _colours(panels["instance"][2]) == {tuple(instance[k]) for k in range(3)}
    assert _colours(panels["semantic"][2]) != _colours(panels["instance"][2])
    legend = recon.class_legend(batch, mask, pred, ["rgb", "instance", "semantic"], names)
    assert legend == [(n, tuple(int(x) for x in semantic[k])) for k, n in enumerate(names)]
    assert legend[1][1] == pal.NAMED["red"]
    assert "instance maps: one colour per object" in recon.legend_title(["rgb", "instance", "semantic"])
    assert recon.legend_title(["rgb", "semantic"]) == "semantic classes"


def test_label_preview_draws_instances_and_classes_apart(tmp_path: Path, monkeypatch) -> None:
    from cfmae_cli.labeling import preview

    data = make_dataset(tmp_path / "data", n_per_class=1)
    (data / "meta").mkdir()
    for c in "ab":
        (data / "meta" / f"{c}.jsonl").write_text(json.dumps({"rgb": f"{c}/{c}_00.png", "class": c,
                                                              "stem": f"{c}_00"}) + "\n")
    seen = {}
    monkeypatch.setattr(preview, "save_image_grid", lambda rows, path, columns, labels, title, legend, **kw:
                        seen.update(rows=rows, labels=labels, legend=legend, **kw) or Path(path))
    preview.write_preview(data, 2)
    instance_cell, semantic_cell = seen["rows"][0][1], seen["rows"][0][2]
    inst = np.asarray(Image.open(data / "instance" / "a" / "a_00.png"))
    assert _colours(instance_cell) == {tuple(pal.instance_palette()[k]) for k in np.unique(inst)}
    assert _colours(semantic_cell) <= {tuple(pal.semantic_palette(SEM_CLASSES)[k]) for k in range(3)}
    assert [name for name, _ in seen["legend"]] == SEM_CLASSES
    assert seen["labels"] == ["a/a_00", "b/b_00"] and "instance maps" in seen["legend_title"]


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_loss_figure_has_no_empty_band(kind: str, tmp_path: Path) -> None:
    from cfmae_cli.train.plots import plot_losses

    if kind == "finetune":  # per-epoch records with validation accuracy, no per-modality losses
        records = [{"type": "epoch", "epoch": e, "loss": 2.0 - 0.1 * e, "lr": 1e-4 * e, "top1": 40.0 + e,
                    "top5": 90.0} for e in range(1, 4)]
    else:
        records = [{"type": "step", "epoch_float": s / 4, "loss": 5 - s / 10, "lr": 1e-4, "alpha_i": 0.5,
                    "alpha_s": 0.5, "loss_rgb": 1.0, "loss_semantic": 2.0} for s in range(1, 9)]
    path = plot_losses(records, tmp_path / "loss.png")
    white = (np.asarray(Image.open(path).convert("L")) >= 250).all(axis=1)
    longest = run = 0
    for row in white:
        run = run + 1 if row else 0
        longest = max(longest, run)
    assert longest < 0.06 * len(white), f"{longest} blank rows of {len(white)}"
