"""``cfmae finetune``: a pre-trained encoder → an image classifier (full fine-tuning, linear probe, †)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from cfmae_cli.cli import helptext
from cfmae_cli.cli.common import console, guarded
from cfmae_cli.errors import CfmaeError


@guarded
def finetune(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT",
                                             show_default="the newest pre-training run",
                                             help="pre-trained weights: a cfmae checkpoint or run folder, an MAE / "
                                             "MultiMAE / timm file, or 'random' (the no-pre-training baseline)"),
    data: Optional[Path] = typer.Option(None, "--data", metavar="FOLDER", show_default="the built-in demo data",
                                        help="folder with train/ and val/ (ImageFolder, or the dataset layout for "
                                        "multi-granular input), or one folder of classes (a share held out)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", metavar="NAME",
                                         show_default="ft-demo; ft-seg-demo, ft-det-demo with --task",
                                         help="ft-demo, ft-vitb-400e, ft-vitb-1600e, ft-seg-vitb, ft-det-vitb … "
                                         "(see `cfmae presets`) or a YAML file"),
    task: Optional[str] = typer.Option(None, "--task", metavar="NAME", show_default="the preset's (classification)",
                                       help="classification, segmentation (UperNet; ft-seg-vitb, ft-seg-demo) or "
                                       "detection (Mask R-CNN; ft-det-vitb, ft-det-demo)"),
    mode: Optional[str] = typer.Option(None, "--mode", metavar="NAME", show_default="the preset's (full)",
                                       help="full (fine-tune everything) or linear (a linear probe on the frozen "
                                       "encoder, MAE's recipe)"),
    modalities: Optional[str] = typer.Option(None, "--modalities", metavar="LIST",
                                             show_default="the preset's data.modalities (rgb)",
                                             help="encoder input: rgb, or rgb,instance,semantic (multi-granular "
                                             "fine-tuning, the paper's †)"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FOLDER", show_default="runs/finetune/<preset>[-k]",
                                       help="run folder (with --eval-only: the JSON file)"),
    gpus: Optional[int] = helptext.GPUS,
    procs: int = helptext.PROCS,
    epochs: Optional[int] = helptext.EPOCHS,
    seed: Optional[int] = helptext.SEED,
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default="the preset's values",
                                   help="override any config key (repeatable), e.g. --set optim.layer_decay=0.65"),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN", show_default="a new run",
                                         help="continue a fine-tuning run exactly: its folder or one of its "
                                         "checkpoints; auto: resume the run in --out if it is there, else start it"),
    eval_only: bool = typer.Option(False, "--eval-only", help="evaluate the fine-tuned --checkpoint (a run: its "
                                   "best.pt) on the val split of --data (default: its own), write the numbers as "
                                   "JSON (--out FILE, default <run>/eval-<checkpoint>.json); nothing is trained"),
) -> None:
    """Fine-tune a pre-trained encoder: classification, segmentation or detection; evaluates after every epoch.

    Example, the demo chain on a CPU: cfmae pretrain && cfmae finetune

    Example, the paper's recipe on 8 GPUs: cfmae finetune --preset ft-vitb-400e --gpus 8
    --checkpoint runs/pretrain/vitb-400e --data /data/imagenet

    Example, a linear probe: cfmae finetune --mode linear --checkpoint runs/pretrain/demo

    Example, evaluate a fine-tuned run's best checkpoint: cfmae finetune --eval-only -c runs/finetune/ft-demo

    Example, ADE20K: cfmae finetune --task segmentation --preset ft-seg-vitb --gpus 8 --data /data/ADEChallengeData2016
    """
    from cfmae_cli import api
    from cfmae_cli.cli.training import run_training

    if eval_only:
        given = [flag for flag, value in (("--preset", preset), ("--task", task), ("--mode", mode),
                                          ("--modalities", modalities), ("--procs", procs if procs > 1 else None),
                                          ("--epochs", epochs), ("--seed", seed), ("--resume", resume))
                 if value is not None]
        if given:
            raise CfmaeError(f"--eval-only evaluates a fine-tuned checkpoint as it was trained; it takes no "
                             f"{', '.join(given)} (the checkpoint's config decides; --data, --out, --gpus and "
                             f"--set data.*/train.batch_size apply).")
        result = api.evaluate(checkpoint, data, out, gpus=gpus, overrides=set_)
        console.print(_evaluated(result), highlight=False)
        return
    run_training("finetune", lambda report: api.finetune(
        checkpoint, data, out, preset=preset, task=task, mode=mode, modalities=modalities, gpus=gpus, procs=procs,
        epochs=epochs, seed=seed, overrides=set_, resume=resume, report=report), _done, resume)


def _evaluated(result: dict[str, Any]) -> str:
    """The line of ``--eval-only``: the numbers (with what the run recorded at that epoch) and the JSON file."""
    shown = {"classification": ("top1", "top5"), "segmentation": ("mIoU", "pixel_acc"),
             "detection": ("AP_box", "AP_mask")}[result["kind"]]
    metrics, recorded = result["metrics"], result.get("recorded") or {}
    parts = [f"{key} {metrics[key]:.2f}" + (f" (recorded {recorded[key]:.2f})" if recorded.get(key) is not None
                                             else "") for key in shown if metrics.get(key) is not None]
    return (f"evaluated {result['checkpoint']} (epoch {result['epoch']}) on {result['data']}: {'; '.join(parts)}; "
            f"wrote {result['written']}")


def _done(summary: dict[str, Any]) -> str:
    last = summary.get("last_epoch", {})
    if "AP_box" in last:
        return (f"done: {summary['epochs']} epochs, {summary['steps']} steps; val AP box {last['AP_box']:.2f} mask "
                f"{last['AP_mask']:.2f} (epoch {summary['epochs']}); best box AP {last['best_AP_box']:.2f} at epoch "
                f"{last['best_epoch']} (checkpoints/best.pt); {summary['img_per_s']:.1f} img/s")
    if "mIoU" in last:
        return (f"done: {summary['epochs']} epochs, {summary['steps']} steps; val mIoU {last['mIoU']:.2f} pixel acc "
                f"{last['pixel_acc']:.2f} (epoch {summary['epochs']}); best mIoU {last['best_mIoU']:.2f} at epoch "
                f"{last['best_epoch']} (checkpoints/best.pt); {summary['img_per_s']:.1f} img/s")
    return (f"done: {summary['epochs']} epochs, {summary['steps']} steps; val top-1 {last.get('top1', float('nan')):.2f}"
            f" top-5 {last.get('top5', float('nan')):.2f} (epoch {summary['epochs']}); best top-1 "
            f"{last.get('best_top1', float('nan')):.2f} at epoch {last.get('best_epoch', 0)} (checkpoints/best.pt); "
            f"{summary['img_per_s']:.1f} img/s; {summary['skipped_files']} file(s) skipped")
