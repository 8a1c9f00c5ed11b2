"""The colours of id maps in every figure: one palette for semantic classes, another for instances.

Semantic classes are coloured by their names: a class whose name is a colour word ("red", "orange-brown",
"gray", the classical labeller's classes) is drawn in that colour, so that a legend never says "orange-brown"
beside a light-blue swatch; other classes ("person", "dog") take well-separated colours from a fixed
sequence, each the farthest of a few candidates from the colours already used. Instances have their own palette (bright hues in a
fixed order, background black), because an instance id is not a class: the same id is a different object in
another image. Id 255 (unlabelled) is black in both.
"""

from __future__ import annotations

import colorsys
import re
from functools import lru_cache

import numpy as np

from cfmae_cli.formats import UNLABELLED

#: Colour words (whole class names or their parts) and the colour drawn for them. "dark", "bright" and
#: "textured" are the classical labeller's classes without a hue: "textured" (unsaturated, high local contrast)
#: is drawn in a pale lavender that the labeller itself would call unsaturated, away from its colour classes.
NAMED: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20), "dark": (45, 45, 45), "white": (245, 245, 245), "bright": (235, 235, 225),
    "gray": (140, 140, 140), "grey": (140, 140, 140), "silver": (192, 192, 192), "textured": (200, 160, 200),
    "red": (220, 30, 30), "orange": (245, 140, 20), "brown": (150, 85, 35), "orange-brown": (200, 110, 40),
    "yellow": (240, 220, 30), "gold": (230, 190, 40), "olive": (128, 128, 0), "green": (40, 170, 60),
    "lime": (150, 230, 40), "teal": (0, 128, 128), "cyan": (30, 210, 220), "turquoise": (64, 224, 208),
    "blue": (30, 80, 220), "navy": (20, 30, 120), "purple": (130, 50, 180), "violet": (150, 90, 220),
    "magenta": (220, 40, 200), "purple-magenta": (175, 45, 190), "pink": (245, 150, 190),
}
BACKGROUND = (0, 0, 0)
GOLDEN = 0.6180339887498949  # hue step of the fixed sequences: consecutive colours far apart on the wheel
TRIES = 8  # colours of the sequence tried for each unnamed class


def named_colour(name: str) -> tuple[int, int, int] | None:
    """The colour a class name names, or None: the whole name (lower case, spaces as hyphens), else the mean of
    its parts when every part is a colour word ("blue-green"), else None ("person", "traffic light")."""
    key = re.sub(r"\s+", "-", name.strip().lower())
    if key in NAMED:
        return NAMED[key]
    parts = [p for p in re.split(r"[-_/ ]+", key) if p]
    if parts and all(p in NAMED for p in parts):
        r, g, b = (int(round(np.mean([NAMED[p][k] for p in parts]))) for k in range(3))
        return r, g, b
    return None


def _sequence(count: int, start: float, saturations: tuple[float, ...], values: tuple[float, ...]
              ) -> list[tuple[int, int, int]]:
    """``count`` colours stepping the hue by the golden ratio from ``start``, cycling through ``saturations``
    and ``values``."""
    out = []
    for k in range(count):
        r, g, b = colorsys.hsv_to_rgb((start + k * GOLDEN) % 1.0, saturations[k % len(saturations)],
                                      values[k % len(values)])
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def _distance(colour: tuple[int, int, int], taken: list[tuple[int, int, int]]) -> float:
    """The distance (RGB) from ``colour`` to the nearest of ``taken``."""
    return float(np.min(np.linalg.norm(np.subtract(taken, colour), axis=1))) if taken else np.inf


def semantic_palette(names: list[str] | None = None, n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the colour of each semantic id. Ids whose class name is a colour word get that colour
    (:func:`named_colour`); each of the others takes, of the next few colours of a fixed sequence, the one
    farthest from the colours already used. Without names every id takes the sequence. Id 255 is black.
    The same names give the same colours in every figure."""
    return _semantic_palette(tuple(names or ()), n).copy()


@lru_cache(maxsize=16)
def _semantic_palette(names: tuple[str, ...], n: int) -> np.ndarray:
    colours: list[tuple[int, int, int] | None] = [named_colour(x) for x in names[:n]]
    colours += [None] * (n - len(colours))
    taken = [c for c in colours if c is not None]
    candidates = iter(_sequence(TRIES * n, 0.05, (0.75, 0.45), (0.92, 0.65, 0.8)))
    for i, c in enumerate(colours):
        if c is None and i != UNLABELLED:
            tries = [next(candidates) for _ in range(TRIES)]
            colours[i] = pick = max(tries, key=lambda t: _distance(t, taken))  # the farthest from those used
            taken.append(pick)
    if n > UNLABELLED:
        colours[UNLABELLED] = BACKGROUND
    return np.asarray(colours, np.uint8)


def instance_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the colour of each instance id: 0 (background) and 255 (unlabelled) black, objects bright
    saturated hues in a fixed order, so that neighbouring ids differ."""
    colours = [BACKGROUND] + _sequence(n - 1, 0.12, (0.85,), (1.0, 0.8))
    if n > UNLABELLED:
        colours[UNLABELLED] = BACKGROUND
    return np.asarray(colours, np.uint8)


def map_palette(classes: str | None, names: list[str] | None = None) -> np.ndarray:
    """The palette of a map modality by its table entry's ``classes``: the semantic palette for
    ``"manifest"`` (coloured by ``names``), the instance palette otherwise."""
    return semantic_palette(names) if classes == "manifest" else instance_palette()


def legend_entries(names: list[str], ids: set[int] | list[int]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of each id in ``ids`` that names a class, in id order: a figure's semantic legend."""
    colours = semantic_palette(names)
    return [(names[c], (int(colours[c, 0]), int(colours[c, 1]), int(colours[c, 2]))) for c in sorted(set(ids))
            if 0 <= c < len(names)]
