"""DataLoader workers' memory with the sample list as Python objects vs. as a table of arrays (issue 29, item 3).

A synthetic ImageNet-sized list (1,281,167 samples in 1,000 class folders, ImageNet's file names, two maps) is
built both ways without touching the disk: the list of :class:`Sample` that ``list_samples`` returned before, and
the :class:`SampleTable` it returns now. A fork-started DataLoader reads a quarter of an epoch (random order) from
each, building each sample's paths as the dataset does, and every worker reports its private memory (USS:
``Private_Clean + Private_Dirty`` of ``/proc/self/smaps_rollup``) at the start and at the end. The pages a worker
copies from its parent are the growth.

    python benchmarks/bench_samples.py                   # 1.28 M samples, 2 workers, a quarter of an epoch
    python benchmarks/bench_samples.py --samples 200000 --workers 4 --share 0.5

Linux only (``/proc``). Prints a table: what, parent's list (MiB), per worker USS at start and end (MiB), growth.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfmae_cli.data.samples import Sample, SampleTable, map_path  # noqa: E402

ROOT = Path("/datasets/imagenet-cfmae")
MAPS = ("instance", "semantic")


def private_mib() -> float:
    """This process's unique memory (pages it does not share with its parent), MiB."""
    total = 0
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def imagenet_names(samples: int, classes: int) -> list[tuple[int, list[str]]]:
    per = samples // classes
    return [(k, [f"n{k:08d}_{i}.JPEG" for i in range(per + (1 if k < samples % classes else 0))])
            for k in range(classes)]


def as_list(files: list[tuple[int, list[str]]], class_dirs: list[str]) -> list[Sample]:
    """What ``list_samples`` built before: one Sample (its Paths and its dict) per image."""
    out = []
    for label, names in files:
        c = class_dirs[label]
        for name in names:
            stem = os.path.splitext(name)[0]
            out.append(Sample(ROOT / "rgb" / c / name, {m: map_path(ROOT, m, c, stem) for m in MAPS}, label))
    return out


class Reader(Dataset):
    """Reads sample i's paths as the pre-training dataset does (``samples[i].rgb``, its maps), no file I/O; every
    ``report`` items it returns its private memory."""

    def __init__(self, samples, report: int):
        self.samples, self.report, self.seen = samples, report, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        _ = (str(s.rgb), [str(p) for p in s.maps.values()], s.label)
        self.seen += 1
        first = self.seen == 1
        return (first, private_mib()) if first or self.seen % self.report == 0 else None


class Share(Sampler):
    def __init__(self, n: int, share: float, seed: int = 0):
        self.order = np.random.default_rng(seed).permutation(n)[:int(n * share)]

    def __iter__(self):
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def keep(batch):
    return [x for x in batch if x is not None]


def run(samples, workers: int, share: float) -> list[tuple[float, float]]:
    """(USS at start, USS at the end) of each worker, MiB, after reading ``share`` of ``samples``."""
    loader = DataLoader(Reader(samples, 2000), batch_size=512, sampler=Share(len(samples), share),
                        num_workers=workers, collate_fn=keep, multiprocessing_context="fork",
                        worker_init_fn=lambda _: None)
    # the batches of worker w are w, w + workers, …: its first report is in its first batch
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for b, reports in enumerate(loader):
        w = b % workers
        for is_first, mib in reports:
            if is_first:
                first.setdefault(w, mib)
            last[w] = mib
    return [(first[w], last[w]) for w in range(workers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--share", type=float, default=0.25, help="share of an epoch the workers read")
    args = ap.parse_args()
    torch.set_num_threads(1)
    class_dirs = [f"n{k:08d}" for k in range(args.classes)]
    rows = []
    for what in ("SampleTable", "list of Sample"):  # the table first: the list's freed pages would blur its RSS
        gc.collect()
        start = rss_mib()
        files = imagenet_names(args.samples, args.classes)
        t0 = time.perf_counter()
        samples = as_list(files, class_dirs) if what == "list of Sample" else \
            SampleTable.from_folders(ROOT / "rgb", ROOT, MAPS, class_dirs, files)
        built = time.perf_counter() - t0
        del files
        gc.collect()
        held = samples.names.nbytes + samples.offsets.nbytes + samples.labels.nbytes if isinstance(samples, SampleTable) \
            else (rss_mib() - start) * 2**20  # the arrays; the list: the RSS it added
        held /= 2**20
        t0 = time.perf_counter()
        workers = run(samples, args.workers, args.share)
        read = time.perf_counter() - t0
        rows.append((what, held, built, read, workers))
        del samples
        gc.collect()
    print(f"{args.samples:,} samples, {args.classes} classes, {args.workers} fork-started workers reading "
          f"{args.share:.0%} of an epoch in random order; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    print()
    print("| sample list | parent holds (MiB) | built in (s) | read in (s) | worker USS start → end (MiB) "
          "| growth per worker (MiB) |")
    print("|---|---:|---:|---:|---|---:|")
    for what, held, built, read, workers in rows:
        spans = ", ".join(f"{a:,.0f} → {b:,.0f}" for a, b in workers)
        growth = sum(b - a for a, b in workers) / len(workers)
        print(f"| {what} | {held:,.0f} | {built:.1f} | {read:.1f} | {spans} | {growth:,.0f} |")


if __name__ == "__main__":
    main()
