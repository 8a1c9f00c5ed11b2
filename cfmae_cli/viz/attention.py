"""Attention of the shared encoder, with fused (SDPA) attention left on.

The weights are rebuilt from what the fused path computes: a forward hook on each block's ``attn.qkv``
captures q and k, and softmax(q·kᵀ·scale) is exactly what the unfused path would have produced (a test
checks it against timm's unfused branch). Maps: the global token's attention per head (DINO), the mean
attention each patch receives, and attention rollout (Abnar & Zuidema: average heads, 0.5·A + 0.5·I,
renormalise the rows, multiply across layers).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, cast

import torch
from timm.layers import Attention
from torch import Tensor, nn


def weights_from_qkv(qkv: Tensor, attn: Attention) -> Tensor:
    """(B, L, 3·D) output of ``attn.qkv`` → (B, heads, L, L) softmax(q·kᵀ·scale), in fp32."""
    b, n, _ = qkv.shape
    q, k, _ = qkv.float().reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def encoder_attention(blocks: Iterable[nn.Module], run: Callable[[], Any]) -> tuple[Any, list[Tensor]]:
    """Call ``run()`` (a forward through ``blocks``, fused attention as configured) and return what it
    returns with every block's attention weights, each (B, heads, L, L), in the order the blocks ran."""
    captured: list[Tensor] = []
    handles = [block_attention(block).qkv.register_forward_hook(
        lambda module, args, out, attn=block_attention(block): captured.append(weights_from_qkv(out, attn)))
        for block in blocks]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def block_attention(block: nn.Module) -> Attention:
    """The ``attn`` of a timm ``Block`` (our encoder's blocks; a windowed one is an ``Attention`` too)."""
    return cast(Attention, block.attn)


def rollout(layers: list[Tensor]) -> Tensor:
    """Attention rollout: (B, heads, L, L) per layer → (B, L, L), the product from the first layer up."""
    result: Tensor | None = None
    for weights in layers:
        a = weights.mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None, "rollout needs at least one layer"
    return result


def keep_mass(values: Tensor, share: float = 0.6) -> Tensor:
    """DINO's display: keep the largest values that make up ``share`` of each row's mass, zero the rest.
    values (..., P) ≥ 0 → same shape."""
    order = values.sort(dim=-1, descending=True)
    cumulative = order.values.cumsum(-1) / order.values.sum(-1, keepdim=True).clamp_min(1e-12)
    keep_sorted = (cumulative - order.values / order.values.sum(-1, keepdim=True).clamp_min(1e-12)) < share
    keep = torch.zeros_like(keep_sorted).scatter(-1, order.indices, keep_sorted)
    return values * keep


def attention_maps(layers: list[Tensor], method: str, layer: int = -1) -> Tensor:
    """Per-patch attention maps (B, heads or 1, L−1) over the tokens after the global token.

    cls: the global token's attention in ``layer`` per head, top 60 % of the mass kept (DINO);
    mean: the mean attention each token receives in ``layer``, per head; rollout: the global token's row of
    the rollout over all layers (one map).
    """
    if method == "cls":
        return keep_mass(layers[layer][:, :, 0, 1:])
    if method == "mean":
        return layers[layer].mean(2)[:, :, 1:]
    if method == "rollout":
        return rollout(layers)[:, 0, 1:].unsqueeze(1)
    raise ValueError(f"unknown attention method {method!r}: cls, mean or rollout")
