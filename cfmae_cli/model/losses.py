"""Targets and losses (Eqs. 3, 5): only masked tokens count; id 255 is ignored; never NaN. An image's target is
raw, per-patch normalised (MAE) or standardised per image (MultiMAE's depth), as the table of modalities and
``model.image_targets`` say. The table names each modality's loss; :data:`LOSSES` maps the names to functions."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from cfmae_cli import modalities as table
from cfmae_cli.formats import UNLABELLED
from cfmae_cli.modalities import Modality


def patchify_image(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → (B, N, patch·patch·C), pixels row-major inside a patch, channels last."""
    b, c, h, w = images.shape
    g_h, g_w = h // patch, w // patch
    x = images.reshape(b, c, g_h, patch, g_w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, g_h * g_w, patch * patch * c)


def unpatchify_image(patches: Tensor, patch: int) -> Tensor:
    """Inverse of :func:`patchify_image` for a square grid: (B, N, p·p·C) → (B, C, H, W)."""
    b, n, values = patches.shape
    g, c = int(round(n ** 0.5)), values // (patch * patch)
    x = patches.reshape(b, g, g, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * patch, g * patch)


def patchify_ids(ids: Tensor, grid: int) -> Tensor:
    """(B, h, w) ids → (B, N, cells) with N = grid², cells = (h/grid)·(w/grid), row-major like RGB."""
    b, h, w = ids.shape
    ph, pw = h // grid, w // grid
    return ids.reshape(b, grid, ph, grid, pw).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, ph * pw)


def normalise_patches(target: Tensor) -> Tensor:
    """MAE's norm-pix target: each patch to zero mean and unit variance (B, N, P)."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6).sqrt()


def _masked_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Σ values·weight / max(Σ weight, 1): 0, not NaN, when nothing is weighted."""
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def mse_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked patches: pred, target (B, N, P), mask (B, N) bool."""
    per_token = (pred.float() - target).pow(2).mean(-1)
    return _masked_mean(per_token, mask.float())


def l1_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the masked patches (MultiMAE's depth loss): pred, target (B, N, P), mask (B, N)
    bool."""
    per_token = (pred.float() - target).abs().mean(-1)
    return _masked_mean(per_token, mask.float())


ImageLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
#: an image modality's loss by the name its table entry gives (``Modality.loss``): loss(pred, target, mask)
LOSSES: dict[str, ImageLoss] = {"mse": mse_loss, "l1": l1_loss}


def register_loss(name: str, loss: ImageLoss) -> None:
    """Add (or replace) an image loss that table entries can name."""
    LOSSES[name] = loss


def loss_named(name: str) -> ImageLoss:
    """The image loss of ``name``; ``KeyError`` naming the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown image loss {name!r} (known: {', '.join(LOSSES)})") from None


def image_target(images: Tensor, patch: int, target: str) -> Tensor:
    """The regression target of an image modality, in fp32: (B, C, H, W) → (B, N, p·p·C). ``images`` are the
    modality as the model reads it (:func:`~cfmae_cli.data.transforms.inputs_on_device`). ``target``: ``raw``
    (those values), ``patch_norm`` (MAE's norm-pix: each patch to mean 0, unbiased variance 1) or
    ``standardise`` (MultiMAE's: the input itself, which ``inputs_on_device`` has standardised per image with
    :func:`~cfmae_cli.modalities.standardise_per_image`; the target is exactly what the encoder was given)."""
    if target not in table.TARGETS:
        raise ValueError(f"target {target!r}: one of {', '.join(table.TARGETS)}")
    values = patchify_image(images.float(), patch)
    return normalise_patches(values) if target == "patch_norm" else values


def image_loss(pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool | str,
               loss: ImageLoss = mse_loss) -> Tensor:
    """An image modality's loss over masked patches (MSE unless ``loss`` is given), in fp32. pred (B, N,
    p·p·C), images (B, C, H, W), mask (B, N) bool; ``norm_pix``: a target of :func:`image_target`, or a bool
    (True: ``patch_norm``, MAE's per-patch normalised target; False: ``raw``)."""
    target = ("patch_norm" if norm_pix else "raw") if isinstance(norm_pix, bool) else norm_pix
    return loss(pred, image_target(images, patch, target), mask)


def modality_loss(modality: Modality, pred: Tensor, x: Tensor, mask: Tensor, patch: int, classes: int,
                  norm_pix: bool, targets: Mapping[str, str] | None = None) -> Tensor:
    """The loss of one modality over its masked patches (Eq. 5), by the table's entry: an image's regression
    (the loss the entry names, from :data:`LOSSES`) on the target of :func:`~cfmae_cli.modalities.target_of`
    (the entry's, unless ``targets`` — ``model.image_targets`` — names the modality; ``patch_norm`` only under
    ``model.norm_pix_loss``), an id map's cross-entropy. ``x`` is the modality as the model reads it
    (:func:`~cfmae_cli.data.transforms.inputs_on_device`, with the same ``targets``: a ``standardise`` image comes
    standardised, and is its own target). ``patch`` is the side of a patch in the modality's pixels."""
    if modality.kind == "ids":
        return id_map_loss(pred, x, mask, classes)
    target = table.target_of(modality, targets, norm_pix)
    assert modality.loss is not None and target is not None  # an image's entry names both (Modality.__post_init__)
    return image_loss(pred, x, mask, patch, target, loss_named(modality.loss))


def id_map_loss(logits: Tensor, ids: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """Cross-entropy over the cells of masked patches, id 255 ignored, in fp32.

    logits (B, N, cells·C), ids (B, h, w), mask (B, N) bool.
    """
    b, n, _ = logits.shape
    grid = int(round(n ** 0.5))
    target = patchify_ids(ids, grid)  # (B, N, cells)
    logits = logits.float().reshape(b, n, target.shape[-1], num_classes)
    valid = (target != UNLABELLED) & mask.unsqueeze(-1)
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.reshape(-1, num_classes), safe.reshape(-1), reduction="none")
    return _masked_mean(ce.reshape(valid.shape), valid.float())

