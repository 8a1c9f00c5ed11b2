"""Speed measurements behind ``cfmae bench``: the training step split into its phases, the FLOPs it does,
masks, and the data path — for a preset and, in the same process, its MAE-equivalent (``mae-vitb``); and the
memory of a step with and without activation checkpointing (:func:`step_memory`).

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and one
backward of the model at batch 2 (matrix multiplications, convolutions and attention). Step phases are timed
with a device synchronisation at each phase boundary; img/s is timed separately over steps without any.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, cast, Sized

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from cfmae_cli import modalities as table
from cfmae_cli.config import Config
from cfmae_cli.data.dataset import collate
from cfmae_cli.data.device_augment import DeviceAugment
from cfmae_cli.data.raw import raw_reader
from cfmae_cli.data.layout import is_packed, save_map, write_manifest
from cfmae_cli.data.packed import pack_dataset
from cfmae_cli.masking import MaskGenerator, Masks, schedule
from cfmae_cli.model import CFMAE
from cfmae_cli.model.align import Teacher
from cfmae_cli.model.layers import SavedBytes
from cfmae_cli.train import distributed
from cfmae_cli.train.optim import build_optimizer
from cfmae_cli.train.setup import build_dataset

log = logging.getLogger(__name__)

# Dense bf16 matrix peak per GPU (vendor specification, TFLOP/s); MFU is reported against it.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def load_warning(load1: float | None, cores: int) -> str | None:
    """A warning when other work already keeps this machine busy (the 1-minute load average ``load1`` above half
    its ``cores``, before the bench starts): the bench times with every core, so its figures (and their ratios)
    would measure the sharing, not the step. None when idle or where the OS has no load average."""
    if load1 is None or load1 <= cores / 2:
        return None
    return (f"the machine is busy (1-minute load average {load1:.1f} on {cores} core(s)): other work shares the "
            f"cores, so these numbers are not meaningful; run cfmae bench again when the machine is idle")


def synthetic_batch(b: int, size: int, map_size: int, objects: int, classes: int, g: torch.Generator,
                    device: torch.device) -> dict[str, Tensor]:
    """rgb (B, 3, S, S) normalised, instance and semantic (B, S/s, S/s) long, consistent with each other:
    a sky/ground split and random rectangles, each of its own colour."""
    ys = torch.arange(map_size, device=device).view(1, 1, -1, 1)
    xs = torch.arange(map_size, device=device).view(1, 1, 1, -1)
    horizon = torch.randint(map_size // 4, 3 * map_size // 4, (b, 1, 1, 1), device=device, generator=g)
    semantic = torch.where(ys < horizon, 0, 1).expand(b, 1, map_size, map_size).clone()[:, 0]
    instance = torch.zeros_like(semantic)
    corner = torch.randint(0, map_size * 3 // 4, (b, objects, 2), device=device, generator=g)
    extent = torch.randint(max(map_size // 8, 1), max(map_size // 3, 2), (b, objects, 2), device=device,
                           generator=g)
    for k in range(objects):  # a handful of rectangles; later ones cover earlier ones
        y0, x0 = corner[:, k, 0].view(b, 1, 1), corner[:, k, 1].view(b, 1, 1)
        y1, x1 = y0 + extent[:, k, 0].view(b, 1, 1), x0 + extent[:, k, 1].view(b, 1, 1)
        inside = (ys[0] >= y0) & (ys[0] < y1) & (xs[0] >= x0) & (xs[0] < x1)
        instance = torch.where(inside, k + 1, instance)
        semantic = torch.where(inside, 2 + (k % max(classes - 2, 1)), semantic)
    palette = torch.rand(b, objects + 2, 3, device=device, generator=g)
    region = torch.where(instance > 0, instance + 1, semantic)  # colour by instance, else sky / ground
    colours = palette.gather(1, region.reshape(b, -1, 1).expand(-1, -1, 3)).reshape(b, map_size, map_size, 3)
    rgb = torch.nn.functional.interpolate(colours.permute(0, 3, 1, 2), size=size, mode="nearest-exact")
    rgb = (rgb - 0.45) / 0.25 + 0.05 * torch.randn(rgb.shape, device=device, generator=g)
    return {"rgb": rgb, "instance": instance, "semantic": semantic}


class Rig:
    """A preset's model, optimizer and mask generator on a device, with synthetic batches."""

    def __init__(self, cfg: Config, classes: int, device: torch.device, compile_model: bool = False):
        self.cfg, self.classes, self.device = cfg, classes, device
        self.teacher = None
        if cfg.model.align.enabled:  # the teacher forward is what alignment costs
            self.teacher = Teacher(cfg.model.align, device, distributed.uses_bf16(cfg.train.precision, device),
                                   cfg.data.mean, cfg.data.std)
        torch.manual_seed(0)
        self.model = CFMAE.from_config(cfg, classes, align_dim=self.teacher.dim if self.teacher else None).to(device)
        self.net: Callable[..., dict[str, Any]] = torch.compile(self.model) if compile_model else self.model
        self.optimizer = build_optimizer(self.model, cfg.optim, 1e-4, device)
        self.masks = MaskGenerator(cfg.masking, cfg.data.modalities, self.model.grid, classes,
                                   cfg.model.num_instance_ids)
        self.bf16 = distributed.precision_for(cfg.train.precision, device)  # as a run: TF32 for fp32
        self.g = torch.Generator(device=device).manual_seed(0)
        self.size, self.map_size = cfg.data.img_size, cfg.data.img_size // cfg.model.map_stride

    def batch(self, b: int) -> dict[str, Tensor]:
        """A synthetic batch; image modalities other than RGB (depth) get a vertical ramp plus noise."""
        batch = synthetic_batch(b, self.size, self.map_size, 6, self.classes, self.g, self.device)
        for name in self.cfg.data.modalities:
            spec = table.get(name)
            if name not in batch and spec.kind == "image":
                ramp = torch.linspace(0, 1, self.size, device=self.device).view(1, 1, -1, 1)
                noise = torch.rand(b, spec.channels, self.size, self.size, device=self.device, generator=self.g)
                batch[name] = (0.8 * ramp + 0.2 * noise).expand(b, spec.channels, -1, -1).contiguous()
        return batch

    def teacher_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with the teacher's features added (alignment on), else as it is."""
        if self.teacher is None:
            return batch
        return {**batch, "teacher": self.teacher(batch[table.embedding_modality()], self.model.grid)}

    def mask(self, batch: dict[str, Tensor], step: int, progress: float = 0.3) -> Masks:
        alpha_i, alpha_s = schedule(progress, self.cfg.masking.order, self.cfg.masking.breakpoints)
        with torch.no_grad():
            return self.masks(alpha_i, alpha_s, len(batch[table.embedding_modality()]), self.device, seed=step,
                              **table.guide_maps(batch, self.cfg.data.modalities))

    def forward(self, batch: dict[str, Tensor], masks: Masks) -> Tensor:
        inputs = {m: batch[m] for m in [*self.cfg.data.modalities, "teacher"] if m in batch}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(inputs, masks.mask, masks.ids_keep)["loss"]

    def optimize(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def count_flops(cfg: Config, classes: int) -> dict[str, Any]:
    """GFLOP per image of one training step (forward, backward), and of the forward by top-level module."""
    rig = Rig(cfg, classes, torch.device("cpu"))
    batch = rig.batch(2)
    masks = rig.mask(batch, 0)
    # attention through the math kernel: its matmuls are counted (the fused CPU kernel has no FLOP formula)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as teacher:
        batch = rig.teacher_features(batch)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        loss = rig.forward(batch, masks)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
        loss.backward()
    counts = {k: sum(v.values()) for k, v in fwd.get_flop_counts().items() if "." in k}
    modules: dict[str, float] = {}
    for top in dict.fromkeys(k.split(".")[1] for k in counts):  # a child, or its children when it is a container
        keys = [k for k in counts if k.split(".")[1] == top]
        depth = min(k.count(".") for k in keys)
        modules[top] = sum(counts[k] for k in keys if k.count(".") == depth) / 2e9
    f, b, t = fwd.get_total_flops() / 2e9, bwd.get_total_flops() / 2e9, teacher.get_total_flops() / 2e9
    out = {"forward": f, "backward": b, "step": f + b + t, "forward_by_module": modules}
    return out | ({"teacher": t} if rig.teacher is not None else {})


def time_step(rig: Rig, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """ms per step by phase (synchronised at each boundary) and img/s of unsynchronised steps."""
    batches = [rig.batch(batch_size) for _ in range(2)]
    if rig.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rig.device)
    keys = ["data", "masking"] + (["teacher"] if rig.teacher is not None else []) + ["forward", "backward",
                                                                                     "optimizer"]
    phases = dict.fromkeys(keys, 0.0)
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        batch = batches[step % 2]
        rig.sync()
        marks.append(time.perf_counter())
        masks = rig.mask(batch, step)
        rig.sync()
        marks.append(time.perf_counter())
        if rig.teacher is not None:
            batch = rig.teacher_features(batch)
            rig.sync()
            marks.append(time.perf_counter())
        loss = rig.forward(batch, masks)
        rig.sync()
        marks.append(time.perf_counter())
        loss.backward()
        rig.sync()
        marks.append(time.perf_counter())
        rig.optimize()
        rig.sync()
        marks.append(time.perf_counter())
        if step >= warmup:
            for key, a, b in zip(phases, marks, marks[1:]):
                phases[key] += (b - a) * 1e3 / steps
    if rig.device.type == "cuda":
        start = time.perf_counter()  # the same steps without synchronisation: the speed a run gets
        for step in range(steps):
            batch = batches[step % 2]
            rig.forward(rig.teacher_features(batch), rig.mask(batch, step)).backward()
            rig.optimize()
        rig.sync()
        seconds = time.perf_counter() - start
    else:  # on the CPU nothing runs asynchronously: the timed steps above are already the speed a run gets
        seconds = sum(phases.values()) * steps / 1e3
    out: dict[str, Any] = {"batch_size": batch_size, "steps": steps, "ms_per_step": seconds * 1e3 / steps,
                           "img_per_s": batch_size * steps / seconds, "phases_ms": phases}
    if rig.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(rig.device) / 2 ** 30
    return out


def step_memory(cfg: Config, classes: int, device: torch.device, batch_size: int, counted: tuple[int, int] = (2, 4)
                ) -> dict[str, Any]:
    """Bytes of a training step at ``batch_size`` without (``*_off``) and with (``*_on``) model.grad_checkpointing:
    counted (:class:`SavedBytes` at the batches ``counted``, extended linearly, in a GPU run's precision; one block
    recomputed at a time; weights, grads, AdamW) and on CUDA measured (``peak_gib_*``, ``ms_*``; None: no memory)."""
    out: dict[str, Any] = {"batch_size": batch_size, "counted_at": list(counted),
                           "bf16": distributed.uses_bf16(cfg.train.precision, torch.device("cuda"))}
    for key in ("off", "on"):
        rig = Rig(cfg.model_copy(update={"model": cfg.model.model_copy(update={"grad_checkpointing": key == "on"})}),
                  classes, device)
        rig.bf16 = out["bf16"]  # counted as a GPU run autocasts, on any device
        counts = []
        for b in counted:
            batch = rig.teacher_features(rig.batch(b))
            with SavedBytes(rig.model.train()) as saved:
                rig.forward(batch, rig.mask(batch, 0))
            counts.append((saved.total, max(saved.by_block.values(), default=0)))
        (s1, r1), (s2, r2) = counts
        scale = (batch_size - counted[0]) / (counted[1] - counted[0])  # activations are linear in the batch
        out[f"activations_{key}"] = s1 + (s2 - s1) * scale
        if key == "off":  # 16 bytes per trained parameter (fp32 weight, gradient, 2 AdamW moments), 4 per other
            trained = sum(p.numel() for p in rig.model.parameters() if p.requires_grad)
            frozen = sum(t.numel() for t in [*rig.model.parameters(), *rig.model.buffers()]) - trained
            out |= {"params": trained + frozen, "param_state": 16 * trained + 4 * frozen,
                    "recompute": r1 + (r2 - r1) * scale}
        out[f"total_{key}"] = out["param_state"] + out[f"activations_{key}"] + (out["recompute"] if key == "on" else 0)
        try:  # on CUDA the peak: the second step's, with AdamW's state
            step = time_step(rig, batch_size, steps=1, warmup=1) if device.type == "cuda" else None
        except torch.cuda.OutOfMemoryError:
            step = {"peak_memory_gib": None, "ms_per_step": None}
        out |= {f"peak_gib_{key}": step["peak_memory_gib"], f"ms_{key}": step["ms_per_step"]} if step else {}
        del rig
    return out


def time_masks(rig: Rig, batch_size: int, repeats: int = 5) -> dict[str, float]:
    """ms to build the masks of one batch: random, and the curriculum's mix at 30 % (α_S 0.67, α_I 0.33) with
    the preset's ``masking.mix`` ('mixed') and with the literal score mix ('score')."""
    batch = rig.batch(batch_size)
    configured = rig.masks
    literal = MaskGenerator(rig.cfg.masking.model_copy(update={"mix": "score"}), rig.cfg.data.modalities,
                            rig.model.grid, rig.classes, rig.cfg.model.num_instance_ids)
    out = {}
    for name, progress, masks in (("random", 1.0, configured), ("mixed", 0.3, configured), ("score", 0.3, literal)):
        rig.masks = masks
        rig.mask(batch, 0, progress)
        rig.sync()
        start = time.perf_counter()
        for k in range(repeats):
            rig.mask(batch, k, progress)
        rig.sync()
        out[name] = (time.perf_counter() - start) * 1e3 / repeats
    rig.masks = configured
    return out


def imagenet_like_samples(root: Path, count: int = 48) -> Path:
    """A dataset in the layout of docs/dataset-format.md with ImageNet-sized files: 500 x 375 JPEGs (quality
    90) of scikit-image photographs and their classical-label PNG maps."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.fromarray(photos[i % len(photos)]).convert("RGB").resize((500, 375))
        (root / "rgb" / "c").mkdir(parents=True, exist_ok=True)
        image.save(root / "rgb" / "c" / f"{i:04d}.jpg", quality=90)
        h, w = 375, 500
        sem = (np.arange(h)[:, None] * 4 // h + np.zeros((1, w), int)).astype(np.uint8)
        inst = np.zeros((h, w), np.uint8)
        for k in range(1, 9):
            y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
            inst[y:y + rng.integers(20, 60), x:x + rng.integers(20, 60)] = k
        save_map(root / "instance" / "c" / f"{i:04d}.png", inst)
        save_map(root / "semantic" / "c" / f"{i:04d}.png", sem)
    write_manifest(root, ["a", "b", "c", "d"], {"instance": "synthetic", "semantic": "synthetic"},
                   {"images": count})
    return root


class MaeAnchor(Dataset):
    """What MAE's loader does per sample, for comparison: ImageFolder-like (PIL decode), bicubic
    RandomResizedCrop (scale 0.2-1), flip, to tensor and normalise; RGB only."""

    def __init__(self, root: Path, size: int):
        from torchvision import transforms as T

        self.files = sorted(p for p in (root / "rgb").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.transform = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0),
                                                        interpolation=T.InterpolationMode.BICUBIC),
                                    T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        with Image.open(self.files[key[1]]) as im:
            return {"rgb": self.transform(im.convert("RGB")), "label": 0}


def _loader_rate(dataset: Dataset, w: int, batch_size: int, batches: int) -> tuple[float, list[dict[str, Any]]]:
    """Samples/s of a DataLoader of ``w`` workers after its warm-up (:func:`_rate`), and the batches it gave. With 0 workers
    the main process reads at one torch thread, as each worker process does (DataLoader sets it)."""
    threads = torch.get_num_threads()
    if w == 0:
        torch.set_num_threads(1)
    try:
        return _rate(dataset, w, batch_size, batches)
    finally:
        torch.set_num_threads(threads)


def _rate(dataset: Dataset, w: int, batch_size: int, batches: int) -> tuple[float, list[dict[str, Any]]]:
    """Timed over ``batches`` after the warm-up: the first batch, or with workers the 2 x ``w`` batches they
    load ahead (DataLoader's prefetch) while the clock would not run: timing from the first batch would count
    work done before it and overstate the rate of many workers."""
    warm = max(1, 2 * w)
    keys = [(0, i % len(cast(Sized, dataset))) for i in range(batch_size * (batches + warm))]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=w, collate_fn=collate,
                        sampler=keys)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    start = time.perf_counter()
    got = list(it)
    return sum(b["size"] for b in got) / (time.perf_counter() - start), got


def device_ms(cfg: Config, batches: list[dict[str, Any]], device: torch.device) -> float:
    """ms per sample of the device step of ``data.decode: gpu`` (decode, crop, resize, flip, canonical ids) on
    ``device`` over raw ``batches``: GPU time (synchronised) on a GPU, CPU time on the CPU; after one warm-up."""
    augment = DeviceAugment(cfg.data.img_size, cfg.model.map_stride, cfg.model.num_instance_ids,
                            table.maps_of(cfg.data.modalities))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    augment(batches[0], device)
    sync()
    start = time.perf_counter()
    n = sum(augment(b, device)["size"] for b in batches)
    sync()
    return (time.perf_counter() - start) * 1e3 / n


def time_data(cfg: Config, root: Path | None, workers: list[int], batch_size: int, batches: int,
              packed: bool = True, device: torch.device | None = None) -> list[dict]:
    """The training data path with each number of DataLoader workers, after the first batch — for the folder
    and, with ``packed``, its ``cfmae pack`` copy; each with the CPU reader (read, decode, joint crop + flip,
    canonical ids, collate) and the reader of ``data.decode: gpu`` (bytes, id maps, the crop drawn), whose
    device step is timed on ``device``; beside them MAE's loader (:class:`MaeAnchor`) on the folder's images.
    Per row: samples/s, ms per sample per core (workers x 1000 / samples/s; the main process: one core) and the
    cores a GPU needs at 1,500 and 6,000 img/s (img/s x ms / 1000)."""
    device = device or torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(root) if root is not None else imagenet_like_samples(Path(tmp) / "folder")
        sources = [("packed" if is_packed(folder) else "folder", folder)]
        if packed and not is_packed(folder):
            pack_dataset(folder, Path(tmp) / "packed", workers=max(workers))
            sources.append(("packed", Path(tmp) / "packed"))
        readers: list[tuple[str, str, Dataset]] = []
        for kind, path in sources:
            dataset, _ = build_dataset(cfg, path)
            readers += [(kind, "cpu", dataset), (kind, "gpu-decode", raw_reader(dataset))]
        if not is_packed(folder):
            readers.append(("mae-anchor", "cpu", MaeAnchor(folder, cfg.data.img_size)))
        rows = []
        for kind, reader, data in readers:
            for w in workers:
                rate, got = _loader_rate(data, w, batch_size, batches)
                ms = 1e3 * max(w, 1) / rate
                row = {"format": kind, "reader": reader, "workers": w, "samples_per_s": rate,
                       "per_worker": rate / max(w, 1), "ms_per_sample_per_core": ms,
                       "cores_per_gpu": {str(r): r * ms / 1e3 for r in GPU_RATES}}
                if reader == "gpu-decode":
                    row |= {"device_ms_per_sample": device_ms(cfg, got, device), "device": device.type}
                rows.append(row)
        return rows


#: img/s per GPU the cores-per-GPU table is worked out for (a ViT-B step on an H100-class GPU: 1,500 to 6,000)
GPU_RATES = (1500, 6000)
