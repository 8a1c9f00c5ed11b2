"""The built-in demo dataset: random crops of scikit-image's bundled photographs, labelled classically.

Needs no download and no learned weights: the photographs ship inside scikit-image and the maps come
from :class:`cfmae_cli.labeling.classical.ClassicalLabeller`. Each photograph is one class folder::

    ROOT/rgb/<photo>/<photo>_<i:03d>.jpg        (size, size, 3) uint8, JPEG quality 95
    ROOT/instance/<photo>/<photo>_<i:03d>.png   (size, size) uint8, 0 = background
    ROOT/semantic/<photo>/<photo>_<i:03d>.png   (size, size) uint8 ids into SEMANTIC_CLASSES
    ROOT/depth/<photo>/<photo>_<i:03d>.png      (size, size) uint16 classical depth cue (``depth=True`` only)
    ROOT/cfmae-dataset.json

With depth the dataset has a folder of its own (``demo-depth-v1``): the RGB crops and the maps are the same.

Beside it, :func:`build_demo_monitor_set` writes the k-NN monitor's labelled images for the demo: close-ups of
the same photographs (docs/monitoring.md says why close-ups)::

    MONITOR/train/<photo>/<photo>_<i:03d>.jpg   MONITOR/val/<photo>/<photo>_<i:03d>.jpg   MONITOR/cfmae-monitor.json

A build goes to a temporary sibling folder that is renamed into place at the end, so an interrupted
build never leaves a half dataset at ``ROOT``. A second call with the same recipe returns at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import skimage.data
from PIL import Image

from cfmae_cli import __version__
from cfmae_cli.data import layout
from cfmae_cli.errors import CfmaeError, DataError
from cfmae_cli.formats import NAME_MAX, atomic_write_text, fit_name
from cfmae_cli.labeling.classical import SEMANTIC_CLASSES, ClassicalDepth, ClassicalLabeller

logger = logging.getLogger(__name__)

#: Colour photographs bundled with scikit-image (no download needed); one class folder each.
DEMO_PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
    "hubble_deep_field", "immunohistochemistry", "retina",
)
#: Version of the recipe; part of the default folder name so that a changed recipe uses a new folder.
DEMO_VERSION = 1
#: A crop's side as a share of the photo's shorter side: the dataset's crops, and the monitor's close-ups.
CROP_SCALE, CLOSE_UP_SCALE = (0.3, 1.0), (0.1, 0.2)
MONITOR_RECIPE_NAME = "cfmae-monitor.json"
#: Seconds a 2-core CPU takes per 128-px image (labelled crop; depth cue too; monitor close-up, only cut and
#: saved): the estimate announced before a build. They scale with the pixels.
SECONDS_PER_CROP, SECONDS_PER_DEPTH_CROP, SECONDS_PER_CLOSE_UP = 0.07, 0.09, 0.006


def _cache() -> Path:
    if os.environ.get("CFMAE_CACHE"):
        return Path(os.environ["CFMAE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "cfmae"
    return Path.home() / ".cache" / "cfmae"


def default_demo_root(depth: bool = False) -> Path:
    """``$CFMAE_CACHE/demo-v1``, else ``$XDG_CACHE_HOME/cfmae/demo-v1``, else ``~/.cache/cfmae/demo-v1``;
    ``demo-depth-v1`` with ``depth``."""
    return _cache() / f"demo{'-depth' if depth else ''}-v{DEMO_VERSION}"


def default_monitor_root() -> Path:
    """``demo-monitor-v1`` beside :func:`default_demo_root`."""
    return _cache() / f"demo-monitor-v{DEMO_VERSION}"


def load_photo(name: str) -> np.ndarray:
    """One of :data:`DEMO_PHOTOS` as ``(H, W, 3)`` uint8 (the left view for ``stereo_motorcycle``)."""
    if name not in DEMO_PHOTOS:
        raise DataError(f"unknown demo photo {name!r}; expected one of {', '.join(DEMO_PHOTOS)}.")
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int,
                scale: tuple[float, float] = CROP_SCALE) -> np.ndarray:
    """A random square crop of ``photo`` resized to ``(size, size, 3)`` uint8.

    The side is a uniform fraction in ``scale`` of the photo's shorter side, the position is uniform
    and the crop is flipped left-right with probability 1/2.
    """
    height, width = photo.shape[:2]
    side = max(1, int(round(rng.uniform(*scale) * min(height, width))))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image)


def build_demo_dataset(root: Path | str | None = None, crops_per_photo: int = 48, size: int = 128,
                       seed: int = 0, depth: bool = False) -> Path:
    """Build (or reuse) the demo dataset and return its root folder.

    Args:
        root: target folder; :func:`default_demo_root` when ``None``.
        crops_per_photo: random crops taken from each of :data:`DEMO_PHOTOS`.
        size: side in pixels of every (square) image and map.
        seed: seed of the crops; the same seed gives the same dataset.
        depth: also write ``depth/``, the classical depth cue (:meth:`ClassicalLabeller.depth`).

    Returns:
        ``root``, holding ``len(DEMO_PHOTOS) * crops_per_photo`` images in the dataset layout.
    """
    if crops_per_photo < 1:
        raise DataError(f"crops_per_photo must be at least 1, got {crops_per_photo}.")
    if size < 16:
        raise DataError(f"size must be at least 16 pixels, got {size}.")
    root = Path(root).expanduser() if root is not None else default_demo_root(depth)
    recipe: dict[str, Any] = {"crops_per_photo": int(crops_per_photo), "size": int(size), "seed": int(seed),
                              **({"depth": "classical"} if depth else {})}
    count = len(DEMO_PHOTOS) * crops_per_photo
    return _build(root, lambda folder: _write_dataset(folder, recipe), lambda folder: _is_built(folder, recipe),
                  f"demo dataset ({count} images of {size} px{', with depth' if depth else ''})",
                  count * (SECONDS_PER_DEPTH_CROP if depth else SECONDS_PER_CROP) * (size / 128) ** 2)


def build_demo_monitor_set(root: Path | str | None = None, train_per_photo: int = 40, val_per_photo: int = 20,
                           size: int = 128, seed: int = 1) -> Path:
    """Build (or reuse) the k-NN monitor's labelled images for the demo data and return their root folder: an
    ImageFolder (``train/`` and ``val/``, one class per photograph) of close-ups, squares of 0.1-0.2 of the
    photograph's shorter side (the dataset's crops take 0.3-1.0). Seeded apart from the dataset's crops."""
    if train_per_photo < 1 or val_per_photo < 1:
        raise DataError(f"the monitor set needs at least one image per photo and split, got {train_per_photo} "
                        f"and {val_per_photo}.")
    root = Path(root).expanduser() if root is not None else default_monitor_root()
    recipe = {"train_per_photo": int(train_per_photo), "val_per_photo": int(val_per_photo), "size": int(size),
              "seed": int(seed), "scale": list(CLOSE_UP_SCALE)}
    count = len(DEMO_PHOTOS) * (train_per_photo + val_per_photo)
    return _build(root, lambda folder: _write_monitor_set(folder, recipe),
                  lambda folder: _monitor_recipe(folder) == recipe, f"demo monitor set ({count} close-ups)",
                  count * SECONDS_PER_CLOSE_UP * (size / 128) ** 2)


