"""``cfmae pretrain``: CFMAE pre-training on 1 CPU, 1 GPU, N local processes, or under torchrun / SLURM."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import typer

from cfmae_cli.cli import helptext
from cfmae_cli.cli.common import console, guarded
from cfmae_cli.config import Config, load_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import MANIFEST_NAME, need_folder


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
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN", show_default="a new run",
                                          help="continue a run exactly: its folder or one of its checkpoints"),
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
    """
    if data is not None and data.is_dir():  # its manifest checked before torch is imported: a bad one costs nothing
        from cfmae_cli.data.layout import is_packed, read_manifest, read_packed_manifest

        if is_packed(data):
            read_packed_manifest(data)
        elif (data / MANIFEST_NAME).is_file():
            read_manifest(data)
    for weights, flag in ((init, "--checkpoint"), (resume, "--resume")):  # before the demo data or torch
        if weights is not None:
            from cfmae_cli.checkpoints import checkpoint_path
            from cfmae_cli.config import check_weights_file

            if not checkpoint_path(weights).is_file():
                raise CfmaeError(f"{flag} {weights}: checkpoint not found (a run folder needs checkpoints/last.pt).")
            check_weights_file(weights)  # sizes checked before anything is built (docs/export.md)
    from cfmae_cli.cli.training import (demo_preset_notice, dispatch, fit_to_data, own_data_run, resumed_config,
                                         run_overrides)
    from cfmae_cli.train.pretraining import pretrain as run

    overrides = run_overrides(set_, data, epochs, seed, gpus, procs, resume, out)
    if monitor_data is not None:
        need_folder(monitor_data, "--monitor-data")
        overrides.append(f"train.monitor.data={monitor_data.resolve()}")
    if resume is not None and init is not None:
        raise CfmaeError("--resume continues a run with its own weights; it takes no --checkpoint (use --checkpoint "
                         "CKPT without --resume to start a new run from weights).")
    cfg = resumed_config(resume, preset, overrides) if resume is not None else load_config(preset or "demo", overrides)
    name = Path(preset or "demo").stem
    if data is not None and preset is None and resume is None:
        demo_preset_notice("demo", "a 4-block ViT at 64 px for a few CPU minutes",
                           "vitb-400e (the paper's ViT-B), vits-400e or vitl-400e")
        world = gpus if gpus else (procs if gpus == 0 else 1)
        from cfmae_cli.train.pretraining import pretraining_images

        cfg, said = fit_to_data(cfg, pretraining_images(cfg), str(data), overrides, world)
        name, where = own_data_run(data, out, name)
        console.print(f"note: {said}; {where}.", highlight=False)
    dispatch("pretrain", cfg, functools.partial(run, cfg, init=init), _done, out=out, name=name,
             resume=resume, gpus=gpus, procs=procs, extra_args=["--checkpoint", str(init)] if init is not None else [],
             before_refusal=lambda world: _print_plan(cfg, world))


def _done(summary: dict[str, Any]) -> str:
    return (f"done: {summary['epochs']} epochs, {summary['steps']} steps; loss {summary['first_epoch_loss']:.4f} "
            f"(epoch 1) → {summary['last_epoch_loss']:.4f} (epoch {summary['epochs']}); {summary['img_per_s']:.1f} "
            f"img/s; {summary['skipped_files']} file(s) skipped")


def _print_plan(cfg: Config, world: int) -> None:
    from cfmae_cli.train.setup import build_dataset, dataset_root, describe_plan, make_plan

    dataset, _ = build_dataset(cfg, dataset_root(cfg))
    for line in describe_plan(make_plan(cfg, len(dataset), world), cfg):
        console.print(line, highlight=False)
