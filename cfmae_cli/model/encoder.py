"""The shared ViT encoder (Eq. 1): timm's ``VisionTransformer``, key for key, built by one factory.

Parameters: ``patch_embed.proj`` (the RGB adapter), ``cls_token`` (the global token), ``pos_embed``
(1, 1+N, D; fixed 2-D sin-cos with a zero row for the global token, not trained in pre-training), ``blocks.*``
(timm ``Block``), ``norm``. :func:`build_encoder` makes every encoder of the package (pre-training,
classification, segmentation, detection, figures) from a named architecture and overrides; a ViT-B is timm's
``vit_base_patch16_224`` without its head.

Forwards: :meth:`ViTEncoder.forward` takes the tokens that are already embedded (the visible tokens of
pre-training, of every input modality, with positions) and puts the global token first;
:meth:`ViTEncoder.forward_image` does the same for a whole RGB image; timm's ``forward_intermediates`` takes an
image and gives the outputs of chosen blocks (the dense heads).

Windowed attention (ViTDet's, for detection at high resolution): ``window_size`` > 0 makes every block but
the last of each quarter of the depth (:func:`global_blocks`: 2, 5, 8, 11 of 12) attend within windows of
``window_size`` x ``window_size`` patches (:class:`WindowedAttention`). The parameters are the same, key for
key, so pre-trained weights load unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from cfmae_cli.config import EncoderArch
from cfmae_cli.model.layers import run_block, sincos_pos_embed

#: width, depth, heads of the standard sizes (timm's vit_<size>_patch16_224 and friends) and of the demo
SIZES: dict[str, tuple[int, int, int]] = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
                                          "large": (1024, 24, 16), "huge": (1280, 32, 16), "demo": (128, 4, 4)}


def global_blocks(depth: int) -> list[int]:
    """The blocks that keep global attention when the others are windowed: the last block of each quarter
    of the depth (ViTDet's 2, 5, 8, 11 for 12 blocks; 5, 11, 17, 23 for 24; every block for 4 or fewer)."""
    return sorted({(k + 1) * depth // 4 - 1 for k in range(4)} - {-1})


class WindowedAttention(Attention):
    """timm's ``Attention`` within non-overlapping windows of the patch grid (ViTDet's windowed blocks).

    The input is the global token followed by the ``grid`` x ``grid`` patch tokens in row order. The patch
    grid is padded with zeros to a multiple of ``window`` (the padded tokens are keys, as in ViTDet, and are
    dropped from the output), each ``window`` x ``window`` window attends within itself, and the global token
    attends to itself alone, so no information crosses windows in this block. Same parameters as
    ``Attention``; ``window`` and ``grid`` are set by :class:`ViTEncoder`.
    """

    window: int = 0
    grid: int = 0

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, c = x.shape
        g, w = self.grid, self.window
        if attn_mask is not None or is_causal or n != 1 + g * g:
            raise ValueError(f"windowed attention takes the global token and the whole {g} x {g} patch grid "
                             f"({1 + g * g} tokens, no mask); got {n} tokens")
        side = -(-g // w) * w
        patches = nn.functional.pad(x[:, 1:].reshape(b, g, g, c), (0, 0, 0, side - g, 0, side - g))
        k = side // w
        windows = patches.reshape(b, k, w, k, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b * k * k, w * w, c)
        out = super().forward(windows).reshape(b, k, k, w, w, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, side, side, c)[:, :g, :g].reshape(b, g * g, c)
        return torch.cat([super().forward(x[:, :1]), out], dim=1)


class ViTEncoder(VisionTransformer):
    """timm's ``VisionTransformer`` with the global token, our fixed sin-cos positions and no head.

    timm's own initialisation is skipped (the models apply MAE's, :func:`~cfmae_cli.model.layers.init_weights`)
    and so is its learned position table, so that building one draws exactly what the layers draw.
    ``final_norm=False`` leaves the final norm out (the dense heads read the blocks). ``window_size`` > 0:
    windowed attention outside :func:`global_blocks` (``windowed`` lists the blocks); such an encoder takes
    whole images of ``img_size`` only. ``grad_checkpointing``: timm's ``set_grad_checkpointing`` (see the module).
    """

    cls_token: nn.Parameter  # set below (timm's may be None)
    pos_embed: nn.Parameter

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, final_norm: bool = True, window_size: int = 0,
                 grad_checkpointing: bool = False):
        windowed = [i for i in range(depth) if i not in global_blocks(depth)] if window_size > 0 else []

        def block(*, depth: int, attn_layer: type[nn.Module], **kwargs: Any) -> Block:
            # the same layers in the same order either way: one seed draws the same weights
            return Block(depth=depth, attn_layer=WindowedAttention if depth in windowed else attn_layer, **kwargs)

        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=0, global_pool="token",
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                         class_token=True, pos_embed="none", drop_path_rate=drop_path, weight_init="skip",
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), final_norm=final_norm,
                         block_fn=block)  # type: ignore[arg-type]  # timm calls block_fn: a Block factory does
        self.grid = img_size // patch_size
        self.window_size, self.windowed = window_size, windowed
        for i in windowed:
            attn = cast(WindowedAttention, self.blocks[i].attn)
            attn.window, attn.grid = window_size, self.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.cat([torch.zeros(1, embed_dim), sincos_pos_embed(embed_dim, self.grid)]).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def patch_pos(self) -> Tensor:
        """(1, N, D) position embedding of the patches (shared by every modality)."""
        return self.pos_embed[:, 1:]

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]  # embedded tokens, not timm's images
        """(B, V, D) embedded tokens with positions added → (B, 1+V, D), the global token first, final norm."""
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.grad_checkpointing)
        return self.norm(x)

    def forward_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images, every patch visible → (B, 1+N, D), the global token first (fine-tuning's
        input on RGB alone; the k-NN monitor and the attention statistics read it)."""
        return self(self.patch_embed(images) + self.patch_pos)

    def block_features(self, images: Tensor, indices: list[int]) -> list[Tensor]:
        """The patch tokens after the blocks of ``indices`` (no final norm) as (B, D, S/p, S/p) maps, in the
        order given (an index may repeat); timm's ``forward_intermediates``."""
        unique = sorted(set(indices))
        maps = cast(list[Tensor], self.forward_intermediates(images, indices=unique, norm=False, output_fmt="NCHW",
                                                             intermediates_only=True))
        return [maps[unique.index(i)] for i in indices]


