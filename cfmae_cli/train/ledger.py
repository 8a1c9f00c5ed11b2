"""The bad-file ledger of a training run (docs/design.md §6): which samples could not be used and why, shared by the
ranks, written to ``bad_files.txt``, and the stop past ``data.max_bad_fraction``; and the weight-0 replay
that keeps DDP in step when a rank's whole micro-batch is unreadable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cfmae_cli.data.dataset import Skipped
from cfmae_cli.errors import DataError
from cfmae_cli.formats import atomic_write_text
from cfmae_cli.train import distributed


class BadFiles:
    """Bad samples by path (a file that stays broken counts once), for a dataset of ``size`` samples."""

    def __init__(self, run_dir: Path, size: int, max_fraction: float, info: distributed.DistInfo, data: str):
        self.run_dir, self.size, self.info, self.data = run_dir, size, info, data
        self.limit = max_fraction * size
        self.files: dict[str, Skipped] = {}
        self.last_inputs: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def add(self, skipped: list[Skipped]) -> None:
        """The bad samples of a batch; a single process checks the limit at once (with several, the ranks
        decide together at the end of the step: :meth:`check_all`)."""
        if skipped:
            self.files.update((s.path, s) for s in skipped)
            if not self.info.distributed:
                self.check()

    def inputs(self, batch: dict[str, Any], to_device: Callable[[dict[str, Any]], dict[str, Any]]
               ) -> tuple[dict[str, Any], float]:
        """(the batch's inputs on the device, its loss weight): a wholly unreadable batch repeats this rank's
        previous micro-batch with weight 0, so that every rank runs the same passes (DDP stays in step)."""
        if batch["size"] == 0:
            if self.last_inputs is None:
                raise DataError(f"every image of a batch in {self.data} is unreadable; see bad_files.txt")
            return self.last_inputs, 0.0
        self.last_inputs = to_device({k: v for k, v in batch.items() if k not in ("skipped", "size")})
        return self.last_inputs, 1.0

    def merge(self) -> None:
        """Bad files seen by any rank, once each, on every rank (a collective: all ranks call it)."""
        for part in distributed.gather(self.files, self.info):
            self.files.update(part)

    def check_all(self) -> None:
        """After a step with several ranks: if any is past the limit, all merge and stop together."""
        if self.info.distributed and distributed.any_rank(len(self.files) > self.limit, self.info):
            self.merge()
            self.check()

    def check(self) -> None:
        if len(self.files) > self.limit:
            self.write()
            shown = "\n  ".join(f"{s.path}: {s.reason}" for s in list(self.files.values())[:5])
            raise DataError(f"{len(self.files)} of {self.size} images could not be used, more than "
                            f"data.max_bad_fraction allows ({self.limit:.0f}):\n  {shown}\n"
                            f"Full list: {self.run_dir / 'bad_files.txt'}")

    def write(self) -> None:
        if self.files and self.info.is_main:
            atomic_write_text(self.run_dir / "bad_files.txt",
                              "".join(f"{s.path}\t{s.reason}\n" for s in self.files.values()))

    def state(self) -> list[list[str]]:
        return [[s.path, s.reason] for s in self.files.values()]

    def restore(self, records: list[list[str]]) -> None:
        self.files = {path: Skipped(path, reason) for path, reason in records}
