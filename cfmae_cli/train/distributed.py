"""``torch.distributed`` plumbing: process-group set-up from the launcher's environment, local launch
through ``torch.distributed.run`` (elastic), and the few collectives the engine needs.

Under ``torchrun`` / ``torch.distributed.run`` / SLURM-with-torchrun, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set; without them the run is a single process.
NCCL on GPUs (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cfmae_cli.errors import CfmaeError
from cfmae_cli.procs import die_with_parent

log = logging.getLogger(__name__)
LAUNCHED_ENV = "CFMAE_LAUNCHED_BY_PARENT"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # a gloo group for CPU-side flags (no GPU stream sync), 24 h timeout
    bf16: bool = False  # autocast to bf16 (decided once per run: :func:`uses_bf16`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run autocasts to bf16: on a GPU, unless ``train.precision`` is fp32."""
    return device.type == "cuda" and precision in ("auto", "bf16")


def under_launcher() -> bool:
    """Whether this process was started by torchrun / torch.distributed.run (or an equivalent launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def refuse_bare_srun() -> None:
    """Stop a process that ``srun`` started as one of several tasks of a step without torchrun: each task would
    be a run of its own (all on cuda:0, all claiming the same ``--out``). Slurm sets ``SLURM_STEP_NUM_TASKS``
    in the processes of an ``srun`` step (not in the batch script itself); torchrun sets ``RANK``."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and not under_launcher():
        raise CfmaeError(f"srun started this command as task {os.environ.get('SLURM_PROCID', '?')} of {tasks} "
                         f"without torchrun: each task would train on its own, every one on the same GPU and into "
                         f"the same run folder. Start one task per node that runs torchrun: srun "
                         f"--ntasks-per-node=1 torchrun --nnodes $SLURM_JOB_NUM_NODES --nproc-per-node GPUS "
                         f"--rdzv-backend c10d --rdzv-endpoint HEAD:29500 -m cfmae_cli ... (docs/distributed.md, "
                         f"SLURM), or on one node a single task with --gpus GPUS.")


def init(device: torch.device) -> DistInfo:
    """Join the process group described by the environment (no-op for a single process).

    ``device`` is the device type chosen by the config; on CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    refuse_bare_srun()
    if not under_launcher() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(0, 1, 0, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    # CPU-side flags and the end-of-job barrier: gloo, and patient (ranks may finish hours apart)
    control = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    log.debug("rank %d/%d joined (%s)", rank, world, dist.get_backend())
    return DistInfo(rank, world, local, device, control)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place); the identity for one process."""
    if info.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world
    return values


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on any rank (all ranks get the same answer). A CPU tensor over gloo, so
    asking every step does not wait for the GPU."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    return bool(t.item())


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj, group=info.control)
    return out


def launch(child_args: list[str], nprocs: int) -> int:
    """Run ``python -m cfmae_cli <child_args>`` in ``nprocs`` local processes through
    ``torch.distributed.run`` (elastic launch, standalone rendezvous on this machine, no restarts).

    Returns 0, the exit code of the first worker that failed (its own message is already printed), or
    128 + signal when the launcher itself was stopped by SIGTERM / SIGINT (the workers save first).
    """
    # heavy: torch.distributed.run (+0.25 s) only for a multi-process launch
    from torch.distributed.elastic.multiprocessing.api import SignalException  # heavy: see above
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # heavy: see above
    from torch.distributed.run import parse_args, run  # heavy: see above

    args = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nprocs), "--max-restarts", "0",
                       "-m", "cfmae_cli", *child_args])
    os.environ[LAUNCHED_ENV] = str(os.getpid())  # the workers' parent: they end with it (die_with_launcher)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        return next((c for c in codes if c not in (0, None)), 1)
    except SignalException as exc:  # the launcher was signalled: the workers got the signal and saved
        return 128 + int(exc.sigval)
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0


def launched_by_parent() -> bool:
    """Whether this worker was started by :func:`launch` (whose process prints the closing line itself)."""
    return bool(os.environ.get(LAUNCHED_ENV))


def die_with_launcher() -> bool:
    """In a worker that :func:`launch` started, ask the kernel to end it when the launcher ends, even by
    SIGKILL (which the launcher cannot pass on): no orphan keeps training, holding a GPU or writing files.

    The launcher is the worker's parent: torch elastic's agent runs in the launcher's main thread and starts
    each worker there with ``Popen`` (``start_new_session``: a new session, out of reach of the terminal's
    Ctrl-C, which the launcher passes on itself). A worker whose parent is already gone exits at once. Returns
    whether the request took effect (not on systems without ``prctl``, or outside such a worker)."""
    parent = os.environ.get(LAUNCHED_ENV, "")
    if not parent.isdigit():  # not ours (torchrun by hand, SLURM): their launchers manage their workers
        return False
    return die_with_parent(int(parent))
