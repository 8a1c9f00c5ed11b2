"""``cfmae finetune``: a pre-trained encoder → an image classifier (full fine-tuning, linear probe, †)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import typer

from cfmae_cli.cli import helptext
from cfmae_cli.cli.common import console, guarded
from cfmae_cli.config import load_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.config import FinetuneConfig


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
                                       help="run folder"),
    gpus: Optional[int] = helptext.GPUS,
    procs: int = helptext.PROCS,
    epochs: Optional[int] = helptext.EPOCHS,
    seed: Optional[int] = helptext.SEED,
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default="the preset's values",
                                   help="override any config key (repeatable), e.g. --set optim.layer_decay=0.65"),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN", show_default="a new run",
                                          help="continue a fine-tuning run exactly: its folder or one of its "
                                          "checkpoints"),
) -> None:
    """Fine-tune a pre-trained encoder: classification, segmentation or detection; evaluates after every epoch.

    Example, the demo chain on a CPU: cfmae pretrain && cfmae finetune

    Example, the paper's recipe on 8 GPUs: cfmae finetune --preset ft-vitb-400e --gpus 8
    --checkpoint runs/pretrain/vitb-400e --data /data/imagenet

    Example, a linear probe: cfmae finetune --mode linear --checkpoint runs/pretrain/demo

    Example, ADE20K: cfmae finetune --task segmentation --preset ft-seg-vitb --gpus 8 --data /data/ADEChallengeData2016
    """
    from cfmae_cli.checkpoints import checkpoint_path
    from cfmae_cli.config import check_weights_file

    for weights in (checkpoint if resume is None else None, resume):  # sizes checked before torch is imported
        if weights not in (None, "random"):
            check_weights_file(weights)
    from cfmae_cli.cli.training import (demo_preset_notice, dispatch, fit_to_data, own_data_run, resumed_config,
                                         run_overrides)
    from cfmae_cli.eval.finetune import finetune as run

    if mode is not None and mode not in ("full", "linear"):
        raise CfmaeError(f"--mode {mode}: use full or linear.")
    overrides = run_overrides(set_, data, epochs, seed, gpus, procs, resume, out)
    if task is not None:
        if task not in ("classification", "segmentation", "detection"):
            raise CfmaeError(f"--task {task}: use classification, segmentation or detection.")
        overrides.append(f"kind={task}")
    if modalities is not None:
        overrides.append(f"data.modalities=[{modalities}]")
    if checkpoint is not None:
        if resume is not None:
            raise CfmaeError("--resume continues a run with its own weights; it takes no --checkpoint.")
        if checkpoint != "random":
            if not checkpoint_path(checkpoint).is_file():
                raise CfmaeError(f"--checkpoint {checkpoint}: no such file (a run folder needs "
                                 f"checkpoints/last.pt).")
            checkpoint = str(checkpoint_path(checkpoint).resolve())
        overrides.append(f"model.init={checkpoint}")
    default = {"segmentation": "ft-seg-demo", "detection": "ft-det-demo"}.get(task or "", "ft-demo")
    name = Path(preset or default).stem
    if resume is not None:
        cfg = resumed_config(resume, preset, overrides, FinetuneConfig, mode)
    else:
        if data is not None and preset is None and default == "ft-demo" and not (data / "train").is_dir() and \
                not any(item.startswith("data.val_fraction=") for item in overrides):
            overrides.append(f"data.val_fraction={OWN_VAL_FRACTION}")  # the demo's 0.75 is for its 12 crops a class
        cfg = load_config(preset or default, overrides, FinetuneConfig, mode)
        if data is not None and preset is None:
            real = {"segmentation": "ft-seg-vitb", "detection": "ft-det-vitb"}.get(task or "",
                                                                                  "ft-vitb-400e (or ft-vitb-1600e)")
            demo_preset_notice(default, "the demo's tiny encoder and schedule, for a few CPU minutes", real)
            if default == "ft-demo" and ((data / "train").is_dir() or cfg.data.val_fraction):  # (else refused)
                world = gpus if gpus else (procs if gpus == 0 else 1)
                cfg, said = fit_to_data(cfg, _training_images(data, cfg.data.val_fraction), str(data), overrides,
                                        world)
                held = "" if (data / "train").is_dir() else \
                    f" (data.val_fraction {cfg.data.val_fraction:g} of each class held out for validation)"
                name, where = own_data_run(data, out, name)
                console.print(f"note: {said}{held}; {where}.", highlight=False)
    dispatch("finetune", cfg, functools.partial(run, cfg), _done, out=out, name=name,
             resume=resume, gpus=gpus, procs=procs, extra_args=[])


OWN_VAL_FRACTION = 0.2  # the share of each class held out of a single folder of the user's own images


def _training_images(data: Path, val_fraction: float | None) -> int:
    """Images that fine-tuning trains on: ``data/train``'s, or a single folder's minus its held-out share."""
    from cfmae_cli.data.splits import held_out, list_split

    if (data / "train").is_dir():
        return len(list_split(data / "train", [])[0])
    samples = list_split(data, [])[0]
    return sum(not held_out(s, val_fraction) for s in samples) if val_fraction else len(samples)


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
