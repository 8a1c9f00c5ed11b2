"""The cascaded decoder (§3.2, Eqs. 2–3) and its parallel (MultiMAE-like) ablation.

H (B, M·N, d): encoder tokens projected to the decoder width and put back at their positions, a learned
mask token elsewhere, plus the decoder's sin-cos position and a learned per-modality embedding.
Task t at step k: Q = H[slice of t] (B, N, d); K = V = H ⊕ F^{k−1}, F^{k−1} (B, N, d) added to each
modality segment of H at the same patch position (F⁰ = 0); F^k = TaskBlock_t(Q, K/V).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

from cfmae_cli.config import DecoderConfig
from cfmae_cli.model.layers import CrossBlock, sincos_pos_embed


class TaskBlock(nn.Module):
    """One cross-attention layer (with MLP) then ``self_blocks`` self-attention blocks, all at width d.

    Without cross-attention (the 'w/o CA' ablation) the first layer is a self-attention block over
    Q + F^{k−1}, so the cascade still passes the previous task's features but no other modality is read.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, self_blocks: int, cross_attention: bool):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.cross_attention = cross_attention
        self.first = CrossBlock(dim, num_heads, mlp_ratio) if cross_attention else \
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(self_blocks))

    def forward(self, query: Tensor, context: Tensor, previous: Tensor) -> Tensor:
        """query (B, N, d), context = H ⊕ F^{k−1} (B, M·N, d), previous = F^{k−1} (B, N, d) → F^k (B, N, d)."""
        x = self.first(query, context) if self.cross_attention else self.first(query + previous)
        for block in self.blocks:
            x = block(x)
        return x


class CFMAEDecoder(nn.Module):
    """Cascaded (``cfg.cascade``) or parallel decoder over the modalities in ``modalities`` order.

    ``order`` is the task order (the modalities of the model in ``cfg.order``'s order).
    """

    def __init__(self, cfg: DecoderConfig, encoder_dim: int, modalities: list[str], grid: int):
        super().__init__()
        self.cascade = cfg.cascade
        self.modalities = list(modalities)
        self.order = [m for m in cfg.order if m in modalities]
        self.n = grid * grid
        self.embed = nn.Linear(encoder_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.dim, grid).unsqueeze(0), persistent=False)
        self.modality_embed = nn.Parameter(torch.zeros(len(modalities), cfg.dim))
        self.tasks = nn.ModuleDict({m: TaskBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.self_blocks,
                                                 cfg.cross_attention) for m in self.order})

    def full_tokens(self, encoded: Tensor, ids_keep: Tensor) -> Tensor:
        """H: encoded (B, 1+V, D) with the global token first, ids_keep (B, V) positions in [0, M·N) →
        (B, M·N, d)."""
        x = self.embed(encoded[:, 1:])
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, len(self.modalities) * self.n, d)  # bf16 under autocast
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x)
        extra = self.pos_embed.repeat(1, len(self.modalities), 1) + \
            self.modality_embed.repeat_interleave(self.n, dim=0).unsqueeze(0)
        return full + extra

    def forward(self, encoded: Tensor, ids_keep: Tensor) -> dict[str, Tensor]:
        """Decoder features F per modality, each (B, N, d)."""
        h = self.full_tokens(encoded, ids_keep)
        m = len(self.modalities)
        previous = torch.zeros_like(h[:, : self.n])
        out = {}
        for name in self.order:
            i = self.modalities.index(name)
            query = h[:, i * self.n:(i + 1) * self.n]
            context = h + previous.repeat(1, m, 1) if self.cascade else h
            feats = self.tasks[name](query, context, previous)
            if self.cascade:
                previous = feats
            out[name] = feats
        return out
