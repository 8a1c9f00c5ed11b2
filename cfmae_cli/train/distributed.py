"""``torch.distributed`` plumbing: process-group set-up from the launcher's environment, local launch
through ``torch.distributed.run`` (elastic), and the few collectives the engine needs.

Under ``torchrun`` / ``torch.distributed.run`` / SLURM-with-torchrun, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set; without them the run is a single process.
NCCL on GPUs (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPUs.
"""

from __future__ import annotations

import logging
import math
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
PEER_TIMEOUT_ENV = "CFMAE_PEER_TIMEOUT"  # seconds a rank waits for the others at a step's flags (default 300)
PEER_TIMEOUT = 300
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torch elastic's own: SIGTERM → SIGKILL grace of workers
SHUTDOWN_TIMEOUT = 300  # the grace :func:`launch` gives its workers unless that variable says otherwise
WRITE_RATE = 20 << 20  # bytes/s: the slowest checkpoint write (a busy network file system) a wait is sized for


class PeerLost(RuntimeError):
    """Another process of the job did not answer in time, or its connection closed: it (or its node) is gone or
    hung. The job stops; it continues from the last checkpoint (``--resume``, or torchrun ``--max-restarts``)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # a patient gloo group (24 h): barriers where ranks may arrive far apart (cfmae label)
    flags: Any = None  # a gloo group for per-step CPU-side flags (no GPU stream sync): :func:`peer_timeout`
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


def precision_for(precision: str, device: torch.device) -> bool:
    """The run's precision, decided once (``info.bf16``): bf16 autocast (:func:`uses_bf16`), or fp32 — which on a
    GPU runs its matmuls and convolutions in TF32 (Ampere and later; ~8x the fp32 rate, a 10-bit mantissa in the
    products, fp32 sums), as torch leaves off by default for matmuls. Logged here, once per run."""
    bf16 = uses_bf16(precision, device)
    if device.type == "cuda" and not bf16:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (torch.backends.cuda.matmul)
        torch.backends.cudnn.allow_tf32 = True  # TF32 convolutions (the patch embedding)
        log.info("precision: fp32 (train.precision %s) with TF32 matmuls and convolutions", precision)
    return bf16


def peer_timeout() -> timedelta:
    """How long a rank waits for the others at a per-step flag (:func:`any_rank`) before it stops the job:
    ``CFMAE_PEER_TIMEOUT`` seconds, default 300 (NCCL's own watchdog waits 600)."""
    raw = os.environ.get(PEER_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else PEER_TIMEOUT
    except ValueError:
        raise CfmaeError(f"{PEER_TIMEOUT_ENV}={raw!r}: give a number of seconds, e.g. 300.") from None
    if seconds <= 0:
        raise CfmaeError(f"{PEER_TIMEOUT_ENV}={raw!r}: give a number of seconds above 0, e.g. 300.")
    return timedelta(seconds=seconds)


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
    # the end-of-job barrier of cfmae label: gloo, and patient (ranks may finish hours apart)
    control = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    # per-step flags: gloo, and impatient: a lost node fails the next step instead of hanging to the wall limit
    flags = dist.new_group(backend="gloo", timeout=peer_timeout())
    log.debug("rank %d/%d joined (%s)", rank, world, dist.get_backend())
    return DistInfo(rank, world, local, device, control, flags)


def shutdown() -> None:
    _WRITE_GROUPS.clear()
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
    asking every step does not wait for the GPU (0.84 ms between 2 processes on a loaded 2-core machine, against
    a GPU step of 100+ ms; asked every step, so that every rank stops at the same step whenever the signal
    reached it, within the grace before SIGKILL). A rank that does not answer within
    :func:`peer_timeout` (a lost node, a hung or killed worker) fails the step with :class:`PeerLost`."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.flags)
    except RuntimeError as exc:  # gloo: a timeout, or the connection of a dead peer closed
        raise PeerLost(f"rank {info.rank}: the other processes of the job did not answer within "
                       f"{peer_timeout().total_seconds():g} s ({PEER_TIMEOUT_ENV}) or their connection closed: "
                       f"a process or node of the job is gone or hung, so this one stops too; continue from the "
                       f"last checkpoint with --resume (torchrun --max-restarts does it by itself). "
                       f"[{str(exc).strip().splitlines()[0][:200]}]") from None
    return bool(t.item())


def wait_for_main(info: DistInfo, nbytes: int, files: int) -> None:
    """Every rank waits here until rank 0 has written ``files`` checkpoint files of ``nbytes`` each (and comes
    here itself), on a gloo group whose timeout is sized for the write (at :data:`WRITE_RATE`, plus
    :func:`peer_timeout`; gloo's non-zero ranks wait for the group's timeout, not the barrier's), not in an NCCL
    barrier whose 10 min watchdog a slow file system outlasts. What it protects: no rank goes on (into the next
    epoch, or out of the job on a signal, where torchrun would stop rank 0 mid-write) before the checkpoint is
    whole. Rank 0 gone meanwhile: :class:`PeerLost`."""
    if not info.distributed:
        return
    minutes = math.ceil((peer_timeout().total_seconds() + nbytes * files / WRITE_RATE) / 60)
    if minutes not in _WRITE_GROUPS:  # every rank saves at the same points: the same groups, in the same order
        _WRITE_GROUPS[minutes] = dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes))
    try:
        dist.monitored_barrier(group=_WRITE_GROUPS[minutes], timeout=timedelta(minutes=minutes), wait_all_ranks=True)
    except RuntimeError as exc:
        raise PeerLost(f"rank {info.rank}: waited {minutes} min for the checkpoint of rank 0 ({files} file(s) of "
                       f"{nbytes / 2 ** 30:.2f} GiB) and the other processes: one is gone or hung, so this one "
                       f"stops too; continue from the last checkpoint with --resume. "
                       f"[{str(exc).strip().splitlines()[0][:200]}]") from None


_WRITE_GROUPS: dict[int, Any] = {}  # minutes → the gloo group of that timeout (:func:`wait_for_main`)


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
                       "--shutdown-timeout", str(shutdown_timeout()), "-m", "cfmae_cli", *child_args])
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


def shutdown_timeout() -> int:
    """The seconds the workers of :func:`launch` get between SIGTERM and SIGKILL (torch elastic's
    ``--shutdown-timeout``, default 30: too short for a large model to finish its step and write its
    checkpoint): ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` when set, else :data:`SHUTDOWN_TIMEOUT`."""
    raw = os.environ.get(SHUTDOWN_TIMEOUT_ENV, "")
    if not raw:
        return SHUTDOWN_TIMEOUT
    if not raw.isdigit():
        raise CfmaeError(f"{SHUTDOWN_TIMEOUT_ENV}={raw!r}: give a whole number of seconds, e.g. 300.")
    return int(raw)


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
