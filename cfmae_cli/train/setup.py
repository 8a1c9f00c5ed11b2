"""What a run is made of before it starts: the device, the data, and the plan (derived sizes and steps)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from cfmae_cli import modalities as table
from cfmae_cli.config import batch_plan, Config, derived
from cfmae_cli.data.dataset import MultiGranularDataset
from cfmae_cli.data.layout import is_packed, list_samples, read_manifest, read_packed_manifest, SampleTable
from cfmae_cli.data.packed import PackedDataset
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.errors import CfmaeError
from cfmae_cli.labeling import demo
from cfmae_cli.train.task import Plan, TrainingConfig

log = logging.getLogger(__name__)


def resolve_device(cfg: TrainingConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CfmaeError("train.device: cuda was asked for but no GPU is visible; use --gpus 0 "
                             "(or --set train.device=cpu)")
        return torch.device("cuda")
    return torch.device("cpu")


def fitting_batch(images: int, world: int, steps: int, cap: int | None = None) -> int:
    """The largest power-of-two per-device batch (at most ``cap``) with which ``images`` give an epoch at least
    ``steps`` optimizer steps on ``world`` processes; 1 when even that gives fewer."""
    batch = 1
    while (cap is None or batch * 2 <= cap) and batch * 2 * world * steps <= images:
        batch *= 2
    return batch


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one (a container or
    ``taskset`` may allow fewer than the machine has), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_processes(world: int) -> int:
    """Training processes on this machine: the launcher's ``LOCAL_WORLD_SIZE``, else ``world`` (``--procs``)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", world)), 1)


