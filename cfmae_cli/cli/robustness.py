"""``cfmae eval-robustness``: ImageNet-A / -R / -Sketch / -C of a classifier, the paper's Table 4."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cfmae_cli.cli.common import console, guarded, is_terminal, logs_to
from cfmae_cli.cli.helptext import REQUIRED
from cfmae_cli.eval.suites import DATASETS


@guarded
def eval_robustness(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT", show_default=REQUIRED,
                                             help="a `cfmae finetune` checkpoint or run folder, an exported timm "
                                             "folder, or with --model: a weights file; each may be "
                                             "hf-hub:owner/name[@revision]"),
    suite: str = typer.Option("imagenet-ood", "--suite", metavar="NAME", help="imagenet-ood: ImageNet-A, -R, "
                              "-Sketch and -C"),
    root: Path = typer.Option(..., "--data", metavar="FOLDER", help="folder holding imagenet-a/, imagenet-r/, "
                              "imagenet-sketch/ (or sketch/) and imagenet-c/"),
    datasets: str = typer.Option(",".join(DATASETS), "--datasets", metavar="LIST", help="which of a, r, sketch, c "
                                 "(comma-separated)"),
    model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", show_default="none (--checkpoint is a cfmae "
                                        "checkpoint or a timm folder)", help="a timm model name, with "
                                        "--checkpoint its weights (to evaluate baselines the same way), or "
                                        "hf-hub:owner/name[@revision] of a repository in timm's format"),
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
    from cfmae_cli import api
    from cfmae_cli.train import distributed

    main = int(os.environ.get("RANK", "0")) == 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    world = gpus if gpus else (procs if gpus == 0 else 1)
    bar = Progress(*columns, console=console, disable=not (main and is_terminal()))
    task = bar.add_task("images", total=None, rate="")

    def start(total: int) -> None:  # the bar is drawn once the options are checked and the images counted
        bar.start()
        bar.update(task, total=total)

    def step(n: int) -> None:
        bar.advance(task, n * max(world, 1))
        elapsed = bar.tasks[0].elapsed or 0
        bar.update(task, rate=f"{bar.tasks[0].completed / elapsed:.0f} img/s" if elapsed else "")

    with logs_to(console):
        try:
            results = api.eval_robustness(
                checkpoint, root, suite=suite, datasets=datasets, model=model, batch_size=batch_size, workers=workers,
                gpus=gpus, procs=procs, out=out, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation,
                limit=limit, on_start=start, on_batch=step)
        except api.WorkersFailed as exc:
            raise typer.Exit(exc.code) from None
        finally:
            bar.stop()
    if "world" in results:  # launched: the workers printed the results
        console.print(f"Run folder: {results['run_dir']}", highlight=False)
        return
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
