"""The dataset layout (docs/design.md §5.1): reading and writing ``DATA/{rgb,instance,semantic}/<class>/<stem>.*``.

::

    DATA/rgb/<class>/<stem>.<jpg|jpeg|png|bmp|webp|tif|tiff>
    DATA/instance/<class>/<stem>.png     uint8 or uint16 ids, 0 = background
    DATA/semantic/<class>/<stem>.png     uint8 class ids, 255 = unlabelled
                                         (id maps: grey values or palette indices, read by maps.read_ids)
    DATA/cfmae-dataset.json              manifest (format version, semantic class names, provenance, counts)

Class folders are optional: ``DATA/rgb/<stem>.jpg`` works too (the class is then ``""``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from PIL import Image

from cfmae_cli import modalities as table
from cfmae_cli.data.samples import Sample, SampleTable, map_path
from cfmae_cli.errors import DataError
from cfmae_cli.formats import (DATASET_FORMAT_VERSION, IMAGE_EXTENSIONS, MANIFEST_NAME, UNLABELLED, atomic_write,
                               atomic_write_text, list_folder, need_folder)



__all__ = ["Sample", "SampleTable", "map_path", "id_maps", "write_manifest", "read_manifest", "check_semantic_classes",
           "list_samples", "save_map", "save_rgb", "COPYABLE_MODES", "MAX_PIXELS", "open_image", "read_image",
           "PACKED_MANIFEST", "PACKED_FORMAT", "PACKED_VERSION", "is_packed", "pack_again", "read_packed_manifest"]


def id_maps() -> list[str]:
    """The modalities of the table that are maps of ids (the ones ``cfmae label`` makes)."""
    return [m.name for m in table.TABLE.values() if m.kind == "ids"]


def write_manifest(root: str | Path, semantic_classes: list[str], labelling: dict[str, Any],
                   counts: dict[str, int], instance_dtype: str = "uint8") -> Path:
    """Write ``cfmae-dataset.json`` atomically. ``labelling`` says how the maps were made."""
    root = Path(root)
    manifest = {
        "format_version": DATASET_FORMAT_VERSION,
        "semantic_classes": list(semantic_classes),
        "num_semantic_classes": len(semantic_classes),
        "instance_dtype": instance_dtype,
        "labelling": labelling,
        "counts": counts,
    }
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return root / MANIFEST_NAME


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check ``DATA/cfmae-dataset.json``; raise :class:`DataError` naming the file when bad."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: missing dataset manifest. Label an image folder with `cfmae label SRC --out "
                        f"{root}` (a labelling run writes it when it completes), or write it with "
                        f"cfmae_cli.data.layout.write_manifest (docs/dataset-format.md).")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not readable as JSON ({exc}).") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a dataset manifest (a JSON object); see docs/dataset-format.md.")
    check_semantic_classes(path, manifest)
    version = manifest.get("format_version")
    if version != DATASET_FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r} is not supported (expected {DATASET_FORMAT_VERSION}).")
    return manifest


def check_semantic_classes(path: Path, manifest: dict[str, Any]) -> int:
    """The semantic classes of a manifest (the dataset's, or a packed copy's, which carries them on): a non-empty
    list of names, at most 254 (id 255 is 'unlabelled' in uint8 maps), and ``num_semantic_classes`` (filled
    in when absent) equal to their count; returns C. Checked before anything is sized by C."""
    classes = manifest.get("semantic_classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'semantic_classes' must be a non-empty list of class names.")
    if len(classes) >= UNLABELLED:
        raise DataError(f"{path}: {len(classes):,} semantic classes; at most {UNLABELLED - 1} fit in uint8 maps "
                        f"(id {UNLABELLED} is 'unlabelled').")
    count = manifest.setdefault("num_semantic_classes", len(classes))
    if type(count) is not int or count != len(classes):
        raise DataError(f"{path}: num_semantic_classes is {count!r} but semantic_classes lists {len(classes)} names.")
    return count


def list_samples(root: str | Path, maps: tuple[str, ...] | list[str] | None = None
                 ) -> tuple[SampleTable, list[str]]:
    """List every image under ``DATA/rgb`` with its maps. Returns (samples, class folder names): the samples as
    a :class:`~cfmae_cli.data.samples.SampleTable` (a few arrays, not a Python object per sample).

    ``maps`` names the maps every image must have (an RGB-only run needs none; default: the id maps). Raises :class:`DataError`
    for a missing or empty ``rgb/`` folder and for images without their maps (the message lists the first
    few and how many there are).
    """
    root = Path(root)
    maps = id_maps() if maps is None else list(maps)
    rgb_root = root / "rgb"
    need_folder(root)
    if not rgb_root.is_dir():
        photos = _photos_in(root)
        if photos:  # a folder of photos, not yet a dataset: say how it becomes one
            named = root if root.name else root.resolve()
            dataset = named.with_name(f"{named.name}-cfmae")
            raise DataError(f"{root}: a folder of photos ({photos}), not a cfmae dataset (no 'rgb' folder). Label "
                            f"it first: cfmae label {root} --out {dataset} (docs/labelling.md), then give --data "
                            f"{dataset}.")
        raise DataError(f"{rgb_root}: no 'rgb' folder. Expected DATA/rgb, DATA/instance, DATA/semantic "
                        f"(see docs/dataset-format.md).")
    class_dirs = list_folder(rgb_root).dirs
    groups = [(c, rgb_root / c) for c in class_dirs] if class_dirs else [("", rgb_root)]
    files: list[tuple[int, list[str]]] = []
    missing: list[str] = []
    for label, (class_dir, folder) in enumerate(groups):
        existing = {m: _pngs(root / m / class_dir) for m in maps}
        found: list[str] = []
        files.append((label, found))
        for name in list_folder(folder).files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            lacking = [m for m in maps if stem not in existing[m]]
            if lacking:
                missing.append(f"{folder / name} (no {' and no '.join(lacking)} map: expected "
                               f"{map_path(root, lacking[0], class_dir, stem)})")
                continue
            found.append(name)
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  … and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image(s) in {rgb_root} have no maps:\n  {shown}{more}\n"
                        f"Label them with `cfmae label` (docs/labelling.md) or remove them.")
    samples = SampleTable.from_folders(rgb_root, root, maps, class_dirs, files)
    if not len(samples):
        raise DataError(f"{rgb_root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return samples, class_dirs


def _photos_in(root: Path) -> str:
    """How many images ``root`` and its class folders hold (``"N images, e.g. NAME"``), or "" for none."""
    listing = list_folder(root)
    found = [root / n for n in listing.files if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    for d in listing.dirs[:1000]:
        found += [root / d / n for n in list_folder(root / d).files
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return f"{len(found)} image(s), e.g. {found[0].relative_to(root)}" if found else ""


def _pngs(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {name[:-4] for name in list_folder(folder).files if name.lower().endswith(".png")}


def save_map(path: str | Path, ids: np.ndarray) -> None:
    """Save an id map as PNG (uint8, or uint16 when ids exceed 255), atomically."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"an id map must be 2-D, got shape {ids.shape}")
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 65535:
        raise ValueError("map ids must lie in [0, 65535]")
    arr = ids.astype(np.uint8) if ids.max(initial=0) <= 255 else ids.astype(np.uint16)
    _atomic_save_image(Image.fromarray(arr), Path(path))


