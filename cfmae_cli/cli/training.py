"""What the training commands (``pretrain``, ``finetune``) share: option checks, ``--resume`` config checks,
running in this process or launching one worker per device, and reporting the end of a run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import typer
from rich.markup import escape

from cfmae_cli.checkpoints import checkpoint_path, load_checkpoint
from cfmae_cli.cli.common import console, is_terminal
from cfmae_cli.cli.progress import TrainingView
from cfmae_cli.config import (RESUMABLE_CHANGES, batch_plan, check_weights_file, Config, config_diff, config_from_dict,
                              deep_merge, dump_config, load_config, parse_override, with_legacy_defaults)
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import need_folder
from cfmae_cli.train import distributed
from cfmae_cli.train.engine import TrainingDiverged
from cfmae_cli.train.faults import Preempted
from cfmae_cli.train.rundir import claimed_run_dir, held
from cfmae_cli.train.setup import dataset_root, fitting_batch

Runner = Callable[..., dict[str, Any]]


def run_overrides(set_: list[str], data: Optional[Path], epochs: Optional[int], seed: Optional[int],
                  gpus: Optional[int], procs: int, resume: Optional[Path], out: Optional[Path]) -> list[str]:
    """The ``--set`` list with the shortcut options added; refuses combinations that make no sense."""
    overrides = list(set_)
    if data is not None:
        need_folder(data, "--data")
        overrides.append(f"data.root={data.resolve()}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if gpus is not None:
        overrides.append(f"train.device={'cuda' if gpus > 0 else 'cpu'}")
    if procs > 1 and gpus != 0:
        raise CfmaeError(f"--procs {procs}: CPU processes need --gpus 0 (with GPUs, --gpus N starts one process "
                         f"per GPU).")
    if resume is not None and out is not None:
        raise CfmaeError("--resume continues a run in its own folder; it takes no --out.")
    return overrides


def resumed_config(resume: Path, preset: Optional[str], overrides: list[str], schema: type[Any] = Config,
                   mode: Optional[str] = None) -> Any:
    """The run's own config; refused (exit 2, the keys listed) if the options given would change it."""
    path = checkpoint_path(resume)
    check_weights_file(path)  # sizes and shapes, before anything is built
    ckpt = load_checkpoint(path, mmap=True)
    task = ckpt.get("task")  # (a file without it predates the key: not checked)
    if task is not None and task != schema.TASK:
        run = path.parent.parent if path.parent.name == "checkpoints" else path
        raise CfmaeError(f"--resume {resume}: a run of `cfmae {task}`, not of `cfmae {schema.TASK}`; continue it "
                         f"with `cfmae {task} --resume {run}`.")
    saved = with_legacy_defaults(ckpt["config"], schema)
    base = load_config(preset, schema=schema, mode=mode).model_dump(mode="json") if preset else saved
    if mode is not None:
        base = deep_merge(base, {"mode": mode})
    for item in overrides:
        keys, value = parse_override(item)
        patch: Any = value
        for key in reversed(keys):
            patch = {key: patch}
        base = deep_merge(base, patch)
    wanted = config_from_dict(base, "--resume with the options given", schema)
    changed = [k for k in config_diff(saved, wanted.model_dump(mode="json")) if k not in RESUMABLE_CHANGES]
    if changed:
        raise CfmaeError(f"--resume {resume}: the options given change the run's config ({', '.join(changed)}). "
                         f"A resumed run keeps its config; start a new run instead.")
    return wanted


def demo_preset_notice(name: str, what: str, real: str) -> None:
    """``--data`` without ``--preset``: say that the demo preset trains on the user's data, and what to use."""
    console.print(f"note: --data without --preset trains the '{name}' preset ({what}) on your data; for real "
                  f"work give --preset {real} (cfmae presets lists them all).", highlight=False)


STEPS_PER_EPOCH = 8  # the fewest optimizer steps an epoch of a demo preset takes on the user's own data


def fit_to_data(cfg: Any, images: int, source: str, overrides: list[str], world: int) -> tuple[Any, str]:
    """A demo preset scaled to the user's ``images`` training images (``--data`` without ``--preset``): a batch
    that gives an epoch at least :data:`STEPS_PER_EPOCH` optimizer steps (a power of two, at most the preset's),
    the effective batch equal to it (no accumulation), and a warm-up of at most a tenth of the run. Keys given
    with ``--set`` are kept. Returns the config (validated whole) and a sentence saying what was chosen."""
    given = {item.split("=", 1)[0].strip() for item in overrides}
    optim, train = cfg.optim.model_dump(), cfg.train.model_dump()
    said = []
    if not {"train.batch_size", "optim.effective_batch"} & given:
        batch = fitting_batch(images, world, STEPS_PER_EPOCH, cfg.train.batch_size)
        if batch != cfg.train.batch_size or batch * world != cfg.optim.effective_batch:
            train["batch_size"], optim["effective_batch"] = batch, batch * world
            said.append(f"train.batch_size {batch} and optim.effective_batch {batch * world} "
                        f"({images // (batch * world)} steps per epoch)")
    if "optim.warmup_epochs" not in given and cfg.optim.warmup_epochs > 0.1 * cfg.train.epochs:
        optim["warmup_epochs"] = round(0.1 * cfg.train.epochs, 2)
        said.append(f"optim.warmup_epochs {optim['warmup_epochs']:g} (a tenth of its {cfg.train.epochs} epochs)")
    cfg = type(cfg).model_validate({**cfg.model_dump(), "optim": optim, "train": train})  # checked as a whole
    what = f"scaled to the {images} training images of {source}: " + "; ".join(said) if said else \
        f"the preset's batch and warm-up fit the {images} training images of {source}"
    return cfg, what


