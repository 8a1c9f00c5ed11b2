"""``cfmae eval-robustness``: ImageNet-A / -R / -Sketch / -C of a classifier, the paper's Table 4."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cfmae_cli.cli.common import console, guarded, is_terminal, launch_workers, logs_to
from cfmae_cli.cli.helptext import REQUIRED
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.suites import DATASETS

SUITES = {"imagenet-ood": DATASETS}


@guarded
def eval_robustness(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT", show_default=REQUIRED,
                                             help="a `cfmae finetune` checkpoint or run folder, an exported timm "
                                             "folder, or with --model: a weights file"),
    suite: str = typer.Option("imagenet-ood", "--suite", metavar="NAME", help="imagenet-ood: ImageNet-A, -R, "
                              "-Sketch and -C"),
    root: Path = typer.Option(..., "--data", metavar="FOLDER", help="folder holding imagenet-a/, imagenet-r/, "
                              "imagenet-sketch/ (or sketch/) and imagenet-c/"),
    datasets: str = typer.Option(",".join(DATASETS), "--datasets", metavar="LIST", help="which of a, r, sketch, c "
                                 "(comma-separated)"),
    model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", show_default="none (--checkpoint is a cfmae "
                                        "checkpoint or a timm folder)", help="a timm model name, with "
                                        "--checkpoint its local weights (to evaluate baselines the same way)"),
    batch_size: int = typer.Option(256, "--batch-size", min=1, metavar="N", help="images per batch and device"),
    workers: int = typer.Option(8, "--workers", min=0, metavar="N", help="DataLoader worker processes per device "
                                "(0 = read in the main process)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, metavar="N", show_default="1 if there is a GPU, else 0",
                                       help="GPUs, one process each (0 = the CPU)"),
    procs: int = typer.Option(1, "--procs", min=1, metavar="N", help="with --gpus 0: CPU processes"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FOLDER", show_default="runs/eval-robustness/<name>[-k]",
                                       help="run folder"),
    img_size: Optional[int] = typer.Option(None, "--img-size", min=8, metavar="N", show_default="the model's",
                                           help="input size in pixels (at least 8)"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", min=0.01, max=1.0, metavar="FRACTION",
                                             show_default="the model's", help="centre-crop fraction, 0.01 to 1 "
                                             "(resize to img_size / crop_pct)"),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", metavar="NAME", show_default="the model's",
                                                help="bicubic or bilinear"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, metavar="N", show_default="all images",
                                        help="only the first N images of each split: a quick look, not the "
                                        "benchmark"),
) -> None:
    """Robustness of an ImageNet-1k classifier: IN-A, IN-R, IN-Sketch top-1, IN-C mCE and the Score.

    Example: cfmae eval-robustness --checkpoint runs/finetune/ft-vitb-400e --data /data/imagenet-ood

    Example, a timm baseline with local weights: cfmae eval-robustness --model deit_base_patch16_224 --checkpoint
    deit_base_patch16_224.pth --data /data/imagenet-ood --gpus 8

    MAE's fine-tuned ViTs pool the patch tokens: give them as a folder with their config.json
    (docs/robustness.md, "A timm folder of your own").
    """
    if checkpoint and model is None:
        from cfmae_cli.config import check_weights_file

        check_weights_file(checkpoint)  # sizes checked before torch is imported (docs/export.md)
    import torch

    from cfmae_cli.eval.robustness import run_robustness
    from cfmae_cli.train import distributed
    from cfmae_cli.train.rundir import claimed_run_dir

    if suite not in SUITES:
        raise CfmaeError(f"--suite {suite}: unknown; suites: {', '.join(SUITES)}.")
    chosen = [d.strip() for d in datasets.split(",") if d.strip()]
    bad = [d for d in chosen if d not in SUITES[suite]]
    if bad or not chosen:
        raise CfmaeError(f"--datasets {datasets}: use a comma-separated subset of {', '.join(SUITES[suite])}.")
    if interpolation is not None and interpolation not in ("bicubic", "bilinear"):
        raise CfmaeError(f"--interpolation {interpolation}: use bicubic or bilinear.")
    if procs > 1 and gpus != 0:
        raise CfmaeError(f"--procs {procs}: CPU processes need --gpus 0.")
    if gpus and gpus > torch.cuda.device_count():
        raise CfmaeError(f"--gpus {gpus}: torch sees {torch.cuda.device_count()} GPU(s) on this machine.")
    world = gpus if gpus else (procs if gpus == 0 else 1)
    name = Path(checkpoint).stem if checkpoint and not model else (model or "run")
    if world > 1 and not distributed.under_launcher():
        with claimed_run_dir("eval-robustness", name, out) as run_dir:  # held for the workers' whole life
            args = ["eval-robustness", "--data", str(root), "--datasets", ",".join(chosen), "--batch-size",
                    str(batch_size), "--workers", str(workers), "--gpus", str(gpus or 0), "--procs", str(procs),
                    "--out", str(run_dir), "--suite", suite]
            launch_workers(args, {"--checkpoint": checkpoint, "--model": model, "--img-size": img_size,
                                  "--crop-pct": crop_pct, "--interpolation": interpolation, "--limit": limit}, world)
        console.print(f"Run folder: {run_dir}", highlight=False)
        return
    device = torch.device("cuda" if (gpus or (gpus is None and torch.cuda.is_available())) else "cpu")
    overrides = {k: v for k, v in (("img_size", img_size), ("crop_pct", crop_pct),
                                   ("interpolation", interpolation)) if v is not None}
    main = int(os.environ.get("RANK", "0")) == 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (main and is_terminal())) as bar, logs_to(console):
        task = bar.add_task("images", total=None, rate="")

        def step(n: int) -> None:
            bar.advance(task, n * max(world, 1))
            elapsed = bar.tasks[0].elapsed or 0
            bar.update(task, rate=f"{bar.tasks[0].completed / elapsed:.0f} img/s" if elapsed else "")

        results = run_robustness(checkpoint, model, root, chosen, device=device, batch_size=batch_size,
                                 workers=workers, out=out, name=name, limit=limit, preprocessing=overrides,
                                 on_start=lambda total: bar.update(task, total=total), on_batch=step)
    if main:
        _print(results)
        if not distributed.launched_by_parent():
            console.print(f"Run folder: {results['run_dir']}", highlight=False)


def _print(results: dict) -> None:
    from cfmae_cli.eval.robustness import as_rows

    table = Table("dataset", "metric", "value", title="ImageNet robustness (top-1 and CE in %)",
                  caption=f"{results['model']}\n{results['preprocessing']}")
    for dataset, metric, value in as_rows(results):
        table.add_row(dataset, metric, f"{value:.2f}")
    console.print(table)
    if results["score"] is None:
        console.print(f"Score: not computed (needs all four; missing {', '.join(results['score_missing'])})",
                      highlight=False)
    else:
        console.print(f"Score (mean of IN-A, IN-R, IN-Sketch top-1 and 100 - mCE): {results['score']:.2f}",
                      highlight=False)
    if results["skipped_files"]:
        console.print(f"{results['skipped_files']} unreadable file(s) left out; see bad_files.txt", highlight=False)
    if results["limit"]:
        console.print(f"--limit {results['limit']}: a subset of every split, not the benchmark", highlight=False)
