"""Checkpoint files (DESIGN §5.2): plain data that loads with ``torch.load(weights_only=True)``, written
atomically; where a run keeps them; the RNG states they carry. Below the model and training layers, so that
both read and write checkpoints without importing each other."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format version) to a temporary file in the same folder, fsync it, then rename
    it over ``path``: a crash, a power loss or a full disk never leaves a broken checkpoint behind."""
    path = Path(path)
    try:
        return atomic_write(path, lambda fh: torch.save({"format_version": FORMAT_VERSION, **state}, fh),
                            binary=True, durable=True)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, CfmaeError):
            raise
        raise CheckpointWriteError(path, exc) from None


class CheckpointWriteError(CfmaeError):
    """Writing a checkpoint failed (disk full, no permission, …); the previous file is untouched."""

    exit_code = 1

    def __init__(self, path: Path, exc: BaseException):
        kept = f"the previous {path.name} is intact" if path.exists() else "no earlier file was replaced"
        super().__init__(f"{path}: could not write the checkpoint ({type(exc).__name__}: {exc}); {kept}. "
                         f"Free disk space and continue with --resume {path.parent.parent}.")


def checkpoint_path(path: str | Path) -> Path:
    """A run folder means its ``checkpoints/last.pt``; a file means itself."""
    path = Path(path)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear :class:`CfmaeError` when it is not one.

    When the file is damaged, the message offers the newest other checkpoint of the same run. ``mmap``
    maps the tensors instead of reading them (cheap when only the config or counters are needed).
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise CfmaeError(f"{path}: checkpoint not found.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint of ours"
        raise CfmaeError(f"{path}: not a readable cfmae checkpoint ({type(exc).__name__}: {exc}).{_offer(path)}"
                         ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION or "model" not in ckpt:
        raise CfmaeError(f"{path}: not a cfmae checkpoint of format version {FORMAT_VERSION}.{_offer(path)}")
    return ckpt


def newest_checkpoint(base: Path = Path("runs/pretrain")) -> Path:
    """The newest ``runs/pretrain/*/checkpoints/last.pt``; exit 2 with a hint when there is none."""
    found = sorted(base.glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CfmaeError(f"no pre-training run under {base}/ (looked for */checkpoints/last.pt). Run "
                         f"`cfmae pretrain` first, or pass --checkpoint CKPT|RUN.")
    return found[-1]


def periodic_checkpoints(folder: Path) -> list[Path]:
    """``epoch-NNNN.pt`` files of a checkpoints folder, oldest first."""
    return sorted(folder.glob("epoch-*.pt"))


def _offer(bad: Path) -> str:
    others = [p for p in periodic_checkpoints(bad.parent) if p != bad]
    if not others:
        return ""
    return f" The newest periodic checkpoint is {others[-1]}: continue from it with --resume {others[-1]}"


def prune_checkpoints(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest periodic checkpoints; returns what was deleted."""
    old = periodic_checkpoints(folder)[:-keep_last] if keep_last > 0 else periodic_checkpoints(folder)
    for path in old:
        path.unlink(missing_ok=True)
    return old
