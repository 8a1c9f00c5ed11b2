"""Semantic maps from a universal-segmentation model (Mask2Former or OneFormer, e.g. trained on COCO panoptic).

Semantic inference as in Mask2Former: per pixel, ``argmax_c sum_q p(c | q) * sigmoid(mask_q)``
(the "no object" class removed). Two traps of transformers' batched post-processing are avoided here:

* the processor pads a batch of differently sized images to a common size, and
  ``post_process_semantic_segmentation`` resizes the *padded* prediction to the target size (the image is
  then shifted and stretched). We crop each prediction to its valid area (from ``pixel_mask``) first;
* label maps are only ever resized with nearest-neighbour sampling (the mask scores are upsampled
  bilinearly by the model's stride before the argmax, as the model was trained).

By default images whose processed sizes differ go through the model in separate forwards
(``pad_batches=False``): padding then never changes a label and the result of an image does not depend on
the batch it came in. ``pad_batches=True`` runs one padded forward per batch (faster on a GPU; the padded
area can slightly change the labels near the image's bottom and right borders).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfmae_cli.errors import CfmaeError
from cfmae_cli.data.maps import resample_map
from cfmae_cli.labeling.hf_utils import (as_rgb_array, chunks, inference_context, load_config_checked, load_or_fail,
                                         resolve_model, transformers_module)

logger = logging.getLogger(__name__)

SEMANTIC_OPTION = "--semantic-model"
KINDS = ("mask2former", "oneformer")


def valid_size(pixel_mask: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the valid (unpadded, top-left) area of a (Hp, Wp) pixel mask."""
    return int(pixel_mask.any(dim=1).sum()), int(pixel_mask.any(dim=0).sum())


def semantic_labels(class_logits: torch.Tensor, mask_logits: torch.Tensor, input_size: tuple[int, int],
                    valid: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """Semantic label map of one image from the query outputs.

    Args:
        class_logits: (Q, C + 1) per-query class logits (last = no object).
        mask_logits: (Q, h, w) per-query mask logits over the padded input (stride s = Hp / h, 4 in practice).
        input_size: (Hp, Wp) padded model-input size; valid: (hv, wv) the image's top-left area inside it.
        out_size: (H, W) size of the original image.
    Returns:
        (H, W) int64 class ids in [0, C).

    The mask logits are cropped to the cells that cover the valid area *before* any resize, upsampled by
    the stride (bilinear, scores only) and cropped to (hv, wv); the argmax there is resized to (H, W) with
    nearest-neighbour sampling. Cropping first means padded cells never blend into the image's border,
    so an image gives the same labels padded in a batch as alone (for the same logits).
    """
    q, h, w = mask_logits.shape
    (hp, wp), (hv, wv) = input_size, valid
    sh, sw = max(1, round(hp / h)), max(1, round(wp / w))
    ch, cw = min(h, math.ceil(hv / sh)), min(w, math.ceil(wv / sw))
    masks = mask_logits[:, :ch, :cw].float()
    masks = F.interpolate(masks[None], size=(ch * sh, cw * sw), mode="bilinear", align_corners=False)[0]
    masks = masks[:, :hv, :wv].sigmoid()
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, C)
    labels = torch.einsum("qc,qhw->chw", probs, masks).argmax(0)  # (hv, wv)
    return resample_map(labels, out_size)


