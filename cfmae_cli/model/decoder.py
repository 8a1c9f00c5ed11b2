"""The decoders: the cascaded decoder of §3.2 (Eqs. 2–3) with its parallel and w/o-CA ablations, and MultiMAE's
output adapters (the baseline of Table 5, row 1).

CFMAE (``model.decoder.kind: cfmae``). H (B, M·N, d): encoder tokens projected to the decoder width and put
back at their positions, a learned mask token elsewhere, plus the decoder's sin-cos position and a learned
per-modality embedding. Task t at step k: Q = H[slice of t] (B, N, d); K = V = [g ; H ⊕ F^{k−1}], F^{k−1}
(B, N, d) added to each modality segment of H at the same patch position (F⁰ = 0), and g (B, 1, d) the
encoder's final global token projected by the same embedding (``global_token``; MAE's decoder keeps its
class token, so pre-training trains it); F^k = TaskBlock_t(Q, K/V).

MultiMAE (``kind: multimae``): per task t its own projection, mask token, position and task embeddings; the
queries are t's slice of the tokens with mask tokens (visible and masked positions, with embeddings), the
context is only the *visible* tokens (with embeddings) and the global token — V + 1 keys per sample, no mask
tokens — then cross-attention without a residual, an MLP with one, and self-attention blocks.

Activation checkpointing (``set_grad_checkpointing``, ``model.grad_checkpointing``): each block of a task (its
first layer and its self-attention blocks; MultiMAE's self-attention blocks) is recomputed in the backward pass
from its inputs instead of keeping its activations (:func:`~cfmae_cli.model.layers.run_block`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from cfmae_cli.config import DecoderConfig
from cfmae_cli.model.layers import CrossAttention, CrossBlock, run_block, sincos_pos_embed


class TaskBlock(nn.Module):
    """One cross-attention layer (with MLP) then ``self_blocks`` self-attention blocks, all at width d.

    Without cross-attention (the 'w/o CA' ablation) the first layer is a self-attention block over
    Q + F^{k−1} (after the global token g), so the cascade still passes the previous task's features but no other
    modality is read.
    """

    grad_checkpointing = False  # recompute each block in the backward pass (the decoder's set_grad_checkpointing)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, self_blocks: int, cross_attention: bool):
        super().__init__()
        norm: Any = partial(nn.LayerNorm, eps=1e-6)  # (timm annotates norm_layer as a class; it only calls it)
        self.cross_attention = cross_attention
        self.first = CrossBlock(dim, num_heads, mlp_ratio) if cross_attention else \
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(self_blocks))

    def forward(self, query: Tensor, context: Tensor | None, previous: Tensor, glob: Tensor | None = None
                ) -> Tensor:
        """query (B, N, d), context = [g ;] H ⊕ F^{k−1} (B, [1+]M·N, d; None without cross-attention),
        previous = F^{k−1} (B, N, d), glob = g (B, 1, d) or None → F^k (B, N, d). Without cross-attention g
        leads the blocks' sequence and is dropped at the end, as in MAE's decoder."""
        ckpt = self.grad_checkpointing
        if self.cross_attention:
            assert context is not None
            x = run_block(self.first, query, context, checkpointed=ckpt)
        else:
            x = query + previous if glob is None else torch.cat([glob, query + previous], dim=1)
            x = run_block(self.first, x, checkpointed=ckpt)
        for block in self.blocks:
            x = run_block(block, x, checkpointed=ckpt)
        return x if self.cross_attention or glob is None else x[:, 1:]


class CFMAEDecoder(nn.Module):
    """Cascaded (``cfg.cascade``) or parallel decoder over the modalities in ``modalities`` order.

    ``order`` is the task order (the modalities of the model in ``cfg.order``'s order).
    """

    pos_embed: Tensor  # a buffer (sin-cos positions)

    def __init__(self, cfg: DecoderConfig, encoder_dim: int, modalities: list[str], grid: int):
        super().__init__()
        self.cascade = cfg.cascade
        self.global_token = cfg.global_token
        self.modalities = list(modalities)
        self.order = [m for m in cfg.order if m in modalities]
        self.n = grid * grid
        self.embed = nn.Linear(encoder_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.dim, grid).unsqueeze(0), persistent=False)
        self.modality_embed = nn.Parameter(torch.zeros(len(modalities), cfg.dim))
        self.tasks = nn.ModuleDict({m: TaskBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.self_blocks,
                                                 cfg.cross_attention) for m in self.order})

    def init_tokens(self) -> None:
        """The learned tokens' initialisation (after MAE's for the layers): N(0, 0.02)."""
        for param in (self.mask_token, self.modality_embed):
            nn.init.normal_(param, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "modality_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each task's blocks in the backward pass (in training) instead of keeping their activations."""
        for task in self.tasks.values():
            cast(TaskBlock, task).grad_checkpointing = enable

    def full_tokens(self, encoded: Tensor, ids_keep: Tensor) -> tuple[Tensor, Tensor | None]:
        """encoded (B, 1+V, D) with the global token first, ids_keep (B, V) positions in [0, M·N) → (H (B, M·N, d),
        g (B, 1, d), or None without ``global_token``)."""
        if self.global_token:
            x = self.embed(encoded)
            glob, x = x[:, :1], x[:, 1:]
        else:  # the patch tokens only (as runs before the key computed it)
            x, glob = self.embed(encoded[:, 1:]), None
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, len(self.modalities) * self.n, d)  # bf16 under autocast
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x)
        extra = self.pos_embed.repeat(1, len(self.modalities), 1) + \
            self.modality_embed.repeat_interleave(self.n, dim=0).unsqueeze(0)
        return full + extra, glob

    def forward(self, encoded: Tensor, ids_keep: Tensor) -> dict[str, Tensor]:
        """Decoder features F per modality, each (B, N, d)."""
        h, glob = self.full_tokens(encoded, ids_keep)
        m = len(self.modalities)
        previous = torch.zeros_like(h[:, : self.n])
        out = {}
        for name in self.order:
            i, task = self.modalities.index(name), self.tasks[name]
            query = h[:, i * self.n:(i + 1) * self.n]
            context = None  # without cross-attention a task reads no context
            if task.cross_attention:
                context = h + previous.repeat(1, m, 1) if self.cascade else h
                if glob is not None:
                    context = torch.cat([glob, context], dim=1)
            feats = task(query, context, previous, glob)
            if self.cascade:
                previous = feats
            out[name] = feats
        return out