def save_rgb(path: str | Path, rgb: np.ndarray | Image.Image, quality: int = 95) -> None:
    """Save an RGB image (format from the extension), atomically."""
    image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    _atomic_save_image(image.convert("RGB"), Path(path), quality=quality)


def _atomic_save_image(image: Image.Image, path: Path, **params: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    if fmt != "JPEG":
        params.pop("quality", None)
    atomic_write(path, lambda fh: image.save(fh, format=fmt, **params), binary=True)


COPYABLE_MODES = {"RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1"}  # PIL's convert("RGB") reads these


MAX_PIXELS = 178_956_970  # larger images are refused (179 MP, the size at which PIL itself refuses one by default)


def open_image(path: Path) -> Image.Image:
    """``Image.open`` without PIL's decompression-bomb warning: cfmae checks its own limit (:data:`MAX_PIXELS`)
    when it reads the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def read_image(path: Path, short_side: int | None = None) -> tuple[np.ndarray, bool]:
    """→ (H×W×3 uint8 RGB, converted). ``converted`` is True for modes that a plain RGB reader would
    misread (16-bit and float images): those are written to the dataset as 8-bit PNG. ``short_side``: the image
    may be read smaller, its short side at least this (JPEG decoded at 1/2 to 1/8 scale, others reduced by an
    integer factor), which keeps a huge photo cheap. Images above :data:`MAX_PIXELS` are refused (ValueError)."""
    with open_image(path) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} = {w * h / 1e6:.0f} MP, above the {MAX_PIXELS / 1e6:.0f} MP cfmae reads; "
                             f"downscale it first")
        factor = max(1, min(w, h) // short_side) if short_side else 1
        if factor > 1 and im.format == "JPEG":
            im.draft(im.mode, (w // factor, h // factor))  # decodes at a power-of-two scale, at least this size
        im.load()  # a truncated file fails here
        by = min(im.size) // short_side if factor > 1 else 1
        if im.mode in COPYABLE_MODES:
            rgb = im.convert("RGB")
            return np.asarray(rgb.reduce(by) if by > 1 else rgb), False
        arr = np.asarray(im).astype(np.float64)
    if arr.ndim == 3:
        arr = arr[..., :3]
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:  # float images: stretch to the range
        arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12) * 255.0
        top = 255.0
    arr = np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8)
    rgb = np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr
    return (np.asarray(Image.fromarray(rgb).reduce(by)) if by > 1 else rgb), True


PACKED_MANIFEST = "cfmae-packed.json"  # the manifest of a packed copy (cfmae_cli.data.packed)
PACKED_FORMAT, PACKED_VERSION = "cfmae-packed", 1


def is_packed(root: str | Path) -> bool:
    """Whether ``root`` is a packed copy (``cfmae pack``): it holds :data:`PACKED_MANIFEST`."""
    return (Path(root) / PACKED_MANIFEST).is_file()


def pack_again(manifest: dict[str, Any]) -> str:
    """What to do about a damaged pack."""
    return f"pack the data again (cfmae pack {manifest.get('source', 'DATA')} --out NEW)"


def _whole(value: Any, low: int, high: int | float) -> TypeGuard[int]:
    return type(value) is int and low <= value <= high


def read_packed_manifest(root: Path) -> dict[str, Any]:
    """``PACKED/cfmae-packed.json``, read and checked before anything is sized by it: format and version, the
    semantic classes (as a dataset's manifest's, :func:`~cfmae_cli.data.layout.check_semantic_classes`), size
    and map_size, the maps (id maps of the table), the class folders, the shards' image counts and their
    total. That the files agree with it is :func:`cfmae_cli.data.packed.check_packed`'s part. Torch-free, so that
    a command can refuse a bad manifest before it imports torch."""
    path = root / PACKED_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not readable ({exc}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKED_FORMAT or manifest.get("version") != PACKED_VERSION:
        raise DataError(f"{path}: not a {PACKED_FORMAT} v{PACKED_VERSION} manifest; pack the data again.")
    check_semantic_classes(path, manifest)

    def wrong(key: str, what: str) -> DataError:
        return DataError(f"{path}: {key} is {manifest.get(key)!r:.80}, not {what}; the manifest is damaged: "
                         f"{pack_again(manifest)}.")

    size, side = manifest.get("size"), manifest.get("map_size")
    if not _whole(size, 1, 65535):
        raise wrong("size", "a side of 1 to 65535 px (a JPEG's largest)")
    if not _whole(side, 1, size) or size % side:
        raise wrong("map_size", f"a divisor of size {size}")
    manifest.setdefault("maps", ["instance", "semantic"])  # (packs written before the key)
    maps = manifest["maps"]
    if not isinstance(maps, list) or not maps or len(set(map(str, maps))) != len(maps) or \
            not all(isinstance(m, str) and m in table.TABLE and table.get(m).kind == "ids" for m in maps):
        raise wrong("maps", f"a list of distinct id maps ({', '.join(id_maps())})")
    folders = manifest.get("class_folders")
    if not isinstance(folders, list) or not all(isinstance(c, str) for c in folders):
        raise wrong("class_folders", "a list of folder names")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(_whole(n, 0, float("inf")) for n in shards):
        raise wrong("shards", "a list of image counts")
    if not _whole(manifest.get("images"), 0, float("inf")) or manifest["images"] != sum(shards):
        raise wrong("images", f"the {sum(shards):,} images of its shards")
    return manifest
