"""Weights on the Hugging Face Hub: ``hf-hub:owner/name[@revision]`` wherever cfmae reads a checkpoint or weights.

A hub spec is resolved to a folder of the local hub cache by ``huggingface_hub.snapshot_download`` (only the files
cfmae reads), which honours ``HF_HUB_OFFLINE`` (then only the cache is looked at), ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is) and ``HF_TOKEN`` / ``hf auth login`` (private and gated repos).
What the spec names, after :func:`local_weights`:

- a repo holding ``config.json`` + ``model.safetensors`` (timm's hub format, as ``cfmae export`` writes it): its
  snapshot folder, read as an exported folder;
- otherwise a repo holding exactly one ``.pt`` / ``.pth`` / ``.safetensors`` file (a cfmae checkpoint uploaded as
  it is, or a bare state dict): that file;
- anything else (no weights, or several files to choose from) is refused, naming the files.

Configs keep the spec (``model.init``, ``model.align.teacher``), not the cache path, so that a run stays portable.
huggingface_hub is imported where it is used: ``cfmae --help`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Iterator

from cfmae_cli.errors import CfmaeError

HUB_PREFIX = "hf-hub:"
#: the files of a repo that cfmae reads (snapshot_download's allow_patterns)
HUB_FILES = ["config.json", "*.safetensors", "*.pt", "*.pth", "README.md"]
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
FORM = "hf-hub:owner/name or hf-hub:owner/name@revision"
# the Hub's rule for a repo's owner and name: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 each
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

_resolved: dict[str, Path] = {}  # spec → what it resolved to, in this process


def is_hub(spec: object) -> bool:
    """True for a str or Path whose text starts with ``hf-hub:``."""
    return isinstance(spec, (str, Path)) and str(spec).startswith(HUB_PREFIX)


def parse_hub(spec: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of ``hf-hub:owner/name[@revision]``; a malformed spec stops (exit 2) with a
    message that names it and the form expected."""
    text = str(spec)
    body = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    repo, at, revision = body.partition("@")
    parts = repo.split("/")
    problem = None
    if len(parts) != 2 or not all(parts):
        problem = "the repository must be owner/name"
    elif not all(_PART.match(p) for p in parts) or any("--" in p or ".." in p or p.endswith((".", "-"))
                                                       for p in parts):
        problem = "owner and name take letters, digits, '-', '_' and '.' (no '--' or '..', at most 96 each)"
    elif at and not revision.strip():
        problem = "the revision after '@' is empty"
    elif at and (revision != revision.strip() or "@" in revision):
        problem = f"the revision {revision!r} is not a branch, tag or commit"
    if problem:
        raise CfmaeError(f"{text}: not a hub spec ({problem}); use {FORM}, e.g. hf-hub:timm/vit_small_patch16_224.")
    return repo, (revision if at else None)


def local_weights(spec: str | Path) -> Path:
    """The local path of ``spec``: for a hub spec, its snapshot folder in the hub cache (downloaded there first
    unless cached; only :data:`HUB_FILES`) — or, when the repo is not an export but holds one weights file, that
    file; anything else is returned unchanged as a Path. Every failure of the hub (offline and not cached, no such
    repository or revision, gated or private, no network) is one :class:`CfmaeError` (exit 2) naming the spec and
    what to do. Resolved specs are remembered for the rest of the process."""
    if not is_hub(spec):
        return Path(spec)
    text = str(spec)
    if text in _resolved:
        return _resolved[text]
    repo, revision = parse_hub(text)
    import huggingface_hub  # heavy: only for hub specs
    from huggingface_hub import constants

    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - each of the hub's failures becomes one message
        message = _hub_failure(text, exc, offline_mode(), str(constants.HF_HUB_CACHE))
        if message is None:
            raise
        raise CfmaeError(message) from None
    _resolved[text] = _weights_in(text, folder)
    return _resolved[text]


def offline_mode() -> bool:
    """huggingface_hub's own view of ``HF_HUB_OFFLINE`` (read when it was imported)."""
    from huggingface_hub import constants

    ask = getattr(constants, "is_offline_mode", None)  # (a function since huggingface_hub 1.x; a constant before)
    return bool(ask() if callable(ask) else constants.HF_HUB_OFFLINE)


