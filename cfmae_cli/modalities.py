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
loss="l1"))`` and ``DATA/edge/<class>/<stem>.png`` next to the other maps (a loss of its own:
:func:`cfmae_cli.model.losses.register_loss` first, under the name the entry gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, get_args

Kind = Literal["image", "ids"]
Target = Literal["standardise", "patch_norm", "raw"]  # an image's regression target (and input), see Modality
TARGETS: tuple[str, ...] = get_args(Target)
CROSS_ENTROPY = "cross_entropy"  # the loss of every map of ids (cfmae_cli.model.losses.id_map_loss)
TRIM = 0.1  # standardise: the share of values dropped at each end before the mean and variance (MultiMAE)


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
    * ``normalise``: an image normalised with ``data.mean`` / ``data.std`` (else values in [0, 1]).
    * ``target``: for an image, its default regression target, which also decides its input
      (``model.image_targets`` overrides it per modality, :func:`target_of`):

      - ``"patch_norm"``: MAE's norm-pix target, each patch to mean 0 and variance 1 (unbiased), under
        ``model.norm_pix_loss`` (off: ``raw``); the input is the image as read (RGB normalised, depth in
        [0, 1]);
      - ``"standardise"``: MultiMAE's truncated per-image standardisation (:func:`standardise_per_image`):
        the input *and* the target are the map standardised with the mean and variance of its middle 80 %
        of values;
      - ``"raw"``: the input's values as they are, input and target.

      None (the default) = ``"raw"`` for an image; a map of ids has none.
    * ``loss``: the name of the loss of its masked patches, a key of :data:`cfmae_cli.model.losses.LOSSES` for an
      image (``loss(pred, target, mask)`` with pred and target (B, N, patch values) and mask (B, N) bool), and
      ``"cross_entropy"`` for a map of ids. None (the default) = ``"mse"`` for an image.
    * ``pil_modes``: for an image map, the PIL modes its files may have (others are refused, naming the file);
      None = any (converted). A single-channel map is read at its full precision as float32 in [0, 1]:
      8-bit grey (``L``) as value / 255, 16-bit grey (``I;16``, ``I``) as value / 65535.
    * ``on_request``: its maps are made only for runs that ask for it: the built-in demo data adds them (a
      dataset of its own) when ``data.modalities`` includes the modality (depth's classical cue).
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
    loss: str | None = None
    pil_modes: tuple[str, ...] | None = None
    target: Target | None = None
    on_request: bool = False

    def __post_init__(self) -> None:
        if self.loss is None:
            object.__setattr__(self, "loss", CROSS_ENTROPY if self.kind == "ids" else "mse")
        elif self.kind == "ids" and self.loss != CROSS_ENTROPY:
            raise ValueError(f"modality {self.name}: a map of ids is scored by {CROSS_ENTROPY} (loss={self.loss!r})")
        if self.target is None:
            object.__setattr__(self, "target", None if self.kind == "ids" else "raw")
        elif self.kind == "ids":
            raise ValueError(f"modality {self.name}: a map of ids has no regression target (target={self.target!r})")
        elif self.target not in TARGETS:
            raise ValueError(f"modality {self.name}: target {self.target!r} is not one of {', '.join(TARGETS)}")

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
    """The modality of the encoder's patch embedding (RGB): the reference image, the one that the alignment
    teacher, the k-NN monitor and fine-tuning read, and the folder ``DATA/<name>/`` of a dataset's images."""
    return next(m.name for m in TABLE.values() if m.patch_embedding)


def guide_maps(batch: dict[str, Any], modalities: list[str]) -> dict[str, Any]:
    """The maps the masking strategies read, by strategy (``instance``, ``semantic``), from a batch."""
    maps: dict[str, Any] = {}
    for m in modalities:
        strategy = TABLE[m].guides
        if strategy is not None and m in batch:
            maps[strategy] = batch[m]
    return maps


def num_classes(modality: Modality, semantic_classes: int, instance_ids: int) -> int:
    """The number of ids of an ids map (0 for an image)."""
    return {"manifest": semantic_classes, "instance_ids": instance_ids}.get(modality.classes or "", 0)


def target_of(modality: Modality, overrides: Mapping[str, str] | None = None, norm_pix_loss: bool = True
              ) -> str | None:
    """The target (and input) of an image modality in a run: ``overrides`` (``model.image_targets``) where it
    names the modality, else the entry's ``target``; ``patch_norm`` becomes ``raw`` when ``model.norm_pix_loss``
    is off (MAE's flag). None for a map of ids."""
    if modality.kind == "ids":
        return None
    target = (overrides or {}).get(modality.name, modality.target)
    return "raw" if target == "patch_norm" and not norm_pix_loss else target


def checked_image_targets(targets: dict[str, str]) -> dict[str, str]:
    """``model.image_targets`` checked against the table: only image modalities have a target to choose."""
    ids = [name for name in targets if name in TABLE and TABLE[name].kind == "ids"]
    if ids:
        images = [m.name for m in TABLE.values() if m.kind == "image"]
        raise ValueError(f"{', '.join(ids)}: a map of ids (cross-entropy), not an image; only image modalities "
                         f"({', '.join(images)}) have a target to choose")
    return targets


def standardise_per_image(x: Any) -> Any:
    """MultiMAE's truncated per-image standardisation of depth: (B, …) → float32 of the same shape. Per image,
    its values sorted, the middle ones kept (indices ⌊0.1·n⌋ to ⌊0.9·n⌋: the lowest and highest 10 % dropped),
    and the whole image mapped to (x − their mean) / √(their unbiased variance + 1e-6). MultiMAE feeds the
    result to the encoder and regresses it (:func:`~cfmae_cli.data.transforms.inputs_on_device` applies it,
    the loss takes the input as its target)."""
    x = x.float()
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    low, high = int(TRIM * n), int((1 - TRIM) * n)
    if high - low < 2:  # a tiny image: all of its values
        low, high = 0, n
    middle = flat.sort(dim=1).values[:, low:high]
    shape = (-1,) + (1,) * (x.dim() - 1)
    mean, var = middle.mean(dim=1).view(shape), middle.var(dim=1).view(shape)
    return (x - mean) / (var + 1e-6).sqrt()


GREY_MODES = ("L", "I;16", "I;16L", "I;16B", "I")


register(Modality("rgb", kind="image", channels=3, at_map_stride=False, patch_embedding=True, normalise=True,
                  target="patch_norm"))
register(Modality("instance", kind="ids", classes="instance_ids", canonical=True, guides="instance"))
register(Modality("semantic", kind="ids", classes="manifest", guides="semantic"))
register(Modality("depth", kind="image", channels=1, at_map_stride=False, target="standardise", loss="l1",
                  pil_modes=GREY_MODES, on_request=True))


def maps_of(modalities: list[str]) -> list[str]:
    """The modalities of ``modalities`` read from map folders beside the image (all but the patch embedding's)."""
    return [m for m in modalities if get(m).is_map]


def on_request_maps(modalities: Sequence[str]) -> list[str]:
    """The modalities of ``modalities`` whose maps are made only on request (:attr:`Modality.on_request`)."""
    return [m for m in modalities if get(m).on_request]
