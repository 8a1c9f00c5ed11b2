"""Running a pre-trained CFMAE on single images: checkpoint, image, maps, masks, errors.

Used by ``cfmae reconstruct`` and ``cfmae attention-map``; the engine's periodic grids use ``recon.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.checkpoints import newest_checkpoint
from cfmae_cli.config import Config
from cfmae_cli.data.dataset import BadSample, read_maps
from cfmae_cli.data.layout import Sample, map_path, open_image, read_image, read_manifest
from cfmae_cli.data.maps import resample_map
from cfmae_cli.data.transforms import JointTransform, inputs_on_device
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import MANIFEST_NAME, UNLABELLED
from cfmae_cli.masking import MaskGenerator, schedule, visible_indices
from cfmae_cli.model import CFMAE
from cfmae_cli.model.losses import patchify_ids, patchify_image
from cfmae_cli.model.weights import load_weights, read_weights
from cfmae_cli.viz.recon import map_prediction, rgb_prediction

log = logging.getLogger(__name__)
STRATEGIES = {"random": (0.0, 0.0), "instance": (1.0, 0.0), "semantic": (0.0, 1.0)}


@dataclass
class Pretrained:
    model: CFMAE
    cfg: Config
    classes: list[str]
    ckpt: dict[str, Any] = field(repr=False)
    path: Path = Path()


def load_pretrained(spec: str | Path | None, device: torch.device) -> Pretrained:
    """A CFMAE pre-training checkpoint (file or run folder, or ``hf-hub:owner/name`` of a repository holding one;
    default: the newest run), ready for inference."""
    w = read_weights(spec if spec is not None else newest_checkpoint())
    cfg = w.pretrain_config()
    if cfg is None or "semantic_classes" not in w.top or not any(k.startswith("decoder.") for k in w.state):
        raise CfmaeError(f"{w.path}: not a CFMAE pre-training checkpoint (no decoder in its weights); reconstruct "
                         f"and attention-map need one written by `cfmae pretrain`.")
    classes = list(w.top["semantic_classes"])
    model = CFMAE.from_config(cfg, len(classes))
    load_weights(model, w.state, w.source, strict=True, fix="not the model its config describes")
    return Pretrained(model.to(device).eval(), cfg, classes, w.top, w.path)


def load_image(path: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """H×W×3 uint8 and notes for the user (conversions, resizing); unreadable → exit 2 naming the file."""
    try:
        with open_image(path) as im:
            mode, (w, h) = im.mode, im.size
        image, _ = read_image(path, short_side=2 * size)  # a huge photo is read at a fraction of its size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CfmaeError(f"{path}: not a readable image ({exc}).") from None
    notes = [] if mode == "RGB" else [f"{path.name}: {mode} image converted to RGB"]
    if min(h, w) < size:
        notes.append(f"{path.name}: {w}x{h} is smaller than the model's {size} px; its centre square is upsampled")
    elif min(h, w) > 4 * size:
        notes.append(f"{path.name}: {w}x{h} is large; read at {image.shape[1]}x{image.shape[0]}, its centre square "
                     f"downsampled to {size} px")
    return image, notes


def dataset_maps(path: Path, names: list[str], size: tuple[int, int]) -> tuple[dict[str, np.ndarray], list[str]
                                                                              ] | None:
    """The image's maps of ``names`` (at ``size``, W×H: the image as read) and the semantic class names when it
    lies in ``DATA/rgb/`` of a labelled dataset that has them all."""
    path = path.resolve()
    for root in path.parents:
        images = root / table.embedding_modality()  # DATA/rgb/
        if (root / MANIFEST_NAME).is_file() and images in path.parents:
            rel = path.relative_to(images)
            cls = str(rel.parent) if str(rel.parent) != "." else ""
            files = {m: map_path(root, m, cls, path.stem) for m in names}
            if all(f.is_file() for f in files.values()):
                classes = read_manifest(root)["semantic_classes"]
                with open_image(path) as im:
                    full = im.size
                try:  # read as training reads them (the one reader of id maps, semantic ids checked)
                    read = read_maps(Sample(path, files, 0), full, names, len(classes))
                except BadSample as exc:
                    raise CfmaeError(f"{exc}; fix or remove that map (cfmae pretrain skips its image), or give an "
                                     f"image outside the dataset (the classical labeller makes its maps).") from None
                return {m: resample_map(x.numpy(), (size[1], size[0])) for m, x in read.items()}, classes
    return None


def prepare(net: Pretrained, images: list[np.ndarray], maps: list[dict[str, np.ndarray]],
            device: torch.device) -> dict[str, Tensor]:
    """Centre square, resized: rgb (B, 3, S, S) normalised, each map as the training reader gives it."""
    d = net.cfg.data
    t = JointTransform(d.img_size, net.cfg.model.map_stride, net.cfg.model.num_instance_ids, d.crop_scale,
                       d.crop_ratio, 0.0, d.mean, d.std, train=False)
    out = [t(torch.from_numpy(np.array(im)).permute(2, 0, 1), {m: torch.from_numpy(np.array(x)) for m, x in mp.items()})
           for im, mp in zip(images, maps)]
    batch = {table.embedding_modality(): torch.stack([o[0] for o in out])}
    batch.update({m: torch.stack([o[1][m] for o in out]) for m in out[0][1]})
    batch = inputs_on_device(batch, list(batch), d.mean, d.std, net.cfg.model.image_targets)  # (rgb normalised)
    return {m: x.to(device) for m, x in batch.items()}


def input_masks(net: Pretrained, inputs: list[str], strategy: str, num_visible: int | None, batch: dict[str, Tensor],
                seed: int) -> tuple[Tensor, Tensor]:
    """(B, M, N) masks: the input modalities masked with ``strategy`` to ``num_visible`` tokens in all (one
    input: all of its tokens visible by default), the other modalities fully masked. Returns (mask, the positions
    of its visible tokens (B, V)), the second what the model reads."""
    model, cfg = net.model, net.cfg
    n, names = model.grid ** 2, model.modalities
    b, device = len(next(iter(batch.values()))), next(iter(batch.values())).device
    visible = num_visible or (n if len(inputs) == 1 else cfg.masking.num_visible)
    if not 1 <= visible <= n * len(inputs):
        raise CfmaeError(f"--num-visible {visible}: must lie in 1..{n * len(inputs)} for {len(inputs)} input(s)")
    if strategy == "progressive":
        done = net.ckpt.get("epoch", cfg.train.epochs) / cfg.train.epochs
        alpha_i, alpha_s = schedule(done, cfg.masking.order, cfg.masking.breakpoints)
    else:
        alpha_i, alpha_s = STRATEGIES[strategy]
    mask = torch.ones(b, len(names), n, dtype=torch.bool, device=device)
    if visible == n * len(inputs):
        for m in inputs:
            mask[:, names.index(m)] = False
        return mask, visible_indices(mask, visible)
    if visible > n:
        raise CfmaeError(f"--num-visible {visible}: with masking at most {n} (the tokens of one modality); "
                         f"{n * len(inputs)} shows every input token")
    masking = cfg.masking.model_copy(update={"num_visible": visible})
    gen = MaskGenerator(masking, inputs, model.grid, len(net.classes), cfg.model.num_instance_ids)
    sub = gen(alpha_i, alpha_s, b, device, seed=seed, **table.guide_maps(batch, inputs)).mask
    for j, m in enumerate(inputs):
        mask[:, names.index(m)] = sub[:, j]
    return mask, visible_indices(mask, visible)


def errors(net: Pretrained, batch: dict[str, Tensor], mask: Tensor, pred: dict[str, Tensor],
           reference_ok: dict[str, bool]) -> list[dict[str, dict[str, float]]]:
    """Per image and modality, on the masked patches: images the MSE in [0, 1] pixels (a standardised image,
    depth by default: in its standardised units); id maps the pixel accuracy and mIoU (classes present in the
    reference or the prediction, id 255 ignored)."""

    model, cfg = net.model, net.cfg
    out: list[dict[str, dict[str, float]]] = [{} for _ in range(len(mask))]
    for i, name in enumerate(model.modalities):
        m, spec, x, side = mask[:, i], table.get(name), batch[name], model.patches[name]
        if not reference_ok.get(name, True) or not bool(m.any()):
            continue
        if spec.kind == "image":
            image = rgb_prediction(pred[name], x, m, side, model.targets[name] == "patch_norm")
            scale = torch.tensor(cfg.data.std, device=mask.device).view(1, 3, 1, 1) if spec.normalise else 1.0
            diff = patchify_image((image - x) * scale, side).pow(2).mean(-1)  # pixels in [0, 1]
            for k in range(len(out)):
                out[k][name] = {"mse": float(diff[k][m[k]].mean())}
            continue
        ids = map_prediction(pred[name], x, m, model.classes[name])
        grid = model.grid
        p_cells, r_cells = patchify_ids(ids, grid), patchify_ids(x, grid)
        for k in range(len(out)):
            p, r = p_cells[k][m[k]].flatten(), r_cells[k][m[k]].flatten()
            valid = r != UNLABELLED
            p, r = p[valid], r[valid]
            if r.numel() == 0:
                continue
            ious = [float(((p == c) & (r == c)).sum()) / float(((p == c) | (r == c)).sum())
                    for c in torch.unique(torch.cat([p, r])).tolist()]
            out[k][name] = {"pixel_accuracy": float((p == r).float().mean()), "miou": float(np.mean(ious))}
    return out