class PanopticSemanticBackend:
    """Mask2Former / OneFormer semantic labeller; ``classes`` come from the model's ``id2label``."""

    def __init__(self, kind: str, semantic_model: str, device: torch.device, batch_size: int = 8, *,
                 pad_batches: bool = False, bf16: bool = False) -> None:
        if kind not in KINDS:
            raise CfmaeError(f"--semantic {kind}: unknown learned backend; choose one of {', '.join(KINDS)}")
        if batch_size < 1:
            raise CfmaeError(f"{kind}: batch_size must be >= 1, got {batch_size}")
        self.name = kind
        self.device = torch.device(device)
        self.batch_size, self.pad_batches, self.bf16 = int(batch_size), bool(pad_batches), bool(bf16)
        self.spec = spec = resolve_model(semantic_model, SEMANTIC_OPTION)
        tf = transformers_module(SEMANTIC_OPTION)
        config = load_config_checked(SEMANTIC_OPTION, spec, (kind,))
        if kind == "mask2former":
            model_cls = tf.Mask2FormerForUniversalSegmentation
            self.processor = load_or_fail(SEMANTIC_OPTION, spec, "Mask2Former image processor",
                                          lambda: tf.AutoImageProcessor.from_pretrained(spec))
        else:
            model_cls = tf.OneFormerForUniversalSegmentation
            # class_info_file=None: the class metadata (only used for training text) would otherwise be
            # fetched from the hub by the image processor.
            image_processor = load_or_fail(
                SEMANTIC_OPTION, spec, "OneFormer image processor",
                lambda: tf.AutoImageProcessor.from_pretrained(spec, class_info_file=None))
            tokenizer = load_or_fail(SEMANTIC_OPTION, spec, "OneFormer tokenizer",
                                     lambda: tf.AutoTokenizer.from_pretrained(spec))
            self.processor = tf.OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                   max_seq_length=config.text_encoder_context_length,
                                                   task_seq_length=config.task_seq_len)
        self.model = load_or_fail(SEMANTIC_OPTION, spec, f"{kind} model", lambda: model_cls.from_pretrained(spec))
        self.model.eval().to(self.device)
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.classes: list[str] = [str(id2label.get(i, f"class_{i}")) for i in range(len(id2label))]
        if not 0 < len(self.classes) <= 255:
            raise CfmaeError(f"{SEMANTIC_OPTION} {spec}: {len(self.classes)} classes; semantic maps are uint8 "
                             "with 255 = unlabelled, so 1..255 classes are supported")

    def label_semantic(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W) uint8 class ids (< len(classes)) for each HxWx3 uint8 RGB image, at the image's size."""
        images = [as_rgb_array(im) for im in images]
        out: list[np.ndarray | None] = [None] * len(images)
        for idx in chunks(len(images), self.batch_size):
            if self.pad_batches:
                groups = [list(idx)]
                encoded = None
            else:
                encoded = {i: self._encode([images[i]]) for i in idx}
                by_shape: dict[tuple[int, ...], list[int]] = {}
                for i in idx:
                    by_shape.setdefault(tuple(encoded[i]["pixel_values"].shape[-2:]), []).append(i)
                groups = list(by_shape.values())
            for group in groups:
                if encoded is None:
                    inputs = self._encode([images[i] for i in group])
                else:
                    inputs = {k: torch.cat([encoded[i][k] for i in group]) for k in encoded[group[0]]}
                for i, labels in zip(group, self._forward(inputs, [images[i].shape[:2] for i in group])):
                    out[i] = labels
        return out  # type: ignore[return-value]  # every slot was filled by the loop above

    def _encode(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"task_inputs": ["semantic"] * len(images)} if self.name == "oneformer" else {}
        enc = self.processor(images=list(images), return_tensors="pt", **kwargs)
        keep = ("pixel_values", "pixel_mask", "task_inputs")
        inputs = {k: enc[k] for k in keep if k in enc}
        if "pixel_mask" not in inputs:
            pv = inputs["pixel_values"]
            inputs["pixel_mask"] = torch.ones((pv.shape[0], *pv.shape[-2:]), dtype=torch.long)
        return inputs

    def _forward(self, inputs: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with inference_context(self.device, self.bf16):
            outputs = self.model(**inputs)
        height, width = inputs["pixel_values"].shape[-2:]
        input_size = (height, width)
        result = []
        for b, size in enumerate(sizes):
            labels = semantic_labels(outputs.class_queries_logits[b], outputs.masks_queries_logits[b], input_size,
                                     valid_size(inputs["pixel_mask"][b]), (int(size[0]), int(size[1])))
            result.append(labels.to(torch.uint8).cpu().numpy())
        return result

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for the dataset manifest."""
        return {"backend": self.name, "semantic_model": self.spec, "classes": len(self.classes),
                "pad_batches": self.pad_batches, "bf16": self.bf16,
                "inference": "argmax_c sum_q softmax(class_q)[c] * sigmoid(mask_q), cropped to the valid area, "
                             "nearest-neighbour resize"}
