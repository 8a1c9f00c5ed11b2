"""``cfmae export`` as a function: the encoder (or a fine-tuned classifier) as a timm folder, optionally uploaded
to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from cfmae_cli.api.common import PathLike, Report
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import temporary_name
from cfmae_cli.ownership import locked


def export(checkpoint: PathLike, out: PathLike, *, push_to_hub: Optional[str] = None, private: bool = False,
           report: Report | None = None) -> dict[str, Any]:
    """``cfmae export CKPT --out FOLDER [--push-to-hub OWNER/NAME [--private]]``: write ``model.safetensors``,
    ``config.json`` and ``README.md`` (timm's hub layout) to the new folder ``out``, then upload them when
    ``push_to_hub`` names a repository. Returns ``folder``, ``config`` (the timm config), ``load_line`` (the
    ``timm.create_model`` call that loads it) and ``url`` (the hub commit, or None)."""
    from cfmae_cli.config import check_weights_file
    from cfmae_cli.hub import HUB_PREFIX, parse_hub

    report = report or Report()
    if private and push_to_hub is None:
        raise CfmaeError("--private: makes the repository of --push-to-hub private; give --push-to-hub OWNER/NAME.")
    hub_id = None
    if push_to_hub is not None:  # checked before anything is read or written
        hub_id, revision = parse_hub(push_to_hub if push_to_hub.startswith(HUB_PREFIX) else HUB_PREFIX + push_to_hub)
        if revision is not None:
            raise CfmaeError(f"--push-to-hub {push_to_hub}: the export goes to the repository's main branch; give "
                             f"OWNER/NAME without @{revision}.")
    check_weights_file(checkpoint)  # sizes beyond reason refused before torch is imported or a tensor read

    from cfmae_cli.model.export import export_timm, load_line, push_export

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    url = None
    with locked(out, "--out", lock_file=out.parent / temporary_name(out.name, "cfmae-lock")):  # (out is renamed)
        folder = export_timm(Path(checkpoint), out, hub_id)
        config = json.loads((folder / "config.json").read_text())
        report.say(f"wrote {folder / 'model.safetensors'}, {folder / 'config.json'} and {folder / 'README.md'}")
        if hub_id is not None:  # under the lock: no other export replaces the files while they are uploaded
            url = push_export(folder, hub_id, private, str(checkpoint))
            report.say(f"uploaded to {hub_id}{' (private)' if private else ''}: {url}")
    return {"folder": str(folder), "config": config, "load_line": load_line(config, folder, hub_id), "url": url}
