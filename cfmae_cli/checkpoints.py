"""Checkpoint files (docs/design.md §5.2): plain data that loads with ``torch.load(weights_only=True)``, written
atomically; where a run keeps them; the RNG states they carry; a look at what a file holds without torch
(:func:`peek_checkpoint`, :func:`safetensors_shapes`: the sizes are checked before anything costs memory).
Below the model and training layers, so that both read and write checkpoints without importing each other.
torch and NumPy are imported where they are used, so that the look and the paths cost no import of them."""

from __future__ import annotations

import collections
import json
import pickle
import random
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write
from cfmae_cli.hub import local_weights

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


def __getattr__(name: str) -> Any:
    """``checkpoints.torch`` (as when torch was imported at the top): torch, imported when first asked for."""
    if name == "torch":
        import torch  # heavy: keeps cfmae --help fast

        return torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain data."""
    import numpy as np  # heavy: keeps cfmae --help fast
    import torch  # heavy: keeps cfmae --help fast

    name, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this process's GPU only (cuda:LOCAL_RANK): the one its draws come from
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np  # heavy: keeps cfmae --help fast
    import torch  # heavy: keeps cfmae --help fast

    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # before issue 29: the states of every GPU the process could see
            if device >= len(cuda):
                return  # (a checkpoint of a process that saw fewer GPUs: this GPU's draws start afresh)
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def state_bytes(*states: Any) -> int:
    """The bytes of the tensors in ``states`` (nested dicts, lists, tuples): about the size of the file they make."""
    import torch  # heavy: keeps cfmae --help fast

    total, stack = 0, list(states)
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format version) to a temporary file in the same folder, fsync it, then rename
    it over ``path``: a crash, a power loss or a full disk never leaves a broken checkpoint behind."""
    import torch  # heavy: keeps cfmae --help fast

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
        run = path.parent.parent
        if path.exists():
            then = f"the previous {path.name} is intact. Free disk space and continue with --resume {run}"
        else:
            then = f"no earlier file was replaced. Free disk space and run the same command again (with --out {run})"
        super().__init__(f"{path}: could not write the checkpoint ({type(exc).__name__}: {exc}); {then}.")


def checkpoint_path(path: str | Path) -> Path:
    """A run folder means its ``checkpoints/last.pt``; a file means itself; a hub spec
    (``hf-hub:owner/name[@revision]``) means its local copy first (:func:`cfmae_cli.hub.local_weights`: the file
    its repository holds, or its snapshot folder, which is an exported folder and has no ``checkpoints/``)."""
    path = local_weights(path)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def read_torch_file(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` of an existing file, with one clear :class:`CfmaeError` for each way
    a file can fail to be a checkpoint: empty, not written by ``torch.save`` at all, damaged (cut off,
    corrupt), or holding Python objects besides tensors (refused, as loading those runs code; never the advice
    to turn that check off). ``mmap`` maps the tensors (cheap for the config alone) where the format allows."""
    import torch  # heavy: keeps cfmae --help fast

    size = path.stat().st_size
    if size == 0:
        raise CfmaeError(f"{path}: the file is empty (0 bytes): cut off while it was written, or not a checkpoint.")
    with path.open("rb") as fh:
        head = fh.read(4)
    zipped = head == b"PK\x03\x04"  # torch.save's format since 1.6; older files are a pickle (0x80, protocol)
    if not zipped and head[:1] != b"\x80":
        raise CfmaeError(f"{path}: not a file written by torch.save ({size:,} bytes that are neither its zip format "
                         f"nor a pickle); give a cfmae checkpoint, a .pth / .pt state dict or a .safetensors file.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except Exception as exc:  # noqa: BLE001 - every unpickling failure becomes one message
        text = str(exc)
        if "Unsupported global" in text:
            raise CfmaeError(f"{path}: holds Python objects besides tensors, which are not loaded (unpickling them "
                             f"runs code). Re-save the weights alone, e.g. torch.save(ckpt['model'], "
                             f"'weights.pt').") from None
        if "WeightsUnpickler error:" in text:  # torch's advice around it (to load unsafely) is never repeated
            text = text.split("WeightsUnpickler error:", 1)[1]
        elif "Weights only load failed" in text:
            text = type(exc).__name__
        reason = (text.strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise CfmaeError(f"{path}: the file is damaged: cut off or corrupt ({size:,} bytes; torch: {reason})."
                         ) from None


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
        ckpt = read_torch_file(path, map_location, mmap)
    except CfmaeError as exc:
        raise CfmaeError(f"{exc}{_offer(path)}") from None
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


# ----------------------------------------------------------------------------------------------------------
# a look without torch


@dataclass(frozen=True)
class TensorShape:
    """A tensor of a file, as far as its index tells: its shape (the data is not read)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Opaque:
    """Anything of torch's besides a tensor (a storage, a device, a dtype): kept as nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _rebuild_tensor(storage: Any, offset: int, size: Any, *rest: Any) -> TensorShape:
    return TensorShape(tuple(int(n) for n in size))


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    return func(*args)


class _Peeker(pickle.Unpickler):
    """Unpickles a ``torch.save`` file's index with harmless stand-ins for torch's names (a tensor becomes its
    :class:`TensorShape`); any other global is refused, so that nothing of the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name == "Size":
            return tuple
        if module.split(".")[0] == "torch":
            if name.startswith("_rebuild_tensor"):
                return _rebuild_tensor
            if name.startswith("_rebuild_parameter"):
                return lambda data, *rest: data
            if name == "_rebuild_from_type_v2":
                return _rebuild_from_type
            return _Opaque
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return _Opaque()


def peek_checkpoint(path: Path, limit: int = 256 << 20) -> dict[str, Any] | None:
    """The top-level dict of a ``torch.save`` file (zip format) with its tensors as :class:`TensorShape`, read
    from the file's pickled index alone: no torch import, no tensor data. None when the file cannot be looked at
    this way (an old pickle file, damage, other Python objects, an index above ``limit`` bytes): the reader
    (:func:`read_torch_file`) then says what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            index = next((i for i in archive.infolist() if i.filename.endswith("/data.pkl")
                          and i.filename.count("/") == 1), None)
            if index is None or index.file_size > limit:
                return None
            with archive.open(index) as fh:
                top = _Peeker(fh).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError, struct.error, NotImplementedError):
        return None
    return top if isinstance(top, dict) else None


def safetensors_shapes(path: Path) -> dict[str, TensorShape] | None:
    """The tensors of a ``.safetensors`` file and their shapes, from its JSON header (no data read, no torch);
    None when the header is not readable (the reader then names the file)."""
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 << 20:  # the format's own bound
                return None
            header = json.loads(fh.read(size))
        return {k: TensorShape(tuple(int(n) for n in v["shape"])) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
        return None
