"""``cfmae label SRC --out DATA``: pseudo-label an image folder into the dataset layout."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cfmae_cli.cli.common import console, guarded, is_terminal, launch_workers, logs_to
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import need_folder
from cfmae_cli.ownership import writing

if TYPE_CHECKING:  # torch and the labelling models are imported by the command itself (a fast --help)
    import torch

    from cfmae_cli.labeling.base import InstanceBackend, SemanticBackend
    from cfmae_cli.labeling.pipeline import LabelProgress

SUGGEST = {"--detector-model": "IDEA-Research/grounding-dino-base",
           "--segmenter-model": "syscv-community/sam-hq-vit-huge",
           "mask2former": "facebook/mask2former-swin-large-coco-panoptic",
           "oneformer": "shi-labs/oneformer_coco_swin_large",
           "--depth-model": "depth-anything/Depth-Anything-V2-Small-hf"}


def _need(value: Optional[str], option: str, why: str) -> str:
    if not value:
        raise CfmaeError(f"{why} needs {option}: a local model folder, or a hub id such as "
                         f"{SUGGEST.get(option, '')} (downloaded only when given, if online).")
    return value


def _no_prompt(_: Optional[str]) -> str:
    return ""


def build_backends(instance: str, semantic: str, detector_model: Optional[str], segmenter_model: Optional[str],
                   semantic_model: Optional[str], device: torch.device, batch_size: int, box_threshold: float,
                   threshold_floor: float):
    """The instance and semantic backends (learned ones are imported only when asked for)."""
    from cfmae_cli.labeling.base import ClassicalBackend

    classical = ClassicalBackend() if "classical" in (instance, semantic) else None
    inst: InstanceBackend | None
    sem: SemanticBackend | None
    if instance == "classical":
        inst = classical
    else:
        det_spec = _need(detector_model, "--detector-model", "--instance grounded-sam")
        seg_spec = _need(segmenter_model, "--segmenter-model", "--instance grounded-sam")
        from cfmae_cli.labeling.models import GroundedSamBackend, resolve_model

        det = resolve_model(det_spec, "--detector-model")
        seg = resolve_model(seg_spec, "--segmenter-model")
        inst = GroundedSamBackend(det, seg, device, box_threshold=box_threshold, threshold_floor=threshold_floor,
                                  batch_size=batch_size)
    if semantic == "classical":
        sem = classical
    else:
        if not semantic_model:
            raise CfmaeError(f"--semantic {semantic} needs --semantic-model: a local model folder, or a hub id "
                             f"such as {SUGGEST[semantic]} (downloaded only when given, if online).")
        from cfmae_cli.labeling.models import PanopticSemanticBackend, resolve_model

        sem = PanopticSemanticBackend(semantic, resolve_model(semantic_model, "--semantic-model"), device,
                                      batch_size=batch_size)
    return inst, sem


@guarded
def label(
    src: Path = typer.Argument(..., metavar="SRC", help="folder of images: SRC/<class>/<image> or SRC/<image>"),
    out: Path = typer.Option(..., "--out", metavar="FOLDER", help="dataset folder to write (the layout of "
                             "docs/dataset-format.md); reruns resume"),
    instance: str = typer.Option("classical", "--instance", metavar="NAME", help="classical or grounded-sam"),
    semantic: str = typer.Option("classical", "--semantic", metavar="NAME", help="classical, mask2former or "
                                 "oneformer"),
    detector_model: Optional[str] = typer.Option(None, "--detector-model", metavar="MODEL", show_default="none; "
                                                 "needed with --instance grounded-sam",
                                                 help="Grounding DINO folder or hub id"),
    segmenter_model: Optional[str] = typer.Option(None, "--segmenter-model", metavar="MODEL", show_default="none; "
                                                  "needed with --instance grounded-sam",
                                                  help="SAM-HQ / SAM folder or hub id"),
    semantic_model: Optional[str] = typer.Option(None, "--semantic-model", metavar="MODEL", show_default="none; "
                                                 "needed with --semantic mask2former or oneformer",
                                                 help="Mask2Former / OneFormer folder or hub id (COCO-panoptic: 133 "
                                                 "classes)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, metavar="N", show_default="1 if there is a GPU, else 0",
                                       help="GPUs, one process each (0 = the CPU)"),
    procs: int = typer.Option(1, "--procs", min=1, metavar="N", help="with --gpus 0: CPU processes sharing the "
                              "images"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, metavar="N", help="images per model call"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0, metavar="N",
                                show_default="4, or the cores if fewer", help="image-reading processes (0 = read "
                                "in the main process)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, metavar="N", show_default="all images",
                                        help="only the first N images (sorted)"),
    rgb: str = typer.Option("copy", "--rgb", metavar="NAME", help="how originals go to DATA/rgb: copy, symlink or "
                            "hardlink"),
    preview: int = typer.Option(0, "--preview", min=0, metavar="N", help="write DATA/preview.png with N labelled "
                                "images (0 = no preview)"),
    box_threshold: float = typer.Option(0.45, "--box-threshold", min=0, max=1, metavar="SCORE",
                                        help="grounded-sam: first detection threshold, 0 to 1"),
    threshold_floor: float = typer.Option(0.2, "--threshold-floor", min=0, max=1, metavar="SCORE",
                                          help="grounded-sam: lowest threshold, 0 to 1, for images with too few "
                                          "objects"),
    depth: str = typer.Option("none", "--depth", metavar="NAME", help="none, depth-anything (any transformers "
                              "AutoModelForDepthEstimation, with --depth-model) or classical (a depth cue from "
                              "height, detail and figure, no weights): also write DATA/depth/"),
    depth_model: Optional[str] = typer.Option(None, "--depth-model", metavar="MODEL", show_default="none; needed "
                                              "with --depth depth-anything",
                                              help="Depth Anything / DPT folder or hub id"),
) -> None:
    """Pseudo-label every image under SRC with instance and semantic maps.

    Example, no weights needed: cfmae label photos/ --out data/ --preview 8

    Example, the paper's models: cfmae label imagenet/train --out in1k-cfmae --instance grounded-sam
    --detector-model IDEA-Research/grounding-dino-base --segmenter-model syscv-community/sam-hq-vit-huge
    --semantic mask2former --semantic-model facebook/mask2former-swin-large-coco-panoptic --gpus 8
    """
    import torch

    from cfmae_cli.labeling.pipeline import claim_dataset
    from cfmae_cli.train import distributed

    if instance not in ("classical", "grounded-sam"):
        raise CfmaeError(f"--instance {instance}: choose classical or grounded-sam.")
    if semantic not in ("classical", "mask2former", "oneformer"):
        raise CfmaeError(f"--semantic {semantic}: choose classical, mask2former or oneformer.")
    if depth not in ("none", "depth-anything", "classical"):
        raise CfmaeError(f"--depth {depth}: choose none, depth-anything or classical.")
    if depth == "depth-anything":
        _need(depth_model, "--depth-model", f"--depth {depth}")
    if rgb not in ("copy", "symlink", "hardlink"):
        raise CfmaeError(f"--rgb {rgb}: choose copy, symlink or hardlink.")
    need_folder(src, "source")
    if gpus and gpus > torch.cuda.device_count():
        raise CfmaeError(f"--gpus {gpus}: torch sees {torch.cuda.device_count()} GPU(s) on this machine.")
    if procs > 1 and gpus != 0:
        raise CfmaeError(f"--procs {procs}: CPU processes need --gpus 0 (with GPUs, --gpus N starts one process "
                         f"per GPU).")
    world = gpus if gpus else procs
    settings = {"source": str(src.resolve()), "instance": instance, "semantic": semantic, "rgb": rgb,
                **({"detector_model": detector_model, "segmenter_model": segmenter_model,
                    "box_threshold": box_threshold, "threshold_floor": threshold_floor}
                   if instance == "grounded-sam" else {}),
                **({"semantic_model": semantic_model} if semantic != "classical" else {}),
                **({"depth": depth} if depth != "none" else {}),
                **({"depth_model": depth_model} if depth == "depth-anything" else {})}
    with contextlib.ExitStack() as stack:
        if not distributed.under_launcher():  # held for the whole labelling (its workers' too), checked under it
            stack.enter_context(writing(out, "--out"))
            if claim_dataset(src, out, settings):
                console.print(f"{out}: resuming the labelling of {src} recorded there", highlight=False)
        _label(src, out, world, gpus, instance, semantic, detector_model, segmenter_model, semantic_model,
               batch_size, workers, limit, rgb, preview, box_threshold, threshold_floor, depth, depth_model,
               settings)


def _label(src, out, world, gpus, instance, semantic, detector_model, segmenter_model, semantic_model,  # noqa: ANN001
           batch_size, workers, limit, rgb, preview, box_threshold, threshold_floor, depth, depth_model,
           settings) -> None:
    """Label (in this process, or through ``world`` workers) into the claimed ``out``."""
    import torch

    from cfmae_cli.train import distributed

    if world > 1 and not distributed.under_launcher():
        args = ["label", str(src), "--out", str(out), "--instance", instance, "--semantic", semantic,
                "--gpus", str(gpus), "--batch-size", str(batch_size), "--workers", str(workers), "--rgb", rgb,
                "--preview", str(preview), "--box-threshold", str(box_threshold),
                "--threshold-floor", str(threshold_floor), "--depth", depth]
        launch_workers(args, {"--detector-model": detector_model, "--segmenter-model": segmenter_model,
                              "--semantic-model": semantic_model, "--limit": limit,
                              "--depth-model": depth_model}, world)
        console.print(f"Dataset: {out}", highlight=False)
        return
    use_cuda = gpus != 0 and torch.cuda.is_available()
    info = distributed.init(torch.device("cuda" if use_cuda else "cpu"))
    try:
        _run(src, out, info, instance, semantic, detector_model, segmenter_model, semantic_model, batch_size,
             workers, limit, rgb, preview, box_threshold, threshold_floor, settings, depth_model)
    finally:
        distributed.shutdown()


def _run(src, out, info, instance, semantic, detector_model, segmenter_model, semantic_model, batch_size, workers,
         limit, rgb, preview, box_threshold, threshold_floor, settings, depth_model=None) -> None:
    import torch

    from cfmae_cli.labeling.pipeline import finalize, label_folder
    from cfmae_cli.train import distributed

    inst, sem = build_backends(instance, semantic, detector_model, segmenter_model, semantic_model, info.device,
                               batch_size, box_threshold, threshold_floor)
    depth_backend: Any = None
    if settings.get("depth") == "classical":
        from cfmae_cli.labeling.classical import ClassicalDepth

        depth_backend = ClassicalDepth()
    elif settings.get("depth") == "depth-anything":
        from cfmae_cli.labeling.depth import DepthBackend

        depth_backend = DepthBackend(depth_model, info.device, batch_size, bf16=info.device.type == "cuda")
    prompt_for: Callable[[Optional[str]], str] = _no_prompt
    if instance == "grounded-sam":
        from cfmae_cli.labeling.models import prompt_for
    columns = (TextColumn("label"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    interactive = is_terminal() and info.is_main
    with Progress(*columns, console=console, disable=not interactive) as bar, logs_to(console):
        task = bar.add_task("label", total=None, info="")

        def update(p: LabelProgress) -> None:
            bar.update(task, completed=p.done, total=p.total,
                       info=f"{p.images_per_s * info.world:.1f} img/s, {p.errors} unreadable")
            if not interactive and info.is_main and (p.done == p.total or p.done % (50 * batch_size) < batch_size):
                console.print(f"labelled {p.done}/{p.total} ({p.images_per_s * info.world:.1f} img/s, "
                              f"{p.errors} unreadable)", highlight=False)

        result = label_folder(src, out, inst, sem, prompt_for=prompt_for, batch_size=batch_size,
                              workers=workers, limit=limit, rgb_mode=rgb, rank=info.rank, world=info.world,
                              on_progress=update, settings=settings, depth=depth_backend)
    if info.distributed:
        torch.distributed.barrier(group=info.control)  # gloo, 24 h: ranks may finish far apart
    if not info.is_main:
        return
    counts = finalize(out, result["images"], inst, sem, src, settings, depth_backend)
    console.print(f"labelled {result['labelled']} image(s) now, {result['skipped_done']} were already done; "
                  f"dataset: {counts['images']} image(s) in {counts['classes']} class folder(s)"
                  + (f", {counts['errors']} unreadable (listed in {out / 'label-errors.jsonl'})" if counts["errors"]
                     else ""), highlight=False)
    if preview:
        from cfmae_cli.labeling.preview import write_preview

        path = write_preview(out, preview)
        if path is not None:
            console.print(f"preview: {path}", highlight=False)
    if not distributed.launched_by_parent():
        console.print(f"Dataset: {out}", highlight=False)
