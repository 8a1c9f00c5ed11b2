"""Learned labelling backends (Grounded SAM, Mask2Former / OneFormer) on tiny random-weight models, CPU only.

The models are built from configs and saved once per module (tests/tiny_label_models.py); nothing is
downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cfmae_cli.data.maps import resample_map  # noqa: E402
from cfmae_cli.errors import CfmaeError  # noqa: E402
from cfmae_cli.labeling.coco_panoptic import COCO_PANOPTIC_CLASSES  # noqa: E402
from cfmae_cli.labeling.models import (GroundedSamBackend, PanopticSemanticBackend, normalize_prompt,  # noqa: E402
                                       paint_instances, prompt_for, resolve_model,
                                       select_boxes, semantic_labels)

from tiny_label_models import (make_grounding_dino, make_mask2former, make_oneformer, make_sam,  # noqa: E402
                               make_sam_hq)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("label-models")
    return {"gdino": str(make_grounding_dino(root / "gdino")), "sam_hq": str(make_sam_hq(root / "sam-hq")),
            "sam": str(make_sam(root / "sam")), "mask2former": str(make_mask2former(root / "m2f")),
            "oneformer": str(make_oneformer(root / "oneformer"))}


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random colour image with a few rectangles (HxWx3 uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    for _ in range(3):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


WIDE, TALL = _photo(64, 160, 1), _photo(150, 72, 2)


# --- the saved folders ------------------------------------------------------------------------------------------
def test_tiny_folders_load_offline(models):
    from transformers import (AutoConfig, AutoProcessor, GroundingDinoForObjectDetection, GroundingDinoProcessor,
                              Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              OneFormerForUniversalSegmentation, OneFormerProcessor, SamHQModel, SamHQProcessor,
                              SamModel, SamProcessor)

    cases = {"gdino": (GroundingDinoForObjectDetection, GroundingDinoProcessor, "grounding-dino"),
             "sam_hq": (SamHQModel, SamHQProcessor, "sam_hq"), "sam": (SamModel, SamProcessor, "sam"),
             "mask2former": (Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, "mask2former"),
             "oneformer": (OneFormerForUniversalSegmentation, OneFormerProcessor, "oneformer")}
    for key, (model_cls, proc_cls, model_type) in cases.items():
        assert AutoConfig.from_pretrained(models[key], local_files_only=True).model_type == model_type
        model_cls.from_pretrained(models[key], local_files_only=True)
        assert isinstance(AutoProcessor.from_pretrained(models[key], local_files_only=True), proc_cls)
        proc_cls.from_pretrained(models[key], local_files_only=True)
    tok = AutoProcessor.from_pretrained(models["gdino"]).tokenizer
    ids = tok("cat .")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids and tok.pad_token_id == 0


# --- Grounded SAM -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("segmenter", ["sam_hq", "sam"])
def test_grounded_sam_labels_two_sizes(models, segmenter):
    backend = GroundedSamBackend(models["gdino"], models[segmenter], CPU, max_instances=5)
    out = backend.label_instances([WIDE, TALL], ["cat .", "Coffee Cup"])
    assert len(out) == 2
    for (ids, meta), img in zip(out, (WIDE, TALL)):
        assert ids.shape == img.shape[:2] and ids.dtype == np.uint16
        meta = json.loads(json.dumps(meta))
        assert backend.threshold_floor <= meta["threshold"] <= backend.box_threshold
        assert meta["instances"] == len(meta["boxes"]) == len(meta["scores"]) <= 5
        assert int(ids.max()) <= meta["instances"] and meta["detections"] >= meta["instances"]
        assert all(s > meta["threshold"] for s in meta["scores"])
    assert out[1][1]["prompt"] == "coffee cup ."
    desc = json.loads(json.dumps(backend.describe()))
    assert desc["segmenter_type"] == segmenter and desc["detector_model"] == models["gdino"]


def test_adaptive_threshold_lowers_when_nothing_passes(models):
    backend = GroundedSamBackend(models["gdino"], models["sam_hq"], CPU, box_threshold=0.99, threshold_floor=0.05,
                                 threshold_step=0.05)
    for det, img in zip(backend.detect([WIDE, TALL], ["cat .", "dog ."]), (WIDE, TALL)):
        assert 0.05 <= det["threshold"] < 0.99
        assert len(det["boxes"]) >= 1 and (det["scores"] > det["threshold"]).all()
        assert det["boxes"].dtype == np.float32 and det["boxes"].shape[1] == 4
        assert (det["boxes"][:, 2] <= img.shape[1]).all() and (det["boxes"][:, 3] <= img.shape[0]).all()
        assert np.all(np.diff(det["scores"]) <= 0)  # best first


def test_select_boxes_threshold_ladder():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float32)
    kw = dict(start=0.45, floor=0.2, step=0.05, nms_iou=0.5)
    keep, t = select_boxes(boxes, torch.tensor([0.9, 0.5, 0.1]), min_count=1, **kw)
    assert t == 0.45 and keep.tolist() == [0, 1]
    keep, t = select_boxes(boxes, torch.tensor([0.3, 0.25, 0.1]), min_count=1, **kw)
    assert t == pytest.approx(0.25) and keep.tolist() == [0]  # 0.3 is not > 0.3: one more step
    keep, t = select_boxes(boxes, torch.tensor([0.3, 0.25, 0.1]), min_count=2, **kw)
    assert t == pytest.approx(0.2) and keep.tolist() == [0, 1]
    keep, t = select_boxes(boxes, torch.tensor([0.15, 0.1, 0.05]), min_count=1, **kw)
    assert t == pytest.approx(0.2) and keep.numel() == 0  # stops at the floor
    keep, t = select_boxes(boxes[:0], torch.zeros(0), min_count=1, **kw)
    assert keep.numel() == 0


def test_select_boxes_nms_removes_duplicate():
    boxes = torch.tensor([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [30, 30, 40, 40]], dtype=torch.float32)
    keep, _ = select_boxes(boxes, torch.tensor([0.6, 0.8, 0.5]), start=0.45, floor=0.2, step=0.05, min_count=1,
                           nms_iou=0.5)
    assert keep.tolist() == [1, 2]


def test_paint_instances_largest_first_small_on_top():
    masks = torch.zeros(4, 20, 20, dtype=torch.bool)
    masks[0, :, :] = True              # large, background-like instance
    masks[1, 5:10, 5:10] = True        # small, inside the large one
    masks[2, 0, 0] = True              # 1 pixel: below min_area (0.01 x 400 = 4 px)
    masks[3, 12:16, 12:18] = True      # medium, worst score: cut by max_instances
    ids, order = paint_instances(masks, torch.tensor([0.5, 0.9, 0.99, 0.3]), min_area=0.01, max_instances=2)
    assert order == [0, 1]
    assert ids[7, 7] == 2 and ids[0, 0] == 1 and ids[13, 13] == 1 and int(ids.max()) == 2


# --- Mask2Former / OneFormer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mask2former", "oneformer"])
def test_semantic_two_sizes_and_batch_equals_alone(models, kind):
    backend = PanopticSemanticBackend(kind, models[kind], CPU, batch_size=4)
    assert backend.name == kind and backend.classes == COCO_PANOPTIC_CLASSES
    batch = backend.label_semantic([WIDE, TALL])
    for labels, img in zip(batch, (WIDE, TALL)):
        assert labels.shape == img.shape[:2] and labels.dtype == np.uint8
        assert int(labels.max()) < 133
        alone = backend.label_semantic([img])[0]
        np.testing.assert_array_equal(labels, alone)
    assert json.loads(json.dumps(backend.describe()))["classes"] == 133


def test_oneformer_class_metadata_is_not_fetched(models, tmp_path):
    # hub OneFormer folders name a class_info_file that the image processor would download from the hub
    folder = tmp_path / "oneformer"
    shutil.copytree(models["oneformer"], folder)
    cfg_file = folder / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["image_processor"].update(class_info_file="coco_panoptic.json", repo_path="shi-labs/oneformer_demo")
    cfg_file.write_text(json.dumps(cfg))
    backend = PanopticSemanticBackend("oneformer", str(folder), CPU)
    assert backend.label_semantic([TALL])[0].shape == TALL.shape[:2]


class _LocalStub(torch.nn.Module):
    """A stand-in universal-segmentation model whose mask logits depend only on nearby pixels (4x4 average
    pooling), so padding cannot change them: the padded-batch path must then match the alone result."""

    def forward(self, pixel_values, pixel_mask=None, **_):
        masks = F.avg_pool2d(pixel_values, 4, ceil_mode=True) * 4.0  # (B, 3, H/4, W/4): one query per channel
        cls = torch.full((pixel_values.shape[0], 3, 134), -10.0)
        for q, c in enumerate((5, 60, 120)):
            cls[:, q, c] = 10.0
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)


def test_padded_batch_is_cropped_to_each_image(models):
    backend = PanopticSemanticBackend("mask2former", models["mask2former"], CPU, pad_batches=True)
    backend.model = _LocalStub()
    padded = backend.label_semantic([WIDE, TALL])  # one forward, padded to a common size
    for labels, img in zip(padded, (WIDE, TALL)):
        alone = backend.label_semantic([img])[0]
        assert labels.shape == img.shape[:2] and len(np.unique(alone)) > 1
        np.testing.assert_array_equal(labels, alone)


def test_semantic_labels_crops_before_resizing():
    # padded input 32x32 (mask logits 8x8, stride 4); the image fills the top-left 16x24 and is 32x48 originally
    mask_logits = torch.full((2, 8, 8), -20.0)
    mask_logits[0, :4, :3] = 20.0          # query 0 (class 0): left half of the valid 4x6 cells
    mask_logits[1, :4, 3:6] = 20.0         # query 1 (class 1): right half
    mask_logits[1, 4:, :] = 20.0           # padding rows/cols claim class 1: must not leak in
    mask_logits[1, :, 6:] = 20.0
    class_logits = torch.tensor([[9.0, -9.0, -9.0], [-9.0, 9.0, -9.0]])
    labels = semantic_labels(class_logits, mask_logits, (32, 32), (16, 24), (32, 48))
    expected = torch.zeros(32, 48, dtype=torch.long)
    expected[:, 24:] = 1
    assert torch.equal(labels, expected)


def test_resample_map_keeps_ids():
    labels = torch.tensor([[3, 200], [200, 3]], dtype=torch.uint8)
    out = resample_map(labels, (5, 7))
    assert out.shape == (5, 7) and out.dtype == torch.uint8 and set(out.unique().tolist()) == {3, 200}
    assert torch.equal(resample_map(out, (5, 7)), out)


# --- prompts and model specs ------------------------------------------------------------------------------------
def test_prompt_for():
    assert prompt_for("n01440764") == "tench ."
    assert prompt_for("golden_retriever") == "golden retriever ."
    assert prompt_for("Coffee-Mug") == "coffee mug ."
    assert prompt_for(None) == "object ." and prompt_for("") == "object ."
    assert normalize_prompt("A Cat") == "a cat ." and normalize_prompt("dog .") == "dog ."


def test_resolve_model(tmp_path):
    with pytest.raises(CfmaeError, match="--detector-model .*folder not found"):
        resolve_model(str(tmp_path / "missing"), "--detector-model")
    with pytest.raises(CfmaeError, match="--semantic-model"):
        resolve_model("./no/such/model", "--semantic-model")
    assert resolve_model("IDEA-Research/grounding-dino-base", "--detector-model") == "IDEA-Research/grounding-dino-base"
    assert resolve_model(str(tmp_path), "--x") == str(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CfmaeError, match="not a folder"):
        resolve_model(str(tmp_path / "file.bin"), "--x")


def test_loading_failures_are_clear(models, tmp_path):
    with pytest.raises(CfmaeError, match=r"--detector-model .*wrong architecture 'mask2former'"):
        GroundedSamBackend(models["mask2former"], models["sam_hq"], CPU)
    with pytest.raises(CfmaeError, match=r"--segmenter-model .*wrong architecture"):
        GroundedSamBackend(models["gdino"], models["gdino"], CPU)
    with pytest.raises(CfmaeError, match=r"--semantic-model .*wrong architecture 'oneformer'"):
        PanopticSemanticBackend("mask2former", models["oneformer"], CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CfmaeError, match=r"--semantic-model .*empty.*cannot load"):
        PanopticSemanticBackend("oneformer", str(tmp_path / "empty"), CPU)
    with pytest.raises(CfmaeError, match="--semantic"):
        PanopticSemanticBackend("seem", models["mask2former"], CPU)


def test_uncached_hub_id_offline_is_clear():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 before huggingface_hub is imported (no network in tests)")
    with pytest.raises(CfmaeError, match=r"--detector-model cfmae-tests/no-such-model.*cannot load"):
        GroundedSamBackend("cfmae-tests/no-such-model", "cfmae-tests/no-such-sam", CPU)



# --- the command, end to end -------------------------------------------------------------------------------------
def test_label_command_with_tiny_grounded_sam_and_mask2former(models, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cfmae_cli.cli import app
    from cfmae_cli.data.layout import list_samples, read_manifest

    src = tmp_path / "src"
    for folder, image in (("n01440764", WIDE), ("golden_retriever", TALL)):
        (src / folder).mkdir(parents=True)
        Image.fromarray(image).save(src / folder / "a.png")
    data = tmp_path / "data"
    result = CliRunner().invoke(app, ["label", str(src), "--out", str(data), "--workers", "0",
                                      "--instance", "grounded-sam", "--detector-model", models["gdino"],
                                      "--segmenter-model", models["sam_hq"], "--semantic", "mask2former",
                                      "--semantic-model", models["mask2former"], "--box-threshold", "0.9",
                                      "--threshold-floor", "0.0", "--preview", "2"])
    assert result.exit_code == 0, result.output
    samples, classes = list_samples(data)
    assert classes == ["golden_retriever", "n01440764"] and len(samples) == 2
    for s in samples:
        size = Image.open(s.rgb).size
        assert Image.open(s.maps["instance"]).size == size == Image.open(s.maps["semantic"]).size
        assert np.asarray(Image.open(s.maps["semantic"])).max() < 133
    manifest = read_manifest(data)
    assert manifest["semantic_classes"] == COCO_PANOPTIC_CLASSES and manifest["num_semantic_classes"] == 133
    meta = json.loads((data / "meta" / "n01440764.jsonl").read_text())
    assert meta["prompt"] == "tench ." and 0.0 <= meta["threshold"] <= 0.9
    assert (data / "preview.png").is_file()


def test_label_command_names_a_missing_model_folder(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cfmae_cli.cli import app

    (tmp_path / "src").mkdir()
    Image.fromarray(WIDE).save(tmp_path / "src" / "a.png")
    result = CliRunner().invoke(app, ["label", str(tmp_path / "src"), "--out", str(tmp_path / "d"), "--workers", "0",
                                      "--semantic", "mask2former", "--semantic-model", str(tmp_path / "no-model")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--semantic-model" in result.output and "no-model" in result.output
