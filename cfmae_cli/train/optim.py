"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from cfmae_cli.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases (1-D parameters) and on the model's ``no_weight_decay()``
    tokens and position/modality embeddings. Fused kernels on CUDA."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


def lr_at(step: float, total_steps: int, warmup_steps: float, lr: float, min_lr: float,
          schedule: str = "cosine", milestones: tuple[float, ...] = ()) -> float:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then half-cosine (or linear) down to ``min_lr``, or
    ``lr`` divided by 10 at each of ``milestones`` (fractions of training)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "linear":
        return lr + (min_lr - lr) * t
    if schedule == "step":
        return lr * 0.1 ** sum(step >= m * total_steps for m in milestones)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
