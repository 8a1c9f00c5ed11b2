"""``cfmae pretrain``: CFMAE pre-training into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cfmae_cli.cli.common import console, guarded, is_terminal
from cfmae_cli.cli.progress import TrainingView
from cfmae_cli.config import derived, load_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.train.engine import TrainingDiverged, pretrain as run_pretrain
from cfmae_cli.train.rundir import new_run_dir


@guarded
def pretrain(
    preset: str = typer.Option("demo", "--preset", "-p", help="preset name (see `cfmae presets`) or a YAML file"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset folder (docs/dataset-format.md); "
                                        "default: the built-in demo data"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/pretrain/<preset>[-k])"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="override train.epochs"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override train.seed"),
    set_: list[str] = typer.Option([], "--set", help="override any key, e.g. --set optim.base_lr=1.5e-4"),
) -> None:
    """Pre-train a ViT with CFMAE.

    Example, the demo (tiny ViT on built-in data, a few CPU minutes): cfmae pretrain

    Example, the paper's ViT-B on your labelled data: cfmae pretrain --preset vitb-400e --data /data/in1k-cfmae
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
    cfg = load_config(preset, overrides)
    derived(cfg)  # fails early (exit 2) when the batch sizes do not divide
    run_dir = new_run_dir("pretrain", Path(preset).stem, out)
    console.print(f"run folder: {run_dir}", highlight=False)
    try:
        with TrainingView(console, interactive=is_terminal()) as view:
            summary = run_pretrain(cfg, run_dir, view.update)
    except TrainingDiverged as exc:
        console.print(f"[bold red]stopped:[/] {exc}")
        console.print(f"Run folder: {run_dir}", highlight=False)
        raise typer.Exit(1) from None
    except CfmaeError:
        _remove_if_empty(run_dir)
        raise
    console.print(f"done: {summary['epochs']} epochs, {summary['steps']} steps; loss {summary['first_epoch_loss']:.4f} "
                  f"(epoch 1) → {summary['last_epoch_loss']:.4f} (epoch {summary['epochs']}); "
                  f"{summary['img_per_s']:.1f} img/s; {summary['skipped_files']} file(s) skipped", highlight=False)
    console.print(f"Run folder: {run_dir}", highlight=False)


def _remove_if_empty(run_dir: Path) -> None:
    """A run that failed on bad input before training leaves no stray folder behind (only its log)."""
    leftovers = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if leftovers <= {"config.yaml", "log.txt", "metrics.jsonl"}:
        for name in leftovers:
            (run_dir / name).unlink()
        run_dir.rmdir()
