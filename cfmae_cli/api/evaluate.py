"""``cfmae finetune --eval-only`` as a function: the validation of a fine-tuned checkpoint on its own, written as
JSON beside its run (or where asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from cfmae_cli.api.common import Overrides, PathLike, as_patch, as_set_items, run_overrides
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write_text


def evaluate(checkpoint: Optional[PathLike], data: Optional[PathLike] = None, out: Optional[PathLike] = None, *,
             gpus: Optional[int] = None, batch_size: Optional[int] = None, workers: Optional[int] = None,
             overrides: Overrides | None = None) -> dict[str, Any]:
    """``cfmae finetune --eval-only``: the validation of a fine-tuned checkpoint on its own (top-1 / top-5, mIoU,
    AP; the task its config names) on ``data`` (default: the data it was fine-tuned on), written as JSON to
    ``out`` (default ``<run>/eval-<checkpoint>.json`` beside the run). ``checkpoint``: a fine-tuning run folder
    (its ``best.pt``, else ``last.pt``) or checkpoint file. Returns what the JSON holds, with ``written``."""
    from cfmae_cli.config import check_weights_file
    from cfmae_cli.hub import is_hub

    if gpus is not None and gpus > 1:
        raise CfmaeError(f"--gpus {gpus}: --eval-only runs in one process (--gpus 0 or 1).")
    if checkpoint is None:
        raise CfmaeError("--eval-only needs the fine-tuned checkpoint: --checkpoint RUN or CKPT.")
    if is_hub(checkpoint) and out is None:
        raise CfmaeError(f"--checkpoint {checkpoint}: a hub repository has no run folder to write beside; say where "
                         f"the results go with --out FILE.json.")
    file = evaluation_checkpoint(checkpoint)
    if not file.is_file():
        raise CfmaeError(f"--checkpoint {checkpoint}: no such file (a fine-tuning run folder needs "
                         f"checkpoints/best.pt or last.pt).")
    check_weights_file(file)
    target = Path(out) if out is not None else _beside_run(file)
    if target.is_dir():
        raise CfmaeError(f"--out {target}: a folder; give the JSON file to write (e.g. {target / 'eval.json'}).")
    items = run_overrides(as_set_items(overrides), data, None, None, gpus, 1, None, None)
    if batch_size is not None:
        items.append(f"train.batch_size={batch_size}")
    if workers is not None:
        items.append(f"data.num_workers={workers}")
    from cfmae_cli.eval.finetune import evaluate_checkpoint  # heavy: torch, after the checks

    result = evaluate_checkpoint(file, as_patch(items))
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
    return {**result, "written": str(target)}


def evaluation_checkpoint(path: str | Path) -> Path:
    """The file that ``--eval-only`` evaluates: a fine-tuning run folder means its ``checkpoints/best.pt`` (the
    epoch its validation chose), else its ``last.pt``; a file means itself; ``hf-hub:owner/name`` the checkpoint
    file that repository holds (its local copy)."""
    from cfmae_cli.hub import local_weights

    path = local_weights(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        return best if best.is_file() else path / "checkpoints" / "last.pt"
    return path


def _beside_run(file: Path) -> Path:
    """``<run>/eval-<stem>.json`` for a checkpoint in ``<run>/checkpoints/``; a file elsewhere needs ``--out``."""
    if file.parent.name != "checkpoints":
        raise CfmaeError(f"--checkpoint {file}: not in a run's checkpoints/ folder; say where the results go with "
                         f"--out FILE.json.")
    return file.parent.parent / f"eval-{file.stem}.json"
