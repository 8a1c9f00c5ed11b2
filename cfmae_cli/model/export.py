"""``cfmae export``: a checkpoint's encoder (or fine-tuned classifier) written as a timm ``VisionTransformer``:
``model.safetensors`` + ``config.json`` in timm's hub format, loadable with strict key matching, and a model card
``README.md``. The three files are published together: written into a temporary folder beside ``--out``, then
renamed into place, so that ``--out`` holds one whole export or another, never a mix."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save

from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import FILE_MODE, fsync_path, list_folder, software
from cfmae_cli.model.convert import timm_classifier, timm_config, to_timm
from cfmae_cli.model.weights import Weights, read_weights

log = logging.getLogger(__name__)

EXPORT_FILES = ("model.safetensors", "config.json", "README.md")
# what an interrupted export of an earlier cfmae left in the folder (formats.atomic_write's temporary files)
_OLD_TEMPORARY = re.compile(r"^\.(model\.safetensors|config\.json|README\.md)\.[A-Za-z0-9_]+\.tmp$")


def export_timm(path: Path, out: Path, hub_id: str | None = None) -> Path:
    """Export the checkpoint ``path`` into the folder ``out``: claim ``out`` (a new or empty folder, or a previous
    cfmae export, which is replaced), read and convert the weights (a pre-trained encoder without a head, or a
    fine-tuned classifier with its head), write ``model.safetensors``, ``config.json`` and ``README.md`` into a
    temporary folder beside ``out`` and publish it there (:func:`publish_export`). Claim, write and publish are
    all here, so that one lock around this call covers a whole export. ``hub_id``: the hub repository the export
    is for (``owner/name``): the model card loads it from there."""
    _claim_export(out, path)
    w = read_weights(path)
    weights, config = export_contents(w, path)

    def write(folder: Path) -> None:  # (safetensors' own file writer reports a full disk as no OSError)
        (folder / "model.safetensors").write_bytes(save(weights))
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(model_card(config, w.top, out, hub_id), encoding="utf-8")

    replaced = publish_export(out, path, write)
    if replaced:
        log.info("%s: replaced the export that was there (of %s)", out, replaced)
    return out


def export_contents(w: Weights, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(timm's weights, config.json) of what ``w`` holds; a file that cannot be exported is refused in one line
    naming it and what to export instead."""
    if w.format == "cfmae-finetune":
        return timm_classifier(w.top, w.state, w.path)
    if (cfg := w.pretrain_config()) is not None:
        return to_timm(w.state), timm_config(cfg, str(path))
    if w.format == "exported":
        raise CfmaeError(f"{path}: already an export in timm's format; load it with timm, or copy the folder.")
    if w.format == "cfmae-state" and any(k in w.state for k in ("head.weight", "head.1.weight")):
        raise CfmaeError(f"{w.path}: the bare weights of a fine-tuned classifier, without its config and class "
                         f"names; export the fine-tuning checkpoint itself (RUN/checkpoints/best.pt or the run "
                         f"folder).")
    if w.format.startswith("cfmae-") and w.format != "cfmae-state":
        raise CfmaeError(f"{w.path}: a checkpoint of `cfmae {w.format.removeprefix('cfmae-')}`; export takes those of "
                         f"cfmae pretrain and cfmae finetune.")
    raise CfmaeError(f"{path}: holds no cfmae config to describe the architecture; export needs a cfmae "
                     f"checkpoint (convert MAE / MultiMAE weights with `cfmae pretrain --init FILE` first).")


def _claim_export(out: Path, source: Path) -> str | None:
    """Check that ``out`` may take an export: a new or empty folder, or a previous export of cfmae's (its
    ``config.json`` has a "cfmae" entry and the folder holds nothing but the export's files), which is then
    replaced: returned is what it was exported from. Anything else is refused, naming the files in the way."""
    if out.exists() and not out.is_dir():
        raise CfmaeError(f"--out {out}: a file, not a folder; give a new folder for the export.")
    if source.exists() and out.exists() and source.resolve().is_relative_to(out.resolve()):
        raise CfmaeError(f"--out {out}: holds the checkpoint {source} itself; export into another folder.")
    names = list_folder(out).names if out.is_dir() else []
    if not names:
        return None
    foreign = [n for n in names if n not in EXPORT_FILES and not _OLD_TEMPORARY.match(n)]
    previous = None
    if "config.json" in names:
        try:
            previous = json.loads((out / "config.json").read_text(encoding="utf-8")).get("cfmae")
        except (OSError, ValueError, AttributeError):
            previous = None
    if foreign or not isinstance(previous, dict):
        shown = ", ".join((foreign or names)[:5]) + (" …" if len(foreign or names) > 5 else "")
        raise CfmaeError(f"--out {out}: the folder holds files that are not a cfmae export ({shown}); they are not "
                         f"replaced. Export into a new or empty folder.")
    return str(previous.get("source", "?"))


