"""Which run a command continues: ``--resume RUN`` keeps the run's config (the options may change only what a
resume may change), ``--resume auto`` starts the run or resumes it when its folder holds it, and a complete run
is left as it is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from cfmae_cli.api.common import PathLike, Report, as_patch
from cfmae_cli.checkpoints import checkpoint_path
from cfmae_cli.errors import CfmaeError


def resumed_config(resume: PathLike, preset: Optional[str], overrides: Sequence[str], schema: type[Any] | None = None,
                   mode: Optional[str] = None) -> Any:
    """The run's own config; refused (exit 2, the keys listed) if the options given would change it."""
    from cfmae_cli.checkpoints import load_checkpoint
    from cfmae_cli.config import (RESUMABLE_CHANGES, Config, check_weights_file, config_diff, config_from_dict,
                                  deep_merge, load_config, with_legacy_defaults)

    schema = schema or Config
    refuse_hub_resume(resume)
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
    base = deep_merge(base, as_patch(overrides))
    wanted = config_from_dict(base, "--resume with the options given", schema)
    changed = [k for k in config_diff(saved, wanted.model_dump(mode="json")) if k not in RESUMABLE_CHANGES]
    if changed:
        raise CfmaeError(f"--resume {resume}: the options given change the run's config ({', '.join(changed)}). "
                         f"A resumed run keeps its config; start a new run instead.")
    return wanted


#: Keys that a run fills in itself when it starts (fine-tuning: the encoder read off its weights, and the newest
#: pre-training run as ``model.init``; a multi-process launch: the demo data's folder as ``data.root``):
#: ``--resume auto`` compares them only where they were given.
FILLED_AT_START = ("model.encoder", "model.init", "data.root")


def start_or_resume(command: str, cfg: Any, run: Path) -> Any:
    """``--resume auto``: the config to continue the run in the run folder ``run`` with, when ``run`` holds a
    checkpoint (``checkpoints/last.pt``) of a run of ``command`` with the config ``cfg`` (the same config as a
    new run would get, up to the keys a resume may change, and with the keys the run filled in at its start
    taken from it); None when ``run`` has no checkpoint (a new run starts there: an empty or missing folder, or
    one that a run of the same command left before its first checkpoint). A folder holding another run
    (another command, another config) is refused (exit 2), naming the keys that differ; so is one holding other
    files (when the new run claims it)."""
    from cfmae_cli.checkpoints import load_checkpoint
    from cfmae_cli.config import RESUMABLE_CHANGES, config_diff, config_from_dict, with_legacy_defaults

    last = run / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last, mmap=True)
    task = ckpt.get("task", command)
    if task != command:
        raise CfmaeError(f"--resume auto: {run} holds a run of `cfmae {task}`, not of `cfmae {command}`; choose "
                         f"another --out.")
    saved = with_legacy_defaults(ckpt["config"], type(cfg))
    wanted = cfg.model_dump(mode="json")
    for dotted in FILLED_AT_START:
        *sections, key = dotted.split(".")
        node, stored = wanted, saved
        for section in sections:
            node, stored = node.get(section) or {}, stored.get(section) or {}
        if key in node and node[key] is None:  # not given: the run's own choice stands
            node[key] = stored.get(key)
    changed = [k for k in config_diff(saved, wanted) if k not in RESUMABLE_CHANGES]
    if changed:
        raise CfmaeError(f"--resume auto: {run} holds another run (its config differs in {', '.join(changed)}); "
                         f"give the options of that run to resume it, or choose another --out for this one.")
    return config_from_dict(wanted, f"--resume auto {run}", type(cfg))


def complete_run(resume: PathLike, cfg: Any) -> int | None:
    """The epochs done, when the run of ``resume`` has finished all of ``cfg``'s epochs (else None)."""
    from cfmae_cli.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint_path(resume), mmap=True)
    done = int(ckpt.get("epoch", 0))
    return done if done >= cfg.train.epochs and not ckpt.get("next_step") else None


def auto_run(command: str, cfg: Any, out: Optional[PathLike], name: str, report: Report
             ) -> tuple[Path | None, Optional[PathLike], Any]:
    """(resume, out, config) for ``resume="auto"``: the run folder (``out``, else ``runs/<command>/<name>``) to
    continue and the run's config, or None, the folder a new run starts in and ``cfg``."""
    run = Path(out) if out is not None else Path("runs") / command / name
    found = start_or_resume(command, cfg, run)
    if int(os.environ.get("RANK", "0")) == 0:
        report.say(f"--resume auto: {run} holds this run; resuming it from its last checkpoint" if found else
                   f"--resume auto: no checkpoint in {run}; starting the run there")
    return (run, None, found) if found is not None else (None, run, cfg)


def refuse_hub_resume(resume: Optional[PathLike]) -> None:
    """``--resume`` continues a local run in its own folder: a hub spec is refused (the run would write into
    huggingface_hub's cache)."""
    from cfmae_cli.hub import is_hub

    if resume is not None and is_hub(resume):
        raise CfmaeError(f"--resume {resume}: continues a run in its local folder; to start a new run from hub "
                         f"weights, give them as --checkpoint {resume}.")
