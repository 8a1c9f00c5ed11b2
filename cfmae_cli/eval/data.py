"""Fine-tuning data: the train/ and val/ splits, their transforms (timm's ``create_transform``), bad files.

A split is an ImageFolder (``SPLIT/<class>/<image>``) or the dataset layout of docs/dataset-format.md
(``SPLIT/rgb/<class>/…`` with ``instance/`` and ``semantic/``); multi-granular input needs the latter. A folder
without ``train/`` and ``val/`` can be split by ``data.val_fraction`` (a hash of each file's class and name
decides, so the split never changes). Items are the dicts of :mod:`cfmae_cli.data.dataset` with ``label``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Sequence

from PIL import Image, ImageOps
from timm.data import create_transform

from cfmae_cli import modalities as table
from cfmae_cli.config import EncoderArch
from cfmae_cli.data.dataset import MultiGranularDataset, SeededDataset, skip_reason, Skipped
from cfmae_cli.data.layout import read_manifest, Sample
from cfmae_cli.data.maps import UNREADABLE
from cfmae_cli.data.splits import find_splits
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.seeding import mix_seed, seeded


class _Unreadable(Exception):
    """An image file that could not be read (the message: why); unlike a failing transform, not a bug."""


class ImageListDataset(SeededDataset):
    """RGB images with class labels through a PIL transform → {'rgb', 'label'}, or a :class:`Skipped` record.

    A key ``(epoch, index)`` draws the augmentation from generators seeded by (seed, epoch, index): the same
    in any worker or process, so a resumed run sees the same images as an unbroken one.
    """

    def __init__(self, samples: Sequence[Sample], transform: Any, seed: int = 0):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, epoch: int, index: int) -> ContextManager[None]:
        """Python's, NumPy's and torch's generators seeded: timm's transforms draw from all three."""
        return seeded(mix_seed(self.seed, epoch, index))

    def load(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:  # a file that cannot be read is skipped; a failing transform is a bug and is raised
            with Image.open(sample.rgb) as im:
                image = im.convert("RGB")
        except UNREADABLE as exc:
            raise _Unreadable(skip_reason(exc)) from exc
        return {"rgb": self.transform(image), "label": sample.label}

    def skipped(self, index: int, exc: Exception) -> Skipped | None:
        return Skipped(str(self.samples[index].rgb), str(exc)) if isinstance(exc, _Unreadable) else None


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize that keeps 0 bits as a black image: timm's RandAugment asks for 0 bits at the largest
    magnitude, which Pillow >= 12 refuses with a ValueError (older Pillow returned black)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def pillow_safe(transform: Any) -> Any:
    """``transform`` with the posterize ops of any RandAugment inside replaced by :func:`_posterize`."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize
    return transform


def build_datasets(cfg: FinetuneConfig, arch: EncoderArch, root: Path) -> dict[str, Any]:
    """{'train', 'val' datasets, 'classes', 'num_semantic_classes'} for this config."""
    d, aug = cfg.data, cfg.aug
    maps = table.maps_of(d.modalities)
    train, val, classes, meta = find_splits(root, d.val_fraction, maps)
    if maps:
        c_sem = int(read_manifest(meta)["num_semantic_classes"])

        def joint(training: bool) -> JointTransform:
            return JointTransform(d.img_size, arch.map_stride, arch.num_instance_ids, aug.scale, aug.ratio,
                                  aug.hflip, d.mean, d.std, train=training)

        return {"train": MultiGranularDataset(train, joint(True), maps, c_sem, cfg.train.seed),
                "val": MultiGranularDataset(val, joint(False), maps, c_sem, cfg.train.seed),
                "classes": classes, "num_semantic_classes": c_sem}
    train_tf = pillow_safe(create_transform(d.img_size, is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                                color_jitter=aug.color_jitter,  # type: ignore[arg-type]  # timm: None = none
                                auto_augment=aug.auto_augment,
                                interpolation=d.interpolation, re_prob=aug.reprob, re_mode="pixel", re_count=1,
                                mean=d.mean, std=d.std))
    val_tf = create_transform(d.img_size, is_training=False, crop_pct=d.crop_pct, interpolation=d.interpolation,
                              mean=d.mean, std=d.std)
    return {"train": ImageListDataset(train, train_tf, cfg.train.seed), "val": ImageListDataset(val, val_tf),
            "classes": classes, "num_semantic_classes": 0}
