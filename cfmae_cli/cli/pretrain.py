"""``cfmae pretrain``: CFMAE pre-training on 1 CPU, 1 GPU, N local processes, or under torchrun / SLURM."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from cfmae_cli.cli import helptext
from cfmae_cli.cli.common import guarded


@guarded
def pretrain(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", metavar="NAME", show_default="demo",
                                         help="preset name (see `cfmae presets`) or a YAML file"),
    data: Optional[Path] = typer.Option(None, "--data", metavar="FOLDER", show_default="the built-in demo data",
                                        help="dataset folder (docs/dataset-format.md) or a packed copy"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FOLDER", show_default="runs/pretrain/<preset>[-k]",
                                       help="run folder"),
    gpus: Optional[int] = helptext.GPUS,
    procs: int = helptext.PROCS,
    epochs: Optional[int] = helptext.EPOCHS,
    seed: Optional[int] = helptext.SEED,
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default="the preset's values",
                                   help="override any config key (repeatable), e.g. --set optim.base_lr=1.5e-4"),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN", show_default="a new run",
                                         help="continue a run exactly: its folder or one of its checkpoints; "
                                         "auto: resume the run in --out if it is there, else start it (for "
                                         "jobs that are requeued)"),
    init: Optional[Path] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT", show_default="random weights",
                                        help="start a new run from these weights only: a cfmae checkpoint or run "
                                        "folder, an MAE / MultiMAE / timm file"),
    monitor_data: Optional[Path] = typer.Option(None, "--monitor-data", metavar="FOLDER",
                                                show_default="a held-out share of the data's class folders",
                                                help="labelled ImageFolder (train/ and val/, e.g. ImageNet's) for "
                                                "the k-NN monitor (docs/monitoring.md)"),
) -> None:
    """Pre-train a ViT with CFMAE.

    Example, the demo (tiny ViT on built-in data, a few CPU minutes): cfmae pretrain

    Example, the paper's ViT-B on 8 GPUs: cfmae pretrain --preset vitb-400e --gpus 8 --data /data/in1k-cfmae
    --monitor-data /data/imagenet

    Example, continue after a preemption: cfmae pretrain --resume runs/pretrain/vitb-400e

    Example, one command for a job that may be requeued (starts, or resumes): cfmae pretrain --preset vitb-400e
    --gpus 8 --out runs/vitb --resume auto
    """
    from cfmae_cli import api
    from cfmae_cli.cli.training import run_training

    run_training("pretrain", lambda report: api.pretrain(
        preset, data, out, gpus=gpus, procs=procs, epochs=epochs, seed=seed, overrides=set_, resume=resume,
        checkpoint=init, monitor_data=monitor_data, report=report), _done, resume)


def _done(summary: dict[str, Any]) -> str:
    return (f"done: {summary['epochs']} epochs, {summary['steps']} steps; loss {summary['first_epoch_loss']:.4f} "
            f"(epoch 1) → {summary['last_epoch_loss']:.4f} (epoch {summary['epochs']}); {summary['img_per_s']:.1f} "
            f"img/s; {summary['skipped_files']} file(s) skipped")
