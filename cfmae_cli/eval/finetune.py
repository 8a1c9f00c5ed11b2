"""``cfmae finetune``: the initial weights and their architecture, then the task of the chosen kind
(classification, segmentation, detection) trained by the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from cfmae_cli.checkpoints import load_checkpoint, newest_checkpoint
from cfmae_cli.config import EncoderArch, config_from_dict, deep_merge, load_config, stored_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.classification import ClassificationTask
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.detection import DetectionTask
from cfmae_cli.eval.segmentation import SegmentationTask
from cfmae_cli.model.weights import read_weights
from cfmae_cli.train import distributed
from cfmae_cli.train.engine import Progress, run_task
from cfmae_cli.train.faults import shut_down_workers
from cfmae_cli.train.setup import resolve_device

TASKS = {"classification": ClassificationTask, "segmentation": SegmentationTask, "detection": DetectionTask}


def finetune(cfg: FinetuneConfig, *, out: str | Path | None = None, name: str = "run",
             resume: str | Path | None = None, on_progress: Callable[[Progress], None] | None = None
             ) -> dict[str, Any]:
    """Fine-tune into a new run folder (``out`` or ``runs/finetune/<name>[-k]``), or continue ``resume``
    exactly. A new run first reads its initial weights (``model.init``) and their architecture."""
    state, source = None, str(cfg.model.init)
    if resume is None:
        cfg, state, source = initial_weights(cfg)
    task_class = TASKS[cfg.kind]
    return run_task(cfg, lambda info: task_class(cfg, info, state, source), resolve_device(cfg),
                    command="finetune", out=out, name=name, resume=resume, on_progress=on_progress)


def initial_weights(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Tensor] | None, str]:
    """(the config with ``model.encoder`` and ``model.init`` filled in, encoder weights or None, their source).

    ``model.init``: a cfmae checkpoint or run folder (architecture from its config), an MAE / MultiMAE / timm
    file (architecture from the tensor shapes), 'random', or null = the newest run under runs/pretrain.
    """
    init = cfg.model.init or str(newest_checkpoint().resolve())
    if init == "random":
        arch = cfg.model.encoder or EncoderArch.of(load_config(cfg.model.arch).model)
        state, source = None, "random"
    else:
        weights = read_weights(init)
        state, source = weights.state, f"{init} ({weights.format} format)"
        arch, seen = weights.encoder_arch()
        wanted = cfg.model.encoder
        if wanted is not None:  # what the file does not show (a foreign file's head count, …) the config decides
            arch = wanted.model_copy(update={k: getattr(arch, k) for k in seen})
        if wanted is not None and wanted != arch:
            diffs = [f"{k} {getattr(wanted, k)} in the config, {getattr(arch, k)} in the checkpoint"
                     for k in EncoderArch.model_fields if getattr(wanted, k) != getattr(arch, k)]
            raise CfmaeError(f"{init}: the checkpoint's encoder is not the one model.encoder asks for "
                             f"({'; '.join(diffs)}). Leave model.encoder unset to fine-tune the checkpoint's own "
                             f"architecture.")
    resolved = cfg.model_dump(mode="json")
    resolved["model"].update(encoder=arch.model_dump(mode="json"), init=init)
    return config_from_dict(resolved, f"fine-tuning {init}", FinetuneConfig), state, source


def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The validation of a ``cfmae finetune`` checkpoint on its own: the task its config names (top-1 / top-5,
    mIoU, AP) over the val split of ``data.root``, with the checkpoint's weights, in this process; nothing is
    trained or written. ``overrides``: config entries to change first (nested dicts: ``data.root``,
    ``train.device``, ``train.batch_size``, ``data.num_workers`` …).

    Returns {'checkpoint', 'kind', 'mode', 'epoch', 'data', 'metrics', 'recorded'} with ``recorded`` the metrics
    the run wrote at that checkpoint's epoch (None when it has none). ``path``: the checkpoint file."""
    file = Path(path)
    ckpt = load_checkpoint(file)
    if ckpt.get("task") != "finetune" or not isinstance(ckpt.get("config"), dict):
        raise CfmaeError(f"{file}: not a `cfmae finetune` checkpoint (a {ckpt.get('task') or 'foreign'} one); "
                         f"--eval-only evaluates a fine-tuned model with its head.")
    raw = deep_merge(ckpt["config"], overrides or {})
    cfg = stored_config(raw, f"the config in {file}", FinetuneConfig)
    info = distributed.init(resolve_device(cfg))
    info = dataclasses.replace(info, bf16=distributed.precision_for(cfg.train.precision, info.device))
    try:
        task = TASKS[cfg.kind](cfg, info, None, str(file))
        if list(task.classes) != list(ckpt.get("classes", task.classes)):
            raise CfmaeError(f"{task.root}: its classes are not the ones {file} was fine-tuned on ({len(task.classes)} "
                             f"here, {len(ckpt['classes'])} in the checkpoint, or in another order); evaluate it on "
                             f"data with the same classes.")
        task.model.load_state_dict(ckpt["model"])
        try:
            found = task.end_epoch(int(ckpt.get("epoch", 0)), {})
        finally:
            shut_down_workers(getattr(getattr(task, "val_loader", None), "_iterator", None))
    finally:
        distributed.shutdown()
    metrics = {k: v for k, v in found.items() if not k.startswith("best_")}
    recorded = ckpt.get("metrics") or None
    return {"checkpoint": str(file), "kind": cfg.kind, "mode": cfg.mode, "epoch": int(ckpt.get("epoch", 0)),
            "data": str(task.root), "metrics": metrics,
            "recorded": {k: v for k, v in recorded.items() if k in metrics} if isinstance(recorded, dict) else None}
