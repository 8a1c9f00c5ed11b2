"""The source folder of ``cfmae label``: its images (``SRC/<class>/<image>`` or a flat folder), listed and read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from cfmae_cli.data.layout import read_image
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import IMAGE_EXTENSIONS, list_folder, need_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceImage:
    path: Path
    class_dir: str  # "" when the source folder is flat
    stem: str


def list_sources(src: Path, limit: int | None = None) -> tuple[list[SourceImage], list[dict[str, str]]]:
    """Images under ``src/<class>/`` (or directly in ``src`` when it has no class folders), sorted.

    Returns (images, problems): a second file with the same stem in a folder is a problem, not an image.
    """
    classes = [d for d in list_folder(need_folder(src, "source")).dirs if not d.startswith(".")]
    groups = [(c, src / c) for c in classes] if classes else [("", src)]
    images: list[SourceImage] = []
    problems: list[dict[str, str]] = []
    ignored = 0
    for class_dir, folder in groups:
        seen: dict[str, Path] = {}
        for name in list_folder(folder).files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            if stem in seen:
                problems.append({"path": str((folder / name).resolve()),
                                 "error": f"same name as {seen[stem].name}; skipped"})
                continue
            seen[stem] = folder / name
            images.append(SourceImage(folder / name, class_dir, stem))
    if ignored:
        log.info("ignored %d file(s) that are not images (by extension)", ignored)
    if not images:
        raise CfmaeError(f"{src}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return images[:limit] if limit else images, problems


class Sources(Dataset):
    """Items: the decoded image and, with ``raw``, the file's bytes (what ``--rgb copy`` writes: read here, so
    that a source that cannot be read is listed as unreadable, and a failed write is the output's)."""

    def __init__(self, images: list[SourceImage], raw: bool = False):
        self.images, self.raw = images, raw

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, converted = read_image(self.images[i].path)
            raw = self.images[i].path.read_bytes() if self.raw and not converted else None
            return {"index": i, "image": image, "converted": converted, "raw": raw, "error": None}
        except Exception as exc:  # noqa: BLE001 - any unreadable file is listed, not fatal
            return {"index": i, "image": None, "converted": False, "raw": None,
                    "error": f"{type(exc).__name__}: {exc}"}


def collate_sources(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch of :class:`Sources` items as the list it is."""
    return items
