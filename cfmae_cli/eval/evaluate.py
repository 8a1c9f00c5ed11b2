"""Classification metrics over a dataset: loss, top-1 and top-5 accuracy, on one or several processes."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Callable, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from cfmae_cli.data.dataset import Skipped, collate
from cfmae_cli.train import distributed


def shard_loader(dataset: Dataset, batch_size: int, workers: int, info: distributed.DistInfo,
                 collate_fn: Callable = collate) -> DataLoader:
    """This rank's share of ``dataset`` (every world-th item), in order, unshuffled."""
    part = Subset(dataset, range(info.rank, len(cast(Sized, dataset)), info.world)) if info.distributed else dataset
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=info.device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, info: distributed.DistInfo, bf16: bool = False,
             prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
             ) -> tuple[dict[str, Any], list[Skipped]]:
    """Mean cross-entropy and top-1 / top-5 accuracy (in %) over every readable image of every rank's loader;
    ``prepare`` turns a batch on the device into the model's inputs.

    Returns ({'val_loss', 'top1', 'top5', 'val_images'}, the items this rank could not read).
    """
    device = info.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    skipped: list[Skipped] = []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["size"] == 0:
            continue
        labels = batch["label"].to(device, non_blocking=True)
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                  if torch.is_tensor(v) and k != "label"}
        inputs = prepare(inputs) if prepare is not None else inputs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(), hits.sum(),
                             torch.tensor(labels.numel(), device=device)]).double()
    if info.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    n_safe = max(n, 1.0)
    return {"val_loss": loss / n_safe, "top1": 100 * top1 / n_safe, "top5": 100 * top5 / n_safe,
            "val_images": int(n)}, skipped
