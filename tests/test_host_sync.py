"""No host sync in a training step (issue 29): the host must queue a step's work on the GPU and go on, not wait
for it. On a GPU, CUDA's own check (``torch.cuda.set_sync_debug_mode("error")``) runs the step; on a CPU, a
dispatcher mode records every operation that would wait for a GPU: reading a value back (``.item()``,
``bool()``, ``int()``), a data-dependent shape (``nonzero``, boolean indexing, ``masked_select``) and a tensor
made from host data (``torch.tensor(list)``, ``from_numpy``: a blocking copy to a GPU). ``.tolist()`` does not
pass through the dispatcher, so the CPU check cannot see it (the CUDA one does)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cfmae_cli.config import load_config
from cfmae_cli.model import losses
from cfmae_cli.train.engine import Engine
from cfmae_cli.train.pretraining import pretrain
from tests.conftest import make_dataset, TINY_OVERRIDES

WAITS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
         "aten.lift_fresh.default", "aten.unique_consecutive.default", "aten._unique2.default"}
#: torch's own Python code is not checked on a CPU: there its reference AdamW reads its step counter back, where
#: on a GPU the fused AdamW (train/optim.py) keeps it on the device, which the CUDA test checks
TORCH = str(Path(torch.__file__).parent)
DISPATCH = tuple(f"{TORCH}/{part}" for part in ("_compile.py", "_dynamo/", "utils/_python_dispatch.py"))
#: (module, function) of the package that may make a tensor from host data in the step, and why it is no wait
ALLOWED = {("masking.py", "budgets"): "a seeded run's Dirichlet draw comes from NumPy (exact across devices) and "
                                      "goes to the device with non_blocking=True: no stream sync"}


class HostWaits(TorchDispatchMode):
    """Records (op, 'module.py:function:line') of each operation that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        boolean_index = name.startswith("aten.index.") and any(
            isinstance(a, (list, tuple)) and any(torch.is_tensor(t) and t.dtype == torch.bool for t in a)
            for a in args)
        if name in WAITS or boolean_index:
            stack = traceback.extract_stack()[:-1]  # (without this method)
            while stack and stack[-1].filename.startswith(DISPATCH):  # the frames that called this mode
                stack.pop()
            if stack and not stack[-1].filename.startswith(TORCH):  # torch's own Python (the optimizer: see below)
                ours = [f for f in stack if "cfmae_cli" in f.filename]
                self.found.append((name, Path(ours[-1].filename).name, f"{ours[-1].name}:{ours[-1].lineno}") if ours
                                  else (name, "?", "?"))
        return func(*args, **(kwargs or {}))


def run_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str = "cpu") -> list[tuple[str, str, str]]:
    """A tiny pre-training of 8 optimizer steps through every phase of the curriculum, each micro-batch after
    the first (which makes the optimizer's state) recorded; → the waits not in :data:`ALLOWED`."""
    data = make_dataset(tmp_path / "data", n_per_class=8)
    cfg = load_config("demo", TINY_OVERRIDES + [f"data.root={data}", "train.epochs=1", "train.batch_size=2",
                                                "optim.effective_batch=2", "optim.warmup_epochs=0",
                                                "train.monitor.enabled=false", "train.threads=1",
                                                f"train.device={device}", "train.log_every=100"])
    recorder, calls = HostWaits(), []
    real = Engine.micro_batch

    def recorded(self: Engine, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            return real(self, *args, **kwargs)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        with recorder:
            return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "micro_batch", recorded)
    pretrain(cfg, out=tmp_path / "run")
    assert len(calls) == 8
    return [w for w in recorder.found if (w[1], w[2].split(":")[0]) not in ALLOWED]


def test_the_training_step_does_not_wait_for_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_recorded(tmp_path, monkeypatch) == []


def test_the_check_finds_a_value_read_back_in_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = losses.image_loss

    def reads_back(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if loss.item() < 0:  # the kind of line that slips in: a Python branch on a tensor's value
            raise AssertionError("a loss is never negative")
        return loss

    monkeypatch.setattr(losses, "image_loss", reads_back)
    waits = run_recorded(tmp_path, monkeypatch)
    # found, and placed where the package called the patched loss
    assert waits and {w[:2] for w in waits} == {("aten._local_scalar_dense.default", "losses.py")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA's own sync check")
def test_the_training_step_does_not_sync_on_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_recorded(tmp_path, monkeypatch, device="cuda")  # set_sync_debug_mode("error") raises on any sync
