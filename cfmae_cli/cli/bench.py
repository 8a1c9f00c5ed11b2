"""``cfmae bench``: training-step speed (phases, img/s, FLOPs, MFU), masks, the data path and the memory of a step
with and without activation checkpointing, as a table + JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from cfmae_cli.cli.common import console, device_of, guarded
from cfmae_cli.config import load_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write_text, check_output, json_stamp

WHAT = ("step", "masks", "data", "memory", "all")
#: the presets of --what memory when --preset is not given
MEMORY_PRESETS = ("demo", "vits-400e", "vitb-400e", "vitl-400e")


@guarded
def bench(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", metavar="NAME", show_default="vitb-400e; --what "
                                         "memory: " + ",".join(MEMORY_PRESETS), help="the preset to measure (see "
                                         "`cfmae presets`) or a YAML file; --what memory: one or several, "
                                         "comma-separated"),
    compare: str = typer.Option("mae-vitb", "--compare", metavar="NAME", help="a second preset measured in the same "
                                "process (the MAE-equivalent by default); 'none' to skip"),
    device: Optional[str] = typer.Option(None, "--device", metavar="NAME", show_default="cuda if there is a GPU, "
                                         "else cpu", help="cpu or cuda"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, max=1, metavar="N", show_default="--device's",
                                       help="0 = the CPU, 1 = one GPU (the same as --device cpu / cuda)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, metavar="N", show_default="256 on a GPU, "
                                             "4 on the CPU; --what memory: each preset's train.batch_size",
                                             help="per-step batch"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, metavar="N", show_default="30 on a GPU, 2 on the "
                                        "CPU", help="timed steps"),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, metavar="N", show_default="10 on a GPU, 1 on the "
                                         "CPU", help="untimed steps first"),
    what: str = typer.Option("all", "--what", metavar="NAME", help="step, masks, data, memory (a step's memory with "
                             "and without model.grad_checkpointing; not part of all) or all"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (forward + loss)"),
    mask_batch: int = typer.Option(64, "--mask-batch", min=1, metavar="N", help="batch for the masks' timing"),
    data: Optional[Path] = typer.Option(None, "--data", metavar="FOLDER", show_default="48 generated "
                                        "ImageNet-sized samples", help="dataset for --what data"),
    workers: Optional[str] = typer.Option(None, "--workers", metavar="N[,N...]", show_default="1 and all cores",
                                          help="DataLoader worker processes for --what data (0 = the main process): "
                                          "one count, or several to compare (e.g. 1,4,16)"),
    classes: int = typer.Option(133, "--classes", min=2, metavar="N", help="semantic classes, at least 2 (COCO "
                                "panoptic: 133)"),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", show_default="runs/bench/<preset>-<device>"
                                       ".json", help="JSON file"),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default="the preset's values",
                                        help="override a config key of --preset (repeatable; not of --compare), "
                                        "e.g. --set model.align.enabled=true"),
) -> None:
    """Measure the training step, the masks and the data path; print a table and write JSON.

    Example, on a 2-core CPU in about 30 s when it is idle: cfmae bench --device cpu

    Example, on a GPU: cfmae bench --batch-size 256 --compile

    Example, memory with and without activation checkpointing: cfmae bench --what memory --device cpu

    Example, the price of feature alignment: cfmae bench --compare vitb-400e --set model.align.enabled=true
    --set model.align.teacher=vit_base_patch16_224 --set model.align.weights=vitb.safetensors
    """
    counts = worker_counts(workers) if workers else sorted({1, os.cpu_count() or 1})  # checked before torch loads
    import torch

    from cfmae_cli.bench import count_flops, load_warning, peak_tflops, Rig, time_data, time_masks, time_step
    from cfmae_cli.train.setup import load_average, usable_cores

    if what not in WHAT:
        raise CfmaeError(f"--what {what}: use one of {', '.join(WHAT)}.")
    device = device_of(device, gpus)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CfmaeError("--device cuda: no GPU is visible.")
    if what == "memory":
        names = preset.split(",") if preset else list(MEMORY_PRESETS)
        return memory(names, overrides, dev, batch_size, classes,
                      out or Path("runs/bench") / f"memory-{dev.type}.json")
    preset = preset or "vitb-400e"
    gpu = dev.type == "cuda"
    path = check_output(out or Path("runs/bench") / f"{preset}-{dev.type}.json", [p for p in [data] if p],
                        command="bench")
    batch_size = batch_size or (256 if gpu else 4)
    steps = steps or (30 if gpu else 2)
    warmup = warmup if warmup is not None else (10 if gpu else 1)
    main = f"{preset} with --set" if overrides else preset  # the column of --preset (it may be --compare's too)
    presets = [main] + ([compare] if compare != "none" and what in ("step", "all") else [])
    machine = torch.cuda.get_device_name(dev) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                           f"{os.cpu_count()} cores)"
    load = load_average()
    busy = load_warning(load, usable_cores())
    report: dict[str, Any] = {**json_stamp("bench"), "device": machine, "torch": torch.__version__, "overrides": overrides,
                              "batch_size": batch_size, "compiled": compile_model, "load_average_1min": load,
                              "presets": {}}
    if busy:
        console.print(f"warning: {busy}", highlight=False)
    peak = peak_tflops(dev)
    _say(f"measuring {' and '.join(presets)} on {machine}: " + ", ".join(
        p for p, on in [("the training step", what in ("step", "all")), ("the masks", what in ("masks", "all")),
                        ("the data path", what in ("data", "all"))] if on))
    for name in presets:
        cfg = load_config(preset, overrides) if name == main else load_config(name)
        entry: dict[str, Any] = {}
        if what in ("step", "all"):
            _say(f"{name}: counting the FLOPs of one step at batch 2 (seconds)")
            start = time.perf_counter()
            entry["flops_gflop_per_image"] = count_flops(cfg, classes)
            per_image = (time.perf_counter() - start) / 2 * 0.6  # one counted forward + backward of 2 images
            guess = "" if gpu else f", ~{max(per_image * batch_size * (steps + warmup), 1):.0f} s"
            _say(f"{name}: timing {warmup} untimed + {steps} timed step(s) at batch {batch_size}"
                 f"{', compiling first' if compile_model else ''}{guess}")
        rig = Rig(cfg, classes, dev, compile_model)
        if what in ("step", "all"):
            entry["step"] = time_step(rig, batch_size, steps, warmup)
            achieved = entry["flops_gflop_per_image"]["step"] * entry["step"]["img_per_s"] / 1e3
            entry["achieved_tflops"] = achieved
            entry["mfu"] = achieved / peak if peak else None
        if what in ("masks", "all") and name == main:
            _say(f"{name}: building 3 kinds of masks for a batch of {mask_batch}, 6 times each (seconds)")
            entry["masks_ms"] = time_masks(rig, mask_batch)
            entry["masking_mix"] = cfg.masking.mix
        if what in ("data", "all") and name == main:
            source = str(data) if data else "48 generated ImageNet-sized samples (written and packed first)"
            kinds = "its format" if data else "folder and packed"
            _say(f"data path: 11 batches of 16 from {source} with {', '.join(map(str, counts))} worker(s), "
                 f"{kinds}, CPU and GPU-decode readers and MAE's, ~{3 + 4 * len(counts):.0f} s on 2 idle CPU cores")
            entry["data"] = time_data(cfg, data, counts, batch_size=16, batches=10, device=dev)
        report["presets"][name] = entry
        del rig
    _print(report, main, presets, mask_batch, peak)
    if busy:
        console.print("warning: measured on a busy machine (see the first line): not meaningful", highlight=False)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    console.print(f"JSON: {path}", highlight=False)


def memory(presets: list[str], overrides: list[str], dev: Any, batch_size: int | None, classes: int, out: Path
           ) -> None:
    """``--what memory``: :func:`cfmae_cli.bench.step_memory` of each preset (at its ``train.batch_size`` unless
    ``--batch-size``), printed as a table and written as JSON."""
    import torch

    from cfmae_cli.bench import step_memory

    path = check_output(out, [], command="bench")
    configs = [load_config(name.strip(), overrides) for name in presets]  # every name checked before the first count
    gpu = dev.type == "cuda"
    machine = torch.cuda.get_device_name(dev) if gpu else f"CPU ({os.cpu_count()} cores)"
    report: dict[str, Any] = {**json_stamp("bench"), "device": machine, "torch": torch.__version__,
                              "overrides": overrides, "classes": classes, "presets": {}}
    for name, cfg in zip(presets, configs):
        b = batch_size or cfg.train.batch_size
        _say(f"{name}: counting the activations of a forward at batch 2 and 4 without and with checkpointing"
             + (f", then two steps at batch {b} each" if gpu else ""))
        report["presets"][name] = step_memory(cfg, classes, dev, b) | {"img_size": cfg.data.img_size}
    gib = 2 ** 30
    columns = ["preset", "batch", "img", "params M", "act.", "act. ckpt", "ratio", "w+g+AdamW", "total",
               "total ckpt"]
    table = Table(*columns + (["peak", "peak ckpt", "ms/step", "ms ckpt"] if gpu else []),
                  title=f"memory of one training step per device in GiB on {machine} (ckpt: model.grad_checkpointing)")
    table.columns[0].no_wrap, table.columns[0].min_width = True, max(map(len, presets))
    for name, r in report["presets"].items():
        cells = [name, str(r["batch_size"]), str(r["img_size"]), f"{r['params'] / 1e6:.1f}",
                 f"{r['activations_off'] / gib:.2f}", f"{(r['activations_on'] + r['recompute']) / gib:.2f}",
                 f"{r['activations_off'] / (r['activations_on'] + r['recompute']):.1f}x",
                 f"{r['param_state'] / gib:.2f}", f"{r['total_off'] / gib:.2f}", f"{r['total_on'] / gib:.2f}"]
        if gpu:
            cells += ["OOM" if r[k] is None else f"{r[k]:.2f}" for k in ("peak_gib_off", "peak_gib_on")]
            cells += ["" if r[k] is None else f"{r[k]:.0f}" for k in ("ms_off", "ms_on")]
        table.add_row(*cells)
    console.print(table)
    precision = "bf16 autocast" if all(r["bf16"] for r in report["presets"].values()) else "each preset's precision"
    console.print(f"memory: activations = the bytes autograd saves for the backward in one forward (each distinct "
                  f"storage once, parameters and buffers left out), counted at batch 2 and 4 and extended linearly "
                  f"to the batch, in {precision} (a GPU run's); with checkpointing they are the blocks' inputs, the "
                  f"rest outside the blocks, and the largest block's activations, recomputed in the backward one "
                  f"block at a time; weights+grads+AdamW = 16 bytes per trained parameter (fp32), 4 per frozen one "
                  f"or buffer; total = their sum, without the allocator's slack and the backward's temporary "
                  f"buffers" + ("; peak = torch.cuda.max_memory_allocated over the second of two steps (forward, "
                                "backward, AdamW)" if gpu else ""), highlight=False)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    console.print(f"JSON: {path}", highlight=False)


def worker_counts(text: str) -> list[int]:
    """``--workers N[,N...]``: the worker counts to time, each a whole number (0 = read in the main process)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise CfmaeError(f"--workers {text}: give worker counts as whole numbers >= 0, comma-separated (e.g. 1,4,16).")
    return [int(p) for p in parts]


