"""The shared ViT encoder (Eq. 1), laid out key for key like timm's ``VisionTransformer``.

Parameters: ``patch_embed.proj`` (the RGB adapter), ``cls_token`` (the global token), ``pos_embed``
(1, 1+N, D; fixed 2-D sin-cos, zeros for the global token, not trained), ``blocks.*`` (timm ``Block``),
``norm``. With D=768, depth 12, 12 heads this is timm's ``vit_base_patch16_224`` without its head.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from cfmae_cli.model.layers import sincos_pos_embed


class ViTEncoder(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.cat([torch.zeros(1, embed_dim), sincos_pos_embed(embed_dim, self.grid)]).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rates[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @property
    def patch_pos(self) -> Tensor:
        """(1, N, D) position embedding of the patches (shared by every modality)."""
        return self.pos_embed[:, 1:]

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, V, D) visible tokens with positions added → (B, 1+V, D), the global token first."""
        glob = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([glob, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
