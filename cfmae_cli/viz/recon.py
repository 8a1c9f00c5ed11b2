"""Reconstruction grids: for each modality, the masked input, the prediction and the reference.

RGB predictions made with the norm-pix loss are mapped back to pixels with each reference patch's own mean
and variance, and the visible patches are pasted back (as MAE's demo does). Semantic maps are drawn in the
semantic palette (coloured by class name), instance maps in the instance palette (:mod:`cfmae_cli.viz.palette`);
masked patches of the input are hatched grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.modalities import Modality
from cfmae_cli.model.losses import patchify_image, patchify_ids, unpatchify_image
from cfmae_cli.viz.grid import fit, save_image_grid
from cfmae_cli.viz.palette import legend_entries, map_palette

GREY, HATCH_LINE = np.array([128, 128, 128], np.uint8), np.array([88, 88, 88], np.uint8)
HATCH = 4  # pixels (of the panel's own resolution) between hatching lines
MIN_SIDE = 112  # small demo images are drawn larger (nearest-neighbour)


def unmap_patches(cells: Tensor, grid: int) -> Tensor:
    """Inverse of ``patchify_ids``: (B, N, cells) → (B, h, w)."""
    b, n, c = cells.shape
    side = int(round(c ** 0.5))
    return cells.reshape(b, grid, grid, side, side).permute(0, 1, 3, 2, 4).reshape(b, grid * side, grid * side)


def rgb_prediction(pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """Predicted image in the input's normalisation: (B, N, p·p·3) → (B, 3, H, W), visible patches pasted."""
    target = patchify_image(images.float(), patch)
    pred = pred.float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    out = torch.where(mask.unsqueeze(-1), pred, target)
    return unpatchify_image(out, patch)