def _say(text: str) -> None:
    """What the bench is doing now and roughly how long it takes (a line before each phase)."""
    console.print(f"bench: {text}", highlight=False)


def _print(report: dict[str, Any], preset: str, presets: list[str], mask_batch: int, peak: float | None) -> None:
    table = Table("measure", *presets, title=f"cfmae bench on {report['device']}, batch {report['batch_size']}"
                  f"{', compiled' if report['compiled'] else ''}")
    main = report["presets"][preset]

    def row(label: str, get, fmt: str = "{:,.1f}") -> None:
        values = []
        for name in presets:
            try:
                value = get(report["presets"][name])
            except (KeyError, TypeError):
                value = None
            values.append("" if value is None else fmt.format(value))
        if any(values):
            table.add_row(label, *values)

    row("img/s (no syncs)", lambda e: e["step"]["img_per_s"])
    row("ms per step (no syncs)", lambda e: e["step"]["ms_per_step"])
    for phase in ("data", "masking", "teacher", "forward", "backward", "optimizer"):
        row(f"  ms {phase} (synced phases)", lambda e, p=phase: e["step"]["phases_ms"].get(p), "{:,.2f}")
    row("peak GPU memory GiB", lambda e: e["step"].get("peak_memory_gib"), "{:.2f}")
    row("GFLOP / image: forward", lambda e: e["flops_gflop_per_image"]["forward"])
    row("GFLOP / image: backward", lambda e: e["flops_gflop_per_image"]["backward"])
    row("GFLOP / image: teacher (alignment)", lambda e: e["flops_gflop_per_image"].get("teacher"), "{:.2f}")
    for module in main.get("flops_gflop_per_image", {}).get("forward_by_module", {}):
        row(f"  forward: {module}", lambda e, m=module: e["flops_gflop_per_image"]["forward_by_module"].get(m),
            "{:.2f}")
    row("achieved TFLOP/s", lambda e: e["achieved_tflops"], "{:.2f}")
    if peak:
        row(f"MFU (of {peak:.0f} TFLOP/s bf16)", lambda e: 100 * e["mfu"], "{:.1f} %")
    console.print(table)
    if len(presets) == 2 and "step" in main and "step" in report["presets"][presets[1]]:
        other = report["presets"][presets[1]]["step"]
        ratio = main["step"]["ms_per_step"] / other["ms_per_step"]
        flops = main["flops_gflop_per_image"]["step"] / report["presets"][presets[1]]["flops_gflop_per_image"]["step"]
        report["step_time_ratio"] = ratio
        console.print(f"step time {preset} / {presets[1]}: {ratio:.2f} (FLOP ratio {flops:.2f})", highlight=False)
    if "masks_ms" in main:
        masks = main["masks_ms"]
        mix = report["presets"][preset].get("masking_mix", "quota")
        line = (f"masks of a batch of {mask_batch}: random {masks['random']:.1f} ms, curriculum mix at 30 % "
                f"({mix}) {masks['mixed']:.1f} ms (score mix {masks['score']:.1f} ms)")
        if "step" in main:
            step64 = main["step"]["ms_per_step"] * mask_batch / main["step"]["batch_size"]
            share = masks["mixed"] / step64
            main["masks_share_of_step"] = share
            scaled = "" if main["step"]["batch_size"] == mask_batch else \
                f" (step time scaled from batch {main['step']['batch_size']})"
            line += f" = {100 * share:.2f} % of a {preset} step at batch {mask_batch}{scaled}"
        console.print(line, highlight=False)
    for r in main.get("data", []):
        console.print(f"data path, {r['format']} ({r['reader']} reader): {r['workers']} worker(s): "
                      f"{r['samples_per_s']:,.1f} samples/s ({r['per_worker']:,.1f} per worker)", highlight=False)
    if main.get("data"):
        _print_data(main["data"])


