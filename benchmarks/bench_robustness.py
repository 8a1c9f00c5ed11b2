"""Throughput and memory of `cfmae eval-robustness` on an ImageNet-C-shaped tree.

Builds ``imagenet-c/<19 corruptions>/<1-5>/<wnid>/*.JPEG`` under a temporary folder, each file a hard link to
one of a few real 224 x 224 JPEG photographs (scikit-image's samples), with ``--per-split`` images in every one
of the 95 splits, and streams it through the suite with a model of ``--preset`` size. Prints a table: images,
listing time, img/s, the main process's peak RSS, and the size of the path arrays scaled to the real ImageNet-C
(3.75 M images + the 4 extra corruptions).

    python benchmarks/bench_robustness.py --per-split 10 20 40 --workers 2          # CPU
    python benchmarks/bench_robustness.py --per-split 200 --workers 8 --model vitb   # a GPU
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfmae_cli.eval.classifier import ViTClassifier  # noqa: E402
from cfmae_cli.eval.config import EncoderArch  # noqa: E402
from cfmae_cli.eval.models import EvalModel  # noqa: E402
from cfmae_cli.eval.robustness import (CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, SuiteDataset,  # noqa: E402
                                       evaluate_suite, find_splits, imagenet_synsets)
from cfmae_cli.train import distributed  # noqa: E402

ARCHS = {"tiny": EncoderArch(patch_size=16, embed_dim=192, depth=12, num_heads=3),
         "vitb": EncoderArch()}


def build_tree(root: Path, per_split: int) -> int:
    photos = []
    for k, image in enumerate([skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]):
        path = root / f"photo{k}.JPEG"
        Image.fromarray(image).convert("RGB").resize((224, 224)).save(path, quality=90)
        photos.append(path)
    wnids = imagenet_synsets()
    n = 0
    for corruption in [*CORRUPTIONS, *EXTRA_CORRUPTIONS]:
        for s in SEVERITIES:
            for i in range(per_split):
                folder = root / "imagenet-c" / corruption / str(s) / wnids[(i * 37) % 1000]
                folder.mkdir(parents=True, exist_ok=True)
                os.link(photos[i % len(photos)], folder / f"ILSVRC2012_val_{i:08d}.JPEG")
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-split", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", choices=list(ARCHS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    info = distributed.DistInfo(0, 1, 0, device)
    net = ViTClassifier(ARCHS[args.model], 224, 1000, ["rgb"]).to(device).eval()
    model = EvalModel(net, lambda x: net({"rgb": x}), 224, 0.875, "bicubic", (0.485, 0.456, 0.406),
                      (0.229, 0.224, 0.225), args.model)
    rows = []
    for per_split in args.per_split:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            images = build_tree(root, per_split)
            start = time.perf_counter()
            splits = find_splits(root, ["c"])
            listing = time.perf_counter() - start
            start = time.perf_counter()
            evaluate_suite(model.forward, splits, model.resize_transform(), model.as_is_transform(),
                           batch_size=args.batch, workers=args.workers, info=info, bf16=device.type == "cuda")
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            dataset = SuiteDataset(splits, model.resize_transform(), model.as_is_transform())
            per_path = dataset.paths.itemsize
            real = 3_750_000 + 4 * 5 * 50_000
            rows.append((per_split, images, listing, images / seconds,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10,
                         real * (per_path + 4) / 2 ** 20))
    print(f"\n{args.model} on {device}, batch {args.batch}, {args.workers} workers")
    print("| images per split | images | listing s | img/s | peak RSS MiB (main) | path arrays at IN-C size MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for per_split, images, listing, rate, rss, arrays in rows:
        print(f"| {per_split} | {images} | {listing:.2f} | {rate:.1f} | {rss:.0f} | {arrays:.0f} |")
    print(f"(path arrays: fixed-width bytes of the longest path, here {per_path} bytes, + int16 label and split)")


if __name__ == "__main__":
    main()
