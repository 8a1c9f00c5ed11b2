"""train.loggers for real, offline (issue #18): W&B's offline run folder, MLflow's local file store, the CSV
files and TensorBoard hold the same final loss as metrics.jsonl, the config as hyper-parameters and the
figures; a missing extra is one clear line."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cfmae_cli.cli import app
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()
SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]


def wandb_history(run_dir: Path) -> list[dict[str, str]]:
    """The history rows of W&B's offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0]).read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, records, part = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(data)
        elif kind in (2, 3):
            part = (b"" if kind == 2 else part) + data
        elif kind == 4:
            records.append(part + data)
    rows = []
    for data in records:
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


def test_wandb_mlflow_csv_and_tensorboard_hold_the_run(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_dataset(tmp_path / "data", n_per_class=4)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), *SETS,
                                 "--set", "train.loggers=[tensorboard,csv,wandb,mlflow]"])
    assert result.exit_code == 0, result.output
    final = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"][-1]

    history = wandb_history(out)
    assert float([h for h in history if "epoch/loss" in h][-1]["epoch/loss"]) == pytest.approx(final["loss"])
    assert any(k.startswith("plots/loss/") for h in history for k in h)  # the figures as images

    from mlflow import MlflowClient

    ids = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.data.metrics["epoch/loss"] == pytest.approx(final["loss"]) and run.info.status == "FINISHED"
    assert run.data.params["optim.base_lr"] == "0.004" and run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "epoch/loss")] == [2, 4]
    figures = [a.path for top in client.list_artifacts(ids["mlflow"], "figures")
               for a in client.list_artifacts(ids["mlflow"], top.path)]
    assert any(p.endswith("loss.png") for p in figures) and any("recon-epoch" in p for p in figures)

    rows = (out / "metrics-epoch.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("loss")]) == pytest.approx(final["loss"]) and len(rows) == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert events.Scalars("epoch/loss")[-1].value == pytest.approx(final["loss"], rel=1e-6)
    assert {"plots/loss", "plots/reconstruction"} <= set(events.Tags()["images"])


def test_a_missing_extra_is_named(tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    data = make_dataset(tmp_path / "data", n_per_class=4)
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *SETS,
                                 "--set", "train.loggers=[wandb]"])
    assert result.exit_code == 2 and "pip install 'cfmae[wandb]'" in result.output
    assert not (tmp_path / "r").exists()
