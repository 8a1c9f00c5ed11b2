"""Detection transfer: ViTDet's pyramid, padding to the encoder's grid, a COCO round trip (instance maps →
COCO → AP of a perfect prediction = 100), the handling of bad annotations, and a Mask R-CNN fine-tuning run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.config import EncoderArch, load_config
from cfmae_cli.data.layout import list_samples
from cfmae_cli.errors import DataError
from cfmae_cli.eval.coco import CocoDetection, coco_ap, coco_from_layout, read_coco
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.detection import FixedSizeTransform, ViTDetBackbone, ViTMaskRCNN
from tests.conftest import SEM_CLASSES, make_dataset
from tests.test_export import _ours

runner = CliRunner()


def test_vitdet_pyramid_strides_and_channels() -> None:
    arch = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    backbone = ViTDetBackbone(arch, 64, channels=16)
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"] and backbone.out_channels == 16
    assert [64 // f.shape[-1] for f in feats.values()] == [2, 4, 8, 16, 32]  # p/4, p/2, p, 2p, 4p for p = 8
    assert all(f.shape[:2] == (2, 16) for f in feats.values())


def test_batches_are_padded_to_the_encoder_grid() -> None:
    t = FixedSizeTransform(64, (40,), 60, [0.5] * 3, [0.5] * 3)
    images, _ = t([torch.rand(3, 30, 50), torch.rand(3, 50, 20)])
    assert tuple(images.tensors.shape) == (2, 3, 64, 64)
    assert images.image_sizes == [(36, 60), (60, 24)]  # resized (short side 40, long side at most 60)


def test_rpn_proposals_per_image_follow_the_config() -> None:
    cfg = load_config("ft-det-demo", ["model.rpn_proposals=[40,7]", "model.fpn_channels=16"], FinetuneConfig)
    torch.manual_seed(0)
    net = ViTMaskRCNN(EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2), cfg, num_classes=3).eval()
    images, _ = net.transform([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    with torch.no_grad():
        proposals, _ = net.rpn(images, net.backbone(images.tensors))
    assert [len(p) for p in proposals] == [7, 7]  # torchvision's default would keep 1000 at test
    assert net.rpn._pre_nms_top_n == {"training": 40, "testing": 7}


def test_coco_round_trip_of_instance_maps(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", n_per_class=3)
    samples, _ = list_samples(root)
    coco = coco_from_layout(samples, SEM_CLASSES)
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == 18  # three rectangles per image
    assert {a["category_id"] for a in coco["annotations"]} == {3}  # the 'thing' class, 1-based
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in coco["annotations"]]
    ap = coco_ap(coco, perfect)
    assert ap["AP_box"] == pytest.approx(100.0) and ap["AP_mask"] == pytest.approx(100.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in perfect]
    assert coco_ap(coco, shifted)["AP_box"] < 50  # boxes beside the objects do not count


def test_bad_annotations_are_counted_or_refused(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
            "categories": [{"id": 7, "name": "thing"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 5, 40, 10], "iscrowd": 0, "area": 1,
                 "segmentation": [[20, 5, 60, 5, 60, 15, 20, 15]]},  # polygon and box out of bounds: clipped
                {"id": 2, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "iscrowd": 0, "area": 1,
                 "segmentation": [[0, 0, 5, 0, 5, 5]]},  # unknown category: dropped
                {"id": 3, "image_id": 1, "category_id": 7, "bbox": [3, 3, 0, 4], "iscrowd": 0, "area": 0,
                 "segmentation": [[3, 3, 3, 7, 3, 3]]},  # empty box: dropped
                {"id": 4, "image_id": 5, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 0, "area": 1,
                 "segmentation": [[0, 0, 5, 0, 5, 5]]}]}  # no such image
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ds = CocoDetection(read_coco(tmp_path / "ann.json", tmp_path / "img"), train=False)
    item = ds[0]
    assert item["target"]["boxes"].tolist() == [[20.0, 5.0, 30.0, 15.0]] and item["target"]["labels"].tolist() == [1]
    assert item["target"]["masks"].shape == (1, 20, 30) and item["target"]["masks"][0, 10, 25] == 1
    assert ds.problems == {"unknown_category": 1, "clipped_box": 1, "empty_box": 1, "unknown_image": 1}
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="not a readable COCO annotation file"):
        read_coco(tmp_path / "broken.json", tmp_path / "img")


def test_mask_rcnn_finetuning_on_the_dataset_layout(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data" / "train", n_per_class=3, seed=0)
    make_dataset(tmp_path / "data" / "val", n_per_class=1, seed=1)
    _, ckpt = _ours(tmp_path)  # patch 8, width 32, depth 2, img 32
    out = tmp_path / "run"
    sets = ["data.img_size=48", "data.min_size=[40]", "data.max_size=48", "data.num_workers=0",
            "optim.effective_batch=2", "train.batch_size=2", "train.epochs=1", "train.log_every=1",
            "model.fpn_channels=16", "model.rois_per_image=16", "model.detections_per_image=10",
            "model.anchor_sizes=[4,8,16,32,64]", "optim.milestones=[]", "data.min_instance_area=0.0"]
    result = runner.invoke(app, ["finetune", "--task", "detection", "--checkpoint", str(ckpt), "--data",
                                 str(tmp_path / "data"), "--out", str(out), *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    epoch = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"][0]
    assert {"AP_box", "AP_mask", "AP50_box", "APs_box", "APm_box", "APl_box", "APs_mask", "APl_mask", "loss_mask",
            "loss_objectness"} <= set(epoch)
    assert "APs/APm/APl box" in result.output
    assert 0 <= epoch["AP_box"] <= 100 and (out / "checkpoints/best.pt").is_file()
    result = runner.invoke(app, ["finetune", "--eval-only", "-c", str(out)])  # best.pt's APs, evaluated again
    assert result.exit_code == 0, result.output
    evaluated = json.loads((out / "eval-best.json").read_text())
    assert evaluated["kind"] == "detection"
    for key in ("AP_box", "AP_mask", "AP50_box"):
        assert evaluated["metrics"][key] == pytest.approx(epoch[key], abs=1e-9), key


def test_vitdet_pyramid_reads_the_last_block_before_the_final_norm() -> None:
    """ViTDet's simple pyramid takes the last block's output as it is (its own LayerNorms follow)."""
    arch = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    backbone = ViTDetBackbone(arch, 64, channels=16).eval()
    seen: dict[str, torch.Tensor] = {}
    backbone.encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(block=o))
    backbone.scales[2].register_forward_hook(lambda m, i, o: seen.update(level=i[0]))  # stride p: identity
    with torch.no_grad():
        backbone(torch.randn(2, 3, 64, 64))
    tokens = seen["block"][:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
    assert torch.equal(seen["level"], tokens)


def test_instance_masks_are_resized_onto_the_image() -> None:
    """Mask R-CNN's resize (short side drawn from data.min_size): the masks' bars sit where the image's are (to
    within 0.1 of an output pixel on average); torchvision's own nearest resize shifts them by up to half."""
    from tests.test_data import bar_images, bar_centre

    t = FixedSizeTransform(128, (40, 57, 83, 110), 128, [0.0] * 3, [1.0] * 3)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    dx, dy = [], []
    for _ in range(40):
        h, w = int(rng.integers(31, 70)), int(rng.integers(50, 90))
        x0, y0 = int(rng.integers(5, w // 2)), int(rng.integers(5, h // 2))
        rgb, inst, sem = bar_images(h, w, (x0, x0 + 9), (y0, y0 + 7))
        target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]),
                  "masks": torch.stack([inst, sem]).to(torch.uint8)}
        image, out = t.resize(rgb.float() / 255, target)
        side = image.shape[-1], image.shape[-2]
        dx.append((bar_centre(image[0], 1) - bar_centre(out["masks"][0], 1)) * side[0])
        dy.append((bar_centre(image[1], 0) - bar_centre(out["masks"][1], 0)) * side[1])
        assert out["masks"].shape[-2:] == image.shape[-2:]
    assert abs(np.mean(dx)) < 0.1 and abs(np.mean(dy)) < 0.1, (np.mean(dx), np.mean(dy))


