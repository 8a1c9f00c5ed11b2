"""What the three kinds of fine-tuning share, over the engine's :class:`~cfmae_cli.train.engine.Task`: config,
process and data folder, the layer-wise decay optimizer, the recipe line, and the best-checkpoint bookkeeping.

Layer-wise lr decay and weight decay come from timm's ``param_groups_layer_decay`` (the engine applies each
group's ``lr_scale``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from cfmae_cli.config import EncoderArch
from cfmae_cli.eval.config import FinetuneConfig, FtOptimConfig
from cfmae_cli.train import distributed
from cfmae_cli.train.engine import Task
from cfmae_cli.train.optim import LARS
from cfmae_cli.train.setup import dataset_root, set_threads


def layer_decay_groups(model: nn.Module, optim: FtOptimConfig) -> list[dict[str, Any]]:
    """timm's layer-wise decay groups over the trainable parameters: ``lr_scale`` = decay^(depth+1-layer) with
    the patch embedding, tokens and map adapters at layer 0, block i at i+1, the norms and head at depth+1
    (scale 1); no weight decay on biases, norms and tokens."""
    return param_groups_layer_decay(model, weight_decay=optim.weight_decay,
                                    no_weight_decay_list=cast(Any, model).no_weight_decay(),
                                    layer_decay=optim.layer_decay)


def finetune_optimizer(model: nn.Module, optim: FtOptimConfig, lr: float, device: torch.device
                       ) -> torch.optim.Optimizer:
    """The optimizer of ``optim.name`` over :func:`layer_decay_groups` of the trainable parameters, at peak ``lr``:
    AdamW (fused on CUDA), or MAE's :class:`~cfmae_cli.train.optim.LARS` (the linear probe)."""
    groups = layer_decay_groups(model, optim)
    if optim.name == "lars":
        return LARS(groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                    trust_coefficient=optim.trust_coefficient)
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, fused=device.type == "cuda")


def recipe_name(optim: FtOptimConfig) -> str:
    """The optimizer as the plan names it."""
    if optim.name == "lars":
        return (f"LARS (MAE's: trust ratio {optim.trust_coefficient:g} on every weight of 2+ dimensions, none on "
                f"biases and norms; momentum {optim.momentum:g})")
    return f"AdamW (betas {optim.betas[0]:g}, {optim.betas[1]:g})"


class FinetuneTask(Task):
    """The base of the classification, segmentation and detection tasks. A subclass names its ``best_metric``,
    calls :meth:`setup` first in its ``__init__``, builds its data and model, and returns
    :meth:`track_best`'s numbers from its ``end_epoch``."""

    command = "finetune"
    classes: list[str]

    def setup(self, cfg: FinetuneConfig, info: distributed.DistInfo, source: str) -> EncoderArch:
        """What every fine-tuning task starts with: config, process, threads, the data folder (rank 0's
        choice); returns the encoder's architecture."""
        self.cfg, self.info, self.device, self.source = cfg, info, info.device, source
        set_threads(cfg, info.world)  # train.threads, or the cores' share left beside the data workers
        assert cfg.model.encoder is not None, "initial_weights() fills model.encoder"
        root = dataset_root(cfg) if info.is_main else None
        self.root = Path(distributed.broadcast(str(root) if root is not None else None, info))
        self.val_fraction = cfg.data.val_fraction
        self.start_best()
        return cfg.model.encoder

    @property
    def arch(self) -> EncoderArch:
        """The encoder's architecture (``model.encoder``, which :meth:`setup` checked)."""
        assert self.cfg.model.encoder is not None
        return self.cfg.model.encoder

    def build_optimizer(self, lr: float, device: torch.device) -> torch.optim.Optimizer:
        return finetune_optimizer(self.model, self.cfg.optim, lr, device)

    def recipe(self) -> str:
        """The optimizer line of :meth:`describe`, shared by the three kinds of fine-tuning."""
        o = self.cfg.optim
        return (f"recipe: {recipe_name(o)}, {o.schedule} schedule, layer decay {o.layer_decay}, weight decay "
                f"{o.weight_decay}, drop path {self.cfg.model.drop_path}")

    def state_dict(self) -> dict[str, Any]:
        return {"task": "finetune", "kind": self.cfg.kind, "classes": self.classes, **super().state_dict(),
                "init": self.source}
