"""Attention drift as numbers (``cfmae attention-map --stats``): where a ViT's global token looks, over a labelled
dataset, for several encoders side by side (ours, a random initialisation, timm baselines such as MAE or DINO).

Every encoder sees each image the same way: the centred square, resized to its own input size (bilinear,
antialiased), normalised with its own mean and std, every patch visible, RGB alone. Its global token's
attention to the patches is read in the last block (the mean over heads) and from the rollout over all
blocks (:func:`~cfmae_cli.viz.attention.rollout`); both are renormalised over the patches (the global and
other prefix tokens left out). With ``a_p`` that attention on patch p and the image's maps resampled to
``CELLS`` × ``CELLS`` cells per patch (at the cells' centres, :func:`~cfmae_cli.data.maps.resample_map`), per
image:

- object share: ``sum_p a_p f_p``, f_p the share of patch p's cells on an object (instance id not 0 / 255);
  uniform attention gives the object pixel share, ``mean_p f_p``, reported beside it;
- region entropy: the entropy (bits) of the attention mass per semantic region, ``m_c = sum_p a_p g_pc``
  (g_pc the share of patch p's labelled cells in class c, renormalised over c); uniform attention gives the
  entropy of the regions' areas, reported beside it;
- spatial entropy: ``-sum_p a_p log a_p / log N``, 1 for uniform attention, 0 for one patch.

And in every block, for the patch tokens among themselves: queries the patch tokens, keys the patch tokens
(the attention to the prefix tokens dropped and each row renormalised over the N patches, so that each row
is a distribution over the grid), per image:

- mean attention distance (ViT paper, Fig. 7): per head the mean over the queries q of
  ``sum_k a_qk ||pos_q - pos_k||``, positions on the grid in patch units (row, column); the mean over the
  heads, and, over the dataset, the heads nearest and farthest on average (:func:`summarise_all`). Uniform
  attention gives the grid's mean pairwise distance (self pairs included), reported beside it; attention
  on the query itself gives 0;
- patch entropy: per query row ``-sum_k a_qk log a_qk / log N``, the mean over the queries and the heads;
  1 for uniform rows, 0 for rows on one patch.

Each block's (B, heads, L, L) weights are reduced to these numbers as the block runs (:class:`BlockStats`);
only the global token's rows and the rollout's running product (B, L, L) are kept across blocks.

Means over the images with a 95 % percentile bootstrap interval (seeded; images resampled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, cast

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from cfmae_cli.data.dataset import read_maps, skip_reason
from cfmae_cli.data.layout import Sample, read_image
from cfmae_cli.data.maps import BadSample, resample_map
from cfmae_cli.errors import DataError
from cfmae_cli.formats import UNLABELLED
from cfmae_cli.viz.attention import block_attention, rollout, weights_from_qkv
from cfmae_cli.viz.attention_subjects import Subject

CELLS = 4  # map cells per patch side
#: (key, row label) in table order
STATS: list[tuple[str, str]] = [
    ("object_share_last", "object share, last block (mean of heads)"),
    ("object_share_rollout", "object share, rollout"),
    ("object_pixel_share", "object pixel share (= uniform attention)"),
    ("object_excess_last", "object share - pixel share, last block"),
    ("region_entropy_last", "semantic-region entropy, last block (bits)"),
    ("region_entropy_uniform", "semantic-area entropy (= uniform attention, bits)"),
    ("spatial_entropy_last", "spatial entropy, last block (1 = uniform)"),
    ("spatial_entropy_rollout", "spatial entropy, rollout (1 = uniform)"),
]
#: per-block statistics of the patch tokens (queries and keys the patches): (group, heading in the table)
BLOCK_GROUPS: list[tuple[str, str]] = [
    ("mean_distance", "mean attention distance (patches), mean of heads"),
    ("mean_distance_heads", "mean attention distance: nearest - farthest head"),
    ("patch_entropy", "patch entropy (1 = uniform), mean of heads"),
]
#: what the per-block rows are, under the table
BLOCK_NOTE = ("per block: the patch tokens' attention to the patch tokens (prefix tokens left out, rows "
              "renormalised); distance: small = local, large = global; entropy: high = diffuse, 0 = one patch")
UNIFORM_DISTANCE = ("mean_distance_uniform", "uniform attention (the grid's mean pairwise distance)")


def block_key(group: str, block: int) -> str:
    """The statistic's key of a block, e.g. ``mean_distance_b03`` (blocks counted from 0)."""
    return f"{group}_b{block:02d}"