def test_crowd_regions_are_not_training_targets_and_empty_images_are_skipped(tmp_path: Path) -> None:
    """MMDetection's training targets: an ``iscrowd=1`` annotation is no target, and a training image left
    without a usable annotation (only crowd, none, or only a degenerate box) is skipped and counted. The
    evaluation keeps every image."""
    (tmp_path / "img").mkdir()
    images = []
    for i in range(1, 5):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 20, "width": 30})
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    crowd_rle = {"size": [20, 30], "counts": [45, 10, 545]}  # uncompressed RLE, as COCO stores crowds
    coco = {"images": images, "categories": [{"id": 1, "name": "person"}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0, "area": 100,
         "segmentation": square},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [15, 2, 10, 10], "iscrowd": 1, "area": 100,
         "segmentation": crowd_rle},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [15, 2, 10, 10], "iscrowd": 1, "area": 100,
         "segmentation": crowd_rle},  # image 2: a crowd only; image 3: nothing
        {"id": 4, "image_id": 4, "category_id": 1, "bbox": [3, 3, 0, 4], "iscrowd": 0, "area": 0,
         "segmentation": [[3, 3, 3, 7, 3, 3]]}]}  # image 4: a degenerate box only
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    train = CocoDetection(read_coco(tmp_path / "ann.json", tmp_path / "img"), train=True, hflip=0.0)
    assert [im["id"] for im in train.images] == [1] and len(train) == 1
    assert train.without_annotations == 3 and train.crowd == 2
    assert train[(0, 0)]["target"]["boxes"].tolist() == [[2.0, 2.0, 12.0, 12.0]]
    val = CocoDetection(read_coco(tmp_path / "ann.json", tmp_path / "img"), train=False)
    assert len(val) == 4 and val.without_annotations == 0


