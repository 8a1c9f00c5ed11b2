"""Architecture sizes: the largest model cfmae builds, key by key; about how many parameters the models it builds
have; whether their weights fit in this machine's memory. Arithmetic on plain numbers, no torch: a config is
checked before anything is built (:mod:`cfmae_cli.config_schema` for a new run's, :mod:`cfmae_cli.config_stored`
for a checkpoint's or an export's)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from cfmae_cli import modalities as table

# The largest architecture cfmae builds, key by key: generous for every published ViT (ViT-22B: width 6144,
# depth 48; ViT-e: MLP ratio 8.6; SAM's ViT-H at 1024 px: a 64 x 64 patch grid), so that only a damaged or
# foreign config meets them. What stays within each bound but not together is caught by the memory check
# (:func:`memory_problem`). Both run before anything is built (:func:`check_config_sizes`).
MAX_WIDTH = 16384  # embed_dim, decoder.dim, map_embed_dim, heads, pyramid channels
MAX_DEPTH = 256  # encoder blocks, decoder self-attention blocks
MAX_MLP_RATIO = 64.0
MAX_PATCH = 256  # pixels per side of a patch
MAX_PIXELS = 16384  # img_size
MAX_GRID = 256  # patches per side of the input (65,536 tokens)
MAX_CLASSES = 1 << 20  # classes of a head
BYTES_PER_PARAMETER = 4  # float32: what a model is built in


@functools.lru_cache(maxsize=1)
def machine_memory() -> int | None:
    """Bytes of memory this process can have: the machine's physical memory, or a container's smaller limit
    (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``); None where neither can be read."""
    try:
        total: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def block_parameters(dim: float, mlp_ratio: float) -> float:
    """Parameters of one transformer block (attention, MLP of ``dim * mlp_ratio``, two norms)."""
    hidden = dim * mlp_ratio
    return 4 * dim * dim + 2 * dim * hidden + 9 * dim + hidden


def encoder_parameters(dim: float, depth: float, mlp_ratio: float, patch: float, grid: float = 0) -> float:
    """Parameters of a ViT encoder: its blocks, the patch embedding and (with ``grid``) the position table."""
    return depth * block_parameters(dim, mlp_ratio) + 3 * patch * patch * dim + (grid * grid + 4) * dim


def _map_parameters(model: dict[str, Any], modalities: list[str], semantic_classes: int, head_dim: float = 0
                    ) -> float:
    """The input adapters of the modalities besides the patch embedding and, with ``head_dim`` (the decoder's
    width), their reconstruction heads."""
    dim, patch, stride = model["embed_dim"], model["patch_size"], max(model["map_stride"], 1)
    total = 0.0
    for name in modalities:
        spec = table.TABLE.get(name)
        if spec is None:
            continue
        if spec.kind == "ids":
            classes = table.num_classes(spec, semantic_classes, model["num_instance_ids"])
            side = max(patch // stride, 1)
            total += (classes + 1) * model["map_embed_dim"] + model["map_embed_dim"] * dim * side * side
            total += head_dim * side * side * classes
        else:
            channels = spec.channels or 3
            total += 0 if spec.patch_embedding else channels * patch * patch * dim
            total += head_dim * patch * patch * channels
    return total


def pretrain_parameters(model: dict[str, Any], img_size: int, modalities: list[str], semantic_classes: int = 0
                        ) -> float:
    """About the parameters of a CFMAE (``model``: a pre-training config's model section as a dict): the encoder,
    the map adapters, a decoder task (its first block, the self-attention blocks, the projection from the
    encoder) per modality, and the heads."""
    dim, dec = model["embed_dim"], model["decoder"]
    total = encoder_parameters(dim, model["depth"], model["mlp_ratio"], model["patch_size"],
                               img_size // max(model["patch_size"], 1))
    tasks = [m for m in modalities if m in table.TABLE]
    total += len(tasks) * ((1 + dec["self_blocks"]) * block_parameters(dec["dim"], dec["mlp_ratio"]) +
                           (dim + 2) * dec["dim"])
    return total + _map_parameters(model, tasks, semantic_classes, dec["dim"])


def finetune_parameters(encoder: dict[str, Any], img_size: int, modalities: list[str], kind: str, classes: int,
                        channels: int = 0, semantic_classes: int = 0) -> float:
    """About the parameters of a fine-tuned model: the encoder and its adapters, and the head of ``kind`` (a
    linear classifier; UperNet on a simple pyramid with ``channels``; Mask R-CNN on ViTDet's pyramid with
    ``channels``)."""
    dim = encoder["embed_dim"]
    total = encoder_parameters(dim, encoder["depth"], encoder["mlp_ratio"], encoder["patch_size"],
                               img_size // max(encoder["patch_size"], 1))
    total += _map_parameters(encoder, modalities, semantic_classes)
    c = channels
    if kind == "segmentation":
        return total + 12 * dim * dim + 16 * dim * c + 99 * c * c + c * classes
    if kind == "detection":
        return total + 5 * dim * dim + 3 * dim * c + 85 * c * c + 50176 * c + 2 ** 20 + 5200 * (classes + 1)
    return total + (dim + 1) * classes


def _size(n: float) -> str:
    for step, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= step:
            return f"{n / step:.1f} {prefix}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB")):
        if n >= 1024 ** power:
            return f"{n / 1024 ** power:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def memory_problem(parameters: float) -> str | None:
    """What is wrong with building a model of ``parameters`` here: its float32 weights alone need more than this
    machine's memory (:func:`machine_memory`); None when they fit (or the memory is unknown)."""
    have, need = machine_memory(), parameters * BYTES_PER_PARAMETER
    if have is None or need <= have:
        return None
    return (f"has about {_size(parameters)} parameters: {_bytes(need)} in float32, more than the "
            f"{_bytes(have)} of memory of this machine")


def grid_problem(img_size: float, patch_size: float) -> str | None:
    """What is wrong with the patch grid of ``img_size`` / ``patch_size``: more than ``MAX_GRID`` per side."""
    grid = int(img_size // max(patch_size, 1))
    if grid <= MAX_GRID:
        return None
    return f"is a {grid:,} x {grid:,} patch grid, above the {MAX_GRID} x {MAX_GRID} that cfmae builds"
