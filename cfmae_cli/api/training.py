"""The training commands as functions: ``pretrain``, ``finetune`` (and ``evaluate``, fine-tuning's ``--eval-only``).

Each takes what its command takes (the same names, defaults and checks), claims the same run folders, and
returns the run's summary; ``cfmae pretrain`` / ``cfmae finetune`` call them. What a command prints goes
through a :class:`Report` (the library's default logs it); bad input raises :class:`~cfmae_cli.errors.CfmaeError`
(the command's exit 2), a run stopped by a signal :class:`~cfmae_cli.train.faults.Preempted`, a diverged run
:class:`~cfmae_cli.train.engine.TrainingDiverged`, and worker processes that failed :class:`WorkersFailed`.

``resume="auto"`` starts or resumes (:func:`cfmae_cli.api.resuming.start_or_resume`): the command a preemptible job runs every time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cfmae_cli.api.common import (AUTO, Overrides, PathLike, Report, as_set_items, launch_command, run_overrides,
                                  world_of)
from cfmae_cli.api.resuming import auto_run, complete_run, refuse_hub_resume, resumed_config
from cfmae_cli.checkpoints import checkpoint_path
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import MANIFEST_NAME, need_folder


def say_preset_note(report: Report, name: str, what: str, real: str) -> None:
    """``--data`` without ``--preset``: say that the demo preset trains on the user's data, and what to use."""
    report.say(f"note: --data without --preset trains the '{name}' preset ({what}) on your data; for real "
               f"work give --preset {real} (cfmae presets lists them all).")


STEPS_PER_EPOCH = 8  # the fewest optimizer steps an epoch of a demo preset takes on the user's own data


def fit_to_data(cfg: Any, images: int, source: str, overrides: Sequence[str], world: int) -> tuple[Any, str]:
    """A demo preset scaled to the user's ``images`` training images (``--data`` without ``--preset``): a batch
    that gives an epoch at least :data:`STEPS_PER_EPOCH` optimizer steps (a power of two, at most the preset's),
    the effective batch equal to it (no accumulation), and a warm-up of at most a tenth of the run. Keys given
    with ``--set`` are kept. Returns the config (validated whole) and a sentence saying what was chosen."""
    from cfmae_cli.train.setup import fitting_batch

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


def own_data_run(data: Path, out: Optional[PathLike], name: str) -> tuple[str, str]:
    """The run name for ``--data`` without ``--preset`` (the data folder's), and the words that say where the run
    goes: ``--out`` when given, else the folder named after the data."""
    name = data.resolve().name or name
    return name, (f"the run goes to {out}" if out is not None else f"the run is named after the data: {name}")


def check_weights_given(weights: PathLike, flag: str) -> None:
    """A checkpoint option's file exists and its sizes are sane, before torch is imported (docs/export.md)."""
    from cfmae_cli.config import check_weights_file
    from cfmae_cli.hub import weights_exist

    found = checkpoint_path(weights).is_file() if flag == "--resume" else weights_exist(weights)
    if not found:
        raise CfmaeError(f"{flag} {weights}: checkpoint not found (a run folder needs checkpoints/last.pt).")
    check_weights_file(weights)


Runner = Callable[..., dict[str, Any]]


