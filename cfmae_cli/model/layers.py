"""Small building blocks: 2-D sin-cos position embeddings, the input adapters of the modalities' kinds,
cross-attention, activation checkpointing of a block and the count of the bytes kept for the backward pass."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from cfmae_cli import modalities as table
from cfmae_cli.formats import UNLABELLED
from cfmae_cli.modalities import Modality


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (grid², dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def fit_pos_embed(table: Tensor, grid: int) -> Tensor:
    """A position table (1, R, D) of any grid as ours for a grid x grid model: (1, 1 + grid², D).

    R = 1 + g² (a global-token row first, kept) or g² (none: a zero row is put first, as ours has). The g x g
    patch rows are resized bicubically to grid x grid (``align_corners=False``), as MAE and timm interpolate a
    pre-trained table for another resolution. Raises ``ValueError`` for a table of no square grid.
    """
    rows, dim = table.shape[1], table.shape[2]
    for prefix in (1, 0):
        side = math.isqrt(max(rows - prefix, 0))
        if side * side == rows - prefix and side > 0:
            break
    else:
        raise ValueError(f"a position table of {rows} rows is not 1 + g² or g² for a square grid g")
    head = table[:, :1] if prefix else table.new_zeros(1, 1, dim)
    patches = table[:, prefix:]
    if side != grid:
        square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        square = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
        patches = square.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)
    return torch.cat([head, patches], dim=1)


class IdMapAdapter(nn.Module):
    """Instance or semantic map → tokens: per-pixel Embedding(classes+1, e) then Conv2d(e, D, k=s=patch).

    Input (B, h, w) long ids in [0, classes) or 255 (unlabelled, mapped to the extra row); output (B, N, D).
    """

    def __init__(self, num_classes: int, embed_dim: int, pixel_dim: int, patch: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, pixel_dim)
        self.proj = nn.Conv2d(pixel_dim, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, ids: Tensor) -> Tensor:
        ids = torch.where(ids == UNLABELLED, torch.full_like(ids, self.num_classes), ids)
        x = self.embed(ids).permute(0, 3, 1, 2)  # (B, e, h, w)
        return self.proj(x).flatten(2).transpose(1, 2)


class PixelAdapter(nn.Module):
    """An image modality other than the encoder's own (e.g. a grey-level map) → tokens: Conv2d(C, D, k=s=patch).

    Input (B, C, h, w) float; output (B, N, D)."""

    def __init__(self, channels: int, embed_dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def make_adapter(modality: Modality, embed_dim: int, pixel_dim: int, patch: int, classes: int) -> nn.Module:
    """The input adapter of a map modality, by its kind: ids → :class:`IdMapAdapter`, image → :class:`PixelAdapter`.
    ``patch`` is the side of a patch in the modality's own pixels."""
    if modality.kind == "ids":
        return IdMapAdapter(classes, embed_dim, pixel_dim, patch)
    return PixelAdapter(modality.channels, embed_dim, patch)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Nq, d) over a context (B, Nk, d) with SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, nq, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention layer with an MLP: x + CA(LN(x), LN(ctx)), then + MLP(LN(·))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context))
        return x + self.mlp(self.norm2(x))


def embed_tokens(encoder: VisionTransformer, adapters: nn.ModuleDict, modalities: list[str], batch: dict[str, Tensor]
                 ) -> Tensor:
    """All patch tokens of ``modalities`` with positions: (B, M·N, D), in the order given. The modality of the
    patch embedding (RGB) goes through the encoder's own, the others through their adapters; one position
    table is shared by all."""
    pos = encoder.patch_pos
    parts = []
    for name in modalities:
        adapter = encoder.patch_embed if table.get(name).patch_embedding else adapters[name]
        parts.append(adapter(batch[name]) + pos)
    return torch.cat(parts, dim=1)


def map_adapters(modalities: list[str], embed_dim: int, pixel_dim: int, patch_size: int, map_stride: int,
                 classes: dict[str, int]) -> nn.ModuleDict:
    """The adapters of the map modalities of ``modalities`` (their patch side from the table: patch_size, or
    patch_size / map_stride at the map stride)."""
    return nn.ModuleDict({
        name: make_adapter(table.get(name), embed_dim, pixel_dim, patch_side(name, patch_size, map_stride),
                           classes.get(name, 0))
        for name in table.maps_of(modalities)})


def patch_side(name: str, patch_size: int, map_stride: int) -> int:
    """The side of a patch of modality ``name`` in its own pixels."""
    return patch_size // map_stride if table.get(name).at_map_stride else patch_size


def init_weights(model: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linears and patch projections (as linears), unit norms, zero biases,
    N(0, 0.02) embeddings. Learned tokens are initialised by their owners."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


def run_block(block: nn.Module, *args: Tensor, checkpointed: bool) -> Tensor:
    """``block(*args)``; with ``checkpointed`` (``model.grad_checkpointing``), in training with gradients on, through
    ``torch.utils.checkpoint`` (non-reentrant): the block's inner activations are not kept for the backward pass
    but recomputed there from its inputs, with the RNG state of the forward (drop-path draws the same paths)."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return cast(Tensor, checkpoint(block, *args, use_reentrant=False))
    return block(*args)


class SavedBytes:
    """Counts what autograd keeps for the backward pass of ``model``'s forwards while it is entered
    (``torch.autograd.graph.saved_tensors_hooks``): the bytes of each distinct storage of a saved tensor, once
    however many tensors view it (identified by its address; a saved storage stays alive until the backward, so no
    address repeats), leaving out the model's parameters and buffers (not activations). The bytes first saved
    while each block runs (timm's ``Block``, :class:`CrossBlock`: what checkpointing wraps) are also counted per
    block in :attr:`by_block`; with checkpointing, a block saves only its inputs, outside it.
    """

    def __init__(self, model: nn.Module):
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}
        self.by_block: dict[str, int] = {}
        self.active: str | None = None
        blocks = {name: m for name, m in model.named_modules() if isinstance(m, (Block, CrossBlock))}
        self.handles = [h for name, m in blocks.items()
                        for h in (m.register_forward_pre_hook(lambda *_, n=name: self._enter(n)),
                                  m.register_forward_hook(lambda *_: self._enter(None)))]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _enter(self, name: str | None) -> None:
        self.active = name

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            if self.active is not None:
                self.by_block[self.active] = self.by_block.get(self.active, 0) + storage.nbytes()
        return t

    @property
    def total(self) -> int:
        """Bytes of the distinct storages saved so far."""
        return sum(self.storages.values())

    def __enter__(self) -> SavedBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