def _print_data(rows: list[dict[str, Any]]) -> None:
    """The readers side by side: CPU ms per sample, the device step's, and the cores a GPU needs."""
    where = next((r["device"] for r in rows if "device" in r), "cpu")
    table = Table("reader", "workers", "CPU ms/sample/core", "device ms/sample", "cores/GPU @1,500",
                  "cores/GPU @6,000", title="data path per sample (a reader's goal: <= 0.5 ms/sample/core)")
    names = {"cpu": "decode + crop on CPU", "gpu-decode": "bytes only (data.decode=gpu)"}
    for r in rows:
        label = "MAE anchor (ImageFolder, bicubic RRC, flip, RGB)" if r["format"] == "mae-anchor" else \
            f"{r['format']}: {names[r['reader']]}"
        device = r.get("device_ms_per_sample")
        table.add_row(label, str(r["workers"]), f"{r['ms_per_sample_per_core']:.2f}",
                      "" if device is None else f"{device:.2f}",
                      *(f"{r['cores_per_gpu'][k]:.1f}" for k in ("1500", "6000")))
    console.print(table)
    step = "GPU time, synchronised" if where == "cuda" else "CPU time of the device step: no GPU"
    console.print(f"data path: CPU ms/sample/core = workers x 1000 / samples/s; device ms/sample = data.decode=gpu's "
                  f"decode + crop + resize + flip on {where} ({step}); cores/GPU = img/s x ms / 1000 at 1,500 and "
                  f"6,000 img/s", highlight=False)
