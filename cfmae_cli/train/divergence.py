"""What is kept when a run diverges: the newest checkpoint whose weights went on to give a finite loss that had
not exploded; checkpoints saved after that point are set aside, so that ``last.pt`` (what ``--resume``,
``finetune --checkpoint RUN`` and ``export`` read) never holds blown-up weights."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from cfmae_cli.checkpoints import load_checkpoint
from cfmae_cli.errors import CfmaeError
from cfmae_cli.train import distributed

EXPLODED = 10.0  # a loss above this many times the lowest one before it: the weights have blown up
ASIDE = "diverged"  # checkpoints/diverged/: the set-aside checkpoints, for inspection; nothing reads them


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (``loss`` at optimizer step ``step``); :func:`keep_last_good` says what
    was kept."""

    def __init__(self, message: str, step: int, loss: float = math.nan):
        super().__init__(message)
        self.step, self.loss = step, loss


class LossWatch:
    """Where the run's trouble began, tracked on the device without a host sync: the first optimizer step of
    the current streak of micro-batch losses that are non-finite or above :data:`EXPLODED` times the lowest
    loss so far (a finite loss back in range ends a streak)."""

    def __init__(self, device: torch.device):
        self.low = torch.tensor(math.inf, device=device)
        self.start = torch.tensor(-1, dtype=torch.long, device=device)

    def add(self, loss: Tensor, step: int) -> None:
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss) | (loss > EXPLODED * self.low)
        self.start = torch.where(bad, torch.where(self.start < 0, step, self.start), -1)
        self.low = torch.where(torch.isfinite(loss), torch.minimum(self.low, loss), self.low)

    def first_bad_step(self, info: distributed.DistInfo) -> int | None:
        """The streak's first step, the earliest over the ranks; None when no loss was out of range."""
        start = torch.where(self.start < 0, torch.iinfo(torch.long).max, self.start)
        if info.distributed:
            dist.all_reduce(start, op=dist.ReduceOp.MIN)
        value = int(start.item())
        return None if value == torch.iinfo(torch.long).max else value


def keep_last_good(folder: Path, first_bad: int) -> str:
    """Set aside (into ``folder/diverged/``) every checkpoint of ``folder`` whose weights already gave a bad loss:
    one saved after optimizer step ``s`` is good when the loss of step ``s + 1``, computed with its weights, came
    before ``first_bad``. If ``last.pt`` was set aside, the newest good checkpoint becomes ``last.pt``. Returns a
    sentence saying what was kept."""
    steps: dict[Path, int] = {}
    for path in sorted(folder.glob("*.pt")):
        try:
            steps[path] = int(load_checkpoint(path, mmap=True)["step"])
        except (CfmaeError, KeyError, TypeError, ValueError):
            continue
    if not steps:
        return "No checkpoint had been saved yet, so none is kept."
    good = {p: s for p, s in steps.items() if s + 1 < first_bad}
    aside = [p for p in steps if p not in good]
    last = folder / "last.pt"
    newest = max(good, key=lambda p: (good[p], p == last), default=None)
    if aside:
        (folder / ASIDE).mkdir(exist_ok=True)
        for path in aside:
            os.replace(path, folder / ASIDE / path.name)
    if newest is None:
        return (f"No good checkpoint remains: every one ({', '.join(p.name for p in aside)}) holds weights that "
                f"already gave a non-finite or exploding loss; they were moved to {folder / ASIDE}.")
    if newest != last and last in aside:
        tmp = folder / ".last.pt.tmp"
        shutil.copyfile(newest, tmp)
        os.replace(tmp, last)
    moved = f" Set aside in {folder / ASIDE}: {', '.join(p.name for p in aside)} (their weights gave a non-finite " \
            f"or exploding loss)." if aside else ""
    kept = f"{newest} (step {good[newest]})" + (f", copied to {last}" if newest != last and last in aside else "")
    return f"The last good checkpoint is {kept}.{moved}"
