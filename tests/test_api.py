"""The Python API (cfmae_cli.api) that the commands call, ``--resume auto`` (start or resume) and
``cfmae finetune --eval-only``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cfmae_cli import api
from cfmae_cli.cli import app
from cfmae_cli.errors import CfmaeError
from tests.conftest import TINY_OVERRIDES, make_dataset
from tests.test_finetune import FT_OVERRIDES, epochs

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, a one-epoch tiny pre-training run, a two-epoch fine-tuning run of it), made through the API."""
    root = tmp_path_factory.mktemp("chain")
    data = make_dataset(root / "data", n_per_class=4)
    pre = api.pretrain(data=data, out=root / "pre", epochs=1, overrides=TINY_OVERRIDES)
    assert pre["epochs"] == 1 and Path(pre["run_dir"]) == root / "pre"
    ft = api.finetune(checkpoint=root / "pre", data=data, out=root / "ft",
                      overrides={k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in FT_OVERRIDES)})
    assert ft["epochs"] == 2 and (root / "ft" / "checkpoints" / "best.pt").is_file()
    return data, root / "pre", root / "ft"


def test_the_api_writes_the_runs_the_commands_write(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, pre, _ = chain
    code, output = invoke("pretrain", "--data", str(data), "--out", str(tmp_path / "cli"), "--epochs", "1",
                          *sets(TINY_OVERRIDES))
    assert code == 0, output
    by_api = yaml.safe_load((pre / "config.yaml").read_text())
    by_cli = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert by_api == by_cli  # same defaults, the same --data scaling of the demo preset, the same overrides
    a = torch.load(pre / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cli/checkpoints/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_api_raises_the_commands_errors_and_prints_nothing(chain: tuple[Path, Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    data, pre, _ = chain
    with pytest.raises(CfmaeError, match="--data .*missing"):
        api.pretrain(data=tmp_path / "missing")
    with pytest.raises(CfmaeError, match="--mode sideways: use full or linear"):
        api.finetune(checkpoint=pre, mode="sideways")
    with pytest.raises(CfmaeError, match="it takes no --out"):
        api.pretrain(resume=pre, out=tmp_path / "x")
    with caplog.at_level(logging.INFO, logger="cfmae_cli.api"):
        api.pretrain(data=data, out=tmp_path / "run", epochs=1, overrides=TINY_OVERRIDES)
    assert capsys.readouterr().out == ""  # the lines a command prints are the logger's here
    assert any("--data without --preset trains the" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.glob("missing*")) and not (tmp_path / "x").exists()


def test_resume_auto_starts_in_an_empty_folder_then_finds_the_same_run(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "job"
    command = ["pretrain", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", "--resume", "auto",
               *sets(TINY_OVERRIDES)]
    code, output = invoke(*command)
    assert code == 0, output
    assert f"--resume auto: no checkpoint in {out}; starting the run there" in output
    first = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    code, output = invoke(*command)  # the same command again (a requeued job): the run is there and complete
    assert code == 0, output
    assert "holds this run; resuming it" in output and "the run is complete (1 of 1 epochs)" in output
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == first


def test_resume_auto_refuses_a_different_run_and_changes_nothing(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    base = ["pretrain", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", *sets(TINY_OVERRIDES)]
    assert invoke(*base)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, output = invoke(*base, "--resume", "auto", "--set", "optim.base_lr=0.5")
    assert code == 2, output
    assert f"--resume auto: {out} holds another run (its config differs in optim.base_lr)" in output
    code, output = invoke("finetune", "--data", str(tiny_data), "--out", str(out), "-c", str(out), "--resume",
                          "auto", *sets(FT_OVERRIDES))
    assert code == 2 and "holds a run of `cfmae pretrain`, not of `cfmae finetune`" in output, output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, output = invoke(*base[:4], str(tmp_path / "other"), *base[5:], "--resume", "auto")
    assert code == 2 and "holds other files" in output, output
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_resume_auto_of_finetuning_compares_what_the_run_filled_in(chain: tuple[Path, Path, Path],
                                                                   tmp_path: Path) -> None:
    """A fine-tuning run fills model.encoder (and model.init) in when it starts: the same command again is the
    same run, not a different one."""
    data, pre, _ = chain
    command = ["finetune", "-c", str(pre), "--data", str(data), "--out", str(tmp_path / "ft"), "--resume", "auto",
               *sets(FT_OVERRIDES), "--epochs", "1"]
    assert invoke(*command)[0] == 0
    code, output = invoke(*command)
    assert code == 0 and "the run is complete (1 of 1 epochs)" in output, output


def test_eval_only_reproduces_the_best_val_top1_the_run_recorded(chain: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    data, _, ft = chain
    records = epochs(ft)
    best = max(records, key=lambda r: r["top1"])  # the first epoch with the best top-1 is best.pt's
    best_epoch = next(r["epoch"] for r in records if r["top1"] == best["top1"])
    code, output = invoke("finetune", "--eval-only", "-c", str(ft))
    assert code == 0, output
    result = json.loads((ft / "eval-best.json").read_text())
    assert result["checkpoint"] == str(ft / "checkpoints" / "best.pt") and result["epoch"] == best_epoch
    assert result["metrics"]["top1"] == pytest.approx(best["top1"], abs=1e-9)
    assert result["metrics"]["top5"] == pytest.approx(best["top5"], abs=1e-9)
    assert result["metrics"]["val_images"] == records[-1]["val_images"]
    assert f"top1 {best['top1']:.2f} (recorded {best['top1']:.2f})" in output
    last = tmp_path / "last.json"  # the last checkpoint, to a file of one's choosing
    code, output = invoke("finetune", "--eval-only", "-c", str(ft / "checkpoints" / "last.pt"), "--out", str(last))
    assert code == 0, output
    assert json.loads(last.read_text())["metrics"]["top1"] == pytest.approx(records[-1]["top1"], abs=1e-9)


def test_eval_only_refuses_what_it_cannot_evaluate(chain: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, pre, ft = chain
    code, output = invoke("finetune", "--eval-only", "-c", str(pre / "checkpoints" / "last.pt"), "--out",
                          str(tmp_path / "x.json"))
    assert code == 2 and "not a `cfmae finetune` checkpoint (a pretrain one)" in output, output
    code, output = invoke("finetune", "--eval-only", "-c", str(ft), "--epochs", "3")
    assert code == 2 and "it takes no --epochs" in output, output
    other = make_dataset(tmp_path / "other", n_per_class=2, classes=("a", "b", "c"))
    code, output = invoke("finetune", "--eval-only", "-c", str(ft), "--data", str(other), "--out",
                          str(tmp_path / "y.json"))
    assert code == 2 and "its classes are not the ones" in output, output
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_resume_auto_continues_an_unfinished_fine_tuning_run_with_its_own_config(chain: tuple[Path, Path, Path],
                                                                                  tmp_path: Path) -> None:
    """Stopped after epoch 1 (its last.pt is epoch 1's), the same call resumes it and ends as the unbroken run:
    the encoder that the run read off its weights at the start is the resumed run's too."""
    data, pre, ft = chain
    run = tmp_path / "ft"
    shutil.copytree(ft, run, ignore=shutil.ignore_patterns(".cfmae-lock*"))
    shutil.copy(run / "checkpoints" / "epoch-0001.pt", run / "checkpoints" / "last.pt")
    api.finetune(checkpoint=pre, data=data, out=run, resume="auto",
                 overrides={k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in FT_OVERRIDES)})
    assert [(r["epoch"], r["top1"], r["loss"]) for r in epochs(run)] == \
        [(r["epoch"], r["top1"], r["loss"]) for r in epochs(ft)]


def test_resume_auto_takes_what_the_run_filled_in_at_its_start(tiny_data: Path, tmp_path: Path) -> None:
    """A launch fills data.root (the demo data's folder) and fine-tuning model.encoder / model.init: a new config
    that leaves them unset is the same run, continued with the run's values; one that sets them otherwise is not."""
    from cfmae_cli.api.resuming import start_or_resume
    from cfmae_cli.checkpoints import save_checkpoint
    from cfmae_cli.config import load_config

    cfg = load_config("demo", TINY_OVERRIDES)
    stored = cfg.model_dump(mode="json")
    stored["data"]["root"] = str(tiny_data)
    del stored["model"]["grad_checkpointing"]  # a run written before the key existed
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", {"model": {}, "config": stored, "task": "pretrain",
                                                                   "epoch": 1})
    assert start_or_resume("pretrain", cfg, tmp_path / "nothing") is None
    resumed = start_or_resume("pretrain", cfg, tmp_path / "run")
    assert resumed.data.root == str(tiny_data) and resumed.model.grad_checkpointing is False
    other = load_config("demo", [*TINY_OVERRIDES, f"data.root={tmp_path}"])
    with pytest.raises(CfmaeError, match="config differs in data.root"):
        start_or_resume("pretrain", other, tmp_path / "run")
    on = load_config("demo", [*TINY_OVERRIDES, "model.grad_checkpointing=true"])  # may change on resume
    assert start_or_resume("pretrain", on, tmp_path / "run").model.grad_checkpointing is True


def test_resume_refuses_a_hub_spec_and_eval_only_asks_where_to_write(tmp_path: Path) -> None:
    code, output = invoke("pretrain", "--resume", "hf-hub:me/run")
    assert code == 2 and "--resume hf-hub:me/run: continues a run in its local folder" in output, output
    code, output = invoke("finetune", "--resume", "hf-hub:me/run")
    assert code == 2 and "give them as --checkpoint hf-hub:me/run" in output, output
    code, output = invoke("finetune", "--eval-only", "-c", "hf-hub:me/ft")
    assert code == 2 and "say where the results go with --out FILE.json" in output, output