def map_prediction(logits: Tensor, ids: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """Predicted id map: (B, N, cells·C) logits → (B, h, w) argmax ids, visible patches pasted."""
    b, n, _ = logits.shape
    grid = int(round(n ** 0.5))
    target = patchify_ids(ids, grid)
    pred = logits.float().reshape(b, n, target.shape[-1], num_classes).argmax(-1)
    return unmap_patches(torch.where(mask.unsqueeze(-1), pred, target), grid)


def rgb_pixels(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalised images (B, 3, H, W) → uint8 (B, H, W, 3) pixels."""
    x = images.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _grey_out(pixels: np.ndarray, mask: Tensor, grid: int) -> np.ndarray:
    """Paint masked patches grey with darker diagonal hatching (so that a masked patch never reads as a grey
    class or a grey photo): pixels (B, H, W, 3), mask (B, N)."""
    b, h, w, _ = pixels.shape
    m = mask.reshape(b, grid, grid).cpu().numpy().repeat(h // grid, 1).repeat(w // grid, 2)
    y, x = np.mgrid[:h, :w]
    hatch = np.where(((x + y) % HATCH == 0)[None, ..., None], HATCH_LINE, GREY)
    out = pixels.copy()
    out[m] = np.broadcast_to(hatch, pixels.shape)[m]
    return out


def image_pixels(images: Tensor, modality: Modality, mean: tuple[float, ...], std: tuple[float, ...],
                 span: tuple[Tensor, Tensor] | None = None) -> np.ndarray:
    """An image modality as the model reads it (B, C, H, W) → uint8 (B, H, W, 3): de-normalised where the table
    says it is normalised, else values in [0, 1], or in ``span`` = (low, high) per image (B, 1, 1, 1) mapped to
    [0, 1]; one channel drawn grey."""
    if modality.normalise:
        return rgb_pixels(images, mean, std)
    x = images.float().cpu()
    if span is not None:
        low, high = span
        x = (x - low) / (high - low).clamp_min(1e-6)
    pixels = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return pixels.repeat(3, axis=-1) if pixels.shape[-1] == 1 else pixels


def display_span(images: Tensor) -> tuple[Tensor, Tensor]:
    """A standardised image's drawing range: its 2nd and 98th percentiles per image, (B, 1, 1, 1) each."""
    flat = images.float().cpu().flatten(1)
    low, high = torch.quantile(flat, torch.tensor([0.02, 0.98]), dim=1)
    return low.view(-1, 1, 1, 1), high.view(-1, 1, 1, 1)


def reconstruction_panels(batch: dict[str, Tensor], mask: Tensor, pred: dict[str, Tensor], modalities: list[str],
                          classes: dict[str, int], patches: dict[str, int], targets: dict[str, str | None],
                          mean: tuple[float, ...], std: tuple[float, ...], class_names: list[str] | None = None
                          ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per modality: (masked input, prediction, reference) as uint8 (B, S, S, 3) arrays at image size; images
    as pixels, id maps in their palette (the table of modalities says which; semantic colours by
    ``class_names``). ``targets``: each image modality's
    regression target (:attr:`CFMAE.targets`): a ``patch_norm`` prediction is mapped back with the reference
    patches' statistics; a ``standardise`` image (depth) is drawn over its reference's 2–98 % range."""
    first = table.embedding_modality()
    size = batch[first].shape[-1] if first in batch else None
    panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i, name in enumerate(modalities):
        m, spec, x = mask[:, i], table.get(name), batch[name]
        grid = int(round(m.shape[1] ** 0.5))
        if spec.kind == "image":
            span = display_span(x) if targets.get(name) == "standardise" else None
            ref = image_pixels(x, spec, mean, std, span)
            guess = rgb_prediction(pred[name], x, m, patches[name], targets.get(name) == "patch_norm")
            out = image_pixels(guess, spec, mean, std, span)
        else:
            colours = map_palette(spec.classes, class_names)
            ref = colours[x.clamp(0, 255).cpu().numpy()]
            out = colours[map_prediction(pred[name], x, m, classes[name]).clamp(0, 255).cpu().numpy()]
        side = max(size or ref.shape[1], MIN_SIDE)
        masked = _grey_out(ref, m, grid)
        drawn = [np.stack([fit(im, side, smooth=False) for im in x]) for x in (masked, out, ref)]
        panels[name] = (drawn[0], drawn[1], drawn[2])
    return panels


def class_legend(batch: dict[str, Tensor], mask: Tensor, pred: dict[str, Tensor], modalities: list[str],
                 classes: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every semantic class in the reference or the prediction of the first map of the
    dataset's classes (the legend of a grid that shows it); empty when no such map is shown."""
    named = [m for m in modalities if table.get(m).classes == "manifest"]
    if not named or not classes:
        return []
    i, name = modalities.index(named[0]), named[0]
    ids = map_prediction(pred[name], batch[name], mask[:, i], len(classes))
    return legend_entries(classes, set(torch.unique(ids).tolist()) | set(torch.unique(batch[name]).tolist()))


def save_grid(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path, title: str = "",
              legend: list[tuple[str, tuple[int, int, int]]] | None = None, command: str | None = None,
              samples: list[str] | None = None) -> Path:
    """Rows = (sample, modality), columns = masked input / prediction / reference; each row labelled with its
    sample's name (``samples``, e.g. the file names; default "image 1", "image 2", …) and modality; the legend
    titled for the maps shown; written atomically, stamped with ``command``."""
    names = list(panels)
    count = panels[names[0]][0].shape[0]
    samples = samples or [f"image {k + 1}" for k in range(count)]
    rows = [[image[k] for image in panels[name]] for k in range(count) for name in names]
    labels = [f"{samples[k]}: {name}" for k in range(count) for name in names]
    return save_image_grid(rows, path, ["masked input", "prediction", "reference"], labels, title, legend,
                           command=command, legend_title=legend_title(names))


def legend_title(modalities: list[str]) -> str:
    """The title of a figure's semantic legend; it says how instance maps are coloured when the figure has one."""
    if any(table.get(m).classes == "instance_ids" for m in modalities if m in table.names()):
        return "semantic classes (instance maps: one colour per object, background black)"
    return "semantic classes"
