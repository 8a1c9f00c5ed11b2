"""Mask building vs. one training step at ViT-B size (docs/design.md §7: masks must cost far less than a step).

Run:  python benchmarks/bench_masking.py [--device cpu|cuda] [--batch 256] [--step-batch 8]

Prints a table: time to build the masks of a batch (progressive mix of all three strategies), time of one
forward+backward+AdamW step of the vitb-400e model, and their ratio. On a CPU the step is timed at a
smaller batch (``--step-batch``) and scaled linearly to ``--batch`` images (a lower bound on the real step).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from cfmae_cli.config import load_config
from cfmae_cli.masking import MaskGenerator
from cfmae_cli.model import CFMAE
from cfmae_cli.train.optim import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--step-batch", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config("vitb-400e")
    classes, k, grid, ms = 133, cfg.model.num_instance_ids, 14, 56
    b = args.batch
    inst = torch.randint(0, k, (b, ms, ms), device=device)
    inst[:, :, : ms // 3] = 0
    sem = torch.randint(0, 20, (b, 1, 1), device=device).expand(b, ms, ms).clone()
    sem[:, ms // 2:] += 20
    gen = MaskGenerator(cfg.masking, cfg.data.modalities, grid, classes, k)
    literal = MaskGenerator(cfg.masking.model_copy(update={"mix": "score"}), cfg.data.modalities, grid, classes, k)
    rows = []
    for label, a_i, a_s, g in [("random", 0.0, 0.0, gen), ("semantic-guided", 0.0, 1.0, gen),
                               ("instance-guided", 1.0, 0.0, gen), ("blended (0.4, 0.3), mix quota", 0.4, 0.3, gen),
                               ("mixed (0.4, 0.3), mix score", 0.4, 0.3, literal)]:
        t = timed(lambda: g(a_i, a_s, b, device, instance=inst, semantic=sem, seed=0), device, args.repeat)
        rows.append((label, t))

    step_b = args.step_batch or (b if device.type == "cuda" else 8)
    model = CFMAE.from_config(cfg, classes).to(device)
    opt = build_optimizer(model, cfg.optim, 1e-4, device)
    batch = {"rgb": torch.randn(step_b, 3, 224, 224, device=device), "instance": inst[:step_b],
             "semantic": sem[:step_b]}
    masks = gen(0.4, 0.3, step_b, device, instance=batch["instance"], semantic=batch["semantic"])
    use_bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(batch, masks.mask, masks.ids_keep)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_t = timed(step, device, max(1, args.repeat // 2)) * b / step_b
    table = Table(title=f"masks for a batch of {b} at ViT-B size (3 x 196 tokens, 98 visible) on {device}")
    table.add_column("what")
    table.add_column("ms / batch", justify="right")
    table.add_column("img/s", justify="right")
    table.add_column("share of a training step", justify="right")
    for label, t in rows:
        table.add_row(f"masks: {label}", f"{t * 1e3:.1f}", f"{b / t:,.0f}", f"{t / step_t:.4f}")
    scaled = "" if step_b == b else f" (timed at batch {step_b}, scaled x{b / step_b:g})"
    table.add_row(f"training step{scaled}", f"{step_t * 1e3:.0f}", f"{b / step_t:,.1f}", "1")
    Console().print(table)


if __name__ == "__main__":
    main()
