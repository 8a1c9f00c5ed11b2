"""The k-NN monitor of pre-training: how well the encoder's features separate labelled images while it trains
(DINO's weighted k-NN classifier; docs/monitoring.md).

Both sets are embedded by the encoder on RGB alone, as fine-tuning reads it (the centred square of the image at
``data.img_size``, every patch visible): the global token and the average of the patch tokens (after the final
norm), each L2-normalised. A val image's classes are voted for by its k most similar bank images (cosine),
each with weight exp(similarity / T); top-1 and top-5 are the share of val images whose class is first / in
the first five. Deterministic (evaluation mode, fixed batches): a resumed run measures what an unbroken one
does, and so do N processes, each embedding every N-th batch of the same fixed batches.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cfmae_cli.config import Config
from cfmae_cli.data.dataset import MultiGranularDataset, Skipped, collate
from cfmae_cli.data.layout import Sample, SampleTable
from cfmae_cli.data.splits import held_out, list_split, spread
from cfmae_cli.data.transforms import JointTransform, normalise_on_device
from cfmae_cli.errors import DataError
from cfmae_cli.model.encoder import ViTEncoder
from cfmae_cli.train import distributed
from cfmae_cli.train.faults import SignalCatcher, ignore_stop_signals, shut_down_workers

log = logging.getLogger(__name__)
POOLS = ("token", "avg")


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> tuple[float, float]:
    """Weighted k-NN top-1 and top-5 accuracy in % (DINO): ``bank`` (M, D) and ``queries`` (Q, D) L2-normalised
    features, their labels (M,), (Q,) long. Top-5 counts only classes that got a vote (with k < 5 neighbours of
    few classes, the rest of the five would be ties at zero)."""
    classes = int(num_classes or int(torch.cat([bank_labels, labels]).max()) + 1)
    k = min(k, bank.shape[0])
    top1 = top5 = 0
    for i in range(0, queries.shape[0], chunk):
        sim = queries[i:i + chunk] @ bank.T  # cosine: both sides are unit vectors
        weights, index = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[index], (weights / temperature).exp())
        best, order = votes.topk(min(5, classes), dim=1)
        hit = (order == labels[i:i + chunk].unsqueeze(1)) & (best > 0)  # a class no neighbour voted for is no guess
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(1).sum())
    n = max(queries.shape[0], 1)
    return 100.0 * top1 / n, 100.0 * top5 / n


MIN_VAL = 20  # the fewest held-out images the monitor scores by itself (train.monitor.enabled: null)
MANY_CLASSES = 100  # from here a dataset is ImageNet-like: the log says how to keep the held-out share in training


#: the k-NN monitor's choice: (the samples left to pre-train on, the bank, the val set, the number of classes)
MonitorSplit = tuple[SampleTable | None, SampleTable, SampleTable, int]


def monitor_samples(cfg: Config, labelled: Path | None, samples: SampleTable | None, classes: list[str],
                    quiet: bool = False) -> MonitorSplit | None:
    """(the pre-training samples, the k-NN bank, the val set, the number of classes), or None when the monitor is
    off (``train.monitor.enabled`` false; or null and no labels, or a held-out share with no image in it).

    ``labelled``: the monitor's own ImageFolder (``train.monitor.data``, or the demo's close-ups); its
    ``train/`` is the bank and its ``val/`` the val set. Otherwise ``val_fraction`` of each class of the
    pre-training data is held out of pre-training (by a hash of the file name) and the bank is the rest.
    ``samples`` None: packed data, whose file names are gone (only a labelled folder can serve it). ``quiet``:
    the same answer without the log lines (the command line asks before the run, which says them)."""
    m = cfg.train.monitor
    say = (lambda *args: None) if quiet else log.info
    if m.enabled is False:
        return None
    if labelled is not None:
        if not (labelled / "train").is_dir() or not (labelled / "val").is_dir():
            raise DataError(f"{labelled}: the k-NN monitor's data (train.monitor.data, --monitor-data) needs "
                            f"train/<class>/<image> and val/<class>/<image>.")
        bank, bank_classes = list_split(labelled / "train", [])
        val, val_classes = list_split(labelled / "val", [])
        if val_classes != bank_classes:
            raise DataError(f"{labelled}: train/ and val/ have different class folders.")
        if len(bank_classes) < 2:
            raise DataError(f"{labelled}: the k-NN monitor needs two or more class folders.")
        return samples, spread(bank, m.train_images), spread(val, m.val_images), len(bank_classes)
    if m.enabled is None and (samples is None or len(classes) < 2):
        return None
    if samples is None:
        raise DataError("train.monitor.enabled: packed data holds no file names to hold a val share out of; give "
                        "the monitor its own labelled images with --monitor-data (train/ and val/).")
    if len(classes) < 2:
        raise DataError("train.monitor.enabled: the k-NN monitor needs labels: two or more class folders in the "
                        "data, or --monitor-data.")
    out = np.fromiter((held_out(s, m.val_fraction) for s in samples), bool, len(samples))
    val, kept = samples.where(out), samples.where(~out)
    if not val or not kept:
        why = (f"train.monitor.val_fraction: {m.val_fraction} of {len(samples)} images leaves {len(val)} to score "
               f"and {len(kept)} to pre-train on")
        if m.enabled is None:
            say("k-NN monitor off: %s", why)
            return None
        raise DataError(f"{why}; raise or lower it, or give the monitor its own images (--monitor-data)")
    if len(val) < MIN_VAL:
        why = (f"train.monitor.val_fraction {m.val_fraction:g} of {len(samples)} images holds out {len(val)} to score, "
               f"fewer than the {MIN_VAL} a top-1 needs to mean something (one image is 0 or 100 %)")
        enough = next((f / 20 for f in range(1, 11)  # the smallest share (steps of 0.05, at most half) that holds
                       if sum(held_out(s, f / 20) for s in samples) >= MIN_VAL), None)  # out MIN_VAL images
        fix = (f"--set train.monitor.val_fraction={enough:g} holds out enough" if enough else
               "the data is too small to hold out enough") + \
            ", or give the monitor its own labelled images (--monitor-data)"
        if m.enabled is None:
            say("k-NN monitor off: %s; %s", why, fix)
            return None
        if not quiet:
            log.warning("k-NN monitor: %s; its numbers are noise (%s)", why, fix)
    say("k-NN monitor: %d of the %d images (train.monitor.val_fraction %g of each class) are held out of "
        "pre-training to score it", len(val), len(samples), m.val_fraction)
    if len(classes) >= MANY_CLASSES and not quiet:
        log.warning("k-NN monitor: %d classes: with labelled images of its own the monitor leaves all %d images to "
                    "pre-training: --monitor-data FOLDER with train/<class>/ and val/<class>/ (e.g. ImageNet's "
                    "train and val), or --set train.monitor.enabled=false", len(classes), len(samples))
    return kept, spread(kept, m.train_images), spread(val, m.val_images), len(classes)


class _Fixed(Dataset):
    """Batches of a dataset fixed once (index ranges); item i is batch i. Rank r loads batches r, r+N, …"""

    def __init__(self, dataset: MultiGranularDataset, batch: int):
        self.dataset, self.batch = dataset, batch

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        items = [self.dataset[j] for j in range(i * self.batch, min((i + 1) * self.batch, len(self.dataset)))]
        return collate(items) | {"index": torch.arange(i * self.batch, i * self.batch + len(items))[
            [k for k, x in enumerate(items) if not isinstance(x, Skipped)]]}


class _Skipped(Exception):
    """A rank got SIGTERM / SIGINT during the monitor: every rank leaves it at the same batch."""


class StopWatch(SignalCatcher):
    """Inside: SIGTERM and SIGINT are recorded (``signum``) and passed on to the handler that was there (the
    engine's stop request, which saves after the epoch), never fatal to the monitor. A signal that no handler of
    the run records (the monitor before training) is delivered again on leaving, to act as it would have."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def __exit__(self, *exc: Any) -> None:
        previous = dict(self._previous)
        super().__exit__(*exc)
        if self.signum is not None and previous.get(self.signum) in (signal.SIG_DFL, signal.default_int_handler):
            os.kill(os.getpid(), self.signum)


class KnnMonitor:
    """Embeds the bank and the val set with the encoder and scores the val set; every rank calls it."""

    def __init__(self, cfg: Config, bank: Sequence[Sample], val: Sequence[Sample], num_classes: int,
                 info: distributed.DistInfo):
        d, m = cfg.data, cfg.train.monitor
        self.cfg, self.info, self.num_classes = cfg, info, num_classes
        t = JointTransform(d.img_size, cfg.model.map_stride, cfg.model.num_instance_ids, d.crop_scale, d.crop_ratio,
                           0.0, d.mean, d.std, train=False, normalise=False)
        self.sets = {name: _Fixed(MultiGranularDataset(samples, t, [], 1), m.batch_size)
                     for name, samples in (("bank", bank), ("val", val))}
        self.sizes = {"bank": len(bank), "val": len(val)}

    def describe(self) -> str:
        m = self.cfg.train.monitor
        return (f"k-NN monitor: {self.sizes['bank']} bank / {self.sizes['val']} val images, {self.num_classes} "
                f"classes, k {m.k}, T {m.temperature}, every {m.every} epochs")

    @torch.no_grad()
    def embed(self, encoder: ViTEncoder, name: str, watch: StopWatch | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """({pool: (n, D) unit features}, labels (n,)) of one set, in index order, on every rank. Before each batch
        the ranks ask whether any got a signal (``watch``), and all leave together (:class:`_Skipped`) if so."""
        device, info = self.info.device, self.info
        batches = len(self.sets[name])
        loader = DataLoader(self.sets[name], batch_size=None, sampler=range(info.rank, batches, info.world),
                            num_workers=self.cfg.data.num_workers, worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(0))  # draws nothing from the run's RNG
        feats: dict[str, list[Tensor]] = {p: [] for p in POOLS}
        labels, index = [], []
        rounds = -(-batches // info.world)  # the same number of questions on every rank (shares differ by one)
        stopped = lambda: watch is not None and distributed.any_rank(watch.signum is not None, info)  # noqa: E731
        batches_in = iter(loader)
        try:  # the workers ignore SIGTERM: shut down here, a skip included (faults.shut_down_workers)
            for batch in batches_in:
                rounds -= 1
                if stopped():
                    raise _Skipped
                if batch["size"] == 0:
                    continue
                rgb = normalise_on_device(batch["rgb"].to(device), self.cfg.data.mean, self.cfg.data.std)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=info.bf16):
                    x = encoder.forward_image(rgb).float()
                feats["token"].append(F.normalize(x[:, 0], dim=-1))
                feats["avg"].append(F.normalize(x[:, 1:].mean(1), dim=-1))
                labels.append(batch["label"].to(device))
                index.append(batch["index"].to(device))
        finally:
            shut_down_workers(batches_in)
        for _ in range(rounds):  # this rank's share was a batch shorter: ask with the others all the same
            if stopped():
                raise _Skipped
        dim = encoder.embed_dim
        local = {p: torch.cat(v) if v else torch.zeros(0, dim, device=device) for p, v in feats.items()}
        lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
        idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
        if info.distributed:
            local, lab, idx = _gather(local, lab, idx, info)
        order = idx.argsort()
        return {p: v[order] for p, v in local.items()}, lab[order]

    def __call__(self, encoder: ViTEncoder) -> dict[str, float] | None:
        """{knn_top1_token, knn_top5_token, knn_top1_avg, knn_top5_avg, monitor_seconds}; None when SIGTERM or
        SIGINT reached a rank meanwhile: the monitor is skipped (its loader's workers ignore the signal), so
        that the epoch's checkpoint is written within the grace the signal leaves; the stop comes after it."""
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            with StopWatch() as watch:
                bank, bank_labels = self.embed(encoder, "bank", watch)
                val, labels = self.embed(encoder, "val", watch)
        except _Skipped:
            if self.info.is_main:
                log.warning("k-NN monitor skipped: %s received; the epoch's checkpoint is written first",
                            signal.Signals(watch.signum).name if watch.signum else "a process of the job")
            return None
        finally:
            encoder.train(was_training)
        m, out = self.cfg.train.monitor, {}
        for pool in POOLS:
            top1, top5 = knn_accuracy(bank[pool], bank_labels, val[pool], labels, m.k, m.temperature,
                                      self.num_classes)
            out.update({f"knn_top1_{pool}": top1, f"knn_top5_{pool}": top5})
        return out | {"monitor_seconds": time.perf_counter() - start}


def _gather(feats: dict[str, Tensor], labels: Tensor, index: Tensor, info: distributed.DistInfo
            ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Every rank's rows on every rank (padded to the longest for ``all_gather``, then trimmed)."""
    n = torch.tensor([labels.shape[0]], device=labels.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))

    def gathered(x: Tensor) -> Tensor:
        padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.zeros_like(padded) for _ in range(info.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

    return {p: gathered(v) for p, v in feats.items()}, gathered(labels), gathered(index)
