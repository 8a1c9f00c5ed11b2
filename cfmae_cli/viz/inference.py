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
from torch import Tensor

from cfmae_cli.checkpoints import newest_checkpoint
from cfmae_cli.config import Config
from cfmae_cli.data.layout import map_path, read_image, read_manifest
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import MANIFEST_NAME, UNLABELLED
from cfmae_cli.masking import MaskGenerator, schedule
from cfmae_cli.model import CFMAE
from cfmae_cli.model.weights import load_weights, read_weights

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
    """A CFMAE pre-training checkpoint (file or run folder; default: the newest run), ready for inference."""
    w = read_weights(spec if spec is not None else newest_checkpoint())
    cfg = w.pretrain_config()
    if cfg is None or "semantic_classes" not in w.top or not any(k.startswith("decoder.") for k in w.state):
        raise CfmaeError(f"{w.path}: not a CFMAE pre-training checkpoint (no decoder in its weights); reconstruct "
                         f"and attention-map need one written by `cfmae pretrain`.")
    classes = list(w.top["semantic_classes"])
    model = CFMAE(cfg, len(classes))
    load_weights(model, w.state, w.source, strict=True, fix="not the model its config describes")
    return Pretrained(model.to(device).eval(), cfg, classes, w.top, w.path)


def load_image(path: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """H×W×3 uint8 and notes for the user (conversions, resizing); unreadable → exit 2 naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
        image, _ = read_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CfmaeError(f"{path}: not a readable image ({exc}).") from None
    notes = [] if mode == "RGB" else [f"{path.name}: {mode} image converted to RGB"]
    h, w = image.shape[:2]
    if min(h, w) < size:
        notes.append(f"{path.name}: {w}x{h} is smaller than the model's {size} px; its centre square is upsampled")
    elif min(h, w) > 4 * size:
        notes.append(f"{path.name}: {w}x{h} is large; its centre square is downsampled to {size} px")
    return image, notes


def dataset_maps(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The image's maps and class names when it lies in ``DATA/rgb/`` of a labelled dataset."""
    from PIL import Image

    path = path.resolve()
    for root in path.parents:
        if (root / MANIFEST_NAME).is_file() and (root / "rgb") in path.parents:
            rel = path.relative_to(root / "rgb")
            cls = str(rel.parent) if str(rel.parent) != "." else ""
            files = [map_path(root, m, cls, path.stem) for m in ("instance", "semantic")]
            if all(f.is_file() for f in files):
                maps = [np.asarray(Image.open(f)).astype(np.int64) for f in files]
                return maps[0], maps[1], read_manifest(root)["semantic_classes"]
    return None


def prepare(net: Pretrained, images: list[np.ndarray], maps: list[tuple[np.ndarray, np.ndarray]],
            device: torch.device) -> dict[str, Tensor]:
    """Centre square, resized: rgb (B, 3, S, S) normalised, instance / semantic (B, S/s, S/s) long."""
    d = net.cfg.data
    t = JointTransform(d.img_size, net.cfg.model.map_stride, net.cfg.model.num_instance_ids, d.crop_scale,
                       d.crop_ratio, 0.0, d.mean, d.std, train=False)
    out = [t(torch.from_numpy(np.array(im)).permute(2, 0, 1), torch.from_numpy(np.array(ins)),
             torch.from_numpy(np.array(sem))) for im, (ins, sem) in zip(images, maps)]
    return {"rgb": torch.stack([o[0] for o in out]).to(device),
            "instance": torch.stack([o[1] for o in out]).to(device),
            "semantic": torch.stack([o[2] for o in out]).to(device)}


def input_masks(net: Pretrained, inputs: list[str], strategy: str, num_visible: int | None, batch: dict[str, Tensor],
                seed: int) -> tuple[Tensor, int]:
    """(B, M, N) masks: the input modalities masked with ``strategy`` to ``num_visible`` tokens in all (one
    input: all of its tokens visible by default), the other modalities fully masked. Returns (mask, V)."""
    model, cfg = net.model, net.cfg
    n, names = model.grid ** 2, model.modalities
    b = batch["rgb"].shape[0]
    visible = num_visible or (n if len(inputs) == 1 else cfg.masking.num_visible)
    if not 1 <= visible <= n * len(inputs):
        raise CfmaeError(f"--num-visible {visible}: must lie in 1..{n * len(inputs)} for {len(inputs)} input(s)")
    if strategy == "progressive":
        done = net.ckpt.get("epoch", cfg.train.epochs) / cfg.train.epochs
        alpha_i, alpha_s = schedule(done, cfg.masking.order, cfg.masking.breakpoints)
    else:
        alpha_i, alpha_s = STRATEGIES[strategy]
    mask = torch.ones(b, len(names), n, dtype=torch.bool, device=batch["rgb"].device)
    if visible == n * len(inputs):
        for m in inputs:
            mask[:, names.index(m)] = False
        return mask, visible
    if visible > n:
        raise CfmaeError(f"--num-visible {visible}: with masking at most {n} (the tokens of one modality); "
                         f"{n * len(inputs)} shows every input token")
    masking = cfg.masking.model_copy(update={"num_visible": visible})
    gen = MaskGenerator(masking, inputs, model.grid, len(net.classes), cfg.model.num_instance_ids)
    sub = gen(alpha_i, alpha_s, b, batch["rgb"].device, instance=batch.get("instance"),
              semantic=batch.get("semantic"), seed=seed).mask
    for j, m in enumerate(inputs):
        mask[:, names.index(m)] = sub[:, j]
    return mask, visible


def errors(net: Pretrained, batch: dict[str, Tensor], mask: Tensor, pred: dict[str, Tensor],
           reference_ok: dict[str, bool]) -> list[dict[str, dict[str, float]]]:
    """Per image and modality, on the masked patches: RGB MSE in [0, 1] pixels; maps pixel accuracy and mIoU
    (classes present in the reference or the prediction, id 255 ignored)."""
    from cfmae_cli.model.losses import patchify_map, patchify_rgb
    from cfmae_cli.viz.recon import map_prediction, rgb_prediction

    model, cfg = net.model, net.cfg
    out: list[dict[str, dict[str, float]]] = [{} for _ in range(batch["rgb"].shape[0])]
    std = torch.tensor(cfg.data.std, device=mask.device).view(1, 3, 1, 1)
    for i, name in enumerate(model.modalities):
        m = mask[:, i]
        if not reference_ok.get(name, True) or not bool(m.any()):
            continue
        if name == "rgb":
            image = rgb_prediction(pred["rgb"], batch["rgb"], m, model.patch, cfg.model.norm_pix_loss)
            diff = patchify_rgb((image - batch["rgb"]) * std, model.patch).pow(2).mean(-1)  # pixels in [0, 1]
            for k in range(len(out)):
                out[k]["rgb"] = {"mse": float(diff[k][m[k]].mean())}
            continue
        ids = map_prediction(pred[name], batch[name], m, model.classes[name])
        grid = model.grid
        p_cells, r_cells = patchify_map(ids, grid), patchify_map(batch[name], grid)
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