def dispatch(command: str, cfg: Any, run: Runner, report: Report, *, out: Optional[PathLike], name: str,
             resume: Optional[PathLike], gpus: Optional[int], procs: int, extra_args: list[str],
             before_refusal: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train in this process, or launch one worker process per device (each calls the command again). A
    resumed run that is already complete is said so, and nothing is touched. Returns the run's summary (a
    launch: ``run_dir`` and ``world``; a complete run: ``run_dir``, ``epochs`` and ``complete``)."""
    import torch

    from cfmae_cli.train import distributed

    if resume is not None and (finished := complete_run(resume, cfg)) is not None:
        folder = checkpoint_path(resume).parent.parent
        if int(os.environ.get("RANK", "0")) == 0:
            report.say(f"{folder}: the run is complete ({finished} of {cfg.train.epochs} epochs); nothing to do, "
                       f"nothing in it was changed.")
        return {"run_dir": str(folder), "epochs": finished, "complete": True}
    if distributed.under_launcher():  # a worker of torchrun / torch.distributed.run
        return train_here(run, report, out=out, name=name, resume=resume)
    distributed.refuse_bare_srun()  # (before any worker is launched or folder claimed)
    world = world_of(gpus, procs)
    if gpus and gpus > torch.cuda.device_count():
        if before_refusal is not None:
            before_refusal(gpus)
        raise CfmaeError(f"--gpus {gpus}: torch sees {torch.cuda.device_count()} GPU(s) on this machine. Use "
                         f"--gpus {torch.cuda.device_count()} (0 = CPU, with --procs N for N CPU processes), or "
                         f"launch on a GPU node.")
    if gpus == 0 and procs > 1 or gpus and gpus > 1:
        return launch(command, cfg, report, out, name, resume, extra_args, world, gpus, procs)
    return train_here(run, report, out=out, name=name, resume=resume)


def train_here(run: Runner, report: Report, *, out: Optional[PathLike], name: str,
               resume: Optional[PathLike]) -> dict[str, Any]:
    with report.progress() as update:
        return run(out=out, name=name, resume=resume, on_progress=update)


def launch(command: str, cfg: Any, report: Report, out: Optional[PathLike], name: str, resume: Optional[PathLike],
           extra_args: list[str], world: int, gpus: Optional[int], procs: int) -> dict[str, Any]:
    """Start ``world`` local workers through torch.distributed.run with the resolved config in a file (checked
    here first, so that a config the workers would refuse is said once, without the launcher's noise)."""
    from cfmae_cli.config import batch_plan, dump_config
    from cfmae_cli.train.rundir import claimed_run_dir, held
    from cfmae_cli.train.setup import dataset_root

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
            report.say(f"launching {world} worker process(es) ({'gloo, CPU' if not gpus else 'NCCL, one GPU each'})")
            launch_command(args + extra_args, {}, world)  # (WorkersFailed when a worker fails)
    finally:
        os.unlink(config_file)
    return {"run_dir": str(run_dir), "world": world}


def _check_data_manifest(data: Optional[PathLike]) -> None:
    """A dataset's manifest checked before torch is imported: a bad one costs nothing."""
    if data is None or not Path(data).is_dir():
        return
    from cfmae_cli.data.layout import is_packed, read_manifest, read_packed_manifest

    if is_packed(Path(data)):
        read_packed_manifest(Path(data))
    elif (Path(data) / MANIFEST_NAME).is_file():
        read_manifest(Path(data))


def pretrain(preset: Optional[str] = None, data: Optional[PathLike] = None, out: Optional[PathLike] = None, *,
             gpus: Optional[int] = None, procs: int = 1, epochs: Optional[int] = None, seed: Optional[int] = None,
             overrides: Overrides | None = None, resume: Optional[PathLike] = None,
             checkpoint: Optional[PathLike] = None, monitor_data: Optional[PathLike] = None,
             report: Report | None = None) -> dict[str, Any]:
    """``cfmae pretrain``: pre-train a ViT with CFMAE; returns the run's summary (``run_dir``, ``epochs``,
    ``steps``, losses, ``img_per_s`` …).

    ``preset``: a preset name or YAML file (default ``demo``); ``data``: the dataset folder (default: the
    built-in demo data); ``out``: the run folder (default ``runs/pretrain/<preset>[-k]``); ``overrides``: config
    keys (``{"optim.base_lr": 1.5e-4}`` or ``["optim.base_lr=1.5e-4"]``); ``resume``: a run folder or checkpoint
    to continue exactly, or ``"auto"`` (start, or resume the run already in ``out``); ``checkpoint``: weights
    that a new run starts from; ``monitor_data``: the k-NN monitor's labelled ImageFolder."""
    from cfmae_cli.config import load_config

    report = report or Report()
    auto = resume is not None and str(resume) == AUTO
    refuse_hub_resume(None if auto else resume)
    _check_data_manifest(data)
    for weights, flag in ((checkpoint, "--checkpoint"), (None if auto else resume, "--resume")):
        if weights is not None:  # before the demo data or torch
            check_weights_given(weights, flag)
    from cfmae_cli.train.pretraining import pretrain as run, pretraining_images

    set_ = as_set_items(overrides)
    overrides_ = run_overrides(set_, data, epochs, seed, gpus, procs, resume, out)
    if monitor_data is not None:
        need_folder(Path(monitor_data), "--monitor-data")
        overrides_.append(f"train.monitor.data={Path(monitor_data).resolve()}")
    if resume is not None and not auto and checkpoint is not None:
        raise CfmaeError("--resume continues a run with its own weights; it takes no --checkpoint (use --checkpoint "
                         "CKPT without --resume to start a new run from weights).")
    if resume is not None and not auto:
        cfg = resumed_config(resume, preset, overrides_)
    else:
        cfg = load_config(preset or "demo", overrides_)
    name = Path(preset or "demo").stem
    if data is not None and preset is None and (resume is None or auto):
        say_preset_note(report, "demo", "a 4-block ViT at 64 px for a few CPU minutes",
                        "vitb-400e (the paper's ViT-B), vits-400e or vitl-400e")
        cfg, said = fit_to_data(cfg, pretraining_images(cfg), str(data), overrides_, world_of(gpus, procs))
        name, where = own_data_run(Path(data), out, name)
        report.say(f"note: {said}; {where}.")
    if auto:
        resume, out, cfg = auto_run("pretrain", cfg, out, name, report)
        if resume is not None and checkpoint is not None:
            checkpoint = None  # the run has its own weights now
    init = checkpoint
    return dispatch("pretrain", cfg, functools.partial(run, cfg, init=init), report, out=out, name=name,
                    resume=resume, gpus=gpus, procs=procs,
                    extra_args=["--checkpoint", str(init)] if init is not None else [],
                    before_refusal=lambda world: _say_plan(cfg, world, report))


def _say_plan(cfg: Any, world: int, report: Report) -> None:
    """The plan of a pre-training on ``world`` devices (said before ``--gpus N`` is refused on a smaller
    machine: what the run would have been)."""
    from cfmae_cli.train.setup import build_dataset, dataset_root, describe_plan, make_plan

    dataset, _ = build_dataset(cfg, dataset_root(cfg))
    for line in describe_plan(make_plan(cfg, len(dataset), world), cfg):
        report.say(line)


OWN_VAL_FRACTION = 0.2  # the share of each class held out of a single folder of the user's own images


def _training_images(data: Path, val_fraction: float | None) -> int:
    """Images that fine-tuning trains on: ``data/train``'s, or a single folder's minus its held-out share."""
    from cfmae_cli.data.splits import held_out, list_split

    if (data / "train").is_dir():
        return len(list_split(data / "train", [])[0])
    samples = list_split(data, [])[0]
    return sum(not held_out(s, val_fraction) for s in samples) if val_fraction else len(samples)


def finetune(checkpoint: Optional[PathLike] = None, data: Optional[PathLike] = None, out: Optional[PathLike] = None,
             *, preset: Optional[str] = None, task: Optional[str] = None, mode: Optional[str] = None,
             modalities: Optional[str | Sequence[str]] = None, gpus: Optional[int] = None, procs: int = 1,
             epochs: Optional[int] = None, seed: Optional[int] = None, overrides: Overrides | None = None,
             resume: Optional[PathLike] = None, report: Report | None = None) -> dict[str, Any]:
    """``cfmae finetune``: fine-tune a pre-trained encoder (classification, segmentation, detection); returns the
    run's summary (``run_dir``, ``epochs``, ``last_epoch`` with the validation numbers …).

    ``checkpoint``: the pre-trained weights (a cfmae checkpoint or run folder, an MAE / MultiMAE / timm file,
    ``"random"``; default: the newest pre-training run); ``data``: train/ and val/, or one folder of classes;
    ``preset``: default ``ft-demo`` (``ft-seg-demo``, ``ft-det-demo`` with ``task``); ``mode``: ``full`` or
    ``linear``; ``modalities``: the encoder's input (``"rgb"``, ``["rgb", "instance", "semantic"]``);
    ``resume``: as for :func:`pretrain`, ``"auto"`` included."""
    from cfmae_cli.config import check_weights_file, load_config
    from cfmae_cli.eval.config import FinetuneConfig

    report = report or Report()
    auto = resume is not None and str(resume) == AUTO
    refuse_hub_resume(None if auto else resume)
    for weights in (checkpoint if resume is None or auto else None, None if auto else resume):
        if weights is not None and str(weights) != "random":  # sizes checked before torch is imported
            check_weights_file(weights)
    from cfmae_cli.eval.finetune import finetune as run

    if mode is not None and mode not in ("full", "linear"):
        raise CfmaeError(f"--mode {mode}: use full or linear.")
    overrides_ = run_overrides(as_set_items(overrides), data, epochs, seed, gpus, procs, resume, out)
    if task is not None:
        if task not in ("classification", "segmentation", "detection"):
            raise CfmaeError(f"--task {task}: use classification, segmentation or detection.")
        overrides_.append(f"kind={task}")
    if modalities is not None:
        listed = modalities if isinstance(modalities, str) else ",".join(modalities)
        overrides_.append(f"data.modalities=[{listed}]")
    if checkpoint is not None:
        if resume is not None and not auto:
            raise CfmaeError("--resume continues a run with its own weights; it takes no --checkpoint.")
        if str(checkpoint) != "random":
            from cfmae_cli.hub import stored_spec, weights_exist

            if not weights_exist(checkpoint):
                raise CfmaeError(f"--checkpoint {checkpoint}: no such file (a run folder needs "
                                 f"checkpoints/last.pt).")
            checkpoint = stored_spec(checkpoint)  # (a hub spec as given: the run stays portable)
        overrides_.append(f"model.init={checkpoint}")
    default = {"segmentation": "ft-seg-demo", "detection": "ft-det-demo"}.get(task or "", "ft-demo")
    name = Path(preset or default).stem
    if resume is not None and not auto:
        cfg = resumed_config(resume, preset, overrides_, FinetuneConfig, mode)
    else:
        folder = Path(data) if data is not None else None
        if folder is not None and preset is None and default == "ft-demo" and not (folder / "train").is_dir() and \
                not any(item.startswith("data.val_fraction=") for item in overrides_):
            overrides_.append(f"data.val_fraction={OWN_VAL_FRACTION}")  # the demo's 0.75 is for its 12 crops a class
        cfg = load_config(preset or default, overrides_, FinetuneConfig, mode)
        if folder is not None and preset is None:
            real = {"segmentation": "ft-seg-vitb", "detection": "ft-det-vitb"}.get(task or "",
                                                                                  "ft-vitb-400e (or ft-vitb-1600e)")
            say_preset_note(report, default, "the demo's tiny encoder and schedule, for a few CPU minutes", real)
            if default == "ft-demo" and ((folder / "train").is_dir() or cfg.data.val_fraction):  # (else refused)
                cfg, said = fit_to_data(cfg, _training_images(folder, cfg.data.val_fraction), str(folder),
                                        overrides_, world_of(gpus, procs))
                held = "" if (folder / "train").is_dir() else \
                    f" (data.val_fraction {cfg.data.val_fraction:g} of each class held out for validation)"
                name, where = own_data_run(folder, out, name)
                report.say(f"note: {said}{held}; {where}.")
        if auto:
            resume, out, cfg = auto_run("finetune", cfg, out, name, report)
    return dispatch("finetune", cfg, functools.partial(run, cfg), report, out=out, name=name,
                    resume=resume, gpus=gpus, procs=procs, extra_args=[])
