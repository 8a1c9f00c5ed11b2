"""The contract between the engine and its tasks (cfmae_cli/train/task.py): the base task keeps the best
validation numbers for every kind of fine-tuning, and the run plan is one typed record."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cfmae_cli.config import batch_plan, load_config
from cfmae_cli.eval.classification import ClassificationTask
from cfmae_cli.eval.detection import DetectionTask
from cfmae_cli.eval.segmentation import SegmentationTask
from cfmae_cli.train.pretraining import PretrainTask
from cfmae_cli.train.setup import make_plan
from cfmae_cli.train.task import Plan, Task


class Validating(Task):
    best_metric, best_also = "top1", ("top5",)

    def __init__(self) -> None:
        self.start_best()


def test_best_follows_the_metric_and_survives_a_checkpoint() -> None:
    task = Validating()
    seen = []
    for done, (top1, top5) in enumerate([(10.0, 50.0), (30.0, 60.0), (20.0, 90.0)], start=1):
        record = task.track_best({"top1": top1, "top5": top5}, done)
        seen.append((record, task.extra_checkpoints({})))
    assert seen[0] == ({"best_top1": 10.0, "best_epoch": 1}, ["best.pt"])
    assert seen[1] == ({"best_top1": 30.0, "best_epoch": 2}, ["best.pt"])
    # epoch 3 is worse on the followed metric, however good its top-5: no best.pt, the best stays epoch 2's
    assert seen[2] == ({"best_top1": 30.0, "best_epoch": 2}, [])
    assert task.best == {"top1": 30.0, "top5": 60.0, "epoch": 2}

    resumed = Validating()
    assert resumed.best["top1"] == -math.inf
    resumed.load_state_dict(task.state_dict())
    assert resumed.best == task.best
    # a tie is not an improvement (the first epoch to reach a value keeps best.pt)
    assert resumed.track_best({"top1": 30.0, "top5": 99.0}, 4) == {"best_top1": 30.0, "best_epoch": 2}
    assert resumed.extra_checkpoints({}) == []


def test_a_task_without_validation_keeps_no_best() -> None:
    task = Task()
    assert task.extra_checkpoints({"loss": 1.0}) == [] and task.state_dict() == {}
    task.load_state_dict({"best": {"top1": 5.0}})  # a checkpoint's key that means nothing to this task
    assert not hasattr(task, "best")


@pytest.mark.parametrize("kind, metric", [(ClassificationTask, "top1"), (SegmentationTask, "mIoU"),
                                          (DetectionTask, "AP_box"), (PretrainTask, None)])
def test_each_task_names_the_number_best_pt_follows(kind: type[Task], metric: str | None) -> None:
    assert kind.best_metric == metric


def test_the_plan_is_the_batch_rule_plus_the_step_counts(tmp_path: Path) -> None:
    cfg = load_config("demo", ["train.batch_size=8", "optim.effective_batch=32", "train.epochs=3",
                               "optim.warmup_epochs=1", "train.threads=1", "data.num_workers=0"])
    plan = make_plan(cfg, 100, 2)
    rule = batch_plan(cfg.optim, cfg.train, 2)
    assert isinstance(plan, Plan)
    assert (plan.devices, plan.accumulation_steps, plan.effective_batch, plan.lr) == \
        (rule["devices"], rule["accumulation_steps"], rule["effective_batch"], rule["lr"]) == (2, 2, 32, rule["lr"])
    assert (plan.images, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (100, 3, 9, 3)
    assert (plan.threads, plan.workers) == (1, 0)
