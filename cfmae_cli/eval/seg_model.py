"""The segmentation model of the transfer to ADE20K (:mod:`cfmae_cli.eval.segmentation` trains and scores it): the
ViT encoder, a simple feature pyramid, an UperNet head and, in training, an auxiliary FCN head.

Pyramid (MAE / BEiT practice): the patch tokens of four blocks (``model.out_indices``) as (B, D, H/p, W/p)
maps, brought to strides p/4, p/2, p and 2p by two transposed convolutions, one, none and a max-pool.
UperNet: pyramid pooling (scales 1, 2, 3, 6) on the coarsest level, FPN top-down fusion, a 3x3 fusion of all
levels, a 1x1 classifier; logits are upsampled to the input size. An auxiliary FCN head (mmseg's FCNHead: a
3x3 conv-BN-ReLU, dropout 0.1, a 1x1 classifier) on the third level adds ``seg.aux_weight`` x its loss in
training only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfmae_cli.config import EncoderArch
from cfmae_cli.model.encoder import build_encoder
from cfmae_cli.model.layers import init_weights, run_block


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class SimplePyramid(nn.Module):
    """Four (B, D, h, w) maps at the patch stride → strides ÷4, ÷2, x1, x2 of it, D channels each."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UperHead(nn.Module):
    """UperNet over four levels of ``dim`` channels (finest first) → (B, classes, h0, w0) at the finest level."""

    def __init__(self, dim: int, channels: int, num_classes: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _up(x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, feats: list[Tensor]) -> Tensor:
        top = feats[3]
        psp = self.bottleneck(torch.cat([top] + [self._up(pool(top), top) for pool in self.ppm], dim=1))
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:3])] + [psp]
        for i in range(3, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + self._up(levels[i], levels[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:3])] + [levels[3]]
        fused = self.fuse(torch.cat([outs[0]] + [self._up(o, outs[0]) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg's FCNHead with one conv (the auxiliary head of UperNet): 3x3 conv-BN-ReLU to ``channels``,
    dropout 0.1, 1x1 classifier."""

    def __init__(self, dim: int, channels: int, num_classes: int):
        super().__init__()
        self.conv = conv_bn_relu(dim, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class ViTSegmenter(nn.Module):
    """batch {rgb (B, 3, H, W)} → logits (B, classes, H, W); in training with an auxiliary head (``aux_channels``
    > 0) → (logits, auxiliary logits), both at the input size. An input of another size than ``img_size`` (whole
    inference) reads the position table resized bicubically to its patch grid. ``grad_checkpointing``: the
    encoder's blocks are recomputed in the backward pass instead of keeping their activations."""

    AUX_LEVEL = 2  # the third pyramid level (stride p), mmseg's in_index=2

    def __init__(self, arch: EncoderArch, img_size: int, num_classes: int, out_indices: list[int],
                 channels: int = 512, drop_path: float = 0.0, train_pos_embed: bool = True, aux_channels: int = 0,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.encoder = build_encoder(arch, img_size, drop_path, final_norm=False,  # the pyramid reads blocks
                                     grad_checkpointing=grad_checkpointing)
        self.img_size = img_size
        self.out_indices = list(out_indices)
        self.pyramid = SimplePyramid(arch.embed_dim)
        self.head = UperHead(arch.embed_dim, channels, num_classes)
        self.aux_head = FCNHead(arch.embed_dim, aux_channels, num_classes) if aux_channels > 0 else None
        init_weights(self)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        self.encoder.pos_embed.requires_grad_(train_pos_embed)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise decay as for classification: stem 0, block i at i+1, pyramid and heads last."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)", "blocks": [(r"^encoder\.blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}

    def features(self, x: Tensor) -> list[Tensor]:
        """The patch tokens after the blocks of ``out_indices``, each (B, D, H/p, W/p)."""
        if tuple(x.shape[-2:]) == (self.img_size, self.img_size):
            return self.encoder.block_features(x, self.out_indices)
        return self._features_any_size(x)

    def _features_any_size(self, x: Tensor) -> list[Tensor]:
        """:meth:`features` of an input whose patch grid is not the position table's: the table resized
        bicubically (MAE's interpolation) to the grid, the blocks as the encoder runs them."""
        enc = self.encoder
        tokens = enc.patch_embed.proj(x)
        b, d, h, w = tokens.shape
        tokens = enc.patch_embed.norm(tokens.flatten(2).transpose(1, 2))
        g = enc.grid
        table = enc.patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
        pos = F.interpolate(table.float(), size=(h, w), mode="bicubic", align_corners=False)
        pos = pos.to(tokens.dtype).flatten(2).transpose(1, 2)
        glob = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        z = enc.norm_pre(enc.patch_drop(enc.pos_drop(torch.cat([glob, tokens + pos], dim=1))))
        wanted, maps = set(self.out_indices), {}
        for i, block in enumerate(enc.blocks[:max(self.out_indices) + 1]):
            z = run_block(block, z, checkpointed=enc.grad_checkpointing)
            if i in wanted:
                maps[i] = z[:, 1:].transpose(1, 2).reshape(b, d, h, w)
        return [maps[i] for i in self.out_indices]

    def forward(self, batch: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        x = batch["rgb"]
        levels = self.pyramid(self.features(x))
        logits = F.interpolate(self.head(levels), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = self.aux_head(levels[self.AUX_LEVEL])
            return logits, F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

