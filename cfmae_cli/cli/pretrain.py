"""``cfmae pretrain``: CFMAE pre-training on 1 CPU, 1 GPU, N local processes, or under torchrun / SLURM."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import typer

from cfmae_cli.cli.common import console, guarded, is_terminal
from cfmae_cli.cli.progress import TrainingView
from cfmae_cli.config import (RESUMABLE_CHANGES, Config, config_diff, config_from_dict, deep_merge, dump_config,
                              load_config, parse_override)
from cfmae_cli.errors import CfmaeError
from cfmae_cli.train import distributed
from cfmae_cli.train.checkpoint import checkpoint_path, load_checkpoint
from cfmae_cli.train.engine import TrainingDiverged
from cfmae_cli.train.pretraining import pretrain as run
from cfmae_cli.train.setup import build_dataset, dataset_root, describe_plan, make_plan
from cfmae_cli.train.faults import Preempted
from cfmae_cli.train.rundir import new_run_dir


@guarded
def pretrain(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="preset name (see `cfmae presets`) or a "
                                         "YAML file [default: demo]"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset folder (docs/dataset-format.md); "
                                        "default: the built-in demo data"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/pretrain/<preset>[-k])"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help="GPUs on this machine, one process each "
                                       "(0 = CPU); default: 1 GPU if there is one, else the CPU"),
    procs: int = typer.Option(1, "--procs", min=1, help="with --gpus 0: CPU processes (gloo)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="override train.epochs"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override train.seed"),
    set_: list[str] = typer.Option([], "--set", help="override any key, e.g. --set optim.base_lr=1.5e-4"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run exactly: its folder or one of "
                                          "its checkpoints"),
    init: Optional[Path] = typer.Option(None, "--init", help="start a new run from a checkpoint's weights only"),
) -> None:
    """Pre-train a ViT with CFMAE.

    Example, the demo (tiny ViT on built-in data, a few CPU minutes): cfmae pretrain

    Example, the paper's ViT-B on 8 GPUs: cfmae pretrain --preset vitb-400e --gpus 8 --data /data/in1k-cfmae

    Example, continue after a preemption: cfmae pretrain --resume runs/pretrain/vitb-400e
    """
    overrides = list(set_)
    if data is not None:
        if not data.is_dir():
            raise CfmaeError(f"--data {data}: folder not found.")
        overrides.append(f"data.root={data.resolve()}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if gpus is not None:
        overrides.append(f"train.device={'cuda' if gpus > 0 else 'cpu'}")
    if procs > 1 and gpus != 0:
        raise CfmaeError(f"--procs {procs}: CPU processes need --gpus 0 (with GPUs, --gpus N starts one process "
                         f"per GPU).")
    if resume is not None and (init is not None or out is not None):
        raise CfmaeError("--resume continues a run in its own folder with its own weights; it takes neither "
                         "--out nor --init (use --init CKPT to start a new run from weights).")
    cfg = resumed_config(resume, preset, overrides) if resume is not None else load_config(preset or "demo", overrides)
    name = Path(preset or "demo").stem
    if distributed.under_launcher():  # a worker of torchrun / torch.distributed.run
        return _train(cfg, out, name, resume, init)
    world = gpus if gpus else (procs if gpus == 0 else 1)
    if gpus and gpus > torch.cuda.device_count():
        _print_plan(cfg, gpus)
        raise CfmaeError(f"--gpus {gpus}: torch sees {torch.cuda.device_count()} GPU(s) on this machine. Use "
                         f"--gpus {torch.cuda.device_count()} (0 = CPU, with --procs N for N CPU processes), or "
                         f"launch on a GPU node.")
    if gpus == 0 and procs > 1 or gpus and gpus > 1:
        return _launch(cfg, out, name, resume, init, world, gpus, procs)
    return _train(cfg, out, name, resume, init)


def resumed_config(resume: Path, preset: Optional[str], overrides: list[str]) -> Config:
    """The run's own config; refused (exit 2, the keys listed) if the options given would change it."""
    path = checkpoint_path(resume)
    saved = load_checkpoint(path, mmap=True)["config"]
    base = load_config(preset).model_dump(mode="json") if preset else saved
    for item in overrides:
        keys, value = parse_override(item)
        patch: dict = value
        for key in reversed(keys):
            patch = {key: patch}
        base = deep_merge(base, patch)
    wanted = config_from_dict(base, "--resume with the options given")
    changed = [k for k in config_diff(saved, wanted.model_dump(mode="json")) if k not in RESUMABLE_CHANGES]
    if changed:
        raise CfmaeError(f"--resume {resume}: the options given change the run's config ({', '.join(changed)}). "
                         f"A resumed run keeps its config; start a new run (--init {path} for its weights) instead.")
    return wanted


def _print_plan(cfg: Config, world: int) -> None:
    dataset, _ = build_dataset(cfg, dataset_root(cfg))
    for line in describe_plan(make_plan(cfg, len(dataset), world), cfg):
        console.print(line, highlight=False)


def _train(cfg: Config, out: Optional[Path], name: str, resume: Optional[Path], init: Optional[Path]) -> None:
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        with TrainingView(console, interactive=is_terminal() and main) as view:
            summary = run(cfg, out=out, name=name, resume=resume, init=init, on_progress=view.update)
    except TrainingDiverged as exc:
        console.print(f"[bold red]stopped:[/] {exc}")
        raise typer.Exit(1) from None
    except Preempted as exc:
        if main:
            console.print(f"{exc}. Continue with: cfmae pretrain --resume {Path(exc.checkpoint).parent.parent}",
                          highlight=False)
        raise typer.Exit(128 + exc.signum) from None
    if main:
        console.print(f"done: {summary['epochs']} epochs, {summary['steps']} steps; loss "
                      f"{summary['first_epoch_loss']:.4f} (epoch 1) → {summary['last_epoch_loss']:.4f} "
                      f"(epoch {summary['epochs']}); {summary['img_per_s']:.1f} img/s; "
                      f"{summary['skipped_files']} file(s) skipped", highlight=False)
        if not distributed.launched_by_parent():  # the launching process prints the last line itself
            console.print(f"Run folder: {summary['run_dir']}", highlight=False)


def _launch(cfg: Config, out: Optional[Path], name: str, resume: Optional[Path], init: Optional[Path], world: int,
            gpus: Optional[int], procs: int) -> None:
    """Start ``world`` local workers through torch.distributed.run with the resolved config in a file."""
    if cfg.data.root is None:  # build the demo data once, before the workers look for it
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(dataset_root(cfg))})})
    fd, config_file = tempfile.mkstemp(prefix="cfmae-launch-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        fh.write(dump_config(cfg))
    args = ["pretrain", "--preset", config_file, "--gpus", str(gpus or 0), "--procs", str(procs)]
    if resume is not None:
        run_dir = checkpoint_path(resume).parent.parent
        args += ["--resume", str(resume)]
    else:
        run_dir = new_run_dir("pretrain", name, out)
        args += ["--out", str(run_dir)]
    if init is not None:
        args += ["--init", str(init)]
    console.print(f"launching {world} worker process(es) ({'gloo, CPU' if not gpus else 'NCCL, one GPU each'})",
                  highlight=False)
    try:
        code = distributed.launch(args, world)
    finally:
        os.unlink(config_file)
    if code:
        raise typer.Exit(code)
    console.print(f"Run folder: {run_dir}", highlight=False)

