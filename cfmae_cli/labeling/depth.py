"""``cfmae label --depth depth-anything --depth-model M``: relative depth from a monocular depth model of
transformers (``AutoModelForDepthEstimation``: Depth Anything, DPT, …), one 16-bit grey PNG per image at the
image's size (``DATA/depth/``, docs/modalities.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cfmae_cli.data.maps import to_uint16
from cfmae_cli.errors import CfmaeError
from cfmae_cli.labeling.hf_utils import (as_rgb_array, chunks, inference_context, load_or_fail, resolve_model,
                                         transformers_module)

DEPTH_OPTION = "--depth-model"


class DepthBackend:
    """A transformers depth model. ``label_depth`` gives each image's relative depth as uint16, scaled per
    image to the full range (0 = the smallest value the model gives, 65535 = the largest): the models give
    relative (inverse) depth, whose scale means nothing across images."""

    name = "depth-anything"

    def __init__(self, depth_model: str, device: torch.device, batch_size: int = 8, bf16: bool = False):
        if batch_size < 1:
            raise CfmaeError(f"--depth: batch_size must be >= 1, got {batch_size}")
        self.device, self.batch_size, self.bf16 = torch.device(device), int(batch_size), bool(bf16)
        self.spec = spec = resolve_model(depth_model, DEPTH_OPTION)
        tf = transformers_module(DEPTH_OPTION)
        self.processor = load_or_fail(DEPTH_OPTION, spec, "depth image processor",
                                      lambda: tf.AutoImageProcessor.from_pretrained(spec))
        self.model = load_or_fail(DEPTH_OPTION, spec, "depth model",
                                  lambda: tf.AutoModelForDepthEstimation.from_pretrained(spec))
        self.model.eval().to(self.device)

    def label_depth(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W) uint16 relative depth for each HxWx3 uint8 RGB image, at the image's size."""
        images = [as_rgb_array(im) for im in images]
        out: list[np.ndarray] = []
        for idx in chunks(len(images), self.batch_size):
            group = [images[i] for i in idx]
            inputs = self.processor(images=group, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device)
            with inference_context(self.device, self.bf16):
                predicted = self.model(pixel_values=pixels).predicted_depth.float()
            for depth, image in zip(predicted, group):
                full = torch.nn.functional.interpolate(depth[None, None], size=image.shape[:2], mode="bicubic",
                                                       align_corners=False)[0, 0]
                out.append(to_uint16(full.cpu().numpy()))
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for the dataset manifest."""
        return {"backend": self.name, "depth_model": self.spec, "model_type": self.model.config.model_type,
                "bf16": self.bf16, "stored": "uint16 PNG, min-max scaled per image (relative depth as the model "
                "gives it: Depth Anything and DPT give inverse depth, larger = nearer)"}
