"""What a cluster does that a laptop does not (issue 29, item 4), where a CPU can show it: ``srun`` without
torchrun is refused before anything is written; a resumed run restores the CUDA RNG of its own GPU whatever
the number of GPUs it sees now; the k-NN monitor says what it holds out of pre-training, and on an
ImageNet-sized class list how to keep it in."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli.checkpoints import rng_state, set_rng_state
from cfmae_cli.cli import app
from cfmae_cli.config import load_config
from cfmae_cli.data.samples import SampleTable
from cfmae_cli.train.monitor import monitor_samples
from tests.conftest import make_dataset, TINY_OVERRIDES

SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]


def test_srun_without_torchrun_is_refused_before_anything_is_written(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "3")
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *SETS])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "task 3 of 8 without torchrun" in text and "srun --ntasks-per-node=1 torchrun" in text, text
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_one_srun_task_and_torchrun_workers_are_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from cfmae_cli.train.distributed import refuse_bare_srun

    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # srun -n 1 cfmae pretrain --gpus 8: one launcher
    refuse_bare_srun()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun torchrun ...: torchrun's workers have RANK
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    refuse_bare_srun()


def test_the_cuda_rng_of_this_process_gpu_is_restored_whatever_the_gpus_seen(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """A process on cuda:1 (LOCAL_RANK 1). Its checkpoint holds its own GPU's state; one written before issue 29
    holds every visible GPU's: the state of cuda:1 is taken from it, and a list from a process that saw fewer
    GPUs than this one's index is no IndexError (restoring every visible GPU's state was one)."""
    restored: list[tuple[list[int], int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": restored.append((state.tolist(), device)))
    state = rng_state()
    set_rng_state(state)
    assert restored == [([7] * 4, 1)]
    every_gpu = dict(state, cuda=[torch.full((4,), k, dtype=torch.uint8) for k in range(8)])
    set_rng_state(every_gpu)
    assert restored[-1] == ([1] * 4, 1)
    set_rng_state(dict(state, cuda=[torch.zeros(4, dtype=torch.uint8)]))  # saved where one GPU was visible
    assert len(restored) == 2


def _samples(classes: int, per_class: int) -> tuple[SampleTable, list[str]]:
    names = [f"n{k:08d}" for k in range(classes)]
    files = [(k, [f"{i:04d}.JPEG" for i in range(per_class)]) for k in range(classes)]
    return SampleTable.from_folders(Path("/data/rgb"), Path("/data"), (), names, files), names


@pytest.mark.parametrize("classes, advice", [(3, False), (100, True)])
def test_the_monitor_says_what_it_holds_out(classes: int, advice: bool, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("demo", ["train.monitor.val_fraction=0.2"])
    samples, names = _samples(classes, 40)
    with caplog.at_level(logging.INFO, logger="cfmae_cli.train.monitor"):
        picked = monitor_samples(cfg, None, samples, names)
    assert picked is not None
    kept, _, val, _ = picked
    assert kept is not None and len(kept) + len(val) == len(samples)
    text = caplog.text
    assert f"{len(val)} of the {len(samples)} images (train.monitor.val_fraction 0.2 of each class) are held out" \
        in text
    assert ("--monitor-data FOLDER" in text) == advice


def _peer_worker(rank: int, port: int, results) -> None:  # noqa: ANN001 - a multiprocessing queue
    """Rank 0 writes a checkpoint for longer than the peer timeout (1 s), which both wait for; then rank 1 stops
    answering (a lost node) and rank 0 asks for the step's flags."""
    import os
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CFMAE_PEER_TIMEOUT="1")
    from cfmae_cli.train import distributed

    distributed.WRITE_RATE = 1 << 20  # a 1 MiB/s disk: 30 MiB x 2 files are given a minute
    info = distributed.init(torch.device("cpu"))
    if rank == 0:
        time.sleep(1.5)  # the write, longer than the peer timeout
    distributed.wait_for_main(info, 30 << 20, 2)
    results.put((rank, "waited"))
    results.put((rank, distributed.any_rank(rank == 1, info)))  # a flag of one rank reaches all
    if rank == 1:
        time.sleep(120)  # stops answering; ended by the test
    try:
        distributed.any_rank(False, info)
        results.put((rank, "no error"))
    except distributed.PeerLost as exc:
        results.put((rank, str(exc)))


