"""The CFMAE model: input adapters → shared encoder on the visible tokens → decoder → per-modality heads."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from cfmae_cli import modalities as table
from cfmae_cli.config import Config, EncoderArch, ModelConfig
from cfmae_cli.model.align import AlignHead, align_loss, pooled_encoder_tokens
from cfmae_cli.model.decoder import build_decoder
from cfmae_cli.model.encoder import build_encoder
from cfmae_cli.model.layers import embed_tokens, init_weights, map_adapters, patch_side
from cfmae_cli.model.losses import modality_loss


class CFMAE(nn.Module):
    """Coarse-to-fine MAE over ``modalities`` (in that order), built from ``model`` (the config's ``model``
    section) and what the data defines: ``img_size``, ``num_semantic_classes`` (C_sem, from the dataset's
    manifest) and ``align_dim``. :meth:`from_config` reads the first two from a whole config.

    A batch is a dict with ``rgb`` (B, 3, H, W) float, ``instance`` and ``semantic`` (B, H/s, W/s) long; with
    ``model.align`` on, also ``teacher`` (B, N, C) (:class:`cfmae_cli.model.align.Teacher`), and ``align_dim``
    = C builds the projection (without it, e.g. for inference, the model has none and the loss is not taken).
    The visible tokens come with the mask: ``ids_keep`` (B, V) (:class:`cfmae_cli.masking.Masks`, or
    :func:`cfmae_cli.masking.visible_indices` for a mask made by hand); the model has no budget of its own.
    """

    def __init__(self, model: ModelConfig, num_semantic_classes: int, align_dim: int | None = None, *,
                 modalities: Sequence[str], img_size: int):
        super().__init__()
        m = self.config = model
        self.modalities = list(modalities)
        self.classes = {name: table.num_classes(table.get(name), num_semantic_classes, m.num_instance_ids)
                        for name in self.modalities if table.get(name).kind == "ids"}
        self.patches = {name: patch_side(name, m.patch_size, m.map_stride) for name in self.modalities}
        #: each image modality's regression target (raw, patch_norm, standardise), model.image_targets applied
        self.targets = {name: table.target_of(table.get(name), m.image_targets, m.norm_pix_loss)
                        for name in self.modalities if table.get(name).kind == "image"}
        self.encoder = build_encoder(EncoderArch.of(m), img_size, m.drop_path, grad_checkpointing=m.grad_checkpointing)
        self.grid = self.encoder.grid
        self.adapters = map_adapters(self.modalities, m.embed_dim, m.map_embed_dim, m.patch_size, m.map_stride,
                                     self.classes)
        self.decoder = build_decoder(m.decoder, m.embed_dim, self.modalities, self.grid)
        self.decoder.set_grad_checkpointing(m.grad_checkpointing)  # (the encoder's: built with it)
        # a norm before each linear head (MultiMAE's output projection has none; index 1 stays the linear layer)
        head_norm = (lambda: nn.Identity()) if m.decoder.kind == "multimae" else \
            (lambda: nn.LayerNorm(m.decoder.dim, eps=1e-6))
        self.heads = nn.ModuleDict({name: nn.Sequential(head_norm(), nn.Linear(m.decoder.dim, self.head_dim(name)))
                                    for name in self.modalities})
        self._init_weights()
        self.align_head: AlignHead | None = None
        if m.align.enabled and align_dim:  # built after the rest: every other weight starts as without it
            source = m.decoder.dim if m.align.stage == "decoder" else m.embed_dim
            self.align_head = AlignHead(source, align_dim, m.align.hidden)
            init_weights(self.align_head)

    @classmethod
    def from_config(cls, cfg: Config, num_semantic_classes: int, align_dim: int | None = None) -> CFMAE:
        """The model of a run's config: ``cfg.model`` over ``cfg.data.modalities`` at ``cfg.data.img_size``."""
        return cls(cfg.model, num_semantic_classes, align_dim, modalities=cfg.data.modalities,
                   img_size=cfg.data.img_size)

    def head_dim(self, name: str) -> int:
        """Values predicted per token (Eq. 3): the patch's pixels × channels (image) or cells × ids (id map)."""
        spec, side = table.get(name), self.patches[name]
        return side * side * (self.classes[name] if spec.kind == "ids" else spec.channels)

    def _init_weights(self) -> None:
        init_weights(self)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        self.decoder.init_tokens()

    def no_weight_decay(self) -> set[str]:
        """Tokens and embeddings that AdamW must not decay (norms and biases are excluded by shape)."""
        return {"encoder.cls_token", "encoder.pos_embed"} | {f"decoder.{k}" for k in self.decoder.no_weight_decay()}

    # -- forward -----------------------------------------------------------------------------------------
    def tokenize(self, batch: dict[str, Tensor]) -> Tensor:
        """All patch tokens with positions: (B, M·N, D), modalities in ``self.modalities`` order."""
        return embed_tokens(self.encoder, self.adapters, self.modalities, batch)

    def encode(self, batch: dict[str, Tensor], ids_keep: Tensor) -> tuple[Tensor, Tensor]:
        """Encode the visible tokens ``ids_keep`` (B, V): → (encoded (B, 1+V, D) with the global token first,
        ids_keep)."""
        tokens = self.tokenize(batch)
        visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.encoder(visible), ids_keep

    def forward(self, batch: dict[str, Tensor], mask: Tensor, ids_keep: Tensor) -> dict[str, Any]:
        """mask (B, M, N) bool, True = masked; ids_keep (B, V) its visible tokens. → {'loss': λ-weighted total,
        'losses': {modality: loss}, 'pred': {modality: (B, N, out)}}."""
        encoded, ids_keep = self.encode(batch, ids_keep)
        feats = self.decoder(encoded, ids_keep)
        pred = {name: self.heads[name](f) for name, f in feats.items()}
        out = self.losses(pred, batch, mask) | {"pred": pred}
        if self.align_head is not None and "teacher" in batch:
            out["align"] = self.alignment(encoded, ids_keep, feats, batch["teacher"], mask)
            out["loss"] = out["loss"] + self.config.align.weight * out["align"]
        return out

    def alignment(self, encoded: Tensor, ids_keep: Tensor, feats: dict[str, Tensor], teacher: Tensor, mask: Tensor
                  ) -> Tensor:
        """L_F (docs/modalities.md#feature-alignment): the projection of the first decoder stage's F¹ (all patches,
        or those whose RGB is masked) or of the encoder's tokens averaged per position (where any is visible)."""
        a = self.config.align
        if a.stage == "decoder":
            source = feats[self.decoder.order[0]]
            select = mask[:, self.modalities.index(table.embedding_modality())] if a.patches == "masked" else None
        else:
            source, select = pooled_encoder_tokens(encoded, ids_keep, self.grid * self.grid)
        assert self.align_head is not None
        return align_loss(self.align_head(source), teacher, select, a.loss)

    def predict(self, batch: dict[str, Tensor], ids_keep: Tensor) -> dict[str, Tensor]:
        """Predictions only (no targets needed): {modality: (B, N, out)} from the visible tokens ``ids_keep``."""
        encoded, ids_keep = self.encode(batch, ids_keep)
        return {name: self.heads[name](f) for name, f in self.decoder(encoded, ids_keep).items()}

    def losses(self, pred: dict[str, Tensor], batch: dict[str, Tensor], mask: Tensor) -> dict[str, Any]:
        weights = self.config.loss_weights
        losses = {name: modality_loss(table.get(name), pred[name], batch[name], mask[:, i], self.patches[name],
                                      self.classes.get(name, 0), self.config.norm_pix_loss,
                                      self.config.image_targets)
                  for i, name in enumerate(self.modalities)}
        total = sum(weights.get(name, 1.0) * value for name, value in losses.items())
        return {"loss": total, "losses": losses}
