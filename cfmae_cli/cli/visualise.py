"""``cfmae reconstruct`` and ``cfmae attention-map``: pictures of what a pre-trained CFMAE does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from cfmae_cli import modalities as table
from cfmae_cli.cli.common import console, device_of, guarded
from cfmae_cli.errors import CfmaeError
from cfmae_cli.config import check_weights_file
from cfmae_cli.formats import atomic_write_text, check_output, json_stamp, UNLABELLED

if TYPE_CHECKING:  # the command line's help imports this module: numpy, torch and the model only when drawing
    import numpy as np
    import torch

    from cfmae_cli.viz.inference import Pretrained


def image_maps(path: Path, image: np.ndarray, names: list[str]) -> tuple[dict[str, np.ndarray], list[str], str]:
    """The maps of ``names`` from the image's dataset folder, else from the classical labeller (which makes
    instance and semantic maps): (maps, semantic class names, where they came from)."""
    import numpy as np

    from cfmae_cli.viz.inference import dataset_maps

    found = dataset_maps(path, names, (image.shape[1], image.shape[0]))
    if found is not None:
        return (*found, "dataset")
    from cfmae_cli.labeling.classical import SEMANTIC_CLASSES, ClassicalLabeller

    labelled = dict(zip(("instance", "semantic"), ClassicalLabeller().label(image)))
    lacking = [m for m in names if m not in labelled]
    if lacking:
        raise CfmaeError(f"{path}: the checkpoint reads {', '.join(lacking)} maps too; give an image of a dataset "
                         f"folder that has them (the classical labeller makes instance and semantic maps).")
    return {m: labelled[m].astype(np.int64) for m in names}, list(SEMANTIC_CLASSES), "classical labeller"


GPUS_HELP = "0 = the CPU, 1 = one GPU (the same as --device cpu / cuda)"


def _device(name: str, gpus: Optional[int] = None) -> torch.device:
    import torch

    chosen = device_of(name, gpus)
    if chosen == "cuda" and not torch.cuda.is_available():
        raise CfmaeError("--device cuda: no GPU is visible.")
    return torch.device("cuda" if chosen == "cuda" or (chosen == "auto" and torch.cuda.is_available()) else "cpu")


def _inputs(text: str, net: Pretrained) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in net.model.modalities]
    if not names or bad or len(set(names)) != len(names):
        raise CfmaeError(f"--modalities {text}: choose from {', '.join(net.model.modalities)} (comma-separated, "
                         f"each once); the checkpoint was trained on these.")
    return [m for m in net.model.modalities if m in names]


def _load(paths: list[Path], net: Pretrained, need_maps: bool) -> tuple[list[np.ndarray], list, dict[str, bool]]:
    """Images (with notes printed) and the maps of the checkpoint's modalities; a map of the dataset's classes
    (semantic) whose classes differ from the checkpoint's is replaced by 'unlabelled' and marked as no
    reference (``ok[name]`` False)."""
    import numpy as np

    from cfmae_cli.viz.inference import load_image

    names = table.maps_of(net.model.modalities)
    by_manifest = [m for m in names if table.get(m).classes == "manifest"]
    images, maps, ok = [], [], {m: True for m in by_manifest}
    for path in paths:
        if not path.is_file():
            raise CfmaeError(f"{path}: image not found.")
        image, notes = load_image(path, net.cfg.data.img_size)
        for note in notes:
            console.print(f"note: {note}", highlight=False)
        h, w = image.shape[:2]
        if need_maps:
            found, classes, source = image_maps(path, image, names)
            for m in by_manifest:
                if classes != net.classes:
                    ok[m] = False
                    console.print(f"note: {path.name}: its {m} map ({source}, {len(classes)} classes) does not use "
                                  f"the checkpoint's {len(net.classes)} classes; it is not shown or used",
                                  highlight=False)
                    found[m] = np.full_like(found[m], UNLABELLED)
        else:  # nothing of the maps is shown: blanks of their shapes
            found = {m: np.zeros(image.shape[:2], np.int64) if table.get(m).kind == "ids" else
                     np.zeros((table.get(m).channels, h, w), np.uint8) for m in names}
        images.append(image)
        maps.append(found)
    return images, maps, ok


def _refuse_foreign_classes(inputs: list[str], ok: dict[str, bool]) -> None:
    for m in inputs:
        if not ok.get(m, True):
            raise CfmaeError(f"--modalities includes {m}, but the {m} maps do not use the checkpoint's classes; use "
                             f"images from a dataset labelled like the training data.")


def _outputs(out: Path, images: list[Path], checkpoint: Optional[str | Path], command: str, *beside: str) -> Path:
    """``out`` (and the files ``beside`` it, by suffix) if writing them replaces no input, no file of the user's and
    no file of another command (:func:`check_output`)."""
    inputs = [*images, *([Path(checkpoint)] if checkpoint not in (None, "random") else [])]
    check_output(out, inputs, command=command)
    for suffix in beside:
        check_output(out.with_suffix(suffix), inputs, command=command, beside=out)
    return out


@guarded
def reconstruct(
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="image file(s); maps come from their dataset "
                                        "folder if they are in one, else from the classical labeller"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT",
                                              show_default="the newest pre-training run",
                                              help="pre-training checkpoint or run folder"),
    modality: str = typer.Option("rgb", "--modalities", metavar="LIST", help="input modalities, e.g. rgb or "
                                 "rgb,instance,semantic; the others are predicted"),
    masking: str = typer.Option("random", "--masking", metavar="NAME", help="random, semantic, instance or "
                                "progressive"),
    num_visible: Optional[int] = typer.Option(None, "--num-visible", min=1, metavar="N",
                                              show_default="all of a single input; the config's num_visible for "
                                              "several", help="visible input tokens"),
    seed: int = typer.Option(0, "--seed", metavar="N", help="seed of the masks"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", show_default="<first image>-reconstruct.png",
                                       help="grid PNG (a JSON of errors is written "
                                       "beside it)"),
    device: str = typer.Option("auto", "--device", metavar="NAME", help="auto, cpu or cuda"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, max=1, metavar="N", show_default="--device's",
                                       help=GPUS_HELP),
) -> None:
    """Masked multi-granular reconstruction (paper Fig. 3) or single-modality prediction (Fig. 4, 8-10).

    Example, RGB in, instance and semantic maps out: cfmae reconstruct photo.jpg --modalities rgb

    Example, all three masked: cfmae reconstruct photo.jpg --modalities rgb,instance,semantic --masking semantic
    """
    if checkpoint is not None:
        check_weights_file(checkpoint)  # sizes checked before torch is imported (docs/export.md)
    import torch

    from cfmae_cli.viz.inference import errors, input_masks, load_pretrained, prepare

    if masking not in ("random", "semantic", "instance", "progressive"):
        raise CfmaeError(f"--masking {masking}: choose random, semantic, instance or progressive.")
    out = _outputs(out or Path(f"{images[0].stem}-reconstruct.png"), images, checkpoint, "reconstruct", ".json")
    net = load_pretrained(checkpoint, _device(device, gpus))
    inputs = _inputs(modality, net)
    pixels, maps, ok = _load(images, net, need_maps=True)
    _refuse_foreign_classes(inputs, ok)
    batch = prepare(net, pixels, maps, net.model.encoder.cls_token.device)
    mask, ids_keep = input_masks(net, inputs, masking, num_visible, batch, seed)
    visible = ids_keep.shape[1]
    with torch.no_grad():
        pred = net.model.predict(batch, ids_keep)
    from cfmae_cli.viz.recon import class_legend, reconstruction_panels, save_grid

    model, cfg = net.model, net.cfg
    panels = reconstruction_panels(batch, mask, pred, model.modalities, model.classes, model.patches,
                                   model.targets, cfg.data.mean, cfg.data.std, net.classes)
    legend = class_legend(batch, mask, pred, model.modalities, net.classes)
    save_grid(panels, out, f"{net.path}: input {'+'.join(inputs)}, masking {masking}, {visible} visible", legend,
              command="reconstruct", samples=[p.name[-28:] for p in images])
    report = {**json_stamp("reconstruct"), "checkpoint": str(net.path), "inputs": inputs, "masking": masking,
              "num_visible": visible, "seed": seed,
              "images": [{"image": str(p), "errors": e}
                         for p, e in zip(images, errors(net, batch, mask, pred, ok))]}
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.json')}", highlight=False)


@guarded
def attention_map(
    images: Optional[list[Path]] = typer.Argument(None, metavar="IMAGE", show_default="none: give --stats",
                                                  help="image file(s) (none with --stats)"),
    checkpoint: Optional[list[str]] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT",
                                                   show_default="the newest pre-training run",
                                                   help="pre-training checkpoint or run folder; with --stats "
                                                   "repeatable, any weights file, or 'random'"),
    method: str = typer.Option("cls", "--method", metavar="NAME", help="cls (global token, DINO), mean (received) "
                               "or rollout"),
    layer: int = typer.Option(-1, "--layer", metavar="N", help="encoder block for cls / mean (-1 = the last)"),
    head: str = typer.Option("all", "--head", metavar="HEAD", help="a head index, mean, or all (one panel per head)"),
    modality: str = typer.Option("rgb", "--modalities", metavar="LIST", help="input modalities (all their tokens "
                                 "visible)"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", show_default="<first image>-attention-<method>"
                                       ".png; with --stats attention-stats.json", help="grid PNG; with --stats the JSON"),
    device: str = typer.Option("auto", "--device", metavar="NAME", help="auto, cpu or cuda"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, max=1, metavar="N", show_default="--device's",
                                       help=GPUS_HELP),
    stats: Optional[Path] = typer.Option(None, "--stats", metavar="FOLDER", show_default="none: draw the images",
                                         help="a labelled dataset folder (rgb/, instance/, semantic/): attention "
                                         "statistics over its images, one column per model"),
    model: Optional[list[str]] = typer.Option(None, "--model", metavar="MODEL", show_default="none",
                                              help="with --stats: a timm model name (repeatable), each with its "
                                              "--weights"),
    weights: Optional[list[Path]] = typer.Option(None, "--weights", metavar="FILE", show_default="none",
                                                 help="with --stats: the local weights file (or exported folder) of "
                                                 "each --model, in order"),
    max_images: int = typer.Option(1000, "--limit", min=1, metavar="N", help="with --stats: at most N images, "
                                   "spread evenly over the classes"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, metavar="N", help="with --stats: images per forward"),
    seed: int = typer.Option(0, "--seed", metavar="N", help="with --stats: seed of 'random' and of the bootstrap"),
) -> None:
    """Encoder attention over the image (paper Fig. 1), computed with fused attention left on; with --stats, as
    numbers over a dataset (object share, region and spatial entropy; per block the patch tokens' mean attention
    distance and entropy, docs/visualisation.md).

    Example: cfmae attention-map photo.jpg --method rollout

    Example: cfmae attention-map --stats DATA --checkpoint runs/pretrain/demo --checkpoint random --model
    vit_base_patch16_224.mae --weights mae_pretrain_vit_base.pth
    """
    to_check: list[str | Path] = [*(c for c in checkpoint or [] if c != "random"), *(weights or [])]
    for path in to_check:
        check_weights_file(path)  # sizes checked before torch is imported (docs/export.md)
    from cfmae_cli.viz.inference import load_pretrained, prepare

    checkpoints, models, weights = list(checkpoint or []), list(model or []), list(weights or [])
    if stats is not None:
        if images:
            raise CfmaeError("--stats measures a dataset folder; give no image files with it.")
        return _attention_stats(stats, checkpoints, models, weights, max_images, batch_size, seed, out, device,
                                gpus)
    if not images:
        raise CfmaeError("attention-map: give image file(s), or --stats DATA for statistics over a dataset.")
    if models or weights:
        raise CfmaeError("--model / --weights go with --stats (the figures draw cfmae pre-training checkpoints).")
    if len(checkpoints) > 1 or "random" in checkpoints:
        raise CfmaeError("--checkpoint: one pre-training checkpoint for the figures (several, and 'random', go "
                         "with --stats).")
    chosen = checkpoints[0] if checkpoints else None
    if method not in ("cls", "mean", "rollout"):
        raise CfmaeError(f"--method {method}: choose cls, mean or rollout.")
    out = _outputs(out or Path(f"{images[0].stem}-attention-{method}.png"), images, chosen, "attention-map")
    net = load_pretrained(chosen, _device(device, gpus))
    cfmae = net.model
    depth = len(cfmae.encoder.blocks)
    if not -depth <= layer < depth:
        raise CfmaeError(f"--layer {layer}: the encoder has {depth} blocks (0..{depth - 1}, or -1 for the last).")
    inputs = _inputs(modality, net)
    pixels, maps, ok = _load(images, net, need_maps=bool(table.maps_of(inputs)))
    _refuse_foreign_classes(inputs, ok)
    batch = prepare(net, pixels, maps, cfmae.encoder.cls_token.device)
    from cfmae_cli.viz.attention_figure import figure_rows, HEAT, patch_attention, pick_heads
    from cfmae_cli.viz.grid import save_image_grid

    per_patch, titles = pick_heads(patch_attention(cfmae, batch, inputs, method, layer), head, method)
    rows = figure_rows(batch[table.embedding_modality()], per_patch, cfmae.grid, net.cfg.data.mean, net.cfg.data.std)
    where = "" if method == "rollout" else f", layer {layer % depth}"
    save_image_grid(rows, out, ["image"] + titles, [p.name[-28:] for p in images],
                    f"{net.path}: {method} attention{where}, input {'+'.join(inputs)}\n"
                    "each map scaled to its own range", colorbar=(HEAT, "attention"), command="attention-map")
    console.print(f"wrote {out}", highlight=False)


def _attention_stats(root: Path, checkpoints: list[str], models: list[str], weights: list[Path], max_images: int,
                     batch_size: int, seed: int, out: Optional[Path], device_name: str,
                     gpus: Optional[int] = None) -> None:
    """``attention-map --stats``: the statistics of every model over the dataset, a table and a JSON."""
    from rich.console import Console
    from rich.table import Table

    from cfmae_cli.checkpoints import newest_checkpoint
    from cfmae_cli.data.layout import list_samples, read_manifest
    from cfmae_cli.data.splits import spread
    from cfmae_cli.viz import attention_stats as st
    from cfmae_cli.viz.attention_subjects import subjects as subjects_of

    if len(models) != len(weights):
        raise CfmaeError(f"--model / --weights: {len(models)} model name(s) and {len(weights)} weights file(s); "
                         f"give each --model its --weights, in order.")
    out = check_output(out or Path("attention-stats.json"), [*weights, *(Path(c) for c in checkpoints)],
                       command="attention-map")
    if not (root / "rgb").is_dir():
        raise CfmaeError(f"{root}: no rgb/ folder; --stats reads a labelled dataset (rgb/, instance/, semantic/; "
                         f"docs/dataset-format.md).")
    if not (root / "instance").is_dir():
        raise CfmaeError(f"{root}: no instance/ folder; --stats needs each image's instance map (its object pixels). "
                         f"Label the images with `cfmae label` (docs/labelling.md).")
    semantic = (root / "semantic").is_dir()
    samples, _ = list_samples(root, maps=["instance", "semantic"] if semantic else ["instance"])
    samples = spread(samples, max_images)
    classes = int(read_manifest(root)["num_semantic_classes"]) if semantic else None
    device = _device(device_name, gpus)
    if not checkpoints and not models:
        checkpoints = [str(newest_checkpoint())]
    subjects = subjects_of(checkpoints, models, weights, classes, device, seed)
    names = [subject.name for subject in subjects]
    results = {}
    for subject in subjects:
        console.print(f"{subject.name}: {subject.description}; {subject.img_size} px, {subject.grid}x{subject.grid} "
                      f"patches", highlight=False)
        values = st.measure(subject, samples, classes, batch_size, device)
        results[subject.name] = st.summarise_all(values, seed)
    rows = st.table_rows(key for name in names for key in results[name])

    view = Table(title=f"attention statistics over {len(samples)} images of {root} (mean [95 % bootstrap interval])",
                 caption=st.BLOCK_NOTE if any(row.section for row in rows) else None, caption_justify="left")
    view.add_column("statistic", no_wrap=True)
    for name in names:
        view.add_column(name, justify="right", no_wrap=True)
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            view.add_row(f"[bold]{section or 'global token -> patches'}[/bold]", *[""] * len(names))
        view.add_row(row.label if not row.section else f"  {row.label}", *[st.cell_text(results[name], row) for name in names])
    labels = [row.section or "global token -> patches" for row in rows] + [f"  {row.label}" for row in rows]
    widest = max(len(label) for label in labels)
    cells = [len(st.cell_text(results[name], row)) for name in names for row in rows] + [len(name) for name in names]
    # never cut the intervals off
    Console(width=max(console.width, widest + 4 + (max(cells) + 3) * len(names))).print(view)
    if not semantic:
        console.print(f"note: {root} has no semantic/ folder: no region entropy.", highlight=False)
    report = {**json_stamp("attention-map"), "data": str(root), "images": len(samples), "cells_per_patch": st.CELLS,
              "seed": seed, "models": [st.subject_json(s) for s in subjects],
              "statistics": st.statistics_json(rows, results)}
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}", highlight=False)