def _build(root: Path, write: Callable[[Path], None], is_built: Callable[[Path], bool], what: str,
           seconds: float) -> Path:
    """``write`` into a temporary sibling of ``root``, then rename it into place; nothing when already built.
    A build is announced first, with ``seconds``, its estimated duration: a first run is not silent."""
    if is_built(root):
        logger.info("%s already at %s", what, root)
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CfmaeError(_cache_error(root.parent, exc)) from None
    _remove_stale_temporaries(root)
    tmp = _sibling(root, "tmp", os.getpid())
    if tmp.exists():
        shutil.rmtree(tmp)
    logger.info("building the %s: about %s, once; cached in %s", what, _about(seconds), root)
    start = time.perf_counter()
    try:
        write(tmp)
        _move_into_place(tmp, root, is_built)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s written to %s in %.1f s", what, root, time.perf_counter() - start)
    return root


def _about(seconds: float) -> str:
    """A duration as said before it starts: ``a second``, ``10 s``, ``2 min``."""
    if seconds < 1.5:
        return "a second"
    if seconds < 90:
        return f"{round(seconds / 5) * 5 if seconds > 10 else round(seconds)} s"
    return f"{round(seconds / 60)} min"


def _cache_error(folder: Path, exc: OSError) -> str:
    """The message for a cache folder that cannot be made: a file in its way, or no permission."""
    blocking = next((p for p in (folder, *folder.parents) if p.is_file()), None)
    where = "set CFMAE_CACHE to a folder you can write" + (f" (it is {os.environ['CFMAE_CACHE']})"
                                                          if os.environ.get("CFMAE_CACHE") else "")
    if blocking is not None:
        return f"{blocking}: a file, not a folder; the demo data is cached in {folder}: {where}, or move the file."
    return f"{folder}: the demo data cannot be cached there ({exc.strerror or exc}); {where}."