def choose_threads(threads: int | None, workers: int, procs: int = 1, cores: int | None = None) -> int:
    """torch's intra-op threads per process: ``threads`` when set (``train.threads``), else this process's share
    of the cores (``cores`` among ``procs`` local processes) minus its ``workers`` DataLoader workers, at least
    1 — so threads and workers together do not ask for more cores than there are (on 2 cores torch's default
    of all cores beside a worker ran the demo 10x slower)."""
    if threads:
        return threads
    cores = usable_cores() if cores is None else cores
    return max(cores // max(procs, 1) - workers, 1)


def train_threads(cfg: TrainingConfig, world: int) -> int:
    """The intra-op threads of a training run with ``cfg`` on ``world`` processes (see :func:`choose_threads`)."""
    return choose_threads(cfg.train.threads, cfg.data.num_workers, local_processes(world))


def set_threads(cfg: TrainingConfig, world: int) -> int:
    """Set torch's intra-op threads for this training process (pre-training and fine-tuning); returns them."""
    threads = train_threads(cfg, world)
    torch.set_num_threads(threads)
    return threads


def slow_run_warning(cores: int, load1: float, threads: int, procs: int, workers: int, img_per_s: float
                     ) -> str | None:
    """Why a run's first epoch (at ``img_per_s``) is slower than this machine can go, or None: the 1-minute
    load average ``load1`` is well above the ``cores`` (other work shares them: beyond this run's own
    ``threads`` x ``procs`` + ``workers``, at least one more core's worth), or threads x processes + workers
    ask for more than the cores (the run competes with itself)."""
    asked = threads * procs + workers
    reasons = []
    if asked > cores:
        reasons.append(f"{threads} thread(s) x {procs} process(es) + {workers} data worker(s) = {asked} ask for "
                       f"more than the {cores} core(s); lower train.threads or data.num_workers (or leave "
                       f"train.threads unset)")
    if load1 > cores + 1:
        reasons.append(f"the 1-minute load average is {load1:.1f} on {cores} core(s): other work shares this "
                       f"machine")
    if not reasons:
        return None
    return f"epoch 1 ran {img_per_s:.1f} img/s, slower than this machine can go: " + "; ".join(reasons)


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class _DataSection(Protocol):
    @property
    def root(self) -> str | None: ...

    @property
    def modalities(self) -> Sequence[str]: ...

    @property
    def demo_crops_per_photo(self) -> int: ...

    @property
    def demo_size(self) -> int: ...


class WithData(Protocol):
    """A config whose ``data`` section names a folder or the built-in demo data (pre-training's, fine-tuning's)."""

    @property
    def data(self) -> _DataSection: ...


def dataset_root(cfg: WithData) -> Path:
    """The configured data folder, or the built-in demo data (built and cached on first use; with the classical
    depth cue when the modalities include depth)."""
    if cfg.data.root is not None:
        return Path(cfg.data.root)

    depth = bool(table.on_request_maps(cfg.data.modalities))
    root = demo.build_demo_dataset(demo.default_demo_root(depth), crops_per_photo=cfg.data.demo_crops_per_photo,
                              size=cfg.data.demo_size, seed=0, depth=depth)
    log.info("built-in demo data: %s", root)
    return Path(root)


def monitor_root(cfg: Config) -> Path | None:
    """The k-NN monitor's own labelled folder: ``train.monitor.data``, or for the built-in demo data its
    close-ups (built and cached on first use); None: the monitor holds out a share of the data (or is off)."""
    m = cfg.train.monitor
    if m.enabled is False:
        return None
    if m.data is not None:
        return Path(m.data)
    if cfg.data.root is not None:
        return None

    return demo.build_demo_monitor_set(demo.default_monitor_root(), size=cfg.data.demo_size)


def build_dataset(cfg: Config, root: Path, train: bool = True, samples: SampleTable | None = None
                  ) -> tuple[MultiGranularDataset | PackedDataset, dict[str, Any]]:
    """The dataset of ``root`` (the folder layout — all its samples or ``samples`` — or a folder written by
    ``cfmae pack``) for this config, and its manifest (which gives C_sem). RGB comes out as uint8: the task
    normalises it on the device (:func:`normalise_on_device`)."""
    d = cfg.data
    transform = JointTransform(d.img_size, cfg.model.map_stride, cfg.model.num_instance_ids, d.crop_scale,
                               d.crop_ratio, d.hflip, d.mean, d.std, train=train, normalise=False)
    maps = table.maps_of(cfg.data.modalities)
    if is_packed(root):
        return PackedDataset(root, transform, maps, cfg.train.seed), read_packed_manifest(root)
    manifest = read_manifest(root)
    if samples is None:
        samples, _ = list_samples(root, maps=maps)
    dataset = MultiGranularDataset(samples, transform, maps, manifest["num_semantic_classes"], cfg.train.seed)
    return dataset, manifest


def make_plan(cfg: TrainingConfig, images: int, world: int) -> Plan:
    """Accumulation, actual lr and step counts for ``images`` training images on ``world`` processes
    (pre-training and fine-tuning share the rule lr = base_lr x batch / 256: :func:`~cfmae_cli.config.batch_plan`)."""
    batch = batch_plan(cfg.optim, cfg.train, world)
    steps = images // cfg.optim.effective_batch
    return Plan(devices=batch["devices"], accumulation_steps=batch["accumulation_steps"],
                effective_batch=batch["effective_batch"], lr=batch["lr"], images=images, steps_per_epoch=steps,
                total_steps=steps * cfg.train.epochs, warmup_steps=int(cfg.optim.warmup_epochs * steps),
                threads=train_threads(cfg, world), workers=cfg.data.num_workers, procs=local_processes(world))


def describe_schedule(plan: Plan, cfg: TrainingConfig) -> list[str]:
    """The batch, lr and threads lines of the plan (printed at the start of every training run)."""
    why = "" if cfg.train.threads else \
        f" (train.threads unset: {usable_cores()} core(s) among {plan.procs} process(es), minus the workers)"
    return [f"plan: {plan.devices} process(es) x per-device batch {cfg.train.batch_size} x "
            f"{plan.accumulation_steps} accumulation step(s) = effective batch {plan.effective_batch}",
            f"plan: lr {plan.lr:.3g} (base_lr {cfg.optim.base_lr:.3g} x {plan.effective_batch} / 256"
            f"{', overridden by optim.lr' if cfg.optim.lr is not None else ''}); {plan.images} images, "
            f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in {cfg.train.epochs} epochs, "
            f"warmup {plan.warmup_steps} steps",
            f"plan: threads {plan.threads}, data workers {plan.workers} per process{why}"]


def describe_tokens(cfg: Config) -> list[str]:
    """The pre-training lines of the plan: tokens and the decoder."""
    sizes = derived(cfg)
    return [f"plan: {sizes['num_visible']} visible of {sizes['tokens_total']} tokens of "
            f"{' + '.join(sizes['modalities'])}; decoder {sizes['decoder']}"]


def describe_plan(plan: Plan, cfg: Config) -> list[str]:
    return describe_schedule(plan, cfg) + describe_tokens(cfg)
