"""The k-NN monitor's cost against a pre-training epoch: measured at demo size, counted in FLOPs at ViT-B on
ImageNet (docs/monitoring.md).

Run:  python benchmarks/bench_monitor.py [--epochs 5] [--device cpu|cuda]

Demo: the demo pre-training runs ``--epochs`` epochs with the monitor after every one, in a temporary folder;
the table gives the mean seconds of a training epoch (the loop alone) and of one measurement (embedding the
bank and the val set, the vote), their ratio, and the ratio spread over the demo's ``every`` epochs. ViT-B:
FLOPs of one training step of ``vitb-400e`` per image and of the monitor's forward per image (the whole
224 × 224 image, no mask), scaled to an ImageNet epoch (1,281,167 images) and the monitor's default subset
(``train_images`` + ``val_images``). With ``--device cuda`` the ViT-B monitor forward is also timed (img/s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cfmae_cli.bench import count_flops
from cfmae_cli.config import load_config
from cfmae_cli.model import CFMAE
from cfmae_cli.train.pretraining import pretrain
from cfmae_cli.train.rundir import read_metrics

IMAGENET_TRAIN = 1_281_167


def demo(epochs: int) -> tuple[float, float, int]:
    """(mean seconds of a training epoch, mean seconds of a measurement, the demo's ``every``)."""
    every = load_config("demo").train.monitor.every
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("demo", [f"train.epochs={epochs}", "train.monitor.every=1", "train.plot_every=1000"])
        pretrain(cfg, out=Path(tmp) / "run")
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    epoch_s = [r["seconds"] for r in records if r["type"] == "epoch"]
    monitor_s = [r["monitor_seconds"] for r in records if r["type"] == "monitor"]
    return sum(epoch_s) / len(epoch_s), sum(monitor_s) / len(monitor_s), every


def monitor_flops(encoder: torch.nn.Module, size: int) -> float:
    """GFLOP per image of the monitor's forward (batch 2, attention through the math kernel so it is counted)."""
    x = torch.zeros(2, 3, size, size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoder.forward_image(x)
    return counter.get_total_flops() / 2e9


def timed_monitor(encoder: torch.nn.Module, size: int, device: torch.device, batch: int = 256) -> float:
    """img/s of the monitor's forward in bf16 on ``device``."""
    encoder = encoder.to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(3):
            encoder.forward_image(x)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            encoder.forward_image(x)
        torch.cuda.synchronize(device)
    return 10 * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    table = Table(title="k-NN monitor vs a pre-training epoch")
    for column in ("setting", "training epoch", "one measurement", "ratio", "spread over `every`"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    epoch_s, monitor_s, every = demo(args.epochs)
    table.add_row(f"demo, CPU, measured ({args.epochs} epochs)", f"{epoch_s:.1f} s", f"{monitor_s:.1f} s",
                  f"{monitor_s / epoch_s:.1%}", f"{monitor_s / epoch_s / every:.1%} (every {every})")
    cfg = load_config("vitb-400e")
    m = cfg.train.monitor
    step = count_flops(cfg, 133)["step"]
    encoder = CFMAE.from_config(cfg, 133).encoder
    forward = monitor_flops(encoder, cfg.data.img_size)
    epoch_pf = IMAGENET_TRAIN * step / 1e6
    monitor_pf = (m.train_images + m.val_images) * forward / 1e6
    table.add_row(f"ViT-B on ImageNet, counted ({step:.1f} / {forward:.1f} GFLOP per image)", f"{epoch_pf:.1f} PFLOP",
                  f"{monitor_pf:.2f} PFLOP", f"{monitor_pf / epoch_pf:.1%}",
                  f"{monitor_pf / epoch_pf / m.every:.2%} (every {m.every})")
    console = Console(width=140)
    console.print(table)
    if args.device.startswith("cuda"):
        rate = timed_monitor(encoder, cfg.data.img_size, torch.device(args.device))
        console.print(f"ViT-B monitor forward on {torch.cuda.get_device_name()}: {rate:.0f} img/s (bf16, batch 256)"
                      f" = {(m.train_images + m.val_images) / rate:.0f} s per measurement")


if __name__ == "__main__":
    main()