class MultiMAEAdapter(nn.Module):
    """MultiMAE's spatial output adapter for one task, up to its output projection (our head).

    ``proj_context`` (D → d), ``mask_token``, fixed sin-cos ``pos_embed`` and a learned ``task_embed`` per
    input modality; the queries (B, N, d) are this task's tokens with mask tokens at its masked positions, the
    context (B, V [+1], d) the visible tokens of every modality [and the global token, projected, no embedding].
    ``x = CA(LN(q), LN(ctx))`` (no residual), ``x = x + MLP(LN(x))``, then ``self_blocks`` self-attention blocks
    (``cross_attention=False``: the queries go straight to the blocks, MultiMAE's ``use_xattn=False``).
    """

    pos_embed: Tensor  # a buffer (sin-cos positions)
    grad_checkpointing = False  # recompute each self-attention block in the backward pass

    def __init__(self, task: str, cfg: DecoderConfig, encoder_dim: int, modalities: list[str], grid: int):
        super().__init__()
        dim = cfg.dim
        norm: Any = partial(nn.LayerNorm, eps=1e-6)  # (timm annotates norm_layer as a class; it only calls it)
        self.task, self.modalities, self.n = task, list(modalities), grid * grid
        self.global_token, self.cross_attention = cfg.global_token, cfg.cross_attention
        self.proj_context = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.task_embed = nn.Parameter(torch.zeros(len(modalities), dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid).unsqueeze(0), persistent=False)
        if cfg.cross_attention:
            self.query_norm, self.context_norm, self.out_norm = norm(dim), norm(dim), norm(dim)
            self.attn = CrossAttention(dim, cfg.num_heads)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(cfg.self_blocks))

    def init_tokens(self) -> None:
        """MultiMAE's: task embeddings truncated N(0, 0.02), the mask token 0, and K and V initialised as two
        separate Xavier-uniform matrices."""
        nn.init.trunc_normal_(self.task_embed, std=0.02)
        nn.init.zeros_(self.mask_token)
        if self.cross_attention:
            kv = self.attn.kv.weight
            bound = math.sqrt(6.0 / (kv.shape[0] // 2 + kv.shape[1]))
            nn.init.uniform_(kv, -bound, bound)

    def queries_and_context(self, encoded: Tensor, ids_keep: Tensor) -> tuple[Tensor, Tensor]:
        """encoded (B, 1+V, D), ids_keep (B, V) → queries (B, N, d), context (B, V [+1], d)."""
        x = self.proj_context(encoded)
        glob, x = x[:, :1], x[:, 1:]
        b, _, d = x.shape
        index = ids_keep.unsqueeze(-1).expand(-1, -1, d)
        full = self.mask_token.to(x.dtype).expand(b, len(self.modalities) * self.n, d).scatter(1, index, x)
        full = full + self.pos_embed.repeat(1, len(self.modalities), 1) + \
            self.task_embed.repeat_interleave(self.n, dim=0).unsqueeze(0)
        i = self.modalities.index(self.task)
        context = full.gather(1, index)  # the visible tokens with their embeddings: no mask token
        if self.global_token:
            context = torch.cat([context, glob], dim=1)
        return full[:, i * self.n:(i + 1) * self.n], context

    def forward(self, encoded: Tensor, ids_keep: Tensor) -> Tensor:
        """→ the task's features (B, N, d)."""
        x, context = self.queries_and_context(encoded, ids_keep)
        if self.cross_attention:
            x = self.attn(self.query_norm(x), self.context_norm(context))
            x = x + self.mlp(self.out_norm(x))
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.grad_checkpointing)
        return x


class MultiMAEDecoder(nn.Module):
    """MultiMAE's output adapters, one per modality, in parallel: {modality: features (B, N, d)}."""

    def __init__(self, cfg: DecoderConfig, encoder_dim: int, modalities: list[str], grid: int):
        super().__init__()
        self.modalities = list(modalities)
        self.order = [m for m in cfg.order if m in modalities]
        self.tasks = nn.ModuleDict({m: MultiMAEAdapter(m, cfg, encoder_dim, modalities, grid) for m in self.order})

    def init_tokens(self) -> None:
        for adapter in self.tasks.values():
            cast(MultiMAEAdapter, adapter).init_tokens()

    def no_weight_decay(self) -> set[str]:
        return {f"tasks.{m}.{key}" for m in self.tasks for key in ("mask_token", "task_embed")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each adapter's self-attention blocks in the backward pass (in training)."""
        for adapter in self.tasks.values():
            cast(MultiMAEAdapter, adapter).grad_checkpointing = enable

    def forward(self, encoded: Tensor, ids_keep: Tensor) -> dict[str, Tensor]:
        return {name: adapter(encoded, ids_keep) for name, adapter in self.tasks.items()}


def build_decoder(cfg: DecoderConfig, encoder_dim: int, modalities: list[str], grid: int
                  ) -> CFMAEDecoder | MultiMAEDecoder:
    """The decoder of ``cfg.kind``: :class:`CFMAEDecoder` or :class:`MultiMAEDecoder`."""
    kind = MultiMAEDecoder if cfg.kind == "multimae" else CFMAEDecoder
    return kind(cfg, encoder_dim, modalities, grid)
