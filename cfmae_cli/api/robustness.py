"""``cfmae eval-robustness`` as a function: ImageNet-A / -R / -Sketch / -C of a classifier and the Score."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cfmae_cli.api.common import PathLike, launch_command, world_of
from cfmae_cli.errors import CfmaeError

SUITE = "imagenet-ood"


def eval_robustness(checkpoint: Optional[PathLike] = None, data: Optional[PathLike] = None, *,
                    suite: str = SUITE, datasets: Optional[str | Sequence[str]] = None, model: Optional[str] = None,
                    batch_size: int = 256, workers: int = 8, gpus: Optional[int] = None, procs: int = 1,
                    out: Optional[PathLike] = None, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                    interpolation: Optional[str] = None, limit: Optional[int] = None,
                    on_start: Callable[[int], None] | None = None, on_batch: Callable[[int], None] | None = None
                    ) -> dict[str, Any]:
    """``cfmae eval-robustness``: the robustness of an ImageNet-1k classifier (``checkpoint``: a fine-tuning
    checkpoint or run, an exported timm folder, ``hf-hub:owner/name``; or ``model``, a timm name, with
    ``checkpoint`` its weights file) on the suites under ``data``. ``datasets``: a subset of a, r, sketch, c
    (a list, or comma-separated). Returns the results (``run_dir``, per-dataset numbers, ``score`` …; a
    multi-process launch: ``run_dir`` and ``world``). ``on_start(total)`` and ``on_batch(images)`` follow the
    progress of this process."""
    from cfmae_cli.eval.suites import DATASETS
    from cfmae_cli.hub import is_hub, parse_hub

    suites = {SUITE: DATASETS}
    if data is None:
        raise CfmaeError("--data: give the folder holding imagenet-a/, imagenet-r/, imagenet-sketch/ and "
                         "imagenet-c/.")
    if model is not None and is_hub(model) and checkpoint is not None:
        raise CfmaeError(f"--model {model}: a hub repository brings its own weights; give no --checkpoint.")
    checked = checkpoint if model is None else (model if is_hub(model) else None)
    if checked:
        from cfmae_cli.config import check_weights_file

        check_weights_file(checked)  # sizes checked before torch is imported (docs/export.md); a hub spec fetched
    import torch

    from cfmae_cli.eval.robustness import run_robustness
    from cfmae_cli.train import distributed
    from cfmae_cli.train.rundir import claimed_run_dir

    if suite not in suites:
        raise CfmaeError(f"--suite {suite}: unknown; suites: {', '.join(suites)}.")
    listed = ",".join(suites[suite]) if datasets is None else \
        datasets if isinstance(datasets, str) else ",".join(datasets)
    chosen = [d.strip() for d in listed.split(",") if d.strip()]
    bad = [d for d in chosen if d not in suites[suite]]
    if bad or not chosen:
        raise CfmaeError(f"--datasets {listed}: use a comma-separated subset of {', '.join(suites[suite])}.")
    if interpolation is not None and interpolation not in ("bicubic", "bilinear"):
        raise CfmaeError(f"--interpolation {interpolation}: use bicubic or bilinear.")
    if procs > 1 and gpus != 0:
        raise CfmaeError(f"--procs {procs}: CPU processes need --gpus 0.")
    if gpus and gpus > torch.cuda.device_count():
        raise CfmaeError(f"--gpus {gpus}: torch sees {torch.cuda.device_count()} GPU(s) on this machine.")
    world = world_of(gpus, procs)
    shown = model or checkpoint
    name = parse_hub(str(shown))[0].split("/")[1] if shown and is_hub(shown) else \
        Path(checkpoint).stem if checkpoint and not model else (model or "run")
    root = Path(data)
    if world > 1 and not distributed.under_launcher():
        with claimed_run_dir("eval-robustness", name, out) as run_dir:  # held for the workers' whole life
            args = ["eval-robustness", "--data", str(root), "--datasets", ",".join(chosen), "--batch-size",
                    str(batch_size), "--workers", str(workers), "--gpus", str(gpus or 0), "--procs", str(procs),
                    "--out", str(run_dir), "--suite", suite]
            launch_command(args, {"--checkpoint": checkpoint, "--model": model, "--img-size": img_size,
                                  "--crop-pct": crop_pct, "--interpolation": interpolation, "--limit": limit}, world)
        return {"run_dir": str(run_dir), "world": world}
    device = torch.device("cuda" if (gpus or (gpus is None and torch.cuda.is_available())) else "cpu")
    overrides = {k: v for k, v in (("img_size", img_size), ("crop_pct", crop_pct),
                                   ("interpolation", interpolation)) if v is not None}
    return run_robustness(None if checkpoint is None else str(checkpoint), model, root, chosen, device=device,
                          batch_size=batch_size, workers=workers, out=out, name=name, limit=limit,
                          preprocessing=overrides, on_start=on_start, on_batch=on_batch)