def test_the_1x_schedule_is_mmdetections() -> None:
    """ft-det-vitb: 12 epochs, lr / 10 from the 9th epoch (1-based) and / 100 in the 12th (MMDetection's
    step=[8, 11]); epoch 8 still trains at the full rate."""
    from cfmae_cli.train.optim import lr_at

    cfg = load_config("ft-det-vitb", schema=FinetuneConfig)
    per_epoch, epochs = 100, cfg.train.epochs
    assert epochs == 12 and cfg.optim.schedule == "step"

    def lr_in(epoch: int) -> float:  # the lr of the first step of a 1-based epoch, after the warmup
        return lr_at((epoch - 1) * per_epoch, epochs * per_epoch, 0, 1.0, 0.0, "step",
                     tuple(m / epochs for m in cfg.optim.milestones))

    assert [lr_in(e) for e in (1, 8, 9, 11, 12)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def _box(image_id: int, ann_id: int, x: int, y: int, w: int, h: int) -> dict:
    mask = np.zeros((300, 300), np.uint8)
    mask[y:y + h, x:x + w] = 1
    from cfmae_cli.eval.coco import rle
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [float(x), float(y), float(w), float(h)],
            "area": float(w * h), "iscrowd": 0, "segmentation": rle(mask)}


def test_ap_by_object_size_follows_cocos_area_ranges() -> None:
    """APs / APm / APl are pycocotools' stats[3..5] (areas < 32², 32²…96², > 96²), for boxes and masks: on a
    set whose answer is known — the small object and one of the two medium ones found exactly, the large one
    missed — APs is 100, APm 100 x 51/101 (recall 1/2 on COCO's 101 recall points), APl 0; each object sits
    just on its side of a threshold (1,023 and 1,089 px around 32² = 1,024; 9,025 and 9,409 around 96²)."""
    anns = [_box(1, 1, 5, 5, 31, 33), _box(1, 2, 60, 5, 33, 33), _box(1, 3, 5, 100, 95, 95),
            _box(1, 4, 150, 150, 97, 97)]  # small, medium, medium, large
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 300, "width": 300}],
            "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
    found = [{"image_id": 1, "category_id": 1, "score": 1.0, "bbox": a["bbox"], "segmentation": a["segmentation"]}
             for a in (anns[0], anns[2])]
    ap = coco_ap(coco, found)
    for kind in ("box", "mask"):
        assert ap[f"APs_{kind}"] == pytest.approx(100.0)
        assert ap[f"APm_{kind}"] == pytest.approx(100 * 51 / 101)
        assert ap[f"APl_{kind}"] == pytest.approx(0.0)
        assert ap[f"AP50_{kind}"] == pytest.approx(100 * 51 / 101)  # two of four objects, all sizes
    no_large = {**coco, "annotations": anns[:3]}
    assert coco_ap(no_large, found)["APl_box"] is None  # no ground truth of that size: pycocotools' -1