# -- the maps -------------------------------------------------------------------------------------------------
def patch_fractions(ids: Tensor, grid: int, classes: int | None = None) -> Tensor:
    """(h, w) ids, already the centred square → per patch (row-major): with ``classes`` None the share of its
    cells on an object (id not 0, not 255), (N,); else the share of its labelled cells in each class, (N, C),
    rows of unlabelled patches all zero."""
    cells = resample_map(ids, (grid * CELLS, grid * CELLS)).reshape(grid, CELLS, grid, CELLS).permute(0, 2, 1, 3)
    cells = cells.reshape(grid * grid, CELLS * CELLS)
    if classes is None:
        return ((cells != 0) & (cells != UNLABELLED)).float().mean(1)
    labelled = cells != UNLABELLED
    counts = torch.zeros(grid * grid, classes)
    counts.scatter_add_(1, cells.clamp(0, classes - 1) * labelled, labelled.float())
    return counts / labelled.sum(1, keepdim=True).clamp_min(1)


def centre_square(x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    side = min(h, w)
    return x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def read_item(sample: Sample, classes: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(rgb uint8 (3, s, s), instance (s, s), semantic (s, s) or None): the centred square of the image and maps,
    read as training reads them; the semantic map when the manifest's ``classes`` is given (its ids checked
    against it). A file that training would skip stops the statistics here, naming it: they are over every
    image picked."""
    names = ["instance"] if classes is None else ["instance", "semantic"]
    try:
        image, _ = read_image(sample.rgb)
        rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        maps = read_maps(sample, (rgb.shape[-1], rgb.shape[-2]), names, classes or 0)
    except Exception as exc:  # noqa: BLE001 - skip_reason decides, a bug is raised
        reason = skip_reason(exc)
        if reason is None:
            raise
        named = reason if isinstance(exc, BadSample) else f"{sample.rgb}: {reason}"  # (a BadSample names its file)
        raise DataError(f"{named}; --stats reads every image it picks: fix or remove it (cfmae pretrain would skip "
                        f"it).") from None
    sem = maps.get("semantic")
    return centre_square(rgb), centre_square(maps["instance"]), None if sem is None else centre_square(sem)


# -- the numbers ----------------------------------------------------------------------------------------------
def entropy_bits(p: Tensor) -> Tensor:
    """(…, K) distributions → (…,) entropy in bits (0 log 0 = 0)."""
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


def grid_distances(grid: int, device: torch.device | None = None) -> Tensor:
    """(N, N) Euclidean distances between the patches of a ``grid`` x ``grid`` grid (row-major), in patches."""
    index = torch.arange(grid * grid, device=device)
    pos = torch.stack([index // grid, index % grid], -1).float()
    return (pos[:, None] - pos[None]).norm(dim=-1)  # exact differences: 0 on the diagonal


class BlockStats:
    """The per-image statistics (module docstring), fed one block's attention (B, heads, L, L) at a time in the
    order the blocks run: each block's patch-token numbers are taken at once; kept across blocks are only
    the global token's row of the last block and the rollout's running product."""

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix
        self.blocks: list[dict[str, Tensor]] = []
        self.last: Tensor | None = None  # (B, L): the global token's row in the last block fed, mean of heads
        self.roll: Tensor | None = None  # (B, L, L)
        self._distances: Tensor | None = None

    def add(self, weights: Tensor) -> None:
        weights = weights.float()
        n = weights.shape[-1] - self.prefix
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"{n} patch tokens after {self.prefix} prefix token(s): not a square grid")
        if self._distances is None or self._distances.shape[0] != n or self._distances.device != weights.device:
            self._distances = grid_distances(grid, weights.device)
        patches = weights[:, :, self.prefix:, self.prefix:]
        patches = patches / patches.sum(-1, keepdim=True)
        distance = (patches * self._distances).sum(-1).mean(-1)  # (B, heads)
        entropy = -(patches * torch.log(patches.clamp_min(1e-30))).sum(-1) / math.log(n) if n > 1 else \
            torch.zeros(patches.shape[:-1], device=patches.device)
        self.blocks.append({"distance_heads": distance, "entropy": entropy.mean((-2, -1))})
        self.last = weights.mean(1)[:, 0]
        step = rollout([weights])
        self.roll = step if self.roll is None else step @ self.roll

    def result(self, objects: Tensor, regions: Tensor | None) -> dict[str, Tensor]:
        """{statistic: (B,) values, or (B, heads) for ``mean_distance_heads_bNN``}, on the CPU."""
        def on_patches(row: Tensor) -> Tensor:
            row = row[:, self.prefix:].float().cpu()
            return row / row.sum(-1, keepdim=True)

        if self.last is None or self.roll is None:  # (add sets both)
            raise ValueError("no attention was fed (an encoder without blocks?)")
        last = on_patches(self.last)
        roll = on_patches(self.roll[:, 0])
        n = last.shape[-1]
        out = {"object_share_last": (last * objects).sum(-1), "object_share_rollout": (roll * objects).sum(-1),
               "object_pixel_share": objects.mean(-1),
               "spatial_entropy_last": entropy_bits(last) / math.log2(n),
               "spatial_entropy_rollout": entropy_bits(roll) / math.log2(n)}
        out["object_excess_last"] = out["object_share_last"] - out["object_pixel_share"]
        if regions is not None:
            def spread_over(weights: Tensor) -> Tensor:
                mass = torch.einsum("bn,bnc->bc", weights, regions)
                total = mass.sum(-1, keepdim=True)
                return torch.where(total > 0, entropy_bits(mass / total.clamp_min(1e-30)).unsqueeze(-1),
                                   torch.nan)[:, 0]

            out["region_entropy_last"] = spread_over(last)
            out["region_entropy_uniform"] = spread_over(torch.full_like(last, 1 / n))
        for i, block in enumerate(self.blocks):
            heads = block["distance_heads"].cpu()
            out[block_key("mean_distance", i)] = heads.mean(-1)
            out[block_key("mean_distance_heads", i)] = heads
            out[block_key("patch_entropy", i)] = block["entropy"].cpu()
        out[UNIFORM_DISTANCE[0]] = grid_distances(math.isqrt(n)).mean().expand(len(last)).clone()
        return out


def image_stats(layers: list[Tensor], prefix: int, objects: Tensor, regions: Tensor | None) -> dict[str, Tensor]:
    """Per-image statistics (module docstring) from every block's attention (B, heads, L, L), the objects' share
    per patch (B, N) and the regions' (B, N, C) or None (:class:`BlockStats` fed every block in turn)."""
    stats = BlockStats(prefix)
    for weights in layers:
        stats.add(weights)
    return stats.result(objects, regions)


def stream_attention(blocks: Iterable[nn.Module], run: Callable[[], Any], each: Callable[[Tensor], None]) -> Any:
    """Call ``run()`` (a forward through ``blocks``, fused attention left on) and hand each block's attention
    weights (B, heads, L, L) to ``each`` as the block runs (:func:`~cfmae_cli.viz.attention.encoder_attention`
    without keeping them)."""
    handles = [block_attention(block).qkv.register_forward_hook(
        lambda module, args, out, attn=block_attention(block): each(weights_from_qkv(out, attn))) for block in blocks]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure(subject: Subject, samples: Sequence[Sample], semantic_classes: int | None, batch_size: int = 32,
            device: torch.device = torch.device("cpu")) -> dict[str, np.ndarray]:
    """{statistic: (images,) values} of one subject (NaN where an image has no labelled semantic cell); the
    per-head distances ``mean_distance_heads_bNN`` are (images, heads)."""
    values: dict[str, list[Tensor]] = {}
    mean = torch.tensor(subject.mean).view(1, 3, 1, 1)
    std = torch.tensor(subject.std).view(1, 3, 1, 1)
    for start in range(0, len(samples), batch_size):
        items = [read_item(s, semantic_classes) for s in samples[start:start + batch_size]]
        rgb = torch.stack([TF.resize(x[0], [subject.img_size] * 2, antialias=True) for x in items]).float() / 255
        objects = torch.stack([patch_fractions(x[1], subject.grid) for x in items])
        regions = None if semantic_classes is None else \
            torch.stack([patch_fractions(cast(Tensor, x[2]), subject.grid, semantic_classes)  # read with classes
                         for x in items])
        images = ((rgb - mean) / std).to(device)
        accumulator = BlockStats(subject.prefix)
        stream_attention(subject.blocks, lambda: subject.run(images), accumulator.add)
        for key, v in accumulator.result(objects, regions).items():
            values.setdefault(key, []).append(v)
    return {k: torch.cat(v).double().numpy() for k, v in values.items()}


def summarise(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict[str, Any]:
    """Mean over the images (NaNs left out) with a 95 % percentile bootstrap interval."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"mean": None, "ci95": None, "images": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "images": int(v.size)}


def summarise_all(values: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`summarise` of every statistic of :func:`measure`; each block's per-head distances become the head
    nearest (``mean_distance_nearest_head_bNN``) and the head farthest (``…_farthest_head_bNN``) on average
    over the images, each with its mean, interval and ``head`` (its index)."""
    out: dict[str, dict[str, Any]] = {}
    for key, v in values.items():
        if v.ndim == 1:
            out[key] = summarise(v, seed)
            continue
        block = key.rsplit("_b", 1)[1]
        means = v.mean(0)
        for which, head in (("nearest", int(np.argmin(means))), ("farthest", int(np.argmax(means)))):
            out[f"mean_distance_{which}_head_b{block}"] = {**summarise(v[:, head], seed), "head": head}
    return out


@dataclass
class Row:
    """One row of the table: ``section`` "" for the global token's rows (:data:`STATS`), else a heading of
    :data:`BLOCK_GROUPS`; ``keys`` its statistic (two for a block's nearest and farthest head, one cell);
    ``label`` as the table shows it, ``long`` each key's label as the JSON shows it; ``block`` the block, None
    for the others."""

    section: str
    keys: tuple[str, ...]
    label: str
    long: tuple[str, ...]
    block: int | None = None


def table_rows(keys: Iterable[str]) -> list[Row]:
    """The rows of the statistics among ``keys`` (of one or several models, blocks up to the deepest), in table
    order: the global token's, then per block the mean distance (and uniform attention's), the nearest and
    farthest head, the patch entropy."""
    keys = set(keys)
    rows = [Row("", (key, ), label, (label, )) for key, label in STATS if key in keys]
    depth = 1 + max((int(k.rsplit("_b", 1)[1]) for k in keys if k.startswith("patch_entropy_b")), default=-1)
    long = {"mean_distance": "mean attention distance (patches), patch tokens, mean of heads",
            "patch_entropy": "patch entropy (1 = uniform), patch tokens, mean of heads"}
    for group, heading in BLOCK_GROUPS:
        for i in range(depth):
            if group == "mean_distance_heads":
                pair = (block_key("mean_distance_nearest_head", i), block_key("mean_distance_farthest_head", i))
                if all(key in keys for key in pair):
                    rows.append(Row(heading, pair, f"block {i}", tuple(
                        f"mean attention distance (patches), patch tokens, the {which} head on average over the "
                        f"images, block {i}" for which in ("nearest", "farthest")), i))
            elif block_key(group, i) in keys:
                rows.append(Row(heading, (block_key(group, i), ), f"block {i}", (f"{long[group]}, block {i}", ), i))
        if group == "mean_distance" and UNIFORM_DISTANCE[0] in keys:
            rows.append(Row(heading, (UNIFORM_DISTANCE[0], ), "uniform attention",
                            (f"mean attention distance (patches) of {UNIFORM_DISTANCE[1]}", )))
    return rows


def cell_text(results: dict[str, dict[str, Any]], row: Row) -> str:
    """One model's cell of a table row (its :func:`summarise_all`): mean [95 % interval], the nearest and the
    farthest head's means for a pair, ``-`` where the model has no value."""
    found = [c for c in (results.get(key) for key in row.keys) if c is not None and c["mean"] is not None]
    if len(found) < len(row.keys):
        return "-"
    if len(found) == 2:  # the nearest and the farthest head
        return f"{found[0]['mean']:.3f} - {found[1]['mean']:.3f}"
    c = found[0]
    return f"{c['mean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"


def statistics_json(rows: list[Row], results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The ``statistics`` of the report: per key its label (and block), and each model's summary (models in
    the order of ``results``)."""
    statistics = {}
    for row in rows:
        for key, label in zip(row.keys, row.long):
            statistics[key] = {"label": label, **({"block": row.block} if row.block is not None else {}),
                               **{name: found[key] for name, found in results.items() if key in found}}
    return statistics


def subject_json(subject: Subject) -> dict[str, Any]:
    """A model of the report: name, description, input size, patch size, grid, blocks."""
    return {"name": subject.name, "description": subject.description, "img_size": subject.img_size,
            "patch_size": subject.patch_size, "grid": subject.grid, "blocks": len(subject.blocks)}