def test_a_lost_peer_fails_the_step_and_a_long_checkpoint_write_is_waited_for() -> None:
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")  # (torch is imported already: no start-up cost)
    results = ctx.Queue()
    procs = [ctx.Process(target=_peer_worker, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=90) for _ in range(5)]  # (a guard against a hang, not a speed limit)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert sorted(x for x in got if x[1] == "waited") == [(0, "waited"), (1, "waited")]
    assert sorted(x for x in got if isinstance(x[1], bool)) == [(0, True), (1, True)]
    message = next(text for rank, text in got if rank == 0 and isinstance(text, str) and text != "waited")
    assert "did not answer within 1 s (CFMAE_PEER_TIMEOUT)" in message and "--resume" in message, message


def test_the_checkpoint_wait_is_sized_for_the_state() -> None:
    from cfmae_cli.checkpoints import state_bytes

    model = torch.nn.Linear(100, 10)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 100)).sum().backward()
    opt.step()
    assert state_bytes(model.state_dict(), opt.state_dict()) == 3 * 1010 * 4 + 2 * 4  # weights, 2 moments, steps


def test_the_launcher_gives_its_workers_the_shutdown_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch elastic's agent waits ``shutdown_timeout`` between SIGTERM and SIGKILL (default 30 s); the value of
    :func:`launch` must reach the agent that torch.distributed.run builds (stopped there, before any worker)."""
    import torch.distributed.launcher.api as launcher_api

    from cfmae_cli.train import distributed

    seen: list[int] = []

    class Agent:
        def __init__(self, *args: object, shutdown_timeout: int = 30, **kwargs: object) -> None:
            seen.append(shutdown_timeout)
            raise KeyboardInterrupt  # no workers

    monkeypatch.setattr(launcher_api, "LocalElasticAgent", Agent)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    with pytest.raises(KeyboardInterrupt):
        distributed.launch(["--version"], 1)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")
    with pytest.raises(KeyboardInterrupt):
        distributed.launch(["--version"], 1)
    assert seen == [distributed.SHUTDOWN_TIMEOUT, 900] and distributed.SHUTDOWN_TIMEOUT >= 120


def test_fp32_on_a_gpu_runs_tf32_and_bf16_leaves_it(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from cfmae_cli.train.distributed import precision_for

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        assert precision_for("auto", torch.device("cuda")) is True
        assert precision_for("fp32", torch.device("cpu")) is False
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        with caplog.at_level(logging.INFO, logger="cfmae_cli.train.distributed"):
            assert precision_for("fp32", torch.device("cuda")) is False
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        assert "fp32 (train.precision fp32) with TF32" in caplog.text
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def _torchrun_worker(monkeypatch: pytest.MonkeyPatch, job: str, restart: int) -> None:
    """This process as the only worker of a torchrun job (``--nproc-per-node 1``), attempt ``restart``."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": job,
                       "TORCHELASTIC_RESTART_COUNT": str(restart)}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)


