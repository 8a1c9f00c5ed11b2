"""Helpers shared by the learned labelling backends: model specs, safe loading, prompts, label-map resizing.

Nothing here downloads by itself: a spec that is a local folder is used as is, anything else is a hub id
that transformers may fetch (only because the user named it). Every loading failure becomes a
:class:`~cfmae_cli.errors.CfmaeError` that names the option and the spec (exit code 2, no traceback).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cfmae_cli.errors import CfmaeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_WNID = re.compile(r"^n\d{8}$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


def is_path_like(spec: str) -> bool:
    """True for specs that can only mean a local path: starting with ``/``, ``./``, ``../``, ``~``, or holding a
    path separator without being of the hub form ``owner/name``."""
    if spec.startswith(("/", "./", "../", "~", ".\\")):
        return True
    has_sep = os.sep in spec or (os.altsep is not None and os.altsep in spec)
    return has_sep and _HUB_ID.fullmatch(spec) is None


def resolve_model(spec: str, option: str) -> str:
    """Turn a ``--*-model`` value into what ``from_pretrained`` gets.

    An existing local folder is returned (user-expanded) and used as is. A path-like spec (see
    :func:`is_path_like`) that does not exist raises a CfmaeError naming the option. Anything else is
    returned unchanged: a hub id (``owner/name``), which transformers may find cached or download.
    """
    spec = str(spec).strip()
    if not spec:
        raise CfmaeError(f"{option}: empty model name; give a hub id or a local model folder")
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CfmaeError(f"{option} {spec}: not a folder; give the folder that holds config.json and the "
                             "weights (or a hub id)")
        return str(local)
    if is_path_like(spec):
        raise CfmaeError(f"{option} {spec}: folder not found; give an existing model folder (config.json + "
                         "weights, as written by save_pretrained) or a hub id such as owner/model-name")
    return spec


def load_or_fail(option: str, spec: str, what: str, loader: Callable[[], T]) -> T:
    """Run ``loader()``; turn any failure (offline and not cached, not a model folder, wrong files) into a
    CfmaeError naming ``option`` and ``spec``."""
    try:
        return loader()
    except CfmaeError:
        raise
    except ImportError as exc:  # e.g. transformers missing
        raise CfmaeError(f"{option} {spec}: cannot load the {what}: {exc}. Install the labelling extras: "
                         "pip install 'transformers>=5'") from exc
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, KeyError, safetensors errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        offline = " (offline mode: HF_HUB_OFFLINE is set)" if offline_env else ""
        raise CfmaeError(f"{option} {spec}: cannot load the {what}{offline}: {first}. Give a local folder "
                         "saved with save_pretrained, or a hub id that is cached or reachable") from exc


def transformers_module(option: str) -> Any:
    """The ``transformers`` package, or a CfmaeError saying how to install it."""
    try:
        import transformers  # optional dependency
    except ImportError as exc:
        raise CfmaeError(f"{option}: the learned labelling backends need transformers>=5: "
                         "pip install 'transformers>=5'") from exc
    return transformers


def load_config_checked(option: str, spec: str, allowed: tuple[str, ...]) -> Any:
    """Load ``spec``'s config and check that its ``model_type`` is one of ``allowed`` (else CfmaeError)."""
    tf = transformers_module(option)
    config = load_or_fail(option, spec, "model config", lambda: tf.AutoConfig.from_pretrained(spec))
    if config.model_type not in allowed:
        raise CfmaeError(f"{option} {spec}: wrong architecture '{config.model_type}'; expected "
                         f"{' or '.join(allowed)}")
    return config


@functools.lru_cache(maxsize=1)
def _imagenet_info() -> Any:
    from timm.data import ImageNetInfo  # heavy: only for a WordNet-id class folder's prompt

    return ImageNetInfo()


@functools.lru_cache(maxsize=4096)
def prompt_for(class_folder: str | None) -> str:
    """Grounding DINO text prompt from a class folder name.

    ImageNet wnids (``n01440764``) become their readable name from timm's offline table (first synonym
    before the comma); other names get ``_``/``-`` turned into spaces; ``None`` or ``""`` gives ``object``.
    The result is lowercase and ends with ``" ."``, e.g. ``'tench .'`` (Grounding DINO needs lowercase
    phrases that end with a dot).
    """
    name = (class_folder or "").strip()
    if _WNID.match(name):
        try:
            name = _imagenet_info().label_name_to_description(name).split(",")[0]
        except (KeyError, ImportError, OSError):  # an unknown wnid: keep it as it is
            logger.debug("no ImageNet name for %s", name)
    name = re.sub(r"[_\-]+", " ", name)
    name = re.sub(r"\s+", " ", name).strip().rstrip(".").strip().lower()
    return f"{name or 'object'} ."


def normalize_prompt(prompt: str) -> str:
    """Lowercase, single-spaced, ending with ``.`` (a prompt list without dots would be merged by the
    Grounding DINO processor into one caption)."""
    text = re.sub(r"\s+", " ", str(prompt)).strip().lower()
    if not text or text == ".":
        return "object ."
    return text if text.endswith(".") else f"{text} ."


@contextlib.contextmanager
def inference_context(device: torch.device, bf16: bool) -> Iterator[None]:
    """``torch.inference_mode`` plus bf16 autocast when asked for and on CUDA."""
    use_amp = bool(bf16) and device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        yield


def as_rgb_array(image: np.ndarray) -> np.ndarray:
    """Check an HxWx3 uint8 RGB array; return it writable (a read-only one, e.g. ``np.asarray(pil)``, is
    copied: torch warns on non-writable arrays)."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {arr.shape} dtype {arr.dtype}")
    return arr if arr.flags.writeable else arr.copy()


def chunks(n: int, size: int) -> list[range]:
    """Index ranges of at most ``size`` items covering ``range(n)``."""
    size = max(1, int(size))
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
