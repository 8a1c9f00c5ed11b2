"""The table of modalities: one entry per granularity the model reads (MultiMAE's table of domains).

An entry says, for its modality, how it is read and augmented (an RGB-like image resampled smoothly, or a map
of integer ids resampled at the cells' centres, at the image's resolution or at the map stride, ids made
canonical after the crop), what its input adapter is (the encoder's patch embedding, or an adapter of its
kind), its target and loss, the size of its head, which masking strategy reads it for patch labels, and how
the figures draw it (pixels or a palette) and score it (MSE, or pixel accuracy and mIoU). Every layer reads
the entries: the config checks names against it, the data layer reads and augments by it, the model builds
its adapters, heads and losses from it, the pre-training task hands the masks their guide maps by it, and the
figures draw by it. Nothing outside this file branches on a modality's name.

A new modality is one :func:`register` call: ``register(Modality("edge", kind="image", channels=1,
loss=my_l1))`` and ``DATA/edge/<class>/<stem>.png`` next to the other maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

Kind = Literal["image", "ids"]


@dataclass(frozen=True)
class Modality:
    """One granularity. ``kind``: ``image`` (pixel values, ``channels`` of them) or ``ids`` (a single-channel map
    of integer ids, 255 = unlabelled). The other fields:

    * ``at_map_stride``: read at ``img_size / model.map_stride`` (the maps, stride 4 at 224 px) rather than at
      ``img_size``; its patches are then ``patch_size / map_stride`` cells wide.
    * ``classes``: for ids, where the number of ids comes from: ``"manifest"`` (the dataset's semantic
      classes) or ``"instance_ids"`` (``model.num_instance_ids``).
    * ``canonical``: ids renumbered by area after the crop (0 stays background; instance maps).
    * ``guides``: the masking strategy that reads its patch labels: ``"instance"`` (object patches) or
      ``"semantic"`` (regions).
    * ``patch_embedding``: fed through the encoder's own patch embedding (RGB: the timm key layout); one
      modality has it, and every model reads it.
    * ``normalise``: an image normalised with ``data.mean`` / ``data.std`` (else scaled to [0, 1]).
    * ``norm_pix``: ``model.norm_pix_loss`` applies (MAE's per-patch normalised target).
    * ``loss``: for an image, the loss of its masked patches, ``loss(pred, target, mask)`` with pred and target
      (B, N, patch values) and mask (B, N) bool; None = the mean squared error.
    * ``modes``: for an image map, the PIL modes its files may have (others are refused, naming the file);
      None = any (converted). 16-bit grey (``I;16``) is read at 8 bits (value · 255 / 65535, rounded).
    """

    name: str
    kind: Kind
    channels: int = 1
    at_map_stride: bool = True
    classes: Literal["manifest", "instance_ids"] | None = None
    canonical: bool = False
    guides: Literal["instance", "semantic"] | None = None
    patch_embedding: bool = False
    normalise: bool = False
    norm_pix: bool = False
    loss: Callable[..., Any] | None = None
    modes: tuple[str, ...] | None = None

    @property
    def is_map(self) -> bool:
        """Read from ``DATA/<name>/`` beside the image (every modality but the one of the patch embedding)."""
        return not self.patch_embedding


TABLE: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add (or replace) an entry of the table; returns it."""
    if modality.kind == "ids" and modality.classes is None:
        raise ValueError(f"modality {modality.name}: an ids map needs classes ('manifest' or 'instance_ids')")
    TABLE[modality.name] = modality
    return modality


def unregister(name: str) -> None:
    """Remove an entry (the built-in ones too: tests use it to undo a :func:`register`)."""
    TABLE.pop(name, None)


def get(name: str) -> Modality:
    """The entry of ``name``; ``KeyError`` naming the known modalities."""
    try:
        return TABLE[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r} (known: {', '.join(TABLE)})") from None


def names() -> list[str]:
    return list(TABLE)


def embedding_modality() -> str:
    """The modality of the encoder's patch embedding (RGB)."""
    return next(m.name for m in TABLE.values() if m.patch_embedding)


def guide_maps(batch: dict[str, Any], modalities: list[str]) -> dict[str, Any]:
    """The maps the masking strategies read, by strategy (``instance``, ``semantic``), from a batch."""
    return {TABLE[m].guides: batch[m] for m in modalities if TABLE[m].guides is not None and m in batch}


def num_classes(modality: Modality, semantic_classes: int, instance_ids: int) -> int:
    """The number of ids of an ids map (0 for an image)."""
    return {"manifest": semantic_classes, "instance_ids": instance_ids}.get(modality.classes or "", 0)


def l1_loss(pred: Any, target: Any, mask: Any) -> Any:
    """Mean absolute error over the masked patches (MultiMAE's depth loss): pred, target (B, N, P) tensors,
    mask (B, N) bool."""
    per_token = (pred.float() - target).abs().mean(-1)
    weight = mask.float()
    return (per_token * weight).sum() / weight.sum().clamp(min=1)


GREY_MODES = ("L", "I;16", "I;16L", "I;16B", "I")


register(Modality("rgb", kind="image", channels=3, at_map_stride=False, patch_embedding=True, normalise=True,
                  norm_pix=True))
register(Modality("instance", kind="ids", classes="instance_ids", canonical=True, guides="instance"))
register(Modality("semantic", kind="ids", classes="manifest", guides="semantic"))
register(Modality("depth", kind="image", channels=1, at_map_stride=False, norm_pix=True, loss=l1_loss,
                  modes=GREY_MODES))


def maps_of(modalities: list[str]) -> list[str]:
    """The modalities of ``modalities`` read from map folders beside the image (all but the patch embedding's)."""
    return [m for m in modalities if get(m).is_map]
