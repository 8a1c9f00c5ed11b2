"""The labelling backend interface, and the classical backend that needs no weights.

A backend takes a batch of images (H×W×3 uint8 RGB arrays, sizes may differ) and returns maps of exactly
each image's size: instance maps (0 = background, 1.. = instances) with JSON metadata, and/or semantic
maps (uint8 class ids, 255 = unlabelled) with the class names in ``classes``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cfmae_cli.labeling.classical import SEMANTIC_CLASSES, ClassicalLabeller


class InstanceBackend(Protocol):
    name: str

    def label_instances(self, images: list[np.ndarray], prompts: list[str]) -> list[tuple[np.ndarray, dict]]: ...

    def describe(self) -> dict[str, Any]: ...


class SemanticBackend(Protocol):
    name: str
    classes: list[str]

    def label_semantic(self, images: list[np.ndarray]) -> list[np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


class ClassicalBackend:
    """Both maps from :class:`ClassicalLabeller` (graph-based instances, colour/texture classes)."""

    name = "classical"
    classes = list(SEMANTIC_CLASSES)

    def __init__(self) -> None:
        self.labeller = ClassicalLabeller()

    def label_both(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.labeller.label(image) for image in images]

    def label_instances(self, images: list[np.ndarray], prompts: list[str]) -> list[tuple[np.ndarray, dict]]:
        out = []
        for instance, _ in self.label_both(images):
            out.append((instance, {"instances": int(len(np.unique(instance[instance > 0])))}))
        return out

    def label_semantic(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [semantic for _, semantic in self.label_both(images)]

    def describe(self) -> dict[str, Any]:
        return {"backend": "classical", **self.labeller.describe()}


def label_batch(instance: InstanceBackend, semantic: SemanticBackend, images: list[np.ndarray],
                prompts: list[str]) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(instance map, semantic map, metadata) per image; the classical labeller runs once when it does both."""
    if isinstance(instance, ClassicalBackend) and instance is semantic:
        both = instance.label_both(images)
        return [(ins, sem, {"instances": int(len(np.unique(ins[ins > 0])))}) for ins, sem in both]
    inst = instance.label_instances(images, prompts)
    sems = semantic.label_semantic(images)
    return [(ins, sem, meta) for (ins, meta), sem in zip(inst, sems)]