def own_data_run(data: Path, out: Optional[Path], name: str) -> tuple[str, str]:
    """The run name for ``--data`` without ``--preset`` (the data folder's), and the words that say where the run
    goes: ``--out`` when given, else the folder named after the data."""
    name = data.resolve().name or name
    return name, (f"the run goes to {out}" if out is not None else f"the run is named after the data: {name}")


def complete_run(resume: Path, cfg: Any) -> int | None:
    """The epochs done, when the run of ``resume`` has finished all of ``cfg``'s epochs (else None)."""
    ckpt = load_checkpoint(checkpoint_path(resume), mmap=True)
    done = int(ckpt.get("epoch", 0))
    return done if done >= cfg.train.epochs and not ckpt.get("next_step") else None


def dispatch(command: str, cfg: Any, run: Runner, done: Callable[[dict[str, Any]], str], *, out: Optional[Path],
             name: str, resume: Optional[Path], gpus: Optional[int], procs: int, extra_args: list[str],
             before_refusal: Callable[[int], None] | None = None) -> None:
    """Train in this process, or launch one worker process per device (each calls this command again). A
    resumed run that is already complete is said so, and nothing is touched."""
    if resume is not None and (finished := complete_run(resume, cfg)) is not None:
        folder = checkpoint_path(resume).parent.parent
        if int(os.environ.get("RANK", "0")) == 0:
            console.print(f"{folder}: the run is complete ({finished} of {cfg.train.epochs} epochs); nothing to do, "
                          f"nothing in it was changed.", highlight=False)
        return
    if distributed.under_launcher():  # a worker of torchrun / torch.distributed.run
        return train_here(command, run, done, out=out, name=name, resume=resume)
    distributed.refuse_bare_srun()  # (before any worker is launched or folder claimed)
    world = gpus if gpus else (procs if gpus == 0 else 1)
    if gpus and gpus > torch.cuda.device_count():
        if before_refusal is not None:
            before_refusal(gpus)
        raise CfmaeError(f"--gpus {gpus}: torch sees {torch.cuda.device_count()} GPU(s) on this machine. Use "
                         f"--gpus {torch.cuda.device_count()} (0 = CPU, with --procs N for N CPU processes), or "
                         f"launch on a GPU node.")
    if gpus == 0 and procs > 1 or gpus and gpus > 1:
        return launch(command, cfg, out, name, resume, extra_args, world, gpus, procs)
    return train_here(command, run, done, out=out, name=name, resume=resume)


def train_here(command: str, run: Runner, done: Callable[[dict[str, Any]], str], *, out: Optional[Path], name: str,
               resume: Optional[Path]) -> None:
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        with TrainingView(console, interactive=is_terminal() and main) as view:
            summary = run(out=out, name=name, resume=resume, on_progress=view.update)
    except TrainingDiverged as exc:
        console.print(f"[bold red]stopped:[/] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    except Preempted as exc:
        if main:
            console.print(f"{exc}. Continue with: cfmae {command} --resume {Path(exc.checkpoint).parent.parent}",
                          highlight=False)
        raise typer.Exit(128 + exc.signum) from None
    if main:
        console.print(done(summary), highlight=False)
        if not distributed.launched_by_parent():  # the launching process prints the last line itself
            console.print(f"Run folder: {summary['run_dir']}", highlight=False)


def launch(command: str, cfg: Any, out: Optional[Path], name: str, resume: Optional[Path], extra_args: list[str],
           world: int, gpus: Optional[int], procs: int) -> None:
    """Start ``world`` local workers through torch.distributed.run with the resolved config in a file (checked
    here first, so that a config the workers would refuse is said once, without the launcher's noise)."""
    batch_plan(cfg.optim, cfg.train, world)
    if cfg.data.root is None:  # build the demo data once, before the workers look for it
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(dataset_root(cfg))})})
    fd, config_file = tempfile.mkstemp(prefix="cfmae-launch-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        fh.write(dump_config(cfg))
    args = [command, "--preset", config_file, "--gpus", str(gpus or 0), "--procs", str(procs)]
    try:
        with contextlib.ExitStack() as stack:  # the launcher holds the run folder for its workers' whole life
            if resume is not None:
                run_dir = stack.enter_context(held(checkpoint_path(resume).parent.parent))
                args += ["--resume", str(resume)]
            else:
                run_dir = stack.enter_context(claimed_run_dir(command, name, out))
                args += ["--out", str(run_dir)]
            console.print(f"launching {world} worker process(es) ({'gloo, CPU' if not gpus else 'NCCL, one GPU each'})",
                          highlight=False)
            code = distributed.launch(args + extra_args, world)
    finally:
        os.unlink(config_file)
    if code:
        raise typer.Exit(code)
    console.print(f"Run folder: {run_dir}", highlight=False)
