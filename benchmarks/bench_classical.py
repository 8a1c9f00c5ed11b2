"""The classical labeller's speed (it labels the built-in demo data and `cfmae label --backend classical`).

Run:  python benchmarks/bench_classical.py [--repeat 5]

Prints ms per image at a few sizes (scikit-image's astronaut, resized), the best of ``--repeat`` after one
warm-up, with the 1-minute load average beside it. The target the unit tests used to time (under 100 ms at
128 px) lives here now: a shared 2-core machine made that test fail for reasons of load, not of code.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import skimage.data
from PIL import Image
from rich.console import Console
from rich.table import Table

from cfmae_cli.labeling.classical import ClassicalLabeller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    photo = Image.fromarray(skimage.data.astronaut())
    labeller = ClassicalLabeller()
    table = Table(title=f"classical labeller, best of {args.repeat} (1-minute load {os.getloadavg()[0]:.2f})")
    for column in ("size", "ms per image", "images/s", "target"):
        table.add_column(column, justify="right")
    for size in (128, 224, 512):
        rgb = np.asarray(photo.resize((size, size)))
        labeller.label(rgb)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            labeller.label(rgb)
            times.append(time.perf_counter() - start)
        best = min(times)
        table.add_row(f"{size} px", f"{best * 1000:.1f}", f"{1 / best:.1f}", "< 100 ms" if size == 128 else "")
    Console().print(table)


if __name__ == "__main__":
    main()