def _write_dataset(folder: Path, recipe: dict[str, Any]) -> None:
    """Write every image, map and the manifest under ``folder``."""
    labeller = ClassicalLabeller()
    n_images = 0
    for index, name in enumerate(DEMO_PHOTOS):
        photo = load_photo(name)
        rng = np.random.default_rng([recipe["seed"], index])
        for i in range(recipe["crops_per_photo"]):
            rgb = random_crop(photo, rng, recipe["size"])
            instance, semantic = labeller.label(rgb)
            stem = f"{name}_{i:03d}"
            layout.save_rgb(folder / "rgb" / name / f"{stem}.jpg", rgb, quality=95)
            layout.save_map(layout.map_path(folder, "instance", name, stem), instance)
            layout.save_map(layout.map_path(folder, "semantic", name, stem), semantic)
            if recipe.get("depth"):
                layout.save_map(layout.map_path(folder, "depth", name, stem), labeller.depth(rgb))
            n_images += 1
        logger.debug("demo: %s done (%d crops)", name, recipe["crops_per_photo"])
    labelling: dict[str, Any] = {
        "instance": "classical",
        "semantic": "classical",
        "source": "scikit-image sample photographs",
        "photos": list(DEMO_PHOTOS),
        "recipe": dict(recipe),
        "labeller": labeller.describe(),
        "tool": f"cfmae {__version__}",
        **({"depth": ClassicalDepth(labeller).describe()} if recipe.get("depth") else {}),
    }
    layout.write_manifest(folder, SEMANTIC_CLASSES, labelling=labelling,
                          counts={"images": n_images, "classes": len(DEMO_PHOTOS)},
                          instance_dtype=labeller.instance_dtype)


def _write_monitor_set(folder: Path, recipe: dict[str, Any]) -> None:
    splits = (("train", recipe["train_per_photo"]), ("val", recipe["val_per_photo"]))
    for number, (split, count) in enumerate(splits):
        for index, name in enumerate(DEMO_PHOTOS):
            photo = load_photo(name)
            rng = np.random.default_rng([recipe["seed"], number, index])
            for i in range(count):
                rgb = random_crop(photo, rng, recipe["size"], tuple(recipe["scale"]))
                layout.save_rgb(folder / split / name / f"{name}_{i:03d}.jpg", rgb, quality=95)
    atomic_write_text(folder / MONITOR_RECIPE_NAME, json.dumps({"recipe": recipe, "photos": list(DEMO_PHOTOS),
                                                               "tool": f"cfmae {__version__}"}, indent=1))


def _monitor_recipe(root: Path) -> dict[str, Any] | None:
    """The recipe a complete monitor set at ``root`` was made with (None: none there, or other photographs)."""
    try:
        stored = json.loads((root / MONITOR_RECIPE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stored.get("recipe") if isinstance(stored, dict) and stored.get("photos") == list(DEMO_PHOTOS) else None


def _is_built(root: Path, recipe: dict[str, Any]) -> bool:
    """Whether ``root`` holds a complete demo dataset made with ``recipe``."""
    if not (root / layout.MANIFEST_NAME).is_file():
        return False
    try:
        manifest = layout.read_manifest(root)
    except DataError:
        return False
    labelling = manifest.get("labelling")
    return (isinstance(labelling, dict) and labelling.get("recipe") == recipe
            and labelling.get("photos") == list(DEMO_PHOTOS))


def _move_into_place(tmp: Path, root: Path, is_built: Callable[[Path], bool]) -> None:
    """Rename ``tmp`` to ``root``; an existing ``root`` (another recipe, incomplete) is replaced."""
    old = _sibling(root, "old", os.getpid())
    if root.exists() or root.is_symlink():
        if is_built(root):  # another process finished the same build meanwhile
            shutil.rmtree(tmp)
            return
        if old.exists():
            shutil.rmtree(old)
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        if is_built(root):
            shutil.rmtree(tmp)
        else:
            raise
    finally:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _sibling(root: Path, kind: str, pid: int) -> Path:
    """``<root>.<kind>-<pid>`` beside ``root``: where it is built (``tmp``) or set aside (``old``); a long
    ``root`` name is shortened (:func:`~cfmae_cli.formats.fit_name`) so that the name fits NAME_MAX."""
    return root.parent / f"{_sibling_prefix(root, kind)}{pid}"


def _sibling_prefix(root: Path, kind: str) -> str:
    return f"{fit_name(root.name, NAME_MAX - len(kind) - 2 - 10)}.{kind}-"  # 10: the digits of any pid


def _remove_stale_temporaries(root: Path) -> None:
    """Remove ``<root>.tmp-<pid>`` / ``<root>.old-<pid>`` folders left by processes that are gone."""
    for prefix in (_sibling_prefix(root, "tmp"), _sibling_prefix(root, "old")):
        for path in root.parent.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix):]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                continue  # another live build; leave it alone
            logger.info("removing leftover %s", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (best effort; ``True`` when unsure)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
