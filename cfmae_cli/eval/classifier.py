"""The classifier that fine-tuning trains: the pre-trained encoder (+ map adapters) → pooled feature → head.

Also where its initial weights come from: the architecture of a checkpoint (ours: its config; MAE / MultiMAE /
timm files: read off the tensor shapes) and the loading of the encoder's tensors, with messages that name what
does not match.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.config import EncoderArch, FinetuneConfig
from cfmae_cli.model.convert import fit_position_table
from cfmae_cli.model.encoder import ViTEncoder
from cfmae_cli.model.layers import MapAdapter, embed_tokens, init_weights

log = logging.getLogger(__name__)


class ViTClassifier(nn.Module):
    """batch {rgb (B, 3, S, S) [, instance / semantic (B, S/s, S/s)]} → logits (B, num_classes).

    ``global_pool='avg'``: the mean of the patch tokens of every input modality, then ``fc_norm`` (MAE
    fine-tuning; the encoder's final norm is not used). ``'token'``: the global token after the final norm.
    ``linear=True``: a linear probe — a norm without affine parameters before the head (MAE), and the encoder
    and adapters frozen (no gradients are computed through them). ``train_pos_embed``: the position table is
    trained (MAE fine-tuning; it is fixed in pre-training).
    """

    def __init__(self, arch: EncoderArch, img_size: int, num_classes: int, modalities: list[str],
                 num_semantic_classes: int = 0, global_pool: str = "avg", drop_path: float = 0.0,
                 linear: bool = False, head_init_std: float = 2e-5, train_pos_embed: bool = True):
        super().__init__()
        self.modalities = list(modalities)
        self.global_pool = global_pool
        self.linear = linear
        self.encoder = ViTEncoder(img_size, arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads,
                                  arch.mlp_ratio, drop_path)
        classes = {"semantic": num_semantic_classes, "instance": arch.num_instance_ids}
        self.adapters = nn.ModuleDict({
            name: MapAdapter(classes[name], arch.embed_dim, arch.map_embed_dim, arch.patch_size // arch.map_stride)
            for name in self.modalities if name != "rgb"})
        dim = arch.embed_dim
        if global_pool == "avg":
            self.encoder.norm = nn.Identity()  # replaced by fc_norm after pooling (MAE)
            self.fc_norm: nn.Module = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
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


def arch_from_state(state: dict[str, Tensor]) -> tuple[EncoderArch, set[str]]:
    """The encoder architecture read off a state dict in our key names (``encoder.*``, ``adapters.*``), and the
    names of the fields the shapes showed.

    The number of heads is not visible in the shapes: it is taken as embed_dim / 64, as in every standard ViT;
    the map fields keep their defaults when the file has no map adapters.
    """
    try:
        proj = state["encoder.patch_embed.proj.weight"]
        fc1 = state["encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CfmaeError(f"no ViT encoder weights found (missing {exc.args[0]})") from None
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    values = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": max(dim // 64, 1),
              "mlp_ratio": fc1.shape[0] / dim}
    for name in ("instance", "semantic"):
        embed, conv = state.get(f"adapters.{name}.embed.weight"), state.get(f"adapters.{name}.proj.weight")
        if embed is not None and conv is not None:
            values.update(map_embed_dim=embed.shape[1], map_stride=patch // conv.shape[-1])
            if name == "instance":
                values["num_instance_ids"] = embed.shape[0] - 1
    return EncoderArch(**values), set(values) - {"num_heads"}


def load_encoder_weights(model: ViTClassifier, state: dict[str, Tensor], source: str | Path) -> None:
    """Copy the encoder and map-adapter tensors of ``state`` (our key names) into ``model``.

    Decoders, reconstruction heads and classifier heads are left out; a position table of another grid is
    resized bicubically to the model's (MAE's rule for fine-tuning at another resolution); any other shape
    difference is an error naming the tensor. Adapters of a modality the checkpoint lacks start from random
    weights (logged).
    """
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k.startswith(("encoder.", "adapters.")) and k in own}
    if "encoder.pos_embed" in keep:
        keep["encoder.pos_embed"] = fit_position_table(keep["encoder.pos_embed"], own["encoder.pos_embed"], source)
    bad = [k for k, v in keep.items() if v.shape != own[k].shape]
    if bad:
        shown = "; ".join(f"{k}: {tuple(keep[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
                          for k in bad[:3])
        raise CfmaeError(f"{source}: {len(bad)} tensor(s) do not fit the model being fine-tuned ({shown})")
    if not any(k.startswith("encoder.blocks.") for k in keep):
        raise CfmaeError(f"{source}: holds no encoder blocks this model can use")
    model.load_state_dict(keep, strict=False)
    fresh = sorted({k.split(".")[1] for k in own if k.startswith("adapters.") and k not in keep})
    if fresh:
        log.warning("%s has no %s adapter: it starts from random weights", source, " and ".join(fresh))
    log.info("initialised %d tensors from %s", len(keep), source)


def load_classifier(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[ViTClassifier, FinetuneConfig, list[str]]:
    """A ``cfmae finetune`` checkpoint (file or run folder) as an eval-mode classifier, its config and its
    class names."""
    from cfmae_cli.config import stored_config
    from cfmae_cli.checkpoints import checkpoint_path, load_checkpoint

    file = checkpoint_path(path)
    ckpt = load_checkpoint(file)
    if ckpt.get("task") != "finetune":
        raise CfmaeError(f"{file}: a {ckpt.get('task', 'pretrain')} checkpoint, not a classifier; fine-tune it first "
                         f"with `cfmae finetune --checkpoint {path}`.")
    cfg = stored_config(ckpt["config"], f"the config in {file}", FinetuneConfig)
    if cfg.kind != "classification":
        raise CfmaeError(f"{file}: a {cfg.kind} model, not an image classifier.")
    state = ckpt["model"]
    c_sem = state["adapters.semantic.embed.weight"].shape[0] - 1 if "adapters.semantic.embed.weight" in state else 0
    model = ViTClassifier(cfg.model.encoder, cfg.data.img_size, len(ckpt["classes"]), cfg.data.modalities, c_sem,
                          cfg.model.global_pool, linear=cfg.mode == "linear")
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, list(ckpt["classes"])