# ----------------------------------------------------------------------------------------------------------
# publishing a folder whole


def _stem(out: Path) -> str:
    """The part of the temporary folders' names that says which ``--out`` they are for: its name, shortened (with
    a checksum of the whole name) to keep the names within NAME_MAX."""
    name = out.name
    return name if len(name) <= 100 else f"{name[:91]}~{zlib.crc32(name.encode('utf-8', 'surrogateescape')):08x}"


def temporary_folder(out: Path, pid: int | None = None) -> Path:
    """Where the export into ``out`` is written before it is published: ``.NAME.export-PID`` beside it."""
    return out.parent / f".{_stem(out)}.export-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def _remove_export_folder(folder: Path) -> bool:
    """Remove a folder of cfmae's export files (nothing else is removed); False when it holds other things (then
    it is left as it is)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    if any(n not in EXPORT_FILES and not _OLD_TEMPORARY.match(n) for n in names):
        return False
    for name in names:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass
    return True


def _clear_leftovers(out: Path) -> None:
    """What interrupted exports into ``out`` left beside it, by processes that are gone: a temporary folder is
    removed; a previous export set aside (``….old``) is put back when ``out`` is missing (the export was stopped
    between its two renames: the old export is whole), else removed. A folder that holds other files, or
    belongs to a process that still runs, is left alone."""
    pattern = re.compile(rf"^\.{re.escape(_stem(out))}\.export-(\d+)(\.old)?$")
    try:
        entries = sorted(os.scandir(out.parent), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        folder = Path(entry.path)
        if match.group(2) and not out.exists() and (folder / "config.json").is_file():
            os.rename(folder, out)
            log.warning("%s: put back the export that an interrupted export had set aside (%s)", out, folder.name)
        elif _remove_export_folder(folder):
            log.info("%s: removed %s, left by an interrupted export", out.parent, folder.name)


def publish_export(out: Path, source: Path, write: Callable[[Path], None]) -> str | None:
    """Write an export with ``write(folder)`` into :func:`temporary_folder` and rename it into place as ``out``.
    A previous export in ``out`` is renamed aside first and removed once the new one is in place; a crash at
    any point leaves either the old export whole or the new one (the next export puts a set-aside one back).
    Leftovers of interrupted exports are cleared first (:func:`_clear_leftovers`). Returns what the replaced
    export was exported from (None when there was none). On failure nothing in ``out`` has changed. An ``out``
    that is a link to a folder is published in the folder it points to (the link keeps pointing there)."""
    if out.is_symlink() and out.is_dir():
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    tmp, aside = temporary_folder(out), Path(f"{temporary_folder(out)}.old")
    for stale in (tmp, aside):  # this process's own, from an export it did not finish
        if stale.exists() and not _remove_export_folder(stale):
            raise CfmaeError(f"{stale}: in the way of the export into {out} and holds other files; move it away.")
    tmp.mkdir()
    try:
        write(tmp)
        for name in EXPORT_FILES:
            os.chmod(tmp / name, FILE_MODE)
            fsync_path(tmp / name)
        fsync_path(tmp)
        replaced = _claim_export(out, source)  # again: the folder may have changed while the weights were read
        if out.exists() and os.listdir(out):
            os.rename(out, aside)
        try:
            os.rename(tmp, out)  # onto a missing or an empty folder: one atomic step
        except BaseException:
            if aside.exists() and not out.exists():
                os.rename(aside, out)
            raise
    except BaseException as exc:
        if not _remove_export_folder(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            kept = "the export that was there is intact" if (out / "config.json").is_file() else "nothing was written"
            raise CfmaeError(f"--out {out}: the export could not be written ({exc.strerror or exc}); {kept}. Free "
                             f"space or choose a writable folder, and run the same command again.") from None
        raise
    fsync_path(out.parent)
    try:
        left_aside = aside.exists() and not _remove_export_folder(aside)
    except OSError as exc:  # the export is in place; the old one is only in the way
        log.warning("%s: could not remove the replaced export set aside as %s (%s)", out, aside, exc)
    else:
        if left_aside:
            log.warning("%s: the replaced export set aside as %s holds other files; left there", out, aside)
    return replaced


def load_line(config: dict[str, Any], folder: Path, hub_id: str | None = None) -> str:
    """The ``timm.create_model`` call of docs/export.md that loads the export in ``folder`` (or, with ``hub_id``,
    its copy on the hub) whole: the architecture and weights (strict key matching; the head, if any) and the
    ``pretrained_cfg`` that ``timm.data.resolve_data_config`` reads the preprocessing from."""
    where = f"hf-hub:{hub_id}" if hub_id else f"local-dir:{folder}"
    return f"timm.create_model({where!r}, pretrained=True)"


def model_card(config: dict[str, Any], top: dict[str, Any], folder: Path, hub_id: str | None = None) -> str:
    """README.md of an export: what the weights are, the run they come from, its data, and how to load them (from
    ``folder``, or from the hub repository ``hub_id``, whose page then reads the YAML header: a timm model)."""
    run = top.get("config") or {}
    ours = config.get("cfmae", {})
    finetuned = ours.get("task") == "finetune"
    data = (run.get("data") or {}).get("root") or "the built-in demo data (scikit-image's sample photographs)"
    args = ", ".join(f"{k} {v}" for k, v in config["model_args"].items())
    pc = config["pretrained_cfg"]
    side = pc["input_size"][1]
    header = ["---", "library_name: timm", "tags:", "- cfmae", "- image-classification" if finetuned else
              "- image-feature-extraction", "---", ""] if hub_id else []
    lines = [*header, f"# {hub_id or folder.name}", "",
             ("A ViT classifier fine-tuned and exported by" if finetuned else
              "A ViT encoder pre-trained with CFMAE (coarse-to-fine masked autoencoding of semantic maps, instance "
              "maps and RGB), exported by") + f" {software()} in timm's format.", "",
             "## Architecture", "",
             f"- timm `{config['architecture']}` with {args}",
             f"- {'a head of ' + str(config['num_classes']) + ' classes' if config['num_classes'] else 'no head'}; "
             f"features {config.get('num_features')}, pooling `{config.get('global_pool')}`",
             f"- input {side} px: the short side resized to {math.floor(side / pc['crop_pct'])} px "
             f"({pc['interpolation']}, crop_pct {pc['crop_pct']}), the centre {side} px cropped, mean {pc['mean']}, "
             f"std {pc['std']} (config.json's `pretrained_cfg`)", "",
             "## Source", "",
             f"- checkpoint `{ours.get('source')}` (epoch {top.get('epoch', '?')}, step {top.get('step', '?')})",
             f"- data: {data}"]
    if not finetuned:
        lines.append(f"- modalities: {', '.join(ours.get('modalities', []))}; decoder order "
                     f"{' → '.join((run.get('model') or {}).get('decoder', {}).get('order', []))}")
        lines.append(f"- {(run.get('train') or {}).get('epochs', '?')} epochs, effective batch "
                     f"{(run.get('optim') or {}).get('effective_batch', '?')}, base lr "
                     f"{(run.get('optim') or {}).get('base_lr', '?')}")
    else:
        lines.append(f"- mode {ours.get('mode')}, initial weights {ours.get('init')}")
    last = top.get("metrics") or {}
    if "loss" in last:
        lines.append(f"- last epoch loss {last['loss']:.4f}")
    lines += ["", "## Load", "", "```python", "import timm", f"model = {load_line(config, folder, hub_id)}",
              "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))", "```", "",
              "The full config of the run is in its `config.yaml`; `config.json` here is timm's.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the hub


def push_export(folder: Path, repo_id: str, private: bool, source: str) -> str:
    """Upload the export in ``folder`` (its three files) to the hub repository ``repo_id`` (``owner/name``), made
    first when missing (``private`` then decides who sees it; an existing repository keeps its visibility), in
    one commit. Returns the commit's URL. Every failure (no token, a token that may not write, offline, no
    network, the hub's refusal) is one :class:`CfmaeError` with the fix; the export in ``folder`` stays as it
    is, for a push again."""
    from huggingface_hub import HfApi, errors  # heavy: only for --push-to-hub

    from cfmae_cli.hub import offline_mode

    again = (f"the export in {folder} is complete: push it again with the same command, or `hf upload {repo_id} "
             f"{folder}`")
    login = "log in with `hf auth login` (huggingface_hub's CLI) or set HF_TOKEN to a token that may write"
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, allow_patterns=list(EXPORT_FILES),
                                 commit_message=f"cfmae export of {source}")
    except Exception as exc:  # noqa: BLE001 - each of the hub's failures becomes one message
        if isinstance(exc, errors.OfflineModeIsEnabled) or offline_mode():
            why = "HF_HUB_OFFLINE=1 forbids any request to the hub: unset it to push"
        elif isinstance(exc, errors.LocalTokenNotFoundError):
            why = f"no hub token on this machine: {login}"
        elif isinstance(exc, errors.HfHubHTTPError) and \
                getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
            why = f"the hub refused the token ({str(exc).splitlines()[0]}): {login}"
        elif isinstance(exc, errors.HfHubHTTPError):
            why = f"the hub answered with an error ({str(exc).splitlines()[0]})"
        elif type(exc).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpx2", "httpcore") or \
                isinstance(exc, (OSError, ValueError)):
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]} (check the network, or HF_ENDPOINT)"
        else:
            raise
        raise CfmaeError(f"--push-to-hub {repo_id}: nothing was uploaded; {why}. {again}.") from None
    return str(getattr(info, "commit_url", None) or info)
