"""Pre-training throughput on one device with synthetic data: img/s, step time, peak memory, loss trend.

Run:  python benchmarks/bench_pretrain.py                       # vitb-400e, batch 256, 300 steps, the GPU
      python benchmarks/bench_pretrain.py --preset demo --batch 32 --steps 30 --device cpu

The data is made on the device each step: piecewise-constant images (a sky/ground split and random
rectangles, each of its own colour) with matching instance and semantic maps, so that the loss has
something to learn. Masks follow the preset's curriculum over the run (semantic → instance → random).
The step is the engine's: bf16 autocast on CUDA, fused AdamW, masks built on the device.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from cfmae_cli.bench import synthetic_batch
from cfmae_cli.config import load_config
from cfmae_cli.masking import MaskGenerator, schedule
from cfmae_cli.model import CFMAE
from cfmae_cli.train.optim import build_optimizer, lr_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vitb-400e")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing (and lr warmup)")
    parser.add_argument("--classes", type=int, default=133)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.preset)
    size, map_size = cfg.data.img_size, cfg.data.img_size // cfg.model.map_stride
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, args.classes).to(device)
    lr = cfg.optim.base_lr * args.batch / 256
    optimizer = build_optimizer(model, cfg.optim, lr, device)
    masks = MaskGenerator(cfg.masking, cfg.data.modalities, model.grid, args.classes, cfg.model.num_instance_ids)
    bf16 = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        start = time.perf_counter()
        batch = synthetic_batch(args.batch, size, map_size, 6, args.classes, g, device)
        alpha_i, alpha_s = schedule(step / args.steps, cfg.masking.order, cfg.masking.breakpoints)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, lr, 0.0)
        with torch.no_grad():
            drawn = masks(alpha_i, alpha_s, args.batch, device, instance=batch["instance"],
                          semantic=batch["semantic"], seed=step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model({m: batch[m] for m in cfg.data.modalities}, drawn.mask, drawn.ids_keep)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    loss = torch.stack(losses).float().cpu()
    steady = times[args.warmup:] or times
    step_s = sum(steady) / len(steady)
    k = max(1, min(10, args.steps // 5))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"{args.preset} on {name}: batch {args.batch}, {args.steps} steps (synthetic data)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("img/s (steady, after the first %d steps)" % args.warmup, f"{args.batch / step_s:,.1f}")
    table.add_row("ms per step", f"{step_s * 1e3:,.1f}")
    if device.type == "cuda":
        table.add_row("peak GPU memory (GiB)", f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}")
    table.add_row(f"loss, mean of the first {k} steps", f"{loss[:k].mean():.4f}")
    table.add_row(f"loss, mean of the last {k} steps", f"{loss[-k:].mean():.4f}")
    table.add_row("loss fell", "yes" if loss[-k:].mean() < loss[:k].mean() else "no")
    Console().print(table)


if __name__ == "__main__":
    main()
