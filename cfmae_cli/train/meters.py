"""Running means of a training run's step values: over the epoch (the epoch record; carried through a stop in
mid-epoch as ``partial``) and over the window since the last log line (the step records and img/s)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor


class Meters:
    """Sums of ``k`` values per micro-batch on the device (no host sync until a mean is read)."""

    def __init__(self, k: int, device: torch.device, partial: dict[str, Any] | None = None):
        part = partial or {"sums": [0.0] * k, "batches": 0, "images": 0, "seconds": 0.0}
        self.epoch_sum = torch.tensor(part["sums"], device=device) * part["batches"]
        self.epoch_batches, self.epoch_images = part["batches"], part["images"]
        self.window_sum = torch.zeros(k, device=device)
        self.window_batches = self.window_images = 0
        self.window_start = time.perf_counter()
        self.start = self.window_start - part["seconds"]  # the epoch's time includes what ran before a stop

    def add(self, values: Tensor, images: int) -> None:
        self.epoch_sum += values
        self.window_sum += values
        self.epoch_batches, self.window_batches = self.epoch_batches + 1, self.window_batches + 1
        self.epoch_images, self.window_images = self.epoch_images + images, self.window_images + images

    def window(self) -> tuple[Tensor, float]:
        """(the window's mean values, its images per second), and a new window starts."""
        now = time.perf_counter()
        mean = self.window_sum / max(self.window_batches, 1)
        rate = self.window_images / max(now - self.window_start, 1e-9)
        self.window_sum = torch.zeros_like(self.window_sum)
        self.window_batches = self.window_images = 0
        self.window_start = now
        return mean, rate

    def epoch_mean(self) -> Tensor:
        return self.epoch_sum / max(self.epoch_batches, 1)

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def partial(self) -> dict[str, Any]:
        """What a mid-epoch checkpoint keeps to report the same epoch means after a resume."""
        return {"sums": self.epoch_mean().tolist(), "batches": self.epoch_batches, "images": self.epoch_images,
                "seconds": self.seconds()}
