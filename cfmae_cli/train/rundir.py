"""Run folders (DESIGN §2): ``runs/<command>/<name>[-k]/`` with config.yaml, metrics.jsonl, log.txt, …"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cfmae_cli.errors import CfmaeError


def new_run_dir(command: str, name: str, out: str | Path | None = None, base: str | Path = "runs") -> Path:
    """Create the run folder: ``out`` if given (it must not hold a run already), else the first free
    ``base/command/name``, ``name-2``, ``name-3``, …"""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CfmaeError(f"{path}: the run folder exists and is not empty; choose another --out "
                             f"(or continue that run with --resume {path}).")
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path(base) / command
    root.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        path = root / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes it (readable while training)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Copy the ``cfmae_cli`` log records into ``run_dir/log.txt``; returns the handler to remove later."""
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cfmae_cli")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
