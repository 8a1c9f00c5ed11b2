"""Learned labelling backends (docs/design.md §2 ``cfmae label``, paper App. B) — the public interface.

* :class:`GroundedSamBackend` (``--instance grounded-sam``): Grounding DINO boxes from the class name,
  SAM-HQ (or SAM) masks → (H, W) uint16 instance-id maps.
* :class:`PanopticSemanticBackend` (``--semantic mask2former|oneformer``): COCO-panoptic style semantic
  maps → (H, W) uint8 class-id maps, class names from the model's ``id2label``.
* :func:`resolve_model` turns a ``--*-model`` value into a local folder or a hub id;
  :func:`prompt_for` makes the Grounding DINO prompt from a class folder name.

Models load with transformers (``from_pretrained``); nothing is downloaded unless a hub id is given.
Every loading problem is a :class:`~cfmae_cli.errors.CfmaeError` naming the option and the model.
"""

from __future__ import annotations

from cfmae_cli.labeling.grounded_sam import GroundedSamBackend, paint_instances, select_boxes
from cfmae_cli.labeling.hf_utils import normalize_prompt, prompt_for, resolve_model
from cfmae_cli.labeling.panoptic import PanopticSemanticBackend, semantic_labels, valid_size

__all__ = [
    "GroundedSamBackend", "PanopticSemanticBackend", "normalize_prompt", "paint_instances", "prompt_for",
    "resolve_model", "select_boxes", "semantic_labels", "valid_size",
]
