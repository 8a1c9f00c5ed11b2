"""Segmentation transfer: the pyramid's strides and channels, mIoU from a hand-made confusion matrix, ADE20K's
label convention, layer-wise decay, and a fine-tuning run on the dataset layout's semantic maps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.config import EncoderArch
from cfmae_cli.errors import DataError
from cfmae_cli.eval.config import FinetuneConfig, FtOptimConfig
from cfmae_cli.eval.segmentation import ViTSegmenter, confusion, segmentation_datasets, segmentation_metrics
from cfmae_cli.eval.task import layer_decay_groups
from cfmae_cli.formats import UNLABELLED
from tests.conftest import make_dataset
from tests.test_export import _ours

runner = CliRunner()
ARCH = EncoderArch(patch_size=8, embed_dim=32, depth=3, num_heads=2, map_stride=2, map_embed_dim=8)


def test_pyramid_strides_and_channels() -> None:
    model = ViTSegmenter(ARCH, 64, 5, [0, 1, 1, 2], channels=16)
    x = torch.randn(2, 3, 64, 64)
    feats = model.features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8)] * 4  # the patch grid, D channels
    levels = model.pyramid(feats)
    assert [tuple(f.shape) for f in levels] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    assert [64 // f.shape[-1] for f in levels] == [2, 4, 8, 16]  # patch 8: strides p/4, p/2, p, 2p
    assert tuple(model({"rgb": x}).shape) == (2, 5, 64, 64)


def test_miou_from_a_hand_made_confusion_matrix() -> None:
    target = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, UNLABELLED, UNLABELLED])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2, 0])
    conf = confusion(pred, target, 3)
    assert conf.tolist() == [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # the two unlabelled pixels are left out
    m = segmentation_metrics(conf)
    iou0, iou1 = 5 / (5 + 1 + 2), 3 / (3 + 2 + 1)
    assert m["iou"][0] == pytest.approx(100 * iou0) and m["iou"][1] == pytest.approx(100 * iou1)
    assert math.isnan(m["iou"][2])  # a class in neither labels nor predictions does not count
    assert m["mIoU"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert m["pixel_acc"] == pytest.approx(100 * 8 / 11)
    assert m["mAcc"] == pytest.approx(100 * (5 / 6 + 3 / 5) / 2)


def test_pyramid_and_head_take_the_full_lr() -> None:
    model = ViTSegmenter(ARCH, 32, 4, [0, 1, 1, 2], channels=8)
    groups = layer_decay_groups(model, FtOptimConfig(layer_decay=0.5))
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.classifier.weight"] == scale["pyramid.up2.weight"] == 1.0
    assert scale["encoder.blocks.2.mlp.fc1.weight"] == 0.5 and scale["encoder.patch_embed.proj.weight"] == 0.5 ** 4


def ade20k(root: Path, missing: bool = False) -> Path:
    for split in ("training", "validation"):
        for i in range(3):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            if missing and split == "validation" and i == 2:
                continue
            ann = np.zeros((40, 50), np.uint8)
            ann[:, 10:] = 1
            ann[:, 30:] = 150
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def test_ade20k_layout_ignores_other_and_shifts_the_ids(tmp_path: Path) -> None:
    cfg = FinetuneConfig.model_validate({"kind": "segmentation", "data": {"img_size": 48}})
    data = segmentation_datasets(cfg, ade20k(tmp_path / "ade"))
    assert data["num_classes"] == 150 and len(data["train"]) == len(data["val"]) == 3
    sem = data["val"][0]["semantic"]
    assert set(sem.unique().tolist()) == {0, 149, UNLABELLED}  # 0 → ignored, 1 → 0, 150 → 149
    with pytest.raises(DataError, match="annotation"):
        segmentation_datasets(cfg, ade20k(tmp_path / "broken", missing=True))


def test_segmentation_finetuning_on_the_dataset_layout(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data" / "train", n_per_class=4, seed=0)
    make_dataset(tmp_path / "data" / "val", n_per_class=2, seed=1)
    source, ckpt = _ours(tmp_path)  # patch 8, width 32, depth 2
    out = tmp_path / "run"
    sets = ["data.img_size=32", "data.num_workers=0", "optim.effective_batch=4", "train.batch_size=4",
            "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "model.out_indices=[0,0,1,1]",
            "model.head_channels=8", "optim.lr=1e-12", "model.drop_path=0.0"]
    result = runner.invoke(app, ["finetune", "--task", "segmentation", "--checkpoint", str(ckpt), "--data",
                                 str(tmp_path / "data"), "--out", str(out),
                                 *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["mIoU"] <= 100 and 0 <= r["pixel_acc"] <= 100 for r in records)
    assert (out / "checkpoints/best.pt").is_file()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["kind"] == "segmentation" and cfg["model"]["encoder"]["depth"] == 2
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    assert torch.allclose(state["encoder.blocks.1.attn.qkv.weight"], source.state_dict()["encoder.blocks.1.attn.qkv.weight"],
                          atol=1e-6)
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "segmentation model" in " ".join(result.output.split())
    result = runner.invoke(app, ["finetune", "--eval-only", "-c", str(out)])  # best.pt's mIoU, evaluated again
    assert result.exit_code == 0, result.output
    best = next(r for r in records if r["mIoU"] == max(q["mIoU"] for q in records))
    evaluated = json.loads((out / "eval-best.json").read_text())
    assert evaluated["kind"] == "segmentation" and evaluated["epoch"] == best["epoch"]
    for key in ("mIoU", "pixel_acc", "mAcc"):
        assert evaluated["metrics"][key] == pytest.approx(best[key], abs=1e-9), key


# -- issue 27: mmsegmentation's ADE20K protocol ----------------------------------------------------------------
class StripePeriod(torch.nn.Module):
    """A segmenter for the test whose answer depends on texture scale: class 0 where the horizontal stripes
    repeat every 4 px (a grey value 2 px away differs), class 1 where they repeat every 8 px (4 px away differs),
    each read over a 9 px neighbourhood. Squashing the image horizontally changes the periods."""

    @staticmethod
    def _lag(g: torch.Tensor, k: int) -> torch.Tensor:
        return (g - torch.nn.functional.pad(g, (0, k, 0, 0), mode="replicate")[..., k:]).abs()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        g = batch["rgb"].mean(1, keepdim=True)
        d = torch.cat([self._lag(g, 2), self._lag(g, 4)], dim=1)
        return torch.nn.functional.avg_pool2d(d, (1, 9), stride=1, padding=(0, 4), count_include_pad=False)


def striped(height: int = 16, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    cols = torch.arange(width)
    left = (cols % 4 < 2).float()  # period 4: class 0
    right = (cols % 8 < 4).float()  # period 8: class 1
    row = torch.where(cols < width // 2, left, right)
    image = row.expand(1, 3, height, width).clone()
    return image, (cols >= width // 2).long().expand(height, width)


def test_slide_inference_keeps_the_texture_scale_that_a_squashed_resize_loses() -> None:
    from cfmae_cli.eval.segmentation import Inference, predict

    image, target = striped()  # 16 x 64: the short side is the window already (scale (64, 16))
    model = StripePeriod()
    inner = torch.zeros_like(target, dtype=torch.bool)
    inner[:, 8:24] = inner[:, 40:56] = True  # away from the edges and the border between the halves
    for mode in ("slide", "whole"):
        how = Inference(scale=(64, 16), crop=16, stride=10, mode=mode)
        pred = predict(model, image, (16, 64), how, patch=8).argmax(1)[0]
        assert pred.shape == target.shape
        assert torch.equal(pred[inner], target[inner]), mode  # both halves right
    # the old evaluation: the whole image squashed to the 16 x 16 window, the logits resized back
    squashed = torch.nn.functional.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False)
    logits = torch.nn.functional.interpolate(model({"rgb": squashed}), size=(16, 64), mode="bilinear",
                                             align_corners=False)
    wrong = logits.argmax(1)[0][inner] != target[inner]
    assert wrong.float().mean() > 0.4  # the right half's 8 px stripes become 2 px ones: read as class 0


def test_slide_windows_cover_the_image_and_average_where_they_overlap() -> None:
    from cfmae_cli.eval.segmentation import slide_logits

    class Counter(torch.nn.Module):
        def forward(self, batch):
            x = batch["rgb"]
            return torch.cat([x[:, :1], torch.ones_like(x[:, :1])], dim=1)  # the image itself, and a constant

    image = torch.arange(20 * 45, dtype=torch.float32).reshape(1, 1, 20, 45).expand(1, 3, 20, 45).contiguous()
    out = slide_logits(Counter(), image, crop=16, stride=10, max_batch=3)
    assert out.shape == (1, 2, 20, 45)
    assert torch.allclose(out[0, 0], image[0, 0]) and torch.allclose(out[0, 1], torch.ones(20, 45))
    small = image[..., :10, :12]  # shorter than the window: padded, the padding's logits dropped
    assert torch.allclose(slide_logits(Counter(), small, crop=16, stride=10)[0, 0], small[0, 0])


def test_the_training_resize_keeps_the_aspect_ratio() -> None:
    from cfmae_cli.eval.seg_data import SegTrainTransform, rescale_size
    from cfmae_cli.seeding import sample_rng

    assert rescale_size(683, 512, (2048, 512)) == (683, 512) and rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side's cap binds
    t = SegTrainTransform(64, (256, 64), (0.5, 2.0), 1.0, 0.0, None, (0, 0, 0))
    rgb = torch.randint(0, 256, (3, 60, 180), dtype=torch.uint8)
    label = (torch.arange(180) // 60).expand(60, 180).contiguous()  # three vertical bands
    shorts = []
    for i in range(12):
        with sample_rng(0, 0, i):
            out, lab = t.resize(rgb, label)
        h, w = out.shape[-2:]
        assert lab.shape == (h, w) and abs(w / h - 3) < 0.1  # 60 x 180 stays 1 : 3
        assert set(lab.unique().tolist()) == {0, 1, 2}  # nearest: no new ids
        shorts.append(h)
    assert min(shorts) >= 32 and max(shorts) <= 128 and max(shorts) - min(shorts) > 30  # 64 x [0.5, 2]
    with sample_rng(0, 0, 0):
        image, maps = t(rgb, {"semantic": label})
    assert image.shape == (3, 64, 64) and maps["semantic"].shape == (64, 64)


def test_cat_max_ratio_rejects_a_crop_dominated_by_one_class_and_gives_up_after_ten_tries(monkeypatch) -> None:
    from cfmae_cli.eval import seg_data
    from cfmae_cli.seeding import sample_rng

    half = torch.zeros(32, 64, dtype=torch.long)
    half[:, 32:] = 1  # left half class 0, right half class 1: a 32 px window is balanced only near the middle
    assert seg_data.dominated(half[:, :32], 0.75) and seg_data.dominated(half[:, 6:38], 0.75)  # 1, then 26/32
    assert not seg_data.dominated(half[:, 12:44], 0.75)  # 20/32 = 0.625
    ignored = half.clone()
    ignored[:, 16:32] = UNLABELLED
    assert seg_data.dominated(ignored[:, 16:48], 0.75)  # 255 is not a class: one class left
    dominated_any = False
    for i in range(20):
        with sample_rng(0, 0, i):
            top, left = seg_data.cat_max_crop(half, 32, 0.75)
        assert not seg_data.dominated(half[top:top + 32, left:left + 32], 0.75)
        with sample_rng(0, 0, i):
            top, left = seg_data.cat_max_crop(half, 32, 1.0)  # off: any window
        dominated_any |= seg_data.dominated(half[top:top + 32, left:left + 32], 0.75)
    assert dominated_any
    draws = []
    real = seg_data.crop_origin

    def counted(h, w, crop):
        draws.append(real(h, w, crop))
        return draws[-1]

    monkeypatch.setattr(seg_data, "crop_origin", counted)
    single = torch.zeros(32, 64, dtype=torch.long)  # every window is one class
    with sample_rng(0, 0, 0):
        corner = seg_data.cat_max_crop(single, 32, 0.75)
    assert len(draws) == 11 and corner == draws[-1]  # 10 checked draws, then one more kept unchecked


def test_photometric_distortion_changes_pixels_and_leaves_labels_untouched() -> None:
    from cfmae_cli.eval.seg_data import Photometric, SegTrainTransform, hsv_to_rgb, rgb_to_hsv
    from cfmae_cli.seeding import sample_rng

    x = torch.randint(0, 256, (3, 8, 8)).float()
    assert torch.allclose(hsv_to_rgb(*rgb_to_hsv(x)), x, atol=1e-3)
    rgb = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    label = torch.randint(0, 5, (40, 50))
    plain = SegTrainTransform(32, (128, 32), (0.5, 2.0), 0.75, 0.5, None, (124, 116, 104))
    distorted = SegTrainTransform(32, (128, 32), (0.5, 2.0), 0.75, 0.5, Photometric(), (124, 116, 104))
    changed = 0
    for i in range(6):
        with sample_rng(3, 1, i):
            a, la = plain(rgb, {"semantic": label})
        with sample_rng(3, 1, i):
            b, lb = distorted(rgb, {"semantic": label})
        assert torch.equal(la["semantic"], lb["semantic"])  # the same crop and flip, labels as they were
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 32, 32)
        changed += int(not torch.equal(a, b))
    assert changed >= 3  # four steps of probability 1/2: most draws change the pixels


def test_the_auxiliary_loss_is_in_the_training_total_and_absent_at_evaluation() -> None:
    from cfmae_cli.eval.segmentation import SegmentationTask

    model = ViTSegmenter(ARCH, 32, 3, [0, 1, 1, 2], channels=8, aux_channels=8).train()
    task = SegmentationTask.__new__(SegmentationTask)
    task.cfg = type("Cfg", (), {"data": type("Data", (), {"mean": (0.5,) * 3, "std": (0.25,) * 3})})()
    task.noted_single, task.aux_weight = False, 0.4
    batch = {"rgb": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
             "semantic": torch.randint(0, 3, (2, 32, 32))}
    torch.manual_seed(0)
    total, values = task.forward(model, batch, None)
    torch.manual_seed(0)
    logits, aux = model(task.inputs(batch))  # the same dropout draws
    main = torch.nn.functional.cross_entropy(logits, batch["semantic"])
    aux_loss = torch.nn.functional.cross_entropy(aux, batch["semantic"])
    assert total.item() == pytest.approx(main.item() + 0.4 * aux_loss.item(), rel=1e-6)
    assert values.tolist() == pytest.approx([total.item(), main.item(), aux_loss.item()], rel=1e-6)
    assert abs(aux_loss.item() - main.item()) > 1e-4  # two heads, two losses
    total.backward()
    assert model.aux_head.classifier.weight.grad.abs().sum() > 0
    calls = []
    model.aux_head.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    out = model(task.inputs(batch))
    assert torch.is_tensor(out) and out.shape == (2, 3, 32, 32) and not calls  # no auxiliary logits at evaluation


def test_whole_inference_reads_an_image_of_another_size() -> None:
    torch.manual_seed(0)
    model = ViTSegmenter(ARCH, 32, 3, [0, 1, 1, 2], channels=8).eval()
    x = torch.randn(1, 3, 32, 32)
    same = model._features_any_size(x)  # the generic path at the table's own grid: the encoder's own
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(same, model.features(x)))
    assert model({"rgb": torch.randn(1, 3, 32, 48)}).shape == (1, 3, 32, 48)


def test_the_presets_carry_the_protocol() -> None:
    from cfmae_cli.config import load_config
    from cfmae_cli.eval.segmentation import Inference

    vitb = load_config("ft-seg-vitb", [], FinetuneConfig)
    how = Inference.of(vitb)
    assert (how.mode, how.crop, how.stride, how.scale) == ("slide", 512, 341, (2048, 512))
    assert vitb.model.head_channels == 768 and vitb.seg.aux_weight == 0.4 and vitb.seg.aux_channels == 256
    assert vitb.seg.ratio_range == (0.5, 2.0) and vitb.seg.cat_max_ratio == 0.75 and vitb.seg.photometric
    demo = Inference.of(load_config("ft-seg-demo", [], FinetuneConfig))
    assert (demo.crop, demo.stride, demo.scale) == (64, 42, (256, 64))
    aug = Inference.of(load_config("ft-seg-vitb", ["seg.aug_test=true", "seg.inference=whole"], FinetuneConfig))
    assert aug.flip and aug.ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and aug.mode == "whole"
