"""The figure of ``cfmae attention-map``: a pre-trained CFMAE's encoder attention per patch, over each image.

Every token of the input modalities is visible; the maps of :func:`~cfmae_cli.viz.attention.attention_maps` are
per token, and the tokens of one patch (one per input modality) are summed onto it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import torch
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.errors import CfmaeError
from cfmae_cli.masking import visible_indices
from cfmae_cli.viz.attention import encoder_attention, attention_maps
from cfmae_cli.viz.grid import fit
from cfmae_cli.viz.recon import rgb_pixels

if TYPE_CHECKING:
    from cfmae_cli.model import CFMAE

HEAT = "inferno"  # the colour map of attention


def patch_attention(model: CFMAE, batch: dict[str, Tensor], inputs: list[str], method: str, layer: int) -> Tensor:
    """(B, heads or 1, patches): ``model``'s encoder attention by ``method`` (in ``layer`` for cls / mean) with
    every token of ``inputs`` visible, the modalities' tokens of a patch summed."""
    n, names = model.grid ** 2, model.modalities
    image = batch[table.embedding_modality()]
    mask = torch.ones(len(image), len(names), n, dtype=torch.bool, device=image.device)
    for m in inputs:
        mask[:, names.index(m)] = False
    ids_keep = visible_indices(mask, n * len(inputs))
    (_, keep), layers = encoder_attention(model.encoder.blocks, lambda: model.encode(batch, ids_keep))
    per_token = attention_maps(layers, method, layer)  # (B, H, V)
    per_patch = torch.zeros(*per_token.shape[:2], n, device=per_token.device)
    per_patch.scatter_add_(2, (keep % n).unsqueeze(1).expand_as(per_token), per_token)  # modalities summed
    return per_patch


def pick_heads(per_patch: Tensor, head: str, method: str) -> tuple[Tensor, list[str]]:
    """The maps ``--head`` asks for (a head index, ``mean`` or ``all``; rollout has one map) and their column
    titles."""
    heads = per_patch.shape[1]
    if head == "mean":
        return per_patch.mean(1, keepdim=True), ["mean of heads"]
    if head == "all" or method == "rollout":
        return per_patch, [f"head {h}" for h in range(heads)] if heads > 1 else [method]
    if not head.isdigit() or int(head) >= heads:
        raise CfmaeError(f"--head {head}: a head index 0..{heads - 1}, mean, or all.")
    return per_patch[:, int(head):int(head) + 1], [f"head {head}"]


def overlay(rgb: np.ndarray, values: Tensor, grid: int) -> np.ndarray:
    """Heat map of per-patch values (normalised to [0, 1]) blended over the image."""
    v = values.float().reshape(grid, grid).cpu().numpy()
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    heat = (matplotlib.colormaps[HEAT](v)[..., :3] * 255).astype(np.uint8)
    heat = fit(heat, rgb.shape[0], smooth=False)
    return (0.45 * rgb + 0.55 * heat).astype(np.uint8)


def figure_rows(image: Tensor, per_patch: Tensor, grid: int, mean: tuple[float, ...], std: tuple[float, ...]
                ) -> list[list[np.ndarray]]:
    """One row per image: the image (normalised (B, 3, S, S), drawn at 160 px or more), then each map over it."""
    rgb = [fit(x, max(x.shape[0], 160), smooth=True)  # small models' images are drawn larger
           for x in rgb_pixels(image, mean, std)]
    return [[rgb[k]] + [overlay(rgb[k], per_patch[k, h], grid) for h in range(per_patch.shape[1])]
            for k in range(len(rgb))]