def test_a_torchrun_restart_resumes_its_own_run_and_a_foreign_folder_is_still_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from cfmae_cli.train import engine

    data = make_dataset(tmp_path / "data", n_per_class=2)  # 4 images: one step an epoch
    args = lambda out: ["pretrain", "--data", str(data), "--out", str(out), *SETS,  # noqa: E731
                        "--set", "train.plot_every=1000", "--set", "train.threads=1"]
    steps = lambda out: [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                         if r["type"] == "step"]
    monkeypatch.chdir(tmp_path)
    _torchrun_worker(monkeypatch, "job-1", 0)
    assert CliRunner().invoke(app, args(tmp_path / "unbroken")).exit_code == 0
    calls = []

    def node_lost(*a: object, **k: object) -> None:  # after epoch 1's checkpoint: the node goes away
        calls.append(1)
        raise RuntimeError("the node went away")

    with monkeypatch.context() as m:
        m.setattr(engine, "plot_losses", node_lost)
        broken = CliRunner().invoke(app, args(tmp_path / "run"))
    assert broken.exit_code == 1 and calls == [1], broken.output
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    _torchrun_worker(monkeypatch, "job-1", 1)  # torchrun --max-restarts: the same command again
    again = CliRunner().invoke(app, args(tmp_path / "run"))
    assert again.exit_code == 0, again.output
    assert "torchrun restart 1 of job job-1" in (tmp_path / "run/log.txt").read_text()
    a, b = steps(tmp_path / "run"), steps(tmp_path / "unbroken")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert (x["loss"], x["lr"]) == pytest.approx((y["loss"], y["lr"]), rel=1e-6, abs=1e-7)
    _torchrun_worker(monkeypatch, "job-2", 1)  # another job's restart: not its run
    other = CliRunner().invoke(app, args(tmp_path / "run"))
    assert other.exit_code == 2 and "holds a run" in " ".join(other.output.split()), other.output
    _torchrun_worker(monkeypatch, "job-1", 0)  # a first attempt into a folder with a run: refused as ever
    first = CliRunner().invoke(app, args(tmp_path / "run"))
    assert first.exit_code == 2 and "holds a run" in " ".join(first.output.split()), first.output


def test_sigterm_during_the_monitor_skips_it_and_the_epoch_is_saved(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to every process of the run (as SLURM sends it) while the k-NN monitor of epoch 1 embeds: its
    DataLoader workers survive it, the monitor is skipped, epoch 1's checkpoint is written, and the run stops
    there with 143 (before, the workers died and the epoch was lost)."""
    import json
    import multiprocessing
    import os
    import signal

    from cfmae_cli.train import monitor
    from tests.test_monitor import labelled_folder

    data, labelled = make_dataset(tmp_path / "data", n_per_class=2), labelled_folder(tmp_path / "labelled", 4)
    embeds, real_embed, real_normalise = [], monitor.KnnMonitor.embed, monitor.normalise_on_device

    def embed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        embeds.append(1)
        return real_embed(self, *args, **kwargs)

    def normalise(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(embeds) == 3 and not embeds.count(0):  # the first batch of epoch 1's bank (epoch 0 embeds 2 sets)
            embeds.append(0)
            for child in multiprocessing.active_children():  # the DataLoader workers
                os.kill(child.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_normalise(*args, **kwargs)

    monkeypatch.setattr(monitor.KnnMonitor, "embed", embed)
    monkeypatch.setattr(monitor, "normalise_on_device", normalise)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--monitor-data",
                                      str(labelled), *SETS, "--set", "data.num_workers=1", "--set",
                                      "train.monitor.batch_size=2", "--set", "train.monitor.every=1",
                                      "--set", "train.threads=1"])
    assert result.exit_code == 128 + signal.SIGTERM, (result.output, result.exception)
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert (state["epoch"], state["next_step"]) == (1, 0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "monitor"] == [0]  # epoch 1's was skipped
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1]
    assert "k-NN monitor skipped: SIGTERM received" in (out / "log.txt").read_text()
    # the skipped monitor's workers (which ignore SIGTERM) are shut down, not left for the interpreter's exit to
    # terminate: it would wait on them for ever (a run that stopped with 143 and never exited)
    assert multiprocessing.active_children() == []


def test_torchrun_restarts_without_out_are_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --out every restart would claim a new runs/pretrain/<name>-k and start from epoch 0."""
    data = make_dataset(tmp_path / "data", n_per_class=2)
    monkeypatch.chdir(tmp_path)
    _torchrun_worker(monkeypatch, "job-1", 0)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), *SETS])
    assert result.exit_code == 2 and "--max-restarts 3 without --out" in result.output, result.output
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # torchrun's default: a run of its own is fine
    assert CliRunner().invoke(app, ["pretrain", "--data", str(data), *SETS, "--set", "train.plot_every=1000",
                                    "--set", "train.threads=1"]).exit_code == 0
