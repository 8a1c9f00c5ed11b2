"""The optimizers (AdamW with its parameter groups; LARS as MAE's linear probe defines it) and the warmup + cosine
learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from cfmae_cli.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases (1-D parameters) and on the model's ``no_weight_decay()``
    tokens and position/modality embeddings. Fused kernels on CUDA."""
    skip = cast(Any, model).no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=device.type == "cuda")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, as MAE's linear probe uses it (You et al. 2017; MAE's
    ``main_linprobe.py``).

    For every parameter of two or more dimensions (the weights; not biases or norms) the step direction
    ``d = grad + weight_decay * w`` is rescaled to ``trust * |w| / |d|`` times itself (left as it is where
    ``|w|`` or ``|d|`` is 0), so that the first step moves each weight by ``lr * trust`` of its norm whatever
    the gradient's size. Parameters of one dimension take plain SGD with momentum and no weight decay. Then
    ``mu = momentum * mu + d`` and ``w -= lr * mu``. The ratio is applied at every weight decay, 0 included
    (timm's ``Lars`` skips it when the weight decay is 0 unless ``always_adapt`` is set).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: lr {lr}, momentum {momentum}, weight decay {weight_decay}, trust coefficient "
                             f"{trust_coefficient} out of range")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


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
