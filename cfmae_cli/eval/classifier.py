"""The classifier that fine-tuning trains: the pre-trained encoder (+ map adapters) → pooled feature → head;
loading an encoder's tensors into it (and into the dense models), and a fine-tuned one back, through the one
door for weights (``model/weights.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from cfmae_cli import modalities as table
from cfmae_cli.config import EncoderArch, stored_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.model.encoder import build_encoder
from cfmae_cli.model.layers import embed_tokens, init_weights, map_adapters
from cfmae_cli.model.weights import load_weights, read_weights

log = logging.getLogger(__name__)


class ViTClassifier(nn.Module):
    """batch {rgb (B, 3, S, S) [, instance / semantic (B, S/s, S/s)]} → logits (B, num_classes).

    ``global_pool='avg'``: the mean of the patch tokens of every input modality, then ``fc_norm`` (MAE
    fine-tuning; the encoder's final norm is not used). ``'token'``: the global token after the final norm.
    ``linear=True``: a linear probe — a norm without affine parameters before the head (MAE), and the encoder
    and adapters frozen (no gradients are computed through them). ``train_pos_embed``: the position table is
    trained (MAE fine-tuning; it is fixed in pre-training). ``grad_checkpointing``: the encoder's blocks are
    recomputed in the backward pass instead of keeping their activations (less memory, more compute).
    """

    def __init__(self, arch: EncoderArch, img_size: int, num_classes: int, modalities: list[str],
                 num_semantic_classes: int = 0, global_pool: str = "avg", drop_path: float = 0.0,
                 linear: bool = False, head_init_std: float = 2e-5, train_pos_embed: bool = True,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.modalities = list(modalities)
        self.global_pool = global_pool
        self.linear = linear
        # average pooling: fc_norm after the pooling replaces the encoder's final norm (MAE)
        self.encoder = build_encoder(arch, img_size, drop_path, final_norm=global_pool != "avg",
                                     grad_checkpointing=grad_checkpointing)
        classes = {name: table.num_classes(table.get(name), num_semantic_classes, arch.num_instance_ids)
                   for name in self.modalities}
        self.adapters = map_adapters(self.modalities, arch.embed_dim, arch.map_embed_dim, arch.patch_size,
                                     arch.map_stride, classes)
        dim = arch.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        init_weights(self)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        self.encoder.pos_embed.requires_grad_(train_pos_embed)
        head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=head_init_std)
        nn.init.zeros_(head.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head) if linear else head
        if linear:
            for name, param in self.named_parameters():
                param.requires_grad = name.startswith("head.")

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for layer-wise lr decay (MAE's assignment, in timm's matcher format): patch embedding, tokens
        and map adapters are layer 0, block i is layer i+1; what no pattern matches — the final norms and the
        head — is the last layer, depth+1."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)|^adapters\.",
                "blocks": [(r"^encoder\.blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """The pooled, normalised feature (B, D) that the head reads."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.linear):
            x = self.encoder(embed_tokens(self.encoder, self.adapters, self.modalities, batch))
            pooled = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
            return self.fc_norm(pooled)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.features(batch))


def load_encoder_weights(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Copy the encoder and map-adapter tensors of ``state`` (our key names) into ``model`` (a classifier, a
    segmenter or a detection backbone: anything with ``encoder`` and, optionally, ``adapters``).

    Decoders, reconstruction heads and classifier heads are left out; a position table of another grid is
    resized bicubically to the model's (MAE's rule for fine-tuning at another resolution); any other shape
    difference is an error naming the tensor. Adapters of a modality the checkpoint lacks start from random
    weights (logged).
    """
    done = load_weights(model, state, source, only=("encoder.", "adapters."),
                        fix="weights of another architecture: leave model.encoder unset to fine-tune the "
                            "checkpoint's own")
    if not any(k.startswith("encoder.blocks.") for k in done.loaded):
        raise CfmaeError(f"{source}: holds no encoder blocks this model can use")
    fresh = sorted({k.split(".")[1] for k in done.missing if k.startswith("adapters.")})
    if fresh:
        log.warning("%s has no %s adapter: it starts from random weights", source, " and ".join(fresh))
    log.info("initialised %d tensors from %s", len(done.loaded), source)


def load_classifier(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[ViTClassifier, FinetuneConfig, list[str]]:
    """A ``cfmae finetune`` checkpoint (file or run folder) as an eval-mode classifier, its config and its
    class names."""
    w = read_weights(path)
    if w.format != "cfmae-finetune":
        raise CfmaeError(f"{w.path}: a {w.format.removeprefix('cfmae-')} checkpoint, not a classifier; fine-tune it "
                         f"first with `cfmae finetune --checkpoint {path}`.")
    cfg = stored_config(w.top["config"], f"the config in {w.path}", FinetuneConfig)  # sizes checked: read_weights
    if cfg.kind != "classification":
        raise CfmaeError(f"{w.path}: a {cfg.kind} model, not an image classifier.")
    classes = w.top.get("classes")
    if cfg.model.encoder is None or not isinstance(classes, list) or not classes:
        raise CfmaeError(f"{w.path}: holds no {'encoder architecture' if cfg.model.encoder is None else 'class names'}"
                         f" (written by another version of cfmae, or edited); fine-tune again with this version.")
    state = w.state
    named = [f"adapters.{m}.embed.weight" for m in cfg.data.modalities if table.get(m).classes == "manifest"]
    c_sem = state[named[0]].shape[0] - 1 if named and named[0] in state else 0
    model = ViTClassifier(cfg.model.encoder, cfg.data.img_size, len(classes), cfg.data.modalities, c_sem,
                          cfg.model.global_pool, linear=cfg.mode == "linear")
    load_weights(model, state, w.source, strict=True)
    return model.to(device).eval(), cfg, list(classes)