def _weights_in(spec: str, folder: Path) -> Path:
    """What a snapshot folder offers to read: itself when it is an export, else its one weights file."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(files) == 1:
        return files[0]
    if not files:
        raise CfmaeError(f"{spec}: the repository holds no weights cfmae reads (config.json + model.safetensors as "
                         f"`cfmae export` writes them, or one .pt / .pth / .safetensors file).")
    shown = ", ".join(str(p.relative_to(folder)) for p in files[:5]) + (" …" if len(files) > 5 else "")
    raise CfmaeError(f"{spec}: the repository holds {len(files)} weights files ({shown}) and no config.json to say "
                     f"which model they make; download the one you want (`hf download`) and give its "
                     f"path.")


def _hub_failure(spec: str, exc: BaseException, offline: bool, cache: str) -> str | None:
    """The one line that says why ``spec`` could not be resolved and what to do; None for an exception that is not
    the hub's (a bug, to be raised as it is)."""
    from huggingface_hub import errors

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(exc, errors.GatedRepoError):
        return f"{spec}: a gated repository; accept its terms on its hub page, then {login}."
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{spec}: the repository has no such revision (branch, tag or commit); check the part after '@'."
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{spec}: no such repository on the hub, or a private one: check the name, or {login}."
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # (huggingface_hub 2.x)
    if incomplete and isinstance(exc, incomplete):
        return (f"{spec}: its copy in the local cache ({cache}) is incomplete and the hub cannot be reached"
                f"{' (HF_HUB_OFFLINE=1)' if offline else ''}; download it again with network.")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        if offline:
            return (f"{spec}: not in the local cache ({cache}) and HF_HUB_OFFLINE=1: download it once with "
                    f"network, or unset HF_HUB_OFFLINE.")
        return (f"{spec}: the hub cannot be reached and it is not in the local cache ({cache}); check the network "
                f"(or HF_ENDPOINT), or set HF_HOME / HF_HUB_CACHE to a cache that holds it.")
    if isinstance(exc, errors.HFValidationError):
        return f"{spec}: not a valid repository id ({str(exc).splitlines()[0]}); use {FORM}."
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"{spec}: the hub refused access ({status}); {login} with a token that may read it."
        return f"{spec}: the hub answered with an error ({str(exc).splitlines()[0]}); try again later."
    if isinstance(exc, OSError):
        return f"{spec}: could not write the hub cache ({cache}: {exc.strerror or exc}); free space or set HF_HOME."
    if type(exc).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpcore"):
        first = (str(exc).splitlines() or [""])[0]
        return f"{spec}: could not be downloaded ({type(exc).__name__}: {first}); check the network, or HF_ENDPOINT."
    return None


def weights_exist(spec: str | Path) -> bool:
    """Whether ``spec`` names weights to read: a file, a run folder with ``checkpoints/last.pt``, a folder written
    by ``cfmae export`` (config.json + model.safetensors), or a hub spec. A hub spec is resolved
    (:func:`local_weights`): one that cannot be stops with its own message (exit 2) instead of returning False,
    as the reason (offline, not found, private …) is what the user needs to see."""
    path = local_weights(spec)
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    return (path / "checkpoints" / "last.pt").is_file() or \
        ((path / "config.json").is_file() and (path / "model.safetensors").is_file())


def stored_spec(spec: str | Path) -> str:
    """What a config keeps of ``spec`` (``model.init``): a hub spec as given (the run stays portable; checked by
    :func:`parse_hub`), a run folder as its ``checkpoints/last.pt``, any other path made absolute (a file, an
    exported folder)."""
    if is_hub(spec):
        parse_hub(str(spec))
        return str(spec)
    path = Path(spec)
    if path.is_dir() and (path / "checkpoints" / "last.pt").is_file():
        path = path / "checkpoints" / "last.pt"
    return str(path.resolve())


@contextlib.contextmanager
def named_by_spec(spec: str | Path, local: Path) -> Iterator[None]:
    """Inside: a :class:`CfmaeError` about ``local``, the local copy of the hub spec ``spec``, is raised again (same
    class, same exit code) with the spec in its message in place of the path: the user reads about what they
    gave, not the hub cache's folders. Anything else (and any error of a local path) passes as it is."""
    try:
        yield
    except CfmaeError as exc:
        if not is_hub(spec) or str(local) == str(spec):
            raise
        out = copy.copy(exc)
        out.args = (str(exc).replace(str(local), str(spec)),)
        raise out from None
