"""Labelling throughput per stage: decode, Grounding DINO, SAM, semantic model, writing the maps.

Run:
    python benchmarks/bench_label.py --tiny --device cpu              # tiny random models, no download
    python benchmarks/bench_label.py --full-size --device cuda        # random weights at the real config sizes
    python benchmarks/bench_label.py --detector-model IDEA-Research/grounding-dino-base \\
        --segmenter-model syscv-community/sam-hq-vit-large \\
        --semantic-model facebook/mask2former-swin-large-coco-panoptic --device cuda   # real models (downloads)

JPEGs are made from skimage.data photos resized so that their longer side is ``--size`` (ImageNet-like,
varied aspect ratios). Each stage is timed over ``--images`` images in batches of ``--batch-size`` after one
warm-up batch. Prints ms per image, images/s, and the pipeline bound (the slowest stage: the most a
pipeline that overlaps the stages can reach on this device).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from cfmae_cli.data.layout import save_map
from cfmae_cli.labeling.models import GroundedSamBackend, PanopticSemanticBackend, prompt_for

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat", "hubble_deep_field"]


def make_jpegs(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` JPEGs cycling over skimage.data photos, longer side ``size``, alternating landscape/portrait."""
    from skimage import data

    photos = [getattr(data, name)() for name in PHOTOS if hasattr(data, name)]
    paths = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        if i % 3 == 1:
            img = img.transpose(Image.Transpose.ROTATE_90)
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        paths.append(folder / f"img_{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def build_models(folder: Path, full_size: bool, kind: str) -> tuple[str, str, str]:
    """Random-weight models saved like checkpoints (tests/tiny_label_models.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_label_models import make_grounding_dino, make_mask2former, make_oneformer, make_sam_hq

    semantic = (make_mask2former if kind == "mask2former" else make_oneformer)(folder / kind, full_size=full_size)
    return (str(make_grounding_dino(folder / "gdino", full_size=full_size)),
            str(make_sam_hq(folder / "sam-hq", full_size=full_size)), str(semantic))


def timed(fn, batches: list, device: torch.device) -> tuple[float, list]:
    """Seconds for ``fn`` over all batches (after one warm-up call on the first) and the results."""
    fn(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = [fn(b) for b in batches]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector-model")
    parser.add_argument("--segmenter-model")
    parser.add_argument("--semantic-model")
    parser.add_argument("--semantic-kind", choices=["mask2former", "oneformer"], default="mask2former")
    parser.add_argument("--tiny", action="store_true", help="build tiny random-weight models (no download)")
    parser.add_argument("--full-size", action="store_true", help="random weights at the real config sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=500, help="longer side of the test JPEGs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--pad-batches", action="store_true", help="one padded semantic forward per batch")
    args = parser.parse_args()
    device = torch.device(args.device)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        tmp_path = Path(tmp)
        if args.tiny or args.full_size:
            t0 = time.perf_counter()
            det, seg, sem = build_models(tmp_path / "models", args.full_size, args.semantic_kind)
            console.print(f"built random-weight models in {time.perf_counter() - t0:.1f} s")
        else:
            if not (args.detector_model and args.segmenter_model and args.semantic_model):
                parser.error("give --detector-model, --segmenter-model and --semantic-model, or --tiny / --full-size")
            det, seg, sem = args.detector_model, args.segmenter_model, args.semantic_model
        paths = make_jpegs(tmp_path, args.images, args.size)
        instance = GroundedSamBackend(det, seg, device, batch_size=args.batch_size, bf16=args.bf16)
        semantic = PanopticSemanticBackend(args.semantic_kind, sem, device, batch_size=args.batch_size,
                                           pad_batches=args.pad_batches, bf16=args.bf16)
        groups = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]

        def decode(group):
            return [np.asarray(Image.open(p).convert("RGB")) for p in group]

        t_decode, images = timed(decode, groups, device)
        prompts = [[prompt_for("n02123045")] * len(b) for b in images]  # 'tabby .'
        t_det, dets = timed(lambda i: instance.detect(images[i], prompts[i]), list(range(len(images))), device)
        t_sam, inst = timed(lambda i: instance.segment(images[i], dets[i]), list(range(len(images))), device)
        t_sem, sems = timed(semantic.label_semantic, images, device)
        out = tmp_path / "out"

        def write(i):
            for k, (a, b) in enumerate(zip(inst[i], sems[i])):
                save_map(out / "instance" / f"{i}_{k}.png", a)
                save_map(out / "semantic" / f"{i}_{k}.png", b)

        t_write, _ = timed(write, list(range(len(images))), device)

    n = len(paths)
    rows = [("decode (PIL, JPEG)", t_decode), ("detector (Grounding DINO)", t_det), ("SAM (boxes → masks)", t_sam),
            (f"semantic ({args.semantic_kind})", t_sem), ("write (2 PNG maps)", t_write)]
    mode = "tiny" if args.tiny else "full-size random" if args.full_size else "given models"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    table = Table(title=f"labelling, {n} images (longer side {args.size}), batch {args.batch_size}, {mode}, "
                        f"{name}{', bf16' if args.bf16 else ''}")
    table.add_column("stage")
    table.add_column("ms / image", justify="right")
    table.add_column("images/s", justify="right")
    for label, secs in rows:
        table.add_row(label, f"{1000 * secs / n:,.1f}", f"{n / secs:,.1f}")
    slow_label, slow = max(rows, key=lambda r: r[1])
    total = sum(s for _, s in rows)
    table.add_row("all stages in sequence", f"{1000 * total / n:,.1f}", f"{n / total:,.1f}", style="bold")
    table.add_row(f"pipeline bound = {slow_label}", f"{1000 * slow / n:,.1f}", f"{n / slow:,.1f}", style="bold")
    console.print(table)
    if device.type == "cuda":
        console.print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