def test_windowed_attention_keeps_windows_apart() -> None:
    """ViTDet's windowed block: a token changed in one window changes no token of another window (nor the
    global token) after a windowed block, and changes every token after a global block; the grid (8 x 8)
    is padded to a multiple of the window (3 → 9 x 9)."""
    from cfmae_cli.model.encoder import WindowedAttention, build_encoder

    torch.manual_seed(0)
    enc = build_encoder(EncoderArch(patch_size=8, embed_dim=32, depth=8, num_heads=2), 64, window_size=3).eval()
    assert enc.windowed == [0, 2, 4, 6] and isinstance(enc.blocks[0].attn, WindowedAttention)
    x = torch.randn(1, 1 + 64, 32)
    y = x.clone()
    y[0, 1 + 0 * 8 + 1] += torch.randn(32)  # patch (row 0, column 1): window (0, 0) holds rows 0-2, columns 0-2
    window_of = torch.tensor([(r // 3) * 3 + c // 3 for r in range(8) for c in range(8)])
    with torch.no_grad():
        a, b = enc.blocks[0](x), enc.blocks[0](y)
        changed = (a - b).abs().amax(-1)[0] > 1e-6
        assert not changed[0]  # the global token
        assert changed[1:][window_of == 0].all() and not changed[1:][window_of != 0].any()
        assert ((enc.blocks[1](x) - enc.blocks[1](y)).abs().amax(-1)[0] > 1e-6).all()  # global: everything
        with pytest.raises(ValueError, match="whole 8 x 8 patch grid"):
            enc.blocks[0](x[:, :10])  # visible tokens only (pre-training's input): refused


def test_global_blocks_are_the_last_of_each_quarter() -> None:
    from cfmae_cli.model.encoder import build_encoder, global_blocks

    assert global_blocks(12) == [2, 5, 8, 11] and global_blocks(24) == [5, 11, 17, 23]
    assert global_blocks(4) == [0, 1, 2, 3]  # the demo's depth: every block global
    enc = build_encoder(EncoderArch(patch_size=8, embed_dim=32, depth=12, num_heads=2), 64, window_size=4)
    assert enc.windowed == [0, 1, 3, 4, 6, 7, 9, 10]
    shallow = build_encoder(EncoderArch(patch_size=8, embed_dim=32, depth=4, num_heads=2), 64, window_size=4)
    assert shallow.windowed == []
    assert build_encoder(EncoderArch(patch_size=8, embed_dim=32, depth=12, num_heads=2), 64).windowed == []


def test_windowed_backbone_loads_the_same_weights() -> None:
    """The windowed encoder has the global one's parameters, key for key: one seed builds the same weights,
    and pre-trained weights load into it unchanged."""
    from cfmae_cli.eval.classifier import load_encoder_weights
    from cfmae_cli.model.encoder import build_encoder

    arch = EncoderArch(patch_size=8, embed_dim=32, depth=8, num_heads=2)
    torch.manual_seed(0)
    plain = ViTDetBackbone(arch, 64, channels=16)
    torch.manual_seed(0)
    windowed = ViTDetBackbone(arch, 64, channels=16, window_size=4)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in windowed.state_dict().items()}
    assert all(torch.equal(v, windowed.state_dict()[k]) for k, v in plain.state_dict().items())
    torch.manual_seed(1)
    pretrained = {f"encoder.{k}": v for k, v in build_encoder(arch, 32).state_dict().items()}
    load_encoder_weights(windowed, pretrained, "test")
    load_encoder_weights(plain, pretrained, "test")
    loaded = windowed.encoder.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in plain.encoder.state_dict().items())
    blocks = [k for k in pretrained if k.startswith("encoder.blocks.")]
    assert len(blocks) == 8 * 12 and all(torch.equal(loaded[k.removeprefix("encoder.")], pretrained[k]) for k in blocks)
    assert [f.shape for f in windowed(torch.randn(1, 3, 64, 64)).values()] == \
        [f.shape for f in plain(torch.randn(1, 3, 64, 64)).values()]


def test_the_learning_rates_of_tables_9_and_10_are_read_one_way() -> None:
    """docs/reproduce.md: the "base learning rate" of Tables 9 and 10 is per 256 images, as the paper's rule
    for Tables 7 and 8 (lr = base_lr x batch / 256), in both presets: 3e-3 → 1.875e-4 and 4e-4 → 2.5e-5 at
    batch 16; neither preset sets an absolute optim.lr."""
    from cfmae_cli.config import batch_plan

    for preset, table in (("ft-det-vitb", 3e-3), ("ft-seg-vitb", 4e-4)):
        cfg = load_config(preset, schema=FinetuneConfig)
        assert cfg.optim.lr is None and cfg.optim.base_lr == pytest.approx(table), preset
        plan = batch_plan(cfg.optim, cfg.train, 8)
        assert plan["effective_batch"] == 16 and plan["lr"] == pytest.approx(table * 16 / 256), preset


def test_window_size_is_for_detection_only() -> None:
    from cfmae_cli.errors import ConfigError

    assert load_config("ft-det-vitb", schema=FinetuneConfig).model.window_size == 14
    assert load_config("ft-det-demo", schema=FinetuneConfig).model.window_size == 0
    with pytest.raises(ConfigError, match="window_size"):
        load_config("ft-seg-vitb", ["model.window_size=14"], FinetuneConfig)


def test_a_window_as_large_as_the_grid_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", n_per_class=1, seed=0)
    _, ckpt = _ours(tmp_path)  # patch 8
    result = runner.invoke(app, ["finetune", "--task", "detection", "--checkpoint", str(ckpt), "--data",
                                 str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--set", "data.img_size=48",
                                 "--set", "data.max_size=48", "--set", "model.window_size=6"])
    assert result.exit_code == 2
    assert "model.window_size: 6 is not smaller than the 6 x 6 patch grid" in " ".join(result.output.split())