def architecture(name: str) -> dict[str, Any]:
    """``vit_<size>_patch<p>`` (tiny, small, base, large, huge) or ``demo`` → patch_size, embed_dim, depth,
    num_heads."""
    size, _, patch = name.removeprefix("vit_").partition("_patch")
    if name == "demo":
        size, patch = "demo", "8"
    if size not in SIZES or not patch.isdigit():
        raise ValueError(f"unknown architecture {name!r}: vit_<tiny|small|base|large|huge>_patch<p> or demo")
    dim, depth, heads = SIZES[size]
    return {"patch_size": int(patch), "embed_dim": dim, "depth": depth, "num_heads": heads}


def build_encoder(arch: str | EncoderArch, img_size: int, drop_path: float = 0.0, final_norm: bool = True,
                  window_size: int = 0, grad_checkpointing: bool = False, **overrides: Any) -> ViTEncoder:
    """The encoder of every model: a named architecture (:func:`architecture`) or an :class:`EncoderArch`,
    with ``overrides`` (any of patch_size, embed_dim, depth, num_heads, mlp_ratio) on top; ``window_size`` > 0
    for ViTDet's windowed attention, ``grad_checkpointing`` to recompute each block in the backward pass
    (:class:`ViTEncoder`)."""
    if isinstance(arch, str):  # a standard size: not validated again (no check of this machine's memory)
        arch = EncoderArch.model_construct(**architecture(arch))
    kwargs = {**arch.timm_kwargs(img_size), **overrides}
    return ViTEncoder(**kwargs, drop_path=drop_path, final_norm=final_norm, window_size=window_size,
                      grad_checkpointing=grad_checkpointing)


def timm_name(patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int) -> str:
    """The timm architecture of this shape: ``vit_<size>_patch<p>_<img>`` when timm has it, else the same size at
    224 or at patch 16. A shape of no standard size is named after the nearest standard width (the
    ``model_args`` of an export carry the exact shape either way)."""
    size = next((s for s, shape in SIZES.items() if shape == (embed_dim, depth, num_heads) and s != "demo"), None)
    if size is None:
        size = min((s for s in SIZES if s != "demo"), key=lambda s: abs(SIZES[s][0] - embed_dim))
    for name in (f"vit_{size}_patch{patch_size}_{img_size}", f"vit_{size}_patch{patch_size}_224",
                 f"vit_{size}_patch16_224"):
        if timm.is_model(name):
            return name
    return "vit_base_patch16_224"
