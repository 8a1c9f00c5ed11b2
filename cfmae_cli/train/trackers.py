"""Where a run's numbers and figures go besides ``metrics.jsonl`` (``train.loggers``): TensorBoard, a CSV per
record type, Weights & Biases, MLflow. Each receives the same scalars (``<type>/<field>`` at the optimizer
step), the resolved config as hyper-parameters (W&B, MLflow) and the figures as images. W&B and MLflow are
optional extras (``pip install 'cfmae[wandb]'`` / ``'cfmae[mlflow]'``); a run resumed with ``--resume``
continues the same W&B / MLflow run (its id is kept in the run folder)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from cfmae_cli.errors import ConfigError
from cfmae_cli.formats import atomic_write_text

EXTRAS = {"wandb": ("wandb", "cfmae[wandb]"), "mlflow": ("mlflow", "cfmae[mlflow]")}
IDS = "trackers.json"  # the run folder's W&B / MLflow run ids, for a resume


def check_available(loggers: Sequence[str]) -> None:
    """Refuse (before the run starts) a logger whose package is not installed, naming the extra to install."""
    for name in loggers:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise ConfigError(f"train.loggers: {name} is not installed; pip install '{EXTRAS[name][1]}' (or leave "
                              f"{name} out of train.loggers).")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}`` (lists as JSON text): hyper-parameters for a tracker."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


class Trackers:
    """The loggers of ``train.loggers`` for one process (rank 0)."""

    def __init__(self, loggers: list[str], run_dir: Path, config: dict[str, Any], resume_step: int | None):
        self.run_dir, self.names = run_dir, list(loggers)
        ids = _read_ids(run_dir) if resume_step is not None else {}
        self.tb = self.wandb = self.mlflow = None
        self.csv: dict[str, tuple[Any, csv.DictWriter]] = {}
        if "csv" in loggers and resume_step is not None:  # rows after the checkpoint are written again
            for path in run_dir.glob("metrics-*.csv"):
                with path.open(newline="") as fh:
                    rows = list(csv.DictReader(fh))
                with path.open("w", newline="") as fh:
                    if rows:
                        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                        writer.writeheader()
                        writer.writerows(r for r in rows if int(float(r["step"])) <= resume_step)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter  # heavy (torch), and only when TensorBoard logs

            self.tb = SummaryWriter(log_dir=str(run_dir), purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in loggers:
            import wandb  # optional dependency (.[wandb])

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "cfmae"), name=run_dir.name,
                                    dir=str(run_dir), config=config, id=ids.get("wandb"), resume="allow",
                                    reinit="create_new")
            ids["wandb"] = self.wandb.id
        if "mlflow" in loggers:
            import mlflow  # optional dependency (.[mlflow])

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a local file store in the run folder (MLflow 3 asks for an explicit opt-in to it)
                uri = (run_dir / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow = mlflow.MlflowClient(tracking_uri=uri)
            if ids.get("mlflow"):
                self.mlflow_run = ids["mlflow"]
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cfmae")
                found = self.mlflow.get_experiment_by_name(name)
                experiment = found.experiment_id if found else self.mlflow.create_experiment(name)
                self.mlflow_run = self.mlflow.create_run(experiment, run_name=run_dir.name).info.run_id
                for key, value in flatten(config).items():
                    self.mlflow.log_param(self.mlflow_run, key, str(value)[:6000])
            ids["mlflow"] = self.mlflow_run
        if ids:
            atomic_write_text(run_dir / IDS, json.dumps(ids, indent=1) + "\n")

    def scalars(self, record: dict[str, Any]) -> None:
        kind, step = record.get("type", "step"), int(record.get("step", 0))
        values = {f"{kind}/{k}": float(v) for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("type", "step")}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if "csv" in self.names:
            self._csv(kind, {"step": step, **{k.split("/", 1)[1]: v for k, v in values.items()}})
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric  # optional dependency (.[mlflow])

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, tag: str, path: Path, step: int) -> None:
        """A figure written to ``path`` (PNG), to the loggers that show images."""
        if self.tb is not None:
            import numpy as np  # heavy: this module is on the CLI's light paths (through train/rundir.py)
            from PIL import Image  # heavy: as numpy

            with Image.open(path) as im:
                self.tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb  # optional dependency (.[wandb])

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)
        if self.mlflow is not None:
            self.mlflow.log_artifact(self.mlflow_run, str(path), artifact_path=f"figures/step-{step:07d}")

    def _csv(self, kind: str, row: dict[str, Any]) -> None:
        if kind not in self.csv:
            path = self.run_dir / f"metrics-{kind}.csv"
            new = not path.exists()
            fh = path.open("a", newline="")
            writer = csv.DictWriter(fh, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            self.csv[kind] = (fh, writer)
        fh, writer = self.csv[kind]
        writer.writerow(row)
        fh.flush()

    def close(self, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        for fh, _ in self.csv.values():
            fh.close()
        self.csv = {}
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, "FAILED" if failed else "FINISHED")
            self.mlflow = None


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        return dict(json.loads((run_dir / IDS).read_text()))
    except (OSError, ValueError, TypeError):
        return {}
