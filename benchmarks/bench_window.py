"""ViTDet's windowed attention against global attention in the detection backbone (ft-det-vitb's size).

Run:  python benchmarks/bench_window.py [--img 1344] [--window 14] [--threads 1] [--no-train] [--unfused]

Builds the detection backbone (ViT-B/16 encoder + the simple pyramid, ``ViTDetBackbone``, random weights) at
``--img`` px, batch 1, once with global attention in every block and once with ``--window`` (blocks 2, 5, 8,
11 global), each in a fresh subprocess, and prints per variant: FLOPs of a forward and of a forward +
backward (``torch.utils.flop_counter.FlopCounterMode`` on meta tensors: nothing is computed), the wall time
of one forward (no_grad) and of one forward + backward on the CPU, the process's peak resident memory
(``ru_maxrss``) after each and its growth over the built model, and the ratios windowed / global. The RPN,
box and mask heads of Mask R-CNN are not included. ``--unfused``: timm's explicit attention (the (tokens x
tokens) matrix is materialised) instead of ``scaled_dot_product_attention``, for the time and memory rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PEAK_MIB = 1024  # ru_maxrss is in KiB on Linux


def flops(img: int, window: int) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cfmae_cli.config import EncoderArch
    from cfmae_cli.eval.detection import ViTDetBackbone

    arch = EncoderArch(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    with torch.device("meta"):
        net = ViTDetBackbone(arch, img, window_size=window)
        x = torch.empty(1, 3, img, img)
    counter = FlopCounterMode(display=False)
    with counter:
        feats = net(x)
    fwd = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        feats = net(x)
        sum(f.sum() for f in feats.values()).backward()
    return {"gflop_fwd": fwd / 1e9, "gflop_train": counter.get_total_flops() / 1e9}


def run(img: int, window: int, mode: str, threads: int, unfused: bool = False) -> dict[str, float]:
    """One variant, one mode, in this process (called in a fresh subprocess)."""
    import torch

    from cfmae_cli.config import EncoderArch
    from cfmae_cli.eval.detection import ViTDetBackbone

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = ViTDetBackbone(EncoderArch(patch_size=16, embed_dim=768, depth=12, num_heads=12), img, window_size=window)
    for block in net.encoder.blocks:
        block.attn.fused_attn = not unfused
    x = torch.randn(1, 3, img, img)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / PEAK_MIB
    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            net(x)
    else:
        sum(f.float().sum() for f in net(x).values()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / PEAK_MIB
    return {"s": seconds, "peak_mib": peak, "growth_mib": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", type=int, default=1344)
    ap.add_argument("--window", type=int, default=14)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train", action="store_true", help="skip the forward + backward timing")
    ap.add_argument("--unfused", action="store_true", help="timm's explicit attention instead of the fused one")
    ap.add_argument("--child", nargs=3, metavar=("WINDOW", "MODE", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        window, mode, kind = int(args.child[0]), args.child[1], args.child[2]
        out = flops(args.img, window) if kind == "flops" else run(args.img, window, mode, args.threads, args.unfused)
        print(json.dumps(out))
        return

    def child(window: int, mode: str, kind: str) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--img", str(args.img), "--threads", str(args.threads),
               *(["--unfused"] if args.unfused else []), "--child", str(window), mode, kind]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])

    modes = ["fwd"] if args.no_train else ["fwd", "train"]
    rows = {}
    for window in (0, args.window):
        rows[window] = child(window, "-", "flops")
        for mode in modes:
            rows[window].update({f"{k}_{mode}": v for k, v in child(window, mode, "run").items()})
        print(f"# window {window}: {json.dumps(rows[window])}", file=sys.stderr)
    grid = args.img // 16
    print(f"ViT-B/16 detection backbone (encoder + simple pyramid), {args.img} px ({grid} x {grid} patches), "
          f"batch 1, {args.threads} thread(s), {'explicit' if args.unfused else 'fused'} attention, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| what | global | window " + str(args.window) + " | windowed / global |")
    print("|---|---:|---:|---:|")
    g, w = rows[0], rows[args.window]
    lines = [("GFLOPs, forward", "gflop_fwd", "{:,.0f}"), ("GFLOPs, forward + backward", "gflop_train", "{:,.0f}")]
    for mode, name in (("fwd", "forward (no_grad)"), ("train", "forward + backward")):
        if mode in modes:
            lines += [(f"time, {name}, s", f"s_{mode}", "{:.1f}"),
                      (f"peak memory, {name}, MiB", f"peak_mib_{mode}", "{:,.0f}"),
                      (f"memory growth over the model, {name}, MiB", f"growth_mib_{mode}", "{:,.0f}")]
    for label, key, fmt in lines:
        print(f"| {label} | {fmt.format(g[key])} | {fmt.format(w[key])} | {w[key] / g[key]:.2f} |")


if __name__ == "__main__":
    main()
